//! Command decoding ([`plan`]: the CDB is checked before any data moves, so that the
//! transport knows how much Data-Out to solicit and can fail a bad command at once) and the
//! emulated commands. [`crate::scsi::port::ScsiPort::execute`] runs what `plan` accepted.
#![forbid(unsafe_code)]

use crate::bdev::IoOp;
use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::*;
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::*;

/// Operation codes (SPC-4, SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}
use crate::scsi::mmc::{self, opcode::*};
use crate::scsi::opcodes::{self, MAINTENANCE_IN};
use opcode::*;

/// SERVICE ACTION IN(16) service actions READ CAPACITY(16) and GET LBA STATUS.
const SAI_READ_CAPACITY_16: u8 = 0x10;
const SAI_GET_LBA_STATUS: u8 = 0x12;

/// Block Limits VPD (SBC-3 §6.5.3) for thin provisioned devices: at most this many UNMAP
/// block descriptors in one UNMAP command...
const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// ...and at most this many bytes deallocated by one command (64 MiB).
const MAX_UNMAP_BYTES: u64 = 64 << 20;

/// MAXIMUM UNMAP LBA COUNT in blocks of `bs`.
fn max_unmap_blocks(bs: u32) -> u32 {
    (MAX_UNMAP_BYTES / u64::from(bs)) as u32
}

/// MAXIMUM WRITE SAME LENGTH: a WRITE SAME is expanded into one buffer of its whole range.
fn max_write_same_blocks(bs: u32) -> u32 {
    (MAX_TRANSFER as u32) / bs
}

/// MAXIMUM COMPARE AND WRITE LENGTH. Atomic test-and-set users (VMware ATS, cluster locks)
/// send one block; 128 bounds how long a range stays locked and keeps the Data-Out (twice
/// the range) within one transfer. It stays below the one-byte field's 255 so that a request
/// one block past the limit can be expressed, and is refused.
fn max_compare_and_write_blocks(bs: u32) -> u32 {
    ((MAX_TRANSFER as u32) / (2 * bs)).min(128)
}

/// OPTIMAL UNMAP GRANULARITY: 4 KiB.
fn unmap_granularity(bs: u32) -> u32 {
    (4096 / bs).max(1)
}

/// SAM-5 §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE do not report unit attentions; nor
/// do MMC's GET CONFIGURATION and GET EVENT STATUS NOTIFICATION (polled while a CD drive
/// has a pending attention).
pub fn ua_applies(task: &ScsiTask) -> bool {
    !matches!(
        task.opcode(),
        INQUIRY | REPORT_LUNS | REQUEST_SENSE | GET_CONFIGURATION | GET_EVENT_STATUS_NOTIFICATION
    )
}

/// Whether `op` is a command of `dev`'s device type (SBC-3 for disks, MMC-5 for CD-ROMs).
pub(crate) fn supported(dev: &Device, op: u8, c: &[u8; 16]) -> bool {
    let common = matches!(
        op,
        TEST_UNIT_READY
            | REQUEST_SENSE
            | INQUIRY
            | MODE_SENSE_6
            | MODE_SENSE_10
            | START_STOP_UNIT
            | PREVENT_ALLOW
            | READ_CAPACITY_10
            | READ_10
            | READ_12
            | WRITE_10
            | WRITE_12
            | WRITE_VERIFY_10
            | VERIFY_10
            | SYNCHRONIZE_CACHE_10
            | REPORT_LUNS
    );
    if common {
        return true;
    }
    if dev.scsi_type() == mmc::TYPE_CDROM {
        matches!(
            op,
            READ_TOC
                | GET_CONFIGURATION
                | GET_EVENT_STATUS_NOTIFICATION
                | READ_DISC_INFORMATION
                | MECHANISM_STATUS
        )
    } else {
        match op {
            READ_6 | WRITE_6 | READ_16 | WRITE_16 | WRITE_VERIFY_12 | WRITE_VERIFY_16
            | VERIFY_12 | VERIFY_16 | SYNCHRONIZE_CACHE_16 | WRITE_SAME_10 | WRITE_SAME_16
            | COMPARE_AND_WRITE | ORWRITE_16 | PRE_FETCH_10 | PRE_FETCH_16 => true,
            // SCST: UNMAP exists only on thin provisioned devices.
            UNMAP => dev.thin_provisioned(),
            SERVICE_ACTION_IN_16 => {
                matches!(c[1] & 0x1f, SAI_READ_CAPACITY_16 | SAI_GET_LBA_STATUS)
            }
            // MMC gives A3h to SEND KEY: disks only.
            MAINTENANCE_IN => opcodes::is_report(c),
            _ => false,
        }
    }
}

/// Commands that work without a medium (SPC-4 §4.4, MMC-5 §4.1.7): all others end with
/// NOT READY, MEDIUM NOT PRESENT while the drive is empty.
fn works_without_medium(op: u8) -> bool {
    matches!(
        op,
        INQUIRY
            | REQUEST_SENSE
            | REPORT_LUNS
            | MODE_SENSE_6
            | MODE_SENSE_10
            | START_STOP_UNIT
            | PREVENT_ALLOW
            | GET_CONFIGURATION
            | GET_EVENT_STATUS_NOTIFICATION
            | MECHANISM_STATUS
            | MAINTENANCE_IN
    )
}

fn write_protected(dev: &Device, task: &ScsiTask) -> bool {
    task.read_only || dev.is_read_only() || dev.scsi_type() == mmc::TYPE_CDROM
}

/// Decodes and checks a command before its data moves. On error nothing has changed in the
/// task: the caller ends it with the sense returned ([`ScsiTask::fail`]).
pub fn plan(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let op = task.opcode();
    if task.cdb_len > 16 {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        ));
    }
    if ua_applies(task) {
        if let Some((asc, ascq)) = dev.take_ua(task.nexus) {
            return Err(Sense::new(sense::UNIT_ATTENTION, (asc, ascq)));
        }
    }
    // CONTROL byte: NACA (bit 2) is not supported (SAM-5 §5.9).
    let clen = cdb_len_of(op);
    if clen > 0 && task.cdb[clen - 1] & 0x04 != 0 {
        return Err(Sense::invalid_cdb_field(clen as u16 - 1, Some(2)));
    }
    let c = task.cdb;
    if !supported(dev, op, &c) {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        ));
    }
    if !works_without_medium(op) {
        // No medium (3A/00), or an inactive backing (04/03).
        if let Some(asc) = dev.not_ready() {
            return Err(Sense::new(sense::NOT_READY, asc));
        }
    }
    let none = Ok(Plan {
        dir: DataDir::None,
        len: 0,
    });
    // An emulated command's allocation length only bounds what it returns (SPC-4 §4.2.5.6),
    // and what it returns is far below the largest transfer: a buffer of that size does.
    // Planning more (up to 4 GiB in a 32-bit field) would ask the transport for a buffer no
    // pool can give, and the command would wait for it in vain.
    let din = |len: u32| {
        Ok(Plan {
            dir: DataDir::In,
            len: len.min(MAX_TRANSFER as u32),
        })
    };
    match op {
        TEST_UNIT_READY => none,
        START_STOP_UNIT => {
            // LOEJ=1 with POWER CONDITION 0 loads or ejects the medium (SBC-3 §5.25): not
            // while removal is prevented (SPC-4 §6.13).
            let loej = c[4] & 0x02 != 0 && c[4] >> 4 == 0;
            let removable = dev.is_removable() || dev.scsi_type() == mmc::TYPE_CDROM;
            if loej && removable && dev.removal_prevented() {
                return Err(Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::MEDIUM_REMOVAL_PREVENTED,
                ));
            }
            none
        }
        PREVENT_ALLOW => {
            // PREVENT field (bits 1-0): MMC also has PERSISTENT (bit 1); SBC has 00b/01b only.
            let prevent = c[4] & 0x03;
            if prevent > 1 && dev.scsi_type() != mmc::TYPE_CDROM {
                return Err(Sense::invalid_cdb_field(4, Some(0)));
            }
            none
        }
        INQUIRY => {
            if c[1] & 0x01 == 0 && c[2] != 0 {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            if c[1] & 0xfe != 0 {
                return Err(Sense::invalid_cdb_field(1, None));
            }
            din(be16(&c[3..5]))
        }
        REQUEST_SENSE => din(u32::from(c[4])),
        MODE_SENSE_6 => din(u32::from(c[4])),
        MODE_SENSE_10 => din(be16(&c[7..9])),
        READ_CAPACITY_10 => din(8),
        SERVICE_ACTION_IN_16 if c[1] & 0x1f == SAI_READ_CAPACITY_16 => din(be32(&c[10..14])),
        SERVICE_ACTION_IN_16 => {
            // GET LBA STATUS (SBC-3 §5.6).
            let lba = be64(&c[2..10]);
            if lba >= dev.num_blocks() {
                return Err(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
            }
            din(be32(&c[10..14]))
        }
        REPORT_LUNS => din(be32(&c[6..10])),
        MAINTENANCE_IN => din(be32(&c[6..10])),
        READ_TOC | GET_CONFIGURATION | GET_EVENT_STATUS_NOTIFICATION | READ_DISC_INFORMATION => {
            din(be16(&c[7..9]))
        }
        MECHANISM_STATUS => din(be16(&c[8..10])),
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
            let (lba, n) = lba_and_blocks(&c);
            check_range(dev, lba, n)?;
            task.io = Some((IoOp::Flush, 0, 0));
            none
        }
        PRE_FETCH_10 | PRE_FETCH_16 => {
            // SBC-3 PRE-FETCH: a hint. It completes with GOOD, not CONDITION MET: the device
            // makes no promise that the blocks stay cached. IMMED changes nothing, since
            // the read-ahead is only started either way.
            let (lba, n) = lba_and_blocks(&c);
            check_range(dev, lba, n)?;
            let bs = u64::from(dev.block_size());
            let bytes = (n * bs).min(u64::from(u32::MAX - (u32::MAX % dev.block_size())));
            task.io = Some((IoOp::Prefetch, lba * bs, bytes as u32));
            none
        }
        UNMAP => plan_unmap(dev, task),
        WRITE_SAME_10 | WRITE_SAME_16 => plan_write_same(dev, task),
        COMPARE_AND_WRITE | ORWRITE_16 => plan_rmw(dev, task),
        _ => plan_rw(dev, task),
    }
}

/// UNMAP (SBC-3 §5.28): the CDB; the parameter list is checked when it has arrived.
fn plan_unmap(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = task.cdb;
    if c[1] & 0x01 != 0 {
        // ANCHOR: anchored LBAs are not supported (ANC_SUP=0).
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    if write_protected(dev, task) {
        return Err(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
    }
    let len = be16(&c[7..9]);
    if len == 0 {
        // No parameter data: nothing to do, and not an error.
        return Ok(Plan {
            dir: DataDir::None,
            len: 0,
        });
    }
    if len < 8 {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
    }
    task.io = Some((IoOp::Unmap, 0, 0));
    Ok(Plan {
        dir: DataDir::Out,
        len,
    })
}

/// Decodes an UNMAP parameter list (SBC-3 §5.28.2) into byte ranges, checking all of it
/// before anything is deallocated.
pub(in crate::scsi) fn unmap_ranges(dev: &Device, data: &[u8]) -> Result<Vec<(u64, u64)>, Sense> {
    if data.len() < 8 {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
    }
    let data_len = be16(&data[0..2]) as usize;
    let desc_len = be16(&data[2..4]) as usize;
    // The lengths in the header must not claim more than the parameter list holds.
    if data_len + 2 > data.len() || desc_len + 8 > data.len() {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
    }
    // A trailing partial descriptor is ignored.
    let n = desc_len / 16;
    if n > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_param_field(2));
    }
    let bs = u64::from(dev.block_size());
    let mut total = 0u64;
    let mut ranges = Vec::with_capacity(n);
    for i in 0..n {
        let d = &data[8 + i * 16..8 + (i + 1) * 16];
        let lba = be64(&d[0..8]);
        let blocks = u64::from(be32(&d[8..12]));
        if lba.checked_add(blocks).is_none_or(|e| e > dev.num_blocks()) {
            return Err(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
        }
        total += blocks;
        if total > u64::from(max_unmap_blocks(dev.block_size())) {
            return Err(Sense::invalid_param_field((8 + i * 16 + 8) as u16));
        }
        if blocks > 0 {
            ranges.push((lba * bs, blocks * bs));
        }
    }
    Ok(ranges)
}

/// WRITE SAME (10) and (16) (SBC-3 §5.41, §5.42).
fn plan_write_same(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = task.cdb;
    let sixteen = c[0] == WRITE_SAME_16;
    let (lba, blocks) = if sixteen {
        (be64(&c[2..10]), u64::from(be32(&c[10..14])))
    } else {
        (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])))
    };
    let unmap = c[1] & 0x08 != 0;
    let ndob = sixteen && c[1] & 0x01 != 0;
    // WRPROTECT: no protection information.
    if c[1] & 0xe0 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(5)));
    }
    // ANCHOR: not supported (ANC_SUP=0).
    if c[1] & 0x10 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(4)));
    }
    // LBDATA/PBDATA (obsolete) and, in WRITE SAME (10), the reserved bits.
    if c[1] & 0x06 != 0 || (!sixteen && c[1] & 0x01 != 0) {
        return Err(Sense::invalid_cdb_field(1, None));
    }
    if unmap && !dev.thin_provisioned() {
        return Err(Sense::invalid_cdb_field(1, Some(3)));
    }
    // NUMBER OF LOGICAL BLOCKS 0: to the last LBA (WSNZ=0).
    let blocks = if blocks == 0 {
        match dev.num_blocks().checked_sub(lba) {
            Some(n) => n,
            None => {
                return Err(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
            }
        }
    } else {
        blocks
    };
    check_range(dev, lba, blocks)?;
    if blocks > u64::from(max_write_same_blocks(dev.block_size())) {
        return Err(Sense::invalid_cdb_field(if sixteen { 10 } else { 7 }, None));
    }
    if write_protected(dev, task) {
        return Err(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
    }
    let bs = u64::from(dev.block_size());
    // Data-Out of another size than one block (none with NDOB) means the initiator has
    // another block in mind: repeating it over the range would write the wrong pattern.
    let want = if ndob { 0 } else { bs };
    if task.data_out_len.is_some_and(|n| u64::from(n) != want) {
        return Err(Sense::invalid_cdb_field(if sixteen { 10 } else { 7 }, None));
    }
    if unmap {
        // The range is deallocated whatever the data block holds: it then reads as zeros
        // (LBPRZ=1).
        task.io = Some((IoOp::Unmap, 0, 0));
        task.ranges = if blocks > 0 {
            vec![(lba * bs, blocks * bs)]
        } else {
            Vec::new()
        };
    } else {
        task.io = Some((IoOp::Write { fua: false }, lba * bs, (blocks * bs) as u32));
        task.write_same = true;
    }
    Ok(Plan {
        dir: if ndob { DataDir::None } else { DataDir::Out },
        len: if ndob { 0 } else { bs as u32 },
    })
}

/// COMPARE AND WRITE (SBC-3 §5.2) and ORWRITE (16).
fn plan_rmw(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = task.cdb;
    let caw = c[0] == COMPARE_AND_WRITE;
    // WRPROTECT/ORPROTECT: no protection information.
    if c[1] & 0xe0 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(5)));
    }
    let lba = be64(&c[2..10]);
    let blocks = if caw {
        u64::from(c[13])
    } else {
        u64::from(be32(&c[10..14]))
    };
    let bs = dev.block_size();
    if caw && blocks > u64::from(max_compare_and_write_blocks(bs)) {
        return Err(Sense::invalid_cdb_field(13, None));
    }
    check_range(dev, lba, blocks)?;
    if write_protected(dev, task) {
        return Err(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
    }
    let bytes = blocks * u64::from(bs);
    if bytes > MAX_TRANSFER as u64 {
        return Err(Sense::invalid_cdb_field(10, None));
    }
    let want = if caw { 2 * bytes } else { bytes };
    // Part of an atomic operation cannot be done: Data-Out of another size than the CDB
    // needs (a miscounted NUMBER OF LOGICAL BLOCKS, say) is refused whole.
    if task.data_out_len.is_some_and(|n| u64::from(n) != want) {
        return Err(Sense::invalid_cdb_field(if caw { 13 } else { 10 }, None));
    }
    if blocks == 0 {
        // No blocks: nothing is read, compared or written, and that is not an error.
        return Ok(Plan {
            dir: DataDir::None,
            len: 0,
        });
    }
    let fua = c[1] & 0x08 != 0;
    task.io = Some((IoOp::Write { fua }, lba * u64::from(bs), bytes as u32));
    task.rmw = Some(if caw { Rmw::Compare } else { Rmw::Or });
    Ok(Plan {
        dir: DataDir::Out,
        len: want as u32,
    })
}

fn check_range(dev: &Device, lba: u64, blocks: u64) -> Result<(), Sense> {
    let end = lba.checked_add(blocks);
    if lba >= dev.num_blocks() && blocks > 0
        || end.is_none_or(|e| e > dev.num_blocks())
        || lba > dev.num_blocks()
    {
        return Err(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
    }
    Ok(())
}

fn plan_rw(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = task.cdb;
    let op = c[0];
    let (lba, blocks) = match op {
        READ_6 | WRITE_6 => {
            let lba = (u64::from(c[1] & 0x1f) << 16) | (u64::from(c[2]) << 8) | u64::from(c[3]);
            // SBC-3 §5.15: a transfer length of 0 means 256 blocks.
            let n = if c[4] == 0 { 256 } else { u64::from(c[4]) };
            (lba, n)
        }
        READ_10 | WRITE_10 | WRITE_VERIFY_10 | VERIFY_10 => {
            (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])))
        }
        READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => {
            (u64::from(be32(&c[2..6])), u64::from(be32(&c[6..10])))
        }
        _ => (be64(&c[2..10]), u64::from(be32(&c[10..14]))),
    };
    let write = matches!(
        op,
        WRITE_6
            | WRITE_10
            | WRITE_12
            | WRITE_16
            | WRITE_VERIFY_10
            | WRITE_VERIFY_12
            | WRITE_VERIFY_16
    );
    let verify = matches!(op, VERIFY_10 | VERIFY_12 | VERIFY_16);
    // RDPROTECT/WRPROTECT/VRPROTECT (bits 7-5 of byte 1): no protection information here.
    if !matches!(op, READ_6 | WRITE_6) && c[1] & 0xe0 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(5)));
    }
    check_range(dev, lba, blocks)?;
    if write && write_protected(dev, task) {
        return Err(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
    }
    let bs = u64::from(dev.block_size());
    let bytes = blocks * bs;
    if bytes > MAX_TRANSFER as u64 {
        return Err(Sense::invalid_cdb_field(
            if matches!(op, READ_6 | WRITE_6) { 4 } else { 7 },
            None,
        ));
    }
    let offset = lba * bs;
    if verify {
        // BYTCHK (byte 1, bits 2-1): 00b checks the medium only; 01b compares Data-Out.
        let bytchk = (c[1] >> 1) & 0x3;
        return match bytchk {
            0 => {
                task.io = None;
                Ok(Plan {
                    dir: DataDir::None,
                    len: 0,
                })
            }
            1 => {
                task.verify_compare = true;
                task.io = Some((IoOp::Read, offset, bytes as u32));
                Ok(Plan {
                    dir: DataDir::Out,
                    len: bytes as u32,
                })
            }
            _ => Err(Sense::invalid_cdb_field(1, Some(1))),
        };
    }
    if write {
        // FUA is bit 3 of byte 1 (not in WRITE(6)); WRITE AND VERIFY is durable anyway.
        let fua = !matches!(op, WRITE_6) && c[1] & 0x08 != 0
            || matches!(op, WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16);
        task.io = Some((IoOp::Write { fua }, offset, bytes as u32));
        Ok(Plan {
            dir: DataDir::Out,
            len: bytes as u32,
        })
    } else {
        task.io = Some((IoOp::Read, offset, bytes as u32));
        Ok(Plan {
            dir: DataDir::In,
            len: bytes as u32,
        })
    }
}

/// Commands for a LUN that is not mapped: REPORT LUNS, INQUIRY (peripheral qualifier 3) and
/// REQUEST SENSE answer; everything else is LOGICAL UNIT NOT SUPPORTED (SPC-4 §4.9).
pub fn execute_no_lun(task: &mut ScsiTask, luns: &[u64]) {
    match task.opcode() {
        REPORT_LUNS => report_luns(task, luns),
        INQUIRY => {
            let c = task.cdb;
            if c[1] & 0x01 != 0 {
                task.fail(Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::LOGICAL_UNIT_NOT_SUPPORTED,
                ));
                return;
            }
            let mut d = [0u8; 36];
            d[0] = 0x7f; // PQ 011b: no logical unit; type 1Fh
            d[2] = 0x06;
            d[3] = 0x12;
            d[4] = 31;
            task.reply(&d);
            let alloc = be16(&c[3..5]) as usize;
            task.data_in_len = task.data_in_len.min(alloc as u32);
        }
        REQUEST_SENSE => {
            let s =
                Sense::new(sense::ILLEGAL_REQUEST, sense::LOGICAL_UNIT_NOT_SUPPORTED).to_fixed();
            let alloc = usize::from(task.cdb[4]);
            task.reply(&s[..alloc.min(s.len())]);
        }
        _ => task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::LOGICAL_UNIT_NOT_SUPPORTED,
        )),
    }
}

/// REPORT LUNS (SPC-4 §6.33) for the LUN list of the I_T nexus.
pub fn report_luns(task: &mut ScsiTask, luns: &[u64]) {
    let c = task.cdb;
    let alloc = be32(&c[6..10]) as usize;
    if alloc < 16 {
        task.fail(Sense::invalid_cdb_field(6, None));
        return;
    }
    let select = c[2];
    let list: Vec<u64> = match select {
        0x00 | 0x02 => luns.to_vec(),
        0x01 => Vec::new(),
        0x10 | 0x11 => {
            if task.lun == 0 {
                luns.to_vec()
            } else {
                Vec::new()
            }
        }
        0x12 => Vec::new(),
        _ => {
            task.fail(Sense::invalid_cdb_field(2, None));
            return;
        }
    };
    let mut d = Vec::with_capacity(8 + list.len() * 8);
    d.extend_from_slice(&((list.len() * 8) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in list {
        d.extend_from_slice(&crate::scsi::lun_field(l).to_be_bytes());
    }
    d.truncate(alloc);
    task.reply(&d);
}

pub(in crate::scsi) fn emulate(dev: &Device, task: &mut ScsiTask) {
    let cd = dev.scsi_type() == mmc::TYPE_CDROM;
    match task.opcode() {
        TEST_UNIT_READY => {}
        START_STOP_UNIT => {
            // LOEJ=1 with POWER CONDITION 0 ejects (START=0) or loads (START=1) a removable
            // medium (SBC-3 §5.25, MMC-6); plan already refused an eject while prevented.
            let c = task.cdb;
            let loej = c[4] & 0x02 != 0 && c[4] >> 4 == 0;
            if loej && (dev.is_removable() || cd) {
                if c[4] & 0x01 != 0 {
                    dev.load_medium(task.nexus);
                } else if dev.eject().is_err() {
                    task.fail(Sense::new(
                        sense::ILLEGAL_REQUEST,
                        sense::MEDIUM_REMOVAL_PREVENTED,
                    ));
                }
            }
        }
        PREVENT_ALLOW => {
            if dev.is_removable() || cd {
                dev.set_prevent_removal(task.nexus, task.cdb[4] & 0x01 != 0);
            }
        }
        INQUIRY => inquiry(dev, task),
        MAINTENANCE_IN => match opcodes::report(dev, &task.cdb) {
            Ok(d) => {
                let alloc = be32(&task.cdb[6..10]) as usize;
                task.reply(&d[..alloc.min(d.len())]);
            }
            Err(s) => task.fail(s),
        },
        REQUEST_SENSE => {
            if task.cdb[1] & 0x01 != 0 {
                // DESC=1: descriptor format is not supported.
                task.fail(Sense::invalid_cdb_field(1, Some(0)));
                return;
            }
            let s = match dev.take_ua(task.nexus) {
                Some(code) => Sense::new(sense::UNIT_ATTENTION, code).to_fixed(),
                None if !dev.medium_present() => {
                    Sense::new(sense::NOT_READY, sense::MEDIUM_NOT_PRESENT).to_fixed()
                }
                None => Sense::new(sense::NO_SENSE, (0, 0)).to_fixed(),
            };
            let alloc = usize::from(task.cdb[4]);
            task.reply(&s[..alloc.min(s.len())]);
        }
        READ_CAPACITY_10 => {
            let last = dev.num_blocks().saturating_sub(1);
            let mut d = [0u8; 8];
            d[0..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
            d[4..8].copy_from_slice(&dev.block_size().to_be_bytes());
            task.reply(&d);
        }
        SERVICE_ACTION_IN_16 if task.cdb[1] & 0x1f == SAI_GET_LBA_STATUS => {
            get_lba_status(dev, task)
        }
        SERVICE_ACTION_IN_16 => {
            let mut d = [0u8; 32];
            d[0..8].copy_from_slice(&dev.num_blocks().saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&dev.block_size().to_be_bytes());
            // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (bits 3-0 of byte 13).
            d[13] = dev.lb_per_pb_exponent() & 0x0f;
            if dev.thin_provisioned() {
                // LBPME and LBPRZ: deallocated blocks read as zeros.
                d[14] |= 0xc0;
            }
            let alloc = be32(&task.cdb[10..14]) as usize;
            task.reply(&d[..alloc.min(32)]);
        }
        MODE_SENSE_6 | MODE_SENSE_10 => mode_sense(dev, task),
        REPORT_LUNS => report_luns(task, &[task.lun]),
        READ_TOC
        | GET_CONFIGURATION
        | GET_EVENT_STATUS_NOTIFICATION
        | READ_DISC_INFORMATION
        | MECHANISM_STATUS => {
            let drive = mmc_drive(dev);
            let c = task.cdb;
            let r = match c[0] {
                READ_TOC => mmc::read_toc(&c, drive.blocks),
                GET_CONFIGURATION => mmc::get_configuration(&c, &drive),
                GET_EVENT_STATUS_NOTIFICATION => {
                    let event = if c[1] & 0x01 != 0 && c[4] & 0x10 != 0 {
                        mmc::media_events().poll(dev.name(), task.nexus, drive.medium_present)
                    } else {
                        mmc::MediaEvent::NoChange
                    };
                    mmc::get_event_status(&c, &drive, event)
                }
                READ_DISC_INFORMATION => mmc::read_disc_information(&c),
                _ => Ok(mmc::mechanism_status(&c, &drive)),
            };
            match r {
                Ok(d) => task.reply(&d),
                Err(s) => task.fail(s),
            }
        }
        _ => task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        )),
    }
}

/// What the MMC builders need to know of a CD-ROM device.
fn mmc_drive(dev: &Device) -> mmc::Drive {
    mmc::Drive {
        medium_present: dev.medium_present(),
        prevented: dev.removal_prevented(),
        blocks: if dev.medium_present() {
            dev.num_blocks()
        } else {
            0
        },
    }
}

/// Most LBA status descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

/// GET LBA STATUS (SBC-3 §5.6): the provisioning status of the blocks from the starting
/// LBA, one descriptor per stretch, as many as the allocation length holds.
fn get_lba_status(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let start = be64(&c[2..10]);
    let alloc = be32(&c[10..14]) as usize;
    let bs = u64::from(dev.block_size());
    let end = dev.num_blocks();
    let room = (alloc.saturating_sub(8) / 16).clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
    let mut d = vec![0u8; 8];
    let mut lba = start;
    let mut n = 0;
    while lba < end && n < room {
        let (mapped, blocks) = match dev.bdev.extent_at(lba * bs) {
            Some(e) => (e.mapped, (e.len / bs).max(1)),
            None => (true, end - lba),
        };
        let blocks = blocks.min(end - lba).min(u64::from(u32::MAX));
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&(blocks as u32).to_be_bytes());
        d.push(if mapped { 0 } else { 1 });
        d.extend_from_slice(&[0, 0, 0]);
        lba += blocks;
        n += 1;
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d.truncate(alloc);
    task.reply(&d);
}

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

fn inquiry(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let alloc = be16(&c[3..5]) as usize;
    let id = dev.ident();
    let mut d: Vec<u8> = Vec::with_capacity(96);
    let cd = dev.scsi_type() == mmc::TYPE_CDROM;
    if c[1] & 0x01 == 0 {
        // Standard INQUIRY data (SPC-4 §6.4.2).
        d.resize(96, 0);
        // Connected; direct access block device or CD/DVD device (always removable).
        d[0] = dev.scsi_type();
        d[1] = if dev.is_removable() || cd { 0x80 } else { 0 };
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HiSup, response data format 2
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(&pad(&id.t10_vend_id, 8));
        d[16..32].copy_from_slice(&pad(&id.prod_id, 16));
        d[32..36].copy_from_slice(&pad(&id.prod_rev_lvl, 4));
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3 or MMC-5.
        let command_set = if cd { 0x02a0u16 } else { 0x04c0 };
        for (i, v) in [0x00a0u16, 0x0960, 0x0460, command_set].iter().enumerate() {
            d[58 + i * 2..60 + i * 2].copy_from_slice(&v.to_be_bytes());
        }
        d[4] = (d.len() - 5) as u8;
    } else {
        let page = c[2];
        d.extend_from_slice(&[dev.scsi_type(), page, 0, 0]);
        let thin = dev.thin_provisioned();
        let sbc_page = matches!(page, 0xb0 | 0xb1) && !cd || page == 0xb2 && thin && !cd;
        if page >= 0xb0 && !sbc_page {
            task.fail(Sense::invalid_cdb_field(2, None));
            return;
        }
        match page {
            0x00 => {
                d.extend_from_slice(&[0x00, 0x80, 0x83]);
                if !cd {
                    d.extend_from_slice(&[0xb0, 0xb1]);
                    if thin {
                        d.push(0xb2);
                    }
                }
            }
            0x80 => d.extend_from_slice(id.usn.as_bytes()),
            0x83 => {
                // T10 vendor ID based designator (ASCII, logical unit).
                let mut t10 = pad(&id.t10_vend_id, 8);
                t10.extend_from_slice(id.t10_dev_id.as_bytes());
                d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                d.extend_from_slice(&t10);
                // NAA designator (binary, logical unit).
                d.extend_from_slice(&[0x01, 0x03, 0x00, id.naa_id.len() as u8]);
                d.extend_from_slice(&id.naa_id);
                // Relative target port (binary, target port, PIV, iSCSI).
                d.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
                d.extend_from_slice(&task.rel_tgt_id.to_be_bytes());
                // SCSI name string of the target device (UTF-8, PIV, iSCSI).
                if let Some(name) = task.target_name.as_deref() {
                    let mut s = name.as_bytes().to_vec();
                    s.push(0);
                    while s.len() % 4 != 0 {
                        s.push(0);
                    }
                    if s.len() <= 252 {
                        d.extend_from_slice(&[0x53, 0xa8, 0x00, s.len() as u8]);
                        d.extend_from_slice(&s);
                    }
                }
            }
            0xb0 => {
                // Block Limits (SBC-3 §6.5.3).
                let mut p = [0u8; 0x3c];
                let bs = dev.block_size();
                p[1] = max_compare_and_write_blocks(bs) as u8;
                p[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer length granularity
                p[4..8].copy_from_slice(&((MAX_TRANSFER as u32) / bs).to_be_bytes());
                p[8..12].copy_from_slice(&(id.opt_trans_len / bs).to_be_bytes());
                if thin {
                    p[16..20].copy_from_slice(&max_unmap_blocks(bs).to_be_bytes());
                    p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                    p[24..28].copy_from_slice(&unmap_granularity(bs).to_be_bytes());
                }
                // MAXIMUM WRITE SAME LENGTH (WSNZ=0: 0 blocks means to the end).
                p[32..40].copy_from_slice(&u64::from(max_write_same_blocks(bs)).to_be_bytes());
                d.extend_from_slice(&p);
            }
            0xb1 => {
                // Block Device Characteristics: rotation rate 1 = non-rotating medium.
                let mut p = [0u8; 0x3c];
                let rate: u16 = if dev.is_rotational() { 0 } else { 1 };
                p[0..2].copy_from_slice(&rate.to_be_bytes());
                d.extend_from_slice(&p);
            }
            0xb2 => {
                // Logical Block Provisioning (SBC-3 §6.5.4): threshold exponent 0; LBPU,
                // LBPWS, LBPWS10, LBPRZ; no anchors, no descriptor; thin provisioned (010b).
                d.extend_from_slice(&[0, 0xe4, 0x02, 0]);
            }
            _ => {
                task.fail(Sense::invalid_cdb_field(2, None));
                return;
            }
        }
        let len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
    }
    d.truncate(alloc);
    task.reply(&d);
}

fn mode_sense(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let ten = c[0] == MODE_SENSE_10;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = c[2] >> 6;
    let page = c[2] & 0x3f;
    let subpage = c[3];
    let alloc = if ten { be16(&c[7..9]) } else { u32::from(c[4]) } as usize;
    if pc == 3 {
        task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::SAVING_PARAMETERS_NOT_SUPPORTED,
        ));
        return;
    }
    let changeable = pc == 1;
    let cd = dev.scsi_type() == mmc::TYPE_CDROM;
    let mut pages: Vec<u8> = Vec::new();
    let want = |p: u8| page == 0x3f || page == p;
    if subpage != 0 && subpage != 0xff {
        task.fail(Sense::invalid_cdb_field(3, None));
        return;
    }
    if want(0x01) {
        // Read-Write Error Recovery (SBC-3 §6.4.8).
        let mut p = [0u8; 12];
        p[0] = 0x01;
        p[1] = 10;
        if !changeable {
            p[2] = 0xc0; // AWRE, ARRE
        }
        pages.extend_from_slice(&p);
    }
    if want(0x08) && !cd {
        // Caching (SBC-3 §6.4.5): WCE when the backend has a volatile cache.
        let mut p = [0u8; 20];
        p[0] = 0x08;
        p[1] = 18;
        if !changeable && dev.bdev.has_volatile_cache() {
            p[2] = 0x04;
        }
        pages.extend_from_slice(&p);
    }
    if want(0x0a) {
        // Control (SPC-4 §7.5.8): TST 000b, QErr 00b, TAS 1, D_SENSE 0.
        let mut p = [0u8; 12];
        p[0] = 0x0a;
        p[1] = 10;
        if !changeable {
            p[5] = 0x40; // TAS
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
        }
        pages.extend_from_slice(&p);
    }
    if want(mmc::MODE_PAGE_CAPABILITIES) && cd {
        pages.extend_from_slice(&mmc::capabilities_page(&mmc_drive(dev), changeable));
    }
    if pages.is_empty() {
        task.fail(Sense::invalid_cdb_field(2, Some(5)));
        return;
    }
    let mut block_desc: Vec<u8> = Vec::new();
    if !dbd {
        let bs = dev.block_size();
        if llbaa {
            block_desc.extend_from_slice(&dev.num_blocks().to_be_bytes());
            block_desc.extend_from_slice(&[0, 0, 0, 0]);
            block_desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            let n = u32::try_from(dev.num_blocks()).unwrap_or(u32::MAX);
            block_desc.extend_from_slice(&n.to_be_bytes());
            block_desc.push(0);
            block_desc.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP and DPOFUA (SBC-3 §6.4.1).
    // MMC-5 §7.2.3: both are reserved for CD/DVD devices.
    let wp = if task.read_only || dev.is_read_only() {
        0x80
    } else {
        0
    };
    let dsp = if cd { 0 } else { wp | 0x10 };
    let mut d = Vec::new();
    if ten {
        let total = 8 + block_desc.len() + pages.len();
        d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(if llbaa { 0x01 } else { 0 });
        d.push(0);
        d.extend_from_slice(&(block_desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + block_desc.len() + pages.len();
        d.push((total - 1).min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(block_desc.len() as u8);
    }
    d.extend_from_slice(&block_desc);
    d.extend_from_slice(&pages);
    d.truncate(alloc);
    task.reply(&d);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::DataBuf;
    use crate::scsi::port::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn dev() -> Arc<Device> {
        Device::create("vdisk_ramio", "t0", &[("size_mb".into(), "1".into())]).unwrap()
    }

    fn thin() -> Arc<Device> {
        Device::create(
            "vdisk_ramio",
            "t0",
            &[
                ("size_mb".into(), "1".into()),
                ("thin_provisioned".into(), "1".into()),
            ],
        )
        .unwrap()
    }

    fn removable() -> Arc<Device> {
        Device::create(
            "vdisk_ramio",
            "r0",
            &[
                ("size_mb".into(), "1".into()),
                ("removable".into(), "1".into()),
            ],
        )
        .unwrap()
    }

    /// An UNMAP parameter list of (lba, blocks) descriptors.
    fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        v[0..2].copy_from_slice(&((6 + descs.len() * 16) as u16).to_be_bytes());
        v[2..4].copy_from_slice(&((descs.len() * 16) as u16).to_be_bytes());
        for &(lba, n) in descs {
            v.extend_from_slice(&lba.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        v
    }

    fn unmap_cdb(len: usize) -> [u8; 10] {
        let mut c = [UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
        c
    }

    fn ws10(lba: u32, n: u16, flags: u8) -> [u8; 10] {
        let mut c = [WRITE_SAME_10, flags, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&n.to_be_bytes());
        c
    }

    fn ws16(lba: u64, n: u32, flags: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = WRITE_SAME_16;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&n.to_be_bytes());
        c
    }

    fn read(d: &Arc<Device>, lba: u32, n: u16) -> Vec<u8> {
        let mut c = [READ_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&n.to_be_bytes());
        let t = run(d, &c, None);
        assert_eq!(t.status, 0);
        data(&t)
    }

    fn fill(d: &Arc<Device>, lba: u32, n: u16, byte: u8) {
        let mut c = [WRITE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&n.to_be_bytes());
        let t = run(d, &c, Some(&vec![byte; n as usize * 512]));
        assert_eq!(t.status, 0);
    }

    fn sai16(sa: u8, lba: u64, alloc: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = SERVICE_ACTION_IN_16;
        c[1] = sa;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    /// Runs a command to completion the way the transport does.
    fn run(d: &Arc<Device>, cdb: &[u8], data_out: Option<&[u8]>) -> ScsiTask {
        let mut t = ScsiTask::new(cdb, 0, 7);
        let plan = match plan(d, &mut t) {
            Ok(p) => p,
            Err(s) => {
                t.fail(s);
                return t;
            }
        };
        if plan.len > 0 {
            let mut b = DataBuf::alloc(plan.len as usize).unwrap();
            if let Some(x) = data_out {
                b.write_at(0, x);
            }
            t.buf = Some(b);
        }
        let mut port = ScsiPort::new();
        if port.execute(d, &mut t) == Exec::Pending {
            let mut out = Vec::new();
            // A read-modify-write takes two passes (its read, then its write).
            for _ in 0..4 {
                if port.poll(&mut out) > 0 {
                    break;
                }
            }
            complete(&mut t, out.pop().expect("no completion"));
        }
        t
    }

    fn data(t: &ScsiTask) -> Vec<u8> {
        let mut v = vec![0u8; t.data_in_len as usize];
        t.buf.as_ref().map(|b| b.read_at(0, &mut v));
        v
    }

    fn asc(t: &ScsiTask) -> (u8, u8, u8) {
        let s = t.sense();
        (s[2] & 0xf, s[12], s[13])
    }

    #[test]
    fn write_then_read() {
        let d = dev();
        let w = run(
            &d,
            &[WRITE_10, 0x08, 0, 0, 0, 5, 0, 0, 2, 0],
            Some(&[0xab; 1024]),
        );
        assert_eq!(w.status, 0);
        let r = run(
            &d,
            &[READ_16, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0],
            None,
        );
        assert_eq!(data(&r), vec![0xab; 1024]);
        // VERIFY with BYTCHK=1 compares.
        let v = run(
            &d,
            &[VERIFY_10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0],
            Some(&[0xab; 1024]),
        );
        assert_eq!(v.status, 0);
        let mut other = vec![0xab; 1024];
        other[700] = 0;
        let v = run(&d, &[VERIFY_10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0], Some(&other));
        assert_eq!(asc(&v), (sense::MISCOMPARE, 0x1d, 0));
    }

    #[test]
    fn range_checks() {
        let d = dev();
        let last = (d.num_blocks() - 1) as u32;
        let mut cdb = [READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        cdb[2..6].copy_from_slice(&last.to_be_bytes());
        assert_eq!(run(&d, &cdb, None).status, 0);
        cdb[2..6].copy_from_slice(&(last + 1).to_be_bytes());
        assert_eq!(asc(&run(&d, &cdb, None)), (5, 0x21, 0));
        let mut c16 = [0u8; 16];
        c16[0] = READ_16;
        c16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c16[13] = 2;
        assert_eq!(
            asc(&run(&d, &c16, None)),
            (5, 0x21, 0),
            "wrapping past 2^64"
        );
        assert_eq!(asc(&run(&d, &[0xd9, 0, 0, 0, 0, 0], None)), (5, 0x20, 0));
    }

    #[test]
    fn inquiry_and_capacity() {
        let d = dev();
        let t = run(&d, &[INQUIRY, 0, 0, 0, 96, 0], None);
        let x = data(&t);
        assert_eq!(x.len(), 96);
        assert_eq!(&x[8..16], b"ISCSITGT");
        let t = run(&d, &[INQUIRY, 0, 0, 0, 5, 0], None);
        assert_eq!(t.data_in_len, 5, "allocation length truncates");
        let t = run(&d, &[INQUIRY, 1, 0x00, 0, 255, 0], None);
        assert_eq!(&data(&t)[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1]);
        assert_eq!(
            asc(&run(&d, &[INQUIRY, 1, 0xb2, 0, 255, 0], None)),
            (5, 0x24, 0),
            "no provisioning page on a fully provisioned device"
        );
        assert_eq!(
            asc(&run(&d, &[INQUIRY, 0, 0x80, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
        assert_eq!(
            asc(&run(&d, &[INQUIRY, 1, 0x99, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
        let t = run(
            &d,
            &[
                SERVICE_ACTION_IN_16,
                0x10,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                32,
                0,
                0,
            ],
            None,
        );
        let x = data(&t);
        assert_eq!(
            u64::from_be_bytes(x[0..8].try_into().unwrap()),
            d.num_blocks() - 1
        );
    }

    #[test]
    fn unit_attention_then_clear() {
        let d = dev();
        d.register_nexus(7);
        let t = run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None);
        assert_eq!(asc(&t), (6, 0x29, 0));
        assert_eq!(run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None).status, 0);
        d.add_ua_all(0x3f, 0x03);
        // INQUIRY and the MMC polling commands do not report it; TUR does.
        assert!(!ua_applies(&ScsiTask::new(
            &[
                mmc::opcode::GET_EVENT_STATUS_NOTIFICATION,
                1,
                0,
                0,
                0x10,
                0,
                0,
                0,
                8,
                0
            ],
            0,
            7
        )));
        assert_eq!(run(&d, &[INQUIRY, 0, 0, 0, 36, 0], None).status, 0);
        assert_eq!(
            asc(&run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None)),
            (6, 0x3f, 3)
        );
    }

    #[test]
    fn mode_sense() {
        let d = dev();
        let t = run(&d, &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None);
        let x = data(&t);
        assert_eq!(x[0] as usize, x.len() - 1);
        assert_eq!(x[3], 8, "block descriptor");
        let t = run(&d, &[MODE_SENSE_6, 0, 0x0a, 0, 255, 0], None);
        let x = data(&t);
        assert_eq!(&x[12..14], &[0x0a, 10]);
        assert_eq!(
            asc(&run(&d, &[MODE_SENSE_6, 0, 0xca, 0, 255, 0], None)),
            (5, 0x39, 0)
        );
        assert_eq!(
            asc(&run(&d, &[MODE_SENSE_6, 0, 0x22, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
        let t = run(&d, &[MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0], None);
        let x = data(&t);
        assert_eq!(u16::from_be_bytes([x[0], x[1]]) as usize, x.len() - 2);
    }

    #[test]
    fn read_only_lun_refuses_writes() {
        let d = dev();
        let mut t = ScsiTask::new(&[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        t.read_only = true;
        let s = plan(&d, &mut t).unwrap_err();
        t.fail(s);
        assert_eq!(asc(&t), (7, 0x27, 0));
    }

    #[test]
    fn report_luns_and_missing_lun() {
        let mut t = ScsiTask::new(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 0, 1);
        t.buf = DataBuf::alloc(256);
        execute_no_lun(&mut t, &[0, 1]);
        assert_eq!(t.data_in_len, 24);
        let mut t = ScsiTask::new(&[TEST_UNIT_READY, 0, 0, 0, 0, 0], 3, 1);
        execute_no_lun(&mut t, &[0]);
        assert_eq!(asc(&t), (5, 0x25, 0));
        let mut t = ScsiTask::new(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 0, 1);
        execute_no_lun(&mut t, &[0]);
        assert_eq!(asc(&t), (5, 0x24, 0));
    }

    #[test]
    fn a_shortened_write_touches_only_the_blocks_sent() {
        let d = dev();
        run(&d, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], Some(&[b'a'; 1024]));
        // WRITE(10) of two blocks of which the transport delivers one.
        let mut t = ScsiTask::new(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0, 7);
        let p = plan(&d, &mut t).unwrap();
        assert_eq!(p.len, 1024);
        assert!(
            !t.limit_write(200, 512),
            "a partial block cannot be written"
        );
        assert!(t.limit_write(512, 512));
        let mut b = DataBuf::alloc(1024).unwrap();
        b.write_at(0, &[b'b'; 1024]);
        t.buf = Some(b);
        let mut port = ScsiPort::new();
        if port.execute(&d, &mut t) == Exec::Pending {
            let mut out = Vec::new();
            port.poll(&mut out);
            complete(&mut t, out.pop().unwrap());
        }
        assert_eq!(t.status, STATUS_GOOD);
        let r = run(&d, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], None);
        let got = data(&r);
        assert!(got[..512].iter().all(|&x| x == b'b'));
        assert!(
            got[512..].iter().all(|&x| x == b'a'),
            "second block untouched"
        );
        // A read cannot be shortened this way.
        let mut r = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0, 7);
        plan(&d, &mut r).unwrap();
        assert!(!r.limit_write(512, 512));
    }

    #[test]
    fn thin_capacity_and_vpd() {
        let d = thin();
        let x = data(&run(&d, &sai16(0x10, 0, 32), None));
        assert_eq!(x[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
        assert_eq!(x[13], 0, "LB per PB exponent");
        let x = data(&run(&dev(), &sai16(0x10, 0, 32), None));
        assert_eq!(x[14] & 0xc0, 0, "fully provisioned");
        let t = run(&d, &[INQUIRY, 1, 0x00, 0, 255, 0], None);
        assert_eq!(&data(&t)[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        let bl = data(&run(&d, &[INQUIRY, 1, 0xb0, 0, 255, 0], None));
        assert_eq!(bl.len(), 64);
        assert_eq!(bl[3], 0x3c);
        let be32_at = |v: &[u8], i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap());
        assert_eq!(be32_at(&bl, 20), 131_072, "MAXIMUM UNMAP LBA COUNT");
        assert_eq!(
            be32_at(&bl, 24),
            256,
            "MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT"
        );
        assert_eq!(be32_at(&bl, 28), 8, "OPTIMAL UNMAP GRANULARITY");
        assert_eq!(
            u64::from_be_bytes(bl[36..44].try_into().unwrap()),
            16384,
            "MAXIMUM WRITE SAME LENGTH"
        );
        let full = data(&run(&dev(), &[INQUIRY, 1, 0xb0, 0, 255, 0], None));
        assert!(full[20..32].iter().all(|&b| b == 0), "no unmap limits");
        assert_ne!(u64::from_be_bytes(full[36..44].try_into().unwrap()), 0);
        let lbp = data(&run(&d, &[INQUIRY, 1, 0xb2, 0, 255, 0], None));
        assert_eq!(lbp, vec![0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);
    }

    #[test]
    fn unmap_deallocates() {
        let d = thin();
        fill(&d, 0, 8, 0xaa);
        let list = unmap_list(&[(1, 2), (5, 1), (7, 0)]);
        let t = run(&d, &unmap_cdb(list.len()), Some(&list));
        assert_eq!(t.status, 0);
        let x = read(&d, 0, 8);
        for (b, chunk) in x.chunks(512).enumerate() {
            let zero = matches!(b, 1 | 2 | 5);
            assert!(
                chunk.iter().all(|&v| v == if zero { 0 } else { 0xaa }),
                "{b}"
            );
        }
        // Zero-length parameter list, and a list without descriptors: nothing happens.
        assert_eq!(run(&d, &unmap_cdb(0), None).status, 0);
        let empty = unmap_list(&[]);
        assert_eq!(run(&d, &unmap_cdb(8), Some(&empty)).status, 0);
        // 0 blocks at the end of the LUN is fine.
        let end = unmap_list(&[(d.num_blocks(), 0)]);
        assert_eq!(run(&d, &unmap_cdb(end.len()), Some(&end)).status, 0);
    }

    #[test]
    fn unmap_checks() {
        let d = thin();
        let n = d.num_blocks();
        let oob = unmap_list(&[(0, 1), (n - 1, 2)]);
        assert_eq!(
            asc(&run(&d, &unmap_cdb(oob.len()), Some(&oob))),
            (5, 0x21, 0)
        );
        let oob = unmap_list(&[(n + 1, 0)]);
        assert_eq!(
            asc(&run(&d, &unmap_cdb(oob.len()), Some(&oob))),
            (5, 0x21, 0)
        );
        let oob = unmap_list(&[(u64::MAX, 2)]);
        assert_eq!(
            asc(&run(&d, &unmap_cdb(oob.len()), Some(&oob))),
            (5, 0x21, 0)
        );
        // Nothing is deallocated when a later descriptor is bad.
        fill(&d, 0, 1, 0x55);
        let bad = unmap_list(&[(0, 1), (n, 1)]);
        run(&d, &unmap_cdb(bad.len()), Some(&bad));
        assert!(read(&d, 0, 1).iter().all(|&v| v == 0x55));
        // Too many descriptors.
        let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
        let l = unmap_list(&many);
        assert_eq!(asc(&run(&d, &unmap_cdb(l.len()), Some(&l))), (5, 0x26, 0));
        // Parameter list shorter than the header, or than the header says.
        assert_eq!(asc(&run(&d, &unmap_cdb(4), Some(&[0; 4]))), (5, 0x1a, 0));
        let mut l = unmap_list(&[(0, 1)]);
        l[2..4].copy_from_slice(&32u16.to_be_bytes());
        assert_eq!(asc(&run(&d, &unmap_cdb(l.len()), Some(&l))), (5, 0x1a, 0));
        // A trailing partial descriptor is ignored.
        let mut l = unmap_list(&[(0, 1)]);
        l.extend_from_slice(&[0xff; 8]);
        l[2..4].copy_from_slice(&24u16.to_be_bytes());
        l[0..2].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(run(&d, &unmap_cdb(l.len()), Some(&l)).status, 0);
        // ANCHOR.
        let mut c = unmap_cdb(24);
        c[1] = 0x01;
        assert_eq!(
            asc(&run(&d, &c, Some(&unmap_list(&[(0, 1)])))),
            (5, 0x24, 0)
        );
        // Read-only LUN.
        let mut t = ScsiTask::new(&unmap_cdb(24), 0, 7);
        t.read_only = true;
        let s = plan(&d, &mut t).unwrap_err();
        t.fail(s);
        assert_eq!(asc(&t), (7, 0x27, 0));
        // Not thin provisioned: the command does not exist.
        let l = unmap_list(&[(0, 1)]);
        assert_eq!(asc(&run(&dev(), &unmap_cdb(24), Some(&l))), (5, 0x20, 0));
    }

    #[test]
    fn write_same_writes_the_block_over_the_range() {
        let d = dev();
        let mut block = vec![0u8; 512];
        block[0] = 0x11;
        block[511] = 0x22;
        let t = run(&d, &ws10(3, 4, 0), Some(&block));
        assert_eq!(t.status, 0);
        let x = read(&d, 2, 6);
        assert!(x[..512].iter().all(|&v| v == 0));
        for b in 1..5 {
            assert_eq!(&x[b * 512..(b + 1) * 512], &block[..]);
        }
        assert!(x[5 * 512..].iter().all(|&v| v == 0));
        // WRITE SAME (16) with NDOB writes zeros without Data-Out.
        let mut t = ScsiTask::new(&ws16(3, 2, 0x01), 0, 7);
        assert_eq!(plan(&d, &mut t).unwrap().dir, DataDir::None);
        let t = run(&d, &ws16(3, 2, 0x01), None);
        assert_eq!(t.status, 0);
        assert!(read(&d, 3, 2).iter().all(|&v| v == 0));
        assert_eq!(read(&d, 5, 1), block);
        // 0 blocks: to the end of the LUN (a 1 MiB LUN is within the maximum length).
        let n = d.num_blocks();
        let t = run(&d, &ws16(n - 3, 0, 0), Some(&[0x77; 512]));
        assert_eq!(t.status, 0);
        assert!(read(&d, (n - 3) as u32, 3).iter().all(|&v| v == 0x77));
        // A WRITE SAME cannot be shortened to part of its one block.
        let mut t = ScsiTask::new(&ws10(0, 4, 0), 0, 7);
        assert_eq!(plan(&d, &mut t).unwrap().len, 512);
        assert!(!t.limit_write(256, 512));
    }

    #[test]
    fn write_same_checks() {
        let d = dev();
        let n = d.num_blocks() as u32;
        assert_eq!(asc(&run(&d, &ws10(n, 1, 0), Some(&[0; 512]))), (5, 0x21, 0));
        assert_eq!(
            asc(&run(&d, &ws10(n - 1, 2, 0), Some(&[0; 512]))),
            (5, 0x21, 0)
        );
        assert_eq!(
            asc(&run(&d, &ws10(n + 1, 0, 0), Some(&[0; 512]))),
            (5, 0x21, 0)
        );
        assert_eq!(
            asc(&run(&d, &ws10(u32::MAX, 0, 0), Some(&[0; 512]))),
            (5, 0x21, 0)
        );
        assert_eq!(
            asc(&run(&d, &ws16(1 << 63, 1, 0), Some(&[0; 512]))),
            (5, 0x21, 0)
        );
        // WRPROTECT, ANCHOR, UNMAP on a fully provisioned device.
        for flags in [0x20, 0x10, 0x18, 0x08] {
            assert_eq!(
                asc(&run(&d, &ws10(0, 1, flags), Some(&[0; 512]))),
                (5, 0x24, 0),
                "{flags:#x}"
            );
        }
        // Longer than MAXIMUM WRITE SAME LENGTH (16384 blocks of 512).
        let big = Device::create("vdisk_nullio", "n0", &[]).unwrap();
        assert_eq!(
            asc(&run(&big, &ws16(0, 16385, 0), Some(&[0; 512]))),
            (5, 0x24, 0)
        );
        assert_eq!(
            asc(&run(&big, &ws16(0, 0, 0), Some(&[0; 512]))),
            (5, 0x24, 0)
        );
        assert_eq!(run(&big, &ws16(0, 16384, 0), Some(&[0; 512])).status, 0);
        let nb = big.num_blocks();
        assert_eq!(
            run(&big, &ws16(nb - 16384, 0, 0), Some(&[0; 512])).status,
            0
        );
        assert_eq!(
            asc(&run(&big, &ws16(nb - 16385, 0, 0), Some(&[0; 512]))),
            (5, 0x24, 0)
        );
        // Read-only.
        for cdb in [&ws10(0, 1, 0)[..], &ws16(0, 1, 0x08)[..]] {
            let mut t = ScsiTask::new(cdb, 0, 7);
            t.read_only = true;
            let s = plan(&thin(), &mut t).unwrap_err();
            t.fail(s);
            assert_eq!(asc(&t), (7, 0x27, 0));
        }
    }

    #[test]
    fn write_same_unmap() {
        let d = thin();
        fill(&d, 0, 8, 0xff);
        // The UNMAP bit deallocates whatever the data block holds (LBPRZ: zeros read back).
        let t = run(&d, &ws10(2, 3, 0x08), Some(&[0xff; 512]));
        assert_eq!(t.status, 0);
        let x = read(&d, 0, 8);
        for (b, chunk) in x.chunks(512).enumerate() {
            let zero = (2..5).contains(&b);
            assert!(
                chunk.iter().all(|&v| v == if zero { 0 } else { 0xff }),
                "{b}"
            );
        }
        // Until the end, with WRITE SAME (16) and NDOB.
        let n = d.num_blocks();
        fill(&d, (n - 4) as u32, 4, 0xff);
        assert_eq!(run(&d, &ws16(n - 2, 0, 0x09), None).status, 0);
        let x = read(&d, (n - 4) as u32, 4);
        assert!(x[..1024].iter().all(|&v| v == 0xff));
        assert!(x[1024..].iter().all(|&v| v == 0));
    }

    #[test]
    fn get_lba_status() {
        let d = thin();
        let n = d.num_blocks();
        let t = run(&d, &sai16(0x12, 5, 24), None);
        assert_eq!(t.status, 0);
        let x = data(&t);
        assert_eq!(x.len(), 24);
        assert_eq!(u32::from_be_bytes(x[0..4].try_into().unwrap()), 20);
        assert_eq!(u64::from_be_bytes(x[8..16].try_into().unwrap()), 5);
        // RAM disks cannot tell: everything counts as mapped, to the end.
        assert_eq!(
            u64::from(u32::from_be_bytes(x[16..20].try_into().unwrap())),
            n - 5
        );
        assert_eq!(x[20] & 0x0f, 0);
        assert_eq!(run(&d, &sai16(0x12, n - 1, 24), None).status, 0);
        assert_eq!(asc(&run(&d, &sai16(0x12, n, 24), None)), (5, 0x21, 0));
        assert_eq!(asc(&run(&d, &sai16(0x12, n + 1, 24), None)), (5, 0x21, 0));
        assert_eq!(
            asc(&run(&d, &sai16(0x12, u64::MAX, 24), None)),
            (5, 0x21, 0)
        );
        // The allocation length truncates; an unknown service action is refused.
        assert_eq!(run(&d, &sai16(0x12, 0, 16), None).data_in_len, 16);
        assert_eq!(asc(&run(&d, &sai16(0x13, 0, 16), None)), (5, 0x20, 0));
    }

    /// The LBA status descriptors (LBA, blocks, provisioning status) of one GET LBA STATUS,
    /// after checking the header's length against them.
    fn lba_status(d: &Arc<Device>, start: u64, alloc: u32) -> Vec<(u64, u32, u8)> {
        let t = run(d, &sai16(0x12, start, alloc), None);
        assert_eq!(t.status, 0, "GET LBA STATUS at {start}");
        let x = data(&t);
        let len = u32::from_be_bytes(x[0..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, x.len(), "parameter data length at {start}");
        x[8..]
            .chunks_exact(16)
            .map(|c| {
                (
                    u64::from_be_bytes(c[0..8].try_into().unwrap()),
                    u32::from_be_bytes(c[8..12].try_into().unwrap()),
                    c[12] & 0x0f,
                )
            })
            .collect()
    }

    /// GET LBA STATUS on a real sparse file, whose file system maps whole blocks of P
    /// logical blocks: the first descriptor starts at the requested LBA wherever it falls in
    /// a file-system (physical) block, and a block the file system holds counts as mapped
    /// even where only some of its logical blocks were written. The answer is the same
    /// whether the LUN reports one logical block per physical block or P of them.
    #[test]
    fn get_lba_status_from_any_lba_of_a_sparse_file() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        const MAPPED: u8 = 0;
        const DEALLOCATED: u8 = 1;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("sparse.img");
        let f = std::fs::File::create(&path).unwrap();
        let fs_block = f.metadata().unwrap().blksize();
        assert!(
            fs_block >= 1024 && fs_block.is_power_of_two(),
            "/var/tmp has {fs_block}-byte blocks: this test needs more than one logical block per file-system block"
        );
        // Logical blocks per file-system block.
        let p = fs_block / 512;
        let blocks = 64 * p;
        f.set_len(blocks * 512).unwrap();
        let write = |lba: u64, n: u64| {
            f.write_all_at(&vec![0x5a; n as usize * 512], lba * 512)
                .unwrap()
        };
        // File-system blocks 1, 3, 4, 5 and 63 hold data; of 3 and 63 only one logical block
        // was written (the last of 3, the first of 63).
        write(p, p);
        write(4 * p - 1, 1);
        write(4 * p, 2 * p);
        write(63 * p, 1);
        f.sync_all().unwrap();
        let lbppb = |d: &Arc<Device>| {
            let t = run(d, &sai16(0x10, 0, 32), None);
            1u64 << (data(&t)[13] & 0x0f)
        };
        let u = |n: u64| u32::try_from(n).unwrap();
        for exp in ["0", "1"] {
            let d = Device::create(
                "vdisk_fileio",
                "sparse",
                &[
                    ("filename".into(), path.to_str().unwrap().into()),
                    ("thin_provisioned".into(), "1".into()),
                    ("lb_per_pb_exp".into(), exp.into()),
                ],
            )
            .unwrap();
            assert_eq!(d.num_blocks(), blocks);
            assert_eq!(lbppb(&d), if exp == "1" { p } else { 1 });
            let tail = [(6 * p, u(57 * p), DEALLOCATED), (63 * p, u(p), MAPPED)];
            // From LBA 0: every stretch, in order, to the end of the LUN.
            let mut all = vec![
                (0, u(p), DEALLOCATED),
                (p, u(p), MAPPED),
                (2 * p, u(p), DEALLOCATED),
                (3 * p, u(3 * p), MAPPED),
            ];
            all.extend(tail);
            assert_eq!(lba_status(&d, 0, 1024), all, "lb_per_pb_exp={exp}");
            // Inside a hole, one block past its start.
            assert_eq!(
                lba_status(&d, 1, 1024)[..2],
                [(1, u(p - 1), DEALLOCATED), (p, u(p), MAPPED)],
                "lb_per_pb_exp={exp}"
            );
            // Inside a written file-system block: the rest of it, then the hole after it.
            assert_eq!(
                lba_status(&d, p + 3, 1024)[..2],
                [(p + 3, u(p - 3), MAPPED), (2 * p, u(p), DEALLOCATED)],
                "lb_per_pb_exp={exp}"
            );
            // Inside a partly written file-system block, on a block that was not written:
            // mapped, with the written blocks after it, then the tail.
            let mut v = vec![(3 * p + 1, u(3 * p - 1), MAPPED)];
            v.extend(tail);
            assert_eq!(lba_status(&d, 3 * p + 1, 1024), v, "lb_per_pb_exp={exp}");
            // Inside the long hole.
            assert_eq!(
                lba_status(&d, 6 * p + 5, 1024),
                [(6 * p + 5, u(57 * p - 5), DEALLOCATED), tail[1]],
                "lb_per_pb_exp={exp}"
            );
            // The last LBA, unwritten in the last file-system block, which holds data.
            assert_eq!(
                lba_status(&d, blocks - 1, 1024),
                [(blocks - 1, 1, MAPPED)],
                "lb_per_pb_exp={exp}"
            );
            // Room for one descriptor: the one that starts at the requested LBA.
            assert_eq!(
                lba_status(&d, 2 * p + 1, 24),
                [(2 * p + 1, u(p - 1), DEALLOCATED)],
                "lb_per_pb_exp={exp}"
            );
            // Every request from LBA 0 to the end starts where it was asked to, and its
            // first stretch matches the status of that LBA in the full answer.
            for start in 0..blocks {
                let first = lba_status(&d, start, 24)[0];
                let (lba, n, status) = *all
                    .iter()
                    .find(|&&(lba, n, _)| start < lba + u64::from(n))
                    .unwrap();
                assert_eq!(
                    first,
                    (start, u(lba + u64::from(n) - start), status),
                    "lb_per_pb_exp={exp}"
                );
            }
        }
    }

    #[test]
    fn read_only_mode_sense_and_writes() {
        let d = Device::create(
            "vdisk_ramio",
            "ro",
            &[
                ("size_mb".into(), "1".into()),
                ("read_only".into(), "1".into()),
                ("thin_provisioned".into(), "1".into()),
            ],
        )
        .unwrap();
        let x = data(&run(&d, &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None));
        assert_eq!(x[2] & 0x80, 0x80, "WP");
        let x = data(&run(&dev(), &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None));
        assert_eq!(x[2] & 0x80, 0);
        for cdb in [
            &[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0][..],
            &[WRITE_VERIFY_16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0][..],
            &ws10(0, 1, 0)[..],
            &ws16(0, 1, 0x08)[..],
            &unmap_cdb(24)[..],
        ] {
            assert_eq!(
                asc(&run(&d, cdb, Some(&[0; 512]))),
                (7, 0x27, 0),
                "{cdb:x?}"
            );
        }
    }

    #[test]
    fn prevent_allow_and_eject() {
        let d = removable();
        let eject = [START_STOP_UNIT, 0, 0, 0, 0x02, 0];
        assert_eq!(data(&run(&d, &[INQUIRY, 0, 0, 0, 36, 0], None))[1], 0x80);
        assert_eq!(run(&d, &[PREVENT_ALLOW, 0, 0, 0, 1, 0], None).status, 0);
        assert!(d.removal_prevented());
        assert_eq!(asc(&run(&d, &eject, None)), (5, 0x53, 2));
        // Loading is refused as well; power conditions and START alone are fine.
        assert_eq!(
            asc(&run(&d, &[START_STOP_UNIT, 0, 0, 0, 0x03, 0], None)),
            (5, 0x53, 2)
        );
        assert_eq!(
            run(&d, &[START_STOP_UNIT, 0, 0, 0, 0x01, 0], None).status,
            0
        );
        assert_eq!(run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None).status, 0);
        // Another nexus still sees it prevented.
        let mut t = ScsiTask::new(&eject, 0, 8);
        let s = plan(&d, &mut t).unwrap_err();
        t.fail(s);
        assert_eq!(run(&d, &[PREVENT_ALLOW, 0, 0, 0, 0, 0], None).status, 0);
        assert!(!d.removal_prevented());
        assert_eq!(run(&d, &eject, None).status, 0);
        // SBC has no persistent prevent.
        assert_eq!(
            asc(&run(&d, &[PREVENT_ALLOW, 0, 0, 0, 2, 0], None)),
            (5, 0x24, 0)
        );
        // A fixed disk accepts PREVENT but has nothing to lock.
        let f = dev();
        assert_eq!(run(&f, &[PREVENT_ALLOW, 0, 0, 0, 1, 0], None).status, 0);
        assert!(!f.removal_prevented());
    }

    #[test]
    fn mmc_commands_are_not_disk_commands() {
        let d = dev();
        for cdb in [
            &[mmc::opcode::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0][..],
            &[mmc::opcode::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8, 0][..],
            &[
                mmc::opcode::GET_EVENT_STATUS_NOTIFICATION,
                1,
                0,
                0,
                0x10,
                0,
                0,
                0,
                8,
                0,
            ][..],
            &[
                mmc::opcode::READ_DISC_INFORMATION,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                34,
                0,
            ][..],
            &[
                mmc::opcode::MECHANISM_STATUS,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                8,
                0,
                0,
            ][..],
        ] {
            assert_eq!(asc(&run(&d, cdb, None)), (5, 0x20, 0), "{cdb:x?}");
        }
        // And a disk's MODE SENSE has no CD capabilities page.
        assert_eq!(
            asc(&run(&d, &[MODE_SENSE_6, 0, 0x2a, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
    }

    #[test]
    fn commands_without_a_medium() {
        for op in [
            INQUIRY,
            REQUEST_SENSE,
            REPORT_LUNS,
            MODE_SENSE_6,
            MODE_SENSE_10,
            START_STOP_UNIT,
            PREVENT_ALLOW,
            mmc::opcode::GET_CONFIGURATION,
            mmc::opcode::GET_EVENT_STATUS_NOTIFICATION,
            mmc::opcode::MECHANISM_STATUS,
        ] {
            assert!(works_without_medium(op), "{op:#x}");
        }
        for op in [
            TEST_UNIT_READY,
            READ_10,
            READ_16,
            WRITE_10,
            VERIFY_10,
            READ_CAPACITY_10,
            SERVICE_ACTION_IN_16,
            SYNCHRONIZE_CACHE_10,
            UNMAP,
            WRITE_SAME_10,
            mmc::opcode::READ_TOC,
            mmc::opcode::READ_DISC_INFORMATION,
        ] {
            assert!(!works_without_medium(op), "{op:#x}");
        }
    }

    /// COMPARE AND WRITE of `blocks` at `lba`: `verify` then `write` bytes, one per block.
    fn caw(d: &Arc<Device>, lba: u8, verify: &[u8], write: &[u8]) -> ScsiTask {
        let bs = d.block_size() as usize;
        let n = verify.len();
        let mut out = Vec::new();
        for &b in verify.iter().chain(write) {
            out.extend(std::iter::repeat_n(b, bs));
        }
        let mut cdb = [0u8; 16];
        cdb[0] = COMPARE_AND_WRITE;
        cdb[9] = lba;
        cdb[13] = n as u8;
        run(d, &cdb, Some(&out))
    }

    fn read_block(d: &Arc<Device>, lba: u8) -> Vec<u8> {
        data(&run(d, &[READ_10, 0, 0, 0, 0, lba, 0, 0, 1, 0], None))
    }

    #[test]
    fn compare_and_write_writes_only_on_a_match() {
        let d = dev();
        let w = run(
            &d,
            &[WRITE_10, 0, 0, 0, 0, 2, 0, 0, 2, 0],
            Some(&[0xaa; 1024]),
        );
        assert_eq!(w.status, STATUS_GOOD);
        let t = caw(&d, 2, &[0xaa, 0xaa], &[0x55, 0x66]);
        assert_eq!(t.status, STATUS_GOOD, "{:?}", t.sense());
        assert_eq!(read_block(&d, 2), vec![0x55; 512]);
        assert_eq!(read_block(&d, 3), vec![0x66; 512]);
        // The medium no longer matches: MISCOMPARE, with the offset in the Data-Out of the
        // first differing byte in INFORMATION, and nothing written.
        let t = caw(&d, 2, &[0x55, 0xaa], &[0x11, 0x11]);
        assert_eq!(asc(&t), (sense::MISCOMPARE, 0x1d, 0x00));
        assert_eq!(t.sense()[0] & 0x80, 0x80, "VALID");
        assert_eq!(&t.sense()[3..7], &512u32.to_be_bytes());
        assert_eq!(read_block(&d, 2), vec![0x55; 512]);
        assert_eq!(read_block(&d, 3), vec![0x66; 512]);
    }

    #[test]
    fn compare_and_write_checks_its_cdb_and_data_length() {
        let d = dev();
        let limit = max_compare_and_write_blocks(512) as u8;
        // Above MAXIMUM COMPARE AND WRITE LENGTH (VPD B0 byte 5 says what it is).
        let b0 = data(&run(&d, &[INQUIRY, 1, 0xb0, 0, 64, 0], None));
        assert_eq!(b0[5], limit);
        let mut cdb = [0u8; 16];
        cdb[0] = COMPARE_AND_WRITE;
        cdb[13] = limit + 1;
        let t = run(&d, &cdb, None);
        assert_eq!(asc(&t), (sense::ILLEGAL_REQUEST, 0x24, 0x00));
        // Zero blocks: nothing happens, and that is not an error.
        cdb[13] = 0;
        assert_eq!(run(&d, &cdb, None).status, STATUS_GOOD);
        // Data-Out of another size than twice the range is refused whole.
        cdb[13] = 1;
        let mut t = ScsiTask::new(&cdb, 0, 7);
        t.data_out_len = Some(512);
        let s = plan(&d, &mut t).unwrap_err();
        t.fail(s);
        assert_eq!(asc(&t), (sense::ILLEGAL_REQUEST, 0x24, 0x00));
        let mut t = ScsiTask::new(&cdb, 0, 7);
        t.data_out_len = Some(1024);
        assert_eq!(plan(&d, &mut t).map(|p| p.len), Ok(1024));
        // Past the end, and with WRPROTECT set.
        cdb[2..10].copy_from_slice(&(d.num_blocks()).to_be_bytes());
        assert_eq!(
            asc(&run(&d, &cdb, None)),
            (sense::ILLEGAL_REQUEST, 0x21, 0x00)
        );
        let mut cdb = [0u8; 16];
        cdb[0] = COMPARE_AND_WRITE;
        cdb[1] = 0x20;
        cdb[13] = 1;
        assert_eq!(
            asc(&run(&d, &cdb, None)),
            (sense::ILLEGAL_REQUEST, 0x24, 0x00)
        );
    }

    #[test]
    fn pre_fetch_checks_its_range_and_completes_good() {
        let d = dev();
        let t = run(&d, &[PRE_FETCH_10, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], None);
        assert_eq!(t.status, STATUS_GOOD);
        let mut c16 = [0u8; 16];
        c16[0] = PRE_FETCH_16;
        c16[2..10].copy_from_slice(&(d.num_blocks() - 1).to_be_bytes());
        c16[13] = 2;
        assert_eq!(
            asc(&run(&d, &c16, None)),
            (sense::ILLEGAL_REQUEST, 0x21, 0x00)
        );
        c16[13] = 1;
        assert_eq!(run(&d, &c16, None).status, STATUS_GOOD);
    }

    #[test]
    fn orwrite_ors_the_data_into_the_medium() {
        let d = dev();
        run(
            &d,
            &[WRITE_10, 0, 0, 0, 0, 5, 0, 0, 1, 0],
            Some(&[0x0f; 512]),
        );
        let mut cdb = [0u8; 16];
        cdb[0] = ORWRITE_16;
        cdb[9] = 5;
        cdb[13] = 1;
        let t = run(&d, &cdb, Some(&[0x30; 512]));
        assert_eq!(t.status, STATUS_GOOD);
        assert_eq!(read_block(&d, 5), vec![0x3f; 512]);
    }

    #[test]
    fn a_delayed_read_tells_the_reactor_when_to_wake() {
        let d = dev();
        let delay = std::time::Duration::from_millis(40);
        d.set_attr("fault_delay_us", &delay.as_micros().to_string())
            .unwrap();
        let mut t = ScsiTask::new(&[READ_10, 0, 0, 0, 0, 3, 0, 0, 1, 0], 0, 7);
        plan(&d, &mut t).unwrap();
        t.buf = Some(DataBuf::alloc(512).unwrap());
        let mut port = ScsiPort::new();
        assert_eq!(port.next_deadline(), None);
        let t0 = Instant::now();
        assert_eq!(port.execute(&d, &mut t), Exec::Pending);
        // No ring I/O and no socket will wake a sleeping reactor: the deadline must.
        assert_eq!(port.inflight(), 0);
        let due = port.next_deadline().expect("the held READ's deadline");
        assert!(
            due >= t0 + delay && due <= Instant::now() + delay,
            "{due:?}"
        );
        let mut out = Vec::new();
        while port.poll(&mut out) == 0 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "never came"
            );
            std::thread::yield_now();
        }
        assert!(t0.elapsed() >= delay, "completed before its deadline");
        complete(&mut t, out.pop().unwrap());
        assert_eq!(t.status, STATUS_GOOD);
        assert_eq!(port.next_deadline(), None);
        d.set_attr("fault_delay_us", "0").unwrap();
    }

    #[test]
    fn read_modify_writes_wait_for_an_overlapping_one() {
        let d = dev();
        run(
            &d,
            &[WRITE_10, 0, 0, 0, 0, 8, 0, 0, 1, 0],
            Some(&[0x01; 512]),
        );
        // Another reactor's read-modify-write holds block 8.
        assert!(d.try_lock_range(8 * 512, 512));
        let mut cdb = [0u8; 16];
        cdb[0] = ORWRITE_16;
        cdb[9] = 8;
        cdb[13] = 1;
        let mut t = ScsiTask::new(&cdb, 0, 7);
        plan(&d, &mut t).unwrap();
        let mut b = DataBuf::alloc(512).unwrap();
        b.write_at(0, &[0x80; 512]);
        t.buf = Some(b);
        let mut port = ScsiPort::new();
        assert_eq!(port.execute(&d, &mut t), Exec::Pending);
        let mut out = Vec::new();
        for _ in 0..5 {
            assert_eq!(port.poll(&mut out), 0, "ran while the range was held");
        }
        assert!(port.inflight() > 0, "a waiting command counts as in flight");
        assert_eq!(read_block(&d, 8), vec![0x01; 512]);
        d.unlock_range(8 * 512, 512);
        let mut n = 0;
        for _ in 0..4 {
            n += port.poll(&mut out);
        }
        assert_eq!(n, 1);
        complete(&mut t, out.pop().unwrap());
        assert_eq!(t.status, STATUS_GOOD);
        assert_eq!(port.inflight(), 0);
        assert_eq!(read_block(&d, 8), vec![0x81; 512]);
        // Its range is free again.
        assert!(d.try_lock_range(8 * 512, 512));
    }

    #[test]
    fn an_aborted_read_modify_write_never_writes() {
        let d = dev();
        run(
            &d,
            &[WRITE_10, 0, 0, 0, 0, 9, 0, 0, 1, 0],
            Some(&[0x01; 512]),
        );
        let orwrite = |tag: u64| {
            let mut cdb = [0u8; 16];
            cdb[0] = ORWRITE_16;
            cdb[9] = 9;
            cdb[13] = 1;
            let mut t = ScsiTask::new(&cdb, 0, 7);
            t.tag = tag;
            plan(&d, &mut t).unwrap();
            let mut b = DataBuf::alloc(512).unwrap();
            b.write_at(0, &[0x80; 512]);
            t.buf = Some(b);
            t
        };
        let mut port = ScsiPort::new();
        let mut out = Vec::new();
        // Aborted while waiting for its range.
        assert!(d.try_lock_range(9 * 512, 512));
        let mut a = orwrite(1);
        assert_eq!(port.execute(&d, &mut a), Exec::Pending);
        port.abort(1);
        d.unlock_range(9 * 512, 512);
        // Aborted during its read (the RAM disk's read is done, its completion not polled).
        let mut b = orwrite(2);
        assert_eq!(port.execute(&d, &mut b), Exec::Pending);
        port.abort(2);
        for _ in 0..4 {
            port.poll(&mut out);
        }
        assert_eq!(out.len(), 2, "both complete");
        for c in out.drain(..) {
            let t = if c.tag() == 1 { &mut a } else { &mut b };
            complete(t, c);
            assert_eq!(t.status, STATUS_TASK_ABORTED);
        }
        assert_eq!(port.inflight(), 0);
        assert_eq!(read_block(&d, 9), vec![0x01; 512], "nothing was written");
        assert!(d.try_lock_range(9 * 512, 512), "the range is free again");
    }

    fn rsoc(d: &Arc<Device>, options: u8, op: u8, sa: u16) -> ScsiTask {
        let s = sa.to_be_bytes();
        run(
            d,
            &[
                MAINTENANCE_IN,
                0x0c,
                options,
                op,
                s[0],
                s[1],
                0,
                0,
                0x10,
                0,
                0,
                0,
            ],
            None,
        )
    }

    /// The (opcode, service action) pairs of an all-commands report.
    fn listed(t: &ScsiTask) -> Vec<(u8, u16)> {
        let d = data(t);
        let len = be32(&d[0..4]) as usize;
        assert_eq!(len + 4, d.len());
        let mut v = Vec::new();
        let mut i = 4;
        while i < d.len() {
            v.push((d[i], be16(&d[i + 2..i + 4]) as u16));
            i += if d[i + 5] & 0x02 != 0 { 20 } else { 8 };
        }
        v
    }

    #[test]
    fn report_supported_opcodes_lists_what_the_device_serves() {
        let d = dev();
        let all = listed(&rsoc(&d, 0, 0, 0));
        for c in [
            (READ_10, 0),
            (COMPARE_AND_WRITE, 0),
            (PRE_FETCH_16, 0),
            (SERVICE_ACTION_IN_16, 0x10),
        ] {
            assert!(all.contains(&c), "{c:?}");
        }
        // UNMAP only on a thin provisioned device.
        assert!(!all.iter().any(|c| c.0 == UNMAP));
        assert!(listed(&rsoc(&thin(), 0, 0, 0)).contains(&(UNMAP, 0)));
        // Every listed command is one the dispatcher accepts, and the other way round for
        // a sample of opcodes.
        for &(op, sa) in &all {
            let mut c = [0u8; 16];
            c[0] = op;
            c[1] = sa as u8;
            assert!(supported(&d, op, &c), "{op:#x}/{sa:#x}");
        }
        // With RCTD, each descriptor carries a command timeouts descriptor.
        let t = rsoc(&d, 0x80, 0, 0);
        let x = data(&t);
        assert_eq!(x[4 + 5] & 0x02, 0x02);
        assert_eq!(&x[4 + 8..4 + 10], &[0, 0x0a]);
        // One command: SUPPORT 011b and its CDB usage data, DPO and FUA included.
        let one = data(&rsoc(&d, 1, READ_10, 0));
        assert_eq!(one[1] & 0x07, 0x03);
        assert_eq!(be16(&one[2..4]), 10);
        assert_eq!(one[4], READ_10);
        assert_eq!(one[5] & 0x18, 0x18);
        // One not served: SUPPORT 001b.
        assert_eq!(data(&rsoc(&d, 1, 0x04, 0))[1] & 0x07, 0x01);
        // By service action; asking for an opcode with service actions without one (and
        // the other way round) is an invalid field.
        let rc16 = data(&rsoc(&d, 2, SERVICE_ACTION_IN_16, 0x10));
        assert_eq!((rc16[1] & 0x07, be16(&rc16[2..4])), (0x03, 16));
        assert_eq!(
            asc(&rsoc(&d, 1, SERVICE_ACTION_IN_16, 0)),
            (sense::ILLEGAL_REQUEST, 0x24, 0)
        );
        assert_eq!(
            asc(&rsoc(&d, 2, READ_10, 0)),
            (sense::ILLEGAL_REQUEST, 0x24, 0)
        );
        assert_eq!(asc(&rsoc(&d, 5, 0, 0)), (sense::ILLEGAL_REQUEST, 0x24, 0));
    }
}

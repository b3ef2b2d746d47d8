//! Command execution (SPC-4, SBC-3) in two phases: [`plan`] decodes the CDB and checks it
//! before any data moves (so the transport knows how much Data-Out to solicit and can fail a
//! bad command at once), then [`ScsiPort::execute`] runs it: emulated commands complete at
//! once, I/O goes to the device's channel on this reactor and comes back from
//! [`ScsiPort::poll`].
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::bdev::{BdevCompletion, BdevError, BdevIo, IoChannel, IoContext, IoOp};
use crate::env::buf::MAX_TRANSFER;
use crate::env::DataBuf;
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;
pub const STATUS_TASK_ABORTED: u8 = 0x40;

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

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Data-In: from the target to the initiator.
    In,
    /// Data-Out: from the initiator to the target.
    Out,
}

/// What a command needs before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub dir: DataDir,
    /// Bytes the CDB transfers (or, for Data-In emulated commands, the allocation length).
    pub len: u32,
}

/// One SCSI command and its outcome.
pub struct ScsiTask {
    pub cdb: [u8; 16],
    pub cdb_len: usize,
    pub lun: u64,
    /// The I_T nexus (for unit attentions).
    pub nexus: u64,
    /// The transport's handle, echoed in completions.
    pub tag: u64,
    /// The LUN is mapped read-only.
    pub read_only: bool,
    /// How many bytes of Data-Out the transport will deliver, when it says (iSCSI's
    /// expected data transfer length of a command with the W bit).
    pub data_out_len: Option<u32>,
    /// For VPD page 0x83: the target's name and relative port.
    pub target_name: Option<Arc<str>>,
    pub rel_tgt_id: u16,
    pub buf: Option<DataBuf>,
    /// A second buffer (VERIFY with BYTCHK=1 reads the medium into it to compare).
    aux: Option<DataBuf>,
    pub status: u8,
    sense: [u8; sense::FIXED_LEN],
    sense_len: usize,
    /// Bytes of `buf` valid for Data-In.
    pub data_in_len: u32,
    /// Decoded by `plan`: the I/O range in bytes.
    io: Option<(IoOp, u64, u32)>,
    verify_compare: bool,
    /// WRITE SAME without UNMAP: `io` is the whole range and `buf` holds the one block (or
    /// nothing with NDOB), repeated over the range at execution.
    write_same: bool,
    /// For [`IoOp::Unmap`]: the byte ranges to deallocate.
    ranges: Vec<(u64, u64)>,
    /// A read-modify-write command: `io` is its write; the port reads the range first.
    rmw: Option<Rmw>,
}

/// The read-modify-write commands, which the port runs as one atomic read then write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rmw {
    /// COMPARE AND WRITE: the Data-Out holds the verify blocks then the write blocks; the
    /// write happens only if the medium matches the verify blocks.
    Compare,
    /// ORWRITE: the medium becomes the medium OR the Data-Out.
    Or,
}

impl ScsiTask {
    pub fn new(cdb: &[u8], lun: u64, nexus: u64) -> ScsiTask {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        ScsiTask {
            cdb: c,
            cdb_len: cdb.len(),
            lun,
            nexus,
            tag: 0,
            read_only: false,
            data_out_len: None,
            target_name: None,
            rel_tgt_id: 1,
            buf: None,
            aux: None,
            status: STATUS_GOOD,
            sense: [0; sense::FIXED_LEN],
            sense_len: 0,
            data_in_len: 0,
            io: None,
            verify_compare: false,
            write_same: false,
            ranges: Vec::new(),
            rmw: None,
        }
    }

    pub fn opcode(&self) -> u8 {
        self.cdb[0]
    }

    pub fn sense(&self) -> &[u8] {
        &self.sense[..self.sense_len]
    }

    pub fn sense_len(&self) -> usize {
        self.sense_len
    }

    pub fn fail(&mut self, s: Sense) {
        self.status = STATUS_CHECK_CONDITION;
        self.sense = s.to_fixed();
        self.sense_len = sense::FIXED_LEN;
        self.data_in_len = 0;
    }

    pub fn set_check_condition(&mut self, key: u8, asc: u8, ascq: u8) {
        self.fail(Sense::new(key, (asc, ascq)));
    }

    /// Copies `data` into the Data-In buffer (as much as fits) and records its length.
    fn reply(&mut self, data: &[u8]) {
        let n = match self.buf.as_mut() {
            Some(b) => {
                let n = data.len().min(b.len());
                b.write_at(0, &data[..n]);
                n
            }
            None => 0,
        };
        self.data_in_len = n as u32;
    }
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

fn be16(b: &[u8]) -> u32 {
    (u32::from(b[0]) << 8) | u32::from(b[1])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The LOGICAL BLOCK ADDRESS and the block count of a 10-byte CDB (bytes 2-5 and 7-8) or a
/// 16-byte one (bytes 2-9 and 10-13), by the opcode's group.
fn lba_and_blocks(c: &[u8; 16]) -> (u64, u64) {
    if cdb_len_of(c[0]) == 10 {
        (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])))
    } else {
        (be64(&c[2..10]), u64::from(be32(&c[10..14])))
    }
}

/// The CDB length by group code (SPC-4 §4.2.5.1).
fn cdb_len_of(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
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
fn unmap_ranges(dev: &Device, data: &[u8]) -> Result<Vec<(u64, u64)>, Sense> {
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

impl ScsiTask {
    /// The transport carries only the first `len` bytes of a WRITE's Data-Out (iSCSI's
    /// expected data transfer length is below what the CDB asks for): write just those
    /// blocks and leave the rest of the range untouched. Returns false, changing nothing,
    /// when `len` does not end on a block boundary or the command is not a plain write.
    pub fn limit_write(&mut self, len: u32, block_size: u32) -> bool {
        match &mut self.io {
            Some((IoOp::Write { .. }, _, io_len))
                if !self.verify_compare
                    && !self.write_same
                    && self.rmw.is_none()
                    && block_size > 0
                    && len.is_multiple_of(block_size) =>
            {
                *io_len = (*io_len).min(len);
                true
            }
            _ => false,
        }
    }
}

/// Whether an execution finished at once or went to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    Done,
    Pending,
}

/// A backend completion for a task, with what the sense data needs from its device.
pub struct Completion(BdevCompletion, DevInfo, Outcome);

/// How a completion ended beyond its I/O result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// As the result says.
    Io,
    /// The read of a read-modify-write failed (the result holds why).
    ReadFailed,
    /// COMPARE AND WRITE found the medium different at this byte of the Data-Out.
    Miscompare(u32),
    /// No buffer for the read of a read-modify-write.
    NoBuffer,
    /// The transport aborted a read-modify-write before its write: nothing was written.
    Aborted,
}

/// Where a read-modify-write command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RmwStage {
    /// Waiting for its range, held by another read-modify-write on some reactor.
    Locking,
    Reading,
    Writing,
}

/// A read-modify-write command the port runs: it holds its byte range on the device from
/// before its read until its write is done, so that two of them on overlapping ranges (on
/// any reactors) never interleave.
struct RmwOp {
    dev: Arc<Device>,
    kind: Rmw,
    offset: u64,
    len: u32,
    fua: bool,
    /// The command's Data-Out, handed back at the end.
    data: Option<DataBuf>,
    stage: RmwStage,
    /// Aborted during its read: it ends there, without writing.
    aborted: bool,
}

/// What [`complete`] needs to know of the device an I/O went to.
#[derive(Debug, Clone, Copy)]
struct DevInfo {
    block_size: u32,
    thin: bool,
}

impl Completion {
    pub fn tag(&self) -> u64 {
        self.0.tag
    }
}

/// One device's channel on this reactor.
struct PortChannel {
    /// The device, weakly: its allocation (and so the map key, its address) stays reserved
    /// while the channel lives, and a deleted device's channel can be dropped.
    dev: Weak<Device>,
    ch: Box<dyn IoChannel>,
    info: DevInfo,
}

/// Hashes the channel map's keys, device addresses: they are not chosen by any peer, so a
/// multiply spreads them well enough, for less than SipHash costs on every I/O.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64 ^ (n as u64 >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// How many passes with no backend I/O outstanding go by between looks for the channels of
/// deleted devices.
const SWEEP_EVERY: u32 = 1024;

/// The SCSI core's state on one reactor: one channel per device, opened on first use, and
/// the reactor's backend I/O context (its io_uring, shared by every file and block device).
pub struct ScsiPort {
    // Declared before `io`: channels go first, then the ring waits out what is in flight.
    channels: HashMap<usize, PortChannel, BuildHasherDefault<AddrHasher>>,
    /// I/O submitted to the channels and not yet collected from them: with none, a poll
    /// has nothing to ask them (but a periodic sweep for deleted devices' channels).
    outstanding: usize,
    idle_polls: u32,
    io: IoContext,
    scratch: Vec<BdevCompletion>,
    /// Read-modify-write commands in progress, by tag.
    rmw: HashMap<u64, RmwOp>,
    /// Tags of those waiting for their range, oldest first.
    rmw_waiting: VecDeque<u64>,
    /// Completions the read-modify-write path has ready for the next `poll`.
    rmw_done: Vec<Completion>,
}

impl Default for ScsiPort {
    fn default() -> Self {
        Self::new()
    }
}

impl ScsiPort {
    pub fn new() -> ScsiPort {
        ScsiPort {
            channels: HashMap::default(),
            outstanding: 0,
            idle_polls: 0,
            io: IoContext::new(),
            scratch: Vec::with_capacity(256),
            rmw: HashMap::new(),
            rmw_waiting: VecDeque::new(),
            rmw_done: Vec::new(),
        }
    }

    /// Hands `io` to the device's channel on this reactor.
    fn submit(&mut self, dev: &Arc<Device>, io: BdevIo) {
        self.outstanding += 1;
        self.channel(dev).submit(io);
    }

    fn channel(&mut self, dev: &Arc<Device>) -> &mut Box<dyn IoChannel> {
        let key = Arc::as_ptr(dev) as *const u8 as usize;
        let io = &self.io;
        &mut self
            .channels
            .entry(key)
            .or_insert_with(|| PortChannel {
                dev: Arc::downgrade(dev),
                ch: dev.bdev.clone().open_channel(io),
                info: DevInfo {
                    block_size: dev.block_size(),
                    thin: dev.thin_provisioned(),
                },
            })
            .ch
    }

    /// Backend operations in flight in the kernel. While there are any the reactor must not
    /// sleep in epoll: their completions arrive on the ring, not on a socket.
    pub fn inflight(&self) -> usize {
        self.io.inflight() + self.rmw.len()
    }

    /// The earliest time a channel has held I/O coming due by itself (an injected delay):
    /// a reactor that sleeps must wake by then, since no socket or ring event will.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.channels
            .values()
            .filter_map(|pc| pc.ch.next_deadline())
            .min()
    }

    /// Runs a planned task.
    pub fn execute(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        if task.status != STATUS_GOOD {
            return Exec::Done;
        }
        match task.opcode() {
            UNMAP | WRITE_SAME_10 | WRITE_SAME_16 if task.io.is_some() => {
                self.execute_provisioning(dev, task)
            }
            READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
            | WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 | VERIFY_10 | VERIFY_12
            | VERIFY_16 | SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 | PRE_FETCH_10
            | PRE_FETCH_16 => {
                let Some((op, offset, len)) = task.io else {
                    return Exec::Done;
                };
                if len == 0 && op != IoOp::Flush {
                    return Exec::Done;
                }
                let buf = if task.verify_compare {
                    match DataBuf::alloc(len as usize) {
                        Some(b) => Some(b),
                        None => {
                            task.status = STATUS_TASK_SET_FULL;
                            return Exec::Done;
                        }
                    }
                } else {
                    task.buf.take()
                };
                let tag = task.tag;
                self.submit(
                    dev,
                    BdevIo {
                        tag,
                        op,
                        offset,
                        len,
                        buf,
                        ranges: Vec::new(),
                    },
                );
                Exec::Pending
            }
            UNMAP | WRITE_SAME_10 | WRITE_SAME_16 => Exec::Done,
            COMPARE_AND_WRITE | ORWRITE_16 => match (task.rmw, task.io) {
                (Some(kind), Some((IoOp::Write { fua }, offset, len))) => {
                    self.rmw.insert(
                        task.tag,
                        RmwOp {
                            dev: dev.clone(),
                            kind,
                            offset,
                            len,
                            fua,
                            data: task.buf.take(),
                            stage: RmwStage::Locking,
                            aborted: false,
                        },
                    );
                    self.rmw_waiting.push_back(task.tag);
                    self.rmw_start();
                    Exec::Pending
                }
                _ => Exec::Done,
            },
            _ => {
                emulate(dev, task);
                Exec::Done
            }
        }
    }

    /// UNMAP and WRITE SAME: one deallocation of byte ranges, or one write of the data
    /// block repeated over the range.
    fn execute_provisioning(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        let Some((op, offset, len)) = task.io else {
            return Exec::Done;
        };
        let buf = if op == IoOp::Unmap {
            if task.opcode() == UNMAP {
                let n = be16(&task.cdb[7..9]) as usize;
                let mut data = vec![0u8; n];
                let got = task.buf.as_ref().map_or(0, |b| b.read_at(0, &mut data));
                data.truncate(got);
                match unmap_ranges(dev, &data) {
                    Ok(r) => task.ranges = r,
                    Err(s) => {
                        task.fail(s);
                        return Exec::Done;
                    }
                }
            }
            if task.ranges.is_empty() {
                return Exec::Done;
            }
            None
        } else {
            if len == 0 {
                return Exec::Done;
            }
            let bs = dev.block_size() as usize;
            let mut block = vec![0u8; bs];
            if let Some(b) = task.buf.as_ref() {
                b.read_at(0, &mut block);
            }
            let Some(mut out) = DataBuf::alloc(len as usize) else {
                task.status = STATUS_TASK_SET_FULL;
                return Exec::Done;
            };
            if block.iter().all(|&x| x == 0) {
                out.fill(0, len as usize, 0);
            } else {
                for off in (0..len as usize).step_by(bs) {
                    out.write_at(off, &block);
                }
            }
            Some(out)
        };
        let tag = task.tag;
        let ranges = std::mem::take(&mut task.ranges);
        self.submit(
            dev,
            BdevIo {
                tag,
                op,
                offset,
                len,
                buf,
                ranges,
            },
        );
        Exec::Pending
    }

    /// The transport has given up on task `tag` (aborted, or its connection closed). A
    /// read-modify-write that has not written yet never will: one waiting for its range ends
    /// now, one reading ends after its read. I/O that has not reached the medium is cancelled
    /// (the backends that can: I/O held by a stall); I/O already in the kernel runs its
    /// course. Either way the completion comes back from `poll`, and only then is the task
    /// over: the transport waits for it before it reports the task aborted.
    pub fn abort(&mut self, tag: u64) {
        if let Some(op) = self.rmw.get_mut(&tag) {
            match op.stage {
                RmwStage::Locking => {
                    self.rmw_waiting.retain(|&t| t != tag);
                    self.rmw_finish(tag, Ok(()), Outcome::Aborted);
                    return;
                }
                RmwStage::Reading => op.aborted = true,
                RmwStage::Writing => {}
            }
        }
        for pc in self.channels.values_mut() {
            pc.ch.cancel(tag);
        }
    }

    /// Submits this pass's ring I/O and collects completions of this reactor's backend I/O.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if !self.rmw_waiting.is_empty() {
            self.rmw_start();
        }
        self.io.poll();
        let start = out.len();
        if self.outstanding == 0 {
            self.idle_polls += 1;
            if self.idle_polls < SWEEP_EVERY {
                out.append(&mut self.rmw_done);
                return out.len() - start;
            }
        }
        self.idle_polls = 0;
        let scratch = &mut self.scratch;
        let outstanding = &mut self.outstanding;
        self.channels.retain(|_, pc| {
            scratch.clear();
            pc.ch.poll(scratch);
            *outstanding = outstanding.saturating_sub(scratch.len());
            let info = pc.info;
            out.extend(scratch.drain(..).map(|c| Completion(c, info, Outcome::Io)));
            // A deleted device's channel goes once its last I/O is back, releasing the
            // backend (a RAM disk's memory, a file's descriptor).
            pc.dev.strong_count() > 0 || pc.ch.busy()
        });
        if !self.rmw.is_empty() {
            // The reads and writes of read-modify-write commands go on to their next step.
            let mut i = start;
            while i < out.len() {
                if self.rmw.contains_key(&out[i].tag()) {
                    let c = out.swap_remove(i);
                    self.rmw_step(c.0);
                } else {
                    i += 1;
                }
            }
        }
        out.append(&mut self.rmw_done);
        out.len() - start
    }

    /// Starts the read of every waiting read-modify-write whose range is free.
    fn rmw_start(&mut self) {
        let mut i = 0;
        while i < self.rmw_waiting.len() {
            let tag = self.rmw_waiting[i];
            let Some(op) = self.rmw.get_mut(&tag) else {
                self.rmw_waiting.remove(i);
                continue;
            };
            if !op.dev.try_lock_range(op.offset, u64::from(op.len)) {
                i += 1;
                continue;
            }
            self.rmw_waiting.remove(i);
            let Some(buf) = DataBuf::alloc(op.len as usize) else {
                self.rmw_finish(tag, Ok(()), Outcome::NoBuffer);
                continue;
            };
            op.stage = RmwStage::Reading;
            let (dev, offset, len) = (op.dev.clone(), op.offset, op.len);
            self.submit(
                &dev,
                BdevIo {
                    tag,
                    op: IoOp::Read,
                    offset,
                    len,
                    buf: Some(buf),
                    ranges: Vec::new(),
                },
            );
        }
    }

    /// A read or write of a read-modify-write command has completed.
    fn rmw_step(&mut self, c: BdevCompletion) {
        let tag = c.tag;
        let Some(op) = self.rmw.get_mut(&tag) else {
            return;
        };
        match (op.stage, c.result) {
            (RmwStage::Reading, _) if op.aborted => self.rmw_finish(tag, Ok(()), Outcome::Aborted),
            (RmwStage::Reading, Ok(())) => {
                let Some(mut medium) = c.buf else {
                    self.rmw_finish(tag, Err(BdevError::BadBuffer), Outcome::ReadFailed);
                    return;
                };
                let Some(data) = op.data.as_ref() else {
                    self.rmw_finish(tag, Err(BdevError::BadBuffer), Outcome::Io);
                    return;
                };
                let len = op.len as usize;
                match op.kind {
                    Rmw::Compare => {
                        if let Some(at) = first_difference(data, 0, &medium, len) {
                            self.rmw_finish(tag, Ok(()), Outcome::Miscompare(at as u32));
                            return;
                        }
                        copy_range(data, len, &mut medium, len);
                    }
                    Rmw::Or => or_into(data, &mut medium, len),
                }
                op.stage = RmwStage::Writing;
                let (dev, offset, fua) = (op.dev.clone(), op.offset, op.fua);
                self.submit(
                    &dev,
                    BdevIo {
                        tag,
                        op: IoOp::Write { fua },
                        offset,
                        len: len as u32,
                        buf: Some(medium),
                        ranges: Vec::new(),
                    },
                );
            }
            (RmwStage::Reading, Err(e)) => self.rmw_finish(tag, Err(e), Outcome::ReadFailed),
            (_, result) => self.rmw_finish(tag, result, Outcome::Io),
        }
    }

    /// Ends a read-modify-write command: its range is released and its completion goes out
    /// with the next `poll`.
    fn rmw_finish(&mut self, tag: u64, result: Result<(), BdevError>, outcome: Outcome) {
        let Some(op) = self.rmw.remove(&tag) else {
            return;
        };
        if op.stage != RmwStage::Locking || outcome == Outcome::NoBuffer {
            op.dev.unlock_range(op.offset, u64::from(op.len));
        }
        let info = DevInfo {
            block_size: op.dev.block_size(),
            thin: op.dev.thin_provisioned(),
        };
        self.rmw_done.push(Completion(
            BdevCompletion {
                tag,
                result,
                buf: op.data,
            },
            info,
            outcome,
        ));
    }
}

/// Applies a backend completion to its task.
pub fn complete(task: &mut ScsiTask, c: Completion) {
    let Completion(c, info, outcome) = c;
    if task.verify_compare {
        task.aux = c.buf;
    } else if c.buf.is_some() {
        task.buf = c.buf;
    }
    match outcome {
        Outcome::Io => {}
        Outcome::ReadFailed => {
            if let Err(e) = c.result {
                task.fail(error_sense(e, Some(IoOp::Read), info));
            }
            return;
        }
        Outcome::Miscompare(at) => {
            // SBC-3 §5.2: the INFORMATION field holds the offset in the Data-Out of the
            // first byte that differs.
            let mut s = Sense::new(sense::MISCOMPARE, sense::MISCOMPARE_DURING_VERIFY);
            s.information = Some(at);
            task.fail(s);
            return;
        }
        Outcome::NoBuffer => {
            task.status = STATUS_TASK_SET_FULL;
            return;
        }
        Outcome::Aborted => {
            task.status = STATUS_TASK_ABORTED;
            return;
        }
    }
    match c.result {
        Ok(()) => {
            if let Some((IoOp::Read, _, len)) = task.io {
                if task.verify_compare {
                    verify_compare(task, len);
                } else {
                    task.data_in_len = len;
                }
            }
        }
        Err(e) => task.fail(error_sense(e, task.io.map(|x| x.0), info)),
    }
}

/// The sense data for a failed backend I/O.
fn error_sense(e: BdevError, op: Option<IoOp>, info: DevInfo) -> Sense {
    // SPC-4 Annex D.
    const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: (u8, u8) = (0x27, 0x07);
    const INTERNAL_TARGET_FAILURE: (u8, u8) = (0x44, 0x00);
    const NOT_READY_MANUAL_INTERVENTION: (u8, u8) = (0x04, 0x03);
    const MEDIUM_NOT_PRESENT: (u8, u8) = (0x3a, 0x00);
    let medium = || match op {
        Some(IoOp::Read) => Sense::new(sense::MEDIUM_ERROR, sense::UNRECOVERED_READ_ERROR),
        _ => Sense::new(sense::MEDIUM_ERROR, sense::WRITE_ERROR),
    };
    match e {
        // SBC-3 §4.7.3.6: a thin provisioned device out of backing space.
        BdevError::NoSpace if info.thin => {
            Sense::new(sense::DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        }
        BdevError::NoSpace => medium(),
        // SPC-4 §4.5.3: the INFORMATION field holds the first failing LBA; VALID only when
        // it fits the fixed format's four bytes.
        BdevError::Io(off) => Sense {
            information: u32::try_from(off / u64::from(info.block_size.max(1))).ok(),
            ..medium()
        },
        BdevError::BadBuffer => Sense::new(sense::HARDWARE_ERROR, INTERNAL_TARGET_FAILURE),
        BdevError::Offline => Sense::new(sense::NOT_READY, NOT_READY_MANUAL_INTERVENTION),
        BdevError::NoMedium => Sense::new(sense::NOT_READY, MEDIUM_NOT_PRESENT),
        // Only an aborted command's I/O is cancelled, and its status is never sent; a
        // read-modify-write whose read was cancelled ends here.
        BdevError::Cancelled => Sense::new(sense::ABORTED_COMMAND, (0, 0)),
    }
}

#[cfg(test)]
mod completion_tests {
    use super::*;

    fn failed(e: BdevError, op: IoOp, block_size: u32, thin: bool) -> [u8; sense::FIXED_LEN] {
        let mut t = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        t.io = Some((op, 0, 512));
        let c = BdevCompletion {
            tag: 0,
            result: Err(e),
            buf: None,
        };
        complete(
            &mut t,
            Completion(c, DevInfo { block_size, thin }, Outcome::Io),
        );
        assert_eq!(t.status, STATUS_CHECK_CONDITION);
        let mut s = [0u8; sense::FIXED_LEN];
        s.copy_from_slice(t.sense());
        s
    }

    #[test]
    fn a_deleted_device_releases_its_channel() {
        let d = Device::create("vdisk_ramio", "gone", &[("size_mb".into(), "1".into())]).unwrap();
        let mut port = ScsiPort::new();
        let mut t = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        plan(&d, &mut t).unwrap();
        t.buf = DataBuf::alloc(512);
        assert_eq!(port.execute(&d, &mut t), Exec::Pending);
        let weak = Arc::downgrade(&d);
        drop(d);
        let mut out = Vec::new();
        // The pending completion is still delivered, then the channel goes.
        assert_eq!(port.poll(&mut out), 1);
        assert!(port.channels.is_empty());
        assert_eq!(weak.strong_count(), 0);
        assert_eq!(port.inflight(), 0);
    }

    /// Runs a command through a port until its ring I/O completes.
    fn run_ring(port: &mut ScsiPort, d: &Arc<Device>, cdb: &[u8], data: Option<&[u8]>) -> ScsiTask {
        let mut t = ScsiTask::new(cdb, 0, 1);
        // A command refused before any I/O (e.g. NOT READY) comes back as it is.
        let p = match plan(d, &mut t) {
            Ok(p) => p,
            Err(s) => {
                t.fail(s);
                return t;
            }
        };
        if p.len > 0 {
            let mut b = DataBuf::alloc(p.len as usize).unwrap();
            if let Some(x) = data {
                b.write_at(0, x);
            }
            t.buf = Some(b);
        }
        if port.execute(d, &mut t) == Exec::Pending {
            let mut out = Vec::new();
            while port.poll(&mut out) == 0 {
                assert!(port.inflight() > 0, "nothing in flight and no completion");
                port.io.wait();
            }
            complete(&mut t, out.pop().unwrap());
        }
        t
    }

    #[test]
    fn fileio_through_the_port() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = dir.path().join("p.img");
        let params = vec![
            ("filename".to_string(), f.to_str().unwrap().to_string()),
            ("size_mb".to_string(), "1".to_string()),
        ];
        let d = Device::create("vdisk_fileio", "p", &params).unwrap();
        let mut port = ScsiPort::new();
        let w = run_ring(
            &mut port,
            &d,
            &[WRITE_10, 0x08, 0, 0, 0, 3, 0, 0, 2, 0],
            Some(&[0x3c; 1024]),
        );
        assert_eq!(w.status, STATUS_GOOD);
        let s = run_ring(
            &mut port,
            &d,
            &[SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            None,
        );
        assert_eq!(s.status, STATUS_GOOD);
        let r = run_ring(&mut port, &d, &[READ_10, 0, 0, 0, 0, 3, 0, 0, 2, 0], None);
        assert_eq!(r.status, STATUS_GOOD);
        let mut back = vec![0u8; 1024];
        r.buf.as_ref().unwrap().read_at(0, &mut back);
        assert_eq!(back, vec![0x3c; 1024]);
        assert_eq!(std::fs::read(&f).unwrap()[1536..2560], [0x3c; 1024]);
        // READ CAPACITY 16 reports the file system's block as the physical block
        // (lb_per_pb_exp=1 by default), and nothing once lb_per_pb_exp is 0.
        let rc16 = [
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
        ];
        let blksize = std::os::unix::fs::MetadataExt::blksize(&std::fs::metadata(&f).unwrap());
        let exp = if blksize > 512 {
            (blksize / 512).trailing_zeros()
        } else {
            0
        };
        let mut exponent = || {
            let r = run_ring(&mut port, &d, &rc16, None);
            let mut x = [0u8; 14];
            r.buf.as_ref().unwrap().read_at(0, &mut x);
            u32::from(x[13])
        };
        assert_eq!(exponent(), exp);
        d.set_attr("lb_per_pb_exp", "0").unwrap();
        assert_eq!(exponent(), 0);
        // COMPARE AND WRITE through the ring: a read, a compare, then a write.
        let mut caw = [0u8; 16];
        caw[0] = COMPARE_AND_WRITE;
        caw[9] = 3;
        caw[13] = 1;
        let mut out = vec![0x3c; 512];
        out.extend_from_slice(&[0x11; 512]);
        let c = run_ring(&mut port, &d, &caw, Some(&out));
        assert_eq!(c.status, STATUS_GOOD);
        assert_eq!(std::fs::read(&f).unwrap()[1536..2048], [0x11; 512]);
        let c = run_ring(&mut port, &d, &caw, Some(&out));
        assert_eq!(c.sense()[2] & 0x0f, sense::MISCOMPARE);
        assert_eq!(port.inflight(), 0);
        // PRE-FETCH starts a read-ahead on the ring and completes GOOD.
        let p = run_ring(
            &mut port,
            &d,
            &[PRE_FETCH_10, 0, 0, 0, 0, 0, 0, 0, 64, 0],
            None,
        );
        assert_eq!(p.status, STATUS_GOOD);
        assert_eq!(port.inflight(), 0);
        // Inactive: NOT READY, LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED.
        d.set_attr("active", "0").unwrap();
        let r = run_ring(&mut port, &d, &[READ_10, 0, 0, 0, 0, 3, 0, 0, 1, 0], None);
        assert_eq!(
            (r.sense()[2], r.sense()[12], r.sense()[13]),
            (2, 0x04, 0x03)
        );
    }

    #[test]
    fn backend_errors_map_to_sense() {
        let w = IoOp::Write { fua: false };
        let s = failed(BdevError::NoSpace, w, 512, true);
        assert_eq!((s[2], s[12], s[13]), (sense::DATA_PROTECT, 0x27, 0x07));
        let s = failed(BdevError::NoSpace, w, 512, false);
        assert_eq!((s[2], s[12], s[13]), (sense::MEDIUM_ERROR, 0x0c, 0x00));
        // The LBA of the failing byte, in blocks of the device, with VALID set.
        let s = failed(BdevError::Io(4096 * 7 + 100), IoOp::Read, 4096, false);
        assert_eq!((s[2], s[12], s[13]), (sense::MEDIUM_ERROR, 0x11, 0x00));
        assert_eq!(s[0], 0xf0);
        assert_eq!(&s[3..7], &7u32.to_be_bytes());
        let s = failed(BdevError::Io(1024), w, 512, false);
        assert_eq!((s[12], s[13], s[6]), (0x0c, 0x00, 2));
        // An LBA past the four bytes of the fixed format: VALID clear.
        let s = failed(BdevError::Io(512 << 33), IoOp::Read, 512, false);
        assert_eq!(s[0], 0x70);
        let s = failed(BdevError::Offline, IoOp::Read, 512, false);
        assert_eq!((s[2], s[12], s[13]), (sense::NOT_READY, 0x04, 0x03));
        let s = failed(BdevError::NoMedium, IoOp::Read, 2048, false);
        assert_eq!((s[2], s[12], s[13]), (sense::NOT_READY, 0x3a, 0x00));
        let s = failed(BdevError::BadBuffer, w, 512, false);
        assert_eq!((s[2], s[12]), (sense::HARDWARE_ERROR, 0x44));
    }
}

/// The first byte at which `a` from `a_off` and `b` from 0 differ over `len` bytes.
fn first_difference(a: &DataBuf, a_off: usize, b: &DataBuf, len: usize) -> Option<usize> {
    let mut x = [0u8; 4096];
    let mut y = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4096);
        a.read_at(a_off + off, &mut x[..n]);
        b.read_at(off, &mut y[..n]);
        if let Some(i) = (0..n).find(|&i| x[i] != y[i]) {
            return Some(off + i);
        }
        off += n;
    }
    None
}

/// Copies `len` bytes of `src` from `src_off` to the start of `dst`.
fn copy_range(src: &DataBuf, src_off: usize, dst: &mut DataBuf, len: usize) {
    let mut x = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4096);
        src.read_at(src_off + off, &mut x[..n]);
        dst.write_at(off, &x[..n]);
        off += n;
    }
}

/// `dst |= src` over the first `len` bytes.
fn or_into(src: &DataBuf, dst: &mut DataBuf, len: usize) {
    let mut x = [0u8; 4096];
    let mut y = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4096);
        src.read_at(off, &mut x[..n]);
        dst.read_at(off, &mut y[..n]);
        for (d, s) in y[..n].iter_mut().zip(&x[..n]) {
            *d |= s;
        }
        dst.write_at(off, &y[..n]);
        off += n;
    }
}

fn verify_compare(task: &mut ScsiTask, len: u32) {
    let (Some(a), Some(b)) = (task.buf.as_ref(), task.aux.take()) else {
        return;
    };
    if let Some(at) = first_difference(a, 0, &b, len as usize) {
        let mut s = Sense::new(sense::MISCOMPARE, sense::MISCOMPARE_DURING_VERIFY);
        s.information = u32::try_from(at).ok();
        task.fail(s);
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

fn emulate(dev: &Device, task: &mut ScsiTask) {
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

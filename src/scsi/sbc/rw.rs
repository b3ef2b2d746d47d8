//! READ, WRITE, WRITE AND VERIFY and VERIFY (6), (10), (12) and (16) (SBC-3): one decode
//! step for the family, the CDB's layout given by its length; each runs as one backend I/O
//! (VERIFY with BYTCHK=0 as none).
#![forbid(unsafe_code)]

use super::write_protected;
use crate::bdev::IoOp;
use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::{be16, be32, be64, cdb_len_of};
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{DataDir, Plan, ScsiTask};

/// LBA OUT OF RANGE unless `blocks` from `lba` lie on the medium.
pub(in crate::scsi) fn check_range(dev: &Device, lba: u64, blocks: u64) -> Result<(), Sense> {
    let end = lba.checked_add(blocks);
    if lba >= dev.num_blocks() && blocks > 0
        || end.is_none_or(|e| e > dev.num_blocks())
        || lba > dev.num_blocks()
    {
        return Err(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
    }
    Ok(())
}

/// What a command of this family does with its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// WRITE AND VERIFY: a write made durable (FUA) before it completes.
    WriteVerify,
    Verify,
}

/// READ (6), (10), (12) and (16) (SBC-3 §5.11 ff.).
pub(super) fn read(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    decode(dev, task, Kind::Read)
}

/// WRITE (6), (10), (12) and (16) (SBC-3 §5.32 ff.).
pub(super) fn write(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    decode(dev, task, Kind::Write)
}

/// WRITE AND VERIFY (10), (12) and (16) (SBC-3 §5.37 ff.).
pub(super) fn write_verify(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    decode(dev, task, Kind::WriteVerify)
}

/// VERIFY (10), (12) and (16) (SBC-3 §5.29 ff.).
pub(super) fn verify(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    decode(dev, task, Kind::Verify)
}

/// The LOGICAL BLOCK ADDRESS and TRANSFER LENGTH of a CDB of this family, whose layout its
/// length (the opcode's group) gives.
fn lba_and_length(c: &[u8; 16]) -> (u64, u64) {
    match cdb_len_of(c[0]) {
        6 => {
            let lba = (u64::from(c[1] & 0x1f) << 16) | (u64::from(c[2]) << 8) | u64::from(c[3]);
            // SBC-3 §5.15: a transfer length of 0 means 256 blocks.
            let n = if c[4] == 0 { 256 } else { u64::from(c[4]) };
            (lba, n)
        }
        10 => (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9]))),
        12 => (u64::from(be32(&c[2..6])), u64::from(be32(&c[6..10]))),
        _ => (be64(&c[2..10]), u64::from(be32(&c[10..14]))),
    }
}

fn decode(dev: &Device, task: &mut ScsiTask, kind: Kind) -> Result<Plan, Sense> {
    let c = task.cdb;
    let six = cdb_len_of(c[0]) == 6;
    let (lba, blocks) = lba_and_length(&c);
    let write = matches!(kind, Kind::Write | Kind::WriteVerify);
    let verify = kind == Kind::Verify;
    // RDPROTECT/WRPROTECT/VRPROTECT (bits 7-5 of byte 1; the 6-byte CDBs have none): no
    // protection information here.
    if !six && c[1] & 0xe0 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(5)));
    }
    check_range(dev, lba, blocks)?;
    if write && write_protected(dev, task) {
        return Err(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
    }
    let bs = u64::from(dev.block_size());
    let bytes = blocks * bs;
    if bytes > MAX_TRANSFER as u64 {
        return Err(Sense::invalid_cdb_field(if six { 4 } else { 7 }, None));
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
        let fua = !six && c[1] & 0x08 != 0 || kind == Kind::WriteVerify;
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

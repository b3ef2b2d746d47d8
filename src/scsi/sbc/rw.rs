//! READ, WRITE, WRITE AND VERIFY and VERIFY (6), (10), (12) and (16) (SBC-3): one decode
//! step for all, by the opcode's CDB layout; they run as one backend I/O each.
#![forbid(unsafe_code)]

use super::opcode::*;
use super::write_protected;
use crate::bdev::IoOp;
use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::{be16, be32, be64};
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

/// READ, WRITE, WRITE AND VERIFY and VERIFY of every size (SBC-3 §5.11 ff.).
pub(super) fn decode(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
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

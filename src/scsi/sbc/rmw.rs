//! COMPARE AND WRITE (SBC-3 §5.2) and ORWRITE (16) (§5.8): decoded here, run by the port
//! as a read then a write with their range locked between
//! ([`crate::scsi::port::ScsiPort::execute`]).
#![forbid(unsafe_code)]

use super::opcode::*;
use super::rw::check_range;
use super::{max_compare_and_write_blocks, write_protected};
use crate::bdev::IoOp;
use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::{be32, be64};
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{DataDir, Plan, Rmw, ScsiTask};

/// COMPARE AND WRITE (SBC-3 §5.2) and ORWRITE (16).
pub(super) fn decode(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
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

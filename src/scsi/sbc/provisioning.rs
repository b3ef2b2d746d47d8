//! Logical block provisioning (SBC-3 §4.7): UNMAP, WRITE SAME (10) and (16) (which may
//! deallocate with UNMAP=1) and GET LBA STATUS.
#![forbid(unsafe_code)]

use super::opcode::*;
use super::rw::check_range;
use super::{max_unmap_blocks, max_write_same_blocks, write_protected, MAX_UNMAP_DESCRIPTORS};
use crate::bdev::IoOp;
use crate::scsi::cdb::{be16, be32, be64};
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{DataDir, Plan, ScsiTask};

/// GET LBA STATUS (SBC-3 §5.6): the starting LBA must lie on the medium.
pub(super) fn decode_get_lba_status(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = &task.cdb;
    if be64(&c[2..10]) >= dev.num_blocks() {
        return Err(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
    }
    Ok(Plan::emulated_in(be32(&c[10..14])))
}

/// UNMAP (SBC-3 §5.28): the CDB; the parameter list is checked when it has arrived.
pub(super) fn decode_unmap(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
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
pub(super) fn decode_write_same(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
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

/// Most LBA status descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

/// GET LBA STATUS (SBC-3 §5.6): the provisioning status of the blocks from the starting
/// LBA, one descriptor per stretch, as many as the allocation length holds.
pub(super) fn get_lba_status(dev: &Device, task: &mut ScsiTask) {
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

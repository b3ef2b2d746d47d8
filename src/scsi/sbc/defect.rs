//! READ DEFECT DATA (10) and (12) (SBC-3 §5.13, §5.14): a virtual device has no defects, so
//! both return an empty list, in the format asked for, with the lists asked for marked
//! valid.
#![forbid(unsafe_code)]

use crate::scsi::cdb::{be16, be32};
use crate::scsi::device::Device;
use crate::scsi::sense::Sense;
use crate::scsi::task::{Plan, ScsiTask};

use super::opcode::READ_DEFECT_DATA_12;

/// DEFECT LIST FORMAT 111b is reserved (SBC-3 §6.2.1); the others are all empty here.
const FORMAT_RESERVED: u8 = 0x07;

/// Byte 1 (12) or 2 (10) of the CDB: REQ_PLIST, REQ_GLIST and DEFECT LIST FORMAT.
fn flags_byte(task: &ScsiTask) -> usize {
    if task.cdb[0] == READ_DEFECT_DATA_12 {
        1
    } else {
        2
    }
}

fn alloc_len(task: &ScsiTask) -> u32 {
    if task.cdb[0] == READ_DEFECT_DATA_12 {
        be32(&task.cdb[6..10])
    } else {
        be16(&task.cdb[7..9])
    }
}

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let at = flags_byte(task);
    if task.cdb[at] & 0x07 == FORMAT_RESERVED {
        return Err(Sense::invalid_cdb_field(at as u16, Some(2)));
    }
    Ok(Plan::emulated_in(alloc_len(task)))
}

/// The defect list header: PLISTV and GLISTV echo REQ_PLIST and REQ_GLIST (the empty lists
/// are valid), the format is the one requested, and the list length is zero (two bytes
/// after two in (10); four after a two-byte generation code in (12)).
pub(super) fn emulate(_: &Device, task: &mut ScsiTask) {
    let flags = task.cdb[flags_byte(task)] & 0x1f;
    let d: &[u8] = if task.cdb[0] == READ_DEFECT_DATA_12 {
        &[0, flags, 0, 0, 0, 0, 0, 0]
    } else {
        &[0, flags, 0, 0]
    };
    let n = d.len().min(alloc_len(task) as usize);
    task.reply(&d[..n]);
}

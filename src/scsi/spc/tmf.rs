//! REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.40): the functions the iSCSI layer
//! carries out (`iscsi/conn/tmf.rs`): ABORT TASK, ABORT TASK SET, CLEAR ACA (there is never
//! an ACA to clear, NACA being refused), CLEAR TASK SET, LOGICAL UNIT RESET and TARGET RESET
//! (iSCSI's warm reset; its cold reset too). Not QUERY TASK, QUERY TASK SET, QUERY
//! ASYNCHRONOUS EVENT, I_T NEXUS RESET or WAKEUP, which iSCSI answers "not supported".
#![forbid(unsafe_code)]

use crate::scsi::cdb::be32;
use crate::scsi::device::Device;
use crate::scsi::sense::Sense;
use crate::scsi::task::{Plan, ScsiTask};

/// Byte 0 of the parameter data: ATS, ATSS, CACAS, CTSS, LURS, QTS (0), TRS, WAKES (0).
const SUPPORTED: u8 = 0x80 | 0x40 | 0x20 | 0x10 | 0x08 | 0x02;

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(be32(&task.cdb[6..10])))
}

/// The basic (4 bytes) or, with REPD, extended (16 bytes) parameter data. The extended
/// data reports no timeouts (zero: none specified).
pub(super) fn emulate(_: &Device, task: &mut ScsiTask) {
    let repd = task.cdb[2] & 0x80 != 0;
    let mut d = [0u8; 16];
    d[0] = SUPPORTED;
    let len = if repd {
        d[3] = 0x0c; // ADDITIONAL DATA LENGTH
        16
    } else {
        4
    };
    let n = len.min(be32(&task.cdb[6..10]) as usize);
    task.reply(&d[..n]);
}

//! REPORT LUNS (SPC-4 §6.33), and the commands addressed to a LUN that is not mapped
//! (SPC-4 §4.9).
#![forbid(unsafe_code)]

use crate::scsi::cdb::{be16, be32};
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{Plan, ScsiTask};

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(be32(&task.cdb[6..10])))
}

/// REPORT LUNS addressed to a mapped LUN. The transport answers it for the whole I_T nexus
/// with [`report_luns`]; this answers for the one LUN a transport without a LUN list knows.
pub(super) fn emulate(_: &Device, task: &mut ScsiTask) {
    let lun = task.lun;
    report_luns(task, &[lun]);
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

/// Commands for a LUN that is not mapped: REPORT LUNS, INQUIRY (peripheral qualifier 3) and
/// REQUEST SENSE answer; everything else is LOGICAL UNIT NOT SUPPORTED (SPC-4 §4.9).
pub fn execute_no_lun(task: &mut ScsiTask, luns: &[u64]) {
    match task.opcode() {
        super::opcode::REPORT_LUNS => report_luns(task, luns),
        super::opcode::INQUIRY => {
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
        super::opcode::REQUEST_SENSE => {
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

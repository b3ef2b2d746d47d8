//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): the commands a device serves, each with
//! its CDB usage data (which bits of each CDB byte the device server looks at), read from
//! the command table the dispatcher reads, so that the report and the dispatcher never
//! disagree.
#![forbid(unsafe_code)]

use crate::scsi::cdb::be32;
use crate::scsi::command::{self, Command, COMMANDS};
use crate::scsi::device::Device;
use crate::scsi::sense::Sense;
use crate::scsi::task::{Plan, ScsiTask};

/// The command timeouts descriptor (SPC-4 §6.35.4): no nominal or recommended timeout is
/// specified (zero), which tells the initiator to use its own.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(be32(&task.cdb[6..10])))
}

pub(super) fn emulate(dev: &Device, task: &mut ScsiTask) {
    match report(dev, &task.cdb) {
        Ok(d) => {
            let alloc = be32(&task.cdb[6..10]) as usize;
            task.reply(&d[..alloc.min(d.len())]);
        }
        Err(s) => task.fail(s),
    }
}

/// The usage data's length, as the descriptors give it.
fn usage_len(c: &Command) -> [u8; 2] {
    (c.usage.len() as u16).to_be_bytes()
}

/// The parameter data of REPORT SUPPORTED OPERATION CODES for `cdb`, not yet cut to the
/// allocation length.
pub fn report(dev: &Device, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = u16::from_be_bytes([cdb[4], cdb[5]]);
    match options {
        0 => {
            // All commands, one descriptor each.
            let mut d = vec![0u8; 4];
            for c in COMMANDS.iter().filter(|c| c.serves(dev)) {
                d.push(c.op);
                d.push(0);
                d.extend_from_slice(&u16::from(c.sa.unwrap_or(0)).to_be_bytes());
                d.push(0);
                d.push(u8::from(rctd) << 1 | u8::from(c.sa.is_some()));
                d.extend_from_slice(&usage_len(c));
                if rctd {
                    d.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&len.to_be_bytes());
            Ok(d)
        }
        1..=3 => {
            let with_sa = command::has_service_actions(req_op);
            // 001b names an opcode without service actions, 010b one with; 011b either.
            match (options, with_sa) {
                (1, true) | (2, false) => return Err(Sense::invalid_cdb_field(2, Some(2))),
                _ => {}
            }
            let mut d = vec![0u8, u8::from(rctd) << 7];
            match command::find(req_op, req_sa).filter(|c| c.serves(dev)) {
                Some(c) => {
                    // SUPPORT 011b: supported as the standard says.
                    d[1] |= 0x03;
                    d.extend_from_slice(&usage_len(c));
                    d.extend_from_slice(c.usage);
                }
                None => {
                    // SUPPORT 001b: not supported; no CDB usage data.
                    d[1] |= 0x01;
                    d.extend_from_slice(&[0, 0]);
                }
            }
            if rctd {
                d.extend_from_slice(&TIMEOUTS);
            }
            Ok(d)
        }
        _ => Err(Sense::invalid_cdb_field(2, Some(2))),
    }
}

/// The (opcode, service action) pairs of the all-commands report for `dev`.
#[cfg(test)]
pub(in crate::scsi) fn listed(dev: &Device) -> Vec<(u8, u16)> {
    let mut cdb = [0u8; 12];
    cdb[0] = super::opcode::MAINTENANCE_IN;
    cdb[1] = super::opcode::MI_REPORT_SUPPORTED_OPCODES;
    let d = report(dev, &cdb).unwrap();
    assert_eq!(be32(&d[0..4]) as usize + 4, d.len());
    d[4..]
        .chunks(8)
        .map(|x| (x[0], u16::from_be_bytes([x[2], x[3]])))
        .collect()
}

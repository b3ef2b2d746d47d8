//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): the commands a device serves, each with
//! its CDB usage data (which bits of each CDB byte the device server looks at). The table
//! lists every command the SCSI core knows; [`supported`] decides which of them a given
//! device (disk or CD-ROM, thin or not) serves, so the report and the dispatcher never
//! disagree.
#![forbid(unsafe_code)]

use super::exec::{opcode::*, supported};
use super::mmc::opcode::*;
use super::sense::Sense;
use crate::scsi::device::Device;

/// MAINTENANCE IN and its REPORT SUPPORTED OPERATION CODES service action.
pub const MAINTENANCE_IN: u8 = 0xa3;
pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;

/// The CONTROL byte: NACA is evaluated (and refused when set).
const CTL: u8 = 0x04;

/// One command: its operation code, its service action (for commands that have them) and
/// its CDB usage data, whose length is the CDB length and whose first byte is the opcode.
struct Command {
    op: u8,
    sa: Option<u8>,
    usage: &'static [u8],
}

const fn cmd(op: u8, usage: &'static [u8]) -> Command {
    Command {
        op,
        sa: None,
        usage,
    }
}

const fn sa_cmd(op: u8, sa: u8, usage: &'static [u8]) -> Command {
    Command {
        op,
        sa: Some(sa),
        usage,
    }
}

const FF: u8 = 0xff;

/// Every command the SCSI core implements, one line each (kept unformatted so that the CDB
/// bytes line up). Byte 1 of the block commands: RDPROTECT, WRPROTECT or VRPROTECT (bits 7-5,
/// evaluated and refused when set), DPO and FUA.
#[rustfmt::skip]
const COMMANDS: &[Command] = &[
    cmd(TEST_UNIT_READY, &[TEST_UNIT_READY, 0, 0, 0, 0, CTL]),
    cmd(REQUEST_SENSE, &[REQUEST_SENSE, 0x01, 0, 0, FF, CTL]),
    cmd(READ_6, &[READ_6, 0x1f, FF, FF, FF, CTL]),
    cmd(WRITE_6, &[WRITE_6, 0x1f, FF, FF, FF, CTL]),
    cmd(INQUIRY, &[INQUIRY, 0x01, FF, FF, FF, CTL]),
    cmd(MODE_SENSE_6, &[MODE_SENSE_6, 0x08, FF, FF, FF, CTL]),
    cmd(START_STOP_UNIT, &[START_STOP_UNIT, 0, 0, 0, 0xf3, CTL]),
    cmd(PREVENT_ALLOW, &[PREVENT_ALLOW, 0, 0, 0, 0x03, CTL]),
    cmd(READ_CAPACITY_10, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, CTL]),
    cmd(READ_10, &[READ_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(WRITE_10, &[WRITE_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(WRITE_VERIFY_10, &[WRITE_VERIFY_10, 0xf0, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(VERIFY_10, &[VERIFY_10, 0xf6, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(PRE_FETCH_10, &[PRE_FETCH_10, 0x02, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(SYNCHRONIZE_CACHE_10, &[SYNCHRONIZE_CACHE_10, 0, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(WRITE_SAME_10, &[WRITE_SAME_10, 0xfe, FF, FF, FF, FF, 0, FF, FF, CTL]),
    cmd(UNMAP, &[UNMAP, 0x01, 0, 0, 0, 0, 0, FF, FF, CTL]),
    cmd(READ_TOC, &[READ_TOC, 0x02, 0x0f, 0, 0, 0, FF, FF, FF, CTL]),
    cmd(GET_CONFIGURATION, &[GET_CONFIGURATION, 0x03, FF, FF, 0, 0, 0, FF, FF, CTL]),
    cmd(GET_EVENT_STATUS_NOTIFICATION, &[GET_EVENT_STATUS_NOTIFICATION, 0x01, 0, 0, FF, 0, 0, FF, FF, CTL]),
    cmd(READ_DISC_INFORMATION, &[READ_DISC_INFORMATION, 0x07, 0, 0, 0, 0, 0, FF, FF, CTL]),
    cmd(MODE_SENSE_10, &[MODE_SENSE_10, 0x18, FF, FF, 0, 0, 0, FF, FF, CTL]),
    cmd(READ_16, &[READ_16, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(COMPARE_AND_WRITE, &[COMPARE_AND_WRITE, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, CTL]),
    cmd(WRITE_16, &[WRITE_16, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(ORWRITE_16, &[ORWRITE_16, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(WRITE_VERIFY_16, &[WRITE_VERIFY_16, 0xf0, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(VERIFY_16, &[VERIFY_16, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(PRE_FETCH_16, &[PRE_FETCH_16, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(SYNCHRONIZE_CACHE_16, &[SYNCHRONIZE_CACHE_16, 0, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(WRITE_SAME_16, &[WRITE_SAME_16, 0xf9, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    // READ CAPACITY (16) and GET LBA STATUS.
    sa_cmd(SERVICE_ACTION_IN_16, 0x10, &[SERVICE_ACTION_IN_16, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, CTL]),
    sa_cmd(SERVICE_ACTION_IN_16, 0x12, &[SERVICE_ACTION_IN_16, 0x1f, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(REPORT_LUNS, &[REPORT_LUNS, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, CTL]),
    sa_cmd(MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPCODES, &[MAINTENANCE_IN, 0x1f, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(READ_12, &[READ_12, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(WRITE_12, &[WRITE_12, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(WRITE_VERIFY_12, &[WRITE_VERIFY_12, 0xf0, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(VERIFY_12, &[VERIFY_12, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL]),
    cmd(MECHANISM_STATUS, &[MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, FF, FF, 0, CTL]),
];

/// Whether `c` is a command `dev` serves.
fn serves(dev: &Device, c: &Command) -> bool {
    let mut cdb = [0u8; 16];
    cdb[0] = c.op;
    cdb[1] = c.sa.unwrap_or(0);
    supported(dev, c.op, &cdb)
}

/// Whether the opcode has service actions (some command in the table gives one).
fn has_service_actions(op: u8) -> bool {
    COMMANDS.iter().any(|c| c.op == op && c.sa.is_some())
}

/// The command timeouts descriptor (SPC-4 §6.35.4): no nominal or recommended timeout is
/// specified (zero), which tells the initiator to use its own.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

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
            for c in COMMANDS.iter().filter(|c| serves(dev, c)) {
                d.push(c.op);
                d.push(0);
                d.extend_from_slice(&u16::from(c.sa.unwrap_or(0)).to_be_bytes());
                d.push(0);
                d.push(u8::from(rctd) << 1 | u8::from(c.sa.is_some()));
                d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&len.to_be_bytes());
            Ok(d)
        }
        1..=3 => {
            let with_sa = has_service_actions(req_op);
            // 001b names an opcode without service actions, 010b one with; 011b either.
            match (options, with_sa) {
                (1, true) | (2, false) => return Err(Sense::invalid_cdb_field(2, Some(2))),
                _ => {}
            }
            let found = COMMANDS
                .iter()
                .find(|c| c.op == req_op && (!with_sa || c.sa.map(u16::from) == Some(req_sa)));
            let mut d = vec![0u8, u8::from(rctd) << 7];
            match found.filter(|c| serves(dev, c)) {
                Some(c) => {
                    // SUPPORT 011b: supported as the standard says.
                    d[1] |= 0x03;
                    d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
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

/// Whether a CDB is REPORT SUPPORTED OPERATION CODES.
pub fn is_report(cdb: &[u8]) -> bool {
    cdb[0] == MAINTENANCE_IN && cdb[1] & 0x1f == MI_REPORT_SUPPORTED_OPCODES
}

//! The primary commands (SPC-4) every device type serves: TEST UNIT READY, REQUEST SENSE,
//! INQUIRY, MODE SELECT and MODE SENSE, LOG SENSE, PREVENT ALLOW MEDIUM REMOVAL, REPORT
//! LUNS, REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS,
//! and the reservation commands ([`reserve`]). Each entry of [`COMMANDS`] names its decode
//! and emulate steps, here or
//! in the submodule of the same name.
#![forbid(unsafe_code)]

pub mod inquiry;
pub mod log;
pub mod luns;
pub mod mode;
pub mod reserve;
pub mod rsoc;
pub mod tmf;
pub mod xcopy;

use crate::scsi::alua;
use crate::scsi::command::{Alua, Command, Decode, DeviceTypes, Emulate, Reservation, Run};
use crate::scsi::device::Device;
use crate::scsi::mmc;
use crate::scsi::pr::opcode::{RELEASE_10, RELEASE_6, RESERVE_10, RESERVE_6};
use crate::scsi::pr::{in_sa, out_sa};
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{Plan, ScsiTask};

/// Operation codes (SPC-4).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const REPORT_LUNS: u8 = 0xa0;
    /// MAINTENANCE IN and its REPORT SUPPORTED OPERATION CODES service action.
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    pub const MI_REPORT_SUPPORTED_TMFS: u8 = 0x0d;
    pub const MI_REPORT_TARGET_PGS: u8 = 0x0a;
    /// MAINTENANCE OUT and its SET TARGET PORT GROUPS service action.
    pub const MAINTENANCE_OUT: u8 = 0xa4;
    pub const MO_SET_TARGET_PGS: u8 = 0x0a;
}
use opcode::*;

/// The CONTROL byte of CDB usage data: NACA is read (and refused when set).
pub(in crate::scsi) const CTL: u8 = 0x04;
pub(in crate::scsi) const FF: u8 = 0xff;

/// An emulated SPC command as most are: served by every device type, with or without a
/// medium, and reporting unit attentions (the entries that differ say so:
/// [`Command::needs_medium`], [`Command::ua_exempt`]).
const fn emulated(
    name: &'static str,
    op: u8,
    usage: &'static [u8],
    reservation: Reservation,
    alua: Alua,
    decode: Decode,
    emulate: Emulate,
) -> Command {
    Command {
        name,
        op,
        sa: None,
        usage,
        types: DeviceTypes::ALL,
        only_if: None,
        works_without_medium: true,
        reports_ua: true,
        reservation,
        alua,
        decode,
        run: Run::Emulate(emulate),
    }
}

/// A service action of MAINTENANCE IN or OUT: disks only, MMC giving A3h to SEND KEY and A4h
/// to REPORT KEY.
#[allow(clippy::too_many_arguments)]
const fn maintenance(
    name: &'static str,
    op: u8,
    sa: u8,
    usage: &'static [u8],
    only_if: Option<fn(&Device) -> bool>,
    reservation: Reservation,
    alua: Alua,
    decode: Decode,
    emulate: Emulate,
) -> Command {
    Command {
        sa: Some(sa),
        types: DeviceTypes::DISK,
        only_if,
        ..emulated(name, op, usage, reservation, alua, decode, emulate)
    }
}

/// The SPC commands, one per line (CDB usage data kept unformatted so that its bytes line
/// up).
#[rustfmt::skip]
pub const COMMANDS: &[Command] = &[
    //       name                            opcode           usage                                                   reservation                 alua                 decode                emulate
    emulated("TEST UNIT READY",              TEST_UNIT_READY, &[TEST_UNIT_READY, 0, 0, 0, 0, CTL],                    Reservation::TestUnitReady, Alua::Active,        no_data,              nothing).needs_medium(),
    emulated("REQUEST SENSE",                REQUEST_SENSE,   &[REQUEST_SENSE, 0x01, 0, 0, FF, CTL],                  Reservation::Allowed,       Alua::Transitioning, decode_request_sense, request_sense).ua_exempt(),
    emulated("INQUIRY",                      INQUIRY,         &[INQUIRY, 0x01, FF, FF, FF, CTL],                      Reservation::Allowed,       Alua::Transitioning, inquiry::decode,      inquiry::emulate).ua_exempt(),
    emulated("MODE SELECT(6)",               MODE_SELECT_6,   &[MODE_SELECT_6, 0x11, 0, 0, FF, CTL],                  Reservation::Write,         Alua::Standby,       mode::decode_select,  mode::select),
    emulated("MODE SENSE(6)",                MODE_SENSE_6,    &[MODE_SENSE_6, 0x08, FF, FF, FF, CTL],                 Reservation::Read,          Alua::Standby,       mode::decode,         mode::emulate),
    emulated("PREVENT ALLOW MEDIUM REMOVAL", PREVENT_ALLOW,   &[PREVENT_ALLOW, 0, 0, 0, 0x03, CTL],                   Reservation::PreventAllow,  Alua::Active,        decode_prevent_allow, prevent_allow),
    emulated("LOG SENSE",                    LOG_SENSE,       &[LOG_SENSE, 0x01, FF, FF, 0, FF, FF, FF, FF, CTL],     Reservation::Allowed,       Alua::Standby,       log::decode,          log::emulate),
    emulated("MODE SELECT(10)",              MODE_SELECT_10,  &[MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, FF, FF, CTL],    Reservation::Write,         Alua::Standby,       mode::decode_select,  mode::select),
    emulated("MODE SENSE(10)",               MODE_SENSE_10,   &[MODE_SENSE_10, 0x18, FF, FF, 0, 0, 0, FF, FF, CTL],   Reservation::Read,          Alua::Standby,       mode::decode,         mode::emulate),
    emulated("REPORT LUNS",                  REPORT_LUNS,     &[REPORT_LUNS, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, CTL], Reservation::Allowed,       Alua::Transitioning, luns::decode,         luns::emulate).ua_exempt(),
    //          name                                          opcode           service action               usage                                                              only if               reservation           alua                 decode               emulate
    maintenance("REPORT SUPPORTED OPERATION CODES",           MAINTENANCE_IN,  MI_REPORT_SUPPORTED_OPCODES, &[MAINTENANCE_IN, 0x1f, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, CTL], None,                 Reservation::Allowed, Alua::Unavailable,   rsoc::decode,        rsoc::emulate),
    maintenance("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", MAINTENANCE_IN,  MI_REPORT_SUPPORTED_TMFS,    &[MAINTENANCE_IN, 0x1f, 0x80, 0, 0, 0, FF, FF, FF, FF, 0, CTL],    None,                 Reservation::Allowed, Alua::Unavailable,   tmf::decode,         tmf::emulate),
    // Devices in a device group (SPC-4 §6.36); with explicit ALUA on (§6.46).
    maintenance("REPORT TARGET PORT GROUPS",                  MAINTENANCE_IN,  MI_REPORT_TARGET_PGS,        &[MAINTENANCE_IN, 0xff, 0, 0, 0, 0, FF, FF, FF, FF, 0, CTL],       Some(alua::implicit), Reservation::Allowed, Alua::Transitioning, alua::decode_report, alua::report),
    maintenance("SET TARGET PORT GROUPS",                     MAINTENANCE_OUT, MO_SET_TARGET_PGS,           &[MAINTENANCE_OUT, 0x1f, 0, 0, 0, 0, FF, FF, FF, FF, 0, CTL],      Some(alua::explicit), Reservation::Write,   Alua::Unavailable,   alua::decode_set,    alua::set),
    // The reservation commands ([`reserve`]).
    reserve::pr_in("PERSISTENT RESERVE IN (READ KEYS)", in_sa::READ_KEYS),
    reserve::pr_in("PERSISTENT RESERVE IN (READ RESERVATION)", in_sa::READ_RESERVATION),
    reserve::pr_in("PERSISTENT RESERVE IN (REPORT CAPABILITIES)", in_sa::REPORT_CAPABILITIES),
    reserve::pr_in("PERSISTENT RESERVE IN (READ FULL STATUS)", in_sa::READ_FULL_STATUS),
    reserve::pr_out("PERSISTENT RESERVE OUT (REGISTER)", out_sa::REGISTER),
    reserve::pr_out("PERSISTENT RESERVE OUT (RESERVE)", out_sa::RESERVE),
    reserve::pr_out("PERSISTENT RESERVE OUT (RELEASE)", out_sa::RELEASE),
    reserve::pr_out("PERSISTENT RESERVE OUT (CLEAR)", out_sa::CLEAR),
    reserve::pr_out("PERSISTENT RESERVE OUT (PREEMPT)", out_sa::PREEMPT),
    reserve::pr_out("PERSISTENT RESERVE OUT (PREEMPT AND ABORT)", out_sa::PREEMPT_AND_ABORT),
    reserve::pr_out("PERSISTENT RESERVE OUT (REGISTER AND IGNORE EXISTING KEY)", out_sa::REGISTER_AND_IGNORE_EXISTING_KEY),
    reserve::pr_out("PERSISTENT RESERVE OUT (REGISTER AND MOVE)", out_sa::REGISTER_AND_MOVE),
    reserve::spc2("RESERVE(6)", RESERVE_6, &[RESERVE_6, 0x11, 0, 0, 0, CTL]),
    reserve::spc2("RELEASE(6)", RELEASE_6, &[RELEASE_6, 0x11, 0, 0, 0, CTL]),
    reserve::spc2("RESERVE(10)", RESERVE_10, &[RESERVE_10, 0x13, 0, 0, 0, 0, 0, 0, 0, CTL]),
    reserve::spc2("RELEASE(10)", RELEASE_10, &[RELEASE_10, 0x13, 0, 0, 0, 0, 0, 0, 0, CTL]),
    // The copy manager ([`xcopy`]).
    xcopy::EXTENDED_COPY_LID1,
    xcopy::results("RECEIVE COPY RESULTS (COPY STATUS)", xcopy::SA_COPY_STATUS, xcopy::copy_status),
    xcopy::results("RECEIVE COPY RESULTS (RECEIVE COPY OPERATING PARAMETERS)", xcopy::SA_OPERATING_PARAMETERS, xcopy::operating_parameters),
    xcopy::results("RECEIVE COPY RESULTS (FAILED SEGMENT DETAILS)", xcopy::SA_FAILED_SEGMENT_DETAILS, xcopy::failed_segment_details),
];

/// The decode step of commands without data that need no check of their CDB.
pub(in crate::scsi) fn no_data(_: &Device, _: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::NONE)
}

/// The emulation of commands that have nothing to do once decoded (TEST UNIT READY: the
/// medium and unit attention checks are the command).
pub(in crate::scsi) fn nothing(_: &Device, _: &mut ScsiTask) {}

fn decode_request_sense(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(u32::from(task.cdb[4])))
}

/// REQUEST SENSE (SPC-4 §6.39): the pending unit attention (which it clears), or NOT READY
/// while there is no medium, or NO SENSE; in descriptor format when DESC is set.
fn request_sense(dev: &Device, task: &mut ScsiTask) {
    let format = if task.cdb[1] & 0x01 != 0 {
        sense::Format::Descriptor
    } else {
        sense::Format::Fixed
    };
    let s = match dev.take_ua(task.nexus) {
        Some(code) => Sense::new(sense::UNIT_ATTENTION, code),
        // A sanitize under way: how far it is (SBC-3 §4.11.4).
        None if dev.sanitize_state() == crate::scsi::device::Sanitize::InProgress => Sense {
            progress: Some(dev.sanitize_progress()),
            ..Sense::new(sense::NOT_READY, sense::SANITIZE_IN_PROGRESS)
        },
        None if !dev.medium_present() => Sense::new(sense::NOT_READY, sense::MEDIUM_NOT_PRESENT),
        None => Sense::new(sense::NO_SENSE, (0, 0)),
    };
    let (s, n) = s.encode(format);
    let alloc = usize::from(task.cdb[4]);
    task.reply(&s[..alloc.min(n)]);
}

/// Whether `dev`'s medium can be removed: a removable disk, or a CD drive.
pub(in crate::scsi) fn removable(dev: &Device) -> bool {
    dev.is_removable() || dev.scsi_type() == mmc::TYPE_CDROM
}

fn decode_prevent_allow(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    // PREVENT field (bits 1-0): MMC also has PERSISTENT (bit 1); SBC has 00b/01b only.
    let prevent = task.cdb[4] & 0x03;
    if prevent > 1 && dev.scsi_type() != mmc::TYPE_CDROM {
        return Err(Sense::invalid_cdb_field(4, Some(0)));
    }
    Ok(Plan::NONE)
}

/// PREVENT ALLOW MEDIUM REMOVAL (SPC-4 §6.13): per I_T nexus, on devices with a removable
/// medium; elsewhere it has no effect.
fn prevent_allow(dev: &Device, task: &mut ScsiTask) {
    if removable(dev) {
        dev.set_prevent_removal(task.nexus, task.cdb[4] & 0x01 != 0);
    }
}

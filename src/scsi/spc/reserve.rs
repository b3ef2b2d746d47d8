//! The reservation commands: PERSISTENT RESERVE IN (SPC-4 §6.15), PERSISTENT RESERVE OUT
//! (§6.16), RESERVE(6)/(10) and RELEASE(6)/(10) (SPC-2 §7.21-§7.24). The state and its rules
//! are the device's [`Reservations`](crate::scsi::pr::Reservations); here are the decode steps
//! and the execution that carries out what a command decided: the APTPL file, the unit
//! attentions of other I_T nexuses and, for PREEMPT AND ABORT, the nexuses whose tasks the
//! transport aborts.
//!
//! PERSISTENT RESERVE OUT, RESERVE and RELEASE act for the I_T nexus that sent them, which
//! the transport passes in ([`crate::scsi::execute_reservation`]).
#![forbid(unsafe_code)]

use log::warn;

use crate::scsi::command::{Alua, Command, DeviceTypes, Reservation, Run};
use crate::scsi::spc::{no_data, CTL, FF};

use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::{be16, be32};
use crate::scsi::device::Device;
use crate::scsi::pr::{self, Nexus};
use crate::scsi::sense::Sense;
use crate::scsi::task::{DataDir, Plan, ScsiTask};

/// A PERSISTENT RESERVE IN service action (SPC-4 §6.15): served without a medium and in
/// the standby ALUA state (§5.15.2.4.4), never in conflict with a persistent reservation.
pub(in crate::scsi) const fn pr_in(name: &'static str, sa: u8) -> Command {
    Command {
        name,
        op: pr::opcode::PERSISTENT_RESERVE_IN,
        sa: Some(sa),
        usage: &[
            pr::opcode::PERSISTENT_RESERVE_IN,
            0x1f,
            0,
            0,
            0,
            0,
            0,
            FF,
            FF,
            CTL,
        ],
        types: DeviceTypes::ALL,
        only_if: None,
        works_without_medium: true,
        reports_ua: true,
        reservation: Reservation::PersistentReserveIn,
        alua: Alua::Standby,
        decode: decode_in,
        run: Run::Emulate(persistent_reserve_in),
    }
}

/// A PERSISTENT RESERVE OUT service action (SPC-4 §6.16): SCOPE and TYPE (byte 2) and the
/// PARAMETER LIST LENGTH (bytes 5-8) are read.
pub(in crate::scsi) const fn pr_out(name: &'static str, sa: u8) -> Command {
    Command {
        name,
        op: pr::opcode::PERSISTENT_RESERVE_OUT,
        sa: Some(sa),
        usage: &[
            pr::opcode::PERSISTENT_RESERVE_OUT,
            0x1f,
            FF,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            CTL,
        ],
        types: DeviceTypes::ALL,
        only_if: None,
        works_without_medium: true,
        reports_ua: true,
        reservation: Reservation::PersistentReserveOut,
        alua: Alua::Standby,
        decode: decode_out,
        run: Run::Reservation(persistent_reserve_out),
    }
}

/// RESERVE or RELEASE (SPC-2): the bits read are those refused when set (extents, third
/// party reservations, LONGID); SPC-4 has no ALUA standby exemption for them.
pub(in crate::scsi) const fn spc2(name: &'static str, op: u8, usage: &'static [u8]) -> Command {
    Command {
        name,
        op,
        sa: None,
        usage,
        types: DeviceTypes::ALL,
        only_if: None,
        works_without_medium: true,
        reports_ua: true,
        reservation: Reservation::ReserveRelease,
        alua: Alua::Active,
        decode: no_data,
        run: Run::Reservation(
            if op == pr::opcode::RESERVE_6 || op == pr::opcode::RESERVE_10 {
                reserve
            } else {
                release
            },
        ),
    }
}

/// PERSISTENT RESERVE IN: Data-In of the ALLOCATION LENGTH (bytes 7-8).
pub(in crate::scsi) fn decode_in(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(be16(&task.cdb[7..9])))
}

/// PERSISTENT RESERVE IN (SPC-4 §6.15): the service action's parameter data.
pub(in crate::scsi) fn persistent_reserve_in(dev: &Device, task: &mut ScsiTask) {
    match dev.reservations().persistent_reserve_in(&task.cdb[..10]) {
        Ok(data) => task.reply(&data),
        Err(st) => end(task, st),
    }
}

/// PERSISTENT RESERVE OUT: Data-Out of the PARAMETER LIST LENGTH (bytes 5-8). The longest
/// list worth taking (every registration SPEC_I_PT can make, as TransportIDs) is far below
/// the largest transfer; a longer one is refused before any data moves.
pub(in crate::scsi) fn decode_out(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let len = be32(&task.cdb[5..9]);
    if len as usize > MAX_TRANSFER {
        return Err(Sense::invalid_cdb_field(5, None));
    }
    Ok(Plan {
        dir: if len > 0 { DataDir::Out } else { DataDir::None },
        len,
    })
}

/// PERSISTENT RESERVE OUT (SPC-4 §6.16) from `nexus`. Carries out its side effects before
/// the status goes: the APTPL file, and the unit attentions of the other I_T nexuses of the
/// device. Returns the registered I_T nexuses (the device's ids) whose tasks on this logical
/// unit PREEMPT AND ABORT aborts: the transport aborts them, and answers this command once
/// they are.
pub(in crate::scsi) fn persistent_reserve_out(
    dev: &Device,
    task: &mut ScsiTask,
    nexus: &Nexus,
) -> Vec<u64> {
    let len = (be32(&task.cdb[5..9]) as usize).min(MAX_TRANSFER);
    let mut param = vec![0u8; len];
    let got = task.buf.as_ref().map_or(0, |b| b.read_at(0, &mut param));
    // Fewer bytes than the list length (a short Data-Out): the rules of the parameter list
    // see only what came.
    param.truncate(got);
    let outcome = dev
        .reservations()
        .persistent_reserve_out(nexus, &task.cdb[..10], &param);
    if let Some(p) = &outcome.persist {
        // The change is in effect whatever happens to the file: an error status would tell
        // the initiator it did not happen. It is the durability of APTPL that is lost, which
        // the log says (and the next change that writes the file restores).
        if let Err(e) = dev.reservations().persist(p) {
            warn!("{}: APTPL state not saved: {e}", dev.name());
        }
    }
    let aborts = dev.deliver_reservation_outcome(&outcome);
    end(task, outcome.status);
    aborts
}

/// RESERVE(6) and RESERVE(10) (SPC-2 §7.21, §7.22) from `nexus`.
pub(in crate::scsi) fn reserve(dev: &Device, task: &mut ScsiTask, nexus: &Nexus) -> Vec<u64> {
    let len = usize::from(task.cdb[0] == pr::opcode::RESERVE_10) * 4 + 6;
    let st = dev.reservations().reserve(nexus, &task.cdb[..len]);
    end(task, st);
    Vec::new()
}

/// RELEASE(6) and RELEASE(10) (SPC-2 §7.23, §7.24) from `nexus`.
pub(in crate::scsi) fn release(dev: &Device, task: &mut ScsiTask, nexus: &Nexus) -> Vec<u64> {
    let len = usize::from(task.cdb[0] == pr::opcode::RELEASE_10) * 4 + 6;
    let st = dev.reservations().release(nexus, &task.cdb[..len]);
    end(task, st);
    Vec::new()
}

/// Ends a task as a reservation command decided.
fn end(task: &mut ScsiTask, st: pr::Status) {
    match st {
        pr::Status::Good => {}
        pr::Status::CheckCondition(s) => task.fail(s),
        pr::Status::ReservationConflict => task.reservation_conflict(),
    }
}

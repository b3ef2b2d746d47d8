//! The command table: one [`Command`] per operation code and service action, merged at
//! compile time from the lists of each standard ([`spc::COMMANDS`], [`sbc::COMMANDS`],
//! [`mmc::COMMANDS`]) and sorted by (opcode, service action), with a 256-slot index by
//! opcode. The dispatcher ([`plan`]), the unit attention rule ([`ua_applies`]), the medium
//! check and REPORT SUPPORTED OPERATION CODES all read it.
#![forbid(unsafe_code)]

use crate::scsi::cdb::cdb_len_of;
use crate::scsi::device::Device;
use crate::scsi::pr::{Access, Nexus};
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{Plan, ScsiTask};
use crate::scsi::{mmc, sbc, spc};

/// Decodes and checks a CDB before any data moves: what the transport must move, or the
/// sense data that ends the command. It may record in the task what execution needs (the
/// I/O range, say), and changes nothing else of it.
pub type Decode = fn(&Device, &mut ScsiTask) -> Result<Plan, Sense>;

/// Runs a command that completes at once: fills the Data-In buffer, or fails the task.
pub type Emulate = fn(&Device, &mut ScsiTask);

/// Runs a reservation command for the I_T nexus that sent it, which it needs: completes at
/// once, and returns the registered I_T nexuses whose tasks on the logical unit the
/// transport must abort (PREEMPT AND ABORT), usually none.
pub type RunReservation = fn(&Device, &mut ScsiTask, &Nexus) -> Vec<u64>;

/// The peripheral device types that serve a command, as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTypes(u8);

impl DeviceTypes {
    /// Direct access block devices (peripheral device type 00h, SBC-3).
    pub const DISK: DeviceTypes = DeviceTypes(1 << 0);
    /// CD/DVD devices (05h, MMC-5).
    pub const CDROM: DeviceTypes = DeviceTypes(1 << 1);
    pub const ALL: DeviceTypes = DeviceTypes(Self::DISK.0 | Self::CDROM.0);

    pub const fn contains(self, other: DeviceTypes) -> bool {
        self.0 & other.0 == other.0
    }

    /// The type of `dev`.
    pub fn of(dev: &Device) -> DeviceTypes {
        if dev.scsi_type() == mmc::TYPE_CDROM {
            DeviceTypes::CDROM
        } else {
            DeviceTypes::DISK
        }
    }
}

/// How a command fares in the presence of reservations: the rows of the tables of commands
/// allowed in the presence of various reservations, SPC-4 §5.13.1 for SPC commands and
/// SBC-3's for block commands, each with the column of an SPC-2 RESERVE held by another I_T
/// nexus (SPC-2 §5.5.1). [`plan`] reads it from the entry and asks
/// [`crate::scsi::pr::Reservations::check`]; the classes that depend on the CDB are resolved
/// first ([`Reservation::for_cdb`]).
///
/// | class | SPC-2 RESERVE of another | WE/EA, not holder | RO/AR, registered | RO/AR, not registered |
/// |---|---|---|---|---|
/// | `Allowed` | allowed | allowed | allowed | allowed |
/// | `TestUnitReady` | conflict | allowed | allowed | allowed |
/// | `Read` | conflict | WE: allowed, EA: conflict | allowed | WE: allowed, EA: conflict |
/// | `Write` | conflict | conflict | allowed | conflict |
/// | `PersistentReserveIn` | conflict, even for the holder | allowed | allowed | allowed |
/// | `PersistentReserveOut` | conflict, even for the holder | by service action | by service action | by service action |
/// | `ReserveRelease` | by the command | same | same | same |
///
/// The persistent reservation holder and the SPC-2 reservation holder may run anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reservation {
    /// Allowed whatever the reservation: INQUIRY, REPORT LUNS, REQUEST SENSE, LOG SENSE,
    /// READ CAPACITY(10)/(16), REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT GROUPS.
    Allowed,
    /// TEST UNIT READY: SPC-4 allows it through every persistent reservation; SPC-2 lets
    /// only the holder of a RESERVE run it.
    TestUnitReady,
    /// Reads the medium or the device's state: READ, VERIFY, PRE-FETCH, GET LBA STATUS,
    /// MODE SENSE, MMC's READ TOC and READ DISC INFORMATION. The write exclusive types let
    /// every nexus through; the exclusive access types only the holder (and, for the
    /// registrants only and all registrants types, the registrants).
    Read,
    /// Changes the medium or the device's state: WRITE, WRITE AND VERIFY, WRITE SAME, UNMAP,
    /// COMPARE AND WRITE, ORWRITE, SYNCHRONIZE CACHE, MODE SELECT. Only the holder, or a
    /// registrant of a registrants only or all registrants type.
    Write,
    /// PREVENT ALLOW MEDIUM REMOVAL (SPC-4): [`Self::Allowed`] with PREVENT 00b,
    /// [`Self::Write`] otherwise.
    PreventAllow,
    /// START STOP UNIT (SBC-3): [`Self::Allowed`] with START 1 and POWER CONDITION 0h,
    /// [`Self::Write`] otherwise.
    StartStop,
    /// PERSISTENT RESERVE IN: allowed through persistent reservations; SPC-2 §5.5.1 has every
    /// one conflict with a RESERVE, whoever holds it.
    PersistentReserveIn,
    /// PERSISTENT RESERVE OUT: the service action decides (SPC-4 §5.13.1's table of service
    /// actions, applied by `persistent_reserve_out`). Conflicts with any RESERVE.
    PersistentReserveOut,
    /// RESERVE(6)/(10) and RELEASE(6)/(10): the command itself decides (SPC-2 §5.5.1,
    /// SPC-4 §5.13.3).
    ReserveRelease,
}

impl Reservation {
    /// The class of this command with this CDB: the CDB-dependent classes resolved.
    pub fn for_cdb(self, cdb: &[u8]) -> Reservation {
        let b4 = cdb.get(4).copied();
        match self {
            // Allowing removal (PREVENT field 0) is never a conflict.
            Reservation::PreventAllow if b4.is_some_and(|b| b & 0x03 == 0) => Reservation::Allowed,
            // Starting the unit (START=1, POWER CONDITION 0h) is never a conflict.
            Reservation::StartStop if b4.is_some_and(|b| b & 0xf0 == 0 && b & 0x01 != 0) => {
                Reservation::Allowed
            }
            Reservation::PreventAllow | Reservation::StartStop => Reservation::Write,
            c => c,
        }
    }
}

/// The least accessible target port asymmetric access state in which a command is still
/// served (SPC-4 §5.15.2.4): in the states below it, it ends with NOT READY, LOGICAL UNIT
/// NOT ACCESSIBLE and the state's ASCQ. Ordered from the most to the least permissive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alua {
    /// Every state, transitioning included (§5.15.2.4.6): INQUIRY, REPORT LUNS, REQUEST
    /// SENSE, REPORT TARGET PORT GROUPS.
    Transitioning,
    /// Unavailable and standby (§5.15.2.4.5): also SET TARGET PORT GROUPS and the commands
    /// that only describe the device server.
    Unavailable,
    /// Standby (§5.15.2.4.4): also MODE SENSE and SELECT, LOG SENSE and SELECT, PERSISTENT
    /// RESERVE IN and OUT, the diagnostics.
    Standby,
    /// The active states only (active/optimized, active/non-optimized): everything that
    /// reaches the medium, and TEST UNIT READY, which reports the state.
    Active,
}

/// How a decoded command runs.
#[derive(Clone, Copy)]
pub enum Run {
    /// Emulated: completes at once.
    Emulate(Emulate),
    /// The backend I/O the decode step recorded (a read, write, flush or read-ahead), or
    /// nothing when it recorded none.
    Io,
    /// UNMAP: the ranges of its parameter list deallocated (nothing without one).
    Unmap,
    /// WRITE SAME: its range deallocated (UNMAP=1), or its one block written over it.
    WriteSame,
    /// COMPARE AND WRITE and ORWRITE: a read then a write, their range locked between.
    ReadModifyWrite,
    /// SANITIZE OVERWRITE and BLOCK ERASE: the whole medium, in pieces, in the background
    /// once IMMED has answered.
    Sanitize,
    /// EXTENDED COPY: its parameter list checked, then the copy, in chunks, in the
    /// background of the reactor until it ends ([`crate::scsi::spc::xcopy`]).
    Copy,
    /// PERSISTENT RESERVE OUT, RESERVE and RELEASE: emulated for the sending I_T nexus
    /// ([`execute_reservation`]).
    Reservation(RunReservation),
}

/// One command: everything the target knows about it.
#[derive(Clone, Copy)]
pub struct Command {
    /// As the standard names it.
    pub name: &'static str,
    pub op: u8,
    /// The service action (byte 1, bits 4-0) of commands that have them.
    pub sa: Option<u8>,
    /// The CDB usage data REPORT SUPPORTED OPERATION CODES returns (SPC-4 §6.35.3): as long
    /// as the CDB, byte 0 the opcode, then which bits of each byte the device server reads.
    pub usage: &'static [u8],
    /// The device types that serve it.
    pub types: DeviceTypes,
    /// A further condition on the device (UNMAP only on thin provisioned devices).
    pub only_if: Option<fn(&Device) -> bool>,
    /// Works while the drive is empty or the backing inactive (SPC-4 §4.4, MMC-5 §4.1.7);
    /// otherwise it ends with NOT READY.
    pub works_without_medium: bool,
    /// Reports a pending unit attention; SAM-5 §5.14 exempts INQUIRY, REPORT LUNS and
    /// REQUEST SENSE.
    pub reports_ua: bool,
    pub reservation: Reservation,
    pub alua: Alua,
    pub decode: Decode,
    pub run: Run,
}

impl Command {
    /// Whether `dev` serves this command.
    pub fn serves(&self, dev: &Device) -> bool {
        self.types.contains(DeviceTypes::of(dev)) && self.only_if.is_none_or(|f| f(dev))
    }

    /// This command, ending with NOT READY while there is no medium or the backing is
    /// inactive.
    pub const fn needs_medium(self) -> Command {
        Command {
            works_without_medium: false,
            ..self
        }
    }

    /// This command, exempt from reporting a pending unit attention (SAM-5 §5.14).
    pub const fn ua_exempt(self) -> Command {
        Command {
            reports_ua: false,
            ..self
        }
    }
}

/// Every command, sorted by opcode and service action.
pub static COMMANDS: [Command; TABLE_LEN] = merge([spc::COMMANDS, sbc::COMMANDS, mmc::COMMANDS]);

const TABLE_LEN: usize = spc::COMMANDS.len() + sbc::COMMANDS.len() + mmc::COMMANDS.len();

/// Where an opcode's commands are in [`COMMANDS`].
#[derive(Clone, Copy)]
struct Slot {
    start: u8,
    len: u8,
}

/// [`COMMANDS`] by opcode.
static INDEX: [Slot; 256] = index(&COMMANDS);

/// Whether `a` sorts before `b`.
const fn before(a: &Command, b: &Command) -> bool {
    if a.op != b.op {
        return a.op < b.op;
    }
    match (a.sa, b.sa) {
        (Some(x), Some(y)) => x < y,
        _ => false,
    }
}

/// The lists of each standard as one table sorted by (opcode, service action). Fails the
/// build when two entries have the same opcode and service action, or an opcode has
/// entries both with and without one.
const fn merge<const N: usize>(lists: [&[Command]; 3]) -> [Command; N] {
    let mut out = [lists[0][0]; N];
    let mut n = 0;
    let mut l = 0;
    while l < lists.len() {
        let mut i = 0;
        while i < lists[l].len() {
            out[n] = lists[l][i];
            n += 1;
            i += 1;
        }
        l += 1;
    }
    assert!(n == N);
    // Insertion sort: a few dozen entries, once, at compile time.
    let mut i = 1;
    while i < N {
        let mut j = i;
        while j > 0 && before(&out[j], &out[j - 1]) {
            let t = out[j];
            out[j] = out[j - 1];
            out[j - 1] = t;
            j -= 1;
        }
        i += 1;
    }
    let mut i = 1;
    while i < N {
        assert!(
            before(&out[i - 1], &out[i]),
            "two commands share an opcode without distinct service actions"
        );
        i += 1;
    }
    out
}

const fn index(table: &[Command]) -> [Slot; 256] {
    assert!(table.len() <= u8::MAX as usize);
    let mut idx = [Slot { start: 0, len: 0 }; 256];
    let mut i = 0;
    while i < table.len() {
        let op = table[i].op as usize;
        if idx[op].len == 0 {
            idx[op].start = i as u8;
        }
        idx[op].len += 1;
        i += 1;
    }
    idx
}

/// The commands with opcode `op`.
fn with_opcode(op: u8) -> &'static [Command] {
    let s = INDEX[usize::from(op)];
    let start = usize::from(s.start);
    COMMANDS
        .get(start..start + usize::from(s.len))
        .unwrap_or(&[])
}

/// The command a CDB names, whatever the device: by its opcode, and by its service action
/// when the opcode has them.
pub fn lookup(cdb: &[u8; 16]) -> Option<&'static Command> {
    match with_opcode(cdb[0]) {
        [c] if c.sa.is_none() => Some(c),
        cs => {
            let sa = cdb[1] & 0x1f;
            cs.iter().find(|c| c.sa == Some(sa))
        }
    }
}

/// The command with opcode `op` and, when the opcode has service actions, service action
/// `sa` (REPORT SUPPORTED OPERATION CODES asks by both).
pub fn find(op: u8, sa: u16) -> Option<&'static Command> {
    with_opcode(op)
        .iter()
        .find(|c| c.sa.is_none_or(|x| u16::from(x) == sa))
}

/// Whether `op` has service actions.
pub fn has_service_actions(op: u8) -> bool {
    with_opcode(op).iter().any(|c| c.sa.is_some())
}

/// Whether a pending unit attention is reported for this task's command (SAM-5 §5.14): for
/// every command but those the table exempts, unknown ones included.
pub fn ua_applies(task: &ScsiTask) -> bool {
    lookup(&task.cdb).is_none_or(|c| c.reports_ua)
}

/// Decodes and checks a command from the I_T nexus `nexus` before its data moves. On error
/// nothing has changed in the task: the caller ends it with the sense returned
/// ([`ScsiTask::fail`]). A command that conflicts with a reservation is planned as
/// [`Plan::NONE`] with its status set to RESERVATION CONFLICT: the caller ends it at once,
/// like an error, with no sense data.
pub fn plan(dev: &Device, task: &mut ScsiTask, nexus: &Nexus) -> Result<Plan, Sense> {
    task.sense_format = dev.sense_format();
    if task.cdb_len > 16 {
        return Err(invalid_opcode());
    }
    let cmd = lookup(&task.cdb);
    if !checks(dev, task, nexus, cmd)? {
        return Ok(Plan::NONE);
    }
    plan_command(dev, task, cmd)
}

/// [`plan`] without its unit attention and reservation checks, for a command that task
/// attributes hold back: those run when it starts ([`start_checks`]), since SAM-5 §5.14 puts
/// them where the command is processed, not where it waits.
pub fn plan_held(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    task.sense_format = dev.sense_format();
    if task.cdb_len > 16 {
        return Err(invalid_opcode());
    }
    plan_command(dev, task, lookup(&task.cdb))
}

/// The checks that come before a command's own (SAM-5 §5.14): a unit attention for the
/// task's I_T nexus (returned as the error, and cleared), then a reservation conflict
/// (`Ok(false)`, the task's status set to RESERVATION CONFLICT). `Ok(true)`: neither.
pub fn start_checks(dev: &Device, task: &mut ScsiTask, nexus: &Nexus) -> Result<bool, Sense> {
    checks(dev, task, nexus, lookup(&task.cdb))
}

fn checks(
    dev: &Device,
    task: &mut ScsiTask,
    nexus: &Nexus,
    cmd: Option<&'static Command>,
) -> Result<bool, Sense> {
    if cmd.is_none_or(|c| c.reports_ua) {
        if let Some(code) = dev.take_ua_of(task.nexus, nexus) {
            return Err(Sense::new(sense::UNIT_ATTENTION, code));
        }
    }
    // SAM-5 §5.14 and SPC-4 §5.13.1: a reservation conflict after the unit attention. One
    // atomic load while no reservation exists.
    if let Some(c) = cmd.filter(|_| dev.reservations().is_reserved()) {
        let class = c.reservation.for_cdb(&task.cdb);
        if dev.reservations().check(nexus, class) == Access::Conflict {
            task.reservation_conflict();
            return Ok(false);
        }
    }
    Ok(true)
}

fn invalid_opcode() -> Sense {
    Sense::new(
        sense::ILLEGAL_REQUEST,
        sense::INVALID_COMMAND_OPERATION_CODE,
    )
}

/// The CONTROL byte, the device's state and the CDB itself.
fn plan_command(
    dev: &Device,
    task: &mut ScsiTask,
    cmd: Option<&'static Command>,
) -> Result<Plan, Sense> {
    // CONTROL byte: NACA (bit 2) is not supported (SAM-5 §5.9).
    let clen = cdb_len_of(task.opcode());
    if clen > 0 && task.cdb[clen - 1] & 0x04 != 0 {
        return Err(Sense::invalid_cdb_field(clen as u16 - 1, Some(2)));
    }
    let Some(cmd) = cmd.filter(|c| c.serves(dev)) else {
        // SPC-4 §4.2.5.1 (the SERVICE ACTION field): a service action the device server
        // does not support, of an operation code it does, is an invalid field.
        if with_opcode(task.cdb[0]).iter().any(|c| c.serves(dev)) {
            return Err(Sense::invalid_cdb_field(1, Some(4)));
        }
        return Err(invalid_opcode());
    };
    // The target port's asymmetric access state for this logical unit (SPC-4 §5.15.2.4).
    if let Some(asc) = task.access_state.refuses(cmd.alua) {
        return Err(Sense::new(sense::NOT_READY, asc));
    }
    if !cmd.works_without_medium {
        // No medium (3A/00), or an inactive backing (04/03): atomic loads, no lock.
        if let Some(asc) = dev.not_ready() {
            return Err(Sense::new(sense::NOT_READY, asc));
        }
    }
    // A sanitize under way or failed (one atomic load when neither).
    if let Some(s) = sbc::sanitize::refusal(
        dev,
        !cmd.reports_ua,
        matches!(cmd.reservation, Reservation::Read | Reservation::Write),
        cmd.op == sbc::sanitize::SANITIZE,
    ) {
        return Err(s);
    }
    let plan = (cmd.decode)(dev, task)?;
    task.cmd = Some(cmd);
    Ok(plan)
}

/// Runs a planned reservation command ([`Run::Reservation`]) for `nexus`. Returns `None`,
/// doing nothing, for any other task (the port runs those); otherwise the registered I_T
/// nexuses whose tasks on the logical unit the transport must abort before it answers.
pub fn execute_reservation(dev: &Device, task: &mut ScsiTask, nexus: &Nexus) -> Option<Vec<u64>> {
    let Run::Reservation(run) = task.cmd?.run else {
        return None;
    };
    if task.status != crate::scsi::task::STATUS_GOOD {
        return Some(Vec::new());
    }
    Some(run(dev, task, nexus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::pr::test_nexus;
    use crate::scsi::spc::rsoc;
    use crate::scsi::task::Plan;
    use std::sync::Arc;

    fn device(handler: &str, params: &[(&str, &str)]) -> Arc<Device> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Device::create(handler, "d0", &params).unwrap()
    }

    #[test]
    fn usage_data_matches_each_cdb() {
        for c in &COMMANDS {
            assert_eq!(c.usage.len(), cdb_len_of(c.op), "{}", c.name);
            assert_eq!(c.usage[0], c.op, "{}", c.name);
            if let Some(sa) = c.sa {
                // The service action's bits are ones the device server reads.
                assert_eq!(c.usage[1] & 0x1f, 0x1f, "{}", c.name);
                assert!(sa <= 0x1f, "{}", c.name);
            }
            // The CONTROL byte: NACA is read (and refused).
            assert_eq!(c.usage[c.usage.len() - 1] & 0x04, 0x04, "{}", c.name);
            assert!(!c.name.is_empty());
        }
    }

    #[test]
    fn one_entry_per_opcode_and_service_action() {
        for (i, a) in COMMANDS.iter().enumerate() {
            for b in &COMMANDS[i + 1..] {
                assert!((a.op, a.sa) != (b.op, b.sa), "{} and {}", a.name, b.name);
                if a.op == b.op {
                    assert!(a.sa.is_some() && b.sa.is_some(), "{}", a.name);
                }
            }
        }
        // The index finds each entry by its CDB, and nothing for other opcodes.
        for c in &COMMANDS {
            let mut cdb = [0u8; 16];
            cdb[0] = c.op;
            cdb[1] = c.sa.unwrap_or(0);
            assert!(std::ptr::eq(lookup(&cdb).unwrap(), c), "{}", c.name);
        }
        let known = |op: u8| COMMANDS.iter().any(|c| c.op == op);
        for op in (0..=255u8).filter(|&op| !known(op)) {
            let mut cdb = [0u8; 16];
            cdb[0] = op;
            assert!(lookup(&cdb).is_none(), "{op:#x}");
        }
    }

    /// The (opcode, service action) pairs the dispatcher accepts for `dev`: every opcode
    /// with every service action it could carry.
    fn accepted(dev: &Device) -> Vec<(u8, u16)> {
        let mut v = Vec::new();
        for op in 0..=255u8 {
            for sa in 0..=0x1fu8 {
                let mut cdb = [0u8; 16];
                cdb[0] = op;
                cdb[1] = sa;
                let mut t = ScsiTask::new(&cdb[..cdb_len_of(op).max(6)], 0, 1);
                let known = plan(dev, &mut t, &test_nexus())
                    .map(|_| true)
                    .unwrap_or_else(|s| {
                        let code = (s.asc, s.ascq);
                        let unknown_sa = has_service_actions(op)
                            && code == sense::INVALID_FIELD_IN_CDB
                            && s.field_pointer == Some((true, 1, Some(4)));
                        s.key != sense::ILLEGAL_REQUEST
                            || !(code == sense::INVALID_COMMAND_OPERATION_CODE || unknown_sa)
                    });
                if known {
                    let sa = if has_service_actions(op) {
                        u16::from(sa)
                    } else {
                        0
                    };
                    if !v.contains(&(op, sa)) {
                        v.push((op, sa));
                    }
                }
            }
        }
        v
    }

    #[test]
    fn the_report_lists_exactly_what_the_dispatcher_accepts() {
        let disk = device("vdisk_ramio", &[("size_mb", "1")]);
        let thin = device(
            "vdisk_ramio",
            &[("size_mb", "1"), ("thin_provisioned", "1")],
        );
        let cd = device("vcdrom", &[]);
        for (what, dev) in [("disk", &disk), ("thin disk", &thin), ("cdrom", &cd)] {
            let listed = rsoc::listed(dev);
            assert!(!listed.is_empty(), "{what}");
            assert_eq!(listed, accepted(dev), "{what}");
        }
        // The three differ where the table says they do.
        let unmap = (sbc::opcode::UNMAP, 0);
        assert!(rsoc::listed(&thin).contains(&unmap));
        assert!(!rsoc::listed(&disk).contains(&unmap));
        assert!(rsoc::listed(&cd).contains(&(mmc::opcode::READ_TOC, 0)));
        assert!(!rsoc::listed(&disk).contains(&(mmc::opcode::READ_TOC, 0)));
    }

    #[test]
    fn unit_attentions_and_medium_follow_the_table() {
        let exempt: Vec<&str> = COMMANDS
            .iter()
            .filter(|c| !c.reports_ua)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            exempt,
            [
                "REQUEST SENSE",
                "INQUIRY",
                "GET CONFIGURATION",
                "GET EVENT STATUS NOTIFICATION",
                "REPORT LUNS"
            ]
        );
        // An empty CD drive: what works without a medium answers, the rest is NOT READY.
        let cd = device("vcdrom", &[]);
        for c in COMMANDS.iter().filter(|c| c.serves(&cd)) {
            let mut cdb = [0u8; 16];
            cdb[0] = c.op;
            cdb[1] = c.sa.unwrap_or(0);
            let mut t = ScsiTask::new(&cdb[..c.usage.len()], 0, 1);
            let not_ready =
                plan(&cd, &mut t, &test_nexus()).is_err_and(|s| s.key == sense::NOT_READY);
            assert_eq!(not_ready, !c.works_without_medium, "{}", c.name);
        }
    }

    #[test]
    fn plan_reports_a_reservation_conflict_after_the_unit_attention() {
        let d = device("vdisk_ramio", &[("size_mb", "1")]);
        let a = Nexus::new("iqn.2026-01.test:a", [0x40, 0, 0, 0, 0, 1], 1);
        let b = Nexus::new("iqn.2026-01.test:b", [0x40, 0, 0, 0, 0, 2], 1);
        d.register_nexus(1, &a);
        d.register_nexus(2, &b);
        let run = |n: &Nexus, id: u64, cdb: &[u8]| {
            let mut t = ScsiTask::new(cdb, 0, id);
            let p = plan(&d, &mut t, n);
            (p, t)
        };
        // A registers key 1 and reserves Exclusive Access; B and A have seen their UA.
        let mut param = [0u8; 24];
        param[15] = 1;
        let o = d.reservations().persistent_reserve_out(
            &a,
            &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0],
            &param,
        );
        assert_eq!(o.status, crate::scsi::pr::Status::Good);
        param[7] = 1;
        let mut t = ScsiTask::new(&[0x5f, 1, 0x03, 0, 0, 0, 0, 0, 24, 0], 0, 1);
        plan(&d, &mut t, &a).unwrap_err(); // A's power on UA
        plan(&d, &mut t, &a).unwrap();
        let mut buf = crate::env::DataBuf::alloc(24).unwrap();
        buf.write_at(0, &param);
        t.buf = Some(buf);
        assert_eq!(execute_reservation(&d, &mut t, &a), Some(Vec::new()));
        assert_eq!(t.status, 0);
        let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        // B's pending unit attention comes before the conflict...
        let (p, _) = run(&b, 2, &read);
        assert_eq!(p.unwrap_err().key, sense::UNIT_ATTENTION);
        // ...then its READ conflicts: no sense, nothing to move.
        let (p, t) = run(&b, 2, &read);
        assert_eq!(p, Ok(Plan::NONE));
        assert_eq!(t.status, crate::scsi::task::STATUS_RESERVATION_CONFLICT);
        assert_eq!(t.sense_len(), 0);
        assert!(t.cmd.is_none());
        // INQUIRY and TEST UNIT READY go through; the holder reads.
        let (p, t) = run(&b, 2, &[0x12, 0, 0, 0, 36, 0]);
        assert!(p.is_ok() && t.status == 0);
        let (p, t) = run(&b, 2, &[0, 0, 0, 0, 0, 0]);
        assert!(p.is_ok() && t.status == 0);
        let (p, t) = run(&a, 1, &read);
        assert_eq!(p.map(|p| p.len), Ok(512));
        assert_eq!(t.status, 0);
    }

    #[test]
    fn reserve_6_conflicts_for_other_nexuses_until_release() {
        let d = device("vdisk_ramio", &[("size_mb", "1")]);
        let a = Nexus::new("iqn.2026-01.test:a", [0x40, 0, 0, 0, 0, 1], 1);
        let b = Nexus::new("iqn.2026-01.test:b", [0x40, 0, 0, 0, 0, 2], 1);
        let exec = |n: &Nexus, cdb: &[u8]| {
            let mut t = ScsiTask::new(cdb, 0, 9);
            plan(&d, &mut t, n).unwrap();
            if t.status == 0 && execute_reservation(&d, &mut t, n).is_none() {
                crate::scsi::ScsiPort::new().execute(&d, &mut t);
            }
            t.status
        };
        assert_eq!(exec(&a, &[0x16, 0, 0, 0, 0, 0]), 0);
        assert_eq!(exec(&b, &[0, 0, 0, 0, 0, 0]), 0x18);
        assert_eq!(exec(&b, &[0x16, 0, 0, 0, 0, 0]), 0x18);
        // PERSISTENT RESERVE IN conflicts with a RESERVE, even for its holder.
        assert_eq!(exec(&a, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0]), 0x18);
        // RELEASE from another nexus is GOOD and changes nothing.
        assert_eq!(exec(&b, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0);
        assert_eq!(exec(&b, &[0, 0, 0, 0, 0, 0]), 0x18);
        assert_eq!(exec(&a, &[0x17, 0, 0, 0, 0, 0]), 0);
        assert_eq!(exec(&b, &[0, 0, 0, 0, 0, 0]), 0);
        // A session that ends takes its RESERVE with it (SPC-2 §5.5.1).
        d.register_nexus(3, &b);
        assert_eq!(exec(&b, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0);
        assert_eq!(exec(&a, &[0, 0, 0, 0, 0, 0]), 0x18);
        d.unregister_nexus(3);
        assert_eq!(exec(&a, &[0, 0, 0, 0, 0, 0]), 0);
    }
}

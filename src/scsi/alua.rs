//! Asymmetric logical unit access (SPC-4 §5.15), as SCST models it: a device group holds
//! logical units that share their access states, and target port groups whose target ports
//! (named by relative target port identifier) share one state for those logical units.
//!
//! The management tree owns the configuration. It hands each device an [`AluaGroup`] (the
//! groups, their ports and states, for INQUIRY, REPORT and SET TARGET PORT GROUPS) and each
//! LUN of a target in a target port group the group's [`PortGroupState`], which the
//! transport reads into [`ScsiTask::access_state`] (one atomic load) when it admits a
//! command. [`plan`](crate::scsi::plan) then refuses what the state excludes by the
//! command's [`Alua`] class, with no lock or lookup per command.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::scsi::cdb::be32;
use crate::scsi::command::Alua;
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{DataDir, Plan, ScsiTask};

/// A primary target port asymmetric access state (SPC-4 §5.15.2.4, the ASYMMETRIC ACCESS
/// STATE field of REPORT TARGET PORT GROUPS). LBA dependent (4h) is not supported, as in SCST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessState {
    ActiveOptimized = 0x0,
    ActiveNonOptimized = 0x1,
    Standby = 0x2,
    Unavailable = 0x3,
    Offline = 0xe,
    Transitioning = 0xf,
}

/// NOT READY additional sense codes of the inaccessible states (SPC-4 Annex D).
pub const NOT_ACCESSIBLE_TRANSITION: (u8, u8) = (0x04, 0x0a);
pub const NOT_ACCESSIBLE_STANDBY: (u8, u8) = (0x04, 0x0b);
pub const NOT_ACCESSIBLE_UNAVAILABLE: (u8, u8) = (0x04, 0x0c);
/// LOGICAL UNIT NOT READY, OFFLINE: an offline target port serves nothing (§5.15.2.4.7).
pub const NOT_READY_OFFLINE: (u8, u8) = (0x04, 0x12);
/// The unit attention of a change of state (SPC-4 §5.15.2.2, §5.15.2.3).
pub const ASYMMETRIC_ACCESS_STATE_CHANGED: (u8, u8) = (0x2a, 0x06);

/// STATUS CODE of a target port group descriptor (SPC-4 §6.36.2).
pub const STATUS_NONE: u8 = 0x00;
pub const STATUS_BY_STPG: u8 = 0x01;
pub const STATUS_IMPLICIT: u8 = 0x02;

/// The states a target port group descriptor says are supported: T_SUP, O_SUP, U_SUP,
/// S_SUP, AN_SUP, AO_SUP (no LBD_SUP).
const SUPPORTED_STATES: u8 = 0xcf;

impl AccessState {
    pub const ALL: [AccessState; 6] = [
        AccessState::ActiveOptimized,
        AccessState::ActiveNonOptimized,
        AccessState::Standby,
        AccessState::Unavailable,
        AccessState::Offline,
        AccessState::Transitioning,
    ];

    /// SCST's name for the state (`device_groups/DG/target_groups/TG/state`).
    pub fn name(self) -> &'static str {
        match self {
            AccessState::ActiveOptimized => "active",
            AccessState::ActiveNonOptimized => "nonoptimized",
            AccessState::Standby => "standby",
            AccessState::Unavailable => "unavailable",
            AccessState::Offline => "offline",
            AccessState::Transitioning => "transitioning",
        }
    }

    pub fn from_name(s: &str) -> Option<AccessState> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(c: u8) -> Option<AccessState> {
        Self::ALL.into_iter().find(|a| a.code() == c)
    }

    /// The NOT READY additional sense code a command of ALUA class `class` ends with in
    /// this state, or `None` when the state serves it (SPC-4 §5.15.2.4).
    pub fn refuses(self, class: Alua) -> Option<(u8, u8)> {
        let (least, asc) = match self {
            AccessState::ActiveOptimized | AccessState::ActiveNonOptimized => return None,
            AccessState::Standby => (Alua::Standby, NOT_ACCESSIBLE_STANDBY),
            AccessState::Unavailable => (Alua::Unavailable, NOT_ACCESSIBLE_UNAVAILABLE),
            AccessState::Transitioning => (Alua::Transitioning, NOT_ACCESSIBLE_TRANSITION),
            AccessState::Offline => return Some(NOT_READY_OFFLINE),
        };
        (class > least).then_some(asc)
    }
}

/// A target port group's state and the status code REPORT TARGET PORT GROUPS shows with
/// it, as one atomic: shared by the management tree, the LUN maps of its targets and the
/// devices' [`AluaGroup`]s, and changed by the tree or by SET TARGET PORT GROUPS.
#[derive(Debug)]
pub struct PortGroupState(AtomicU16);

impl PortGroupState {
    pub fn new(state: AccessState) -> Arc<PortGroupState> {
        Arc::new(PortGroupState(AtomicU16::new(u16::from(state.code()))))
    }

    pub fn state(&self) -> AccessState {
        let v = self.0.load(Ordering::Acquire);
        AccessState::from_code((v & 0xff) as u8).unwrap_or(AccessState::ActiveOptimized)
    }

    pub fn status(&self) -> u8 {
        (self.0.load(Ordering::Acquire) >> 8) as u8
    }

    /// Sets the state with the status code that says why; returns whether the state
    /// changed.
    pub fn set(&self, state: AccessState, status: u8) -> bool {
        let new = u16::from(status) << 8 | u16::from(state.code());
        let old = self.0.swap(new, Ordering::AcqRel);
        old & 0xff != new & 0xff
    }
}

/// One target port group as a logical unit reports it.
#[derive(Debug, Clone)]
pub struct TargetPortGroup {
    pub id: u16,
    pub preferred: bool,
    pub state: Arc<PortGroupState>,
    /// The relative target port identifiers of its ports.
    pub ports: Vec<u16>,
}

/// The ALUA configuration of the logical units of one device group.
#[derive(Debug, Default)]
pub struct AluaGroup {
    pub groups: Vec<TargetPortGroup>,
    /// The devices of the group, which hear of a state change.
    pub devices: Vec<Weak<Device>>,
}

impl AluaGroup {
    /// The group of the target port `rel_tgt_id`.
    pub fn group_of(&self, rel_tgt_id: u16) -> Option<&TargetPortGroup> {
        self.groups.iter().find(|g| g.ports.contains(&rel_tgt_id))
    }

    /// The parameter data of REPORT TARGET PORT GROUPS (SPC-4 §6.36), whole: the length-only
    /// header or, with `extended`, the extended header (implicit transition time 0).
    pub fn report(&self, extended: bool) -> Vec<u8> {
        let mut d = if extended {
            vec![0, 0, 0, 0, 0x10, 0, 0, 0]
        } else {
            vec![0; 4]
        };
        for g in &self.groups {
            let pref = if g.preferred { 0x80 } else { 0 };
            // The count is one byte: a group lists at most 255 ports.
            let ports = &g.ports[..g.ports.len().min(255)];
            d.push(pref | g.state.state().code());
            d.push(SUPPORTED_STATES);
            d.extend_from_slice(&g.id.to_be_bytes());
            d.extend_from_slice(&[0, g.state.status(), 0, ports.len() as u8]);
            for p in ports {
                d.extend_from_slice(&[0, 0]);
                d.extend_from_slice(&p.to_be_bytes());
            }
        }
        let len = u32::try_from(d.len() - 4).unwrap_or(u32::MAX);
        d[0..4].copy_from_slice(&len.to_be_bytes());
        d
    }

    /// The changes a SET TARGET PORT GROUPS parameter list asks for (SPC-4 §6.46): the
    /// index of each group and its new state, all checked before any is made.
    pub fn parse_set(&self, data: &[u8]) -> Result<Vec<(usize, AccessState)>, Sense> {
        let length_error =
            || Sense::new(sense::ILLEGAL_REQUEST, sense::PARAMETER_LIST_LENGTH_ERROR);
        let Some(descs) = data.get(4..) else {
            return Err(length_error());
        };
        if descs.len() % 4 != 0 {
            return Err(length_error());
        }
        let mut out = Vec::with_capacity(descs.len() / 4);
        for (i, d) in descs.chunks_exact(4).enumerate() {
            let at = (4 + i * 4) as u16;
            // Active/optimized, active/non-optimized, standby, unavailable and offline may
            // be asked for; transitioning and anything else may not.
            let state = AccessState::from_code(d[0] & 0x0f)
                .filter(|s| *s != AccessState::Transitioning)
                .ok_or_else(|| Sense::invalid_param_field(at))?;
            let id = u16::from_be_bytes([d[2], d[3]]);
            let g = self
                .groups
                .iter()
                .position(|g| g.id == id)
                .ok_or_else(|| Sense::invalid_param_field(at + 2))?;
            if out.iter().any(|(x, _)| *x == g) {
                // The same group twice: a combination that cannot be established.
                return Err(Sense::invalid_param_field(at + 2));
            }
            out.push((g, state));
        }
        Ok(out)
    }
}

/// A device's slot for its device group's [`AluaGroup`], set by the management tree.
#[derive(Debug, Default)]
pub struct LuAlua(Mutex<Option<Arc<AluaGroup>>>);

impl LuAlua {
    /// The device group's configuration, or `None` outside any device group.
    pub fn group(&self) -> Option<Arc<AluaGroup>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, g: Option<Arc<AluaGroup>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }
}

/// REPORT TARGET PORT GROUPS is served by devices in a device group (TPGS nonzero).
pub(in crate::scsi) fn implicit(dev: &Device) -> bool {
    dev.alua().group().is_some()
}

/// SET TARGET PORT GROUPS is served by devices of a device group with explicit ALUA on
/// (their `expl_alua` attribute, as in SCST).
pub(in crate::scsi) fn explicit(dev: &Device) -> bool {
    dev.expl_alua() && implicit(dev)
}

/// The TPGS field of standard INQUIRY data (byte 5, bits 5-4): none outside a device group,
/// implicit (01b), or implicit and explicit (11b).
pub(in crate::scsi) fn tpgs(dev: &Device) -> u8 {
    match (implicit(dev), dev.expl_alua()) {
        (false, _) => 0,
        (true, false) => 0x10,
        (true, true) => 0x30,
    }
}

/// REPORT TARGET PORT GROUPS: the PARAMETER DATA FORMAT (byte 1, bits 7-5) is 000b or 001b.
pub(in crate::scsi) fn decode_report(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    if task.cdb[1] >> 5 > 1 {
        return Err(Sense::invalid_cdb_field(1, Some(7)));
    }
    Ok(Plan::emulated_in(be32(&task.cdb[6..10])))
}

pub(in crate::scsi) fn report(dev: &Device, task: &mut ScsiTask) {
    let Some(g) = dev.alua().group() else {
        // Left its device group between decode and now.
        task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        ));
        return;
    };
    let d = g.report(task.cdb[1] >> 5 == 1);
    let alloc = be32(&task.cdb[6..10]) as usize;
    task.reply(&d[..d.len().min(alloc)]);
}

/// The longest SET TARGET PORT GROUPS parameter list taken: 1024 descriptors, far more
/// than a device group has target port groups. It bounds the buffer asked of the transport.
const MAX_SET_LEN: u32 = 4 + 4 * 1024;

/// SET TARGET PORT GROUPS: the parameter list arrives as Data-Out; none is no change.
pub(in crate::scsi) fn decode_set(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let len = be32(&task.cdb[6..10]);
    if len == 0 {
        return Ok(Plan::NONE);
    }
    if len > MAX_SET_LEN {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
    }
    Ok(Plan {
        dir: DataDir::Out,
        len,
    })
}

/// SET TARGET PORT GROUPS (SPC-4 §6.46): the groups named take their new states; when one
/// changes, every I_T nexus of the device group's logical units but the one that asked
/// hears ASYMMETRIC ACCESS STATE CHANGED (§5.15.2.3).
pub(in crate::scsi) fn set(dev: &Device, task: &mut ScsiTask) {
    let len = be32(&task.cdb[6..10]) as usize;
    if len == 0 {
        return;
    }
    let Some(g) = dev.alua().group().filter(|_| dev.expl_alua()) else {
        task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        ));
        return;
    };
    let mut data = vec![0u8; len];
    let got = task.buf.as_ref().map_or(0, |b| b.read_at(0, &mut data));
    data.truncate(got);
    let changes = match g.parse_set(&data) {
        Ok(c) => c,
        Err(s) => {
            task.fail(s);
            return;
        }
    };
    let mut changed = false;
    for (i, state) in changes {
        if let Some(tg) = g.groups.get(i) {
            changed |= tg.state.set(state, STATUS_BY_STPG);
        }
    }
    if changed {
        let (asc, ascq) = ASYMMETRIC_ACCESS_STATE_CHANGED;
        for d in g.devices.iter().filter_map(Weak::upgrade) {
            d.add_ua_others(task.nexus, asc, ascq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: u16, preferred: bool, state: AccessState, ports: &[u16]) -> TargetPortGroup {
        TargetPortGroup {
            id,
            preferred,
            state: PortGroupState::new(state),
            ports: ports.to_vec(),
        }
    }

    fn two_groups() -> AluaGroup {
        AluaGroup {
            groups: vec![
                group(1, true, AccessState::ActiveOptimized, &[1, 3]),
                group(2, false, AccessState::Standby, &[2]),
            ],
            devices: Vec::new(),
        }
    }

    #[test]
    fn report_encodes_both_formats() {
        let g = two_groups();
        g.groups[1].state.set(AccessState::Standby, STATUS_BY_STPG);
        let d = g.report(false);
        #[rustfmt::skip]
        let body = [
            0x80, 0xcf, 0, 1, 0, STATUS_NONE, 0, 2,
            0, 0, 0, 1,
            0, 0, 0, 3,
            0x02, 0xcf, 0, 2, 0, STATUS_BY_STPG, 0, 1,
            0, 0, 0, 2,
        ];
        assert_eq!(&d[0..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&d[4..], &body);
        let e = g.report(true);
        assert_eq!(&e[0..4], &(body.len() as u32 + 4).to_be_bytes());
        assert_eq!(&e[4..8], &[0x10, 0, 0, 0]);
        assert_eq!(&e[8..], &body);
        // Nothing but the header without groups.
        assert_eq!(AluaGroup::default().report(false), [0, 0, 0, 0]);
    }

    #[test]
    fn states_refuse_by_class() {
        use AccessState::*;
        for s in [ActiveOptimized, ActiveNonOptimized] {
            assert_eq!(s.refuses(Alua::Active), None);
        }
        assert_eq!(Standby.refuses(Alua::Active), Some((4, 0x0b)));
        assert_eq!(Standby.refuses(Alua::Standby), None);
        assert_eq!(Unavailable.refuses(Alua::Standby), Some((4, 0x0c)));
        assert_eq!(Unavailable.refuses(Alua::Unavailable), None);
        assert_eq!(Transitioning.refuses(Alua::Unavailable), Some((4, 0x0a)));
        assert_eq!(Transitioning.refuses(Alua::Transitioning), None);
        assert_eq!(Offline.refuses(Alua::Transitioning), Some((4, 0x12)));
        for s in AccessState::ALL {
            assert_eq!(AccessState::from_name(s.name()), Some(s));
            assert_eq!(AccessState::from_code(s.code()), Some(s));
        }
        assert_eq!(AccessState::from_name("optimized"), None);
    }

    #[test]
    fn set_lists_are_checked_whole() {
        let g = two_groups();
        assert_eq!(g.parse_set(&[0, 0, 0, 0]), Ok(vec![]));
        assert_eq!(
            g.parse_set(&[0, 0, 0, 0, 0x01, 0, 0, 1, 0x0e, 0, 0, 2]),
            Ok(vec![
                (0, AccessState::ActiveNonOptimized),
                (1, AccessState::Offline)
            ])
        );
        let len_err = Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
        assert_eq!(g.parse_set(&[0, 0]), len_err);
        assert_eq!(g.parse_set(&[0, 0, 0, 0, 1, 0]), len_err);
        // Transitioning, LBA dependent and an unknown group are refused, at their byte.
        assert_eq!(
            g.parse_set(&[0, 0, 0, 0, 0, 0, 0, 1, 0x0f, 0, 0, 2]),
            Err(Sense::invalid_param_field(8))
        );
        assert_eq!(
            g.parse_set(&[0, 0, 0, 0, 0x04, 0, 0, 1]),
            Err(Sense::invalid_param_field(4))
        );
        assert_eq!(
            g.parse_set(&[0, 0, 0, 0, 0, 0, 0, 9]),
            Err(Sense::invalid_param_field(6))
        );
        assert_eq!(
            g.parse_set(&[0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 1]),
            Err(Sense::invalid_param_field(10))
        );
    }

    #[test]
    fn plan_refuses_by_the_task_state() {
        let dev = Device::create("vdisk_ramio", "a0", &[("size_mb".into(), "1".into())]).unwrap();
        let run = |cdb: &[u8], state| {
            let mut t = ScsiTask::new(cdb, 0, 1);
            t.access_state = state;
            crate::scsi::plan(&dev, &mut t, &crate::scsi::pr::test_nexus()).err()
        };
        let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let inquiry = [0x12, 0, 0, 0, 36, 0];
        assert_eq!(run(&read, AccessState::ActiveNonOptimized), None);
        assert_eq!(
            run(&read, AccessState::Standby),
            Some(Sense::new(sense::NOT_READY, NOT_ACCESSIBLE_STANDBY))
        );
        assert_eq!(run(&inquiry, AccessState::Transitioning), None);
        assert_eq!(
            run(&inquiry, AccessState::Offline),
            Some(Sense::new(sense::NOT_READY, NOT_READY_OFFLINE))
        );
        // Outside a device group there is no REPORT TARGET PORT GROUPS to let through: a
        // service action MAINTENANCE IN does not have here (SPC-4: an invalid field).
        let rtpg = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(
            run(&rtpg, AccessState::ActiveOptimized),
            Some(Sense::invalid_cdb_field(1, Some(4)))
        );
        let listed = || crate::scsi::spc::rsoc::listed(&dev);
        let (report, set) = ((0xa3, 0x0a), (0xa4, 0x0a));
        assert!(!listed().contains(&report) && !listed().contains(&set));
        dev.set_attr("expl_alua", "1").unwrap();
        dev.alua().set(Some(Arc::new(two_groups())));
        assert_eq!(run(&rtpg, AccessState::Transitioning), None);
        assert!(listed().contains(&report) && listed().contains(&set));
        // Implicit only: no SET TARGET PORT GROUPS, in the report or the dispatcher.
        dev.set_attr("expl_alua", "0").unwrap();
        assert!(listed().contains(&report) && !listed().contains(&set));
        let stpg = [0xa4, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            run(&stpg, AccessState::ActiveOptimized),
            Some(Sense::new(
                sense::ILLEGAL_REQUEST,
                sense::INVALID_COMMAND_OPERATION_CODE
            ))
        );
    }

    #[test]
    fn state_changes_are_reported_once() {
        let s = PortGroupState::new(AccessState::ActiveOptimized);
        assert_eq!(s.status(), STATUS_NONE);
        assert!(s.set(AccessState::Standby, STATUS_IMPLICIT));
        assert!(!s.set(AccessState::Standby, STATUS_BY_STPG));
        assert_eq!(s.state(), AccessState::Standby);
        assert_eq!(s.status(), STATUS_BY_STPG);
    }
}

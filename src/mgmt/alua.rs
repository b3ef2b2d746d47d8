//! `device_groups/`: SCST's ALUA configuration (SPC-4 §5.15). A device group holds devices
//! that share their asymmetric access states, and target groups: each with a `group_id`
//! (the target port group of REPORT TARGET PORT GROUPS), `preferred`, a `state`, and its
//! targets, whose `rel_tgt_id` names their port. A target not on this system (another node's
//! port) may be added too, with a `rel_tgt_id` of its own. A device's own `expl_alua`
//! attribute (as in SCST) turns on SET TARGET PORT GROUPS for it.
//!
//! At each publication every device gets its group's [`AluaGroup`] and every LUN map entry
//! the [`PortGroupState`] of its target's group; a state change is an atomic store in the
//! shared state, seen by the next command.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{b01, invalid, parse01, valid_iscsi_name, Entry, Mgmt, MgmtError, State};
use crate::scsi::alua::{
    AccessState, AluaGroup, PortGroupState, TargetPortGroup, ASYMMETRIC_ACCESS_STATE_CHANGED,
    STATUS_IMPLICIT,
};
use crate::util::quote;

/// Every device group, by name.
#[derive(Default)]
pub(super) struct DeviceGroups(BTreeMap<String, DeviceGroup>);

#[derive(Default)]
struct DeviceGroup {
    devices: BTreeSet<String>,
    target_groups: BTreeMap<String, TargetGroup>,
}

struct TargetGroup {
    group_id: u16,
    preferred: bool,
    state: Arc<PortGroupState>,
    /// Member targets; the port id is the local target's, or the one given for a target of
    /// another system.
    targets: BTreeMap<String, Option<u16>>,
}

const DG_USAGE: &str =
    "Usage: echo \"create GROUP_NAME\" >mgmt\n       echo \"del GROUP_NAME\" >mgmt\n";
const DEVICES_USAGE: &str =
    "Usage: echo \"add DEVICE_NAME\" >mgmt\n       echo \"del DEVICE_NAME\" >mgmt\n";
const TG_USAGE: &str =
    "Usage: echo \"create TARGET_GROUP_NAME\" >mgmt\n       echo \"del TARGET_GROUP_NAME\" >mgmt\n";
const TARGETS_USAGE: &str =
    "Usage: echo \"add TARGET_NAME\" >mgmt\n       echo \"del TARGET_NAME\" >mgmt\n";

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n != "mgmt"
        && !n
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
}

fn state_names() -> String {
    AccessState::ALL.map(AccessState::name).join(", ")
}

impl DeviceGroups {
    /// The device group of device `name`.
    fn of_device(&self, name: &str) -> Option<(&String, &DeviceGroup)> {
        self.0.iter().find(|(_, g)| g.devices.contains(name))
    }

    /// A device deleted from the system leaves its device group.
    pub(super) fn forget_device(&mut self, name: &str) {
        for g in self.0.values_mut() {
            g.devices.remove(name);
        }
    }
}

/// The port id of member `name` of a target group.
fn port(st: &State, name: &str, given: Option<u16>) -> Option<u16> {
    st.targets.get(name).map(|t| t.rel_tgt_id).or(given)
}

/// The state of the target group that target `target` is in for device `device`.
pub(super) fn lun_state(st: &State, target: &str, device: &str) -> Option<Arc<PortGroupState>> {
    let (_, dg) = st.alua.of_device(device)?;
    dg.target_groups
        .values()
        .find(|tg| tg.targets.contains_key(target))
        .map(|tg| tg.state.clone())
}

/// Hands every device its device group's configuration (or none).
pub(super) fn publish(st: &State) {
    let mut seen = BTreeSet::new();
    for dg in st.alua.0.values() {
        let view = Arc::new(AluaGroup {
            groups: dg
                .target_groups
                .values()
                .map(|tg| TargetPortGroup {
                    id: tg.group_id,
                    preferred: tg.preferred,
                    state: tg.state.clone(),
                    ports: tg
                        .targets
                        .iter()
                        .filter_map(|(n, p)| port(st, n, *p))
                        .collect(),
                })
                .collect(),
            devices: dg
                .devices
                .iter()
                .filter_map(|d| st.devices.get(d))
                .map(Arc::downgrade)
                .collect(),
        });
        for d in dg.devices.iter().filter_map(|d| st.devices.get(d)) {
            d.alua().set(Some(view.clone()));
            seen.insert(d.name().to_string());
        }
    }
    for d in st.devices.values().filter(|d| !seen.contains(d.name())) {
        d.alua().set(None);
    }
}

/// ASYMMETRIC ACCESS STATE CHANGED for every I_T nexus of the devices of group `dg`.
fn state_changed(st: &State, dg: &DeviceGroup) {
    let (asc, ascq) = ASYMMETRIC_ACCESS_STATE_CHANGED;
    for d in dg.devices.iter().filter_map(|d| st.devices.get(d)) {
        d.add_ua_all(asc, ascq);
    }
}

/// `ls` below `device_groups`.
pub(super) fn list(st: &State, p: &[&str]) -> Option<Vec<Entry>> {
    let groups = &st.alua.0;
    Some(match p {
        ["device_groups"] => {
            let mut v = vec![Entry::mgmt()];
            v.extend(groups.keys().map(Entry::dir));
            v
        }
        ["device_groups", g] => {
            groups.get(*g)?;
            vec![Entry::dir("devices"), Entry::dir("target_groups")]
        }
        ["device_groups", g, "devices"] => {
            let mut v = vec![Entry::mgmt()];
            v.extend(groups.get(*g)?.devices.iter().map(Entry::link));
            v
        }
        ["device_groups", g, "target_groups"] => {
            let mut v = vec![Entry::mgmt()];
            v.extend(groups.get(*g)?.target_groups.keys().map(Entry::dir));
            v
        }
        ["device_groups", g, "target_groups", t] => {
            let tg = groups.get(*g)?.target_groups.get(*t)?;
            let mut v = vec![
                Entry::attr("group_id", true, true),
                Entry::mgmt(),
                Entry::attr("preferred", true, tg.preferred),
                Entry::attr(
                    "state",
                    true,
                    tg.state.state() != AccessState::ActiveOptimized,
                ),
            ];
            v.extend(tg.targets.keys().map(Entry::dir));
            v
        }
        ["device_groups", g, "target_groups", t, m] => {
            let tg = groups.get(*g)?.target_groups.get(*t)?;
            let given = tg.targets.get(*m)?;
            let remote = !st.targets.contains_key(*m);
            vec![Entry::attr("rel_tgt_id", remote, remote && given.is_some())]
        }
        _ => return None,
    })
}

/// `get` below `device_groups`: `None` when the path is not an attribute there.
pub(super) fn read(st: &State, p: &[&str]) -> Option<String> {
    let groups = &st.alua.0;
    Some(match p {
        ["device_groups", "mgmt"] => DG_USAGE.into(),
        ["device_groups", g, "devices", "mgmt"] => {
            groups.get(*g)?;
            DEVICES_USAGE.into()
        }
        ["device_groups", g, "devices", d] => {
            groups.get(*g)?.devices.get(*d)?;
            format!("../../../devices/{d}")
        }
        ["device_groups", g, "target_groups", "mgmt"] => {
            groups.get(*g)?;
            TG_USAGE.into()
        }
        ["device_groups", g, "target_groups", t, a] => {
            let tg = groups.get(*g)?.target_groups.get(*t)?;
            match *a {
                "group_id" => tg.group_id.to_string(),
                "preferred" => b01(tg.preferred),
                "state" => tg.state.state().name().into(),
                "mgmt" => TARGETS_USAGE.into(),
                _ => return None,
            }
        }
        ["device_groups", g, "target_groups", t, m, "rel_tgt_id"] => {
            let tg = groups.get(*g)?.target_groups.get(*t)?;
            let given = *tg.targets.get(*m)?;
            port(st, m, given).map_or_else(|| "0".into(), |p| p.to_string())
        }
        _ => return None,
    })
}

/// `set` below `device_groups`: `None` when the path is not a writable attribute there.
pub(super) fn write(
    st: &mut State,
    path: &str,
    p: &[&str],
    value: &str,
) -> Option<Result<(), MgmtError>> {
    let v = value.trim();
    let local = |st: &State, m: &str| st.targets.contains_key(m);
    let r = match p {
        ["device_groups", g, "target_groups", t, a @ ("group_id" | "preferred" | "state")] => {
            let dg = st.alua.0.get_mut(*g)?;
            let others: Vec<u16> = dg
                .target_groups
                .iter()
                .filter(|(n, _)| n != t)
                .map(|(_, x)| x.group_id)
                .collect();
            let tg = dg.target_groups.get_mut(*t)?;
            match *a {
                "group_id" => match v.parse::<u16>().ok().filter(|n| *n >= 1) {
                    None => Err(invalid(
                        path,
                        format!(
                            "group_id must be a number from 1 to 65535, not {}",
                            quote(v)
                        ),
                    )),
                    Some(n) if others.contains(&n) => Err(invalid(
                        path,
                        format!("group_id {n} is used by another target group of {g}"),
                    )),
                    Some(n) => {
                        tg.group_id = n;
                        Ok(())
                    }
                },
                "preferred" => parse01(path, v).map(|b| tg.preferred = b),
                _ => match AccessState::from_name(v) {
                    None => Err(invalid(
                        path,
                        format!("state must be one of {}, not {}", state_names(), quote(v)),
                    )),
                    Some(s) => {
                        if tg.state.set(s, STATUS_IMPLICIT) {
                            let dg = st.alua.0.get(*g)?;
                            state_changed(st, dg);
                        }
                        Ok(())
                    }
                },
            }
        }
        ["device_groups", g, "target_groups", t, m, "rel_tgt_id"] => {
            if local(st, m) {
                return Some(Err(invalid(
                    path,
                    format!("{m} is a target of this system: its rel_tgt_id is set at targets/iscsi/{m}/rel_tgt_id"),
                )));
            }
            let slot = st
                .alua
                .0
                .get_mut(*g)?
                .target_groups
                .get_mut(*t)?
                .targets
                .get_mut(*m)?;
            match v.parse::<u16>().ok().filter(|n| *n >= 1) {
                Some(n) => {
                    *slot = Some(n);
                    Ok(())
                }
                None => Err(invalid(
                    path,
                    format!(
                        "rel_tgt_id must be a number from 1 to 65535, not {}",
                        quote(v)
                    ),
                )),
            }
        }
        _ => return None,
    };
    Some(r)
}

/// A mgmt command below `device_groups`: `None` when `p` is no mgmt directory there.
pub(super) fn mgmt(
    st: &mut State,
    here: &str,
    p: &[&str],
    verb: &str,
    args: &[&str],
) -> Option<Result<(), MgmtError>> {
    let usage = |what: &str| Err(invalid(here, format!("usage: {verb} {what}")));
    let unknown = |allowed: &str| {
        Err(invalid(
            here,
            format!("unknown command {}: use {allowed}", quote(verb)),
        ))
    };
    let r = match p {
        ["device_groups"] => match (verb, args) {
            ("create", [g]) => {
                if !valid_name(g) {
                    Err(invalid(
                        here,
                        format!("{} is not a valid device group name (1 to 64 characters, no '/' or blanks)", quote(g)),
                    ))
                } else if st.alua.0.contains_key(*g) {
                    Err(invalid(here, format!("device group {g} already exists")))
                } else {
                    st.alua.0.insert(g.to_string(), DeviceGroup::default());
                    Ok(())
                }
            }
            ("del", [g]) => match st.alua.0.remove(*g) {
                None => Err(invalid(here, format!("no device group {g}"))),
                Some(dg) => {
                    state_changed(st, &dg);
                    Ok(())
                }
            },
            ("create" | "del", _) => usage("GROUP_NAME"),
            _ => unknown("create or del"),
        },
        ["device_groups", g, "devices"] => {
            st.alua.0.get(*g)?;
            match (verb, args) {
                ("add", [d]) => {
                    if !st.devices.contains_key(*d) {
                        Err(invalid(here, format!("no device {d}")))
                    } else if let Some((other, _)) = st.alua.of_device(d) {
                        Err(invalid(
                            here,
                            format!("device {d} is already in device group {other}"),
                        ))
                    } else {
                        st.alua.0.get_mut(*g)?.devices.insert(d.to_string());
                        if let Some(dev) = st.devices.get(*d) {
                            let (asc, ascq) = ASYMMETRIC_ACCESS_STATE_CHANGED;
                            dev.add_ua_all(asc, ascq);
                        }
                        Ok(())
                    }
                }
                ("del", [d]) => {
                    if st.alua.0.get_mut(*g)?.devices.remove(*d) {
                        if let Some(dev) = st.devices.get(*d) {
                            let (asc, ascq) = ASYMMETRIC_ACCESS_STATE_CHANGED;
                            dev.add_ua_all(asc, ascq);
                        }
                        Ok(())
                    } else {
                        Err(invalid(
                            here,
                            format!("device {d} is not in device group {g}"),
                        ))
                    }
                }
                ("add" | "del", _) => usage("DEVICE_NAME"),
                _ => unknown("add or del"),
            }
        }
        ["device_groups", g, "target_groups"] => {
            let dg = st.alua.0.get_mut(*g)?;
            match (verb, args) {
                ("create", [t]) => {
                    if !valid_name(t) {
                        Err(invalid(
                            here,
                            format!("{} is not a valid target group name (1 to 64 characters, no '/' or blanks)", quote(t)),
                        ))
                    } else if dg.target_groups.contains_key(*t) {
                        Err(invalid(here, format!("target group {t} already exists")))
                    } else {
                        let used: Vec<u16> =
                            dg.target_groups.values().map(|x| x.group_id).collect();
                        match (1..=u16::MAX).find(|n| !used.contains(n)) {
                            None => Err(invalid(here, "every group_id is in use")),
                            Some(id) => {
                                dg.target_groups.insert(
                                    t.to_string(),
                                    TargetGroup {
                                        group_id: id,
                                        preferred: false,
                                        state: PortGroupState::new(AccessState::ActiveOptimized),
                                        targets: BTreeMap::new(),
                                    },
                                );
                                Ok(())
                            }
                        }
                    }
                }
                ("del", [t]) => match dg.target_groups.remove(*t) {
                    None => Err(invalid(here, format!("no target group {t}"))),
                    Some(_) => {
                        let dg = st.alua.0.get(*g)?;
                        state_changed(st, dg);
                        Ok(())
                    }
                },
                ("create" | "del", _) => usage("TARGET_GROUP_NAME"),
                _ => unknown("create or del"),
            }
        }
        ["device_groups", g, "target_groups", t] => {
            let dg = st.alua.0.get_mut(*g)?;
            dg.target_groups.get(*t)?;
            let owner = |dg: &DeviceGroup, m: &str| {
                dg.target_groups
                    .iter()
                    .find(|(_, x)| x.targets.contains_key(m))
                    .map(|(n, _)| n.clone())
            };
            match (verb, args) {
                ("add", [m]) => {
                    if !valid_iscsi_name(m) {
                        Err(invalid(
                            here,
                            format!("{} is not an iSCSI name (iqn.YYYY-MM.domain[:id], eui.<16 hex>, naa.<16 or 32 hex>)", quote(m)),
                        ))
                    } else if let Some(o) = owner(dg, m) {
                        Err(invalid(
                            here,
                            format!("target {m} is already in target group {o} of {g}"),
                        ))
                    } else {
                        dg.target_groups
                            .get_mut(*t)?
                            .targets
                            .insert(m.to_string(), None);
                        let dg = st.alua.0.get(*g)?;
                        state_changed(st, dg);
                        Ok(())
                    }
                }
                ("del", [m]) => {
                    if dg.target_groups.get_mut(*t)?.targets.remove(*m).is_some() {
                        let dg = st.alua.0.get(*g)?;
                        state_changed(st, dg);
                        Ok(())
                    } else {
                        Err(invalid(
                            here,
                            format!("target {m} is not in target group {t}"),
                        ))
                    }
                }
                ("add" | "del", _) => usage("TARGET_NAME"),
                _ => unknown("add or del"),
            }
        }
        _ => return None,
    };
    Some(r)
}

/// `device_groups` of `save_config`.
pub(super) fn save(st: &State) -> Value {
    let mut out = Map::new();
    for (name, dg) in &st.alua.0 {
        let mut tgs = Map::new();
        for (t, tg) in &dg.target_groups {
            let mut members = Map::new();
            for (m, given) in &tg.targets {
                let mut o = Map::new();
                if let (false, Some(p)) = (st.targets.contains_key(m), given) {
                    o.insert("rel_tgt_id".into(), json!(p.to_string()));
                }
                members.insert(m.clone(), Value::Object(o));
            }
            tgs.insert(
                t.clone(),
                json!({
                    "group_id": tg.group_id.to_string(),
                    "preferred": b01(tg.preferred),
                    "state": tg.state.state().name(),
                    "targets": members,
                }),
            );
        }
        let mut o = Map::new();
        o.insert("devices".into(), json!(dg.devices));
        o.insert("target_groups".into(), Value::Object(tgs));
        out.insert(name.clone(), Value::Object(o));
    }
    Value::Object(out)
}

/// Applies the `device_groups` of a configuration through the tree's own commands.
pub(super) fn load(m: &Mgmt, v: &Value) -> Result<(), MgmtError> {
    const BASE: &str = "config/device_groups";
    let obj = |v: &Value, path: &str| {
        v.as_object()
            .cloned()
            .ok_or_else(|| invalid(path, "must be an object"))
    };
    let text = |v: &Value, path: &str| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(invalid(path, "value must be a string or a number")),
    };
    // Names go into mgmt commands: each must stay one word.
    let word = |s: &str, path: &str| {
        if s.is_empty() || s.contains(char::is_whitespace) {
            Err(invalid(path, format!("{} must be one word", quote(s))))
        } else {
            Ok(())
        }
    };
    for (g, gv) in obj(v, BASE)? {
        let path = format!("{BASE}/{g}");
        word(&g, &path)?;
        let go = obj(&gv, &path)?;
        m.mgmt("device_groups/mgmt", &format!("create {g}"))?;
        for (k, kv) in &go {
            match k.as_str() {
                "devices" => {
                    let list = kv
                        .as_array()
                        .ok_or_else(|| invalid(&path, "devices must be a list"))?;
                    for d in list {
                        let d = text(d, &path)?;
                        word(&d, &path)?;
                        m.mgmt(
                            &format!("device_groups/{g}/devices/mgmt"),
                            &format!("add {d}"),
                        )?;
                    }
                }
                "target_groups" => {
                    for (t, tv) in obj(kv, &path)? {
                        let tpath = format!("{path}/target_groups/{t}");
                        word(&t, &tpath)?;
                        let base = format!("device_groups/{g}/target_groups");
                        m.mgmt(&format!("{base}/mgmt"), &format!("create {t}"))?;
                        for (a, av) in obj(&tv, &tpath)? {
                            match a.as_str() {
                                "group_id" | "preferred" | "state" => {
                                    m.set(&format!("{base}/{t}/{a}"), &text(&av, &tpath)?)?
                                }
                                "targets" => {
                                    for (mem, mv) in obj(&av, &tpath)? {
                                        word(&mem, &tpath)?;
                                        m.mgmt(&format!("{base}/{t}/mgmt"), &format!("add {mem}"))?;
                                        if let Some(r) = obj(&mv, &tpath)?.get("rel_tgt_id") {
                                            m.set(
                                                &format!("{base}/{t}/{mem}/rel_tgt_id"),
                                                &text(r, &tpath)?,
                                            )?;
                                        }
                                    }
                                }
                                _ => {
                                    return Err(invalid(
                                        &tpath,
                                        format!("unknown key {}", quote(&a)),
                                    ))
                                }
                            }
                        }
                    }
                }
                _ => return Err(invalid(&path, format!("unknown key {}", quote(k)))),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{mgmt, setup, T};
    use crate::scsi::alua::STATUS_NONE;

    const DG: &str = "device_groups/dg";

    #[test]
    fn groups_are_validated() {
        let m = mgmt();
        setup(&m);
        let err = |path: &str, cmd: &str| m.mgmt(path, cmd).unwrap_err().to_string();
        assert!(err("device_groups", "create a/b").contains("not a valid"));
        assert!(err("device_groups", "make dg").contains("use create or del"));
        m.mgmt("device_groups/mgmt", "create dg").unwrap();
        assert!(err("device_groups", "create dg").contains("already exists"));
        assert!(err(&format!("{DG}/devices"), "add nope").contains("no device nope"));
        m.mgmt(&format!("{DG}/devices/mgmt"), "add r0").unwrap();
        m.mgmt("device_groups/mgmt", "create dg2").unwrap();
        assert!(err("device_groups/dg2/devices", "add r0").contains("already in device group dg"));
        let tgs = format!("{DG}/target_groups");
        m.mgmt(&format!("{tgs}/mgmt"), "create a").unwrap();
        m.mgmt(&format!("{tgs}/mgmt"), "create b").unwrap();
        // Group ids are given in order and stay unique.
        assert_eq!(m.get(&format!("{tgs}/a/group_id")).unwrap(), "1");
        assert_eq!(m.get(&format!("{tgs}/b/group_id")).unwrap(), "2");
        let set_err = |path: String, v: &str| m.set(&path, v).unwrap_err().to_string();
        assert!(set_err(format!("{tgs}/b/group_id"), "1").contains("used by another"));
        assert!(set_err(format!("{tgs}/b/group_id"), "0").contains("1 to 65535"));
        assert!(set_err(format!("{tgs}/b/group_id"), "65536").contains("1 to 65535"));
        assert!(set_err(format!("{tgs}/b/state"), "optimized").contains("active, nonoptimized"));
        assert!(set_err(format!("{tgs}/b/preferred"), "yes").contains("0 or 1"));
        assert!(set_err("devices/r0/expl_alua".into(), "2").contains("0 or 1"));
        m.set(&format!("{tgs}/b/group_id"), "7").unwrap();
        m.set(&format!("{tgs}/b/state"), "standby").unwrap();
        assert_eq!(m.get(&format!("{tgs}/b/state")).unwrap(), "standby");
        // Targets: an iSCSI name, in one target group of the device group.
        assert!(err(&format!("{tgs}/a"), "add nonsense").contains("not an iSCSI name"));
        m.mgmt(&format!("{tgs}/a/mgmt"), &format!("add {T}"))
            .unwrap();
        assert!(err(&format!("{tgs}/b"), &format!("add {T}")).contains("already in target group a"));
        assert_eq!(m.get(&format!("{tgs}/a/{T}/rel_tgt_id")).unwrap(), "1");
        assert!(set_err(format!("{tgs}/a/{T}/rel_tgt_id"), "5").contains("targets/iscsi/"));
        // Another system's target carries its own port id.
        let remote = "iqn.2026-11.org.example:other";
        m.mgmt(&format!("{tgs}/b/mgmt"), &format!("add {remote}"))
            .unwrap();
        assert_eq!(m.get(&format!("{tgs}/b/{remote}/rel_tgt_id")).unwrap(), "0");
        m.set(&format!("{tgs}/b/{remote}/rel_tgt_id"), "9").unwrap();
        assert!(err(&format!("{tgs}/b"), "del iqn.2026-11.org.example:none")
            .contains("not in target group"));
        // The device sees it all.
        let dev = m.lock().devices.get("r0").cloned().unwrap();
        let g = dev.alua().group().unwrap();
        assert!(!dev.expl_alua());
        assert_eq!(g.groups.len(), 2);
        assert_eq!(
            (g.groups[0].id, g.groups[0].ports.as_slice()),
            (1, &[1u16][..])
        );
        assert_eq!(
            (g.groups[1].id, g.groups[1].ports.as_slice()),
            (7, &[9u16][..])
        );
        assert_eq!(g.groups[0].state.status(), STATUS_NONE);
        let n0 = m.lock().devices.get("n0").cloned().unwrap();
        assert!(n0.alua().group().is_none());
        // Deleting a device takes it out of its group.
        m.mgmt(&format!("{DG}/devices/mgmt"), "del r0").unwrap();
        assert!(dev.alua().group().is_none());
    }

    #[test]
    fn configuration_round_trips() {
        let m = mgmt();
        setup(&m);
        let tgs = format!("{DG}/target_groups");
        m.mgmt("device_groups/mgmt", "create dg").unwrap();
        m.mgmt(&format!("{DG}/devices/mgmt"), "add r0").unwrap();
        m.set("devices/r0/expl_alua", "1").unwrap();
        m.mgmt(&format!("{tgs}/mgmt"), "create local").unwrap();
        m.mgmt(&format!("{tgs}/local/mgmt"), &format!("add {T}"))
            .unwrap();
        m.set(&format!("{tgs}/local/preferred"), "1").unwrap();
        m.mgmt(&format!("{tgs}/mgmt"), "create peer").unwrap();
        m.set(&format!("{tgs}/peer/group_id"), "300").unwrap();
        m.set(&format!("{tgs}/peer/state"), "unavailable").unwrap();
        m.mgmt(
            &format!("{tgs}/peer/mgmt"),
            "add iqn.2026-11.org.example:peer",
        )
        .unwrap();
        m.set(
            &format!("{tgs}/peer/iqn.2026-11.org.example:peer/rel_tgt_id"),
            "12",
        )
        .unwrap();
        let saved = m.save_config();
        let again = mgmt();
        again.load_config(&saved).unwrap();
        assert_eq!(again.save_config(), saved);
        assert_eq!(
            again.get(&format!("{tgs}/peer/state")).unwrap(),
            "unavailable"
        );
        assert_eq!(again.get(&format!("{tgs}/peer/group_id")).unwrap(), "300");
        assert_eq!(again.get("devices/r0/expl_alua").unwrap(), "1");
        assert_eq!(
            again
                .get(&format!(
                    "{tgs}/peer/iqn.2026-11.org.example:peer/rel_tgt_id"
                ))
                .unwrap(),
            "12"
        );
        // The LUN map of the target carries its group's state.
        let snap = again.publisher.current();
        let lun0 = snap.targets[T].lun(0).unwrap();
        assert!(lun0.alua.is_some());
        assert!(snap.targets[T].lun(5).unwrap().alua.is_none());
    }
}

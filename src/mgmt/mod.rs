//! The management tree: the iSCSI-SCST sysfs model (`/sys/kernel/scst_tgt`), its validation and
//! config save/load. Every change is made under one lock and then published to the reactors
//! as an immutable [`Snapshot`].
//!
//! Paths are relative and '/'-separated (`targets/iscsi/IQN/QueuedCommands`). Directories are
//! listed with `ls`, attributes read with `get` and written with `set`, and collections are
//! changed by writing SCST's text commands to a `mgmt` entry (`add_device NAME k=v; k=v`,
//! `add_target IQN`, `add DEVICE LUN read_only=1`, ...). Reading a `mgmt` entry gives its usage.
#![forbid(unsafe_code)]

mod alua;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::iscsi::chap::{self, Account};
use crate::iscsi::config::{GroupConfig, LunEntry, Publisher, Snapshot, TargetConfig};
use crate::iscsi::login::Auth;
use crate::iscsi::param::{self, TargetParams};
use crate::iscsi::registry::Registry;
use crate::scsi::device::{self, Device};
use crate::util::quote;

/// What went wrong with a management request; the message names the path and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum MgmtError {
    /// {0}: no such file or directory
    NotFound(String),
    /// {0} is a directory
    IsDir(String),
    /// {0} is not a directory
    NotDir(String),
    /// {0} is read-only
    ReadOnly(String),
    /// {path}: {msg}
    Invalid { path: String, msg: String },
    /// {path}: {msg}
    Busy { path: String, msg: String },
}

fn invalid(path: &str, msg: impl Into<String>) -> MgmtError {
    MgmtError::Invalid {
        path: path.to_string(),
        msg: msg.into(),
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub name: String,
    /// `dir`, `attr`, `mgmt` or `link`.
    pub kind: &'static str,
    pub writable: bool,
    /// SCST's `[key]` mark: the value differs from the default and is saved.
    pub key: bool,
}

impl Entry {
    fn dir(name: impl Into<String>) -> Entry {
        Entry {
            name: name.into(),
            kind: "dir",
            writable: false,
            key: false,
        }
    }
    fn attr(name: impl Into<String>, writable: bool, key: bool) -> Entry {
        Entry {
            name: name.into(),
            kind: "attr",
            writable,
            key,
        }
    }
    fn mgmt() -> Entry {
        Entry {
            name: "mgmt".into(),
            kind: "mgmt",
            writable: true,
            key: false,
        }
    }
    fn link(name: impl Into<String>) -> Entry {
        Entry {
            name: name.into(),
            kind: "link",
            writable: false,
            key: false,
        }
    }
}

/// A source of name/value pairs for the tree.
pub type StatsFn<T> = Box<dyn Fn() -> T + Send + Sync>;

/// Statistics other parts of the daemon contribute to the tree.
pub struct Hooks {
    /// One list of name/value pairs per reactor (`reactors/N/...`).
    pub reactors: StatsFn<Vec<Vec<(String, String)>>>,
    /// The buffer pool's statistics (`sgv/...`).
    pub sgv: StatsFn<Vec<(String, String)>>,
    /// Live counters of the portals (`targets/iscsi/connections`, ...).
    pub portals: StatsFn<Vec<(String, String)>>,
    /// The network (`net/...`).
    pub net: StatsFn<NetView>,
}

/// What the tree shows of the network under `net/`.
#[derive(Debug, Clone, Default)]
pub struct NetView {
    /// `net/KEY`: the stack, interface, addresses, settings.
    pub attrs: Vec<(String, String)>,
    /// `net/reactors/N/KEY`: packet, byte and drop counters, TCP retransmits.
    pub reactors: Vec<Vec<(String, String)>>,
    /// `net/connections/N/KEY`: each connection's TCP state and windows.
    pub connections: Vec<Vec<(String, String)>>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            reactors: Box::new(Vec::new),
            sgv: Box::new(Vec::new),
            portals: Box::new(Vec::new),
            net: Box::new(NetView::default),
        }
    }
}

/// Entry `n` (a decimal index from a path) of a numbered list of statistics.
fn nth(all: Vec<Vec<(String, String)>>, n: &str) -> Option<Vec<(String, String)>> {
    let i = n.parse::<usize>().ok()?;
    all.into_iter().nth(i)
}

/// Read-only attributes named after statistics.
fn attr_entries(stats: Vec<(String, String)>) -> Vec<Entry> {
    stats
        .into_iter()
        .map(|(k, _)| Entry::attr(k, false, false))
        .collect()
}

/// `net/reactors` or `net/connections`.
fn net_list(v: NetView, which: &str) -> Vec<Vec<(String, String)>> {
    if which == "reactors" {
        v.reactors
    } else {
        v.connections
    }
}

struct Lun {
    device: String,
    read_only: bool,
}

struct Target {
    tid: u32,
    rel_tgt_id: u16,
    enabled: bool,
    alias: String,
    params: TargetParams,
    luns: BTreeMap<u64, Lun>,
    auth: Auth,
    /// Initiator groups in creation order (the first that takes an initiator wins).
    groups: Vec<(String, Group)>,
    /// `redirect`: "ADDR[:PORT] temp|perm" as written, or empty.
    redirect: String,
    allowed_portals: Vec<String>,
}

#[derive(Default)]
struct Group {
    initiators: Vec<String>,
    luns: BTreeMap<u64, Lun>,
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, Arc<Device>>,
    iscsi_enabled: bool,
    /// CHAP accounts of discovery sessions.
    auth: Auth,
    targets: BTreeMap<String, Target>,
    next_tid: u32,
    /// `max_connections` and `max_connections_per_portal` (0: no limit of their own).
    max_connections: usize,
    max_connections_per_portal: usize,
    /// `device_groups/`: ALUA.
    alua: alua::DeviceGroups,
}

pub struct Mgmt {
    state: Mutex<State>,
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
    hooks: Hooks,
}

/// SCST's largest LUN number.
const MAX_LUN: u64 = 16383;

const TARGET_MGMT_USAGE: &str = "\
Usage: echo \"add_target target_name [parameters]\" >mgmt
       echo \"del_target target_name\" >mgmt
       echo \"add_attribute <attribute> <value>\" >mgmt
       echo \"del_attribute <attribute> <value>\" >mgmt
       echo \"add_target_attribute target_name <attribute> <value>\" >mgmt
       echo \"del_target_attribute target_name <attribute> <value>\" >mgmt
";

const LUNS_MGMT_USAGE: &str = "\
Usage: echo \"add H:C:I:L lun [parameters]\" >mgmt
       echo \"add VNAME lun [parameters]\" >mgmt
       echo \"del lun\" >mgmt
       echo \"replace H:C:I:L lun [parameters]\" >mgmt
       echo \"replace VNAME lun [parameters]\" >mgmt
       echo \"replace_no_ua VNAME lun [parameters]\" >mgmt
       echo \"clear\" >mgmt

where parameters are one or more param_name=value pairs separated by ';'
The following parameters available: read_only
";

fn split(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Attribute `a` of LUN `l` in a LUN set whose `luns` directory is `depth` levels below the
/// tree's root: `device` is a link to the device, `read_only` 0 or 1.
fn lun_attr(luns: &BTreeMap<u64, Lun>, l: &str, a: &str, depth: usize) -> Option<String> {
    let lun = luns.get(&l.parse::<u64>().ok()?)?;
    match a {
        "device" => Some(format!("{}devices/{}", "../".repeat(depth), lun.device)),
        "read_only" => Some(b01(lun.read_only)),
        _ => None,
    }
}

fn b01(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

fn parse01(path: &str, v: &str) -> Result<bool, MgmtError> {
    match v.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(invalid(
            path,
            format!("value must be 0 or 1, not {}", quote(v.trim())),
        )),
    }
}

/// SCST's `key=value; key=value` parameter grammar.
fn parse_params(path: &str, s: &str) -> Result<Vec<(String, String)>, MgmtError> {
    let mut out = Vec::new();
    for part in s.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').ok_or_else(|| {
            invalid(
                path,
                format!("parameter {} is not of the form name=value", quote(part)),
            )
        })?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(invalid(
                path,
                format!("parameter {} has no name", quote(part)),
            ));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// RFC 3720 §3.2.6 name forms: `iqn.YYYY-MM.reversed.domain[:anything]`, `eui.` + 16 hex
/// digits, `naa.` + 16 or 32 hex digits.
pub fn valid_iscsi_name(name: &str) -> bool {
    if name.len() > 223 || name.chars().any(|c| c.is_whitespace() || c == '/') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("iqn.") {
        let b = rest.as_bytes();
        b.len() > 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'.'
            && rest[8..].split(':').next().is_some_and(|d| !d.is_empty())
    } else if let Some(hex) = lower.strip_prefix("eui.") {
        hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit())
    } else if let Some(hex) = lower.strip_prefix("naa.") {
        (hex.len() == 16 || hex.len() == 32) && hex.chars().all(|c| c.is_ascii_hexdigit())
    } else {
        false
    }
}

impl Mgmt {
    pub fn new(publisher: Arc<Publisher>, registry: Arc<Registry>, hooks: Hooks) -> Arc<Mgmt> {
        let m = Arc::new(Mgmt {
            state: Mutex::new(State {
                next_tid: 1,
                ..Default::default()
            }),
            publisher,
            registry,
            hooks,
        });
        m.publish(&m.lock());
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the reactors' view of the tree and hands it over.
    fn publish(&self, st: &State) {
        let mut snap = Snapshot {
            iscsi_enabled: st.iscsi_enabled,
            discovery_auth: st.auth.clone(),
            max_connections: st.max_connections,
            max_connections_per_portal: st.max_connections_per_portal,
            ..Default::default()
        };
        alua::publish(st);
        let entries = |target: &str, luns: &BTreeMap<u64, Lun>| -> Vec<LunEntry> {
            luns.iter()
                .filter_map(|(&lun, l)| {
                    st.devices.get(&l.device).map(|d| LunEntry {
                        lun,
                        device: d.clone(),
                        read_only: l.read_only,
                        alua: alua::lun_state(st, target, &l.device),
                    })
                })
                .collect()
        };
        for (name, t) in &st.targets {
            let luns = entries(name, &t.luns);
            let groups = t
                .groups
                .iter()
                .map(|(g, grp)| GroupConfig {
                    name: g.clone(),
                    initiators: grp.initiators.clone(),
                    luns: entries(name, &grp.luns),
                })
                .collect();
            snap.targets.insert(
                name.clone(),
                Arc::new(TargetConfig {
                    name: name.clone(),
                    tid: t.tid,
                    rel_tgt_id: t.rel_tgt_id,
                    enabled: t.enabled,
                    alias: t.alias.clone(),
                    params: t.params.clone(),
                    auth: t.auth.clone(),
                    luns,
                    groups,
                    redirect: parse_redirect(&t.redirect).ok().flatten(),
                    allowed_portals: t.allowed_portals.clone(),
                }),
            );
        }
        self.publisher.publish(snap);
    }

    // ------------------------------------------------------------------ reading

    pub fn ls(&self, path: &str) -> Result<Vec<Entry>, MgmtError> {
        let st = self.lock();
        self.list(&st, path)
    }

    fn list(&self, st: &State, path: &str) -> Result<Vec<Entry>, MgmtError> {
        let p = split(path);
        let nf = || MgmtError::NotFound(path.to_string());
        if let Some(v) = alua::list(st, &p) {
            return Ok(v);
        }
        let entries = match p.as_slice() {
            [] => vec![
                Entry::dir("device_groups"),
                Entry::dir("devices"),
                Entry::dir("handlers"),
                Entry::dir("net"),
                Entry::dir("reactors"),
                Entry::dir("sgv"),
                Entry::dir("targets"),
                Entry::attr("threads", false, false),
                Entry::attr("version", false, false),
            ],
            ["handlers"] => device::HANDLERS.iter().map(|h| Entry::dir(*h)).collect(),
            ["handlers", h] if device::HANDLERS.contains(h) => {
                let mut v = vec![Entry::mgmt(), Entry::attr("type", false, false)];
                v.extend(
                    st.devices
                        .values()
                        .filter(|d| d.handler() == *h)
                        .map(|d| Entry::link(d.name())),
                );
                v
            }
            ["devices"] => st.devices.keys().map(Entry::dir).collect(),
            ["devices", d] => {
                let dev = st.devices.get(*d).ok_or_else(nf)?;
                let mut v: Vec<Entry> = dev
                    .attrs()
                    .into_iter()
                    .map(|a| Entry::attr(a.name, a.writable, dev.is_key_attr(a.name)))
                    .collect();
                v.push(Entry::dir("exported"));
                v.push(Entry::link("handler"));
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            }
            ["devices", d, "exported"] => {
                st.devices.get(*d).ok_or_else(nf)?;
                exports(st, d)
                    .into_iter()
                    .enumerate()
                    .map(|(i, _)| Entry::link(format!("export{i}")))
                    .collect()
            }
            ["sgv"] => attr_entries((self.hooks.sgv)()),
            ["net"] => {
                let mut v = attr_entries((self.hooks.net)().attrs);
                v.push(Entry::dir("connections"));
                v.push(Entry::dir("reactors"));
                v
            }
            ["net", which @ ("reactors" | "connections")] => {
                let n = net_list((self.hooks.net)(), which).len();
                (0..n).map(|i| Entry::dir(i.to_string())).collect()
            }
            ["net", which @ ("reactors" | "connections"), n] => {
                attr_entries(nth(net_list((self.hooks.net)(), which), n).ok_or_else(nf)?)
            }
            ["reactors"] => (0..(self.hooks.reactors)().len())
                .map(|i| Entry::dir(i.to_string()))
                .collect(),
            ["reactors", n] => attr_entries(nth((self.hooks.reactors)(), n).ok_or_else(nf)?),
            ["targets"] => vec![Entry::dir("iscsi")],
            ["targets", "iscsi"] => {
                let mut v = vec![
                    Entry::attr("enabled", true, st.iscsi_enabled),
                    Entry::mgmt(),
                    Entry::attr("open_state", false, false),
                    Entry::attr("version", false, false),
                    Entry::attr("max_connections", true, st.max_connections != 0),
                    Entry::attr(
                        "max_connections_per_portal",
                        true,
                        st.max_connections_per_portal != 0,
                    ),
                ];
                v.extend(
                    (self.hooks.portals)()
                        .into_iter()
                        .map(|(k, _)| Entry::attr(k, false, false)),
                );
                v.extend(auth_entries(&st.auth));
                v.extend(st.targets.keys().map(Entry::dir));
                v
            }
            ["targets", "iscsi", t] => {
                let tg = st.targets.get(*t).ok_or_else(nf)?;
                let mut v = vec![
                    Entry::attr("alias", true, !tg.alias.is_empty()),
                    Entry::attr("enabled", true, tg.enabled),
                    Entry::dir("ini_groups"),
                    Entry::dir("luns"),
                    Entry::attr("rel_tgt_id", true, true),
                    Entry::dir("sessions"),
                    Entry::attr("tid", false, false),
                ];
                v.extend(
                    param::NAMES
                        .iter()
                        .map(|n| Entry::attr(*n, true, tg.params.is_key(n))),
                );
                v.extend(auth_entries(&tg.auth));
                v.push(Entry::attr("redirect", true, !tg.redirect.is_empty()));
                v.extend(
                    (0..tg.allowed_portals.len())
                        .map(|i| Entry::attr(numbered("allowed_portal", i), false, true)),
                );
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            }
            ["targets", "iscsi", t, "luns"] => {
                let tg = st.targets.get(*t).ok_or_else(nf)?;
                let mut v = vec![Entry::mgmt()];
                v.extend(tg.luns.keys().map(|l| Entry::dir(l.to_string())));
                v
            }
            ["targets", "iscsi", t, "luns", l] => {
                let tg = st.targets.get(*t).ok_or_else(nf)?;
                let lun = tg
                    .luns
                    .get(&l.parse::<u64>().map_err(|_| nf())?)
                    .ok_or_else(nf)?;
                vec![
                    Entry::link("device"),
                    Entry::attr("read_only", false, lun.read_only),
                ]
            }
            ["targets", "iscsi", t, "ini_groups"] => {
                let tg = st.targets.get(*t).ok_or_else(nf)?;
                let mut v = vec![Entry::mgmt()];
                v.extend(tg.groups.iter().map(|(g, _)| Entry::dir(g)));
                v
            }
            ["targets", "iscsi", t, "ini_groups", g] => {
                group(st, t, g).ok_or_else(nf)?;
                vec![Entry::dir("initiators"), Entry::dir("luns")]
            }
            ["targets", "iscsi", t, "ini_groups", g, "initiators"] => {
                let grp = group(st, t, g).ok_or_else(nf)?;
                let mut v = vec![Entry::mgmt()];
                v.extend(grp.initiators.iter().map(|i| Entry::attr(i, false, false)));
                v
            }
            ["targets", "iscsi", t, "ini_groups", g, "luns"] => {
                let grp = group(st, t, g).ok_or_else(nf)?;
                let mut v = vec![Entry::mgmt()];
                v.extend(grp.luns.keys().map(|l| Entry::dir(l.to_string())));
                v
            }
            ["targets", "iscsi", t, "ini_groups", g, "luns", l] => {
                let grp = group(st, t, g).ok_or_else(nf)?;
                let lun = grp
                    .luns
                    .get(&l.parse::<u64>().map_err(|_| nf())?)
                    .ok_or_else(nf)?;
                vec![
                    Entry::link("device"),
                    Entry::attr("read_only", false, lun.read_only),
                ]
            }
            ["targets", "iscsi", t, "sessions"] => {
                st.targets.get(*t).ok_or_else(nf)?;
                self.registry
                    .sessions(t)
                    .into_iter()
                    .map(|(n, _)| Entry::dir(n))
                    .collect()
            }
            ["targets", "iscsi", t, "sessions", s] => {
                let info = self.session(t, s).ok_or_else(nf)?;
                let mut v: Vec<Entry> = [
                    "active_commands",
                    "commands",
                    "initiator_name",
                    "reinstating",
                    "sid",
                ]
                .iter()
                .map(|n| Entry::attr(*n, false, false))
                .collect();
                v.push(Entry::attr("force_close", true, false));
                v.extend(
                    info.params
                        .iter()
                        .map(|(k, _)| Entry::attr(k.clone(), false, false)),
                );
                let conns = info.connections.lock().unwrap_or_else(|e| e.into_inner());
                v.extend(conns.iter().map(|c| Entry::dir(c.ip.clone())));
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            }
            ["targets", "iscsi", t, "sessions", s, ip] => {
                let info = self.session(t, s).ok_or_else(nf)?;
                let conns = info.connections.lock().unwrap_or_else(|e| e.into_inner());
                conns.iter().find(|c| c.ip == *ip).ok_or_else(nf)?;
                ["cid", "ip", "state", "target_ip"]
                    .iter()
                    .map(|n| Entry::attr(*n, false, false))
                    .collect()
            }
            _ => {
                // An attribute is not a directory.
                if self.read_inner(st, path, false).is_ok() {
                    return Err(MgmtError::NotDir(path.to_string()));
                }
                return Err(nf());
            }
        };
        Ok(entries)
    }

    fn session(
        &self,
        target: &str,
        name: &str,
    ) -> Option<Arc<crate::iscsi::registry::SessionInfo>> {
        self.registry
            .sessions(target)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    pub fn get(&self, path: &str) -> Result<String, MgmtError> {
        // Statistics need no tree: they are read without waiting for the lock, so monitoring
        // goes on while a long change holds it.
        if let Some(v) = self.read_stats(path, &split(path)) {
            return v;
        }
        let st = self.lock();
        self.read(&st, path)
    }

    /// The attributes that other parts of the daemon supply (`threads`, `sgv/`, `reactors/`,
    /// the portals' counters), or `None` for a path of the tree.
    fn read_stats(&self, path: &str, p: &[&str]) -> Option<Result<String, MgmtError>> {
        let nf = || MgmtError::NotFound(path.to_string());
        let find = |list: Vec<(String, String)>, k: &str| {
            list.into_iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
                .ok_or_else(nf)
        };
        Some(match p {
            ["threads"] => Ok((self.hooks.reactors)().len().to_string()),
            ["sgv", k] => find((self.hooks.sgv)(), k),
            ["reactors", n, k] => match nth((self.hooks.reactors)(), n) {
                Some(r) => find(r, k),
                None => Err(nf()),
            },
            ["net", k] => find((self.hooks.net)().attrs, k),
            ["net", which @ ("reactors" | "connections"), n, k] => {
                match nth(net_list((self.hooks.net)(), which), n) {
                    Some(r) => find(r, k),
                    None => Err(nf()),
                }
            }
            ["targets", "iscsi", k] => {
                let v = (self.hooks.portals)()
                    .into_iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v)?;
                Ok(v)
            }
            _ => return None,
        })
    }

    fn read(&self, st: &State, path: &str) -> Result<String, MgmtError> {
        self.read_inner(st, path, true)
    }

    /// `dir_check`: whether a path that is no attribute is looked up as a directory (for the
    /// error message); `list` passes false so the two never recurse into each other.
    fn read_inner(&self, st: &State, path: &str, dir_check: bool) -> Result<String, MgmtError> {
        let p = split(path);
        if let Some(v) = self.read_stats(path, &p) {
            return v;
        }
        let nf = || MgmtError::NotFound(path.to_string());
        if let Some(v) = alua::read(st, &p) {
            return Ok(v);
        }
        let v = match p.as_slice() {
            ["version"] => format!("{}\n", env!("CARGO_PKG_VERSION")),
            ["handlers", h, "mgmt"] if device::HANDLERS.contains(h) => {
                let params = device::add_device_params(h).unwrap_or(&[]);
                format!(
                    "Usage: echo \"add_device device_name [parameters]\" >mgmt\n       echo \"del_device device_name\" >mgmt\n\nwhere parameters are one or more param_name=value pairs separated by ';'\n\nThe following parameters available: {}\n",
                    params.join(", ")
                )
            }
            ["handlers", h, "type"] if device::HANDLERS.contains(h) => {
                device::handler_type(h).into()
            }
            ["handlers", h, d] if device::HANDLERS.contains(h) => {
                let dev = st
                    .devices
                    .get(*d)
                    .filter(|x| x.handler() == *h)
                    .ok_or_else(nf)?;
                format!("../../devices/{}", dev.name())
            }
            ["devices", d, "handler"] => format!(
                "../../handlers/{}",
                st.devices.get(*d).ok_or_else(nf)?.handler()
            ),
            ["devices", d, "exported", e] => {
                let i: usize = e
                    .strip_prefix("export")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(nf)?;
                exports(st, d).get(i).cloned().ok_or_else(nf)?
            }
            ["devices", d, a] => st
                .devices
                .get(*d)
                .ok_or_else(nf)?
                .get_attr(a)
                .ok_or_else(nf)?,
            ["targets", "iscsi", "enabled"] => b01(st.iscsi_enabled),
            ["targets", "iscsi", "open_state"] => "open".into(),
            ["targets", "iscsi", "max_connections"] => st.max_connections.to_string(),
            ["targets", "iscsi", "max_connections_per_portal"] => {
                st.max_connections_per_portal.to_string()
            }
            ["targets", "iscsi", "version"] => format!("{}\n", env!("CARGO_PKG_VERSION")),
            ["targets", "iscsi", "mgmt"] => TARGET_MGMT_USAGE.into(),
            ["targets", "iscsi", a] if auth_attr(&st.auth, a).is_some() => {
                auth_attr(&st.auth, a).unwrap_or_default()
            }
            ["targets", "iscsi", t, a] if st.targets.contains_key(*t) => {
                let tg = &st.targets[*t];
                match *a {
                    "enabled" => b01(tg.enabled),
                    "tid" => tg.tid.to_string(),
                    "rel_tgt_id" => tg.rel_tgt_id.to_string(),
                    "alias" => tg.alias.clone(),
                    "redirect" => tg.redirect.clone(),
                    a if portal_attr(&tg.allowed_portals, a).is_some() => {
                        portal_attr(&tg.allowed_portals, a).unwrap_or_default()
                    }
                    _ => match auth_attr(&tg.auth, a) {
                        Some(v) => v,
                        None => tg.params.get(a).ok_or_else(nf)?,
                    },
                }
            }
            ["targets", "iscsi", t, "luns", "mgmt"] if st.targets.contains_key(*t) => {
                LUNS_MGMT_USAGE.into()
            }
            ["targets", "iscsi", t, "ini_groups", "mgmt"] if st.targets.contains_key(*t) => {
                "Usage: echo \"create GROUP_NAME\" >mgmt\n       echo \"del GROUP_NAME\" >mgmt\n"
                    .into()
            }
            ["targets", "iscsi", t, "ini_groups", g, "initiators", "mgmt"] => {
                group(st, t, g).ok_or_else(nf)?;
                "Usage: echo \"add INITIATOR_NAME\" >mgmt\n       echo \"del INITIATOR_NAME\" >mgmt\n       echo \"move INITIATOR_NAME DEST_GROUP_NAME\" >mgmt\n       echo \"clear\" >mgmt\n".into()
            }
            ["targets", "iscsi", t, "ini_groups", g, "initiators", i] => {
                let grp = group(st, t, g).ok_or_else(nf)?;
                grp.initiators
                    .iter()
                    .find(|x| x == i)
                    .cloned()
                    .ok_or_else(nf)?
            }
            ["targets", "iscsi", t, "ini_groups", g, "luns", "mgmt"] => {
                group(st, t, g).ok_or_else(nf)?;
                LUNS_MGMT_USAGE.into()
            }
            ["targets", "iscsi", t, "ini_groups", g, "luns", l, a] => {
                let grp = group(st, t, g).ok_or_else(nf)?;
                lun_attr(&grp.luns, l, a, 7).ok_or_else(nf)?
            }
            ["targets", "iscsi", t, "luns", l, a] => {
                let tg = st.targets.get(*t).ok_or_else(nf)?;
                lun_attr(&tg.luns, l, a, 5).ok_or_else(nf)?
            }
            ["targets", "iscsi", t, "sessions", s, a] => {
                let info = self.session(t, s).ok_or_else(nf)?;
                match *a {
                    "initiator_name" => info.initiator_name.clone(),
                    "sid" => format!("{:x}", info.sid),
                    "reinstating" => {
                        b01(info.reinstating.load(std::sync::atomic::Ordering::Relaxed))
                    }
                    "commands" => info.commands().to_string(),
                    "active_commands" => info.active_commands().to_string(),
                    "force_close" => {
                        return Err(invalid(
                            path,
                            "force_close is write-only: write 1 to close the session",
                        ))
                    }
                    _ => info
                        .params
                        .iter()
                        .find(|(k, _)| k == a)
                        .map(|(_, v)| v.clone())
                        .ok_or_else(nf)?,
                }
            }
            ["targets", "iscsi", t, "sessions", s, ip, a] => {
                let info = self.session(t, s).ok_or_else(nf)?;
                let conns = info.connections.lock().unwrap_or_else(|e| e.into_inner());
                let c = conns.iter().find(|c| c.ip == *ip).ok_or_else(nf)?;
                match *a {
                    "cid" => c.cid.to_string(),
                    "ip" => c.ip.clone(),
                    "target_ip" => c.target_ip.clone(),
                    "state" => c.state.clone(),
                    _ => return Err(nf()),
                }
            }
            _ => {
                return Err(if dir_check && self.list(st, path).is_ok() {
                    MgmtError::IsDir(path.to_string())
                } else {
                    nf()
                });
            }
        };
        Ok(v)
    }

    /// The subtree at `path` as nested JSON: directories are objects, attributes strings.
    pub fn tree(&self, path: &str) -> Result<Value, MgmtError> {
        let st = self.lock();
        self.subtree(&st, path, 0)
    }

    fn subtree(&self, st: &State, path: &str, depth: usize) -> Result<Value, MgmtError> {
        match self.list(st, path) {
            Ok(entries) => {
                let mut m = Map::new();
                for e in entries {
                    let child = if path.is_empty() {
                        e.name.clone()
                    } else {
                        format!("{}/{}", path.trim_end_matches('/'), e.name)
                    };
                    let v = match e.kind {
                        "dir" if depth < 16 => self.subtree(st, &child, depth + 1)?,
                        "mgmt" => continue,
                        _ => match self.read(st, &child) {
                            Ok(v) => Value::String(v.trim_end().to_string()),
                            Err(_) => continue,
                        },
                    };
                    m.insert(e.name, v);
                }
                Ok(Value::Object(m))
            }
            Err(MgmtError::NotDir(_)) => {
                Ok(Value::String(self.read(st, path)?.trim_end().to_string()))
            }
            Err(e) => Err(e),
        }
    }

    // ------------------------------------------------------------------ writing

    pub fn set(&self, path: &str, value: &str) -> Result<(), MgmtError> {
        if let ["devices", d, a] = split(path).as_slice() {
            return self.set_device_attr(path, d, a, value.trim_end_matches('\n'));
        }
        let mut st = self.lock();
        self.write(&mut st, path, value)?;
        self.publish(&st);
        Ok(())
    }

    /// Writes a device attribute with the device taken out of the tree's lock: opening,
    /// closing, resizing or syncing its backing may block on I/O (a file on a hung mount),
    /// and that must not stop every other request. The device itself serialises its own
    /// changes.
    fn set_device_attr(&self, path: &str, d: &str, a: &str, value: &str) -> Result<(), MgmtError> {
        let nf = || MgmtError::NotFound(path.to_string());
        let dev = self.lock().devices.get(d).cloned().ok_or_else(nf)?;
        if dev.get_attr(a).is_none() {
            return Err(nf());
        }
        dev.set_attr(a, value)
            .map_err(|e| invalid(path, e.to_string()))?;
        let st = self.lock();
        self.publish(&st);
        Ok(())
    }

    fn write(&self, st: &mut State, path: &str, value: &str) -> Result<(), MgmtError> {
        let p = split(path);
        let value = value.trim_end_matches('\n');
        let nf = || MgmtError::NotFound(path.to_string());
        if let Some(r) = alua::write(st, path, &p, value) {
            return r;
        }
        match p.as_slice() {
            ["targets", "iscsi", "enabled"] => st.iscsi_enabled = parse01(path, value)?,
            ["targets", "iscsi", a @ ("max_connections" | "max_connections_per_portal")] => {
                let n: usize = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| *n <= 1 << 20)
                    .ok_or_else(|| {
                        invalid(
                            path,
                            format!("{a} must be a number from 0 (no limit) to 1048576"),
                        )
                    })?;
                if *a == "max_connections" {
                    st.max_connections = n;
                } else {
                    st.max_connections_per_portal = n;
                }
            }
            ["targets", "iscsi", t, a] if st.targets.contains_key(*t) => {
                let in_use: Vec<u16> = st
                    .targets
                    .iter()
                    .filter(|(n, x)| n != t && x.enabled)
                    .map(|(_, x)| x.rel_tgt_id)
                    .collect();
                let tg = st.targets.get_mut(*t).ok_or_else(nf)?;
                match *a {
                    "enabled" => {
                        let on = parse01(path, value)?;
                        if on && in_use.contains(&tg.rel_tgt_id) {
                            return Err(invalid(
                                path,
                                format!(
                                    "rel_tgt_id {} is used by another enabled target",
                                    tg.rel_tgt_id
                                ),
                            ));
                        }
                        tg.enabled = on;
                    }
                    "rel_tgt_id" => {
                        let n: u16 =
                            value
                                .trim()
                                .parse()
                                .ok()
                                .filter(|n| *n >= 1)
                                .ok_or_else(|| {
                                    invalid(path, "rel_tgt_id must be a number from 1 to 65535")
                                })?;
                        if tg.enabled && in_use.contains(&n) {
                            return Err(invalid(
                                path,
                                format!("rel_tgt_id {n} is used by another enabled target"),
                            ));
                        }
                        tg.rel_tgt_id = n;
                    }
                    "redirect" => {
                        parse_redirect(value).map_err(|e| invalid(path, e))?;
                        tg.redirect = value.trim().to_string();
                    }
                    "alias" => {
                        if value.len() > 255 {
                            return Err(invalid(path, "alias must be at most 255 characters"));
                        }
                        tg.alias = value.trim().to_string();
                    }
                    "tid" => return Err(MgmtError::ReadOnly(path.to_string())),
                    _ => match tg.params.set(a, value) {
                        Ok(()) => {}
                        Err(param::ParamError::Unknown(_)) => return Err(nf()),
                        Err(e) => return Err(invalid(path, e.to_string())),
                    },
                }
            }
            ["targets", "iscsi", t, "sessions", s, "force_close"] => {
                let info = self.session(t, s).ok_or_else(nf)?;
                info.close_requested
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            _ => {
                return Err(match self.read(st, path) {
                    Ok(_) => MgmtError::ReadOnly(path.to_string()),
                    Err(MgmtError::IsDir(p)) => MgmtError::IsDir(p),
                    Err(_) => nf(),
                })
            }
        }
        Ok(())
    }

    /// Runs an SCST mgmt command. `path` names the `mgmt` entry or its directory.
    pub fn mgmt(&self, path: &str, command: &str) -> Result<(), MgmtError> {
        let mut p = split(path);
        if p.last() == Some(&"mgmt") {
            p.pop();
        }
        let words: Vec<&str> = command.split_whitespace().collect();
        let Some((&verb, args)) = words.split_first() else {
            return Err(invalid(path, "empty command"));
        };
        let joined = p.join("/");
        let here = format!("{joined}/mgmt");
        if let (["handlers", h], "add_device") = (p.as_slice(), verb) {
            if device::HANDLERS.contains(h) {
                return self.add_device(h, &here, args, command);
            }
        }
        // A device deleted below is dropped after the lock is released: closing its backing
        // may wait for I/O.
        let mut removed = None;
        let mut st = self.lock();
        if let Some(r) = alua::mgmt(&mut st, &here, &p, verb, args) {
            r?;
            self.publish(&st);
            return Ok(());
        }
        match p.as_slice() {
            ["handlers", h] if device::HANDLERS.contains(h) => match verb {
                "del_device" => {
                    let [name] = args else { return Err(invalid(&here, "usage: del_device NAME")) };
                    let dev = st.devices.get(*name).ok_or_else(|| invalid(&here, format!("no device {name}")))?;
                    if dev.handler() != *h {
                        return Err(invalid(&here, format!("device {name} belongs to {}", dev.handler())));
                    }
                    let ex = exports(&st, name);
                    if !ex.is_empty() {
                        return Err(MgmtError::Busy {
                            path: here,
                            msg: format!("device {name} is busy: exported as {}", ex.join(", ")),
                        });
                    }
                    removed = st.devices.remove(*name);
                    st.alua.forget_device(name);
                }
                _ => return Err(invalid(&here, format!("unknown command {}: use add_device or del_device", quote(verb)))),
            },
            ["targets", "iscsi"] => match verb {
                "add_target" => {
                    let name = args.first().ok_or_else(|| invalid(&here, "add_target needs a target name"))?;
                    if !valid_iscsi_name(name) {
                        return Err(invalid(
                            &here,
                            format!("{} is not an iSCSI name (iqn.YYYY-MM.domain[:id], eui.<16 hex>, naa.<16 or 32 hex>)", quote(name)),
                        ));
                    }
                    if st.targets.keys().any(|k| k.eq_ignore_ascii_case(name)) {
                        return Err(invalid(&here, format!("target {name} already exists")));
                    }
                    if args.len() > 1 {
                        return Err(invalid(&here, "add_target takes no parameters here"));
                    }
                    let tid = st.next_tid;
                    st.next_tid += 1;
                    let used: Vec<u16> = st.targets.values().map(|t| t.rel_tgt_id).collect();
                    let rel = (1..=u16::MAX).find(|r| !used.contains(r)).unwrap_or(1);
                    st.targets.insert(
                        name.to_string(),
                        Target {
                            tid,
                            rel_tgt_id: rel,
                            enabled: false,
                            alias: String::new(),
                            params: TargetParams::default(),
                            luns: BTreeMap::new(),
                            auth: Auth::default(),
                            groups: Vec::new(),
                            redirect: String::new(),
                            allowed_portals: Vec::new(),
                        },
                    );
                }
                "del_target" => {
                    let [name] = args else { return Err(invalid(&here, "usage: del_target NAME")) };
                    if st.targets.remove(*name).is_none() {
                        return Err(invalid(&here, format!("no target {name}")));
                    }
                    // Its sessions close when the reactors see it gone.
                    for (_, s) in self.registry.sessions(name) {
                        s.close_requested.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                "add_attribute" | "del_attribute" => {
                    auth_command(&mut st.auth, &here, verb.starts_with("add"), args)?;
                }
                "add_target_attribute" | "del_target_attribute" => {
                    let Some((t, rest)) = args.split_first() else {
                        return Err(invalid(&here, format!("usage: {verb} TARGET ATTRIBUTE VALUE")));
                    };
                    let tg = st.targets.get_mut(*t).ok_or_else(|| invalid(&here, format!("no target {t}")))?;
                    if rest.first() == Some(&"allowed_portal") {
                        portal_command(&mut tg.allowed_portals, &here, verb.starts_with("add"), &rest[1..])?;
                    } else {
                        auth_command(&mut tg.auth, &here, verb.starts_with("add"), rest)?;
                    }
                }
                _ => {
                    return Err(invalid(
                        &here,
                        format!("unknown command {}: use add_target, del_target, add_attribute, del_attribute, add_target_attribute or del_target_attribute", quote(verb)),
                    ))
                }
            },
            ["targets", "iscsi", t, "luns"] if st.targets.contains_key(*t) => self.luns_mgmt(&mut st, t, None, &here, verb, args, command)?,
            ["targets", "iscsi", t, "ini_groups"] if st.targets.contains_key(*t) => groups_mgmt(&mut st, t, &here, verb, args, &self.registry)?,
            ["targets", "iscsi", t, "ini_groups", g, "luns"] if has_group(&st, t, g) => self.luns_mgmt(&mut st, t, Some(g), &here, verb, args, command)?,
            ["targets", "iscsi", t, "ini_groups", g, "initiators"] if has_group(&st, t, g) => initiators_mgmt(&mut st, t, g, &here, verb, args)?,
            _ => return Err(MgmtError::NotFound(here)),
        }
        self.publish(&st);
        drop(st);
        drop(removed);
        Ok(())
    }

    /// `add_device NAME [k=v; ...]` on handler `h`. The device is created (its backing
    /// opened, a file created) without the tree's lock held, so that a slow or stuck open
    /// cannot stop every other request: the name is checked first, and again when the device
    /// goes into the tree, where of two racing adds of one name the later one fails cleanly
    /// (its device is dropped; a file it created stays, as the winner may be using it).
    fn add_device(
        &self,
        h: &str,
        here: &str,
        args: &[&str],
        command: &str,
    ) -> Result<(), MgmtError> {
        let name = *args
            .first()
            .ok_or_else(|| invalid(here, "add_device needs a device name"))?;
        let exists = || invalid(here, format!("device {} already exists", quote(name)));
        if self.lock().devices.contains_key(name) {
            return Err(exists());
        }
        // The parameters follow "add_device NAME": both are the command's first words.
        let rest =
            command.trim_start()["add_device".len()..].trim_start()[name.len()..].to_string();
        let params = parse_params(here, &rest)?;
        let dev = Device::create(h, name, &params).map_err(|e| invalid(here, e.to_string()))?;
        let mut st = self.lock();
        if st.devices.contains_key(name) {
            drop(st);
            return Err(exists());
        }
        st.devices.insert(name.to_string(), dev);
        self.publish(&st);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn luns_mgmt(
        &self,
        st: &mut State,
        t: &str,
        group: Option<&str>,
        here: &str,
        verb: &str,
        args: &[&str],
        command: &str,
    ) -> Result<(), MgmtError> {
        let parse_lun = |s: &str| -> Result<u64, MgmtError> {
            s.parse::<u64>()
                .ok()
                .filter(|l| *l <= MAX_LUN)
                .ok_or_else(|| {
                    invalid(
                        here,
                        format!("LUN {} must be a number from 0 to {MAX_LUN}", quote(s)),
                    )
                })
        };
        match verb {
            "add" | "replace" | "replace_no_ua" => {
                let (Some(dev), Some(lun)) = (args.first(), args.get(1)) else {
                    return Err(invalid(
                        here,
                        format!("usage: {verb} DEVICE LUN [read_only=1]"),
                    ));
                };
                let lun = parse_lun(lun)?;
                if !st.devices.contains_key(*dev) {
                    return Err(invalid(here, format!("no device {dev}")));
                }
                // Parameters come after "verb dev lun".
                let mut rest = command.trim_start();
                for w in [verb, dev, args[1]] {
                    rest = rest[rest.find(w).map_or(0, |i| i + w.len())..].trim_start();
                }
                let mut read_only = false;
                for (k, v) in parse_params(here, rest)? {
                    match k.as_str() {
                        "read_only" => read_only = parse01(here, &v)?,
                        _ => {
                            return Err(invalid(
                                here,
                                format!(
                                    "unknown parameter {}; the only one is read_only",
                                    quote(&k)
                                ),
                            ))
                        }
                    }
                }
                let map = lun_map(st, t, group, here)?;
                if verb == "add" && map.contains_key(&lun) {
                    return Err(invalid(here, format!("LUN {lun} already exists")));
                }
                let replaced = map.insert(
                    lun,
                    Lun {
                        device: dev.to_string(),
                        read_only,
                    },
                );
                if verb == "replace" && replaced.is_some() {
                    // SPC-4: INQUIRY DATA HAS CHANGED for the new device at that LUN.
                    if let Some(d) = st.devices.get(*dev) {
                        d.add_ua_all(0x3f, 0x03);
                    }
                }
            }
            "del" => {
                let [lun] = args else {
                    return Err(invalid(here, "usage: del LUN"));
                };
                let lun = parse_lun(lun)?;
                let map = lun_map(st, t, group, here)?;
                if map.remove(&lun).is_none() {
                    return Err(invalid(here, format!("no LUN {lun}")));
                }
            }
            "clear" => {
                let map = lun_map(st, t, group, here)?;
                map.clear();
            }
            _ => {
                return Err(invalid(
                    here,
                    format!(
                        "unknown command {}: use add, del, replace, replace_no_ua or clear",
                        quote(verb)
                    ),
                ))
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ config

    /// The running configuration, in the format [`load_config`](Mgmt::load_config) reads:
    /// devices with their creation parameters and changed attributes, then targets with their
    /// changed parameters, LUNs and enabled flags.
    pub fn save_config(&self) -> Value {
        let st = self.lock();
        let mut handlers = Map::new();
        for h in device::HANDLERS {
            let mut devs = Map::new();
            for d in st.devices.values().filter(|d| d.handler() == *h) {
                let mut o = Map::new();
                let attrs = d.attrs();
                for (k, v) in d.creation_params() {
                    // A writable attribute given at creation (t10_dev_id, filename, active,
                    // lb_per_pb_exp) is saved as it is now: `set` may have changed it since.
                    let now = attrs
                        .iter()
                        .any(|a| a.writable && a.name == k.as_str())
                        .then(|| d.get_attr(k))
                        .flatten();
                    o.insert(k.clone(), json!(now.unwrap_or_else(|| v.clone())));
                }
                for a in attrs {
                    if a.writable && d.is_key_attr(a.name) && !o.contains_key(a.name) {
                        o.insert(a.name.into(), json!(d.get_attr(a.name).unwrap_or_default()));
                    }
                }
                devs.insert(d.name().into(), Value::Object(o));
            }
            if !devs.is_empty() {
                handlers.insert((*h).into(), Value::Object(devs));
            }
        }
        let mut targets = Map::new();
        for (name, t) in &st.targets {
            let mut o = Map::new();
            o.insert("enabled".into(), json!(b01(t.enabled)));
            o.insert("rel_tgt_id".into(), json!(t.rel_tgt_id.to_string()));
            if !t.alias.is_empty() {
                o.insert("alias".into(), json!(t.alias));
            }
            if !t.redirect.is_empty() {
                o.insert("redirect".into(), json!(t.redirect));
            }
            if !t.allowed_portals.is_empty() {
                o.insert("allowed_portal".into(), json!(t.allowed_portals));
            }
            for n in param::NAMES {
                if t.params.is_key(n) {
                    o.insert((*n).into(), json!(t.params.get(n).unwrap_or_default()));
                }
            }
            let mut luns = Map::new();
            for (l, lun) in &t.luns {
                let mut lo = Map::new();
                lo.insert("device".into(), json!(lun.device));
                if lun.read_only {
                    lo.insert("read_only".into(), json!("1"));
                }
                luns.insert(l.to_string(), Value::Object(lo));
            }
            o.insert("luns".into(), Value::Object(luns));
            if !t.groups.is_empty() {
                let mut groups = Map::new();
                for (g, grp) in &t.groups {
                    let mut go = Map::new();
                    go.insert("initiators".into(), json!(grp.initiators));
                    go.insert("luns".into(), Value::Object(save_luns(&grp.luns)));
                    groups.insert(g.clone(), Value::Object(go));
                }
                o.insert("ini_groups".into(), Value::Object(groups));
            }
            save_auth(&t.auth, &mut o);
            targets.insert(name.clone(), Value::Object(o));
        }
        let mut iscsi = Map::new();
        iscsi.insert("enabled".into(), json!(b01(st.iscsi_enabled)));
        if st.max_connections != 0 {
            iscsi.insert(
                "max_connections".into(),
                json!(st.max_connections.to_string()),
            );
        }
        if st.max_connections_per_portal != 0 {
            iscsi.insert(
                "max_connections_per_portal".into(),
                json!(st.max_connections_per_portal.to_string()),
            );
        }
        save_auth(&st.auth, &mut iscsi);
        iscsi.insert("targets".into(), Value::Object(targets));
        let mut cfg = json!({
            "handlers": handlers,
            "targets": { "iscsi": iscsi }
        });
        let groups = alua::save(&st);
        if groups.as_object().is_some_and(|g| !g.is_empty()) {
            cfg["device_groups"] = groups;
        }
        cfg
    }

    fn load_luns(&self, v: &Value, path: &str, mgmt: &str) -> Result<(), MgmtError> {
        let s = |v: &Value| -> Result<String, MgmtError> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(invalid(path, "value must be a string or a number")),
            }
        };
        let luns = v
            .as_object()
            .ok_or_else(|| invalid(path, "luns must be an object"))?;
        for (l, lv) in luns {
            let lo = lv
                .as_object()
                .ok_or_else(|| invalid(path, "a LUN must be an object"))?;
            let dev = lo
                .get("device")
                .map(s)
                .transpose()?
                .ok_or_else(|| invalid(path, format!("LUN {l} names no device")))?;
            let ro = lo
                .get("read_only")
                .map(s)
                .transpose()?
                .unwrap_or_else(|| "0".into());
            command_text(path, "LUN", l, true)?;
            command_text(path, "device", &dev, true)?;
            command_text(path, "read_only", &ro, false)?;
            self.mgmt(mgmt, &format!("add {dev} {l} read_only={ro}"))?;
        }
        Ok(())
    }

    /// Applies a configuration in the [`save_config`](Mgmt::save_config) format on top of the
    /// running one, in SCST's order: devices, targets, LUNs, attributes, enable targets, then
    /// enable the driver. Stops at the first error, naming it.
    pub fn load_config(&self, cfg: &Value) -> Result<(), MgmtError> {
        let obj = cfg
            .as_object()
            .ok_or_else(|| invalid("config", "the configuration must be a JSON object"))?;
        for k in obj.keys() {
            if k != "handlers" && k != "targets" && k != "device_groups" {
                return Err(invalid(
                    "config",
                    format!(
                        "unknown section {}; sections are handlers, targets and device_groups",
                        quote(k)
                    ),
                ));
            }
        }
        let s = |v: &Value, path: &str| -> Result<String, MgmtError> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b01(*b)),
                _ => Err(invalid(path, "value must be a string or a number")),
            }
        };
        if let Some(h) = obj.get("handlers") {
            let h = h
                .as_object()
                .ok_or_else(|| invalid("config/handlers", "must be an object"))?;
            for (handler, devs) in h {
                let devs = devs.as_object().ok_or_else(|| {
                    invalid(&format!("config/handlers/{handler}"), "must be an object")
                })?;
                for (name, attrs) in devs {
                    let path = format!("config/handlers/{handler}/{name}");
                    let attrs = attrs
                        .as_object()
                        .ok_or_else(|| invalid(&path, "must be an object"))?;
                    let create: Vec<String> = device::add_device_params(handler)
                        .ok_or_else(|| invalid(&path, format!("unknown handler {handler}")))?
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                    command_text(&path, "device name", name, true)?;
                    let mut params = Vec::new();
                    let mut later = Vec::new();
                    for (k, v) in attrs {
                        if create.contains(k) {
                            let v = s(v, &path)?;
                            command_text(&path, k, &v, false)?;
                            params.push(format!("{k}={v}"));
                        } else {
                            later.push((k.clone(), s(v, &path)?));
                        }
                    }
                    self.mgmt(
                        &format!("handlers/{handler}/mgmt"),
                        &format!("add_device {name} {}", params.join("; ")),
                    )?;
                    for (k, v) in later {
                        self.set(&format!("devices/{name}/{k}"), &v)?;
                    }
                }
            }
        }
        let mut enable_driver = None;
        if let Some(t) = obj.get("targets") {
            let iscsi = t
                .as_object()
                .and_then(|o| o.get("iscsi"))
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    invalid("config/targets", "must be an object with an iscsi object")
                })?;
            let mut enable = Vec::new();
            for (k, v) in iscsi {
                match k.as_str() {
                    "enabled" => enable_driver = Some(s(v, "config/targets/iscsi/enabled")?),
                    "max_connections" | "max_connections_per_portal" => self.set(
                        &format!("targets/iscsi/{k}"),
                        &s(v, &format!("config/targets/iscsi/{k}"))?,
                    )?,
                    "IncomingUser" | "OutgoingUser" => {
                        for line in auth_lines(v, "config/targets/iscsi")? {
                            self.mgmt("targets/iscsi/mgmt", &format!("add_attribute {k} {line}"))?;
                        }
                    }
                    "targets" => {
                        let ts = v.as_object().ok_or_else(|| {
                            invalid("config/targets/iscsi/targets", "must be an object")
                        })?;
                        for (name, tv) in ts {
                            let path = format!("config/targets/iscsi/targets/{name}");
                            let to = tv
                                .as_object()
                                .ok_or_else(|| invalid(&path, "must be an object"))?;
                            self.mgmt("targets/iscsi/mgmt", &format!("add_target {name}"))?;
                            for (a, av) in to {
                                match a.as_str() {
                                    "luns" => self.load_luns(
                                        av,
                                        &path,
                                        &format!("targets/iscsi/{name}/luns/mgmt"),
                                    )?,
                                    "ini_groups" => {
                                        let groups = av.as_object().ok_or_else(|| {
                                            invalid(&path, "ini_groups must be an object")
                                        })?;
                                        for (g, gv) in groups {
                                            let go = gv.as_object().ok_or_else(|| {
                                                invalid(&path, "a group must be an object")
                                            })?;
                                            let base = format!("targets/iscsi/{name}/ini_groups");
                                            self.mgmt(
                                                &format!("{base}/mgmt"),
                                                &format!("create {g}"),
                                            )?;
                                            if let Some(ini) = go.get("initiators") {
                                                let list = ini.as_array().ok_or_else(|| {
                                                    invalid(&path, "initiators must be a list")
                                                })?;
                                                for i in list {
                                                    self.mgmt(
                                                        &format!("{base}/{g}/initiators/mgmt"),
                                                        &format!("add {}", s(i, &path)?),
                                                    )?;
                                                }
                                            }
                                            if let Some(l) = go.get("luns") {
                                                self.load_luns(
                                                    l,
                                                    &path,
                                                    &format!("{base}/{g}/luns/mgmt"),
                                                )?;
                                            }
                                        }
                                    }
                                    "enabled" => enable.push((name.clone(), s(av, &path)?)),
                                    "IncomingUser" | "OutgoingUser" | "allowed_portal" => {
                                        for line in auth_lines(av, &path)? {
                                            self.mgmt(
                                                "targets/iscsi/mgmt",
                                                &format!("add_target_attribute {name} {a} {line}"),
                                            )?;
                                        }
                                    }
                                    _ => self.set(
                                        &format!("targets/iscsi/{name}/{a}"),
                                        &s(av, &path)?,
                                    )?,
                                }
                            }
                        }
                    }
                    _ => {
                        return Err(invalid(
                            "config/targets/iscsi",
                            format!("unknown key {}", quote(k)),
                        ))
                    }
                }
            }
            // ALUA before any target opens: the first command sees its state.
            if let Some(g) = obj.get("device_groups") {
                alua::load(self, g)?;
            }
            for (name, v) in enable {
                self.set(&format!("targets/iscsi/{name}/enabled"), &v)?;
            }
        } else if let Some(g) = obj.get("device_groups") {
            alua::load(self, g)?;
        }
        if let Some(v) = enable_driver {
            self.set("targets/iscsi/enabled", &v)?;
        }
        Ok(())
    }
}

/// A name or value of a configuration that `load_config` writes into a mgmt command must come
/// out of that command as it went in: a `word` (a name, a LUN) without blanks, which separate
/// words, and a parameter value without ';', which separates parameters. Otherwise its rest
/// would be read as more of the command (`"r0 blocksize=4096"` as a device name would create
/// `r0` with another block size).
fn command_text(path: &str, what: &str, v: &str, word: bool) -> Result<(), MgmtError> {
    let (bad, rule) = if word {
        (v.is_empty() || v.contains(char::is_whitespace), "one word")
    } else {
        (v.contains(';'), "without ';'")
    };
    if bad {
        return Err(invalid(
            path,
            format!("{what} {} must be {rule}", crate::util::quote(v)),
        ));
    }
    Ok(())
}

/// The LUNs exporting device `name`, as tree paths.
fn exports(st: &State, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (t, tg) in &st.targets {
        for (l, lun) in &tg.luns {
            if lun.device == name {
                out.push(format!("../../../targets/iscsi/{t}/luns/{l}"));
            }
        }
        for (g, grp) in &tg.groups {
            for (l, lun) in &grp.luns {
                if lun.device == name {
                    out.push(format!(
                        "../../../targets/iscsi/{t}/ini_groups/{g}/luns/{l}"
                    ));
                }
            }
        }
    }
    out
}

fn group<'a>(st: &'a State, t: &str, g: &str) -> Option<&'a Group> {
    st.targets
        .get(t)?
        .groups
        .iter()
        .find(|(n, _)| n == g)
        .map(|(_, grp)| grp)
}

fn has_group(st: &State, t: &str, g: &str) -> bool {
    st.targets
        .get(t)
        .is_some_and(|tg| tg.groups.iter().any(|(n, _)| n == g))
}

fn lun_map<'a>(
    st: &'a mut State,
    t: &str,
    group: Option<&str>,
    here: &str,
) -> Result<&'a mut BTreeMap<u64, Lun>, MgmtError> {
    let nf = || MgmtError::NotFound(here.to_string());
    let tg = st.targets.get_mut(t).ok_or_else(nf)?;
    match group {
        None => Ok(&mut tg.luns),
        Some(g) => tg
            .groups
            .iter_mut()
            .find(|(n, _)| n == g)
            .map(|(_, grp)| &mut grp.luns)
            .ok_or_else(nf),
    }
}

/// `ini_groups/mgmt`: `create GROUP`, `del GROUP` (refused while sessions of the group's
/// initiators are logged in, as SCST does).
fn groups_mgmt(
    st: &mut State,
    t: &str,
    here: &str,
    verb: &str,
    args: &[&str],
    registry: &Registry,
) -> Result<(), MgmtError> {
    let tg = st
        .targets
        .get_mut(t)
        .ok_or_else(|| MgmtError::NotFound(here.to_string()))?;
    match (verb, args) {
        ("create", [g]) => {
            if g.is_empty() || g.len() > 64 || g.contains('/') || *g == "mgmt" {
                return Err(invalid(
                    here,
                    format!("{} is not a valid group name", quote(g)),
                ));
            }
            if tg.groups.iter().any(|(n, _)| n == g) {
                return Err(invalid(here, format!("group {g} already exists")));
            }
            tg.groups.push((g.to_string(), Group::default()));
        }
        ("del", [g]) => {
            let i = tg
                .groups
                .iter()
                .position(|(n, _)| n == g)
                .ok_or_else(|| invalid(here, format!("no group {g}")))?;
            let cfg = GroupConfig {
                name: g.to_string(),
                initiators: tg.groups[i].1.initiators.clone(),
                luns: Vec::new(),
            };
            let busy: Vec<String> = registry
                .sessions(t)
                .into_iter()
                .filter(|(_, s)| cfg.takes(&s.initiator_name))
                .map(|(n, _)| n)
                .collect();
            if !busy.is_empty() {
                return Err(MgmtError::Busy {
                    path: here.to_string(),
                    msg: format!("group {g} is in use by sessions {}", busy.join(", ")),
                });
            }
            tg.groups.remove(i);
        }
        ("create" | "del", _) => return Err(invalid(here, format!("usage: {verb} GROUP"))),
        _ => {
            return Err(invalid(
                here,
                format!("unknown command {}: use create or del", quote(verb)),
            ))
        }
    }
    Ok(())
}

/// `ini_groups/G/initiators/mgmt`: `add NAME`, `del NAME`, `move NAME GROUP`, `clear`. Names
/// may use `*` and `?`, and a leading `!` excludes. One name lives in one group of a target.
fn initiators_mgmt(
    st: &mut State,
    t: &str,
    g: &str,
    here: &str,
    verb: &str,
    args: &[&str],
) -> Result<(), MgmtError> {
    let tg = st
        .targets
        .get_mut(t)
        .ok_or_else(|| MgmtError::NotFound(here.to_string()))?;
    let valid = |n: &str| {
        let bare = n.strip_prefix('!').unwrap_or(n);
        !bare.is_empty()
            && bare.len() <= 255
            && !bare.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    let owner = |tg: &Target, n: &str| {
        tg.groups
            .iter()
            .find(|(_, grp)| grp.initiators.iter().any(|x| x == n))
            .map(|(name, _)| name.clone())
    };
    let idx = |tg: &Target, g: &str| tg.groups.iter().position(|(n, _)| n == g);
    let gi = idx(tg, g).ok_or_else(|| MgmtError::NotFound(here.to_string()))?;
    match (verb, args) {
        ("add", [n]) => {
            if !valid(n) {
                return Err(invalid(
                    here,
                    format!("{} is not an initiator name or pattern", quote(n)),
                ));
            }
            if let Some(o) = owner(tg, n) {
                return Err(invalid(
                    here,
                    format!("initiator {n} is already in group {o}"),
                ));
            }
            tg.groups[gi].1.initiators.push(n.to_string());
        }
        ("del", [n]) => {
            let list = &mut tg.groups[gi].1.initiators;
            let before = list.len();
            list.retain(|x| x != n);
            if list.len() == before {
                return Err(invalid(here, format!("no initiator {n} in group {g}")));
            }
        }
        ("move", [n, dest]) => {
            let di = idx(tg, dest).ok_or_else(|| invalid(here, format!("no group {dest}")))?;
            let list = &mut tg.groups[gi].1.initiators;
            let before = list.len();
            list.retain(|x| x != n);
            if list.len() == before {
                return Err(invalid(here, format!("no initiator {n} in group {g}")));
            }
            tg.groups[di].1.initiators.push(n.to_string());
        }
        ("clear", []) => tg.groups[gi].1.initiators.clear(),
        ("add" | "del", _) => return Err(invalid(here, format!("usage: {verb} INITIATOR"))),
        ("move", _) => return Err(invalid(here, "usage: move INITIATOR GROUP")),
        ("clear", _) => return Err(invalid(here, "usage: clear")),
        _ => {
            return Err(invalid(
                here,
                format!(
                    "unknown command {}: use add, del, move or clear",
                    quote(verb)
                ),
            ))
        }
    }
    Ok(())
}

/// The tree entries of a CHAP account list: `IncomingUser`, `IncomingUser1`, ... and
/// `OutgoingUser` (SCST's names), read-only (changed through `mgmt`).
fn auth_entries(a: &Auth) -> Vec<Entry> {
    let mut v: Vec<Entry> = (0..a.incoming.len())
        .map(|i| Entry::attr(incoming_name(i), false, true))
        .collect();
    if a.outgoing.is_some() {
        v.push(Entry::attr("OutgoingUser", false, true));
    }
    v
}

fn numbered(base: &str, i: usize) -> String {
    if i == 0 {
        base.to_string()
    } else {
        format!("{base}{i}")
    }
}

fn portal_attr(list: &[String], name: &str) -> Option<String> {
    let i = match name.strip_prefix("allowed_portal")? {
        "" => 0,
        n => n.parse().ok().filter(|&i: &usize| i > 0)?,
    };
    list.get(i).cloned()
}

/// `add_target_attribute T allowed_portal PATTERN` / `del_target_attribute T allowed_portal
/// PATTERN`.
fn portal_command(
    list: &mut Vec<String>,
    here: &str,
    add: bool,
    args: &[&str],
) -> Result<(), MgmtError> {
    let [pattern] = args else {
        return Err(invalid(
            here,
            "usage: add_target_attribute TARGET allowed_portal PATTERN",
        ));
    };
    let bare = pattern.strip_prefix('!').unwrap_or(pattern);
    if bare.is_empty()
        || !bare
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '*' | '?' | '%'))
    {
        return Err(invalid(
            here,
            format!(
                "allowed_portal {} is not an address pattern (digits, '.', ':', '*', '?')",
                quote(pattern)
            ),
        ));
    }
    if add {
        if list.iter().any(|p| p == pattern) {
            return Err(invalid(
                here,
                format!("allowed_portal {pattern} already exists"),
            ));
        }
        list.push(pattern.to_string());
    } else {
        let before = list.len();
        list.retain(|p| p != pattern);
        if list.len() == before {
            return Err(invalid(here, format!("no allowed_portal {pattern}")));
        }
    }
    Ok(())
}

/// `redirect`: "" (off) or "ADDR[:PORT] temp|perm" (SCST's syntax; IPv6 in brackets). Gives
/// the TargetAddress to send and whether the redirection is permanent.
fn parse_redirect(v: &str) -> Result<Option<(String, bool)>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let words: Vec<&str> = v.split_whitespace().collect();
    let (addr, kind) = match words.as_slice() {
        [a] => (*a, "temp"),
        [a, k] => (*a, *k),
        _ => return Err("redirect is \"ADDRESS[:PORT] temp|perm\" or empty".into()),
    };
    let permanent = match kind {
        "temp" => false,
        "perm" => true,
        _ => {
            return Err(format!(
                "redirect kind {} must be temp or perm",
                quote(kind)
            ))
        }
    };
    let with_port = if addr.parse::<std::net::SocketAddr>().is_ok() {
        addr.to_string()
    } else if addr.parse::<std::net::Ipv4Addr>().is_ok() {
        format!("{addr}:3260")
    } else if let Some(inner) = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        inner
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{} is not an IPv6 address", quote(addr)))?;
        format!("{addr}:3260")
    } else {
        return Err(format!(
            "{} is not an IP address with an optional port",
            quote(addr)
        ));
    };
    Ok(Some((format!("{with_port},1"), permanent)))
}

fn incoming_name(i: usize) -> String {
    if i == 0 {
        "IncomingUser".into()
    } else {
        format!("IncomingUser{i}")
    }
}

/// The value of a CHAP attribute as `get` and `tree` show it: the user name only. Secrets
/// leave the daemon only through `save_config`.
fn auth_attr(a: &Auth, name: &str) -> Option<String> {
    if name == "OutgoingUser" {
        return a.outgoing.as_ref().map(|o| o.user.clone());
    }
    let i = match name.strip_prefix("IncomingUser")? {
        "" => 0,
        n => n.parse().ok().filter(|&i: &usize| i > 0)?,
    };
    a.incoming.get(i).map(|x| x.user.clone())
}

/// `add_attribute IncomingUser USER SECRET`, `del_attribute IncomingUser USER [SECRET]` and
/// the same for OutgoingUser (one account at most), on the driver or on one target. A delete
/// takes the secret too, as scstadmin sends back the value it read (`USER SECRET`); given,
/// it must be the account's.
fn auth_command(auth: &mut Auth, here: &str, add: bool, args: &[&str]) -> Result<(), MgmtError> {
    let Some((&attr, rest)) = args.split_first() else {
        return Err(invalid(
            here,
            "name an attribute: IncomingUser or OutgoingUser",
        ));
    };
    if !matches!(attr, "IncomingUser" | "OutgoingUser") {
        return Err(invalid(
            here,
            format!(
                "attribute {} is not supported here; use IncomingUser or OutgoingUser",
                quote(attr)
            ),
        ));
    }
    if add {
        let [user, secret] = rest else {
            return Err(invalid(
                here,
                format!("usage: add_attribute {attr} USER SECRET"),
            ));
        };
        chap::validate_account(user, secret).map_err(|e| invalid(here, e))?;
        let acct = Account {
            user: (*user).to_string(),
            secret: (*secret).to_string(),
        };
        if attr == "OutgoingUser" {
            if auth.outgoing.is_some() {
                return Err(invalid(
                    here,
                    "OutgoingUser is already set; delete it first",
                ));
            }
            auth.outgoing = Some(acct);
        } else {
            if auth.incoming.iter().any(|a| a.user == *user) {
                return Err(invalid(here, format!("IncomingUser {user} already exists")));
            }
            auth.incoming.push(acct);
        }
    } else {
        let (user, secret) = match rest {
            [user] => (*user, None),
            [user, secret] => (*user, Some(*secret)),
            _ => {
                return Err(invalid(
                    here,
                    format!("usage: del_attribute {attr} USER [SECRET]"),
                ))
            }
        };
        let account = if attr == "OutgoingUser" {
            auth.outgoing.as_ref().filter(|o| o.user == user)
        } else {
            auth.incoming.iter().find(|a| a.user == user)
        };
        let Some(account) = account else {
            return Err(invalid(here, format!("no {attr} {}", quote(user))));
        };
        if let Some(s) = secret {
            if !chap::constant_time_eq(s.as_bytes(), account.secret.as_bytes()) {
                return Err(invalid(
                    here,
                    format!(
                        "the secret given does not match {attr} {}'s; nothing was deleted",
                        quote(user)
                    ),
                ));
            }
        }
        if attr == "OutgoingUser" {
            auth.outgoing = None;
        } else {
            auth.incoming.retain(|a| a.user != user);
        }
    }
    Ok(())
}

/// CHAP accounts in the saved configuration: `"IncomingUser": ["user secret", ...]`,
/// `"OutgoingUser": "user secret"`.
fn save_auth(a: &Auth, o: &mut Map<String, Value>) {
    if !a.incoming.is_empty() {
        let list: Vec<Value> = a
            .incoming
            .iter()
            .map(|x| json!(format!("{} {}", x.user, x.secret)))
            .collect();
        o.insert("IncomingUser".into(), Value::Array(list));
    }
    if let Some(x) = &a.outgoing {
        o.insert(
            "OutgoingUser".into(),
            json!(format!("{} {}", x.user, x.secret)),
        );
    }
}

fn save_luns(luns: &BTreeMap<u64, Lun>) -> Map<String, Value> {
    let mut out = Map::new();
    for (l, lun) in luns {
        let mut lo = Map::new();
        lo.insert("device".into(), json!(lun.device));
        if lun.read_only {
            lo.insert("read_only".into(), json!("1"));
        }
        out.insert(l.to_string(), Value::Object(lo));
    }
    out
}

fn auth_lines(v: &Value, path: &str) -> Result<Vec<String>, MgmtError> {
    let one = |x: &Value| {
        x.as_str()
            .map(str::to_string)
            .ok_or_else(|| invalid(path, "a CHAP account is a string \"USER SECRET\""))
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        x => Ok(vec![one(x)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn mgmt() -> Arc<Mgmt> {
        Mgmt::new(Publisher::new(), Registry::new(), Hooks::default())
    }

    pub(super) const T: &str = "iqn.2026-11.org.example:t1";

    pub(super) fn setup(m: &Mgmt) {
        m.mgmt(
            "handlers/vdisk_ramio/mgmt",
            "add_device r0 size_mb=4; blocksize=4096",
        )
        .unwrap();
        m.mgmt("handlers/vdisk_nullio", "add_device n0").unwrap();
        m.mgmt("targets/iscsi/mgmt", &format!("add_target {T}"))
            .unwrap();
        m.mgmt(&format!("targets/iscsi/{T}/luns/mgmt"), "add r0 0")
            .unwrap();
        m.mgmt(
            &format!("targets/iscsi/{T}/luns/mgmt"),
            "add n0 5 read_only=1",
        )
        .unwrap();
    }

    #[test]
    fn scst_grammar_and_defaults() {
        let m = mgmt();
        setup(&m);
        assert_eq!(m.get("devices/r0/blocksize").unwrap(), "4096");
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/QueuedCommands")).unwrap(),
            "32"
        );
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/RspTimeout")).unwrap(),
            "30"
        );
        assert_eq!(m.get(&format!("targets/iscsi/{T}/enabled")).unwrap(), "0");
        assert_eq!(m.get(&format!("targets/iscsi/{T}/tid")).unwrap(), "1");
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/luns/5/read_only"))
                .unwrap(),
            "1"
        );
        m.set(
            &format!("targets/iscsi/{T}/MaxRecvDataSegmentLength"),
            "8192",
        )
        .unwrap();
        assert!(m
            .ls(&format!("targets/iscsi/{T}"))
            .unwrap()
            .iter()
            .any(|e| e.name == "MaxRecvDataSegmentLength" && e.key));
        m.set(
            &format!("targets/iscsi/{T}/MaxRecvDataSegmentLength"),
            ":default:",
        )
        .unwrap();
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/MaxRecvDataSegmentLength"))
                .unwrap(),
            "1048576"
        );
        assert!(m
            .get("handlers/vdisk_ramio/mgmt")
            .unwrap()
            .contains("size_mb"));
        assert_eq!(
            m.get("devices/r0/exported/export0").unwrap(),
            format!("../../../targets/iscsi/{T}/luns/0")
        );
        // A LUN's device link leads back to the tree's root, from a target's LUN set and
        // from a group's.
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/luns/0/device")).unwrap(),
            "../../../../../devices/r0"
        );
        let g = format!("targets/iscsi/{T}/ini_groups");
        m.mgmt(&format!("{g}/mgmt"), "create hosts").unwrap();
        m.mgmt(&format!("{g}/hosts/luns/mgmt"), "add r0 3 read_only=1")
            .unwrap();
        assert_eq!(
            m.get(&format!("{g}/hosts/luns/3/device")).unwrap(),
            "../../../../../../../devices/r0"
        );
        assert_eq!(m.get(&format!("{g}/hosts/luns/3/read_only")).unwrap(), "1");
        assert!(m.get(&format!("{g}/hosts/luns/3/nothing")).is_err());
        assert!(m.get(&format!("{g}/hosts/luns/x/device")).is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        let m = mgmt();
        setup(&m);
        let e = |r: Result<(), MgmtError>| r.unwrap_err().to_string();
        assert!(e(m.mgmt("handlers/vdisk_ramio/mgmt", "del_device r0")).contains("busy"));
        assert!(
            e(m.mgmt("handlers/vdisk_ramio/mgmt", "add_device r0 size_mb=4"))
                .contains("already exists")
        );
        assert!(e(m.mgmt(
            "handlers/vdisk_ramio/mgmt",
            "add_device r9 size_mb=4; blocksize=1000"
        ))
        .contains("power of two"));
        assert!(
            e(m.mgmt("handlers/vdisk_ramio/mgmt", "add_device r9 size_mb")).contains("name=value")
        );
        assert!(e(m.mgmt("targets/iscsi/mgmt", "add_target not-a-name")).contains("iSCSI name"));
        assert!(
            e(m.mgmt(&format!("targets/iscsi/{T}/luns/mgmt"), "add r0 0"))
                .contains("already exists")
        );
        assert!(
            e(m.mgmt(&format!("targets/iscsi/{T}/luns/mgmt"), "add nope 3")).contains("no device")
        );
        assert!(e(m.mgmt(&format!("targets/iscsi/{T}/luns/mgmt"), "add r0 99999")).contains("LUN"));
        assert!(e(m.mgmt("targets/iscsi/mgmt", "frob x")).contains("frob"));
        assert!(
            e(m.set(&format!("targets/iscsi/{T}/QueuedCommands"), "0")).contains("from 1 to 2048")
        );
        assert!(e(m.set(&format!("targets/iscsi/{T}/tid"), "5")).contains("read-only"));
        assert!(e(m.set("devices/r0/blocksize", "512")).contains("read-only"));
        assert!(matches!(
            m.get("targets/iscsi/nowhere"),
            Err(MgmtError::NotFound(_))
        ));
        assert!(matches!(m.get("targets"), Err(MgmtError::IsDir(_))));
        assert!(matches!(m.ls("version"), Err(MgmtError::NotDir(_))));
        m.mgmt(&format!("targets/iscsi/{T}/luns/mgmt"), "clear")
            .unwrap();
        m.mgmt("handlers/vdisk_ramio/mgmt", "del_device r0")
            .unwrap();
    }

    #[test]
    fn snapshot_follows_the_tree() {
        let p = Publisher::new();
        let m = Mgmt::new(p.clone(), Registry::new(), Hooks::default());
        setup(&m);
        m.set(&format!("targets/iscsi/{T}/enabled"), "1").unwrap();
        m.set("targets/iscsi/enabled", "1").unwrap();
        let s = p.current();
        assert!(s.iscsi_enabled);
        let t = &s.targets[T];
        assert!(t.enabled);
        assert_eq!(t.luns.iter().map(|l| l.lun).collect::<Vec<_>>(), vec![0, 5]);
        assert!(t.lun(5).unwrap().read_only);
    }

    #[test]
    fn save_and_load_round_trip() {
        let m = mgmt();
        setup(&m);
        m.set(&format!("targets/iscsi/{T}/QueuedCommands"), "64")
            .unwrap();
        m.set("devices/n0/prod_id", "NullDisk").unwrap();
        m.set(&format!("targets/iscsi/{T}/enabled"), "1").unwrap();
        m.set("targets/iscsi/enabled", "1").unwrap();
        let saved = m.save_config();
        let m2 = mgmt();
        m2.load_config(&saved).unwrap();
        assert_eq!(m2.save_config(), saved);
        assert_eq!(
            m2.get(&format!("targets/iscsi/{T}/QueuedCommands"))
                .unwrap(),
            "64"
        );
        assert_eq!(m2.get("devices/n0/prod_id").unwrap(), "NullDisk");
        assert_eq!(m2.tree("").unwrap(), m.tree("").unwrap());
        assert!(m2.load_config(&json!({"bogus": 1})).is_err());
    }

    #[test]
    fn names() {
        assert!(valid_iscsi_name("iqn.2006-10.net.vlnb:tgt"));
        assert!(valid_iscsi_name("eui.0123456789abcdef"));
        assert!(!valid_iscsi_name("iqn.06-10.net"));
        assert!(!valid_iscsi_name("tgt1"));
    }
}

#[cfg(test)]
mod more_tests {
    use super::tests::{mgmt, setup, T};
    use super::*;

    #[test]
    fn unknown_paths_are_errors() {
        let m = Mgmt::new(Publisher::new(), Registry::new(), Hooks::default());
        assert!(matches!(m.get("nope"), Err(MgmtError::NotFound(_))));
        assert!(matches!(m.ls("nope/deeper"), Err(MgmtError::NotFound(_))));
        assert!(matches!(m.set("nope", "1"), Err(MgmtError::NotFound(_))));
    }

    #[test]
    fn chap_deletes_take_the_value_scstadmin_sends() {
        let m = mgmt();
        setup(&m);
        let t = "targets/iscsi/mgmt";
        let secret = "12charsecret";
        for (add, del) in [
            (
                format!("add_target_attribute {T} IncomingUser joe {secret}"),
                format!("del_target_attribute {T} IncomingUser joe"),
            ),
            (
                format!("add_attribute OutgoingUser tgt {secret}"),
                "del_attribute OutgoingUser tgt".to_string(),
            ),
        ] {
            m.mgmt(t, &add).unwrap();
            // A wrong secret is refused, naming the user and not the secret.
            let e = m
                .mgmt(t, &format!("{del} wrong-secret-1"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("joe") || e.contains("tgt"), "{e}");
            assert!(
                e.contains("does not match") && !e.contains("wrong-secret-1"),
                "{e}"
            );
            // With the right secret (as scstadmin sends it) it goes.
            m.mgmt(t, &format!("{del} {secret}")).unwrap();
            assert!(m.mgmt(t, &del).unwrap_err().to_string().contains("no "));
            // And without one, as before.
            m.mgmt(t, &add).unwrap();
            m.mgmt(t, &del).unwrap();
        }
        assert!(m
            .mgmt(t, "del_attribute IncomingUser a b c")
            .unwrap_err()
            .to_string()
            .contains("usage"));
    }

    #[test]
    fn handler_types_are_scsts() {
        let m = mgmt();
        assert_eq!(m.get("handlers/vcdrom/type").unwrap(), "5 - CD-ROM device");
        for h in [
            "vdisk_fileio",
            "vdisk_blockio",
            "vdisk_nullio",
            "vdisk_ramio",
        ] {
            assert_eq!(
                m.get(&format!("handlers/{h}/type")).unwrap(),
                "0 - direct-access device (e.g., magnetic disk)",
                "{h}"
            );
        }
        m.mgmt("handlers/vcdrom/mgmt", "add_device cd").unwrap();
        assert_eq!(
            m.get("devices/cd/type").unwrap(),
            m.get("handlers/vcdrom/type").unwrap()
        );
    }

    #[test]
    fn racing_adds_of_one_name_leave_one_device() {
        // add_device creates the device outside the tree's lock: the name is checked again
        // on insertion, and every loser says why.
        let m = mgmt();
        let results: Vec<Result<(), MgmtError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| m.mgmt("handlers/vdisk_ramio/mgmt", "add_device r size_mb=1")))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(e.to_string().contains("already exists"), "{e}");
        }
        assert_eq!(m.ls("devices").unwrap().len(), 1);
    }

    #[test]
    fn chap_accounts_are_managed_and_secrets_stay_hidden() {
        let m = mgmt();
        setup(&m);
        let secret = "sekrit-sekrit-1";
        m.mgmt(
            "targets/iscsi/mgmt",
            &format!("add_attribute IncomingUser joe {secret}"),
        )
        .unwrap();
        m.mgmt(
            "targets/iscsi/mgmt",
            &format!("add_target_attribute {T} IncomingUser ann {secret}"),
        )
        .unwrap();
        m.mgmt(
            "targets/iscsi/mgmt",
            &format!("add_target_attribute {T} IncomingUser bob other-secret-2"),
        )
        .unwrap();
        m.mgmt(
            "targets/iscsi/mgmt",
            &format!("add_target_attribute {T} OutgoingUser tgt target-secret-3"),
        )
        .unwrap();
        assert_eq!(m.get("targets/iscsi/IncomingUser").unwrap(), "joe");
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/IncomingUser1")).unwrap(),
            "bob"
        );
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/OutgoingUser")).unwrap(),
            "tgt"
        );
        let tree = m.tree("").unwrap().to_string();
        assert!(tree.contains("IncomingUser1"));
        for s in [secret, "other-secret-2", "target-secret-3"] {
            assert!(!tree.contains(s), "tree shows a secret");
        }
        // Errors name the problem, never the secret.
        let e = m
            .mgmt("targets/iscsi/mgmt", "add_attribute IncomingUser joe short")
            .unwrap_err()
            .to_string();
        assert!(e.contains("12") && !e.contains("short"), "{e}");
        let e = m
            .mgmt(
                "targets/iscsi/mgmt",
                &format!("add_attribute IncomingUser joe {secret}"),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists") && !e.contains(secret), "{e}");
        // The snapshot carries them to the reactors.
        let snap = m.publisher.current();
        assert_eq!(snap.discovery_auth.incoming.len(), 1);
        assert_eq!(snap.targets[T].auth.incoming.len(), 2);
        // save_config keeps the secrets and load_config restores them.
        let cfg = m.save_config();
        assert!(cfg.to_string().contains("other-secret-2"));
        let m2 = mgmt();
        m2.load_config(&cfg).unwrap();
        assert_eq!(m2.publisher.current().targets[T].auth.incoming.len(), 2);
        assert_eq!(
            m2.get(&format!("targets/iscsi/{T}/OutgoingUser")).unwrap(),
            "tgt"
        );
        // Deleting names the user.
        m.mgmt(
            "targets/iscsi/mgmt",
            &format!("del_target_attribute {T} IncomingUser ann"),
        )
        .unwrap();
        assert_eq!(
            m.get(&format!("targets/iscsi/{T}/IncomingUser")).unwrap(),
            "bob"
        );
        assert!(m
            .mgmt("targets/iscsi/mgmt", "del_attribute IncomingUser nobody")
            .is_err());
        m.mgmt("targets/iscsi/mgmt", "del_attribute IncomingUser joe")
            .unwrap();
        assert!(m.get("targets/iscsi/IncomingUser").is_err());
    }
}

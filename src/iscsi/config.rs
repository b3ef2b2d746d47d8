//! The configuration the reactors serve: an immutable snapshot of targets, their LUN maps and
//! parameters, built by the management tree and published to every reactor.
//!
//! The RPC thread changes the tree under its lock, builds a new [`Snapshot`] and publishes it;
//! reactors notice the new generation at their next poll (one relaxed atomic load) and take
//! the new `Arc` (a short lock, only when the generation moved).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::iscsi::login::Auth;
use crate::iscsi::param::TargetParams;
use crate::scsi::alua::PortGroupState;
use crate::scsi::Device;

/// One LUN of a LUN set.
#[derive(Clone)]
pub struct LunEntry {
    pub lun: u64,
    pub device: Arc<Device>,
    pub read_only: bool,
    /// The state of the target port group the target is in for this device (SPC-4 §5.15),
    /// or `None` outside ALUA (active/optimized).
    pub alua: Option<Arc<PortGroupState>>,
}

/// One iSCSI target as the reactors see it.
#[derive(Clone)]
pub struct TargetConfig {
    pub name: String,
    pub tid: u32,
    pub rel_tgt_id: u16,
    pub enabled: bool,
    pub alias: String,
    pub params: TargetParams,
    /// CHAP accounts (`IncomingUser*`, `OutgoingUser`).
    pub auth: Auth,
    /// The default LUN set (`luns/`), sorted by LUN.
    pub luns: Vec<LunEntry>,
    /// Initiator groups (`ini_groups/`), in the order they were created.
    pub groups: Vec<GroupConfig>,
    /// `redirect`: logins go to this TargetAddress instead (permanently or not).
    pub redirect: Option<(String, bool)>,
    /// `allowed_portal`: the local addresses (patterns) the target is reachable through;
    /// empty means all.
    pub allowed_portals: Vec<String>,
}

/// An initiator group: the initiators it takes (SCST's patterns with `*`, `?` and a leading
/// `!` that excludes) and the LUN set they see instead of the default one.
#[derive(Clone)]
pub struct GroupConfig {
    pub name: String,
    pub initiators: Vec<String>,
    /// Sorted by LUN.
    pub luns: Vec<LunEntry>,
}

impl GroupConfig {
    /// Whether `initiator` belongs here: one pattern takes it and no `!` pattern excludes it.
    pub fn takes(&self, initiator: &str) -> bool {
        let mut hit = false;
        for p in &self.initiators {
            match p.strip_prefix('!') {
                Some(neg) if wildcard_match(neg, initiator) => return false,
                Some(_) => {}
                None => hit |= wildcard_match(p, initiator),
            }
        }
        hit
    }
}

/// DOS-style wildcards as SCST matches initiator names: `*` any run, `?` one character;
/// iSCSI names compare without regard to ASCII case (RFC 3722 folds them to lower case).
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
    let n: Vec<char> = name.chars().map(|c| c.to_ascii_lowercase()).collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl TargetConfig {
    /// Whether the target may be reached through the local address `ip` (patterns as for
    /// initiator names: `*`, `?`, a leading `!` excludes).
    pub fn portal_allowed(&self, ip: &str) -> bool {
        if self.allowed_portals.is_empty() {
            return true;
        }
        let mut hit = false;
        for p in &self.allowed_portals {
            match p.strip_prefix('!') {
                Some(neg) if wildcard_match(neg, ip) => return false,
                Some(_) => {}
                None => hit |= wildcard_match(p, ip),
            }
        }
        hit
    }

    /// The target as `initiator` sees it: the LUN set of the first group that takes it, or the
    /// default set (SCST's access control). Resolved at login and at configuration changes,
    /// never per command.
    pub fn view_for(self: &Arc<Self>, initiator: &str) -> Arc<TargetConfig> {
        match self.groups.iter().find(|g| g.takes(initiator)) {
            None => self.clone(),
            Some(g) => {
                let mut v = (**self).clone();
                v.luns = g.luns.clone();
                v.groups = Vec::new();
                Arc::new(v)
            }
        }
    }

    /// The name of the group `initiator` falls in, if any.
    pub fn group_of(&self, initiator: &str) -> Option<&str> {
        self.groups
            .iter()
            .find(|g| g.takes(initiator))
            .map(|g| g.name.as_str())
    }

    pub fn lun(&self, lun: u64) -> Option<&LunEntry> {
        self.luns
            .binary_search_by_key(&lun, |e| e.lun)
            .ok()
            .map(|i| &self.luns[i])
    }
}

/// Everything the data path needs to know, at one instant.
#[derive(Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// `targets/iscsi/enabled`: nothing logs in until it is 1.
    pub iscsi_enabled: bool,
    /// CHAP accounts of discovery sessions (`targets/iscsi/IncomingUser*`, `OutgoingUser`).
    pub discovery_auth: Auth,
    pub targets: BTreeMap<String, Arc<TargetConfig>>,
    /// `targets/iscsi/max_connections`: connections of all portals together; 0 is no limit
    /// beyond what the file descriptor limit allows.
    pub max_connections: usize,
    /// `targets/iscsi/max_connections_per_portal`: connections through one portal; 0 is none.
    pub max_connections_per_portal: usize,
}

/// Hands snapshots from the management thread to the reactors.
#[derive(Default)]
pub struct Publisher {
    generation: AtomicU64,
    current: Mutex<Arc<Snapshot>>,
}

impl Publisher {
    pub fn new() -> Arc<Publisher> {
        Arc::new(Publisher::default())
    }

    /// Publishes `snap`, giving it the next generation number.
    pub fn publish(&self, mut snap: Snapshot) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        snap.generation = cur.generation + 1;
        let generation = snap.generation;
        *cur = Arc::new(snap);
        self.generation.store(generation, Ordering::Release);
    }

    /// The generation of the newest snapshot: cheap enough to call every poll.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match(
            "iqn.2026-11.org.x:*",
            "iqn.2026-11.org.x:host1"
        ));
        assert!(wildcard_match("*host?", "iqn.2026-11.org.x:HOST1"));
        assert!(!wildcard_match("*host?", "iqn.2026-11.org.x:host12"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "axxbyy"));
        assert!(wildcard_match("exact", "EXACT"));
    }

    #[test]
    fn negation_excludes() {
        let g = GroupConfig {
            name: "g".into(),
            initiators: vec!["iqn.*".into(), "!*:bad".into()],
            luns: Vec::new(),
        };
        assert!(g.takes("iqn.x:good"));
        assert!(!g.takes("iqn.x:bad"));
        assert!(!g.takes("eui.0123456789abcdef"));
    }
}

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
use crate::scsi::Device;

/// One LUN of a LUN set.
#[derive(Clone)]
pub struct LunEntry {
    pub lun: u64,
    pub device: Arc<Device>,
    pub read_only: bool,
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
}

impl TargetConfig {
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

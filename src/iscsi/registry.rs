//! Sessions as the management tree shows them (`targets/iscsi/IQN/sessions/INITIATOR/…`).
//!
//! Reactors register a session when its login completes and remove it when it ends; the
//! counters are atomics that only the owning reactor writes, with a plain load and store (no
//! locked read-modify-write per command), and the management tree reads.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One TCP connection of a session.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub cid: u16,
    /// The initiator's address (`ip`).
    pub ip: String,
    /// The target's address of the connection (`target_ip`).
    pub target_ip: String,
    pub state: String,
}

/// A logged-in session.
#[derive(Debug)]
pub struct SessionInfo {
    /// Unique id of the session (SCST's `sid`, shown in hex): ISID and TSIH.
    pub sid: u64,
    pub target: String,
    pub initiator_name: String,
    /// The negotiated parameters, as `(key, value)` in the order the tree lists them.
    pub params: Vec<(String, String)>,
    pub connections: Mutex<Vec<ConnInfo>>,
    /// Commands received over the session's life.
    pub commands: AtomicU64,
    /// Commands received and not yet completed.
    pub active_commands: AtomicU64,
    pub reinstating: AtomicBool,
    /// Set by `force_close`; the owning reactor closes the session at its next poll.
    pub close_requested: AtomicBool,
}

impl SessionInfo {
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }
    pub fn active_commands(&self) -> u64 {
        self.active_commands.load(Ordering::Relaxed)
    }

    /// A command arrived. Only the session's reactor calls this (and `command_done`): with
    /// one writer, a load and a store keep the counts exact without a locked instruction.
    pub fn command_received(&self) {
        bump(&self.commands, 1);
        bump(&self.active_commands, 1);
    }

    /// A command was answered or aborted.
    pub fn command_done(&self) {
        let n = self.active_commands.load(Ordering::Relaxed);
        self.active_commands
            .store(n.saturating_sub(1), Ordering::Relaxed);
    }
}

/// Adds `by` to a counter that has one writer.
fn bump(c: &AtomicU64, by: u64) {
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// All sessions, by target and then by the session's directory name.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<BTreeMap<String, BTreeMap<String, Arc<SessionInfo>>>>,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Adds a session and returns the directory name it got: the initiator name, or
    /// `<initiator>_N` when that name is taken (SCST's `scst_get_unique_sess_name`).
    pub fn add(&self, info: Arc<SessionInfo>) -> String {
        let mut all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = all.entry(info.target.clone()).or_default();
        let mut name = info.initiator_name.clone();
        let mut n = 1;
        while sessions.contains_key(&name) {
            name = format!("{}_{}", info.initiator_name, n);
            n += 1;
        }
        sessions.insert(name.clone(), info);
        name
    }

    /// Removes the session with this sid.
    pub fn remove(&self, target: &str, sid: u64) {
        let mut all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sessions) = all.get_mut(target) {
            sessions.retain(|_, s| s.sid != sid);
            if sessions.is_empty() {
                all.remove(target);
            }
        }
    }

    /// The sessions of one target, by directory name.
    pub fn sessions(&self, target: &str) -> Vec<(String, Arc<SessionInfo>)> {
        let all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        all.get(target)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether any target has a session with this `sid`.
    pub fn contains_sid(&self, sid: u64) -> bool {
        let all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        all.values().any(|m| m.values().any(|s| s.sid == sid))
    }

    pub fn count(&self, target: &str) -> usize {
        let all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        all.get(target).map_or(0, |m| m.len())
    }
}

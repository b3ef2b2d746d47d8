//! One iSCSI connection (RFC 7143): login, then full feature phase with its command window,
//! Data-Out/R2T sequencing, Data-In with phase collapse, NOP, text, logout and task
//! management. A connection is owned by one reactor; the reactor drives it with readiness
//! events, backend completions and the clock, so everything here runs without locks.
//!
//! The connection's state and its life cycle (transmit, timers, close, configuration
//! changes) are here; the rest is split by concern: `receive` (PDU framing), `login`, `command`
//! (SCSI commands and their data), `tmf` (task management) and `misc` (NOP, text, logout,
//! asynchronous messages, reject).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;

use crate::iscsi::config::{Snapshot, TargetConfig};
use crate::iscsi::engine::Shared;
use crate::iscsi::login::Login;
use crate::iscsi::negotiate::SessionParams;
use crate::iscsi::ordering::TaskSet;
use crate::iscsi::pdu::{Pdu, BHS_LEN};
use crate::iscsi::registry::SessionInfo;
use crate::iscsi::rx::Staging;
use crate::iscsi::seq;
use crate::iscsi::task::{TaskState, Tasks};
use crate::iscsi::tx::TxQueue;
use crate::net::{SockGroup, SockId};
use crate::scsi::{self, ScsiPort};

use self::login::LoginTail;

mod command;
mod login;
mod misc;
mod receive;
mod tmf;

/// RFC 7143 §13.12: the default MaxRecvDataSegmentLength, in force during login.
const LOGIN_MAX_DATA: usize = 8192;
/// How long a login may take before the connection is dropped.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection may stay silent: initiators send their Login Request as soon as
/// they connect, and idle connections must not hold the connection limit for long.
const SILENT_LIMIT: Duration = Duration::from_secs(10);
/// How long a connection that is closing may wait for the initiator to read what is left.
const CLOSING_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A connection stops reading while this much of its queued output is held in its own memory
/// (NOP-In echoes, text and reject answers, sense data): a peer that sends and never reads
/// cannot make it grow without bound. Data-In comes from the commands' pool buffers, which the
/// session's share bounds instead.
const OWNED_BACKLOG_LIMIT: usize = 1 << 20;

pub use crate::scsi::task::{STATUS_CHECK_CONDITION, STATUS_GOOD, STATUS_TASK_SET_FULL};

/// A command parked because the buffer pool was exhausted when it was admitted.
struct BufWait {
    slot: usize,
    itt: u32,
    len: usize,
    since: Instant,
    /// The command PDU's whole payload has arrived (its immediate data is in `data`).
    arrived: bool,
    /// Immediate data, kept aside until the buffer exists.
    data: Vec<u8>,
}

/// Where the payload of the PDU being received goes.
enum Dest {
    Discard,
    Collect(Vec<u8>),
    Task { slot: usize, offset: usize },
}

enum RxState {
    /// Waiting for a whole BHS (+ AHS) in the staging buffer.
    Header,
    /// Receiving the data segment (and padding) of the header in `Conn::rx_hdr`.
    Payload {
        dest: Dest,
        remaining: usize,
        pad: usize,
        pos: usize,
        /// Running CRC32C of the data and padding (when a data digest follows).
        crc: u32,
        /// Bytes of the data digest still to read (4, or 0 without one).
        digest_left: usize,
        digest: [u8; 4],
    },
}

/// A parsed header waiting for its payload.
struct PduHeader {
    /// `None` for an opcode we do not know (its payload is skipped).
    pdu: Option<Pdu>,
    raw: [u8; BHS_LEN],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Login,
    FullFeature,
    /// Logout answered or a fatal error: flush what is queued, then close.
    Closing,
    Closed,
}

/// Session state of a full-feature connection (one connection per session for now).
struct Session {
    params: SessionParams,
    target: Option<Arc<TargetConfig>>,
    info: Option<Arc<SessionInfo>>,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    /// Unit attentions of this I_T nexus raised by the transport (LUN map changes).
    pending_ua: Vec<(u8, u8)>,
    nexus: u64,
    /// The I_T nexus as persistent reservations name it (InitiatorName, ISID, the target's
    /// relative port), built once at login and lent to every command.
    pr_nexus: scsi::pr::Nexus,
    /// The target's iSCSI name, for INQUIRY's device identification page.
    target_name: Option<std::sync::Arc<str>>,
}

/// Everything a connection needs from its reactor while it handles events.
pub struct ConnCtx<'a> {
    pub now: Instant,
    pub snapshot: &'a Arc<Snapshot>,
    pub shared: &'a Shared,
    pub port: &'a mut ScsiPort,
    /// The reactor's sockets.
    pub net: &'a mut dyn SockGroup,
    /// Our index among the reactor's connections (high half of backend tags).
    pub index: usize,
}

pub struct Conn {
    sock: SockId,
    /// The portal (index among the target's listeners) it came through.
    portal: usize,
    peer: SocketAddr,
    local: SocketAddr,
    phase: Phase,
    rx_state: RxState,
    /// The header whose payload is being received (kept here, not boxed in `rx_state`: no
    /// allocation per PDU).
    rx_hdr: Option<PduHeader>,
    staging: Staging,
    tx: TxQueue,
    login: Option<Login>,
    login_deadline: Instant,
    /// A Login Response too long for one PDU, sent in parts.
    login_tail: Option<LoginTail>,
    sess: Option<Session>,
    tasks: Tasks,
    stat_sn: u32,
    cid: u16,
    /// Last time anything arrived (for NOP-In keepalive).
    last_rx: Instant,
    /// Whether anything at all has arrived.
    heard: bool,
    /// Outstanding NOP-In ping: its TTT and when it was sent.
    nop_ping: Option<(u32, Instant)>,
    next_nop_ttt: u32,
    done_slots: Vec<usize>,
    /// Commands waiting for a data buffer, oldest first.
    buf_waiters: VecDeque<BufWait>,
    /// Pool bytes held by this session's tasks, and the most it may hold
    /// ([`crate::env::session_share`]).
    buf_held: usize,
    buf_share: usize,
    /// Whether the socket wants to be polled for writability.
    want_write: bool,
    /// Response coalescing: when the first PDU now queued was held back, when the last
    /// command arrived, and the smoothed gap between command arrivals (ns).
    tx_held_since: Option<Instant>,
    last_cmd_at: Option<Instant>,
    cmd_gap_ns: u64,
    /// Since when queued output has made no progress (the initiator reads nothing).
    tx_stalled_since: Option<Instant>,
    /// The last `on_readable` stopped at its budget: input may be left in the staging buffer,
    /// which the socket will not report again, so the reactor must call back.
    rx_more: bool,
    /// A receive this turn returned less than it asked for: the socket had nothing more, so
    /// asking again before the next readiness event would only cost a system call that
    /// returns EAGAIN.
    rx_drained: bool,
    /// Digests negotiated for this connection (RFC 7143 §13.1), checked on receive.
    rx_header_digest: bool,
    rx_data_digest: bool,
    /// A task management function that reaches other sessions, for the reactor to hand to
    /// every reactor; its response (ITT) waits until all have applied it.
    /// A PERSISTENT RESERVE OUT's PREEMPT AND ABORT hands its aborts to every reactor the
    /// same way; its response is then `pr_waits` (ITT, task slot).
    tmf_out: Vec<(AbortScope, u32)>,
    pr_waits: Vec<(u32, usize)>,
    /// A TARGET COLD RESET: close after its response.
    close_after_tmf: bool,
    /// Task management responses (ITT, response) held until every task they aborted is
    /// back from the backend: FUNCTION COMPLETE promises the aborted commands will not touch
    /// the medium any more (SAM-5 §7.1).
    tmf_deferred: Vec<(u32, u8)>,
    /// The session of a closed connection, kept (in the registry, its nexus registered) until
    /// the last of its backend I/O is back: a new session of the same I_T nexus waits for it.
    ended: Option<Session>,
    /// A login that reinstates a session waits, its final response held, until the old
    /// session has gone (RFC 7143 §6.3.5).
    reinstating: bool,
    /// A text request being continued (C=1): its ITT, the TTT we gave it, the text so far.
    text_in: Option<(u32, u32, Vec<u8>)>,
    /// The rest of a long text answer: our TTT, the ITT, and the bytes not yet sent.
    text_out: Option<(u32, u32, Vec<u8>)>,
    text_ttt: u32,
    /// The order in which this I_T nexus's commands (one connection per session) may start,
    /// from their task attributes. One for all the session's logical units: SAM-5 keeps a
    /// task set per logical unit (TST=001b: per I_T nexus within it), so across LUNs this
    /// orders more than it must (an ORDERED command also waits for older commands to other
    /// LUNs), never less; it costs only sessions that send ORDERED or HEAD OF QUEUE commands
    /// to several LUNs at once.
    order: TaskSet<usize>,
    /// [`Conn::start_released`] is running (it is not re-entered).
    releasing: bool,
}

/// What a task management function ends beyond the requesting nexus.
#[derive(Debug, Clone)]
pub struct AbortScope {
    pub target: String,
    /// `None`: every LUN (target resets).
    pub lun: Option<u64>,
    /// The requesting I_T nexus (its own tasks were handled where it runs).
    pub requester: u64,
    /// TARGET COLD RESET: close every session of the target.
    pub close: bool,
    /// PREEMPT AND ABORT: only the tasks of these I_T nexuses on the LUNs of this device,
    /// through whichever target (the target and `lun` above do not apply).
    pub preempted: Option<Preempted>,
}

/// The tasks a PREEMPT AND ABORT aborts beyond its own I_T nexus: those of `nexuses` on
/// the LUNs that export `device`.
#[derive(Clone)]
pub struct Preempted {
    pub device: Arc<crate::scsi::Device>,
    pub nexuses: Vec<u64>,
}

impl std::fmt::Debug for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preempted")
            .field("device", &self.device.name())
            .field("nexuses", &self.nexuses)
            .finish()
    }
}

impl Conn {
    /// A connection on socket `sock` of the reactor's group, from `peer` to `local`.
    pub fn new(
        sock: SockId,
        (peer, local): (SocketAddr, SocketAddr),
        portal: usize,
        now: Instant,
    ) -> Conn {
        Conn {
            sock,
            portal,
            peer,
            local,
            phase: Phase::Login,
            rx_state: RxState::Header,
            rx_hdr: None,
            staging: Staging::new(),
            tx: TxQueue::default(),
            login: Some(Login::new(local.to_string())),
            login_deadline: now + LOGIN_TIMEOUT,
            login_tail: None,
            sess: None,
            tasks: Tasks::with_capacity(64),
            stat_sn: 0,
            cid: 0,
            last_rx: now,
            heard: false,
            nop_ping: None,
            next_nop_ttt: 1,
            done_slots: Vec::with_capacity(64),
            buf_waiters: VecDeque::new(),
            buf_held: 0,
            buf_share: crate::env::session_share(),
            want_write: false,
            tx_held_since: None,
            last_cmd_at: None,
            cmd_gap_ns: u64::MAX,
            tx_stalled_since: None,
            rx_more: false,
            rx_drained: false,
            rx_header_digest: false,
            rx_data_digest: false,
            tmf_out: Vec::new(),
            pr_waits: Vec::new(),
            close_after_tmf: false,
            tmf_deferred: Vec::new(),
            ended: None,
            reinstating: false,
            text_in: None,
            text_out: None,
            text_ttt: 0,
            order: TaskSet::default(),
            releasing: false,
        }
    }

    pub fn sock(&self) -> SockId {
        self.sock
    }

    /// The portal (index among the target's portals) the connection came through.
    pub fn portal(&self) -> usize {
        self.portal
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether output is queued that the socket did not take: poll it for writability.
    pub fn wants_write(&self) -> bool {
        self.want_write
    }

    /// The last [`Conn::on_readable`] stopped at its budget with input possibly left in the
    /// staging buffer, which the socket will not report again: call it again next pass.
    pub fn rx_more(&self) -> bool {
        self.rx_more
    }

    /// A task management function that reaches other sessions, for the reactor to hand to
    /// every reactor (its response waits for [`Conn::tmf_done`]).
    pub fn take_tmf(&mut self) -> Option<(AbortScope, u32)> {
        if self.tmf_out.is_empty() {
            None
        } else {
            Some(self.tmf_out.remove(0))
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether the connection takes input: not while too much of its output waits unread
    /// ([`OWNED_BACKLOG_LIMIT`]).
    pub fn wants_read(&self) -> bool {
        self.tx.owned_bytes() < OWNED_BACKLOG_LIMIT
    }

    /// Notes a command's arrival for response coalescing.
    pub(super) fn note_command(&mut self, now: Instant) {
        if let Some(last) = self.last_cmd_at {
            let gap = now.saturating_duration_since(last).as_nanos() as u64;
            self.cmd_gap_ns = if self.cmd_gap_ns == u64::MAX {
                gap
            } else {
                (self.cmd_gap_ns * 3 + gap) / 4
            };
        }
        self.last_cmd_at = Some(now);
    }

    /// Whether this pass's output should wait (at most `hold`) for more responses to join
    /// it: only while commands stream in faster than `hold` apart, so a lone command at
    /// queue depth 1 is answered at once, and never beyond `max_pdus` queued PDUs.
    pub fn hold_output(&mut self, now: Instant, hold: Duration, max_pdus: usize) -> bool {
        if hold.is_zero()
            || self.phase != Phase::FullFeature
            || self.want_write
            || self.tx.is_empty()
            || self.tx.len() >= max_pdus
            || self.cmd_gap_ns >= hold.as_nanos() as u64
        {
            self.tx_held_since = None;
            return false;
        }
        let since = *self.tx_held_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= hold {
            self.tx_held_since = None;
            return false;
        }
        true
    }

    /// When held output must go at the latest.
    pub fn held_until(&self, hold: Duration) -> Option<Instant> {
        self.tx_held_since.map(|t| t + hold)
    }

    /// Frees a task slot, returning its buffer's charge to the session's share.
    fn remove_task(&mut self, slot: usize) {
        if let Some(t) = self.tasks.remove(slot) {
            // Normally completed or aborted before: this keeps the task set right anyway.
            if let Some(o) = t.order {
                self.order.complete(o);
            }
            self.buf_held = self.buf_held.saturating_sub(t.buf_charge);
        }
    }

    /// Whether the connection is gone and no backend I/O still holds one of its buffers.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Closed && !self.tasks.slots().any(|(_, t)| t.in_backend)
    }

    fn max_recv_data(&self) -> usize {
        match &self.sess {
            Some(s) => s.params.max_recv_data_segment_length as usize,
            None => LOGIN_MAX_DATA,
        }
    }

    fn max_xmit_data(&self) -> usize {
        match &self.sess {
            Some(s) => s.params.max_xmit_data_segment_length as usize,
            None => LOGIN_MAX_DATA,
        }
        .max(512)
    }

    // ---------------------------------------------------------------- transmit, timers, close

    /// Writes what is queued. Returns whether anything remains queued.
    pub fn flush(&mut self, cx: &mut ConnCtx<'_>) -> bool {
        if self.phase == Phase::Closed {
            return false;
        }
        self.done_slots.clear();
        let sent_before = self.tx.sent_total();
        let tasks = &self.tasks;
        let res = self.tx.flush(
            cx.net,
            self.sock,
            |s| tasks.get(s).and_then(|t| t.scsi.buf.as_ref()),
            &mut self.done_slots,
        );
        for i in 0..self.done_slots.len() {
            let slot = self.done_slots[i];
            if let Some(t) = self.tasks.get_mut(slot) {
                t.tx_refs = t.tx_refs.saturating_sub(1);
                if t.tx_refs == 0 && !t.in_backend && t.state == TaskState::Responding {
                    self.remove_task(slot);
                }
            }
        }
        // A socket that takes nothing for RspTimeout gets the connection closed (on_timer):
        // its queued Data-In holds buffers other sessions need.
        self.tx_stalled_since = match &res {
            Ok(false) if self.tx.sent_total() == sent_before => {
                Some(self.tx_stalled_since.unwrap_or(cx.now))
            }
            Ok(false) => Some(cx.now),
            _ => None,
        };
        match res {
            Ok(true) => {
                self.want_write = false;
                if self.phase == Phase::Closing {
                    self.close(cx, "closed after final response");
                }
                false
            }
            Ok(false) => {
                self.want_write = true;
                true
            }
            Err(e) => {
                self.close(cx, &format!("send failed: {e}"));
                false
            }
        }
    }

    /// Timers: login timeout, NOP-In keepalive, RspTimeout (seed semantics: a command that
    /// waits on the initiator, or a NOP-In ping unanswered, for RspTimeout closes the
    /// connection). Returns the next deadline.
    pub fn on_timer(&mut self, cx: &mut ConnCtx<'_>) -> Option<Instant> {
        let now = cx.now;
        match self.phase {
            Phase::Login => {
                if self.reinstating {
                    self.check_reinstatement(cx);
                    return Some(self.login_deadline);
                }
                let silent_until = self.login_deadline - LOGIN_TIMEOUT + SILENT_LIMIT;
                if !self.heard && now >= silent_until {
                    self.close(cx, "nothing received within 10 s of connecting");
                    return None;
                }
                if now >= self.login_deadline {
                    self.close(cx, "login timed out");
                    return None;
                }
                return Some(if self.heard {
                    self.login_deadline
                } else {
                    silent_until
                });
            }
            Phase::Closing => {
                // What is left to send before the close must drain too.
                if let Some(t) = self.tx_stalled_since {
                    if now >= t + CLOSING_DRAIN_LIMIT {
                        self.close(cx, "the initiator stopped reading before the close");
                        return None;
                    }
                    return Some(t + CLOSING_DRAIN_LIMIT);
                }
                return None;
            }
            Phase::Closed => return None,
            Phase::FullFeature => {}
        }
        if let Some(info) = self.sess.as_ref().and_then(|s| s.info.as_ref()) {
            if info.close_requested.load(Ordering::Relaxed) {
                self.close(cx, "closed by force_close");
                return None;
            }
        }
        let (rsp, nop_interval) = match &self.sess {
            Some(s) => (
                Duration::from_secs(u64::from(s.params.rsp_timeout.max(1))),
                Duration::from_secs(u64::from(s.params.nop_in_interval)),
            ),
            None => return None,
        };
        if let Some((_, sent)) = self.nop_ping {
            if now >= sent + rsp {
                self.close(cx, "no answer to NOP-In within RspTimeout");
                return None;
            }
        }
        if let Some(t) = self.tx_stalled_since {
            if now >= t + rsp {
                self.close(
                    cx,
                    "the initiator read none of its responses for RspTimeout",
                );
                return None;
            }
        }
        let oldest_wait = self
            .tasks
            .slots()
            .filter_map(|(_, t)| t.waiting_since)
            .min();
        if let Some(w) = oldest_wait {
            if now >= w + rsp {
                self.close(
                    cx,
                    "a command waited on the initiator longer than RspTimeout",
                );
                return None;
            }
        }
        let mut next = oldest_wait.map(|w| w + rsp);
        if !nop_interval.is_zero() {
            match self.nop_ping {
                Some((_, sent)) => next = min_deadline(next, Some(sent + rsp)),
                None => {
                    let due = self.last_rx + nop_interval;
                    if now >= due {
                        self.send_nop_in(now);
                        self.flush(cx);
                        next = min_deadline(next, Some(now + rsp));
                    } else {
                        next = min_deadline(next, Some(due));
                    }
                }
            }
        }
        next
    }

    /// Closes the connection and ends its session.
    pub fn close(&mut self, cx: &mut ConnCtx<'_>, why: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        info!("{}: connection closed: {why}", self.peer);
        self.phase = Phase::Closed;
        self.abort_all(cx.port);
        self.done_slots.clear();
        self.tx.clear(&mut self.done_slots);
        for i in 0..self.done_slots.len() {
            let slot = self.done_slots[i];
            if let Some(t) = self.tasks.get_mut(slot) {
                t.tx_refs = t.tx_refs.saturating_sub(1);
                if t.tx_refs == 0 && !t.in_backend {
                    self.remove_task(slot);
                }
            }
        }
        let leftovers: Vec<usize> = self
            .tasks
            .slots()
            .filter(|(_, t)| !t.in_backend)
            .map(|(i, _)| i)
            .collect();
        for s in leftovers {
            self.remove_task(s);
        }
        self.order = TaskSet::default();
        self.tmf_deferred.clear();
        if let Some(sess) = self.sess.take() {
            if let Some(info) = &sess.info {
                let mut conns = info.connections.lock().unwrap_or_else(|e| e.into_inner());
                for c in conns.iter_mut() {
                    c.state = "closing".into();
                }
            }
            self.ended = Some(sess);
        }
        self.release_session(&cx.shared.registry);
        cx.net.close(self.sock);
    }

    /// Ends the session of a closed connection once none of its I/O is out in the backend:
    /// until then it stays in the registry (so a new login of the same I_T nexus waits for
    /// it), and its aborted writes can still land.
    pub fn release_session(&mut self, registry: &crate::iscsi::registry::Registry) {
        if self.tasks.slots().any(|(_, t)| t.in_backend) {
            return;
        }
        let Some(sess) = self.ended.take() else {
            return;
        };
        if let (Some(info), Some(t)) = (&sess.info, &sess.target) {
            registry.remove(&t.name, info.sid);
            for l in &t.luns {
                l.device.unregister_nexus(sess.nexus);
            }
        }
    }

    /// A new configuration snapshot: keep the session's view of its target current and raise
    /// REPORTED LUNS DATA HAS CHANGED when its LUN map changed (SPC-4 §5.14).
    pub fn on_snapshot(&mut self, snap: &Snapshot, cx: &mut ConnCtx<'_>) {
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        let Some(old) = sess.target.clone() else {
            return;
        };
        let mut changed = false;
        match snap.targets.get(&old.name) {
            None => {
                self.close(cx, "target deleted");
            }
            Some(new) => {
                // The LUN set this initiator sees now (its group may have changed).
                let new = new.view_for(&sess.params.initiator_name);
                let old_luns: Vec<(u64, &str)> =
                    old.luns.iter().map(|l| (l.lun, l.device.name())).collect();
                let new_luns: Vec<(u64, &str)> =
                    new.luns.iter().map(|l| (l.lun, l.device.name())).collect();
                if old_luns != new_luns {
                    for l in &new.luns {
                        if old.lun(l.lun).is_none() {
                            l.device.register_nexus(sess.nexus, &sess.pr_nexus);
                        }
                    }
                    if !sess.pending_ua.contains(&(0x3f, 0x0e)) {
                        sess.pending_ua.push((0x3f, 0x0e));
                        // And tell the initiator now: a SCSI asynchronous event carrying the
                        // same sense (RFC 7143 §11.9.1, AsyncEvent 0).
                        changed = true;
                    }
                }
                sess.target = Some(new.clone());
            }
        }
        if changed {
            let mut sense = scsi::sense::Sense::new(scsi::sense::UNIT_ATTENTION, (0x3f, 0x0e))
                .to_fixed()
                .to_vec();
            let mut data = (sense.len() as u16).to_be_bytes().to_vec();
            data.append(&mut sense);
            self.queue_async(0, 0, 0, data);
        }
    }

    /// The I_T nexus of the session, once logged in.
    pub fn nexus(&self) -> Option<u64> {
        self.sess.as_ref().map(|s| s.nexus)
    }

    /// Whether the connection is in full feature phase (for the reactor's load count).
    pub fn is_logged_in(&self) -> bool {
        self.phase == Phase::FullFeature
    }
}

fn update_max_cmd_sn(sess: &mut Session, active: usize) {
    // MaxCmdSN = ExpCmdSN + QueuedCommands - 1 - (commands still outstanding), never moving
    // backwards (initiators ignore a smaller value anyway, RFC 7143 §4.2.2.1).
    let queued = sess.params.queued_commands.max(1);
    let free = queued.saturating_sub(active as u32);
    let candidate = sess.exp_cmd_sn.wrapping_add(free).wrapping_sub(1);
    if seq::lt(sess.max_cmd_sn, candidate) {
        sess.max_cmd_sn = candidate;
    }
}

fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The backend tag of a task: the connection's index on its reactor in the high half, the
/// task's slot in the low half.
fn task_tag(index: usize, slot: usize) -> u64 {
    ((index as u64) << 32) | (slot as u64 & 0xffff_ffff)
}

/// The connection index and task slot of a backend tag made by [`task_tag`].
pub fn split_task_tag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

fn opcode_name(byte0: u8) -> &'static str {
    match byte0 & 0x3f {
        0x00 => "NOP-Out",
        0x01 => "SCSI Command",
        0x02 => "Task Management",
        0x04 => "Text",
        0x05 => "Data-Out",
        0x06 => "Logout",
        0x10 => "SNACK",
        _ => "unexpected",
    }
}

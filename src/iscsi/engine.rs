//! The iSCSI engine of one reactor: its connections, its socket group and its SCSI port (the
//! per-reactor channels to the backends).
//!
//! On the kernel's TCP, connections are accepted on the first reactor and handed to the
//! least-loaded reactor by message: connections, not targets, are the unit spread over
//! cores, so many sessions to one busy target use every reactor. On the userspace stack every
//! reactor accepts the flows its queue receives and keeps them (the group cannot detach).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::iscsi::config::{Publisher, Snapshot};
use crate::iscsi::conn::{split_task_tag, AbortScope, Conn, ConnCtx, Phase};
use crate::iscsi::registry::Registry;
use crate::net::{Detached, Event, Readiness, SockGroup, SockId};
use crate::reactor::{Ctx, Poller, ReactorHandle};
use crate::scsi::{Completion, ScsiPort};

/// The context a connection's handlers get: the engine's shared state and SCSI port, borrowed
/// beside `self.conns` (a method could not borrow both).
macro_rules! conn_cx {
    ($engine:ident, $now:expr, $idx:expr) => {
        ConnCtx {
            now: $now,
            snapshot: &$engine.snapshot,
            shared: &$engine.shared,
            port: &mut $engine.port,
            net: &mut *$engine.group,
            index: $idx,
        }
    };
}

/// Messages between reactors.
/// How long a stopping target waits for initiators to log out after asking them.
const LOGOUT_GRACE: Duration = Duration::from_secs(2);

pub enum Msg {
    /// A connection accepted on another reactor through portal `.1`, now ours.
    Conn(Detached, usize),
    /// Apply another nexus's task management function here, then answer `reply_to`.
    Abort {
        id: u64,
        scope: AbortScope,
        reply_to: usize,
    },
    /// One reactor has applied task management function `id`.
    AbortDone { id: u64 },
}

/// The default of `--coalesce-us`: a connection whose commands arrive less than this many
/// microseconds apart (a deep queue) has its responses held up to this long for more to
/// join them, so that several leave in one send and one TCP segment; a connection at queue
/// depth 1, whose commands come a round trip apart, is answered at once.
pub const DEFAULT_COALESCE_US: u64 = 20;

/// Held output goes at once when this many PDUs are queued (16 Data-In of 4 KiB fill most
/// of a 64 KiB loopback segment).
const COALESCE_MAX_PDUS: usize = 16;

/// State shared by every reactor's engine.
pub struct Shared {
    pub publisher: Arc<Publisher>,
    pub registry: Arc<Registry>,
    /// The portals, for SendTargets when a portal listens on a wildcard address the
    /// connection's own local address is used instead.
    pub portals: Vec<SocketAddr>,
    /// Connections per reactor, for choosing the least-loaded one (their sum is every
    /// connection the target holds).
    pub loads: Vec<AtomicUsize>,
    /// Connections per portal (index into `portals`).
    pub portal_conns: Vec<AtomicUsize>,
    /// The most connections the file descriptor limit leaves room for, after the reserve of
    /// the RPC server and the backing files (see [`crate::util::FdBudget`]).
    pub fd_conn_limit: usize,
    /// Connections refused at accept because a limit was reached.
    pub refused: AtomicU64,
    /// Response coalescing, in microseconds (`--coalesce-us`); read by the reactors on
    /// every pass.
    pub coalesce_us: AtomicU64,
    tsih: AtomicU16,
}

impl Shared {
    pub fn new(
        publisher: Arc<Publisher>,
        registry: Arc<Registry>,
        portals: Vec<SocketAddr>,
        reactors: usize,
        fd_conn_limit: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            publisher,
            registry,
            portal_conns: portals.iter().map(|_| AtomicUsize::new(0)).collect(),
            portals,
            loads: (0..reactors).map(|_| AtomicUsize::new(0)).collect(),
            fd_conn_limit,
            refused: AtomicU64::new(0),
            coalesce_us: AtomicU64::new(DEFAULT_COALESCE_US),
            tsih: AtomicU16::new(0),
        })
    }

    /// Every connection the target holds, on all reactors.
    pub fn connections(&self) -> usize {
        self.loads.iter().map(|l| l.load(Ordering::Relaxed)).sum()
    }

    /// Why one more connection through portal `portal` must be refused, if it must.
    fn over_limit(&self, snap: &Snapshot, portal: usize) -> Option<String> {
        let total = self.connections();
        let configured = match snap.max_connections {
            0 => usize::MAX,
            n => n,
        };
        if total >= configured.min(self.fd_conn_limit) {
            return Some(if configured <= self.fd_conn_limit {
                format!("{total} connections, max_connections is {configured}")
            } else {
                format!("{total} connections, as many as the file descriptor limit leaves room for")
            });
        }
        let here = self
            .portal_conns
            .get(portal)
            .map_or(0, |c| c.load(Ordering::Relaxed));
        let per_portal = snap.max_connections_per_portal;
        if per_portal > 0 && here >= per_portal {
            return Some(format!(
                "{here} connections through this portal, max_connections_per_portal is {per_portal}"
            ));
        }
        None
    }

    pub fn portals_for(&self, local: SocketAddr) -> Vec<String> {
        self.portals
            .iter()
            .map(|p| {
                let addr = if p.ip().is_unspecified() {
                    SocketAddr::new(local.ip(), p.port())
                } else {
                    *p
                };
                match addr {
                    SocketAddr::V4(a) => format!("{}:{},1", a.ip(), a.port()),
                    SocketAddr::V6(a) => format!("[{}]:{},1", a.ip(), a.port()),
                }
            })
            .collect()
    }

    /// A new non-zero TSIH (RFC 7143 §11.12.6: zero means "new session").
    pub fn next_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }
}

/// The timer granularity of connections (NOP-In, RspTimeout, login timeout).
const TIMER_PERIOD: Duration = Duration::from_millis(100);
/// Epoll sleeps in whole milliseconds: backend I/O coming due sooner than this is waited for
/// by spinning, so that an injected delay is not stretched by the sleep's rounding.
const SLEEP_RESOLUTION: Duration = Duration::from_millis(1);
/// How long the listeners stay unwatched after accept ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often running out of descriptors at accept is logged: a starved portal alternates
/// between failures and the odd success (a refused connection frees its descriptor), and each
/// turn would otherwise be a new warning.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// At most one log line per this interval about refused connections.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(1);

pub struct Engine {
    id: usize,
    shared: Arc<Shared>,
    peers: Vec<ReactorHandle<Msg>>,
    group: Box<dyn SockGroup>,
    /// Indexed by socket handle.
    conns: Vec<Option<Conn>>,
    port: ScsiPort,
    snapshot: Arc<Snapshot>,
    generation: u64,
    completions: Vec<Completion>,
    events: Vec<Event>,
    /// Connections to flush at the end of this pass, and which are in that list.
    to_flush: Vec<usize>,
    flush_marks: Vec<bool>,
    /// Task management functions of our connections waiting for every reactor: id →
    /// (connection, its I_T nexus, ITT, reactors still to answer).
    tmf_pending: std::collections::HashMap<u64, (usize, u64, u32, usize)>,
    next_tmf: u64,
    /// When the shutdown stops waiting for initiators to log out.
    shutdown_at: Option<Instant>,
    /// Task management functions applied here whose answer (AbortDone to the reactor of
    /// `.1`) waits until no task they aborted has I/O out in the backend.
    acks_pending: Vec<(u64, usize)>,
    /// Connections whose receive budget ran out (see `Conn::rx_more`).
    rx_pending: Vec<usize>,
    next_timer: Instant,
    /// Accept stopped for want of file descriptors: the listeners are watched again then.
    accept_backoff: Option<Instant>,
    /// When running out of descriptors at accept was last logged.
    accept_warned: Option<Instant>,
    /// The portals could not be watched: accept on every pass instead.
    accept_every_pass: bool,
    /// Response coalescing: how long a connection's output may wait for more responses
    /// (`Shared::coalesce_us`), and the connections whose output is waiting.
    hold: Duration,
    held: Vec<usize>,
    /// Refusals not yet logged, and when the last log line about them went out.
    refused_unlogged: u64,
    refused_logged_at: Option<Instant>,
}

/// Queues connection `idx` for this pass's flush, once.
fn mark_flush(list: &mut Vec<usize>, marks: &mut Vec<bool>, idx: usize) {
    if marks.len() <= idx {
        marks.resize(idx + 1, false);
    }
    if !marks[idx] {
        marks[idx] = true;
        list.push(idx);
    }
}

impl Engine {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        peers: Vec<ReactorHandle<Msg>>,
        group: Box<dyn SockGroup>,
        now: Instant,
    ) -> Engine {
        let snapshot = shared.publisher.current();
        let generation = snapshot.generation;
        let mut group = group;
        let mut accept_every_pass = false;
        if let Err(e) = group.watch_portals(true) {
            warn!("reactor {id}: cannot watch the portals: {e}; accepting on every pass");
            accept_every_pass = true;
        }
        Engine {
            id,
            shared,
            peers,
            group,
            conns: Vec::new(),
            port: ScsiPort::new(),
            snapshot,
            generation,
            completions: Vec::with_capacity(256),
            events: Vec::with_capacity(256),
            to_flush: Vec::with_capacity(256),
            flush_marks: Vec::with_capacity(256),
            tmf_pending: std::collections::HashMap::new(),
            next_tmf: 0,
            shutdown_at: None,
            acks_pending: Vec::new(),
            rx_pending: Vec::new(),
            next_timer: now + TIMER_PERIOD,
            accept_backoff: None,
            accept_warned: None,
            accept_every_pass,
            refused_unlogged: 0,
            refused_logged_at: None,
            hold: Duration::ZERO,
            held: Vec::new(),
        }
    }

    /// Takes on socket `sock` of our group as a connection through portal `portal`.
    fn add_conn(&mut self, sock: SockId, portal: usize, now: Instant) {
        let idx = sock.0;
        if self.conns.len() <= idx {
            self.conns.resize_with(idx + 1, || None);
        }
        let conn = Conn::new(sock, self.group.addrs(sock), portal, now);
        self.shared.loads[self.id].fetch_add(1, Ordering::Relaxed);
        self.conns[idx] = Some(conn);
    }

    /// Adopts a connection another reactor accepted.
    fn adopt(&mut self, d: Detached, portal: usize, now: Instant) {
        match self.group.attach(d) {
            Ok(s) => self.add_conn(s, portal, now),
            Err(e) => {
                warn!("reactor {}: cannot poll a new connection: {e}", self.id);
                if let Some(c) = self.shared.portal_conns.get(portal) {
                    c.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Accepts what is pending on every portal.
    fn accept_all(&mut self, now: Instant) -> bool {
        let mut did = false;
        for li in 0..self.shared.portals.len() {
            did |= self.accept(li, now);
        }
        did
    }

    /// Accepts the connections pending on portal `li` and hands each to the least-loaded
    /// reactor, refusing those beyond the connection limits (RFC 7143 leaves admission to
    /// the target; a refused connection is closed before any login).
    fn accept(&mut self, li: usize, now: Instant) -> bool {
        let mut did = false;
        while self.accept_backoff.is_none() {
            let sock = match self.group.accept(li) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) if out_of_descriptors(&e) => {
                    // The pending connection stays queued and the listener readable: stop
                    // watching it for a moment rather than spin on a full descriptor table.
                    if self
                        .accept_warned
                        .is_none_or(|t| now >= t + ACCEPT_WARN_EVERY)
                    {
                        self.accept_warned = Some(now);
                        warn!(
                            "reactor {}: cannot accept on {}: {e}; retrying every {} ms",
                            self.id,
                            self.shared
                                .portals
                                .get(li)
                                .map_or("?".into(), |a| a.to_string()),
                            ACCEPT_BACKOFF.as_millis()
                        );
                    }
                    self.accept_backoff = Some(now + ACCEPT_BACKOFF);
                    let _ = self.group.watch_portals(false);
                    break;
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    break;
                }
            };
            did = true;
            // targets/iscsi/enabled = 0 takes no new connection; the limits take no more.
            let why = if self.snapshot.iscsi_enabled {
                self.shared.over_limit(&self.snapshot, li)
            } else {
                Some("iSCSI is disabled".to_string())
            };
            if let Some(why) = why {
                if self.snapshot.iscsi_enabled {
                    // Counted before the close, so whoever sees the close sees the count.
                    self.shared.refused.fetch_add(1, Ordering::Relaxed);
                }
                let (peer, _) = self.group.addrs(sock);
                self.group.release(sock);
                self.note_refusal(peer, &why, now);
                continue;
            }
            if let Some(c) = self.shared.portal_conns.get(li) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            // Least-loaded reactor, this one on ties.
            let mut best = self.id;
            let mut best_load = self.shared.loads[self.id].load(Ordering::Relaxed);
            for (i, l) in self.shared.loads.iter().enumerate() {
                let l = l.load(Ordering::Relaxed);
                if l < best_load {
                    best = i;
                    best_load = l;
                }
            }
            // A stack that cannot move a connection keeps it here.
            let moved = if best == self.id {
                None
            } else {
                self.group.detach(sock)
            };
            match moved {
                None => self.add_conn(sock, li, now),
                Some(d) => {
                    // Count it at once so a burst of accepts spreads out.
                    self.shared.loads[best].fetch_add(1, Ordering::Relaxed);
                    if let Err(Msg::Conn(d, _)) = self.peers[best].send(Msg::Conn(d, li)) {
                        self.shared.loads[best].fetch_sub(1, Ordering::Relaxed);
                        self.adopt(d, li, now);
                    }
                }
            }
        }
        did
    }

    /// Answers the task management functions applied here once none of the tasks they
    /// aborted has I/O out in the backend (SAM-5: the function is complete when the tasks can
    /// no longer change the medium).
    fn send_acks(&mut self) {
        if self
            .conns
            .iter()
            .flatten()
            .any(Conn::has_aborted_in_backend)
        {
            return;
        }
        for (id, reply_to) in std::mem::take(&mut self.acks_pending) {
            if let Some(p) = self.peers.get(reply_to) {
                let _ = p.send(Msg::AbortDone { id });
            }
        }
    }

    /// Logs a refused connection, at most once per [`REFUSED_LOG_INTERVAL`] with the number
    /// refused since: a flood of connections must not become a flood of log lines.
    fn note_refusal(&mut self, peer: SocketAddr, why: &str, now: Instant) {
        self.refused_unlogged += 1;
        if self
            .refused_logged_at
            .is_none_or(|t| now >= t + REFUSED_LOG_INTERVAL)
        {
            warn!(
                "connection from {peer} refused ({} since the last report): {why}",
                self.refused_unlogged
            );
            self.refused_unlogged = 0;
            self.refused_logged_at = Some(now);
        }
    }

    /// Watches the listeners again once the accept back-off is over.
    fn end_accept_backoff(&mut self, now: Instant) {
        if self.accept_backoff.is_some_and(|t| now >= t) {
            self.accept_backoff = None;
            if let Err(e) = self.group.watch_portals(true) {
                warn!("reactor {}: cannot watch the portals again: {e}", self.id);
                self.accept_every_pass = true;
            }
        }
    }

    fn reap(&mut self, idx: usize) {
        let finished = self.conns[idx].as_ref().is_some_and(Conn::is_finished);
        if finished {
            if let Some(mut c) = self.conns[idx].take() {
                c.release_session(&self.shared.registry);
                self.group.release(c.sock());
                if let Some(p) = self.shared.portal_conns.get(c.portal()) {
                    p.fetch_sub(1, Ordering::Relaxed);
                }
            }
            self.shared.loads[self.id].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Hands this pass's backend completions to their connections (whose responses go out
    /// with the pass's flush); returns whether there were any.
    fn complete_backend_io(&mut self, now: Instant) -> bool {
        self.completions.clear();
        if self.port.poll(&mut self.completions) == 0 {
            return false;
        }
        for c in self.completions.drain(..) {
            let (idx, slot) = split_task_tag(c.tag());
            if let Some(conn) = self.conns.get_mut(idx).and_then(Option::as_mut) {
                let mut cx = conn_cx!(self, now, idx);
                conn.on_completion(slot, c, &mut cx);
                mark_flush(&mut self.to_flush, &mut self.flush_marks, idx);
            }
        }
        true
    }
}

impl Poller for Engine {
    type Msg = Msg;

    fn poll(&mut self, ctx: &mut Ctx) -> bool {
        let now = ctx.now();
        let mut did = false;
        // Configuration changes (one atomic load when nothing changed).
        let g = self.shared.publisher.generation();
        if g != self.generation {
            self.snapshot = self.shared.publisher.current();
            self.generation = self.snapshot.generation;
            for idx in 0..self.conns.len() {
                if let Some(c) = self.conns[idx].as_mut() {
                    let mut cx = conn_cx!(self, now, idx);
                    let snap = cx.snapshot;
                    c.on_snapshot(snap, &mut cx);
                    mark_flush(&mut self.to_flush, &mut self.flush_marks, idx);
                }
            }
        }
        if self.accept_backoff.is_some() {
            self.end_accept_backoff(now);
        }
        if self.accept_every_pass {
            did |= self.accept_all(now);
        }
        // Socket readiness.
        self.events.clear();
        match self.group.poll(now, &mut self.events) {
            Ok(net_did) => did |= net_did,
            Err(e) => warn!("reactor {}: socket poll failed: {e}", self.id),
        }
        // Connections that stopped at their receive budget get another turn even though their
        // socket may report nothing new: complete PDUs can be waiting in their staging buffer.
        for idx in self.rx_pending.drain(..) {
            did = true;
            self.events.push(Event::Sock(
                SockId(idx),
                Readiness {
                    readable: true,
                    writable: false,
                },
            ));
        }
        for ei in 0..self.events.len() {
            let (idx, readiness) = match self.events[ei] {
                Event::Accept(li) => {
                    did |= self.accept(li, now);
                    continue;
                }
                Event::Sock(s, r) => (s.0, r),
            };
            if let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) {
                let mut cx = conn_cx!(self, now, idx);
                if readiness.readable {
                    did |= c.on_readable(&mut cx);
                    spread_tmfs(
                        c,
                        idx,
                        self.id,
                        &mut self.next_tmf,
                        &mut self.tmf_pending,
                        &self.peers,
                    );
                    if c.rx_more() && !self.rx_pending.contains(&idx) {
                        self.rx_pending.push(idx);
                    }
                }
                if readiness.readable || readiness.writable || c.wants_write() {
                    mark_flush(&mut self.to_flush, &mut self.flush_marks, idx);
                }
            }
        }
        did |= self.complete_backend_io(now);
        if !self.acks_pending.is_empty() {
            self.send_acks();
        }
        // Commands parked on an exhausted buffer pool try again (completions above may have
        // freed buffers).
        for idx in 0..self.conns.len() {
            if let Some(conn) = self.conns[idx].as_mut().filter(|c| c.has_buf_waiters()) {
                let mut cx = conn_cx!(self, now, idx);
                if conn.retry_buffers(&mut cx) {
                    spread_tmfs(
                        conn,
                        idx,
                        self.id,
                        &mut self.next_tmf,
                        &mut self.tmf_pending,
                        &self.peers,
                    );
                    did = true;
                    mark_flush(&mut self.to_flush, &mut self.flush_marks, idx);
                }
            }
        }
        // Output held back last pass for more responses to join it.
        self.hold = Duration::from_micros(self.shared.coalesce_us.load(Ordering::Relaxed));
        for i in 0..self.held.len() {
            let idx = self.held[i];
            mark_flush(&mut self.to_flush, &mut self.flush_marks, idx);
        }
        self.held.clear();
        // One writev per connection for everything this pass produced.
        for i in 0..self.to_flush.len() {
            let idx = self.to_flush[i];
            self.flush_marks[idx] = false;
            if let Some(c) = self.conns[idx].as_mut() {
                if c.hold_output(now, self.hold, COALESCE_MAX_PDUS) {
                    self.held.push(idx);
                    continue;
                }
                let mut cx = conn_cx!(self, now, idx);
                c.flush(&mut cx);
                let (read, write) = (c.wants_read(), c.wants_write());
                self.group.set_interest(c.sock(), read, write);
            }
            self.reap(idx);
        }
        self.to_flush.clear();
        // Everything this pass queued leaves in one go.
        self.group.flush(now);
        // Timers.
        if now >= self.next_timer {
            self.next_timer = now + TIMER_PERIOD;
            for idx in 0..self.conns.len() {
                if let Some(conn) = self.conns[idx].as_mut() {
                    let mut cx = conn_cx!(self, now, idx);
                    conn.on_timer(&mut cx);
                    let (read, write) = (conn.wants_read(), conn.wants_write());
                    self.group.set_interest(conn.sock(), read, write);
                }
                self.reap(idx);
            }
        }
        did
    }

    fn handle(&mut self, msg: Msg, ctx: &mut Ctx) {
        match msg {
            Msg::Conn(d, portal) => {
                // Counted by the sender already.
                self.shared.loads[self.id].fetch_sub(1, Ordering::Relaxed);
                self.adopt(d, portal, ctx.now());
            }
            Msg::Abort {
                id,
                scope,
                reply_to,
            } => {
                let now = ctx.now();
                for idx in 0..self.conns.len() {
                    if let Some(c) = self.conns[idx].as_mut() {
                        let mut cx = conn_cx!(self, now, idx);
                        c.apply_abort(&scope, &mut cx);
                        c.flush(&mut cx);
                        let (read, write) = (c.wants_read(), c.wants_write());
                        self.group.set_interest(c.sock(), read, write);
                    }
                    self.reap(idx);
                }
                self.acks_pending.push((id, reply_to));
                self.send_acks();
            }
            Msg::AbortDone { id } => {
                let Some(e) = self.tmf_pending.get_mut(&id) else {
                    return;
                };
                e.3 -= 1;
                if e.3 > 0 {
                    return;
                }
                let (idx, nexus, itt, _) = e.to_owned();
                self.tmf_pending.remove(&id);
                let now = ctx.now();
                // The connection may have gone (and its slot been reused) meanwhile.
                let same = |c: &&mut Conn| c.nexus() == Some(nexus);
                if let Some(c) = self
                    .conns
                    .get_mut(idx)
                    .and_then(Option::as_mut)
                    .filter(same)
                {
                    let mut cx = conn_cx!(self, now, idx);
                    c.tmf_done(itt, &mut cx);
                    c.flush(&mut cx);
                    let (read, write) = (c.wants_read(), c.wants_write());
                    self.group.set_interest(c.sock(), read, write);
                }
                self.reap(idx);
            }
        }
    }

    fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        let timer = self
            .conns
            .iter()
            .any(Option::is_some)
            .then_some(self.next_timer);
        let held = self
            .held
            .iter()
            .filter_map(|&i| self.conns.get(i).and_then(Option::as_ref))
            .filter_map(|c| c.held_until(self.hold))
            .min();
        // The network's own timers (the userspace stack's retransmissions, delayed ACKs),
        // backend I/O held by an injected delay, and output held for coalescing.
        [
            timer,
            self.accept_backoff,
            self.group.next_deadline(now),
            self.port.next_deadline(),
            held,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn sleep(&mut self, timeout: Duration) -> bool {
        // Ring completions do not wake epoll: never sleep while backend I/O is in flight.
        if self.port.inflight() > 0 {
            return false;
        }
        if self
            .port
            .next_deadline()
            .is_some_and(|d| d.saturating_duration_since(Instant::now()) < SLEEP_RESOLUTION)
        {
            return false;
        }
        match self.group.wait(Some(timeout)) {
            Ok(woken) => woken,
            Err(e) => {
                warn!("reactor {}: wait failed: {e}", self.id);
                false
            }
        }
    }

    fn shutdown(&mut self, ctx: &mut Ctx) -> bool {
        let now = ctx.now();
        self.group.close_portals();
        // First ask every logged-in initiator to log out (AsyncEvent 1) and give them
        // LOGOUT_GRACE to do so while the reactor keeps polling; then close what is left.
        let deadline = *self.shutdown_at.get_or_insert_with(|| {
            let mut asked = 0;
            for idx in 0..self.conns.len() {
                if let Some(c) = self.conns[idx].as_mut() {
                    if c.request_logout(LOGOUT_GRACE.as_secs() as u16) {
                        asked += 1;
                        let mut cx = conn_cx!(self, now, idx);
                        c.flush(&mut cx);
                    }
                }
            }
            if asked > 0 {
                info!("reactor {}: asked {asked} initiator(s) to log out", self.id);
                now + LOGOUT_GRACE
            } else {
                now
            }
        });
        let waiting = self
            .conns
            .iter()
            .flatten()
            .any(|c| c.phase() == Phase::FullFeature);
        if now < deadline && waiting {
            return false;
        }
        for idx in 0..self.conns.len() {
            if let Some(conn) = self.conns[idx].as_mut() {
                if conn.phase() != Phase::Closed {
                    let mut cx = conn_cx!(self, now, idx);
                    conn.close(&mut cx, "target shutting down");
                }
            }
        }
        // Let backend I/O drain so buffers return.
        self.complete_backend_io(now);
        for idx in 0..self.conns.len() {
            self.reap(idx);
        }
        self.conns.iter().all(Option::is_none)
    }
}

/// Whether accept failed for want of file descriptors or memory (the connection stays in the
/// backlog, so retrying at once would spin).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Hands the task management functions (and PREEMPT AND ABORTs) of connection `c` (index
/// `idx` on reactor `me`) that reach other sessions to every reactor, this one included;
/// each answers, and the connection responds once all have.
fn spread_tmfs(
    c: &mut Conn,
    idx: usize,
    me: usize,
    next_tmf: &mut u64,
    tmf_pending: &mut std::collections::HashMap<u64, (usize, u64, u32, usize)>,
    peers: &[ReactorHandle<Msg>],
) {
    while let Some((scope, itt)) = c.take_tmf() {
        let id = ((me as u64) << 48) | *next_tmf;
        *next_tmf += 1;
        let nexus = c.nexus().unwrap_or(0);
        tmf_pending.insert(id, (idx, nexus, itt, peers.len()));
        for p in peers {
            let m = Msg::Abort {
                id,
                scope: scope.clone(),
                reply_to: me,
            };
            if p.send(m).is_err() {
                // A reactor that is gone has nothing left to abort.
                if let Some(e) = tmf_pending.get_mut(&id) {
                    e.3 -= 1;
                }
            }
        }
    }
}

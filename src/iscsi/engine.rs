//! The iSCSI engine of one reactor: its connections, its socket group, its SCSI port (the
//! per-reactor channels to the backends) and, on the first reactor, the portals' listeners.
//!
//! New connections are accepted on the first reactor and handed to the least-loaded reactor
//! by message: connections, not targets, are the unit spread over cores, so many sessions to
//! one busy target use every reactor.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::iscsi::config::{Publisher, Snapshot};
use crate::iscsi::conn::{split_task_tag, AbortScope, Conn, ConnCtx, Phase};
use crate::iscsi::registry::Registry;
use crate::net::{Listener, Readiness, Sock, SockGroup};
use crate::reactor::{Ctx, Poller, ReactorHandle};
use crate::scsi::{Completion, ScsiPort};

/// The context a connection's handlers get: the engine's shared state and SCSI port, borrowed
/// beside `self.conns` (a method could not borrow both).
macro_rules! conn_cx {
    ($engine:ident, $now:expr, $snap:expr, $idx:expr) => {
        ConnCtx {
            now: $now,
            snapshot: $snap,
            shared: &$engine.shared,
            port: &mut $engine.port,
            index: $idx,
        }
    };
}

/// Messages between reactors.
/// How long a stopping target waits for initiators to log out after asking them.
const LOGOUT_GRACE: Duration = Duration::from_secs(2);

pub enum Msg {
    /// A connection accepted on another reactor, now ours.
    Conn(Box<dyn Sock>),
    /// Apply another nexus's task management function here, then answer `reply_to`.
    Abort {
        id: u64,
        scope: AbortScope,
        reply_to: usize,
    },
    /// One reactor has applied task management function `id`.
    AbortDone { id: u64 },
}

/// State shared by every reactor's engine.
pub struct Shared {
    pub publisher: Arc<Publisher>,
    pub registry: Arc<Registry>,
    /// The portals, for SendTargets when a portal listens on a wildcard address the
    /// connection's own local address is used instead.
    pub portals: Vec<SocketAddr>,
    /// Connections per reactor, for choosing the least-loaded one.
    pub loads: Vec<AtomicUsize>,
    tsih: AtomicU16,
}

impl Shared {
    pub fn new(
        publisher: Arc<Publisher>,
        registry: Arc<Registry>,
        portals: Vec<SocketAddr>,
        reactors: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            publisher,
            registry,
            portals,
            loads: (0..reactors).map(|_| AtomicUsize::new(0)).collect(),
            tsih: AtomicU16::new(0),
        })
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

pub struct Engine {
    id: usize,
    shared: Arc<Shared>,
    peers: Vec<ReactorHandle<Msg>>,
    group: Box<dyn SockGroup>,
    listeners: Vec<Box<dyn Listener>>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    port: ScsiPort,
    snapshot: Arc<Snapshot>,
    generation: u64,
    completions: Vec<Completion>,
    events: Vec<(usize, Readiness)>,
    /// Connections to flush at the end of this pass.
    to_flush: Vec<usize>,
    /// Task management functions of our connections waiting for every reactor: id →
    /// (connection, its I_T nexus, ITT, reactors still to answer).
    tmf_pending: std::collections::HashMap<u64, (usize, u64, u32, usize)>,
    next_tmf: u64,
    /// When the shutdown stops waiting for initiators to log out.
    shutdown_at: Option<Instant>,
    /// Connections whose receive budget ran out (see `Conn::rx_more`).
    rx_pending: Vec<usize>,
    next_timer: Instant,
}

fn mark_flush(list: &mut Vec<usize>, c: &mut Conn, idx: usize) {
    if !c.pending_flush {
        c.pending_flush = true;
        list.push(idx);
    }
}

impl Engine {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        peers: Vec<ReactorHandle<Msg>>,
        group: Box<dyn SockGroup>,
        listeners: Vec<Box<dyn Listener>>,
        now: Instant,
    ) -> Engine {
        let snapshot = shared.publisher.current();
        let generation = snapshot.generation;
        Engine {
            id,
            shared,
            peers,
            group,
            listeners,
            conns: Vec::new(),
            free: Vec::new(),
            port: ScsiPort::new(),
            snapshot,
            generation,
            completions: Vec::with_capacity(256),
            events: Vec::with_capacity(256),
            to_flush: Vec::with_capacity(256),
            tmf_pending: std::collections::HashMap::new(),
            next_tmf: 0,
            shutdown_at: None,
            rx_pending: Vec::new(),
            next_timer: now + TIMER_PERIOD,
        }
    }

    fn add_conn(&mut self, sock: Box<dyn Sock>, now: Instant) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        let mut conn = Conn::new(sock, now);
        if let Err(e) = self.group.register(conn.sock_mut(), idx) {
            warn!("reactor {}: cannot poll a new connection: {e}", self.id);
            conn.sock_mut().close();
            self.free.push(idx);
            return;
        }
        self.shared.loads[self.id].fetch_add(1, Ordering::Relaxed);
        self.conns[idx] = Some(conn);
    }

    fn accept(&mut self, now: Instant) -> bool {
        let mut did = false;
        for li in 0..self.listeners.len() {
            loop {
                let sock = match self.listeners[li].accept() {
                    Ok(Some(s)) => s,
                    Ok(None) => break,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        break;
                    }
                };
                did = true;
                if !self.snapshot.iscsi_enabled {
                    // targets/iscsi/enabled = 0: accept no new connections.
                    let mut sock = sock;
                    info!(
                        "connection from {} refused: iSCSI is disabled",
                        sock.peer_addr()
                    );
                    sock.close();
                    continue;
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
                if best == self.id {
                    self.add_conn(sock, now);
                } else {
                    // Count it at once so a burst of accepts spreads out.
                    self.shared.loads[best].fetch_add(1, Ordering::Relaxed);
                    if let Err(Msg::Conn(s)) = self.peers[best].send(Msg::Conn(sock)) {
                        self.shared.loads[best].fetch_sub(1, Ordering::Relaxed);
                        self.add_conn(s, now);
                    }
                }
            }
        }
        did
    }

    fn reap(&mut self, idx: usize) {
        let finished = self.conns[idx].as_ref().is_some_and(Conn::is_finished);
        if finished {
            if let Some(mut c) = self.conns[idx].take() {
                let _ = self.group.deregister(c.sock_mut(), idx);
            }
            self.free.push(idx);
            self.shared.loads[self.id].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Hands this pass's backend completions to their connections (whose responses go out
    /// with the pass's flush); returns whether there were any.
    fn complete_backend_io(&mut self, now: Instant, snap: &Arc<Snapshot>) -> bool {
        self.completions.clear();
        if self.port.poll(&mut self.completions) == 0 {
            return false;
        }
        for c in self.completions.drain(..) {
            let (idx, slot) = split_task_tag(c.tag());
            if let Some(conn) = self.conns.get_mut(idx).and_then(Option::as_mut) {
                let mut cx = conn_cx!(self, now, snap, idx);
                conn.on_completion(slot, c, &mut cx);
                mark_flush(&mut self.to_flush, conn, idx);
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
            let snap = self.snapshot.clone();
            for idx in 0..self.conns.len() {
                if let Some(c) = self.conns[idx].as_mut() {
                    let mut cx = conn_cx!(self, now, &snap, idx);
                    c.on_snapshot(&snap, &mut cx);
                    mark_flush(&mut self.to_flush, c, idx);
                }
            }
        }
        if !self.listeners.is_empty() {
            did |= self.accept(now);
        }
        // Socket readiness.
        self.events.clear();
        if let Err(e) = self.group.poll(&mut self.events) {
            warn!("reactor {}: socket poll failed: {e}", self.id);
        }
        // Connections that stopped at their receive budget get another turn even though their
        // socket may report nothing new: complete PDUs can be waiting in their staging buffer.
        for idx in self.rx_pending.drain(..) {
            did = true;
            self.events.push((
                idx,
                Readiness {
                    readable: true,
                    writable: false,
                },
            ));
        }
        let snap = self.snapshot.clone();
        for ei in 0..self.events.len() {
            let (idx, readiness) = self.events[ei];
            if let Some(c) = self.conns[idx].as_mut() {
                let mut cx = conn_cx!(self, now, &snap, idx);
                if readiness.readable {
                    did |= c.on_readable(&mut cx);
                    if let Some((scope, itt)) = c.tmf_out.take() {
                        // Every reactor (this one included) applies it, then answers.
                        let id = ((self.id as u64) << 48) | self.next_tmf;
                        self.next_tmf += 1;
                        let nexus = c.nexus().unwrap_or(0);
                        self.tmf_pending
                            .insert(id, (idx, nexus, itt, self.peers.len()));
                        for p in &self.peers {
                            let m = Msg::Abort {
                                id,
                                scope: scope.clone(),
                                reply_to: self.id,
                            };
                            if p.send(m).is_err() {
                                // A reactor that is gone has nothing left to abort.
                                if let Some(e) = self.tmf_pending.get_mut(&id) {
                                    e.3 -= 1;
                                }
                            }
                        }
                    }
                    if c.rx_more && !self.rx_pending.contains(&idx) {
                        self.rx_pending.push(idx);
                    }
                }
                if readiness.readable || readiness.writable || c.want_write {
                    mark_flush(&mut self.to_flush, c, idx);
                }
            }
        }
        did |= self.complete_backend_io(now, &snap);
        // Commands parked on an exhausted buffer pool try again (completions above may have
        // freed buffers).
        for idx in 0..self.conns.len() {
            if let Some(conn) = self.conns[idx].as_mut().filter(|c| c.has_buf_waiters()) {
                let mut cx = conn_cx!(self, now, &snap, idx);
                if conn.retry_buffers(&mut cx) {
                    did = true;
                    mark_flush(&mut self.to_flush, conn, idx);
                }
            }
        }
        // One writev per connection for everything this pass produced.
        for i in 0..self.to_flush.len() {
            let idx = self.to_flush[i];
            if let Some(c) = self.conns[idx].as_mut() {
                c.pending_flush = false;
                let mut cx = conn_cx!(self, now, &snap, idx);
                c.flush(&mut cx);
                let want = c.want_write;
                let _ = self.group.set_write_interest(c.sock_mut(), idx, want);
            }
            self.reap(idx);
        }
        self.to_flush.clear();
        // Timers.
        if now >= self.next_timer {
            self.next_timer = now + TIMER_PERIOD;
            for idx in 0..self.conns.len() {
                if let Some(conn) = self.conns[idx].as_mut() {
                    let mut cx = conn_cx!(self, now, &snap, idx);
                    conn.on_timer(&mut cx);
                    let want = conn.want_write;
                    let _ = self.group.set_write_interest(conn.sock_mut(), idx, want);
                }
                self.reap(idx);
            }
        }
        did
    }

    fn handle(&mut self, msg: Msg, ctx: &mut Ctx) {
        match msg {
            Msg::Conn(sock) => {
                // Counted by the sender already.
                self.shared.loads[self.id].fetch_sub(1, Ordering::Relaxed);
                self.add_conn(sock, ctx.now());
            }
            Msg::Abort {
                id,
                scope,
                reply_to,
            } => {
                let now = ctx.now();
                let snap = self.snapshot.clone();
                for idx in 0..self.conns.len() {
                    if let Some(c) = self.conns[idx].as_mut() {
                        let mut cx = conn_cx!(self, now, &snap, idx);
                        c.apply_abort(&scope, &mut cx);
                        c.flush(&mut cx);
                        let want = c.want_write;
                        let _ = self.group.set_write_interest(c.sock_mut(), idx, want);
                    }
                    self.reap(idx);
                }
                let _ = self.peers[reply_to].send(Msg::AbortDone { id });
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
                let snap = self.snapshot.clone();
                // The connection may have gone (and its slot been reused) meanwhile.
                let same = |c: &&mut Conn| c.nexus() == Some(nexus);
                if let Some(c) = self
                    .conns
                    .get_mut(idx)
                    .and_then(Option::as_mut)
                    .filter(same)
                {
                    let mut cx = conn_cx!(self, now, &snap, idx);
                    c.tmf_done(itt);
                    c.flush(&mut cx);
                    let want = c.want_write;
                    let _ = self.group.set_write_interest(c.sock_mut(), idx, want);
                }
                self.reap(idx);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.conns.iter().any(Option::is_some) {
            Some(self.next_timer)
        } else {
            None
        }
    }

    fn sleep(&mut self, timeout: Duration) {
        // Ring completions do not wake epoll: never sleep while backend I/O is in flight.
        if self.port.inflight() > 0 {
            return;
        }
        if let Err(e) = self.group.wait(Some(timeout)) {
            warn!("reactor {}: wait failed: {e}", self.id);
        }
    }

    fn shutdown(&mut self, ctx: &mut Ctx) -> bool {
        let now = ctx.now();
        let snap = self.snapshot.clone();
        for l in &mut self.listeners {
            l.close();
        }
        // First ask every logged-in initiator to log out (AsyncEvent 1) and give them
        // LOGOUT_GRACE to do so while the reactor keeps polling; then close what is left.
        let deadline = *self.shutdown_at.get_or_insert_with(|| {
            let mut asked = 0;
            for idx in 0..self.conns.len() {
                if let Some(c) = self.conns[idx].as_mut() {
                    if c.request_logout(LOGOUT_GRACE.as_secs() as u16) {
                        asked += 1;
                        let mut cx = conn_cx!(self, now, &snap, idx);
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
            .any(|c| c.phase == Phase::FullFeature);
        if now < deadline && waiting {
            return false;
        }
        for idx in 0..self.conns.len() {
            if let Some(conn) = self.conns[idx].as_mut() {
                if conn.phase != Phase::Closed {
                    let mut cx = conn_cx!(self, now, &snap, idx);
                    conn.close(&mut cx, "target shutting down");
                }
            }
        }
        // Let backend I/O drain so buffers return.
        self.complete_backend_io(now, &snap);
        for idx in 0..self.conns.len() {
            self.reap(idx);
        }
        self.conns.iter().all(Option::is_none)
    }
}

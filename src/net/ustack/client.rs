//! The initiator's side of the userspace stack: active opens over one device queue, for a
//! load generator that runs where the target does (on a packet socket, later on a DPDK port)
//! without the kernel's TCP.
//!
//! A [`ClientStack`] is one smoltcp interface and socket set over one queue ([`Stack`], as a
//! target reactor has), owned by whoever calls it: there is no thread behind it. Each
//! [`ClientStream`] is a blocking byte stream, and every read, write or connect drives the
//! whole stack (receive → stack → transmit) until it can make progress: it polls without
//! pause, as a load generator on a core of its own should, and only after an idle spell
//! ([`IDLE_BEFORE_SLEEP`]) sleeps on the device's descriptor until a frame arrives or a timer
//! of the stack is due. Several streams may share one stack, on one thread or on several (it
//! is behind a mutex, so a stream is `Send`); a stream waiting drives the others' traffic
//! too.
//!
//! An active open takes a random free port of the dynamic range (RFC 6335 §6: 49152-65535),
//! resolves the next hop (the portal, or the gateway for a portal off the stack's subnet) with
//! ARP, which smoltcp repeats every second, and sends its SYN, which smoltcp retransmits; it
//! gives up after the stack's `syn_timeout`. A refused port, a reset, a silent peer and a next
//! hop that never answers ARP are `io::Error`s that say which.
//!
//! The stack's address must not also be the kernel's on that interface: frames to it reach
//! the kernel too, and a kernel holding the address answers them with resets.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use smoltcp::iface::{PollIngressSingleResult, SocketHandle};
use smoltcp::socket::{tcp, AnySocket};
use smoltcp::wire::{IpAddress, IpEndpoint};

use super::dev::{DevStats, NetDev};
use super::link::{ArpBus, FlowKey, StackStats};
use super::stack::Stack;
use super::{StackConfig, RX_BUDGET};
use crate::net::wake::epoll_timeout;

/// Polling with nothing to do for this long sends a waiting stream to sleep on the device
/// (as an adaptive reactor does).
pub const IDLE_BEFORE_SLEEP: Duration = Duration::from_micros(200);
/// The longest sleep between two looks at the stack's timers and the caller's deadline.
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// RFC 6335 §6: the dynamic ports, from which a connection's local port is drawn.
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u32 = 16384;
/// Random draws of a local port before giving up on finding a free one.
const PORT_TRIES: usize = 64;

/// A stack for active opens over one device queue; cloning it gives another handle on the
/// same stack.
pub struct ClientStack<D: NetDev> {
    shared: Arc<Shared<D>>,
}

impl<D: NetDev> Clone for ClientStack<D> {
    fn clone(&self) -> Self {
        ClientStack {
            shared: self.shared.clone(),
        }
    }
}

/// What the stack's handles and streams share.
struct Shared<D: NetDev> {
    inner: Mutex<Inner<D>>,
    /// The device's descriptor, to sleep on without holding the lock; `None` when the device
    /// can only be polled.
    epoll: Option<Epoll>,
}

/// The stack and what it knows of its streams.
struct Inner<D: NetDev> {
    stack: Stack<D>,
    /// Streams that are open or opening, for the tail-loss probes.
    streams: Vec<(FlowKey, SocketHandle)>,
    /// xorshift64 state for local ports.
    rng: u64,
}

fn lock<D: NetDev>(m: &Mutex<Inner<D>>) -> MutexGuard<'_, Inner<D>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<D: NetDev> Inner<D> {
    /// The first half of a pass: what arrived into the stack, and a tail-loss probe if one is
    /// due. Returns whether frames arrived. A caller reads or writes its socket between this
    /// and [`Inner::pass_out`], so that what it queued leaves with the ACKs of what came in,
    /// in one flush of the device.
    fn pass_in(&mut self, now: Instant) -> bool {
        let ts = self.stack.ts(now);
        self.stack.iface.poll_maintenance(ts);
        let mut received = false;
        for _ in 0..RX_BUDGET {
            if self.stack.ingress_one(ts) == PollIngressSingleResult::None {
                break;
            }
            received = true;
        }
        self.stack.probe_tails(ts, self.streams.iter().copied());
        received
    }

    /// The second half: what the sockets have to send goes out; closed sockets are retired.
    fn pass_out(&mut self, now: Instant) {
        self.stack.egress(self.stack.ts(now));
        self.stack.housekeeping(now);
    }

    /// A whole pass. Returns whether frames arrived.
    fn pass(&mut self, now: Instant) -> bool {
        let received = self.pass_in(now);
        self.pass_out(now);
        received
    }

    /// When the stack next needs a pass even if nothing arrives.
    fn next_due(&mut self, now: Instant) -> Option<Instant> {
        self.stack.next_due(now, self.streams.iter().copied())
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// A local port no socket of the stack uses.
    fn ephemeral_port(&mut self) -> io::Result<u16> {
        for _ in 0..PORT_TRIES {
            // The remainder is below 16384: it fits a u16 with the base added.
            let port = EPHEMERAL_FIRST + (self.rand() % u64::from(EPHEMERAL_COUNT)) as u16;
            let taken = self
                .stack
                .sockets
                .iter()
                .filter_map(|(_, s)| tcp::Socket::downcast(s))
                .any(|t| t.local_endpoint().is_some_and(|e| e.port == port));
            if !taken {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free local port in 49152-65535",
        ))
    }

    /// Forgets stream `h`: its socket lingers until its FIN handshake ends.
    fn retire(&mut self, h: SocketHandle, key: &FlowKey) {
        self.streams.retain(|&(_, s)| s != h);
        self.stack.forget(key);
        let until = Instant::now() + self.stack.cfg.linger;
        self.stack.linger(h, until);
    }
}

impl<D: NetDev> ClientStack<D> {
    /// A stack over `dev` with `cfg`'s address, gateway and settings (`backlog` and
    /// `max_half_open` are the target's; `syn_timeout` bounds a connect here).
    pub fn new(dev: D, cfg: StackConfig) -> io::Result<ClientStack<D>> {
        cfg.validate()
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        let stack = Stack::new(dev, &cfg, ArpBus::new(1), 0, Arc::default())?;
        let epoll = match stack.link.dev.wait_fd() {
            Some(raw) => {
                let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
                // SAFETY: the device owns `raw` and is alive (in `stack`) for this call.
                // An epoll set drops a descriptor that is closed, so the set may outlive it.
                let b = unsafe { BorrowedFd::borrow_raw(raw) };
                epoll.add(b, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
                Some(epoll)
            }
            None => None,
        };
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(ClientStack {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    stack,
                    streams: Vec::new(),
                    rng: u64::from_le_bytes(seed) | 1,
                }),
                epoll,
            }),
        })
    }

    /// Opens a connection to `peer`, waiting for the handshake at most the stack's
    /// `syn_timeout`.
    pub fn connect(&self, peer: SocketAddr) -> io::Result<ClientStream<D>> {
        let started = Instant::now();
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let mut g = lock(&self.shared.inner);
        let cfg = g.stack.cfg.clone();
        let remote = IpAddress::from(peer.ip());
        let me = cfg.ip.address();
        if peer.port() == 0 || peer.ip().is_unspecified() || peer.ip().is_multicast() {
            return Err(bad(format!("cannot connect to {peer}")));
        }
        if remote.version() != me.version() {
            return Err(bad(format!(
                "{peer} is not of the address family of the stack's address {me}"
            )));
        }
        if remote == me {
            return Err(bad(format!("{peer} is the stack's own address")));
        }
        // The neighbour the SYN goes to, for the error when it never answers ARP.
        let hop = if cfg.ip.contains_addr(&remote) {
            peer.ip()
        } else if let Some(gw) = cfg.gateway {
            gw
        } else {
            return Err(io::Error::new(
                io::ErrorKind::NetworkUnreachable,
                format!("no route to {peer}: not on {} and no gateway", cfg.ip),
            ));
        };
        let port = g.ephemeral_port()?;
        let mut s = g.stack.new_socket();
        s.connect(
            g.stack.iface.context(),
            IpEndpoint::new(remote, peer.port()),
            port,
        )
        .map_err(|e| bad(format!("cannot connect to {peer}: {e}")))?;
        let handle = g.stack.sockets.add(s);
        let key: FlowKey = (remote, peer.port(), port);
        g.streams.push((key, handle));
        drop(g);
        let stream = ClientStream {
            shared: self.shared.clone(),
            handle,
            key,
            peer,
            local: SocketAddr::new(IpAddr::from(me), port),
            timeout: None,
            shut: false,
        };
        let r = block(&self.shared, started + cfg.syn_timeout, |g| {
            let t = g.stack.sockets.get::<tcp::Socket>(handle);
            match t.state() {
                tcp::State::SynSent | tcp::State::SynReceived => None,
                tcp::State::Closed => Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("connection to {peer} refused (reset)"),
                ))),
                _ => Some(Ok(())),
            }
        });
        match r {
            Ok(()) => Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let g = lock(&self.shared.inner);
                // smoltcp sends no SYN until the next hop has answered ARP.
                let syn_sent = g.stack.link.retransmits.last_sent(&key).is_some();
                drop(g);
                let t = cfg.syn_timeout;
                Err(if syn_sent {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connection to {peer} timed out: no answer to SYN within {t:?}"),
                    )
                } else {
                    io::Error::new(
                        io::ErrorKind::HostUnreachable,
                        format!(
                            "connection to {peer} timed out: no ARP answer from {hop} within {t:?}"
                        ),
                    )
                })
            }
            Err(e) => Err(e),
        }
        // A stream that failed to open goes as it drops: aborted, if still half-open.
    }

    /// One pass of the stack without waiting: what arrived in, what is due out. Returns
    /// whether frames arrived.
    pub fn poll(&self) -> bool {
        lock(&self.shared.inner).pass(Instant::now())
    }

    /// Drives the stack until the connections of dropped streams have finished closing, or
    /// `within` has passed (before a program exits, so that its FINs are answered). Returns
    /// whether they all finished.
    pub fn finish(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            let mut g = lock(&self.shared.inner);
            g.pass(Instant::now());
            if g.stack.lingering() == 0 {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            drop(g);
            std::thread::yield_now();
        }
    }

    /// The device's and the stack's counters.
    pub fn stats(&self) -> (Arc<DevStats>, Arc<StackStats>) {
        let g = lock(&self.shared.inner);
        (g.stack.link.dev.stats().clone(), g.stack.link.stats.clone())
    }
}

/// Drives the stack until `step` has an answer or `deadline` passes (`TimedOut`): polling
/// without pause, then, after [`IDLE_BEFORE_SLEEP`] without frames, sleeping on the device
/// until a frame arrives, a timer of the stack is due or the deadline comes. `step` runs
/// between the halves of each pass: what it sends leaves in that pass.
fn block<D: NetDev, R>(
    shared: &Shared<D>,
    deadline: Instant,
    mut step: impl FnMut(&mut Inner<D>) -> Option<io::Result<R>>,
) -> io::Result<R> {
    let mut idle_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut g = lock(&shared.inner);
        let received = g.pass_in(now);
        let r = step(&mut g);
        g.pass_out(now);
        if let Some(r) = r {
            return r;
        }
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if received {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert(now);
        if now.duration_since(since) < IDLE_BEFORE_SLEEP {
            drop(g);
            std::hint::spin_loop();
            continue;
        }
        let Some(epoll) = &shared.epoll else {
            drop(g);
            std::thread::yield_now();
            continue;
        };
        let wake = g
            .next_due(now)
            .map_or(deadline, |t| t.min(deadline))
            .min(now + MAX_SLEEP);
        // The stack is unlocked while this thread sleeps, for the others that use it.
        drop(g);
        if wake <= now {
            // A timer is due (or the device could not take a frame): no sleep, another pass.
            std::thread::yield_now();
            continue;
        }
        let timeout = epoll_timeout(Some(wake.saturating_duration_since(now)));
        let mut evs = [EpollEvent::empty(); 1];
        match epoll.wait(&mut evs, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A connection of a [`ClientStack`], as a blocking byte stream. Dropping it closes the
/// connection (FIN) and leaves the stack to finish the handshake.
pub struct ClientStream<D: NetDev> {
    shared: Arc<Shared<D>>,
    handle: SocketHandle,
    key: FlowKey,
    peer: SocketAddr,
    local: SocketAddr,
    /// How long a read or write may wait (`None`, as a new stream has it: without end).
    timeout: Option<Duration>,
    /// Shut down: reads see the end of the stream, writes fail.
    shut: bool,
}

impl<D: NetDev> ClientStream<D> {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// How long a read or write may wait (`None`: without end).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }

    /// Closes both directions: what was written is still sent, then a FIN.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.shut = true;
        let mut g = lock(&self.shared.inner);
        g.stack.sockets.get_mut::<tcp::Socket>(self.handle).close();
        g.pass(Instant::now());
        Ok(())
    }

    /// Ends the connection at once with a reset; what is unsent is dropped.
    pub fn reset(&mut self) {
        self.shut = true;
        let mut g = lock(&self.shared.inner);
        g.stack.sockets.get_mut::<tcp::Socket>(self.handle).abort();
        g.pass(Instant::now());
    }

    /// The connection's TCP state (ESTABLISHED, ...).
    pub fn state(&self) -> String {
        lock(&self.shared.inner)
            .stack
            .sockets
            .get::<tcp::Socket>(self.handle)
            .state()
            .to_string()
    }

    fn deadline(&self) -> Instant {
        let now = Instant::now();
        // Without a timeout, a year: the stack still wakes for its timers.
        now.checked_add(self.timeout.unwrap_or(Duration::from_secs(365 * 86400)))
            .unwrap_or(now)
    }

    fn reset_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("connection reset by {}", self.peer),
        )
    }
}

impl<D: NetDev> Read for ClientStream<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.shut {
            return Ok(0);
        }
        let h = self.handle;
        let r = block(&self.shared, self.deadline(), |g| {
            let t = g.stack.sockets.get_mut::<tcp::Socket>(h);
            match t.recv_slice(buf) {
                Ok(0) => None,
                // A window the read opened goes out with the pass.
                Ok(n) => Some(Ok(n)),
                Err(tcp::RecvError::Finished) => Some(Ok(0)),
                Err(tcp::RecvError::InvalidState) => {
                    Some(Err(io::ErrorKind::ConnectionReset.into()))
                }
            }
        });
        r.map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing received from {} in time", self.peer),
            ),
            io::ErrorKind::ConnectionReset => self.reset_error(),
            _ => e,
        })
    }
}

impl<D: NetDev> Write for ClientStream<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection is shut down",
            ));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let h = self.handle;
        let r = block(&self.shared, self.deadline(), |g| {
            let t = g.stack.sockets.get_mut::<tcp::Socket>(h);
            if !t.may_send() {
                return Some(Err(match t.state() {
                    tcp::State::Closed => io::ErrorKind::ConnectionReset.into(),
                    _ => {
                        io::Error::new(io::ErrorKind::BrokenPipe, "the peer closed the connection")
                    }
                }));
            }
            match t.send_slice(buf) {
                Ok(0) => None,
                Ok(n) => Some(Ok(n)),
                Err(_) => Some(Err(io::ErrorKind::ConnectionReset.into())),
            }
        });
        r.map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} took nothing more in time", self.peer),
            ),
            io::ErrorKind::ConnectionReset => self.reset_error(),
            _ => e,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write leaves at once (Nagle's algorithm aside, which is off by default).
        Ok(())
    }
}

impl<D: NetDev> Drop for ClientStream<D> {
    fn drop(&mut self) {
        let mut g = lock(&self.shared.inner);
        let t = g.stack.sockets.get_mut::<tcp::Socket>(self.handle);
        if matches!(t.state(), tcp::State::SynSent | tcp::State::SynReceived) {
            // A connect that failed: nothing to close in order.
            t.abort();
        } else {
            t.close();
        }
        g.retire(self.handle, &self.key);
        g.pass(Instant::now());
    }
}

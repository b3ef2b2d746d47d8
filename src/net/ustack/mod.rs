//! The userspace TCP stack: one smoltcp interface and socket set per reactor, each over its
//! own queue of a frame device ([`dev`]), behind the same [`SockGroup`] seam as the kernel's
//! TCP.
//!
//! Every reactor listens on every portal and keeps the flows its queue receives (the device
//! steers each flow to one queue: PACKET_FANOUT_HASH, a TAP's multi-queue hash, RSS), so
//! nothing crosses reactors but ARP ([`link::ArpBus`]). smoltcp has no listen backlog: each
//! portal keeps [`StackConfig::backlog`] listening sockets per reactor and a new one replaces
//! each that is accepted.
//!
//! The same [`stack::Stack`] (an interface, its sockets and its device queue) also makes the
//! initiator's side, [`client`]: active opens and blocking streams for a load generator that
//! runs on the userspace stack as the target does.

pub mod client;
pub mod dev;
pub mod link;
pub mod stack;

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use smoltcp::iface::{PollIngressSingleResult, SocketHandle};
use smoltcp::socket::tcp;
use smoltcp::time::Duration as SDuration;
use smoltcp::wire::{IpAddress, IpCidr, IpListenEndpoint};

use self::dev::{DevStats, NetDev, PortView};
use self::link::{ArpBus, FlowKey, StackStats};
use self::stack::Stack;
use super::wake::{epoll_timeout, EventWaker};
use super::{Detached, Event, Net, Readiness, SockGroup, SockId, SockInfo, Wake};

/// What the stack can tune, in one place. Two settings are fixed when the program is built,
/// as smoltcp takes them from Cargo features: out-of-order segments held per connection
/// (`assembler-max-segment-count-32`, smoltcp's largest) and neighbour cache entries
/// (`iface-neighbor-cache-count-64`, for a LAN). smoltcp's minimum retransmission timeout is
/// a 1 s constant: fast retransmit recovers most losses, a lost tail waits a second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackConfig {
    /// The stack's address and prefix, and the default gateway.
    pub ip: IpCidr,
    pub gateway: Option<IpAddr>,
    /// Per connection receive and send buffers. The window scale follows the receive buffer.
    pub rx_buf: usize,
    pub tx_buf: usize,
    /// Nagle's algorithm (off for iSCSI: a response must not wait for an ACK).
    pub nagle: bool,
    /// Delayed ACK (`None`: every segment acknowledged at once).
    pub ack_delay: Option<Duration>,
    /// Idle listening sockets kept per portal and reactor: smoltcp has no backlog, so each
    /// SYN takes a listening socket and another is opened at once in its place.
    pub backlog: usize,
    /// Half-open connections per portal and reactor at most (a SYN flood's reach); a SYN
    /// beyond it is answered with a reset.
    pub max_half_open: usize,
    /// A half-open connection that sends nothing for this long is dropped.
    pub syn_timeout: Duration,
    /// How long a closed connection may take to finish its FIN handshake before it is reset.
    pub linger: Duration,
    /// Tail-loss probe timeout (`None`: off): a connection with data outstanding whose peer
    /// has said nothing for this long resends its first unacknowledged segment instead of
    /// waiting for smoltcp's one-second retransmission timeout ([`link::Probes`]). Doubled
    /// for each probe the peer leaves unanswered.
    pub tail_probe: Option<Duration>,
}

/// Buffer sizes the stack accepts.
pub const BUF_MIN: usize = 256 * 1024;
pub const BUF_MAX: usize = 4 * 1024 * 1024;

impl StackConfig {
    pub fn new(ip: IpCidr, gateway: Option<IpAddr>) -> StackConfig {
        StackConfig {
            ip,
            gateway,
            rx_buf: 1024 * 1024,
            tx_buf: 1024 * 1024,
            nagle: false,
            ack_delay: None,
            backlog: 4,
            max_half_open: 64,
            syn_timeout: Duration::from_secs(5),
            linger: Duration::from_secs(10),
            // Above a peer's delayed ACK (40 ms on Linux), far below the 1 s timeout.
            tail_probe: Some(Duration::from_millis(50)),
        }
    }

    /// Sets one setting by name, as `--stack KEY=VALUE` gives it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let num = || -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("--stack {key}: {value:?} is not a number"))
        };
        match key {
            "rx_buf" => self.rx_buf = num()? as usize,
            "tx_buf" => self.tx_buf = num()? as usize,
            "nagle" => {
                self.nagle = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(format!("--stack nagle must be 0 or 1, not {value:?}")),
                }
            }
            "ack_delay_us" => {
                self.ack_delay = match num()? {
                    0 => None,
                    us if us <= 500_000 => Some(Duration::from_micros(us)),
                    _ => return Err("--stack ack_delay_us is at most 500000".into()),
                }
            }
            "backlog" => self.backlog = num()? as usize,
            "max_half_open" => self.max_half_open = num()? as usize,
            "syn_timeout_ms" => match num()? {
                ms @ 100..=120_000 => self.syn_timeout = Duration::from_millis(ms),
                _ => return Err("--stack syn_timeout_ms is 100..=120000".into()),
            },
            "tail_probe_ms" => {
                self.tail_probe = match num()? {
                    0 => None,
                    ms @ 1..=1000 => Some(Duration::from_millis(ms)),
                    _ => return Err("--stack tail_probe_ms is 0 (off) or 1..=1000".into()),
                }
            }
            "linger_ms" => match num()? {
                ms @ 0..=600_000 => self.linger = Duration::from_millis(ms),
                _ => return Err("--stack linger_ms is 0..=600000".into()),
            },
            _ => {
                return Err(format!(
                    "unknown --stack setting {key:?} (rx_buf, tx_buf, nagle, ack_delay_us, backlog, max_half_open, syn_timeout_ms, linger_ms, tail_probe_ms)"
                ))
            }
        }
        Ok(())
    }

    /// Checks the address and the ranges.
    pub fn validate(&self) -> Result<(), String> {
        // smoltcp's interface takes unicast addresses only (and panics on others).
        if !self.ip.address().is_unicast() {
            return Err(format!("{} is not a unicast address", self.ip.address()));
        }
        for (name, v) in [("rx_buf", self.rx_buf), ("tx_buf", self.tx_buf)] {
            if !(BUF_MIN..=BUF_MAX).contains(&v) {
                return Err(format!(
                    "{name} {v} is out of range ({BUF_MIN}..={BUF_MAX} bytes)"
                ));
            }
        }
        // What `set` takes, checked again for a configuration built in code: both are added
        // to instants.
        let ms = |d: Duration| d.as_millis();
        if !(100..=120_000).contains(&ms(self.syn_timeout)) {
            return Err("syn_timeout_ms is 100..=120000".into());
        }
        if ms(self.linger) > 600_000 {
            return Err("linger_ms is 0..=600000".into());
        }
        if self.backlog == 0 || self.backlog > 1024 {
            return Err(format!(
                "backlog {} is out of range (1..=1024)",
                self.backlog
            ));
        }
        if self.max_half_open < self.backlog || self.max_half_open > 4096 {
            return Err(format!(
                "max_half_open {} is out of range (backlog..=4096)",
                self.max_half_open
            ));
        }
        if let Some(g) = self.gateway {
            if IpAddress::from(g).version() != self.ip.address().version() {
                return Err(format!(
                    "gateway {g} is not of the address family of {}",
                    self.ip
                ));
            }
        }
        Ok(())
    }
}

/// Frames taken from the device per poll at most, so one reactor pass stays bounded.
const RX_BUDGET: usize = 256;
/// How often the connections' TCP views are published for the tree.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The userspace network: one device queue per reactor, opened at start.
pub struct UstackNet<D: NetDev> {
    kind: String,
    ifname: String,
    cfg: StackConfig,
    portals: Vec<SocketAddr>,
    devices: Mutex<Vec<Option<D>>>,
    mac: [u8; 6],
    bus: Arc<ArpBus>,
    dev_stats: Vec<Arc<DevStats>>,
    stack_stats: Vec<Arc<StackStats>>,
    published: Vec<Arc<Mutex<Vec<SockInfo>>>>,
    port: Option<Arc<dyn PortView>>,
}

impl<D: NetDev + 'static> UstackNet<D> {
    /// Builds the network over `devices` (one per reactor). `kind` and `ifname` are for the
    /// tree (`af_packet`, `eth1`). Every portal must be on the stack's address or wildcard.
    pub fn new(
        kind: &str,
        ifname: &str,
        cfg: StackConfig,
        portals: &[SocketAddr],
        devices: Vec<D>,
    ) -> io::Result<UstackNet<D>> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        cfg.validate().map_err(bad)?;
        let me = cfg.ip.address();
        for p in portals {
            let ip = IpAddress::from(p.ip());
            if !p.ip().is_unspecified() && ip != me {
                return Err(bad(format!(
                    "portal {p} is not on the stack's address {me} (--ip)"
                )));
            }
            if p.port() == 0 {
                return Err(bad(format!("portal {p} needs a port")));
            }
        }
        let first = devices
            .first()
            .ok_or_else(|| bad("no device queue".into()))?;
        let mac = first.mac();
        let port = first.port_view();
        let n = devices.len();
        Ok(UstackNet {
            port,
            kind: kind.into(),
            ifname: ifname.into(),
            cfg,
            portals: portals.to_vec(),
            dev_stats: devices.iter().map(|d| d.stats().clone()).collect(),
            devices: Mutex::new(devices.into_iter().map(Some).collect()),
            mac,
            bus: ArpBus::new(n),
            stack_stats: (0..n).map(|_| Arc::default()).collect(),
            published: (0..n).map(|_| Arc::default()).collect(),
        })
    }

    /// The group of reactor `reactor`, typed (tests drive it directly).
    pub fn group_of(&self, reactor: usize) -> io::Result<UstackGroup<D>> {
        let dev = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(reactor)
            .and_then(Option::take)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no device queue for reactor {reactor}"),
                )
            })?;
        UstackGroup::new(
            dev,
            &self.cfg,
            &self.portals,
            self.bus.clone(),
            reactor,
            self.stack_stats[reactor].clone(),
            self.published[reactor].clone(),
        )
    }
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl<D: NetDev + 'static> Net for UstackNet<D> {
    fn group(&self, reactor: usize) -> io::Result<Box<dyn SockGroup>> {
        Ok(Box::new(self.group_of(reactor)?))
    }

    fn describe(&self) -> Vec<(String, String)> {
        let c = &self.cfg;
        vec![
            ("stack".into(), format!("smoltcp {}", self.kind)),
            ("interface".into(), self.ifname.clone()),
            ("mac".into(), mac_str(&self.mac)),
            ("address".into(), c.ip.to_string()),
            (
                "gateway".into(),
                c.gateway.map(|g| g.to_string()).unwrap_or_default(),
            ),
            ("queues".into(), self.dev_stats.len().to_string()),
            ("rx_buf".into(), c.rx_buf.to_string()),
            ("tx_buf".into(), c.tx_buf.to_string()),
            ("nagle".into(), u8::from(c.nagle).to_string()),
            (
                "ack_delay_us".into(),
                c.ack_delay.map_or(0, |d| d.as_micros()).to_string(),
            ),
            ("backlog".into(), c.backlog.to_string()),
            (
                "tail_probe_ms".into(),
                c.tail_probe.map_or(0, |d| d.as_millis()).to_string(),
            ),
        ]
        .into_iter()
        .chain(self.port.iter().flat_map(|p| p.attrs()))
        .collect()
    }

    fn counters(&self) -> Vec<Vec<(String, String)>> {
        self.dev_stats
            .iter()
            .zip(&self.stack_stats)
            .zip(&self.published)
            .enumerate()
            .map(|(q, ((d, s), p))| {
                let mut v = d.snapshot();
                v.extend(s.snapshot());
                if let Some(port) = &self.port {
                    v.extend(port.queue_attrs(q));
                }
                let conns = p.lock().unwrap_or_else(|e| e.into_inner()).len();
                v.push(("connections".into(), conns.to_string()));
                v
            })
            .collect()
    }

    fn connections(&self) -> Vec<SockInfo> {
        self.published
            .iter()
            .flat_map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

/// A connection of the group.
struct Slot {
    handle: SocketHandle,
    read: bool,
    write: bool,
    closed: bool,
    peer: SocketAddr,
    local: SocketAddr,
}

/// A portal's listening sockets.
struct Portal {
    endpoint: IpListenEndpoint,
    listening: Vec<SocketHandle>,
}

/// One reactor's stack.
pub struct UstackGroup<D: NetDev> {
    stack: Stack<D>,
    conns: Vec<Option<Slot>>,
    free: Vec<usize>,
    portals: Vec<Portal>,
    watched: bool,
    epoll: Epoll,
    waker: Arc<EventWaker>,
    publish: Arc<Mutex<Vec<SockInfo>>>,
    next_publish: Option<Instant>,
    /// The device has no descriptor to sleep on: sleep in short naps.
    nap: bool,
}

const WAKE_TOKEN: u64 = 1;
const DEV_TOKEN: u64 = 2;
/// How long a reactor in adaptive mode sleeps at a time over a device it cannot sleep on (a
/// poll-mode driver): frames that arrive meanwhile wait at most this long.
const NAP: Duration = Duration::from_micros(500);

fn sock_addr(e: smoltcp::wire::IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

impl<D: NetDev> UstackGroup<D> {
    fn new(
        dev: D,
        cfg: &StackConfig,
        portals: &[SocketAddr],
        bus: Arc<ArpBus>,
        me: usize,
        stats: Arc<StackStats>,
        publish: Arc<Mutex<Vec<SockInfo>>>,
    ) -> io::Result<UstackGroup<D>> {
        let queues = bus.reactors();
        let mut stack = Stack::new(dev, cfg, bus, me, stats)?;
        // Several queues: a segment may reach the wrong one (see link::FlowFilter).
        stack.link.flows.on = queues > 1;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let waker = EventWaker::new()?;
        epoll.add(waker.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        let nap = stack.link.dev.wait_fd().is_none();
        if let Some(raw) = stack.link.dev.wait_fd() {
            // SAFETY: the device owns `raw` and lives as long as the group (it is a field of
            // `stack`), so the descriptor stays open while the epoll set refers to it.
            let b = unsafe { BorrowedFd::borrow_raw(raw) };
            epoll.add(b, EpollEvent::new(EpollFlags::EPOLLIN, DEV_TOKEN))?;
        }
        let mut g = UstackGroup {
            nap,
            stack,
            conns: Vec::new(),
            free: Vec::new(),
            portals: Vec::new(),
            watched: true,
            epoll,
            waker: Arc::new(waker),
            publish,
            next_publish: None,
        };
        for p in portals {
            let endpoint = IpListenEndpoint {
                addr: (!p.ip().is_unspecified()).then(|| p.ip().into()),
                port: p.port(),
            };
            let mut portal = Portal {
                endpoint,
                listening: Vec::new(),
            };
            for _ in 0..cfg.backlog {
                let h = g.new_listener(endpoint)?;
                portal.listening.push(h);
            }
            g.portals.push(portal);
        }
        Ok(g)
    }

    fn new_listener(&mut self, ep: IpListenEndpoint) -> io::Result<SocketHandle> {
        let mut s = self.stack.new_socket();
        s.set_timeout(Some(SDuration::from_micros(
            self.stack.cfg.syn_timeout.as_micros() as u64,
        )));
        s.listen(ep)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("listen: {e}")))?;
        Ok(self.stack.sockets.add(s))
    }

    fn tcp(&mut self, s: SockId) -> io::Result<&mut tcp::Socket<'static>> {
        let h = match self.conns.get(s.0).and_then(Option::as_ref) {
            Some(slot) if !slot.closed => slot.handle,
            _ => return Err(io::Error::new(io::ErrorKind::NotConnected, "socket closed")),
        };
        Ok(self.stack.sockets.get_mut::<tcp::Socket>(h))
    }

    fn flow_key(slot: &Slot) -> FlowKey {
        (slot.peer.ip().into(), slot.peer.port(), slot.local.port())
    }

    fn slot_info(&self, slot: &Slot) -> SockInfo {
        let t = self.stack.sockets.get::<tcp::Socket>(slot.handle);
        SockInfo {
            peer: slot.peer.to_string(),
            local: slot.local.to_string(),
            state: t.state().to_string(),
            send_queue: t.send_queue(),
            recv_queue: t.recv_queue(),
            recv_window: t.recv_capacity() - t.recv_queue(),
            send_window: t.send_capacity() - t.send_queue(),
            retransmits: self.stack.link.retransmits.of(&Self::flow_key(slot)),
        }
    }

    /// Rebuilds the set of flows this reactor holds (for [`link::FlowFilter`]): every socket
    /// with a peer. Runs when a socket changed state, not per packet.
    fn refresh_flows(&mut self) {
        let Stack { link, sockets, .. } = &mut self.stack;
        if !link.flows.on {
            return;
        }
        let known = &mut link.flows.known;
        known.clear();
        for (_, s) in sockets.iter() {
            if let Some(t) = <tcp::Socket as smoltcp::socket::AnySocket>::downcast(s) {
                if let (Some(r), Some(l)) = (t.remote_endpoint(), t.local_endpoint()) {
                    known.insert((r.addr, r.port, l.port));
                }
            }
        }
    }

    /// Keeps `backlog` sockets of every portal listening: a socket a half-open connection
    /// timed out of (or was reset out of) is re-armed or dropped, and new ones are opened for
    /// those that took a SYN, up to `max_half_open`.
    fn refill(&mut self) {
        for pi in 0..self.portals.len() {
            let ep = self.portals[pi].endpoint;
            let mut idle = 0;
            let mut list = std::mem::take(&mut self.portals[pi].listening);
            list.retain(|&h| {
                let s = self.stack.sockets.get_mut::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::Listen => {
                        idle += 1;
                        true
                    }
                    tcp::State::Closed if idle < self.stack.cfg.backlog => {
                        idle += usize::from(s.listen(ep).is_ok());
                        true
                    }
                    tcp::State::Closed => {
                        self.stack.sockets.remove(h);
                        false
                    }
                    _ => true,
                }
            });
            while idle < self.stack.cfg.backlog && list.len() < self.stack.cfg.max_half_open {
                match self.new_listener(ep) {
                    Ok(h) => {
                        list.push(h);
                        idle += 1;
                    }
                    Err(e) => {
                        log::warn!("cannot open a listening socket on {ep}: {e}");
                        break;
                    }
                }
            }
            self.portals[pi].listening = list;
        }
    }

    /// The open connections, for the tail-loss probes.
    fn flows(conns: &[Option<Slot>]) -> impl Iterator<Item = (FlowKey, SocketHandle)> + '_ {
        conns
            .iter()
            .flatten()
            .filter(|slot| !slot.closed)
            .map(|slot| (Self::flow_key(slot), slot.handle))
    }
}

impl<D: NetDev> SockGroup for UstackGroup<D> {
    fn recv(&mut self, s: SockId, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.tcp(s)?;
        match t.recv_slice(buf) {
            Ok(0) if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => Ok(0),
            Err(tcp::RecvError::InvalidState) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
        }
    }

    fn recv_vectored(&mut self, s: SockId, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs.iter_mut() {
            if b.is_empty() {
                continue;
            }
            match self.recv(s, b) {
                Ok(n) => {
                    total += n;
                    if n < b.len() {
                        break;
                    }
                }
                Err(e) if total > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return if total > 0 { Ok(total) } else { Err(e) },
            }
        }
        Ok(total)
    }

    fn send_vectored(&mut self, s: SockId, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let t = self.tcp(s)?;
        if !t.may_send() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        let mut total = 0;
        for b in bufs {
            let n = t
                .send_slice(b)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))?;
            total += n;
            if n < b.len() {
                break;
            }
        }
        if total == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(total)
    }

    fn addrs(&self, s: SockId) -> (SocketAddr, SocketAddr) {
        match self.conns.get(s.0).and_then(Option::as_ref) {
            Some(slot) => (slot.peer, slot.local),
            None => {
                let none = SocketAddr::from(([0, 0, 0, 0], 0));
                (none, none)
            }
        }
    }

    fn set_interest(&mut self, s: SockId, read: bool, write: bool) {
        if let Some(slot) = self.conns.get_mut(s.0).and_then(Option::as_mut) {
            slot.read = read;
            slot.write = write;
        }
    }

    fn close(&mut self, s: SockId) {
        if let Some(slot) = self.conns.get_mut(s.0).and_then(Option::as_mut) {
            if !slot.closed {
                slot.closed = true;
                // FIN once what was queued is sent.
                self.stack
                    .sockets
                    .get_mut::<tcp::Socket>(slot.handle)
                    .close();
            }
        }
    }

    fn release(&mut self, s: SockId) {
        self.close(s);
        let Some(slot) = self.conns.get_mut(s.0).and_then(Option::take) else {
            return;
        };
        self.free.push(s.0);
        self.stack.forget(&Self::flow_key(&slot));
        let until = Instant::now() + self.stack.cfg.linger;
        self.stack.linger(slot.handle, until);
    }

    fn info(&self, s: SockId) -> Option<SockInfo> {
        let slot = self.conns.get(s.0)?.as_ref()?;
        Some(self.slot_info(slot))
    }

    fn accept(&mut self, portal: usize) -> io::Result<Option<SockId>> {
        let Some(p) = self.portals.get(portal) else {
            return Ok(None);
        };
        let found = p.listening.iter().position(|&h| {
            let s = self.stack.sockets.get::<tcp::Socket>(h);
            // Only a completed handshake is a connection: a flood of SYNs fills no slot.
            matches!(s.state(), tcp::State::Established | tcp::State::CloseWait)
        });
        let Some(i) = found else {
            return Ok(None);
        };
        let handle = self.portals[portal].listening.swap_remove(i);
        self.refill();
        let s = self.stack.sockets.get_mut::<tcp::Socket>(handle);
        s.set_timeout(None);
        let (Some(remote), Some(local)) = (s.remote_endpoint(), s.local_endpoint()) else {
            s.abort();
            self.stack.linger(handle, Instant::now());
            return Ok(None);
        };
        let slot = Slot {
            handle,
            read: true,
            write: false,
            closed: false,
            peer: sock_addr(remote),
            local: sock_addr(local),
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        self.conns[idx] = Some(slot);
        self.stack
            .link
            .stats
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(SockId(idx)))
    }

    fn watch_portals(&mut self, on: bool) -> io::Result<()> {
        self.watched = on;
        Ok(())
    }

    fn close_portals(&mut self) {
        for p in std::mem::take(&mut self.portals) {
            for h in p.listening {
                self.stack.sockets.remove(h);
            }
        }
    }

    fn detach(&mut self, _s: SockId) -> Option<Detached> {
        // A flow belongs to the queue the device steers it to.
        None
    }

    fn attach(&mut self, _d: Detached) -> io::Result<SockId> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a userspace-stack connection stays on the reactor whose queue receives it",
        ))
    }

    fn poll(&mut self, now: Instant, out: &mut Vec<Event>) -> io::Result<bool> {
        let ts = self.stack.ts(now);
        let before = self
            .stack
            .link
            .dev
            .stats()
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed);
        self.stack.iface.poll_maintenance(ts);
        let mut changed = false;
        for _ in 0..RX_BUDGET {
            match self.stack.ingress_one(ts) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                // A SYN may have taken a listening socket: open another before the next.
                PollIngressSingleResult::SocketStateChanged => {
                    changed = true;
                    self.refill();
                    self.refresh_flows();
                }
            }
        }
        // No egress here: ACKs for what arrived leave with the pass's flush, after the
        // engine has answered, so that they ride on the responses.
        // A probe's retransmission leaves with this pass's flush.
        self.stack.probe_tails(ts, Self::flows(&self.conns));
        let after = self
            .stack
            .link
            .dev
            .stats()
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed);
        self.stack.housekeeping(now);
        if self.watched {
            for (i, p) in self.portals.iter().enumerate() {
                let ready = p.listening.iter().any(|&h| {
                    matches!(
                        self.stack.sockets.get::<tcp::Socket>(h).state(),
                        tcp::State::Established | tcp::State::CloseWait
                    )
                });
                if ready {
                    out.push(Event::Accept(i));
                }
            }
        }
        for (i, slot) in self.conns.iter().enumerate() {
            let Some(slot) = slot else { continue };
            if slot.closed {
                continue;
            }
            let t = self.stack.sockets.get::<tcp::Socket>(slot.handle);
            let readable = (slot.read && t.can_recv()) || !t.may_recv();
            let writable = slot.write && t.can_send();
            if readable || writable {
                out.push(Event::Sock(SockId(i), Readiness { readable, writable }));
            }
        }
        if self.next_publish.is_none_or(|t| now >= t) {
            self.next_publish = Some(now + PUBLISH_EVERY);
            let list: Vec<SockInfo> = self
                .conns
                .iter()
                .flatten()
                .map(|s| self.slot_info(s))
                .collect();
            *self.publish.lock().unwrap_or_else(|e| e.into_inner()) = list;
        }
        Ok(changed || after != before)
    }

    fn flush(&mut self, now: Instant) {
        let ts = self.stack.ts(now);
        self.stack.egress(ts);
    }

    fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        self.stack.next_due(now, Self::flows(&self.conns))
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let timeout = if self.nap {
            Some(timeout.map_or(NAP, |t| t.min(NAP)))
        } else {
            timeout
        };
        let t = epoll_timeout(timeout);
        let mut evs = [EpollEvent::empty(); 2];
        match self.epoll.wait(&mut evs, t) {
            Ok(n) => {
                for e in &evs[..n] {
                    if e.data() == WAKE_TOKEN {
                        self.waker.drain();
                    }
                }
                Ok(n > 0)
            }
            Err(nix::errno::Errno::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }
}

#[cfg(test)]
mod tests;

//! Kernel TCP behind the [`SockGroup`] seam: non-blocking sockets, one level-triggered epoll
//! per reactor (EPOLLIN while reading, EPOLLOUT only while output is queued), and an eventfd
//! in the same epoll so that a sleeping reactor wakes for messages as well as for sockets.
//!
//! Every portal is bound once, at start, and accepted on the first reactor, which hands each
//! connection to the least-loaded reactor ([`SockGroup::detach`] / [`SockGroup::attach`]).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{setsockopt, sockopt};

use super::wake::{epoll_timeout, EventWaker};
use super::{Detached, Event, Net, Readiness, SockGroup, SockId, SockInfo, Wake};

/// Kernel socket buffers as SPDK sizes them (2 MiB) so a 1 MiB burst fits in flight.
const SOCK_BUF: usize = 2 * 1024 * 1024;
/// The token of the wake-up eventfd inside the epoll set.
const WAKE_TOKEN: u64 = u64::MAX;
/// Tokens from here up are listeners (portal index added); below are sockets.
const LISTENER_TOKEN: u64 = u64::MAX / 2;
/// How often the connections' TCP views are published for the tree.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

struct PosixSock {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    /// What the epoll set watches this socket for: (readable, writable).
    interest: (bool, bool),
    /// Shut down and out of the epoll set; the handle lives on until released.
    closed: bool,
}

impl PosixSock {
    fn new(stream: TcpStream) -> io::Result<PosixSock> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let _ = setsockopt(&stream, sockopt::RcvBuf, &SOCK_BUF);
        let _ = setsockopt(&stream, sockopt::SndBuf, &SOCK_BUF);
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        Ok(PosixSock {
            stream,
            peer,
            local,
            interest: (true, false),
            closed: false,
        })
    }

    fn info(&self) -> SockInfo {
        let mut info = SockInfo {
            peer: self.peer.to_string(),
            local: self.local.to_string(),
            ..Default::default()
        };
        if let Some(t) = tcp_info(&self.stream) {
            info.state = tcp_state_name(t.tcpi_state).into();
            info.retransmits = u64::from(t.tcpi_total_retrans);
            info.send_queue = t.tcpi_notsent_bytes as usize;
            info.recv_window = t.tcpi_rcv_space as usize;
            info.send_window = (t.tcpi_snd_cwnd as usize).saturating_mul(t.tcpi_snd_mss as usize);
        }
        info
    }
}

/// The kernel's TCP_INFO of a socket.
fn tcp_info(s: &TcpStream) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data (integers only), so all-zero is a valid value.
    let mut t: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `t`, which lives across the call; the kernel
    // writes at most `len` bytes and reports how many.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut t as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(t)
}

/// RFC 793's names of the kernel's TCP states (include/net/tcp_states.h order).
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN-SENT",
        3 => "SYN-RECEIVED",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "CLOSED",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// Binds a portal (non-blocking; a port with a live listener is refused with EADDRINUSE).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    // std sets SO_REUSEADDR on Unix, so a port in TIME_WAIT is reusable.
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The kernel TCP network: portals bound at start, accepted on the first reactor.
pub struct KernelNet {
    listeners: Mutex<Option<Vec<TcpListener>>>,
    portals: Vec<SocketAddr>,
    published: Vec<Arc<Mutex<Vec<SockInfo>>>>,
}

impl KernelNet {
    /// Binds every portal now, so that a taken port is an error at start.
    pub fn new(portals: &[SocketAddr], reactors: usize) -> io::Result<KernelNet> {
        let mut ls = Vec::new();
        let mut bound = Vec::new();
        for a in portals {
            let l = bind(*a).map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))?;
            bound.push(l.local_addr()?);
            ls.push(l);
        }
        Ok(KernelNet {
            listeners: Mutex::new(Some(ls)),
            portals: bound,
            published: (0..reactors).map(|_| Arc::default()).collect(),
        })
    }

    /// The portals' addresses as bound (a port 0 replaced by the one the kernel chose).
    pub fn portals(&self) -> &[SocketAddr] {
        &self.portals
    }
}

impl Net for KernelNet {
    fn group(&self, reactor: usize) -> io::Result<Box<dyn SockGroup>> {
        // The first reactor to ask (reactor 0) takes the listeners.
        let ls = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let publish = self.published.get(reactor).cloned().unwrap_or_default();
        Ok(Box::new(PosixGroup::new(ls, publish)?))
    }

    fn describe(&self) -> Vec<(String, String)> {
        vec![("stack".into(), "kernel".into())]
    }

    fn counters(&self) -> Vec<Vec<(String, String)>> {
        Vec::new()
    }

    fn connections(&self) -> Vec<SockInfo> {
        self.published
            .iter()
            .flat_map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

pub struct PosixGroup {
    epoll: Epoll,
    waker: Arc<EventWaker>,
    events: Vec<EpollEvent>,
    socks: Vec<Option<PosixSock>>,
    free: Vec<usize>,
    listeners: Vec<Option<TcpListener>>,
    /// Whether the listeners are in the epoll set.
    watched: bool,
    publish: Arc<Mutex<Vec<SockInfo>>>,
    next_publish: Option<Instant>,
}

fn not_open() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket closed")
}

impl PosixGroup {
    fn new(
        listeners: Vec<TcpListener>,
        publish: Arc<Mutex<Vec<SockInfo>>>,
    ) -> io::Result<PosixGroup> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let waker = EventWaker::new()?;
        epoll.add(waker.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        let mut g = PosixGroup {
            epoll,
            waker: Arc::new(waker),
            events: vec![EpollEvent::empty(); 128],
            socks: Vec::new(),
            free: Vec::new(),
            listeners: listeners.into_iter().map(Some).collect(),
            watched: false,
            publish,
            next_publish: None,
        };
        g.watch_portals(true)?;
        Ok(g)
    }

    fn sock(&mut self, s: SockId) -> io::Result<&mut PosixSock> {
        match self.socks.get_mut(s.0).and_then(Option::as_mut) {
            Some(p) if !p.closed => Ok(p),
            _ => Err(not_open()),
        }
    }

    fn flags(read: bool, write: bool) -> EpollFlags {
        let mut f = EpollFlags::empty();
        if read {
            f |= EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        }
        if write {
            f |= EpollFlags::EPOLLOUT;
        }
        f
    }

    fn insert(&mut self, p: PosixSock) -> io::Result<SockId> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.socks.push(None);
                self.socks.len() - 1
            }
        };
        if let Err(e) = self.epoll.add(
            p.stream.as_fd(),
            EpollEvent::new(Self::flags(true, false), idx as u64),
        ) {
            self.free.push(idx);
            return Err(e.into());
        }
        self.socks[idx] = Some(p);
        Ok(SockId(idx))
    }
}

impl SockGroup for PosixGroup {
    fn recv(&mut self, s: SockId, buf: &mut [u8]) -> io::Result<usize> {
        self.sock(s)?.stream.read(buf)
    }

    fn recv_vectored(&mut self, s: SockId, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.sock(s)?.stream.read_vectored(bufs)
    }

    fn send_vectored(&mut self, s: SockId, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.sock(s)?.stream.write_vectored(bufs)
    }

    fn addrs(&self, s: SockId) -> (SocketAddr, SocketAddr) {
        match self.socks.get(s.0).and_then(Option::as_ref) {
            Some(p) => (p.peer, p.local),
            None => {
                let none = SocketAddr::from(([0, 0, 0, 0], 0));
                (none, none)
            }
        }
    }

    fn set_interest(&mut self, s: SockId, read: bool, write: bool) {
        let Some(p) = self.socks.get_mut(s.0).and_then(Option::as_mut) else {
            return;
        };
        if p.closed {
            return;
        }
        // Only a change costs an epoll_ctl.
        if p.interest == (read, write) {
            return;
        }
        p.interest = (read, write);
        // With neither, the socket stays in the set: a hang-up or an error is still reported.
        let mut ev = EpollEvent::new(Self::flags(read, write), s.0 as u64);
        let fd = p.stream.as_fd();
        let _ = self.epoll.modify(fd, &mut ev);
    }

    fn close(&mut self, s: SockId) {
        if let Some(p) = self.socks.get_mut(s.0).and_then(Option::as_mut) {
            if !p.closed {
                p.closed = true;
                let _ = self.epoll.delete(p.stream.as_fd());
                let _ = p.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn release(&mut self, s: SockId) {
        self.close(s);
        if let Some(slot) = self.socks.get_mut(s.0) {
            if slot.take().is_some() {
                self.free.push(s.0);
            }
        }
    }

    fn info(&self, s: SockId) -> Option<SockInfo> {
        self.socks
            .get(s.0)
            .and_then(Option::as_ref)
            .map(PosixSock::info)
    }

    fn accept(&mut self, portal: usize) -> io::Result<Option<SockId>> {
        let Some(l) = self.listeners.get(portal).and_then(Option::as_ref) else {
            return Ok(None);
        };
        match l.accept() {
            Ok((stream, _)) => {
                let p = PosixSock::new(stream)?;
                self.insert(p).map(Some)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // A connection reset before we accepted it is not our error.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn watch_portals(&mut self, on: bool) -> io::Result<()> {
        if self.watched == on {
            return Ok(());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let Some(l) = l else { continue };
            if on {
                self.epoll.add(
                    l.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN + i as u64),
                )?;
            } else {
                self.epoll.delete(l.as_fd())?;
            }
        }
        self.watched = on;
        Ok(())
    }

    fn close_portals(&mut self) {
        let _ = self.watch_portals(false);
        for l in &mut self.listeners {
            *l = None;
        }
    }

    fn detach(&mut self, s: SockId) -> Option<Detached> {
        let p = self.socks.get_mut(s.0)?.take()?;
        self.free.push(s.0);
        let _ = self.epoll.delete(p.stream.as_fd());
        Some(Detached(Box::new(p.stream)))
    }

    fn attach(&mut self, d: Detached) -> io::Result<SockId> {
        let stream = d.0.downcast::<TcpStream>().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "not a kernel TCP connection")
        })?;
        let p = PosixSock::new(*stream)?;
        self.insert(p)
    }

    fn poll(&mut self, now: Instant, out: &mut Vec<Event>) -> io::Result<bool> {
        if self.next_publish.is_none_or(|t| now >= t) {
            self.next_publish = Some(now + PUBLISH_EVERY);
            let list: Vec<SockInfo> = self.socks.iter().flatten().map(PosixSock::info).collect();
            *self.publish.lock().unwrap_or_else(|e| e.into_inner()) = list;
        }
        let n = match self.epoll.wait(&mut self.events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &self.events[..n] {
            let token = ev.data();
            if token == WAKE_TOKEN {
                self.waker.drain();
                continue;
            }
            if token >= LISTENER_TOKEN {
                out.push(Event::Accept((token - LISTENER_TOKEN) as usize));
                continue;
            }
            let f = ev.events();
            let readable = f.intersects(
                EpollFlags::EPOLLIN
                    | EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLHUP
                    | EpollFlags::EPOLLERR,
            );
            let writable = f.contains(EpollFlags::EPOLLOUT);
            out.push(Event::Sock(
                SockId(token as usize),
                Readiness { readable, writable },
            ));
        }
        Ok(false)
    }

    fn flush(&mut self, _now: Instant) {
        // Kernel sockets send as they are written.
    }

    fn next_deadline(&mut self, _now: Instant) -> Option<Instant> {
        None
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let t = epoll_timeout(timeout);
        // Level-triggered: whatever is ready stays reported for the next `poll`.
        let mut one = [EpollEvent::empty(); 1];
        match self.epoll.wait(&mut one, t) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group_on_loopback() -> (KernelNet, Box<dyn SockGroup>, SocketAddr) {
        let net = KernelNet::new(&["127.0.0.1:0".parse().unwrap()], 1).unwrap();
        let addr = net.portals()[0];
        let g = net.group(0).unwrap();
        (net, g, addr)
    }

    fn accept_one(g: &mut dyn SockGroup) -> SockId {
        let mut ev = Vec::new();
        loop {
            g.wait(Some(Duration::from_secs(20))).unwrap();
            ev.clear();
            g.poll(Instant::now(), &mut ev).unwrap();
            if ev.contains(&Event::Accept(0)) {
                if let Some(s) = g.accept(0).unwrap() {
                    return s;
                }
            }
        }
    }

    #[test]
    fn readiness_and_vectored_io() {
        let (_net, mut g, addr) = group_on_loopback();
        let mut client = TcpStream::connect(addr).unwrap();
        let s = accept_one(&mut *g);
        let mut ev = Vec::new();
        g.poll(Instant::now(), &mut ev).unwrap();
        assert!(ev.is_empty());
        let mut buf = [0u8; 16];
        assert_eq!(
            g.recv(s, &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        client.write_all(b"hello").unwrap();
        g.wait(Some(Duration::from_secs(5))).unwrap();
        g.poll(Instant::now(), &mut ev).unwrap();
        let readable = Readiness {
            readable: true,
            writable: false,
        };
        assert_eq!(ev, vec![Event::Sock(s, readable)]);
        assert_eq!(g.recv(s, &mut buf).unwrap(), 5);
        let n = g
            .send_vectored(s, &[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
            .unwrap();
        assert_eq!(n, 4);
        let mut back = [0u8; 4];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"abcd");
        let info = g.info(s).unwrap();
        assert_eq!(info.state, "ESTABLISHED");
        assert_eq!(info.peer, client.local_addr().unwrap().to_string());
        drop(client);
        ev.clear();
        g.wait(Some(Duration::from_secs(5))).unwrap();
        g.poll(Instant::now(), &mut ev).unwrap();
        assert!(matches!(ev[0], Event::Sock(x, r) if x == s && r.readable));
        assert_eq!(g.recv(s, &mut buf).unwrap(), 0, "peer close reads as 0");
        g.close(s);
        g.close(s);
        assert_eq!(
            g.recv(s, &mut buf).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        g.release(s);
        assert!(g.info(s).is_none());
    }

    #[test]
    fn waker_interrupts_wait() {
        let (_net, mut g, _) = group_on_loopback();
        let w = g.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.wake();
        });
        let start = std::time::Instant::now();
        g.wait(Some(Duration::from_secs(20))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(20));
        t.join().unwrap();
    }

    #[test]
    fn watched_portals_wake_wait_and_unwatched_do_not() {
        let (_net, mut g, addr) = group_on_loopback();
        let _c = TcpStream::connect(addr).unwrap();
        assert!(g.wait(Some(Duration::from_secs(20))).unwrap());
        let mut ev = Vec::new();
        g.poll(Instant::now(), &mut ev).unwrap();
        assert_eq!(ev, vec![Event::Accept(0)]);
        assert!(g.accept(0).unwrap().is_some());
        // Unwatched (the accept back-off): a pending connection no longer ends the wait.
        g.watch_portals(false).unwrap();
        let _d = TcpStream::connect(addr).unwrap();
        assert!(!g.wait(Some(Duration::from_millis(50))).unwrap());
        g.watch_portals(true).unwrap();
        assert!(g.wait(Some(Duration::from_secs(20))).unwrap());
    }

    #[test]
    fn a_connection_moves_between_groups() {
        let net = KernelNet::new(&["127.0.0.1:0".parse().unwrap()], 2).unwrap();
        let addr = net.portals()[0];
        let mut g0 = net.group(0).unwrap();
        let mut g1 = net.group(1).unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let s = accept_one(&mut *g0);
        let d = g0.detach(s).unwrap();
        assert!(g0.info(s).is_none(), "the first group forgot it");
        let t = g1.attach(d).unwrap();
        client.write_all(b"x").unwrap();
        assert!(g1.wait(Some(Duration::from_secs(20))).unwrap());
        let mut ev = Vec::new();
        g1.poll(Instant::now(), &mut ev).unwrap();
        assert!(matches!(ev[0], Event::Sock(x, r) if x == t && r.readable));
        let mut b = [0u8; 1];
        assert_eq!(g1.recv(t, &mut b).unwrap(), 1);
        // Published at each group's first poll: none on the first, this one on the second.
        let list = net.connections();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].local, addr.to_string());
    }

    #[test]
    fn taken_port_is_refused() {
        let net = KernelNet::new(&["127.0.0.1:0".parse().unwrap()], 1).unwrap();
        let e = KernelNet::new(&[net.portals()[0]], 1)
            .err()
            .expect("second bind fails");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}

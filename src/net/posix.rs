//! Kernel TCP behind the [`Sock`] traits: non-blocking sockets, one level-triggered epoll per
//! reactor (EPOLLIN always, EPOLLOUT only while output is queued), and an eventfd in the same
//! epoll so that a sleeping reactor wakes for messages as well as for sockets.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{setsockopt, sockopt};

use super::{Listener, Readiness, Sock, SockGroup};

/// Kernel socket buffers as SPDK sizes them (2 MiB) so a 1 MiB burst fits in flight.
const SOCK_BUF: usize = 2 * 1024 * 1024;
/// The token of the wake-up eventfd inside the epoll set.
const WAKE_TOKEN: u64 = u64::MAX;

pub struct PosixSock {
    stream: Option<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
    /// What the group's epoll set watches this socket for: (readable, writable).
    interest: (bool, bool),
}

impl PosixSock {
    pub fn new(stream: TcpStream) -> io::Result<PosixSock> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let _ = setsockopt(&stream, sockopt::RcvBuf, &SOCK_BUF);
        let _ = setsockopt(&stream, sockopt::SndBuf, &SOCK_BUF);
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        Ok(PosixSock {
            stream: Some(stream),
            peer,
            local,
            interest: (true, false),
        })
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket closed"))
    }
}

impl Sock for PosixSock {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream()?.read(buf)
    }

    fn recv_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.stream()?.read_vectored(bufs)
    }

    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.stream()?.write_vectored(bufs)
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn close(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

pub struct PosixListener {
    listener: Option<TcpListener>,
    addr: SocketAddr,
    /// Whether a group's epoll set watches it.
    watched: bool,
}

impl PosixListener {
    pub fn bind(addr: SocketAddr) -> io::Result<PosixListener> {
        // std sets SO_REUSEADDR on Unix, so a port in TIME_WAIT is reusable while a port with a
        // live listener is refused (EADDRINUSE).
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(PosixListener {
            listener: Some(listener),
            addr,
            watched: false,
        })
    }
}

impl Listener for PosixListener {
    fn accept(&mut self) -> io::Result<Option<Box<dyn Sock>>> {
        let Some(l) = self.listener.as_ref() else {
            return Ok(None);
        };
        match l.accept() {
            Ok((stream, _)) => Ok(Some(Box::new(PosixSock::new(stream)?))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // A connection reset before we accepted it is not our error.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn close(&mut self) {
        self.listener = None;
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Wakes a reactor that sleeps in its group's epoll.
pub struct Waker {
    fd: EventFd,
}

impl Waker {
    pub fn wake(&self) {
        let _ = self.fd.write(1);
    }
}

pub struct PosixGroup {
    epoll: Epoll,
    waker: Arc<Waker>,
    events: Vec<EpollEvent>,
}

impl PosixGroup {
    pub fn new() -> io::Result<PosixGroup> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        epoll.add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        Ok(PosixGroup {
            epoll,
            waker: Arc::new(Waker { fd }),
            events: vec![EpollEvent::empty(); 128],
        })
    }

    /// The handle other threads use to wake this group's reactor.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    fn stream_of(sock: &mut dyn Sock) -> io::Result<&TcpStream> {
        sock.as_any_mut()
            .downcast_mut::<PosixSock>()
            .and_then(|s| s.stream.as_ref())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an open kernel socket"))
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

    fn drain_waker(&self) {
        let _ = self.waker.fd.read();
    }
}

impl SockGroup for PosixGroup {
    fn register(&mut self, sock: &mut dyn Sock, token: usize) -> io::Result<()> {
        let s = Self::stream_of(sock)?;
        self.epoll.add(
            s.as_fd(),
            EpollEvent::new(Self::flags(true, false), token as u64),
        )?;
        if let Some(ps) = sock.as_any_mut().downcast_mut::<PosixSock>() {
            ps.interest = (true, false);
        }
        Ok(())
    }

    fn deregister(&mut self, sock: &mut dyn Sock, _token: usize) -> io::Result<()> {
        match Self::stream_of(sock) {
            Ok(s) => Ok(self.epoll.delete(s.as_fd())?),
            // A closed socket left the epoll set when its fd was closed.
            Err(_) => Ok(()),
        }
    }

    fn set_interest(
        &mut self,
        sock: &mut dyn Sock,
        token: usize,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        let Some(ps) = sock.as_any_mut().downcast_mut::<PosixSock>() else {
            return Ok(());
        };
        // Only a change costs an epoll_ctl.
        if ps.interest == (read, write) {
            return Ok(());
        }
        let Some(s) = ps.stream.as_ref() else {
            return Ok(());
        };
        // With neither, the socket stays in the set: a hang-up or an error is still reported.
        let mut ev = EpollEvent::new(Self::flags(read, write), token as u64);
        self.epoll.modify(s.as_fd(), &mut ev)?;
        ps.interest = (read, write);
        Ok(())
    }

    fn watch_listener(
        &mut self,
        listener: &mut dyn Listener,
        token: usize,
        on: bool,
    ) -> io::Result<()> {
        let Some(pl) = listener.as_any_mut().downcast_mut::<PosixListener>() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a kernel listener",
            ));
        };
        if pl.watched == on {
            return Ok(());
        }
        let Some(l) = pl.listener.as_ref() else {
            return Ok(());
        };
        if on {
            self.epoll.add(
                l.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token as u64),
            )?;
        } else {
            self.epoll.delete(l.as_fd())?;
        }
        pl.watched = on;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(usize, Readiness)>) -> io::Result<()> {
        let n = match self.epoll.wait(&mut self.events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &self.events[..n] {
            if ev.data() == WAKE_TOKEN {
                self.drain_waker();
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
            out.push((ev.data() as usize, Readiness { readable, writable }));
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let t = match timeout {
            None => EpollTimeout::NONE,
            Some(d) => {
                let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
                EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::NONE)
            }
        };
        // Level-triggered: whatever is ready stays reported for the next `poll`.
        let mut one = [EpollEvent::empty(); 1];
        match self.epoll.wait(&mut one, t) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

/// Keeps the fd type in scope for callers that need to hold one.
pub type Fd = OwnedFd;

#[allow(dead_code)]
fn raw(s: &TcpStream) -> i32 {
    s.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_and_vectored_io() {
        let mut l = PosixListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = TcpStream::connect(l.local_addr()).unwrap();
        let mut sock = loop {
            if let Some(s) = l.accept().unwrap() {
                break s;
            }
        };
        let mut g = PosixGroup::new().unwrap();
        g.register(&mut *sock, 7).unwrap();
        let mut ev = Vec::new();
        g.poll(&mut ev).unwrap();
        assert!(ev.is_empty());
        let mut buf = [0u8; 16];
        assert_eq!(
            sock.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        client.write_all(b"hello").unwrap();
        g.wait(Some(Duration::from_secs(5))).unwrap();
        g.poll(&mut ev).unwrap();
        assert_eq!(
            ev,
            vec![(
                7,
                Readiness {
                    readable: true,
                    writable: false
                }
            )]
        );
        assert_eq!(sock.recv(&mut buf).unwrap(), 5);
        let n = sock
            .send_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
            .unwrap();
        assert_eq!(n, 4);
        let mut back = [0u8; 4];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"abcd");
        drop(client);
        ev.clear();
        g.wait(Some(Duration::from_secs(5))).unwrap();
        g.poll(&mut ev).unwrap();
        assert!(ev[0].1.readable);
        assert_eq!(sock.recv(&mut buf).unwrap(), 0, "peer close reads as 0");
        sock.close();
        sock.close();
    }

    #[test]
    fn waker_interrupts_wait() {
        let mut g = PosixGroup::new().unwrap();
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
    fn a_watched_listener_wakes_wait_and_an_unwatched_one_does_not() {
        let mut l = PosixListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut g = PosixGroup::new().unwrap();
        g.watch_listener(&mut l, 9, true).unwrap();
        let addr = l.local_addr();
        let _c = TcpStream::connect(addr).unwrap();
        assert!(g.wait(Some(Duration::from_secs(20))).unwrap());
        let mut ev = Vec::new();
        g.poll(&mut ev).unwrap();
        assert_eq!(ev[0].0, 9);
        assert!(l.accept().unwrap().is_some());
        // Unwatched (the accept back-off): a pending connection no longer ends the wait.
        g.watch_listener(&mut l, 9, false).unwrap();
        let _d = TcpStream::connect(addr).unwrap();
        assert!(!g.wait(Some(Duration::from_millis(50))).unwrap());
        g.watch_listener(&mut l, 9, true).unwrap();
        assert!(g.wait(Some(Duration::from_secs(20))).unwrap());
    }

    #[test]
    fn taken_port_is_refused() {
        let l = PosixListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let e = PosixListener::bind(l.local_addr())
            .err()
            .expect("second bind fails");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}

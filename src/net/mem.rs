//! An in-memory [`SockGroup`]: sockets whose input is a byte string and whose output is
//! counted (or kept), with no network at all. A connection's state machine runs over it in
//! unit tests and fuzzing, fed bytes and time.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Detached, Event, Readiness, SockGroup, SockId, SockInfo, Wake};

/// One in-memory connection.
#[derive(Debug, Clone)]
pub struct MemSock {
    /// What the peer sends, and how much of it was read.
    pub input: Vec<u8>,
    pub pos: usize,
    /// Most bytes one receive returns (short reads split PDUs anywhere).
    pub chunk: usize,
    /// Most bytes one send takes (short writes).
    pub send_chunk: usize,
    /// The peer closed once its input is read: receives then return 0.
    pub eof: bool,
    /// Receive and send calls made on it (system calls, on a real socket).
    pub recv_calls: usize,
    pub send_calls: usize,
    /// Bytes sent, and the bytes themselves when `keep_output`.
    pub sent: usize,
    pub keep_output: bool,
    pub output: Vec<u8>,
    pub closed: bool,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

impl MemSock {
    /// A connection from 127.0.0.1:40000 to 127.0.0.1:3260 that will receive `input`.
    pub fn new(input: Vec<u8>) -> MemSock {
        MemSock {
            input,
            pos: 0,
            chunk: usize::MAX,
            send_chunk: usize::MAX,
            eof: false,
            recv_calls: 0,
            send_calls: 0,
            sent: 0,
            keep_output: false,
            output: Vec::new(),
            closed: false,
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 3260)),
        }
    }

    fn take(&mut self, want: usize) -> io::Result<&[u8]> {
        self.recv_calls += 1;
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "closed"));
        }
        let left = self.input.len() - self.pos;
        if left == 0 {
            return if self.eof {
                Ok(&[])
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = left.min(want).min(self.chunk);
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

/// A group of in-memory sockets.
#[derive(Default)]
pub struct MemGroup {
    socks: Vec<Option<MemSock>>,
}

impl MemGroup {
    pub fn new() -> MemGroup {
        MemGroup::default()
    }

    /// Adds a connection; its handle.
    pub fn add(&mut self, s: MemSock) -> SockId {
        self.socks.push(Some(s));
        SockId(self.socks.len() - 1)
    }

    /// The socket behind `s`.
    pub fn sock_mut(&mut self, s: SockId) -> Option<&mut MemSock> {
        self.socks.get_mut(s.0).and_then(Option::as_mut)
    }

    fn get(&mut self, s: SockId) -> io::Result<&mut MemSock> {
        self.sock_mut(s)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no such socket"))
    }
}

impl SockGroup for MemGroup {
    fn recv(&mut self, s: SockId, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.get(s)?.take(buf.len())?;
        buf[..d.len()].copy_from_slice(d);
        Ok(d.len())
    }

    fn recv_vectored(&mut self, s: SockId, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let want = bufs.iter().map(|b| b.len()).sum();
        let d = self.get(s)?.take(want)?;
        let mut done = 0;
        for b in bufs.iter_mut() {
            let n = b.len().min(d.len() - done);
            b[..n].copy_from_slice(&d[done..done + n]);
            done += n;
        }
        Ok(done)
    }

    fn send_vectored(&mut self, s: SockId, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let m = self.get(s)?;
        m.send_calls += 1;
        if m.closed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = total.min(m.send_chunk);
        if m.keep_output {
            let mut left = n;
            for b in bufs {
                let k = b.len().min(left);
                m.output.extend_from_slice(&b[..k]);
                left -= k;
            }
        }
        m.sent += n;
        Ok(n)
    }

    fn addrs(&self, s: SockId) -> (SocketAddr, SocketAddr) {
        match self.socks.get(s.0).and_then(Option::as_ref) {
            Some(m) => (m.peer, m.local),
            None => {
                let none = SocketAddr::from(([0, 0, 0, 0], 0));
                (none, none)
            }
        }
    }

    fn set_interest(&mut self, _s: SockId, _read: bool, _write: bool) {}

    fn close(&mut self, s: SockId) {
        if let Some(m) = self.sock_mut(s) {
            m.closed = true;
        }
    }

    fn release(&mut self, s: SockId) {
        if let Some(slot) = self.socks.get_mut(s.0) {
            *slot = None;
        }
    }

    fn info(&self, s: SockId) -> Option<SockInfo> {
        let m = self.socks.get(s.0)?.as_ref()?;
        Some(SockInfo {
            peer: m.peer.to_string(),
            local: m.local.to_string(),
            state: if m.closed { "CLOSED" } else { "ESTABLISHED" }.into(),
            recv_queue: m.input.len() - m.pos,
            ..Default::default()
        })
    }

    fn accept(&mut self, _portal: usize) -> io::Result<Option<SockId>> {
        Ok(None)
    }

    fn watch_portals(&mut self, _on: bool) -> io::Result<()> {
        Ok(())
    }

    fn close_portals(&mut self) {}

    fn detach(&mut self, _s: SockId) -> Option<Detached> {
        None
    }

    fn attach(&mut self, _d: Detached) -> io::Result<SockId> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "in-memory sockets do not move",
        ))
    }

    fn poll(&mut self, _now: Instant, out: &mut Vec<Event>) -> io::Result<bool> {
        for (i, m) in self.socks.iter().enumerate() {
            if let Some(m) = m {
                if !m.closed && (m.pos < m.input.len() || m.eof) {
                    out.push(Event::Sock(
                        SockId(i),
                        Readiness {
                            readable: true,
                            writable: true,
                        },
                    ));
                }
            }
        }
        Ok(false)
    }

    fn flush(&mut self, _now: Instant) {}

    fn next_deadline(&mut self, _now: Instant) -> Option<Instant> {
        None
    }

    fn wait(&mut self, _timeout: Option<Duration>) -> io::Result<bool> {
        Ok(false)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(NoWake)
    }
}

//! Sockets: the poll-driven [`Sock`] trait, the [`SockGroup`] a reactor polls for readiness,
//! and the kernel TCP implementation ([`posix`]).
//!
//! The iSCSI layer sees only these traits: no file descriptor crosses into `iscsi/`. A
//! userspace TCP stack fits behind the same traits the way smoltcp works: the group owns the
//! readiness bookkeeping and reports ready sockets by token.

pub mod posix;
pub mod ustack;

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;

/// A connected, non-blocking stream socket.
pub trait Sock: Send {
    /// Reads into `buf`: `Ok(0)` means the peer closed; `WouldBlock` means nothing to read.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads into several buffers at once.
    fn recv_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    /// Writes from several buffers at once; `WouldBlock` when the send buffer is full.
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn peer_addr(&self) -> SocketAddr;
    fn local_addr(&self) -> SocketAddr;
    /// Closes the socket; idempotent.
    fn close(&mut self);
    /// For the group implementation that matches this socket.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// What a socket is ready for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
}

/// The sockets of one reactor.
pub trait SockGroup: Send {
    /// Starts reporting readiness of `sock` under `token`.
    fn register(&mut self, sock: &mut dyn Sock, token: usize) -> io::Result<()>;
    /// Stops reporting `sock`.
    fn deregister(&mut self, sock: &mut dyn Sock, token: usize) -> io::Result<()>;
    /// What of `sock` should be reported: readability (unless its owner has stopped reading,
    /// holding too much unsent output) and writability (only while output is queued).
    fn set_interest(
        &mut self,
        sock: &mut dyn Sock,
        token: usize,
        read: bool,
        write: bool,
    ) -> io::Result<()>;
    /// Appends the sockets that are ready now, without waiting.
    fn poll(&mut self, out: &mut Vec<(usize, Readiness)>) -> io::Result<()>;
    /// Waits until a socket is ready, the reactor is woken, or `timeout` passes. Returns
    /// whether something (a socket, a listener, a wake-up) ended the wait before the timeout.
    fn wait(&mut self, timeout: Option<std::time::Duration>) -> io::Result<bool>;
    /// Starts (`on`) or stops reporting pending connections of `listener` under `token`: a
    /// reactor that sleeps then wakes for a new connection as it does for data. Stopping is
    /// how an accept that cannot proceed (no descriptor left) backs off instead of spinning.
    fn watch_listener(
        &mut self,
        listener: &mut dyn Listener,
        token: usize,
        on: bool,
    ) -> io::Result<()>;
}

/// A listening socket.
pub trait Listener: Send {
    /// A new connection, or `None` when none is pending.
    fn accept(&mut self) -> io::Result<Option<Box<dyn Sock>>>;
    fn local_addr(&self) -> SocketAddr;
    fn close(&mut self);
    /// For the group implementation that matches this listener.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// Listens on `addr` with the kernel's TCP stack (non-blocking; refuses when the port is
/// taken).
pub fn listen(addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
    Ok(Box::new(posix::PosixListener::bind(addr)?))
}

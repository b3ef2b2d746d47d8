//! The network seam: a per-reactor [`SockGroup`] in the manner of SPDK's `spdk_sock_group`,
//! and the [`Net`] that builds one group per reactor.
//!
//! A group owns its sockets, its listeners and its device. The iSCSI layer holds socket
//! handles ([`SockId`]), reads through the group, queues writes through it and asks it to
//! flush once per reactor pass; it never learns which stack it runs on. Two implementations:
//! the kernel's TCP ([`posix`]: non-blocking descriptors in an epoll set, an eventfd to wake)
//! and the userspace stack ([`ustack`]: one smoltcp interface and socket set per reactor over
//! a frame device). How a reactor sleeps comes from its group, so `reactor/` knows no
//! concrete network type.

pub mod mem;
pub mod posix;
pub mod ustack;
mod wake;

use std::any::Any;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A socket of one group. Handles are small integers reused after [`SockGroup::release`], so
/// an owner can index its own tables with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockId(pub usize);

/// What a socket is ready for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
}

/// What a group's poll found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A socket is readable (data, end of stream or an error to read) or writable.
    Sock(SockId, Readiness),
    /// Portal `.0` (an index into the portal list the group was built with) has connections
    /// waiting to be accepted.
    Accept(usize),
}

/// A connection taken out of one group to be adopted by another (the kernel path's
/// accept-and-spread). Opaque: only the implementation that made it can adopt it.
pub struct Detached(pub Box<dyn Any + Send>);

/// Wakes a reactor sleeping in its group's [`SockGroup::wait`], from any thread.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// A TCP connection's state as the tree shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SockInfo {
    pub peer: String,
    pub local: String,
    /// The TCP state (ESTABLISHED, CLOSE-WAIT, ...).
    pub state: String,
    /// Bytes queued to send and received but not yet read.
    pub send_queue: usize,
    pub recv_queue: usize,
    /// The receive window we advertise, and the peer's send window as last seen (0 when the
    /// stack does not say).
    pub recv_window: usize,
    pub send_window: usize,
    /// Segments sent again.
    pub retransmits: u64,
}

/// The sockets of one reactor.
pub trait SockGroup: Send {
    // ------------------------------------------------------------------ sockets
    /// Reads into `buf`: `Ok(0)` means the peer closed; `WouldBlock` means nothing to read.
    fn recv(&mut self, s: SockId, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads into several buffers at once.
    fn recv_vectored(&mut self, s: SockId, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    /// Queues bytes from several buffers; returns how many were taken (`WouldBlock` when none
    /// could be). What is taken goes out at the latest with the next [`SockGroup::flush`].
    fn send_vectored(&mut self, s: SockId, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// (peer, local) addresses.
    fn addrs(&self, s: SockId) -> (SocketAddr, SocketAddr);
    /// What of `s` is reported: readability (unless its owner has stopped reading, holding
    /// too much unsent output) and writability (only while output is queued). A hang-up or
    /// an error is reported as readable either way.
    fn set_interest(&mut self, s: SockId, read: bool, write: bool);
    /// Starts closing `s` (what was queued is still sent); the handle stays valid.
    fn close(&mut self, s: SockId);
    /// Forgets `s`; the handle may be reused.
    fn release(&mut self, s: SockId);
    /// The TCP view of `s`, for the tree.
    fn info(&self, s: SockId) -> Option<SockInfo>;

    // ------------------------------------------------------------------ listeners
    /// Accepts a connection waiting on portal `portal`, or `None`.
    fn accept(&mut self, portal: usize) -> io::Result<Option<SockId>>;
    /// Starts (`on`) or stops reporting waiting connections. Stopping is how an accept that
    /// cannot proceed (no descriptor left) backs off instead of spinning.
    fn watch_portals(&mut self, on: bool) -> io::Result<()>;
    /// Closes every listener (the target is stopping).
    fn close_portals(&mut self);
    /// Takes `s` out of this group to hand it to another reactor, or `None` when this stack
    /// cannot move a connection between reactors (the userspace stack: every reactor listens
    /// and keeps the flows its queue receives).
    fn detach(&mut self, s: SockId) -> Option<Detached>;
    /// Adopts a connection detached from another group of the same kind.
    fn attach(&mut self, d: Detached) -> io::Result<SockId>;

    // ------------------------------------------------------------------ the reactor's pass
    /// Receive → stack → readiness: appends what is ready now, without waiting. Returns
    /// whether the network did work (frames moved) even if no socket became ready.
    fn poll(&mut self, now: Instant, out: &mut Vec<Event>) -> io::Result<bool>;
    /// Sends what this pass queued on every socket.
    fn flush(&mut self, now: Instant);
    /// When the group next needs a poll even if nothing arrives (the stack's timers).
    fn next_deadline(&mut self, now: Instant) -> Option<Instant>;
    /// Sleeps until a socket or listener is ready, the reactor is woken, or `timeout`
    /// passes. Returns whether something ended the wait before the timeout.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool>;
    /// The handle other threads use to wake this group's reactor.
    fn waker(&self) -> Arc<dyn Wake>;
}

/// A network: one [`SockGroup`] per reactor, and what the tree shows of it (`net/`).
pub trait Net: Send + Sync {
    /// The group of reactor `reactor` (called once per reactor, in order, at start).
    fn group(&self, reactor: usize) -> io::Result<Box<dyn SockGroup>>;
    /// `net/` attributes: the stack, interface, addresses.
    fn describe(&self) -> Vec<(String, String)>;
    /// Per reactor counters (`net/reactors/N/...`).
    fn counters(&self) -> Vec<Vec<(String, String)>>;
    /// Per connection TCP views, as last published by the reactors.
    fn connections(&self) -> Vec<SockInfo>;
}

//! Block backends (SPDK's bdev model): a [`BlockDev`] is shared by every reactor; each reactor
//! talks to it through its own [`IoChannel`]. An I/O owns its data buffer while the backend
//! works on it and hands it back in the completion: no copies of buffers, no locks between
//! reactors on the submission path.
//!
//! Backends here: `vdisk_nullio` (reads zeros, writes dropped) and `vdisk_ramio` (RAM with real
//! storage, SPDK's malloc bdev), which complete at once, and in [`file`] `vdisk_fileio`,
//! `vdisk_blockio` and `vcdrom`, which go through the reactor's io_uring ([`uring`]). Every
//! completion travels through `poll`, so both kinds share one path.
//!
//! Each reactor has one [`IoContext`] (owned by its SCSI port): the ring that all of that
//! reactor's file and block channels share, created on first use.
//!
//! Fault injection for reliability tests ([`Fault`], and a delay held on chosen I/O) sits in
//! one place for every backend: a wrapper around each backend's own channel, set through the
//! device's [`FaultInject`].

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};

use crate::env::region::Region;
use crate::env::DataBuf;

pub mod file;
pub mod nvme;
pub mod uring;

pub use file::{FileDev, FileOptions, Kind};
pub use uring::Ring;

/// What a backend reports for a failed I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum BdevError {
    /// I/O error at byte offset {0}
    Io(u64),
    /// out of space
    NoSpace,
    /// the I/O carried no buffer, a buffer of the wrong size, or one not aligned for O_DIRECT
    BadBuffer,
    /// the device is not active (its backing is closed or failed)
    Offline,
    /// no medium is loaded
    NoMedium,
    /// cancelled before it reached the medium
    Cancelled,
    /// the medium refuses writes (a write-protected namespace)
    WriteProtected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    /// Deallocates the byte ranges in [`BdevIo::ranges`] (thin provisioning: UNMAP, WRITE
    /// SAME with UNMAP). Afterwards they read as zeros; `offset`/`len` are unused.
    Unmap,
    /// A hint that `offset`/`len` will be read soon (PRE-FETCH): backends with a cache in
    /// front of slower storage start reading it in; the others have nothing to do.
    Prefetch,
    /// Writes zeros over `offset`/`len` with no buffer (WRITE SAME of a block of zeros), the
    /// blocks left mapped. Sent only to backends whose
    /// [`supports_write_zeroes`](BlockDev::supports_write_zeroes) says so.
    WriteZeroes,
}

pub struct BdevIo {
    pub tag: u64,
    pub op: IoOp,
    /// Byte offset on the device.
    pub offset: u64,
    pub len: u32,
    pub buf: Option<DataBuf>,
    /// For [`IoOp::Unmap`]: (byte offset, byte length) pairs, block-aligned and in range.
    pub ranges: Vec<(u64, u64)>,
}

/// The provisioning state of a stretch of a device, for GET LBA STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Whether the stretch is mapped (holds data) or deallocated.
    pub mapped: bool,
    /// Its length in bytes from the queried offset (at least one block).
    pub len: u64,
}

pub struct BdevCompletion {
    pub tag: u64,
    pub result: Result<(), BdevError>,
    pub buf: Option<DataBuf>,
}

pub trait BlockDev: Send + Sync {
    fn block_size(&self) -> u32;
    fn num_blocks(&self) -> u64;
    /// A channel for the reactor whose I/O context is `cx`.
    fn open_channel(self: Arc<Self>, cx: &IoContext) -> Box<dyn IoChannel>;
    /// Whether writes may sit in a volatile cache (MODE SENSE caching page WCE).
    fn has_volatile_cache(&self) -> bool {
        false
    }
    /// Whether [`IoOp::Unmap`] deallocates (the device is thin provisioned).
    fn supports_unmap(&self) -> bool {
        false
    }
    /// Whether the device zeroes blocks itself ([`IoOp::WriteZeroes`]), with no data moved.
    fn supports_write_zeroes(&self) -> bool {
        false
    }
    /// The provisioning state from byte `offset` on (GET LBA STATUS). `None` when the
    /// backend cannot tell: everything counts as mapped.
    fn extent_at(&self, _offset: u64) -> Option<Extent> {
        None
    }
    /// Whether [`BlockDev::extent_at`] can tell deallocated stretches from mapped ones.
    fn reports_provisioning(&self) -> bool {
        false
    }
    /// The backend's fault injection switch, when its channels have one (they are wrapped
    /// in `Faulty`).
    fn fault(&self) -> Option<&FaultInject> {
        None
    }
}

/// A fault injected into a device's I/O for reliability tests (the `fault_inject` device
/// attribute). An injected error is what the backend reports for a real EIO: the same
/// [`BdevError::Io`] at the I/O's first byte, so the initiator sees the same MEDIUM ERROR with
/// the same LBA. Unlike a real one it never counts toward taking a file's backing offline
/// (three EIOs in a row do that to a real file): the fault stays exactly what was asked for
/// until it is set back to [`Fault::None`], and the device stays active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// No fault: every I/O goes to the backend.
    None = 0,
    /// Reads fail.
    EioRead = 1,
    /// Writes fail, and so do cache flushes (SYNCHRONIZE CACHE) and unmaps.
    EioWrite = 2,
    /// Reads, writes, flushes and unmaps fail.
    Eio = 3,
    /// New I/O is held, as by a device that stopped answering, until the fault is set to
    /// another value; the held I/O then goes on as that value says. I/O submitted before the
    /// stall completes as usual. Held I/O of an aborted command is cancelled: it had not
    /// reached the device.
    Stall = 4,
    /// Like `Stall`, but as if the held I/O had already been issued to the device: it cannot
    /// be cancelled, and lands when the fault is cleared (what a write in a disk's queue
    /// does). Shows that an aborted command is reported over only once it can no longer
    /// change the medium.
    Hang = 5,
}

impl Fault {
    /// Every fault with the name the attribute uses for it.
    pub const ALL: [(Fault, &'static str); 6] = [
        (Fault::None, "none"),
        (Fault::EioRead, "eio_read"),
        (Fault::EioWrite, "eio_write"),
        (Fault::Eio, "eio"),
        (Fault::Stall, "stall"),
        (Fault::Hang, "hang"),
    ];

    pub fn name(self) -> &'static str {
        Fault::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("none", |(_, n)| n)
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.iter().find(|(_, n)| *n == name).map(|(f, _)| *f)
    }

    fn from_u8(v: u8) -> Fault {
        Fault::ALL
            .iter()
            .find(|(f, _)| *f as u8 == v)
            .map_or(Fault::None, |(f, _)| *f)
    }

    /// Whether `op` fails under this fault.
    fn fails(self, op: IoOp) -> bool {
        match op {
            IoOp::Read => matches!(self, Fault::EioRead | Fault::Eio),
            IoOp::Write { .. } | IoOp::Flush | IoOp::Unmap | IoOp::WriteZeroes => {
                matches!(self, Fault::EioWrite | Fault::Eio)
            }
            // A hint: a read-ahead that cannot start is no error of the command.
            IoOp::Prefetch => false,
        }
    }
}

/// The longest delay [`FaultInject::set_delay_us`] takes: a minute (beyond it the initiator's
/// own timeouts decide, which `hang` shows better).
pub const MAX_FAULT_DELAY_US: u64 = 60_000_000;

/// A device's fault injection switch, shared by all of its channels: the [`Fault`], and a
/// delay held on one I/O in every `delay_every` (the `fault_delay_us` and
/// `fault_delay_every` device attributes), which adds latency without failing anything.
#[derive(Debug)]
pub struct FaultInject {
    /// The fault in the low bits, [`FaultInject::DELAYING`] while a delay is set: zero when
    /// nothing at all is injected, so a submission checks one relaxed load.
    state: AtomicU8,
    delay_us: AtomicU64,
    delay_every: AtomicU32,
}

impl Default for FaultInject {
    fn default() -> FaultInject {
        FaultInject {
            state: AtomicU8::new(Fault::None as u8),
            delay_us: AtomicU64::new(0),
            delay_every: AtomicU32::new(1),
        }
    }
}

impl FaultInject {
    /// The bit of `state` that says a delay is set.
    const DELAYING: u8 = 0x80;

    pub fn get(&self) -> Fault {
        Fault::from_u8(self.state.load(Ordering::Relaxed) & !Self::DELAYING)
    }

    /// Takes effect at each channel's next submission; held I/O is released at its next
    /// poll.
    pub fn set(&self, f: Fault) {
        // The closure always returns Some: the update cannot fail.
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((s & Self::DELAYING) | f as u8)
            });
    }

    /// The delay held on each chosen I/O, in microseconds (0: none).
    pub fn delay_us(&self) -> u64 {
        self.delay_us.load(Ordering::Relaxed)
    }

    /// How many I/Os of a channel make one that is delayed: 1 delays every I/O, 10 the 10th,
    /// 20th, ... of each channel (a channel per reactor and device).
    pub fn delay_every(&self) -> u32 {
        self.delay_every.load(Ordering::Relaxed)
    }

    /// Sets the delay (at most [`MAX_FAULT_DELAY_US`]); 0 ends it, and what a delay holds is
    /// then handed on at each channel's next poll instead of at its deadline.
    pub fn set_delay_us(&self, us: u64) {
        let us = us.min(MAX_FAULT_DELAY_US);
        self.delay_us.store(us, Ordering::Relaxed);
        if us > 0 {
            self.state.fetch_or(Self::DELAYING, Ordering::Relaxed);
        } else {
            self.state.fetch_and(!Self::DELAYING, Ordering::Relaxed);
        }
    }

    /// Sets which I/Os are delayed (0 counts as 1: every one).
    pub fn set_delay_every(&self, n: u32) {
        self.delay_every.store(n.max(1), Ordering::Relaxed);
    }

    /// The delay for I/O chosen now, if one is set.
    fn delay(&self) -> Option<Duration> {
        if self.state.load(Ordering::Relaxed) & Self::DELAYING == 0 {
            return None;
        }
        match self.delay_us() {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// A backend's channel with fault injection in front: every backend's `open_channel` wraps
/// its own channel in one, so faults are injected in one place for all of them, beneath the
/// SCSI layer, which then treats an injected error exactly as a real one. Without a fault a
/// submission costs one relaxed load more, with no extra dynamic call.
///
/// A delay holds each chosen I/O here until its deadline, then hands it on as the fault then
/// says (to the backend when there is none). While anything is held the channel is busy and
/// reports its next deadline, so that a reactor about to sleep wakes for it.
struct Faulty<C> {
    inner: C,
    fault: Arc<FaultInject>,
    /// I/O held by [`Fault::Stall`] or [`Fault::Hang`] (`true`: it can be cancelled), in
    /// submission order.
    held: VecDeque<(BdevIo, bool)>,
    /// I/O held by the delay, with its deadline, in submission order (deadlines only
    /// decrease when the delay is shortened: the later I/O then waits for the earlier).
    delayed: VecDeque<(Instant, BdevIo)>,
    /// I/Os submitted while a delay was set since the last one delayed.
    since_delayed: u32,
    /// Completions of injected errors, for the next `poll`.
    failed: VecDeque<BdevCompletion>,
}

impl<C: IoChannel> Faulty<C> {
    fn new(inner: C, fault: Arc<FaultInject>) -> Faulty<C> {
        Faulty {
            inner,
            fault,
            held: VecDeque::new(),
            delayed: VecDeque::new(),
            since_delayed: 0,
            failed: VecDeque::new(),
        }
    }

    #[cold]
    fn inject(&mut self, io: BdevIo) {
        if !self.held.is_empty() {
            // What was held goes first.
            self.release();
        }
        if let Some(d) = self.fault.delay() {
            self.since_delayed += 1;
            if self.since_delayed >= self.fault.delay_every() {
                self.since_delayed = 0;
                self.delayed.push_back((Instant::now() + d, io));
                return;
            }
        }
        let f = self.fault.get();
        self.route(f, io);
    }

    /// Holds, fails or submits `io` as fault `f` says.
    fn route(&mut self, f: Fault, io: BdevIo) {
        if matches!(f, Fault::Stall | Fault::Hang) {
            self.held.push_back((io, f == Fault::Stall));
        } else if f.fails(io.op) {
            let at = match io.op {
                IoOp::Unmap => io.ranges.first().map_or(0, |r| r.0),
                IoOp::Flush => 0,
                _ => io.offset,
            };
            self.failed.push_back(BdevCompletion {
                tag: io.tag,
                result: Err(BdevError::Io(at)),
                buf: io.buf,
            });
        } else {
            self.inner.submit(io);
        }
    }

    /// Hands held I/O on, in order, once the stall is over, each as the fault now says.
    #[cold]
    fn release(&mut self) {
        let f = self.fault.get();
        if matches!(f, Fault::Stall | Fault::Hang) {
            return;
        }
        while let Some((io, _)) = self.held.pop_front() {
            self.route(f, io);
        }
    }

    /// Hands on, in order, the delayed I/O whose deadline has passed (all of it once the
    /// delay is off), each as the fault now says.
    #[cold]
    fn release_delayed(&mut self) {
        let on = self.fault.delay().is_some();
        let now = Instant::now();
        while self.delayed.front().is_some_and(|(t, _)| !on || *t <= now) {
            if let Some((_, io)) = self.delayed.pop_front() {
                let f = self.fault.get();
                self.route(f, io);
            }
        }
    }
}

impl<C: IoChannel> IoChannel for Faulty<C> {
    fn submit(&mut self, io: BdevIo) {
        if self.fault.state.load(Ordering::Relaxed) == 0 && self.held.is_empty() {
            return self.inner.submit(io);
        }
        self.inject(io);
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        if !self.held.is_empty() {
            self.release();
        }
        if !self.delayed.is_empty() {
            self.release_delayed();
        }
        let mut n = self.inner.poll(out);
        if !self.failed.is_empty() {
            n += self.failed.len();
            out.extend(self.failed.drain(..));
        }
        n
    }

    fn busy(&self) -> bool {
        self.inner.busy()
            || !self.held.is_empty()
            || !self.delayed.is_empty()
            || !self.failed.is_empty()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let own = self.delayed.front().map(|(t, _)| *t);
        match (own, self.inner.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn cancel(&mut self, tag: u64) {
        // Held I/O has not gone anywhere: it ends here, so an aborted command held by a stall
        // or a delay is answered at once and can never reach the medium later.
        if let Some(i) = self.delayed.iter().position(|(_, io)| io.tag == tag) {
            if let Some((_, io)) = self.delayed.remove(i) {
                self.failed.push_back(BdevCompletion {
                    tag,
                    result: Err(BdevError::Cancelled),
                    buf: io.buf,
                });
            }
            return;
        }
        if let Some(i) = self
            .held
            .iter()
            .position(|(io, cancellable)| io.tag == tag && *cancellable)
        {
            if let Some((io, _)) = self.held.remove(i) {
                self.failed.push_back(BdevCompletion {
                    tag,
                    result: Err(BdevError::Cancelled),
                    buf: io.buf,
                });
            }
            return;
        }
        self.inner.cancel(tag);
    }
}

/// A reactor's backend I/O state: the io_uring its file and block channels share, created
/// on first use so that a reactor serving only RAM disks never opens one. Not `Send`: it
/// belongs to the reactor thread.
#[derive(Default)]
pub struct IoContext {
    ring: OnceCell<Option<Rc<Ring>>>,
}

impl IoContext {
    pub fn new() -> IoContext {
        IoContext::default()
    }

    /// The ring, created on first call; `None` (logged once) when io_uring is unavailable.
    pub fn ring(&self) -> Option<Rc<Ring>> {
        self.ring
            .get_or_init(|| match Ring::new() {
                Ok(r) => Some(Rc::new(r)),
                Err(e) => {
                    error!("cannot create an io_uring ({e}): file and block devices fail I/O");
                    None
                }
            })
            .clone()
    }

    /// Submits queued SQEs and handles the completions that have arrived; the channels then
    /// report them from their `poll`. Returns how many operations finished.
    pub fn poll(&self) -> usize {
        match self.ring.get() {
            Some(Some(r)) => r.poll(),
            _ => 0,
        }
    }

    /// Blocks until some ring I/O completes (tests and shutdown).
    pub fn wait(&self) -> usize {
        match self.ring.get() {
            Some(Some(r)) => r.wait(),
            _ => 0,
        }
    }

    /// Operations in flight in the kernel: while there are any the reactor must not sleep.
    pub fn inflight(&self) -> usize {
        match self.ring.get() {
            Some(Some(r)) => r.inflight(),
            _ => 0,
        }
    }
}

pub trait IoChannel {
    /// Takes the I/O; its completion comes back from [`poll`](IoChannel::poll).
    fn submit(&mut self, io: BdevIo);
    /// Appends completed I/O; returns how many.
    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize;
    /// Whether I/O submitted here has not been reported by `poll` yet.
    fn busy(&self) -> bool;
    /// When the channel next has something to hand on by itself (held I/O coming due), with
    /// no event to wake a sleeping reactor: it must be polled again by then.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Cancels I/O `tag` if it has not reached the medium yet: its completion then reports
    /// [`BdevError::Cancelled`]. I/O already under way completes as it would have; either way
    /// it completes through `poll`, so the caller learns when it can no longer act.
    fn cancel(&mut self, _tag: u64) {}
}

/// A channel for backends that complete in the submitting call.
struct Immediate<D: SyncDev> {
    dev: Arc<D>,
    /// What the backend keeps per channel.
    local: D::Local,
    done: VecDeque<BdevCompletion>,
}

impl<D: SyncDev> Immediate<D> {
    fn new(dev: Arc<D>) -> Immediate<D> {
        Immediate {
            local: dev.local(),
            dev,
            done: VecDeque::with_capacity(64),
        }
    }
}

trait SyncDev: Send + Sync + Sized {
    /// State of one channel (one reactor's), made when the channel opens.
    type Local;
    fn local(self: &Arc<Self>) -> Self::Local;
    fn run(&self, local: &Self::Local, io: &mut BdevIo) -> Result<(), BdevError>;
}

impl<D: SyncDev + 'static> IoChannel for Immediate<D> {
    fn submit(&mut self, mut io: BdevIo) {
        let result = self.dev.run(&self.local, &mut io);
        self.done.push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn busy(&self) -> bool {
        !self.done.is_empty()
    }
}

/// SCST's vdisk_nullio: reads return zeros, writes are dropped.
pub struct NullDev {
    block_size: u32,
    num_blocks: u64,
}

impl NullDev {
    pub fn new(block_size: u32, num_blocks: u64) -> Arc<NullDev> {
        Arc::new(NullDev {
            block_size,
            num_blocks,
        })
    }
}

impl SyncDev for NullDev {
    type Local = ();
    fn local(self: &Arc<Self>) {}
    fn run(&self, _: &(), io: &mut BdevIo) -> Result<(), BdevError> {
        if let (IoOp::Read, Some(buf)) = (io.op, io.buf.as_mut()) {
            buf.fill(0, io.len as usize, 0);
        }
        Ok(())
    }
}

impl BlockDev for NullDev {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn open_channel(self: Arc<Self>, _cx: &IoContext) -> Box<dyn IoChannel> {
        Box::new(Immediate::new(self))
    }
}

/// Bytes promised to this process's RAM disks: their whole sizes, as their memory is only
/// taken when first written and MemAvailable does not show it yet.
static RAM_RESERVED: AtomicU64 = AtomicU64::new(0);

/// Memory a new RAM disk may take, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRoom {
    pub bytes: u64,
    pub source: &'static str,
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The room left under the memory limits of this process's cgroups (`/proc/self/cgroup`
/// lines: v2 `0::PATH` with memory.max, v1 `N:memory:PATH` with memory.limit_in_bytes),
/// from its own cgroup up to the hierarchy's root; `None` when no limit applies.
fn cgroup_room(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (base, limit, usage) = if ctrl.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current")
        } else if ctrl.split(',').any(|c| c == "memory") {
            (
                root.join("memory"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        // Inside a container the path may not exist under our mount: its ancestors (and the
        // root, which is then the container's own cgroup) still tell.
        let mut dir: PathBuf = base.join(path.trim_start_matches('/'));
        loop {
            // "max" (v2, no limit) does not parse: nothing to bound.
            if let (Some(l), Some(u)) = (read_u64(&dir.join(limit)), read_u64(&dir.join(usage))) {
                let room = l.saturating_sub(u);
                best = Some(best.map_or(room, |b| b.min(room)));
            }
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    best
}

/// The memory a new RAM disk may take: MemAvailable, or less when a cgroup limit is nearer.
/// `None` when /proc/meminfo cannot be read.
pub fn memory_room() -> Option<MemoryRoom> {
    let avail = mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)?;
    let cg = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| cgroup_room(&t, Path::new("/sys/fs/cgroup")));
    Some(match cg {
        Some(c) if c < avail => MemoryRoom {
            bytes: c,
            source: "the cgroup's memory limit",
        },
        _ => MemoryRoom {
            bytes: avail,
            source: "MemAvailable",
        },
    })
}

/// A RAM disk's share of the bytes reserved in a counter ([`RAM_RESERVED`]), given back when
/// it is dropped.
struct RamReservation {
    size: u64,
    counter: &'static AtomicU64,
}

impl RamReservation {
    /// Reserves `size` bytes in `counter` if they fit in `room` beside what other RAM disks
    /// hold.
    fn take(
        size: u64,
        room: &MemoryRoom,
        counter: &'static AtomicU64,
    ) -> Result<RamReservation, String> {
        let mut held = counter.load(Ordering::Acquire);
        loop {
            let free = room.bytes.saturating_sub(held);
            if size > free {
                return Err(format!(
                    "a RAM disk of {size} bytes ({} MiB) does not fit in memory: {free} bytes ({} MiB) are available ({} {} MiB, less {} MiB for the other RAM disks)",
                    size >> 20,
                    free >> 20,
                    room.source,
                    room.bytes >> 20,
                    held >> 20
                ));
            }
            match counter.compare_exchange(held, held + size, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(RamReservation { size, counter }),
                Err(now) => held = now,
            }
        }
    }
}

impl Drop for RamReservation {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// A RAM disk whose data reads back (SPDK's malloc bdev): one anonymous mapping, zero-filled
/// on demand by the kernel, so an untouched disk costs nothing; its whole size is reserved all
/// the same, so that the disks together never promise more than the machine has. The mapping
/// asks for transparent hugepages: random reads over a large disk then miss the TLB far less.
///
/// Reads copy nothing: the command's buffer is lent the disk's own memory
/// ([`DataBuf::lend`]), and the Data-In is sent from it. Each channel holds the mapping for
/// the buffers it lends ([`RamLease`]), so lending costs one atomic increment on a counter
/// only that channel's reactor touches, never a line shared between reactors.
///
/// There is no lock: commands in flight at the same time on the same blocks (which SCSI
/// leaves undefined unless the initiator orders them) see each other's bytes as they land,
/// as they would on any disk; commands that are not in flight together are ordered by the
/// transport (a read's data has gone to the socket before its status does, and the status
/// before any command that waited for it).
pub struct RamDev {
    block_size: u32,
    size: u64,
    mem: Region,
    _reserved: Option<RamReservation>,
    fault: Arc<FaultInject>,
}

/// What one channel of a RAM disk lends its reads under: a hold on the disk's mapping.
pub struct RamLease {
    _dev: Arc<RamDev>,
}

impl RamDev {
    /// A RAM disk of `size` bytes, refused when it does not fit in the memory available
    /// ([`memory_room`]) less what the other RAM disks reserve.
    pub fn new(block_size: u32, size: u64) -> Result<Arc<RamDev>, String> {
        let reserved = match memory_room() {
            Some(room) => Some(RamReservation::take(size, &room, &RAM_RESERVED)?),
            None => {
                warn!("cannot read MemAvailable from /proc/meminfo: a RAM disk of {size} bytes is not checked against memory");
                None
            }
        };
        let bytes = usize::try_from(size)
            .map_err(|_| format!("a RAM disk of {size} bytes is too large"))?;
        let mem = Region::new(bytes, false)
            .map_err(|e| format!("cannot map {size} bytes for a RAM disk: {e}"))?;
        mem.advise_hugepages();
        Ok(Arc::new(RamDev {
            block_size,
            size,
            mem,
            _reserved: reserved,
            fault: Arc::default(),
        }))
    }

    /// The disk's bytes `offset..offset + len`, which the caller has checked lie on the disk.
    fn at(&self, offset: u64, len: usize) -> NonNull<u8> {
        debug_assert!(offset + len as u64 <= self.size);
        // SAFETY: `offset + len <= size <= mem.size()`, so the result stays inside the mapping.
        unsafe { self.mem.addr().add(offset as usize) }
    }

    /// Checks that `offset..offset + len` lies on the disk.
    fn range(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BdevError::Io(offset)),
        }
    }
}

impl SyncDev for RamDev {
    type Local = Arc<RamLease>;

    fn local(self: &Arc<Self>) -> Arc<RamLease> {
        Arc::new(RamLease { _dev: self.clone() })
    }

    fn run(&self, lease: &Arc<RamLease>, io: &mut BdevIo) -> Result<(), BdevError> {
        let len = io.len as usize;
        match io.op {
            IoOp::Flush | IoOp::Prefetch => return Ok(()),
            IoOp::Unmap => {
                // Deallocated blocks of a RAM disk read as zeros.
                for &(off, n) in &io.ranges {
                    self.range(off, n)?;
                }
                for &(off, n) in &io.ranges {
                    let p = self.at(off, n as usize);
                    // SAFETY: the range lies inside the mapping (checked above); the disk's
                    // memory is only ever reached through raw pointers or lent buffers, whose
                    // contract allows overlapping commands to see the change.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), 0, n as usize) };
                }
                return Ok(());
            }
            IoOp::WriteZeroes => {
                self.range(io.offset, len as u64)?;
                let p = self.at(io.offset, len);
                // SAFETY: as for UNMAP above: inside the mapping, reached only through raw
                // pointers or lent buffers.
                unsafe { std::ptr::write_bytes(p.as_ptr(), 0, len) };
                return Ok(());
            }
            IoOp::Read | IoOp::Write { .. } => {}
        }
        self.range(io.offset, len as u64)?;
        let buf = io.buf.as_mut().ok_or(BdevError::BadBuffer)?;
        if buf.len() < len {
            return Err(BdevError::BadBuffer);
        }
        let p = self.at(io.offset, len);
        if io.op == IoOp::Read {
            buf.truncate(len);
            // SAFETY: `len` bytes at `p` lie inside the mapping, which the lease keeps mapped
            // while the buffer holds it; the kernel zero-fills untouched pages, so every byte
            // is initialised; they change only under overlapping writes (see `RamDev`).
            unsafe { buf.lend(p, lease.clone()) };
            return Ok(());
        }
        let mut done = 0;
        for seg in buf.segments(0, len) {
            // SAFETY: `done + seg.len() <= len` keeps the destination inside the range checked
            // above, and `seg` is readable for its length. The source may itself be memory of
            // this disk lent to the buffer (a copy between two ranges of one RAM LUN), so the
            // copy is one that allows overlap.
            unsafe {
                std::ptr::copy(seg.as_ptr(), p.as_ptr().add(done), seg.len());
            }
            done += seg.len();
        }
        Ok(())
    }
}

impl BlockDev for RamDev {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.size / u64::from(self.block_size)
    }
    fn open_channel(self: Arc<Self>, _cx: &IoContext) -> Box<dyn IoChannel> {
        let fault = self.fault.clone();
        Box::new(Faulty::new(Immediate::new(self), fault))
    }
    fn fault(&self) -> Option<&FaultInject> {
        Some(&self.fault)
    }
    /// Zeroing the disk's memory beats filling a buffer with zeros and copying it in.
    fn supports_write_zeroes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(op: IoOp, offset: u64, len: u32, buf: DataBuf) -> BdevIo {
        BdevIo {
            tag: 9,
            op,
            offset,
            len,
            buf: Some(buf),
            ranges: Vec::new(),
        }
    }

    #[test]
    fn ram_write_zeroes_zeroes_the_range_and_nothing_else() {
        let dev = RamDev::new(512, 1 << 20).unwrap();
        assert!(dev.supports_write_zeroes());
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(8192).unwrap();
        b.fill(0, 8192, 0x5a);
        let mut out = Vec::new();
        ch.submit(io(IoOp::Write { fua: false }, 0, 8192, b));
        ch.poll(&mut out);
        ch.submit(BdevIo {
            tag: 3,
            op: IoOp::WriteZeroes,
            offset: 1024,
            len: 2048,
            buf: None,
            ranges: Vec::new(),
        });
        ch.submit(BdevIo {
            tag: 4,
            op: IoOp::WriteZeroes,
            offset: (1 << 20) - 512,
            len: 1024,
            buf: None,
            ranges: Vec::new(),
        });
        out.clear();
        ch.poll(&mut out);
        assert_eq!(out[0].result, Ok(()));
        assert_eq!(
            out[1].result,
            Err(BdevError::Io((1 << 20) - 512)),
            "past the end"
        );
        ch.submit(io(IoOp::Read, 0, 8192, DataBuf::alloc(8192).unwrap()));
        out.clear();
        ch.poll(&mut out);
        let mut back = vec![0u8; 8192];
        out[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back[..1024].iter().all(|&x| x == 0x5a));
        assert!(back[1024..3072].iter().all(|&x| x == 0));
        assert!(back[3072..].iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn ram_reads_lend_the_disk_memory() {
        let dev = RamDev::new(512, 4 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(8192).unwrap();
        b.fill(0, 8192, 0x3c);
        ch.submit(io(IoOp::Write { fua: false }, 65536, 8192, b));
        let mut out = Vec::new();
        ch.poll(&mut out);
        assert_eq!(out[0].result, Ok(()));
        // A buffer larger than the read is cut to the read's length: nothing past the range
        // is lent.
        ch.submit(io(
            IoOp::Read,
            65536 + 512,
            4096,
            DataBuf::alloc(8192).unwrap(),
        ));
        out.clear();
        ch.poll(&mut out);
        let mut rb = out.pop().unwrap().buf.unwrap();
        assert!(rb.is_lent());
        assert_eq!(rb.len(), 4096);
        assert!(rb.segments(0, 4096).all(|s| s.iter().all(|&x| x == 0x3c)));
        // Writing into the buffer never reaches the disk.
        rb.fill(0, 16, 0);
        assert!(!rb.is_lent());
        ch.submit(io(
            IoOp::Read,
            65536 + 512,
            512,
            DataBuf::alloc(512).unwrap(),
        ));
        out.clear();
        ch.poll(&mut out);
        let again = out.pop().unwrap().buf.unwrap();
        assert!(again.segments(0, 512).all(|s| s.iter().all(|&x| x == 0x3c)));
        // A lent buffer holds the mapping: the disk outlives its channel and its last handle
        // for as long as the buffer does.
        let weak = Arc::downgrade(&dev);
        drop((ch, dev, rb));
        assert!(weak.upgrade().is_some());
        assert!(again.segments(0, 512).all(|s| s.iter().all(|&x| x == 0x3c)));
        drop(again);
        assert!(
            weak.upgrade().is_none(),
            "the last buffer let go of the disk"
        );
    }

    #[test]
    fn a_ram_write_from_its_own_lent_memory_may_overlap() {
        let dev = RamDev::new(512, 1 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(8192).unwrap();
        let data: Vec<u8> = (0..8192).map(|i| (i / 7) as u8).collect();
        b.write_at(0, &data);
        let mut out = Vec::new();
        ch.submit(io(IoOp::Write { fua: false }, 0, 8192, b));
        ch.poll(&mut out);
        ch.submit(io(IoOp::Read, 0, 8192, DataBuf::alloc(8192).unwrap()));
        out.clear();
        ch.poll(&mut out);
        let lent = out.pop().unwrap().buf.unwrap();
        assert!(lent.is_lent());
        // Blocks 0-15 written again at blocks 8-23, from the disk's own memory.
        ch.submit(io(IoOp::Write { fua: false }, 4096, 8192, lent));
        out.clear();
        ch.poll(&mut out);
        assert_eq!(out[0].result, Ok(()));
        ch.submit(io(IoOp::Read, 4096, 8192, DataBuf::alloc(8192).unwrap()));
        out.clear();
        ch.poll(&mut out);
        let mut back = vec![0u8; 8192];
        out[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
    }

    #[test]
    fn ram_reads_back_across_chunks() {
        let dev = RamDev::new(512, 4 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(300 * 1024).unwrap();
        let data: Vec<u8> = (0..b.len()).map(|i| (i * 7) as u8).collect();
        b.write_at(0, &data);
        ch.submit(io(
            IoOp::Write { fua: true },
            (2 << 20) - 4096,
            data.len() as u32,
            b,
        ));
        let mut out = Vec::new();
        assert_eq!(ch.poll(&mut out), 1);
        assert!(out[0].result.is_ok());
        assert_eq!(out[0].tag, 9);
        ch.submit(io(
            IoOp::Read,
            (2 << 20) - 4096,
            data.len() as u32,
            DataBuf::alloc(data.len()).unwrap(),
        ));
        out.clear();
        ch.poll(&mut out);
        let mut back = vec![0u8; data.len()];
        out[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
        // Past the end fails, never panics.
        ch.submit(io(
            IoOp::Read,
            (4 << 20) - 512,
            1024,
            DataBuf::alloc(1024).unwrap(),
        ));
        out.clear();
        ch.poll(&mut out);
        assert!(out[0].result.is_err());
    }

    #[test]
    fn ram_disks_fit_in_memory() {
        assert_eq!(
            mem_available("MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable:   2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(mem_available("MemTotal: 100 kB\n"), None);
        // A pretend machine, with a counter of its own (tests run in parallel).
        static HELD: AtomicU64 = AtomicU64::new(0);
        let room = MemoryRoom {
            bytes: 1 << 62,
            source: "MemAvailable",
        };
        let a = RamReservation::take(1 << 61, &room, &HELD).unwrap();
        let e = RamReservation::take(3 << 60, &room, &HELD).err().unwrap();
        assert!(
            e.contains(&(3u64 << 60).to_string()) && e.contains("available"),
            "{e}"
        );
        drop(a);
        // Given back when the disk goes.
        let b = RamReservation::take(3 << 60, &room, &HELD).unwrap();
        drop(b);
        let small = MemoryRoom {
            bytes: 1 << 20,
            source: "MemAvailable",
        };
        assert!(RamReservation::take(2 << 20, &small, &HELD).is_err());
        // The real machine: a disk beyond its memory is refused.
        let real = memory_room().unwrap();
        let e = RamDev::new(512, (real.bytes + (1 << 30)) & !511)
            .err()
            .unwrap();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn cgroup_limits_bound_the_room() {
        let root = tempfile::tempdir().unwrap();
        let w = |rel: &str, v: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        // v2: the nearest ancestor with a limit counts; "max" is none.
        w("a/memory.max", "1000000");
        w("a/memory.current", "400000");
        w("a/b/memory.max", "max");
        w("a/b/memory.current", "100");
        assert_eq!(cgroup_room("0::/a/b\n", root.path()), Some(600_000));
        assert_eq!(cgroup_room("0::/\n", root.path()), None);
        // v1 memory controller, also listed with others.
        w("memory/c/memory.limit_in_bytes", "5000");
        w("memory/c/memory.usage_in_bytes", "1000");
        assert_eq!(
            cgroup_room("4:cpu,memory:/c\n1:pids:/\n", root.path()),
            Some(4000)
        );
        // A path missing from the mount (a container's view): its root still tells.
        w("memory/memory.limit_in_bytes", "3000");
        w("memory/memory.usage_in_bytes", "2000");
        assert_eq!(
            cgroup_room("4:memory:/elsewhere/x\n", root.path()),
            Some(1000)
        );
    }

    fn submit_one(ch: &mut Box<dyn IoChannel>, op: IoOp, offset: u64, data: u8) {
        let mut b = DataBuf::alloc(4096).unwrap();
        b.fill(0, 4096, data);
        ch.submit(io(op, offset, 4096, b));
    }

    fn poll_all(ch: &mut Box<dyn IoChannel>) -> Vec<BdevCompletion> {
        let mut out = Vec::new();
        ch.poll(&mut out);
        out
    }

    #[test]
    fn injected_errors_are_what_a_real_eio_reports() {
        let dev = RamDev::new(512, 1 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let fault = dev.fault().unwrap();
        assert_eq!(fault.get(), Fault::None);
        submit_one(&mut ch, IoOp::Write { fua: false }, 8192, 0x5a);
        assert_eq!(poll_all(&mut ch)[0].result, Ok(()));

        fault.set(Fault::EioWrite);
        submit_one(&mut ch, IoOp::Write { fua: false }, 4096, 0x77);
        let c = poll_all(&mut ch);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].result, Err(BdevError::Io(4096)));
        assert!(c[0].buf.is_some(), "the buffer comes back");
        ch.submit(BdevIo {
            tag: 1,
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            buf: None,
            ranges: Vec::new(),
        });
        assert_eq!(poll_all(&mut ch)[0].result, Err(BdevError::Io(0)));
        ch.submit(BdevIo {
            tag: 2,
            op: IoOp::Unmap,
            offset: 0,
            len: 0,
            buf: None,
            ranges: vec![(1024, 512)],
        });
        assert_eq!(poll_all(&mut ch)[0].result, Err(BdevError::Io(1024)));
        // Reads still work, and read what was written before.
        submit_one(&mut ch, IoOp::Read, 8192, 0);
        let c = poll_all(&mut ch);
        assert_eq!(c[0].result, Ok(()));
        let mut back = vec![0u8; 4096];
        c[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back.iter().all(|&x| x == 0x5a));
        // The failed write changed nothing.
        submit_one(&mut ch, IoOp::Read, 4096, 1);
        let c = poll_all(&mut ch);
        c[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back.iter().all(|&x| x == 0));

        fault.set(Fault::EioRead);
        submit_one(&mut ch, IoOp::Read, 512, 0);
        assert_eq!(poll_all(&mut ch)[0].result, Err(BdevError::Io(512)));
        submit_one(&mut ch, IoOp::Write { fua: true }, 512, 1);
        assert_eq!(poll_all(&mut ch)[0].result, Ok(()));
        ch.submit(BdevIo {
            tag: 3,
            op: IoOp::Prefetch,
            offset: 0,
            len: 4096,
            buf: None,
            ranges: Vec::new(),
        });
        assert_eq!(poll_all(&mut ch)[0].result, Ok(()), "a hint never fails");

        fault.set(Fault::Eio);
        submit_one(&mut ch, IoOp::Read, 0, 0);
        submit_one(&mut ch, IoOp::Write { fua: false }, 0, 0);
        let c = poll_all(&mut ch);
        assert!(
            c.iter().all(|c| c.result == Err(BdevError::Io(0))),
            "both fail"
        );
        assert!(!ch.busy());

        fault.set(Fault::None);
        submit_one(&mut ch, IoOp::Read, 512, 0);
        assert_eq!(poll_all(&mut ch)[0].result, Ok(()));
        assert_eq!(Fault::parse("eio_write"), Some(Fault::EioWrite));
        assert_eq!(Fault::parse("bogus"), None);
        for (f, n) in Fault::ALL {
            assert_eq!(Fault::parse(n), Some(f));
            assert_eq!(f.name(), n);
        }
    }

    #[test]
    fn a_stall_holds_io_until_it_is_cleared() {
        let dev = RamDev::new(512, 1 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let fault = dev.fault().unwrap();
        submit_one(&mut ch, IoOp::Write { fua: false }, 0, 0x33);
        // Submitted before the stall: it completes.
        fault.set(Fault::Stall);
        assert_eq!(poll_all(&mut ch).len(), 1);
        submit_one(&mut ch, IoOp::Read, 0, 0);
        ch.submit(BdevIo {
            tag: 10,
            ..io(IoOp::Write { fua: false }, 4096, 4096, {
                let mut b = DataBuf::alloc(4096).unwrap();
                b.fill(0, 4096, 0x44);
                b
            })
        });
        for _ in 0..3 {
            assert!(poll_all(&mut ch).is_empty(), "held");
            assert!(ch.busy(), "held I/O keeps the channel busy");
        }
        fault.set(Fault::None);
        let c = poll_all(&mut ch);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].tag, 9, "in submission order");
        assert_eq!(c[1].tag, 10);
        assert!(c.iter().all(|c| c.result.is_ok()));
        let mut back = vec![0u8; 4096];
        c[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back.iter().all(|&x| x == 0x33));
        assert!(!ch.busy());
        // Held I/O released into another fault gets that fault.
        fault.set(Fault::Stall);
        submit_one(&mut ch, IoOp::Read, 0, 0);
        assert!(poll_all(&mut ch).is_empty());
        fault.set(Fault::EioRead);
        assert_eq!(poll_all(&mut ch)[0].result, Err(BdevError::Io(0)));
        fault.set(Fault::None);
    }

    /// Polls until `n` completions have come, at most `limit` (a test bound, generous).
    fn poll_until(ch: &mut Box<dyn IoChannel>, n: usize, limit: Duration) -> Vec<BdevCompletion> {
        let give_up = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < give_up {
            ch.poll(&mut out);
            std::thread::yield_now();
        }
        out
    }

    #[test]
    fn a_delay_holds_io_until_its_deadline_then_hands_it_to_the_backend() {
        let dev = RamDev::new(512, 1 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let fault = dev.fault().unwrap();
        submit_one(&mut ch, IoOp::Write { fua: false }, 0, 0x66);
        assert_eq!(poll_all(&mut ch).len(), 1);
        assert_eq!(ch.next_deadline(), None);

        let delay = Duration::from_millis(30);
        fault.set_delay_us(delay.as_micros() as u64);
        assert_eq!(fault.get(), Fault::None, "a delay is no fault");
        let t0 = Instant::now();
        submit_one(&mut ch, IoOp::Read, 0, 0);
        let due = ch.next_deadline().expect("a deadline while I/O is delayed");
        assert!(due >= t0 + delay, "the deadline is the delay away");
        assert!(ch.busy(), "delayed I/O keeps the channel busy");
        let c = poll_until(&mut ch, 1, Duration::from_secs(30));
        // Whatever the machine's load, it never completes before its deadline.
        assert!(t0.elapsed() >= delay);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].result, Ok(()));
        let mut back = vec![0u8; 4096];
        c[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back.iter().all(|&x| x == 0x66), "the backend read it");
        assert!(!ch.busy());
        assert_eq!(ch.next_deadline(), None);

        // A delay over a fault: the I/O meets the fault when it comes due.
        fault.set(Fault::EioRead);
        let t0 = Instant::now();
        submit_one(&mut ch, IoOp::Read, 4096, 0);
        let c = poll_until(&mut ch, 1, Duration::from_secs(30));
        assert!(t0.elapsed() >= delay);
        assert_eq!(c[0].result, Err(BdevError::Io(4096)));
        fault.set(Fault::None);
        fault.set_delay_us(0);
        // Off: straight through again.
        submit_one(&mut ch, IoOp::Read, 0, 0);
        assert_eq!(poll_all(&mut ch).len(), 1);
    }

    #[test]
    fn a_delay_every_n_holds_one_io_in_n_and_cancel_or_clearing_ends_it() {
        let dev = RamDev::new(512, 1 << 20).unwrap();
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let fault = dev.fault().unwrap();
        assert_eq!((fault.delay_us(), fault.delay_every()), (0, 1));
        // Long enough that nothing held comes due during the test.
        fault.set_delay_us(MAX_FAULT_DELAY_US);
        fault.set_delay_every(3);
        for tag in 1..=7 {
            ch.submit(BdevIo {
                tag,
                ..io(IoOp::Read, 0, 4096, DataBuf::alloc(4096).unwrap())
            });
        }
        let mut tags: Vec<u64> = poll_all(&mut ch).iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, [1, 2, 4, 5, 7], "the 3rd and the 6th are held");
        assert!(ch.busy());
        // ABORT TASK of a delayed I/O: it ends at once, cancelled, as under a stall.
        ch.cancel(3);
        let c = poll_all(&mut ch);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].tag, c[0].result), (3, Err(BdevError::Cancelled)));
        assert!(c[0].buf.is_some(), "the buffer comes back");
        assert!(ch.busy(), "the 6th is still held");
        // Clearing the delay hands the rest on at the next poll.
        fault.set_delay_us(0);
        let c = poll_all(&mut ch);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].tag, c[0].result), (6, Ok(())));
        assert!(!ch.busy());
        assert_eq!(ch.next_deadline(), None);
        // Every: 0 counts as 1, and the limit holds.
        fault.set_delay_every(0);
        assert_eq!(fault.delay_every(), 1);
        fault.set_delay_us(u64::MAX);
        assert_eq!(fault.delay_us(), MAX_FAULT_DELAY_US);
        // The fault and the delay are set independently.
        fault.set(Fault::Stall);
        assert_eq!(fault.delay_us(), MAX_FAULT_DELAY_US);
        fault.set_delay_us(0);
        assert_eq!(fault.get(), Fault::Stall);
        fault.set(Fault::None);
    }

    #[test]
    fn null_reads_zeros() {
        let dev = NullDev::new(512, 1000);
        let mut ch = dev.open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(4096).unwrap();
        b.fill(0, 4096, 0xff);
        ch.submit(io(IoOp::Read, 0, 4096, b));
        let mut out = Vec::new();
        ch.poll(&mut out);
        let mut back = vec![1u8; 4096];
        out[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back.iter().all(|&x| x == 0));
    }
}

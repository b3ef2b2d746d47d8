//! An NVMe namespace as a [`BlockDev`]: the controller, shared by the reactors for admin
//! work, and one I/O queue pair per reactor's channel.
//!
//! A channel's queue comes from the controller when the channel opens and goes back to the
//! device when it closes, once every command on it has completed (the controller may write
//! into the buffers of outstanding reads until then); a later channel reuses it. When the
//! device itself goes, its queues are deleted and the controller is shut down and disabled,
//! so the kernel's driver can take it back.
//!
//! # Timeouts and resets
//! Every queue pair sits in a [`QueueCell`] that the device keeps too. A watchdog thread
//! ([`NvmeDev::watch`]) looks at them every [`WATCH_EVERY`]: a command outstanding longer
//! than the command timeout gets an ABORT, and one that outlives its ABORT (or an ABORT that
//! fails) resets the controller ([`NvmeDev::reset_controller`], also the device's `reset`
//! attribute). A reset takes every queue's lock, disables the controller, ends every
//! outstanding command with an "aborted" status left in its queue's cell, enables the
//! controller and creates the queues again on the same memory. The channels, which only
//! ever try their queue's lock, find those commands at their next poll and send their I/O
//! again (see [`super::channel`]): nothing a reactor waits on, and no I/O lost.
//!
//! The watchdog sends ABORTs while holding the device's lock; a reactor opening a channel
//! then waits for it (an admin command, bounded by the admin timeout).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::channel::{queue_cell, take, NvmeChannel, QueueCell};
use super::controller::{
    aborted_by_reset, Clock, Config, Controller, ControllerError, Stats, SystemClock, TimeoutAction,
};
use super::spec::{oncs, IdentifyController, IdentifyNamespace};
use super::vfio::{Bar0, VfioAlloc, VfioDevice, VfioError};
use super::{DmaAlloc, Regs};
use crate::bdev::{
    BdevCompletion, BdevError, BdevIo, BlockDev, FaultInject, Faulty, IoChannel, IoContext,
};

/// How long a closing channel waits for the controller to finish its commands.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// How often the watchdog looks for timed-out commands.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum OpenError {
    /// {0}
    Check(String),
    /// {0}
    Vfio(#[from] VfioError),
    /// {0}
    Controller(#[from] ControllerError),
}

/// A controller's counters, for the management tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControllerInfo {
    /// I/O queue pairs the controller granted.
    pub queue_pairs: u16,
    /// Of those, the ones created (one per reactor that has opened a channel).
    pub queues_in_use: usize,
    /// Block I/Os submitted and not yet completed.
    pub outstanding: u64,
    pub timeouts: u64,
    pub aborts: u64,
    pub resets: u64,
}

/// A queue pair the device created, and whether a channel uses it.
struct QueueEntry<M> {
    cell: Arc<QueueCell<M>>,
    in_use: bool,
}

/// The parts of the device behind its lock.
struct State<R: Regs, A: DmaAlloc> {
    ctrl: Option<Controller<R, A>>,
    /// Every queue pair created, in use by a channel or idle for the next one.
    queues: Vec<QueueEntry<A::Mem>>,
}

pub struct NvmeDev<R: Regs, A: DmaAlloc> {
    state: Mutex<State<R, A>>,
    regs: R,
    dstrd: u8,
    nsid: u32,
    ns: IdentifyNamespace,
    ident: IdentifyController,
    /// I/Os submitted to the channels and not yet completed.
    outstanding: AtomicU64,
    vwc: bool,
    dsm: bool,
    /// The controller has WRITE ZEROES (ONCS).
    write_zeroes: bool,
    max_transfer: usize,
    fault: Arc<FaultInject>,
    /// Dropped with the device: the watchdog thread sees its channel close and ends.
    watchdog: Mutex<Option<Sender<()>>>,
}

impl<R: Regs + Clone, A: DmaAlloc> NvmeDev<R, A> {
    /// The device for namespace `nsid` of a controller already brought up. When the
    /// namespace does not exist (or is not active: no blocks), the controller is shut down
    /// before the error returns, so that it is handed back as it came.
    pub fn new(
        mut ctrl: Controller<R, A>,
        nsid: u32,
        clock: &dyn Clock,
    ) -> Result<NvmeDev<R, A>, ControllerError> {
        let ns = match ctrl.identify_namespace(nsid, clock) {
            Ok(ns) if ns.nsze == 0 => Err(ControllerError::InactiveNamespace(nsid)),
            r => r,
        };
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                let mut out = Vec::new();
                if let Err(s) = ctrl.shutdown(Vec::new(), clock, &mut out) {
                    warn!("nvme: controller shutdown: {s}");
                }
                return Err(e);
            }
        };
        Ok(NvmeDev {
            ident: ctrl.identify().clone(),
            outstanding: AtomicU64::new(0),
            regs: ctrl.regs().clone(),
            dstrd: ctrl.cap().dstrd(),
            vwc: ctrl.identify().vwc,
            dsm: ctrl.identify().supports(oncs::DSM),
            write_zeroes: ctrl.identify().supports(oncs::WRITE_ZEROES),
            max_transfer: ctrl.max_transfer(),
            nsid,
            ns,
            state: Mutex::new(State {
                ctrl: Some(ctrl),
                queues: Vec::new(),
            }),
            fault: Arc::new(FaultInject::default()),
            watchdog: Mutex::new(None),
        })
    }

    pub fn namespace(&self) -> &IdentifyNamespace {
        &self.ns
    }

    /// With `nv_cache`, the controller's volatile write cache is treated as non-volatile:
    /// the device reports no write cache.
    pub fn with_nv_cache(mut self, nv_cache: bool) -> Self {
        if nv_cache {
            self.vwc = false;
        }
        self
    }

    /// The controller's IDENTIFY data (model, serial, firmware).
    pub fn controller(&self) -> &IdentifyController {
        &self.ident
    }

    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// The controller's counters as the management tree shows them.
    pub fn info(&self) -> ControllerInfo {
        let st = self.state();
        let (queue_pairs, stats) = st
            .ctrl
            .as_ref()
            .map_or((0, Stats::default()), |c| (c.queues_granted(), c.stats()));
        ControllerInfo {
            queue_pairs,
            queues_in_use: st.ctrl.as_ref().map_or(0, |c| c.queues_in_use()),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            timeouts: stats.timeouts,
            aborts: stats.aborts,
            resets: stats.resets,
        }
    }

    fn state(&self) -> MutexGuard<'_, State<R, A>> {
        // Every update under the lock leaves the state whole: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends an ABORT for each command of an open channel outstanding longer than the
    /// command timeout, and resets the controller when one outlived its ABORT or an ABORT
    /// failed. The watchdog's work, every [`WATCH_EVERY`].
    pub fn check_timeouts(&self, clock: &dyn Clock) {
        let mut st = self.state();
        let st = &mut *st;
        let Some(ctrl) = st.ctrl.as_mut() else {
            return;
        };
        let mut reset = false;
        'queues: for e in st.queues.iter().filter(|e| e.in_use) {
            let mut g = take(&e.cell);
            // One ABORT per expired command; each call marks the one it aborted.
            for _ in 0..=g.q.qp.capacity() {
                match ctrl.check_timeouts(&mut g.q, clock) {
                    TimeoutAction::None => break,
                    TimeoutAction::Aborted(cid) => {
                        warn!(
                            "nvme: queue {}: command {cid} timed out; aborted",
                            g.q.qid()
                        );
                    }
                    TimeoutAction::Reset => {
                        reset = true;
                        break 'queues;
                    }
                }
            }
        }
        if reset {
            warn!("nvme: a command outlived its ABORT: resetting the controller");
            if let Err(e) = reset_locked(st, clock) {
                error!("nvme: controller reset failed: {e}");
            }
        }
    }

    /// Resets the controller under every reactor's queue (see the module documentation).
    /// The commands it ends go out again from their channels.
    pub fn reset_controller(&self, clock: &dyn Clock) -> Result<(), ControllerError> {
        let mut st = self.state();
        reset_locked(&mut st, clock)
    }
}

fn reset_locked<R: Regs, A: DmaAlloc>(
    st: &mut State<R, A>,
    clock: &dyn Clock,
) -> Result<(), ControllerError> {
    let Some(ctrl) = st.ctrl.as_mut() else {
        return Err(ControllerError::Gone);
    };
    let mut guards: Vec<_> = st.queues.iter().map(|e| take(&e.cell)).collect();
    ctrl.reset_begin(clock)?;
    // Disabled: the controller writes nothing more into the queues.
    let mut ended = 0;
    for g in guards.iter_mut() {
        let slot = &mut **g;
        ended += slot.q.qp.drain(aborted_by_reset(), &mut slot.reset_done);
    }
    let r = ctrl.reset_finish(clock);
    drop(guards);
    match &r {
        Ok(()) => info!("nvme: controller reset; {ended} commands go out again"),
        Err(e) => error!("nvme: the controller did not come back from its reset: {e}"),
    }
    r
}

impl<R, A> NvmeDev<R, A>
where
    R: Regs + Clone + Send + Sync + 'static,
    A: DmaAlloc + Send + 'static,
    A::Mem: Send + 'static,
{
    /// Starts the device's watchdog thread, which ends when the device goes.
    pub fn watch(self: &Arc<Self>) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<()>();
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(format!("nvme-watch-{}", self.nsid))
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(WATCH_EVERY) {
                    let Some(dev) = weak.upgrade() else {
                        break;
                    };
                    dev.check_timeouts(&SystemClock);
                }
            })?;
        *self.watchdog.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(())
    }
}

impl NvmeDev<Arc<Bar0>, VfioAlloc> {
    /// Opens PCI device `bdf` (bound to vfio-pci), maps the buffer pool for it, brings the
    /// controller up with `queues` I/O queue pairs (one per reactor) and serves namespace
    /// `nsid`.
    pub fn open_vfio(bdf: &str, nsid: u32, queues: u16) -> Result<Self, OpenError> {
        super::pci::check_nvme_vfio(bdf).map_err(OpenError::Check)?;
        let dev = Arc::new(VfioDevice::open(bdf)?);
        dev.map_region(crate::env::pool().region())?;
        let cfg = Config {
            io_queues: queues,
            ..Config::default()
        };
        let ctrl = Controller::new(dev.bar0(), VfioAlloc::new(dev.clone()), cfg, &SystemClock)?;
        Ok(NvmeDev::new(ctrl, nsid, &SystemClock)?)
    }
}

impl<R: Regs, A: DmaAlloc> Drop for NvmeDev<R, A> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // A queue still held elsewhere (a channel that never got its commands back) is left
        // alone: the controller's shutdown deletes it anyway.
        let queues = std::mem::take(&mut st.queues)
            .into_iter()
            .filter_map(|e| Arc::try_unwrap(e.cell).ok())
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()).q)
            .collect();
        if let Some(ctrl) = st.ctrl.take() {
            let mut out = Vec::new();
            match ctrl.shutdown(queues, &SystemClock, &mut out) {
                Ok(()) => info!("nvme: namespace {}: controller shut down", self.nsid),
                Err(e) => warn!("nvme: controller shutdown: {e}"),
            }
        }
    }
}

impl<R, A> BlockDev for NvmeDev<R, A>
where
    R: Regs + Clone + Send + Sync + 'static,
    A: DmaAlloc + Send + 'static,
    A::Mem: Send + 'static,
{
    fn block_size(&self) -> u32 {
        self.ns.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.ns.nsze
    }

    fn has_volatile_cache(&self) -> bool {
        self.vwc
    }

    /// UNMAP promises zeros afterwards: only where deallocated blocks read as zeros.
    fn supports_unmap(&self) -> bool {
        self.dsm && self.ns.deallocated_reads_zeros()
    }

    fn supports_write_zeroes(&self) -> bool {
        self.write_zeroes
    }

    fn open_channel(self: Arc<Self>, _cx: &IoContext) -> Box<dyn IoChannel> {
        let fault = self.fault.clone();
        let q = {
            let mut st = self.state();
            let st = &mut *st;
            match st.queues.iter_mut().find(|e| !e.in_use) {
                Some(e) => {
                    e.in_use = true;
                    Ok(e.cell.clone())
                }
                None => match st.ctrl.as_mut() {
                    Some(c) => c
                        .create_io_queue(self.nsid, self.ns.block_size, &SystemClock)
                        .map(|q| {
                            let cell = queue_cell(q);
                            st.queues.push(QueueEntry {
                                cell: cell.clone(),
                                in_use: true,
                            });
                            cell
                        }),
                    None => Err(ControllerError::Gone),
                },
            }
        };
        match q {
            Ok(cell) => {
                let ch = NvmeChannel::with_cell(
                    self.regs.clone(),
                    self.dstrd,
                    cell,
                    self.ns.block_size,
                    self.max_transfer,
                );
                Box::new(Faulty::new(
                    DevChannel {
                        ch: Some(ch),
                        dev: self,
                    },
                    fault,
                ))
            }
            Err(e) => {
                error!("nvme: no I/O queue for a reactor ({e}): its I/O fails");
                Box::new(Faulty::new(Offline::default(), fault))
            }
        }
    }

    fn fault(&self) -> Option<&FaultInject> {
        Some(&self.fault)
    }
}

/// A channel that gives its queue back to the device when it closes.
struct DevChannel<R, A>
where
    R: Regs + Clone + Send + Sync + 'static,
    A: DmaAlloc + Send + 'static,
    A::Mem: Send + 'static,
{
    /// Always `Some` until the channel drops.
    ch: Option<NvmeChannel<R, A::Mem>>,
    dev: Arc<NvmeDev<R, A>>,
}

impl<R, A> IoChannel for DevChannel<R, A>
where
    R: Regs + Clone + Send + Sync + 'static,
    A: DmaAlloc + Send + 'static,
    A::Mem: Send + 'static,
{
    fn submit(&mut self, io: BdevIo) {
        match self.ch.as_mut() {
            Some(ch) => {
                self.dev.outstanding.fetch_add(1, Ordering::Relaxed);
                ch.submit(io)
            }
            None => drop(io),
        }
    }
    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let n = self.ch.as_mut().map_or(0, |ch| ch.poll(out));
        if n > 0 {
            self.dev.outstanding.fetch_sub(n as u64, Ordering::Relaxed);
        }
        n
    }
    fn busy(&self) -> bool {
        self.ch.as_ref().is_some_and(|ch| ch.busy())
    }
    fn cancel(&mut self, tag: u64) {
        if let Some(ch) = self.ch.as_mut() {
            ch.cancel(tag);
        }
    }
}

impl<R, A> Drop for DevChannel<R, A>
where
    R: Regs + Clone + Send + Sync + 'static,
    A: DmaAlloc + Send + 'static,
    A::Mem: Send + 'static,
{
    fn drop(&mut self) {
        let Some(mut ch) = self.ch.take() else {
            return;
        };
        let give_up = Instant::now() + CLOSE_WAIT;
        let mut out = Vec::new();
        while ch.busy() && Instant::now() < give_up {
            ch.poll(&mut out);
            out.clear();
            std::thread::sleep(Duration::from_micros(100));
        }
        if ch.busy() {
            // The controller may still write into these buffers and this queue: never
            // hand them back for reuse.
            error!("nvme: a closing channel's commands never completed; leaking its buffers");
            std::mem::forget(ch);
            return;
        }
        let cell = ch.into_cell();
        let mut st = self.dev.state();
        if let Some(e) = st.queues.iter_mut().find(|e| Arc::ptr_eq(&e.cell, &cell)) {
            e.in_use = false;
        }
    }
}

/// The channel of a reactor that got no queue: every I/O fails as the device being offline.
#[derive(Default)]
struct Offline {
    done: Vec<BdevCompletion>,
}

impl IoChannel for Offline {
    fn submit(&mut self, io: BdevIo) {
        self.done.push(BdevCompletion {
            tag: io.tag,
            result: Err(BdevError::Offline),
            buf: io.buf,
        });
    }
    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }
    fn busy(&self) -> bool {
        !self.done.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::nvme::model::{FakeClock, Model, ModelRegs, SimAlloc, SimMem};
    use crate::bdev::nvme::spec::{admin, cc, nvm};
    use crate::bdev::IoOp;
    use crate::env::{DataBuf, Pool};

    #[test]
    fn a_namespace_serves_as_a_block_device_and_hands_the_controller_back() {
        let pool = Pool::with_counts(4, 4, false).unwrap();
        let mem = SimMem::new(16 << 20);
        mem.map_window(pool);
        let regs = Model::start(&mem, 64, 4096, 1024);
        let clock = FakeClock::new();
        let ctrl =
            Controller::new(regs.clone(), SimAlloc::new(&mem), Config::default(), &clock).unwrap();
        let dev = Arc::new(NvmeDev::new(ctrl, 1, &clock).unwrap());
        assert_eq!((dev.block_size(), dev.num_blocks()), (4096, 1024));
        assert!(dev.has_volatile_cache());
        assert!(
            dev.supports_unmap(),
            "DSM, and deallocated blocks read as zeros"
        );
        assert!(dev.fault().is_some());

        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let mut b = DataBuf::alloc_from(pool, 8192).unwrap();
        b.fill(0, 8192, 0x3c);
        ch.submit(BdevIo {
            tag: 1,
            op: IoOp::Write { fua: true },
            offset: 4096,
            len: 8192,
            buf: Some(b),
            ranges: Vec::new(),
        });
        let mut out = Vec::new();
        while out.is_empty() {
            ch.poll(&mut out);
        }
        assert_eq!((out[0].tag, out[0].result), (1, Ok(())));
        assert!(regs.0.borrow().data[4096..12288].iter().all(|&x| x == 0x3c));
        assert_eq!(regs.0.borrow().io_queues(), 1);

        // A closed channel's queue serves the next one: no new queue on the controller.
        drop(ch);
        let ch = dev.clone().open_channel(&cx);
        assert_eq!(regs.0.borrow().io_queues(), 1);
        assert_eq!(regs.0.borrow().count(false, admin::CREATE_IO_SQ), 1);
        drop(ch);
        // The last reference: queues deleted, controller shut down and disabled.
        drop(dev);
        let m = regs.0.borrow();
        assert_eq!(m.io_queues(), 0);
        assert_eq!(m.count(false, admin::DELETE_IO_SQ), 1);
        assert_eq!(m.shutdowns, 1, "a normal shutdown first");
        assert_eq!(m.cc() & cc::EN, 0);
    }

    #[test]
    fn a_namespace_that_does_not_exist_hands_the_controller_back() {
        let mem = SimMem::new(16 << 20);
        let regs = Model::start(&mem, 64, 4096, 1024);
        let clock = FakeClock::new();
        let ctrl =
            Controller::new(regs.clone(), SimAlloc::new(&mem), Config::default(), &clock).unwrap();
        let e = NvmeDev::new(ctrl, 7, &clock).err().unwrap();
        assert!(matches!(e, ControllerError::NoNamespace(7, _)), "{e}");
        let m = regs.0.borrow();
        assert_eq!(m.shutdowns, 1, "shut down before the error returns");
        assert_eq!(m.cc() & cc::EN, 0);
    }

    #[test]
    fn the_tree_sees_the_controller_and_its_outstanding_io() {
        let pool = Pool::with_counts(4, 4, false).unwrap();
        let mem = SimMem::new(16 << 20);
        mem.map_window(pool);
        let regs = Model::start(&mem, 64, 4096, 1024);
        let clock = FakeClock::new();
        let ctrl =
            Controller::new(regs.clone(), SimAlloc::new(&mem), Config::default(), &clock).unwrap();
        let dev = Arc::new(NvmeDev::new(ctrl, 1, &clock).unwrap().with_nv_cache(true));
        assert!(
            !dev.has_volatile_cache(),
            "nv_cache: no volatile cache reported"
        );
        assert_eq!(dev.nsid(), 1);
        assert!(!dev.controller().model.is_empty());
        let i = dev.info();
        assert_eq!((i.queue_pairs, i.queues_in_use, i.outstanding), (1, 0, 0));
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        ch.submit(BdevIo {
            tag: 1,
            op: IoOp::Read,
            offset: 0,
            len: 4096,
            buf: Some(DataBuf::alloc_from(pool, 4096).unwrap()),
            ranges: Vec::new(),
        });
        assert_eq!(dev.info().outstanding, 1);
        assert_eq!(dev.info().queues_in_use, 1);
        let mut out = Vec::new();
        while out.is_empty() {
            ch.poll(&mut out);
        }
        assert_eq!(dev.info().outstanding, 0);
    }

    /// A device on a model controller and a pool the model reaches.
    fn bed() -> (
        ModelRegs,
        &'static Pool,
        FakeClock,
        Arc<NvmeDev<ModelRegs, SimAlloc>>,
    ) {
        let pool = Pool::with_counts(8, 8, false).unwrap();
        let mem = SimMem::new(16 << 20);
        mem.map_window(pool);
        let regs = Model::start(&mem, 64, 4096, 1024);
        let clock = FakeClock::new();
        let cfg = Config {
            io_queues: 2,
            ..Config::default()
        };
        let ctrl = Controller::new(regs.clone(), SimAlloc::new(&mem), cfg, &clock).unwrap();
        let dev = Arc::new(NvmeDev::new(ctrl, 1, &clock).unwrap());
        (regs, pool, clock, dev)
    }

    fn write(pool: &'static Pool, tag: u64, offset: u64, byte: u8) -> BdevIo {
        let mut b = DataBuf::alloc_from(pool, 8192).unwrap();
        b.fill(0, 8192, byte);
        BdevIo {
            tag,
            op: IoOp::Write { fua: false },
            offset,
            len: 8192,
            buf: Some(b),
            ranges: Vec::new(),
        }
    }

    fn drive(ch: &mut Box<dyn IoChannel>) -> Vec<BdevCompletion> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            if ch.poll(&mut out) > 0 && !ch.busy() {
                break;
            }
        }
        assert!(!ch.busy(), "every I/O completes");
        out
    }

    #[test]
    fn a_reset_sends_every_reactors_outstanding_io_again_and_loses_none() {
        let (regs, pool, clock, dev) = bed();
        let (cx1, cx2) = (IoContext::new(), IoContext::new());
        let mut a = dev.clone().open_channel(&cx1);
        let mut b = dev.clone().open_channel(&cx2);
        assert_eq!(regs.0.borrow().io_queues(), 2, "a queue pair per channel");
        // Each channel has a write the controller took and never answers.
        regs.0.borrow_mut().faults.swallow_next = Some(nvm::WRITE);
        a.submit(write(pool, 1, 0, 0xa1));
        regs.0.borrow_mut().faults.swallow_next = Some(nvm::WRITE);
        b.submit(write(pool, 2, 16384, 0xb2));
        let mut out = Vec::new();
        a.poll(&mut out);
        b.poll(&mut out);
        assert!(out.is_empty() && a.busy() && b.busy());
        assert_eq!(regs.0.borrow().swallowed.len(), 2);
        assert!(regs.0.borrow().data[..8192].iter().all(|&x| x == 0));

        dev.reset_controller(&clock).unwrap();
        {
            let m = regs.0.borrow();
            assert_eq!(m.disables, 1, "the reset disabled the controller");
            assert_eq!(m.io_queues(), 2, "both queue pairs created again");
            assert_eq!(m.count(false, admin::CREATE_IO_SQ), 4);
        }
        assert_eq!(dev.info().resets, 1);
        // Each channel sends its write again at its next poll; both land.
        let ca = drive(&mut a);
        let cb = drive(&mut b);
        assert_eq!((ca.len(), ca[0].tag, ca[0].result), (1, 1, Ok(())));
        assert_eq!((cb.len(), cb[0].tag, cb[0].result), (1, 2, Ok(())));
        {
            let m = regs.0.borrow();
            assert!(m.data[..8192].iter().all(|&x| x == 0xa1));
            assert!(m.data[16384..16384 + 8192].iter().all(|&x| x == 0xb2));
        }
        // The queues go on from their new start: more I/O, across the queues' wrap.
        for i in 0..100u64 {
            a.submit(write(pool, 10 + i, 32768, i as u8));
            let c = drive(&mut a);
            assert_eq!(c[0].result, Ok(()));
        }
        assert!(regs.0.borrow().data[32768..32768 + 8192]
            .iter()
            .all(|&x| x == 99));
        assert_eq!(dev.info().outstanding, 0);
    }

    #[test]
    fn a_timed_out_command_is_aborted_then_reset_and_its_io_still_completes() {
        let (regs, pool, clock, dev) = bed();
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let to = Config::default().command_timeout;
        // Aborted: the controller ends the command with ABORT REQUESTED; the write goes out
        // again and lands.
        regs.0.borrow_mut().faults.swallow_next = Some(nvm::WRITE);
        ch.submit(write(pool, 1, 0, 0x11));
        let mut out = Vec::new();
        ch.poll(&mut out);
        dev.check_timeouts(&clock);
        assert_eq!(dev.info().timeouts, 0, "not yet");
        clock.advance(to + Duration::from_secs(1));
        dev.check_timeouts(&clock);
        assert_eq!((dev.info().timeouts, dev.info().aborts), (1, 1));
        let c = drive(&mut ch);
        assert_eq!((c[0].tag, c[0].result), (1, Ok(())));
        assert!(regs.0.borrow().data[..8192].iter().all(|&x| x == 0x11));
        assert_eq!(dev.info().resets, 0);

        // The ABORT is ignored: one timeout later the controller is reset, and the write
        // still lands.
        regs.0.borrow_mut().faults.ignore_abort = true;
        regs.0.borrow_mut().faults.swallow_next = Some(nvm::WRITE);
        ch.submit(write(pool, 2, 8192, 0x22));
        ch.poll(&mut out);
        assert!(out.is_empty());
        clock.advance(to + Duration::from_secs(1));
        dev.check_timeouts(&clock);
        assert_eq!(dev.info().timeouts, 2);
        ch.poll(&mut out);
        assert!(
            out.is_empty(),
            "an ignored ABORT leaves the command outstanding"
        );
        clock.advance(to + Duration::from_secs(1));
        dev.check_timeouts(&clock);
        assert_eq!(dev.info().resets, 1);
        let c = drive(&mut ch);
        assert_eq!((c[0].tag, c[0].result), (2, Ok(())));
        assert!(regs.0.borrow().data[8192..16384].iter().all(|&x| x == 0x22));
    }

    #[test]
    fn an_io_that_every_try_loses_fails_as_cancelled() {
        let (regs, pool, clock, dev) = bed();
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let mut out = Vec::new();
        for _ in 0..crate::bdev::nvme::channel::MAX_TRIES {
            regs.0.borrow_mut().faults.swallow_next = Some(nvm::WRITE);
            if out.is_empty() && !ch.busy() {
                ch.submit(write(pool, 7, 0, 0x77));
            }
            ch.poll(&mut out);
            assert!(out.is_empty());
            dev.reset_controller(&clock).unwrap();
        }
        let c = drive(&mut ch);
        assert_eq!((c[0].tag, c[0].result), (7, Err(BdevError::Cancelled)));
        assert_eq!(
            dev.info().resets,
            u64::from(crate::bdev::nvme::channel::MAX_TRIES)
        );
        assert!(regs.0.borrow().data[..8192].iter().all(|&x| x == 0));
    }
}

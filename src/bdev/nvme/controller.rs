//! Controller bring-up, administration and recovery (NVMe Base §3.5 and §3.7).
//!
//! # Bring-up (§3.5.1)
//! Disable (CC.EN = 0, then wait for CSTS.RDY = 0 for at most CAP.TO); program the admin
//! queue (AQA, ASQ, ACQ); enable with 64-byte submission and 16-byte completion entries,
//! 4 KiB pages and the NVM command set; wait for CSTS.RDY = 1; IDENTIFY the controller;
//! SET FEATURES Number of Queues for one queue pair per reactor. Each reactor's queue pair
//! is then created ([`Controller::create_io_queue`]: CREATE I/O CQ, then CREATE I/O SQ) with
//! as many entries as CAP.MQES allows, up to what was asked.
//!
//! Admin commands are rare (bring-up, queue creation, ABORT) and run to completion here:
//! submitted, then polled until they complete or `admin_timeout` passes.
//!
//! # Timeouts and recovery
//! A command outstanding longer than `command_timeout` gets an ABORT. If it is still
//! outstanding `command_timeout` after that (the controller could not abort it, or ignored
//! the ABORT), or an admin command gets no answer, the controller is reset
//! ([`Controller::reset`]): disabled, which makes it forget every queue and command, then
//! brought up again with the same queue memory. The commands it forgot end with status
//! "aborted due to SQ deletion", which says they may be retried.
//!
//! # Shutdown (§3.6.1)
//! Delete the I/O queues, set CC.SHN to normal, wait for CSTS.SHST to say complete, then
//! disable: the controller is left as a kernel driver expects to find it.
//!
//! Time comes from a [`Clock`], so tests run the waits on a clock of their own.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::prp::{Piece, PrpArea, PrpError};
use super::queue::{Done, QueueError, QueuePair, RegDoorbells};
use super::spec::{
    self, cc, csts, reg, sc, sct, Cap, IdentifyController, IdentifyError, IdentifyNamespace,
    SqEntry, Status, CQE_SHIFT, CQE_SIZE, DSM_MAX_RANGES, DSM_RANGE_SIZE, IDENTIFY_SIZE, SQE_SHIFT,
    SQE_SIZE,
};
use super::{DmaAlloc, DmaMem, Regs};

/// The memory page size the driver selects (CC.MPS = 0): pool buffers are 4096-aligned.
pub const PAGE_SIZE: usize = 4096;

/// Where waits get the time.
pub trait Clock {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration);
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Admin queue entries (at most 4096, §3.1.3.8).
    pub admin_entries: u16,
    /// I/O queue entries wanted per queue pair (capped by CAP.MQES).
    pub io_entries: u16,
    /// I/O queue pairs wanted (one per reactor).
    pub io_queues: u16,
    /// PRP list pages set aside per command: 5 describe an 8 MiB transfer at any offset.
    pub prp_pages_per_cmd: usize,
    pub command_timeout: Duration,
    pub admin_timeout: Duration,
    /// How long a bring-up wait sleeps between register reads.
    pub poll_interval: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            admin_entries: 32,
            io_entries: 256,
            io_queues: 1,
            prp_pages_per_cmd: 5,
            command_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(1),
        }
    }
}

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ControllerError {
    /// the controller reports a fatal status (CSTS.CFS)
    Fatal,
    /// the controller does not answer (its registers read as all ones)
    Gone,
    /// CSTS.RDY did not become {0} within CAP.TO ({1} ms)
    ReadyTimeout(bool, u64),
    /// shutdown did not complete within CAP.TO ({0} ms)
    ShutdownTimeout(u64),
    /// the controller does not support the NVM command set
    NoNvmCommandSet,
    /// the controller's smallest memory page is {0} bytes, not 4096
    PageSize(u64),
    /// admin command {0:#04x} failed with status type {1}, code {2:#04x}
    Admin(u8, u8, u8),
    /// admin command {0:#04x} got no answer in time
    AdminTimeout(u8),
    /// admin queue: {0}
    AdminQueue(QueueError),
    /// cannot allocate DMA memory: {0}
    Alloc(std::io::Error),
    /// bad IDENTIFY data: {0}
    Identify(IdentifyError),
    /// namespace {0} does not exist (the controller has {1})
    NoNamespace(u32, u32),
    /// namespace {0} is not active (it has no blocks)
    InactiveNamespace(u32),
    /// the controller granted no I/O queues
    NoQueues,
    /// every one of the {0} I/O queues the controller granted is in use
    QueuesExhausted(u16),
}

pub type Result<T> = std::result::Result<T, ControllerError>;

impl From<std::io::Error> for ControllerError {
    fn from(e: std::io::Error) -> Self {
        ControllerError::Alloc(e)
    }
}

/// Why an I/O could not be submitted. The caller still owns the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum SubmitError {
    /// {0}
    Queue(QueueError),
    /// {0}
    Prp(PrpError),
    /// the data is {0} bytes, the command moves {1}
    Length(u64, u64),
    /// {0} blocks is outside 1..=65536 for one command
    Blocks(u32),
    /// {0} deallocate ranges is outside 1..=256
    Ranges(usize),
}

impl From<QueueError> for SubmitError {
    fn from(e: QueueError) -> Self {
        SubmitError::Queue(e)
    }
}

impl From<PrpError> for SubmitError {
    fn from(e: PrpError) -> Self {
        SubmitError::Prp(e)
    }
}

/// What [`Controller::check_timeouts`] did about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutAction {
    /// Nothing has timed out.
    None,
    /// Command `cid` timed out and an ABORT went out for it.
    Aborted(u16),
    /// A command outlived its ABORT, or the ABORT failed: the controller needs a reset.
    Reset,
}

/// Counters shown in the management tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub timeouts: u64,
    pub aborts: u64,
    pub resets: u64,
}

/// One NVM command for an I/O queue. Block counts are counts (not 0's based); data pieces
/// must add up to exactly the blocks' bytes.
#[derive(Debug, Clone, Copy)]
pub enum IoCmd<'a> {
    Read {
        slba: u64,
        nlb: u32,
        data: &'a [Piece],
    },
    Write {
        slba: u64,
        nlb: u32,
        fua: bool,
        data: &'a [Piece],
    },
    Compare {
        slba: u64,
        nlb: u32,
        data: &'a [Piece],
    },
    Flush,
    WriteZeroes {
        slba: u64,
        nlb: u32,
        deallocate: bool,
    },
    /// DATASET MANAGEMENT, Deallocate: (slba, nlb) ranges.
    Deallocate {
        ranges: &'a [(u64, u32)],
    },
}

/// An I/O queue pair for one reactor, with its PRP list pages.
pub struct IoQueue<M> {
    pub qp: QueuePair<M>,
    prp: PrpArea<M>,
    nsid: u32,
    block_size: u32,
}

/// The largest block count of one command (a 16-bit 0's based field).
const MAX_NLB: u32 = 1 << 16;

impl<M: DmaMem> IoQueue<M> {
    pub fn qid(&self) -> u16 {
        self.qp.qid()
    }

    /// Queues `cmd` under a new command identifier, returned; the controller hears of it
    /// at the next [`flush`](IoQueue::flush).
    pub fn submit(
        &mut self,
        cmd: &IoCmd<'_>,
        tag: u64,
        now: Instant,
    ) -> std::result::Result<u16, SubmitError> {
        let cid = self.qp.reserve_cid()?;
        match self.build(cid, cmd) {
            Ok(e) => {
                self.qp.submit_reserved(cid, e, tag, now)?;
                Ok(cid)
            }
            Err(err) => {
                self.qp.release_cid(cid);
                Err(err)
            }
        }
    }

    fn blocks(&self, nlb: u32) -> std::result::Result<u64, SubmitError> {
        if nlb == 0 || nlb > MAX_NLB {
            return Err(SubmitError::Blocks(nlb));
        }
        Ok(u64::from(nlb) * u64::from(self.block_size))
    }

    fn with_data(
        &self,
        cid: u16,
        mut e: SqEntry,
        nlb: u32,
        data: &[Piece],
    ) -> std::result::Result<SqEntry, SubmitError> {
        let want = self.blocks(nlb)?;
        let have: u64 = data.iter().map(|p| u64::from(p.len)).sum();
        // The controller moves exactly the blocks' bytes: a shorter buffer would be overrun.
        if have != want {
            return Err(SubmitError::Length(have, want));
        }
        let prps = self.prp.build(cid, data)?;
        e.set_prps(prps.prp1, prps.prp2);
        Ok(e)
    }

    fn build(&self, cid: u16, cmd: &IoCmd<'_>) -> std::result::Result<SqEntry, SubmitError> {
        let ns = self.nsid;
        match *cmd {
            IoCmd::Read { slba, nlb, data } => {
                let e = SqEntry::rw(spec::nvm::READ, ns, slba, nlb, false);
                self.with_data(cid, e, nlb, data)
            }
            IoCmd::Write {
                slba,
                nlb,
                fua,
                data,
            } => {
                let e = SqEntry::rw(spec::nvm::WRITE, ns, slba, nlb, fua);
                self.with_data(cid, e, nlb, data)
            }
            IoCmd::Compare { slba, nlb, data } => {
                let e = SqEntry::rw(spec::nvm::COMPARE, ns, slba, nlb, false);
                self.with_data(cid, e, nlb, data)
            }
            IoCmd::Flush => Ok(SqEntry::flush(ns)),
            IoCmd::WriteZeroes {
                slba,
                nlb,
                deallocate,
            } => {
                self.blocks(nlb)?;
                Ok(SqEntry::write_zeroes(ns, slba, nlb, deallocate))
            }
            IoCmd::Deallocate { ranges } => {
                if ranges.is_empty() || ranges.len() > DSM_MAX_RANGES {
                    return Err(SubmitError::Ranges(ranges.len()));
                }
                let mut page = [0u8; DSM_MAX_RANGES * DSM_RANGE_SIZE];
                for (d, &(slba, nlb)) in page.chunks_exact_mut(DSM_RANGE_SIZE).zip(ranges) {
                    d.copy_from_slice(&spec::dsm_range(slba, nlb));
                }
                let bytes = ranges.len() * DSM_RANGE_SIZE;
                let at = self
                    .prp
                    .write_page(cid, &page[..bytes])
                    .ok_or(SubmitError::Prp(PrpError::TooLong(1, 0)))?;
                let mut e = SqEntry::deallocate(ns, ranges.len() as u32);
                e.set_prps(at, 0);
                Ok(e)
            }
        }
    }
}

/// What is kept of each I/O queue to create it again after a reset.
#[derive(Debug, Clone, Copy)]
struct QueueRecord {
    qid: u16,
    entries: u16,
    sq: u64,
    cq: u64,
}

/// A controller brought up and ready for I/O queues.
pub struct Controller<R: Regs, A: DmaAlloc> {
    regs: R,
    alloc: A,
    cap: Cap,
    cfg: Config,
    admin: QueuePair<A::Mem>,
    /// A page for IDENTIFY data.
    scratch: A::Mem,
    identify: IdentifyController,
    /// I/O queue pairs the controller granted.
    granted: u16,
    queues: Vec<QueueRecord>,
    stats: Stats,
    /// Completions scratch for admin polling.
    done: Vec<Done>,
}

impl<R: Regs, A: DmaAlloc> Controller<R, A> {
    /// Brings the controller up (§3.5.1) as far as IDENTIFY and Number of Queues.
    pub fn new(regs: R, mut alloc: A, cfg: Config, clock: &dyn Clock) -> Result<Self> {
        let cap = Cap(regs.read64(reg::CAP));
        if cap.0 == u64::MAX {
            return Err(ControllerError::Gone);
        }
        if !cap.supports_nvm() {
            return Err(ControllerError::NoNvmCommandSet);
        }
        if cap.mpsmin() != 0 {
            return Err(ControllerError::PageSize(4096 << cap.mpsmin()));
        }
        let entries = cfg.admin_entries.clamp(2, 4096);
        let sq = alloc.alloc(usize::from(entries) * SQE_SIZE)?;
        let cq = alloc.alloc(usize::from(entries) * CQE_SIZE)?;
        let scratch = alloc.alloc(IDENTIFY_SIZE)?;
        let mut c = Controller {
            regs,
            alloc,
            cap,
            cfg,
            admin: QueuePair::new(0, sq, cq, entries),
            scratch,
            identify: IdentifyController::default(),
            granted: 0,
            queues: Vec::new(),
            stats: Stats::default(),
            done: Vec::new(),
        };
        c.disable(clock)?;
        let up = c.enable(clock).and_then(|()| {
            c.identify = c.identify_controller(clock)?;
            c.granted = c.set_queues(clock)?;
            Ok(())
        });
        if let Err(e) = up {
            // Leave it disabled, as it would be found by the next owner.
            let _ = c.disable(clock);
            return Err(e);
        }
        Ok(c)
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }

    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// I/O queue pairs the controller granted.
    pub fn queues_granted(&self) -> u16 {
        self.granted
    }

    /// I/O queue pairs created and not deleted.
    pub fn queues_in_use(&self) -> usize {
        self.queues.len()
    }

    /// The largest transfer one command may carry: MDTS, and what a command's PRP list
    /// pages describe.
    pub fn max_transfer(&self) -> usize {
        let prp = PrpArea::<A::Mem>::max_transfer_for(PAGE_SIZE, self.cfg.prp_pages_per_cmd);
        match self.identify.max_transfer(12) {
            Some(m) => prp.min(usize::try_from(m).unwrap_or(usize::MAX)),
            None => prp,
        }
    }

    pub fn doorbells(&self) -> RegDoorbells<'_, R> {
        RegDoorbells {
            regs: &self.regs,
            dstrd: self.cap.dstrd(),
        }
    }

    pub fn regs(&self) -> &R {
        &self.regs
    }

    fn csts(&self) -> Result<u32> {
        let v = self.regs.read32(reg::CSTS);
        if v == u32::MAX {
            return Err(ControllerError::Gone);
        }
        Ok(v)
    }

    /// Waits for CSTS.RDY to equal `ready`, for at most CAP.TO. A fatal status ends a wait
    /// for ready (a wait for not ready goes on: disabling is how CFS is cleared).
    fn wait_ready(&self, ready: bool, clock: &dyn Clock) -> Result<()> {
        let to = self.cap.timeout_ms();
        let deadline = clock.now() + Duration::from_millis(to);
        loop {
            let s = self.csts()?;
            if (s & csts::RDY != 0) == ready {
                return Ok(());
            }
            if ready && s & csts::CFS != 0 {
                return Err(ControllerError::Fatal);
            }
            if clock.now() >= deadline {
                return Err(ControllerError::ReadyTimeout(ready, to));
            }
            clock.sleep(self.cfg.poll_interval);
        }
    }

    /// CC.EN = 0 and wait for CSTS.RDY = 0.
    fn disable(&mut self, clock: &dyn Clock) -> Result<()> {
        let cc_now = self.regs.read32(reg::CC);
        if cc_now & cc::EN != 0 {
            // §3.5.2: a controller being enabled should finish becoming ready before it is
            // disabled; if it never does, disable it anyway.
            let _ = self.wait_ready(true, clock);
        }
        self.regs.write32(reg::CC, cc_now & !cc::EN & !cc::SHN_MASK);
        self.wait_ready(false, clock)
    }

    /// Programs the admin queue, enables the controller and waits for it to be ready.
    fn enable(&mut self, clock: &dyn Clock) -> Result<()> {
        let sq = self.admin.sq.entries();
        let cq = self.admin.cq.entries();
        // AQA: ACQS in 27:16, ASQS in 11:0, both 0's based.
        self.regs
            .write32(reg::AQA, (u32::from(cq - 1) << 16) | u32::from(sq - 1));
        self.regs.write64(reg::ASQ, self.admin.sq.iova());
        self.regs.write64(reg::ACQ, self.admin.cq.iova());
        let cc_val = cc::CSS_NVM
            | cc::AMS_RR
            | (SQE_SHIFT << cc::IOSQES_SHIFT)
            | (CQE_SHIFT << cc::IOCQES_SHIFT);
        // MPS = 0: 4 KiB pages.
        self.regs.write32(reg::CC, cc_val);
        self.regs.write32(reg::CC, cc_val | cc::EN);
        self.wait_ready(true, clock)
    }

    /// Runs one admin command to completion.
    fn admin(&mut self, e: SqEntry, clock: &dyn Clock) -> Result<Done> {
        let op = e.opcode();
        let cid = self
            .admin
            .submit(e, 0, clock.now())
            .map_err(ControllerError::AdminQueue)?;
        let db = RegDoorbells {
            regs: &self.regs,
            dstrd: self.cap.dstrd(),
        };
        self.admin.flush(&db);
        let deadline = clock.now() + self.cfg.admin_timeout;
        loop {
            self.done.clear();
            self.admin.poll(&db, &mut self.done);
            if let Some(d) = self.done.iter().find(|d| d.cid == cid) {
                if !d.status.is_success() {
                    return Err(ControllerError::Admin(op, d.status.sct(), d.status.sc()));
                }
                return Ok(*d);
            }
            let s = self.regs.read32(reg::CSTS);
            if s == u32::MAX {
                return Err(ControllerError::Gone);
            }
            if s & csts::CFS != 0 {
                return Err(ControllerError::Fatal);
            }
            if clock.now() >= deadline {
                return Err(ControllerError::AdminTimeout(op));
            }
            clock.sleep(self.cfg.poll_interval);
        }
    }

    fn identify_into_scratch(
        &mut self,
        cns: u32,
        nsid: u32,
        clock: &dyn Clock,
    ) -> Result<[u8; IDENTIFY_SIZE]> {
        self.scratch.fill(0, IDENTIFY_SIZE, 0);
        let mut e = SqEntry::identify(cns, nsid);
        e.set_prps(self.scratch.iova(), 0);
        self.admin(e, clock)?;
        let mut b = [0u8; IDENTIFY_SIZE];
        self.scratch.read(0, &mut b);
        Ok(b)
    }

    fn identify_controller(&mut self, clock: &dyn Clock) -> Result<IdentifyController> {
        let b = self.identify_into_scratch(spec::CNS_CONTROLLER, 0, clock)?;
        IdentifyController::parse(&b).map_err(ControllerError::Identify)
    }

    /// IDENTIFY namespace `nsid`.
    pub fn identify_namespace(
        &mut self,
        nsid: u32,
        clock: &dyn Clock,
    ) -> Result<IdentifyNamespace> {
        if nsid == 0 || nsid > self.identify.nn {
            return Err(ControllerError::NoNamespace(nsid, self.identify.nn));
        }
        let b = self.identify_into_scratch(spec::CNS_NAMESPACE, nsid, clock)?;
        IdentifyNamespace::parse(&b).map_err(ControllerError::Identify)
    }

    /// SET FEATURES Number of Queues; returns the queue pairs granted (the smaller of the
    /// SQs and CQs allocated, and of what was asked).
    fn set_queues(&mut self, clock: &dyn Clock) -> Result<u16> {
        let want = self.cfg.io_queues.max(1);
        let d = self.admin(SqEntry::set_number_of_queues(want), clock)?;
        let nsqa = (d.dw0 & 0xffff) as u16;
        let ncqa = (d.dw0 >> 16) as u16;
        let granted = nsqa.min(ncqa).saturating_add(1).min(want);
        if granted == 0 {
            return Err(ControllerError::NoQueues);
        }
        Ok(granted)
    }

    fn io_entries(&self) -> u16 {
        let mqes = self.cap.max_queue_entries().min(u32::from(u16::MAX)) as u16;
        self.cfg.io_entries.clamp(2, mqes.max(2))
    }

    /// Creates an I/O queue pair for namespace `nsid` of `block_size`-byte blocks.
    pub fn create_io_queue(
        &mut self,
        nsid: u32,
        block_size: u32,
        clock: &dyn Clock,
    ) -> Result<IoQueue<A::Mem>> {
        let qid = (1..=self.granted)
            .find(|q| self.queues.iter().all(|r| r.qid != *q))
            .ok_or(ControllerError::QueuesExhausted(self.granted))?;
        let entries = self.io_entries();
        let sq = self.alloc.alloc(usize::from(entries) * SQE_SIZE)?;
        let cq = self.alloc.alloc(usize::from(entries) * CQE_SIZE)?;
        let per_cmd = self.cfg.prp_pages_per_cmd;
        let prp_mem = self.alloc.alloc(
            PrpArea::<A::Mem>::size_for(usize::from(entries - 1), PAGE_SIZE, per_cmd)
                .max(PAGE_SIZE),
        )?;
        let rec = QueueRecord {
            qid,
            entries,
            sq: sq.iova(),
            cq: cq.iova(),
        };
        self.create_on_controller(rec, clock)?;
        self.queues.push(rec);
        Ok(IoQueue {
            qp: QueuePair::new(qid, sq, cq, entries),
            prp: PrpArea::new(prp_mem, PAGE_SIZE, per_cmd),
            nsid,
            block_size,
        })
    }

    fn create_on_controller(&mut self, r: QueueRecord, clock: &dyn Clock) -> Result<()> {
        self.admin(SqEntry::create_io_cq(r.qid, r.entries, r.cq), clock)?;
        if let Err(e) = self.admin(SqEntry::create_io_sq(r.qid, r.entries, r.sq, r.qid), clock) {
            let _ = self.admin(SqEntry::delete_io_cq(r.qid), clock);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes an I/O queue pair (SQ first, then its CQ). Its outstanding commands end with
    /// "aborted due to SQ deletion" in `out`.
    pub fn delete_io_queue(
        &mut self,
        mut q: IoQueue<A::Mem>,
        clock: &dyn Clock,
        out: &mut Vec<Done>,
    ) -> Result<()> {
        let qid = q.qid();
        self.queues.retain(|r| r.qid != qid);
        let r = self
            .admin(SqEntry::delete_io_sq(qid), clock)
            .and_then(|_| self.admin(SqEntry::delete_io_cq(qid), clock).map(|_| ()));
        let db = self.doorbells();
        q.qp.poll(&db, out);
        q.qp.drain(aborted_by_reset(), out);
        r
    }

    /// Handles the timeouts of queue `q` at the clock's time: an ABORT for a command that
    /// has just timed out, [`TimeoutAction::Reset`] for one that outlived its ABORT.
    pub fn check_timeouts(&mut self, q: &mut IoQueue<A::Mem>, clock: &dyn Clock) -> TimeoutAction {
        let now = clock.now();
        let to = self.cfg.command_timeout;
        if q.qp.expired(now, to, true).is_some() {
            return TimeoutAction::Reset;
        }
        let Some(cid) = q.qp.expired(now, to, false) else {
            return TimeoutAction::None;
        };
        self.stats.timeouts += 1;
        q.qp.mark_aborting(cid, now);
        match self.admin(SqEntry::abort(q.qid(), cid), clock) {
            // DW0 bit 0 set: not aborted. The command may still complete by itself; if it
            // does not within another timeout, the reset follows.
            Ok(_) => {
                self.stats.aborts += 1;
                TimeoutAction::Aborted(cid)
            }
            Err(_) => TimeoutAction::Reset,
        }
    }

    /// Resets the controller (§3.7.2: CC.EN to 0) and brings it and `queues` back. Every
    /// command outstanding on them ends in `out` with a retryable "aborted" status.
    pub fn reset(
        &mut self,
        queues: &mut [&mut IoQueue<A::Mem>],
        clock: &dyn Clock,
        out: &mut Vec<Done>,
    ) -> Result<()> {
        self.reset_begin(clock)?;
        for q in queues.iter_mut() {
            q.qp.drain(aborted_by_reset(), out);
        }
        self.reset_finish(clock)
    }

    /// The first half of [`reset`](Controller::reset): the controller disabled, which makes
    /// it forget every queue and command. Before [`reset_finish`](Controller::reset_finish)
    /// the caller drains every I/O queue (`qp.drain(aborted_by_reset(), ..)`); only now is
    /// that safe, as a disabled controller writes nothing more into them.
    pub fn reset_begin(&mut self, clock: &dyn Clock) -> Result<()> {
        self.stats.resets += 1;
        self.disable(clock)?;
        let mut admin_done = Vec::new();
        self.admin.drain(aborted_by_reset(), &mut admin_done);
        Ok(())
    }

    /// The second half of [`reset`](Controller::reset): enabled again, with every I/O queue
    /// created anew on the memory it had (the drained queues start empty, as new ones).
    pub fn reset_finish(&mut self, clock: &dyn Clock) -> Result<()> {
        self.enable(clock)?;
        self.identify = self.identify_controller(clock)?;
        let granted = self.set_queues(clock)?;
        let records = std::mem::take(&mut self.queues);
        for r in records {
            if r.qid > granted {
                continue;
            }
            self.create_on_controller(r, clock)?;
            self.queues.push(r);
        }
        self.granted = granted;
        Ok(())
    }

    /// Shuts the controller down (§3.6.1) after deleting `queues`, and disables it.
    pub fn shutdown(
        mut self,
        queues: Vec<IoQueue<A::Mem>>,
        clock: &dyn Clock,
        out: &mut Vec<Done>,
    ) -> Result<()> {
        for q in queues {
            // A queue that cannot be deleted goes with the shutdown anyway.
            let _ = self.delete_io_queue(q, clock, out);
        }
        let cc_now = self.regs.read32(reg::CC);
        self.regs
            .write32(reg::CC, (cc_now & !cc::SHN_MASK) | cc::SHN_NORMAL);
        let to = self.cap.timeout_ms();
        let deadline = clock.now() + Duration::from_millis(to);
        loop {
            let s = self.csts()?;
            if s & csts::SHST_MASK == csts::SHST_COMPLETE {
                break;
            }
            if clock.now() >= deadline {
                return Err(ControllerError::ShutdownTimeout(to));
            }
            clock.sleep(self.cfg.poll_interval);
        }
        self.disable(clock)
    }
}

/// The status of a command the controller forgot in a reset: retryable.
pub fn aborted_by_reset() -> Status {
    Status::new(sct::GENERIC, sc::ABORTED_SQ_DELETION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::nvme::model::{FakeClock, Model, ModelRegs, SimAlloc, SimMem, SimRegion};
    use crate::bdev::nvme::spec::nvm;
    use crate::bdev::BdevError;

    const BS: u32 = 512;

    struct Bed {
        mem: SimMem,
        regs: ModelRegs,
        clock: FakeClock,
        /// Data buffers for I/O, apart from the driver's own allocations.
        bufs: SimAlloc,
    }

    fn bed(mqes: u16) -> Bed {
        let mem = SimMem::new(64 << 20);
        let regs = Model::start(&mem, mqes, BS, 16 << 10);
        // The driver allocates from the first 32 MiB, the test's buffers from the rest.
        let mut bufs = SimAlloc::new(&mem);
        bufs.alloc(32 << 20).unwrap();
        Bed {
            mem,
            regs,
            clock: FakeClock::new(),
            bufs,
        }
    }

    fn cfg() -> Config {
        Config {
            io_entries: 64,
            io_queues: 2,
            ..Config::default()
        }
    }

    type Ctrl = Controller<ModelRegs, SimAlloc>;

    fn up(b: &Bed, c: Config) -> Ctrl {
        let alloc = SimAlloc::new(&b.mem);
        Controller::new(b.regs.clone(), alloc, c, &b.clock).unwrap()
    }

    fn buf(b: &mut Bed, len: usize) -> SimRegion {
        b.bufs.alloc(len).unwrap()
    }

    fn whole(r: &SimRegion) -> [Piece; 1] {
        [Piece {
            iova: r.iova(),
            len: r.len() as u32,
        }]
    }

    /// Submits, rings and polls until `cmd` completes (the model completes at the doorbell).
    fn run(c: &Ctrl, q: &mut IoQueue<SimRegion>, cmd: IoCmd<'_>, tag: u64, now: Instant) -> Done {
        q.submit(&cmd, tag, now).unwrap();
        q.qp.flush(&c.doorbells());
        let mut out = Vec::new();
        q.qp.poll(&c.doorbells(), &mut out);
        assert_eq!(out.len(), 1, "one completion");
        out[0]
    }

    #[test]
    fn init_brings_the_controller_up() {
        let b = bed(128);
        let c = up(&b, cfg());
        let m = b.regs.0.borrow();
        let cc_val = m.cc();
        assert_eq!(cc_val & cc::EN, cc::EN);
        assert_eq!((cc_val >> 16) & 0xf, 6, "IOSQES");
        assert_eq!((cc_val >> 20) & 0xf, 4, "IOCQES");
        assert_eq!((cc_val >> 7) & 0xf, 0, "MPS 4 KiB");
        assert_eq!((cc_val >> 4) & 7, 0, "NVM command set");
        assert_eq!(m.aqa(), 31 << 16 | 31);
        drop(m);
        assert_eq!(c.identify().model, "iscsi-tgt NVMe model");
        assert_eq!(c.identify().serial, "MODEL-SERIAL-0001");
        assert_eq!(c.identify().firmware, "1.0");
        assert!(c.identify().vwc);
        assert_eq!(c.queues_granted(), 2);
        // No MDTS: the PRP list pages bound a command (5 pages: just under 10 MiB).
        assert_eq!(c.max_transfer(), 2556 * 4096);
        let mut c = c;
        let ns = c.identify_namespace(1, &b.clock).unwrap();
        assert_eq!((ns.nsze, ns.block_size), (16 << 10, BS));
        assert!(ns.thin_provisioned() && ns.deallocated_reads_zeros());
        assert!(matches!(
            c.identify_namespace(2, &b.clock),
            Err(ControllerError::NoNamespace(2, 1))
        ));
    }

    #[test]
    fn init_fails_cleanly_on_a_bad_controller() {
        let b = bed(128);
        b.regs.0.borrow_mut().faults.never_ready = true;
        let t0 = b.clock.now();
        let e = Controller::new(b.regs.clone(), SimAlloc::new(&b.mem), cfg(), &b.clock);
        assert!(matches!(e, Err(ControllerError::ReadyTimeout(true, 1000))));
        assert!(
            b.clock.now() >= t0 + Duration::from_millis(1000),
            "waited CAP.TO"
        );
        assert_eq!(b.regs.0.borrow().cc() & cc::EN, 0, "left disabled");

        let b = bed(128);
        b.regs.0.borrow_mut().faults.fatal = true;
        let e = Controller::new(b.regs.clone(), SimAlloc::new(&b.mem), cfg(), &b.clock);
        assert!(matches!(e, Err(ControllerError::Fatal)), "{:?}", e.err());

        let b = bed(128);
        b.regs.0.borrow_mut().cap &= !(1 << 37);
        let e = Controller::new(b.regs.clone(), SimAlloc::new(&b.mem), cfg(), &b.clock);
        assert!(matches!(e, Err(ControllerError::NoNvmCommandSet)));
    }

    #[test]
    fn io_round_trip_through_the_model() {
        let mut b = bed(128);
        let mut c = up(&b, cfg());
        let mut q = c.create_io_queue(1, BS, &b.clock).unwrap();
        let mut q2 = c.create_io_queue(1, BS, &b.clock).unwrap();
        assert_eq!((q.qid(), q2.qid()), (1, 2));
        assert!(matches!(
            c.create_io_queue(1, BS, &b.clock),
            Err(ControllerError::QueuesExhausted(2))
        ));
        assert_eq!(b.regs.0.borrow().io_queues(), 2);
        let now = b.clock.now();

        // 300 KiB written from three pieces (two 128 KiB chunks and a tail): a PRP list.
        let pieces_mem = [
            buf(&mut b, 128 << 10),
            buf(&mut b, 128 << 10),
            buf(&mut b, 44 << 10),
        ];
        let pattern: Vec<u8> = (0..300 << 10)
            .map(|i: usize| (i * 7 + i / 4096) as u8)
            .collect();
        let mut at = 0;
        for r in &pieces_mem {
            r.write(0, &pattern[at..at + r.len()]);
            at += r.len();
        }
        let pieces: Vec<Piece> = pieces_mem.iter().flat_map(whole).collect();
        let nlb = (300 << 10) / BS;
        let d = run(
            &c,
            &mut q,
            IoCmd::Write {
                slba: 100,
                nlb,
                fua: true,
                data: &pieces,
            },
            1,
            now,
        );
        assert_eq!((d.tag, d.status), (1, Status::SUCCESS));
        assert_eq!(
            &b.regs.0.borrow().data[100 * 512..100 * 512 + (300 << 10)],
            &pattern[..],
            "on the medium"
        );
        // Read back through the other queue into one buffer at an offset into its page.
        let back = buf(&mut b, (300 << 10) + 4096);
        let into = [Piece {
            iova: back.iova() + 512,
            len: 300 << 10,
        }];
        let d = run(
            &c,
            &mut q2,
            IoCmd::Read {
                slba: 100,
                nlb,
                data: &into,
            },
            2,
            now,
        );
        assert_eq!(d.status, Status::SUCCESS);
        let mut got = vec![0u8; 300 << 10];
        back.read(512, &mut got);
        assert_eq!(got, pattern);
        // COMPARE: equal, then different.
        let d = run(
            &c,
            &mut q,
            IoCmd::Compare {
                slba: 100,
                nlb,
                data: &pieces,
            },
            3,
            now,
        );
        assert_eq!(d.status, Status::SUCCESS);
        pieces_mem[1].write(5, &[0xee]);
        let d = run(
            &c,
            &mut q,
            IoCmd::Compare {
                slba: 100,
                nlb,
                data: &pieces,
            },
            4,
            now,
        );
        assert_eq!(d.status.sc(), sc::COMPARE_FAILURE);
        assert_eq!(d.status.sct(), sct::MEDIA);
        // FLUSH, WRITE ZEROES and deallocate.
        let d = run(&c, &mut q, IoCmd::Flush, 5, now);
        assert_eq!(d.status, Status::SUCCESS);
        let d = run(
            &c,
            &mut q,
            IoCmd::WriteZeroes {
                slba: 100,
                nlb: 8,
                deallocate: false,
            },
            6,
            now,
        );
        assert_eq!(d.status, Status::SUCCESS);
        let ranges = [(110, 4), (200, 16)];
        let d = run(&c, &mut q, IoCmd::Deallocate { ranges: &ranges }, 7, now);
        assert_eq!(d.status, Status::SUCCESS);
        {
            let m = b.regs.0.borrow();
            assert!(m.data[100 * 512..108 * 512].iter().all(|&x| x == 0));
            assert!(m.data[108 * 512..110 * 512].iter().any(|&x| x != 0));
            assert!(m.data[110 * 512..114 * 512].iter().all(|&x| x == 0));
            assert!(m.data[114 * 512..120 * 512].iter().any(|&x| x != 0));
            assert_eq!(m.deallocated, 20);
            assert_eq!(m.count(true, nvm::FLUSH), 1);
        }
        // The driver refuses what it cannot describe, before the controller sees it.
        let short = [Piece {
            iova: back.iova(),
            len: 4096,
        }];
        assert_eq!(
            q.submit(
                &IoCmd::Read {
                    slba: 0,
                    nlb: 16,
                    data: &short
                },
                8,
                now
            ),
            Err(SubmitError::Length(4096, 8192))
        );
        let odd = [
            Piece {
                iova: back.iova(),
                len: 4096,
            },
            Piece {
                iova: back.iova() + 4096 + 512,
                len: 4096,
            },
        ];
        assert_eq!(
            q.submit(
                &IoCmd::Write {
                    slba: 0,
                    nlb: 16,
                    fua: false,
                    data: &odd
                },
                9,
                now
            ),
            Err(SubmitError::Prp(PrpError::Misaligned(1)))
        );
        assert_eq!(
            q.submit(&IoCmd::Deallocate { ranges: &[] }, 10, now),
            Err(SubmitError::Ranges(0))
        );
        assert_eq!(
            q.submit(
                &IoCmd::WriteZeroes {
                    slba: 0,
                    nlb: 0,
                    deallocate: true
                },
                11,
                now
            ),
            Err(SubmitError::Blocks(0))
        );
        assert_eq!(
            q.submit(
                &IoCmd::WriteZeroes {
                    slba: 0,
                    nlb: (1 << 16) + 1,
                    deallocate: true
                },
                12,
                now
            ),
            Err(SubmitError::Blocks((1 << 16) + 1))
        );
        assert_eq!(q.qp.outstanding(), 0, "refused commands hold no identifier");
        let mut out = Vec::new();
        c.shutdown(vec![q, q2], &b.clock, &mut out).unwrap();
        assert!(out.is_empty());
        let m = b.regs.0.borrow();
        assert_eq!(m.io_queues(), 0, "queues deleted");
        assert_eq!(m.shutdowns, 1);
        assert_eq!(m.cc() & cc::EN, 0, "left disabled");
        assert_eq!(m.cc() & cc::SHN_MASK, 0);
        assert_eq!(m.count(false, spec::admin::DELETE_IO_SQ), 2);
    }

    #[test]
    fn a_small_queue_wraps_many_times() {
        let mut b = bed(4);
        let mut c = up(
            &b,
            Config {
                io_queues: 1,
                ..cfg()
            },
        );
        let mut q = c.create_io_queue(1, BS, &b.clock).unwrap();
        assert_eq!(q.qp.capacity(), 3, "MQES caps the queue: 4 entries");
        let r = buf(&mut b, 4096);
        let now = b.clock.now();
        for i in 0..50u64 {
            r.write(0, &[i as u8; 4096]);
            let d = run(
                &c,
                &mut q,
                IoCmd::Write {
                    slba: i,
                    nlb: 8,
                    fua: false,
                    data: &whole(&r),
                },
                i,
                now,
            );
            assert_eq!((d.tag, d.status), (i, Status::SUCCESS));
        }
        let m = b.regs.0.borrow();
        for i in 0..50usize {
            assert_eq!(m.data[i * 512], i as u8);
        }
    }

    #[test]
    fn error_statuses_reach_the_block_layer() {
        let mut b = bed(128);
        let mut c = up(&b, cfg());
        let mut q = c.create_io_queue(1, BS, &b.clock).unwrap();
        let r = buf(&mut b, 4096);
        let now = b.clock.now();
        b.regs.0.borrow_mut().faults.fail_next = Some((
            nvm::READ,
            Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR),
        ));
        let d = run(
            &c,
            &mut q,
            IoCmd::Read {
                slba: 8,
                nlb: 8,
                data: &whole(&r),
            },
            1,
            now,
        );
        assert_eq!(d.status.bdev_error(8 * 512), BdevError::Io(4096));
        b.regs.0.borrow_mut().faults.fail_next =
            Some((nvm::WRITE, Status::new(sct::MEDIA, sc::WRITE_FAULT)));
        let d = run(
            &c,
            &mut q,
            IoCmd::Write {
                slba: 8,
                nlb: 8,
                fua: false,
                data: &whole(&r),
            },
            2,
            now,
        );
        assert_eq!(d.status.bdev_error(4096), BdevError::Io(4096));
        // Past the namespace's end: the model answers LBA Out of Range.
        let d = run(
            &c,
            &mut q,
            IoCmd::Read {
                slba: (16 << 10) - 4,
                nlb: 8,
                data: &whole(&r),
            },
            3,
            now,
        );
        assert_eq!(d.status.sc(), sc::LBA_OUT_OF_RANGE);
        assert_eq!(d.status.bdev_error(0), BdevError::BadBuffer);
        b.regs.0.borrow_mut().faults.fail_next = Some((
            nvm::WRITE,
            Status::new(sct::GENERIC, sc::NAMESPACE_NOT_READY),
        ));
        let d = run(
            &c,
            &mut q,
            IoCmd::Write {
                slba: 8,
                nlb: 8,
                fua: false,
                data: &whole(&r),
            },
            4,
            now,
        );
        assert_eq!(d.status.bdev_error(0), BdevError::Offline);
        // A controller without WRITE ZEROES rejects it: an internal failure, not the medium.
        b.regs.0.borrow_mut().oncs = 0;
        let d = run(
            &c,
            &mut q,
            IoCmd::WriteZeroes {
                slba: 0,
                nlb: 1,
                deallocate: false,
            },
            5,
            now,
        );
        assert_eq!(d.status.bdev_error(0), BdevError::BadBuffer);
        // The next command works.
        let d = run(
            &c,
            &mut q,
            IoCmd::Read {
                slba: 8,
                nlb: 8,
                data: &whole(&r),
            },
            6,
            now,
        );
        assert_eq!(d.status, Status::SUCCESS);
    }

    fn to(c: &Ctrl) -> Duration {
        c.cfg.command_timeout
    }

    #[test]
    fn a_timed_out_command_is_aborted() {
        let mut b = bed(128);
        let mut c = up(&b, cfg());
        let mut q = c.create_io_queue(1, BS, &b.clock).unwrap();
        let r = buf(&mut b, 4096);
        b.regs.0.borrow_mut().faults.swallow_next = Some(nvm::READ);
        let cid = q
            .submit(
                &IoCmd::Read {
                    slba: 0,
                    nlb: 8,
                    data: &whole(&r),
                },
                77,
                b.clock.now(),
            )
            .unwrap();
        q.qp.flush(&c.doorbells());
        let mut out = Vec::new();
        assert_eq!(q.qp.poll(&c.doorbells(), &mut out), 0, "swallowed");
        assert_eq!(c.check_timeouts(&mut q, &b.clock), TimeoutAction::None);
        b.clock.advance(to(&c) + Duration::from_secs(1));
        assert_eq!(
            c.check_timeouts(&mut q, &b.clock),
            TimeoutAction::Aborted(cid)
        );
        assert_eq!(b.regs.0.borrow().count(false, spec::admin::ABORT), 1);
        // The aborted command completes on its queue, as cancelled.
        assert_eq!(q.qp.poll(&c.doorbells(), &mut out), 1);
        assert_eq!(out[0].tag, 77);
        assert_eq!(out[0].status.bdev_error(0), BdevError::Cancelled);
        assert_eq!(c.check_timeouts(&mut q, &b.clock), TimeoutAction::None);
        assert_eq!(
            c.stats(),
            Stats {
                timeouts: 1,
                aborts: 1,
                resets: 0
            }
        );
    }

    #[test]
    fn a_command_that_outlives_its_abort_resets_the_controller() {
        let mut b = bed(128);
        let mut c = up(&b, cfg());
        let mut q = c.create_io_queue(1, BS, &b.clock).unwrap();
        let mut q2 = c.create_io_queue(1, BS, &b.clock).unwrap();
        let r = buf(&mut b, 4096);
        r.write(0, &[0x5a; 4096]);
        {
            let mut m = b.regs.0.borrow_mut();
            m.faults.swallow_next = Some(nvm::WRITE);
            m.faults.ignore_abort = true;
        }
        let w = IoCmd::Write {
            slba: 0,
            nlb: 8,
            fua: false,
            data: &whole(&r),
        };
        q.submit(&w, 1, b.clock.now()).unwrap();
        q.qp.flush(&c.doorbells());
        b.clock.advance(to(&c) + Duration::from_secs(1));
        assert!(matches!(
            c.check_timeouts(&mut q, &b.clock),
            TimeoutAction::Aborted(_)
        ));
        b.clock.advance(Duration::from_secs(1));
        assert_eq!(
            c.check_timeouts(&mut q, &b.clock),
            TimeoutAction::None,
            "given time"
        );
        b.clock.advance(to(&c));
        assert_eq!(c.check_timeouts(&mut q, &b.clock), TimeoutAction::Reset);

        let mut out = Vec::new();
        c.reset(&mut [&mut q, &mut q2], &b.clock, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag, 1);
        assert!(
            out[0].status.is_aborted() && !out[0].status.dnr(),
            "retryable"
        );
        assert_eq!(q.qp.outstanding(), 0);
        assert_eq!(b.regs.0.borrow().disables, 1, "the reset disabled it");
        assert_eq!(b.regs.0.borrow().io_queues(), 2, "both queues are back");
        assert_eq!(c.stats().resets, 1);
        // Both queues work again: the retried write lands, and reads back.
        b.regs.0.borrow_mut().faults.ignore_abort = false;
        let d = run(&c, &mut q, w, 2, b.clock.now());
        assert_eq!(d.status, Status::SUCCESS);
        let back = buf(&mut b, 4096);
        let d = run(
            &c,
            &mut q2,
            IoCmd::Read {
                slba: 0,
                nlb: 8,
                data: &whole(&back),
            },
            3,
            b.clock.now(),
        );
        assert_eq!(d.status, Status::SUCCESS);
        let mut got = [0u8; 4096];
        back.read(0, &mut got);
        assert!(got.iter().all(|&x| x == 0x5a));
        assert_eq!(c.check_timeouts(&mut q, &b.clock), TimeoutAction::None);
    }

    #[test]
    fn a_fatal_controller_fails_admin_commands_and_a_reset_recovers_it() {
        let b = bed(128);
        let mut c = up(&b, cfg());
        b.regs.0.borrow_mut().faults.fatal = true;
        assert!(matches!(
            c.identify_namespace(1, &b.clock),
            Err(ControllerError::Fatal)
        ));
        let mut out = Vec::new();
        c.reset(&mut [], &b.clock, &mut out).unwrap();
        assert_eq!(c.identify_namespace(1, &b.clock).unwrap().block_size, BS);
    }
}

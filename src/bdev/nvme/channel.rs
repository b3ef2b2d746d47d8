//! A reactor's [`IoChannel`] onto an NVMe namespace: one I/O queue pair of its own, polled,
//! with the data moved by the controller straight into and out of the I/O's pool buffer.
//!
//! - A block I/O becomes one NVM command, or several when it is larger than one command may
//!   carry (MDTS, or the PRP list pages of a command): each part covers a page-aligned
//!   stretch of the buffer, so its pieces always make valid PRPs. UNMAP ranges go out as
//!   DATASET MANAGEMENT commands of up to 256 ranges each.
//! - Parts go out as the queue has room, oldest I/O first; an I/O that finds the queue full
//!   waits, in order. The queue is never overfilled and nothing is allocated per I/O (the
//!   tables are sized when the channel opens).
//! - The I/O completes when its last part does, with the first failure among them mapped by
//!   [`Status::bdev_error`](super::spec::Status::bdev_error) at the I/O's offset.
//! - A command that a controller reset or an ABORT ended (an "aborted" status without Do Not
//!   Retry) does not fail its I/O: once the I/O's other commands are in, the whole I/O goes
//!   out again, up to [`MAX_TRIES`] times. Reads, writes, flushes and deallocations may be
//!   repeated; the SCSI layer sees the I/O succeed, late.
//! - The queue pair sits in a [`QueueCell`] that the device's watchdog may take at any time
//!   (to look for timed-out commands, or to reset the controller). The channel only ever
//!   tries the lock: when the watchdog holds it, I/O waits in the channel and the reactor
//!   goes on. Uncontended, the lock costs two atomic operations per submit and per poll.
//! - The addresses given to the controller are the buffer's own (the IOMMU maps the pool at
//!   I/O virtual address = process address). A write from lent memory (a RAM disk's pages,
//!   which the IOMMU does not map) is first copied into the buffer's chunks.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use super::controller::{IoCmd, IoQueue, SubmitError};
use super::prp::Piece;
use super::queue::{Done, RegDoorbells};
use super::spec::DSM_MAX_RANGES;
use super::{DmaMem, Regs};
use crate::bdev::{BdevCompletion, BdevError, BdevIo, IoChannel, IoOp};

/// The largest block count of one DSM range (a 32-bit field).
const MAX_RANGE_BLOCKS: u64 = u32::MAX as u64;

/// The most blocks one WRITE ZEROES covers (a 16-bit 0's based count).
const MAX_ZEROES_BLOCKS: u64 = 1 << 16;

/// How many times an I/O is sent in all when resets or ABORTs keep ending its commands.
pub const MAX_TRIES: u8 = 4;

/// A queue pair and what a controller reset left for its channel.
pub struct QueueSlot<M> {
    pub q: IoQueue<M>,
    /// Commands a reset ended (drained with an "aborted" status): the channel finishes or
    /// resends their I/O at its next poll.
    pub reset_done: Vec<Done>,
}

/// A queue pair shared by the channel that uses it and the device's watchdog.
pub type QueueCell<M> = Mutex<QueueSlot<M>>;

/// A new cell for queue `q`.
pub fn queue_cell<M>(q: IoQueue<M>) -> Arc<QueueCell<M>> {
    Arc::new(Mutex::new(QueueSlot {
        q,
        reset_done: Vec::new(),
    }))
}

/// The cell's lock when nobody holds it. Every update under it leaves the slot whole, so a
/// poisoned lock is usable.
fn try_take<M>(cell: &QueueCell<M>) -> Option<MutexGuard<'_, QueueSlot<M>>> {
    match cell.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// The cell's lock, waiting for it.
pub fn take<M>(cell: &QueueCell<M>) -> MutexGuard<'_, QueueSlot<M>> {
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

struct Pending {
    io: BdevIo,
    /// Commands the I/O needs in all.
    total: u32,
    /// Commands submitted so far (data parts go out in order as the queue has room).
    issued: u32,
    /// Commands submitted and not completed.
    outstanding: u32,
    /// The first failure.
    failed: Option<BdevError>,
    /// A command of this try was aborted: the I/O goes out again once all are in.
    again: bool,
    /// Tries so far, this one included.
    tries: u8,
}

/// The channel; see the module documentation.
pub struct NvmeChannel<R: Regs, M: DmaMem> {
    cell: Arc<QueueCell<M>>,
    core: Core<R>,
}

/// Everything of the channel but its queue pair.
struct Core<R> {
    regs: R,
    dstrd: u8,
    /// Commands the queue pair holds at once.
    capacity: usize,
    block_size: u32,
    /// The most bytes one command carries: a multiple of the block size and of 4096.
    max_bytes: usize,
    /// Started I/O, indexed by the tag its commands carry.
    pending: Vec<Option<Pending>>,
    free: Vec<u32>,
    /// Started I/O with commands still to submit, oldest first.
    partial: VecDeque<u32>,
    /// I/O not started yet, in arrival order.
    waiting: VecDeque<BdevIo>,
    done: VecDeque<BdevCompletion>,
    scratch: Vec<Done>,
    pieces: Vec<Piece>,
    ranges: Vec<(u64, u32)>,
}

impl<R: Regs, M: DmaMem> NvmeChannel<R, M> {
    /// A channel over queue `q` of a controller whose registers are `regs` (doorbell stride
    /// `dstrd`), for blocks of `block_size` bytes and commands of at most `max_transfer`
    /// bytes.
    pub fn new(
        regs: R,
        dstrd: u8,
        q: IoQueue<M>,
        block_size: u32,
        max_transfer: usize,
    ) -> NvmeChannel<R, M> {
        NvmeChannel::with_cell(regs, dstrd, queue_cell(q), block_size, max_transfer)
    }

    /// A channel over the queue pair in `cell`, which others may hold too.
    pub fn with_cell(
        regs: R,
        dstrd: u8,
        cell: Arc<QueueCell<M>>,
        block_size: u32,
        max_transfer: usize,
    ) -> NvmeChannel<R, M> {
        let unit = (block_size as usize).max(4096);
        let by_nlb = (block_size as usize).saturating_mul(1 << 16);
        let max_bytes = (max_transfer.min(by_nlb) / unit * unit).max(unit);
        let slots = take(&cell).q.qp.capacity();
        NvmeChannel {
            cell,
            core: Core {
                regs,
                dstrd,
                capacity: slots,
                block_size,
                max_bytes,
                pending: (0..slots).map(|_| None).collect(),
                free: (0..slots as u32).rev().collect(),
                partial: VecDeque::with_capacity(slots),
                waiting: VecDeque::with_capacity(slots),
                done: VecDeque::with_capacity(slots),
                scratch: Vec::with_capacity(slots),
                pieces: Vec::with_capacity(max_bytes / 4096 + 2),
                ranges: Vec::with_capacity(DSM_MAX_RANGES),
            },
        }
    }

    /// Commands the controller holds for this channel.
    pub fn outstanding_commands(&self) -> usize {
        take(&self.cell).q.qp.outstanding()
    }

    /// The queue pair's cell, for another channel. Only once nothing is
    /// [`busy`](IoChannel::busy): the controller must be done with every buffer the channel
    /// holds.
    pub fn into_cell(self) -> Arc<QueueCell<M>> {
        self.cell
    }

    /// The most bytes one command carries.
    pub fn max_bytes(&self) -> usize {
        self.core.max_bytes
    }
}

impl<R: Regs> Core<R> {
    /// Commands `io` needs, or the error it completes with at once.
    fn parts(&self, io: &BdevIo) -> Result<u32, BdevError> {
        let bs = u64::from(self.block_size);
        match io.op {
            IoOp::Read | IoOp::Write { .. } => {
                let len = io.len as usize;
                let buf_ok = io.buf.as_ref().is_some_and(|b| b.len() >= len);
                if len == 0
                    || !buf_ok
                    || !io.offset.is_multiple_of(bs)
                    || !(len as u64).is_multiple_of(bs)
                {
                    return Err(BdevError::BadBuffer);
                }
                Ok(len.div_ceil(self.max_bytes) as u32)
            }
            IoOp::Flush => Ok(1),
            IoOp::Unmap => {
                let mut n = 0u64;
                for &(off, len) in &io.ranges {
                    if !off.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                        return Err(BdevError::BadBuffer);
                    }
                    n += (len / bs).div_ceil(MAX_RANGE_BLOCKS);
                }
                let parts = n.div_ceil(DSM_MAX_RANGES as u64);
                // Deallocate commands go out together: more than the queue holds never fit.
                if parts > self.capacity as u64 {
                    return Err(BdevError::BadBuffer);
                }
                Ok(parts as u32)
            }
            IoOp::Prefetch => Ok(0),
            IoOp::WriteZeroes => {
                let len = u64::from(io.len);
                if len == 0 || !io.offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                    return Err(BdevError::BadBuffer);
                }
                Ok((len / bs).div_ceil(MAX_ZEROES_BLOCKS) as u32)
            }
        }
    }

    fn room<M: DmaMem>(&self, q: &IoQueue<M>) -> usize {
        self.capacity - q.qp.outstanding()
    }

    /// Starts `io` if the queue has room for (the first of) its commands; hands it back
    /// otherwise.
    fn start<M: DmaMem>(&mut self, q: &mut IoQueue<M>, io: BdevIo, now: Instant) -> Option<BdevIo> {
        let total = match self.parts(&io) {
            Ok(0) => {
                self.complete(io, Ok(()));
                return None;
            }
            Ok(n) => n,
            Err(e) => {
                self.complete(io, Err(e));
                return None;
            }
        };
        let need = if io.op == IoOp::Unmap {
            total as usize
        } else {
            1
        };
        if self.room(q) < need {
            return Some(io);
        }
        let Some(slot) = self.free.pop() else {
            return Some(io);
        };
        let p = Pending {
            io,
            total,
            issued: 0,
            outstanding: 0,
            failed: None,
            again: false,
            tries: 1,
        };
        if let Some(s) = self.pending.get_mut(slot as usize) {
            *s = Some(p);
        }
        self.pump(q, slot, now);
        None
    }

    /// Submits what the queue has room for of I/O `slot`'s remaining commands; finishes it
    /// when nothing of it is left, and otherwise makes sure it is in `partial`.
    fn pump<M: DmaMem>(&mut self, q: &mut IoQueue<M>, slot: u32, now: Instant) {
        let Some(mut p) = self.pending.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        if let Err(e) = self.issue(q, &mut p, slot, now) {
            // The commands already issued complete through `poll`; the rest never go out.
            log::warn!("nvme: cannot submit I/O at byte {}: {e}", p.io.offset);
            p.failed.get_or_insert(BdevError::BadBuffer);
            p.total = p.issued;
        }
        if p.issued == p.total && p.outstanding == 0 {
            self.free.push(slot);
            let result = p.failed.map_or(Ok(()), Err);
            self.complete(p.io, result);
            return;
        }
        if p.issued < p.total && !self.partial.contains(&slot) {
            self.partial.push_back(slot);
        }
        if let Some(s) = self.pending.get_mut(slot as usize) {
            *s = Some(p);
        }
    }

    /// Submits commands of `p` while the queue has room.
    fn issue<M: DmaMem>(
        &mut self,
        q: &mut IoQueue<M>,
        p: &mut Pending,
        slot: u32,
        now: Instant,
    ) -> Result<(), SubmitError> {
        let bs = u64::from(self.block_size);
        let tag = u64::from(slot);
        match p.io.op {
            IoOp::Read | IoOp::Write { .. } => {
                let len = p.io.len as usize;
                let Some(buf) = p.io.buf.as_mut() else {
                    return Err(SubmitError::Length(0, len as u64));
                };
                let read = p.io.op == IoOp::Read;
                if !read {
                    // Lent memory is not mapped for the device: take the bytes over.
                    buf.own();
                }
                while p.issued < p.total && self.capacity > q.qp.outstanding() {
                    let off = p.issued as usize * self.max_bytes;
                    let n = (len - off).min(self.max_bytes);
                    self.pieces.clear();
                    if read {
                        self.pieces.extend(buf.segments_mut(off, n).map(|s| Piece {
                            iova: s.as_mut_ptr() as u64,
                            len: s.len() as u32,
                        }));
                    } else {
                        self.pieces.extend(buf.segments(off, n).map(|s| Piece {
                            iova: s.as_ptr() as u64,
                            len: s.len() as u32,
                        }));
                    }
                    let slba = (p.io.offset + off as u64) / bs;
                    let nlb = (n as u64 / bs) as u32;
                    let cmd = match p.io.op {
                        IoOp::Write { fua } => IoCmd::Write {
                            slba,
                            nlb,
                            fua,
                            data: &self.pieces,
                        },
                        _ => IoCmd::Read {
                            slba,
                            nlb,
                            data: &self.pieces,
                        },
                    };
                    q.submit(&cmd, tag, now)?;
                    p.issued += 1;
                    p.outstanding += 1;
                }
            }
            IoOp::Flush => {
                if self.room(q) > 0 {
                    q.submit(&IoCmd::Flush, tag, now)?;
                    p.issued += 1;
                    p.outstanding += 1;
                }
            }
            IoOp::Unmap => {
                // All of them at once (a try that goes out again waits for the room).
                if self.room(q) < p.total as usize {
                    return Ok(());
                }
                self.ranges.clear();
                for &(off, len) in &p.io.ranges {
                    let mut slba = off / bs;
                    let mut left = len / bs;
                    while left > 0 {
                        let n = left.min(MAX_RANGE_BLOCKS);
                        self.ranges.push((slba, n as u32));
                        slba += n;
                        left -= n;
                    }
                }
                for chunk in self.ranges.chunks(DSM_MAX_RANGES) {
                    q.submit(&IoCmd::Deallocate { ranges: chunk }, tag, now)?;
                    p.issued += 1;
                    p.outstanding += 1;
                }
            }
            IoOp::WriteZeroes => {
                let first = p.io.offset / bs;
                let blocks = u64::from(p.io.len) / bs;
                while p.issued < p.total && self.capacity > q.qp.outstanding() {
                    let done = u64::from(p.issued) * MAX_ZEROES_BLOCKS;
                    let nlb = (blocks - done).min(MAX_ZEROES_BLOCKS) as u32;
                    let cmd = IoCmd::WriteZeroes {
                        slba: first + done,
                        nlb,
                        deallocate: false,
                    };
                    q.submit(&cmd, tag, now)?;
                    p.issued += 1;
                    p.outstanding += 1;
                }
            }
            IoOp::Prefetch => {}
        }
        Ok(())
    }

    fn complete(&mut self, io: BdevIo, result: Result<(), BdevError>) {
        self.done.push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }

    fn ring<M: DmaMem>(&self, q: &mut IoQueue<M>) {
        let db = RegDoorbells {
            regs: &self.regs,
            dstrd: self.dstrd,
        };
        q.qp.flush(&db);
    }

    /// Takes the controller's completions, and those a reset left in `reset_done`.
    fn reap<M: DmaMem>(&mut self, slot: &mut QueueSlot<M>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.append(&mut slot.reset_done);
        if slot.q.qp.outstanding() > 0 {
            let db = RegDoorbells {
                regs: &self.regs,
                dstrd: self.dstrd,
            };
            slot.q.qp.poll(&db, &mut scratch);
        }
        for d in scratch.drain(..) {
            self.command_done(d);
        }
        self.scratch = scratch;
    }

    /// One command of an I/O is in: the I/O finishes when its last one is, or goes out again
    /// when one was aborted.
    fn command_done(&mut self, d: Done) {
        let slot = d.tag as usize;
        let Some(Some(p)) = self.pending.get_mut(slot) else {
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        if d.status.is_aborted() && !d.status.dnr() && p.tries < MAX_TRIES {
            p.again = true;
        } else if !d.status.is_success() && p.failed.is_none() {
            // The I/O's first byte stands for the failing part's (SCSI reports the
            // command's LBA when it cannot tell which block failed).
            p.failed = Some(d.status.bdev_error(p.io.offset));
        }
        if p.outstanding > 0 || p.issued < p.total {
            return;
        }
        if p.again && p.failed.is_none() {
            p.again = false;
            p.tries += 1;
            p.issued = 0;
            log::warn!(
                "nvme: I/O at byte {} was aborted; sending it again (try {})",
                p.io.offset,
                p.tries
            );
            // The oldest started I/O: first in line for the queue's room.
            if !self.partial.contains(&(slot as u32)) {
                self.partial.push_front(slot as u32);
            }
            return;
        }
        if let Some(p) = self.pending[slot].take() {
            self.free.push(slot as u32);
            let result = p.failed.map_or(Ok(()), Err);
            self.complete(p.io, result);
        }
    }

    /// Sends what waits, older I/O first: the rest of a started one, then new ones.
    fn pump_waiting<M: DmaMem>(&mut self, q: &mut IoQueue<M>, now: Instant) {
        while let Some(&slot) = self.partial.front() {
            if self.room(q) == 0 {
                break;
            }
            self.partial.pop_front();
            self.pump(q, slot, now);
            if self.partial.contains(&slot) {
                break;
            }
        }
        while self.partial.is_empty() {
            let Some(io) = self.waiting.pop_front() else {
                break;
            };
            if let Some(io) = self.start(q, io, now) {
                self.waiting.push_front(io);
                break;
            }
        }
        self.ring(q);
    }

    fn busy(&self) -> bool {
        self.free.len() < self.capacity || !self.waiting.is_empty() || !self.done.is_empty()
    }
}

impl<R: Regs, M: DmaMem> IoChannel for NvmeChannel<R, M> {
    fn submit(&mut self, io: BdevIo) {
        let c = &mut self.core;
        if !c.waiting.is_empty() || !c.partial.is_empty() {
            c.waiting.push_back(io);
            return;
        }
        // The watchdog holds the queue: the I/O waits for the next poll.
        let Some(mut g) = try_take(&self.cell) else {
            c.waiting.push_back(io);
            return;
        };
        if let Some(io) = c.start(&mut g.q, io, Instant::now()) {
            c.waiting.push_back(io);
        }
        c.ring(&mut g.q);
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let c = &mut self.core;
        if c.free.len() < c.capacity || !c.waiting.is_empty() {
            if let Some(mut g) = try_take(&self.cell) {
                let slot = &mut *g;
                if slot.q.qp.outstanding() > 0 || !slot.reset_done.is_empty() {
                    c.reap(slot);
                }
                if !c.partial.is_empty() || !c.waiting.is_empty() {
                    c.pump_waiting(&mut slot.q, Instant::now());
                }
            }
        }
        let n = c.done.len();
        out.extend(c.done.drain(..));
        n
    }

    fn busy(&self) -> bool {
        self.core.busy()
    }

    fn cancel(&mut self, tag: u64) {
        // Waiting I/O has not reached the controller: it ends here. I/O the controller holds
        // completes as it will (ABORT is for timeouts, through the controller).
        let c = &mut self.core;
        if let Some(i) = c.waiting.iter().position(|io| io.tag == tag) {
            if let Some(io) = c.waiting.remove(i) {
                c.complete(io, Err(BdevError::Cancelled));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::nvme::controller::{Config, Controller};
    use crate::bdev::nvme::model::{FakeClock, Model, ModelRegs, SimAlloc, SimMem, SimRegion};
    use crate::bdev::nvme::spec::{nvm, sc, sct, Status};
    use crate::env::{DataBuf, Pool};

    const BS: u32 = 512;

    struct Bed {
        regs: ModelRegs,
        pool: &'static Pool,
        ch: NvmeChannel<ModelRegs, SimRegion>,
    }

    /// A channel on a model controller with `mqes` queue entries and an MDTS of 2^`mdts`
    /// pages, over a private pool the model reaches.
    fn bed(mqes: u16, mdts: u8) -> Bed {
        let pool = Pool::with_counts(8, 8, false).unwrap();
        let mem = SimMem::new(16 << 20);
        mem.map_window(pool);
        let regs = Model::start(&mem, mqes, BS, 8 << 10);
        regs.0.borrow_mut().mdts = mdts;
        let clock = FakeClock::new();
        let mut c =
            Controller::new(regs.clone(), SimAlloc::new(&mem), Config::default(), &clock).unwrap();
        let q = c.create_io_queue(1, BS, &clock).unwrap();
        let ch = NvmeChannel::new(regs.clone(), 0, q, BS, c.max_transfer());
        Bed { regs, pool, ch }
    }

    fn io(tag: u64, op: IoOp, offset: u64, buf: Option<DataBuf>, len: u32) -> BdevIo {
        BdevIo {
            tag,
            op,
            offset,
            len,
            buf,
            ranges: Vec::new(),
        }
    }

    fn drive(ch: &mut NvmeChannel<ModelRegs, SimRegion>, n: usize) -> Vec<BdevCompletion> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            ch.poll(&mut out);
            if out.len() >= n {
                break;
            }
        }
        assert_eq!(out.len(), n, "every I/O completes");
        assert!(!ch.busy());
        out
    }

    #[test]
    fn block_io_moves_pool_buffers_in_several_commands() {
        // MDTS 2^3 pages: 32 KiB per command.
        let mut b = bed(64, 3);
        assert_eq!(b.ch.max_bytes(), 32 << 10);
        let len = 300 << 10;
        let pattern: Vec<u8> = (0..len).map(|i: usize| (i * 13 + i / 512) as u8).collect();
        let mut w = DataBuf::alloc_from(b.pool, len).unwrap();
        w.write_at(0, &pattern);
        b.ch.submit(io(1, IoOp::Write { fua: false }, 4096, Some(w), len as u32));
        let c = drive(&mut b.ch, 1);
        assert_eq!((c[0].tag, c[0].result), (1, Ok(())));
        assert!(c[0].buf.is_some(), "the buffer comes back");
        {
            let m = b.regs.0.borrow();
            assert_eq!(m.count(true, nvm::WRITE), 10, "300 KiB in 32 KiB commands");
            assert_eq!(&m.data[4096..4096 + len], &pattern[..]);
        }
        let r = DataBuf::alloc_from(b.pool, len).unwrap();
        b.ch.submit(io(2, IoOp::Read, 4096, Some(r), len as u32));
        let c = drive(&mut b.ch, 1);
        assert_eq!(c[0].result, Ok(()));
        let mut back = vec![0u8; len];
        c[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert_eq!(back, pattern);

        // UNMAP, FLUSH, PRE-FETCH.
        let mut u = io(3, IoOp::Unmap, 0, None, 0);
        u.ranges = vec![(4096, 8192), (1 << 20, 512)];
        b.ch.submit(u);
        b.ch.submit(io(4, IoOp::Flush, 0, None, 0));
        b.ch.submit(io(5, IoOp::Prefetch, 0, None, 4096));
        let c = drive(&mut b.ch, 3);
        assert!(c.iter().all(|c| c.result.is_ok()));
        let m = b.regs.0.borrow();
        assert_eq!(m.deallocated, 17);
        assert!(m.data[4096..4096 + 8192].iter().all(|&x| x == 0));
        assert_eq!(m.count(true, nvm::FLUSH), 1);
    }

    #[test]
    fn write_zeroes_moves_no_data_and_splits_at_65536_blocks() {
        let mut b = bed(64, 3);
        let mut w = DataBuf::alloc_from(b.pool, 16384).unwrap();
        w.fill(0, 16384, 0x6b);
        b.ch.submit(io(1, IoOp::Write { fua: false }, 0, Some(w), 16384));
        drive(&mut b.ch, 1);
        b.ch.submit(io(2, IoOp::WriteZeroes, 4096, None, 8192));
        let c = drive(&mut b.ch, 1);
        assert_eq!((c[0].tag, c[0].result), (2, Ok(())));
        {
            let m = b.regs.0.borrow();
            assert_eq!(m.count(true, nvm::WRITE_ZEROES), 1);
            assert!(m.data[..4096].iter().all(|&x| x == 0x6b));
            assert!(m.data[4096..12288].iter().all(|&x| x == 0));
            assert!(m.data[12288..16384].iter().all(|&x| x == 0x6b));
        }
        // 65536 blocks a command: one block more takes two.
        let big = io(3, IoOp::WriteZeroes, 0, None, (65536 + 1) * BS);
        assert_eq!(b.ch.core.parts(&big), Ok(2));
        let odd = io(4, IoOp::WriteZeroes, 100, None, BS);
        assert_eq!(b.ch.core.parts(&odd), Err(BdevError::BadBuffer));
    }

    #[test]
    fn a_full_queue_holds_io_in_order_and_fails_what_cannot_be_described() {
        // Four entries: three commands at a time, 8 KiB each (MDTS 2^1 pages), so one
        // 32 KiB I/O needs more commands than the queue holds.
        let mut b = bed(4, 1);
        assert_eq!(b.ch.max_bytes(), 8192);
        let mut tags = Vec::new();
        for t in 0..5u64 {
            let mut w = DataBuf::alloc_from(b.pool, 32 << 10).unwrap();
            w.fill(0, 32 << 10, t as u8 + 1);
            b.ch.submit(io(
                t,
                IoOp::Write { fua: false },
                t * (32 << 10),
                Some(w),
                32 << 10,
            ));
            tags.push(t);
        }
        assert!(b.ch.busy());
        let c = drive(&mut b.ch, 5);
        assert_eq!(
            c.iter().map(|c| c.tag).collect::<Vec<_>>(),
            tags,
            "in order"
        );
        assert!(c.iter().all(|c| c.result.is_ok()));
        {
            let m = b.regs.0.borrow();
            assert_eq!(m.count(true, nvm::WRITE), 20);
            for t in 0..5usize {
                assert!(m.data[t * (32 << 10)..(t + 1) * (32 << 10)]
                    .iter()
                    .all(|&x| x == t as u8 + 1));
            }
        }
        // Not whole blocks, or no buffer: refused at once, never sent.
        b.ch.submit(io(
            7,
            IoOp::Read,
            100,
            DataBuf::alloc_from(b.pool, 512),
            512,
        ));
        b.ch.submit(io(8, IoOp::Read, 0, None, 512));
        let c = drive(&mut b.ch, 2);
        assert!(c.iter().all(|c| c.result == Err(BdevError::BadBuffer)));
        // A failing part fails the I/O, at its offset, once every part is in.
        b.regs.0.borrow_mut().faults.fail_next = Some((
            nvm::READ,
            Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR),
        ));
        b.ch.submit(io(
            9,
            IoOp::Read,
            8192,
            DataBuf::alloc_from(b.pool, 16 << 10),
            16 << 10,
        ));
        let c = drive(&mut b.ch, 1);
        assert_eq!(c[0].result, Err(BdevError::Io(8192)));
        assert_eq!(b.ch.outstanding_commands(), 0);
        // Waiting I/O can be cancelled before it reaches the controller.
        for t in 10..13u64 {
            b.ch.submit(io(
                t,
                IoOp::Read,
                0,
                DataBuf::alloc_from(b.pool, 16 << 10),
                16 << 10,
            ));
        }
        b.ch.cancel(12);
        let c = drive(&mut b.ch, 3);
        assert_eq!(c[0].tag, 12);
        assert_eq!(c[0].result, Err(BdevError::Cancelled));
        assert!(c[1..].iter().all(|c| c.result.is_ok()));
    }
}

//! A submission queue and its completion queue in memory shared with the controller (NVMe
//! Base §3.3 and §4.1).
//!
//! - The submission queue is a ring of 64-byte entries. The driver writes at the tail and
//!   tells the controller with the tail doorbell; the controller reports how far it has
//!   fetched in each completion's SQ Head Pointer. The ring is full when advancing the tail
//!   would make it equal the head: one slot always stays empty (§4.1.2).
//! - The completion queue is a ring of 16-byte entries that the controller writes. An entry
//!   is new when its phase tag equals the phase the driver expects, which starts at 1 and
//!   flips each time the head wraps (§4.6). The driver frees entries with the head doorbell,
//!   once per batch.
//! - Every outstanding command has a command identifier, unique within its SQ. There are
//!   `entries - 1` identifiers, the most commands a full queue can hold, taken and given
//!   back through a free list that is never reallocated.
//!
//! Doorbells go through [`Doorbells`], implemented over [`Regs`] for a real controller
//! ([`RegDoorbells`]) and by the test model.

#![forbid(unsafe_code)]

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::spec::{self, CqEntry, SqEntry, Status, CQE_SIZE, SQE_SIZE};
use super::{DmaMem, Regs};

/// How a queue tells the controller about new entries and consumed completions.
pub trait Doorbells {
    fn sq_tail(&self, qid: u16, tail: u16);
    fn cq_head(&self, qid: u16, head: u16);
}

/// The doorbell registers of a controller, `4 << dstrd` bytes apart.
pub struct RegDoorbells<'a, R: Regs> {
    pub regs: &'a R,
    pub dstrd: u8,
}

impl<R: Regs> Doorbells for RegDoorbells<'_, R> {
    fn sq_tail(&self, qid: u16, tail: u16) {
        self.regs
            .write32(spec::sq_tail_doorbell(qid, self.dstrd), u32::from(tail));
    }
    fn cq_head(&self, qid: u16, head: u16) {
        self.regs
            .write32(spec::cq_head_doorbell(qid, self.dstrd), u32::from(head));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum QueueError {
    /// the submission queue is full
    Full,
    /// every command identifier is in use
    NoCid,
}

/// The smallest queue the specification allows (§4.1.3: at least two entries).
pub const MIN_ENTRIES: u16 = 2;

fn next(i: u16, entries: u16) -> u16 {
    if i + 1 >= entries {
        0
    } else {
        i + 1
    }
}

/// A submission queue: `entries` 64-byte slots in `mem`.
pub struct SubmissionQueue<M> {
    mem: M,
    qid: u16,
    entries: u16,
    tail: u16,
    head: u16,
    /// The tail last written to the doorbell.
    rung: u16,
}

impl<M: DmaMem> SubmissionQueue<M> {
    /// A queue of `entries` slots (at least [`MIN_ENTRIES`], at most what `mem` holds).
    pub fn new(qid: u16, mem: M, entries: u16) -> SubmissionQueue<M> {
        let fits = (mem.len() / SQE_SIZE).min(usize::from(u16::MAX)) as u16;
        SubmissionQueue {
            mem,
            qid,
            entries: entries.min(fits).max(MIN_ENTRIES),
            tail: 0,
            head: 0,
            rung: 0,
        }
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn entries(&self) -> u16 {
        self.entries
    }

    pub fn iova(&self) -> u64 {
        self.mem.iova()
    }

    pub fn tail(&self) -> u16 {
        self.tail
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    /// Entries written and not yet fetched by the controller (as far as it has said).
    pub fn used(&self) -> u16 {
        if self.tail >= self.head {
            self.tail - self.head
        } else {
            self.entries - self.head + self.tail
        }
    }

    pub fn is_full(&self) -> bool {
        next(self.tail, self.entries) == self.head
    }

    /// Writes `e` at the tail and advances it; the controller learns of it at
    /// [`ring`](SubmissionQueue::ring).
    pub fn push(&mut self, e: &SqEntry) -> Result<(), QueueError> {
        if self.is_full() {
            return Err(QueueError::Full);
        }
        self.mem
            .write(usize::from(self.tail) * SQE_SIZE, &e.to_bytes());
        self.tail = next(self.tail, self.entries);
        Ok(())
    }

    /// Writes the tail doorbell if entries were pushed since the last time.
    pub fn ring(&mut self, db: &impl Doorbells) {
        if self.tail == self.rung {
            return;
        }
        // The entries must be visible to the device before it can see the doorbell.
        fence(Ordering::Release);
        db.sq_tail(self.qid, self.tail);
        self.rung = self.tail;
    }

    /// Takes the SQ Head Pointer of a completion. A head outside the stretch between the
    /// current head and the tail cannot come from a sane controller: it is ignored and
    /// `false` returned.
    pub fn update_head(&mut self, head: u16) -> bool {
        if head >= self.entries {
            return false;
        }
        let dist = |a: u16, b: u16| {
            if b >= a {
                b - a
            } else {
                self.entries - a + b
            }
        };
        if dist(self.head, head) > dist(self.head, self.tail) {
            return false;
        }
        self.head = head;
        true
    }

    /// Empty again, as after the queue is (re)created on the controller.
    pub fn reset(&mut self) {
        self.tail = 0;
        self.head = 0;
        self.rung = 0;
    }
}

/// A completion queue: `entries` 16-byte slots in `mem`, written by the controller.
pub struct CompletionQueue<M> {
    mem: M,
    qid: u16,
    entries: u16,
    head: u16,
    /// The phase tag of a new entry at `head`.
    phase: bool,
    /// Entries consumed since the head doorbell was last written.
    unrung: bool,
}

impl<M: DmaMem> CompletionQueue<M> {
    /// A queue over `mem`, which is cleared: a phase tag of 0 everywhere means empty.
    pub fn new(qid: u16, mem: M, entries: u16) -> CompletionQueue<M> {
        let fits = (mem.len() / CQE_SIZE).min(usize::from(u16::MAX)) as u16;
        let mut cq = CompletionQueue {
            mem,
            qid,
            entries: entries.min(fits).max(MIN_ENTRIES),
            head: 0,
            phase: true,
            unrung: false,
        };
        cq.reset();
        cq
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn entries(&self) -> u16 {
        self.entries
    }

    pub fn iova(&self) -> u64 {
        self.mem.iova()
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    /// The phase a new entry at the head carries.
    pub fn phase(&self) -> bool {
        self.phase
    }

    /// The entry at the head if the controller has posted it.
    pub fn peek(&self) -> Option<CqEntry> {
        let off = usize::from(self.head) * CQE_SIZE;
        let mut status = [0u8; 2];
        self.mem.read(off + 14, &mut status);
        if (status[0] & 1 == 1) != self.phase {
            return None;
        }
        // The rest of the entry was written before its phase tag: read it only now.
        fence(Ordering::Acquire);
        let mut b = [0u8; CQE_SIZE];
        self.mem.read(off, &mut b);
        let mut e = CqEntry::parse(&b);
        // The status as read first decided that the entry is new; keep the two consistent.
        e.phase = self.phase;
        Some(e)
    }

    /// Takes the entry at the head, advancing it (and flipping the phase at the wrap).
    pub fn pop(&mut self) -> Option<CqEntry> {
        let e = self.peek()?;
        self.head += 1;
        if self.head >= self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.unrung = true;
        Some(e)
    }

    /// Writes the head doorbell if entries were consumed since the last time.
    pub fn ring(&mut self, db: &impl Doorbells) {
        if self.unrung {
            db.cq_head(self.qid, self.head);
            self.unrung = false;
        }
    }

    /// Empty again: cleared memory, head 0, phase 1.
    pub fn reset(&mut self) {
        self.mem.fill(0, usize::from(self.entries) * CQE_SIZE, 0);
        self.head = 0;
        self.phase = true;
        self.unrung = false;
    }
}

/// A command the controller holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outstanding {
    /// The submitter's tag.
    pub tag: u64,
    pub issued: Instant,
    /// An ABORT has been sent for it.
    pub aborting: bool,
}

/// A completed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub tag: u64,
    pub cid: u16,
    pub status: Status,
    /// Command specific result (DW0).
    pub dw0: u32,
}

/// A submission queue, its completion queue and the commands outstanding on them.
pub struct QueuePair<M> {
    pub sq: SubmissionQueue<M>,
    pub cq: CompletionQueue<M>,
    /// Indexed by command identifier.
    slots: Vec<Option<Outstanding>>,
    free_cids: Vec<u16>,
    /// Completions naming no outstanding command (a confused controller), dropped.
    spurious: u64,
}

impl<M: DmaMem> QueuePair<M> {
    /// A pair with SQ and CQ of `entries` slots each, sharing `qid`.
    pub fn new(qid: u16, sq_mem: M, cq_mem: M, entries: u16) -> QueuePair<M> {
        let sq = SubmissionQueue::new(qid, sq_mem, entries);
        let cq = CompletionQueue::new(qid, cq_mem, entries);
        let n = sq.entries().min(cq.entries()) - 1;
        let mut free_cids = Vec::with_capacity(usize::from(n));
        // Lowest identifiers on top, taken first.
        free_cids.extend((0..n).rev());
        QueuePair {
            sq,
            cq,
            slots: vec![None; usize::from(n)],
            free_cids,
            spurious: 0,
        }
    }

    pub fn qid(&self) -> u16 {
        self.sq.qid()
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free_cids.len()
    }

    /// How many commands can be outstanding at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn spurious(&self) -> u64 {
        self.spurious
    }

    /// Takes a command identifier for a command about to be built (its PRP list slot
    /// follows from it); give it back with [`release_cid`](QueuePair::release_cid) if the
    /// command is not submitted after all.
    pub fn reserve_cid(&mut self) -> Result<u16, QueueError> {
        if self.sq.is_full() {
            return Err(QueueError::Full);
        }
        self.free_cids.pop().ok_or(QueueError::NoCid)
    }

    pub fn release_cid(&mut self, cid: u16) {
        if usize::from(cid) < self.slots.len()
            && self.slots[usize::from(cid)].is_none()
            && !self.free_cids.contains(&cid)
        {
            self.free_cids.push(cid);
        }
    }

    /// Submits `e` under the reserved `cid` (not rung yet: see [`flush`](QueuePair::flush)).
    pub fn submit_reserved(
        &mut self,
        cid: u16,
        mut e: SqEntry,
        tag: u64,
        now: Instant,
    ) -> Result<(), QueueError> {
        e.set_cid(cid);
        if let Err(err) = self.sq.push(&e) {
            self.release_cid(cid);
            return Err(err);
        }
        if let Some(s) = self.slots.get_mut(usize::from(cid)) {
            *s = Some(Outstanding {
                tag,
                issued: now,
                aborting: false,
            });
        }
        Ok(())
    }

    /// Submits `e` under a new command identifier, which it returns.
    pub fn submit(&mut self, e: SqEntry, tag: u64, now: Instant) -> Result<u16, QueueError> {
        let cid = self.reserve_cid()?;
        self.submit_reserved(cid, e, tag, now)?;
        Ok(cid)
    }

    /// Rings the SQ doorbell for what was submitted since the last flush.
    pub fn flush(&mut self, db: &impl Doorbells) {
        self.sq.ring(db);
    }

    /// Takes the posted completions into `out`, at most a queue's worth (a controller that
    /// keeps posting cannot hold the reactor here), then rings the CQ doorbell once. Returns
    /// how many commands completed.
    pub fn poll(&mut self, db: &impl Doorbells, out: &mut Vec<Done>) -> usize {
        let mut n = 0;
        for _ in 0..self.cq.entries() {
            let Some(c) = self.cq.pop() else {
                break;
            };
            self.sq.update_head(c.sq_head);
            match self
                .slots
                .get_mut(usize::from(c.cid))
                .and_then(Option::take)
            {
                Some(o) => {
                    self.free_cids.push(c.cid);
                    out.push(Done {
                        tag: o.tag,
                        cid: c.cid,
                        status: c.status,
                        dw0: c.dw0,
                    });
                    n += 1;
                }
                None => self.spurious += 1,
            }
        }
        self.cq.ring(db);
        n
    }

    pub fn get(&self, cid: u16) -> Option<&Outstanding> {
        self.slots.get(usize::from(cid)).and_then(Option::as_ref)
    }

    /// The oldest outstanding command issued more than `timeout` before `now` that matches
    /// `aborting`.
    pub fn expired(&self, now: Instant, timeout: Duration, aborting: bool) -> Option<u16> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(cid, s)| s.map(|o| (cid, o)))
            .filter(|(_, o)| {
                o.aborting == aborting && now.saturating_duration_since(o.issued) > timeout
            })
            .min_by_key(|(_, o)| o.issued)
            .map(|(cid, _)| cid as u16)
    }

    /// Notes that an ABORT went out for `cid`, restarting its clock.
    pub fn mark_aborting(&mut self, cid: u16, now: Instant) {
        if let Some(Some(o)) = self.slots.get_mut(usize::from(cid)) {
            o.aborting = true;
            o.issued = now;
        }
    }

    /// Ends every outstanding command with `status` (the controller was reset and forgot
    /// them) and empties both queues, ready to be created again.
    pub fn drain(&mut self, status: Status, out: &mut Vec<Done>) -> usize {
        let mut n = 0;
        for (cid, s) in self.slots.iter_mut().enumerate() {
            if let Some(o) = s.take() {
                self.free_cids.push(cid as u16);
                out.push(Done {
                    tag: o.tag,
                    cid: cid as u16,
                    status,
                    dw0: 0,
                });
                n += 1;
            }
        }
        self.sq.reset();
        self.cq.reset();
        n
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bdev::nvme::spec::{sc, sct};
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Plain memory for queue tests.
    #[derive(Clone)]
    pub(crate) struct Plain(pub Rc<RefCell<Vec<u8>>>, pub u64);

    impl Plain {
        pub(crate) fn new(len: usize) -> Plain {
            Plain(Rc::new(RefCell::new(vec![0; len])), 0x10_0000)
        }
    }

    impl DmaMem for Plain {
        fn iova(&self) -> u64 {
            self.1
        }
        fn len(&self) -> usize {
            self.0.borrow().len()
        }
        fn read(&self, off: usize, dst: &mut [u8]) {
            if let Some(s) = self.0.borrow().get(off..off + dst.len()) {
                dst.copy_from_slice(s);
            }
        }
        fn write(&self, off: usize, src: &[u8]) {
            if let Some(d) = self.0.borrow_mut().get_mut(off..off + src.len()) {
                d.copy_from_slice(src);
            }
        }
    }

    /// Records doorbell writes.
    #[derive(Default)]
    pub(crate) struct Bells(pub RefCell<Vec<(char, u16, u16)>>);

    impl Doorbells for Bells {
        fn sq_tail(&self, qid: u16, tail: u16) {
            self.0.borrow_mut().push(('s', qid, tail));
        }
        fn cq_head(&self, qid: u16, head: u16) {
            self.0.borrow_mut().push(('c', qid, head));
        }
    }

    /// Plays the controller: posts a completion at CQ slot `slot` with `phase`.
    fn post(cq: &Plain, slot: u16, cid: u16, sq_head: u16, phase: bool, status: Status) {
        let e = CqEntry {
            dw0: 0,
            sq_head,
            sq_id: 1,
            cid,
            phase,
            status,
        };
        cq.write(usize::from(slot) * CQE_SIZE, &e.to_bytes());
    }

    #[test]
    fn sq_full_leaves_one_slot_empty_and_wraps() {
        let mem = Plain::new(4 * SQE_SIZE);
        let mut sq = SubmissionQueue::new(1, mem.clone(), 4);
        let bells = Bells::default();
        for i in 0..3 {
            sq.push(&SqEntry::flush(i)).unwrap();
        }
        assert!(sq.is_full());
        assert_eq!(sq.push(&SqEntry::flush(9)), Err(QueueError::Full));
        assert_eq!(sq.used(), 3);
        sq.ring(&bells);
        sq.ring(&bells);
        assert_eq!(*bells.0.borrow(), [('s', 1, 3)], "rung once, with the tail");
        // The controller fetched two: two slots free, and the tail wraps past the end.
        assert!(sq.update_head(2));
        sq.push(&SqEntry::flush(10)).unwrap();
        assert_eq!(sq.tail(), 0);
        sq.push(&SqEntry::flush(11)).unwrap();
        assert_eq!(sq.tail(), 1);
        assert!(sq.is_full());
        // Entry 11 landed in slot 0.
        let mut b = [0u8; SQE_SIZE];
        mem.read(0, &mut b);
        assert_eq!(SqEntry::from_bytes(&b).nsid(), 11);
        // The controller fetched one more; a head outside the ring is nonsense and ignored.
        assert!(sq.update_head(3));
        assert!(!sq.update_head(102));
        assert_eq!(sq.head(), 3);
        let mut sq2 = SubmissionQueue::new(1, Plain::new(4 * SQE_SIZE), 4);
        sq2.push(&SqEntry::flush(1)).unwrap();
        assert!(!sq2.update_head(3), "past the tail");
        assert!(sq2.update_head(1));
    }

    #[test]
    fn completions_flip_phase_at_the_wrap() {
        let cqm = Plain::new(4 * CQE_SIZE);
        let mut qp = QueuePair::new(1, Plain::new(4 * SQE_SIZE), cqm.clone(), 4);
        let bells = Bells::default();
        let now = Instant::now();
        let mut out = Vec::new();
        let mut slot = 0u16;
        let mut phase = true;
        // Eleven commands through a four-entry queue: the CQ wraps twice.
        for round in 0..11u64 {
            let cid = qp.submit(SqEntry::flush(1), round, now).unwrap();
            qp.flush(&bells);
            assert_eq!(qp.poll(&bells, &mut out), 0, "nothing posted yet");
            post(&cqm, slot, cid, qp.sq.tail(), phase, Status::SUCCESS);
            assert_eq!(qp.poll(&bells, &mut out), 1);
            assert_eq!(out.last().map(|d| d.tag), Some(round));
            slot += 1;
            if slot == 4 {
                slot = 0;
                phase = !phase;
            }
            assert_eq!(qp.cq.phase(), phase);
            assert_eq!(qp.cq.head(), slot);
        }
        assert_eq!(qp.outstanding(), 0);
        // A stale entry (old phase) in the next slot is not taken.
        assert_eq!(qp.poll(&bells, &mut out), 0);
        assert_eq!(qp.spurious(), 0);
        assert!(
            bells.0.borrow().contains(&('c', 1, 0)),
            "head doorbell wrapped"
        );
    }

    #[test]
    fn command_ids_are_bounded_and_reused() {
        let cqm = Plain::new(4 * CQE_SIZE);
        let mut qp = QueuePair::new(2, Plain::new(4 * SQE_SIZE), cqm.clone(), 4);
        let now = Instant::now();
        let bells = Bells::default();
        let a = qp.submit(SqEntry::flush(1), 1, now).unwrap();
        let b = qp.submit(SqEntry::flush(1), 2, now).unwrap();
        let c = qp.submit(SqEntry::flush(1), 3, now).unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(qp.submit(SqEntry::flush(1), 4, now), Err(QueueError::Full));
        // The controller fetched all three (SQ head 3) and completed the second.
        post(
            &cqm,
            0,
            b,
            3,
            true,
            Status::new(sct::MEDIA, sc::WRITE_FAULT),
        );
        // And a completion for an identifier nobody holds.
        post(&cqm, 1, 2000, 3, true, Status::SUCCESS);
        let mut out = Vec::new();
        assert_eq!(qp.poll(&bells, &mut out), 1);
        assert_eq!(out[0].tag, 2);
        assert_eq!(out[0].status.sc(), sc::WRITE_FAULT);
        assert_eq!(qp.spurious(), 1);
        assert_eq!(qp.outstanding(), 2);
        // Only the one freed identifier is available again: the queue has room, ids do not.
        assert_eq!(qp.submit(SqEntry::flush(1), 5, now), Ok(b));
        assert_eq!(qp.reserve_cid(), Err(QueueError::NoCid));
        // A reset ends the rest with the given status.
        out.clear();
        let aborted = Status::new(sct::GENERIC, sc::ABORTED_SQ_DELETION);
        assert_eq!(qp.drain(aborted, &mut out), 3);
        assert!(out.iter().all(|d| d.status == aborted));
        assert_eq!(qp.outstanding(), 0);
        assert_eq!((qp.sq.tail(), qp.cq.head(), qp.cq.phase()), (0, 0, true));
    }

    #[test]
    fn timeouts_pick_the_oldest() {
        let mut qp = QueuePair::new(1, Plain::new(8 * SQE_SIZE), Plain::new(8 * CQE_SIZE), 8);
        let t0 = Instant::now();
        let a = qp.submit(SqEntry::flush(1), 1, t0).unwrap();
        let b = qp
            .submit(SqEntry::flush(1), 2, t0 + Duration::from_secs(1))
            .unwrap();
        let to = Duration::from_secs(5);
        assert_eq!(qp.expired(t0 + Duration::from_secs(5), to, false), None);
        assert_eq!(qp.expired(t0 + Duration::from_secs(7), to, false), Some(a));
        qp.mark_aborting(a, t0 + Duration::from_secs(7));
        assert_eq!(qp.expired(t0 + Duration::from_secs(7), to, false), Some(b));
        assert_eq!(qp.expired(t0 + Duration::from_secs(7), to, true), None);
        assert_eq!(qp.expired(t0 + Duration::from_secs(13), to, true), Some(a));
    }
}

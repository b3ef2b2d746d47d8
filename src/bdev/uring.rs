//! One io_uring per reactor, shared by every file and block backend that reactor serves.
//!
//! Backends queue operations ([`RingOp`]) with [`Ring::submit`]; the SQEs go into the
//! submission queue at once but the kernel only hears of them in [`Ring::poll`], so every SQE
//! produced during one reactor pass costs a single `io_uring_enter`. `poll` also reaps the
//! completion queue (no system call when nothing is pending) and hands each CQE to its
//! operation, which may ask to be resubmitted (short transfer, EAGAIN, ECANCELED) or finish.
//!
//! The ring is created with COOP_TASKRUN and TASKRUN_FLAG where the kernel has them: the
//! kernel then raises a flag in the SQ ring when completions wait for task work, and `poll`
//! enters the kernel only when there is something to submit or that flag is up.

use std::cell::RefCell;
use std::collections::VecDeque;

use io_uring::{squeue, IoUring};
use log::warn;

/// SQ entries per ring; the CQ gets twice as many.
const RING_ENTRIES: u32 = 256;

/// What a completion means to its operation.
pub(crate) enum Step {
    /// The operation is over: take it out and call [`RingOp::finish`].
    Done,
    /// Submit part `sub` again (the rest of a short transfer, or a retry).
    Resubmit(u32),
    /// Other parts of the operation are still in flight.
    Wait,
}

/// An operation that lives on the ring until its last CQE.
pub(crate) trait RingOp {
    /// The SQEs of part `sub`, or of every part when `sub` is `None`, in `out` as
    /// (part, entry) pairs. The ring sets the user data.
    fn prepare(&mut self, sub: Option<u32>, out: &mut Vec<(u32, squeue::Entry)>);
    /// One CQE of part `sub` with its result (`res` is a negated errno on failure).
    fn complete(&mut self, sub: u32, res: i32) -> Step;
    /// Delivers the outcome.
    fn finish(self: Box<Self>);
}

struct Inner {
    // Declared first: dropped first. `Ring::drop` has waited for every CQE by then, so the
    // kernel no longer touches the memory the operations below own.
    uring: IoUring,
    ops: Vec<Option<Box<dyn RingOp>>>,
    free: Vec<u32>,
    /// SQEs that did not fit in the submission queue, pushed at the next `poll`.
    backlog: VecDeque<squeue::Entry>,
    scratch: Vec<(u32, squeue::Entry)>,
    inflight: usize,
}

/// A reactor's io_uring. Not `Send`: it stays on the thread that uses it.
pub struct Ring {
    inner: RefCell<Inner>,
}

fn user_data(slot: u32, sub: u32) -> u64 {
    (u64::from(sub) << 32) | u64::from(slot)
}

impl Ring {
    pub fn new() -> std::io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        Ok(Ring {
            inner: RefCell::new(Inner {
                uring,
                ops: Vec::new(),
                free: Vec::new(),
                backlog: VecDeque::new(),
                scratch: Vec::new(),
                inflight: 0,
            }),
        })
    }

    /// Operations submitted and not yet finished.
    pub fn inflight(&self) -> usize {
        self.inner.borrow().inflight
    }

    /// Queues an operation; the kernel sees it at the next [`poll`](Ring::poll).
    pub(crate) fn submit(&self, mut op: Box<dyn RingOp>) {
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let slot = match inner.free.pop() {
            Some(s) => s,
            None => {
                inner.ops.push(None);
                (inner.ops.len() - 1) as u32
            }
        };
        let mut sqes = std::mem::take(&mut inner.scratch);
        sqes.clear();
        op.prepare(None, &mut sqes);
        if sqes.is_empty() {
            // Nothing for the kernel to do (the operation finished while preparing).
            inner.free.push(slot);
            inner.scratch = sqes;
            drop(g);
            op.finish();
            return;
        }
        inner.ops[slot as usize] = Some(op);
        inner.inflight += 1;
        for (sub, e) in sqes.drain(..) {
            inner.push(e.user_data(user_data(slot, sub)));
        }
        inner.scratch = sqes;
    }

    /// Submits what is queued and handles every completion that has arrived. Returns how
    /// many operations finished.
    pub fn poll(&self) -> usize {
        let mut finished: Vec<Box<dyn RingOp>> = Vec::new();
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            if inner.inflight == 0 && inner.backlog.is_empty() {
                return 0;
            }
            inner.enter(false);
            inner.reap(&mut finished);
            // Resubmissions made while reaping go out now rather than a pass later.
            if !inner.uring.submission().is_empty() {
                inner.enter(false);
            }
        }
        let n = finished.len();
        for op in finished {
            op.finish();
        }
        n
    }

    /// Blocks until at least one completion arrives (or nothing is in flight), then handles
    /// the completions as [`poll`](Ring::poll) does.
    pub fn wait(&self) -> usize {
        {
            let mut g = self.inner.borrow_mut();
            if g.inflight == 0 {
                return 0;
            }
            g.enter(true);
        }
        self.poll()
    }
}

impl Inner {
    fn push(&mut self, e: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(e);
            return;
        }
        // SAFETY: every SQE pushed here points at memory (iovec arrays and the data buffers
        // they describe) owned by the operation in `ops`, which stays in place until its last
        // CQE has been reaped; `Ring::drop` waits for those CQEs before anything is freed.
        if unsafe { self.uring.submission().push(&e) }.is_err() {
            self.backlog.push_back(e);
        }
    }

    /// Hands the queued SQEs to the kernel; with `wait`, also waits for one completion.
    fn enter(&mut self, wait: bool) {
        while let Some(e) = self.backlog.pop_front() {
            // SAFETY: as in `push`: the operation owning the memory stays in `ops`.
            if unsafe { self.uring.submission().push(&e) }.is_err() {
                self.backlog.push_front(e);
                break;
            }
        }
        let mut sq = self.uring.submission();
        sq.sync();
        let pending = !sq.is_empty();
        let taskrun = sq.taskrun() || sq.cq_overflow();
        drop(sq);
        if !pending && !taskrun && !wait {
            return;
        }
        let r = if wait {
            self.uring.submit_and_wait(1)
        } else {
            self.uring.submit()
        };
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)
                ) => {}
            Err(e) => warn!("io_uring_enter failed: {e}"),
        }
    }

    fn reap(&mut self, finished: &mut Vec<Box<dyn RingOp>>) {
        let mut again = std::mem::take(&mut self.scratch);
        again.clear();
        loop {
            let cqes: Vec<(u64, i32)> = self
                .uring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if cqes.is_empty() {
                break;
            }
            for (ud, res) in cqes {
                let slot = (ud & 0xffff_ffff) as usize;
                let sub = (ud >> 32) as u32;
                let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
                    warn!("io_uring: completion for unknown operation {ud:#x}");
                    continue;
                };
                match op.complete(sub, res) {
                    Step::Done => {
                        if let Some(op) = self.ops[slot].take() {
                            finished.push(op);
                        }
                        self.free.push(slot as u32);
                        self.inflight -= 1;
                    }
                    Step::Resubmit(sub) => {
                        op.prepare(Some(sub), &mut again);
                        for (s, e) in again.drain(..) {
                            let e = e.user_data(user_data(slot as u32, s));
                            self.push(e);
                        }
                    }
                    Step::Wait => {}
                }
            }
        }
        self.scratch = again;
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still be reading or writing buffers the operations own: wait for
        // every CQE before they (and the ring) are freed.
        let mut spins = 0u32;
        while self.inflight() > 0 {
            self.wait();
            spins += 1;
            if spins > 1_000_000 {
                warn!(
                    "io_uring: giving up waiting for {} operations",
                    self.inflight()
                );
                // Leak the operations rather than free memory the kernel may still use.
                let inner = self.inner.get_mut();
                for op in inner.ops.drain(..).flatten() {
                    std::mem::forget(op);
                }
                break;
            }
        }
    }
}

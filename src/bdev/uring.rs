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
//!
//! Its entries are 128-byte SQEs and 32-byte CQEs (SQE128, CQE32, Linux 5.19) where the
//! kernel takes them: NVMe passthrough (`IORING_OP_URING_CMD` on `/dev/ngXnY`) carries the
//! 64-byte NVMe command in the big SQE and works only on such a ring. Plain operations
//! ([`Sqe::Std`]) go into either kind; on a kernel that refuses SQE128 the ring has 64-byte
//! entries, file I/O works as before, and a [`Sqe::Cmd`] completes at once with
//! `-EOPNOTSUPP` (the passthrough device refuses to open there in the first place:
//! [`supports_cmd`]).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::OnceLock;

use io_uring::{cqueue, squeue, IoUring};
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

/// A submission entry: a plain 64-byte one, or a 128-byte one whose second half carries a
/// command (`IORING_OP_URING_CMD` with an 80-byte command area).
pub(crate) enum Sqe {
    Std(squeue::Entry),
    Cmd(squeue::Entry128),
}

impl From<squeue::Entry> for Sqe {
    fn from(e: squeue::Entry) -> Sqe {
        Sqe::Std(e)
    }
}

impl From<squeue::Entry128> for Sqe {
    fn from(e: squeue::Entry128) -> Sqe {
        Sqe::Cmd(e)
    }
}

impl Sqe {
    fn with_user_data(self, ud: u64) -> Sqe {
        match self {
            Sqe::Std(e) => Sqe::Std(e.user_data(ud)),
            Sqe::Cmd(e) => Sqe::Cmd(e.user_data(ud)),
        }
    }

    fn user_data(&self) -> u64 {
        match self {
            Sqe::Std(e) => e.get_user_data(),
            Sqe::Cmd(e) => e.get_user_data(),
        }
    }
}

/// Whether this kernel sets up rings with 128-byte SQEs and 32-byte CQEs (Linux 5.19), which
/// NVMe passthrough needs. Probed once per process with a small ring.
pub fn supports_cmd() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        IoUring::<squeue::Entry128, cqueue::Entry32>::builder()
            .build(2)
            .is_ok()
    })
}

/// The ring itself: with big entries where the kernel has them, else plain ones.
enum Uring {
    Big(IoUring<squeue::Entry128, cqueue::Entry32>),
    Std(IoUring),
}

impl Uring {
    fn new(big: bool) -> std::io::Result<Uring> {
        if big {
            let r = IoUring::<squeue::Entry128, cqueue::Entry32>::builder()
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(RING_ENTRIES)
                .or_else(|_| {
                    IoUring::<squeue::Entry128, cqueue::Entry32>::builder().build(RING_ENTRIES)
                });
            if let Ok(r) = r {
                return Ok(Uring::Big(r));
            }
        }
        let r = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        Ok(Uring::Std(r))
    }

    /// Pushes `e` into the submission queue; hands it back when the queue is full. A command
    /// entry on a plain ring is handed back too: [`Inner::push`] never offers one.
    ///
    /// # Safety
    /// Whatever `e` points at (buffers, iovecs, command data) stays valid until its CQE.
    unsafe fn push(&mut self, e: Sqe) -> Option<Sqe> {
        match (self, e) {
            (Uring::Big(r), Sqe::Std(e)) => {
                let big = squeue::Entry128::from(e);
                // SAFETY: the caller's contract.
                unsafe { r.submission().push(&big) }
                    .err()
                    .map(|_| Sqe::Cmd(big))
            }
            (Uring::Big(r), Sqe::Cmd(e)) => {
                // SAFETY: the caller's contract.
                unsafe { r.submission().push(&e) }
                    .err()
                    .map(|_| Sqe::Cmd(e))
            }
            (Uring::Std(r), Sqe::Std(e)) => {
                // SAFETY: the caller's contract.
                unsafe { r.submission().push(&e) }
                    .err()
                    .map(|_| Sqe::Std(e))
            }
            (Uring::Std(_), e @ Sqe::Cmd(_)) => Some(e),
        }
    }

    /// Syncs the submission queue; (entries pending, task work or CQ overflow flagged).
    fn sq_state(&mut self) -> (bool, bool) {
        match self {
            Uring::Big(r) => {
                let mut sq = r.submission();
                sq.sync();
                (!sq.is_empty(), sq.taskrun() || sq.cq_overflow())
            }
            Uring::Std(r) => {
                let mut sq = r.submission();
                sq.sync();
                (!sq.is_empty(), sq.taskrun() || sq.cq_overflow())
            }
        }
    }

    fn sq_is_empty(&mut self) -> bool {
        match self {
            Uring::Big(r) => r.submission().is_empty(),
            Uring::Std(r) => r.submission().is_empty(),
        }
    }

    fn submit(&self, wait: usize) -> std::io::Result<usize> {
        match self {
            Uring::Big(r) => r.submit_and_wait(wait),
            Uring::Std(r) => r.submit_and_wait(wait),
        }
    }

    /// Moves the completions that have arrived into `out` as (user data, result).
    fn reap_into(&mut self, out: &mut Vec<(u64, i32)>) {
        match self {
            Uring::Big(r) => out.extend(r.completion().map(|c| (c.user_data(), c.result()))),
            Uring::Std(r) => out.extend(r.completion().map(|c| (c.user_data(), c.result()))),
        }
    }
}

/// An operation that lives on the ring until its last CQE.
pub(crate) trait RingOp {
    /// The SQEs of part `sub`, or of every part when `sub` is `None`, in `out` as
    /// (part, entry) pairs. The ring sets the user data.
    fn prepare(&mut self, sub: Option<u32>, out: &mut Vec<(u32, Sqe)>);
    /// One CQE of part `sub` with its result (`res` is a negated errno on failure).
    fn complete(&mut self, sub: u32, res: i32) -> Step;
    /// Delivers the outcome.
    fn finish(self: Box<Self>);
}

struct Inner {
    // Declared first: dropped first. `Ring::drop` has waited for every CQE by then, so the
    // kernel no longer touches the memory the operations below own.
    uring: Uring,
    ops: Vec<Option<Box<dyn RingOp>>>,
    free: Vec<u32>,
    /// SQEs that did not fit in the submission queue, pushed at the next `poll`.
    backlog: VecDeque<Sqe>,
    scratch: Vec<(u32, Sqe)>,
    /// Completions made up by the ring itself (a command entry on a plain ring), handed to
    /// their operations at the next reap as if the kernel had posted them.
    synthetic: Vec<(u64, i32)>,
    /// The CQEs of one reap (kept: no allocation per poll).
    cqes: Vec<(u64, i32)>,
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
    /// A ring with big entries where the kernel has them ([`supports_cmd`]).
    pub fn new() -> std::io::Result<Ring> {
        Ring::with_big_entries(supports_cmd())
    }

    /// A ring with 128-byte SQEs and 32-byte CQEs when `big` (and the kernel takes them),
    /// else with plain entries.
    pub fn with_big_entries(big: bool) -> std::io::Result<Ring> {
        Ok(Ring {
            inner: RefCell::new(Inner {
                uring: Uring::new(big)?,
                ops: Vec::new(),
                free: Vec::new(),
                backlog: VecDeque::new(),
                scratch: Vec::new(),
                synthetic: Vec::new(),
                cqes: Vec::new(),
                inflight: 0,
            }),
        })
    }

    /// Whether the ring takes command entries ([`Sqe::Cmd`]).
    pub fn has_big_entries(&self) -> bool {
        matches!(self.inner.borrow().uring, Uring::Big(_))
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
            inner.push(e.with_user_data(user_data(slot, sub)));
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
            if !inner.uring.sq_is_empty() {
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
    fn push(&mut self, e: Sqe) {
        if let (Uring::Std(_), Sqe::Cmd(_)) = (&self.uring, &e) {
            // This ring cannot carry the command: it fails as the kernel would fail it.
            self.synthetic.push((e.user_data(), -libc::EOPNOTSUPP));
            return;
        }
        if !self.backlog.is_empty() {
            self.backlog.push_back(e);
            return;
        }
        // SAFETY: every SQE pushed here points at memory (iovec arrays, command data and the
        // data buffers they describe) owned by the operation in `ops`, which stays in place
        // until its last CQE has been reaped; `Ring::drop` waits for those CQEs before
        // anything is freed.
        if let Some(e) = unsafe { self.uring.push(e) } {
            self.backlog.push_back(e);
        }
    }

    /// Hands the queued SQEs to the kernel; with `wait`, also waits for one completion.
    fn enter(&mut self, wait: bool) {
        while let Some(e) = self.backlog.pop_front() {
            // SAFETY: as in `push`: the operation owning the memory stays in `ops`.
            if let Some(e) = unsafe { self.uring.push(e) } {
                self.backlog.push_front(e);
                break;
            }
        }
        let (pending, taskrun) = self.uring.sq_state();
        // A made-up completion is already there to be reaped: nothing to wait for.
        let wait = wait && self.synthetic.is_empty();
        if !pending && !taskrun && !wait {
            return;
        }
        let r = self.uring.submit(usize::from(wait));
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
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.append(&mut self.synthetic);
            self.uring.reap_into(&mut cqes);
            if cqes.is_empty() {
                break;
            }
            for &(ud, res) in &cqes {
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
                            let e = e.with_user_data(user_data(slot as u32, s));
                            self.push(e);
                        }
                    }
                    Step::Wait => {}
                }
            }
        }
        self.cqes = cqes;
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

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;
    use std::rc::Rc;

    /// One NOP and one command entry; records each part's result.
    struct Probe {
        results: Rc<RefCell<Vec<(u32, i32)>>>,
        left: u32,
    }

    impl RingOp for Probe {
        fn prepare(&mut self, _sub: Option<u32>, out: &mut Vec<(u32, Sqe)>) {
            out.push((0, opcode::Nop::new().build().into()));
            // No such descriptor: a ring that passes the command on gets EBADF from the
            // kernel, one that cannot gets EOPNOTSUPP from `Inner::push`.
            let fd = -1;
            out.push((
                1,
                opcode::UringCmd80::new(io_uring::types::Fd(fd), 0)
                    .build()
                    .into(),
            ));
        }
        fn complete(&mut self, sub: u32, res: i32) -> Step {
            self.results.borrow_mut().push((sub, res));
            self.left -= 1;
            if self.left == 0 {
                Step::Done
            } else {
                Step::Wait
            }
        }
        fn finish(self: Box<Self>) {}
    }

    fn run(ring: &Ring) -> Vec<(u32, i32)> {
        let results = Rc::new(RefCell::new(Vec::new()));
        ring.submit(Box::new(Probe {
            results: results.clone(),
            left: 2,
        }));
        let mut spins = 0;
        while ring.inflight() > 0 {
            ring.wait();
            spins += 1;
            assert!(spins < 1000, "the ring never completed both entries");
        }
        let mut r = results.borrow().clone();
        r.sort();
        r
    }

    #[test]
    fn a_plain_ring_fails_commands_and_serves_the_rest() {
        let ring = Ring::with_big_entries(false).unwrap();
        assert!(!ring.has_big_entries());
        assert_eq!(run(&ring), vec![(0, 0), (1, -libc::EOPNOTSUPP)]);
    }

    #[test]
    fn a_big_ring_carries_plain_entries_and_commands() {
        if !supports_cmd() {
            eprintln!("this kernel has no SQE128 rings: nothing to test");
            return;
        }
        let ring = Ring::new().unwrap();
        assert!(ring.has_big_entries());
        // The command reached the kernel, which found no such descriptor.
        assert_eq!(run(&ring), vec![(0, 0), (1, -libc::EBADF)]);
    }
}

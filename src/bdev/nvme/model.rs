//! A software model of an NVMe controller for the driver's tests: registers behind [`Regs`],
//! queues and data in a simulated DMA memory, commands processed when a doorbell is
//! written, one namespace in memory.
//!
//! It follows the specification where the driver relies on it (queue creation, phase tags,
//! SQ head reporting, PRP lists, the admin commands the driver sends, READ, WRITE, COMPARE,
//! FLUSH, WRITE ZEROES, DATASET MANAGEMENT) and can be told to misbehave: fail the next
//! command of an opcode with a status, never complete one, ignore ABORTs, raise CSTS.CFS,
//! never become ready.
//!
//! Its memory is a simulated arena, plus windows of real process memory that a test maps
//! the way the IOMMU maps the buffer pool ([`SimMem::map_window`]): block I/O through a
//! channel moves real pool buffers.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::controller::Clock;
use super::spec::{
    self, admin, cc, csts, nvm, reg, sc, sct, CqEntry, SqEntry, Status, CQE_SIZE, SQE_SIZE,
};
use super::{DmaAlloc, DmaMem, Regs};
use crate::env::Pool;

/// Where simulated DMA memory starts (above 4 GiB, so 64-bit addresses are exercised).
pub const BASE: u64 = 0x1_0000_0000;
const PAGE: u64 = 4096;

/// State shared between the model and the driver under test. A lock rather than a
/// `RefCell` only so that a device over the model can be a `BlockDev` (`Send + Sync`); the
/// tests are single-threaded.
pub struct Shared<T>(Arc<Mutex<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T> Shared<T> {
    pub fn new(t: T) -> Shared<T> {
        Shared(Arc::new(Mutex::new(t)))
    }
    pub fn borrow(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn borrow_mut(&self) -> MutexGuard<'_, T> {
        self.borrow()
    }
}

/// Simulated physical memory shared by the driver and the model, and the windows of
/// process memory the model may reach (addresses there are process addresses).
#[derive(Clone)]
pub struct SimMem(Shared<Vec<u8>>, Shared<Vec<&'static Pool>>);

impl SimMem {
    pub fn new(len: usize) -> SimMem {
        SimMem(Shared::new(vec![0; len]), Shared::new(Vec::new()))
    }

    /// Lets the model reach `pool`'s memory, as an IOMMU mapping of it would. The pool
    /// must belong to the test alone (a private pool, not the process's): the model then
    /// touches only buffers of that test.
    pub fn map_window(&self, pool: &'static Pool) {
        self.1.borrow_mut().push(pool);
    }

    /// The window holding `iova..iova + n`, as a pointer to its first byte.
    fn window(&self, iova: u64, n: usize) -> Option<*mut u8> {
        let end = iova.checked_add(n as u64)?;
        self.1.borrow().iter().find_map(|p| {
            let r = p.region();
            let base = r.addr().as_ptr() as u64;
            (iova >= base && end <= base + r.size() as u64).then_some(iova as *mut u8)
        })
    }

    /// Reads at a device address; `false` when it lies outside the memory.
    #[allow(unsafe_code)]
    pub fn read(&self, iova: u64, dst: &mut [u8]) -> bool {
        if let Some(p) = self.window(iova, dst.len()) {
            // SAFETY: the bytes lie inside a pool's mapping, which is never unmapped; the
            // pool is the test's own and the test is single-threaded, so the only buffers
            // there are the ones the driver under test holds while the model runs (within a
            // doorbell write), and nothing borrows them meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
            return true;
        }
        let m = self.0.borrow();
        match Self::range(iova, dst.len(), m.len()) {
            Some(r) => {
                dst.copy_from_slice(&m[r]);
                true
            }
            None => false,
        }
    }

    #[allow(unsafe_code)]
    pub fn write(&self, iova: u64, src: &[u8]) -> bool {
        if let Some(p) = self.window(iova, src.len()) {
            // SAFETY: as in `read`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
            return true;
        }
        let mut m = self.0.borrow_mut();
        let len = m.len();
        match Self::range(iova, src.len(), len) {
            Some(r) => {
                m[r].copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn range(iova: u64, n: usize, len: usize) -> Option<std::ops::Range<usize>> {
        let off = usize::try_from(iova.checked_sub(BASE)?).ok()?;
        let end = off.checked_add(n)?;
        (end <= len).then_some(off..end)
    }
}

/// A piece of [`SimMem`] handed to the driver.
#[derive(Clone)]
pub struct SimRegion {
    mem: SimMem,
    iova: u64,
    len: usize,
}

impl DmaMem for SimRegion {
    fn iova(&self) -> u64 {
        self.iova
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        if offset.saturating_add(dst.len()) <= self.len {
            self.mem.read(self.iova + offset as u64, dst);
        }
    }
    fn write(&self, offset: usize, src: &[u8]) {
        if offset.saturating_add(src.len()) <= self.len {
            self.mem.write(self.iova + offset as u64, src);
        }
    }
}

/// A bump allocator of page-aligned regions in [`SimMem`].
pub struct SimAlloc {
    mem: SimMem,
    next: u64,
    end: u64,
}

impl SimAlloc {
    pub fn new(mem: &SimMem) -> SimAlloc {
        let end = BASE + mem.0.borrow().len() as u64;
        SimAlloc {
            mem: mem.clone(),
            next: BASE,
            end,
        }
    }
}

impl DmaAlloc for SimAlloc {
    type Mem = SimRegion;
    fn alloc(&mut self, len: usize) -> std::io::Result<SimRegion> {
        let size = (len as u64).max(1).div_ceil(PAGE) * PAGE;
        if self.next + size > self.end {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        let r = SimRegion {
            mem: self.mem.clone(),
            iova: self.next,
            len,
        };
        self.next += size;
        Ok(r)
    }
}

/// A clock whose sleeps pass at once, moving its time on.
pub struct FakeClock(Cell<Instant>);

impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock(Cell::new(Instant::now()))
    }
    pub fn advance(&self, d: Duration) {
        self.0.set(self.0.get() + d);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.0.get()
    }
    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

struct Cq {
    base: u64,
    entries: u16,
    /// Where the next entry goes.
    tail: u16,
    /// As the host last reported.
    head: u16,
    phase: bool,
}

/// Faults to inject.
#[derive(Default)]
pub struct Faults {
    /// The next command with this opcode (I/O queues only) fails with this status.
    pub fail_next: Option<(u8, Status)>,
    /// The next command with this opcode (I/O queues only) is fetched and never completed.
    pub swallow_next: Option<u8>,
    /// ABORTs answer "not aborted" and leave the command alone.
    pub ignore_abort: bool,
    /// CSTS.CFS is set.
    pub fatal: bool,
    /// CSTS.RDY never rises.
    pub never_ready: bool,
}

/// The model's state; shared with [`ModelRegs`].
pub struct Model {
    mem: SimMem,
    pub cap: u64,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    /// I/O queues the controller offers.
    pub max_queues: u16,
    granted: u16,
    pub block_size: u32,
    pub data: Vec<u8>,
    pub oncs: u16,
    pub mdts: u8,
    pub faults: Faults,
    /// (sqid, cid, opcode) of swallowed commands.
    pub swallowed: Vec<(u16, u16, u8)>,
    /// Commands executed, by (queue kind, opcode): `true` for I/O queues.
    pub executed: BTreeMap<(bool, u8), u64>,
    /// Times CC.EN went from 1 to 0.
    pub disables: u64,
    /// Blocks deallocated.
    pub deallocated: u64,
    /// Normal shutdowns notified (CC.SHN) while enabled.
    pub shutdowns: u64,
}

/// The model's registers.
#[derive(Clone)]
pub struct ModelRegs(pub Shared<Model>);

impl Model {
    /// A controller with CAP.MQES + 1 = `mqes` entries, a namespace of `blocks` blocks of
    /// `block_size` bytes, over `mem`.
    pub fn start(mem: &SimMem, mqes: u16, block_size: u32, blocks: usize) -> ModelRegs {
        // TO = 2 (1 s), DSTRD = 0, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = u64::from(mqes - 1) | 1 << 16 | 2 << 24 | 1 << 37 | 4 << 52;
        ModelRegs(Shared::new(Model {
            mem: mem.clone(),
            cap,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            max_queues: 4,
            granted: 0,
            block_size,
            data: vec![0; block_size as usize * blocks],
            oncs: spec::oncs::COMPARE | spec::oncs::DSM | spec::oncs::WRITE_ZEROES,
            mdts: 0,
            faults: Faults::default(),
            swallowed: Vec::new(),
            executed: BTreeMap::new(),
            disables: 0,
            deallocated: 0,
            shutdowns: 0,
        }))
    }

    pub fn cc(&self) -> u32 {
        self.cc
    }

    pub fn aqa(&self) -> u32 {
        self.aqa
    }

    pub fn io_queues(&self) -> usize {
        self.sqs.keys().filter(|q| **q != 0).count()
    }

    pub fn count(&self, io: bool, opcode: u8) -> u64 {
        self.executed.get(&(io, opcode)).copied().unwrap_or(0)
    }

    fn ready(&self) -> bool {
        self.csts & csts::RDY != 0 && !self.faults.fatal
    }

    fn write_cc(&mut self, v: u32) {
        let was = self.cc & cc::EN != 0;
        let now = v & cc::EN != 0;
        self.cc = v;
        if was && !now {
            // Controller reset: every queue and command is gone.
            self.sqs.clear();
            self.cqs.clear();
            self.swallowed.clear();
            self.csts = 0;
            self.granted = 0;
            self.disables += 1;
            self.faults.fatal = false;
        } else if !was && now && !self.faults.never_ready {
            let asqs = (self.aqa & 0xfff) as u16 + 1;
            let acqs = ((self.aqa >> 16) & 0xfff) as u16 + 1;
            self.sqs.insert(
                0,
                Sq {
                    base: self.asq,
                    entries: asqs,
                    head: 0,
                    tail: 0,
                    cqid: 0,
                },
            );
            self.cqs.insert(
                0,
                Cq {
                    base: self.acq,
                    entries: acqs,
                    tail: 0,
                    head: 0,
                    phase: true,
                },
            );
            self.csts |= csts::RDY;
        }
        if now && v & cc::SHN_MASK == cc::SHN_NORMAL {
            self.shutdowns += 1;
            self.csts = (self.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
        }
    }

    fn doorbell(&mut self, off: usize, v: u32) {
        let stride = 4usize << ((self.cap >> 32) & 0xf);
        let idx = (off - reg::DOORBELLS) / stride;
        let qid = (idx / 2) as u16;
        if idx.is_multiple_of(2) {
            if let Some(q) = self.sqs.get_mut(&qid) {
                if v < u32::from(q.entries) {
                    q.tail = v as u16;
                }
            }
        } else if let Some(q) = self.cqs.get_mut(&qid) {
            if v < u32::from(q.entries) {
                q.head = v as u16;
            }
        }
        self.process();
    }

    /// Runs every fetched command whose completion fits in its CQ.
    fn process(&mut self) {
        if !self.ready() {
            return;
        }
        loop {
            let mut progressed = false;
            let qids: Vec<u16> = self.sqs.keys().copied().collect();
            for qid in qids {
                let Some(q) = self.sqs.get(&qid) else {
                    continue;
                };
                if q.head == q.tail {
                    continue;
                }
                let cqid = q.cqid;
                if self.cq_full(cqid) {
                    continue;
                }
                let mut b = [0u8; SQE_SIZE];
                self.mem
                    .read(q.base + u64::from(q.head) * SQE_SIZE as u64, &mut b);
                let q = self.sqs.get_mut(&qid).expect("present");
                q.head = if q.head + 1 >= q.entries {
                    0
                } else {
                    q.head + 1
                };
                let head = q.head;
                let e = SqEntry::from_bytes(&b);
                progressed = true;
                let result = if qid == 0 {
                    Some(self.admin(&e))
                } else {
                    self.io(qid, &e)
                };
                if let Some((status, dw0)) = result {
                    self.post(cqid, qid, head, e.cid(), status, dw0);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn cq_full(&self, cqid: u16) -> bool {
        self.cqs.get(&cqid).is_none_or(|c| {
            let next = if c.tail + 1 >= c.entries {
                0
            } else {
                c.tail + 1
            };
            next == c.head
        })
    }

    fn post(&mut self, cqid: u16, sqid: u16, sq_head: u16, cid: u16, status: Status, dw0: u32) {
        let Some(c) = self.cqs.get_mut(&cqid) else {
            return;
        };
        let e = CqEntry {
            dw0,
            sq_head,
            sq_id: sqid,
            cid,
            phase: c.phase,
            status,
        };
        self.mem
            .write(c.base + u64::from(c.tail) * CQE_SIZE as u64, &e.to_bytes());
        c.tail += 1;
        if c.tail >= c.entries {
            c.tail = 0;
            c.phase = !c.phase;
        }
    }

    fn admin(&mut self, e: &SqEntry) -> (Status, u32) {
        *self.executed.entry((false, e.opcode())).or_default() += 1;
        let ok = (Status::SUCCESS, 0);
        let specific = |c| (Status::new(sct::COMMAND_SPECIFIC, c), 0);
        let qid = (e.cdw[10] & 0xffff) as u16;
        let size = (e.cdw[10] >> 16) as u16;
        let mqes = (self.cap & 0xffff) as u16;
        match e.opcode() {
            admin::IDENTIFY => {
                let page = match e.cdw[10] & 0xff {
                    spec::CNS_CONTROLLER => self.identify_controller(),
                    spec::CNS_NAMESPACE if e.nsid() == 1 => self.identify_namespace(),
                    _ => {
                        return (
                            Status::new(sct::GENERIC, sc::INVALID_NAMESPACE_OR_FORMAT),
                            0,
                        )
                    }
                };
                match self.dma_out(e.prp1(), e.prp2(), &page) {
                    Ok(()) => ok,
                    Err(s) => (s, 0),
                }
            }
            admin::SET_FEATURES if e.cdw[10] & 0xff == spec::FEAT_NUMBER_OF_QUEUES => {
                let want = (e.cdw[11] & 0xffff) as u16 + 1;
                self.granted = want.min(self.max_queues);
                let z = u32::from(self.max_queues - 1);
                (Status::SUCCESS, z << 16 | z)
            }
            admin::CREATE_IO_CQ => {
                if qid == 0 || qid > self.granted || self.cqs.contains_key(&qid) {
                    return specific(sc::INVALID_QUEUE_ID);
                }
                if size > mqes {
                    return specific(0x02);
                }
                self.cqs.insert(
                    qid,
                    Cq {
                        base: e.prp1(),
                        entries: size + 1,
                        tail: 0,
                        head: 0,
                        phase: true,
                    },
                );
                ok
            }
            admin::CREATE_IO_SQ => {
                let cqid = (e.cdw[11] >> 16) as u16;
                if qid == 0 || qid > self.granted || self.sqs.contains_key(&qid) {
                    return specific(sc::INVALID_QUEUE_ID);
                }
                if !self.cqs.contains_key(&cqid) || cqid == 0 {
                    return specific(0x00);
                }
                if size > mqes {
                    return specific(0x02);
                }
                self.sqs.insert(
                    qid,
                    Sq {
                        base: e.prp1(),
                        entries: size + 1,
                        head: 0,
                        tail: 0,
                        cqid,
                    },
                );
                ok
            }
            admin::DELETE_IO_SQ => {
                if qid == 0 || self.sqs.remove(&qid).is_none() {
                    return specific(sc::INVALID_QUEUE_ID);
                }
                self.swallowed.retain(|s| s.0 != qid);
                ok
            }
            admin::DELETE_IO_CQ => {
                if qid == 0 || self.cqs.remove(&qid).is_none() {
                    return specific(sc::INVALID_QUEUE_ID);
                }
                ok
            }
            admin::ABORT => {
                let sqid = (e.cdw[10] & 0xffff) as u16;
                let cid = (e.cdw[10] >> 16) as u16;
                let pos = self
                    .swallowed
                    .iter()
                    .position(|s| s.0 == sqid && s.1 == cid);
                match pos {
                    Some(i) if !self.faults.ignore_abort => {
                        self.swallowed.remove(i);
                        let (cqid, head) = match self.sqs.get(&sqid) {
                            Some(q) => (q.cqid, q.head),
                            None => return (Status::SUCCESS, 1),
                        };
                        self.post(
                            cqid,
                            sqid,
                            head,
                            cid,
                            Status::new(sct::GENERIC, sc::ABORT_REQUESTED),
                            0,
                        );
                        (Status::SUCCESS, 0)
                    }
                    // Not aborted.
                    _ => (Status::SUCCESS, 1),
                }
            }
            _ => (Status::new(sct::GENERIC, sc::INVALID_OPCODE), 0),
        }
    }

    fn identify_controller(&self) -> Vec<u8> {
        let mut b = vec![0u8; spec::IDENTIFY_SIZE];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"MODEL-SERIAL-0001   ");
        let mn = b"iscsi-tgt NVMe model                    ";
        b[24..64].copy_from_slice(mn);
        b[64..72].copy_from_slice(b"1.0     ");
        b[77] = self.mdts;
        b[78..80].copy_from_slice(&1u16.to_le_bytes());
        b[512] = 0x66;
        b[513] = 0x44;
        b[516..520].copy_from_slice(&1u32.to_le_bytes());
        b[520..522].copy_from_slice(&self.oncs.to_le_bytes());
        b[525] = 1;
        b
    }

    fn identify_namespace(&self) -> Vec<u8> {
        let mut b = vec![0u8; spec::IDENTIFY_SIZE];
        let blocks = (self.data.len() / self.block_size as usize) as u64;
        b[0..8].copy_from_slice(&blocks.to_le_bytes());
        b[8..16].copy_from_slice(&blocks.to_le_bytes());
        b[24] = 1; // THINP
        b[25] = 0;
        b[26] = 0;
        b[33] = 1 | 1 << 3;
        b[104..120].copy_from_slice(&[0xab; 16]);
        b[120..128].copy_from_slice(&[0xcd; 8]);
        let lbads = self.block_size.trailing_zeros();
        b[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
        b
    }

    /// The (address, length) pieces PRP1/PRP2 describe for `len` bytes, as a controller
    /// follows them (Base §4.1.1).
    fn prp_pieces(&self, prp1: u64, prp2: u64, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        let bad_offset = Status::new(sct::GENERIC, 0x13);
        let xfer = Status::new(sct::GENERIC, sc::DATA_TRANSFER_ERROR);
        if prp1 & 3 != 0 {
            return Err(bad_offset);
        }
        let first = (PAGE - prp1 % PAGE).min(len as u64) as usize;
        let mut out = vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return Ok(out);
        }
        if left <= PAGE as usize {
            if !prp2.is_multiple_of(PAGE) {
                return Err(bad_offset);
            }
            out.push((prp2, left));
            return Ok(out);
        }
        let mut list = prp2;
        if list & 7 != 0 {
            return Err(bad_offset);
        }
        while left > 0 {
            let slots = ((PAGE - list % PAGE) / 8) as usize;
            let pages_left = left.div_ceil(PAGE as usize);
            let here = if pages_left > slots {
                slots - 1
            } else {
                pages_left
            };
            for k in 0..here {
                let mut a = [0u8; 8];
                if !self.mem.read(list + 8 * k as u64, &mut a) {
                    return Err(xfer);
                }
                let a = u64::from_le_bytes(a);
                if !a.is_multiple_of(PAGE) {
                    return Err(bad_offset);
                }
                let n = left.min(PAGE as usize);
                out.push((a, n));
                left -= n;
            }
            if left > 0 {
                let mut a = [0u8; 8];
                if !self.mem.read(list + 8 * (slots as u64 - 1), &mut a) {
                    return Err(xfer);
                }
                list = u64::from_le_bytes(a);
            }
        }
        Ok(out)
    }

    /// Device to host.
    fn dma_out(&self, prp1: u64, prp2: u64, data: &[u8]) -> Result<(), Status> {
        let mut at = 0;
        for (a, n) in self.prp_pieces(prp1, prp2, data.len())? {
            if !self.mem.write(a, &data[at..at + n]) {
                return Err(Status::new(sct::GENERIC, sc::DATA_TRANSFER_ERROR));
            }
            at += n;
        }
        Ok(())
    }

    /// Host to device.
    fn dma_in(&self, prp1: u64, prp2: u64, len: usize) -> Result<Vec<u8>, Status> {
        let mut v = vec![0u8; len];
        let mut at = 0;
        for (a, n) in self.prp_pieces(prp1, prp2, len)? {
            if !self.mem.read(a, &mut v[at..at + n]) {
                return Err(Status::new(sct::GENERIC, sc::DATA_TRANSFER_ERROR));
            }
            at += n;
        }
        Ok(v)
    }

    fn io(&mut self, qid: u16, e: &SqEntry) -> Option<(Status, u32)> {
        let op = e.opcode();
        if self.faults.swallow_next == Some(op) {
            self.faults.swallow_next = None;
            self.swallowed.push((qid, e.cid(), op));
            return None;
        }
        if let Some((fop, st)) = self.faults.fail_next {
            if fop == op {
                self.faults.fail_next = None;
                return Some((st, 0));
            }
        }
        *self.executed.entry((true, op)).or_default() += 1;
        Some((self.io_status(e), 0))
    }

    fn io_status(&mut self, e: &SqEntry) -> Status {
        if e.nsid() != 1 {
            return Status::new(sct::GENERIC, sc::INVALID_NAMESPACE_OR_FORMAT);
        }
        let bs = self.block_size as usize;
        let range = |slba: u64, nlb: u64| -> Option<std::ops::Range<usize>> {
            let end = slba.checked_add(nlb)?;
            let start = usize::try_from(slba).ok()?.checked_mul(bs)?;
            let end = usize::try_from(end).ok()?.checked_mul(bs)?;
            (end <= self.data.len()).then_some(start..end)
        };
        let out_of_range = Status::new(sct::GENERIC, sc::LBA_OUT_OF_RANGE);
        let oncs = |bit: u16, s: &Self| s.oncs & bit != 0;
        match e.opcode() {
            nvm::FLUSH => Status::SUCCESS,
            nvm::READ | nvm::WRITE | nvm::COMPARE | nvm::WRITE_ZEROES => {
                let nlb = u64::from(e.nlb());
                let Some(r) = range(e.slba(), nlb) else {
                    return out_of_range;
                };
                match e.opcode() {
                    nvm::READ => {
                        let d = self.data[r].to_vec();
                        self.dma_out(e.prp1(), e.prp2(), &d)
                            .err()
                            .unwrap_or(Status::SUCCESS)
                    }
                    nvm::WRITE => match self.dma_in(e.prp1(), e.prp2(), r.len()) {
                        Ok(d) => {
                            self.data[r].copy_from_slice(&d);
                            Status::SUCCESS
                        }
                        Err(s) => s,
                    },
                    nvm::COMPARE if oncs(spec::oncs::COMPARE, self) => {
                        match self.dma_in(e.prp1(), e.prp2(), r.len()) {
                            Ok(d) if d == self.data[r] => Status::SUCCESS,
                            Ok(_) => Status::new(sct::MEDIA, sc::COMPARE_FAILURE),
                            Err(s) => s,
                        }
                    }
                    nvm::WRITE_ZEROES if oncs(spec::oncs::WRITE_ZEROES, self) => {
                        self.data[r].fill(0);
                        Status::SUCCESS
                    }
                    _ => Status::new(sct::GENERIC, sc::INVALID_OPCODE),
                }
            }
            nvm::DATASET_MANAGEMENT if oncs(spec::oncs::DSM, self) => {
                let n = (e.cdw[10] & 0xff) as usize + 1;
                let ranges = match self.dma_in(e.prp1(), e.prp2(), n * spec::DSM_RANGE_SIZE) {
                    Ok(r) => r,
                    Err(s) => return s,
                };
                if e.cdw[11] & (1 << 2) == 0 {
                    return Status::SUCCESS;
                }
                let mut rs = Vec::new();
                for d in ranges.chunks_exact(spec::DSM_RANGE_SIZE) {
                    let nlb = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&d[8..16]);
                    match range(u64::from_le_bytes(s), u64::from(nlb)) {
                        Some(r) => rs.push((r, nlb)),
                        None => return out_of_range,
                    }
                }
                for (r, nlb) in rs {
                    self.data[r].fill(0);
                    self.deallocated += u64::from(nlb);
                }
                Status::SUCCESS
            }
            _ => Status::new(sct::GENERIC, sc::INVALID_OPCODE),
        }
    }
}

impl Regs for ModelRegs {
    fn read32(&self, off: usize) -> u32 {
        let m = self.0.borrow();
        match off {
            reg::CAP => m.cap as u32,
            o if o == reg::CAP + 4 => (m.cap >> 32) as u32,
            reg::VS => 0x0001_0400,
            reg::CC => m.cc,
            reg::CSTS => m.csts | if m.faults.fatal { csts::CFS } else { 0 },
            reg::AQA => m.aqa,
            reg::ASQ => m.asq as u32,
            o if o == reg::ASQ + 4 => (m.asq >> 32) as u32,
            reg::ACQ => m.acq as u32,
            o if o == reg::ACQ + 4 => (m.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&self, off: usize, v: u32) {
        let mut m = self.0.borrow_mut();
        let lo = |x: u64| (x & !0xffff_ffff) | u64::from(v);
        let hi = |x: u64| (x & 0xffff_ffff) | u64::from(v) << 32;
        match off {
            reg::CC => m.write_cc(v),
            reg::AQA => m.aqa = v,
            reg::ASQ => m.asq = lo(m.asq),
            o if o == reg::ASQ + 4 => m.asq = hi(m.asq),
            reg::ACQ => m.acq = lo(m.acq),
            o if o == reg::ACQ + 4 => m.acq = hi(m.acq),
            o if o >= reg::DOORBELLS => m.doorbell(o, v),
            _ => {}
        }
    }
}

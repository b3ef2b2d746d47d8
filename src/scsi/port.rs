//! The SCSI core's side of a reactor ([`ScsiPort`]): each device's channel on it, the
//! execution of planned commands (emulated at once, or I/O on the channel), the
//! read-modify-write commands it runs as a read then a write under a range lock, the jobs it
//! runs in the background a piece at a time (sanitize operations over a whole medium,
//! EXTENDED COPY a chunk at a time), and the completions that come back from
//! [`ScsiPort::poll`] and [`complete`] applies to their tasks.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::bdev::{BdevCompletion, BdevError, BdevIo, IoChannel, IoContext, IoOp};
use crate::env::DataBuf;
use crate::scsi::cdb::{be16, be32};
use crate::scsi::command::Run;
use crate::scsi::device::{Device, Sanitize};
use crate::scsi::pr::Nexus;
use crate::scsi::sbc::provisioning::unmap_ranges;
use crate::scsi::sbc::sanitize::{self as sz, Overwrite};
use crate::scsi::sense::{self, Sense};
use crate::scsi::spc::xcopy::{self, ListIdUsage, Segment};
use crate::scsi::task::*;

/// Whether an execution finished at once or went to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    Done,
    Pending,
}

/// A backend completion for a task, with what the sense data needs from its device.
pub struct Completion(BdevCompletion, DevInfo, Outcome);

/// How a completion ended beyond its I/O result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// As the result says.
    Io,
    /// The read of a read-modify-write failed (the result holds why).
    ReadFailed,
    /// COMPARE AND WRITE found the medium different at this byte of the Data-Out.
    Miscompare(u32),
    /// No buffer for the read of a read-modify-write.
    NoBuffer,
    /// The transport aborted a read-modify-write before its write: nothing was written.
    /// (Or the task of a sanitize operation, which goes on without it.)
    Aborted,
    /// A sanitize operation ended; the result says how.
    Sanitize,
    /// An EXTENDED COPY ended.
    Copy(CopyEnd),
}

/// How an EXTENDED COPY ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyEnd {
    Good,
    Failed(Sense),
    /// A reservation of another I_T nexus on a source or destination.
    Conflict,
    /// The transport aborted it: it stopped after the chunk in flight.
    Aborted,
}

/// The high bit of a backend tag marks the I/O of a job (a sanitize operation or a copy):
/// task tags never set it (the transport's connection index sits in bits 32 to 62).
const JOB_TAG: u64 = 1 << 63;
/// Bytes per read and write of a copy: a pool buffer's worth that keeps the reactor's other
/// I/O going between chunks.
const COPY_CHUNK: u64 = 1 << 20;

/// A long operation the port runs in the background of the reactor a piece at a time, its
/// backend I/O tagged with its id (a [`JOB_TAG`] tag): each piece's completion, collected by
/// [`ScsiPort::poll`], starts the next.
enum Job {
    Sanitize(SanitizeJob),
    Copy(CopyJob),
}

impl Job {
    /// Waiting for a buffer from the pool (retried on the next poll).
    fn stalled(&self) -> bool {
        match self {
            Job::Sanitize(j) => j.stalled,
            Job::Copy(j) => j.stalled,
        }
    }

    /// The task waiting for the job's end.
    fn task(&self) -> Option<u64> {
        match self {
            Job::Sanitize(j) => j.task,
            Job::Copy(j) => Some(j.task),
        }
    }
}

/// An EXTENDED COPY the port runs: its segments in order, each a chunk at a time (a read of
/// the source into a pool buffer, then the write of that buffer to the destination), one
/// chunk in flight.
struct CopyJob {
    /// The device the command was sent to: it keeps the copy's status.
    dev: Arc<Device>,
    task: u64,
    /// The copy's I_T nexus and list identifier in the device's table, when identified.
    record: Option<(u64, u8)>,
    /// The I_T nexus whose reservations the copy respects (none without a scope).
    nexus: Option<Nexus>,
    segments: Vec<Segment>,
    seg: usize,
    /// Bytes of the current segment done.
    done: u64,
    /// Bytes written over every segment.
    written: u64,
    /// The chunk in flight: where in its segment, and how many bytes.
    at: u64,
    len: u32,
    /// The chunk's write is in flight (else its read).
    writing: bool,
    in_flight: bool,
    aborted: bool,
    stalled: bool,
}
/// Bytes per write of a sanitize overwrite, and per deallocation of a block erase.
const OVERWRITE_PIECE: u64 = 1 << 20;
const ERASE_PIECE: u64 = 64 << 20;

/// A sanitize operation the port runs: the whole medium written with the pattern (each pass
/// in turn) or deallocated, a piece at a time, then flushed.
struct SanitizeJob {
    dev: Arc<Device>,
    /// The task waiting for the end: none with IMMED, or once it was aborted.
    task: Option<u64>,
    /// OVERWRITE's parameters; `None` for BLOCK ERASE.
    overwrite: Option<Overwrite>,
    ause: bool,
    size: u64,
    pass: u8,
    pos: u64,
    flushing: bool,
    /// Waiting for a buffer from the pool (retried on the next poll).
    stalled: bool,
}

impl SanitizeJob {
    /// The bytes of the piece at `pos`: a write of the pattern, or a deallocation. The same
    /// when the piece is submitted and when it completes, since neither moves meanwhile.
    fn piece(&self) -> u64 {
        let most = if self.overwrite.is_some() {
            OVERWRITE_PIECE
        } else {
            ERASE_PIECE
        };
        most.min(self.size.saturating_sub(self.pos))
    }
}

/// The PROGRESS INDICATION of a sanitize operation (SPC-4 §4.5.2.4.1, out of 65536) at byte
/// `pos` of pass `pass` (from 0) of `passes` over `size` bytes. In 128 bits: times 65536,
/// 31 passes over 8 TiB, or one over 256 TiB (a sparse file, a thin volume), pass 64.
fn progress(pass: u8, passes: u8, size: u64, pos: u64) -> u16 {
    let size = u128::from(size);
    let done = u128::from(pass) * size + u128::from(pos);
    let whole = (u128::from(passes) * size).max(1);
    // At most 65535 once bounded: the cast keeps it.
    (done * 65536 / whole).min(65535) as u16
}

/// A backend I/O of one buffer, with no ranges.
fn plain_io(tag: u64, op: IoOp, offset: u64, len: u32, buf: Option<DataBuf>) -> BdevIo {
    BdevIo {
        tag,
        op,
        offset,
        len,
        buf,
        ranges: Vec::new(),
    }
}

/// Where a read-modify-write command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RmwStage {
    /// Waiting for its range, held by another read-modify-write on some reactor.
    Locking,
    Reading,
    Writing,
}

/// A read-modify-write command the port runs: it holds its byte range on the device from
/// before its read until its write is done, so that two of them on overlapping ranges (on
/// any reactors) never interleave.
struct RmwOp {
    dev: Arc<Device>,
    kind: Rmw,
    offset: u64,
    len: u32,
    fua: bool,
    /// The command's Data-Out, handed back at the end.
    data: Option<DataBuf>,
    stage: RmwStage,
    /// Aborted during its read: it ends there, without writing.
    aborted: bool,
}

/// What [`complete`] needs to know of the device an I/O went to.
#[derive(Debug, Clone, Copy)]
struct DevInfo {
    block_size: u32,
    thin: bool,
}

impl DevInfo {
    fn of(dev: &Device) -> DevInfo {
        DevInfo {
            block_size: dev.block_size(),
            thin: dev.thin_provisioned(),
        }
    }
}

impl Completion {
    pub fn tag(&self) -> u64 {
        self.0.tag
    }

    /// The completion of task `tag` on `dev` that the port makes itself, rather than one
    /// that comes back from a channel.
    fn of_port(
        tag: u64,
        dev: &Device,
        result: Result<(), BdevError>,
        buf: Option<DataBuf>,
        outcome: Outcome,
    ) -> Completion {
        Completion(
            BdevCompletion { tag, result, buf },
            DevInfo::of(dev),
            outcome,
        )
    }
}

/// One device's channel on this reactor.
struct PortChannel {
    /// The device, weakly: its allocation (and so the map key, its address) stays reserved
    /// while the channel lives, and a deleted device's channel can be dropped.
    dev: Weak<Device>,
    ch: Box<dyn IoChannel>,
    info: DevInfo,
}

/// Hashes the channel map's keys, device addresses: they are not chosen by any peer, so a
/// multiply spreads them well enough, for less than SipHash costs on every I/O.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64 ^ (n as u64 >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// How many passes with no backend I/O outstanding go by between polls of every channel. A
/// pass after any device was dropped ([`crate::scsi::device::devices_dropped`], one atomic
/// load) polls them too: an idle reactor that sleeps between passes may make only a few
/// passes a second, and a deleted device's backend (an NVMe controller to give back to the
/// kernel) must not wait minutes for its channel to go.
const SWEEP_EVERY: u32 = 1024;

/// The SCSI core's state on one reactor: one channel per device, opened on first use, and
/// the reactor's backend I/O context (its io_uring, shared by every file and block device).
pub struct ScsiPort {
    // Declared before `io`: channels go first, then the ring waits out what is in flight.
    channels: HashMap<usize, PortChannel, BuildHasherDefault<AddrHasher>>,
    /// I/O submitted to the channels and not yet collected from them: with none, a poll
    /// has nothing to ask them (but a periodic sweep for deleted devices' channels).
    outstanding: usize,
    idle_polls: u32,
    /// [`crate::scsi::device::devices_dropped`] when the channels were last polled.
    dropped_seen: u64,
    io: IoContext,
    scratch: Vec<BdevCompletion>,
    /// Read-modify-write commands in progress, by tag.
    rmw: HashMap<u64, RmwOp>,
    /// Tags of those waiting for their range, oldest first.
    rmw_waiting: VecDeque<u64>,
    /// Completions the read-modify-write path has ready for the next `poll`.
    rmw_done: Vec<Completion>,
    /// Sanitize operations and copies under way, by the tag of their I/O.
    jobs: HashMap<u64, Job>,
    next_job: u64,
}

impl Default for ScsiPort {
    fn default() -> Self {
        Self::new()
    }
}

impl ScsiPort {
    pub fn new() -> ScsiPort {
        ScsiPort {
            channels: HashMap::default(),
            outstanding: 0,
            idle_polls: 0,
            dropped_seen: 0,
            io: IoContext::new(),
            scratch: Vec::with_capacity(256),
            rmw: HashMap::new(),
            rmw_waiting: VecDeque::new(),
            rmw_done: Vec::new(),
            jobs: HashMap::new(),
            next_job: 0,
        }
    }

    /// Hands `io` to the device's channel on this reactor.
    fn submit(&mut self, dev: &Arc<Device>, io: BdevIo) {
        self.outstanding += 1;
        self.channel(dev).submit(io);
    }

    fn channel(&mut self, dev: &Arc<Device>) -> &mut Box<dyn IoChannel> {
        let key = Arc::as_ptr(dev) as *const u8 as usize;
        let io = &self.io;
        &mut self
            .channels
            .entry(key)
            .or_insert_with(|| PortChannel {
                dev: Arc::downgrade(dev),
                ch: dev.bdev.clone().open_channel(io),
                info: DevInfo::of(dev),
            })
            .ch
    }

    /// Backend operations in flight in the kernel. While there are any the reactor must not
    /// sleep in epoll: their completions arrive on the ring, not on a socket.
    pub fn inflight(&self) -> usize {
        self.io.inflight() + self.rmw.len() + self.jobs.len()
    }

    /// The earliest time a channel has held I/O coming due by itself (an injected delay):
    /// a reactor that sleeps must wake by then, since no socket or ring event will.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.channels
            .values()
            .filter_map(|pc| pc.ch.next_deadline())
            .min()
    }

    /// Runs a planned task.
    pub fn execute(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        if task.status != STATUS_GOOD {
            return Exec::Done;
        }
        let Some(cmd) = task.cmd else {
            // Not planned: nothing says what the command is.
            task.fail(Sense::new(
                sense::ILLEGAL_REQUEST,
                sense::INVALID_COMMAND_OPERATION_CODE,
            ));
            return Exec::Done;
        };
        match cmd.run {
            Run::Emulate(emulate) => {
                emulate(dev, task);
                Exec::Done
            }
            Run::Io => self.execute_io(dev, task),
            Run::Unmap => self.execute_provisioning(dev, task, true),
            Run::WriteSame => self.execute_provisioning(dev, task, false),
            Run::ReadModifyWrite => match (task.rmw, task.io) {
                (Some(kind), Some((IoOp::Write { fua }, offset, len))) => {
                    self.rmw.insert(
                        task.tag,
                        RmwOp {
                            dev: dev.clone(),
                            kind,
                            offset,
                            len,
                            fua,
                            data: task.buf.take(),
                            stage: RmwStage::Locking,
                            aborted: false,
                        },
                    );
                    self.rmw_waiting.push_back(task.tag);
                    self.rmw_start();
                    Exec::Pending
                }
                _ => Exec::Done,
            },
            // The transport runs these, with the I_T nexus they need
            // (`execute_reservation`); without one they cannot act.
            Run::Reservation(_) => {
                task.fail(Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::INVALID_COMMAND_OPERATION_CODE,
                ));
                Exec::Done
            }
            Run::Sanitize => self.execute_sanitize(dev, task),
            Run::Copy => self.execute_copy(dev, task),
        }
    }

    /// A new job id.
    fn job_id(&mut self) -> u64 {
        let id = JOB_TAG | self.next_job;
        self.next_job = (self.next_job + 1) & !JOB_TAG;
        id
    }

    /// EXTENDED COPY: its parameter list checked and resolved against the devices it may
    /// reach, its list identifier recorded, then the copy started; the task is answered when
    /// it ends.
    fn execute_copy(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        let scope = task.copy_scope.take();
        if be32(&task.cdb[10..14]) == 0 {
            // No parameter list: no copy, and not an error (SPC-4 §6.4.1).
            return Exec::Done;
        }
        let data = read_parameter_list_at(task, 10..14);
        let list = match xcopy::parse(&data) {
            Ok(l) => l,
            Err(s) => {
                task.fail(s);
                return Exec::Done;
            }
        };
        let record = (list.usage != ListIdUsage::None).then_some((task.nexus, list.list_id));
        if let Some((nexus, list_id)) = record {
            if let Err(s) = dev.copies().begin(nexus, list_id) {
                task.fail(s);
                return Exec::Done;
            }
        }
        let segments = match xcopy::resolve(&list, dev, task.read_only, scope.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                let end = match e {
                    Some(s) => CopyEnd::Failed(s),
                    None => CopyEnd::Conflict,
                };
                if let Some((nexus, list_id)) = record {
                    let (status, sense) = copy_status_of(end, dev);
                    dev.copies().end(nexus, list_id, status, &sense);
                }
                match end {
                    CopyEnd::Failed(s) => task.fail(s),
                    _ => task.reservation_conflict(),
                }
                return Exec::Done;
            }
        };
        let id = self.job_id();
        self.jobs.insert(
            id,
            Job::Copy(CopyJob {
                dev: dev.clone(),
                task: task.tag,
                record,
                nexus: scope.map(|s| s.nexus),
                segments,
                seg: 0,
                done: 0,
                written: 0,
                at: 0,
                len: 0,
                writing: false,
                in_flight: false,
                aborted: false,
                stalled: false,
            }),
        );
        self.copy_next(id);
        Exec::Pending
    }

    /// Starts the read of the next chunk of copy `id`, or ends it.
    fn copy_next(&mut self, id: u64) {
        let Some(Job::Copy(job)) = self.jobs.get_mut(&id) else {
            return;
        };
        job.stalled = false;
        if job.aborted {
            self.copy_finish(id, CopyEnd::Aborted);
            return;
        }
        while job.segments.get(job.seg).is_some_and(|s| job.done >= s.len) {
            job.seg += 1;
            job.done = 0;
        }
        let Some(s) = job.segments.get(job.seg) else {
            self.copy_finish(id, CopyEnd::Good);
            return;
        };
        // Reservations and readiness may have changed since the last chunk.
        if let Err(e) = xcopy::check_access(&s.src, &s.dst, job.nexus.as_ref(), job.seg) {
            let end = e.map_or(CopyEnd::Conflict, CopyEnd::Failed);
            self.copy_finish(id, end);
            return;
        }
        // At most COPY_CHUNK (1 MiB): the casts keep it.
        let n = COPY_CHUNK.min(s.len - job.done);
        let at = if s.backward {
            s.len - job.done - n
        } else {
            job.done
        };
        let Some(buf) = DataBuf::alloc(n as usize) else {
            job.stalled = true;
            return;
        };
        if let Some((nexus, list_id)) = job.record {
            // SEGMENTS PROCESSED counts the one under way.
            job.dev
                .copies()
                .progress(nexus, list_id, job.seg + 1, job.written);
        }
        (job.at, job.len, job.writing, job.in_flight) = (at, n as u32, false, true);
        let (src, off) = (s.src.clone(), s.src_off + at);
        self.submit(&src, plain_io(id, IoOp::Read, off, n as u32, Some(buf)));
    }

    /// The read or the write of a copy's chunk has completed.
    fn copy_step(&mut self, c: BdevCompletion) {
        let id = c.tag;
        let Some(Job::Copy(job)) = self.jobs.get_mut(&id) else {
            return;
        };
        job.in_flight = false;
        if job.aborted {
            self.copy_finish(id, CopyEnd::Aborted);
            return;
        }
        let failed = CopyEnd::Failed(xcopy::copy_aborted(
            sense::THIRD_PARTY_DEVICE_FAILURE,
            job.seg,
        ));
        let (Ok(()), Some(s)) = (c.result, job.segments.get(job.seg)) else {
            self.copy_finish(id, failed);
            return;
        };
        if job.writing {
            job.done += u64::from(job.len);
            job.written += u64::from(job.len);
            self.copy_next(id);
            return;
        }
        let Some(buf) = c.buf else {
            self.copy_finish(id, failed);
            return;
        };
        job.writing = true;
        job.in_flight = true;
        let (dst, off, len) = (s.dst.clone(), s.dst_off + job.at, job.len);
        let write = IoOp::Write { fua: false };
        self.submit(&dst, plain_io(id, write, off, len, Some(buf)));
    }

    /// Ends copy `id`: its status recorded, and its task's completion ready for the next
    /// `poll`.
    fn copy_finish(&mut self, id: u64, end: CopyEnd) {
        if !matches!(self.jobs.get(&id), Some(Job::Copy(_))) {
            return;
        }
        let Some(Job::Copy(job)) = self.jobs.remove(&id) else {
            return;
        };
        if let Some((nexus, list_id)) = job.record {
            let copies = job.dev.copies();
            let segments = job.seg.min(job.segments.len());
            let segments = if end == CopyEnd::Good {
                segments
            } else {
                segments + 1
            };
            copies.progress(nexus, list_id, segments, job.written);
            let (status, sense) = copy_status_of(end, &job.dev);
            copies.end(nexus, list_id, status, &sense);
        }
        self.rmw_done.push(Completion::of_port(
            job.task,
            &job.dev,
            Ok(()),
            None,
            Outcome::Copy(end),
        ));
    }

    /// SANITIZE OVERWRITE or BLOCK ERASE: its parameter list checked, the operation started
    /// (unless one is under way on the device), and the task answered now (IMMED) or when
    /// the operation ends.
    fn execute_sanitize(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        let overwrite = if task.cdb[1] & 0x1f == sz::SA_OVERWRITE {
            match sz::parse_overwrite(&read_parameter_list(task), dev.block_size()) {
                Ok(o) => Some(o),
                Err(s) => {
                    task.fail(s);
                    return Exec::Done;
                }
            }
        } else {
            None
        };
        if !dev.sanitize_begin() {
            task.fail(Sense {
                progress: Some(dev.sanitize_progress()),
                ..Sense::new(sense::NOT_READY, sense::SANITIZE_IN_PROGRESS)
            });
            return Exec::Done;
        }
        let id = self.job_id();
        let immed = sz::immed(&task.cdb);
        self.jobs.insert(
            id,
            Job::Sanitize(SanitizeJob {
                dev: dev.clone(),
                task: (!immed).then_some(task.tag),
                overwrite,
                ause: sz::ause(&task.cdb),
                size: dev.num_blocks() * u64::from(dev.block_size()),
                pass: 0,
                pos: 0,
                flushing: false,
                stalled: false,
            }),
        );
        self.job_next(id);
        if immed {
            Exec::Done
        } else {
            Exec::Pending
        }
    }

    /// Starts the next piece of job `id`.
    fn job_next(&mut self, id: u64) {
        match self.jobs.get(&id) {
            Some(Job::Sanitize(_)) => self.sanitize_next(id),
            Some(Job::Copy(_)) => self.copy_next(id),
            None => {}
        }
    }

    /// Starts the next piece of sanitize operation `id`, or its flush, or ends it.
    fn sanitize_next(&mut self, id: u64) {
        let Some(Job::Sanitize(job)) = self.jobs.get_mut(&id) else {
            return;
        };
        job.stalled = false;
        let passes = job.overwrite.as_ref().map_or(1, |o| o.passes);
        if job.pos >= job.size && job.pass + 1 < passes {
            job.pass += 1;
            job.pos = 0;
        }
        if job.pos >= job.size {
            if job.flushing {
                self.sanitize_finish(id, Ok(()));
                return;
            }
            job.flushing = true;
            let dev = job.dev.clone();
            self.submit(&dev, plain_io(id, IoOp::Flush, 0, 0, None));
            return;
        }
        job.dev
            .set_sanitize_progress(progress(job.pass, passes, job.size, job.pos));
        let n = job.piece();
        let io = match &job.overwrite {
            None => BdevIo {
                ranges: vec![(job.pos, n)],
                ..plain_io(id, IoOp::Unmap, 0, 0, None)
            },
            Some(o) => {
                // At most OVERWRITE_PIECE (1 MiB): the casts keep it.
                let Some(mut buf) = DataBuf::alloc(n as usize) else {
                    job.stalled = true;
                    return;
                };
                let bs = job.dev.block_size() as usize;
                let block = sz::pattern_block(&o.pattern, bs, o.invert && job.pass % 2 == 1);
                for off in (0..n as usize).step_by(bs) {
                    buf.write_at(off, &block);
                }
                let write = IoOp::Write { fua: false };
                plain_io(id, write, job.pos, n as u32, Some(buf))
            }
        };
        let dev = job.dev.clone();
        self.submit(&dev, io);
    }

    /// The least id above `after` of a stalled job. A scan of the few on this reactor, rather
    /// than a list of them made on every poll.
    fn next_stalled_job(&self, after: u64) -> Option<u64> {
        self.jobs
            .iter()
            .filter(|(&id, j)| j.stalled() && id > after)
            .map(|(&id, _)| id)
            .min()
    }

    /// A piece of job `id` has completed.
    fn job_step(&mut self, c: BdevCompletion) {
        match self.jobs.get(&c.tag) {
            Some(Job::Sanitize(_)) => self.sanitize_step(c),
            Some(Job::Copy(_)) => self.copy_step(c),
            None => {}
        }
    }

    /// A piece (or the flush) of a sanitize operation has completed.
    fn sanitize_step(&mut self, c: BdevCompletion) {
        let id = c.tag;
        if let Err(e) = c.result {
            self.sanitize_finish(id, Err(e));
            return;
        }
        if let Some(Job::Sanitize(job)) = self.jobs.get_mut(&id) {
            if !job.flushing {
                job.pos += job.piece();
            }
        }
        self.sanitize_next(id);
    }

    /// Ends sanitize operation `id`: the device leaves the sanitize state (into failure mode
    /// if it failed), and a task still waiting gets its completion with the next `poll`.
    fn sanitize_finish(&mut self, id: u64, result: Result<(), BdevError>) {
        if !matches!(self.jobs.get(&id), Some(Job::Sanitize(_))) {
            return;
        }
        let Some(Job::Sanitize(job)) = self.jobs.remove(&id) else {
            return;
        };
        job.dev.sanitize_end(match (result, job.ause) {
            (Ok(()), _) => Sanitize::Idle,
            (Err(_), false) => Sanitize::Failed,
            (Err(_), true) => Sanitize::FailedAuse,
        });
        if let Some(tag) = job.task {
            self.rmw_done.push(Completion::of_port(
                tag,
                &job.dev,
                result,
                None,
                Outcome::Sanitize,
            ));
        }
    }

    /// The one backend I/O a read, write, verify, flush or read-ahead decoded to.
    fn execute_io(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        let Some((op, offset, len)) = task.io else {
            return Exec::Done;
        };
        if len == 0 && op != IoOp::Flush {
            return Exec::Done;
        }
        let buf = if task.verify_compare {
            match DataBuf::alloc(len as usize) {
                Some(b) => Some(b),
                None => {
                    task.status = STATUS_TASK_SET_FULL;
                    return Exec::Done;
                }
            }
        } else {
            task.buf.take()
        };
        self.submit(dev, plain_io(task.tag, op, offset, len, buf));
        Exec::Pending
    }

    /// UNMAP and WRITE SAME: one deallocation of byte ranges, or one write of the data
    /// block repeated over the range. With `parameter_list` (UNMAP) the ranges are in the
    /// Data-Out; WRITE SAME with UNMAP has them from its CDB.
    fn execute_provisioning(
        &mut self,
        dev: &Arc<Device>,
        task: &mut ScsiTask,
        parameter_list: bool,
    ) -> Exec {
        let Some((op, offset, len)) = task.io else {
            return Exec::Done;
        };
        let buf = if op == IoOp::Unmap {
            if parameter_list {
                match unmap_ranges(dev, &read_parameter_list(task)) {
                    Ok(r) => task.ranges = r,
                    Err(s) => {
                        task.fail(s);
                        return Exec::Done;
                    }
                }
            }
            if task.ranges.is_empty() {
                return Exec::Done;
            }
            None
        } else {
            if len == 0 {
                return Exec::Done;
            }
            let bs = dev.block_size() as usize;
            let mut block = vec![0u8; bs];
            if let Some(b) = task.buf.as_ref() {
                b.read_at(0, &mut block);
            }
            // A block of zeros over the range: the device zeroes it where it can, with no
            // data moved (NVMe WRITE ZEROES).
            if block.iter().all(|&x| x == 0) && dev.bdev.supports_write_zeroes() {
                let tag = task.tag;
                self.submit(
                    dev,
                    BdevIo {
                        tag,
                        op: IoOp::WriteZeroes,
                        offset,
                        len,
                        buf: None,
                        ranges: Vec::new(),
                    },
                );
                return Exec::Pending;
            }
            let Some(mut out) = DataBuf::alloc(len as usize) else {
                task.status = STATUS_TASK_SET_FULL;
                return Exec::Done;
            };
            if block.iter().all(|&x| x == 0) {
                out.fill(0, len as usize, 0);
            } else {
                for off in (0..len as usize).step_by(bs) {
                    out.write_at(off, &block);
                }
            }
            Some(out)
        };
        let tag = task.tag;
        let ranges = std::mem::take(&mut task.ranges);
        self.submit(
            dev,
            BdevIo {
                tag,
                op,
                offset,
                len,
                buf,
                ranges,
            },
        );
        Exec::Pending
    }

    /// The transport has given up on task `tag` (aborted, or its connection closed). A
    /// read-modify-write that has not written yet never will: one waiting for its range ends
    /// now, one reading ends after its read. I/O that has not reached the medium is cancelled
    /// (the backends that can: I/O held by a stall); I/O already in the kernel runs its
    /// course. Either way the completion comes back from `poll`, and only then is the task
    /// over: the transport waits for it before it reports the task aborted.
    pub fn abort(&mut self, tag: u64) {
        if let Some((&id, job)) = self.jobs.iter_mut().find(|(_, j)| j.task() == Some(tag)) {
            match job {
                // A sanitize operation goes on without its task (SBC-3 §4.11.3), which ends
                // now.
                Job::Sanitize(job) => {
                    job.task = None;
                    self.rmw_done.push(Completion::of_port(
                        tag,
                        &job.dev,
                        Ok(()),
                        None,
                        Outcome::Aborted,
                    ));
                }
                // A copy stops: at once between chunks, else once the chunk in flight is
                // back (cancelled if the backend can).
                Job::Copy(job) => {
                    job.aborted = true;
                    if job.in_flight {
                        for pc in self.channels.values_mut() {
                            pc.ch.cancel(id);
                        }
                    } else {
                        self.copy_finish(id, CopyEnd::Aborted);
                    }
                }
            }
            return;
        }
        if let Some(op) = self.rmw.get_mut(&tag) {
            match op.stage {
                RmwStage::Locking => {
                    self.rmw_waiting.retain(|&t| t != tag);
                    self.rmw_finish(tag, Ok(()), Outcome::Aborted);
                    return;
                }
                RmwStage::Reading => op.aborted = true,
                RmwStage::Writing => {}
            }
        }
        for pc in self.channels.values_mut() {
            pc.ch.cancel(tag);
        }
    }

    /// Submits this pass's ring I/O and collects completions of this reactor's backend I/O.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if !self.rmw_waiting.is_empty() {
            self.rmw_start();
        }
        if !self.jobs.is_empty() {
            // Each job that found no buffer tries again, once a poll: in order of id, so that
            // one that stalls again waits for the next poll.
            let mut after = 0;
            while let Some(id) = self.next_stalled_job(after) {
                after = id;
                self.job_next(id);
            }
        }
        self.io.poll();
        let start = out.len();
        let dropped = crate::scsi::device::devices_dropped();
        if self.outstanding == 0 {
            self.idle_polls += 1;
            if self.idle_polls < SWEEP_EVERY && dropped == self.dropped_seen {
                out.append(&mut self.rmw_done);
                return out.len() - start;
            }
        }
        self.idle_polls = 0;
        self.dropped_seen = dropped;
        let scratch = &mut self.scratch;
        let outstanding = &mut self.outstanding;
        self.channels.retain(|_, pc| {
            scratch.clear();
            pc.ch.poll(scratch);
            *outstanding = outstanding.saturating_sub(scratch.len());
            let info = pc.info;
            out.extend(scratch.drain(..).map(|c| Completion(c, info, Outcome::Io)));
            // A deleted device's channel goes once its last I/O is back, releasing the
            // backend (a RAM disk's memory, a file's descriptor).
            pc.dev.strong_count() > 0 || pc.ch.busy()
        });
        if !self.rmw.is_empty() || !self.jobs.is_empty() {
            // The reads and writes of read-modify-write commands and jobs go on to their
            // next step.
            let mut i = start;
            while i < out.len() {
                let tag = out[i].tag();
                if tag & JOB_TAG != 0 {
                    let c = out.swap_remove(i);
                    self.job_step(c.0);
                } else if self.rmw.contains_key(&tag) {
                    let c = out.swap_remove(i);
                    self.rmw_step(c.0);
                } else {
                    i += 1;
                }
            }
        }
        out.append(&mut self.rmw_done);
        out.len() - start
    }

    /// Starts the read of every waiting read-modify-write whose range is free.
    fn rmw_start(&mut self) {
        let mut i = 0;
        while i < self.rmw_waiting.len() {
            let tag = self.rmw_waiting[i];
            let Some(op) = self.rmw.get_mut(&tag) else {
                self.rmw_waiting.remove(i);
                continue;
            };
            if !op.dev.try_lock_range(op.offset, u64::from(op.len)) {
                i += 1;
                continue;
            }
            self.rmw_waiting.remove(i);
            let Some(buf) = DataBuf::alloc(op.len as usize) else {
                self.rmw_finish(tag, Ok(()), Outcome::NoBuffer);
                continue;
            };
            op.stage = RmwStage::Reading;
            let (dev, offset, len) = (op.dev.clone(), op.offset, op.len);
            self.submit(&dev, plain_io(tag, IoOp::Read, offset, len, Some(buf)));
        }
    }

    /// A read or write of a read-modify-write command has completed.
    fn rmw_step(&mut self, c: BdevCompletion) {
        let tag = c.tag;
        let Some(op) = self.rmw.get_mut(&tag) else {
            return;
        };
        match (op.stage, c.result) {
            (RmwStage::Reading, _) if op.aborted => self.rmw_finish(tag, Ok(()), Outcome::Aborted),
            (RmwStage::Reading, Ok(())) => {
                let Some(mut medium) = c.buf else {
                    self.rmw_finish(tag, Err(BdevError::BadBuffer), Outcome::ReadFailed);
                    return;
                };
                let Some(data) = op.data.as_ref() else {
                    self.rmw_finish(tag, Err(BdevError::BadBuffer), Outcome::Io);
                    return;
                };
                let len = op.len as usize;
                match op.kind {
                    Rmw::Compare => {
                        if let Some(at) = first_difference(data, 0, &medium, len) {
                            self.rmw_finish(tag, Ok(()), Outcome::Miscompare(at as u32));
                            return;
                        }
                        copy_range(data, len, &mut medium, len);
                    }
                    Rmw::Or => or_into(data, &mut medium, len),
                }
                op.stage = RmwStage::Writing;
                let (dev, offset, fua) = (op.dev.clone(), op.offset, op.fua);
                let write = IoOp::Write { fua };
                self.submit(&dev, plain_io(tag, write, offset, len as u32, Some(medium)));
            }
            (RmwStage::Reading, Err(e)) => self.rmw_finish(tag, Err(e), Outcome::ReadFailed),
            (_, result) => self.rmw_finish(tag, result, Outcome::Io),
        }
    }

    /// Ends a read-modify-write command: its range is released and its completion goes out
    /// with the next `poll`.
    fn rmw_finish(&mut self, tag: u64, result: Result<(), BdevError>, outcome: Outcome) {
        let Some(op) = self.rmw.remove(&tag) else {
            return;
        };
        if op.stage != RmwStage::Locking || outcome == Outcome::NoBuffer {
            op.dev.unlock_range(op.offset, u64::from(op.len));
        }
        self.rmw_done
            .push(Completion::of_port(tag, &op.dev, result, op.data, outcome));
    }
}

/// The parameter list of a task whose CDB has its PARAMETER LIST LENGTH in bytes 7-8
/// (UNMAP, SANITIZE): as much of it as the Data-Out holds.
fn read_parameter_list(task: &ScsiTask) -> Vec<u8> {
    read_parameter_list_at(task, 7..9)
}

/// The parameter list of a task whose CDB has its PARAMETER LIST LENGTH in bytes `field`
/// (two of them, or four: EXTENDED COPY's 10-13, which its decode step bounds): as much of
/// it as the Data-Out holds.
fn read_parameter_list_at(task: &ScsiTask, field: std::ops::Range<usize>) -> Vec<u8> {
    let c = &task.cdb[field];
    let len = if c.len() == 4 { be32(c) } else { be16(c) };
    let have = task.buf.as_ref().map_or(0, DataBuf::len);
    let mut data = vec![0u8; (len as usize).min(have)];
    let got = task.buf.as_ref().map_or(0, |b| b.read_at(0, &mut data));
    data.truncate(got);
    data
}

/// The status and sense data a copy that ended as `end` leaves in the device's table.
fn copy_status_of(end: CopyEnd, dev: &Device) -> (u8, Vec<u8>) {
    match end {
        CopyEnd::Good => (STATUS_GOOD, Vec::new()),
        CopyEnd::Failed(s) => {
            let (b, n) = s.encode(dev.sense_format());
            (STATUS_CHECK_CONDITION, b[..n].to_vec())
        }
        CopyEnd::Conflict => (STATUS_RESERVATION_CONFLICT, Vec::new()),
        CopyEnd::Aborted => (STATUS_TASK_ABORTED, Vec::new()),
    }
}

/// Applies a backend completion to its task.
pub fn complete(task: &mut ScsiTask, c: Completion) {
    let Completion(c, info, outcome) = c;
    if task.verify_compare {
        task.aux = c.buf;
    } else if c.buf.is_some() {
        task.buf = c.buf;
    }
    match outcome {
        Outcome::Io => {}
        Outcome::ReadFailed => {
            if let Err(e) = c.result {
                task.fail(error_sense(e, Some(IoOp::Read), info));
            }
            return;
        }
        Outcome::Miscompare(at) => {
            // SBC-3 §5.2: the INFORMATION field holds the offset in the Data-Out of the
            // first byte that differs.
            let mut s = Sense::new(sense::MISCOMPARE, sense::MISCOMPARE_DURING_VERIFY);
            s.information = Some(u64::from(at));
            task.fail(s);
            return;
        }
        Outcome::NoBuffer => {
            task.status = STATUS_TASK_SET_FULL;
            return;
        }
        Outcome::Aborted => {
            task.status = STATUS_TASK_ABORTED;
            return;
        }
        Outcome::Copy(end) => {
            match end {
                CopyEnd::Good => {}
                CopyEnd::Failed(s) => task.fail(s),
                CopyEnd::Conflict => task.reservation_conflict(),
                CopyEnd::Aborted => task.status = STATUS_TASK_ABORTED,
            }
            return;
        }
        Outcome::Sanitize => {
            if c.result.is_err() {
                task.fail(Sense::new(
                    sense::MEDIUM_ERROR,
                    sense::SANITIZE_COMMAND_FAILED,
                ));
            }
            return;
        }
    }
    match c.result {
        Ok(()) => {
            if let Some((IoOp::Read, _, len)) = task.io {
                if task.verify_compare {
                    verify_compare(task, len);
                } else {
                    task.data_in_len = len;
                }
            }
        }
        Err(e) => task.fail(error_sense(e, task.io.map(|x| x.0), info)),
    }
}

/// The sense data for a failed backend I/O.
fn error_sense(e: BdevError, op: Option<IoOp>, info: DevInfo) -> Sense {
    // SPC-4 Annex D.
    const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: (u8, u8) = (0x27, 0x07);
    const INTERNAL_TARGET_FAILURE: (u8, u8) = (0x44, 0x00);
    const NOT_READY_MANUAL_INTERVENTION: (u8, u8) = (0x04, 0x03);
    const MEDIUM_NOT_PRESENT: (u8, u8) = (0x3a, 0x00);
    let medium = || match op {
        Some(IoOp::Read) => Sense::new(sense::MEDIUM_ERROR, sense::UNRECOVERED_READ_ERROR),
        _ => Sense::new(sense::MEDIUM_ERROR, sense::WRITE_ERROR),
    };
    match e {
        // SBC-3 §4.7.3.6: a thin provisioned device out of backing space.
        BdevError::NoSpace if info.thin => {
            Sense::new(sense::DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        }
        BdevError::NoSpace => medium(),
        // SPC-4 §4.5.3: the INFORMATION field holds the first failing LBA (fixed format sets
        // VALID only when it fits in four bytes).
        BdevError::Io(off) => Sense {
            information: Some(off / u64::from(info.block_size.max(1))),
            ..medium()
        },
        BdevError::BadBuffer => Sense::new(sense::HARDWARE_ERROR, INTERNAL_TARGET_FAILURE),
        BdevError::Offline => Sense::new(sense::NOT_READY, NOT_READY_MANUAL_INTERVENTION),
        BdevError::NoMedium => Sense::new(sense::NOT_READY, MEDIUM_NOT_PRESENT),
        BdevError::WriteProtected => Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED),
        // Only an aborted command's I/O is cancelled, and its status is never sent; a
        // read-modify-write whose read was cancelled ends here.
        BdevError::Cancelled => Sense::new(sense::ABORTED_COMMAND, (0, 0)),
    }
}

/// The first byte at which `a` from `a_off` and `b` from 0 differ over `len` bytes.
fn first_difference(a: &DataBuf, a_off: usize, b: &DataBuf, len: usize) -> Option<usize> {
    let mut x = [0u8; 4096];
    let mut y = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4096);
        a.read_at(a_off + off, &mut x[..n]);
        b.read_at(off, &mut y[..n]);
        if let Some(i) = (0..n).find(|&i| x[i] != y[i]) {
            return Some(off + i);
        }
        off += n;
    }
    None
}

/// Copies `len` bytes of `src` from `src_off` to the start of `dst`.
fn copy_range(src: &DataBuf, src_off: usize, dst: &mut DataBuf, len: usize) {
    let mut x = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4096);
        src.read_at(src_off + off, &mut x[..n]);
        dst.write_at(off, &x[..n]);
        off += n;
    }
}

/// `dst |= src` over the first `len` bytes.
fn or_into(src: &DataBuf, dst: &mut DataBuf, len: usize) {
    let mut x = [0u8; 4096];
    let mut y = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4096);
        src.read_at(off, &mut x[..n]);
        dst.read_at(off, &mut y[..n]);
        for (d, s) in y[..n].iter_mut().zip(&x[..n]) {
            *d |= s;
        }
        dst.write_at(off, &y[..n]);
        off += n;
    }
}

pub(in crate::scsi) fn verify_compare(task: &mut ScsiTask, len: u32) {
    let (Some(a), Some(b)) = (task.buf.as_ref(), task.aux.take()) else {
        return;
    };
    if let Some(at) = first_difference(a, 0, &b, len as usize) {
        let mut s = Sense::new(sense::MISCOMPARE, sense::MISCOMPARE_DURING_VERIFY);
        s.information = u64::try_from(at).ok();
        task.fail(s);
    }
}

#[cfg(test)]
mod completion_tests {
    use super::*;
    use crate::scsi::command::plan;
    use crate::scsi::pr::test_nexus;
    use crate::scsi::sbc::opcode::*;

    fn failed(e: BdevError, op: IoOp, block_size: u32, thin: bool) -> [u8; sense::FIXED_LEN] {
        let mut t = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        t.io = Some((op, 0, 512));
        let c = BdevCompletion {
            tag: 0,
            result: Err(e),
            buf: None,
        };
        complete(
            &mut t,
            Completion(c, DevInfo { block_size, thin }, Outcome::Io),
        );
        assert_eq!(t.status, STATUS_CHECK_CONDITION);
        let mut s = [0u8; sense::FIXED_LEN];
        s.copy_from_slice(t.sense());
        s
    }

    #[test]
    fn a_deleted_device_releases_its_channel() {
        let d = Device::create("vdisk_ramio", "gone", &[("size_mb".into(), "1".into())]).unwrap();
        let mut port = ScsiPort::new();
        let mut t = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        plan(&d, &mut t, &test_nexus()).unwrap();
        t.buf = DataBuf::alloc(512);
        assert_eq!(port.execute(&d, &mut t), Exec::Pending);
        let weak = Arc::downgrade(&d);
        drop(d);
        let mut out = Vec::new();
        // The pending completion is still delivered, then the channel goes.
        assert_eq!(port.poll(&mut out), 1);
        assert!(port.channels.is_empty());
        assert_eq!(weak.strong_count(), 0);
        assert_eq!(port.inflight(), 0);
    }

    #[test]
    fn an_idle_channel_goes_on_the_next_pass_after_its_device() {
        let d = Device::create("vdisk_ramio", "idle", &[("size_mb".into(), "1".into())]).unwrap();
        let mut port = ScsiPort::new();
        let mut t = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        plan(&d, &mut t, &test_nexus()).unwrap();
        t.buf = DataBuf::alloc(512);
        assert_eq!(port.execute(&d, &mut t), Exec::Pending);
        let mut out = Vec::new();
        assert_eq!(port.poll(&mut out), 1);
        // Idle passes keep the channel of a device that still exists.
        for _ in 0..3 {
            assert_eq!(port.poll(&mut out), 0);
        }
        assert_eq!(port.channels.len(), 1);
        let weak = Arc::downgrade(&d);
        drop(d);
        // One idle pass later, not SWEEP_EVERY passes later, the backend is released.
        assert_eq!(port.poll(&mut out), 0);
        assert!(port.channels.is_empty());
        assert_eq!(weak.strong_count(), 0);
    }

    /// Runs a command through a port until its ring I/O completes.
    fn run_ring(port: &mut ScsiPort, d: &Arc<Device>, cdb: &[u8], data: Option<&[u8]>) -> ScsiTask {
        let mut t = ScsiTask::new(cdb, 0, 1);
        // A command refused before any I/O (e.g. NOT READY) comes back as it is.
        let p = match plan(d, &mut t, &test_nexus()) {
            Ok(p) => p,
            Err(s) => {
                t.fail(s);
                return t;
            }
        };
        if p.len > 0 {
            let mut b = DataBuf::alloc(p.len as usize).unwrap();
            if let Some(x) = data {
                b.write_at(0, x);
            }
            t.buf = Some(b);
        }
        if port.execute(d, &mut t) == Exec::Pending {
            let mut out = Vec::new();
            while port.poll(&mut out) == 0 {
                assert!(port.inflight() > 0, "nothing in flight and no completion");
                port.io.wait();
            }
            complete(&mut t, out.pop().unwrap());
        }
        t
    }

    #[test]
    fn fileio_through_the_port() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = dir.path().join("p.img");
        let params = vec![
            ("filename".to_string(), f.to_str().unwrap().to_string()),
            ("size_mb".to_string(), "1".to_string()),
        ];
        let d = Device::create("vdisk_fileio", "p", &params).unwrap();
        let mut port = ScsiPort::new();
        let w = run_ring(
            &mut port,
            &d,
            &[WRITE_10, 0x08, 0, 0, 0, 3, 0, 0, 2, 0],
            Some(&[0x3c; 1024]),
        );
        assert_eq!(w.status, STATUS_GOOD);
        let s = run_ring(
            &mut port,
            &d,
            &[SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            None,
        );
        assert_eq!(s.status, STATUS_GOOD);
        let r = run_ring(&mut port, &d, &[READ_10, 0, 0, 0, 0, 3, 0, 0, 2, 0], None);
        assert_eq!(r.status, STATUS_GOOD);
        let mut back = vec![0u8; 1024];
        r.buf.as_ref().unwrap().read_at(0, &mut back);
        assert_eq!(back, vec![0x3c; 1024]);
        assert_eq!(std::fs::read(&f).unwrap()[1536..2560], [0x3c; 1024]);
        // READ CAPACITY 16 reports the file system's block as the physical block
        // (lb_per_pb_exp=1 by default), and nothing once lb_per_pb_exp is 0.
        let rc16 = [
            SERVICE_ACTION_IN_16,
            0x10,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            32,
            0,
            0,
        ];
        let blksize = std::os::unix::fs::MetadataExt::blksize(&std::fs::metadata(&f).unwrap());
        let exp = if blksize > 512 {
            (blksize / 512).trailing_zeros()
        } else {
            0
        };
        let mut exponent = || {
            let r = run_ring(&mut port, &d, &rc16, None);
            let mut x = [0u8; 14];
            r.buf.as_ref().unwrap().read_at(0, &mut x);
            u32::from(x[13])
        };
        assert_eq!(exponent(), exp);
        d.set_attr("lb_per_pb_exp", "0").unwrap();
        assert_eq!(exponent(), 0);
        // COMPARE AND WRITE through the ring: a read, a compare, then a write.
        let mut caw = [0u8; 16];
        caw[0] = COMPARE_AND_WRITE;
        caw[9] = 3;
        caw[13] = 1;
        let mut out = vec![0x3c; 512];
        out.extend_from_slice(&[0x11; 512]);
        let c = run_ring(&mut port, &d, &caw, Some(&out));
        assert_eq!(c.status, STATUS_GOOD);
        assert_eq!(std::fs::read(&f).unwrap()[1536..2048], [0x11; 512]);
        let c = run_ring(&mut port, &d, &caw, Some(&out));
        assert_eq!(c.sense()[2] & 0x0f, sense::MISCOMPARE);
        assert_eq!(port.inflight(), 0);
        // PRE-FETCH starts a read-ahead on the ring and completes GOOD.
        let p = run_ring(
            &mut port,
            &d,
            &[PRE_FETCH_10, 0, 0, 0, 0, 0, 0, 0, 64, 0],
            None,
        );
        assert_eq!(p.status, STATUS_GOOD);
        assert_eq!(port.inflight(), 0);
        // Inactive: NOT READY, LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED.
        d.set_attr("active", "0").unwrap();
        let r = run_ring(&mut port, &d, &[READ_10, 0, 0, 0, 0, 3, 0, 0, 1, 0], None);
        assert_eq!(
            (r.sense()[2], r.sense()[12], r.sense()[13]),
            (2, 0x04, 0x03)
        );
    }

    #[test]
    fn stalled_sanitize_jobs_go_on_at_the_next_poll() {
        let mut port = ScsiPort::new();
        let mut devs = Vec::new();
        for (i, name) in ["s0", "s1", "s2"].into_iter().enumerate() {
            let d = Device::create("vdisk_ramio", name, &[("size_mb".into(), "1".into())]).unwrap();
            assert!(d.sanitize_begin());
            let id = JOB_TAG | i as u64;
            port.jobs.insert(
                id,
                Job::Sanitize(SanitizeJob {
                    dev: d.clone(),
                    task: None,
                    overwrite: Some(Overwrite {
                        passes: 1,
                        invert: false,
                        pattern: vec![0xa5 + i as u8],
                    }),
                    ause: false,
                    size: d.num_blocks() * u64::from(d.block_size()),
                    pass: 0,
                    pos: 0,
                    flushing: false,
                    // As if the pool had had no buffer for its first piece.
                    stalled: true,
                }),
            );
            devs.push(d);
        }
        let mut out = Vec::new();
        for _ in 0..10_000 {
            if port.jobs.is_empty() {
                break;
            }
            port.poll(&mut out);
            port.io.wait();
        }
        assert!(port.jobs.is_empty(), "every stalled job went on to its end");
        assert!(out.is_empty(), "no task waited for them");
        for (i, d) in devs.iter().enumerate() {
            assert_eq!(d.sanitize_state(), Sanitize::Idle);
            let r = run_ring(&mut port, d, &[0x28, 0, 0, 0, 0, 9, 0, 0, 1, 0], None);
            let mut back = vec![0u8; 512];
            r.buf.as_ref().unwrap().read_at(0, &mut back);
            assert_eq!(back, vec![0xa5 + i as u8; 512]);
        }
    }

    #[test]
    fn sanitize_progress_of_a_large_medium() {
        assert_eq!(progress(0, 1, 0, 0), 0);
        assert_eq!(progress(0, 1, 1 << 20, 1 << 19), 32768);
        assert_eq!(progress(1, 2, 1 << 20, 0), 32768);
        // 31 passes over 16 TiB, and one over 1 PiB: past 64 bits once times 65536.
        let tib16 = 16u64 << 40;
        assert_eq!(progress(30, 31, tib16, tib16 / 2), 64478);
        assert_eq!(progress(0, 1, 1 << 50, 3 << 48), 49152);
        assert_eq!(progress(30, 31, tib16, tib16), 65535);
    }

    #[test]
    fn backend_errors_map_to_sense() {
        let w = IoOp::Write { fua: false };
        let s = failed(BdevError::NoSpace, w, 512, true);
        assert_eq!((s[2], s[12], s[13]), (sense::DATA_PROTECT, 0x27, 0x07));
        let s = failed(BdevError::NoSpace, w, 512, false);
        assert_eq!((s[2], s[12], s[13]), (sense::MEDIUM_ERROR, 0x0c, 0x00));
        // The LBA of the failing byte, in blocks of the device, with VALID set.
        let s = failed(BdevError::Io(4096 * 7 + 100), IoOp::Read, 4096, false);
        assert_eq!((s[2], s[12], s[13]), (sense::MEDIUM_ERROR, 0x11, 0x00));
        assert_eq!(s[0], 0xf0);
        assert_eq!(&s[3..7], &7u32.to_be_bytes());
        let s = failed(BdevError::Io(1024), w, 512, false);
        assert_eq!((s[12], s[13], s[6]), (0x0c, 0x00, 2));
        // An LBA past the four bytes of the fixed format: VALID clear.
        let s = failed(BdevError::Io(512 << 33), IoOp::Read, 512, false);
        assert_eq!(s[0], 0x70);
        let s = failed(BdevError::Offline, IoOp::Read, 512, false);
        assert_eq!((s[2], s[12], s[13]), (sense::NOT_READY, 0x04, 0x03));
        let s = failed(BdevError::NoMedium, IoOp::Read, 2048, false);
        assert_eq!((s[2], s[12], s[13]), (sense::NOT_READY, 0x3a, 0x00));
        let s = failed(BdevError::BadBuffer, w, 512, false);
        assert_eq!((s[2], s[12]), (sense::HARDWARE_ERROR, 0x44));
        let s = failed(BdevError::WriteProtected, w, 512, false);
        assert_eq!((s[2], s[12], s[13]), (sense::DATA_PROTECT, 0x27, 0x00));
    }
}

//! Command execution (SPC-4, SBC-3) in two phases: [`plan`] decodes the CDB and checks it
//! before any data moves (so the transport knows how much Data-Out to solicit and can fail a
//! bad command at once), then [`ScsiPort::execute`] runs it: emulated commands complete at
//! once, I/O goes to the device's channel on this reactor and comes back from
//! [`ScsiPort::poll`].
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::bdev::{BdevCompletion, BdevError, BdevIo, IoChannel, IoContext, IoOp};
use crate::env::buf::MAX_TRANSFER;
use crate::env::DataBuf;
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;

/// Operation codes (SPC-4, SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}
use opcode::*;

/// SERVICE ACTION IN(16) service action READ CAPACITY(16).
const SAI_READ_CAPACITY_16: u8 = 0x10;

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Data-In: from the target to the initiator.
    In,
    /// Data-Out: from the initiator to the target.
    Out,
}

/// What a command needs before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub dir: DataDir,
    /// Bytes the CDB transfers (or, for Data-In emulated commands, the allocation length).
    pub len: u32,
}

/// One SCSI command and its outcome.
pub struct ScsiTask {
    pub cdb: [u8; 16],
    pub cdb_len: usize,
    pub lun: u64,
    /// The I_T nexus (for unit attentions).
    pub nexus: u64,
    /// The transport's handle, echoed in completions.
    pub tag: u64,
    /// The LUN is mapped read-only.
    pub read_only: bool,
    /// For VPD page 0x83: the target's name and relative port.
    pub target_name: Option<Arc<str>>,
    pub rel_tgt_id: u16,
    pub buf: Option<DataBuf>,
    /// A second buffer (VERIFY with BYTCHK=1 reads the medium into it to compare).
    aux: Option<DataBuf>,
    pub status: u8,
    sense: [u8; sense::FIXED_LEN],
    sense_len: usize,
    /// Bytes of `buf` valid for Data-In.
    pub data_in_len: u32,
    /// Decoded by `plan`: the I/O range in bytes.
    io: Option<(IoOp, u64, u32)>,
    verify_compare: bool,
}

impl ScsiTask {
    pub fn new(cdb: &[u8], lun: u64, nexus: u64) -> ScsiTask {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        ScsiTask {
            cdb: c,
            cdb_len: cdb.len(),
            lun,
            nexus,
            tag: 0,
            read_only: false,
            target_name: None,
            rel_tgt_id: 1,
            buf: None,
            aux: None,
            status: STATUS_GOOD,
            sense: [0; sense::FIXED_LEN],
            sense_len: 0,
            data_in_len: 0,
            io: None,
            verify_compare: false,
        }
    }

    pub fn opcode(&self) -> u8 {
        self.cdb[0]
    }

    pub fn sense(&self) -> &[u8] {
        &self.sense[..self.sense_len]
    }

    pub fn sense_len(&self) -> usize {
        self.sense_len
    }

    pub fn fail(&mut self, s: Sense) {
        self.status = STATUS_CHECK_CONDITION;
        self.sense = s.to_fixed();
        self.sense_len = sense::FIXED_LEN;
        self.data_in_len = 0;
    }

    pub fn set_check_condition(&mut self, key: u8, asc: u8, ascq: u8) {
        self.fail(Sense::new(key, (asc, ascq)));
    }

    /// Copies `data` into the Data-In buffer (as much as fits) and records its length.
    fn reply(&mut self, data: &[u8]) {
        let n = match self.buf.as_mut() {
            Some(b) => {
                let n = data.len().min(b.len());
                b.write_at(0, &data[..n]);
                n
            }
            None => 0,
        };
        self.data_in_len = n as u32;
    }
}

/// SAM-5 §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE do not report unit attentions.
pub fn ua_applies(task: &ScsiTask) -> bool {
    !matches!(task.opcode(), INQUIRY | REPORT_LUNS | REQUEST_SENSE)
}

fn be16(b: &[u8]) -> u32 {
    (u32::from(b[0]) << 8) | u32::from(b[1])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The CDB length by group code (SPC-4 §4.2.5.1).
fn cdb_len_of(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

/// Decodes and checks a command before its data moves. On error the task holds the sense.
#[allow(clippy::result_unit_err)]
pub fn plan(dev: &Device, task: &mut ScsiTask) -> Result<Plan, ()> {
    let op = task.opcode();
    if task.cdb_len > 16 {
        task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        ));
        return Err(());
    }
    if ua_applies(task) {
        if let Some((asc, ascq)) = dev.take_ua(task.nexus) {
            task.fail(Sense::new(sense::UNIT_ATTENTION, (asc, ascq)));
            return Err(());
        }
    }
    // CONTROL byte: NACA (bit 2) is not supported (SAM-5 §5.9).
    let clen = cdb_len_of(op);
    if clen > 0 && task.cdb[clen - 1] & 0x04 != 0 {
        task.fail(Sense::invalid_cdb_field(clen as u16 - 1, Some(2)));
        return Err(());
    }
    let c = task.cdb;
    let none = Ok(Plan {
        dir: DataDir::None,
        len: 0,
    });
    let din = |len: u32| {
        Ok(Plan {
            dir: DataDir::In,
            len,
        })
    };
    match op {
        TEST_UNIT_READY | START_STOP_UNIT | PREVENT_ALLOW => none,
        INQUIRY => {
            if c[1] & 0x01 == 0 && c[2] != 0 {
                task.fail(Sense::invalid_cdb_field(2, None));
                return Err(());
            }
            if c[1] & 0xfe != 0 {
                task.fail(Sense::invalid_cdb_field(1, None));
                return Err(());
            }
            din(be16(&c[3..5]))
        }
        REQUEST_SENSE => din(u32::from(c[4])),
        MODE_SENSE_6 => din(u32::from(c[4])),
        MODE_SENSE_10 => din(be16(&c[7..9])),
        READ_CAPACITY_10 => din(8),
        SERVICE_ACTION_IN_16 if c[1] & 0x1f == SAI_READ_CAPACITY_16 => din(be32(&c[10..14])),
        REPORT_LUNS => din(be32(&c[6..10])),
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
            let (lba, n) = if op == SYNCHRONIZE_CACHE_10 {
                (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])))
            } else {
                (be64(&c[2..10]), u64::from(be32(&c[10..14])))
            };
            check_range(dev, task, lba, n)?;
            task.io = Some((IoOp::Flush, 0, 0));
            none
        }
        READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
        | WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 | VERIFY_10 | VERIFY_12
        | VERIFY_16 => plan_rw(dev, task),
        _ => {
            task.fail(Sense::new(
                sense::ILLEGAL_REQUEST,
                sense::INVALID_COMMAND_OPERATION_CODE,
            ));
            Err(())
        }
    }
}

fn check_range(dev: &Device, task: &mut ScsiTask, lba: u64, blocks: u64) -> Result<(), ()> {
    let end = lba.checked_add(blocks);
    if lba >= dev.num_blocks() && blocks > 0
        || end.is_none_or(|e| e > dev.num_blocks())
        || lba > dev.num_blocks()
    {
        task.fail(Sense::new(sense::ILLEGAL_REQUEST, sense::LBA_OUT_OF_RANGE));
        return Err(());
    }
    Ok(())
}

fn plan_rw(dev: &Device, task: &mut ScsiTask) -> Result<Plan, ()> {
    let c = task.cdb;
    let op = c[0];
    let (lba, blocks) = match op {
        READ_6 | WRITE_6 => {
            let lba = (u64::from(c[1] & 0x1f) << 16) | (u64::from(c[2]) << 8) | u64::from(c[3]);
            // SBC-3 §5.15: a transfer length of 0 means 256 blocks.
            let n = if c[4] == 0 { 256 } else { u64::from(c[4]) };
            (lba, n)
        }
        READ_10 | WRITE_10 | WRITE_VERIFY_10 | VERIFY_10 => {
            (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])))
        }
        READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => {
            (u64::from(be32(&c[2..6])), u64::from(be32(&c[6..10])))
        }
        _ => (be64(&c[2..10]), u64::from(be32(&c[10..14]))),
    };
    let write = matches!(
        op,
        WRITE_6
            | WRITE_10
            | WRITE_12
            | WRITE_16
            | WRITE_VERIFY_10
            | WRITE_VERIFY_12
            | WRITE_VERIFY_16
    );
    let verify = matches!(op, VERIFY_10 | VERIFY_12 | VERIFY_16);
    // RDPROTECT/WRPROTECT/VRPROTECT (bits 7-5 of byte 1): no protection information here.
    if !matches!(op, READ_6 | WRITE_6) && c[1] & 0xe0 != 0 {
        task.fail(Sense::invalid_cdb_field(1, Some(5)));
        return Err(());
    }
    check_range(dev, task, lba, blocks)?;
    if write && (task.read_only || dev.is_read_only()) {
        task.fail(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
        return Err(());
    }
    let bs = u64::from(dev.block_size());
    let bytes = blocks * bs;
    if bytes > MAX_TRANSFER as u64 {
        task.fail(Sense::invalid_cdb_field(
            if matches!(op, READ_6 | WRITE_6) { 4 } else { 7 },
            None,
        ));
        return Err(());
    }
    let offset = lba * bs;
    if verify {
        // BYTCHK (byte 1, bits 2-1): 00b checks the medium only; 01b compares Data-Out.
        let bytchk = (c[1] >> 1) & 0x3;
        return match bytchk {
            0 => {
                task.io = None;
                Ok(Plan {
                    dir: DataDir::None,
                    len: 0,
                })
            }
            1 => {
                task.verify_compare = true;
                task.io = Some((IoOp::Read, offset, bytes as u32));
                Ok(Plan {
                    dir: DataDir::Out,
                    len: bytes as u32,
                })
            }
            _ => {
                task.fail(Sense::invalid_cdb_field(1, Some(1)));
                Err(())
            }
        };
    }
    if write {
        // FUA is bit 3 of byte 1 (not in WRITE(6)); WRITE AND VERIFY is durable anyway.
        let fua = !matches!(op, WRITE_6) && c[1] & 0x08 != 0
            || matches!(op, WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16);
        task.io = Some((IoOp::Write { fua }, offset, bytes as u32));
        Ok(Plan {
            dir: DataDir::Out,
            len: bytes as u32,
        })
    } else {
        task.io = Some((IoOp::Read, offset, bytes as u32));
        Ok(Plan {
            dir: DataDir::In,
            len: bytes as u32,
        })
    }
}

impl ScsiTask {
    /// The transport carries only the first `len` bytes of a WRITE's Data-Out (iSCSI's
    /// expected data transfer length is below what the CDB asks for): write just those
    /// blocks and leave the rest of the range untouched. Returns false, changing nothing,
    /// when `len` does not end on a block boundary or the command is not a plain write.
    pub fn limit_write(&mut self, len: u32, block_size: u32) -> bool {
        match &mut self.io {
            Some((IoOp::Write { .. }, _, io_len))
                if !self.verify_compare && block_size > 0 && len.is_multiple_of(block_size) =>
            {
                *io_len = (*io_len).min(len);
                true
            }
            _ => false,
        }
    }
}

/// Whether an execution finished at once or went to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    Done,
    Pending,
}

/// A backend completion for a task, with what the sense data needs from its device.
pub struct Completion(BdevCompletion, DevInfo);

/// What [`complete`] needs to know of the device an I/O went to.
#[derive(Debug, Clone, Copy)]
struct DevInfo {
    block_size: u32,
    thin: bool,
}

impl Completion {
    pub fn tag(&self) -> u64 {
        self.0.tag
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

/// The SCSI core's state on one reactor: one channel per device, opened on first use, and
/// the reactor's backend I/O context (its io_uring, shared by every file and block device).
pub struct ScsiPort {
    // Declared before `io`: channels go first, then the ring waits out what is in flight.
    channels: HashMap<usize, PortChannel>,
    io: IoContext,
    scratch: Vec<BdevCompletion>,
}

impl Default for ScsiPort {
    fn default() -> Self {
        Self::new()
    }
}

impl ScsiPort {
    pub fn new() -> ScsiPort {
        ScsiPort {
            channels: HashMap::new(),
            io: IoContext::new(),
            scratch: Vec::with_capacity(256),
        }
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
                info: DevInfo {
                    block_size: dev.block_size(),
                    thin: dev.thin_provisioned(),
                },
            })
            .ch
    }

    /// Backend operations in flight in the kernel. While there are any the reactor must not
    /// sleep in epoll: their completions arrive on the ring, not on a socket.
    pub fn inflight(&self) -> usize {
        self.io.inflight()
    }

    /// Runs a planned task.
    pub fn execute(&mut self, dev: &Arc<Device>, task: &mut ScsiTask) -> Exec {
        if task.status != STATUS_GOOD {
            return Exec::Done;
        }
        match task.opcode() {
            READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
            | WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 | VERIFY_10 | VERIFY_12
            | VERIFY_16 | SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
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
                            task.status = 0x28; // TASK SET FULL
                            return Exec::Done;
                        }
                    }
                } else {
                    task.buf.take()
                };
                let tag = task.tag;
                self.channel(dev).submit(BdevIo {
                    tag,
                    op,
                    offset,
                    len,
                    buf,
                    ranges: Vec::new(),
                });
                Exec::Pending
            }
            _ => {
                emulate(dev, task);
                Exec::Done
            }
        }
    }

    /// Submits this pass's ring I/O and collects completions of this reactor's backend I/O.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        self.io.poll();
        let mut n = 0;
        let scratch = &mut self.scratch;
        self.channels.retain(|_, pc| {
            scratch.clear();
            n += pc.ch.poll(scratch);
            let info = pc.info;
            out.extend(scratch.drain(..).map(|c| Completion(c, info)));
            // A deleted device's channel goes once its last I/O is back, releasing the
            // backend (a RAM disk's memory, a file's descriptor).
            pc.dev.strong_count() > 0 || pc.ch.busy()
        });
        n
    }
}

/// Applies a backend completion to its task.
pub fn complete(task: &mut ScsiTask, c: Completion) {
    let Completion(c, info) = c;
    if task.verify_compare {
        task.aux = c.buf;
    } else if c.buf.is_some() {
        task.buf = c.buf;
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
        // SPC-4 §4.5.3: the INFORMATION field holds the first failing LBA; VALID only when
        // it fits the fixed format's four bytes.
        BdevError::Io(off) => Sense {
            information: u32::try_from(off / u64::from(info.block_size.max(1))).ok(),
            ..medium()
        },
        BdevError::BadBuffer => Sense::new(sense::HARDWARE_ERROR, INTERNAL_TARGET_FAILURE),
        BdevError::Offline => Sense::new(sense::NOT_READY, NOT_READY_MANUAL_INTERVENTION),
        BdevError::NoMedium => Sense::new(sense::NOT_READY, MEDIUM_NOT_PRESENT),
    }
}

#[cfg(test)]
mod completion_tests {
    use super::*;

    fn failed(e: BdevError, op: IoOp, block_size: u32, thin: bool) -> [u8; sense::FIXED_LEN] {
        let mut t = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        t.io = Some((op, 0, 512));
        let c = BdevCompletion {
            tag: 0,
            result: Err(e),
            buf: None,
        };
        complete(&mut t, Completion(c, DevInfo { block_size, thin }));
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
        plan(&d, &mut t).unwrap();
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

    /// Runs a command through a port until its ring I/O completes.
    fn run_ring(port: &mut ScsiPort, d: &Arc<Device>, cdb: &[u8], data: Option<&[u8]>) -> ScsiTask {
        let mut t = ScsiTask::new(cdb, 0, 1);
        let p = plan(d, &mut t).unwrap();
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
        // Inactive: NOT READY, LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED.
        d.set_attr("active", "0").unwrap();
        let r = run_ring(&mut port, &d, &[READ_10, 0, 0, 0, 0, 3, 0, 0, 1, 0], None);
        assert_eq!(
            (r.sense()[2], r.sense()[12], r.sense()[13]),
            (2, 0x04, 0x03)
        );
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
    }
}

fn verify_compare(task: &mut ScsiTask, len: u32) {
    let (Some(a), Some(b)) = (task.buf.as_ref(), task.aux.as_ref()) else {
        return;
    };
    let mut x = [0u8; 4096];
    let mut y = [0u8; 4096];
    let mut off = 0usize;
    while off < len as usize {
        let n = (len as usize - off).min(4096);
        a.read_at(off, &mut x[..n]);
        b.read_at(off, &mut y[..n]);
        if let Some(i) = (0..n).find(|&i| x[i] != y[i]) {
            let mut s = Sense::new(sense::MISCOMPARE, sense::MISCOMPARE_DURING_VERIFY);
            s.information = u32::try_from(off + i).ok();
            task.fail(s);
            task.aux = None;
            return;
        }
        off += n;
    }
    task.aux = None;
}

/// Commands for a LUN that is not mapped: REPORT LUNS, INQUIRY (peripheral qualifier 3) and
/// REQUEST SENSE answer; everything else is LOGICAL UNIT NOT SUPPORTED (SPC-4 §4.9).
pub fn execute_no_lun(task: &mut ScsiTask, luns: &[u64]) {
    match task.opcode() {
        REPORT_LUNS => report_luns(task, luns),
        INQUIRY => {
            let c = task.cdb;
            if c[1] & 0x01 != 0 {
                task.fail(Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::LOGICAL_UNIT_NOT_SUPPORTED,
                ));
                return;
            }
            let mut d = [0u8; 36];
            d[0] = 0x7f; // PQ 011b: no logical unit; type 1Fh
            d[2] = 0x06;
            d[3] = 0x12;
            d[4] = 31;
            task.reply(&d);
            let alloc = be16(&c[3..5]) as usize;
            task.data_in_len = task.data_in_len.min(alloc as u32);
        }
        REQUEST_SENSE => {
            let s =
                Sense::new(sense::ILLEGAL_REQUEST, sense::LOGICAL_UNIT_NOT_SUPPORTED).to_fixed();
            let alloc = usize::from(task.cdb[4]);
            task.reply(&s[..alloc.min(s.len())]);
        }
        _ => task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::LOGICAL_UNIT_NOT_SUPPORTED,
        )),
    }
}

/// REPORT LUNS (SPC-4 §6.33) for the LUN list of the I_T nexus.
pub fn report_luns(task: &mut ScsiTask, luns: &[u64]) {
    let c = task.cdb;
    let alloc = be32(&c[6..10]) as usize;
    if alloc < 16 {
        task.fail(Sense::invalid_cdb_field(6, None));
        return;
    }
    let select = c[2];
    let list: Vec<u64> = match select {
        0x00 | 0x02 => luns.to_vec(),
        0x01 => Vec::new(),
        0x10 | 0x11 => {
            if task.lun == 0 {
                luns.to_vec()
            } else {
                Vec::new()
            }
        }
        0x12 => Vec::new(),
        _ => {
            task.fail(Sense::invalid_cdb_field(2, None));
            return;
        }
    };
    let mut d = Vec::with_capacity(8 + list.len() * 8);
    d.extend_from_slice(&((list.len() * 8) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in list {
        d.extend_from_slice(&crate::scsi::lun_field(l).to_be_bytes());
    }
    d.truncate(alloc);
    task.reply(&d);
}

fn emulate(dev: &Device, task: &mut ScsiTask) {
    match task.opcode() {
        TEST_UNIT_READY | START_STOP_UNIT => {}
        PREVENT_ALLOW => {}
        INQUIRY => inquiry(dev, task),
        REQUEST_SENSE => {
            if task.cdb[1] & 0x01 != 0 {
                // DESC=1: descriptor format is not supported.
                task.fail(Sense::invalid_cdb_field(1, Some(0)));
                return;
            }
            let s = match dev.take_ua(task.nexus) {
                Some(code) => Sense::new(sense::UNIT_ATTENTION, code).to_fixed(),
                None => Sense::new(sense::NO_SENSE, (0, 0)).to_fixed(),
            };
            let alloc = usize::from(task.cdb[4]);
            task.reply(&s[..alloc.min(s.len())]);
        }
        READ_CAPACITY_10 => {
            let last = dev.num_blocks().saturating_sub(1);
            let mut d = [0u8; 8];
            d[0..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
            d[4..8].copy_from_slice(&dev.block_size().to_be_bytes());
            task.reply(&d);
        }
        SERVICE_ACTION_IN_16 => {
            let mut d = [0u8; 32];
            d[0..8].copy_from_slice(&dev.num_blocks().saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&dev.block_size().to_be_bytes());
            let alloc = be32(&task.cdb[10..14]) as usize;
            task.reply(&d[..alloc.min(32)]);
        }
        MODE_SENSE_6 | MODE_SENSE_10 => mode_sense(dev, task),
        REPORT_LUNS => report_luns(task, &[task.lun]),
        _ => task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_COMMAND_OPERATION_CODE,
        )),
    }
}

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

fn inquiry(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let alloc = be16(&c[3..5]) as usize;
    let id = dev.ident();
    let mut d: Vec<u8> = Vec::with_capacity(96);
    if c[1] & 0x01 == 0 {
        // Standard INQUIRY data (SPC-4 §6.4.2).
        d.resize(96, 0);
        d[0] = 0x00; // connected, direct access block device
        d[1] = if dev.is_removable() { 0x80 } else { 0 };
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HiSup, response data format 2
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(&pad(&id.t10_vend_id, 8));
        d[16..32].copy_from_slice(&pad(&id.prod_id, 16));
        d[32..36].copy_from_slice(&pad(&id.prod_rev_lvl, 4));
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
            d[58 + i * 2..60 + i * 2].copy_from_slice(&v.to_be_bytes());
        }
        d[4] = (d.len() - 5) as u8;
    } else {
        let page = c[2];
        d.extend_from_slice(&[0x00, page, 0, 0]);
        match page {
            0x00 => d.extend_from_slice(&[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]),
            0x80 => d.extend_from_slice(id.usn.as_bytes()),
            0x83 => {
                // T10 vendor ID based designator (ASCII, logical unit).
                let mut t10 = pad(&id.t10_vend_id, 8);
                t10.extend_from_slice(id.t10_dev_id.as_bytes());
                d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                d.extend_from_slice(&t10);
                // NAA designator (binary, logical unit).
                d.extend_from_slice(&[0x01, 0x03, 0x00, id.naa_id.len() as u8]);
                d.extend_from_slice(&id.naa_id);
                // Relative target port (binary, target port, PIV, iSCSI).
                d.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
                d.extend_from_slice(&task.rel_tgt_id.to_be_bytes());
                // SCSI name string of the target device (UTF-8, PIV, iSCSI).
                if let Some(name) = task.target_name.as_deref() {
                    let mut s = name.as_bytes().to_vec();
                    s.push(0);
                    while s.len() % 4 != 0 {
                        s.push(0);
                    }
                    if s.len() <= 252 {
                        d.extend_from_slice(&[0x53, 0xa8, 0x00, s.len() as u8]);
                        d.extend_from_slice(&s);
                    }
                }
            }
            0xb0 => {
                // Block Limits (SBC-3 §6.5.3).
                let mut p = [0u8; 0x3c];
                let bs = dev.block_size();
                p[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer length granularity
                p[4..8].copy_from_slice(&((MAX_TRANSFER as u32) / bs).to_be_bytes());
                p[8..12].copy_from_slice(&(id.opt_trans_len / bs).to_be_bytes());
                d.extend_from_slice(&p);
            }
            0xb1 => {
                // Block Device Characteristics: rotation rate 1 = non-rotating medium.
                let mut p = [0u8; 0x3c];
                let rate: u16 = if dev.is_rotational() { 0 } else { 1 };
                p[0..2].copy_from_slice(&rate.to_be_bytes());
                d.extend_from_slice(&p);
            }
            0xb2 => {
                // Logical Block Provisioning: fully provisioned, no unmap.
                d.extend_from_slice(&[0, 0, 0, 0]);
            }
            _ => {
                task.fail(Sense::invalid_cdb_field(2, None));
                return;
            }
        }
        let len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
    }
    d.truncate(alloc);
    task.reply(&d);
}

fn mode_sense(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let ten = c[0] == MODE_SENSE_10;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = c[2] >> 6;
    let page = c[2] & 0x3f;
    let subpage = c[3];
    let alloc = if ten { be16(&c[7..9]) } else { u32::from(c[4]) } as usize;
    if pc == 3 {
        task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::SAVING_PARAMETERS_NOT_SUPPORTED,
        ));
        return;
    }
    let changeable = pc == 1;
    let mut pages: Vec<u8> = Vec::new();
    let want = |p: u8| page == 0x3f || page == p;
    if subpage != 0 && subpage != 0xff {
        task.fail(Sense::invalid_cdb_field(3, None));
        return;
    }
    if want(0x01) {
        // Read-Write Error Recovery (SBC-3 §6.4.8).
        let mut p = [0u8; 12];
        p[0] = 0x01;
        p[1] = 10;
        if !changeable {
            p[2] = 0xc0; // AWRE, ARRE
        }
        pages.extend_from_slice(&p);
    }
    if want(0x08) {
        // Caching (SBC-3 §6.4.5): WCE when the backend has a volatile cache.
        let mut p = [0u8; 20];
        p[0] = 0x08;
        p[1] = 18;
        if !changeable && dev.bdev.has_volatile_cache() {
            p[2] = 0x04;
        }
        pages.extend_from_slice(&p);
    }
    if want(0x0a) {
        // Control (SPC-4 §7.5.8): TST 000b, QErr 00b, TAS 1, D_SENSE 0.
        let mut p = [0u8; 12];
        p[0] = 0x0a;
        p[1] = 10;
        if !changeable {
            p[5] = 0x40; // TAS
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
        }
        pages.extend_from_slice(&p);
    }
    if pages.is_empty() {
        task.fail(Sense::invalid_cdb_field(2, Some(5)));
        return;
    }
    let mut block_desc: Vec<u8> = Vec::new();
    if !dbd {
        let bs = dev.block_size();
        if llbaa {
            block_desc.extend_from_slice(&dev.num_blocks().to_be_bytes());
            block_desc.extend_from_slice(&[0, 0, 0, 0]);
            block_desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            let n = u32::try_from(dev.num_blocks()).unwrap_or(u32::MAX);
            block_desc.extend_from_slice(&n.to_be_bytes());
            block_desc.push(0);
            block_desc.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP and DPOFUA (SBC-3 §6.4.1).
    let wp = if task.read_only || dev.is_read_only() {
        0x80
    } else {
        0
    };
    let dsp = wp | 0x10;
    let mut d = Vec::new();
    if ten {
        let total = 8 + block_desc.len() + pages.len();
        d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(if llbaa { 0x01 } else { 0 });
        d.push(0);
        d.extend_from_slice(&(block_desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + block_desc.len() + pages.len();
        d.push((total - 1).min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(block_desc.len() as u8);
    }
    d.extend_from_slice(&block_desc);
    d.extend_from_slice(&pages);
    d.truncate(alloc);
    task.reply(&d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Arc<Device> {
        Device::create("vdisk_ramio", "t0", &[("size_mb".into(), "1".into())]).unwrap()
    }

    /// Runs a command to completion the way the transport does.
    fn run(d: &Arc<Device>, cdb: &[u8], data_out: Option<&[u8]>) -> ScsiTask {
        let mut t = ScsiTask::new(cdb, 0, 7);
        let Ok(plan) = plan(d, &mut t) else { return t };
        if plan.len > 0 {
            let mut b = DataBuf::alloc(plan.len as usize).unwrap();
            if let Some(x) = data_out {
                b.write_at(0, x);
            }
            t.buf = Some(b);
        }
        let mut port = ScsiPort::new();
        if port.execute(d, &mut t) == Exec::Pending {
            let mut out = Vec::new();
            port.poll(&mut out);
            complete(&mut t, out.pop().unwrap());
        }
        t
    }

    fn data(t: &ScsiTask) -> Vec<u8> {
        let mut v = vec![0u8; t.data_in_len as usize];
        t.buf.as_ref().map(|b| b.read_at(0, &mut v));
        v
    }

    fn asc(t: &ScsiTask) -> (u8, u8, u8) {
        let s = t.sense();
        (s[2] & 0xf, s[12], s[13])
    }

    #[test]
    fn write_then_read() {
        let d = dev();
        let w = run(
            &d,
            &[WRITE_10, 0x08, 0, 0, 0, 5, 0, 0, 2, 0],
            Some(&[0xab; 1024]),
        );
        assert_eq!(w.status, 0);
        let r = run(
            &d,
            &[READ_16, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0],
            None,
        );
        assert_eq!(data(&r), vec![0xab; 1024]);
        // VERIFY with BYTCHK=1 compares.
        let v = run(
            &d,
            &[VERIFY_10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0],
            Some(&[0xab; 1024]),
        );
        assert_eq!(v.status, 0);
        let mut other = vec![0xab; 1024];
        other[700] = 0;
        let v = run(&d, &[VERIFY_10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0], Some(&other));
        assert_eq!(asc(&v), (sense::MISCOMPARE, 0x1d, 0));
    }

    #[test]
    fn range_checks() {
        let d = dev();
        let last = (d.num_blocks() - 1) as u32;
        let mut cdb = [READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        cdb[2..6].copy_from_slice(&last.to_be_bytes());
        assert_eq!(run(&d, &cdb, None).status, 0);
        cdb[2..6].copy_from_slice(&(last + 1).to_be_bytes());
        assert_eq!(asc(&run(&d, &cdb, None)), (5, 0x21, 0));
        let mut c16 = [0u8; 16];
        c16[0] = READ_16;
        c16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c16[13] = 2;
        assert_eq!(
            asc(&run(&d, &c16, None)),
            (5, 0x21, 0),
            "wrapping past 2^64"
        );
        assert_eq!(asc(&run(&d, &[0xd9, 0, 0, 0, 0, 0], None)), (5, 0x20, 0));
    }

    #[test]
    fn inquiry_and_capacity() {
        let d = dev();
        let t = run(&d, &[INQUIRY, 0, 0, 0, 96, 0], None);
        let x = data(&t);
        assert_eq!(x.len(), 96);
        assert_eq!(&x[8..16], b"ISCSITGT");
        let t = run(&d, &[INQUIRY, 0, 0, 0, 5, 0], None);
        assert_eq!(t.data_in_len, 5, "allocation length truncates");
        let t = run(&d, &[INQUIRY, 1, 0x00, 0, 255, 0], None);
        assert_eq!(&data(&t)[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        assert_eq!(
            asc(&run(&d, &[INQUIRY, 0, 0x80, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
        assert_eq!(
            asc(&run(&d, &[INQUIRY, 1, 0x99, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
        let t = run(
            &d,
            &[
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
            ],
            None,
        );
        let x = data(&t);
        assert_eq!(
            u64::from_be_bytes(x[0..8].try_into().unwrap()),
            d.num_blocks() - 1
        );
    }

    #[test]
    fn unit_attention_then_clear() {
        let d = dev();
        d.register_nexus(7);
        let t = run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None);
        assert_eq!(asc(&t), (6, 0x29, 0));
        assert_eq!(run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None).status, 0);
        d.add_ua_all(0x3f, 0x03);
        // INQUIRY does not report it; TUR does.
        assert_eq!(run(&d, &[INQUIRY, 0, 0, 0, 36, 0], None).status, 0);
        assert_eq!(
            asc(&run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None)),
            (6, 0x3f, 3)
        );
    }

    #[test]
    fn mode_sense() {
        let d = dev();
        let t = run(&d, &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None);
        let x = data(&t);
        assert_eq!(x[0] as usize, x.len() - 1);
        assert_eq!(x[3], 8, "block descriptor");
        let t = run(&d, &[MODE_SENSE_6, 0, 0x0a, 0, 255, 0], None);
        let x = data(&t);
        assert_eq!(&x[12..14], &[0x0a, 10]);
        assert_eq!(
            asc(&run(&d, &[MODE_SENSE_6, 0, 0xca, 0, 255, 0], None)),
            (5, 0x39, 0)
        );
        assert_eq!(
            asc(&run(&d, &[MODE_SENSE_6, 0, 0x22, 0, 255, 0], None)),
            (5, 0x24, 0)
        );
        let t = run(&d, &[MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0], None);
        let x = data(&t);
        assert_eq!(u16::from_be_bytes([x[0], x[1]]) as usize, x.len() - 2);
    }

    #[test]
    fn read_only_lun_refuses_writes() {
        let d = dev();
        let mut t = ScsiTask::new(&[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
        t.read_only = true;
        assert!(plan(&d, &mut t).is_err());
        assert_eq!(asc(&t), (7, 0x27, 0));
    }

    #[test]
    fn report_luns_and_missing_lun() {
        let mut t = ScsiTask::new(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 0, 1);
        t.buf = DataBuf::alloc(256);
        execute_no_lun(&mut t, &[0, 1]);
        assert_eq!(t.data_in_len, 24);
        let mut t = ScsiTask::new(&[TEST_UNIT_READY, 0, 0, 0, 0, 0], 3, 1);
        execute_no_lun(&mut t, &[0]);
        assert_eq!(asc(&t), (5, 0x25, 0));
        let mut t = ScsiTask::new(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 0, 1);
        execute_no_lun(&mut t, &[0]);
        assert_eq!(asc(&t), (5, 0x24, 0));
    }

    #[test]
    fn a_shortened_write_touches_only_the_blocks_sent() {
        let d = dev();
        run(&d, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], Some(&[b'a'; 1024]));
        // WRITE(10) of two blocks of which the transport delivers one.
        let mut t = ScsiTask::new(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0, 7);
        let p = plan(&d, &mut t).unwrap();
        assert_eq!(p.len, 1024);
        assert!(
            !t.limit_write(200, 512),
            "a partial block cannot be written"
        );
        assert!(t.limit_write(512, 512));
        let mut b = DataBuf::alloc(1024).unwrap();
        b.write_at(0, &[b'b'; 1024]);
        t.buf = Some(b);
        let mut port = ScsiPort::new();
        if port.execute(&d, &mut t) == Exec::Pending {
            let mut out = Vec::new();
            port.poll(&mut out);
            complete(&mut t, out.pop().unwrap());
        }
        assert_eq!(t.status, STATUS_GOOD);
        let r = run(&d, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], None);
        let got = data(&r);
        assert!(got[..512].iter().all(|&x| x == b'b'));
        assert!(
            got[512..].iter().all(|&x| x == b'a'),
            "second block untouched"
        );
        // A read cannot be shortened this way.
        let mut r = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0, 7);
        plan(&d, &mut r).unwrap();
        assert!(!r.limit_write(512, 512));
    }
}

//! NVMe passthrough through the kernel's driver (issue 14): a namespace served through its
//! generic character device `/dev/ngXnY`, for hosts that keep the controller on the kernel's
//! `nvme` driver.
//!
//! Each I/O becomes NVMe commands sent as `IORING_OP_URING_CMD` with `cmd_op`
//! `NVME_URING_CMD_IO` (one contiguous data buffer) or `NVME_URING_CMD_IO_VEC` (an iovec of
//! the pool buffer's pieces) on the reactor's own ring ([`crate::bdev::uring`]), next to the
//! file backends' operations; the 72-byte `struct nvme_uring_cmd` lies in the 80-byte command
//! area of a 128-byte SQE. The kernel builds the 64-byte submission entry from it, maps the
//! buffers and posts one CQE: `res` 0 on success, the NVMe status (Base §4.6.1, without the
//! phase tag) when positive, a negated errno when negative.
//!
//! The device is identified with the ioctls of `linux/nvme_ioctl.h` on the same descriptor:
//! `NVME_IOCTL_ID` for the namespace ID (it also tells an NVMe generic device from any other
//! character device) and `NVME_IOCTL_ADMIN_CMD` for IDENTIFY controller and namespace, parsed
//! by [`super::spec`]. The kernel refuses a passthrough command larger than its queue's
//! `max_hw_sectors_kb` or with more pieces than `max_segments` (both in sysfs, for the block
//! device `nvmeXnY` of the same namespace), so transfers are split to fit both, and MDTS.
//!
//! The kernel owns the controller: its queues, timeouts, aborts and resets happen below this
//! module and show up here only as statuses and errnos.

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::spec::{
    admin, dsm_range, nvm, oncs, IdentifyController, IdentifyError, IdentifyNamespace, SqEntry,
    Status, CNS_CONTROLLER, CNS_NAMESPACE, DSM_MAX_RANGES, DSM_RANGE_SIZE, IDENTIFY_SIZE,
};
use crate::bdev::uring::{self, Ring, RingOp, Sqe, Step};
use crate::bdev::{
    BdevCompletion, BdevError, BdevIo, BlockDev, FaultInject, Faulty, IoChannel, IoContext, IoOp,
};

/// `struct nvme_passthru_cmd` (linux/nvme_ioctl.h), the argument of `NVME_IOCTL_ADMIN_CMD`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);
const _: () = assert!(std::mem::offset_of!(PassthruCmd, addr) == 24);
const _: () = assert!(std::mem::offset_of!(PassthruCmd, data_len) == 36);
const _: () = assert!(std::mem::offset_of!(PassthruCmd, cdw10) == 40);
const _: () = assert!(std::mem::offset_of!(PassthruCmd, result) == 68);

/// Size of `struct nvme_uring_cmd`: the layout of `nvme_passthru_cmd` with a reserved dword
/// in place of `result` (the result comes back in the big CQE).
const URING_CMD_SIZE: usize = 72;

/// `_IOC(dir, 'N', nr, size)` of the NVMe ioctls.
const fn nvme_ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'N' as u32) << 8) | nr
}
/// `_IOC_READ | _IOC_WRITE`.
const IOC_RW: u32 = 3;

/// `NVME_IOCTL_ID`: `_IO('N', 0x40)`, returns the namespace ID.
const NVME_IOCTL_ID: u32 = nvme_ioc(0, 0x40, 0);
/// `NVME_IOCTL_ADMIN_CMD`: `_IOWR('N', 0x41, struct nvme_admin_cmd)`.
const NVME_IOCTL_ADMIN_CMD: u32 = nvme_ioc(IOC_RW, 0x41, 72);
/// `NVME_URING_CMD_IO`: `_IOWR('N', 0x80, struct nvme_uring_cmd)`; `addr`/`data_len` are
/// the data buffer and its length.
pub const NVME_URING_CMD_IO: u32 = nvme_ioc(IOC_RW, 0x80, URING_CMD_SIZE);
/// `NVME_URING_CMD_IO_VEC`: `_IOWR('N', 0x81, struct nvme_uring_cmd)`; `addr`/`data_len`
/// are an iovec array and its number of entries.
pub const NVME_URING_CMD_IO_VEC: u32 = nvme_ioc(IOC_RW, 0x81, URING_CMD_SIZE);

/// Retries of a command the kernel ended with EAGAIN, EINTR or EFAULT, or that a controller
/// reset or an ABORT ended (an aborted status without Do Not Retry). Each waits before it goes
/// out again, 5 ms the first time and twice as long each time after, up to a second: about
/// six seconds in all, what a controller reset takes.
const MAX_RETRIES: u8 = 12;

/// The `sub` of a retry's delay (an `IORING_OP_TIMEOUT` linked before the command).
const DELAY_SUB: u32 = u32::MAX;

/// `NVME_IOCTL_RESET` on the controller's character device: the kernel resets the controller
/// and returns once it is back.
const NVME_IOCTL_RESET: u32 = nvme_ioc(0, 0x44, 0);

/// What the kernel's queue takes when sysfs cannot say: 128 KiB in 32 pieces.
const DEFAULT_LIMITS: (u32, u32) = (128 * 1024, 32);

/// The 80-byte command area of an `IORING_OP_URING_CMD` SQE for NVMe command `e`, with
/// `addr` and `data_len` as `cmd_op` means them (a buffer and its length, or an iovec array
/// and its length); little-endian as the kernel reads it.
pub fn uring_cmd(e: &SqEntry, addr: u64, data_len: u32) -> [u8; 80] {
    let mut b = [0u8; 80];
    // Of CDW0 only the opcode: the kernel sets the command identifier and the data pointers
    // itself, and refuses a command with flags (fused operations, SGLs) with EINVAL.
    b[0] = e.opcode();
    b[4..8].copy_from_slice(&e.cdw[1].to_le_bytes());
    b[8..12].copy_from_slice(&e.cdw[2].to_le_bytes());
    b[12..16].copy_from_slice(&e.cdw[3].to_le_bytes());
    // metadata (16..24) and metadata_len (32..36) stay 0: no separate metadata.
    b[24..32].copy_from_slice(&addr.to_le_bytes());
    b[36..40].copy_from_slice(&data_len.to_le_bytes());
    for (i, w) in e.cdw[10..16].iter().enumerate() {
        b[40 + 4 * i..44 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    // timeout_ms (64..68) 0: the driver's default I/O timeout.
    b
}

/// How large one command may be, in bytes and in pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per command: a multiple of the block size, at least one block.
    pub max_bytes: u32,
    /// Pieces (iovecs) per command, at least one.
    pub max_segments: u32,
}

impl Limits {
    /// The limits for blocks of `block_size` bytes from the kernel's queue limits
    /// (`max_hw_sectors_kb`, `max_segments`) and the controller's MDTS (`mdts_bytes`, `None`
    /// for no limit): the least of them and of the 65536 blocks a command can count.
    pub fn new(
        block_size: u32,
        max_hw_kb: u32,
        max_segments: u32,
        mdts_bytes: Option<u64>,
    ) -> Limits {
        let bs = u64::from(block_size.max(1));
        let mut max = u64::from(max_hw_kb).saturating_mul(1024);
        if let Some(m) = mdts_bytes {
            max = max.min(m);
        }
        max = max.min(bs * 65536).min(u64::from(u32::MAX));
        let max = (max / bs * bs).max(bs);
        Limits {
            // At most u32::MAX, checked above.
            max_bytes: max as u32,
            max_segments: max_segments.max(1),
        }
    }
}

/// One command's share of an I/O: `len` bytes at `offset` into the transfer, its data the
/// iovecs `iov..iov + iovs` (for DATASET MANAGEMENT: `len` ranges from range `offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub offset: u32,
    pub len: u32,
    pub iov: u32,
    pub iovs: u32,
}

/// A transfer that cannot be cut into commands on block boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MidBlock;

/// Splits a transfer made of `pieces` (address, length) into commands within `limits`,
/// each starting and ending on a block of `block_size`: the commands in `parts`, their data
/// in `iov` (a piece cut where a command ends). Fails when a command would have to end
/// mid-block (pieces that are not whole blocks, and too many of them).
pub fn split(
    pieces: impl Iterator<Item = (usize, usize)>,
    block_size: u32,
    limits: Limits,
    parts: &mut Vec<Part>,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), MidBlock> {
    parts.clear();
    iov.clear();
    let bs = block_size.max(1);
    let mut cur = Part {
        offset: 0,
        len: 0,
        iov: 0,
        iovs: 0,
    };
    for (mut addr, mut len) in pieces {
        while len > 0 {
            if cur.len == limits.max_bytes || cur.iovs == limits.max_segments {
                if !cur.len.is_multiple_of(bs) {
                    return Err(MidBlock);
                }
                parts.push(cur);
                cur = Part {
                    offset: cur.offset + cur.len,
                    len: 0,
                    iov: iov.len() as u32,
                    iovs: 0,
                };
            }
            let room = (limits.max_bytes - cur.len) as usize;
            let take = len.min(room);
            iov.push(libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: take,
            });
            // take <= room <= u32::MAX.
            cur.len += take as u32;
            cur.iovs += 1;
            addr += take;
            len -= take;
        }
    }
    if cur.len > 0 {
        if !cur.len.is_multiple_of(bs) {
            return Err(MidBlock);
        }
        parts.push(cur);
    }
    Ok(())
}

/// Why a passthrough device could not be opened.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PassthruError {
    /// there is no file {0}
    Missing(String),
    /// cannot open {0}: {1}
    Open(String, io::Error),
    /// {0} is {1}, not a character device (the NVMe generic device /dev/ngXnY)
    NotCharDevice(String, &'static str),
    /// {0} is not an NVMe generic device (/dev/ngXnY): NVME_IOCTL_ID failed: {1}
    NotNvme(String, io::Error),
    /// this kernel has no io_uring rings with 128-byte entries (Linux 5.19 or later), which NVMe passthrough needs
    NoBigRing,
    /// IDENTIFY {0} through {1} failed: {2}
    Identify(&'static str, String, String),
    /// namespace {0} behind {1} is not active (it has no blocks)
    Inactive(u32, String),
    /// namespace {0} behind {1}: {2}
    BadNamespace(u32, String, IdentifyError),
}

/// `ioctl(fd, req, arg)` with a pointer argument.
///
/// # Safety
/// `arg` must point at a live value of the type `req` reads and writes, and any buffer
/// that value points at must be valid for the length it gives.
unsafe fn ioctl_ptr<T>(fd: &File, req: u32, arg: *mut T) -> io::Result<i32> {
    // SAFETY: the caller's contract; the descriptor is open (`fd` borrows it).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn namespace_id(fd: &File) -> io::Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument and only returns the namespace ID; on any
    // other device the request is unknown (ENOTTY) or refused, with nothing written.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), NVME_IOCTL_ID as libc::Ioctl, 0usize) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u32)
}

/// IDENTIFY (`cns`, namespace `nsid`) as an admin command through the kernel's driver.
fn identify(fd: &File, cns: u32, nsid: u32) -> io::Result<Vec<u8>> {
    let mut page = vec![0u8; IDENTIFY_SIZE];
    let mut cmd = PassthruCmd {
        opcode: admin::IDENTIFY,
        nsid,
        addr: page.as_mut_ptr() as u64,
        data_len: IDENTIFY_SIZE as u32,
        cdw10: cns,
        ..PassthruCmd::default()
    };
    // SAFETY: `cmd` is a live `nvme_passthru_cmd`; its `addr` is `page`, writable for the
    // `data_len` (4096) bytes IDENTIFY returns, and `page` outlives the call.
    let status = unsafe { ioctl_ptr(fd, NVME_IOCTL_ADMIN_CMD, &mut cmd) }?;
    if status != 0 {
        let s = Status(status as u16);
        return Err(io::Error::other(format!(
            "status {:#x} (type {}, code {:#04x})",
            s.0,
            s.sct(),
            s.sc()
        )));
    }
    Ok(page)
}

/// The controller's character device of the namespace behind character device `rdev`
/// (`ng1n1` → `/dev/nvme1`, the sysfs parent of the namespace's node).
fn controller_dev(rdev: u64) -> Option<PathBuf> {
    let link = std::fs::read_link(format!(
        "/sys/dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
    .ok()?;
    let name = link.parent()?.file_name()?.to_str()?;
    let rest = name.strip_prefix("nvme")?;
    (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        .then(|| PathBuf::from(format!("/dev/{name}")))
}

fn sysfs_u32(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The sysfs directory of the block device of the namespace behind character device
/// `rdev` (`ng0n1` → `/sys/block/nvme0n1`).
fn block_dir(rdev: u64) -> Option<PathBuf> {
    let link = std::fs::read_link(format!(
        "/sys/dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
    .ok()?;
    let name = link.file_name()?.to_str()?;
    let rest = name.strip_prefix("ng")?;
    let dir = PathBuf::from(format!("/sys/block/nvme{rest}"));
    dir.is_dir().then_some(dir)
}

/// A namespace served through the kernel's NVMe driver.
pub struct PassthruDev {
    // Declared first: the channels' operations hold the device (and so this descriptor)
    // until their last CQE.
    file: File,
    path: String,
    nsid: u32,
    ctrl: IdentifyController,
    ns: IdentifyNamespace,
    limits: Limits,
    /// The block device's sysfs directory, where the kernel's queue count is read.
    block: Option<PathBuf>,
    /// The controller's character device (`/dev/nvmeX`), for resets.
    ctrl_dev: Option<PathBuf>,
    vwc: bool,
    dsm: bool,
    /// The controller has WRITE ZEROES (ONCS).
    write_zeroes: bool,
    /// I/Os submitted to the channels and not yet completed.
    outstanding: AtomicU64,
    fault: Arc<FaultInject>,
}

impl PassthruDev {
    /// Opens NVMe generic device `path`, identifies its controller and namespace and reads
    /// the kernel's limits for it.
    pub fn open(path: &str) -> Result<PassthruDev, PassthruError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PassthruError::Missing(path.into()))
            }
            Err(e) => return Err(PassthruError::Open(path.into(), e)),
        };
        if !meta.file_type().is_char_device() {
            return Err(PassthruError::NotCharDevice(
                path.into(),
                crate::bdev::file::describe(&meta.file_type()),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| PassthruError::Open(path.into(), e))?;
        let nsid = namespace_id(&file).map_err(|e| PassthruError::NotNvme(path.into(), e))?;
        if !uring::supports_cmd() {
            return Err(PassthruError::NoBigRing);
        }
        let ctrl = identify(&file, CNS_CONTROLLER, 0)
            .map_err(|e| e.to_string())
            .and_then(|p| IdentifyController::parse(&p).map_err(|e| e.to_string()))
            .map_err(|e| PassthruError::Identify("controller", path.into(), e))?;
        let page = identify(&file, CNS_NAMESPACE, nsid)
            .map_err(|e| PassthruError::Identify("namespace", path.into(), e.to_string()))?;
        let ns = match IdentifyNamespace::parse(&page) {
            Ok(ns) => ns,
            Err(IdentifyError::Empty) => return Err(PassthruError::Inactive(nsid, path.into())),
            Err(e) => return Err(PassthruError::BadNamespace(nsid, path.into(), e)),
        };
        let block = block_dir(meta.rdev());
        let (hw_kb, segs) = block
            .as_ref()
            .and_then(|d| {
                Some((
                    sysfs_u32(&d.join("queue/max_hw_sectors_kb"))?,
                    sysfs_u32(&d.join("queue/max_segments"))?,
                ))
            })
            .unwrap_or((DEFAULT_LIMITS.0 / 1024, DEFAULT_LIMITS.1));
        let limits = Limits::new(ns.block_size, hw_kb, segs, ctrl.max_transfer(12));
        Ok(PassthruDev {
            file,
            path: path.into(),
            nsid,
            vwc: ctrl.vwc,
            dsm: ctrl.supports(oncs::DSM),
            write_zeroes: ctrl.supports(oncs::WRITE_ZEROES),
            ctrl,
            ns,
            limits,
            block,
            ctrl_dev: controller_dev(meta.rdev()),
            outstanding: AtomicU64::new(0),
            fault: Arc::new(FaultInject::default()),
        })
    }

    /// Has the kernel reset the controller (`NVME_IOCTL_RESET` on `/dev/nvmeX`) and waits for
    /// it to come back. Commands the reset ends go out again from their channels.
    pub fn reset_controller(&self) -> io::Result<()> {
        let Some(dev) = &self.ctrl_dev else {
            return Err(io::Error::other(format!(
                "no controller device found for {} in sysfs",
                self.path
            )));
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|e| io::Error::other(format!("{}: {e}", dev.display())))?;
        // SAFETY: NVME_IOCTL_RESET takes no argument and writes nothing to memory; `f` is
        // the open controller device (a device that does not know the request refuses it).
        let r = unsafe { libc::ioctl(f.as_raw_fd(), NVME_IOCTL_RESET as libc::Ioctl, 0usize) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::other(format!("{}: {e}", dev.display())));
        }
        Ok(())
    }

    /// With `nv_cache`, the controller's volatile write cache is treated as non-volatile:
    /// the device reports no write cache and flushes complete at once.
    pub fn with_nv_cache(mut self, nv_cache: bool) -> Self {
        if nv_cache {
            self.vwc = false;
        }
        self
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    pub fn controller(&self) -> &IdentifyController {
        &self.ctrl
    }

    pub fn namespace(&self) -> &IdentifyNamespace {
        &self.ns
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Block I/Os submitted and not yet completed.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The kernel's I/O queues for the namespace's controller (its block device's hardware
    /// queues), when sysfs shows them.
    pub fn kernel_queues(&self) -> Option<usize> {
        let mq = self.block.as_ref()?.join("mq");
        Some(std::fs::read_dir(mq).ok()?.count())
    }
}

impl BlockDev for PassthruDev {
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

    fn open_channel(self: Arc<Self>, cx: &IoContext) -> Box<dyn IoChannel> {
        let fault = self.fault.clone();
        let ring = cx.ring().filter(|r| r.has_big_entries());
        if ring.is_none() {
            log::error!(
                "nvme passthrough {}: this reactor's ring cannot carry NVMe commands: its I/O fails",
                self.path
            );
        }
        Box::new(Faulty::new(
            PtChannel {
                dev: self,
                ring,
                shared: Rc::new(Shared::default()),
            },
            fault,
        ))
    }

    fn fault(&self) -> Option<&FaultInject> {
        Some(&self.fault)
    }
}

/// What a channel shares with its operations on the ring.
#[derive(Default)]
struct Shared {
    done: RefCell<VecDeque<BdevCompletion>>,
    /// Finished operations, kept for the next I/Os with their vectors' capacity. The ring
    /// takes boxes and hands them back: they are kept boxed, so reuse allocates nothing.
    #[allow(clippy::vec_box)]
    free: RefCell<Vec<Box<PtOp>>>,
    inflight: Cell<usize>,
}

/// A reactor's channel to a [`PassthruDev`].
struct PtChannel {
    dev: Arc<PassthruDev>,
    ring: Option<Rc<Ring>>,
    shared: Rc<Shared>,
}

impl PtChannel {
    fn finish(&self, io: BdevIo, result: Result<(), BdevError>) {
        self.shared.done.borrow_mut().push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }
}

impl PtChannel {
    /// Checks `io` and lays out its commands in `op`: the command they are, or the result
    /// `io` completes with at once (an error, or nothing to send).
    fn plan(&self, io: &mut BdevIo, op: &mut PtOp) -> Result<Cmd, Result<(), BdevError>> {
        let off = io.offset;
        let size = self.dev.ns.size_bytes().unwrap_or(0);
        let bs = self.dev.ns.block_size;
        // Whole blocks inside the namespace.
        let whole = |v: u64| v.is_multiple_of(u64::from(bs));
        let in_range = |io: &BdevIo| {
            io.offset
                .checked_add(u64::from(io.len))
                .is_some_and(|end| end <= size)
                && whole(io.offset)
                && whole(u64::from(io.len))
        };
        match io.op {
            IoOp::Read | IoOp::Write { .. } => {
                if !in_range(io) {
                    return Err(Err(BdevError::Io(off)));
                }
                let len = io.len;
                let Some(buf) = io.buf.as_mut().filter(|b| b.len() >= len as usize) else {
                    log::warn!(
                        "nvme passthrough: I/O at byte {off} of {len} bytes without a buffer that long"
                    );
                    return Err(Err(BdevError::BadBuffer));
                };
                if len == 0 {
                    return Err(Ok(()));
                }
                let pieces = buf
                    .segments_mut(0, len as usize)
                    .map(|s| (s.as_mut_ptr() as usize, s.len()));
                if let Err(e) = split(pieces, bs, self.dev.limits, &mut op.parts, &mut op.iov) {
                    log::warn!(
                        "nvme passthrough: I/O at byte {off} of {len} bytes cannot be described: {e:?}"
                    );
                    return Err(Err(BdevError::BadBuffer));
                }
                Ok(match io.op {
                    IoOp::Write { fua } => Cmd::Write { fua },
                    _ => Cmd::Read,
                })
            }
            IoOp::Flush => {
                if !self.dev.vwc {
                    return Err(Ok(()));
                }
                op.parts.clear();
                op.parts.push(Part {
                    offset: 0,
                    len: 0,
                    iov: 0,
                    iovs: 0,
                });
                Ok(Cmd::Flush)
            }
            // Nothing sits in front of the namespace to warm.
            IoOp::Prefetch => Err(Ok(())),
            IoOp::Unmap => {
                let Some(&(first, _)) = io.ranges.first() else {
                    return Err(Ok(()));
                };
                if !self.dev.supports_unmap() {
                    return Err(Err(BdevError::Io(first)));
                }
                dsm_ranges(&io.ranges, bs, size, &mut op.dsm, &mut op.parts)
                    .map_err(|at| Err(BdevError::Io(at)))?;
                Ok(Cmd::Deallocate)
            }
            IoOp::WriteZeroes => {
                if !in_range(io) {
                    return Err(Err(BdevError::Io(off)));
                }
                if io.len == 0 {
                    return Err(Ok(()));
                }
                zeroes_parts(io.len, bs, &mut op.parts);
                Ok(Cmd::WriteZeroes)
            }
        }
    }
}

impl IoChannel for PtChannel {
    fn submit(&mut self, mut io: BdevIo) {
        let Some(ring) = self.ring.clone() else {
            return self.finish(io, Err(BdevError::Offline));
        };
        let bs = self.dev.ns.block_size;
        let mut op = self.shared.free.borrow_mut().pop().unwrap_or_default();
        let cmd = match self.plan(&mut io, &mut op) {
            Ok(cmd) => cmd,
            Err(result) => {
                // The operation goes back unused (with no pointers into this I/O's buffer).
                op.iov.clear();
                self.shared.free.borrow_mut().push(op);
                return self.finish(io, result);
            }
        };
        op.cmd = cmd;
        op.outstanding = op.parts.len() as u32;
        op.retries = 0;
        op.force_async = false;
        op.error = None;
        op.nsid = self.dev.nsid;
        op.block_size = bs;
        op.fd = self.dev.file.as_raw_fd();
        op.io = Some(io);
        op.dev = Some(self.dev.clone());
        op.shared = Some(self.shared.clone());
        self.dev.outstanding.fetch_add(1, Ordering::Relaxed);
        self.shared.inflight.set(self.shared.inflight.get() + 1);
        ring.submit(op);
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let mut d = self.shared.done.borrow_mut();
        let n = d.len();
        out.extend(d.drain(..));
        n
    }

    fn busy(&self) -> bool {
        self.shared.inflight.get() > 0 || !self.shared.done.borrow().is_empty()
    }
}

/// The most blocks one WRITE ZEROES covers (a 16-bit 0's based count).
const MAX_ZEROES_BLOCKS: u32 = 1 << 16;

/// The parts of a WRITE ZEROES of `len` bytes in blocks of `block_size`: commands of up to
/// 65536 blocks, no data.
fn zeroes_parts(len: u32, block_size: u32, parts: &mut Vec<Part>) {
    parts.clear();
    let step = u64::from(block_size.max(1)) * u64::from(MAX_ZEROES_BLOCKS);
    let mut at = 0u64;
    while at < u64::from(len) {
        let n = (u64::from(len) - at).min(step);
        parts.push(Part {
            offset: at as u32,
            len: n as u32,
            iov: 0,
            iovs: 0,
        });
        at += n;
    }
}

/// The DSM range descriptors for byte `ranges` of blocks of `block_size` on a namespace of
/// `size` bytes, in `dsm` (16-byte descriptors as two little-endian u64), one part per
/// command of up to 256 of them. `Err(offset)` for a range out of the namespace.
fn dsm_ranges(
    ranges: &[(u64, u64)],
    block_size: u32,
    size: u64,
    dsm: &mut Vec<[u64; 2]>,
    parts: &mut Vec<Part>,
) -> Result<(), u64> {
    dsm.clear();
    parts.clear();
    let bs = u64::from(block_size.max(1));
    for &(off, len) in ranges {
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(off);
        }
        let (mut slba, mut nlb) = (off / bs, len / bs);
        while nlb > 0 {
            let n = nlb.min(u64::from(u32::MAX));
            let r = dsm_range(slba, n as u32);
            let lo = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            let hi = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
            dsm.push([lo, hi]);
            slba += n;
            nlb -= n;
        }
    }
    let mut at = 0;
    while at < dsm.len() {
        let n = (dsm.len() - at).min(DSM_MAX_RANGES);
        parts.push(Part {
            offset: at as u32,
            len: n as u32,
            iov: 0,
            iovs: 0,
        });
        at += n;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Cmd {
    #[default]
    Read,
    Write {
        fua: bool,
    },
    Flush,
    Deallocate,
    WriteZeroes,
}

/// One block I/O on the ring: one command per part. Kept by its channel once finished, so
/// that a busy channel allocates nothing per I/O.
#[derive(Default)]
struct PtOp {
    cmd: Cmd,
    io: Option<BdevIo>,
    /// Holds the descriptor open until the last CQE.
    dev: Option<Arc<PassthruDev>>,
    shared: Option<Rc<Shared>>,
    fd: i32,
    nsid: u32,
    block_size: u32,
    parts: Vec<Part>,
    /// The parts' data pieces; the kernel reads a part's iovecs until its CQE.
    iov: Vec<libc::iovec>,
    /// DSM range descriptors (8-byte aligned); read by the kernel until the CQE.
    dsm: Vec<[u64; 2]>,
    outstanding: u32,
    retries: u8,
    /// Commands sent again go with IOSQE_ASYNC: to an io_uring worker that may block until
    /// the kernel's queue takes them (during a controller reset) instead of failing them.
    force_async: bool,
    /// How long the next command sent again waits first; the kernel reads it when the
    /// timeout is submitted, while this operation holds it in place.
    delay: types::Timespec,
    error: Option<BdevError>,
}

impl PtOp {
    /// The NVMe command of part `p` and the data it carries as (`cmd_op`, addr, data_len).
    fn command(&self, p: &Part) -> (SqEntry, u32, u64, u32) {
        let offset = self.io.as_ref().map_or(0, |io| io.offset);
        let bs = u64::from(self.block_size.max(1));
        let slba = (offset + u64::from(p.offset)) / bs;
        let nlb = (u64::from(p.len) / bs) as u32;
        let data = || -> (u32, u64, u32) {
            let first = self.iov.get(p.iov as usize);
            if p.iovs == 1 {
                let (a, l) = first.map_or((0, 0), |v| (v.iov_base as u64, v.iov_len as u32));
                (NVME_URING_CMD_IO, a, l)
            } else {
                let a = first.map_or(0, |v| v as *const libc::iovec as u64);
                (NVME_URING_CMD_IO_VEC, a, p.iovs)
            }
        };
        match self.cmd {
            Cmd::Read => {
                let (o, a, l) = data();
                (SqEntry::rw(nvm::READ, self.nsid, slba, nlb, false), o, a, l)
            }
            Cmd::Write { fua } => {
                let (o, a, l) = data();
                (SqEntry::rw(nvm::WRITE, self.nsid, slba, nlb, fua), o, a, l)
            }
            Cmd::Flush => (SqEntry::flush(self.nsid), NVME_URING_CMD_IO, 0, 0),
            Cmd::WriteZeroes => (
                SqEntry::write_zeroes(self.nsid, slba, nlb, false),
                NVME_URING_CMD_IO,
                0,
                0,
            ),
            Cmd::Deallocate => {
                let a = self
                    .dsm
                    .get(p.offset as usize)
                    .map_or(0, |r| r.as_ptr() as u64);
                (
                    SqEntry::deallocate(self.nsid, p.len),
                    NVME_URING_CMD_IO,
                    a,
                    p.len * DSM_RANGE_SIZE as u32,
                )
            }
        }
    }

    /// The byte offset a failure of part `sub` reports.
    fn offset_of(&self, sub: u32) -> u64 {
        let offset = self.io.as_ref().map_or(0, |io| io.offset);
        let Some(p) = self.parts.get(sub as usize) else {
            return offset;
        };
        match self.cmd {
            Cmd::Deallocate => self.dsm.get(p.offset as usize).map_or(offset, |r| {
                (r[1]).saturating_mul(u64::from(self.block_size))
            }),
            _ => offset + u64::from(p.offset),
        }
    }
}

/// A completion's result for the log: an NVMe status or an errno.
fn describe(res: i32) -> String {
    if res > 0 {
        format!("status {res:#x}")
    } else {
        io::Error::from_raw_os_error(-res).to_string()
    }
}

impl RingOp for PtOp {
    fn prepare(&mut self, sub: Option<u32>, out: &mut Vec<(u32, Sqe)>) {
        let (from, to) = match sub {
            Some(s) => (s as usize, s as usize + 1),
            None => (0, self.parts.len()),
        };
        if sub.is_some() {
            // A command sent again waits first (a reset in progress answers at once): a
            // timeout linked before it, counted as success so that the link holds.
            let ms = 5u64 << (self.retries.saturating_sub(1)).min(8);
            self.delay = types::Timespec::new()
                .sec(ms.min(1000) / 1000)
                .nsec(((ms.min(1000) % 1000) * 1_000_000) as u32);
            let t = opcode::Timeout::new(&self.delay)
                .flags(types::TimeoutFlags::ETIME_SUCCESS)
                .build()
                .flags(squeue::Flags::IO_LINK);
            out.push((DELAY_SUB, t.into()));
        }
        for (i, p) in self.parts.iter().enumerate().take(to).skip(from) {
            let (e, cmd_op, addr, len) = self.command(p);
            // The iovecs, the data they describe and the DSM ranges belong to this
            // operation, which the ring keeps in place until the CQE.
            let sqe = opcode::UringCmd80::new(types::Fd(self.fd), cmd_op)
                .cmd(uring_cmd(&e, addr, len))
                .build();
            let sqe = if self.force_async {
                sqe.flags(squeue::Flags::ASYNC)
            } else {
                sqe
            };
            out.push((i as u32, sqe.into()));
        }
    }

    fn complete(&mut self, sub: u32, res: i32) -> Step {
        if sub == DELAY_SUB {
            // The delay before a command sent again (-ETIME when it ran out).
            return Step::Wait;
        }
        let again = if res > 0 {
            // Ended by a controller reset (the kernel's "host aborted") or an ABORT: the
            // command may go out again; the reads, writes, flushes and deallocations sent
            // here may all be repeated.
            let s = Status(res as u16);
            s.is_aborted() && !s.dnr()
        } else {
            // EFAULT too: Linux 6.1 answers a command it could not take at once during a
            // controller reset with it (the addresses here are the pool's, always mapped); a
            // command that keeps failing so still fails after the retries.
            res < 0 && matches!(-res, libc::EAGAIN | libc::EINTR | libc::EFAULT)
        };
        if again && self.retries < MAX_RETRIES {
            self.retries += 1;
            self.force_async = true;
            log::warn!(
                "nvme passthrough: command at byte {} ended with {}; sending it again",
                self.offset_of(sub),
                describe(res)
            );
            return Step::Resubmit(sub);
        }
        if res != 0 && self.error.is_none() {
            let at = self.offset_of(sub);
            log::warn!(
                "nvme passthrough: command at byte {at} ended with {}",
                describe(res)
            );
            self.error = Some(if res > 0 {
                Status(res as u16).bdev_error(at)
            } else {
                match -res {
                    libc::ENODEV | libc::ENXIO => BdevError::Offline,
                    libc::ECANCELED => BdevError::Cancelled,
                    // The kernel refused the command as built (EINVAL, EOPNOTSUPP, EFAULT):
                    // the target's failure, not the medium's.
                    libc::EINVAL | libc::EOPNOTSUPP | libc::EFAULT => BdevError::BadBuffer,
                    _ => BdevError::Io(at),
                }
            });
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.outstanding == 0 {
            Step::Done
        } else {
            Step::Wait
        }
    }

    fn finish(mut self: Box<Self>) {
        let io = self.io.take();
        let dev = self.dev.take();
        let shared = self.shared.take();
        if let Some(d) = &dev {
            d.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(shared) = shared else {
            return;
        };
        shared.inflight.set(shared.inflight.get().saturating_sub(1));
        if let Some(io) = io {
            let result = self.error.take().map_or(Ok(()), Err);
            shared.done.borrow_mut().push_back(BdevCompletion {
                tag: io.tag,
                result,
                buf: io.buf,
            });
        }
        // The pointers into the finished I/O's buffer go with it.
        self.iov.clear();
        shared.free.borrow_mut().push(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::nvme::spec::{sc, sct};

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // linux/nvme_ioctl.h, expanded: _IO('N', 0x40), _IOWR('N', 0x41, 72 bytes),
        // _IOWR('N', 0x80 / 0x81, 72 bytes).
        assert_eq!(NVME_IOCTL_ID, 0x4e40);
        assert_eq!(NVME_IOCTL_RESET, 0x4e44);
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xc048_4e41);
        assert_eq!(NVME_URING_CMD_IO, 0xc048_4e80);
        assert_eq!(NVME_URING_CMD_IO_VEC, 0xc048_4e81);
    }

    #[test]
    fn uring_cmd_area_per_opcode() {
        // READ of 8 blocks at LBA 0x1_0000_0002, one buffer.
        let e = SqEntry::rw(nvm::READ, 3, 0x1_0000_0002, 8, false);
        let b = uring_cmd(&e, 0x7f00_1234_5000, 32768);
        assert_eq!(b[0], nvm::READ);
        assert_eq!(b[1], 0, "no fused operation, PRPs");
        assert_eq!(le32(&b, 4), 3, "nsid");
        assert_eq!(le64(&b, 16), 0, "no metadata");
        assert_eq!(le64(&b, 24), 0x7f00_1234_5000, "addr");
        assert_eq!(le32(&b, 32), 0, "metadata_len");
        assert_eq!(le32(&b, 36), 32768, "data_len");
        assert_eq!((le32(&b, 40), le32(&b, 44)), (2, 1), "SLBA in CDW10-11");
        assert_eq!(le32(&b, 48), 7, "NLB 0's based in CDW12");
        assert_eq!(le32(&b, 64), 0, "default timeout");
        assert!(b[72..].iter().all(|&x| x == 0), "past the 72-byte struct");

        // WRITE with FUA: CDW12 bit 30.
        let b = uring_cmd(&SqEntry::rw(nvm::WRITE, 1, 16, 1, true), 0x1000, 512);
        assert_eq!(b[0], nvm::WRITE);
        assert_eq!(le32(&b, 48), 1 << 30);
        assert_eq!(le32(&b, 40), 16);

        // FLUSH: no data, no dwords.
        let b = uring_cmd(&SqEntry::flush(1), 0, 0);
        assert_eq!(b[0], nvm::FLUSH);
        assert_eq!(le32(&b, 4), 1);
        assert!(b[8..].iter().all(|&x| x == 0));

        // WRITE ZEROES with DEAC (CDW12 bit 25).
        let b = uring_cmd(&SqEntry::write_zeroes(1, 100, 4, true), 0, 0);
        assert_eq!(b[0], nvm::WRITE_ZEROES);
        assert_eq!(le32(&b, 40), 100);
        assert_eq!(le32(&b, 48), 3 | 1 << 25);
        assert_eq!(le32(&b, 36), 0, "no data");

        // DATASET MANAGEMENT: NR 0's based in CDW10, AD in CDW11, ranges at addr.
        let b = uring_cmd(&SqEntry::deallocate(1, 3), 0xabc0, 48);
        assert_eq!(b[0], nvm::DATASET_MANAGEMENT);
        assert_eq!((le32(&b, 40), le32(&b, 44)), (2, 1 << 2));
        assert_eq!((le64(&b, 24), le32(&b, 36)), (0xabc0, 48));

        // The command identifier and flags of CDW0 are the kernel's to set.
        let mut e = SqEntry::rw(nvm::READ, 1, 0, 1, false);
        e.set_cid(0x1234);
        e.cdw[0] |= 1 << 8;
        assert_eq!(uring_cmd(&e, 0, 0)[..4], [nvm::READ, 0, 0, 0]);

        // COMPARE: a read-direction command with data, like READ.
        let b = uring_cmd(&SqEntry::rw(nvm::COMPARE, 1, 7, 2, false), 0x2000, 1024);
        assert_eq!(b[0], nvm::COMPARE);
        assert_eq!((le32(&b, 40), le32(&b, 48), le32(&b, 36)), (7, 1, 1024));
    }

    #[test]
    fn limits_take_the_least_and_whole_blocks() {
        // 128 KiB from the kernel, MDTS 512 KiB, 4 KiB blocks.
        let l = Limits::new(4096, 128, 33, Some(512 * 1024));
        assert_eq!(
            l,
            Limits {
                max_bytes: 131072,
                max_segments: 33
            }
        );
        // MDTS lower than the kernel's (which normally has it already).
        assert_eq!(Limits::new(512, 1024, 127, Some(65536)).max_bytes, 65536);
        // 65536 blocks per command at most.
        assert_eq!(Limits::new(512, 1 << 20, 127, None).max_bytes, 512 * 65536);
        // Not a block multiple: rounded down; never less than one block.
        assert_eq!(Limits::new(4096, 6, 1, None).max_bytes, 4096);
        assert_eq!(
            Limits::new(65536, 4, 0, None),
            Limits {
                max_bytes: 65536,
                max_segments: 1
            }
        );
    }

    fn spans(iov: &[libc::iovec]) -> Vec<(usize, usize)> {
        iov.iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect()
    }

    #[test]
    fn split_by_bytes_and_by_segments() {
        let mut parts = Vec::new();
        let mut iov = Vec::new();
        // One 1 MiB contiguous piece, 256 KiB per command.
        let l = Limits {
            max_bytes: 256 << 10,
            max_segments: 128,
        };
        split(
            [(0x10_0000, 1 << 20)].into_iter(),
            4096,
            l,
            &mut parts,
            &mut iov,
        )
        .unwrap();
        assert_eq!(parts.len(), 4);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(
                (p.offset, p.len, p.iov, p.iovs),
                ((i as u32) << 18, 256 << 10, i as u32, 1)
            );
            assert_eq!(iov[i].iov_base as usize, 0x10_0000 + (i << 18));
        }

        // Eight 128 KiB chunks, four pieces per command: two commands of four iovecs.
        let chunks = (0..8).map(|i| (0x100_0000 + i * 0x4_0000, 128 << 10));
        let l = Limits {
            max_bytes: 8 << 20,
            max_segments: 4,
        };
        split(chunks, 512, l, &mut parts, &mut iov).unwrap();
        assert_eq!(
            parts,
            vec![
                Part {
                    offset: 0,
                    len: 512 << 10,
                    iov: 0,
                    iovs: 4
                },
                Part {
                    offset: 512 << 10,
                    len: 512 << 10,
                    iov: 4,
                    iovs: 4
                },
            ]
        );

        // Both limits: 192 KiB per command over 128 KiB chunks cuts the second chunk.
        let chunks = (0..3).map(|i| (0x200_0000 + i * 0x10_0000, 128 << 10));
        let l = Limits {
            max_bytes: 192 << 10,
            max_segments: 64,
        };
        split(chunks, 4096, l, &mut parts, &mut iov).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].len, parts[0].iovs, parts[1].len, parts[1].iovs),
            (192 << 10, 2, 192 << 10, 2)
        );
        assert_eq!(
            spans(&iov),
            vec![
                (0x200_0000, 128 << 10),
                (0x210_0000, 64 << 10),
                (0x210_0000 + (64 << 10), 64 << 10),
                (0x220_0000, 128 << 10),
            ]
        );

        // A command that would end mid-block is refused.
        let odd = [(0x1000, 512), (0x3000, 512), (0x5000, 512), (0x7000, 512)];
        let l = Limits {
            max_bytes: 1 << 20,
            max_segments: 1,
        };
        assert!(split(odd.into_iter(), 1024, l, &mut parts, &mut iov).is_err());
    }

    #[test]
    fn dsm_ranges_in_blocks_and_commands_of_256() {
        let mut dsm = Vec::new();
        let mut parts = Vec::new();
        let ranges: Vec<(u64, u64)> = (0..300).map(|i| (i * 8192, 4096)).collect();
        dsm_ranges(&ranges, 4096, 1 << 30, &mut dsm, &mut parts).unwrap();
        assert_eq!(dsm.len(), 300);
        assert_eq!(
            dsm[1],
            [1u64 << 32, 2],
            "NLB 1 in bytes 4-7, SLBA 2 in bytes 8-15"
        );
        assert_eq!(
            parts,
            vec![
                Part {
                    offset: 0,
                    len: 256,
                    iov: 0,
                    iovs: 0
                },
                Part {
                    offset: 256,
                    len: 44,
                    iov: 0,
                    iovs: 0
                },
            ]
        );
        // Out of the namespace: the offending range's offset.
        assert_eq!(
            dsm_ranges(
                &[(0, 4096), (1 << 30, 4096)],
                4096,
                1 << 30,
                &mut dsm,
                &mut parts
            ),
            Err(1 << 30)
        );
    }

    #[test]
    fn write_zeroes_parts_carry_no_data() {
        let mut parts = Vec::new();
        zeroes_parts(8192, 512, &mut parts);
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].offset, parts[0].len, parts[0].iovs), (0, 8192, 0));
        // 65536 blocks a command.
        zeroes_parts(((1 << 16) + 2) * 512, 512, &mut parts);
        assert_eq!(
            parts.iter().map(|p| (p.offset, p.len)).collect::<Vec<_>>(),
            vec![(0, (1 << 16) * 512), ((1 << 16) * 512, 1024)]
        );
        let op = PtOp {
            cmd: Cmd::WriteZeroes,
            io: Some(BdevIo {
                tag: 1,
                op: IoOp::WriteZeroes,
                offset: 4096,
                len: ((1 << 16) + 2) * 512,
                buf: None,
                ranges: Vec::new(),
            }),
            nsid: 1,
            block_size: 512,
            parts: parts.clone(),
            ..PtOp::default()
        };
        let (e, cmd_op, addr, len) = op.command(&parts[1]);
        assert_eq!(e.opcode(), nvm::WRITE_ZEROES);
        assert_eq!((e.slba(), e.nlb()), (8 + (1 << 16), 2));
        assert_eq!((cmd_op, addr, len), (NVME_URING_CMD_IO, 0, 0));
    }

    #[test]
    fn completion_results_map_to_block_errors() {
        let mut op = PtOp {
            cmd: Cmd::Read,
            io: Some(BdevIo {
                tag: 9,
                op: IoOp::Read,
                offset: 1 << 20,
                len: 8192,
                buf: None,
                ranges: Vec::new(),
            }),
            parts: vec![
                Part {
                    offset: 0,
                    len: 4096,
                    iov: 0,
                    iovs: 1,
                },
                Part {
                    offset: 4096,
                    len: 4096,
                    iov: 1,
                    iovs: 1,
                },
            ],
            outstanding: 2,
            block_size: 4096,
            ..PtOp::default()
        };
        // A retryable errno goes out again, and so does a command a controller reset or an
        // ABORT ended (unless Do Not Retry); the first failure is kept with its part's offset.
        assert!(!op.force_async);
        assert!(matches!(op.complete(1, -libc::EAGAIN), Step::Resubmit(1)));
        assert!(op.force_async, "sent again through an io_uring worker");
        // Sent again after a delay: a timeout linked before the command, whose own
        // completion changes nothing.
        let mut out = Vec::new();
        op.prepare(Some(1), &mut out);
        assert_eq!(
            out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![DELAY_SUB, 1]
        );
        assert!(
            format!("{:?}", op.delay).contains("tv_nsec: 5000000"),
            "5 ms the first time: {:?}",
            op.delay
        );
        assert!(matches!(op.complete(DELAY_SUB, -libc::ETIME), Step::Wait));
        assert_eq!(op.outstanding, 2);
        assert!(matches!(op.complete(1, -libc::EFAULT), Step::Resubmit(1)));
        assert!(matches!(op.complete(1, 0x371), Step::Resubmit(1)));
        let aborted = i32::from(Status::new(sct::GENERIC, sc::ABORTED_SQ_DELETION).0);
        assert!(matches!(op.complete(0, aborted), Step::Resubmit(0)));
        assert!(matches!(op.complete(0, 0), Step::Wait));
        op.outstanding = 2;
        let unrecovered = i32::from(Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR).0);
        assert!(matches!(op.complete(1, unrecovered), Step::Wait));
        assert!(matches!(op.complete(0, 0), Step::Done));
        assert_eq!(op.error, Some(BdevError::Io((1 << 20) + 4096)));

        let one = |res: i32| {
            let mut o = PtOp {
                parts: vec![Part {
                    offset: 0,
                    len: 4096,
                    iov: 0,
                    iovs: 1,
                }],
                outstanding: 1,
                retries: MAX_RETRIES,
                block_size: 4096,
                ..PtOp::default()
            };
            o.complete(0, res);
            o.error
        };
        let st = |t, c| i32::from(Status::new(t, c).0);
        assert_eq!(one(0), None);
        assert_eq!(
            one(st(sct::GENERIC, sc::LBA_OUT_OF_RANGE)),
            Some(BdevError::BadBuffer)
        );
        assert_eq!(
            one(st(sct::GENERIC, sc::NAMESPACE_NOT_READY)),
            Some(BdevError::Offline)
        );
        assert_eq!(
            one(st(sct::GENERIC, sc::NAMESPACE_WRITE_PROTECTED)),
            Some(BdevError::WriteProtected)
        );
        assert_eq!(
            one(st(sct::GENERIC, sc::ABORT_REQUESTED)),
            Some(BdevError::Cancelled)
        );
        // The kernel's own path statuses: host aborted (a reset ended the command, when it
        // has used up its retries) and the other path errors.
        assert_eq!(one(0x371), Some(BdevError::Cancelled));
        assert_eq!(one(0x370), Some(BdevError::Offline));
        // The DNR bit does not change the meaning.
        assert_eq!(
            one(st(sct::MEDIA, sc::WRITE_FAULT) | 1 << 14),
            Some(BdevError::Io(0))
        );
        assert_eq!(one(-libc::EIO), Some(BdevError::Io(0)));
        assert_eq!(one(-libc::ENODEV), Some(BdevError::Offline));
        assert_eq!(one(-libc::EINVAL), Some(BdevError::BadBuffer));
        assert_eq!(
            one(-libc::EAGAIN),
            Some(BdevError::Io(0)),
            "after the retries"
        );
    }

    #[test]
    fn part_commands_carry_their_data() {
        let mut op = PtOp {
            cmd: Cmd::Write { fua: true },
            io: Some(BdevIo {
                tag: 1,
                op: IoOp::Write { fua: true },
                offset: 8192,
                len: 12288,
                buf: None,
                ranges: Vec::new(),
            }),
            nsid: 1,
            block_size: 4096,
            ..PtOp::default()
        };
        let l = Limits {
            max_bytes: 8192,
            max_segments: 4,
        };
        split(
            [(0x1000, 4096), (0x9000, 8192)].into_iter(),
            4096,
            l,
            &mut op.parts,
            &mut op.iov,
        )
        .unwrap();
        let (e, cmd_op, addr, len) = op.command(&op.parts[0]);
        assert_eq!(
            (cmd_op, len),
            (NVME_URING_CMD_IO_VEC, 2),
            "two pieces: an iovec"
        );
        assert_eq!(addr, op.iov.as_ptr() as u64);
        assert_eq!((e.slba(), e.nlb(), e.cdw[12] >> 30 & 1), (2, 2, 1));
        let (e, cmd_op, addr, len) = op.command(&op.parts[1]);
        assert_eq!(
            (cmd_op, addr, len),
            (NVME_URING_CMD_IO, 0xa000, 4096),
            "one piece: the buffer itself"
        );
        assert_eq!((e.slba(), e.nlb()), (4, 1));

        // Each part becomes one SQE; a resubmission only its own, after its delay.
        let mut out = Vec::new();
        op.prepare(None, &mut out);
        assert_eq!(out.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1]);
        out.clear();
        op.prepare(Some(1), &mut out);
        assert_eq!(
            out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![DELAY_SUB, 1]
        );
    }
}

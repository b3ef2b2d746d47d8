//! File and block device backends on the reactor's io_uring: SCST's `vdisk_fileio`,
//! `vdisk_blockio` and `vcdrom`.
//!
//! A [`FileDev`] is shared by every reactor; what it is backed by (a [`Backing`]: the open
//! file, its size and its O_DIRECT alignment) can change at any time from the management
//! thread: a CD is ejected or inserted, `active` is written, the file fails. The backing
//! sits behind a lock that only the management thread and a channel whose generation is
//! stale ever take; each in-flight operation holds its own `Arc<Backing>`, so the descriptor
//! stays open until the last CQE that uses it.
//!
//! Data goes straight between the command's [`DataBuf`] chunks and the kernel (readv/writev
//! SQEs over the chunk segments): no bounce buffer, no copy.
//!
//! Buffered I/O that cannot wait is done at once on the reactor instead ([`Inline`]): a
//! read or write with RWF_NOWAIT that the page cache can serve completes in the system call,
//! and on a memory file system (tmpfs, ramfs, hugetlbfs: no device behind the page cache)
//! every transfer is a memory copy. Otherwise the kernel would hand such I/O to an io-wq
//! worker thread, whose wake-ups cost more than the copy and take CPU from the reactor's own
//! core. Whatever does not finish at once (EAGAIN, a short transfer) goes on to the ring from
//! where it stopped.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use io_uring::{opcode, types};
use log::{error, warn};

use crate::util::quote;

use super::uring::{Ring, RingOp, Sqe, Step};
use super::{
    BdevCompletion, BdevError, BdevIo, BlockDev, Extent, FaultInject, Faulty, IoChannel, IoContext,
    IoOp,
};

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Retries of an operation the kernel answered with EAGAIN, EINTR or ECANCELED (or a write
/// that made no progress) before it fails.
const MAX_RETRIES: u8 = 8;
/// Consecutive EIO completions after which the backing counts as failed.
const EIO_LIMIT: u32 = 3;

/// Which handler the device belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `vdisk_fileio`: a regular file, through the page cache unless `o_direct`.
    File,
    /// `vdisk_blockio`: a block device, always O_DIRECT.
    Block,
    /// `vcdrom`: a read-only image (an ISO file), 2048-byte blocks, removable.
    Cdrom,
}

/// How a device opens and uses its backing.
#[derive(Debug, Clone)]
pub struct FileOptions {
    pub kind: Kind,
    pub block_size: u32,
    pub read_only: bool,
    pub o_direct: bool,
    /// Writes are durable at completion (WCE=0) from the start; MODE SELECT may change it
    /// later ([`FileDev::set_write_through`]).
    pub write_through: bool,
    /// The cache is non-volatile: SYNCHRONIZE CACHE has nothing to do (WCE=0).
    pub nv_cache: bool,
    pub thin: bool,
}

/// An open backing file.
pub struct Backing {
    file: File,
    path: String,
    size: u64,
    direct: bool,
    /// O_DIRECT requirements (statx DIOALIGN): buffer address and file offset/length.
    mem_align: usize,
    off_align: u64,
    /// The physical block size of the medium (for the LB-per-PB exponent).
    phys_block: u32,
    /// How much of its buffered I/O may be done on the reactor ([`Inline`] as a u8; it drops
    /// to NEVER for a direction the file refuses RWF_NOWAIT for).
    inline_read: AtomicU8,
    inline_write: AtomicU8,
}

/// Whether a buffered transfer is tried on the reactor before the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Inline {
    /// O_DIRECT, or the file refused RWF_NOWAIT: always the ring.
    Never = 0,
    /// With RWF_NOWAIT: done at once when the page cache can serve it.
    NoWait = 1,
    /// On a memory file system: nothing to wait for, always at once.
    Always = 2,
}

impl Inline {
    fn of(v: u8) -> Inline {
        match v {
            1 => Inline::NoWait,
            2 => Inline::Always,
            _ => Inline::Never,
        }
    }
}

/// Whether `file` lives on a file system whose pages have no device behind them.
fn memory_backed(file: &File) -> bool {
    // SAFETY: statfs is plain data, all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open and `st` is a valid, writable statfs buffer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    // ramfs has no constant in libc.
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    matches!(
        st.f_type,
        libc::TMPFS_MAGIC | RAMFS_MAGIC | libc::HUGETLBFS_MAGIC
    )
}

struct State {
    path: String,
    backing: Option<Arc<Backing>>,
    /// A size set by the administrator (blockio's writable `size`); else the backing's.
    size_override: Option<u64>,
}

/// A device backed by a file or a block device.
pub struct FileDev {
    name: String,
    opts: FileOptions,
    state: RwLock<State>,
    /// Serialises the management operations that change the backing (open, close, resize).
    /// They may block on I/O, so they hold this and take `state`, which reactors and readers
    /// of the tree take, only to install the result.
    ops: Mutex<()>,
    /// Bumped whenever the backing changes; channels compare it on every submission.
    generation: AtomicU64,
    /// Whether `state` holds a backing, set with it: the dispatcher asks on every media
    /// access command, and `state`'s lock would be taken by every reactor for it.
    open: AtomicBool,
    size: AtomicU64,
    active: AtomicBool,
    phys_block: AtomicU32,
    eio_streak: AtomicU32,
    misaligned_logged: AtomicBool,
    fault: Arc<FaultInject>,
    /// Every write is durable at completion (RWF_DSYNC): the write cache is off (WCE=0).
    /// Per write rather than O_DSYNC on the file, so that MODE SELECT can turn it either
    /// way without reopening the backing.
    write_through: AtomicBool,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The statx DIOALIGN values of an open file: (memory, offset) alignment, 0 when unknown.
fn dio_align(file: &File) -> (u32, u32) {
    // SAFETY: statx is plain data, all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open, the path is an empty C string used with
    // AT_EMPTY_PATH, and `stx` is a valid, writable statx buffer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return (0, 0);
    }
    (stx.stx_dio_mem_align, stx.stx_dio_offset_align)
}

fn block_dev_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for writes.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

fn block_dev_pbsz(file: &File) -> u32 {
    let mut pb: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, valid for writes.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKPBSZGET, &mut pb as *mut _) };
    if r == 0 {
        pb
    } else {
        0
    }
}

/// What a file type is, for a message that refuses it.
pub(crate) fn describe(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Refuses a backing of the wrong type: `vdisk_blockio` takes a block device, the others a
/// regular file.
fn check_type(kind: Kind, path: &str, ft: &std::fs::FileType) -> Result<(), String> {
    let what = describe(ft);
    match kind {
        Kind::Block if !ft.is_block_device() => {
            Err(format!("{} is {what}, not a block device", quote(path)))
        }
        Kind::File | Kind::Cdrom if !ft.is_file() => Err(format!(
            "{} is {what}, not a regular file{}",
            quote(path),
            if ft.is_block_device() {
                " (use vdisk_blockio for block devices)"
            } else {
                ""
            }
        )),
        _ => Ok(()),
    }
}

/// Clears O_NONBLOCK, with which every backing is opened (so that opening a FIFO or a
/// device that waits for a peer cannot block the management thread), once the descriptor
/// is known to be a regular file or a block device: io_uring fails I/O on an O_NONBLOCK
/// descriptor with EAGAIN instead of waiting for it.
fn clear_nonblock(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an open descriptor reads its status flags; no memory is passed.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an open descriptor with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Backing {
    /// Opens `path` the way `opts` says. A handler never changes a file it is asked to open:
    /// with a `size` (fileio) a missing file is created that size (sparse, mode 0600, never
    /// over an existing one), and an existing file must already be that size.
    fn open(opts: &FileOptions, path: &str, size: Option<u64>) -> Result<Backing, String> {
        if !path.starts_with('/') {
            return Err(format!("filename {} must be an absolute path", quote(path)));
        }
        let direct = opts.o_direct || opts.kind == Kind::Block;
        let read_only = opts.read_only || opts.kind == Kind::Cdrom;
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only).custom_flags(flags);
        let open_existing = |oo: &OpenOptions| {
            oo.open(path).map_err(|e| {
                // Say what the path is when that is why it cannot be opened (a directory
                // opened for writing, a socket); stat never blocks, whatever the type.
                match std::fs::metadata(path) {
                    Ok(md) => match check_type(opts.kind, path, &md.file_type()) {
                        Err(why) => why,
                        Ok(()) => format!("cannot open {}: {e}", quote(path)),
                    },
                    Err(_) => format!("cannot open {}: {e}", quote(path)),
                }
            })
        };
        let mut created = None;
        let file = match size {
            Some(want) if opts.kind == Kind::File && !read_only => {
                let mut new = oo.clone();
                new.create_new(true).mode(0o600);
                match new.open(path) {
                    Ok(f) => {
                        created = Some(want);
                        f
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open_existing(&oo)?,
                    Err(e) => return Err(format!("cannot create {}: {e}", quote(path))),
                }
            }
            _ => open_existing(&oo)?,
        };
        let r = Self::from_file(opts, path, file, size, created, direct);
        if r.is_err() && created.is_some() {
            // Leave nothing behind of a file this call made and could not use.
            let _ = std::fs::remove_file(path);
        }
        r
    }

    /// The rest of [`open`](Self::open) once `file` is open: `created` holds the size to
    /// give a file this call created.
    fn from_file(
        opts: &FileOptions,
        path: &str,
        file: File,
        size: Option<u64>,
        created: Option<u64>,
        direct: bool,
    ) -> Result<Backing, String> {
        let md = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", quote(path)))?;
        let ft = md.file_type();
        check_type(opts.kind, path, &ft)?;
        clear_nonblock(&file).map_err(|e| format!("{}: fcntl: {e}", quote(path)))?;
        if let Some(want) = created {
            file.set_len(want).map_err(|e| {
                format!(
                    "cannot size the new file {} to {want} bytes: {e}",
                    quote(path)
                )
            })?;
        }
        let (len, phys) = match opts.kind {
            Kind::Block => {
                let s = block_dev_size(&file).map_err(|e| format!("{}: {e}", quote(path)))?;
                (s, block_dev_pbsz(&file))
            }
            Kind::File | Kind::Cdrom => (created.unwrap_or(md.len()), md.blksize() as u32),
        };
        if let Some(want) = size {
            if want != len {
                return Err(format!(
                    "{} is {len} bytes, not the {want} bytes asked for: an existing file is never resized (leave size out to use it as it is)",
                    quote(path)
                ));
            }
        }
        let bs = u64::from(opts.block_size);
        if len == 0 || len % bs != 0 {
            return Err(format!(
                "the size of {} ({len} bytes) is not a non-zero multiple of the block size {bs}",
                quote(path)
            ));
        }
        let (mem, off) = if direct { dio_align(&file) } else { (1, 1) };
        // Without statx DIOALIGN fall back to the strictest common rule: the block size.
        let mem_align = if mem == 0 { opts.block_size } else { mem } as usize;
        let off_align = if off == 0 { opts.block_size } else { off };
        if direct && u64::from(off_align) > bs {
            return Err(format!(
                "{} needs O_DIRECT I/O aligned to {off_align} bytes, more than the block size {bs}",
                quote(path)
            ));
        }
        let inline = if direct {
            Inline::Never
        } else if memory_backed(&file) {
            Inline::Always
        } else {
            Inline::NoWait
        };
        Ok(Backing {
            file,
            path: path.to_string(),
            size: len,
            direct,
            mem_align: mem_align.max(1),
            off_align: u64::from(off_align).max(1),
            phys_block: phys,
            inline_read: AtomicU8::new(inline as u8),
            inline_write: AtomicU8::new(inline as u8),
        })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Whether the file was unlinked under us.
    fn deleted(&self) -> bool {
        self.file.metadata().map(|m| m.nlink() == 0).unwrap_or(true)
    }

    /// The current size of the backing (re-read from the file or the device).
    fn current_size(&self, kind: Kind) -> std::io::Result<u64> {
        match kind {
            Kind::Block => block_dev_size(&self.file),
            _ => self.file.metadata().map(|m| m.len()),
        }
    }
}

impl FileDev {
    /// Creates a device. `path` `None` (or an inactive device) opens nothing: a CD drive
    /// without a disc, or a disk that is not `active`. `size` creates a missing file that
    /// size, or must be the size of the existing one (see `Backing::open`).
    pub fn new(
        name: &str,
        opts: FileOptions,
        path: Option<&str>,
        size: Option<u64>,
        active: bool,
    ) -> Result<Arc<FileDev>, String> {
        let backing = match path {
            Some(p) if active => Some(Arc::new(Backing::open(&opts, p, size)?)),
            Some(p) => {
                if !p.starts_with('/') {
                    return Err(format!("filename {} must be an absolute path", quote(p)));
                }
                None
            }
            None => None,
        };
        // An inactive disk reports the size its file has now (it is opened later).
        let size = match (&backing, path) {
            (Some(b), _) => b.size,
            (None, Some(p)) if opts.kind == Kind::File => std::fs::metadata(p)
                .map(|m| m.len() - m.len() % u64::from(opts.block_size))
                .unwrap_or(0),
            _ => 0,
        };
        let phys = backing.as_ref().map_or(0, |b| b.phys_block);
        Ok(Arc::new(FileDev {
            name: name.to_string(),
            active: AtomicBool::new(backing.is_some() || path.is_none()),
            open: AtomicBool::new(backing.is_some()),
            state: RwLock::new(State {
                path: path.unwrap_or("").to_string(),
                backing,
                size_override: None,
            }),
            ops: Mutex::new(()),
            generation: AtomicU64::new(1),
            size: AtomicU64::new(size),
            phys_block: AtomicU32::new(phys),
            eio_streak: AtomicU32::new(0),
            misaligned_logged: AtomicBool::new(false),
            fault: Arc::default(),
            write_through: AtomicBool::new(opts.write_through),
            opts,
        }))
    }

    pub fn options(&self) -> &FileOptions {
        &self.opts
    }

    /// Whether writes are durable at completion (the write cache is off).
    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Relaxed)
    }

    /// Turns the write cache off (`true`: every later write is durable at completion) or
    /// on. Writes already submitted keep the mode they were submitted with; SYNCHRONIZE
    /// CACHE still flushes them.
    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Relaxed);
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The backing's path ("" when a CD drive is empty).
    pub fn filename(&self) -> String {
        self.state().path.clone()
    }

    /// Whether the backing is open (`active`; for a CD: a disc is loaded). One atomic load.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The `active` attribute: the administrator's wish, cleared when the backing fails.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The physical block size of the medium, 0 when unknown.
    pub fn physical_block_size(&self) -> u32 {
        self.phys_block.load(Ordering::Relaxed)
    }

    /// Puts `backing` in place; returns the one it replaces, for the caller to drop once it
    /// has released `st` (closing a file may wait for I/O).
    #[must_use]
    fn install(&self, st: &mut State, backing: Option<Arc<Backing>>) -> Option<Arc<Backing>> {
        let size = match (&backing, st.size_override) {
            (Some(b), Some(o)) => o.min(b.size),
            (Some(b), None) => b.size,
            // An empty CD drive has no capacity; a disk that goes inactive keeps the size it
            // had, so that its commands fail NOT READY rather than out of range.
            (None, _) if self.opts.kind == Kind::Cdrom => 0,
            (None, _) => self.size(),
        };
        if let Some(b) = &backing {
            self.phys_block.store(b.phys_block, Ordering::Relaxed);
        }
        self.open.store(backing.is_some(), Ordering::Release);
        let old = std::mem::replace(&mut st.backing, backing);
        self.size.store(size, Ordering::Release);
        self.eio_streak.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens (`true`) or closes the backing (SCST's `active`).
    pub fn set_active(&self, on: bool) -> Result<(), String> {
        let _op = self.ops();
        let old = if on {
            let path = {
                let st = self.state();
                st.backing.is_none().then(|| st.path.clone())
            };
            match path {
                None => None,
                Some(p) if p.is_empty() => return Err("no filename to open".into()),
                Some(p) => {
                    let b = Backing::open(&self.opts, &p, None)?;
                    self.install(&mut self.state_mut(), Some(Arc::new(b)))
                }
            }
        } else {
            let mut st = self.state_mut();
            if st.backing.is_some() {
                self.install(&mut st, None)
            } else {
                None
            }
        };
        self.active.store(on, Ordering::Release);
        drop(old);
        Ok(())
    }

    /// Switches to another backing file; `""` closes it (a CD ejected). On failure nothing
    /// changes.
    pub fn set_filename(&self, path: &str) -> Result<(), String> {
        let _op = self.ops();
        if path.is_empty() {
            if self.opts.kind != Kind::Cdrom {
                return Err("filename cannot be empty for a disk; write active=0 instead".into());
            }
            let mut st = self.state_mut();
            st.path.clear();
            let old = self.install(&mut st, None);
            drop(st);
            drop(old);
            return Ok(());
        }
        let b = Backing::open(&self.opts, path, None)?;
        let mut st = self.state_mut();
        st.path = path.to_string();
        let old = self.install(&mut st, Some(Arc::new(b)));
        self.active.store(true, Ordering::Release);
        drop(st);
        drop(old);
        Ok(())
    }

    /// Re-reads the size of the backing; returns the new size.
    pub fn resync_size(&self) -> Result<u64, String> {
        let _op = self.ops();
        let Some(b) = self.state().backing.clone() else {
            return Err("the device is not active".into());
        };
        let len = b
            .current_size(self.opts.kind)
            .map_err(|e| format!("cannot read the size of {}: {e}", quote(&b.path)))?;
        let bs = u64::from(self.opts.block_size);
        let len = len - len % bs;
        if len == 0 {
            return Err(format!("{} is smaller than one block", quote(&b.path)));
        }
        let nb = Backing {
            file: b
                .file
                .try_clone()
                .map_err(|e| format!("cannot reopen {}: {e}", quote(&b.path)))?,
            path: b.path.clone(),
            size: len,
            direct: b.direct,
            mem_align: b.mem_align,
            off_align: b.off_align,
            phys_block: b.phys_block,
            inline_read: AtomicU8::new(b.inline_read.load(Ordering::Relaxed)),
            inline_write: AtomicU8::new(b.inline_write.load(Ordering::Relaxed)),
        };
        let mut st = self.state_mut();
        // Only a failing I/O changes the backing outside `ops`, and it closes it.
        if !st.backing.as_ref().is_some_and(|x| Arc::ptr_eq(x, &b)) {
            return Err("the device went inactive meanwhile".into());
        }
        let old = self.install(&mut st, Some(Arc::new(nb)));
        drop(st);
        drop(old);
        Ok(self.size())
    }

    /// Sets the size the device reports (blockio's writable `size`): at most the backing's.
    pub fn set_size(&self, size: u64) -> Result<(), String> {
        let _op = self.ops();
        let mut st = self.state_mut();
        let bs = u64::from(self.opts.block_size);
        if size == 0 || !size.is_multiple_of(bs) {
            return Err(format!(
                "size {size} must be a non-zero multiple of the block size {bs}"
            ));
        }
        if let Some(b) = &st.backing {
            if size > b.size {
                return Err(format!(
                    "size {size} is larger than {} ({} bytes)",
                    quote(&b.path),
                    b.size
                ));
            }
        }
        st.size_override = Some(size);
        let b = st.backing.clone();
        // The same backing: nothing to close.
        let _same = self.install(&mut st, b);
        Ok(())
    }

    /// Flushes the backing to stable storage (the write-only `sync` attribute).
    pub fn sync(&self) -> Result<(), String> {
        let b = self.state().backing.clone();
        match b {
            Some(b) => b
                .file
                .sync_data()
                .map_err(|e| format!("fdatasync {}: {e}", quote(&b.path))),
            None => Err("the device is not active".into()),
        }
    }

    /// The backing failed hard: close it and go inactive, with one log line.
    fn fail(&self, failed: &Arc<Backing>, why: &str) {
        let mut st = self.state_mut();
        let same = st.backing.as_ref().is_some_and(|b| Arc::ptr_eq(b, failed));
        if !same {
            return;
        }
        error!(
            "device {}: backing {} failed ({why}); the device is now inactive (write active=1 to reopen)",
            self.name, failed.path
        );
        let old = self.install(&mut st, None);
        self.active.store(false, Ordering::Release);
        drop(st);
        drop(old);
    }

    /// Counts the outcome of an I/O toward the failure detection.
    fn note(&self, backing: &Arc<Backing>, errno: Option<i32>) {
        match errno {
            None => {
                if self.eio_streak.load(Ordering::Relaxed) != 0 {
                    self.eio_streak.store(0, Ordering::Relaxed);
                }
            }
            Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::ESTALE) => {
                let e = std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO));
                self.fail(backing, &e.to_string());
            }
            Some(libc::EIO) => {
                if backing.deleted() {
                    self.fail(backing, "the file was deleted");
                } else if self.eio_streak.fetch_add(1, Ordering::Relaxed) + 1 >= EIO_LIMIT {
                    self.fail(backing, "repeated I/O errors");
                }
            }
            Some(_) => {
                if backing.deleted() {
                    self.fail(backing, "the file was deleted");
                }
            }
        }
    }

    fn error_for(&self, errno: i32, offset: u64) -> BdevError {
        match errno {
            libc::ENOSPC | libc::EDQUOT if self.opts.thin => BdevError::NoSpace,
            _ => BdevError::Io(offset),
        }
    }
}

impl BlockDev for FileDev {
    fn block_size(&self) -> u32 {
        self.opts.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.size() / u64::from(self.opts.block_size)
    }

    fn open_channel(self: Arc<Self>, cx: &IoContext) -> Box<dyn IoChannel> {
        let fault = self.fault.clone();
        Box::new(Faulty::new(
            FileChannel {
                dev: self,
                ring: cx.ring(),
                done: Rc::new(RefCell::new(VecDeque::new())),
                backing: None,
                generation: 0,
            },
            fault,
        ))
    }

    fn fault(&self) -> Option<&FaultInject> {
        Some(&self.fault)
    }

    fn has_volatile_cache(&self) -> bool {
        !self.write_through() && !self.opts.nv_cache && self.opts.kind != Kind::Cdrom
    }

    fn supports_unmap(&self) -> bool {
        self.opts.thin && !self.opts.read_only && self.opts.kind != Kind::Cdrom
    }

    fn reports_provisioning(&self) -> bool {
        self.opts.kind == Kind::File
    }

    fn extent_at(&self, offset: u64) -> Option<Extent> {
        if self.opts.kind != Kind::File {
            return None;
        }
        let b = self.state().backing.clone()?;
        let size = self.size();
        if offset >= size {
            return None;
        }
        let bs = u64::from(self.opts.block_size);
        let fd = b.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek on an open descriptor; SEEK_DATA/SEEK_HOLE only move the file
            // position, which this backend never uses (all I/O is positional).
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        let (mapped, end) = match seek(libc::SEEK_DATA) {
            Ok(d) if d <= offset => (true, seek(libc::SEEK_HOLE).ok()?),
            Ok(d) => (false, d),
            // No data after offset: a hole to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (false, size),
            Err(_) => return None,
        };
        let end = end.min(size);
        // Whole blocks: a stretch that starts mid-block counts from the block's start.
        let len = end.saturating_sub(offset).div_ceil(bs).max(1) * bs;
        Some(Extent {
            mapped,
            len: len.min(size - offset),
        })
    }
}

/// A reactor's channel to a [`FileDev`].
struct FileChannel {
    dev: Arc<FileDev>,
    ring: Option<Rc<Ring>>,
    done: Rc<RefCell<VecDeque<BdevCompletion>>>,
    backing: Option<Arc<Backing>>,
    generation: u64,
}

impl FileChannel {
    fn finish(&self, io: BdevIo, result: Result<(), BdevError>) {
        self.done.borrow_mut().push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }

    fn misaligned(&self, b: &Backing, io: &mut BdevIo) -> bool {
        let Some(buf) = io.buf.as_mut() else {
            return false;
        };
        // Memory another LUN lent (a RAM disk's) is aligned only to that disk's blocks: the
        // buffer's own chunks are page-aligned.
        buf.own();
        let bad = !io.offset.is_multiple_of(b.off_align)
            || u64::from(io.len) % b.off_align != 0
            || buf.segments(0, io.len as usize).any(|s| {
                !(s.as_ptr() as usize).is_multiple_of(b.mem_align)
                    || !(s.len() as u64).is_multiple_of(b.off_align)
            });
        if bad && !self.dev.misaligned_logged.swap(true, Ordering::Relaxed) {
            warn!(
                "device {}: an I/O buffer is not aligned for O_DIRECT on {} (memory {} bytes, length {}): failing such I/O",
                self.dev.name, b.path, b.mem_align, b.off_align
            );
        }
        bad
    }
}

impl IoChannel for FileChannel {
    fn submit(&mut self, mut io: BdevIo) {
        let off = io.offset;
        let g = self.dev.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.backing = self.dev.state().backing.clone();
            self.generation = g;
        }
        let Some(b) = self.backing.clone() else {
            let e = if self.dev.opts.kind == Kind::Cdrom {
                BdevError::NoMedium
            } else {
                BdevError::Offline
            };
            return self.finish(io, Err(e));
        };
        let Some(ring) = self.ring.clone() else {
            return self.finish(io, Err(BdevError::Io(off)));
        };
        let size = self.dev.size();
        match io.op {
            IoOp::Read | IoOp::Write { .. } => {
                if io
                    .offset
                    .checked_add(u64::from(io.len))
                    .is_none_or(|end| end > size)
                {
                    return self.finish(io, Err(BdevError::Io(off)));
                }
                if matches!(io.op, IoOp::Write { .. })
                    && (self.dev.opts.read_only || self.dev.opts.kind == Kind::Cdrom)
                {
                    return self.finish(io, Err(BdevError::Io(off)));
                }
                if io.buf.as_ref().is_none_or(|x| x.len() < io.len as usize) {
                    return self.finish(io, Err(BdevError::BadBuffer));
                }
                if io.len == 0 {
                    return self.finish(io, Ok(()));
                }
                if b.direct && self.misaligned(&b, &mut io) {
                    return self.finish(io, Err(BdevError::BadBuffer));
                }
            }
            IoOp::Flush => {
                if self.dev.opts.nv_cache || self.dev.opts.read_only {
                    return self.finish(io, Ok(()));
                }
            }
            IoOp::Prefetch => {
                if io
                    .offset
                    .checked_add(u64::from(io.len))
                    .is_none_or(|end| end > size)
                {
                    return self.finish(io, Err(BdevError::Io(off)));
                }
                // O_DIRECT bypasses the page cache: nothing to warm.
                if b.direct || io.len == 0 {
                    return self.finish(io, Ok(()));
                }
            }
            IoOp::Unmap => {
                if io.ranges.is_empty() {
                    return self.finish(io, Ok(()));
                }
                if let Some(&(off, _)) = io
                    .ranges
                    .iter()
                    .find(|&&(o, n)| o.checked_add(n).is_none_or(|e| e > size))
                {
                    return self.finish(io, Err(BdevError::Io(off)));
                }
                if self.dev.opts.read_only || self.dev.opts.kind == Kind::Cdrom {
                    let first = io.ranges[0].0;
                    return self.finish(io, Err(BdevError::Io(first)));
                }
                if self.dev.opts.kind == Kind::Block {
                    // The ring has no discard before Linux 6.12: BLKDISCARD here, on the
                    // reactor (a discard only updates the device's maps).
                    let r = discard(&b, &io.ranges);
                    self.dev.note(&b, r.as_ref().err().map(|(e, _)| *e));
                    let r = r.map_err(|(e, off)| self.dev.error_for(e, off));
                    return self.finish(io, r);
                }
            }
            // Files do not claim it (`supports_write_zeroes`): the SCSI layer writes the zeros.
            IoOp::WriteZeroes => return self.finish(io, Err(BdevError::BadBuffer)),
        }
        let rw_flags = match io.op {
            IoOp::Write { fua } if fua || self.dev.write_through() => libc::RWF_DSYNC,
            _ => 0,
        };
        let mut done = 0;
        if matches!(io.op, IoOp::Read | IoOp::Write { .. }) {
            done = transfer_inline(&b, &mut io, rw_flags);
            if done == io.len {
                self.dev.note(&b, None);
                return self.finish(io, Ok(()));
            }
        }
        let outstanding = if io.op == IoOp::Unmap {
            io.ranges.len() as u32
        } else {
            1
        };
        ring.submit(Box::new(FileOp {
            io,
            backing: b,
            dev: self.dev.clone(),
            sink: self.done.clone(),
            done,
            iov: Vec::new(),
            retries: 0,
            outstanding,
            error: None,
            rw_flags,
        }));
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let mut d = self.done.borrow_mut();
        let n = d.len();
        out.extend(d.drain(..));
        n
    }

    fn busy(&self) -> bool {
        // Every operation on the ring holds a reference to the completion queue.
        Rc::strong_count(&self.done) > 1 || !self.done.borrow().is_empty()
    }
}

/// Most segments one inline transfer passes at once (a 8 MiB command in 128 KiB chunks is 64).
const INLINE_IOV: usize = 64;

/// Does as much of a buffered read or write as can be done without waiting (see [`Inline`]);
/// returns the bytes transferred. Any failure stops it early: the ring then does the rest and
/// reports the error as it would have.
fn transfer_inline(b: &Backing, io: &mut BdevIo, rw_flags: i32) -> u32 {
    let write = io.op != IoOp::Read;
    let mode = if write {
        &b.inline_write
    } else {
        &b.inline_read
    };
    let flags = match Inline::of(mode.load(Ordering::Relaxed)) {
        Inline::Never => return 0,
        // A FUA write waits for the device by definition.
        Inline::NoWait if rw_flags & libc::RWF_DSYNC != 0 => return 0,
        Inline::NoWait => rw_flags | libc::RWF_NOWAIT,
        Inline::Always => rw_flags,
    };
    let Some(buf) = io.buf.as_mut() else {
        return 0;
    };
    let len = io.len as usize;
    let mut done = 0usize;
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; INLINE_IOV];
    while done < len {
        let mut n = 0;
        for s in buf.segments_mut(done, len - done).take(INLINE_IOV) {
            iov[n] = libc::iovec {
                iov_base: s.as_mut_ptr().cast(),
                iov_len: s.len(),
            };
            n += 1;
        }
        if n == 0 {
            break;
        }
        let off = (io.offset + done as u64) as libc::off_t;
        let fd = b.file.as_raw_fd();
        let r = if write {
            // SAFETY: the first `n` iovecs point into live chunks of `buf`, which this call
            // borrows mutably for its duration; the descriptor is open (`b` holds it).
            unsafe { libc::pwritev2(fd, iov.as_ptr(), n as i32, off, flags) }
        } else {
            // SAFETY: as above; the kernel writes only within the segments' lengths.
            unsafe { libc::preadv2(fd, iov.as_ptr(), n as i32, off, flags) }
        };
        if r > 0 {
            done += r as usize;
            continue;
        }
        if r < 0 && errno_of(&std::io::Error::last_os_error()) == libc::EOPNOTSUPP {
            // This file takes no RWF_NOWAIT in this direction: the ring from now on.
            mode.store(Inline::Never as u8, Ordering::Relaxed);
        }
        // EAGAIN (it would wait), end of file, or an error the ring reports.
        break;
    }
    done.min(len) as u32
}

/// BLKDISCARD over each range; the first failure as (errno, offset).
fn discard(b: &Backing, ranges: &[(u64, u64)]) -> Result<(), (i32, u64)> {
    for &(off, len) in ranges {
        let range: [u64; 2] = [off, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which points at
        // a live array of two u64.
        let r = unsafe { libc::ioctl(b.file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
        if r != 0 {
            return Err((errno_of(&std::io::Error::last_os_error()), off));
        }
    }
    Ok(())
}

/// One I/O on the ring.
struct FileOp {
    io: BdevIo,
    /// Keeps the descriptor open until the last CQE.
    backing: Arc<Backing>,
    dev: Arc<FileDev>,
    sink: Rc<RefCell<VecDeque<BdevCompletion>>>,
    /// Bytes transferred so far (reads and writes).
    done: u32,
    /// The iovec array of the SQE in flight; the kernel reads it until the CQE.
    iov: Vec<libc::iovec>,
    retries: u8,
    /// SQEs in flight (one per range for an unmap).
    outstanding: u32,
    error: Option<(i32, u64)>,
    rw_flags: i32,
}

fn retryable(errno: i32) -> bool {
    matches!(errno, libc::EAGAIN | libc::EINTR | libc::ECANCELED)
}

impl RingOp for FileOp {
    fn prepare(&mut self, sub: Option<u32>, out: &mut Vec<(u32, Sqe)>) {
        let fd = self.backing.fd();
        match self.io.op {
            IoOp::Read | IoOp::Write { .. } => {
                let Some(buf) = self.io.buf.as_mut() else {
                    return;
                };
                let rest = (self.io.len - self.done) as usize;
                self.iov.clear();
                for s in buf.segments_mut(self.done as usize, rest) {
                    self.iov.push(libc::iovec {
                        iov_base: s.as_mut_ptr().cast(),
                        iov_len: s.len(),
                    });
                }
                let off = self.io.offset + u64::from(self.done);
                let n = self.iov.len() as u32;
                // The iovecs point into the chunks of `io.buf`, which this operation owns
                // until its CQE: the ring keeps the operation alive that long.
                let e = if self.io.op == IoOp::Read {
                    opcode::Readv::new(fd, self.iov.as_ptr(), n)
                        .offset(off)
                        .build()
                } else {
                    opcode::Writev::new(fd, self.iov.as_ptr(), n)
                        .offset(off)
                        .rw_flags(self.rw_flags)
                        .build()
                };
                out.push((0, e.into()));
            }
            IoOp::Flush => out.push((
                0,
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .into(),
            )),
            IoOp::Prefetch => out.push((
                0,
                opcode::Fadvise::new(fd, self.io.len as libc::off_t, libc::POSIX_FADV_WILLNEED)
                    .offset(self.io.offset)
                    .build()
                    .into(),
            )),
            IoOp::Unmap => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let subs: Vec<u32> = match sub {
                    Some(s) => vec![s],
                    None => (0..self.io.ranges.len() as u32).collect(),
                };
                for s in subs {
                    let (off, len) = self.io.ranges[s as usize];
                    out.push((
                        s,
                        opcode::Fallocate::new(fd, len)
                            .offset(off)
                            .mode(mode)
                            .build()
                            .into(),
                    ));
                }
            }
            // Refused in `submit`: never on the ring.
            IoOp::WriteZeroes => {}
        }
    }

    fn complete(&mut self, sub: u32, res: i32) -> Step {
        if res < 0 && retryable(-res) && self.retries < MAX_RETRIES {
            self.retries += 1;
            return Step::Resubmit(sub);
        }
        match self.io.op {
            IoOp::Read | IoOp::Write { .. } => {
                let at = self.io.offset + u64::from(self.done);
                if res < 0 {
                    self.error = Some((-res, at));
                    return Step::Done;
                }
                if res == 0 {
                    // A read at end of file (the file shrank), or a write that made no
                    // progress: retry a write, fail a read.
                    if self.io.op != IoOp::Read && self.retries < MAX_RETRIES {
                        self.retries += 1;
                        return Step::Resubmit(0);
                    }
                    self.error = Some((libc::EIO, at));
                    return Step::Done;
                }
                self.done = self.done.saturating_add(res as u32).min(self.io.len);
                if self.done < self.io.len {
                    // A short transfer: the rest goes out again.
                    return Step::Resubmit(0);
                }
                Step::Done
            }
            IoOp::Flush => {
                if res < 0 {
                    self.error = Some((-res, 0));
                }
                Step::Done
            }
            // A hint: a read-ahead that could not be started is not an error of the command.
            IoOp::Prefetch => Step::Done,
            IoOp::Unmap => {
                if res < 0 && self.error.is_none() {
                    let off = self.io.ranges.get(sub as usize).map_or(0, |r| r.0);
                    self.error = Some((-res, off));
                }
                self.outstanding -= 1;
                if self.outstanding == 0 {
                    Step::Done
                } else {
                    Step::Wait
                }
            }
            IoOp::WriteZeroes => Step::Done,
        }
    }

    fn finish(self: Box<Self>) {
        let FileOp {
            io,
            backing,
            dev,
            sink,
            error,
            ..
        } = *self;
        let result = match error {
            None => {
                dev.note(&backing, None);
                if io.op == IoOp::Flush && backing.deleted() {
                    dev.fail(&backing, "the file was deleted");
                }
                Ok(())
            }
            Some((libc::EINVAL, _)) if backing.direct && io.op != IoOp::Unmap => {
                // O_DIRECT refused the buffer or the range despite the checks.
                Err(BdevError::BadBuffer)
            }
            Some((errno, off)) => {
                dev.note(&backing, Some(errno));
                Err(dev.error_for(errno, off))
            }
        };
        sink.borrow_mut().push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::DataBuf;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn opts(kind: Kind) -> FileOptions {
        FileOptions {
            kind,
            block_size: 512,
            read_only: false,
            o_direct: false,
            write_through: false,
            nv_cache: false,
            thin: false,
        }
    }

    fn io(op: IoOp, offset: u64, buf: Option<DataBuf>) -> BdevIo {
        BdevIo {
            tag: 5,
            op,
            offset,
            len: buf.as_ref().map_or(0, |b| b.len() as u32),
            buf,
            ranges: Vec::new(),
        }
    }

    /// Submits one I/O and waits for its completion.
    fn run(cx: &IoContext, ch: &mut Box<dyn IoChannel>, io: BdevIo) -> BdevCompletion {
        ch.submit(io);
        let mut out = Vec::new();
        loop {
            cx.poll();
            if ch.poll(&mut out) > 0 {
                return out.pop().unwrap();
            }
            cx.wait();
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    #[test]
    fn write_and_read_back_across_chunks() {
        let dir = tempdir();
        let path = dir.path().join("d.img");
        let p = path.to_str().unwrap();
        let dev = FileDev::new("f0", opts(Kind::File), Some(p), Some(4 << 20), true).unwrap();
        assert_eq!(dev.num_blocks(), 8192);
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        // 300 KiB spans three 128 KiB chunks; the offset is not chunk aligned.
        let data = pattern(300 * 1024, 3);
        let mut b = DataBuf::alloc(data.len()).unwrap();
        b.write_at(0, &data);
        let c = run(
            &cx,
            &mut ch,
            io(IoOp::Write { fua: true }, 512 * 77, Some(b)),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.tag, 5);
        assert!(c.buf.is_some(), "the buffer comes back");
        let c = run(
            &cx,
            &mut ch,
            io(IoOp::Read, 512 * 77, DataBuf::alloc(data.len())),
        );
        assert_eq!(c.result, Ok(()));
        let mut back = vec![0u8; data.len()];
        c.buf.unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
        // The file holds it too.
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(512 * 77)).unwrap();
        let mut raw = vec![0u8; data.len()];
        f.read_exact(&mut raw).unwrap();
        assert_eq!(raw, data);
        // Flush; past the end fails without panicking.
        assert_eq!(run(&cx, &mut ch, io(IoOp::Flush, 0, None)).result, Ok(()));
        let c = run(
            &cx,
            &mut ch,
            io(IoOp::Read, (4 << 20) - 512, DataBuf::alloc(1024)),
        );
        assert_eq!(c.result, Err(BdevError::Io((4 << 20) - 512)));
        assert_eq!(cx.inflight(), 0);
    }

    #[test]
    fn buffered_io_that_cannot_wait_completes_on_the_reactor() {
        // tmpfs: every transfer is a copy, done in the submitting call; nothing on the ring.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("m.img");
        let dev = FileDev::new("m", opts(Kind::File), p.to_str(), Some(1 << 20), true).unwrap();
        assert!(memory_backed(&dev.state().backing.clone().unwrap().file));
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let data = pattern(200 * 1024, 9);
        let mut b = DataBuf::alloc(data.len()).unwrap();
        b.write_at(0, &data);
        let mut out = Vec::new();
        ch.submit(io(IoOp::Write { fua: true }, 4096, Some(b)));
        assert_eq!(ch.poll(&mut out), 1, "the write completed at submit");
        assert_eq!(cx.inflight(), 0);
        ch.submit(io(IoOp::Read, 4096, DataBuf::alloc(data.len())));
        assert_eq!(ch.poll(&mut out), 1, "the read completed at submit");
        let c = out.pop().unwrap();
        assert_eq!(c.result, Ok(()));
        let mut back = vec![0u8; data.len()];
        c.buf.unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
        // Past the end still fails as before.
        ch.submit(io(IoOp::Read, (1 << 20) - 512, DataBuf::alloc(1024)));
        assert_eq!(ch.poll(&mut out), 1);
        assert_eq!(
            out.pop().unwrap().result,
            Err(BdevError::Io((1 << 20) - 512))
        );

        // A page-cache file system: the same read, served from the cache with RWF_NOWAIT
        // where the file system takes it, else on the ring; the data is right either way.
        let dir = tempdir();
        let p = dir.path().join("c.img");
        let dev = FileDev::new("c", opts(Kind::File), p.to_str(), Some(1 << 20), true).unwrap();
        assert!(!memory_backed(&dev.state().backing.clone().unwrap().file));
        let mut ch = dev.clone().open_channel(&cx);
        let mut b = DataBuf::alloc(data.len()).unwrap();
        b.write_at(0, &data);
        assert_eq!(
            run(&cx, &mut ch, io(IoOp::Write { fua: false }, 0, Some(b))).result,
            Ok(())
        );
        let c = run(&cx, &mut ch, io(IoOp::Read, 0, DataBuf::alloc(data.len())));
        c.buf.unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
    }

    #[test]
    fn many_in_flight_share_one_ring() {
        let dir = tempdir();
        let p = dir.path().join("m.img");
        let p = p.to_str().unwrap();
        let a = FileDev::new("a", opts(Kind::File), Some(p), Some(8 << 20), true).unwrap();
        let cx = IoContext::new();
        let mut ch = a.clone().open_channel(&cx);
        // More than the SQ holds: the backlog takes the rest.
        for i in 0..600u64 {
            let mut b = DataBuf::alloc(4096).unwrap();
            b.write_at(0, &pattern(4096, i as u8));
            ch.submit(BdevIo {
                tag: i,
                ..io(IoOp::Write { fua: false }, i * 4096, Some(b))
            });
        }
        let mut out = Vec::new();
        while out.len() < 600 {
            cx.poll();
            ch.poll(&mut out);
            if out.len() < 600 {
                cx.wait();
            }
        }
        assert!(out.iter().all(|c| c.result.is_ok()));
        for i in [0u64, 255, 256, 599] {
            let c = run(&cx, &mut ch, io(IoOp::Read, i * 4096, DataBuf::alloc(4096)));
            let mut back = vec![0u8; 4096];
            c.buf.unwrap().read_at(0, &mut back);
            assert_eq!(back, pattern(4096, i as u8), "block {i}");
        }
    }

    #[test]
    fn short_reads_are_completed() {
        // A FileOp whose kernel answers arrive in pieces still fills the whole buffer.
        let dir = tempdir();
        let p = dir.path().join("s.img");
        let p = p.to_str().unwrap();
        let dev = FileDev::new("s", opts(Kind::File), Some(p), Some(1 << 20), true).unwrap();
        let backing = dev.state().backing.clone().unwrap();
        let sink = Rc::new(RefCell::new(VecDeque::new()));
        let mut op = FileOp {
            io: io(IoOp::Read, 0, DataBuf::alloc(8192)),
            backing,
            dev: dev.clone(),
            sink: sink.clone(),
            done: 0,
            iov: Vec::new(),
            retries: 0,
            outstanding: 1,
            error: None,
            rw_flags: 0,
        };
        let mut sqes = Vec::new();
        op.prepare(None, &mut sqes);
        assert_eq!(sqes.len(), 1);
        assert!(matches!(op.complete(0, 1000), Step::Resubmit(0)));
        sqes.clear();
        op.prepare(Some(0), &mut sqes);
        assert_eq!(op.iov.iter().map(|v| v.iov_len).sum::<usize>(), 8192 - 1000);
        assert!(matches!(op.complete(0, -libc::EAGAIN), Step::Resubmit(0)));
        assert!(matches!(
            op.complete(0, -libc::ECANCELED),
            Step::Resubmit(0)
        ));
        assert!(matches!(op.complete(0, 8192 - 1000), Step::Done));
        Box::new(op).finish();
        assert_eq!(sink.borrow_mut().pop_front().unwrap().result, Ok(()));
        // End of file in the middle of a read is an error at the right offset.
        let mut op = FileOp {
            io: io(IoOp::Read, 4096, DataBuf::alloc(4096)),
            backing: dev.state().backing.clone().unwrap(),
            dev: dev.clone(),
            sink: sink.clone(),
            done: 0,
            iov: Vec::new(),
            retries: 0,
            outstanding: 1,
            error: None,
            rw_flags: 0,
        };
        assert!(matches!(op.complete(0, 512), Step::Resubmit(0)));
        assert!(matches!(op.complete(0, 0), Step::Done));
        Box::new(op).finish();
        assert_eq!(
            sink.borrow_mut().pop_front().unwrap().result,
            Err(BdevError::Io(4096 + 512))
        );
    }

    #[test]
    fn unmap_punches_holes_and_extents_show_them() {
        let dir = tempdir();
        let p = dir.path().join("t.img");
        let p = p.to_str().unwrap();
        let o = FileOptions {
            thin: true,
            ..opts(Kind::File)
        };
        let dev = FileDev::new("t", o, Some(p), Some(4 << 20), true).unwrap();
        assert!(dev.supports_unmap());
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        // A sparse new file: all hole.
        let e = dev.extent_at(0).unwrap();
        assert!(!e.mapped);
        assert_eq!(e.len, 4 << 20);
        let mut b = DataBuf::alloc(1 << 20).unwrap();
        b.fill(0, 1 << 20, 0x5a);
        let c = run(
            &cx,
            &mut ch,
            io(IoOp::Write { fua: false }, 1 << 20, Some(b)),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(
            run(&cx, &mut ch, io(IoOp::Flush, 0, None)).result,
            Ok(()),
            "flush"
        );
        assert_eq!(
            dev.extent_at(0),
            Some(Extent {
                mapped: false,
                len: 1 << 20
            })
        );
        assert_eq!(
            dev.extent_at(1 << 20),
            Some(Extent {
                mapped: true,
                len: 1 << 20
            })
        );
        // Unmap two pieces of the written MiB.
        let mut u = io(IoOp::Unmap, 0, None);
        u.ranges = vec![(1 << 20, 64 << 10), ((1 << 20) + (512 << 10), 128 << 10)];
        assert_eq!(run(&cx, &mut ch, u).result, Ok(()));
        let e = dev.extent_at(1 << 20).unwrap();
        assert_eq!((e.mapped, e.len), (false, 64 << 10));
        let e = dev.extent_at((1 << 20) + (64 << 10)).unwrap();
        assert_eq!((e.mapped, e.len), (true, 448 << 10));
        let c = run(
            &cx,
            &mut ch,
            io(IoOp::Read, 1 << 20, DataBuf::alloc(128 << 10)),
        );
        let mut back = vec![1u8; 128 << 10];
        c.buf.unwrap().read_at(0, &mut back);
        assert!(
            back[..64 << 10].iter().all(|&x| x == 0),
            "unmapped reads zeros"
        );
        assert!(back[64 << 10..].iter().all(|&x| x == 0x5a));
        // Out of range unmap fails.
        let mut u = io(IoOp::Unmap, 0, None);
        u.ranges = vec![((4 << 20) - 512, 1024)];
        assert!(run(&cx, &mut ch, u).result.is_err());
    }

    #[test]
    fn deleted_file_takes_the_device_offline() {
        let dir = tempdir();
        let path = dir.path().join("gone.img");
        let p = path.to_str().unwrap();
        let dev = FileDev::new("g", opts(Kind::File), Some(p), Some(1 << 20), true).unwrap();
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(run(&cx, &mut ch, io(IoOp::Flush, 0, None)).result, Ok(()));
        assert!(!dev.is_active());
        let c = run(&cx, &mut ch, io(IoOp::Read, 0, DataBuf::alloc(512)));
        assert_eq!(c.result, Err(BdevError::Offline));
        // Reopening a missing file fails and says why.
        let e = dev.set_active(true).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        // Recreated, it comes back.
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0u8; 4096])
            .unwrap();
        dev.set_active(true).unwrap();
        assert_eq!(dev.num_blocks(), 8);
        let c = run(&cx, &mut ch, io(IoOp::Read, 0, DataBuf::alloc(512)));
        assert_eq!(c.result, Ok(()));
    }

    #[test]
    fn validation_names_the_cause() {
        let dir = tempdir();
        let path = dir.path().join("v.img");
        let p = path.to_str().unwrap();
        let e = FileDev::new("v", opts(Kind::File), Some(p), None, true)
            .err()
            .unwrap();
        assert!(e.contains("No such file"), "{e}");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        let e = FileDev::new("v", opts(Kind::File), Some(p), None, true)
            .err()
            .unwrap();
        assert!(e.contains("multiple of the block size"), "{e}");
        let e = FileDev::new("v", opts(Kind::File), Some("rel.img"), None, true)
            .err()
            .unwrap();
        assert!(e.contains("absolute"), "{e}");
        let e = FileDev::new("v", opts(Kind::Block), Some(p), None, true)
            .err()
            .unwrap();
        assert!(e.contains("not a block device"), "{e}");
    }

    #[test]
    fn existing_files_are_never_resized() {
        let dir = tempdir();
        let path = dir.path().join("e.img");
        let p = path.to_str().unwrap();
        std::fs::write(&path, vec![3u8; 1 << 20]).unwrap();
        for read_only in [false, true] {
            let o = FileOptions {
                read_only,
                ..opts(Kind::File)
            };
            let e = FileDev::new("e", o.clone(), Some(p), Some(2 << 20), true)
                .err()
                .unwrap();
            assert!(
                e.contains(p) && e.contains(&(1u64 << 20).to_string()) && e.contains("2097152"),
                "{e}"
            );
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                1 << 20,
                "untouched"
            );
            // The size it has is fine, and so is no size at all.
            let d = FileDev::new("e", o.clone(), Some(p), Some(1 << 20), true).unwrap();
            assert_eq!(d.size(), 1 << 20);
            let d = FileDev::new("e", o, Some(p), None, true).unwrap();
            assert_eq!(d.size(), 1 << 20);
        }
        let e = FileDev::new("e", opts(Kind::File), Some(p), Some(512 << 10), true)
            .err()
            .unwrap();
        assert!(e.contains("524288"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![3u8; 1 << 20]);
    }

    #[test]
    fn new_files_are_private_and_sparse() {
        let dir = tempdir();
        let path = dir.path().join("n.img");
        let p = path.to_str().unwrap();
        let d = FileDev::new("n", opts(Kind::File), Some(p), Some(64 << 20), true).unwrap();
        assert_eq!(d.size(), 64 << 20);
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert_eq!(
            md.mode() & 0o077,
            0,
            "mode {:o}: others can read the LUN",
            md.mode()
        );
        assert!(
            md.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            md.blocks()
        );
        // Without a size a missing file is an error, not a new file.
        let q = dir.path().join("none.img");
        let e = FileDev::new("n", opts(Kind::File), q.to_str(), None, true)
            .err()
            .unwrap();
        assert!(e.contains("No such file"), "{e}");
        assert!(!q.exists());
        // A file made for a device that then fails is not left behind.
        let e = FileDev::new("n", opts(Kind::File), q.to_str(), Some(1000), true)
            .err()
            .unwrap();
        assert!(e.contains("multiple of the block size"), "{e}");
        assert!(!q.exists(), "a failed create left its file");
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = tempdir();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let ro = |kind| FileOptions {
            read_only: true,
            ..opts(kind)
        };
        let cd = FileOptions {
            block_size: 2048,
            ..ro(Kind::Cdrom)
        };
        let cases = [
            (&fifo, "a FIFO"),
            (&sock, "a socket"),
            (&sub, "a directory"),
        ];
        for (path, what) in cases {
            let p = path.to_str().unwrap();
            for o in [
                opts(Kind::File),
                ro(Kind::File),
                cd.clone(),
                opts(Kind::Block),
            ] {
                let kind = o.kind;
                let e = FileDev::new("x", o, Some(p), None, true).err().unwrap();
                assert!(e.contains(p) && e.contains(what), "{kind:?} on {what}: {e}");
            }
        }
        let e = FileDev::new("x", opts(Kind::File), Some("/dev/null"), None, true)
            .err()
            .unwrap();
        assert!(
            e.contains("/dev/null") && e.contains("a character device"),
            "{e}"
        );
        let e = FileDev::new("x", opts(Kind::Block), Some("/dev/null"), None, true)
            .err()
            .unwrap();
        assert!(e.contains("not a block device"), "{e}");
        // A CD drive refuses one as its disc too, and stays empty.
        let d = FileDev::new("cd", cd, None, None, true).unwrap();
        let e = d.set_filename(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.contains("a FIFO"), "{e}");
        assert!(!d.is_open());
    }

    #[test]
    fn the_descriptor_is_blocking_for_io() {
        // O_NONBLOCK is only for the open: io_uring would fail buffered I/O with EAGAIN.
        let dir = tempdir();
        let path = dir.path().join("b.img");
        let dev = FileDev::new("b", opts(Kind::File), path.to_str(), Some(1 << 20), true).unwrap();
        let b = dev.state().backing.clone().unwrap();
        // SAFETY: F_GETFL on an open descriptor reads its flags; no memory is passed.
        let fl = unsafe { libc::fcntl(b.file.as_raw_fd(), libc::F_GETFL) };
        assert!(fl >= 0);
        assert_eq!(fl & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn injected_faults_leave_the_backing_alone() {
        use crate::bdev::Fault;
        let dir = tempdir();
        let p = dir.path().join("f.img");
        let dev = FileDev::new("f", opts(Kind::File), p.to_str(), Some(1 << 20), true).unwrap();
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let data = pattern(8192, 4);
        let mut b = DataBuf::alloc(data.len()).unwrap();
        b.write_at(0, &data);
        let c = run(&cx, &mut ch, io(IoOp::Write { fua: false }, 4096, Some(b)));
        assert_eq!(c.result, Ok(()));
        let fault = dev.fault().unwrap();
        fault.set(Fault::EioWrite);
        // More injected errors than it takes real ones to close the backing.
        for _ in 0..EIO_LIMIT * 2 {
            let c = run(
                &cx,
                &mut ch,
                io(IoOp::Write { fua: false }, 512, DataBuf::alloc(512)),
            );
            assert_eq!(c.result, Err(BdevError::Io(512)));
        }
        assert!(
            dev.is_active() && dev.is_open(),
            "an injected EIO took it offline"
        );
        // A stalled read on the ring completes, with the data, once the stall is over.
        fault.set(Fault::Stall);
        ch.submit(io(IoOp::Read, 4096, DataBuf::alloc(data.len())));
        let mut out = Vec::new();
        for _ in 0..3 {
            cx.poll();
            assert_eq!(ch.poll(&mut out), 0, "held");
        }
        assert_eq!(cx.inflight(), 0, "nothing went to the ring");
        fault.set(Fault::None);
        let c = loop {
            cx.poll();
            if ch.poll(&mut out) > 0 {
                break out.pop().unwrap();
            }
            if cx.inflight() > 0 {
                cx.wait();
            }
        };
        assert_eq!(c.result, Ok(()));
        let mut back = vec![0u8; data.len()];
        c.buf.unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
    }

    #[test]
    fn cdrom_eject_and_insert() {
        let dir = tempdir();
        let iso = dir.path().join("a.iso");
        std::fs::write(&iso, vec![7u8; 2048 * 10]).unwrap();
        let o = FileOptions {
            block_size: 2048,
            read_only: true,
            ..opts(Kind::Cdrom)
        };
        let dev = FileDev::new("cd", o, None, None, true).unwrap();
        assert!(!dev.is_open());
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let c = run(&cx, &mut ch, io(IoOp::Read, 0, DataBuf::alloc(2048)));
        assert_eq!(c.result, Err(BdevError::NoMedium));
        dev.set_filename(iso.to_str().unwrap()).unwrap();
        assert_eq!(dev.num_blocks(), 10);
        let c = run(&cx, &mut ch, io(IoOp::Read, 2048, DataBuf::alloc(2048)));
        assert_eq!(c.result, Ok(()));
        let mut b = DataBuf::alloc(2048).unwrap();
        b.fill(0, 2048, 1);
        let c = run(&cx, &mut ch, io(IoOp::Write { fua: false }, 0, Some(b)));
        assert!(c.result.is_err(), "a CD is read-only");
        dev.set_filename("").unwrap();
        assert_eq!(dev.num_blocks(), 0);
        let c = run(&cx, &mut ch, io(IoOp::Read, 0, DataBuf::alloc(2048)));
        assert_eq!(c.result, Err(BdevError::NoMedium));
    }

    #[test]
    fn o_direct_reads_back_or_refuses_misaligned_buffers() {
        let dir = tempdir();
        let p = dir.path().join("d.img");
        let p = p.to_str().unwrap();
        let o = FileOptions {
            o_direct: true,
            ..opts(Kind::File)
        };
        let dev = FileDev::new("od", o, Some(p), Some(1 << 20), true).unwrap();
        let cx = IoContext::new();
        let mut ch = dev.clone().open_channel(&cx);
        let data = pattern(256 << 10, 9);
        let mut b = DataBuf::alloc(data.len()).unwrap();
        b.write_at(0, &data);
        let c = run(&cx, &mut ch, io(IoOp::Write { fua: true }, 4096, Some(b)));
        match c.result {
            Ok(()) => {
                let c = run(
                    &cx,
                    &mut ch,
                    io(IoOp::Read, 4096, DataBuf::alloc(data.len())),
                );
                assert_eq!(c.result, Ok(()));
                let mut back = vec![0u8; data.len()];
                c.buf.unwrap().read_at(0, &mut back);
                assert_eq!(back, data);
            }
            // Buffers not aligned for O_DIRECT fail cleanly; the file is untouched.
            Err(e) => {
                assert_eq!(e, BdevError::BadBuffer);
                let raw = std::fs::read(p).unwrap();
                assert!(raw.iter().all(|&x| x == 0));
            }
        }
        // A misaligned offset is refused whatever the buffers.
        let c = run(&cx, &mut ch, io(IoOp::Read, 100, DataBuf::alloc(512)));
        assert_eq!(c.result, Err(BdevError::BadBuffer));
    }
}

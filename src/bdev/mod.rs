//! Block backends (SPDK's bdev model): a [`BlockDev`] is shared by every reactor; each reactor
//! talks to it through its own [`IoChannel`]. An I/O owns its data buffer while the backend
//! works on it and hands it back in the completion: no copies of buffers, no locks between
//! reactors on the submission path.
//!
//! Backends here: `vdisk_nullio` (reads zeros, writes dropped) and `vdisk_ramio` (RAM with real
//! storage, SPDK's malloc bdev), which complete at once, and in [`file`] `vdisk_fileio`,
//! `vdisk_blockio` and `vcdrom`, which go through the reactor's io_uring ([`uring`]). Every
//! completion travels through `poll`, so both kinds share one path.
//!
//! Each reactor has one [`IoContext`] (owned by its SCSI port): the ring that all of that
//! reactor's file and block channels share, created on first use.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::{Arc, RwLock};

use log::error;

use crate::env::DataBuf;

pub mod file;
pub mod uring;

pub use file::{FileDev, FileOptions, Kind};
pub use uring::Ring;

/// What a backend reports for a failed I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum BdevError {
    /// I/O error at byte offset {0}
    Io(u64),
    /// out of space
    NoSpace,
    /// the I/O carried no buffer, a buffer of the wrong size, or one not aligned for O_DIRECT
    BadBuffer,
    /// the device is not active (its backing is closed or failed)
    Offline,
    /// no medium is loaded
    NoMedium,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    /// Deallocates the byte ranges in [`BdevIo::ranges`] (thin provisioning: UNMAP, WRITE
    /// SAME with UNMAP). Afterwards they read as zeros; `offset`/`len` are unused.
    Unmap,
    /// A hint that `offset`/`len` will be read soon (PRE-FETCH): backends with a cache in
    /// front of slower storage start reading it in; the others have nothing to do.
    Prefetch,
}

pub struct BdevIo {
    pub tag: u64,
    pub op: IoOp,
    /// Byte offset on the device.
    pub offset: u64,
    pub len: u32,
    pub buf: Option<DataBuf>,
    /// For [`IoOp::Unmap`]: (byte offset, byte length) pairs, block-aligned and in range.
    pub ranges: Vec<(u64, u64)>,
}

/// The provisioning state of a stretch of a device, for GET LBA STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Whether the stretch is mapped (holds data) or deallocated.
    pub mapped: bool,
    /// Its length in bytes from the queried offset (at least one block).
    pub len: u64,
}

pub struct BdevCompletion {
    pub tag: u64,
    pub result: Result<(), BdevError>,
    pub buf: Option<DataBuf>,
}

pub trait BlockDev: Send + Sync {
    fn block_size(&self) -> u32;
    fn num_blocks(&self) -> u64;
    /// A channel for the reactor whose I/O context is `cx`.
    fn open_channel(self: Arc<Self>, cx: &IoContext) -> Box<dyn IoChannel>;
    /// Whether writes may sit in a volatile cache (MODE SENSE caching page WCE).
    fn has_volatile_cache(&self) -> bool {
        false
    }
    /// Whether [`IoOp::Unmap`] deallocates (the device is thin provisioned).
    fn supports_unmap(&self) -> bool {
        false
    }
    /// The provisioning state from byte `offset` on (GET LBA STATUS). `None` when the
    /// backend cannot tell: everything counts as mapped.
    fn extent_at(&self, _offset: u64) -> Option<Extent> {
        None
    }
}

/// A reactor's backend I/O state: the io_uring its file and block channels share, created
/// on first use so that a reactor serving only RAM disks never opens one. Not `Send`: it
/// belongs to the reactor thread.
#[derive(Default)]
pub struct IoContext {
    ring: OnceCell<Option<Rc<Ring>>>,
}

impl IoContext {
    pub fn new() -> IoContext {
        IoContext::default()
    }

    /// The ring, created on first call; `None` (logged once) when io_uring is unavailable.
    pub fn ring(&self) -> Option<Rc<Ring>> {
        self.ring
            .get_or_init(|| match Ring::new() {
                Ok(r) => Some(Rc::new(r)),
                Err(e) => {
                    error!("cannot create an io_uring ({e}): file and block devices fail I/O");
                    None
                }
            })
            .clone()
    }

    /// Submits queued SQEs and handles the completions that have arrived; the channels then
    /// report them from their `poll`. Returns how many operations finished.
    pub fn poll(&self) -> usize {
        match self.ring.get() {
            Some(Some(r)) => r.poll(),
            _ => 0,
        }
    }

    /// Blocks until some ring I/O completes (tests and shutdown).
    pub fn wait(&self) -> usize {
        match self.ring.get() {
            Some(Some(r)) => r.wait(),
            _ => 0,
        }
    }

    /// Operations in flight in the kernel: while there are any the reactor must not sleep.
    pub fn inflight(&self) -> usize {
        match self.ring.get() {
            Some(Some(r)) => r.inflight(),
            _ => 0,
        }
    }
}

pub trait IoChannel {
    /// Takes the I/O; its completion comes back from [`poll`](IoChannel::poll).
    fn submit(&mut self, io: BdevIo);
    /// Appends completed I/O; returns how many.
    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize;
    /// Whether I/O submitted here has not been reported by `poll` yet.
    fn busy(&self) -> bool;
}

/// A channel for backends that complete in the submitting call.
struct Immediate<D> {
    dev: Arc<D>,
    done: VecDeque<BdevCompletion>,
}

trait SyncDev: Send + Sync {
    fn run(&self, io: &mut BdevIo) -> Result<(), BdevError>;
}

impl<D: SyncDev + 'static> IoChannel for Immediate<D> {
    fn submit(&mut self, mut io: BdevIo) {
        let result = self.dev.run(&mut io);
        self.done.push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn busy(&self) -> bool {
        !self.done.is_empty()
    }
}

/// SCST's vdisk_nullio: reads return zeros, writes are dropped.
pub struct NullDev {
    block_size: u32,
    num_blocks: u64,
}

impl NullDev {
    pub fn new(block_size: u32, num_blocks: u64) -> Arc<NullDev> {
        Arc::new(NullDev {
            block_size,
            num_blocks,
        })
    }
}

impl SyncDev for NullDev {
    fn run(&self, io: &mut BdevIo) -> Result<(), BdevError> {
        if let (IoOp::Read, Some(buf)) = (io.op, io.buf.as_mut()) {
            buf.fill(0, io.len as usize, 0);
        }
        Ok(())
    }
}

impl BlockDev for NullDev {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn open_channel(self: Arc<Self>, _cx: &IoContext) -> Box<dyn IoChannel> {
        Box::new(Immediate {
            dev: self,
            done: VecDeque::with_capacity(64),
        })
    }
}

/// Bytes per RAM chunk: each chunk has its own lock, so reactors working on different parts
/// of the disk never meet.
const RAM_CHUNK: usize = 1 << 20;

/// A RAM disk whose data reads back (SPDK's malloc bdev). Memory is zero-filled on demand by
/// the kernel (calloc'd chunks), so an untouched disk costs nothing.
pub struct RamDev {
    block_size: u32,
    size: u64,
    chunks: Vec<RwLock<Box<[u8]>>>,
}

impl RamDev {
    pub fn new(block_size: u32, size: u64) -> Arc<RamDev> {
        let n = (size as usize).div_ceil(RAM_CHUNK);
        let chunks = (0..n)
            .map(|_| RwLock::new(vec![0u8; RAM_CHUNK].into_boxed_slice()))
            .collect();
        Arc::new(RamDev {
            block_size,
            size,
            chunks,
        })
    }

    /// Calls `f(chunk_index, offset_in_chunk, buf_offset, len)` for each piece of a range.
    fn pieces(offset: u64, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0;
        while done < len {
            let pos = offset as usize + done;
            let (ci, co) = (pos / RAM_CHUNK, pos % RAM_CHUNK);
            let n = (RAM_CHUNK - co).min(len - done);
            f(ci, co, done, n);
            done += n;
        }
    }
}

impl SyncDev for RamDev {
    fn run(&self, io: &mut BdevIo) -> Result<(), BdevError> {
        let len = io.len as usize;
        if matches!(io.op, IoOp::Flush | IoOp::Prefetch) {
            return Ok(());
        }
        if io.op == IoOp::Unmap {
            // Deallocated blocks of a RAM disk read as zeros.
            for &(off, n) in &io.ranges {
                if off.checked_add(n).is_none_or(|end| end > self.size) {
                    return Err(BdevError::Io(off));
                }
                Self::pieces(off, n as usize, |ci, co, _, n| {
                    let mut chunk = self.chunks[ci].write().unwrap_or_else(|e| e.into_inner());
                    chunk[co..co + n].fill(0);
                });
            }
            return Ok(());
        }
        if io
            .offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(BdevError::Io(io.offset));
        }
        let buf = io.buf.as_mut().ok_or(BdevError::BadBuffer)?;
        if buf.len() < len {
            return Err(BdevError::BadBuffer);
        }
        match io.op {
            IoOp::Read => Self::pieces(io.offset, len, |ci, co, bo, n| {
                let chunk = self.chunks[ci].read().unwrap_or_else(|e| e.into_inner());
                buf.write_at(bo, &chunk[co..co + n]);
            }),
            IoOp::Write { .. } => Self::pieces(io.offset, len, |ci, co, bo, n| {
                let mut chunk = self.chunks[ci].write().unwrap_or_else(|e| e.into_inner());
                buf.read_at(bo, &mut chunk[co..co + n]);
            }),
            IoOp::Flush | IoOp::Unmap | IoOp::Prefetch => {}
        }
        Ok(())
    }
}

impl BlockDev for RamDev {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.size / u64::from(self.block_size)
    }
    fn open_channel(self: Arc<Self>, _cx: &IoContext) -> Box<dyn IoChannel> {
        Box::new(Immediate {
            dev: self,
            done: VecDeque::with_capacity(64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(op: IoOp, offset: u64, len: u32, buf: DataBuf) -> BdevIo {
        BdevIo {
            tag: 9,
            op,
            offset,
            len,
            buf: Some(buf),
            ranges: Vec::new(),
        }
    }

    #[test]
    fn ram_reads_back_across_chunks() {
        let dev = RamDev::new(512, 4 << 20);
        let mut ch = dev.clone().open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(300 * 1024).unwrap();
        let data: Vec<u8> = (0..b.len()).map(|i| (i * 7) as u8).collect();
        b.write_at(0, &data);
        ch.submit(io(
            IoOp::Write { fua: true },
            RAM_CHUNK as u64 - 4096,
            data.len() as u32,
            b,
        ));
        let mut out = Vec::new();
        assert_eq!(ch.poll(&mut out), 1);
        assert!(out[0].result.is_ok());
        assert_eq!(out[0].tag, 9);
        ch.submit(io(
            IoOp::Read,
            RAM_CHUNK as u64 - 4096,
            data.len() as u32,
            DataBuf::alloc(data.len()).unwrap(),
        ));
        out.clear();
        ch.poll(&mut out);
        let mut back = vec![0u8; data.len()];
        out[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert_eq!(back, data);
        // Past the end fails, never panics.
        ch.submit(io(
            IoOp::Read,
            (4 << 20) - 512,
            1024,
            DataBuf::alloc(1024).unwrap(),
        ));
        out.clear();
        ch.poll(&mut out);
        assert!(out[0].result.is_err());
    }

    #[test]
    fn null_reads_zeros() {
        let dev = NullDev::new(512, 1000);
        let mut ch = dev.open_channel(&IoContext::new());
        let mut b = DataBuf::alloc(4096).unwrap();
        b.fill(0, 4096, 0xff);
        ch.submit(io(IoOp::Read, 0, 4096, b));
        let mut out = Vec::new();
        ch.poll(&mut out);
        let mut back = vec![1u8; 4096];
        out[0].buf.as_ref().unwrap().read_at(0, &mut back);
        assert!(back.iter().all(|&x| x == 0));
    }
}

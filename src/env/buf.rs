//! Data buffers of the I/O path.
//!
//! A [`DataBuf`] holds the data of one SCSI command as a list of fixed-size chunks from the
//! DMA buffer pool ([`super::pool`]), so that large transfers need no large contiguous memory
//! and every piece can be handed to `readv`/`writev` or an io_uring SQE as it is (each chunk
//! is 4096-aligned).
//!
//! Transfers up to [`SMALL_SIZE`] take one small buffer; larger ones take
//! `len.div_ceil(CHUNK_SIZE)` large chunks. The chunk handles sit in an inline array (at most
//! [`MAX_TRANSFER`] / [`CHUNK_SIZE`] = 64 of them), so allocating, filling and dropping a
//! `DataBuf` touch no heap memory. Dropping returns the chunks to the pool through the cache of
//! the thread that drops it, which need not be the thread that allocated it.
//!
//! A backend whose data already sits in memory (a RAM disk) answers a read by lending that
//! memory to the buffer ([`DataBuf::lend`]) instead of copying it into the chunks: the buffer
//! then reads from the lent memory, and the Data-In goes from the disk's pages straight to the
//! socket, as SPDK's malloc bdev does. The buffer keeps its own chunks meanwhile, so anything
//! that writes into it first copies the lent bytes there ([`DataBuf::own`]) without having to
//! allocate, and never writes through to the lender.

use std::ptr::NonNull;
use std::sync::Arc;

use super::pool::{Class, Pool, MAX_CHUNKS};
pub use super::pool::{CHUNK_SIZE, SMALL_SIZE};

/// The largest transfer one command may carry (reported in the Block Limits VPD page).
pub const MAX_TRANSFER: usize = 8 * 1024 * 1024;

/// The data of one command: `len` bytes spread over equal-sized chunks of one pool.
pub struct DataBuf {
    pool: &'static Pool,
    class: Class,
    /// Number of chunks in use at the front of `chunks`.
    n: u8,
    len: usize,
    chunks: [u32; MAX_CHUNKS],
    /// Memory lent by a backend that holds the buffer's contents in place of the chunks.
    lent: Option<Lent>,
}

/// Memory a backend lends to a [`DataBuf`]: `len` bytes at `ptr` (the buffer's length), kept
/// mapped by `_keep`.
struct Lent {
    ptr: NonNull<u8>,
    _keep: Arc<dyn Send + Sync>,
}

// SAFETY: the lent bytes are only read through the pointer, from whichever thread holds the
// buffer; the lender guarantees (see `DataBuf::lend`) they stay mapped while `_keep` lives,
// and `_keep` is itself `Send + Sync`.
unsafe impl Send for Lent {}
// SAFETY: as above: shared access only reads.
unsafe impl Sync for Lent {}

impl Drop for DataBuf {
    fn drop(&mut self) {
        self.pool.give(self.class, &self.chunks[..self.n as usize]);
    }
}

impl DataBuf {
    /// A buffer of `len` bytes from the process's pool, or `None` when `len` exceeds
    /// [`MAX_TRANSFER`] or the pool is exhausted (never blocks, never uses the heap). Its
    /// contents are unspecified (recycled chunks are not cleared): whoever fills it writes
    /// every byte that is later read or sent.
    pub fn alloc(len: usize) -> Option<DataBuf> {
        Self::alloc_from(super::pool(), len)
    }

    /// A buffer of `len` bytes from `pool` (see [`DataBuf::alloc`]).
    pub fn alloc_from(pool: &'static Pool, len: usize) -> Option<DataBuf> {
        if len > MAX_TRANSFER {
            return None;
        }
        let class = if len <= SMALL_SIZE {
            Class::Small
        } else {
            Class::Large
        };
        let n = len.div_ceil(class.size()).max(1);
        let mut chunks = [0u32; MAX_CHUNKS];
        if !pool.take(class, &mut chunks[..n]) {
            return None;
        }
        Some(DataBuf {
            pool,
            class,
            // n <= MAX_CHUNKS = 64: MAX_TRANSFER bounds len above.
            n: n as u8,
            len,
            chunks,
            lent: None,
        })
    }

    /// Makes the buffer read its `len()` bytes from `ptr` instead of from its chunks, until it
    /// is written to ([`DataBuf::own`]) or dropped. `keep` holds the memory mapped; the chunks
    /// stay with the buffer.
    ///
    /// # Safety
    /// `ptr..ptr + self.len()` must be mapped, readable and initialised memory for as long as
    /// `keep` lives. Its bytes may change under the buffer only by a write of the lender's
    /// that overlaps it, which the lender allows only where the protocol leaves the outcome
    /// undefined (SCSI commands in flight at the same time on the same blocks): a reader then
    /// sees old bytes, new bytes or a mix, never memory outside the range.
    pub unsafe fn lend(&mut self, ptr: NonNull<u8>, keep: Arc<dyn Send + Sync>) {
        self.lent = Some(Lent { ptr, _keep: keep });
    }

    /// Whether the contents are lent memory rather than the buffer's own chunks.
    pub fn is_lent(&self) -> bool {
        self.lent.is_some()
    }

    /// Copies lent contents into the buffer's own chunks and gives the lent memory back (no
    /// allocation: the chunks were kept). Nothing to do when the buffer owns its contents.
    pub fn own(&mut self) {
        if let Some(l) = self.lent.take() {
            // SAFETY: `lend`'s contract: `len` bytes at `ptr` stay readable while `_keep`
            // lives, and `l` holds it until the end of this block.
            let src = unsafe { std::slice::from_raw_parts(l.ptr.as_ptr(), self.len) };
            self.write_at(0, src);
        }
    }

    fn chunk_size(&self) -> usize {
        self.class.size()
    }

    /// Chunk `i` as a slice.
    fn chunk(&self, i: usize) -> &[u8] {
        let idx = self.chunks[..self.n as usize][i];
        let p = self.pool.chunk_ptr(self.class, idx);
        // SAFETY: the pool handed chunk `idx` to this buffer alone and takes it back only when
        // the buffer drops; it is `chunk_size()` bytes inside the pool's mapping, which is
        // never unmapped (pools are leaked). `&self` keeps `segments_mut` from running
        // meanwhile. Every byte is initialised: the kernel zero-fills the mapping and all
        // later writes store plain bytes.
        unsafe { std::slice::from_raw_parts(p, self.chunk_size()) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contiguous pieces covering `offset..offset + len` (clamped to the buffer).
    pub fn segments(&self, offset: usize, len: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let end = (offset.saturating_add(len)).min(self.len);
        let cs = self.chunk_size();
        let mut pos = offset.min(end);
        let lent = self.lent.as_ref().map(|l| {
            // SAFETY: `lend`'s contract: `self.len` bytes at `ptr` stay readable while the
            // buffer holds `_keep`, and the slice borrows the buffer.
            unsafe { std::slice::from_raw_parts(l.ptr.as_ptr(), self.len) }
        });
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            if let Some(all) = lent {
                // Lent memory is contiguous: one piece.
                let piece = &all[pos..end];
                pos = end;
                return Some(piece);
            }
            let (i, o) = (pos / cs, pos % cs);
            let n = (cs - o).min(end - pos);
            pos += n;
            Some(&self.chunk(i)[o..o + n])
        })
    }

    /// The mutable pieces covering `offset..offset + len` (clamped to the buffer).
    pub fn segments_mut(
        &mut self,
        offset: usize,
        len: usize,
    ) -> impl Iterator<Item = &mut [u8]> + '_ {
        // Writing never reaches a lender's memory: take the contents over first.
        self.own();
        let end = (offset.saturating_add(len)).min(self.len);
        let cs = self.chunk_size();
        let mut pos = offset.min(end);
        let this: &mut DataBuf = self;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (i, o) = (pos / cs, pos % cs);
            let n = (cs - o).min(end - pos);
            pos += n;
            let idx = this.chunks[..this.n as usize][i];
            let p = this.pool.chunk_ptr(this.class, idx);
            // SAFETY: as in `chunk`, the chunk belongs to this buffer alone and lies inside
            // the pool's mapping for `cs` bytes; `o + n <= cs`. The iterator holds `&mut self`
            // for the lifetime of what it yields, and it yields each chunk at most once
            // (`pos` only grows and each piece ends at or before a chunk boundary), so the
            // slices never overlap one another or any other borrow of the buffer.
            Some(unsafe { std::slice::from_raw_parts_mut(p.add(o), n) })
        })
    }

    /// Copies `src` into the buffer at `offset`; bytes past the end are dropped.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) {
        let mut done = 0;
        for seg in self.segments_mut(offset, src.len()) {
            let n = seg.len();
            seg.copy_from_slice(&src[done..done + n]);
            done += n;
        }
    }

    /// Copies from the buffer at `offset` into `dst`; returns how many bytes were copied.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for seg in self.segments(offset, dst.len()) {
            dst[done..done + seg.len()].copy_from_slice(seg);
            done += seg.len();
        }
        done
    }

    /// Sets `offset..offset + len` to `byte`.
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) {
        for seg in self.segments_mut(offset, len) {
            seg.fill(byte);
        }
    }

    /// Shortens the buffer to `len` bytes (never grows it).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::fmt::Debug for DataBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataBuf")
            .field("len", &self.len)
            .field("chunks", &self.n)
            .field("lent", &self.is_lent())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Pool;

    #[test]
    fn spans_chunks() {
        let mut b = DataBuf::alloc(3 * CHUNK_SIZE + 10).unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE + 100).map(|i| i as u8).collect();
        b.write_at(CHUNK_SIZE - 50, &data);
        let mut back = vec![0u8; data.len()];
        assert_eq!(b.read_at(CHUNK_SIZE - 50, &mut back), data.len());
        assert_eq!(back, data);
        let segs: Vec<usize> = b
            .segments(CHUNK_SIZE - 50, data.len())
            .map(|s| s.len())
            .collect();
        assert_eq!(segs, vec![50, CHUNK_SIZE, 50]);
        assert_eq!(
            b.segments(0, usize::MAX).map(|s| s.len()).sum::<usize>(),
            b.len()
        );
    }

    #[test]
    fn lent_memory_is_read_in_place_and_taken_over_on_write() {
        let pool = Pool::with_counts(8, 2, false).unwrap();
        let disk: Arc<Vec<u8>> = Arc::new((0..3 * CHUNK_SIZE).map(|i| (i % 251) as u8).collect());
        let mut b = DataBuf::alloc_from(pool, 2 * CHUNK_SIZE).unwrap();
        let at = NonNull::new(disk.as_ptr().cast_mut()).unwrap();
        // SAFETY: `disk` holds 3 chunks' worth, more than the buffer's length, and the Arc
        // handed over keeps it alive; nothing writes to it.
        unsafe { b.lend(at.add(100), disk.clone()) };
        assert!(b.is_lent());
        assert_eq!(Arc::strong_count(&disk), 2);
        // One piece, pointing into the lender's memory.
        let segs: Vec<&[u8]> = b.segments(10, 5000).collect();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].as_ptr(), disk[110..].as_ptr());
        assert_eq!(segs[0], &disk[110..5110]);
        let mut back = vec![0u8; b.len()];
        assert_eq!(b.read_at(0, &mut back), b.len());
        assert_eq!(back, disk[100..100 + b.len()]);
        // Writing takes the contents over (in the buffer's own, page-aligned chunks) and
        // leaves the lender alone.
        b.write_at(CHUNK_SIZE, &[0xee; 3]);
        assert!(!b.is_lent());
        assert_eq!(Arc::strong_count(&disk), 1);
        assert_eq!(disk[100 + CHUNK_SIZE], ((100 + CHUNK_SIZE) % 251) as u8);
        let mut back = vec![0u8; b.len()];
        b.read_at(0, &mut back);
        let mut want = disk[100..100 + b.len()].to_vec();
        want[CHUNK_SIZE..CHUNK_SIZE + 3].fill(0xee);
        assert_eq!(back, want);
        assert!(b
            .segments(0, usize::MAX)
            .all(|s| (s.as_ptr() as usize).is_multiple_of(4096)));
        // A lent buffer gives its chunks back when dropped, and lets go of the lender.
        let mut c = DataBuf::alloc_from(pool, 3 * CHUNK_SIZE).unwrap();
        // SAFETY: as above, `disk` is exactly 3 chunks long.
        unsafe { c.lend(at, disk.clone()) };
        drop((b, c));
        assert_eq!(pool.counters().chunks_in_use, 0);
        assert_eq!(Arc::strong_count(&disk), 1);
    }

    #[test]
    fn limits() {
        assert!(DataBuf::alloc(MAX_TRANSFER + 1).is_none());
        let b = DataBuf::alloc(0).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.segments(0, 10).count(), 0);
    }

    #[test]
    fn chunks_are_page_aligned() {
        for len in [
            1,
            4096,
            SMALL_SIZE,
            SMALL_SIZE + 1,
            CHUNK_SIZE * 3 + 7,
            MAX_TRANSFER,
        ] {
            let mut b = DataBuf::alloc(len).unwrap();
            let cs = b.chunk_size();
            for (i, seg) in b.segments(0, len).enumerate() {
                assert_eq!(seg.as_ptr() as usize % 4096, 0, "len {len} chunk {i}");
                assert!(seg.len() <= cs);
            }
            for seg in b.segments_mut(0, len) {
                assert_eq!(seg.as_ptr() as usize % 4096, 0);
            }
        }
    }

    #[test]
    fn exhaustion_returns_none_and_recovers() {
        let pool = Pool::with_counts(16, 2, false).unwrap();
        let a = DataBuf::alloc_from(pool, 10 * CHUNK_SIZE).unwrap();
        let b = DataBuf::alloc_from(pool, 6 * CHUNK_SIZE).unwrap();
        assert!(DataBuf::alloc_from(pool, SMALL_SIZE + 1).is_none());
        let s1 = DataBuf::alloc_from(pool, 100).unwrap();
        let s2 = DataBuf::alloc_from(pool, SMALL_SIZE).unwrap();
        assert!(DataBuf::alloc_from(pool, 1).is_none());
        let c = pool.counters();
        assert_eq!(c.alloc_failures, 2);
        assert_eq!((c.chunks_in_use, c.small_in_use), (16, 2));
        drop(b);
        let d = DataBuf::alloc_from(pool, 6 * CHUNK_SIZE).unwrap();
        drop((a, d, s1, s2));
        let c = pool.counters();
        assert_eq!((c.chunks_in_use, c.small_in_use), (0, 0));
        assert!(
            DataBuf::alloc_from(pool, MAX_TRANSFER).is_none(),
            "only 16 chunks"
        );
        assert!(DataBuf::alloc_from(pool, 16 * CHUNK_SIZE).is_some());
    }

    #[test]
    fn dropped_on_another_thread() {
        let pool = Pool::with_counts(64, 8, false).unwrap();
        let mut bufs: Vec<DataBuf> = (0..4)
            .map(|i| DataBuf::alloc_from(pool, (i + 1) * CHUNK_SIZE).unwrap())
            .collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(0, usize::MAX, i as u8);
        }
        assert_eq!(pool.counters().chunks_in_use, 10);
        std::thread::spawn(move || {
            for (i, b) in bufs.iter().enumerate() {
                assert!(b
                    .segments(0, usize::MAX)
                    .all(|s| s.iter().all(|&x| x == i as u8)));
            }
            drop(bufs);
            assert_eq!(pool.counters().chunks_in_use, 0);
        })
        .join()
        .unwrap();
        // The other thread's cache went back to the global list when it exited.
        let c = pool.counters();
        assert_eq!((c.chunks_in_use, c.chunks_cached), (0, 0));
        assert!(DataBuf::alloc_from(pool, 64 * CHUNK_SIZE).is_some());
    }

    #[test]
    fn fallback_without_hugepages() {
        let pool = Pool::with_size(16 << 20, false).unwrap();
        assert!(!pool.is_hugetlb());
        let c = pool.counters();
        assert_eq!(c.hugepage_bytes, 0);
        assert_eq!(c.total_bytes, 16 << 20);
        // 1/8 small buffers, the rest large chunks.
        assert_eq!(c.small_chunks, (2 << 20) / SMALL_SIZE);
        assert_eq!(c.chunks, (14 << 20) / CHUNK_SIZE);
        let mut b = DataBuf::alloc_from(pool, 3 * CHUNK_SIZE).unwrap();
        b.fill(0, usize::MAX, 0xa5);
        assert!(b
            .segments(0, usize::MAX)
            .all(|s| s.iter().all(|&x| x == 0xa5)));
    }

    #[test]
    fn hugepages_when_reserved() {
        // Either outcome is fine; the counters must agree with what happened.
        let pool = Pool::with_size(16 << 20, true).unwrap();
        let c = pool.counters();
        assert_eq!(c.hugepages, pool.is_hugetlb());
        assert_eq!(c.hugepage_bytes, if c.hugepages { 16 << 20 } else { 0 });
        assert!(DataBuf::alloc_from(pool, MAX_TRANSFER).is_some());
    }

    #[test]
    fn stats_snapshot_names() {
        let _b = DataBuf::alloc(CHUNK_SIZE).unwrap();
        let snap = crate::env::stats().snapshot();
        for name in [
            "total_bytes",
            "hugepage_bytes",
            "hugepages",
            "chunk_size",
            "chunks",
            "chunks_in_use",
            "small_chunks",
            "cache_hits",
            "cache_misses",
            "global_refills",
            "alloc_failures",
            "waits",
        ] {
            assert!(snap.iter().any(|(n, _)| n == name), "{name}");
        }
    }
}

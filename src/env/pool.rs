//! The DMA buffer pool: fixed-size chunks carved out of one [`Region`], handed out through
//! per-thread caches in front of a global free list (the shape of SPDK's iobuf and SCST's sgv).
//!
//! # Model
//! - Two classes of chunk: large ([`CHUNK_SIZE`], 128 KiB) and small ([`SMALL_SIZE`], 8 KiB).
//!   Both sizes are multiples of 4096 and the region starts on a page boundary, so every chunk
//!   is 4096-aligned and can go to O_DIRECT or an io_uring SQE as it is.
//! - A chunk is named by a `u32` index into its class; the pool turns an index into an address.
//!   A chunk index lives in exactly one place at a time: the global free list of its class, one
//!   thread's cache, or one [`DataBuf`](super::DataBuf). That single ownership is what makes
//!   handing out `&mut [u8]` over a chunk sound.
//! - Each thread (in the daemon: each reactor) keeps a bounded cache of chunk indices per pool.
//!   Allocation pops from the cache (a hit). When the cache runs short (a miss) it refills a
//!   batch from the global list under its lock, one lock per batch rather than per chunk. Freed
//!   chunks go to the cache of whichever thread drops them; above the cache's bound a batch
//!   spills back to the global list. When a thread exits its cache returns everything.
//! - The global free lists and the caches are `Vec`s whose capacity is reserved up front, so
//!   after a thread's first allocation nothing on the path allocates heap memory.
//! - The pool never blocks and never falls back to the heap: when the global list cannot cover
//!   a request the allocation fails and is counted; the caller decides whether to wait.
//! - Pools are leaked (`&'static`): chunks may be outstanding until the process exits, and the
//!   mapping must outlive them all.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::region::Region;

/// Size of one large chunk.
pub const CHUNK_SIZE: usize = 128 * 1024;
/// Size of a small buffer (transfers up to this size use one small chunk).
pub const SMALL_SIZE: usize = 8 * 1024;

/// Share of a pool's memory set aside for small buffers: 1/8. Small transfers (task management,
/// INQUIRY and MODE SENSE data, 4-8 KiB I/O) are the most numerous but carry few bytes; 1/8 of
/// 512 MiB is 8192 small buffers, enough for a deep queue of 4 KiB I/O on every connection,
/// while 7/8 stays for the large chunks of streaming I/O.
pub const SMALL_SHARE_DIVISOR: usize = 8;

/// The two classes of chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Large = 0,
    Small = 1,
}

impl Class {
    pub fn size(self) -> usize {
        match self {
            Class::Large => CHUNK_SIZE,
            Class::Small => SMALL_SIZE,
        }
    }
}

/// How many pools can have per-thread caches (the global pool plus a few private ones in
/// tests; 32 empty slots cost a thread 2 KiB). Further pools work without caches, straight
/// from their global lists.
const MAX_CACHED_POOLS: usize = 32;

/// The largest request a single allocation makes of one class (a whole [`DataBuf`]).
///
/// [`DataBuf`]: super::DataBuf
pub const MAX_CHUNKS: usize = super::buf::MAX_TRANSFER / CHUNK_SIZE;

struct ClassPool {
    size: usize,
    /// Offset of the class's first chunk in the region.
    base: usize,
    count: usize,
    /// Free chunk indices. Capacity `count`, so pushes never reallocate.
    free: Mutex<Vec<u32>>,
    /// A thread cache keeps at most this many chunks of the class.
    cache_cap: usize,
    /// Chunks moved per refill or spill.
    batch: usize,
}

impl ClassPool {
    fn new(class: Class, base: usize, count: usize) -> ClassPool {
        // Bound what one thread can hold idle to 1/16 of the class (and 16 MiB of large
        // chunks, 4 MiB of small ones), so other reactors find chunks in the global list.
        let max = match class {
            Class::Large => 128,
            Class::Small => 512,
        };
        let cache_cap = (count / 16).clamp(2, max);
        let mut free = Vec::with_capacity(count);
        // Lowest indices on top: a lightly used pool touches few pages.
        free.extend((0..count as u32).rev());
        ClassPool {
            size: class.size(),
            base,
            count,
            free: Mutex::new(free),
            cache_cap,
            batch: (cache_cap / 4).max(1),
        }
    }

    fn free_list(&self) -> MutexGuard<'_, Vec<u32>> {
        // A panic while the lock is held leaves the list consistent (every operation on it is
        // a single push/pop/extend/truncate), so a poisoned lock is still usable.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters of one thread's cache. Written by its thread only; read by `stats`.
#[derive(Default)]
struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    cached: [AtomicUsize; 2],
}

/// A pool of chunks over one region. See the module documentation.
pub struct Pool {
    /// Index of this pool's cache in each thread's cache table, if it has one.
    cache_slot: Option<usize>,
    region: Region,
    classes: [ClassPool; 2],
    /// Counters of every thread cache ever created for this pool (summed by `stats`).
    caches: Mutex<Vec<Arc<CacheCounters>>>,
    refills: AtomicU64,
    spills: AtomicU64,
    failures: AtomicU64,
}

static NEXT_CACHE_SLOT: AtomicUsize = AtomicUsize::new(0);

/// A snapshot of one pool's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCounters {
    pub total_bytes: usize,
    pub hugepage_bytes: usize,
    pub hugepages: bool,
    pub chunks: usize,
    pub small_chunks: usize,
    pub chunks_in_use: usize,
    pub small_in_use: usize,
    pub chunks_cached: usize,
    pub small_cached: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub refills: u64,
    pub spills: u64,
    pub alloc_failures: u64,
}

impl Pool {
    /// A pool of `mem_size` bytes: 1/[`SMALL_SHARE_DIVISOR`] as small buffers, the rest as
    /// large chunks. Leaked: it lives until the process exits.
    pub fn with_size(mem_size: usize, try_hugetlb: bool) -> std::io::Result<&'static Pool> {
        Self::with_size_in(mem_size, |size| Region::new(size, try_hugetlb))
    }

    /// As [`Pool::with_size`], in memory that `region` provides for a given size.
    pub fn with_size_in(
        mem_size: usize,
        region: impl FnOnce(usize) -> std::io::Result<Region>,
    ) -> std::io::Result<&'static Pool> {
        let small = mem_size / SMALL_SHARE_DIVISOR / SMALL_SIZE;
        let large = (mem_size - small * SMALL_SIZE) / CHUNK_SIZE;
        Self::with_counts_in(large, small, region)
    }

    /// A pool of exactly `large` chunks and `small` small buffers. Leaked.
    pub fn with_counts(
        large: usize,
        small: usize,
        try_hugetlb: bool,
    ) -> std::io::Result<&'static Pool> {
        Self::with_counts_in(large, small, |size| Region::new(size, try_hugetlb))
    }

    fn with_counts_in(
        large: usize,
        small: usize,
        region: impl FnOnce(usize) -> std::io::Result<Region>,
    ) -> std::io::Result<&'static Pool> {
        if large > u32::MAX as usize || small > u32::MAX as usize {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        // Large chunks first: the small area starts at a multiple of 128 KiB, so it too is
        // 4096-aligned.
        let small_base = large * CHUNK_SIZE;
        let size = small_base + small * SMALL_SIZE;
        let region = region(size)?;
        let slot = NEXT_CACHE_SLOT.fetch_add(1, Ordering::Relaxed);
        let pool = Pool {
            cache_slot: (slot < MAX_CACHED_POOLS).then_some(slot),
            region,
            classes: [
                ClassPool::new(Class::Large, 0, large),
                ClassPool::new(Class::Small, small_base, small),
            ],
            caches: Mutex::new(Vec::new()),
            refills: AtomicU64::new(0),
            spills: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        };
        Ok(Box::leak(Box::new(pool)))
    }

    /// The pool's size in bytes.
    pub fn size(&self) -> usize {
        self.region.size()
    }

    /// The mapping the pool's chunks live in: what a device must reach by DMA (an IOMMU
    /// maps it once, at the addresses the chunks have in the process).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Whether the pool's memory is made of hugepages.
    pub fn is_hugetlb(&self) -> bool {
        self.region.is_hugetlb()
    }

    /// Address of chunk `idx` of `class`.
    ///
    /// `idx` must be below the class's count (the pool only ever hands out such indices).
    pub fn chunk_ptr(&self, class: Class, idx: u32) -> *mut u8 {
        let c = &self.classes[class as usize];
        debug_assert!((idx as usize) < c.count);
        let off = c.base + idx as usize * c.size;
        // SAFETY: `off + size <= region.size()` for every index below `count` (the region was
        // sized as large*CHUNK_SIZE + small*SMALL_SIZE), so the result stays inside the one
        // mapping `addr` points into.
        unsafe { self.region.addr().as_ptr().add(off) }
    }

    /// Takes `out.len()` chunks of `class` into `out`: all of them, or none and `false`.
    pub fn take(&'static self, class: Class, out: &mut [u32]) -> bool {
        let n = out.len();
        let cached = self.with_cache(|cache| {
            let ci = class as usize;
            let cp = &self.classes[ci];
            let list = &mut cache.lists[ci];
            if list.len() >= n {
                cache.counters.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                cache.counters.misses.fetch_add(1, Ordering::Relaxed);
                let need = n - list.len();
                let mut global = cp.free_list();
                if global.len() < need {
                    return false;
                }
                let grab = need.max(cp.batch).min(global.len());
                let at = global.len() - grab;
                list.extend(global.drain(at..));
                drop(global);
                self.refills.fetch_add(1, Ordering::Relaxed);
            }
            let at = list.len() - n;
            out.copy_from_slice(&list[at..]);
            list.truncate(at);
            cache.counters.cached[ci].store(list.len(), Ordering::Relaxed);
            true
        });
        let ok = match cached {
            Some(ok) => ok,
            None => {
                let mut global = self.classes[class as usize].free_list();
                if global.len() >= n {
                    let at = global.len() - n;
                    out.copy_from_slice(&global[at..]);
                    global.truncate(at);
                    true
                } else {
                    false
                }
            }
        };
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Returns chunks of `class` (to this thread's cache, spilling above its bound).
    pub fn give(&'static self, class: Class, chunks: &[u32]) {
        let ci = class as usize;
        let cp = &self.classes[ci];
        let cached = self.with_cache(|cache| {
            let list = &mut cache.lists[ci];
            list.extend_from_slice(chunks);
            if list.len() > cp.cache_cap {
                let keep = cp.cache_cap.saturating_sub(cp.batch);
                cp.free_list().extend(list.drain(keep..));
                self.spills.fetch_add(1, Ordering::Relaxed);
            }
            cache.counters.cached[ci].store(list.len(), Ordering::Relaxed);
        });
        if cached.is_none() {
            cp.free_list().extend_from_slice(chunks);
        }
    }

    /// Runs `f` on this thread's cache for this pool, creating it on first use. `None` when
    /// the pool has no cache slot or the thread's caches are gone (thread exit).
    fn with_cache<R>(&'static self, f: impl FnOnce(&mut ThreadCache) -> R) -> Option<R> {
        let slot = self.cache_slot?;
        CACHES
            .try_with(|t| {
                let mut t = t.try_borrow_mut().ok()?;
                let cache = t[slot].get_or_insert_with(|| ThreadCache::new(self));
                Some(f(cache))
            })
            .ok()
            .flatten()
    }

    /// The pool's counters, summed over all thread caches.
    pub fn counters(&self) -> PoolCounters {
        let caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = PoolCounters {
            total_bytes: self.region.size(),
            hugepage_bytes: if self.is_hugetlb() {
                self.region.size()
            } else {
                0
            },
            hugepages: self.is_hugetlb(),
            chunks: self.classes[0].count,
            small_chunks: self.classes[1].count,
            refills: self.refills.load(Ordering::Relaxed),
            spills: self.spills.load(Ordering::Relaxed),
            alloc_failures: self.failures.load(Ordering::Relaxed),
            ..Default::default()
        };
        for c in caches.iter() {
            s.cache_hits += c.hits.load(Ordering::Relaxed);
            s.cache_misses += c.misses.load(Ordering::Relaxed);
            s.chunks_cached += c.cached[0].load(Ordering::Relaxed);
            s.small_cached += c.cached[1].load(Ordering::Relaxed);
        }
        drop(caches);
        let free = |c: &ClassPool| c.free_list().len();
        s.chunks_in_use = s
            .chunks
            .saturating_sub(free(&self.classes[0]) + s.chunks_cached);
        s.small_in_use = s
            .small_chunks
            .saturating_sub(free(&self.classes[1]) + s.small_cached);
        s
    }
}

/// One thread's cache of one pool's chunks.
struct ThreadCache {
    pool: &'static Pool,
    lists: [Vec<u32>; 2],
    counters: Arc<CacheCounters>,
}

impl ThreadCache {
    /// Allocates once per thread and pool: the lists get room for their bound plus one batch
    /// plus the largest request, so refills and frees never reallocate.
    fn new(pool: &'static Pool) -> ThreadCache {
        let list = |c: &ClassPool| Vec::with_capacity(c.cache_cap + c.batch + 2 * MAX_CHUNKS);
        let counters = Arc::new(CacheCounters::default());
        pool.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counters.clone());
        ThreadCache {
            pool,
            lists: [list(&pool.classes[0]), list(&pool.classes[1])],
            counters,
        }
    }
}

impl Drop for ThreadCache {
    /// A thread that exits gives its chunks back to the global lists.
    fn drop(&mut self) {
        for (ci, list) in self.lists.iter_mut().enumerate() {
            self.pool.classes[ci].free_list().append(list);
            self.counters.cached[ci].store(0, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static CACHES: RefCell<[Option<ThreadCache>; MAX_CACHED_POOLS]> =
        const { RefCell::new([const { None }; MAX_CACHED_POOLS]) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_and_recovery() {
        let pool = Pool::with_counts(8, 4, false).unwrap();
        let mut a = [0u32; 6];
        assert!(pool.take(Class::Large, &mut a));
        let mut b = [0u32; 3];
        assert!(!pool.take(Class::Large, &mut b), "only 2 left");
        assert_eq!(pool.counters().alloc_failures, 1);
        let mut c = [0u32; 2];
        assert!(pool.take(Class::Large, &mut c));
        pool.give(Class::Large, &a);
        assert!(pool.take(Class::Large, &mut b));
        let mut all: Vec<u32> = b.iter().chain(&c).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5, "no chunk handed out twice");
    }

    #[test]
    fn counters_add_up() {
        let pool = Pool::with_counts(256, 64, false).unwrap();
        let mut a = [0u32; 5];
        assert!(pool.take(Class::Large, &mut a));
        let s = pool.counters();
        assert_eq!(s.chunks_in_use, 5);
        assert_eq!(s.cache_misses, 1);
        assert_eq!(s.refills, 1);
        assert_eq!(s.chunks_cached, pool.classes[0].batch.max(5) - 5);
        pool.give(Class::Large, &a);
        assert!(pool.take(Class::Large, &mut a));
        let s = pool.counters();
        assert_eq!(s.cache_hits, 1);
        assert_eq!(s.chunks_in_use, 5);
        pool.give(Class::Large, &a);
        assert_eq!(pool.counters().chunks_in_use, 0);
    }

    #[test]
    fn thread_exit_returns_its_cache() {
        let pool = Pool::with_counts(32, 8, false).unwrap();
        std::thread::spawn(move || {
            let mut a = [0u32; 3];
            assert!(pool.take(Class::Large, &mut a));
            pool.give(Class::Large, &a);
            assert!(pool.counters().chunks_cached > 0);
        })
        .join()
        .unwrap();
        let s = pool.counters();
        assert_eq!(s.chunks_cached, 0);
        assert_eq!(s.chunks_in_use, 0);
        assert_eq!(pool.classes[0].free_list().len(), 32);
    }

    #[test]
    fn spills_above_the_bound() {
        let pool = Pool::with_counts(256, 8, false).unwrap();
        let cap = pool.classes[0].cache_cap;
        let mut a = vec![0u32; 64];
        let mut b = vec![0u32; 64];
        assert!(pool.take(Class::Large, &mut a));
        assert!(pool.take(Class::Large, &mut b));
        pool.give(Class::Large, &a);
        pool.give(Class::Large, &b);
        let s = pool.counters();
        assert!(s.spills >= 1);
        assert!(s.chunks_cached <= cap);
        assert_eq!(s.chunks_in_use, 0);
    }
}

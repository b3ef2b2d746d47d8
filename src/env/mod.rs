//! Memory for the data path: the DMA buffer pool and the data buffers carved from it.
//!
//! # Design
//! - [`region`]: one anonymous mapping per pool, from 2 MiB hugepages when the kernel has them
//!   reserved, from ordinary pages otherwise (with one warning saying how to reserve them).
//! - [`pool`]: the mapping cut into 128 KiB chunks (7/8 of it) and 8 KiB small buffers
//!   (1/8), every one 4096-aligned; a global free list per size behind a lock, and a bounded
//!   per-thread cache in front of it that refills and spills in batches, so a reactor takes
//!   the lock once per batch and not per I/O.
//! - [`buf`]: [`DataBuf`], one command's data as up to 64 chunks held inline. Allocation never
//!   blocks and never falls back to the heap: an exhausted pool answers `None`, counted in
//!   `alloc_failures`; the iSCSI layer parks the command and retries (counted in `waits`).
//!
//! The process has one pool. `init` creates it from `--mem-size`; code that allocates before
//! (or without) `init` — unit tests — gets a small default pool of [`DEFAULT_LAZY_MB`] MiB on
//! first use. The statistics go to the management tree's `sgv/` directory.
pub mod buf;
pub mod pool;
pub mod region;

pub use buf::DataBuf;
pub use pool::{Pool, PoolCounters};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Size of the pool created on first use when `init` was never called.
pub const DEFAULT_LAZY_MB: usize = 64;

/// Setting this variable (to anything but `0`) keeps the pool off hugepages, as if none were
/// reserved: for tests of the fallback and for hosts where hugepages are wanted elsewhere.
pub const NO_HUGEPAGES_ENV: &str = "ISCSI_TGT_NO_HUGEPAGES";

/// Sizing of the buffer pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Size of the pool in MiB (`--mem-size`).
    pub mem_size_mb: usize,
    /// Try 2 MiB hugepages first (the default); `false` maps ordinary pages straight away.
    pub hugepages: bool,
    /// Where the memory comes from instead of a mapping of the pool's own: DPDK's heap, so
    /// that the pool and the mbufs share one hugepage budget.
    pub memory: Option<MemorySource>,
}

/// Memory for a pool of a given size, from an allocator other than the pool's own mapping.
pub type MemorySource = fn(usize) -> std::io::Result<region::Region>;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mem_size_mb: 512,
            hugepages: true,
            memory: None,
        }
    }
}

static POOL: OnceLock<&'static Pool> = OnceLock::new();

/// Commands that had to wait for a buffer (counted by the transport).
static WAITS: AtomicU64 = AtomicU64::new(0);

fn create(cfg: &PoolConfig) -> std::io::Result<&'static Pool> {
    let forced_off = std::env::var_os(NO_HUGEPAGES_ENV).is_some_and(|v| v != "0");
    let try_huge = cfg.hugepages && !forced_off;
    if let Some(memory) = cfg.memory {
        let pool = Pool::with_size_in(cfg.mem_size_mb << 20, memory)?;
        log::info!(
            "buffer pool of {} MiB in DPDK's heap ({})",
            cfg.mem_size_mb,
            if pool.is_hugetlb() {
                "hugepages"
            } else {
                "ordinary pages: --no-huge"
            }
        );
        return Ok(pool);
    }
    let pool = Pool::with_size(cfg.mem_size_mb << 20, try_huge)?;
    if try_huge && !pool.is_hugetlb() {
        log::warn!(
            "no 2 MiB hugepages for the {} MiB buffer pool: using ordinary pages (slower I/O); \
             reserve them with `echo {} > /proc/sys/vm/nr_hugepages`",
            cfg.mem_size_mb,
            cfg.mem_size_mb.div_ceil(2)
        );
    } else if !pool.is_hugetlb() {
        log::info!(
            "buffer pool of {} MiB on ordinary pages (hugepages disabled)",
            cfg.mem_size_mb
        );
    }
    Ok(pool)
}

/// Sets the pool up once at start. Fails when the memory cannot be mapped, or when the pool
/// already exists (created by an earlier `init` or by an allocation before it).
pub fn init(cfg: PoolConfig) -> std::io::Result<()> {
    let exists = || {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the buffer pool is already set up",
        )
    };
    if POOL.get().is_some() {
        return Err(exists());
    }
    // A pool that loses the race with a concurrent first allocation stays mapped but unused;
    // the daemon calls `init` before any thread allocates, so that only happens in tests.
    POOL.set(create(&cfg)?).map_err(|_| exists())
}

/// The process's pool, created with [`DEFAULT_LAZY_MB`] MiB if `init` has not run.
///
/// # Panics
/// When even ordinary anonymous memory cannot be mapped for the default pool.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        create(&PoolConfig {
            mem_size_mb: DEFAULT_LAZY_MB,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("cannot map the default buffer pool: {e}"))
    })
}

/// One session may hold at most 1/SESSION_SHARE_DIVISOR of the pool.
pub const SESSION_SHARE_DIVISOR: usize = 8;

/// The most buffer bytes one session may hold at once: an eighth of the pool, and never less
/// than one largest transfer. Sessions whose initiators stop reading their Data-In keep their
/// buffers until the connection is closed; the share bounds what they can take from the
/// others meanwhile.
pub fn session_share() -> usize {
    (pool().size() / SESSION_SHARE_DIVISOR).max(buf::MAX_TRANSFER)
}

/// Counts one command that waited for a buffer.
pub fn note_wait() {
    WAITS.fetch_add(1, Ordering::Relaxed);
}

/// The pool's statistics for the tree's `sgv/`.
#[derive(Debug, Clone, Default)]
pub struct PoolStats {
    pub pool: PoolCounters,
    /// Commands that waited for a buffer.
    pub waits: u64,
}

impl PoolStats {
    /// Name/value pairs, one read-only attribute each under `sgv/`.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let p = &self.pool;
        let b = |v: bool| if v { "1" } else { "0" }.to_string();
        vec![
            ("total_bytes".into(), p.total_bytes.to_string()),
            ("hugepage_bytes".into(), p.hugepage_bytes.to_string()),
            ("hugepages".into(), b(p.hugepages)),
            ("chunk_size".into(), pool::CHUNK_SIZE.to_string()),
            ("chunks".into(), p.chunks.to_string()),
            ("chunks_in_use".into(), p.chunks_in_use.to_string()),
            ("small_size".into(), pool::SMALL_SIZE.to_string()),
            ("small_chunks".into(), p.small_chunks.to_string()),
            ("small_in_use".into(), p.small_in_use.to_string()),
            (
                "cached".into(),
                (p.chunks_cached + p.small_cached).to_string(),
            ),
            ("cache_hits".into(), p.cache_hits.to_string()),
            ("cache_misses".into(), p.cache_misses.to_string()),
            ("global_refills".into(), p.refills.to_string()),
            ("global_spills".into(), p.spills.to_string()),
            ("alloc_failures".into(), p.alloc_failures.to_string()),
            ("waits".into(), self.waits.to_string()),
        ]
    }
}

/// The statistics of the process's pool (creating the default pool if there is none yet).
pub fn stats() -> PoolStats {
    PoolStats {
        pool: pool().counters(),
        waits: WAITS.load(Ordering::Relaxed),
    }
}
#[cfg(feature = "dpdk")]
pub mod dpdk;

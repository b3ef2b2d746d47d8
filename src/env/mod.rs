//! Memory for the data path: pooled data buffers.
pub mod buf;

pub use buf::DataBuf;

use std::sync::atomic::{AtomicUsize, Ordering};

/// Sizing of the buffer pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub mem_size_mb: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { mem_size_mb: 512 }
    }
}

static POOL_MB: AtomicUsize = AtomicUsize::new(512);

/// Sets the pool up once at start.
pub fn init(cfg: PoolConfig) -> std::io::Result<()> {
    POOL_MB.store(cfg.mem_size_mb, Ordering::Relaxed);
    Ok(())
}

/// The pool's statistics for the tree's `sgv/`.
pub struct PoolStats {
    pub total_bytes: usize,
}

impl PoolStats {
    pub fn snapshot(&self) -> Vec<(String, String)> {
        vec![("total_bytes".into(), self.total_bytes.to_string())]
    }
}

pub fn stats() -> PoolStats {
    PoolStats {
        total_bytes: POOL_MB.load(Ordering::Relaxed) << 20,
    }
}

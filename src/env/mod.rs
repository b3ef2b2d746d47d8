//! Memory for the data path: pooled DMA-able data buffers with per-reactor caches.
pub mod buf;

pub use buf::DataBuf;

//! Data buffers of the I/O path.
//!
//! A [`DataBuf`] holds the data of one SCSI command as a list of fixed-size chunks, so that
//! large transfers need no large contiguous allocation and every piece can be handed to
//! `readv`/`writev` or an io_uring SQE as it is.

use std::cell::RefCell;

/// Size of one large chunk.
pub const CHUNK_SIZE: usize = 128 * 1024;
/// Size of a small buffer (transfers up to this size use one small chunk).
pub const SMALL_SIZE: usize = 8 * 1024;
/// The largest transfer one command may carry (reported in the Block Limits VPD page).
pub const MAX_TRANSFER: usize = 8 * 1024 * 1024;

/// The data of one command: `len` bytes spread over equal-sized chunks.
pub struct DataBuf {
    chunks: Vec<Box<[u8]>>,
    chunk_size: usize,
    len: usize,
}

/// Chunks a thread keeps for reuse: a command's buffers go back to the thread that frees
/// them and the next command there takes them without touching the allocator.
struct ChunkCache {
    large: Vec<Box<[u8]>>,
    small: Vec<Box<[u8]>>,
}

/// At most this many chunks of each size stay cached per thread (64 MiB and 8 MiB).
const CACHE_LARGE: usize = 512;
const CACHE_SMALL: usize = 1024;

thread_local! {
    static CACHE: RefCell<ChunkCache> = const {
        RefCell::new(ChunkCache {
            large: Vec::new(),
            small: Vec::new(),
        })
    };
}

fn take_chunk(size: usize) -> Box<[u8]> {
    let cached = CACHE
        .try_with(|c| {
            let mut c = c.borrow_mut();
            if size == CHUNK_SIZE {
                c.large.pop()
            } else {
                c.small.pop()
            }
        })
        .ok()
        .flatten();
    cached.unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

impl Drop for DataBuf {
    fn drop(&mut self) {
        let chunks = std::mem::take(&mut self.chunks);
        let size = self.chunk_size;
        let _ = CACHE.try_with(|c| {
            let mut c = c.borrow_mut();
            let (list, cap) = if size == CHUNK_SIZE {
                (&mut c.large, CACHE_LARGE)
            } else {
                (&mut c.small, CACHE_SMALL)
            };
            for ch in chunks {
                if list.len() >= cap {
                    break;
                }
                if ch.len() == size {
                    list.push(ch);
                }
            }
        });
    }
}

impl DataBuf {
    /// A buffer of `len` bytes, or `None` when `len` exceeds [`MAX_TRANSFER`] or the pool is
    /// exhausted. Its contents are unspecified (recycled chunks are not cleared): whoever
    /// fills it writes every byte that is later read or sent.
    pub fn alloc(len: usize) -> Option<DataBuf> {
        if len > MAX_TRANSFER {
            return None;
        }
        let chunk_size = if len <= SMALL_SIZE {
            SMALL_SIZE
        } else {
            CHUNK_SIZE
        };
        let n = len.div_ceil(chunk_size).max(1);
        let chunks = (0..n).map(|_| take_chunk(chunk_size)).collect();
        Some(DataBuf {
            chunks,
            chunk_size,
            len,
        })
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
        let cs = self.chunk_size;
        let mut pos = offset.min(end);
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (i, o) = (pos / cs, pos % cs);
            let n = (cs - o).min(end - pos);
            pos += n;
            Some(&self.chunks[i][o..o + n])
        })
    }

    /// The mutable pieces covering `offset..offset + len` (clamped to the buffer).
    pub fn segments_mut(&mut self, offset: usize, len: usize) -> Vec<&mut [u8]> {
        let end = (offset.saturating_add(len)).min(self.len);
        let cs = self.chunk_size;
        let mut out = Vec::new();
        let mut pos = offset.min(end);
        let mut rest: &mut [Box<[u8]>] = &mut self.chunks[pos / cs..];
        while pos < end {
            let o = pos % cs;
            let n = (cs - o).min(end - pos);
            let (first, tail) = rest.split_first_mut().expect("chunk for in-range position");
            out.push(&mut first[o..o + n]);
            rest = tail;
            pos += n;
        }
        out
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
        f.debug_struct("DataBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn limits() {
        assert!(DataBuf::alloc(MAX_TRANSFER + 1).is_none());
        let b = DataBuf::alloc(0).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.segments(0, 10).count(), 0);
    }
}

//! One anonymous memory mapping that backs the buffer pool for the life of the process.
//!
//! The region is first asked for as 2 MiB hugepages (`MAP_HUGETLB | MAP_HUGE_2MB`): the pool's
//! chunks then sit on few TLB entries and stay resident (hugetlbfs pages are never swapped or
//! migrated), which is what O_DIRECT and io_uring want of buffers they DMA into. When the
//! kernel has no hugepages reserved, or not enough, the mapping fails with ENOMEM and the region
//! falls back to ordinary anonymous pages. Both kinds of mapping start on a page boundary, so
//! any offset that is a multiple of 4096 is 4096-aligned.

use std::io;
use std::ptr::{null_mut, NonNull};

/// Size of the hugepages the region asks for.
pub const HUGEPAGE_SIZE: usize = 2 * 1024 * 1024;

/// `MAP_HUGE_2MB`: log2 of the page size in the bits above `MAP_HUGE_SHIFT` (mmap(2)).
const MAP_HUGE_2MB: libc::c_int = 21 << libc::MAP_HUGE_SHIFT;

/// An anonymous read-write mapping. Unmapped on drop; the pool's regions are leaked and so
/// live as long as the process.
#[derive(Debug)]
pub struct Region {
    addr: NonNull<u8>,
    size: usize,
    hugetlb: bool,
    /// Mapped here (and unmapped on drop), not lent by another allocator.
    mapped: bool,
}

// SAFETY: the region is plain memory owned by this value; which parts of it each thread may
// touch is decided by the pool that hands them out, not by the mapping.
unsafe impl Send for Region {}
// SAFETY: as above; `Region` itself only exposes the base address and size.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `size` bytes (rounded up to a whole number of 2 MiB pages), from hugepages when
    /// `try_hugetlb` is set and the kernel has them, from ordinary pages otherwise.
    pub fn new(size: usize, try_hugetlb: bool) -> io::Result<Region> {
        let size = size
            .max(1)
            .checked_next_multiple_of(HUGEPAGE_SIZE)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if try_hugetlb {
            if let Ok(r) = Self::map(size, libc::MAP_HUGETLB | MAP_HUGE_2MB) {
                return Ok(Region {
                    addr: r,
                    size,
                    hugetlb: true,
                    mapped: true,
                });
            }
        }
        let addr = Self::map(size, 0)?;
        Ok(Region {
            addr,
            size,
            hugetlb: false,
            mapped: true,
        })
    }

    /// Memory another allocator set aside for the life of the process (DPDK's heap, which
    /// knows its IOVAs): `size` bytes at `addr`, page-aligned, never given back.
    ///
    /// # Safety
    /// `addr..addr + size` must be readable and writable memory, aligned to 4096 bytes, that
    /// nothing else uses and that stays valid for the rest of the process.
    pub unsafe fn lent(addr: NonNull<u8>, size: usize, hugetlb: bool) -> Region {
        Region {
            addr,
            size,
            hugetlb,
            mapped: false,
        }
    }

    fn map(size: usize, extra_flags: libc::c_int) -> io::Result<NonNull<u8>> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing (no
        // MAP_FIXED) cannot alias any memory Rust knows about; failure is reported as
        // MAP_FAILED and checked below.
        let p = unsafe {
            libc::mmap(
                null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    /// The first byte of the mapping (page-aligned).
    pub fn addr(&self) -> NonNull<u8> {
        self.addr
    }

    /// Length of the mapping in bytes (a multiple of 2 MiB).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Asks the kernel to back the mapping with transparent hugepages where it can
    /// (`MADV_HUGEPAGE`; meaningful for ordinary pages, a no-op for hugetlb ones). Only a
    /// hint: when THP is off, the mapping simply stays on small pages.
    pub fn advise_hugepages(&self) {
        if self.hugetlb {
            return;
        }
        // SAFETY: `addr`/`size` are exactly this mapping; MADV_HUGEPAGE changes how its pages
        // are backed, never their contents or permissions.
        let r = unsafe { libc::madvise(self.addr.as_ptr().cast(), self.size, libc::MADV_HUGEPAGE) };
        if r != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) on {} bytes: {}",
                self.size,
                io::Error::last_os_error()
            );
        }
    }

    /// Whether the mapping is made of hugepages.
    pub fn is_hugetlb(&self) -> bool {
        self.hugetlb
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.mapped {
            return;
        }
        // SAFETY: `addr`/`size` are exactly what mmap returned and nothing borrows the region
        // once its owner is dropped (the pool never drops a region it handed chunks out of).
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_pages_are_aligned_and_usable() {
        let r = Region::new(3 * 1024 * 1024, false).unwrap();
        assert!(!r.is_hugetlb());
        assert_eq!(r.size(), 4 * 1024 * 1024);
        assert_eq!(r.addr().as_ptr() as usize % 4096, 0);
    }

    #[test]
    fn hugepages_or_fallback() {
        // Works whether or not hugepages are reserved on this machine.
        let r = Region::new(HUGEPAGE_SIZE, true).unwrap();
        assert_eq!(r.size(), HUGEPAGE_SIZE);
        if r.is_hugetlb() {
            assert_eq!(r.addr().as_ptr() as usize % HUGEPAGE_SIZE, 0);
        }
    }
}

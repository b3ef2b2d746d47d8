//! The controller reached through vfio-pci (Linux `Documentation/driver-api/vfio.rst`): a
//! container (`/dev/vfio/vfio`) with the type 1 IOMMU, the device's IOMMU group
//! (`/dev/vfio/N`), the device itself, its BAR0 mapped as the controller's registers, and
//! memory mapped into the IOMMU with `VFIO_IOMMU_MAP_DMA` at an I/O virtual address equal
//! to its process address, so an address taken from a pool buffer is the one the
//! controller uses.
//!
//! Memory is registered once: the buffer pool's region when the device opens
//! ([`VfioDevice::map_region`]), and the driver's queue memory in 2 MiB regions as
//! [`VfioAlloc`] takes them. Nothing is mapped per I/O.
//!
//! This module is the only part of the driver that needs `unsafe`: ioctls on the vfio file
//! descriptors, the BAR0 mapping and volatile access to memory the device shares.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{DmaAlloc, DmaMem, Regs};
use crate::env::region::{Region, HUGEPAGE_SIZE};

/// `_IO(';', 100 + n)` from linux/vfio.h: no size or direction bits.
const fn vfio_io(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}

const VFIO_GET_API_VERSION: u64 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_DEVICE_RESET: u64 = vfio_io(11);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// PCI configuration space: the Command register and its bits (PCI Local Bus 3.0 §6.2.2).
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VfioError {
    /// {0} has no IOMMU group (is the IOMMU on, and the device bound to vfio-pci?): {1}
    NoGroup(String, io::Error),
    /// cannot open {0}: {1}
    Open(String, io::Error),
    /// the vfio API version is {0}, not 0
    ApiVersion(i32),
    /// the kernel has no type 1 v2 IOMMU for vfio
    NoType1,
    /// IOMMU group {0} is not viable: bind every device in it to vfio-pci
    NotViable(String),
    /// {0} failed: {1}
    Ioctl(&'static str, io::Error),
    /// BAR0 cannot be mapped (flags {0:#x}, size {1})
    Bar0(u32, u64),
    /// cannot map BAR0: {0}
    Mmap(io::Error),
    /// PCI configuration space: {0}
    Config(io::Error),
}

/// `ioctl` with a pointer argument; the result is the ioctl's return value.
///
/// # Safety
/// `arg` must point at what `req` expects, valid for reads and writes of that size.
unsafe fn ioctl_ptr<T>(fd: &OwnedFd, req: u64, arg: *mut T) -> io::Result<i32> {
    // SAFETY: the caller vouches for `arg`; the fd is open for the call's duration.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// `ioctl` with an integer argument.
fn ioctl_val(fd: &OwnedFd, req: u64, arg: u64) -> io::Result<i32> {
    // SAFETY: these requests take a plain integer, which the kernel never dereferences.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg as libc::c_ulong) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn open_rw(path: &str) -> Result<OwnedFd, VfioError> {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| VfioError::Open(path.to_string(), e))?;
    Ok(OwnedFd::from(f))
}

/// BAR0 mapped into the process: the controller's registers.
pub struct Bar0 {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory that every access reaches with a single volatile
// load or store; nothing in `Bar0` is tied to the thread that mapped it, and concurrent
// register accesses from several reactors (each to its own doorbells) are what the device
// is built for.
unsafe impl Send for Bar0 {}
// SAFETY: as above: `&Bar0` only allows volatile accesses, each a whole register.
unsafe impl Sync for Bar0 {}

impl Bar0 {
    fn at(&self, offset: usize, width: usize) -> Option<*mut u8> {
        if !offset.is_multiple_of(width) || offset.checked_add(width)? > self.len {
            return None;
        }
        // SAFETY: `offset + width <= len`: the pointer stays inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) })
    }
}

impl Regs for Bar0 {
    fn read32(&self, offset: usize) -> u32 {
        match self.at(offset, 4) {
            // SAFETY: inside the mapping and 4-byte aligned (checked by `at`); MMIO must be
            // read with exactly one volatile access.
            Some(p) => unsafe { std::ptr::read_volatile(p.cast::<u32>()) },
            // Reads like a device that is gone: every caller treats all ones as that.
            None => u32::MAX,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        if let Some(p) = self.at(offset, 4) {
            // SAFETY: as in `read32`.
            unsafe { std::ptr::write_volatile(p.cast::<u32>(), value) }
        }
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `VfioDevice::open`; no reference into it
        // outlives the `Bar0`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A PCI device bound to vfio-pci, opened, with BAR0 mapped and bus mastering on.
pub struct VfioDevice {
    // Reactors hold clones; the mapping keeps its own reference to the device file, so it
    // may outlive `device` and is unmapped when the last clone goes.
    bar0: Arc<Bar0>,
    device: OwnedFd,
    // The group must stay open while the device is; the container holds the IOMMU
    // mappings, which go when it closes.
    _group: OwnedFd,
    container: OwnedFd,
    bdf: String,
}

impl VfioDevice {
    /// Opens PCI device `bdf` (`0000:00:04.0`), which must be bound to vfio-pci.
    pub fn open(bdf: &str) -> Result<VfioDevice, VfioError> {
        let link = Path::new("/sys/bus/pci/devices")
            .join(bdf)
            .join("iommu_group");
        let target =
            std::fs::read_link(&link).map_err(|e| VfioError::NoGroup(bdf.to_string(), e))?;
        let group_id = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let container = open_rw("/dev/vfio/vfio")?;
        let v = ioctl_val(&container, VFIO_GET_API_VERSION, 0)
            .map_err(|e| VfioError::Ioctl("VFIO_GET_API_VERSION", e))?;
        if v != VFIO_API_VERSION {
            return Err(VfioError::ApiVersion(v));
        }
        if ioctl_val(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU).unwrap_or(0) <= 0 {
            return Err(VfioError::NoType1);
        }
        let group = open_rw(&format!("/dev/vfio/{group_id}"))?;
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS fills a `struct vfio_group_status`, which
        // `GroupStatus` mirrors, with argsz set to its size.
        unsafe { ioctl_ptr(&group, VFIO_GROUP_GET_STATUS, &mut status) }
            .map_err(|e| VfioError::Ioctl("VFIO_GROUP_GET_STATUS", e))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable(group_id));
        }
        let mut cfd: libc::c_int = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container's fd.
        unsafe { ioctl_ptr(&group, VFIO_GROUP_SET_CONTAINER, &mut cfd) }
            .map_err(|e| VfioError::Ioctl("VFIO_GROUP_SET_CONTAINER", e))?;
        ioctl_val(&container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU)
            .map_err(|e| VfioError::Ioctl("VFIO_SET_IOMMU", e))?;
        let name = CString::new(bdf)
            .map_err(|_| VfioError::Open(bdf.to_string(), io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated name, which `name` is
        // for the call's duration.
        let dfd = unsafe { ioctl_ptr(&group, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr().cast_mut()) }
            .map_err(|e| VfioError::Ioctl("VFIO_GROUP_GET_DEVICE_FD", e))?;
        // SAFETY: the ioctl returned a new file descriptor that nothing else owns.
        let device = unsafe { OwnedFd::from_raw_fd(dfd) };

        let bar = region_info(&device, VFIO_PCI_BAR0_REGION_INDEX)?;
        if bar.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x2000 {
            return Err(VfioError::Bar0(bar.flags, bar.size));
        }
        let len = usize::try_from(bar.size).map_err(|_| VfioError::Bar0(bar.flags, bar.size))?;
        let off =
            libc::off_t::try_from(bar.offset).map_err(|_| VfioError::Bar0(bar.flags, bar.size))?;
        // SAFETY: a shared mapping of the device fd at the offset vfio gave for BAR0, at an
        // address of the kernel's choosing; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VfioError::Mmap(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| VfioError::Mmap(io::ErrorKind::OutOfMemory.into()))?;
        let bar0 = Arc::new(Bar0 { ptr, len });

        let dev = VfioDevice {
            bar0,
            device,
            _group: group,
            container,
            bdf: bdf.to_string(),
        };
        dev.enable_bus_master()?;
        Ok(dev)
    }

    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The registers, shared with every reactor's doorbells.
    pub fn bar0(&self) -> Arc<Bar0> {
        self.bar0.clone()
    }

    /// Turns on memory space decoding and bus mastering (the controller's DMA).
    fn enable_bus_master(&self) -> Result<(), VfioError> {
        let cfg = region_info(&self.device, VFIO_PCI_CONFIG_REGION_INDEX)?;
        // SAFETY: the `File` borrows the device's descriptor for the two positioned accesses
        // below; `ManuallyDrop` keeps it from closing what `self.device` owns.
        let f = ManuallyDrop::new(unsafe { File::from_raw_fd(self.device.as_raw_fd()) });
        let r = (|| {
            let mut b = [0u8; 2];
            f.read_exact_at(&mut b, cfg.offset + PCI_COMMAND)?;
            let cmd = u16::from_le_bytes(b) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
            f.write_all_at(&cmd.to_le_bytes(), cfg.offset + PCI_COMMAND)
        })();
        r.map_err(VfioError::Config)
    }

    /// A function level reset of the device (VFIO_DEVICE_RESET), for a controller that a
    /// controller reset cannot bring back.
    pub fn function_reset(&self) -> Result<(), VfioError> {
        ioctl_val(&self.device, VFIO_DEVICE_RESET, 0)
            .map(|_| ())
            .map_err(|e| VfioError::Ioctl("VFIO_DEVICE_RESET", e))
    }

    /// Maps `len` bytes at `addr` into the IOMMU at I/O virtual address `addr`.
    ///
    /// The memory must stay mapped in the process for as long as the device may use it:
    /// the pool's region lives as long as the process, and [`VfioAlloc`]'s regions as long
    /// as the memory handed out of them.
    pub fn map_dma(&self, addr: NonNull<u8>, len: usize) -> Result<(), VfioError> {
        let mut m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: addr.as_ptr() as u64,
            iova: addr.as_ptr() as u64,
            size: len as u64,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA reads a `struct vfio_iommu_type1_dma_map`, which
        // `DmaMap` mirrors with argsz set; the kernel pins the pages it names.
        unsafe { ioctl_ptr(&self.container, VFIO_IOMMU_MAP_DMA, &mut m) }
            .map(|_| ())
            .map_err(|e| VfioError::Ioctl("VFIO_IOMMU_MAP_DMA", e))
    }

    /// Maps a whole region (the buffer pool's, once at start).
    pub fn map_region(&self, r: &Region) -> Result<(), VfioError> {
        self.map_dma(r.addr(), r.size())
    }

    pub fn unmap_dma(&self, addr: NonNull<u8>, len: usize) -> Result<(), VfioError> {
        let mut m = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova: addr.as_ptr() as u64,
            size: len as u64,
        };
        // SAFETY: VFIO_IOMMU_UNMAP_DMA reads and updates a `struct
        // vfio_iommu_type1_dma_unmap`, which `DmaUnmap` mirrors with argsz set.
        unsafe { ioctl_ptr(&self.container, VFIO_IOMMU_UNMAP_DMA, &mut m) }
            .map(|_| ())
            .map_err(|e| VfioError::Ioctl("VFIO_IOMMU_UNMAP_DMA", e))
    }
}

fn region_info(device: &OwnedFd, index: u32) -> Result<RegionInfo, VfioError> {
    let mut info = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..RegionInfo::default()
    };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO fills a `struct vfio_region_info`, which
    // `RegionInfo` mirrors, with argsz set to its size (no capability chain is asked for).
    unsafe { ioctl_ptr(device, VFIO_DEVICE_GET_REGION_INFO, &mut info) }
        .map_err(|e| VfioError::Ioctl("VFIO_DEVICE_GET_REGION_INFO", e))?;
    Ok(info)
}

/// Memory handed to the driver by [`VfioAlloc`]: `len` bytes at `ptr` inside a region that
/// is mapped in the IOMMU, kept alive by `_region`.
pub struct HostMem {
    ptr: NonNull<u8>,
    len: usize,
    _region: Arc<Region>,
}

// SAFETY: the bytes belong to this value alone (the allocator never hands out overlapping
// pieces) and `_region` keeps them mapped; the device may write them at any time, which
// every access allows for by being volatile.
unsafe impl Send for HostMem {}

impl DmaMem for HostMem {
    fn iova(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        if offset.saturating_add(dst.len()) > self.len {
            return;
        }
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: `offset + i < len`: inside this value's bytes, which stay mapped.
            // Volatile, because the device writes them behind the compiler's back.
            *d = unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset + i)) };
        }
    }

    fn write(&self, offset: usize, src: &[u8]) {
        if offset.saturating_add(src.len()) > self.len {
            return;
        }
        for (i, s) in src.iter().enumerate() {
            // SAFETY: as in `read`; volatile so that the stores are not dropped or moved
            // past the fence before a doorbell.
            unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset + i), *s) };
        }
    }
}

/// Queue memory for a controller behind vfio: 2 MiB regions (hugepages when reserved),
/// each mapped into the IOMMU when taken, carved into page-aligned pieces.
pub struct VfioAlloc {
    device: Arc<VfioDevice>,
    current: Option<(Arc<Region>, usize)>,
}

impl VfioAlloc {
    pub fn new(device: Arc<VfioDevice>) -> VfioAlloc {
        VfioAlloc {
            device,
            current: None,
        }
    }
}

impl DmaAlloc for VfioAlloc {
    type Mem = HostMem;

    fn alloc(&mut self, len: usize) -> io::Result<HostMem> {
        let size = len.max(1).next_multiple_of(4096);
        let fits = |c: &Option<(Arc<Region>, usize)>| {
            c.as_ref().is_some_and(|(r, used)| r.size() - used >= size)
        };
        if !fits(&self.current) {
            let r = Region::new(size.max(HUGEPAGE_SIZE), true)?;
            self.device
                .map_dma(r.addr(), r.size())
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.current = Some((Arc::new(r), 0));
        }
        let Some((region, used)) = self.current.as_mut() else {
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        // SAFETY: `used + size <= region.size()` (checked or fresh above): the pointer stays
        // inside the region's mapping.
        let p = unsafe { region.addr().as_ptr().add(*used) };
        *used += size;
        let ptr = NonNull::new(p).ok_or(io::ErrorKind::OutOfMemory)?;
        let mem = HostMem {
            ptr,
            len,
            _region: region.clone(),
        };
        // Regions are zeroed when mapped, and pieces are never reused: no clearing needed.
        Ok(mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        // linux/vfio.h: VFIO_TYPE ';' (0x3b), VFIO_BASE 100.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<DmaMap>(), 32);
        assert_eq!(std::mem::size_of::<DmaUnmap>(), 24);
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let e = VfioDevice::open("0000:ff:1f.7")
            .err()
            .expect("no such device");
        assert!(e.to_string().contains("0000:ff:1f.7"), "{e}");
    }
}

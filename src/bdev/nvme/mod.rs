//! A userspace NVMe driver (issue 14): the controller is driven from the reactors through
//! its registers and queues in memory it reaches by DMA, with no kernel driver in between.
//!
//! # Layers
//! - [`spec`]: the NVMe specification's registers, queue entries, opcodes, IDENTIFY data and
//!   status codes, parsed with checks (the controller is a device we do not trust to be
//!   sane).
//! - [`queue`]: a submission/completion queue pair in memory: tails, heads, wrap, the phase
//!   tag, command identifiers and the doorbells.
//! - [`prp`]: PRP entries and PRP lists for a transfer made of pool buffer pieces.
//! - [`controller`]: bring-up, IDENTIFY, I/O queue creation, timeouts with ABORT and
//!   controller reset, shutdown (NVMe Base §3.5).
//!
//! Everything above is written against three seams so that it runs on the host against a
//! software model of a controller (`model`, tests only) as well as against real hardware:
//! [`Regs`] (BAR0), [`DmaMem`] (memory the controller reaches, named by its I/O virtual
//! address) and [`DmaAlloc`] (where queue memory comes from). The vfio-pci implementation of
//! those seams ([`vfio`]: BAR0 mapped, memory mapped into the IOMMU once) is the only part
//! of the driver that needs `unsafe`; its other modules forbid it.
//!
//! [`passthru`] is the other flavour, for hosts that keep the kernel's driver: the namespace's
//! generic character device `/dev/ngXnY`, with NVMe commands as io_uring passthrough on the
//! reactor's ring and the same [`spec`] parsers (`unsafe` for its ioctls).
//!
//! # Memory model
//! The controller and the driver share queue memory. The driver writes a submission entry,
//! then issues a release fence, then writes the doorbell, so the device never sees the
//! doorbell before the entry. It reads a completion's status word first and, only when its
//! phase tag says the entry is new, issues an acquire fence and reads the rest.

#![deny(unsafe_code)]

pub mod channel;
pub mod controller;
pub mod dev;
pub mod passthru;
pub mod pci;
pub mod prp;
pub mod queue;
pub mod spec;
pub mod vfio;

#[cfg(test)]
mod model;

/// Access to the controller's registers (BAR0). Offsets are the specification's
/// ([`spec::reg`]); implementations must perform each access as one 32-bit MMIO access.
pub trait Regs {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    /// A 64-bit register as two 32-bit accesses, low dword first (allowed by NVMe Base
    /// §3.1.2 for hosts that cannot do 64-bit accesses).
    fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// Memory the controller reaches by DMA: queues, PRP lists, IDENTIFY data. Accessed with
/// `&self` because the device may change it under the driver at any time; implementations
/// use volatile copies for real device memory. An access that would fall outside the memory
/// is a bug of the driver: implementations ignore it (reads leave `dst` unchanged) rather
/// than touch anything else.
pub trait DmaMem {
    /// The address the controller uses for the first byte.
    fn iova(&self) -> u64;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read(&self, offset: usize, dst: &mut [u8]);
    fn write(&self, offset: usize, src: &[u8]);
    fn fill(&self, offset: usize, len: usize, byte: u8) {
        let chunk = [byte; 256];
        let mut at = offset;
        let end = offset.saturating_add(len).min(self.len());
        while at < end {
            let n = (end - at).min(chunk.len());
            self.write(at, &chunk[..n]);
            at += n;
        }
    }
}

/// Where the driver gets memory for its queues, PRP lists and IDENTIFY buffers: zeroed,
/// aligned to 4096 bytes, reachable by the controller for as long as it is held. Taken at
/// bring-up and when queues are created, never per I/O.
pub trait DmaAlloc {
    type Mem: DmaMem;
    fn alloc(&mut self, len: usize) -> std::io::Result<Self::Mem>;
}

/// Registers shared between the controller and every reactor's channel.
impl<T: Regs + ?Sized> Regs for std::sync::Arc<T> {
    fn read32(&self, offset: usize) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        (**self).write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        (**self).read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        (**self).write64(offset, value)
    }
}

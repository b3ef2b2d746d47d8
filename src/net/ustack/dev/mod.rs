//! Frame devices under the userspace stack: one receive and one transmit queue per reactor.
//!
//! A device hands frames to the stack in place (a slot of a packet ring, a preallocated
//! buffer) and takes frames to send the same way: nothing is allocated per packet. The stack
//! adapts these queues to smoltcp's `phy::Device` in `ustack`, where ARP sharing between
//! reactors, checksum completion and the counters live, once for every device.
//!
//! The devices: [`af_packet`], a queue of a kernel interface through memory-mapped packet
//! rings; [`tap`], a queue of a TAP device whose other end is the kernel; `dpdk` (feature
//! `dpdk`), a queue pair of a DPDK port; [`mem`], two devices joined back to back for tests.

pub mod af_packet;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod mem;
mod netif;
pub mod tap;
#[cfg(test)]
mod testns;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the device knows about a received frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxInfo {
    /// The sender left the transport checksum for offload (a local kernel's partial
    /// checksum, `TP_STATUS_CSUMNOTREADY`): the frame is intact but its TCP/UDP checksum field
    /// holds only the pseudo-header sum, so the stack must complete it rather than drop the
    /// frame.
    pub csum_partial: bool,
}

/// The receive half of a device queue.
pub trait RxQueue: Send {
    /// Whether a frame is waiting (checks the ring or reads the next one into a buffer; never
    /// blocks).
    fn ready(&mut self) -> bool;
    /// Hands the next frame to `f`, in place, and releases its slot afterwards; `None` when
    /// no frame is waiting.
    fn recv<R>(&mut self, f: impl FnOnce(&mut [u8], RxInfo) -> R) -> Option<R>;
}

/// What a device is to finish in a frame it sends (transmit offloads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxMeta {
    /// Complete the transport checksum: (where the checksummed bytes start, where the field
    /// is, relative to that start), both from the start of the frame; the field holds the
    /// pseudo-header sum.
    pub csum: Option<(u16, u16)>,
    /// Cut the TCP payload into segments of `mss` bytes, each with a copy of the first
    /// `hdr_len` bytes (Ethernet, IP and TCP headers).
    pub gso: Option<Gso>,
}

/// TCP segmentation of one large frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub mss: u16,
    pub hdr_len: u16,
    pub ipv6: bool,
}

/// The transmit offloads a device offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffload {
    /// It completes TCP checksums ([`TxMeta::csum`]).
    pub csum: bool,
    /// It segments TCP frames up to this length, Ethernet header included ([`TxMeta::gso`]).
    pub tso_max: Option<usize>,
}

/// The transmit half of a device queue.
pub trait TxQueue: Send {
    /// Whether a frame can be queued now (a free ring slot).
    fn ready(&mut self) -> bool;
    /// Queues one frame of `len` bytes built by `f` in place. Called only after `ready`
    /// returned true; a frame that cannot be queued after all is counted as dropped.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R;
    /// Hands what was queued to the kernel or the NIC (one system call per pass at most).
    fn flush(&mut self) -> io::Result<()>;
    /// As [`TxQueue::send`], with what the device is to finish in the frame `f` built. A
    /// device without offloads ignores it (and offers none: [`NetDev::offload`]).
    fn send_meta<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> (R, TxMeta)) -> R {
        self.send(len, |b| f(b).0)
    }
}

/// One queue pair of a device, owned by one reactor.
pub trait NetDev: Send {
    type Rx: RxQueue;
    type Tx: TxQueue;
    /// Both halves at once (smoltcp takes a receive and a transmit token together).
    fn queues(&mut self) -> (&mut Self::Rx, &mut Self::Tx);
    /// The interface's Ethernet address.
    fn mac(&self) -> [u8; 6];
    /// The largest IP packet a frame carries (the interface's MTU, without the Ethernet
    /// header).
    fn mtu(&self) -> usize;
    /// A descriptor that polls readable when frames arrive, for a reactor that sleeps; `None`
    /// when the device can only be polled.
    fn wait_fd(&self) -> Option<RawFd>;
    /// The device's counters.
    fn stats(&self) -> &Arc<DevStats>;
    /// The transmit offloads it offers.
    fn offload(&self) -> TxOffload {
        TxOffload::default()
    }
    /// What the tree shows of the port the queue belongs to, beyond the queue's own counters
    /// (driver, link, the port's counters); `None` for devices with nothing more to say.
    fn port_view(&self) -> Option<Arc<dyn PortView>> {
        None
    }
}

/// A device's port as the management tree shows it, readable from any thread.
pub trait PortView: Send + Sync {
    /// Attributes of the port as a whole (under `net/`).
    fn attrs(&self) -> Vec<(String, String)>;
    /// Attributes of queue `q` (under `net/reactors/q/`).
    fn queue_attrs(&self, q: usize) -> Vec<(String, String)>;
}

/// Packet counters of one device queue, readable from any thread.
#[derive(Debug, Default)]
pub struct DevStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames lost before the stack saw them: ring overruns reported by the kernel, frames
    /// truncated to the slot size, frames that could not be read.
    pub rx_dropped: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames not sent: no free slot, or the kernel refused them.
    pub tx_dropped: AtomicU64,
}

impl DevStats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Name/value pairs for the management tree.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        vec![
            ("rx_packets".into(), g(&self.rx_packets)),
            ("rx_bytes".into(), g(&self.rx_bytes)),
            ("rx_dropped".into(), g(&self.rx_dropped)),
            ("tx_packets".into(), g(&self.tx_packets)),
            ("tx_bytes".into(), g(&self.tx_bytes)),
            ("tx_dropped".into(), g(&self.tx_dropped)),
        ]
    }
}

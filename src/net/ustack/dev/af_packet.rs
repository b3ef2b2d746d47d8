//! A queue of a kernel network interface through an AF_PACKET socket with memory-mapped
//! receive and transmit rings (packet(7), TPACKET_V2; the kernel's
//! Documentation/networking/packet_mmap.rst).
//!
//! Each reactor opens one socket on the interface. The sockets of all reactors join one fanout
//! group in `PACKET_FANOUT_HASH` mode: the kernel hashes each received frame's flow (addresses
//! and ports, the same both ways) and hands it to one socket of the group, so every frame of a
//! TCP connection reaches the reactor that owns it. A socket joins the group even when it is
//! the only queue, so that one behaves like many. The group id names the group within the
//! network namespace: every queue of one device uses the same id, and two processes (or two
//! devices) must use different ids, or the kernel refuses the second interface and splits the
//! traffic of the second process on the same interface between both.
//!
//! The stack shares the interface's Ethernet address with the kernel, which also sees every
//! frame: the stack must use IP addresses the kernel does not own.
//!
//! Receiving: the kernel writes each frame into the next slot of the receive ring and sets the
//! slot's `tp_status` to `TP_STATUS_USER`; [`AfPacketRx::recv`] hands the frame to the stack in
//! place and gives the slot back (`TP_STATUS_KERNEL`). A full ring drops frames in the kernel;
//! those drops (`PACKET_STATISTICS`) are added to `rx_dropped` every few thousand polls.
//! Frames larger than a slot arrive truncated and are dropped: they are the segmentation
//! offload super-frames of a kernel peer on a virtual link (veth), which must have offloads
//! turned off (`ethtool -K PEER tx off`).
//!
//! Transmitting: [`AfPacketTx::send`] builds the frame in the next free slot of the transmit
//! ring and marks it `TP_STATUS_SEND_REQUEST`; [`AfPacketTx::flush`] tells the kernel with one
//! `sendto` to send every marked slot. The kernel sends straight to the driver
//! (`PACKET_QDISC_BYPASS`) and marks each slot `TP_STATUS_AVAILABLE` again when the driver is
//! done with it.
//!
//! The receive rings never see what is sent on the interface. Frames sent by a socket of the
//! group never come back to the group. What other sockets and the kernel send is left out by
//! the group's `PACKET_FANOUT_FLAG_IGNORE_OUTGOING` (Linux 6.2): once a socket is in a fanout
//! group, the group's hook receives for it and the socket's own `PACKET_IGNORE_OUTGOING`
//! (set as well) no longer applies. A frame marked `PACKET_OUTGOING` is skipped anyway, which
//! is what keeps older kernels right.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use super::netif::{self, ETH_HLEN, VLAN_HLEN};
use super::{DevStats, NetDev, RxInfo, RxQueue, TxQueue};
use super::{TxMeta, TxOffload};

/// `TPACKET_ALIGN` (linux/if_packet.h).
const fn tpacket_align(x: usize) -> usize {
    (x + libc::TPACKET_ALIGNMENT - 1) & !(libc::TPACKET_ALIGNMENT - 1)
}

/// Where the network header of a received frame starts in its slot: after the tpacket2 header
/// and the `sockaddr_ll` (`TPACKET2_HDRLEN`), with room for a link header of up to 16 bytes,
/// aligned. The kernel's `tpacket_rcv` computes `netoff = TPACKET_ALIGN(tp_hdrlen +
/// max(maclen, 16))` and puts the link header just before it, so a slot holds an IP packet of
/// `frame_size - RX_NET_OFF` bytes.
const RX_NET_OFF: usize = tpacket_align(libc::TPACKET2_HDRLEN + 16);
/// Where a frame to send starts in its slot: right after the tpacket2 header, as the kernel
/// reads it without `PACKET_TX_HAS_OFF` (`tp_hdrlen - sizeof(struct sockaddr_ll)`).
const TX_DATA_OFF: usize = libc::TPACKET2_HDRLEN - size_of::<libc::sockaddr_ll>();
/// Where the receive slot's `sll_pkttype` is (the `sockaddr_ll` follows the aligned header).
const RX_PKTTYPE_OFF: usize =
    tpacket_align(size_of::<libc::tpacket2_hdr>()) + offset_of!(libc::sockaddr_ll, sll_pkttype);

/// Receive polls between two reads of the kernel's drop counter (a system call).
const STATS_EVERY: u32 = 4096;
/// `struct virtio_net_hdr`, which precedes each frame of a socket with `PACKET_VNET_HDR`.
const VNET_LEN: usize = 10;
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_TCPV6: u8 = 4;
/// The offloading transmit ring: slots of 64 KiB (a whole TSO frame), at most 128 of them.
const VNET_FRAME: usize = 64 * 1024;
const VNET_FRAMES: usize = 128;

/// Whether the advice about truncated frames was given (once per process, not per queue).
static WARNED_TRUNCATED: AtomicBool = AtomicBool::new(false);

/// The smallest slot (a power of two) that holds a received frame of an interface with this
/// MTU: 2048 bytes for an MTU of 1500, 16384 for 9000. `None` when it would not fit a `u32`.
pub fn frame_size_for_mtu(mtu: usize) -> Option<usize> {
    RX_NET_OFF
        .checked_add(mtu)?
        .checked_next_power_of_two()
        .filter(|&s| u32::try_from(s).is_ok())
}

/// How large the rings of a queue are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    rx_frames: usize,
    tx_frames: usize,
    frame_size: Option<usize>,
}

impl Default for RingConfig {
    /// 4096 receive slots and 1024 transmit slots, each as large as the MTU needs (8 MiB and
    /// 2 MiB for an MTU of 1500).
    fn default() -> Self {
        RingConfig {
            rx_frames: 4096,
            tx_frames: 1024,
            frame_size: None,
        }
    }
}

impl RingConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Receive slots (rounded up to fill whole pages).
    pub fn with_rx_frames(mut self, n: usize) -> Self {
        self.rx_frames = n;
        self
    }

    /// Transmit slots (rounded up to fill whole pages).
    pub fn with_tx_frames(mut self, n: usize) -> Self {
        self.tx_frames = n;
        self
    }

    /// Bytes per slot, a power of two at least [`frame_size_for_mtu`] of the interface's MTU;
    /// by default exactly that.
    pub fn with_frame_size(mut self, bytes: usize) -> Self {
        self.frame_size = Some(bytes);
        self
    }

    pub fn rx_frames(&self) -> usize {
        self.rx_frames
    }

    pub fn tx_frames(&self) -> usize {
        self.tx_frames
    }

    /// The configured slot size; `None`: as the MTU needs.
    pub fn frame_size(&self) -> Option<usize> {
        self.frame_size
    }
}

/// The rings as the kernel is asked for them: slots of `frame_size` bytes packed into blocks
/// of `block_size` (a whole number of pages and of slots), so slot `i` of a ring starts at
/// `i * frame_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    frame_size: usize,
    block_size: usize,
    rx_frames: usize,
    tx_frames: usize,
}

impl Layout {
    fn new(cfg: &RingConfig, mtu: usize, page_size: usize) -> Result<Layout, String> {
        let need = frame_size_for_mtu(mtu).ok_or_else(|| format!("MTU {mtu} too large"))?;
        let frame_size = cfg.frame_size.unwrap_or(need);
        if !frame_size.is_power_of_two() || frame_size < need {
            return Err(format!(
                "frame size {frame_size}: needs a power of two of at least {need} for MTU {mtu}"
            ));
        }
        if cfg.rx_frames == 0 || cfg.tx_frames == 0 {
            return Err("rings need at least one frame each".into());
        }
        if !page_size.is_power_of_two() {
            return Err(format!("page size {page_size} is not a power of two"));
        }
        // Both powers of two: the larger is a multiple of the smaller.
        let block_size = frame_size.max(page_size);
        let per_block = block_size / frame_size;
        let round = |n: usize| {
            n.checked_next_multiple_of(per_block)
                .filter(|&n| {
                    n.checked_mul(frame_size)
                        .is_some_and(|b| u32::try_from(b).is_ok())
                })
                .ok_or_else(|| format!("{n} frames of {frame_size} bytes: too large a ring"))
        };
        let l = Layout {
            frame_size,
            block_size,
            rx_frames: round(cfg.rx_frames)?,
            tx_frames: round(cfg.tx_frames)?,
        };
        l.rx_bytes()
            .checked_add(l.tx_bytes())
            .ok_or_else(|| "rings too large".to_string())?;
        Ok(l)
    }

    fn rx_bytes(&self) -> usize {
        self.rx_frames * self.frame_size
    }

    fn tx_bytes(&self) -> usize {
        self.tx_frames * self.frame_size
    }

    /// The `PACKET_RX_RING`/`PACKET_TX_RING` request for a ring of `frames` slots. `new`
    /// checked that every product fits a `u32`.
    fn req(&self, frames: usize) -> libc::tpacket_req {
        let u = |n: usize| libc::c_uint::try_from(n).unwrap_or(libc::c_uint::MAX);
        libc::tpacket_req {
            tp_block_size: u(self.block_size),
            tp_block_nr: u(frames * self.frame_size / self.block_size),
            tp_frame_size: u(self.frame_size),
            tp_frame_nr: u(frames),
        }
    }
}

/// The mapping of both rings (receive ring, then transmit ring), unmapped on drop.
struct RingMap {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is memory shared with the kernel, owned by this value; which slots each
// half of the device touches is decided by the ring protocol, not by the thread it runs on.
unsafe impl Send for RingMap {}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned; the queues that point into the
        // mapping are fields of the same device, dropped with it.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

/// The slots of one ring.
#[derive(Clone, Copy)]
struct Slots {
    base: NonNull<u8>,
    frame_size: usize,
    count: usize,
}

impl Slots {
    /// The first byte of slot `i % count`.
    fn slot(&self, i: usize) -> *mut u8 {
        // SAFETY: the ring is `count * frame_size` bytes of the live mapping starting at
        // `base`, and `i % count < count`.
        unsafe { self.base.as_ptr().add((i % self.count) * self.frame_size) }
    }

    /// The slot's `tp_status`, the word the kernel and this process hand the slot over with.
    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: `tp_status` is the first field of the slot's tpacket2 header, so it is
        // 4-byte aligned (slots start on a multiple of the frame size, at least 16) and lives
        // as long as the mapping, which outlives `self`. The kernel reads and writes it with
        // READ_ONCE/WRITE_ONCE and barriers, and this process only ever through this atomic.
        unsafe { AtomicU32::from_ptr(self.slot(i).cast::<u32>()) }
    }

    /// Reads a field of slot `i`'s header at `off`.
    ///
    /// # Safety
    /// The slot must belong to this process (its status says so) and `off` must be the offset
    /// of a `T` in the tpacket2 header.
    unsafe fn field<T: Copy>(&self, i: usize, off: usize) -> T {
        // SAFETY: per the contract the kernel does not write the slot while this process
        // owns it, and the field is in bounds and aligned (header fields are naturally aligned
        // and slots start 16-byte aligned).
        unsafe { ptr::read(self.slot(i).add(off).cast::<T>()) }
    }
}

/// A frame found at the head of the receive ring and checked.
#[derive(Clone, Copy)]
struct RxFrame {
    off: usize,
    len: usize,
    csum_partial: bool,
}

/// The receive half: the receive ring.
pub struct AfPacketRx {
    ring: Slots,
    head: usize,
    /// The head slot, once `ready` has checked it.
    pending: Option<RxFrame>,
    fd: RawFd,
    polls: u32,
    stats: Arc<DevStats>,
    ifname: String,
}

// SAFETY: the ring pointer is into the device's mapping, which moves with this half (both are
// fields of the device); only this half touches the receive ring.
unsafe impl Send for AfPacketRx {}

/// The transmit half: the transmit ring.
pub struct AfPacketTx {
    ring: Slots,
    head: usize,
    /// The largest frame the kernel takes (slot room, and the MTU with a link header).
    max_len: usize,
    /// Frames marked for sending since the last `sendto` that went through.
    queued: bool,
    /// Where a frame that cannot be queued is built and forgotten (grows once, if ever).
    spill: Vec<u8>,
    fd: RawFd,
    stats: Arc<DevStats>,
    /// Each slot starts with a `virtio_net_hdr`: the kernel completes TCP checksums and
    /// segments frames larger than the MTU (the socket of [`VnetTx`]).
    vnet: bool,
    /// The interface segments TCP (TSO on when the queue was opened): only then may a frame
    /// be larger than the MTU.
    tso: bool,
    /// The largest frame sent whole (the MTU with a link header).
    mtu_len: usize,
}

/// A second socket per queue for sending only, with `PACKET_VNET_HDR`: frames leave with
/// their TCP checksum to complete and, up to 64 KiB, to segment (TSO: a veth hands the large
/// frame to its peer whole; a NIC segments it in hardware). Bound to the interface with
/// protocol 0, it receives nothing.
struct VnetTx {
    // The mapping is declared before the socket, so it is unmapped first.
    ring: RingMap,
    fd: OwnedFd,
}

// SAFETY: as for `AfPacketRx`; only this half touches the transmit ring.
unsafe impl Send for AfPacketTx {}

/// One queue of a kernel interface: an AF_PACKET socket with its rings.
pub struct AfPacketDev {
    rx: AfPacketRx,
    tx: AfPacketTx,
    mac: [u8; 6],
    mtu: usize,
    layout: Layout,
    stats: Arc<DevStats>,
    /// The offloading transmit socket, when the kernel allows one.
    _vnet: Option<VnetTx>,
    // The mapping is declared before the socket: it is unmapped before the socket is closed,
    // so no ring outlives the descriptor it belongs to.
    _ring: RingMap,
    fd: OwnedFd,
}

/// A packet socket that receives nothing until bound (protocol 0).
fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just created and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds a packet socket to interface `ifindex` for `protocol` (host order; 0 sends only).
fn bind_packet(fd: RawFd, ifindex: libc::c_int, protocol: u16) -> io::Result<()> {
    // SAFETY: all-zero bytes are a valid `sockaddr_ll` (integers and a byte array).
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    let sll_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sll` is a live `sockaddr_ll` of `sll_len` bytes; the kernel only reads it.
    let r = unsafe { libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), sll_len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl RingMap {
    /// Maps the `len` bytes of `fd`'s rings (all of them, as the kernel requires).
    fn new(fd: RawFd, len: usize) -> io::Result<RingMap> {
        // SAFETY: a shared mapping of the socket's rings at an address of the kernel's
        // choosing (no MAP_FIXED); failure is MAP_FAILED, checked below.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(RingMap { addr, len })
    }
}

/// Opens the offloading transmit socket of `ifindex` ([`VnetTx`]).
fn open_vnet_tx(ifindex: libc::c_int, frames: usize) -> io::Result<VnetTx> {
    let fd = packet_socket()?;
    let sfd = fd.as_raw_fd();
    let v2 = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
    setopt(sfd, libc::PACKET_VERSION, &v2)?;
    let on: libc::c_int = 1;
    setopt(sfd, libc::PACKET_VNET_HDR, &on)?;
    setopt(sfd, libc::PACKET_LOSS, &on)?;
    setopt(sfd, libc::PACKET_QDISC_BYPASS, &on)?;
    let req = libc::tpacket_req {
        tp_block_size: VNET_FRAME as libc::c_uint,
        tp_block_nr: frames as libc::c_uint,
        tp_frame_size: VNET_FRAME as libc::c_uint,
        tp_frame_nr: frames as libc::c_uint,
    };
    setopt(sfd, libc::PACKET_TX_RING, &req)?;
    let ring = RingMap::new(sfd, VNET_FRAME * frames)?;
    bind_packet(sfd, ifindex, 0)?;
    Ok(VnetTx { ring, fd })
}

fn setopt<T>(fd: RawFd, name: libc::c_int, val: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `val` is a live `T` of `len` bytes; the kernel only reads it.
    let r = unsafe { libc::setsockopt(fd, libc::SOL_PACKET, name, (val as *const T).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AfPacketDev {
    /// Opens queue `queue` of `nqueues` on `ifname` with rings of the default size; every
    /// queue of the interface joins fanout group `fanout_group` (see the module docs).
    pub fn open(
        ifname: &str,
        queue: usize,
        nqueues: usize,
        fanout_group: u16,
    ) -> io::Result<AfPacketDev> {
        Self::open_with(ifname, queue, nqueues, fanout_group, RingConfig::default())
    }

    /// As [`open`](Self::open), with rings sized by `cfg`.
    pub fn open_with(
        ifname: &str,
        queue: usize,
        nqueues: usize,
        fanout_group: u16,
        cfg: RingConfig,
    ) -> io::Result<AfPacketDev> {
        netif::ifname(ifname)?;
        if queue >= nqueues {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{ifname}: queue {queue} of {nqueues} does not exist"),
            ));
        }
        const CAP: &str = "CAP_NET_RAW";
        let ctx =
            |e: io::Error, what: &str| netif::context(e, format_args!("{ifname}: {what}"), CAP);

        // Protocol 0: the socket receives nothing until `bind` names the interface and the
        // protocol, so no frame of another interface lands in the ring.
        let fd = packet_socket().map_err(|e| ctx(e, "packet socket"))?;
        let sfd = fd.as_raw_fd();

        let ifindex = netif::index(sfd, ifname).map_err(|e| ctx(e, "interface index"))?;
        let (hatype, mac) = netif::hwaddr(sfd, ifname).map_err(|e| ctx(e, "hardware address"))?;
        if hatype != libc::ARPHRD_ETHER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{ifname}: not an Ethernet interface (hardware type {hatype})"),
            ));
        }
        let mtu = netif::mtu(sfd, ifname).map_err(|e| ctx(e, "MTU"))?;

        let v2 = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        setopt(sfd, libc::PACKET_VERSION, &v2).map_err(|e| ctx(e, "TPACKET_V2"))?;
        let on: libc::c_int = 1;
        // A malformed frame in the transmit ring is skipped (and its slot made available)
        // rather than stopping the ring at `TP_STATUS_WRONG_FORMAT` until this process
        // notices.
        setopt(sfd, libc::PACKET_LOSS, &on).map_err(|e| ctx(e, "PACKET_LOSS"))?;
        setopt(sfd, libc::PACKET_QDISC_BYPASS, &on).map_err(|e| ctx(e, "PACKET_QDISC_BYPASS"))?;
        match setopt(sfd, libc::PACKET_IGNORE_OUTGOING, &on) {
            // Before Linux 4.20: outgoing frames are skipped by their packet type instead.
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {}
            r => r.map_err(|e| ctx(e, "PACKET_IGNORE_OUTGOING"))?,
        }

        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).unwrap_or(4096);
        let layout = Layout::new(&cfg, mtu, page)
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, format!("{ifname}: {m}")))?;
        setopt(sfd, libc::PACKET_RX_RING, &layout.req(layout.rx_frames))
            .map_err(|e| ctx(e, "receive ring"))?;
        setopt(sfd, libc::PACKET_TX_RING, &layout.req(layout.tx_frames))
            .map_err(|e| ctx(e, "transmit ring"))?;
        let ring = RingMap::new(sfd, layout.rx_bytes() + layout.tx_bytes())
            .map_err(|e| ctx(e, "mapping the rings"))?;
        let addr = ring.addr;
        // ETH_P_ALL is 3: it fits the 16-bit protocol field.
        bind_packet(sfd, ifindex, libc::ETH_P_ALL as u16).map_err(|e| ctx(e, "bind"))?;
        join_fanout(sfd, fanout_group).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EINVAL) {
                " (the group is in use on another interface or by another process)"
            } else {
                ""
            };
            ctx(e, &format!("joining fanout group {fanout_group}{hint}"))
        })?;

        let stats = Arc::new(DevStats::default());
        let rx_slots = Slots {
            base: addr,
            frame_size: layout.frame_size,
            count: layout.rx_frames,
        };
        let tx_slots = Slots {
            // SAFETY: the transmit ring starts right after the receive ring, inside the
            // mapping of `rx_bytes + tx_bytes` bytes.
            base: unsafe { addr.add(layout.rx_bytes()) },
            frame_size: layout.frame_size,
            count: layout.tx_frames,
        };
        let mut rx = AfPacketRx {
            ring: rx_slots,
            head: 0,
            pending: None,
            fd: sfd,
            polls: 0,
            stats: stats.clone(),
            ifname: ifname.to_string(),
        };
        // Frames that came in between `bind` and joining the group were not chosen by the
        // flow hash: they may belong to another queue's connections, so they go. Frames of
        // this queue's own flows that are dropped with them are sent again by their peers.
        rx.discard_all();
        let mut tx = AfPacketTx {
            ring: tx_slots,
            head: 0,
            max_len: (layout.frame_size - TX_DATA_OFF).min(mtu + ETH_HLEN + VLAN_HLEN),
            queued: false,
            spill: Vec::new(),
            fd: sfd,
            stats: stats.clone(),
            vnet: false,
            tso: false,
            mtu_len: mtu + ETH_HLEN + VLAN_HLEN,
        };
        // Sends go through the offloading socket where the kernel allows it; otherwise
        // through this socket's own ring, with checksums computed by the stack.
        let vnet_frames = layout.tx_frames.min(VNET_FRAMES);
        let vnet = match open_vnet_tx(ifindex, vnet_frames) {
            Ok(v) => {
                tx.ring = Slots {
                    base: v.ring.addr,
                    frame_size: VNET_FRAME,
                    count: vnet_frames,
                };
                tx.fd = v.fd.as_raw_fd();
                tx.max_len = VNET_FRAME - TX_DATA_OFF - VNET_LEN;
                tx.vnet = true;
                // Without TSO on the interface the kernel drops a larger frame sent past the
                // qdisc instead of segmenting it: the stack segments, the kernel checksums.
                tx.tso = netif::tso(sfd, ifname).unwrap_or(false);
                if !tx.tso {
                    log::info!(
                        "{ifname}: TCP segmentation offload is off on the interface; the \
                         stack segments"
                    );
                }
                Some(v)
            }
            Err(e) => {
                log::info!(
                    "{ifname}: no transmit offloads ({e}); the stack checksums and segments"
                );
                None
            }
        };
        Ok(AfPacketDev {
            rx,
            tx,
            mac,
            mtu,
            layout,
            stats,
            _vnet: vnet,
            _ring: ring,
            fd,
        })
    }

    /// The rings as opened: slot counts after rounding, and the slot size.
    pub fn ring_config(&self) -> RingConfig {
        RingConfig {
            rx_frames: self.layout.rx_frames,
            tx_frames: self.layout.tx_frames,
            frame_size: Some(self.layout.frame_size),
        }
    }
}

/// Joins fanout group `group` in hash mode, leaving outgoing frames out. When the kernel
/// refuses the request (EINVAL: a kernel older than 6.2 may not know
/// `PACKET_FANOUT_FLAG_IGNORE_OUTGOING`), the group is joined without the flag; every queue of
/// the process takes the same path, so the members' flags agree, and outgoing frames are then
/// skipped by their packet type. If that fails too, the first error is returned.
fn join_fanout(fd: RawFd, group: u16) -> io::Result<()> {
    let arg = |flags: libc::c_uint| -> libc::c_int {
        // The kernel reads the id from the low 16 bits and the mode and flags from the high
        // ones: the value is a bit pattern, whatever the sign of the int.
        (libc::c_uint::from(group) | ((libc::PACKET_FANOUT_HASH | flags) << 16)) as libc::c_int
    };
    match setopt(
        fd,
        libc::PACKET_FANOUT,
        &arg(libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING),
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            setopt(fd, libc::PACKET_FANOUT, &arg(0)).map_err(|_| e)
        }
        r => r,
    }
}

impl AfPacketRx {
    /// Gives the head slot back to the kernel and moves on.
    fn release(&mut self) {
        // Release: every read of the frame is done before the kernel may write the slot.
        self.ring
            .status(self.head)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.head = (self.head + 1) % self.ring.count;
    }

    /// Gives back every slot the kernel has filled.
    fn discard_all(&mut self) {
        self.pending = None;
        for _ in 0..self.ring.count {
            let st = self.ring.status(self.head).load(Ordering::Acquire);
            if st & libc::TP_STATUS_USER == 0 {
                break;
            }
            self.release();
        }
    }

    /// Checks the frame in the head slot, which the kernel has handed over: `None` when it is
    /// not for the stack (outgoing, truncated, or inconsistent).
    fn check(&mut self, status: u32) -> Option<RxFrame> {
        let h = self.head;
        // SAFETY (all three reads): the slot's status has TP_STATUS_USER, read with Acquire,
        // so the kernel has finished writing it and will not touch it until it is released;
        // the offsets are those of the named fields.
        let pkttype: u8 = unsafe { self.ring.field(h, RX_PKTTYPE_OFF) };
        let len: u32 = unsafe { self.ring.field(h, offset_of!(libc::tpacket2_hdr, tp_len)) };
        let (snap, mac): (u32, u16) = unsafe {
            (
                self.ring
                    .field(h, offset_of!(libc::tpacket2_hdr, tp_snaplen)),
                self.ring.field(h, offset_of!(libc::tpacket2_hdr, tp_mac)),
            )
        };
        if pkttype == libc::PACKET_OUTGOING {
            return None;
        }
        if snap < len {
            DevStats::add(&self.stats.rx_dropped, 1);
            if !WARNED_TRUNCATED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "{}: dropped a frame of {len} bytes cut to {snap}: the peer sends frames \
                     larger than the MTU (segmentation offload); turn its offloads off \
                     (`ethtool -K PEER tx off`)",
                    self.ifname
                );
            }
            return None;
        }
        let (off, len) = (usize::from(mac), snap as usize);
        if off < libc::TPACKET2_HDRLEN || off.saturating_add(len) > self.ring.frame_size {
            DevStats::add(&self.stats.rx_dropped, 1);
            return None;
        }
        Some(RxFrame {
            off,
            len,
            csum_partial: status & libc::TP_STATUS_CSUMNOTREADY != 0,
        })
    }

    /// Adds the frames the kernel dropped since the last look (ring full) to `rx_dropped`.
    /// The kernel resets its counters on every read.
    fn read_kernel_drops(&self) {
        // SAFETY: all-zero bytes are a valid `tpacket_stats` (two integers).
        let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `st` is a live `tpacket_stats` of `len` bytes the kernel writes at most.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if r == 0 && st.tp_drops > 0 {
            DevStats::add(&self.stats.rx_dropped, u64::from(st.tp_drops));
        }
    }
}

impl RxQueue for AfPacketRx {
    fn ready(&mut self) -> bool {
        if self.pending.is_some() {
            return true;
        }
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(STATS_EVERY) {
            self.read_kernel_drops();
        }
        // At most one lap: every slot skipped is given back.
        for _ in 0..self.ring.count {
            // Acquire: pairs with the kernel's barrier before it sets TP_STATUS_USER, so the
            // header and frame written before are visible.
            let st = self.ring.status(self.head).load(Ordering::Acquire);
            if st & libc::TP_STATUS_USER == 0 {
                return false;
            }
            if let Some(f) = self.check(st) {
                self.pending = Some(f);
                return true;
            }
            self.release();
        }
        false
    }

    fn recv<R>(&mut self, f: impl FnOnce(&mut [u8], RxInfo) -> R) -> Option<R> {
        if !self.ready() {
            return None;
        }
        let fr = self.pending.take()?;
        /// Gives the slot back even if `f` unwinds, so the ring never stalls on it.
        struct Give<'a>(&'a mut AfPacketRx);
        impl Drop for Give<'_> {
            fn drop(&mut self) {
                self.0.release();
            }
        }
        let g = Give(self);
        DevStats::add(&g.0.stats.rx_packets, 1);
        DevStats::add(&g.0.stats.rx_bytes, fr.len as u64);
        // SAFETY: `check` found `off + len` within the slot, which this process owns until
        // `g` releases it after `f` returns; `&mut self` (moved into `g`) keeps anyone else
        // from handing out the same bytes meanwhile.
        let frame =
            unsafe { std::slice::from_raw_parts_mut(g.0.ring.slot(g.0.head).add(fr.off), fr.len) };
        let r = f(
            frame,
            RxInfo {
                csum_partial: fr.csum_partial,
            },
        );
        drop(g);
        Some(r)
    }
}

impl AfPacketTx {
    /// Whether the head slot is free; a slot the kernel refused (`TP_STATUS_WRONG_FORMAT`,
    /// not expected with `PACKET_LOSS`) counts as a dropped frame and is reused.
    fn head_free(&mut self) -> bool {
        let st = self.ring.status(self.head);
        // Acquire: pairs with the kernel making the slot available once the driver is done
        // with the frame (it may have read the frame in place until then).
        let s = st.load(Ordering::Acquire);
        if s & libc::TP_STATUS_WRONG_FORMAT != 0 {
            DevStats::add(&self.stats.tx_dropped, 1);
            st.store(libc::TP_STATUS_AVAILABLE, Ordering::Relaxed);
            return true;
        }
        s & (libc::TP_STATUS_SEND_REQUEST | libc::TP_STATUS_SENDING) == 0
    }
}

impl TxQueue for AfPacketTx {
    fn ready(&mut self) -> bool {
        self.head_free()
    }

    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.send_meta(len, |b| (f(b), TxMeta::default()))
    }

    fn send_meta<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> (R, TxMeta)) -> R {
        if len < ETH_HLEN || len > self.max_len || !self.head_free() {
            DevStats::add(&self.stats.tx_dropped, 1);
            self.spill.clear();
            self.spill.resize(len, 0);
            return f(&mut self.spill).0;
        }
        let slot = self.ring.slot(self.head);
        let hdr = if self.vnet { VNET_LEN } else { 0 };
        // SAFETY: the slot is available, so neither the kernel nor the driver reads it;
        // `TX_DATA_OFF + hdr + len <= frame_size` (`max_len` is at most the slot's room)
        // keeps the bytes inside it; `&mut self` keeps them unique.
        let frame = unsafe { std::slice::from_raw_parts_mut(slot.add(TX_DATA_OFF + hdr), len) };
        let (r, meta) = f(frame);
        if len > self.mtu_len && meta.gso.is_none() {
            // Only a frame the kernel is to segment may exceed the MTU.
            DevStats::add(&self.stats.tx_dropped, 1);
            return r;
        }
        if self.vnet {
            let mut v = [0u8; VNET_LEN];
            if let Some((start, off)) = meta.csum {
                v[0] = VNET_F_NEEDS_CSUM;
                v[6..8].copy_from_slice(&start.to_ne_bytes());
                v[8..10].copy_from_slice(&off.to_ne_bytes());
            }
            if let Some(g) = meta.gso {
                v[1] = if g.ipv6 {
                    VNET_GSO_TCPV6
                } else {
                    VNET_GSO_TCPV4
                };
                v[2..4].copy_from_slice(&g.hdr_len.to_ne_bytes());
                v[4..6].copy_from_slice(&g.mss.to_ne_bytes());
            }
            // SAFETY: as for the frame: the header's 10 bytes precede it inside the slot.
            unsafe { ptr::copy_nonoverlapping(v.as_ptr(), slot.add(TX_DATA_OFF), VNET_LEN) };
        }
        // `hdr + len <= max_len + hdr < frame_size`, which fits a u32.
        let tp_len = (hdr + len) as u32;
        // SAFETY: the slot is ours (available); `tp_len` is an aligned u32 of its header.
        unsafe {
            ptr::write(
                slot.add(offset_of!(libc::tpacket2_hdr, tp_len))
                    .cast::<u32>(),
                tp_len,
            );
        }
        // Release: the frame and its length are written before the kernel can see the
        // request.
        self.ring
            .status(self.head)
            .store(libc::TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.head = (self.head + 1) % self.ring.count;
        self.queued = true;
        DevStats::add(&self.stats.tx_packets, 1);
        DevStats::add(&self.stats.tx_bytes, len as u64);
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.queued {
            return Ok(());
        }
        // SAFETY: no buffer: on a socket with a transmit ring, a send of zero bytes and no
        // address tells the kernel to send the slots marked TP_STATUS_SEND_REQUEST, through
        // the interface the socket is bound to.
        let r =
            unsafe { libc::sendto(self.fd, ptr::null(), 0, libc::MSG_DONTWAIT, ptr::null(), 0) };
        if r >= 0 {
            self.queued = false;
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The driver's queue is full or the call was interrupted: what is left stays
            // marked and goes on the next flush.
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR) => Ok(()),
            _ => Err(e),
        }
    }
}

impl NetDev for AfPacketDev {
    type Rx = AfPacketRx;
    type Tx = AfPacketTx;

    fn queues(&mut self) -> (&mut AfPacketRx, &mut AfPacketTx) {
        (&mut self.rx, &mut self.tx)
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    /// The socket: it polls readable while the receive ring holds a frame.
    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn stats(&self) -> &Arc<DevStats> {
        &self.stats
    }

    fn offload(&self) -> TxOffload {
        if self.tx.vnet {
            TxOffload {
                csum: true,
                // An IPv4 packet is at most 65535 bytes.
                tso_max: self.tx.tso.then_some(self.tx.max_len.min(65535 + ETH_HLEN)),
            }
        } else {
            TxOffload::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_offsets() {
        // Worked out by hand from linux/if_packet.h on x86_64.
        assert_eq!(libc::TPACKET2_HDRLEN, 52);
        assert_eq!(RX_NET_OFF, 80);
        assert_eq!(TX_DATA_OFF, 32);
        assert_eq!(RX_PKTTYPE_OFF, 42);
    }

    #[test]
    fn frame_size_follows_the_mtu() {
        assert_eq!(frame_size_for_mtu(1500), Some(2048));
        assert_eq!(frame_size_for_mtu(2048 - RX_NET_OFF), Some(2048));
        assert_eq!(frame_size_for_mtu(2048 - RX_NET_OFF + 1), Some(4096));
        assert_eq!(frame_size_for_mtu(9000), Some(16384));
        assert_eq!(frame_size_for_mtu(65535), Some(131072));
        assert_eq!(frame_size_for_mtu(usize::MAX), None);
    }

    #[test]
    fn layout_fills_whole_pages() {
        let l = Layout::new(&RingConfig::default(), 1500, 4096).unwrap();
        assert_eq!(
            l,
            Layout {
                frame_size: 2048,
                block_size: 4096,
                rx_frames: 4096,
                tx_frames: 1024
            }
        );
        assert_eq!(l.rx_bytes(), 8 << 20);
        let r = l.req(l.rx_frames);
        assert_eq!(
            (
                r.tp_block_size,
                r.tp_block_nr,
                r.tp_frame_size,
                r.tp_frame_nr
            ),
            (4096, 2048, 2048, 4096)
        );

        // Odd counts round up to whole blocks.
        let cfg = RingConfig::new().with_rx_frames(5).with_tx_frames(1);
        let l = Layout::new(&cfg, 1500, 4096).unwrap();
        assert_eq!((l.rx_frames, l.tx_frames), (6, 2));

        // Slots larger than a page: one per block.
        let l = Layout::new(&cfg, 9000, 4096).unwrap();
        assert_eq!((l.frame_size, l.block_size), (16384, 16384));
        assert_eq!((l.rx_frames, l.tx_frames), (5, 1));
        assert_eq!(l.req(5).tp_block_nr, 5);
    }

    #[test]
    fn layout_refuses_bad_sizes() {
        let e = Layout::new(&RingConfig::new().with_frame_size(1024), 1500, 4096).unwrap_err();
        assert!(e.contains("at least 2048"), "{e}");
        let e = Layout::new(&RingConfig::new().with_frame_size(3000), 1500, 4096).unwrap_err();
        assert!(e.contains("power of two"), "{e}");
        let e = Layout::new(&RingConfig::new().with_rx_frames(0), 1500, 4096).unwrap_err();
        assert!(e.contains("at least one frame"), "{e}");
        let e = Layout::new(&RingConfig::new().with_tx_frames(1 << 40), 1500, 4096).unwrap_err();
        assert!(e.contains("too large"), "{e}");
        // A larger slot than needed is fine.
        let l = Layout::new(&RingConfig::new().with_frame_size(4096), 1500, 4096).unwrap();
        assert_eq!(l.frame_size, 4096);
    }

    #[test]
    fn open_names_the_interface_it_cannot_open() {
        // As root the interface is missing; without CAP_NET_RAW the socket is refused first.
        // Either way the error says which interface and why.
        let e = match AfPacketDev::open("nosuchif0", 0, 1, 0xfff0) {
            Ok(_) => panic!("nosuchif0 opened"),
            Err(e) => e,
        };
        let s = e.to_string();
        assert!(s.starts_with("nosuchif0: "), "{s}");
        match e.kind() {
            io::ErrorKind::NotFound => assert!(s.ends_with("(no such interface)"), "{s}"),
            io::ErrorKind::PermissionDenied => assert!(s.ends_with("(needs CAP_NET_RAW)"), "{s}"),
            k => panic!("{k:?}: {s}"),
        }
    }

    #[test]
    fn open_checks_its_arguments() {
        let e = AfPacketDev::open("eth0", 2, 2, 1).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("queue 2 of 2"), "{e}");
        let e = AfPacketDev::open("way-too-long-ifname", 0, 1, 1)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    // Root and network namespaces from here on.

    use super::super::testns::{self, fmt_mac, Link, Netns};
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    use std::time::{Duration, Instant};

    /// A namespace with a veth pair: the device on `v0`, the kernel on `v1` (10.77.0.1), and
    /// the kernel told the device's address (10.77.0.2) is at `v0`'s MAC.
    fn veth(tag: &str) -> (Netns, Link) {
        let ns = Netns::new(tag);
        ns.ip("link add v0 type veth peer name v1");
        ns.ip("addr add 10.77.0.1/24 dev v1");
        ns.ip("link set v0 up");
        ns.ip("link set v1 up");
        let link = Link {
            kernel_mac: ns.mac("v1"),
            kernel_ip: Ipv4Addr::new(10, 77, 0, 1),
            dev_mac: ns.mac("v0"),
            dev_ip: Ipv4Addr::new(10, 77, 0, 2),
        };
        ns.ip(&format!(
            "neigh replace {} lladdr {} dev v1 nud permanent",
            link.dev_ip,
            fmt_mac(link.dev_mac)
        ));
        (ns, link)
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_af_packet_frames_both_ways() {
        let (ns, link) = veth("afp");
        ns.run(|| {
            let mut dev = AfPacketDev::open("v0", 0, 1, 0x4a01).expect("open v0");
            assert_eq!(dev.mac(), link.dev_mac);
            assert_eq!(dev.mtu(), 1500);
            assert_eq!(
                dev.ring_config(),
                RingConfig::new().with_frame_size(2048),
                "default rings, 2048-byte slots for MTU 1500"
            );
            // Sends go through the offloading socket (checksums and TSO left to the kernel).
            let o = dev.offload();
            assert!(o.csum && o.tso_max.is_some_and(|m| m > 60_000), "{o:?}");
            testns::arp_both_ways(std::slice::from_mut(&mut dev), &link);
            testns::udp_to_kernel(&mut dev, &link);

            testns::wakes_up(&mut dev, &link);

            let (u, info) = testns::udp_from_kernel(&mut dev, &link);
            // veth offers checksum offload, so the kernel leaves the UDP checksum partial
            // and says so.
            assert!(info.csum_partial, "{u:?}");
            assert!(
                !u.csum_ok,
                "only the pseudo-header sum is in the checksum field"
            );
            assert_eq!(dev.stats().rx_dropped.load(Ordering::Relaxed), 0);
        });
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_af_packet_offers_no_segmentation_on_an_interface_without_tso() {
        let (ns, link) = veth("afpnotso");
        ns.run(|| {
            // `ethtool -K v0 tx off`, which takes TSO with it: the kernel would drop a frame
            // larger than the MTU sent past the qdisc, so the device must not ask for one.
            ethtool_tx_off("v0");
            let fd = packet_socket().unwrap();
            assert!(!netif::tso(fd.as_raw_fd(), "v0").unwrap());
            assert!(
                netif::tso(fd.as_raw_fd(), "v1").unwrap(),
                "veth has TSO by default"
            );
            let mut dev = AfPacketDev::open("v0", 0, 1, 0x4a06).expect("open v0");
            let o = dev.offload();
            assert!(o.csum, "checksums are still the kernel's: {o:?}");
            assert_eq!(o.tso_max, None, "{o:?}");
            testns::arp_both_ways(std::slice::from_mut(&mut dev), &link);
            testns::udp_to_kernel(&mut dev, &link);
        });
    }

    /// A frame built by another socket of the machine sent out of `v0` (through the qdisc,
    /// where packet sockets see outgoing frames).
    fn send_raw(ifname: &str, frame: &[u8]) {
        // SAFETY: plain socket creation; checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: just created, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifindex = netif::index(fd.as_raw_fd(), ifname).unwrap();
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        // SAFETY: `frame` and `sll` are live for the call, of the lengths given.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(r, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_af_packet_fanout_spreads_flows_and_hides_outgoing() {
        let (ns, link) = veth("afpfan");
        ns.run(|| {
            let mut devs = vec![
                AfPacketDev::open("v0", 0, 2, 0x4a02).expect("open queue 0"),
                AfPacketDev::open("v0", 1, 2, 0x4a02).expect("open queue 1"),
            ];
            testns::arp_both_ways(&mut devs, &link);
            let per_queue = testns::flows_over_queues(&mut devs, &link, 64);
            eprintln!("flows per queue: {per_queue:?}");

            // What this queue and another socket send out of v0 reaches the kernel on v1 but
            // never comes back into either ring.
            let sink = UdpSocket::bind((link.kernel_ip, 7003)).unwrap();
            sink.set_read_timeout(Some(testns::WAIT)).unwrap();
            let src = SocketAddrV4::new(link.dev_ip, 4003);
            let dst = SocketAddrV4::new(link.kernel_ip, 7003);
            let mut buf = [0u8; 128];
            for (i, marker) in [&b"marker: ring"[..], b"marker: other socket"]
                .into_iter()
                .enumerate()
            {
                let frame = testns::udp_frame(link.dev_mac, link.kernel_mac, src, dst, marker);
                if i == 0 {
                    testns::send(&mut devs[0], &frame);
                } else {
                    send_raw("v0", &frame);
                }
                let n = sink.recv(&mut buf).expect("the marker reaches the kernel");
                assert_eq!(&buf[..n], marker);
            }
            sink.send_to(b"fence", (link.dev_ip, 5003)).unwrap();
            let mut fenced = false;
            let deadline = Instant::now() + testns::WAIT;
            // Until the fence came, then one more pass over both rings.
            for last in [false, true] {
                while !fenced || last {
                    for dev in devs.iter_mut() {
                        testns::poll_once(dev, &mut |fr: &[u8], _| -> Option<()> {
                            let u = testns::parse_udp(fr)?;
                            assert!(
                                !u.payload.starts_with(b"marker"),
                                "outgoing frame seen: {u:?}"
                            );
                            fenced |= u.payload == b"fence";
                            None
                        });
                    }
                    if last {
                        break;
                    }
                    assert!(Instant::now() < deadline, "no fence");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_af_packet_truncated_gso_frame_is_dropped() {
        let (ns, link) = veth("afpgso");
        ns.run(|| {
            let mut dev = AfPacketDev::open("v0", 0, 1, 0x4a03).expect("open v0");
            let sock = UdpSocket::bind((link.kernel_ip, 7006)).unwrap();
            // UDP_SEGMENT (linux/udp.h): the kernel hands the driver one super-frame to be
            // cut into 1000-byte datagrams by whoever segments it; veth passes it on whole.
            const UDP_SEGMENT: libc::c_int = 103;
            let seg: libc::c_int = 1000;
            // SAFETY: an int option on a live socket.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_UDP,
                    UDP_SEGMENT,
                    (&seg as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "{}", io::Error::last_os_error());
            // The datagrams that reach the device: (payload length, checksum verifies,
            // flagged partial), until the small one that follows the super-frame.
            let send_and_collect = |dev: &mut AfPacketDev| {
                sock.send_to(&[b's'; 3000], (link.dev_ip, 5006)).unwrap();
                sock.send_to(b"small", (link.dev_ip, 5006)).unwrap();
                let mut got = Vec::new();
                testns::recv_until(std::slice::from_mut(dev), "the small datagram", |fr, i| {
                    let u = testns::parse_udp(fr)?;
                    if u.dst.port() != 5006 {
                        return None;
                    }
                    if u.payload == b"small" {
                        return Some(());
                    }
                    got.push((u.payload.len(), u.csum_ok, i.csum_partial));
                    None
                });
                got
            };
            let got = send_and_collect(&mut dev);
            assert_eq!(got, [], "no piece of the super-frame is handed over");
            assert_eq!(dev.stats().rx_dropped.load(Ordering::Relaxed), 1);
            assert!(WARNED_TRUNCATED.load(Ordering::Relaxed));

            // What the warning advises (`ethtool -K v1 tx off`, here through the ioctl):
            // the kernel segments and checksums before veth.
            ethtool_tx_off("v1");
            let got = send_and_collect(&mut dev);
            assert_eq!(got, [(1000, true, false); 3], "three whole datagrams");
            assert_eq!(dev.stats().rx_dropped.load(Ordering::Relaxed), 1);
        });
    }

    /// `ethtool -K IFNAME tx off`: the legacy ETHTOOL_STXCSUM request (linux/ethtool.h),
    /// which the kernel turns into its features, dropping segmentation offloads with it.
    fn ethtool_tx_off(ifname: &str) {
        const ETHTOOL_STXCSUM: u32 = 0x17;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        let mut v = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        let mut ifr = netif::ifreq(ifname).unwrap();
        ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
        // SAFETY: a datagram socket for the ioctl; checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: just created, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both live.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
        assert_eq!(
            r,
            0,
            "ethtool -K {ifname} tx off: {}",
            io::Error::last_os_error()
        );
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_af_packet_ring_overrun_counts_kernel_drops() {
        let (ns, link) = veth("afpdrop");
        ns.run(|| {
            let cfg = RingConfig::new().with_rx_frames(8).with_tx_frames(2);
            let mut dev = AfPacketDev::open_with("v0", 0, 1, 0x4a04, cfg).expect("open v0");
            assert_eq!(dev.ring_config().rx_frames(), 8);
            let sock = UdpSocket::bind((link.kernel_ip, 7007)).unwrap();
            const SENT: usize = 100;
            for i in 0..SENT {
                sock.send_to(format!("burst {i}").as_bytes(), (link.dev_ip, 5007))
                    .unwrap();
            }
            // The ring holds 8 of them; the rest were dropped by the kernel, which the
            // device learns within a few thousand polls.
            let mut got = 0;
            let deadline = Instant::now() + testns::WAIT;
            loop {
                testns::poll_once(&mut dev, &mut |fr: &[u8], _| -> Option<()> {
                    let u = testns::parse_udp(fr)?;
                    got += usize::from(u.payload.starts_with(b"burst "));
                    None
                });
                let dropped = dev.stats().rx_dropped.load(Ordering::Relaxed) as usize;
                if got + dropped >= SENT {
                    assert!(got <= 8, "{got} received from an 8-slot ring");
                    assert!(dropped >= SENT - 8, "{dropped} dropped");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{got} received, {dropped} dropped"
                );
            }
        });
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_af_packet_tx_ring_fills_until_flushed() {
        let (ns, link) = veth("afptx");
        ns.run(|| {
            let cfg = RingConfig::new().with_tx_frames(2);
            let mut dev = AfPacketDev::open_with("v0", 0, 1, 0x4a05, cfg).expect("open v0");
            assert_eq!(dev.ring_config().tx_frames(), 2);
            let sink = UdpSocket::bind((link.kernel_ip, 7008)).unwrap();
            sink.set_read_timeout(Some(testns::WAIT)).unwrap();
            let src = SocketAddrV4::new(link.dev_ip, 4008);
            let dst = SocketAddrV4::new(link.kernel_ip, 7008);
            let tx = &mut dev.tx;
            for i in 0..2u8 {
                assert!(tx.ready(), "slot {i} free");
                let f = testns::udp_frame(link.dev_mac, link.kernel_mac, src, dst, &[i]);
                tx.send(f.len(), |b| b.copy_from_slice(&f));
            }
            assert!(!tx.ready(), "both slots wait for the flush");
            // A frame offered anyway is dropped and counted, not queued.
            let f = testns::udp_frame(link.dev_mac, link.kernel_mac, src, dst, &[9]);
            tx.send(f.len(), |b| b.copy_from_slice(&f));
            assert_eq!(dev.stats.tx_dropped.load(Ordering::Relaxed), 1);
            let tx = &mut dev.tx;
            tx.flush().unwrap();
            let mut buf = [0u8; 16];
            for i in 0..2u8 {
                let n = sink.recv(&mut buf).expect("queued frames go on flush");
                assert_eq!(&buf[..n], &[i]);
            }
            let deadline = Instant::now() + testns::WAIT;
            while !tx.ready() {
                assert!(Instant::now() < deadline, "slots never made available");
                std::thread::sleep(Duration::from_millis(1));
            }
            // A frame larger than the MTU allows is dropped, not sent.
            let f = testns::udp_frame(link.dev_mac, link.kernel_mac, src, dst, &[7; 1600]);
            tx.send(f.len(), |b| b.copy_from_slice(&f));
            tx.flush().unwrap();
            assert_eq!(dev.stats.tx_dropped.load(Ordering::Relaxed), 2);
            assert_eq!(dev.stats.tx_packets.load(Ordering::Relaxed), 2);
        });
    }
}

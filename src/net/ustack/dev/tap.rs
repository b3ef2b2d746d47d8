//! A queue of a multi-queue TAP device (the kernel's Documentation/networking/tuntap.rst).
//!
//! A TAP device is an Ethernet link with the kernel at one end and this process at the other:
//! what the kernel sends through the interface is read from the device's queues, and what is
//! written to a queue arrives at the kernel as if received from a wire. Every reactor opens
//! one queue of the same device (`IFF_MULTI_QUEUE`); the kernel creates the device when the
//! first queue is opened and removes it when the last one closes, unless it was made
//! persistent beforehand (`ip tuntap add NAME mode tap multi_queue`). It spreads the frames it
//! sends over the queues by flow hash, so every frame of one TCP connection reaches one
//! reactor (the queue a flow was last written from, once it has been).
//!
//! The kernel side of a TAP device is the peer, with the interface's own Ethernet address.
//! The stack therefore uses another address, derived from it: [`stack_mac`].
//!
//! No offloads are enabled (no `TUNSETOFFLOAD`, no `IFF_VNET_HDR`): the kernel completes
//! checksums and segments large sends itself before it hands a frame over, so every frame read
//! is checksummed and at most the MTU plus the link header (`RxInfo::csum_partial` is never
//! set). Frames written must be complete likewise: the kernel checks their checksums.
//!
//! Frames are read into and written from buffers allocated once per queue. A TAP device takes
//! one frame per `write(2)` (a `writev` would make one frame of its parts), so batching
//! frames until `flush` would save no system call; each frame is written as soon as it is
//! built, and `flush` only reports what went wrong since the last one. When a queue is not
//! read fast enough the kernel drops frames before they reach it; those drops appear as
//! transmit drops of the TAP interface (`ip -s link show NAME`), not in these counters.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use super::netif::{self, ETH_HLEN, VLAN_HLEN};
use super::{DevStats, NetDev, RxInfo, RxQueue, TxQueue};

/// The largest frame a TAP device hands over: the largest MTU it allows (65535) with a link
/// header and a VLAN tag. The receive buffer has this size, so it holds any frame even after
/// the MTU is raised.
const MAX_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;
/// Queues a TAP device may have (`MAX_TAP_QUEUES` in the kernel's tun driver).
const MAX_QUEUES: usize = 256;

/// The Ethernet address the stack uses on a TAP device whose interface has address `tap`:
/// locally administered (bit 1 of the first byte set), unicast (bit 0 clear), and the last
/// three bytes (the part that tells interfaces apart) inverted. It always differs from `tap`,
/// and every queue of the device derives the same one.
pub fn stack_mac(tap: [u8; 6]) -> [u8; 6] {
    let [a, b, c, d, e, f] = tap;
    [(a | 0x02) & !0x01, b, c, !d, !e, !f]
}

/// The receive half: one frame at a time, read into a buffer of the queue.
pub struct TapRx {
    fd: RawFd,
    buf: Box<[u8]>,
    /// Length of the frame waiting in `buf`.
    len: Option<usize>,
    /// Whether an unexpected read error was logged (once per queue).
    warned: bool,
    stats: Arc<DevStats>,
    name: String,
}

/// The transmit half: each frame is built in a buffer of the queue and written at once.
pub struct TapTx {
    fd: RawFd,
    buf: Vec<u8>,
    /// The first error since the last flush, reported by it.
    err: Option<io::Error>,
    stats: Arc<DevStats>,
}

/// One queue of a TAP device.
pub struct TapDev {
    rx: TapRx,
    tx: TapTx,
    mac: [u8; 6],
    tap_mac: [u8; 6],
    mtu: usize,
    stats: Arc<DevStats>,
    /// The queue's descriptor; both halves use it and are dropped with it.
    fd: OwnedFd,
}

impl TapDev {
    /// Opens queue `queue` of `nqueues` of TAP device `name`, creating the device if it does
    /// not exist (which needs CAP_NET_ADMIN) and then bringing it up. A device that exists is
    /// left as it is: it must be a multi-queue TAP device, and it must be up for frames to
    /// flow. The kernel numbers queues in the order they are attached; `queue` and `nqueues`
    /// are checked and name the queue in errors.
    pub fn open(name: &str, queue: usize, nqueues: usize) -> io::Result<TapDev> {
        const CAP: &str = "CAP_NET_ADMIN";
        let mut ifr = netif::ifreq(name)?;
        if name.contains('%') {
            // The kernel would make a new device for each queue from such a pattern.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: a TAP device needs a fixed name, not a pattern"),
            ));
        }
        if queue >= nqueues || nqueues > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: queue {queue} of {nqueues} (a TAP device has 1 to {MAX_QUEUES})"),
            ));
        }
        let ctx = |e: io::Error, what: &str| {
            netif::context(e, format_args!("{name} queue {queue}: {what}"), CAP)
        };

        let ctl = control_socket().map_err(|e| ctx(e, "control socket"))?;
        let existed = netif::index(ctl.as_raw_fd(), name).is_ok();

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::NotFound {
                    " (is the tun module loaded?)"
                } else {
                    ""
                };
                ctx(e, &format!("opening /dev/net/tun{hint}"))
            })?;
        let fd = OwnedFd::from(file);
        // The flags are small constants that fit the `short` the kernel reads.
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is.
        let r = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETIFF,
                &mut ifr as *mut libc::ifreq,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let what = match e.raw_os_error() {
                Some(libc::EINVAL) => {
                    "attaching (an interface of that name exists and is not a \
                                       multi-queue TAP device)"
                }
                Some(libc::E2BIG) => "attaching (the device has all the queues it may have)",
                _ => "attaching (TUNSETIFF)",
            };
            return Err(ctx(e, what));
        }

        let (_, tap_mac) =
            netif::hwaddr(ctl.as_raw_fd(), name).map_err(|e| ctx(e, "hardware address"))?;
        let mtu = netif::mtu(ctl.as_raw_fd(), name).map_err(|e| ctx(e, "MTU"))?;
        if !existed {
            netif::set_up(ctl.as_raw_fd(), name).map_err(|e| ctx(e, "bringing it up"))?;
        }

        let stats = Arc::new(DevStats::default());
        let raw = fd.as_raw_fd();
        Ok(TapDev {
            rx: TapRx {
                fd: raw,
                buf: vec![0; MAX_FRAME].into_boxed_slice(),
                len: None,
                warned: false,
                stats: stats.clone(),
                name: name.to_string(),
            },
            tx: TapTx {
                fd: raw,
                buf: vec![0; (mtu + ETH_HLEN + VLAN_HLEN).min(MAX_FRAME)],
                err: None,
                stats: stats.clone(),
            },
            mac: stack_mac(tap_mac),
            tap_mac,
            mtu,
            stats,
            fd,
        })
    }

    /// The TAP interface's own address: the kernel's end of the link, the stack's peer.
    pub fn tap_mac(&self) -> [u8; 6] {
        self.tap_mac
    }
}

/// A datagram socket for the netdevice ioctls, in the caller's network namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl RxQueue for TapRx {
    fn ready(&mut self) -> bool {
        if self.len.is_some() {
            return true;
        }
        // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => {
                self.len = Some(n);
                true
            }
            Ok(_) => false,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock
                    && e.kind() != io::ErrorKind::Interrupted
                    && !self.warned
                {
                    // EBADFD: the interface was deleted under the open queue.
                    self.warned = true;
                    log::warn!("{}: reading a frame: {e}", self.name);
                }
                false
            }
        }
    }

    fn recv<R>(&mut self, f: impl FnOnce(&mut [u8], RxInfo) -> R) -> Option<R> {
        if !self.ready() {
            return None;
        }
        let n = self.len.take()?;
        let frame = self.buf.get_mut(..n)?;
        DevStats::add(&self.stats.rx_packets, 1);
        DevStats::add(&self.stats.rx_bytes, n as u64);
        Some(f(frame, RxInfo::default()))
    }
}

impl TxQueue for TapTx {
    /// Always: frames are written as soon as they are built.
    fn ready(&mut self) -> bool {
        true
    }

    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if self.buf.len() < len {
            // Only if the MTU was raised after the queue was opened.
            self.buf.resize(len, 0);
        }
        let frame = &mut self.buf[..len];
        let r = f(frame);
        // SAFETY: `frame` is `len` initialised bytes, only read by the kernel.
        let n = unsafe { libc::write(self.fd, frame.as_ptr().cast(), len) };
        if usize::try_from(n) == Ok(len) {
            DevStats::add(&self.stats.tx_packets, 1);
            DevStats::add(&self.stats.tx_bytes, len as u64);
        } else {
            DevStats::add(&self.stats.tx_dropped, 1);
            let e = if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::new(io::ErrorKind::WriteZero, "frame written in part")
            };
            // EAGAIN, ENOBUFS: no memory for the frame now; a dropped frame, not a fault.
            let transient = matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS));
            if !transient && self.err.is_none() {
                self.err = Some(e);
            }
        }
        r
    }

    /// Reports the first error of a write since the last flush (EIO: the interface is down).
    fn flush(&mut self) -> io::Result<()> {
        match self.err.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl NetDev for TapDev {
    type Rx = TapRx;
    type Tx = TapTx;

    fn queues(&mut self) -> (&mut TapRx, &mut TapTx) {
        (&mut self.rx, &mut self.tx)
    }

    /// The stack's address, derived from the interface's ([`stack_mac`]).
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    /// The queue's descriptor: it polls readable while the kernel has a frame for it.
    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn stats(&self) -> &Arc<DevStats> {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_mac_is_local_unicast_and_differs() {
        let cases = [
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            [0x02, 0x00, 0x00, 0x00, 0x00, 0x00],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            [0x00, 0x1b, 0x21, 0xaa, 0xbb, 0xcc],
        ];
        for tap in cases {
            let m = stack_mac(tap);
            assert_eq!(m[0] & 0x02, 0x02, "{m:02x?}: locally administered");
            assert_eq!(m[0] & 0x01, 0, "{m:02x?}: unicast");
            assert_ne!(m, tap);
            assert_eq!(stack_mac(tap), m, "the same for every queue");
        }
        assert_eq!(
            stack_mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            [0x52, 0x54, 0x00, 0xed, 0xcb, 0xa9]
        );
        assert_eq!(
            stack_mac([0x00, 0x1b, 0x21, 0xaa, 0xbb, 0xcc]),
            [0x02, 0x1b, 0x21, 0x55, 0x44, 0x33]
        );
    }

    #[test]
    fn open_checks_its_arguments() {
        // All refused before anything is opened or created.
        for (name, q, n, want) in [
            ("tap%d", 0, 1, "fixed name"),
            ("tap0", 1, 1, "queue 1 of 1"),
            ("tap0", 0, 0, "queue 0 of 0"),
            ("tap0", 0, 257, "queue 0 of 257"),
            ("a/b", 0, 1, "not an interface name"),
        ] {
            let e = TapDev::open(name, q, n).err().unwrap();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}");
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    // Root and network namespaces from here on.

    use super::super::testns::{self, fmt_mac, Link, Netns};
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering;

    /// Tells the kernel side of `tap0` its address (10.78.0.1) and where the device's
    /// (10.78.0.2) is.
    fn configure(ns: &Netns, dev: &TapDev) -> Link {
        ns.ip("addr add 10.78.0.1/24 dev tap0");
        let link = Link {
            kernel_mac: ns.mac("tap0"),
            kernel_ip: Ipv4Addr::new(10, 78, 0, 1),
            dev_mac: dev.mac(),
            dev_ip: Ipv4Addr::new(10, 78, 0, 2),
        };
        ns.ip(&format!(
            "neigh replace {} lladdr {} dev tap0 nud permanent",
            link.dev_ip,
            fmt_mac(link.dev_mac)
        ));
        link
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_tap_frames_both_ways() {
        let ns = Netns::new("tap");
        ns.run(|| {
            let mut dev = TapDev::open("tap0", 0, 1).expect("open tap0");
            let show = ns.ip("link show dev tap0");
            assert!(show.contains(",UP"), "created and brought up: {show}");
            let link = configure(&ns, &dev);
            assert_eq!(dev.tap_mac(), link.kernel_mac);
            assert_eq!(dev.mac(), stack_mac(link.kernel_mac));
            assert_eq!(dev.mtu(), 1500);
            testns::arp_both_ways(std::slice::from_mut(&mut dev), &link);
            testns::udp_to_kernel(&mut dev, &link);
            testns::wakes_up(&mut dev, &link);
            let (u, info) = testns::udp_from_kernel(&mut dev, &link);
            // No offloads: the kernel checksums what it hands over.
            assert!(!info.csum_partial);
            assert!(u.csum_ok, "{u:?}");
            assert_eq!(dev.stats().tx_dropped.load(Ordering::Relaxed), 0);
            dev.tx.flush().expect("no write failed");

            // Down, the kernel refuses frames: counted, and the next flush says why.
            ns.ip("link set tap0 down");
            let f = testns::arp_request(&link);
            dev.tx.send(f.len(), |b| b.copy_from_slice(&f));
            assert_eq!(dev.stats().tx_dropped.load(Ordering::Relaxed), 1);
            let e = dev.tx.flush().expect_err("the write failed");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            dev.tx.flush().expect("reported once");
        });
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_tap_two_queues_share_the_flows() {
        let ns = Netns::new("tapmq");
        ns.run(|| {
            let mut devs = vec![
                TapDev::open("tap0", 0, 2).expect("open queue 0"),
                TapDev::open("tap0", 1, 2).expect("open queue 1"),
            ];
            assert_eq!(devs[0].mac(), devs[1].mac(), "one stack address per device");
            let link = configure(&ns, &devs[0]);
            testns::arp_both_ways(&mut devs, &link);
            let per_queue = testns::flows_over_queues(&mut devs, &link, 64);
            eprintln!("flows per queue: {per_queue:?}");
        });
    }

    #[test]
    #[ignore = "needs root and network namespaces: run by scripts/netns-test.sh"]
    fn netdev_tap_kernel_side_in_another_namespace() {
        // The queues are opened in one namespace (the target's), then the interface moves to
        // another (the initiator's): the open queues keep working.
        let target = Netns::new("taptgt");
        let peer = Netns::new("tappeer");
        let mut devs = target.run(|| {
            vec![
                TapDev::open("tap0", 0, 2).expect("open queue 0"),
                TapDev::open("tap0", 1, 2).expect("open queue 1"),
            ]
        });
        target.ip(&format!("link set tap0 netns {}", peer.name()));
        let show = target.ip("link show");
        assert!(!show.contains("tap0"), "moved away: {show}");
        peer.ip("link set tap0 up");
        let link = configure(&peer, &devs[0]);
        assert_eq!(
            devs[0].tap_mac(),
            link.kernel_mac,
            "the address moves with it"
        );
        peer.run(|| {
            testns::arp_both_ways(&mut devs, &link);
            testns::udp_to_kernel(&mut devs[1], &link);
            testns::flows_over_queues(&mut devs, &link, 16);
        });
        drop(devs);
        let show = peer.ip("link show");
        assert!(!show.contains("tap0"), "gone with its last queue: {show}");
    }
}

//! For the device tests that need root: fresh network namespaces, frames built and parsed by
//! hand, and the exchanges every kernel device must pass.
//!
//! A [`Netns`] is made with `ip netns add` under a name unique to the process (prefixed
//! `itgt-`, or `$ISCSI_TGT_NETNS_PREFIX-`), and deleted when it is dropped, also when the test
//! fails. [`Netns::run`] runs a closure on a thread that has
//! entered the namespace: sockets, devices and interface lookups made there belong to it,
//! while the test's own thread stays where it was. Every setup step panics with the command's
//! error output when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

use super::{NetDev, RxInfo, RxQueue, TxQueue};

/// How long a test waits for a frame that should come (generous: the machine is shared).
pub const WAIT: Duration = Duration::from_secs(10);

/// A network namespace of the test's own, deleted on drop.
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// A new namespace with its loopback up and IPv6 off: the kernel sends nothing on the
    /// test's links unless the test makes it.
    pub fn new(tag: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // The prefix keeps concurrent users of one machine apart (as netns-test.sh does).
        let prefix = std::env::var("ISCSI_TGT_NETNS_PREFIX").unwrap_or_else(|_| "itgt".into());
        let name = format!("{prefix}-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns.run(|| {
            // /proc/sys/net shows the namespace of the thread that opens it.
            for c in ["all", "default"] {
                let p = format!("/proc/sys/net/ipv6/conf/{c}/disable_ipv6");
                std::fs::write(&p, "1").unwrap_or_else(|e| panic!("{p}: {e}"));
            }
        });
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS` (split on white space); panics with its error if it fails.
    pub fn ip(&self, args: &str) -> String {
        let mut v = vec!["-n", &self.name];
        v.extend(args.split_whitespace());
        ip(&v)
    }

    /// The Ethernet address of an interface of the namespace.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        let out = self.ip(&format!("link show dev {ifname}"));
        let s = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether in {out}"));
        parse_mac(s)
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns (or its panic).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                enter(&self.name);
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// Moves the calling thread into namespace `name`.
pub fn enter(name: &str) {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    assert_eq!(parts.len(), 6, "{s}: not a MAC address");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    mac
}

pub fn fmt_mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// The two ends of a test link: the kernel's interface and the device under test.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub kernel_mac: [u8; 6],
    pub kernel_ip: Ipv4Addr,
    pub dev_mac: [u8; 6],
    pub dev_ip: Ipv4Addr,
}

pub fn arp_request(link: &Link) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(link.dev_mac),
        source_protocol_addr: link.dev_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: link.kernel_ip,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(link.dev_mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

pub fn parse_arp(frame: &[u8]) -> Option<ArpRepr> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()
}

/// A UDP datagram in an Ethernet frame, every checksum filled in.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(packet.payload_mut()),
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// A UDP datagram received in a frame.
#[derive(Debug)]
pub struct Udp {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
    /// Whether the UDP checksum verifies.
    pub csum_ok: bool,
}

/// The UDP datagram in an IPv4 frame (whose header checksum must verify), if it is one.
pub fn parse_udp(frame: &[u8]) -> Option<Udp> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let ipr = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()).ok()?;
    if ipr.next_header != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    let (s, d) = (IpAddress::Ipv4(ipr.src_addr), IpAddress::Ipv4(ipr.dst_addr));
    Some(Udp {
        src: SocketAddrV4::new(ipr.src_addr, udp.src_port()),
        dst: SocketAddrV4::new(ipr.dst_addr, udp.dst_port()),
        payload: udp.payload().to_vec(),
        csum_ok: udp.verify_checksum(&s, &d),
    })
}

/// Queues `frame` on the device (waiting for a free slot) and flushes.
pub fn send<D: NetDev>(dev: &mut D, frame: &[u8]) {
    let deadline = Instant::now() + WAIT;
    let (_, tx) = dev.queues();
    while !tx.ready() {
        assert!(Instant::now() < deadline, "the transmit queue stays full");
        std::thread::sleep(Duration::from_millis(1));
    }
    tx.send(frame.len(), |b| b.copy_from_slice(frame));
    tx.flush().expect("flush");
}

/// One pass over the device's receive queue: `f` on every frame waiting, until it returns
/// something.
pub fn poll_once<D: NetDev, T>(
    dev: &mut D,
    f: &mut impl FnMut(&[u8], RxInfo) -> Option<T>,
) -> Option<T> {
    let (rx, _) = dev.queues();
    while let Some(r) = rx.recv(|fr, info| f(fr, info)) {
        if r.is_some() {
            return r;
        }
    }
    None
}

/// Receives frames on any of the queues `devs` until `f` returns something; panics after
/// [`WAIT`] saying `what` never came.
pub fn recv_until<D: NetDev, T>(
    devs: &mut [D],
    what: &str,
    mut f: impl FnMut(&[u8], RxInfo) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        for dev in devs.iter_mut() {
            if let Some(t) = poll_once(dev, &mut f) {
                return t;
            }
        }
        assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The first queue asks who has the kernel's address; the kernel's answer comes back through
/// one of the queues (which one is the kernel's choice: an ARP frame has no flow).
pub fn arp_both_ways<D: NetDev>(devs: &mut [D], link: &Link) {
    send(&mut devs[0], &arp_request(link));
    let (hw, ip) = recv_until(devs, "ARP reply", |fr, _| match parse_arp(fr)? {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr,
            source_protocol_addr,
            target_hardware_addr,
            target_protocol_addr,
        } if target_protocol_addr == link.dev_ip => {
            assert_eq!(target_hardware_addr.0, link.dev_mac, "reply to our address");
            Some((source_hardware_addr.0, source_protocol_addr))
        }
        _ => None,
    });
    assert_eq!(hw, link.kernel_mac, "the kernel's interface answers");
    assert_eq!(ip, link.kernel_ip);
}

/// A datagram built by the test and sent through the device reaches a kernel UDP socket.
/// Must run inside the namespace.
pub fn udp_to_kernel<D: NetDev>(dev: &mut D, link: &Link) {
    let sock = UdpSocket::bind((link.kernel_ip, 7001)).expect("bind kernel socket");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let src = SocketAddrV4::new(link.dev_ip, 4001);
    let dst = SocketAddrV4::new(link.kernel_ip, 7001);
    let payload = b"through the device to the kernel";
    send(
        dev,
        &udp_frame(link.dev_mac, link.kernel_mac, src, dst, payload),
    );
    let mut buf = [0u8; 256];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("the kernel socket receives the device's datagram");
    assert_eq!(&buf[..n], payload);
    assert_eq!(from, std::net::SocketAddr::V4(src));
    assert!(dev.stats().tx_packets.load(Ordering::Relaxed) >= 1);
}

/// With its queue drained, the device's wait descriptor polls readable once the kernel sends
/// it a frame. Must run inside the namespace.
pub fn wakes_up<D: NetDev>(dev: &mut D, link: &Link) {
    while dev.queues().0.recv(|_, _| ()).is_some() {}
    let fd = dev.wait_fd().expect("a descriptor to wait on");
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    assert_eq!(
        unsafe { libc::poll(&mut p, 1, 0) },
        0,
        "readable while drained"
    );
    let sock = UdpSocket::bind((link.kernel_ip, 7005)).expect("bind kernel socket");
    sock.send_to(b"wake up", (link.dev_ip, 5005)).expect("send");
    let ms = libc::c_int::try_from(WAIT.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(
        r == 1 && p.revents & libc::POLLIN != 0,
        "not readable: {r}, {:#x}",
        p.revents
    );
    recv_until(std::slice::from_mut(dev), "wake-up datagram", |fr, _| {
        (parse_udp(fr)?.payload == b"wake up").then_some(())
    });
}

/// A kernel UDP socket's datagram comes out of the device. Needs a neighbour entry for the
/// device's address in the kernel. Returns what the device said about the frame.
pub fn udp_from_kernel<D: NetDev>(dev: &mut D, link: &Link) -> (Udp, RxInfo) {
    let sock = UdpSocket::bind((link.kernel_ip, 7002)).expect("bind kernel socket");
    let payload = b"from the kernel through the device";
    sock.send_to(payload, (link.dev_ip, 5002)).expect("send");
    let got = recv_until(
        std::slice::from_mut(dev),
        "datagram from the kernel",
        |fr, info| {
            let u = parse_udp(fr)?;
            (u.dst.port() == 5002).then_some((u, info))
        },
    );
    assert_eq!(got.0.payload, payload);
    assert_eq!(got.0.src, SocketAddrV4::new(link.kernel_ip, 7002));
    assert_eq!(got.0.dst, SocketAddrV4::new(link.dev_ip, 5002));
    assert!(dev.stats().rx_packets.load(Ordering::Relaxed) >= 1);
    got
}

/// `nflows` kernel UDP flows of three datagrams each, received over the queues `devs`: every
/// datagram arrives once, every flow on one queue, and every queue gets some. Returns the
/// number of flows each queue got.
pub fn flows_over_queues<D: NetDev>(devs: &mut [D], link: &Link, nflows: u16) -> Vec<usize> {
    const PER_FLOW: usize = 3;
    const DST_PORT: u16 = 9000;
    let socks: Vec<UdpSocket> = (0..nflows)
        .map(|i| UdpSocket::bind((link.kernel_ip, 20000 + i)).expect("bind flow socket"))
        .collect();
    for j in 0..PER_FLOW {
        for (i, s) in socks.iter().enumerate() {
            s.send_to(format!("flow {i} {j}").as_bytes(), (link.dev_ip, DST_PORT))
                .expect("send");
        }
    }
    // flow -> queue -> datagrams seen
    let mut seen: BTreeMap<u16, BTreeMap<usize, BTreeSet<Vec<u8>>>> = BTreeMap::new();
    let mut total = 0;
    let want = usize::from(nflows) * PER_FLOW;
    let deadline = Instant::now() + WAIT;
    while total < want {
        assert!(
            Instant::now() < deadline,
            "{total} of {want} datagrams within {WAIT:?}: {seen:?}"
        );
        for (q, dev) in devs.iter_mut().enumerate() {
            let mut f = |fr: &[u8], _: RxInfo| -> Option<()> {
                let u = parse_udp(fr)?;
                if u.dst.port() != DST_PORT {
                    return None;
                }
                let flow = u.src.port() - 20000;
                let fresh = seen
                    .entry(flow)
                    .or_default()
                    .entry(q)
                    .or_default()
                    .insert(u.payload.clone());
                assert!(
                    fresh,
                    "datagram {:?} twice",
                    String::from_utf8_lossy(&u.payload)
                );
                total += 1;
                None
            };
            poll_once(dev, &mut f);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut per_queue = vec![0; devs.len()];
    for (flow, queues) in &seen {
        assert_eq!(queues.len(), 1, "flow {flow} on several queues: {queues:?}");
        for q in queues.keys() {
            per_queue[*q] += 1;
        }
    }
    assert_eq!(seen.len(), usize::from(nflows));
    assert!(
        per_queue.iter().all(|&n| n > 0),
        "a queue got no flow: {per_queue:?}"
    );
    per_queue
}

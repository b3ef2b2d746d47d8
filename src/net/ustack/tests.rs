//! The stack over an in-memory wire, against a second smoltcp interface as the client.

use super::dev::mem::{pair, MemDev};
use super::link::Link;
use super::*;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, Ipv4Address};

const TGT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const INI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn cidr(s: &str) -> IpCidr {
    s.parse().unwrap()
}

/// A smoltcp client on the other end of the wire.
struct Client {
    iface: Interface,
    sockets: SocketSet<'static>,
    link: Link<MemDev>,
    base: Instant,
}

impl Client {
    fn new(dev: MemDev) -> Client {
        let mut link = Link::new(dev, ArpBus::new(1), 0, Arc::default());
        let cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(INI_MAC)));
        let mut iface = Interface::new(cfg, &mut link, SInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(cidr("10.9.0.1/24"));
        });
        Client {
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            base: Instant::now(),
        }
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        let rx = tcp::SocketBuffer::new(vec![0u8; 512 * 1024]);
        let tx = tcp::SocketBuffer::new(vec![0u8; 512 * 1024]);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.connect(
            self.iface.context(),
            (Ipv4Address::new(10, 9, 0, 2), 3260),
            port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    fn poll(&mut self, now: Instant) {
        let ts = SInstant::from_micros(now.duration_since(self.base).as_micros() as i64);
        self.iface.poll(ts, &mut self.link, &mut self.sockets);
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

fn target(devs: Vec<MemDev>, backlog: usize) -> UstackNet<MemDev> {
    let mut cfg = StackConfig::new(cidr("10.9.0.2/24"), None);
    cfg.backlog = backlog;
    cfg.rx_buf = BUF_MIN;
    cfg.tx_buf = BUF_MIN;
    UstackNet::new("mem", "mem0", cfg, &["0.0.0.0:3260".parse().unwrap()], devs).unwrap()
}

/// Runs both ends in virtual time until `done` or a (virtual) minute passes.
fn run(
    g: &mut UstackGroup<MemDev>,
    c: &mut Client,
    clock: &mut Instant,
    mut step: impl FnMut(&mut UstackGroup<MemDev>, &mut Client, &[Event]) -> bool,
) {
    let end = *clock + Duration::from_secs(60);
    let mut ev = Vec::new();
    while *clock < end {
        c.poll(*clock);
        ev.clear();
        g.poll(*clock, &mut ev).unwrap();
        if step(g, c, &ev) {
            return;
        }
        g.flush(*clock);
        *clock += Duration::from_millis(1);
    }
    panic!("did not finish within a virtual minute");
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Moves `len` bytes each way over one connection and checks every byte.
fn round_trip(drop_every: u64, len: usize) -> (UstackNet<MemDev>, UstackGroup<MemDev>) {
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, drop_every);
    let net = target(vec![t], 4);
    let mut g = net.group_of(0).unwrap();
    let mut c = Client::new(i);
    let h = c.connect(40000);
    let mut clock = Instant::now();
    let mut conn = None;
    run(&mut g, &mut c, &mut clock, |g, _, ev| {
        if ev.contains(&Event::Accept(0)) {
            conn = g.accept(0).unwrap();
        }
        conn.is_some()
    });
    let s = conn.unwrap();
    let (peer, local) = g.addrs(s);
    assert_eq!(peer, "10.9.0.1:40000".parse().unwrap());
    assert_eq!(local, "10.9.0.2:3260".parse().unwrap());
    let (mut sent_c, mut got_t, mut sent_t, mut got_c) = (0, 0, 0, 0);
    let mut buf = vec![0u8; 100_000];
    run(&mut g, &mut c, &mut clock, |g, c, _| {
        // Client → target.
        let cs = c.sock(h);
        while sent_c < len && cs.can_send() {
            let chunk: Vec<u8> = (sent_c..len.min(sent_c + 9000)).map(pattern).collect();
            sent_c += cs.send_slice(&chunk).unwrap();
        }
        loop {
            match g.recv(s, &mut buf) {
                Ok(n) => {
                    assert!(n > 0, "no end of stream expected");
                    for (k, b) in buf[..n].iter().enumerate() {
                        assert_eq!(*b, pattern(got_t + k), "byte {} to the target", got_t + k);
                    }
                    got_t += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("target recv: {e}"),
            }
        }
        // Target → client, vectored.
        while sent_t < len {
            let a: Vec<u8> = (sent_t..len.min(sent_t + 3000)).map(pattern).collect();
            let b: Vec<u8> = (sent_t + a.len()..len.min(sent_t + a.len() + 5000))
                .map(pattern)
                .collect();
            match g.send_vectored(s, &[IoSlice::new(&a), IoSlice::new(&b)]) {
                Ok(n) => sent_t += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("target send: {e}"),
            }
        }
        let cs = c.sock(h);
        while cs.can_recv() {
            let n = cs.recv_slice(&mut buf).unwrap();
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got_c + k), "byte {} to the client", got_c + k);
            }
            got_c += n;
        }
        got_t == len && got_c == len
    });
    let info = g.info(s).unwrap();
    assert_eq!(info.state, "ESTABLISHED");
    // Close from the target: the client sees the end of the stream, the socket lingers
    // until the handshake ends, then leaves the set.
    g.close(s);
    g.release(s);
    assert!(g.info(s).is_none());
    run(&mut g, &mut c, &mut clock, |g, c, _| {
        let cs = c.sock(h);
        if cs.state() == tcp::State::CloseWait {
            cs.close();
        }
        g.stack.lingering() == 0
    });
    (net, g)
}

#[test]
fn bytes_cross_both_ways_intact() {
    let (net, _g) = round_trip(0, 3 << 20);
    let c = &net.counters()[0];
    let get = |k: &str| c.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(get("tcp_retransmits"), "0");
    assert_eq!(get("accepted"), "1");
    assert!(get("rx_packets").parse::<u64>().unwrap() > 2000);
}

#[test]
fn losses_are_retransmitted_and_counted() {
    // Every 37th frame lost each way.
    let (net, _g) = round_trip(37, 2 << 20);
    let c = &net.counters()[0];
    let get = |k: &str| c.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert!(get("tcp_retransmits").parse::<u64>().unwrap() > 0);
    assert!(get("tx_dropped").parse::<u64>().unwrap() > 0);
}

#[test]
fn more_connections_than_the_backlog_are_all_accepted() {
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let net = target(vec![t], 2);
    let mut g = net.group_of(0).unwrap();
    let mut c = Client::new(i);
    let hs: Vec<_> = (0..10).map(|k| c.connect(41000 + k)).collect();
    let mut clock = Instant::now();
    let mut accepted = Vec::new();
    run(&mut g, &mut c, &mut clock, |g, _, ev| {
        if ev.contains(&Event::Accept(0)) {
            while let Some(s) = g.accept(0).unwrap() {
                accepted.push(s);
            }
        }
        accepted.len() == hs.len()
    });
    // Connections refused while the backlog was full were retried by the client's SYN
    // retransmission; every handle is distinct.
    let mut ids = accepted.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10);
}

#[test]
fn a_reset_reads_as_an_error_and_a_fin_as_end_of_stream() {
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let net = target(vec![t], 2);
    let mut g = net.group_of(0).unwrap();
    let mut c = Client::new(i);
    let h1 = c.connect(42001);
    let h2 = c.connect(42002);
    let mut clock = Instant::now();
    let mut acc = Vec::new();
    run(&mut g, &mut c, &mut clock, |g, _, _| {
        while let Some(s) = g.accept(0).unwrap() {
            acc.push(s);
        }
        acc.len() == 2
    });
    let by_port =
        |g: &UstackGroup<MemDev>, p: u16| *acc.iter().find(|s| g.addrs(**s).0.port() == p).unwrap();
    let (s1, s2) = (by_port(&g, 42001), by_port(&g, 42002));
    c.sock(h1).close();
    c.sock(h2).abort();
    let mut buf = [0u8; 16];
    let (mut eof, mut reset) = (false, false);
    run(&mut g, &mut c, &mut clock, |g, _, ev| {
        for e in ev {
            if let Event::Sock(s, r) = e {
                assert!(r.readable);
                if *s == s1 && g.recv(s1, &mut buf).ok() == Some(0) {
                    eof = true;
                }
                if *s == s2 {
                    if let Err(e) = g.recv(s2, &mut buf) {
                        reset |= e.kind() == io::ErrorKind::ConnectionReset;
                    }
                }
            }
        }
        eof && reset
    });
}

#[test]
fn configuration_is_checked() {
    let mut c = StackConfig::new(cidr("10.0.0.1/24"), None);
    assert!(c.validate().is_ok());
    c.set("tx_buf", "4194304").unwrap();
    c.set("ack_delay_us", "200").unwrap();
    c.set("nagle", "1").unwrap();
    assert_eq!(c.tx_buf, 4 << 20);
    assert_eq!(c.ack_delay, Some(Duration::from_micros(200)));
    assert!(c.nagle);
    assert!(c.set("nagle", "yes").unwrap_err().contains("0 or 1"));
    assert!(c.set("window", "1").unwrap_err().contains("unknown"));
    assert!(c.set("rx_buf", "big").unwrap_err().contains("not a number"));
    c.set("tx_buf", "8388608").unwrap();
    assert!(c.validate().unwrap_err().contains("tx_buf"));
    c.tx_buf = BUF_MIN;
    c.rx_buf = 1024;
    assert!(c.validate().unwrap_err().contains("rx_buf"));
    c.rx_buf = BUF_MIN;
    c.syn_timeout = Duration::MAX;
    assert!(c.validate().unwrap_err().contains("syn_timeout_ms"));
    c.syn_timeout = Duration::from_secs(1);
    c.linger = Duration::MAX;
    assert!(c.validate().unwrap_err().contains("linger_ms"));
    let c = StackConfig::new(cidr("10.0.0.1/24"), Some("fe80::1".parse().unwrap()));
    assert!(c.validate().unwrap_err().contains("gateway"));
    let (t, _) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let e = UstackNet::new(
        "mem",
        "mem0",
        StackConfig::new(cidr("10.9.0.2/24"), None),
        &["10.9.0.3:3260".parse().unwrap()],
        vec![t],
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("not on the stack's address"));
    // smoltcp takes only a unicast address for its interface (and panics otherwise).
    for ip in ["255.255.255.255/32", "224.0.0.1/24", "0.0.0.0/0"] {
        let (t, _) = pair([TGT_MAC, INI_MAC], 1500, 0);
        let e = UstackNet::new(
            "mem",
            "mem0",
            StackConfig::new(cidr(ip), None),
            &[],
            vec![t],
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("not a unicast address"), "{ip}: {e}");
        let (_, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
        let e = ClientStack::new(i, StackConfig::new(cidr(ip), None))
            .err()
            .expect("an error, not a stack");
        assert!(e.to_string().contains("not a unicast address"), "{ip}: {e}");
    }
}

#[test]
fn partial_checksums_are_completed() {
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};
    // A TCP segment with a correct checksum, then spoiled as an offloading kernel leaves it.
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let mut c = Client::new(i);
    let _h = c.connect(43000);
    c.poll(Instant::now());
    let _ = t;
    // The client's first frame is an ARP request; build a TCP frame by hand instead.
    let mut frame = vec![0u8; 14 + 20 + 20 + 4];
    {
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_ethertype(smoltcp::wire::EthernetProtocol::Ipv4);
    }
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(44);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_src_addr(Ipv4Address::new(10, 9, 0, 1));
        ip.set_dst_addr(Ipv4Address::new(10, 9, 0, 2));
        ip.fill_checksum();
    }
    {
        let mut tcpp = TcpPacket::new_unchecked(&mut frame[34..]);
        tcpp.set_src_port(1);
        tcpp.set_dst_port(2);
        tcpp.set_header_len(20);
        tcpp.payload_mut().copy_from_slice(b"data");
        tcpp.set_checksum(0x1234);
    }
    assert!(link::complete_checksum(&mut frame));
    let tcpp = TcpPacket::new_checked(&frame[34..]).unwrap();
    let (s, d) = (
        IpAddress::from(Ipv4Address::new(10, 9, 0, 1)),
        IpAddress::from(Ipv4Address::new(10, 9, 0, 2)),
    );
    assert!(tcpp.verify_checksum(&s, &d));
}

use smoltcp::wire::IpProtocol;

/// A TCP frame from 10.9.0.1:5000 to 10.9.0.2:3260 with the given ACK, payload and options.
fn tcp_frame(seq: u32, ack: u32, payload: &[u8], options: &[u8]) -> Vec<u8> {
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket, TcpSeqNumber};
    let tcp_len = 20 + options.len() + payload.len();
    let mut frame = vec![0u8; 14 + 20 + tcp_len];
    EthernetFrame::new_unchecked(&mut frame[..])
        .set_ethertype(smoltcp::wire::EthernetProtocol::Ipv4);
    let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
    ip.set_version(4);
    ip.set_header_len(20);
    ip.set_total_len((20 + tcp_len) as u16);
    ip.set_hop_limit(64);
    ip.set_next_header(IpProtocol::Tcp);
    ip.set_src_addr(Ipv4Address::new(10, 9, 0, 1));
    ip.set_dst_addr(Ipv4Address::new(10, 9, 0, 2));
    ip.fill_checksum();
    let mut t = TcpPacket::new_unchecked(&mut frame[34..]);
    t.set_src_port(5000);
    t.set_dst_port(3260);
    t.set_seq_number(TcpSeqNumber(seq as i32));
    t.set_ack_number(TcpSeqNumber(ack as i32));
    t.set_header_len((20 + options.len()) as u8);
    t.set_ack(true);
    t.set_psh(!payload.is_empty());
    t.set_window_len(1000);
    t.options_mut().copy_from_slice(options);
    t.payload_mut().copy_from_slice(payload);
    t.fill_checksum(
        &IpAddress::from(Ipv4Address::new(10, 9, 0, 1)),
        &IpAddress::from(Ipv4Address::new(10, 9, 0, 2)),
    );
    frame
}

fn sack(left: u32, right: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 5, 10];
    o.extend_from_slice(&left.to_be_bytes());
    o.extend_from_slice(&right.to_be_bytes());
    o
}

#[test]
fn an_ack_with_sack_beyond_a_hole_is_recognised() {
    assert!(link::sack_hole(&tcp_frame(1, 1000, &[], &sack(2460, 9000))));
    // A D-SACK (a block below the ACK), plain ACKs and data segments are not holes.
    assert!(!link::sack_hole(&tcp_frame(
        1,
        9000,
        &[],
        &sack(1000, 2460)
    )));
    assert!(!link::sack_hole(&tcp_frame(1, 1000, &[], &[])));
    assert!(!link::sack_hole(&tcp_frame(
        1,
        1000,
        b"data",
        &sack(2460, 9000)
    )));
    // A malformed option list ends the scan without a panic.
    assert!(!link::sack_hole(&tcp_frame(1, 1000, &[], &[5, 40, 0, 0])));
    // Wrapping sequence space: a block just past an ACK near 2^32.
    assert!(link::sack_hole(&tcp_frame(
        1,
        u32::MAX - 10,
        &[],
        &sack(5, 1000)
    )));
}

#[test]
fn a_probe_template_is_a_valid_pure_ack_after_the_segment() {
    use smoltcp::wire::{Ipv4Packet, TcpPacket};
    let mut p = link::Probes::default();
    let payload = [0x42u8; 48];
    let seg = tcp_frame(7000, 1234, &payload, &[]);
    p.note_for_test(&seg);
    let key = (IpAddress::from(Ipv4Address::new(10, 9, 0, 1)), 5000, 3260);
    let f = p.flows.get_mut(&key).expect("the flow is recorded");
    let ack = f.frame();
    let ip = Ipv4Packet::new_checked(&ack[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.total_len(), 40);
    let t = TcpPacket::new_checked(&ack[34..]).unwrap();
    assert!(t.payload().is_empty());
    assert!(!t.psh());
    assert_eq!(t.seq_number().0 as u32, 7000 + 48);
    assert_eq!(t.ack_number().0 as u32, 1234);
    assert!(t.verify_checksum(
        &IpAddress::from(Ipv4Address::new(10, 9, 0, 1)),
        &IpAddress::from(Ipv4Address::new(10, 9, 0, 2))
    ));
}

#[test]
fn a_frame_left_to_the_device_gets_the_pseudo_header_sum_and_its_segmentation() {
    use smoltcp::wire::TcpPacket;
    let payload = vec![0x5au8; 3000];
    let mut f = tcp_frame(1, 2, &payload, &[]);
    // smoltcp leaves the field zero when the device checksums.
    f[34 + 16] = 0;
    f[34 + 17] = 0;
    let m = link::offload_meta(&mut f, Some(1460));
    assert_eq!(m.csum, Some((34, 16)));
    let g = m.gso.expect("3000 bytes at an MSS of 1460 are segmented");
    assert_eq!((g.mss, g.hdr_len, g.ipv6), (1460, 54, false));
    // What the device does: the one's complement sum of the segment, from the field's value.
    let mut acc: u32 = 0;
    for c in f[34..].chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let sum = !(acc as u16);
    f[34 + 16..34 + 18].copy_from_slice(&sum.to_be_bytes());
    let t = TcpPacket::new_checked(&f[34..]).unwrap();
    assert!(t.verify_checksum(
        &IpAddress::from(Ipv4Address::new(10, 9, 0, 1)),
        &IpAddress::from(Ipv4Address::new(10, 9, 0, 2))
    ));
    // A frame within one segment is not segmented; a non-TCP frame needs nothing.
    let mut small = tcp_frame(1, 2, b"x", &[]);
    assert!(link::offload_meta(&mut small, Some(1460)).gso.is_none());
    let mut arp = vec![0u8; 60];
    arp[12] = 0x08;
    arp[13] = 0x06;
    assert_eq!(link::offload_meta(&mut arp, Some(1460)), Default::default());
}

#[test]
fn a_segment_of_a_flow_held_by_another_queue_is_dropped_not_answered() {
    use smoltcp::wire::TcpPacket;
    let mut f = link::FlowFilter::default();
    let data = tcp_frame(1, 1, b"x", &[]);
    assert!(
        !f.foreign(&data),
        "one queue: every segment goes to the stack"
    );
    f.on = true;
    assert!(f.foreign(&data), "a flow this queue holds no socket for");
    let mut syn = tcp_frame(1, 0, &[], &[]);
    {
        let mut t = TcpPacket::new_unchecked(&mut syn[34..]);
        t.set_syn(true);
        t.set_ack(false);
    }
    assert!(!f.foreign(&syn), "a SYN opens a flow wherever it lands");
    f.known
        .insert((IpAddress::from(Ipv4Address::new(10, 9, 0, 1)), 5000, 3260));
    assert!(!f.foreign(&data), "a flow this queue holds");
    let mut other = data.clone();
    TcpPacket::new_unchecked(&mut other[34..]).set_src_port(5001);
    assert!(f.foreign(&other), "another port of the same peer");
    let mut arp = data.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert!(!f.foreign(&arp), "not TCP");
}

// ------------------------------------------------------------------ the client side

use super::client::{ClientStack, ClientStream};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// The client's stack at 10.9.0.1 over `dev`, connects giving up after `syn_ms`.
fn client_stack(dev: MemDev, gateway: Option<IpAddr>, syn_ms: u64) -> ClientStack<MemDev> {
    let mut cfg = StackConfig::new(cidr("10.9.0.1/24"), gateway);
    cfg.set("syn_timeout_ms", &syn_ms.to_string()).unwrap();
    // A close that never finishes is reset after this, long after any test gives up.
    cfg.set("linger_ms", "600000").unwrap();
    ClientStack::new(dev, cfg).unwrap()
}

/// A target group on its own thread, serving its first connection: it checks that `len`
/// bytes of the pattern arrive, sends `len` bytes of the pattern, and runs until told to
/// stop. Returns (bytes received intact, whether the client's FIN was seen).
fn serve(
    mut g: UstackGroup<MemDev>,
    len: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, bool)> {
    std::thread::spawn(move || {
        let mut ev = Vec::new();
        let mut conn = None;
        let (mut got, mut sent, mut eof) = (0, 0, false);
        let mut buf = vec![0u8; 64 * 1024];
        let out: Vec<u8> = (0..len).map(pattern).collect();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            ev.clear();
            g.poll(now, &mut ev).unwrap();
            if conn.is_none() {
                conn = g.accept(0).unwrap();
            }
            if let Some(s) = conn {
                loop {
                    match g.recv(s, &mut buf) {
                        Ok(0) => {
                            eof = true;
                            g.close(s);
                            break;
                        }
                        Ok(n) => {
                            for (k, b) in buf[..n].iter().enumerate() {
                                assert_eq!(*b, pattern(got + k), "byte {} to the target", got + k);
                            }
                            got += n;
                        }
                        Err(_) => break,
                    }
                }
                if sent < len {
                    if let Ok(n) = g.send_vectored(s, &[IoSlice::new(&out[sent..])]) {
                        sent += n;
                    }
                }
            }
            g.flush(now);
        }
        (got, eof)
    })
}

#[test]
fn the_client_moves_mebibytes_both_ways_intact() {
    let len = 4 << 20;
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let net = target(vec![t], 4);
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(net.group_of(0).unwrap(), len, stop.clone());
    let stack = client_stack(i, None, 5000);
    let mut s: ClientStream<MemDev> = stack.connect("10.9.0.2:3260".parse().unwrap()).unwrap();
    assert_eq!(s.peer_addr(), "10.9.0.2:3260".parse().unwrap());
    let local = s.local_addr();
    assert_eq!(local.ip(), "10.9.0.1".parse::<IpAddr>().unwrap());
    assert!(local.port() >= 49152, "{local}");
    assert_eq!(s.state(), "ESTABLISHED");
    let out: Vec<u8> = (0..len).map(pattern).collect();
    // Uneven writes, each taken in part or whole.
    for chunk in out.chunks(70_001) {
        s.write_all(chunk).unwrap();
    }
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).unwrap();
    if let Some(k) = back.iter().enumerate().position(|(k, b)| *b != pattern(k)) {
        panic!("byte {k} to the client differs");
    }
    drop(s);
    // The FIN reaches the target, which closes its side; the client's socket is retired.
    assert!(
        stack.finish(Duration::from_secs(30)),
        "the close did not finish"
    );
    stop.store(true, Ordering::Relaxed);
    let (got, eof) = server.join().unwrap();
    assert_eq!(got, len);
    assert!(eof, "the target saw no end of stream");
    let (dev, _) = stack.stats();
    assert!(dev.rx_packets.load(Ordering::Relaxed) > 2000);
    // Retransmits are not asserted: on a loaded machine a thread descheduled for longer than
    // the tail-loss probe's 50 ms makes its peer probe, which is correct and counted as one.
    assert_eq!(dev.tx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn the_client_reads_a_fin_as_end_of_stream_and_a_reset_as_an_error() {
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let net = target(vec![t], 4);
    let mut g = net.group_of(0).unwrap();
    let stack = client_stack(i, None, 5000);
    let (tx, rx) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut a = stack.connect("10.9.0.2:3260".parse().unwrap()).unwrap();
        let mut b = stack.connect("10.9.0.2:3260".parse().unwrap()).unwrap();
        tx.send((a.local_addr().port(), b.local_addr().port()))
            .unwrap();
        let mut buf = [0u8; 16];
        // The target closes `a` in order and resets `b`.
        let eof = a.read(&mut buf).map_err(|e| e.to_string());
        let reset = b.read(&mut buf).map_err(|e| (e.kind(), e.to_string()));
        let write = b.write(b"more").map_err(|e| e.kind());
        (eof, reset, write)
    });
    let mut acc = Vec::new();
    let mut ports = None;
    let mut done = false;
    let mut ev = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while !client.is_finished() && Instant::now() < end {
        let now = Instant::now();
        ev.clear();
        g.poll(now, &mut ev).unwrap();
        while let Some(s) = g.accept(0).unwrap() {
            acc.push(s);
        }
        if ports.is_none() {
            ports = rx.try_recv().ok();
        }
        if let (false, Some((pa, pb))) = (done, ports) {
            let by_port = |p: u16| acc.iter().copied().find(|s| g.addrs(*s).0.port() == p);
            if let (Some(sa), Some(sb)) = (by_port(pa), by_port(pb)) {
                g.close(sa);
                let h = g.conns[sb.0].as_ref().unwrap().handle;
                g.stack.sockets.get_mut::<tcp::Socket>(h).abort();
                done = true;
            }
        }
        g.flush(now);
    }
    let (eof, reset, write) = client.join().unwrap();
    assert_eq!(eof, Ok(0));
    let (kind, msg) = reset.unwrap_err();
    assert_eq!(kind, io::ErrorKind::ConnectionReset);
    assert!(msg.contains("reset by 10.9.0.2:3260"), "{msg}");
    assert_eq!(write.unwrap_err(), io::ErrorKind::ConnectionReset);
}

#[test]
fn a_closed_port_refuses_the_client() {
    let (t, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let net = target(vec![t], 4);
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(net.group_of(0).unwrap(), 0, stop.clone());
    let stack = client_stack(i, None, 5000);
    let e = stack
        .connect("10.9.0.2:3261".parse().unwrap())
        .err()
        .expect("nothing listens on 3261");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    // A reset, not the timeout (TimedOut), ended it.
    assert_eq!(e.to_string(), "connection to 10.9.0.2:3261 refused (reset)");
}

#[test]
fn a_next_hop_that_never_answers_arp_times_the_connect_out() {
    // Nothing on the other end of the wire.
    let (_, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let stack = client_stack(i, Some("10.9.0.254".parse().unwrap()), 300);
    let e = stack
        .connect("10.9.0.2:3260".parse().unwrap())
        .err()
        .expect("no one answers");
    assert_eq!(e.kind(), io::ErrorKind::HostUnreachable);
    assert!(
        e.to_string()
            .contains("no ARP answer from 10.9.0.2 within 300ms"),
        "{e}"
    );
    // Off the subnet, the gateway is the one asked.
    let e = stack
        .connect("10.8.0.2:3260".parse().unwrap())
        .err()
        .expect("no one answers");
    assert!(
        e.to_string().contains("no ARP answer from 10.9.0.254"),
        "{e}"
    );
    // Off the subnet without a gateway there is no route at all.
    let (_, i) = pair([TGT_MAC, INI_MAC], 1500, 0);
    let e = client_stack(i, None, 300)
        .connect("10.8.0.2:3260".parse().unwrap())
        .err()
        .expect("no route");
    assert_eq!(e.kind(), io::ErrorKind::NetworkUnreachable);
    assert_eq!(
        e.to_string(),
        "no route to 10.8.0.2:3260: not on 10.9.0.1/24 and no gateway"
    );
    for bad in ["10.9.0.1:3260", "10.9.0.2:0", "[fd00::1]:3260"] {
        let e = stack.connect(bad.parse().unwrap()).err().expect(bad);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}: {e}");
    }
}

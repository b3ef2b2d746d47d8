//! The device as smoltcp sees it: a frame device's queue pair, plus what every device needs
//! once: ARP shared between the reactors, transport checksums completed for frames a local
//! kernel left to offload, and retransmitted segments counted on the way out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

use super::dev::{Gso, NetDev, RxInfo, RxQueue, TxMeta, TxQueue};

/// Ethernet header length.
pub const ETH_HDR: usize = 14;
/// An ARP frame with its padding (60 bytes on the wire without the FCS).
const ARP_FRAME_MAX: usize = 64;
/// ARP frames waiting for one reactor; more are dropped (ARP retries).
const ARP_QUEUE: usize = 256;
/// The largest pure ACK replayed (Ethernet, IPv6 and TCP headers with options).
const ACK_FRAME_MAX: usize = 14 + 40 + 60;
/// Copies of a SACK-bearing ACK handed to the stack after it: with the original, enough
/// duplicates for its fast retransmit (3).
const SACK_REPLAYS: u8 = 3;
/// The largest header (Ethernet, IP with options, TCP with options) kept as a probe template.
const PROBE_FRAME_MAX: usize = 14 + 60 + 60;

/// An ARP frame copied for another reactor.
#[derive(Clone, Copy)]
pub struct ArpFrame {
    len: u8,
    data: [u8; ARP_FRAME_MAX],
}

/// Every reactor's ARP inbox. A reply lands on whichever queue the device's flow hash picks;
/// each reactor's interface must still learn the neighbour, so every ARP frame a queue
/// receives is handed to the other reactors as well.
pub struct ArpBus {
    inboxes: Vec<(Sender<ArpFrame>, Receiver<ArpFrame>)>,
}

impl ArpBus {
    /// The reactors (queues) it joins.
    pub fn reactors(&self) -> usize {
        self.inboxes.len()
    }

    pub fn new(reactors: usize) -> Arc<ArpBus> {
        Arc::new(ArpBus {
            inboxes: (0..reactors)
                .map(|_| crossbeam_channel::bounded(ARP_QUEUE))
                .collect(),
        })
    }
}

/// Counters of one reactor's stack, readable from any thread.
#[derive(Debug, Default)]
pub struct StackStats {
    /// TCP segments sent again (by timeout or fast retransmit).
    pub retransmits: AtomicU64,
    /// ARP frames passed to the other reactors, and taken from them.
    pub arp_shared: AtomicU64,
    pub arp_injected: AtomicU64,
    /// Frames whose transport checksum was completed here (partial checksums of a local
    /// kernel's offload).
    pub csum_completed: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// ACKs with SACK replayed to start a fast retransmit (see [`sack_hole`]).
    pub sack_replayed: AtomicU64,
    /// Tail-loss probes: retransmissions started after the peer fell silent (see
    /// [`Probes`]).
    pub tail_probes: AtomicU64,
    /// TCP segments of flows this reactor holds no socket for, dropped (see [`FlowFilter`]).
    pub misrouted: AtomicU64,
}

impl StackStats {
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        vec![
            ("tcp_retransmits".into(), g(&self.retransmits)),
            ("arp_shared".into(), g(&self.arp_shared)),
            ("arp_injected".into(), g(&self.arp_injected)),
            ("csum_completed".into(), g(&self.csum_completed)),
            ("accepted".into(), g(&self.accepted)),
            ("sack_replayed".into(), g(&self.sack_replayed)),
            ("tail_probes".into(), g(&self.tail_probes)),
            ("misrouted".into(), g(&self.misrouted)),
        ]
    }
}

/// A TCP flow as the transmit side sees it: (remote address, remote port, local port).
pub type FlowKey = (IpAddress, u16, u16);

/// The highest sequence number sent per flow, to recognise a segment sent again, and how
/// many were.
pub struct Retransmits {
    /// Per flow: the highest sequence number sent, segments sent again, and when new data
    /// last went out.
    flows: HashMap<FlowKey, (u32, u64, SInstant)>,
    /// The time of the current poll.
    pub now: SInstant,
}

impl Default for Retransmits {
    fn default() -> Self {
        Retransmits {
            flows: HashMap::new(),
            now: SInstant::ZERO,
        }
    }
}

impl Retransmits {
    /// Looks at an outgoing frame; returns whether it retransmits data already sent.
    fn note(&mut self, frame: &[u8]) -> bool {
        let Some((src, dst, proto, l4)) = ip_payload(frame) else {
            return false;
        };
        let _ = src;
        if proto != IpProtocol::Tcp {
            return false;
        }
        let Ok(tcp) = TcpPacket::new_checked(l4) else {
            return false;
        };
        let mut len = tcp.payload().len() as u32;
        if tcp.syn() {
            len += 1;
        }
        if tcp.fin() {
            len += 1;
        }
        if len == 0 {
            return false;
        }
        let seq = tcp.seq_number().0 as u32;
        let end = seq.wrapping_add(len);
        let key = (dst, tcp.dst_port(), tcp.src_port());
        let now = self.now;
        let e = self.flows.entry(key).or_insert((seq, 0, now));
        // Sequence space wraps: `end` at or before the highest end sent is a resend.
        if (end.wrapping_sub(e.0) as i32) <= 0 && !tcp.syn() {
            e.1 += 1;
            true
        } else {
            e.0 = end;
            e.2 = now;
            false
        }
    }

    /// Segments of `key` sent again.
    pub fn of(&self, key: &FlowKey) -> u64 {
        self.flows.get(key).map_or(0, |e| e.1)
    }

    /// When new data of `key` last went out.
    pub fn last_sent(&self, key: &FlowKey) -> Option<SInstant> {
        self.flows.get(key).map(|e| e.2)
    }

    pub fn forget(&mut self, key: &FlowKey) {
        self.flows.remove(key);
    }
}

/// Splits an Ethernet frame into its IP addresses, transport protocol and transport bytes.
fn ip_payload(frame: &[u8]) -> Option<(IpAddress, IpAddress, IpProtocol, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let payload = frame.get(ETH_HDR..)?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(payload).ok()?;
            let hl = ip.header_len() as usize;
            let total = usize::from(ip.total_len());
            let l4 = payload.get(hl..total)?;
            Some((
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.next_header(),
                l4,
            ))
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(payload).ok()?;
            let l4 = payload.get(40..40 + usize::from(ip.payload_len()))?;
            Some((
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.next_header(),
                l4,
            ))
        }
        _ => None,
    }
}

/// Completes the TCP or UDP checksum of a frame whose sender left it to offload. Returns
/// whether it did.
pub fn complete_checksum(frame: &mut [u8]) -> bool {
    let Some((src, dst, proto, l4)) = ip_payload(frame) else {
        return false;
    };
    let (start, len) = {
        let base = frame.as_ptr() as usize;
        (l4.as_ptr() as usize - base, l4.len())
    };
    let Some(l4) = frame.get_mut(start..start + len) else {
        return false;
    };
    match proto {
        IpProtocol::Tcp => match TcpPacket::new_checked(l4) {
            Ok(mut t) => {
                t.fill_checksum(&src, &dst);
                true
            }
            Err(_) => false,
        },
        IpProtocol::Udp => match UdpPacket::new_checked(l4) {
            Ok(mut u) => {
                u.fill_checksum(&src, &dst);
                true
            }
            Err(_) => false,
        },
        _ => false,
    }
}

/// Whether `frame` is a pure ACK whose SACK blocks say the peer holds data beyond a hole at
/// its acknowledgement number: a segment was lost and what followed it arrived.
///
/// smoltcp ignores SACK and starts a fast retransmit on the third duplicate ACK only. A Linux
/// peer, coalescing the segments after a hole (GRO), often sends a single duplicate ACK with
/// a SACK block for the lot, and the loss then waits for the retransmission timeout (1 s in
/// smoltcp). Handing the stack that ACK three more times turns the peer's SACK into the
/// duplicate ACKs it counts; the first hole is resent at once, and each later hole as the
/// next ACK with SACK arrives.
pub fn sack_hole(frame: &[u8]) -> bool {
    let Some((_, _, proto, l4)) = ip_payload(frame) else {
        return false;
    };
    if proto != IpProtocol::Tcp || frame.len() > ACK_FRAME_MAX {
        return false;
    }
    let Ok(tcp) = TcpPacket::new_checked(l4) else {
        return false;
    };
    if !tcp.ack() || tcp.syn() || tcp.fin() || tcp.rst() || !tcp.payload().is_empty() {
        return false;
    }
    let ack = tcp.ack_number().0 as u32;
    let mut opts = tcp.options();
    while let Some((&kind, rest)) = opts.split_first() {
        match kind {
            0 => break,
            1 => opts = rest,
            _ => {
                let Some(&len) = rest.first() else { break };
                let len = usize::from(len);
                if len < 2 || len > opts.len() {
                    break;
                }
                if kind == 5 {
                    // SACK: blocks of (left, right) edges.
                    for b in opts[2..len].chunks_exact(8) {
                        let left = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        if (left.wrapping_sub(ack) as i32) > 0 {
                            return true;
                        }
                    }
                }
                opts = &opts[len..];
            }
        }
    }
    false
}

/// Prepares a TCP frame built without its checksum for a device that completes it: the
/// checksum field gets the pseudo-header sum, and a frame whose payload is longer than
/// `mss` is marked for segmentation. Other frames need nothing (smoltcp checksums them).
pub fn offload_meta(frame: &mut [u8], mss: Option<u16>) -> TxMeta {
    let Some((src, dst, proto, l4)) = ip_payload(frame) else {
        return TxMeta::default();
    };
    if proto != IpProtocol::Tcp {
        return TxMeta::default();
    }
    let start = l4.as_ptr() as usize - frame.as_ptr() as usize;
    let l4_len = l4.len();
    let Ok(tcp) = TcpPacket::new_checked(l4) else {
        return TxMeta::default();
    };
    let hdr_len = start + usize::from(tcp.header_len());
    let payload = tcp.payload().len();
    let sum = pseudo_header_sum(&src, &dst, l4_len);
    let Some(field) = frame.get_mut(start + 16..start + 18) else {
        return TxMeta::default();
    };
    field.copy_from_slice(&sum.to_be_bytes());
    let gso = mss.filter(|&m| payload > usize::from(m)).map(|mss| Gso {
        mss,
        hdr_len: hdr_len as u16,
        ipv6: matches!(src, IpAddress::Ipv6(_)),
    });
    TxMeta {
        csum: Some((start as u16, 16)),
        gso,
    }
}

/// The TCP pseudo-header's one's complement sum, folded and not complemented (what a
/// checksum left to the device starts from).
fn pseudo_header_sum(src: &IpAddress, dst: &IpAddress, len: usize) -> u16 {
    let mut acc: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            acc += u32::from(w);
        }
    };
    match (src, dst) {
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        _ => {}
    }
    let len = len as u32;
    acc += len >> 16;
    acc += len & 0xffff;
    acc += 6; // TCP
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn is_arp(frame: &[u8]) -> bool {
    frame.len() >= ETH_HDR && frame[12] == 0x08 && frame[13] == 0x06
}

/// On one queue of several: the flows this reactor's stack holds a socket for. A device may
/// deliver a flow's segment to another queue than its own (a packet socket's fanout rolls over
/// to the next queue when one ring is full; a NIC's RSS table is rewritten), and a stack with
/// no socket for it would answer with a reset and kill the connection. Such a segment is
/// dropped instead, as if lost: TCP sends it again, and it lands where it belongs.
#[derive(Debug, Default)]
pub struct FlowFilter {
    /// Filtering is on (the device has several queues).
    pub on: bool,
    /// (peer address, peer port, local port) of every socket that has a peer.
    pub known: HashSet<FlowKey>,
}

impl FlowFilter {
    /// Whether `frame` is a TCP segment of a flow this stack does not hold, other than a SYN
    /// opening one.
    pub fn foreign(&self, frame: &[u8]) -> bool {
        if !self.on {
            return false;
        }
        let Some((src, _, IpProtocol::Tcp, l4)) = ip_payload(frame) else {
            return false;
        };
        let Ok(tcp) = TcpPacket::new_checked(l4) else {
            return false;
        };
        if tcp.syn() && !tcp.ack() {
            return false;
        }
        !self.known.contains(&(src, tcp.src_port(), tcp.dst_port()))
    }
}

/// One reactor's device, as smoltcp's `phy::Device`.
pub struct Link<D: NetDev> {
    pub dev: D,
    bus: Arc<ArpBus>,
    me: usize,
    /// An ARP frame from another reactor being handed to the stack.
    injected: Option<ArpFrame>,
    /// A SACK-bearing ACK (or a tail-loss probe) to hand to the stack again, and how many
    /// more times.
    pub replay: Replay,
    pub probes: Probes,
    pub retransmits: Retransmits,
    pub flows: FlowFilter,
    pub stats: Arc<StackStats>,
    /// The device completes TCP checksums, and segments large frames up to `tso_max`.
    offload: bool,
    tso_max: Option<usize>,
}

impl<D: NetDev> Link<D> {
    pub fn new(dev: D, bus: Arc<ArpBus>, me: usize, stats: Arc<StackStats>) -> Link<D> {
        let o = dev.offload();
        Link {
            offload: o.csum,
            tso_max: o.tso_max.filter(|_| o.csum),
            dev,
            bus,
            me,
            injected: None,
            replay: Replay::default(),
            probes: Probes::default(),
            retransmits: Retransmits::default(),
            flows: FlowFilter::default(),
            stats,
        }
    }
}

/// A pure ACK kept for replay (see [`sack_hole`] and [`Probes`]).
pub struct Replay {
    len: u8,
    left: u8,
    data: [u8; PROBE_FRAME_MAX],
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            len: 0,
            left: 0,
            data: [0; PROBE_FRAME_MAX],
        }
    }
}

impl Replay {
    /// Hands `frame` to the stack `times` times, unless a replay is under way.
    pub fn start(&mut self, frame: &[u8], times: u8) -> bool {
        if self.left > 0 || frame.len() > PROBE_FRAME_MAX {
            return false;
        }
        self.len = frame.len() as u8;
        self.data[..frame.len()].copy_from_slice(frame);
        self.left = times;
        true
    }
}

/// The headers of the last segment of a flow from the peer, and when it came.
pub struct FlowRx {
    ack: [u8; PROBE_FRAME_MAX],
    len: u8,
    /// The IP header's length, and the payload the segment carried (not kept).
    ip_hdr: u8,
    payload: u16,
    /// `ack` has been made a pure ACK already.
    converted: bool,
    /// When the peer last sent anything, or when the last probe went out.
    pub at: SInstant,
    /// Probes since the peer last sent anything.
    pub probes: u32,
}

impl FlowRx {
    /// The segment as a pure ACK at the peer's next sequence number: its headers with the
    /// lengths, sequence number and checksums set for no payload. Made when a probe needs it,
    /// not for every segment received.
    pub fn frame(&mut self) -> &[u8] {
        let len = usize::from(self.len);
        if !self.converted {
            self.converted = true;
            let ip_hdr = usize::from(self.ip_hdr);
            let tcp_hdr = len - ETH_HDR - ip_hdr;
            let (ip_part, tcp_part) = self.ack[ETH_HDR..len].split_at_mut(ip_hdr);
            let (src, dst): (IpAddress, IpAddress) = if ip_part[0] >> 4 == 4 {
                let mut ip = Ipv4Packet::new_unchecked(&mut *ip_part);
                ip.set_total_len((ip_hdr + tcp_hdr) as u16);
                ip.fill_checksum();
                (ip.src_addr().into(), ip.dst_addr().into())
            } else {
                let mut ip = Ipv6Packet::new_unchecked(&mut *ip_part);
                ip.set_payload_len(tcp_hdr as u16);
                (ip.src_addr().into(), ip.dst_addr().into())
            };
            let mut t = TcpPacket::new_unchecked(&mut *tcp_part);
            t.set_seq_number(t.seq_number() + usize::from(self.payload));
            t.set_psh(false);
            t.fill_checksum(&src, &dst);
        }
        &self.ack[..len]
    }
}

/// Tail-loss probes (after RFC 8985's idea).
///
/// smoltcp retransmits after at least a second (its minimum RTO is a constant), and only a
/// duplicate ACK starts anything sooner. When the end of a burst is lost (the last segments,
/// or the peer's last ACK), no duplicate ACK ever comes and the connection waits that second.
/// So every segment from the peer is kept as a pure ACK template; when a connection has data
/// outstanding and the peer has said nothing for the probe timeout, that ACK is handed to the
/// stack three times: smoltcp takes them for duplicates and resends its first unacknowledged
/// segment, and the peer's answer acknowledges whatever it already holds.
#[derive(Default)]
pub struct Probes {
    pub flows: HashMap<FlowKey, FlowRx>,
}

impl Probes {
    /// Records a segment from the peer as the flow's pure ACK template.
    fn note(&mut self, frame: &[u8], now: SInstant) {
        let Some(eth) = frame.get(..ETH_HDR) else {
            return;
        };
        let Some((src, _, proto, l4)) = ip_payload(frame) else {
            return;
        };
        if proto != IpProtocol::Tcp {
            return;
        }
        let Ok(tcp) = TcpPacket::new_checked(l4) else {
            return;
        };
        if !tcp.ack() || tcp.syn() || tcp.fin() || tcp.rst() {
            return;
        }
        let key = (src, tcp.src_port(), tcp.dst_port());
        let tcp_hdr = usize::from(tcp.header_len());
        let ip_hdr = l4.as_ptr() as usize - frame.as_ptr() as usize - ETH_HDR;
        let total = ETH_HDR + ip_hdr + tcp_hdr;
        if total > PROBE_FRAME_MAX {
            return;
        }
        // An IP packet carries at most 65535 bytes.
        let payload = u16::try_from(tcp.payload().len()).unwrap_or(u16::MAX);
        let e = self.flows.entry(key).or_insert(FlowRx {
            ack: [0; PROBE_FRAME_MAX],
            len: 0,
            ip_hdr: 0,
            payload: 0,
            converted: false,
            at: now,
            probes: 0,
        });
        e.at = now;
        e.probes = 0;
        e.len = total as u8;
        e.ip_hdr = ip_hdr as u8;
        e.payload = payload;
        e.converted = false;
        e.ack[..ETH_HDR].copy_from_slice(eth);
        e.ack[ETH_HDR..total].copy_from_slice(&frame[ETH_HDR..total]);
    }

    pub fn forget(&mut self, key: &FlowKey) {
        self.flows.remove(key);
    }

    #[cfg(test)]
    pub fn note_for_test(&mut self, frame: &[u8]) {
        self.note(frame, SInstant::ZERO);
    }
}

pub enum LinkRx<'a, R: RxQueue> {
    Dev {
        rx: &'a mut R,
        bus: &'a ArpBus,
        me: usize,
        stats: &'a StackStats,
        replay: &'a mut Replay,
        probes: &'a mut Probes,
        flows: &'a FlowFilter,
        now: SInstant,
    },
    Injected(ArpFrame),
    Replayed(&'a Replay),
}

pub struct LinkTx<'a, T: TxQueue> {
    tx: &'a mut T,
    retransmits: &'a mut Retransmits,
    stats: &'a StackStats,
    /// The device completes TCP checksums (and segments when smoltcp asks).
    offload: bool,
    /// The segment size smoltcp asked the device to cut this frame into.
    mss: Option<u16>,
}

impl<R: RxQueue> phy::RxToken for LinkRx<'_, R> {
    fn consume<Ret, F>(self, f: F) -> Ret
    where
        F: FnOnce(&[u8]) -> Ret,
    {
        match self {
            LinkRx::Injected(a) => f(&a.data[..usize::from(a.len)]),
            LinkRx::Replayed(r) => f(&r.data[..usize::from(r.len)]),
            LinkRx::Dev {
                rx,
                bus,
                me,
                stats,
                replay,
                probes,
                flows,
                now,
            } => {
                let mut f = Some(f);
                let r = rx.recv(|frame: &mut [u8], info: RxInfo| {
                    if flows.foreign(frame) {
                        stats.misrouted.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    if info.csum_partial && complete_checksum(frame) {
                        stats.csum_completed.fetch_add(1, Ordering::Relaxed);
                    }
                    if is_arp(frame) && frame.len() <= ARP_FRAME_MAX {
                        let mut a = ArpFrame {
                            len: frame.len() as u8,
                            data: [0; ARP_FRAME_MAX],
                        };
                        a.data[..frame.len()].copy_from_slice(frame);
                        for (i, (tx, _)) in bus.inboxes.iter().enumerate() {
                            if i != me {
                                match tx.try_send(a) {
                                    Ok(()) => {
                                        stats.arp_shared.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {}
                                }
                            }
                        }
                    }
                    if sack_hole(frame) && replay.start(frame, SACK_REPLAYS) {
                        stats.sack_replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    probes.note(frame, now);
                    f.take().map(|f| f(frame))
                });
                match r.flatten() {
                    Some(v) => v,
                    // `ready` said a frame was there; a device that loses it hands the stack
                    // an empty frame, which it ignores as malformed.
                    None => match f.take() {
                        Some(f) => f(&[]),
                        None => unreachable!("the closure runs at most once"),
                    },
                }
            }
        }
    }
}

impl<T: TxQueue> phy::TxToken for LinkTx<'_, T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let LinkTx {
            tx,
            retransmits,
            stats,
            offload,
            mss,
        } = self;
        tx.send_meta(len, |buf| {
            let r = f(buf);
            if retransmits.note(buf) {
                stats.retransmits.fetch_add(1, Ordering::Relaxed);
            }
            let meta = if offload {
                offload_meta(buf, mss)
            } else {
                TxMeta::default()
            };
            (r, meta)
        })
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.mss = meta.segmentation_offload_size.map(|m| m.get());
    }
}

impl<D: NetDev> phy::Device for Link<D> {
    type RxToken<'a>
        = LinkRx<'a, D::Rx>
    where
        Self: 'a;
    type TxToken<'a>
        = LinkTx<'a, D::Tx>
    where
        Self: 'a;

    fn receive(&mut self, ts: SInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let Link {
            dev,
            bus,
            me,
            injected,
            replay,
            probes,
            retransmits,
            flows,
            stats,
            offload,
            ..
        } = self;
        retransmits.now = ts;
        let (rx, tx) = dev.queues();
        if !tx.ready() {
            return None;
        }
        let txt = LinkTx {
            tx,
            retransmits,
            stats,
            offload: *offload,
            mss: None,
        };
        if replay.left > 0 {
            replay.left -= 1;
            return Some((LinkRx::Replayed(replay), txt));
        }
        if injected.is_none() {
            if let Some((_, inbox)) = bus.inboxes.get(*me) {
                *injected = inbox.try_recv().ok();
            }
        }
        if let Some(a) = injected.take() {
            stats.arp_injected.fetch_add(1, Ordering::Relaxed);
            return Some((LinkRx::Injected(a), txt));
        }
        if !rx.ready() {
            return None;
        }
        Some((
            LinkRx::Dev {
                rx,
                bus,
                me: *me,
                stats,
                replay,
                probes,
                flows,
                now: ts,
            },
            txt,
        ))
    }

    fn transmit(&mut self, ts: SInstant) -> Option<Self::TxToken<'_>> {
        let Link {
            dev,
            retransmits,
            stats,
            offload,
            ..
        } = self;
        retransmits.now = ts;
        let (_, tx) = dev.queues();
        if !tx.ready() {
            return None;
        }
        Some(LinkTx {
            tx,
            retransmits,
            stats,
            offload: *offload,
            mss: None,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.dev.mtu() + ETH_HDR;
        if self.offload {
            // Received checksums are still verified; sent ones are the device's.
            caps.checksum.tcp = phy::Checksum::Rx;
            caps.segmentation.tcpv4 = self.tso_max.and_then(std::num::NonZeroUsize::new);
        }
        caps
    }
}

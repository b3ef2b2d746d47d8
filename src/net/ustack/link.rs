//! The device as smoltcp sees it: a frame device's queue pair, plus what every device needs
//! once: ARP shared between the reactors, transport checksums completed for frames a local
//! kernel left to offload, and retransmitted segments counted on the way out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

use super::dev::{NetDev, RxInfo, RxQueue, TxQueue};

/// Ethernet header length.
pub const ETH_HDR: usize = 14;
/// An ARP frame with its padding (60 bytes on the wire without the FCS).
const ARP_FRAME_MAX: usize = 64;
/// ARP frames waiting for one reactor; more are dropped (ARP retries).
const ARP_QUEUE: usize = 256;

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
    /// Connections accepted, and refused because no listening socket was free.
    pub accepted: AtomicU64,
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
        ]
    }
}

/// A TCP flow as the transmit side sees it: (remote address, remote port, local port).
pub type FlowKey = (IpAddress, u16, u16);

/// The highest sequence number sent per flow, to recognise a segment sent again, and how
/// many were.
#[derive(Default)]
pub struct Retransmits {
    flows: HashMap<FlowKey, (u32, u64)>,
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
        let e = self.flows.entry(key).or_insert((seq, 0));
        // Sequence space wraps: `end` at or before the highest end sent is a resend.
        if (end.wrapping_sub(e.0) as i32) <= 0 && !tcp.syn() {
            e.1 += 1;
            true
        } else {
            e.0 = end;
            false
        }
    }

    /// Segments of `key` sent again.
    pub fn of(&self, key: &FlowKey) -> u64 {
        self.flows.get(key).map_or(0, |e| e.1)
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

fn is_arp(frame: &[u8]) -> bool {
    frame.len() >= ETH_HDR && frame[12] == 0x08 && frame[13] == 0x06
}

/// One reactor's device, as smoltcp's `phy::Device`.
pub struct Link<D: NetDev> {
    pub dev: D,
    bus: Arc<ArpBus>,
    me: usize,
    /// An ARP frame from another reactor being handed to the stack.
    injected: Option<ArpFrame>,
    pub retransmits: Retransmits,
    pub stats: Arc<StackStats>,
}

impl<D: NetDev> Link<D> {
    pub fn new(dev: D, bus: Arc<ArpBus>, me: usize, stats: Arc<StackStats>) -> Link<D> {
        Link {
            dev,
            bus,
            me,
            injected: None,
            retransmits: Retransmits::default(),
            stats,
        }
    }
}

pub enum LinkRx<'a, R: RxQueue> {
    Dev {
        rx: &'a mut R,
        bus: &'a ArpBus,
        me: usize,
        stats: &'a StackStats,
    },
    Injected(ArpFrame),
}

pub struct LinkTx<'a, T: TxQueue> {
    tx: &'a mut T,
    retransmits: &'a mut Retransmits,
    stats: &'a StackStats,
}

impl<R: RxQueue> phy::RxToken for LinkRx<'_, R> {
    fn consume<Ret, F>(self, f: F) -> Ret
    where
        F: FnOnce(&[u8]) -> Ret,
    {
        match self {
            LinkRx::Injected(a) => f(&a.data[..usize::from(a.len)]),
            LinkRx::Dev { rx, bus, me, stats } => {
                let mut f = Some(f);
                let r = rx.recv(|frame: &mut [u8], info: RxInfo| {
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
        } = self;
        tx.send(len, |buf| {
            let r = f(buf);
            if retransmits.note(buf) {
                stats.retransmits.fetch_add(1, Ordering::Relaxed);
            }
            r
        })
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

    fn receive(&mut self, _ts: SInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let Link {
            dev,
            bus,
            me,
            injected,
            retransmits,
            stats,
        } = self;
        let (rx, tx) = dev.queues();
        if !tx.ready() {
            return None;
        }
        if injected.is_none() {
            if let Some((_, inbox)) = bus.inboxes.get(*me) {
                *injected = inbox.try_recv().ok();
            }
        }
        let txt = LinkTx {
            tx,
            retransmits,
            stats,
        };
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
            },
            txt,
        ))
    }

    fn transmit(&mut self, _ts: SInstant) -> Option<Self::TxToken<'_>> {
        let Link {
            dev,
            retransmits,
            stats,
            ..
        } = self;
        let (_, tx) = dev.queues();
        if !tx.ready() {
            return None;
        }
        Some(LinkTx {
            tx,
            retransmits,
            stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.dev.mtu() + ETH_HDR;
        caps
    }
}

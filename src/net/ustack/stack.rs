//! One smoltcp interface and socket set over one device queue: what the target's groups
//! ([`super::UstackGroup`], passive opens) and the initiator's client
//! ([`super::client::ClientStack`], active opens) are each built on, with their own
//! bookkeeping of connections around it.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress};

use super::dev::{NetDev, TxQueue};
use super::link::{ArpBus, FlowKey, Link, StackStats};
use super::StackConfig;

/// The interface, its sockets and its device, on one clock.
pub struct Stack<D: NetDev> {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub link: Link<D>,
    pub cfg: StackConfig,
    /// The stack's time zero.
    base: Instant,
    /// Closed connections finishing their FIN handshake, and when they are reset instead.
    lingering: Vec<(SocketHandle, Instant)>,
}

/// Ingress polls after a tail-loss probe starts: the probe's three duplicate ACKs and one
/// frame more.
const PROBE_INGRESS: usize = 4;

impl<D: NetDev> Stack<D> {
    /// An interface with `cfg`'s address and default route over `dev`, the `me`th user of the
    /// ARP bus `bus`.
    pub fn new(
        mut dev: D,
        cfg: &StackConfig,
        bus: Arc<ArpBus>,
        me: usize,
        stats: Arc<StackStats>,
    ) -> io::Result<Stack<D>> {
        let base = Instant::now();
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        let mac = dev.mac();
        let _ = dev.queues();
        let mut link = Link::new(dev, bus, me, stats);
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = u64::from_le_bytes(seed);
        let mut iface = Interface::new(config, &mut link, SInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(cfg.ip);
        });
        match cfg.gateway {
            Some(IpAddr::V4(g)) => {
                iface
                    .routes_mut()
                    .add_default_ipv4_route(g)
                    .map_err(|_| io::Error::other("route table full"))?;
            }
            Some(IpAddr::V6(g)) => {
                iface
                    .routes_mut()
                    .add_default_ipv6_route(g)
                    .map_err(|_| io::Error::other("route table full"))?;
            }
            None => {}
        }
        Ok(Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            cfg: cfg.clone(),
            base,
            lingering: Vec::new(),
        })
    }

    /// `now` on the stack's clock.
    pub fn ts(&self, now: Instant) -> SInstant {
        SInstant::from_micros(now.saturating_duration_since(self.base).as_micros() as i64)
    }

    /// A TCP socket with the configured buffers, Nagle, delayed ACK and Cubic.
    pub fn new_socket(&self) -> tcp::Socket<'static> {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.cfg.rx_buf]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.cfg.tx_buf]);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_nagle_enabled(self.cfg.nagle);
        s.set_ack_delay(
            self.cfg
                .ack_delay
                .map(|d| SDuration::from_micros(d.as_micros() as u64)),
        );
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        s
    }

    /// Hands the stack one received frame (or an ARP frame of another queue, or a replayed
    /// ACK).
    pub fn ingress_one(&mut self, ts: SInstant) -> PollIngressSingleResult {
        self.iface
            .poll_ingress_single(ts, &mut self.link, &mut self.sockets)
    }

    /// Sends what the sockets have to send, and hands it to the device.
    pub fn egress(&mut self, ts: SInstant) {
        while self
            .iface
            .poll_egress(ts, &mut self.link, &mut self.sockets)
            == PollResult::SocketStateChanged
        {}
        if let Err(e) = self.link.dev.queues().1.flush() {
            log::debug!("device flush: {e}");
        }
    }

    fn probe_timeout(&self) -> Option<SDuration> {
        Some(SDuration::from_micros(
            self.cfg.tail_probe?.as_micros() as u64
        ))
    }

    /// Of the connections `flows`, those a tail-loss probe may be due on (established, data
    /// outstanding, a segment heard from the peer), with when it is due.
    fn probe_times<'a>(
        &'a self,
        pto: SDuration,
        flows: impl Iterator<Item = (FlowKey, SocketHandle)> + 'a,
    ) -> impl Iterator<Item = (FlowKey, SInstant)> + 'a {
        flows.filter_map(move |(key, handle)| {
            let t = self.sockets.get::<tcp::Socket>(handle);
            if t.send_queue() == 0 || t.state() != tcp::State::Established {
                return None;
            }
            let f = self.link.probes.flows.get(&key)?;
            let since = self
                .link
                .retransmits
                .last_sent(&key)
                .map_or(f.at, |sent| sent.max(f.at));
            Some((key, since + pto * (1u32 << f.probes.min(5))))
        })
    }

    /// How long until the next tail-loss probe on one of `flows` is due, if one may be.
    pub fn probe_due(
        &self,
        ts: SInstant,
        flows: impl Iterator<Item = (FlowKey, SocketHandle)>,
    ) -> Option<SDuration> {
        let due = self
            .probe_times(self.probe_timeout()?, flows)
            .map(|(_, at)| at)
            .min()?;
        Some(if due > ts { due - ts } else { SDuration::ZERO })
    }

    /// Starts a tail-loss probe on one of `flows` with data outstanding whose peer has been
    /// silent for the probe timeout (one probe per call), and hands the stack its duplicate
    /// ACKs so that the retransmission leaves with the next egress. Returns whether it did.
    pub fn probe_tails(
        &mut self,
        ts: SInstant,
        flows: impl Iterator<Item = (FlowKey, SocketHandle)>,
    ) -> bool {
        let Some(pto) = self.probe_timeout() else {
            return false;
        };
        let Some((key, _)) = self.probe_times(pto, flows).find(|&(_, at)| ts >= at) else {
            return false;
        };
        let Link {
            probes,
            replay,
            stats,
            ..
        } = &mut self.link;
        let Some(f) = probes.flows.get_mut(&key) else {
            return false;
        };
        if !replay.start(f.frame(), 3) {
            return false;
        }
        f.probes += 1;
        f.at = ts;
        stats
            .tail_probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..PROBE_INGRESS {
            if self.ingress_one(ts) == PollIngressSingleResult::None {
                break;
            }
        }
        true
    }

    /// When the stack next needs a pass even if nothing arrives: smoltcp's timers, the next
    /// tail-loss probe on one of `flows`, the end of a lingering connection's time.
    pub fn next_due(
        &mut self,
        now: Instant,
        flows: impl Iterator<Item = (FlowKey, SocketHandle)>,
    ) -> Option<Instant> {
        let ts = self.ts(now);
        let d = self.iface.poll_delay(ts, &self.sockets);
        let d = match (d, self.probe_due(ts, flows)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let at = d.map(|d| now + Duration::from_micros(d.total_micros()));
        let linger = self.lingering.iter().map(|&(_, until)| until).min();
        match (at, linger) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Hands over a closed connection (its FIN on its way) to finish its handshake, and
    /// to be reset if it has not by `until`.
    pub fn linger(&mut self, h: SocketHandle, until: Instant) {
        self.lingering.push((h, until));
    }

    /// Connections still finishing their close.
    pub fn lingering(&self) -> usize {
        self.lingering.len()
    }

    /// Ends lingering connections that are done or out of time.
    pub fn housekeeping(&mut self, now: Instant) {
        let sockets = &mut self.sockets;
        self.lingering.retain(|&(h, until)| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done || now >= until {
                s.abort();
                // The RST of an abort goes out with the next egress; the socket is removed
                // then, by the retain below on a later pass.
                if done {
                    sockets.remove(h);
                    return false;
                }
            }
            true
        });
    }

    /// Forgets what the link keeps of a flow that has ended.
    pub fn forget(&mut self, key: &FlowKey) {
        self.link.retransmits.forget(key);
        self.link.probes.forget(key);
    }
}

//! A DPDK Ethernet port under the userspace stack (feature `dpdk`): one receive and one
//! transmit queue per reactor, polled by the reactor that owns them.
//!
//! The port is whatever the EAL probed from `--net dpdk:DEVARGS`: a PCI device bound to
//! vfio-pci (`0000:01:00.0`) or a virtual device as `--vdev` takes it
//! (`net_af_packet0,iface=veth1,qpairs=2`, `net_af_xdp0,iface=veth1`, `net_tap0`,
//! `net_memif0,role=server`). With several queues the port spreads flows by RSS (or the
//! vdev's own hashing: PACKET_FANOUT for af_packet), so a flow stays on one queue and one
//! reactor, and every reactor's stack accepts what its queue receives.
//!
//! Frames are not copied on the way in or out: a received mbuf's data is handed to smoltcp in
//! place and freed after, and smoltcp builds an outgoing frame straight into a fresh mbuf that
//! is queued and sent in a burst at the reactor's flush. TCP checksums are left to the port
//! when it offers that (`DeviceCapabilities` says so to smoltcp), and so is segmentation: a
//! port with TSO takes TCP frames of up to 64 KiB, built in large mbufs of a pool of their own.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::env::dpdk::{self, Mbuf, Mempool, Port, PortConf, PortInfo, RxBurst, TxBurst};

use super::{DevStats, NetDev, PortView, RxInfo, RxQueue, TxMeta, TxOffload, TxQueue};

/// Frames received per burst.
const RX_BURST: usize = 32;
/// Frames queued before a transmit burst is forced.
const TX_BURST: usize = 64;
/// Fresh mbufs taken from the pool at a time for sending.
const ALLOC_BATCH: usize = 32;
/// Descriptors per hardware ring (clamped to what the port allows).
const RING_DESC: u16 = 1024;
/// The mempool's per-lcore cache.
const POOL_CACHE: u32 = 256;
/// Flushes in a row that may send nothing before the first waiting frame is dropped: a
/// driver that refuses a frame (and counts an error) without taking it would otherwise hold
/// every frame behind it for good. A ring that is merely full drains long before.
const STALL_LIMIT: u32 = 10_000;
/// Data room of the mbufs that carry a frame for segmentation offload (the largest an mbuf
/// has), and how many a queue may have in flight.
const TSO_ROOM: u16 = u16::MAX;
const TSO_PER_QUEUE: u32 = 256;
/// The largest frame handed to the port for segmentation: an IP packet of at most 64 KiB in
/// one mbuf after its headroom.
const TSO_MAX: usize = 65_280;

/// Whether `devargs` names a PCI device (`0000:01:00.0` or `01:00.0`, options after a comma).
pub fn is_pci(devargs: &str) -> bool {
    let name = device_name(devargs);
    let parts: Vec<&str> = name.split(':').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    let bdf = |s: &str| {
        s.split_once('.').is_some_and(|(d, f)| {
            hex(d, 2) && f.len() == 1 && f.chars().all(|c| ('0'..='7').contains(&c))
        })
    };
    match parts.as_slice() {
        [dom, bus, df] => hex(dom, 4) && hex(bus, 2) && bdf(df),
        [bus, df] => hex(bus, 2) && bdf(df),
        _ => false,
    }
}

/// The device's name in `devargs`: what comes before the first comma.
pub fn device_name(devargs: &str) -> &str {
    devargs.split(',').next().unwrap_or(devargs)
}

/// Whether `args` holds one of the options in `names` (as `-x`, `-x VALUE`, `--name=VALUE`
/// or `--name VALUE`).
fn has_opt(args: &[String], names: &[&str]) -> bool {
    args.iter().any(|a| {
        names
            .iter()
            .any(|n| a == n || (n.starts_with("--") && a.starts_with(&format!("{n}="))))
    })
}

/// The EAL's arguments (`program`'s) for a port `devargs` used from reactors whose first core is
/// `main_core`, with a buffer pool of `pool_mb` MiB, and the user's `extra` arguments
/// (`--eal "..."`) last, so that they win where the EAL takes the last of an option.
///
/// Defaults, each left out when `extra` says otherwise: the main lcore on the first
/// reactor's core (`-l`); no files shared with other DPDK processes (`--in-memory`, or
/// `--no-shconf` with `--no-huge`, which `--in-memory` does not go with); no
/// telemetry socket; the device allowed alone (`-a` for PCI) or created (`--vdev`, with PCI
/// scanning off). With `--no-huge` the EAL gets `-m` for the buffer pool, the mbufs and its
/// own needs, since it cannot grow ordinary memory later.
pub fn eal_args(
    program: &str,
    devargs: &str,
    main_core: usize,
    pool_mb: usize,
    extra: &[String],
) -> Vec<String> {
    let mut a = vec![program.to_string()];
    if !has_opt(extra, &["-l", "-c", "--lcores"]) {
        a.extend(["-l".into(), main_core.to_string()]);
    }
    if !has_opt(extra, &["--in-memory", "--file-prefix", "--no-shconf"]) {
        // --in-memory needs hugepages; without them --no-shconf keeps the runtime files away.
        a.push(
            if has_opt(extra, &["--no-huge"]) {
                "--no-shconf"
            } else {
                "--in-memory"
            }
            .into(),
        );
    }
    if !has_opt(extra, &["--telemetry", "--no-telemetry"]) {
        a.push("--no-telemetry".into());
    }
    if is_pci(devargs) {
        a.extend(["-a".into(), devargs.to_string()]);
    } else {
        a.push(format!("--vdev={devargs}"));
        if !has_opt(extra, &["-a", "--allow", "-b", "--block", "--no-pci"]) {
            a.push("--no-pci".into());
        }
    }
    if has_opt(extra, &["--no-huge"]) && !has_opt(extra, &["-m", "--socket-mem"]) {
        // The pool, the mbufs (a few MiB per queue) and the EAL's own tables.
        a.extend(["-m".into(), (pool_mb + 256).to_string()]);
    }
    if !has_opt(extra, &["--log-level"]) {
        a.push("--log-level=notice".into());
    }
    a.extend(extra.iter().cloned());
    a
}

/// The opened port: what the tree shows of it.
struct PortState {
    port: Port,
    info: PortInfo,
    pool: Arc<Mempool>,
    queues: usize,
    csum_offload: bool,
    tso: bool,
    /// The lcore id of the thread polling each queue (-1 until it polls, or when it could not
    /// be registered).
    lcores: Vec<AtomicI64>,
}

impl PortView for PortState {
    fn attrs(&self) -> Vec<(String, String)> {
        let l = self.port.link();
        let s = self.port.stats();
        let mut v = vec![
            ("dpdk_port".into(), self.port.id().to_string()),
            ("dpdk_device".into(), self.port.name().to_string()),
            ("dpdk_driver".into(), self.info.driver.clone()),
            ("link".into(), if l.up { "up" } else { "down" }.into()),
            ("link_speed_mbps".into(), l.speed_mbps.to_string()),
            (
                "tx_checksum_offload".into(),
                u8::from(self.csum_offload).to_string(),
            ),
            (
                "tx_segmentation_offload".into(),
                u8::from(self.tso).to_string(),
            ),
            ("mbufs".into(), self.pool.count().to_string()),
            ("mbufs_in_use".into(), self.pool.in_use().to_string()),
            ("mbuf_bytes".into(), self.pool.bytes().to_string()),
        ];
        for (k, x) in [
            ("port_rx_packets", s.ipackets),
            ("port_tx_packets", s.opackets),
            ("port_rx_bytes", s.ibytes),
            ("port_tx_bytes", s.obytes),
            ("port_rx_missed", s.imissed),
            ("port_rx_errors", s.ierrors),
            ("port_tx_errors", s.oerrors),
            ("port_rx_nombuf", s.rx_nombuf),
        ] {
            v.push((k.into(), x.to_string()));
        }
        v
    }

    fn queue_attrs(&self, q: usize) -> Vec<(String, String)> {
        if q >= self.queues {
            return Vec::new();
        }
        let s = self.port.stats();
        let get = |v: &Vec<u64>| v.get(q).copied().unwrap_or(0).to_string();
        let lcore = self.lcores.get(q).map_or(-1, |l| l.load(Ordering::Relaxed));
        vec![
            ("lcore".into(), lcore.to_string()),
            ("port_queue_rx_packets".into(), get(&s.q_ipackets)),
            ("port_queue_tx_packets".into(), get(&s.q_opackets)),
            ("port_queue_errors".into(), get(&s.q_errors)),
        ]
    }
}

pub struct DpdkRx {
    port: Port,
    queue: u16,
    /// Poll only while the link is up (see [`needs_link_gate`]).
    link_gate: bool,
    /// The polling thread's lcore is recorded in the port's view.
    view: Arc<PortState>,
    lcore_noted: bool,
    burst: RxBurst<RX_BURST>,
    /// A packet that arrived in several segments, gathered.
    scratch: Vec<u8>,
    stats: Arc<DevStats>,
}

pub struct DpdkTx {
    port: Port,
    queue: u16,
    link_gate: bool,
    /// Flushes in a row that sent nothing while frames waited.
    stalled: u32,
    pool: Arc<Mempool>,
    /// Large mbufs for frames the port segments (segmentation offload), if it does.
    big: Option<Arc<Mempool>>,
    mtu: u16,
    /// The port counts the Ethernet header into a segment's size (see `open`).
    tso_l2_in_mtu: bool,
    spare: Vec<Mbuf>,
    pending: TxBurst<TX_BURST>,
    /// Where a frame that cannot be sent is built and dropped (smoltcp must still be given a
    /// buffer).
    scratch: Vec<u8>,
    csum_offload: bool,
    stats: Arc<DevStats>,
}

/// One queue pair of a DPDK port.
pub struct DpdkDev {
    rx: DpdkRx,
    tx: DpdkTx,
    mac: [u8; 6],
    mtu: usize,
    stats: Arc<DevStats>,
    view: Arc<PortState>,
}

/// Whether a driver's burst functions must not be called while its link is down. DPDK 22.11's
/// memif computes its ring's address from the shared-memory regions before it checks that it is
/// connected, and the regions are gone once the peer has left: a burst then reads unmapped
/// memory. The link goes down before the regions go.
fn needs_link_gate(driver: &str) -> bool {
    driver == "net_memif"
}

/// Opens the port the EAL made of `devargs` (the EAL must be initialised, see
/// [`eal_args`]) with `queues` queue pairs, and returns one device per queue.
pub fn open(devargs: &str, queues: usize) -> Result<Vec<DpdkDev>, String> {
    let name = device_name(devargs);
    let port = Port::by_name(name)?;
    let info = port.info()?;
    let nq = u16::try_from(queues).map_err(|_| format!("{queues} queues is too many"))?;
    if nq == 0 {
        return Err("no queue asked for".into());
    }
    if info.max_rx_queues < nq || info.max_tx_queues < nq {
        return Err(format!(
            "{name} ({}) has {} receive and {} transmit queue(s); {queues} reactor(s) need {queues} of each{}",
            info.driver,
            info.max_rx_queues,
            info.max_tx_queues,
            match info.driver.as_str() {
                "net_af_packet" => format!(" (add qpairs={queues} to its arguments)"),
                "net_af_xdp" => format!(" (add queue_count={queues}, and give the interface as many queues)"),
                "net_tap" | "net_memif" => " (see its queue arguments)".to_string(),
                _ => String::new(),
            }
        ));
    }
    let c = dpdk::consts();
    let mtu = port.mtu().unwrap_or(1500);
    // A whole frame in one mbuf: Ethernet header, a VLAN tag's room, the MTU, headroom.
    let need = u64::from(mtu) + 18 + c.headroom;
    let data_room = need.max(c.mbuf_default_buf_size);
    let data_room = u16::try_from(data_room)
        .map_err(|_| format!("{name}: an MTU of {mtu} does not fit an mbuf"))?;
    let clamp = |want: u16, min: u16, max: u16| {
        let max = if max == 0 { want } else { max };
        want.clamp(min.min(max), max)
    };
    let rx_desc = clamp(RING_DESC, info.rx_desc_min, info.rx_desc_max);
    let tx_desc = clamp(RING_DESC, info.tx_desc_min, info.tx_desc_max);
    // Per queue: its rings, a burst each way, the transmit spares, and the lcore cache.
    let per_q = u32::from(rx_desc)
        + u32::from(tx_desc)
        + (RX_BURST + TX_BURST + 2 * ALLOC_BATCH) as u32
        + POOL_CACHE;
    let count = (per_q * u32::from(nq) + 1024).next_power_of_two() - 1;
    let pool = Mempool::create(
        &format!("itgt_mbuf_{}", port.id()),
        count,
        POOL_CACHE,
        data_room,
        -1,
    )?;
    let csum_offload = info.tx_offload_capa & c.offload_tx_tcp_cksum != 0;
    // Segmentation offload where the port has it, with the checksums it implies (each
    // segment's IP header changes): frames of up to 64 KiB, in large mbufs of their own pool.
    let tso_need = c.offload_tx_tso | c.offload_tx_tcp_cksum | c.offload_tx_ipv4_cksum;
    let tso = info.tx_offload_capa & tso_need == tso_need;
    let big = if tso {
        Some(Mempool::create(
            &format!("itgt_tso_{}", port.id()),
            (TSO_PER_QUEUE * u32::from(nq)).next_power_of_two() - 1,
            32,
            TSO_ROOM,
            -1,
        )?)
    } else {
        None
    };
    let rss_hf = if nq > 1 {
        info.rss_offloads & (c.rss_ip | c.rss_tcp)
    } else {
        0
    };
    let conf = PortConf {
        queues: nq,
        rss_hf,
        rx_offloads: 0,
        tx_offloads: if tso {
            tso_need
        } else if csum_offload {
            c.offload_tx_tcp_cksum
        } else {
            0
        },
        rx_desc,
        tx_desc,
    };
    port.start(&conf, &pool)?;
    let mac = port.mac()?;
    log::info!(
        "DPDK port {} ({name}, {}): {queues} queue pair(s), MTU {mtu}, MAC {}, {} mbufs of {data_room} bytes, TCP checksum offload {}, segmentation offload {}, RSS {:#x}",
        port.id(),
        info.driver,
        mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        count,
        if csum_offload { "on" } else { "off" },
        if tso { "on" } else { "off" },
        rss_hf
    );
    // DPDK's TAP driver checks a segment's headers and payload, Ethernet header included,
    // against the MTU: its segments carry 14 bytes less than the MSS.
    let tso_l2_in_mtu = info.driver == "net_tap";
    let link_gate = needs_link_gate(&info.driver);
    let view = Arc::new(PortState {
        port: port.clone(),
        info,
        pool: pool.clone(),
        queues,
        csum_offload,
        tso,
        lcores: (0..queues).map(|_| AtomicI64::new(-1)).collect(),
    });
    Ok((0..nq)
        .map(|q| {
            let stats = Arc::new(DevStats::default());
            DpdkDev {
                rx: DpdkRx {
                    port: port.clone(),
                    queue: q,
                    view: view.clone(),
                    lcore_noted: false,
                    link_gate,
                    burst: RxBurst::default(),
                    scratch: Vec::new(),
                    stats: stats.clone(),
                },
                tx: DpdkTx {
                    port: port.clone(),
                    queue: q,
                    link_gate,
                    stalled: 0,
                    pool: pool.clone(),
                    big: big.clone(),
                    mtu,
                    tso_l2_in_mtu,
                    spare: Vec::with_capacity(ALLOC_BATCH),
                    pending: TxBurst::default(),
                    scratch: Vec::new(),
                    csum_offload,
                    stats: stats.clone(),
                },
                mac,
                mtu: usize::from(mtu),
                stats,
                view: view.clone(),
            }
        })
        .collect())
}

impl DpdkRx {
    /// Registers the polling thread as an lcore (once) and shows which in the tree.
    fn register(&mut self) {
        dpdk::register_thread();
        if !self.lcore_noted {
            self.lcore_noted = true;
            if let (Some(id), Some(slot)) = (
                dpdk::lcore_id(),
                self.view.lcores.get(usize::from(self.queue)),
            ) {
                slot.store(i64::from(id), Ordering::Relaxed);
            }
        }
    }
}

impl RxQueue for DpdkRx {
    fn ready(&mut self) -> bool {
        self.register();
        if self.burst.is_empty() && self.link_gate && !self.port.link().up {
            return false;
        }
        self.burst.fill(&self.port, self.queue) > 0
    }

    fn recv<R>(&mut self, f: impl FnOnce(&mut [u8], RxInfo) -> R) -> Option<R> {
        if self.burst.is_empty() {
            self.register();
            if self.link_gate && !self.port.link().up {
                return None;
            }
            self.burst.fill(&self.port, self.queue);
        }
        let mut m = self.burst.take()?;
        DevStats::add(&self.stats.rx_packets, 1);
        DevStats::add(&self.stats.rx_bytes, m.pkt_len() as u64);
        let info = RxInfo::default();
        if m.segments() > 1 {
            m.copy_chain(&mut self.scratch);
            Some(f(&mut self.scratch, info))
        } else {
            Some(f(m.data_mut(), info))
        }
    }
}

impl DpdkTx {
    /// A fresh mbuf for a frame of `len` bytes, if the pool has one and it is big enough.
    fn fresh(&mut self, len: usize) -> Option<Mbuf> {
        if len > usize::from(self.pool.data_room()) - dpdk::consts().headroom as usize {
            // A frame for segmentation offload.
            let mut m = self.big.as_ref()?.alloc_one()?;
            return m.set_len(len).then_some(m);
        }
        if self.spare.is_empty() && !self.pool.alloc_bulk(&mut self.spare, ALLOC_BATCH) {
            // The pool is low: one at a time, what is left.
            self.pool.alloc_bulk(&mut self.spare, 1);
        }
        let mut m = self.spare.pop()?;
        m.set_len(len).then_some(m)
    }

    fn drop_frame<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> (R, TxMeta)) -> R {
        DevStats::add(&self.stats.tx_dropped, 1);
        self.scratch.resize(len, 0);
        f(&mut self.scratch).0
    }
}

impl TxQueue for DpdkTx {
    fn ready(&mut self) -> bool {
        if self.pending.is_full() {
            let _ = self.flush();
        }
        !self.pending.is_full()
    }

    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.send_meta(len, |b| (f(b), TxMeta::default()))
    }

    fn send_meta<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> (R, TxMeta)) -> R {
        dpdk::register_thread();
        let Some(mut m) = self.fresh(len) else {
            return self.drop_frame(len, f);
        };
        let (r, meta) = f(m.data_mut());
        if let (true, Some((start, _))) = (self.csum_offload, meta.csum) {
            let c = dpdk::consts();
            let data = m.data_mut();
            let ipv6 = data.get(12..14) == Some(&[0x86, 0xdd][..]);
            let l3 = start.saturating_sub(14);
            let mut flags = c.tx_tcp_cksum | if ipv6 { c.tx_ipv6 } else { c.tx_ipv4 };
            let (mut l4, mut segsz) = (0, 0);
            if let Some(g) = meta.gso {
                // The port cuts the payload into segments of `mss` bytes, each with the
                // headers, and fixes each segment's IP header and checksums.
                l4 = g.hdr_len.saturating_sub(start);
                flags |= c.tx_tcp_seg | if ipv6 { 0 } else { c.tx_ip_cksum };
                segsz = if self.tso_l2_in_mtu {
                    g.mss.min(self.mtu.saturating_sub(g.hdr_len))
                } else {
                    g.mss
                };
            }
            m.set_tx_offload(flags, 14, l3, l4, segsz);
        }
        if let Err(m) = self.pending.push(m) {
            drop(m);
            DevStats::add(&self.stats.tx_dropped, 1);
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.link_gate && !self.pending.is_empty() && !self.port.link().up {
            // Nobody to send to: what was queued is lost, as on a wire with no peer.
            let n = self.pending.len();
            self.pending = TxBurst::default();
            DevStats::add(&self.stats.tx_dropped, n as u64);
            return Ok(());
        }
        let (sent, bytes, mut refused) = self.pending.flush(&self.port, self.queue);
        if sent == 0 && !self.pending.is_empty() {
            self.stalled += 1;
            if self.stalled >= STALL_LIMIT {
                self.stalled = 0;
                refused += self.pending.drop_first();
            }
        } else {
            self.stalled = 0;
        }
        DevStats::add(&self.stats.tx_packets, sent as u64);
        DevStats::add(&self.stats.tx_bytes, bytes as u64);
        DevStats::add(&self.stats.tx_dropped, refused as u64);
        Ok(())
    }
}

impl NetDev for DpdkDev {
    type Rx = DpdkRx;
    type Tx = DpdkTx;

    fn queues(&mut self) -> (&mut DpdkRx, &mut DpdkTx) {
        (&mut self.rx, &mut self.tx)
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    /// A poll-mode driver has nothing to sleep on: a reactor in adaptive mode naps briefly
    /// between polls instead.
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> &Arc<DevStats> {
        &self.stats
    }

    fn offload(&self) -> TxOffload {
        TxOffload {
            csum: self.tx.csum_offload,
            tso_max: self.tx.big.as_ref().map(|_| TSO_MAX),
        }
    }

    fn port_view(&self) -> Option<Arc<dyn PortView>> {
        Some(self.view.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_and_vdevs() {
        assert!(is_pci("0000:00:03.0"));
        assert!(is_pci("00:03.0"));
        assert!(is_pci("0000:af:00.7,rxq_pkt_split=1"));
        assert!(!is_pci("net_af_packet0,iface=veth1"));
        assert!(!is_pci("net_memif0"));
        assert!(!is_pci("0000:00:03.8"));
        assert!(!is_pci("0000:00:3.0"));
        assert_eq!(device_name("net_af_xdp0,iface=v"), "net_af_xdp0");
    }

    #[test]
    fn eal_defaults_give_way_to_the_users_arguments() {
        let a = eal_args("iscsi-tgt", "net_af_packet0,iface=v,qpairs=2", 3, 64, &[]);
        assert_eq!(
            a,
            [
                "iscsi-tgt",
                "-l",
                "3",
                "--in-memory",
                "--no-telemetry",
                "--vdev=net_af_packet0,iface=v,qpairs=2",
                "--no-pci",
                "--log-level=notice"
            ]
        );
        let extra: Vec<String> = ["--no-huge", "--lcores=0@1", "--file-prefix=x"]
            .map(String::from)
            .to_vec();
        let a = eal_args("iscsi-tgt", "0000:00:03.0", 1, 64, &extra);
        assert!(!a.contains(&"-l".to_string()), "{a:?}");
        assert!(!a.contains(&"--in-memory".to_string()), "{a:?}");
        assert!(!a.contains(&"--no-shconf".to_string()), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["-a", "0000:00:03.0"]), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["-m", "320"]), "{a:?}");
        assert!(!a.contains(&"--no-pci".to_string()));
        assert!(a.ends_with(&extra));
        let a = eal_args(
            "iscsi-bench",
            "net_memif0",
            0,
            64,
            &["--no-huge".to_string()],
        );
        assert!(a.contains(&"--no-shconf".to_string()), "{a:?}");
        assert!(!a.contains(&"--in-memory".to_string()), "{a:?}");
        assert_eq!(a[0], "iscsi-bench");
    }
}

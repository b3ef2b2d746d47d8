//! The DPDK device over DPDK's ring driver (`net_ring`, whose transmit ring is its own receive
//! ring): frames sent through the device come back through it intact, counted, with no
//! hugepages. Needs the `dpdk` feature (and DPDK's PMDs installed).
#![cfg(feature = "dpdk")]

use iscsi_tgt::env::dpdk;
use iscsi_tgt::net::ustack::dev::dpdk as dev;
use iscsi_tgt::net::ustack::dev::{NetDev, RxQueue, TxQueue};
use std::sync::atomic::Ordering;

#[test]
fn frames_sent_come_back_through_a_ring_port_intact_and_counted() {
    let args = dev::eal_args(
        "dpdk-device-test",
        "net_ring0",
        0,
        16,
        &["--no-huge".to_string(), "-m".to_string(), "128".to_string()],
    );
    dpdk::init(&args).expect("EAL over net_ring0 without hugepages");
    let mut devs = dev::open("net_ring0", 1).expect("the ring port opens");
    let mut d = devs.pop().expect("one queue");
    assert!(d.mtu() >= 1500);
    let stats = d.stats().clone();
    let view = d.port_view().expect("a DPDK port has a view");
    let frames: Vec<Vec<u8>> = (0..100u32)
        .map(|i| {
            (0..60 + (i as usize * 13) % 1400)
                .map(|k| (k as u32 ^ i) as u8)
                .collect()
        })
        .collect();
    let (_, tx) = d.queues();
    for f in &frames {
        assert!(tx.ready());
        tx.send(f.len(), |b| b.copy_from_slice(f));
    }
    tx.flush().unwrap();
    let (rx, _) = d.queues();
    let mut got = Vec::new();
    while rx.ready() {
        rx.recv(|b, info| {
            assert!(!info.csum_partial);
            got.push(b.to_vec());
        });
    }
    assert_eq!(got, frames, "the frames came back in order and intact");
    let sent_bytes: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 100);
    assert_eq!(stats.rx_packets.load(Ordering::Relaxed), 100);
    assert_eq!(stats.tx_bytes.load(Ordering::Relaxed), sent_bytes as u64);
    assert_eq!(stats.rx_bytes.load(Ordering::Relaxed), sent_bytes as u64);
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 0);
    let attrs = view.attrs();
    let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("dpdk_driver").as_deref(), Some("net_ring"));
    assert_eq!(get("port_tx_packets").as_deref(), Some("100"));
    // The thread that polled became an lcore, so the mempool has a cache for it.
    assert!(dpdk::lcore_id().is_some());
    assert_eq!(
        view.queue_attrs(0)
            .iter()
            .find(|(n, _)| n == "lcore")
            .map(|(_, v)| v.as_str()),
        Some(dpdk::lcore_id().unwrap().to_string().as_str())
    );
    // Every mbuf went back to its pool.
    let sgv = dpdk::sgv_attrs();
    let in_use = sgv.iter().find(|(n, _)| n == "dpdk_mbufs_in_use").unwrap();
    assert!(in_use.1.parse::<u64>().unwrap() < 64, "{in_use:?}");
}

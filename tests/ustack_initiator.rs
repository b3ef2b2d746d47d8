//! The crate's initiator on the userspace stack's client, logged in to a whole target (its
//! reactor and engine, on the userspace stack too) over an in-memory wire: no kernel TCP on
//! either side. In process, since the wire is memory.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use iscsi_tgt::env::{self, PoolConfig};
use iscsi_tgt::initiator::{Initiator, InitiatorError, LoginOptions};
use iscsi_tgt::iscsi::config::Publisher;
use iscsi_tgt::iscsi::engine::{Engine, Shared};
use iscsi_tgt::iscsi::registry::Registry;
use iscsi_tgt::mgmt::{Hooks, Mgmt};
use iscsi_tgt::net::ustack::client::ClientStack;
use iscsi_tgt::net::ustack::dev::mem::pair;
use iscsi_tgt::net::ustack::{StackConfig, UstackNet};
use iscsi_tgt::reactor::{self, Mode};

const TARGET: &str = "iqn.2026-11.org.iscsi-tgt:ustack-initiator";
const PORTAL: &str = "10.9.0.2:3260";

#[test]
fn the_initiator_logs_in_and_moves_data_over_the_userspace_client() {
    let _ = env::init(PoolConfig {
        mem_size_mb: 64,
        hugepages: false,
        memory: None,
    });
    let publisher = Publisher::new();
    let registry = Registry::new();
    let m = Mgmt::new(publisher.clone(), registry.clone(), Hooks::default());
    m.mgmt("handlers/vdisk_ramio", "add_device r0 size_mb=8")
        .unwrap();
    m.mgmt("targets/iscsi", &format!("add_target {TARGET}"))
        .unwrap();
    m.mgmt(&format!("targets/iscsi/{TARGET}/luns"), "add r0 0")
        .unwrap();
    m.set(&format!("targets/iscsi/{TARGET}/enabled"), "1")
        .unwrap();
    m.set("targets/iscsi/enabled", "1").unwrap();

    // The target: one reactor on the userspace stack at 10.9.0.2, over one end of the wire.
    // It polls: a memory wire has no descriptor to sleep on.
    let (t, i) = pair([[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]], 1500, 0);
    let portal: SocketAddr = PORTAL.parse().unwrap();
    let tcfg = StackConfig::new("10.9.0.2/24".parse().unwrap(), None);
    let net = UstackNet::new("mem", "mem0", tcfg, &[portal], vec![t]).unwrap();
    let shared = Shared::new(publisher, registry, vec![portal], 1, 1024);
    let core = reactor::first_allowed_core().unwrap();
    let reactors = reactor::spawn_group(&[core], Mode::Poll, &net, {
        let shared = shared.clone();
        move |id, peers, group, now| Engine::new(id, shared.clone(), peers, group, now)
    })
    .unwrap();

    // The initiator: the client stack at 10.9.0.1 over the other end.
    let ccfg = StackConfig::new("10.9.0.1/24".parse().unwrap(), None);
    let stack = ClientStack::new(i, ccfg).unwrap();
    let stream = stack.connect(portal).unwrap();
    let mut ini = Initiator::with_transport(stream).unwrap();
    assert_eq!(ini.stream().peer_addr(), portal);
    ini.login(&LoginOptions {
        target_name: Some(TARGET.into()),
        ..Default::default()
    })
    .unwrap();
    // The new nexus's unit attentions first.
    for _ in 0..8 {
        if ini.test_unit_ready(0).unwrap().is_good() {
            break;
        }
    }
    // 1 MiB written in 256 KiB commands at once, read back in one.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|k| (k.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let itts: Vec<u32> = data
        .chunks(256 * 1024)
        .enumerate()
        .map(|(k, c)| {
            let lba = (k * 512) as u64;
            ini.submit(
                0,
                &iscsi_tgt::initiator::cdb::write16(lba, 512),
                Some(c),
                c.len() as u32,
                false,
            )
            .unwrap()
        })
        .collect();
    for itt in itts {
        ini.wait(itt).unwrap().good().unwrap();
    }
    let back = ini.read16(0, 0, 2048, 512).unwrap();
    assert!(back == data, "the data read back differs");
    ini.logout().unwrap();
    drop(ini);
    assert!(
        stack.finish(Duration::from_secs(30)),
        "the connection did not finish closing"
    );

    // A port nothing listens on answers with a reset.
    let e = stack
        .connect("10.9.0.2:3261".parse().unwrap())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    // The initiator reports a transport that fails as an I/O error.
    let mut ini = Initiator::with_transport(stack.connect(portal).unwrap()).unwrap();
    ini.set_timeout(Some(Duration::from_millis(200))).unwrap();
    ini.send_raw(&[0u8; 10]).unwrap();
    match ini.recv_pdu() {
        Err(InitiatorError::Io(e)) => assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    drop(ini);
    reactors.stop();
}

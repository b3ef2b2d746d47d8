//! A connection's state machine run over an in-memory socket, fed bytes and (virtual) time:
//! no network, no reactor. What the target sends is parsed back PDU by PDU.

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use iscsi_tgt::env::{self, PoolConfig};
use iscsi_tgt::iscsi::config::{Publisher, Snapshot};
use iscsi_tgt::iscsi::conn::{Conn, ConnCtx, Phase};
use iscsi_tgt::iscsi::engine::Shared;
use iscsi_tgt::iscsi::login;
use iscsi_tgt::iscsi::pdu::{self, Pdu, BHS_LEN};
use iscsi_tgt::iscsi::registry::Registry;
use iscsi_tgt::iscsi::text;
use iscsi_tgt::mgmt::{Hooks, Mgmt};
use iscsi_tgt::net::mem::{MemGroup, MemSock};
use iscsi_tgt::net::{SockGroup, SockId};
use iscsi_tgt::scsi::ScsiPort;

const TARGET: &str = "iqn.2026-11.org.iscsi-tgt:mem";

fn init_pool() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = env::init(PoolConfig {
            mem_size_mb: 64,
            hugepages: false,
            memory: None,
        });
    });
}

/// A target with a RAM LUN, a connection to it over an in-memory socket, and a clock.
struct Rig {
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    port: ScsiPort,
    net: MemGroup,
    sock: SockId,
    conn: Conn,
    now: Instant,
    /// Bytes of the output already parsed.
    seen: usize,
    _mgmt: Arc<Mgmt>,
}

impl Rig {
    fn new() -> Rig {
        init_pool();
        let publisher = Publisher::new();
        let registry = Registry::new();
        let m = Mgmt::new(publisher.clone(), registry.clone(), Hooks::default());
        m.mgmt("handlers/vdisk_ramio", "add_device r0 size_mb=1")
            .unwrap();
        m.mgmt("targets/iscsi", &format!("add_target {TARGET}"))
            .unwrap();
        m.mgmt(&format!("targets/iscsi/{TARGET}/luns"), "add r0 0")
            .unwrap();
        m.set(&format!("targets/iscsi/{TARGET}/enabled"), "1")
            .unwrap();
        m.set("targets/iscsi/enabled", "1").unwrap();
        let shared = Shared::new(
            publisher.clone(),
            registry,
            vec![SocketAddr::from(([127, 0, 0, 1], 3260))],
            1,
            usize::MAX,
        );
        let mut net = MemGroup::new();
        let sock = net.add(MemSock {
            keep_output: true,
            ..MemSock::new(Vec::new())
        });
        let now = Instant::now();
        let conn = Conn::new(sock, net.addrs(sock), 0, now);
        Rig {
            shared,
            snap: publisher.current(),
            port: ScsiPort::new(),
            net,
            sock,
            conn,
            now,
            seen: 0,
            _mgmt: m,
        }
    }

    /// The initiator sends `bytes`; the connection reads and answers.
    fn send(&mut self, bytes: &[u8]) {
        self.net
            .sock_mut(self.sock)
            .unwrap()
            .input
            .extend_from_slice(bytes);
        self.pass();
    }

    /// One reactor pass: read, complete backend I/O, flush, timers.
    fn pass(&mut self) {
        for _ in 0..100 {
            let mut cx = ConnCtx {
                now: self.now,
                snapshot: &self.snap,
                shared: &self.shared,
                port: &mut self.port,
                net: &mut self.net,
                index: 0,
            };
            let did = self.conn.on_readable(&mut cx);
            let mut done = Vec::new();
            cx.port.poll(&mut done);
            let any = !done.is_empty();
            for c in done {
                let (_, slot) = iscsi_tgt::iscsi::conn::split_task_tag(c.tag());
                self.conn.on_completion(slot, c, &mut cx);
            }
            self.conn.flush(&mut cx);
            self.conn.on_timer(&mut cx);
            if !did && !any && cx.port.inflight() == 0 && !self.conn.rx_more() {
                return;
            }
        }
    }

    /// Lets `d` of virtual time pass.
    fn wait(&mut self, d: Duration) {
        self.now += d;
        self.pass();
    }

    /// The PDUs sent since the last call, with their data segments.
    fn received(&mut self) -> Vec<(Pdu, Vec<u8>)> {
        let out = &self.net.sock_mut(self.sock).unwrap().output;
        let mut v = Vec::new();
        while out.len() >= self.seen + BHS_LEN {
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&out[self.seen..self.seen + BHS_LEN]);
            let p = Pdu::parse(&bhs, &[]).expect("the target sends well-formed PDUs");
            let dsl =
                (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
            let start = self.seen + BHS_LEN + usize::from(bhs[4]) * 4;
            let data = out[start..start + dsl].to_vec();
            self.seen = start + pdu::padded(dsl);
            v.push((p, data));
        }
        v
    }

    fn login(&mut self) {
        let data = text::encode([
            ("InitiatorName", "iqn.2026-11.org.test:ini"),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
        ]);
        let req = pdu::LoginRequest {
            transit: true,
            csg: login::OPERATIONAL,
            nsg: login::FULL_FEATURE,
            isid: [0x80, 0, 0, 0, 0, 7],
            itt: 1,
            cmd_sn: 1,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        req.emit(&mut bhs);
        self.send(&wire(&bhs, &data));
        let got = self.received();
        match got.as_slice() {
            [(Pdu::LoginResponse(r), _)] => {
                assert_eq!((r.status_class, r.status_detail), (0, 0), "{r:?}");
                assert!(r.transit && r.nsg == login::FULL_FEATURE, "{r:?}");
            }
            other => panic!("expected one Login Response, got {other:?}"),
        }
        assert_eq!(self.conn.phase(), Phase::FullFeature);
    }
}

fn nop_out(itt: u32, cmd_sn: u32, ping: &[u8]) -> Vec<u8> {
    let p = pdu::NopOut {
        immediate: true,
        final_flag: true,
        itt,
        ttt: 0xffff_ffff,
        cmd_sn,
        exp_stat_sn: 1,
        data_segment_length: ping.len() as u32,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    p.emit(&mut bhs);
    wire(&bhs, ping)
}

/// A PDU as it goes on the wire: header, then data padded to four bytes.
fn wire(bhs: &[u8; BHS_LEN], data: &[u8]) -> Vec<u8> {
    let mut v = bhs.to_vec();
    v.extend_from_slice(data);
    v.resize(BHS_LEN + pdu::padded(data.len()), 0);
    v
}

#[test]
fn a_ping_is_echoed_even_when_it_arrives_a_byte_at_a_time() {
    let mut r = Rig::new();
    r.login();
    r.net.sock_mut(r.sock).unwrap().chunk = 1;
    r.send(&nop_out(0x42, 2, b"are you there"));
    let got = r.received();
    match got.as_slice() {
        [(Pdu::NopIn(n), data)] => {
            assert_eq!(n.itt, 0x42);
            assert_eq!(n.ttt, 0xffff_ffff);
            assert_eq!(data, b"are you there");
        }
        other => panic!("expected the NOP-In echo, got {other:?}"),
    }
}

#[test]
fn a_connection_that_never_logs_in_is_closed_by_the_clock() {
    let mut r = Rig::new();
    r.wait(Duration::from_secs(5));
    assert_eq!(r.conn.phase(), Phase::Login, "still waiting after 5 s");
    r.wait(Duration::from_secs(60));
    assert_eq!(r.conn.phase(), Phase::Closed);
    assert!(
        r.net.sock_mut(r.sock).unwrap().closed,
        "the socket was closed"
    );
}

#[test]
fn an_idle_session_is_pinged_and_closed_when_the_ping_goes_unanswered() {
    let mut r = Rig::new();
    r.login();
    // The default NopInInterval is 30 s, NopInTimeout 30 s.
    let mut pinged = None;
    for _ in 0..40 {
        r.wait(Duration::from_secs(1));
        if let Some((Pdu::NopIn(n), _)) = r.received().into_iter().next() {
            assert_eq!(n.itt, 0xffff_ffff, "a target-initiated NOP-In");
            assert_ne!(n.ttt, 0xffff_ffff, "it asks for an answer");
            pinged = Some(n.ttt);
            break;
        }
    }
    assert!(pinged.is_some(), "no NOP-In within 40 s of silence");
    assert_eq!(r.conn.phase(), Phase::FullFeature);
    r.wait(Duration::from_secs(120));
    assert_eq!(r.conn.phase(), Phase::Closed, "an unanswered ping ends it");
}

#[test]
fn a_peer_that_closes_ends_the_connection() {
    let mut r = Rig::new();
    r.login();
    r.net.sock_mut(r.sock).unwrap().eof = true;
    r.pass();
    assert_eq!(r.conn.phase(), Phase::Closed);
    assert!(r.conn.is_finished());
}

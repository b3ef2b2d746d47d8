//! A target with a RAM LUN and one connection to it over an in-memory socket, driven pass by
//! pass with a virtual clock: what the target sends is parsed back PDU by PDU. Shared by the
//! tests that run a connection without a network (`#[path]`-included).
#![allow(dead_code)]

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
use iscsi_tgt::scsi::{Completion, ScsiPort};

pub const TARGET: &str = "iqn.2026-11.org.iscsi-tgt:mem";

pub fn init_pool() {
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
pub struct Rig {
    pub shared: Arc<Shared>,
    pub snap: Arc<Snapshot>,
    pub port: ScsiPort,
    pub net: MemGroup,
    pub sock: SockId,
    pub conn: Conn,
    pub now: Instant,
    /// Bytes of the output already parsed.
    pub seen: usize,
    /// Backend completions of a pass (kept, so that a pass allocates nothing of its own).
    pub done: Vec<Completion>,
    pub _mgmt: Arc<Mgmt>,
}

impl Rig {
    pub fn new() -> Rig {
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
            done: Vec::with_capacity(256),
            _mgmt: m,
        }
    }

    /// The initiator sends `bytes`; the connection reads and answers.
    pub fn send(&mut self, bytes: &[u8]) {
        self.net
            .sock_mut(self.sock)
            .unwrap()
            .input
            .extend_from_slice(bytes);
        self.pass();
    }

    /// Reads (when `read`) and completes backend I/O; returns whether the connection read
    /// anything and whether there were completions.
    fn receive_and_complete(&mut self, read: bool) -> (bool, bool) {
        let mut cx = ConnCtx {
            now: self.now,
            snapshot: &self.snap,
            shared: &self.shared,
            port: &mut self.port,
            net: &mut self.net,
            index: 0,
        };
        let did = read && self.conn.on_readable(&mut cx);
        cx.port.poll(&mut self.done);
        let any = !self.done.is_empty();
        for c in self.done.drain(..) {
            let (_, slot) = iscsi_tgt::iscsi::conn::split_task_tag(c.tag());
            self.conn.on_completion(slot, c, &mut cx);
        }
        (did, any)
    }

    /// One reactor pass: read, complete backend I/O, flush, timers.
    pub fn pass(&mut self) {
        for _ in 0..100 {
            // As the reactor does: the connection reads when its socket is readable
            // (level-triggered) or when it stopped at its receive budget.
            let readable = self
                .net
                .sock_mut(self.sock)
                .is_some_and(|m| m.pos < m.input.len() || m.eof)
                || self.conn.rx_more();
            let (did, any) = self.receive_and_complete(readable);
            let mut cx = ConnCtx {
                now: self.now,
                snapshot: &self.snap,
                shared: &self.shared,
                port: &mut self.port,
                net: &mut self.net,
                index: 0,
            };
            self.conn.flush(&mut cx);
            self.conn.on_timer(&mut cx);
            if !did && !any && cx.port.inflight() == 0 && !self.conn.rx_more() {
                return;
            }
        }
    }

    /// Reads and executes what arrived, and completes backend I/O, without sending anything:
    /// the responses stay queued (for the coalescing decision).
    pub fn pass_without_flush(&mut self) {
        self.receive_and_complete(true);
    }

    /// Lets `d` of virtual time pass.
    pub fn wait(&mut self, d: Duration) {
        self.now += d;
        self.pass();
    }

    /// The PDUs sent since the last call, with their data segments.
    pub fn received(&mut self) -> Vec<(Pdu, Vec<u8>)> {
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

    pub fn login(&mut self) {
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

pub fn nop_out(itt: u32, cmd_sn: u32, ping: &[u8]) -> Vec<u8> {
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
pub fn wire(bhs: &[u8; BHS_LEN], data: &[u8]) -> Vec<u8> {
    let mut v = bhs.to_vec();
    v.extend_from_slice(data);
    v.resize(BHS_LEN + pdu::padded(data.len()), 0);
    v
}

/// A SCSI Command PDU on the wire, with `immediate` as its immediate data.
pub fn scsi_command(
    itt: u32,
    cmd_sn: u32,
    cdb: &[u8],
    dir: (bool, bool),
    edtl: u32,
    immediate: &[u8],
) -> Vec<u8> {
    let mut c = [0u8; 16];
    c[..cdb.len()].copy_from_slice(cdb);
    let p = pdu::ScsiCommand {
        final_flag: true,
        read: dir.0,
        write: dir.1,
        itt,
        cmd_sn,
        exp_stat_sn: 1,
        expected_data_transfer_length: edtl,
        cdb: c,
        data_segment_length: immediate.len() as u32,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    p.emit(&mut bhs);
    wire(&bhs, immediate)
}

/// A Data-Out PDU on the wire answering R2T `ttt` of command `itt`.
pub fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, data: &[u8], last: bool) -> Vec<u8> {
    let p = pdu::DataOut {
        final_flag: last,
        itt,
        ttt,
        exp_stat_sn: 1,
        data_sn,
        buffer_offset: offset,
        data_segment_length: data.len() as u32,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    p.emit(&mut bhs);
    wire(&bhs, data)
}

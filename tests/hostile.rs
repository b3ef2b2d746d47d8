//! A hostile or broken peer must not take the daemon down: after each case the daemon is
//! still running and a fresh login with TEST UNIT READY still works.
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{tur_good, Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, InitiatorError, LoginOptions};
use iscsi_tgt::iscsi::pdu::{self, op, BHS_LEN, RESERVED_TAG};
use serde_json::json;

const INITIATOR: &str = "iqn.2026-11.org.iscsi-tgt:hostile";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn login(t: &Target) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    ini
}

/// The daemon is alive and serves a new session.
fn healthy(t: &mut Target, case: &str) {
    assert!(t.alive(), "daemon died after {case}: {}", t.log());
    let mut ini = login(t);
    tur_good(&mut ini);
    ini.logout()
        .unwrap_or_else(|e| panic!("logout after {case}: {e}"));
}

/// Half-closes `s` and reads until the target closes; returns what it sent.
fn drain_until_closed(mut s: TcpStream, case: &str) -> Vec<u8> {
    let _ = s.shutdown(Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("{case}: the target kept the connection open: {e}"),
        }
    }
}

fn login_request(data_len: u32) -> [u8; BHS_LEN] {
    let req = pdu::LoginRequest {
        transit: true,
        csg: 0,
        nsg: 1,
        isid: [0x80, 0, 0, 0, 0, 9],
        itt: 1,
        cmd_sn: 1,
        data_segment_length: data_len,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    req.emit(&mut bhs);
    bhs
}

#[test]
fn garbage_on_a_fresh_connection() {
    let mut t = Target::with_default_luns(16);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..16 {
        let mut s = t.connect_raw();
        let n = 48 + (rng.next() % 400) as usize;
        let _ = s.write_all(&rng.bytes(n));
        drain_until_closed(s, &format!("garbage #{i}"));
    }
    healthy(&mut t, "garbage");
}

#[test]
fn truncated_pdu_then_close() {
    let mut t = Target::with_default_luns(16);
    let mut s = t.connect_raw();
    s.write_all(&login_request(100)[..20]).unwrap();
    drop(s);
    // A whole header, but only half of its data segment.
    let mut s = t.connect_raw();
    let data = iscsi_tgt::iscsi::text::encode([("InitiatorName", INITIATOR), ("x", "y")]);
    s.write_all(&login_request(data.len() as u32)).unwrap();
    s.write_all(&data[..data.len() / 2]).unwrap();
    drain_until_closed(s, "truncated data segment");
    healthy(&mut t, "truncated PDUs");
}

#[test]
fn huge_data_segment_length() {
    let mut t = Target::with_default_luns(16);
    // During login (8192 bytes allowed).
    let mut s = t.connect_raw();
    s.write_all(&login_request(0x00ff_ffff)).unwrap();
    s.write_all(&[0u8; 1024]).unwrap();
    drain_until_closed(s, "huge login data segment");
    // In full feature phase (beyond the target's MaxRecvDataSegmentLength).
    let mut ini = login(&t);
    let nop = pdu::NopOut {
        immediate: true,
        final_flag: true,
        itt: 77,
        ttt: RESERVED_TAG,
        cmd_sn: ini.next_cmd_sn(),
        exp_stat_sn: ini.exp_stat_sn(),
        data_segment_length: 0x00ff_ffff,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    nop.emit(&mut bhs);
    ini.send_raw(&bhs).unwrap();
    let _ = ini.send_raw(&[0u8; 4096]);
    ini.set_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        match ini.recv_pdu() {
            Ok(_) => continue,
            Err(InitiatorError::Closed) => break,
            Err(InitiatorError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("connection should be dropped: {e}"),
        }
    }
    healthy(&mut t, "huge data segment length");
}

#[test]
fn login_to_an_unknown_target() {
    let mut t = Target::with_default_luns(16);
    let mut ini = Initiator::connect(t.addr).unwrap();
    let e = ini
        .login(&LoginOptions {
            initiator_name: INITIATOR.into(),
            target_name: Some("iqn.2026-11.org.iscsi-tgt:nobody-home".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            InitiatorError::LoginRejected {
                class: 2,
                detail: 3
            }
        ),
        "expected status 0x0203, got {e}"
    );
    healthy(&mut t, "login to an unknown target");
}

#[test]
fn scsi_command_before_login() {
    let mut t = Target::with_default_luns(16);
    let mut s = t.connect_raw();
    let mut c = [0u8; 16];
    c[..6].copy_from_slice(&cdb::test_unit_ready());
    let cmd = pdu::ScsiCommand {
        itt: 5,
        cmd_sn: 1,
        cdb: c,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    cmd.emit(&mut bhs);
    s.write_all(&bhs).unwrap();
    let got = drain_until_closed(s, "SCSI command before login");
    // Either dropped outright or refused with a Login Response carrying an error status.
    if got.len() >= BHS_LEN {
        assert_eq!(
            got[0] & 0x3f,
            op::LOGIN_RESPONSE,
            "{:02x?}",
            &got[..BHS_LEN]
        );
        assert_ne!(got[36], 0, "login status class must be an error");
    }
    healthy(&mut t, "SCSI command before login");
}

#[test]
fn unknown_opcode_in_full_feature_phase_is_rejected() {
    let mut t = Target::with_default_luns(16);
    let mut ini = login(&t);
    tur_good(&mut ini);
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x40 | 0x1d; // immediate, opcode 0x1d (not defined)
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&0x4242u32.to_be_bytes());
    bhs[24..28].copy_from_slice(&ini.next_cmd_sn().to_be_bytes());
    bhs[28..32].copy_from_slice(&ini.exp_stat_sn().to_be_bytes());
    ini.send_raw(&bhs).unwrap();
    let (h, data) = ini.recv_pdu().unwrap();
    assert_eq!(h[0] & 0x3f, op::REJECT, "{h:02x?}");
    let rej = pdu::Reject::parse(&h, &[]).unwrap();
    assert!(
        matches!(
            rej.reason,
            pdu::REJECT_PROTOCOL_ERROR | pdu::REJECT_COMMAND_NOT_SUPPORTED
        ),
        "reason {:#04x}",
        rej.reason
    );
    assert_eq!(rej.itt, RESERVED_TAG);
    assert_eq!(data.len(), BHS_LEN, "the rejected header comes back");
    assert_eq!(data[..], bhs[..]);
    // The connection goes on.
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    ini.nop().unwrap();
    ini.logout().unwrap();
    healthy(&mut t, "unknown opcode");
}

#[test]
fn data_out_for_unknown_task() {
    let mut t = Target::with_default_luns(16);
    let mut ini = login(&t);
    tur_good(&mut ini);
    for (itt, ttt) in [(0xdead, 0xbeef), (0xdead, RESERVED_TAG), (RESERVED_TAG, 7)] {
        let d = pdu::DataOut {
            final_flag: true,
            itt,
            ttt,
            exp_stat_sn: ini.exp_stat_sn(),
            buffer_offset: 0,
            data_segment_length: 512,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        d.emit(&mut bhs);
        ini.send_pdu(&bhs, &[], &[0x5a; 512]).unwrap();
    }
    // Ignored (or rejected); the session still works.
    ini.nop().unwrap();
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    let data = vec![0x33u8; 4096];
    ini.write10(0, 0, &data, 512).unwrap();
    assert_eq!(ini.read10(0, 0, 8, 512).unwrap(), data);
    ini.logout().unwrap();
    healthy(&mut t, "Data-Out for an unknown task");
}

#[test]
fn data_out_outside_its_r2t_fails_the_command() {
    let mut t = Target::with_default_luns(16);
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: Some(IQN.into()),
        keys: vec![
            ("ImmediateData".into(), "No".into()),
            ("InitialR2T".into(), "Yes".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    tur_good(&mut ini);
    let mut c = [0u8; 16];
    c[..10].copy_from_slice(&cdb::write10(0, 8));
    let cmd = pdu::ScsiCommand {
        write: true,
        itt: 0x777,
        lun: pdu::encode_lun(0),
        expected_data_transfer_length: 4096,
        cmd_sn: ini.consume_cmd_sn(),
        exp_stat_sn: ini.exp_stat_sn(),
        cdb: c,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    cmd.emit(&mut bhs);
    ini.send_raw(&bhs).unwrap();
    let (h, _) = ini.recv_pdu().unwrap();
    assert_eq!(h[0] & 0x3f, op::R2T);
    let r2t = pdu::R2t::parse(&h, &[]).unwrap();
    // Data beyond what the R2T asked for.
    let d = pdu::DataOut {
        final_flag: true,
        itt: 0x777,
        ttt: r2t.ttt,
        exp_stat_sn: ini.exp_stat_sn(),
        buffer_offset: r2t.buffer_offset + r2t.desired_data_transfer_length,
        data_segment_length: 512,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    d.emit(&mut bhs);
    ini.send_pdu(&bhs, &[], &[1; 512]).unwrap();
    let (h, data) = ini.recv_pdu().unwrap();
    assert_eq!(h[0] & 0x3f, op::SCSI_RESPONSE, "{h:02x?}");
    let rsp = pdu::ScsiResponse::parse(&h, &[]).unwrap();
    assert_eq!(rsp.itt, 0x777);
    assert_eq!(rsp.status, 0x02, "CHECK CONDITION");
    assert!(data.len() > 2 + 2, "sense data");
    assert_eq!(data[2 + 2] & 0x0f, 0x0b, "ABORTED COMMAND");
    // The session goes on.
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    ini.logout().unwrap();
    healthy(&mut t, "Data-Out outside its R2T");
}

#[test]
fn command_outside_the_cmd_sn_window_is_ignored() {
    let mut t = Target::with_default_luns(16);
    let mut ini = login(&t);
    tur_good(&mut ini);
    let mut c = [0u8; 16];
    c[..6].copy_from_slice(&cdb::test_unit_ready());
    let cmd = pdu::ScsiCommand {
        itt: 0x999,
        cmd_sn: ini.max_cmd_sn().wrapping_add(1000),
        exp_stat_sn: ini.exp_stat_sn(),
        cdb: c,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    cmd.emit(&mut bhs);
    ini.send_raw(&bhs).unwrap();
    // The next in-window command is answered, and nothing for the ignored one arrives first.
    let r = ini.test_unit_ready(0).unwrap();
    assert!(r.is_good(), "{r:?}");
    ini.nop().unwrap();
    ini.logout().unwrap();
    healthy(&mut t, "command outside the CmdSN window");
}

#[test]
fn rpc_errors_name_the_problem() {
    let mut t = Target::with_default_luns(16);
    // Each call fails, and its message names what was wrong.
    let fails_naming = |method: &str, params: serde_json::Value, needle: &str| {
        let e = t.try_call(method, params).unwrap_err();
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{e}");
    };
    fails_naming("frobnicate_target", json!({}), "frobnicate_target");
    fails_naming(
        "ls",
        json!({"path": "targets/iscsi/iqn.2026-11.nowhere:x"}),
        "iqn.2026-11.nowhere:x",
    );
    let luns_mgmt = format!("targets/iscsi/{IQN}/luns/mgmt");
    fails_naming(
        "mgmt",
        json!({"path": luns_mgmt, "command": "teleport ram0 5"}),
        "teleport",
    );
    fails_naming(
        "mgmt",
        json!({"path": luns_mgmt, "command": "add no_such_device 7"}),
        "no_such_device",
    );
    healthy(&mut t, "RPC errors");
}

//! Session life against the real daemon: a silent connection closed after NopInInterval +
//! RspTimeout, force_close, the asynchronous message that comes with a LUN map change, and the
//! logout request a stopping target sends before it closes.
mod common;

use std::time::{Duration, Instant};

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions};
use iscsi_tgt::iscsi::pdu;
use serde_json::json;

const INITIATOR: &str = "iqn.2026-11.org.iscsi-tgt:sessions-test";

fn login(t: &Target) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap();
    ini
}

fn sessions(t: &Target) -> Vec<String> {
    let v = t.call(
        "ls",
        json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits up to `limit` for the target to have no session; returns how long it took.
fn gone_within(t: &Target, limit: Duration) -> Duration {
    let start = Instant::now();
    while !sessions(t).is_empty() {
        assert!(
            start.elapsed() < limit,
            "the session is still there after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[test]
fn a_silent_connection_is_closed_after_nop_in_interval_plus_rsp_timeout() {
    let t = Target::with_default_luns(8);
    t.set(&format!("targets/iscsi/{IQN}/NopInInterval"), "1");
    t.set(&format!("targets/iscsi/{IQN}/RspTimeout"), "2");
    let _silent = login(&t);
    assert_eq!(sessions(&t), vec![INITIATOR.to_string()]);
    // The initiator reads nothing, so the NOP-In ping goes unanswered.
    // The interval and the timeout, with room for a loaded machine.
    let took = gone_within(&t, Duration::from_secs(1 + 2 + 12));
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
    assert!(t.log().contains(INITIATOR) || t.log().contains("closed"));
}

#[test]
fn an_answering_initiator_is_kept() {
    let t = Target::with_default_luns(8);
    t.set(&format!("targets/iscsi/{IQN}/NopInInterval"), "1");
    t.set(&format!("targets/iscsi/{IQN}/RspTimeout"), "2");
    let mut ini = login(&t);
    ini.set_timeout(Some(Duration::from_millis(4500))).unwrap();
    // Reading answers the pings; after 4.5 s of only pings the session is still there.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(4500) {
        ini.nop().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(sessions(&t), vec![INITIATOR.to_string()]);
    ini.logout().unwrap();
}

#[test]
fn force_close_ends_the_session() {
    let t = Target::with_default_luns(8);
    let mut ini = login(&t);
    t.set(
        &format!("targets/iscsi/{IQN}/sessions/{INITIATOR}/force_close"),
        "1",
    );
    gone_within(&t, Duration::from_secs(15));
    assert!(ini.test_unit_ready(0).is_err());
}

#[test]
fn a_lun_map_change_sends_an_asynchronous_event() {
    let t = Target::with_default_luns(8);
    let mut ini = login(&t);
    ini.set_timeout(Some(Duration::from_secs(5))).unwrap();
    t.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "del 1");
    let (bhs, data) = ini.recv_pdu().unwrap();
    assert_eq!(bhs[0] & 0x3f, pdu::op::ASYNC);
    assert_eq!(bhs[36], 0, "AsyncEvent 0: a SCSI event");
    // Sense length, then fixed sense: UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED.
    let sense = &data[2..];
    assert_eq!(u16::from_be_bytes([data[0], data[1]]) as usize, sense.len());
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (6, 0x3f, 0x0e));
}

#[test]
fn a_stopping_target_asks_for_logout_first() {
    let mut t = Target::with_default_luns(8);
    let mut ini = login(&t);
    ini.set_timeout(Some(Duration::from_secs(5))).unwrap();
    // SAFETY: kill(2) on our own child's pid has no memory-safety effect.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
    let (bhs, _) = ini.recv_pdu().unwrap();
    assert_eq!(bhs[0] & 0x3f, pdu::op::ASYNC);
    assert_eq!(bhs[36], 1, "AsyncEvent 1: the target requests a logout");
    assert!(
        u16::from_be_bytes([bhs[42], bhs[43]]) > 0,
        "Parameter3: time to log out"
    );
    ini.logout().unwrap();
    assert_eq!(t.terminate(), Some(0), "{}", t.log());
}

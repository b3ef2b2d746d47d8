//! Task management across sessions and reactors against the real daemon (two reactors): a
//! write still waiting for its Data-Out in one session is ended with TASK ABORTED by another
//! session's LOGICAL UNIT RESET, CLEAR TASK SET or TARGET WARM RESET, every nexus sees the
//! reset's unit attention, ABORT TASK SET stays within its own nexus, and TARGET COLD RESET
//! closes every session after its response.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator};
use iscsi_tgt::iscsi::pdu;

const RESERVED: u32 = 0xffff_ffff;

fn target() -> Target {
    let t = Target::start(&["--cores", "0,1", "--mode", "adaptive"]);
    t.configure_default(16);
    t
}

fn login(t: &Target, isid_last: u8) -> Initiator {
    // Writes wait for R2T-solicited data: a task can be caught mid-transfer.
    let mut ini = common::login_solicited(
        t,
        &format!("iqn.2026-11.org.iscsi-tgt:tmf-{isid_last}"),
        IQN,
        isid_last,
    );
    clear_uas(&mut ini);
    ini
}

/// TEST UNIT READY on both LUNs until GOOD; returns the unit attentions seen.
fn clear_uas(ini: &mut Initiator) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    for lun in [0, 1] {
        for _ in 0..4 {
            let r = ini.test_unit_ready(lun).unwrap();
            if r.is_good() {
                break;
            }
            seen.extend(r.asc_ascq());
        }
    }
    seen
}

/// Starts a 64 KiB write on LUN 0 and returns its ITT without sending its data.
fn stalled_write(ini: &mut Initiator) -> u32 {
    ini.submit(0, &cdb::write10(0, 128), Some(&[7u8; 65536]), 65536, false)
        .unwrap()
}

/// A target, a requester A and a session B with a write stalled; A's `function` answered.
fn run(function: u8) -> (Target, Initiator, Initiator, u32) {
    let t = target();
    let mut a = login(&t, 1);
    let mut b = login(&t, 2);
    let itt = stalled_write(&mut b);
    t.wait_active_commands("iqn.2026-11.org.iscsi-tgt:tmf-2", 1);
    assert_eq!(
        a.task_mgmt(function, 0, RESERVED).unwrap(),
        pdu::TMF_RSP_COMPLETE
    );
    (t, a, b, itt)
}

#[test]
fn lun_reset_aborts_other_sessions_tasks_with_task_aborted() {
    let (_t, mut a, mut b, itt) = run(pdu::TMF_LOGICAL_UNIT_RESET);
    let (done, r) = b.wait_any().unwrap();
    assert_eq!(done, itt);
    assert_eq!(r.status, 0x40, "TASK ABORTED expected: {r:?}");
    // Both nexuses see BUS DEVICE RESET FUNCTION OCCURRED on LUN 0.
    assert!(clear_uas(&mut a).contains(&(0x29, 0x03)));
    assert!(clear_uas(&mut b).contains(&(0x29, 0x03)));
    // And work normally afterwards.
    b.write10(0, 0, &[1u8; 4096], 512).unwrap();
    assert_eq!(a.read10(0, 0, 8, 512).unwrap(), vec![1u8; 4096]);
}

#[test]
fn clear_task_set_and_warm_reset_reach_other_sessions() {
    let (_t1, _, mut b, itt) = run(pdu::TMF_CLEAR_TASK_SET);
    let (done, r) = b.wait_any().unwrap();
    assert_eq!((done, r.status), (itt, 0x40));

    let (_t2, mut a, mut b, itt) = run(pdu::TMF_TARGET_WARM_RESET);
    let (done, r) = b.wait_any().unwrap();
    assert_eq!((done, r.status), (itt, 0x40));
    assert!(clear_uas(&mut a).contains(&(0x29, 0x00)));
    assert!(clear_uas(&mut b).contains(&(0x29, 0x00)));
}

#[test]
fn abort_task_set_stays_within_its_nexus() {
    let t = target();
    let mut a = login(&t, 1);
    let mut b = login(&t, 2);
    let theirs = stalled_write(&mut b);
    let _mine = stalled_write(&mut a);
    t.wait_active_commands("", 2);
    assert_eq!(
        a.task_mgmt(pdu::TMF_ABORT_TASK_SET, 0, RESERVED).unwrap(),
        pdu::TMF_RSP_COMPLETE
    );
    // B's write goes on and completes.
    let (done, r) = b.wait_any().unwrap();
    assert_eq!(done, theirs);
    assert!(r.is_good(), "{r:?}");
    // CLEAR ACA has nothing to clear; TASK REASSIGN does not exist at ERL 0.
    assert_eq!(
        b.task_mgmt(pdu::TMF_CLEAR_ACA, 0, RESERVED).unwrap(),
        pdu::TMF_RSP_COMPLETE
    );
    assert_eq!(
        b.task_mgmt(pdu::TMF_TASK_REASSIGN, 0, theirs).unwrap(),
        pdu::TMF_RSP_REASSIGN_NOT_SUPPORTED
    );
}

#[test]
fn cold_reset_closes_every_session_after_answering() {
    let mut t = target();
    let mut a = login(&t, 1);
    let mut b = login(&t, 2);
    assert_eq!(
        a.task_mgmt(pdu::TMF_TARGET_COLD_RESET, 0, RESERVED)
            .unwrap(),
        pdu::TMF_RSP_COMPLETE
    );
    assert!(
        a.test_unit_ready(0).is_err(),
        "the requester's connection closes"
    );
    assert!(b.test_unit_ready(0).is_err(), "every other session closes");
    assert!(t.alive());
    let mut c = login(&t, 3);
    c.logout().unwrap();
}

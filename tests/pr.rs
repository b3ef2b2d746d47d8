//! Persistent reservations (SPC-4 §5.13) and RESERVE/RELEASE (SPC-2) end to end, against the
//! real daemon (two reactors) with sessions of different initiator names: registration and
//! READ KEYS, the conflicts of each reservation type for registered and unregistered I_T
//! nexuses, RESERVE(6)/(10) beside persistent reservations, the unit attentions other
//! nexuses see, PREEMPT AND ABORT ending another session's outstanding command, and APTPL
//! state surviving a restart of the daemon.
mod common;

use std::time::Duration;

use common::{Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, ScsiResult};
use serde_json::json;

const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;

const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);

// PERSISTENT RESERVE OUT service actions and reservation types (SPC-4 §6.16.1, §6.15.3).
const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const RELEASE: u8 = 0x02;
const CLEAR: u8 = 0x03;
const PREEMPT: u8 = 0x04;
const PREEMPT_AND_ABORT: u8 = 0x05;
const WRITE_EXCLUSIVE: u8 = 0x1;
const EXCLUSIVE_ACCESS: u8 = 0x3;
const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 0x5;
const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 0x6;
const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 0x7;
const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 0x8;

fn target() -> Target {
    let t = Target::start(&["--cores", "0,1", "--mode", "adaptive"]);
    t.configure_default(16);
    t
}

/// A session of initiator `name`: writes wait for R2T-solicited data, so that a write can be
/// caught before its data. Its first unit attentions are cleared.
fn login(t: &Target, name: &str, isid_last: u8) -> Initiator {
    let mut ini = common::login_solicited(
        t,
        &format!("iqn.2026-12.org.iscsi-tgt:pr-{name}"),
        IQN,
        isid_last,
    );
    uas(&mut ini);
    // LUN 1 (another logical unit) has its own power on unit attention.
    for _ in 0..4 {
        if ini.test_unit_ready(1).unwrap().is_good() {
            break;
        }
    }
    ini
}

/// TEST UNIT READY on LUN 0 until it answers without a unit attention; returns the unit
/// attentions seen, in order.
fn uas(ini: &mut Initiator) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    for _ in 0..8 {
        let r = ini.test_unit_ready(0).unwrap();
        match r.sense_key() {
            Some(0x6) => seen.extend(r.asc_ascq()),
            _ => return seen,
        }
    }
    panic!("unit attentions without end: {seen:?}");
}

/// PERSISTENT RESERVE OUT on LUN 0 with the basic parameter list.
fn pr_out(ini: &mut Initiator, sa: u8, ty: u8, key: u64, sa_key: u64, aptpl: bool) -> ScsiResult {
    let c = [0x5f, sa, ty & 0x0f, 0, 0, 0, 0, 0, 24, 0];
    let mut p = [0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    ini.scsi(0, &c, Some(&p), 24, false).unwrap()
}

fn pr_out_good(ini: &mut Initiator, sa: u8, ty: u8, key: u64, sa_key: u64) {
    let r = pr_out(ini, sa, ty, key, sa_key, false);
    assert!(r.is_good(), "PR OUT {sa:#x}: {r:?}");
}

/// PERSISTENT RESERVE IN of service action `sa`.
fn pr_in(ini: &mut Initiator, sa: u8) -> ScsiResult {
    ini.scsi(
        0,
        &[0x5e, sa, 0, 0, 0, 0, 0, 0x10, 0, 0],
        None,
        0x1000,
        true,
    )
    .unwrap()
}

/// READ KEYS: PRGENERATION and the keys.
fn read_keys(ini: &mut Initiator) -> (u32, Vec<u64>) {
    let r = pr_in(ini, 0x00).good().unwrap();
    let d = r.data;
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let keys = d[8..8 + len]
        .chunks(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect();
    (gen, keys)
}

/// READ RESERVATION: the holder's key and the type, if a reservation exists.
fn read_reservation(ini: &mut Initiator) -> Option<(u64, u8)> {
    let d = pr_in(ini, 0x01).good().unwrap().data;
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap());
    (len > 0).then(|| {
        (
            u64::from_be_bytes(d[8..16].try_into().unwrap()),
            d[21] & 0x0f,
        )
    })
}

fn read_status(ini: &mut Initiator) -> u8 {
    ini.scsi(0, &cdb::read10(0, 1), None, 512, true)
        .unwrap()
        .status
}

fn write_status(ini: &mut Initiator) -> u8 {
    ini.scsi(0, &cdb::write10(0, 1), Some(&[9u8; 512]), 512, false)
        .unwrap()
        .status
}

#[test]
fn registration_and_read_keys() {
    let t = target();
    let mut a = login(&t, "a", 1);
    let mut b = login(&t, "b", 2);
    assert_eq!(read_keys(&mut a), (0, vec![]));
    pr_out_good(&mut a, REGISTER, 0, 0, 0xaaaa);
    pr_out_good(&mut b, REGISTER, 0, 0, 0xbbbb);
    let (gen, mut keys) = read_keys(&mut b);
    keys.sort();
    assert_eq!((gen, keys), (2, vec![0xaaaa, 0xbbbb]));
    // A REGISTER with the wrong key conflicts; registrations alone restrict nothing.
    let r = pr_out(&mut a, REGISTER, 0, 0x1234, 0x5555, false);
    assert_eq!((r.status, r.sense.len()), (RESERVATION_CONFLICT, 0));
    assert_eq!(read_status(&mut b), GOOD);
    assert_eq!(write_status(&mut a), GOOD);
    assert_eq!(read_reservation(&mut a), None);
    // Unregistering (service action key 0) takes the key away.
    pr_out_good(&mut a, REGISTER, 0, 0xaaaa, 0);
    assert_eq!(read_keys(&mut a), (3, vec![0xbbbb]));
    // REPORT CAPABILITIES: no APTPL file configured, PTPL_C=0.
    let caps = pr_in(&mut a, 0x02).good().unwrap().data;
    assert_eq!(u16::from_be_bytes([caps[0], caps[1]]), 8);
    assert_eq!(caps[2] & 0x01, 0, "PTPL_C without a file: {caps:?}");
}

#[test]
fn each_reservation_type_conflicts_as_spc4_says() {
    let t = target();
    let mut holder = login(&t, "holder", 1);
    let mut registered = login(&t, "registered", 2);
    let mut stranger = login(&t, "stranger", 3);
    // (type, registered read, registered write, stranger read, stranger write)
    let c = RESERVATION_CONFLICT;
    let table = [
        (WRITE_EXCLUSIVE, GOOD, c, GOOD, c),
        (EXCLUSIVE_ACCESS, c, c, c, c),
        (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, GOOD, GOOD, GOOD, c),
        (EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, GOOD, GOOD, c, c),
        (WRITE_EXCLUSIVE_ALL_REGISTRANTS, GOOD, GOOD, GOOD, c),
        (EXCLUSIVE_ACCESS_ALL_REGISTRANTS, GOOD, GOOD, c, c),
    ];
    for (ty, rr, rw, sr, sw) in table {
        pr_out_good(&mut holder, REGISTER, 0, 0, 0x1);
        pr_out_good(&mut registered, REGISTER, 0, 0, 0x2);
        pr_out_good(&mut holder, RESERVE, ty, 0x1, 0);
        let got = (
            read_status(&mut registered),
            write_status(&mut registered),
            read_status(&mut stranger),
            write_status(&mut stranger),
        );
        assert_eq!(got, (rr, rw, sr, sw), "type {ty:#x}");
        assert_eq!(read_status(&mut holder), GOOD, "type {ty:#x}");
        assert_eq!(write_status(&mut holder), GOOD, "type {ty:#x}");
        // What every reservation lets through: INQUIRY, and TEST UNIT READY.
        let r = stranger.scsi(0, &cdb::inquiry(36), None, 36, true).unwrap();
        assert!(r.is_good(), "type {ty:#x}: {r:?}");
        assert_eq!(
            stranger.test_unit_ready(0).unwrap().status,
            GOOD,
            "type {ty:#x}"
        );
        // The other LUN is another logical unit: untouched.
        let r = stranger
            .scsi(1, &cdb::write10(0, 1), Some(&[1u8; 512]), 512, false)
            .unwrap();
        assert!(r.is_good(), "type {ty:#x}: {r:?}");
        let shown = read_reservation(&mut stranger).unwrap();
        let holder_key = if ty >= WRITE_EXCLUSIVE_ALL_REGISTRANTS {
            0
        } else {
            1
        };
        assert_eq!(shown, (holder_key, ty));
        // CLEAR ends it all; the other registrant hears RESERVATIONS PREEMPTED.
        pr_out_good(&mut holder, CLEAR, 0, 0x1, 0);
        assert_eq!(
            uas(&mut registered),
            vec![RESERVATIONS_PREEMPTED],
            "{ty:#x}"
        );
        assert!(uas(&mut stranger).is_empty());
        assert_eq!(write_status(&mut stranger), GOOD);
    }
}

#[test]
fn reserve_and_release_beside_persistent_reservations() {
    let t = target();
    let mut a = login(&t, "a", 1);
    let mut b = login(&t, "b", 2);
    // SPC-2: a RESERVE(6) shuts every other nexus out of the medium and of persistent
    // reservations, but not out of INQUIRY.
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    let release6 = [0x17, 0, 0, 0, 0, 0];
    assert!(a.scsi(0, &reserve6, None, 0, false).unwrap().is_good());
    assert_eq!(read_status(&mut b), RESERVATION_CONFLICT);
    assert_eq!(b.test_unit_ready(0).unwrap().status, RESERVATION_CONFLICT);
    assert_eq!(pr_in(&mut b, 0).status, RESERVATION_CONFLICT);
    let r = pr_out(&mut b, REGISTER, 0, 0, 0xb, false);
    assert_eq!(r.status, RESERVATION_CONFLICT);
    assert!(b
        .scsi(0, &cdb::inquiry(36), None, 36, true)
        .unwrap()
        .is_good());
    assert_eq!(
        b.scsi(0, &reserve6, None, 0, false).unwrap().status,
        RESERVATION_CONFLICT
    );
    assert_eq!(read_status(&mut a), GOOD);
    // RELEASE from another nexus changes nothing; from the holder it ends the reservation.
    assert!(b.scsi(0, &release6, None, 0, false).unwrap().is_good());
    assert_eq!(read_status(&mut b), RESERVATION_CONFLICT);
    assert!(a.scsi(0, &release6, None, 0, false).unwrap().is_good());
    assert_eq!(write_status(&mut b), GOOD);
    // A session that ends takes its RESERVE(10) with it.
    let reserve10 = [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(a.scsi(0, &reserve10, None, 0, false).unwrap().is_good());
    assert_eq!(write_status(&mut b), RESERVATION_CONFLICT);
    a.logout().unwrap();
    let mut ok = false;
    for _ in 0..50 {
        if write_status(&mut b) == GOOD {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "the RESERVE outlived its session");
    let mut a = login(&t, "a", 1);
    // SPC-4 §5.13.3: once registrations exist, RESERVE conflicts for all but the holder of
    // the persistent reservation, for whom it is GOOD and does nothing.
    pr_out_good(&mut b, REGISTER, 0, 0, 0xb);
    assert_eq!(
        a.scsi(0, &reserve10, None, 0, false).unwrap().status,
        RESERVATION_CONFLICT
    );
    pr_out_good(&mut b, RESERVE, WRITE_EXCLUSIVE, 0xb, 0);
    assert!(b.scsi(0, &reserve6, None, 0, false).unwrap().is_good());
    assert!(b.scsi(0, &release6, None, 0, false).unwrap().is_good());
    assert_eq!(read_status(&mut a), GOOD);
    assert_eq!(write_status(&mut a), RESERVATION_CONFLICT);
    assert_eq!(read_reservation(&mut a), Some((0xb, WRITE_EXCLUSIVE)));
}

#[test]
fn other_nexuses_see_the_unit_attentions_of_release_and_preempt() {
    let t = target();
    let mut a = login(&t, "a", 1);
    let mut b = login(&t, "b", 2);
    let mut stranger = login(&t, "stranger", 3);
    pr_out_good(&mut a, REGISTER, 0, 0, 0xa);
    pr_out_good(&mut b, REGISTER, 0, 0, 0xb);
    // Releasing a registrants only reservation tells the other registrants.
    pr_out_good(&mut a, RESERVE, WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 0xa, 0);
    pr_out_good(&mut a, RELEASE, WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 0xa, 0);
    assert_eq!(uas(&mut b), vec![RESERVATIONS_RELEASED]);
    assert!(uas(&mut a).is_empty(), "the sender's status tells it");
    assert!(uas(&mut stranger).is_empty(), "not registered, not told");
    // B preempts A: A's registration and reservation go, A is told.
    pr_out_good(&mut a, RESERVE, EXCLUSIVE_ACCESS, 0xa, 0);
    pr_out_good(&mut b, PREEMPT, EXCLUSIVE_ACCESS, 0xb, 0xa);
    assert_eq!(uas(&mut a), vec![REGISTRATIONS_PREEMPTED]);
    assert!(uas(&mut b).is_empty());
    assert_eq!(read_keys(&mut a).1, vec![0xb]);
    assert_eq!(read_reservation(&mut a), Some((0xb, EXCLUSIVE_ACCESS)));
    assert_eq!(read_status(&mut a), RESERVATION_CONFLICT);
    // A no longer holds a registration: its PR OUT with its old key conflicts.
    let r = pr_out(&mut a, RELEASE, EXCLUSIVE_ACCESS, 0xa, 0, false);
    assert_eq!(r.status, RESERVATION_CONFLICT);
}

#[test]
fn preempt_and_abort_ends_the_preempted_sessions_commands() {
    let t = target();
    let mut a = login(&t, "a", 1);
    let mut b = login(&t, "b", 2);
    pr_out_good(&mut a, REGISTER, 0, 0, 0xa);
    pr_out_good(&mut b, REGISTER, 0, 0, 0xb);
    pr_out_good(&mut b, RESERVE, WRITE_EXCLUSIVE, 0xb, 0);
    // B's write waits for its Data-Out (solicited by R2T, which B does not answer yet).
    let itt = b
        .submit(0, &cdb::write10(0, 128), Some(&[7u8; 65536]), 65536, false)
        .unwrap();
    t.wait_active_commands("iqn.2026-12.org.iscsi-tgt:pr-b", 1);
    pr_out_good(&mut a, PREEMPT_AND_ABORT, WRITE_EXCLUSIVE, 0xa, 0xb);
    let (done, r) = b.wait_any().unwrap();
    assert_eq!(done, itt);
    assert_eq!(r.status, TASK_ABORTED, "{r:?}");
    // B is told, has lost its registration and reservation, and may no longer write.
    assert_eq!(uas(&mut b), vec![REGISTRATIONS_PREEMPTED]);
    assert_eq!(write_status(&mut b), RESERVATION_CONFLICT);
    assert_eq!(read_status(&mut b), GOOD);
    assert_eq!(read_reservation(&mut b), Some((0xa, WRITE_EXCLUSIVE)));
    assert_eq!(read_keys(&mut b).1, vec![0xa]);
    // Nothing of B's write reached the medium; A writes.
    assert_eq!(a.read10(0, 0, 1, 512).unwrap(), vec![0u8; 512]);
    assert_eq!(write_status(&mut a), GOOD);
    // A session that was not preempted keeps its command: PREEMPT AND ABORT of a key
    // nobody holds ends nothing but a registration check.
    let r = pr_out(
        &mut a,
        PREEMPT_AND_ABORT,
        WRITE_EXCLUSIVE,
        0xa,
        0xdead,
        false,
    );
    assert_eq!(r.status, RESERVATION_CONFLICT);
}

#[test]
fn preempt_and_abort_ends_a_command_held_in_the_backend() {
    let t = target();
    let mut a = login(&t, "a", 1);
    let mut b = login(&t, "b", 2);
    pr_out_good(&mut a, REGISTER, 0, 0, 0xa);
    pr_out_good(&mut b, REGISTER, 0, 0, 0xb);
    pr_out_good(&mut b, RESERVE, EXCLUSIVE_ACCESS, 0xb, 0);
    // B's READ goes to the backend and stays there.
    t.set("devices/ram0/fault_inject", "stall");
    let itt = b.submit(0, &cdb::read10(0, 8), None, 4096, true).unwrap();
    // Once the ping is answered the target has read the READ (a connection's PDUs are read
    // in order) and sent it to the backend.
    b.nop().unwrap();
    pr_out_good(&mut a, PREEMPT_AND_ABORT, EXCLUSIVE_ACCESS, 0xa, 0xb);
    // Its TASK ABORTED comes once the I/O is back, never its data.
    t.set("devices/ram0/fault_inject", "none");
    let (done, r) = b.wait_any().unwrap();
    assert_eq!(done, itt);
    assert_eq!(r.status, TASK_ABORTED, "{r:?}");
    assert!(r.data.is_empty());
    assert_eq!(uas(&mut b), vec![REGISTRATIONS_PREEMPTED]);
    assert_eq!(read_status(&mut b), RESERVATION_CONFLICT);
    assert_eq!(read_status(&mut a), GOOD);
}

#[test]
fn aptpl_state_survives_a_restart() {
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("ram0.pr");
    let file = file.to_str().unwrap();
    let mut t = target();
    t.set("devices/ram0/pr_file_name", file);
    let mut a = login(&t, "a", 1);
    let caps = pr_in(&mut a, 0x02).good().unwrap().data;
    assert_eq!(caps[2] & 0x01, 0x01, "PTPL_C with a file: {caps:?}");
    let r = pr_out(&mut a, REGISTER, 0, 0, 0xfeed, true);
    assert!(r.is_good(), "{r:?}");
    pr_out_good(&mut a, RESERVE, EXCLUSIVE_ACCESS, 0xfeed, 0);
    assert!(std::fs::metadata(file).is_ok(), "no APTPL file written");
    let cfg = t.call("save_config", json!({}));
    a.logout().unwrap();
    t.terminate();
    drop(t);

    let t2 = Target::start(&["--cores", "0,1"]);
    t2.call("load_config", json!({ "config": cfg }));
    let mut a = login(&t2, "a", 1);
    let mut other = login(&t2, "other", 2);
    assert_eq!(read_keys(&mut other), (1, vec![0xfeed]));
    assert_eq!(
        read_reservation(&mut other),
        Some((0xfeed, EXCLUSIVE_ACCESS))
    );
    // The same I_T nexus holds it again, and nobody else reads.
    assert_eq!(read_status(&mut a), GOOD);
    assert_eq!(read_status(&mut other), RESERVATION_CONFLICT);
    let caps = pr_in(&mut other, 0x02).good().unwrap().data;
    assert_eq!(caps[3] & 0x01, 0x01, "PTPL_A after the restart: {caps:?}");
    // Clearing APTPL removes the file.
    let r = pr_out(&mut a, REGISTER, 0, 0xfeed, 0xfeed, false);
    assert!(r.is_good(), "{r:?}");
    assert!(std::fs::metadata(file).is_err(), "the APTPL file stayed");
}

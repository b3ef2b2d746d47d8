//! Task attributes (SAM-5 §8.5-8.9, RFC 7143 §11.3.1 ATTR) against the real daemon: an ORDERED
//! command waits for an older slow one and holds the SIMPLE commands behind it, HEAD OF QUEUE
//! passes commands that wait, the ACA attribute is refused, task management and logout or a
//! dropped connection end waiting commands and leave the target healthy.
//!
//! The slow command is a READ held in the device (`fault_delay_us`); the others are TEST UNIT
//! READY, which the target answers without backend I/O, so without ordering they would finish
//! long before it. The order is observed in the order the responses arrive.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, STATUS_CHECK_CONDITION};
use iscsi_tgt::iscsi::pdu;

const SIMPLE: u8 = 1;
const ORDERED: u8 = 2;
const HEAD_OF_QUEUE: u8 = 3;
const ACA: u8 = 4;
const RESERVED_TAG: u32 = 0xffff_ffff;

/// A target whose RAM LUN 0 holds every I/O for `delay_us`, and a session with its unit
/// attentions cleared.
fn setup(delay_us: u32, isid_last: u8) -> (Target, Initiator) {
    let t = Target::with_default_luns(16);
    let ini = login(&t, isid_last);
    t.set("devices/ram0/fault_delay_us", &delay_us.to_string());
    (t, ini)
}

fn login(t: &Target, isid_last: u8) -> Initiator {
    let mut ini = common::login_solicited(
        t,
        &format!("iqn.2026-11.org.iscsi-tgt:tattr-{isid_last}"),
        IQN,
        isid_last,
    );
    common::tur_good(&mut ini);
    ini
}

fn submit(ini: &mut Initiator, attr: u8, cdb: &[u8], data_out: Option<&[u8]>, edtl: u32) -> u32 {
    ini.set_task_attr(attr);
    let itt = ini
        .submit(0, cdb, data_out, edtl, data_out.is_none() && edtl > 0)
        .unwrap();
    ini.set_task_attr(SIMPLE);
    itt
}

fn slow_read(ini: &mut Initiator) -> u32 {
    submit(ini, SIMPLE, &cdb::read10(0, 8), None, 4096)
}

fn tur(ini: &mut Initiator, attr: u8) -> u32 {
    submit(ini, attr, &cdb::test_unit_ready(), None, 0)
}

/// The ITTs of the next `n` commands to finish, in the order they finished; each GOOD.
fn finish_order(ini: &mut Initiator, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            let (itt, r) = ini.wait_any().unwrap();
            assert!(r.is_good(), "{itt:#x}: {r:?}");
            itt
        })
        .collect()
}

#[test]
fn ordered_waits_for_an_older_slow_command_and_holds_the_simple_one_after_it() {
    let (_t, mut ini) = setup(300_000, 1);
    let read = slow_read(&mut ini);
    let ordered = tur(&mut ini, ORDERED);
    let simple = tur(&mut ini, SIMPLE);
    assert_eq!(finish_order(&mut ini, 3), vec![read, ordered, simple]);
    // With nothing outstanding an ORDERED command runs at once, and the set is empty again.
    let o = tur(&mut ini, ORDERED);
    assert_eq!(finish_order(&mut ini, 1), vec![o]);
}

#[test]
fn an_ordered_write_takes_its_data_while_it_waits_and_the_read_after_it_sees_it() {
    let (_t, mut ini) = setup(200_000, 2);
    let read = slow_read(&mut ini);
    // Writes of this session wait for R2Ts: they go out while the write is held back.
    let block = [0x5au8; 512];
    let write = submit(&mut ini, ORDERED, &cdb::write10(100, 1), Some(&block), 512);
    let after = submit(&mut ini, SIMPLE, &cdb::read10(100, 1), None, 512);
    let mut order = Vec::new();
    for _ in 0..3 {
        let (itt, r) = ini.wait_any().unwrap();
        assert!(r.is_good(), "{itt:#x}: {r:?}");
        if itt == after {
            assert_eq!(
                r.data, block,
                "the read after the ORDERED write sees its data"
            );
        }
        order.push(itt);
    }
    assert_eq!(order, vec![read, write, after]);
}

#[test]
fn head_of_queue_passes_the_commands_that_wait() {
    let (_t, mut ini) = setup(300_000, 3);
    let read = slow_read(&mut ini);
    let ordered = tur(&mut ini, ORDERED);
    let simple = tur(&mut ini, SIMPLE);
    let head = tur(&mut ini, HEAD_OF_QUEUE);
    assert_eq!(finish_order(&mut ini, 4), vec![head, read, ordered, simple]);
}

#[test]
fn the_aca_attribute_is_refused_and_untagged_or_reserved_ones_run_as_simple() {
    let (_t, mut ini) = setup(0, 4);
    let itt = tur(&mut ini, ACA);
    let r = ini.wait(itt).unwrap();
    assert_eq!(r.status, STATUS_CHECK_CONDITION, "{r:?}");
    assert_eq!(r.sense_key(), Some(0x05), "ILLEGAL REQUEST: {r:?}");
    assert_eq!(
        r.asc_ascq(),
        Some((0x49, 0x00)),
        "INVALID MESSAGE ERROR: {r:?}"
    );
    // NACA=1 in the CONTROL byte: there is no ACA to establish (INVALID FIELD IN CDB).
    let mut naca = cdb::test_unit_ready();
    naca[5] = 0x04;
    let r = ini.scsi(0, &naca, None, 0, false).unwrap();
    assert_eq!(r.sense_key(), Some(0x05), "{r:?}");
    assert_eq!(r.asc_ascq(), Some((0x24, 0x00)), "{r:?}");
    for attr in [0, 5, 6, 7] {
        let itt = tur(&mut ini, attr);
        let r = ini.wait(itt).unwrap();
        assert!(r.is_good(), "ATTR {attr}: {r:?}");
    }
}

#[test]
fn abort_task_of_a_waiting_ordered_command_releases_the_ones_behind_it() {
    // Long enough that the commands released by the abort finish well before the read.
    let (_t, mut ini) = setup(3_000_000, 5);
    let read = slow_read(&mut ini);
    let ordered = tur(&mut ini, ORDERED);
    let simple = tur(&mut ini, SIMPLE);
    let (response, ended) = ini.abort_task(0, ordered).unwrap();
    assert_eq!(response, pdu::TMF_RSP_COMPLETE);
    assert!(
        ended,
        "the ORDERED command was still waiting: the abort ended it"
    );
    assert!(!ini.in_flight(ordered));
    assert_eq!(finish_order(&mut ini, 2), vec![simple, read]);
    let o = tur(&mut ini, ORDERED);
    assert_eq!(finish_order(&mut ini, 1), vec![o]);
}

#[test]
fn a_logical_unit_reset_ends_waiting_commands_and_ordering_starts_afresh() {
    let (_t, mut ini) = setup(300_000, 6);
    let _read = slow_read(&mut ini);
    let _ordered = tur(&mut ini, ORDERED);
    let _simple = tur(&mut ini, SIMPLE);
    assert_eq!(
        ini.task_mgmt(pdu::TMF_LOGICAL_UNIT_RESET, 0, RESERVED_TAG)
            .unwrap(),
        pdu::TMF_RSP_COMPLETE
    );
    assert_eq!(ini.outstanding(), 0);
    // The reset's unit attention, then GOOD.
    common::tur_good(&mut ini);
    // Nothing is left counted in the task set: an ORDERED command runs at once, a SIMPLE
    // one after it waits for it.
    ordered_after_slow_read(&mut ini);
}

fn ordered_after_slow_read(ini: &mut Initiator) {
    let read = slow_read(ini);
    let ordered = tur(ini, ORDERED);
    let simple = tur(ini, SIMPLE);
    assert_eq!(finish_order(ini, 3), vec![read, ordered, simple]);
}

#[test]
fn logout_with_waiting_commands_leaves_the_target_healthy() {
    let (t, mut ini) = setup(300_000, 7);
    let _read = slow_read(&mut ini);
    let _ordered = tur(&mut ini, ORDERED);
    let _simple = tur(&mut ini, SIMPLE);
    ini.logout().unwrap();
    let mut ini = login(&t, 7);
    ordered_after_slow_read(&mut ini);
}

#[test]
fn a_dropped_connection_with_waiting_commands_leaves_the_target_healthy() {
    let (t, mut ini) = setup(300_000, 8);
    let _read = slow_read(&mut ini);
    let _ordered = tur(&mut ini, ORDERED);
    let _simple = tur(&mut ini, SIMPLE);
    let block = [0x33u8; 512];
    let _write = submit(&mut ini, ORDERED, &cdb::write10(7, 1), Some(&block), 512);
    ini.drop_connection(true).unwrap();
    // The same initiator again (the old session is reinstated), and another one.
    let mut again = login(&t, 8);
    ordered_after_slow_read(&mut again);
    let mut other = login(&t, 9);
    other.write10(0, 3, &[0x77u8; 512], 512).unwrap();
    assert_eq!(other.read10(0, 3, 1, 512).unwrap(), vec![0x77u8; 512]);
}

#[test]
fn a_held_command_sees_the_unit_attention_raised_while_it_waited() {
    // Long enough for the LUN map change to reach the session while the read is held.
    let (t, mut ini) = setup(3_000_000, 10);
    let read = slow_read(&mut ini);
    let ordered = tur(&mut ini, ORDERED);
    let simple = tur(&mut ini, SIMPLE);
    // The target reads a connection's PDUs in order: once the ping is answered the read has
    // started (and seen no unit attention) and the others wait behind it. Without it the LUN
    // map could change before the target has read the READ, which would then see the UA.
    ini.nop().unwrap();
    // The LUN map changes while the ORDERED command waits: REPORTED LUNS DATA HAS CHANGED
    // (SPC-4 §5.14) is checked when it starts, not when it arrived.
    t.mgmt("handlers/vdisk_nullio/mgmt", "add_device null9 size_mb=8");
    t.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "add null9 2");
    let mut order = Vec::new();
    for _ in 0..3 {
        let (itt, r) = ini.wait_any().unwrap();
        if itt == ordered {
            assert_eq!(r.status, STATUS_CHECK_CONDITION, "{r:?}");
            assert_eq!(r.sense_key(), Some(0x06), "UNIT ATTENTION: {r:?}");
            assert_eq!(r.asc_ascq(), Some((0x3f, 0x0e)), "{r:?}");
        } else {
            assert!(r.is_good(), "{itt:#x}: {r:?}");
        }
        order.push(itt);
    }
    assert_eq!(order, vec![read, ordered, simple]);
}

//! ALUA against the real daemon: one device exported by two targets on two portals (as a
//! multipath initiator sees two paths), each target the one port of its own target port group. INQUIRY's TPGS and VPD page 0x83, REPORT TARGET PORT
//! GROUPS, a state change through the tree heard as ASYMMETRIC ACCESS STATE CHANGED on both
//! sessions, a standby port refusing media access while still answering INQUIRY and REPORT
//! TARGET PORT GROUPS, and SET TARGET PORT GROUPS once explicit ALUA is on.
mod common;

use std::net::{SocketAddr, TcpListener};

use common::{tur_good, Target};
use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions, ScsiResult};

const IQN_A: &str = "iqn.2026-11.org.iscsi-tgt:alua-a";
const IQN_B: &str = "iqn.2026-11.org.iscsi-tgt:alua-b";
const TGS: &str = "device_groups/dg/target_groups";

const NOT_READY: u8 = 0x02;
const ILLEGAL_REQUEST: u8 = 0x05;
const UNIT_ATTENTION: u8 = 0x06;

/// The target on two portals (127.0.0.1, and a second address returned), target A served on
/// the first only and target B on the second only.
fn setup() -> (Target, SocketAddr) {
    let port2 = TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let second: SocketAddr = format!("127.0.0.2:{port2}").parse().unwrap();
    let t = Target::start(&["--cores", "0", "--listen", &second.to_string()]);
    t.mgmt("handlers/vdisk_ramio/mgmt", "add_device ram0 size_mb=4");
    for iqn in [IQN_A, IQN_B] {
        t.mgmt("targets/iscsi/mgmt", &format!("add_target {iqn}"));
        t.mgmt(&format!("targets/iscsi/{iqn}/luns/mgmt"), "add ram0 0");
    }
    t.set(&format!("targets/iscsi/{IQN_B}/rel_tgt_id"), "7");
    t.mgmt("device_groups/mgmt", "create dg");
    t.mgmt("device_groups/dg/devices/mgmt", "add ram0");
    t.mgmt(&format!("{TGS}/mgmt"), "create a");
    t.mgmt(&format!("{TGS}/mgmt"), "create b");
    t.set(&format!("{TGS}/a/preferred"), "1");
    t.set(&format!("{TGS}/b/group_id"), "20");
    t.mgmt(&format!("{TGS}/a/mgmt"), &format!("add {IQN_A}"));
    t.mgmt(&format!("{TGS}/b/mgmt"), &format!("add {IQN_B}"));
    for (iqn, portal) in [(IQN_A, "127.0.0.1"), (IQN_B, "127.0.0.2")] {
        t.mgmt(
            "targets/iscsi/mgmt",
            &format!("add_target_attribute {iqn} allowed_portal {portal}"),
        );
        t.set(&format!("targets/iscsi/{iqn}/enabled"), "1");
    }
    t.set("targets/iscsi/enabled", "1");
    (t, second)
}

fn login(t: &Target, iqn: &str) -> Initiator {
    login_at(t.addr, iqn)
}

fn login_at(addr: SocketAddr, iqn: &str) -> Initiator {
    let mut ini = Initiator::connect(addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.x:host".into(),
        target_name: Some(iqn.into()),
        ..Default::default()
    })
    .unwrap();
    tur_good(&mut ini);
    ini
}

fn check(r: &ScsiResult, key: u8, asc: (u8, u8)) {
    assert_eq!(r.sense_key(), Some(key), "{r:?}");
    assert_eq!(r.asc_ascq(), Some(asc), "{r:?}");
}

fn inquiry(ini: &mut Initiator) -> ScsiResult {
    ini.scsi(0, &cdb::inquiry(96), None, 96, true).unwrap()
}

/// The designators of VPD page 0x83: (byte 1: PIV, association, type; the designator).
fn designators(ini: &mut Initiator) -> Vec<(u8, Vec<u8>)> {
    let r = ini
        .scsi(0, &[0x12, 0x01, 0x83, 0x01, 0x00, 0], None, 256, true)
        .unwrap()
        .good()
        .unwrap();
    let d = &r.data;
    let end = 4 + usize::from(u16::from_be_bytes([d[2], d[3]]));
    let mut v = Vec::new();
    let mut i = 4;
    while i + 4 <= end {
        let len = usize::from(d[i + 3]);
        v.push((d[i + 1], d[i + 4..i + 4 + len].to_vec()));
        i += 4 + len;
    }
    v
}

/// The target port group designator (type 5h) and relative target port designator (4h) of
/// VPD page 0x83.
fn port_designators(ini: &mut Initiator) -> (Option<u16>, Option<u16>) {
    let (mut group, mut port) = (None, None);
    for (b1, value) in designators(ini) {
        // Four bytes, the identifier in the last two.
        let id = || Some(u16::from_be_bytes([value[2], value[3]]));
        // Association 01b: the target port.
        match (b1 & 0x30, b1 & 0x0f) {
            (0x10, 0x5) => group = id(),
            (0x10, 0x4) => port = id(),
            _ => {}
        }
    }
    (group, port)
}

/// The SCSI name string designators (type 8h) of VPD page 0x83: the target port's and the
/// target device's.
fn name_strings(ini: &mut Initiator) -> (Option<String>, Option<String>) {
    let (mut port, mut device) = (None, None);
    for (b1, value) in designators(ini) {
        let name = || {
            assert_eq!(
                value.len() % 4,
                0,
                "a name string's length is a multiple of four"
            );
            String::from_utf8(value.split(|&b| b == 0).next().unwrap().to_vec()).unwrap()
        };
        match (b1 & 0x30, b1 & 0x0f) {
            (0x10, 0x8) => port = Some(name()),
            (0x20, 0x8) => device = Some(name()),
            _ => {}
        }
    }
    (port, device)
}

/// One target port group descriptor of REPORT TARGET PORT GROUPS.
#[derive(Debug, PartialEq, Eq)]
struct Group {
    pref: bool,
    state: u8,
    supported: u8,
    id: u16,
    status: u8,
    ports: Vec<u16>,
}

fn report(ini: &mut Initiator, extended: bool) -> Vec<Group> {
    let format = if extended { 0x20 } else { 0 };
    let c = [0xa3, format | 0x0a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    let r = ini.scsi(0, &c, None, 1024, true).unwrap().good().unwrap();
    let d = &r.data;
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(
        d.len(),
        len + 4,
        "the return data length covers the whole list"
    );
    let mut i = if extended {
        assert_eq!(d[4], 0x10, "extended header format");
        8
    } else {
        4
    };
    let mut out = Vec::new();
    while i < d.len() {
        let n = usize::from(d[i + 7]);
        out.push(Group {
            pref: d[i] & 0x80 != 0,
            state: d[i] & 0x0f,
            supported: d[i + 1],
            id: u16::from_be_bytes([d[i + 2], d[i + 3]]),
            status: d[i + 5],
            ports: (0..n)
                .map(|k| u16::from_be_bytes([d[i + 8 + 4 * k + 2], d[i + 8 + 4 * k + 3]]))
                .collect(),
        });
        i += 8 + 4 * n;
    }
    out
}

fn stpg(ini: &mut Initiator, descriptors: &[(u8, u16)]) -> ScsiResult {
    let mut data = vec![0u8; 4];
    for (state, id) in descriptors {
        data.extend_from_slice(&[*state, 0]);
        data.extend_from_slice(&id.to_be_bytes());
    }
    let len = (data.len() as u32).to_be_bytes();
    let c = [0xa4, 0x0a, 0, 0, 0, 0, len[0], len[1], len[2], len[3], 0, 0];
    ini.scsi(0, &c, Some(&data), data.len() as u32, false)
        .unwrap()
}

fn read(ini: &mut Initiator) -> ScsiResult {
    ini.scsi(0, &cdb::read10(0, 1), None, 512, true).unwrap()
}

#[test]
fn two_target_port_groups_on_one_device() {
    let (t, second) = setup();
    let mut a = login(&t, IQN_A);
    let mut b = login_at(second, IQN_B);
    // Each path is its own portal: target B is not served on A's.
    let refused = Initiator::connect(t.addr).unwrap().login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.x:host".into(),
        target_name: Some(IQN_B.into()),
        ..Default::default()
    });
    assert!(
        refused.is_err(),
        "target B logged in through the first portal"
    );

    // Implicit ALUA: TPGS 01b.
    assert_eq!(inquiry(&mut a).good().unwrap().data[5] & 0x30, 0x10);
    assert_eq!(port_designators(&mut a), (Some(1), Some(1)));
    assert_eq!(port_designators(&mut b), (Some(20), Some(7)));
    // The two paths are two target ports, named after their targets.
    for (ini, iqn) in [(&mut a, IQN_A), (&mut b, IQN_B)] {
        assert_eq!(
            name_strings(ini),
            (Some(format!("{iqn},t,0x0001")), Some(iqn.to_string()))
        );
    }
    assert_eq!(t.get(&format!("{TGS}/b/{IQN_B}/rel_tgt_id")), "7");

    let groups = report(&mut b, false);
    assert_eq!(
        groups,
        [
            Group {
                pref: true,
                state: 0,
                supported: 0xcf,
                id: 1,
                status: 0,
                ports: vec![1]
            },
            Group {
                pref: false,
                state: 0,
                supported: 0xcf,
                id: 20,
                status: 0,
                ports: vec![7]
            },
        ]
    );
    assert_eq!(report(&mut a, true), groups);

    // Without explicit ALUA there is no SET TARGET PORT GROUPS.
    check(&stpg(&mut a, &[(0x02, 20)]), ILLEGAL_REQUEST, (0x20, 0x00));

    // A state changed through the tree: both sessions hear of it first.
    t.set(&format!("{TGS}/b/state"), "standby");
    for ini in [&mut a, &mut b] {
        check(
            &ini.test_unit_ready(0).unwrap(),
            UNIT_ATTENTION,
            (0x2a, 0x06),
        );
    }
    let groups = report(&mut a, false);
    assert_eq!((groups[1].state, groups[1].status), (0x02, 0x02));
    assert_eq!(groups[0].state, 0);

    // The standby port refuses media access and TEST UNIT READY, but still describes itself.
    check(&read(&mut b), NOT_READY, (0x04, 0x0b));
    check(&b.test_unit_ready(0).unwrap(), NOT_READY, (0x04, 0x0b));
    assert!(inquiry(&mut b).is_good());
    assert_eq!(report(&mut b, false)[1].state, 0x02);
    // The other port goes on.
    assert!(read(&mut a).is_good());

    // Unavailable: not even MODE SENSE; transitioning and offline have their own codes.
    t.set(&format!("{TGS}/b/state"), "unavailable");
    check(&b.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x2a, 0x06));
    let mode_sense = [0x1a, 0, 0x3f, 0, 255, 0];
    check(
        &b.scsi(0, &mode_sense, None, 255, true).unwrap(),
        NOT_READY,
        (0x04, 0x0c),
    );
    t.set(&format!("{TGS}/b/state"), "transitioning");
    check(&b.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x2a, 0x06));
    check(&read(&mut b), NOT_READY, (0x04, 0x0a));
    assert_eq!(report(&mut b, false)[1].state, 0x0f);
    t.set(&format!("{TGS}/b/state"), "offline");
    check(&b.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x2a, 0x06));
    check(&inquiry(&mut b), NOT_READY, (0x04, 0x12));
    // Session A heard of the three changes once (a unit attention is not queued twice).
    check(&a.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x2a, 0x06));
    assert!(a.test_unit_ready(0).unwrap().is_good());
    assert_eq!(report(&mut a, false)[1].state, 0x0e);

    // Explicit ALUA: TPGS 11b, and SET TARGET PORT GROUPS through port A brings B back.
    t.set("devices/ram0/expl_alua", "1");
    assert_eq!(inquiry(&mut a).good().unwrap().data[5] & 0x30, 0x30);
    // Which every nexus hears of as INQUIRY DATA HAS CHANGED.
    check(&a.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x3f, 0x03));
    check(&b.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x3f, 0x03));
    // A group that does not exist, or a state that cannot be asked for, changes nothing.
    check(
        &stpg(&mut a, &[(0x00, 20), (0x00, 3)]),
        ILLEGAL_REQUEST,
        (0x26, 0x00),
    );
    check(&stpg(&mut a, &[(0x0f, 20)]), ILLEGAL_REQUEST, (0x26, 0x00));
    assert_eq!(t.get(&format!("{TGS}/b/state")), "offline");
    assert!(stpg(&mut a, &[(0x00, 20), (0x01, 1)]).is_good());
    assert_eq!(t.get(&format!("{TGS}/a/state")), "nonoptimized");
    assert_eq!(t.get(&format!("{TGS}/b/state")), "active");
    // The sender hears nothing; the other session does.
    assert!(a.test_unit_ready(0).unwrap().is_good());
    check(&b.test_unit_ready(0).unwrap(), UNIT_ATTENTION, (0x2a, 0x06));
    assert!(read(&mut b).is_good());
    let groups = report(&mut b, true);
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.id, g.state, g.status))
            .collect::<Vec<_>>(),
        [(1, 0x01, 0x01), (20, 0x00, 0x01)]
    );

    // The configuration keeps it all.
    let saved = t.call("save_config", serde_json::json!({}));
    let dg = &saved["device_groups"]["dg"];
    assert_eq!(dg["devices"], serde_json::json!(["ram0"]));
    assert_eq!(saved["handlers"]["vdisk_ramio"]["ram0"]["expl_alua"], "1");
    assert_eq!(dg["target_groups"]["a"]["state"], "nonoptimized");
    assert_eq!(dg["target_groups"]["b"]["group_id"], "20");
    assert!(dg["target_groups"]["b"]["targets"].get(IQN_B).is_some());
    a.logout().unwrap();
    b.logout().unwrap();
}

#[test]
fn a_device_outside_any_group_has_no_alua() {
    let t = Target::with_default_luns(4);
    let mut ini = login(&t, common::IQN);
    assert_eq!(inquiry(&mut ini).good().unwrap().data[5] & 0x30, 0);
    // REPORT TARGET PORT GROUPS is a service action MAINTENANCE IN does not have here:
    // an invalid field, pointing at the service action (SPC-4 §4.2.5.1).
    let c = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    let r = ini.scsi(0, &c, None, 1024, true).unwrap();
    check(&r, ILLEGAL_REQUEST, (0x24, 0x00));
    assert_eq!(&r.sense[15..18], &[0xcc, 0, 1]);
    assert_eq!(port_designators(&mut ini), (None, Some(1)));
    // Bad management input is refused with the reason.
    let e = t
        .try_call(
            "mgmt",
            serde_json::json!({"path": "device_groups/mgmt", "command": "create"}),
        )
        .unwrap_err();
    assert!(
        e["message"].as_str().unwrap().contains("usage: create"),
        "{e}"
    );
    ini.logout().unwrap();
}

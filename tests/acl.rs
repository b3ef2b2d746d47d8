//! Access control through initiator groups against the real daemon: who sees which LUNs
//! (patterns with `*`, `?` and `!`), read-only LUNs refusing writes with DATA PROTECT, moving an
//! initiator between groups with REPORTED LUNS DATA HAS CHANGED, and a group in use refusing
//! deletion.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions, ScsiResult};
use serde_json::json;

const ALLOWED: &str = "iqn.2026-11.org.acl:allowed-1";
const EXCLUDED: &str = "iqn.2026-11.org.acl:allowed-not";
const OTHER: &str = "iqn.2026-11.org.acl:other";

fn login(t: &Target, name: &str) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: name.into(),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap();
    ini
}

/// REPORT LUNS, after clearing unit attentions; returns the LUNs and the UAs seen on the way.
fn report_luns(ini: &mut Initiator) -> (Vec<u64>, Vec<(u8, u8)>) {
    let mut uas = Vec::new();
    for _ in 0..4 {
        // TEST UNIT READY on LUN 0 reports pending unit attentions (REPORT LUNS does not).
        let r = ini.test_unit_ready(0).unwrap();
        if r.is_good() {
            break;
        }
        if let Some(a) = r.asc_ascq() {
            uas.push(a);
        }
    }
    let cdb = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r: ScsiResult = ini.scsi(0, &cdb, None, 4096, true).unwrap();
    assert!(r.is_good(), "{r:?}");
    let n = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]) as usize / 8;
    let luns = (0..n)
        .map(|i| {
            let b = &r.data[8 + 8 * i..16 + 8 * i];
            u64::from(u16::from_be_bytes([b[0], b[1]]) & 0x3fff)
        })
        .collect();
    (luns, uas)
}

fn setup() -> Target {
    let t = Target::with_default_luns(8);
    // Default set: ram0 as LUN 0 and null0 as LUN 1. Group g1: null0 read-only as LUN 0 and
    // ram0 as LUN 3.
    let g = format!("targets/iscsi/{IQN}/ini_groups");
    t.mgmt(&format!("{g}/mgmt"), "create g1");
    t.mgmt(
        &format!("{g}/g1/initiators/mgmt"),
        "add iqn.2026-11.org.acl:allowed*",
    );
    t.mgmt(&format!("{g}/g1/initiators/mgmt"), "add !*:allowed-not");
    t.mgmt(&format!("{g}/g1/luns/mgmt"), "add null0 0 read_only=1");
    t.mgmt(&format!("{g}/g1/luns/mgmt"), "add ram0 3");
    t
}

#[test]
fn groups_decide_what_an_initiator_sees() {
    let t = setup();
    let mut a = login(&t, ALLOWED);
    assert_eq!(report_luns(&mut a).0, vec![0, 3]);
    // LUN 0 of the group is read-only.
    let w = a
        .scsi(
            0,
            &iscsi_tgt::initiator::cdb::write10(0, 1),
            Some(&[0u8; 512]),
            512,
            false,
        )
        .unwrap();
    assert_eq!(w.sense_key(), Some(0x07), "DATA PROTECT expected: {w:?}");
    assert_eq!(w.asc_ascq(), Some((0x27, 0x00)));
    // LUN 3 (ram0) is writable and is the same device as the default LUN 0. Unit attentions
    // are per logical unit: LUN 3 has its own to clear first.
    let first = a.test_unit_ready(3).unwrap();
    assert!(
        first.is_good() || first.asc_ascq() == Some((0x29, 0x00)),
        "{first:?}"
    );
    a.write10(3, 10, &[0x5au8; 512], 512).unwrap();

    let mut o = login(&t, OTHER);
    assert_eq!(
        report_luns(&mut o).0,
        vec![0, 1],
        "not in a group: the default LUNs"
    );
    assert_eq!(o.read10(0, 10, 1, 512).unwrap(), vec![0x5au8; 512]);

    let mut x = login(&t, EXCLUDED);
    assert_eq!(
        report_luns(&mut x).0,
        vec![0, 1],
        "excluded by the ! pattern"
    );

    // The session shows where it stands.
    assert_eq!(
        t.get(&format!(
            "targets/iscsi/{IQN}/ini_groups/g1/initiators/iqn.2026-11.org.acl:allowed*"
        )),
        "iqn.2026-11.org.acl:allowed*"
    );
    // A group in use cannot go.
    let e = t
        .try_call(
            "mgmt",
            json!({"path": format!("targets/iscsi/{IQN}/ini_groups/mgmt"), "command": "del g1"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use"), "{e}");
    for i in [&mut a, &mut o, &mut x] {
        i.logout().unwrap();
    }
}

#[test]
fn moving_an_initiator_changes_its_luns_with_a_unit_attention() {
    let t = setup();
    let g = format!("targets/iscsi/{IQN}/ini_groups");
    t.mgmt(&format!("{g}/mgmt"), "create g2");
    t.mgmt(&format!("{g}/g2/luns/mgmt"), "add ram0 0");
    t.mgmt(&format!("{g}/g2/luns/mgmt"), "add null0 7");
    let mut o = login(&t, OTHER);
    assert_eq!(report_luns(&mut o).0, vec![0, 1]);
    t.mgmt(&format!("{g}/g2/initiators/mgmt"), &format!("add {OTHER}"));
    let (luns, uas) = report_luns(&mut o);
    assert_eq!(luns, vec![0, 7]);
    assert!(
        uas.contains(&(0x3f, 0x0e)),
        "REPORTED LUNS DATA HAS CHANGED: {uas:?}"
    );
    // move to g1 and back out again with del.
    t.mgmt(
        &format!("{g}/g2/initiators/mgmt"),
        &format!("move {OTHER} g1"),
    );
    assert_eq!(report_luns(&mut o).0, vec![0, 3]);
    t.mgmt(&format!("{g}/g1/initiators/mgmt"), &format!("del {OTHER}"));
    assert_eq!(report_luns(&mut o).0, vec![0, 1]);
    // An initiator lives in one group of a target.
    t.mgmt(&format!("{g}/g2/initiators/mgmt"), &format!("add {OTHER}"));
    let e = t
        .try_call(
            "mgmt",
            json!({"path": format!("{g}/g1/initiators/mgmt"), "command": format!("add {OTHER}")}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("already in group g2"), "{e}");
    o.logout().unwrap();
}

#[test]
fn groups_survive_save_and_load() {
    let t = setup();
    let cfg = t.call("save_config", json!({}));
    let g = &cfg["targets"]["iscsi"]["targets"][IQN]["ini_groups"]["g1"];
    assert_eq!(g["initiators"][1], "!*:allowed-not");
    assert_eq!(g["luns"]["0"]["read_only"], "1");
    let t2 = Target::start(&["--cores", "0"]);
    t2.call("load_config", json!({ "config": cfg }));
    let mut a = login(&t2, ALLOWED);
    assert_eq!(report_luns(&mut a).0, vec![0, 3]);
    a.logout().unwrap();
}

//! MODE SELECT through the real daemon: the caching page's WCE and the control page's SWP
//! and D_SENSE change what the device does, the other session hears MODE PARAMETERS
//! CHANGED, saved values are the device attributes and survive a saved configuration.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions, ScsiResult, STATUS_CHECK_CONDITION};
use serde_json::json;

const BS: usize = 512;
const MODE_SENSE_6: u8 = 0x1a;
const MODE_SELECT_6: u8 = 0x15;
const MODE_SELECT_10: u8 = 0x55;
const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;

fn setup(dir: &std::path::Path) -> Target {
    let t = Target::start(&["--cores", "0"]);
    configure(&t, dir);
    t
}

fn configure(t: &Target, dir: &std::path::Path) {
    let f = dir.join("ms.img");
    t.mgmt(
        "handlers/vdisk_fileio/mgmt",
        &format!("add_device f0 filename={}; size_mb=4", f.display()),
    );
    t.mgmt("targets/iscsi/mgmt", &format!("add_target {IQN}"));
    t.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "add f0 0");
    t.set(&format!("targets/iscsi/{IQN}/enabled"), "1");
    t.set("targets/iscsi/enabled", "1");
}

fn login(t: &Target, isid_last: u8) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    let mut isid = LoginOptions::default().isid;
    isid[5] = isid_last;
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:mode-select".into(),
        target_name: Some(IQN.into()),
        isid,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    assert_eq!(next_ua(&mut ini), Some((0x29, 0x00)), "power on first");
    assert_eq!(next_ua(&mut ini), None);
    ini
}

/// The unit attention TEST UNIT READY reports, if any.
fn next_ua(ini: &mut Initiator) -> Option<(u8, u8)> {
    let r = ini.test_unit_ready(0).unwrap();
    if r.is_good() {
        return None;
    }
    assert_eq!(r.sense_key(), Some(0x06), "{r:?}");
    r.asc_ascq()
}

/// MODE SENSE(6) of `page` with page control `pc`, DBD set: header then the page.
fn mode_sense(ini: &mut Initiator, page: u8, pc: u8) -> Vec<u8> {
    let r = ini
        .scsi(
            0,
            &[MODE_SENSE_6, 0x08, pc << 6 | page, 0, 255, 0],
            None,
            255,
            true,
        )
        .unwrap();
    assert!(r.is_good(), "{r:?}");
    r.data
}

/// MODE SELECT(6) of one page (as MODE SENSE returned it, changed by `edit`), SP as given.
fn mode_select(ini: &mut Initiator, page: u8, sp: bool, edit: impl Fn(&mut [u8])) -> ScsiResult {
    let sensed = mode_sense(ini, page, 0);
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&sensed[4..]);
    list[4] &= 0x3f; // PS is reserved in MODE SELECT
    edit(&mut list[4..]);
    let n = list.len() as u8;
    let cdb = [MODE_SELECT_6, 0x10 | u8::from(sp), 0, 0, n, 0];
    ini.scsi(0, &cdb, Some(&list), u32::from(n), false).unwrap()
}

fn write_block(ini: &mut Initiator) -> ScsiResult {
    let cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    ini.scsi(0, &cdb, Some(&[0x5a; BS]), BS as u32, false)
        .unwrap()
}

#[test]
fn mode_select_changes_the_device_and_tells_the_other_sessions() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let t = setup(dir.path());
    let mut a = login(&t, 1);
    let mut b = login(&t, 2);

    // The write cache: on, changeable; off without saving.
    assert_eq!(mode_sense(&mut a, CACHING, 0)[4 + 2] & 0x04, 0x04, "WCE");
    assert_eq!(
        mode_sense(&mut a, CACHING, 1)[4 + 2],
        0x04,
        "WCE changeable"
    );
    let r = mode_select(&mut a, CACHING, false, |p| p[2] &= !0x04);
    assert!(r.is_good(), "{r:?}");
    assert_eq!(mode_sense(&mut a, CACHING, 0)[4 + 2] & 0x04, 0, "WCE off");
    assert_eq!(
        mode_sense(&mut a, CACHING, 3)[4 + 2] & 0x04,
        0x04,
        "saved: on"
    );
    assert_eq!(t.get("devices/f0/write_through"), "0", "not saved");
    assert_eq!(
        next_ua(&mut b),
        Some((0x2a, 0x01)),
        "MODE PARAMETERS CHANGED"
    );
    assert_eq!(next_ua(&mut b), None);
    assert_eq!(next_ua(&mut a), None, "not to the nexus that changed them");
    // Writes still work with the cache off.
    assert!(write_block(&mut a).is_good());
    // Saved: the attribute follows.
    let r = mode_select(&mut a, CACHING, true, |p| p[2] &= !0x04);
    assert!(r.is_good(), "{r:?}");
    assert_eq!(t.get("devices/f0/write_through"), "1");
    assert_eq!(next_ua(&mut b), None, "nothing current changed");

    // SWP (saved): writes are refused, reads are not, MODE SENSE says write protected.
    let r = mode_select(&mut a, CONTROL, true, |p| p[4] |= 0x08);
    assert!(r.is_good(), "{r:?}");
    let w = write_block(&mut a);
    assert_eq!(w.status, STATUS_CHECK_CONDITION);
    assert_eq!(w.sense[0], 0x70, "fixed format while D_SENSE is 0");
    assert_eq!(
        (w.sense_key(), w.asc_ascq()),
        (Some(0x07), Some((0x27, 0x00)))
    );
    assert!(a.read10(0, 0, 1, BS as u32).is_ok());
    let ms = mode_sense(&mut a, CONTROL, 0);
    assert_eq!(ms[2] & 0x80, 0x80, "WP");
    assert_eq!(ms[4 + 4] & 0x08, 0x08, "SWP");
    assert_eq!(t.get("devices/f0/swp"), "1");
    assert_eq!(next_ua(&mut b), Some((0x2a, 0x01)));
    // The other session is write protected too.
    assert_eq!(write_block(&mut b).sense_key(), Some(0x07));

    // D_SENSE: descriptor-format sense data from then on, on every session.
    let r = mode_select(&mut a, CONTROL, false, |p| p[2] |= 0x04);
    assert!(r.is_good(), "{r:?}");
    assert_eq!(next_ua(&mut b), Some((0x2a, 0x01)));
    let w = write_block(&mut b);
    assert_eq!(&w.sense[..4], &[0x72, 0x07, 0x27, 0x00], "{w:?}");
    // INVALID FIELD IN PARAMETER LIST with its field pointer, in a sense key specific
    // descriptor: TAS (byte 5, bit 6 of the page, byte 9 of the list) is not changeable.
    let r = mode_select(&mut a, CONTROL, false, |p| p[5] &= !0x40);
    assert_eq!(r.status, STATUS_CHECK_CONDITION);
    assert_eq!(
        r.sense,
        [
            0x72,
            0x05,
            0x26,
            0x00,
            0,
            0,
            0,
            8,
            0x02,
            0x06,
            0,
            0,
            0x80 | 0x08 | 6,
            0,
            9,
            0
        ]
    );
    // PARAMETER LIST LENGTH ERROR: a page cut short (MODE SELECT(10) this time).
    let list = [0u8, 0, 0, 0, 0, 0, 0, 0, CONTROL, 10, 0, 0];
    let cdb = [MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0];
    let r = a
        .scsi(0, &cdb, Some(&list), list.len() as u32, false)
        .unwrap();
    assert_eq!(
        (r.sense_key(), r.asc_ascq()),
        (Some(0x05), Some((0x1a, 0x00)))
    );
    assert_eq!(r.sense[0], 0x72);

    // The saved values are what a saved configuration keeps: a new daemon loading it has
    // the write cache off and SWP on, and the current D_SENSE (not saved) is back to 0.
    let cfg = t.call("save_config", json!({}));
    let f0 = &cfg["handlers"]["vdisk_fileio"]["f0"];
    assert_eq!(
        (&f0["write_through"], &f0["swp"]),
        (&json!("1"), &json!("1"))
    );
    assert!(f0.get("d_sense").is_none(), "{f0}");
    drop((a, b));
    drop(t);
    let t2 = Target::start(&["--cores", "0"]);
    t2.call("load_config", json!({ "config": cfg }));
    let mut c = login(&t2, 3);
    assert_eq!(mode_sense(&mut c, CACHING, 0)[4 + 2] & 0x04, 0, "WCE off");
    let ms = mode_sense(&mut c, CONTROL, 0);
    assert_eq!((ms[4 + 2] & 0x04, ms[4 + 4] & 0x08), (0, 0x08));
    let w = write_block(&mut c);
    assert_eq!((w.sense[0], w.sense_key()), (0x70, Some(0x07)));
    // Clearing SWP through the attribute: writes work, and the session hears it.
    t2.set("devices/f0/swp", "0");
    assert_eq!(next_ua(&mut c), Some((0x2a, 0x01)));
    assert!(write_block(&mut c).is_good());
}

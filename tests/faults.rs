//! Faults of the backing store, seen from an initiator: a file system that fills up. Every
//! command is answered (none hangs), with the sense SBC-3 names: a thin provisioned LUN out of
//! space reports SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07) and gets space back with
//! UNMAP, a fully provisioned one reports MEDIUM ERROR, WRITE ERROR (03/0C/00) with the LBA;
//! reads and other LUNs go on.
//!
//! These tests need a small tmpfs mounted as root: `scripts/faults.sh` mounts one and runs
//! them with `--ignored`.
mod common;

use std::time::Duration;

use common::{Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions, ScsiResult};

const MIB: usize = 1 << 20;

/// The tmpfs the script mounted; without it the test fails loudly.
fn tmpfs() -> std::path::PathBuf {
    let dir = std::env::var("FAULTS_TMPFS")
        .expect("FAULTS_TMPFS is not set: run these tests through scripts/faults.sh");
    let p = std::path::PathBuf::from(dir);
    assert!(p.is_dir(), "{} is not a directory", p.display());
    p
}

fn login(t: &Target) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    // Generous: a command that is never answered fails the test instead of hanging it.
    ini.set_timeout(Some(Duration::from_secs(30))).unwrap();
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:faults".into(),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    for lun in [0, 1] {
        for _ in 0..4 {
            if ini.test_unit_ready(lun).unwrap().is_good() {
                break;
            }
        }
    }
    ini
}

/// WRITE (10) of 1 MiB at MiB `i` of `lun`.
fn write_mib(ini: &mut Initiator, lun: u64, i: usize, byte: u8) -> ScsiResult {
    let data = vec![byte; MIB];
    let lba = (i * MIB / 512) as u32;
    ini.scsi(
        lun,
        &cdb::write10(lba, (MIB / 512) as u16),
        Some(&data),
        MIB as u32,
        false,
    )
    .unwrap()
}

/// Writes whole MiBs from the start of `lun` until one fails; returns how many succeeded and
/// the failure.
fn fill(ini: &mut Initiator, lun: u64, byte: u8) -> (usize, ScsiResult) {
    for i in 0..64 {
        let r = write_mib(ini, lun, i, byte);
        if !r.is_good() {
            return (i, r);
        }
    }
    panic!("64 MiB written to LUN {lun} of a 16 MiB file system");
}

/// UNMAP (SBC-3 §5.28) of one extent.
fn unmap(ini: &mut Initiator, lun: u64, lba: u64, blocks: u32) -> ScsiResult {
    let mut list = vec![0u8; 24];
    list[0..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list[8..16].copy_from_slice(&lba.to_be_bytes());
    list[16..20].copy_from_slice(&blocks.to_be_bytes());
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&24u16.to_be_bytes());
    ini.scsi(lun, &c, Some(&list), 24, false).unwrap()
}

#[test]
#[ignore = "needs a 16 MiB tmpfs: run through scripts/faults.sh"]
fn a_full_file_system_gets_the_right_sense_and_nothing_hangs() {
    let dir = tmpfs();
    for f in ["thin.img", "thick.img"] {
        let p = dir.join(f);
        let _ = std::fs::remove_file(&p);
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 * MIB as u64)
            .unwrap();
    }
    let t = Target::start(&["--cores", "0"]);
    let add = |name: &str, file: &str, thin: u8, lun: u64| {
        t.mgmt(
            "handlers/vdisk_fileio/mgmt",
            &format!(
                "add_device {name} filename={}; thin_provisioned={thin}",
                dir.join(file).display()
            ),
        );
        t.mgmt(
            &format!("targets/iscsi/{IQN}/luns/mgmt"),
            &format!("add {name} {lun}"),
        );
    };
    t.mgmt("targets/iscsi/mgmt", &format!("add_target {IQN}"));
    add("thin0", "thin.img", 1, 0);
    add("thick0", "thick.img", 0, 1);
    t.set(&format!("targets/iscsi/{IQN}/enabled"), "1");
    t.set("targets/iscsi/enabled", "1");
    let mut ini = login(&t);

    // The thin LUN fills the file system.
    let (n, r) = fill(&mut ini, 0, 0x11);
    assert!(
        (4..17).contains(&n),
        "{n} MiB written before the file system filled"
    );
    assert_eq!(r.sense_key(), Some(0x07), "thin: DATA PROTECT, {r:?}");
    assert_eq!(r.asc_ascq(), Some((0x27, 0x07)), "SPACE ALLOCATION FAILED");
    // What was written reads back; the LUN and the session go on.
    let back = ini.read10(0, 0, 2048, 512).unwrap();
    assert!(back.iter().all(|&b| b == 0x11));
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    // A burst of writes into the full file system: every one answered.
    let data = vec![0x22u8; 256 * 1024];
    let itts: Vec<u32> = (0..32u32)
        .map(|i| {
            ini.submit(
                0,
                &cdb::write10((n as u32 + 1) * 2048 + i * 512, 512),
                Some(&data),
                data.len() as u32,
                false,
            )
            .unwrap()
        })
        .collect();
    for itt in itts {
        let r = ini.wait(itt).unwrap();
        assert_eq!(r.sense_key(), Some(0x07), "{r:?}");
    }
    // UNMAP gives the space back, and the LUN takes writes again.
    assert!(unmap(&mut ini, 0, 0, (n * MIB / 512) as u32).is_good());
    assert!(write_mib(&mut ini, 0, 0, 0x33).is_good());

    // The fully provisioned LUN on the same full file system: MEDIUM ERROR with the LBA.
    let (m, r) = fill(&mut ini, 1, 0x44);
    assert!(m < 17, "{m} MiB");
    assert_eq!(r.sense_key(), Some(0x03), "thick: MEDIUM ERROR, {r:?}");
    assert_eq!(r.asc_ascq(), Some((0x0c, 0x00)), "WRITE ERROR");
    assert!(ini.test_unit_ready(1).unwrap().is_good());
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    ini.logout().unwrap();
    let mut t = t;
    assert!(t.alive(), "{}", t.log());
}

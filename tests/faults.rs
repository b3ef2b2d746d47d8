//! Faults of the backing store, seen from an initiator.
//!
//! - A file system that fills up: every command is answered (none hangs), with the sense
//!   SBC-3 names: a thin provisioned LUN out of space reports SPACE ALLOCATION FAILED WRITE
//!   PROTECT (07/27/07) and gets space back with UNMAP, a fully provisioned one reports MEDIUM
//!   ERROR, WRITE ERROR (03/0C/00); reads and other LUNs go on. It needs a small tmpfs
//!   mounted as root: `scripts/faults.sh` mounts one and runs it with `--ignored`.
//! - A backend that stalls (`fault_inject=stall`): memory stays bounded by the command
//!   window, task management is answered, sessions that give up close, and everything held
//!   drains when the stall ends. (Injected EIO: tests/mgmt_hardening.rs.)
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

/// A RAM LUN 0 (16 MiB) on target IQN, logged in, unit attentions cleared.
fn stalled_target() -> (Target, Initiator) {
    let t = Target::with_default_luns(16);
    let ini = login(&t);
    (t, ini)
}

#[test]
fn a_stalled_backend_keeps_memory_bounded_and_sessions_recover() {
    let (t, mut ini) = stalled_target();
    t.set(&format!("targets/iscsi/{IQN}/QueuedCommands"), "32");
    let base = t.resources();
    t.set("devices/ram0/fault_inject", "stall");
    // 32 READs of 256 KiB fill the command window and stay in the backend.
    let itts: Vec<u32> = (0..32u32)
        .map(|i| {
            ini.submit(0, &cdb::read10(i * 512, 512), None, 256 * 1024, true)
                .unwrap()
        })
        .collect();
    // Meanwhile the target answers what does not touch the medium, and holds no more than
    // the window's worth of buffers however long the stall lasts.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        let r = t.resources();
        assert!(
            r.rss_kib <= base.rss_kib + 32 * 1024,
            "{r:?} against {base:?} at the start of the stall"
        );
    }
    assert!(
        ini.outstanding() >= 32,
        "nothing completes during the stall"
    );
    let in_use: u64 = t.get("sgv/chunks_in_use").trim().parse().unwrap();
    assert!(
        in_use <= 32 * 2,
        "{in_use} chunks held for 32 commands of 2 chunks"
    );
    // The stall ends: every command completes with its data.
    t.set("devices/ram0/fault_inject", "none");
    for itt in itts {
        let r = ini.wait(itt).unwrap();
        assert!(r.is_good(), "{r:?}");
        assert_eq!(r.data.len(), 256 * 1024);
    }
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

#[test]
fn sessions_that_give_up_on_a_stalled_backend_close_cleanly() {
    let (mut t, mut ini) = stalled_target();
    t.set("devices/ram0/fault_inject", "stall");
    let data = vec![0x5au8; 65536];
    let w = ini
        .submit(0, &cdb::write10(0, 128), Some(&data), 65536, false)
        .unwrap();
    let r = ini
        .submit(0, &cdb::read10(256, 128), None, 65536, true)
        .unwrap();
    t.wait_active_commands("", 2);
    // The initiator gives up on its commands: ABORT TASK, then LOGICAL UNIT RESET, both
    // answered at once: the I/O the stalled backend holds has not reached the medium, so it
    // is cancelled and can never land later.
    assert_eq!(
        ini.task_mgmt(iscsi_tgt::iscsi::pdu::TMF_ABORT_TASK, 0, r)
            .unwrap(),
        0
    );
    assert_eq!(
        ini.task_mgmt(iscsi_tgt::iscsi::pdu::TMF_LOGICAL_UNIT_RESET, 0, 0)
            .unwrap(),
        0
    );
    let _ = w;
    ini.logout().unwrap();
    // Another initiator drops its connection with I/O held.
    let mut other = login(&t);
    other
        .submit(0, &cdb::read10(0, 128), None, 65536, true)
        .unwrap();
    drop(other);
    // The held I/O of aborted commands and of the dropped connection was cancelled (it had
    // not reached the medium): both sessions end, their connections close and their buffers
    // return while the backend still stalls.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let sessions = format!("targets/iscsi/{IQN}/sessions");
    while t
        .call("ls", serde_json::json!({ "path": sessions }))
        .as_array()
        .is_some_and(|a| !a.is_empty())
        || t.get("targets/iscsi/connections").trim() != "0"
        || t.get("sgv/chunks_in_use").trim() != "0"
    {
        assert!(std::time::Instant::now() < deadline, "{}", t.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The stall ends: nothing of the aborted commands is written, the LUN serves again.
    t.set("devices/ram0/fault_inject", "none");
    let mut ini = login(&t);
    assert_eq!(ini.read10(0, 0, 128, 512).unwrap(), vec![0u8; 65536]);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    ini.write10(0, 0, &data, 512).unwrap();
    assert_eq!(ini.read10(0, 0, 128, 512).unwrap(), data);
    assert!(t.alive(), "{}", t.log());
}

/// A session of `name` with ISID `isid`, unit attentions cleared.
fn login_as(t: &Target, name: &str, isid: u8) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.set_timeout(Some(Duration::from_secs(30))).unwrap();
    ini.login(&LoginOptions {
        initiator_name: name.into(),
        target_name: Some(IQN.into()),
        isid: [0x80, 0, 0, 0, 0x33, isid],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    for _ in 0..4 {
        if ini.test_unit_ready(0).unwrap().is_good() {
            break;
        }
    }
    ini
}

/// Sends a task management request (immediate, LUN 0) without waiting for its answer: the
/// tests below check when it comes.
fn send_tmf(ini: &mut Initiator, function: u8, itt: u32, referenced: u32) {
    let req = iscsi_tgt::iscsi::pdu::TaskMgmtRequest {
        immediate: true,
        function,
        lun: iscsi_tgt::iscsi::pdu::encode_lun(0),
        itt,
        referenced_task_tag: referenced,
        cmd_sn: ini.next_cmd_sn(),
        exp_stat_sn: ini.exp_stat_sn(),
        ref_cmd_sn: ini.next_cmd_sn().wrapping_sub(1),
        ..Default::default()
    };
    let mut bhs = [0u8; iscsi_tgt::iscsi::pdu::BHS_LEN];
    req.emit(&mut bhs);
    ini.send_pdu(&bhs, &[], &[]).unwrap();
}

#[test]
fn an_abort_is_answered_only_once_the_write_can_no_longer_land() {
    let t = Target::with_default_luns(16);
    let mut ini = login_as(&t, "iqn.2026-11.org.iscsi-tgt:abort", 1);
    // The write reaches the "device" and hangs there: it cannot be cancelled.
    t.set("devices/ram0/fault_inject", "hang");
    let a = vec![0xaau8; 65536];
    let itt = ini
        .submit(0, &cdb::write10(0, 128), Some(&a), 65536, false)
        .unwrap();
    t.wait_active_commands("", 1);
    send_tmf(&mut ini, iscsi_tgt::iscsi::pdu::TMF_ABORT_TASK, 0x7777, itt);
    // FUNCTION COMPLETE would promise the write will not change the medium any more: while
    // it hangs in the device, no answer.
    ini.set_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(
        ini.recv_pdu().is_err(),
        "the ABORT TASK was answered while its write could still land"
    );
    ini.set_timeout(Some(Duration::from_secs(30))).unwrap();
    t.set("devices/ram0/fault_inject", "none");
    let (h, _) = ini.recv_pdu().unwrap();
    assert_eq!(h[0] & 0x3f, iscsi_tgt::iscsi::pdu::op::TASK_MGMT_RESPONSE);
    let r = iscsi_tgt::iscsi::pdu::TaskMgmtResponse::parse(&h, &[]).unwrap();
    assert_eq!((r.itt, r.response), (0x7777, 0));
}

/// Logs in on a thread; the result comes on the channel.
fn login_in_background(
    t: &Target,
    name: &'static str,
    isid: u8,
) -> crossbeam_channel::Receiver<Result<Initiator, String>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let addr = t.addr;
    std::thread::spawn(move || {
        let r = (|| {
            let mut ini = Initiator::connect(addr).map_err(|e| e.to_string())?;
            ini.set_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            ini.login(&LoginOptions {
                initiator_name: name.into(),
                target_name: Some(IQN.into()),
                isid: [0x80, 0, 0, 0, 0x33, isid],
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
            Ok(ini)
        })();
        let _ = tx.send(r);
    });
    rx
}

/// The old session's write in the device, a new session of the same I_T nexus (same
/// initiator, same ISID) logging in: it completes only after that write is done, so the old
/// write can never land over the new session's data.
fn new_session_waits_for_the_old_ones_writes(drop_first: bool) {
    const NAME: &str = "iqn.2026-11.org.iscsi-tgt:reinstated";
    let t = Target::with_default_luns(16);
    let mut old = login_as(&t, NAME, 7);
    t.set("devices/ram0/fault_inject", "hang");
    let a = vec![0xaau8; 65536];
    old.submit(0, &cdb::write10(0, 128), Some(&a), 65536, false)
        .unwrap();
    t.wait_active_commands(NAME, 1);
    if drop_first {
        // The initiator loses its connection with the write outstanding.
        drop(old);
        std::thread::sleep(Duration::from_millis(300));
    }
    let pending = login_in_background(&t, NAME, 7);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        pending.try_recv().is_err(),
        "the new session logged in while the old one's write could still land\n{}",
        t.log()
    );
    if !drop_first {
        assert_eq!(
            t.get(&format!("targets/iscsi/{IQN}/sessions/{NAME}/reinstating")),
            "1"
        );
    }
    t.set("devices/ram0/fault_inject", "none");
    let mut new = pending
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", t.log()));
    for _ in 0..4 {
        if new.test_unit_ready(0).unwrap().is_good() {
            break;
        }
    }
    let b = vec![0xbbu8; 65536];
    new.write10(0, 0, &b, 512).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(new.read10(0, 0, 128, 512).unwrap(), b);
    let sessions = t.call(
        "ls",
        serde_json::json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
    );
    assert_eq!(sessions.as_array().map_or(0, Vec::len), 1, "{sessions}");
}

#[test]
fn a_reinstating_login_waits_for_the_old_sessions_writes() {
    new_session_waits_for_the_old_ones_writes(false);
}

#[test]
fn a_login_after_a_dropped_connection_waits_for_its_writes() {
    new_session_waits_for_the_old_ones_writes(true);
}

#[test]
fn a_lun_reset_waits_for_another_nexus_writes_on_any_reactor() {
    let t = Target::start(&["--cores", "0,1"]);
    t.configure_default(16);
    let mut a = login_as(&t, "iqn.2026-11.org.iscsi-tgt:resetter", 1);
    let mut b = login_as(&t, "iqn.2026-11.org.iscsi-tgt:writer", 2);
    t.set("devices/ram0/fault_inject", "hang");
    let data = vec![0xccu8; 65536];
    let itt = b
        .submit(0, &cdb::write10(0, 128), Some(&data), 65536, false)
        .unwrap();
    t.wait_active_commands("iqn.2026-11.org.iscsi-tgt:writer", 1);
    send_tmf(
        &mut a,
        iscsi_tgt::iscsi::pdu::TMF_LOGICAL_UNIT_RESET,
        0x8888,
        iscsi_tgt::iscsi::pdu::RESERVED_TAG,
    );
    // Neither the reset's answer nor the other nexus's TASK ABORTED while its write hangs.
    a.set_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(
        a.recv_pdu().is_err(),
        "LUN RESET answered while a write could land"
    );
    b.set_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(
        b.recv_pdu().is_err(),
        "TASK ABORTED while the write could land"
    );
    a.set_timeout(Some(Duration::from_secs(30))).unwrap();
    b.set_timeout(Some(Duration::from_secs(30))).unwrap();
    t.set("devices/ram0/fault_inject", "none");
    let r = b.wait(itt).unwrap();
    assert_eq!(r.status, 0x40, "TASK ABORTED: {r:?}");
    let (h, _) = a.recv_pdu().unwrap();
    let r = iscsi_tgt::iscsi::pdu::TaskMgmtResponse::parse(&h, &[]).unwrap();
    assert_eq!((r.itt, r.response), (0x8888, 0));
}

//! What a hostile administrator (or a careless script) can do through the RPC must not hurt the
//! daemon or the files around it: add_device never changes a file it was only asked to open,
//! a FIFO or other non-file as a backing is refused at once while the RPC keeps answering,
//! RAM disks fit in memory, SCST's CHAP commands work as scstadmin sends them, and the fault
//! injection attribute behaves as documented.
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::Target;
use serde_json::{json, Value};

fn mgmt(t: &Target, path: &str, command: &str) -> Result<Value, Value> {
    t.try_call("mgmt", json!({"path": path, "command": command}))
}

/// The message of a JSON-RPC error, after checking it is one.
fn err_msg(r: Result<Value, Value>, what: &str) -> String {
    let e = r.expect_err(what);
    assert!(e.get("code").is_some(), "{what}: not a JSON-RPC error: {e}");
    e["message"].as_str().unwrap_or_default().to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn add_device_never_resizes_an_existing_file() {
    let t = Target::start(&["--cores", "0"]);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = dir.path().join("disk.img");
    std::fs::write(&f, vec![7u8; 1 << 20]).unwrap();
    let before = std::fs::metadata(&f).unwrap();
    let msg = err_msg(
        mgmt(
            &t,
            "handlers/vdisk_fileio/mgmt",
            &format!("add_device d0 filename={}; size_mb=4", path_str(&f)),
        ),
        "a size larger than the existing file",
    );
    assert!(
        msg.contains(path_str(&f)) && msg.contains("1048576") && msg.contains("4194304"),
        "{msg}"
    );
    let after = std::fs::metadata(&f).unwrap();
    assert_eq!(after.len(), 1 << 20, "the file was resized");
    assert_eq!(
        after.mtime_nsec(),
        before.mtime_nsec(),
        "the file was touched"
    );
    assert!(
        t.try_call("get", json!({"path": "devices/d0/size"}))
            .is_err(),
        "the device was created"
    );
    // The size it has is accepted, and so is no size.
    t.mgmt(
        "handlers/vdisk_fileio/mgmt",
        &format!("add_device d0 filename={}; size_mb=1", path_str(&f)),
    );
    t.mgmt(
        "handlers/vdisk_fileio/mgmt",
        &format!("add_device d1 filename={}", path_str(&f)),
    );
    assert_eq!(t.get("devices/d1/size"), "1048576");
    // A new file is made, private to its owner.
    let n = dir.path().join("new.img");
    t.mgmt(
        "handlers/vdisk_fileio/mgmt",
        &format!("add_device d2 filename={}; size_mb=2", path_str(&n)),
    );
    let md = std::fs::metadata(&n).unwrap();
    assert_eq!(md.len(), 2 << 20);
    assert_eq!(md.mode() & 0o077, 0, "mode {:o}", md.mode());
    // Without a size a missing file is an error.
    let msg = err_msg(
        mgmt(
            &t,
            "handlers/vdisk_fileio/mgmt",
            &format!(
                "add_device d3 filename={}",
                path_str(&dir.path().join("missing.img"))
            ),
        ),
        "a missing file without a size",
    );
    assert!(msg.contains("No such file"), "{msg}");
}

/// Runs `mgmt` on one client while a second client asks for the version; both must answer
/// (each call gives up after 30 s, so a hung daemon fails the test rather than hanging it).
fn mgmt_while_rpc_answers(t: &Target, path: &str, command: &str) -> Result<Value, Value> {
    std::thread::scope(|s| {
        let h = s.spawn(|| mgmt(t, path, command));
        let v = t.try_call("get", json!({"path": "version"}));
        assert!(v.is_ok(), "get version during {command:?}: {v:?}");
        let r = h.join().unwrap();
        if let Err(e) = &r {
            assert!(e.get("io").is_none(), "{command:?} did not answer: {e}");
        }
        let v = t.try_call("get", json!({"path": "version"}));
        assert!(v.is_ok(), "get version after {command:?}: {v:?}");
        r
    })
}

#[test]
fn a_fifo_or_other_non_file_is_refused_and_rpc_keeps_answering() {
    let t = Target::start(&["--cores", "0"]);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let cases = [
        (&fifo as &Path, "a FIFO"),
        (&sub, "a directory"),
        (Path::new("/dev/null"), "a character device"),
    ];
    for (i, (p, what)) in cases.into_iter().enumerate() {
        let p = path_str(p);
        for (handler, extra) in [
            ("vdisk_fileio", ""),
            ("vdisk_fileio", "; read_only=1"),
            ("vdisk_blockio", ""),
        ] {
            let cmd = format!("add_device x{i} filename={p}{extra}");
            let msg = err_msg(
                mgmt_while_rpc_answers(&t, &format!("handlers/{handler}/mgmt"), &cmd),
                &cmd,
            );
            let want = if handler == "vdisk_blockio" {
                "not a block device"
            } else {
                what
            };
            assert!(msg.contains(p) && msg.contains(want), "{cmd}: {msg}");
        }
        // A CD drive refuses it as a disc, and stays empty.
        t.mgmt("handlers/vcdrom/mgmt", &format!("add_device cd{i}"));
        let path = format!("devices/cd{i}/filename");
        let r = std::thread::scope(|s| {
            let h = s.spawn(|| t.try_call("set", json!({"path": path, "value": p})));
            assert!(t.try_call("get", json!({"path": "version"})).is_ok());
            h.join().unwrap()
        });
        let msg = err_msg(r, &format!("vcdrom on {p}"));
        assert!(msg.contains(p) && msg.contains(what), "{msg}");
        assert_eq!(t.get(&path), "");
    }
    let devices = t.call("ls", json!({"path": "devices"}));
    let names: Vec<&str> = devices
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["cd0", "cd1", "cd2"], "only the CD drives exist");
}

/// MemAvailable of this machine, in MiB.
fn mem_available_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        >> 10
}

#[test]
fn a_ram_disk_beyond_memory_is_refused() {
    let t = Target::start(&["--cores", "0"]);
    // Margins wide enough that memory freed meanwhile by other processes cannot matter.
    let avail = mem_available_mib();
    let want = avail + avail / 2 + 1024;
    let msg = err_msg(
        mgmt(
            &t,
            "handlers/vdisk_ramio/mgmt",
            &format!("add_device big size_mb={want}"),
        ),
        "a RAM disk beyond MemAvailable",
    );
    assert!(
        msg.contains(&format!("{want} MiB")) && msg.contains("available"),
        "{msg}"
    );
    assert!(t
        .try_call("get", json!({"path": "devices/big/size"}))
        .is_err());
    // What fits is made (untouched, it costs nothing) and counts against the next one.
    let half = (avail / 2).max(1);
    t.mgmt(
        "handlers/vdisk_ramio/mgmt",
        &format!("add_device half size_mb={half}"),
    );
    assert_eq!(t.get("devices/half/size_mb"), half.to_string());
    let more = (avail * 3 / 4).max(1);
    let msg = err_msg(
        mgmt(
            &t,
            "handlers/vdisk_ramio/mgmt",
            &format!("add_device more size_mb={more}"),
        ),
        "MemAvailable with another RAM disk holding half of it",
    );
    assert!(msg.contains("other RAM disks"), "{msg}");
    // Deleting the first gives its share back.
    t.mgmt("handlers/vdisk_ramio/mgmt", "del_device half");
    t.mgmt(
        "handlers/vdisk_ramio/mgmt",
        &format!("add_device more size_mb={}", (avail / 4).max(1)),
    );
}

#[test]
fn chap_deletes_as_scstadmin_sends_them_and_handler_types() {
    let t = Target::start(&["--cores", "0"]);
    let iqn = common::IQN;
    t.mgmt("targets/iscsi/mgmt", &format!("add_target {iqn}"));
    let m = "targets/iscsi/mgmt";
    t.mgmt(
        m,
        &format!("add_target_attribute {iqn} IncomingUser joe 12charsecret"),
    );
    t.mgmt(m, "add_attribute IncomingUser ann 12charsecret");
    t.mgmt(m, "add_attribute OutgoingUser tgt 12charsecret");
    // A secret that does not match is refused, naming the user and not the secret.
    let msg = err_msg(
        mgmt(
            &t,
            m,
            &format!("del_target_attribute {iqn} IncomingUser joe not-the-secret"),
        ),
        "a wrong secret",
    );
    assert!(
        msg.contains("joe") && !msg.contains("not-the-secret"),
        "{msg}"
    );
    assert_eq!(t.get(&format!("targets/iscsi/{iqn}/IncomingUser")), "joe");
    // The value scstadmin reads back and sends: user and secret.
    t.mgmt(
        m,
        &format!("del_target_attribute {iqn} IncomingUser joe 12charsecret"),
    );
    assert!(t
        .try_call(
            "get",
            json!({"path": format!("targets/iscsi/{iqn}/IncomingUser")})
        )
        .is_err());
    t.mgmt(m, "del_attribute IncomingUser ann 12charsecret");
    t.mgmt(m, "del_attribute OutgoingUser tgt 12charsecret");
    assert!(t
        .try_call("get", json!({"path": "targets/iscsi/OutgoingUser"}))
        .is_err());
    assert_eq!(t.get("handlers/vcdrom/type"), "5 - CD-ROM device");
    for h in [
        "vdisk_fileio",
        "vdisk_blockio",
        "vdisk_nullio",
        "vdisk_ramio",
    ] {
        assert_eq!(
            t.get(&format!("handlers/{h}/type")),
            "0 - direct-access device (e.g., magnetic disk)"
        );
    }
}

mod faults {
    use super::*;
    use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions, ScsiResult, STATUS_CHECK_CONDITION};
    use std::time::Duration;

    const BS: u32 = 512;
    const MEDIUM_ERROR: u8 = 0x03;
    const WRITE_ERROR: (u8, u8) = (0x0c, 0x00);
    const UNRECOVERED_READ_ERROR: (u8, u8) = (0x11, 0x00);

    fn login(t: &Target) -> Initiator {
        let mut ini = Initiator::connect(t.addr).unwrap();
        ini.login(&LoginOptions {
            initiator_name: "iqn.2026-11.org.iscsi-tgt:faults".into(),
            target_name: Some(common::IQN.into()),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
        for lun in [0, 1] {
            for _ in 0..8 {
                if ini.test_unit_ready(lun).unwrap().is_good() {
                    break;
                }
            }
        }
        ini
    }

    /// The INFORMATION field of fixed-format sense data, when VALID.
    fn information(r: &ScsiResult) -> Option<u32> {
        let s = &r.sense;
        if s.len() < 7 || s[0] & 0x80 == 0 {
            return None;
        }
        Some(u32::from_be_bytes([s[3], s[4], s[5], s[6]]))
    }

    fn write(ini: &mut Initiator, lun: u64, lba: u32, data: &[u8]) -> ScsiResult {
        let blocks = (data.len() / BS as usize) as u16;
        ini.scsi(
            lun,
            &cdb::write10(lba, blocks),
            Some(data),
            data.len() as u32,
            false,
        )
        .unwrap()
    }

    fn read(ini: &mut Initiator, lun: u64, lba: u32, blocks: u16) -> ScsiResult {
        ini.scsi(
            lun,
            &cdb::read10(lba, blocks),
            None,
            u32::from(blocks) * BS,
            true,
        )
        .unwrap()
    }

    fn target() -> (Target, tempfile::TempDir) {
        let t = Target::start(&["--cores", "0"]);
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        t.mgmt("handlers/vdisk_ramio/mgmt", "add_device ram0 size_mb=4");
        t.mgmt(
            "handlers/vdisk_fileio/mgmt",
            &format!(
                "add_device file0 filename={}; size_mb=4",
                path_str(&dir.path().join("f.img"))
            ),
        );
        let iqn = common::IQN;
        t.mgmt("targets/iscsi/mgmt", &format!("add_target {iqn}"));
        t.mgmt(&format!("targets/iscsi/{iqn}/luns/mgmt"), "add ram0 0");
        t.mgmt(&format!("targets/iscsi/{iqn}/luns/mgmt"), "add file0 1");
        t.set(&format!("targets/iscsi/{iqn}/enabled"), "1");
        t.set("targets/iscsi/enabled", "1");
        (t, dir)
    }

    const DEVICES: [(u64, &str); 2] = [(0, "ram0"), (1, "file0")];

    #[test]
    fn injected_eio_is_a_medium_error_and_the_device_stays() {
        let (t, _dir) = target();
        let mut ini = login(&t);
        let data: Vec<u8> = (0..4 * BS as usize).map(|i| (i * 13 % 251) as u8).collect();
        for (lun, dev) in DEVICES {
            let attr = format!("devices/{dev}/fault_inject");
            assert_eq!(t.get(&attr), "none");
            assert!(write(&mut ini, lun, 8, &data).is_good());

            t.set(&attr, "eio_write");
            // More than the EIO_LIMIT of real errors that takes a file offline.
            for _ in 0..5 {
                let r = write(&mut ini, lun, 16, &data);
                assert_eq!(r.status, STATUS_CHECK_CONDITION, "{dev}: {r:?}");
                assert_eq!(r.sense_key(), Some(MEDIUM_ERROR), "{dev}: {r:?}");
                assert_eq!(r.asc_ascq(), Some(WRITE_ERROR), "{dev}: {r:?}");
                assert_eq!(information(&r), Some(16), "{dev}: the LBA");
            }
            let r = read(&mut ini, lun, 8, 4);
            assert!(r.is_good(), "{dev}: a READ under eio_write: {r:?}");
            assert_eq!(r.data, data, "{dev}");
            assert!(
                ini.test_unit_ready(lun).unwrap().is_good(),
                "{dev} went offline"
            );
            if dev == "file0" {
                assert_eq!(t.get("devices/file0/active"), "1");
            }

            t.set(&attr, "eio_read");
            let r = read(&mut ini, lun, 9, 2);
            assert_eq!(r.sense_key(), Some(MEDIUM_ERROR), "{dev}: {r:?}");
            assert_eq!(r.asc_ascq(), Some(UNRECOVERED_READ_ERROR), "{dev}: {r:?}");
            assert_eq!(information(&r), Some(9), "{dev}: the LBA");

            t.set(&attr, "none");
            let r = read(&mut ini, lun, 8, 4);
            assert!(r.is_good(), "{dev}: {r:?}");
            assert_eq!(r.data, data, "{dev}");
            // The failed writes wrote nothing.
            let r = read(&mut ini, lun, 16, 4);
            assert!(r.data.iter().all(|&b| b == 0), "{dev}");
        }
        // save_config leaves the attribute out at its default, keeps it otherwise.
        let cfg = t.call("save_config", json!({}));
        assert!(!cfg.to_string().contains("fault_inject"), "{cfg}");
        t.set("devices/ram0/fault_inject", "eio");
        let cfg = t.call("save_config", json!({}));
        assert_eq!(
            cfg["handlers"]["vdisk_ramio"]["ram0"]["fault_inject"], "eio",
            "{cfg}"
        );
        t.set("devices/ram0/fault_inject", "none");
        let msg = err_msg(
            t.try_call(
                "set",
                json!({"path": "devices/ram0/fault_inject", "value": "often"}),
            ),
            "a bad value",
        );
        assert!(msg.contains("stall") && msg.contains("often"), "{msg}");
    }

    #[test]
    fn a_stalled_read_completes_when_the_stall_is_cleared() {
        let (t, _dir) = target();
        let mut ini = login(&t);
        let iqn = common::IQN;
        for (lun, dev) in DEVICES {
            let data: Vec<u8> = (0..8 * BS as usize)
                .map(|i| (i * 7 + lun as usize) as u8)
                .collect();
            assert!(write(&mut ini, lun, 100, &data).is_good());
            let attr = format!("devices/{dev}/fault_inject");
            t.set(&attr, "stall");
            let itt = ini
                .submit(lun, &cdb::read10(100, 8), None, 8 * BS, true)
                .unwrap();
            // It does not complete while the stall lasts (whatever the machine's load, a
            // held READ never completes early)...
            ini.set_timeout(Some(Duration::from_secs(1))).unwrap();
            assert!(
                ini.wait(itt).is_err(),
                "{dev}: the READ completed during the stall"
            );
            let sessions = t.call(
                "ls",
                json!({"path": format!("targets/iscsi/{iqn}/sessions")}),
            );
            let s = sessions[0]["name"].as_str().unwrap().to_string();
            assert_eq!(
                t.get(&format!("targets/iscsi/{iqn}/sessions/{s}/active_commands")),
                "1",
                "{dev}"
            );
            // ...and does once it is cleared, with the data.
            t.set(&attr, "none");
            ini.set_timeout(Some(Duration::from_secs(30))).unwrap();
            let r = ini.wait(itt).unwrap();
            assert!(r.is_good(), "{dev}: {r:?}");
            assert_eq!(r.data, data, "{dev}");
            assert!(ini.test_unit_ready(lun).unwrap().is_good());
        }
    }
}

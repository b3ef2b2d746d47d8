//! Replays the fuzz targets' seeds and saved regression inputs (`fuzz/seeds/TARGET/`,
//! `fuzz/regressions/TARGET/`) through the same harness the fuzzers run, on the stable
//! toolchain: every input that once crashed, hung or leaked stays fixed.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;
use std::sync::Mutex;

/// The harness checks that every data buffer returns to the process's pool, which it can
/// only do while no other test allocates: the targets run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn replay(target: &str, run: fn(&[u8])) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            files.push(e.unwrap().path());
        }
    }
    files.sort();
    assert!(!files.is_empty(), "no seeds or regressions for {target}");
    // Every input runs, so that one failure does not hide another.
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target} fails on {failed:#?}");
}

#[test]
fn pdu() {
    replay("pdu", harness::pdu);
}

#[test]
fn login() {
    replay("login", harness::login);
}

#[test]
fn cdb() {
    replay("cdb", harness::cdb);
}

#[test]
fn mgmt() {
    replay("mgmt", harness::mgmt);
}

#[test]
fn rpc() {
    replay("rpc", harness::rpc);
}

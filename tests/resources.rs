//! Sessions come and go without leaving anything behind: a thousand login cycles, two hundred
//! sessions at once and an initiator killed in the middle of a QD128 write run all end with the
//! daemon holding the descriptors, threads and memory it held before (counted from /proc).
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Resources, Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions};

/// Resident memory may move by this much (allocator caches, log buffers): growth per session
/// would be far more over these runs.
const RSS_SLACK_KIB: u64 = 8 * 1024;

fn login(t: &Target, name: &str, isid: u16) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let [hi, lo] = isid.to_be_bytes();
    ini.login(&LoginOptions {
        initiator_name: name.into(),
        target_name: Some(IQN.into()),
        isid: [0x80, 0, 0, 0, hi, lo],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    ini
}

/// Until `f` holds (20 s at most).
fn eventually(t: &Target, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", t.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's resources once the RPC connection of the last check has gone (the same
/// reading twice, 300 ms apart).
fn settled(t: &Target) -> Resources {
    let mut last = t.resources();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(300));
        let now = t.resources();
        if now.fds == last.fds && now.threads == last.threads {
            return now;
        }
        last = now;
    }
    last
}

/// Compares with `before` once the daemon has settled (the RPC connection of the last
/// check may still be closing): descriptors and threads exactly, memory within the slack.
fn assert_no_growth(t: &Target, before: Resources, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = t.resources();
    while (after.fds != before.fds || after.threads != before.threads) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        after = t.resources();
    }
    assert_eq!(after.fds, before.fds, "descriptors after {what}");
    assert_eq!(after.threads, before.threads, "threads after {what}");
    assert!(
        after.rss_kib <= before.rss_kib + RSS_SLACK_KIB,
        "resident memory after {what}: {} KiB, {} KiB before",
        after.rss_kib,
        before.rss_kib
    );
}

#[test]
fn a_thousand_login_cycles_leave_no_growth() {
    let t = Target::with_default_luns(16);
    let cycle = |i: u16| {
        let mut ini = login(&t, "iqn.2026-11.org.iscsi-tgt:cycles", i);
        // The first command sees the new nexus's unit attention; either answer is fine.
        let _ = ini.test_unit_ready(0).unwrap();
        ini.logout().unwrap();
    };
    for i in 0..50 {
        cycle(i);
    }
    eventually(&t, "sessions gone", || {
        t.get("targets/iscsi/connections").trim() == "0"
    });
    let before = settled(&t);
    for i in 0..1000 {
        cycle(i);
    }
    eventually(&t, "sessions gone", || {
        t.get("targets/iscsi/connections").trim() == "0"
    });
    assert_no_growth(&t, before, "1000 login cycles");
}

/// Two hundred sessions logged in at once, each served, then all logged out.
fn two_hundred_sessions(t: &Target, before: Resources) {
    let mut all = Vec::new();
    for i in 0..200u16 {
        let mut ini = login(t, &format!("iqn.2026-11.org.iscsi-tgt:many-{i}"), i);
        let _ = ini.test_unit_ready(0).unwrap();
        all.push(ini);
    }
    assert_eq!(t.get("targets/iscsi/connections").trim(), "200");
    let sessions = t.call(
        "ls",
        serde_json::json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
    );
    assert_eq!(sessions.as_array().map_or(0, Vec::len), 200);
    let held = settled(t);
    assert!(held.fds >= before.fds + 200, "{held:?} vs {before:?}");
    assert_eq!(held.threads, before.threads, "no thread per session");
    for ini in all.iter_mut() {
        assert!(ini.test_unit_ready(0).unwrap().is_good());
    }
    for mut ini in all {
        ini.logout().unwrap();
    }
    eventually(t, "sessions gone", || {
        t.get("targets/iscsi/connections").trim() == "0"
    });
}

#[test]
fn two_hundred_concurrent_sessions_leave_no_growth() {
    let t = Target::with_default_luns(16);
    let start = settled(&t);
    // The first round leaves the allocator's high-water mark; the second must not raise it.
    two_hundred_sessions(&t, start);
    assert_no_growth(
        &t,
        Resources {
            rss_kib: start.rss_kib + 64 * 1024,
            ..start
        },
        "the first round",
    );
    // The allocator's arenas (one per thread that allocates: reactors, RPC workers) settle
    // over the next rounds; from then on more rounds must not raise it.
    for _ in 0..2 {
        let b = settled(&t);
        two_hundred_sessions(&t, b);
    }
    let before = settled(&t);
    for _ in 0..2 {
        two_hundred_sessions(&t, before);
    }
    assert_no_growth(&t, before, "200 concurrent sessions");
}

/// Starts a QD128 write run and kills it (SIGKILL) while its writes are in flight.
fn kill_a_write_run(t: &Target, after: Duration) {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_iscsi-bench"))
        .args([
            "--portal",
            &t.addr.to_string(),
            "--target",
            IQN,
            "--lun",
            "1",
        ])
        .args([
            "--write", "--random", "--qd", "128", "--bs", "65536", "--secs", "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(t, "the bench logged in", || {
        t.get("targets/iscsi/connections").trim() == "1"
    });
    std::thread::sleep(after);
    bench.kill().unwrap();
    bench.wait().unwrap();
    eventually(t, "the killed initiator's connection closed", || {
        t.get("targets/iscsi/connections").trim() == "0"
    });
    eventually(t, "its buffers returned", || {
        t.get("sgv/chunks_in_use").trim() == "0"
    });
}

#[test]
fn an_initiator_killed_during_a_qd128_write_run_leaves_nothing_behind() {
    let mut t = Target::with_default_luns(64);
    t.set(&format!("targets/iscsi/{IQN}/QueuedCommands"), "128");
    // The writes go to the null LUN (no RAM disk pages to fault in); a first run touches the
    // buffer pool's pages, the next ones must add nothing.
    kill_a_write_run(&t, Duration::from_millis(500));
    let before = settled(&t);
    for round in 0..3 {
        kill_a_write_run(&t, Duration::from_millis(300 + 200 * round));
    }
    assert!(t.alive(), "{}", t.log());
    assert_no_growth(&t, before, "killed initiators");
    // And the LUNs serve the next initiator.
    let mut ini = login(&t, "iqn.2026-11.org.iscsi-tgt:after", 2);
    let _ = ini.test_unit_ready(0).unwrap();
    ini.write10(0, 8, &[9u8; 4096], 512).unwrap();
    assert_eq!(ini.read10(0, 8, 8, 512).unwrap(), vec![9u8; 4096]);
}

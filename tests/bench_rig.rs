//! iscsi-bench measured against a target whose behaviour is known: a delay injected into the
//! device (`fault_delay_us` on one I/O in `fault_delay_every`) must show in its latency
//! percentiles and IOPS, an injected EIO in its error counts by sense key and its exit status,
//! and every session asked for must be a session of the target. A target that stops
//! answering (a stalled LUN, a stopped process) must stop the run at `--timeout` with the
//! late command named, and one that goes away must end it at once. A reader of its report
//! that goes away (`| head`) changes nothing of its exit status.
//!
//! Only bounds that the delay makes certain are asserted tightly (a delayed command cannot
//! complete sooner than its delay); the other side gets generous margins, since the machine
//! is shared.
mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Target, IQN};
use serde_json::Value;

/// Latency a delayed command may take beyond its delay on a loaded machine.
const SLACK_US: f64 = 500_000.0;

fn url(t: &Target, lun: u64) -> String {
    format!("iscsi://{}/{IQN}/{lun}", t.addr)
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iscsi-bench"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Waits until the run's session is past its login and READ CAPACITY, with I/O under way
/// (its session has counted 100 commands).
fn wait_for_io(t: &Target) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let commands = || -> u64 {
        let sessions = t.call(
            "ls",
            serde_json::json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
        );
        let Some(s) = sessions.as_array().and_then(|a| a.first()) else {
            return 0;
        };
        let name = s["name"].as_str().unwrap_or_default();
        t.get(&format!("targets/iscsi/{IQN}/sessions/{name}/commands"))
            .trim()
            .parse()
            .unwrap_or(0)
    };
    while commands() < 100 {
        assert!(Instant::now() < deadline, "no I/O under way\n{}", t.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON object of a `--json` run, which must be all of its stdout.
fn json_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A 4 KiB random read run at queue depth 1 for 3 s on LUN 0, which must end clean.
fn qd1_randread(t: &Target) -> Value {
    let out = bench(&[
        &url(t, 0),
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--qd",
        "1",
        "--secs",
        "3",
        "--json",
    ]);
    let j = json_of(&out);
    assert!(
        out.status.success(),
        "{:?}: {}\n{j}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(j["errors"]["total"], 0, "{j}");
    assert_eq!(j["workload"]["qd"], 1);
    assert_eq!(j["workload"]["bs"], 4096);
    assert_eq!(j["workload"]["read_pct"], 100);
    assert_eq!(j["workload"]["random"], true);
    assert_eq!(j["write"]["ios"], 0);
    assert_eq!(j["ios"], j["read"]["ios"]);
    assert_eq!(
        j["bytes"].as_u64(),
        j["ios"].as_u64().map(|n| n * 4096),
        "{j}"
    );
    j
}

#[test]
fn one_read_in_four_held_20_ms_shows_from_p90_up_and_not_at_p50() {
    let t = Target::with_default_luns(64);
    t.set("devices/ram0/fault_delay_every", "4");
    t.set("devices/ram0/fault_delay_us", "20000");
    let j = qd1_randread(&t);
    let lat = &j["latency_us"];
    let ios = j["ios"].as_u64().unwrap();
    // Enough commands for a quarter of them to be delayed ones (it takes 3 s to run fewer
    // than 8 only on a machine 70 times slower than the delay needs).
    assert!(ios >= 8, "{j}");
    // A quarter of the commands, exactly every 4th, waited 20 ms in the device: p90, p99 and
    // the max are among them, the median is not.
    assert!(f(&lat["p50"]) < 20_000.0, "{j}");
    for p in ["p90", "p99", "p99.9", "max"] {
        let v = f(&lat[p]);
        assert!(v >= 20_000.0, "{p} {v}: {j}");
        assert!(v < 20_000.0 + SLACK_US, "{p} {v}: {j}");
    }
    assert!(f(&lat["min"]) < 20_000.0 && f(&lat["min"]) > 0.0, "{j}");
    // Every 4th took 20 ms or more.
    let floor = 20_000.0 * (ios / 4) as f64 / ios as f64;
    assert!(f(&lat["mean"]) >= floor, "{j}");
    // One command at a time, and one in four takes 20 ms: at most 200 per second (a margin
    // for the odd command of the last group of four).
    let iops = f(&j["iops"]);
    assert!(iops > 0.0 && iops <= 250.0, "{j}");
    // The reads and the whole agree, and the CDF climbs from the min to the max.
    assert_eq!(j["read"]["latency_us"], j["latency_us"]);
    let cdf = j["cdf"].as_array().unwrap();
    assert_eq!(f(&cdf[0][0]), 0.0);
    assert_eq!(f(&cdf[0][1]), f(&lat["min"]));
    assert_eq!(f(&cdf[cdf.len() - 1][0]), 100.0);
    assert_eq!(f(&cdf[cdf.len() - 1][1]), f(&lat["max"]));
    for w in cdf.windows(2) {
        assert!(
            f(&w[0][0]) < f(&w[1][0]) && f(&w[0][1]) <= f(&w[1][1]),
            "{w:?}"
        );
    }
    // The delay off, the same run is no longer held back.
    t.set("devices/ram0/fault_delay_us", "0");
    let j = qd1_randread(&t);
    assert!(f(&j["latency_us"]["p50"]) < 20_000.0, "{j}");
    assert!(
        j["ios"].as_u64().unwrap() > ios,
        "more commands without the delay: {ios} then {j}"
    );
}

#[test]
fn every_read_held_5_ms_sets_the_floor_of_every_percentile() {
    let t = Target::with_default_luns(64);
    t.set("devices/ram0/fault_delay_us", "5000");
    assert_eq!(t.get("devices/ram0/fault_delay_every"), "1");
    let j = qd1_randread(&t);
    let lat = &j["latency_us"];
    assert!(j["ios"].as_u64().unwrap() >= 2, "{j}");
    for p in ["min", "p50", "p90", "p99", "max", "mean"] {
        let v = f(&lat[p]);
        assert!(v >= 5_000.0, "{p} {v}: {j}");
        assert!(v < 5_000.0 + SLACK_US, "{p} {v}: {j}");
    }
    // 5 ms each, one at a time: at most 200 per second.
    let iops = f(&j["iops"]);
    assert!(iops > 0.0 && iops <= 200.0 * 1.05, "{j}");
    let elapsed = f(&j["elapsed_secs"]);
    assert!((3.0..3.0 + 30.0).contains(&elapsed), "{j}");
}

#[test]
fn injected_read_errors_are_counted_as_medium_error_and_fail_the_run() {
    let t = Target::with_default_luns(64);
    t.set("devices/ram0/fault_inject", "eio_read");
    let args = [
        &url(&t, 0) as &str,
        "--rw",
        "randrw",
        "--read-pct",
        "50",
        "--bs",
        "4k",
        "--qd",
        "4",
        "--secs",
        "1",
    ];
    let out = bench(&[&args[..], &["--json"]].concat());
    let j = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{j}");
    let errors = &j["errors"];
    let medium = errors["by_sense_key"]["MEDIUM ERROR"].as_u64().unwrap_or(0);
    assert!(medium > 0, "{j}");
    // Every READ failed and nothing else did: the errors are all MEDIUM ERRORs...
    assert_eq!(errors["total"].as_u64(), Some(medium), "{j}");
    assert_eq!(errors["transport"], 0, "{j}");
    assert_eq!(errors["by_sense_key"].as_object().unwrap().len(), 1, "{j}");
    // ...and the run went on after them: the WRITEs were measured, no READ was.
    assert_eq!(j["read"]["ios"], 0, "{j}");
    assert!(j["write"]["ios"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["workload"]["read_pct"], 50);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error(s) counted"), "{stderr}");
    // The summary says the same, and still ends with the line the scripts read.
    let out = bench(&args);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": MEDIUM ERROR "), "{text}");
    let last = text.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{last}");
    assert_eq!((words[0], words[2]), ("iops", "mbps"), "{last}");
    assert!(words[1].parse::<u64>().is_ok() && words[3].parse::<u64>().is_ok());
    // No terminal: no progress line.
    assert!(!stderr.contains('\r'), "{stderr}");
}

#[test]
fn every_session_asked_for_is_a_session_of_the_target() {
    let t = Target::with_default_luns(64);
    let (u0, u1) = (url(&t, 0), url(&t, 1));
    let child = Command::new(env!("CARGO_BIN_EXE_iscsi-bench"))
        .args([
            &u0 as &str,
            "--url",
            &u1,
            "--sessions",
            "2",
            "--cores",
            "0",
            "--rw",
            "randrw",
            "--bs",
            "8k",
            "--qd",
            "2",
            "--secs",
            "3",
            "--ramp",
            "0.5",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Two sessions to each of the two LUNs, each its own connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.get("targets/iscsi/connections").trim() != "4" {
        assert!(Instant::now() < deadline, "4 connections\n{}", t.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sessions = t.call(
        "ls",
        serde_json::json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
    );
    assert_eq!(sessions.as_array().map(Vec::len), Some(4), "{sessions}");
    let out = child.wait_with_output().unwrap();
    let j = json_of(&out);
    assert!(out.status.success(), "{j}");
    assert_eq!(j["workload"]["urls"], serde_json::json!([u0, u1]));
    assert_eq!(j["workload"]["sessions_per_url"], 2);
    assert_eq!(j["workload"]["cores"], serde_json::json!([0]));
    assert_eq!(j["workload"]["ramp_secs"].as_f64(), Some(0.5));
    assert!(j["read"]["ios"].as_u64().unwrap() > 0, "{j}");
    assert!(j["write"]["ios"].as_u64().unwrap() > 0, "{j}");
    // The measured time starts after the ramp.
    let elapsed = f(&j["elapsed_secs"]);
    assert!((3.0..3.0 + 30.0).contains(&elapsed), "{j}");
}

/// How long a run that must stop on its own may take before the test gives up on it.
const STOP_WITHIN: Duration = Duration::from_secs(60);

/// Starts iscsi-bench with `args`, its output piped.
fn spawn_bench(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_iscsi-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit on its own within [`STOP_WITHIN`] (killed and failed if not):
/// its output and how long it ran from `started`.
fn stops_by_itself(mut child: Child, started: Instant, t: &Target) -> (Output, Duration) {
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > STOP_WITHIN {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "iscsi-bench still running after {STOP_WITHIN:?}\nstdout: {}\nstderr: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                t.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ran = started.elapsed();
    (child.wait_with_output().unwrap(), ran)
}

/// A 30 s random read run on `luns` with a 2 s `--timeout`, which must stop long before its
/// end.
fn timed_run(t: &Target, luns: &[u64]) -> Child {
    let urls: Vec<String> = luns.iter().map(|&l| url(t, l)).collect();
    let mut args: Vec<&str> = urls.iter().map(String::as_str).collect();
    args.extend([
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--qd",
        "4",
        "--secs",
        "30",
        "--timeout",
        "2",
        "--json",
    ]);
    spawn_bench(&args)
}

/// The run stopped for a READ that waited past the 2 s timeout, and says so in its JSON,
/// on stderr and in its exit status.
fn assert_timed_out(t: &Target, out: &Output, ran: Duration) {
    let j = json_of(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{j}\n{stderr}");
    assert_eq!(j["timed_out"], true, "{j}");
    assert_eq!(j["workload"]["timeout_secs"].as_f64(), Some(2.0), "{j}");
    let late = &j["timeouts"][0];
    assert_eq!(late["url"], url(t, 0), "{j}");
    assert_eq!(late["op"], "READ (16)", "{j}");
    assert!(late["itt"].is_u64() && late["lba"].is_u64(), "{j}");
    assert_eq!(late["blocks"], 8, "{j}");
    // A command cannot be late before its timeout, nor the run stop before one is.
    let waited = f(&late["waited_secs"]);
    assert!(waited >= 2.0, "{j}");
    assert!(ran >= Duration::from_secs(2), "{ran:?}");
    // The session that gave up counts as a transport error, and its line says why.
    assert!(j["errors"]["transport"].as_u64() >= Some(1), "{j}");
    let ended = j["ended"][0].as_str().unwrap_or_default();
    assert!(ended.contains("had no answer after"), "{j}");
    let itt = late["itt"].as_u64().unwrap();
    for says in [
        url(t, 0),
        format!("READ (16) ITT {itt:#x} LBA {}", late["lba"]),
        "--timeout 2".into(),
        "timed out".into(),
    ] {
        assert!(stderr.contains(&says), "{says}: {stderr}");
    }
}

#[test]
fn a_stalled_lun_stops_the_run_at_the_timeout_naming_the_late_command() {
    let t = Target::with_default_luns(64);
    // Every I/O the device gets from now on is held: the target stays up, sends its NOP-In
    // pings, and answers none of the READs.
    t.set("devices/ram0/fault_inject", "stall");
    // A session to LUN 1 (not stalled) beside it.
    let started = Instant::now();
    let (out, ran) = stops_by_itself(timed_run(&t, &[0, 1]), started, &t);
    assert_timed_out(&t, &out, ran);
    // Only LUN 0's session gave up on a command; LUN 1's took its answers and ended with it.
    let j = json_of(&out);
    assert_eq!(j["timeouts"].as_array().map(Vec::len), Some(1), "{j}");
    assert_eq!(j["ended"].as_array().map(Vec::len), Some(1), "{j}");
    assert_eq!(j["errors"]["total"], 1, "{j}");
    assert!(j["read"]["ios"].as_u64() > Some(0), "{j}");
    t.set("devices/ram0/fault_inject", "none");
}

#[test]
fn a_stopped_target_stops_the_run_at_the_timeout() {
    let t = Target::with_default_luns(64);
    let child = timed_run(&t, &[0]);
    // Once the session is under way (past its login and READ CAPACITY), the target's process
    // stops: nothing more comes from it, not even a TCP reset.
    wait_for_io(&t);
    let pid = t.child.id() as i32;
    // SAFETY: kill(2) on our own child's pid has no memory-safety effect.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = Instant::now();
    let (out, ran) = stops_by_itself(child, started, &t);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_timed_out(&t, &out, ran);
}

#[test]
fn a_target_that_goes_away_ends_the_run_at_once() {
    let mut t = Target::with_default_luns(64);
    let child = timed_run(&t, &[0]);
    // Past its login (a connection alone may still be logging in, and a login cut short is
    // another error): I/O under way.
    wait_for_io(&t);
    // Killed: the kernel closes its sockets, the session sees its connection end.
    t.child.kill().unwrap();
    let _ = t.child.wait();
    let started = Instant::now();
    let (out, _) = stops_by_itself(child, started, &t);
    let j = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{j}");
    assert_eq!(j["timed_out"], false, "{j}");
    assert_eq!(j["errors"]["transport"], 1, "{j}");
    let ended = j["ended"][0].as_str().unwrap_or_default();
    assert!(ended.contains("the connection failed"), "{j}");
    assert!(ended.contains(&url(&t, 0)), "{j}");
}

#[test]
fn a_reader_that_goes_away_does_not_turn_the_run_into_a_failure() {
    // `iscsi-bench --json | head -1`: the reader has gone by the time the report is written.
    let t = Target::with_default_luns(64);
    let mut child = spawn_bench(&[&url(&t, 0), "--rw", "randread", "--secs", "1", "--json"]);
    drop(child.stdout.take());
    let (out, _) = stops_by_itself(child, Instant::now(), &t);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    // A failed run still says so with nobody reading its report.
    t.set("devices/ram0/fault_inject", "eio_read");
    let mut child = spawn_bench(&[&url(&t, 0), "--rw", "randread", "--secs", "1", "--json"]);
    drop(child.stdout.take());
    let (out, _) = stops_by_itself(child, Instant::now(), &t);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

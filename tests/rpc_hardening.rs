//! The RPC socket as a hostile local user meets it: its mode whatever the umask, its group, a
//! flood of idle clients, a client over the cap, descriptors running out, oversized input.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Target;
use iscsi_tgt::rpc::MAX_CLIENTS;
use serde_json::{json, Value};

/// Starts the daemon on one reactor through `sh -c "SETUP; exec iscsi-tgt ..."` (a umask, a
/// descriptor limit) and waits until its RPC socket answers.
fn start_after(setup: &str, extra: &[&str]) -> Target {
    let mut args = vec!["--cores", "0"];
    args.extend_from_slice(extra);
    Target::start_wrapped(&format!("{setup};"), &args)
}

/// Lets this test process hold a few thousand sockets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct we own, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < 4096 {
            lim.rlim_cur = lim.rlim_max.min(4096);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn connect(t: &Target) -> UnixStream {
    let s = UnixStream::connect(&t.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends `req` and reads one answer line.
fn exchange(t: &Target, req: &[u8]) -> String {
    let mut s = connect(t);
    // The daemon may answer and close before it has read everything.
    let _ = s.write_all(req);
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// A call that may meet a full server while closed clients are still being noticed.
fn call_eventually(t: &Target) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match t.try_call("get", json!({"path": "version"})) {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn socket_is_0600_whatever_the_umask() {
    let t = start_after("umask 000", &[]);
    let m = std::fs::symlink_metadata(&t.sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600, "{:o}", m.mode());
    assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
    // Nothing is left beside it from creating it.
    let names: Vec<_> = std::fs::read_dir(t.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| n == "rpc.sock" || n == "target.log"),
        "{names:?}"
    );
}

/// A group to give the socket to: one other than ours when we may chown to it (root), else our
/// own.
fn some_group() -> (String, u32) {
    let own = nix::unistd::getegid();
    if nix::unistd::geteuid().is_root() {
        for name in ["daemon", "bin", "sys", "adm", "users", "nogroup"] {
            if let Ok(Some(g)) = nix::unistd::Group::from_name(name) {
                if g.gid != own {
                    return (g.name, g.gid.as_raw());
                }
            }
        }
    }
    let g = nix::unistd::Group::from_gid(own)
        .unwrap()
        .expect("our group");
    (g.name, own.as_raw())
}

#[test]
fn rpc_group_makes_it_0660_for_that_group() {
    let (name, gid) = some_group();
    let t = start_after("umask 000", &["--rpc-group", &name]);
    let m = std::fs::metadata(&t.sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o660, "{:o}", m.mode());
    assert_eq!(m.gid(), gid, "group {name}");
    drop(t);
    // A gid works the same.
    let t = start_after("umask 022", &["--rpc-group", &gid.to_string()]);
    let m = std::fs::metadata(&t.sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o660, "{:o}", m.mode());
    assert_eq!(m.gid(), gid);
}

#[test]
fn an_unknown_rpc_group_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rpc.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_iscsi-tgt"))
        .args(["--listen", "127.0.0.1:0", "--rpc-group", "no-such-group-qx"])
        .arg("--rpc-socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-group-qx"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn a_thousand_idle_clients_cost_no_threads() {
    raise_fd_limit();
    let mut t = start_after("true", &[]);
    let threads = t.resources().threads as usize;
    let clients: Vec<UnixStream> = (0..1000).map(|_| connect(&t)).collect();
    // Give a server that spawns per client time to show it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        t.resources().threads as usize,
        threads,
        "threads grew with clients"
    );
    // One more, read to the end: by then the daemon has taken every earlier connection.
    let mut late = String::new();
    connect(&t).read_to_string(&mut late).unwrap();
    let busy: Value = serde_json::from_str(late.trim()).unwrap();
    assert_eq!(busy["error"]["code"], -32000, "{busy}");
    let msg = busy["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("busy") && msg.contains(&MAX_CLIENTS.to_string()),
        "{msg}"
    );
    // Exactly the cap is held open, and served; every other client was told and closed.
    let mut held = Vec::new();
    for mut c in clients {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held.push(c),
            Ok(n) => {
                let v: Value = serde_json::from_slice(buf[..n].trim_ascii()).unwrap();
                assert_eq!(v["error"]["code"], -32000, "{v}");
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(held.len(), MAX_CLIENTS);
    for c in held.iter_mut().step_by(16) {
        c.set_nonblocking(false).unwrap();
        c.write_all(br#"{"jsonrpc":"2.0","id":9,"method":"rpc_get_methods"}"#)
            .unwrap();
        let mut line = String::new();
        BufReader::new(&*c).read_line(&mut line).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap()["id"],
            9,
            "{line}"
        );
    }
    drop(held);
    assert_eq!(
        call_eventually(&t),
        format!("{}\n", env!("CARGO_PKG_VERSION"))
    );
    // SIGTERM is prompt with the cap of clients connected.
    let _held: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| connect(&t)).collect();
    assert_eq!(t.resources().threads as usize, threads);
    assert_eq!(t.terminate(), Some(0), "{}", t.log());
}

#[test]
fn running_out_of_descriptors_is_logged_once() {
    // How many descriptors the daemon holds when idle, then a limit a few above that.
    let t = start_after("true", &[]);
    let base = t.resources().fds;
    drop(t);
    let t = start_after(&format!("ulimit -n {}", base + 6), &[]);
    // The daemon keeps a reserve of descriptors for RPC clients and files out of reach of
    // iSCSI connections; backing files beyond that reserve are what can still use them up.
    let mut added = 0;
    for i in 0..64 {
        let f = t.dir.path().join(format!("d{i}.img"));
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let cmd = format!("add_device d{i} filename={}", f.display());
        if t.try_call(
            "mgmt",
            json!({"path": "handlers/vdisk_fileio/mgmt", "command": cmd}),
        )
        .is_err()
        {
            break;
        }
        added += 1;
    }
    assert!(added > 3);
    // Two descriptors back: the episode below can end.
    for i in added - 2..added {
        t.call(
            "mgmt",
            json!({"path": "handlers/vdisk_fileio/mgmt", "command": format!("del_device d{i}")}),
        );
    }
    let failures = |log: &str| log.matches("cannot accept a client").count();
    let resumed = |log: &str| log.matches("accepting clients again").count();
    // Filling the table with files may itself have made an episode; count from here.
    call_eventually(&t);
    let (f0, r0) = (failures(&t.log()), resumed(&t.log()));
    let clients: Vec<UnixStream> = (0..30).map(|_| connect(&t)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures(&t.log()) == f0 {
        assert!(
            Instant::now() < deadline,
            "accept(2) never failed\n{}",
            t.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Long enough for several more retries of accept(2): one line an episode.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(failures(&t.log()), f0 + 1, "{}", t.log());
    drop(clients);
    call_eventually(&t);
    let log = t.log();
    assert_eq!(failures(&log), f0 + 1, "{log}");
    assert_eq!(resumed(&log), r0 + 1, "{log}");
}

#[test]
fn oversized_input_gets_a_short_error() {
    let mut t = start_after("true", &[]);
    let big = "x".repeat(8 << 20);
    let short_error = |req: Value, needles: &[&str]| {
        let line = exchange(&t, req.to_string().as_bytes());
        assert!(
            line.len() < 1024,
            "{} bytes: {}...",
            line.len(),
            &line[..200]
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        for n in needles {
            assert!(msg.contains(n), "{msg}");
        }
    };
    short_error(
        json!({"jsonrpc": "2.0", "id": 1, "method": big}),
        &["not found", "8388608 bytes"],
    );
    for (method, params) in [
        ("get", json!({"path": big})),
        ("ls", json!([big])),
        (
            "set",
            json!({"path": "targets/iscsi/enabled", "value": big}),
        ),
        (
            "mgmt",
            json!({"path": "targets/iscsi/mgmt", "command": big}),
        ),
    ] {
        short_error(
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
            &["8388608 bytes", "at most 4096"],
        );
    }
    // Not JSON, and not a request: answered without the input.
    let mut junk = br#"{"id":1,"method":"#.to_vec();
    junk.extend_from_slice(big.as_bytes());
    junk.push(b'}');
    let line = exchange(&t, &junk);
    assert!(line.len() < 1024 && line.contains("parse error"), "{line}");
    let line = exchange(&t, format!("\"{big}\"").as_bytes());
    assert!(
        line.len() < 1024 && line.contains("object or a batch array"),
        "{line}"
    );
    // Too large: refused once past the limit, without waiting for the end.
    let mut s = connect(&t);
    let mut huge = br#"{"id":1,"method":"load_config","params":{"config":""#.to_vec();
    huge.extend_from_slice("y".repeat(17 << 20).as_bytes());
    // The daemon may close before everything is written.
    let _ = s.write_all(&huge);
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(
        line.len() < 1024 && line.contains("16777216 bytes"),
        "{line}"
    );
    assert!(t.alive());
    assert_eq!(
        call_eventually(&t),
        format!("{}\n", env!("CARGO_PKG_VERSION"))
    );
}

//! Starts the real daemon as a child process on a free loopback port and a private RPC socket,
//! and talks JSON-RPC to it the way rpc.py does.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const IQN: &str = "iqn.2026-11.org.iscsi-tgt:test";

/// What the daemon holds of the system's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub fds: usize,
    pub threads: u64,
    pub rss_kib: u64,
}

pub struct Target {
    pub child: Child,
    pub addr: SocketAddr,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Loopback ports a test daemon listens on: below Linux's default ephemeral range
/// (32768-60999), where the tests' own connections take their local ports. A port the kernel
/// hands out for `bind(0)` is in that range, and a connection could take it between the check
/// and the daemon's bind.
const PORTS: std::ops::Range<u16> = 20000..32768;

/// A loopback port that is free now, at random in [`PORTS`] so that tests starting at once
/// rarely pick the same one (a daemon that still finds its port taken is started again on
/// another: [`Target::start_wrapped`]).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let span = u64::from(PORTS.end - PORTS.start);
    for _ in 0..1000 {
        // A fresh RandomState is seeded differently each time: a random number without a crate.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = PORTS.start + (r % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

impl Target {
    /// Starts the daemon with `extra` flags and waits until its RPC socket answers.
    pub fn start(extra: &[&str]) -> Target {
        Target::start_wrapped("", extra)
    }

    /// Starts the daemon through `sh -c "PREFIX exec iscsi-tgt ..."` (for `ulimit` or `umask`
    /// before it runs); an empty prefix runs it directly.
    ///
    /// `ISCSI_TGT_TEST_NET="WRAP;ADDRESS;ARGS"` runs it elsewhere: through `WRAP` (say `ip
    /// netns exec NS`), listening on `ADDRESS` with `ARGS` added (say `--net af_packet:veth0
    /// --ip ADDRESS/24`). scripts/netns-test.sh runs the hostile-input tests this way over
    /// the userspace stack.
    pub fn start_wrapped(prefix: &str, extra: &[&str]) -> Target {
        // Another test may take the port between free_port's check and the daemon's bind.
        for _ in 0..4 {
            match Target::try_start(prefix, extra) {
                Ok(t) => return t,
                Err(log) if log.contains("Address already in use") => {
                    eprintln!("test target: its port was taken meanwhile; on another");
                }
                Err(log) => panic!("{log}"),
            }
        }
        panic!("iscsi-tgt found its port taken four times");
    }

    /// One start of [`Target::start_wrapped`]: the daemon's log if it exited during start.
    fn try_start(prefix: &str, extra: &[&str]) -> Result<Target, String> {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("rpc.sock");
        let port = free_port();
        let net = std::env::var("ISCSI_TGT_TEST_NET").ok();
        let (wrap, host, net_args) =
            match net.as_deref().map(|v| v.splitn(3, ';').collect::<Vec<_>>()) {
                Some(parts) if parts.len() == 3 => (
                    parts[0].to_string(),
                    parts[1].to_string(),
                    parts[2].split_whitespace().map(str::to_string).collect(),
                ),
                Some(_) => panic!("ISCSI_TGT_TEST_NET must be WRAP;ADDRESS;ARGS"),
                None => (String::new(), "127.0.0.1".to_string(), Vec::new()),
            };
        let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
        if !wrap.is_empty() {
            // What scripts/netns-test.sh looks for to know the tests ran where it asked.
            eprintln!("test target: {wrap} on {addr} with {}", net_args.join(" "));
        }
        let log = std::fs::File::create(dir.path().join("target.log")).unwrap();
        let bin = env!("CARGO_BIN_EXE_iscsi-tgt");
        let mut cmd = if prefix.is_empty() && wrap.is_empty() {
            Command::new(bin)
        } else {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{prefix} exec {wrap} \"$0\" \"$@\""))
                .arg(bin);
            c
        };
        let child = cmd
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--rpc-socket")
            .arg(&sock)
            .args(extra)
            .args(&net_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start iscsi-tgt");
        let mut t = Target {
            child,
            addr,
            sock,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if t.try_call("rpc_get_methods", json!({})).is_ok() {
                break;
            }
            if let Ok(Some(status)) = t.child.try_wait() {
                return Err(format!(
                    "iscsi-tgt exited during start ({status}): {}",
                    t.log()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "iscsi-tgt did not open its RPC socket: {}",
                t.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t)
    }

    /// Starts the daemon with a RAM LUN 0 (`ram_mb`) and a null LUN 1 on target [`IQN`].
    pub fn with_default_luns(ram_mb: u32) -> Target {
        let t = Target::start(&["--cores", "0"]);
        t.configure_default(ram_mb);
        t
    }

    pub fn configure_default(&self, ram_mb: u32) {
        self.mgmt(
            "handlers/vdisk_ramio/mgmt",
            &format!("add_device ram0 size_mb={ram_mb}"),
        );
        self.mgmt("handlers/vdisk_nullio/mgmt", "add_device null0 size_mb=64");
        self.mgmt("targets/iscsi/mgmt", &format!("add_target {IQN}"));
        self.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "add ram0 0");
        self.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "add null0 1");
        self.set(&format!("targets/iscsi/{IQN}/enabled"), "1");
        self.set("targets/iscsi/enabled", "1");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("target.log")).unwrap_or_default()
    }

    /// One JSON-RPC call: `Ok(result)` or `Err(error object)`.
    pub fn try_call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let mut s = UnixStream::connect(&self.sock).map_err(|e| json!({"io": e.to_string()}))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(req.to_string().as_bytes())
            .map_err(|e| json!({"io": e.to_string()}))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| json!({"io": e.to_string()}))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| json!({"parse": e.to_string()}))?;
        match v.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(v["result"].clone()),
        }
    }

    pub fn call(&self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    pub fn mgmt(&self, path: &str, command: &str) {
        self.call("mgmt", json!({"path": path, "command": command}));
    }

    pub fn set(&self, path: &str, value: &str) {
        self.call("set", json!({"path": path, "value": value}));
    }

    pub fn get(&self, path: &str) -> String {
        self.call("get", json!({"path": path}))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits (up to 30 s) until target [`IQN`]'s sessions of `initiator` (all of them when
    /// empty) hold at least `n` commands received and not yet answered: then a command sent
    /// on that connection has surely reached the target, whatever the machine's load, and a
    /// task management function or reservation from another connection will find it.
    pub fn wait_active_commands(&self, initiator: &str, n: u64) {
        let base = format!("targets/iscsi/{IQN}/sessions");
        let active = || -> u64 {
            let sessions = self.call("ls", json!({ "path": &base }));
            let mut sum = 0;
            for s in sessions.as_array().into_iter().flatten() {
                let Some(name) = s["name"].as_str() else {
                    continue;
                };
                // A session may end meanwhile: its attributes are then gone.
                let attr = |a: &str| {
                    self.try_call("get", json!({"path": format!("{base}/{name}/{a}")}))
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                };
                if initiator.is_empty() || attr("initiator_name").as_deref() == Some(initiator) {
                    sum += attr("active_commands")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
            sum
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while active() < n {
            assert!(
                Instant::now() < deadline,
                "the target never held {n} commands of {initiator:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's open descriptors, threads and resident memory (KiB), from /proc.
    pub fn resources(&self) -> Resources {
        let pid = self.child.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Resources {
            fds,
            threads: field("Threads:"),
            rss_kib: field("VmRSS:"),
        }
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid has no memory-safety effect.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect_raw(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TEST UNIT READY until GOOD (the first ones report the new nexus's unit attentions).
pub fn tur_good(ini: &mut iscsi_tgt::initiator::Initiator) {
    for _ in 0..8 {
        let r = ini.test_unit_ready(0).unwrap();
        if r.is_good() {
            return;
        }
        assert_eq!(r.sense_key(), Some(0x06), "{r:?}");
    }
    panic!("TEST UNIT READY never became GOOD");
}

/// A session of initiator `name` to `target` whose writes wait for R2T-solicited data (no
/// immediate data, InitialR2T=Yes), so that a write can be caught before its data arrives;
/// ISID ends in `isid_last`, replies are waited for up to 10 s.
pub fn login_solicited(
    t: &Target,
    name: &str,
    target: &str,
    isid_last: u8,
) -> iscsi_tgt::initiator::Initiator {
    let mut ini = iscsi_tgt::initiator::Initiator::connect(t.addr).unwrap();
    let mut o = iscsi_tgt::initiator::LoginOptions {
        initiator_name: name.into(),
        target_name: Some(target.into()),
        keys: vec![
            ("ImmediateData".into(), "No".into()),
            ("InitialR2T".into(), "Yes".into()),
        ],
        ..Default::default()
    };
    o.isid[5] = isid_last;
    ini.login(&o).unwrap();
    ini.set_timeout(Some(Duration::from_secs(10))).unwrap();
    ini
}

//! The JSON-RPC 2.0 server on a Unix socket, framed as SPDK frames it: requests are JSON values
//! read one after another from the stream (no length prefix, no newline needed), a top-level
//! array is a batch, and each response is one JSON value followed by a newline. A parse error
//! cannot be resynchronised in a stream, so it is answered and the connection closed.
//!
//! Methods map onto the management tree: `ls`, `get`, `set`, `mgmt`, `tree`, `save_config`,
//! `load_config`, `rpc_get_methods`.
//!
//! The socket is as good as root. It is created mode 0600 (0660 and owned by a group when one is
//! given) inside a fresh 0700 directory beside its final path and then linked into place, so it
//! never exists with the mode the umask would give it.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use nix::errno::Errno;
use serde_json::{json, Value};

use crate::mgmt::{Mgmt, MgmtError};
use crate::util::{quote, QUOTE_MAX};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// The largest request accepted (a whole configuration fits easily).
const MAX_REQUEST: usize = 16 << 20;
/// A client that sends nothing for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest `path` parameter: PATH_MAX, and far more than any path in the tree.
pub const MAX_PATH: usize = 4096;
/// The longest `value` or `command` parameter: one page, what an SCST sysfs write takes.
pub const MAX_VALUE: usize = 4096;
/// Error messages longer than this are cut (names in them are already quoted and cut).
const MAX_MESSAGE: usize = 1024;

pub const METHODS: &[&str] = &[
    "get",
    "load_config",
    "ls",
    "mgmt",
    "rpc_get_methods",
    "save_config",
    "set",
    "tree",
];

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RpcError {
    /// the socket is in use by a running server
    InUse,
    /// the path exists and is not a socket (not removing it)
    NotSocket,
    /// no group named {0}
    UnknownGroup(String),
    /// cannot look up group {0}: {1}
    GroupLookup(String, Errno),
    /// cannot give the socket to group {0}: {1}
    Chown(u32, io::Error),
    /// {0}
    Io(#[from] io::Error),
}

/// How the server is set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Make the socket 0660 and owned by this group (else 0600).
    pub group: Option<u32>,
}

/// The group `name` names: a numeric gid as it is, else looked up.
pub fn group_id(name: &str) -> Result<u32, RpcError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(RpcError::UnknownGroup(quote(name))),
        Err(e) => Err(RpcError::GroupLookup(quote(name), e)),
    }
}

/// A running server; `shutdown` stops it and removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Fail(i64, String);

impl From<MgmtError> for Fail {
    fn from(mut e: MgmtError) -> Fail {
        // Paths in the tree are short; a long one was made from input (a name in a
        // configuration given to load_config), so it is quoted and cut like other input.
        match &mut e {
            MgmtError::NotFound(p)
            | MgmtError::IsDir(p)
            | MgmtError::NotDir(p)
            | MgmtError::ReadOnly(p)
            | MgmtError::Invalid { path: p, .. }
            | MgmtError::Busy { path: p, .. } => {
                if p.len() > QUOTE_MAX {
                    *p = quote(p);
                }
            }
        }
        Fail(INVALID_PARAMS, e.to_string())
    }
}

impl Server {
    /// Creates the socket at `path` (refusing when a live server answers there, removing a
    /// stale socket) and serves it on a thread of its own.
    pub fn start(path: &Path, mgmt: Arc<Mgmt>, opts: &Options) -> Result<Server, RpcError> {
        let listener = bind(path, opts.group)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rpc".into())
            .spawn(move || serve(listener, mgmt, s2))?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket in a fresh 0700 directory beside `path`, sets its mode (and group), and
/// links it to `path`: link(2) never replaces, so a server that appeared meanwhile is not
/// displaced.
fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, RpcError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(RpcError::NotSocket),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(RpcError::InUse);
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = nix::unistd::mkdtemp(&parent.join(".rpc-XXXXXX")).map_err(io::Error::from)?;
    let tmp = dir.join("s");
    let placed = (|| {
        let listener = UnixListener::bind(&tmp)?;
        let mode = match group {
            Some(gid) => {
                std::os::unix::fs::chown(&tmp, None, Some(gid))
                    .map_err(|e| RpcError::Chown(gid, e))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(RpcError::InUse),
            Err(e) => Err(e.into()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    let listener = placed?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn serve(listener: UnixListener, mgmt: Arc<Mgmt>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let m = mgmt.clone();
                let st = stop.clone();
                let _ = std::thread::Builder::new()
                    .name("rpc-conn".into())
                    .spawn(move || {
                        if let Err(e) = connection(stream, &m, &st) {
                            debug!("rpc connection ended: {e}");
                        }
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                warn!("rpc accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn connection(mut stream: UnixStream, mgmt: &Mgmt, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let mut idle = Duration::ZERO;
    loop {
        // Answer every complete value in the buffer.
        loop {
            let start = buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(buf.len());
            if start == buf.len() {
                buf.clear();
                break;
            }
            let mut it = serde_json::Deserializer::from_slice(&buf[start..]).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = start + it.byte_offset();
                    buf.drain(..used);
                    if let Some(resp) = handle(mgmt, v) {
                        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                        out.push(b'\n');
                        stream.write_all(&out)?;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    let resp = error(Value::Null, PARSE_ERROR, &parse_error(&e));
                    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                    out.push(b'\n');
                    stream.write_all(&out)?;
                    return Ok(());
                }
                None => break,
            }
        }
        if buf.len() > MAX_REQUEST {
            let resp = error(
                Value::Null,
                INVALID_REQUEST,
                &format!("request larger than {MAX_REQUEST} bytes"),
            );
            let _ = stream.write_all(format!("{resp}\n").as_bytes());
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                idle = Duration::ZERO;
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += Duration::from_millis(200);
                if stop.load(Ordering::Acquire) || idle >= IDLE_TIMEOUT {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A parse error says what was wrong and where (serde_json's messages for a `Value` name the
/// line and column, never the input).
fn parse_error(e: &serde_json::Error) -> String {
    format!("parse error: {e}")
}

/// `msg` cut to [`MAX_MESSAGE`] bytes, on a character boundary, with its length when longer.
fn bounded(msg: &str) -> std::borrow::Cow<'_, str> {
    if msg.len() <= MAX_MESSAGE {
        return msg.into();
    }
    let mut cut = MAX_MESSAGE - 32;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}... ({} bytes)",
        msg.get(..cut).unwrap_or_default(),
        msg.len()
    )
    .into()
}

fn error(id: Value, code: i64, msg: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": bounded(msg)}})
}

/// One request or a batch; `None` when nothing is to be sent (notifications).
pub fn handle(mgmt: &Mgmt, v: Value) -> Option<Value> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Some(error(Value::Null, INVALID_REQUEST, "empty batch"));
            }
            let out: Vec<Value> = items.into_iter().filter_map(|r| single(mgmt, r)).collect();
            if out.is_empty() {
                None
            } else {
                Some(Value::Array(out))
            }
        }
        other => single(mgmt, other),
    }
}

fn single(mgmt: &Mgmt, v: Value) -> Option<Value> {
    let Value::Object(req) = v else {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "a request must be a JSON object",
        ));
    };
    let id = req.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    if let Some(ver) = req.get("jsonrpc") {
        if ver != "2.0" {
            return Some(error(reply_id, INVALID_REQUEST, "jsonrpc must be \"2.0\""));
        }
    }
    if id
        .as_ref()
        .is_some_and(|i| !(i.is_string() || i.is_number() || i.is_null()))
    {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "id must be a string, a number or null",
        ));
    }
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return Some(error(reply_id, INVALID_REQUEST, "method must be a string"));
    };
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "params must be an object or an array",
        ));
    }
    let result = call(mgmt, method, &params);
    id.as_ref()?;
    Some(match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": reply_id, "result": r}),
        Err(Fail(code, msg)) => error(reply_id, code, &msg),
    })
}

/// Parameter `name` (or position `pos`) as a string of at most `max` bytes.
fn param(
    params: &Value,
    name: &str,
    pos: usize,
    required: bool,
    max: usize,
) -> Result<Option<String>, Fail> {
    let v = match params {
        Value::Object(o) => o.get(name),
        Value::Array(a) => a.get(pos),
        _ => None,
    };
    match v {
        Some(Value::String(s)) if s.len() > max => Err(Fail(
            INVALID_PARAMS,
            format!(
                "parameter {name} is {} bytes long; at most {max} are allowed",
                s.len()
            ),
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Null) | None if !required => Ok(None),
        Some(Value::Null) | None => Err(Fail(INVALID_PARAMS, format!("missing parameter {name}"))),
        Some(_) => Err(Fail(
            INVALID_PARAMS,
            format!("parameter {name} must be a string"),
        )),
    }
}

fn call(mgmt: &Mgmt, method: &str, params: &Value) -> Result<Value, Fail> {
    let path =
        |required| param(params, "path", 0, required, MAX_PATH).map(Option::unwrap_or_default);
    match method {
        "rpc_get_methods" => Ok(json!(METHODS)),
        "ls" => Ok(serde_json::to_value(mgmt.ls(&path(false)?)?).unwrap_or(Value::Null)),
        "get" => Ok(Value::String(mgmt.get(&path(true)?)?)),
        "set" => {
            let p = path(true)?;
            let v = param(params, "value", 1, true, MAX_VALUE)?.unwrap_or_default();
            mgmt.set(&p, &v)?;
            Ok(Value::Bool(true))
        }
        "mgmt" => {
            let p = path(true)?;
            let c = param(params, "command", 1, true, MAX_VALUE)?.unwrap_or_default();
            mgmt.mgmt(&p, &c)?;
            Ok(Value::Bool(true))
        }
        "tree" => Ok(mgmt.tree(&path(false)?)?),
        "save_config" => Ok(mgmt.save_config()),
        "load_config" => {
            let cfg = match params {
                Value::Object(o) => o.get("config").cloned(),
                Value::Array(a) => a.first().cloned(),
                _ => None,
            }
            .ok_or_else(|| Fail(INVALID_PARAMS, "missing parameter config".into()))?;
            mgmt.load_config(&cfg)?;
            Ok(Value::Bool(true))
        }
        _ => Err(Fail(
            METHOD_NOT_FOUND,
            format!(
                "method {} not found; methods are {}",
                quote(method),
                METHODS.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::config::Publisher;
    use crate::iscsi::registry::Registry;
    use crate::mgmt::Hooks;
    use std::io::{BufRead, BufReader};

    fn m() -> Arc<Mgmt> {
        Mgmt::new(Publisher::new(), Registry::new(), Hooks::default())
    }

    #[test]
    fn requests_and_errors() {
        let m = m();
        let r = handle(&m, json!({"jsonrpc": "2.0", "id": 1, "method": "get", "params": {"path": "targets/iscsi/enabled"}})).unwrap();
        assert_eq!(r["result"], "0");
        let r = handle(&m, json!({"id": 2, "method": "nope"})).unwrap();
        assert_eq!(r["error"]["code"], METHOD_NOT_FOUND);
        assert!(r["error"]["message"].as_str().unwrap().contains("nope"));
        let r = handle(&m, json!({"id": 3, "method": "get", "params": {}})).unwrap();
        assert_eq!(r["error"]["code"], INVALID_PARAMS);
        assert!(r["error"]["message"].as_str().unwrap().contains("path"));
        let r = handle(
            &m,
            json!({"id": 4, "method": "set", "params": ["targets/iscsi/enabled", "1"]}),
        )
        .unwrap();
        assert_eq!(r["result"], true);
        assert!(
            handle(&m, json!({"method": "get", "params": {"path": "version"}})).is_none(),
            "notification"
        );
        let r = handle(
            &m,
            json!([{"id": 1, "method": "rpc_get_methods"}, {"method": "rpc_get_methods"}, 5]),
        )
        .unwrap();
        assert_eq!(r.as_array().unwrap().len(), 2);
        let r = handle(&m, json!({"id": 5, "method": 7})).unwrap();
        assert_eq!(r["error"]["code"], INVALID_REQUEST);
    }

    #[test]
    fn stream_framing() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let srv = Server::start(&sock, m(), &Options::default()).unwrap();
        assert!(matches!(
            Server::start(&sock, m(), &Options::default()),
            Err(RpcError::InUse)
        ));
        let mut s = UnixStream::connect(&sock).unwrap();
        // Two requests in one write, the second split over two writes.
        s.write_all(br#"{"id":1,"method":"get","params":{"path":"version"}}{"id":2,"method":"#)
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(br#""ls","params":{"path":"targets"}}"#)
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["id"], 1);
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"][0]["name"], "iscsi");
        // Garbage: a parse error, then the connection closes.
        s.write_all(b"{nope").unwrap();
        s.write_all(b"}").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap()["error"]["code"],
            PARSE_ERROR
        );
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
        srv.shutdown();
        assert!(!sock.exists());
    }

    #[test]
    fn long_input_is_not_echoed() {
        let m = m();
        let long = "x".repeat(1 << 20);
        let msg = |r: Value| r["error"]["message"].as_str().unwrap().to_string();
        let e = msg(handle(&m, json!({"id": 1, "method": long})).unwrap());
        assert!(
            e.len() < 300 && e.contains("not found") && e.contains("1048576 bytes"),
            "{e}"
        );
        for (method, params) in [
            ("get", json!({"path": long})),
            ("set", json!({"path": "version", "value": long})),
            (
                "mgmt",
                json!({"path": "targets/iscsi/mgmt", "command": long}),
            ),
        ] {
            let e = msg(handle(&m, json!({"id": 1, "method": method, "params": params})).unwrap());
            assert!(
                e.len() < 200 && e.contains("1048576 bytes"),
                "{method}: {e}"
            );
            assert!(e.contains("at most 4096"), "{method}: {e}");
        }
        // Within the bounds, a long command word is quoted and cut.
        let cmd = format!("{} x", "y".repeat(4000));
        let e = msg(handle(&m, json!({"id": 1, "method": "mgmt", "params": {"path": "targets/iscsi/mgmt", "command": cmd}})).unwrap());
        assert!(e.len() < 400 && e.contains("unknown command"), "{e}");
        // A path of allowed length that does not exist.
        let p = "z/".repeat(2000);
        let e = msg(handle(&m, json!({"id": 1, "method": "get", "params": {"path": p}})).unwrap());
        assert!(e.len() < 300 && e.contains("no such file"), "{e}");
        // Names in a configuration are not bounded by the path limit.
        let cfg = json!({"targets": {"iscsi": {"targets": {long.clone(): {}}}}});
        let e = msg(handle(
            &m,
            json!({"id": 1, "method": "load_config", "params": {"config": cfg}}),
        )
        .unwrap());
        assert!(e.len() <= MAX_MESSAGE, "{}", e.len());
    }

    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_MESSAGE);
        let b = bounded(&long);
        assert!(b.len() <= MAX_MESSAGE, "{}", b.len());
        assert!(b.ends_with(&format!("... ({} bytes)", long.len())), "{b}");
    }

    #[test]
    fn a_file_in_the_way_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, "data").unwrap();
        let r = Server::start(&path, m(), &Options::default());
        assert!(matches!(r, Err(RpcError::NotSocket)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        // A stale socket is replaced.
        let stale = dir.path().join("stale");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let srv = Server::start(&stale, m(), &Options::default()).unwrap();
        assert!(UnixStream::connect(&stale).is_ok());
        srv.shutdown();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

//! The daemon as a user meets it: start, refuse what is taken, answer RPC errors clearly,
//! stop on SIGTERM.
mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};

use common::Target;
use serde_json::json;

#[test]
fn exits_zero_on_sigterm() {
    let mut t = Target::start(&["--cores", "0"]);
    assert!(t.alive());
    assert_eq!(t.terminate(), Some(0), "log: {}", t.log());
}

#[test]
fn refuses_a_taken_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iscsi-tgt"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--rpc-socket"])
        .arg(dir.path().join("s.sock"))
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&port.to_string()),
        "message names the portal: {err}"
    );
}

#[test]
fn refuses_a_socket_in_use() {
    let t = Target::start(&["--cores", "0"]);
    let out = Command::new(env!("CARGO_BIN_EXE_iscsi-tgt"))
        .args(["--listen", "127.0.0.1:0", "--rpc-socket"])
        .arg(&t.sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&t.sock.display().to_string()),
        "message names the socket: {err}"
    );
    // The first daemon is unharmed.
    assert!(t.try_call("rpc_get_methods", json!({})).is_ok());
}

#[test]
fn bad_arguments_exit_one_with_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_iscsi-tgt"))
        .args(["--mode", "turbo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("poll or adaptive"));
}

#[test]
fn rpc_errors_name_the_problem() {
    let t = Target::start(&["--cores", "0"]);
    let e = t.try_call("no_such_method", json!({})).unwrap_err();
    assert_eq!(e["code"], -32601);
    assert!(e["message"].as_str().unwrap().contains("no_such_method"));

    let e = t
        .try_call("get", json!({"path": "targets/iscsi/nowhere"}))
        .unwrap_err();
    assert_eq!(e["code"], -32602);
    assert!(e["message"].as_str().unwrap().contains("nowhere"), "{e}");

    let e = t
        .try_call(
            "mgmt",
            json!({"path": "targets/iscsi/mgmt", "command": "add_target"}),
        )
        .unwrap_err();
    assert_eq!(e["code"], -32602);
    assert!(!e["message"].as_str().unwrap().is_empty());

    let e = t
        .try_call(
            "mgmt",
            json!({"path": "handlers/vdisk_ramio/mgmt", "command": "frobnicate ram0"}),
        )
        .unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("frobnicate"), "{e}");

    let e = t
        .try_call(
            "set",
            json!({"path": "targets/iscsi/enabled", "value": "maybe"}),
        )
        .unwrap_err();
    assert_eq!(e["code"], -32602);
    // Still serving after all of that.
    assert_eq!(t.get("targets/iscsi/enabled"), "0");
}

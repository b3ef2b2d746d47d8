//! Login-level target controls against the real daemon: `redirect` (temporary and permanent,
//! followed to a second daemon), `MaxSessions` (with reinstatement still allowed), a disabled
//! target, `allowed_portal` for logins and SendTargets, and the answers to a login that tries
//! to add a connection to a session.
mod common;

use std::net::{SocketAddr, TcpListener};

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, InitiatorError, LoginOptions};

fn login_at(
    addr: SocketAddr,
    name: &str,
    isid_last: u8,
    target: Option<&str>,
) -> Result<Initiator, InitiatorError> {
    let mut ini = Initiator::connect(addr).unwrap();
    let mut o = LoginOptions {
        initiator_name: name.into(),
        target_name: target.map(str::to_string),
        ..Default::default()
    };
    o.isid[5] = isid_last;
    ini.login(&o)?;
    Ok(ini)
}

fn login(t: &Target, name: &str, isid_last: u8) -> Result<Initiator, InitiatorError> {
    login_at(t.addr, name, isid_last, Some(IQN))
}

fn status(r: Result<Initiator, InitiatorError>) -> (u8, u8) {
    match r {
        Err(InitiatorError::LoginRejected { class, detail }) => (class, detail),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => (0, 0),
    }
}

#[test]
fn redirect_sends_the_initiator_elsewhere() {
    let home = Target::with_default_luns(8);
    let other = Target::with_default_luns(8);
    let path = format!("targets/iscsi/{IQN}/redirect");
    home.set(&path, &format!("{} temp", other.addr));
    match login(&home, "iqn.2026-11.org.x:r", 1) {
        Err(InitiatorError::Redirected { address, permanent }) => {
            assert!(!permanent);
            assert_eq!(address, format!("{},1", other.addr));
            // Follow it.
            let to: SocketAddr = address.split(',').next().unwrap().parse().unwrap();
            let mut ini = login_at(to, "iqn.2026-11.org.x:r", 1, Some(IQN)).unwrap();
            ini.logout().unwrap();
        }
        Err(e) => panic!("expected a redirect, got {e}"),
        Ok(_) => panic!("expected a redirect"),
    }
    home.set(&path, "127.0.0.9 perm");
    match login(&home, "iqn.2026-11.org.x:r", 1) {
        Err(InitiatorError::Redirected { address, permanent }) => {
            assert!(permanent);
            assert_eq!(address, "127.0.0.9:3260,1");
        }
        other => panic!("expected a permanent redirect, got {:?}", other.err()),
    }
    // Bad values are refused with the reason; "" turns it off.
    let e = home
        .try_call(
            "set",
            serde_json::json!({"path": path.clone(), "value": "somewhere forever"}),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("temp or perm") || e.contains("IP address"),
        "{e}"
    );
    home.set(&path, "");
    login(&home, "iqn.2026-11.org.x:r", 1)
        .unwrap()
        .logout()
        .unwrap();
}

#[test]
fn max_sessions_counts_sessions_but_not_reinstatement() {
    let t = Target::with_default_luns(8);
    t.set(&format!("targets/iscsi/{IQN}/MaxSessions"), "1");
    let _first = login(&t, "iqn.2026-11.org.x:a", 1).unwrap();
    assert_eq!(status(login(&t, "iqn.2026-11.org.x:b", 1)), (3, 2));
    assert_eq!(status(login(&t, "iqn.2026-11.org.x:a", 2)), (3, 2));
    // The same initiator and ISID reinstates its session.
    let mut again = login(&t, "iqn.2026-11.org.x:a", 1).unwrap();
    again.logout().unwrap();
}

#[test]
fn disabled_and_portal_restricted_targets_are_invisible() {
    // A second portal on another loopback address.
    let port2 = TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let second: SocketAddr = format!("127.0.0.2:{port2}").parse().unwrap();
    let t = Target::start(&["--cores", "0", "--listen", &second.to_string()]);
    t.configure_default(8);
    // Both portals serve the target.
    login_at(second, "iqn.2026-11.org.x:p", 1, Some(IQN))
        .unwrap()
        .logout()
        .unwrap();
    t.mgmt(
        "targets/iscsi/mgmt",
        &format!("add_target_attribute {IQN} allowed_portal 127.0.0.1"),
    );
    assert_eq!(
        t.get(&format!("targets/iscsi/{IQN}/allowed_portal")),
        "127.0.0.1"
    );
    assert_eq!(
        status(login_at(second, "iqn.2026-11.org.x:p", 1, Some(IQN))),
        (2, 3)
    );
    login_at(t.addr, "iqn.2026-11.org.x:p", 1, Some(IQN))
        .unwrap()
        .logout()
        .unwrap();
    // Discovery through the other portal does not list it; through its own it does, with
    // its allowed address only.
    let mut d = login_at(second, "iqn.2026-11.org.x:p", 2, None).unwrap();
    assert!(d.send_targets().unwrap().is_empty());
    d.logout().unwrap();
    let mut d = login_at(t.addr, "iqn.2026-11.org.x:p", 2, None).unwrap();
    let found = d.send_targets().unwrap();
    d.logout().unwrap();
    assert!(
        found.iter().any(|(k, v)| k == "TargetName" && v == IQN),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .filter(|(k, _)| k == "TargetAddress")
            .all(|(_, v)| v.starts_with("127.0.0.1:")),
        "{found:?}"
    );
    // A disabled target is neither listed nor reachable.
    t.set(&format!("targets/iscsi/{IQN}/enabled"), "0");
    assert_eq!(status(login(&t, "iqn.2026-11.org.x:p", 1)), (2, 3));
    let mut d = login_at(t.addr, "iqn.2026-11.org.x:p", 3, None).unwrap();
    assert!(d.send_targets().unwrap().is_empty());
    d.logout().unwrap();
}

#[test]
fn a_second_connection_for_a_session_is_refused_by_what_it_names() {
    let t = Target::with_default_luns(8);
    let name = "iqn.2026-11.org.iscsi-tgt:mcs";
    let mut first = login(&t, name, 7).unwrap();
    let tsih = first.tsih();
    assert_ne!(tsih, 0);
    let add = |tsih: u16, cid: u16| {
        let mut ini = Initiator::connect(t.addr).unwrap();
        let mut o = LoginOptions {
            initiator_name: name.into(),
            target_name: Some(IQN.into()),
            tsih,
            cid,
            ..Default::default()
        };
        o.isid[5] = 7;
        ini.login(&o).map(|_| ini)
    };
    // MaxConnections is 1: a connection added to the running session is one too many
    // (0x0206); a TSIH that names no session does not exist (0x020a).
    assert_eq!(status(add(tsih, 1)), (0x02, 0x06));
    assert_eq!(status(add(tsih.wrapping_add(1).max(1), 1)), (0x02, 0x0a));
    // The first session is untouched.
    assert!(first.test_unit_ready(0).is_ok());
}

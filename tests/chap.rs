//! CHAP against the real daemon with the crate's own initiator: one-way and mutual with every
//! CHAP_A, a wrong secret refused with 0x0201, discovery authentication, None refused where
//! accounts guard a target, and secrets kept out of the tree, the errors and the log.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{ChapOptions, Initiator, InitiatorError, LoginOptions};

const USER: &str = "joe";
const SECRET: &str = "initiator-secret-1";
const TGT_USER: &str = "target-user";
const TGT_SECRET: &str = "target-secret-22";
const DISC_SECRET: &str = "discovery-secret-3";

fn guarded() -> Target {
    let t = Target::with_default_luns(8);
    t.mgmt(
        "targets/iscsi/mgmt",
        &format!("add_target_attribute {IQN} IncomingUser {USER} {SECRET}"),
    );
    t.mgmt(
        "targets/iscsi/mgmt",
        &format!("add_target_attribute {IQN} OutgoingUser {TGT_USER} {TGT_SECRET}"),
    );
    t
}

fn try_login(
    t: &Target,
    target: Option<&str>,
    chap: Option<ChapOptions>,
) -> Result<Initiator, InitiatorError> {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:chap-test".into(),
        target_name: target.map(str::to_string),
        chap,
        ..Default::default()
    })?;
    Ok(ini)
}

fn chap(secret: &str, algorithms: &str, mutual: Option<(&str, &str)>) -> Option<ChapOptions> {
    Some(ChapOptions {
        user: USER.into(),
        secret: secret.into(),
        algorithms: algorithms.into(),
        mutual: mutual.map(|(u, s)| (u.to_string(), s.to_string())),
    })
}

/// TEST UNIT READY answers GOOD once a new nexus's unit attention is cleared.
fn ready(ini: &mut Initiator) {
    for _ in 0..3 {
        let r = ini.test_unit_ready(0).unwrap();
        if r.is_good() {
            return;
        }
        assert_eq!(
            r.sense_key(),
            Some(6),
            "only a unit attention may come first: {r:?}"
        );
    }
    panic!("TEST UNIT READY never answered GOOD");
}

fn assert_auth_failure(r: Result<Initiator, InitiatorError>) {
    match r {
        Err(InitiatorError::LoginRejected { class, detail }) => {
            assert_eq!((class, detail), (2, 1), "status 0x0201 expected")
        }
        Err(e) => panic!("expected an authentication failure, got {e}"),
        Ok(_) => panic!("the login succeeded"),
    }
}

#[test]
fn one_way_and_mutual_with_every_algorithm() {
    let t = guarded();
    for alg in ["5", "6", "7", "8"] {
        let mut ini = try_login(&t, Some(IQN), chap(SECRET, alg, None))
            .unwrap_or_else(|e| panic!("one-way CHAP_A={alg}: {e}"));
        ready(&mut ini);
        ini.logout().unwrap();
        let mut ini = try_login(
            &t,
            Some(IQN),
            chap(SECRET, alg, Some((TGT_USER, TGT_SECRET))),
        )
        .unwrap_or_else(|e| panic!("mutual CHAP_A={alg}: {e}"));
        ready(&mut ini);
        ini.logout().unwrap();
    }
    // The initiator's preference order decides.
    let mut ini = try_login(&t, Some(IQN), chap(SECRET, "8,5", None)).unwrap();
    assert!(ini
        .negotiated()
        .target_keys
        .iter()
        .any(|(k, v)| k == "CHAP_A" && v == "8"));
    ini.logout().unwrap();
}

#[test]
fn wrong_secret_missing_chap_and_wrong_target_secret_fail() {
    let mut t = guarded();
    assert_auth_failure(try_login(
        &t,
        Some(IQN),
        chap("not-the-secret-9", "5", None),
    ));
    // AuthMethod=None where an account guards the target.
    assert_auth_failure(try_login(&t, Some(IQN), None));
    // Mutual CHAP where the initiator expects another target secret: the initiator refuses.
    let e = try_login(
        &t,
        Some(IQN),
        chap(SECRET, "7", Some((TGT_USER, "another-secret-7"))),
    )
    .err()
    .expect("mutual authentication must fail");
    assert!(e.to_string().contains("mutual"), "{e}");
    // The failures are logged with the initiator's name, never with a secret.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = t.log();
    assert!(
        log.contains("iqn.2026-11.org.iscsi-tgt:chap-test") && log.contains("0201"),
        "{log}"
    );
    for s in [SECRET, TGT_SECRET, "not-the-secret-9"] {
        assert!(!log.contains(s), "the log shows a secret");
    }
    assert!(t.alive());
}

#[test]
fn discovery_authentication() {
    let t = Target::with_default_luns(8);
    // Without accounts discovery is open.
    let mut ini = try_login(&t, None, None).unwrap();
    assert!(!ini.send_targets().unwrap().is_empty());
    ini.logout().unwrap();
    t.mgmt(
        "targets/iscsi/mgmt",
        &format!("add_attribute IncomingUser {USER} {DISC_SECRET}"),
    );
    assert_auth_failure(try_login(&t, None, None));
    assert_auth_failure(try_login(&t, None, chap(SECRET, "5", None)));
    let mut ini = try_login(&t, None, chap(DISC_SECRET, "5", None)).unwrap();
    let found = ini.send_targets().unwrap();
    assert!(
        found.iter().any(|(k, v)| k == "TargetName" && v == IQN),
        "{found:?}"
    );
    ini.logout().unwrap();
    // The target itself has no account: normal sessions stay open.
    let mut ini = try_login(&t, Some(IQN), None).unwrap();
    ready(&mut ini);
    ini.logout().unwrap();
}

#[test]
fn secrets_stay_out_of_get_and_tree() {
    let t = guarded();
    assert_eq!(t.get(&format!("targets/iscsi/{IQN}/IncomingUser")), USER);
    assert_eq!(
        t.get(&format!("targets/iscsi/{IQN}/OutgoingUser")),
        TGT_USER
    );
    let tree = t.call("tree", serde_json::json!({"path": ""})).to_string();
    assert!(!tree.contains(SECRET) && !tree.contains(TGT_SECRET));
    let saved = t.call("save_config", serde_json::json!({})).to_string();
    assert!(saved.contains(SECRET), "save_config keeps the secret");
    // A bad account is refused with a message that names the rule, not the value.
    let e = t
        .try_call(
            "mgmt",
            serde_json::json!({"path": "targets/iscsi/mgmt", "command": "add_attribute IncomingUser ann tiny"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("12") && !e.contains("tiny"), "{e}");
}

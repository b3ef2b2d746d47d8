//! Text negotiation in full feature phase against the real daemon: a SendTargets answer
//! longer than the initiator's MaxRecvDataSegmentLength arrives in several PDUs (C bit and
//! TTT), a request continued over several PDUs is gathered, and SendTargets works inside a
//! normal session too.
mod common;

use std::time::Duration;

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions};
use iscsi_tgt::iscsi::{pdu, text};

fn login(t: &Target, target: Option<&str>, keys: &[(&str, &str)]) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:text-test".into(),
        target_name: target.map(str::to_string),
        keys: keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .unwrap();
    ini.set_timeout(Some(Duration::from_secs(5))).unwrap();
    ini
}

fn many_targets(t: &Target, n: usize) -> Vec<String> {
    let names: Vec<String> = (0..n)
        .map(|i| format!("iqn.2026-11.org.iscsi-tgt:a-rather-long-target-name-to-fill-pdus-{i:03}"))
        .collect();
    for name in &names {
        t.mgmt("targets/iscsi/mgmt", &format!("add_target {name}"));
        t.set(&format!("targets/iscsi/{name}/enabled"), "1");
    }
    names
}

#[test]
fn a_long_send_targets_answer_continues_over_several_pdus() {
    let t = Target::with_default_luns(8);
    let names = many_targets(&t, 40);
    let mut ini = login(&t, None, &[("MaxRecvDataSegmentLength", "512")]);
    let found = ini.send_targets().unwrap();
    let listed: Vec<&String> = found
        .iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(listed.len(), 41, "{listed:?}");
    for n in names.iter().chain([&IQN.to_string()]) {
        assert!(listed.contains(&n), "{n} missing");
    }
    ini.logout().unwrap();
}

#[test]
fn a_continued_request_is_gathered() {
    let t = Target::with_default_luns(8);
    let mut ini = login(&t, None, &[]);
    let itt = ini.alloc_itt();
    let whole = text::encode([("SendTargets", "All")]);
    let (first, second) = whole.split_at(5);
    let mut ttt = pdu::RESERVED_TAG;
    for (part, last) in [(first, false), (second, true)] {
        let req = pdu::TextRequest {
            final_flag: last,
            cont: !last,
            itt,
            ttt,
            cmd_sn: ini.consume_cmd_sn(),
            exp_stat_sn: ini.exp_stat_sn(),
            data_segment_length: part.len() as u32,
            ..Default::default()
        };
        let mut bhs = [0u8; pdu::BHS_LEN];
        req.emit(&mut bhs);
        ini.send_pdu(&bhs, &[], part).unwrap();
        let (rb, data) = ini.recv_pdu().unwrap();
        assert_eq!(rb[0] & 0x3f, pdu::op::TEXT_RESPONSE);
        let r = pdu::TextResponse::parse(&rb, &[]).unwrap();
        if last {
            assert!(r.final_flag && !r.cont);
            let keys = text::parse(&data).unwrap();
            assert!(
                keys.iter().any(|(k, v)| k == "TargetName" && v == IQN),
                "{keys:?}"
            );
        } else {
            assert!(
                data.is_empty() && !r.final_flag,
                "an empty answer invites the rest"
            );
            assert_ne!(r.ttt, pdu::RESERVED_TAG);
            // RFC 7143 §11.10.4: the next part echoes the target's TTT.
            ttt = r.ttt;
        }
    }
}

#[test]
fn send_targets_in_a_normal_session() {
    let t = Target::with_default_luns(8);
    let mut ini = login(&t, Some(IQN), &[]);
    let found = ini.send_targets().unwrap();
    assert!(found.iter().any(|(k, v)| k == "TargetName" && v == IQN));
    assert!(found.iter().any(|(k, _)| k == "TargetAddress"));
    ini.logout().unwrap();
}

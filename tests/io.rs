//! Data integrity and session behaviour through the crate's own initiator against the real
//! daemon: write/read-back under every ImmediateData × InitialR2T combination, many R2Ts,
//! queue depth 32, residuals, the null LUN, the CmdSN window, the sessions directory and
//! REPORTED LUNS DATA HAS CHANGED.
mod common;

use std::time::{Duration, Instant};

use common::{Target, IQN};
use iscsi_tgt::initiator::{
    cdb, unsolicited_split, Initiator, LoginOptions, Residual, ScsiResult, STATUS_CHECK_CONDITION,
};
use serde_json::json;

const BS: u32 = 512;
const INITIATOR: &str = "iqn.2026-11.org.iscsi-tgt:io-test";

/// xorshift64: reproducible test data without extra dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn keys(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn login(t: &Target, pairs: &[(&str, &str)]) -> Initiator {
    login_isid(t, LoginOptions::default().isid, pairs)
}

fn login_isid(t: &Target, isid: [u8; 6], pairs: &[(&str, &str)]) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: Some(IQN.into()),
        isid,
        keys: keys(pairs),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login with {pairs:?}: {e}\n{}", t.log()));
    // A new I_T nexus starts with POWER ON OCCURRED on each LUN.
    for lun in [0, 1] {
        clear_ua(&mut ini, lun);
    }
    ini
}

/// TEST UNIT READY until the unit attentions queued for the nexus are consumed.
fn clear_ua(ini: &mut Initiator, lun: u64) {
    for _ in 0..8 {
        let r = ini.test_unit_ready(lun).unwrap();
        if r.is_good() {
            return;
        }
        assert_eq!(
            r.sense_key(),
            Some(0x06),
            "only unit attentions expected: {r:?}"
        );
    }
    panic!("unit attentions on LUN {lun} never cleared");
}

fn write_read_back(ini: &mut Initiator, rng: &mut Rng, what: &str) {
    // LBAs far enough apart that the sizes do not overlap.
    let cases: [(u64, usize); 4] = [
        (0, 512),
        (1024, 64 * 1024),
        (4096, 1 << 20),
        (8192, 5 << 20),
    ];
    for (i, (lba, len)) in cases.into_iter().enumerate() {
        let data = rng.bytes(len);
        let before = ini.stats;
        if i % 2 == 0 {
            ini.write10(0, lba as u32, &data, BS)
                .unwrap_or_else(|e| panic!("{what}: WRITE (10) of {len} bytes: {e}"));
        } else {
            ini.write16(0, lba, &data, BS)
                .unwrap_or_else(|e| panic!("{what}: WRITE (16) of {len} bytes: {e}"));
        }
        // The data went out as negotiated: immediate data, unsolicited Data-Out up to
        // FirstBurstLength, then one R2T per MaxBurstLength.
        let n = ini.negotiated().clone();
        let s = ini.stats;
        let (imm, unsol) = unsolicited_split(len as u32, &n);
        assert_eq!(
            s.immediate_bytes - before.immediate_bytes,
            u64::from(imm),
            "{what}"
        );
        assert_eq!(
            s.unsolicited_bytes - before.unsolicited_bytes,
            u64::from(unsol),
            "{what}"
        );
        let solicited = len as u32 - imm - unsol;
        assert_eq!(
            s.r2ts - before.r2ts,
            u64::from(solicited.div_ceil(n.max_burst_length)),
            "{what}: R2Ts for a {len}-byte write"
        );
        assert!(
            s.max_data_out_segment <= n.max_xmit_data_segment_length,
            "{what}"
        );
        let blocks = (len as u32) / BS;
        let back = if i % 2 == 0 {
            ini.read16(0, lba, blocks, BS)
        } else {
            ini.read10(0, lba as u32, blocks as u16, BS)
        }
        .unwrap_or_else(|e| panic!("{what}: READ of {len} bytes: {e}"));
        assert_eq!(back.len(), len, "{what}: read length");
        assert!(
            ini.stats.max_data_in_segment <= n.max_recv_data_segment_length,
            "{what}: Data-In segments respect our MaxRecvDataSegmentLength"
        );
        if let Some(at) = back.iter().zip(&data).position(|(a, b)| a != b) {
            panic!("{what}: {len}-byte write at LBA {lba} reads back different at byte {at}");
        }
    }
}

#[test]
fn write_read_back_under_each_negotiation() {
    let t = Target::with_default_luns(64);
    let mut rng = Rng::new(0x1234_5678);
    for imm in ["Yes", "No"] {
        for r2t in ["Yes", "No"] {
            let what = format!("ImmediateData={imm} InitialR2T={r2t}");
            let mut ini = login(
                &t,
                &[
                    ("ImmediateData", imm),
                    ("InitialR2T", r2t),
                    ("MaxRecvDataSegmentLength", "8192"),
                ],
            );
            let n = ini.negotiated().clone();
            assert_eq!(n.immediate_data, imm == "Yes", "{what}: {n:?}");
            assert_eq!(n.initial_r2t, r2t == "Yes", "{what}: {n:?}");
            assert_eq!(n.max_recv_data_segment_length, 8192);
            write_read_back(&mut ini, &mut rng, &what);
            ini.logout().unwrap();
        }
    }
}

#[test]
fn many_r2ts_with_small_bursts_and_segments() {
    let t = Target::with_default_luns(64);
    // Small target segments too, so that every burst is several Data-Out PDUs.
    t.set(
        &format!("targets/iscsi/{IQN}/MaxRecvDataSegmentLength"),
        "4096",
    );
    let mut rng = Rng::new(99);
    for imm in ["Yes", "No"] {
        for r2t in ["Yes", "No"] {
            let what = format!("MaxBurstLength=16384 ImmediateData={imm} InitialR2T={r2t}");
            let mut ini = login(
                &t,
                &[
                    ("ImmediateData", imm),
                    ("InitialR2T", r2t),
                    ("MaxRecvDataSegmentLength", "8192"),
                    ("MaxBurstLength", "16384"),
                    ("FirstBurstLength", "8192"),
                ],
            );
            let n = ini.negotiated().clone();
            assert_eq!(n.max_burst_length, 16384, "{what}: {n:?}");
            assert_eq!(n.first_burst_length, 8192, "{what}: {n:?}");
            assert_eq!(n.max_xmit_data_segment_length, 4096, "{what}: {n:?}");
            write_read_back(&mut ini, &mut rng, &what);
            let s = ini.stats;
            assert!(s.r2ts > 320, "{what}: many R2Ts: {s:?}");
            if r2t == "No" {
                assert!(s.unsolicited_data_out > 0, "{what}: {s:?}");
            }
            ini.logout().unwrap();
        }
    }
}

#[test]
fn queue_depth_32_random_4k() {
    let t = Target::with_default_luns(64);
    let mut ini = login(&t, &[("MaxRecvDataSegmentLength", "8192")]);
    let mut rng = Rng::new(7);
    const SLOTS: usize = 2048; // 8 MiB of 4 KiB blocks
    const QD: usize = 32;
    let blocks = 4096 / BS;
    // Each slot written once, in random order.
    let mut order: Vec<usize> = (0..SLOTS).collect();
    for i in (1..SLOTS).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let mut model: Vec<Vec<u8>> = vec![Vec::new(); SLOTS];
    let mut in_flight = std::collections::HashMap::new();
    let mut max_in_flight = 0;
    let mut next = 0;
    while next < SLOTS || !in_flight.is_empty() {
        while next < SLOTS && in_flight.len() < QD {
            let slot = order[next];
            let data = rng.bytes(4096);
            let lba = (slot as u32) * blocks;
            let itt = ini
                .submit(
                    0,
                    &cdb::write10(lba, blocks as u16),
                    Some(&data),
                    4096,
                    false,
                )
                .unwrap();
            model[slot] = data;
            in_flight.insert(itt, slot);
            next += 1;
        }
        max_in_flight = max_in_flight.max(ini.outstanding());
        let (itt, r) = ini.wait_any().unwrap();
        assert!(
            r.is_good(),
            "write of slot {:?}: {r:?}",
            in_flight.get(&itt)
        );
        in_flight
            .remove(&itt)
            .expect("completion of a command in flight");
    }
    assert_eq!(max_in_flight, QD, "32 commands were in flight at once");
    // Read everything back at QD32, in another random order.
    for i in (1..SLOTS).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let mut next = 0;
    while next < SLOTS || !in_flight.is_empty() {
        while next < SLOTS && in_flight.len() < QD {
            let slot = order[next];
            let lba = (slot as u32) * blocks;
            let itt = ini
                .submit(0, &cdb::read10(lba, blocks as u16), None, 4096, true)
                .unwrap();
            in_flight.insert(itt, slot);
            next += 1;
        }
        let (itt, r) = ini.wait_any().unwrap();
        let slot = in_flight.remove(&itt).unwrap();
        assert!(r.is_good(), "read of slot {slot}: {r:?}");
        assert!(r.data == model[slot], "slot {slot} reads back different");
    }
    ini.logout().unwrap();
}

fn read10_edtl(ini: &mut Initiator, lun: u64, lba: u32, blocks: u16, edtl: u32) -> ScsiResult {
    ini.scsi(lun, &cdb::read10(lba, blocks), None, edtl, true)
        .unwrap()
}

#[test]
fn read_residuals() {
    let t = Target::with_default_luns(16);
    let mut ini = login(&t, &[]);
    let data = Rng::new(5).bytes(8 * 512);
    ini.write10(0, 100, &data, BS).unwrap();

    // EDTL larger than the transfer: GOOD, underflow by the difference, the data there is.
    let r = read10_edtl(&mut ini, 0, 100, 8, 8 * 512 + 1024);
    assert!(r.is_good(), "{r:?}");
    assert_eq!(r.residual, Residual::Underflow(1024));
    assert_eq!(r.data, data);

    // EDTL smaller: overflow by the difference and only EDTL bytes.
    let r = read10_edtl(&mut ini, 0, 100, 8, 2048);
    assert!(r.is_good(), "{r:?}");
    assert_eq!(r.residual, Residual::Overflow(8 * 512 - 2048));
    assert_eq!(r.data, data[..2048]);

    // Exact.
    let r = read10_edtl(&mut ini, 0, 100, 8, 8 * 512);
    assert_eq!(r.residual, Residual::None);
    assert_eq!(r.data, data);
    ini.logout().unwrap();
}

#[test]
fn null_lun_reads_zeros() {
    let t = Target::with_default_luns(16);
    let mut ini = login(&t, &[("MaxRecvDataSegmentLength", "8192")]);
    let back = ini.read10(1, 0, 256, BS).unwrap();
    assert_eq!(back.len(), 256 * 512);
    assert!(back.iter().all(|b| *b == 0));
    // Writes are accepted and forgotten.
    ini.write10(1, 8, &Rng::new(3).bytes(4096), BS).unwrap();
    assert!(ini.read10(1, 8, 8, BS).unwrap().iter().all(|b| *b == 0));
    ini.logout().unwrap();
}

#[test]
fn cmd_sn_window_advances() {
    let t = Target::with_default_luns(16);
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: Some(IQN.into()),
        cmd_sn: 1000,
        ..Default::default()
    })
    .unwrap();
    let window = |ini: &Initiator| {
        ini.max_cmd_sn()
            .wrapping_sub(ini.exp_cmd_sn())
            .wrapping_add(1) as i32
    };
    assert_eq!(ini.exp_cmd_sn(), 1000);
    assert!(window(&ini) >= 1, "window after login");
    for i in 1..=20u32 {
        let _ = ini.test_unit_ready(0).unwrap();
        assert_eq!(ini.exp_cmd_sn(), 1000 + i, "ExpCmdSN after command {i}");
        assert_eq!(ini.next_cmd_sn(), 1000 + i);
        assert!(window(&ini) >= 1, "window after command {i}");
    }
    let max_before = ini.max_cmd_sn();
    // A pipeline as deep as the window; MaxCmdSN moves on as commands finish.
    let depth = window(&ini) as usize;
    let itts: Vec<u32> = (0..depth)
        .map(|i| {
            ini.submit(0, &cdb::test_unit_ready(), None, 0, false)
                .unwrap_or_else(|e| {
                    panic!(
                        "command {i} of {depth}: {e} (ExpCmdSN {}, MaxCmdSN {}, next {})\n{}",
                        ini.exp_cmd_sn(),
                        ini.max_cmd_sn(),
                        ini.next_cmd_sn(),
                        t.log()
                    )
                })
        })
        .collect();
    for _ in &itts {
        let (_, r) = ini.wait_any().unwrap_or_else(|e| {
            panic!(
                "{e}: ExpCmdSN {}, MaxCmdSN {}, next {}, {} outstanding\n{}",
                ini.exp_cmd_sn(),
                ini.max_cmd_sn(),
                ini.next_cmd_sn(),
                ini.outstanding(),
                t.log()
            )
        });
        assert!(r.is_good());
    }
    assert_eq!(ini.exp_cmd_sn(), 1020 + depth as u32);
    assert!(ini.max_cmd_sn().wrapping_sub(max_before) as i32 >= depth as i32);
    assert!(window(&ini) >= 1);
    // Immediate NOP-Out does not take a CmdSN.
    ini.nop().unwrap();
    assert_eq!(ini.next_cmd_sn(), 1020 + depth as u32);
    ini.logout().unwrap();
}

fn session_names(t: &Target) -> Vec<String> {
    let v = t.call(
        "ls",
        json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
    );
    v.as_array()
        .expect("ls returns a list")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn session_is_listed_while_logged_in() {
    let t = Target::with_default_luns(16);
    assert!(session_names(&t).is_empty());
    let mut ini = login(&t, &[]);
    assert_eq!(session_names(&t), vec![INITIATOR.to_string()]);
    let dir = format!("targets/iscsi/{IQN}/sessions/{INITIATOR}");
    assert_eq!(t.get(&format!("{dir}/initiator_name")), INITIATOR);
    ini.logout().unwrap();
    wait_for("the session to go away", || session_names(&t).is_empty());
}

#[test]
fn lun_map_change_raises_unit_attention() {
    let t = Target::with_default_luns(16);
    let mut ini = login(&t, &[]);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    t.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "del 1");
    // The reactors see the new LUN map shortly after the RPC returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = ini.test_unit_ready(0).unwrap();
        if !r.is_good() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(r.status, STATUS_CHECK_CONDITION, "{r:?}");
    assert_eq!(r.sense_key(), Some(0x06), "UNIT ATTENTION: {r:?}");
    assert_eq!(r.asc_ascq(), Some((0x3f, 0x0e)), "{r:?}");
    // Reported once.
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    ini.logout().unwrap();
}

#[test]
fn discovery_lists_the_target() {
    let t = Target::with_default_luns(16);
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: None,
        ..Default::default()
    })
    .unwrap();
    let pairs = ini.send_targets().unwrap();
    assert!(
        pairs.contains(&("TargetName".to_string(), IQN.to_string())),
        "{pairs:?}"
    );
    let port = t.addr.port().to_string();
    assert!(
        pairs
            .iter()
            .any(|(k, v)| k == "TargetAddress" && v.contains(&port)),
        "{pairs:?}"
    );
    ini.logout().unwrap();
}

#[test]
fn target_nop_in_is_answered() {
    let t = Target::with_default_luns(16);
    t.set(&format!("targets/iscsi/{IQN}/NopInInterval"), "1");
    let mut ini = login(&t, &[]);
    // A ping after each second the connection is idle; the initiator answers it when it next
    // reads its connection. Idle for longer than that, then read (a loaded machine may need
    // several rounds).
    let deadline = Instant::now() + Duration::from_secs(30);
    while ini.nop_in_answered == 0 {
        assert!(
            Instant::now() < deadline,
            "no NOP-In ping arrived\n{}",
            t.log()
        );
        std::thread::sleep(Duration::from_millis(1500));
        assert!(ini.test_unit_ready(0).unwrap().is_good());
    }
    ini.nop().unwrap();
    assert_eq!(ini.ping(b"hello").unwrap(), b"hello");
    ini.logout().unwrap();
}

#[test]
fn commands_arriving_in_one_segment_are_all_answered() {
    use iscsi_tgt::iscsi::pdu::{self, BHS_LEN};
    let t = Target::with_default_luns(16);
    let mut ini = login(&t, &[]);
    // As many TEST UNIT READYs as the window takes, in a single write: the target must handle
    // every one of them even though no further bytes arrive to wake it.
    let n = ini
        .max_cmd_sn()
        .wrapping_sub(ini.exp_cmd_sn())
        .wrapping_add(1);
    assert!(n >= 32, "window of {n}");
    let mut burst = Vec::new();
    for i in 0..n {
        let cmd = pdu::ScsiCommand {
            itt: 0x1000 + i,
            cmd_sn: ini.consume_cmd_sn(),
            exp_stat_sn: ini.exp_stat_sn(),
            lun: pdu::encode_lun(0),
            cdb: {
                let mut c = [0u8; 16];
                c[..6].copy_from_slice(&cdb::test_unit_ready());
                c
            },
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        cmd.emit(&mut bhs);
        burst.extend_from_slice(&bhs);
    }
    ini.send_raw(&burst).unwrap();
    ini.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut seen = Vec::new();
    for _ in 0..n {
        let (bhs, _) = ini
            .recv_pdu()
            .unwrap_or_else(|e| panic!("after {} of {n} responses: {e}", seen.len()));
        let r = pdu::ScsiResponse::parse(&bhs, &[]).unwrap();
        assert_eq!(bhs[0] & 0x3f, pdu::op::SCSI_RESPONSE);
        assert_eq!(r.status, 0);
        seen.push(r.itt);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..n).map(|i| 0x1000 + i).collect::<Vec<_>>());
    ini.set_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

#[test]
fn task_management_functions() {
    use iscsi_tgt::iscsi::pdu;
    let t = Target::with_default_luns(16);
    let mut ini = login(&t, &[]);
    let mut other = login_isid(&t, [0x80, 0, 0, 0, 0, 2], &[]);
    assert_eq!(
        ini.task_mgmt(pdu::TMF_ABORT_TASK, 0, 0x5555).unwrap(),
        pdu::TMF_RSP_TASK_DOES_NOT_EXIST,
        "ABORT TASK of a task unknown and outside the CmdSN window (RFC 7143 §11.5.1)"
    );
    assert_eq!(
        ini.task_mgmt(pdu::TMF_LOGICAL_UNIT_RESET, 0, RESERVED)
            .unwrap(),
        pdu::TMF_RSP_COMPLETE
    );
    assert_eq!(
        ini.task_mgmt(pdu::TMF_LOGICAL_UNIT_RESET, 9, RESERVED)
            .unwrap(),
        pdu::TMF_RSP_LUN_DOES_NOT_EXIST
    );
    assert_eq!(
        ini.task_mgmt(pdu::TMF_TASK_REASSIGN, 0, RESERVED).unwrap(),
        pdu::TMF_RSP_REASSIGN_NOT_SUPPORTED
    );
    // Every nexus hears of the reset, the requester's included (SAM-5).
    let r = ini.test_unit_ready(0).unwrap();
    assert_eq!(r.asc_ascq(), Some((0x29, 0x03)), "{r:?}");
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    let r = other.test_unit_ready(0).unwrap();
    assert_eq!(r.asc_ascq(), Some((0x29, 0x03)), "{r:?}");
    assert!(other.test_unit_ready(0).unwrap().is_good());
    ini.logout().unwrap();
    other.logout().unwrap();
}

const RESERVED: u32 = 0xffff_ffff;

#[test]
fn login_with_same_isid_reinstates_the_session() {
    let t = Target::with_default_luns(16);
    let mut old = login(&t, &[]);
    let mut new = login(&t, &[]);
    assert!(new.test_unit_ready(0).unwrap().is_good());
    // Only the new session is listed, under the plain initiator name.
    assert_eq!(session_names(&t), vec![INITIATOR.to_string()]);
    // The old session's connection closes (RFC 7143 §6.3.5).
    old.set_timeout(Some(Duration::from_secs(5))).unwrap();
    wait_for("the old session to close", || {
        old.test_unit_ready(0).is_err()
    });
    assert!(new.test_unit_ready(0).unwrap().is_good());
    assert_eq!(session_names(&t), vec![INITIATOR.to_string()]);
    // Another ISID is another session.
    let mut third = login_isid(&t, [0x80, 0, 0, 0, 0, 3], &[]);
    assert_eq!(session_names(&t).len(), 2);
    third.logout().unwrap();
    new.logout().unwrap();
}

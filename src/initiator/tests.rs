use super::*;
use std::io::Write;
use std::net::TcpListener;
use std::thread;

#[test]
fn unsolicited_split_follows_negotiation() {
    let mut n = Negotiated {
        max_xmit_data_segment_length: 8192,
        first_burst_length: 65536,
        ..Default::default()
    };
    n.immediate_data = true;
    n.initial_r2t = true;
    assert_eq!(unsolicited_split(1 << 20, &n), (8192, 0));
    assert_eq!(unsolicited_split(512, &n), (512, 0));
    n.initial_r2t = false;
    assert_eq!(unsolicited_split(1 << 20, &n), (8192, 65536 - 8192));
    assert_eq!(unsolicited_split(4096, &n), (4096, 0));
    n.immediate_data = false;
    assert_eq!(unsolicited_split(1 << 20, &n), (0, 65536));
    assert_eq!(unsolicited_split(1000, &n), (0, 1000));
    n.initial_r2t = true;
    assert_eq!(unsolicited_split(1 << 20, &n), (0, 0));
}

#[test]
fn segments_cover_the_range() {
    assert_eq!(segments(0, 0, 8192), vec![]);
    assert_eq!(segments(100, 10, 8192), vec![(100, 10)]);
    assert_eq!(
        segments(8192, 20000, 8192),
        vec![(8192, 8192), (16384, 8192), (24576, 3616)]
    );
}

#[test]
fn answers_are_checked_against_offers() {
    let offered = vec![
        ("MaxBurstLength".to_string(), "16384".to_string()),
        ("InitialR2T".to_string(), "Yes".to_string()),
        ("ImmediateData".to_string(), "No".to_string()),
    ];
    let mut n = Negotiated::default();
    apply_answer(&mut n, &offered, "MaxBurstLength", "8192").unwrap();
    assert_eq!(n.max_burst_length, 8192);
    assert!(apply_answer(&mut n, &offered, "MaxBurstLength", "65536").is_err());
    assert!(apply_answer(&mut n, &offered, "InitialR2T", "No").is_err());
    assert!(apply_answer(&mut n, &offered, "ImmediateData", "Yes").is_err());
    apply_answer(&mut n, &offered, "ImmediateData", "No").unwrap();
    assert!(!n.immediate_data);
    apply_answer(&mut n, &offered, "MaxRecvDataSegmentLength", "4096").unwrap();
    assert_eq!(n.max_xmit_data_segment_length, 4096);
    apply_answer(&mut n, &offered, "FirstBurstLength", "NotUnderstood").unwrap();
    assert_eq!(n.first_burst_length, 65536);
    assert!(apply_answer(&mut n, &offered, "DataDigest", "CRC32C").is_err());
}

#[test]
fn sense_formats() {
    let mut fixed = vec![0u8; 18];
    fixed[0] = 0x70;
    fixed[2] = 0x06;
    fixed[12] = 0x3f;
    fixed[13] = 0x0e;
    let r = ScsiResult {
        status: STATUS_CHECK_CONDITION,
        sense: fixed,
        ..Default::default()
    };
    assert_eq!(r.sense_key(), Some(6));
    assert_eq!(r.asc_ascq(), Some((0x3f, 0x0e)));
    assert!(!r.is_good());
    assert!(matches!(
        r.good(),
        Err(InitiatorError::Scsi { status: 2, .. })
    ));
    let desc = ScsiResult {
        sense: vec![0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0],
        ..Default::default()
    };
    assert_eq!(desc.sense_key(), Some(5));
    assert_eq!(desc.asc_ascq(), Some((0x24, 0)));
    assert_eq!(ScsiResult::default().asc_ascq(), None);
}

// ---------------------------------------------------------------- a scripted target

struct Fake {
    s: TcpStream,
    stat_sn: u32,
}

impl Fake {
    fn recv(&mut self) -> RawPdu {
        let mut bhs = [0u8; BHS_LEN];
        self.s.read_exact(&mut bhs).unwrap();
        let ahs_len = usize::from(bhs[4]) * 4;
        let dsl = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
        let mut ahs = vec![0u8; ahs_len];
        self.s.read_exact(&mut ahs).unwrap();
        let mut data = vec![0u8; pdu::padded(dsl)];
        self.s.read_exact(&mut data).unwrap();
        data.truncate(dsl);
        RawPdu { bhs, ahs, data }
    }

    fn send(&mut self, bhs: &[u8; BHS_LEN], data: &[u8]) {
        let mut v = bhs.to_vec();
        v.extend_from_slice(data);
        v.resize(BHS_LEN + pdu::padded(data.len()), 0);
        self.s.write_all(&v).unwrap();
    }

    /// Logs the initiator in, answering `target_keys` at the end; returns every key the
    /// initiator sent.
    fn login(&mut self, target_keys: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut sent = Vec::new();
        loop {
            let p = self.recv();
            let req = pdu::LoginRequest::parse(&p.bhs, &[]).unwrap();
            sent.extend(text::parse(&p.data).unwrap());
            let last = req.transit && req.nsg == 3;
            let data = if last {
                text::encode(target_keys.iter().copied())
            } else {
                text::encode([("AuthMethod", "None")])
            };
            let r = pdu::LoginResponse {
                transit: req.transit,
                csg: req.csg,
                nsg: req.nsg,
                isid: req.isid,
                tsih: if last { 9 } else { 0 },
                itt: req.itt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: req.cmd_sn,
                max_cmd_sn: req.cmd_sn.wrapping_add(3),
                data_segment_length: data.len() as u32,
                ..Default::default()
            };
            self.stat_sn += 1;
            let mut bhs = [0u8; BHS_LEN];
            r.emit(&mut bhs);
            self.send(&bhs, &data);
            if last {
                return sent;
            }
        }
    }
}

fn fake_target(
    script: impl FnOnce(&mut Fake) + Send + 'static,
) -> (String, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut f = Fake { s, stat_sn: 100 };
        script(&mut f);
    });
    (addr, h)
}

#[test]
fn login_read_reassembly_nop_in_and_r2t() {
    let (addr, h) = fake_target(|f| {
        f.login(&[
            ("MaxRecvDataSegmentLength", "1024"),
            ("ImmediateData", "No"),
            ("InitialR2T", "Yes"),
            ("MaxBurstLength", "4096"),
        ]);
        // A read of 4096 bytes: Data-In out of offset order, a NOP-In ping in between, status
        // in the last Data-In.
        let p = f.recv();
        let cmd = pdu::ScsiCommand::parse(&p.bhs, &p.ahs).unwrap();
        assert!(cmd.read && !cmd.write);
        assert_eq!(cmd.cmd_sn, 1);
        let mut payload = vec![0u8; 4096];
        for (i, b) in payload.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        for (sn, off) in [(0u32, 2048usize), (1, 0)] {
            let d = pdu::DataIn {
                final_flag: sn == 1,
                status_flag: sn == 1,
                itt: cmd.itt,
                ttt: RESERVED_TAG,
                stat_sn: f.stat_sn,
                exp_cmd_sn: 2,
                max_cmd_sn: 5,
                data_sn: sn,
                buffer_offset: off as u32,
                data_segment_length: 2048,
                ..Default::default()
            };
            if sn == 0 {
                let nop = pdu::NopIn {
                    final_flag: true,
                    itt: RESERVED_TAG,
                    ttt: 0x77,
                    stat_sn: f.stat_sn,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 5,
                    ..Default::default()
                };
                let mut bhs = [0u8; BHS_LEN];
                nop.emit(&mut bhs);
                f.send(&bhs, &[]);
            }
            let mut bhs = [0u8; BHS_LEN];
            d.emit(&mut bhs);
            f.send(&bhs, &payload[off..off + 2048]);
        }
        f.stat_sn += 1;
        // The NOP-Out answering the ping.
        let p = f.recv();
        let n = pdu::NopOut::parse(&p.bhs, &[]).unwrap();
        assert_eq!(p.opcode(), op::NOP_OUT);
        assert_eq!((n.itt, n.ttt, n.immediate), (RESERVED_TAG, 0x77, true));

        // A write of 6000 bytes: no immediate data, no unsolicited Data-Out; two R2Ts, Data-Out
        // split at the target's 1024 bytes.
        let p = f.recv();
        let cmd = pdu::ScsiCommand::parse(&p.bhs, &p.ahs).unwrap();
        assert!(cmd.write && cmd.final_flag);
        assert_eq!(cmd.data_segment_length, 0);
        assert_eq!(cmd.cmd_sn, 2);
        let mut got = vec![0u8; 6000];
        for (r2t_sn, (off, len)) in [(0u32, (0u32, 4096u32)), (1, (4096, 1904))].into_iter() {
            let r = pdu::R2t {
                final_flag: true,
                itt: cmd.itt,
                ttt: 0x1000 + r2t_sn,
                stat_sn: f.stat_sn,
                exp_cmd_sn: 3,
                max_cmd_sn: 6,
                r2t_sn,
                buffer_offset: off,
                desired_data_transfer_length: len,
                ..Default::default()
            };
            let mut bhs = [0u8; BHS_LEN];
            r.emit(&mut bhs);
            f.send(&bhs, &[]);
            let mut at = off;
            let mut sn = 0;
            while at < off + len {
                let p = f.recv();
                let d = pdu::DataOut::parse(&p.bhs, &[]).unwrap();
                assert_eq!(
                    (d.ttt, d.data_sn, d.buffer_offset),
                    (0x1000 + r2t_sn, sn, at)
                );
                assert!(p.data.len() <= 1024);
                assert_eq!(d.final_flag, at + p.data.len() as u32 == off + len);
                got[at as usize..at as usize + p.data.len()].copy_from_slice(&p.data);
                at += p.data.len() as u32;
                sn += 1;
            }
        }
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 7) as u8));
        let sense = [
            0u8, 18, 0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3f, 0x0e, 0, 0, 0, 0,
        ];
        let r = pdu::ScsiResponse {
            status: STATUS_CHECK_CONDITION,
            itt: cmd.itt,
            stat_sn: f.stat_sn,
            exp_cmd_sn: 3,
            max_cmd_sn: 6,
            residual_underflow: true,
            residual_count: 12,
            data_segment_length: sense.len() as u32,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        r.emit(&mut bhs);
        f.send(&bhs, &sense);
    });
    let mut ini = Initiator::connect(&addr).unwrap();
    ini.login(&LoginOptions {
        target_name: Some("iqn.x:t".into()),
        keys: vec![
            ("ImmediateData".into(), "No".into()),
            ("InitialR2T".into(), "Yes".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ini.tsih(), 9);
    assert_eq!(ini.negotiated().max_xmit_data_segment_length, 1024);
    assert_eq!(ini.negotiated().max_burst_length, 4096);
    assert_eq!((ini.exp_cmd_sn(), ini.max_cmd_sn()), (1, 4));

    let r = ini.scsi(0, &cdb::read10(0, 8), None, 4096, true).unwrap();
    assert!(r.is_good());
    assert_eq!(r.residual, Residual::None);
    assert!(r
        .data
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));
    assert_eq!((ini.exp_cmd_sn(), ini.max_cmd_sn()), (2, 5));

    let data: Vec<u8> = (0..6000).map(|i| (i % 7) as u8).collect();
    let r = ini
        .scsi(0, &cdb::write10(0, 12), Some(&data), 6000, false)
        .unwrap();
    assert_eq!(r.status, STATUS_CHECK_CONDITION);
    assert_eq!(r.asc_ascq(), Some((0x3f, 0x0e)));
    assert_eq!(r.residual, Residual::Underflow(12));
    assert_eq!(ini.nop_in_answered, 1);
    assert_eq!(ini.exp_stat_sn(), 104);
    h.join().unwrap();
}

#[test]
fn burst_lengths_are_proposed_and_a_smaller_answer_is_kept() {
    let (addr, h) = fake_target(|f| {
        let sent = f.login(&[
            ("MaxRecvDataSegmentLength", "65536"),
            ("FirstBurstLength", "8192"),
            ("MaxBurstLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
        ]);
        // Proposed, so that a target with smaller limits answers with them (SPDK refuses
        // more than its FirstBurstLength of immediate data when the key was never proposed).
        for k in [
            "FirstBurstLength",
            "MaxBurstLength",
            "ImmediateData",
            "InitialR2T",
        ] {
            assert!(
                sent.iter().any(|(kk, _)| kk == k),
                "{k} not proposed: {sent:?}"
            );
        }
    });
    let mut ini = Initiator::connect(&addr).unwrap();
    ini.login(&LoginOptions {
        target_name: Some("iqn.x:t".into()),
        ..Default::default()
    })
    .unwrap();
    h.join().unwrap();
    assert_eq!(ini.neg.first_burst_length, 8192);
    // A 16 KiB write carries 8 KiB of immediate data, the rest on R2T.
    assert_eq!(unsolicited_split(16384, &ini.neg), (8192, 0));
}

#[test]
fn login_reject_is_reported() {
    let (addr, h) = fake_target(|f| {
        let p = f.recv();
        let req = pdu::LoginRequest::parse(&p.bhs, &[]).unwrap();
        let keys = text::parse(&p.data).unwrap();
        assert!(keys.contains(&("SessionType".into(), "Normal".into())));
        assert!(keys.contains(&("AuthMethod".into(), "None".into())));
        let r = pdu::LoginResponse {
            isid: req.isid,
            itt: req.itt,
            status_class: 2,
            status_detail: 3,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        r.emit(&mut bhs);
        f.send(&bhs, &[]);
    });
    let mut ini = Initiator::connect(&addr).unwrap();
    let e = ini
        .login(&LoginOptions {
            target_name: Some("iqn.x:nope".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            InitiatorError::LoginRejected {
                class: 2,
                detail: 3
            }
        ),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn submit_waits_for_the_cmd_sn_window() {
    let (addr, h) = fake_target(|f| {
        f.login(&[]);
        // Login left a window of 4 (MaxCmdSN = CmdSN + 3); close it after the fourth command.
        let mut itts = Vec::new();
        for sn in 1..=4u32 {
            let p = f.recv();
            let c = pdu::ScsiCommand::parse(&p.bhs, &p.ahs).unwrap();
            assert_eq!(c.cmd_sn, sn);
            itts.push(c.itt);
        }
        // Nothing more may come while MaxCmdSN is 4.
        f.s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        let e = f.s.read(&mut b).unwrap_err();
        assert!(matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        f.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One answer opens the window by one.
        let answer = |f: &mut Fake, itt: u32, exp: u32, max: u32| {
            let r = pdu::ScsiResponse {
                itt,
                stat_sn: f.stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                ..Default::default()
            };
            f.stat_sn += 1;
            let mut bhs = [0u8; BHS_LEN];
            r.emit(&mut bhs);
            f.send(&bhs, &[]);
        };
        answer(f, itts[0], 5, 5);
        let p = f.recv();
        let c = pdu::ScsiCommand::parse(&p.bhs, &p.ahs).unwrap();
        assert_eq!(c.cmd_sn, 5);
        itts.push(c.itt);
        for &itt in &itts[1..] {
            answer(f, itt, 6, 10);
        }
    });
    let mut ini = Initiator::connect(&addr).unwrap();
    ini.login(&LoginOptions {
        target_name: Some("iqn.x:t".into()),
        ..Default::default()
    })
    .unwrap();
    let mut submitted = Vec::new();
    for _ in 0..5 {
        submitted.push(
            ini.submit(0, &cdb::test_unit_ready(), None, 0, false)
                .unwrap(),
        );
    }
    let mut finished = Vec::new();
    for _ in 0..5 {
        let (itt, r) = ini.wait_any().unwrap();
        assert!(r.is_good());
        finished.push(itt);
    }
    finished.sort_unstable();
    submitted.sort_unstable();
    assert_eq!(finished, submitted);
    assert_eq!((ini.exp_cmd_sn(), ini.max_cmd_sn()), (6, 10));
    assert!(matches!(
        ini.wait_any(),
        Err(InitiatorError::InvalidArgument(_))
    ));
    h.join().unwrap();
}

#[test]
fn wait_next_tells_a_rejected_command_from_a_lost_connection() {
    let (addr, h) = fake_target(|f| {
        f.login(&[]);
        let first = f.recv();
        let second = f.recv();
        // The first command is rejected (its header comes back as the Reject's data)...
        let r = pdu::Reject {
            reason: pdu::REJECT_INVALID_PDU_FIELD,
            stat_sn: f.stat_sn,
            exp_cmd_sn: 3,
            max_cmd_sn: 10,
            data_segment_length: BHS_LEN as u32,
            ..Default::default()
        };
        f.stat_sn += 1;
        let mut bhs = [0u8; BHS_LEN];
        r.emit(&mut bhs);
        f.send(&bhs, &first.bhs);
        // ...the second answered GOOD, and then the connection goes.
        let c = pdu::ScsiCommand::parse(&second.bhs, &second.ahs).unwrap();
        let r = pdu::ScsiResponse {
            itt: c.itt,
            stat_sn: f.stat_sn,
            exp_cmd_sn: 3,
            max_cmd_sn: 10,
            ..Default::default()
        };
        r.emit(&mut bhs);
        f.send(&bhs, &[]);
    });
    let mut ini = Initiator::connect(&addr).unwrap();
    ini.login(&LoginOptions {
        target_name: Some("iqn.x:t".into()),
        ..Default::default()
    })
    .unwrap();
    let a = ini
        .submit(0, &cdb::test_unit_ready(), None, 0, false)
        .unwrap();
    let b = ini
        .submit(0, &cdb::test_unit_ready(), None, 0, false)
        .unwrap();
    // The rejected command ends alone: the connection goes on.
    match ini.wait_next().unwrap() {
        (itt, Err(InitiatorError::Rejected { itt: r, reason })) => {
            assert_eq!((itt, r, reason), (a, a, pdu::REJECT_INVALID_PDU_FIELD));
        }
        other => panic!("{other:?}"),
    }
    let (itt, r) = ini.wait_next().unwrap();
    assert_eq!(itt, b);
    assert!(r.unwrap().is_good());
    h.join().unwrap();
    // A command sent after the target left: the connection's failure is the outer error.
    if ini
        .submit(0, &cdb::test_unit_ready(), None, 0, false)
        .is_ok()
    {
        assert!(ini.wait_next().is_err());
    }
}

#[test]
fn an_idle_tick_ends_silent_waits_and_keeps_a_pdu_that_pauses_midway() {
    const TICK: Duration = Duration::from_millis(50);
    let (addr, h) = fake_target(|f| {
        f.login(&[]);
        let p = f.recv();
        let c = pdu::ScsiCommand::parse(&p.bhs, &p.ahs).unwrap();
        // A Reject of a PDU that is no command in flight, then silence for a few ticks.
        let mut stray = p.bhs;
        stray[16..20].copy_from_slice(&0x7777_u32.to_be_bytes());
        let r = pdu::Reject {
            reason: pdu::REJECT_PROTOCOL_ERROR,
            stat_sn: f.stat_sn,
            exp_cmd_sn: 2,
            max_cmd_sn: 10,
            data_segment_length: BHS_LEN as u32,
            ..Default::default()
        };
        f.stat_sn += 1;
        let mut bhs = [0u8; BHS_LEN];
        r.emit(&mut bhs);
        f.send(&bhs, &stray);
        thread::sleep(TICK * 4);
        // The answer, its header cut in two by a pause of several ticks.
        let r = pdu::ScsiResponse {
            itt: c.itt,
            stat_sn: f.stat_sn,
            exp_cmd_sn: 2,
            max_cmd_sn: 10,
            ..Default::default()
        };
        r.emit(&mut bhs);
        f.s.write_all(&bhs[..20]).unwrap();
        thread::sleep(TICK * 4);
        f.s.write_all(&bhs[20..]).unwrap();
        // Half a header, and then nothing for longer than the timeout.
        let p = f.recv();
        let c = pdu::ScsiCommand::parse(&p.bhs, &p.ahs).unwrap();
        let r = pdu::ScsiResponse {
            itt: c.itt,
            stat_sn: f.stat_sn + 1,
            exp_cmd_sn: 3,
            max_cmd_sn: 10,
            ..Default::default()
        };
        r.emit(&mut bhs);
        f.s.write_all(&bhs[..24]).unwrap();
        thread::sleep(Duration::from_secs(2));
    });
    let mut ini = Initiator::connect(&addr).unwrap();
    ini.login(&LoginOptions {
        target_name: Some("iqn.x:t".into()),
        ..Default::default()
    })
    .unwrap();
    ini.set_idle_tick(Some(TICK)).unwrap();
    let itt = ini
        .submit(0, &cdb::test_unit_ready(), None, 0, false)
        .unwrap();
    let mut idle = 0;
    let (done, r) = loop {
        match ini.wait_next() {
            Err(InitiatorError::Idle) => idle += 1,
            other => break other.unwrap(),
        }
    };
    assert_eq!(done, itt);
    assert!(r.unwrap().is_good(), "the answer arrived whole");
    // The silence before the answer was idle ticks; the pause in its middle was waited
    // through (a tick there would have lost the header's first bytes).
    assert!(idle >= 2, "{idle} idle ticks");
    assert_eq!(
        ini.unclaimed_reject(),
        Some((pdu::REJECT_PROTOCOL_ERROR, Some(0x7777)))
    );
    // A PDU that stops midway for longer than the timeout fails the connection.
    ini.set_timeout(Some(Duration::from_millis(300))).unwrap();
    ini.submit(0, &cdb::test_unit_ready(), None, 0, false)
        .unwrap();
    let e = loop {
        match ini.wait_next() {
            Err(InitiatorError::Idle) => {}
            other => break other.unwrap_err(),
        }
    };
    assert!(matches!(e, InitiatorError::Io(_)), "{e:?}");
    assert!(ini.set_idle_tick(Some(Duration::ZERO)).is_err());
    h.join().unwrap();
}

//! What a hostile tester found in the transport, each kept fixed: the F bit ending unsolicited
//! data early, a READ carrying the W flag, Login Responses longer than a PDU, keys sent twice,
//! a sleeping reactor that did not wake for a new connection, connection limits and the file
//! descriptor reserve, and initiators that stop reading while holding the buffer pool.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{tur_good, Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions};
use iscsi_tgt::iscsi::pdu::{self, op, BHS_LEN, RESERVED_TAG};
use iscsi_tgt::iscsi::text;

const INITIATOR: &str = "iqn.2026-11.org.iscsi-tgt:hardening";
/// RFC 7143 §13.12: the data segment limit in force during login.
const LOGIN_MAX_DATA: usize = 8192;

fn login_with(t: &Target, keys: &[(&str, &str)]) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.set_timeout(Some(Duration::from_secs(10))).unwrap();
    ini.login(&LoginOptions {
        initiator_name: INITIATOR.into(),
        target_name: Some(IQN.into()),
        keys: keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    tur_good(&mut ini);
    ini
}

/// Sends a SCSI Command PDU as built here (flags and all), with `data` as immediate data.
#[allow(clippy::too_many_arguments)]
fn send_command(
    ini: &mut Initiator,
    itt: u32,
    cdb_bytes: &[u8],
    edtl: u32,
    read: bool,
    write: bool,
    final_flag: bool,
    data: &[u8],
) {
    let mut c = [0u8; 16];
    c[..cdb_bytes.len()].copy_from_slice(cdb_bytes);
    let cmd = pdu::ScsiCommand {
        final_flag,
        read,
        write,
        attr: 1,
        itt,
        lun: pdu::encode_lun(0),
        expected_data_transfer_length: edtl,
        cmd_sn: ini.consume_cmd_sn(),
        exp_stat_sn: ini.exp_stat_sn(),
        cdb: c,
        data_segment_length: data.len() as u32,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    cmd.emit(&mut bhs);
    ini.send_pdu(&bhs, &[], data).unwrap();
}

fn send_data_out(ini: &mut Initiator, itt: u32, ttt: u32, data_sn: u32, offset: u32, data: &[u8]) {
    let d = pdu::DataOut {
        final_flag: true,
        itt,
        ttt,
        exp_stat_sn: ini.exp_stat_sn(),
        data_sn,
        buffer_offset: offset,
        data_segment_length: data.len() as u32,
        ..Default::default()
    };
    let mut bhs = [0u8; BHS_LEN];
    d.emit(&mut bhs);
    ini.send_pdu(&bhs, &[], data).unwrap();
}

/// The next PDU, which must be an R2T.
fn expect_r2t(ini: &mut Initiator, t: &Target) -> pdu::R2t {
    let (h, _) = ini
        .recv_pdu()
        .unwrap_or_else(|e| panic!("no R2T: {e}\n{}", t.log()));
    assert_eq!(h[0] & 0x3f, op::R2T, "{h:02x?}");
    pdu::R2t::parse(&h, &[]).unwrap()
}

/// The next PDU, which must be the SCSI Response of `itt`.
fn expect_response(ini: &mut Initiator, t: &Target, itt: u32) -> pdu::ScsiResponse {
    let (h, _) = ini
        .recv_pdu()
        .unwrap_or_else(|e| panic!("no SCSI Response: {e}\n{}", t.log()));
    assert_eq!(h[0] & 0x3f, op::SCSI_RESPONSE, "{h:02x?}");
    let rsp = pdu::ScsiResponse::parse(&h, &[]).unwrap();
    assert_eq!(rsp.itt, itt);
    rsp
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn an_f_bit_that_ends_unsolicited_data_early_gets_the_rest_solicited() {
    let t = Target::with_default_luns(16);
    let mut ini = login_with(
        &t,
        &[
            ("InitialR2T", "No"),
            ("ImmediateData", "No"),
            ("FirstBurstLength", "65536"),
        ],
    );
    let data = pattern(4096, 7);
    // F=0 on the command: unsolicited Data-Out follows; it ends (F=1) after 1024 of the 4096
    // bytes FirstBurstLength would allow.
    send_command(
        &mut ini,
        0x51,
        &cdb::write10(0, 8),
        4096,
        false,
        true,
        false,
        &[],
    );
    send_data_out(&mut ini, 0x51, RESERVED_TAG, 0, 0, &data[..1024]);
    let r2t = expect_r2t(&mut ini, &t);
    assert_eq!(r2t.itt, 0x51);
    assert_eq!(
        (r2t.buffer_offset, r2t.desired_data_transfer_length),
        (1024, 3072)
    );
    send_data_out(&mut ini, 0x51, r2t.ttt, 0, 1024, &data[1024..]);
    assert_eq!(expect_response(&mut ini, &t, 0x51).status, 0);
    assert_eq!(ini.read10(0, 0, 8, 512).unwrap(), data);

    // F=1 on the command itself: its immediate data is all there is unsolicited.
    let mut ini = login_with(
        &t,
        &[
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "65536"),
        ],
    );
    let data = pattern(4096, 9);
    send_command(
        &mut ini,
        0x52,
        &cdb::write10(8, 8),
        4096,
        false,
        true,
        true,
        &data[..512],
    );
    let r2t = expect_r2t(&mut ini, &t);
    assert_eq!(
        (r2t.buffer_offset, r2t.desired_data_transfer_length),
        (512, 3584)
    );
    send_data_out(&mut ini, 0x52, r2t.ttt, 0, 512, &data[512..]);
    assert_eq!(expect_response(&mut ini, &t, 0x52).status, 0);
    assert_eq!(ini.read10(0, 8, 8, 512).unwrap(), data);
}

#[test]
fn a_read_carrying_the_w_flag_is_answered() {
    let t = Target::with_default_luns(16);
    let mut ini = login_with(&t, &[("InitialR2T", "No"), ("ImmediateData", "No")]);
    // READ (10) of one block flagged as a write with F=1 and no data: nothing will follow.
    send_command(
        &mut ini,
        0x61,
        &cdb::read10(0, 1),
        512,
        false,
        true,
        true,
        &[],
    );
    let rsp = expect_response(&mut ini, &t, 0x61);
    assert_eq!(rsp.status, 0, "{rsp:?}");
    // The session goes on.
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

/// Sends Login Request text in PDUs of at most 8192 bytes (C=1 on all but the last), each
/// continued one answered by an empty response.
fn send_login_text(s: &mut Initiator, itt: u32, data: &[u8], nsg: u8) {
    let parts: Vec<&[u8]> = data.chunks(LOGIN_MAX_DATA).collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let req = pdu::LoginRequest {
            transit: last,
            cont: !last,
            csg: 0,
            nsg: if last { nsg } else { 0 },
            isid: [0x80, 0, 0, 0, 0x42, 1],
            itt,
            data_segment_length: part.len() as u32,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        req.emit(&mut bhs);
        s.send_pdu(&bhs, &[], part).unwrap();
        if !last {
            let (h, d) = s.recv_pdu().unwrap();
            let r = pdu::LoginResponse::parse(&h, &[]).unwrap();
            assert_eq!(r.status_class, 0);
            assert!(d.is_empty(), "a continued Login Request is answered empty");
        }
    }
}

#[test]
fn a_long_login_response_is_split_with_the_c_bit() {
    let t = Target::with_default_luns(16);
    let mut pairs: Vec<(String, String)> = vec![
        ("InitiatorName".into(), INITIATOR.into()),
        ("TargetName".into(), IQN.into()),
        ("SessionType".into(), "Normal".into()),
        ("AuthMethod".into(), "None".into()),
    ];
    for i in 0..1025 {
        pairs.push((format!("X-org.example.key{i:04}"), "1".into()));
    }
    let data = text::encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut s = Initiator::connect(t.addr).unwrap();
    s.set_timeout(Some(Duration::from_secs(10))).unwrap();
    send_login_text(&mut s, 7, &data, 1);
    // The answer (1025 NotUnderstood) comes in parts of at most 8192 bytes, C=1 and T=0 on
    // all but the last; each further part is asked for with an empty Login Request.
    let mut answer = Vec::new();
    let mut parts = 0;
    loop {
        let (h, d) = s.recv_pdu().unwrap_or_else(|e| panic!("{e}\n{}", t.log()));
        assert_eq!(h[0] & 0x3f, op::LOGIN_RESPONSE);
        let r = pdu::LoginResponse::parse(&h, &[]).unwrap();
        assert_eq!(r.status_class, 0, "{r:?}");
        assert!(
            d.len() <= LOGIN_MAX_DATA,
            "a Login Response of {} bytes",
            d.len()
        );
        answer.extend_from_slice(&d);
        parts += 1;
        if !r.cont {
            assert!(r.transit && r.nsg == 1, "the last part moves on: {r:?}");
            break;
        }
        assert!(!r.transit, "C=1 requires T=0 (RFC 7143 §11.13.3)");
        let more = pdu::LoginRequest {
            csg: 0,
            nsg: 0,
            isid: [0x80, 0, 0, 0, 0x42, 1],
            itt: 7,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        more.emit(&mut bhs);
        s.send_pdu(&bhs, &[], &[]).unwrap();
        assert!(parts < 100, "the answer never ends");
    }
    assert!(parts > 1);
    let keys = text::parse(&answer).unwrap();
    let not_understood = keys.iter().filter(|(_, v)| v == "NotUnderstood").count();
    assert_eq!(not_understood, 1025);
    assert!(keys.contains(&("AuthMethod".into(), "None".into())));

    // The project's initiator follows the same exchange to full feature phase.
    let many: Vec<(String, String)> = (0..1025)
        .map(|i| (format!("X-org.example.key{i:04}"), "1".to_string()))
        .collect();
    let keys: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut ini = login_with(&t, &keys);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

#[test]
fn a_key_sent_twice_gets_a_login_reject() {
    let t = Target::with_default_luns(16);
    let data = text::encode([
        ("InitiatorName", INITIATOR),
        ("InitiatorName", "iqn.2026-11.org.iscsi-tgt:someone-else"),
        ("TargetName", IQN),
        ("AuthMethod", "None"),
    ]);
    let mut s = Initiator::connect(t.addr).unwrap();
    s.set_timeout(Some(Duration::from_secs(10))).unwrap();
    send_login_text(&mut s, 9, &data, 1);
    let (h, _) = s.recv_pdu().unwrap();
    let r = pdu::LoginResponse::parse(&h, &[]).unwrap();
    assert_eq!(
        (r.status_class, r.status_detail),
        (2, 0),
        "initiator error (RFC 7143 §6.2)"
    );
}

fn reactor_wakeups(t: &Target) -> u64 {
    t.get("reactors/0/wakeups").trim().parse().unwrap()
}

fn wait_for(t: &Target, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.get(path).trim() != want {
        assert!(
            Instant::now() < deadline,
            "{path} stayed {:?}, not {want:?}\n{}",
            t.get(path),
            t.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sleeping_adaptive_reactor_wakes_for_a_new_connection() {
    let t = Target::start(&["--cores", "0", "--mode", "adaptive"]);
    t.configure_default(16);
    // A new connection that sends nothing: only the listener can wake the reactor for it.
    // Accepted after a wake-up by an event, not at the end of a timed sleep. (A connection
    // that arrives in the reactor's short spin between two sleeps needs no wake-up, so one of
    // three may do without.)
    let mut woken = 0;
    let mut held = Vec::new();
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(700));
        let before = reactor_wakeups(&t);
        held.push(TcpStream::connect(t.addr).unwrap());
        wait_for(&t, "targets/iscsi/connections", &i.to_string());
        if reactor_wakeups(&t) > before {
            woken += 1;
        }
    }
    assert!(woken >= 2, "woken for {woken} of 3 connections");
    // And a login on the idle target completes.
    drop(held);
    let mut ini = login_with(&t, &[]);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

/// Whether the target closed `s` (EOF or reset) within 10 s.
fn closed_by_target(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn connection_limits_refuse_the_excess_at_accept() {
    let second = format!("127.0.0.1:{}", common::free_port());
    let t = Target::start(&["--cores", "0", "--listen", &second]);
    t.configure_default(16);
    t.set("targets/iscsi/max_connections", "2");
    assert_eq!(t.get("targets/iscsi/max_connections"), "2");
    // Two logged-in sessions (not silent connections, which are closed after 10 s).
    let a = login_with(&t, &[]);
    let mut b = Initiator::connect(t.addr).unwrap();
    b.login(&LoginOptions {
        initiator_name: format!("{INITIATOR}-b"),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap();
    wait_for(&t, "targets/iscsi/connections", "2");
    let mut c = TcpStream::connect(t.addr).unwrap();
    assert!(closed_by_target(&mut c), "a third connection is refused");
    assert!(t.get("targets/iscsi/refused_connections").trim() != "0");
    let mut other = TcpStream::connect(&second).unwrap();
    assert!(
        closed_by_target(&mut other),
        "max_connections counts every portal"
    );
    drop((a, b));
    wait_for(&t, "targets/iscsi/connections", "0");

    // Per portal: one each.
    t.set("targets/iscsi/max_connections", "0");
    t.set("targets/iscsi/max_connections_per_portal", "1");
    let mut ini = login_with(&t, &[]);
    let mut d = TcpStream::connect(t.addr).unwrap();
    assert!(closed_by_target(&mut d), "a second one on the same portal");
    let mut ini2 = Initiator::connect(&second).unwrap();
    ini2.set_timeout(Some(Duration::from_secs(10))).unwrap();
    ini2.login(&LoginOptions {
        initiator_name: format!("{INITIATOR}-2"),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap();
    tur_good(&mut ini2);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
    // Bad values are refused with the range.
    let e = t
        .try_call(
            "set",
            serde_json::json!({"path": "targets/iscsi/max_connections", "value": "-1"}),
        )
        .unwrap_err();
    assert!(
        e["message"].as_str().unwrap().contains("0 (no limit)"),
        "{e}"
    );
    // Saved and loaded with the configuration.
    let cfg = t.call("save_config", serde_json::json!({}));
    assert_eq!(
        cfg["targets"]["iscsi"]["max_connections_per_portal"],
        serde_json::json!("1")
    );
}

#[test]
fn a_connection_flood_under_a_small_fd_limit_leaves_the_rpc_answering() {
    // A hard limit of 64 descriptors: the daemon cannot raise it, so connections must stop
    // short of the reserve the RPC server and the backing files need.
    let t = Target::start_wrapped("ulimit -n 64 &&", &["--cores", "0"]);
    t.configure_default(16);
    let mut flood = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(t.addr) {
            flood.push(s);
        }
    }
    // The RPC answers, again and again, while the flood holds its connections.
    for _ in 0..20 {
        assert_eq!(t.get("targets/iscsi/enabled"), "1");
    }
    let conns: usize = t.get("targets/iscsi/connections").trim().parse().unwrap();
    assert!(conns < 64, "{conns} connections under a limit of 64");
    let refused: u64 = t
        .get("targets/iscsi/refused_connections")
        .trim()
        .parse()
        .unwrap();
    assert!(refused > 0);
    // Backing files can still be opened.
    let img = t.dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    t.mgmt(
        "handlers/vdisk_fileio/mgmt",
        &format!("add_device file0 filename={}", img.display()),
    );
    // Connections that send nothing are dropped after 10 s, even while their initiator holds
    // them open: idle connections cannot keep logins out for long.
    wait_for(&t, "targets/iscsi/connections", "0");
    assert!(t.log().contains("nothing received within 10 s"));
    drop(flood);
    let mut ini = login_with(&t, &[]);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

#[test]
fn initiators_that_stop_reading_cannot_starve_other_sessions() {
    // A 64 MiB pool; each session may hold an eighth of it.
    let t = Target::start(&["--cores", "0", "--mem-size", "64"]);
    t.configure_default(64);
    t.set(&format!("targets/iscsi/{IQN}/RspTimeout"), "3");
    t.set(&format!("targets/iscsi/{IQN}/NopInInterval"), "0");
    // Three sessions each ask for 32 READs of 1 MiB and never read the answers (a small
    // receive buffer, so that the kernel does not take the data off the target's hands).
    let mut stuck = Vec::new();
    for n in 0..3 {
        let mut ini = Initiator::connect(t.addr).unwrap();
        nix::sys::socket::setsockopt(ini.stream(), nix::sys::socket::sockopt::RcvBuf, &4096)
            .unwrap();
        ini.set_timeout(Some(Duration::from_secs(10))).unwrap();
        ini.login(&LoginOptions {
            initiator_name: format!("{INITIATOR}-stuck{n}"),
            target_name: Some(IQN.into()),
            isid: [0x80, 0, 0, 0, 0x10, n],
            ..Default::default()
        })
        .unwrap();
        tur_good(&mut ini);
        for i in 0..32u32 {
            send_command(
                &mut ini,
                0x1000 + i,
                &cdb::read10(i * 2048 % (64 * 2048 - 2048), 2048),
                1 << 20,
                true,
                false,
                true,
                &[],
            );
        }
        stuck.push(ini);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Another session is served: every 1 MiB READ is GOOD, none TASK SET FULL.
    let mut ini = login_with(&t, &[]);
    let mut itts = Vec::new();
    for i in 0..8u32 {
        itts.push(
            ini.submit(0, &cdb::read10(i * 2048, 2048), None, 1 << 20, true)
                .unwrap(),
        );
    }
    for itt in itts {
        let r = ini.wait(itt).unwrap();
        assert!(r.is_good(), "status {:#x}: {r:?}", r.status);
    }
    // The stuck connections are closed once their output has not drained for RspTimeout,
    // and their buffers return to the pool.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sessions = t.call(
            "ls",
            serde_json::json!({"path": format!("targets/iscsi/{IQN}/sessions")}),
        );
        let n = sessions.as_array().map_or(0, Vec::len);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} sessions left\n{}", t.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t.log().contains("read none of its responses"),
        "{}",
        t.log()
    );
    drop(stuck);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

#[test]
fn a_peer_that_sends_but_never_reads_is_not_read_without_bound() {
    let t = Target::with_default_luns(16);
    t.set(&format!("targets/iscsi/{IQN}/RspTimeout"), "3");
    t.set(&format!("targets/iscsi/{IQN}/NopInInterval"), "0");
    let ini = login_with(&t, &[]);
    nix::sys::socket::setsockopt(ini.stream(), nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    // NOP-Outs with 8 KiB of ping data each, whose echoes are never read.
    let data = vec![0x5au8; 8192];
    let mut bhs = [0u8; BHS_LEN];
    ini.stream().set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let mut stuck_since: Option<Instant> = None;
    let limit = 128 << 20;
    while sent < limit {
        let nop = pdu::NopOut {
            immediate: true,
            final_flag: true,
            itt: (sent / 8192) as u32 & 0x7fff_ffff,
            ttt: RESERVED_TAG,
            cmd_sn: ini.next_cmd_sn(),
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        nop.emit(&mut bhs);
        let mut pdu_bytes = bhs.to_vec();
        pdu_bytes.extend_from_slice(&data);
        let mut off = 0;
        while off < pdu_bytes.len() {
            match ini.stream().write(&pdu_bytes[off..]) {
                Ok(n) => {
                    off += n;
                    sent += n;
                    stuck_since = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let since = *stuck_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
        if stuck_since.is_some_and(|s| s.elapsed() > Duration::from_secs(2))
            || off < pdu_bytes.len()
        {
            break;
        }
    }
    // The target stopped taking input once a MiB of echoes waited (what the kernel buffers
    // hold comes on top): far less than the peer would send.
    assert!(
        sent < 32 << 20,
        "the target took {sent} bytes from a peer that reads nothing"
    );
    // And with nothing read for RspTimeout the connection is closed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.get("targets/iscsi/connections").trim() != "0" {
        assert!(Instant::now() < deadline, "{}", t.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_portal_out_of_descriptors_backs_off_and_says_so_once() {
    // A limit of 200, and backing files opened beyond the reserve kept for them: the
    // connections the budget allows no longer all have a descriptor, so accept(2) fails.
    let t = Target::start_wrapped("ulimit -n 200 &&", &["--cores", "0"]);
    t.configure_default(16);
    for i in 0..80 {
        let f = t.dir.path().join(format!("f{i}.img"));
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        t.mgmt(
            "handlers/vdisk_fileio/mgmt",
            &format!("add_device f{i} filename={}", f.display()),
        );
    }
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(s) = TcpStream::connect(t.addr) {
            held.push(s);
        }
    }
    let failures = || t.log().matches("cannot accept on").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures() == 0 {
        assert!(
            Instant::now() < deadline,
            "accept(2) never failed\n{}",
            t.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Long enough for several more retries of accept(2) 100 ms apart: one line an episode.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(failures(), 1, "{}", t.log());
    // The RPC still answers, and once the connections go a login works.
    assert_eq!(t.get("targets/iscsi/enabled"), "1");
    drop(held);
    wait_for(&t, "targets/iscsi/connections", "0");
    let mut ini = login_with(&t, &[]);
    assert!(ini.test_unit_ready(0).unwrap().is_good());
}

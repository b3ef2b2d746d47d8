//! The logic of the fuzz targets, shared by the libFuzzer binaries (`fuzz/fuzz_targets/`) and
//! by `tests/fuzz_regressions.rs`, which replays every saved input through this very code on
//! the stable toolchain.
//!
//! Each entry point takes arbitrary bytes. It panics only when the code under test does: a
//! panic inside the crate, or a result that breaks an invariant checked here (a re-emitted
//! PDU that does not parse back, a login that completes without the CHAP it requires, a
//! connection that never settles, a data buffer that is never returned, a saved configuration
//! that does not load). libFuzzer's own limits catch hangs and unbounded allocation.
//!
//! Nothing here touches the file system or the network: devices are RAM disks, null devices
//! and an empty CD drive, and the connection runs over an in-memory socket.

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use iscsi_tgt::env::buf::MAX_TRANSFER;
use iscsi_tgt::env::{self, DataBuf, PoolConfig};
use iscsi_tgt::iscsi::chap::{self, Account, Algorithm};
use iscsi_tgt::iscsi::config::Publisher;
use iscsi_tgt::iscsi::conn::{split_task_tag, Conn, ConnCtx, Phase};
use iscsi_tgt::iscsi::engine::Shared;
use iscsi_tgt::iscsi::login::{
    self, Auth, Login, LoginRequestFields, LoginResponseFields, LoginStep, LoginTarget,
    TargetLookup,
};
use iscsi_tgt::iscsi::negotiate::{SessionParams, SessionType};
use iscsi_tgt::iscsi::param::{self, TargetParams};
use iscsi_tgt::iscsi::pdu::{self, Bhs, Pdu, BHS_LEN};
use iscsi_tgt::iscsi::registry::Registry;
use iscsi_tgt::iscsi::text;
use iscsi_tgt::mgmt::{Hooks, Mgmt};
use iscsi_tgt::net::mem::{MemGroup, MemSock};
use iscsi_tgt::net::SockGroup;
use iscsi_tgt::scsi::{self, mmc, DataDir, Device, Exec, ScsiPort, ScsiTask};

/// Reads fields off the fuzz input; past its end every read gives zeros.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// The process's buffer pool, on ordinary pages (never the host's hugepages).
fn init_pool() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when the pool exists already, which is as good.
        let _ = env::init(PoolConfig {
            mem_size_mb: 64,
            hugepages: false,
            memory: None,
        });
    });
}

/// Chunks of the pool in use (large, small).
fn buffers_in_use() -> (usize, usize) {
    let c = env::pool().counters();
    (c.chunks_in_use, c.small_in_use)
}

// ============================================================================ pdu

const TARGET: &str = "iqn.2026-01.org.fuzz:t";
const CHAP_TARGET: &str = "iqn.2026-01.org.fuzz:chap";
const INITIATOR: &str = "iqn.2026-01.org.fuzz:ini";
const CHAP_USER: &str = "joe";
const CHAP_SECRET: &str = "fuzz-secret-in";
const CHAP_OUT_USER: &str = "tgt";
const CHAP_OUT_SECRET: &str = "fuzz-secret-out";

/// PDU parsing: the first two bytes choose how the connection is driven, the rest is what
/// the initiator sends.
///
/// The rest goes through `Pdu::parse` (BHS and AHS) with the emit round trip checked, and
/// then through a whole connection (`Conn`) over an in-memory socket: login (or a login the
/// harness does first), full feature phase against a RAM disk, a null disk, a thin disk and
/// an empty CD drive, timers, and close. Mode byte:
/// - bit 0: log in first (the harness sends a valid Login Request, normal or discovery);
/// - bit 1: a discovery session instead of a normal one;
/// - bit 2, 3: offer HeaderDigest / DataDigest CRC32C in that login;
/// - bit 4: frame the input: the harness appends correct digests to each PDU it finds;
/// - bits 5-7: how many bytes each receive returns (1 to all).
///
/// Second byte: bits 0-1 the clock step per pass (0, 1 ms, 100 ms, 5 s), bits 2-3 how much
/// each send takes (all, 1, 100 bytes, 8 KiB),
/// bit 4 InitialR2T=Yes in the harness's login, bit 5 ImmediateData=No, bit 6 change the
/// target's LUNs once half the input is read, bit 7 delete the target then.
pub fn pdu(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mode2 = input.u8();
    let stream = input.rest();
    header(stream);
    connection(mode, mode2, stream);
}

/// The codec alone: the BHS view, `Pdu::parse` with the AHS the header announces and with
/// everything that follows, and emit.
fn header(data: &[u8]) {
    let Ok(view) = Bhs::new_checked(data) else {
        assert!(data.len() < BHS_LEN);
        return;
    };
    let _ = (view.immediate(), view.final_flag(), view.lun(), view.itt());
    let mut raw = [0u8; BHS_LEN];
    raw.copy_from_slice(&data[..BHS_LEN]);
    let rest = &data[BHS_LEN..];
    let announced = &rest[..view.total_ahs_length().min(rest.len())];
    for ahs in [announced, rest] {
        match Pdu::parse(&raw, ahs) {
            Ok(p) => round_trip(&raw, &p),
            Err(pdu::PduError::UnknownOpcode(op)) => assert_eq!(op, view.opcode()),
            Err(_) => {}
        }
    }
    let lun = pdu::decode_lun(view.lun());
    if lun < 16384 {
        assert_eq!(pdu::decode_lun(pdu::encode_lun(lun)), lun);
    }
}

/// Whatever parses re-emits to a header that parses again to the same PDU (up to the fields
/// a PDU type fixes on emit), and emitting that gives the same bytes.
fn round_trip(raw: &[u8; BHS_LEN], p: &Pdu) {
    let mut b1 = [0u8; BHS_LEN];
    p.emit(&mut b1);
    let a1 = p.ahs();
    assert_eq!(usize::from(b1[4]) * 4, a1.len(), "TotalAHSLength of {p:?}");
    assert_eq!(b1[0] & 0x3f, raw[0] & 0x3f, "opcode of {p:?}");
    assert_eq!(b1[5..8], raw[5..8], "DataSegmentLength of {p:?}");
    let p2 = match Pdu::parse(&b1, &a1) {
        Ok(p2) => p2,
        Err(e) => panic!("{p:?} emitted as {b1:02x?} {a1:02x?} does not parse: {e}"),
    };
    // Emit normalises what a PDU type fixes: the ITT of Reject and Async Message (always
    // 0xffffffff), the status of a Data-In without the S bit.
    if !matches!(p, Pdu::Reject(_) | Pdu::AsyncMessage(_) | Pdu::DataIn(_)) {
        assert_eq!(&p2, p, "parse(emit(p)) differs");
    }
    let mut b2 = [0u8; BHS_LEN];
    p2.emit(&mut b2);
    assert_eq!(b1, b2, "emit(parse(emit(p))) differs for {p:?}");
    assert_eq!(p2.ahs(), a1);
}

/// A Login Request PDU with `keys`, as bytes on the wire.
fn login_request_bytes(keys: &[(&str, &str)]) -> Vec<u8> {
    let data = text::encode(keys.iter().copied());
    let req = pdu::LoginRequest {
        transit: true,
        csg: login::OPERATIONAL,
        nsg: login::FULL_FEATURE,
        isid: [0x80, 0, 0, 0, 0, 1],
        itt: 0x1000,
        cmd_sn: 0,
        data_segment_length: data.len() as u32,
        ..Default::default()
    };
    let mut out = vec![0u8; BHS_LEN];
    let mut bhs = [0u8; BHS_LEN];
    req.emit(&mut bhs);
    out.copy_from_slice(&bhs);
    out.extend_from_slice(&data);
    out.resize(BHS_LEN + pdu::padded(data.len()), 0);
    out
}

/// Appends a CRC32C digest after each header and data segment of the PDUs in `stream`
/// (whose lengths come from their own headers): what an initiator that negotiated digests
/// sends. A trailing partial PDU is copied as it is.
fn add_digests(stream: &[u8], header: bool, data: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len() + stream.len() / 8);
    let mut rest = stream;
    while rest.len() >= BHS_LEN {
        let ahs = usize::from(rest[4]) * 4;
        let dsl = (usize::from(rest[5]) << 16) | (usize::from(rest[6]) << 8) | usize::from(rest[7]);
        let hdr_len = (BHS_LEN + ahs).min(rest.len());
        out.extend_from_slice(&rest[..hdr_len]);
        if header {
            out.extend_from_slice(&crc32c::crc32c(&rest[..hdr_len]).to_le_bytes());
        }
        rest = &rest[hdr_len..];
        let seg = pdu::padded(dsl).min(rest.len());
        out.extend_from_slice(&rest[..seg]);
        if data && dsl > 0 {
            out.extend_from_slice(&crc32c::crc32c(&rest[..seg]).to_le_bytes());
        }
        rest = &rest[seg..];
    }
    out.extend_from_slice(rest);
    out
}

/// The management tree the connection runs against: a normal target with four LUNs and a
/// CHAP-guarded one, made through the real mgmt commands.
fn fuzz_config() -> (Arc<Mgmt>, Arc<Publisher>, Arc<Registry>) {
    let publisher = Publisher::new();
    let registry = Registry::new();
    let m = Mgmt::new(publisher.clone(), registry.clone(), Hooks::default());
    let t = format!("targets/iscsi/{TARGET}");
    let c = format!("targets/iscsi/{CHAP_TARGET}");
    let steps: &[(&str, &str, bool)] = &[
        ("handlers/vdisk_ramio", "add_device r0 size_mb=1", true),
        (
            "handlers/vdisk_ramio",
            "add_device t0 size_mb=1; blocksize=4096; thin_provisioned=1",
            true,
        ),
        ("handlers/vdisk_nullio", "add_device n0", true),
        ("handlers/vcdrom", "add_device cd0", true),
        ("targets/iscsi", &format!("add_target {TARGET}"), true),
        (&format!("{t}/luns"), "add r0 0", true),
        (&format!("{t}/luns"), "add n0 1 read_only=1", true),
        (&format!("{t}/luns"), "add t0 2", true),
        (&format!("{t}/luns"), "add cd0 3", true),
        (&format!("{t}/HeaderDigest"), "None,CRC32C", false),
        (&format!("{t}/DataDigest"), "None,CRC32C", false),
        (&format!("{t}/enabled"), "1", false),
        ("targets/iscsi", &format!("add_target {CHAP_TARGET}"), true),
        (&format!("{c}/luns"), "add r0 0", true),
        (
            "targets/iscsi",
            &format!("add_target_attribute {CHAP_TARGET} IncomingUser {CHAP_USER} {CHAP_SECRET}"),
            true,
        ),
        (
            "targets/iscsi",
            &format!(
                "add_target_attribute {CHAP_TARGET} OutgoingUser {CHAP_OUT_USER} {CHAP_OUT_SECRET}"
            ),
            true,
        ),
        (&format!("{c}/enabled"), "1", false),
        ("targets/iscsi/enabled", "1", false),
    ];
    for (path, arg, is_mgmt) in steps {
        let r = if *is_mgmt {
            m.mgmt(path, arg)
        } else {
            m.set(path, arg)
        };
        if let Err(e) = r {
            panic!("harness configuration {path} {arg}: {e}");
        }
    }
    (m, publisher, registry)
}

/// The management changes of mode bits 6 and 7, while the session runs.
fn reconfigure(m: &Mgmt, mode2: u8) {
    let luns = format!("targets/iscsi/{TARGET}/luns");
    let changes: &[(&str, &str)] = if mode2 & 0x80 != 0 {
        &[("targets/iscsi", &format!("del_target {TARGET}"))]
    } else {
        &[
            (&luns, "del 2"),
            (&luns, "replace t0 0"),
            (&luns, "add r0 9"),
        ]
    };
    for (path, command) in changes {
        if let Err(e) = m.mgmt(path, command) {
            panic!("harness reconfiguration {path} {command}: {e}");
        }
    }
}

/// Passes of the receive/complete/flush loop before the connection counts as hung.
const MAX_PASSES: usize = 200_000;

fn connection(mode: u8, mode2: u8, stream: &[u8]) {
    init_pool();
    let before = buffers_in_use();
    let (m, publisher, registry) = fuzz_config();
    let mut snap = publisher.current();
    let mut reconfigured = mode2 & 0xc0 == 0;
    let shared = Shared::new(
        publisher.clone(),
        registry.clone(),
        vec![SocketAddr::from(([127, 0, 0, 1], 3260))],
        1,
        usize::MAX,
    );
    let (hd, dd) = (mode & 0x04 != 0, mode & 0x08 != 0);
    let mut wire = Vec::new();
    if mode & 0x01 != 0 {
        let digest = |on: bool| if on { "CRC32C" } else { "None" };
        let mut keys = vec![("InitiatorName", INITIATOR)];
        if mode & 0x02 != 0 {
            keys.push(("SessionType", "Discovery"));
        } else {
            keys.push(("TargetName", TARGET));
        }
        keys.extend([
            ("HeaderDigest", digest(hd)),
            ("DataDigest", digest(dd)),
            ("InitialR2T", if mode2 & 0x10 != 0 { "Yes" } else { "No" }),
            (
                "ImmediateData",
                if mode2 & 0x20 != 0 { "No" } else { "Yes" },
            ),
            ("MaxRecvDataSegmentLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxOutstandingR2T", "4"),
        ]);
        wire = login_request_bytes(&keys);
    }
    if mode & 0x10 != 0 && mode & 0x01 != 0 && (hd || dd) {
        wire.extend(add_digests(stream, hd, dd));
    } else {
        wire.extend_from_slice(stream);
    }
    let chunk = [usize::MAX, 1, 7, 48, 100, 1000, 4096, 65536][usize::from(mode >> 5)];
    let send_chunk = [usize::MAX, 1, 100, 8192][usize::from((mode2 >> 2) & 3)];
    let step = [0, 1, 100, 5000][usize::from(mode2 & 3)];
    let mut net = MemGroup::new();
    let sock = net.add(MemSock {
        chunk,
        send_chunk,
        ..MemSock::new(wire)
    });
    let start = Instant::now();
    let mut now = start;
    let mut port = ScsiPort::new();
    let mut conn = Conn::new(sock, net.addrs(sock), 0, now);
    let mut completions = Vec::new();
    let mut settled = false;
    for pass in 0..MAX_PASSES {
        let (eof, half) = {
            let s = mem_sock(&mut net, sock);
            (s.pos == s.input.len(), s.pos >= s.input.len() / 2)
        };
        if half && !reconfigured {
            reconfigured = true;
            reconfigure(&m, mode2);
            snap = publisher.current();
            let mut cx = ConnCtx {
                now,
                snapshot: &snap,
                shared: &shared,
                port: &mut port,
                net: &mut net,
                index: 0,
            };
            conn.on_snapshot(&snap, &mut cx);
        }
        let mut cx = ConnCtx {
            now,
            snapshot: &snap,
            shared: &shared,
            port: &mut port,
            net: &mut net,
            index: 0,
        };
        let mut did = conn.on_readable(&mut cx);
        if let Some((scope, itt)) = conn.take_tmf() {
            // The one reactor applies it, then answers.
            conn.apply_abort(&scope, &mut cx);
            conn.tmf_done(itt, &mut cx);
            did = true;
        }
        completions.clear();
        if cx.port.poll(&mut completions) > 0 {
            did = true;
            for c in completions.drain(..) {
                let (idx, slot) = split_task_tag(c.tag());
                assert_eq!(idx, 0, "a completion for another connection");
                conn.on_completion(slot, c, &mut cx);
            }
        }
        if conn.has_buf_waiters() {
            did |= conn.retry_buffers(&mut cx);
        }
        conn.flush(&mut cx);
        if pass % 16 == 0 {
            conn.on_timer(&mut cx);
        }
        now += Duration::from_millis(step);
        if conn.phase() == Phase::Closed && cx.port.inflight() == 0 {
            settled = true;
            break;
        }
        if !did && !conn.rx_more() && cx.port.inflight() == 0 {
            if eof {
                // Everything was read and answered: now the peer goes away.
                let s = mem_sock(&mut net, sock);
                if s.eof {
                    settled = true;
                    break;
                }
                s.eof = true;
            } else if step == 0 {
                // Nothing moves and the input is not over: the connection waits for
                // something that will not come (a digest, say). That is not a hang.
                settled = true;
                break;
            }
        }
    }
    assert!(
        settled,
        "the connection did not settle in {MAX_PASSES} passes"
    );
    // Much later: login timeout, RspTimeout and NOP-In all fire, then close.
    let mut cx = ConnCtx {
        now: now + Duration::from_secs(3600),
        snapshot: &snap,
        shared: &shared,
        port: &mut port,
        net: &mut net,
        index: 0,
    };
    conn.on_timer(&mut cx);
    conn.flush(&mut cx);
    conn.close(&mut cx, "fuzz input over");
    // Backend I/O still in flight comes back, and its buffers with it.
    let mut rounds = 0;
    while cx.port.inflight() > 0 {
        rounds += 1;
        assert!(rounds < 1000, "backend I/O never completes");
        completions.clear();
        cx.port.poll(&mut completions);
        for c in completions.drain(..) {
            let (_, slot) = split_task_tag(c.tag());
            conn.on_completion(slot, c, &mut cx);
        }
    }
    assert!(conn.is_finished(), "closed connection still holds tasks");
    for t in [TARGET, CHAP_TARGET] {
        assert!(
            registry.sessions(t).is_empty(),
            "a session of {t} outlives its connection"
        );
    }
    drop(conn);
    drop(port);
    assert_eq!(
        buffers_in_use(),
        before,
        "data buffers (large, small) not returned to the pool"
    );
}

fn mem_sock(net: &mut MemGroup, sock: iscsi_tgt::net::SockId) -> &mut MemSock {
    match net.sock_mut(sock) {
        Some(s) => s,
        None => unreachable!("the harness made the socket"),
    }
}

// ============================================================================ login

/// What the login's `TargetLookup` knows: one target (plain, CHAP-guarded, redirected or
/// full) and the discovery accounts.
struct FuzzLookup {
    params: TargetParams,
    auth: Auth,
    redirect: Option<(String, bool)>,
    sessions_full: bool,
    session_exists: bool,
    discovery: Auth,
}

impl TargetLookup for FuzzLookup {
    fn target(&self, name: &str, _initiator: &str, _isid: [u8; 6]) -> Option<LoginTarget> {
        (name == TARGET).then(|| LoginTarget {
            params: self.params.clone(),
            alias: "fuzz".into(),
            auth: self.auth.clone(),
            redirect: self.redirect.clone(),
            sessions_full: self.sessions_full,
        })
    }

    fn discovery_auth(&self) -> Auth {
        self.discovery.clone()
    }

    fn session_exists(&self, _isid: [u8; 6], _tsih: u16) -> bool {
        self.session_exists
    }
}

fn account(user: &str, secret: &str) -> Account {
    Account {
        user: user.into(),
        secret: secret.into(),
    }
}

/// Values for the target's parameters: numbers at and around the limits, and the words.
const PARAM_VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "511",
    "512",
    "4096",
    "65536",
    "1048576",
    "1048577",
    "16777215",
    "Yes",
    "No",
    "None",
    "CRC32C",
    "CRC32C,None",
    "None,CRC32C",
    ":default:",
];

/// The login state machine (`Login::step`), key negotiation and CHAP, and the Text Request
/// answers (`login::text_request`).
///
/// Byte 0 sets up the target: bits 0-1 its CHAP accounts (none, incoming, incoming and
/// outgoing, outgoing reusing the incoming secret), bit 2 a redirection, bit 3 MaxSessions
/// reached, bit 4 a running session for any TSIH, bit 5 CHAP on discovery too, bit 7 text
/// request mode (the rest is a Text Request's data). Byte 1 counts target parameters to set,
/// two bytes each (name, value). Then login requests: a flags byte (T, C, CSG, NSG), a byte
/// of oddities (bit 0 version 1, bit 1 another ISID, bit 2 a TSIH, bit 3 another CID, bit 4
/// answer the CHAP challenge of the last response correctly), a 16-bit length and the text.
pub fn login(data: &[u8]) {
    let mut input = Input::new(data);
    let setup = input.u8();
    if setup & 0x80 != 0 {
        text_request(setup, input.rest());
        return;
    }
    let incoming = vec![account(CHAP_USER, CHAP_SECRET)];
    let auth = match setup & 3 {
        0 => Auth::default(),
        1 => Auth {
            incoming,
            outgoing: None,
        },
        2 => Auth {
            incoming,
            outgoing: Some(account(CHAP_OUT_USER, CHAP_OUT_SECRET)),
        },
        _ => Auth {
            incoming,
            outgoing: Some(account(CHAP_OUT_USER, CHAP_SECRET)),
        },
    };
    let mut params = TargetParams::default();
    for _ in 0..input.u8() % 8 {
        let name = param::NAMES[usize::from(input.u8()) % param::NAMES.len()];
        let value = PARAM_VALUES[usize::from(input.u8()) % PARAM_VALUES.len()];
        // Values out of range are refused, as the tree refuses them.
        let _ = params.set(name, value);
    }
    let lookup = FuzzLookup {
        params,
        auth: auth.clone(),
        redirect: (setup & 0x04 != 0).then(|| ("127.0.0.2:3260,1".to_string(), setup & 1 != 0)),
        sessions_full: setup & 0x08 != 0,
        session_exists: setup & 0x10 != 0,
        discovery: if setup & 0x20 != 0 {
            auth
        } else {
            Auth::default()
        },
    };
    let mut l = Login::new("127.0.0.1:3260".into());
    let mut last: Option<LoginResponseFields> = None;
    let mut ended = false;
    for _ in 0..16 {
        if input.is_empty() {
            break;
        }
        let flags = input.u8();
        let odd = input.u8();
        let len = usize::from(input.u16());
        let mut data = input.bytes(len).to_vec();
        if odd & 0x10 != 0 {
            if let Some(r) = &last {
                answer_chap(r, &mut data);
            }
        }
        let req = LoginRequestFields {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
            version_max: 0,
            version_min: odd & 1,
            isid: [0x80, 0, 0, 0, 0, 1 + ((odd >> 1) & 1)],
            tsih: u16::from(odd & 0x04 != 0),
            itt: 7,
            cid: u16::from(odd & 0x08 != 0),
            cmd_sn: 1,
            exp_stat_sn: 0,
            data,
        };
        let step = l.step(&req, &lookup);
        let r = match &step {
            LoginStep::Continue(r) | LoginStep::Complete(r, _) | LoginStep::Fail(r) => r,
        };
        assert_eq!(
            (r.itt, r.isid),
            (req.itt, req.isid),
            "response names the request"
        );
        if let Err(e) = text::parse(&r.data) {
            panic!("login response text does not parse: {e}: {:?}", r.data);
        }
        match &step {
            _ if ended => assert!(
                matches!(step, LoginStep::Fail(_)),
                "a login that ended goes on: {step:?}"
            ),
            LoginStep::Continue(r) => {
                assert_eq!(r.status_class, 0, "{step:?}");
                if r.transit {
                    assert!(r.nsg > r.csg && r.nsg != 2, "{step:?}");
                }
            }
            LoginStep::Fail(r) => {
                assert_ne!(r.status_class, 0, "{step:?}");
                ended = true;
            }
            LoginStep::Complete(r, p) => {
                assert!(r.status_class == 0 && r.transit && r.nsg == login::FULL_FEATURE);
                check_session(p, &l, &lookup);
                ended = true;
            }
        }
        last = Some(r.clone());
    }
}

/// What a completed login must have settled.
fn check_session(p: &SessionParams, l: &Login, lookup: &FuzzLookup) {
    assert!(!p.initiator_name.is_empty());
    let auth = match p.session_type {
        SessionType::Normal => {
            assert_eq!(
                p.target_name, TARGET,
                "logged in to a target that is not there"
            );
            assert!(lookup.redirect.is_none() && !lookup.sessions_full);
            &lookup.auth
        }
        SessionType::Discovery => &lookup.discovery,
    };
    if !auth.incoming.is_empty() {
        let user = l.chap_user();
        assert!(
            auth.incoming.iter().any(|a| Some(a.user.as_str()) == user),
            "logged in to a CHAP-guarded target without authenticating"
        );
    }
    assert!(p.max_burst_length >= 512 && p.first_burst_length <= p.max_burst_length);
    assert!(p.max_xmit_data_segment_length >= 512);
    assert!(p.max_outstanding_r2t >= 1);
    assert_eq!((p.max_connections, p.error_recovery_level), (1, 0));
}

/// Appends the initiator's correct CHAP answer to the challenge in `r`, if it has one.
fn answer_chap(r: &LoginResponseFields, data: &mut Vec<u8>) {
    let Ok(keys) = text::parse(&r.data) else {
        return;
    };
    let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
    let (Some(a), Some(i), Some(c)) = (get("CHAP_A"), get("CHAP_I"), get("CHAP_C")) else {
        return;
    };
    let (Some(alg), Ok(id), Some(challenge)) = (
        Algorithm::from_code(a),
        i.parse::<u8>(),
        chap::decode_binary(c),
    ) else {
        return;
    };
    let resp = chap::encode_hex(&alg.response(id, CHAP_SECRET.as_bytes(), &challenge));
    if data.last().is_some_and(|&b| b != 0) {
        data.push(0);
    }
    data.extend(text::encode([
        ("CHAP_N", CHAP_USER),
        ("CHAP_R", resp.as_str()),
    ]));
}

fn text_request(setup: u8, data: &[u8]) {
    let targets = vec![
        (TARGET.to_string(), vec!["127.0.0.1:3260,1".to_string()]),
        (CHAP_TARGET.to_string(), vec![]),
        (
            "iqn.2026-01.org.fuzz:other".to_string(),
            vec!["[::1]:3260,1".to_string(), "127.0.0.1:3261,2".to_string()],
        ),
    ];
    let (session_type, current) = match setup & 3 {
        0 => (SessionType::Discovery, None),
        1 => (SessionType::Normal, Some(TARGET)),
        2 => (SessionType::Normal, Some("iqn.2026-01.org.fuzz:gone")),
        _ => (SessionType::Normal, None),
    };
    let Ok(out) = login::text_request(data, session_type, current, &targets) else {
        return;
    };
    let keys = match text::parse(&out) {
        Ok(k) => k,
        Err(e) => panic!("text response does not parse: {e}"),
    };
    for (k, v) in keys {
        // A TargetName the initiator sent is answered NotUnderstood; any other names one of
        // the targets.
        if k == "TargetName" && v != "NotUnderstood" {
            assert!(targets.iter().any(|(n, _)| *n == v), "unknown target {v}");
        }
    }
}

// ============================================================================ cdb

/// Every operation code the SCSI core knows, so that each is reached from one byte.
const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x2a, 0x2e, 0x2f, 0x34, 0x35,
    0x41, 0x42, 0x43, 0x46, 0x4a, 0x51, 0x5a, 0x88, 0x89, 0x8a, 0x8b, 0x8e, 0x8f, 0x90, 0x91, 0x93,
    0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae, 0xaf, 0xbd,
];

/// SCSI command decoding and execution (`scsi::plan`, `ScsiPort::execute`, `complete`,
/// `execute_no_lun`) on one device, several commands in a row so that state (unit
/// attentions, prevented removal, an ejected medium, written blocks) carries over.
///
/// Byte 0: bits 0-1 the device (RAM disk of 512-byte blocks, thin RAM disk of 4096-byte
/// blocks, null disk of 2.5 TiB, empty CD drive), bit 2 read-only, bit 3 removable, bit 4 a
/// pending unit attention for the nexus, bit 5 the LUN mapped read-only. Then commands: an
/// opcode byte (an index into the table of supported opcodes, or the raw byte that follows),
/// a CDB length byte, 15 more CDB bytes, a flags byte (how the transport states the Data-Out
/// length, and whether it limits a write), a 16-bit length and the Data-Out payload.
pub fn cdb(data: &[u8]) {
    init_pool();
    let before = buffers_in_use();
    let mut input = Input::new(data);
    let setup = input.u8();
    let ro = if setup & 0x04 != 0 { "1" } else { "0" };
    let rm = if setup & 0x08 != 0 { "1" } else { "0" };
    let p = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut params = p(&[("read_only", ro), ("removable", rm)]);
    if setup & 0x40 != 0 {
        // A T10 device identifier as an administrator may give it.
        let n = usize::from(input.u8());
        let id = String::from_utf8_lossy(input.bytes(n)).into_owned();
        params.push(("t10_dev_id".into(), id));
    }
    let dev = match setup & 3 {
        0 => {
            params.extend(p(&[("size_mb", "1")]));
            Device::create("vdisk_ramio", "r0", &params)
        }
        1 => {
            params.extend(p(&[
                ("size_mb", "1"),
                ("blocksize", "4096"),
                ("thin_provisioned", "1"),
            ]));
            Device::create("vdisk_ramio", "t0", &params)
        }
        2 => Device::create("vdisk_nullio", "n0", &params),
        _ => Device::create("vcdrom", "cd0", &[]),
    };
    let Ok(dev) = dev else {
        // Refused parameters (a T10 identifier that is too long, say).
        return;
    };
    let nexus = 0x0001_8000_0000_0001;
    let pr_nexus = scsi::pr::Nexus::new("iqn.2026-01.fuzz:initiator", [0x40, 0, 0, 0, 0, 1], 1);
    if setup & 0x10 != 0 {
        dev.register_nexus(nexus, &pr_nexus);
    }
    let target_name: Arc<str> = Arc::from(TARGET);
    let mut port = ScsiPort::new();
    for tag in 0..16u64 {
        if input.is_empty() {
            break;
        }
        let sel = input.u8();
        let op = match OPCODES.get(usize::from(sel)) {
            Some(&op) => op,
            None => input.u8(),
        };
        let len_sel = input.u8();
        let cdb_len = match len_sel % 8 {
            0 => 6,
            1 => 10,
            2 => 12,
            3 | 4 => 16,
            _ => usize::from(len_sel >> 3),
        };
        let mut cdb = vec![op];
        cdb.extend_from_slice(input.bytes(15));
        cdb.resize(cdb_len.max(1), 0);
        let flags = input.u8();
        let payload_len = usize::from(input.u16());
        let payload = input.bytes(payload_len);
        let mut task = ScsiTask::new(&cdb, 0, nexus);
        task.tag = tag;
        task.read_only = setup & 0x20 != 0;
        task.target_name = Some(target_name.clone());
        task.data_out_len = match flags & 3 {
            0 => None,
            1 => Some(payload.len() as u32),
            _ => Some(u32::from(input.u16()) * 512),
        };
        no_lun(&cdb);
        mmc_pages(&task.cdb, flags);
        let plan = match scsi::plan(&dev, &mut task, &pr_nexus) {
            Ok(plan) => plan,
            Err(sense) => {
                // A refused command leaves the task as it was: the caller ends it.
                assert_eq!(task.status, scsi::task::STATUS_GOOD);
                assert_eq!(task.sense_len(), 0);
                assert_ne!(
                    sense.key,
                    scsi::sense::NO_SENSE,
                    "refused without a sense key"
                );
                continue;
            }
        };
        assert!(
            plan.len as usize <= MAX_TRANSFER,
            "opcode {op:#04x}: a plan of {} bytes, more than any buffer holds",
            plan.len
        );
        if plan.len > 0 {
            // The transport allocates what the plan asks and delivers the Data-Out it
            // received.
            let Some(mut buf) = DataBuf::alloc(plan.len as usize) else {
                panic!("no buffer of {} bytes", plan.len);
            };
            if plan.dir == DataDir::Out {
                let n = payload.len().min(buf.len());
                buf.write_at(0, &payload[..n]);
                buf.fill(n, buf.len() - n, 0);
                if flags & 0x04 != 0 {
                    let _ = task.limit_write(n as u32, dev.block_size());
                }
            }
            task.buf = Some(buf);
        }
        if scsi::execute_reservation(&dev, &mut task, &pr_nexus).is_some() {
            // Run for the nexus, at once.
        } else if port.execute(&dev, &mut task) == Exec::Pending {
            let mut out = Vec::new();
            let mut polls = 0;
            while out.is_empty() {
                polls += 1;
                assert!(polls < 64, "opcode {op:#04x}: the completion never comes");
                port.poll(&mut out);
            }
            assert_eq!(out.len(), 1, "one command, one completion");
            let Some(c) = out.pop() else { return };
            assert_eq!(c.tag(), tag);
            scsi::complete(&mut task, c);
        }
        match task.status {
            scsi::task::STATUS_GOOD => {
                let have = task.buf.as_ref().map_or(0, |b| b.len());
                assert!(
                    task.data_in_len as usize <= have,
                    "opcode {op:#04x}: {} bytes of Data-In in a buffer of {have}",
                    task.data_in_len
                );
                check_data_in(&task);
            }
            scsi::task::STATUS_CHECK_CONDITION => assert!(task.sense_len() > 0),
            _ => {}
        }
    }
    assert_eq!(port.inflight(), 0);
    drop(port);
    assert_eq!(buffers_in_use(), before, "data buffers not returned");
}

/// The length fields of emulated Data-In that came back whole (shorter than the allocation
/// length): they must count exactly the bytes that follow them, and the designators of the
/// Device Identification VPD page must tile it.
fn check_data_in(task: &ScsiTask) {
    let c = task.cdb;
    let be16 = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let vpd = c[0] == 0x12 && c[1] & 1 != 0;
    // The allocation length, and the size of the header before the data its length counts.
    let (alloc, header) = match c[0] {
        0x12 if vpd => (be16(&c[3..5]), 4),
        0x12 => (be16(&c[3..5]), 5),
        0x1a => (usize::from(c[4]), 1),
        0x5a => (be16(&c[7..9]), 2),
        0xa0 => (be32(&c[6..10]), 8),
        _ => return,
    };
    let n = task.data_in_len as usize;
    if n >= alloc || n < header {
        return;
    }
    let mut d = vec![0u8; n];
    if let Some(b) = &task.buf {
        b.read_at(0, &mut d);
    }
    let counted = match c[0] {
        0x12 if vpd => be16(&d[2..4]),
        0x12 => usize::from(d[4]),
        0x1a => usize::from(d[0]),
        0x5a => be16(&d[0..2]),
        _ => be32(&d[0..4]),
    };
    assert_eq!(
        counted + header,
        n,
        "opcode {:#04x}: the length field does not count the data: {d:02x?}",
        c[0]
    );
    if vpd && c[2] == 0x83 {
        let mut at = 4;
        while at + 4 <= n {
            at += 4 + usize::from(d[at + 3]);
        }
        assert_eq!(at, n, "designators overrun the page: {d:02x?}");
    }
}

/// The CD-ROM pages MMC builds from a CDB alone, for a drive with or without a disc (of up
/// to four million blocks, any size a medium has): their length fields count what follows.
fn mmc_pages(cdb: &[u8; 16], flags: u8) {
    let drive = mmc::Drive {
        medium_present: flags & 0x10 != 0,
        prevented: flags & 0x20 != 0,
        blocks: u64::from(u16::from_be_bytes([cdb[12], cdb[13]])) * 64,
    };
    let be16 = |d: &[u8]| usize::from(u16::from_be_bytes([d[0], d[1]]));
    let alloc = be16(&cdb[7..9]);
    let whole = |d: &[u8], header: usize, counted: usize| {
        if d.len() < alloc && d.len() >= header {
            assert_eq!(
                counted + header,
                d.len(),
                "MMC page {:02x?}: {d:02x?}",
                cdb[0]
            );
        }
    };
    if let Ok(d) = mmc::read_toc(cdb, drive.blocks) {
        whole(&d, 2, if d.len() >= 2 { be16(&d) } else { 0 });
    }
    if let Ok(d) = mmc::get_configuration(cdb, &drive) {
        let n = d
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        whole(&d, 4, n);
    }
    let event = [
        mmc::MediaEvent::NoChange,
        mmc::MediaEvent::NewMedia,
        mmc::MediaEvent::MediaRemoval,
    ][usize::from(flags >> 6) % 3];
    if let Ok(d) = mmc::get_event_status(cdb, &drive, event) {
        whole(&d, 2, if d.len() >= 2 { be16(&d) } else { 0 });
    }
    if let Ok(d) = mmc::read_disc_information(cdb) {
        whole(&d, 2, if d.len() >= 2 { be16(&d) } else { 0 });
    }
    let d = mmc::mechanism_status(cdb, &drive);
    assert!(d.len() <= 8);
}

/// The same CDB addressed to a LUN that does not exist.
fn no_lun(cdb: &[u8]) {
    let mut t = ScsiTask::new(cdb, 7, 1);
    t.buf = DataBuf::alloc(4096);
    scsi::execute_no_lun(&mut t, &[0, 1, 255, 256, 16383]);
    let have = t.buf.as_ref().map_or(0, |b| b.len());
    assert!(t.data_in_len as usize <= have);
}

// ============================================================================ mgmt

/// The largest RAM disk the harness lets a command create (bytes).
const MAX_RAM: u64 = 4 << 20;

/// The management tree's grammar: `Mgmt::mgmt`, `set`, `get`, `ls`, `tree` from lines of
/// text (`mgmt PATH COMMAND`, `set PATH VALUE`, `get PATH`, `ls PATH`, `tree PATH`), or
/// `load_config` when the input is a JSON value. Then the configuration is saved, loaded
/// into a new tree and saved again: the two must agree.
///
/// The fuzzer must not create or open files nor allocate large RAM disks, so the harness
/// skips inputs that mention `filename` (file-backed devices and CD media) and inputs that
/// would create a device larger than [`MAX_RAM`] (any `size=`/`size_mb=` value above it).
pub fn mgmt(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if text.contains("filename") {
        return;
    }
    let m = Mgmt::new(Publisher::new(), Registry::new(), Hooks::default());
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let Ok(cfg) = serde_json::from_str::<serde_json::Value>(trimmed) else {
            return;
        };
        if !json_allowed(&cfg) {
            return;
        }
        if m.load_config(&cfg).is_ok() {
            check_loaded(&cfg, &m.save_config());
        }
    } else {
        for line in text.lines() {
            let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
            let (path, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            match op {
                "mgmt" if sizes_allowed(arg) => {
                    let _ = m.mgmt(path, arg);
                }
                "set" if sizes_allowed(arg) => {
                    let _ = m.set(path, arg);
                }
                "get" => {
                    let _ = m.get(path);
                }
                "ls" => {
                    let _ = m.ls(path);
                }
                "tree" => {
                    let _ = m.tree(path);
                }
                _ => {}
            }
        }
    }
    let saved = m.save_config();
    let again = Mgmt::new(Publisher::new(), Registry::new(), Hooks::default());
    if let Err(e) = again.load_config(&saved) {
        panic!("a saved configuration does not load: {e}\n{saved:#}");
    }
    assert_eq!(again.save_config(), saved, "save(load(save)) differs");
    assert_eq!(
        tree(&again),
        tree(&m),
        "the loaded tree differs from the saved one"
    );
}

/// A configuration that loads makes what it says, no more: each device under its own name
/// with only the parameters it lists, each LUN where it says.
fn check_loaded(cfg: &serde_json::Value, saved: &serde_json::Value) {
    use serde_json::Value;
    let obj = |v: Option<&Value>| v.and_then(Value::as_object).cloned().unwrap_or_default();
    for (handler, devs) in obj(cfg.get("handlers")) {
        for (name, attrs) in obj(Some(&devs)) {
            let Some(got) = saved["handlers"][&handler].get(&name) else {
                panic!("device {name:?} of the configuration was not made under that name");
            };
            for k in obj(Some(got)).keys() {
                assert!(
                    attrs.get(k).is_some(),
                    "device {name:?} has {k} though its configuration does not set it"
                );
            }
        }
    }
    let targets = obj(cfg.pointer("/targets/iscsi/targets"));
    for (name, t) in targets {
        let wanted: Vec<u64> = obj(t.get("luns"))
            .keys()
            .filter_map(|l| l.parse().ok())
            .collect();
        let luns = obj(saved["targets"]["iscsi"]["targets"][&name].get("luns"));
        for l in luns.keys() {
            let l: u64 = l.parse().unwrap_or(u64::MAX);
            assert!(
                wanted.contains(&l),
                "target {name} has LUN {l} though its configuration does not list it"
            );
        }
    }
}

/// The whole tree but the targets' `tid`, which numbers targets in the order they were added
/// (a loaded configuration adds them in name order).
fn tree(m: &Mgmt) -> serde_json::Value {
    let mut t = match m.tree("") {
        Ok(t) => t,
        Err(e) => panic!("the whole tree cannot be read: {e}"),
    };
    if let Some(targets) = t
        .pointer_mut("/targets/iscsi")
        .and_then(serde_json::Value::as_object_mut)
    {
        for v in targets.values_mut() {
            if let Some(o) = v.as_object_mut() {
                o.remove("tid");
            }
        }
    }
    t
}

/// Whether every `key=value` in `s` whose key is `size` or `size_mb` stays within
/// [`MAX_RAM`]. Every '=' is looked at with the word before it, so a value hides nowhere.
fn sizes_allowed(s: &str) -> bool {
    for (i, _) in s.match_indices('=') {
        let key = s[..i]
            .trim_end()
            .rsplit(|c: char| c.is_whitespace() || c == ';' || c == '=')
            .next()
            .unwrap_or("");
        let value = s[i + 1..].split(';').next().unwrap_or("").trim();
        let limit = match key {
            "size" => MAX_RAM,
            "size_mb" => MAX_RAM >> 20,
            _ => continue,
        };
        if value.parse::<u64>().is_ok_and(|n| n > limit) {
            return false;
        }
    }
    true
}

/// The same for a configuration: no `filename` anywhere and no large size, whether as an
/// attribute or hidden in a name or value that ends up inside an `add_device` command.
fn json_allowed(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    let ok = |s: &str| !s.contains("filename") && sizes_allowed(s);
    match v {
        Value::String(s) => ok(s),
        Value::Array(a) => a.iter().all(json_allowed),
        Value::Object(o) => o.iter().all(|(k, x)| {
            let as_text = match x {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => u8::from(*b).to_string(),
                _ => String::new(),
            };
            ok(k) && ok(&format!("{k}={as_text}")) && json_allowed(x)
        }),
        _ => true,
    }
}

/// The RPC stream: the first byte picks how the rest is cut into reads. The framer must find
/// the same requests (and the same error) however the stream is split, examine each byte at
/// most once, and hand out only whole objects or arrays; every request it finds is answered
/// by the RPC layer on a fresh tree (file names and large sizes skipped, as for `mgmt`),
/// with answers that are JSON-RPC 2.0 objects whose error messages stay short.
pub fn rpc(data: &[u8]) {
    use iscsi_tgt::rpc::frame::Framer;
    const LIMIT: usize = 4096;
    let mut input = Input::new(data);
    let cut = usize::from(input.u8() % 17) + 1;
    let stream = input.rest();
    // Every value (or the error that ends the stream) of a framer fed `chunks`.
    let frames = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut f = Framer::new(LIMIT);
        let mut out: Vec<Result<Vec<u8>, String>> = Vec::new();
        let mut pushed = 0u64;
        'feed: for c in chunks {
            f.push(c);
            pushed += c.len() as u64;
            loop {
                match f.next_value() {
                    Ok(Some(v)) => out.push(Ok(v.to_vec())),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e.to_string()));
                        break 'feed;
                    }
                }
            }
        }
        assert!(
            f.examined() <= pushed,
            "{} bytes examined of {pushed}",
            f.examined()
        );
        out
    };
    let split = frames(&mut stream.chunks(cut));
    let whole = frames(&mut std::iter::once(stream));
    assert_eq!(
        split, whole,
        "the framing depends on how the stream was read"
    );
    let m = Mgmt::new(Publisher::new(), Registry::new(), Hooks::default());
    for v in split.into_iter().flatten() {
        assert!(
            matches!(v.first(), Some(b'{' | b'[')) && matches!(v.last(), Some(b'}' | b']')),
            "a value that is no object or array: {:?}",
            String::from_utf8_lossy(&v)
        );
        let Ok(req) = serde_json::from_slice::<serde_json::Value>(&v) else {
            continue;
        };
        if !json_allowed(&req) {
            continue;
        }
        let Some(answer) = iscsi_tgt::rpc::handle(&m, req) else {
            continue;
        };
        let answers = match &answer {
            serde_json::Value::Array(a) => a.clone(),
            one => vec![one.clone()],
        };
        for a in answers {
            assert_eq!(a["jsonrpc"], "2.0", "{a}");
            if let Some(msg) = a["error"]["message"].as_str() {
                assert!(msg.len() <= 1024, "an error message of {} bytes", msg.len());
            }
        }
    }
}

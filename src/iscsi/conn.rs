//! One iSCSI connection (RFC 7143): login, then full feature phase with its command window,
//! Data-Out/R2T sequencing, Data-In with phase collapse, NOP, text, logout and task
//! management. A connection is owned by one reactor; the reactor drives it with readiness
//! events, backend completions and the clock, so everything here runs without locks.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::env::DataBuf;
use crate::iscsi::config::{Snapshot, TargetConfig};
use crate::iscsi::engine::Shared;
use crate::iscsi::login::{Login, LoginRequestFields, LoginStep, LoginTarget, TargetLookup};
use crate::iscsi::negotiate::{SessionParams, SessionType};
use crate::iscsi::pdu::{self, Pdu, BHS_LEN};
use crate::iscsi::registry::{ConnInfo, SessionInfo};
use crate::iscsi::rx::{self, Fill, Staging};
use crate::iscsi::seq;
use crate::iscsi::task::{self, R2t, Task, TaskState, Tasks};
use crate::iscsi::tx::{TxData, TxPdu, TxQueue};
use crate::net::{SockGroup, SockId};
use crate::scsi::{self, Exec, ScsiPort, ScsiTask};

/// RFC 7143 §13.12: the default MaxRecvDataSegmentLength, in force during login.
const LOGIN_MAX_DATA: usize = 8192;
/// How long a login may take before the connection is dropped.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection may stay silent: initiators send their Login Request as soon as
/// they connect, and idle connections must not hold the connection limit for long.
const SILENT_LIMIT: Duration = Duration::from_secs(10);
/// How long a connection that is closing may wait for the initiator to read what is left.
const CLOSING_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A connection stops reading while this much of its queued output is held in its own memory
/// (NOP-In echoes, text and reject answers, sense data): a peer that sends and never reads
/// cannot make it grow without bound. Data-In comes from the commands' pool buffers, which the
/// session's share bounds instead.
const OWNED_BACKLOG_LIMIT: usize = 1 << 20;
/// How many PDUs one readiness event may process before other connections get their turn.
const RX_BUDGET: usize = 64;

pub use crate::scsi::exec::{STATUS_CHECK_CONDITION, STATUS_GOOD, STATUS_TASK_SET_FULL};

/// How long a command may wait for a buffer from an exhausted pool before it is answered
/// with TASK SET FULL (SAM-5 §5.3.1: the task set cannot take the command now).
const BUF_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// A command parked because the buffer pool was exhausted when it was admitted.
struct BufWait {
    slot: usize,
    itt: u32,
    len: usize,
    since: Instant,
    /// The command PDU's whole payload has arrived (its immediate data is in `data`).
    arrived: bool,
    /// Immediate data, kept aside until the buffer exists.
    data: Vec<u8>,
}

/// Most pieces a direct receive scatters into: one per chunk of the largest buffer.
const DIRECT_SEGS: usize = crate::env::buf::MAX_TRANSFER / crate::env::buf::CHUNK_SIZE;

/// Where the payload of the PDU being received goes.
enum Dest {
    Discard,
    Collect(Vec<u8>),
    Task { slot: usize, offset: usize },
}

enum RxState {
    /// Waiting for a whole BHS (+ AHS) in the staging buffer.
    Header,
    /// Receiving the data segment (and padding) of `hdr`.
    Payload {
        hdr: Box<PduHeader>,
        dest: Dest,
        remaining: usize,
        pad: usize,
        pos: usize,
        /// Running CRC32C of the data and padding (when a data digest follows).
        crc: u32,
        /// Bytes of the data digest still to read (4, or 0 without one).
        digest_left: usize,
        digest: [u8; 4],
    },
}

/// A parsed header waiting for its payload.
struct PduHeader {
    /// `None` for an opcode we do not know (its payload is skipped).
    pdu: Option<Pdu>,
    raw: [u8; BHS_LEN],
}

/// A Login Response whose text does not fit in one PDU (RFC 7143 §11.13.3: C=1, T=0 on every
/// part but the last). The initiator asks for each further part with an empty Login Request;
/// the last part carries the response's own flags and status, and what the login step decided
/// happens only then.
struct LoginTail {
    resp: pdu::LoginResponse,
    data: Vec<u8>,
    sent: usize,
    then: LoginThen,
}

enum LoginThen {
    Continue,
    Complete(Box<SessionParams>, [u8; 6], u32),
}

/// Where to cut `data[from..]` for a PDU of at most `max` bytes: after the last key=value pair
/// that fits (pairs may span PDUs, RFC 7143 §6.1, but whole ones are kinder to initiators),
/// or at `max` when a single pair is longer.
fn text_cut(data: &[u8], from: usize, max: usize) -> usize {
    let end = from.saturating_add(max).min(data.len());
    if end == data.len() {
        return end;
    }
    match data[from..end].iter().rposition(|&b| b == 0) {
        Some(i) => from + i + 1,
        None => end,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Login,
    FullFeature,
    /// Logout answered or a fatal error: flush what is queued, then close.
    Closing,
    Closed,
}

/// Session state of a full-feature connection (one connection per session for now).
struct Session {
    params: SessionParams,
    target: Option<Arc<TargetConfig>>,
    info: Option<Arc<SessionInfo>>,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    /// Unit attentions of this I_T nexus raised by the transport (LUN map changes).
    pending_ua: Vec<(u8, u8)>,
    nexus: u64,
}

/// Everything a connection needs from its reactor while it handles events.
pub struct ConnCtx<'a> {
    pub now: Instant,
    pub snapshot: &'a Arc<Snapshot>,
    pub shared: &'a Shared,
    pub port: &'a mut ScsiPort,
    /// The reactor's sockets.
    pub net: &'a mut dyn SockGroup,
    /// Our index among the reactor's connections (high half of backend tags).
    pub index: usize,
}

pub struct Conn {
    sock: SockId,
    /// The portal (index among the target's listeners) it came through.
    portal: usize,
    peer: SocketAddr,
    local: SocketAddr,
    phase: Phase,
    rx_state: RxState,
    staging: Staging,
    tx: TxQueue,
    login: Option<Login>,
    login_deadline: Instant,
    /// A Login Response too long for one PDU, sent in parts.
    login_tail: Option<LoginTail>,
    sess: Option<Session>,
    tasks: Tasks,
    stat_sn: u32,
    cid: u16,
    /// Last time anything arrived (for NOP-In keepalive).
    last_rx: Instant,
    /// Whether anything at all has arrived.
    heard: bool,
    /// Outstanding NOP-In ping: its TTT and when it was sent.
    nop_ping: Option<(u32, Instant)>,
    next_nop_ttt: u32,
    done_slots: Vec<usize>,
    /// Commands waiting for a data buffer, oldest first.
    buf_waiters: VecDeque<BufWait>,
    /// Pool bytes held by this session's tasks, and the most it may hold
    /// ([`crate::env::session_share`]).
    buf_held: usize,
    buf_share: usize,
    /// Whether the socket wants to be polled for writability.
    want_write: bool,
    /// Since when queued output has made no progress (the initiator reads nothing).
    tx_stalled_since: Option<Instant>,
    /// The last `on_readable` stopped at its budget: input may be left in the staging buffer,
    /// which the socket will not report again, so the reactor must call back.
    rx_more: bool,
    /// Digests negotiated for this connection (RFC 7143 §13.1), checked on receive.
    rx_header_digest: bool,
    rx_data_digest: bool,
    /// A task management function that reaches other sessions, for the reactor to hand to
    /// every reactor; its response (ITT) waits until all have applied it.
    tmf_out: Option<(AbortScope, u32)>,
    /// A TARGET COLD RESET: close after its response.
    close_after_tmf: bool,
    /// Task management responses (ITT, response) held until every task they aborted is
    /// back from the backend: FUNCTION COMPLETE promises the aborted commands will not touch
    /// the medium any more (SAM-5 §7.1).
    tmf_deferred: Vec<(u32, u8)>,
    /// The session of a closed connection, kept (in the registry, its nexus registered) until
    /// the last of its backend I/O is back: a new session of the same I_T nexus waits for it.
    ended: Option<Session>,
    /// A login that reinstates a session waits, its final response held, until the old
    /// session has gone (RFC 7143 §6.3.5).
    reinstating: bool,
    /// A text request being continued (C=1): its ITT, the TTT we gave it, the text so far.
    text_in: Option<(u32, u32, Vec<u8>)>,
    /// The rest of a long text answer: our TTT, the ITT, and the bytes not yet sent.
    text_out: Option<(u32, u32, Vec<u8>)>,
    text_ttt: u32,
}

/// A text request longer than this is refused (RFC 7143 §6.2 sets 64 KiB for login text).
const MAX_TEXT: usize = 64 * 1024;

fn text_header(t: &pdu::TextRequest) -> [u8; BHS_LEN] {
    let mut raw = [0u8; BHS_LEN];
    t.emit(&mut raw);
    raw
}

/// What a task management function ends beyond the requesting nexus.
#[derive(Debug, Clone)]
pub struct AbortScope {
    pub target: String,
    /// `None`: every LUN (target resets).
    pub lun: Option<u64>,
    /// The requesting I_T nexus (its own tasks were handled where it runs).
    pub requester: u64,
    /// TARGET COLD RESET: close every session of the target.
    pub close: bool,
}

struct Lookup<'a> {
    snap: &'a Snapshot,
    /// The local address the initiator connected to (for `allowed_portal`).
    local_ip: String,
    registry: &'a crate::iscsi::registry::Registry,
}

impl TargetLookup for Lookup<'_> {
    fn target(&self, name: &str, initiator: &str, isid: [u8; 6]) -> Option<LoginTarget> {
        let t = self.snap.targets.get(name)?;
        if !t.enabled || !t.portal_allowed(&self.local_ip) {
            return None;
        }
        let max = t.params.max_sessions;
        let sessions_full = max > 0 && {
            // A login that reinstates one of the initiator's own sessions does not add one.
            let isid = isid_u48(&isid);
            let others = self
                .registry
                .sessions(name)
                .into_iter()
                .filter(|(_, s)| {
                    !(s.initiator_name == initiator && s.sid & 0xffff_ffff_ffff == isid)
                })
                .count();
            others >= max as usize
        };
        Some(LoginTarget {
            params: t.params.clone(),
            alias: t.alias.clone(),
            auth: t.auth.clone(),
            redirect: t.redirect.clone(),
            sessions_full,
        })
    }

    fn discovery_auth(&self) -> crate::iscsi::login::Auth {
        self.snap.discovery_auth.clone()
    }

    fn session_exists(&self, isid: [u8; 6], tsih: u16) -> bool {
        self.registry
            .contains_sid((u64::from(tsih) << 48) | isid_u48(&isid))
    }
}

impl Conn {
    /// A connection on socket `sock` of the reactor's group, from `peer` to `local`.
    pub fn new(
        sock: SockId,
        (peer, local): (SocketAddr, SocketAddr),
        portal: usize,
        now: Instant,
    ) -> Conn {
        Conn {
            sock,
            portal,
            peer,
            local,
            phase: Phase::Login,
            rx_state: RxState::Header,
            staging: Staging::new(),
            tx: TxQueue::default(),
            login: Some(Login::new(local.to_string())),
            login_deadline: now + LOGIN_TIMEOUT,
            login_tail: None,
            sess: None,
            tasks: Tasks::with_capacity(64),
            stat_sn: 0,
            cid: 0,
            last_rx: now,
            heard: false,
            nop_ping: None,
            next_nop_ttt: 1,
            done_slots: Vec::with_capacity(64),
            buf_waiters: VecDeque::new(),
            buf_held: 0,
            buf_share: crate::env::session_share(),
            want_write: false,
            tx_stalled_since: None,
            rx_more: false,
            rx_header_digest: false,
            rx_data_digest: false,
            tmf_out: None,
            close_after_tmf: false,
            tmf_deferred: Vec::new(),
            ended: None,
            reinstating: false,
            text_in: None,
            text_out: None,
            text_ttt: 0,
        }
    }

    pub fn sock(&self) -> SockId {
        self.sock
    }

    /// The portal (index among the target's portals) the connection came through.
    pub fn portal(&self) -> usize {
        self.portal
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether output is queued that the socket did not take: poll it for writability.
    pub fn wants_write(&self) -> bool {
        self.want_write
    }

    /// The last [`Conn::on_readable`] stopped at its budget with input possibly left in the
    /// staging buffer, which the socket will not report again: call it again next pass.
    pub fn rx_more(&self) -> bool {
        self.rx_more
    }

    /// A task management function that reaches other sessions, for the reactor to hand to
    /// every reactor (its response waits for [`Conn::tmf_done`]).
    pub fn take_tmf(&mut self) -> Option<(AbortScope, u32)> {
        self.tmf_out.take()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether the connection takes input: not while too much of its output waits unread
    /// ([`OWNED_BACKLOG_LIMIT`]).
    pub fn wants_read(&self) -> bool {
        self.tx.owned_bytes() < OWNED_BACKLOG_LIMIT
    }

    /// Frees a task slot, returning its buffer's charge to the session's share.
    fn remove_task(&mut self, slot: usize) {
        if let Some(t) = self.tasks.remove(slot) {
            self.buf_held = self.buf_held.saturating_sub(t.buf_charge);
        }
    }

    /// Whether the connection is gone and no backend I/O still holds one of its buffers.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Closed && !self.tasks.slots().any(|(_, t)| t.in_backend)
    }

    // ---------------------------------------------------------------- receive

    /// The socket is readable: receive and handle PDUs. Returns whether anything happened.
    pub fn on_readable(&mut self, cx: &mut ConnCtx<'_>) -> bool {
        if matches!(self.phase, Phase::Closing | Phase::Closed) {
            // Discard input while closing; a peer that closed is noticed here.
            let mut scratch = [0u8; 4096];
            if let Ok(0) = cx.net.recv(self.sock, &mut scratch) {
                self.close(cx, "peer closed");
            }
            return false;
        }
        let mut did = false;
        self.rx_more = false;
        if !self.wants_read() {
            // Its answers are not being read: read on once they drain (the reactor stops
            // polling the socket for input meanwhile).
            return false;
        }
        for i in 0..RX_BUDGET {
            match self.rx_step(cx) {
                Ok(true) => did = true,
                Ok(false) => break,
                Err(why) => {
                    self.close(cx, &why);
                    return true;
                }
            }
            if matches!(self.phase, Phase::Closing | Phase::Closed) || !self.wants_read() {
                break;
            }
            self.rx_more = i + 1 == RX_BUDGET;
        }
        if did {
            self.last_rx = cx.now;
            self.heard = true;
            self.nop_ping = None;
        }
        // The reactor flushes once per pass, after backend completions, so the responses of
        // everything received and completed in one pass leave in one writev.
        did
    }

    /// One step of the receive machine: `Ok(true)` if progress was made.
    fn rx_step(&mut self, cx: &mut ConnCtx<'_>) -> Result<bool, String> {
        match &mut self.rx_state {
            RxState::Header => {
                if self.staging.len() < BHS_LEN {
                    return self.fill(cx);
                }
                let avail = self.staging.available();
                let mut raw = [0u8; BHS_LEN];
                raw.copy_from_slice(&avail[..BHS_LEN]);
                let ahs_len = usize::from(raw[4]) * 4;
                let data_len =
                    (usize::from(raw[5]) << 16) | (usize::from(raw[6]) << 8) | usize::from(raw[7]);
                let hd = if self.rx_header_digest { 4 } else { 0 };
                if self.staging.len() < BHS_LEN + ahs_len + hd {
                    return self.fill(cx);
                }
                let ahs = avail[BHS_LEN..BHS_LEN + ahs_len].to_vec();
                if hd > 0 {
                    // RFC 7143 §7.8: a header digest error leaves nothing of the PDU to trust
                    // (not even its length); at ERL 0 the connection ends.
                    let got = &avail[BHS_LEN + ahs_len..BHS_LEN + ahs_len + 4];
                    let crc = crc32c::crc32c(&avail[..BHS_LEN + ahs_len]);
                    if crc.to_le_bytes() != got {
                        return Err(format!(
                            "header digest error on a {} PDU",
                            opcode_name(raw[0])
                        ));
                    }
                }
                self.staging.consume(BHS_LEN + ahs_len + hd);
                let digest_left = if self.rx_data_digest && data_len > 0 {
                    4
                } else {
                    0
                };
                let max = self.max_recv_data();
                if data_len > max {
                    return Err(format!(
                        "PDU data segment of {data_len} bytes exceeds MaxRecvDataSegmentLength {max}"
                    ));
                }
                let pdu = match Pdu::parse(&raw, &ahs) {
                    Ok(p) => p,
                    Err(e) => {
                        if self.phase == Phase::FullFeature {
                            // RFC 7143 §11.17: answer an unknown opcode with Reject and go on.
                            debug!("{}: {e}; rejecting", self.peer);
                            self.queue_reject(pdu::REJECT_COMMAND_NOT_SUPPORTED, &raw);
                            self.rx_state = RxState::Payload {
                                hdr: Box::new(PduHeader { pdu: None, raw }),
                                dest: Dest::Discard,
                                remaining: data_len,
                                pad: pdu::padded(data_len) - data_len,
                                pos: 0,
                                crc: 0,
                                digest_left,
                                digest: [0; 4],
                            };
                            return Ok(true);
                        }
                        return Err(format!("malformed PDU during login: {e}"));
                    }
                };
                let dest = self.begin_pdu(&pdu, &raw, data_len, cx);
                self.rx_state = RxState::Payload {
                    hdr: Box::new(PduHeader {
                        pdu: Some(pdu),
                        raw,
                    }),
                    dest,
                    remaining: data_len,
                    pad: pdu::padded(data_len) - data_len,
                    pos: 0,
                    crc: 0,
                    digest_left,
                    digest: [0; 4],
                };
                Ok(true)
            }
            RxState::Payload {
                dest,
                remaining,
                pad,
                pos,
                crc,
                digest_left,
                digest,
                ..
            } => {
                let want_crc = *digest_left > 0;
                if *remaining > 0 {
                    if self.staging.is_empty() {
                        // Large payloads go straight into their buffer.
                        if let Dest::Task { slot, offset } = dest {
                            if *remaining >= rx::DIRECT_MIN {
                                if let Some(buf) =
                                    self.tasks.get_mut(*slot).and_then(|t| t.scsi.buf.as_mut())
                                {
                                    let start = *offset + *pos;
                                    let n_in_buf = buf.len().saturating_sub(start).min(*remaining);
                                    if n_in_buf > 0 {
                                        // On the stack: a range of a buffer spans at most
                                        // MAX_TRANSFER / CHUNK_SIZE chunks.
                                        let mut segs: [IoSliceMut<'_>; DIRECT_SEGS] =
                                            std::array::from_fn(|_| IoSliceMut::new(&mut []));
                                        let mut k = 0;
                                        for (slot, seg) in
                                            segs.iter_mut().zip(buf.segments_mut(start, n_in_buf))
                                        {
                                            *slot = IoSliceMut::new(seg);
                                            k += 1;
                                        }
                                        let segs = &mut segs[..k];
                                        return match rx::recv_direct(cx.net, self.sock, segs) {
                                            Ok(Some(n)) => {
                                                if want_crc {
                                                    for seg in buf.segments(start, n) {
                                                        *crc = crc32c::crc32c_append(*crc, seg);
                                                    }
                                                }
                                                *remaining -= n;
                                                *pos += n;
                                                Ok(n > 0)
                                            }
                                            Ok(None) => Ok(false),
                                            Err(e) => Err(format!("receive failed: {e}")),
                                        };
                                    }
                                }
                            }
                        }
                        return self.fill(cx);
                    }
                    let avail = self.staging.available();
                    let n = avail.len().min(*remaining);
                    if want_crc {
                        *crc = crc32c::crc32c_append(*crc, &avail[..n]);
                    }
                    match dest {
                        Dest::Discard => {}
                        Dest::Collect(v) => v.extend_from_slice(&avail[..n]),
                        Dest::Task { slot, offset } => {
                            if let Some(buf) =
                                self.tasks.get_mut(*slot).and_then(|t| t.scsi.buf.as_mut())
                            {
                                buf.write_at(*offset + *pos, &avail[..n]);
                            }
                        }
                    }
                    self.staging.consume(n);
                    *remaining -= n;
                    *pos += n;
                    return Ok(true);
                }
                if *pad > 0 {
                    if self.staging.is_empty() {
                        return self.fill(cx);
                    }
                    let n = self.staging.len().min(*pad);
                    if want_crc {
                        *crc = crc32c::crc32c_append(*crc, &self.staging.available()[..n]);
                    }
                    self.staging.consume(n);
                    *pad -= n;
                    return Ok(true);
                }
                if *digest_left > 0 {
                    if self.staging.is_empty() {
                        return self.fill(cx);
                    }
                    let n = self.staging.len().min(*digest_left);
                    let at = 4 - *digest_left;
                    digest[at..at + n].copy_from_slice(&self.staging.available()[..n]);
                    self.staging.consume(n);
                    *digest_left -= n;
                    return Ok(true);
                }
                let RxState::Payload {
                    hdr,
                    dest,
                    pos,
                    crc,
                    digest,
                    ..
                } = std::mem::replace(&mut self.rx_state, RxState::Header)
                else {
                    return Ok(true);
                };
                let digest_ok = !self.rx_data_digest || pos == 0 || crc.to_le_bytes() == digest;
                self.end_pdu(*hdr, dest, pos, digest_ok, cx);
                Ok(true)
            }
        }
    }

    fn fill(&mut self, cx: &mut ConnCtx<'_>) -> Result<bool, String> {
        match self.staging.fill(cx.net, self.sock) {
            Ok(Fill::Data(n)) => Ok(n > 0),
            Ok(Fill::WouldBlock) => Ok(false),
            Ok(Fill::Closed) => Err("peer closed the connection".into()),
            Err(e) => Err(format!("receive failed: {e}")),
        }
    }

    fn max_recv_data(&self) -> usize {
        match &self.sess {
            Some(s) => s.params.max_recv_data_segment_length as usize,
            None => LOGIN_MAX_DATA,
        }
    }

    fn max_xmit_data(&self) -> usize {
        match &self.sess {
            Some(s) => s.params.max_xmit_data_segment_length as usize,
            None => LOGIN_MAX_DATA,
        }
        .max(512)
    }

    /// A header arrived: decide where its payload goes (and admit SCSI commands, so that
    /// immediate data lands in the command's own buffer).
    fn begin_pdu(
        &mut self,
        pdu: &Pdu,
        raw: &[u8; BHS_LEN],
        data_len: usize,
        cx: &mut ConnCtx<'_>,
    ) -> Dest {
        if self.phase == Phase::Login {
            return Dest::Collect(Vec::with_capacity(data_len));
        }
        match pdu {
            Pdu::ScsiCommand(cmd) => match self.admit_command(cmd, data_len, cx) {
                Some(slot) if data_len > 0 && self.is_parked(slot) => {
                    // Slow path: no buffer yet, keep the immediate data aside.
                    Dest::Collect(Vec::with_capacity(data_len))
                }
                Some(slot) if data_len > 0 => Dest::Task { slot, offset: 0 },
                _ => Dest::Discard,
            },
            Pdu::DataOut(d) => match self.admit_data_out(d, data_len) {
                Some((slot, offset)) => Dest::Task { slot, offset },
                None => Dest::Discard,
            },
            _ if data_len == 0 => Dest::Discard,
            _ => {
                let _ = raw;
                Dest::Collect(Vec::with_capacity(data_len))
            }
        }
    }

    /// A whole PDU (header and payload) arrived.
    fn end_pdu(
        &mut self,
        hdr: PduHeader,
        dest: Dest,
        received: usize,
        digest_ok: bool,
        cx: &mut ConnCtx<'_>,
    ) {
        let data = match dest {
            Dest::Collect(v) => v,
            _ => Vec::new(),
        };
        if self.phase == Phase::Login {
            self.handle_login_pdu(hdr, data, cx);
            return;
        }
        let Some(pdu) = hdr.pdu else { return };
        if !digest_ok {
            // RFC 7143 §7.8: Reject the PDU with "data digest error" and discard its payload.
            // The data of a SCSI write still counts towards the transfer, so the command ends
            // when all of it has arrived, with CHECK CONDITION and nothing written (ERL 0).
            warn!(
                "{}: data digest error on a {} PDU",
                self.peer,
                opcode_name(hdr.raw[0])
            );
            self.queue_reject(pdu::REJECT_DATA_DIGEST_ERROR, &hdr.raw);
            let itt = match &pdu {
                Pdu::ScsiCommand(c) => Some(c.itt),
                Pdu::DataOut(d) => Some(d.itt),
                _ => None,
            };
            let Some(itt) = itt else { return };
            if let Some(t) = self.tasks.by_itt(itt).and_then(|s| self.tasks.get_mut(s)) {
                t.data_digest_error = true;
            }
        }
        match pdu {
            Pdu::ScsiCommand(cmd) => {
                if let Some(w) = self
                    .buf_waiters
                    .iter_mut()
                    .find(|w| w.itt == cmd.itt && !w.arrived)
                {
                    w.arrived = true;
                    w.data = data;
                } else {
                    self.command_data_done(cmd.itt, received as u32, cx);
                }
            }
            Pdu::DataOut(d) => self.data_out_done(&d, received as u32, cx),
            Pdu::NopOut(n) => self.handle_nop_out(&n, data),
            Pdu::TextRequest(t) => self.handle_text(&t, data, cx),
            Pdu::LogoutRequest(l) => self.handle_logout(&l, cx),
            Pdu::TaskMgmtRequest(t) => self.handle_tmf(&t, cx),
            Pdu::LoginRequest(_) => {
                // RFC 7143 §6.1: a Login Request in full feature phase is a protocol error.
                self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &hdr.raw);
            }
            Pdu::Snack(_) => {
                // ERL 0: SNACK is not supported (RFC 7143 §11.16).
                self.queue_reject(pdu::REJECT_SNACK_REJECT, &hdr.raw);
            }
            _ => {
                // A target-side opcode sent by the initiator.
                self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &hdr.raw);
            }
        }
    }

    // ---------------------------------------------------------------- login

    fn handle_login_pdu(&mut self, hdr: PduHeader, data: Vec<u8>, cx: &mut ConnCtx<'_>) {
        let Some(Pdu::LoginRequest(req)) = hdr.pdu else {
            // RFC 7143 §6: only Login Requests are allowed before full feature phase.
            warn!(
                "{}: {} PDU before login completed; closing",
                self.peer,
                opcode_name(hdr.raw[0])
            );
            let resp = pdu::LoginResponse {
                itt: u32::from_be_bytes([hdr.raw[16], hdr.raw[17], hdr.raw[18], hdr.raw[19]]),
                status_class: 2,
                status_detail: 0,
                ..Default::default()
            };
            self.queue_login_response(resp, Vec::new());
            self.phase = Phase::Closing;
            return;
        };
        let fields = LoginRequestFields {
            transit: req.transit,
            cont: req.cont,
            csg: req.csg,
            nsg: req.nsg,
            version_max: req.version_max,
            version_min: req.version_min,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            cid: req.cid,
            cmd_sn: req.cmd_sn,
            exp_stat_sn: req.exp_stat_sn,
            data,
        };
        self.cid = req.cid;
        if !cx.snapshot.iscsi_enabled {
            let resp = pdu::LoginResponse {
                itt: req.itt,
                isid: req.isid,
                status_class: 3,
                status_detail: 1, // service unavailable
                ..Default::default()
            };
            self.queue_login_response(resp, Vec::new());
            self.phase = Phase::Closing;
            return;
        }
        if self.login_tail.is_some() {
            // RFC 7143 §11.13.3: the initiator answers a C=1 Login Response with an empty
            // Login Request; anything else breaks the exchange, and so does a request while
            // the final response waits for a reinstated session to end.
            if !fields.data.is_empty() || req.cont || self.reinstating {
                self.reinstating = false;
                self.login_tail = None;
                let resp = pdu::LoginResponse {
                    itt: req.itt,
                    isid: req.isid,
                    status_class: 2,
                    status_detail: 0,
                    ..Default::default()
                };
                warn!(
                    "{}: Login Request with text while a continued Login Response was pending",
                    self.peer
                );
                self.queue_login_response(resp, Vec::new());
                self.phase = Phase::Closing;
                return;
            }
            self.send_login_part(cx);
            return;
        }
        let Some(login) = self.login.as_mut() else {
            return;
        };
        let lookup = Lookup {
            snap: cx.snapshot,
            local_ip: self.local.ip().to_string(),
            registry: &cx.shared.registry,
        };
        let step = login.step(&fields, &lookup);
        let exp_cmd_sn = req.cmd_sn;
        match step {
            LoginStep::Continue(r) => {
                let data = r.data.clone();
                self.login_tail = Some(LoginTail {
                    resp: login_resp(&r, exp_cmd_sn),
                    data,
                    sent: 0,
                    then: LoginThen::Continue,
                });
                self.send_login_part(cx);
            }
            LoginStep::Fail(r) => {
                let who = login.initiator_name().unwrap_or("an unnamed initiator");
                match login.failure_reason() {
                    Some(why) => warn!(
                        "{}: login of {who} refused with status {:02x}{:02x}: {why}",
                        self.peer, r.status_class, r.status_detail
                    ),
                    None => info!(
                        "{}: login of {who} failed with status {:02x}{:02x}",
                        self.peer, r.status_class, r.status_detail
                    ),
                }
                // The status is what matters in a refusal: its text is cut to one PDU.
                let mut data = r.data.clone();
                data.truncate(text_cut(&data, 0, LOGIN_MAX_DATA));
                self.queue_login_response(login_resp(&r, exp_cmd_sn), data);
                self.phase = Phase::Closing;
            }
            LoginStep::Complete(mut r, params) => {
                r.tsih = cx.shared.next_tsih();
                let data = r.data.clone();
                self.stat_sn = req.exp_stat_sn;
                self.login_tail = Some(LoginTail {
                    resp: login_resp(&r, exp_cmd_sn),
                    data,
                    sent: 0,
                    then: LoginThen::Complete(Box::new(params), req.isid, exp_cmd_sn),
                });
                // RFC 7143 §6.3.5: a login with the ISID of a session still there reinstates
                // it. The old session must be gone, its commands ended and none of its writes
                // still on their way to the medium, before the new one may issue any: ask it
                // to close and hold the final response until it has (on_timer).
                let old = self.sessions_reinstated(cx);
                if old.is_empty() {
                    self.send_login_part(cx);
                } else {
                    for o in &old {
                        info!(
                            "{}: reinstating session {:x} of {}",
                            self.peer, o.sid, o.initiator_name
                        );
                        o.reinstating.store(true, Ordering::Relaxed);
                        o.close_requested.store(true, Ordering::Relaxed);
                    }
                    self.reinstating = true;
                }
            }
        }
    }

    /// The sessions of the I_T nexus the pending login would start (same initiator name and
    /// ISID at the same target), running or still draining after their connection closed.
    fn sessions_reinstated(&self, cx: &ConnCtx<'_>) -> Vec<Arc<SessionInfo>> {
        let Some(LoginTail {
            then: LoginThen::Complete(params, isid, _),
            ..
        }) = &self.login_tail
        else {
            return Vec::new();
        };
        if params.session_type != SessionType::Normal {
            return Vec::new();
        }
        let isid = isid_u48(isid);
        cx.shared
            .registry
            .sessions(&params.target_name)
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| {
                s.initiator_name == params.initiator_name && s.sid & 0xffff_ffff_ffff == isid
            })
            .collect()
    }

    /// A reinstating login: once the old session has gone, the login completes; if it has not
    /// gone by the end of the login timeout (its backend does not answer), the login is
    /// refused as "service unavailable" and the initiator may try again later.
    fn check_reinstatement(&mut self, cx: &mut ConnCtx<'_>) {
        if self.sessions_reinstated(cx).is_empty() {
            self.reinstating = false;
            self.send_login_part(cx);
            self.flush(cx);
        } else if cx.now >= self.login_deadline {
            self.reinstating = false;
            let Some(tail) = self.login_tail.take() else {
                return;
            };
            warn!(
                "{}: the session being reinstated did not end within the login timeout; login refused",
                self.peer
            );
            let resp = pdu::LoginResponse {
                status_class: 3,
                status_detail: 1,
                tsih: 0,
                transit: false,
                ..tail.resp
            };
            self.queue_login_response(resp, Vec::new());
            self.phase = Phase::Closing;
            self.flush(cx);
        }
    }

    /// Sends the next part of the pending Login Response; after the last one, does what the
    /// login step decided (full feature phase starts after the final response).
    fn send_login_part(&mut self, cx: &mut ConnCtx<'_>) {
        let Some(mut tail) = self.login_tail.take() else {
            return;
        };
        let end = text_cut(&tail.data, tail.sent, LOGIN_MAX_DATA);
        let part = tail.data[tail.sent..end].to_vec();
        if end < tail.data.len() {
            let resp = pdu::LoginResponse {
                transit: false,
                cont: true,
                nsg: 0,
                tsih: 0,
                status_class: 0,
                status_detail: 0,
                ..tail.resp.clone()
            };
            tail.sent = end;
            self.queue_login_response(resp, part);
            self.login_tail = Some(tail);
            return;
        }
        let mut resp = tail.resp;
        match tail.then {
            LoginThen::Continue => self.queue_login_response(resp, part),
            LoginThen::Complete(params, isid, exp_cmd_sn) => {
                let (hd, dd) = (params.header_digest, params.data_digest);
                self.start_session(*params, isid, resp.tsih, exp_cmd_sn, cx);
                if let Some(s) = &self.sess {
                    resp.max_cmd_sn = s.max_cmd_sn;
                }
                self.queue_login_response(resp, part);
                // Digests start with the first PDU after the final Login Response.
                self.tx.set_digests(hd, dd);
                self.rx_header_digest = hd;
                self.rx_data_digest = dd;
                self.login = None;
            }
        }
    }

    fn queue_login_response(&mut self, mut resp: pdu::LoginResponse, data: Vec<u8>) {
        resp.stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        if resp.max_cmd_sn == 0 && resp.exp_cmd_sn == 0 {
            resp.max_cmd_sn = 0;
        }
        resp.data_segment_length = data.len() as u32;
        let mut bhs = [0u8; BHS_LEN];
        resp.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    fn start_session(
        &mut self,
        params: SessionParams,
        isid: [u8; 6],
        tsih: u16,
        cmd_sn: u32,
        cx: &mut ConnCtx<'_>,
    ) {
        let target = match params.session_type {
            SessionType::Normal => cx
                .snapshot
                .targets
                .get(&params.target_name)
                .map(|t| t.view_for(&params.initiator_name)),
            SessionType::Discovery => None,
        };
        let nexus = (u64::from(tsih) << 48) | isid_u48(&isid);
        if let Some(t) = &target {
            // Session reinstatement (RFC 7143 §6.3.5): a login with TSIH 0 whose InitiatorName
            // and ISID match a running session replaces it. The old session leaves the
            // registry now and its connection closes on its next timer tick.
            for (_, old) in cx.shared.registry.sessions(&t.name) {
                if old.initiator_name == params.initiator_name
                    && old.sid & 0xffff_ffff_ffff == isid_u48(&isid)
                {
                    info!(
                        "{}: session {:x} of {} reinstated",
                        self.peer, old.sid, old.initiator_name
                    );
                    old.close_requested.store(true, Ordering::Relaxed);
                    cx.shared.registry.remove(&t.name, old.sid);
                }
            }
        }
        let info = target.as_ref().map(|t| {
            let info = Arc::new(SessionInfo {
                sid: nexus,
                target: t.name.clone(),
                initiator_name: params.initiator_name.clone(),
                params: params.tree_values(),
                connections: std::sync::Mutex::new(vec![ConnInfo {
                    cid: self.cid,
                    ip: self.peer.ip().to_string(),
                    target_ip: self.local.ip().to_string(),
                    state: "established".into(),
                }]),
                commands: Default::default(),
                active_commands: Default::default(),
                reinstating: Default::default(),
                close_requested: Default::default(),
            });
            cx.shared.registry.add(info.clone());
            for l in &t.luns {
                l.device.register_nexus(nexus);
            }
            info!(
                "{}: session {:x} of {} logged in to {}",
                self.peer, nexus, params.initiator_name, t.name
            );
            info
        });
        let queued = params.queued_commands.max(1);
        self.phase = Phase::FullFeature;
        self.sess = Some(Session {
            params,
            target,
            info,
            exp_cmd_sn: cmd_sn,
            max_cmd_sn: cmd_sn.wrapping_add(queued - 1),
            pending_ua: Vec::new(),
            nexus,
        });
    }

    // ---------------------------------------------------------------- SCSI commands

    /// Admits a SCSI Command header: CmdSN window, LUN, CDB plan, buffer. Returns the task slot
    /// when the command goes on (its immediate data then lands in the task's buffer).
    fn admit_command(
        &mut self,
        cmd: &pdu::ScsiCommand,
        data_len: usize,
        cx: &mut ConnCtx<'_>,
    ) -> Option<usize> {
        let sess = self.sess.as_mut()?;
        if sess.params.session_type == SessionType::Discovery {
            // RFC 7143 §4.3: only text and logout in discovery sessions.
            let raw = cmd_header(cmd);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return None;
        }
        if !self.check_cmd_sn(cmd.immediate, cmd.cmd_sn) {
            return None;
        }
        let sess = self.sess.as_mut()?;
        if let Some(info) = &sess.info {
            info.commands.fetch_add(1, Ordering::Relaxed);
            info.active_commands.fetch_add(1, Ordering::Relaxed);
        }
        let immediate_data = data_len as u32;
        let params = &sess.params;
        let target = sess.target.clone();
        let nexus = sess.nexus;
        let lun_id = pdu::decode_lun(cmd.lun);
        let mut scsi_task = ScsiTask::new(&cmd.cdb[..], lun_id, nexus);
        scsi_task.tag = task_tag(cx.index, 0); // slot filled in below
        let mut task = Task {
            itt: cmd.itt,
            cmd_sn: cmd.cmd_sn,
            lun: lun_id,
            edtl: cmd.expected_data_transfer_length,
            spdtl: 0,
            write: cmd.write,
            read: cmd.read,
            state: TaskState::ReceivingData,
            scsi: scsi_task,
            unsolicited_len: 0,
            unsolicited_received: 0,
            unsolicited_next_data_sn: 0,
            expected_out: 0,
            received: 0,
            next_r2t_offset: 0,
            want_out: 0,
            next_r2t_sn: 0,
            r2ts: Vec::new(),
            data_digest_error: false,
            tx_refs: 0,
            generation: 0,
            waiting_since: Some(cx.now),
            in_backend: false,
            buf_charge: 0,
            answer_aborted: false,
        };
        if cmd.write && cmd.expected_data_transfer_length > 0 {
            // RFC 7143 §11.3.1: F=1 on the command means no unsolicited Data-Out follows it,
            // whatever InitialR2T allows; the rest is solicited.
            task.unsolicited_len = if params.initial_r2t || cmd.final_flag {
                immediate_data
            } else {
                params
                    .first_burst_length
                    .min(cmd.expected_data_transfer_length)
                    .max(immediate_data)
            };
        } else {
            task.unsolicited_len = immediate_data;
        }
        let first_burst = params.first_burst_length;
        let Some(slot) = self.tasks.insert(task) else {
            // Same ITT as an outstanding task, or out of slots.
            warn!(
                "{}: ITT {:#x} in use or no task slot free",
                self.peer, cmd.itt
            );
            let raw = cmd_header(cmd);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return None;
        };
        if immediate_data > first_burst {
            self.fail_task(slot, scsi::sense::ABORTED_COMMAND, 0x0c, 0x0c); // unexpected unsolicited data
            return None;
        }
        let lun_entry = target.as_ref().and_then(|t| t.lun(lun_id).cloned());
        let t = self.tasks.get_mut(slot)?;
        t.scsi.tag = task_tag(cx.index, slot);
        // Transport-raised unit attentions (REPORTED LUNS DATA HAS CHANGED) come first.
        // REPORT LUNS answers for the whole I_T nexus, whatever LUN it addresses (SPC-4 §6.33).
        let lun_entry = if cmd.cdb[0] == 0xa0 { None } else { lun_entry };
        let Some(entry) = lun_entry else {
            let luns: Vec<u64> = target
                .as_ref()
                .map(|t| t.luns.iter().map(|l| l.lun).collect())
                .unwrap_or_default();
            if t.read && t.edtl > 0 {
                let len = (t.edtl as usize).min(64 * 1024);
                t.scsi.buf = session_alloc(&mut self.buf_held, self.buf_share, len);
                t.buf_charge = t.scsi.buf.as_ref().map_or(0, DataBuf::len);
            }
            scsi::execute_no_lun(&mut t.scsi, &luns);
            self.finish_task(slot, cx);
            return None;
        };
        t.scsi.read_only = entry.read_only;
        t.scsi.data_out_len = Some(if t.write { t.edtl } else { 0 });
        if let Some(sess) = self.sess.as_mut() {
            if !sess.pending_ua.is_empty() && scsi::ua_applies(&t.scsi) {
                let (asc, ascq) = sess.pending_ua.remove(0);
                t.scsi
                    .set_check_condition(scsi::sense::UNIT_ATTENTION, asc, ascq);
                self.finish_task(slot, cx);
                return None;
            }
        }
        let plan = match scsi::plan(&entry.device, &mut t.scsi) {
            Ok(p) => p,
            Err(()) => {
                // The SCSI core filled in the sense (bad CDB, LBA out of range, UA, ...).
                self.finish_task(slot, cx);
                return None;
            }
        };
        t.spdtl = plan.len;
        let edtl = t.edtl;
        match plan.dir {
            scsi::DataDir::Out => {
                // Without the W bit the initiator sends nothing, whatever EDTL says.
                let out = if t.write { edtl } else { 0 };
                if out < plan.len && !t.scsi.limit_write(out, entry.device.block_size()) {
                    // RFC 7143 §11.4.5.2 / SAM-5: the initiator sends fewer bytes than the
                    // CDB needs and not a whole number of blocks: write nothing, answer
                    // INVALID FIELD IN COMMAND INFORMATION UNIT with the overflow residual.
                    t.scsi
                        .set_check_condition(scsi::sense::ILLEGAL_REQUEST, 0x0e, 0x03);
                    self.finish_task(slot, cx);
                    return None;
                }
                // Otherwise only the blocks the initiator sends are written; the response
                // reports the rest as residual overflow.
                match session_alloc(&mut self.buf_held, self.buf_share, plan.len as usize) {
                    Some(buf) => {
                        t.buf_charge = buf.len();
                        t.scsi.buf = Some(buf);
                    }
                    // Unsolicited Data-Out beyond the immediate data would arrive while the
                    // command has nowhere to put it: such a command cannot wait.
                    None if t.unsolicited_len > immediate_data => {
                        t.scsi.status = STATUS_TASK_SET_FULL;
                        self.finish_task(slot, cx);
                        return None;
                    }
                    None => t.state = TaskState::WaitingBuffer,
                }
                t.want_out = plan.len.min(out);
                t.next_r2t_offset = t.unsolicited_len;
                t.expected_out = t.unsolicited_len.max(t.want_out);
            }
            scsi::DataDir::In => {
                match session_alloc(&mut self.buf_held, self.buf_share, plan.len as usize) {
                    Some(buf) => {
                        t.buf_charge = buf.len();
                        t.scsi.buf = Some(buf);
                    }
                    None => t.state = TaskState::WaitingBuffer,
                }
                t.expected_out = t.unsolicited_len;
            }
            scsi::DataDir::None => {
                t.expected_out = t.unsolicited_len;
            }
        }
        if t.state == TaskState::WaitingBuffer {
            // Waiting on us, not on the initiator: RspTimeout does not run meanwhile.
            t.waiting_since = None;
            crate::env::note_wait();
            self.buf_waiters.push_back(BufWait {
                slot,
                itt: cmd.itt,
                len: plan.len as usize,
                since: cx.now,
                arrived: false,
                data: Vec::new(),
            });
        }
        Some(slot)
    }

    fn is_parked(&self, slot: usize) -> bool {
        self.tasks
            .get(slot)
            .is_some_and(|t| t.state == TaskState::WaitingBuffer)
    }

    /// Whether commands wait for a data buffer (the reactor then calls `retry_buffers` every
    /// pass).
    pub fn has_buf_waiters(&self) -> bool {
        !self.buf_waiters.is_empty()
    }

    /// Gives parked commands their buffers, in arrival order, while the pool has them; answers
    /// TASK SET FULL to those that waited longer than [`BUF_WAIT_LIMIT`]. Returns whether any
    /// command moved on.
    pub fn retry_buffers(&mut self, cx: &mut ConnCtx<'_>) -> bool {
        if self.phase != Phase::FullFeature {
            self.buf_waiters.clear();
            return false;
        }
        let mut did = false;
        while let Some(w) = self.buf_waiters.front() {
            let (slot, itt) = (w.slot, w.itt);
            let live = self
                .tasks
                .get(slot)
                .is_some_and(|t| t.itt == itt && t.state == TaskState::WaitingBuffer);
            if !live {
                // Aborted by task management meanwhile.
                self.buf_waiters.pop_front();
                continue;
            }
            if cx.now >= w.since + BUF_WAIT_LIMIT {
                self.buf_waiters.pop_front();
                if let Some(t) = self.tasks.get_mut(slot) {
                    t.scsi.status = STATUS_TASK_SET_FULL;
                }
                self.finish_task(slot, cx);
                did = true;
                continue;
            }
            if !w.arrived {
                // Its immediate data is still on the way; keep the order.
                break;
            }
            let Some(mut buf) = session_alloc(&mut self.buf_held, self.buf_share, w.len) else {
                break;
            };
            let Some(w) = self.buf_waiters.pop_front() else {
                break;
            };
            buf.write_at(0, &w.data);
            if let Some(t) = self.tasks.get_mut(slot) {
                t.buf_charge = buf.len();
                t.scsi.buf = Some(buf);
                t.state = TaskState::ReceivingData;
                t.waiting_since = Some(cx.now);
            }
            self.command_data_done(itt, w.data.len() as u32, cx);
            did = true;
        }
        did
    }

    /// The immediate data of a command (if any) has arrived.
    fn command_data_done(&mut self, itt: u32, received: u32, cx: &mut ConnCtx<'_>) {
        let Some(slot) = self.tasks.by_itt(itt) else {
            return;
        };
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.state != TaskState::ReceivingData {
            return;
        }
        t.received += received;
        t.unsolicited_received += received;
        self.progress_write(slot, cx);
    }

    /// Sends R2Ts while the window allows, or starts the command once all data is in.
    fn progress_write(&mut self, slot: usize, cx: &mut ConnCtx<'_>) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let max_r2t = sess.params.max_outstanding_r2t.max(1) as usize;
        let max_burst = sess.params.max_burst_length.max(512);
        let (exp_cmd_sn, max_cmd_sn) = (sess.exp_cmd_sn, sess.max_cmd_sn);
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.state != TaskState::ReceivingData {
            return;
        }
        if t.received >= t.expected_out {
            self.execute(slot, cx);
            return;
        }
        // Solicit the rest (RFC 7143 §11.8), at most MaxOutstandingR2T at a time, once the
        // unsolicited sequence has ended: until then its end is not known (an F bit may end it
        // early), and with DataSequenceInOrder=Yes (§13.19) no R2T may ask for an offset
        // below one already asked for.
        let unsolicited_done = t.unsolicited_received >= t.unsolicited_len;
        while unsolicited_done && t.r2ts.len() < max_r2t && t.next_r2t_offset < t.want_out {
            let len = (t.want_out - t.next_r2t_offset).min(max_burst);
            let r2t = R2t {
                r2t_sn: t.next_r2t_sn,
                offset: t.next_r2t_offset,
                len,
                received: 0,
                next_data_sn: 0,
            };
            t.next_r2t_sn = t.next_r2t_sn.wrapping_add(1);
            t.next_r2t_offset += len;
            t.r2ts.push(r2t);
            let pdu = pdu::R2t {
                lun: pdu::encode_lun(t.lun),
                itt: t.itt,
                ttt: task::ttt(t.generation, slot, r2t.r2t_sn),
                stat_sn: self.stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                r2t_sn: r2t.r2t_sn,
                buffer_offset: r2t.offset,
                desired_data_transfer_length: len,
                ..Default::default()
            };
            let mut bhs = [0u8; BHS_LEN];
            pdu.emit(&mut bhs);
            self.tx.push(TxPdu::new(bhs, TxData::None, 0));
        }
        t.waiting_since = Some(cx.now);
    }

    /// A Data-Out header: find its task and check it. Returns where its data goes.
    fn admit_data_out(&mut self, d: &pdu::DataOut, data_len: usize) -> Option<(usize, usize)> {
        let slot = if d.ttt == pdu::RESERVED_TAG {
            self.tasks.by_itt(d.itt)?
        } else {
            self.tasks.by_ttt(d.ttt)?
        };
        let t = self.tasks.get_mut(slot)?;
        if t.itt != d.itt || t.state != TaskState::ReceivingData {
            return None;
        }
        let end = u64::from(d.buffer_offset) + data_len as u64;
        let ok = if d.ttt == pdu::RESERVED_TAG {
            // Unsolicited data: in order, within the unsolicited range.
            d.data_sn == t.unsolicited_next_data_sn && end <= u64::from(t.unsolicited_len)
        } else {
            let r2t_sn = d.ttt & 0xfff;
            match t.r2ts.iter().find(|r| r.r2t_sn & 0xfff == r2t_sn) {
                Some(r) => {
                    d.data_sn == r.next_data_sn
                        && d.buffer_offset >= r.offset
                        && end <= u64::from(r.offset) + u64::from(r.len)
                }
                None => false,
            }
        };
        if !ok {
            debug!(
                "{}: bad Data-Out for ITT {:#x}: DataSN {} offset {} len {}",
                self.peer, d.itt, d.data_sn, d.buffer_offset, data_len
            );
            // ERL 0 (RFC 7143 §7.1.1): a sequence error ends the command with an error.
            t.scsi
                .set_check_condition(scsi::sense::ABORTED_COMMAND, 0x0c, 0x0d);
            t.state = TaskState::Responding;
            return None;
        }
        Some((slot, d.buffer_offset as usize))
    }

    fn data_out_done(&mut self, d: &pdu::DataOut, received: u32, cx: &mut ConnCtx<'_>) {
        let slot = if d.ttt == pdu::RESERVED_TAG {
            self.tasks.by_itt(d.itt)
        } else {
            self.tasks.by_ttt(d.ttt)
        };
        let Some(slot) = slot else { return };
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.itt != d.itt {
            return;
        }
        if t.state == TaskState::Responding
            && t.scsi.status == STATUS_CHECK_CONDITION
            && !t.in_backend
        {
            // The Data-Out was refused in admit_data_out.
            self.finish_task(slot, cx);
            return;
        }
        if t.state != TaskState::ReceivingData {
            return;
        }
        t.received += received;
        if d.ttt == pdu::RESERVED_TAG {
            t.unsolicited_received += received;
            t.unsolicited_next_data_sn = t.unsolicited_next_data_sn.wrapping_add(1);
            if d.final_flag && t.unsolicited_received < t.unsolicited_len {
                // RFC 7143 §11.7.1: F=1 ends the unsolicited sequence short of FirstBurstLength
                // (§13.14); the target solicits what it did not carry (§11.8).
                t.unsolicited_len = t.unsolicited_received;
                t.next_r2t_offset = t.unsolicited_len;
                t.expected_out = t.unsolicited_len.max(t.want_out);
            }
        } else {
            let r2t_sn = d.ttt & 0xfff;
            if let Some(i) = t.r2ts.iter().position(|r| r.r2t_sn & 0xfff == r2t_sn) {
                let r = &mut t.r2ts[i];
                r.received += received;
                r.next_data_sn = r.next_data_sn.wrapping_add(1);
                if r.received >= r.len || d.final_flag {
                    t.r2ts.swap_remove(i);
                }
            }
        }
        self.progress_write(slot, cx);
    }

    fn execute(&mut self, slot: usize, cx: &mut ConnCtx<'_>) {
        let target = self.sess.as_ref().and_then(|s| s.target.clone());
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        t.waiting_since = None;
        if t.data_digest_error {
            // PROTOCOL SERVICE CRC ERROR (SPC-4 Table 48 / RFC 7143 §11.4.7.2).
            t.scsi
                .set_check_condition(scsi::sense::ABORTED_COMMAND, 0x47, 0x05);
            self.finish_task(slot, cx);
            return;
        }
        let Some(entry) = target.as_ref().and_then(|tg| tg.lun(t.lun)) else {
            let luns: Vec<u64> = target
                .as_ref()
                .map(|t| t.luns.iter().map(|l| l.lun).collect())
                .unwrap_or_default();
            scsi::execute_no_lun(&mut t.scsi, &luns);
            self.finish_task(slot, cx);
            return;
        };
        t.state = TaskState::Executing;
        match cx.port.execute(&entry.device, &mut t.scsi) {
            Exec::Done => self.finish_task(slot, cx),
            Exec::Pending => t.in_backend = true,
        }
    }

    /// A backend completion for one of this connection's tasks.
    pub fn on_completion(&mut self, slot: usize, c: scsi::Completion, cx: &mut ConnCtx<'_>) {
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        t.in_backend = false;
        scsi::complete(&mut t.scsi, c);
        if t.state == TaskState::Aborted || matches!(self.phase, Phase::Closing | Phase::Closed) {
            let (answer, itt) = (t.answer_aborted, t.itt);
            self.remove_task(slot);
            if answer && self.phase == Phase::FullFeature {
                self.queue_task_aborted(itt);
            }
            self.release_tmf();
            if self.phase == Phase::Closed {
                self.release_session(&cx.shared.registry);
            }
            return;
        }
        self.finish_task(slot, cx);
    }

    /// Ends a task with CHECK CONDITION.
    fn fail_task(&mut self, slot: usize, key: u8, asc: u8, ascq: u8) {
        if let Some(t) = self.tasks.get_mut(slot) {
            t.scsi.set_check_condition(key, asc, ascq);
            t.state = TaskState::Responding;
        }
        // Sent by the next finish_task call from the receive path.
        self.respond(slot);
    }

    /// Builds the Data-In PDUs and/or the SCSI Response of a finished task.
    fn finish_task(&mut self, slot: usize, _cx: &mut ConnCtx<'_>) {
        if let Some(t) = self.tasks.get_mut(slot) {
            t.state = TaskState::Responding;
        }
        self.respond(slot);
    }

    fn respond(&mut self, slot: usize) {
        let max_xmit = self.max_xmit_data();
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        let max_burst = sess.params.max_burst_length.max(512) as usize;
        let info = sess.info.clone();
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        let status = t.scsi.status;
        let sense_len = t.scsi.sense_len();
        // Residuals (RFC 7143 §11.4.5) against the amount the command transfers.
        let (xfer, is_read) = if t.read || (!t.write && t.scsi.data_in_len > 0) {
            (t.scsi.data_in_len, true)
        } else {
            (t.spdtl, false)
        };
        let (overflow, underflow, residual) = if xfer > t.edtl {
            (true, false, xfer - t.edtl)
        } else if xfer < t.edtl {
            (false, true, t.edtl - xfer)
        } else {
            (false, false, 0)
        };
        let data_len = if is_read && (status == STATUS_GOOD || sense_len == 0) {
            xfer.min(t.edtl) as usize
        } else if is_read {
            // SPC-4: data may accompany CHECK CONDITION only in rare cases; send none.
            0
        } else {
            0
        };
        let data_len = data_len.min(t.scsi.buf.as_ref().map_or(0, DataBuf::len));
        let itt = t.itt;
        let lun = pdu::encode_lun(t.lun);
        let collapse = status == STATUS_GOOD && sense_len == 0 && data_len > 0;
        // Data-In PDUs, split at MaxXmitDataSegmentLength; F closes each MaxBurstLength sequence.
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < data_len {
            let len = (data_len - offset).min(max_xmit);
            let last = offset + len == data_len;
            let burst_end = last || (offset + len).is_multiple_of(max_burst);
            let mut din = pdu::DataIn {
                final_flag: burst_end,
                lun,
                itt,
                ttt: pdu::RESERVED_TAG,
                data_sn,
                buffer_offset: offset as u32,
                data_segment_length: len as u32,
                ..Default::default()
            };
            if last && collapse {
                din.status_flag = true;
                din.status = status;
                din.residual_overflow = overflow;
                din.residual_underflow = underflow;
                din.residual_count = residual;
                din.stat_sn = self.stat_sn;
                self.stat_sn = self.stat_sn.wrapping_add(1);
            }
            din.exp_cmd_sn = sess.exp_cmd_sn;
            din.max_cmd_sn = sess.max_cmd_sn;
            let mut bhs = [0u8; BHS_LEN];
            din.emit(&mut bhs);
            self.tx
                .push(TxPdu::new(bhs, TxData::Task { slot, offset }, len));
            t.tx_refs += 1;
            offset += len;
            data_sn += 1;
        }
        // The task no longer counts against the window once its status is decided.
        self.tasks.retire(slot);
        if let Some(info) = &info {
            info.active_commands.fetch_sub(1, Ordering::Relaxed);
        }
        let sess = self.sess.as_mut().unwrap_or_else(|| unreachable!());
        update_max_cmd_sn(sess, self.tasks.active);
        if !collapse {
            let t = self.tasks.get(slot);
            let sense = t.map(|t| t.scsi.sense().to_vec()).unwrap_or_default();
            let mut data = Vec::new();
            if !sense.is_empty() {
                data.extend_from_slice(&(sense.len() as u16).to_be_bytes());
                data.extend_from_slice(&sense);
            }
            let rsp = pdu::ScsiResponse {
                itt,
                response: 0,
                status,
                residual_overflow: overflow,
                residual_underflow: underflow,
                residual_count: residual,
                stat_sn: self.stat_sn,
                exp_cmd_sn: sess.exp_cmd_sn,
                max_cmd_sn: sess.max_cmd_sn,
                exp_data_sn: data_sn,
                data_segment_length: data.len() as u32,
                ..Default::default()
            };
            self.stat_sn = self.stat_sn.wrapping_add(1);
            let mut bhs = [0u8; BHS_LEN];
            rsp.emit(&mut bhs);
            let len = data.len();
            self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
        }
        if self
            .tasks
            .get(slot)
            .is_some_and(|t| t.tx_refs == 0 && !t.in_backend)
        {
            self.remove_task(slot);
        }
    }

    /// Checks a non-immediate command's CmdSN against the window and advances ExpCmdSN.
    /// RFC 7143 §4.2.2.1: commands outside the window are silently ignored.
    fn check_cmd_sn(&mut self, immediate: bool, cmd_sn: u32) -> bool {
        let active = self.tasks.active;
        let Some(sess) = self.sess.as_mut() else {
            return false;
        };
        if immediate {
            return true;
        }
        if cmd_sn != sess.exp_cmd_sn {
            debug!(
                "{}: CmdSN {} outside the window [{}, {}]; ignored",
                self.peer, cmd_sn, sess.exp_cmd_sn, sess.max_cmd_sn
            );
            return false;
        }
        if !seq::in_window(cmd_sn, sess.exp_cmd_sn, sess.max_cmd_sn) {
            return false;
        }
        sess.exp_cmd_sn = sess.exp_cmd_sn.wrapping_add(1);
        update_max_cmd_sn(sess, active + 1);
        true
    }

    // ---------------------------------------------------------------- other PDUs

    fn handle_nop_out(&mut self, n: &pdu::NopOut, data: Vec<u8>) {
        if !n.immediate && !self.check_cmd_sn(false, n.cmd_sn) {
            return;
        }
        if n.itt == pdu::RESERVED_TAG {
            // The answer to our NOP-In ping (RFC 7143 §11.18): no reply.
            return;
        }
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let mut data = data;
        data.truncate(self.max_xmit_data());
        let nop = pdu::NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: pdu::RESERVED_TAG,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        nop.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    fn handle_text(&mut self, t: &pdu::TextRequest, data: Vec<u8>, cx: &mut ConnCtx<'_>) {
        if !t.immediate && !self.check_cmd_sn(false, t.cmd_sn) {
            return;
        }
        if self.sess.is_none() {
            return;
        }
        // The rest of a long answer, asked for with our TTT and no data (RFC 7143 §11.10).
        let continuing = self
            .text_in
            .as_ref()
            .is_some_and(|(itt, ttt, _)| *itt == t.itt && *ttt == t.ttt);
        if t.ttt != pdu::RESERVED_TAG && !continuing {
            match self.text_out.take() {
                Some((ttt, itt, rest)) if ttt == t.ttt && itt == t.itt => {
                    self.send_text_part(t, ttt, rest);
                }
                _ => {
                    // An unknown TTT.
                    let raw = text_header(t);
                    self.queue_reject(pdu::REJECT_INVALID_PDU_FIELD, &raw);
                }
            }
            return;
        }
        // A request continued over several PDUs (C=1): gather, answer each with an empty
        // response whose TTT the initiator echoes with the next part.
        if !continuing {
            self.text_in = Some((t.itt, pdu::RESERVED_TAG, Vec::new()));
        }
        let Some((_, _, buf)) = self.text_in.as_mut() else {
            return;
        };
        buf.extend_from_slice(&data);
        if buf.len() > MAX_TEXT {
            self.text_in = None;
            let raw = text_header(t);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return;
        }
        if t.cont {
            let ttt = self.next_text_ttt();
            if let Some(x) = self.text_in.as_mut() {
                x.1 = ttt;
            }
            self.queue_text_response(t.itt, t.lun, ttt, false, false, Vec::new());
            return;
        }
        let data = self.text_in.take().map(|(_, _, d)| d).unwrap_or_default();
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let local_ip = self.local.ip().to_string();
        let targets: Vec<(String, Vec<String>)> = cx
            .snapshot
            .targets
            .values()
            .filter(|t| t.enabled && t.portal_allowed(&local_ip))
            .map(|t| {
                let addrs = cx
                    .shared
                    .portals_for(self.local)
                    .into_iter()
                    .filter(|a| t.portal_allowed(portal_ip(a)))
                    .collect();
                (t.name.clone(), addrs)
            })
            .collect();
        let current = match sess.params.session_type {
            SessionType::Normal => Some(sess.params.target_name.as_str()),
            SessionType::Discovery => None,
        };
        let resp_data =
            crate::iscsi::login::text_request(&data, sess.params.session_type, current, &targets);
        let Ok(resp_data) = resp_data else {
            let raw = text_header(t);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return;
        };
        let ttt = self.next_text_ttt();
        self.send_text_part(t, ttt, resp_data);
    }

    /// Sends as much of a text answer as the initiator takes in one PDU; a longer answer
    /// continues (C=1) when the initiator asks with `ttt`.
    fn send_text_part(&mut self, t: &pdu::TextRequest, ttt: u32, mut data: Vec<u8>) {
        let max = self.max_xmit_data();
        if data.len() > max {
            let rest = data.split_off(max);
            self.text_out = Some((ttt, t.itt, rest));
            self.queue_text_response(t.itt, t.lun, ttt, false, true, data);
        } else {
            self.queue_text_response(t.itt, t.lun, pdu::RESERVED_TAG, true, false, data);
        }
    }

    fn next_text_ttt(&mut self) -> u32 {
        self.text_ttt = self.text_ttt.wrapping_add(1) & 0x7fff_ffff;
        self.text_ttt.max(1)
    }

    fn queue_text_response(
        &mut self,
        itt: u32,
        lun: u64,
        ttt: u32,
        final_flag: bool,
        cont: bool,
        data: Vec<u8>,
    ) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let resp = pdu::TextResponse {
            final_flag,
            cont,
            lun,
            itt,
            ttt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        resp.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    fn handle_logout(&mut self, l: &pdu::LogoutRequest, cx: &mut ConnCtx<'_>) {
        if !l.immediate {
            let _ = self.check_cmd_sn(false, l.cmd_sn);
        }
        // ERL 0: outstanding commands of the session are dropped (RFC 7143 §11.14).
        self.abort_all(cx.port);
        let response = match l.reason_code {
            0 | 1 => 0,
            // Removing a connection for recovery needs ERL 2.
            _ => 2,
        };
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let resp = pdu::LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            time2wait: 0,
            time2retain: 0,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        resp.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
        debug!("{}: logout", self.peer);
        self.phase = Phase::Closing;
        let _ = cx;
    }

    fn handle_tmf(&mut self, t: &pdu::TaskMgmtRequest, cx: &mut ConnCtx<'_>) {
        if !t.immediate && !self.check_cmd_sn(false, t.cmd_sn) {
            return;
        }
        let lun = pdu::decode_lun(t.lun);
        let response = match t.function {
            pdu::TMF_ABORT_TASK => {
                let live = self.tasks.by_itt(t.referenced_task_tag).filter(|&s| {
                    self.tasks
                        .get_mut(s)
                        .is_some_and(|x| x.state != TaskState::Responding)
                });
                match live {
                    Some(slot) => {
                        self.abort_slot(slot, cx.port);
                        pdu::TMF_RSP_COMPLETE
                    }
                    None => {
                        // RFC 7143 §11.5.1: a task the target never saw whose RefCmdSN is
                        // inside the window (and before this request) counts as aborted; one
                        // already answered, or outside the window, does not exist.
                        let exp = self.sess.as_ref().map_or(0, |s| s.exp_cmd_sn);
                        let max = self.sess.as_ref().map_or(0, |s| s.max_cmd_sn);
                        if seq::in_window(t.ref_cmd_sn, exp, max) && seq::lt(t.ref_cmd_sn, t.cmd_sn)
                        {
                            pdu::TMF_RSP_COMPLETE
                        } else {
                            pdu::TMF_RSP_TASK_DOES_NOT_EXIST
                        }
                    }
                }
            }
            pdu::TMF_ABORT_TASK_SET
            | pdu::TMF_CLEAR_TASK_SET
            | pdu::TMF_LOGICAL_UNIT_RESET
            | pdu::TMF_TARGET_WARM_RESET
            | pdu::TMF_TARGET_COLD_RESET => {
                let target_wide = matches!(
                    t.function,
                    pdu::TMF_TARGET_WARM_RESET | pdu::TMF_TARGET_COLD_RESET
                );
                let Some(sess) = self.sess.as_ref() else {
                    return;
                };
                let nexus = sess.nexus;
                let Some(tg) = sess.target.clone() else {
                    return;
                };
                let entry = tg.lun(lun).cloned();
                if !target_wide && entry.is_none() {
                    pdu::TMF_RSP_LUN_DOES_NOT_EXIST
                } else {
                    // This nexus's own tasks end without a response (SAM-5 §7).
                    let slots: Vec<usize> = self
                        .tasks
                        .slots()
                        .filter(|(_, x)| target_wide || x.lun == lun)
                        .map(|(i, _)| i)
                        .collect();
                    for s in slots {
                        self.abort_slot(s, cx.port);
                    }
                    // Unit attentions: a reset is seen by every I_T nexus, the requester's
                    // included (SAM-5 §7.7, §7.8).
                    match t.function {
                        pdu::TMF_LOGICAL_UNIT_RESET => {
                            if let Some(e) = &entry {
                                e.device.add_ua_all(0x29, 0x03);
                                e.device.clear_prevent_removal();
                            }
                        }
                        pdu::TMF_TARGET_WARM_RESET | pdu::TMF_TARGET_COLD_RESET => {
                            for l in &tg.luns {
                                l.device.add_ua_all(0x29, 0x00);
                                l.device.clear_prevent_removal();
                            }
                        }
                        _ => {}
                    }
                    // CLEAR TASK SET and the resets also end the tasks of every other nexus
                    // (with TASK ABORTED, TAS=1), on whichever reactor they run; ABORT TASK SET
                    // is the requester's own business. The response waits for all reactors.
                    if t.function != pdu::TMF_ABORT_TASK_SET {
                        self.tmf_out = Some((
                            AbortScope {
                                target: tg.name.clone(),
                                lun: (!target_wide).then_some(lun),
                                requester: nexus,
                                close: t.function == pdu::TMF_TARGET_COLD_RESET,
                            },
                            t.itt,
                        ));
                        if t.function == pdu::TMF_TARGET_COLD_RESET {
                            // RFC 7143 §11.5.1: every connection ends, this one after the
                            // response.
                            self.close_after_tmf = true;
                        }
                        return;
                    }
                    pdu::TMF_RSP_COMPLETE
                }
            }
            // No ACA condition ever exists (NACA=1 is refused), so there is none to clear.
            pdu::TMF_CLEAR_ACA => {
                let known = self
                    .sess
                    .as_ref()
                    .and_then(|s| s.target.as_ref())
                    .is_some_and(|tg| tg.lun(lun).is_some());
                if known {
                    pdu::TMF_RSP_COMPLETE
                } else {
                    pdu::TMF_RSP_LUN_DOES_NOT_EXIST
                }
            }
            // ERL 0 has no task reassignment (RFC 7143 §11.5.1).
            pdu::TMF_TASK_REASSIGN => pdu::TMF_RSP_REASSIGN_NOT_SUPPORTED,
            _ => pdu::TMF_RSP_NOT_SUPPORTED,
        };
        self.respond_tmf(t.itt, response);
        let _ = cx;
    }

    /// Whether a task aborted here still has I/O out in the backend.
    pub fn has_aborted_in_backend(&self) -> bool {
        self.tasks
            .slots()
            .any(|(_, t)| t.state == TaskState::Aborted && t.in_backend)
    }

    /// Answers a task management request once no task it aborted can still reach the medium.
    fn respond_tmf(&mut self, itt: u32, response: u8) {
        self.tmf_deferred.push((itt, response));
        self.release_tmf();
    }

    /// Sends the held task management responses, in order, when their aborted tasks are back.
    fn release_tmf(&mut self) {
        if self.tmf_deferred.is_empty() || self.has_aborted_in_backend() {
            return;
        }
        for (itt, response) in std::mem::take(&mut self.tmf_deferred) {
            self.queue_tmf_response(itt, response);
        }
        if self.close_after_tmf {
            self.close_after_tmf = false;
            self.phase = Phase::Closing;
        }
    }

    fn queue_tmf_response(&mut self, itt: u32, response: u8) {
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        update_max_cmd_sn(sess, self.tasks.active);
        let rsp = pdu::TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        rsp.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
    }

    /// Every reactor has applied this connection's task management function (`tmf_out`):
    /// answer it.
    pub fn tmf_done(&mut self, itt: u32) {
        self.respond_tmf(itt, pdu::TMF_RSP_COMPLETE);
    }

    /// Another nexus's task management function reaches this connection: end the tasks it
    /// covers with TASK ABORTED (TAS=1, SPC-4 §7.5.8), or close the connection for a cold
    /// reset.
    pub fn apply_abort(&mut self, scope: &AbortScope, cx: &mut ConnCtx<'_>) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        if sess.nexus == scope.requester
            || sess.target.as_ref().is_none_or(|t| t.name != scope.target)
        {
            return;
        }
        if scope.close {
            self.close(cx, "target cold reset by another initiator");
            return;
        }
        let hit: Vec<(usize, u32, bool)> = self
            .tasks
            .slots()
            .filter(|(_, x)| {
                !matches!(x.state, TaskState::Responding | TaskState::Aborted)
                    && scope.lun.is_none_or(|l| x.lun == l)
            })
            .map(|(i, x)| (i, x.itt, x.in_backend))
            .collect();
        for (slot, itt, in_backend) in hit {
            self.abort_slot(slot, cx.port);
            if in_backend {
                // TASK ABORTED only once its I/O can no longer reach the medium.
                if let Some(t) = self.tasks.get_mut(slot) {
                    t.answer_aborted = true;
                }
            } else {
                self.queue_task_aborted(itt);
            }
        }
    }

    /// A SCSI Response with status TASK ABORTED for a task another nexus's TMF ended.
    fn queue_task_aborted(&mut self, itt: u32) {
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        let rsp = pdu::ScsiResponse {
            itt,
            response: 0,
            status: scsi::exec::STATUS_TASK_ABORTED,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        rsp.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
    }

    /// Aborts one task: no response is sent for it (RFC 7143 §4.2.3.4 / SAM-5 ABORT TASK).
    fn abort_slot(&mut self, slot: usize, port: &mut ScsiPort) {
        let info = self.sess.as_ref().and_then(|s| s.info.clone());
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.state == TaskState::Responding {
            // Its answer is already queued: let it go out.
            return;
        }
        let in_backend = t.in_backend;
        if in_backend {
            // A read-modify-write that has not written yet must not write after the abort.
            port.abort(t.scsi.tag);
        }
        t.state = TaskState::Aborted;
        self.tasks.retire(slot);
        if let Some(info) = &info {
            info.active_commands.fetch_sub(1, Ordering::Relaxed);
        }
        if !in_backend {
            self.remove_task(slot);
        }
    }

    fn abort_all(&mut self, port: &mut ScsiPort) {
        let slots: Vec<usize> = self.tasks.slots().map(|(i, _)| i).collect();
        for s in slots {
            self.abort_slot(s, port);
        }
    }

    fn queue_reject(&mut self, reason: u8, raw: &[u8; BHS_LEN]) {
        let (exp_cmd_sn, max_cmd_sn) = self
            .sess
            .as_ref()
            .map_or((0, 0), |s| (s.exp_cmd_sn, s.max_cmd_sn));
        let rej = pdu::Reject {
            reason,
            stat_sn: self.stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            data_sn: 0,
            data_segment_length: BHS_LEN as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        rej.emit(&mut bhs);
        self.tx
            .push(TxPdu::new(bhs, TxData::Owned(raw.to_vec()), BHS_LEN));
    }

    // ---------------------------------------------------------------- transmit, timers, close

    /// Writes what is queued. Returns whether anything remains queued.
    pub fn flush(&mut self, cx: &mut ConnCtx<'_>) -> bool {
        if self.phase == Phase::Closed {
            return false;
        }
        self.done_slots.clear();
        let sent_before = self.tx.sent_total();
        let tasks = &self.tasks;
        let res = self.tx.flush(
            cx.net,
            self.sock,
            |s| tasks.get(s).and_then(|t| t.scsi.buf.as_ref()),
            &mut self.done_slots,
        );
        for i in 0..self.done_slots.len() {
            let slot = self.done_slots[i];
            if let Some(t) = self.tasks.get_mut(slot) {
                t.tx_refs = t.tx_refs.saturating_sub(1);
                if t.tx_refs == 0 && !t.in_backend && t.state == TaskState::Responding {
                    self.remove_task(slot);
                }
            }
        }
        // A socket that takes nothing for RspTimeout gets the connection closed (on_timer):
        // its queued Data-In holds buffers other sessions need.
        self.tx_stalled_since = match &res {
            Ok(false) if self.tx.sent_total() == sent_before => {
                Some(self.tx_stalled_since.unwrap_or(cx.now))
            }
            Ok(false) => Some(cx.now),
            _ => None,
        };
        match res {
            Ok(true) => {
                self.want_write = false;
                if self.phase == Phase::Closing {
                    self.close(cx, "closed after final response");
                }
                false
            }
            Ok(false) => {
                self.want_write = true;
                true
            }
            Err(e) => {
                self.close(cx, &format!("send failed: {e}"));
                false
            }
        }
    }

    /// Timers: login timeout, NOP-In keepalive, RspTimeout (seed semantics: a command that
    /// waits on the initiator, or a NOP-In ping unanswered, for RspTimeout closes the
    /// connection). Returns the next deadline.
    pub fn on_timer(&mut self, cx: &mut ConnCtx<'_>) -> Option<Instant> {
        let now = cx.now;
        match self.phase {
            Phase::Login => {
                if self.reinstating {
                    self.check_reinstatement(cx);
                    return Some(self.login_deadline);
                }
                let silent_until = self.login_deadline - LOGIN_TIMEOUT + SILENT_LIMIT;
                if !self.heard && now >= silent_until {
                    self.close(cx, "nothing received within 10 s of connecting");
                    return None;
                }
                if now >= self.login_deadline {
                    self.close(cx, "login timed out");
                    return None;
                }
                return Some(if self.heard {
                    self.login_deadline
                } else {
                    silent_until
                });
            }
            Phase::Closing => {
                // What is left to send before the close must drain too.
                if let Some(t) = self.tx_stalled_since {
                    if now >= t + CLOSING_DRAIN_LIMIT {
                        self.close(cx, "the initiator stopped reading before the close");
                        return None;
                    }
                    return Some(t + CLOSING_DRAIN_LIMIT);
                }
                return None;
            }
            Phase::Closed => return None,
            Phase::FullFeature => {}
        }
        if let Some(info) = self.sess.as_ref().and_then(|s| s.info.as_ref()) {
            if info.close_requested.load(Ordering::Relaxed) {
                self.close(cx, "closed by force_close");
                return None;
            }
        }
        let (rsp, nop_interval) = match &self.sess {
            Some(s) => (
                Duration::from_secs(u64::from(s.params.rsp_timeout.max(1))),
                Duration::from_secs(u64::from(s.params.nop_in_interval)),
            ),
            None => return None,
        };
        if let Some((_, sent)) = self.nop_ping {
            if now >= sent + rsp {
                self.close(cx, "no answer to NOP-In within RspTimeout");
                return None;
            }
        }
        if let Some(t) = self.tx_stalled_since {
            if now >= t + rsp {
                self.close(
                    cx,
                    "the initiator read none of its responses for RspTimeout",
                );
                return None;
            }
        }
        let oldest_wait = self
            .tasks
            .slots()
            .filter_map(|(_, t)| t.waiting_since)
            .min();
        if let Some(w) = oldest_wait {
            if now >= w + rsp {
                self.close(
                    cx,
                    "a command waited on the initiator longer than RspTimeout",
                );
                return None;
            }
        }
        let mut next = oldest_wait.map(|w| w + rsp);
        if !nop_interval.is_zero() {
            match self.nop_ping {
                Some((_, sent)) => next = min_deadline(next, Some(sent + rsp)),
                None => {
                    let due = self.last_rx + nop_interval;
                    if now >= due {
                        self.send_nop_in(now);
                        self.flush(cx);
                        next = min_deadline(next, Some(now + rsp));
                    } else {
                        next = min_deadline(next, Some(due));
                    }
                }
            }
        }
        next
    }

    fn send_nop_in(&mut self, now: Instant) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let ttt = self.next_nop_ttt;
        self.next_nop_ttt = self.next_nop_ttt.wrapping_add(1).max(1);
        if self.next_nop_ttt == pdu::RESERVED_TAG {
            self.next_nop_ttt = 1;
        }
        let nop = pdu::NopIn {
            lun: 0,
            itt: pdu::RESERVED_TAG,
            ttt,
            // RFC 7143 §11.19: StatSN is not advanced for a ping.
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        nop.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
        self.nop_ping = Some((ttt, now));
    }

    /// Queues an Asynchronous Message (RFC 7143 §11.9); it takes a StatSN like a response.
    fn queue_async(&mut self, event: u8, lun: u64, param3: u16, data: Vec<u8>) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let m = pdu::AsyncMessage {
            lun: pdu::encode_lun(lun),
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            async_event: event,
            parameter3: param3,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        m.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    /// Asks the initiator to log out within `secs` seconds (AsyncEvent 1), as the target
    /// does before it stops. Returns whether the connection is in full feature phase (and so
    /// was asked).
    pub fn request_logout(&mut self, secs: u16) -> bool {
        if self.phase != Phase::FullFeature || self.sess.is_none() {
            return false;
        }
        self.queue_async(1, 0, secs, Vec::new());
        true
    }

    /// Closes the connection and ends its session.
    pub fn close(&mut self, cx: &mut ConnCtx<'_>, why: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        info!("{}: connection closed: {why}", self.peer);
        self.phase = Phase::Closed;
        self.abort_all(cx.port);
        self.done_slots.clear();
        self.tx.clear(&mut self.done_slots);
        for i in 0..self.done_slots.len() {
            let slot = self.done_slots[i];
            if let Some(t) = self.tasks.get_mut(slot) {
                t.tx_refs = t.tx_refs.saturating_sub(1);
                if t.tx_refs == 0 && !t.in_backend {
                    self.remove_task(slot);
                }
            }
        }
        let leftovers: Vec<usize> = self
            .tasks
            .slots()
            .filter(|(_, t)| !t.in_backend)
            .map(|(i, _)| i)
            .collect();
        for s in leftovers {
            self.remove_task(s);
        }
        self.tmf_deferred.clear();
        if let Some(sess) = self.sess.take() {
            if let Some(info) = &sess.info {
                let mut conns = info.connections.lock().unwrap_or_else(|e| e.into_inner());
                for c in conns.iter_mut() {
                    c.state = "closing".into();
                }
            }
            self.ended = Some(sess);
        }
        self.release_session(&cx.shared.registry);
        cx.net.close(self.sock);
    }

    /// Ends the session of a closed connection once none of its I/O is out in the backend:
    /// until then it stays in the registry (so a new login of the same I_T nexus waits for
    /// it), and its aborted writes can still land.
    pub fn release_session(&mut self, registry: &crate::iscsi::registry::Registry) {
        if self.tasks.slots().any(|(_, t)| t.in_backend) {
            return;
        }
        let Some(sess) = self.ended.take() else {
            return;
        };
        if let (Some(info), Some(t)) = (&sess.info, &sess.target) {
            registry.remove(&t.name, info.sid);
            for l in &t.luns {
                l.device.unregister_nexus(sess.nexus);
            }
        }
    }

    /// A new configuration snapshot: keep the session's view of its target current and raise
    /// REPORTED LUNS DATA HAS CHANGED when its LUN map changed (SPC-4 §5.14).
    pub fn on_snapshot(&mut self, snap: &Snapshot, cx: &mut ConnCtx<'_>) {
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        let Some(old) = sess.target.clone() else {
            return;
        };
        let mut changed = false;
        match snap.targets.get(&old.name) {
            None => {
                self.close(cx, "target deleted");
            }
            Some(new) => {
                // The LUN set this initiator sees now (its group may have changed).
                let new = new.view_for(&sess.params.initiator_name);
                let old_luns: Vec<(u64, &str)> =
                    old.luns.iter().map(|l| (l.lun, l.device.name())).collect();
                let new_luns: Vec<(u64, &str)> =
                    new.luns.iter().map(|l| (l.lun, l.device.name())).collect();
                if old_luns != new_luns {
                    for l in &new.luns {
                        if old.lun(l.lun).is_none() {
                            l.device.register_nexus(sess.nexus);
                        }
                    }
                    if !sess.pending_ua.contains(&(0x3f, 0x0e)) {
                        sess.pending_ua.push((0x3f, 0x0e));
                        // And tell the initiator now: a SCSI asynchronous event carrying the
                        // same sense (RFC 7143 §11.9.1, AsyncEvent 0).
                        changed = true;
                    }
                }
                sess.target = Some(new.clone());
            }
        }
        if changed {
            let mut sense = scsi::sense::Sense::new(scsi::sense::UNIT_ATTENTION, (0x3f, 0x0e))
                .to_fixed()
                .to_vec();
            let mut data = (sense.len() as u16).to_be_bytes().to_vec();
            data.append(&mut sense);
            self.queue_async(0, 0, 0, data);
        }
    }

    /// The I_T nexus of the session, once logged in.
    pub fn nexus(&self) -> Option<u64> {
        self.sess.as_ref().map(|s| s.nexus)
    }

    /// Whether the connection is in full feature phase (for the reactor's load count).
    pub fn is_logged_in(&self) -> bool {
        self.phase == Phase::FullFeature
    }
}

fn update_max_cmd_sn(sess: &mut Session, active: usize) {
    // MaxCmdSN = ExpCmdSN + QueuedCommands - 1 - (commands still outstanding), never moving
    // backwards (initiators ignore a smaller value anyway, RFC 7143 §4.2.2.1).
    let queued = sess.params.queued_commands.max(1);
    let free = queued.saturating_sub(active as u32);
    let candidate = sess.exp_cmd_sn.wrapping_add(free).wrapping_sub(1);
    if seq::lt(sess.max_cmd_sn, candidate) {
        sess.max_cmd_sn = candidate;
    }
}

fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The address part of a TargetAddress value (`10.0.0.1:3260,1`, `[fe80::1]:3260,1`).
fn portal_ip(addr: &str) -> &str {
    let a = addr.split(',').next().unwrap_or(addr);
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    a.rsplit_once(':').map_or(a, |(ip, _)| ip)
}

/// The backend tag of a task: the connection's index on its reactor in the high half, the
/// task's slot in the low half.
fn task_tag(index: usize, slot: usize) -> u64 {
    ((index as u64) << 32) | (slot as u64 & 0xffff_ffff)
}

/// The connection index and task slot of a backend tag made by [`task_tag`].
pub fn split_task_tag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

fn isid_u48(isid: &[u8; 6]) -> u64 {
    isid.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

fn login_resp(r: &crate::iscsi::login::LoginResponseFields, exp_cmd_sn: u32) -> pdu::LoginResponse {
    pdu::LoginResponse {
        transit: r.transit,
        cont: r.cont,
        csg: r.csg,
        nsg: r.nsg,
        version_max: r.version_max,
        version_active: r.version_active,
        isid: r.isid,
        tsih: r.tsih,
        itt: r.itt,
        status_class: r.status_class,
        status_detail: r.status_detail,
        exp_cmd_sn,
        max_cmd_sn: exp_cmd_sn,
        ..Default::default()
    }
}

fn cmd_header(cmd: &pdu::ScsiCommand) -> [u8; BHS_LEN] {
    let mut raw = [0u8; BHS_LEN];
    cmd.emit(&mut raw);
    raw
}

fn opcode_name(byte0: u8) -> &'static str {
    match byte0 & 0x3f {
        0x00 => "NOP-Out",
        0x01 => "SCSI Command",
        0x02 => "Task Management",
        0x04 => "Text",
        0x05 => "Data-Out",
        0x06 => "Logout",
        0x10 => "SNACK",
        _ => "unexpected",
    }
}

/// A data buffer of `len` bytes for a session that holds `held` bytes of its `share`: `None`
/// when the pool is exhausted or the session would exceed its share (the command then waits,
/// as for an exhausted pool). A session holding nothing may always try.
fn session_alloc(held: &mut usize, share: usize, len: usize) -> Option<DataBuf> {
    if *held > 0 && held.saturating_add(len) > share {
        return None;
    }
    let buf = DataBuf::alloc(len)?;
    *held += buf.len();
    Some(buf)
}

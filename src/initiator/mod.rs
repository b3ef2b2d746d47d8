//! A small blocking iSCSI initiator (RFC 7143), used by the tests and the benchmark tool. It
//! runs over any [`Transport`]: the kernel's TCP (`std::net::TcpStream`, what
//! [`Initiator::connect`] opens) or the userspace stack's client
//! ([`crate::net::ustack::client`], through [`Initiator::with_transport`]).
//!
//! One connection per session, no digests, ErrorRecoveryLevel 0, no authentication. Login
//! goes through the security stage (AuthMethod=None) and the operational stage to full feature
//! phase. Commands may be pipelined ([`Initiator::submit`] / [`Initiator::wait_any`]) within
//! the target's CmdSN window; write data goes as immediate data, unsolicited Data-Out and
//! answers to R2Ts as negotiated; Data-In is reassembled by buffer offset. Target NOP-In pings
//! are answered while waiting. Raw access ([`Initiator::send_raw`], [`Initiator::recv_pdu`])
//! lets tests send malformed PDUs.
//!
//! Waits block on the socket, for at most the timeout ([`Initiator::set_timeout`]) per read or
//! write. A caller that must look at the clock while it waits (the benchmark's per-command
//! timeout) sets an idle tick instead ([`Initiator::set_idle_tick`]): a wait that sees no PDU
//! begin within a tick returns [`InitiatorError::Idle`] with nothing lost, and a PDU already
//! begun is read to its end as long as bytes keep coming within the timeout.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::iscsi::pdu::{self, op, BHS_LEN, RESERVED_TAG};
use crate::iscsi::seq;
use crate::iscsi::text;

pub mod cdb;
pub mod transport;

pub use transport::Transport;

/// RFC 7143 §13.12: MaxRecvDataSegmentLength in force until declared (and during login).
const DEFAULT_MRDSL: u32 = 8192;
/// What this initiator declares unless the caller proposes its own value.
const OWN_MRDSL: u32 = 262_144;
/// How many Login Request/Response exchanges a login may take.
const MAX_LOGIN_ROUNDS: usize = 16;
/// Default socket timeout for blocking reads and writes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// SAM status codes.
pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    /// The socket failed (timeouts included).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The target closed the connection.
    #[error("connection closed by the target")]
    Closed,
    /// The target answered a Login Request with a non-zero status (RFC 7143 §11.13.5).
    #[error("login rejected: status class {class:#04x}, detail {detail:#04x}")]
    LoginRejected { class: u8, detail: u8 },
    /// The target redirected the login (status class 1) to this TargetAddress.
    #[error("login redirected ({}) to {address}", if *permanent { "permanently" } else { "temporarily" })]
    Redirected { address: String, permanent: bool },
    /// The target broke the protocol (or sent something this initiator does not handle).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The target answered a request with a Reject PDU (RFC 7143 §11.17).
    #[error("request with ITT {itt:#x} rejected, reason {reason:#04x}")]
    Rejected { itt: u32, reason: u8 },
    /// A SCSI command ended with a status other than GOOD (convenience helpers only).
    #[error("SCSI status {status:#04x}, sense {sense:02x?}")]
    Scsi { status: u8, sense: Vec<u8> },
    /// The caller asked for something that cannot be sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A text key=value segment did not parse.
    #[error("bad text segment: {0}")]
    Text(#[from] text::TextError),
    /// No PDU began to arrive within the idle tick ([`Initiator::set_idle_tick`]): nothing was
    /// lost, the connection goes on and the wait may be called again.
    #[error("no PDU arrived within the idle tick")]
    Idle,
}

pub type Result<T, E = InitiatorError> = std::result::Result<T, E>;

/// How to log in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub initiator_name: String,
    /// `None`: a discovery session.
    pub target_name: Option<String>,
    pub isid: [u8; 6],
    /// Operational keys to propose, e.g. `("ImmediateData", "No")`. They replace the
    /// initiator's own proposals of the same key (HeaderDigest, DataDigest,
    /// MaxRecvDataSegmentLength).
    pub keys: Vec<(String, String)>,
    /// The CmdSN of the Login Requests, and so of the first command.
    pub cmd_sn: u32,
    /// The CID of the connection.
    pub cid: u16,
    /// The TSIH of the Login Requests: 0 for a new session, a running session's to add a
    /// connection to it.
    pub tsih: u16,
    /// CHAP credentials: AuthMethod=CHAP instead of None.
    pub chap: Option<ChapOptions>,
}

/// How the initiator authenticates with CHAP (RFC 7143 §12.1.3).
#[derive(Debug, Clone)]
pub struct ChapOptions {
    pub user: String,
    pub secret: String,
    /// The CHAP_A list to offer, e.g. "5" (MD5) or "8,7,6,5".
    pub algorithms: String,
    /// Mutual CHAP: the target must answer as this user with this secret.
    pub mutual: Option<(String, String)>,
}

impl Default for LoginOptions {
    fn default() -> Self {
        LoginOptions {
            initiator_name: "iqn.2026-11.org.iscsi-tgt:initiator".into(),
            target_name: None,
            isid: [0x80, 0x00, 0x00, 0x00, 0x00, 0x01],
            keys: Vec::new(),
            cmd_sn: 1,
            cid: 0,
            tsih: 0,
            chap: None,
        }
    }
}

/// The operational values in force after login (RFC 7143 §13 defaults for keys not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The largest data segment this initiator receives (its own declaration).
    pub max_recv_data_segment_length: u32,
    /// The largest data segment this initiator may send (the target's declaration).
    pub max_xmit_data_segment_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u32,
    /// CRC32C header and data digests in force.
    pub header_digest: bool,
    pub data_digest: bool,
    /// Every key the target sent during login, in order.
    pub target_keys: Vec<(String, String)>,
}

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated {
            max_recv_data_segment_length: DEFAULT_MRDSL,
            max_xmit_data_segment_length: DEFAULT_MRDSL,
            immediate_data: true,
            initial_r2t: true,
            first_burst_length: 65_536,
            max_burst_length: 262_144,
            max_outstanding_r2t: 1,
            header_digest: false,
            data_digest: false,
            target_keys: Vec::new(),
        }
    }
}

/// The residual of a command (RFC 7143 §11.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// The target transferred this many bytes less than the expected length.
    Underflow(u32),
    /// The command wanted this many bytes more than the expected length.
    Overflow(u32),
}

/// The outcome of one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResult {
    /// iSCSI Response (0: command completed at target).
    pub response: u8,
    /// SAM status.
    pub status: u8,
    /// Sense data (without the SenseLength prefix).
    pub sense: Vec<u8>,
    /// Data-In, up to the highest offset the target sent.
    pub data: Vec<u8>,
    pub residual: Residual,
}

impl ScsiResult {
    pub fn is_good(&self) -> bool {
        self.response == 0 && self.status == STATUS_GOOD
    }

    /// The sense key of fixed or descriptor format sense data.
    pub fn sense_key(&self) -> Option<u8> {
        match self.sense.first()? & 0x7f {
            0x70 | 0x71 => self.sense.get(2).map(|k| k & 0x0f),
            0x72 | 0x73 => self.sense.get(1).map(|k| k & 0x0f),
            _ => None,
        }
    }

    /// ASC and ASCQ of fixed or descriptor format sense data.
    pub fn asc_ascq(&self) -> Option<(u8, u8)> {
        let (a, b) = match self.sense.first()? & 0x7f {
            0x70 | 0x71 => (12, 13),
            0x72 | 0x73 => (2, 3),
            _ => return None,
        };
        Some((*self.sense.get(a)?, *self.sense.get(b)?))
    }

    /// `Ok(self)` when the status is GOOD, otherwise [`InitiatorError::Scsi`].
    pub fn good(self) -> Result<ScsiResult> {
        if self.is_good() {
            Ok(self)
        } else {
            Err(InitiatorError::Scsi {
                status: self.status,
                sense: self.sense,
            })
        }
    }
}

/// Counters of what went over the wire, for tests that check how data moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub commands: u64,
    pub immediate_bytes: u64,
    /// Data-Out PDUs sent without an R2T (TTT 0xffffffff).
    pub unsolicited_data_out: u64,
    pub unsolicited_bytes: u64,
    pub r2ts: u64,
    /// Data-Out PDUs sent for R2Ts.
    pub solicited_data_out: u64,
    pub data_in: u64,
    /// The largest data segment received in a Data-In PDU.
    pub max_data_in_segment: u32,
    /// The largest data segment sent in a Data-Out PDU or as immediate data.
    pub max_data_out_segment: u32,
}

/// A PDU as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawPdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl RawPdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    pub fn itt(&self) -> u32 {
        be32(&self.bhs[16..20])
    }
}

/// A command in flight.
struct Task {
    lun: u64,
    /// The CmdSN the command carried (the RefCmdSN of an ABORT TASK for it).
    cmd_sn: u32,
    /// Write data (empty for reads).
    data_out: Vec<u8>,
    /// Data-In buffer, EDTL bytes.
    data_in: Vec<u8>,
    /// The highest offset + length of Data-In received.
    in_extent: usize,
    next_data_sn: u32,
    error: Option<String>,
}

/// How a write's data goes out before any R2T: `(immediate, unsolicited Data-Out)` lengths.
pub fn unsolicited_split(len: u32, n: &Negotiated) -> (u32, u32) {
    let first_burst = n.first_burst_length.min(len);
    let immediate = if n.immediate_data {
        first_burst.min(n.max_xmit_data_segment_length)
    } else {
        0
    };
    let data_out = if n.initial_r2t {
        0
    } else {
        first_burst - immediate
    };
    (immediate, data_out)
}

/// Splits `offset..offset + len` into data segments of at most `max` bytes.
pub fn segments(offset: u32, len: u32, max: u32) -> Vec<(u32, u32)> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(max);
        out.push((offset + pos, n));
        pos += n;
    }
    out
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The ITT of the header a Reject carries as its data (RFC 7143 §11.17.3), if it carries one.
fn rejected_itt(p: &RawPdu) -> Option<u32> {
    (p.data.len() >= BHS_LEN).then(|| be32(&p.data[16..20]))
}

/// The connection, apart from the task table so that both can be borrowed at once. Reads go
/// through the buffer; writes go straight to the transport under it.
struct Wire<T> {
    reader: BufReader<T>,
    /// How long a read or write may wait for a byte (`None`: without end).
    timeout: Option<Duration>,
    /// The idle tick: the transport's own timeout while set, so that a wait for the next PDU
    /// returns [`InitiatorError::Idle`] each tick; a transfer under way retries until
    /// `timeout` has passed without a byte.
    tick: Option<Duration>,
    /// CRC32C digests in force (after login).
    header_digest: bool,
    data_digest: bool,
    /// Test hooks: send the next header or data digest wrong.
    corrupt_header: bool,
    corrupt_data: bool,
}

impl<T: Transport> Wire<T> {
    fn send(&mut self, bhs: &[u8; BHS_LEN], ahs: &[u8], data: &[u8]) -> Result<()> {
        let mut buf = Vec::with_capacity(BHS_LEN + ahs.len() + pdu::padded(data.len()) + 8);
        buf.extend_from_slice(bhs);
        buf.extend_from_slice(ahs);
        if self.header_digest {
            let mut crc = crc32c::crc32c(&buf);
            if std::mem::take(&mut self.corrupt_header) {
                crc ^= 1;
            }
            buf.extend_from_slice(&crc.to_le_bytes());
        }
        let start = buf.len();
        buf.extend_from_slice(data);
        buf.resize(start + pdu::padded(data.len()), 0);
        if self.data_digest && !data.is_empty() {
            let mut crc = crc32c::crc32c(&buf[start..]);
            if std::mem::take(&mut self.corrupt_data) {
                crc ^= 1;
            }
            buf.extend_from_slice(&crc.to_le_bytes());
        }
        self.write_full(&buf)
    }

    /// The transport's timeout: the idle tick while one is set (never longer than the
    /// timeout), else the timeout.
    fn transport_timeout(&self) -> Option<Duration> {
        match (self.tick, self.timeout) {
            (Some(k), Some(t)) => Some(k.min(t)),
            (Some(k), None) => Some(k),
            (None, t) => t,
        }
    }

    fn apply_timeout(&mut self) -> Result<()> {
        let t = self.transport_timeout();
        self.reader.get_mut().set_timeout(t)?;
        Ok(())
    }

    /// Whether a transfer that has waited `stalled` without a byte, in timeouts of the
    /// transport, has waited too long.
    fn stalled_out(&self, stalled: Duration) -> bool {
        self.timeout.is_some_and(|t| stalled >= t)
    }

    /// Writes all of `buf`. Without an idle tick a timeout of the transport fails the write;
    /// with one, the write goes on from where it stopped until `timeout` has passed without
    /// a byte taken (a PDU cut short would desynchronise the stream).
    fn write_full(&mut self, buf: &[u8]) -> Result<()> {
        let Some(step) = self.tick.and(self.transport_timeout()) else {
            return self.reader.get_mut().write_all(buf).map_err(io_err);
        };
        let (mut sent, mut stalled) = (0, Duration::ZERO);
        while sent < buf.len() {
            match self.reader.get_mut().write(&buf[sent..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => {
                    sent += n;
                    stalled = Duration::ZERO;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    stalled += step;
                    if self.stalled_out(stalled) {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    /// Fills `buf`. Without an idle tick a timeout of the transport fails the read; with one,
    /// a timeout before the first byte of a PDU (`pdu_start`) is [`InitiatorError::Idle`], and
    /// one in the middle of a PDU is waited through, what was read kept, until `timeout` has
    /// passed without a byte.
    fn read_full(&mut self, buf: &mut [u8], pdu_start: bool) -> Result<()> {
        let Some(step) = self.tick.and(self.transport_timeout()) else {
            return self.reader.read_exact(buf).map_err(io_err);
        };
        let (mut got, mut stalled) = (0, Duration::ZERO);
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => return Err(InitiatorError::Closed),
                Ok(n) => {
                    got += n;
                    stalled = Duration::ZERO;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if pdu_start && got == 0 {
                        return Err(InitiatorError::Idle);
                    }
                    stalled += step;
                    if self.stalled_out(stalled) {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<RawPdu> {
        let mut bhs = [0u8; BHS_LEN];
        self.read_full(&mut bhs, true)?;
        let ahs_len = usize::from(bhs[4]) * 4;
        let dsl = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
        let mut ahs = vec![0u8; ahs_len];
        self.read_full(&mut ahs, false)?;
        if self.header_digest {
            let mut d = [0u8; 4];
            self.read_full(&mut d, false)?;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&bhs), &ahs);
            if crc.to_le_bytes() != d {
                return Err(InitiatorError::Protocol("header digest error".into()));
            }
        }
        let mut data = vec![0u8; pdu::padded(dsl)];
        self.read_full(&mut data, false)?;
        if self.data_digest && dsl > 0 {
            let mut d = [0u8; 4];
            self.read_full(&mut d, false)?;
            if crc32c::crc32c(&data).to_le_bytes() != d {
                return Err(InitiatorError::Protocol("data digest error".into()));
            }
        }
        data.truncate(dsl);
        Ok(RawPdu { bhs, ahs, data })
    }
}

fn io_err(e: io::Error) -> InitiatorError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        InitiatorError::Closed
    } else {
        InitiatorError::Io(e)
    }
}

/// Whether `e` is a transport's timeout (the kernel's sockets say `WouldBlock`).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Read buffer of the connection: a Data-In PDU of the MaxRecvDataSegmentLength this
/// initiator declares fits whole.
const READ_BUFFER: usize = 256 * 1024;

/// One connection (and session) to a target, over the kernel's TCP unless built over another
/// transport.
pub struct Initiator<T = TcpStream> {
    /// The CHAP algorithm of a mutual exchange under way.
    chap_alg: Option<crate::iscsi::chap::Algorithm>,
    wire: Wire<T>,
    neg: Negotiated,
    logged_in: bool,
    isid: [u8; 6],
    cid: u16,
    tsih: u16,
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    /// The ATTR field of the SCSI commands sent (RFC 7143 §11.3.1): 1, SIMPLE, unless set.
    task_attr: u8,
    tasks: HashMap<u32, Task>,
    done: VecDeque<(u32, Result<ScsiResult>)>,
    /// Answers to non-SCSI requests (text, NOP, logout, TMF) and Rejects of them.
    others: VecDeque<RawPdu>,
    /// Asynchronous Messages received.
    pub async_events: Vec<pdu::AsyncMessage>,
    /// How many target NOP-In pings were answered.
    pub nop_in_answered: u64,
    /// How many of our PDUs the target rejected for a data digest error.
    pub digest_rejects: u64,
    pub stats: Stats,
}

impl Initiator<TcpStream> {
    /// Opens a TCP connection (not yet logged in).
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Initiator> {
        Initiator::with_transport(transport::tcp_connect(addr)?)
    }
}

impl<T: Transport> Initiator<T> {
    /// An initiator over a connected transport (not yet logged in). Reads and writes block for
    /// at most 30 s until [`Initiator::set_timeout`] says otherwise.
    pub fn with_transport(mut stream: T) -> Result<Initiator<T>> {
        stream.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Initiator {
            chap_alg: None,
            wire: Wire {
                reader: BufReader::with_capacity(READ_BUFFER, stream),
                timeout: Some(DEFAULT_TIMEOUT),
                tick: None,
                header_digest: false,
                data_digest: false,
                corrupt_header: false,
                corrupt_data: false,
            },
            neg: Negotiated::default(),
            logged_in: false,
            isid: [0; 6],
            cid: 0,
            tsih: 0,
            cmd_sn: 1,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            task_attr: 1,
            tasks: HashMap::new(),
            done: VecDeque::new(),
            others: VecDeque::new(),
            async_events: Vec::new(),
            nop_in_answered: 0,
            digest_rejects: 0,
            stats: Stats::default(),
        })
    }

    /// The task attribute (the ATTR field, RFC 7143 §11.3.1: 1 SIMPLE, 2 ORDERED, 3 HEAD OF
    /// QUEUE, 4 ACA) of the commands submitted from now on.
    pub fn set_task_attr(&mut self, attr: u8) {
        self.task_attr = attr & 0x07;
    }

    /// Test hook: the next PDU sent carries a wrong header digest.
    pub fn corrupt_next_header_digest(&mut self) {
        self.wire.corrupt_header = true;
    }

    /// Test hook: the next PDU sent with data carries a wrong data digest.
    pub fn corrupt_next_data_digest(&mut self) {
        self.wire.corrupt_data = true;
    }

    /// Sets the timeout of blocking reads and writes (`None`: wait forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.wire.timeout = t;
        self.wire.apply_timeout()
    }

    /// Sets the idle tick (`None`: none, the default). With a tick, every wait (for a
    /// command, for the command window in [`Initiator::submit`], for an answer) that sees no
    /// PDU begin to arrive within it returns [`InitiatorError::Idle`], leaving the connection
    /// as it was; the timeout then bounds only a PDU under way (a stall between two of its
    /// bytes), and how long to wait for the next PDU is the caller's decision. The tick costs
    /// nothing while PDUs come: it is the transport's timeout, set here once.
    pub fn set_idle_tick(&mut self, tick: Option<Duration>) -> Result<()> {
        if tick.is_some_and(|t| t.is_zero()) {
            return Err(InitiatorError::InvalidArgument(
                "an idle tick of zero".into(),
            ));
        }
        self.wire.tick = tick;
        self.wire.apply_timeout()
    }

    /// A Reject the target sent that named no command in flight (nor an answer this
    /// initiator waits for): its reason and the ITT of the header it rejected, if it carried
    /// one. A Reject that names a command ends that command instead ([`Initiator::wait_next`]).
    pub fn unclaimed_reject(&self) -> Option<(u8, Option<u32>)> {
        self.others
            .iter()
            .find(|p| p.opcode() == op::REJECT)
            .map(|p| (p.bhs[2], rejected_itt(p)))
    }

    /// The underlying socket (for shutting it down, peeking at its state, ...).
    pub fn stream(&self) -> &T {
        self.wire.reader.get_ref()
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    pub fn isid(&self) -> [u8; 6] {
        self.isid
    }

    /// The CmdSN the next non-immediate request carries (not consumed).
    pub fn next_cmd_sn(&self) -> u32 {
        self.cmd_sn
    }

    /// Returns the CmdSN for a hand-made non-immediate request and advances it.
    pub fn consume_cmd_sn(&mut self) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        sn
    }

    pub fn exp_stat_sn(&self) -> u32 {
        self.exp_stat_sn
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn
    }

    /// How many commands are in flight.
    pub fn outstanding(&self) -> usize {
        self.tasks.len()
    }

    /// A fresh initiator task tag.
    pub fn alloc_itt(&mut self) -> u32 {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if itt != RESERVED_TAG && !self.tasks.contains_key(&itt) {
                return itt;
            }
        }
    }

    // ------------------------------------------------------------------ raw access

    /// Writes bytes to the socket as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.wire.reader.get_mut().write_all(bytes).map_err(io_err)
    }

    /// Sends one PDU: BHS, AHS, data and padding.
    pub fn send_pdu(&mut self, bhs: &[u8; BHS_LEN], ahs: &[u8], data: &[u8]) -> Result<()> {
        self.wire.send(bhs, ahs, data)
    }

    /// Receives the next PDU without acting on it (sequence numbers are still tracked).
    pub fn recv_pdu(&mut self) -> Result<([u8; BHS_LEN], Vec<u8>)> {
        let p = self.wire.recv()?;
        self.track_sns(&p);
        Ok((p.bhs, p.data))
    }

    // ------------------------------------------------------------------ login

    /// Logs in: security stage with AuthMethod=None, operational stage, full feature phase.
    pub fn login(&mut self, o: &LoginOptions) -> Result<()> {
        if self.logged_in {
            return Err(InitiatorError::InvalidArgument("already logged in".into()));
        }
        self.isid = o.isid;
        self.cid = o.cid;
        self.tsih = o.tsih;
        self.cmd_sn = o.cmd_sn;
        self.exp_cmd_sn = o.cmd_sn;
        self.max_cmd_sn = o.cmd_sn;
        let itt = self.alloc_itt();
        let mut security: Vec<(String, String)> =
            vec![("InitiatorName".into(), o.initiator_name.clone())];
        match &o.target_name {
            Some(t) => {
                security.push(("SessionType".into(), "Normal".into()));
                security.push(("TargetName".into(), t.clone()));
            }
            None => security.push(("SessionType".into(), "Discovery".into())),
        }
        security.push((
            "AuthMethod".into(),
            if o.chap.is_some() { "CHAP" } else { "None" }.into(),
        ));
        // Our challenge for mutual CHAP, once sent.
        let mut my_challenge: Option<(u8, Vec<u8>)> = None;
        let mut chap_sent_a = false;
        let mut operational: Vec<(String, String)> = vec![
            ("HeaderDigest".into(), "None".into()),
            ("DataDigest".into(), "None".into()),
            ("MaxRecvDataSegmentLength".into(), OWN_MRDSL.to_string()),
            // Proposed, not left to the RFC defaults, as other initiators do: a target that
            // limits them (SPDK's FirstBurstLength is 8 KiB) then says so in its answer
            // instead of refusing immediate data it never declared it would not take.
            ("InitialR2T".into(), "Yes".into()),
            ("ImmediateData".into(), "Yes".into()),
            ("FirstBurstLength".into(), "65536".into()),
            ("MaxBurstLength".into(), "262144".into()),
        ];
        for (k, v) in &o.keys {
            match operational.iter_mut().find(|(kk, _)| kk == k) {
                Some(e) => e.1 = v.clone(),
                None => operational.push((k.clone(), v.clone())),
            }
        }
        let mut neg = Negotiated::default();
        for (k, v) in &operational {
            apply_offer(&mut neg, k, v);
        }
        let offered = operational.clone();

        let mut stage = 0u8;
        let mut pending = security;
        let mut target_keys = Vec::new();
        let mut done = false;
        for _ in 0..MAX_LOGIN_ROUNDS {
            let nsg = if stage == 0 { 1 } else { 3 };
            let resp = self.login_exchange(itt, stage, nsg, &pending)?;
            pending.clear();
            let keys = text::parse(&resp.1)?;
            for (k, v) in &keys {
                apply_answer(&mut neg, &offered, k, v)?;
            }
            if let (0, Some(c)) = (stage, &o.chap) {
                pending = self.chap_step(c, &keys, &mut chap_sent_a, &mut my_challenge)?;
            }
            target_keys.extend(keys);
            let r = resp.0;
            if r.csg != stage {
                return Err(InitiatorError::Protocol(format!(
                    "Login Response for stage {} while in stage {stage}",
                    r.csg
                )));
            }
            if !r.transit {
                continue;
            }
            match (stage, r.nsg) {
                (0, 1) => {
                    stage = 1;
                    pending = operational.clone();
                }
                (_, 3) => {
                    self.tsih = r.tsih;
                    if self.tsih == 0 && o.target_name.is_some() {
                        return Err(InitiatorError::Protocol(
                            "final Login Response with TSIH 0".into(),
                        ));
                    }
                    self.exp_cmd_sn = r.exp_cmd_sn;
                    self.max_cmd_sn = r.max_cmd_sn;
                    done = true;
                    break;
                }
                (s, n) => {
                    return Err(InitiatorError::Protocol(format!(
                        "target moved from stage {s} to {n}, which was not asked for"
                    )))
                }
            }
        }
        if !done {
            return Err(InitiatorError::Protocol(format!(
                "login did not finish within {MAX_LOGIN_ROUNDS} exchanges"
            )));
        }
        neg.target_keys = target_keys;
        // Digests start with the first PDU after the final Login Response.
        self.wire.header_digest = neg.header_digest;
        self.wire.data_digest = neg.data_digest;
        self.neg = neg;
        self.logged_in = true;
        Ok(())
    }

    /// One CHAP step of the security stage: what to send after the target's `keys`.
    fn chap_step(
        &mut self,
        c: &ChapOptions,
        keys: &[(String, String)],
        sent_a: &mut bool,
        my_challenge: &mut Option<(u8, Vec<u8>)>,
    ) -> Result<Vec<(String, String)>> {
        use crate::iscsi::chap::{constant_time_eq, decode_binary, encode_hex, Algorithm};
        let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        let auth_failed = |why: &str| InitiatorError::Protocol(format!("CHAP: {why}"));
        if !*sent_a {
            if get("AuthMethod") != Some("CHAP") {
                return Err(auth_failed("the target did not choose CHAP"));
            }
            *sent_a = true;
            return Ok(vec![("CHAP_A".into(), c.algorithms.clone())]);
        }
        if let (Some(a), Some(i), Some(ch)) = (get("CHAP_A"), get("CHAP_I"), get("CHAP_C")) {
            let alg = Algorithm::from_code(a).ok_or_else(|| auth_failed("unknown CHAP_A"))?;
            if !c.algorithms.split(',').any(|x| x.trim() == a) {
                return Err(auth_failed("the target chose an algorithm not offered"));
            }
            let id: u8 = i.parse().map_err(|_| auth_failed("bad CHAP_I"))?;
            let ch = decode_binary(ch).ok_or_else(|| auth_failed("bad CHAP_C"))?;
            let mut out = vec![
                ("CHAP_N".to_string(), c.user.clone()),
                (
                    "CHAP_R".to_string(),
                    encode_hex(&alg.response(id, c.secret.as_bytes(), &ch)),
                ),
            ];
            if c.mutual.is_some() {
                let mut rnd = [0u8; 17];
                getrandom::fill(&mut rnd).map_err(|e| auth_failed(&e.to_string()))?;
                out.push(("CHAP_I".into(), rnd[0].to_string()));
                out.push(("CHAP_C".into(), encode_hex(&rnd[1..])));
                *my_challenge = Some((rnd[0], rnd[1..].to_vec()));
                self.chap_alg = Some(alg);
            }
            return Ok(out);
        }
        if let (Some((user, secret)), Some((id, ch))) = (&c.mutual, my_challenge.as_ref()) {
            let alg = self.chap_alg.ok_or_else(|| auth_failed("no algorithm"))?;
            let (Some(n), Some(r)) = (get("CHAP_N"), get("CHAP_R")) else {
                return Err(auth_failed(
                    "the target did not answer the mutual challenge",
                ));
            };
            let r = decode_binary(r).ok_or_else(|| auth_failed("bad CHAP_R"))?;
            let expect = alg.response(*id, secret.as_bytes(), ch);
            if n != user || !constant_time_eq(&r, &expect) {
                return Err(auth_failed("the target failed mutual authentication"));
            }
            *my_challenge = None;
        }
        Ok(Vec::new())
    }

    /// Sends one Login Request (T=1 towards `nsg`) and returns the whole answer, following
    /// continued responses (C=1).
    fn login_exchange(
        &mut self,
        itt: u32,
        csg: u8,
        nsg: u8,
        keys: &[(String, String)],
    ) -> Result<(pdu::LoginResponse, Vec<u8>)> {
        let data = text::encode(keys.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut text_out: Vec<u8> = Vec::new();
        // RFC 7143 §6.2: text beyond MaxRecvDataSegmentLength (8192 during login) is sent in
        // several PDUs with C=1.
        let chunks = segments(0, data.len() as u32, DEFAULT_MRDSL);
        let chunks = if chunks.is_empty() {
            vec![(0, 0)]
        } else {
            chunks
        };
        let last = chunks.len() - 1;
        for (i, (off, len)) in chunks.into_iter().enumerate() {
            let cont = i != last;
            let part = &data[off as usize..(off + len) as usize];
            let req = pdu::LoginRequest {
                transit: !cont,
                cont,
                csg,
                nsg: if cont { 0 } else { nsg },
                isid: self.isid,
                tsih: self.tsih,
                itt,
                cid: self.cid,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                data_segment_length: part.len() as u32,
                ..Default::default()
            };
            let mut bhs = [0u8; BHS_LEN];
            req.emit(&mut bhs);
            self.wire.send(&bhs, &[], part)?;
            let (r, d) = self.login_response(itt)?;
            if cont {
                if r.cont || !d.is_empty() {
                    return Err(InitiatorError::Protocol(
                        "target answered a continued Login Request with text".into(),
                    ));
                }
                continue;
            }
            text_out.extend_from_slice(&d);
            let mut r = r;
            while r.cont {
                // Ask for the rest of a continued response with an empty request.
                let req = pdu::LoginRequest {
                    csg,
                    nsg: 0,
                    isid: self.isid,
                    itt,
                    cid: self.cid,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                    ..Default::default()
                };
                let mut bhs = [0u8; BHS_LEN];
                req.emit(&mut bhs);
                self.wire.send(&bhs, &[], &[])?;
                let (r2, d2) = self.login_response(itt)?;
                text_out.extend_from_slice(&d2);
                r = r2;
            }
            return Ok((r, text_out));
        }
        Err(InitiatorError::Protocol("empty login exchange".into()))
    }

    fn login_response(&mut self, itt: u32) -> Result<(pdu::LoginResponse, Vec<u8>)> {
        let p = self.wire.recv()?;
        if p.opcode() != op::LOGIN_RESPONSE {
            return Err(InitiatorError::Protocol(format!(
                "expected a Login Response, got opcode {:#04x}",
                p.opcode()
            )));
        }
        let r = pdu::LoginResponse::parse(&p.bhs, &p.ahs)
            .map_err(|e| InitiatorError::Protocol(e.to_string()))?;
        self.exp_stat_sn = r.stat_sn.wrapping_add(1);
        if r.status_class == 1 {
            let address = text::parse(&p.data)
                .ok()
                .and_then(|k| k.into_iter().find(|(k, _)| k == "TargetAddress"))
                .map(|(_, v)| v)
                .unwrap_or_default();
            return Err(InitiatorError::Redirected {
                address,
                permanent: r.status_detail == 2,
            });
        }
        if r.status_class != 0 {
            return Err(InitiatorError::LoginRejected {
                class: r.status_class,
                detail: r.status_detail,
            });
        }
        if r.itt != itt {
            return Err(InitiatorError::Protocol(format!(
                "Login Response ITT {:#x}, expected {itt:#x}",
                r.itt
            )));
        }
        if r.isid != self.isid {
            return Err(InitiatorError::Protocol(
                "Login Response carries another ISID".into(),
            ));
        }
        Ok((r, p.data))
    }

    // ------------------------------------------------------------------ SCSI commands

    fn need_login(&self) -> Result<()> {
        if self.logged_in {
            Ok(())
        } else {
            Err(InitiatorError::InvalidArgument("not logged in".into()))
        }
    }

    /// Blocks until CmdSN may be sent (RFC 7143 §4.2.2.1: not beyond MaxCmdSN).
    fn wait_window(&mut self) -> Result<()> {
        while !seq::le(self.cmd_sn, self.max_cmd_sn) {
            self.pump()?;
        }
        Ok(())
    }

    /// Sends a SCSI command and its unsolicited data; returns its ITT. `data_out` makes it a
    /// write (W=1), `read` sets R=1; `edtl` is the Expected Data Transfer Length.
    pub fn submit(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<&[u8]>,
        edtl: u32,
        read: bool,
    ) -> Result<u32> {
        self.need_login()?;
        if cdb.is_empty() || cdb.len() > pdu::MAX_CDB {
            return Err(InitiatorError::InvalidArgument(format!(
                "a CDB of {} bytes (1 to {} allowed)",
                cdb.len(),
                pdu::MAX_CDB
            )));
        }
        self.wait_window()?;
        let itt = self.alloc_itt();
        let mut c = [0u8; 16];
        let head = cdb.len().min(16);
        c[..head].copy_from_slice(&cdb[..head]);
        let out = data_out.unwrap_or(&[]);
        let (imm, unsol) = if data_out.is_some() {
            unsolicited_split((out.len() as u32).min(edtl), &self.neg)
        } else {
            (0, 0)
        };
        let cmd = pdu::ScsiCommand {
            immediate: false,
            final_flag: unsol == 0,
            read,
            write: data_out.is_some(),
            attr: self.task_attr,
            lun: pdu::encode_lun(lun),
            itt,
            expected_data_transfer_length: edtl,
            cmd_sn: self.consume_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
            ext_cdb: cdb[head..].to_vec(),
            bidi_read_length: None,
            data_segment_length: imm,
        };
        let mut bhs = [0u8; BHS_LEN];
        cmd.emit(&mut bhs);
        self.wire.send(&bhs, &cmd.ahs(), &out[..imm as usize])?;
        self.stats.commands += 1;
        self.stats.immediate_bytes += u64::from(imm);
        self.stats.max_data_out_segment = self.stats.max_data_out_segment.max(imm);
        if unsol > 0 {
            let segs = segments(imm, unsol, self.neg.max_xmit_data_segment_length);
            send_data_out(
                &mut self.wire,
                self.exp_stat_sn,
                itt,
                pdu::encode_lun(lun),
                RESERVED_TAG,
                &segs,
                out,
            )?;
            self.stats.unsolicited_data_out += segs.len() as u64;
            self.stats.unsolicited_bytes += u64::from(unsol);
            self.note_out_segments(&segs);
        }
        self.tasks.insert(
            itt,
            Task {
                lun,
                cmd_sn: cmd.cmd_sn,
                data_out: out.to_vec(),
                data_in: if read {
                    vec![0u8; edtl as usize]
                } else {
                    Vec::new()
                },
                in_extent: 0,
                next_data_sn: 0,
                error: None,
            },
        );
        Ok(itt)
    }

    /// Waits for any command to finish.
    pub fn wait_any(&mut self) -> Result<(u32, ScsiResult)> {
        let (itt, r) = self.wait_next()?;
        r.map(|r| (itt, r))
    }

    /// Waits for any command to finish, and tells a failure of that one command (the target
    /// rejected it, or its Data-In broke the protocol: the inner error, the connection goes
    /// on) from a failure of the connection (the outer error).
    pub fn wait_next(&mut self) -> Result<(u32, Result<ScsiResult>)> {
        loop {
            if let Some(done) = self.done.pop_front() {
                return Ok(done);
            }
            if self.tasks.is_empty() {
                return Err(InitiatorError::InvalidArgument(
                    "no command outstanding".into(),
                ));
            }
            self.pump()?;
        }
    }

    /// Waits for command `itt` to finish (others that finish meanwhile stay queued).
    pub fn wait(&mut self, itt: u32) -> Result<ScsiResult> {
        loop {
            if let Some(i) = self.done.iter().position(|(t, _)| *t == itt) {
                let (_, r) = self.done.remove(i).unwrap_or_else(|| unreachable!());
                return r;
            }
            if !self.tasks.contains_key(&itt) {
                return Err(InitiatorError::InvalidArgument(format!(
                    "ITT {itt:#x} is not outstanding"
                )));
            }
            self.pump()?;
        }
    }

    /// Sends a command and waits for it.
    pub fn scsi(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<&[u8]>,
        edtl: u32,
        read: bool,
    ) -> Result<ScsiResult> {
        let itt = self.submit(lun, cdb, data_out, edtl, read)?;
        self.wait(itt)
    }

    /// TEST UNIT READY; the result carries CHECK CONDITION as it is.
    pub fn test_unit_ready(&mut self, lun: u64) -> Result<ScsiResult> {
        self.scsi(lun, &cdb::test_unit_ready(), None, 0, false)
    }

    /// READ (10) of `blocks` blocks; errors unless GOOD.
    pub fn read10(&mut self, lun: u64, lba: u32, blocks: u16, block_size: u32) -> Result<Vec<u8>> {
        let len = u32::from(blocks) * block_size;
        Ok(self
            .scsi(lun, &cdb::read10(lba, blocks), None, len, true)?
            .good()?
            .data)
    }

    /// READ (16) of `blocks` blocks; errors unless GOOD.
    pub fn read16(&mut self, lun: u64, lba: u64, blocks: u32, block_size: u32) -> Result<Vec<u8>> {
        let len = blocks
            .checked_mul(block_size)
            .ok_or_else(|| InitiatorError::InvalidArgument("transfer too large".into()))?;
        Ok(self
            .scsi(lun, &cdb::read16(lba, blocks), None, len, true)?
            .good()?
            .data)
    }

    /// WRITE (10) of `data` (a whole number of blocks); errors unless GOOD.
    pub fn write10(&mut self, lun: u64, lba: u32, data: &[u8], block_size: u32) -> Result<()> {
        let blocks = blocks_of(data, block_size)?;
        let blocks = u16::try_from(blocks).map_err(|_| {
            InitiatorError::InvalidArgument("too many blocks for WRITE (10)".into())
        })?;
        self.scsi(
            lun,
            &cdb::write10(lba, blocks),
            Some(data),
            data.len() as u32,
            false,
        )?
        .good()?;
        Ok(())
    }

    /// WRITE (16) of `data` (a whole number of blocks); errors unless GOOD.
    pub fn write16(&mut self, lun: u64, lba: u64, data: &[u8], block_size: u32) -> Result<()> {
        let blocks = blocks_of(data, block_size)?;
        self.scsi(
            lun,
            &cdb::write16(lba, blocks),
            Some(data),
            data.len() as u32,
            false,
        )?
        .good()?;
        Ok(())
    }

    // ------------------------------------------------------------------ other requests

    /// NOP-Out ping (immediate) carrying `data`; returns the data the NOP-In echoed.
    pub fn ping(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        self.need_login()?;
        let itt = self.alloc_itt();
        let nop = pdu::NopOut {
            immediate: true,
            final_flag: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data_segment_length: data.len() as u32,
        };
        let mut bhs = [0u8; BHS_LEN];
        nop.emit(&mut bhs);
        self.wire.send(&bhs, &[], data)?;
        let p = self.wait_other(itt)?;
        if p.opcode() != op::NOP_IN {
            return Err(unexpected("NOP-In", &p));
        }
        Ok(p.data)
    }

    /// NOP-Out ping without data; waits for the NOP-In.
    pub fn nop(&mut self) -> Result<()> {
        self.ping(&[]).map(|_| ())
    }

    /// Text Request SendTargets=All; returns the key=value pairs of the answer.
    pub fn send_targets(&mut self) -> Result<Vec<(String, String)>> {
        self.text(&[("SendTargets", "All")])
    }

    /// A Text Request with `keys`; follows continued answers (C=1) and returns all pairs.
    pub fn text(&mut self, keys: &[(&str, &str)]) -> Result<Vec<(String, String)>> {
        self.need_login()?;
        let itt = self.alloc_itt();
        let mut data = text::encode(keys.iter().copied());
        let mut ttt = RESERVED_TAG;
        let mut answer = Vec::new();
        for _ in 0..1024 {
            self.wait_window()?;
            let req = pdu::TextRequest {
                immediate: false,
                final_flag: true,
                cont: false,
                lun: 0,
                itt,
                ttt,
                cmd_sn: self.consume_cmd_sn(),
                exp_stat_sn: self.exp_stat_sn,
                data_segment_length: data.len() as u32,
            };
            let mut bhs = [0u8; BHS_LEN];
            req.emit(&mut bhs);
            self.wire.send(&bhs, &[], &data)?;
            let p = self.wait_other(itt)?;
            if p.opcode() != op::TEXT_RESPONSE {
                return Err(unexpected("Text Response", &p));
            }
            let r = pdu::TextResponse::parse(&p.bhs, &p.ahs)
                .map_err(|e| InitiatorError::Protocol(e.to_string()))?;
            answer.extend_from_slice(&p.data);
            if !r.cont {
                if !r.final_flag {
                    return Err(InitiatorError::Protocol(
                        "Text Response with neither F nor C".into(),
                    ));
                }
                return Ok(text::parse(&answer)?);
            }
            ttt = r.ttt;
            data.clear();
        }
        Err(InitiatorError::Protocol("Text Response never ended".into()))
    }

    /// Logout (reason 0: close the session). Outstanding commands are forgotten.
    pub fn logout(&mut self) -> Result<()> {
        self.need_login()?;
        let itt = self.alloc_itt();
        let req = pdu::LogoutRequest {
            immediate: true,
            lun: 0,
            itt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            reason_code: 0,
            cid: self.cid,
            data_segment_length: 0,
        };
        let mut bhs = [0u8; BHS_LEN];
        req.emit(&mut bhs);
        self.wire.send(&bhs, &[], &[])?;
        let p = self.wait_other(itt)?;
        if p.opcode() != op::LOGOUT_RESPONSE {
            return Err(unexpected("Logout Response", &p));
        }
        let r = pdu::LogoutResponse::parse(&p.bhs, &p.ahs)
            .map_err(|e| InitiatorError::Protocol(e.to_string()))?;
        self.logged_in = false;
        self.tasks.clear();
        if r.response != 0 {
            return Err(InitiatorError::Protocol(format!(
                "logout answered with response {}",
                r.response
            )));
        }
        Ok(())
    }

    /// A task management function (immediate); returns the response code.
    pub fn task_mgmt(&mut self, function: u8, lun: u64, referenced_itt: u32) -> Result<u8> {
        self.tmf(function, lun, referenced_itt, 0).map(|(r, _)| r)
    }

    /// ABORT TASK for command `itt` of this initiator, with the command's CmdSN as RefCmdSN
    /// (RFC 7143 §11.5.1, §11.5.5). Returns the response code and whether the abort ended the
    /// command: it had not been answered when the Function Complete came, so it never will
    /// be. A command answered before the TMF response finishes as usual through
    /// [`Initiator::wait_any`].
    pub fn abort_task(&mut self, lun: u64, itt: u32) -> Result<(u8, bool)> {
        let ref_cmd_sn = self.tasks.get(&itt).map_or(0, |t| t.cmd_sn);
        self.tmf(pdu::TMF_ABORT_TASK, lun, itt, ref_cmd_sn)
    }

    /// Whether command `itt` is still waiting for its answer (neither answered nor aborted).
    pub fn in_flight(&self, itt: u32) -> bool {
        self.tasks.contains_key(&itt)
    }

    /// Closes the connection abruptly with whatever is in flight: a TCP reset (unsent data
    /// discarded) when `reset`, else a shutdown of both directions (FIN, what was sent still
    /// reaches the target). Nothing is answered or logged out; a new connection with the same
    /// ISID and TSIH 0 reinstates the session (RFC 7143 §6.3.5).
    pub fn drop_connection(self, reset: bool) -> Result<()> {
        let mut s = self.wire.reader.into_inner();
        if reset {
            s.reset()?;
        } else {
            s.shutdown()?;
        }
        // The socket closes here.
        drop(s);
        Ok(())
    }

    /// Sends a task management request and waits for its response: the response code and
    /// whether the referenced task (ABORT TASK) was still outstanding and is now ended.
    fn tmf(
        &mut self,
        function: u8,
        lun: u64,
        referenced_itt: u32,
        ref_cmd_sn: u32,
    ) -> Result<(u8, bool)> {
        self.need_login()?;
        let itt = self.alloc_itt();
        let req = pdu::TaskMgmtRequest {
            immediate: true,
            lun: pdu::encode_lun(lun),
            itt,
            referenced_task_tag: referenced_itt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
            function,
            data_segment_length: 0,
        };
        let mut bhs = [0u8; BHS_LEN];
        req.emit(&mut bhs);
        self.wire.send(&bhs, &[], &[])?;
        let p = self.wait_other(itt)?;
        if p.opcode() != op::TASK_MGMT_RESPONSE {
            return Err(unexpected("Task Management Response", &p));
        }
        let r = pdu::TaskMgmtResponse::parse(&p.bhs, &p.ahs)
            .map_err(|e| InitiatorError::Protocol(e.to_string()))?;
        let mut ended = false;
        if r.response == pdu::TMF_RSP_COMPLETE {
            // The referenced task (or the LUN's tasks) will not be answered.
            if function == pdu::TMF_ABORT_TASK {
                ended = self.tasks.remove(&referenced_itt).is_some();
            } else if matches!(
                function,
                pdu::TMF_ABORT_TASK_SET | pdu::TMF_CLEAR_TASK_SET | pdu::TMF_LOGICAL_UNIT_RESET
            ) {
                self.tasks.retain(|_, t| t.lun != lun);
            }
        }
        Ok((r.response, ended))
    }

    /// Waits for the answer to request `itt` (or a Reject of it).
    fn wait_other(&mut self, itt: u32) -> Result<RawPdu> {
        loop {
            if let Some(i) = self.others.iter().position(|p| p.itt() == itt) {
                return Ok(self.others.remove(i).unwrap_or_else(|| unreachable!()));
            }
            if let Some(i) = self.others.iter().position(|p| {
                p.opcode() == op::REJECT && p.data.len() >= 20 && be32(&p.data[16..20]) == itt
            }) {
                let p = self.others.remove(i).unwrap_or_else(|| unreachable!());
                return Err(InitiatorError::Rejected {
                    itt,
                    reason: p.bhs[2],
                });
            }
            self.pump()?;
        }
    }

    // ------------------------------------------------------------------ receive path

    /// StatSN, ExpCmdSN and MaxCmdSN of any target PDU (RFC 7143 §4.2.2).
    fn track_sns(&mut self, p: &RawPdu) {
        let b = &p.bhs;
        let opc = p.opcode();
        let carries_status = match opc {
            op::SCSI_RESPONSE
            | op::TASK_MGMT_RESPONSE
            | op::LOGIN_RESPONSE
            | op::TEXT_RESPONSE
            | op::LOGOUT_RESPONSE
            | op::ASYNC
            | op::REJECT => true,
            op::DATA_IN => b[1] & 0x01 != 0,
            op::NOP_IN => p.itt() != RESERVED_TAG,
            _ => false,
        };
        if carries_status {
            let stat_sn = be32(&b[24..28]);
            if seq::le(self.exp_stat_sn, stat_sn) || opc == op::LOGIN_RESPONSE {
                self.exp_stat_sn = stat_sn.wrapping_add(1);
            }
        }
        let has_window = matches!(
            opc,
            op::NOP_IN
                | op::SCSI_RESPONSE
                | op::TASK_MGMT_RESPONSE
                | op::TEXT_RESPONSE
                | op::DATA_IN
                | op::LOGOUT_RESPONSE
                | op::R2T
                | op::ASYNC
                | op::REJECT
        );
        if has_window && self.logged_in {
            let exp = be32(&b[28..32]);
            let max = be32(&b[32..36]);
            // RFC 7143 §4.2.2.1: a MaxCmdSN below ExpCmdSN - 1 is ignored, as is either
            // value moving backwards.
            if seq::le(exp.wrapping_sub(1), max) {
                if seq::lt(self.exp_cmd_sn, exp) {
                    self.exp_cmd_sn = exp;
                }
                if seq::lt(self.max_cmd_sn, max) {
                    self.max_cmd_sn = max;
                }
            }
        }
    }

    /// Receives and handles one PDU.
    fn pump(&mut self) -> Result<()> {
        let p = self.wire.recv()?;
        self.track_sns(&p);
        if p.data.len() > self.neg.max_recv_data_segment_length as usize {
            return Err(InitiatorError::Protocol(format!(
                "{}-byte data segment exceeds our MaxRecvDataSegmentLength {} (opcode {:#04x})",
                p.data.len(),
                self.neg.max_recv_data_segment_length,
                p.opcode()
            )));
        }
        let perr = |e: pdu::PduError| InitiatorError::Protocol(e.to_string());
        match p.opcode() {
            op::DATA_IN => {
                let d = pdu::DataIn::parse(&p.bhs, &p.ahs).map_err(perr)?;
                self.on_data_in(&d, &p.data)
            }
            op::SCSI_RESPONSE => {
                let r = pdu::ScsiResponse::parse(&p.bhs, &p.ahs).map_err(perr)?;
                self.on_response(&r, &p.data)
            }
            op::R2T => {
                let r = pdu::R2t::parse(&p.bhs, &p.ahs).map_err(perr)?;
                self.on_r2t(&r)
            }
            op::NOP_IN => {
                let n = pdu::NopIn::parse(&p.bhs, &p.ahs).map_err(perr)?;
                if n.ttt != RESERVED_TAG {
                    // A ping from the target (RFC 7143 §11.18): answer with its TTT.
                    let out = pdu::NopOut {
                        immediate: true,
                        final_flag: true,
                        lun: n.lun,
                        itt: RESERVED_TAG,
                        ttt: n.ttt,
                        cmd_sn: self.cmd_sn,
                        exp_stat_sn: self.exp_stat_sn,
                        data_segment_length: p.data.len() as u32,
                    };
                    let mut bhs = [0u8; BHS_LEN];
                    out.emit(&mut bhs);
                    self.wire.send(&bhs, &[], &p.data)?;
                    self.nop_in_answered += 1;
                }
                if n.itt != RESERVED_TAG {
                    self.others.push_back(p);
                }
                Ok(())
            }
            op::ASYNC => {
                let a = pdu::AsyncMessage::parse(&p.bhs, &p.ahs).map_err(perr)?;
                self.async_events.push(a);
                Ok(())
            }
            op::REJECT => {
                let rejected = rejected_itt(&p);
                let reason = p.bhs[2];
                match rejected {
                    // RFC 7143 §7.8: a data digest error rejects the PDU, not the command,
                    // which the target still answers.
                    Some(_) if reason == pdu::REJECT_DATA_DIGEST_ERROR => {
                        self.digest_rejects += 1;
                    }
                    Some(itt) if self.tasks.contains_key(&itt) => {
                        self.tasks.remove(&itt);
                        self.done
                            .push_back((itt, Err(InitiatorError::Rejected { itt, reason })));
                    }
                    _ => self.others.push_back(p),
                }
                Ok(())
            }
            op::TEXT_RESPONSE | op::LOGOUT_RESPONSE | op::TASK_MGMT_RESPONSE => {
                self.others.push_back(p);
                Ok(())
            }
            other => Err(InitiatorError::Protocol(format!(
                "unexpected opcode {other:#04x} in full feature phase"
            ))),
        }
    }

    fn on_data_in(&mut self, d: &pdu::DataIn, data: &[u8]) -> Result<()> {
        self.stats.data_in += 1;
        self.stats.max_data_in_segment = self.stats.max_data_in_segment.max(data.len() as u32);
        let Some(t) = self.tasks.get_mut(&d.itt) else {
            return Err(InitiatorError::Protocol(format!(
                "Data-In for unknown ITT {:#x}",
                d.itt
            )));
        };
        if d.data_sn != t.next_data_sn && t.error.is_none() {
            t.error = Some(format!(
                "Data-In DataSN {} where {} was due",
                d.data_sn, t.next_data_sn
            ));
        }
        t.next_data_sn = d.data_sn.wrapping_add(1);
        let start = d.buffer_offset as usize;
        let end = start + data.len();
        if end > t.data_in.len() {
            if t.error.is_none() {
                t.error = Some(format!(
                    "Data-In at offset {start} of {} bytes runs past the expected length {}",
                    data.len(),
                    t.data_in.len()
                ));
            }
        } else {
            t.data_in[start..end].copy_from_slice(data);
            t.in_extent = t.in_extent.max(end);
        }
        if d.status_flag {
            if !d.final_flag {
                t.error
                    .get_or_insert_with(|| "Data-In with S but not F".into());
            }
            let residual = residual(d.residual_overflow, d.residual_underflow, d.residual_count);
            self.complete(d.itt, 0, d.status, Vec::new(), residual);
        }
        Ok(())
    }

    fn on_response(&mut self, r: &pdu::ScsiResponse, data: &[u8]) -> Result<()> {
        if !self.tasks.contains_key(&r.itt) {
            return Err(InitiatorError::Protocol(format!(
                "SCSI Response for unknown ITT {:#x}",
                r.itt
            )));
        }
        let sense = if data.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
            data[2..].get(..n).unwrap_or(&data[2..]).to_vec()
        } else {
            Vec::new()
        };
        let residual = residual(r.residual_overflow, r.residual_underflow, r.residual_count);
        self.complete(r.itt, r.response, r.status, sense, residual);
        Ok(())
    }

    fn complete(&mut self, itt: u32, response: u8, status: u8, sense: Vec<u8>, residual: Residual) {
        let Some(mut t) = self.tasks.remove(&itt) else {
            return;
        };
        let r = match t.error.take() {
            Some(e) => Err(InitiatorError::Protocol(e)),
            None => {
                t.data_in.truncate(t.in_extent);
                Ok(ScsiResult {
                    response,
                    status,
                    sense,
                    data: t.data_in,
                    residual,
                })
            }
        };
        self.done.push_back((itt, r));
    }

    fn on_r2t(&mut self, r: &pdu::R2t) -> Result<()> {
        let Some(t) = self.tasks.get(&r.itt) else {
            return Err(InitiatorError::Protocol(format!(
                "R2T for unknown ITT {:#x}",
                r.itt
            )));
        };
        let end = u64::from(r.buffer_offset) + u64::from(r.desired_data_transfer_length);
        if end > t.data_out.len() as u64 {
            return Err(InitiatorError::Protocol(format!(
                "R2T for {} bytes at offset {} beyond the {} bytes of the write",
                r.desired_data_transfer_length,
                r.buffer_offset,
                t.data_out.len()
            )));
        }
        if r.desired_data_transfer_length > self.neg.max_burst_length {
            return Err(InitiatorError::Protocol(format!(
                "R2T for {} bytes exceeds MaxBurstLength {}",
                r.desired_data_transfer_length, self.neg.max_burst_length
            )));
        }
        let segs = segments(
            r.buffer_offset,
            r.desired_data_transfer_length,
            self.neg.max_xmit_data_segment_length,
        );
        send_data_out(
            &mut self.wire,
            self.exp_stat_sn,
            r.itt,
            r.lun,
            r.ttt,
            &segs,
            &t.data_out,
        )?;
        self.stats.r2ts += 1;
        self.stats.solicited_data_out += segs.len() as u64;
        self.note_out_segments(&segs);
        Ok(())
    }

    fn note_out_segments(&mut self, segs: &[(u32, u32)]) {
        let m = segs.iter().map(|s| s.1).max().unwrap_or(0);
        self.stats.max_data_out_segment = self.stats.max_data_out_segment.max(m);
    }
}

/// Sends Data-Out PDUs for `segs` of `data`, DataSN from 0, F on the last.
fn send_data_out<T: Transport>(
    wire: &mut Wire<T>,
    exp_stat_sn: u32,
    itt: u32,
    lun: u64,
    ttt: u32,
    segs: &[(u32, u32)],
    data: &[u8],
) -> Result<()> {
    for (i, &(off, len)) in segs.iter().enumerate() {
        let d = pdu::DataOut {
            immediate: false,
            final_flag: i + 1 == segs.len(),
            lun,
            itt,
            ttt,
            exp_stat_sn,
            data_sn: i as u32,
            buffer_offset: off,
            data_segment_length: len,
        };
        let mut bhs = [0u8; BHS_LEN];
        d.emit(&mut bhs);
        wire.send(&bhs, &[], &data[off as usize..(off + len) as usize])?;
    }
    Ok(())
}

fn residual(overflow: bool, underflow: bool, count: u32) -> Residual {
    if overflow {
        Residual::Overflow(count)
    } else if underflow {
        Residual::Underflow(count)
    } else {
        Residual::None
    }
}

fn unexpected(what: &str, p: &RawPdu) -> InitiatorError {
    InitiatorError::Protocol(format!("expected a {what}, got opcode {:#04x}", p.opcode()))
}

fn blocks_of(data: &[u8], block_size: u32) -> Result<u32> {
    if block_size == 0 || !data.len().is_multiple_of(block_size as usize) {
        return Err(InitiatorError::InvalidArgument(format!(
            "{} bytes is not a whole number of {block_size}-byte blocks",
            data.len()
        )));
    }
    u32::try_from(data.len() / block_size as usize)
        .map_err(|_| InitiatorError::InvalidArgument("too many blocks".into()))
}

fn parse_num(v: &str) -> Option<u32> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Records what the initiator itself offers (values the target's answer then refines).
fn apply_offer(n: &mut Negotiated, k: &str, v: &str) {
    // The others take effect only once the target has answered.
    if k == "MaxRecvDataSegmentLength" {
        if let Some(x) = parse_num(v) {
            n.max_recv_data_segment_length = x;
        }
    }
}

/// Applies one key of a Login Response, checking it against what was offered.
fn apply_answer(n: &mut Negotiated, offered: &[(String, String)], k: &str, v: &str) -> Result<()> {
    let offer = offered
        .iter()
        .find(|(kk, _)| kk == k)
        .map(|(_, v)| v.as_str());
    if matches!(v, "Reject" | "NotUnderstood" | "Irrelevant") {
        // The RFC default stays in force.
        return Ok(());
    }
    let bad = |why: &str| {
        InitiatorError::Protocol(format!(
            "target answered {k}={v} to {}: {why}",
            offer.unwrap_or("nothing")
        ))
    };
    let num = || parse_num(v).ok_or_else(|| bad("not a number"));
    let yes_no = || match v {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(bad("not Yes or No")),
    };
    let offered_num = offer.and_then(parse_num);
    match k {
        // The target's declaration: the largest segment we may send.
        "MaxRecvDataSegmentLength" => n.max_xmit_data_segment_length = num()?,
        "MaxBurstLength" | "FirstBurstLength" => {
            let x = num()?;
            if offered_num.is_some_and(|o| x > o) {
                return Err(bad("more than offered"));
            }
            if k == "MaxBurstLength" {
                n.max_burst_length = x;
            } else {
                n.first_burst_length = x;
            }
        }
        "MaxOutstandingR2T" => {
            let x = num()?;
            if offered_num.is_some_and(|o| x > o) {
                return Err(bad("more than offered"));
            }
            n.max_outstanding_r2t = x;
        }
        "InitialR2T" => {
            let x = yes_no()?;
            // OR: a Yes offer cannot come back No.
            if offer == Some("Yes") && !x {
                return Err(bad("InitialR2T is an OR of both sides"));
            }
            n.initial_r2t = x;
        }
        "ImmediateData" => {
            let x = yes_no()?;
            // AND: a No offer cannot come back Yes.
            if offer == Some("No") && x {
                return Err(bad("ImmediateData is an AND of both sides"));
            }
            n.immediate_data = x;
        }
        "HeaderDigest" | "DataDigest" => {
            let on = match v {
                "None" => false,
                "CRC32C" => true,
                _ => return Err(bad("not None or CRC32C")),
            };
            if !offer.is_some_and(|o| o.split(',').any(|x| x.trim() == v)) {
                return Err(bad("a value not offered"));
            }
            if k == "HeaderDigest" {
                n.header_digest = on;
            } else {
                n.data_digest = on;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;

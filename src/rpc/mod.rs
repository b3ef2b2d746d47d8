//! The JSON-RPC 2.0 server on a Unix socket, framed as SPDK frames it: requests are JSON values
//! read one after another from the stream (no length prefix, no newline needed), a top-level
//! array is a batch, and each response is one JSON value followed by a newline. A stream that
//! holds anything but objects and arrays, or invalid JSON, cannot be resynchronised, so it is
//! answered and the connection closed.
//!
//! Methods map onto the management tree: `ls`, `get`, `set`, `mgmt`, `tree`, `save_config`,
//! `load_config`, `rpc_get_methods`.
//!
//! The socket is as good as root. It is created mode 0600 (0660 and owned by a group when one is
//! given) inside a fresh 0700 directory beside its final path and then linked into place, so it
//! never exists with the mode the umask would give it.
//!
//! One thread serves every client's socket: it polls the listening socket and the clients'
//! sockets (level-triggered epoll, non-blocking), frames their requests and queues the answers
//! in each client's output buffer, so a client that does not read stalls only itself. The
//! requests themselves run on a few worker threads ([`WORKERS`]), one request of a client at a
//! time so its answers keep their order: a request that blocks (a backing file on a hung
//! mount, a long fdatasync) holds one worker, never the socket thread or the other clients.
//! [`Limits`] bounds what clients may hold: how many are served at once and how long one may
//! sit idle or on a partial request.
#![forbid(unsafe_code)]

pub mod frame;

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde_json::{json, Value};

use crate::mgmt::{Mgmt, MgmtError};
use crate::util::{quote, QUOTE_MAX};
use frame::{FrameError, Framer};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// JSON-RPC 2.0 §5.1 leaves -32000 to -32099 to the server: every client slot is taken.
pub const SERVER_BUSY: i64 = -32000;

/// The largest request accepted (a whole configuration fits easily).
pub const MAX_REQUEST: usize = 16 << 20;
/// Clients served at once unless [`Limits`] says otherwise.
pub const MAX_CLIENTS: usize = 64;
/// A client with no complete request (and no answer read) for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client whose partial request gets no new byte for this long is dropped.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `path` parameter: PATH_MAX, and far more than any path in the tree.
pub const MAX_PATH: usize = 4096;
/// The longest `value` or `command` parameter: one page, what an SCST sysfs write takes.
pub const MAX_VALUE: usize = 4096;
/// Error messages longer than this are cut (names in them are already quoted and cut).
const MAX_MESSAGE: usize = 1024;
/// A client is not read while this much of its output is unread: it stalls only itself.
const OUTPUT_HIGH: usize = 1 << 20;
/// A client whose unread output exceeds this (one enormous batch answer) is dropped.
const MAX_OUTPUT: usize = 4 * MAX_REQUEST;
/// Requests answered for one client before the others get their turn.
const REQUESTS_PER_ROUND: usize = 64;
/// Reads from one client before the others get their turn.
const READS_PER_ROUND: usize = 4;
const READ_CHUNK: usize = 64 << 10;
/// Output buffer capacity kept after a large answer was sent.
const KEEP_CAPACITY: usize = 64 << 10;
/// How long accepting pauses after accept(2) fails (EMFILE, ENFILE, ENOMEM): the listener stays
/// readable while connections wait, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refusing clients over the cap is logged at most this often.
const BUSY_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Connections taken from the backlog in one round.
const ACCEPTS_PER_ROUND: usize = 256;
/// Threads that run requests; the socket thread never does.
pub const WORKERS: usize = 4;

pub const METHODS: &[&str] = &[
    "get",
    "load_config",
    "ls",
    "mgmt",
    "rpc_get_methods",
    "save_config",
    "set",
    "tree",
];

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RpcError {
    /// the socket is in use by a running server
    InUse,
    /// the path exists and is not a socket (not removing it)
    NotSocket,
    /// no group named {0}
    UnknownGroup(String),
    /// cannot look up group {0}: {1}
    GroupLookup(String, Errno),
    /// cannot give the socket to group {0}: {1}
    Chown(u32, io::Error),
    /// {0}
    Io(#[from] io::Error),
}

/// What clients may hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Clients served at once; one more is answered [`SERVER_BUSY`] and closed.
    pub max_clients: usize,
    /// A client with no complete request and no answer read for this long is dropped.
    pub idle_timeout: Duration,
    /// A client whose partial request gets no new byte for this long is dropped.
    pub stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_clients: MAX_CLIENTS,
            idle_timeout: IDLE_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
        }
    }
}

/// How the server is set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Make the socket 0660 and owned by this group (else 0600).
    pub group: Option<u32>,
    pub limits: Limits,
}

/// The group `name` names: a numeric gid as it is, else looked up.
pub fn group_id(name: &str) -> Result<u32, RpcError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(RpcError::UnknownGroup(quote(name))),
        Err(e) => Err(RpcError::GroupLookup(quote(name), e)),
    }
}

/// A running server; `shutdown` stops it and removes the socket.
pub struct Server {
    path: PathBuf,
    /// Dropping it wakes the RPC thread, which then closes every client and returns.
    waker: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

struct Fail(i64, String);

impl From<MgmtError> for Fail {
    fn from(mut e: MgmtError) -> Fail {
        // Paths in the tree are short; a long one was made from input (a name in a
        // configuration given to load_config), so it is quoted and cut like other input.
        match &mut e {
            MgmtError::NotFound(p)
            | MgmtError::IsDir(p)
            | MgmtError::NotDir(p)
            | MgmtError::ReadOnly(p)
            | MgmtError::Invalid { path: p, .. }
            | MgmtError::Busy { path: p, .. } => {
                if p.len() > QUOTE_MAX {
                    *p = quote(p);
                }
            }
        }
        Fail(INVALID_PARAMS, e.to_string())
    }
}

impl Server {
    /// Creates the socket at `path` (refusing when a live server answers there, removing a
    /// stale socket) and serves it on a thread of its own.
    pub fn start(path: &Path, mgmt: Arc<Mgmt>, opts: &Options) -> Result<Server, RpcError> {
        let listener = bind(path, opts.group)?;
        let (waker, wake) = UnixStream::pair()?;
        let workers = match Workers::start(&mgmt) {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.into());
            }
        };
        let rpc = match Rpc::new(listener, wake, workers, opts.limits.clone()) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.into());
            }
        };
        let thread = std::thread::Builder::new()
            .name("rpc".into())
            .spawn(move || rpc.run());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.into());
            }
        };
        Ok(Server {
            path: path.to_path_buf(),
            waker: Some(waker),
            thread: Some(thread),
        })
    }

    pub fn shutdown(mut self) {
        drop(self.waker.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket in a fresh 0700 directory beside `path`, sets its mode (and group), and
/// links it to `path`: link(2) never replaces, so a server that appeared meanwhile is not
/// displaced.
fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, RpcError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(RpcError::NotSocket),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(RpcError::InUse);
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = nix::unistd::mkdtemp(&parent.join(".rpc-XXXXXX")).map_err(io::Error::from)?;
    let tmp = dir.join("s");
    let placed = (|| {
        let listener = UnixListener::bind(&tmp)?;
        let mode = match group {
            Some(gid) => {
                std::os::unix::fs::chown(&tmp, None, Some(gid))
                    .map_err(|e| RpcError::Chown(gid, e))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(RpcError::InUse),
            Err(e) => Err(e.into()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    let listener = placed?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

const LISTENER: u64 = 0;
const WAKER: u64 = 1;
/// The workers have answers ready.
const DONE: u64 = 2;
const FIRST_CLIENT: u64 = 3;

/// A request for a worker: the client's slot and generation (the slot may be reused by the
/// time the answer comes back), and the request.
struct Job {
    slot: usize,
    generation: u64,
    request: Value,
}

/// A worker's answer (`None` for notifications).
struct Done {
    slot: usize,
    generation: u64,
    answer: Option<Value>,
}

/// The worker threads and the channels to them. Dropping it ends them once their current
/// request is done.
struct Workers {
    jobs: crossbeam_channel::Sender<Job>,
    done: crossbeam_channel::Receiver<Done>,
    /// Readable while answers wait in `done` (each worker writes a byte after sending one).
    ready: UnixStream,
}

impl Workers {
    fn start(mgmt: &Arc<Mgmt>) -> io::Result<Workers> {
        let (jobs, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded::<Done>();
        let (ready, notify) = UnixStream::pair()?;
        ready.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let notify = Arc::new(notify);
        for i in 0..WORKERS {
            let (mgmt, job_rx, done_tx) = (mgmt.clone(), job_rx.clone(), done_tx.clone());
            let notify = notify.clone();
            std::thread::Builder::new()
                .name(format!("rpc-worker-{i}"))
                .spawn(move || {
                    for job in job_rx {
                        // A bug in a handler answers its request with an internal error
                        // instead of taking the worker (and the client's answers) with it.
                        let request = job.request;
                        let id = request.get("id").cloned().unwrap_or(Value::Null);
                        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            handle(&mgmt, request)
                        }))
                        .unwrap_or_else(|_| {
                            Some(error(
                                id,
                                INTERNAL_ERROR,
                                "the request failed inside the target",
                            ))
                        });
                        let done = Done {
                            slot: job.slot,
                            generation: job.generation,
                            answer,
                        };
                        if done_tx.send(done).is_err() {
                            return;
                        }
                        // A full socket already wakes the RPC thread.
                        let _ = (&*notify).write(&[1]);
                    }
                })?;
        }
        Ok(Workers { jobs, done, ready })
    }
}

/// The RPC thread's state.
struct Rpc {
    workers: Workers,
    /// Generation of the next client admitted.
    next_generation: u64,
    limits: Limits,
    epoll: Epoll,
    listener: UnixListener,
    /// Readable (end of file) once [`Server`] drops the other end; held so it stays polled.
    _wake: UnixStream,
    /// Slot `i` has the epoll token `FIRST_CLIENT + i`.
    clients: Vec<Option<Client>>,
    count: usize,
    /// Accepting resumes at this time after accept(2) failed.
    accept_paused: Option<Instant>,
    /// Accept failures have been logged, and connections still wait.
    accept_failing: bool,
    /// When refusing clients was last logged: at most once per [`BUSY_LOG_INTERVAL`], since
    /// clients can come and go as fast as they like.
    busy_logged: Option<Instant>,
    scratch: Vec<u8>,
}

/// Why a client's connection ends.
#[derive(Debug)]
enum End {
    /// Everything asked was answered and the client closed its side, or the stream failed.
    Done,
    Io(io::Error),
    Overflow,
}

/// Why [`Client::answer`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// No complete request is left.
    Drained,
    /// This round's budget is spent; more may wait.
    Budget,
    /// The client has not read enough of its answers; more may wait.
    Output,
    /// The stream cannot be read further.
    Failed,
    /// A request is with a worker; the next waits for its answer.
    Pending,
}

/// Where a client's requests go: the workers' queue, tagged with the client's slot.
struct Dispatch<'a> {
    sender: &'a crossbeam_channel::Sender<Job>,
    slot: usize,
}

struct Client {
    stream: UnixStream,
    framer: Framer,
    out: Vec<u8>,
    /// Bytes of `out` already sent.
    sent: usize,
    /// The last complete request, or progress sending an answer.
    active: Instant,
    /// The last byte read.
    heard: Instant,
    /// The client closed its side: answer what arrived, then close.
    eof: bool,
    /// The stream cannot be read further: send what is queued, then close.
    failed: bool,
    /// Complete requests may still wait in the framer: the round's budget ran out, so the
    /// client gets another turn without waiting for its socket.
    more: bool,
    interest: EpollFlags,
    /// Its slot's generation (see [`Job`]).
    generation: u64,
    /// A request of this client is with a worker; the next waits for its answer.
    pending: bool,
}

impl Client {
    fn new(stream: UnixStream, now: Instant, generation: u64) -> Client {
        Client {
            generation,
            pending: false,
            stream,
            framer: Framer::new(MAX_REQUEST),
            out: Vec::new(),
            sent: 0,
            active: now,
            heard: now,
            eof: false,
            failed: false,
            more: false,
            interest: EpollFlags::EPOLLIN,
        }
    }

    fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    fn wants_read(&self) -> bool {
        !self.eof && !self.failed && !self.pending && self.unsent() < OUTPUT_HIGH
    }

    fn wanted_interest(&self) -> EpollFlags {
        let mut f = EpollFlags::empty();
        if self.wants_read() {
            f |= EpollFlags::EPOLLIN;
        }
        if self.unsent() > 0 {
            f |= EpollFlags::EPOLLOUT;
        }
        f
    }

    /// When the client is dropped unless it makes progress.
    fn deadline(&self, limits: &Limits) -> Instant {
        // However long its request takes, a client waiting for an answer is not idle.
        let idle = if self.pending {
            Instant::now() + limits.idle_timeout
        } else {
            self.active + limits.idle_timeout
        };
        if self.framer.has_partial() && self.wants_read() {
            idle.min(self.heard + limits.stall_timeout)
        } else {
            idle
        }
    }

    /// Sends, answers and reads as far as the client allows without blocking. `Ok(true)` keeps
    /// the connection.
    fn pump(&mut self, jobs: &Dispatch<'_>, scratch: &mut [u8], now: Instant) -> Result<bool, End> {
        self.flush(now)?;
        let mut budget = REQUESTS_PER_ROUND;
        let mut stop = self.answer(jobs, now, &mut budget);
        let mut reads = READS_PER_ROUND;
        while self.wants_read() && reads > 0 && stop == Stop::Drained {
            reads -= 1;
            match self.stream.read(scratch) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.framer.push(scratch.get(..n).unwrap_or_default());
                    self.heard = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(End::Io(e)),
            }
            stop = self.answer(jobs, now, &mut budget);
        }
        self.more = stop == Stop::Budget;
        self.flush(now)?;
        if self.unsent() > MAX_OUTPUT {
            return Err(End::Overflow);
        }
        let finished = stop == Stop::Failed || (self.eof && stop == Stop::Drained);
        // The stream failed while a request was out: its answer is not waited for.
        Ok(!(finished && self.unsent() == 0))
    }

    /// Hands the next complete request to a worker, or answers what needs no worker (a
    /// framing or parse error), while the output has room and budget lasts.
    fn answer(&mut self, jobs: &Dispatch<'_>, now: Instant, budget: &mut usize) -> Stop {
        loop {
            if self.pending {
                return Stop::Pending;
            }
            if self.failed {
                return Stop::Failed;
            }
            if self.unsent() >= OUTPUT_HIGH {
                return Stop::Output;
            }
            if *budget == 0 {
                return Stop::Budget;
            }
            let resp = match self.framer.next_value() {
                Ok(None) => return Stop::Drained,
                Ok(Some(bytes)) => {
                    *budget -= 1;
                    self.active = now;
                    match serde_json::from_slice::<Value>(bytes) {
                        Ok(v) => {
                            let job = Job {
                                slot: jobs.slot,
                                generation: self.generation,
                                request: v,
                            };
                            if jobs.sender.send(job).is_err() {
                                self.failed = true;
                                Some(error(
                                    Value::Null,
                                    INTERNAL_ERROR,
                                    "the RPC server is stopping",
                                ))
                            } else {
                                self.pending = true;
                                return Stop::Pending;
                            }
                        }
                        Err(e) => {
                            self.failed = true;
                            Some(error(Value::Null, PARSE_ERROR, &parse_error(&e)))
                        }
                    }
                }
                Err(e @ (FrameError::NotContainer(_) | FrameError::TooLarge(_))) => {
                    self.failed = true;
                    Some(error(Value::Null, INVALID_REQUEST, &e.to_string()))
                }
            };
            if let Some(r) = resp {
                self.queue(&r);
            }
        }
    }

    fn queue(&mut self, resp: &Value) {
        let before = self.out.len();
        if serde_json::to_writer(&mut self.out, resp).is_err() {
            self.out.truncate(before);
            let e = error(Value::Null, INTERNAL_ERROR, "cannot encode the answer");
            self.out.extend_from_slice(e.to_string().as_bytes());
        }
        self.out.push(b'\n');
    }

    /// Writes queued output until the socket is full.
    fn flush(&mut self, now: Instant) -> Result<(), End> {
        while let Some(rest) = self.out.get(self.sent..).filter(|r| !r.is_empty()) {
            match self.stream.write(rest) {
                Ok(0) => return Err(End::Done),
                Ok(n) => {
                    self.sent += n;
                    self.active = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            }
        } else if self.sent > self.out.len() / 2 {
            // Amortised: what is moved is less than what was sent since the last move.
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }
}

impl Rpc {
    fn new(
        listener: UnixListener,
        wake: UnixStream,
        workers: Workers,
        limits: Limits,
    ) -> io::Result<Rpc> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKER))?;
        epoll.add(&workers.ready, EpollEvent::new(EpollFlags::EPOLLIN, DONE))?;
        Ok(Rpc {
            workers,
            next_generation: 0,
            limits,
            epoll,
            listener,
            _wake: wake,
            clients: Vec::new(),
            count: 0,
            accept_paused: None,
            accept_failing: false,
            busy_logged: None,
            scratch: vec![0; READ_CHUNK],
        })
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 32];
        loop {
            let timeout = self.timeout(Instant::now());
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    // Only a bug gets here (EBADF, EINVAL); do not spin on it.
                    warn!("epoll_wait failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
            };
            let now = Instant::now();
            for ev in events.iter().take(n) {
                match ev.data() {
                    WAKER => return self.close_all(),
                    LISTENER => self.accept(now),
                    DONE => self.collect(now),
                    token => self.service(token, now),
                }
            }
            // Clients whose budget ran out get another turn, after everyone else had one.
            for slot in 0..self.clients.len() {
                if self
                    .clients
                    .get(slot)
                    .is_some_and(|c| c.as_ref().is_some_and(|c| c.more))
                {
                    self.service(FIRST_CLIENT + slot as u64, now);
                }
            }
            self.expire(now);
            if self.accept_paused.is_some_and(|t| now >= t) {
                self.accept_paused = None;
                let ev = EpollEvent::new(EpollFlags::EPOLLIN, LISTENER);
                if let Err(e) = self.epoll.add(&self.listener, ev) {
                    warn!("cannot poll the socket again: {e}");
                    self.accept_paused = Some(now + ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn close_all(&mut self) {
        debug!("stopping with {} client(s) connected", self.count);
        self.clients.clear();
    }

    /// Until the next deadline: a client's, or the end of an accept pause.
    fn timeout(&self, now: Instant) -> EpollTimeout {
        let clients = self.clients.iter().flatten();
        if clients.clone().any(|c| c.more) {
            return EpollTimeout::ZERO;
        }
        let next = clients
            .map(|c| c.deadline(&self.limits))
            .chain(self.accept_paused)
            .min();
        match next {
            None => EpollTimeout::NONE,
            // Rounded up, so the deadline has passed when the wait ends.
            Some(t) => {
                let ms = t
                    .saturating_duration_since(now)
                    .as_millis()
                    .saturating_add(1);
                EpollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(EpollTimeout::MAX)
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_ROUND {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The episode ends when every waiting connection was taken.
                    if self.accept_failing {
                        info!("accepting clients again");
                        self.accept_failing = false;
                    }
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOMEM: the connection stays queued and the socket
                    // readable. Stop polling it for a moment; say so once per episode.
                    if !self.accept_failing {
                        warn!(
                            "cannot accept a client: {e}; retrying every {} ms until this clears",
                            ACCEPT_BACKOFF.as_millis()
                        );
                        self.accept_failing = true;
                    }
                    let _ = self.epoll.delete(&self.listener);
                    self.accept_paused = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, now: Instant) {
        let max = self.limits.max_clients;
        if self.count >= max {
            if self
                .busy_logged
                .is_none_or(|t| now.duration_since(t) >= BUSY_LOG_INTERVAL)
            {
                warn!("{max} clients are connected, the most allowed; refusing more");
                self.busy_logged = Some(now);
            }
            let msg = format!(
                "server busy: {max} clients are connected, the most allowed; try again later"
            );
            let mut line = error(Value::Null, SERVER_BUSY, &msg).to_string();
            line.push('\n');
            // A fresh socket has room for one short line; if not, the client only misses it.
            let _ = stream.set_nonblocking(true);
            let _ = (&stream).write(line.as_bytes());
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            debug!("dropping a client: {e}");
            return;
        }
        let slot = match self.clients.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.clients.push(None);
                self.clients.len() - 1
            }
        };
        let token = FIRST_CLIENT + slot as u64;
        if let Err(e) = self
            .epoll
            .add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            debug!("dropping a client: cannot poll it: {e}");
            return;
        }
        if let Some(s) = self.clients.get_mut(slot) {
            *s = Some(Client::new(stream, now, self.next_generation));
            self.next_generation += 1;
            self.count += 1;
        }
    }

    fn service(&mut self, token: u64, now: Instant) {
        let Some(slot) = token
            .checked_sub(FIRST_CLIENT)
            .and_then(|s| usize::try_from(s).ok())
        else {
            return;
        };
        let Some(Some(c)) = self.clients.get_mut(slot) else {
            return;
        };
        let jobs = Dispatch {
            sender: &self.workers.jobs,
            slot,
        };
        match c.pump(&jobs, &mut self.scratch, now) {
            Ok(true) => {
                // A client with nothing to read or send (its request is with a worker) leaves
                // the epoll set: a hang-up is reported whatever the interest, and would spin.
                let want = c.wanted_interest();
                if want != c.interest {
                    let mut ev = EpollEvent::new(want, token);
                    let r = if want.is_empty() {
                        self.epoll.delete(&c.stream)
                    } else if c.interest.is_empty() {
                        self.epoll.add(&c.stream, ev)
                    } else {
                        self.epoll.modify(&c.stream, &mut ev)
                    };
                    c.interest = want;
                    if let Err(e) = r {
                        debug!("dropping a client: cannot poll it: {e}");
                        self.remove(slot);
                    }
                }
            }
            Ok(false) => self.remove(slot),
            Err(End::Done) => self.remove(slot),
            Err(End::Io(e)) => {
                debug!("dropping a client: {e}");
                self.remove(slot);
            }
            Err(End::Overflow) => {
                debug!("dropping a client: more than {MAX_OUTPUT} bytes of answers unread");
                self.remove(slot);
            }
        }
    }

    /// Queues the workers' answers to their clients, and lets each go on with its next
    /// request.
    fn collect(&mut self, now: Instant) {
        let mut sink = [0u8; 256];
        while matches!((&self.workers.ready).read(&mut sink), Ok(n) if n > 0) {}
        while let Ok(done) = self.workers.done.try_recv() {
            let Some(Some(c)) = self.clients.get_mut(done.slot) else {
                continue;
            };
            if c.generation != done.generation {
                // Its client left; the slot has another now.
                continue;
            }
            c.pending = false;
            c.active = now;
            if let Some(a) = &done.answer {
                c.queue(a);
            }
            self.service(FIRST_CLIENT + done.slot as u64, now);
        }
    }

    /// Drops clients idle or stalled past their deadline.
    fn expire(&mut self, now: Instant) {
        for slot in 0..self.clients.len() {
            let late = match self.clients.get(slot) {
                Some(Some(c)) => c.deadline(&self.limits) <= now,
                _ => false,
            };
            if late {
                debug!("dropping a client that made no progress");
                self.remove(slot);
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(c) = self.clients.get_mut(slot).and_then(Option::take) {
            let _ = self.epoll.delete(&c.stream);
            self.count -= 1;
        }
    }
}

/// A parse error says what was wrong and where (serde_json's messages for a `Value` name the
/// line and column, never the input).
fn parse_error(e: &serde_json::Error) -> String {
    format!("parse error: {e}")
}

/// `msg` cut to [`MAX_MESSAGE`] bytes, on a character boundary, with its length when longer.
fn bounded(msg: &str) -> std::borrow::Cow<'_, str> {
    if msg.len() <= MAX_MESSAGE {
        return msg.into();
    }
    let mut cut = MAX_MESSAGE - 32;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}... ({} bytes)",
        msg.get(..cut).unwrap_or_default(),
        msg.len()
    )
    .into()
}

fn error(id: Value, code: i64, msg: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": bounded(msg)}})
}

/// One request or a batch; `None` when nothing is to be sent (notifications).
pub fn handle(mgmt: &Mgmt, v: Value) -> Option<Value> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Some(error(Value::Null, INVALID_REQUEST, "empty batch"));
            }
            let out: Vec<Value> = items.into_iter().filter_map(|r| single(mgmt, r)).collect();
            if out.is_empty() {
                None
            } else {
                Some(Value::Array(out))
            }
        }
        other => single(mgmt, other),
    }
}

fn single(mgmt: &Mgmt, v: Value) -> Option<Value> {
    let Value::Object(req) = v else {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "a request must be a JSON object",
        ));
    };
    let id = req.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    if let Some(ver) = req.get("jsonrpc") {
        if ver != "2.0" {
            return Some(error(reply_id, INVALID_REQUEST, "jsonrpc must be \"2.0\""));
        }
    }
    if id
        .as_ref()
        .is_some_and(|i| !(i.is_string() || i.is_number() || i.is_null()))
    {
        return Some(error(
            Value::Null,
            INVALID_REQUEST,
            "id must be a string, a number or null",
        ));
    }
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return Some(error(reply_id, INVALID_REQUEST, "method must be a string"));
    };
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return Some(error(
            reply_id,
            INVALID_REQUEST,
            "params must be an object or an array",
        ));
    }
    let result = call(mgmt, method, &params);
    id.as_ref()?;
    Some(match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": reply_id, "result": r}),
        Err(Fail(code, msg)) => error(reply_id, code, &msg),
    })
}

/// Parameter `name` (or position `pos`) as a string of at most `max` bytes.
fn param(
    params: &Value,
    name: &str,
    pos: usize,
    required: bool,
    max: usize,
) -> Result<Option<String>, Fail> {
    let v = match params {
        Value::Object(o) => o.get(name),
        Value::Array(a) => a.get(pos),
        _ => None,
    };
    match v {
        Some(Value::String(s)) if s.len() > max => Err(Fail(
            INVALID_PARAMS,
            format!(
                "parameter {name} is {} bytes long; at most {max} are allowed",
                s.len()
            ),
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Null) | None if !required => Ok(None),
        Some(Value::Null) | None => Err(Fail(INVALID_PARAMS, format!("missing parameter {name}"))),
        Some(_) => Err(Fail(
            INVALID_PARAMS,
            format!("parameter {name} must be a string"),
        )),
    }
}

fn call(mgmt: &Mgmt, method: &str, params: &Value) -> Result<Value, Fail> {
    let path =
        |required| param(params, "path", 0, required, MAX_PATH).map(Option::unwrap_or_default);
    match method {
        "rpc_get_methods" => Ok(json!(METHODS)),
        "ls" => Ok(serde_json::to_value(mgmt.ls(&path(false)?)?).unwrap_or(Value::Null)),
        "get" => Ok(Value::String(mgmt.get(&path(true)?)?)),
        "set" => {
            let p = path(true)?;
            let v = param(params, "value", 1, true, MAX_VALUE)?.unwrap_or_default();
            mgmt.set(&p, &v)?;
            Ok(Value::Bool(true))
        }
        "mgmt" => {
            let p = path(true)?;
            let c = param(params, "command", 1, true, MAX_VALUE)?.unwrap_or_default();
            mgmt.mgmt(&p, &c)?;
            Ok(Value::Bool(true))
        }
        "tree" => Ok(mgmt.tree(&path(false)?)?),
        "save_config" => Ok(mgmt.save_config()),
        "load_config" => {
            let cfg = match params {
                Value::Object(o) => o.get("config").cloned(),
                Value::Array(a) => a.first().cloned(),
                _ => None,
            }
            .ok_or_else(|| Fail(INVALID_PARAMS, "missing parameter config".into()))?;
            mgmt.load_config(&cfg)?;
            Ok(Value::Bool(true))
        }
        _ => Err(Fail(
            METHOD_NOT_FOUND,
            format!(
                "method {} not found; methods are {}",
                quote(method),
                METHODS.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::config::Publisher;
    use crate::iscsi::registry::Registry;
    use crate::mgmt::Hooks;
    use std::io::{BufRead, BufReader};

    fn m() -> Arc<Mgmt> {
        Mgmt::new(Publisher::new(), Registry::new(), Hooks::default())
    }

    #[test]
    fn requests_and_errors() {
        let m = m();
        let r = handle(&m, json!({"jsonrpc": "2.0", "id": 1, "method": "get", "params": {"path": "targets/iscsi/enabled"}})).unwrap();
        assert_eq!(r["result"], "0");
        let r = handle(&m, json!({"id": 2, "method": "nope"})).unwrap();
        assert_eq!(r["error"]["code"], METHOD_NOT_FOUND);
        assert!(r["error"]["message"].as_str().unwrap().contains("nope"));
        let r = handle(&m, json!({"id": 3, "method": "get", "params": {}})).unwrap();
        assert_eq!(r["error"]["code"], INVALID_PARAMS);
        assert!(r["error"]["message"].as_str().unwrap().contains("path"));
        let r = handle(
            &m,
            json!({"id": 4, "method": "set", "params": ["targets/iscsi/enabled", "1"]}),
        )
        .unwrap();
        assert_eq!(r["result"], true);
        assert!(
            handle(&m, json!({"method": "get", "params": {"path": "version"}})).is_none(),
            "notification"
        );
        let r = handle(
            &m,
            json!([{"id": 1, "method": "rpc_get_methods"}, {"method": "rpc_get_methods"}, 5]),
        )
        .unwrap();
        assert_eq!(r.as_array().unwrap().len(), 2);
        let r = handle(&m, json!({"id": 5, "method": 7})).unwrap();
        assert_eq!(r["error"]["code"], INVALID_REQUEST);
    }

    #[test]
    fn stream_framing() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let srv = Server::start(&sock, m(), &Options::default()).unwrap();
        assert!(matches!(
            Server::start(&sock, m(), &Options::default()),
            Err(RpcError::InUse)
        ));
        let mut s = UnixStream::connect(&sock).unwrap();
        // Two requests in one write, the second split over two writes.
        s.write_all(br#"{"id":1,"method":"get","params":{"path":"version"}}{"id":2,"method":"#)
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(br#""ls","params":{"path":"targets"}}"#)
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["id"], 1);
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"][0]["name"], "iscsi");
        // Garbage: a parse error, then the connection closes.
        s.write_all(b"{nope").unwrap();
        s.write_all(b"}").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap()["error"]["code"],
            PARSE_ERROR
        );
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
        srv.shutdown();
        assert!(!sock.exists());
    }

    /// A server with `limits` on a fresh socket.
    fn server(limits: Limits) -> (tempfile::TempDir, PathBuf, Server) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let opts = Options {
            group: None,
            limits,
        };
        let srv = Server::start(&sock, m(), &opts).unwrap();
        (dir, sock, srv)
    }

    fn connect(sock: &Path) -> (UnixStream, BufReader<UnixStream>) {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    fn answer(r: &mut BufReader<UnixStream>) -> Value {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Whether the server closed the connection (within the read timeout).
    fn closed(r: &mut BufReader<UnixStream>) -> bool {
        let mut line = String::new();
        matches!(r.read_line(&mut line), Ok(0) | Err(_)) && line.is_empty()
    }

    const VERSION: &[u8] =
        br#"{"jsonrpc":"2.0","id":7,"method":"get","params":{"path":"version"}}"#;

    #[test]
    fn requests_before_a_half_close_are_answered() {
        let (_d, sock, srv) = server(Limits::default());
        let (mut s, mut r) = connect(&sock);
        s.write_all(VERSION).unwrap();
        s.write_all(VERSION).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(answer(&mut r)["id"], 7);
        assert_eq!(answer(&mut r)["id"], 7);
        assert!(closed(&mut r));
        srv.shutdown();
    }

    #[test]
    fn idle_and_stalled_clients_are_dropped() {
        let limits = Limits {
            max_clients: 8,
            idle_timeout: Duration::from_millis(600),
            stall_timeout: Duration::from_millis(300),
        };
        let (_d, sock, srv) = server(limits);
        // Silent from the start.
        let (_idle, mut idle_r) = connect(&sock);
        // Half a request, then nothing.
        let (mut stalled, mut stalled_r) = connect(&sock);
        stalled.write_all(br#"{"id":1,"method":"#).unwrap();
        // Busy: a request now and then keeps it.
        let (mut busy, mut busy_r) = connect(&sock);
        for _ in 0..6 {
            busy.write_all(VERSION).unwrap();
            assert_eq!(answer(&mut busy_r)["id"], 7);
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(closed(&mut idle_r));
        assert!(closed(&mut stalled_r));
        busy.write_all(VERSION).unwrap();
        assert_eq!(answer(&mut busy_r)["id"], 7);
        srv.shutdown();
    }

    #[test]
    fn a_client_beyond_the_cap_is_told_the_limit() {
        let limits = Limits {
            max_clients: 3,
            ..Limits::default()
        };
        let (_d, sock, srv) = server(limits);
        let mut held: Vec<_> = (0..3).map(|_| connect(&sock)).collect();
        // Each held client is served, so all three were admitted.
        for (s, r) in &mut held {
            s.write_all(VERSION).unwrap();
            assert_eq!(answer(r)["id"], 7);
        }
        let (_s, mut r) = connect(&sock);
        let e = answer(&mut r);
        assert_eq!(e["error"]["code"], SERVER_BUSY, "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("busy") && msg.contains('3'), "{msg}");
        assert!(closed(&mut r));
        drop(held);
        // Once they leave, a client is served again.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (mut s, mut r) = connect(&sock);
            s.write_all(VERSION).unwrap();
            let v = answer(&mut r);
            if v["id"] == 7 {
                break;
            }
            assert!(Instant::now() < deadline, "still busy: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        srv.shutdown();
    }

    #[test]
    fn a_client_that_does_not_read_stalls_only_itself() {
        let (_d, sock, srv) = server(Limits::default());
        // Answers asked for and never read, until the server stops reading this client.
        let (mut hog, _hog_r) = connect(&sock);
        hog.set_nonblocking(true).unwrap();
        let tree = br#"{"id":1,"method":"tree","params":{"path":""}}"#.repeat(1000);
        let mut stuck = 0;
        while stuck < 50 {
            match hog.write(&tree) {
                Ok(_) => stuck = 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stuck += 1;
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (mut s, mut r) = connect(&sock);
        s.write_all(VERSION).unwrap();
        assert_eq!(answer(&mut r)["id"], 7);
        srv.shutdown();
    }

    #[test]
    fn a_stream_that_is_no_request_is_answered_and_closed() {
        let (_d, sock, srv) = server(Limits::default());
        for junk in [&b"42 "[..], b"\"str\"", b"][", b"{\"a\":1}}"] {
            let (mut s, mut r) = connect(&sock);
            s.write_all(junk).unwrap();
            let e = answer(&mut r);
            if junk == b"{\"a\":1}}" {
                // The object is answered (not a request), then the stray bracket.
                assert_eq!(e["error"]["code"], INVALID_REQUEST, "{e}");
                let e = answer(&mut r);
                assert_eq!(e["error"]["code"], INVALID_REQUEST, "{e}");
                assert!(
                    e["error"]["message"].as_str().unwrap().contains("'}'"),
                    "{e}"
                );
            } else {
                assert_eq!(e["error"]["code"], INVALID_REQUEST, "{e}");
                let msg = e["error"]["message"].as_str().unwrap();
                assert!(msg.contains("object or a batch array"), "{msg}");
            }
            assert!(closed(&mut r), "{junk:?}");
        }
        srv.shutdown();
    }

    #[test]
    fn long_input_is_not_echoed() {
        let m = m();
        let long = "x".repeat(1 << 20);
        let msg = |r: Value| r["error"]["message"].as_str().unwrap().to_string();
        let e = msg(handle(&m, json!({"id": 1, "method": long})).unwrap());
        assert!(
            e.len() < 300 && e.contains("not found") && e.contains("1048576 bytes"),
            "{e}"
        );
        for (method, params) in [
            ("get", json!({"path": long})),
            ("set", json!({"path": "version", "value": long})),
            (
                "mgmt",
                json!({"path": "targets/iscsi/mgmt", "command": long}),
            ),
        ] {
            let e = msg(handle(&m, json!({"id": 1, "method": method, "params": params})).unwrap());
            assert!(
                e.len() < 200 && e.contains("1048576 bytes"),
                "{method}: {e}"
            );
            assert!(e.contains("at most 4096"), "{method}: {e}");
        }
        // Within the bounds, a long command word is quoted and cut.
        let cmd = format!("{} x", "y".repeat(4000));
        let e = msg(handle(&m, json!({"id": 1, "method": "mgmt", "params": {"path": "targets/iscsi/mgmt", "command": cmd}})).unwrap());
        assert!(e.len() < 400 && e.contains("unknown command"), "{e}");
        // A path of allowed length that does not exist.
        let p = "z/".repeat(2000);
        let e = msg(handle(&m, json!({"id": 1, "method": "get", "params": {"path": p}})).unwrap());
        assert!(e.len() < 300 && e.contains("no such file"), "{e}");
        // Names in a configuration are not bounded by the path limit.
        let cfg = json!({"targets": {"iscsi": {"targets": {long.clone(): {}}}}});
        let e = msg(handle(
            &m,
            json!({"id": 1, "method": "load_config", "params": {"config": cfg}}),
        )
        .unwrap());
        assert!(e.len() <= MAX_MESSAGE, "{}", e.len());
    }

    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_MESSAGE);
        let b = bounded(&long);
        assert!(b.len() <= MAX_MESSAGE, "{}", b.len());
        assert!(b.ends_with(&format!("... ({} bytes)", long.len())), "{b}");
    }

    #[test]
    fn every_request_before_a_half_close_is_answered_however_slowly_read() {
        let (_d, sock, srv) = server(Limits::default());
        let (s, mut r) = connect(&sock);
        // Megabytes of answers: the server stops reading while they wait, and must still
        // answer every request once they are read, although the client has closed its side.
        const N: usize = 6000;
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..N {
                let req = json!({"id": i, "method": "tree", "params": {"path": ""}});
                w.write_all(req.to_string().as_bytes()).unwrap();
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut bytes = 0;
        for i in 0..N {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            bytes += line.len();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["id"], i, "{line}");
            if i % 2000 == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        assert!(bytes > 2 * OUTPUT_HIGH, "{bytes}");
        assert!(closed(&mut r));
        writer.join().unwrap();
        srv.shutdown();
    }

    #[test]
    fn a_file_in_the_way_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, "data").unwrap();
        let r = Server::start(&path, m(), &Options::default());
        assert!(matches!(r, Err(RpcError::NotSocket)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        // A stale socket is replaced.
        let stale = dir.path().join("stale");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let srv = Server::start(&stale, m(), &Options::default()).unwrap();
        let (mut s, mut r) = connect(&stale);
        s.write_all(VERSION).unwrap();
        assert_eq!(answer(&mut r)["id"], 7);
        srv.shutdown();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A server over a tree whose statistics come from `hooks`.
    fn server_with(hooks: Hooks) -> (tempfile::TempDir, PathBuf, Server) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let mgmt = Mgmt::new(Publisher::new(), Registry::new(), hooks);
        let srv = Server::start(&sock, mgmt, &Options::default()).unwrap();
        (dir, sock, srv)
    }

    #[test]
    fn a_slow_request_holds_one_worker_not_the_other_clients() {
        // `get threads` asks the reactors hook, which here waits until the test lets it go:
        // a request that blocks (a backing file on a hung mount).
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        let (entered_tx, entered_rx) = crossbeam_channel::unbounded::<()>();
        let hooks = Hooks {
            reactors: Box::new(move || {
                let _ = entered_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(60));
                vec![Vec::new()]
            }),
            ..Hooks::default()
        };
        let (_dir, sock, srv) = server_with(hooks);
        let (mut a, mut ra) = connect(&sock);
        a.write_all(br#"{"id":1,"method":"get","params":{"path":"threads"}}"#)
            .unwrap();
        entered_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        // While it waits, other clients are served, and so are the slow client's own later
        // requests once its first is answered, in order.
        a.write_all(br#"{"id":2,"method":"get","params":{"path":"version"}}"#)
            .unwrap();
        for id in 10..14 {
            let (mut b, mut rb) = connect(&sock);
            b.write_all(
                format!(r#"{{"id":{id},"method":"get","params":{{"path":"version"}}}}"#).as_bytes(),
            )
            .unwrap();
            assert_eq!(answer(&mut rb)["id"], id);
        }
        release_tx.send(()).unwrap();
        let first = answer(&mut ra);
        assert_eq!(
            (first["id"].clone(), first["result"].clone()),
            (json!(1), json!("1"))
        );
        assert_eq!(answer(&mut ra)["id"], 2);
        srv.shutdown();
    }

    #[test]
    fn a_panicking_request_is_answered_with_an_internal_error() {
        let hooks = Hooks {
            sgv: Box::new(|| panic!("a bug in a handler")),
            ..Hooks::default()
        };
        let (_dir, sock, srv) = server_with(hooks);
        let (mut a, mut ra) = connect(&sock);
        for _ in 0..WORKERS + 1 {
            a.write_all(br#"{"id":7,"method":"ls","params":{"path":"sgv"}}"#)
                .unwrap();
            assert_eq!(answer(&mut ra)["error"]["code"], INTERNAL_ERROR);
        }
        // Every worker is still there.
        a.write_all(br#"{"id":8,"method":"get","params":{"path":"version"}}"#)
            .unwrap();
        assert_eq!(answer(&mut ra)["id"], 8);
        srv.shutdown();
    }
}

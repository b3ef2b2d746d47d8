//! The benchmark: sessions on threads of their own (pinned round-robin to `--cores`), each
//! keeping `--qd` commands of `--bs` bytes in flight on its own connection for `--ramp` then
//! `--secs` seconds.
//!
//! Each session measures alone, with nothing shared per command: it stamps a command when it
//! hands it to the initiator and again when the final response comes back, and records the
//! difference in its own HDR histogram (reads and writes apart) if the response came after
//! the ramp (errors count from the first command on). The histograms are merged when the
//! sessions end. The progress line reads counters that only their session writes. A command
//! that does not end GOOD is counted by its sense key or status and the session goes on; a
//! connection that fails ends its session, which is reported, and the others go on.
//!
//! A command that waits longer than `--timeout` for its answer stops the run: its session
//! names it and gives up on its connection, the other sessions take the answers still due
//! and end. The check costs nothing per command: a session looks through its commands in
//! flight when `SCAN_EVERY` has passed by the clock it reads for each answer anyway, and
//! when the target has sent nothing for that long (the initiator's idle tick ends the wait).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use iscsi_tgt::initiator::{cdb, InitiatorError};

use crate::net::Ini;
use crate::opts::Opts;
use crate::report::{error_name, Errors, Late, Report, Stats, Workload};
use crate::target::{capacity, login, TargetUrl};

/// How often the progress line is rewritten.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often the main thread looks at the sessions while they run.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// What WRITEs carry.
const WRITE_BYTE: u8 = 0xa5;
/// How often a session looks for commands waiting past `--timeout` (and for the others'
/// stop): how late beyond the timeout a run may stop, and the initiator's idle tick.
const SCAN_EVERY: Duration = Duration::from_millis(250);

/// What a session counts for the progress line. Only its own thread writes them (a load and
/// a store, no read-modify-write), the main thread reads them once a second; each on its own
/// cache line so that sessions never share one.
#[repr(align(64))]
#[derive(Default)]
struct Live {
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

impl Live {
    fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

/// Where a session's commands go next: sequential (each session starting at its own share
/// of the LUN, wrapping at the end) or random, aligned to the transfer length.
struct Lbas {
    random: bool,
    rng: u64,
    next: u64,
    /// Transfer length in blocks.
    blocks: u64,
    /// LBAs a command may start at: 0 to `span` (exclusive).
    span: u64,
}

impl Lbas {
    fn new(random: bool, seed: u64, start: u64, blocks: u64, span: u64) -> Lbas {
        Lbas {
            random,
            rng: seed | 1,
            next: start / blocks * blocks % span,
            blocks,
            span,
        }
    }

    /// xorshift64: cheap, and every session its own sequence.
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn next(&mut self) -> u64 {
        if self.random {
            (self.rand() % self.span) / self.blocks * self.blocks
        } else {
            let l = self.next;
            self.next = (self.next + self.blocks) % self.span;
            l
        }
    }

    /// Whether the next command is a READ, for `read_pct` reads in a hundred.
    fn is_read(&mut self, read_pct: u64) -> bool {
        match read_pct {
            100 => true,
            0 => false,
            p => self.rand() % 100 < p,
        }
    }
}

/// What a session hands back.
struct Outcome {
    read: Stats,
    write: Stats,
    errors: Errors,
    /// When it finished: its last command answered, or its connection gone.
    finished: Instant,
    /// Why it ended before its time, if it did.
    ended: Option<String>,
    /// The command it gave up on, if one waited past `--timeout`.
    late: Option<Late>,
}

/// A command in flight.
struct InFlight {
    sent: Instant,
    lba: u64,
    write: bool,
}

/// One session, from its login (before the common start) to its last answer.
struct Session<'a> {
    o: &'a Opts,
    url: &'a TargetUrl,
    index: usize,
    core: Option<usize>,
    live: &'a Live,
    /// Set by the first session that gives up on a command: the others stop too.
    stop: &'a AtomicBool,
}

/// Pins the calling thread to `core`, one of those the process may run on.
fn pin(core: usize) -> Result<(), String> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0))
        .map_err(|e| format!("cannot read the CPU affinity: {e}"))?;
    if !allowed.is_set(core).unwrap_or(false) {
        return Err(format!(
            "--cores: core {core} is not among the cores this process may run on"
        ));
    }
    let mut set = CpuSet::new();
    set.set(core)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &set))
        .map_err(|e| format!("cannot pin a session to core {core}: {e}"))
}

impl Session<'_> {
    /// Pins, logs in and sizes the LUN: the session's connection and its LBAs.
    fn setup(&self) -> Result<(Ini, Lbas), String> {
        if let Some(c) = self.core {
            pin(c)?;
        }
        let what = |e: String| format!("{}: {e}", self.url);
        // MAX_SESSIONS keeps the index within the ISID's byte.
        let mut ini = login(self.o, self.url, self.index as u8).map_err(what)?;
        let (cap, block_size) = capacity(&mut ini, self.url.lun).map_err(what)?;
        if let Some(b) = self.o.block_size.filter(|&b| b != block_size) {
            return Err(what(format!(
                "the LUN's blocks are {block_size} bytes, not the {b} of --blocksize"
            )));
        }
        if !self.o.bs.is_multiple_of(block_size) {
            return Err(what(format!(
                "--bs {} is not a multiple of the LUN's {block_size}-byte blocks",
                self.o.bs
            )));
        }
        let blocks = u64::from(self.o.bs / block_size);
        if cap < blocks {
            return Err(what(format!(
                "the LUN's {cap} blocks are fewer than one command's {blocks}"
            )));
        }
        let span = (cap - blocks + 1).max(1);
        let n = self.o.targets.len() * self.o.sessions;
        // Sequential sessions start spread over the LUN rather than all on the same blocks.
        let start = span / n as u64 * self.index as u64;
        let seed =
            0x9e37_79b9_7f4a_7c15u64 ^ (self.index as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        Ok((ini, Lbas::new(self.o.rw.random, seed, start, blocks, span)))
    }

    /// Keeps the queue full until `end`, then takes the answers still due. Commands answered
    /// GOOD from `measure_from` on are measured; errors are counted throughout. A command
    /// that waits past `--timeout`, a Reject the initiator cannot match to a command, or a
    /// failed connection ends the session early.
    fn run(&self, ini: &mut Ini, lbas: &mut Lbas, measure_from: Instant, end: Instant) -> Outcome {
        let o = self.o;
        let lun = self.url.lun;
        let blocks = lbas.blocks as u32;
        let data = vec![WRITE_BYTE; o.bs as usize];
        let timeout = o.timeout();
        let mut out = Outcome {
            read: Stats::new(),
            write: Stats::new(),
            errors: Errors::default(),
            finished: Instant::now(),
            ended: None,
            late: None,
        };
        let mut inflight: HashMap<u32, InFlight> = HashMap::with_capacity(o.qd * 2);
        let mut submit = |ini: &mut Ini, inflight: &mut HashMap<u32, InFlight>| {
            let lba = lbas.next();
            let read = lbas.is_read(o.rw.read_pct);
            let sent = Instant::now();
            let itt = if read {
                ini.submit(lun, &cdb::read16(lba, blocks), None, o.bs, true)
            } else {
                ini.submit(lun, &cdb::write16(lba, blocks), Some(&data), o.bs, false)
            }?;
            inflight.insert(
                itt,
                InFlight {
                    sent,
                    lba,
                    write: !read,
                },
            );
            Ok::<(), InitiatorError>(())
        };
        // The session hears from its clock even when the target says nothing.
        let mut failed = ini
            .set_idle_tick(Some(SCAN_EVERY))
            .err()
            .map(|e| e.to_string());
        // Commands to send as soon as the command window lets them.
        let mut owed = o.qd;
        // Since when the window has let none of them go (with none in flight to answer).
        let mut shut_since: Option<Instant> = None;
        let mut last_scan = Instant::now();
        // When the queue stops being refilled: `end`, or sooner if another session stops.
        let mut until = end;
        while failed.is_none() && out.late.is_none() {
            while owed > 0 {
                match submit(ini, &mut inflight) {
                    Ok(()) => {
                        owed -= 1;
                        shut_since = None;
                    }
                    // The window is shut and the target said nothing for a tick.
                    Err(InitiatorError::Idle) => break,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if failed.is_some() || (inflight.is_empty() && owed == 0) {
                break;
            }
            let answer = if inflight.is_empty() {
                // Nothing to wait for but the window, which the submit above waited on.
                None
            } else {
                match ini.wait_next() {
                    Ok(x) => Some(x),
                    Err(InitiatorError::Idle) => None,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            };
            let now = Instant::now();
            if let Some((itt, r)) = answer {
                let Some(c) = inflight.remove(&itt) else {
                    failed = Some(format!(
                        "an answer for ITT {itt:#x}, which is not in flight"
                    ));
                    break;
                };
                if matches!(&r, Ok(r) if r.is_good()) {
                    Live::add(&self.live.ios, 1);
                    Live::add(&self.live.bytes, u64::from(o.bs));
                    if now >= measure_from {
                        let st = if c.write {
                            &mut out.write
                        } else {
                            &mut out.read
                        };
                        st.ios += 1;
                        st.bytes += u64::from(o.bs);
                        st.lat.record(now - c.sent);
                    }
                } else {
                    // Errors count from the first command on, the ramp's too.
                    out.errors.count(error_name(&r));
                    Live::add(&self.live.errors, 1);
                }
                if now < until {
                    owed += 1;
                }
                if now.duration_since(last_scan) < SCAN_EVERY {
                    continue;
                }
            }
            // Every SCAN_EVERY, or when the target has been silent for a tick.
            last_scan = now;
            if let Some(t) = timeout {
                out.late = self.late(&inflight, now, t, blocks);
                if out.late.is_some() {
                    break;
                }
                if inflight.is_empty() && owed > 0 {
                    let since = *shut_since.get_or_insert(now);
                    if now.duration_since(since) >= t {
                        failed = Some(format!(
                            "the target kept its command window shut (MaxCmdSN {}, next CmdSN \
                             {}) for {:.1} s with no command in flight (--timeout {})",
                            ini.max_cmd_sn(),
                            ini.next_cmd_sn(),
                            now.duration_since(since).as_secs_f64(),
                            o.timeout
                        ));
                        break;
                    }
                }
            }
            if let Some((reason, itt)) = ini.unclaimed_reject() {
                failed = Some(format!(
                    "the target rejected a PDU that is no command in flight ({}, reason \
                     {reason:#04x} {})",
                    match itt {
                        Some(itt) => format!("ITT {itt:#x}"),
                        None => "no header returned".into(),
                    },
                    reject_reason_name(reason)
                ));
                break;
            }
            if self.stop.load(Ordering::Relaxed) {
                until = until.min(now);
                owed = 0;
            }
        }
        out.finished = Instant::now();
        if let Some(late) = &out.late {
            self.stop.store(true, Ordering::Relaxed);
            out.errors.transport += 1;
            Live::add(&self.live.errors, 1);
            let line = late.line(o.timeout);
            eprintln!("iscsi-bench: {line}");
            out.ended = Some(line);
        } else if let Some(e) = failed {
            out.errors.transport += 1;
            Live::add(&self.live.errors, 1);
            let line = format!(
                "session {} ({}): the connection failed with {} command{} in flight: {e}",
                self.index,
                self.url,
                inflight.len(),
                if inflight.len() == 1 { "" } else { "s" }
            );
            eprintln!("iscsi-bench: {line}");
            out.ended = Some(line);
        } else {
            // The logout waits as any other wait, without ticks.
            let _ = ini.set_idle_tick(None);
        }
        out
    }

    /// The command in flight longest, if it has waited `timeout` or more by `now`.
    fn late(
        &self,
        inflight: &HashMap<u32, InFlight>,
        now: Instant,
        timeout: Duration,
        blocks: u32,
    ) -> Option<Late> {
        let (&itt, c) = inflight.iter().min_by_key(|(_, c)| c.sent)?;
        let waited = now.saturating_duration_since(c.sent);
        (waited >= timeout).then(|| Late {
            url: self.url.to_string(),
            session: self.index,
            op: if c.write { "WRITE (16)" } else { "READ (16)" },
            itt,
            lba: c.lba,
            blocks,
            waited_secs: (waited.as_secs_f64() * 1e3).round() / 1e3,
        })
    }
}

/// RFC 7143 §11.17.1: a Reject's reason by name.
fn reject_reason_name(reason: u8) -> &'static str {
    use iscsi_tgt::iscsi::pdu;
    match reason {
        pdu::REJECT_DATA_DIGEST_ERROR => "data digest error",
        pdu::REJECT_SNACK_REJECT => "SNACK reject",
        pdu::REJECT_PROTOCOL_ERROR => "protocol error",
        pdu::REJECT_COMMAND_NOT_SUPPORTED => "command not supported",
        pdu::REJECT_IMMEDIATE_COMMAND_REJECT => "immediate command reject",
        pdu::REJECT_TASK_IN_PROGRESS => "task in progress",
        pdu::REJECT_INVALID_DATA_ACK => "invalid data ack",
        pdu::REJECT_INVALID_PDU_FIELD => "invalid PDU field",
        pdu::REJECT_OUT_OF_RESOURCES => "long operation reject (out of resources)",
        pdu::REJECT_WAITING_FOR_LOGOUT => "waiting for logout",
        _ => "reserved",
    }
}

/// The progress line, rewritten in place on stderr while it is a terminal.
struct Progress {
    on: bool,
    last: Instant,
    ios: u64,
    bytes: u64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            on: std::io::stderr().is_terminal(),
            last: Instant::now(),
            ios: 0,
            bytes: 0,
        }
    }

    fn tick(&mut self, live: &[Live], start: Instant, ramp_end: Instant) {
        let now = Instant::now();
        if !self.on || now.duration_since(self.last) < PROGRESS_EVERY {
            return;
        }
        let sum = |f: fn(&Live) -> &AtomicU64| -> u64 {
            live.iter().map(|l| f(l).load(Ordering::Relaxed)).sum()
        };
        let (ios, bytes, errors) = (sum(|l| &l.ios), sum(|l| &l.bytes), sum(|l| &l.errors));
        let dt = now.duration_since(self.last).as_secs_f64();
        let mut err = std::io::stderr().lock();
        // A terminal that went away is no reason to stop the run.
        let _ = write!(
            err,
            "\r{:>6.1} s{} iops {:.0} mbps {:.1} errors {errors}\x1b[K",
            now.duration_since(start).as_secs_f64(),
            // The second shown began in the ramp.
            if self.last < ramp_end { " (ramp)" } else { "" },
            (ios - self.ios) as f64 / dt,
            (bytes - self.bytes) as f64 / dt / 1e6,
        );
        let _ = err.flush();
        self.last = now;
        self.ios = ios;
        self.bytes = bytes;
    }

    /// Clears the line before the summary.
    fn done(&self) {
        if self.on {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// Runs the benchmark. An error here is one that kept it from starting (a login, a LUN that
/// does not suit); what goes wrong once it runs is counted in the report.
pub fn run(o: &Opts) -> Result<Report, String> {
    let live: Vec<Live> = (0..o.targets.len() * o.sessions)
        .map(|_| Live::default())
        .collect();
    let stop = AtomicBool::new(false);
    let mut sessions = Vec::with_capacity(live.len());
    for (i, url) in o
        .targets
        .iter()
        .flat_map(|u| std::iter::repeat_n(u, o.sessions))
        .enumerate()
    {
        sessions.push(Session {
            o,
            url,
            index: i,
            core: (!o.cores.is_empty()).then(|| o.cores[i % o.cores.len()]),
            live: &live[i],
            stop: &stop,
        });
    }
    let ready = Barrier::new(sessions.len() + 1);
    let setup_failed = AtomicBool::new(false);
    let start: OnceLock<Instant> = OnceLock::new();
    let ramp = Duration::from_secs_f64(o.ramp);
    let secs = Duration::from_secs_f64(o.secs);
    let results: Vec<Result<Outcome, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = sessions
            .iter()
            .map(|s| {
                let (ready, setup_failed, start) = (&ready, &setup_failed, &start);
                sc.spawn(move || {
                    let set = s.setup();
                    if set.is_err() {
                        setup_failed.store(true, Ordering::Relaxed);
                    }
                    // Every session logged in (or one failed) before any starts.
                    ready.wait();
                    let (mut ini, mut lbas) = set?;
                    if setup_failed.load(Ordering::Relaxed) {
                        let _ = ini.logout();
                        return Err(String::new());
                    }
                    let t0 = *start.get_or_init(Instant::now);
                    let out = s.run(&mut ini, &mut lbas, t0 + ramp, t0 + ramp + secs);
                    if out.ended.is_none() {
                        let _ = ini.logout();
                    }
                    Ok(out)
                })
            })
            .collect();
        ready.wait();
        let t0 = *start.get_or_init(Instant::now);
        let mut progress = Progress::new();
        if !setup_failed.load(Ordering::Relaxed) {
            while !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(WATCH_EVERY);
                progress.tick(&live, t0, t0 + ramp);
            }
            progress.done();
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a session's thread panicked".into()))
            })
            .collect()
    });
    let t0 = start.get().copied().unwrap_or_else(Instant::now);
    if setup_failed.load(Ordering::Relaxed) {
        let why: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .filter(|e| !e.is_empty())
            .collect();
        return Err(why.join("; "));
    }
    let mut report = Report {
        workload: Workload {
            urls: o.targets.iter().map(ToString::to_string).collect(),
            sessions_per_url: o.sessions,
            cores: o.cores.clone(),
            qd: o.qd,
            bs: o.bs,
            read_pct: o.rw.read_pct,
            random: o.rw.random,
            secs: o.secs,
            ramp_secs: o.ramp,
            timeout_secs: o.timeout,
        },
        rw_name: o.rw.name(),
        elapsed: Duration::ZERO,
        read: Stats::new(),
        write: Stats::new(),
        errors: Errors::default(),
        ended: Vec::new(),
        late: Vec::new(),
    };
    let mut last = t0 + ramp;
    for r in results {
        match r {
            Ok(out) => {
                report.read.merge(&out.read);
                report.write.merge(&out.write);
                report.errors.merge(&out.errors);
                report.ended.extend(out.ended);
                report.late.extend(out.late);
                last = last.max(out.finished);
            }
            Err(e) => {
                // A session whose thread panicked: counted, never hidden.
                report.errors.transport += 1;
                report.ended.push(e);
            }
        }
    }
    report.elapsed = last.saturating_duration_since(t0 + ramp);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_lbas_wrap_and_random_ones_stay_aligned_in_range() {
        let mut s = Lbas::new(false, 1, 20, 8, 33);
        let v: Vec<u64> = (0..4).map(|_| s.next()).collect();
        assert_eq!(v, [16, 24, 32, 7], "from its share, wrapping at the span");
        let mut r = Lbas::new(true, 7, 0, 8, 1000);
        for _ in 0..10_000 {
            let l = r.next();
            assert!(l < 1000 && l.is_multiple_of(8), "{l}");
        }
        // The mix is near what was asked for.
        let reads = (0..10_000).filter(|_| r.is_read(70)).count();
        assert!((6500..7500).contains(&reads), "{reads}");
        assert!((0..100).all(|_| r.is_read(100)) && (0..100).all(|_| !r.is_read(0)));
    }
}

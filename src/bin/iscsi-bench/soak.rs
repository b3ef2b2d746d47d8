//! `--soak`: data integrity under ABORT TASKs and dropped connections.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iscsi_tgt::initiator::{cdb, InitiatorError, ScsiResult};
use iscsi_tgt::iscsi::pdu;

use crate::net::Ini;
use crate::opts::Opts;
use crate::report::emit;
use crate::target::{capacity, login_as};

/// The initiator name of the soak's sessions (each its own ISID).
const SOAK_INITIATOR: &str = "iqn.2026-11.org.iscsi-tgt:soak";
/// How often a session tries to log in again after a drop before it gives up, and the pause
/// between tries.
const RELOGIN_ATTEMPTS: u32 = 50;
const RELOGIN_PAUSE: Duration = Duration::from_millis(200);
/// Mismatch lines (each a run of blocks) a session prints before it only counts them.
const MISMATCH_LINES: u64 = 50;
/// How many bytes of a block a mismatch line shows.
const SHOWN_BYTES: usize = 24;
/// SAM status codes that mean the command was not executed.
const STATUS_BUSY: u8 = 0x08;
const STATUS_TASK_SET_FULL: u8 = 0x28;
/// SPC-4 sense key UNIT ATTENTION: the command was not executed.
const SENSE_UNIT_ATTENTION: u8 = 0x06;

/// The ISID of soak session `id`: type 10b (random), the rest fixed so that a new login of
/// the same session reinstates it (RFC 7143 §6.3.5, §11.12.5).
fn soak_isid(id: u8) -> [u8; 6] {
    [0x80, 0x53, 0x4f, 0x41, 0x4b, id]
}

/// The time of day (UTC) as HH:MM:SS.mmm, to line events up with the target's log.
fn wall_clock() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// The splitmix64 finalizer: a bijection of u64 that spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Generation 0: what a block holds is not known (not yet written, or found corrupt), so any
/// content passes. Written generations start at 1.
const GEN_UNKNOWN: u32 = 0;

/// The contents of block `lba` at generation `gen` of run `seed`. The first word is the LBA
/// and the second the generation beside the low half of the seed, so blocks that differ in
/// place, generation or run always differ and a mismatch can say what it found instead; every
/// later word depends on all three, so a torn, shifted or stale block is caught anywhere in it.
fn block_pattern(seed: u64, lba: u64, gen: u32, out: &mut [u8]) {
    let key = mix(seed ^ mix(lba ^ mix(u64::from(gen))));
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => lba,
            1 => u64::from(gen) | (seed << 32),
            _ => mix(key ^ i as u64),
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// A block that held none of the generations it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mismatch {
    lba: u64,
    /// The generations that would have passed, newest first.
    expected: Vec<u32>,
    /// The first bytes of the newest expected block and of what was read.
    want: Vec<u8>,
    got: Vec<u8>,
    /// What the block read claims to be (its first two words), and whether it is this run's.
    got_lba: u64,
    got_gen: u32,
    got_this_run: bool,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gens: Vec<String> = self.expected.iter().map(u32::to_string).collect();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        write!(
            f,
            "LBA {}: expected generation {}, found a block that claims LBA {} generation {}{}; \
             expected {} got {}",
            self.lba,
            gens.join(" or "),
            self.got_lba,
            self.got_gen,
            if self.got_this_run {
                ""
            } else {
                " (not of this run)"
            },
            hex(&self.want),
            hex(&self.got)
        )
    }
}

/// What a session's slice of the LUN should hold, block by block.
///
/// A WRITE answered GOOD sets its blocks to its generation. A WRITE whose outcome is unknown
/// (aborted, or in flight when its connection went) leaves each of its blocks holding either
/// what it held before or the new generation: the block is in doubt and a READ accepts any
/// of them. The first READ of a block in doubt settles it to what it found, since nothing may
/// change it after the abort or the session's reinstatement; a later WRITE answered GOOD
/// settles it too. A block that matches nothing is counted once and is unknown from then on.
struct Model {
    first_lba: u64,
    /// The generation each block holds or, in doubt, the newest it may hold.
    gens: Vec<u32>,
    /// Blocks in doubt (by index): the older generations they may still hold.
    doubt: HashMap<usize, Vec<u32>>,
}

impl Model {
    fn new(first_lba: u64, blocks: usize) -> Model {
        Model {
            first_lba,
            gens: vec![GEN_UNKNOWN; blocks],
            doubt: HashMap::new(),
        }
    }

    fn len(&self) -> u64 {
        self.gens.len() as u64
    }

    /// Indexes of `blocks` blocks from `lba`, which the caller keeps inside the slice.
    fn range(&self, lba: u64, blocks: u32) -> std::ops::Range<usize> {
        let start = (lba - self.first_lba) as usize;
        start..start + blocks as usize
    }

    /// A WRITE of generation `gen` was answered GOOD.
    fn written(&mut self, lba: u64, blocks: u32, gen: u32) {
        for i in self.range(lba, blocks) {
            self.gens[i] = gen;
            self.doubt.remove(&i);
        }
    }

    /// A WRITE of generation `gen` may or may not have reached its blocks.
    fn maybe_written(&mut self, lba: u64, blocks: u32, gen: u32) {
        for i in self.range(lba, blocks) {
            let old = self.gens[i];
            if old == GEN_UNKNOWN {
                continue;
            }
            let d = self.doubt.entry(i).or_default();
            if !d.contains(&old) {
                d.push(old);
            }
            d.retain(|&g| g != gen);
            self.gens[i] = gen;
        }
    }

    /// The generations block `i` may hold, newest first (empty: unknown, anything goes).
    fn candidates(&self, i: usize) -> Vec<u32> {
        if self.gens[i] == GEN_UNKNOWN {
            return Vec::new();
        }
        let mut c = vec![self.gens[i]];
        if let Some(d) = self.doubt.get(&i) {
            c.extend(d.iter().rev());
        }
        c
    }

    /// Checks a READ of `data` from `lba` in `block_size` blocks: settles blocks in doubt to
    /// what they hold and returns the blocks that hold none of their candidates.
    fn check(&mut self, seed: u64, lba: u64, data: &[u8], block_size: u32) -> Vec<Mismatch> {
        let bs = block_size as usize;
        let mut want = vec![0u8; bs];
        let mut bad = Vec::new();
        let first = (lba - self.first_lba) as usize;
        for (k, got) in data.chunks_exact(bs).enumerate() {
            let i = first + k;
            let here = lba + k as u64;
            let cands = self.candidates(i);
            if cands.is_empty() {
                continue;
            }
            let hit = cands.iter().copied().find(|&g| {
                block_pattern(seed, here, g, &mut want);
                want == got
            });
            match hit {
                Some(g) => {
                    if cands.len() > 1 {
                        self.gens[i] = g;
                        self.doubt.remove(&i);
                    }
                }
                None => {
                    block_pattern(seed, here, cands[0], &mut want);
                    let word = |w: usize| {
                        got.get(8 * w..8 * w + 8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u64::from_le_bytes)
                    };
                    bad.push(Mismatch {
                        lba: here,
                        expected: cands,
                        want: want[..SHOWN_BYTES.min(bs)].to_vec(),
                        got: got[..SHOWN_BYTES.min(bs)].to_vec(),
                        got_lba: word(0),
                        got_gen: word(1) as u32,
                        got_this_run: word(1) >> 32 == seed & 0xffff_ffff,
                    });
                    self.gens[i] = GEN_UNKNOWN;
                    self.doubt.remove(&i);
                }
            }
        }
        bad
    }

    /// How many blocks are in doubt.
    fn in_doubt(&self) -> usize {
        self.doubt.len()
    }
}

/// What the soak counts; the summary line prints them in this order under these names.
#[derive(Clone, Copy)]
enum K {
    Ops,
    Reads,
    Writes,
    Bytes,
    Aborts,
    TmfComplete,
    TmfNoTask,
    TmfOther,
    Aborted,
    AbortedWrites,
    Rewrites,
    Drops,
    DropsReset,
    Relogins,
    ReloginRetries,
    UnitAttentions,
    Busy,
    Errors,
    Mismatches,
    VerifiedBlocks,
    InDoubt,
}

const COUNTER_NAMES: [&str; 21] = [
    "ops",
    "reads",
    "writes",
    "bytes",
    "aborts",
    "tmf_complete",
    "tmf_no_task",
    "tmf_other",
    "aborted",
    "aborted_writes",
    "rewrites",
    "drops",
    "drops_reset",
    "relogins",
    "relogin_retries",
    "unit_attentions",
    "busy",
    "errors",
    "mismatches",
    "verified_blocks",
    "in_doubt_at_end",
];

#[derive(Default)]
struct Counters([AtomicU64; COUNTER_NAMES.len()]);

impl Counters {
    fn add(&self, k: K, n: u64) {
        self.0[k as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self, k: K) -> u64 {
        self.0[k as usize].load(Ordering::Relaxed)
    }
}

/// The counters of all sessions summed, as `name value` pairs.
fn counter_line(all: &[Counters]) -> String {
    let mut out = Vec::new();
    for (i, name) in COUNTER_NAMES.iter().enumerate() {
        let v: u64 = all.iter().map(|c| c.0[i].load(Ordering::Relaxed)).sum();
        out.push(format!("{name} {v}"));
    }
    out.join(" ")
}

/// A command of the soak in flight.
struct SoakOp {
    write: bool,
    lba: u64,
    blocks: u32,
    gen: u32,
    /// A READ follows once this WRITE is answered GOOD.
    read_back: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Fill,
    Run,
    Verify,
}

/// One soak session: its connection, its slice's model and what it has in flight.
struct SoakSession<'a> {
    o: &'a Opts,
    id: usize,
    c: &'a Counters,
    ini: Option<Ini>,
    block_size: u32,
    seed: u64,
    rng: u64,
    model: Model,
    ops: HashMap<u32, SoakOp>,
    /// What goes out before the random commands: WRITEs again over the ranges of WRITEs
    /// aborted or lost with a connection (as an initiator retries them), each read back once
    /// answered. An aborted WRITE that still lands afterwards, over its retry, shows up as
    /// stale data.
    again: VecDeque<SoakOp>,
    /// Why the outcome of each WRITE generation in doubt is unknown, for mismatch reports.
    lost: HashMap<u32, String>,
    /// Mismatch lines printed so far.
    mismatch_lines: u64,
    next_gen: u32,
    stage: Stage,
}

impl SoakSession<'_> {
    /// xorshift64*: the session's own random numbers.
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rand() % n.max(1)
    }

    /// The next time something with a mean interval of `mean` seconds happens (half to one
    /// and a half times the mean from now), or never for 0.
    fn after(&mut self, mean: f64) -> Option<Instant> {
        if mean <= 0.0 {
            return None;
        }
        let f = 0.5 + self.below(1000) as f64 / 1000.0;
        Some(Instant::now() + Duration::from_secs_f64(mean * f))
    }

    /// A transfer length in blocks, 1 to `max`, spread evenly over the powers of two.
    fn io_blocks(&mut self, max: u64) -> u64 {
        let bits = 64 - u64::leading_zeros(max.max(1)) as u64;
        let low = 1u64 << self.below(bits);
        (low + self.below(low)).min(max)
    }

    /// Logs in (again) with the session's ISID, reinstating any session of it the target
    /// still has, and clears the new nexus's unit attentions.
    fn connect(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..RELOGIN_ATTEMPTS {
            if attempt > 0 {
                self.c.add(K::ReloginRetries, 1);
                std::thread::sleep(RELOGIN_PAUSE);
            }
            let isid = soak_isid(self.id as u8);
            match login_as(self.o, self.o.single(), SOAK_INITIATOR, isid).and_then(|mut ini| {
                self.clear_unit_attentions(&mut ini)?;
                Ok(ini)
            }) {
                Ok(ini) => {
                    self.ini = Some(ini);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(format!(
            "no login within {RELOGIN_ATTEMPTS} attempts, the last: {last}"
        ))
    }

    fn clear_unit_attentions(&self, ini: &mut Ini) -> Result<(), String> {
        for _ in 0..16 {
            let r = ini
                .test_unit_ready(self.o.single().lun)
                .map_err(|e| format!("TEST UNIT READY: {e}"))?;
            if r.is_good() {
                return Ok(());
            }
            if r.sense_key() != Some(SENSE_UNIT_ATTENTION) {
                return Err(format!("TEST UNIT READY failed: {r:?}"));
            }
            self.c.add(K::UnitAttentions, 1);
        }
        Err("TEST UNIT READY kept reporting unit attentions".into())
    }

    /// Closes the connection abruptly with what is in flight, whose WRITEs are then in doubt.
    fn lose_connection(&mut self, reset: bool, why: &str) {
        let port = self
            .ini
            .as_ref()
            .and_then(|i| i.stream().local_addr().ok())
            .map_or(0, |a| a.port());
        let why = format!("{why} at {} UTC from port {port}", wall_clock());
        if let Some(ini) = self.ini.take() {
            // The socket goes either way; an error setting SO_LINGER only makes it a FIN.
            let _ = ini.drop_connection(reset);
        }
        let lost: Vec<SoakOp> = self.ops.drain().map(|(_, op)| op).collect();
        for op in lost {
            if op.write {
                self.lost.insert(op.gen, why.clone());
                self.model.maybe_written(op.lba, op.blocks, op.gen);
                self.write_again(&op);
            }
        }
    }

    /// Queues a WRITE again over the range of `op`, a WRITE whose outcome is unknown, in the
    /// random phase (the sweeps send their lost commands again themselves).
    fn write_again(&mut self, op: &SoakOp) {
        if self.stage == Stage::Run {
            self.again.push_back(SoakOp {
                write: true,
                lba: op.lba,
                blocks: op.blocks,
                gen: GEN_UNKNOWN,
                read_back: true,
            });
        }
    }

    /// A failure of the connection or of the protocol: counted, printed, and the session
    /// goes on over a new connection.
    fn recover(&mut self, e: &InitiatorError) -> Result<(), String> {
        self.c.add(K::Errors, 1);
        eprintln!(
            "soak: session {}: {e} ({} commands in flight); logging in again",
            self.id,
            self.ops.len()
        );
        self.lose_connection(true, "in flight when the connection failed");
        self.connect()?;
        self.c.add(K::Relogins, 1);
        Ok(())
    }

    fn ini(&mut self) -> Result<&mut Ini, InitiatorError> {
        self.ini
            .as_mut()
            .ok_or_else(|| InitiatorError::InvalidArgument("not connected".into()))
    }

    /// Sends a READ, or a WRITE of generation `gen`, of `blocks` blocks at `lba`.
    fn submit(
        &mut self,
        write: bool,
        lba: u64,
        blocks: u32,
        gen: u32,
        read_back: bool,
    ) -> Result<(), InitiatorError> {
        let bs = self.block_size as usize;
        let len = blocks * self.block_size;
        let lun = self.o.single().lun;
        let itt = if write {
            let mut data = vec![0u8; len as usize];
            for (k, b) in data.chunks_exact_mut(bs).enumerate() {
                block_pattern(self.seed, lba + k as u64, gen, b);
            }
            let r = self
                .ini()?
                .submit(lun, &cdb::write16(lba, blocks), Some(&data), len, false);
            if r.is_err() {
                // Part of it may have gone out.
                self.model.maybe_written(lba, blocks, gen);
            }
            r?
        } else {
            self.ini()?
                .submit(lun, &cdb::read16(lba, blocks), None, len, true)?
        };
        self.ops.insert(
            itt,
            SoakOp {
                write,
                lba,
                blocks,
                gen,
                read_back,
            },
        );
        Ok(())
    }

    fn new_gen(&mut self) -> u32 {
        let g = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(GEN_UNKNOWN + 1);
        g
    }

    /// Whether `n` blocks from `lba` overlap a command in flight.
    fn overlaps_in_flight(&self, lba: u64, n: u64) -> bool {
        self.ops
            .values()
            .any(|o| lba < o.lba + u64::from(o.blocks) && o.lba < lba + n)
    }

    /// Submits one random READ or WRITE that overlaps nothing in flight (commands run in any
    /// order, so overlapping ones would have no single expected outcome). False when no free
    /// range turned up.
    fn submit_random(&mut self) -> Result<bool, InitiatorError> {
        if let Some(op) = self.again.pop_front() {
            if self.overlaps_in_flight(op.lba, u64::from(op.blocks)) {
                self.again.push_front(op);
            } else {
                let gen = if op.write {
                    self.c.add(K::Rewrites, 1);
                    self.new_gen()
                } else {
                    GEN_UNKNOWN
                };
                self.submit(op.write, op.lba, op.blocks, gen, op.read_back)?;
                return Ok(true);
            }
        }
        let max = u64::from((self.o.max_io / self.block_size).max(1));
        let slice = self.model.len();
        for _ in 0..8 {
            let n = self.io_blocks(max).min(slice);
            let lba = self.model.first_lba + self.below(slice - n + 1);
            if self.overlaps_in_flight(lba, n) {
                continue;
            }
            let write = self.below(100) >= self.o.read_pct;
            let gen = if write { self.new_gen() } else { GEN_UNKNOWN };
            self.submit(write, lba, n as u32, gen, false)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A command's answer: the model follows a WRITE, a READ is checked against it.
    fn complete(&mut self, itt: u32, r: ScsiResult) -> Result<(), InitiatorError> {
        let Some(op) = self.ops.remove(&itt) else {
            return Err(InitiatorError::Protocol(format!(
                "an answer for ITT {itt:#x}, which is not in flight"
            )));
        };
        let len = u64::from(op.blocks) * u64::from(self.block_size);
        if self.stage == Stage::Run {
            self.c.add(K::Ops, 1);
            self.c.add(if op.write { K::Writes } else { K::Reads }, 1);
            self.c.add(K::Bytes, len);
        }
        if r.is_good() {
            if op.write {
                self.model.written(op.lba, op.blocks, op.gen);
                if op.read_back && self.stage == Stage::Run {
                    self.again.push_back(SoakOp {
                        write: false,
                        read_back: false,
                        ..op
                    });
                }
            } else if r.data.len() as u64 != len {
                self.c.add(K::Errors, 1);
                eprintln!(
                    "soak: session {}: READ of {} blocks at LBA {} returned {} of {len} bytes",
                    self.id,
                    op.blocks,
                    op.lba,
                    r.data.len()
                );
            } else {
                let bad = self
                    .model
                    .check(self.seed, op.lba, &r.data, self.block_size);
                if self.stage == Stage::Verify {
                    self.c.add(K::VerifiedBlocks, u64::from(op.blocks));
                }
                self.report(bad);
            }
            return Ok(());
        }
        let not_executed = match (r.status, r.sense_key()) {
            (_, Some(SENSE_UNIT_ATTENTION)) => {
                self.c.add(K::UnitAttentions, 1);
                true
            }
            (STATUS_BUSY | STATUS_TASK_SET_FULL, _) => {
                self.c.add(K::Busy, 1);
                true
            }
            _ => false,
        };
        if !not_executed {
            self.c.add(K::Errors, 1);
            eprintln!(
                "soak: session {}: {} of {} blocks at LBA {} failed: response {}, status {:#04x}, \
                 sense {:02x?}",
                self.id,
                if op.write { "WRITE" } else { "READ" },
                op.blocks,
                op.lba,
                r.response,
                r.status,
                r.sense
            );
            if op.write {
                self.model.maybe_written(op.lba, op.blocks, op.gen);
            }
        }
        Ok(())
    }

    /// Counts and prints mismatches, one line for each run of neighbouring blocks that went
    /// wrong the same way.
    fn report(&mut self, bad: Vec<Mismatch>) {
        let mut i = 0;
        while i < bad.len() {
            let m = &bad[i];
            let mut j = i + 1;
            while j < bad.len()
                && bad[j].lba == m.lba + (j - i) as u64
                && bad[j].expected == m.expected
                && bad[j].got_gen == m.got_gen
                && bad[j].got_lba == m.got_lba + (j - i) as u64
            {
                j += 1;
            }
            self.c.add(K::Mismatches, (j - i) as u64);
            self.mismatch_lines += 1;
            if self.mismatch_lines <= MISMATCH_LINES {
                let why = match self.lost.get(&m.got_gen) {
                    Some(w) if m.got_this_run && m.got_lba == m.lba => {
                        format!(" (the WRITE of generation {} was {w})", m.got_gen)
                    }
                    _ => String::new(),
                };
                eprintln!(
                    "soak: MISMATCH session {} at {} UTC: {} block(s) from {m}{why}",
                    self.id,
                    wall_clock(),
                    j - i
                );
            }
            i = j;
        }
    }

    /// ABORT TASK for a random command still unanswered. An aborted WRITE leaves its blocks
    /// in doubt.
    fn abort_one(&mut self) -> Result<(), InitiatorError> {
        let Some(ini) = self.ini.as_ref() else {
            return Ok(());
        };
        let mut live: Vec<u32> = self
            .ops
            .keys()
            .copied()
            .filter(|&itt| ini.in_flight(itt))
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        live.sort_unstable();
        let itt = live[self.below(live.len() as u64) as usize];
        self.c.add(K::Aborts, 1);
        let lun = self.o.single().lun;
        let (response, ended) = self.ini()?.abort_task(lun, itt)?;
        match response {
            pdu::TMF_RSP_COMPLETE => self.c.add(K::TmfComplete, 1),
            pdu::TMF_RSP_TASK_DOES_NOT_EXIST => self.c.add(K::TmfNoTask, 1),
            other => {
                self.c.add(K::TmfOther, 1);
                self.c.add(K::Errors, 1);
                eprintln!(
                    "soak: session {}: ABORT TASK answered with response {other}",
                    self.id
                );
            }
        }
        if ended {
            self.c.add(K::Aborted, 1);
            if let Some(op) = self.ops.remove(&itt) {
                if op.write {
                    self.c.add(K::AbortedWrites, 1);
                    self.lost.insert(
                        op.gen,
                        format!(
                            "ended by ABORT TASK (Function Complete) at {} UTC",
                            wall_clock()
                        ),
                    );
                    self.model.maybe_written(op.lba, op.blocks, op.gen);
                    self.write_again(&op);
                }
            }
        }
        Ok(())
    }

    /// One turn of the random phase: fill the queue, disrupt when due, take one answer.
    /// Returns whether a connection drop is due now.
    fn step(
        &mut self,
        next_abort: &mut Option<Instant>,
        next_drop: &mut Option<Instant>,
    ) -> Result<bool, InitiatorError> {
        while self.ops.len() < self.o.qd && self.submit_random()? {}
        let now = Instant::now();
        if next_abort.is_some_and(|t| now >= t) {
            *next_abort = self.after(self.o.abort_every);
            self.abort_one()?;
        }
        if next_drop.is_some_and(|t| now >= t) {
            *next_drop = self.after(self.o.drop_every);
            return Ok(true);
        }
        if !self.ops.is_empty() {
            let (itt, r) = self.ini()?.wait_any()?;
            self.complete(itt, r)?;
        }
        Ok(false)
    }

    /// The random phase until `end`, then the answers still due.
    fn run(&mut self, end: Instant) -> Result<(), String> {
        self.stage = Stage::Run;
        let mut next_abort = self.after(self.o.abort_every);
        let mut next_drop = self.after(self.o.drop_every);
        while Instant::now() < end {
            match self.step(&mut next_abort, &mut next_drop) {
                Ok(false) => {}
                Ok(true) => {
                    let reset = self.below(2) == 0;
                    self.c.add(K::Drops, 1);
                    if reset {
                        self.c.add(K::DropsReset, 1);
                    }
                    self.lose_connection(
                        reset,
                        if reset {
                            "in flight at a drop by TCP reset"
                        } else {
                            "in flight at a drop by FIN"
                        },
                    );
                    std::thread::sleep(Duration::from_secs_f64(self.o.relogin_delay));
                    self.connect()?;
                    self.c.add(K::Relogins, 1);
                }
                Err(e) => self.recover(&e)?,
            }
        }
        while !self.ops.is_empty() {
            let r = self.ini().and_then(|i| i.wait_any());
            if let Err(e) = r.and_then(|(itt, r)| self.complete(itt, r)) {
                self.recover(&e)?;
            }
        }
        Ok(())
    }

    /// Writes (one generation) or reads and checks the whole slice in `--max-io` commands at
    /// the queue depth, starting again over a new connection what a failure interrupts.
    fn sweep(&mut self, write: bool) -> Result<(), String> {
        let chunk = u64::from((self.o.max_io / self.block_size).max(1));
        let gen = if write { self.new_gen() } else { GEN_UNKNOWN };
        let first = self.model.first_lba;
        let end = first + self.model.len();
        let mut pending: VecDeque<(u64, u32)> = (first..end)
            .step_by(chunk as usize)
            .map(|l| (l, chunk.min(end - l) as u32))
            .collect();
        loop {
            let r = (|| -> Result<bool, InitiatorError> {
                while self.ops.len() < self.o.qd {
                    let Some((lba, n)) = pending.pop_front() else {
                        break;
                    };
                    self.submit(write, lba, n, gen, false)?;
                }
                if self.ops.is_empty() {
                    return Ok(true);
                }
                let (itt, r) = self.ini()?.wait_any()?;
                self.complete(itt, r)?;
                Ok(false)
            })();
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    pending.extend(self.ops.values().map(|op| (op.lba, op.blocks)));
                    self.recover(&e)?;
                }
            }
        }
    }
}

/// One soak session from its first login to its final check.
fn soak_session(
    o: &Opts,
    id: usize,
    seed: u64,
    slice: (u64, u64),
    block_size: u32,
    c: &Counters,
) -> Result<(), String> {
    let mut s = SoakSession {
        o,
        id,
        c,
        ini: None,
        block_size,
        seed,
        rng: mix(seed ^ mix(id as u64 + 1)) | 1,
        model: Model::new(slice.0, slice.1 as usize),
        ops: HashMap::new(),
        again: VecDeque::new(),
        lost: HashMap::new(),
        mismatch_lines: 0,
        next_gen: GEN_UNKNOWN + 1,
        stage: Stage::Fill,
    };
    s.connect()?;
    s.sweep(true)?;
    s.run(Instant::now() + Duration::from_secs_f64(o.secs))?;
    s.stage = Stage::Verify;
    s.sweep(false)?;
    c.add(K::InDoubt, s.model.in_doubt() as u64);
    if let Some(mut ini) = s.ini.take() {
        let _ = ini.logout();
    }
    Ok(())
}

/// The soak: returns whether it was clean (no mismatch, no error).
pub fn soak(o: &Opts) -> Result<bool, String> {
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut ini = login_as(o, o.single(), SOAK_INITIATOR, soak_isid(0xff))?;
    let (blocks, block_size) = capacity(&mut ini, o.single().lun)?;
    let _ = ini.logout();
    if block_size < 16 || !block_size.is_multiple_of(8) || o.max_io < block_size {
        return Err(format!(
            "a {block_size}-byte block does not suit the soak (--max-io {})",
            o.max_io
        ));
    }
    let per = blocks / o.sessions as u64;
    if per == 0 {
        return Err(format!(
            "{blocks} blocks cannot be shared by {} sessions",
            o.sessions
        ));
    }
    emit(&format!(
        "soak: {} sessions of {per} blocks of {block_size} bytes, queue depth {}, {} s, seed {seed}\n",
        o.sessions, o.qd, o.secs
    ));
    let counters: Vec<Counters> = (0..o.sessions).map(|_| Counters::default()).collect();
    let start = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = counters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                sc.spawn(move || soak_session(o, i, seed, (i as u64 * per, per), block_size, c))
            })
            .collect();
        let mut next = start + Duration::from_secs_f64(o.progress.max(1.0));
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            if o.progress > 0.0 && Instant::now() >= next {
                next += Duration::from_secs_f64(o.progress);
                emit(&format!(
                    "soak: t {:.0} {}\n",
                    start.elapsed().as_secs_f64(),
                    counter_line(&counters)
                ));
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("the session's thread panicked".into()))
            })
            .collect()
    });
    let mut clean = true;
    for (i, r) in results.iter().enumerate() {
        if let Err(e) = r {
            eprintln!("soak: session {i} stopped: {e}");
            counters[i].add(K::Errors, 1);
            clean = false;
        }
    }
    let line = counter_line(&counters);
    let errors: u64 = counters.iter().map(|c| c.get(K::Errors)).sum();
    let mismatches: u64 = counters.iter().map(|c| c.get(K::Mismatches)).sum();
    emit(&format!(
        "soak secs {:.0} sessions {} {line}\n",
        start.elapsed().as_secs_f64(),
        o.sessions
    ));
    Ok(clean && errors == 0 && mismatches == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x5eed_0000_1234_abcd;
    const BS: u32 = 512;

    fn block(seed: u64, lba: u64, gen: u32) -> Vec<u8> {
        let mut b = vec![0u8; BS as usize];
        block_pattern(seed, lba, gen, &mut b);
        b
    }

    /// `n` blocks from `lba`, each of the generation `gen(lba)` gives.
    fn blocks(lba: u64, n: u64, gen: impl Fn(u64) -> u32) -> Vec<u8> {
        (lba..lba + n)
            .flat_map(|l| block(SEED, l, gen(l)))
            .collect()
    }

    fn words(b: &[u8]) -> Vec<u64> {
        b.chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn pattern_differs_in_every_word_by_place_generation_and_run() {
        let base = words(&block(SEED, 1000, 7));
        for other in [
            block(SEED, 1001, 7),
            block(SEED, 999, 7),
            block(SEED, 1000, 8),
            block(SEED, 1000, 6),
            block(SEED ^ 1, 1000, 7),
        ] {
            let o = words(&other);
            // The header words name what differs; every hashed word differs too, so a block
            // torn anywhere past its header is still caught.
            assert_ne!(base[..2], o[..2]);
            for (i, (a, b)) in base.iter().zip(&o).enumerate().skip(2) {
                assert_ne!(a, b, "word {i}");
            }
        }
        assert_eq!(base[0], 1000);
        assert_eq!(base[1] as u32, 7);
        assert_eq!(base[1] >> 32, SEED & 0xffff_ffff);
    }

    #[test]
    fn pattern_words_within_a_block_are_distinct() {
        let w = words(&block(SEED, 42, 3));
        let set: std::collections::HashSet<u64> = w[2..].iter().copied().collect();
        assert_eq!(set.len(), w.len() - 2);
    }

    #[test]
    fn unknown_blocks_accept_anything() {
        let mut m = Model::new(100, 10);
        assert!(m.check(SEED, 100, &vec![0xee; 10 * 512], BS).is_empty());
    }

    #[test]
    fn a_good_write_is_what_a_read_must_find() {
        let mut m = Model::new(100, 10);
        m.written(100, 10, 1);
        m.written(102, 3, 2);
        let gen = |l: u64| if (102..105).contains(&l) { 2 } else { 1 };
        assert!(m.check(SEED, 100, &blocks(100, 10, gen), BS).is_empty());
        // Stale data where generation 2 was written.
        let bad = m.check(SEED, 100, &blocks(100, 10, |_| 1), BS);
        let lbas: Vec<u64> = bad.iter().map(|b| b.lba).collect();
        assert_eq!(lbas, [102, 103, 104]);
        assert_eq!(bad[0].expected, [2]);
        assert_eq!((bad[0].got_lba, bad[0].got_gen), (102, 1));
        assert!(bad[0].got_this_run);
    }

    #[test]
    fn misplaced_data_is_caught_and_named() {
        let mut m = Model::new(0, 4);
        m.written(0, 4, 5);
        // Block 1's data read back at LBA 2.
        let mut data = blocks(0, 4, |_| 5);
        let one = block(SEED, 1, 5);
        data[1024..1536].copy_from_slice(&one);
        let bad = m.check(SEED, 0, &data, BS);
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].lba, bad[0].got_lba, bad[0].got_gen), (2, 1, 5));
    }

    #[test]
    fn another_runs_data_is_caught() {
        let mut m = Model::new(0, 1);
        m.written(0, 1, 5);
        let bad = m.check(SEED, 0, &block(SEED ^ 0xff, 0, 5), BS);
        assert_eq!(bad.len(), 1);
        assert!(!bad[0].got_this_run);
    }

    #[test]
    fn a_write_in_doubt_accepts_old_or_new() {
        for found in [1, 2] {
            let mut m = Model::new(0, 4);
            m.written(0, 4, 1);
            m.maybe_written(0, 4, 2);
            assert_eq!(m.in_doubt(), 4);
            assert!(m.check(SEED, 0, &blocks(0, 4, |_| found), BS).is_empty());
            // ...but nothing else.
            let bad = m.check(SEED, 0, &blocks(0, 4, |_| 3), BS);
            assert_eq!(bad.len(), 4);
        }
    }

    #[test]
    fn a_read_settles_a_block_in_doubt() {
        let mut m = Model::new(0, 2);
        m.written(0, 2, 1);
        m.maybe_written(0, 2, 2);
        // Block 0 still old, block 1 new: a torn write, block by block, is fine.
        assert!(m
            .check(SEED, 0, &blocks(0, 2, |l| if l == 0 { 1 } else { 2 }), BS)
            .is_empty());
        assert_eq!(m.in_doubt(), 0);
        // An aborted write that lands after it was found absent is a mismatch.
        let bad = m.check(SEED, 0, &blocks(0, 2, |_| 2), BS);
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].lba, bad[0].expected.clone()), (0, vec![1]));
    }

    #[test]
    fn writes_in_doubt_pile_up_until_a_good_write() {
        let mut m = Model::new(10, 1);
        m.written(10, 1, 1);
        m.maybe_written(10, 1, 5);
        m.maybe_written(10, 1, 7);
        assert_eq!(m.candidates(0), [7, 5, 1]);
        for g in [1, 5, 7] {
            let mut c = Model::new(10, 1);
            c.written(10, 1, 1);
            c.maybe_written(10, 1, 5);
            c.maybe_written(10, 1, 7);
            assert!(c.check(SEED, 10, &block(SEED, 10, g), BS).is_empty(), "{g}");
        }
        m.written(10, 1, 9);
        assert_eq!(m.candidates(0), [9]);
        assert_eq!(m.check(SEED, 10, &block(SEED, 10, 7), BS).len(), 1);
    }

    #[test]
    fn a_torn_block_matches_neither_generation() {
        let mut m = Model::new(0, 1);
        m.written(0, 1, 1);
        m.maybe_written(0, 1, 2);
        let mut torn = block(SEED, 0, 1);
        torn[256..].copy_from_slice(&block(SEED, 0, 2)[256..]);
        assert_eq!(m.check(SEED, 0, &torn, BS).len(), 1);
    }

    #[test]
    fn a_mismatch_counts_once_then_the_block_is_unknown() {
        let mut m = Model::new(0, 1);
        m.written(0, 1, 3);
        let junk = vec![0u8; 512];
        assert_eq!(m.check(SEED, 0, &junk, BS).len(), 1);
        assert!(m.check(SEED, 0, &junk, BS).is_empty());
        // A write in doubt over an unknown block leaves it unknown...
        m.maybe_written(0, 1, 4);
        assert!(m.check(SEED, 0, &junk, BS).is_empty());
        // ...and a good one makes it known again.
        m.written(0, 1, 5);
        assert_eq!(m.check(SEED, 0, &junk, BS).len(), 1);
    }

    #[test]
    fn a_mismatch_line_says_what_was_expected_and_found() {
        let mut m = Model::new(0, 1);
        m.written(0, 1, 1);
        m.maybe_written(0, 1, 2);
        let bad = m.check(SEED, 0, &block(SEED, 0, 9), BS);
        let line = bad[0].to_string();
        assert!(
            line.starts_with(
                "LBA 0: expected generation 2 or 1, found a block that claims LBA 0 generation 9;"
            ),
            "{line}"
        );
        assert!(line.contains(" got 0000000000000000090000"), "{line}");
    }

    #[test]
    fn every_counter_has_a_name() {
        assert_eq!(K::InDoubt as usize + 1, COUNTER_NAMES.len());
        let c = [Counters::default(), Counters::default()];
        c[0].add(K::Mismatches, 2);
        c[1].add(K::Mismatches, 3);
        c[1].add(K::Ops, 7);
        let line = counter_line(&c);
        assert!(line.starts_with("ops 7 reads 0 "), "{line}");
        assert!(line.contains(" mismatches 5 "), "{line}");
    }
}

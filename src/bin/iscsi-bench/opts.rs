//! The command line.

use iscsi_tgt::cli::{parse_cores, NetOptions};

use crate::net::Network;
use crate::target::TargetUrl;

/// The I/O pattern of the benchmark (`--rw`, fio's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rw {
    /// Reads in every hundred commands: 100 reads only, 0 writes only.
    pub read_pct: u64,
    pub random: bool,
}

impl Rw {
    /// fio's name of the pattern.
    pub fn name(self) -> &'static str {
        match (self.read_pct, self.random) {
            (100, false) => "read",
            (100, true) => "randread",
            (0, false) => "write",
            (0, true) => "randwrite",
            (_, false) => "rw",
            (_, true) => "randrw",
        }
    }
}

/// The largest `--bs` and `--max-io`: 16 MiB, as many bytes as one command of the
/// initiator carries comfortably.
const MAX_IO: u64 = 1 << 24;
/// The largest `--qd`: far beyond any target's command window.
const MAX_QD: u64 = 4096;
/// How many sessions one run may have: the ISID has a byte for the session's index.
pub const MAX_SESSIONS: usize = 256;
/// The default target when only `--target` is given.
const DEFAULT_PORTAL: &str = "127.0.0.1:3260";
/// The default `--timeout`: as long as the initiator's own socket timeout.
const DEFAULT_TIMEOUT_SECS: f64 = 30.0;
/// The shortest `--timeout` but none: a millisecond (the transport timeouts cannot be zero).
const MIN_TIMEOUT_SECS: f64 = 0.001;

pub struct Opts {
    /// The LUNs the sessions go to: `--url`s and positional URLs, then `--portal/--target/
    /// --lun`.
    pub targets: Vec<TargetUrl>,
    pub bs: u32,
    pub qd: usize,
    pub secs: f64,
    /// Seconds of I/O before the measurement starts (the benchmark only).
    pub ramp: f64,
    /// Seconds a command may wait for its answer before the run stops (0: without end).
    pub timeout: f64,
    pub rw: Rw,
    pub json: bool,
    /// Cores the benchmark's sessions are pinned to, round-robin (empty: not pinned).
    pub cores: Vec<usize>,
    pub digests: bool,
    /// `--blocksize`: the LUN's block size the caller expects (checked against READ
    /// CAPACITY's).
    pub block_size: Option<u32>,
    pub verify: bool,
    pub expect: Option<String>,
    pub soak: bool,
    /// Sessions per target: 1 for the benchmark, 4 for the soak unless given.
    pub sessions: usize,
    pub max_io: u32,
    /// The soak's share of READs.
    pub read_pct: u64,
    /// Mean seconds between ABORT TASKs, per session (0: none).
    pub abort_every: f64,
    /// Mean seconds between connection drops, per session (0: none).
    pub drop_every: f64,
    /// Seconds between a drop and the new login.
    pub relogin_delay: f64,
    pub progress: f64,
    pub seed: Option<u64>,
    pub net: NetOptions,
    /// What `net` names, opened once the arguments are parsed.
    pub network: Network,
}

impl Opts {
    /// The one target of `--verify` and `--soak` (parse checks there is exactly one).
    pub fn single(&self) -> &TargetUrl {
        &self.targets[0]
    }

    /// `--timeout` (`None`: 0, no timeout).
    pub fn timeout(&self) -> Option<std::time::Duration> {
        (self.timeout > 0.0).then(|| std::time::Duration::from_secs_f64(self.timeout))
    }
}

pub const USAGE: &str = "\
usage: iscsi-bench [iscsi://HOST[:PORT]/IQN/LUN]... [--url URL]... [options]
       iscsi-bench --portal ADDR:PORT --target IQN [--lun N] [options]

Targets (at least one):
  iscsi://HOST[:PORT]/IQN/LUN   a LUN (libiscsi's URL form; port 3260 unless given; IPv6
                                addresses in brackets); repeat for more, or --url URL
  --portal ADDR:PORT --target IQN [--lun N]
                                the same as one URL [127.0.0.1:3260, LUN 0]

Benchmark (the default mode):
  --rw read|write|randread|randwrite|rw|randrw   the I/O pattern [read]
  --read-pct P       reads in every hundred commands of rw and randrw [50]
  --write, --random  aliases: --write alone is --rw write, --random makes it random
  --bs BYTES         bytes per command, a multiple of the LUN's block size; k, m, g
                     suffixes (1024-based): 4k, 128k, 1m [128k]
  --qd N             commands in flight per session [16]
  --sessions N       sessions (each a connection and a thread) per target [1]
  --cores LIST       pin the sessions' threads round-robin to these cores: 0,2-3 or 0x6
  --secs S           seconds measured [10]
  --ramp S           seconds of I/O first, not measured [0]
  --timeout S        seconds a command may wait for its answer [30]; when one waits longer
                     the run stops with an error that names it (exit status 1); 0: no limit.
                     At login, in --verify and in --soak: how long a read or write of the
                     connection may wait
  --json             one JSON object on stdout at the end instead of the summary
  --blocksize N      fail unless the LUN's block size is N
  --digests          CRC32C header and data digests
  While stderr is a terminal a progress line shows each second's IOPS, MB/s and errors.
  Latency is from sending a command to its final response, in an HDR histogram per session
  (3 significant digits), merged at the end: min, mean, max, p50, p90, p99, p99.9, p99.99,
  reads and writes apart. MB/s is 10^6 bytes per second. IOPS and latency count commands
  answered GOOD; every other end is an error: CHECK CONDITION counted by sense key, other
  statuses by name, and a connection that fails (its session ends, the others go on) as a
  transport error. The last line of the summary is `iops N mbps M`. Exit status: 0 when no
  error was counted, 1 when any was (or the run could not start), 2 for a bad command line.

--verify [--expect FILE]    data integrity instead: reads the LUN and compares it with FILE,
                            then writes a pattern over the whole LUN and reads it back, at
                            --qd commands of --bs bytes; non-zero exit at the first difference
--soak                      data integrity under disruption: --sessions sessions [4], each on
                            its own slice, random READs and WRITEs of up to --max-io bytes
                            [256k] (--read-pct [50] reads) for --secs, with ABORT TASK every
                            --abort-every S [1] and dropped connections every --drop-every S
                            [8] per session (0: none), a new login after --relogin-delay S
                            [0], a progress line every --progress S [60], --seed N
  (--verify and --soak take one target)

Network:
  --net kernel|af_packet:IF|tap:NAME|dpdk:DEVARGS --ip ADDR/PREFIX [--gateway ADDR]
        [--stack KEY=VALUE]... [--eal ARGS]
                     connect over the userspace TCP stack's client on that interface
  -h, --help         this text";

/// What the command line asks for.
pub enum Parsed {
    Run(Box<Opts>),
    Help,
}

/// A byte count with an optional 1024-based suffix: `4096`, `4k`, `128K`, `1m`, `1MiB`, `1g`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (a number of bytes, or 4k, 128k, 1m, 1g)");
    let lower = s.trim().to_ascii_lowercase();
    let (digits, unit) = lower.split_at(
        lower
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(lower.len()),
    );
    let shift = match unit {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

fn parse_rw(v: &str) -> Result<Rw, String> {
    let (read_pct, random) = match v {
        "read" => (100, false),
        "randread" => (100, true),
        "write" => (0, false),
        "randwrite" => (0, true),
        // The mix comes from --read-pct.
        "rw" | "readwrite" => (50, false),
        "randrw" => (50, true),
        _ => {
            return Err(format!(
                "--rw must be read, write, randread, randwrite, rw or randrw, not {v:?}"
            ))
        }
    };
    Ok(Rw { read_pct, random })
}

pub fn parse() -> Result<Parsed, String> {
    parse_args(std::env::args().skip(1))
}

pub fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut o = Opts {
        targets: Vec::new(),
        bs: 131_072,
        qd: 16,
        secs: 10.0,
        ramp: 0.0,
        timeout: DEFAULT_TIMEOUT_SECS,
        rw: Rw {
            read_pct: 100,
            random: false,
        },
        json: false,
        cores: Vec::new(),
        digests: false,
        block_size: None,
        verify: false,
        expect: None,
        soak: false,
        sessions: 0,
        max_io: 262_144,
        read_pct: 50,
        abort_every: 1.0,
        drop_every: 8.0,
        relogin_delay: 0.0,
        progress: 60.0,
        seed: None,
        net: NetOptions::default(),
        network: Network::Kernel,
    };
    let mut portal: Option<String> = None;
    let mut target: Option<String> = None;
    let mut lun: Option<u64> = None;
    let mut rw: Option<Rw> = None;
    let mut write = false;
    let mut random = false;
    let mut read_pct: Option<u64> = None;
    let mut args = argv.into_iter();
    while let Some(a) = args.next() {
        if let Some(r) = o.net.parse_flag(&a, |name| {
            args.next().ok_or_else(|| format!("{name} needs a value"))
        }) {
            r?;
            continue;
        }
        if !a.starts_with('-') {
            o.targets.push(TargetUrl::parse(&a)?);
            continue;
        }
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{a}: {v:?} is not a number"))
        };
        let size = |v: String| parse_size(&v).map_err(|e| format!("{a}: {e}"));
        let secs = |v: String| match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(format!("{a}: {v:?} is not a number of seconds")),
        };
        match a.as_str() {
            "--url" => o.targets.push(TargetUrl::parse(&val()?)?),
            "--portal" => portal = Some(val()?),
            "--target" => target = Some(val()?),
            "--lun" => lun = Some(num(val()?)?),
            "--bs" => {
                let v = size(val()?)?;
                if v == 0 || v > MAX_IO {
                    return Err(format!("--bs must be from 1 to {MAX_IO} bytes, not {v}"));
                }
                o.bs = v as u32;
            }
            "--qd" => o.qd = num(val()?)?.clamp(1, MAX_QD) as usize,
            "--secs" => o.secs = secs(val()?)?,
            "--ramp" => o.ramp = secs(val()?)?,
            "--timeout" => {
                o.timeout = secs(val()?)?;
                if o.timeout > 0.0 && o.timeout < MIN_TIMEOUT_SECS {
                    return Err(format!(
                        "--timeout must be 0 (none) or at least {MIN_TIMEOUT_SECS} s, not {}",
                        o.timeout
                    ));
                }
            }
            "--rw" => rw = Some(parse_rw(&val()?)?),
            "--json" => o.json = true,
            "--cores" => o.cores = parse_cores(&val()?).map_err(|e| format!("--cores: {e}"))?,
            "--blocksize" => {
                let v = num(val()?)?;
                o.block_size = Some(
                    u32::try_from(v)
                        .ok()
                        .filter(|&b| b > 0)
                        .ok_or_else(|| format!("--blocksize: {v} is not a block size"))?,
                );
            }
            "--write" => write = true,
            "--random" => random = true,
            "--digests" => o.digests = true,
            "--verify" => o.verify = true,
            "--expect" => o.expect = Some(val()?),
            "--soak" => o.soak = true,
            "--sessions" => o.sessions = num(val()?)?.clamp(1, 255) as usize,
            "--max-io" => o.max_io = size(val()?)?.min(MAX_IO) as u32,
            "--read-pct" => read_pct = Some(num(val()?)?.min(100)),
            "--abort-every" => o.abort_every = secs(val()?)?,
            "--drop-every" => o.drop_every = secs(val()?)?,
            "--relogin-delay" => o.relogin_delay = secs(val()?)?,
            "--progress" => o.progress = secs(val()?)?,
            "--seed" => o.seed = Some(num(val()?)?),
            "-h" | "--help" => return Ok(Parsed::Help),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    match target {
        Some(iqn) => o.targets.push(TargetUrl {
            portal: portal.unwrap_or_else(|| DEFAULT_PORTAL.into()),
            iqn,
            lun: lun.unwrap_or(0),
        }),
        None if portal.is_some() || lun.is_some() => {
            return Err("--portal and --lun go with --target IQN".into())
        }
        None => {}
    }
    if o.targets.is_empty() {
        return Err("a target is required: iscsi://HOST[:PORT]/IQN/LUN or --target IQN".into());
    }
    if (o.verify || o.soak) && o.targets.len() > 1 {
        return Err(format!(
            "--{} takes one target, not {}",
            if o.soak { "soak" } else { "verify" },
            o.targets.len()
        ));
    }
    // --write and --random are the old spellings of --rw.
    let mut pattern = match (rw, write) {
        (None, w) => Rw {
            read_pct: if w { 0 } else { 100 },
            random: false,
        },
        (Some(r), false) => r,
        (Some(r), true) if r.read_pct == 0 => r,
        (Some(r), true) => {
            return Err(format!(
                "--write and --rw {} disagree: --rw randwrite or --rw write",
                r.name()
            ))
        }
    };
    pattern.random |= random;
    if pattern.read_pct != 0 && pattern.read_pct != 100 {
        pattern.read_pct = read_pct.unwrap_or(50);
    }
    o.rw = pattern;
    if let Some(p) = read_pct {
        o.read_pct = p;
    }
    if o.sessions == 0 {
        o.sessions = if o.soak { 4 } else { 1 };
    }
    if !o.soak && !o.verify && o.targets.len() * o.sessions > MAX_SESSIONS {
        return Err(format!(
            "{} targets of {} sessions: at most {MAX_SESSIONS} sessions in all",
            o.targets.len(),
            o.sessions
        ));
    }
    if let Some(b) = o.block_size {
        if !o.bs.is_multiple_of(b) {
            return Err("--bs must be a multiple of --blocksize".into());
        }
    }
    o.net.check()?;
    Ok(Parsed::Run(Box::new(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Opts, String> {
        match parse_args(args.split_whitespace().map(str::to_string))? {
            Parsed::Run(o) => Ok(*o),
            Parsed::Help => Err("help".into()),
        }
    }

    const URL: &str = "iscsi://127.0.0.1:3260/iqn.x:t/0";

    #[test]
    fn sizes_take_binary_suffixes() {
        for (s, v) in [
            ("4096", 4096),
            ("4k", 4096),
            ("4K", 4096),
            ("4kb", 4096),
            ("4KiB", 4096),
            ("128k", 131_072),
            ("1m", 1 << 20),
            ("1MiB", 1 << 20),
            ("2g", 2 << 30),
            ("0", 0),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for s in [
            "",
            "k",
            "4x",
            "4 k",
            "-1",
            "4ib",
            "1.5m",
            "99999999999999999999g",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    #[test]
    fn the_pattern_from_rw_or_its_aliases() {
        let rw = |a: &str| parse(&format!("{URL} {a}")).map(|o| (o.rw.name(), o.rw.read_pct));
        assert_eq!(rw(""), Ok(("read", 100)));
        assert_eq!(rw("--write"), Ok(("write", 0)));
        assert_eq!(rw("--random"), Ok(("randread", 100)));
        assert_eq!(rw("--write --random"), Ok(("randwrite", 0)));
        assert_eq!(rw("--rw randread"), Ok(("randread", 100)));
        assert_eq!(rw("--rw randwrite --write"), Ok(("randwrite", 0)));
        assert_eq!(rw("--rw write --random"), Ok(("randwrite", 0)));
        assert_eq!(rw("--rw rw"), Ok(("rw", 50)));
        assert_eq!(rw("--rw randrw --read-pct 70"), Ok(("randrw", 70)));
        // --read-pct shapes only the mixes.
        assert_eq!(rw("--rw read --read-pct 70"), Ok(("read", 100)));
        assert!(rw("--rw read --write").err().unwrap().contains("disagree"));
        assert!(rw("--rw sideways").err().unwrap().contains("randrw"));
    }

    #[test]
    fn targets_from_urls_and_the_old_flags() {
        let o = parse(&format!(
            "{URL} --url iscsi://h:3261/iqn.x:u/2 --target iqn.x:v --lun 3 --sessions 2"
        ))
        .unwrap();
        let t: Vec<String> = o.targets.iter().map(ToString::to_string).collect();
        assert_eq!(
            t,
            [
                URL,
                "iscsi://h:3261/iqn.x:u/2",
                "iscsi://127.0.0.1:3260/iqn.x:v/3"
            ]
        );
        assert_eq!(o.sessions, 2);
        let o = parse("--portal 10.0.0.2:3262 --target iqn.x:t").unwrap();
        assert_eq!(o.targets[0].to_string(), "iscsi://10.0.0.2:3262/iqn.x:t/0");
        assert!(parse("--bs 4k")
            .err()
            .unwrap()
            .contains("target is required"));
        assert!(parse(&format!("{URL} --lun 1"))
            .err()
            .unwrap()
            .contains("--target"));
        assert!(parse(&format!("{URL} {URL} --verify"))
            .err()
            .unwrap()
            .contains("one target"));
        assert!(parse(&format!("{URL} --sessions 200 --url {URL}"))
            .err()
            .unwrap()
            .contains("at most 256"));
    }

    #[test]
    fn options_and_their_defaults() {
        let o = parse(URL).unwrap();
        assert_eq!(
            (o.bs, o.qd, o.secs, o.ramp, o.sessions),
            (131_072, 16, 10.0, 0.0, 1)
        );
        assert_eq!(o.timeout(), Some(std::time::Duration::from_secs(30)));
        assert_eq!(
            parse(&format!("{URL} --timeout 0")).unwrap().timeout(),
            None
        );
        assert_eq!(
            parse(&format!("{URL} --timeout 2.5")).unwrap().timeout(),
            Some(std::time::Duration::from_millis(2500))
        );
        assert!(o.cores.is_empty() && !o.json && o.block_size.is_none());
        let o = parse(&format!(
            "{URL} --bs 4k --qd 32 --secs 2.5 --ramp 1 --json --cores 0,2-3 --blocksize 512"
        ))
        .unwrap();
        assert_eq!((o.bs, o.qd, o.secs, o.ramp), (4096, 32, 2.5, 1.0));
        assert_eq!(o.cores, [0, 2, 3]);
        assert!(o.json);
        assert_eq!(o.block_size, Some(512));
        // The soak keeps its own defaults.
        let o = parse(&format!("{URL} --soak --max-io 64k")).unwrap();
        assert_eq!((o.sessions, o.max_io, o.read_pct), (4, 65536, 50));
        for (args, says) in [
            ("--bs 0", "--bs"),
            ("--bs 32m", "--bs"),
            ("--bs 1000 --blocksize 512", "multiple"),
            ("--secs -1", "seconds"),
            ("--ramp x", "seconds"),
            ("--timeout -2", "seconds"),
            ("--timeout 0.00001", "at least"),
            ("--cores 3-1", "--cores"),
            ("--frobnicate", "unknown"),
            ("--qd", "needs a value"),
        ] {
            let e = parse(&format!("{URL} {args}")).err().unwrap();
            assert!(e.contains(says), "{args}: {e}");
        }
        assert!(matches!(
            parse_args(["--help".to_string()]),
            Ok(Parsed::Help)
        ));
    }
}

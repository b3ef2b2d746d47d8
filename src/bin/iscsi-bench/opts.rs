//! The command line.

use iscsi_tgt::cli::NetOptions;

use crate::net::Network;

pub struct Opts {
    pub portal: String,
    pub target: String,
    pub lun: u64,
    pub bs: u32,
    pub qd: usize,
    pub secs: f64,
    pub write: bool,
    pub random: bool,
    pub digests: bool,
    pub block_size: u32,
    pub verify: bool,
    pub expect: Option<String>,
    pub soak: bool,
    pub sessions: usize,
    pub max_io: u32,
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

const USAGE: &str = "usage: iscsi-bench --portal ADDR:PORT --target IQN [--lun N] [--bs BYTES] [--qd N] [--secs S] [--write] [--random] [--digests] [--blocksize 512] [--net kernel|af_packet:IF|tap:NAME|dpdk:DEVARGS --ip ADDR/PREFIX [--gateway ADDR] [--stack KEY=VALUE]... [--eal ARGS]] [--verify [--expect FILE]] [--soak [--sessions N] [--max-io BYTES] [--read-pct P] [--abort-every S] [--drop-every S] [--relogin-delay S] [--progress S] [--seed N]]";

pub fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        portal: "127.0.0.1:3260".into(),
        target: String::new(),
        lun: 0,
        bs: 131_072,
        qd: 16,
        secs: 10.0,
        write: false,
        random: false,
        digests: false,
        block_size: 512,
        verify: false,
        expect: None,
        soak: false,
        sessions: 4,
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
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(r) = o.net.parse_flag(&a, |name| {
            args.next().ok_or_else(|| format!("{name} needs a value"))
        }) {
            r?;
            continue;
        }
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{a}: {v:?} is not a number"))
        };
        let secs = |v: String| match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(format!("{a}: {v:?} is not a number of seconds")),
        };
        match a.as_str() {
            "--portal" => o.portal = val()?,
            "--target" => o.target = val()?,
            "--lun" => o.lun = num(val()?)?,
            "--bs" => o.bs = num(val()?)? as u32,
            "--qd" => o.qd = num(val()?)?.max(1) as usize,
            "--secs" => o.secs = secs(val()?)?,
            "--blocksize" => o.block_size = num(val()?)? as u32,
            "--write" => o.write = true,
            "--random" => o.random = true,
            "--digests" => o.digests = true,
            "--verify" => o.verify = true,
            "--expect" => o.expect = Some(val()?),
            "--soak" => o.soak = true,
            "--sessions" => o.sessions = num(val()?)?.clamp(1, 255) as usize,
            "--max-io" => o.max_io = num(val()?)?.min(1 << 24) as u32,
            "--read-pct" => o.read_pct = num(val()?)?.min(100),
            "--abort-every" => o.abort_every = secs(val()?)?,
            "--drop-every" => o.drop_every = secs(val()?)?,
            "--relogin-delay" => o.relogin_delay = secs(val()?)?,
            "--progress" => o.progress = secs(val()?)?,
            "--seed" => o.seed = Some(num(val()?)?),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.target.is_empty() {
        return Err("--target is required".into());
    }
    if o.bs == 0 || o.block_size == 0 || !o.bs.is_multiple_of(o.block_size) {
        return Err("--bs must be a non-zero multiple of --blocksize".into());
    }
    o.net.check()?;
    Ok(o)
}

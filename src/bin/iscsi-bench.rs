//! A small load generator over the crate's own initiator, for what the libiscsi tools cannot
//! do (data digests, CHAP with SHA-2): reads or writes of one size at a fixed queue depth for a
//! fixed time, printing `iops N mbps M` at the end.
//!
//! ```text
//! iscsi-bench --portal 127.0.0.1:3260 --target IQN [--lun 0] [--bs 131072] [--qd 16]
//!             [--secs 10] [--write] [--random] [--digests] [--blocksize 512]
//! ```
use std::process::ExitCode;
use std::time::{Duration, Instant};

use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions};

struct Opts {
    portal: String,
    target: String,
    lun: u64,
    bs: u32,
    qd: usize,
    secs: f64,
    write: bool,
    random: bool,
    digests: bool,
    block_size: u32,
}

fn parse() -> Result<Opts, String> {
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
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{a}: {v:?} is not a number"))
        };
        match a.as_str() {
            "--portal" => o.portal = val()?,
            "--target" => o.target = val()?,
            "--lun" => o.lun = num(val()?)?,
            "--bs" => o.bs = num(val()?)? as u32,
            "--qd" => o.qd = num(val()?)?.max(1) as usize,
            "--secs" => o.secs = num(val()?)? as f64,
            "--blocksize" => o.block_size = num(val()?)? as u32,
            "--write" => o.write = true,
            "--random" => o.random = true,
            "--digests" => o.digests = true,
            "-h" | "--help" => {
                return Err("usage: iscsi-bench --portal ADDR:PORT --target IQN [--lun N] [--bs BYTES] [--qd N] [--secs S] [--write] [--random] [--digests] [--blocksize 512]".into())
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.target.is_empty() {
        return Err("--target is required".into());
    }
    if o.bs == 0 || o.block_size == 0 || !o.bs.is_multiple_of(o.block_size) {
        return Err("--bs must be a non-zero multiple of --blocksize".into());
    }
    Ok(o)
}

fn run(o: &Opts) -> Result<(u64, f64), String> {
    let mut ini = Initiator::connect(o.portal.as_str()).map_err(|e| e.to_string())?;
    let mut keys = vec![("MaxRecvDataSegmentLength".to_string(), "262144".to_string())];
    let d = if o.digests { "CRC32C" } else { "None" };
    keys.push(("HeaderDigest".into(), d.into()));
    keys.push(("DataDigest".into(), d.into()));
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:bench".into(),
        target_name: Some(o.target.clone()),
        keys,
        ..Default::default()
    })
    .map_err(|e| format!("login: {e}"))?;
    // Clear the new nexus's unit attention; learn the capacity.
    let cap = loop {
        let r = ini
            .scsi(o.lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 8, true)
            .map_err(|e| e.to_string())?;
        if r.is_good() {
            break u64::from(u32::from_be_bytes([
                r.data[0], r.data[1], r.data[2], r.data[3],
            ])) + 1;
        }
        if r.sense_key() != Some(6) {
            return Err(format!("READ CAPACITY failed: {r:?}"));
        }
    };
    let blocks = o.bs / o.block_size;
    let span = cap.saturating_sub(u64::from(blocks)).max(1);
    let data = vec![0xa5u8; o.bs as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_lba = 0u64;
    let mut lba = || {
        if o.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % span) / u64::from(blocks) * u64::from(blocks)
        } else {
            let l = next_lba;
            next_lba = (next_lba + u64::from(blocks)) % span;
            l
        }
    };
    let submit = |ini: &mut Initiator, l: u64| -> Result<(), String> {
        let c = if o.write {
            cdb::write16(l, blocks)
        } else {
            cdb::read16(l, blocks)
        };
        ini.submit(o.lun, &c, o.write.then_some(&data[..]), o.bs, !o.write)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for _ in 0..o.qd {
        submit(&mut ini, lba())?;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(o.secs);
    let mut done = 0u64;
    while ini.outstanding() > 0 {
        let (_, r) = ini.wait_any().map_err(|e| e.to_string())?;
        if !r.is_good() {
            return Err(format!("I/O failed: {r:?}"));
        }
        done += 1;
        if Instant::now() < end {
            submit(&mut ini, lba())?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = ini.logout();
    Ok((done, secs))
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok((n, secs)) => {
            let iops = n as f64 / secs;
            println!("iops {:.0} mbps {:.0}", iops, iops * f64::from(o.bs) / 1e6);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

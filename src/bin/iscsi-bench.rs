//! A small load generator over the crate's own initiator, for what the libiscsi tools cannot
//! do (data digests, CHAP with SHA-2): reads or writes of one size at a fixed queue depth for a
//! fixed time, printing `iops N mbps M` at the end.
//!
//! With `--verify` it checks data integrity instead: it reads the whole LUN and compares it
//! with `--expect FILE` (what another initiator wrote), if given, then writes the whole LUN
//! with a pattern unique to each byte offset and this run, reads it back and compares, all
//! at the queue depth given. It exits non-zero at the first difference, naming its LBA.
//!
//! ```text
//! iscsi-bench --portal 127.0.0.1:3260 --target IQN [--lun 0] [--bs 131072] [--qd 16]
//!             [--secs 10] [--write] [--random] [--digests] [--blocksize 512]
//!             [--verify [--expect FILE]]
//! ```
use std::collections::HashMap;
use std::io::Read;
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
    verify: bool,
    expect: Option<String>,
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
        verify: false,
        expect: None,
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
            "--verify" => o.verify = true,
            "--expect" => o.expect = Some(val()?),
            "-h" | "--help" => {
                return Err("usage: iscsi-bench --portal ADDR:PORT --target IQN [--lun N] [--bs BYTES] [--qd N] [--secs S] [--write] [--random] [--digests] [--blocksize 512] [--verify [--expect FILE]]".into())
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

fn login(o: &Opts) -> Result<Initiator, String> {
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
    Ok(ini)
}

/// READ CAPACITY (10), clearing the new nexus's unit attentions: (blocks, block size).
fn capacity(ini: &mut Initiator, lun: u64) -> Result<(u64, u32), String> {
    for _ in 0..8 {
        let r = ini
            .scsi(lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 8, true)
            .map_err(|e| e.to_string())?;
        if r.is_good() && r.data.len() >= 8 {
            let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            return Ok((u64::from(be(&r.data[0..4])) + 1, be(&r.data[4..8])));
        }
        if r.sense_key() != Some(6) {
            return Err(format!("READ CAPACITY failed: {r:?}"));
        }
    }
    Err("READ CAPACITY kept reporting unit attentions".into())
}

fn run(o: &Opts) -> Result<(u64, f64), String> {
    let mut ini = login(o)?;
    let (cap, _) = capacity(&mut ini, o.lun)?;
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

/// The verify pattern: one word per 8 bytes, a mix of the run's seed and the byte offset, so
/// that a block written to the wrong place, a stale block and a torn one all differ.
fn pattern(seed: u64, offset: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let mut z = seed ^ (offset + 8 * i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        w.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// Fills a write's buffer with the data for a byte offset.
type Fill<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> Result<(), String>;
/// Checks a read's data at a byte offset.
type Check<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), String>;

/// Moves the whole LUN in `bs` commands with `qd` of them in flight: writes `fill`'s data, or
/// reads and hands each extent to `check`.
fn sweep(
    ini: &mut Initiator,
    o: &Opts,
    size: u64,
    block_size: u32,
    mut fill: Option<Fill<'_>>,
    check: Check<'_>,
) -> Result<(), String> {
    let write = fill.is_some();
    let mut next = 0u64;
    let mut inflight: HashMap<u32, u64> = HashMap::new();
    let mut buf = vec![0u8; o.bs as usize];
    loop {
        while inflight.len() < o.qd && next < size {
            let len = (size - next).min(u64::from(o.bs)) as usize;
            let lba = next / u64::from(block_size);
            let blocks = (len / block_size as usize) as u32;
            let itt = if let Some(f) = fill.as_mut() {
                f(next, &mut buf[..len])?;
                ini.submit(
                    o.lun,
                    &cdb::write16(lba, blocks),
                    Some(&buf[..len]),
                    len as u32,
                    false,
                )
            } else {
                ini.submit(o.lun, &cdb::read16(lba, blocks), None, len as u32, true)
            }
            .map_err(|e| e.to_string())?;
            inflight.insert(itt, next);
            next += len as u64;
        }
        if inflight.is_empty() {
            return Ok(());
        }
        let (itt, r) = ini.wait_any().map_err(|e| e.to_string())?;
        let at = inflight.remove(&itt).ok_or("a completion for no command")?;
        if !r.is_good() {
            let what = if write { "WRITE" } else { "READ" };
            return Err(format!(
                "{what} at LBA {} failed: {r:?}",
                at / u64::from(block_size)
            ));
        }
        if !write {
            check(at, &r.data)?;
        }
    }
}

/// The first differing byte of `got` against `want` as an error naming its LBA.
fn compare(at: u64, got: &[u8], want: &[u8], block_size: u32, what: &str) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: short read at byte {at}: {} of {} bytes",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => {
            let off = at + i as u64;
            Err(format!(
                "{what}: data differs at LBA {} (byte {off})",
                off / u64::from(block_size)
            ))
        }
    }
}

fn verify(o: &Opts) -> Result<u64, String> {
    let mut ini = login(o)?;
    let (blocks, block_size) = capacity(&mut ini, o.lun)?;
    if !o.bs.is_multiple_of(block_size) {
        return Err(format!(
            "--bs {} is not a multiple of the LUN's {block_size}-byte blocks",
            o.bs
        ));
    }
    let size = blocks * u64::from(block_size);
    if let Some(path) = &o.expect {
        let mut f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
        let mut want = vec![0u8; o.bs as usize];
        sweep(&mut ini, o, size, block_size, None, &mut |at, got| {
            // Completions arrive in any order: read the file at the extent's offset.
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
            f.read_exact(&mut want[..got.len()])
                .map_err(|e| format!("{path}: {e}"))?;
            compare(at, got, &want[..got.len()], block_size, path)
        })?;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut gen = |at: u64, out: &mut [u8]| {
        pattern(seed, at, out);
        Ok(())
    };
    sweep(
        &mut ini,
        o,
        size,
        block_size,
        Some(&mut gen),
        &mut |_, _| Ok(()),
    )?;
    let mut want = vec![0u8; o.bs as usize];
    sweep(&mut ini, o, size, block_size, None, &mut |at, got| {
        pattern(seed, at, &mut want[..got.len()]);
        compare(at, got, &want[..got.len()], block_size, "pattern")
    })?;
    let _ = ini.logout();
    Ok(size)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if o.verify {
        return match verify(&o) {
            Ok(size) => {
                println!(
                    "verified {size} bytes{} and a written pattern at queue depth {}",
                    if o.expect.is_some() {
                        " against the file"
                    } else {
                        ""
                    },
                    o.qd
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("iscsi-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
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

//! `--verify`: the whole LUN read (against a file), written with a pattern and read back.

use std::collections::HashMap;
use std::io::Read;

use iscsi_tgt::initiator::cdb;

use crate::net::Ini;
use crate::opts::Opts;
use crate::target::{capacity, login};

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
    ini: &mut Ini,
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
                    o.single().lun,
                    &cdb::write16(lba, blocks),
                    Some(&buf[..len]),
                    len as u32,
                    false,
                )
            } else {
                ini.submit(
                    o.single().lun,
                    &cdb::read16(lba, blocks),
                    None,
                    len as u32,
                    true,
                )
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

pub fn verify(o: &Opts) -> Result<u64, String> {
    let mut ini = login(o, o.single(), 0)?;
    let (blocks, block_size) = capacity(&mut ini, o.single().lun)?;
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

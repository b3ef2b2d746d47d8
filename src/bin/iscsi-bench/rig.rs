//! The benchmark: reads or writes of one size at a fixed queue depth for a fixed time.

use std::time::{Duration, Instant};

use iscsi_tgt::initiator::cdb;

use crate::net::Ini;
use crate::opts::Opts;
use crate::target::{capacity, login};

pub fn run(o: &Opts) -> Result<(u64, f64), String> {
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
    let submit = |ini: &mut Ini, l: u64| -> Result<(), String> {
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

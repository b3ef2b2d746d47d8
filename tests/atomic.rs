//! COMPARE AND WRITE as the atomic test-and-set that cluster file systems build locks on,
//! against the real daemon with two reactors: two sessions (one per reactor) increment a
//! counter held in one block, each by reading it and swapping in the next value with
//! COMPARE AND WRITE, retrying on MISCOMPARE. If two swaps of the same old value could both
//! succeed, the counter would end below the number of successful swaps.
mod common;

use std::time::Duration;

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions};

const BS: usize = 512;
const LBA: u64 = 40;
const PER_SESSION: u64 = 300;
const MISCOMPARE: u8 = 0x0e;

fn login(t: &Target, isid_last: u8) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    let mut o = LoginOptions {
        initiator_name: format!("iqn.2026-11.org.iscsi-tgt:atomic-{isid_last}"),
        target_name: Some(IQN.into()),
        ..Default::default()
    };
    o.isid[5] = isid_last;
    ini.login(&o).unwrap();
    ini.set_timeout(Some(Duration::from_secs(20))).unwrap();
    for _ in 0..4 {
        if ini.test_unit_ready(0).unwrap().is_good() {
            break;
        }
    }
    ini
}

fn block_of(v: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    b
}

fn caw_cdb(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

/// Increments the counter `n` times; returns how many swaps missed (MISCOMPARE).
fn increment(ini: &mut Initiator, n: u64) -> u64 {
    let mut done = 0;
    let mut missed = 0;
    let mut seen = u64::from_be_bytes(
        ini.read16(0, LBA, 1, BS as u32).unwrap()[..8]
            .try_into()
            .unwrap(),
    );
    while done < n {
        let mut out = block_of(seen);
        out.extend(block_of(seen + 1));
        let r = ini
            .scsi(0, &caw_cdb(LBA, 1), Some(&out), out.len() as u32, false)
            .unwrap();
        if r.is_good() {
            done += 1;
            seen += 1;
            continue;
        }
        assert_eq!(r.sense_key(), Some(MISCOMPARE), "{r:?}");
        assert_eq!(r.asc_ascq(), Some((0x1d, 0x00)));
        missed += 1;
        let now = ini.read16(0, LBA, 1, BS as u32).unwrap();
        seen = u64::from_be_bytes(now[..8].try_into().unwrap());
    }
    missed
}

#[test]
fn compare_and_write_is_atomic_across_reactors() {
    let t = Target::start(&["--cores", "0,1"]);
    t.configure_default(16);
    let mut setup = login(&t, 1);
    setup.write16(0, LBA, &block_of(0), BS as u32).unwrap();
    let addr_sessions: Vec<Initiator> = (2..4).map(|i| login(&t, i)).collect();
    let handles: Vec<_> = addr_sessions
        .into_iter()
        .map(|mut ini| std::thread::spawn(move || increment(&mut ini, PER_SESSION)))
        .collect();
    let missed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let end = setup.read16(0, LBA, 1, BS as u32).unwrap();
    assert_eq!(end, block_of(2 * PER_SESSION), "lost or doubled increments");
    eprintln!("{} swaps, {missed} missed and retried", 2 * PER_SESSION);
}

#[test]
fn a_miscompare_reports_where_and_writes_nothing() {
    let t = Target::start(&[]);
    t.configure_default(16);
    let mut ini = login(&t, 1);
    let mut old = block_of(7);
    old.extend(block_of(7));
    ini.write16(0, 100, &old, BS as u32).unwrap();
    // The verify half differs from the medium first at byte 700 (in the second block).
    let mut out = old.clone();
    out[700] ^= 0xff;
    out.extend(vec![0x55u8; 2 * BS]);
    let r = ini
        .scsi(0, &caw_cdb(100, 2), Some(&out), out.len() as u32, false)
        .unwrap();
    assert_eq!(r.sense_key(), Some(MISCOMPARE));
    assert_eq!(r.sense[0] & 0x80, 0x80, "INFORMATION is valid");
    assert_eq!(&r.sense[3..7], &700u32.to_be_bytes());
    assert_eq!(ini.read16(0, 100, 2, BS as u32).unwrap(), old);
    // Data-Out that is not twice the range: refused whole, nothing written.
    let r = ini
        .scsi(
            0,
            &caw_cdb(100, 2),
            Some(&out[..3 * BS]),
            3 * BS as u32,
            false,
        )
        .unwrap();
    assert_eq!(r.sense_key(), Some(0x05));
    assert_eq!(r.asc_ascq(), Some((0x24, 0x00)));
    assert_eq!(ini.read16(0, 100, 2, BS as u32).unwrap(), old);
    assert!(t.log().lines().all(|l| !l.contains("panicked")));
}

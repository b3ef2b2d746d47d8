//! EXTENDED COPY(LID1) and RECEIVE COPY RESULTS through the crate's own initiator against
//! the real daemon: copies between two LUNs of a target and within one (overlapping both
//! ways), named by the NAA designators the LUNs report; COPY STATUS after; the refusals of a
//! copy past the end and of an unknown designator; a reservation of another I_T nexus; a
//! copy held by a stalled destination while other commands are answered, then aborted; and
//! a 64 MiB copy while another connection reads.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions, ScsiResult};

const BS: u32 = 512;
const COPY_ABORTED: u8 = 0x0a;

/// A RAM LUN 0 and 1 of `mb` MiB each, one reactor: the copy and the other connection's
/// commands share it.
fn target(mb: u32) -> Target {
    let t = Target::start(&["--cores", "0"]);
    for name in ["src0", "dst0"] {
        t.mgmt(
            "handlers/vdisk_ramio/mgmt",
            &format!("add_device {name} size_mb={mb}"),
        );
    }
    t.mgmt("targets/iscsi/mgmt", &format!("add_target {IQN}"));
    t.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "add src0 0");
    t.mgmt(&format!("targets/iscsi/{IQN}/luns/mgmt"), "add dst0 1");
    t.set(&format!("targets/iscsi/{IQN}/enabled"), "1");
    t.set("targets/iscsi/enabled", "1");
    t
}

fn login(t: &Target, name: &str, isid_last: u8) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: name.into(),
        target_name: Some(IQN.into()),
        isid: [0x40, 0, 0, 0, 0, isid_last],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    // A new I_T nexus starts with unit attentions on each LUN.
    for lun in [0, 1] {
        let good = (0..8).any(|_| ini.test_unit_ready(lun).unwrap().is_good());
        assert!(good, "unit attentions on LUN {lun} never cleared");
    }
    ini
}

/// The NAA designator LUN `lun` reports in its Device Identification page, as a CSCD
/// descriptor (identification descriptor, block device, 512-byte blocks) names it.
fn cscd(ini: &mut Initiator, lun: u64) -> [u8; 32] {
    let r = ini
        .scsi(lun, &[0x12, 1, 0x83, 0, 255, 0], None, 255, true)
        .unwrap();
    assert!(r.is_good(), "{r:?}");
    let page = &r.data;
    let mut off = 4;
    while off + 4 <= page.len() {
        let len = usize::from(page[off + 3]);
        // NAA (type 3), logical unit association.
        if page[off + 1] & 0x3f == 0x03 {
            let mut c = [0u8; 32];
            c[0] = 0xe4;
            c[4..8].copy_from_slice(&page[off..off + 4]);
            c[8..8 + len].copy_from_slice(&page[off + 4..off + 4 + len]);
            c[29..32].copy_from_slice(&BS.to_be_bytes()[1..]);
            return c;
        }
        off += 4 + len;
    }
    panic!("LUN {lun} reports no NAA designator: {page:x?}");
}

/// A parameter list, LIST ID USAGE 00b: the CSCDs, and block to block segments (source
/// index, destination index, blocks, source LBA, destination LBA).
fn list(list_id: u8, cscds: &[[u8; 32]], segs: &[(u16, u16, u16, u64, u64)]) -> Vec<u8> {
    let mut v = vec![0u8; 16];
    v[0] = list_id;
    v[2..4].copy_from_slice(&((cscds.len() * 32) as u16).to_be_bytes());
    v[8..12].copy_from_slice(&((segs.len() * 28) as u32).to_be_bytes());
    for c in cscds {
        v.extend_from_slice(c);
    }
    for &(s, d, n, sl, dl) in segs {
        let mut x = [0u8; 28];
        x[0] = 0x02;
        x[3] = 0x18;
        x[4..6].copy_from_slice(&s.to_be_bytes());
        x[6..8].copy_from_slice(&d.to_be_bytes());
        x[10..12].copy_from_slice(&n.to_be_bytes());
        x[12..20].copy_from_slice(&sl.to_be_bytes());
        x[20..28].copy_from_slice(&dl.to_be_bytes());
        v.extend_from_slice(&x);
    }
    v
}

fn xcopy_cdb(len: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

fn xcopy(ini: &mut Initiator, lun: u64, list: &[u8]) -> ScsiResult {
    ini.scsi(
        lun,
        &xcopy_cdb(list.len()),
        Some(list),
        list.len() as u32,
        false,
    )
    .unwrap()
}

/// RECEIVE COPY RESULTS, COPY STATUS of `list_id`.
fn copy_status(ini: &mut Initiator, lun: u64, list_id: u8) -> ScsiResult {
    let mut c = [0u8; 16];
    c[0] = 0x84;
    c[2] = list_id;
    c[13] = 12;
    ini.scsi(lun, &c, None, 12, true).unwrap()
}

/// `n` bytes in which every 512-byte block differs (its number from `seed` in each word).
fn pattern(seed: u32, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    for i in 0..(n / 4) as u32 {
        let block = seed + i / 128;
        v.extend_from_slice(&(block.wrapping_mul(2_654_435_761) ^ i).to_be_bytes());
    }
    v
}

#[test]
fn copies_between_and_within_logical_units() {
    let t = target(16);
    let mut ini = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-a", 1);
    let (src, dst) = (cscd(&mut ini, 0), cscd(&mut ini, 1));
    let data = pattern(0, 2 << 20);
    ini.write16(0, 0, &data, BS).unwrap();
    // 1 MiB of LUN 0 to LUN 1, sent to LUN 0.
    let r = xcopy(&mut ini, 0, &list(1, &[src, dst], &[(0, 1, 2048, 0, 4096)]));
    assert!(r.is_good(), "{r:?}");
    assert_eq!(ini.read16(1, 4096, 2048, BS).unwrap(), data[..1 << 20]);
    // COPY STATUS of list 1: done, one segment, 1 MiB.
    let s = copy_status(&mut ini, 0, 1);
    assert!(s.is_good(), "{s:?}");
    assert_eq!(s.data, [0, 0, 0, 8, 1, 0, 1, 0, 0, 0x10, 0, 0]);
    // Within LUN 0, sent to LUN 1 (a copy manager names any LUN of the target): 2 MiB up
    // by 1000 blocks over itself, then down by 300; each block is read before it is
    // overwritten, as a memmove would.
    let r = xcopy(&mut ini, 1, &list(2, &[src], &[(0, 0, 4096, 0, 1000)]));
    assert!(r.is_good(), "{r:?}");
    let mut model = data.clone();
    model.resize(6 << 20, 0);
    model.copy_within(0..2 << 20, 1000 * 512);
    let r = xcopy(&mut ini, 1, &list(3, &[src], &[(0, 0, 4096, 1000, 700)]));
    assert!(r.is_good(), "{r:?}");
    model.copy_within(1000 * 512..1000 * 512 + (2 << 20), 700 * 512);
    assert_eq!(ini.read16(0, 0, 12288, BS).unwrap(), model);
    assert_eq!(copy_status(&mut ini, 1, 3).data[4], 1);
    // Past the end of LUN 1 (16 MiB): COPY ABORTED, the segment number in bytes 10-11.
    let end = 16 * 2048;
    let r = xcopy(
        &mut ini,
        0,
        &list(4, &[src, dst], &[(0, 1, 8, 0, 0), (0, 1, 16, 0, end - 8)]),
    );
    assert_eq!(
        (r.sense_key(), r.asc_ascq()),
        (Some(COPY_ABORTED), Some((0, 0)))
    );
    assert_eq!(&r.sense[10..12], &[0, 1]);
    assert_eq!(copy_status(&mut ini, 0, 4).data[4], 2, "done with errors");
    // A designator no LUN of the target reports.
    let mut unknown = dst;
    unknown[12] ^= 0xff;
    let r = xcopy(&mut ini, 0, &list(5, &[src, unknown], &[(0, 1, 8, 0, 0)]));
    assert_eq!(
        (r.sense_key(), r.asc_ascq()),
        (Some(COPY_ABORTED), Some((0x0d, 0x02)))
    );
    // Nothing ran under list 9.
    let s = copy_status(&mut ini, 0, 9);
    assert_eq!((s.sense_key(), s.asc_ascq()), (Some(0x05), Some((0x24, 0))));
}

#[test]
fn a_reservation_of_another_nexus_conflicts() {
    let t = target(4);
    let mut a = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-a", 1);
    let mut b = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-b", 2);
    let (src, dst) = (cscd(&mut a, 0), cscd(&mut a, 1));
    // B registers on LUN 1 and reserves it Write Exclusive.
    let mut param = [0u8; 24];
    param[15] = 0xbb;
    let out = |sa: u8, ty: u8| [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    assert!(b
        .scsi(1, &out(0, 0), Some(&param), 24, false)
        .unwrap()
        .is_good());
    param[7] = 0xbb;
    param[15] = 0;
    assert!(b
        .scsi(1, &out(1, 1), Some(&param), 24, false)
        .unwrap()
        .is_good());
    // A copies to LUN 1: the copy manager writes for A, which the reservation refuses.
    let r = xcopy(&mut a, 0, &list(1, &[src, dst], &[(0, 1, 8, 0, 0)]));
    assert_eq!(r.status, 0x18, "{r:?}");
    // From LUN 1 to LUN 0 only reads LUN 1, which Write Exclusive allows.
    let r = xcopy(&mut a, 0, &list(2, &[src, dst], &[(1, 0, 8, 0, 0)]));
    assert!(r.is_good(), "{r:?}");
}

#[test]
fn a_stalled_copy_leaves_other_commands_answered_and_aborts_cleanly() {
    let t = target(4);
    let mut a = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-a", 1);
    let mut b = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-b", 2);
    let (src, dst) = (cscd(&mut a, 0), cscd(&mut a, 1));
    let data = pattern(7, 1 << 20);
    a.write16(0, 0, &data, BS).unwrap();
    // The destination stops answering: the copy's first write is held there.
    t.set("devices/dst0/fault_inject", "stall");
    let l = list(1, &[src, dst], &[(0, 1, 2048, 0, 0)]);
    let itt = a
        .submit(0, &xcopy_cdb(l.len()), Some(&l), l.len() as u32, false)
        .unwrap();
    // Meanwhile the reactor answers both connections: reads, and the copy's status.
    for _ in 0..20 {
        assert_eq!(b.read16(0, 0, 16, BS).unwrap(), data[..16 * 512]);
    }
    let s = copy_status(&mut a, 0, 1);
    assert_eq!(
        (s.data[4], s.data[6]),
        (0, 1),
        "in progress, segment 1: {s:?}"
    );
    assert!(a.in_flight(itt));
    // ABORT TASK ends it: the held write never lands.
    let (response, ended) = a.abort_task(0, itt).unwrap();
    assert_eq!((response, ended), (0, true));
    t.set("devices/dst0/fault_inject", "none");
    assert_eq!(b.read16(1, 0, 2048, BS).unwrap(), vec![0; 1 << 20]);
    assert_eq!(copy_status(&mut a, 0, 1).data[4], 2);
    // The same list identifier again, held by a stall that then clears: it completes.
    t.set("devices/dst0/fault_inject", "stall");
    let itt = a
        .submit(0, &xcopy_cdb(l.len()), Some(&l), l.len() as u32, false)
        .unwrap();
    assert!(b.test_unit_ready(1).unwrap().is_good());
    t.set("devices/dst0/fault_inject", "none");
    let r = a.wait(itt).unwrap();
    assert!(r.is_good(), "{r:?}");
    assert_eq!(b.read16(1, 0, 2048, BS).unwrap(), data);
}

#[test]
fn a_large_copy_while_another_connection_reads() {
    let t = target(80);
    let mut a = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-a", 1);
    let mut b = login(&t, "iqn.2026-12.org.iscsi-tgt:xcopy-b", 2);
    let (src, dst) = (cscd(&mut a, 0), cscd(&mut a, 1));
    // 64 MiB of LUN 0, each MiB its own pattern, then 1 MiB beyond it that B reads.
    for mib in 0..65u32 {
        a.write16(0, u64::from(mib) * 2048, &pattern(mib * 2048, 1 << 20), BS)
            .unwrap();
    }
    let reader_data = pattern(64 * 2048, 1 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(
                    b.read16(0, 64 * 2048, 256, BS).unwrap(),
                    reader_data[..256 * 512]
                );
                reads += 1;
            }
            reads
        })
    };
    // Three segments of at most 65535 blocks: 131072 blocks.
    let segs = [
        (0, 1, 65535, 0, 0),
        (0, 1, 65535, 65535, 65535),
        (0, 1, 2, 131_070, 131_070),
    ];
    let r = xcopy(&mut a, 0, &list(1, &[src, dst], &segs));
    assert!(r.is_good(), "{r:?}");
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0, "the other connection's reads were answered");
    let s = copy_status(&mut a, 0, 1);
    assert_eq!(s.data[4..8], [1, 0, 3, 0], "done, three segments: {s:?}");
    assert_eq!(
        u32::from_be_bytes([s.data[8], s.data[9], s.data[10], s.data[11]]),
        64 << 20
    );
    for mib in (0..64u32).step_by(7).chain([63]) {
        let back = a.read16(1, u64::from(mib) * 2048, 2048, BS).unwrap();
        assert!(
            back == pattern(mib * 2048, 1 << 20),
            "MiB {mib} of the copy"
        );
    }
}

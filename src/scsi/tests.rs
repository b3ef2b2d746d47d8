//! The SCSI core driven as a transport drives it: plan, buffers, execute, poll, complete.
use std::sync::Arc;
use std::time::Instant;

use crate::env::DataBuf;
use crate::scsi::cdb::{be16, be32};
use crate::scsi::command::{lookup, plan, ua_applies, COMMANDS};
use crate::scsi::device::Device;
use crate::scsi::mmc;
use crate::scsi::port::*;
use crate::scsi::pr::test_nexus;
use crate::scsi::sbc::max_compare_and_write_blocks;
use crate::scsi::sbc::opcode::*;
use crate::scsi::sense;
use crate::scsi::spc::luns::execute_no_lun;
use crate::scsi::spc::opcode::*;
use crate::scsi::task::*;

/// Whether the dispatcher accepts the command `c` names for `d`.
fn supported(d: &Device, c: &[u8; 16]) -> bool {
    lookup(c).is_some_and(|x| x.serves(d))
}

/// Whether the commands with opcode `op` (every service action) work without a medium.
fn works_without_medium(op: u8) -> bool {
    let mut cs = COMMANDS.iter().filter(|c| c.op == op).peekable();
    assert!(cs.peek().is_some(), "{op:#x} is in the table");
    cs.all(|c| c.works_without_medium)
}

fn dev() -> Arc<Device> {
    Device::create("vdisk_ramio", "t0", &[("size_mb".into(), "1".into())]).unwrap()
}

fn thin() -> Arc<Device> {
    Device::create(
        "vdisk_ramio",
        "t0",
        &[
            ("size_mb".into(), "1".into()),
            ("thin_provisioned".into(), "1".into()),
        ],
    )
    .unwrap()
}

fn removable() -> Arc<Device> {
    Device::create(
        "vdisk_ramio",
        "r0",
        &[
            ("size_mb".into(), "1".into()),
            ("removable".into(), "1".into()),
        ],
    )
    .unwrap()
}

/// An UNMAP parameter list of (lba, blocks) descriptors.
fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    v[0..2].copy_from_slice(&((6 + descs.len() * 16) as u16).to_be_bytes());
    v[2..4].copy_from_slice(&((descs.len() * 16) as u16).to_be_bytes());
    for &(lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let mut c = [UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
    c
}

fn ws10(lba: u32, n: u16, flags: u8) -> [u8; 10] {
    let mut c = [WRITE_SAME_10, flags, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn ws16(lba: u64, n: u32, flags: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = WRITE_SAME_16;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn read(d: &Arc<Device>, lba: u32, n: u16) -> Vec<u8> {
    let mut c = [READ_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    let t = run(d, &c, None);
    assert_eq!(t.status, 0);
    data(&t)
}

fn fill(d: &Arc<Device>, lba: u32, n: u16, byte: u8) {
    let mut c = [WRITE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    let t = run(d, &c, Some(&vec![byte; n as usize * 512]));
    assert_eq!(t.status, 0);
}

fn sai16(sa: u8, lba: u64, alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = SERVICE_ACTION_IN_16;
    c[1] = sa;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// Runs a command to completion the way the transport does.
fn run(d: &Arc<Device>, cdb: &[u8], data_out: Option<&[u8]>) -> ScsiTask {
    run_task(d, ScsiTask::new(cdb, 0, 7), data_out)
}

/// [`run`] for a task the test has prepared.
fn run_task(d: &Arc<Device>, mut t: ScsiTask, data_out: Option<&[u8]>) -> ScsiTask {
    let plan = match plan(d, &mut t, &test_nexus()) {
        Ok(p) => p,
        Err(s) => {
            t.fail(s);
            return t;
        }
    };
    if plan.len > 0 {
        let mut b = DataBuf::alloc(plan.len as usize).unwrap();
        if let Some(x) = data_out {
            b.write_at(0, x);
        }
        t.buf = Some(b);
    }
    let mut port = ScsiPort::new();
    if port.execute(d, &mut t) == Exec::Pending {
        let mut out = Vec::new();
        // A read-modify-write takes two passes (its read, then its write); a file's I/O as
        // many as its ring needs.
        for _ in 0..100_000 {
            if port.poll(&mut out) > 0 {
                break;
            }
        }
        complete(&mut t, out.pop().expect("no completion"));
    }
    t
}

fn data(t: &ScsiTask) -> Vec<u8> {
    let mut v = vec![0u8; t.data_in_len as usize];
    t.buf.as_ref().map(|b| b.read_at(0, &mut v));
    v
}

fn asc(t: &ScsiTask) -> (u8, u8, u8) {
    let s = t.sense();
    (s[2] & 0xf, s[12], s[13])
}

#[test]
fn write_then_read() {
    let d = dev();
    let w = run(
        &d,
        &[WRITE_10, 0x08, 0, 0, 0, 5, 0, 0, 2, 0],
        Some(&[0xab; 1024]),
    );
    assert_eq!(w.status, 0);
    let r = run(
        &d,
        &[READ_16, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0],
        None,
    );
    assert_eq!(data(&r), vec![0xab; 1024]);
    // VERIFY with BYTCHK=1 compares.
    let v = run(
        &d,
        &[VERIFY_10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0],
        Some(&[0xab; 1024]),
    );
    assert_eq!(v.status, 0);
    let mut other = vec![0xab; 1024];
    other[700] = 0;
    let v = run(&d, &[VERIFY_10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0], Some(&other));
    assert_eq!(asc(&v), (sense::MISCOMPARE, 0x1d, 0));
}

#[test]
fn range_checks() {
    let d = dev();
    let last = (d.num_blocks() - 1) as u32;
    let mut cdb = [READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    cdb[2..6].copy_from_slice(&last.to_be_bytes());
    assert_eq!(run(&d, &cdb, None).status, 0);
    cdb[2..6].copy_from_slice(&(last + 1).to_be_bytes());
    assert_eq!(asc(&run(&d, &cdb, None)), (5, 0x21, 0));
    let mut c16 = [0u8; 16];
    c16[0] = READ_16;
    c16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    c16[13] = 2;
    assert_eq!(
        asc(&run(&d, &c16, None)),
        (5, 0x21, 0),
        "wrapping past 2^64"
    );
    assert_eq!(asc(&run(&d, &[0xd9, 0, 0, 0, 0, 0], None)), (5, 0x20, 0));
}

/// The designators of VPD page 0x83: (byte 0, byte 1, value).
fn designators(page: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let end = 4 + usize::from(u16::from_be_bytes([page[2], page[3]]));
    assert_eq!(page.len(), end, "the page length covers the page");
    let mut v = Vec::new();
    let mut i = 4;
    while i < end {
        let len = usize::from(page[i + 3]);
        v.push((page[i], page[i + 1], page[i + 4..i + 4 + len].to_vec()));
        i += 4 + len;
    }
    assert_eq!(i, end, "the designators end where the page does");
    v
}

#[test]
fn device_identification_names_the_target_port_and_device() {
    let d = dev();
    let cdb = [INQUIRY, 1, 0x83, 1, 0, 0];
    let mut t = ScsiTask::new(&cdb, 0, 7);
    t.target_name = Some("iqn.2026-12.org.example:disk1".into());
    t.rel_tgt_id = 3;
    let all = designators(&data(&run_task(&d, t, None)));
    let names: Vec<_> = all.iter().filter(|(_, b1, _)| b1 & 0x0f == 8).collect();
    assert_eq!(names.len(), 2, "{all:?}");
    // Target port: PIV, association 01b; target device: PIV, association 10b. iSCSI, UTF-8,
    // null terminated and padded to four bytes.
    assert_eq!((names[0].0, names[0].1), (0x53, 0x98));
    assert_eq!(
        names[0].2,
        b"iqn.2026-12.org.example:disk1,t,0x0001\0\0".to_vec()
    );
    assert_eq!((names[1].0, names[1].1), (0x53, 0xa8));
    assert_eq!(names[1].2, b"iqn.2026-12.org.example:disk1\0\0\0".to_vec());
    // The relative target port is still there.
    assert!(all.iter().any(|x| x == &(0x51, 0x94, vec![0, 0, 0, 3])));
    // Without a transport name (a unit test's task) there is no name string.
    let all = designators(&data(&run(&d, &cdb, None)));
    assert!(all.iter().all(|(_, b1, _)| b1 & 0x0f != 8), "{all:?}");
}

#[test]
fn inquiry_and_capacity() {
    let d = dev();
    let t = run(&d, &[INQUIRY, 0, 0, 0, 96, 0], None);
    let x = data(&t);
    assert_eq!(x.len(), 96);
    assert_eq!(&x[8..16], b"ISCSITGT");
    let t = run(&d, &[INQUIRY, 0, 0, 0, 5, 0], None);
    assert_eq!(t.data_in_len, 5, "allocation length truncates");
    let t = run(&d, &[INQUIRY, 1, 0x00, 0, 255, 0], None);
    assert_eq!(&data(&t)[4..], &[0x00, 0x80, 0x83, 0x86, 0x8f, 0xb0, 0xb1]);
    // Third-party Copy: its page length covers its descriptors.
    let tpc = data(&run(&d, &[INQUIRY, 1, 0x8f, 0, 255, 0], None));
    assert_eq!((tpc[1], be16(&tpc[2..4]) as usize), (0x8f, tpc.len() - 4));
    assert_eq!(&tpc[4..6], &[0x00, 0x01], "Supported Commands first");
    assert_eq!(
        asc(&run(&d, &[INQUIRY, 1, 0xb2, 0, 255, 0], None)),
        (5, 0x24, 0),
        "no provisioning page on a fully provisioned device"
    );
    assert_eq!(
        asc(&run(&d, &[INQUIRY, 0, 0x80, 0, 255, 0], None)),
        (5, 0x24, 0)
    );
    assert_eq!(
        asc(&run(&d, &[INQUIRY, 1, 0x99, 0, 255, 0], None)),
        (5, 0x24, 0)
    );
    let t = run(
        &d,
        &[
            SERVICE_ACTION_IN_16,
            0x10,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            32,
            0,
            0,
        ],
        None,
    );
    let x = data(&t);
    assert_eq!(
        u64::from_be_bytes(x[0..8].try_into().unwrap()),
        d.num_blocks() - 1
    );
}

#[test]
fn unit_attention_then_clear() {
    let d = dev();
    d.register_nexus(
        7,
        &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 7], 1),
    );
    let t = run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None);
    assert_eq!(asc(&t), (6, 0x29, 0));
    assert_eq!(run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None).status, 0);
    d.add_ua_all(0x3f, 0x03);
    // INQUIRY and the MMC polling commands do not report it; TUR does.
    assert!(!ua_applies(&ScsiTask::new(
        &[
            mmc::opcode::GET_EVENT_STATUS_NOTIFICATION,
            1,
            0,
            0,
            0x10,
            0,
            0,
            0,
            8,
            0
        ],
        0,
        7
    )));
    assert_eq!(run(&d, &[INQUIRY, 0, 0, 0, 36, 0], None).status, 0);
    assert_eq!(
        asc(&run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None)),
        (6, 0x3f, 3)
    );
}

#[test]
fn mode_sense() {
    let d = dev();
    let t = run(&d, &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None);
    let x = data(&t);
    assert_eq!(x[0] as usize, x.len() - 1);
    assert_eq!(x[3], 8, "block descriptor");
    let t = run(&d, &[MODE_SENSE_6, 0, 0x0a, 0, 255, 0], None);
    let x = data(&t);
    // PS: the control page can be saved.
    assert_eq!(&x[12..14], &[0x8a, 10]);
    // Saved values (PC 11b) are reported.
    let t = run(&d, &[MODE_SENSE_6, 0, 0xca, 0, 255, 0], None);
    assert_eq!(t.status, 0);
    assert_eq!(&data(&t)[12..14], &[0x8a, 10]);
    assert_eq!(
        asc(&run(&d, &[MODE_SENSE_6, 0, 0x22, 0, 255, 0], None)),
        (5, 0x24, 0)
    );
    let t = run(&d, &[MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0], None);
    let x = data(&t);
    assert_eq!(u16::from_be_bytes([x[0], x[1]]) as usize, x.len() - 2);
}

/// The control page (current values) of `d`, as MODE SENSE(6) reports it, ready to be sent
/// back in a MODE SELECT(6) parameter list (header without block descriptor, PS clear).
fn control_page_list(d: &Arc<Device>) -> Vec<u8> {
    let t = run(d, &[MODE_SENSE_6, 0x08, 0x0a, 0, 255, 0], None);
    let x = data(&t);
    let mut l = vec![0u8; 4];
    l.extend_from_slice(&x[4..]);
    l[4] &= 0x3f;
    l
}

#[test]
fn mode_select_swp_d_sense_and_the_unit_attention() {
    let d = dev();
    d.register_nexus(
        7,
        &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 7], 1),
    );
    d.register_nexus(
        8,
        &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 8], 1),
    );
    assert_eq!(d.take_ua(7), Some((0x29, 0)));
    assert_eq!(d.take_ua(8), Some((0x29, 0)));
    // SWP and D_SENSE on.
    let mut l = control_page_list(&d);
    l[4 + 2] |= 0x04;
    l[4 + 4] |= 0x08;
    let len = l.len() as u8;
    let t = run(&d, &[MODE_SELECT_6, 0x10, 0, 0, len, 0], Some(&l));
    assert_eq!(t.status, 0, "{:x?}", t.sense());
    // The other nexus hears MODE PARAMETERS CHANGED, this one does not.
    assert_eq!(d.take_ua(7), None);
    assert_eq!(d.take_ua(8), Some((0x2a, 0x01)));
    // Writes are refused, in descriptor format now.
    let w = run(&d, &[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], Some(&[0; 512]));
    assert_eq!(w.status, STATUS_CHECK_CONDITION);
    assert_eq!(&w.sense()[..4], &[0x72, sense::DATA_PROTECT, 0x27, 0]);
    assert_eq!(w.sense().len(), 8);
    // A field pointer travels in a sense key specific descriptor.
    let t = run(&d, &[MODE_SENSE_6, 0, 0x22, 0, 255, 0], None);
    assert_eq!(
        t.sense(),
        &[
            0x72,
            5,
            0x24,
            0,
            0,
            0,
            0,
            8,
            0x02,
            0x06,
            0,
            0,
            0xc0 | 0x08 | 5,
            0,
            2,
            0
        ]
    );
    // MODE SENSE shows WP and the page as changed; reads still work.
    let t = run(&d, &[MODE_SENSE_6, 0x08, 0x0a, 0, 255, 0], None);
    let x = data(&t);
    assert_eq!(x[2] & 0x80, 0x80, "WP");
    assert_eq!((x[4 + 2] & 0x04, x[4 + 4] & 0x08), (0x04, 0x08));
    assert_eq!(
        run(&d, &[READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], None).status,
        0
    );
    // REQUEST SENSE: as DESC asks, whatever D_SENSE says.
    d.add_ua_all(0x2a, 0x09);
    let t = run(&d, &[REQUEST_SENSE, 0x01, 0, 0, 255, 0], None);
    assert_eq!(data(&t), [0x72, 6, 0x2a, 0x09, 0, 0, 0, 0]);
    let t = run(&d, &[REQUEST_SENSE, 0, 0, 0, 255, 0], None);
    assert_eq!(data(&t)[0], 0x70);
    // Back off: fixed format, writes work; a MODE SELECT that changes nothing raises no
    // unit attention.
    let mut l = control_page_list(&d);
    l[4 + 2] &= !0x04;
    l[4 + 4] &= !0x08;
    let t = run(&d, &[MODE_SELECT_6, 0x10, 0, 0, len, 0], Some(&l));
    assert_eq!(t.status, 0);
    assert_eq!(d.take_ua(8), Some((0x2a, 0x09)));
    assert_eq!(d.take_ua(8), Some((0x2a, 0x01)));
    let t = run(&d, &[MODE_SELECT_6, 0x10, 0, 0, len, 0], Some(&l));
    assert_eq!(t.status, 0);
    assert_eq!(d.take_ua(8), None);
    let w = run(&d, &[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], Some(&[0; 512]));
    assert_eq!(w.status, 0);
    // CDB errors: PF=0 with data; a list shorter than its header.
    let t = run(&d, &[MODE_SELECT_6, 0, 0, 0, len, 0], Some(&l));
    assert_eq!(t.sense()[15..18], [0xc0 | 0x08 | 4, 0, 1]);
    let t = run(
        &d,
        &[MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, 4, 0],
        Some(&l[..4]),
    );
    assert_eq!(asc(&t), (5, 0x1a, 0));
    // MODE SELECT(10) with the same page, SP=1: saved.
    let mut l10 = vec![0u8; 8];
    l10.extend_from_slice(&l[4..]);
    l10[8 + 4] |= 0x08;
    let n = l10.len() as u8;
    let t = run(
        &d,
        &[MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0, n, 0],
        Some(&l10),
    );
    assert_eq!(t.status, 0);
    assert_eq!(d.get_attr("swp").unwrap(), "1");
    let t = run(&d, &[MODE_SENSE_6, 0x08, 0xca, 0, 255, 0], None);
    assert_eq!(data(&t)[4 + 4] & 0x08, 0x08, "saved SWP");
}

#[test]
fn defect_data_log_pages_and_task_management_report() {
    let d = dev();
    let t = run(
        &d,
        &[READ_DEFECT_DATA_10, 0, 0x18 | 0x05, 0, 0, 0, 0, 0, 32, 0],
        None,
    );
    assert_eq!(data(&t), [0, 0x1d, 0, 0]);
    let t = run(
        &d,
        &[
            READ_DEFECT_DATA_12,
            0x08 | 0x03,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            32,
            0,
            0,
        ],
        None,
    );
    assert_eq!(data(&t), [0, 0x0b, 0, 0, 0, 0, 0, 0]);
    let t = run(
        &d,
        &[READ_DEFECT_DATA_10, 0, 0x07, 0, 0, 0, 0, 0, 32, 0],
        None,
    );
    assert_eq!(asc(&t), (5, 0x24, 0));
    let t = run(&d, &[LOG_SENSE, 0, 0x40, 0, 0, 0, 0, 0, 64, 0], None);
    assert_eq!(data(&t), [0, 0, 0, 2, 0x00, 0x2f]);
    let t = run(&d, &[LOG_SENSE, 0x01, 0x40, 0, 0, 0, 0, 0, 64, 0], None);
    assert_eq!(asc(&t), (5, 0x24, 0));
    let t = run(
        &d,
        &[
            MAINTENANCE_IN,
            MI_REPORT_SUPPORTED_TMFS,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            16,
            0,
            0,
        ],
        None,
    );
    assert_eq!(data(&t), [0xfa, 0, 0, 0]);
    let t = run(
        &d,
        &[
            MAINTENANCE_IN,
            MI_REPORT_SUPPORTED_TMFS,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            16,
            0,
            0,
        ],
        None,
    );
    assert_eq!(data(&t).len(), 16);
    assert_eq!(data(&t)[3], 0x0c);
}

#[test]
fn read_only_lun_refuses_writes() {
    let d = dev();
    let mut t = ScsiTask::new(&[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 1);
    t.read_only = true;
    let s = plan(&d, &mut t, &test_nexus()).unwrap_err();
    t.fail(s);
    assert_eq!(asc(&t), (7, 0x27, 0));
}

#[test]
fn report_luns_and_missing_lun() {
    let mut t = ScsiTask::new(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 0, 1);
    t.buf = DataBuf::alloc(256);
    execute_no_lun(&mut t, &[0, 1]);
    assert_eq!(t.data_in_len, 24);
    let mut t = ScsiTask::new(&[TEST_UNIT_READY, 0, 0, 0, 0, 0], 3, 1);
    execute_no_lun(&mut t, &[0]);
    assert_eq!(asc(&t), (5, 0x25, 0));
    let mut t = ScsiTask::new(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 0, 1);
    execute_no_lun(&mut t, &[0]);
    assert_eq!(asc(&t), (5, 0x24, 0));
}

#[test]
fn a_shortened_write_touches_only_the_blocks_sent() {
    let d = dev();
    run(&d, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], Some(&[b'a'; 1024]));
    // WRITE(10) of two blocks of which the transport delivers one.
    let mut t = ScsiTask::new(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0, 7);
    let p = plan(&d, &mut t, &test_nexus()).unwrap();
    assert_eq!(p.len, 1024);
    assert!(
        !t.limit_write(200, 512),
        "a partial block cannot be written"
    );
    assert!(t.limit_write(512, 512));
    let mut b = DataBuf::alloc(1024).unwrap();
    b.write_at(0, &[b'b'; 1024]);
    t.buf = Some(b);
    let mut port = ScsiPort::new();
    if port.execute(&d, &mut t) == Exec::Pending {
        let mut out = Vec::new();
        port.poll(&mut out);
        complete(&mut t, out.pop().unwrap());
    }
    assert_eq!(t.status, STATUS_GOOD);
    let r = run(&d, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], None);
    let got = data(&r);
    assert!(got[..512].iter().all(|&x| x == b'b'));
    assert!(
        got[512..].iter().all(|&x| x == b'a'),
        "second block untouched"
    );
    // A read cannot be shortened this way.
    let mut r = ScsiTask::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0, 7);
    plan(&d, &mut r, &test_nexus()).unwrap();
    assert!(!r.limit_write(512, 512));
}

#[test]
fn thin_capacity_and_vpd() {
    let d = thin();
    let x = data(&run(&d, &sai16(0x10, 0, 32), None));
    assert_eq!(x[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    assert_eq!(x[13], 0, "LB per PB exponent");
    let x = data(&run(&dev(), &sai16(0x10, 0, 32), None));
    assert_eq!(x[14] & 0xc0, 0, "fully provisioned");
    let t = run(&d, &[INQUIRY, 1, 0x00, 0, 255, 0], None);
    assert_eq!(
        &data(&t)[4..],
        &[0x00, 0x80, 0x83, 0x86, 0x8f, 0xb0, 0xb1, 0xb2]
    );
    let bl = data(&run(&d, &[INQUIRY, 1, 0xb0, 0, 255, 0], None));
    assert_eq!(bl.len(), 64);
    assert_eq!(bl[3], 0x3c);
    let be32_at = |v: &[u8], i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap());
    assert_eq!(be32_at(&bl, 20), 131_072, "MAXIMUM UNMAP LBA COUNT");
    assert_eq!(
        be32_at(&bl, 24),
        256,
        "MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT"
    );
    assert_eq!(be32_at(&bl, 28), 8, "OPTIMAL UNMAP GRANULARITY");
    assert_eq!(
        u64::from_be_bytes(bl[36..44].try_into().unwrap()),
        16384,
        "MAXIMUM WRITE SAME LENGTH"
    );
    let full = data(&run(&dev(), &[INQUIRY, 1, 0xb0, 0, 255, 0], None));
    assert!(full[20..32].iter().all(|&b| b == 0), "no unmap limits");
    assert_ne!(u64::from_be_bytes(full[36..44].try_into().unwrap()), 0);
    let lbp = data(&run(&d, &[INQUIRY, 1, 0xb2, 0, 255, 0], None));
    assert_eq!(lbp, vec![0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);
}

#[test]
fn unmap_deallocates() {
    let d = thin();
    fill(&d, 0, 8, 0xaa);
    let list = unmap_list(&[(1, 2), (5, 1), (7, 0)]);
    let t = run(&d, &unmap_cdb(list.len()), Some(&list));
    assert_eq!(t.status, 0);
    let x = read(&d, 0, 8);
    for (b, chunk) in x.chunks(512).enumerate() {
        let zero = matches!(b, 1 | 2 | 5);
        assert!(
            chunk.iter().all(|&v| v == if zero { 0 } else { 0xaa }),
            "{b}"
        );
    }
    // Zero-length parameter list, and a list without descriptors: nothing happens.
    assert_eq!(run(&d, &unmap_cdb(0), None).status, 0);
    let empty = unmap_list(&[]);
    assert_eq!(run(&d, &unmap_cdb(8), Some(&empty)).status, 0);
    // 0 blocks at the end of the LUN is fine.
    let end = unmap_list(&[(d.num_blocks(), 0)]);
    assert_eq!(run(&d, &unmap_cdb(end.len()), Some(&end)).status, 0);
}

#[test]
fn unmap_checks() {
    let d = thin();
    let n = d.num_blocks();
    let oob = unmap_list(&[(0, 1), (n - 1, 2)]);
    assert_eq!(
        asc(&run(&d, &unmap_cdb(oob.len()), Some(&oob))),
        (5, 0x21, 0)
    );
    let oob = unmap_list(&[(n + 1, 0)]);
    assert_eq!(
        asc(&run(&d, &unmap_cdb(oob.len()), Some(&oob))),
        (5, 0x21, 0)
    );
    let oob = unmap_list(&[(u64::MAX, 2)]);
    assert_eq!(
        asc(&run(&d, &unmap_cdb(oob.len()), Some(&oob))),
        (5, 0x21, 0)
    );
    // Nothing is deallocated when a later descriptor is bad.
    fill(&d, 0, 1, 0x55);
    let bad = unmap_list(&[(0, 1), (n, 1)]);
    run(&d, &unmap_cdb(bad.len()), Some(&bad));
    assert!(read(&d, 0, 1).iter().all(|&v| v == 0x55));
    // Too many descriptors.
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let l = unmap_list(&many);
    assert_eq!(asc(&run(&d, &unmap_cdb(l.len()), Some(&l))), (5, 0x26, 0));
    // Parameter list shorter than the header, or than the header says.
    assert_eq!(asc(&run(&d, &unmap_cdb(4), Some(&[0; 4]))), (5, 0x1a, 0));
    let mut l = unmap_list(&[(0, 1)]);
    l[2..4].copy_from_slice(&32u16.to_be_bytes());
    assert_eq!(asc(&run(&d, &unmap_cdb(l.len()), Some(&l))), (5, 0x1a, 0));
    // A trailing partial descriptor is ignored.
    let mut l = unmap_list(&[(0, 1)]);
    l.extend_from_slice(&[0xff; 8]);
    l[2..4].copy_from_slice(&24u16.to_be_bytes());
    l[0..2].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(run(&d, &unmap_cdb(l.len()), Some(&l)).status, 0);
    // ANCHOR.
    let mut c = unmap_cdb(24);
    c[1] = 0x01;
    assert_eq!(
        asc(&run(&d, &c, Some(&unmap_list(&[(0, 1)])))),
        (5, 0x24, 0)
    );
    // Read-only LUN.
    let mut t = ScsiTask::new(&unmap_cdb(24), 0, 7);
    t.read_only = true;
    let s = plan(&d, &mut t, &test_nexus()).unwrap_err();
    t.fail(s);
    assert_eq!(asc(&t), (7, 0x27, 0));
    // Not thin provisioned: the command does not exist.
    let l = unmap_list(&[(0, 1)]);
    assert_eq!(asc(&run(&dev(), &unmap_cdb(24), Some(&l))), (5, 0x20, 0));
}

#[test]
fn write_same_writes_the_block_over_the_range() {
    let d = dev();
    let mut block = vec![0u8; 512];
    block[0] = 0x11;
    block[511] = 0x22;
    let t = run(&d, &ws10(3, 4, 0), Some(&block));
    assert_eq!(t.status, 0);
    let x = read(&d, 2, 6);
    assert!(x[..512].iter().all(|&v| v == 0));
    for b in 1..5 {
        assert_eq!(&x[b * 512..(b + 1) * 512], &block[..]);
    }
    assert!(x[5 * 512..].iter().all(|&v| v == 0));
    // WRITE SAME (16) with NDOB writes zeros without Data-Out.
    let mut t = ScsiTask::new(&ws16(3, 2, 0x01), 0, 7);
    assert_eq!(plan(&d, &mut t, &test_nexus()).unwrap().dir, DataDir::None);
    let t = run(&d, &ws16(3, 2, 0x01), None);
    assert_eq!(t.status, 0);
    assert!(read(&d, 3, 2).iter().all(|&v| v == 0));
    assert_eq!(read(&d, 5, 1), block);
    // 0 blocks: to the end of the LUN (a 1 MiB LUN is within the maximum length).
    let n = d.num_blocks();
    let t = run(&d, &ws16(n - 3, 0, 0), Some(&[0x77; 512]));
    assert_eq!(t.status, 0);
    assert!(read(&d, (n - 3) as u32, 3).iter().all(|&v| v == 0x77));
    // A WRITE SAME cannot be shortened to part of its one block.
    let mut t = ScsiTask::new(&ws10(0, 4, 0), 0, 7);
    assert_eq!(plan(&d, &mut t, &test_nexus()).unwrap().len, 512);
    assert!(!t.limit_write(256, 512));
}

#[test]
fn write_same_checks() {
    let d = dev();
    let n = d.num_blocks() as u32;
    assert_eq!(asc(&run(&d, &ws10(n, 1, 0), Some(&[0; 512]))), (5, 0x21, 0));
    assert_eq!(
        asc(&run(&d, &ws10(n - 1, 2, 0), Some(&[0; 512]))),
        (5, 0x21, 0)
    );
    assert_eq!(
        asc(&run(&d, &ws10(n + 1, 0, 0), Some(&[0; 512]))),
        (5, 0x21, 0)
    );
    assert_eq!(
        asc(&run(&d, &ws10(u32::MAX, 0, 0), Some(&[0; 512]))),
        (5, 0x21, 0)
    );
    assert_eq!(
        asc(&run(&d, &ws16(1 << 63, 1, 0), Some(&[0; 512]))),
        (5, 0x21, 0)
    );
    // WRPROTECT, ANCHOR, UNMAP on a fully provisioned device.
    for flags in [0x20, 0x10, 0x18, 0x08] {
        assert_eq!(
            asc(&run(&d, &ws10(0, 1, flags), Some(&[0; 512]))),
            (5, 0x24, 0),
            "{flags:#x}"
        );
    }
    // Longer than MAXIMUM WRITE SAME LENGTH (16384 blocks of 512).
    let big = Device::create("vdisk_nullio", "n0", &[]).unwrap();
    assert_eq!(
        asc(&run(&big, &ws16(0, 16385, 0), Some(&[0; 512]))),
        (5, 0x24, 0)
    );
    assert_eq!(
        asc(&run(&big, &ws16(0, 0, 0), Some(&[0; 512]))),
        (5, 0x24, 0)
    );
    assert_eq!(run(&big, &ws16(0, 16384, 0), Some(&[0; 512])).status, 0);
    let nb = big.num_blocks();
    assert_eq!(
        run(&big, &ws16(nb - 16384, 0, 0), Some(&[0; 512])).status,
        0
    );
    assert_eq!(
        asc(&run(&big, &ws16(nb - 16385, 0, 0), Some(&[0; 512]))),
        (5, 0x24, 0)
    );
    // Read-only.
    for cdb in [&ws10(0, 1, 0)[..], &ws16(0, 1, 0x08)[..]] {
        let mut t = ScsiTask::new(cdb, 0, 7);
        t.read_only = true;
        let s = plan(&thin(), &mut t, &test_nexus()).unwrap_err();
        t.fail(s);
        assert_eq!(asc(&t), (7, 0x27, 0));
    }
}

#[test]
fn write_same_unmap() {
    let d = thin();
    fill(&d, 0, 8, 0xff);
    // The UNMAP bit deallocates whatever the data block holds (LBPRZ: zeros read back).
    let t = run(&d, &ws10(2, 3, 0x08), Some(&[0xff; 512]));
    assert_eq!(t.status, 0);
    let x = read(&d, 0, 8);
    for (b, chunk) in x.chunks(512).enumerate() {
        let zero = (2..5).contains(&b);
        assert!(
            chunk.iter().all(|&v| v == if zero { 0 } else { 0xff }),
            "{b}"
        );
    }
    // Until the end, with WRITE SAME (16) and NDOB.
    let n = d.num_blocks();
    fill(&d, (n - 4) as u32, 4, 0xff);
    assert_eq!(run(&d, &ws16(n - 2, 0, 0x09), None).status, 0);
    let x = read(&d, (n - 4) as u32, 4);
    assert!(x[..1024].iter().all(|&v| v == 0xff));
    assert!(x[1024..].iter().all(|&v| v == 0));
}

#[test]
fn get_lba_status() {
    let d = thin();
    let n = d.num_blocks();
    let t = run(&d, &sai16(0x12, 5, 24), None);
    assert_eq!(t.status, 0);
    let x = data(&t);
    assert_eq!(x.len(), 24);
    assert_eq!(u32::from_be_bytes(x[0..4].try_into().unwrap()), 20);
    assert_eq!(u64::from_be_bytes(x[8..16].try_into().unwrap()), 5);
    // RAM disks cannot tell: everything counts as mapped, to the end.
    assert_eq!(
        u64::from(u32::from_be_bytes(x[16..20].try_into().unwrap())),
        n - 5
    );
    assert_eq!(x[20] & 0x0f, 0);
    assert_eq!(run(&d, &sai16(0x12, n - 1, 24), None).status, 0);
    assert_eq!(asc(&run(&d, &sai16(0x12, n, 24), None)), (5, 0x21, 0));
    assert_eq!(asc(&run(&d, &sai16(0x12, n + 1, 24), None)), (5, 0x21, 0));
    assert_eq!(
        asc(&run(&d, &sai16(0x12, u64::MAX, 24), None)),
        (5, 0x21, 0)
    );
    // The allocation length truncates; an unknown service action of a known operation
    // code is an invalid field (SPC-4 §4.2.5.1).
    assert_eq!(run(&d, &sai16(0x12, 0, 16), None).data_in_len, 16);
    assert_eq!(asc(&run(&d, &sai16(0x13, 0, 16), None)), (5, 0x24, 0));
}

/// The LBA status descriptors (LBA, blocks, provisioning status) of one GET LBA STATUS,
/// after checking the header's length against them.
fn lba_status(d: &Arc<Device>, start: u64, alloc: u32) -> Vec<(u64, u32, u8)> {
    let t = run(d, &sai16(0x12, start, alloc), None);
    assert_eq!(t.status, 0, "GET LBA STATUS at {start}");
    let x = data(&t);
    let len = u32::from_be_bytes(x[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, x.len(), "parameter data length at {start}");
    x[8..]
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_be_bytes(c[0..8].try_into().unwrap()),
                u32::from_be_bytes(c[8..12].try_into().unwrap()),
                c[12] & 0x0f,
            )
        })
        .collect()
}

/// GET LBA STATUS on a real sparse file, whose file system maps whole blocks of P
/// logical blocks: the first descriptor starts at the requested LBA wherever it falls in
/// a file-system (physical) block, and a block the file system holds counts as mapped
/// even where only some of its logical blocks were written. The answer is the same
/// whether the LUN reports one logical block per physical block or P of them.
#[test]
fn get_lba_status_from_any_lba_of_a_sparse_file() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const MAPPED: u8 = 0;
    const DEALLOCATED: u8 = 1;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    let fs_block = f.metadata().unwrap().blksize();
    assert!(
        fs_block >= 1024 && fs_block.is_power_of_two(),
        "/var/tmp has {fs_block}-byte blocks: this test needs more than one logical block per file-system block"
    );
    // Logical blocks per file-system block.
    let p = fs_block / 512;
    let blocks = 64 * p;
    f.set_len(blocks * 512).unwrap();
    let write = |lba: u64, n: u64| {
        f.write_all_at(&vec![0x5a; n as usize * 512], lba * 512)
            .unwrap()
    };
    // File-system blocks 1, 3, 4, 5 and 63 hold data; of 3 and 63 only one logical block
    // was written (the last of 3, the first of 63).
    write(p, p);
    write(4 * p - 1, 1);
    write(4 * p, 2 * p);
    write(63 * p, 1);
    f.sync_all().unwrap();
    let lbppb = |d: &Arc<Device>| {
        let t = run(d, &sai16(0x10, 0, 32), None);
        1u64 << (data(&t)[13] & 0x0f)
    };
    let u = |n: u64| u32::try_from(n).unwrap();
    for exp in ["0", "1"] {
        let d = Device::create(
            "vdisk_fileio",
            "sparse",
            &[
                ("filename".into(), path.to_str().unwrap().into()),
                ("thin_provisioned".into(), "1".into()),
                ("lb_per_pb_exp".into(), exp.into()),
            ],
        )
        .unwrap();
        assert_eq!(d.num_blocks(), blocks);
        assert_eq!(lbppb(&d), if exp == "1" { p } else { 1 });
        let tail = [(6 * p, u(57 * p), DEALLOCATED), (63 * p, u(p), MAPPED)];
        // From LBA 0: every stretch, in order, to the end of the LUN.
        let mut all = vec![
            (0, u(p), DEALLOCATED),
            (p, u(p), MAPPED),
            (2 * p, u(p), DEALLOCATED),
            (3 * p, u(3 * p), MAPPED),
        ];
        all.extend(tail);
        assert_eq!(lba_status(&d, 0, 1024), all, "lb_per_pb_exp={exp}");
        // Inside a hole, one block past its start.
        assert_eq!(
            lba_status(&d, 1, 1024)[..2],
            [(1, u(p - 1), DEALLOCATED), (p, u(p), MAPPED)],
            "lb_per_pb_exp={exp}"
        );
        // Inside a written file-system block: the rest of it, then the hole after it.
        assert_eq!(
            lba_status(&d, p + 3, 1024)[..2],
            [(p + 3, u(p - 3), MAPPED), (2 * p, u(p), DEALLOCATED)],
            "lb_per_pb_exp={exp}"
        );
        // Inside a partly written file-system block, on a block that was not written:
        // mapped, with the written blocks after it, then the tail.
        let mut v = vec![(3 * p + 1, u(3 * p - 1), MAPPED)];
        v.extend(tail);
        assert_eq!(lba_status(&d, 3 * p + 1, 1024), v, "lb_per_pb_exp={exp}");
        // Inside the long hole.
        assert_eq!(
            lba_status(&d, 6 * p + 5, 1024),
            [(6 * p + 5, u(57 * p - 5), DEALLOCATED), tail[1]],
            "lb_per_pb_exp={exp}"
        );
        // The last LBA, unwritten in the last file-system block, which holds data.
        assert_eq!(
            lba_status(&d, blocks - 1, 1024),
            [(blocks - 1, 1, MAPPED)],
            "lb_per_pb_exp={exp}"
        );
        // Room for one descriptor: the one that starts at the requested LBA.
        assert_eq!(
            lba_status(&d, 2 * p + 1, 24),
            [(2 * p + 1, u(p - 1), DEALLOCATED)],
            "lb_per_pb_exp={exp}"
        );
        // Every request from LBA 0 to the end starts where it was asked to, and its
        // first stretch matches the status of that LBA in the full answer.
        for start in 0..blocks {
            let first = lba_status(&d, start, 24)[0];
            let (lba, n, status) = *all
                .iter()
                .find(|&&(lba, n, _)| start < lba + u64::from(n))
                .unwrap();
            assert_eq!(
                first,
                (start, u(lba + u64::from(n) - start), status),
                "lb_per_pb_exp={exp}"
            );
        }
    }
}

#[test]
fn read_only_mode_sense_and_writes() {
    let d = Device::create(
        "vdisk_ramio",
        "ro",
        &[
            ("size_mb".into(), "1".into()),
            ("read_only".into(), "1".into()),
            ("thin_provisioned".into(), "1".into()),
        ],
    )
    .unwrap();
    let x = data(&run(&d, &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None));
    assert_eq!(x[2] & 0x80, 0x80, "WP");
    let x = data(&run(&dev(), &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], None));
    assert_eq!(x[2] & 0x80, 0);
    for cdb in [
        &[WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0][..],
        &[WRITE_VERIFY_16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0][..],
        &ws10(0, 1, 0)[..],
        &ws16(0, 1, 0x08)[..],
        &unmap_cdb(24)[..],
    ] {
        assert_eq!(
            asc(&run(&d, cdb, Some(&[0; 512]))),
            (7, 0x27, 0),
            "{cdb:x?}"
        );
    }
}

#[test]
fn prevent_allow_and_eject() {
    let d = removable();
    let eject = [START_STOP_UNIT, 0, 0, 0, 0x02, 0];
    assert_eq!(data(&run(&d, &[INQUIRY, 0, 0, 0, 36, 0], None))[1], 0x80);
    assert_eq!(run(&d, &[PREVENT_ALLOW, 0, 0, 0, 1, 0], None).status, 0);
    assert!(d.removal_prevented());
    assert_eq!(asc(&run(&d, &eject, None)), (5, 0x53, 2));
    // Loading is refused as well; power conditions and START alone are fine.
    assert_eq!(
        asc(&run(&d, &[START_STOP_UNIT, 0, 0, 0, 0x03, 0], None)),
        (5, 0x53, 2)
    );
    assert_eq!(
        run(&d, &[START_STOP_UNIT, 0, 0, 0, 0x01, 0], None).status,
        0
    );
    assert_eq!(run(&d, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], None).status, 0);
    // Another nexus still sees it prevented.
    let mut t = ScsiTask::new(&eject, 0, 8);
    let s = plan(&d, &mut t, &test_nexus()).unwrap_err();
    t.fail(s);
    assert_eq!(run(&d, &[PREVENT_ALLOW, 0, 0, 0, 0, 0], None).status, 0);
    assert!(!d.removal_prevented());
    assert_eq!(run(&d, &eject, None).status, 0);
    // SBC has no persistent prevent.
    assert_eq!(
        asc(&run(&d, &[PREVENT_ALLOW, 0, 0, 0, 2, 0], None)),
        (5, 0x24, 0)
    );
    // A fixed disk accepts PREVENT but has nothing to lock.
    let f = dev();
    assert_eq!(run(&f, &[PREVENT_ALLOW, 0, 0, 0, 1, 0], None).status, 0);
    assert!(!f.removal_prevented());
}

#[test]
fn mmc_commands_are_not_disk_commands() {
    let d = dev();
    for cdb in [
        &[mmc::opcode::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0][..],
        &[mmc::opcode::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8, 0][..],
        &[
            mmc::opcode::GET_EVENT_STATUS_NOTIFICATION,
            1,
            0,
            0,
            0x10,
            0,
            0,
            0,
            8,
            0,
        ][..],
        &[
            mmc::opcode::READ_DISC_INFORMATION,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            34,
            0,
        ][..],
        &[
            mmc::opcode::MECHANISM_STATUS,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            8,
            0,
            0,
        ][..],
    ] {
        assert_eq!(asc(&run(&d, cdb, None)), (5, 0x20, 0), "{cdb:x?}");
    }
    // And a disk's MODE SENSE has no CD capabilities page.
    assert_eq!(
        asc(&run(&d, &[MODE_SENSE_6, 0, 0x2a, 0, 255, 0], None)),
        (5, 0x24, 0)
    );
}

#[test]
fn commands_without_a_medium() {
    for op in [
        INQUIRY,
        REQUEST_SENSE,
        REPORT_LUNS,
        MODE_SENSE_6,
        MODE_SENSE_10,
        START_STOP_UNIT,
        PREVENT_ALLOW,
        mmc::opcode::GET_CONFIGURATION,
        mmc::opcode::GET_EVENT_STATUS_NOTIFICATION,
        mmc::opcode::MECHANISM_STATUS,
    ] {
        assert!(works_without_medium(op), "{op:#x}");
    }
    for op in [
        TEST_UNIT_READY,
        READ_10,
        READ_16,
        WRITE_10,
        VERIFY_10,
        READ_CAPACITY_10,
        SERVICE_ACTION_IN_16,
        SYNCHRONIZE_CACHE_10,
        UNMAP,
        WRITE_SAME_10,
        mmc::opcode::READ_TOC,
        mmc::opcode::READ_DISC_INFORMATION,
    ] {
        assert!(!works_without_medium(op), "{op:#x}");
    }
}

/// COMPARE AND WRITE of `blocks` at `lba`: `verify` then `write` bytes, one per block.
fn caw(d: &Arc<Device>, lba: u8, verify: &[u8], write: &[u8]) -> ScsiTask {
    let bs = d.block_size() as usize;
    let n = verify.len();
    let mut out = Vec::new();
    for &b in verify.iter().chain(write) {
        out.extend(std::iter::repeat_n(b, bs));
    }
    let mut cdb = [0u8; 16];
    cdb[0] = COMPARE_AND_WRITE;
    cdb[9] = lba;
    cdb[13] = n as u8;
    run(d, &cdb, Some(&out))
}

fn read_block(d: &Arc<Device>, lba: u8) -> Vec<u8> {
    data(&run(d, &[READ_10, 0, 0, 0, 0, lba, 0, 0, 1, 0], None))
}

#[test]
fn compare_and_write_writes_only_on_a_match() {
    let d = dev();
    let w = run(
        &d,
        &[WRITE_10, 0, 0, 0, 0, 2, 0, 0, 2, 0],
        Some(&[0xaa; 1024]),
    );
    assert_eq!(w.status, STATUS_GOOD);
    let t = caw(&d, 2, &[0xaa, 0xaa], &[0x55, 0x66]);
    assert_eq!(t.status, STATUS_GOOD, "{:?}", t.sense());
    assert_eq!(read_block(&d, 2), vec![0x55; 512]);
    assert_eq!(read_block(&d, 3), vec![0x66; 512]);
    // The medium no longer matches: MISCOMPARE, with the offset in the Data-Out of the
    // first differing byte in INFORMATION, and nothing written.
    let t = caw(&d, 2, &[0x55, 0xaa], &[0x11, 0x11]);
    assert_eq!(asc(&t), (sense::MISCOMPARE, 0x1d, 0x00));
    assert_eq!(t.sense()[0] & 0x80, 0x80, "VALID");
    assert_eq!(&t.sense()[3..7], &512u32.to_be_bytes());
    assert_eq!(read_block(&d, 2), vec![0x55; 512]);
    assert_eq!(read_block(&d, 3), vec![0x66; 512]);
}

#[test]
fn compare_and_write_checks_its_cdb_and_data_length() {
    let d = dev();
    let limit = max_compare_and_write_blocks(512) as u8;
    // Above MAXIMUM COMPARE AND WRITE LENGTH (VPD B0 byte 5 says what it is).
    let b0 = data(&run(&d, &[INQUIRY, 1, 0xb0, 0, 64, 0], None));
    assert_eq!(b0[5], limit);
    let mut cdb = [0u8; 16];
    cdb[0] = COMPARE_AND_WRITE;
    cdb[13] = limit + 1;
    let t = run(&d, &cdb, None);
    assert_eq!(asc(&t), (sense::ILLEGAL_REQUEST, 0x24, 0x00));
    // Zero blocks: nothing happens, and that is not an error.
    cdb[13] = 0;
    assert_eq!(run(&d, &cdb, None).status, STATUS_GOOD);
    // Data-Out of another size than twice the range is refused whole.
    cdb[13] = 1;
    let mut t = ScsiTask::new(&cdb, 0, 7);
    t.data_out_len = Some(512);
    let s = plan(&d, &mut t, &test_nexus()).unwrap_err();
    t.fail(s);
    assert_eq!(asc(&t), (sense::ILLEGAL_REQUEST, 0x24, 0x00));
    let mut t = ScsiTask::new(&cdb, 0, 7);
    t.data_out_len = Some(1024);
    assert_eq!(plan(&d, &mut t, &test_nexus()).map(|p| p.len), Ok(1024));
    // Past the end, and with WRPROTECT set.
    cdb[2..10].copy_from_slice(&(d.num_blocks()).to_be_bytes());
    assert_eq!(
        asc(&run(&d, &cdb, None)),
        (sense::ILLEGAL_REQUEST, 0x21, 0x00)
    );
    let mut cdb = [0u8; 16];
    cdb[0] = COMPARE_AND_WRITE;
    cdb[1] = 0x20;
    cdb[13] = 1;
    assert_eq!(
        asc(&run(&d, &cdb, None)),
        (sense::ILLEGAL_REQUEST, 0x24, 0x00)
    );
}

#[test]
fn pre_fetch_checks_its_range_and_completes_good() {
    let d = dev();
    let t = run(&d, &[PRE_FETCH_10, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], None);
    assert_eq!(t.status, STATUS_GOOD);
    let mut c16 = [0u8; 16];
    c16[0] = PRE_FETCH_16;
    c16[2..10].copy_from_slice(&(d.num_blocks() - 1).to_be_bytes());
    c16[13] = 2;
    assert_eq!(
        asc(&run(&d, &c16, None)),
        (sense::ILLEGAL_REQUEST, 0x21, 0x00)
    );
    c16[13] = 1;
    assert_eq!(run(&d, &c16, None).status, STATUS_GOOD);
}

#[test]
fn orwrite_ors_the_data_into_the_medium() {
    let d = dev();
    run(
        &d,
        &[WRITE_10, 0, 0, 0, 0, 5, 0, 0, 1, 0],
        Some(&[0x0f; 512]),
    );
    let mut cdb = [0u8; 16];
    cdb[0] = ORWRITE_16;
    cdb[9] = 5;
    cdb[13] = 1;
    let t = run(&d, &cdb, Some(&[0x30; 512]));
    assert_eq!(t.status, STATUS_GOOD);
    assert_eq!(read_block(&d, 5), vec![0x3f; 512]);
}

#[test]
fn a_delayed_read_tells_the_reactor_when_to_wake() {
    let d = dev();
    let delay = std::time::Duration::from_millis(40);
    d.set_attr("fault_delay_us", &delay.as_micros().to_string())
        .unwrap();
    let mut t = ScsiTask::new(&[READ_10, 0, 0, 0, 0, 3, 0, 0, 1, 0], 0, 7);
    plan(&d, &mut t, &test_nexus()).unwrap();
    t.buf = Some(DataBuf::alloc(512).unwrap());
    let mut port = ScsiPort::new();
    assert_eq!(port.next_deadline(), None);
    let t0 = Instant::now();
    assert_eq!(port.execute(&d, &mut t), Exec::Pending);
    // No ring I/O and no socket will wake a sleeping reactor: the deadline must.
    assert_eq!(port.inflight(), 0);
    let due = port.next_deadline().expect("the held READ's deadline");
    assert!(
        due >= t0 + delay && due <= Instant::now() + delay,
        "{due:?}"
    );
    let mut out = Vec::new();
    while port.poll(&mut out) == 0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "never came"
        );
        std::thread::yield_now();
    }
    assert!(t0.elapsed() >= delay, "completed before its deadline");
    complete(&mut t, out.pop().unwrap());
    assert_eq!(t.status, STATUS_GOOD);
    assert_eq!(port.next_deadline(), None);
    d.set_attr("fault_delay_us", "0").unwrap();
}

#[test]
fn read_modify_writes_wait_for_an_overlapping_one() {
    let d = dev();
    run(
        &d,
        &[WRITE_10, 0, 0, 0, 0, 8, 0, 0, 1, 0],
        Some(&[0x01; 512]),
    );
    // Another reactor's read-modify-write holds block 8.
    assert!(d.try_lock_range(8 * 512, 512));
    let mut cdb = [0u8; 16];
    cdb[0] = ORWRITE_16;
    cdb[9] = 8;
    cdb[13] = 1;
    let mut t = ScsiTask::new(&cdb, 0, 7);
    plan(&d, &mut t, &test_nexus()).unwrap();
    let mut b = DataBuf::alloc(512).unwrap();
    b.write_at(0, &[0x80; 512]);
    t.buf = Some(b);
    let mut port = ScsiPort::new();
    assert_eq!(port.execute(&d, &mut t), Exec::Pending);
    let mut out = Vec::new();
    for _ in 0..5 {
        assert_eq!(port.poll(&mut out), 0, "ran while the range was held");
    }
    assert!(port.inflight() > 0, "a waiting command counts as in flight");
    assert_eq!(read_block(&d, 8), vec![0x01; 512]);
    d.unlock_range(8 * 512, 512);
    let mut n = 0;
    for _ in 0..4 {
        n += port.poll(&mut out);
    }
    assert_eq!(n, 1);
    complete(&mut t, out.pop().unwrap());
    assert_eq!(t.status, STATUS_GOOD);
    assert_eq!(port.inflight(), 0);
    assert_eq!(read_block(&d, 8), vec![0x81; 512]);
    // Its range is free again.
    assert!(d.try_lock_range(8 * 512, 512));
}

#[test]
fn an_aborted_read_modify_write_never_writes() {
    let d = dev();
    run(
        &d,
        &[WRITE_10, 0, 0, 0, 0, 9, 0, 0, 1, 0],
        Some(&[0x01; 512]),
    );
    let orwrite = |tag: u64| {
        let mut cdb = [0u8; 16];
        cdb[0] = ORWRITE_16;
        cdb[9] = 9;
        cdb[13] = 1;
        let mut t = ScsiTask::new(&cdb, 0, 7);
        t.tag = tag;
        plan(&d, &mut t, &test_nexus()).unwrap();
        let mut b = DataBuf::alloc(512).unwrap();
        b.write_at(0, &[0x80; 512]);
        t.buf = Some(b);
        t
    };
    let mut port = ScsiPort::new();
    let mut out = Vec::new();
    // Aborted while waiting for its range.
    assert!(d.try_lock_range(9 * 512, 512));
    let mut a = orwrite(1);
    assert_eq!(port.execute(&d, &mut a), Exec::Pending);
    port.abort(1);
    d.unlock_range(9 * 512, 512);
    // Aborted during its read (the RAM disk's read is done, its completion not polled).
    let mut b = orwrite(2);
    assert_eq!(port.execute(&d, &mut b), Exec::Pending);
    port.abort(2);
    for _ in 0..4 {
        port.poll(&mut out);
    }
    assert_eq!(out.len(), 2, "both complete");
    for c in out.drain(..) {
        let t = if c.tag() == 1 { &mut a } else { &mut b };
        complete(t, c);
        assert_eq!(t.status, STATUS_TASK_ABORTED);
    }
    assert_eq!(port.inflight(), 0);
    assert_eq!(read_block(&d, 9), vec![0x01; 512], "nothing was written");
    assert!(d.try_lock_range(9 * 512, 512), "the range is free again");
}

fn rsoc(d: &Arc<Device>, options: u8, op: u8, sa: u16) -> ScsiTask {
    let s = sa.to_be_bytes();
    run(
        d,
        &[
            MAINTENANCE_IN,
            0x0c,
            options,
            op,
            s[0],
            s[1],
            0,
            0,
            0x10,
            0,
            0,
            0,
        ],
        None,
    )
}

/// The (opcode, service action) pairs of an all-commands report.
fn listed(t: &ScsiTask) -> Vec<(u8, u16)> {
    let d = data(t);
    let len = be32(&d[0..4]) as usize;
    assert_eq!(len + 4, d.len());
    let mut v = Vec::new();
    let mut i = 4;
    while i < d.len() {
        v.push((d[i], be16(&d[i + 2..i + 4]) as u16));
        i += if d[i + 5] & 0x02 != 0 { 20 } else { 8 };
    }
    v
}

#[test]
fn report_supported_opcodes_lists_what_the_device_serves() {
    let d = dev();
    let all = listed(&rsoc(&d, 0, 0, 0));
    for c in [
        (READ_10, 0),
        (COMPARE_AND_WRITE, 0),
        (PRE_FETCH_16, 0),
        (SERVICE_ACTION_IN_16, 0x10),
    ] {
        assert!(all.contains(&c), "{c:?}");
    }
    // UNMAP only on a thin provisioned device.
    assert!(!all.iter().any(|c| c.0 == UNMAP));
    assert!(listed(&rsoc(&thin(), 0, 0, 0)).contains(&(UNMAP, 0)));
    // Every listed command is one the dispatcher accepts, and the other way round for
    // a sample of opcodes.
    for &(op, sa) in &all {
        let mut c = [0u8; 16];
        c[0] = op;
        c[1] = sa as u8;
        assert!(supported(&d, &c), "{op:#x}/{sa:#x}");
    }
    // With RCTD, each descriptor carries a command timeouts descriptor.
    let t = rsoc(&d, 0x80, 0, 0);
    let x = data(&t);
    assert_eq!(x[4 + 5] & 0x02, 0x02);
    assert_eq!(&x[4 + 8..4 + 10], &[0, 0x0a]);
    // One command: SUPPORT 011b and its CDB usage data, DPO and FUA included.
    let one = data(&rsoc(&d, 1, READ_10, 0));
    assert_eq!(one[1] & 0x07, 0x03);
    assert_eq!(be16(&one[2..4]), 10);
    assert_eq!(one[4], READ_10);
    assert_eq!(one[5] & 0x18, 0x18);
    // One not served: SUPPORT 001b.
    assert_eq!(data(&rsoc(&d, 1, 0x04, 0))[1] & 0x07, 0x01);
    // By service action; asking for an opcode with service actions without one (and
    // the other way round) is an invalid field.
    let rc16 = data(&rsoc(&d, 2, SERVICE_ACTION_IN_16, 0x10));
    assert_eq!((rc16[1] & 0x07, be16(&rc16[2..4])), (0x03, 16));
    assert_eq!(
        asc(&rsoc(&d, 1, SERVICE_ACTION_IN_16, 0)),
        (sense::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        asc(&rsoc(&d, 2, READ_10, 0)),
        (sense::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(asc(&rsoc(&d, 5, 0, 0)), (sense::ILLEGAL_REQUEST, 0x24, 0));
}

/// A SANITIZE CDB: service action, IMMED, AUSE, parameter list length.
fn sanitize_cdb(sa: u8, immed: bool, ause: bool, plen: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x48;
    c[1] = sa | if immed { 0x80 } else { 0 } | if ause { 0x20 } else { 0 };
    c[7..9].copy_from_slice(&plen.to_be_bytes());
    c
}

/// An OVERWRITE parameter list: one pass of `pattern`.
fn overwrite_list(pattern: &[u8]) -> Vec<u8> {
    let mut v = vec![0x01, 0];
    v.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    v.extend_from_slice(pattern);
    v
}

/// Starts a command on `port` as the transport does; `None` when planning refused it.
fn start(port: &mut ScsiPort, d: &Arc<Device>, t: &mut ScsiTask, data_out: &[u8]) -> Option<Exec> {
    match plan(d, t, &test_nexus()) {
        Ok(p) => {
            if p.len > 0 {
                let mut b = DataBuf::alloc(p.len as usize).unwrap();
                b.write_at(0, data_out);
                t.buf = Some(b);
            }
            Some(port.execute(d, t))
        }
        Err(s) => {
            t.fail(s);
            None
        }
    }
}

/// Polls `port` until nothing is left in it; returns the completions it handed out. A count
/// of polls is no bound: on a loaded machine the ring's I/O can outlast thousands of them.
fn drain(port: &mut ScsiPort) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while Instant::now() < deadline {
        port.poll(&mut out);
        if port.inflight() == 0 {
            port.poll(&mut out);
            return out;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    panic!("the port never went idle");
}

fn read_one(d: &Arc<Device>, lba: u32) -> ScsiTask {
    let mut c = [0u8; 10];
    c[0] = READ_10;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[8] = 1;
    run(d, &c, None)
}

#[test]
fn sanitize_overwrite_writes_the_pattern_everywhere() {
    let d = dev();
    let last = (d.num_blocks() - 1) as u32;
    let mut w = [0u8; 10];
    w[0] = WRITE_10;
    w[2..6].copy_from_slice(&last.to_be_bytes());
    w[8] = 1;
    assert_eq!(run(&d, &w, Some(&[b'a'; 512])).status, 0);
    // Waits for the end (no IMMED): a three-byte pattern repeated over every block.
    let t = run(
        &d,
        &sanitize_cdb(0x01, false, false, 7),
        Some(&overwrite_list(&[1, 2, 3])),
    );
    assert_eq!(t.status, 0, "{:?}", asc(&t));
    for lba in [0, 1, last] {
        let r = read_one(&d, lba);
        let want: Vec<u8> = [1u8, 2, 3].iter().cycle().take(512).copied().collect();
        assert_eq!(data(&r), want, "block {lba}");
    }
    // Parameter lengths outside 5..=block size + 4 are refused in the CDB; a bad list after.
    for plen in [0u16, 4, 517] {
        let t = run(&d, &sanitize_cdb(0x01, false, false, plen), Some(&[0; 517]));
        assert_eq!(asc(&t), (5, 0x24, 0), "length {plen}");
    }
    let t = run(
        &d,
        &sanitize_cdb(0x01, false, false, 8),
        Some(&[0, 0, 0, 4, 1, 1, 1, 1]),
    );
    assert_eq!(asc(&t), (5, 0x26, 0), "OVERWRITE COUNT 0");
    // CRYPTOGRAPHIC ERASE and unknown service actions: invalid fields, not opcodes; BLOCK
    // ERASE only where blocks can be deallocated.
    for sa in [0x00, 0x02, 0x03, 0x04, 0x1e] {
        assert_eq!(
            asc(&run(&d, &sanitize_cdb(sa, false, false, 0), None)),
            (5, 0x24, 0),
            "{sa:#x}"
        );
    }
    // Reserved bits and bytes.
    let mut c = sanitize_cdb(0x01, false, false, 7);
    c[3] = 1;
    assert_eq!(
        asc(&run(&d, &c, Some(&overwrite_list(&[1, 2, 3])))),
        (5, 0x24, 0)
    );
}

#[test]
fn while_sanitizing_only_inquiry_report_luns_and_request_sense_are_served() {
    let d = dev();
    let mut port = ScsiPort::new();
    let mut t = ScsiTask::new(&sanitize_cdb(0x01, true, false, 5), 0, 7);
    // IMMED: answered at once, the operation under way.
    assert_eq!(
        start(&mut port, &d, &mut t, &overwrite_list(&[0x5a])),
        Some(Exec::Done)
    );
    assert_eq!(t.status, 0);
    let r = read_one(&d, 0);
    assert_eq!(asc(&r), (2, 0x04, 0x1b));
    // Sense-key specific: the progress indication.
    assert_eq!(r.sense()[15], 0x80);
    let tur = run(&d, &[0u8; 6], None);
    assert_eq!(asc(&tur), (2, 0x04, 0x1b));
    assert_eq!(run(&d, &[INQUIRY, 0, 0, 0, 96, 0], None).status, 0);
    let rs = run(&d, &[REQUEST_SENSE, 0, 0, 0, 18, 0], None);
    assert_eq!(rs.status, 0);
    let s = data(&rs);
    assert_eq!((s[2] & 0xf, s[12], s[13], s[15]), (2, 0x04, 0x1b, 0x80));
    // A second SANITIZE waits its turn with the others.
    assert_eq!(
        asc(&run(
            &d,
            &sanitize_cdb(0x01, false, false, 5),
            Some(&overwrite_list(&[1]))
        )),
        (2, 0x04, 0x1b)
    );
    assert!(
        drain(&mut port).is_empty(),
        "nothing waits for an IMMED sanitize"
    );
    let r = read_one(&d, 0);
    assert_eq!(r.status, 0);
    assert_eq!(data(&r), vec![0x5a; 512]);
}

#[test]
fn block_erase_deallocates_a_thin_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("erase.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let d = Device::create(
        "vdisk_fileio",
        "f0",
        &[
            ("filename".into(), path.to_str().unwrap().into()),
            ("thin_provisioned".into(), "1".into()),
        ],
    )
    .unwrap();
    let mut w = [0u8; 10];
    w[0] = WRITE_10;
    w[8] = 1;
    assert_eq!(run(&d, &w, Some(&[0xee; 512])).status, 0);
    assert_eq!(lba_status(&d, 0, 24)[0].2, 0, "block 0 is mapped");
    let mut port = ScsiPort::new();
    let mut t = ScsiTask::new(&sanitize_cdb(0x02, false, false, 0), 0, 7);
    assert_eq!(start(&mut port, &d, &mut t, &[]), Some(Exec::Pending));
    let out = drain(&mut port);
    assert_eq!(out.len(), 1);
    complete(&mut t, out.into_iter().next().unwrap());
    assert_eq!(t.status, 0, "{:?}", asc(&t));
    assert_eq!(data(&read_one(&d, 0)), vec![0; 512]);
    // Every block deallocated, as GET LBA STATUS shows.
    let st = lba_status(&d, 0, 24);
    assert_eq!(
        (st[0].0, u64::from(st[0].1), st[0].2),
        (0, d.num_blocks(), 1)
    );
    assert_eq!(
        asc(&run(
            &d,
            &sanitize_cdb(0x02, false, false, 8),
            Some(&[0; 8])
        )),
        (5, 0x24, 0)
    );
    // Block Device Characteristics: WABEREQ 01b, reads after a block erase succeed; none
    // where BLOCK ERASE is not served (a RAM disk cannot show what it deallocated).
    let bdc = run(&d, &[INQUIRY, 1, 0xb1, 0, 64, 0], None);
    assert_eq!(data(&bdc)[7] >> 6, 1);
    assert_eq!(
        data(&run(&thin(), &[INQUIRY, 1, 0xb1, 0, 64, 0], None))[7] >> 6,
        0
    );
    assert_eq!(
        asc(&run(&thin(), &sanitize_cdb(0x02, false, false, 0), None)),
        (5, 0x24, 0)
    );
    // Not on a write-protected medium.
    d.set_attr("swp", "1").unwrap();
    assert_eq!(
        asc(&run(&d, &sanitize_cdb(0x02, false, false, 0), None)),
        (7, 0x27, 0)
    );
}

#[test]
fn a_failed_sanitize_leaves_the_medium_in_failure_mode() {
    let d = dev();
    d.set_attr("fault_inject", "eio_write").unwrap();
    let t = run(
        &d,
        &sanitize_cdb(0x01, false, false, 5),
        Some(&overwrite_list(&[7])),
    );
    assert_eq!(asc(&t), (3, 0x31, 0x03));
    d.set_attr("fault_inject", "none").unwrap();
    // Media access fails; INQUIRY does not; neither EXIT FAILURE MODE nor a sanitize asking
    // for the unrestricted mode may end a restricted failure.
    assert_eq!(asc(&read_one(&d, 0)), (3, 0x31, 0x03));
    assert_eq!(run(&d, &[INQUIRY, 0, 0, 0, 96, 0], None).status, 0);
    assert_eq!(
        asc(&run(&d, &sanitize_cdb(0x1f, false, false, 0), None)),
        (5, 0x24, 0)
    );
    assert_eq!(
        asc(&run(
            &d,
            &sanitize_cdb(0x01, false, true, 5),
            Some(&overwrite_list(&[7]))
        )),
        (5, 0x24, 0)
    );
    // A sanitize that succeeds ends it.
    assert_eq!(
        run(
            &d,
            &sanitize_cdb(0x01, false, false, 5),
            Some(&overwrite_list(&[7]))
        )
        .status,
        0
    );
    assert_eq!(data(&read_one(&d, 0)), vec![7; 512]);
    // With AUSE, EXIT FAILURE MODE ends a failure.
    d.set_attr("fault_inject", "eio_write").unwrap();
    let t = run(
        &d,
        &sanitize_cdb(0x01, false, true, 5),
        Some(&overwrite_list(&[9])),
    );
    assert_eq!(asc(&t), (3, 0x31, 0x03));
    d.set_attr("fault_inject", "none").unwrap();
    assert_eq!(
        run(&d, &sanitize_cdb(0x1f, false, false, 0), None).status,
        0
    );
    assert_eq!(read_one(&d, 0).status, 0);
    // With nothing failed, EXIT FAILURE MODE has nothing to do.
    assert_eq!(
        run(&d, &sanitize_cdb(0x1f, false, false, 0), None).status,
        0
    );
}

#[test]
fn an_aborted_sanitize_goes_on_without_its_task() {
    let d = dev();
    let mut port = ScsiPort::new();
    let mut t = ScsiTask::new(&sanitize_cdb(0x01, false, false, 5), 0, 7);
    t.tag = 42;
    assert_eq!(
        start(&mut port, &d, &mut t, &overwrite_list(&[0x3c])),
        Some(Exec::Pending)
    );
    port.abort(42);
    let out = drain(&mut port);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag(), 42);
    let mut t2 = ScsiTask::new(&sanitize_cdb(0x01, false, false, 5), 0, 7);
    complete(&mut t2, out.into_iter().next().unwrap());
    assert_eq!(t2.status, STATUS_TASK_ABORTED);
    // The operation finished all the same.
    assert_eq!(data(&read_one(&d, 0)), vec![0x3c; 512]);
}

/// Every emulated command (SPC, SBC, MMC, and the ALUA ones of a disk in an explicit device
/// group) ends with an answer, never a panic, whatever its CDB and parameter list.
mod any_cdb {
    use super::*;
    use crate::scsi::alua::{AccessState, AluaGroup, PortGroupState, TargetPortGroup};
    use crate::scsi::cdb::cdb_len_of;
    use crate::scsi::command::Run;
    use proptest::prelude::*;

    fn grouped() -> Arc<Device> {
        let d = dev();
        d.set_attr("expl_alua", "1").unwrap();
        d.alua().set(Some(Arc::new(AluaGroup {
            groups: vec![TargetPortGroup {
                id: 1,
                preferred: false,
                state: PortGroupState::new(AccessState::ActiveOptimized),
                ports: vec![1],
            }],
            devices: Vec::new(),
        })));
        d
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn emulated_commands_answer(
            cdb in proptest::collection::vec(any::<u8>(), 16),
            data in proptest::collection::vec(any::<u8>(), 0..300),
            small in any::<bool>(),
        ) {
            let devices = [grouped(), Device::create("vcdrom", "c0", &[]).unwrap()];
            let emulated = COMMANDS.iter().filter(|c| matches!(c.run, Run::Emulate(_)));
            for d in &devices {
                for c in emulated.clone() {
                    let len = cdb_len_of(c.op);
                    let mut cdb = cdb.clone();
                    cdb[0] = c.op;
                    if let Some(sa) = c.sa {
                        cdb[1] = cdb[1] & 0xe0 | sa;
                    }
                    // No NACA, which every command refuses before its decode step.
                    cdb[len - 1] &= !0x04;
                    // Lengths and codes near zero as often as anywhere.
                    if small {
                        cdb[2..len - 1].iter_mut().for_each(|b| *b &= 0x1f);
                    }
                    let t = run(d, &cdb[..len], Some(&data));
                    prop_assert!(t.status == STATUS_GOOD || t.sense_len() > 0, "{}", c.name);
                }
            }
        }
    }
}

/// EXTENDED COPY and RECEIVE COPY RESULTS through the port.
mod extended_copy {
    use super::*;
    use crate::scsi::spc::xcopy::{self, CopyScope, CopyState};

    fn disk(name: &str, mb: u32) -> Arc<Device> {
        let p = [("size_mb".to_string(), mb.to_string())];
        Device::create("vdisk_ramio", name, &p).unwrap()
    }

    fn cscd(d: &Device) -> Vec<u8> {
        let naa = d.ident().naa_id;
        let mut c = vec![0u8; 32];
        c[0] = xcopy::CSCD_IDENTIFICATION;
        (c[4], c[5], c[7]) = (0x01, 0x03, naa.len() as u8);
        c[8..8 + naa.len()].copy_from_slice(&naa);
        c[29..32].copy_from_slice(&d.block_size().to_be_bytes()[1..]);
        c
    }

    /// A parameter list with LIST ID USAGE 00b: CSCDs naming `cscds`, and block to block
    /// segments (source index, destination index, blocks, source LBA, destination LBA).
    fn list(list_id: u8, cscds: &[&Arc<Device>], segs: &[(u16, u16, u16, u64, u64)]) -> Vec<u8> {
        let mut v = vec![0u8; 16];
        v[0] = list_id;
        v[2..4].copy_from_slice(&((cscds.len() * 32) as u16).to_be_bytes());
        v[8..12].copy_from_slice(&((segs.len() * 28) as u32).to_be_bytes());
        for d in cscds {
            v.extend_from_slice(&cscd(d));
        }
        for &(s, d, n, sl, dl) in segs {
            let mut x = [0u8; 28];
            x[0] = xcopy::SEGMENT_BLOCK_TO_BLOCK;
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
        c[0] = xcopy::EXTENDED_COPY;
        c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
        c
    }

    fn scope(luns: &[&Arc<Device>]) -> Box<CopyScope> {
        CopyScope::new(&test_nexus(), luns.iter().map(|&d| (d, false)))
    }

    /// Starts an EXTENDED COPY sent to `d` with `luns` in its scope, on `port`.
    fn start_copy(
        port: &mut ScsiPort,
        d: &Arc<Device>,
        luns: &[&Arc<Device>],
        data: &[u8],
        tag: u64,
    ) -> (ScsiTask, Exec) {
        let mut t = ScsiTask::new(&xcopy_cdb(data.len()), 0, 7);
        t.tag = tag;
        plan(d, &mut t, &test_nexus()).unwrap();
        assert!(xcopy::wants_scope(&t));
        t.copy_scope = Some(scope(luns));
        let mut b = DataBuf::alloc(data.len()).unwrap();
        b.write_at(0, data);
        t.buf = Some(b);
        let e = port.execute(d, &mut t);
        (t, e)
    }

    fn copy(d: &Arc<Device>, luns: &[&Arc<Device>], data: &[u8]) -> ScsiTask {
        let mut port = ScsiPort::new();
        let (mut t, e) = start_copy(&mut port, d, luns, data, 1);
        if e == Exec::Pending {
            let out = drain(&mut port);
            assert_eq!(out.len(), 1);
            complete(&mut t, out.into_iter().next().unwrap());
        }
        t
    }

    /// Writes blocks `lba..lba + n`, each filled with its own number (as two bytes).
    fn number_blocks(d: &Arc<Device>, lba: u32, n: u32) {
        for start in (lba..lba + n).step_by(256) {
            let count = (lba + n - start).min(256);
            let mut v = Vec::with_capacity(count as usize * 512);
            for b in start..start + count {
                for _ in 0..256 {
                    v.extend_from_slice(&(b as u16).to_be_bytes());
                }
            }
            let mut c = [WRITE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[2..6].copy_from_slice(&start.to_be_bytes());
            c[7..9].copy_from_slice(&(count as u16).to_be_bytes());
            assert_eq!(run(d, &c, Some(&v)).status, 0);
        }
    }

    /// The number block `lba` holds (it must hold one number throughout).
    fn number_of(d: &Arc<Device>, lba: u32) -> u16 {
        let v = data(&read_one(d, lba));
        let n = u16::from_be_bytes([v[0], v[1]]);
        assert!(
            v.chunks(2).all(|x| x == n.to_be_bytes()),
            "block {lba} is one number"
        );
        n
    }

    fn status(d: &Arc<Device>, list_id: u8) -> ScsiTask {
        let mut c = [0u8; 16];
        c[0] = xcopy::RECEIVE_COPY_RESULTS;
        c[2] = list_id;
        c[13] = 64;
        run(d, &c, None)
    }

    #[test]
    fn copies_between_devices_and_within_one() {
        let a = disk("xa", 4);
        let b = disk("xb", 1);
        number_blocks(&a, 0, 8192);
        // 10 blocks of A to B, then the status of the copy.
        let t = copy(&a, &[&a, &b], &list(3, &[&a, &b], &[(0, 1, 10, 20, 100)]));
        assert_eq!(t.status, STATUS_GOOD);
        for i in 0..10 {
            assert_eq!(number_of(&b, 100 + i), 20 + i as u16);
        }
        assert_eq!(data(&read_one(&b, 110)), vec![0; 512]);
        let s = status(&a, 3);
        assert_eq!(s.status, 0);
        // Done, one segment, 5120 bytes.
        assert_eq!(data(&s), [0, 0, 0, 8, 1, 0, 1, 0, 0, 0, 0x14, 0]);
        // Within A, two chunks up over themselves, then down: each block read before it is
        // overwritten, whichever way the ranges overlap.
        let t = copy(&a, &[&a], &list(4, &[&a], &[(0, 0, 4096, 0, 100)]));
        assert_eq!(t.status, STATUS_GOOD);
        for i in [0u32, 1, 99, 100, 2047, 2048, 2148, 4095] {
            assert_eq!(number_of(&a, 100 + i), i as u16, "block {}", 100 + i);
        }
        let t = copy(&a, &[&a], &list(5, &[&a], &[(0, 0, 4096, 100, 50)]));
        assert_eq!(t.status, STATUS_GOOD);
        for i in [0u32, 1, 50, 2047, 2048, 4095] {
            assert_eq!(number_of(&a, 50 + i), i as u16, "block {}", 50 + i);
        }
        // The CSCD ID FFFFh: the device the command was sent to.
        let t = copy(&b, &[&a, &b], &list(6, &[&a], &[(0, 0xffff, 1, 7000, 0)]));
        assert_eq!(t.status, STATUS_GOOD);
        assert_eq!(number_of(&b, 0), 7000);
        // No parameter list: nothing to do, GOOD.
        let mut t = ScsiTask::new(&xcopy_cdb(0), 0, 7);
        assert_eq!(plan(&a, &mut t, &test_nexus()), Ok(Plan::NONE));
        assert_eq!(ScsiPort::new().execute(&a, &mut t), Exec::Done);
        assert_eq!(t.status, STATUS_GOOD);
    }

    #[test]
    fn a_copy_past_the_end_fails_and_its_status_says_so() {
        let a = disk("xa", 1);
        let n = a.num_blocks();
        let t = copy(
            &a,
            &[&a],
            &list(1, &[&a], &[(0, 0, 1, 0, 0), (0, 0, 16, 0, n - 8)]),
        );
        assert_eq!(asc(&t), (sense::COPY_ABORTED, 0, 0));
        // Segment 1 in COMMAND-SPECIFIC INFORMATION.
        assert_eq!(&t.sense()[8..12], &[0, 0, 0, 1]);
        // The status of list 1: done with errors; FAILED SEGMENT DETAILS has the sense.
        assert_eq!(data(&status(&a, 1))[4], 2);
        let mut c = [0u8; 16];
        c[0] = xcopy::RECEIVE_COPY_RESULTS;
        (c[1], c[2], c[13]) = (xcopy::SA_FAILED_SEGMENT_DETAILS, 1, 255);
        let f = data(&run(&a, &c, None));
        assert_eq!(f[56], STATUS_CHECK_CONDITION);
        assert_eq!(be16(&f[58..60]), 18);
        assert_eq!(&f[60..], t.sense());
        // An unknown list identifier.
        assert_eq!(asc(&status(&a, 9)), (sense::ILLEGAL_REQUEST, 0x24, 0));
    }

    #[test]
    fn a_backend_error_aborts_the_copy() {
        let a = disk("xa", 1);
        let b = disk("xb", 1);
        b.set_attr("fault_inject", "eio_write").unwrap();
        let t = copy(&a, &[&a, &b], &list(2, &[&a, &b], &[(0, 1, 8, 0, 0)]));
        assert_eq!(asc(&t), (sense::COPY_ABORTED, 0x0d, 0x01));
        let rec = a.copies().get(7, 2).unwrap();
        assert_eq!(
            (rec.state, rec.segments, rec.bytes),
            (CopyState::Failed, 1, 0)
        );
    }

    #[test]
    fn an_aborted_copy_stops() {
        let a = disk("xa", 8);
        number_blocks(&a, 0, 16);
        let mut port = ScsiPort::new();
        // 8 MiB in 1 MiB chunks: aborted while its first read is in flight.
        let half = disk("xh", 16);
        number_blocks(&half, 0, 16);
        let l = list(1, &[&half], &[(0, 0, 16384, 0, 16384)]);
        let (mut t, e) = start_copy(&mut port, &half, &[&half], &l, 77);
        assert_eq!(e, Exec::Pending);
        assert!(port.inflight() > 0);
        port.abort(77);
        let out = drain(&mut port);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag(), 77);
        complete(&mut t, out.into_iter().next().unwrap());
        assert_eq!(t.status, STATUS_TASK_ABORTED);
        assert_eq!(port.inflight(), 0);
        // Stopped after at most the chunk in flight: the last block was never written.
        assert_eq!(data(&read_one(&half, 32767)), vec![0; 512]);
        let rec = half.copies().get(7, 1).unwrap();
        assert_eq!(
            (rec.state, rec.status),
            (CopyState::Failed, STATUS_TASK_ABORTED)
        );
        // The list identifier is free again.
        let t = copy(&a, &[&a], &list(1, &[&a], &[(0, 0, 1, 0, 100)]));
        assert_eq!(t.status, STATUS_GOOD);
        assert_eq!(number_of(&a, 100), 0);
    }

    #[test]
    fn a_running_list_identifier_is_refused() {
        let a = disk("xa", 8);
        let mut port = ScsiPort::new();
        let l = list(4, &[&a], &[(0, 0, 8192, 0, 8192)]);
        let (_, e) = start_copy(&mut port, &a, &[&a], &l, 1);
        assert_eq!(e, Exec::Pending);
        // In progress: COPY STATUS says so; the same list identifier is refused meanwhile.
        let s = data(&status(&a, 4));
        assert_eq!(s[4], 0);
        assert_eq!(be16(&s[5..7]), 1);
        let (t, e) = start_copy(&mut port, &a, &[&a], &l, 2);
        assert_eq!(e, Exec::Done);
        assert_eq!(asc(&t), (sense::ILLEGAL_REQUEST, 0x00, 0x16));
        let out = drain(&mut port);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag(), 1);
        // Done: 4 MiB written.
        let s = data(&status(&a, 4));
        assert_eq!((s[4], s[7], be32(&s[8..12])), (1, 0, 4 << 20));
    }
}

/// The Extended INQUIRY Data VPD page (SPC-4 §7.8.7) of a file device with the given options.
fn extended_inquiry_of(opts: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut attrs = vec![("filename".to_string(), path.to_str().unwrap().to_string())];
    attrs.extend(opts.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let d = Device::create("vdisk_fileio", "x0", &attrs).unwrap();
    data(&run(&d, &[INQUIRY, 1, 0x86, 0, 255, 0], None))
}

#[test]
fn extended_inquiry_page_reports_task_attributes_and_caches() {
    // A RAM disk: no cache to speak of.
    let p = data(&run(&dev(), &[INQUIRY, 1, 0x86, 0, 255, 0], None));
    assert_eq!(p.len(), 64);
    assert_eq!(&p[..4], &[0x00, 0x86, 0x00, 0x3c]);
    assert_eq!(
        p[4], 0,
        "no protection information (SPT, GRD_CHK, APP_CHK, REF_CHK)"
    );
    assert_eq!(p[5], 0x07, "HEADSUP, ORDSUP, SIMPSUP");
    assert_eq!(p[6], 0, "neither NV_SUP nor V_SUP");
    assert_eq!(p[7], 0x01, "LUICLR");
    assert!(p[8..].iter().all(|&b| b == 0), "{p:?}");
    // A file with a volatile write cache, and one whose cache is declared non-volatile.
    assert_eq!(extended_inquiry_of(&[])[6], 0x01, "V_SUP");
    assert_eq!(extended_inquiry_of(&[("nv_cache", "1")])[6], 0x02, "NV_SUP");
    // The allocation length truncates it like any page.
    let t = run(&dev(), &[INQUIRY, 1, 0x86, 0, 6, 0], None);
    assert_eq!(data(&t), vec![0x00, 0x86, 0x00, 0x3c, 0, 0x07]);
}

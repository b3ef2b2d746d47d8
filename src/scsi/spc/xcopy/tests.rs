use super::*;
use crate::scsi::pr::test_nexus;

fn disk(name: &str, block_size: &str) -> Arc<Device> {
    let p = [
        ("size_mb".to_string(), "1".to_string()),
        ("blocksize".to_string(), block_size.to_string()),
    ];
    Device::create("vdisk_ramio", name, &p).unwrap()
}

/// An identification descriptor CSCD naming `d` by its NAA designator.
fn cscd(d: &Device) -> [u8; 32] {
    let mut c = [0u8; 32];
    c[0] = CSCD_IDENTIFICATION;
    let naa = d.ident().naa_id;
    c[4] = 0x01;
    c[5] = 0x03;
    c[7] = naa.len() as u8;
    c[8..8 + naa.len()].copy_from_slice(&naa);
    c[29..32].copy_from_slice(&d.block_size().to_be_bytes()[1..]);
    c
}

fn segment(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> [u8; 28] {
    let mut s = [0u8; 28];
    s[0] = SEGMENT_BLOCK_TO_BLOCK;
    s[2..4].copy_from_slice(&0x18u16.to_be_bytes());
    s[4..6].copy_from_slice(&src.to_be_bytes());
    s[6..8].copy_from_slice(&dst.to_be_bytes());
    s[10..12].copy_from_slice(&blocks.to_be_bytes());
    s[12..20].copy_from_slice(&src_lba.to_be_bytes());
    s[20..28].copy_from_slice(&dst_lba.to_be_bytes());
    s
}

/// A parameter list: the header (list identifier, LIST ID USAGE) and the descriptors.
fn list(list_id: u8, usage: u8, cscds: &[[u8; 32]], segs: &[[u8; 28]]) -> Vec<u8> {
    let mut v = vec![0u8; 16];
    v[0] = list_id;
    v[1] = usage << 3;
    v[2..4].copy_from_slice(&((cscds.len() * 32) as u16).to_be_bytes());
    v[8..12].copy_from_slice(&((segs.len() * 28) as u32).to_be_bytes());
    for c in cscds {
        v.extend_from_slice(c);
    }
    for s in segs {
        v.extend_from_slice(s);
    }
    v
}

fn code(s: &Sense) -> (u8, u8, u8) {
    (s.key, s.asc, s.ascq)
}

const ILLEGAL: u8 = sense::ILLEGAL_REQUEST;

#[test]
fn a_well_formed_list_parses() {
    let d = disk("a", "512");
    let l = parse(&list(7, 0, &[cscd(&d)], &[segment(0, 0, 16, 1, 100)])).unwrap();
    assert_eq!((l.list_id, l.usage), (7, ListIdUsage::Hold));
    assert_eq!(l.cscds.len(), 1);
    assert_eq!(l.cscds[0].designator, d.ident().naa_id);
    assert_eq!(l.cscds[0].block_size, 512);
    let s = l.segments[0];
    assert_eq!(
        (s.src, s.dst, s.blocks, s.src_lba, s.dst_lba, s.dc),
        (0, 0, 16, 1, 100, false)
    );
    assert_eq!(s.offset, 48);
    // Neither descriptor list is needed: an empty copy.
    let l = parse(&list(0, 3, &[], &[])).unwrap();
    assert_eq!(l.usage, ListIdUsage::None);
    assert!(l.cscds.is_empty() && l.segments.is_empty());
    // LU ID TYPE, NUL and RELATIVE INITIATOR PORT IDENTIFIER are ignored.
    let mut c = cscd(&d);
    c[1] = 0xe0;
    c[2] = 0x12;
    assert!(parse(&list(1, 2, &[c], &[])).is_ok());
}

#[test]
fn the_header_is_checked() {
    let d = disk("a", "512");
    let plle = (ILLEGAL, 0x1a, 0x00);
    let good = list(1, 0, &[cscd(&d)], &[segment(0, 0, 1, 0, 1)]);
    for n in [1, 15, 16 + 31, good.len() - 1] {
        assert_eq!(code(&parse(&good[..n]).unwrap_err()), plle, "{n} bytes");
    }
    // LIST ID USAGE 01b is reserved; 11b takes no list identifier.
    let mut l = good.clone();
    l[1] = 0x08;
    assert_eq!(parse(&l).unwrap_err(), Sense::invalid_param_bit(1, 4));
    l[1] = 0x18;
    assert_eq!(parse(&l).unwrap_err(), Sense::invalid_param_field(0));
    // No inline data.
    let mut l = good.clone();
    l[15] = 4;
    l.extend_from_slice(&[0; 4]);
    assert_eq!(parse(&l).unwrap_err(), Sense::invalid_param_field(12));
    // The descriptor lists together longer than MAXIMUM DESCRIPTOR LIST LENGTH.
    let mut l = good.clone();
    l[8..12].copy_from_slice(&(MAX_DESCRIPTOR_LIST_LEN - 31).to_be_bytes());
    l.resize(16 + MAX_DESCRIPTOR_LIST_LEN as usize + 1, 0);
    assert_eq!(code(&parse(&l).unwrap_err()), plle);
    // Lengths that overflow when added.
    let mut l = good;
    l[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(code(&parse(&l).unwrap_err()), plle);
}

#[test]
fn cscd_descriptors_are_checked() {
    let d = disk("a", "512");
    let seg = [segment(0, 0, 1, 0, 1)];
    // Another descriptor type (Fibre Channel N_Port_Name): its type byte pointed at.
    let mut c = cscd(&d);
    c[0] = 0xe0;
    let s = parse(&list(1, 0, &[c], &seg)).unwrap_err();
    assert_eq!(code(&s), (ILLEGAL, 0x26, 0x07));
    assert_eq!(s.field_pointer, Some((false, 16, None)));
    // One more than the most.
    let many = vec![cscd(&d); usize::from(MAX_CSCD_DESCRIPTORS) + 1];
    let s = parse(&list(1, 0, &many, &seg)).unwrap_err();
    assert_eq!(code(&s), (ILLEGAL, 0x26, 0x06));
    assert!(parse(&list(1, 0, &many[1..], &seg)).is_ok());
    // A peripheral device type other than a block device's.
    let mut c = cscd(&d);
    c[1] = 0x01;
    assert_eq!(
        parse(&list(1, 0, &[c], &seg)).unwrap_err(),
        Sense::invalid_param_bit(17, 4)
    );
    // A designator longer than the 20 bytes there is room for.
    let mut c = cscd(&d);
    c[7] = 21;
    assert_eq!(
        parse(&list(1, 0, &[c], &seg)).unwrap_err(),
        Sense::invalid_param_field(23)
    );
    // A CSCD list that ends inside a descriptor.
    let mut l = list(1, 0, &[cscd(&d)], &[]);
    l[2..4].copy_from_slice(&16u16.to_be_bytes());
    l.truncate(32);
    assert_eq!(parse(&l).unwrap_err(), Sense::invalid_param_field(2));
}

#[test]
fn segment_descriptors_are_checked() {
    let d = disk("a", "512");
    let c = [cscd(&d)];
    // Stream to stream (03h) is not served: its type byte pointed at.
    let mut s = segment(0, 0, 1, 0, 1);
    s[0] = 0x03;
    let e = parse(&list(1, 0, &c, &[s])).unwrap_err();
    assert_eq!(code(&e), (ILLEGAL, 0x26, 0x09));
    assert_eq!(e.field_pointer, Some((false, 48, None)));
    let many = vec![segment(0, 0, 1, 0, 1); usize::from(MAX_SEGMENT_DESCRIPTORS) + 1];
    let e = parse(&list(1, 0, &c, &many)).unwrap_err();
    assert_eq!(code(&e), (ILLEGAL, 0x26, 0x08));
    assert!(parse(&list(1, 0, &c, &many[1..])).is_ok());
    // The DESCRIPTOR LENGTH of a block to block segment is 18h.
    let mut s = segment(0, 0, 1, 0, 1);
    s[3] = 0x1c;
    assert_eq!(
        parse(&list(1, 0, &c, &[s])).unwrap_err(),
        Sense::invalid_param_field(50)
    );
    // A segment list that ends inside a descriptor.
    let mut l = list(1, 0, &c, &[segment(0, 0, 1, 0, 1)]);
    l[8..12].copy_from_slice(&20u32.to_be_bytes());
    l.truncate(16 + 32 + 20);
    assert_eq!(parse(&l).unwrap_err(), Sense::invalid_param_field(8));
}

fn scope(luns: &[(&Arc<Device>, bool)]) -> CopyScope {
    *CopyScope::new(&test_nexus(), luns.iter().map(|&(d, ro)| (d, ro)))
}

#[test]
fn cscds_resolve_to_the_logical_units_of_the_scope() {
    let a = disk("a", "512");
    let b = disk("b", "512");
    let big = disk("big", "4096");
    let sc = scope(&[(&a, false), (&b, false), (&big, false)]);
    let l = parse(&list(
        1,
        0,
        &[cscd(&a), cscd(&b)],
        &[segment(0, 1, 8, 2, 3)],
    ))
    .unwrap();
    let segs = resolve(&l, &a, false, Some(&sc)).unwrap();
    assert!(Arc::ptr_eq(&segs[0].src, &a) && Arc::ptr_eq(&segs[0].dst, &b));
    assert_eq!(
        (segs[0].src_off, segs[0].dst_off, segs[0].len),
        (1024, 1536, 4096)
    );
    assert!(!segs[0].backward);
    // Without a scope only the logical unit the command was sent to is reachable.
    let e = resolve(&l, &a, false, None).unwrap_err().unwrap();
    assert_eq!(code(&e), (sense::COPY_ABORTED, 0x0d, 0x02));
    // The CSCD ID FFFFh is that logical unit; an index past the list names nothing.
    let l = parse(&list(1, 0, &[cscd(&b)], &[segment(0xffff, 0, 1, 0, 0)])).unwrap();
    let segs = resolve(&l, &a, false, Some(&sc)).unwrap();
    assert!(Arc::ptr_eq(&segs[0].src, &a) && Arc::ptr_eq(&segs[0].dst, &b));
    let l = parse(&list(
        1,
        0,
        &[cscd(&b)],
        &[segment(0, 0, 1, 0, 0), segment(0, 1, 1, 0, 0)],
    ))
    .unwrap();
    let e = resolve(&l, &a, false, Some(&sc)).unwrap_err().unwrap();
    assert_eq!(code(&e), (sense::COPY_ABORTED, 0x0d, 0x02));
    // The segment number in COMMAND-SPECIFIC INFORMATION bytes 10-11.
    assert_eq!(e.command_specific, Some(1));
    assert_eq!(&e.to_fixed()[8..12], &[0, 0, 0, 1]);
    // A block size other than the device's.
    let mut c = cscd(&b);
    c[29..32].copy_from_slice(&[0, 0x10, 0]);
    let l = parse(&list(1, 0, &[c], &[segment(0, 0, 1, 0, 1)])).unwrap();
    let e = resolve(&l, &a, false, Some(&sc)).unwrap_err().unwrap();
    assert_eq!(e, Sense::invalid_param_field(16 + 29));
    // Between block sizes: whole blocks of both (DC says whose the count is).
    let l = parse(&list(
        1,
        0,
        &[cscd(&a), cscd(&big)],
        &[segment(0, 1, 8, 0, 1)],
    ))
    .unwrap();
    assert_eq!(resolve(&l, &a, false, Some(&sc)).unwrap()[0].len, 4096);
    let l = parse(&list(
        1,
        0,
        &[cscd(&a), cscd(&big)],
        &[segment(0, 1, 4, 0, 1)],
    ))
    .unwrap();
    let e = resolve(&l, &a, false, Some(&sc)).unwrap_err().unwrap();
    assert_eq!(e, Sense::invalid_param_field(16 + 64 + 10));
    let mut s = segment(0, 1, 1, 0, 1);
    s[1] = 0x02;
    let l = parse(&list(1, 0, &[cscd(&a), cscd(&big)], &[s])).unwrap();
    assert_eq!(resolve(&l, &a, false, Some(&sc)).unwrap()[0].len, 4096);
}

#[test]
fn a_cd_is_no_copy_target() {
    let a = disk("a", "512");
    let cd = Device::create("vcdrom", "cd", &[]).unwrap();
    let mut c = cscd(&cd);
    c[29..32].copy_from_slice(&cd.block_size().to_be_bytes()[1..]);
    let sc = scope(&[(&a, false), (&cd, false)]);
    let l = parse(&list(1, 0, &[c], &[segment(0, 0xffff, 1, 0, 0)])).unwrap();
    let e = resolve(&l, &a, false, Some(&sc)).unwrap_err().unwrap();
    assert_eq!(code(&e), (sense::COPY_ABORTED, 0x0d, 0x03));
}

#[test]
fn segments_stay_on_their_devices() {
    let a = disk("a", "512");
    let n = a.num_blocks();
    let sc = scope(&[(&a, false)]);
    let c = [cscd(&a)];
    for (src, dst) in [(n - 1, 0), (0, n - 1), (u64::MAX, 0), (0, u64::MAX / 512)] {
        let l = parse(&list(1, 0, &c, &[segment(0, 0, 2, src, dst)])).unwrap();
        let e = resolve(&l, &a, false, Some(&sc)).unwrap_err().unwrap();
        assert_eq!(code(&e), (sense::COPY_ABORTED, 0, 0), "{src} -> {dst}");
        assert_eq!(e.command_specific, Some(0));
    }
    // To the last block exactly.
    let l = parse(&list(1, 0, &c, &[segment(0, 0, 2, 0, n - 2)])).unwrap();
    assert!(resolve(&l, &a, false, Some(&sc)).is_ok());
    // An overlap with the destination above the source is copied from its end.
    let l = parse(&list(
        1,
        0,
        &c,
        &[segment(0, 0, 100, 0, 50), segment(0, 0, 100, 50, 0)],
    ))
    .unwrap();
    let segs = resolve(&l, &a, false, Some(&sc)).unwrap();
    assert!(segs[0].backward);
    assert!(!segs[1].backward);
}

#[test]
fn destinations_must_be_writable_and_unreserved_by_others() {
    let a = disk("a", "512");
    let b = disk("b", "512");
    let l = parse(&list(
        1,
        0,
        &[cscd(&a), cscd(&b)],
        &[segment(0, 1, 1, 0, 0)],
    ))
    .unwrap();
    // Mapped read-only to the nexus: DATA PROTECT, as a WRITE would get.
    let sc = scope(&[(&a, false), (&b, true)]);
    let e = resolve(&l, &a, false, Some(&sc)).unwrap_err().unwrap();
    assert_eq!(code(&e), (sense::DATA_PROTECT, 0x27, 0x00));
    // Reading from a read-only LUN is fine.
    let l2 = parse(&list(
        1,
        0,
        &[cscd(&a), cscd(&b)],
        &[segment(1, 0, 1, 0, 0)],
    ))
    .unwrap();
    assert!(resolve(&l2, &a, false, Some(&sc)).is_ok());
    // Another nexus holds a Write Exclusive reservation on the destination.
    let other = Nexus::new("iqn.2026-01.test:other", [0x40, 0, 0, 0, 0, 9], 1);
    let mut param = [0u8; 24];
    param[15] = 1;
    let reg = b.reservations().persistent_reserve_out(
        &other,
        &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &param,
    );
    assert_eq!(reg.status, crate::scsi::pr::Status::Good);
    param[7] = 1;
    let res = b.reservations().persistent_reserve_out(
        &other,
        &[0x5f, 1, 0x01, 0, 0, 0, 0, 0, 24, 0],
        &param,
    );
    assert_eq!(res.status, crate::scsi::pr::Status::Good);
    let sc = scope(&[(&a, false), (&b, false)]);
    assert_eq!(resolve(&l, &a, false, Some(&sc)).err(), Some(None));
    // Reading from it is allowed under Write Exclusive.
    assert!(resolve(&l2, &a, false, Some(&sc)).is_ok());
}

#[test]
fn the_table_of_identified_copies() {
    let t = CopyTable::default();
    t.begin(1, 5).unwrap();
    // The same identifier of the same nexus while it runs; another nexus may use it.
    assert_eq!(code(&t.begin(1, 5).unwrap_err()), (ILLEGAL, 0x00, 0x16));
    t.begin(2, 5).unwrap();
    t.progress(1, 5, 3, 4096);
    let r = t.get(1, 5).unwrap();
    assert_eq!(
        (r.state, r.segments, r.bytes),
        (CopyState::Running, 3, 4096)
    );
    t.end(1, 5, 2, &[0x70, 0, 0x0a]);
    let r = t.get(1, 5).unwrap();
    assert_eq!(
        (r.state, r.status, r.sense.as_slice()),
        (CopyState::Failed, 2, &[0x70, 0, 0x0a][..])
    );
    // Once it ended the identifier is free again.
    t.begin(1, 5).unwrap();
    assert_eq!(t.get(1, 5).unwrap().state, CopyState::Running);
    // Bounded: with every record running, a new copy is refused; a done one makes room.
    let t = CopyTable::default();
    for i in 0..RECORDS {
        t.begin(9, i as u8).unwrap();
    }
    assert_eq!(code(&t.begin(9, 200).unwrap_err()), (ILLEGAL, 0x55, 0x03));
    t.end(9, 3, 0, &[]);
    t.begin(9, 200).unwrap();
    assert!(t.get(9, 3).is_none());
    assert_eq!(t.get(9, 200).unwrap().state, CopyState::Running);
}

/// The descriptors of a Third-party Copy VPD page body: (type, body).
fn descriptors(mut p: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    while !p.is_empty() {
        let kind = be16(&p[0..2]) as u16;
        let len = be16(&p[2..4]) as usize;
        assert_eq!(len % 4, 0, "descriptor {kind:#x} padded to four bytes");
        v.push((kind, p[4..4 + len].to_vec()));
        p = &p[4 + len..];
    }
    v
}

#[test]
fn the_vpd_page_agrees_with_the_operating_parameters() {
    let d = disk("a", "4096");
    let p = vpd_page(&d);
    let ds = descriptors(&p);
    let kinds: Vec<u16> = ds.iter().map(|d| d.0).collect();
    assert_eq!(kinds, [0x0001, 0x0004, 0x0008, 0x000c, 0x8001]);
    // Supported commands: EXTENDED COPY(LID1), and RECEIVE COPY RESULTS' service actions.
    let c = &ds[0].1;
    assert_eq!(&c[..9], &[8, 0x83, 1, 0, 0x84, 3, 0, 3, 4]);
    // Every command it lists is in the command table.
    for (op, sa) in [(0x83, 0), (0x84, 0), (0x84, 3), (0x84, 4)] {
        assert!(crate::scsi::command::find(op, sa).is_some());
    }
    let mut t = ScsiTask::new(
        &[
            RECEIVE_COPY_RESULTS,
            3,
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
            1,
            0,
            0,
            0,
        ],
        0,
        1,
    );
    t.buf = crate::env::DataBuf::alloc(256);
    operating_parameters(&d, &mut t);
    let mut op = vec![0u8; t.data_in_len as usize];
    t.buf.as_ref().unwrap().read_at(0, &mut op);
    assert_eq!(be32(&op[0..4]) as usize, op.len() - 4);
    let param = &ds[1].1;
    // Maximum CSCD and segment descriptor counts and descriptor list length.
    assert_eq!(&param[4..12], &op[8..16]);
    assert_eq!(be16(&op[8..10]), u32::from(MAX_CSCD_DESCRIPTORS));
    // The implemented descriptor type codes.
    assert_eq!(&op[44..], &ds[2].1[1..3]);
    assert_eq!(op[43], ds[2].1[0]);
    // General copy operations: concurrent copies and maximum segment length.
    let gco = &ds[4].1;
    assert_eq!(be32(&gco[8..12]), be32(&op[16..20]));
    assert_eq!(be32(&op[16..20]), 65535 * 4096);
    assert_eq!(be32(&gco[0..4]), be16(&op[34..36]));
    assert_eq!((gco[12], op[37]), (12, 12));
}

#[test]
fn the_extended_copy_cdb() {
    let d = disk("a", "512");
    let mut c = [0u8; 16];
    c[0] = EXTENDED_COPY;
    let mut t = ScsiTask::new(&c, 0, 1);
    assert_eq!(decode_extended_copy(&d, &mut t), Ok(Plan::NONE));
    c[13] = 60;
    let mut t = ScsiTask::new(&c, 0, 1);
    assert_eq!(
        decode_extended_copy(&d, &mut t).unwrap(),
        Plan {
            dir: DataDir::Out,
            len: 60
        }
    );
    c[4] = 1;
    let mut t = ScsiTask::new(&c, 0, 1);
    assert_eq!(
        decode_extended_copy(&d, &mut t),
        Err(Sense::invalid_cdb_field(4, None))
    );
    c[4] = 0;
    c[10] = 1;
    let mut t = ScsiTask::new(&c, 0, 1);
    let e = decode_extended_copy(&d, &mut t).unwrap_err();
    assert_eq!(code(&e), (ILLEGAL, 0x1a, 0));
}

mod any_list {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Any parameter list parses or is refused with ILLEGAL REQUEST, never a panic; what
        /// parses resolves or is refused too.
        #[test]
        fn parse_and_resolve_never_panic(
            head in proptest::collection::vec(any::<u8>(), 16),
            body in proptest::collection::vec(any::<u8>(), 0..400),
            cscds in 0usize..4,
            segs in 0usize..4,
        ) {
            let d = disk("p", "512");
            let mut l = head;
            // Lengths near what the body holds as often as anywhere.
            l[2..4].copy_from_slice(&((cscds * 32) as u16).to_be_bytes());
            l[8..12].copy_from_slice(&((segs * 28) as u32).to_be_bytes());
            l[12..16].fill(0);
            for i in 0..cscds {
                let mut c = cscd(&d);
                if let Some(&b) = body.get(i) {
                    c[(b % 32) as usize] ^= b;
                }
                l.extend_from_slice(&c);
            }
            l.extend_from_slice(&body);
            match parse(&l) {
                Ok(list) => {
                    let sc = scope(&[(&d, false)]);
                    if let Err(Some(s)) = resolve(&list, &d, false, Some(&sc)) {
                        prop_assert!(s.key != 0);
                    }
                }
                Err(s) => prop_assert_eq!(s.key, ILLEGAL),
            }
        }
    }
}

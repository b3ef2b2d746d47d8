//! CRC32C header and data digests against the real daemon with the crate's own initiator:
//! data integrity with both digests on, a header digest error that drops only its own
//! connection, and a data digest error on Data-Out handled as RFC 7143 §7.8 says for ERL 0
//! (Reject, then CHECK CONDITION once the data is in, and nothing written); a read's Data-In
//! whose digests hold while a write changes the RAM disk memory it was lent.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{Initiator, LoginOptions};

const BS: u32 = 512;

fn target() -> Target {
    let t = Target::with_default_luns(16);
    t.set(&format!("targets/iscsi/{IQN}/HeaderDigest"), "CRC32C,None");
    t.set(&format!("targets/iscsi/{IQN}/DataDigest"), "CRC32C,None");
    t
}

fn login(t: &Target, isid_last: u8, pairs: &[(&str, &str)]) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    let mut o = LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:digest-test".into(),
        target_name: Some(IQN.into()),
        keys: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    o.isid[5] = isid_last;
    ini.login(&o).unwrap();
    // A new nexus sees its unit attention first.
    for _ in 0..3 {
        if ini.test_unit_ready(0).unwrap().is_good() {
            return ini;
        }
    }
    panic!("TEST UNIT READY never answered GOOD");
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn both_digests_carry_data_intact() {
    let mut t = target();
    for (imm, r2t) in [("Yes", "No"), ("No", "Yes")] {
        let mut ini = login(
            &t,
            1,
            &[
                ("HeaderDigest", "CRC32C"),
                ("DataDigest", "CRC32C"),
                ("ImmediateData", imm),
                ("InitialR2T", r2t),
                ("MaxRecvDataSegmentLength", "8192"),
            ],
        );
        assert!(ini.negotiated().header_digest && ini.negotiated().data_digest);
        for (i, len) in [512usize, 4096, 65536, 1 << 20, 3 * 4096 + 512]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len, i as u8);
            let lba = 4096 * i as u64;
            ini.write10(0, lba as u32, &data, BS).unwrap();
            let back = ini
                .read10(0, lba as u32, (len as u32 / BS) as u16, BS)
                .unwrap();
            assert!(
                back == data,
                "{len} bytes read back differently (ImmediateData={imm})"
            );
        }
        ini.logout().unwrap();
    }
    assert!(t.alive());
}

#[test]
fn header_digest_error_drops_only_that_connection() {
    let mut t = target();
    let mut bad = login(&t, 1, &[("HeaderDigest", "CRC32C")]);
    let mut good = login(&t, 2, &[("HeaderDigest", "CRC32C")]);
    bad.corrupt_next_header_digest();
    let r = bad.test_unit_ready(0);
    assert!(
        r.is_err(),
        "a command with a bad header digest was answered: {r:?}"
    );
    // The other session goes on.
    let data = pattern(8192, 7);
    good.write10(0, 100, &data, BS).unwrap();
    assert_eq!(good.read10(0, 100, 16, BS).unwrap(), data);
    assert!(t.alive());
    assert!(t.log().contains("header digest error"), "{}", t.log());
    // And a new login works.
    let mut again = login(&t, 3, &[("HeaderDigest", "CRC32C")]);
    again.logout().unwrap();
}

#[test]
fn data_digest_error_on_data_out_fails_the_write_and_writes_nothing() {
    let t = target();
    for (imm, r2t) in [("Yes", "No"), ("No", "Yes")] {
        let mut ini = login(
            &t,
            1,
            &[
                ("DataDigest", "CRC32C"),
                ("ImmediateData", imm),
                ("InitialR2T", r2t),
            ],
        );
        let old = pattern(4096, 1);
        ini.write10(0, 200, &old, BS).unwrap();
        // The first data-carrying PDU of the write (immediate data or a Data-Out) is corrupt.
        ini.corrupt_next_data_digest();
        let new = pattern(4096, 2);
        let cdb = iscsi_tgt::initiator::cdb::write10(200, 8);
        let r = ini.scsi(0, &cdb, Some(&new), 4096, false).unwrap();
        assert_eq!(r.status, 2, "CHECK CONDITION expected: {r:?}");
        assert_eq!(r.sense_key(), Some(0x0b), "{r:?}");
        assert_eq!(r.asc_ascq(), Some((0x47, 0x05)), "{r:?}");
        assert_eq!(
            ini.digest_rejects, 1,
            "the PDU is rejected with reason 0x02"
        );
        // Nothing of the failed write reached the medium.
        assert_eq!(ini.read10(0, 200, 8, BS).unwrap(), old);
        // The session goes on.
        ini.write10(0, 200, &new, BS).unwrap();
        assert_eq!(ini.read10(0, 200, 8, BS).unwrap(), new);
        ini.logout().unwrap();
    }
}

#[test]
fn a_write_racing_a_read_of_the_same_blocks_never_breaks_the_read_s_data_digest() {
    // A RAM disk lends its memory to reads. An 8 MiB read whose initiator does not read its
    // socket stays mostly queued in the target; a write of the same blocks from another
    // session then changes the memory behind it. The read's data may be old or new (SAM
    // leaves it undefined), but every Data-In must match its data digest.
    let mut t = Target::with_default_luns(64);
    t.set(&format!("targets/iscsi/{IQN}/DataDigest"), "CRC32C,None");
    // The largest transfer the target takes; more than the two sockets' buffers hold.
    const LEN: usize = 8 << 20;
    const PIECE: usize = 1 << 20;
    let (lba, blocks) = (0u64, LEN as u32 / BS);
    let old = pattern(LEN, 3);
    let new = pattern(LEN, 200);
    let write = |ini: &mut Initiator, data: &[u8]| {
        for (i, piece) in data.chunks(PIECE).enumerate() {
            let at = lba + (i * PIECE) as u64 / u64::from(BS);
            ini.write16(0, at, piece, BS).unwrap();
        }
    };
    let mut writer = login(&t, 2, &[("DataDigest", "CRC32C")]);
    write(&mut writer, &old);
    let mut reader = login(&t, 1, &[("DataDigest", "CRC32C")]);
    assert!(reader.negotiated().data_digest);
    let cdb = iscsi_tgt::initiator::cdb::read16(lba, blocks);
    let itt = reader.submit(0, &cdb, None, blocks * BS, true).unwrap();
    // Long enough for the read to have completed in the backend and its Data-In to wait on
    // the full socket; if it has not, the write lands first and the read sees new data.
    std::thread::sleep(std::time::Duration::from_millis(500));
    write(&mut writer, &new);
    let r = reader
        .wait(itt)
        .expect("the read ends without a digest error");
    assert!(r.is_good(), "{r:?}");
    assert_eq!(r.data.len(), old.len());
    // Each 4 KiB block is wholly one or the other.
    for (i, (block, (o, n))) in r
        .data
        .chunks(4096)
        .zip(old.chunks(4096).zip(new.chunks(4096)))
        .enumerate()
    {
        assert!(block == o || block == n, "block {i} is neither old nor new");
    }
    assert!(t.alive());
}

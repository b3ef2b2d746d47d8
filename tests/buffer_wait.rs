//! An exhausted buffer pool makes commands wait, not fail: with the smallest pool (16 MiB,
//! 112 large chunks) four 8 MiB READs in flight cannot all have buffers at once, yet every
//! one completes with GOOD status and the wait shows in `sgv/waits`. The `sgv/` attributes
//! describe the pool.
mod common;

use common::{Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions};

const BS: u32 = 512;

#[test]
fn reads_wait_for_buffers_and_complete() {
    let t = Target::start(&["--cores", "0", "--mem-size", "16"]);
    t.configure_default(32);
    assert_eq!(t.get("sgv/chunk_size"), "131072");
    assert_eq!(t.get("sgv/chunks"), "112");
    assert_eq!(t.get("sgv/total_bytes"), (16 << 20).to_string());
    let huge = t.get("sgv/hugepages") == "1";
    assert_eq!(
        t.get("sgv/hugepage_bytes"),
        if huge {
            (16 << 20).to_string()
        } else {
            "0".into()
        }
    );

    let mut ini = Initiator::connect(t.addr).unwrap();
    ini.login(&LoginOptions {
        initiator_name: "iqn.2026-11.org.iscsi-tgt:wait-test".into(),
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    // POWER ON OCCURRED first.
    for _ in 0..4 {
        if ini.test_unit_ready(0).unwrap().is_good() {
            break;
        }
    }
    let len = 8u32 << 20;
    let blocks = len / BS;
    let mut itts = Vec::new();
    for _ in 0..4 {
        itts.push(
            ini.submit(0, &cdb::read16(0, blocks), None, len, true)
                .unwrap(),
        );
    }
    for itt in itts {
        let r = ini.wait(itt).unwrap();
        assert!(r.is_good(), "{r:?}\n{}", t.log());
        assert_eq!(r.data.len(), len as usize);
    }
    let waits: u64 = t.get("sgv/waits").parse().unwrap();
    assert!(waits >= 1, "no command waited for a buffer");
    let failures: u64 = t.get("sgv/alloc_failures").parse().unwrap();
    assert!(failures >= 1);
    assert_eq!(t.get("sgv/chunks_in_use"), "0");
    ini.logout().unwrap();
}

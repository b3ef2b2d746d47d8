//! An exhausted buffer pool makes commands wait, not fail: with the smallest pool (16 MiB,
//! 112 large chunks) four 8 MiB READs from two sessions cannot all have buffers at once, yet
//! every one completes with GOOD status and the wait shows in `sgv/waits`. The `sgv/` attributes
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

    // Two sessions: one session may hold only an eighth of the pool (at least one 8 MiB
    // transfer), so it takes two to exhaust the pool itself.
    let mut sessions = Vec::new();
    for n in 0..2u8 {
        let mut ini = Initiator::connect(t.addr).unwrap();
        ini.login(&LoginOptions {
            initiator_name: format!("iqn.2026-11.org.iscsi-tgt:wait-test-{n}"),
            target_name: Some(IQN.into()),
            isid: [0x80, 0, 0, 0, 0x20, n],
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
        // POWER ON OCCURRED first.
        for _ in 0..4 {
            if ini.test_unit_ready(0).unwrap().is_good() {
                break;
            }
        }
        sessions.push(ini);
    }
    let len = 8u32 << 20;
    let blocks = len / BS;
    // Each session reads its own answers on its own thread: a session whose READ holds a
    // buffer must be read for the other's to get one.
    let threads: Vec<_> = sessions
        .into_iter()
        .map(|mut ini| {
            std::thread::spawn(move || {
                let itts: Vec<u32> = (0..2)
                    .map(|_| {
                        ini.submit(0, &cdb::read16(0, blocks), None, len, true)
                            .unwrap()
                    })
                    .collect();
                let results: Vec<_> = itts.into_iter().map(|itt| ini.wait(itt).unwrap()).collect();
                (ini, results)
            })
        })
        .collect();
    let mut sessions = Vec::new();
    for th in threads {
        let (ini, results) = th.join().unwrap();
        for r in results {
            assert!(r.is_good(), "{r:?}\n{}", t.log());
            assert_eq!(r.data.len(), len as usize);
        }
        sessions.push(ini);
    }
    let waits: u64 = t.get("sgv/waits").parse().unwrap();
    assert!(waits >= 1, "no command waited for a buffer");
    let failures: u64 = t.get("sgv/alloc_failures").parse().unwrap();
    assert!(failures >= 1);
    assert_eq!(t.get("sgv/chunks_in_use"), "0");
    for mut ini in sessions {
        ini.logout().unwrap();
    }
}

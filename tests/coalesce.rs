//! Response coalescing (`--coalesce-us`) in a reactor that sleeps when idle (`--mode
//! adaptive`): output held back for more responses to join it has a deadline, and the
//! reactor must wake for it even when no input comes to wake it. A lone command at queue
//! depth 1 is never held; a stream of pipelined commands is, and when the stream stops its
//! last responses sit held with nothing behind them.
//!
//! The coalescing delay is the largest the daemon takes (1 ms); the bounds asserted are
//! seconds, twenty times the delays a run is designed to take, so only a response that is
//! never sent, or sent long after its deadline (at the reactor's next 100 ms timer), fails
//! them.
mod common;

use std::time::{Duration, Instant};

use common::{tur_good, Target, IQN};
use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions};

/// The largest `--coalesce-us` the daemon accepts.
const COALESCE_US: &str = "1000";
/// How long an answer may take on a loaded machine: thousands of times the delay.
const BOUND: Duration = Duration::from_secs(5);
/// Commands in flight while streaming: fewer than the 16 PDUs that end a hold at once.
const QD: usize = 8;
/// Commands of a stream: 250 batches of QD, each held for the coalescing delay.
const STREAM: u64 = 2000;
/// 4 KiB READs.
const BLOCKS: u32 = 8;
const BYTES: u32 = 4096;

fn adaptive_target() -> Target {
    let t = Target::start(&[
        "--cores",
        "0",
        "--mode",
        "adaptive",
        "--coalesce-us",
        COALESCE_US,
    ]);
    t.configure_default(16);
    assert_eq!(t.get("reactors/0/mode").trim(), "adaptive");
    t
}

fn login(t: &Target) -> Initiator {
    let mut ini = Initiator::connect(t.addr).unwrap();
    // A response that never comes fails the test instead of hanging it.
    ini.set_timeout(Some(Duration::from_secs(30))).unwrap();
    ini.login(&LoginOptions {
        target_name: Some(IQN.into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("login: {e}\n{}", t.log()));
    tur_good(&mut ini);
    ini
}

fn sleeps(t: &Target) -> u64 {
    t.get("reactors/0/sleeps").trim().parse().unwrap()
}

fn read(ini: &mut Initiator, lba: u64) -> u32 {
    ini.submit(0, &cdb::read16(lba, BLOCKS), None, BYTES, true)
        .unwrap()
}

/// Waits for one answer, which must be GOOD.
fn answer(ini: &mut Initiator, t: &Target) {
    let (_, r) = ini
        .wait_any()
        .unwrap_or_else(|e| panic!("no answer: {e}\n{}", t.log()));
    assert!(r.is_good(), "{r:?}");
}

#[test]
fn a_lone_command_on_a_sleeping_adaptive_reactor_is_answered() {
    let t = adaptive_target();
    let mut ini = login(&t);
    for lba in 0..5 {
        // Idle long enough for the reactor to be asleep in epoll when the command comes.
        let before = sleeps(&t);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sleeps(&t) == before {
            assert!(Instant::now() < deadline, "the reactor never slept");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        let sent = Instant::now();
        let r = ini
            .scsi(0, &cdb::read16(lba * 8, BLOCKS), None, BYTES, true)
            .unwrap_or_else(|e| panic!("no answer: {e}\n{}", t.log()));
        let took = sent.elapsed();
        assert!(r.is_good(), "{r:?}");
        assert_eq!(r.data.len(), BYTES as usize);
        assert!(took < BOUND, "a command at queue depth 1 took {took:?}");
    }
}

#[test]
fn held_responses_leave_at_their_deadline_when_the_input_stops() {
    let t = adaptive_target();
    let mut ini = login(&t);
    let before = sleeps(&t);
    for round in 0..3u64 {
        // A stream of pipelined commands, far less than the coalescing delay apart: the
        // target holds its responses for more to join them. Each batch of QD answers is held
        // with no input behind it (the initiator sends the next commands only once answered),
        // so only the hold's deadline can wake the sleeping reactor for it: STREAM / QD
        // batches of 1 ms of designed delay, a twentieth of BOUND. (Were the deadline
        // missed, each batch would wait for the reactor's next 100 ms timer instead.)
        let base = round * 4096;
        for i in 0..QD as u64 {
            read(&mut ini, base + i * 8);
        }
        let stream = Instant::now();
        for i in 0..STREAM {
            answer(&mut ini, &t);
            read(&mut ini, base + ((QD as u64 + i) % 512) * 8);
        }
        let took = stream.elapsed();
        assert!(
            took < BOUND,
            "{STREAM} commands at queue depth {QD} took {took:?}"
        );
        // The input stops: the last responses are held with nothing behind them.
        let stopped = Instant::now();
        for _ in 0..QD {
            answer(&mut ini, &t);
        }
        let took = stopped.elapsed();
        assert!(
            took < BOUND,
            "the held responses came {took:?} after the input stopped"
        );
        assert_eq!(ini.outstanding(), 0);
        // Idle between rounds: the next stream starts on a sleeping reactor.
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(sleeps(&t) > before, "the reactor never slept");
}

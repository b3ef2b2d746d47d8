//! A connection's state machine run over an in-memory socket, fed bytes and (virtual) time:
//! no network, no reactor. What the target sends is parsed back PDU by PDU.

use std::time::Duration;

use iscsi_tgt::iscsi::conn::Phase;
use iscsi_tgt::iscsi::pdu::Pdu;

#[path = "support/mem_rig.rs"]
mod mem_rig;

use mem_rig::{nop_out, Rig};

#[test]
fn a_ping_is_echoed_even_when_it_arrives_a_byte_at_a_time() {
    let mut r = Rig::new();
    r.login();
    r.net.sock_mut(r.sock).unwrap().chunk = 1;
    r.send(&nop_out(0x42, 2, b"are you there"));
    let got = r.received();
    match got.as_slice() {
        [(Pdu::NopIn(n), data)] => {
            assert_eq!(n.itt, 0x42);
            assert_eq!(n.ttt, 0xffff_ffff);
            assert_eq!(data, b"are you there");
        }
        other => panic!("expected the NOP-In echo, got {other:?}"),
    }
}

#[test]
fn a_connection_that_never_logs_in_is_closed_by_the_clock() {
    let mut r = Rig::new();
    r.wait(Duration::from_secs(5));
    assert_eq!(r.conn.phase(), Phase::Login, "still waiting after 5 s");
    r.wait(Duration::from_secs(60));
    assert_eq!(r.conn.phase(), Phase::Closed);
    assert!(
        r.net.sock_mut(r.sock).unwrap().closed,
        "the socket was closed"
    );
}

#[test]
fn an_idle_session_is_pinged_and_closed_when_the_ping_goes_unanswered() {
    let mut r = Rig::new();
    r.login();
    // The default NopInInterval is 30 s, NopInTimeout 30 s.
    let mut pinged = None;
    for _ in 0..40 {
        r.wait(Duration::from_secs(1));
        if let Some((Pdu::NopIn(n), _)) = r.received().into_iter().next() {
            assert_eq!(n.itt, 0xffff_ffff, "a target-initiated NOP-In");
            assert_ne!(n.ttt, 0xffff_ffff, "it asks for an answer");
            pinged = Some(n.ttt);
            break;
        }
    }
    assert!(pinged.is_some(), "no NOP-In within 40 s of silence");
    assert_eq!(r.conn.phase(), Phase::FullFeature);
    r.wait(Duration::from_secs(120));
    assert_eq!(r.conn.phase(), Phase::Closed, "an unanswered ping ends it");
}

#[test]
fn a_peer_that_closes_ends_the_connection() {
    let mut r = Rig::new();
    r.login();
    r.net.sock_mut(r.sock).unwrap().eof = true;
    r.pass();
    assert_eq!(r.conn.phase(), Phase::Closed);
    assert!(r.conn.is_finished());
}

#[test]
fn a_burst_of_commands_costs_one_receive_and_one_send() {
    let mut r = Rig::new();
    r.login();
    // The unit attention of a new nexus goes to a TEST UNIT READY first.
    r.send(&mem_rig::scsi_command(
        1,
        1,
        &[0; 6],
        (false, false),
        0,
        &[],
    ));
    r.received();
    let mut burst = Vec::new();
    for i in 0..8u32 {
        let lba = (i * 8) as u8;
        burst.extend(mem_rig::scsi_command(
            0x100 + i,
            2 + i,
            &[0x28, 0, 0, 0, 0, lba, 0, 0, 8, 0],
            (true, false),
            4096,
            &[],
        ));
    }
    let s = r.net.sock_mut(r.sock).unwrap();
    let (recvs, sends) = (s.recv_calls, s.send_calls);
    r.send(&burst);
    let got = r.received();
    assert_eq!(got.len(), 8, "eight Data-In with status: {got:?}");
    let s = r.net.sock_mut(r.sock).unwrap();
    // The one receive returned less than the staging buffer had room for: the socket had
    // nothing more, and asking again would be a system call that only says EAGAIN.
    assert_eq!(s.recv_calls - recvs, 1, "receive calls for one burst");
    assert_eq!(
        s.send_calls - sends,
        1,
        "the answers leave in one vectored send"
    );
}

#[test]
fn responses_are_held_for_coalescing_only_while_commands_stream_in() {
    let hold = Duration::from_micros(20);
    let mut r = Rig::new();
    r.login();
    r.send(&mem_rig::scsi_command(
        1,
        1,
        &[0; 6],
        (false, false),
        0,
        &[],
    ));
    r.received();
    let read = |itt: u32, cmd_sn: u32| {
        mem_rig::scsi_command(
            itt,
            cmd_sn,
            &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0],
            (true, false),
            4096,
            &[],
        )
    };
    // Queue depth 1: each command comes a round trip (here 100 µs) after the last.
    for i in 0..4u32 {
        r.now += Duration::from_micros(100);
        let input = read(0x100 + i, 2 + i);
        r.net
            .sock_mut(r.sock)
            .unwrap()
            .input
            .extend_from_slice(&input);
        r.pass_without_flush();
        assert!(
            !r.conn.hold_output(r.now, hold, 16),
            "a response at queue depth 1 goes at once"
        );
        r.pass();
        assert_eq!(r.received().len(), 1);
    }
    // A deep queue: commands a few microseconds apart.
    for i in 0..8u32 {
        r.now += Duration::from_micros(2);
        let input = read(0x200 + i, 6 + i);
        r.net
            .sock_mut(r.sock)
            .unwrap()
            .input
            .extend_from_slice(&input);
        r.pass_without_flush();
    }
    assert!(
        r.conn.hold_output(r.now, hold, 16),
        "responses to a stream of commands wait for more to join them"
    );
    assert!(
        !r.conn.hold_output(r.now, hold, 8),
        "but no more than the most PDUs held"
    );
    assert!(r.conn.hold_output(r.now, hold, 16));
    r.now += hold;
    assert!(
        !r.conn.hold_output(r.now, hold, 16),
        "and no longer than the hold time"
    );
    r.pass();
    assert_eq!(r.received().len(), 8, "all eight answered in one go");
}

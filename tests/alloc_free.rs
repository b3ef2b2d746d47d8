//! Nothing on the I/O fast path allocates heap memory once warm: data buffers come from the
//! DMA pool through the thread's cache, and a RAM-device READ/WRITE through the SCSI core
//! moves buffers without touching the allocator, and neither does an iSCSI connection
//! receiving commands and Data-Out and sending Data-In, R2Ts and responses.
//!
//! A counting global allocator wraps the system one; every test warms up, takes the count,
//! runs many cycles and checks the count did not move. The counter is per thread so the test
//! harness's own threads cannot disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use iscsi_tgt::env::buf::{CHUNK_SIZE, MAX_TRANSFER};
use iscsi_tgt::env::DataBuf;
use iscsi_tgt::iscsi::pdu::Pdu;
use iscsi_tgt::scsi::pr::Nexus;
use iscsi_tgt::scsi::{self, Device, Exec, ScsiPort, ScsiTask};

#[path = "support/mem_rig.rs"]
mod mem_rig;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // try_with: the allocator also runs while thread-locals are torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged, so `System`'s guarantees hold; counting touches only a const-initialised
// thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

const SIZES: [usize; 6] = [512, 4096, 8192, CHUNK_SIZE, 1024 * 1024, MAX_TRANSFER];

fn cycle(len: usize, byte: u8) {
    let mut b = DataBuf::alloc(len).expect("pool has room");
    b.fill(0, len, byte);
    b.write_at(len / 2, &[byte; 64]);
    let mut back = [0u8; 64];
    assert_eq!(b.read_at(0, &mut back), 64.min(len));
    assert!(b.segments(0, len).all(|s| !s.is_empty()));
    for s in b.segments_mut(len / 3, 100) {
        s[0] = byte;
    }
}

#[test]
fn the_counter_counts() {
    let before = allocs();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert_eq!(allocs() - before, 1);
    drop(v);
}

#[test]
fn databuf_cycles_do_not_allocate() {
    for &len in &SIZES {
        cycle(len, 1);
    }
    let before = allocs();
    for i in 0..2000 {
        let len = SIZES[i % SIZES.len()];
        cycle(len, i as u8);
        // Several in flight at once, as with a queue of commands.
        let a = DataBuf::alloc(4096).unwrap();
        let b = DataBuf::alloc(CHUNK_SIZE).unwrap();
        let c = DataBuf::alloc(1024 * 1024).unwrap();
        drop((b, a, c));
    }
    assert_eq!(allocs() - before, 0, "DataBuf allocated heap memory");
}

fn rw(
    port: &mut ScsiPort,
    dev: &Arc<Device>,
    nexus: &Nexus,
    out: &mut Vec<scsi::Completion>,
    write: bool,
) {
    let blocks: u16 = 256; // 128 KiB of 512-byte blocks
    let op = if write { 0x2a } else { 0x28 };
    let [hi, lo] = blocks.to_be_bytes();
    let cdb = [op, 0, 0, 0, 0x10, 0, 0, hi, lo, 0];
    let mut t = ScsiTask::new(&cdb, 0, 7);
    let plan = scsi::plan(dev, &mut t, nexus).expect("valid CDB");
    let mut b = DataBuf::alloc(plan.len as usize).expect("pool has room");
    if write {
        b.fill(0, plan.len as usize, 0x5a);
    }
    t.buf = Some(b);
    if port.execute(dev, &mut t) == Exec::Pending {
        out.clear();
        while port.poll(out) == 0 {}
        let c = out.pop().expect("one completion");
        scsi::complete(&mut t, c);
    }
    assert_eq!(t.status, 0);
    if !write {
        let mut x = [0u8; 16];
        t.buf.as_ref().expect("data").read_at(0, &mut x);
        assert_eq!(x, [0x5a; 16]);
    }
}

#[test]
fn ram_device_io_does_not_allocate() {
    let dev = Device::create(
        "vdisk_ramio",
        "alloc_free",
        &[("size_mb".into(), "4".into())],
    )
    .expect("RAM device");
    let mut port = ScsiPort::new();
    let mut out = Vec::with_capacity(16);
    // The reservation check of every command reads one atomic while none is held.
    let nexus = Nexus::new("iqn.2026-01.test:alloc-free", [0x40, 0, 0, 0, 0, 1], 1);
    // Warm up: the port opens its channel, the thread its pool cache.
    for _ in 0..4 {
        rw(&mut port, &dev, &nexus, &mut out, true);
        rw(&mut port, &dev, &nexus, &mut out, false);
    }
    let before = allocs();
    for _ in 0..500 {
        rw(&mut port, &dev, &nexus, &mut out, true);
        rw(&mut port, &dev, &nexus, &mut out, false);
    }
    assert_eq!(allocs() - before, 0, "the SCSI READ/WRITE path allocated");
}

/// One queue's worth of commands through a logged-in connection over the in-memory socket:
/// 4 KiB READs, 4 KiB WRITEs with immediate data, and 64 KiB WRITEs whose data is solicited
/// with an R2T and sent as Data-Out. Returns the heap allocations the connection made
/// (receiving, executing, completing, answering); building the input and parsing the output
/// are the test's own and are not counted.
fn connection_round(r: &mut mem_rig::Rig, cmd_sn: &mut u32, itt: &mut u32) -> u64 {
    const QD: u32 = 8;
    let block = [0xa5u8; 4096];
    let big = vec![0x3cu8; 64 * 1024];
    let mut input = Vec::with_capacity(QD as usize * 3 * (48 + 4096));
    let mut writes = Vec::new();
    for i in 0..QD {
        let lba = (i * 8) as u8;
        input.extend(mem_rig::scsi_command(
            *itt,
            *cmd_sn,
            &[0x28, 0, 0, 0, 0, lba, 0, 0, 8, 0],
            (true, false),
            4096,
            &[],
        ));
        *itt += 1;
        *cmd_sn += 1;
        input.extend(mem_rig::scsi_command(
            *itt,
            *cmd_sn,
            &[0x2a, 0, 0, 0, 1, lba, 0, 0, 8, 0],
            (false, true),
            4096,
            &block,
        ));
        *itt += 1;
        *cmd_sn += 1;
        input.extend(mem_rig::scsi_command(
            *itt,
            *cmd_sn,
            &[0x2a, 0, 0, 0, 2, 0, 0, 0, 128, 0],
            (false, true),
            64 * 1024,
            &[],
        ));
        writes.push(*itt);
        *itt += 1;
        *cmd_sn += 1;
    }
    let sock = r.sock;
    let s = r.net.sock_mut(sock).unwrap();
    s.input.clear();
    s.pos = 0;
    s.input.extend_from_slice(&input);
    s.output.clear();
    r.seen = 0;
    let mut n = 0;
    ALLOCS.with(|c| n = c.get());
    r.pass();
    let mut allocated = allocs() - n;
    // The R2Ts, answered with Data-Out.
    let mut data_outs = Vec::with_capacity(writes.len() * (48 + big.len()));
    let mut reads = 0;
    for (p, data) in r.received() {
        match p {
            Pdu::R2t(t) => {
                assert!(writes.contains(&t.itt), "an R2T for a write");
                assert_eq!(t.desired_data_transfer_length, 64 * 1024);
                data_outs.extend(mem_rig::data_out(t.itt, t.ttt, 0, 0, &big, true));
            }
            Pdu::DataIn(d) => {
                assert!(d.status_flag && d.status == 0, "{d:?}");
                assert_eq!(data.len(), 4096);
                reads += 1;
            }
            Pdu::ScsiResponse(rsp) => assert_eq!(rsp.status, 0, "{rsp:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(reads, QD, "every READ answered");
    let s = r.net.sock_mut(sock).unwrap();
    s.input.clear();
    s.pos = 0;
    s.input.extend_from_slice(&data_outs);
    s.output.clear();
    r.seen = 0;
    let n = allocs();
    r.pass();
    allocated += allocs() - n;
    let done = r.received();
    assert_eq!(done.len(), writes.len(), "every solicited WRITE answered");
    for (p, _) in done {
        assert!(
            matches!(p, Pdu::ScsiResponse(ref rsp) if rsp.status == 0),
            "{p:?}"
        );
    }
    allocated
}

#[test]
fn a_connection_serving_reads_and_writes_does_not_allocate() {
    let mut r = mem_rig::Rig::new();
    r.login();
    let s = r.net.sock_mut(r.sock).unwrap();
    s.output.reserve(4 << 20);
    // The unit attention of a new nexus (power on) goes to a TEST UNIT READY.
    r.send(&mem_rig::scsi_command(
        0x10,
        1,
        &[0; 6],
        (false, false),
        0,
        &[],
    ));
    let tur = r.received();
    assert!(
        matches!(tur.as_slice(), [(Pdu::ScsiResponse(_), _)]),
        "{tur:?}"
    );
    let (mut cmd_sn, mut itt) = (2u32, 0x100u32);
    // Warm up: the port's channel, the pool cache, the task table and its ITT map, the
    // transmit queue (each grows to its working size in the first rounds).
    for _ in 0..16 {
        connection_round(&mut r, &mut cmd_sn, &mut itt);
    }
    let mut total = 0;
    for _ in 0..50 {
        total += connection_round(&mut r, &mut cmd_sn, &mut itt);
    }
    assert_eq!(
        total, 0,
        "the connection allocated heap memory on its fast path (50 rounds of 24 commands)"
    );
}

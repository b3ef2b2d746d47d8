//! Nothing on the I/O fast path allocates heap memory once warm: data buffers come from the
//! DMA pool through the thread's cache, and a RAM-device READ/WRITE through the SCSI core
//! moves buffers without touching the allocator.
//!
//! A counting global allocator wraps the system one; every test warms up, takes the count,
//! runs many cycles and checks the count did not move. The counter is per thread so the test
//! harness's own threads cannot disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use iscsi_tgt::env::buf::{CHUNK_SIZE, MAX_TRANSFER};
use iscsi_tgt::env::DataBuf;
use iscsi_tgt::scsi::{self, Device, Exec, ScsiPort, ScsiTask};

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

fn rw(port: &mut ScsiPort, dev: &Arc<Device>, out: &mut Vec<scsi::Completion>, write: bool) {
    let blocks: u16 = 256; // 128 KiB of 512-byte blocks
    let op = if write { 0x2a } else { 0x28 };
    let [hi, lo] = blocks.to_be_bytes();
    let cdb = [op, 0, 0, 0, 0x10, 0, 0, hi, lo, 0];
    let mut t = ScsiTask::new(&cdb, 0, 7);
    let plan = scsi::plan(dev, &mut t).expect("valid CDB");
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
    // Warm up: the port opens its channel, the thread its pool cache.
    for _ in 0..4 {
        rw(&mut port, &dev, &mut out, true);
        rw(&mut port, &dev, &mut out, false);
    }
    let before = allocs();
    for _ in 0..500 {
        rw(&mut port, &dev, &mut out, true);
        rw(&mut port, &dev, &mut out, false);
    }
    assert_eq!(allocs() - before, 0, "the SCSI READ/WRITE path allocated");
}

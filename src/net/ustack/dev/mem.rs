//! Two devices joined back to back in memory: what one sends the other receives. For tests of
//! the stack without a network; frames live in buffers recycled between the two ends.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::{DevStats, NetDev, RxInfo, RxQueue, TxQueue};

/// Frames in flight one way, and the spare buffers.
#[derive(Default)]
struct Wire {
    frames: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// Drop every n-th frame (0: none), to test loss recovery.
    drop_every: u64,
    sent: u64,
}

/// Frames held at most on one wire, like a NIC ring.
const RING: usize = 1024;

pub struct MemRx {
    wire: Arc<Mutex<Wire>>,
    /// The frame being handed to the stack.
    cur: Option<Vec<u8>>,
    stats: Arc<DevStats>,
}

pub struct MemTx {
    wire: Arc<Mutex<Wire>>,
    stats: Arc<DevStats>,
}

pub struct MemDev {
    rx: MemRx,
    tx: MemTx,
    mac: [u8; 6],
    mtu: usize,
    stats: Arc<DevStats>,
}

fn lock(w: &Mutex<Wire>) -> std::sync::MutexGuard<'_, Wire> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two devices joined back to back, with the given addresses and MTU; `drop_every` loses
/// every n-th frame each way (0: none).
pub fn pair(macs: [[u8; 6]; 2], mtu: usize, drop_every: u64) -> (MemDev, MemDev) {
    let ab = Arc::new(Mutex::new(Wire {
        drop_every,
        ..Default::default()
    }));
    let ba = Arc::new(Mutex::new(Wire {
        drop_every,
        ..Default::default()
    }));
    let dev = |mac, rx: &Arc<Mutex<Wire>>, tx: &Arc<Mutex<Wire>>| {
        let stats = Arc::new(DevStats::default());
        MemDev {
            rx: MemRx {
                wire: rx.clone(),
                cur: None,
                stats: stats.clone(),
            },
            tx: MemTx {
                wire: tx.clone(),
                stats: stats.clone(),
            },
            mac,
            mtu,
            stats,
        }
    };
    (dev(macs[0], &ba, &ab), dev(macs[1], &ab, &ba))
}

impl RxQueue for MemRx {
    fn ready(&mut self) -> bool {
        if self.cur.is_none() {
            self.cur = lock(&self.wire).frames.pop_front();
        }
        self.cur.is_some()
    }

    fn recv<R>(&mut self, f: impl FnOnce(&mut [u8], RxInfo) -> R) -> Option<R> {
        if !self.ready() {
            return None;
        }
        let mut frame = self.cur.take()?;
        DevStats::add(&self.stats.rx_packets, 1);
        DevStats::add(&self.stats.rx_bytes, frame.len() as u64);
        let r = f(&mut frame, RxInfo::default());
        lock(&self.wire).spare.push(frame);
        Some(r)
    }
}

impl TxQueue for MemTx {
    fn ready(&mut self) -> bool {
        lock(&self.wire).frames.len() < RING
    }

    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut w = lock(&self.wire);
        let mut buf = w.spare.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        w.sent += 1;
        if (w.drop_every > 0 && w.sent.is_multiple_of(w.drop_every)) || w.frames.len() >= RING {
            DevStats::add(&self.stats.tx_dropped, 1);
            w.spare.push(buf);
        } else {
            DevStats::add(&self.stats.tx_packets, 1);
            DevStats::add(&self.stats.tx_bytes, len as u64);
            w.frames.push_back(buf);
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NetDev for MemDev {
    type Rx = MemRx;
    type Tx = MemTx;

    fn queues(&mut self) -> (&mut MemRx, &mut MemTx) {
        (&mut self.rx, &mut self.tx)
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> &Arc<DevStats> {
        &self.stats
    }
}

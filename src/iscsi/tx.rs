//! The transmit side of a connection: queued PDUs written with one vectored send per flush,
//! each data segment straight from the buffer that holds it (a READ's Data-In comes from the
//! buffer the backend filled; nothing is copied).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use crate::env::DataBuf;
use crate::iscsi::pdu::BHS_LEN;
use crate::net::Sock;

/// At most this many iovecs per send (the kernel's UIO_MAXIOV is 1024; SPDK batches 64).
const IOV_BATCH: usize = 64;
static PAD: [u8; 4] = [0; 4];

/// Where a queued PDU's data segment lives.
pub enum TxData {
    None,
    Owned(Vec<u8>),
    /// A range of the data buffer of task slot `slot`.
    Task {
        slot: usize,
        offset: usize,
    },
}

pub struct TxPdu {
    pub bhs: [u8; BHS_LEN],
    pub data: TxData,
    pub data_len: usize,
    sent: usize,
}

impl TxPdu {
    pub fn new(bhs: [u8; BHS_LEN], data: TxData, data_len: usize) -> TxPdu {
        TxPdu {
            bhs,
            data,
            data_len,
            sent: 0,
        }
    }

    fn total(&self) -> usize {
        BHS_LEN + self.data_len + pad_len(self.data_len)
    }
}

fn pad_len(n: usize) -> usize {
    (4 - n % 4) % 4
}

#[derive(Default)]
pub struct TxQueue {
    q: VecDeque<TxPdu>,
}

impl TxQueue {
    pub fn push(&mut self, pdu: TxPdu) {
        self.q.push_back(pdu);
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Writes as much as the socket takes. `buf_of(slot)` gives the data buffer of a task slot;
    /// the slots whose Data-In PDUs were sent completely are appended to `done_slots`.
    /// Returns whether everything queued was sent.
    pub fn flush<'a>(
        &mut self,
        sock: &mut dyn Sock,
        buf_of: impl Fn(usize) -> Option<&'a DataBuf>,
        done_slots: &mut Vec<usize>,
    ) -> io::Result<bool> {
        while !self.q.is_empty() {
            let mut iov: [IoSlice<'_>; IOV_BATCH] = [IoSlice::new(&[]); IOV_BATCH];
            let mut n = 0;
            'pdus: for pdu in self.q.iter() {
                let mut skip = pdu.sent;
                // BHS
                if skip < BHS_LEN {
                    iov[n] = IoSlice::new(&pdu.bhs[skip..]);
                    n += 1;
                    skip = 0;
                } else {
                    skip -= BHS_LEN;
                }
                if n == IOV_BATCH {
                    break;
                }
                // data
                if skip < pdu.data_len {
                    match &pdu.data {
                        TxData::None => {}
                        TxData::Owned(v) => {
                            iov[n] = IoSlice::new(&v[skip..pdu.data_len.min(v.len())]);
                            n += 1;
                        }
                        TxData::Task { slot, offset } => {
                            if let Some(buf) = buf_of(*slot) {
                                for seg in buf.segments(offset + skip, pdu.data_len - skip) {
                                    iov[n] = IoSlice::new(seg);
                                    n += 1;
                                    if n == IOV_BATCH {
                                        break 'pdus;
                                    }
                                }
                            }
                        }
                    }
                    skip = 0;
                } else {
                    skip -= pdu.data_len;
                }
                if n == IOV_BATCH {
                    break;
                }
                let pad = pad_len(pdu.data_len);
                if skip < pad {
                    iov[n] = IoSlice::new(&PAD[..pad - skip]);
                    n += 1;
                }
                if n == IOV_BATCH {
                    break;
                }
            }
            let mut written = match sock.send_vectored(&iov[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if written == 0 {
                return Ok(false);
            }
            while written > 0 {
                let Some(front) = self.q.front_mut() else {
                    break;
                };
                let left = front.total() - front.sent;
                if written >= left {
                    written -= left;
                    if let Some(done) = self.q.pop_front() {
                        if let TxData::Task { slot, .. } = done.data {
                            done_slots.push(slot);
                        }
                    }
                } else {
                    front.sent += written;
                    written = 0;
                }
            }
        }
        Ok(true)
    }

    /// Drops everything queued; the task slots referenced are appended to `done_slots`.
    pub fn clear(&mut self, done_slots: &mut Vec<usize>) {
        for pdu in self.q.drain(..) {
            if let TxData::Task { slot, .. } = pdu.data {
                done_slots.push(slot);
            }
        }
    }
}

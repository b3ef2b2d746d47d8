//! The transmit side of a connection: queued PDUs written with one vectored send per flush,
//! each data segment straight from the buffer that holds it (a READ's Data-In comes from the
//! buffer the backend filled; nothing is copied).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use crate::env::DataBuf;
use crate::iscsi::pdu::BHS_LEN;
use crate::net::{SockGroup, SockId};

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
    /// Digests this PDU carries (fixed when it is queued: the last Login Response has none).
    header_digest: bool,
    data_digest: bool,
    /// CRC32C of the header and of the data plus padding, little-endian on the wire
    /// (RFC 7143 §11.1, Appendix B.4), computed when the PDU is first written.
    hdig: [u8; 4],
    ddig: [u8; 4],
    digests_ready: bool,
}

impl TxPdu {
    pub fn new(bhs: [u8; BHS_LEN], data: TxData, data_len: usize) -> TxPdu {
        TxPdu {
            bhs,
            data,
            data_len,
            sent: 0,
            header_digest: false,
            data_digest: false,
            hdig: [0; 4],
            ddig: [0; 4],
            digests_ready: true,
        }
    }

    fn hdig_len(&self) -> usize {
        if self.header_digest {
            4
        } else {
            0
        }
    }

    fn ddig_len(&self) -> usize {
        if self.data_digest && self.data_len > 0 {
            4
        } else {
            0
        }
    }

    fn total(&self) -> usize {
        BHS_LEN + self.hdig_len() + self.data_len + pad_len(self.data_len) + self.ddig_len()
    }

    fn compute_digests(&mut self, buf: Option<&DataBuf>) {
        if self.header_digest {
            self.hdig = crc32c::crc32c(&self.bhs).to_le_bytes();
        }
        if self.ddig_len() > 0 {
            let mut crc = 0u32;
            match &self.data {
                TxData::None => {}
                TxData::Owned(v) => {
                    crc = crc32c::crc32c_append(crc, &v[..self.data_len.min(v.len())])
                }
                TxData::Task { offset, .. } => {
                    if let Some(b) = buf {
                        for seg in b.segments(*offset, self.data_len) {
                            crc = crc32c::crc32c_append(crc, seg);
                        }
                    }
                }
            }
            crc = crc32c::crc32c_append(crc, &PAD[..pad_len(self.data_len)]);
            self.ddig = crc.to_le_bytes();
        }
        self.digests_ready = true;
    }
}

fn pad_len(n: usize) -> usize {
    (4 - n % 4) % 4
}

#[derive(Default)]
pub struct TxQueue {
    q: VecDeque<TxPdu>,
    header_digest: bool,
    data_digest: bool,
    /// Bytes written to the socket over the connection's life.
    sent_total: u64,
    /// Bytes of queued data segments held in the queue's own memory (`TxData::Owned`): the
    /// output a peer that does not read can make the connection accumulate.
    owned_bytes: usize,
}

impl TxQueue {
    pub fn push(&mut self, mut pdu: TxPdu) {
        if let TxData::Owned(v) = &pdu.data {
            self.owned_bytes += v.len();
        }
        pdu.header_digest = self.header_digest;
        pdu.data_digest = self.data_digest;
        pdu.digests_ready = !(pdu.header_digest || pdu.ddig_len() > 0);
        self.q.push_back(pdu);
    }

    /// Turns digests on for the PDUs queued from now on (at the start of full feature phase).
    pub fn set_digests(&mut self, header: bool, data: bool) {
        self.header_digest = header;
        self.data_digest = data;
    }

    /// Whether the PDUs queued from now on carry a data digest.
    pub fn data_digest(&self) -> bool {
        self.data_digest
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Bytes written to the socket so far (progress of a connection's output).
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// Bytes of data segments queued in the queue's own memory, not yet sent.
    pub fn owned_bytes(&self) -> usize {
        self.owned_bytes
    }

    /// Writes as much as the socket takes. `buf_of(slot)` gives the data buffer of a task slot;
    /// the slots whose Data-In PDUs were sent completely are appended to `done_slots`.
    /// Returns whether everything queued was sent.
    pub fn flush<'a>(
        &mut self,
        net: &mut dyn SockGroup,
        sock: SockId,
        buf_of: impl Fn(usize) -> Option<&'a DataBuf>,
        done_slots: &mut Vec<usize>,
    ) -> io::Result<bool> {
        while !self.q.is_empty() {
            let mut iov: [IoSlice<'_>; IOV_BATCH] = [IoSlice::new(&[]); IOV_BATCH];
            let mut n = 0;
            for pdu in self.q.iter_mut() {
                if !pdu.digests_ready {
                    let buf = match pdu.data {
                        TxData::Task { slot, .. } => buf_of(slot),
                        _ => None,
                    };
                    pdu.compute_digests(buf);
                }
                if n + 8 > IOV_BATCH {
                    break;
                }
            }
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
                let hd = pdu.hdig_len();
                if skip < hd {
                    iov[n] = IoSlice::new(&pdu.hdig[skip..]);
                    n += 1;
                    skip = 0;
                } else {
                    skip -= hd;
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
                    iov[n] = IoSlice::new(&PAD[skip..pad]);
                    n += 1;
                    skip = 0;
                } else {
                    skip -= pad;
                }
                if n == IOV_BATCH {
                    break;
                }
                let dd = pdu.ddig_len();
                if skip < dd {
                    iov[n] = IoSlice::new(&pdu.ddig[skip..]);
                    n += 1;
                }
                if n == IOV_BATCH {
                    break;
                }
            }
            let mut written = match net.send_vectored(sock, &iov[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if written == 0 {
                return Ok(false);
            }
            self.sent_total += written as u64;
            while written > 0 {
                let Some(front) = self.q.front_mut() else {
                    break;
                };
                let left = front.total() - front.sent;
                if written >= left {
                    written -= left;
                    if let Some(done) = self.q.pop_front() {
                        match done.data {
                            TxData::Task { slot, .. } => done_slots.push(slot),
                            TxData::Owned(v) => {
                                self.owned_bytes = self.owned_bytes.saturating_sub(v.len())
                            }
                            TxData::None => {}
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
        self.owned_bytes = 0;
        for pdu in self.q.drain(..) {
            if let TxData::Task { slot, .. } = pdu.data {
                done_slots.push(slot);
            }
        }
    }
}

//! The receive side of a connection: a staging buffer that batches small reads (a 48-byte BHS
//! costs no system call of its own) while large payloads go straight from the socket into
//! their data buffer.
#![forbid(unsafe_code)]

use std::io::{self, IoSliceMut};

use crate::net::{SockGroup, SockId};

/// Size of the per-connection staging buffer.
pub const STAGING_SIZE: usize = 64 * 1024;
/// Payloads at least this large are read directly into their destination when the staging
/// buffer is empty (SPDK's posix socket does the same with its receive pipe).
pub const DIRECT_MIN: usize = 1024;

pub struct Staging {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// What a fill of the staging buffer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// This many new bytes, as many as there was room for: more may be waiting.
    Data(usize),
    /// This many new bytes, fewer than there was room for: the socket had no more.
    Short(usize),
    /// Nothing available now.
    WouldBlock,
    /// The peer closed the connection.
    Closed,
}

impl Staging {
    pub fn new() -> Staging {
        Staging {
            buf: vec![0u8; STAGING_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what the socket has into the free space (moving unconsumed bytes to the front
    /// first when the tail is short).
    pub fn fill(&mut self, net: &mut dyn SockGroup, sock: SockId) -> io::Result<Fill> {
        if self.buf.len() - self.end < DIRECT_MIN * 4 && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(Fill::Data(0));
        }
        let room = self.buf.len() - self.end;
        match net.recv(sock, &mut self.buf[self.end..]) {
            Ok(0) => Ok(Fill::Closed),
            Ok(n) => {
                self.end += n;
                Ok(if n < room {
                    Fill::Short(n)
                } else {
                    Fill::Data(n)
                })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::Data(0)),
            Err(e) => Err(e),
        }
    }
}

impl Default for Staging {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads directly into `bufs`; `Ok(None)` when nothing is available.
pub fn recv_direct(
    net: &mut dyn SockGroup,
    sock: SockId,
    bufs: &mut [IoSliceMut<'_>],
) -> io::Result<Option<usize>> {
    match net.recv_vectored(sock, bufs) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the connection",
        )),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(0)),
        Err(e) => Err(e),
    }
}

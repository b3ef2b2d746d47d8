//! What the initiator runs over: a blocking byte stream with a timeout, which the kernel's TCP
//! ([`TcpStream`]) and the userspace stack's client ([`ClientStream`]) both provide.
//!
//! The initiator reads through a buffer of its own and writes one PDU per call, so a boxed
//! transport (`Box<dyn Transport + Send>`, for a program that picks its network at run time)
//! costs one indirect call per read or write of the socket, not per byte.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::net::ustack::client::ClientStream;
use crate::net::ustack::dev::NetDev;

/// A connected, blocking byte stream.
///
/// `read` returns `Ok(0)` at the end of the stream and fails with `TimedOut` or `WouldBlock`
/// once the timeout passes without data; `write` may take part of its buffer.
pub trait Transport: Read + Write {
    /// Sets how long a read or write may block (`None`: without end).
    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()>;
    /// Closes both directions in order: what was written still reaches the peer, then a FIN.
    fn shutdown(&mut self) -> io::Result<()>;
    /// Makes the connection end with a reset, discarding what is unsent: at once, or at the
    /// latest when the transport is dropped (a kernel socket with `SO_LINGER` 0).
    fn reset(&mut self) -> io::Result<()>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
    fn peer_addr(&self) -> io::Result<SocketAddr>;
}

/// A kernel TCP connection set up as the initiator wants it: Nagle's algorithm off, so a
/// PDU does not wait for the ACK of the one before.
pub fn tcp_connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    Ok(s)
}

impl Transport for TcpStream {
    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }

    fn shutdown(&mut self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }

    fn reset(&mut self) -> io::Result<()> {
        // With a zero linger time, close discards what is unsent and sends a reset.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&*self, nix::sys::socket::sockopt::Linger, &linger)
            .map_err(io::Error::from)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::peer_addr(self)
    }
}

impl<D: NetDev> Transport for ClientStream<D> {
    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        ClientStream::set_timeout(self, t);
        Ok(())
    }

    fn shutdown(&mut self) -> io::Result<()> {
        ClientStream::shutdown(self)
    }

    fn reset(&mut self) -> io::Result<()> {
        ClientStream::reset(self);
        Ok(())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(ClientStream::local_addr(self))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(ClientStream::peer_addr(self))
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_timeout(t)
    }

    fn shutdown(&mut self) -> io::Result<()> {
        (**self).shutdown()
    }

    fn reset(&mut self) -> io::Result<()> {
        (**self).reset()
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        (**self).local_addr()
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        (**self).peer_addr()
    }
}

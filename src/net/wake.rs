//! What both socket groups sleep with: an eventfd other threads write to wake the reactor,
//! watched in the group's epoll set, and the conversion of a reactor's timeout to epoll's.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::sys::epoll::EpollTimeout;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::Wake;

/// Wakes a reactor that sleeps in its group's epoll set.
pub(crate) struct EventWaker {
    fd: EventFd,
}

impl EventWaker {
    pub(crate) fn new() -> io::Result<EventWaker> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(EventWaker { fd })
    }

    /// The descriptor to watch for readability.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Takes the wake-ups written so far, so the descriptor stops polling readable.
    pub(crate) fn drain(&self) {
        let _ = self.fd.read();
    }
}

impl Wake for EventWaker {
    fn wake(&self) {
        let _ = self.fd.write(1);
    }
}

/// A reactor's sleep as epoll takes it: whole milliseconds, at least one (a shorter sleep
/// would spin), `None` for no limit.
pub(crate) fn epoll_timeout(timeout: Option<Duration>) -> EpollTimeout {
    match timeout {
        None => EpollTimeout::NONE,
        Some(d) => {
            let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
            EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::NONE)
        }
    }
}

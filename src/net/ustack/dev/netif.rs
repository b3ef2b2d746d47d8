//! Interface names and the netdevice ioctls both kernel devices need (netdevice(7)): index,
//! MTU, hardware address and flags, looked up through any socket of the caller's network
//! namespace.

use std::fmt::Display;
use std::io;
use std::os::fd::RawFd;

/// Ethernet header: destination, source, EtherType (IEEE 802.3).
pub(crate) const ETH_HLEN: usize = 14;
/// An 802.1Q tag the kernel may leave in a frame.
pub(crate) const VLAN_HLEN: usize = 4;

/// Checks `name` the way the kernel's `dev_valid_name` does (1 to 15 bytes, not `.` or `..`,
/// no `/`, `:`, NUL or white space) and returns it as an `ifreq` name.
pub(crate) fn ifname(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{name:?}: not an interface name (1 to {} bytes, no '/', ':', NUL or white space)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        // A byte reinterpreted as C's `char`, whatever its signedness.
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// An `ifreq` naming the interface, the rest zeroed.
pub(crate) fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let ifr_name = ifname(name)?;
    // SAFETY: `ifreq` is a C struct of integers, arrays and a union of such (and one pointer
    // member that is never read here): all-zero bytes are a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name = ifr_name;
    Ok(ifr)
}

/// Wraps an OS error with what was being done, with a hint for the errors an administrator
/// can fix. A missing interface (ENODEV, ENXIO) becomes `NotFound`; other errors keep their
/// kind.
pub(crate) fn context(e: io::Error, what: impl Display, cap: &str) -> io::Error {
    let (kind, hint) = match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENXIO) => {
            (io::ErrorKind::NotFound, " (no such interface)".to_string())
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            (io::ErrorKind::PermissionDenied, format!(" (needs {cap})"))
        }
        _ => (e.kind(), String::new()),
    };
    io::Error::new(kind, format!("{what}: {e}{hint}"))
}

/// One netdevice ioctl on `fd` with `ifr`.
fn ioctl(fd: RawFd, req: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request passed here (SIOCGIF*, SIOCSIFFLAGS) reads and writes at most one
    // `struct ifreq`, which `ifr` is, exclusively borrowed for the call.
    let r = unsafe { libc::ioctl(fd, req, ifr as *mut libc::ifreq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interface's index (SIOCGIFINDEX).
pub(crate) fn index(fd: RawFd, name: &str) -> io::Result<libc::c_int> {
    let mut ifr = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFINDEX, &mut ifr)?;
    // SAFETY: SIOCGIFINDEX filled in the `ifru_ifindex` member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_ifindex })
}

/// The interface's MTU (SIOCGIFMTU).
pub(crate) fn mtu(fd: RawFd, name: &str) -> io::Result<usize> {
    let mut ifr = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFMTU, &mut ifr)?;
    // SAFETY: SIOCGIFMTU filled in the `ifru_mtu` member of the union.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    usize::try_from(mtu).map_err(|_| io::Error::other(format!("negative MTU {mtu}")))
}

/// The interface's hardware type (an `ARPHRD_*`) and, for Ethernet, its address
/// (SIOCGIFHWADDR).
pub(crate) fn hwaddr(fd: RawFd, name: &str) -> io::Result<(u16, [u8; 6])> {
    let mut ifr = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr)?;
    // SAFETY: SIOCGIFHWADDR filled in the `ifru_hwaddr` member of the union.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        // C's `char` reinterpreted as the byte it holds.
        *m = *b as u8;
    }
    Ok((sa.sa_family, mac))
}

/// The interface's flags (SIOCGIFFLAGS).
pub(crate) fn flags(fd: RawFd, name: &str) -> io::Result<libc::c_short> {
    let mut ifr = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled in the `ifru_flags` member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_flags })
}

/// Brings the interface up (SIOCSIFFLAGS with IFF_UP added) unless it is up already.
pub(crate) fn set_up(fd: RawFd, name: &str) -> io::Result<()> {
    let f = flags(fd, name)?;
    // IFF_UP is bit 0: it fits the `short` the kernel uses for these flags.
    let up = libc::IFF_UP as libc::c_short;
    if f & up != 0 {
        return Ok(());
    }
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_flags = f | up;
    ioctl(fd, libc::SIOCSIFFLAGS, &mut ifr)
}

/// `struct ethtool_value` (linux/ethtool.h), what the legacy get and set requests exchange.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// linux/ethtool.h: get whether TCP segmentation offload is on (any of TSO, TSO6, ...).
const ETHTOOL_GTSO: u32 = 0x1e;

/// Whether the interface segments TCP itself (`ethtool -k`: tcp-segmentation-offload). A frame
/// larger than the MTU sent to an interface without it is dropped by the kernel when the
/// sender bypasses the qdisc (`__dev_direct_xmit` drops what software segmentation would
/// replace).
pub(crate) fn tso(fd: RawFd, name: &str) -> io::Result<bool> {
    let mut v = EthtoolValue {
        cmd: ETHTOOL_GTSO,
        data: 0,
    };
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GTSO reads the `ifreq` and writes the one
    // `ethtool_value` its data pointer names; both live, exclusively borrowed, for the call.
    let r = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut ifr as *mut libc::ifreq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.data != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_accepts() {
        for ok in ["eth0", "a", "veth-target.12", "123456789012345"] {
            let n = ifname(ok).unwrap();
            assert_eq!(n[ok.len()], 0, "{ok}: NUL-terminated");
            assert_eq!(n[0] as u8, ok.as_bytes()[0]);
        }
    }

    #[test]
    fn names_the_kernel_refuses() {
        for bad in [
            "",
            ".",
            "..",
            "1234567890123456",
            "a/b",
            "a:1",
            "a b",
            "a\tb",
            "a\0b",
        ] {
            let e = ifname(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().contains("not an interface name"), "{e}");
        }
    }

    #[test]
    fn context_keeps_the_kind_and_hints() {
        let e = context(
            io::Error::from_raw_os_error(libc::ENODEV),
            "eth9: index",
            "CAP_NET_RAW",
        );
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let s = e.to_string();
        assert!(s.starts_with("eth9: index: "), "{s}");
        assert!(s.ends_with("(no such interface)"), "{s}");
        let e = context(
            io::Error::from_raw_os_error(libc::EPERM),
            "eth9: socket",
            "CAP_NET_RAW",
        );
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().ends_with("(needs CAP_NET_RAW)"), "{e}");
        let e = context(
            io::Error::from_raw_os_error(libc::ENOMEM),
            "eth9: ring",
            "CAP_NET_RAW",
        );
        assert_eq!(e.kind(), io::ErrorKind::OutOfMemory);
        assert!(!e.to_string().contains("needs"), "{e}");
    }
}

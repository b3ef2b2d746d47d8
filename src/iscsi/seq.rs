//! Serial number arithmetic for CmdSN, StatSN, DataSN and R2TSN (RFC 1982 with SERIAL_BITS =
//! 32, as RFC 7143 §4.2.2.1 requires): `a < b` when `b - a` (mod 2^32) is in `1..2^31`.
#![forbid(unsafe_code)]

/// `a < b` in serial arithmetic.
pub fn lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial arithmetic.
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// Whether `sn` lies in the window `lo..=hi` (serial arithmetic).
pub fn in_window(sn: u32, lo: u32, hi: u32) -> bool {
    le(lo, sn) && le(sn, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps() {
        assert!(lt(1, 2));
        assert!(!lt(2, 1));
        assert!(lt(0xffff_fff0, 5));
        assert!(!lt(5, 0xffff_fff0));
        assert!(le(7, 7));
        assert!(in_window(0, 0xffff_fffe, 3));
        assert!(!in_window(4, 0xffff_fffe, 3));
        // RFC 7143: MaxCmdSN == ExpCmdSN - 1 is an empty window.
        assert!(!in_window(10, 10, 9));
    }
}

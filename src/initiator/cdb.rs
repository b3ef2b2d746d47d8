//! CDBs of the commands the initiator's helpers send (SBC-3, SPC-4).
#![forbid(unsafe_code)]

pub const TEST_UNIT_READY: u8 = 0x00;
pub const INQUIRY: u8 = 0x12;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const WRITE_10: u8 = 0x2a;
pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8a;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const REPORT_LUNS: u8 = 0xa0;
/// SBC-3 §5.16: the service action of READ CAPACITY (16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;

pub fn test_unit_ready() -> [u8; 6] {
    [TEST_UNIT_READY, 0, 0, 0, 0, 0]
}

pub fn inquiry(allocation_length: u16) -> [u8; 6] {
    let l = allocation_length.to_be_bytes();
    [INQUIRY, 0, 0, l[0], l[1], 0]
}

pub fn read_capacity10() -> [u8; 10] {
    [READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// READ CAPACITY (16): the capacity of a LUN too large for READ CAPACITY (10).
pub fn read_capacity16(allocation_length: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = SERVICE_ACTION_IN_16;
    c[1] = SA_READ_CAPACITY_16;
    c[10..14].copy_from_slice(&allocation_length.to_be_bytes());
    c
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let a = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [opcode, 0, a[0], a[1], a[2], a[3], 0, n[0], n[1], 0]
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    rw10(READ_10, lba, blocks)
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    rw10(WRITE_10, lba, blocks)
}

pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    rw16(READ_16, lba, blocks)
}

pub fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    rw16(WRITE_16, lba, blocks)
}

pub fn report_luns(allocation_length: u32) -> [u8; 12] {
    let l = allocation_length.to_be_bytes();
    [REPORT_LUNS, 0, 0, 0, 0, 0, l[0], l[1], l[2], l[3], 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(
            read10(0x01020304, 0x0506),
            [0x28, 0, 1, 2, 3, 4, 0, 5, 6, 0]
        );
        let w = write16(0x0102030405060708, 0x0a0b0c0d);
        assert_eq!(w[0], 0x8a);
        assert_eq!(&w[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&w[10..14], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(report_luns(4096)[6..10], [0, 0, 0x10, 0]);
        assert_eq!(inquiry(96), [0x12, 0, 0, 0, 96, 0]);
    }
}

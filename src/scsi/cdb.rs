//! Fields of a CDB: big-endian integers, the LBA and transfer length of the block
//! commands, the CDB length by group code.
#![forbid(unsafe_code)]

pub(in crate::scsi) fn be16(b: &[u8]) -> u32 {
    (u32::from(b[0]) << 8) | u32::from(b[1])
}
pub(in crate::scsi) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(in crate::scsi) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The LOGICAL BLOCK ADDRESS and the block count of a 10-byte CDB (bytes 2-5 and 7-8) or a
/// 16-byte one (bytes 2-9 and 10-13), by the opcode's group.
pub(in crate::scsi) fn lba_and_blocks(c: &[u8; 16]) -> (u64, u64) {
    if cdb_len_of(c[0]) == 10 {
        (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])))
    } else {
        (be64(&c[2..10]), u64::from(be32(&c[10..14])))
    }
}

/// The CDB length by group code (SPC-4 §4.2.5.1).
pub(in crate::scsi) fn cdb_len_of(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

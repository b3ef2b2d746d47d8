//! Sense data (SPC-4 §4.5): fixed format, with the keys and additional sense codes the target
//! reports.
#![forbid(unsafe_code)]

pub const NO_SENSE: u8 = 0x0;
pub const NOT_READY: u8 = 0x2;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const HARDWARE_ERROR: u8 = 0x4;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const UNIT_ATTENTION: u8 = 0x6;
pub const DATA_PROTECT: u8 = 0x7;
pub const ABORTED_COMMAND: u8 = 0xb;
pub const MISCOMPARE: u8 = 0xe;

/// ASC/ASCQ pairs (SPC-4 Annex D).
pub const INVALID_COMMAND_OPERATION_CODE: (u8, u8) = (0x20, 0x00);
pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
pub const LOGICAL_UNIT_NOT_SUPPORTED: (u8, u8) = (0x25, 0x00);
pub const INVALID_FIELD_IN_PARAMETER_LIST: (u8, u8) = (0x26, 0x00);
pub const WRITE_PROTECTED: (u8, u8) = (0x27, 0x00);
pub const POWER_ON_RESET: (u8, u8) = (0x29, 0x00);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
pub const MISCOMPARE_DURING_VERIFY: (u8, u8) = (0x1d, 0x00);
pub const UNRECOVERED_READ_ERROR: (u8, u8) = (0x11, 0x00);
pub const WRITE_ERROR: (u8, u8) = (0x0c, 0x00);
pub const PARAMETER_LIST_LENGTH_ERROR: (u8, u8) = (0x1a, 0x00);
pub const MEDIUM_NOT_PRESENT: (u8, u8) = (0x3a, 0x00);
pub const MEDIUM_REMOVAL_PREVENTED: (u8, u8) = (0x53, 0x02);
/// PERSISTENT RESERVE OUT RELEASE by the holder with another type (SPC-4 §5.13.11.2).
pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: (u8, u8) = (0x26, 0x04);
/// A registration the device server has no room for (SPC-4 §5.13.7).
pub const INSUFFICIENT_REGISTRATION_RESOURCES: (u8, u8) = (0x55, 0x04);
/// Unit attentions of persistent reservations (SPC-4 §5.13.11).
pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
/// LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (SBC-3 §4.11).
pub const SANITIZE_IN_PROGRESS: (u8, u8) = (0x04, 0x1b);
/// SANITIZE COMMAND FAILED: the medium is in sanitize failure mode.
pub const SANITIZE_COMMAND_FAILED: (u8, u8) = (0x31, 0x03);

/// Fixed-format sense data is 18 bytes (SPC-4 §4.5.3).
pub const FIXED_LEN: usize = 18;

/// One fixed-format sense buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the LBA of a medium error), with VALID set when present.
    pub information: Option<u32>,
    /// Sense-key specific field: (C/D bit: CDB, field pointer byte, bit pointer) for INVALID
    /// FIELD IN CDB / PARAMETER LIST.
    pub field_pointer: Option<(bool, u16, Option<u8>)>,
    /// Sense-key specific field: the PROGRESS INDICATION of an operation under way (NOT
    /// READY), out of 65536 (SPC-4 §4.5.2.4.4).
    pub progress: Option<u16>,
}

impl Sense {
    pub fn new(key: u8, (asc, ascq): (u8, u8)) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            ..Default::default()
        }
    }

    /// INVALID FIELD IN CDB pointing at byte `byte` of the CDB (SPC-4 §4.5.2.4.2).
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            key: ILLEGAL_REQUEST,
            asc: INVALID_FIELD_IN_CDB.0,
            ascq: INVALID_FIELD_IN_CDB.1,
            field_pointer: Some((true, byte, bit)),
            ..Default::default()
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at byte `byte` of the parameter data.
    pub fn invalid_param_field(byte: u16) -> Sense {
        Sense {
            key: ILLEGAL_REQUEST,
            asc: INVALID_FIELD_IN_PARAMETER_LIST.0,
            ascq: INVALID_FIELD_IN_PARAMETER_LIST.1,
            field_pointer: Some((false, byte, None)),
            ..Default::default()
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at bit `bit` of byte `byte` of the parameter
    /// data.
    pub fn invalid_param_bit(byte: u16, bit: u8) -> Sense {
        Sense {
            field_pointer: Some((false, byte, Some(bit))),
            ..Sense::invalid_param_field(byte)
        }
    }

    pub fn to_fixed(self) -> [u8; FIXED_LEN] {
        let mut s = [0u8; FIXED_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        if let Some(info) = self.information {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[7] = (FIXED_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some((cd, byte, bit)) = self.field_pointer {
            s[15] = 0x80 | if cd { 0x40 } else { 0 } | bit.map_or(0, |b| 0x08 | (b & 7));
            s[16..18].copy_from_slice(&byte.to_be_bytes());
        } else if let Some(p) = self.progress {
            s[15] = 0x80;
            s[16..18].copy_from_slice(&p.to_be_bytes());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format() {
        let s = Sense::invalid_cdb_field(2, Some(1)).to_fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], ILLEGAL_REQUEST);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x24, 0));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 1);
        assert_eq!(&s[16..18], &[0, 2]);
        let s = Sense {
            information: Some(42),
            ..Sense::new(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
        }
        .to_fixed();
        assert_eq!(s[0], 0xf0);
        assert_eq!(&s[3..7], &42u32.to_be_bytes());
    }
}

//! Sense data (SPC-4 §4.5), with the keys and additional sense codes the target reports. One
//! [`Sense`] encodes in either format: fixed (response code 70h, §4.5.3) or descriptor (72h,
//! §4.5.2), as the device's D_SENSE bit (control mode page) chooses when the command ends.
#![forbid(unsafe_code)]

pub const NO_SENSE: u8 = 0x0;
pub const NOT_READY: u8 = 0x2;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const HARDWARE_ERROR: u8 = 0x4;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const UNIT_ATTENTION: u8 = 0x6;
pub const DATA_PROTECT: u8 = 0x7;
/// An EXTENDED COPY ended early (SPC-4 §6.4.5): what was copied stays copied.
pub const COPY_ABORTED: u8 = 0xa;
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

/// EXTENDED COPY's parameter list (SPC-4 §6.4.3): more CSCD or segment descriptors than the
/// copy manager takes, or a descriptor type it does not know.
pub const TOO_MANY_TARGET_DESCRIPTORS: (u8, u8) = (0x26, 0x06);
pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: (u8, u8) = (0x26, 0x07);
pub const TOO_MANY_SEGMENT_DESCRIPTORS: (u8, u8) = (0x26, 0x08);
pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: (u8, u8) = (0x26, 0x09);
/// An EXTENDED COPY whose list identifier names one still running for the I_T nexus.
pub const OPERATION_IN_PROGRESS: (u8, u8) = (0x00, 0x16);
/// COPY ABORTED's codes (SPC-4 §6.4.5): no further detail (the segment number says where),
/// a copy target device that failed, one the copy manager cannot reach, one of the wrong type.
pub const NO_ADDITIONAL_SENSE: (u8, u8) = (0x00, 0x00);
pub const THIRD_PARTY_DEVICE_FAILURE: (u8, u8) = (0x0d, 0x01);
pub const COPY_TARGET_DEVICE_NOT_REACHABLE: (u8, u8) = (0x0d, 0x02);
pub const INCORRECT_COPY_TARGET_DEVICE_TYPE: (u8, u8) = (0x0d, 0x03);
/// More identified copies at once than the copy manager keeps track of.
pub const INSUFFICIENT_RESOURCES: (u8, u8) = (0x55, 0x03);

/// Fixed-format sense data is 18 bytes (SPC-4 §4.5.3).
pub const FIXED_LEN: usize = 18;

/// The longest sense data the target builds: descriptor format with its 8-byte header and
/// an information (12 bytes), command-specific information (12) and sense key specific (8)
/// descriptor.
pub const MAX_LEN: usize = 8 + 12 + 12 + 8;

/// Response codes (SPC-4 §4.5.1): current errors, fixed or descriptor format.
pub const RESPONSE_FIXED_CURRENT: u8 = 0x70;
pub const RESPONSE_DESC_CURRENT: u8 = 0x72;

/// Sense data descriptor types (SPC-4 §4.5.2.1).
mod desc {
    pub const INFORMATION: u8 = 0x00;
    pub const COMMAND_SPECIFIC: u8 = 0x01;
    pub const SENSE_KEY_SPECIFIC: u8 = 0x02;
}

/// Which format sense data takes (the D_SENSE bit of the control mode page, or the DESC
/// bit of REQUEST SENSE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Fixed,
    Descriptor,
}

/// One sense data, in neither format yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the LBA of a medium error). Fixed format carries it (with
    /// VALID set) only when it fits in four bytes; the descriptor format in eight.
    pub information: Option<u64>,
    /// COMMAND-SPECIFIC INFORMATION field.
    pub command_specific: Option<u64>,
    /// Sense-key specific field: (C/D bit: CDB, field pointer byte, bit pointer) for INVALID
    /// FIELD IN CDB / PARAMETER LIST.
    pub field_pointer: Option<(bool, u16, Option<u8>)>,
    /// Sense-key specific field: the progress indication (SPC-4 §4.5.2.4.4), in 65536ths,
    /// for NOT READY and NO SENSE while an operation runs. `field_pointer` wins when both
    /// are set.
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

    /// The three bytes of the sense key specific field, SKSV set (SPC-4 §4.5.2.4).
    fn sense_key_specific(&self) -> Option<[u8; 3]> {
        if let Some((cd, byte, bit)) = self.field_pointer {
            let [hi, lo] = byte.to_be_bytes();
            let b0 = 0x80 | if cd { 0x40 } else { 0 } | bit.map_or(0, |b| 0x08 | (b & 7));
            return Some([b0, hi, lo]);
        }
        self.progress.map(|p| {
            let [hi, lo] = p.to_be_bytes();
            [0x80, hi, lo]
        })
    }

    pub fn to_fixed(self) -> [u8; FIXED_LEN] {
        let mut s = [0u8; FIXED_LEN];
        s[0] = RESPONSE_FIXED_CURRENT;
        s[2] = self.key & 0x0f;
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[7] = (FIXED_LEN - 8) as u8;
        if let Some(c) = self.command_specific.and_then(|c| u32::try_from(c).ok()) {
            s[8..12].copy_from_slice(&c.to_be_bytes());
        }
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(sks) = self.sense_key_specific() {
            s[15..18].copy_from_slice(&sks);
        }
        s
    }

    /// Descriptor format (SPC-4 §4.5.2): the header, then an information, command-specific
    /// information and sense key specific descriptor for each field that is set. Returns the
    /// buffer and how much of it is used.
    pub fn to_descriptor(self) -> ([u8; MAX_LEN], usize) {
        let mut s = [0u8; MAX_LEN];
        s[0] = RESPONSE_DESC_CURRENT;
        s[1] = self.key & 0x0f;
        s[2] = self.asc;
        s[3] = self.ascq;
        let mut n = 8;
        // Information and command-specific descriptors: type, 0Ah, VALID (information
        // only) in byte 2, reserved byte 3, then the 8-byte field.
        for (kind, value) in [
            (desc::INFORMATION, self.information),
            (desc::COMMAND_SPECIFIC, self.command_specific),
        ] {
            if let Some(v) = value {
                s[n] = kind;
                s[n + 1] = 0x0a;
                if kind == desc::INFORMATION {
                    s[n + 2] = 0x80;
                }
                s[n + 4..n + 12].copy_from_slice(&v.to_be_bytes());
                n += 12;
            }
        }
        if let Some(sks) = self.sense_key_specific() {
            s[n] = desc::SENSE_KEY_SPECIFIC;
            s[n + 1] = 0x06;
            s[n + 4..n + 7].copy_from_slice(&sks);
            n += 8;
        }
        s[7] = (n - 8) as u8;
        (s, n)
    }

    /// The sense data in `format`: the buffer and how much of it is used.
    pub fn encode(self, format: Format) -> ([u8; MAX_LEN], usize) {
        match format {
            Format::Descriptor => self.to_descriptor(),
            Format::Fixed => {
                let mut s = [0u8; MAX_LEN];
                s[..FIXED_LEN].copy_from_slice(&self.to_fixed());
                (s, FIXED_LEN)
            }
        }
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
        // An INFORMATION value beyond four bytes: VALID clear, the field zero.
        let s = Sense {
            information: Some(1 << 40),
            ..Sense::new(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
        }
        .to_fixed();
        assert_eq!((s[0], &s[3..7]), (0x70, &[0u8; 4][..]));
        let s = Sense {
            progress: Some(0x8000),
            ..Sense::new(NOT_READY, (0x04, 0x04))
        }
        .to_fixed();
        assert_eq!(&s[15..18], &[0x80, 0x80, 0x00]);
    }

    #[test]
    fn descriptor_format() {
        // Header only.
        let (s, n) = Sense::new(UNIT_ATTENTION, POWER_ON_RESET).to_descriptor();
        assert_eq!(&s[..n], &[0x72, UNIT_ATTENTION, 0x29, 0, 0, 0, 0, 0]);
        // A field pointer: one sense key specific descriptor.
        let (s, n) = Sense::invalid_param_bit(7, 2).to_descriptor();
        assert_eq!(n, 16);
        assert_eq!(&s[..8], &[0x72, ILLEGAL_REQUEST, 0x26, 0, 0, 0, 0, 8]);
        assert_eq!(&s[8..16], &[0x02, 0x06, 0, 0, 0x80 | 0x08 | 2, 0, 7, 0]);
        // Information (eight bytes, VALID), command-specific and progress, in that order.
        let (s, n) = Sense {
            information: Some(1 << 40),
            command_specific: Some(5),
            progress: Some(0x1234),
            ..Sense::new(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
        }
        .to_descriptor();
        assert_eq!(n, 8 + 12 + 12 + 8);
        assert_eq!(s[7] as usize, n - 8);
        assert_eq!(&s[8..12], &[0x00, 0x0a, 0x80, 0]);
        assert_eq!(&s[12..20], &(1u64 << 40).to_be_bytes());
        assert_eq!(&s[20..24], &[0x01, 0x0a, 0, 0]);
        assert_eq!(&s[24..32], &5u64.to_be_bytes());
        assert_eq!(&s[32..40], &[0x02, 0x06, 0, 0, 0x80, 0x12, 0x34, 0]);
        // The two formats carry the same key and codes.
        let x = Sense::invalid_cdb_field(4, None);
        let (d, _) = x.encode(Format::Descriptor);
        let (f, n) = x.encode(Format::Fixed);
        assert_eq!(n, FIXED_LEN);
        assert_eq!((d[1], d[2], d[3]), (f[2], f[12], f[13]));
        assert_eq!(&d[12..15], &f[15..18]);
    }
}

//! The iSCSI PDU codec (RFC 7143 §11): a checked view of the Basic Header Segment and one
//! typed structure per opcode, each with `parse` (from the 48-byte BHS and its AHS) and `emit`
//! (into a 48-byte BHS, DataSegmentLength included). Parsing never panics: every accessor reads
//! a fixed offset of an array whose length the type guarantees.
#![forbid(unsafe_code)]

/// RFC 7143 §11.2: the Basic Header Segment is 48 bytes.
pub const BHS_LEN: usize = 48;
/// RFC 7143 §11.2.1.8: the reserved tag value (0xffffffff).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Rounds a data segment length up to the 4-byte boundary the padding fills.
pub fn padded(len: usize) -> usize {
    (len + 3) & !3
}

mod field {
    use std::ops::Range;
    pub const OPCODE: usize = 0;
    pub const FLAGS: usize = 1;
    pub const TOTAL_AHS: usize = 4;
    pub const DATA_LEN: Range<usize> = 5..8;
    pub const LUN: Range<usize> = 8..16;
    pub const ITT: Range<usize> = 16..20;
    pub const W20: Range<usize> = 20..24;
    pub const W24: Range<usize> = 24..28;
    pub const W28: Range<usize> = 28..32;
    pub const W32: Range<usize> = 32..36;
    pub const W36: Range<usize> = 36..40;
    pub const W40: Range<usize> = 40..44;
    pub const W44: Range<usize> = 44..48;
    pub const CDB: Range<usize> = 32..48;
}

/// Opcodes (RFC 7143 §11.2.1.2).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub const REJECT_DATA_DIGEST_ERROR: u8 = 0x02;
pub const REJECT_SNACK_REJECT: u8 = 0x03;
pub const REJECT_PROTOCOL_ERROR: u8 = 0x04;
pub const REJECT_COMMAND_NOT_SUPPORTED: u8 = 0x05;
pub const REJECT_IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
pub const REJECT_TASK_IN_PROGRESS: u8 = 0x07;
pub const REJECT_INVALID_DATA_ACK: u8 = 0x08;
pub const REJECT_INVALID_PDU_FIELD: u8 = 0x09;
pub const REJECT_OUT_OF_RESOURCES: u8 = 0x0a;
pub const REJECT_WAITING_FOR_LOGOUT: u8 = 0x0c;

/// Task management functions (RFC 7143 §11.5.1).
pub const TMF_ABORT_TASK: u8 = 1;
pub const TMF_ABORT_TASK_SET: u8 = 2;
pub const TMF_CLEAR_ACA: u8 = 3;
pub const TMF_CLEAR_TASK_SET: u8 = 4;
pub const TMF_LOGICAL_UNIT_RESET: u8 = 5;
pub const TMF_TARGET_WARM_RESET: u8 = 6;
pub const TMF_TARGET_COLD_RESET: u8 = 7;
pub const TMF_TASK_REASSIGN: u8 = 8;

/// Task management responses (RFC 7143 §11.6.1).
pub const TMF_RSP_COMPLETE: u8 = 0;
pub const TMF_RSP_TASK_DOES_NOT_EXIST: u8 = 1;
pub const TMF_RSP_LUN_DOES_NOT_EXIST: u8 = 2;
pub const TMF_RSP_TASK_STILL_ALLEGIANT: u8 = 3;
pub const TMF_RSP_REASSIGN_NOT_SUPPORTED: u8 = 4;
pub const TMF_RSP_NOT_SUPPORTED: u8 = 5;
pub const TMF_RSP_AUTHORIZATION_FAILED: u8 = 6;
pub const TMF_RSP_REJECTED: u8 = 255;

/// Why a header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum PduError {
    /// header shorter than 48 bytes
    Truncated,
    /// unknown opcode {0:#04x}
    UnknownOpcode(u8),
    /// malformed additional header segment: {0}
    BadAhs(&'static str),
}

/// A checked view of a BHS (smoltcp style): after `new_checked` no accessor can panic.
#[derive(Debug, Clone, Copy)]
pub struct Bhs<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Bhs<T> {
    pub fn new_checked(buffer: T) -> Result<Self, PduError> {
        if buffer.as_ref().len() < BHS_LEN {
            return Err(PduError::Truncated);
        }
        Ok(Bhs { buffer })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn opcode(&self) -> u8 {
        self.b()[field::OPCODE] & 0x3f
    }

    pub fn immediate(&self) -> bool {
        self.b()[field::OPCODE] & 0x40 != 0
    }

    pub fn final_flag(&self) -> bool {
        self.b()[field::FLAGS] & 0x80 != 0
    }

    /// TotalAHSLength in bytes.
    pub fn total_ahs_length(&self) -> usize {
        usize::from(self.b()[field::TOTAL_AHS]) * 4
    }

    pub fn data_segment_length(&self) -> u32 {
        let d = &self.b()[field::DATA_LEN];
        (u32::from(d[0]) << 16) | (u32::from(d[1]) << 8) | u32::from(d[2])
    }

    pub fn lun(&self) -> u64 {
        be64(&self.b()[field::LUN])
    }

    pub fn itt(&self) -> u32 {
        be32(&self.b()[field::ITT])
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn w32(b: &[u8; BHS_LEN], r: std::ops::Range<usize>) -> u32 {
    be32(&b[r])
}

fn put32(b: &mut [u8; BHS_LEN], r: std::ops::Range<usize>, v: u32) {
    b[r].copy_from_slice(&v.to_be_bytes());
}

fn put_header(
    b: &mut [u8; BHS_LEN],
    opcode: u8,
    immediate: bool,
    flags: u8,
    ahs_len: usize,
    data_len: u32,
) {
    *b = [0u8; BHS_LEN];
    b[field::OPCODE] = opcode | if immediate { 0x40 } else { 0 };
    b[field::FLAGS] = flags;
    b[field::TOTAL_AHS] = (ahs_len / 4) as u8;
    let d = data_len.min(0x00ff_ffff);
    b[5] = (d >> 16) as u8;
    b[6] = (d >> 8) as u8;
    b[7] = d as u8;
}

fn data_len(b: &[u8; BHS_LEN]) -> u32 {
    (u32::from(b[5]) << 16) | (u32::from(b[6]) << 8) | u32::from(b[7])
}

fn lun(b: &[u8; BHS_LEN]) -> u64 {
    be64(&b[field::LUN])
}

fn put_lun(b: &mut [u8; BHS_LEN], v: u64) {
    b[field::LUN].copy_from_slice(&v.to_be_bytes());
}

/// SAM-5 §4.6: the LUN of a peripheral-device or flat addressing 8-byte LUN field (first
/// level only); other address methods keep their raw first-level value.
pub fn decode_lun(raw: u64) -> u64 {
    let top = (raw >> 48) as u16;
    match top >> 14 {
        // Peripheral device addressing: bus 0, target LUN in the low byte.
        0 => u64::from(top & 0xff),
        // Flat space addressing: 14 bits.
        1 => u64::from(top & 0x3fff),
        _ => u64::from(top),
    }
}

/// The 8-byte LUN field for `lun` (peripheral addressing below 256, flat above).
pub fn encode_lun(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        ((0x4000 | (lun & 0x3fff)) << 48) & 0xffff_0000_0000_0000
    }
}

/// The largest CDB an Extended CDB AHS may complete (RFC 7143 §11.2.2.3: 16 + up to 244).
pub const MAX_CDB: usize = 260;

/// SCSI Command (RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_flag: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
    /// CDB bytes beyond 16 from an Extended CDB AHS (empty for most commands).
    pub ext_cdb: Vec<u8>,
    /// Bidirectional Read Expected Data Transfer Length AHS.
    pub bidi_read_length: Option<u32>,
    pub data_segment_length: u32,
}

impl Default for ScsiCommand {
    fn default() -> Self {
        ScsiCommand {
            immediate: false,
            final_flag: true,
            read: false,
            write: false,
            attr: 1,
            lun: 0,
            itt: 0,
            expected_data_transfer_length: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: [0; 16],
            ext_cdb: Vec::new(),
            bidi_read_length: None,
            data_segment_length: 0,
        }
    }
}

impl ScsiCommand {
    pub fn parse(b: &[u8; BHS_LEN], ahs: &[u8]) -> Result<Self, PduError> {
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&b[field::CDB]);
        let mut cmd = ScsiCommand {
            immediate: b[0] & 0x40 != 0,
            final_flag: b[1] & 0x80 != 0,
            read: b[1] & 0x40 != 0,
            write: b[1] & 0x20 != 0,
            attr: b[1] & 0x07,
            lun: lun(b),
            itt: w32(b, field::ITT),
            expected_data_transfer_length: w32(b, field::W20),
            cmd_sn: w32(b, field::W24),
            exp_stat_sn: w32(b, field::W28),
            cdb,
            ext_cdb: Vec::new(),
            bidi_read_length: None,
            data_segment_length: data_len(b),
        };
        // AHS (RFC 7143 §11.2.2): AHSLength (2), AHSType (1), specific (1), then data,
        // padded to 4 bytes.
        let mut rest = ahs;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(PduError::BadAhs("shorter than its header"));
            }
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let ty = rest[2] & 0x3f;
            let total = padded(3 + len).max(4);
            if rest.len() < total || len == 0 {
                return Err(PduError::BadAhs("length runs past the AHS"));
            }
            let body = &rest[4..3 + len];
            match ty {
                1 => {
                    // Extended CDB: AHSLength counts the reserved byte too.
                    if body.len() > MAX_CDB - 16 {
                        return Err(PduError::BadAhs("extended CDB too long"));
                    }
                    cmd.ext_cdb = body.to_vec();
                }
                2 => {
                    if len != 5 {
                        return Err(PduError::BadAhs(
                            "bidirectional read length AHS must be 5 bytes",
                        ));
                    }
                    cmd.bidi_read_length = Some(be32(body));
                }
                _ => return Err(PduError::BadAhs("unknown AHS type")),
            }
            rest = &rest[total..];
        }
        Ok(cmd)
    }

    /// The AHS bytes this command needs (extended CDB, bidirectional length).
    pub fn ahs(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.ext_cdb.is_empty() {
            let len = (self.ext_cdb.len() + 1) as u16;
            out.extend_from_slice(&len.to_be_bytes());
            out.push(1);
            out.push(0);
            out.extend_from_slice(&self.ext_cdb);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        }
        if let Some(l) = self.bidi_read_length {
            out.extend_from_slice(&[0, 5, 2, 0]);
            out.extend_from_slice(&l.to_be_bytes());
        }
        out
    }

    pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
        let flags = (u8::from(self.final_flag) << 7)
            | (u8::from(self.read) << 6)
            | (u8::from(self.write) << 5)
            | (self.attr & 0x07);
        put_header(
            b,
            op::SCSI_COMMAND,
            self.immediate,
            flags,
            self.ahs().len(),
            self.data_segment_length,
        );
        put_lun(b, self.lun);
        put32(b, field::ITT, self.itt);
        put32(b, field::W20, self.expected_data_transfer_length);
        put32(b, field::W24, self.cmd_sn);
        put32(b, field::W28, self.exp_stat_sn);
        b[field::CDB].copy_from_slice(&self.cdb);
    }
}

macro_rules! simple_pdu {
    (
        $(#[$m:meta])* $name:ident, $op:expr, flags($($fl:ident: $bit:expr),*),
        fields { $($f:ident: $t:ty = $r:expr),* $(,)? }
        $(, extra { $($ef:ident: $et:ty => $get:expr, $set:expr);* $(;)? })?
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            pub immediate: bool,
            $(pub $fl: bool,)*
            pub lun: u64,
            pub itt: u32,
            $(pub $f: $t,)*
            $($(pub $ef: $et,)*)?
            pub data_segment_length: u32,
        }

        impl $name {
            pub fn parse(b: &[u8; BHS_LEN], _ahs: &[u8]) -> Result<Self, PduError> {
                #[allow(unused_variables)]
                let flags = b[field::FLAGS];
                Ok($name {
                    immediate: b[0] & 0x40 != 0,
                    $($fl: flags & $bit != 0,)*
                    lun: lun(b),
                    itt: w32(b, field::ITT),
                    $($f: w32(b, $r) as $t,)*
                    $($($ef: ($get)(b),)*)?
                    data_segment_length: data_len(b),
                })
            }

            pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
                #[allow(unused_mut)]
                let mut flags = 0u8;
                $(if self.$fl { flags |= $bit; })*
                put_header(b, $op, self.immediate, flags, 0, self.data_segment_length);
                put_lun(b, self.lun);
                put32(b, field::ITT, self.itt);
                $(put32(b, $r, self.$f as u32);)*
                $($(($set)(b, self.$ef);)*)?
            }
        }
    };
}

simple_pdu!(
    /// NOP-Out (RFC 7143 §11.18).
    NopOut, op::NOP_OUT, flags(final_flag: 0x80),
    fields { ttt: u32 = field::W20, cmd_sn: u32 = field::W24, exp_stat_sn: u32 = field::W28 }
);

simple_pdu!(
    /// NOP-In (RFC 7143 §11.19).
    NopIn, op::NOP_IN, flags(final_flag: 0x80),
    fields { ttt: u32 = field::W20, stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28, max_cmd_sn: u32 = field::W32 }
);

simple_pdu!(
    /// SCSI Data-Out (RFC 7143 §11.7).
    DataOut, op::DATA_OUT, flags(final_flag: 0x80),
    fields { ttt: u32 = field::W20, exp_stat_sn: u32 = field::W28, data_sn: u32 = field::W36, buffer_offset: u32 = field::W40 }
);

simple_pdu!(
    /// Ready To Transfer (RFC 7143 §11.8).
    R2t, op::R2T, flags(final_flag: 0x80),
    fields {
        ttt: u32 = field::W20, stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28,
        max_cmd_sn: u32 = field::W32, r2t_sn: u32 = field::W36, buffer_offset: u32 = field::W40,
        desired_data_transfer_length: u32 = field::W44,
    }
);

simple_pdu!(
    /// Text Request (RFC 7143 §11.10).
    TextRequest, op::TEXT_REQUEST, flags(final_flag: 0x80, cont: 0x40),
    fields { ttt: u32 = field::W20, cmd_sn: u32 = field::W24, exp_stat_sn: u32 = field::W28 }
);

simple_pdu!(
    /// Text Response (RFC 7143 §11.11).
    TextResponse, op::TEXT_RESPONSE, flags(final_flag: 0x80, cont: 0x40),
    fields { ttt: u32 = field::W20, stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28, max_cmd_sn: u32 = field::W32 }
);

simple_pdu!(
    /// Task Management Function Request (RFC 7143 §11.5).
    TaskMgmtRequest, op::TASK_MGMT_REQUEST, flags(),
    fields {
        referenced_task_tag: u32 = field::W20, cmd_sn: u32 = field::W24, exp_stat_sn: u32 = field::W28,
        ref_cmd_sn: u32 = field::W32, exp_data_sn: u32 = field::W36,
    },
    extra { function: u8 => |b: &[u8; BHS_LEN]| b[1] & 0x7f, |b: &mut [u8; BHS_LEN], v: u8| b[1] = 0x80 | (v & 0x7f); }
);

simple_pdu!(
    /// Task Management Function Response (RFC 7143 §11.6).
    TaskMgmtResponse, op::TASK_MGMT_RESPONSE, flags(),
    fields { stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28, max_cmd_sn: u32 = field::W32 },
    extra { response: u8 => |b: &[u8; BHS_LEN]| b[2], |b: &mut [u8; BHS_LEN], v: u8| { b[1] = 0x80; b[2] = v; }; }
);

simple_pdu!(
    /// Logout Request (RFC 7143 §11.14).
    LogoutRequest, op::LOGOUT_REQUEST, flags(),
    fields { cmd_sn: u32 = field::W24, exp_stat_sn: u32 = field::W28 },
    extra {
        reason_code: u8 => |b: &[u8; BHS_LEN]| b[1] & 0x7f, |b: &mut [u8; BHS_LEN], v: u8| b[1] = 0x80 | (v & 0x7f);
        cid: u16 => |b: &[u8; BHS_LEN]| u16::from_be_bytes([b[20], b[21]]), |b: &mut [u8; BHS_LEN], v: u16| b[20..22].copy_from_slice(&v.to_be_bytes());
    }
);

simple_pdu!(
    /// Logout Response (RFC 7143 §11.15).
    LogoutResponse, op::LOGOUT_RESPONSE, flags(),
    fields { stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28, max_cmd_sn: u32 = field::W32 },
    extra {
        response: u8 => |b: &[u8; BHS_LEN]| b[2], |b: &mut [u8; BHS_LEN], v: u8| { b[1] = 0x80; b[2] = v; };
        time2wait: u16 => |b: &[u8; BHS_LEN]| u16::from_be_bytes([b[40], b[41]]), |b: &mut [u8; BHS_LEN], v: u16| b[40..42].copy_from_slice(&v.to_be_bytes());
        time2retain: u16 => |b: &[u8; BHS_LEN]| u16::from_be_bytes([b[42], b[43]]), |b: &mut [u8; BHS_LEN], v: u16| b[42..44].copy_from_slice(&v.to_be_bytes());
    }
);

simple_pdu!(
    /// SNACK Request (RFC 7143 §11.16).
    Snack, op::SNACK, flags(),
    fields { ttt: u32 = field::W20, exp_stat_sn: u32 = field::W28, beg_run: u32 = field::W40, run_length: u32 = field::W44 },
    extra { snack_type: u8 => |b: &[u8; BHS_LEN]| b[1] & 0x0f, |b: &mut [u8; BHS_LEN], v: u8| b[1] = 0x80 | (v & 0x0f); }
);

simple_pdu!(
    /// Reject (RFC 7143 §11.17); its data segment is the rejected PDU's header.
    Reject, op::REJECT, flags(),
    fields { stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28, max_cmd_sn: u32 = field::W32, data_sn: u32 = field::W36 },
    extra { reason: u8 => |b: &[u8; BHS_LEN]| b[2], |b: &mut [u8; BHS_LEN], v: u8| { b[1] = 0x80; b[2] = v; b[16..20].copy_from_slice(&[0xff; 4]); }; }
);

simple_pdu!(
    /// Asynchronous Message (RFC 7143 §11.9).
    AsyncMessage, op::ASYNC, flags(),
    fields { stat_sn: u32 = field::W24, exp_cmd_sn: u32 = field::W28, max_cmd_sn: u32 = field::W32 },
    extra {
        async_event: u8 => |b: &[u8; BHS_LEN]| b[36], |b: &mut [u8; BHS_LEN], v: u8| { b[1] = 0x80; b[16..20].copy_from_slice(&[0xff; 4]); b[36] = v; };
        async_vcode: u8 => |b: &[u8; BHS_LEN]| b[37], |b: &mut [u8; BHS_LEN], v: u8| b[37] = v;
        parameter1: u16 => |b: &[u8; BHS_LEN]| u16::from_be_bytes([b[38], b[39]]), |b: &mut [u8; BHS_LEN], v: u16| b[38..40].copy_from_slice(&v.to_be_bytes());
        parameter2: u16 => |b: &[u8; BHS_LEN]| u16::from_be_bytes([b[40], b[41]]), |b: &mut [u8; BHS_LEN], v: u16| b[40..42].copy_from_slice(&v.to_be_bytes());
        parameter3: u16 => |b: &[u8; BHS_LEN]| u16::from_be_bytes([b[42], b[43]]), |b: &mut [u8; BHS_LEN], v: u16| b[42..44].copy_from_slice(&v.to_be_bytes());
    }
);

/// SCSI Data-In (RFC 7143 §11.7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataIn {
    pub final_flag: bool,
    pub acknowledge: bool,
    pub residual_overflow: bool,
    pub residual_underflow: bool,
    pub status_flag: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual_count: u32,
    pub data_segment_length: u32,
}

impl DataIn {
    pub fn parse(b: &[u8; BHS_LEN], _ahs: &[u8]) -> Result<Self, PduError> {
        let f = b[1];
        Ok(DataIn {
            final_flag: f & 0x80 != 0,
            acknowledge: f & 0x40 != 0,
            residual_overflow: f & 0x04 != 0,
            residual_underflow: f & 0x02 != 0,
            status_flag: f & 0x01 != 0,
            status: b[3],
            lun: lun(b),
            itt: w32(b, field::ITT),
            ttt: w32(b, field::W20),
            stat_sn: w32(b, field::W24),
            exp_cmd_sn: w32(b, field::W28),
            max_cmd_sn: w32(b, field::W32),
            data_sn: w32(b, field::W36),
            buffer_offset: w32(b, field::W40),
            residual_count: w32(b, field::W44),
            data_segment_length: data_len(b),
        })
    }

    pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
        let flags = (u8::from(self.final_flag) << 7)
            | (u8::from(self.acknowledge) << 6)
            | (u8::from(self.residual_overflow) << 2)
            | (u8::from(self.residual_underflow) << 1)
            | u8::from(self.status_flag);
        put_header(b, op::DATA_IN, false, flags, 0, self.data_segment_length);
        if self.status_flag {
            b[3] = self.status;
        }
        put_lun(b, self.lun);
        put32(b, field::ITT, self.itt);
        put32(b, field::W20, self.ttt);
        put32(b, field::W24, self.stat_sn);
        put32(b, field::W28, self.exp_cmd_sn);
        put32(b, field::W32, self.max_cmd_sn);
        put32(b, field::W36, self.data_sn);
        put32(b, field::W40, self.buffer_offset);
        put32(b, field::W44, self.residual_count);
    }
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub residual_overflow: bool,
    pub residual_underflow: bool,
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_read_residual_count: u32,
    pub residual_count: u32,
    pub data_segment_length: u32,
}

impl ScsiResponse {
    pub fn parse(b: &[u8; BHS_LEN], _ahs: &[u8]) -> Result<Self, PduError> {
        let f = b[1];
        Ok(ScsiResponse {
            bidi_overflow: f & 0x10 != 0,
            bidi_underflow: f & 0x08 != 0,
            residual_overflow: f & 0x04 != 0,
            residual_underflow: f & 0x02 != 0,
            response: b[2],
            status: b[3],
            itt: w32(b, field::ITT),
            snack_tag: w32(b, field::W20),
            stat_sn: w32(b, field::W24),
            exp_cmd_sn: w32(b, field::W28),
            max_cmd_sn: w32(b, field::W32),
            exp_data_sn: w32(b, field::W36),
            bidi_read_residual_count: w32(b, field::W40),
            residual_count: w32(b, field::W44),
            data_segment_length: data_len(b),
        })
    }

    pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
        let flags = 0x80
            | (u8::from(self.bidi_overflow) << 4)
            | (u8::from(self.bidi_underflow) << 3)
            | (u8::from(self.residual_overflow) << 2)
            | (u8::from(self.residual_underflow) << 1);
        put_header(
            b,
            op::SCSI_RESPONSE,
            false,
            flags,
            0,
            self.data_segment_length,
        );
        b[2] = self.response;
        b[3] = self.status;
        put32(b, field::ITT, self.itt);
        put32(b, field::W20, self.snack_tag);
        put32(b, field::W24, self.stat_sn);
        put32(b, field::W28, self.exp_cmd_sn);
        put32(b, field::W32, self.max_cmd_sn);
        put32(b, field::W36, self.exp_data_sn);
        put32(b, field::W40, self.bidi_read_residual_count);
        put32(b, field::W44, self.residual_count);
    }
}

/// Login Request (RFC 7143 §11.12).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data_segment_length: u32,
}

impl LoginRequest {
    pub fn parse(b: &[u8; BHS_LEN], _ahs: &[u8]) -> Result<Self, PduError> {
        let f = b[1];
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b[8..14]);
        Ok(LoginRequest {
            transit: f & 0x80 != 0,
            cont: f & 0x40 != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: b[2],
            version_min: b[3],
            isid,
            tsih: u16::from_be_bytes([b[14], b[15]]),
            itt: w32(b, field::ITT),
            cid: u16::from_be_bytes([b[20], b[21]]),
            cmd_sn: w32(b, field::W24),
            exp_stat_sn: w32(b, field::W28),
            data_segment_length: data_len(b),
        })
    }

    pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
        let flags = (u8::from(self.transit) << 7)
            | (u8::from(self.cont) << 6)
            | ((self.csg & 3) << 2)
            | (self.nsg & 3);
        // RFC 7143 §11.12: Login Requests are always immediate.
        put_header(
            b,
            op::LOGIN_REQUEST,
            true,
            flags,
            0,
            self.data_segment_length,
        );
        b[2] = self.version_max;
        b[3] = self.version_min;
        b[8..14].copy_from_slice(&self.isid);
        b[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        put32(b, field::ITT, self.itt);
        b[20..22].copy_from_slice(&self.cid.to_be_bytes());
        put32(b, field::W24, self.cmd_sn);
        put32(b, field::W28, self.exp_stat_sn);
    }
}

/// Login Response (RFC 7143 §11.13).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data_segment_length: u32,
}

impl LoginResponse {
    pub fn parse(b: &[u8; BHS_LEN], _ahs: &[u8]) -> Result<Self, PduError> {
        let f = b[1];
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b[8..14]);
        Ok(LoginResponse {
            transit: f & 0x80 != 0,
            cont: f & 0x40 != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: b[2],
            version_active: b[3],
            isid,
            tsih: u16::from_be_bytes([b[14], b[15]]),
            itt: w32(b, field::ITT),
            stat_sn: w32(b, field::W24),
            exp_cmd_sn: w32(b, field::W28),
            max_cmd_sn: w32(b, field::W32),
            status_class: b[36],
            status_detail: b[37],
            data_segment_length: data_len(b),
        })
    }

    pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
        let flags = (u8::from(self.transit) << 7)
            | (u8::from(self.cont) << 6)
            | ((self.csg & 3) << 2)
            | (self.nsg & 3);
        put_header(
            b,
            op::LOGIN_RESPONSE,
            false,
            flags,
            0,
            self.data_segment_length,
        );
        b[2] = self.version_max;
        b[3] = self.version_active;
        b[8..14].copy_from_slice(&self.isid);
        b[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        put32(b, field::ITT, self.itt);
        put32(b, field::W24, self.stat_sn);
        put32(b, field::W28, self.exp_cmd_sn);
        put32(b, field::W32, self.max_cmd_sn);
        b[36] = self.status_class;
        b[37] = self.status_detail;
    }
}

/// Any PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(Snack),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl Pdu {
    /// Parses a BHS and its AHS by opcode.
    pub fn parse(b: &[u8; BHS_LEN], ahs: &[u8]) -> Result<Pdu, PduError> {
        Ok(match b[0] & 0x3f {
            op::NOP_OUT => Pdu::NopOut(NopOut::parse(b, ahs)?),
            op::SCSI_COMMAND => Pdu::ScsiCommand(ScsiCommand::parse(b, ahs)?),
            op::TASK_MGMT_REQUEST => Pdu::TaskMgmtRequest(TaskMgmtRequest::parse(b, ahs)?),
            op::LOGIN_REQUEST => Pdu::LoginRequest(LoginRequest::parse(b, ahs)?),
            op::TEXT_REQUEST => Pdu::TextRequest(TextRequest::parse(b, ahs)?),
            op::DATA_OUT => Pdu::DataOut(DataOut::parse(b, ahs)?),
            op::LOGOUT_REQUEST => Pdu::LogoutRequest(LogoutRequest::parse(b, ahs)?),
            op::SNACK => Pdu::Snack(Snack::parse(b, ahs)?),
            op::NOP_IN => Pdu::NopIn(NopIn::parse(b, ahs)?),
            op::SCSI_RESPONSE => Pdu::ScsiResponse(ScsiResponse::parse(b, ahs)?),
            op::TASK_MGMT_RESPONSE => Pdu::TaskMgmtResponse(TaskMgmtResponse::parse(b, ahs)?),
            op::LOGIN_RESPONSE => Pdu::LoginResponse(LoginResponse::parse(b, ahs)?),
            op::TEXT_RESPONSE => Pdu::TextResponse(TextResponse::parse(b, ahs)?),
            op::DATA_IN => Pdu::DataIn(DataIn::parse(b, ahs)?),
            op::LOGOUT_RESPONSE => Pdu::LogoutResponse(LogoutResponse::parse(b, ahs)?),
            op::R2T => Pdu::R2t(R2t::parse(b, ahs)?),
            op::ASYNC => Pdu::AsyncMessage(AsyncMessage::parse(b, ahs)?),
            op::REJECT => Pdu::Reject(Reject::parse(b, ahs)?),
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }

    pub fn emit(&self, b: &mut [u8; BHS_LEN]) {
        match self {
            Pdu::NopOut(p) => p.emit(b),
            Pdu::ScsiCommand(p) => p.emit(b),
            Pdu::TaskMgmtRequest(p) => p.emit(b),
            Pdu::LoginRequest(p) => p.emit(b),
            Pdu::TextRequest(p) => p.emit(b),
            Pdu::DataOut(p) => p.emit(b),
            Pdu::LogoutRequest(p) => p.emit(b),
            Pdu::Snack(p) => p.emit(b),
            Pdu::NopIn(p) => p.emit(b),
            Pdu::ScsiResponse(p) => p.emit(b),
            Pdu::TaskMgmtResponse(p) => p.emit(b),
            Pdu::LoginResponse(p) => p.emit(b),
            Pdu::TextResponse(p) => p.emit(b),
            Pdu::DataIn(p) => p.emit(b),
            Pdu::LogoutResponse(p) => p.emit(b),
            Pdu::R2t(p) => p.emit(b),
            Pdu::AsyncMessage(p) => p.emit(b),
            Pdu::Reject(p) => p.emit(b),
        }
    }

    /// The AHS bytes that go between the BHS and the data segment.
    pub fn ahs(&self) -> Vec<u8> {
        match self {
            Pdu::ScsiCommand(c) => c.ahs(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn scsi_command_layout() {
        let cmd = ScsiCommand {
            read: true,
            lun: encode_lun(3),
            itt: 0x01020304,
            expected_data_transfer_length: 4096,
            cmd_sn: 9,
            exp_stat_sn: 5,
            cdb: [0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        let mut b = [0u8; BHS_LEN];
        cmd.emit(&mut b);
        assert_eq!(b[0], 0x01);
        assert_eq!(b[1], 0xc1, "F, R and ATTR=simple");
        assert_eq!(&b[8..10], &[0, 3]);
        assert_eq!(&b[16..20], &[1, 2, 3, 4]);
        assert_eq!(&b[20..24], &4096u32.to_be_bytes());
        assert_eq!(b[32], 0x28);
        assert_eq!(Pdu::parse(&b, &[]).unwrap(), Pdu::ScsiCommand(cmd));
        assert_eq!(decode_lun(encode_lun(3)), 3);
        assert_eq!(decode_lun(encode_lun(300)), 300);
    }

    #[test]
    fn login_response_layout() {
        let r = LoginResponse {
            transit: true,
            csg: 1,
            nsg: 3,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 7,
            itt: 1,
            stat_sn: 2,
            status_class: 2,
            status_detail: 3,
            data_segment_length: 300,
            ..Default::default()
        };
        let mut b = [0u8; BHS_LEN];
        r.emit(&mut b);
        assert_eq!(b[0], 0x23);
        assert_eq!(b[1], 0x87);
        assert_eq!(&b[5..8], &[0, 1, 44]);
        assert_eq!(&b[14..16], &[0, 7]);
        assert_eq!((b[36], b[37]), (2, 3));
        assert_eq!(LoginResponse::parse(&b, &[]).unwrap(), r);
    }

    #[test]
    fn data_in_with_status() {
        let d = DataIn {
            final_flag: true,
            status_flag: true,
            residual_underflow: true,
            status: 0,
            itt: 5,
            ttt: RESERVED_TAG,
            data_sn: 2,
            buffer_offset: 8192,
            residual_count: 100,
            data_segment_length: 512,
            ..Default::default()
        };
        let mut b = [0u8; BHS_LEN];
        d.emit(&mut b);
        assert_eq!(b[1], 0x83);
        assert_eq!(Pdu::parse(&b, &[]).unwrap(), Pdu::DataIn(d));
    }

    #[test]
    fn extended_cdb_ahs() {
        let cmd = ScsiCommand {
            ext_cdb: vec![7; 16],
            bidi_read_length: Some(77),
            ..Default::default()
        };
        let mut b = [0u8; BHS_LEN];
        cmd.emit(&mut b);
        let ahs = cmd.ahs();
        assert_eq!(usize::from(b[4]) * 4, ahs.len());
        assert_eq!(ScsiCommand::parse(&b, &ahs).unwrap(), cmd);
        assert!(ScsiCommand::parse(&b, &ahs[..ahs.len() - 4]).is_err());
        assert!(ScsiCommand::parse(&b, &[0, 200, 1, 0]).is_err());
        assert!(ScsiCommand::parse(&b, &[0, 4, 9, 0, 1, 2, 3, 4]).is_err());
    }

    #[test]
    fn unknown_opcode() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x1d;
        assert_eq!(Pdu::parse(&b, &[]), Err(PduError::UnknownOpcode(0x1d)));
        assert!(Bhs::new_checked(&b[..47]).is_err());
        let v = Bhs::new_checked(&b[..]).unwrap();
        assert_eq!(v.opcode(), 0x1d);
    }

    proptest! {
        #[test]
        fn any_header_parses_without_panic(bytes in proptest::collection::vec(any::<u8>(), 48), ahs in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = [0u8; BHS_LEN];
            b.copy_from_slice(&bytes);
            if let Ok(p) = Pdu::parse(&b, &ahs) {
                // Whatever parses re-emits to a header that parses again.
                let mut again = [0u8; BHS_LEN];
                p.emit(&mut again);
                let ahs2 = p.ahs();
                prop_assert!(Pdu::parse(&again, &ahs2).is_ok());
            }
        }

        #[test]
        fn round_trips(itt in any::<u32>(), a in any::<u32>(), b2 in any::<u32>(), c in any::<u32>(), len in 0u32..0xffffff, flag in any::<bool>(), lun in 0u64..16384) {
            let pdus = vec![
                Pdu::NopOut(NopOut { immediate: flag, final_flag: true, lun: encode_lun(lun), itt, ttt: a, cmd_sn: b2, exp_stat_sn: c, data_segment_length: len }),
                Pdu::NopIn(NopIn { final_flag: true, itt, ttt: a, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, data_segment_length: len, ..Default::default() }),
                Pdu::DataOut(DataOut { final_flag: flag, itt, ttt: a, exp_stat_sn: b2, data_sn: c, buffer_offset: a, data_segment_length: len, ..Default::default() }),
                Pdu::R2t(R2t { final_flag: true, itt, ttt: a, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, r2t_sn: b2, buffer_offset: c, desired_data_transfer_length: a, ..Default::default() }),
                Pdu::TextRequest(TextRequest { final_flag: flag, cont: !flag, itt, ttt: a, cmd_sn: b2, exp_stat_sn: c, data_segment_length: len, ..Default::default() }),
                Pdu::TextResponse(TextResponse { final_flag: flag, itt, ttt: a, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, data_segment_length: len, ..Default::default() }),
                Pdu::TaskMgmtRequest(TaskMgmtRequest { immediate: flag, itt, function: (a % 8) as u8 + 1, referenced_task_tag: a, cmd_sn: b2, exp_stat_sn: c, ref_cmd_sn: a, exp_data_sn: b2, ..Default::default() }),
                Pdu::TaskMgmtResponse(TaskMgmtResponse { itt, response: (a % 7) as u8, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, ..Default::default() }),
                Pdu::LogoutRequest(LogoutRequest { immediate: flag, itt, reason_code: (a % 3) as u8, cid: a as u16, cmd_sn: b2, exp_stat_sn: c, ..Default::default() }),
                Pdu::LogoutResponse(LogoutResponse { itt, response: (a % 4) as u8, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, time2wait: a as u16, time2retain: b2 as u16, ..Default::default() }),
                Pdu::Snack(Snack { itt, snack_type: (a % 4) as u8, ttt: a, exp_stat_sn: b2, beg_run: c, run_length: a, ..Default::default() }),
                Pdu::Reject(Reject { itt: RESERVED_TAG, reason: (a % 12) as u8, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, data_sn: b2, data_segment_length: 48, ..Default::default() }),
                Pdu::AsyncMessage(AsyncMessage { itt: RESERVED_TAG, lun: encode_lun(lun), async_event: (a % 5) as u8, async_vcode: b2 as u8, parameter1: a as u16, parameter2: b2 as u16, parameter3: c as u16, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, ..Default::default() }),
                Pdu::ScsiCommand(ScsiCommand { immediate: flag, read: flag, write: !flag, lun: encode_lun(lun), itt, expected_data_transfer_length: a, cmd_sn: b2, exp_stat_sn: c, cdb: [a as u8; 16], data_segment_length: len, ..Default::default() }),
                Pdu::ScsiResponse(ScsiResponse { residual_overflow: flag, residual_underflow: !flag, response: 0, status: a as u8, itt, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, exp_data_sn: b2, residual_count: c, data_segment_length: len, ..Default::default() }),
                Pdu::DataIn(DataIn { final_flag: true, status_flag: flag, status: if flag { a as u8 } else { 0 }, itt, ttt: a, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, data_sn: b2, buffer_offset: c, residual_count: a, data_segment_length: len, ..Default::default() }),
                Pdu::LoginRequest(LoginRequest { transit: flag, csg: (a % 2) as u8, nsg: 3, isid: [a as u8, 1, 2, 3, 4, 5], tsih: b2 as u16, itt, cid: c as u16, cmd_sn: b2, exp_stat_sn: c, data_segment_length: len, ..Default::default() }),
                Pdu::LoginResponse(LoginResponse { transit: flag, csg: 1, nsg: 3, isid: [1; 6], tsih: a as u16, itt, stat_sn: b2, exp_cmd_sn: c, max_cmd_sn: a, status_class: (a % 4) as u8, status_detail: b2 as u8, data_segment_length: len, ..Default::default() }),
            ];
            for p in pdus {
                let mut b = [0u8; BHS_LEN];
                p.emit(&mut b);
                prop_assert_eq!(Pdu::parse(&b, &p.ahs()).unwrap(), p);
            }
        }
    }
}

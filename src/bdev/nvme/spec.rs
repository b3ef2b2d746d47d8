//! The parts of the NVM Express Base Specification (2.0) and NVM Command Set Specification
//! (1.0) that the driver uses: controller registers (Base §3.1), queue entries (§4.2, §4.6),
//! admin and NVM opcodes, the IDENTIFY data structures it reads (§5.17, NVM CS §4.1.5), and
//! status codes (§4.6.1.2, NVM CS §4.1.1).
//!
//! Everything the controller writes (completion entries, IDENTIFY data, register values) is
//! read through checked accessors: a controller that returns garbage yields an error or a
//! nonsense value that callers range-check, never a panic.

#![forbid(unsafe_code)]

use crate::bdev::BdevError;

/// Controller register offsets in BAR0 (Base §3.1.3).
pub mod reg {
    /// Controller Capabilities (64 bits).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set / Clear.
    pub const INTMS: usize = 0x0c;
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission / Completion Queue Base Address (64 bits).
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    /// The first doorbell: SQ 0 tail. Doorbells follow with a stride of `4 << CAP.DSTRD`,
    /// SQ y tail at index `2y`, CQ y head at index `2y + 1` (Base §3.1.3.23-24).
    pub const DOORBELLS: usize = 0x1000;
}

/// Offset of SQ `qid`'s tail doorbell for a doorbell stride of `4 << dstrd` bytes.
pub fn sq_tail_doorbell(qid: u16, dstrd: u8) -> usize {
    reg::DOORBELLS + (2 * usize::from(qid)) * (4usize << dstrd)
}

/// Offset of CQ `qid`'s head doorbell.
pub fn cq_head_doorbell(qid: u16, dstrd: u8) -> usize {
    reg::DOORBELLS + (2 * usize::from(qid) + 1) * (4usize << dstrd)
}

fn bits(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

/// CAP (Base §3.1.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum Queue Entries Supported, as a count (the register is 0's based; at least 2).
    pub fn max_queue_entries(self) -> u32 {
        bits(self.0, 0, 16) as u32 + 1
    }
    /// Contiguous Queues Required.
    pub fn contiguous_required(self) -> bool {
        bits(self.0, 16, 1) == 1
    }
    /// Timeout: the worst time to wait for CSTS.RDY to change, in 500 ms units.
    pub fn timeout_ms(self) -> u64 {
        bits(self.0, 24, 8) * 500
    }
    /// Doorbell Stride: doorbells are `4 << dstrd` bytes apart.
    pub fn dstrd(self) -> u8 {
        bits(self.0, 32, 4) as u8
    }
    /// Command Sets Supported, bit 0 (of CSS at bit 37): the NVM command set.
    pub fn supports_nvm(self) -> bool {
        bits(self.0, 37, 1) == 1
    }
    /// Memory Page Size Minimum as a shift: pages of `1 << (12 + mpsmin)` bytes.
    pub fn mpsmin(self) -> u8 {
        bits(self.0, 48, 4) as u8
    }
    /// Memory Page Size Maximum, as a shift like [`Cap::mpsmin`].
    pub fn mpsmax(self) -> u8 {
        bits(self.0, 52, 4) as u8
    }
}

/// CC fields (Base §3.1.3.5).
pub mod cc {
    pub const EN: u32 = 1 << 0;
    /// I/O Command Set Selected, 000b: the NVM command set.
    pub const CSS_NVM: u32 = 0 << 4;
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected: round robin (000b).
    pub const AMS_RR: u32 = 0 << 11;
    pub const SHN_MASK: u32 = 3 << 14;
    /// Shutdown Notification: normal shutdown.
    pub const SHN_NORMAL: u32 = 1 << 14;
    pub const IOSQES_SHIFT: u32 = 16;
    pub const IOCQES_SHIFT: u32 = 20;
}

/// CSTS fields (Base §3.1.3.6).
pub mod csts {
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// log2 of the submission and completion entry sizes (CC.IOSQES, CC.IOCQES).
pub const SQE_SHIFT: u32 = 6;
pub const CQE_SHIFT: u32 = 4;
pub const SQE_SIZE: usize = 1 << SQE_SHIFT;
pub const CQE_SIZE: usize = 1 << CQE_SHIFT;

/// Admin command opcodes (Base §5, figure 139).
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
}

/// NVM command set opcodes (NVM CS §3, figure 17).
pub mod nvm {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// IDENTIFY CNS values (Base §5.17.1).
pub const CNS_NAMESPACE: u32 = 0x00;
pub const CNS_CONTROLLER: u32 = 0x01;

/// Feature identifier: Number of Queues (Base §5.27.1.5).
pub const FEAT_NUMBER_OF_QUEUES: u32 = 0x07;

/// The size of an IDENTIFY data structure.
pub const IDENTIFY_SIZE: usize = 4096;

/// A 64-byte submission queue entry (Base §4.2), kept as its 16 dwords.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqEntry {
    pub cdw: [u32; 16],
}

impl SqEntry {
    pub fn new(opcode: u8, nsid: u32) -> SqEntry {
        let mut e = SqEntry::default();
        e.cdw[0] = u32::from(opcode);
        e.cdw[1] = nsid;
        e
    }

    pub fn opcode(&self) -> u8 {
        self.cdw[0] as u8
    }

    /// Command Identifier (CDW0 bits 31:16).
    pub fn cid(&self) -> u16 {
        (self.cdw[0] >> 16) as u16
    }

    pub fn set_cid(&mut self, cid: u16) {
        self.cdw[0] = (self.cdw[0] & 0xffff) | (u32::from(cid) << 16);
    }

    pub fn nsid(&self) -> u32 {
        self.cdw[1]
    }

    /// PRP entry 1 (CDW6-7) and 2 (CDW8-9); PSDT stays 00b (PRPs).
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) {
        self.cdw[6] = prp1 as u32;
        self.cdw[7] = (prp1 >> 32) as u32;
        self.cdw[8] = prp2 as u32;
        self.cdw[9] = (prp2 >> 32) as u32;
    }

    pub fn prp1(&self) -> u64 {
        u64::from(self.cdw[6]) | (u64::from(self.cdw[7]) << 32)
    }

    pub fn prp2(&self) -> u64 {
        u64::from(self.cdw[8]) | (u64::from(self.cdw[9]) << 32)
    }

    /// Starting LBA of an NVM I/O command (CDW10-11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw[10]) | (u64::from(self.cdw[11]) << 32)
    }

    fn set_slba(&mut self, slba: u64) {
        self.cdw[10] = slba as u32;
        self.cdw[11] = (slba >> 32) as u32;
    }

    /// Number of logical blocks of an NVM I/O command, as a count (CDW12 15:0, 0's based).
    pub fn nlb(&self) -> u32 {
        (self.cdw[12] & 0xffff) + 1
    }

    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        for (d, w) in b.chunks_exact_mut(4).zip(self.cdw) {
            d.copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; SQE_SIZE]) -> SqEntry {
        let mut e = SqEntry::default();
        for (w, d) in e.cdw.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        }
        e
    }

    // Admin commands.

    /// IDENTIFY (Base §5.17): `cns` for namespace `nsid`, into the page at PRP1.
    pub fn identify(cns: u32, nsid: u32) -> SqEntry {
        let mut e = SqEntry::new(admin::IDENTIFY, nsid);
        e.cdw[10] = cns;
        e
    }

    /// CREATE I/O COMPLETION QUEUE (Base §5.4): `entries` entries, physically contiguous,
    /// interrupts disabled (completions are polled).
    pub fn create_io_cq(qid: u16, entries: u16, base: u64) -> SqEntry {
        let mut e = SqEntry::new(admin::CREATE_IO_CQ, 0);
        e.set_prps(base, 0);
        e.cdw[10] = (u32::from(entries.saturating_sub(1)) << 16) | u32::from(qid);
        e.cdw[11] = 1; // PC
        e
    }

    /// CREATE I/O SUBMISSION QUEUE (Base §5.5), tied to CQ `cqid`, physically contiguous.
    pub fn create_io_sq(qid: u16, entries: u16, base: u64, cqid: u16) -> SqEntry {
        let mut e = SqEntry::new(admin::CREATE_IO_SQ, 0);
        e.set_prps(base, 0);
        e.cdw[10] = (u32::from(entries.saturating_sub(1)) << 16) | u32::from(qid);
        e.cdw[11] = (u32::from(cqid) << 16) | 1; // PC, QPRIO urgent (ignored under RR)
        e
    }

    pub fn delete_io_sq(qid: u16) -> SqEntry {
        let mut e = SqEntry::new(admin::DELETE_IO_SQ, 0);
        e.cdw[10] = u32::from(qid);
        e
    }

    pub fn delete_io_cq(qid: u16) -> SqEntry {
        let mut e = SqEntry::new(admin::DELETE_IO_CQ, 0);
        e.cdw[10] = u32::from(qid);
        e
    }

    /// ABORT (Base §5.1) of command `cid` on SQ `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> SqEntry {
        let mut e = SqEntry::new(admin::ABORT, 0);
        e.cdw[10] = (u32::from(cid) << 16) | u32::from(sqid);
        e
    }

    /// SET FEATURES Number of Queues (Base §5.27.1.5): `n` I/O SQs and CQs wanted.
    pub fn set_number_of_queues(n: u16) -> SqEntry {
        let mut e = SqEntry::new(admin::SET_FEATURES, 0);
        e.cdw[10] = FEAT_NUMBER_OF_QUEUES;
        let z = u32::from(n.max(1) - 1);
        e.cdw[11] = (z << 16) | z;
        e
    }

    // NVM commands (NVM CS §3.2).

    /// READ or WRITE of `nlb` blocks (1..=65536) at `slba`.
    pub fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, fua: bool) -> SqEntry {
        let mut e = SqEntry::new(opcode, nsid);
        e.set_slba(slba);
        e.cdw[12] = (nlb.saturating_sub(1) & 0xffff) | (u32::from(fua) << 30);
        e
    }

    pub fn flush(nsid: u32) -> SqEntry {
        SqEntry::new(nvm::FLUSH, nsid)
    }

    /// WRITE ZEROES (NVM CS §3.2.8); `deallocate` sets DEAC.
    pub fn write_zeroes(nsid: u32, slba: u64, nlb: u32, deallocate: bool) -> SqEntry {
        let mut e = SqEntry::new(nvm::WRITE_ZEROES, nsid);
        e.set_slba(slba);
        e.cdw[12] = (nlb.saturating_sub(1) & 0xffff) | (u32::from(deallocate) << 25);
        e
    }

    /// DATASET MANAGEMENT with the Deallocate attribute (NVM CS §3.2.3): `ranges` (1..=256)
    /// range descriptors at PRP1.
    pub fn deallocate(nsid: u32, ranges: u32) -> SqEntry {
        let mut e = SqEntry::new(nvm::DATASET_MANAGEMENT, nsid);
        e.cdw[10] = ranges.saturating_sub(1) & 0xff;
        e.cdw[11] = 1 << 2; // AD
        e
    }
}

/// Largest number of ranges in one DATASET MANAGEMENT command.
pub const DSM_MAX_RANGES: usize = 256;
/// Size of a DSM range descriptor (NVM CS figure 39).
pub const DSM_RANGE_SIZE: usize = 16;

/// A DSM range: `nlb` blocks at `slba`.
pub fn dsm_range(slba: u64, nlb: u32) -> [u8; DSM_RANGE_SIZE] {
    let mut r = [0u8; DSM_RANGE_SIZE];
    r[4..8].copy_from_slice(&nlb.to_le_bytes());
    r[8..16].copy_from_slice(&slba.to_le_bytes());
    r
}

/// Status Code Type values (Base §4.6.1.2).
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

/// Status codes, named by type.
pub mod sc {
    // Generic (Base figure 95; NVM CS figure 22 for 0x80 on).
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0b;
    pub const NAMESPACE_WRITE_PROTECTED: u8 = 0x20;
    pub const COMMAND_INTERRUPTED: u8 = 0x21;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
    pub const RESERVATION_CONFLICT: u8 = 0x83;
    pub const FORMAT_IN_PROGRESS: u8 = 0x84;
    // Command specific (Base figure 96).
    pub const INVALID_QUEUE_ID: u8 = 0x01;
    pub const ABORT_LIMIT_EXCEEDED: u8 = 0x03;
    // Media and data integrity (NVM CS figure 24).
    pub const WRITE_FAULT: u8 = 0x80;
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    pub const COMPARE_FAILURE: u8 = 0x85;
    pub const ACCESS_DENIED: u8 = 0x86;
    pub const DEALLOCATED_OR_UNWRITTEN: u8 = 0x87;
    // Path related (Base figure 99).
    /// The host ended the command (Linux's driver, for a command outstanding when it resets
    /// the controller).
    pub const HOST_ABORTED: u8 = 0x71;
}

/// The status field of a completion (Base §4.6.1: DW3 bits 31:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status(pub u16);

impl Status {
    pub const SUCCESS: Status = Status(0);

    pub fn new(sct: u8, sc: u8) -> Status {
        Status((u16::from(sct & 7) << 8) | u16::from(sc))
    }

    pub fn sc(self) -> u8 {
        self.0 as u8
    }

    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    pub fn with_dnr(self) -> Status {
        Status(self.0 | (1 << 14))
    }

    pub fn is_success(self) -> bool {
        self.sct() == sct::GENERIC && self.sc() == sc::SUCCESS
    }

    /// Whether the command was aborted rather than failed on the medium: by an ABORT, by its
    /// queue's deletion, or by a controller reset. Such a command may be retried.
    pub fn is_aborted(self) -> bool {
        (self.sct() == sct::GENERIC
            && matches!(
                self.sc(),
                sc::ABORT_REQUESTED | sc::ABORTED_SQ_DELETION | sc::COMMAND_INTERRUPTED
            ))
            || (self.sct() == sct::PATH && self.sc() == sc::HOST_ABORTED)
    }

    /// What the block layer reports for an I/O command that failed with this status, the
    /// I/O starting at byte `offset`.
    ///
    /// The driver builds every command from a request the SCSI layer has already checked
    /// (LBA range, transfer length), so a controller that rejects one as malformed or out of
    /// range disagrees with the target about the device: that is the target's failure,
    /// [`BdevError::BadBuffer`] (HARDWARE ERROR, internal target failure). Medium errors keep
    /// the offset (MEDIUM ERROR, unrecovered read error or write error by the operation, with
    /// the LBA in INFORMATION). A namespace that is not there or not ready is
    /// [`BdevError::Offline`] (NOT READY); a write-protected one
    /// [`BdevError::WriteProtected`] (DATA PROTECT). A command aborted at the target's
    /// request is [`BdevError::Cancelled`].
    pub fn bdev_error(self, offset: u64) -> BdevError {
        match (self.sct(), self.sc()) {
            (sct::GENERIC, sc::INVALID_OPCODE | sc::INVALID_FIELD | sc::LBA_OUT_OF_RANGE) => {
                BdevError::BadBuffer
            }
            (sct::GENERIC, sc::ABORT_REQUESTED | sc::ABORTED_SQ_DELETION)
            | (sct::PATH, sc::HOST_ABORTED) => BdevError::Cancelled,
            (
                sct::GENERIC,
                sc::INVALID_NAMESPACE_OR_FORMAT | sc::NAMESPACE_NOT_READY | sc::FORMAT_IN_PROGRESS,
            ) => BdevError::Offline,
            (sct::GENERIC, sc::CAPACITY_EXCEEDED) => BdevError::NoSpace,
            (sct::GENERIC, sc::NAMESPACE_WRITE_PROTECTED) => BdevError::WriteProtected,
            // Write fault, unrecovered read error, protection information and compare
            // failures, access denied, data transfer and internal errors: the medium (or
            // the device standing for it) failed this I/O.
            // Path errors (a controller that lost its namespace's path) read as not ready.
            (sct::PATH, _) => BdevError::Offline,
            _ => BdevError::Io(offset),
        }
    }
}

/// A 16-byte completion queue entry (Base §4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CqEntry {
    /// Command specific (DW0).
    pub dw0: u32,
    /// SQ Head Pointer.
    pub sq_head: u16,
    /// SQ Identifier.
    pub sq_id: u16,
    /// Command Identifier.
    pub cid: u16,
    /// Phase Tag.
    pub phase: bool,
    pub status: Status,
}

impl CqEntry {
    pub fn parse(b: &[u8; CQE_SIZE]) -> CqEntry {
        let sf = u16::from_le_bytes([b[14], b[15]]);
        CqEntry {
            dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            sq_head: u16::from_le_bytes([b[8], b[9]]),
            sq_id: u16::from_le_bytes([b[10], b[11]]),
            cid: u16::from_le_bytes([b[12], b[13]]),
            phase: sf & 1 == 1,
            status: Status(sf >> 1),
        }
    }

    pub fn to_bytes(&self) -> [u8; CQE_SIZE] {
        let mut b = [0u8; CQE_SIZE];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        let sf = (self.status.0 << 1) | u16::from(self.phase);
        b[14..16].copy_from_slice(&sf.to_le_bytes());
        b
    }
}

/// A fault in data the controller returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum IdentifyError {
    /// the IDENTIFY data is shorter than 4096 bytes
    Short,
    /// the namespace's formatted LBA size {0} is not one of its {1} LBA formats
    BadFormatIndex(u8, u8),
    /// the namespace's LBA data size 2^{0} is outside 512 B..64 KiB
    BadBlockSize(u8),
    /// the namespace's LBA format carries {0} bytes of metadata per block (not supported)
    Metadata(u16),
    /// the namespace has no blocks
    Empty,
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// An ASCII field (space padded), NULs read as spaces, trailing spaces trimmed, anything
/// else not printable as `?`.
fn ascii(b: &[u8], range: std::ops::Range<usize>) -> String {
    let s: String = b
        .get(range)
        .unwrap_or(&[])
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else if c == 0 {
                ' '
            } else {
                '?'
            }
        })
        .collect();
    s.trim_end().to_string()
}

/// ONCS bits (Base §5.17.2.1, Optional NVM Command Support).
pub mod oncs {
    pub const COMPARE: u16 = 1 << 0;
    pub const DSM: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// What the driver needs of the IDENTIFY controller data (Base figure 275).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifyController {
    pub vid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum Data Transfer Size: `2^mdts` minimum-size pages; 0 means no limit.
    pub mdts: u8,
    pub cntlid: u16,
    /// Optional NVM Command Support ([`oncs`]).
    pub oncs: u16,
    /// Volatile Write Cache present (VWC bit 0).
    pub vwc: bool,
    /// SGL support (SGLS bits 1:0 non-zero).
    pub sgls: u32,
    /// Number of Namespaces (the highest valid NSID).
    pub nn: u32,
}

impl IdentifyController {
    pub fn parse(b: &[u8]) -> Result<IdentifyController, IdentifyError> {
        if b.len() < IDENTIFY_SIZE {
            return Err(IdentifyError::Short);
        }
        Ok(IdentifyController {
            vid: le16(b, 0),
            serial: ascii(b, 4..24),
            model: ascii(b, 24..64),
            firmware: ascii(b, 64..72),
            mdts: b[77],
            cntlid: le16(b, 78),
            nn: le32(b, 516),
            oncs: le16(b, 520),
            vwc: b[525] & 1 == 1,
            sgls: le32(b, 536),
        })
    }

    pub fn supports(&self, oncs_bit: u16) -> bool {
        self.oncs & oncs_bit != 0
    }

    /// Whether the controller takes SGLs for NVM commands.
    pub fn supports_sgls(&self) -> bool {
        self.sgls & 3 != 0
    }

    /// The largest transfer in bytes for a minimum page size of `1 << min_page_shift`, or
    /// `None` for no limit.
    pub fn max_transfer(&self, min_page_shift: u32) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        1u64.checked_shl(u32::from(self.mdts) + min_page_shift)
    }
}

/// What the driver needs of the IDENTIFY namespace data (NVM CS figure 97).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifyNamespace {
    /// Namespace Size, in logical blocks.
    pub nsze: u64,
    /// Namespace Capacity, in logical blocks.
    pub ncap: u64,
    /// Namespace Features.
    pub nsfeat: u8,
    /// Deallocate Logical Block Features.
    pub dlfeat: u8,
    /// The formatted LBA data size, in bytes.
    pub block_size: u32,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
}

impl IdentifyNamespace {
    pub fn parse(b: &[u8]) -> Result<IdentifyNamespace, IdentifyError> {
        if b.len() < IDENTIFY_SIZE {
            return Err(IdentifyError::Short);
        }
        let nlbaf = b[25];
        let flbas = b[26];
        // FLBAS bits 3:0 are the low bits of the format index, bits 6:5 its high bits,
        // which count only when there are more than 16 formats (NLBAF is 0's based).
        let high = if nlbaf >= 16 { (flbas >> 1) & 0x30 } else { 0 };
        let index = (flbas & 0x0f) | high;
        if index > nlbaf || index >= 64 {
            return Err(IdentifyError::BadFormatIndex(
                index,
                nlbaf.saturating_add(1),
            ));
        }
        let lbaf = le32(b, 128 + 4 * usize::from(index));
        let ms = lbaf as u16;
        let lbads = (lbaf >> 16) as u8;
        if !(9..=16).contains(&lbads) {
            return Err(IdentifyError::BadBlockSize(lbads));
        }
        if ms != 0 {
            return Err(IdentifyError::Metadata(ms));
        }
        let nsze = le64(b, 0);
        if nsze == 0 {
            return Err(IdentifyError::Empty);
        }
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        Ok(IdentifyNamespace {
            nsze,
            ncap: le64(b, 8),
            nsfeat: b[24],
            dlfeat: b[33],
            block_size: 1 << lbads,
            nguid,
            eui64,
        })
    }

    /// NSFEAT bit 0 (THINP): the namespace is thin provisioned.
    pub fn thin_provisioned(&self) -> bool {
        self.nsfeat & 1 != 0
    }

    /// DLFEAT bits 2:0 = 001b: deallocated blocks read as zeros.
    pub fn deallocated_reads_zeros(&self) -> bool {
        self.dlfeat & 7 == 1
    }

    /// DLFEAT bit 3: WRITE ZEROES may deallocate (DEAC).
    pub fn write_zeroes_deallocates(&self) -> bool {
        self.dlfeat & (1 << 3) != 0
    }

    pub fn size_bytes(&self) -> Option<u64> {
        self.nsze.checked_mul(u64::from(self.block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut e = SqEntry::rw(nvm::WRITE, 1, 0x1_2345_6789, 8, true);
        e.set_cid(0xbeef);
        e.set_prps(0x1000_0010, 0x2000_0000);
        let back = SqEntry::from_bytes(&e.to_bytes());
        assert_eq!(back, e);
        assert_eq!(back.opcode(), nvm::WRITE);
        assert_eq!(back.cid(), 0xbeef);
        assert_eq!(back.slba(), 0x1_2345_6789);
        assert_eq!(back.nlb(), 8);
        assert_eq!(back.cdw[12] >> 30 & 1, 1, "FUA");
        assert_eq!((back.prp1(), back.prp2()), (0x1000_0010, 0x2000_0000));
        // The wire layout: CID in bytes 2-3, PRP1 at byte 24.
        let b = e.to_bytes();
        assert_eq!((b[0], b[2], b[3]), (nvm::WRITE, 0xef, 0xbe));
        assert_eq!(b[24], 0x10);

        let c = CqEntry {
            dw0: 7,
            sq_head: 3,
            sq_id: 2,
            cid: 9,
            phase: true,
            status: Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR).with_dnr(),
        };
        let b = c.to_bytes();
        assert_eq!(CqEntry::parse(&b), c);
        // Phase is bit 16 of DW3; SC bits 24:17; SCT 27:25; DNR 31.
        let dw3 = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        assert_eq!(dw3 >> 16 & 1, 1);
        assert_eq!(dw3 >> 17 & 0xff, 0x81);
        assert_eq!(dw3 >> 25 & 7, 2);
        assert_eq!(dw3 >> 31, 1);
        assert!(c.status.dnr());
    }

    #[test]
    fn registers_decode() {
        // MQES 1023, CQR, TO 20 (10 s), DSTRD 1, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = Cap(1023 | 1 << 16 | 20 << 24 | 1 << 32 | 1 << 37 | 4 << 52);
        assert_eq!(cap.max_queue_entries(), 1024);
        assert!(cap.contiguous_required());
        assert_eq!(cap.timeout_ms(), 10_000);
        assert_eq!(cap.dstrd(), 1);
        assert!(cap.supports_nvm());
        assert_eq!((cap.mpsmin(), cap.mpsmax()), (0, 4));
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 0), 0x1008);
        assert_eq!(cq_head_doorbell(1, 1), 0x1000 + 3 * 8);
    }

    #[test]
    fn identify_checks_what_the_device_says() {
        let mut b = vec![0u8; IDENTIFY_SIZE];
        assert_eq!(
            IdentifyNamespace::parse(&b[..100]),
            Err(IdentifyError::Short)
        );
        b[0..8].copy_from_slice(&1000u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // the second
        b[128 + 4..128 + 8].copy_from_slice(&(12u32 << 16).to_le_bytes());
        b[24] = 1;
        b[33] = 1 | 1 << 3;
        let ns = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!((ns.nsze, ns.block_size), (1000, 4096));
        assert!(ns.thin_provisioned() && ns.deallocated_reads_zeros());
        assert!(ns.write_zeroes_deallocates());
        b[26] = 5;
        assert_eq!(
            IdentifyNamespace::parse(&b),
            Err(IdentifyError::BadFormatIndex(5, 2))
        );
        b[26] = 0;
        b[128..132].copy_from_slice(&(40u32 << 16).to_le_bytes());
        assert_eq!(
            IdentifyNamespace::parse(&b),
            Err(IdentifyError::BadBlockSize(40))
        );
        b[128..132].copy_from_slice(&(9u32 << 16 | 8).to_le_bytes());
        assert_eq!(
            IdentifyNamespace::parse(&b),
            Err(IdentifyError::Metadata(8))
        );
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[0..8].fill(0);
        assert_eq!(IdentifyNamespace::parse(&b), Err(IdentifyError::Empty));

        let mut c = vec![0u8; IDENTIFY_SIZE];
        c[4..24].copy_from_slice(b"SN123               ");
        c[24..64].fill(b' ');
        c[24..28].copy_from_slice(b"QEMU");
        c[64..72].copy_from_slice(b"1.0\0\0\0\0\0");
        c[30] = 0xff; // not printable
        c[77] = 5;
        c[520] = (oncs::COMPARE | oncs::DSM) as u8;
        c[525] = 1;
        let id = IdentifyController::parse(&c).unwrap();
        assert_eq!(id.serial, "SN123");
        assert_eq!(id.model, "QEMU  ?");
        assert_eq!(id.firmware, "1.0");
        assert!(id.supports(oncs::DSM) && !id.supports(oncs::WRITE_ZEROES));
        assert!(id.vwc);
        assert_eq!(id.max_transfer(12), Some(128 * 1024));
        c[77] = 255;
        assert_eq!(
            IdentifyController::parse(&c).unwrap().max_transfer(12),
            None
        );
    }

    #[test]
    fn statuses_map_to_block_errors() {
        let s = |t, c| Status::new(t, c).bdev_error(4096);
        assert_eq!(
            s(sct::MEDIA, sc::UNRECOVERED_READ_ERROR),
            BdevError::Io(4096)
        );
        assert_eq!(s(sct::MEDIA, sc::WRITE_FAULT), BdevError::Io(4096));
        assert_eq!(s(sct::MEDIA, sc::COMPARE_FAILURE), BdevError::Io(4096));
        assert_eq!(s(sct::GENERIC, sc::LBA_OUT_OF_RANGE), BdevError::BadBuffer);
        assert_eq!(s(sct::GENERIC, sc::INVALID_FIELD), BdevError::BadBuffer);
        assert_eq!(s(sct::GENERIC, sc::NAMESPACE_NOT_READY), BdevError::Offline);
        assert_eq!(s(sct::GENERIC, sc::CAPACITY_EXCEEDED), BdevError::NoSpace);
        assert_eq!(
            s(sct::GENERIC, sc::NAMESPACE_WRITE_PROTECTED),
            BdevError::WriteProtected
        );
        assert_eq!(s(sct::GENERIC, sc::ABORT_REQUESTED), BdevError::Cancelled);
        assert_eq!(s(sct::GENERIC, sc::INTERNAL_ERROR), BdevError::Io(4096));
        assert_eq!(s(sct::PATH, 0x00), BdevError::Offline);
        assert!(Status::new(sct::GENERIC, sc::ABORTED_SQ_DELETION).is_aborted());
        assert!(!Status::new(sct::MEDIA, sc::WRITE_FAULT).is_aborted());
        assert!(Status::new(sct::PATH, sc::HOST_ABORTED).is_aborted());
        assert!(!Status::new(sct::PATH, 0x00).is_aborted());
    }
}

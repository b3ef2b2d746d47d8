//! The copy manager of a disk: EXTENDED COPY (LID1) (SPC-4 §6.4), RECEIVE COPY RESULTS
//! (§6.18) and the Third-party Copy VPD page (§7.8.17).
//!
//! # What it copies
//!
//! Block to block segments (descriptor type 02h) between the logical units of the target that
//! received the command, as the I_T nexus that sent it sees them. Each copy source or
//! destination (CSCD) is an identification descriptor (E4h) naming a logical unit by a
//! designator of its Device Identification VPD page ([`super::inquiry::lu_designators`]), or
//! the CSCD ID FFFFh, the logical unit the command was sent to. The transport hands the
//! command the logical units of the session's target and the I_T nexus that sent it
//! ([`CopyScope`], set only for EXTENDED COPY); without one only the logical unit that
//! received the command can be named.
//!
//! # How it runs
//!
//! The parameter list is parsed and checked ([`parse`]), its CSCDs resolved to devices and
//! its segments to byte ranges ([`resolve`]); then the port ([`crate::scsi::port`]) runs the
//! copy on the reactor that received the command, one chunk at a time: a read of the source
//! into a pool buffer, then a write of it to the destination, the next chunk when that write
//! completes. Other commands on the reactor go on between chunks. A segment whose source and
//! destination overlap on one device is copied from its end when the destination lies above
//! the source, so that every block is read before it is overwritten (as `memmove` does).
//!
//! # Reservations and write protection
//!
//! The copy manager acts for the I_T nexus that sent the command: it reads a source and
//! writes a destination only as that nexus could (SPC-4 §5.13.1's classes of READ and
//! WRITE). A conflict before the copy starts, or at any chunk once it runs, ends the command
//! with RESERVATION CONFLICT; a destination mapped read-only or write-protected ends it with
//! DATA PROTECT, WRITE PROTECTED, as a WRITE would.
//!
//! # Errors
//!
//! Checks of the parameter list end the command with ILLEGAL REQUEST and the additional
//! sense code SPC-4 §6.4.3 names (with a field pointer into the parameter list). A CSCD
//! that names no logical unit of the target, or a segment that names no CSCD, ends it with
//! COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE; a CSCD that is not a disk with
//! INCORRECT COPY TARGET DEVICE TYPE; a segment past the end of its source or destination
//! with COPY ABORTED (no additional sense) and a failing backend I/O with COPY ABORTED,
//! THIRD PARTY DEVICE FAILURE, both with the segment number in bytes 10-11 of the
//! COMMAND-SPECIFIC INFORMATION field (§6.4.5). The sense data of the copy target device is
//! not appended to them.
//!
//! # List identifiers
//!
//! LIST ID USAGE 00b and 10b identify a copy per I_T nexus by its LIST IDENTIFIER: another
//! EXTENDED COPY with the same one while it runs ends with OPERATION IN PROGRESS. The
//! device keeps the status of the last [`RECORDS`] identified copies ([`CopyTable`]) for
//! RECEIVE COPY RESULTS' COPY STATUS and FAILED SEGMENT DETAILS; 11b copies are not
//! identified (the LIST IDENTIFIER must be zero) and leave no status. No data is held
//! (RECEIVE DATA is not served).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::scsi::cdb::{be16, be32, be64};
use crate::scsi::command::{Alua, Command, DeviceTypes, Reservation, Run};
use crate::scsi::device::{Device, Sanitize};
use crate::scsi::pr::{Access, Nexus};
use crate::scsi::sense::{self, Sense};
use crate::scsi::spc::inquiry::lu_designators;
use crate::scsi::spc::{CTL, FF};
use crate::scsi::task::{DataDir, Plan, ScsiTask};

/// Operation codes and service actions (SPC-4 §6.4, §6.18).
pub const EXTENDED_COPY: u8 = 0x83;
pub const SA_EXTENDED_COPY_LID1: u8 = 0x00;
pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
pub const SA_COPY_STATUS: u8 = 0x00;
pub const SA_OPERATING_PARAMETERS: u8 = 0x03;
pub const SA_FAILED_SEGMENT_DETAILS: u8 = 0x04;

/// The Third-party Copy VPD page code (SPC-4 §7.8.17).
pub const VPD_THIRD_PARTY_COPY: u8 = 0x8f;

/// The descriptor type codes the copy manager implements: block to block segments, and
/// identification descriptor CSCDs.
pub const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
pub const CSCD_IDENTIFICATION: u8 = 0xe4;

/// The CSCD ID of the logical unit that received the command (SPC-4 §6.4.6.1).
pub const CSCD_ID_OWN_LU: u16 = 0xffff;

/// The parameter list header, an identification CSCD descriptor and a block to block
/// segment descriptor (whose DESCRIPTOR LENGTH counts the bytes after byte 3).
const HEADER_LEN: usize = 16;
const CSCD_LEN: usize = 32;
const SEGMENT_B2B_LEN: usize = 28;

/// The limits the copy manager reports (RECEIVE COPY OPERATING PARAMETERS, the Parameter
/// Data descriptor of the VPD page) and enforces.
pub const MAX_CSCD_DESCRIPTORS: u16 = 8;
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 64;
/// Room for the most of both.
pub const MAX_DESCRIPTOR_LIST_LEN: u32 = MAX_CSCD_DESCRIPTORS as u32 * CSCD_LEN as u32
    + MAX_SEGMENT_DESCRIPTORS as u32 * SEGMENT_B2B_LEN as u32;
/// Identified copies the device keeps the status of (running or done): TOTAL and MAXIMUM
/// CONCURRENT COPIES.
pub const RECORDS: usize = 64;
/// The longest parameter list the transport is asked to carry: any longer one cannot fit
/// the limits above (no inline data is taken).
const MAX_PARAMETER_LIST: u32 = 64 * 1024;

/// What an EXTENDED COPY may reach beyond the logical unit it was sent to: the logical units
/// of the target as the I_T nexus that sent it sees them, and that nexus, whose reservations
/// the copy respects. The transport builds it for EXTENDED COPY only ([`wants_scope`]), so
/// that no other command pays for it.
pub struct CopyScope {
    pub nexus: Nexus,
    pub luns: Vec<CopyLun>,
}

impl CopyScope {
    /// The scope of `nexus` over its target's logical units: each device, and whether it is
    /// mapped read-only.
    pub fn new<'a>(
        nexus: &Nexus,
        luns: impl Iterator<Item = (&'a Arc<Device>, bool)>,
    ) -> Box<CopyScope> {
        Box::new(CopyScope {
            nexus: nexus.clone(),
            luns: luns
                .map(|(d, read_only)| CopyLun {
                    device: d.clone(),
                    read_only,
                })
                .collect(),
        })
    }
}

/// One logical unit of a [`CopyScope`].
pub struct CopyLun {
    pub device: Arc<Device>,
    /// Mapped read-only to the I_T nexus: never a destination.
    pub read_only: bool,
}

/// Whether the planned command of `task` needs a [`CopyScope`] before it runs.
pub fn wants_scope(task: &ScsiTask) -> bool {
    task.cmd.is_some_and(|c| matches!(c.run, Run::Copy))
}

/// EXTENDED COPY(LID1), for the SPC table. It writes its destinations, so it is a write for
/// the reservations of the logical unit it is sent to.
pub(super) const EXTENDED_COPY_LID1: Command = Command {
    name: "EXTENDED COPY(LID1)",
    op: EXTENDED_COPY,
    sa: Some(SA_EXTENDED_COPY_LID1),
    usage: &[
        EXTENDED_COPY,
        0x1f,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        FF,
        FF,
        FF,
        FF,
        0,
        CTL,
    ],
    types: DeviceTypes::DISK,
    only_if: None,
    works_without_medium: false,
    reports_ua: true,
    reservation: Reservation::Write,
    alua: Alua::Active,
    decode: decode_extended_copy,
    run: Run::Copy,
};

/// A service action of RECEIVE COPY RESULTS, for the SPC table: it reads state.
pub(super) const fn results(
    name: &'static str,
    sa: u8,
    emulate: fn(&Device, &mut ScsiTask),
) -> Command {
    Command {
        name,
        op: RECEIVE_COPY_RESULTS,
        sa: Some(sa),
        usage: &[
            RECEIVE_COPY_RESULTS,
            0x1f,
            FF,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            FF,
            FF,
            FF,
            FF,
            0,
            CTL,
        ],
        types: DeviceTypes::DISK,
        only_if: None,
        works_without_medium: true,
        reports_ua: true,
        reservation: Reservation::Read,
        alua: Alua::Active,
        decode: decode_receive_copy_results,
        run: Run::Emulate(emulate),
    }
}

fn param_list_length_error() -> Sense {
    Sense::new(sense::ILLEGAL_REQUEST, sense::PARAMETER_LIST_LENGTH_ERROR)
}

/// EXTENDED COPY's CDB: the PARAMETER LIST LENGTH (bytes 10-13); zero is no copy, and not
/// an error.
fn decode_extended_copy(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = &task.cdb;
    if let Some(i) = (2..10).find(|&i| c[i] != 0) {
        return Err(Sense::invalid_cdb_field(i as u16, None));
    }
    let len = be32(&c[10..14]);
    if len == 0 {
        return Ok(Plan::NONE);
    }
    if len > MAX_PARAMETER_LIST {
        return Err(param_list_length_error());
    }
    Ok(Plan {
        dir: DataDir::Out,
        len,
    })
}

fn decode_receive_copy_results(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(be32(&task.cdb[10..14])))
}

/// LIST ID USAGE (byte 1, bits 4-3 of the parameter list header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListIdUsage {
    /// 00b: identified, its status held for RECEIVE COPY RESULTS.
    Hold,
    /// 10b: identified; the copy manager need not hold its status (this one does).
    Identified,
    /// 11b: not identified; the LIST IDENTIFIER is zero.
    None,
}

/// A CSCD descriptor, checked: the designator it names a logical unit by, or the logical
/// unit that received the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cscd {
    /// Its offset in the parameter list (for field pointers).
    pub offset: usize,
    /// CODE SET, ASSOCIATION and DESIGNATOR TYPE, and the designator.
    pub code_set: u8,
    pub kind: u8,
    pub designator: Vec<u8>,
    /// DISK BLOCK LENGTH.
    pub block_size: u32,
}

/// A block to block segment descriptor, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentDesc {
    pub offset: usize,
    pub src: u16,
    pub dst: u16,
    /// DC: the NUMBER OF BLOCKS counts destination blocks rather than source ones.
    pub dc: bool,
    pub blocks: u16,
    pub src_lba: u64,
    pub dst_lba: u64,
}

/// An EXTENDED COPY(LID1) parameter list, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyList {
    pub list_id: u8,
    pub usage: ListIdUsage,
    pub cscds: Vec<Cscd>,
    pub segments: Vec<SegmentDesc>,
}

/// Parses and checks an EXTENDED COPY(LID1) parameter list (SPC-4 §6.4.3): the header, its
/// CSCD descriptors (identification descriptors, E4h) and segment descriptors (block to
/// block, 02h), against the limits the copy manager reports.
pub fn parse(data: &[u8]) -> Result<CopyList, Sense> {
    let header = data.get(..HEADER_LEN).ok_or_else(param_list_length_error)?;
    let list_id = header[0];
    let usage = match (header[1] >> 3) & 0x03 {
        0b00 => ListIdUsage::Hold,
        0b10 => ListIdUsage::Identified,
        0b11 => ListIdUsage::None,
        _ => return Err(Sense::invalid_param_bit(1, 4)),
    };
    if usage == ListIdUsage::None && list_id != 0 {
        return Err(Sense::invalid_param_field(0));
    }
    let cscd_len = be16(&header[2..4]) as usize;
    let seg_len = be32(&header[8..12]) as usize;
    let inline_len = be32(&header[12..16]) as usize;
    // The lists together longer than the copy manager takes (MAXIMUM DESCRIPTOR LIST
    // LENGTH), or longer than the parameter list: a length error.
    let lists = cscd_len
        .checked_add(seg_len)
        .ok_or_else(param_list_length_error)?;
    if lists > MAX_DESCRIPTOR_LIST_LEN as usize {
        return Err(param_list_length_error());
    }
    let end = HEADER_LEN + lists;
    if end.checked_add(inline_len).is_none_or(|n| n > data.len()) {
        return Err(param_list_length_error());
    }
    // No segment descriptor here uses inline data (MAXIMUM INLINE DATA LENGTH 0).
    if inline_len != 0 {
        return Err(Sense::invalid_param_field(12));
    }
    let mut cscds = Vec::new();
    let mut off = HEADER_LEN;
    while off < HEADER_LEN + cscd_len {
        let Some(&kind) = data.get(off) else {
            return Err(param_list_length_error());
        };
        if kind != CSCD_IDENTIFICATION {
            return Err(Sense {
                field_pointer: Some((false, off as u16, None)),
                ..Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
                )
            });
        }
        if cscds.len() == usize::from(MAX_CSCD_DESCRIPTORS) {
            return Err(Sense::new(
                sense::ILLEGAL_REQUEST,
                sense::TOO_MANY_TARGET_DESCRIPTORS,
            ));
        }
        let d = data
            .get(off..off + CSCD_LEN)
            .filter(|_| off + CSCD_LEN <= HEADER_LEN + cscd_len)
            .ok_or_else(|| Sense::invalid_param_field(2))?;
        cscds.push(parse_cscd(d, off)?);
        off += CSCD_LEN;
    }
    let mut segments = Vec::new();
    while off < end {
        let Some(d) = data.get(off..off + 4).filter(|_| off + 4 <= end) else {
            return Err(Sense::invalid_param_field(8));
        };
        if d[0] != SEGMENT_BLOCK_TO_BLOCK {
            return Err(Sense {
                field_pointer: Some((false, off as u16, None)),
                ..Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
                )
            });
        }
        if segments.len() == usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::new(
                sense::ILLEGAL_REQUEST,
                sense::TOO_MANY_SEGMENT_DESCRIPTORS,
            ));
        }
        if be16(&d[2..4]) as usize != SEGMENT_B2B_LEN - 4 {
            return Err(Sense::invalid_param_field(field(off, 2)));
        }
        let d = data
            .get(off..off + SEGMENT_B2B_LEN)
            .filter(|_| off + SEGMENT_B2B_LEN <= end)
            .ok_or_else(|| Sense::invalid_param_field(8))?;
        segments.push(SegmentDesc {
            offset: off,
            dc: d[1] & 0x02 != 0,
            src: be16(&d[4..6]) as u16,
            dst: be16(&d[6..8]) as u16,
            blocks: be16(&d[10..12]) as u16,
            src_lba: be64(&d[12..20]),
            dst_lba: be64(&d[20..28]),
        });
        off += SEGMENT_B2B_LEN;
    }
    Ok(CopyList {
        list_id,
        usage,
        cscds,
        segments,
    })
}

/// The field pointer of byte `i` of the descriptor at `off`: the parameter list is at most
/// [`MAX_PARAMETER_LIST`] bytes, so it fits.
fn field(off: usize, i: usize) -> u16 {
    u16::try_from(off + i).unwrap_or(u16::MAX)
}

/// An identification descriptor CSCD (SPC-4 §6.4.5, type E4h): PERIPHERAL DEVICE TYPE 00h
/// (a block device: the only kind served), its designation descriptor, and the block device
/// parameters' DISK BLOCK LENGTH. LU ID TYPE and NUL are ignored (SPC-4 makes them reserved
/// or obsolete for this descriptor), and so is RELATIVE INITIATOR PORT IDENTIFIER.
fn parse_cscd(d: &[u8], off: usize) -> Result<Cscd, Sense> {
    if d[1] & 0x1f != 0 {
        return Err(Sense::invalid_param_bit(field(off, 1), 4));
    }
    let len = usize::from(d[7]);
    let Some(designator) = d.get(8..8 + len).filter(|_| len <= 20) else {
        return Err(Sense::invalid_param_field(field(off, 7)));
    };
    Ok(Cscd {
        offset: off,
        code_set: d[4] & 0x0f,
        kind: d[5] & 0x3f,
        designator: designator.to_vec(),
        block_size: be32(&d[28..32]) & 0x00ff_ffff,
    })
}

/// One segment, resolved: `len` bytes from `src_off` on `src` to `dst_off` on `dst`.
#[derive(Clone)]
pub struct Segment {
    pub src: Arc<Device>,
    pub dst: Arc<Device>,
    pub src_off: u64,
    pub dst_off: u64,
    pub len: u64,
    /// Copied from its end (an overlap on one device with the destination above).
    pub backward: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes from {}@{} to {}@{}{}",
            self.len,
            self.src.name(),
            self.src_off,
            self.dst.name(),
            self.dst_off,
            if self.backward { ", backward" } else { "" }
        )
    }
}

/// COPY ABORTED with `code`, for segment `segment` (COMMAND-SPECIFIC INFORMATION bytes
/// 10-11, SPC-4 §6.4.5: no sense data of a copy target device follows).
pub fn copy_aborted(code: (u8, u8), segment: usize) -> Sense {
    Sense {
        command_specific: Some(segment.min(0xffff) as u64),
        ..Sense::new(sense::COPY_ABORTED, code)
    }
}

/// Why a copy cannot go on with `src` and `dst`: an access a reservation refuses the I_T
/// nexus (`None` for the sense: RESERVATION CONFLICT), or a device that went away from the
/// medium (sanitizing, inactive, no medium).
pub fn check_access(
    src: &Device,
    dst: &Device,
    nexus: Option<&Nexus>,
    segment: usize,
) -> Result<(), Option<Sense>> {
    for d in [src, dst] {
        if d.not_ready().is_some() || d.sanitize_state() != Sanitize::Idle {
            return Err(Some(copy_aborted(
                sense::COPY_TARGET_DEVICE_NOT_REACHABLE,
                segment,
            )));
        }
    }
    if let Some(n) = nexus {
        for (d, class) in [(src, Reservation::Read), (dst, Reservation::Write)] {
            if d.reservations().check(n, class) == Access::Conflict {
                return Err(None);
            }
        }
    }
    Ok(())
}

/// The device `cscd` names among `scope`'s logical units (or `own` alone without one), with
/// whether it is mapped read-only.
fn find(
    cscd: &Cscd,
    own: &Arc<Device>,
    own_ro: bool,
    scope: Option<&CopyScope>,
) -> Option<(Arc<Device>, bool)> {
    let names = |d: &Device| {
        lu_designators(&d.ident())
            .iter()
            .any(|(code_set, kind, value)| {
                code_set & 0x0f == cscd.code_set
                    && kind & 0x3f == cscd.kind
                    && *value == cscd.designator
            })
    };
    match scope {
        Some(s) => s
            .luns
            .iter()
            .find(|l| names(&l.device))
            .map(|l| (l.device.clone(), l.read_only)),
        None => names(own).then(|| (own.clone(), own_ro)),
    }
}

/// Resolves a checked list against the devices: each CSCD to a disk of the scope (with the
/// block size it says), each segment to byte ranges inside its source and destination.
/// `own` is the device the command was sent to, `own_ro` whether it is mapped read-only.
/// `Err(None)` is a reservation conflict.
pub fn resolve(
    list: &CopyList,
    own: &Arc<Device>,
    own_ro: bool,
    scope: Option<&CopyScope>,
) -> Result<Vec<Segment>, Option<Sense>> {
    let mut devices = Vec::with_capacity(list.cscds.len());
    for c in &list.cscds {
        let Some((dev, ro)) = find(c, own, own_ro, scope) else {
            return Err(Some(copy_aborted(
                sense::COPY_TARGET_DEVICE_NOT_REACHABLE,
                0,
            )));
        };
        if DeviceTypes::of(&dev) != DeviceTypes::DISK {
            return Err(Some(copy_aborted(
                sense::INCORRECT_COPY_TARGET_DEVICE_TYPE,
                0,
            )));
        }
        if c.block_size != dev.block_size() {
            return Err(Some(Sense::invalid_param_field(field(c.offset, 29))));
        }
        devices.push((dev, ro));
    }
    let nexus = scope.map(|s| &s.nexus);
    let mut out = Vec::with_capacity(list.segments.len());
    for (i, s) in list.segments.iter().enumerate() {
        let pick = |id: u16| -> Option<(Arc<Device>, bool)> {
            if id == CSCD_ID_OWN_LU {
                Some((own.clone(), own_ro))
            } else {
                devices.get(usize::from(id)).cloned()
            }
        };
        let (Some((src, _)), Some((dst, dst_ro))) = (pick(s.src), pick(s.dst)) else {
            return Err(Some(copy_aborted(
                sense::COPY_TARGET_DEVICE_NOT_REACHABLE,
                i,
            )));
        };
        if dst_ro || dst.is_read_only() || dst.swp() {
            return Err(Some(Sense::new(
                sense::DATA_PROTECT,
                sense::WRITE_PROTECTED,
            )));
        }
        check_access(&src, &dst, nexus, i)?;
        let (sbs, dbs) = (u64::from(src.block_size()), u64::from(dst.block_size()));
        let len = u64::from(s.blocks) * if s.dc { dbs } else { sbs };
        // Whole blocks of both devices (they may differ).
        if len % sbs != 0 || len % dbs != 0 {
            return Err(Some(Sense::invalid_param_field(field(s.offset, 10))));
        }
        let within = |dev: &Device, lba: u64, bs: u64| {
            lba.checked_mul(bs)
                .and_then(|o| o.checked_add(len).map(|e| (o, e)))
                .filter(|&(_, e)| e <= dev.num_blocks().saturating_mul(bs))
                .map(|(o, _)| o)
        };
        let (Some(src_off), Some(dst_off)) =
            (within(&src, s.src_lba, sbs), within(&dst, s.dst_lba, dbs))
        else {
            return Err(Some(copy_aborted(sense::NO_ADDITIONAL_SENSE, i)));
        };
        let backward = Arc::ptr_eq(&src, &dst) && dst_off > src_off && dst_off < src_off + len;
        out.push(Segment {
            src,
            dst,
            src_off,
            dst_off,
            len,
            backward,
        });
    }
    Ok(out)
}

/// COPY STATUS's COPY MANAGER STATUS of a copy (SPC-4 §6.18.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    Running = 0,
    Done = 1,
    Failed = 2,
}

/// The status of one identified copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRecord {
    pub nexus: u64,
    pub list_id: u8,
    pub state: CopyState,
    /// Segments processed (the one under way counts).
    pub segments: u16,
    /// Bytes written to destinations.
    pub bytes: u64,
    /// The command's status and sense data once it failed (FAILED SEGMENT DETAILS).
    pub status: u8,
    pub sense: Vec<u8>,
}

/// The identified copies of a device, running and done: at most [`RECORDS`], the oldest
/// done one dropped to make room; with as many running, a new one is refused.
#[derive(Default)]
pub struct CopyTable(Mutex<VecDeque<CopyRecord>>);

impl CopyTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<CopyRecord>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new copy of `nexus` with `list_id`, running: refused (OPERATION IN
    /// PROGRESS) while one with the same identifier runs, or when the table holds nothing
    /// but running copies. A done one with the same identifier is replaced.
    pub fn begin(&self, nexus: u64, list_id: u8) -> Result<(), Sense> {
        let mut t = self.lock();
        if let Some(i) = t
            .iter()
            .position(|r| r.nexus == nexus && r.list_id == list_id)
        {
            if t[i].state == CopyState::Running {
                return Err(Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::OPERATION_IN_PROGRESS,
                ));
            }
            t.remove(i);
        }
        if t.len() >= RECORDS {
            let Some(i) = t.iter().position(|r| r.state != CopyState::Running) else {
                return Err(Sense::new(
                    sense::ILLEGAL_REQUEST,
                    sense::INSUFFICIENT_RESOURCES,
                ));
            };
            t.remove(i);
        }
        t.push_back(CopyRecord {
            nexus,
            list_id,
            state: CopyState::Running,
            segments: 0,
            bytes: 0,
            status: 0,
            sense: Vec::new(),
        });
        Ok(())
    }

    /// A running copy's progress.
    pub fn progress(&self, nexus: u64, list_id: u8, segments: usize, bytes: u64) {
        if let Some(r) = self
            .lock()
            .iter_mut()
            .find(|r| r.nexus == nexus && r.list_id == list_id)
        {
            r.segments = segments.min(0xffff) as u16;
            r.bytes = bytes;
        }
    }

    /// A copy has ended with `status` and `sense`.
    pub fn end(&self, nexus: u64, list_id: u8, status: u8, sense: &[u8]) {
        if let Some(r) = self
            .lock()
            .iter_mut()
            .find(|r| r.nexus == nexus && r.list_id == list_id)
        {
            r.state = if status == 0 {
                CopyState::Done
            } else {
                CopyState::Failed
            };
            r.status = status;
            r.sense = sense.to_vec();
        }
    }

    pub fn get(&self, nexus: u64, list_id: u8) -> Option<CopyRecord> {
        self.lock()
            .iter()
            .find(|r| r.nexus == nexus && r.list_id == list_id)
            .cloned()
    }
}

/// COPY STATUS (SPC-4 §6.18.3): the status of the identified copy of this I_T nexus with the
/// LIST IDENTIFIER of byte 2; one unknown is an invalid field.
pub(super) fn copy_status(dev: &Device, task: &mut ScsiTask) {
    let Some(r) = dev.copies().get(task.nexus, task.cdb[2]) else {
        task.fail(Sense::invalid_cdb_field(2, None));
        return;
    };
    let mut d = [0u8; 12];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    // HDD 0: no data held.
    d[4] = r.state as u8;
    d[5..7].copy_from_slice(&r.segments.to_be_bytes());
    // TRANSFER COUNT UNITS: bytes, or the least power of 1024 that fits four bytes.
    let mut units = 0u8;
    let mut count = r.bytes;
    while count > u64::from(u32::MAX) {
        count >>= 10;
        units += 1;
    }
    d[7] = units;
    d[8..12].copy_from_slice(&(count as u32).to_be_bytes());
    task.reply(&d);
}

/// FAILED SEGMENT DETAILS (SPC-4 §6.18.5): the status and sense data of a copy that ended;
/// one still running, or unknown, is an invalid field.
pub(super) fn failed_segment_details(dev: &Device, task: &mut ScsiTask) {
    let Some(r) = dev
        .copies()
        .get(task.nexus, task.cdb[2])
        .filter(|r| r.state != CopyState::Running)
    else {
        task.fail(Sense::invalid_cdb_field(2, None));
        return;
    };
    let mut d = vec![0u8; 60];
    d.extend_from_slice(&r.sense);
    let avail = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&avail.to_be_bytes());
    d[56] = r.status;
    d[58..60].copy_from_slice(&(r.sense.len() as u16).to_be_bytes());
    task.reply(&d);
}

/// The most bytes one block to block segment moves on `dev`: 65535 blocks.
fn max_segment_len(dev: &Device) -> u32 {
    u32::from(u16::MAX).saturating_mul(dev.block_size())
}

/// RECEIVE COPY OPERATING PARAMETERS (SPC-4 §6.18.4), as the VPD page reports them.
pub(super) fn operating_parameters(dev: &Device, task: &mut ScsiTask) {
    let codes = [SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION];
    let mut d = vec![0u8; 44];
    d.extend_from_slice(&codes);
    let avail = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&avail.to_be_bytes());
    // SNLID: copies without a list identifier (LIST ID USAGE 11b) are taken.
    d[4] = 0x01;
    d[8..10].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LEN.to_be_bytes());
    d[16..20].copy_from_slice(&max_segment_len(dev).to_be_bytes());
    // No inline data, no held data, no stream devices (bytes 20-31 zero).
    d[34..36].copy_from_slice(&(RECORDS as u16).to_be_bytes());
    d[36] = RECORDS as u8;
    // DATA SEGMENT GRANULARITY: a block.
    d[37] = dev.block_size().trailing_zeros() as u8;
    d[43] = codes.len() as u8;
    task.reply(&d);
}

/// Appends a third-party copy descriptor: its type, its length, and `body` padded to a
/// multiple of four bytes.
fn tpc_descriptor(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    let padded = body.len().div_ceil(4) * 4;
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(padded as u16).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + padded - body.len(), 0);
}

/// The Third-party Copy VPD page's descriptors (SPC-4 §7.8.17), after its 4-byte header:
/// those a copy manager that serves EXTENDED COPY(LID1) reports. Supported Commands
/// (0001h), Parameter Data (0004h), Supported Descriptors (0008h), Supported CSCD
/// Descriptor IDs (000Ch) and General Copy Operations (8001h).
pub fn vpd_page(dev: &Device) -> Vec<u8> {
    let mut p = Vec::with_capacity(100);
    let commands = [
        EXTENDED_COPY,
        1,
        SA_EXTENDED_COPY_LID1,
        RECEIVE_COPY_RESULTS,
        3,
        SA_COPY_STATUS,
        SA_OPERATING_PARAMETERS,
        SA_FAILED_SEGMENT_DETAILS,
    ];
    let mut body = vec![commands.len() as u8];
    body.extend_from_slice(&commands);
    tpc_descriptor(&mut p, 0x0001, &body);
    let mut body = [0u8; 28];
    body[4..6].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    body[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    body[8..12].copy_from_slice(&MAX_DESCRIPTOR_LIST_LEN.to_be_bytes());
    tpc_descriptor(&mut p, 0x0004, &body);
    tpc_descriptor(
        &mut p,
        0x0008,
        &[2, SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION],
    );
    let mut body = vec![0, 2];
    body.extend_from_slice(&CSCD_ID_OWN_LU.to_be_bytes());
    tpc_descriptor(&mut p, 0x000c, &body);
    let mut body = [0u8; 32];
    body[0..4].copy_from_slice(&(RECORDS as u32).to_be_bytes());
    body[4..8].copy_from_slice(&(RECORDS as u32).to_be_bytes());
    body[8..12].copy_from_slice(&max_segment_len(dev).to_be_bytes());
    body[12] = dev.block_size().trailing_zeros() as u8;
    tpc_descriptor(&mut p, 0x8001, &body);
    p
}

#[cfg(test)]
mod tests;

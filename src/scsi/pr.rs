//! Reservations of one logical unit: persistent reservations (SPC-4 §5.13, PERSISTENT RESERVE
//! IN §6.15 and PERSISTENT RESERVE OUT §6.16) and, beside them, the reservations of RESERVE
//! and RELEASE (SPC-2 §5.5, with SPC-4 §5.13.3's compatible reservation handling).
//!
//! # Model
//!
//! A registration binds a reservation key to an I_T nexus: an initiator port, named by its
//! iSCSI TransportID (the iSCSI name and the ISID, SPC-4 §7.6.4.6), and a target port, named
//! by its relative target port identifier. One registration may cover several I_T nexuses:
//! REGISTER with ALL_TG_PT covers every target port, and a TransportID without an ISID
//! (format 00b, from SPEC_I_PT or REGISTER AND MOVE) every initiator port of that iSCSI name.
//! The registration of an I_T nexus is the most specific one that covers it (see
//! [`Registrant::matches`]).
//!
//! The persistent reservation holder (SPC-4 §5.13.10) is every registered I_T nexus for the
//! all registrants types, and otherwise the I_T nexus that reserved: its registration and the
//! target port it came through. A registration that goes away takes its reservation with it.
//!
//! # Concurrency
//!
//! A device is shared by every reactor, so its state sits behind one mutex: persistent
//! reservation commands are rare. [`Reservations::check`], which every command goes through,
//! reads one atomic first and takes the lock only while a reservation (persistent or SPC-2)
//! exists: registrations alone restrict no command.
//!
//! # Side effects
//!
//! Nothing here reaches outside the state: a PERSISTENT RESERVE OUT returns an [`OutOutcome`]
//! with the status, the unit attentions to establish for other I_T nexuses, the nexuses whose
//! tasks PREEMPT AND ABORT aborts, and the file write that APTPL calls for. The caller carries
//! them out ([`crate::scsi::spc::reserve`], and the transport for the aborts). The conflict
//! check reads each command's class from the command table
//! ([`crate::scsi::command::Reservation`]).
//!
//! # Persist through power loss
//!
//! The APTPL bit of the last successful REGISTER, REGISTER AND IGNORE EXISTING KEY or
//! REGISTER AND MOVE decides whether the state survives a restart (SPC-4 §5.13.5). While it is
//! set, every change writes the whole state to the device's file (see
//! [`Reservations::persist`]); when it is cleared, the file goes. [`Reservations::set_file`] restores the state from that file.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::scsi::command::Reservation as CommandClass;
use crate::scsi::sense::{self, Sense};

/// Operation codes of the reservation commands (SPC-4 §6.15, §6.16; SPC-2 for RESERVE and
/// RELEASE).
pub mod opcode {
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
}

/// PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1).
pub mod in_sa {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.1). REPLACE LOST RESERVATION (SPC-5)
/// is not implemented: it answers INVALID FIELD IN CDB like any unknown service action.
pub mod out_sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// SPC-4 §7.6.1: the PROTOCOL IDENTIFIER of iSCSI TransportIDs.
const PROTOCOL_ISCSI: u8 = 0x5;
/// RFC 7143 §4.2.7.1: an iSCSI name is at most 223 bytes.
const MAX_ISCSI_NAME: usize = 223;
/// Registrations one logical unit keeps; more get INSUFFICIENT REGISTRATION RESOURCES
/// (SPC-4 §5.13.7). Clusters register a handful of nexuses; this bounds what a hostile
/// initiator can make the target hold (and write to the APTPL file).
pub const MAX_REGISTRATIONS: usize = 1024;

/// Fields of the PERSISTENT RESERVE OUT parameter lists (SPC-4 §6.16.3 and §6.16.4).
mod field {
    use std::ops::Range;

    pub const RESERVATION_KEY: Range<usize> = 0..8;
    pub const SERVICE_ACTION_RESERVATION_KEY: Range<usize> = 8..16;
    /// The basic list: SPEC_I_PT (bit 3), ALL_TG_PT (bit 2), APTPL (bit 0).
    pub const FLAGS: usize = 20;
    pub const SPEC_I_PT_BIT: u8 = 3;
    pub const ALL_TG_PT_BIT: u8 = 2;
    pub const APTPL_BIT: u8 = 0;
    /// The basic list is this long, without the TransportIDs of SPEC_I_PT.
    pub const BASIC_LEN: usize = 24;
    pub const TRANSPORTID_PARAMETER_DATA_LENGTH: Range<usize> = 24..28;
    pub const TRANSPORTIDS: usize = 28;
    /// REGISTER AND MOVE: UNREG (bit 1), APTPL (bit 0).
    pub const MOVE_FLAGS: usize = 17;
    pub const MOVE_UNREG_BIT: u8 = 1;
    pub const MOVE_RELATIVE_TARGET_PORT: Range<usize> = 18..20;
    pub const MOVE_TRANSPORTID_LENGTH: Range<usize> = 20..24;
    pub const MOVE_TRANSPORTID: usize = 24;
}

fn be(buf: &[u8], r: Range<usize>) -> u64 {
    buf.get(r)
        .map_or(0, |b| b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn bit(buf: &[u8], byte: usize, bit: u8) -> bool {
    buf.get(byte).is_some_and(|b| b & (1 << bit) != 0)
}

/// INVALID FIELD IN PARAMETER LIST at a parameter list offset (no field pointer past
/// 64 KiB).
fn param_field(off: usize) -> Status {
    Status::CheckCondition(u16::try_from(off).map_or(
        Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::INVALID_FIELD_IN_PARAMETER_LIST,
        ),
        Sense::invalid_param_field,
    ))
}

/// INVALID FIELD IN PARAMETER LIST at a bit of one of the flags bytes of [`field`].
fn param_bit(byte: usize, bit: u8) -> Status {
    // The flags bytes are among the first 24.
    Status::CheckCondition(Sense::invalid_param_bit(byte as u16, bit))
}

fn length_error() -> Status {
    Status::CheckCondition(Sense::new(
        sense::ILLEGAL_REQUEST,
        sense::PARAMETER_LIST_LENGTH_ERROR,
    ))
}

/// SPC-4 §5.13.7: more registrations than [`MAX_REGISTRATIONS`].
fn no_registration_resources() -> Status {
    check_condition(
        sense::ILLEGAL_REQUEST,
        sense::INSUFFICIENT_REGISTRATION_RESOURCES,
    )
}

/// The end of the list of `data` that starts at `start` and whose length the field
/// `len_field` holds: the end of `data`, exactly (SPC-4 §6.16.3, §6.16.4). A list that
/// runs past the data is a PARAMETER LIST LENGTH ERROR; one that ends short of it leaves
/// bytes the two lengths disagree on, an invalid length field.
fn exact_end(data: &[u8], len_field: Range<usize>, start: usize) -> Result<usize, Status> {
    let at = len_field.start;
    let end = usize::try_from(be(data, len_field))
        .ok()
        .and_then(|l| l.checked_add(start))
        .ok_or_else(length_error)?;
    match end.cmp(&data.len()) {
        std::cmp::Ordering::Greater => Err(length_error()),
        std::cmp::Ordering::Less => Err(param_field(at)),
        std::cmp::Ordering::Equal => Ok(end),
    }
}

// ------------------------------------------------------------------------------ types

/// A persistent reservation type (SPC-4 §6.15.3, the TYPE field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrType {
    /// 1h: only the holder writes; everybody reads.
    WriteExclusive,
    /// 3h: only the holder reads or writes.
    ExclusiveAccess,
    /// 5h: registrants write; everybody reads.
    WriteExclusiveRegistrantsOnly,
    /// 6h: only registrants read or write.
    ExclusiveAccessRegistrantsOnly,
    /// 7h: every registrant holds it; registrants write, everybody reads.
    WriteExclusiveAllRegistrants,
    /// 8h: every registrant holds it; only registrants read or write.
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];

    /// The type of a TYPE field, if it is one.
    pub fn from_code(code: u8) -> Option<PrType> {
        PrType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The TYPE field value.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 0x1,
            PrType::ExclusiveAccess => 0x3,
            PrType::WriteExclusiveRegistrantsOnly => 0x5,
            PrType::ExclusiveAccessRegistrantsOnly => 0x6,
            PrType::WriteExclusiveAllRegistrants => 0x7,
            PrType::ExclusiveAccessAllRegistrants => 0x8,
        }
    }

    /// Every registrant holds the reservation (SPC-4 §5.13.10).
    pub fn is_all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    pub fn is_registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Only writes are restricted: reads are open to every I_T nexus.
    fn is_write_exclusive(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive
                | PrType::WriteExclusiveRegistrantsOnly
                | PrType::WriteExclusiveAllRegistrants
        )
    }
}

/// An I_T nexus as persistent reservations see it: the initiator port (iSCSI name and ISID)
/// and the relative target port identifier. The transport builds it once per session, so
/// that checking a command costs no allocation.
///
/// It also remembers what it may do under the reservations it last met ([`AccessCache`]),
/// so that while a reservation stands (a cluster's usual state) its commands are checked
/// without taking the device's lock.
#[derive(Debug)]
pub struct Nexus {
    name: String,
    isid: [u8; 6],
    rel_tgt_id: u16,
    cache: AccessCache,
    /// The devices whose unit attention queue for this nexus was found empty, each as of
    /// its unit attentions' epoch ([`crate::scsi::Device::take_ua_of`]).
    ua_clear: AccessCache,
}

impl Clone for Nexus {
    fn clone(&self) -> Nexus {
        Nexus::new(&self.name, self.isid, self.rel_tgt_id)
    }
}

impl PartialEq for Nexus {
    fn eq(&self, o: &Nexus) -> bool {
        (&self.name, self.isid, self.rel_tgt_id) == (&o.name, o.isid, o.rel_tgt_id)
    }
}

impl Eq for Nexus {}

impl std::hash::Hash for Nexus {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (&self.name, self.isid, self.rel_tgt_id).hash(h);
    }
}

impl Nexus {
    /// iSCSI names compare without regard to case (RFC 3722 folds them to lower case).
    pub fn new(initiator_name: &str, isid: [u8; 6], rel_tgt_id: u16) -> Nexus {
        Nexus {
            name: initiator_name.to_ascii_lowercase(),
            isid,
            rel_tgt_id,
            cache: AccessCache::default(),
            ua_clear: AccessCache::default(),
        }
    }

    /// Whether this nexus had no unit attention left on a device as of `epoch`.
    pub(crate) fn ua_clear_at(&self, epoch: u64) -> bool {
        self.ua_clear.get(epoch).is_some()
    }

    pub(crate) fn set_ua_clear_at(&self, epoch: u64) {
        self.ua_clear.put(epoch, 0);
    }

    /// The TransportID of the initiator port (format 01b).
    pub fn transport_id(&self) -> TransportId {
        TransportId {
            name: self.name.clone(),
            isid: Some(self.isid),
        }
    }
}

/// What one I_T nexus may do under the reservations of a few devices, each as of one state
/// of them: a direct-mapped table of `epoch << 16 | classes allowed`, one atomic word per
/// entry so that a reader never sees an epoch with another state's classes.
///
/// Epochs come from one counter for the whole process ([`next_epoch`]): an epoch names one
/// state of one device's reservations, never another device's, so a device deleted and
/// another created at its address cannot be mistaken for it.
#[derive(Debug, Default)]
struct AccessCache([AtomicU64; AccessCache::SLOTS]);

impl AccessCache {
    const SLOTS: usize = 4;

    fn slot(&self, epoch: u64) -> &AtomicU64 {
        &self.0[epoch as usize % Self::SLOTS]
    }

    /// The classes allowed as of `epoch`, if known.
    fn get(&self, epoch: u64) -> Option<u16> {
        let v = self.slot(epoch).load(Ordering::Relaxed);
        (v >> 16 == epoch).then_some(v as u16)
    }

    fn put(&self, epoch: u64, allowed: u16) {
        self.slot(epoch)
            .store(epoch << 16 | u64::from(allowed), Ordering::Relaxed);
    }
}

/// A new epoch: never 0 (an empty [`AccessCache`] entry), below 2^48.
pub(crate) fn next_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) & ((1 << 48) - 1)
}

/// Every class a command can have, and its bit in an [`AccessCache`] entry.
const CLASSES: [CommandClass; 9] = [
    CommandClass::Allowed,
    CommandClass::TestUnitReady,
    CommandClass::Read,
    CommandClass::Write,
    CommandClass::PreventAllow,
    CommandClass::StartStop,
    CommandClass::PersistentReserveIn,
    CommandClass::PersistentReserveOut,
    CommandClass::ReserveRelease,
];

fn class_bit(class: CommandClass) -> u16 {
    let i = CLASSES.iter().position(|c| *c == class).unwrap_or(0);
    1 << i
}

/// The I_T nexus unit tests send their commands from.
#[cfg(test)]
pub(crate) fn test_nexus() -> Nexus {
    Nexus::new("iqn.2026-01.test:initiator", [0x40, 0, 0, 0, 0, 1], 1)
}

impl fmt::Display for Nexus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} port {}", self.transport_id(), self.rel_tgt_id)
    }
}

/// Why a TransportID was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum TransportIdError {
    /// the TransportID runs past the end of its list
    Truncated,
    /// protocol identifier {0:#x} is not iSCSI (5h)
    Protocol(u8),
    /// format code {0} is neither 00b (initiator device) nor 01b (initiator port)
    Format(u8),
    /// the iSCSI name is not NUL-terminated within the TransportID
    Unterminated,
    /// the iSCSI name is empty, longer than 223 bytes, not UTF-8 or holds a control character
    Name,
    /// the initiator session identifier is not ",i,0x" and 12 hexadecimal digits
    Isid,
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6): an iSCSI name, with the ISID of an initiator port
/// (format 01b) or without (format 00b: every initiator port of that name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportId {
    name: String,
    isid: Option<[u8; 6]>,
}

/// SPC-4 §7.6.4.6: the separator between the iSCSI name and the ISID of format 01b.
const ISID_SEPARATOR: &str = ",i,0x";

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_ISCSI_NAME && !name.chars().any(char::is_control)
}

/// RFC 7143 §6.1: a text value, and so the InitiatorName of a login, is at most 8192 bytes.
const MAX_LOGIN_NAME: usize = 8192;

/// A name the state may hold: any a login accepted, for the registrations an I_T nexus made
/// itself ([`Registrant::of`]), even one that is not a valid iSCSI name. Refusing it here
/// would lose the whole state on the next restart.
fn valid_state_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_LOGIN_NAME && !name.contains('\0')
}

fn parse_isid(hex: &str) -> Option<[u8; 6]> {
    if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = u64::from_str_radix(hex, 16).ok()?;
    let b = v.to_be_bytes();
    let mut isid = [0u8; 6];
    isid.copy_from_slice(b.get(2..8)?);
    Some(isid)
}

fn isid_hex(isid: &[u8; 6]) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

impl TransportId {
    /// The TransportID of one initiator port (format 01b).
    pub fn initiator_port(name: &str, isid: [u8; 6]) -> Result<TransportId, TransportIdError> {
        if !valid_name(name) {
            return Err(TransportIdError::Name);
        }
        Ok(TransportId {
            name: name.to_ascii_lowercase(),
            isid: Some(isid),
        })
    }

    /// The TransportID of every initiator port of an iSCSI name (format 00b).
    pub fn initiator_device(name: &str) -> Result<TransportId, TransportIdError> {
        if !valid_name(name) {
            return Err(TransportIdError::Name);
        }
        Ok(TransportId {
            name: name.to_ascii_lowercase(),
            isid: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn isid(&self) -> Option<[u8; 6]> {
        self.isid
    }

    /// Whether the initiator port of `n` is one this TransportID names.
    pub fn covers(&self, n: &Nexus) -> bool {
        self.name == n.name && self.isid.is_none_or(|i| i == n.isid)
    }

    /// Parses the TransportID at the start of `buf`; returns it and its length in bytes.
    pub fn parse(buf: &[u8]) -> Result<(TransportId, usize), TransportIdError> {
        let Some(&[b0, _, l0, l1]) = buf.get(..4) else {
            return Err(TransportIdError::Truncated);
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        if b0 & 0x0f != PROTOCOL_ISCSI {
            return Err(TransportIdError::Protocol(b0 & 0x0f));
        }
        let format = b0 >> 6;
        if format > 1 {
            return Err(TransportIdError::Format(format));
        }
        let total = 4 + len;
        let body = buf.get(4..total).ok_or(TransportIdError::Truncated)?;
        let nul = body
            .iter()
            .position(|&b| b == 0)
            .ok_or(TransportIdError::Unterminated)?;
        let s = std::str::from_utf8(body.get(..nul).unwrap_or_default())
            .map_err(|_| TransportIdError::Name)?;
        let tid = if format == 0 {
            TransportId::initiator_device(s)?
        } else {
            // The last separator (in any case) ends the name.
            let lower = s.to_ascii_lowercase();
            let at = lower.rfind(ISID_SEPARATOR).ok_or(TransportIdError::Isid)?;
            let name = s.get(..at).ok_or(TransportIdError::Isid)?;
            let hex = s
                .get(at + ISID_SEPARATOR.len()..)
                .ok_or(TransportIdError::Isid)?;
            TransportId::initiator_port(name, parse_isid(hex).ok_or(TransportIdError::Isid)?)?
        };
        Ok((tid, total))
    }

    /// The TransportID on the wire: its string NUL-terminated and padded to a multiple of four
    /// bytes, at least 20 (SPC-4 §7.6.4.6).
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = self.to_string();
        // A valid name makes at most 241 bytes of string; one from a login that took a
        // longer name is cut to what the field can say.
        let len = u16::try_from((s.len() + 1).next_multiple_of(4).max(20)).unwrap_or(0xfffc);
        let mut v = Vec::with_capacity(4 + usize::from(len));
        let format = if self.isid.is_some() { 0x40 } else { 0x00 };
        v.push(format | PROTOCOL_ISCSI);
        v.push(0);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(s.as_bytes());
        v.resize(4 + usize::from(len) - 1, 0);
        v.push(0);
        v
    }
}

impl fmt::Display for TransportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.isid {
            Some(isid) => write!(f, "{}{ISID_SEPARATOR}{}", self.name, isid_hex(isid)),
            None => f.write_str(&self.name),
        }
    }
}

/// Who a registration is for: the I_T nexuses whose initiator port the TransportID names
/// and whose target port is `rel_tgt_id` (any target port: ALL_TG_PT).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Registrant {
    pub transport_id: TransportId,
    pub rel_tgt_id: Option<u16>,
}

impl Registrant {
    /// The registrant that `n` registers: itself, or its initiator port on every target port.
    pub fn of(n: &Nexus, all_tg_pt: bool) -> Registrant {
        Registrant {
            transport_id: n.transport_id(),
            rel_tgt_id: (!all_tg_pt).then_some(n.rel_tgt_id),
        }
    }

    /// Whether this registration covers the I_T nexus `n`.
    pub fn matches(&self, n: &Nexus) -> bool {
        self.transport_id.covers(n) && self.rel_tgt_id.is_none_or(|p| p == n.rel_tgt_id)
    }

    /// Of several registrations covering one I_T nexus, the one with an ISID is its own
    /// before one for any initiator port, and the one for its target port before one for
    /// every target port.
    fn specificity(&self) -> u8 {
        2 * u8::from(self.transport_id.isid.is_some()) + u8::from(self.rel_tgt_id.is_some())
    }
}

impl fmt::Display for Registrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rel_tgt_id {
            Some(p) => write!(f, "{} port {p}", self.transport_id),
            None => write!(f, "{} all ports", self.transport_id),
        }
    }
}

// ------------------------------------------------------------------------------ results

/// How a command ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Good,
    ReservationConflict,
    CheckCondition(Sense),
}

impl Status {
    pub fn sense(self) -> Option<Sense> {
        match self {
            Status::CheckCondition(s) => Some(s),
            _ => None,
        }
    }
}

fn check_condition(key: u8, code: (u8, u8)) -> Status {
    Status::CheckCondition(Sense::new(key, code))
}

fn cdb_field(byte: u16, b: u8) -> Status {
    Status::CheckCondition(Sense::invalid_cdb_field(byte, Some(b)))
}

/// What [`Reservations::check`] decides for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// Complete it with RESERVATION CONFLICT status, without running it.
    Conflict,
}

impl Access {
    fn from_allowed(yes: bool) -> Access {
        if yes {
            Access::Allowed
        } else {
            Access::Conflict
        }
    }
}

/// A unit attention a PERSISTENT RESERVE OUT establishes for the I_T nexuses of a registrant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitAttention {
    pub to: Registrant,
    /// RESERVATIONS PREEMPTED, RESERVATIONS RELEASED or REGISTRATIONS PREEMPTED.
    pub asc_ascq: (u8, u8),
}

/// The file operation that keeps the APTPL file in step: the state after a command, or the
/// file's removal once APTPL is cleared. `seq` orders them: [`Reservations::persist`] skips
/// one older than the last written, so that two reactors finishing commands in the wrong
/// order leave the newest state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persist {
    pub seq: u64,
    /// The state to write (the text of [`Snapshot::to_text`]); `None`: remove the file.
    pub state: Option<String>,
}

/// What a PERSISTENT RESERVE OUT did and what the caller must do about it, before it sends
/// the status: carry out `persist`, establish the unit attentions (see
/// [`unit_attentions_for`](Self::unit_attentions_for)) and abort the tasks of every nexus
/// [`aborts`](Self::aborts) names, except the PERSISTENT RESERVE OUT itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOutcome {
    pub status: Status,
    pub unit_attentions: Vec<UnitAttention>,
    /// PREEMPT AND ABORT: the registrants whose tasks are aborted (SPC-4 §5.13.11).
    pub abort: Vec<Registrant>,
    pub persist: Option<Persist>,
    sender: Nexus,
}

impl OutOutcome {
    fn new(sender: &Nexus) -> OutOutcome {
        OutOutcome {
            status: Status::Good,
            unit_attentions: Vec::new(),
            abort: Vec::new(),
            persist: None,
            sender: sender.clone(),
        }
    }

    /// The unit attentions (ASC, ASCQ) to establish for the I_T nexus `n`, once each: those
    /// for a registrant covering it, none for the nexus that sent the command (its status
    /// tells it).
    pub fn unit_attentions_for(&self, n: &Nexus) -> Vec<(u8, u8)> {
        let mut v: Vec<(u8, u8)> = Vec::new();
        if *n == self.sender {
            return v;
        }
        for ua in &self.unit_attentions {
            if ua.to.matches(n) && !v.contains(&ua.asc_ascq) {
                v.push(ua.asc_ascq);
            }
        }
        v
    }

    /// Whether PREEMPT AND ABORT aborts the tasks of `n` (for the sender: all but itself).
    pub fn aborts(&self, n: &Nexus) -> bool {
        self.abort.iter().any(|r| r.matches(n))
    }
}

// ------------------------------------------------------------------------------ state

#[derive(Debug, Clone)]
struct Registration {
    /// Unique for the life of the state: what a holder refers to.
    id: u64,
    who: Registrant,
    key: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// All registrants types.
    All,
    /// The I_T nexuses of a registration through one target port.
    Nexus { reg: u64, rel_tgt_id: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    ty: PrType,
    holder: Holder,
}

#[derive(Debug, Default)]
struct State {
    /// PRGENERATION (SPC-4 §6.15.2), a wrapping counter.
    generation: u32,
    regs: Vec<Registration>,
    next_id: u64,
    res: Option<Reservation>,
    /// PTPL_A: the APTPL bit of the last registration.
    aptpl: bool,
    /// The holder of an SPC-2 RESERVE.
    spc2: Option<Nexus>,
    /// Counts changes, to order the writes of the APTPL file.
    seq: u64,
}

fn new_reservation(ty: PrType, reg: u64, n: &Nexus) -> Reservation {
    Reservation {
        ty,
        holder: if ty.is_all_registrants() {
            Holder::All
        } else {
            Holder::Nexus {
                reg,
                rel_tgt_id: n.rel_tgt_id,
            }
        },
    }
}

/// The checked view of a basic PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3): at
/// least [`field::BASIC_LEN`] bytes, so no accessor fails.
struct BasicParams<'a>(&'a [u8]);

impl<'a> BasicParams<'a> {
    fn new_checked(data: &'a [u8]) -> Result<BasicParams<'a>, Status> {
        if data.len() < field::BASIC_LEN {
            return Err(length_error());
        }
        Ok(BasicParams(data))
    }

    fn reservation_key(&self) -> u64 {
        be(self.0, field::RESERVATION_KEY)
    }

    fn service_action_key(&self) -> u64 {
        be(self.0, field::SERVICE_ACTION_RESERVATION_KEY)
    }

    fn spec_i_pt(&self) -> bool {
        bit(self.0, field::FLAGS, field::SPEC_I_PT_BIT)
    }

    fn all_tg_pt(&self) -> bool {
        bit(self.0, field::FLAGS, field::ALL_TG_PT_BIT)
    }

    fn aptpl(&self) -> bool {
        bit(self.0, field::FLAGS, field::APTPL_BIT)
    }

    /// The TransportIDs of SPEC_I_PT, each with its offset in the list.
    fn transport_ids(&self) -> Result<Vec<(TransportId, usize)>, Status> {
        let end = exact_end(
            self.0,
            field::TRANSPORTID_PARAMETER_DATA_LENGTH,
            field::TRANSPORTIDS,
        )?;
        let mut v = Vec::new();
        let mut off = field::TRANSPORTIDS;
        while off < end {
            let (tid, len) = self
                .0
                .get(off..end)
                .ok_or_else(length_error)
                .and_then(|b| TransportId::parse(b).map_err(|_| param_field(off)))?;
            if v.len() == MAX_REGISTRATIONS {
                return Err(no_registration_resources());
            }
            v.push((tid, off));
            off += len;
        }
        Ok(v)
    }
}

impl State {
    /// The index of the registration of `n`: the most specific one covering it.
    fn effective(&self, n: &Nexus) -> Option<usize> {
        let mut best: Option<(usize, u8)> = None;
        for (i, r) in self.regs.iter().enumerate() {
            if r.who.matches(n) && best.is_none_or(|(_, s)| r.who.specificity() > s) {
                best = Some((i, r.who.specificity()));
            }
        }
        best.map(|(i, _)| i)
    }

    fn reg(&self, id: u64) -> Option<&Registration> {
        self.regs.iter().find(|r| r.id == id)
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match self.res.map(|r| r.holder) {
            None => false,
            Some(Holder::All) => self.effective(n).is_some(),
            Some(Holder::Nexus { reg, rel_tgt_id }) => {
                rel_tgt_id == n.rel_tgt_id
                    && self
                        .effective(n)
                        .and_then(|i| self.regs.get(i))
                        .is_some_and(|r| r.id == reg)
            }
        }
    }

    fn add(&mut self, who: Registrant, key: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.regs.push(Registration { id, who, key });
        id
    }

    /// A reservation outlives no holder: all registrants types end with the last
    /// registration, the others with the holder's.
    fn settle(&mut self) {
        self.res = match self.res {
            Some(Reservation {
                holder: Holder::All,
                ..
            }) if self.regs.is_empty() => None,
            Some(Reservation {
                holder: Holder::Nexus { reg, .. },
                ..
            }) if self.reg(reg).is_none() => None,
            r => r,
        };
    }

    /// A unit attention for every registration left.
    fn tell_registrants(&self, o: &mut OutOutcome, asc_ascq: (u8, u8)) {
        for r in &self.regs {
            o.unit_attentions.push(UnitAttention {
                to: r.who.clone(),
                asc_ascq,
            });
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn access(&self, n: &Nexus, class: CommandClass) -> Access {
        use CommandClass as C;
        // Classes that depend on the CDB come resolved (`for_cdb`); unresolved, the stricter
        // reading holds.
        let class = match class {
            C::PreventAllow | C::StartStop => C::Write,
            c => c,
        };
        let allowed = Access::from_allowed;
        if let Some(h) = &self.spc2 {
            // SPC-2 §5.5.1: persistent reservation commands conflict with any RESERVE.
            return allowed(match class {
                C::PersistentReserveIn | C::PersistentReserveOut => false,
                C::Allowed | C::ReserveRelease => true,
                C::TestUnitReady | C::Read | C::Write | C::PreventAllow | C::StartStop => h == n,
            });
        }
        let Some(res) = self.res else {
            return Access::Allowed;
        };
        match class {
            C::Allowed
            | C::TestUnitReady
            | C::PersistentReserveIn
            | C::PersistentReserveOut
            | C::ReserveRelease => return Access::Allowed,
            C::Read | C::Write | C::PreventAllow | C::StartStop => {}
        }
        if self.is_holder(n) {
            return Access::Allowed;
        }
        let registered = self.effective(n).is_some();
        let reads_open = res.ty.is_write_exclusive() && class == C::Read;
        allowed(match res.ty {
            PrType::WriteExclusive | PrType::ExclusiveAccess => reads_open,
            _ => registered || reads_open,
        })
    }

    /// SPC-4 §5.13.3: a RESERVE or RELEASE while registrations exist completes with GOOD
    /// and changes nothing from the holder, or from a registrant of a registrants only or
    /// all registrants reservation; it conflicts for everyone else. `None`: no registration,
    /// SPC-2 rules apply.
    fn compatible_reservation_handling(&self, n: &Nexus) -> Option<Status> {
        if self.regs.is_empty() {
            return None;
        }
        let registrants_share = self
            .res
            .is_some_and(|r| r.ty.is_registrants_only() || r.ty.is_all_registrants());
        Some(
            if self.is_holder(n) || (registrants_share && self.effective(n).is_some()) {
                Status::Good
            } else {
                Status::ReservationConflict
            },
        )
    }

    // ------------------------------------------------------------ PERSISTENT RESERVE OUT

    fn out(
        &mut self,
        n: &Nexus,
        cdb: &[u8],
        param: &[u8],
        ptpl_capable: bool,
        o: &mut OutOutcome,
    ) -> Result<(), Status> {
        // SPC-2 §5.5.1: while a RESERVE holds, every PERSISTENT RESERVE OUT conflicts.
        if self.spc2.is_some() {
            return Err(Status::ReservationConflict);
        }
        let sa = cdb.get(1).copied().unwrap_or(0) & 0x1f;
        if sa > out_sa::REGISTER_AND_MOVE {
            return Err(cdb_field(1, 4));
        }
        let scope_type = cdb.get(2).copied().unwrap_or(0);
        let ty = match sa {
            out_sa::RESERVE | out_sa::RELEASE | out_sa::PREEMPT | out_sa::PREEMPT_AND_ABORT => {
                // LU_SCOPE (0h) is the only scope SPC-4 keeps.
                if scope_type >> 4 != 0 {
                    return Err(cdb_field(2, 7));
                }
                Some(PrType::from_code(scope_type & 0x0f).ok_or(cdb_field(2, 3))?)
            }
            _ => None,
        };
        let list_len = usize::try_from(be(cdb, 5..9)).unwrap_or(usize::MAX);
        let data = param.get(..list_len).ok_or_else(length_error)?;
        let p = BasicParams::new_checked(data)?;
        if sa == out_sa::REGISTER_AND_MOVE {
            return self.register_and_move(n, data, ptpl_capable);
        }
        // SPC-4 §6.16.3: SPEC_I_PT is for REGISTER only; without it the list is 24 bytes.
        if p.spec_i_pt() && sa != out_sa::REGISTER {
            return Err(param_bit(field::FLAGS, field::SPEC_I_PT_BIT));
        }
        if !p.spec_i_pt() && data.len() != field::BASIC_LEN {
            return Err(length_error());
        }
        match (sa, ty) {
            (out_sa::REGISTER | out_sa::REGISTER_AND_IGNORE_EXISTING_KEY, _) => {
                if p.aptpl() && !ptpl_capable {
                    return Err(param_bit(field::FLAGS, field::APTPL_BIT));
                }
                let tids = if p.spec_i_pt() {
                    p.transport_ids()?
                } else {
                    Vec::new()
                };
                self.register(n, &p, sa == out_sa::REGISTER, &tids, o)
            }
            (out_sa::RESERVE, Some(ty)) => self.reserve(n, p.reservation_key(), ty),
            (out_sa::RELEASE, Some(ty)) => self.release(n, p.reservation_key(), ty, o),
            (out_sa::CLEAR, _) => self.clear(n, p.reservation_key(), o),
            (out_sa::PREEMPT | out_sa::PREEMPT_AND_ABORT, Some(ty)) => {
                self.preempt(n, &p, ty, sa == out_sa::PREEMPT_AND_ABORT, o)
            }
            _ => Err(cdb_field(1, 4)),
        }
    }

    /// The registration of `n` if its key is `key`: the first check of every service action
    /// but the two REGISTERs (SPC-4 §6.16.2: from an unregistered nexus, or with another
    /// key, it is a reservation conflict).
    fn registered_with(&self, n: &Nexus, key: u64) -> Result<usize, Status> {
        match self.effective(n) {
            Some(i) if self.regs.get(i).is_some_and(|r| r.key == key) => Ok(i),
            _ => Err(Status::ReservationConflict),
        }
    }

    /// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7).
    fn register(
        &mut self,
        n: &Nexus,
        p: &BasicParams<'_>,
        check_key: bool,
        tids: &[(TransportId, usize)],
        o: &mut OutOutcome,
    ) -> Result<(), Status> {
        let sark = p.service_action_key();
        match self.effective(n) {
            Some(i) => {
                if check_key
                    && self
                        .regs
                        .get(i)
                        .is_none_or(|r| r.key != p.reservation_key())
                {
                    return Err(Status::ReservationConflict);
                }
                if p.spec_i_pt() {
                    return Err(param_bit(field::FLAGS, field::SPEC_I_PT_BIT));
                }
                if sark == 0 {
                    self.unregister(i, o);
                } else if let Some(r) = self.regs.get_mut(i) {
                    // ALL_TG_PT is only looked at when a registration is made.
                    r.key = sark;
                }
            }
            None => {
                if check_key && p.reservation_key() != 0 {
                    return Err(Status::ReservationConflict);
                }
                // A zero key registers nothing, and completes with GOOD.
                if sark != 0 {
                    let all_tg_pt = p.all_tg_pt();
                    let mut new = vec![Registrant::of(n, all_tg_pt)];
                    for (tid, off) in tids {
                        let r = Registrant {
                            transport_id: tid.clone(),
                            rel_tgt_id: (!all_tg_pt).then_some(n.rel_tgt_id),
                        };
                        if new.contains(&r) {
                            continue;
                        }
                        // All or nothing: a TransportID of a registered nexus fails them all.
                        if self.regs.iter().any(|x| x.who == r) {
                            return Err(param_field(*off));
                        }
                        new.push(r);
                    }
                    if self.regs.len() + new.len() > MAX_REGISTRATIONS {
                        return Err(no_registration_resources());
                    }
                    for r in new {
                        self.add(r, sark);
                    }
                }
            }
        }
        self.bump_generation();
        self.aptpl = p.aptpl();
        Ok(())
    }

    /// Removes the registration at `i` (SPC-4 §5.13.11.3): its holder's reservation goes
    /// with it, and registrants only types tell the other registrants.
    fn unregister(&mut self, i: usize, o: &mut OutOutcome) {
        let removed = self.regs.remove(i);
        let held_registrants_only = self.res.is_some_and(|r| {
            r.ty.is_registrants_only()
                && matches!(r.holder, Holder::Nexus { reg, .. } if reg == removed.id)
        });
        if held_registrants_only {
            self.tell_registrants(o, sense::RESERVATIONS_RELEASED);
        }
        self.settle();
    }

    /// RESERVE (SPC-4 §5.13.9). PRgeneration does not change.
    fn reserve(&mut self, n: &Nexus, key: u64, ty: PrType) -> Result<(), Status> {
        let i = self.registered_with(n, key)?;
        match self.res {
            None => {
                let id = self.regs.get(i).map_or(0, |r| r.id);
                self.res = Some(new_reservation(ty, id, n));
                Ok(())
            }
            // The holder reserving again with the same type changes nothing.
            Some(r) if r.ty == ty && self.is_holder(n) => Ok(()),
            Some(_) => Err(Status::ReservationConflict),
        }
    }

    /// RELEASE (SPC-4 §5.13.11.2). PRgeneration does not change.
    fn release(
        &mut self,
        n: &Nexus,
        key: u64,
        ty: PrType,
        o: &mut OutOutcome,
    ) -> Result<(), Status> {
        self.registered_with(n, key)?;
        let Some(r) = self.res else {
            return Ok(());
        };
        // A registrant that does not hold it releases nothing, and completes with GOOD.
        if !self.is_holder(n) {
            return Ok(());
        }
        if r.ty != ty {
            return Err(check_condition(
                sense::ILLEGAL_REQUEST,
                sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
            ));
        }
        self.res = None;
        if r.ty.is_registrants_only() || r.ty.is_all_registrants() {
            self.tell_registrants(o, sense::RESERVATIONS_RELEASED);
        }
        Ok(())
    }

    /// CLEAR (SPC-4 §5.13.11): every registration and the reservation go.
    fn clear(&mut self, n: &Nexus, key: u64, o: &mut OutOutcome) -> Result<(), Status> {
        self.registered_with(n, key)?;
        self.tell_registrants(o, sense::RESERVATIONS_PREEMPTED);
        self.regs.clear();
        self.res = None;
        self.bump_generation();
        Ok(())
    }

    /// PREEMPT and PREEMPT AND ABORT (SPC-4 §5.13.11): the reservation is preempted when the
    /// service action key is its holder's (or zero for an all registrants type), else only
    /// the registrations with that key are removed.
    fn preempt(
        &mut self,
        n: &Nexus,
        p: &BasicParams<'_>,
        ty: PrType,
        abort: bool,
        o: &mut OutOutcome,
    ) -> Result<(), Status> {
        let me_i = self.registered_with(n, p.reservation_key())?;
        let (me, my_key) = self.regs.get(me_i).map_or((0, 0), |r| (r.id, r.key));
        let sark = p.service_action_key();
        let holder_key = match self.res.map(|r| r.holder) {
            Some(Holder::Nexus { reg, .. }) => self.reg(reg).map(|r| r.key),
            _ => None,
        };
        let preempts_reservation = match self.res {
            Some(r) if r.ty.is_all_registrants() => sark == 0,
            Some(_) => holder_key == Some(sark),
            None => false,
        };
        if !preempts_reservation {
            // Removing registrations: the key must name one (SPC-4: a zero key names none,
            // and is refused outright while a reservation of another type exists).
            if sark == 0 && self.res.is_some_and(|r| !r.ty.is_all_registrants()) {
                return Err(param_field(field::SERVICE_ACTION_RESERVATION_KEY.start));
            }
            if !self.regs.iter().any(|r| r.key == sark) {
                return Err(Status::ReservationConflict);
            }
        }
        // Who goes: the registrations with the key (all others, for a zero key preempting an
        // all registrants reservation), never the preempting nexus's own.
        let gone = |r: &Registration| {
            r.id != me
                && if sark == 0 {
                    preempts_reservation
                } else {
                    r.key == sark
                }
        };
        let (removed, kept): (Vec<Registration>, Vec<Registration>) =
            std::mem::take(&mut self.regs).into_iter().partition(gone);
        self.regs = kept;
        for r in &removed {
            o.unit_attentions.push(UnitAttention {
                to: r.who.clone(),
                asc_ascq: sense::REGISTRATIONS_PREEMPTED,
            });
        }
        if abort {
            o.abort.extend(removed.iter().map(|r| r.who.clone()));
            if sark != 0 && my_key == sark {
                // The sender's other tasks go too; the caller spares the command itself.
                if let Some(r) = self.reg(me) {
                    o.abort.push(r.who.clone());
                }
            }
        }
        if preempts_reservation {
            let old = self.res.map(|r| r.ty);
            self.res = Some(new_reservation(ty, me, n));
            if old != Some(ty) {
                self.tell_registrants(o, sense::RESERVATIONS_RELEASED);
            }
        }
        self.settle();
        self.bump_generation();
        Ok(())
    }

    /// REGISTER AND MOVE (SPC-4 §5.13.8, its parameter list §6.16.4): the holder registers
    /// another I_T nexus and hands it the reservation.
    fn register_and_move(
        &mut self,
        n: &Nexus,
        data: &[u8],
        ptpl_capable: bool,
    ) -> Result<(), Status> {
        let me_i = self.registered_with(n, be(data, field::RESERVATION_KEY))?;
        let Some(res) = self.res else {
            // SPC-4 §5.13.8: nothing to move is an invalid request, not a conflict.
            return Err(check_condition(
                sense::ILLEGAL_REQUEST,
                sense::INVALID_FIELD_IN_CDB,
            ));
        };
        if res.ty.is_all_registrants() || !self.is_holder(n) {
            return Err(Status::ReservationConflict);
        }
        let sark = be(data, field::SERVICE_ACTION_RESERVATION_KEY);
        if sark == 0 {
            return Err(param_field(field::SERVICE_ACTION_RESERVATION_KEY.start));
        }
        let aptpl = bit(data, field::MOVE_FLAGS, field::APTPL_BIT);
        if aptpl && !ptpl_capable {
            return Err(param_bit(field::MOVE_FLAGS, field::APTPL_BIT));
        }
        // Relative target port identifiers run from 1: 0 is reserved.
        let Ok(rtpi @ 1..) = u16::try_from(be(data, field::MOVE_RELATIVE_TARGET_PORT)) else {
            return Err(param_field(field::MOVE_RELATIVE_TARGET_PORT.start));
        };
        let end = exact_end(
            data,
            field::MOVE_TRANSPORTID_LENGTH,
            field::MOVE_TRANSPORTID,
        )?;
        let (tid, len) = data
            .get(field::MOVE_TRANSPORTID..end)
            .and_then(|b| TransportId::parse(b).ok())
            .ok_or(param_field(field::MOVE_TRANSPORTID))?;
        if len != end - field::MOVE_TRANSPORTID {
            return Err(param_field(field::MOVE_TRANSPORTID_LENGTH.start));
        }
        // SPC-4 §5.13.8: moving to the sender's own initiator port is refused.
        if tid.covers(n) {
            return Err(param_field(field::MOVE_TRANSPORTID));
        }
        let dest = Registrant {
            transport_id: tid,
            rel_tgt_id: Some(rtpi),
        };
        let dest_id = match self.regs.iter_mut().find(|r| r.who == dest) {
            // Registered already: it takes the new key.
            Some(r) => {
                r.key = sark;
                r.id
            }
            None => {
                if self.regs.len() >= MAX_REGISTRATIONS {
                    return Err(no_registration_resources());
                }
                self.add(dest, sark)
            }
        };
        self.res = Some(Reservation {
            ty: res.ty,
            holder: Holder::Nexus {
                reg: dest_id,
                rel_tgt_id: rtpi,
            },
        });
        if bit(data, field::MOVE_FLAGS, field::MOVE_UNREG_BIT) {
            // Unregistering the sender tells no one: it no longer holds the reservation.
            self.regs.remove(me_i);
        }
        self.bump_generation();
        self.aptpl = aptpl;
        Ok(())
    }

    // ------------------------------------------------------------ PERSISTENT RESERVE IN

    /// READ KEYS (SPC-4 §6.15.2).
    fn read_keys(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 8 * self.regs.len());
        v.extend_from_slice(&self.generation.to_be_bytes());
        let len = 8 * self.regs.len() as u32;
        v.extend_from_slice(&len.to_be_bytes());
        for r in &self.regs {
            v.extend_from_slice(&r.key.to_be_bytes());
        }
        v
    }

    /// READ RESERVATION (SPC-4 §6.15.3).
    fn read_reservation(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.generation.to_be_bytes());
        match self.res {
            None => v.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                v.extend_from_slice(&16u32.to_be_bytes());
                // SPC-4 §5.13.10: all registrants types report key zero.
                let key = match r.holder {
                    Holder::All => 0,
                    Holder::Nexus { reg, .. } => self.reg(reg).map_or(0, |r| r.key),
                };
                v.extend_from_slice(&key.to_be_bytes());
                v.extend_from_slice(&[0; 4]); // obsolete
                v.push(0);
                v.push(r.ty.code()); // SCOPE LU_SCOPE (0h), TYPE
                v.extend_from_slice(&[0; 2]); // obsolete
            }
        }
        v
    }

    /// REPORT CAPABILITIES (SPC-4 §6.15.4).
    fn report_capabilities(&self, ptpl_capable: bool) -> Vec<u8> {
        vec![
            0,
            8, // LENGTH
            // CRH (SPC-4 §5.13.3), SIP_C, ATP_C, PTPL_C.
            0x10 | 0x08 | 0x04 | u8::from(ptpl_capable),
            // TMV; ALLOW COMMANDS 001b (TEST UNIT READY goes through Write Exclusive and
            // Exclusive Access reservations); PTPL_A.
            0x80 | 0x10 | u8::from(self.aptpl),
            // PERSISTENT RESERVATION TYPE MASK: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX...
            0x80 | 0x40 | 0x20 | 0x08 | 0x02,
            // ...and EX_AC_AR.
            0x01,
            0,
            0,
        ]
    }

    /// READ FULL STATUS (SPC-4 §6.15.5): a descriptor per registration, with its TransportID.
    fn read_full_status(&self) -> Vec<u8> {
        let mut d = Vec::new();
        for r in &self.regs {
            let holder_port = match self.res {
                Some(Reservation {
                    holder: Holder::All,
                    ..
                }) => Some(r.who.rel_tgt_id.unwrap_or(0)),
                Some(Reservation {
                    holder: Holder::Nexus { reg, rel_tgt_id },
                    ..
                }) if reg == r.id => Some(rel_tgt_id),
                _ => None,
            };
            let all_tg_pt = if r.who.rel_tgt_id.is_none() { 0x02 } else { 0 };
            d.extend_from_slice(&r.key.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d.push(all_tg_pt | u8::from(holder_port.is_some())); // ALL_TG_PT, R_HOLDER
            d.push(match (holder_port, self.res) {
                (Some(_), Some(res)) => res.ty.code(),
                _ => 0,
            });
            d.extend_from_slice(&[0; 4]);
            // With ALL_TG_PT the field is not defined: the holder's port, else zero.
            let port = r.who.rel_tgt_id.or(holder_port).unwrap_or(0);
            d.extend_from_slice(&port.to_be_bytes());
            let tid = r.who.transport_id.to_bytes();
            d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
            d.extend_from_slice(&tid);
        }
        let mut v = Vec::with_capacity(8 + d.len());
        v.extend_from_slice(&self.generation.to_be_bytes());
        // At most MAX_REGISTRATIONS descriptors, each under 9 KiB (MAX_LOGIN_NAME).
        v.extend_from_slice(&(d.len() as u32).to_be_bytes());
        v.extend_from_slice(&d);
        v
    }

    // ------------------------------------------------------------ snapshots

    /// Counts a change and returns the APTPL file operation it calls for: the new state while
    /// APTPL is set, the file's removal when the change cleared it, nothing otherwise.
    fn changed(&mut self, aptpl_before: bool) -> Option<Persist> {
        self.seq += 1;
        (self.aptpl || aptpl_before).then(|| Persist {
            seq: self.seq,
            state: self.aptpl.then(|| self.snapshot().to_text()),
        })
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            generation: self.generation,
            aptpl: self.aptpl,
            registrations: self.regs.iter().map(|r| (r.who.clone(), r.key)).collect(),
            reservation: self.res.map(|r| SnapshotReservation {
                ty: r.ty,
                holder: match r.holder {
                    Holder::All => None,
                    Holder::Nexus { reg, rel_tgt_id } => self
                        .regs
                        .iter()
                        .position(|x| x.id == reg)
                        .map(|i| (i, rel_tgt_id)),
                },
            }),
        }
    }

    fn restore(&mut self, s: &Snapshot) {
        self.regs.clear();
        self.res = None;
        let ids: Vec<u64> = s
            .registrations
            .iter()
            .map(|(who, key)| self.add(who.clone(), *key))
            .collect();
        self.res = s.reservation.and_then(|r| {
            Some(Reservation {
                ty: r.ty,
                holder: match r.holder {
                    None => Holder::All,
                    Some((i, rel_tgt_id)) => Holder::Nexus {
                        reg: *ids.get(i)?,
                        rel_tgt_id,
                    },
                },
            })
        });
        self.generation = s.generation;
        self.aptpl = s.aptpl;
        self.settle();
    }
}

// ------------------------------------------------------------------------------ the device's

/// The APTPL file of a device and the last change written to it.
#[derive(Debug, Default)]
struct FileSlot {
    path: Option<PathBuf>,
    written: u64,
}

/// The reservations of one logical unit, shared by every reactor.
#[derive(Debug, Default)]
pub struct Reservations {
    /// Set while a reservation (persistent or SPC-2) exists: the only time a command can
    /// conflict.
    reserved: AtomicBool,
    /// Names the current state ([`next_epoch`]): a new one at every change, stored under
    /// the lock.
    epoch: AtomicU64,
    /// A file is configured: APTPL can be honoured (PTPL_C).
    ptpl_capable: AtomicBool,
    state: Mutex<State>,
    /// Taken before `state` when both are.
    file: Mutex<FileSlot>,
}

impl Reservations {
    pub fn new() -> Reservations {
        Reservations::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with the state locked, after every change.
    fn publish(&self, st: &State) {
        self.epoch.store(next_epoch(), Ordering::Release);
        self.reserved
            .store(st.res.is_some() || st.spc2.is_some(), Ordering::Release);
    }

    /// Whether a reservation (persistent or SPC-2) exists, the only time a command can
    /// conflict: one relaxed atomic load, for the dispatcher's fast path.
    pub fn is_reserved(&self) -> bool {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Whether `nexus` may run a command of `class` now (SPC-4 §5.13.1, SPC-2 §5.5.1). Without
    /// a reservation it costs one atomic load: relaxed, since what it guards is read under
    /// the lock, and a reservation established concurrently with the command's arrival may
    /// be seen either way. With one, two more: the state's epoch and the nexus's cached
    /// answer for it; the lock is taken only by the first command of a nexus after a change.
    ///
    /// A change is published (under the lock) before the command that made it is answered,
    /// so a command that follows that answer (PREEMPT's caller, or any nexus told of it)
    /// loads the new epoch and misses the old answers.
    pub fn check(&self, nexus: &Nexus, class: CommandClass) -> Access {
        if !self.is_reserved() {
            return Access::Allowed;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let allowed = match nexus.cache.get(epoch) {
            Some(a) => a,
            None => {
                let st = self.lock();
                // Under the lock the epoch is the state's own.
                let epoch = self.epoch.load(Ordering::Relaxed);
                let a = CLASSES
                    .iter()
                    .filter(|c| st.access(nexus, **c) == Access::Allowed)
                    .fold(0, |a, c| a | class_bit(*c));
                nexus.cache.put(epoch, a);
                a
            }
        };
        Access::from_allowed(allowed & class_bit(class) != 0)
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.16) from `nexus`: `cdb` is its CDB (10 bytes),
    /// `param` the Data-Out (at least the PARAMETER LIST LENGTH of the CDB).
    pub fn persistent_reserve_out(&self, nexus: &Nexus, cdb: &[u8], param: &[u8]) -> OutOutcome {
        let capable = self.ptpl_capable.load(Ordering::Relaxed);
        let mut o = OutOutcome::new(nexus);
        let mut st = self.lock();
        let aptpl_before = st.aptpl;
        match st.out(nexus, cdb, param, capable, &mut o) {
            Ok(()) => o.persist = st.changed(aptpl_before),
            Err(status) => {
                o.status = status;
                o.unit_attentions.clear();
                o.abort.clear();
            }
        }
        self.publish(&st);
        o
    }

    /// PERSISTENT RESERVE IN (SPC-4 §6.15): the parameter data, cut to the CDB's ALLOCATION
    /// LENGTH (its ADDITIONAL LENGTH still tells the whole).
    pub fn persistent_reserve_in(&self, cdb: &[u8]) -> Result<Vec<u8>, Status> {
        let alloc = usize::try_from(be(cdb, 7..9)).unwrap_or(0);
        let capable = self.ptpl_capable.load(Ordering::Relaxed);
        let st = self.lock();
        // SPC-2 §5.5.1: conflicts with a RESERVE, whoever holds it.
        if st.spc2.is_some() {
            return Err(Status::ReservationConflict);
        }
        let mut v = match cdb.get(1).copied().unwrap_or(0) & 0x1f {
            in_sa::READ_KEYS => st.read_keys(),
            in_sa::READ_RESERVATION => st.read_reservation(),
            in_sa::REPORT_CAPABILITIES => st.report_capabilities(capable),
            in_sa::READ_FULL_STATUS => st.read_full_status(),
            _ => return Err(cdb_field(1, 4)),
        };
        v.truncate(alloc);
        Ok(v)
    }

    /// RESERVE(6) or RESERVE(10) (SPC-2; SPC-4 §5.13.3 while registrations exist). Extents
    /// and third-party reservations are not supported.
    pub fn reserve(&self, nexus: &Nexus, cdb: &[u8]) -> Status {
        if let Err(s) = check_spc2_cdb(cdb) {
            return s;
        }
        let mut st = self.lock();
        if let Some(s) = st.compatible_reservation_handling(nexus) {
            return s;
        }
        match &st.spc2 {
            Some(h) if h != nexus => Status::ReservationConflict,
            _ => {
                st.spc2 = Some(nexus.clone());
                self.publish(&st);
                Status::Good
            }
        }
    }

    /// RELEASE(6) or RELEASE(10) (SPC-2; SPC-4 §5.13.3): only the holder
    /// releases; from anyone else it completes with GOOD and changes nothing.
    pub fn release(&self, nexus: &Nexus, cdb: &[u8]) -> Status {
        if let Err(s) = check_spc2_cdb(cdb) {
            return s;
        }
        let mut st = self.lock();
        if let Some(s) = st.compatible_reservation_handling(nexus) {
            return s;
        }
        if st.spc2.as_ref() == Some(nexus) {
            st.spc2 = None;
            self.publish(&st);
        }
        Status::Good
    }

    /// The I_T nexus is gone (logout, connection lost, session reinstated): its RESERVE goes
    /// (SPC-2 §5.5.1); persistent reservations stay.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.lock();
        if st.spc2.as_ref() == Some(nexus) {
            st.spc2 = None;
            self.publish(&st);
        }
    }

    /// LOGICAL UNIT RESET, TARGET RESET or another hard reset: a RESERVE goes (SPC-2
    /// §5.5.1); persistent reservations stay (SPC-4 §5.13.1).
    pub fn reset(&self) {
        let mut st = self.lock();
        st.spc2 = None;
        self.publish(&st);
    }

    /// The persistent reservation state as it is now.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().snapshot()
    }

    /// Replaces the persistent reservation state (the `pr_state` attribute: another node's
    /// state after a failover). Refused while registrations exist here: they would vanish
    /// under their initiators. The APTPL file follows, by the returned [`Persist`].
    pub fn restore(&self, s: &Snapshot) -> Result<Option<Persist>, PrFileError> {
        let mut st = self.lock();
        if !st.regs.is_empty() {
            return Err(PrFileError::InUse);
        }
        if s.aptpl && !self.ptpl_capable.load(Ordering::Relaxed) {
            return Err(PrFileError::NoFile);
        }
        let aptpl_before = st.aptpl;
        st.restore(s);
        let persist = st.changed(aptpl_before);
        self.publish(&st);
        Ok(persist)
    }

    /// The APTPL file, if any.
    pub fn file(&self) -> Option<PathBuf> {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .path
            .clone()
    }

    /// Sets the APTPL file (`None`: APTPL is refused, PTPL_C=0) and restores the state it
    /// holds, if it exists. Refused while registrations exist, which it would replace.
    pub fn set_file(&self, path: Option<&Path>) -> Result<(), PrFileError> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        if !st.regs.is_empty() {
            return Err(PrFileError::InUse);
        }
        match path {
            None => {
                st.aptpl = false;
                self.ptpl_capable.store(false, Ordering::Relaxed);
            }
            Some(p) => {
                if !p.is_absolute() {
                    return Err(PrFileError::NotAbsolute(p.display().to_string()));
                }
                match load(p)? {
                    Some(s) => st.restore(&s),
                    None => st.aptpl = false,
                }
                self.ptpl_capable.store(true, Ordering::Relaxed);
            }
        }
        st.seq += 1;
        f.path = path.map(Path::to_path_buf);
        f.written = st.seq;
        self.publish(&st);
        Ok(())
    }

    /// Carries out the file operation of a PERSISTENT RESERVE OUT (a blocking write and
    /// fsyncs: a few milliseconds, for a rare command). One older than the last carried out
    /// is skipped.
    pub fn persist(&self, p: &Persist) -> Result<(), PrFileError> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if p.seq <= f.written {
            return Ok(());
        }
        let Some(path) = f.path.clone() else {
            return Ok(());
        };
        match &p.state {
            Some(text) => save_text(&path, text)?,
            None => remove(&path)?,
        }
        f.written = p.seq;
        Ok(())
    }
}

/// RESERVE and RELEASE of extents (bit 0, obsolete) or for a third party (RESERVE(10) and
/// RELEASE(10) bit 4, LONGID bit 1) are refused with INVALID FIELD IN CDB.
fn check_spc2_cdb(cdb: &[u8]) -> Result<(), Status> {
    let b1 = cdb.get(1).copied().unwrap_or(0);
    let ten = matches!(
        cdb.first().copied(),
        Some(opcode::RESERVE_10 | opcode::RELEASE_10)
    );
    for bitno in [0u8, 1, 4] {
        if (ten || bitno != 1) && b1 & (1 << bitno) != 0 {
            return Err(cdb_field(1, bitno));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ the file

/// The persistent reservation state as plain data: what the APTPL file and the `pr_state`
/// attribute hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub generation: u32,
    /// PTPL_A.
    pub aptpl: bool,
    pub registrations: Vec<(Registrant, u64)>,
    pub reservation: Option<SnapshotReservation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReservation {
    pub ty: PrType,
    /// The holder's registration (an index into `registrations`) and target port; `None`
    /// for all registrants types.
    pub holder: Option<(usize, u16)>,
}

/// Why a state file or text was refused.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PrFileError {
    /// cannot {op} {path}: {source}
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    /// {path}: {error}
    Corrupt { path: String, error: ParseError },
    /// the persistent reservation state cannot be replaced while registrations exist
    InUse,
    /// APTPL state needs a persistent reservation file (pr_file_name)
    NoFile,
    /// {0} is not an absolute path
    NotAbsolute(String),
}

/// Where and why the text of a state does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// The first line of the text: what it is and the version of its format.
const MAGIC: &str = "iscsi-tgt persistent reservations";
const VERSION: u32 = 1;
/// A state file is a few hundred kilobytes at most ([`MAX_REGISTRATIONS`] lines).
const MAX_FILE: u64 = 4 << 20;

/// FNV-1a: the checksum of the text, so that a damaged file is refused rather than restored
/// wrong.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Names hold whatever a login accepted: anything but the printable ASCII that needs no
/// quoting is written as %XX.
fn encode_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Snapshot {
    /// The text form, one item a line, versioned and checksummed:
    ///
    /// ```text
    /// iscsi-tgt persistent reservations 1
    /// generation 7
    /// aptpl 1
    /// registration 0x00000000000000aa iqn.1993-08.org.debian:01:a 23d000000001 1
    /// registration 0x00000000000000bb iqn.1993-08.org.debian:01:b * *
    /// reservation 5 holder 0 1
    /// end 8f9a0c51e0f3d3a2
    /// ```
    ///
    /// A registration is its key, the iSCSI name (%XX for bytes that need it), the ISID (`*`:
    /// any) and the relative target port (`*`: all). The reservation names its type and its
    /// holder's registration (counted from 0) and target port, or `all` for the all
    /// registrants types. `end` carries the FNV-1a hash of every line before it.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{MAGIC} {VERSION}\ngeneration {}\naptpl {}\n",
            self.generation,
            u8::from(self.aptpl)
        );
        for (who, key) in &self.registrations {
            let isid = who
                .transport_id
                .isid
                .as_ref()
                .map_or_else(|| "*".to_string(), isid_hex);
            let port = who
                .rel_tgt_id
                .map_or_else(|| "*".to_string(), |p| p.to_string());
            s.push_str(&format!(
                "registration {key:#018x} {} {isid} {port}\n",
                encode_name(&who.transport_id.name)
            ));
        }
        if let Some(r) = &self.reservation {
            match r.holder {
                Some((i, port)) => {
                    s.push_str(&format!("reservation {} holder {i} {port}\n", r.ty.code()))
                }
                None => s.push_str(&format!("reservation {} all\n", r.ty.code())),
            }
        }
        let sum = fnv1a(&s);
        s.push_str(&format!("end {sum:016x}\n"));
        s
    }

    /// Parses and checks [`to_text`](Self::to_text)'s form; any damage is an error.
    pub fn from_text(text: &str) -> Result<Snapshot, ParseError> {
        let err = |line: usize, reason: &str| ParseError {
            line,
            reason: reason.to_string(),
        };
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| err(1, "the text ends before its end line"))?;
        let (body, last) = text.split_at(body_end);
        let lines = body.lines().count() + 1;
        let sum = last
            .trim_end()
            .strip_prefix("end ")
            .ok_or_else(|| err(lines, "the last line is not `end CHECKSUM`: truncated?"))?;
        if u64::from_str_radix(sum, 16).ok() != Some(fnv1a(body)) {
            return Err(err(lines, "the checksum does not match the content"));
        }
        let mut s = Snapshot::default();
        let (mut generation, mut aptpl) = (None, None);
        for (i, line) in body.lines().enumerate() {
            let no = i + 1;
            let w: Vec<&str> = line.split(' ').collect();
            if no == 1 {
                let version = line
                    .strip_prefix(MAGIC)
                    .and_then(|v| v.strip_prefix(' '))
                    .ok_or_else(|| err(1, "not a persistent reservation state"))?;
                if version != VERSION.to_string() {
                    return Err(err(
                        1,
                        &format!("format version {version} is not version {VERSION}"),
                    ));
                }
                continue;
            }
            match w.as_slice() {
                ["generation", g] if generation.is_none() => {
                    generation = Some(g.parse::<u32>().map_err(|_| err(no, "bad generation"))?)
                }
                ["aptpl", a @ ("0" | "1")] if aptpl.is_none() => aptpl = Some(*a == "1"),
                ["registration", key, name, isid, port] if s.reservation.is_none() => {
                    let key = key
                        .strip_prefix("0x")
                        .and_then(|k| u64::from_str_radix(k, 16).ok())
                        .filter(|&k| k != 0)
                        .ok_or_else(|| err(no, "the key is not a nonzero 0x hex number"))?;
                    let name = decode_name(name)
                        .filter(|n| valid_state_name(n))
                        .ok_or_else(|| err(no, "bad iSCSI name"))?;
                    let isid = match *isid {
                        "*" => None,
                        h => Some(
                            parse_isid(h)
                                .ok_or_else(|| err(no, &TransportIdError::Isid.to_string()))?,
                        ),
                    };
                    let transport_id = TransportId {
                        name: name.to_ascii_lowercase(),
                        isid,
                    };
                    let rel_tgt_id = match *port {
                        "*" => None,
                        p => Some(
                            p.parse::<u16>()
                                .ok()
                                .filter(|&p| p != 0)
                                .ok_or_else(|| err(no, "bad relative target port"))?,
                        ),
                    };
                    let who = Registrant {
                        transport_id,
                        rel_tgt_id,
                    };
                    if s.registrations.iter().any(|(r, _)| *r == who) {
                        return Err(err(no, "a registrant is registered twice"));
                    }
                    if s.registrations.len() == MAX_REGISTRATIONS {
                        return Err(err(no, "too many registrations"));
                    }
                    s.registrations.push((who, key));
                }
                ["reservation", ty, rest @ ..] if s.reservation.is_none() => {
                    let ty = ty
                        .parse::<u8>()
                        .ok()
                        .and_then(PrType::from_code)
                        .ok_or_else(|| err(no, "bad reservation type"))?;
                    let holder = match (rest, ty.is_all_registrants()) {
                        (["all"], true) => None,
                        (["holder", i, port], false) => {
                            let i = i
                                .parse::<usize>()
                                .ok()
                                .filter(|&i| i < s.registrations.len())
                                .ok_or_else(|| err(no, "the holder is not a registration"))?;
                            let port = port
                                .parse::<u16>()
                                .ok()
                                .filter(|&p| p != 0)
                                .ok_or_else(|| err(no, "bad holder port"))?;
                            Some((i, port))
                        }
                        _ => return Err(err(no, "the holder does not suit the type")),
                    };
                    if s.registrations.is_empty() {
                        return Err(err(no, "a reservation without registrations"));
                    }
                    s.reservation = Some(SnapshotReservation { ty, holder });
                }
                _ => {
                    return Err(err(
                        no,
                        &format!("unexpected line {}", crate::util::quote(line)),
                    ))
                }
            }
        }
        s.generation = generation.ok_or_else(|| err(lines, "no generation line"))?;
        s.aptpl = aptpl.ok_or_else(|| err(lines, "no aptpl line"))?;
        Ok(s)
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PrFileError {
    let path = path.display().to_string();
    move |source| PrFileError::Io { op, path, source }
}

/// The directory that holds `path`, to fsync after a rename or removal.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(path: &Path) -> Result<(), PrFileError> {
    let dir = parent(path);
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Writes `text` (a [`Snapshot::to_text`]) to `path` atomically: a temporary file in the
/// same directory, written and fsynced, renamed over `path`, then the directory fsynced. A
/// crash leaves the old state or the new one, never a mix.
fn save_text(path: &Path, text: &str) -> Result<(), PrFileError> {
    let dir = parent(path);
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let name = path
        .file_name()
        .map_or_else(|| "pr".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    sync_dir(path)
}

/// Removes the state file (APTPL cleared): nothing survives a restart.
pub fn remove(path: &Path) -> Result<(), PrFileError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Reads the state saved at `path`: `None` if there is no file; an error, never a panic, if
/// it cannot be read or is not a whole, intact state.
pub fn load(path: &Path) -> Result<Option<Snapshot>, PrFileError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, MAX_FILE + 1), &mut bytes)
        .map_err(io_err("read", path))?;
    let corrupt = |line, reason: &str| PrFileError::Corrupt {
        path: path.display().to_string(),
        error: ParseError {
            line,
            reason: reason.to_string(),
        },
    };
    if bytes.len() as u64 > MAX_FILE {
        return Err(corrupt(0, "larger than any state"));
    }
    let text = String::from_utf8(bytes).map_err(|_| corrupt(0, "not UTF-8 text"))?;
    Snapshot::from_text(&text)
        .map(Some)
        .map_err(|error| PrFileError::Corrupt {
            path: path.display().to_string(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{Allowed, Conflict};
    use CommandClass as C;

    const A: &str = "iqn.2024-01.test:a";
    const B: &str = "iqn.2024-01.test:b";
    const C_: &str = "iqn.2024-01.test:c";

    const SPEC_I_PT: u8 = 0x08;
    const ALL_TG_PT: u8 = 0x04;
    const APTPL: u8 = 0x01;

    fn isid(n: u8) -> [u8; 6] {
        [0x40, 0x00, 0x01, 0x37, 0x00, n]
    }

    fn nx(name: &str, port: u16) -> Nexus {
        Nexus::new(name, isid(1), port)
    }

    fn out_cdb(sa: u8, ty: u8, len: u32) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = opcode::PERSISTENT_RESERVE_OUT;
        c[1] = sa;
        c[2] = ty;
        c[5..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn basic(rk: u64, sark: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[20] = flags;
        p
    }

    fn run(r: &Reservations, n: &Nexus, sa: u8, ty: u8, p: &[u8]) -> OutOutcome {
        r.persistent_reserve_out(n, &out_cdb(sa, ty, p.len() as u32), p)
    }

    fn go(r: &Reservations, n: &Nexus, sa: u8, ty: Option<PrType>, rk: u64, sark: u64) -> Status {
        run(r, n, sa, ty.map_or(0, PrType::code), &basic(rk, sark, 0)).status
    }

    fn register(r: &Reservations, n: &Nexus, key: u64) {
        assert_eq!(go(r, n, out_sa::REGISTER, None, 0, key), Status::Good);
    }

    fn reserve(r: &Reservations, n: &Nexus, key: u64, ty: PrType) -> Status {
        go(r, n, out_sa::RESERVE, Some(ty), key, 0)
    }

    fn sense_of(s: Status) -> (u8, u8, u8) {
        let s = s.sense().expect("CHECK CONDITION");
        (s.key, s.asc, s.ascq)
    }

    fn prin(r: &Reservations, sa: u8, alloc: u16) -> Vec<u8> {
        let mut c = [0u8; 10];
        c[0] = opcode::PERSISTENT_RESERVE_IN;
        c[1] = sa;
        c[7..9].copy_from_slice(&alloc.to_be_bytes());
        r.persistent_reserve_in(&c).expect("PERSISTENT RESERVE IN")
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    fn keys(r: &Reservations) -> Vec<u64> {
        let d = prin(r, in_sa::READ_KEYS, 0xffff);
        assert_eq!(be32(&d[4..]) as usize, d.len() - 8);
        d[8..]
            .chunks(8)
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect()
    }

    fn generation(r: &Reservations) -> u32 {
        be32(&prin(r, in_sa::READ_KEYS, 8))
    }

    /// READ RESERVATION: the key and type, if reserved.
    fn held(r: &Reservations) -> Option<(u64, u8)> {
        let d = prin(r, in_sa::READ_RESERVATION, 0xffff);
        match be32(&d[4..]) {
            0 => None,
            16 => Some((u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21])),
            n => panic!("additional length {n}"),
        }
    }

    fn rw(r: &Reservations, n: &Nexus) -> (Access, Access) {
        (r.check(n, C::Read), r.check(n, C::Write))
    }

    #[test]
    fn register_and_unregister_with_key_zero() {
        let r = Reservations::new();
        let a = nx(A, 1);
        assert_eq!(generation(&r), 0);
        // An unregistered nexus must give reservation key 0.
        assert_eq!(
            go(&r, &a, out_sa::REGISTER, None, 5, 7),
            Status::ReservationConflict
        );
        assert_eq!(generation(&r), 0, "no change on a conflict");
        register(&r, &a, 0xaa);
        assert_eq!(keys(&r), [0xaa]);
        assert_eq!(generation(&r), 1);
        // Registered: the key given must be the registered one...
        assert_eq!(
            go(&r, &a, out_sa::REGISTER, None, 0, 0xbb),
            Status::ReservationConflict
        );
        // ...and the new key replaces it.
        assert_eq!(go(&r, &a, out_sa::REGISTER, None, 0xaa, 0xbb), Status::Good);
        assert_eq!(keys(&r), [0xbb]);
        // REGISTER AND IGNORE EXISTING KEY does not look at the key.
        assert_eq!(
            go(
                &r,
                &a,
                out_sa::REGISTER_AND_IGNORE_EXISTING_KEY,
                None,
                0x1234,
                0xcc
            ),
            Status::Good
        );
        assert_eq!(keys(&r), [0xcc]);
        // A zero service action key unregisters.
        assert_eq!(go(&r, &a, out_sa::REGISTER, None, 0xcc, 0), Status::Good);
        assert_eq!(keys(&r), Vec::<u64>::new());
        assert_eq!(generation(&r), 4);
        // Unregistered with two zero keys: GOOD, nothing registered (a REGISTER all the same).
        assert_eq!(go(&r, &a, out_sa::REGISTER, None, 0, 0), Status::Good);
        assert_eq!(keys(&r), Vec::<u64>::new());
        assert_eq!(generation(&r), 5);
        // REGISTER AND IGNORE EXISTING KEY registers an unregistered nexus too.
        assert_eq!(
            go(
                &r,
                &a,
                out_sa::REGISTER_AND_IGNORE_EXISTING_KEY,
                None,
                99,
                0xdd
            ),
            Status::Good
        );
        assert_eq!(keys(&r), [0xdd]);
        // Another nexus of the same initiator (another ISID or port) is another registrant.
        let a2 = Nexus::new(A, isid(2), 1);
        let a_port2 = nx(A, 2);
        register(&r, &a2, 0xee);
        register(&r, &a_port2, 0xff);
        assert_eq!(keys(&r), [0xdd, 0xee, 0xff]);
    }

    #[test]
    fn generation_counts_registration_changes_only() {
        let r = Reservations::new();
        let (a, b) = (nx(A, 1), nx(B, 1));
        register(&r, &a, 1); // 1
        register(&r, &b, 2); // 2
        assert_eq!(generation(&r), 2);
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        assert_eq!(
            go(&r, &a, out_sa::RELEASE, Some(PrType::WriteExclusive), 1, 0),
            Status::Good
        );
        assert_eq!(generation(&r), 2, "RESERVE and RELEASE leave it");
        // Failures leave it.
        assert_eq!(
            reserve(&r, &a, 9, PrType::WriteExclusive),
            Status::ReservationConflict
        );
        assert!(
            go(&r, &a, out_sa::PREEMPT, Some(PrType::WriteExclusive), 1, 0)
                .sense()
                .is_none()
        );
        assert_eq!(generation(&r), 2);
        assert_eq!(
            go(&r, &a, out_sa::REGISTER_AND_IGNORE_EXISTING_KEY, None, 0, 3),
            Status::Good
        );
        assert_eq!(generation(&r), 3);
        assert_eq!(
            go(&r, &a, out_sa::PREEMPT, Some(PrType::WriteExclusive), 3, 2),
            Status::Good
        );
        assert_eq!(generation(&r), 4);
        register(&r, &b, 2);
        assert_eq!(
            go(
                &r,
                &a,
                out_sa::PREEMPT_AND_ABORT,
                Some(PrType::WriteExclusive),
                3,
                2
            ),
            Status::Good
        );
        assert_eq!(generation(&r), 6);
        assert_eq!(reserve(&r, &a, 3, PrType::ExclusiveAccess), Status::Good);
        let moved = run(
            &r,
            &a,
            out_sa::REGISTER_AND_MOVE,
            0,
            &move_params(3, 4, 0, 1, &nx(B, 1).transport_id()),
        );
        assert_eq!(moved.status, Status::Good);
        assert_eq!(generation(&r), 7);
        assert_eq!(go(&r, &a, out_sa::CLEAR, None, 3, 0), Status::Good);
        assert_eq!(generation(&r), 8);
        prin(&r, in_sa::READ_FULL_STATUS, 0xffff);
        assert_eq!(generation(&r), 8, "PERSISTENT RESERVE IN leaves it");
    }

    /// Every type, from the holder, a registrant and a stranger (SPC-4 §5.13.1's table and
    /// SBC-3's).
    #[test]
    fn each_type_restricts_reads_and_writes() {
        #[rustfmt::skip]
        let table = [
            // type, registrant (read, write), non-registrant (read, write)
            (PrType::WriteExclusive, (Allowed, Conflict), (Allowed, Conflict)),
            (PrType::ExclusiveAccess, (Conflict, Conflict), (Conflict, Conflict)),
            (PrType::WriteExclusiveRegistrantsOnly, (Allowed, Allowed), (Allowed, Conflict)),
            (PrType::ExclusiveAccessRegistrantsOnly, (Allowed, Allowed), (Conflict, Conflict)),
            (PrType::WriteExclusiveAllRegistrants, (Allowed, Allowed), (Allowed, Conflict)),
            (PrType::ExclusiveAccessAllRegistrants, (Allowed, Allowed), (Conflict, Conflict)),
        ];
        for (ty, registrant, stranger) in table {
            let r = Reservations::new();
            let (h, g, s) = (nx(A, 1), nx(B, 1), nx(C_, 1));
            register(&r, &h, 1);
            register(&r, &g, 2);
            assert_eq!(
                rw(&r, &s),
                (Allowed, Allowed),
                "registrations alone restrict nothing"
            );
            assert_eq!(reserve(&r, &h, 1, ty), Status::Good);
            assert_eq!(held(&r).map(|(_, t)| t), Some(ty.code()));
            assert_eq!(rw(&r, &h), (Allowed, Allowed), "{ty:?} holder");
            assert_eq!(rw(&r, &g), registrant, "{ty:?} registrant");
            assert_eq!(rw(&r, &s), stranger, "{ty:?} non-registrant");
            for n in [&h, &g, &s] {
                for class in [
                    C::Allowed,
                    C::TestUnitReady,
                    C::PersistentReserveIn,
                    C::PersistentReserveOut,
                    C::ReserveRelease,
                ] {
                    assert_eq!(r.check(n, class), Allowed, "{ty:?} {class:?}");
                }
            }
            // Released: everyone is back.
            assert_eq!(go(&r, &h, out_sa::RELEASE, Some(ty), 1, 0), Status::Good);
            assert_eq!(rw(&r, &s), (Allowed, Allowed));
            assert!(!r.reserved.load(Ordering::Relaxed), "the fast path again");
        }
    }

    #[test]
    fn reserve_by_others_and_by_the_holder() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        assert_eq!(
            reserve(&r, &c, 0, PrType::WriteExclusive),
            Status::ReservationConflict,
            "not registered"
        );
        assert_eq!(
            reserve(&r, &a, 2, PrType::WriteExclusive),
            Status::ReservationConflict,
            "another's key"
        );
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        assert_eq!(
            reserve(&r, &a, 1, PrType::WriteExclusive),
            Status::Good,
            "again"
        );
        assert_eq!(
            reserve(&r, &a, 1, PrType::ExclusiveAccess),
            Status::ReservationConflict,
            "the holder changing type"
        );
        assert_eq!(
            reserve(&r, &b, 2, PrType::WriteExclusive),
            Status::ReservationConflict,
            "a registrant that does not hold it"
        );
        assert_eq!(held(&r), Some((1, 1)));
        // The scope must be LU_SCOPE, the type one of the six.
        let s = go(&r, &a, out_sa::RESERVE, None, 1, 0);
        assert_eq!(
            s,
            Status::CheckCondition(Sense::invalid_cdb_field(2, Some(3)))
        );
        for bad in [0x02, 0x04, 0x09, 0x0f] {
            let s = run(&r, &a, out_sa::RESERVE, bad, &basic(1, 0, 0)).status;
            assert_eq!(sense_of(s), (sense::ILLEGAL_REQUEST, 0x24, 0), "type {bad}");
        }
        let s = run(&r, &a, out_sa::RESERVE, 0x21, &basic(1, 0, 0)).status;
        assert_eq!(
            s,
            Status::CheckCondition(Sense::invalid_cdb_field(2, Some(7)))
        );
        let s = run(&r, &a, 0x08, 0, &basic(1, 0, 0)).status;
        assert_eq!(
            s,
            Status::CheckCondition(Sense::invalid_cdb_field(1, Some(4)))
        );
    }

    #[test]
    fn release_with_another_type_is_invalid() {
        let r = Reservations::new();
        let (a, b) = (nx(A, 1), nx(B, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        assert_eq!(
            go(&r, &a, out_sa::RELEASE, Some(PrType::WriteExclusive), 1, 0),
            Status::Good,
            "nothing to release"
        );
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        let s = go(&r, &a, out_sa::RELEASE, Some(PrType::ExclusiveAccess), 1, 0);
        assert_eq!(sense_of(s), (sense::ILLEGAL_REQUEST, 0x26, 0x04));
        assert_eq!(held(&r), Some((1, 1)), "still held");
        // A registrant that does not hold it: GOOD, nothing released.
        assert_eq!(
            go(&r, &b, out_sa::RELEASE, Some(PrType::WriteExclusive), 2, 0),
            Status::Good
        );
        assert_eq!(held(&r), Some((1, 1)));
        // Unregistered, or the wrong key: conflict.
        assert_eq!(
            go(
                &r,
                &nx(C_, 1),
                out_sa::RELEASE,
                Some(PrType::WriteExclusive),
                0,
                0
            ),
            Status::ReservationConflict
        );
        assert_eq!(
            go(&r, &a, out_sa::RELEASE, Some(PrType::WriteExclusive), 2, 0),
            Status::ReservationConflict
        );
        let o = run(&r, &a, out_sa::RELEASE, 1, &basic(1, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert!(o.unit_attentions.is_empty(), "Write Exclusive tells no one");
        assert_eq!(held(&r), None);
        assert_eq!(keys(&r), [1, 2], "registrations stay");
    }

    #[test]
    fn releasing_registrants_types_tells_the_other_registrants() {
        for ty in [
            PrType::WriteExclusiveRegistrantsOnly,
            PrType::ExclusiveAccessAllRegistrants,
        ] {
            let r = Reservations::new();
            let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
            register(&r, &a, 1);
            register(&r, &b, 2);
            assert_eq!(reserve(&r, &a, 1, ty), Status::Good);
            let o = run(&r, &a, out_sa::RELEASE, ty.code(), &basic(1, 0, 0));
            assert_eq!(o.status, Status::Good);
            assert_eq!(o.unit_attentions_for(&b), [sense::RESERVATIONS_RELEASED]);
            assert_eq!(o.unit_attentions_for(&a), [], "not the sender");
            assert_eq!(o.unit_attentions_for(&c), [], "not a stranger");
            assert_eq!(held(&r), None);
        }
    }

    #[test]
    fn all_registrants_hold_until_the_last_goes() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        assert_eq!(
            reserve(&r, &a, 1, PrType::WriteExclusiveAllRegistrants),
            Status::Good
        );
        // Every registrant holds it: it may reserve again, and reads zero as the key.
        assert_eq!(
            reserve(&r, &b, 2, PrType::WriteExclusiveAllRegistrants),
            Status::Good
        );
        assert_eq!(
            reserve(&r, &b, 2, PrType::WriteExclusive),
            Status::ReservationConflict
        );
        assert_eq!(held(&r), Some((0, 7)));
        assert_eq!(rw(&r, &b), (Allowed, Allowed));
        assert_eq!(rw(&r, &c), (Allowed, Conflict));
        let fs = prin(&r, in_sa::READ_FULL_STATUS, 0xffff);
        let descs = full_status(&fs);
        assert_eq!(descs.len(), 2);
        assert!(descs.iter().all(|d| d.holder && d.ty == 7), "{descs:?}");
        // The reserving nexus leaves: the reservation stays with the others.
        assert_eq!(go(&r, &a, out_sa::REGISTER, None, 1, 0), Status::Good);
        assert_eq!(held(&r), Some((0, 7)));
        assert_eq!(rw(&r, &a), (Allowed, Conflict));
        assert_eq!(rw(&r, &b), (Allowed, Allowed));
        // The last one leaves: released.
        let o = run(&r, &b, out_sa::REGISTER, 0, &basic(2, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert!(o.unit_attentions.is_empty());
        assert_eq!(held(&r), None);
        assert_eq!(rw(&r, &c), (Allowed, Allowed));
    }

    #[test]
    fn unregistering_the_holder_releases() {
        // Write Exclusive: released, nobody told.
        let r = Reservations::new();
        let (a, b) = (nx(A, 1), nx(B, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        let o = run(&r, &a, out_sa::REGISTER, 0, &basic(1, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert!(o.unit_attentions.is_empty());
        assert_eq!(held(&r), None);
        // Registrants only: released, the other registrants told.
        let r = Reservations::new();
        register(&r, &a, 1);
        register(&r, &b, 2);
        assert_eq!(
            reserve(&r, &a, 1, PrType::ExclusiveAccessRegistrantsOnly),
            Status::Good
        );
        let o = run(
            &r,
            &a,
            out_sa::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            &basic(0, 0, 0),
        );
        assert_eq!(o.status, Status::Good);
        assert_eq!(o.unit_attentions_for(&b), [sense::RESERVATIONS_RELEASED]);
        assert_eq!(held(&r), None);
        // A registrant that does not hold it leaves: the reservation stays.
        assert_eq!(
            reserve(&r, &b, 2, PrType::ExclusiveAccessRegistrantsOnly),
            Status::Good
        );
        register(&r, &a, 1);
        let o = run(&r, &a, out_sa::REGISTER, 0, &basic(1, 0, 0));
        assert!(o.unit_attentions.is_empty());
        assert_eq!(held(&r), Some((2, 6)));
    }

    #[test]
    fn preempt_the_reservation() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        register(&r, &c, 3);
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        // B preempts A's key, and changes the type.
        let o = run(&r, &b, out_sa::PREEMPT, 3, &basic(2, 1, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(held(&r), Some((2, 3)));
        assert_eq!(keys(&r), [2, 3], "A's registration went");
        assert_eq!(o.unit_attentions_for(&a), [sense::REGISTRATIONS_PREEMPTED]);
        assert_eq!(
            o.unit_attentions_for(&c),
            [sense::RESERVATIONS_RELEASED],
            "the type changed"
        );
        assert_eq!(o.unit_attentions_for(&b), []);
        assert!(o.abort.is_empty(), "PREEMPT aborts nothing");
        assert_eq!(rw(&r, &a), (Conflict, Conflict));
        assert_eq!(rw(&r, &b), (Allowed, Allowed));
        // Same type: no RESERVATIONS RELEASED.
        let o = run(&r, &c, out_sa::PREEMPT, 3, &basic(3, 2, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(held(&r), Some((3, 3)));
        assert_eq!(o.unit_attentions_for(&b), [sense::REGISTRATIONS_PREEMPTED]);
        assert_eq!(keys(&r), [3]);
        // The holder preempting its own key changes the type and keeps its registration.
        let o = run(&r, &c, out_sa::PREEMPT, 1, &basic(3, 3, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(held(&r), Some((3, 1)));
        assert_eq!(keys(&r), [3]);
    }

    #[test]
    fn preempt_registrations_only() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        register(&r, &c, 3);
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        // B removes C's registration: the reservation is not touched.
        let o = run(&r, &b, out_sa::PREEMPT, 3, &basic(2, 3, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(held(&r), Some((1, 1)));
        assert_eq!(keys(&r), [1, 2]);
        assert_eq!(o.unit_attentions_for(&c), [sense::REGISTRATIONS_PREEMPTED]);
        assert_eq!(o.unit_attentions_for(&a), []);
        // A zero key with a reservation of another kind: invalid.
        let s = go(&r, &b, out_sa::PREEMPT, Some(PrType::WriteExclusive), 2, 0);
        assert_eq!(s, Status::CheckCondition(Sense::invalid_param_field(8)));
        // A key nobody has: conflict.
        let s = go(&r, &b, out_sa::PREEMPT, Some(PrType::WriteExclusive), 2, 77);
        assert_eq!(s, Status::ReservationConflict);
        // Unregistered, or the wrong key: conflict.
        let s = go(&r, &c, out_sa::PREEMPT, Some(PrType::WriteExclusive), 0, 1);
        assert_eq!(s, Status::ReservationConflict);
        let s = go(&r, &b, out_sa::PREEMPT, Some(PrType::WriteExclusive), 1, 1);
        assert_eq!(s, Status::ReservationConflict);
        assert_eq!(generation(&r), 4);
        // Without a reservation: the registrations with the key go, none is established.
        assert_eq!(
            go(&r, &a, out_sa::RELEASE, Some(PrType::WriteExclusive), 1, 0),
            Status::Good
        );
        assert_eq!(
            go(&r, &a, out_sa::PREEMPT, Some(PrType::WriteExclusive), 1, 2),
            Status::Good
        );
        assert_eq!(keys(&r), [1]);
        assert_eq!(held(&r), None);
        // ...and a zero key names nobody.
        assert_eq!(
            go(&r, &a, out_sa::PREEMPT, Some(PrType::WriteExclusive), 1, 0),
            Status::ReservationConflict
        );
    }

    #[test]
    fn preempt_all_registrants_with_key_zero_or_a_key() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        register(&r, &a, 1);
        register(&r, &b, 2);
        register(&r, &c, 3);
        assert_eq!(
            reserve(&r, &a, 1, PrType::ExclusiveAccessAllRegistrants),
            Status::Good
        );
        // A key: only those registrations go; the reservation stays, all registrants'.
        let o = run(&r, &b, out_sa::PREEMPT, 8, &basic(2, 3, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(keys(&r), [1, 2]);
        assert_eq!(held(&r), Some((0, 8)));
        assert_eq!(o.unit_attentions_for(&c), [sense::REGISTRATIONS_PREEMPTED]);
        register(&r, &c, 3);
        // Zero: every other registration goes, and the preempting nexus holds the type given.
        let o = run(&r, &b, out_sa::PREEMPT, 1, &basic(2, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(keys(&r), [2]);
        assert_eq!(held(&r), Some((2, 1)));
        assert_eq!(o.unit_attentions_for(&a), [sense::REGISTRATIONS_PREEMPTED]);
        assert_eq!(o.unit_attentions_for(&c), [sense::REGISTRATIONS_PREEMPTED]);
        assert_eq!(rw(&r, &b), (Allowed, Allowed));
        assert_eq!(rw(&r, &a), (Allowed, Conflict));
    }

    #[test]
    fn preempt_and_abort_names_the_nexuses_to_abort() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        let a_other_port = nx(A, 2);
        register(&r, &a, 1);
        // A's second nexus shares its key.
        register(&r, &a_other_port, 1);
        register(&r, &b, 2);
        register(&r, &c, 3);
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        let o = run(&r, &b, out_sa::PREEMPT_AND_ABORT, 1, &basic(2, 1, 0));
        assert_eq!(o.status, Status::Good);
        assert!(o.aborts(&a) && o.aborts(&a_other_port));
        assert!(!o.aborts(&b) && !o.aborts(&c));
        assert_eq!(o.abort.len(), 2);
        assert_eq!(held(&r), Some((2, 1)));
        assert_eq!(keys(&r), [2, 3]);
        // The sender's own key: its other tasks are aborted, its registration stays.
        let o = run(&r, &b, out_sa::PREEMPT_AND_ABORT, 1, &basic(2, 2, 0));
        assert_eq!(o.status, Status::Good);
        assert!(o.aborts(&b) && !o.aborts(&c));
        assert_eq!(keys(&r), [2, 3]);
        // All registrants and a zero key: every other registrant.
        assert_eq!(
            go(&r, &b, out_sa::RELEASE, Some(PrType::WriteExclusive), 2, 0),
            Status::Good
        );
        assert_eq!(
            reserve(&r, &b, 2, PrType::WriteExclusiveAllRegistrants),
            Status::Good
        );
        let o = run(&r, &c, out_sa::PREEMPT_AND_ABORT, 3, &basic(3, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert!(o.aborts(&b) && !o.aborts(&c));
        // A failed one aborts nothing.
        let o = run(&r, &c, out_sa::PREEMPT_AND_ABORT, 3, &basic(3, 99, 0));
        assert_eq!(o.status, Status::ReservationConflict);
        assert!(o.abort.is_empty() && o.unit_attentions.is_empty());
    }

    #[test]
    fn clear_removes_everything_and_tells_the_registrants() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        assert_eq!(
            go(&r, &a, out_sa::CLEAR, None, 0, 0),
            Status::ReservationConflict
        );
        register(&r, &a, 1);
        register(&r, &b, 2);
        assert_eq!(reserve(&r, &a, 1, PrType::ExclusiveAccess), Status::Good);
        assert_eq!(
            go(&r, &b, out_sa::CLEAR, None, 1, 0),
            Status::ReservationConflict
        );
        let o = run(&r, &b, out_sa::CLEAR, 0, &basic(2, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(keys(&r), Vec::<u64>::new());
        assert_eq!(held(&r), None);
        assert_eq!(o.unit_attentions_for(&a), [sense::RESERVATIONS_PREEMPTED]);
        assert_eq!(o.unit_attentions_for(&b), []);
        assert_eq!(o.unit_attentions_for(&c), []);
        assert_eq!(rw(&r, &c), (Allowed, Allowed));
    }

    fn move_params(rk: u64, sark: u64, flags: u8, rtpi: u16, tid: &TransportId) -> Vec<u8> {
        let t = tid.to_bytes();
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[17] = flags;
        p[18..20].copy_from_slice(&rtpi.to_be_bytes());
        p[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
        p.extend_from_slice(&t);
        p
    }

    #[test]
    fn register_and_move() {
        let r = Reservations::new();
        let (a, b1, b2) = (nx(A, 1), nx(B, 1), nx(B, 2));
        let to_b2 = |rk, sark, flags| move_params(rk, sark, flags, 2, &b2.transport_id());
        register(&r, &a, 1);
        // No reservation to move.
        let s = run(&r, &a, out_sa::REGISTER_AND_MOVE, 0, &to_b2(1, 5, 0)).status;
        assert_eq!(sense_of(s), (sense::ILLEGAL_REQUEST, 0x24, 0));
        assert_eq!(reserve(&r, &a, 1, PrType::ExclusiveAccess), Status::Good);
        // Errors first: the wrong key, a zero key, the sender itself, a bad port, the lengths.
        let m = |p: &[u8]| run(&r, &a, out_sa::REGISTER_AND_MOVE, 0, p).status;
        assert_eq!(m(&to_b2(2, 5, 0)), Status::ReservationConflict);
        assert_eq!(
            m(&to_b2(1, 0, 0)),
            Status::CheckCondition(Sense::invalid_param_field(8))
        );
        let to_self = move_params(1, 5, 0, 2, &a.transport_id());
        assert_eq!(
            m(&to_self),
            Status::CheckCondition(Sense::invalid_param_field(24))
        );
        let port0 = move_params(1, 5, 0, 0, &b2.transport_id());
        assert_eq!(
            m(&port0),
            Status::CheckCondition(Sense::invalid_param_field(18))
        );
        let full = to_b2(1, 5, 0);
        assert_eq!(
            m(&full[..full.len() - 4]),
            length_error(),
            "TransportID cut short"
        );
        assert_eq!(m(&full[..20]), length_error(), "shorter than the header");
        let mut long = full.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(
            m(&long),
            Status::CheckCondition(Sense::invalid_param_field(20))
        );
        assert_eq!(
            m(&move_params(1, 5, APTPL, 2, &b2.transport_id())),
            Status::CheckCondition(Sense::invalid_param_bit(17, 0)),
            "APTPL without a file"
        );
        // A registrant that does not hold it.
        register(&r, &b1, 7);
        let s = run(
            &r,
            &b1,
            out_sa::REGISTER_AND_MOVE,
            0,
            &move_params(7, 5, 0, 1, &a.transport_id()),
        )
        .status;
        assert_eq!(s, Status::ReservationConflict);
        assert_eq!(keys(&r), [1, 7]);
        // The move: B through port 2 registers with key 5 and holds the reservation, of the
        // same type whatever the CDB says.
        let o = run(&r, &a, 0x07, 0x01, &full);
        assert_eq!(o.status, Status::Good);
        assert_eq!(held(&r), Some((5, 3)));
        assert_eq!(keys(&r), [1, 7, 5]);
        assert_eq!(rw(&r, &b2), (Allowed, Allowed));
        assert_eq!(rw(&r, &a), (Conflict, Conflict), "A is only registered now");
        assert_eq!(
            rw(&r, &b1),
            (Conflict, Conflict),
            "B through port 1 does not hold it"
        );
        // Moving back with UNREG: the sender's registration goes; an existing registration
        // of the destination takes the new key.
        let back = move_params(5, 9, 0x02, 1, &a.transport_id());
        let o = run(&r, &b2, out_sa::REGISTER_AND_MOVE, 0, &back);
        assert_eq!(o.status, Status::Good);
        assert_eq!(keys(&r), [9, 7]);
        assert_eq!(held(&r), Some((9, 3)));
        assert_eq!(rw(&r, &a), (Allowed, Allowed));
        // Never an all registrants reservation.
        assert_eq!(
            go(&r, &a, out_sa::RELEASE, Some(PrType::ExclusiveAccess), 9, 0),
            Status::Good
        );
        assert_eq!(
            reserve(&r, &a, 9, PrType::WriteExclusiveAllRegistrants),
            Status::Good
        );
        let s = run(&r, &a, out_sa::REGISTER_AND_MOVE, 0, &to_b2(9, 5, 0)).status;
        assert_eq!(s, Status::ReservationConflict);
    }

    fn spec_i_pt_params(rk: u64, sark: u64, flags: u8, tids: &[Vec<u8>]) -> Vec<u8> {
        let mut p = basic(rk, sark, flags | SPEC_I_PT);
        let all: Vec<u8> = tids.concat();
        p.extend_from_slice(&(all.len() as u32).to_be_bytes());
        p.extend_from_slice(&all);
        p
    }

    #[test]
    fn spec_i_pt_registers_the_transport_ids() {
        let r = Reservations::new();
        let a = nx(A, 1);
        let b = Nexus::new(B, isid(7), 1);
        let b_tid = b.transport_id().to_bytes();
        let c_any = TransportId::initiator_device(C_).unwrap().to_bytes();
        let p = spec_i_pt_params(0, 0x42, 0, &[b_tid.clone(), c_any.clone()]);
        let o = run(&r, &a, out_sa::REGISTER, 0, &p);
        assert_eq!(o.status, Status::Good);
        assert_eq!(keys(&r), [0x42, 0x42, 0x42]);
        assert_eq!(generation(&r), 1);
        // Each through the sender's target port: B with that ISID, C with any ISID.
        assert_eq!(
            reserve(&r, &b, 0x42, PrType::ExclusiveAccessRegistrantsOnly),
            Status::Good
        );
        assert_eq!(rw(&r, &Nexus::new(C_, isid(9), 1)), (Allowed, Allowed));
        assert_eq!(rw(&r, &Nexus::new(C_, isid(9), 2)), (Conflict, Conflict));
        assert_eq!(rw(&r, &Nexus::new(B, isid(8), 1)), (Conflict, Conflict));
        let descs = full_status(&prin(&r, in_sa::READ_FULL_STATUS, 0xffff));
        let tids: Vec<TransportId> = descs.iter().map(|d| d.tid.clone()).collect();
        assert_eq!(
            tids,
            [
                a.transport_id(),
                b.transport_id(),
                TransportId::initiator_device(C_).unwrap()
            ]
        );
        assert!(descs.iter().all(|d| d.rtpi == 1 && !d.all_tg_pt));
        assert_eq!(descs.iter().filter(|d| d.holder).count(), 1);
    }

    #[test]
    fn spec_i_pt_errors() {
        let r = Reservations::new();
        let (a, b) = (nx(A, 1), nx(B, 1));
        let b_tid = b.transport_id().to_bytes();
        // Only with REGISTER.
        let p = spec_i_pt_params(0, 1, 0, std::slice::from_ref(&b_tid));
        let s = run(&r, &a, out_sa::REGISTER_AND_IGNORE_EXISTING_KEY, 0, &p).status;
        assert_eq!(s, Status::CheckCondition(Sense::invalid_param_bit(20, 3)));
        // Lengths: the TransportIDs cut short, and no room for their length.
        let s = run(&r, &a, out_sa::REGISTER, 0, &p[..p.len() - 1]).status;
        assert_eq!(s, length_error());
        let mut short = basic(0, 1, SPEC_I_PT);
        short.extend_from_slice(&[0, 0]);
        assert_eq!(
            run(&r, &a, out_sa::REGISTER, 0, &short).status,
            length_error()
        );
        let mut extra = p.clone();
        extra.extend_from_slice(&[0; 4]);
        assert_eq!(
            run(&r, &a, out_sa::REGISTER, 0, &extra).status,
            Status::CheckCondition(Sense::invalid_param_field(24))
        );
        // A TransportID of another protocol (Fibre Channel, 0h), at offset 28.
        let mut fc = b_tid.clone();
        fc[0] = 0x00;
        let s = run(
            &r,
            &a,
            out_sa::REGISTER,
            0,
            &spec_i_pt_params(0, 1, 0, &[fc]),
        )
        .status;
        assert_eq!(s, Status::CheckCondition(Sense::invalid_param_field(28)));
        // A broken second TransportID points at it.
        let mut bad = nx(C_, 1).transport_id().to_bytes();
        let at = bad.len() - 1;
        bad[at] = b'x'; // no NUL
        let p2 = spec_i_pt_params(0, 1, 0, &[b_tid.clone(), bad]);
        let s = run(&r, &a, out_sa::REGISTER, 0, &p2).status;
        assert_eq!(
            s,
            Status::CheckCondition(Sense::invalid_param_field(28 + b_tid.len() as u16))
        );
        assert_eq!(
            keys(&r),
            Vec::<u64>::new(),
            "nothing registered by any of them"
        );
        // A TransportID of a nexus registered already: all or nothing.
        register(&r, &b, 9);
        let c_tid = nx(C_, 1).transport_id().to_bytes();
        let s = run(
            &r,
            &a,
            out_sa::REGISTER,
            0,
            &spec_i_pt_params(0, 1, 0, &[c_tid.clone(), b_tid.clone()]),
        )
        .status;
        assert_eq!(
            s,
            Status::CheckCondition(Sense::invalid_param_field(28 + c_tid.len() as u16))
        );
        assert_eq!(keys(&r), [9]);
        // From a registered nexus.
        let s = run(
            &r,
            &b,
            out_sa::REGISTER,
            0,
            &spec_i_pt_params(9, 1, 0, &[c_tid]),
        )
        .status;
        assert_eq!(s, Status::CheckCondition(Sense::invalid_param_bit(20, 3)));
        // The sender's own TransportID among them is no error.
        let s = run(
            &r,
            &a,
            out_sa::REGISTER,
            0,
            &spec_i_pt_params(0, 3, 0, &[a.transport_id().to_bytes()]),
        )
        .status;
        assert_eq!(s, Status::Good);
        assert_eq!(keys(&r), [9, 3]);
    }

    #[test]
    fn all_tg_pt_registers_every_target_port() {
        let r = Reservations::new();
        let (a1, a2, a3) = (nx(A, 1), nx(A, 2), nx(A, 3));
        let o = run(&r, &a1, out_sa::REGISTER, 0, &basic(0, 5, ALL_TG_PT));
        assert_eq!(o.status, Status::Good);
        assert_eq!(keys(&r), [5], "one registration");
        // Through another port it is registered: its key is the one.
        assert_eq!(
            go(&r, &a2, out_sa::REGISTER, None, 0, 6),
            Status::ReservationConflict
        );
        // The holder is the nexus that reserved: through port 3 A is only a registrant.
        assert_eq!(reserve(&r, &a3, 5, PrType::WriteExclusive), Status::Good);
        assert_eq!(rw(&r, &a3), (Allowed, Allowed));
        assert_eq!(rw(&r, &a1), (Allowed, Conflict));
        let d = full_status(&prin(&r, in_sa::READ_FULL_STATUS, 0xffff));
        assert_eq!(d.len(), 1);
        assert!(d[0].all_tg_pt && d[0].holder);
        assert_eq!(d[0].rtpi, 3);
        // Unregistering through any port removes it.
        assert_eq!(go(&r, &a2, out_sa::REGISTER, None, 5, 0), Status::Good);
        assert_eq!(keys(&r), Vec::<u64>::new());
        assert_eq!(held(&r), None);
        // A port-specific registration beside it (made by B's SPEC_I_PT) is the more
        // specific one: through port 1, A's key is B's.
        assert_eq!(
            run(&r, &a1, out_sa::REGISTER, 0, &basic(0, 5, ALL_TG_PT)).status,
            Status::Good
        );
        let p = spec_i_pt_params(0, 8, 0, &[a1.transport_id().to_bytes()]);
        assert_eq!(
            run(&r, &nx(B, 1), out_sa::REGISTER, 0, &p).status,
            Status::Good
        );
        assert_eq!(keys(&r), [5, 8, 8]);
        assert_eq!(
            reserve(&r, &a1, 5, PrType::WriteExclusive),
            Status::ReservationConflict
        );
        assert_eq!(reserve(&r, &a1, 8, PrType::WriteExclusive), Status::Good);
        assert_eq!(rw(&r, &a1), (Allowed, Allowed));
        assert_eq!(rw(&r, &a2), (Allowed, Conflict));
        // Unregistering A through port 2 leaves port 1's registration, and the reservation.
        assert_eq!(go(&r, &a2, out_sa::REGISTER, None, 5, 0), Status::Good);
        assert_eq!(keys(&r), [8, 8]);
        assert_eq!(held(&r), Some((8, 1)));
    }

    #[test]
    fn parameter_list_lengths() {
        let r = Reservations::new();
        let a = nx(A, 1);
        let mut long = basic(0, 1, 0);
        long.extend_from_slice(&[0; 4]);
        assert_eq!(
            run(&r, &a, out_sa::REGISTER, 0, &long).status,
            length_error()
        );
        assert_eq!(
            run(&r, &a, out_sa::REGISTER, 0, &basic(0, 1, 0)[..20]).status,
            length_error()
        );
        assert_eq!(run(&r, &a, out_sa::CLEAR, 0, &[]).status, length_error());
        // The CDB says more than the Data-Out holds.
        let p = basic(0, 1, 0);
        let s = r
            .persistent_reserve_out(&a, &out_sa_cdb_len(out_sa::REGISTER, 48), &p)
            .status;
        assert_eq!(s, length_error());
        assert_eq!(sense_of(s), (sense::ILLEGAL_REQUEST, 0x1a, 0));
        // A Data-Out longer than the CDB says: only the list counts.
        let mut more = p.clone();
        more.extend_from_slice(&[0xff; 8]);
        let s = r
            .persistent_reserve_out(&a, &out_sa_cdb_len(out_sa::REGISTER, 24), &more)
            .status;
        assert_eq!(s, Status::Good);
        assert_eq!(keys(&r), [1]);
    }

    fn out_sa_cdb_len(sa: u8, len: u32) -> [u8; 10] {
        out_cdb(sa, 0, len)
    }

    #[test]
    fn aptpl_needs_a_file() {
        let r = Reservations::new();
        let a = nx(A, 1);
        let s = run(&r, &a, out_sa::REGISTER, 0, &basic(0, 1, APTPL)).status;
        assert_eq!(s, Status::CheckCondition(Sense::invalid_param_bit(20, 0)));
        let caps = prin(&r, in_sa::REPORT_CAPABILITIES, 0xffff);
        assert_eq!(caps, [0, 8, 0x1c, 0x90, 0xea, 0x01, 0, 0], "PTPL_C=0");
        assert!(r
            .restore(&Snapshot {
                aptpl: true,
                ..Snapshot::default()
            })
            .is_err());
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    #[test]
    fn aptpl_round_trip_through_a_file() {
        let dir = tmp();
        let path = dir.path().join("pr").join("disk0");
        let r = Reservations::new();
        r.set_file(Some(&path)).unwrap();
        assert_eq!(r.file().as_deref(), Some(path.as_path()));
        let (a, b, c) = (nx(A, 1), nx(B, 2), nx(C_, 1));
        let apply = |o: OutOutcome| {
            assert_eq!(o.status, Status::Good);
            if let Some(p) = &o.persist {
                r.persist(p).unwrap();
            }
            o
        };
        // Without APTPL nothing is written.
        let o = apply(run(&r, &a, out_sa::REGISTER, 0, &basic(0, 1, 0)));
        assert!(o.persist.is_none());
        assert!(!path.exists());
        let o = apply(run(
            &r,
            &b,
            out_sa::REGISTER,
            0,
            &basic(0, 2, APTPL | ALL_TG_PT),
        ));
        assert!(o.persist.as_ref().is_some_and(|p| p.state.is_some()));
        assert!(path.exists());
        apply(run(&r, &a, out_sa::RESERVE, 5, &basic(1, 0, 0)));
        let caps = prin(&r, in_sa::REPORT_CAPABILITIES, 0xffff);
        assert_eq!((caps[2] & 0x01, caps[3] & 0x01), (1, 1), "PTPL_C, PTPL_A");
        let before = r.snapshot();
        assert_eq!(before.registrations.len(), 2);
        // "Power loss": a new device restores from the file.
        let r2 = Reservations::new();
        r2.set_file(Some(&path)).unwrap();
        assert_eq!(r2.snapshot(), before);
        assert_eq!(keys(&r2), [1, 2]);
        assert_eq!(held(&r2), Some((1, 5)));
        assert_eq!(generation(&r2), generation(&r));
        assert_eq!(rw(&r2, &a), (Allowed, Allowed), "the holder is back");
        assert_eq!(rw(&r2, &nx(B, 9)), (Allowed, Allowed), "ALL_TG_PT is back");
        assert_eq!(rw(&r2, &c), (Allowed, Conflict));
        // The file cannot change under registrations.
        assert!(matches!(r2.set_file(None), Err(PrFileError::InUse)));
        // APTPL cleared: the file goes.
        let o = apply(run(&r, &b, out_sa::REGISTER, 0, &basic(2, 3, 0)));
        assert_eq!(o.persist.as_ref().map(|p| p.state.is_none()), Some(true));
        assert!(!path.exists());
        let r3 = Reservations::new();
        r3.set_file(Some(&path)).unwrap();
        assert_eq!(keys(&r3), Vec::<u64>::new());
        let caps = prin(&r3, in_sa::REPORT_CAPABILITIES, 0xffff);
        assert_eq!((caps[2] & 0x01, caps[3] & 0x01), (1, 0));
    }

    #[test]
    fn persist_skips_older_writes() {
        let dir = tmp();
        let path = dir.path().join("d");
        let r = Reservations::new();
        r.set_file(Some(&path)).unwrap();
        let a = nx(A, 1);
        let first = run(&r, &a, out_sa::REGISTER, 0, &basic(0, 1, APTPL))
            .persist
            .unwrap();
        let second = run(&r, &a, out_sa::REGISTER, 0, &basic(1, 2, APTPL))
            .persist
            .unwrap();
        assert!(second.seq > first.seq);
        r.persist(&second).unwrap();
        r.persist(&first).unwrap();
        let s = load(&path).unwrap().unwrap();
        assert_eq!(s.registrations[0].1, 2, "the newer state stays");
    }

    /// `text` with its end line recomputed, so that only the content is wrong.
    fn resum(text: &str) -> String {
        let body = &text[..text.trim_end().rfind('\n').unwrap() + 1];
        format!("{body}end {:016x}\n", fnv1a(body))
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tmp();
        let path = dir.path().join("d");
        let good = {
            let r = Reservations::new();
            r.set_file(Some(&path)).unwrap();
            let a = nx(A, 1);
            let o = run(&r, &a, out_sa::REGISTER, 0, &basic(0, 1, APTPL));
            r.persist(o.persist.as_ref().unwrap()).unwrap();
            r.persist(
                run(&r, &a, out_sa::RESERVE, 1, &basic(1, 0, 0))
                    .persist
                    .as_ref()
                    .unwrap(),
            )
            .unwrap();
            fs::read_to_string(&path).unwrap()
        };
        assert!(load(&path).unwrap().is_some());
        let bad = |text: &str, says: &str| {
            fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            // A device given such a file keeps its state and refuses it.
            let r = Reservations::new();
            assert!(r.set_file(Some(&path)).is_err());
            assert_eq!(r.file(), None);
        };
        bad("", "end line");
        bad("garbage", "end line");
        bad(&good.replace("generation", "generatiom"), "checksum");
        bad(&good[..good.len() - 10], "checksum");
        bad(&good[..good.rfind("end").unwrap()], "end CHECKSUM");
        bad(&resum(&good.replace(" 1\n", " 2\n")), "version 2");
        bad(
            &resum(&good.replace("holder 0", "holder 3")),
            "not a registration",
        );
        bad(
            &resum(&good.replace("aptpl 1", "aptpl 2")),
            "unexpected line",
        );
        bad(
            &resum(&good.replace("reservation 1", "reservation 4")),
            "type",
        );
        bad(&resum(&good.replace("0x0000000000000001", "0x0")), "key");
        let reg_line = good
            .lines()
            .find(|l| l.starts_with("registration"))
            .unwrap();
        bad(
            &resum(&good.replace(reg_line, &format!("{reg_line}\n{reg_line}"))),
            "twice",
        );
        fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("UTF-8"));
        // What it was is still good.
        fs::write(&path, &good).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().registrations.len(), 1);
        assert!(Reservations::new()
            .set_file(Some(Path::new("relative")))
            .is_err());
    }

    #[test]
    fn text_round_trip_with_odd_names() {
        let s = Snapshot {
            generation: 0xffff_fffe,
            aptpl: true,
            registrations: vec![
                (
                    Registrant {
                        transport_id: TransportId::initiator_port("iqn.x:a b%c", isid(3)).unwrap(),
                        rel_tgt_id: Some(65535),
                    },
                    u64::MAX,
                ),
                (
                    Registrant {
                        transport_id: TransportId::initiator_device("iqn.x:ünï").unwrap(),
                        rel_tgt_id: None,
                    },
                    1,
                ),
            ],
            reservation: Some(SnapshotReservation {
                ty: PrType::WriteExclusiveAllRegistrants,
                holder: None,
            }),
        };
        let t = s.to_text();
        assert!(t.contains("iqn.x:a%20b%25c"), "{t}");
        assert_eq!(Snapshot::from_text(&t).unwrap(), s);
        let r = Reservations::new();
        assert!(r
            .restore(&Snapshot {
                aptpl: false,
                ..s.clone()
            })
            .unwrap()
            .is_none());
        assert_eq!(keys(&r), [u64::MAX, 1]);
        assert!(matches!(r.restore(&s), Err(PrFileError::InUse)));
    }

    #[test]
    fn state_text_keeps_names_that_are_not_iscsi_names() {
        // A login takes an InitiatorName longer than an iSCSI name may be, or with a
        // control character: the registrations of such a nexus survive a restart too.
        let long = format!("iqn.2024-01.test:{}", "n".repeat(300));
        let r = Reservations::new();
        for name in [long.as_str(), "iqn.x:tab\there"] {
            register(&r, &nx(name, 1), 7);
        }
        let s = r.snapshot();
        assert_eq!(Snapshot::from_text(&s.to_text()), Ok(s.clone()));
        // Bounds remain: empty, NUL or longer than any login.
        for name in ["", "%00", &"n".repeat(MAX_LOGIN_NAME + 1)] {
            let t = resum(&s.to_text().replacen(&long, name, 1));
            let e = Snapshot::from_text(&t).unwrap_err();
            assert_eq!(e.reason, "bad iSCSI name", "{name:.20}");
        }
    }

    #[test]
    fn persistent_reserve_in_is_cut_to_the_allocation_length() {
        let r = Reservations::new();
        for (i, n) in [A, B, C_].iter().enumerate() {
            register(&r, &nx(n, 1), i as u64 + 1);
        }
        let d = prin(&r, in_sa::READ_KEYS, 12);
        assert_eq!(d.len(), 12);
        assert_eq!(be32(&d[4..]), 24, "ADDITIONAL LENGTH tells the whole list");
        assert_eq!(prin(&r, in_sa::READ_KEYS, 0), Vec::<u8>::new());
        let full = prin(&r, in_sa::READ_FULL_STATUS, 0xffff);
        let cut = prin(&r, in_sa::READ_FULL_STATUS, 30);
        assert_eq!(cut[..], full[..30]);
        assert_eq!(be32(&cut[4..]) as usize, full.len() - 8);
        assert_eq!(prin(&r, in_sa::REPORT_CAPABILITIES, 3), [0, 8, 0x1c]);
        let d = prin(&r, in_sa::READ_RESERVATION, 0xffff);
        assert_eq!(d, [0, 0, 0, 3, 0, 0, 0, 0], "generation 3, no reservation");
        assert_eq!(
            reserve(&r, &nx(A, 1), 1, PrType::WriteExclusive),
            Status::Good
        );
        assert_eq!(prin(&r, in_sa::READ_RESERVATION, 0xffff).len(), 24);
        assert_eq!(prin(&r, in_sa::READ_RESERVATION, 10).len(), 10);
        let mut c = [0u8; 10];
        c[0] = opcode::PERSISTENT_RESERVE_IN;
        c[1] = 0x04;
        c[8] = 0xff;
        assert_eq!(
            r.persistent_reserve_in(&c),
            Err(Status::CheckCondition(Sense::invalid_cdb_field(1, Some(4))))
        );
    }

    #[derive(Debug)]
    struct FullStatus {
        key: u64,
        all_tg_pt: bool,
        holder: bool,
        ty: u8,
        rtpi: u16,
        tid: TransportId,
    }

    fn full_status(d: &[u8]) -> Vec<FullStatus> {
        assert_eq!(be32(&d[4..]) as usize, d.len() - 8);
        let mut v = Vec::new();
        let mut off = 8;
        while off < d.len() {
            let x = &d[off..];
            let len = be32(&x[20..]) as usize;
            let (tid, tlen) = TransportId::parse(&x[24..24 + len]).unwrap();
            assert_eq!(tlen, len);
            assert_eq!(len % 4, 0);
            v.push(FullStatus {
                key: u64::from_be_bytes(x[..8].try_into().unwrap()),
                all_tg_pt: x[12] & 0x02 != 0,
                holder: x[12] & 0x01 != 0,
                ty: x[13],
                rtpi: u16::from_be_bytes([x[18], x[19]]),
                tid,
            });
            off += 24 + len;
        }
        v
    }

    #[test]
    fn read_full_status_descriptors() {
        let r = Reservations::new();
        let (a, b) = (nx(A, 1), Nexus::new(B, isid(0xab), 4));
        register(&r, &a, 0x11);
        register(&r, &b, 0x22);
        assert_eq!(reserve(&r, &b, 0x22, PrType::ExclusiveAccess), Status::Good);
        let d = full_status(&prin(&r, in_sa::READ_FULL_STATUS, 0xffff));
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].key, d[0].holder, d[0].ty, d[0].rtpi),
            (0x11, false, 0, 1)
        );
        assert_eq!(
            (d[1].key, d[1].holder, d[1].ty, d[1].rtpi),
            (0x22, true, 3, 4)
        );
        assert_eq!(d[1].tid, b.transport_id());
        assert_eq!(
            d[1].tid.to_string(),
            "iqn.2024-01.test:b,i,0x40000137 00ab".replace(' ', "")
        );
    }

    #[test]
    fn transport_ids_parse_and_emit() {
        let port = TransportId::initiator_port("IQN.1994-05.com.Example:x", isid(0x2a)).unwrap();
        assert_eq!(
            port.name(),
            "iqn.1994-05.com.example:x",
            "names fold to lower case"
        );
        let b = port.to_bytes();
        assert_eq!(b[0], 0x45, "format 01b, iSCSI");
        assert_eq!(b.len() % 4, 0);
        assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), b.len() - 4);
        assert_eq!(TransportId::parse(&b).unwrap(), (port.clone(), b.len()));
        let dev = TransportId::initiator_device("iqn.x:y").unwrap();
        let d = dev.to_bytes();
        assert_eq!(
            (d[0], d.len()),
            (0x05, 24),
            "format 00b, at least 20 bytes after the header"
        );
        assert_eq!(TransportId::parse(&d).unwrap(), (dev, 24));
        // Trailing bytes after it are another TransportID's.
        let mut two = d.clone();
        two.extend_from_slice(&b);
        assert_eq!(TransportId::parse(&two).unwrap().1, 24);
        // As initiators write them: upper-case separator and hex digits, minimal padding.
        let mut w = vec![0x45, 0, 0, 0];
        w.extend_from_slice(b"iqn.x:z,I,0X40000137002A\0\0\0\0");
        w[3] = (w.len() - 4) as u8;
        let (t, _) = TransportId::parse(&w).unwrap();
        assert_eq!((t.name(), t.isid()), ("iqn.x:z", Some(isid(0x2a))));
        let err = |buf: &[u8]| TransportId::parse(buf).unwrap_err();
        assert_eq!(err(&b[..3]), TransportIdError::Truncated);
        assert_eq!(err(&b[..b.len() - 1]), TransportIdError::Truncated);
        let mut fc = b.clone();
        fc[0] = 0x40;
        assert_eq!(err(&fc), TransportIdError::Protocol(0));
        let mut f2 = b.clone();
        f2[0] = 0x85;
        assert_eq!(err(&f2), TransportIdError::Format(2));
        let no_nul = [0x05, 0, 0, 4, b'a', b'b', b'c', b'd'];
        assert_eq!(err(&no_nul), TransportIdError::Unterminated);
        let empty = [0x05, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(err(&empty), TransportIdError::Name);
        for isid_text in ["iqn.x,i,0x12345", "iqn.x,i,0x40000137002g", "iqn.x"] {
            let mut v = vec![0x45, 0, 0, 0];
            v.extend_from_slice(isid_text.as_bytes());
            v.resize(v.len() + 4 - v.len() % 4, 0);
            v[3] = (v.len() - 4) as u8;
            assert_eq!(err(&v), TransportIdError::Isid, "{isid_text}");
        }
        let long = "i".repeat(224);
        assert_eq!(
            TransportId::initiator_device(&long),
            Err(TransportIdError::Name)
        );
        assert!(TransportId::initiator_device("iqn.x\ty").is_err());
    }

    /// A nexus's cached answers follow every change, on every device, and a nexus checking
    /// two devices keeps their answers apart.
    #[test]
    fn cached_access_follows_every_change() {
        let (r1, r2) = (Reservations::new(), Reservations::new());
        let (a, b) = (nx(A, 1), nx(B, 1));
        for r in [&r1, &r2] {
            register(r, &a, 1);
        }
        assert_eq!(reserve(&r1, &a, 1, PrType::ExclusiveAccess), Status::Good);
        assert_eq!(reserve(&r2, &a, 1, PrType::WriteExclusive), Status::Good);
        for _ in 0..3 {
            assert_eq!(rw(&r1, &b), (Conflict, Conflict));
            assert_eq!(rw(&r2, &b), (Allowed, Conflict));
            assert_eq!(rw(&r1, &a), (Allowed, Allowed));
        }
        // B registers and preempts A on the first device: both see it at once.
        register(&r1, &b, 2);
        assert_eq!(
            go(
                &r1,
                &b,
                out_sa::PREEMPT,
                Some(PrType::ExclusiveAccess),
                2,
                1
            ),
            Status::Good
        );
        assert_eq!(rw(&r1, &b), (Allowed, Allowed));
        assert_eq!(rw(&r1, &a), (Conflict, Conflict));
        assert_eq!(
            rw(&r2, &b),
            (Allowed, Conflict),
            "the other device unchanged"
        );
        // A change that keeps the reservation (another registration) still takes effect:
        // an all registrants reservation opens to the new registrant.
        assert_eq!(
            go(&r2, &a, out_sa::RELEASE, Some(PrType::WriteExclusive), 1, 0),
            Status::Good
        );
        assert_eq!(
            reserve(&r2, &a, 1, PrType::WriteExclusiveAllRegistrants),
            Status::Good
        );
        assert_eq!(rw(&r2, &b), (Allowed, Conflict));
        register(&r2, &b, 3);
        assert_eq!(rw(&r2, &b), (Allowed, Allowed));
        // A clone of a nexus (SPC-2's holder) starts with nothing cached.
        let b2 = b.clone();
        assert_eq!(b2, b);
        assert_eq!(rw(&r1, &b2), (Allowed, Allowed));
    }

    #[test]
    fn spc2_reserve_and_release() {
        let r = Reservations::new();
        let (a, b) = (nx(A, 1), nx(B, 1));
        let reserve6 = [opcode::RESERVE_6, 0, 0, 0, 0, 0];
        let release6 = [opcode::RELEASE_6, 0, 0, 0, 0, 0];
        let reserve10 = [opcode::RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(r.reserve(&a, &reserve6), Status::Good);
        assert_eq!(r.reserve(&a, &reserve10), Status::Good, "the holder again");
        assert_eq!(r.reserve(&b, &reserve10), Status::ReservationConflict);
        assert_eq!(rw(&r, &a), (Allowed, Allowed));
        assert_eq!(rw(&r, &b), (Conflict, Conflict));
        assert_eq!(r.check(&b, C::TestUnitReady), Conflict);
        assert_eq!(r.check(&a, C::TestUnitReady), Allowed);
        assert_eq!(r.check(&b, C::Allowed), Allowed);
        assert_eq!(r.check(&b, C::ReserveRelease), Allowed);
        // Persistent reservation commands conflict, even from the holder.
        for n in [&a, &b] {
            assert_eq!(r.check(n, C::PersistentReserveIn), Conflict);
            assert_eq!(r.check(n, C::PersistentReserveOut), Conflict);
            assert_eq!(
                go(&r, n, out_sa::REGISTER, None, 0, 1),
                Status::ReservationConflict
            );
        }
        assert_eq!(
            r.persistent_reserve_in(&[opcode::PERSISTENT_RESERVE_IN, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
            Err(Status::ReservationConflict)
        );
        // Another's RELEASE: GOOD, still reserved.
        assert_eq!(r.release(&b, &release6), Status::Good);
        assert_eq!(rw(&r, &b), (Conflict, Conflict));
        assert_eq!(r.release(&a, &release6), Status::Good);
        assert_eq!(rw(&r, &b), (Allowed, Allowed));
        assert!(!r.reserved.load(Ordering::Relaxed));
        // Lost nexus and reset release it.
        assert_eq!(r.reserve(&b, &reserve6), Status::Good);
        r.nexus_lost(&a);
        assert_eq!(rw(&r, &a), (Conflict, Conflict), "not A's to lose");
        r.nexus_lost(&b);
        assert_eq!(rw(&r, &a), (Allowed, Allowed));
        assert_eq!(r.reserve(&b, &reserve6), Status::Good);
        r.reset();
        assert_eq!(rw(&r, &a), (Allowed, Allowed));
        // Third-party, long ID and extent reservations are not supported.
        let mut third = reserve10;
        third[1] = 0x10;
        assert_eq!(
            r.reserve(&a, &third),
            Status::CheckCondition(Sense::invalid_cdb_field(1, Some(4)))
        );
        let mut longid = reserve10;
        longid[1] = 0x02;
        assert_eq!(
            r.reserve(&a, &longid),
            Status::CheckCondition(Sense::invalid_cdb_field(1, Some(1)))
        );
        let extent = [opcode::RELEASE_6, 0x01, 0, 0, 0, 0];
        assert_eq!(
            r.release(&a, &extent),
            Status::CheckCondition(Sense::invalid_cdb_field(1, Some(0)))
        );
        assert_eq!(rw(&r, &b), (Allowed, Allowed));
    }

    /// SPC-4 §5.13.3: RESERVE and RELEASE beside registrations.
    #[test]
    fn spc2_reserve_beside_persistent_reservations() {
        let r = Reservations::new();
        let (a, b, c) = (nx(A, 1), nx(B, 1), nx(C_, 1));
        let reserve6 = [opcode::RESERVE_6, 0, 0, 0, 0, 0];
        let release10 = [opcode::RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        register(&r, &a, 1);
        // Registrations and no reservation: a conflict for everyone.
        assert_eq!(r.reserve(&a, &reserve6), Status::ReservationConflict);
        assert_eq!(r.reserve(&c, &reserve6), Status::ReservationConflict);
        assert_eq!(r.release(&c, &release10), Status::ReservationConflict);
        register(&r, &b, 2);
        assert_eq!(reserve(&r, &a, 1, PrType::WriteExclusive), Status::Good);
        // The holder: GOOD, and nothing changes.
        assert_eq!(r.reserve(&a, &reserve6), Status::Good);
        assert_eq!(r.release(&a, &release10), Status::Good);
        assert_eq!(held(&r), Some((1, 1)));
        assert_eq!(
            rw(&r, &c),
            (Allowed, Conflict),
            "no SPC-2 reservation was made"
        );
        // A registrant that does not hold a Write Exclusive reservation: conflict.
        assert_eq!(r.reserve(&b, &reserve6), Status::ReservationConflict);
        // A registrant of a registrants only reservation: GOOD, nothing changes.
        assert_eq!(
            go(&r, &a, out_sa::RELEASE, Some(PrType::WriteExclusive), 1, 0),
            Status::Good
        );
        assert_eq!(
            reserve(&r, &a, 1, PrType::WriteExclusiveRegistrantsOnly),
            Status::Good
        );
        assert_eq!(r.reserve(&b, &reserve6), Status::Good);
        assert_eq!(r.release(&b, &release10), Status::Good);
        assert_eq!(r.reserve(&c, &reserve6), Status::ReservationConflict);
        assert_eq!(held(&r), Some((1, 5)));
    }

    #[test]
    fn classes_that_depend_on_the_cdb() {
        assert_eq!(C::PreventAllow.for_cdb(&[0x1e, 0, 0, 0, 0, 0]), C::Allowed);
        assert_eq!(C::PreventAllow.for_cdb(&[0x1e, 0, 0, 0, 1, 0]), C::Write);
        assert_eq!(C::StartStop.for_cdb(&[0x1b, 0, 0, 0, 0x01, 0]), C::Allowed);
        assert_eq!(C::StartStop.for_cdb(&[0x1b, 0, 0, 0, 0x00, 0]), C::Write);
        assert_eq!(C::StartStop.for_cdb(&[0x1b, 0, 0, 0, 0x03, 0]), C::Allowed);
        assert_eq!(C::StartStop.for_cdb(&[0x1b, 0, 0, 0, 0x11, 0]), C::Write);
        assert_eq!(C::StartStop.for_cdb(&[0x1b]), C::Write);
    }

    #[test]
    fn unit_attentions_are_per_nexus_once() {
        let r = Reservations::new();
        // A registered on every port, B on port 1: CLEAR from A through port 1 tells A's
        // other ports and B, once each.
        let (a1, a2, b) = (nx(A, 1), nx(A, 2), nx(B, 1));
        assert_eq!(
            run(&r, &a1, out_sa::REGISTER, 0, &basic(0, 1, ALL_TG_PT)).status,
            Status::Good
        );
        register(&r, &b, 2);
        let o = run(&r, &a1, out_sa::CLEAR, 0, &basic(1, 0, 0));
        assert_eq!(o.status, Status::Good);
        assert_eq!(o.unit_attentions_for(&a1), []);
        assert_eq!(o.unit_attentions_for(&a2), [sense::RESERVATIONS_PREEMPTED]);
        assert_eq!(o.unit_attentions_for(&b), [sense::RESERVATIONS_PREEMPTED]);
    }

    #[test]
    fn hostile_cdbs_and_lists_do_not_panic() {
        let r = Reservations::new();
        let a = nx(A, 1);
        for cdb_len in 0..12 {
            for sa in 0..0x20u8 {
                let mut cdb = vec![0u8; cdb_len];
                if let Some(b) = cdb.get_mut(1) {
                    *b = sa;
                }
                if let Some(b) = cdb.get_mut(8) {
                    *b = 0xff;
                }
                for plen in [0usize, 1, 23, 24, 27, 28, 40, 300] {
                    let p: Vec<u8> = (0..plen).map(|i| (i * 37 + 11) as u8).collect();
                    let _ = r.persistent_reserve_out(&a, &cdb, &p);
                }
                let _ = r.persistent_reserve_in(&cdb);
                let _ = r.reserve(&a, &cdb);
                let _ = r.release(&a, &cdb);
            }
        }
        for len in 0..64u8 {
            let v: Vec<u8> = (0..len).map(|i| i.wrapping_mul(91)).collect();
            let _ = TransportId::parse(&v);
            let _ = Snapshot::from_text(&String::from_utf8_lossy(&v));
        }
    }
}

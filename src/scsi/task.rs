//! A SCSI command as the core sees it: its CDB, what [`crate::scsi::plan`] decoded of it
//! (the I/O range, the buffers) and its outcome (status, sense data, Data-In length).
#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::bdev::IoOp;
use crate::env::buf::MAX_TRANSFER;
use crate::env::DataBuf;
use crate::scsi::alua::AccessState;
use crate::scsi::command::Command;
use crate::scsi::sense::{self, Sense};
use crate::scsi::spc::xcopy::CopyScope;

/// SAM-5 status codes.
pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
/// The command conflicts with a reservation (SAM-5 §5.3.1): no sense data.
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;
pub const STATUS_TASK_ABORTED: u8 = 0x40;

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Data-In: from the target to the initiator.
    In,
    /// Data-Out: from the initiator to the target.
    Out,
}

/// What a command needs before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub dir: DataDir,
    /// Bytes the CDB transfers (or, for Data-In emulated commands, the allocation length).
    pub len: u32,
}

impl Plan {
    /// No data moves.
    pub const NONE: Plan = Plan {
        dir: DataDir::None,
        len: 0,
    };

    /// An emulated command's Data-In. Its allocation length only bounds what it returns
    /// (SPC-4 §4.2.5.6), and what it returns is far below the largest transfer: a buffer of
    /// that size does. Planning more (up to 4 GiB in a 32-bit field) would ask the transport
    /// for a buffer no pool can give, and the command would wait for it in vain.
    pub fn emulated_in(alloc: u32) -> Plan {
        Plan {
            dir: DataDir::In,
            len: alloc.min(MAX_TRANSFER as u32),
        }
    }
}

/// One SCSI command and its outcome.
pub struct ScsiTask {
    pub cdb: [u8; 16],
    pub cdb_len: usize,
    pub lun: u64,
    /// The I_T nexus (for unit attentions).
    pub nexus: u64,
    /// The transport's handle, echoed in completions.
    pub tag: u64,
    /// The LUN is mapped read-only.
    pub read_only: bool,
    /// How many bytes of Data-Out the transport will deliver, when it says (iSCSI's
    /// expected data transfer length of a command with the W bit).
    pub data_out_len: Option<u32>,
    /// For VPD page 0x83: the target's name and relative port.
    pub target_name: Option<Arc<str>>,
    pub rel_tgt_id: u16,
    /// The asymmetric access state of the target port for this logical unit (SPC-4
    /// §5.15), as the transport read it at admission: `plan` refuses what it excludes.
    pub access_state: AccessState,
    pub buf: Option<DataBuf>,
    /// A second buffer (VERIFY with BYTCHK=1 reads the medium into it to compare).
    pub(in crate::scsi) aux: Option<DataBuf>,
    pub status: u8,
    pub(in crate::scsi) sense: [u8; sense::MAX_LEN],
    pub(in crate::scsi) sense_len: usize,
    /// The format of the sense data `fail` builds: the device's D_SENSE when `plan` saw the
    /// command (SPC-4 §7.5.8), fixed before.
    pub(in crate::scsi) sense_format: sense::Format,
    /// Bytes of `buf` valid for Data-In.
    pub data_in_len: u32,
    /// The table's entry for the command, once `plan` has accepted it.
    pub(in crate::scsi) cmd: Option<&'static Command>,
    /// Decoded by `plan`: the I/O range in bytes.
    pub(in crate::scsi) io: Option<(IoOp, u64, u32)>,
    pub(in crate::scsi) verify_compare: bool,
    /// WRITE SAME without UNMAP: `io` is the whole range and `buf` holds the one block (or
    /// nothing with NDOB), repeated over the range at execution.
    pub(in crate::scsi) write_same: bool,
    /// For [`IoOp::Unmap`]: the byte ranges to deallocate.
    pub(in crate::scsi) ranges: Vec<(u64, u64)>,
    /// A read-modify-write command: `io` is its write; the port reads the range first.
    pub(in crate::scsi) rmw: Option<Rmw>,
    /// EXTENDED COPY: the logical units it may name and the I_T nexus it acts for, which the
    /// transport sets when [`crate::scsi::spc::xcopy::wants_scope`] says so.
    pub copy_scope: Option<Box<CopyScope>>,
}

/// The read-modify-write commands, which the port runs as one atomic read then write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::scsi) enum Rmw {
    /// COMPARE AND WRITE: the Data-Out holds the verify blocks then the write blocks; the
    /// write happens only if the medium matches the verify blocks.
    Compare,
    /// ORWRITE: the medium becomes the medium OR the Data-Out.
    Or,
}

impl ScsiTask {
    pub fn new(cdb: &[u8], lun: u64, nexus: u64) -> ScsiTask {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        ScsiTask {
            cdb: c,
            cdb_len: cdb.len(),
            lun,
            nexus,
            tag: 0,
            read_only: false,
            data_out_len: None,
            target_name: None,
            rel_tgt_id: 1,
            access_state: AccessState::ActiveOptimized,
            buf: None,
            aux: None,
            status: STATUS_GOOD,
            sense: [0; sense::MAX_LEN],
            sense_len: 0,
            sense_format: sense::Format::Fixed,
            data_in_len: 0,
            cmd: None,
            io: None,
            verify_compare: false,
            write_same: false,
            ranges: Vec::new(),
            rmw: None,
            copy_scope: None,
        }
    }

    pub fn opcode(&self) -> u8 {
        self.cdb[0]
    }

    pub fn sense(&self) -> &[u8] {
        &self.sense[..self.sense_len]
    }

    pub fn sense_len(&self) -> usize {
        self.sense_len
    }

    pub fn fail(&mut self, s: Sense) {
        self.status = STATUS_CHECK_CONDITION;
        (self.sense, self.sense_len) = s.encode(self.sense_format);
        self.data_in_len = 0;
    }

    /// Ends the task with RESERVATION CONFLICT, without sense data or Data-In.
    pub fn reservation_conflict(&mut self) {
        self.status = STATUS_RESERVATION_CONFLICT;
        self.sense_len = 0;
        self.data_in_len = 0;
    }

    pub fn set_check_condition(&mut self, key: u8, asc: u8, ascq: u8) {
        self.fail(Sense::new(key, (asc, ascq)));
    }

    /// Copies `data` into the Data-In buffer (as much as fits) and records its length.
    pub(in crate::scsi) fn reply(&mut self, data: &[u8]) {
        let n = match self.buf.as_mut() {
            Some(b) => {
                let n = data.len().min(b.len());
                b.write_at(0, &data[..n]);
                n
            }
            None => 0,
        };
        self.data_in_len = n as u32;
    }
}

impl ScsiTask {
    /// The transport carries only the first `len` bytes of a WRITE's Data-Out (iSCSI's
    /// expected data transfer length is below what the CDB asks for): write just those
    /// blocks and leave the rest of the range untouched. Returns false, changing nothing,
    /// when `len` does not end on a block boundary or the command is not a plain write.
    pub fn limit_write(&mut self, len: u32, block_size: u32) -> bool {
        match &mut self.io {
            Some((IoOp::Write { .. }, _, io_len))
                if !self.verify_compare
                    && !self.write_same
                    && self.rmw.is_none()
                    && block_size > 0
                    && len.is_multiple_of(block_size) =>
            {
                *io_len = (*io_len).min(len);
                true
            }
            _ => false,
        }
    }
}

//! The block commands (SBC-3): READ, WRITE, WRITE AND VERIFY and VERIFY ([`rw`]), UNMAP,
//! WRITE SAME and GET LBA STATUS ([`provisioning`]), COMPARE AND WRITE and ORWRITE
//! ([`rmw`]), and here READ CAPACITY, SYNCHRONIZE CACHE, PRE-FETCH and START STOP UNIT.
//! A CD-ROM serves the few that MMC-5 shares with SBC (READ(10), READ(12), VERIFY(10),
//! READ CAPACITY(10), ...).
#![forbid(unsafe_code)]

pub mod defect;
pub mod provisioning;
pub mod rmw;
pub mod rw;
pub mod sanitize;

use crate::bdev::IoOp;
use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::{be32, lba_and_blocks};
use crate::scsi::command::{Alua, Command, Decode, DeviceTypes, Reservation, Run};
use crate::scsi::device::Device;
use crate::scsi::sense::{self, Sense};
use crate::scsi::spc::{no_data, removable, CTL, FF};
use crate::scsi::task::{Plan, ScsiTask};
use rw::check_range;

/// Operation codes (SBC-3).
pub mod opcode {
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16) and its READ CAPACITY(16) and GET LBA STATUS service actions.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}
use opcode::*;

/// Block Limits VPD (SBC-3 §6.5.3) for thin provisioned devices: at most this many UNMAP
/// block descriptors in one UNMAP command...
pub(in crate::scsi) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// ...and at most this many bytes deallocated by one command (64 MiB).
const MAX_UNMAP_BYTES: u64 = 64 << 20;

/// MAXIMUM UNMAP LBA COUNT in blocks of `bs`.
pub(in crate::scsi) fn max_unmap_blocks(bs: u32) -> u32 {
    (MAX_UNMAP_BYTES / u64::from(bs)) as u32
}

/// MAXIMUM WRITE SAME LENGTH: a WRITE SAME is expanded into one buffer of its whole range.
pub(in crate::scsi) fn max_write_same_blocks(bs: u32) -> u32 {
    (MAX_TRANSFER as u32) / bs
}

/// MAXIMUM COMPARE AND WRITE LENGTH. Atomic test-and-set users (VMware ATS, cluster locks)
/// send one block; 128 bounds how long a range stays locked and keeps the Data-Out (twice
/// the range) within one transfer. It stays below the one-byte field's 255 so that a request
/// one block past the limit can be expressed, and is refused.
pub(in crate::scsi) fn max_compare_and_write_blocks(bs: u32) -> u32 {
    ((MAX_TRANSFER as u32) / (2 * bs)).min(128)
}

/// OPTIMAL UNMAP GRANULARITY: 4 KiB.
pub(in crate::scsi) fn unmap_granularity(bs: u32) -> u32 {
    (4096 / bs).max(1)
}

/// The usage data of the block commands' CDBs. Byte 1: RDPROTECT, WRPROTECT or VRPROTECT
/// (bits 7-5, read and refused when set), DPO and FUA.
#[rustfmt::skip]
mod usage {
    use super::opcode as op;
    use super::{CTL, FF};

    pub const READ_6: &[u8] = &[op::READ_6, 0x1f, FF, FF, FF, CTL];
    pub const WRITE_6: &[u8] = &[op::WRITE_6, 0x1f, FF, FF, FF, CTL];
    pub const START_STOP_UNIT: &[u8] = &[op::START_STOP_UNIT, 0, 0, 0, 0xf3, CTL];
    pub const READ_CAPACITY_10: &[u8] = &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, CTL];
    pub const READ_10: &[u8] = &[op::READ_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const WRITE_10: &[u8] = &[op::WRITE_10, 0xf8, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const WRITE_VERIFY_10: &[u8] = &[op::WRITE_VERIFY_10, 0xf0, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const VERIFY_10: &[u8] = &[op::VERIFY_10, 0xf6, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const PRE_FETCH_10: &[u8] = &[op::PRE_FETCH_10, 0x02, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const SYNCHRONIZE_CACHE_10: &[u8] = &[op::SYNCHRONIZE_CACHE_10, 0, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const READ_DEFECT_DATA_10: &[u8] = &[op::READ_DEFECT_DATA_10, 0, 0x1f, 0, 0, 0, 0, FF, FF, CTL];
    pub const WRITE_SAME_10: &[u8] = &[op::WRITE_SAME_10, 0xfe, FF, FF, FF, FF, 0, FF, FF, CTL];
    pub const UNMAP: &[u8] = &[op::UNMAP, 0x01, 0, 0, 0, 0, 0, FF, FF, CTL];
    pub const READ_16: &[u8] = &[op::READ_16, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const COMPARE_AND_WRITE: &[u8] = &[op::COMPARE_AND_WRITE, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, CTL];
    pub const WRITE_16: &[u8] = &[op::WRITE_16, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const ORWRITE_16: &[u8] = &[op::ORWRITE_16, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const WRITE_VERIFY_16: &[u8] = &[op::WRITE_VERIFY_16, 0xf0, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const VERIFY_16: &[u8] = &[op::VERIFY_16, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const PRE_FETCH_16: &[u8] = &[op::PRE_FETCH_16, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const SYNCHRONIZE_CACHE_16: &[u8] = &[op::SYNCHRONIZE_CACHE_16, 0, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const WRITE_SAME_16: &[u8] = &[op::WRITE_SAME_16, 0xf9, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const READ_CAPACITY_16: &[u8] = &[op::SERVICE_ACTION_IN_16, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, CTL];
    pub const GET_LBA_STATUS: &[u8] = &[op::SERVICE_ACTION_IN_16, 0x1f, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const READ_12: &[u8] = &[op::READ_12, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const WRITE_12: &[u8] = &[op::WRITE_12, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const WRITE_VERIFY_12: &[u8] = &[op::WRITE_VERIFY_12, 0xf0, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const VERIFY_12: &[u8] = &[op::VERIFY_12, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, 0, CTL];
    pub const READ_DEFECT_DATA_12: &[u8] = &[op::READ_DEFECT_DATA_12, 0x1f, 0, 0, 0, 0, FF, FF, FF, FF, 0, CTL];
    /// IMMED, AUSE and the service action; the parameter list length.
    pub const SANITIZE: &[u8] = &[super::sanitize::SANITIZE, 0xbf, 0, 0, 0, 0, 0, FF, FF, CTL];
}

/// A block command of `types` that reaches the medium: it needs one, reports unit
/// attentions and is served only in the active ALUA states.
const fn block(
    name: &'static str,
    op: u8,
    usage: &'static [u8],
    types: DeviceTypes,
    reservation: Reservation,
    decode: Decode,
    run: Run,
) -> Command {
    Command {
        name,
        op,
        sa: None,
        usage,
        types,
        only_if: None,
        works_without_medium: false,
        reports_ua: true,
        reservation,
        alua: Alua::Active,
        decode,
        run,
    }
}

/// SANITIZE, one entry per service action (SBC-3 §5.30): disks only, a write in the
/// presence of reservations, served in the active ALUA states.
const fn sanitize_entry(
    name: &'static str,
    sa: u8,
    only_if: Option<fn(&Device) -> bool>,
    decode: Decode,
    run: Run,
) -> Command {
    Command {
        name,
        op: sanitize::SANITIZE,
        sa: Some(sa),
        usage: usage::SANITIZE,
        types: DeviceTypes::DISK,
        only_if,
        works_without_medium: false,
        reports_ua: true,
        reservation: Reservation::Write,
        alua: Alua::Active,
        decode,
        run,
    }
}

const DISK: DeviceTypes = DeviceTypes::DISK;
const ALL: DeviceTypes = DeviceTypes::ALL;
const READ: Reservation = Reservation::Read;
const WRITE: Reservation = Reservation::Write;

/// The SBC commands, one per line where [`block`] builds them (the columns it takes), the
/// others with every field spelled out.
#[rustfmt::skip]
pub const COMMANDS: &[Command] = &[
    //    name                    opcode                usage                          types reservation             decode                            run
    block("READ(6)",              READ_6,               usage::READ_6,                 DISK, READ,                   rw::read,                         Run::Io),
    block("WRITE(6)",             WRITE_6,              usage::WRITE_6,                DISK, WRITE,                  rw::write,                        Run::Io),
    Command {
        name: "START STOP UNIT",
        op: START_STOP_UNIT,
        sa: None,
        usage: usage::START_STOP_UNIT,
        types: ALL,
        only_if: None,
        works_without_medium: true,
        reports_ua: true,
        reservation: Reservation::StartStop,
        alua: Alua::Active,
        decode: decode_start_stop,
        run: Run::Emulate(start_stop),
    },
    block("READ CAPACITY(10)",    READ_CAPACITY_10,     usage::READ_CAPACITY_10,       ALL,  Reservation::Allowed,   decode_read_capacity_10,          Run::Emulate(read_capacity_10)),
    block("READ(10)",             READ_10,              usage::READ_10,                ALL,  READ,                   rw::read,                         Run::Io),
    block("WRITE(10)",            WRITE_10,             usage::WRITE_10,               ALL,  WRITE,                  rw::write,                        Run::Io),
    block("WRITE AND VERIFY(10)", WRITE_VERIFY_10,      usage::WRITE_VERIFY_10,        ALL,  WRITE,                  rw::write_verify,                 Run::Io),
    block("VERIFY(10)",           VERIFY_10,            usage::VERIFY_10,              ALL,  READ,                   rw::verify,                       Run::Io),
    block("PRE-FETCH(10)",        PRE_FETCH_10,         usage::PRE_FETCH_10,           DISK, READ,                   decode_pre_fetch,                 Run::Io),
    block("SYNCHRONIZE CACHE(10)", SYNCHRONIZE_CACHE_10, usage::SYNCHRONIZE_CACHE_10,  ALL,  WRITE,                  decode_synchronize_cache,         Run::Io),
    block("READ DEFECT DATA(10)", READ_DEFECT_DATA_10,  usage::READ_DEFECT_DATA_10,    DISK, READ,                   defect::decode,                   Run::Emulate(defect::emulate)),
    block("WRITE SAME(10)",       WRITE_SAME_10,        usage::WRITE_SAME_10,          DISK, WRITE,                  provisioning::decode_write_same,  Run::WriteSame),
    // SCST: UNMAP exists only on thin provisioned devices.
    Command {
        name: "UNMAP",
        op: UNMAP,
        sa: None,
        usage: usage::UNMAP,
        types: DISK,
        only_if: Some(Device::thin_provisioned),
        works_without_medium: false,
        reports_ua: true,
        reservation: WRITE,
        alua: Alua::Active,
        decode: provisioning::decode_unmap,
        run: Run::Unmap,
    },
    block("READ(16)",             READ_16,              usage::READ_16,                DISK, READ,                   rw::read,                         Run::Io),
    block("COMPARE AND WRITE",    COMPARE_AND_WRITE,    usage::COMPARE_AND_WRITE,      DISK, WRITE,                  rmw::decode,                      Run::ReadModifyWrite),
    block("WRITE(16)",            WRITE_16,             usage::WRITE_16,               DISK, WRITE,                  rw::write,                        Run::Io),
    block("ORWRITE(16)",          ORWRITE_16,           usage::ORWRITE_16,             DISK, WRITE,                  rmw::decode,                      Run::ReadModifyWrite),
    block("WRITE AND VERIFY(16)", WRITE_VERIFY_16,      usage::WRITE_VERIFY_16,        DISK, WRITE,                  rw::write_verify,                 Run::Io),
    block("VERIFY(16)",           VERIFY_16,            usage::VERIFY_16,              DISK, READ,                   rw::verify,                       Run::Io),
    block("PRE-FETCH(16)",        PRE_FETCH_16,         usage::PRE_FETCH_16,           DISK, READ,                   decode_pre_fetch,                 Run::Io),
    block("SYNCHRONIZE CACHE(16)", SYNCHRONIZE_CACHE_16, usage::SYNCHRONIZE_CACHE_16,  DISK, WRITE,                  decode_synchronize_cache,         Run::Io),
    block("WRITE SAME(16)",       WRITE_SAME_16,        usage::WRITE_SAME_16,          DISK, WRITE,                  provisioning::decode_write_same,  Run::WriteSame),
    Command {
        sa: Some(SAI_READ_CAPACITY_16),
        ..block("READ CAPACITY(16)", SERVICE_ACTION_IN_16, usage::READ_CAPACITY_16, DISK, Reservation::Allowed, decode_read_capacity_16, Run::Emulate(read_capacity_16))
    },
    Command {
        sa: Some(SAI_GET_LBA_STATUS),
        ..block("GET LBA STATUS", SERVICE_ACTION_IN_16, usage::GET_LBA_STATUS, DISK, READ, provisioning::decode_get_lba_status, Run::Emulate(provisioning::get_lba_status))
    },
    block("READ(12)",             READ_12,              usage::READ_12,                ALL,  READ,                   rw::read,                         Run::Io),
    block("WRITE(12)",            WRITE_12,             usage::WRITE_12,               ALL,  WRITE,                  rw::write,                        Run::Io),
    block("WRITE AND VERIFY(12)", WRITE_VERIFY_12,      usage::WRITE_VERIFY_12,        DISK, WRITE,                  rw::write_verify,                 Run::Io),
    block("VERIFY(12)",           VERIFY_12,            usage::VERIFY_12,              DISK, READ,                   rw::verify,                       Run::Io),
    block("READ DEFECT DATA(12)", READ_DEFECT_DATA_12,  usage::READ_DEFECT_DATA_12,    DISK, READ,                   defect::decode,                   Run::Emulate(defect::emulate)),
    sanitize_entry("SANITIZE OVERWRITE", sanitize::SA_OVERWRITE, None, sanitize::decode_overwrite, Run::Sanitize),
    sanitize_entry("SANITIZE BLOCK ERASE", sanitize::SA_BLOCK_ERASE, Some(Device::can_block_erase), sanitize::decode_block_erase, Run::Sanitize),
    sanitize_entry("SANITIZE EXIT FAILURE MODE", sanitize::SA_EXIT_FAILURE_MODE, None, sanitize::decode_exit_failure_mode, Run::Emulate(sanitize::exit_failure_mode)),
];

/// LOEJ=1 with POWER CONDITION 0: the command loads or ejects the medium.
fn load_eject(c: &[u8; 16]) -> bool {
    c[4] & 0x02 != 0 && c[4] >> 4 == 0
}

fn decode_start_stop(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    // Not an eject while removal is prevented (SPC-4 §6.13).
    if load_eject(&task.cdb) && removable(dev) && dev.removal_prevented() {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::MEDIUM_REMOVAL_PREVENTED,
        ));
    }
    no_data(dev, task)
}

/// START STOP UNIT (SBC-3 §5.25, MMC-6): with LOEJ, ejects (START=0) or loads (START=1) a
/// removable medium; the decode step already refused an eject while prevented, but another
/// I_T nexus may have prevented it since.
fn start_stop(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    if load_eject(&c) && removable(dev) {
        if c[4] & 0x01 != 0 {
            dev.load_medium(task.nexus);
        } else if dev.eject().is_err() {
            task.fail(Sense::new(
                sense::ILLEGAL_REQUEST,
                sense::MEDIUM_REMOVAL_PREVENTED,
            ));
        }
    }
}

fn decode_read_capacity_10(_: &Device, _: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(8))
}

/// READ CAPACITY (10) (SBC-3 §5.15): the last LBA (saturated) and the block size.
fn read_capacity_10(dev: &Device, task: &mut ScsiTask) {
    let last = dev.num_blocks().saturating_sub(1);
    let mut d = [0u8; 8];
    d[0..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d[4..8].copy_from_slice(&dev.block_size().to_be_bytes());
    task.reply(&d);
}

fn decode_read_capacity_16(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(be32(&task.cdb[10..14])))
}

/// READ CAPACITY (16) (SBC-3 §5.16).
fn read_capacity_16(dev: &Device, task: &mut ScsiTask) {
    let mut d = [0u8; 32];
    d[0..8].copy_from_slice(&dev.num_blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&dev.block_size().to_be_bytes());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (bits 3-0 of byte 13).
    d[13] = dev.lb_per_pb_exponent() & 0x0f;
    if dev.thin_provisioned() {
        // LBPME and LBPRZ: deallocated blocks read as zeros.
        d[14] |= 0xc0;
    }
    let alloc = be32(&task.cdb[10..14]) as usize;
    task.reply(&d[..alloc.min(32)]);
}

/// SYNCHRONIZE CACHE (10) and (16) (SBC-3 §5.22): the range is checked, then the whole
/// device is flushed.
fn decode_synchronize_cache(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let (lba, n) = lba_and_blocks(&task.cdb);
    check_range(dev, lba, n)?;
    task.io = Some((IoOp::Flush, 0, 0));
    Ok(Plan::NONE)
}

/// PRE-FETCH (10) and (16) (SBC-3 §5.9): a hint. It completes with GOOD, not CONDITION
/// MET: the device makes no promise that the blocks stay cached. IMMED changes nothing,
/// since the read-ahead is only started either way.
fn decode_pre_fetch(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let (lba, n) = lba_and_blocks(&task.cdb);
    check_range(dev, lba, n)?;
    let bs = u64::from(dev.block_size());
    let bytes = (n * bs).min(u64::from(u32::MAX - (u32::MAX % dev.block_size())));
    task.io = Some((IoOp::Prefetch, lba * bs, bytes as u32));
    Ok(Plan::NONE)
}

/// Whether writes to `dev` through this task are refused: a LUN mapped read-only, a
/// read-only device, a CD, or software write protect (control mode page SWP).
pub(in crate::scsi) fn write_protected(dev: &Device, task: &ScsiTask) -> bool {
    task.read_only || dev.is_read_only() || dev.swp() || DeviceTypes::of(dev) == DeviceTypes::CDROM
}

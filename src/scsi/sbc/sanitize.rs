//! SANITIZE (SBC-3 §5.30, §4.11): every logical block made unreadable as it was, by an
//! OVERWRITE with a pattern (on every device) or a BLOCK ERASE (a thin provisioned device
//! deallocates every block, which then reads as zeros). CRYPTOGRAPHIC ERASE needs a medium that
//! encrypts, which no backend here is: it is not served, and REPORT SUPPORTED OPERATION CODES
//! does not list it.
//!
//! The command is checked here; the operation runs in the port ([`super::super::port`]) as a
//! chain of backend I/O, in pieces, on the reactor that received it. While it runs, every
//! other command to the logical unit but INQUIRY, REPORT LUNS and REQUEST SENSE (which reports
//! its progress) ends with NOT READY, SANITIZE IN PROGRESS, on every reactor; it goes on
//! through aborts, resets and the end of the session that started it (§4.11.3). One that
//! fails leaves the medium in failure mode: media access ends with MEDIUM ERROR, SANITIZE
//! COMMAND FAILED until a SANITIZE succeeds, or until EXIT FAILURE MODE if the failed one had
//! AUSE set.
#![forbid(unsafe_code)]

use crate::scsi::cdb::be16;
use crate::scsi::device::{Device, Sanitize};
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{DataDir, Plan, ScsiTask};

/// The SANITIZE operation code and its service actions.
pub const SANITIZE: u8 = 0x48;
pub const SA_OVERWRITE: u8 = 0x01;
pub const SA_BLOCK_ERASE: u8 = 0x02;
pub const SA_EXIT_FAILURE_MODE: u8 = 0x1f;

/// IMMED (byte 1 bit 7): status once the CDB and parameter list are checked.
pub fn immed(cdb: &[u8; 16]) -> bool {
    cdb[1] & 0x80 != 0
}

/// AUSE (byte 1 bit 5): should the operation fail, EXIT FAILURE MODE may end the failure.
pub fn ause(cdb: &[u8; 16]) -> bool {
    cdb[1] & 0x20 != 0
}

/// The CDB's fields common to every service action: reserved bits clear, and the parameter
/// list length, which only OVERWRITE has.
fn check_cdb(task: &ScsiTask) -> Result<u16, Sense> {
    let c = &task.cdb;
    if c[1] & 0x40 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(6)));
    }
    if let Some(i) = (2..7).find(|&i| c[i] != 0) {
        return Err(Sense::invalid_cdb_field(i as u16, None));
    }
    Ok(be16(&c[7..9]) as u16)
}

/// OVERWRITE: its parameter list is the 4-byte header and an initialization pattern of one to
/// one logical block's bytes.
pub(in crate::scsi) fn decode_overwrite(dev: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let len = check_cdb(task)?;
    check_restricted(dev, task)?;
    if len <= 4 || u32::from(len) > dev.block_size() + 4 {
        return Err(Sense::invalid_cdb_field(7, None));
    }
    Ok(Plan {
        dir: DataDir::Out,
        len: u32::from(len),
    })
}

/// BLOCK ERASE: no parameter list.
pub(in crate::scsi) fn decode_block_erase(
    dev: &Device,
    task: &mut ScsiTask,
) -> Result<Plan, Sense> {
    let len = check_cdb(task)?;
    check_restricted(dev, task)?;
    if len != 0 {
        return Err(Sense::invalid_cdb_field(7, None));
    }
    Ok(Plan::NONE)
}

/// EXIT FAILURE MODE: no parameter list. It ends the failure mode of a sanitize operation
/// that failed with AUSE set, and has nothing to do when none failed; after one that failed
/// with AUSE clear (the restricted completion mode) only a sanitize that succeeds ends the
/// failure mode, and it is refused (SBC-4 §5.24.1).
pub(in crate::scsi) fn decode_exit_failure_mode(
    dev: &Device,
    task: &mut ScsiTask,
) -> Result<Plan, Sense> {
    if check_cdb(task)? != 0 {
        return Err(Sense::invalid_cdb_field(7, None));
    }
    if dev.sanitize_state() == Sanitize::Failed {
        return Err(Sense::invalid_cdb_field(1, Some(4)));
    }
    Ok(Plan::NONE)
}

/// A new sanitize operation after one failed in the restricted completion mode must not ask
/// for the unrestricted one (AUSE set); and none may touch a write-protected medium.
fn check_restricted(dev: &Device, task: &ScsiTask) -> Result<(), Sense> {
    if super::write_protected(dev, task) {
        return Err(Sense::new(sense::DATA_PROTECT, sense::WRITE_PROTECTED));
    }
    if dev.sanitize_state() == Sanitize::Failed && ause(&task.cdb) {
        return Err(Sense::invalid_cdb_field(1, Some(5)));
    }
    Ok(())
}

/// EXIT FAILURE MODE, once decoded: the medium is usable again (what failed to be sanitized
/// stays as it was).
pub(in crate::scsi) fn exit_failure_mode(dev: &Device, _: &mut ScsiTask) {
    dev.sanitize_end(Sanitize::Idle);
}

/// An OVERWRITE's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwrite {
    /// Passes over the medium (1 to 31).
    pub passes: u8,
    /// Invert the pattern between consecutive passes.
    pub invert: bool,
    /// The initialization pattern, repeated over each logical block.
    pub pattern: Vec<u8>,
}

/// The OVERWRITE parameter list (SBC-3 §5.30.3): INVERT, TEST (must be 0), OVERWRITE COUNT
/// (not 0), INITIALIZATION PATTERN LENGTH (1 to the block size) and the pattern.
pub fn parse_overwrite(data: &[u8], block_size: u32) -> Result<Overwrite, Sense> {
    if data.len() < 4 {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
    }
    if data[0] & 0x60 != 0 {
        return Err(Sense::invalid_param_bit(0, 5));
    }
    let passes = data[0] & 0x1f;
    if passes == 0 {
        return Err(Sense::invalid_param_field(0));
    }
    let plen = usize::from(be16(&data[2..4]) as u16);
    if plen == 0 || plen > block_size as usize {
        return Err(Sense::invalid_param_field(2));
    }
    if data.len() != plen + 4 {
        return Err(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::PARAMETER_LIST_LENGTH_ERROR,
        ));
    }
    Ok(Overwrite {
        passes,
        invert: data[0] & 0x80 != 0,
        pattern: data[4..].to_vec(),
    })
}

/// One logical block of the pattern (repeated, the last copy cut short), inverted if asked.
pub fn pattern_block(pattern: &[u8], block_size: usize, inverted: bool) -> Vec<u8> {
    pattern
        .iter()
        .cycle()
        .take(block_size)
        .map(|&b| if inverted { !b } else { b })
        .collect()
}

/// The sense for a command that arrives while the device is sanitizing or in failure mode,
/// or `None` when it may go on. `exempt` commands (INQUIRY, REPORT LUNS, REQUEST SENSE: those
/// that report no unit attention either) always go on; in failure mode, so do those that do
/// not touch the medium, and SANITIZE itself.
pub fn refusal(dev: &Device, exempt: bool, media_access: bool, is_sanitize: bool) -> Option<Sense> {
    match dev.sanitize_state() {
        Sanitize::Idle => None,
        _ if exempt => None,
        Sanitize::InProgress => Some(Sense {
            progress: Some(dev.sanitize_progress()),
            ..Sense::new(sense::NOT_READY, sense::SANITIZE_IN_PROGRESS)
        }),
        Sanitize::Failed | Sanitize::FailedAuse if media_access && !is_sanitize => Some(
            Sense::new(sense::MEDIUM_ERROR, sense::SANITIZE_COMMAND_FAILED),
        ),
        Sanitize::Failed | Sanitize::FailedAuse => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overwrite_parameters() {
        let mut p = vec![0x83, 0, 0, 2, 0xaa, 0x55];
        let o = parse_overwrite(&p, 512).unwrap();
        assert_eq!(
            (o.passes, o.invert, o.pattern.as_slice()),
            (3, true, &[0xaa, 0x55][..])
        );
        p[0] = 0x80;
        assert_eq!(
            parse_overwrite(&p, 512).unwrap_err(),
            Sense::invalid_param_field(0)
        );
        p[0] = 0x21;
        assert_eq!(
            parse_overwrite(&p, 512).unwrap_err(),
            Sense::invalid_param_bit(0, 5)
        );
        p[0] = 1;
        p[3] = 0;
        assert_eq!(
            parse_overwrite(&p, 512).unwrap_err(),
            Sense::invalid_param_field(2)
        );
        p[3] = 3;
        assert_eq!(
            parse_overwrite(&p, 512).unwrap_err().asc,
            sense::PARAMETER_LIST_LENGTH_ERROR.0
        );
        assert!(
            parse_overwrite(&[1, 0, 2, 1], 512).is_err(),
            "longer than a block"
        );
        assert!(parse_overwrite(&[1, 0], 512).is_err());
    }

    #[test]
    fn the_pattern_fills_a_block() {
        assert_eq!(
            pattern_block(&[1, 2, 3], 8, false),
            [1, 2, 3, 1, 2, 3, 1, 2]
        );
        assert_eq!(pattern_block(&[0x0f], 2, true), [0xf0, 0xf0]);
    }
}

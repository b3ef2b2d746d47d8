//! The SCSI target core (SPC-4, SBC-3): devices, command emulation, sense data and unit
//! attentions. It knows nothing of iSCSI: another transport could sit on it.
mod cdb;
pub mod device;
pub mod exec;
pub mod mmc;
pub mod opcodes;
pub mod port;
pub mod sense;
pub mod task;

pub use device::{Device, DeviceError};
pub use exec::{execute_no_lun, plan, report_luns, ua_applies};
pub use port::{complete, Completion, Exec, ScsiPort};
pub use task::{DataDir, Plan, ScsiTask};

/// The 8-byte LUN field of REPORT LUNS for `lun` (SAM-5 §4.6: peripheral device addressing
/// below 256, flat space addressing above).
pub fn lun_field(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

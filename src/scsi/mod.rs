//! The SCSI target core (SPC-4, SBC-3): devices, command emulation, sense data and unit
//! attentions. It knows nothing of iSCSI: another transport could sit on it.
pub mod device;
pub mod exec;
pub mod mmc;
pub mod opcodes;
pub mod pr;
pub mod sense;

pub use device::{Device, DeviceError};
pub use exec::{
    complete, execute_no_lun, plan, report_luns, ua_applies, Completion, DataDir, Exec, Plan,
    ScsiPort, ScsiTask,
};

/// The 8-byte LUN field of REPORT LUNS for `lun` (SAM-5 §4.6: peripheral device addressing
/// below 256, flat space addressing above).
pub fn lun_field(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

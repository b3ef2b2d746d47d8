//! The SCSI target core (SPC-4, SBC-3): devices, LUN maps, command emulation, sense data and
//! unit attentions. It knows nothing of iSCSI: another transport could sit on it.
pub mod device;

pub use device::{Device, DeviceError};

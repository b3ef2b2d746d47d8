//! The SCSI target core (SAM-5, SPC-4, SBC-3, MMC-5): devices, the commands they serve,
//! sense data and unit attentions. It knows nothing of iSCSI: another transport could sit
//! on it.
//!
//! # The command table
//!
//! Every command is one [`command::Command`] entry, in the list of the standard that
//! defines it: [`spc::COMMANDS`] (INQUIRY, MODE SENSE and SELECT, LOG SENSE, REQUEST SENSE,
//! REPORT LUNS, REPORT SUPPORTED OPERATION CODES and TASK MANAGEMENT FUNCTIONS, TEST UNIT
//! READY, PREVENT ALLOW MEDIUM REMOVAL, REPORT and SET TARGET PORT GROUPS, which [`alua`]
//! runs, the reservation commands of [`spc::reserve`], and EXTENDED COPY and RECEIVE COPY
//! RESULTS of [`spc::xcopy`]), [`sbc::COMMANDS`] (READ, WRITE,
//! VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE, SYNCHRONIZE CACHE, PRE-FETCH, GET
//! LBA STATUS, READ CAPACITY, READ DEFECT DATA, SANITIZE, START STOP UNIT) and
//! [`mmc::COMMANDS`] (the CD-ROM's own). An entry holds all the target knows of its
//! command: its name, opcode and service action, its CDB usage data, the device types that
//! serve it (and a further condition, such as UNMAP only on thin provisioned devices),
//! whether it works without a medium, whether it reports a pending unit attention, its
//! persistent reservation class ([`command::Reservation`]), its ALUA class
//! ([`command::Alua`]), its decode step and how it runs ([`command::Run`]: emulated, one
//! backend I/O, UNMAP, WRITE SAME, read-modify-write, or a job of the port: SANITIZE,
//! EXTENDED COPY).
//!
//! [`command::COMMANDS`] merges the three lists at compile time, sorted by opcode and
//! service action (the build fails on a duplicate), with a 256-slot index by opcode, so
//! that finding a READ's entry costs an array load. Everything reads that one table:
//! [`plan`] (unit attention, reservation conflict for the task's I_T nexus, CONTROL byte,
//! device type, medium, then the entry's decode step), [`ScsiPort::execute`] (the entry
//! `plan` recorded in the task; the reservation commands that act for an I_T nexus go
//! through [`execute_reservation`] instead), [`ua_applies`] and REPORT SUPPORTED OPERATION
//! CODES ([`spc::rsoc`]). Execution goes through the port
//! ([`port`]): emulated commands complete at once, I/O goes to the device's channel on the
//! reactor and comes back from [`ScsiPort::poll`].
//!
//! # Adding a command
//!
//! 1. Its opcode goes in the `opcode` module of its standard (`spc`, `sbc` or `mmc`).
//! 2. Its decode step, `fn(&Device, &mut ScsiTask) -> Result<Plan, Sense>`, checks the CDB
//!    before any data moves and returns what the transport must move ([`Plan`]) or the sense
//!    data that ends the command; it may record in the task what execution needs (the I/O
//!    range). Its emulate step, `fn(&Device, &mut ScsiTask)`, fills the Data-In buffer or
//!    fails the task; commands that are backend I/O use [`command::Run::Io`] instead.
//! 3. Its entry goes in its standard's `COMMANDS`, every field filled in: the reservation
//!    class from the tables of SPC-4 §5.13.1 (and SBC-3's), which `plan` enforces, and the
//!    ALUA class from §5.15.2.4. The unit tests of [`command`] check the usage data
//!    against the CDB length and that REPORT SUPPORTED OPERATION CODES lists exactly what
//!    the dispatcher accepts.
#![forbid(unsafe_code)]

pub mod alua;
mod cdb;
pub mod command;
pub mod device;
pub mod mmc;
pub mod port;
pub mod pr;
pub mod sbc;
pub mod sense;
pub mod spc;
pub mod task;
#[cfg(test)]
mod tests;

pub use command::{execute_reservation, plan, plan_held, start_checks, ua_applies};
pub use device::{Device, DeviceError};
pub use port::{complete, Completion, Exec, ScsiPort};
pub use spc::luns::{execute_no_lun, report_luns};
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

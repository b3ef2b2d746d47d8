//! iscsi-tgt: a userspace iSCSI target built the way SPDK builds storage targets.
//!
//! Reactor threads pinned to dedicated cores poll their own sockets, run the iSCSI state
//! machine and the SCSI target, and dispatch to block backends through pooled DMA buffers.
//! All configuration goes through a JSON-RPC Unix socket whose tree mirrors the iSCSI-SCST
//! sysfs attribute model.
//!
//! Dependencies point one way: `rpc` → `mgmt` → `iscsi` → `scsi` → `bdev` → `env`;
//! `iscsi` → `net` → `env`; everything may use `reactor`.

pub mod bdev;
pub mod cli;
pub mod env;
pub mod initiator;
pub mod iscsi;
pub mod mgmt;
pub mod net;
pub mod reactor;
pub mod rpc;
pub mod scsi;
pub mod util;

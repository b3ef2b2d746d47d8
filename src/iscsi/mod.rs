//! The iSCSI protocol (RFC 7143): PDU codec, login and text negotiation, discovery, sessions
//! and connections, R2T and Data-In/Out sequencing, task management and NOP.
pub mod config;
pub mod param;
pub mod registry;
pub mod text;

//! The iSCSI protocol (RFC 7143): PDU codec, login and text negotiation, discovery, sessions
//! and connections, R2T and Data-In/Out sequencing, task management and NOP.
pub mod chap;
pub mod config;
pub mod conn;
pub mod engine;
pub mod login;
pub mod negotiate;
pub mod ordering;
pub mod param;
pub mod pdu;
pub mod registry;
pub mod rx;
pub mod seq;
pub mod task;
pub mod text;
pub mod tx;

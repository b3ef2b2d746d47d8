//! The userspace TCP stack: one smoltcp interface and socket set per reactor, over a frame
//! device of its own ([`dev`]).

pub mod dev;

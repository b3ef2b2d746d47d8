//! The raw bindings bindgen generated from DPDK's headers and the shim's (`build.rs`). Only
//! [`super`] uses them; everything else goes through its safe types.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    missing_docs
)]

include!(concat!(env!("OUT_DIR"), "/dpdk.rs"));

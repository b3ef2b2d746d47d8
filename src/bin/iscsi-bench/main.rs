//! A small load generator over the crate's own initiator, for what the libiscsi tools cannot
//! do (data digests, CHAP with SHA-2): reads or writes of one size at a fixed queue depth for a
//! fixed time, printing `iops N mbps M` at the end.
//!
//! With `--verify` it checks data integrity instead: it reads the whole LUN and compares it
//! with `--expect FILE` (what another initiator wrote), if given, then writes the whole LUN
//! with a pattern unique to each byte offset and this run, reads it back and compares, all
//! at the queue depth given. It exits non-zero at the first difference, naming its LBA.
//!
//! With `--soak` it checks data integrity under disruption: `--sessions` sessions on as many
//! threads, each owning a disjoint slice of the LUN, run a random mix of READs and WRITEs of
//! one block to `--max-io` bytes at the queue depth given for `--secs` seconds, while ABORT
//! TASKs and abrupt connection drops (followed by session reinstatement) are injected at
//! random. Every READ is checked against a model of what each block holds; at the end every
//! session reads and checks its whole slice. The last line of output sums it up:
//! `soak secs S sessions N ops N ... mismatches N ...`; any mismatch or unexpected error makes
//! the exit code non-zero.
//!
//! With `--net af_packet:IF --ip ADDR/PREFIX` (or `tap:NAME`; `--gateway`, `--stack` as the
//! daemon takes them) every session connects over the userspace TCP stack's client on that
//! interface instead of the kernel's TCP: one stack on one queue of the interface, owned by
//! this process and shared by its sessions, polled by whichever session waits. The address
//! must be one the kernel does not hold on that interface: the kernel sees the same frames
//! and would answer them with resets. `--stack syn_timeout_ms` bounds a connect; `backlog`
//! and `max_half_open` are the target's and do nothing here. In a build with the `dpdk`
//! feature, `--net dpdk:DEVARGS [--eal "ARGS"]` puts that stack on one queue of a DPDK port
//! (`net_memif0,role=client,socket=PATH` against a target on the server end: neither side
//! has kernel TCP); the EAL's main lcore is the first core the process may run on.
//!
//! ```text
//! iscsi-bench --portal 127.0.0.1:3260 --target IQN [--lun 0] [--bs 131072] [--qd 16]
//!             [--secs 10] [--write] [--random] [--digests] [--blocksize 512]
//!             [--net kernel|af_packet:IF|tap:NAME|dpdk:DEVARGS --ip ADDR/PREFIX
//!                   [--gateway ADDR] [--stack KEY=VALUE]... [--eal "ARGS"]]
//!             [--verify [--expect FILE]]
//!             [--soak [--sessions 4] [--max-io 262144] [--read-pct 50] [--abort-every 1]
//!                     [--drop-every 8] [--relogin-delay 0] [--progress 60] [--seed N]]
use std::process::ExitCode;

mod net;
mod opts;
mod rig;
mod soak;
mod target;
mod verify;

use opts::Opts;

fn main() -> ExitCode {
    let mut o = match opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            return ExitCode::from(2);
        }
    };
    // Warnings of the network devices (a peer's oversized frames, ...) on stderr.
    iscsi_tgt::util::init_logging("warn");
    o.network = match net::Network::open(&o.net) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = bench(&o);
    o.network.finish();
    code
}

/// The run the options ask for: the soak, the verification or the benchmark.
fn bench(o: &Opts) -> ExitCode {
    if o.soak {
        return match soak::soak(o) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("iscsi-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if o.verify {
        return match verify::verify(o) {
            Ok(size) => {
                println!(
                    "verified {size} bytes{} and a written pattern at queue depth {}",
                    if o.expect.is_some() {
                        " against the file"
                    } else {
                        ""
                    },
                    o.qd
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("iscsi-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match rig::run(o) {
        Ok((n, secs)) => {
            let iops = n as f64 / secs;
            println!("iops {:.0} mbps {:.0}", iops, iops * f64::from(o.bs) / 1e6);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

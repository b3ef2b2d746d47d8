//! A benchmarking rig over the crate's own initiator, for what fio and the libiscsi tools do
//! not measure the way an iSCSI target needs (data digests, CHAP with SHA-2, latency per
//! command from the wire, every SCSI error by name).
//!
//! The benchmark (the default mode) runs `--sessions` sessions to each target given as
//! `iscsi://HOST[:PORT]/IQN/LUN` (libiscsi's form; `--portal/--target/--lun` still name one),
//! each on a thread of its own pinned round-robin to `--cores`, each with its own connection
//! and `--qd` commands of `--bs` bytes in flight: `--rw` read, write, randread, randwrite, rw
//! or randrw (`--read-pct` reads in a hundred). After `--ramp` seconds it measures for
//! `--secs`: IOPS and MB/s (10^6 bytes) and the latency from sending each command to its final
//! response, recorded per session in an HDR histogram and merged at the end (min, mean, max,
//! p50, p90, p99, p99.9, p99.99; reads and writes apart). While stderr is a terminal a
//! progress line is rewritten there each second. The summary's last line is `iops N mbps M`;
//! `--json` prints one JSON object instead (its fields are listed in README.md, under
//! iscsi-bench). A command that does not end GOOD is counted by its sense key (CHECK CONDITION)
//! or its status and the run goes on; a failed connection ends its session and is reported;
//! a command that waits longer than `--timeout` seconds (30; 0: no limit) for its answer stops
//! the run, named by its URL, ITT, LBA and operation (`timed_out` and `timeouts` in the JSON);
//! any error counted makes the exit status 1.
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
//! iscsi-bench [iscsi://HOST[:PORT]/IQN/LUN]... [--url URL]... | --portal ADDR:PORT --target IQN [--lun 0]
//!             [--rw read|write|randread|randwrite|rw|randrw] [--read-pct 50] [--write] [--random]
//!             [--bs 128k] [--qd 16] [--sessions 1] [--cores LIST] [--secs 10] [--ramp 0]
//!             [--timeout 30] [--json] [--digests] [--blocksize N]
//!             [--net kernel|af_packet:IF|tap:NAME|dpdk:DEVARGS --ip ADDR/PREFIX
//!                   [--gateway ADDR] [--stack KEY=VALUE]... [--eal "ARGS"]]
//!             [--verify [--expect FILE]]
//!             [--soak [--sessions 4] [--max-io 256k] [--read-pct 50] [--abort-every 1]
//!                     [--drop-every 8] [--relogin-delay 0] [--progress 60] [--seed N]]
//! ```
use std::process::ExitCode;

mod net;
mod opts;
mod report;
mod rig;
mod soak;
mod target;
mod verify;

use opts::{Opts, Parsed};

fn main() -> ExitCode {
    let mut o = match opts::parse() {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            report::emit(&format!("{}\n", opts::USAGE));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("iscsi-bench: {e}\n(iscsi-bench --help tells the options)");
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
                report::emit(&format!(
                    "verified {size} bytes{} and a written pattern at queue depth {}\n",
                    if o.expect.is_some() {
                        " against the file"
                    } else {
                        ""
                    },
                    o.qd
                ));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("iscsi-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let report = match rig::run(o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("iscsi-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if o.json {
        match serde_json::to_string_pretty(&report.json()) {
            Ok(j) => report::emit(&format!("{j}\n")),
            Err(e) => {
                eprintln!("iscsi-bench: cannot write the JSON report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        report::emit(&report.text());
    }
    if !report.late.is_empty() {
        eprintln!(
            "iscsi-bench: timed out: {} command{} waited longer than --timeout {} s",
            report.late.len(),
            if report.late.len() == 1 { "" } else { "s" },
            o.timeout
        );
    }
    let errors = report.errors.total();
    if errors > 0 {
        eprintln!("iscsi-bench: {errors} error(s) counted");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

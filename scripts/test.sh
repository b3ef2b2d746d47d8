#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting and lints, unit and integration tests, the
# target against real initiators, the storage backends, backing-store faults, fuzzing, the
# userspace TCP stack between network namespaces and libiscsi's conformance suite. Installs
# what it needs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

START=$(date +%s)
STAGE=
# Each stage's heading says how far into the run it starts.
step() {
    STAGE=$*
    echo
    echo "== $* (at $(($(date +%s) - START)) s)"
}
# A failed run says where it stopped, whichever command ended it.
trap 'rc=$?; [ "$rc" = 0 ] || echo "FAILED: the stage \"$STAGE\" ended the run with status $rc after $(($(date +%s) - START)) s" >&2' EXIT

step "setup"
scripts/setup.sh

step "format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

step "unit and integration tests"
cargo build --release --quiet
cargo test --quiet 2>&1 | tee /tmp/iscsi-tgt-cargo-test.log
grep -q "test result: FAILED" /tmp/iscsi-tgt-cargo-test.log && exit 1

step "the build with DPDK (feature dpdk): lints and unit tests"
# Its own target directory, shared with netns-test.sh's DPDK stages, so that the two builds do
# not overwrite each other's binaries.
CARGO_TARGET_DIR=target/dpdk cargo clippy --all-targets --features dpdk --quiet -- -D warnings
CARGO_TARGET_DIR=target/dpdk cargo test --features dpdk --lib --test dpdk_device --quiet 2>&1 | tee /tmp/iscsi-tgt-cargo-test-dpdk.log
grep -q "test result: ok" /tmp/iscsi-tgt-cargo-test-dpdk.log || exit 1
grep -q "test result: FAILED" /tmp/iscsi-tgt-cargo-test-dpdk.log && exit 1

step "real initiators: libiscsi tools and qemu-img"
scripts/peers.sh

step "storage backends: data integrity, durability, vcdrom"
scripts/backends.sh

step "faults: a backing file system that fills up"
scripts/faults.sh

step "fuzzing: a bounded run of every target"
# 20 s per target keeps the whole run under its 30 minutes; FUZZ_SECS=300 for a longer look.
FUZZ_SECS=${FUZZ_SECS:-20} scripts/fuzz.sh

step "the userspace TCP stack between two network namespaces (AF_PACKET, TAP, DPDK)"
scripts/netns-test.sh

step "the VM test bed: a NIC bound to vfio-pci in a QEMU guest, the target on DPDK's PMD"
# The target built with --features dpdk (netns-test.sh built it) on virtio-net and on e1000,
# each behind an emulated IOMMU; the host logs in through QEMU's network and checks the data.
# Exit 77 means it cannot run here (no packages to build the guest from); it says why.
for nic in virtio e1000; do
    rc=0
    MODE=target NIC=$nic ISCSI_TGT_BIN=target/dpdk/release/iscsi-tgt scripts/vm-test.sh || rc=$?
    if [ "$rc" = 77 ]; then
        echo "vm-test.sh skipped (NIC=$nic): see the SKIP line above"
    elif [ "$rc" != 0 ]; then
        exit 1
    fi
done

step "the VM test bed: the guest kernel's iSCSI initiator, persistent reservations with sg_persist"
# Two sessions under two initiator names from open-iscsi in the guest, to the target on the
# guest's loopback; a fence_scsi sequence through the two disks. 77: cannot run here (says why).
rc=0
MODE=initiator NIC=virtio scripts/vm-test.sh || rc=$?
if [ "$rc" = 77 ]; then
    echo "vm-test.sh MODE=initiator skipped: see the SKIP line above"
elif [ "$rc" != 0 ]; then
    exit 1
fi

step "the VM test bed: the userspace NVMe driver and kernel passthrough on the guest's emulated NVMe controllers"
# The controller bound to vfio-pci by setup.sh, a vdisk_nvme LUN on it, a qemu-img round trip,
# UNMAP, libiscsi's data-path suites and iscsi-bench --verify at QD32 from the host, then
# del_device and the kernel's nvme driver back on the controller; the same checks (fewer
# suites) on a passthrough LUN on a second controller left to the kernel's driver.
# 77: cannot run here (says why).
rc=0
MODE=nvme NIC=virtio scripts/vm-test.sh || rc=$?
if [ "$rc" = 77 ]; then
    echo "vm-test.sh MODE=nvme skipped: see the SKIP line above"
elif [ "$rc" != 0 ]; then
    exit 1
fi

step "conformance: iscsi-test-cu"
# The suite runs in full, docs/CONFORMANCE.md records every result, and the run fails if a suite
# that must be clean has a failed or warned test or if the target crashed or hung.
scripts/conformance.sh

echo
echo "all test stages passed in $(($(date +%s) - START)) s"

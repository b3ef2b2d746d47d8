#!/usr/bin/env bash
# Installs what the target, its tests and its benchmarks need on a fresh Debian 12 machine:
# the peers (libiscsi-bin, tgt, qemu-img with iscsi:// support), a Rust toolchain check, and
# hugepages for the DMA buffer pool. Safe to run again; needs root for apt-get and hugepages.
set -euo pipefail

need_apt=()
command -v iscsi-test-cu >/dev/null 2>&1 || need_apt+=(libiscsi-bin)
command -v tgtd >/dev/null 2>&1 || need_apt+=(tgt)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# backends.sh builds an ISO image for the vcdrom check.
command -v genisoimage >/dev/null 2>&1 || need_apt+=(genisoimage)
# netns-test.sh: namespaces and veth pairs, offloads off on the kernel end, packet loss.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ethtool >/dev/null 2>&1 || need_apt+=(ethtool)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
# qemu-img must come from the same build as qemu-block-extra (which adds iscsi://):
# installing the block module pins qemu-utils to Debian's matching version.
qemu_iscsi_ok() { [ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] && command -v qemu-img >/dev/null 2>&1; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (apt-get and hugepages need it)" >&2
    exit 1
fi

if [ ${#need_apt[@]} -gt 0 ] || ! qemu_iscsi_ok; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [ ${#need_apt[@]} -gt 0 ]; then
        apt-get install -y -qq "${need_apt[@]}" >/dev/null
    fi
    if ! qemu_iscsi_ok; then
        ver=$(apt-cache show qemu-block-extra | awk '/^Version:/ {print $2; exit}')
        apt-get install -y -qq --allow-downgrades qemu-block-extra "qemu-utils=$ver" >/dev/null
    fi
fi
qemu_iscsi_ok || { echo "setup.sh: qemu-img with iscsi:// support is not installed" >&2; exit 1; }
command -v iscsi-test-cu >/dev/null || { echo "setup.sh: libiscsi-bin did not install" >&2; exit 1; }
command -v genisoimage >/dev/null || { echo "setup.sh: genisoimage did not install" >&2; exit 1; }
for c in ip ethtool iptables; do
    command -v "$c" >/dev/null || { echo "setup.sh: $c did not install" >&2; exit 1; }
done

# tgtd is only a benchmark peer: keep Debian's service from holding port 3260.
if command -v systemctl >/dev/null 2>&1; then
    systemctl stop tgt >/dev/null 2>&1 || true
    systemctl disable tgt >/dev/null 2>&1 || true
fi

# Hugepages for the buffer pool (2 MiB pages); the target falls back to ordinary pages with
# a warning when none are reserved, so failure here is not fatal.
want=${ISCSI_TGT_HUGEPAGES:-512}
have=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$have" -lt "$want" ]; then
    echo "$want" > /proc/sys/vm/nr_hugepages 2>/dev/null || echo "setup.sh: could not reserve hugepages; continuing without" >&2
fi

command -v cargo >/dev/null || { echo "setup.sh: cargo is not installed" >&2; exit 1; }
echo "setup.sh: ready (hugepages: $(cat /proc/sys/vm/nr_hugepages))"

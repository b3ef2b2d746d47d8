#!/usr/bin/env bash
# Side by side: two (or more) iscsi-tgt builds under the same load, taking turns, so that a
# change is judged against its base in one run on one machine (this machine's absolute figures
# drift too much from hour to hour for anything else).
#
#   scripts/ab.sh OLD_BINARY NEW_BINARY
#   REV=49f9fe0 scripts/ab.sh                    builds REV in a scratch worktree and compares
#                                                it with this tree's release build
#
# Each turn starts one build on TARGET_CORE (poll mode) with a 1 GiB RAM LUN filled with random
# data, drives it with iscsi-perf on INIT_CORE (BLOCKS 512-byte blocks per I/O at queue depth
# QD, random unless SEQ=1) for SECS seconds after a second's ramp-up, and prints the IOPS
# (iscsi-perf's per-second figures averaged), MB/s and the target's reactor busy µs per I/O.
# ROUNDS turns per build, alternating. Needs iscsi-perf and qemu-img (scripts/setup.sh).
# LUN=fileio serves the same data from a file in the work directory (/var/tmp) opened with
# O_DIRECT instead, so that every I/O goes through the reactor's io_uring.
#
#   QD=32 BLOCKS=8 ROUNDS=2 SECS=6 TARGET_CORE=1 INIT_CORE=0 PORT=13310 MB=1024
set -euo pipefail
source "$(dirname "$0")/lib.sh"

QD=${QD:-32}
BLOCKS=${BLOCKS:-8}
SEQ=${SEQ:-0}
ROUNDS=${ROUNDS:-2}
SECS=${SECS:-6}
MB=${MB:-1024}
TARGET_CORE=${TARGET_CORE:-1}
INIT_CORE=${INIT_CORE:-0}
PORT=${PORT:-13310}
LUN=${LUN:-ram}
case $LUN in ram | fileio) ;; *) die "LUN is ram or fileio, not '$LUN'" ;; esac
IQN=iqn.2026-11.org.iscsi-tgt:ab
for c in iscsi-perf qemu-img; do
    command -v "$c" >/dev/null || die "$c is missing (scripts/setup.sh installs it)"
done

WORK=$(mktemp -d /var/tmp/iscsi-tgt-ab.XXXXXX)
cleanup() {
    stop_target 2>/dev/null || true
    if [ -n "${REV:-}" ] && [ -d "$WORK/tree" ]; then
        git -C "$ROOT" worktree remove --force "$WORK/tree" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

bins=("$@")
if [ -n "${REV:-}" ]; then
    [ ${#bins[@]} -eq 0 ] || die "give either REV or binaries, not both"
    git -C "$ROOT" worktree add -q --detach "$WORK/tree" "$REV" || die "cannot check out $REV"
    (cd "$WORK/tree" && CARGO_TARGET_DIR=${AB_TARGET_DIR:-/var/tmp/iscsi-tgt-ab-target} \
        cargo build --release --quiet --bin iscsi-tgt) || die "building $REV failed"
    cp "${AB_TARGET_DIR:-/var/tmp/iscsi-tgt-ab-target}/release/iscsi-tgt" "$WORK/iscsi-tgt-$REV"
    build_release
    bins=("$WORK/iscsi-tgt-$REV" "$BIN")
fi
[ ${#bins[@]} -ge 2 ] || die "usage: $0 OLD_BINARY NEW_BINARY (or REV=commit $0)"
for b in "${bins[@]}"; do [ -x "$b" ] || die "$b is not an executable"; done

DATA=$WORK/data.img
head -c $((MB << 20)) /dev/urandom >"$DATA"
URL=iscsi://127.0.0.1:$PORT/$IQN/0
SOCK=$WORK/rpc.sock
rflag=-r
[ "$SEQ" = 1 ] && rflag=

echo "# $QD deep, $((BLOCKS * 512)) bytes per I/O, $([ "$SEQ" = 1 ] && echo sequential || echo random) reads, ${SECS} s per turn, $MB MiB $([ "$LUN" = ram ] && echo RAM || echo O_DIRECT file) LUN"
for round in $(seq 1 "$ROUNDS"); do
    for b in "${bins[@]}"; do
        spawn_target "$SOCK" "$WORK/target.log" taskset -c "$TARGET_CORE" "$b" \
            --listen "127.0.0.1:$PORT" --cores "$TARGET_CORE" --mode poll
        if [ "$LUN" = ram ]; then
            ram_target "$SOCK" "$IQN" "$MB" >/dev/null
            taskset -c "$INIT_CORE" qemu-img convert -n -f raw -O raw "$DATA" "$URL" ||
                die "filling the LUN failed"
        else
            {
                rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt "add_device f0 filename=$DATA; o_direct=1"
                rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
                rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add f0 0"
                rpc "$SOCK" set "targets/iscsi/$IQN/enabled" 1
                rpc "$SOCK" set targets/iscsi/enabled 1
            } >/dev/null
        fi
        taskset -c "$INIT_CORE" iscsi-perf -m "$QD" -b "$BLOCKS" $rflag "$URL" >"$WORK/perf.out" 2>&1 &
        perf_pid=$!
        sleep 1
        b0=$(reactors_busy_ns "$SOCK")
        t0=$(date +%s%N)
        sleep "$SECS"
        b1=$(reactors_busy_ns "$SOCK")
        t1=$(date +%s%N)
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        stop_target
        iops=$(tr '\r' '\n' <"$WORK/perf.out" | grep -o 'iops current [0-9]*' | tail -n "$SECS" |
            awk '{s += $3; n++} END {if (n) printf "%d", s / n}')
        [ -n "$iops" ] && [ "$iops" -gt 0 ] || die "iscsi-perf reported nothing against $b: $(tail -c 300 "$WORK/perf.out")"
        python3 -c "
import sys
iops, busy, el, bs = $iops, $((b1 - b0)), $((t1 - t0)), $((BLOCKS * 512))
print('round %d  %-50s %9d IOPS %8.1f MB/s  busy %6.2f us/IO' % ($round, sys.argv[1], iops, iops * bs / 1e6, busy / 1e3 / (iops * el / 1e9)))
" "$b"
    done
done

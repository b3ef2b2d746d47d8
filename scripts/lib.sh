# Shared helpers of the test and benchmark scripts (sourced, not run).
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${ISCSI_TGT_BIN:-$ROOT/target/release/iscsi-tgt}
RPC="python3 $ROOT/rpc/rpc.py"

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

build_release() {
    (cd "$ROOT" && cargo build --release --quiet) || die "release build failed"
}

# The build with DPDK (feature dpdk), in a target directory of its own so that it and the
# default build do not overwrite each other's binaries.
DPDK_TARGET=$ROOT/target/dpdk
DPDK_BIN=${ISCSI_TGT_DPDK_BIN:-$DPDK_TARGET/release/iscsi-tgt}
build_dpdk() {
    (cd "$ROOT" && CARGO_TARGET_DIR=$DPDK_TARGET cargo build --release --quiet --features dpdk) ||
        die "release build with --features dpdk failed (DPDK: apt-get install libdpdk-dev libclang-dev pkg-config)"
}

# ram_target SOCK IQN MB: target IQN with one RAM LUN 0 of MB MiB, enabled (the benchmarks').
ram_target() {
    rpc "$1" mgmt handlers/vdisk_ramio/mgmt "add_device r0 size_mb=$3"
    rpc "$1" mgmt targets/iscsi/mgmt "add_target $2"
    rpc "$1" mgmt "targets/iscsi/$2/luns/mgmt" "add r0 0"
    rpc "$1" set "targets/iscsi/$2/enabled" 1
    rpc "$1" set targets/iscsi/enabled 1
}

# wait_rpc SOCK LOG: waits for the daemon started as $TARGET_PID to answer on SOCK; dies with
# its log if it exits first or takes over 10 s.
wait_rpc() {
    local sock=$1 log=$2
    for _ in $(seq 1 100); do
        if [ -S "$sock" ] && $RPC -s "$sock" get version >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$TARGET_PID" 2>/dev/null || { cat "$log" >&2; die "target exited during start"; }
        sleep 0.1
    done
    cat "$log" >&2
    die "target did not open its RPC socket $sock"
}

# start_target PORT SOCK LOG [extra daemon args...]: starts the daemon in the background and
# waits for its RPC socket; sets TARGET_PID.
start_target() {
    local port=$1 sock=$2 log=$3
    shift 3
    rm -f "$sock"
    "$BIN" --listen "127.0.0.1:$port" --rpc-socket "$sock" "$@" >"$log" 2>&1 &
    TARGET_PID=$!
    wait_rpc "$sock" "$log"
}

stop_target() {
    if [ -n "${TARGET_PID:-}" ] && kill -0 "$TARGET_PID" 2>/dev/null; then
        kill -TERM "$TARGET_PID"
        for _ in $(seq 1 100); do
            kill -0 "$TARGET_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$TARGET_PID" 2>/dev/null; then
            kill -KILL "$TARGET_PID" 2>/dev/null || true
            die "target did not exit within 10 s of SIGTERM"
        fi
        wait "$TARGET_PID" 2>/dev/null || true
    fi
    TARGET_PID=
}

# rpc SOCK ARGS...: one rpc.py call that must succeed.
rpc() {
    local sock=$1
    shift
    $RPC -s "$sock" "$@" || die "rpc.py $* failed"
}

# configure_default SOCK IQN RAM_MB: a RAM LUN 0 and a null LUN 1, target and driver enabled.
configure_default() {
    local sock=$1 iqn=$2 ram_mb=$3
    rpc "$sock" mgmt handlers/vdisk_ramio/mgmt "add_device ram0 size_mb=$ram_mb"
    rpc "$sock" mgmt handlers/vdisk_nullio/mgmt "add_device null0 size_mb=1024"
    rpc "$sock" mgmt targets/iscsi/mgmt "add_target $iqn"
    rpc "$sock" mgmt "targets/iscsi/$iqn/luns/mgmt" "add ram0 0"
    rpc "$sock" mgmt "targets/iscsi/$iqn/luns/mgmt" "add null0 1"
    rpc "$sock" set "targets/iscsi/$iqn/enabled" 1
    rpc "$sock" set targets/iscsi/enabled 1
}

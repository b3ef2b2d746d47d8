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
# shellcheck disable=SC2034 # for the scripts that source this one
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
    spawn_target "$sock" "$log" "$BIN" --listen "127.0.0.1:$port" "$@"
}

# spawn_target SOCK LOG COMMAND...: runs COMMAND (a daemon binary and its arguments, perhaps
# behind `ip netns exec NS` or `taskset -c N`, which exec it: TARGET_PID is the daemon's) with
# --rpc-socket SOCK in the background and waits for the socket.
spawn_target() {
    local sock=$1 log=$2
    shift 2
    rm -f "$sock"
    "$@" --rpc-socket "$sock" >"$log" 2>&1 &
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

# netns_pair NS_T NS_I TARGET_CORE INIT_CORE: two network namespaces joined by a veth pair,
# `vt` in NS_T (the target's side) and `vi` in NS_I (the initiator's), up, with no addresses
# (the caller adds them) and IPv6 off. MTU (default 1500) applies to both ends.
# Transmit offloads are off on vi, for every path alike (the userspace stack needs complete
# checksums and no GSO super-frames from the kernel's side). A veth delivers what one end sends
# on the sender's core, inside its send call: without RPS the initiator's whole TCP receive
# path would run on the target's core and count as the target's busy time (and the target's
# on the initiator's). RPS hands each end's receive work to its own side's core, as two hosts
# would have it. The caller deletes the namespaces (netns_del), which takes the pair with them.
netns_pair() {
    local nt=$1 ni=$2 tcore=$3 icore=$4
    ip netns add "$nt" || die "cannot create network namespace $nt"
    ip netns add "$ni" || die "cannot create network namespace $ni"
    # Named after the namespaces for the moment (unique, and short enough for an interface).
    ip link add "$nt" type veth peer name "$ni" || die "cannot create a veth pair"
    ip link set "$nt" mtu "${MTU:-1500}"
    ip link set "$ni" mtu "${MTU:-1500}"
    ip link set "$nt" netns "$nt"
    ip link set "$ni" netns "$ni"
    ip -n "$nt" link set "$nt" name vt up
    ip -n "$ni" link set "$ni" name vi up
    ip -n "$nt" link set lo up
    ip -n "$ni" link set lo up
    ip netns exec "$nt" sysctl -qw net.ipv6.conf.vt.disable_ipv6=1
    ip netns exec "$ni" sysctl -qw net.ipv6.conf.vi.disable_ipv6=1
    ip netns exec "$ni" ethtool -K vi tx off >/dev/null || die "cannot turn off vi's transmit offloads"
    ip netns exec "$ni" sh -c "echo $(printf %x $((1 << icore))) > /sys/class/net/vi/queues/rx-0/rps_cpus" ||
        die "cannot set RPS on the initiator's veth end"
    ip netns exec "$nt" sh -c "echo $(printf %x $((1 << tcore))) > /sys/class/net/vt/queues/rx-0/rps_cpus" ||
        die "cannot set RPS on the target's veth end"
}

# netns_del NS...: deletes the namespaces that exist, with netns_pair's veth if it never left
# the root namespace (for traps: never fails).
netns_del() {
    local ns
    for ns in "$@"; do
        ip link del "$ns" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}

# reactors_busy_ns SOCK: the busy time iscsi-tgt's reactors have counted, summed, in ns.
reactors_busy_ns() {
    local sock=$1 n total=0
    for n in $($RPC -s "$sock" ls reactors); do
        total=$((total + $($RPC -s "$sock" get "reactors/${n%/}/busy_ns")))
    done
    echo "$total"
}

#!/usr/bin/env bash
# The network paths side by side, in one run, with the same initiator (iscsi-bench on core 0,
# the target's one reactor on core 1, poll mode, a 1 GiB RAM LUN):
#   1. the kernel path on loopback, this build against an earlier one (BASE, a git revision):
#      the socket seam must not have made it slower;
#   2. over one veth pair between two namespaces: the kernel's TCP, the userspace stack on
#      AF_PACKET, the userspace stack on TAP (routed through the target namespace), and the
#      userspace stack on DPDK's net_af_packet and net_af_xdp (the build with --features dpdk;
#      DPDK=0 leaves them out);
#   3. (DPDK) the target and iscsi-bench both on DPDK, joined by memif: no kernel network on
#      either side.
# Prints a Markdown table: IOPS, MB/s and the target's busy time per I/O (reactors/0/busy_ns
# over the run divided by the I/Os). With PROFILE=1 it also records `perf` profiles of the
# target at 4 KiB QD32 on each veth path and prints their top functions.
#   BASE=2139ce8 SECS=8 scripts/bench-net.sh        MTU=9000 for jumbo frames on the veth
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (namespaces)"
BASE=${BASE:-2139ce8}
SECS=${SECS:-8}
TAG=$$
NS_T=ibn-t-$TAG
NS_I=ibn-i-$TAG
WORK=$(mktemp -d /tmp/iscsi-tgt-bench-net.XXXXXX)
SOCK=$WORK/rpc.sock
IQN=iqn.2026-11.org.iscsi-tgt:bench
BENCH=$ROOT/target/release/iscsi-bench
PORT=${PORT:-13270}
cleanup() {
    stop_target || true
    netns_del "$NS_T" "$NS_I"
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

build_release
[ "${DPDK:-1}" = 0 ] || build_dpdk
# The earlier build, in a scratch work tree of its own (its target directory is kept between
# runs in BASE_CACHE).
BASE_CACHE=${BASE_CACHE:-/var/tmp/iscsi-tgt-bench-base}
BASE_BIN=$BASE_CACHE/iscsi-tgt-$BASE
if [ ! -x "$BASE_BIN" ]; then
    mkdir -p "$BASE_CACHE"
    git -C "$ROOT" worktree add -q --detach "$WORK/base" "$BASE"
    (cd "$WORK/base" && CARGO_TARGET_DIR=$BASE_CACHE/target cargo build --release --quiet --bin iscsi-tgt) ||
        die "cannot build $BASE"
    git -C "$ROOT" worktree remove --force "$WORK/base"
    cp "$BASE_CACHE/target/release/iscsi-tgt" "$BASE_BIN"
fi

# start BIN WRAP... -- ARGS...: the target with its RPC socket at $SOCK.
start() {
    local bin=$1
    shift
    local wrap=()
    while [ "$1" != "--" ]; do wrap+=("$1"); shift; done
    shift
    spawn_target "$SOCK" "$WORK/target.log" "${wrap[@]}" "$bin" --cores 1 --mode poll "$@"
    ram_target "$SOCK" "$IQN" 1024
}

# run NAME PORTAL WRAP... -- BENCH ARGS...: one measurement, printed as a table row.
run() {
    local name=$1 portal=$2
    shift 2
    local wrap=()
    while [ "$1" != "--" ]; do wrap+=("$1"); shift; done
    shift
    local b0 b1 out iops mbps
    b0=$(reactors_busy_ns "$SOCK")
    out=$("${wrap[@]}" taskset -c 0 "$BENCH" --portal "$portal" --target "$IQN" --secs "$SECS" "$@")
    b1=$(reactors_busy_ns "$SOCK")
    iops=$(awk '/^iops/ {print $2}' <<<"$out")
    mbps=$(awk '/^iops/ {print $4}' <<<"$out")
    local us
    us=$(python3 -c "print(f'{($b1 - $b0) / 1000 / max(1, $iops * $SECS):.2f}')")
    local args="$*"
    printf '| %s | %s | %s | %s | %s |\n' "$name" "${args%% --net*}" "$iops" "$mbps" "$us"
}

WORKLOADS=("--bs 4096 --qd 1 --random" "--bs 4096 --qd 32 --random" "--bs 4096 --qd 128 --random" "--bs 131072 --qd 16")

echo "| path | workload | IOPS | MB/s | target busy µs per I/O |"
echo "|---|---|---:|---:|---:|"
for which in base new; do
    bin=$BIN
    [ "$which" = base ] && bin=$BASE_BIN
    start "$bin" env -- --listen "127.0.0.1:$PORT"
    for w in "${WORKLOADS[@]}"; do
        # shellcheck disable=SC2086 # a workload is several arguments
        run "loopback, kernel TCP ($which: $([ "$which" = base ] && echo "$BASE" || git -C "$ROOT" rev-parse --short HEAD))" "127.0.0.1:$PORT" env -- $w
    done
    stop_target
done

# MTU=9000 measures with jumbo frames on the veth (every path alike).
netns_pair "$NS_T" "$NS_I" 1 0
ip -n "$NS_I" addr add 10.79.0.1/24 dev vi

profile() {
    [ -n "${PROFILE:-}" ] || return 0
    local name=$1 portal=$2
    ip netns exec "$NS_I" taskset -c 0 "$BENCH" --portal "$portal" --target "$IQN" --secs 6 --bs 4096 --qd 32 --random >/dev/null &
    local b=$!
    sleep 1
    perf record -q -e cpu-clock -g -p "$TARGET_PID" -o "$WORK/perf-$name.data" -- sleep 4 >/dev/null 2>&1 || true
    wait "$b"
    echo
    echo "profile $name (4 KiB random read QD32), top functions of the target:"
    perf report -i "$WORK/perf-$name.data" --no-children --percent-limit 2 --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -15
}

ip -n "$NS_T" addr add 10.79.0.2/24 dev vt
start "$BIN" ip netns exec "$NS_T" -- --listen 10.79.0.2:3260
for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086
    run "veth, kernel TCP" 10.79.0.2:3260 ip netns exec "$NS_I" -- $w
done
profile kernel 10.79.0.2:3260 >"$WORK/profile-kernel.txt"
stop_target
ip -n "$NS_T" addr del 10.79.0.2/24 dev vt

start "$BIN" ip netns exec "$NS_T" -- --listen 10.79.0.2:3260 --net af_packet:vt --ip 10.79.0.2/24
for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086
    run "veth, userspace TCP on AF_PACKET" 10.79.0.2:3260 ip netns exec "$NS_I" -- $w
done
profile af_packet 10.79.0.2:3260 >"$WORK/profile-af_packet.txt"
stop_target

if [ "${DPDK:-1}" != 0 ]; then
    for drv in af_packet af_xdp; do
        start "$DPDK_BIN" ip netns exec "$NS_T" -- --listen 10.79.0.2:3260 \
            --net "dpdk:net_${drv}0,iface=vt" --ip 10.79.0.2/24 --mem-size 256
        for w in "${WORKLOADS[@]}"; do
            # shellcheck disable=SC2086
            run "veth, userspace TCP on DPDK net_$drv" 10.79.0.2:3260 ip netns exec "$NS_I" -- $w
        done
        profile "dpdk_$drv" 10.79.0.2:3260 >"$WORK/profile-dpdk_$drv.txt"
        stop_target
    done
fi

ip netns exec "$NS_T" sysctl -qw net.ipv4.ip_forward=1
ip -n "$NS_T" addr add 10.79.1.2/24 dev vt
ip -n "$NS_I" addr add 10.79.1.1/24 dev vi
ip -n "$NS_I" route add 10.80.0.0/24 via 10.79.1.2
start "$BIN" ip netns exec "$NS_T" -- --listen 10.80.0.2:3260 --net tap:ibn0 --ip 10.80.0.2/24 --gateway 10.80.0.1
ip -n "$NS_T" addr add 10.80.0.1/24 dev ibn0
ip -n "$NS_T" link set ibn0 up
for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086
    run "veth + routed TAP, userspace TCP" 10.80.0.2:3260 ip netns exec "$NS_I" -- $w
done
stop_target

if [ "${DPDK:-1}" != 0 ]; then
    msock=$WORK/memif.sock
    start "$DPDK_BIN" env -- --listen 10.96.0.2:3260 --mem-size 256 \
        --net "dpdk:net_memif0,role=server,socket=$msock,socket-abstract=no" --ip 10.96.0.2/24
    BENCH_SAVE=$BENCH
    BENCH=$DPDK_TARGET/release/iscsi-bench
    for w in "${WORKLOADS[@]}"; do
        # shellcheck disable=SC2086
        run "memif, userspace TCP on DPDK at both ends" 10.96.0.2:3260 env -- $w \
            --net "dpdk:net_memif0,role=client,socket=$msock,socket-abstract=no" --ip 10.96.0.1/24
    done
    if [ -n "${PROFILE:-}" ]; then
        taskset -c 0 "$BENCH" --portal 10.96.0.2:3260 --target "$IQN" --secs 6 --bs 4096 --qd 32 --random \
            --net "dpdk:net_memif0,role=client,socket=$msock,socket-abstract=no" --ip 10.96.0.1/24 >/dev/null 2>&1 &
        b=$!
        sleep 2
        perf record -q -e cpu-clock -g -p "$TARGET_PID" -o "$WORK/perf-memif.data" -- sleep 3 >/dev/null 2>&1 || true
        wait "$b"
        {
            echo
            echo "profile memif (4 KiB random read QD32), top functions of the target:"
            perf report -i "$WORK/perf-memif.data" --no-children --percent-limit 2 --stdio 2>/dev/null |
                grep -E '^ +[0-9.]+%' | head -15
        } >"$WORK/profile-memif.txt"
    fi
    BENCH=$BENCH_SAVE
    stop_target
fi

cat "$WORK"/profile-*.txt 2>/dev/null || true

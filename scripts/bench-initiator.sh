#!/usr/bin/env bash
# The userspace target on AF_PACKET measured with both of iscsi-bench's networks, in one run:
# the kernel's TCP and the userspace stack's client (--net af_packet), over one veth pair
# between two namespaces; iscsi-bench pinned to core 0, the target's one reactor on core 1 in
# poll mode, a 1 GiB RAM LUN, RPS sending each end's receive work to its own side's core (as
# scripts/bench-net.sh does). Prints a Markdown table: IOPS, MB/s and the target's busy time
# per I/O (reactors/0/busy_ns over the row divided by the I/Os done).
#
# Both stacks on AF_PACKET take frames of at most the MTU, so each veth end has its transmit
# offloads off: a kernel sending through it then segments what a stack gives it (and a stack
# does not ask it to, see af_packet.rs), and no super-frame reaches the other side's ring. The
# first rows are the reference: the kernel's TCP initiator with the target's end offloading,
# as in bench-net.sh.
#   SECS=8 scripts/bench-initiator.sh
#   NETNS_PREFIX=ibi NET=10.81 PORT=3260 set the namespaces' prefix, the first two octets of
#   the addresses and the portal's port (for several runs on one machine).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (namespaces, AF_PACKET)"
SECS=${SECS:-8}
PREFIX=${NETNS_PREFIX:-ibi}
NET=${NET:-10.81}
PORT=${PORT:-3260}
TAG=$$
NS_T=$PREFIX-t-$TAG
NS_I=$PREFIX-i-$TAG
WORK=$(mktemp -d /tmp/iscsi-tgt-bench-initiator.XXXXXX)
SOCK=$WORK/rpc.sock
IQN=iqn.2026-11.org.iscsi-tgt:bench
BENCH=$ROOT/target/release/iscsi-bench
T_IP=$NET.0.2
K_IP=$NET.0.1
U_IP=$NET.0.3
cleanup() {
    stop_target || true
    netns_del "$NS_T" "$NS_I"
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

build_release

netns_pair "$NS_T" "$NS_I" 1 0
# The kernel initiator's address; the userspace one's ($U_IP) is not the kernel's.
ip -n "$NS_I" addr add "$K_IP/24" dev vi

# start: the target on AF_PACKET in its namespace, with its LUN.
start() {
    spawn_target "$SOCK" "$WORK/target.log" ip netns exec "$NS_T" "$BIN" --cores 1 --mode poll \
        --net af_packet:vt --ip "$T_IP/24" --listen "$T_IP:$PORT"
    ram_target "$SOCK" "$IQN" 1024
}

# run NAME BENCH-ARGS...: one measurement, printed as a table row.
run() {
    local name=$1
    shift
    local b0 b1 out iops mbps us
    b0=$(reactors_busy_ns "$SOCK")
    out=$(ip netns exec "$NS_I" taskset -c 0 "$BENCH" --portal "$T_IP:$PORT" --target "$IQN" \
        --secs "$SECS" "$@" 2>&1) || die "iscsi-bench $* failed: $out"
    b1=$(reactors_busy_ns "$SOCK")
    iops=$(awk '/^iops/ {print $2}' <<<"$out")
    mbps=$(awk '/^iops/ {print $4}' <<<"$out")
    us=$(python3 -c "print(f'{($b1 - $b0) / 1000 / max(1, $iops * $SECS):.2f}')")
    local w=$*
    printf '| %s | %s | %s | %s | %s |\n' "$name" "${w%% --net*}" "$iops" "$mbps" "$us"
}

WORKLOADS=("--bs 4096 --qd 1 --random" "--bs 4096 --qd 32 --random" "--bs 131072 --qd 16")
USER=(--net af_packet:vi --ip "$U_IP/24")

echo "| initiator | workload | IOPS | MB/s | target busy µs per I/O |"
echo "|---|---|---:|---:|---:|"
start
for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086 # a workload is several arguments
    run "kernel TCP (target's end offloading)" $w
done
stop_target
# From here on the target's end offloads nothing either (the userspace initiator's ring
# takes no super-frames); the target is started again so that its device sees that.
ip netns exec "$NS_T" ethtool -K vt tx off >/dev/null
start
for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086
    run "kernel TCP" $w
    # shellcheck disable=SC2086
    run "userspace TCP on AF_PACKET" $w "${USER[@]}"
done
stop_target

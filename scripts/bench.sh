#!/usr/bin/env bash
# Side-by-side benchmark: iscsi-perf (libiscsi) against our RAM LUN and against tgtd (backing
# file in /dev/shm) in the same run, each target pinned to core TARGET_CORE and the initiator
# to core INIT_CORE. Prints one table (IOPS, MB/s, and our ratio to tgtd) in Markdown.
#   SECS=10 scripts/bench.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECS=${SECS:-10}
TARGET_CORE=${TARGET_CORE:-0}
INIT_CORE=${INIT_CORE:-1}
MODE=${MODE:-poll}
PORT=13262
TGTD_PORT=13263
IQN=iqn.2026-11.org.iscsi-tgt:bench
TGTD_IQN=iqn.2026-11.org.iscsi-tgt:tgtd
WORK=$(mktemp -d /tmp/iscsi-tgt-bench.XXXXXX)
SOCK=$WORK/rpc.sock
TGTD_PID=
cleanup() {
    stop_target
    if [ -n "$TGTD_PID" ]; then
        # tgtd does not always leave on SIGTERM while it has targets.
        kill "$TGTD_PID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$TGTD_PID" 2>/dev/null || true
        wait "$TGTD_PID" 2>/dev/null || true
    fi
    rm -f /dev/shm/iscsi-tgt-bench.img
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v iscsi-perf >/dev/null && command -v tgtd >/dev/null || "$ROOT/scripts/setup.sh"
build_release

# perf URL QD BLOCKS RANDOM -> "iops mbps initiator_cpu_percent"
perf() {
    local url=$1 qd=$2 blocks=$3 random=$4 args=()
    [ "$random" = 1 ] && args+=(-r)
    local out cpu
    out=$(timeout -s INT $((SECS + 2)) /usr/bin/time -f "CPU %U %S %e" taskset -c "$INIT_CORE" \
        iscsi-perf -m "$qd" -b "$blocks" "${args[@]}" "$url" 2>&1 | tr '\r' '\n' || true)
    cpu=$(echo "$out" | awk '/^CPU / {printf "%.0f", 100 * ($2 + $3) / $4}')
    echo "$(echo "$out" | grep -o 'iops average [0-9]* ([0-9]* MB/s)' | tail -1 |
        sed -E 's/iops average ([0-9]+) \(([0-9]+) MB\/s\)/\1 \2/') ${cpu:-?}"
}

# busy share of our reactor between two readings of reactors/0/{busy,idle}_ns
reactor_ns() { echo "$($RPC -s "$SOCK" get reactors/0/busy_ns) $($RPC -s "$SOCK" get reactors/0/idle_ns)"; }

WORKLOADS=("4 KiB random read QD1:1:8:1" "4 KiB random read QD32:32:8:1" "128 KiB sequential read QD16:16:256:0")
declare -A RES

# measure LABEL URL: every workload against one target, results into RES[LABEL:i]; for our
# target also the share of time its reactor was busy (RES[busy:i]).
measure() {
    local label=$1 url=$2 i=0 before after
    for w in "${WORKLOADS[@]}"; do
        IFS=: read -r _ qd blocks random <<<"$w"
        [ "$label" = ours ] && before=$(reactor_ns)
        RES[$label:$i]=$(perf "$url" "$qd" "$blocks" "$random")
        if [ "$label" = ours ]; then
            after=$(reactor_ns)
            RES[busy:$i]=$(python3 -c "b0,i0,b1,i1=map(int,'$before $after'.split()); print(round(100*(b1-b0)/max(b1-b0+i1-i0,1)))")
        fi
        i=$((i + 1))
    done
}

# The targets take turns on TARGET_CORE, so neither competes with the other for it (a
# polling reactor keeps its core busy even when idle).
truncate -s 1G /dev/shm/iscsi-tgt-bench.img
dd if=/dev/urandom of=/dev/shm/iscsi-tgt-bench.img bs=1M count=1024 conv=notrunc status=none

# Our target, its RAM LUN filled with the same data so reads touch real memory.
start_target "$PORT" "$SOCK" "$WORK/target.log" --cores "$TARGET_CORE" --mode "$MODE"
configure_default "$SOCK" "$IQN" 1024
ours="iscsi://127.0.0.1:$PORT/$IQN/0"
qemu-img convert -n -f raw -O raw /dev/shm/iscsi-tgt-bench.img "$ours" || die "filling our LUN failed"
measure ours "$ours"
kill -0 "$TARGET_PID" || die "our target died during the benchmark"
stop_target

# tgtd with its backing store in /dev/shm (tmpfs: RAM, as ours).
pgrep -x tgtd >/dev/null && die "a tgtd is already running; stop it first"
taskset -c "$TARGET_CORE" tgtd -f --iscsi portal=127.0.0.1:$TGTD_PORT >"$WORK/tgtd.log" 2>&1 &
TGTD_PID=$!
for _ in $(seq 1 50); do tgtadm --lld iscsi --mode target --op show >/dev/null 2>&1 && break; sleep 0.1; done
tgtadm --lld iscsi --mode target --op new --tid 1 --targetname "$TGTD_IQN"
tgtadm --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store /dev/shm/iscsi-tgt-bench.img
tgtadm --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
measure tgtd "iscsi://127.0.0.1:$TGTD_PORT/$TGTD_IQN/1"

echo "| workload | iscsi-tgt IOPS | iscsi-tgt MB/s | tgtd IOPS | tgtd MB/s | ratio | our reactor busy | initiator CPU (ours / tgtd) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
i=0
for w in "${WORKLOADS[@]}"; do
    name=${w%%:*}
    read -r oi om oc <<<"${RES[ours:$i]}"
    read -r ti tm tc <<<"${RES[tgtd:$i]}"
    ratio=$(python3 -c "print(f'{${oi:-0}/max(${ti:-0},1):.2f}')")
    echo "| $name | ${oi:-?} | ${om:-?} | ${ti:-?} | ${tm:-?} | ${ratio}× | ${RES[busy:$i]}% | ${oc:-?}% / ${tc:-?}% |"
    i=$((i + 1))
done

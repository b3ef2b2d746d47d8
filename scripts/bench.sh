#!/usr/bin/env bash
# Side-by-side benchmark of iscsi-tgt against tgtd in one run, the same initiators for both:
# libiscsi's iscsi-perf for reads, `qemu-img bench -w` for writes. Each target is pinned to
# TARGET_CORE in turn (so neither competes with the other; a polling reactor keeps its core busy
# even when idle) and the initiator to INIT_CORE. Our target serves a RAM LUN (vdisk_ramio) and,
# when the handler exists, a vdisk_fileio LUN on a tmpfs file; tgtd serves a tmpfs file.
# Prints one Markdown table.
#   SECS=10 scripts/bench.sh            READS=0 or WRITES=0 leave a half out
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECS=${SECS:-10}
TARGET_CORE=${TARGET_CORE:-0}
INIT_CORE=${INIT_CORE:-1}
MODE=${MODE:-poll}
READS=${READS:-1}
WRITES=${WRITES:-1}
PORT=13262
TGTD_PORT=13263
IQN=iqn.2026-11.org.iscsi-tgt:bench
TGTD_IQN=iqn.2026-11.org.iscsi-tgt:tgtd
WORK=$(mktemp -d /tmp/iscsi-tgt-bench.XXXXXX)
SOCK=$WORK/rpc.sock
SHM_OURS=/dev/shm/iscsi-tgt-bench-ours.img
SHM_TGTD=/dev/shm/iscsi-tgt-bench-tgtd.img
SIZE_MB=1024
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
    rm -f "$SHM_OURS" "$SHM_TGTD"
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v iscsi-perf >/dev/null && command -v tgtd >/dev/null || "$ROOT/scripts/setup.sh"
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || "$ROOT/scripts/setup.sh"
build_release
pgrep -x tgtd >/dev/null && die "a tgtd is already running; stop it first"

# Workloads: name:kind:queue depth:bytes per I/O:random
WORKLOADS=()
if [ "$READS" = 1 ]; then
    WORKLOADS+=("4 KiB random read QD1:read:1:4096:1" "4 KiB random read QD32:read:32:4096:1"
        "128 KiB sequential read QD16:read:16:131072:0")
fi
if [ "$WRITES" = 1 ]; then
    WORKLOADS+=("4 KiB sequential write QD1:write:1:4096:0" "4 KiB sequential write QD32:write:32:4096:0"
        "128 KiB sequential write QD16:write:16:131072:0")
fi
declare -A RES

# run_read URL QD BYTES RANDOM -> "iops mbps initiator_cpu_percent"
run_read() {
    local url=$1 qd=$2 bytes=$3 random=$4 args=() out cpu
    [ "$random" = 1 ] && args+=(-r)
    out=$(timeout -s INT $((SECS + 2)) /usr/bin/time -f "CPU %U %S %e" taskset -c "$INIT_CORE" \
        iscsi-perf -m "$qd" -b $((bytes / 512)) "${args[@]}" "$url" 2>&1 | tr '\r' '\n' || true)
    cpu=$(echo "$out" | awk '/^CPU / {printf "%.0f", 100 * ($2 + $3) / $4}')
    echo "$(echo "$out" | grep -o 'iops average [0-9]* ([0-9]* MB/s)' | tail -1 |
        sed -E 's/iops average ([0-9]+) \(([0-9]+) MB\/s\)/\1 \2/') ${cpu:-?}"
}

# run_write URL QD BYTES -> "iops mbps initiator_cpu_percent": sequential writes over the LUN
# (wrapping), as many as take about SECS seconds (a short calibration run sizes it).
run_write() {
    local url=$1 qd=$2 bytes=$3 count out secs cpu span
    span=$((SIZE_MB * 1024 * 1024 / bytes))
    bench() {
        taskset -c "$INIT_CORE" /usr/bin/time -f "CPU %U %S %e" qemu-img bench -w -c "$1" -d "$qd" \
            -s "$bytes" -S "$bytes" -f raw -t none -n "$url" 2>&1
    }
    out=$(bench $((qd * 2000)))
    secs=$(echo "$out" | sed -nE 's/Run completed in ([0-9.]+) seconds./\1/p')
    count=$(python3 -c "print(max(int($qd * 2000 * $SECS / max(${secs:-1}, 0.001)), 1000))")
    # qemu-img bench steps past the end of the image otherwise.
    [ "$count" -gt "$span" ] && count=$span
    out=$(bench "$count")
    secs=$(echo "$out" | sed -nE 's/Run completed in ([0-9.]+) seconds./\1/p')
    cpu=$(echo "$out" | awk '/^CPU / {printf "%.0f", 100 * ($2 + $3) / $4}')
    python3 -c "s=${secs:-0}; n=$count; b=$bytes; print(f'{int(n/s) if s else 0} {int(n*b/s/1e6) if s else 0} ${cpu:-?}')"
}

reactor_ns() { echo "$($RPC -s "$SOCK" get reactors/0/busy_ns) $($RPC -s "$SOCK" get reactors/0/idle_ns)"; }

# measure LABEL URL: every workload against one LUN, results into RES[LABEL:i]; for our target
# also the share of time its reactor was busy (RES[LABEL-busy:i]).
measure() {
    local label=$1 url=$2 i=0 before after
    for w in "${WORKLOADS[@]}"; do
        IFS=: read -r _ kind qd bytes random <<<"$w"
        [ -n "${TARGET_PID:-}" ] && before=$(reactor_ns)
        if [ "$kind" = read ]; then
            RES[$label:$i]=$(run_read "$url" "$qd" "$bytes" "$random")
        else
            RES[$label:$i]=$(run_write "$url" "$qd" "$bytes")
        fi
        if [ -n "${TARGET_PID:-}" ]; then
            after=$(reactor_ns)
            RES[$label-busy:$i]=$(python3 -c "b0,i0,b1,i1=map(int,'$before $after'.split()); print(round(100*(b1-b0)/max(b1-b0+i1-i0,1)))")
        fi
        i=$((i + 1))
    done
}

# The same random data everywhere, so reads touch real memory.
dd if=/dev/urandom of="$SHM_TGTD" bs=1M count=$SIZE_MB status=none
cp "$SHM_TGTD" "$SHM_OURS"

# Our target: RAM LUN 0, and a fileio LUN 1 on tmpfs when the handler exists.
start_target "$PORT" "$SOCK" "$WORK/target.log" --cores "$TARGET_CORE" --mode "$MODE"
rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device ram0 size_mb=$SIZE_MB"
rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add ram0 0"
LABELS=(ram)
if $RPC -s "$SOCK" ls handlers/vdisk_fileio >/dev/null 2>&1; then
    rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt "add_device file0 filename=$SHM_OURS"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add file0 1"
    LABELS+=(fileio)
fi
rpc "$SOCK" set "targets/iscsi/$IQN/enabled" 1
rpc "$SOCK" set targets/iscsi/enabled 1
ours="iscsi://127.0.0.1:$PORT/$IQN"
qemu-img convert -n -f raw -O raw "$SHM_TGTD" "$ours/0" || die "filling our RAM LUN failed"
measure ram "$ours/0"
[ "${#LABELS[@]}" -gt 1 ] && measure fileio "$ours/1"
kill -0 "$TARGET_PID" || die "our target died during the benchmark"
stop_target

# tgtd with its backing store on tmpfs, as ours.
taskset -c "$TARGET_CORE" tgtd -f --iscsi portal=127.0.0.1:$TGTD_PORT >"$WORK/tgtd.log" 2>&1 &
TGTD_PID=$!
for _ in $(seq 1 50); do tgtadm --lld iscsi --mode target --op show >/dev/null 2>&1 && break; sleep 0.1; done
tgtadm --lld iscsi --mode target --op new --tid 1 --targetname "$TGTD_IQN"
tgtadm --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$SHM_TGTD"
tgtadm --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
measure tgtd "iscsi://127.0.0.1:$TGTD_PORT/$TGTD_IQN/1"

header="| workload | tgtd IOPS (MB/s)"
rule="|---|---:"
for l in "${LABELS[@]}"; do
    header+=" | iscsi-tgt $l IOPS (MB/s) | ratio | reactor busy"
    rule+="|---:|---:|---:"
done
echo "$header | initiator CPU (tgtd / ${LABELS[*]}) |"
echo "$rule|---:|"
i=0
for w in "${WORKLOADS[@]}"; do
    read -r ti tm tc <<<"${RES[tgtd:$i]}"
    line="| ${w%%:*} | ${ti:-?} (${tm:-?})"
    cpus="${tc:-?}%"
    for l in "${LABELS[@]}"; do
        read -r oi om oc <<<"${RES[$l:$i]}"
        ratio=$(python3 -c "print(f'{${oi:-0}/max(${ti:-0},1):.2f}')")
        line+=" | ${oi:-?} (${om:-?}) | ${ratio}× | ${RES[$l-busy:$i]}%"
        cpus+=" / ${oc:-?}%"
    done
    echo "$line | $cpus |"
    i=$((i + 1))
done

#!/usr/bin/env bash
# The cost of CRC32C digests: 128 KiB sequential reads (and writes) at QD16 from a RAM LUN with
# HeaderDigest and DataDigest off and on, side by side in one run, with the crate's own
# initiator (iscsi-bench; libiscsi does no data digests). Target on TARGET_CORE, initiator on
# INIT_CORE. Prints a Markdown table with the on/off ratio.
#   SECS=10 scripts/bench-digests.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
TARGET_CORE=${TARGET_CORE:-0}
INIT_CORE=${INIT_CORE:-1}
PORT=13264
IQN=iqn.2026-11.org.iscsi-tgt:digests
WORK=$(mktemp -d /tmp/iscsi-tgt-bench-dig.XXXXXX)
SOCK=$WORK/rpc.sock
trap 'stop_target; rm -rf "$WORK"' EXIT

build_release
BENCH=$ROOT/target/release/iscsi-bench
start_target "$PORT" "$SOCK" "$WORK/target.log" --cores "$TARGET_CORE" --mode poll
rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device ram0 size_mb=1024"
rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add ram0 0"
rpc "$SOCK" set "targets/iscsi/$IQN/HeaderDigest" "CRC32C,None"
rpc "$SOCK" set "targets/iscsi/$IQN/DataDigest" "CRC32C,None"
rpc "$SOCK" set "targets/iscsi/$IQN/enabled" 1
rpc "$SOCK" set targets/iscsi/enabled 1

# one KIND DIGESTS -> MB/s
one() {
    local args=(--portal "127.0.0.1:$PORT" --target "$IQN" --bs 131072 --qd 16 --secs "$SECS")
    [ "$1" = write ] && args+=(--write)
    [ "$2" = on ] && args+=(--digests)
    taskset -c "$INIT_CORE" "$BENCH" "${args[@]}" | awk '/^iops/ {print $4}'
}

echo "| workload | digests off MB/s | digests on MB/s | on / off |"
echo "|---|---:|---:|---:|"
for kind in read write; do
    off=0
    on=0
    for _ in $(seq 1 "$ROUNDS"); do
        # Alternate so that drift on a shared machine hits both alike.
        off=$((off + $(one "$kind" off)))
        on=$((on + $(one "$kind" on)))
    done
    off=$((off / ROUNDS))
    on=$((on / ROUNDS))
    ratio=$(python3 -c "print(f'{$on / max($off, 1):.2f}')")
    echo "| 128 KiB sequential $kind QD16 | $off | $on | $ratio |"
done
kill -0 "$TARGET_PID" || die "the target died during the benchmark"

#!/usr/bin/env bash
# The target against real initiators: libiscsi's tools (iscsi-ls, iscsi-inq,
# iscsi-readcapacity16) and qemu-img's iscsi:// driver. Configures the target only through
# rpc.py. Fails loudly at the first check that does not hold.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PORT=${PORT:-13260}
IQN=iqn.2026-11.org.iscsi-tgt:peers
WORK=$(mktemp -d /tmp/iscsi-tgt-peers.XXXXXX)
SOCK=$WORK/rpc.sock
trap 'stop_target; rm -rf "$WORK"' EXIT

[ -x "$BIN" ] || build_release
start_target "$PORT" "$SOCK" "$WORK/target.log" --cores 0
RAM_MB=256
configure_default "$SOCK" "$IQN" "$RAM_MB"
URL=iscsi://127.0.0.1:$PORT
pass=0

check() { pass=$((pass + 1)); echo "ok $pass - $*"; }

# Discovery: the target and both LUNs.
out=$(iscsi-ls -s "$URL") || die "iscsi-ls failed: $out"
echo "$out" | grep -q "Target:$IQN" || die "iscsi-ls does not list $IQN: $out"
echo "$out" | grep -q "Lun:0" || die "iscsi-ls does not list LUN 0: $out"
echo "$out" | grep -q "Lun:1" || die "iscsi-ls does not list LUN 1: $out"
check "iscsi-ls lists the target and LUNs 0 and 1"

out=$(iscsi-inq "$URL/$IQN/0") || die "iscsi-inq failed: $out"
echo "$out" | grep -qi "Peripheral Device Type:.*0\|DIRECT_ACCESS\|Direct" || die "iscsi-inq: not a disk: $out"
check "iscsi-inq answers for LUN 0"
out=$(iscsi-inq -e 1 -c 0x80 "$URL/$IQN/0") || die "iscsi-inq VPD 0x80 failed: $out"
check "iscsi-inq reads the unit serial number page"

out=$(iscsi-readcapacity16 "$URL/$IQN/0") || die "iscsi-readcapacity16 failed: $out"
blocks=$((RAM_MB * 1024 * 1024 / 512))
echo "$out" | grep -q "LOGICAL BLOCK LENGTH IN BYTES:512" || die "readcapacity16: block length: $out"
echo "$out" | grep -q "RETURNED LOGICAL BLOCK ADDRESS:$((blocks - 1))" || die "readcapacity16: size: $out"
check "iscsi-readcapacity16 reports $blocks blocks of 512 bytes"

# Data integrity through qemu-img, under several negotiations on the target side.
head -c $((RAM_MB * 1024 * 1024)) /dev/urandom > "$WORK/in.raw"
round_trip() {
    local what=$1
    rm -f "$WORK/out.raw"
    qemu-img convert -n -f raw -O raw "$WORK/in.raw" "$URL/$IQN/0" || die "qemu-img write ($what) failed"
    qemu-img convert -f raw -O raw "$URL/$IQN/0" "$WORK/out.raw" || die "qemu-img read ($what) failed"
    cmp "$WORK/in.raw" "$WORK/out.raw" || die "data read back differs ($what)"
    check "256 MiB written and read back identical with qemu-img ($what)"
    head -c $((RAM_MB * 1024 * 1024)) /dev/urandom > "$WORK/in.raw"
}
T=targets/iscsi/$IQN
round_trip "defaults: ImmediateData=Yes InitialR2T=No MaxRecvDataSegmentLength=1048576"
rpc "$SOCK" set "$T/ImmediateData" No
round_trip "ImmediateData=No"
rpc "$SOCK" set "$T/InitialR2T" Yes
round_trip "ImmediateData=No InitialR2T=Yes"
rpc "$SOCK" set "$T/ImmediateData" Yes
round_trip "ImmediateData=Yes InitialR2T=Yes"
rpc "$SOCK" set "$T/InitialR2T" :default:
for mrdsl in 8192 262144; do
    rpc "$SOCK" set "$T/MaxRecvDataSegmentLength" "$mrdsl"
    rpc "$SOCK" set "$T/MaxXmitDataSegmentLength" "$mrdsl"
    round_trip "MaxRecvDataSegmentLength=$mrdsl"
    rpc "$SOCK" set "$T/ImmediateData" No
    round_trip "MaxRecvDataSegmentLength=$mrdsl ImmediateData=No"
    rpc "$SOCK" set "$T/ImmediateData" Yes
done

# The null LUN: reads are zeros.
qemu-img convert -f raw -O raw "$URL/$IQN/1" "$WORK/null.raw" || die "qemu-img read of the null LUN failed"
[ "$(stat -c %s "$WORK/null.raw")" -eq $((1024 * 1024 * 1024)) ] || die "null LUN size is not 1 GiB"
cmp -n $((16 * 1024 * 1024)) "$WORK/null.raw" /dev/zero || die "null LUN does not read zeros"
check "the null LUN reads 1 GiB of zeros"

kill -0 "$TARGET_PID" || die "target died"
stop_target
grep -q "panicked" "$WORK/target.log" && die "target log shows a panic"
echo "$pass passed, 0 failed"

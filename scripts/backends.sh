#!/usr/bin/env bash
# The storage backends end to end, through qemu-img's iscsi:// driver and the release binary:
#   - a random pattern written and read back identical on vdisk_fileio (buffered and
#     o_direct), vdisk_blockio on a loop device and vdisk_ramio, each with 512- and
#     4096-byte blocks (512 MiB each; 128 MiB with QUICK=1), by qemu-img and then by the
#     project's own initiator (iscsi-bench --verify) at queue depth 32, which also checks what
#     qemu-img wrote;
#   - vdisk_blockio's writable size: a smaller one is what initiators see, a larger one is
#     refused;
#   - durability: data written with FUA (cache=writethrough) and with SYNCHRONIZE CACHE
#     (cache=none) survives kill -9 of the target and a restart from its saved config;
#   - vcdrom: an ISO image reads back identical; ejected, the LUN has no medium; inserted
#     again, it reads back again.
# Needs root (losetup). Configures the target only through rpc.py. Fails loudly at the first
# check that does not hold.
#
# O_DIRECT needs buffers aligned to the backing's DIO alignment; the target's buffer pool hands
# out 4096-aligned chunks, so a misaligned buffer is a failure (STRICT_DIRECT=0 reports it as
# SKIP instead, for diagnosis).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PORT=${PORT:-13270}
IQN=iqn.2026-11.org.iscsi-tgt:backends
WORK=$(mktemp -d /var/tmp/iscsi-tgt-backends.XXXXXX)
SOCK=$WORK/rpc.sock
LOOP=
MB=512
[ "${QUICK:-0}" = 1 ] && MB=128
cleanup() {
    stop_target || true
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || die "needs root (losetup)"
for tool in qemu-img genisoimage losetup cmp; do
    command -v "$tool" >/dev/null || die "$tool is not installed (run scripts/setup.sh)"
done
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || die "qemu-img lacks iscsi:// (run scripts/setup.sh)"
[ -x "$BIN" ] || build_release
BENCH=$(dirname "$BIN")/iscsi-bench
[ -x "$BENCH" ] || build_release

pass=0
skip=0
check() { pass=$((pass + 1)); echo "ok $((pass + skip)) - $*"; }
skipped() { skip=$((skip + 1)); echo "ok $((pass + skip)) - # SKIP $*"; }

URL=iscsi://127.0.0.1:$PORT
T=targets/iscsi/$IQN
LOG=$WORK/target.log
start_target "$PORT" "$SOCK" "$LOG" --cores 0
rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
rpc "$SOCK" set "$T/enabled" 1
rpc "$SOCK" set targets/iscsi/enabled 1

head -c $((MB << 20)) /dev/urandom >"$WORK/in.raw" || die "cannot make the test pattern"

# export DEV: the device as LUN 0; unexport DEV: LUN 0 and the device removed again.
export_lun() { rpc "$SOCK" mgmt "$T/luns/mgmt" "add $1 0"; }
unexport() {
    rpc "$SOCK" mgmt "$T/luns/mgmt" "del 0"
    rpc "$SOCK" mgmt "handlers/$2/mgmt" "del_device $1"
}

# misaligned N: whether the target logged an O_DIRECT alignment failure after line N.
misaligned() { tail -n +"$(($1 + 1))" "$LOG" | grep -q "not aligned for O_DIRECT"; }

# round_trip WHAT HANDLER DEV PARAMS: create, export, write the pattern, read it back, cmp.
# Returns 2 when the I/O failed because buffers were not aligned for O_DIRECT.
round_trip() {
    local what=$1 handler=$2 dev=$3 params=$4
    local mark
    mark=$(wc -l <"$LOG")
    rpc "$SOCK" mgmt "handlers/$handler/mgmt" "add_device $dev $params"
    export_lun "$dev"
    rm -f "$WORK/out.raw"
    local ok=1
    if ! qemu-img convert -n -f raw -O raw "$WORK/in.raw" "$URL/$IQN/0" 2>"$WORK/qemu.err"; then
        ok=0
    elif ! qemu-img convert -f raw -O raw "$URL/$IQN/0" "$WORK/out.raw" 2>"$WORK/qemu.err"; then
        ok=0
    fi
    if [ "$ok" = 0 ]; then
        unexport "$dev" "$handler"
        if misaligned "$mark" && [ "${STRICT_DIRECT:-1}" != 1 ]; then
            return 2
        fi
        cat "$WORK/qemu.err" >&2
        die "qemu-img failed ($what)"
    fi
    cmp "$WORK/in.raw" "$WORK/out.raw" || die "data read back differs ($what)"
    rm -f "$WORK/out.raw"
    # The project's own initiator at queue depth 32: it reads what qemu-img wrote and
    # compares, then writes its own pattern over the whole LUN and reads it back.
    "$BENCH" --portal "127.0.0.1:$PORT" --target "$IQN" --verify --expect "$WORK/in.raw" \
        --qd 32 --bs 65536 >"$WORK/verify.out" 2>&1 ||
        { cat "$WORK/verify.out" >&2; die "iscsi-bench --verify failed ($what)"; }
    unexport "$dev" "$handler"
}

result() {
    local rc=$1 what=$2
    case $rc in
    0) check "$MB MiB written and read back identical (qemu-img; own initiator at QD32): $what" ;;
    2) skipped "$what: buffers not aligned for O_DIRECT (see the target log)" ;;
    *) die "unexpected result $rc ($what)" ;;
    esac
}

# A loop device over a file, for vdisk_blockio.
truncate -s $((MB << 20)) "$WORK/loop.img"
LOOP=$(losetup -f --show "$WORK/loop.img") || die "losetup failed"
[ -b "$LOOP" ] || die "losetup gave no block device"

for bs in 512 4096; do
    rc=0
    round_trip "vdisk_fileio buffered, blocksize $bs" vdisk_fileio "fb$bs" \
        "filename=$WORK/fb$bs.img; size_mb=$MB; blocksize=$bs" || rc=$?
    result "$rc" "vdisk_fileio buffered, blocksize $bs"
    rm -f "$WORK/fb$bs.img"

    rc=0
    round_trip "vdisk_fileio o_direct, blocksize $bs" vdisk_fileio "fd$bs" \
        "filename=$WORK/fd$bs.img; size_mb=$MB; blocksize=$bs; o_direct=1" || rc=$?
    result "$rc" "vdisk_fileio o_direct, blocksize $bs"
    rm -f "$WORK/fd$bs.img"

    rc=0
    round_trip "vdisk_blockio on $LOOP, blocksize $bs" vdisk_blockio "bl$bs" \
        "filename=$LOOP; blocksize=$bs" || rc=$?
    result "$rc" "vdisk_blockio on a loop device, blocksize $bs"

    rc=0
    round_trip "vdisk_ramio, blocksize $bs" vdisk_ramio "ram$bs" "size_mb=$MB; blocksize=$bs" || rc=$?
    result "$rc" "vdisk_ramio, blocksize $bs"
done
# blockio's writable size (SCST): smaller than the device is what initiators then see; larger
# than the device is refused.
rpc "$SOCK" mgmt handlers/vdisk_blockio/mgmt "add_device blsz filename=$LOOP"
export_lun blsz
half=$((MB << 19))
rpc "$SOCK" set devices/blsz/size "$half"
cap=$(iscsi-readcapacity16 "$URL/$IQN/0") || die "iscsi-readcapacity16 failed: $cap"
grep -q "^Total size:$half\$" <<<"$cap" || die "blockio size $half not reported: $cap"
if $RPC -s "$SOCK" set devices/blsz/size $((MB << 21)) >/dev/null 2>&1; then
    die "a blockio size beyond the device was accepted"
fi
unexport blsz vdisk_blockio
check "vdisk_blockio: a smaller size is what the initiator sees; one beyond the device is refused"
losetup -d "$LOOP" || die "losetup -d $LOOP failed"
LOOP=

# Durability: a fileio device that stays exported across a kill -9 and a restart.
DMB=$((MB / 4))
rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt "add_device dur filename=$WORK/dur.img; size_mb=$DMB"
export_lun dur
rpc "$SOCK" save_config >"$WORK/config.json"
durable() {
    local what=$1 cache=$2
    head -c $((DMB << 20)) /dev/urandom >"$WORK/dur.in" || die "cannot make the pattern"
    qemu-img convert -n -t "$cache" -f raw -O raw "$WORK/dur.in" "$URL/$IQN/0" ||
        die "qemu-img write with cache=$cache failed"
    kill -9 "$TARGET_PID"
    wait "$TARGET_PID" 2>/dev/null || true
    TARGET_PID=
    cmp "$WORK/dur.in" "$WORK/dur.img" || die "the backing file lacks data written with $what"
    start_target "$PORT" "$SOCK" "$LOG.2" --cores 0 --config "$WORK/config.json"
    cat "$LOG.2" >>"$LOG"
    rm -f "$WORK/dur.out"
    qemu-img convert -f raw -O raw "$URL/$IQN/0" "$WORK/dur.out" || die "read after restart failed"
    cmp "$WORK/dur.in" "$WORK/dur.out" || die "data written with $what differs after kill -9 and restart"
    check "data written with $what survives kill -9 and a restart from the saved config"
}
durable "FUA (cache=writethrough)" writethrough
durable "SYNCHRONIZE CACHE (cache=none)" none
unexport dur vdisk_fileio

# vcdrom: an ISO image, ejected and inserted through rpc.py.
mkdir -p "$WORK/iso"
head -c $((8 << 20)) /dev/urandom >"$WORK/iso/data.bin"
echo "iscsi-tgt vcdrom check" >"$WORK/iso/README"
genisoimage -quiet -R -o "$WORK/cd.iso" "$WORK/iso" || die "genisoimage failed"
rpc "$SOCK" mgmt handlers/vcdrom/mgmt "add_device cd0"
[ "$(rpc "$SOCK" get devices/cd0/type)" = "5 - CD-ROM device" ] || die "vcdrom type is not 5"
rpc "$SOCK" set devices/cd0/filename "$WORK/cd.iso"
export_lun cd0
read_cd() {
    rm -f "$WORK/cd.out"
    qemu-img convert -f raw -O raw "$URL/$IQN/0" "$WORK/cd.out" 2>"$WORK/qemu.err"
}
read_cd || { cat "$WORK/qemu.err" >&2; die "reading the CD failed"; }
cmp "$WORK/cd.iso" "$WORK/cd.out" || die "the CD reads back different from the ISO"
check "vcdrom: the ISO image reads back identical"
if qemu-img convert -n -f raw -O raw "$WORK/cd.out" "$URL/$IQN/0" 2>/dev/null; then
    die "writing to the CD succeeded"
fi
check "vcdrom: writes are refused"
rpc "$SOCK" set devices/cd0/filename ""
[ -z "$(rpc "$SOCK" get devices/cd0/filename)" ] || die "filename not empty after eject"
[ "$(rpc "$SOCK" get devices/cd0/size)" = 0 ] || die "an empty drive reports a size"
if read_cd; then
    die "reading an ejected CD succeeded"
fi
check "vcdrom: ejected, the LUN has no medium and reads fail"
rpc "$SOCK" set devices/cd0/filename "$WORK/cd.iso"
read_cd || { cat "$WORK/qemu.err" >&2; die "reading the CD after insert failed"; }
cmp "$WORK/cd.iso" "$WORK/cd.out" || die "the CD reads back different after insert"
check "vcdrom: inserted again, it reads back identical"
if $RPC -s "$SOCK" mgmt handlers/vcdrom/mgmt "del_device cd0" 2>/dev/null; then
    die "del_device of an exported device succeeded"
fi
check "del_device of an exported device is refused"
unexport cd0 vcdrom

# Errors name their cause.
err=$($RPC -s "$SOCK" mgmt handlers/vdisk_fileio/mgmt "add_device bad filename=$WORK/missing.img" 2>&1) &&
    die "add_device on a missing file succeeded"
echo "$err" | grep -q "No such file" || die "missing-file error does not say why: $err"
truncate -s 1000 "$WORK/odd.img"
err=$($RPC -s "$SOCK" mgmt handlers/vdisk_fileio/mgmt "add_device bad filename=$WORK/odd.img" 2>&1) &&
    die "add_device on a 1000-byte file succeeded"
echo "$err" | grep -q "multiple of the block size" || die "size error does not say why: $err"
check "add_device errors name their cause"

kill -0 "$TARGET_PID" || die "target died"
stop_target
grep -q "panicked" "$LOG" && die "target log shows a panic"
echo "$pass passed, $skip skipped, 0 failed"

#!/usr/bin/env bash
# libiscsi's conformance suite (iscsi-test-cu, the suite SCST, LIO and SPDK are tested with)
# against each backend, configured through rpc.py only: a RAM LUN (every suite), a thin
# vdisk_fileio LUN (every suite), the same with 4 KiB physical blocks (the provisioning suites),
# vdisk_blockio on a loop device (every suite), a vcdrom (the suites that apply to a CD), a
# read-only fileio LUN (the ReadOnly suite) and a removable fileio disk (the NoMedia,
# PreventAllow and StartStopUnit suites). Scores each log with scripts/cu-score.py (checked
# first by scripts/cu-score-test.sh), writes docs/CONFORMANCE.md with a column per backend, and
# fails if a suite that must be clean on a backend has a failed or warned test, if a log is
# incomplete, or if the target crashed or stopped answering.
#   CU_BACKENDS="ram fileio" scripts/conformance.sh      CU_TESTS=SBC.Read10 for one suite
#   CU_KEEP=1 keeps the logs (the run says where)
#   every skip must match a reason in SKIP_REASONS (below) or the run fails; CU_ENFORCE_SKIPS=0
#   only lists the unexplained ones
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PORT=${PORT:-13261}
IQN=iqn.2026-11.org.iscsi-tgt:conformance
WORK=$(mktemp -d /tmp/iscsi-tgt-cu.XXXXXX)
SOCK=$WORK/rpc.sock
OUT=${CU_OUT:-$ROOT/docs/CONFORMANCE.md}
SCORE=$ROOT/scripts/cu-score.py
LOOP=
trap 'stop_target; [ -n "$LOOP" ] && losetup -d "$LOOP"; if [ -n "${CU_KEEP:-}" ]; then echo "conformance: logs kept in $WORK"; else rm -rf "$WORK"; fi' EXIT

"$ROOT/scripts/cu-score-test.sh"
command -v iscsi-test-cu >/dev/null || "$ROOT/scripts/setup.sh"
[ -x "$BIN" ] || build_release

# Suites that must be clean on the LUNs that run only some suites (the RAM, thin fileio and
# blockio LUNs run them all, and all must be clean there).
BASE='Inquiry|Read6|Read10|Read12|Read16|Write10|Write12|Write16|ReadCapacity10|ReadCapacity16|TestUnitReady|ReportLuns|ModeSense6|iSCSI[A-Za-z]*'
THIN='Unmap|WriteSame10|WriteSame16|GetLBAStatus'

has_handler() { $RPC -s "$SOCK" ls "handlers/$1" >/dev/null 2>&1; }

# setup_BACKEND: configures LUN 0 of $IQN (target running); sets TESTS, MUST and DESC.
setup_ram() {
    rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device ram0 size_mb=128"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add ram0 0"
    TESTS=${CU_TESTS:-ALL}
    CRED=""
    # Every suite: the RAM, thin fileio and blockio LUNs are where the whole suite runs.
    MUST="."
    DESC="\`vdisk_ramio\`, 128 MiB, 512-byte blocks"
}
setup_fileio() {
    truncate -s 128M "$WORK/fileio.img"
    rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt \
        "add_device file0 filename=$WORK/fileio.img; thin_provisioned=1; lb_per_pb_exp=0"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add file0 0"
    TESTS=${CU_TESTS:-ALL}
    CRED=""
    # Every suite: the RAM, thin fileio and blockio LUNs are where the whole suite runs.
    MUST="."
    DESC="\`vdisk_fileio\`, thin_provisioned=1, a 128 MiB sparse file, 512-byte blocks, one logical block per physical block (lb_per_pb_exp=0)"
}
# The same with the file system's 4 KiB blocks reported as physical blocks (lb_per_pb_exp=1,
# SCST's default): READ CAPACITY 16 says 8 logical blocks per physical block, which the
# unaligned-UNMAP and Data-Out-size tests need, and GET LBA STATUS is asked about LBAs inside
# a physical block (GetLBAStatus.UnmapSingle: see the accepted failures below).
setup_physblock() {
    truncate -s 128M "$WORK/pb.img"
    local pb
    pb=$(stat -c %o "$WORK/pb.img")
    [ "$pb" -ge 1024 ] || die "$WORK has $pb-byte blocks: no physical block above 512 bytes to report"
    rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt \
        "add_device pb0 filename=$WORK/pb.img; thin_provisioned=1; lb_per_pb_exp=1"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add pb0 0"
    TESTS=${CU_TESTS:-SCSI.Unmap,SCSI.WriteSame10,SCSI.WriteSame16,SCSI.GetLBAStatus,SCSI.CompareAndWrite,SCSI.ReadCapacity16}
    CRED=""
    MUST="^($THIN|CompareAndWrite|ReadCapacity16)\\."
    DESC="\`vdisk_fileio\`, thin, 512-byte logical blocks in $pb-byte physical blocks (lb_per_pb_exp=1)"
}
setup_readonly() {
    truncate -s 64M "$WORK/ro.img"
    rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt \
        "add_device ro0 filename=$WORK/ro.img; thin_provisioned=1; read_only=1"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add ro0 0"
    TESTS=${CU_TESTS:-SCSI.ReadOnly}
    CRED=""
    MUST='^ReadOnly\.'
    DESC="\`vdisk_fileio\`, read_only=1, thin: the ReadOnly suite"
}
# vdisk_blockio over a loop device (needs root), thin: UNMAP and WRITE SAME with UNMAP go to
# BLKDISCARD. GET LBA STATUS reports a block device as mapped throughout (provisioning status
# 0, "mapped or unknown": the kernel cannot say what a device has deallocated), so its
# GetLBAStatus tests, which expect unmapped blocks after UNMAP, are not required here.
setup_blockio() {
    [ "$(id -u)" -eq 0 ] || die "the blockio backend needs root (losetup)"
    truncate -s 128M "$WORK/loop.img"
    LOOP=$(losetup -f --show "$WORK/loop.img") || die "losetup failed"
    rpc "$SOCK" mgmt handlers/vdisk_blockio/mgmt "add_device bl0 filename=$LOOP; thin_provisioned=1"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add bl0 0"
    TESTS=${CU_TESTS:-ALL}
    CRED=""
    # Every suite: the RAM, thin fileio and blockio LUNs are where the whole suite runs.
    MUST="."
    DESC="\`vdisk_blockio\` on a 128 MiB loop device, thin (BLKDISCARD), 512-byte blocks"
}
# vcdrom with an 8 MiB ISO image: the suites that apply to a read-only MMC device. libiscsi's
# multipath checks want SBC devices, so this run uses one URL; its NoMedia and PreventAllow
# suites are SBC-only and run on the removable disk below.
setup_vcdrom() {
    mkdir -p "$WORK/iso"
    head -c 8M /dev/urandom >"$WORK/iso/data.bin"
    genisoimage -quiet -o "$WORK/cd.iso" "$WORK/iso" || die "genisoimage failed"
    rpc "$SOCK" mgmt handlers/vcdrom/mgmt "add_device cd0"
    rpc "$SOCK" set devices/cd0/filename "$WORK/cd.iso"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add cd0 0"
    TESTS=${CU_TESTS:-SCSI.Inquiry,SCSI.TestUnitReady,SCSI.ReadCapacity10,SCSI.Read10,SCSI.Read12,SCSI.Verify10,SCSI.StartStopUnit,SCSI.ModeSense6,SCSI.ReportLuns}
    CRED=""
    SINGLE=1
    MUST='^(Inquiry|TestUnitReady|ReadCapacity10|Read10|Read12|Verify10|StartStopUnit|ModeSense6|ReportLuns)\.'
    DESC="\`vcdrom\` with an 8 MiB ISO image (one URL)"
}
setup_removable() {
    truncate -s 64M "$WORK/removable.img"
    rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt \
        "add_device rm0 filename=$WORK/removable.img; removable=1; thin_provisioned=1"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add rm0 0"
    TESTS=${CU_TESTS:-SCSI.NoMedia,SCSI.PreventAllow,SCSI.StartStopUnit}
    CRED=""
    MUST='^(NoMedia|PreventAllow|StartStopUnit)\.'
    DESC="\`vdisk_fileio\` with removable=1 (and thin, so that UNMAP exists): the NoMedia, PreventAllow and StartStopUnit suites (the vcdrom is checked by scripts/backends.sh)"
}

# CHAP (MD5, what libiscsi speaks) on a RAM LUN: the iSCSI suites and the basic SCSI ones log in
# with iscsi://USER%SECRET@... URLs; the target refuses logins without them.
setup_chap() {
    rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device ram0 size_mb=64"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add ram0 0"
    rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target_attribute $IQN IncomingUser cu-user cu-secret-0123"
    # libiscsi's second session uses the same account.
    TESTS=${CU_TESTS:-iSCSI,SCSI.Inquiry,SCSI.Read10,SCSI.Write10,SCSI.TestUnitReady,SCSI.ReportLuns}
    CRED="cu-user%cu-secret-0123@"
    MUST="^($BASE)\\."
    DESC="\`vdisk_ramio\` behind one-way CHAP, URLs with user%secret"
}

# Why a skipped test does not apply: "BACKENDS#TEST REGEX#TEXT OF ITS [SKIPPED] LINE#reason",
# BACKENDS a space-separated list or "*". A skip that matches none is listed as unexplained
# and fails the run (CU_ENFORCE_SKIPS=0 only lists it).
SKIP_REASONS=(
    'ram chap#^(Unmap|WriteSame1[06]|GetLBAStatus|Inquiry\.BlockLimits|CompareAndWrite\.InvalidDataOutSize)#fully provisioned#the RAM LUN is not thin provisioned; these run on the thin fileio and blockio LUNs'
    'ram#^Unmap\.VPD$#UNMAP is not implemented#the RAM LUN is not thin provisioned, so it has no UNMAP (as in SCST); Unmap.VPD runs on the thin LUNs'
    'fileio blockio#^(CompareAndWrite|WriteSame1[06])\.(InvalidDataOutSize|UnmapUnaligned)$#LBPPB < 2#they need several logical blocks per physical block; they run on the physblock LUN (lb_per_pb_exp=1)'
    '*#^(PreventAllow|StartStopUnit)\.#removable#the LUN is not removable; these run on the removable LUN'
    '*#^ReadOnly\.#not write-protected#the LUN is writable; the ReadOnly suite runs on the read-only LUN'
    '*#^Sanitize\.CryptoErase$#CRYPTO_ERASE is not implemented#no backend here encrypts its medium, so there is no key to change: SANITIZE offers OVERWRITE everywhere and BLOCK ERASE on thin fileio LUNs'
    'ram#^Sanitize\.(BlockErase|Readonly|Reservations)$#BLOCK_ERASE is not implemented#the RAM LUN is not thin provisioned, so it cannot deallocate its blocks: no BLOCK ERASE (it runs on the thin fileio LUN), and the BLOCK ERASE parts of these tests do not run here'
    'blockio#^Sanitize\.BlockErase$#BLOCK_ERASE is not implemented#a block device cannot report which of its blocks are deallocated (GET LBA STATUS), and BLOCK ERASE must leave every block so; it runs on the thin fileio LUN'
    'fileio#^Sanitize\.(Readonly|Reservations)$#CRYPTO_ERASE is not implemented#their OVERWRITE and BLOCK ERASE parts ran (and passed); their CRYPTO ERASE part does not apply: no backend here encrypts its medium'
    'blockio#^Sanitize\.(Readonly|Reservations)$#BLOCK_ERASE is not implemented#their OVERWRITE part ran (and passed); their BLOCK ERASE part runs on the thin fileio LUN, and CRYPTO ERASE does not apply'
    '*#^WriteAtomic16\.#WRITEATOMIC16 is not implemented#no backend here can make a write of several blocks atomic: RAM disks lend their memory to the reads in flight (an atomic write would need a lock every read takes), and Linux 6.1 has no RWF_ATOMIC for files or block devices; Block Limits reports a MAXIMUM ATOMIC TRANSFER LENGTH of 0, as SBC-4 allows'
    'vcdrom#.#Not SBC device#a CD-ROM is an MMC device: SBC tests do not apply to it'
    'vcdrom#^ModeSense6\.Control-D_SENSE$#READ16 is not implemented#the test provokes its sense data with READ(16), which MMC does not have; D_SENSE is checked on the disks'
)

BACKENDS=${CU_BACKENDS:-"ram chap fileio physblock blockio vcdrom readonly removable"}
RUN=()
declare -A SUMMARY COUNTED NOTE BAD SECS DESCS TESTSRUN UNEXPLAINED
FAILED=0
for b in $BACKENDS; do
    start_target "$PORT" "$SOCK" "$WORK/target-$b.log" --cores 0
    case $b in
    blockio) has_handler vdisk_blockio || die "the target has no vdisk_blockio handler" ;;
    vcdrom) has_handler vcdrom || die "the target has no vcdrom handler" ;;
    fileio | physblock | readonly | removable) has_handler vdisk_fileio || die "the target has no vdisk_fileio handler" ;;
    esac
    rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
    SINGLE=0
    "setup_$b"
    rpc "$SOCK" set "targets/iscsi/$IQN/enabled" 1
    rpc "$SOCK" set targets/iscsi/enabled 1
    RUN+=("$b")
    DESCS[$b]=$DESC
    TESTSRUN[$b]=$TESTS

    URL=iscsi://${CRED}127.0.0.1:$PORT/$IQN/0
    LOG=$WORK/cu-$b.log
    if [ -n "$CRED" ] && iscsi-inq "iscsi://127.0.0.1:$PORT/$IQN/0" >/dev/null 2>&1; then
        die "the $b target accepted a login without CHAP"
    fi
    URLS=("$URL" "$URL")
    [ "$SINGLE" = 1 ] && URLS=("$URL")
    echo "conformance ($b): iscsi-test-cu -d -S -t $TESTS ${URLS[*]}"
    start=$(date +%s)
    # The suite's own exit status says little (CUnit counts skips as passes); the score decides.
    timeout 1500 iscsi-test-cu -d -S -t "$TESTS" "${URLS[@]}" >"$LOG" 2>&1 || true
    SECS[$b]=$(($(date +%s) - start))
    kill -0 "$TARGET_PID" 2>/dev/null || { tail -50 "$WORK/target-$b.log" >&2; die "the target died during the $b run"; }
    grep -q "panicked" "$WORK/target-$b.log" && die "the target log shows a panic ($b)"
    # The target still answers after the run: it neither crashed nor hung. And the LUN still
    # serves I/O to a new initiator (qemu's): the suite left no reservation, write protection
    # or unit attention in the way (a unit attention is answered once, and qemu retries).
    iscsi-inq "$URL" >/dev/null || die "the target no longer answers after the $b run"
    case $b in
    vcdrom | readonly) io=(-r -c "read 0 64k") ;;
    *) io=(-c "write -P 0x5a 0 64k" -c "read -P 0x5a 0 64k") ;;
    esac
    qemu-io -f raw "${io[@]}" "$URL" >"$WORK/after-$b.txt" 2>&1 &&
        ! grep -qi "fail\|error\|pattern verification" "$WORK/after-$b.txt" ||
        die "the $b LUN no longer serves I/O after the suite: $(tail -c 400 "$WORK/after-$b.txt")"
    stop_target
    if [ -n "$LOOP" ]; then
        losetup -d "$LOOP" || die "losetup -d $LOOP failed"
        LOOP=
    fi

    # The scorer exits 1 when the log is incomplete (the suite was cut short) or disagrees
    # with CUnit's own summary: then the scores cannot be trusted and the run fails.
    complete=1
    SUMMARY[$b]=$(python3 "$SCORE" "$LOG") || complete=0
    python3 "$SCORE" "$LOG" --tests >"$WORK/tests-$b.txt" || true
    echo "  ${SUMMARY[$b]}"
    bad=$(awk -v re="$MUST" '($1 == "failed" || $1 == "warned") && $2 ~ re {print}' "$WORK/tests-$b.txt" || true)

    # Some tests fail or warn by construction ("BACKENDS#TEST#STATUS#PATTERN#WHY#AS": BACKENDS
    # a space-separated list or "*", PATTERN a fixed string or "re:" and an extended regex,
    # AS what the test counts as, passed unless said). Each is accepted only on the backends listed,
    # with the status listed, and when every failure it records (a "[FAILED]" line it logged
    # or a CUnit failure line) is exactly the one described:
    #  - iSCSIdatasn.iSCSIDataSnInvalid requires its four writes with bad DataSNs to fail
    #    (CHECK CONDITION), and logs them through a helper;
    #  - PreventAllow.{LUNReset,WarmReset,ColdReset} poll TEST UNIT READY after the reset and
    #    log the reset's unit attention, which SAM-5 requires for every I_T nexus (and
    #    MultipathIO.Reset checks it on the requester's own path);
    #  - GetLBAStatus.UnmapSingle, where a physical block holds more than one logical block:
    #    after unmapping LBAs 0 to i-1 (i a multiple of LBPPB) it asks for the status from
    #    LBA i+1 and requires the first descriptor to start at LBA i+LBPPB
    #    (test_get_lba_status_unmap_single.c:135 in libiscsi 1.19, unchanged upstream). SBC-3
    #    (5.6, GET LBA STATUS) requires the first descriptor to start at the STARTING LOGICAL
    #    BLOCK ADDRESS, i+1, which is what the target answers; the two agree only when LBPPB
    #    is 1. The test stops at that check, after its first half (each physical block
    #    unmapped in turn, the status asked at it and after it) passed;
    #  - WriteSame10/16.UnmapVPD on a LUN that is not thin provisioned: WRITE SAME with UNMAP
    #    must then be refused (SBC-3: ILLEGAL REQUEST, INVALID FIELD IN CDB) with LBPWS10/16
    #    clear in the Logical Block Provisioning VPD page, which the test checks after logging
    #    the refusal through its command helper.
    #  - Sanitize.Reset needs a sanitize operation that lasts beyond its three-second sleep and
    #    four task management functions; overwriting a 128 MiB LUN takes a fraction of that,
    #    so every check it makes of an operation under way finds it over. It cannot test what
    #    it is about here, and counts as skipped.
    # Such a test counts as passed ("passed*" in the table) unless said otherwise, with a note
    # saying why; GetLBAStatus.UnmapSingle stays a failure ("failed*"), accepted.
    NOTE[$b]=""
    for spec in "*#iSCSIdatasn.iSCSIDataSnInvalid#warned#[FAILED] WRITE10 command failed with status 2 #every failure it logged (%n) is the outcome it requires#" \
        "*#PreventAllow.LUNReset#warned#[FAILED] TESTUNITREADY command failed with status 2 / sense key UNIT_ATTENTION(0x06) / ASCQ BUS_DEVICE_RESET#every failure it logged (%n) is the outcome it requires#" \
        "*#PreventAllow.WarmReset#warned#[FAILED] TESTUNITREADY command failed with status 2 / sense key UNIT_ATTENTION(0x06)#every failure it logged (%n) is the outcome it requires#" \
        "*#PreventAllow.ColdReset#warned#[FAILED] TESTUNITREADY command failed with status 2 / sense key UNIT_ATTENTION(0x06)#every failure it logged (%n) is the outcome it requires#" \
        "ram#WriteSame10.UnmapVPD#warned#[FAILED] WRITESAME10 command failed with status 2 / sense key ILLEGAL_REQUEST(0x05) / ASCQ INVALID_FIELD_IN_CDB(0x2400)#on a LUN that is not thin provisioned it requires WRITE SAME with UNMAP to be refused and LBPWS10 to be clear, and it logs the refusal (%n) through its helper#" \
        "ram#WriteSame16.UnmapVPD#warned#[FAILED] WRITESAME16 command failed with status 2 / sense key ILLEGAL_REQUEST(0x05) / ASCQ INVALID_FIELD_IN_CDB(0x2400)#on a LUN that is not thin provisioned it requires WRITE SAME with UNMAP to be refused and LBPWS16 to be clear, and it logs the refusal (%n) through its helper#" \
        "physblock#GetLBAStatus.UnmapSingle#failed#test_get_lba_status_unmap_single.c:135  - CU_FAIL(\"[FAILED] GETLBASTATUS command: \" \"lba offset in first descriptor does not \"#its one failure is libiscsi requiring the status asked from LBA i+1 to start at LBA i+LBPPB, where SBC-3 requires it to start at the LBA asked for, as the target's does (scripts/conformance.sh says more)#failed" \
        "ram fileio blockio#Sanitize.Reset#failed#re:SANITIZE_IN_PROGRESS|test_sanitize_reset\.c:[0-9]+  - CU_ASSERT_EQUAL\((_r|ret),0\)#it needs a sanitize that outlasts its three-second sleep and the resets after it, and the target overwrote the whole 128 MiB LUN before that; each of its failures (%n) is a check that the operation was still under way (what a sanitize does meanwhile, and after an abort, is covered by the target's own tests)#skipped"; do
        IFS='#' read -r backends tname status pattern why as <<<"$spec"
        as=${as:-passed}
        [ "$backends" = "*" ] || [[ " $backends " == *" $b "* ]] || continue
        awk -v t="$tname" -v s="$status" '$1 == s && $2 == t {found=1} END {exit !found}' "$WORK/tests-$b.txt" || continue
        output=$(python3 "$SCORE" "$LOG" --output "$tname" || true)
        fails=$(grep -cE '\[FAILED\]|^    [0-9]+\. [^ ]+:[0-9]+  - ' <<<"$output" || true)
        if [[ $pattern == re:* ]]; then
            expected=$(grep -cE "${pattern#re:}" <<<"$output" || true)
        else
            expected=$(grep -cF "$pattern" <<<"$output" || true)
        fi
        if [ "$fails" -gt 0 ] && [ "$fails" -eq "$expected" ]; then
            bad=$(awk -v t="$tname" '$2 != t' <<<"$bad" || true)
            case $as in
            passed) NOTE[$b]+="$tname, which cu-score.py scores $status, counts as passed: ${why//%n/$fails}. " ;;
            skipped) NOTE[$b]+="$tname, which cu-score.py scores $status, counts as skipped, as it cannot test what it is about here: ${why//%n/$fails}. " ;;
            *) NOTE[$b]+="$tname is $status, and accepted so: ${why//%n/$fails}. " ;;
            esac
            # Marked so in the table ("passed*", "skipped*"); an accepted failure stays one.
            awk -v t="$tname" -v a="$as" '$2 == t {$1 = a "*"} {print}' "$WORK/tests-$b.txt" >"$WORK/tests-$b.tmp"
            mv "$WORK/tests-$b.tmp" "$WORK/tests-$b.txt"
        fi
    done
    # The counts after those: what the run is judged by.
    COUNTED[$b]=$(awk '{sub(/\*$/, "", $1); n[$1]++; t++}
        END {printf "%d passed, %d failed, %d skipped, %d warned, %d total", n["passed"], n["failed"], n["skipped"], n["warned"], t}' "$WORK/tests-$b.txt")
    # Every skip, with the reason it does not apply here (SKIP_REASONS), or listed as unexplained.
    : >"$WORK/skips-$b.txt"
    UNEXPLAINED[$b]=""
    while read -r _ tname; do
        msg=$(python3 "$SCORE" "$LOG" --output "$tname" 2>/dev/null | grep -o '\[SKIPPED\].*' | head -n 1 || true)
        reason=""
        for spec in "${SKIP_REASONS[@]}"; do
            IFS='#' read -r backends tpat mpat why <<<"$spec"
            [ "$backends" = "*" ] || [[ " $backends " == *" $b "* ]] || continue
            [[ $tname =~ $tpat ]] && [[ $msg == *"$mpat"* ]] || continue
            reason=$why
            break
        done
        if [ -n "$reason" ]; then
            printf '%s|%s\n' "$reason" "$tname" >>"$WORK/skips-$b.txt"
        else
            UNEXPLAINED[$b]+="${msg:-no [SKIPPED] line}|$tname"$'\n'
        fi
    done < <(awk '$1 == "skipped"' "$WORK/tests-$b.txt")
    if [ -n "${UNEXPLAINED[$b]}" ] && [ "${CU_ENFORCE_SKIPS:-1}" = 1 ]; then
        bad+="${bad:+$'\n'}skips without a reason: $(cut -d'|' -f2 <<<"${UNEXPLAINED[$b]%$'\n'}" | tr '\n' ' ')"
    fi
    if [ "$complete" = 0 ]; then
        bad+="${bad:+$'\n'}the log is incomplete: ${SUMMARY[$b]}"
    fi
    BAD[$b]=$bad
    if [ -n "$bad" ]; then FAILED=1; fi
done

{
    echo "# Conformance"
    echo
    echo "libiscsi's \`iscsi-test-cu\` ($(dpkg-query -W -f='${Version}' libiscsi-bin 2>/dev/null || echo unknown)), run by"
    echo "\`scripts/conformance.sh\` against each backend configured through \`rpc/rpc.py\` only:"
    echo "\`iscsi-test-cu -d -S -t TESTS URL URL\`, scored with \`scripts/cu-score.py\` (a test that"
    echo "only printed [SKIPPED] counts as skipped, one that CUnit passed while logging a failed check"
    echo "counts as warned). A test whose logged failures are exactly the outcome it requires counts"
    echo "as passed (\`passed*\` in the table; the backend's note says why), and every skip says why"
    echo "the test does not apply (a skip without a reason fails the run). After each run a new"
    echo "initiator (qemu-io) writes and reads back a pattern: the suite left the LUN serving I/O."
    echo
    echo "Suites that must have no failed or warned test: every suite on the RAM, thin fileio and"
    echo "blockio LUNs; Inquiry, Read10, Write10, TestUnitReady, ReportLuns and every iSCSI suite"
    echo "behind CHAP; Unmap, WriteSame10/16, GetLBAStatus, CompareAndWrite and ReadCapacity16 with"
    echo "4 KiB physical blocks;"
    echo "Inquiry, TestUnitReady, ReadCapacity10, Read10/12, Verify10, StartStopUnit, ModeSense6 and"
    echo "ReportLuns on the vcdrom; ReadOnly on the read-only LUN; NoMedia, PreventAllow and"
    echo "StartStopUnit on the removable disk."
    for b in "${RUN[@]}"; do
        echo
        echo "## $b: ${DESCS[$b]}"
        echo
        echo "Tests: \`${TESTSRUN[$b]}\`, ${SECS[$b]} s. **${COUNTED[$b]}** (cu-score.py: ${SUMMARY[$b]#iscsi-test-cu: })"
        echo
        if [ -n "${BAD[$b]}" ]; then
            echo "Not yet clean among the required suites:"
            echo
            echo "${BAD[$b]}" | sed 's/^/- /'
        else
            echo "The required suites are clean."
        fi
        if [ -n "${NOTE[$b]}" ]; then
            echo
            echo "Note: ${NOTE[$b]}"
        fi
        if [ -s "$WORK/skips-$b.txt" ]; then
            echo
            echo "Skipped because they do not apply here:"
            echo
            sort "$WORK/skips-$b.txt" | awk -F'|' '$1 != r {if (r != "") printf "\n"; r = $1; printf "- %s: %s", $1, $2; next} {printf ", %s", $2} END {if (r != "") printf "\n"}'
        fi
        if [ -n "${UNEXPLAINED[$b]}" ]; then
            echo
            echo "Skipped with no reason listed in scripts/conformance.sh (by the suite's own message):"
            echo
            sort <<<"${UNEXPLAINED[$b]%$'\n'}" | awk -F'|' '$1 != r {if (r != "") printf "\n"; r = $1; printf "- %s: %s", $1, $2; next} {printf ", %s", $2} END {if (r != "") printf "\n"}'
        fi
    done
    echo
    echo "## Every test"
    echo
    head="| test |"
    rule="|---|"
    for b in "${RUN[@]}"; do head+=" $b |"; rule+="---|"; done
    echo "$head"
    echo "$rule"
    python3 - "$WORK" "${RUN[@]}" <<'PY'
import sys
work, backends = sys.argv[1], sys.argv[2:]
results, order = {}, []
for b in backends:
    for line in open(f"{work}/tests-{b}.txt"):
        parts = line.split()
        if len(parts) < 2:
            continue
        status, test = parts[0], parts[1]
        if test not in results:
            results[test] = {}
            order.append(test)
        results[test][b] = status
for t in order:
    print("| " + t + " | " + " | ".join(results[t].get(b, "") for b in backends) + " |")
PY
} >"$OUT"
echo "conformance: wrote $OUT"

if [ "$FAILED" = 1 ] && [ "${CU_ENFORCE:-1}" = 1 ]; then
    for b in "${RUN[@]}"; do
        if [ -n "${BAD[$b]}" ]; then
            echo "$b:" >&2
            echo "${BAD[$b]}" >&2
        fi
    done
    die "suites that must pass have failed or warned tests"
fi

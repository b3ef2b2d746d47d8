#!/usr/bin/env bash
# libiscsi's conformance suite (iscsi-test-cu, the suite SCST, LIO and SPDK are tested with)
# against a RAM LUN configured through rpc.py only. Scores the log with cu_score.py, writes
# docs/CONFORMANCE.md, and fails if a suite that must pass has a failed or warned test.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PORT=${PORT:-13261}
IQN=iqn.2026-11.org.iscsi-tgt:conformance
WORK=$(mktemp -d /tmp/iscsi-tgt-cu.XXXXXX)
SOCK=$WORK/rpc.sock
TESTS=${CU_TESTS:-ALL}
OUT=${CU_OUT:-$ROOT/docs/CONFORMANCE.md}
SCORE=$SHARED/tools/cu_score.py
trap 'stop_target; rm -rf "$WORK"' EXIT

command -v iscsi-test-cu >/dev/null || "$ROOT/scripts/setup.sh"
[ -f "$SCORE" ] || die "cannot find cu_score.py at $SCORE (set ISCSI_TGT_SHARED)"
[ -x "$BIN" ] || build_release
start_target "$PORT" "$SOCK" "$WORK/target.log" --cores 0
configure_default "$SOCK" "$IQN" 128

URL=iscsi://127.0.0.1:$PORT/$IQN/0
LOG=$WORK/cu.log
echo "conformance: iscsi-test-cu -d -S -t $TESTS $URL $URL"
start=$(date +%s)
# The suite's own exit status says little (CUnit counts skips as passes); the score decides.
timeout 1500 iscsi-test-cu -d -S -t "$TESTS" "$URL" "$URL" >"$LOG" 2>&1 || true
secs=$(( $(date +%s) - start ))
kill -0 "$TARGET_PID" 2>/dev/null || { tail -50 "$WORK/target.log" >&2; die "the target died during the run"; }
grep -q "panicked" "$WORK/target.log" && die "the target log shows a panic"
# The target still answers after the run: it neither crashed nor hung.
iscsi-inq "$URL" >/dev/null || die "the target no longer answers after the run"

summary=$(python3 "$SCORE" "$LOG")
python3 "$SCORE" "$LOG" --tests > "$WORK/tests.txt"
echo "$summary"

# Suites that must be clean: no failed and no warned test.
must='^(Inquiry|Read6|Read10|Read12|Read16|Write10|Write12|Write16|ReadCapacity10|ReadCapacity16|TestUnitReady|ReportLuns|ModeSense6|iSCSI[A-Za-z]*)\.'
bad=$(awk -v re="$must" '($1 == "failed" || $1 == "warned") && $2 ~ re {print}' "$WORK/tests.txt" || true)

# iSCSIdatasn.iSCSIDataSnInvalid sends Data-Out PDUs with wrong DataSNs and requires the WRITE
# to fail, but checks it through a helper that logs "[FAILED]" whenever a write does not return
# GOOD, so a target that behaves correctly is always scored "warned". It is accepted only when
# every logged failure is the target ending one of the four writes with CHECK CONDITION and
# CUnit passed the test; anything else (a GOOD write, a dropped session, a timeout) still fails.
datasn=iSCSIdatasn.iSCSIDataSnInvalid
datasn_note=""
if awk -v t="$datasn" '$1 == "warned" && $2 == t {found=1} END {exit !found}' "$WORK/tests.txt"; then
    section=$(awk '/Test: iSCSIDataSnInvalid/ {on=1} on && /Test: / && !/iSCSIDataSnInvalid/ {on=0} on' "$LOG")
    fails=$(grep -c '\[FAILED\]' <<<"$section" || true)
    expected=$(grep -c '\[FAILED\] WRITE10 command failed with status 2 ' <<<"$section" || true)
    if [ "$fails" -eq 4 ] && [ "$expected" -eq 4 ]; then
        bad=$(awk -v t="$datasn" '$2 != t' <<<"$bad" || true)
        datasn_note="$datasn is scored warned by construction (its helper logs [FAILED] for the failure the test requires); all four bad-DataSN writes ended in CHECK CONDITION, as required."
    fi
fi

{
    echo "# Conformance"
    echo
    echo "libiscsi's \`iscsi-test-cu\` ($(dpkg-query -W -f='${Version}' libiscsi-bin 2>/dev/null || echo unknown)) against a"
    echo "\`vdisk_ramio\` LUN (128 MiB, 512-byte blocks), configured through \`rpc/rpc.py\` only."
    echo
    echo "Command (\`scripts/conformance.sh\`): \`iscsi-test-cu -d -S -t $TESTS URL URL\`, scored with"
    echo "\`shared/tools/cu_score.py\` (a test that only printed [SKIPPED] counts as skipped, one that CUnit"
    echo "passed while logging a failed check counts as warned). Run time: ${secs} s."
    echo
    echo "**$summary**"
    echo
    echo "Suites that must have no failed or warned test: Inquiry, Read6/10/12/16, Write10/12/16,"
    echo "ReadCapacity10/16, TestUnitReady, ReportLuns, ModeSense6 and every iSCSI suite."
    if [ -n "$bad" ]; then
        echo "Not yet clean there:"
        echo
        echo "$bad" | sed 's/^/- /'
    else
        echo "All of them are clean."
    fi
    if [ -n "$datasn_note" ]; then
        echo
        echo "Note: $datasn_note"
    fi
    echo
    echo "| result | test |"
    echo "|---|---|"
    awk '{printf "| %s | %s |\n", $1, $2}' "$WORK/tests.txt"
} > "$OUT"
echo "conformance: wrote $OUT"

stop_target
if [ -n "$bad" ] && [ "${CU_ENFORCE:-1}" = 1 ]; then
    echo "$bad" >&2
    die "suites that must pass have failed or warned tests"
fi

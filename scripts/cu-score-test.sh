#!/usr/bin/env bash
# Checks scripts/cu-score.py on logs whose scoring is known (tests/cu-score/): passed, skipped,
# warned and failed tests, verdicts on a test's own line and on a later one, output after a
# verdict that belongs to the suite's cleanup, a suite boundary, a suite whose set-up failed,
# a log cut short and one that disagrees with CUnit's summary. conformance.sh runs it first:
# the conformance verdict is only as good as the scorer.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SCORE=$ROOT/scripts/cu-score.py
DIR=$ROOT/tests/cu-score
TMP=$(mktemp -d /tmp/iscsi-tgt-cu-score.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

# expect NAME LOG STATUS: the summary and --tests output of LOG match NAME.expected and the
# scorer exits with STATUS.
expect() {
    local name=$1 log=$2 want=$3 rc=0 rc_tests=0
    python3 "$SCORE" "$log" >"$TMP/$name.out" || rc=$?
    python3 "$SCORE" "$log" --tests >>"$TMP/$name.out" || rc_tests=$?
    diff -u "$DIR/$name.expected" "$TMP/$name.out" >&2 || die "cu-score.py scores $name wrongly"
    [ "$rc" -eq "$want" ] && [ "$rc_tests" -eq "$want" ] ||
        die "cu-score.py exits $rc (summary) and $rc_tests (--tests) on $name, not $want"
}

expect sample "$DIR/sample-log.txt" 0
expect truncated "$DIR/truncated-log.txt" 1

# The counts are checked against CUnit's: a log whose verdicts disagree with its run summary
# is reported, not trusted.
sed 's/^\( *tests *9 *9\) *6 *3 /\1      7      2 /' "$DIR/sample-log.txt" >"$TMP/inconsistent.log"
grep -q 'tests      9      9      7      2' "$TMP/inconsistent.log" || die "the inconsistent log was not made"
rc=0
out=$(python3 "$SCORE" "$TMP/inconsistent.log") || rc=$?
[ "$rc" -eq 1 ] || die "cu-score.py exits $rc on a log that disagrees with CUnit's summary"
grep -qF "CUnit ran 9 tests and failed 2, the log shows 9 and 3" <<<"$out" ||
    die "cu-score.py does not say how the log disagrees with CUnit: $out"

# --output: a test's own output, then its CUnit failure lines; nothing of the suite after it.
python3 "$SCORE" "$DIR/sample-log.txt" --output Alpha.FailsLater >"$TMP/output"
printf '%s\n' "    SWP is not changeable" "    [SKIPPED] part of this test needs FROBNICATE." \
    "    1. test_alpha_fails_later.c:60  - CU_ASSERT_EQUAL(ret,0)" | diff -u - "$TMP/output" >&2 ||
    die "cu-score.py --output Alpha.FailsLater is wrong"
[ "$(python3 "$SCORE" "$DIR/sample-log.txt" --output Alpha.Last)" = "" ] ||
    die "cu-score.py --output Alpha.Last includes the suite's cleanup"

# --json carries the same classification.
python3 "$SCORE" "$DIR/sample-log.txt" --json | python3 -c '
import json, sys
doc = json.load(sys.stdin)
got = sorted((t["status"], t["name"]) for t in doc["tests"])
assert doc["complete"] and not doc["problems"], doc["problems"]
assert doc["summary"] == {"passed": 3, "failed": 4, "skipped": 1, "warned": 2, "total": 10}, doc["summary"]
assert doc["suite_failures"] == [{"suite": "Gamma", "failed": "init"}], doc["suite_failures"]
assert ("warned", "Beta.SkipsAndWarns") in got and ("skipped", "Alpha.Skips") in got, got
assert doc["cunit"]["tests"]["ran"] == 9, doc["cunit"]
' || die "cu-score.py --json is wrong"

echo "cu-score-test: the scorer classifies the sample logs as expected"

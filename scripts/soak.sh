#!/usr/bin/env bash
# Soak: data integrity under disruption, and a daemon that stays steady while it lasts.
#
# For each backend in SOAK_BACKENDS a fresh daemon serves one LUN (vdisk_ramio, or vdisk_fileio
# on a file in a temporary directory) and `iscsi-bench --soak` runs SOAK_SESSIONS sessions at
# queue depth SOAK_QD for SOAK_SECS seconds: random READs and WRITEs of 512 B to 256 KiB, each
# READ checked against a model of the LUN, with ABORT TASKs and abrupt connection drops
# (followed by session reinstatement) injected at random, and a full read-back at the end.
# Every SAMPLE_SECS the daemon's RSS (VmRSS), thread count and open fds go to a log.
#
# It fails on any mismatch or unexpected error reported by the soak, a daemon that dies or does
# not exit on SIGTERM, a soak that does not finish within SOAK_SECS + 300 s, RSS that keeps
# growing, or descriptors that pile up. The baseline is the first sample taken one minute into
# the run (a quarter of the run for runs shorter than four minutes), by which time buffer
# pools, backend channels and caches have grown to their working size. "Steady" RSS: the last
# sample is at most 10% + 8 MiB above the baseline. Descriptors: once the sessions have logged
# out, no more are open than at the baseline, when the sessions' own connections were open.
#
#   SOAK_SECS=600 SOAK_BACKENDS="ram fileio" PORT=13280 scripts/soak.sh
#   SOAK_ARGS="--abort-every 0.5 --drop-every 4" adds or overrides iscsi-bench options.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PORT=${PORT:-13280}
SOAK_SECS=${SOAK_SECS:-600}
SOAK_BACKENDS=${SOAK_BACKENDS:-ram fileio}
SOAK_SESSIONS=${SOAK_SESSIONS:-4}
SOAK_QD=${SOAK_QD:-16}
SOAK_SIZE_MB=${SOAK_SIZE_MB:-256}
SOAK_CORES=${SOAK_CORES:-0,1}
SOAK_ARGS=${SOAK_ARGS:-}
SAMPLE_SECS=${SAMPLE_SECS:-10}
# Keep the logs here instead of in the temporary directory, which goes at exit.
SOAK_LOG_DIR=${SOAK_LOG_DIR:-}
IQN=iqn.2026-11.org.iscsi-tgt:soak
WORK=$(mktemp -d /var/tmp/iscsi-tgt-soak.XXXXXX)
SOCK=$WORK/rpc.sock
BENCH_PID=
cleanup() {
    if [ -n "$BENCH_PID" ]; then
        kill "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    stop_target || true
    rm -rf "$WORK"
}
trap cleanup EXIT
[ -z "$SOAK_LOG_DIR" ] || mkdir -p "$SOAK_LOG_DIR" || die "cannot create $SOAK_LOG_DIR"

build_release
BENCH=$(dirname "$BIN")/iscsi-bench
[ -x "$BENCH" ] || die "$BENCH is missing after the build"

# sample PID -> "rss_kib threads fds", or nothing once the process is gone.
sample() {
    local pid=$1 rss thr fds
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 0
    thr=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 0
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    [ -n "$rss" ] && echo "$rss $thr $fds"
}

mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

# field NAME LINE: the number after NAME in a "name value name value" line.
field() {
    echo "$2" | awk -v k="$1" '{for (i = 1; i < NF; i++) if ($i == k) {print $(i + 1); exit}}'
}

failed=0
fail() {
    echo "FAIL ($1): $2"
    failed=1
}

soak_one() {
    local backend=$1 log=$WORK/target-$1.log out=$WORK/soak-$1.log samples=$WORK/samples-$1.log
    local t0 now elapsed deadline s rc=0 summary
    echo
    echo "== soak: $backend, $SOAK_SESSIONS sessions, queue depth $SOAK_QD, $SOAK_SECS s"
    start_target "$PORT" "$SOCK" "$log" --cores "$SOAK_CORES" --mode adaptive
    case $backend in
        ram)
            configure_default "$SOCK" "$IQN" "$SOAK_SIZE_MB"
            ;;
        fileio)
            rpc "$SOCK" mgmt handlers/vdisk_fileio/mgmt \
                "add_device soak0 filename=$WORK/soak.img; size_mb=$SOAK_SIZE_MB"
            rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
            rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add soak0 0"
            rpc "$SOCK" set "targets/iscsi/$IQN/enabled" 1
            rpc "$SOCK" set targets/iscsi/enabled 1
            ;;
        *) die "unknown backend $backend (ram or fileio)" ;;
    esac
    echo "# t_secs rss_kib threads fds" >"$samples"
    s=$(sample "$TARGET_PID")
    echo "0 $s" >>"$samples"
    t0=$(date +%s)
    # shellcheck disable=SC2086 # SOAK_ARGS is a list of options
    "$BENCH" --portal "127.0.0.1:$PORT" --target "$IQN" --lun 0 --soak \
        --sessions "$SOAK_SESSIONS" --secs "$SOAK_SECS" --qd "$SOAK_QD" $SOAK_ARGS >"$out" 2>&1 &
    BENCH_PID=$!
    deadline=$((t0 + SOAK_SECS + 300))
    while kill -0 "$BENCH_PID" 2>/dev/null; do
        sleep "$SAMPLE_SECS" &
        wait $! || true
        now=$(date +%s)
        elapsed=$((now - t0))
        s=$(sample "$TARGET_PID")
        if [ -z "$s" ]; then
            fail "$backend" "the target died $elapsed s into the soak"
            break
        fi
        echo "$elapsed $s" >>"$samples"
        if [ "$now" -gt "$deadline" ]; then
            fail "$backend" "the soak did not finish within $((SOAK_SECS + 300)) s (hang?)"
            kill "$BENCH_PID" 2>/dev/null || true
            break
        fi
    done
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=
    elapsed=$(($(date +%s) - t0))
    # The soak's sessions have logged out; a reinstated session's connection goes on the
    # reactor's next timer tick.
    sleep 3
    s=$(sample "$TARGET_PID")
    [ -n "$s" ] || fail "$backend" "the target died at the end of the soak"
    echo "$elapsed $s after" >>"$samples"
    grep -E '^soak: (t |[0-9])' "$out" | tail -3 || true
    grep -E 'MISMATCH|session [0-9]+:' "$out" | head -20 || true
    summary=$(grep '^soak secs' "$out" | tail -1 || true)
    [ -n "$summary" ] || fail "$backend" "no summary line from the soak (exit $rc): $(tail -3 "$out")"
    [ "$rc" = 0 ] || fail "$backend" "iscsi-bench --soak exited $rc"
    if grep -q 'panicked' "$log"; then
        fail "$backend" "the target panicked: $(grep -m1 panicked "$log")"
    fi
    stop_target

    local base_at=60 stats
    [ "$SOAK_SECS" -lt 240 ] && base_at=$((SOAK_SECS / 4))
    # first, baseline, last (during the run) and max RSS; fds and threads before and after.
    stats=$(awk -v b="$base_at" '
        /^#/ {next}
        {
            if (n == 0) {rss0 = $2; thr0 = $3; fd0 = $4}
            if ($5 == "after") {thra = $3; fda = $4; rssa = $2; next}
            n++; last = $2; if ($2 > max) max = $2
            if (base == "" && $1 >= b) {base = $2; fdb = $4}
        }
        END {
            if (base == "") {base = last; fdb = fd0}
            printf "%d %d %d %d %d %d %d %d %d %d", rss0, base, last, max, fd0, fdb, fda, thr0, thra, rssa
        }' "$samples")
    read -r rss0 rssb rssl rssm fd0 fdb fda thr0 thra rssa <<<"$stats"
    local limit=$((rssb * 110 / 100 + 8192))

    local ops reads writes bytes mism errs
    ops=$(field ops "$summary")
    reads=$(field reads "$summary")
    writes=$(field writes "$summary")
    bytes=$(field bytes "$summary")
    mism=$(field mismatches "$summary")
    errs=$(field errors "$summary")
    echo "-- $backend results"
    echo "duration      $elapsed s (soak phase $SOAK_SECS s)"
    echo "ops           ${ops:-?} (reads ${reads:-?}, writes ${writes:-?}, $(mib $((${bytes:-0} / 1024))) MiB)"
    echo "mismatches    ${mism:-?} (must be 0); errors ${errs:-?} (must be 0)"
    echo "disruptions   aborts $(field aborts "$summary") (TMF complete $(field tmf_complete "$summary"), task does not exist $(field tmf_no_task "$summary"), other $(field tmf_other "$summary"); commands ended $(field aborted "$summary"), of them writes $(field aborted_writes "$summary"))"
    echo "              drops $(field drops "$summary") (of them TCP reset $(field drops_reset "$summary")), relogins $(field relogins "$summary"), unit attentions $(field unit_attentions "$summary")"
    echo "verified      $(field verified_blocks "$summary") blocks read back at the end ($(field in_doubt_at_end "$summary") still in doubt)"
    echo "target RSS    first $(mib "$rss0") MiB, baseline $(mib "$rssb") MiB at ${base_at} s, last $(mib "$rssl") MiB, max $(mib "$rssm") MiB (limit $(mib "$limit") MiB); after the sessions $(mib "$rssa") MiB"
    echo "target fds    first $fd0 (before the sessions), baseline $fdb at ${base_at} s, last $fda (after the sessions)"
    echo "threads       first $thr0, last $thra"
    echo "samples       every $SAMPLE_SECS s: $(grep -vc '^#' "$samples") in $samples"
    [ "${mism:-1}" = 0 ] || fail "$backend" "${mism:-unknown} mismatches"
    [ "${errs:-1}" = 0 ] || fail "$backend" "${errs:-unknown} errors"
    [ "$rssl" -le "$limit" ] || fail "$backend" "RSS grew from $(mib "$rssb") MiB to $(mib "$rssl") MiB"
    [ "$fda" -le "$fdb" ] || fail "$backend" "$fda descriptors open after the sessions, $fdb while they ran"
    [ -z "$SOAK_LOG_DIR" ] || cp "$samples" "$out" "$log" "$SOAK_LOG_DIR"/
}

for b in $SOAK_BACKENDS; do
    soak_one "$b"
done
echo
if [ "$failed" = 0 ]; then
    echo "soak passed: $SOAK_BACKENDS"
else
    echo "soak FAILED"
    exit 1
fi

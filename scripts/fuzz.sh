#!/usr/bin/env bash
# A bounded fuzzing run: builds the libFuzzer targets of fuzz/ (cargo-fuzz, nightly, address
# sanitizer, debug assertions), then runs each for FUZZ_SECS seconds from a temporary corpus
# made of its seeds (fuzz/seeds/TARGET/) and its saved regressions (fuzz/regressions/TARGET/).
# Fails, naming the target and the saved input, on any crash, timeout or out-of-memory.
#
#   FUZZ_SECS=30            seconds per target
#   FUZZ_TARGETS="pdu cdb"  which targets (default: every fuzz/fuzz_targets/*.rs)
#
# A crashing input is kept in fuzz/artifacts/TARGET/; replay it with
#   cargo +nightly fuzz run --debug-assertions TARGET fuzz/artifacts/TARGET/crash-...
# and, once fixed, keep it under fuzz/regressions/TARGET/ (tests/fuzz_regressions.rs replays
# those on the stable toolchain).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

FUZZ_SECS=${FUZZ_SECS:-30}
if [ -z "${FUZZ_TARGETS:-}" ]; then
    FUZZ_TARGETS=$(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//' | tr '\n' ' ')
fi

# The longest input each target takes: a stream of PDUs, login text, a few CDBs with their
# Data-Out, a few management commands, an RPC stream.
max_len() {
    case "$1" in
        pdu) echo 65536 ;;
        login | cdb) echo 16384 ;;
        mgmt) echo 4096 ;;
        rpc) echo 16384 ;;
        *) echo 16384 ;;
    esac
}

# cargo-fuzz passes the compiler unstable flags (-Z sanitizer=address, coverage): the nightly
# toolchain, installed here when missing. Where no toolchain can be fetched the stable one
# takes them with RUSTC_BOOTSTRAP=1 (its standard library ships the sanitizer runtimes).
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal || true
fi
if cargo +nightly --version >/dev/null 2>&1; then
    FUZZ=(cargo +nightly fuzz)
    replay="cargo +nightly fuzz"
else
    echo "== no nightly toolchain: the stable one with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    FUZZ=(cargo fuzz)
    replay="RUSTC_BOOTSTRAP=1 cargo fuzz"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== building fuzz targets: $FUZZ_TARGETS"
"${FUZZ[@]}" build --debug-assertions

WORK=$(mktemp -d "${TMPDIR:-/tmp}/iscsi-tgt-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

failed=0
for t in $FUZZ_TARGETS; do
    if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
        echo "FAIL $t: no such fuzz target (fuzz/fuzz_targets/$t.rs)"
        failed=1
        continue
    fi
    corpus="$WORK/corpus-$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do
        if [ -d "$d" ]; then
            cp -- "$d"/* "$corpus"/ 2>/dev/null || true
        fi
    done
    log="$WORK/$t.log"
    rc=0
    "${FUZZ[@]}" run --debug-assertions "$t" "$corpus" -- \
        -max_total_time="$FUZZ_SECS" -max_len="$(max_len "$t")" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        # A panic (its message is on the next line), or libFuzzer's or the sanitizer's report
        # (crash, timeout, out-of-memory).
        first='panicked at|==[0-9]+== ?ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)'
        echo "FAIL $t after ${execs:-?} executions (exit status $rc)"
        echo "     input saved as ${artifact:-<none>}"
        echo "     replay: $replay run --debug-assertions $t ${artifact:-<input>}"
        if grep -q -E "$first" "$log"; then
            grep -m1 -A24 -E "$first" "$log" | sed 's/^/     /'
        else
            tail -n 40 "$log" | sed 's/^/     /'
        fi
    else
        echo "ok   $t: ${execs:-?} executions in ${FUZZ_SECS}s"
    fi
done
exit "$failed"

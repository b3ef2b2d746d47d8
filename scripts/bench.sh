#!/usr/bin/env bash
# The benchmark matrix: every target with the same initiators, data and cores, in one run.
#
# Workloads: 4 KiB random read and 4 KiB random write at QD 1, 8, 32 and 128; 128 KiB
# sequential read and write at QD 16. Each run lasts RAMP + SECS seconds; what is reported is
# measured over the SECS after the ramp-up.
# Targets (TARGETS, a subset of these names; all by default):
#   iscsi-tgt-kernel     this build on the kernel's TCP, 127.0.0.1
#   iscsi-tgt-af_packet  this build on the userspace TCP stack (--net af_packet) on one end of a
#                        veth pair in a network namespace; the initiators run in another
#   tgtd                 Linux's tgt, its backing store a file on /dev/shm
#   spdk                 SPDK's iscsi_tgt with a malloc bdev, when SPDK_DIR names a built SPDK
#   NAME                 each peer of PEERS="NAME=iscsi://HOST:PORT/IQN/LUN[;rpc=SOCK] ...",
#                        a target already running (its LUN is overwritten with the test data)
# Each LUN is 1 GiB of RAM (a peer's: its own) and is first filled with the same random data,
# so reads are of real data. iscsi-tgt runs in MODE (poll by default; MODE=adaptive), its
# reactor and every other target pinned to TARGET_CORE (default 1), one at a time: SPDK polls
# its core whenever it runs, so it runs only for its own rows.
# Initiators (INITIATORS, default both), pinned to INIT_CORE (default 0):
#   iscsi-perf   libiscsi's; it only reads (it has no write option), so its write rows are n/a
#   iscsi-bench  this crate's; reads and writes, with latency percentiles and a CDF
# The target's busy time per I/O: iscsi-tgt's reactors' busy_ns, SPDK's (and a peer's with
# rpc=) busy ticks from framework_get_reactors, tgtd's CPU time from /proc, each over the
# measured interval (scripts/busy.py) divided by the I/Os done in it.
# Also measured: an iperf3 loopback ceiling on the same cores (the 128 KiB sequential reads as
# a share of it), iscsi-tgt's CPU use with a session logged in and idle in either mode, and its
# 4 KiB random read QD32 IOPS in the other mode. RSS=1 adds a long mixed run (10 minutes of
# 70/30 random reads and writes at QD32 after a minute's warm-up; RSS_SECS, RSS_WARMUP) with
# iscsi-tgt's VmRSS sampled every 10 s.
#
# Output, in OUT (docs/bench; target/bench-quick with QUICK=1): results.jsonl (one JSON line
# per run, as it happens), results.md (the tables, also printed) and PNG plots (IOPS against
# queue depth, latency CDFs) drawn by iscsi-bench-plot. The run's length is printed at the end.
#
#   scripts/bench.sh                          SECS=5 RAMP=1: 61 runs, 8 to 9 minutes with SPDK
#   QUICK=1 scripts/bench.sh                  a smoke test: one workload of each kind, 1 s each
#   SPDK_DIR=/var/tmp/spdk TARGETS="iscsi-tgt-kernel spdk" INITIATORS=iscsi-bench scripts/bench.sh
#   PEERS="lio=iscsi://127.0.0.1:3260/iqn.2003-01.org.linux-iscsi.x:sn/0" scripts/bench.sh
# PORT (default 14300) is the first of five ports it takes; NET (10.83) the first two octets of
# the namespaces' addresses; NOTE a sentence for results.md about the run (the machine's state);
# ISCSI_TGT_BIN and ISCSI_BENCH_BIN other builds of the target and of iscsi-bench.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, tgtd, SPDK)"
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    SECS=${SECS:-1} RAMP=${RAMP:-0.5} IDLE_SECS=${IDLE_SECS:-1} OUT=${OUT:-$ROOT/target/bench-quick}
else
    SECS=${SECS:-5} RAMP=${RAMP:-1} IDLE_SECS=${IDLE_SECS:-5} OUT=${OUT:-$ROOT/docs/bench}
fi
TARGET_CORE=${TARGET_CORE:-1}
INIT_CORE=${INIT_CORE:-0}
MODE=${MODE:-poll}
SPDK_DIR=${SPDK_DIR:-}
PEERS=${PEERS:-}
INITIATORS=${INITIATORS:-iscsi-perf iscsi-bench}
PORT=${PORT:-14300}
NET=${NET:-10.83}
RSS=${RSS:-0}
RSS_SECS=${RSS_SECS:-600}
RSS_WARMUP=${RSS_WARMUP:-60}

# calc EXPR: floating-point arithmetic (awk's: quick to start, which matters between a run's
# timing and its start).
calc() { awk "BEGIN {printf \"%.6f\\n\", $1}"; }
is_secs() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v x="$1" 'BEGIN {exit !(x > 0)}'; }
is_secs "$SECS" || die "SECS must be a positive number of seconds, not '$SECS'"
[[ $RAMP =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "RAMP must be a number of seconds, not '$RAMP'"
is_secs "$IDLE_SECS" || die "IDLE_SECS must be a positive number of seconds"
[[ $TARGET_CORE =~ ^[0-9]+$ && $INIT_CORE =~ ^[0-9]+$ ]] || die "TARGET_CORE and INIT_CORE must be core numbers"
[ "$TARGET_CORE" != "$INIT_CORE" ] || die "TARGET_CORE and INIT_CORE must differ"
taskset -c "$TARGET_CORE" true 2>/dev/null || die "cannot run on TARGET_CORE $TARGET_CORE"
taskset -c "$INIT_CORE" true 2>/dev/null || die "cannot run on INIT_CORE $INIT_CORE"
case $MODE in poll) OTHER_MODE=adaptive ;; adaptive) OTHER_MODE=poll ;; *) die "MODE must be poll or adaptive" ;; esac
if ! [[ $PORT =~ ^[0-9]+$ ]] || [ "$PORT" -gt 65530 ]; then die "PORT must be a port number"; fi
for i in $INITIATORS; do
    case $i in iscsi-perf | iscsi-bench) ;; *) die "unknown initiator '$i' in INITIATORS (iscsi-perf, iscsi-bench)" ;; esac
done

OURS_PORT=$PORT
TGTD_PORT=$((PORT + 1))
SPDK_PORT=$((PORT + 2))
IPERF_PORT=$((PORT + 3))
USTACK_PORT=$((PORT + 4))
IQN=iqn.2026-11.org.iscsi-tgt:bench
TGTD_IQN=iqn.2026-11.org.iscsi-tgt:tgtd
SIZE_MB=1024
TAG=$$
NS_T=ibm-t-$TAG
NS_I=ibm-i-$TAG
T_IP=$NET.0.2
I_IP=$NET.0.1
DATA=/dev/shm/iscsi-tgt-bench-$TAG.img
TGTD_IMG=/dev/shm/iscsi-tgt-bench-tgtd-$TAG.img
BENCH=${ISCSI_BENCH_BIN:-$ROOT/target/release/iscsi-bench}
PLOT=$ROOT/target/release/iscsi-bench-plot
BUSY="python3 $ROOT/scripts/busy.py"
JSONL=$OUT/results.jsonl
TGTD_PID=
SPDK_PID=
# The hugepage count before start_spdk raised it, and what it set.
HP_BEFORE=
HP_SET=
NETNS=0

# Peers: NAME=URL[;rpc=SOCK].
declare -A PEER_URL PEER_RPC
PEER_NAMES=()
for p in $PEERS; do
    name=${p%%=*}
    rest=${p#*=}
    if [ -z "$name" ] || [ "$name" = "$p" ]; then die "PEERS: '$p' is not NAME=iscsi://HOST:PORT/IQN/LUN[;rpc=SOCK]"; fi
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "PEERS: name '$name' may hold only letters, digits, '.', '_' and '-'"
    case $name in iscsi-tgt-kernel | iscsi-tgt-af_packet | tgtd | spdk) die "PEERS: '$name' is the name of a built-in target" ;; esac
    PEER_URL[$name]=${rest%%;*}
    [[ ${PEER_URL[$name]} =~ ^iscsi://[^/]+/[^/]+/[0-9]+$ ]] || die "PEERS: $name's URL '${PEER_URL[$name]}' is not iscsi://HOST:PORT/IQN/LUN"
    PEER_RPC[$name]=
    case $rest in *";rpc="*) PEER_RPC[$name]=${rest#*;rpc=} ;; *";"*) die "PEERS: $name: after ';' only rpc=SOCK is known" ;; esac
    PEER_NAMES+=("$name")
done

ALL_TARGETS="iscsi-tgt-kernel iscsi-tgt-af_packet tgtd"
[ -z "$SPDK_DIR" ] || ALL_TARGETS+=" spdk"
for p in "${PEER_NAMES[@]}"; do ALL_TARGETS+=" $p"; done
TARGETS=${TARGETS:-$ALL_TARGETS}
for t in $TARGETS; do
    [ "$t" != spdk ] || [ -n "$SPDK_DIR" ] || die "TARGETS has spdk but SPDK_DIR is not set"
    case " $ALL_TARGETS " in *" $t "*) ;; *) die "unknown target '$t' in TARGETS (known: $ALL_TARGETS)" ;; esac
done
wants() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

cleanup() {
    local pid
    stop_target || true
    stop_tgtd
    stop_spdk
    # What else this shell started and has not waited for yet (busy.py, qemu-io, iperf3, the
    # mixed run): only its own children, never a PID that may have been reused since.
    for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
    [ "$NETNS" = 0 ] || netns_del "$NS_T" "$NS_I"
    rm -f "$DATA" "$TGTD_IMG"
    [ -n "${KEEP:-}" ] || [ -z "${WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
WORK=$(mktemp -d /tmp/iscsi-tgt-bench.XXXXXX)
SOCK=$WORK/rpc.sock
SPDK_SOCK=$WORK/spdk.sock

# Workloads: NAME|RW|BYTES|QD, reads first: the LUNs hold the random data while they are read.
WORKLOADS=()
if [ "$QUICK" = 1 ]; then
    WORKLOADS=("4 KiB random read QD32|randread|4096|32" "128 KiB sequential read QD16|read|131072|16"
        "4 KiB random write QD32|randwrite|4096|32" "128 KiB sequential write QD16|write|131072|16")
else
    for qd in 1 8 32 128; do WORKLOADS+=("4 KiB random read QD$qd|randread|4096|$qd"); done
    WORKLOADS+=("128 KiB sequential read QD16|read|131072|16")
    for qd in 1 8 32 128; do WORKLOADS+=("4 KiB random write QD$qd|randwrite|4096|$qd"); done
    WORKLOADS+=("128 KiB sequential write QD16|write|131072|16")
fi

# --- what it needs -------------------------------------------------------------------------

need=0
for c in iscsi-perf tgtd iperf3 qemu-img qemu-io ip ethtool; do command -v "$c" >/dev/null || need=1; done
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || need=1
[ "$need" = 0 ] || "$ROOT/scripts/setup.sh" || die "scripts/setup.sh failed"
build_release
[ -x "$PLOT" ] || die "$PLOT is missing after the build"
if [ -n "$SPDK_DIR" ] && wants spdk; then
    SPDK_BIN=$SPDK_DIR/build/bin/iscsi_tgt
    SPDK_RPC="python3 $SPDK_DIR/scripts/rpc.py -s $SPDK_SOCK"
    [ -x "$SPDK_BIN" ] || die "SPDK_DIR: no $SPDK_BIN (build SPDK first)"
fi
mkdir -p "$OUT"
: >"$JSONL"

# The iscsi-bench this build has: with --json (and --url, --rw, --ramp) or the older flags.
# (Its --help exits non-zero: the usage is read before it is searched.)
[ -x "$BENCH" ] || die "no iscsi-bench at $BENCH"
bench_usage=$("$BENCH" --help 2>&1 || true)
if grep -q -- --json <<<"$bench_usage"; then BENCH_JSON=1; else BENCH_JSON=0; fi

# --- the initiators --------------------------------------------------------------------------

# Where the initiators run: nothing for 127.0.0.1, `ip netns exec NS_I` for the veth path.
INI_WRAP=(env)

# iscsi_bench URL RW BYTES QD [EXTRA...]: one iscsi-bench run on INIT_CORE; prints its result
# as one JSON object (the --json schema). The one place that knows iscsi-bench's flags: an
# iscsi-bench without --json gets the older ones, runs RAMP + SECS with the ramp-up counted, and
# its `iops N mbps M` line becomes an object with iops and mbps only (no latencies).
iscsi_bench() {
    local url=$1 rw=$2 bs=$3 qd=$4 out
    shift 4
    if [ "$BENCH_JSON" = 1 ]; then
        "${INI_WRAP[@]}" taskset -c "$INIT_CORE" "$BENCH" --url "$url" --rw "$rw" --bs "$bs" \
            --qd "$qd" --secs "$SECS" --ramp "$RAMP" --json "$@"
        return
    fi
    local rest=${url#iscsi://} portal target lun args=()
    portal=${rest%%/*}
    rest=${rest#*/}
    target=${rest%/*}
    lun=${rest##*/}
    case $rw in
        randread) args=(--random) ;;
        randwrite) args=(--random --write) ;;
        write) args=(--write) ;;
        # The older iscsi-bench mixes reads and writes only in its soak (without its faults).
        randrw) args=(--soak --sessions 1 --max-io "$bs" --abort-every 0 --drop-every 0) ;;
    esac
    out=$("${INI_WRAP[@]}" taskset -c "$INIT_CORE" "$BENCH" --portal "$portal" --target "$target" \
        --lun "$lun" --bs "$bs" --qd "$qd" --secs "$(calc "$SECS + $RAMP")" "${args[@]}" "$@") ||
        return 1
    # The soak reports no rate.
    [ "$rw" != randrw ] || { echo '{"tool":"iscsi-bench"}'; return 0; }
    awk '/^iops/ {printf "{\"tool\":\"iscsi-bench\",\"iops\":%s,\"mbps\":%s}\n", $2, $4; found = 1}
        END {exit !found}' <<<"$out"
}

# iscsi_perf URL RW BYTES QD: libiscsi's iscsi-perf for RAMP + SECS (it runs until SIGINT);
# prints {"tool":"iscsi-perf","iops":...,"mbps":...} averaged over its per-second lines after
# the ramp-up. Reads only.
iscsi_perf() {
    local url=$1 rw=$2 bs=$3 qd=$4 args=()
    [ "$rw" = randread ] && args=(-r)
    timeout -s INT "$(calc "$RAMP + $SECS + 1")" "${INI_WRAP[@]}" taskset -c "$INIT_CORE" \
        iscsi-perf -m "$qd" -b $((bs / 512)) "${args[@]}" "$url" >"$WORK/iscsi-perf.out" 2>&1 || true
    python3 - "$RAMP" "$SECS" "$bs" "$WORK/iscsi-perf.out" <<'EOF'
import math, re, sys
ramp, secs, bs = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
text = open(sys.argv[4], errors="replace").read().replace("\r", "\n")
cur = [int(m) for m in re.findall(r"iops current (\d+)", text)]
cur = cur[math.ceil(ramp):][:max(1, math.ceil(secs))]
if not cur:
    last = [l for l in text.splitlines() if l.strip()][-3:]
    sys.exit("iscsi-perf gave no figures after the ramp-up: " + " / ".join(last))
iops = sum(cur) / len(cur)
print(f'{{"tool":"iscsi-perf","iops":{iops:.1f},"mbps":{iops * bs / 1e6:.2f},"samples":{len(cur)}}}')
EOF
}

# --- one run ---------------------------------------------------------------------------------

RUNS=0
FAILED=()

# run_one PART TARGET NET LABEL INITIATOR URL BUSY_KIND BUSY_ARG "NAME|RW|BYTES|QD": one
# measurement, recorded as a line of results.jsonl and summed up on stderr. BUSY_KIND is
# reactors, spdk, proc or none (busy.py's kinds).
run_one() {
    local part=$1 target=$2 net=$3 label=$4 ini=$5 url=$6 bkind=$7 barg=$8 w=$9
    local wname rw bs qd sampler='' busy='' rc=0
    IFS='|' read -r wname rw bs qd <<<"$w"
    if [ "$bkind" != none ]; then
        # From just after the ramp-up to well before the end (the share is timed by the reads
        # themselves; the margin covers the initiator's start and a slow answer).
        local t0=$EPOCHREALTIME
        $BUSY --from "$(calc "$t0 + $RAMP + 0.2")" \
            --to "$(calc "$t0 + $RAMP + ($SECS * 0.8 > $SECS - 1 ? $SECS * 0.8 : $SECS - 1)")" "$bkind" "$barg" \
            >"$WORK/busy" 2>"$WORK/busy.err" &
        sampler=$!
    fi
    case $ini in
        iscsi-bench) iscsi_bench "$url" "$rw" "$bs" "$qd" >"$WORK/result" 2>"$WORK/err" || rc=$? ;;
        iscsi-perf) iscsi_perf "$url" "$rw" "$bs" "$qd" >"$WORK/result" 2>"$WORK/err" || rc=$? ;;
    esac
    if [ -n "$sampler" ]; then
        if wait "$sampler"; then
            busy=$(cat "$WORK/busy")
        else
            echo "bench.sh: $label: busy time not read: $(cat "$WORK/busy.err")" >&2
        fi
    fi
    RUNS=$((RUNS + 1))
    [ "$rc" = 0 ] || FAILED+=("$label, $ini, $wname")
    python3 - "$part" "$target" "$net" "$label" "$MODE_NOW" "$ini" "$wname" "$rw" "$bs" "$qd" \
        "$busy" "$rc" "$WORK/result" "$WORK/err" "$RUNS" >>"$JSONL" <<'EOF'
import json, sys
part, target, net, label, mode, ini, wname, rw, bs, qd, busy, rc, res, err, n = sys.argv[1:]
rec = {"kind": "run", "part": part, "target": target, "net": net, "label": label, "mode": mode,
       "initiator": ini, "workload": wname, "rw": rw, "bs": int(bs), "qd": int(qd)}
result = None
if rc == "0":
    try:
        result = json.loads(open(res).read())
    except ValueError as e:
        rec["error"] = f"unreadable result: {e}"
else:
    msg = open(err).read().strip().splitlines()
    rec["error"] = " / ".join(msg[-3:]) or f"exit status {rc}"
if result is not None:
    rec["result"] = result
    iops = float(result.get("iops") or 0)
    if busy and iops > 0:
        rec["busy_us_per_io"] = round(float(busy) * 1e6 / iops, 3)
print(json.dumps(rec))
what = f"{float(result['mbps']):,.0f} MB/s" if result and int(bs) >= 65536 else \
    f"{float(result['iops']):,.0f} IOPS" if result else "FAILED: " + rec["error"]
if "busy_us_per_io" in rec:
    what += f", {rec['busy_us_per_io']:.2f} µs/IO"
print(f"[{int(n):3}] {label} / {ini} / {wname}: {what}", file=sys.stderr)
EOF
}

# measure TARGET NET LABEL URL BUSY_KIND BUSY_ARG: every initiator and workload against one LUN.
measure() {
    local target=$1 net=$2 label=$3 url=$4 bkind=$5 barg=$6 ini w
    for ini in $INITIATORS; do
        for w in "${WORKLOADS[@]}"; do
            # iscsi-perf cannot write.
            case "$ini|$w" in iscsi-perf*"|randwrite|"* | iscsi-perf*"|write|"*) continue ;; esac
            run_one matrix "$target" "$net" "$label" "$ini" "$url" "$bkind" "$barg" "$w"
        done
    done
}

# fill URL: the random data onto a LUN, from where the initiators run.
fill() {
    "${INI_WRAP[@]}" taskset -c "$INIT_CORE" qemu-img convert -n -f raw -O raw "$DATA" "$1" ||
        die "filling $1 with the test data failed"
}

# idle_cpu MODE URL: the target's ($TARGET_PID) CPU use, in %, over IDLE_SECS while one session
# (qemu-io, logged in and sleeping) is idle; recorded as an idle line.
idle_cpu() {
    local mode=$1 url=$2 q frac
    "${INI_WRAP[@]}" taskset -c "$INIT_CORE" qemu-io -f raw -c "sleep $(awk -v s="$IDLE_SECS" 'BEGIN {printf "%d", (s + 2) * 1000}')" "$url" \
        >"$WORK/qemu-io.log" 2>&1 &
    q=$!
    frac=$($BUSY --delay 1 --window "$IDLE_SECS" proc "$TARGET_PID") || die "cannot read the target's CPU time"
    kill -0 "$q" 2>/dev/null || die "qemu-io did not stay logged in to $url: $(cat "$WORK/qemu-io.log")"
    wait "$q" || die "qemu-io failed: $(cat "$WORK/qemu-io.log")"
    python3 -c "import json; print(json.dumps({'kind': 'idle', 'mode': '$mode', 'cpu_pct': round(100 * $frac, 2), 'secs': $IDLE_SECS}))" >>"$JSONL"
    echo "[idle] iscsi-tgt in $mode mode, one idle session: $(awk -v f="$frac" 'BEGIN {printf "%.1f", 100 * f}') % CPU" >&2
}

# --- the targets ---------------------------------------------------------------------------

# start_ours NET MODE: this build on the kernel path (127.0.0.1) or the veth path (af_packet),
# its reactor on TARGET_CORE, with a RAM LUN filled with the data; sets URL. The rest of the
# process (the RPC thread, idle while it runs) is not pinned: on the reactor's core a polling
# reactor would delay its answers to busy.py by up to a scheduler slice.
start_ours() {
    local net=$1 mode=$2
    if [ "$net" = kernel ]; then
        INI_WRAP=(env)
        spawn_target "$SOCK" "$WORK/target.log" "$BIN" \
            --listen "127.0.0.1:$OURS_PORT" --cores "$TARGET_CORE" --mode "$mode"
        URL=iscsi://127.0.0.1:$OURS_PORT/$IQN/0
    else
        INI_WRAP=(ip netns exec "$NS_I")
        spawn_target "$SOCK" "$WORK/target.log" ip netns exec "$NS_T" "$BIN" \
            --listen "$T_IP:$USTACK_PORT" --net af_packet:vt --ip "$T_IP/24" --cores "$TARGET_CORE" --mode "$mode"
        URL=iscsi://$T_IP:$USTACK_PORT/$IQN/0
    fi
    ram_target "$SOCK" "$IQN" "$SIZE_MB"
    fill "$URL"
}

stop_ours() {
    kill -0 "$TARGET_PID" 2>/dev/null || die "iscsi-tgt died during the benchmark: $(tail -5 "$WORK/target.log")"
    stop_target
    INI_WRAP=(env)
}

start_tgtd() {
    cp "$DATA" "$TGTD_IMG"
    # Its own control port (-C), so that it stays clear of any other tgtd on the machine.
    taskset -c "$TARGET_CORE" tgtd -f -C "$TGTD_PORT" --iscsi "portal=127.0.0.1:$TGTD_PORT" >"$WORK/tgtd.log" 2>&1 &
    TGTD_PID=$!
    local ok=0
    for _ in $(seq 1 50); do
        if tgtadm -C "$TGTD_PORT" --lld iscsi --mode target --op show >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "$TGTD_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ "$ok" = 1 ] || die "tgtd did not start: $(cat "$WORK/tgtd.log")"
    {
        tgtadm -C "$TGTD_PORT" --lld iscsi --mode target --op new --tid 1 --targetname "$TGTD_IQN" &&
            tgtadm -C "$TGTD_PORT" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$TGTD_IMG" &&
            tgtadm -C "$TGTD_PORT" --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
    } >"$WORK/tgtadm.log" 2>&1 || die "configuring tgtd failed: $(cat "$WORK/tgtadm.log")"
    URL=iscsi://127.0.0.1:$TGTD_PORT/$TGTD_IQN/1
}

stop_tgtd() {
    [ -n "$TGTD_PID" ] || return 0
    # tgtd does not always leave on SIGTERM while it has targets.
    kill "$TGTD_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do
        kill -0 "$TGTD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$TGTD_PID" 2>/dev/null || true
    wait "$TGTD_PID" 2>/dev/null || true
    TGTD_PID=
    rm -f "$TGTD_IMG"
}

# start_spdk: SPDK's iscsi_tgt on TARGET_CORE, a 1 GiB malloc bdev exported as LUN 0 and
# filled with the data; sets URL. The bdev lives in 2 MiB hugepages: about 1100 must be free
# (less those other processes have reserved); the count is raised if need be and put back at
# exit (unless someone changed it since).
start_spdk() {
    local free
    mountpoint -q /dev/hugepages || mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages ||
        die "cannot mount hugetlbfs on /dev/hugepages for SPDK"
    free=$(awk '/^HugePages_Free:/ {f = $2} /^HugePages_Rsvd:/ {r = $2} END {print f - r}' /proc/meminfo)
    if [ "$free" -lt 1100 ]; then
        HP_BEFORE=$(cat /proc/sys/vm/nr_hugepages)
        HP_SET=$((HP_BEFORE + 1100 - free))
        echo "$HP_SET" >/proc/sys/vm/nr_hugepages
        HP_SET=$(cat /proc/sys/vm/nr_hugepages)
    fi
    rm -f "$SPDK_SOCK"
    taskset -c "$TARGET_CORE" "$SPDK_BIN" -m "$(printf 0x%x $((1 << TARGET_CORE)))" -r "$SPDK_SOCK" \
        >"$WORK/spdk.log" 2>&1 &
    SPDK_PID=$!
    local ok=0
    for _ in $(seq 1 150); do
        if [ -S "$SPDK_SOCK" ] && $SPDK_RPC -t 2 framework_wait_init >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "$SPDK_PID" 2>/dev/null || break
        sleep 0.2
    done
    [ "$ok" = 1 ] || die "SPDK's iscsi_tgt did not start: $(tail -20 "$WORK/spdk.log")"
    {
        $SPDK_RPC bdev_malloc_create -b Malloc0 "$SIZE_MB" 512 &&
            $SPDK_RPC iscsi_create_portal_group 1 "127.0.0.1:$SPDK_PORT" &&
            $SPDK_RPC iscsi_create_initiator_group 2 ANY ANY &&
            $SPDK_RPC iscsi_create_target_node bench bench Malloc0:0 1:2 256 -d
    } >"$WORK/spdk-rpc.log" 2>&1 || die "configuring SPDK failed: $(tail -20 "$WORK/spdk-rpc.log" "$WORK/spdk.log")"
    URL=iscsi://127.0.0.1:$SPDK_PORT/iqn.2016-06.io.spdk:bench/0
    fill "$URL"
}

# stop_spdk: SIGINT (its clean shutdown), SIGKILL after 10 s; then what its DPDK left behind.
stop_spdk() {
    if [ -n "$SPDK_PID" ]; then
        kill -INT "$SPDK_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SPDK_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SPDK_PID" 2>/dev/null || true
        wait "$SPDK_PID" 2>/dev/null || true
        rm -rf "/var/run/dpdk/spdk_pid$SPDK_PID"
        rm -f /dev/hugepages/spdk_pid"$SPDK_PID"map_*
        SPDK_PID=
    fi
    if [ -n "$HP_SET" ] && [ "$(cat /proc/sys/vm/nr_hugepages)" = "$HP_SET" ]; then
        echo "$HP_BEFORE" >/proc/sys/vm/nr_hugepages
    fi
    HP_SET=
}

# --- the run ---------------------------------------------------------------------------------

# The same random data for every target.
dd if=/dev/urandom of="$DATA" bs=1M count="$SIZE_MB" status=none || die "cannot write $DATA"
python3 - "$SECS" "$RAMP" "$MODE" "$TARGET_CORE" "$INIT_CORE" "$(git -C "$ROOT" rev-parse --short HEAD)" \
    "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" "$QUICK" "${NOTE:-}" >>"$JSONL" <<'EOF'
import json, sys, time
secs, ramp, mode, tc, ic, commit, cpu, quick, note = sys.argv[1:]
print(json.dumps({"kind": "meta", "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit,
                  "cpu": cpu, "secs": float(secs), "ramp": float(ramp), "mode": mode,
                  "target_core": int(tc), "init_core": int(ic), "quick": quick == "1",
                  "note": note}))
EOF
[ "$BENCH_JSON" = 1 ] || echo "bench.sh: this iscsi-bench has no --json: its older flags are used (no latencies, the ramp-up counted)" >&2
MODE_NOW=$MODE

# The loopback ceiling: iperf3's server on the target's core sends (-R) to the client on the
# initiator's, as a target does for a read.
taskset -c "$TARGET_CORE" iperf3 -s -1 -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 &
IPERF_PID=$!
ok=0
for _ in $(seq 1 50); do
    if ss -Hltn "sport = :$IPERF_PORT" | grep -q .; then ok=1; break; fi
    kill -0 "$IPERF_PID" 2>/dev/null || break
    sleep 0.1
done
[ "$ok" = 1 ] || die "iperf3's server did not start: $(cat "$WORK/iperf3-server.log")"
# iperf3 -J exits 0 even when it cannot connect: its JSON says whether it ran.
taskset -c "$INIT_CORE" iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -R -t "$SECS" -J >"$WORK/iperf3.json" 2>&1 || true
# Gone after its one test; not if the client never reached it.
kill "$IPERF_PID" 2>/dev/null || true
wait "$IPERF_PID" 2>/dev/null || true
python3 - "$SECS" "$WORK/iperf3.json" >>"$JSONL" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
if "error" in r or "sum_received" not in r.get("end", {}):
    sys.exit("bench.sh: iperf3 failed: " + r.get("error", "no result"))
mbps = r["end"]["sum_received"]["bits_per_second"] / 8 / 1e6
print(json.dumps({"kind": "iperf3", "mbps": round(mbps, 1), "secs": float(sys.argv[1])}))
print(f"[iperf3] loopback ceiling: {mbps:,.0f} MB/s", file=sys.stderr)
EOF

if wants iscsi-tgt-kernel; then
    start_ours kernel "$MODE"
    idle_cpu "$MODE" "$URL"
    measure iscsi-tgt kernel "iscsi-tgt kernel TCP" "$URL" reactors "$SOCK"
    stop_ours
fi

if wants iscsi-tgt-af_packet; then
    NETNS=1
    netns_pair "$NS_T" "$NS_I" "$TARGET_CORE" "$INIT_CORE"
    ip -n "$NS_I" addr add "$I_IP/24" dev vi
    start_ours af_packet "$MODE"
    measure iscsi-tgt af_packet "iscsi-tgt userspace TCP" "$URL" reactors "$SOCK"
    stop_ours
fi

if wants tgtd; then
    start_tgtd
    fill "$URL"
    measure tgtd kernel tgtd "$URL" proc "$TGTD_PID"
    stop_tgtd
fi

if wants spdk; then
    start_spdk
    measure spdk kernel SPDK "$URL" spdk "$SPDK_SOCK"
    kill -0 "$SPDK_PID" 2>/dev/null || die "SPDK's iscsi_tgt died during the benchmark: $(tail -5 "$WORK/spdk.log")"
    stop_spdk
fi

for p in "${PEER_NAMES[@]}"; do
    wants "$p" || continue
    fill "${PEER_URL[$p]}"
    if [ -n "${PEER_RPC[$p]}" ]; then
        measure "$p" peer "$p" "${PEER_URL[$p]}" spdk "${PEER_RPC[$p]}"
    else
        measure "$p" peer "$p" "${PEER_URL[$p]}" none -
    fi
done

# The other mode of iscsi-tgt, on the kernel path: idle CPU and 4 KiB random reads at QD32.
if wants iscsi-tgt-kernel; then
    MODE_NOW=$OTHER_MODE
    start_ours kernel "$OTHER_MODE"
    idle_cpu "$OTHER_MODE" "$URL"
    run_one modes iscsi-tgt kernel "iscsi-tgt kernel TCP ($OTHER_MODE)" iscsi-bench "$URL" reactors "$SOCK" \
        "4 KiB random read QD32|randread|4096|32"
    stop_ours
    MODE_NOW=$MODE
fi

# RSS=1: memory over a long mixed run.
if [ "$RSS" = 1 ]; then
    start_ours kernel "$MODE"
    SECS_SAVE=$SECS RAMP_SAVE=$RAMP
    SECS=$((RSS_SECS + RSS_WARMUP)) RAMP=0
    iscsi_bench "$URL" randrw 4096 32 --read-pct 70 >"$WORK/rss-run.json" 2>"$WORK/rss-run.err" &
    RSS_RUN=$!
    SECS=$SECS_SAVE RAMP=$RAMP_SAVE
    sleep "$RSS_WARMUP"
    samples=()
    for _ in $(seq 1 $((RSS_SECS / 10))); do
        kill -0 "$RSS_RUN" 2>/dev/null || break
        samples+=("$(awk '/^VmRSS:/ {print $2}' "/proc/$TARGET_PID/status")")
        sleep 10
    done
    wait "$RSS_RUN" || die "the mixed run failed: $(cat "$WORK/rss-run.err")"
    [ "${#samples[@]}" -gt 0 ] || die "no VmRSS sample taken"
    python3 -c "import json, sys; s = [int(x) for x in sys.argv[1:]]; print(json.dumps({'kind': 'rss', 'samples_kb': s, 'interval_secs': 10, 'secs': $RSS_SECS}))" \
        "${samples[@]}" >>"$JSONL"
    echo "[rss] VmRSS ${samples[*]} KiB" >&2
    stop_ours
fi

"$PLOT" --out "$OUT" "$JSONL" || die "iscsi-bench-plot failed"
elapsed=$SECONDS
total=$(printf 'Total time: %dm%02ds (%d runs).' $((elapsed / 60)) $((elapsed % 60)) "$RUNS")
echo "$total" >>"$OUT/results.md"
printf '\n%s\n' "$total"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'bench.sh: %d runs failed:\n' "${#FAILED[@]}" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
    exit 1
fi

#!/usr/bin/env bash
# Where a running iSCSI target's time goes under a fixed load, for any target process (this
# one, SPDK's iscsi_tgt, tgtd): it drives the LUN at URL from INIT_CORE and, over a steady
# window, records the target's CPU profile, system calls, TCP segments and bytes, CPU time and
# (when it can ask) its reactors' busy time; then prints everything per I/O.
#
#   URL=iscsi://127.0.0.1:3260/IQN/LUN PID=<target pid> scripts/profile.sh
#
#   SECS=8          the main window: perf record and the counters
#   QD=32 BS=4096   queue depth and bytes per I/O
#   RW=randread     randread | read | randwrite | write. Reads are driven by libiscsi's
#                   iscsi-perf (which only reads); writes by the crate's iscsi-bench
#                   (--write; built when missing). LOAD=iscsi-bench drives reads with it too.
#   INIT_CORE=0     the core the load generator is pinned to
#   TOOLS_CORE=INIT_CORE   the core this script and its tools (perf, rpc.py, ss) run on: not
#                   the target's, whose time they would otherwise take
#   OUT=DIR         where the raw data and reports go (default: a new /tmp/profile.* folder)
#   WARMUP=2        seconds of load before the window
#   SYSCALL_SECS=3  two later windows of this length for system calls, each with its own I/O
#                   count: first one counts the calls and their failures (perf stat on the
#                   syscalls:sys_enter_* and sys_exit_* tracepoints, ret < 0, of the network,
#                   polling and clock calls), which slows a polling target somewhat (it says
#                   how much): the calls per I/O come from that one; then one traces every call
#                   (all names, time per call), which slows the target a lot
#   SYSCALLS=perf   the tracer: perf (perf trace -s) | strace (strace -c -f) | none
#   TCPDUMP=1       also capture the port for 1 s and report segment sizes per direction
#   RPC=SOCK        this target's RPC socket: reactors' busy_ns/idle_ns (rpc/rpc.py tree reactors)
#   SPDK_RPC=SOCK SPDK_DIR=DIR   SPDK's: framework_get_reactors busy/idle ticks over tick_rate
#
# The I/O count of a window comes from the target's own TCP counters for the connections on
# the portal's port (ss -ti: bytes received): a READ command is one 48-byte BHS, a WRITE its BHS
# and BS bytes of data. Header digests or other PDUs would skew it; the initiator's own IOPS is
# printed beside it as a check. Needs root (perf, strace, /proc of another process).
set -euo pipefail
# lib.sh sets RPC to its rpc.py command line: keep the caller's RPC (a socket path) first.
TGT_RPC=${RPC:-}
# shellcheck source=/dev/null # lib.sh, checked on its own
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (perf and strace attach to another process)"
[ -n "${URL:-}" ] || die "URL=iscsi://HOST:PORT/IQN/LUN is required"
[ -n "${PID:-}" ] || die "PID=<the target's process id> is required"
[[ $PID =~ ^[0-9]+$ ]] || die "PID must be a process id, not '$PID'"
kill -0 "$PID" 2>/dev/null || die "PID $PID is not a running process"
[[ $URL =~ ^iscsi://([^/]+)/([^/]+)/([0-9]+)$ ]] || die "URL must look like iscsi://HOST:PORT/IQN/LUN, not $URL"
HOSTPORT=${BASH_REMATCH[1]}
IQN=${BASH_REMATCH[2]}
LUN=${BASH_REMATCH[3]}
PORT=3260
[[ $HOSTPORT =~ :([0-9]+)$ ]] && PORT=${BASH_REMATCH[1]}
SECS=${SECS:-8}
QD=${QD:-32}
BS=${BS:-4096}
RW=${RW:-randread}
INIT_CORE=${INIT_CORE:-0}
WARMUP=${WARMUP:-2}
SYSCALL_SECS=${SYSCALL_SECS:-3}
SYSCALLS=${SYSCALLS:-perf}
TCPDUMP=${TCPDUMP:-0}
SPDK_RPC=${SPDK_RPC:-}
SPDK_DIR=${SPDK_DIR:-}
[[ $INIT_CORE =~ ^[0-9]+$ ]] || die "INIT_CORE must be a core number"
TOOLS_CORE=${TOOLS_CORE:-$INIT_CORE}
taskset -cp "$TOOLS_CORE" $$ >/dev/null || die "cannot pin this script to core $TOOLS_CORE (TOOLS_CORE)"
for v in SECS QD BS WARMUP SYSCALL_SECS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
case $RW in
    randread | read) LOAD=${LOAD:-iscsi-perf} ;;
    randwrite | write) LOAD=iscsi-bench ;;
    *) die "RW must be randread, read, randwrite or write, not $RW" ;;
esac
case $SYSCALLS in perf | strace | none) ;; *) die "SYSCALLS must be perf, strace or none" ;; esac
if [ -n "$TGT_RPC" ]; then
    [ -S "$TGT_RPC" ] || die "RPC=$TGT_RPC is not a socket"
fi
if [ -n "$SPDK_RPC" ]; then
    [ -S "$SPDK_RPC" ] || die "SPDK_RPC=$SPDK_RPC is not a socket"
    [ -x "$SPDK_DIR/scripts/rpc.py" ] || die "SPDK_RPC needs SPDK_DIR, the SPDK tree whose scripts/rpc.py to use"
fi

have_tools() {
    local c
    for c in iscsi-perf iscsi-readcapacity16 perf strace tcpdump ss taskset python3; do
        command -v "$c" >/dev/null || return 1
    done
}
have_tools || "$ROOT/scripts/setup.sh"
have_tools || die "missing tools after setup.sh (iscsi-perf, perf, strace, tcpdump, ss, taskset, python3)"
if [ "$LOAD" = iscsi-bench ]; then
    [ -x "$ROOT/target/release/iscsi-bench" ] || build_release
fi

OUT=${OUT:-$(mktemp -d /tmp/profile.XXXXXX)}
mkdir -p "$OUT"
LOAD_PID=
TRACER_PID=
cleanup() {
    [ -z "$TRACER_PID" ] || kill -INT "$TRACER_PID" 2>/dev/null || true
    if [ -n "$LOAD_PID" ] && kill -0 "$LOAD_PID" 2>/dev/null; then
        kill -INT "$LOAD_PID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$LOAD_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# The LUN's block size (iscsi-perf counts in blocks).
BLOCK=$(iscsi-readcapacity16 "$URL" 2>&1 | sed -nE 's/^LOGICAL BLOCK LENGTH IN BYTES:([0-9]+).*/\1/p')
[ -n "$BLOCK" ] || die "cannot read the capacity of $URL (is the target serving it?)"
[ $((BS % BLOCK)) -eq 0 ] || die "BS=$BS is not a multiple of the LUN's $BLOCK-byte blocks"

# The target's connections are in its own network namespace (ss must look there).
in_target_ns() {
    if [ "$(readlink /proc/$$/ns/net)" = "$(readlink "/proc/$PID/ns/net")" ]; then
        "$@"
    else
        nsenter -t "$PID" -n "$@"
    fi
}

# snap NAME [quick]: the counters at this moment into $OUT/snap-NAME/ (parsed by the summary);
# quick leaves out the reactors' RPC, which takes a while.
snap() {
    local d=$OUT/snap-$1 t
    mkdir -p "$d"
    # The reactors first: an RPC takes longest, and each part carries its own time (taken when
    # the answer is in: the client's start-up, not the query, is what takes the time).
    if [ -n "${2:-}" ]; then
        :
    elif [ -n "$TGT_RPC" ]; then
        $RPC -s "$TGT_RPC" tree reactors >"$d/reactors.json" || die "rpc.py -s $TGT_RPC tree reactors failed"
        date +%s.%N >"$d/reactors.t"
    elif [ -n "$SPDK_RPC" ]; then
        python3 "$SPDK_DIR/scripts/rpc.py" -s "$SPDK_RPC" framework_get_reactors >"$d/spdk-reactors.json" ||
            die "SPDK's rpc.py -s $SPDK_RPC framework_get_reactors failed"
        date +%s.%N >"$d/reactors.t"
    fi
    date +%s.%N >"$d/t"
    in_target_ns ss -tinH state established "( sport = :$PORT )" >"$d/ss"
    cat /proc/net/snmp >"$d/snmp"
    cat "/proc/$PID/stat" >"$d/stat"
    cat "/proc/$PID/io" >"$d/io" 2>/dev/null || true
    cat "/proc/$PID"/task/*/schedstat >"$d/schedstat" 2>/dev/null || true
    cat "/proc/$LOAD_PID/stat" >"$d/load-stat" 2>/dev/null || true
    cat "/proc/$LOAD_PID"/task/*/schedstat >"$d/load-schedstat" 2>/dev/null || true
    t=$(date +%s.%N)
    echo "$t" >"$d/t-end"
}

alive() {
    kill -0 "$PID" 2>/dev/null || die "the target (PID $PID) exited"
    kill -0 "$LOAD_PID" 2>/dev/null || { cat "$OUT/load.txt" >&2; die "the load generator exited early"; }
}

TOTAL=$((WARMUP + SECS + SYSCALL_SECS + 2))
[ "$SYSCALLS" = none ] || TOTAL=$((TOTAL + SYSCALL_SECS + 1))
[ "$TCPDUMP" = 1 ] && TOTAL=$((TOTAL + 2))

# The load, pinned.
date +%s.%N >"$OUT/load.t"
if [ "$LOAD" = iscsi-perf ]; then
    args=(-m "$QD" -b $((BS / BLOCK)))
    [ "$RW" = randread ] && args+=(-r)
    taskset -c "$INIT_CORE" iscsi-perf "${args[@]}" "$URL" >"$OUT/load.txt" 2>&1 &
else
    args=(--portal "$HOSTPORT" --target "$IQN" --lun "$LUN" --bs "$BS" --qd "$QD" --secs $((TOTAL + 5)))
    [ "$BLOCK" = 512 ] || args+=(--blocksize "$BLOCK")
    case $RW in randwrite) args+=(--write --random) ;; write) args+=(--write) ;; randread) args+=(--random) ;; esac
    taskset -c "$INIT_CORE" "$ROOT/target/release/iscsi-bench" "${args[@]}" >"$OUT/load.txt" 2>&1 &
fi
LOAD_PID=$!
echo "profile.sh: $RW ${BS} B QD$QD with $LOAD on core $INIT_CORE against PID $PID ($URL); output in $OUT" >&2
sleep "$WARMUP"
alive

# The main window: perf samples and the counters.
snap a
perf record -q -e cpu-clock -g -p "$PID" -o "$OUT/perf.data" -- sleep "$SECS" >"$OUT/perf-record.log" 2>&1 ||
    die "perf record failed: $(cat "$OUT/perf-record.log")"
snap b
alive

# System calls, counted: entries, and exits with an error, of the calls an iSCSI target's
# data path may make (those the kernel has tracepoints for). Right after the main window, when
# the machine is as it was then; the tracer, which disturbs more, comes after.
NAMES="read readv recvfrom recvmsg recvmmsg write writev sendmsg sendto sendmmsg epoll_wait
    epoll_pwait epoll_pwait2 epoll_ctl poll ppoll select pselect6 io_uring_enter futex accept
    accept4 clock_gettime clock_nanosleep nanosleep sched_yield getrusage ioctl fcntl"
events=()
for n in $NAMES; do
    [ -d "/sys/kernel/tracing/events/syscalls/sys_enter_$n" ] || continue
    events+=(-e "syscalls:sys_enter_$n" -e "syscalls:sys_exit_$n" --filter 'ret < 0')
done
if [ ${#events[@]} -gt 0 ]; then
    # Setting up that many counters takes perf a few seconds, and they count from when its
    # command starts to when it ends: the command takes the window's snapshots itself.
    export -f snap in_target_ns die
    export OUT PID PORT LOAD_PID
    # shellcheck disable=SC2016 # expanded by the inner shell
    if ! perf stat -x, "${events[@]}" -p "$PID" -o "$OUT/syscall-counts.csv" -- \
        bash -c 'snap e quick && sleep "$1" && snap f quick' count "$SYSCALL_SECS" >"$OUT/perf-stat.log" 2>&1; then
        echo "profile.sh: perf stat could not count system calls: $(cat "$OUT/perf-stat.log")" >&2
        rm -f "$OUT/syscall-counts.csv"
    fi
    alive
else
    echo "profile.sh: no syscall tracepoints under /sys/kernel/tracing: system calls are not counted" >&2
fi

# System calls, traced: every name (the list above may miss one) and the time per call.
if [ "$SYSCALLS" != none ]; then
    snap c quick
    if [ "$SYSCALLS" = perf ]; then
        perf trace -s -p "$PID" -o "$OUT/syscalls.txt" >"$OUT/syscalls.log" 2>&1 &
    else
        strace -c -f -p "$PID" -o "$OUT/syscalls.txt" >"$OUT/syscalls.log" 2>&1 &
    fi
    TRACER_PID=$!
    sleep "$SYSCALL_SECS"
    kill -INT "$TRACER_PID" 2>/dev/null || true
    wait "$TRACER_PID" 2>/dev/null || true
    TRACER_PID=
    snap d quick
    grep -q calls "$OUT/syscalls.txt" 2>/dev/null ||
        die "$SYSCALLS found no system calls ($(cat "$OUT/syscalls.log")); SYSCALLS=strace or none"
    echo "$SYSCALLS" >"$OUT/syscalls.kind"
    alive
fi

if [ "$TCPDUMP" = 1 ]; then
    timeout -s INT 1 tcpdump -i any -nn -q -tt "tcp port $PORT" >"$OUT/tcpdump.txt" 2>"$OUT/tcpdump.log" || true
fi

date +%s.%N >"$OUT/load-stop.t"
kill -INT "$LOAD_PID" 2>/dev/null || true
wait "$LOAD_PID" 2>/dev/null || true
LOAD_PID=

perf report -i "$OUT/perf.data" --no-children --sort sym --stdio -g none --percent-limit 0.3 \
    >"$OUT/perf-top.txt" 2>/dev/null || die "perf report failed"
perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none >"$OUT/perf-dso.txt" 2>/dev/null || true
perf report -i "$OUT/perf.data" --children --sort sym --stdio -g none >"$OUT/perf-children.txt" 2>/dev/null || true
perf report -i "$OUT/perf.data" --no-children --sort sym --stdio >"$OUT/perf-report.txt" 2>/dev/null || true

SECS=$SECS QD=$QD BS=$BS RW=$RW LOAD=$LOAD INIT_CORE=$INIT_CORE TARGET_PID=$PID TCPDUMP=$TCPDUMP \
    PORT=$PORT python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, re, sys

out = sys.argv[1]
E = os.environ
secs, bs, qd, rw = int(E["SECS"]), int(E["BS"]), int(E["QD"]), E["RW"]
reads = rw.endswith("read")
hz = os.sysconf("SC_CLK_TCK")


def rd(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def stat_ticks(text):
    # Fields after the command name, which may hold spaces: utime and stime are 14 and 15.
    f = text.rsplit(")", 1)[-1].split() if text else []
    return int(f[11]) + int(f[12]) if len(f) > 12 else None


def schedstat(text):
    run = wait = 0
    for line in text.splitlines():
        p = line.split()
        if len(p) >= 2:
            run += int(p[0])
            wait += int(p[1])
    return run, wait


def ss_counters(text):
    keys = ("bytes_acked", "bytes_received", "segs_out", "segs_in", "data_segs_out",
            "data_segs_in", "bytes_retrans")
    c = dict.fromkeys(keys, 0)
    for k in keys:
        for m in re.finditer(r"\b%s:(\d+)" % k, text):
            c[k] += int(m.group(1))
    c["conns"] = sum(1 for line in text.splitlines() if line and not line[0].isspace())
    return c


def snmp(text):
    lines = [l.split() for l in text.splitlines() if l.startswith("Tcp:")]
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def reactors(d):
    """(busy ns, idle ns) summed over the target's reactors, or None."""
    j = rd(d + "/reactors.json")
    if j:
        r = json.loads(j)
        return (sum(int(v["busy_ns"]) for v in r.values()),
                sum(int(v["idle_ns"]) for v in r.values()),
                sum(int(v["iterations"]) for v in r.values()))
    j = rd(d + "/spdk-reactors.json")
    if j:
        r = json.loads(j)
        rate = r["tick_rate"]
        return (sum(x["busy"] for x in r["reactors"]) * 1e9 / rate,
                sum(x["idle"] for x in r["reactors"]) * 1e9 / rate, None)
    return None


def snap(name):
    d = f"{out}/snap-{name}"
    s = {"t": float(rd(d + "/t")), "t_end": float(rd(d + "/t-end"))}
    s["ticks"] = stat_ticks(rd(d + "/stat"))
    s["sched"] = schedstat(rd(d + "/schedstat"))
    s["load_ticks"] = stat_ticks(rd(d + "/load-stat"))
    s["load_sched"] = schedstat(rd(d + "/load-schedstat"))
    s["ss"] = ss_counters(rd(d + "/ss"))
    s["snmp"] = snmp(rd(d + "/snmp"))
    io = dict(l.split(": ") for l in rd(d + "/io").splitlines() if ": " in l)
    s["io"] = {k: int(v) for k, v in io.items()}
    s["reactors"] = reactors(d)
    rt = rd(d + "/reactors.t")
    s["rt"] = float(rt) if rt else None
    return s


def ios_of(a, b):
    """I/Os between two snapshots, from the bytes the target received."""
    rx = b["ss"]["bytes_received"] - a["ss"]["bytes_received"]
    return rx / 48 if reads else rx / (bs + 48)


def window(a, b):
    w = {"dt": b["t"] - a["t"]}
    w["ios"] = ios_of(a, b)
    w["iops"] = w["ios"] / w["dt"]
    d = {k: b["ss"][k] - a["ss"][k] for k in a["ss"]}
    w["ss"] = d
    w["conns"] = b["ss"]["conns"]
    # Share of the window the target was runnable but not running (others on its core).
    w["waited"] = (b["sched"][1] - a["sched"][1]) / 1e9 / w["dt"]
    return w


a, b = snap("a"), snap("b")
W = window(a, b)
ios = max(W["ios"], 1)
dt = W["dt"]
p = print
p()
p(f"== {rw} {bs} B QD{qd}, {E['LOAD']} on core {E['INIT_CORE']}, target PID {E['TARGET_PID']}, "
  f"port {E['PORT']}: {dt:.1f} s window ==")
if W["conns"] == 0:
    p("!! no established connection on the port at the end of the window (wrong PID or port?)")

# Throughput, as the target's counters and as the initiator sees it.
load = rd(out + "/load.txt").replace("\r", "\n")
init_iops = None
t_load = float(rd(out + "/load.t"))
cur = [(int(h) * 3600 + int(m) * 60 + int(s_), int(v)) for h, m, s_, v in
       re.findall(r"(\d\d):(\d\d):(\d\d) - .*?iops current (\d+)", load)]
lo, hi = a["t"] - t_load, b["t"] - t_load
inside = [v for t, v in cur if lo + 1 <= t <= hi]
if inside:
    init_iops = sum(inside) / len(inside)
else:
    m = re.findall(r"iops average (\d+)", load) or re.findall(r"^iops (\d+)", load, re.M)
    if m:
        init_iops = float(m[-1])
p(f"IOPS (target's TCP counters)     {W['iops']:10.0f}   {W['iops'] * bs / 1e6:8.1f} MB/s")
if init_iops is not None:
    p(f"IOPS (initiator's own report)    {init_iops:10.0f}   "
      f"({'its per-second figures in the window' if inside else 'its average over the whole run'})")

# The target's CPU.
cpu_s = (b["ticks"] - a["ticks"]) / hz
run_ns = b["sched"][0] - a["sched"][0]
wait_ns = b["sched"][1] - a["sched"][1]
p()
p("Target CPU")
p(f"  utime+stime                    {100 * cpu_s / dt:6.0f} % of a core   {cpu_s * 1e6 / ios:8.2f} µs/IO")
p(f"  on CPU (schedstat)             {100 * run_ns / 1e9 / dt:6.0f} % of a core   {run_ns / 1e3 / ios:8.2f} µs/IO")
p(f"  runnable, waiting for a CPU    {100 * wait_ns / 1e9 / dt:6.0f} % of a core   "
  "(others on its core: the figures above are then too high or too low)")
if a["reactors"] and b["reactors"]:
    rdt = b["rt"] - a["rt"]
    busy = b["reactors"][0] - a["reactors"][0]
    idle = b["reactors"][1] - a["reactors"][1]
    # Rates, not sums: the reactors' RPC runs at slightly different moments than the counters.
    busy_per_io = (busy / rdt) / W["iops"] / 1e3 if W["iops"] else 0
    p(f"  reactors busy                  {100 * busy / max(busy + idle, 1):6.0f} %          "
      f"{busy_per_io:8.2f} µs/IO   (its own accounting; a pre-empted busy spell counts too)")
    if a["reactors"][2] is not None:
        it = b["reactors"][2] - a["reactors"][2]
        p(f"  reactor iterations             {it / rdt / W['iops'] if W['iops'] else 0:8.2f} per I/O")

# The initiator.
if a["load_ticks"] is not None and b["load_ticks"] is not None:
    lcpu = (b["load_ticks"] - a["load_ticks"]) / hz
    lwait = (b["load_sched"][1] - a["load_sched"][1]) / 1e9
    p()
    p(f"Initiator ({E['LOAD']}, core {E['INIT_CORE']}): {100 * lcpu / dt:.0f} % of a core, "
      f"{lcpu * 1e6 / ios:.2f} µs/IO; waited for its CPU {100 * lwait / dt:.0f} % of the time"
      + ("  -> it saturates its core: the target may be waiting on it" if lcpu / dt > 0.9 else ""))

# TCP: segments and bytes of the target's connections.
s = W["ss"]
p()
p(f"TCP, the target's {W['conns']} connection(s) on port {E['PORT']} (ss -ti)")
p(f"  segments out {s['segs_out'] / ios:6.2f}/IO (with data {s['data_segs_out'] / ios:5.2f}), "
  f"in {s['segs_in'] / ios:6.2f}/IO (with data {s['data_segs_in'] / ios:5.2f})")
p(f"  bytes out {s['bytes_acked'] / ios:8.0f}/IO, {s['bytes_acked'] / max(s['data_segs_out'], 1):8.0f}/data segment; "
  f"in {s['bytes_received'] / ios:8.0f}/IO, {s['bytes_received'] / max(s['data_segs_in'], 1):8.0f}/data segment"
  + (f"; retransmitted {s['bytes_retrans']} bytes" if s["bytes_retrans"] else ""))
# PDUs from the bytes: each PDU a 48-byte BHS (no digests, no AHS), data being BS per I/O.
if reads:
    pdus_out = (s["bytes_acked"] / ios - bs) / 48
    pdus_in = 1.0
else:
    pdus_out = s["bytes_acked"] / ios / 48
    pdus_in = (s["bytes_received"] / ios - bs) / 48
p(f"  PDUs (from the bytes, 48-byte headers): out {pdus_out:.2f}/IO = "
  f"{pdus_out * ios / max(s['data_segs_out'], 1):.2f} per data segment; in {pdus_in:.2f}/IO = "
  f"{pdus_in * ios / max(s['data_segs_in'], 1):.2f} per data segment")
sn = {k: b["snmp"].get(k, 0) - a["snmp"].get(k, 0) for k in ("InSegs", "OutSegs")}
p(f"  whole host (/proc/net/snmp, every connection, others' too): InSegs {sn['InSegs'] / ios:.2f}/IO, "
  f"OutSegs {sn['OutSegs'] / ios:.2f}/IO")
if a["io"] and b["io"]:
    di = {k: b["io"][k] - a["io"][k] for k in ("rchar", "wchar", "syscr", "syscw")}
    p(f"  /proc/PID/io (read/write/readv/writev only, not recv*/send*): rchar {di['rchar'] / ios:.0f}/IO, "
      f"wchar {di['wchar'] / ios:.0f}/IO, syscr {di['syscr'] / ios:.2f}/IO, syscw {di['syscw'] / ios:.2f}/IO")

# System calls: counted by name in one window, traced (failures, time) in another.
SENDS = ("write", "writev", "sendmsg", "sendto", "sendmmsg", "pwritev2")
RECVS = ("read", "readv", "recvmsg", "recvfrom", "recvmmsg", "preadv2")
counts = {}
CW = None
if rd(out + "/syscall-counts.csv"):
    CW = window(snap("e"), snap("f"))
for line in rd(out + "/syscall-counts.csv").splitlines():
    f = line.split(",")
    m = re.match(r"syscalls:sys_(enter|exit)_(\w+)$", f[2]) if len(f) > 3 else None
    if m and f[0].isdigit() and f[3].isdigit() and int(f[3]) > 0:
        # perf counts from a little after its command starts: scale to the snapshots' window.
        counts.setdefault(m.group(2), [0, 0])[m.group(1) == "exit"] = int(f[0]) * CW["dt"] / (int(f[3]) / 1e9)
counts = {n: c for n, c in counts.items() if c[0] > 0}
kind = rd(out + "/syscalls.kind").strip()
traced = {}
if kind:
    c, d = snap("c"), snap("d")
    SW = window(c, d)
    text = rd(out + "/syscalls.txt")
    if kind == "perf":
        # name, calls, errors, total ms, min, avg ms (one block per thread)
        for m in re.finditer(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s", text, re.M):
            x = traced.setdefault(m.group(1), [0, 0, 0.0])
            x[0] += int(m.group(2))
            x[1] += int(m.group(3))
            x[2] += float(m.group(4)) * 1e3
    else:
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 5 and re.match(r"^[\d.]+$", f[0]) and f[-1] != "total":
                x = traced.setdefault(f[-1], [0, 0, 0.0])
                x[0] += int(f[3])
                x[1] += int(f[4]) if len(f) == 6 else 0
                x[2] += float(f[1]) * 1e6
p()
if counts and CW:
    cios = max(CW["ios"], 1)
    cs = CW["ss"]
    # Counting costs each counted call a little, which a polling target pays on every empty
    # poll: it then polls less often per I/O and batches more. Its IOPS against the main
    # window's shows by how much.
    p(f"System calls per I/O (perf stat on their tracepoints, a {CW['dt']:.1f} s window at {CW['iops']:.0f} IOPS, "
      f"{100 * CW['iops'] / max(W['iops'], 1):.0f}% of the main window's; "
      f"the target waited for its CPU {100 * CW['waited']:.0f}% of it)")
    for n, (k, e) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
        if k / cios < 0.005:
            continue
        extra = f"   ({e / cios:.3f}/IO failed: EAGAIN and the like)" if e else ""
        if n in traced and traced[n][0]:
            extra += f"   {traced[n][2] / traced[n][0]:6.2f} µs/call traced"
        p(f"  {n:16s} {k / cios:8.3f}/IO{extra}")
    ns = sum(counts.get(n, [0, 0])[0] for n in SENDS)
    nsok = ns - sum(counts.get(n, [0, 0])[1] for n in SENDS)
    nr = sum(counts.get(n, [0, 0])[0] for n in RECVS)
    nrok = nr - sum(counts.get(n, [0, 0])[1] for n in RECVS)
    if nsok > 0:
        p(f"  send calls {ns / cios:.3f}/IO ({nsok / cios:.3f} moved data): {cs['bytes_acked'] / nsok:8.0f} bytes "
          f"and {cs['data_segs_out'] / nsok:.2f} data segments per call that moved data")
    if nrok > 0:
        p(f"  recv calls {nr / cios:.3f}/IO ({nrok / cios:.3f} moved data): {cs['bytes_received'] / nrok:8.0f} bytes "
          f"and {cs['data_segs_in'] / nrok:.2f} data segments per call that moved data")
if traced:
    tot = max(sum(t[0] for t in traced.values()), 1)
    p(f"Traced ({'perf trace -s' if kind == 'perf' else 'strace -c -f'}; it slowed the target to about "
      f"{SW['iops']:.0f} IOPS): share of the calls, failed, µs per call")
    p("  " + ", ".join(f"{n} {100 * t[0] / tot:.1f}%" + (f" ({100 * t[1] / t[0]:.0f}% failed)" if t[1] else "")
                       + f" {t[2] / t[0]:.1f} µs"
                       for n, t in sorted(traced.items(), key=lambda kv: -kv[1][0]) if t[0] / tot >= 0.001))

# Segment sizes on the wire.
td = rd(out + "/tcpdump.txt")
if td:
    port = E["PORT"]
    sizes = {"out": {}, "in": {}}
    for m in re.finditer(r"IP6? \S+?\.(\d+) > \S+?\.(\d+): tcp (\d+)", td):
        n = int(m.group(3))
        if n == 0:
            continue
        way = "out" if m.group(1) == port else "in"
        sizes[way][n] = sizes[way].get(n, 0) + 1
    p()
    p("Segment sizes with data over 1 s (tcpdump; common sizes first)")
    for way in ("out", "in"):
        tot = sum(sizes[way].values())
        top = sorted(sizes[way].items(), key=lambda kv: -kv[1])[:6]
        p(f"  {way:3s} {tot:7d} segments: " + ", ".join(f"{n} B x{k}" for n, k in top))
    drop = re.search(r"(\d+) packets dropped by kernel", rd(out + "/tcpdump.log"))
    if drop and int(drop.group(1)):
        p(f"  (tcpdump dropped {drop.group(1)} packets)")

# Where the target's CPU time goes.
us_io = run_ns / 1e3 / ios
p()
p(f"Top symbols by self time (perf record -e cpu-clock -g, {dt:.0f} s; µs/IO = share x on-CPU time per I/O)")
rows = []
for line in rd(out + "/perf-top.txt").splitlines():
    m = re.match(r"^\s+([\d.]+)%\s+\[([k.])\]\s+(.*\S)", line)
    if m:
        rows.append((float(m.group(1)), m.group(2), m.group(3)))
for pct, where, sym in rows[:25]:
    p(f"  {pct:6.2f}%  {pct * us_io / 100:6.2f} µs  {'kernel' if where == 'k' else 'user  '}  {sym[:90]}")
# Time inside each system call: the kernel function under which its work runs (call chains
# of kernel code are complete), as a share of the samples with children counted.
ENTRY = {"sendmsg": "__sys_sendmsg", "sendto": "__sys_sendto", "writev": "do_writev",
         "write": "ksys_write", "recvfrom": "__sys_recvfrom", "recvmsg": "__sys_recvmsg",
         "readv": "do_readv", "read": "ksys_read", "epoll_wait": "do_epoll_wait",
         "accept": "do_accept", "io_uring_enter": "__do_sys_io_uring_enter",
         "futex": "do_futex"}
children = {}
for line in rd(out + "/perf-children.txt").splitlines():
    m = re.match(r"^\s+([\d.]+)%\s+[\d.]+%\s+\[k\]\s+(\S+)", line)
    if m:
        children[m.group(2)] = float(m.group(1))
inside = [(n, children[f]) for n, f in ENTRY.items() if children.get(f, 0) >= 0.5]
if inside:
    p("  inside system calls (with what the kernel does on their behalf, e.g. loopback delivery): "
      + ", ".join(f"{n} {pct:.1f}% = {pct * us_io / 100:.2f} µs" for n, pct in sorted(inside, key=lambda x: -x[1])))
dso = []
for line in rd(out + "/perf-dso.txt").splitlines():
    m = re.match(r"^\s+([\d.]+)%\s+(\S.*)$", line)
    if m:
        dso.append(f"{m.group(2).strip()} {m.group(1)}%")
if dso:
    p("  by object: " + ", ".join(dso[:6]))
p()
p(f"Files: {out} (perf.data, perf-report.txt with call graphs, syscall-counts.csv, syscalls.txt, snapshots)")
EOF

#!/usr/bin/env bash
# The userspace TCP stack end to end, between two network namespaces: the target runs on the
# stack in one (two reactors, one device queue each), real initiators run on the kernel's TCP
# in the other. For each device (AF_PACKET on a veth pair; TAP, routed through the target
# namespace's kernel) it runs iscsi-ls, iscsi-inq, a 256 MiB qemu-img round trip compared with
# cmp, iscsi-bench --verify at QD32 over 4 sessions spread over both reactors, and
# iscsi-test-cu's required suites. Then, over AF_PACKET: the same data checks with 1% of
# packets dropped each way (retransmits must show in the tree), the hostile-input tests, and
# floods of SYNs and of connections while a logged-in session keeps serving. Then iscsi-bench
# on the userspace stack's client (--net af_packet) against the target on AF_PACKET: no
# kernel TCP on either side. Then the stack on DPDK's poll-mode drivers (the build with
# --features dpdk): net_af_packet (two queue pairs, two reactors) and net_af_xdp (one queue,
# one reactor) on the same veth, each with hugepages and with --no-huge, the full data checks
# in each; DPDK's TAP driver (with its checksum and segmentation offload); and the target
# and iscsi-bench both on DPDK, joined by memif, the
# client leaving and coming back. Also runs the device tests that need root. Removes its namespaces and
# links on every exit path; DPDK runs --in-memory (or --no-shconf), so its hugepages go back
# when the target exits.
#   NETNS_STAGES="af_packet tap loss hostile flood initiator dpdk_af_packet dpdk_af_xdp
#   dpdk_tap dpdk_memif" selects stages (all by default).
#   NETNS_PREFIX (itgt), NETNS_NET (10.77: NET.0.0/24 for AF_PACKET, NET.10.0/24 and
#   NET.11.0/24 for TAP) and PORT (3260) name the namespaces and links, the addresses and the
#   portal's port, so that several runs can share a machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, AF_PACKET, TAP)"
for c in ip iptables ethtool iscsi-ls iscsi-inq iscsi-test-cu qemu-img python3; do
    command -v "$c" >/dev/null || die "$c is missing: run scripts/setup.sh"
done

STAGES=${NETNS_STAGES:-"devices af_packet tap loss hostile flood initiator dpdk_af_packet dpdk_af_xdp dpdk_tap dpdk_memif"}
PREFIX=${NETNS_PREFIX:-itgt}
NET=${NETNS_NET:-10.77}
PORT=${PORT:-3260}
TAG=$$
NS_T=$PREFIX-t-$TAG
NS_I=$PREFIX-i-$TAG
WORK=$(mktemp -d /tmp/iscsi-tgt-netns.XXXXXX)
SOCK=$WORK/rpc.sock
IQN=iqn.2026-11.org.iscsi-tgt:netns
CU_IQN=iqn.2026-11.org.iscsi-tgt:netns-cu
BENCH=$ROOT/target/release/iscsi-bench
SCORE=$ROOT/scripts/cu-score.py
pass=0

cleanup() {
    stop_target || true
    ip netns pids "$NS_I" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns pids "$NS_T" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns del "$NS_T" 2>/dev/null || true
    ip netns del "$NS_I" 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "netns-test: logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

check() { pass=$((pass + 1)); echo "ok $pass - $*"; }
in_i() { ip netns exec "$NS_I" "$@"; }

[ -x "$BIN" ] && [ -x "$BENCH" ] || build_release

# Two namespaces and a veth pair: vt (the target's, no address: the kernel of its namespace
# must not answer for the stack's address) and vi (the initiator's, on the kernel's TCP, with
# transmit offloads off so that its frames carry full checksums and no GSO super-frames).
make_namespaces() {
    ip netns add "$NS_T"
    ip netns add "$NS_I"
    ip -n "$NS_T" link set lo up
    ip -n "$NS_I" link set lo up
    ip link add "$PREFIX-t$TAG" type veth peer name "$PREFIX-i$TAG"
    ip link set "$PREFIX-t$TAG" netns "$NS_T"
    ip link set "$PREFIX-i$TAG" netns "$NS_I"
    ip -n "$NS_T" link set "$PREFIX-t$TAG" name vt up
    ip -n "$NS_I" link set "$PREFIX-i$TAG" name vi up
    ip netns exec "$NS_T" sysctl -qw net.ipv6.conf.vt.disable_ipv6=1
    ip netns exec "$NS_I" sysctl -qw net.ipv6.conf.vi.disable_ipv6=1
    in_i ethtool -K vi tx off >/dev/null 2>&1 || die "ethtool -K vi tx off failed"
}

drop_namespaces() {
    ip netns del "$NS_T" 2>/dev/null || true
    ip netns del "$NS_I" 2>/dev/null || true
}

# start_in_t LOG ARGS...: the target in the target namespace (its RPC socket is a path, reached
# from here).
start_in_t() {
    local log=$1
    shift
    rm -f "$SOCK"
    ip netns exec "$NS_T" "${TBIN:-$BIN}" --rpc-socket "$SOCK" --cores "${CORES:-0,1}" "$@" >"$log" 2>&1 &
    TARGET_PID=$!
    wait_rpc "$SOCK" "$log"
}

# configure: $IQN with a 256 MiB RAM LUN 0 and four 64 MiB RAM LUNs 1-4; $CU_IQN with a
# 128 MiB RAM LUN 0 for the conformance suites.
configure() {
    rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device big size_mb=256"
    rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $IQN"
    rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add big 0"
    for l in 1 2 3 4; do
        rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device v$l size_mb=64"
        rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "add v$l $l"
    done
    rpc "$SOCK" mgmt handlers/vdisk_ramio/mgmt "add_device cu size_mb=128"
    rpc "$SOCK" mgmt targets/iscsi/mgmt "add_target $CU_IQN"
    rpc "$SOCK" mgmt "targets/iscsi/$CU_IQN/luns/mgmt" "add cu 0"
    rpc "$SOCK" set "targets/iscsi/$IQN/enabled" 1
    rpc "$SOCK" set "targets/iscsi/$CU_IQN/enabled" 1
    rpc "$SOCK" set targets/iscsi/enabled 1
}

get() { $RPC -s "$SOCK" get "$1"; }
# The sum of a counter over the reactors under net/reactors/.
net_sum() {
    local n sum=0
    n=$($RPC -s "$SOCK" ls net/reactors | wc -l)
    for r in $(seq 0 $((n - 1))); do
        sum=$((sum + $(get "net/reactors/$r/$1")))
    done
    echo "$sum"
}

round_trip() {
    local url=$1 mb=$2 what=$3
    head -c $((mb * 1024 * 1024)) /dev/urandom >"$WORK/in.raw"
    rm -f "$WORK/out.raw"
    in_i qemu-img convert -n -f raw -O raw "$WORK/in.raw" "$url" || die "qemu-img write ($what) failed"
    in_i qemu-img convert -f raw -O raw "$url" "$WORK/out.raw" || die "qemu-img read ($what) failed"
    cmp -n $((mb * 1024 * 1024)) "$WORK/in.raw" "$WORK/out.raw" || die "data read back differs ($what)"
    check "$mb MiB written and read back identical with qemu-img ($what)"
}

# verify_sessions PORTAL N WHAT: iscsi-bench --verify at QD32 on LUNs 1..N at once, one
# session each; while they run, the tree must show both reactors holding connections (when the
# target has two).
verify_sessions() {
    local portal=$1 n=$2 what=$3 pids=() l extra=()
    if [ "$($RPC -s "$SOCK" ls net/reactors | wc -l)" -lt 2 ]; then
        for l in $(seq 1 "$n"); do
            in_i "$BENCH" --portal "$portal" --target "$IQN" --lun "$l" --qd 32 --bs 65536 --verify \
                >"$WORK/verify-$l.log" 2>&1 &
            pids+=($!)
        done
        local fail=0
        for p in "${pids[@]}"; do wait "$p" || fail=1; done
        [ "$fail" = 0 ] || { cat "$WORK"/verify-*.log >&2; die "iscsi-bench --verify failed ($what)"; }
        check "iscsi-bench --verify at QD32 on $n sessions at once ($what, one reactor)"
        return
    fi
    for l in $(seq 1 "$n"); do
        in_i "$BENCH" --portal "$portal" --target "$IQN" --lun "$l" --qd 32 --bs 65536 --verify \
            >"$WORK/verify-$l.log" 2>&1 &
        pids+=($!)
    done
    # A flow lands on the queue its hash picks: four sessions all on one reactor happens one
    # time in eight. Then more sessions (reads for 30 s) join until both reactors hold one, so
    # that the check below is about the spreading and not about luck.
    local spread=0
    for try in $(seq 1 40); do
        sleep 0.25
        local c0 c1
        c0=$(get net/reactors/0/connections)
        c1=$(get net/reactors/1/connections)
        if [ "$c0" -gt 0 ] && [ "$c1" -gt 0 ]; then
            spread=1
            # Each connection's TCP view, as the tree publishes it (once a second).
            local st win
            st=$(get net/connections/0/state)
            win=$(get net/connections/0/recv_window)
            [ "$st" = ESTABLISHED ] || die "net/connections/0/state is $st while sessions run ($what)"
            [ "$win" -gt 0 ] || die "net/connections/0/recv_window is $win ($what)"
            break
        fi
        if [ "$try" -gt 8 ] && [ $((try % 4)) -eq 0 ] && [ ${#extra[@]} -lt 10 ]; then
            in_i "$BENCH" --portal "$portal" --target "$IQN" --lun 0 --qd 4 --bs 4096 --secs 20 \
                >/dev/null 2>&1 &
            extra+=($!)
        fi
    done
    local fail=0
    for p in "${pids[@]}"; do wait "$p" || fail=1; done
    for p in "${extra[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    if [ "$fail" = 1 ]; then
        cat "$WORK"/verify-*.log >&2
        die "iscsi-bench --verify failed ($what)"
    fi
    [ "$spread" = 1 ] || die "the sessions did not spread over both reactors ($what): $(get net/reactors/0/connections) and $(get net/reactors/1/connections)"
    check "iscsi-bench --verify at QD32 on $n sessions at once, spread over both reactors ($what)"
}

# conformance URL WHAT: iscsi-test-cu's required suites, scored; only the test that warns by
# construction (iSCSIDataSnInvalid, see scripts/conformance.sh) may warn.
conformance() {
    local url=$1 what=$2
    local log=$WORK/cu-$what.log
    local tests=iSCSI,SCSI.Inquiry,SCSI.Read6,SCSI.Read10,SCSI.Read12,SCSI.Read16,SCSI.Write10,SCSI.Write12,SCSI.Write16,SCSI.ReadCapacity10,SCSI.ReadCapacity16,SCSI.TestUnitReady,SCSI.ReportLuns,SCSI.ModeSense6,SCSI.CompareAndWrite
    timeout 1200 ip netns exec "$NS_I" iscsi-test-cu -d -S -t "$tests" "$url" "$url" >"$log" 2>&1 || true
    local summary
    summary=$(python3 "$SCORE" "$log") || { tail -40 "$log" >&2; die "iscsi-test-cu log incomplete ($what): $summary"; }
    python3 "$SCORE" "$log" --tests >"$WORK/tests-$what.txt"
    local bad
    bad=$(awk '$1 == "failed" || ($1 == "warned" && $2 != "iSCSIdatasn.iSCSIDataSnInvalid")' "$WORK/tests-$what.txt")
    [ -z "$bad" ] || { echo "$bad" >&2; die "iscsi-test-cu: required suites not clean ($what)"; }
    check "iscsi-test-cu required suites clean ($what): $summary"
}

# The data checks every device gets.
data_checks() {
    local addr=$1 what=$2 url=iscsi://$1:$PORT
    local out
    out=$(in_i iscsi-ls -s "$url") || die "iscsi-ls failed ($what): $out"
    echo "$out" | grep -q "Target:$IQN" || die "iscsi-ls does not list $IQN ($what): $out"
    check "iscsi-ls lists the targets over $what"
    out=$(in_i iscsi-inq "$url/$IQN/0") || die "iscsi-inq failed ($what): $out"
    check "iscsi-inq answers over $what"
    round_trip "$url/$IQN/0" 256 "$what"
    verify_sessions "$addr:$PORT" 4 "$what"
    conformance "$url/$CU_IQN/0" "$what"
    local rx
    rx=$(net_sum rx_packets)
    [ "$rx" -gt 100000 ] || die "net/reactors counted only $rx packets received ($what)"
    [ "$(get net/stack)" = "smoltcp ${what%% *}" ] || die "net/stack is $(get net/stack) ($what)"
    check "the tree shows the stack, $rx packets received, and (above) each connection's TCP state"
}

finish_target() {
    local what=$1 log=$2
    kill -0 "$TARGET_PID" 2>/dev/null || { tail -40 "$log" >&2; die "the target died ($what)"; }
    stop_target
    grep -q "panicked" "$log" && die "the target log shows a panic ($what)"
    true
}

stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if stage devices; then
    (cd "$ROOT" && ISCSI_TGT_NETNS_PREFIX=$PREFIX cargo test --release --quiet --lib -- --ignored netdev_ 2>&1) |
        tee "$WORK/devices.log" | tail -3
    grep -q "test result: ok" "$WORK/devices.log" || die "device tests failed"
    check "AF_PACKET and TAP device tests (root)"
fi

if stage af_packet; then
    make_namespaces
    in_i ip addr add "$NET.0.1/24" dev vi
    start_in_t "$WORK/target-afp.log" --net af_packet:vt --ip "$NET.0.2/24" --listen "$NET.0.2:$PORT"
    configure
    data_checks "$NET.0.2" "af_packet"
    finish_target af_packet "$WORK/target-afp.log"
    drop_namespaces
fi

if stage tap; then
    # The TAP's kernel side is in the target namespace, which routes between it ($NET.10.1)
    # and the veth to the initiator ($NET.11.2 / $NET.11.1): the stack reaches the initiator
    # through its gateway.
    make_namespaces
    ip netns exec "$NS_T" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$NS_T" addr add "$NET.11.2/24" dev vt
    in_i ip addr add "$NET.11.1/24" dev vi
    in_i ip route add "$NET.10.0/24" via "$NET.11.2"
    start_in_t "$WORK/target-tap.log" --net tap:itgt0 --ip "$NET.10.2/24" --gateway "$NET.10.1" --listen "$NET.10.2:$PORT"
    ip -n "$NS_T" addr add "$NET.10.1/24" dev itgt0
    ip -n "$NS_T" link set itgt0 up
    ip netns exec "$NS_T" ethtool -K itgt0 tx off >/dev/null 2>&1 || true
    configure
    data_checks "$NET.10.2" "tap"
    finish_target tap "$WORK/target-tap.log"
    drop_namespaces
fi

if stage loss; then
    make_namespaces
    in_i ip addr add "$NET.0.1/24" dev vi
    # Per packet: with GRO on, the initiator's kernel merges a burst before the filter sees
    # it, and one drop loses the whole burst.
    in_i ethtool -K vi gro off >/dev/null 2>&1 || die "ethtool -K vi gro off failed"
    in_i iptables -A INPUT -i vi -m statistic --mode random --probability 0.01 -j DROP
    in_i iptables -A OUTPUT -o vi -m statistic --mode random --probability 0.01 -j DROP
    start_in_t "$WORK/target-loss.log" --net af_packet:vt --ip "$NET.0.2/24" --listen "$NET.0.2:$PORT"
    configure
    start=$(date +%s)
    round_trip "iscsi://$NET.0.2:$PORT/$IQN/0" 64 "1% loss each way"
    secs=$(($(date +%s) - start))
    in_i "$BENCH" --portal "$NET.0.2:$PORT" --target "$IQN" --lun 1 --qd 32 --bs 65536 --verify \
        >"$WORK/verify-loss.log" 2>&1 || { cat "$WORK/verify-loss.log" >&2; die "iscsi-bench --verify failed under loss"; }
    check "iscsi-bench --verify at QD32 intact under 1% loss each way"
    dropped=$(in_i iptables -L -v -x -n | awk '/statistic/ {s += $1} END {print s + 0}')
    rtx=$(net_sum tcp_retransmits)
    [ "$dropped" -gt 0 ] || die "iptables dropped nothing: the loss stage tested nothing"
    [ "$rtx" -gt 0 ] || die "no retransmits counted in net/reactors/*/tcp_retransmits with $dropped packets dropped"
    probes=$(net_sum tail_probes)
    sacks=$(net_sum sack_replayed)
    check "$dropped packets dropped, $rtx segments retransmitted (net/reactors/*/tcp_retransmits; $sacks SACKs replayed, $probes tail probes); 64 MiB round trip took ${secs} s"
    finish_target loss "$WORK/target-loss.log"
    drop_namespaces
fi

if stage hostile; then
    # The integration tests of hostile input start each target in the target namespace on the
    # userspace stack (tests/common reads ISCSI_TGT_TEST_NET) and talk to it from the other.
    make_namespaces
    in_i ip addr add "$NET.0.1/24" dev vi
    (cd "$ROOT" && cargo test --release --quiet --test hostile --no-run 2>&1) | tail -2
    tbin=$(cd "$ROOT" && cargo test --release --test hostile --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "hostile":
        print(m["executable"])')
    [ -x "$tbin" ] || die "cannot find the hostile test binary"
    ISCSI_TGT_TEST_NET="ip netns exec $NS_T;$NET.0.2;--net af_packet:vt --ip $NET.0.2/24" \
        ip netns exec "$NS_I" "$tbin" --test-threads=1 --nocapture >"$WORK/hostile.log" 2>&1 ||
        { cat "$WORK/hostile.log" >&2; die "hostile-input tests failed over the userspace stack"; }
    grep -q "test result: ok" "$WORK/hostile.log" || die "hostile-input tests did not run"
    started=$(grep -c "test target: ip netns exec $NS_T on $NET.0.2:.* with --net af_packet:vt" "$WORK/hostile.log" || true)
    [ "$started" -ge 5 ] || die "the hostile-input tests did not start their targets on the userspace stack ($started did)"
    check "hostile-input tests over the userspace stack: $(grep 'test result' "$WORK/hostile.log")"
    drop_namespaces
fi

if stage flood; then
    make_namespaces
    in_i ip addr add "$NET.0.1/24" dev vi
    start_in_t "$WORK/target-flood.log" --net af_packet:vt --ip "$NET.0.2/24" --listen "$NET.0.2:$PORT"
    configure
    # A session logged in before the floods reads throughout them.
    in_i "$BENCH" --portal "$NET.0.2:$PORT" --target "$IQN" --lun 0 --qd 8 --bs 4096 --secs 25 \
        >"$WORK/during.log" 2>&1 &
    during=$!
    sleep 2
    # 30000 SYNs from random ports that never complete the handshake (raw socket).
    in_i env SRC="$NET.0.1" DST="$NET.0.2" PORT="$PORT" python3 - <<'EOF' || die "SYN flood failed to run"
import os, random, socket, struct

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

src, dst = socket.inet_aton(os.environ["SRC"]), socket.inet_aton(os.environ["DST"])
port = int(os.environ["PORT"])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for i in range(30000):
    sport = random.randint(1024, 65535)
    tcp = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    s.sendto(tcp, (os.environ["DST"], 0))
EOF
    check "30000 SYNs sent to the portal"
    # 300 connections that connect and never log in (the kernel's TCP on the initiator side).
    in_i env DST="$NET.0.2" PORT="$PORT" python3 - <<'EOF' || die "connection flood failed to run"
import os, socket, time
socks = []
for i in range(300):
    try:
        c = socket.create_connection((os.environ["DST"], int(os.environ["PORT"])), timeout=5)
        socks.append(c)
    except OSError:
        pass
time.sleep(3)
print(f"{len(socks)} connections held")
for c in socks:
    c.close()
EOF
    check "300 connections opened that never log in"
    wait "$during" || { cat "$WORK/during.log" >&2; die "the logged-in session failed during the floods"; }
    grep -q "iops" "$WORK/during.log" || die "the session's run printed no result"
    check "the session logged in before the floods served throughout: $(tail -1 "$WORK/during.log")"
    out=$(in_i iscsi-inq "iscsi://$NET.0.2:$PORT/$IQN/0") || die "no new login after the floods: $out"
    check "a new login works after the floods"
    finish_target flood "$WORK/target-flood.log"
    drop_namespaces
fi

if stage initiator; then
    # iscsi-bench on the userspace stack's client in the initiator namespace, whose kernel has
    # no address on vi: the address the client uses is its own, answered by nobody else.
    # Both stacks' rings take frames of at most the MTU, so both veth ends have their
    # transmit offloads off (the target's before it starts: its device then leaves
    # segmentation to the stack, see af_packet.rs).
    make_namespaces
    ip netns exec "$NS_T" ethtool -K vt tx off >/dev/null 2>&1 || die "ethtool -K vt tx off failed"
    start_in_t "$WORK/target-ini.log" --net af_packet:vt --ip "$NET.0.2/24" --listen "$NET.0.2:$PORT"
    configure
    user=(--net af_packet:vi --ip "$NET.0.3/24")
    in_i "$BENCH" --portal "$NET.0.2:$PORT" --target "$IQN" --lun 1 --qd 32 --bs 65536 --verify "${user[@]}" \
        >"$WORK/verify-ini.log" 2>&1 || { cat "$WORK/verify-ini.log" >&2; die "iscsi-bench --verify failed on the userspace client"; }
    grep -q "^verified 67108864 bytes" "$WORK/verify-ini.log" || die "iscsi-bench --verify: $(cat "$WORK/verify-ini.log")"
    grep -q "$NET.0.3:[0-9]*: session .* logged in" "$WORK/target-ini.log" ||
        die "the target logged no session from the userspace client's address $NET.0.3"
    check "iscsi-bench --verify at QD32 over the userspace client (from $NET.0.3, no kernel TCP on either side)"
    out=$(in_i "$BENCH" --portal "$NET.0.2:$PORT" --target "$IQN" --lun 0 --qd 1 --bs 4096 --random --secs 3 "${user[@]}" 2>&1) ||
        die "iscsi-bench 4 KiB QD1 on the userspace client failed: $out"
    iops=$(awk '/^iops/ {print $2}' <<<"$out")
    [ "${iops:-0}" -gt 0 ] || die "iscsi-bench printed no IOPS: $out"
    check "iscsi-bench 4 KiB random read QD1 over the userspace client: $iops IOPS"
    in_i "$BENCH" --portal "$NET.0.2:$PORT" --target "$IQN" --lun 2 --soak --secs 5 --sessions 2 --qd 8 --max-io 65536 \
        --abort-every 1 --drop-every 2 --progress 0 "${user[@]}" >"$WORK/soak-ini.log" 2>&1 ||
        { tail -20 "$WORK/soak-ini.log" >&2; die "iscsi-bench --soak failed on the userspace client"; }
    check "iscsi-bench --soak (aborts, drops by reset and FIN, relogins) over the userspace client: $(grep -o 'drops [0-9]* drops_reset [0-9]* relogins [0-9]*' "$WORK/soak-ini.log")"
    out=$(in_i "$BENCH" --portal "$NET.0.2:$((PORT + 1))" --target "$IQN" "${user[@]}" 2>&1) && die "a connect to a closed port succeeded"
    grep -q "refused (reset)" <<<"$out" || die "a closed port: $out"
    out=$(in_i "$BENCH" --portal "$NET.0.9:$PORT" --target "$IQN" "${user[@]}" --stack syn_timeout_ms=500 2>&1) &&
        die "a connect to an address nobody holds succeeded"
    grep -q "no ARP answer from $NET.0.9" <<<"$out" || die "an address nobody holds: $out"
    check "the userspace client reports a closed port and an unanswered ARP: ${out#iscsi-bench: }"
    finish_target initiator "$WORK/target-ini.log"
    drop_namespaces
fi

# dpdk_stage DRIVER DEVARGS CORES: the target on DPDK's DRIVER over vt, with hugepages and with
# --no-huge, the full data checks in each.
dpdk_stage() {
    local driver=$1 devargs=$2 cores=$3 mem
    for mem in huge nohuge; do
        local what="dpdk $driver, $mem" eal=() log=$WORK/target-dpdk-$driver-$mem.log
        [ "$mem" = nohuge ] && eal=(--eal --no-huge)
        make_namespaces
        in_i ip addr add "$NET.0.1/24" dev vi
        TBIN=$DPDK_BIN CORES=$cores start_in_t "$log" --net "dpdk:$devargs" --ip "$NET.0.2/24" \
            --listen "$NET.0.2:$PORT" --mem-size 256 "${eal[@]}"
        configure
        [ "$(get net/dpdk_driver)" = "$driver" ] || die "net/dpdk_driver is $(get net/dpdk_driver), not $driver"
        [ "$(get net/link)" = up ] || die "net/link is $(get net/link) ($what)"
        local huge=1
        [ "$mem" = nohuge ] && huge=0
        [ "$(get sgv/dpdk_hugepages)" = "$huge" ] || die "sgv/dpdk_hugepages is $(get sgv/dpdk_hugepages) ($what)"
        [ "$(get sgv/hugepages)" = "$huge" ] || die "sgv/hugepages (the buffer pool) is $(get sgv/hugepages) ($what)"
        [ "$(get sgv/dpdk_heap_allocated_bytes)" -ge $((256 << 20)) ] ||
            die "the buffer pool is not in DPDK's heap: sgv/dpdk_heap_allocated_bytes is $(get sgv/dpdk_heap_allocated_bytes)"
        check "target on DPDK $driver ($mem): the tree shows the driver, the link up, the buffer pool and $(get sgv/dpdk_mbufs) mbufs in DPDK's heap"
        data_checks "$NET.0.2" "$what"
        local lc
        lc=$(get net/reactors/0/lcore)
        [ "$lc" -ge 0 ] || die "reactor 0 is not a DPDK lcore (net/reactors/0/lcore is $lc): its mempool has no cache ($what)"
        local tx
        tx=$(get net/port_tx_packets)
        [ "$tx" -gt 1000 ] || die "net/port_tx_packets (rte_eth_stats) is $tx ($what)"
        check "the port's own counters move: $tx packets sent, $(get net/port_rx_packets) received; $(net_sum misrouted) segments that reached the wrong queue dropped; reactor 0 is lcore $lc ($what)"
        finish_target "$what" "$log"
        drop_namespaces
    done
}

if stage dpdk_af_packet || stage dpdk_af_xdp || stage dpdk_tap || stage dpdk_memif; then
    build_dpdk
fi
if stage dpdk_af_packet; then
    dpdk_stage net_af_packet "net_af_packet0,iface=vt,qpairs=2" 0,1
fi
if stage dpdk_af_xdp; then
    # A veth has one receive queue: one XDP socket, one reactor.
    dpdk_stage net_af_xdp "net_af_xdp0,iface=vt" 1
fi

if stage dpdk_tap; then
    # DPDK's TAP driver makes the tap interface itself, in the target's namespace, whose
    # kernel routes between it and the veth (as in the tap stage). The driver offers TCP
    # checksum and segmentation offload (both done in software), which the stack uses: it
    # hands the driver frames of up to 64 KiB.
    make_namespaces
    ip netns exec "$NS_T" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$NS_T" addr add "$NET.11.2/24" dev vt
    in_i ip addr add "$NET.11.1/24" dev vi
    in_i ip route add "$NET.10.0/24" via "$NET.11.2"
    log=$WORK/target-dpdk-tap.log
    TBIN=$DPDK_BIN CORES=1 start_in_t "$log" --net "dpdk:net_tap0,iface=itgtd0" --ip "$NET.10.2/24" \
        --gateway "$NET.10.1" --listen "$NET.10.2:$PORT" --mem-size 256
    ip -n "$NS_T" addr add "$NET.10.1/24" dev itgtd0
    ip -n "$NS_T" link set itgtd0 up
    configure
    [ "$(get net/dpdk_driver)" = net_tap ] || die "net/dpdk_driver is $(get net/dpdk_driver), not net_tap"
    [ "$(get net/tx_checksum_offload)" = 1 ] || die "DPDK's TAP driver offers checksum offload, but net/tx_checksum_offload is $(get net/tx_checksum_offload)"
    [ "$(get net/tx_segmentation_offload)" = 1 ] || die "DPDK's TAP driver offers TSO, but net/tx_segmentation_offload is $(get net/tx_segmentation_offload)"
    data_checks "$NET.10.2" "dpdk net_tap"
    # Frames of up to 64 KiB went to the port whole: fewer frames than segments left.
    sent=$(get net/reactors/0/tx_packets)
    segs=$(get net/port_tx_packets)
    [ "$(get net/port_tx_errors)" = 0 ] || die "the TAP driver refused $(get net/port_tx_errors) frames"
    check "segmentation offload: $sent frames handed to the TAP driver, $segs packets it sent"
    finish_target "dpdk net_tap" "$log"
    drop_namespaces
fi

if stage dpdk_memif; then
    # Two DPDK processes joined by memif (shared memory over a Unix socket): the target on the
    # server end, iscsi-bench on the client end, each on its own core; no kernel TCP and no
    # kernel network device on either side. The client leaves and comes back: the target must
    # survive its peer's going (DPDK's memif must not be polled while disconnected).
    DPDK_BENCH=$DPDK_TARGET/release/iscsi-bench
    msock=$WORK/memif.sock
    log=$WORK/target-memif.log
    rm -f "$SOCK"
    "$DPDK_BIN" --rpc-socket "$SOCK" --cores 1 --mode poll --mem-size 256 \
        --net "dpdk:net_memif0,role=server,socket=$msock,socket-abstract=no" --ip 10.96.0.2/24 \
        --listen "10.96.0.2:$PORT" >"$log" 2>&1 &
    TARGET_PID=$!
    wait_rpc "$SOCK" "$log"
    configure
    [ "$(get net/dpdk_driver)" = net_memif ] || die "net/dpdk_driver is $(get net/dpdk_driver), not net_memif"
    mclient=(--net "dpdk:net_memif0,role=client,socket=$msock,socket-abstract=no" --ip 10.96.0.1/24 --portal "10.96.0.2:$PORT" --target "$IQN")
    taskset -c 0 "$DPDK_BENCH" "${mclient[@]}" --lun 1 --qd 32 --bs 65536 --verify >"$WORK/verify-memif.log" 2>&1 ||
        { cat "$WORK/verify-memif.log" >&2; die "iscsi-bench --verify over memif failed"; }
    grep -q "^verified 67108864 bytes" "$WORK/verify-memif.log" || die "iscsi-bench --verify over memif: $(tail -3 "$WORK/verify-memif.log")"
    check "iscsi-bench --verify at QD32 over memif, iscsi-bench on DPDK too (no kernel TCP on either side)"
    sleep 1
    kill -0 "$TARGET_PID" 2>/dev/null || { tail -20 "$log" >&2; die "the target died when its memif peer left"; }
    out=$(taskset -c 0 "$DPDK_BENCH" "${mclient[@]}" --lun 0 --qd 1 --bs 4096 --random --secs 3 2>&1) ||
        die "iscsi-bench over memif, second connection: $out"
    iops=$(awk '/^iops/ {print $2}' <<<"$out")
    [ "${iops:-0}" -gt 0 ] || die "iscsi-bench over memif printed no IOPS: $out"
    sleep 1
    kill -0 "$TARGET_PID" 2>/dev/null || { tail -20 "$log" >&2; die "the target died when its memif peer left a second time"; }
    check "the memif peer left twice and came back; the target serves on: 4 KiB random read QD1 at $iops IOPS"
    finish_target memif "$log"
fi

echo "$pass passed, 0 failed"

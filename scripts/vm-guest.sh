#!/usr/bin/env bash
# The guest's half of scripts/vm-test.sh: runs as the VM's init (after /init mounts the kernel's
# file systems), reads /etc/vm-test.conf, and reports each step on the console as
# "VMTEST PASS: ..." or "VMTEST FAIL: ...", which the host collects. Steps: load the NIC's kernel
# driver, setup.sh status, setup.sh config (the NIC to vfio-pci; in MODE=kernel it must refuse
# the NIC, which carries an address), then run on the NIC (dpdk-testpmd, or the target on
# DPDK or on the kernel's TCP) until the host writes a line to the second serial port, stop,
# setup.sh reset (the NIC back to its kernel driver), "VMTEST END". In MODE=nvme the NVMe
# controller goes to vfio-pci instead, the target serves it as a vdisk_nvme LUN 0, and a second
# controller that stays on the kernel's nvme driver as a passthrough vdisk_nvme LUN 1 (its
# /dev/ngXn1); after the host is done del_device gives the first back and the kernel's nvme
# driver takes it again. While it waits for the host, a line "cpu TAG" from the host makes it
# print the target's CPU time ("VMTEST cpu TAG TICKS HZ"). Not meant to run on a host.
set -uo pipefail

# shellcheck source=/dev/null
source /etc/vm-test.conf
source "$(dirname "$0")/lib.sh"

SOCK=/run/iscsi-tgt.sock
SETUP=$ROOT/scripts/setup.sh
npass=0
nfail=0

pass() { npass=$((npass + 1)); echo "VMTEST PASS: $*"; }
fail() { nfail=$((nfail + 1)); echo "VMTEST FAIL: $*"; }
drv_of() { local l; l=$(readlink "/sys/bus/pci/devices/$1/driver") && echo "${l##*/}" || echo none; }
iface_of() {
    local n
    for n in /sys/bus/pci/devices/"$1"/net/* /sys/bus/pci/devices/"$1"/virtio*/net/*; do
        [ -e "$n" ] && { echo "${n##*/}"; return; }
    done
}
# Waits for the host's word on the second serial port (the host's initiator is done) and leaves
# it in HOST_LINE. Before it, the host may ask for things with short lines (the port keeps lines
# of a few characters whole): "cTAG" for the target's CPU time, utime + stime of TARGET_PID in
# ticks, and its reactors' busy time ("VMTEST cpu cTAG TICKS HZ BUSY_NS"); "rN" (MODE=nvme)
# for a reset of LUN N's NVMe controller under the I/O the host has running, through the
# device's reset attribute. The port stays open between lines.
wait_host() {
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    local line end=$(($(date +%s) + HOST_TIMEOUT))
    HOST_LINE=
    exec 5</dev/ttyS1
    while true; do
        if ! read -r -u 5 -t $((end - $(date +%s) > 0 ? end - $(date +%s) : 1)) line; then
            fail "no word from the host within $HOST_TIMEOUT s"
            exec 5<&-
            return 1
        fi
        case $line in
        c?*)
            # Ticks of USER_HZ, 100 on x86 (the guest has no getconf to ask), then the
            # reactors' busy time (ns spent on work, not on empty polls).
            local busy=0 r
            for r in $($RPC -s "$SOCK" ls reactors 2>/dev/null); do
                busy=$((busy + $($RPC -s "$SOCK" get "reactors/${r%/}/busy_ns" 2>/dev/null || echo 0)))
            done
            echo "VMTEST cpu ${line} $(awk '{print $14 + $15}' "/proc/${TARGET_PID:-0}/stat" 2>/dev/null) 100 $busy"
            ;;
        r0 | r1) reset_lun_device "${line#r}" ;;
        *)
            HOST_LINE=$line
            echo "VMTEST host says: $line"
            break
            ;;
        esac
    done
    exec 5<&-
}
# reset_lun_device N: resets the NVMe controller under LUN N (0: nvme0 on the userspace driver,
# 1: nvmek through the kernel's driver) and says how many commands the reset ended.
RESETS=0
reset_lun_device() {
    local dev=nvme0 sent
    [ "$1" = 1 ] && dev=nvmek
    RESETS=$((RESETS + 1))
    if $RPC -s "$SOCK" set "devices/$dev/reset" 1 >/tmp/reset.out 2>&1; then
        sent=$(grep -o "controller reset; [0-9]* commands go out again" /tmp/target.log | tail -1)
        [ "$dev" = nvmek ] && sent="the kernel: $(dmesg | grep -c 'resetting controller') resets in its log"
        pass "controller reset $RESETS ($dev) injected under the host's I/O (${sent:-no log line})"
    else
        fail "controller reset $RESETS ($dev): $(cat /tmp/reset.out)"
    fi
}
finish() {
    echo "VMTEST END pass=$npass fail=$nfail"
}
# The kernel's namespace (nvmeXn1) of the controller with serial number $1, found through the
# serial of the device behind it (the controller, or with multipath its subsystem): the two
# controllers probe in either order, and a controller given back gets its name anew.
ns_of() {
    local b
    for b in /sys/block/nvme*n1; do
        [ -e "$b" ] || continue
        [ "$(tr -d ' ' <"$b/device/serial" 2>/dev/null)" = "$1" ] && { echo "${b##*/}"; return 0; }
    done
    return 1
}
# Waits for the namespace of the first controller (serial NVME_SERIAL) and names it NS.
nvme_ns_up() {
    local i
    for i in $(seq 1 "${1:-100}"); do
        NS=$(ns_of "$NVME_SERIAL") && [ -b "/dev/$NS" ] && return 0
        sleep 0.1
    done
    return 1
}
NS=nvme-none
# Whether process $1 holds a /dev/vfio file or a vfio device descriptor open.
holds_vfio() {
    local f
    for f in /proc/"$1"/fd/*; do
        case $(readlink "$f" 2>/dev/null) in /dev/vfio/* | *vfio-device*) return 0 ;; esac
    done
    return 1
}
configure_nvme() {
    local sock=$1 iqn=$2
    rpc "$sock" mgmt handlers/vdisk_nvme/mgmt "add_device nvme0 pci=$NVME_ADDR; nsid=1" &&
        rpc "$sock" mgmt handlers/vdisk_nvme/mgmt "add_device nvmek filename=$KNG" &&
        rpc "$sock" mgmt targets/iscsi/mgmt "add_target $iqn" &&
        rpc "$sock" mgmt "targets/iscsi/$iqn/luns/mgmt" "add nvme0 0" &&
        rpc "$sock" mgmt "targets/iscsi/$iqn/luns/mgmt" "add nvmek 1" &&
        rpc "$sock" set "targets/iscsi/$iqn/enabled" 1 &&
        rpc "$sock" set targets/iscsi/enabled 1
}

# --- the guest kernel's initiator: persistent reservations with sg_persist ----------------------
# sd_of NAME: the /dev/sdX of LUN 0 in the session whose initiator is NAME.
sd_of() {
    local s b
    for s in /sys/class/iscsi_session/session*; do
        [ "$(cat "$s/initiatorname" 2>/dev/null)" = "$1" ] || continue
        for b in "$s"/device/target*/*:0:0:0/block/*; do
            [ -e "$b" ] && { echo "/dev/${b##*/}"; return 0; }
        done
    done
    return 1
}
# pr DEV ARGS...: sg_persist on DEV, its output on the console.
pr() {
    local dev=$1
    shift
    echo "VMTEST sg_persist $* $dev" >&2
    sg_persist "$@" "$dev" 2>&1
}
# Writes (or reads) one 4 KiB block at block 8 through the page cache's back (O_DIRECT).
dwrite() { dd if=/dev/urandom of="$1" bs=4096 count=1 seek=8 oflag=direct conv=notrunc 2>&1; }
dread() { dd if="$1" of=/dev/null bs=4096 count=1 skip=8 iflag=direct 2>&1; }
kernel_initiator_pr() {
    local na=iqn.2026-11.org.iscsi-tgt:node-a nb=iqn.2026-11.org.iscsi-tgt:node-b da db out i rc
    for m in crc32c_generic iscsi_tcp sd_mod sg; do modprobe "$m" || fail "modprobe $m"; done
    mkdir -p /etc/iscsi/ifaces /etc/iscsi/nodes /etc/iscsi/send_targets /var/lib/iscsi /run/lock/iscsi
    # iscsid checks who is asking (getpwuid) before it takes a request from iscsiadm.
    [ -e /etc/passwd ] || echo "root:x:0:0:root:/root:/bin/sh" >/etc/passwd
    [ -e /etc/group ] || echo "root:x:0:" >/etc/group
    echo "InitiatorName=$na" >/etc/iscsi/initiatorname.iscsi
    printf '%s\n' "node.startup = manual" "node.session.timeo.replacement_timeout = 20" \
        "node.conn[0].timeo.noop_out_interval = 5" "node.conn[0].timeo.noop_out_timeout = 10" \
        "node.session.cmds_max = 128" "node.session.queue_depth = 32" >/etc/iscsi/iscsid.conf
    # In a session of its own: when it stops it signals its process group, not this script.
    setsid iscsid -f >/tmp/iscsid.log 2>&1 &
    local iscsid_pid=$!
    sleep 1
    for i in a b; do
        iscsiadm -m iface -I "if$i" -o new >/dev/null 2>&1
        iscsiadm -m iface -I "if$i" -o update -n iface.initiatorname -v "iqn.2026-11.org.iscsi-tgt:node-$i" >/dev/null 2>&1
    done
    if out=$(iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260 -I ifa -I ifb 2>&1) &&
        out+=$(iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --login 2>&1); then
        echo "$out"
        for _ in $(seq 1 100); do
            da=$(sd_of "$na") && db=$(sd_of "$nb") && [ -b "$da" ] && [ -b "$db" ] && break
            sleep 0.2
        done
    else
        echo "$out"
        cat /tmp/iscsid.log
    fi
    if [ -b "${da:-}" ] && [ -b "${db:-}" ]; then
        pass "the kernel initiator logged in as $na ($da) and as $nb ($db), LUN 0 on each"
    else
        fail "the kernel initiator's two sessions did not show their disks (${da:-none}, ${db:-none})"
        kill "$iscsid_pid" 2>/dev/null
        return
    fi
    # Each step's commands run in turn; their output goes to the console and is checked.
    # Each node registers its key (fence_scsi's "on").
    out=$(pr "$da" --out --register --param-sark=0xa1 && pr "$db" --out --register --param-sark=0xb1 &&
        pr "$da" --in --read-keys)
    rc=$?
    echo "$out"
    if [ $rc -eq 0 ] && grep -q "0xa1" <<<"$out" && grep -q "0xb1" <<<"$out"; then
        pass "sg_persist: both nodes registered, READ KEYS lists 0xa1 and 0xb1"
    else
        fail "sg_persist: registration or READ KEYS (rc $rc): $(tail -2 <<<"$out" | tr '\n' ' ')"
    fi
    # Node a reserves Write Exclusive - Registrants Only (type 5), as fence_scsi does.
    out=$(pr "$da" --out --reserve --param-rk=0xa1 --prout-type=5 && pr "$db" --in --read-reservation)
    rc=$?
    echo "$out"
    if [ $rc -eq 0 ] && grep -q "Key=0xa1" <<<"$out" && grep -qi "Write Exclusive, registrants only" <<<"$out"; then
        pass "sg_persist: node a holds a Write Exclusive - Registrants Only reservation, as node b reads it"
    else
        fail "sg_persist: RESERVE type 5 or READ RESERVATION (rc $rc): $(tail -2 <<<"$out" | tr '\n' ' ')"
    fi
    if out=$(dwrite "$db"); then
        pass "node b, registered, writes under the registrants-only reservation"
    else
        fail "node b's write under the reservation it is registered for: $out"
    fi
    # Fencing node b: node a preempts its key and aborts its tasks.
    out=$(pr "$da" --out --preempt-abort --param-rk=0xa1 --param-sark=0xb1 --prout-type=5 && pr "$da" --in --read-keys)
    rc=$?
    echo "$out"
    if [ $rc -eq 0 ] && grep -q "0xa1" <<<"$out" && ! grep -q "0xb1" <<<"$out"; then
        pass "sg_persist: PREEMPT AND ABORT removed node b's key; READ KEYS lists only 0xa1"
    else
        fail "sg_persist: PREEMPT AND ABORT (rc $rc): $(tail -2 <<<"$out" | tr '\n' ' ')"
    fi
    if out=$(dwrite "$db"); then
        fail "node b, fenced, could still write: $out"
    else
        echo "$out"
        pass "node b, fenced, cannot write (RESERVATION CONFLICT reaches dd as an I/O error)"
    fi
    if out=$(dread "$db"); then
        pass "node b, fenced, still reads (Write Exclusive lets everyone read)"
    else
        fail "node b's read under Write Exclusive - Registrants Only: $out"
    fi
    if out=$(dwrite "$da"); then
        pass "node a, the holder, writes"
    else
        fail "node a's write as the reservation holder: $out"
    fi
    # Unfencing: node a clears everything; node b writes again.
    out=$(pr "$da" --out --clear --param-rk=0xa1 && pr "$db" --in --read-keys && pr "$db" --in --read-reservation && dwrite "$db")
    rc=$?
    echo "$out"
    if [ $rc -eq 0 ] && grep -qi "there are NO registered reservation keys" <<<"$out" &&
        grep -qi "there is NO reservation held" <<<"$out"; then
        pass "sg_persist: CLEAR leaves no key and no reservation; node b writes again"
    else
        fail "sg_persist: CLEAR, or node b's write after it (rc $rc): $(tail -2 <<<"$out" | tr '\n' ' ')"
    fi
    if out=$(iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --logout 2>&1); then
        pass "the kernel initiator logged out of both sessions"
    else
        fail "iscsiadm logout: $out"
    fi
    kill "$iscsid_pid" 2>/dev/null
    wait "$iscsid_pid" 2>/dev/null
}

echo "VMTEST START mode=$MODE nic=$NIC_ADDR ($NIC_KDRV) kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 / 1024 " MB"}' /proc/meminfo)"

# --- the NIC on its kernel driver -------------------------------------------------------------
for m in virtio_pci virtio_net e1000 nvme; do
    modprobe "$m" || fail "modprobe $m"
done
for _ in $(seq 1 50); do
    [ "$(drv_of "$NIC_ADDR")" = "$NIC_KDRV" ] && [ -n "$(iface_of "$NIC_ADDR")" ] && break
    sleep 0.1
done
IFACE=$(iface_of "$NIC_ADDR")
if [ "$(drv_of "$NIC_ADDR")" = "$NIC_KDRV" ] && [ -n "$IFACE" ]; then
    pass "NIC $NIC_ADDR on its kernel driver $NIC_KDRV, interface $IFACE, IOMMU group $(basename "$(readlink "/sys/bus/pci/devices/$NIC_ADDR/iommu_group")")"
else
    fail "NIC $NIC_ADDR is on $(drv_of "$NIC_ADDR") with interface '${IFACE}', not on $NIC_KDRV"
fi

if [ "$MODE" = nvme ]; then
    if nvme_ns_up 100; then
        pass "NVMe controller $NVME_ADDR on the kernel's $(drv_of "$NVME_ADDR") driver, /dev/$NS there"
    else
        fail "NVMe controller $NVME_ADDR on $(drv_of "$NVME_ADDR"), no namespace of serial $NVME_SERIAL"
    fi
    # The second controller stays on the kernel's driver: the passthrough LUN's.
    KNG=/dev/ng-none
    for _ in $(seq 1 100); do
        KNS=$(ns_of "$NVME_K_SERIAL") && [ -c "/dev/ng${KNS#nvme}" ] && break
        sleep 0.1
    done
    if [ -n "${KNS:-}" ] && [ -c "/dev/ng${KNS#nvme}" ]; then
        KNG=/dev/ng${KNS#nvme}
        pass "NVMe controller $NVME_K_ADDR on the kernel's $(drv_of "$NVME_K_ADDR") driver, /dev/$KNS and its generic device $KNG there (max_hw_sectors_kb $(cat "/sys/block/$KNS/queue/max_hw_sectors_kb"), max_segments $(cat "/sys/block/$KNS/queue/max_segments"))"
    else
        fail "NVMe controller $NVME_K_ADDR on $(drv_of "$NVME_K_ADDR"), no generic device for serial $NVME_K_SERIAL: $(ls /dev/ng* 2>&1 | tr '\n' ' ')"
    fi
fi

# --- setup.sh status and config ----------------------------------------------------------------
hp_before=$(cat /proc/sys/vm/nr_hugepages)
out=$("$SETUP" status 2>&1)
rc=$?
echo "$out"
if [ $rc -eq 0 ] && echo "$out" | grep -q "^  $NIC_ADDR .* $NIC_KDRV .*iommu [0-9]"; then
    pass "setup.sh status lists $NIC_ADDR on $NIC_KDRV with its IOMMU group"
else
    fail "setup.sh status (rc $rc) does not list $NIC_ADDR on $NIC_KDRV with an IOMMU group"
fi

if [ "$MODE" = kernel ] || [ "$MODE" = initiator ] || [ "$MODE" = nvme ]; then
    ip link set lo up
    ip link set "$IFACE" up
    ip addr add "$GUEST_IP/24" dev "$IFACE"
    ip route add default via "$GATEWAY"
    out=$(PCI_ALLOWED=$NIC_ADDR "$SETUP" config 2>&1)
    rc=$?
    echo "$out"
    if [ $rc -ne 0 ] && echo "$out" | grep -q "interface $IFACE has address $GUEST_IP/24" &&
        [ "$(drv_of "$NIC_ADDR")" = "$NIC_KDRV" ]; then
        pass "setup.sh config refuses $NIC_ADDR while $IFACE carries $GUEST_IP, and leaves it on $NIC_KDRV"
    else
        fail "setup.sh config on the addressed $NIC_ADDR: rc $rc, driver $(drv_of "$NIC_ADDR")"
    fi
    if [ "$MODE" = nvme ]; then
        # A namespace in use keeps the controller on nvme: here one held open by a process.
        bash -c "exec 3</dev/$NS && exec sleep 600" &
        holder=$!
        sleep 0.2
        out=$(HUGEMEM=$HUGEMEM PCI_ALLOWED=$NVME_ADDR "$SETUP" config 2>&1)
        rc=$?
        echo "$out"
        if [ $rc -ne 0 ] && echo "$out" | grep -q "/dev/$NS is open in $holder (sleep)" &&
            [ "$(drv_of "$NVME_ADDR")" = nvme ] && [ -b "/dev/$NS" ]; then
            pass "setup.sh config refuses $NVME_ADDR while /dev/$NS is open, and leaves it on nvme"
        else
            fail "setup.sh config on $NVME_ADDR with /dev/$NS open: rc $rc, driver $(drv_of "$NVME_ADDR")"
        fi
        kill "$holder"
        wait "$holder" 2>/dev/null
        out=$(HUGEMEM=$HUGEMEM PCI_ALLOWED=$NVME_ADDR "$SETUP" config 2>&1)
        rc=$?
        echo "$out"
        grp=$(basename "$(readlink "/sys/bus/pci/devices/$NVME_ADDR/iommu_group")")
        if [ $rc -eq 0 ] && [ "$(drv_of "$NVME_ADDR")" = vfio-pci ] && [ -c "/dev/vfio/$grp" ] && [ ! -e "/dev/$NS" ] && [ -c "$KNG" ]; then
            pass "setup.sh config: NVMe $NVME_ADDR on vfio-pci, /dev/vfio/$grp there, /dev/$NS gone ($KNG of $NVME_K_ADDR still there), $(cat /proc/sys/vm/nr_hugepages) hugepages"
        else
            fail "setup.sh config (rc $rc): $NVME_ADDR on $(drv_of "$NVME_ADDR"), /dev/vfio: $(ls /dev/vfio 2>&1 | tr '\n' ' ')"
        fi
    else
        out=$(HUGEMEM=$HUGEMEM PCI_ALLOWED='' "$SETUP" config 2>&1)
        rc=$?
        echo "$out"
        if [ $rc -eq 0 ]; then
            pass "setup.sh config with PCI_ALLOWED empty: hugepages only ($(cat /proc/sys/vm/nr_hugepages) reserved)"
        else
            fail "setup.sh config with PCI_ALLOWED empty (rc $rc)"
        fi
    fi
else
    out=$(HUGEMEM=$HUGEMEM PCI_ALLOWED=$NIC_ADDR "$SETUP" config 2>&1)
    rc=$?
    echo "$out"
    grp=$(basename "$(readlink "/sys/bus/pci/devices/$NIC_ADDR/iommu_group")")
    if [ $rc -eq 0 ] && [ "$(drv_of "$NIC_ADDR")" = vfio-pci ] && [ -c "/dev/vfio/$grp" ] && [ -c /dev/vfio/vfio ]; then
        pass "setup.sh config: $NIC_ADDR on vfio-pci, /dev/vfio/$grp there, $(cat /proc/sys/vm/nr_hugepages) hugepages"
    else
        fail "setup.sh config (rc $rc): $NIC_ADDR on $(drv_of "$NIC_ADDR"), /dev/vfio: $(ls /dev/vfio 2>&1 | tr '\n' ' ')"
    fi
    # Again: nothing changes, and what reset gives back stays what it was before the first.
    state=$(cat /run/iscsi-tgt-setup/* 2>/dev/null)
    out=$(HUGEMEM=$HUGEMEM PCI_ALLOWED=$NIC_ADDR "$SETUP" config 2>&1)
    rc=$?
    echo "$out"
    if [ $rc -eq 0 ] && [ "$(drv_of "$NIC_ADDR")" = vfio-pci ] && [ "$(cat /run/iscsi-tgt-setup/* 2>/dev/null)" = "$state" ]; then
        pass "setup.sh config a second time: no change"
    else
        fail "setup.sh config a second time (rc $rc) changed something: $(cat /run/iscsi-tgt-setup/* 2>/dev/null | tr '\n' ' ')"
    fi
fi

# --- run on the NIC until the host is done ------------------------------------------------------
case $MODE in
testpmd)
    # icmpecho answers ARP requests: the host's connections to the forwarded port make the user
    # network ask for the guest's address, so frames go both ways through the vIOMMU.
    dpdk-testpmd -l 0-1 -n 1 --in-memory -a "$NIC_ADDR" -- --forward-mode=icmpecho \
        --stats-period 1 --total-num-mbufs=2048 --nb-cores=1 >/tmp/testpmd.log 2>&1 &
    tp=$!
    up=0
    for _ in $(seq 1 600); do
        grep -q "Press Ctrl+C to quit\|Port statistics" /tmp/testpmd.log && { up=1; break; }
        kill -0 $tp 2>/dev/null || break
        sleep 0.1
    done
    sed 's/\x1b\[[0-9;]*[A-Za-z]//g' /tmp/testpmd.log | grep -v "^ *$" | head -40
    if [ $up = 1 ] && grep -q "Probe PCI driver: $NIC_PMD.*$NIC_ADDR" /tmp/testpmd.log &&
        grep -qi "IOMMU type 1" /tmp/testpmd.log; then
        pass "dpdk-testpmd: $NIC_PMD drives $NIC_ADDR through VFIO (IOMMU type 1) and forwards"
        echo "VMTEST READY ok"
    else
        fail "dpdk-testpmd did not come up on $NIC_ADDR with $NIC_PMD and VFIO type 1"
        echo "VMTEST READY failed"
    fi
    wait_host
    kill -INT $tp 2>/dev/null
    for _ in $(seq 1 200); do kill -0 $tp 2>/dev/null || break; sleep 0.1; done
    kill -0 $tp 2>/dev/null && { kill -KILL $tp; fail "dpdk-testpmd did not exit on SIGINT"; }
    wait $tp 2>/dev/null
    clean=$(sed 's/\x1b\[[0-9;]*[A-Za-z]//g' /tmp/testpmd.log)
    echo "$clean" | sed -n '/Forward statistics for port 0/,/^ *-\+ *$/p' | head -12
    stats=$(echo "$clean" | sed -n '/Forward statistics for port 0/,$p')
    rx=$(echo "$stats" | awk '/RX-packets:/ {print $2; exit}')
    tx=$(echo "$stats" | awk '/TX-packets:/ {print $2; exit}')
    if [ "${rx:-0}" -gt 0 ] && [ "${tx:-0}" -gt 0 ]; then
        pass "dpdk-testpmd received $rx and sent $tx frames (the user network's ARP requests and SYNs, its ARP replies)"
    else
        fail "dpdk-testpmd counted RX ${rx:-?} and TX ${tx:-?} frames: no traffic both ways"
    fi
    ;;
target | kernel | initiator | nvme)
    if [ ! -x "$BIN" ]; then
        fail "no target binary in the guest ($BIN)"
        echo "VMTEST READY failed"
        wait_host
    else
        if [ "$MODE" != target ]; then
            args=(--listen 0.0.0.0:3260 --mem-size 64)
        else
            eval "args=($TARGET_ARGS)"
        fi
        echo "VMTEST target: $BIN ${args[*]}"
        rm -f "$SOCK"
        "$BIN" --rpc-socket "$SOCK" "${args[@]}" >/tmp/target.log 2>&1 &
        TARGET_PID=$!
        # wait_rpc shows the target's log if it exits during start.
        if [ "$MODE" = nvme ]; then
            configure() { configure_nvme "$SOCK" "$IQN"; }
            what="a vdisk_nvme LUN 0 on $NVME_ADDR"
        else
            configure() { configure_default "$SOCK" "$IQN" "$RAM_MB"; }
            what="a ${RAM_MB} MiB RAM LUN 0 and a null LUN 1"
        fi
        if (wait_rpc "$SOCK" /tmp/target.log && configure); then
            pass "the target runs ($MODE: ${args[*]}) with $IQN: $what"
            if [ "$MODE" = nvme ]; then
                for a in model serial firmware queue_pairs blocksize size_mb thin_provisioned t10_dev_id naa_id eui64_id; do
                    echo "VMTEST devices/nvme0/$a: $($RPC -s "$SOCK" get "devices/nvme0/$a" 2>&1)"
                done
                for a in filename nsid model serial firmware queue_pairs blocksize size_mb thin_provisioned nv_cache t10_dev_id naa_id eui64_id; do
                    echo "VMTEST devices/nvmek/$a: $($RPC -s "$SOCK" get "devices/nvmek/$a" 2>&1)"
                done
            fi
            echo "VMTEST READY ok"
            wait_host
            [ "$MODE" = initiator ] && kernel_initiator_pr
            if [ "$MODE" = nvme ]; then
                for a in outstanding timeouts resets; do
                    echo "VMTEST devices/nvme0/$a: $($RPC -s "$SOCK" get "devices/nvme0/$a" 2>&1)"
                done
                echo "VMTEST devices/nvmek/outstanding: $($RPC -s "$SOCK" get devices/nvmek/outstanding 2>&1)"
                if (rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "del 1" &&
                    rpc "$SOCK" mgmt handlers/vdisk_nvme/mgmt "del_device nvmek"); then
                    closed=0
                    for _ in $(seq 1 100); do
                        held=$(for f in /proc/"$TARGET_PID"/fd/*; do readlink "$f"; done 2>/dev/null | grep -c "^$KNG\$")
                        [ "$held" = 0 ] && { closed=1; break; }
                        sleep 0.1
                    done
                    if [ $closed = 1 ]; then
                        pass "del_device nvmek: the target closed $KNG"
                    else
                        fail "del_device nvmek: the target still holds $KNG"
                    fi
                else
                    fail "LUN 1 or del_device nvmek refused"
                fi
                if (rpc "$SOCK" mgmt "targets/iscsi/$IQN/luns/mgmt" "del 0" &&
                    rpc "$SOCK" mgmt handlers/vdisk_nvme/mgmt "del_device nvme0"); then
                    closed=0
                    for _ in $(seq 1 100); do
                        holds_vfio "$TARGET_PID" || { closed=1; break; }
                        sleep 0.1
                    done
                    if [ $closed = 1 ]; then
                        pass "del_device nvme0: the target closed its vfio descriptors"
                    else
                        fail "del_device nvme0: the target still holds $(for f in /proc/"$TARGET_PID"/fd/*; do readlink "$f"; done | grep vfio | tr '\n' ' ')"
                    fi
                    # reset only once the descriptors are closed: unbinding vfio-pci waits for them.
                    if [ $closed = 1 ]; then
                        out=$("$SETUP" reset 2>&1)
                        rc=$?
                        echo "$out"
                        if [ $rc -eq 0 ] && nvme_ns_up 100 && [ "$(drv_of "$NVME_ADDR")" = nvme ]; then
                            pass "setup.sh reset: $NVME_ADDR back on nvme, /dev/$NS there again ($(cat "/sys/block/$NS/size") sectors)"
                        else
                            fail "setup.sh reset (rc $rc): $NVME_ADDR on $(drv_of "$NVME_ADDR"), no namespace of serial $NVME_SERIAL"
                        fi
                    fi
                else
                    fail "LUN 0 or del_device nvme0 refused"
                fi
            fi
            if kill -0 "$TARGET_PID" 2>/dev/null; then
                if (stop_target); then
                    pass "the target exits on SIGTERM"
                else
                    fail "the target did not exit within 10 s of SIGTERM"
                fi
            else
                fail "the target died while the host used it"
            fi
            grep -q panicked /tmp/target.log && fail "the target log shows a panic"
            grep -a "WARN\|ERROR" /tmp/target.log | grep -v "sending it again" | tail -20
            echo "VMTEST target log: $(grep -ac "sending it again" /tmp/target.log) I/Os sent again after resets"
            tail -20 /tmp/target.log
        else
            fail "the target did not start or take its configuration"
            (stop_target) >/dev/null 2>&1
            echo "VMTEST READY failed"
            wait_host
        fi
    fi
    ;;
esac

# --- setup.sh reset -----------------------------------------------------------------------------
out=$("$SETUP" reset 2>&1)
rc=$?
echo "$out"
if [ "$MODE" = kernel ] || [ "$MODE" = initiator ] || [ "$MODE" = nvme ]; then
    if [ $rc -eq 0 ] && [ "$(drv_of "$NIC_ADDR")" = "$NIC_KDRV" ] && [ "$(cat /proc/sys/vm/nr_hugepages)" = "$hp_before" ]; then
        pass "setup.sh reset: hugepages given back ($hp_before left), $NIC_ADDR untouched on $NIC_KDRV"
    else
        fail "setup.sh reset (rc $rc), $NIC_ADDR on $(drv_of "$NIC_ADDR")"
    fi
else
    for _ in $(seq 1 50); do
        [ -n "$(iface_of "$NIC_ADDR")" ] && break
        sleep 0.1
    done
    if [ $rc -eq 0 ] && [ "$(drv_of "$NIC_ADDR")" = "$NIC_KDRV" ] && [ -n "$(iface_of "$NIC_ADDR")" ] &&
        [ "$(cat "/sys/bus/pci/devices/$NIC_ADDR/driver_override")" = "(null)" ] &&
        [ "$(cat /proc/sys/vm/nr_hugepages)" = "$hp_before" ]; then
        pass "setup.sh reset: $NIC_ADDR back on $NIC_KDRV (interface $(iface_of "$NIC_ADDR")), driver_override cleared, hugepages given back ($hp_before left)"
    else
        fail "setup.sh reset (rc $rc): $NIC_ADDR on $(drv_of "$NIC_ADDR"), override $(cat "/sys/bus/pci/devices/$NIC_ADDR/driver_override"), $(cat /proc/sys/vm/nr_hugepages) hugepages"
    fi
fi
finish

#!/usr/bin/env bash
# Prepares a machine for the target, in the manner of SPDK's scripts/setup.sh.
#
#   scripts/setup.sh            installs what the target, its tests and its benchmarks need on a
#                               fresh Debian 12 machine (the peers: libiscsi-bin, tgt, qemu-img
#                               with iscsi:// support, iperf3; a Rust toolchain check) and reserves
#                               hugepages for the DMA buffer pool (ISCSI_TGT_HUGEPAGES pages of
#                               2 MiB, 512 by default). Safe to run again.
#   scripts/setup.sh config     reserves HUGEMEM MB of hugepages (1024 by default; mounts
#                               hugetlbfs at /dev/hugepages if none is mounted) and binds the PCI
#                               devices in PCI_ALLOWED (space-separated, e.g. "0000:00:03.0") to
#                               vfio-pci for a DPDK poll-mode driver, remembering their drivers.
#                               Refuses a network device that carries an address or a route, an
#                               NVMe controller with a namespace mounted, used as swap, held by
#                               another block device (RAID, LVM) or open in a process (its block,
#                               controller or generic character devices), and any device without
#                               an IOMMU group (saying why and what to do); changes nothing then.
#                               An NVMe controller on vfio-pci is for the target's vdisk_nvme
#                               handler (add_device NAME pci=ADDR; nsid=1).
#   scripts/setup.sh reset      gives the devices in PCI_ALLOWED (all that config bound when it
#                               is empty) back to their kernel drivers (an NVMe controller to
#                               nvme, which finds its namespaces again), and releases the hugepages
#                               config reserved if nobody changed the count since.
#   scripts/setup.sh status     network (class 0x02xx) and NVMe (0x0108) PCI devices: drivers,
#                               IOMMU groups, interfaces, whether in use; hugepages and mounts.
#
# config and reset need root. What config did is kept under ISCSI_TGT_SETUP_STATE
# (/run/iscsi-tgt-setup by default, so it is forgotten at reboot, like the bindings themselves).
set -euo pipefail

STATE=${ISCSI_TGT_SETUP_STATE:-/run/iscsi-tgt-setup}
SYS_PCI=/sys/bus/pci

say() { echo "setup.sh: $*"; }
fail() { echo "setup.sh: $*" >&2; exit 1; }

usage() {
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
}

# --- no argument: packages and the buffer pool's hugepages (what other scripts call) -----------

install_deps() {
    local need_apt=()
    command -v iscsi-test-cu >/dev/null 2>&1 || need_apt+=(libiscsi-bin)
    command -v tgtd >/dev/null 2>&1 || need_apt+=(tgt)
    command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
    # backends.sh builds an ISO image for the vcdrom check.
    command -v genisoimage >/dev/null 2>&1 || need_apt+=(genisoimage)
    # netns-test.sh: namespaces and veth pairs, offloads off on the kernel end, packet loss.
    command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
    command -v ethtool >/dev/null 2>&1 || need_apt+=(ethtool)
    command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
    # bench.sh: the loopback TCP ceiling, and the font iscsi-bench-plot draws its PNGs with.
    command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
    [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
    # profile.sh: CPU profiles and system call counts of a running target, segment sizes.
    command -v perf >/dev/null 2>&1 || need_apt+=(linux-perf)
    command -v strace >/dev/null 2>&1 || need_apt+=(strace)
    command -v tcpdump >/dev/null 2>&1 || need_apt+=(tcpdump)
    # The build with --features dpdk: DPDK's headers and libraries (found by pkg-config),
    # libclang for bindgen, and the PMDs the tests use (af_xdp is a package of its own).
    dpkg -s libdpdk-dev >/dev/null 2>&1 || need_apt+=(libdpdk-dev)
    dpkg -s dpdk >/dev/null 2>&1 || need_apt+=(dpdk)
    dpkg -s librte-net-af-xdp23 >/dev/null 2>&1 || need_apt+=(librte-net-af-xdp23)
    dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
    command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
    # qemu-img must come from the same build as qemu-block-extra (which adds iscsi://):
    # installing the block module pins qemu-utils to Debian's matching version.
    qemu_iscsi_ok() { [ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] && command -v qemu-img >/dev/null 2>&1; }

    if [ ${#need_apt[@]} -gt 0 ] || ! qemu_iscsi_ok; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        if [ ${#need_apt[@]} -gt 0 ]; then
            apt-get install -y -qq "${need_apt[@]}" >/dev/null
        fi
        if ! qemu_iscsi_ok; then
            local ver
            ver=$(apt-cache show qemu-block-extra | awk '/^Version:/ {print $2; exit}')
            apt-get install -y -qq --allow-downgrades qemu-block-extra "qemu-utils=$ver" >/dev/null
        fi
    fi
    qemu_iscsi_ok || fail "qemu-img with iscsi:// support is not installed"
    command -v iscsi-test-cu >/dev/null || fail "libiscsi-bin did not install"
    command -v genisoimage >/dev/null || fail "genisoimage did not install"
    local c
    for c in ip ethtool iptables pkg-config iperf3 perf strace tcpdump; do
        command -v "$c" >/dev/null || fail "$c did not install"
    done
    [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || fail "fonts-dejavu-core did not install"
    pkg-config --exists libdpdk || fail "libdpdk-dev did not install (pkg-config finds no libdpdk)"

    # tgtd is only a benchmark peer: keep Debian's service from holding port 3260.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop tgt >/dev/null 2>&1 || true
        systemctl disable tgt >/dev/null 2>&1 || true
    fi

    # Hugepages for the buffer pool (2 MiB pages); the target falls back to ordinary pages with
    # a warning when none are reserved, so failure here is not fatal.
    local want have
    want=${ISCSI_TGT_HUGEPAGES:-512}
    have=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
    if [ "$have" -lt "$want" ]; then
        echo "$want" > /proc/sys/vm/nr_hugepages 2>/dev/null || echo "setup.sh: could not reserve hugepages; continuing without" >&2
    fi

    command -v cargo >/dev/null || fail "cargo is not installed"
    say "ready (hugepages: $(cat /proc/sys/vm/nr_hugepages))"
}

# --- what the subcommands share -----------------------------------------------------------------

# The default hugepage size in kB (2048 on x86-64).
hp_size_kb() { awk '/^Hugepagesize:/ {print $2}' /proc/meminfo; }

drv_of() {
    local l
    l=$(readlink "$SYS_PCI/devices/$1/driver" 2>/dev/null) || { echo none; return; }
    echo "${l##*/}"
}

group_of() {
    local l
    l=$(readlink "$SYS_PCI/devices/$1/iommu_group" 2>/dev/null) || { echo -; return; }
    echo "${l##*/}"
}

iommu_groups() { find /sys/kernel/iommu_groups -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

# "0000:00:03.0" from "0000:00:03.0" or "00:03.0"; empty when it is not a PCI address.
norm_addr() {
    local a=${1,,}
    [[ $a =~ ^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$ ]] && a=0000:$a
    [[ $a =~ ^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$ ]] && echo "$a"
    return 0
}

# Network interfaces and block devices below a PCI device (a virtio NIC's interface sits one
# level down, under virtioN/).
ifaces_of() {
    local n p
    for n in /sys/class/net/*; do
        p=$(readlink -f "$n")
        case $p in */"$1"/*) echo "${n##*/}" ;; esac
    done
}
# An NVMe controller's namespaces: where the kernel's native multipath makes a shared namespace
# (a controller that reports multi-path I/O capability) one head device, the nvmeSnN a file
# system is mounted from hangs off the subsystem, not the PCI device, which has only the hidden
# path nvmeScCnN: the head and its partitions count as the device's. (A single-path namespace,
# as QEMU's emulated controller has, is nvmeSnN under the PCI device itself.)
blocks_of() {
    local b p
    for b in /sys/class/block/*; do
        [ -e "$b" ] || continue
        p=$(readlink -f "$b")
        case $p in */"$1"/*) ;; *) continue ;; esac
        b=${b##*/}
        echo "$b"
        if [[ $b =~ ^nvme([0-9]+)c[0-9]+n([0-9]+)$ ]]; then
            local head=nvme${BASH_REMATCH[1]}n${BASH_REMATCH[2]} h
            for h in "/sys/class/block/$head" "/sys/class/block/$head"p*; do
                [ -e "$h" ] && echo "${h##*/}"
            done
        fi
    done | sort -u
}
# Character devices below a PCI device: NVMe controllers (/dev/nvmeN) and generic namespace
# devices (/dev/ngNnM), which a program (nvme-cli, io_uring passthrough) may hold open.
chars_of() {
    local c p
    for c in /sys/class/nvme/* /sys/class/nvme-generic/*; do
        [ -e "$c" ] || continue
        p=$(readlink -f "$c")
        case $p in */"$1"/*) echo "${c##*/}" ;; esac
    done
}
# Processes holding /dev/NAME open, as "pid (comm)".
holders_of() {
    local f l pid
    for f in /proc/[0-9]*/fd/*; do
        l=$(readlink "$f" 2>/dev/null) || continue
        [ "$l" = "/dev/$1" ] || continue
        pid=${f#/proc/}
        pid=${pid%%/*}
        echo "$pid ($(cat "/proc/$pid/comm" 2>/dev/null))"
    done | sort -u | tr '\n' ' '
}

# in_use ADDR: prints why the device is busy, one reason a line; nothing when it is free.
in_use() {
    local addr=$1 i a r b c p
    for i in $(ifaces_of "$addr"); do
        # Addresses, less IPv6 link-local ones (every interface that is up has one).
        a=$(ip -o addr show dev "$i" 2>/dev/null |
            awk '$3 == "inet" || ($3 == "inet6" && $4 !~ /^fe80:/) {printf "%s%s", s, $4; s = ", "}')
        [ -n "$a" ] && echo "interface $i has address $a"
        r=$( (ip -4 route show dev "$i" 2>/dev/null; ip -6 route show dev "$i" 2>/dev/null) |
            awk '$1 !~ /^(fe80:|ff00:|multicast|local|anycast|broadcast)/ {sub(/ +$/, ""); printf "%s%s", s, $0; s = "; "}')
        [ -n "$r" ] && echo "interface $i has routes: $r"
        if [ -e "/sys/class/net/$i/master" ]; then
            echo "interface $i is enslaved to $(basename "$(readlink "/sys/class/net/$i/master")")"
        fi
    done
    for b in $(blocks_of "$addr"); do
        awk -v d="/dev/$b" '$1 == d {print d " is mounted on " $2}' /proc/mounts
        awk -v d="/dev/$b" '$1 == d {print d " is swap"}' /proc/swaps 2>/dev/null
        if [ -d "/sys/class/block/$b/holders" ] && [ -n "$(ls -A "/sys/class/block/$b/holders")" ]; then
            echo "/dev/$b is held by $(ls "/sys/class/block/$b/holders" | tr '\n' ' ')"
        fi
        p=$(holders_of "$b")
        [ -z "$p" ] || echo "/dev/$b is open in ${p% }"
    done
    for c in $(chars_of "$addr"); do
        p=$(holders_of "$c")
        [ -z "$p" ] || echo "/dev/$c is open in ${p% }"
    done
    return 0
}

explain_no_iommu() {
    local here="this kernel has none enabled (/sys/kernel/iommu_groups is empty)"
    [ "$(iommu_groups)" -eq 0 ] || here="the kernel's IOMMU does not cover this device"
    cat >&2 <<EOF
  vfio-pci gives a device to user space only behind an IOMMU, which confines the device's DMA
  to the memory the process maps for it; $here.
  Debian's kernels are built without VFIO's unsafe no-IOMMU mode (CONFIG_VFIO_NOIOMMU), so
  there is no way around it but to turn an IOMMU on:
  - on real hardware: enable VT-d (Intel) or AMD-Vi / IOMMU (AMD) in the firmware setup, and
    boot with intel_iommu=on (Intel; add iommu=pt to keep the kernel's own devices on the fast
    path) or amd_iommu=on;
  - in a VM: give it an emulated IOMMU with interrupt remapping, e.g. qemu -machine q35
    -device intel-iommu,intremap=on, and intel_iommu=on on the guest's kernel command line
    (scripts/vm-test.sh boots such a guest);
  then check with scripts/setup.sh status that the device has an IOMMU group.
EOF
    if [ -e /sys/module/vfio/parameters/enable_unsafe_noiommu_mode ]; then
        echo "  (This kernel has VFIO's no-IOMMU mode; setup.sh does not use it: it offers no DMA protection.)" >&2
    fi
}

pci_ids() { echo "$(cut -c3- "$SYS_PCI/devices/$1/vendor"):$(cut -c3- "$SYS_PCI/devices/$1/device")"; }

# The name pci.ids gives a vendor:device pair, when the file is there.
pci_name() {
    local v=${1%%:*} d=${1##*:} f
    for f in /usr/share/misc/pci.ids /usr/share/hwdata/pci.ids; do
        [ -r "$f" ] || continue
        awk -v v="$v" -v d="$d" '
            /^[0-9a-f]/ { inv = ($1 == v); next }
            inv && /^\t[0-9a-f]/ && $1 == d { sub(/^\t[0-9a-f]+ +/, ""); print; exit }' "$f"
        return
    done
}

load_module() {
    local m=$1
    [ -e "/sys/module/${m//-/_}" ] && return 0
    command -v modprobe >/dev/null || return 1
    modprobe "$m" 2>&1
}

# --- config -------------------------------------------------------------------------------------

reserve_hugepages() {
    local mb=${HUGEMEM:-1024} size have want got
    [[ $mb =~ ^[0-9]+$ ]] || fail "HUGEMEM must be a number of MB, not '$mb'"
    size=$(hp_size_kb)
    [ -n "$size" ] || fail "the kernel has no hugepages (/proc/meminfo shows no Hugepagesize)"
    want=$(((mb * 1024 + size - 1) / size))
    have=$(cat "/sys/kernel/mm/hugepages/hugepages-${size}kB/nr_hugepages")
    if [ "$have" -ge "$want" ]; then
        say "hugepages: $have of ${size} kB reserved already (HUGEMEM=$mb needs $want)"
    else
        echo "$want" >"/sys/kernel/mm/hugepages/hugepages-${size}kB/nr_hugepages" ||
            fail "could not write nr_hugepages"
        got=$(cat "/sys/kernel/mm/hugepages/hugepages-${size}kB/nr_hugepages")
        mkdir -p "$STATE"
        # Remember only the first reservation: a second config must not make it the baseline.
        [ -e "$STATE/hugepages" ] || echo "$size $have $got" >"$STATE/hugepages"
        awk -v s="$size" -v g="$got" '$1 == s {$3 = g} {print}' "$STATE/hugepages" >"$STATE/hugepages.new"
        mv "$STATE/hugepages.new" "$STATE/hugepages"
        if [ "$got" -lt "$want" ]; then
            echo "setup.sh: hugepages: only $got of $want ${size} kB pages could be reserved (memory is fragmented or short)" >&2
        else
            say "hugepages: $got of ${size} kB reserved (was $have)"
        fi
    fi
    if ! awk '$3 == "hugetlbfs" {f = 1} END {exit !f}' /proc/mounts; then
        mkdir -p /dev/hugepages
        mount -t hugetlbfs -o "pagesize=${size}K" nodev /dev/hugepages || fail "could not mount hugetlbfs on /dev/hugepages"
        say "hugetlbfs mounted on /dev/hugepages"
    fi
}

cmd_config() {
    local addrs=() a n bad=0 why drv grp
    for a in ${PCI_ALLOWED:-}; do
        n=$(norm_addr "$a")
        if [ -z "$n" ]; then
            echo "setup.sh: '$a' in PCI_ALLOWED is not a PCI address (DDDD:BB:DD.F, e.g. 0000:00:03.0)" >&2
            bad=1
        elif [ ! -e "$SYS_PCI/devices/$n" ]; then
            echo "setup.sh: there is no PCI device $n (scripts/setup.sh status lists the network and NVMe devices)" >&2
            bad=1
        else
            addrs+=("$n")
        fi
    done
    [ "$bad" = 0 ] || exit 1

    # Every check first, so that a refusal changes nothing.
    local no_iommu=0
    for a in "${addrs[@]}"; do
        drv=$(drv_of "$a")
        [ "$drv" = vfio-pci ] && continue
        why=$(in_use "$a")
        if [ -n "$why" ]; then
            echo "setup.sh: $a ($drv) is in use, not unbinding it:" >&2
            echo "$why" | sed 's/^/  /' >&2
            bad=1
        fi
        if [ "$(group_of "$a")" = - ]; then
            echo "setup.sh: $a has no IOMMU group: vfio-pci cannot take it." >&2
            no_iommu=1
            bad=1
        fi
    done
    [ "$no_iommu" = 0 ] || explain_no_iommu
    [ "$bad" = 0 ] || exit 1

    reserve_hugepages

    [ ${#addrs[@]} -gt 0 ] || { say "PCI_ALLOWED is empty: no device bound"; return 0; }

    if [ ! -d "$SYS_PCI/drivers/vfio-pci" ]; then
        why=$(load_module vfio-pci) ||
            fail "vfio-pci is not loaded and 'modprobe vfio-pci' failed: ${why:-no modprobe} (the kernel needs CONFIG_VFIO_PCI)"
        say "loaded vfio-pci"
    fi
    # DPDK's VFIO_SET_IOMMU needs the type1 backend, a soft dependency modprobe may not follow.
    load_module vfio_iommu_type1 >/dev/null || echo "setup.sh: vfio_iommu_type1 is not loaded and would not load: DPDK cannot map memory for the device" >&2

    mkdir -p "$STATE"
    touch "$STATE/bound"
    for a in "${addrs[@]}"; do
        drv=$(drv_of "$a")
        grp=$(group_of "$a")
        if [ "$drv" = vfio-pci ]; then
            say "$a is on vfio-pci already (IOMMU group $grp)"
            continue
        fi
        # The original driver is what reset gives the device back to.
        grep -q "^$a " "$STATE/bound" || echo "$a $drv" >>"$STATE/bound"
        local other od
        for other in /sys/kernel/iommu_groups/"$grp"/devices/*; do
            other=${other##*/}
            [ "$other" = "$a" ] && continue
            od=$(drv_of "$other")
            case " ${addrs[*]} " in *" $other "*) continue ;; esac
            case $od in vfio-pci | pcieport | none) ;; *)
                echo "setup.sh: warning: $other (driver $od) shares IOMMU group $grp with $a: VFIO will not open the group until it is unbound too" >&2 ;;
            esac
        done
        echo vfio-pci >"$SYS_PCI/devices/$a/driver_override"
        [ "$drv" = none ] || echo "$a" >"$SYS_PCI/devices/$a/driver/unbind"
        echo "$a" >"$SYS_PCI/drivers_probe" 2>/dev/null || true
        [ "$(drv_of "$a")" = vfio-pci ] || echo "$a" >"$SYS_PCI/drivers/vfio-pci/bind" 2>/dev/null || true
        if [ "$(drv_of "$a")" != vfio-pci ]; then
            echo >"$SYS_PCI/devices/$a/driver_override"
            echo "$a" >"$SYS_PCI/drivers_probe" 2>/dev/null || true
            fail "$a did not bind to vfio-pci (driver now: $(drv_of "$a")); see dmesg"
        fi
        local dev=/dev/vfio/$grp
        [ -e "$dev" ] || dev="$dev (missing: is devtmpfs mounted on /dev?)"
        say "$a ($(pci_ids "$a")) $drv -> vfio-pci, IOMMU group $grp, $dev"
    done

    # VFIO pins the memory a process maps for DMA, and counts it against RLIMIT_MEMLOCK unless
    # the process has CAP_IPC_LOCK (root does).
    local lim
    lim=$(ulimit -l)
    if [ "$lim" != unlimited ] && [ "$lim" -lt $((${HUGEMEM:-1024} * 1024)) ]; then
        say "memlock: a target run as root is not bound by RLIMIT_MEMLOCK; one run as another user" \
            "needs it at least HUGEMEM ($((${HUGEMEM:-1024})) MB; this shell has ${lim} kB): 'USER - memlock unlimited'" \
            "in /etc/security/limits.conf or LimitMEMLOCK=infinity in its systemd unit, and /dev/vfio/N" \
            "and the hugetlbfs mount owned by that user"
    fi
}

# --- reset --------------------------------------------------------------------------------------

cmd_reset() {
    local addrs=() a n drv orig
    if [ -n "${PCI_ALLOWED:-}" ]; then
        for a in $PCI_ALLOWED; do
            n=$(norm_addr "$a")
            [ -n "$n" ] || fail "'$a' in PCI_ALLOWED is not a PCI address (DDDD:BB:DD.F)"
            [ -e "$SYS_PCI/devices/$n" ] || fail "there is no PCI device $n"
            addrs+=("$n")
        done
    elif [ -s "$STATE/bound" ]; then
        while read -r a _; do addrs+=("$a"); done <"$STATE/bound"
    fi
    local bad=0
    for a in "${addrs[@]}"; do
        orig=$(awk -v a="$a" '$1 == a {print $2}' "$STATE/bound" 2>/dev/null)
        drv=$(drv_of "$a")
        if [ "$drv" != vfio-pci ]; then
            say "$a is on ${drv}, not vfio-pci: left alone"
        else
            echo "$a" >"$SYS_PCI/drivers/vfio-pci/unbind"
        fi
        if [ -e "$SYS_PCI/devices/$a/driver_override" ] && [ "$(cat "$SYS_PCI/devices/$a/driver_override")" = vfio-pci ]; then
            echo >"$SYS_PCI/devices/$a/driver_override"
        fi
        if [ "$drv" = vfio-pci ]; then
            # The original driver may be a module that was unloaded meanwhile.
            if [ -n "$orig" ] && [ "$orig" != none ] && [ ! -d "$SYS_PCI/drivers/$orig" ]; then
                load_module "$orig" >/dev/null || true
            fi
            echo "$a" >"$SYS_PCI/drivers_probe" 2>/dev/null || true
            drv=$(drv_of "$a")
            if [ -n "$orig" ] && [ "$drv" != "$orig" ]; then
                echo "setup.sh: $a is on $drv after reset, not on $orig as before config" >&2
                bad=1
            else
                say "$a ($(pci_ids "$a")) vfio-pci -> $drv$(i=$(ifaces_of "$a" | tr '\n' ' '); [ -z "$i" ] || echo ", interface ${i% }")"
            fi
        fi
        if [ -e "$STATE/bound" ]; then
            awk -v a="$a" '$1 != a' "$STATE/bound" >"$STATE/bound.new"
            mv "$STATE/bound.new" "$STATE/bound"
        fi
    done
    [ ${#addrs[@]} -gt 0 ] || say "no device to give back (none bound by config, PCI_ALLOWED empty)"

    # Hugepages go back only when config reserved them and the count is still what it left:
    # anything else means someone else has reserved pages since.
    if [ -s "$STATE/hugepages" ]; then
        local size before after now
        while read -r size before after; do
            now=$(cat "/sys/kernel/mm/hugepages/hugepages-${size}kB/nr_hugepages")
            if [ "$now" = "$after" ]; then
                echo "$before" >"/sys/kernel/mm/hugepages/hugepages-${size}kB/nr_hugepages"
                say "hugepages: $after -> $(cat "/sys/kernel/mm/hugepages/hugepages-${size}kB/nr_hugepages") of ${size} kB (as before config)"
            else
                say "hugepages: $now of ${size} kB reserved, not the $after config left: left alone"
            fi
        done <"$STATE/hugepages"
        rm -f "$STATE/hugepages"
    else
        say "hugepages: config reserved none, left alone"
    fi
    [ "$bad" = 0 ]
}

# --- status -------------------------------------------------------------------------------------

cmd_status() {
    local d size
    echo "Hugepages:"
    for d in /sys/kernel/mm/hugepages/hugepages-*; do
        [ -d "$d" ] || continue
        size=${d##*hugepages-}
        printf "  %-12s total %-6s free %-6s" "$size" "$(cat "$d/nr_hugepages")" "$(cat "$d/free_hugepages")"
        if [ -s "$STATE/hugepages" ] && awk -v s="${size%kB}" '$1 == s {f = 1} END {exit !f}' "$STATE/hugepages"; then
            printf " (config raised it from %s)" "$(awk -v s="${size%kB}" '$1 == s {print $2}' "$STATE/hugepages")"
        fi
        echo
    done
    [ -e /sys/kernel/mm/hugepages ] || echo "  none: the kernel has no hugetlbfs support"
    local mounts
    mounts=$(awk '$3 == "hugetlbfs" {print "  mounted on " $2 " (" $4 ")"}' /proc/mounts)
    echo "${mounts:-  hugetlbfs: not mounted (config mounts it on /dev/hugepages)}"

    local groups
    groups=$(iommu_groups)
    if [ "$groups" -gt 0 ]; then
        echo "IOMMU: $groups groups"
    else
        echo "IOMMU: none (no /sys/kernel/iommu_groups entries): vfio-pci cannot take devices here ('config' says what to do)"
    fi
    if [ -d "$SYS_PCI/drivers/vfio-pci" ]; then
        echo "vfio-pci: loaded$( [ -d /dev/vfio ] && echo "; /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')")"
    elif find "/lib/modules/$(uname -r)" -name 'vfio-pci.ko*' 2>/dev/null | grep -q .; then
        echo "vfio-pci: not loaded (a module: config loads it)"
    else
        echo "vfio-pci: not available (not loaded, no module for kernel $(uname -r))"
    fi

    echo "Network and NVMe PCI devices:"
    local a cls kind n=0 ids drv grp what i b why bound
    for d in "$SYS_PCI"/devices/*; do
        [ -e "$d/class" ] || continue
        a=${d##*/}
        cls=$(cat "$d/class")
        case $cls in
            0x0200*) kind=ethernet ;;
            0x0207*) kind=infiniband ;;
            0x02*) kind=network ;;
            0x0108*) kind=nvme ;;
            *) continue ;;
        esac
        n=$((n + 1))
        ids=$(pci_ids "$a")
        drv=$(drv_of "$a")
        grp=$(group_of "$a")
        what=
        for i in $(ifaces_of "$a") $(blocks_of "$a"); do what+="$i "; done
        what=${what% }
        bound=
        if [ -s "$STATE/bound" ] && grep -q "^$a " "$STATE/bound"; then
            bound=" (config bound it; was $(awk -v a="$a" '$1 == a {print $2}' "$STATE/bound"))"
        fi
        printf "  %-13s %-9s %-10s %-11s iommu %-4s %s%s\n" "$a" "$ids" "$kind" "$drv" "$grp" "${what:--}" "$bound"
        local name
        name=$(pci_name "$ids")
        [ -z "$name" ] || echo "      $name"
        why=$(in_use "$a")
        if [ -n "$why" ]; then
            echo "$why" | sed 's/^/      in use: /'
        elif [ "$drv" != vfio-pci ]; then
            echo "      not in use$([ "$grp" = - ] && echo ", but no IOMMU group: cannot go to vfio-pci")"
        fi
    done
    [ "$n" -gt 0 ] || echo "  none"
    # Interfaces that are not PCI functions (virtual ones, virtio-mmio) cannot be bound at all.
    local others=
    for i in /sys/class/net/*; do
        [ -e "$i/device" ] || continue
        case $(readlink -f "$i/device") in */pci[0-9]*) ;; *) others+="${i##*/} " ;; esac
    done
    [ -z "$others" ] || echo "  (network interfaces on no PCI device, which vfio-pci cannot take: ${others% })"
}

case ${1:-} in
    "")
        [ "$(id -u)" -eq 0 ] || fail "run as root (apt-get and hugepages need it)"
        install_deps
        ;;
    config | reset)
        [ "$(id -u)" -eq 0 ] || fail "run as root (sysfs writes need it)"
        "cmd_$1"
        ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
        echo "setup.sh: unknown subcommand '$1'" >&2
        usage >&2
        exit 1
        ;;
esac

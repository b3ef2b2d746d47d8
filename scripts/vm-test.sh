#!/usr/bin/env bash
# The VM test bed: a machine that cannot give a NIC to a DPDK poll-mode driver (no IOMMU, no
# spare NIC, no kernel modules) boots a guest that can, under QEMU's TCG: q35 with an emulated
# Intel IOMMU (intremap=on), intel_iommu=on, Debian 12's own kernel and modules, an initramfs
# with busybox, bash, a minimal Python for rpc/rpc.py, dpdk-testpmd and the DPDK libraries and
# PMDs (copied from this host: both are Debian 12), scripts/setup.sh and the target binary.
#
# One emulated NIC (NIC=virtio: virtio-net-pci, modern only and behind the IOMMU; NIC=e1000) sits
# at 0000:00:03.0 on QEMU's user network, with host port PORT (13420) forwarded to the guest's
# 10.0.2.15:3260; the user network is restricted, so the guest reaches nothing beyond QEMU. The
# guest (scripts/vm-guest.sh) loads the drivers, runs setup.sh status and setup.sh config with
# PCI_ALLOWED=0000:00:03.0, checks the NIC is on vfio-pci with its /dev/vfio/N, runs on the NIC,
# then setup.sh reset and checks the NIC is back on its kernel driver. What runs on the NIC:
#   MODE=testpmd  dpdk-testpmd (icmpecho) as a stand-in for the target: the host connects to the
#                 forwarded port, the user network ARPs for the guest, testpmd answers; frames
#                 counted both ways prove the PMD's DMA through the vIOMMU. (default)
#   MODE=target   the target on DPDK: iscsi-tgt $TARGET_ARGS (by default --net dpdk:0000:00:03.0
#                 --ip 10.0.2.15/24 --gateway 10.0.2.2 --eal "--in-memory" ...; needs a build
#                 with --features dpdk), a RAM LUN set up through its RPC socket; the host logs
#                 in through the forwarded port: iscsi-ls, iscsi-inq, a qemu-img round trip of
#                 ROUNDTRIP_MB (16) MiB compared with cmp.
#   MODE=kernel   the same host checks against the target on the guest kernel's TCP (the NIC
#                 stays on its kernel driver with 10.0.2.15; setup.sh config must refuse it).
#   MODE=initiator MODE=kernel, then the guest kernel's own iSCSI initiator (open-iscsi's
#                 iscsid and iscsiadm, iscsi_tcp, sd) logs in to the target on the guest's
#                 loopback twice, under two initiator names, and sg3-utils' sg_persist runs
#                 persistent reservations through the two /dev/sdX: registration, READ KEYS,
#                 a Write Exclusive - Registrants Only reservation, and a fence_scsi-style
#                 PREEMPT AND ABORT that fences the second node (its writes then fail, its
#                 reads do not), then CLEAR.
#   MODE=nvme     MODE=kernel with the LUN on the userspace NVMe driver: the guest binds the
#                 emulated NVMe controller at 0000:00:04.0 (a file-backed namespace of
#                 ROUNDTRIP_MB + 16 MiB, discards punched through to the file) to vfio-pci with
#                 setup.sh config, and LUN 0 is a vdisk_nvme device on it; from the host:
#                 iscsi-inq, a qemu-img round trip of ROUNDTRIP_MB (256 here) MiB compared with
#                 cmp, and UNMAP (qemu-io's discard) of 1 MiB of what was written, read back as
#                 zeros, libiscsi's suites for the commands the driver carries
#                 (NVME_CU_TESTS: no failed or warned test) and iscsi-bench --verify at QD32
#                 over the whole namespace while the guest resets the controller under it twice
#                 (the device's reset attribute); then in the guest del_device, the vfio
#                 descriptors closed, setup.sh reset and the kernel's nvme driver back on the
#                 controller with its namespace.
#                 A second emulated controller at 0000:00:05.0 stays on the guest kernel's nvme
#                 driver and LUN 1 is a passthrough vdisk_nvme device on its /dev/ngXn1
#                 (io_uring NVMe commands); from the host on LUN 1: iscsi-inq, the same qemu-img
#                 round trip and UNMAP, libiscsi's NVME_PT_CU_TESTS and iscsi-bench --verify at
#                 QD32. With NVME_BENCH_SECS=S (0: not run) also S seconds of 4 KiB random
#                 reads at QD32 on each LUN with the target's CPU time over each run.
# Each step prints PASS or FAIL, then "N passed, M failed"; the exit status is 1 if a step
# failed, 77 (SKIP, with the reason) when it cannot run here: not root, or no QEMU and no way to
# install it, or no guest kernel cached and no way to download it. Downloads (Debian's kernel
# and busybox-static packages) are kept in VM_CACHE (/var/tmp/iscsi-tgt-vm) under their
# versioned names, so a rerun fetches nothing. QEMU is killed and the work directory removed on
# every exit path; the last run's console log is kept as VM_CACHE/last-console.log (KEEP=1
# keeps the work directory too). About 30 s for MODE=testpmd, 40 s for MODE=kernel on a 2-core
# machine once the packages are cached.
#   MODE=testpmd NIC=virtio PORT=13420 ISCSI_TGT_BIN=target/release/iscsi-tgt scripts/vm-test.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

MODE=${MODE:-testpmd}
NIC=${NIC:-virtio}
PORT=${PORT:-13420}
CACHE=${VM_CACHE:-/var/tmp/iscsi-tgt-vm}
VM_MEM=${VM_MEM:-2G}
VM_CPUS=${VM_CPUS:-2}
VM_HUGEMEM=${VM_HUGEMEM:-512}
if [ "${MODE:-}" = nvme ]; then ROUNDTRIP_MB=${ROUNDTRIP_MB:-256}; else ROUNDTRIP_MB=${ROUNDTRIP_MB:-16}; fi
NVME_CU_TESTS=${NVME_CU_TESTS:-SCSI.Read16,SCSI.Write16,SCSI.SynchronizeCache10,SCSI.Unmap,SCSI.CompareAndWrite}
# The passthrough LUN answers libiscsi's tests about four times as fast under TCG as the
# userspace driver's (emulated MMIO): it gets the whole required list (netns-test.sh's, with
# the NVMe data path's suites), the driver's LUN the data path's suites (the whole list on it:
# 81 passed, 0 failed, 3 skipped, 1 warned by construction, in 184 s; see docs/NVME.md).
NVME_REQUIRED_TESTS=iSCSI,SCSI.Inquiry,SCSI.Read6,SCSI.Read10,SCSI.Read12,SCSI.Read16,SCSI.Write10,SCSI.Write12,SCSI.Write16,SCSI.ReadCapacity10,SCSI.ReadCapacity16,SCSI.TestUnitReady,SCSI.ReportLuns,SCSI.ModeSense6,SCSI.CompareAndWrite,SCSI.SynchronizeCache10,SCSI.Unmap,SCSI.WriteSame16
NVME_PT_CU_TESTS=${NVME_PT_CU_TESTS:-$NVME_REQUIRED_TESTS}
NVME_BENCH_SECS=${NVME_BENCH_SECS:-0}
NVME_ADDR=0000:00:04.0
NVME_K_ADDR=0000:00:05.0
# How long the guest may take to boot and come up on the NIC, and to finish after the host.
UP_TIMEOUT=${VM_UP_TIMEOUT:-300}
# How long the guest waits for the host's checks (MODE=nvme runs libiscsi suites under TCG).
HOST_TIMEOUT=$UP_TIMEOUT
[ "$MODE" = nvme ] && HOST_TIMEOUT=$((3 * UP_TIMEOUT))
NIC_ADDR=0000:00:03.0
GUEST_IP=10.0.2.15
GATEWAY=10.0.2.2
IQN=iqn.2026-11.org.iscsi-tgt:vm
TARGET_ARGS=${TARGET_ARGS:-"--net dpdk:$NIC_ADDR --ip $GUEST_IP/24 --gateway $GATEWAY --eal \"--in-memory\" --listen $GUEST_IP:3260 --mem-size 64"}
PMD_DIR=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0
# The guest kernel's modules (with what they depend on).
MODULES="virtio_pci virtio_net e1000 nvme vfio vfio_iommu_type1 vfio-pci"
# The kernel's iSCSI initiator and SCSI disks (MODE=initiator), with the CRCs they want.
[ "$MODE" = initiator ] && MODULES+=" iscsi_tcp sd_mod sg crc32c_generic crct10dif_generic crc64_rocksoft_generic"
SKIP=77
START=$(date +%s)

case $MODE in testpmd | target | kernel | initiator | nvme) ;; *) die "MODE is testpmd, target, kernel, initiator or nvme, not '$MODE'" ;; esac
case $NIC in
    virtio) NIC_DEV="virtio-net-pci,disable-legacy=on,iommu_platform=on" NIC_KDRV=virtio-pci NIC_PMD=net_virtio ;;
    e1000) NIC_DEV=e1000 NIC_KDRV=e1000 NIC_PMD=net_e1000_em ;;
    *) die "NIC is virtio or e1000, not '$NIC'" ;;
esac

npass=0
nfail=0
ok() { npass=$((npass + 1)); echo "PASS: $*"; }
bad() { nfail=$((nfail + 1)); echo "FAIL: $*"; }
skip() { echo "SKIP: $*"; exit "$SKIP"; }

[ "$(id -u)" -eq 0 ] || skip "needs root (apt-get, and the guest image holds root-owned files)"

WORK=$(mktemp -d /var/tmp/iscsi-tgt-vm-run.XXXXXX)
QEMU_PID=
cleanup() {
    local rc=$?
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    [ -e "$WORK/console.log" ] && cp "$WORK/console.log" "$CACHE/last-console.log" 2>/dev/null
    if [ -n "${KEEP:-}" ]; then echo "vm-test: work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
mkdir -p "$CACHE/debs" "$CACHE/x"

# --- what the host needs ------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v dpdk-testpmd >/dev/null || need+=(dpdk-dev)
for p in bus_pci mempool_ring net_virtio net_e1000; do
    [ -e "$PMD_DIR/librte_$p.so.23" ] || need+=("librte-${p//_/-}23")
done
[ -x /usr/bin/python3.11 ] || need+=(python3.11)
if [ "$MODE" = initiator ]; then
    command -v iscsiadm >/dev/null || need+=(open-iscsi)
    command -v sg_persist >/dev/null || need+=(sg3-utils)
fi
if [ "$MODE" != testpmd ]; then
    if ! command -v iscsi-ls >/dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ]; then
        "$ROOT/scripts/setup.sh"
    fi
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "vm-test: installing ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
        >"$WORK/apt.log" 2>&1 || { tail -5 "$WORK/apt.log"; skip "could not install ${need[*]} (no network to Debian's packages?)"; }
fi

# fetch_deb PKG: a .deb of PKG in $CACHE/debs (the candidate version, downloaded once; with no
# package lists or no network, the newest one cached); prints its path.
fetch_deb() {
    local pkg=$1 ver f
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    if [ -n "$ver" ] && [ "$ver" != "(none)" ]; then
        f=$CACHE/debs/${pkg}_${ver//:/%3a}_amd64.deb
        if [ ! -s "$f" ] && (cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null 2>&1) && [ -s "$f" ]; then
            # A new version replaces the ones before it, and what was unpacked from them.
            find "$CACHE/debs" -name "${pkg}_*.deb" ! -name "$(basename "$f")" -delete
            find "$CACHE/x" -mindepth 1 -maxdepth 1 -name "${pkg}_*" ! -name "$(basename "$f" .deb)" -exec rm -rf {} + 2>/dev/null
        fi
        [ -s "$f" ] && { echo "$f"; return 0; }
    fi
    f=$(find "$CACHE/debs" -name "${pkg}_*.deb" -size +0 | sort -V | tail -1)
    [ -z "$f" ] || echo "$f"
}

# The kernel: what linux-image-amd64 points to now, or the newest cached.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
kdeb=
if [ -n "$kpkg" ]; then
    kdeb=$(fetch_deb "$kpkg")
    # A kernel of a new ABI has a new package name: the ones before it go.
    [ -z "$kdeb" ] || find "$CACHE/debs" -name 'linux-image-[0-9]*-amd64_*.deb' ! -name "$(basename "$kdeb")" -delete
    [ -z "$kdeb" ] || find "$CACHE/x" -mindepth 1 -maxdepth 1 -name 'linux-image-[0-9]*' ! -name "$(basename "$kdeb" .deb)" -exec rm -rf {} +
fi
[ -n "$kdeb" ] || kdeb=$(find "$CACHE/debs" -name 'linux-image-[0-9]*-amd64_*.deb' -size +0 | sort -V | tail -1)
[ -n "$kdeb" ] || skip "no Debian kernel package cached in $CACHE/debs and none could be downloaded"
bdeb=$(fetch_deb busybox-static)
[ -n "$bdeb" ] || skip "no busybox-static package cached in $CACHE/debs and none could be downloaded"

# unpack DEB: the package's files under $CACHE/x/<its name>, once.
unpack() {
    local d
    d=$CACHE/x/$(basename "$1" .deb)
    if [ ! -e "$d/.done" ]; then
        rm -rf "$d"
        mkdir -p "$d"
        dpkg-deb -x "$1" "$d"
        touch "$d/.done"
    fi
    echo "$d"
}
KDIR=$(unpack "$kdeb")
BUSYBOX=$(unpack "$bdeb")/bin/busybox
KVER=$(basename "$(find "$KDIR/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -1)")
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
[ -s "$VMLINUZ" ] || die "no kernel image in $kdeb"
[ -s "$KDIR/lib/modules/$KVER/modules.dep" ] || "$BUSYBOX" depmod -b "$KDIR" "$KVER"
ok "guest kernel $KVER ($(basename "$kdeb")), busybox ($(basename "$bdeb")), QEMU $(qemu-system-x86_64 --version | awk '{print $4; exit}')"

# --- the guest's initramfs ----------------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/usr/{bin,sbin,lib/x86_64-linux-gnu,lib64} "$R"/{proc,sys,dev,run,tmp,etc,opt/iscsi-tgt}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$R/$d"; done
mkdir -p "$R/var"
ln -s ../run "$R/var/run"

# guest_path PATH: where a host file goes in the guest (merged /usr, as in Debian 12).
guest_path() {
    case $1 in /lib/* | /lib64/* | /bin/* | /sbin/*) echo "/usr$1" ;; *) echo "$1" ;; esac
}
# The PMDs the guest's EAL loads as plugins (it loads every library in its plugin directory):
# what the NICs need, no more.
PLUGINS="bus_pci bus_vdev mempool_ring mempool_stack net_virtio net_e1000"
is_plugin() {
    local p
    for p in $PLUGINS; do
        case ${1##*/} in librte_"$p".so*) return 0 ;; esac
    done
    return 1
}
# add_libs FILE: every library ldd names for FILE (the whole closure), under the name ldd gives.
add_libs() {
    local l dst real
    for l in $(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        dst=$(guest_path "$l")
        [ -e "$R$dst" ] || [ -L "$R$dst" ] && continue
        mkdir -p "$(dirname "$R$dst")"
        real=$(readlink -f "$l")
        if [ "${real#"$PMD_DIR"/}" != "$real" ] && is_plugin "$real"; then
            # A plugin that is also linked by name (librte_bus_pci, by net_virtio): one file,
            # in the plugin directory, with the name a link to it as on the host. A second copy
            # would be loaded twice (once linked, once as a plugin) and EAL panics on that.
            mkdir -p "$R$PMD_DIR"
            [ -e "$R$real" ] || cp "$real" "$R$real"
            ln -s "$real" "$R$dst"
        else
            cp -L "$l" "$R$dst"
        fi
    done
}
# add FILE...: each file at its path in the guest, with its libraries.
add() {
    local f dst
    for f in "$@"; do
        dst=$(guest_path "$f")
        [ -e "$R$dst" ] && continue
        mkdir -p "$(dirname "$R$dst")"
        cp -L "$f" "$R$dst"
        case $f in *.py) ;; *) add_libs "$f" ;; esac
    done
}

cp "$BUSYBOX" "$R/usr/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ -e "$R/usr/bin/$a" ] || ln -s busybox "$R/usr/bin/$a"
done
add /usr/bin/bash /usr/bin/dpdk-testpmd
[ "$MODE" = initiator ] && add "$(command -v iscsid)" "$(command -v iscsiadm)" "$(command -v sg_persist)"
# Only the PMDs the NICs need: EAL loads every library in its plugin directory.
for p in $PLUGINS; do
    for l in "$PMD_DIR"/librte_"$p".so.23*; do
        mkdir -p "$R$PMD_DIR"
        cp -a "$l" "$R$PMD_DIR/"
        [ -L "$l" ] || add_libs "$l"
    done
done
# Python for rpc/rpc.py: the interpreter and the modules the script loads (run here to see).
add /usr/bin/python3.11
ln -s python3.11 "$R/usr/bin/python3"
pymods=$(/usr/bin/python3.11 -S -c '
import runpy, sys
rpc = sys.argv[1]
sys.argv = [rpc, "-s", "/nonexistent", "get", "x"]
try:
    runpy.run_path(rpc, run_name="__main__")
except SystemExit:
    pass
print("\n".join(sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())} - {""})))
' "$ROOT/rpc/rpc.py" 2>/dev/null)
[ -n "$pymods" ] || die "could not list the Python modules rpc.py loads"
# shellcheck disable=SC2086
add $pymods /usr/lib/python3.11/os.py
# The kernel modules and a modules.dep for the guest's modprobe.
KMOD=/usr/lib/modules/$KVER
mkdir -p "$R$KMOD"
for m in $MODULES; do
    ko=$(awk -v m="/${m}.ko:" 'index($1, m) {print; exit}' "$KDIR/lib/modules/$KVER/modules.dep")
    [ -n "$ko" ] || die "the guest kernel has no module $m"
    for k in $ko; do
        k=${k%:}
        mkdir -p "$(dirname "$R$KMOD/$k")"
        cp "$KDIR/lib/modules/$KVER/$k" "$R$KMOD/$k"
    done
done
cp "$KDIR/lib/modules/$KVER"/modules.{order,builtin} "$R$KMOD/"
"$BUSYBOX" depmod -b "$R" "$KVER"
# The project's side: scripts, the RPC client and the target binary (if built).
mkdir -p "$R/opt/iscsi-tgt/scripts" "$R/opt/iscsi-tgt/rpc" "$R/opt/iscsi-tgt/target/release"
cp "$ROOT/scripts/setup.sh" "$ROOT/scripts/lib.sh" "$ROOT/scripts/vm-guest.sh" "$R/opt/iscsi-tgt/scripts/"
cp "$ROOT/rpc/rpc.py" "$R/opt/iscsi-tgt/rpc/"
if [ "$MODE" != testpmd ] && [ ! -x "$BIN" ] && [ -z "${ISCSI_TGT_BIN:-}" ]; then
    build_release
fi
if [ "$MODE" = target ] && [ -x "$BIN" ] && ! "$BIN" --help 2>&1 | grep -q dpdk; then
    echo "vm-test: warning: $BIN --help does not mention dpdk: a build without --features dpdk will not start on the NIC" >&2
fi
if [ -x "$BIN" ]; then
    cp "$BIN" "$R/opt/iscsi-tgt/target/release/iscsi-tgt"
    add_libs "$BIN"
    tgt_note="target binary $BIN"
else
    [ "$MODE" = testpmd ] || die "no target binary at $BIN"
    tgt_note="no target binary (not needed for MODE=testpmd)"
fi
cat >"$R/etc/vm-test.conf" <<EOF
MODE=$MODE
NIC_ADDR=$NIC_ADDR
NVME_ADDR=$NVME_ADDR
NVME_SERIAL=vmtest
NVME_K_ADDR=$NVME_K_ADDR
NVME_K_SERIAL=vmtest-k
NIC_KDRV=$NIC_KDRV
NIC_PMD=$NIC_PMD
GUEST_IP=$GUEST_IP
GATEWAY=$GATEWAY
IQN=$IQN
RAM_MB=$((ROUNDTRIP_MB > 64 ? ROUNDTRIP_MB : 64))
HUGEMEM=$VM_HUGEMEM
HOST_TIMEOUT=$HOST_TIMEOUT
TARGET_ARGS=$(printf %q "$TARGET_ARGS")
EOF
cat >"$R/init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
bash /opt/iscsi-tgt/scripts/vm-guest.sh
echo "VMTEST guest script exited with status $?"
poweroff -f
EOF
chmod +x "$R/init"
(cd "$R" && find . | "$BUSYBOX" cpio -o -H newc >"$WORK/initrd.cpio" 2>/dev/null)
ok "guest initramfs: $(du -sh "$WORK/initrd.cpio" | cut -f1), $tgt_note"

# --- boot ---------------------------------------------------------------------------------------
/usr/bin/python3.11 -c "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $PORT))" 2>/dev/null ||
    die "host port $PORT is taken: choose another with PORT="
# The NVMe controller's namespace: for MODE=nvme a sparse file that keeps what is written (and
# whose holes read as zeros, so that a discard is seen), else a null device.
if [ "$MODE" = nvme ]; then
    truncate -s $(((ROUNDTRIP_MB + 16) * 1024 * 1024)) "$WORK/nvme.img"
    truncate -s $(((ROUNDTRIP_MB + 16) * 1024 * 1024)) "$WORK/nvme-k.img"
    NVME_DRIVE=(-blockdev "driver=file,filename=$WORK/nvme.img,node-name=nv0,discard=unmap"
        -blockdev "driver=file,filename=$WORK/nvme-k.img,node-name=nv1,discard=unmap"
        -device "nvme,drive=nv1,serial=vmtest-k,bus=pcie.0,addr=05.0")
else
    NVME_DRIVE=(-blockdev "driver=null-co,node-name=nv0,size=67108864")
fi
# The userspace NVMe driver maps memory at I/O virtual address = process address, which takes
# 47 bits: the emulated IOMMU's default 39-bit address width would refuse it.
IOMMU_OPTS=
[ "$MODE" = nvme ] && IOMMU_OPTS=,aw-bits=48
# The IOMMU comes first: the devices behind it must see it when they are created.
qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp "$VM_CPUS" -m "$VM_MEM" \
    -device "intel-iommu,intremap=on$IOMMU_OPTS" \
    -nodefaults -display none -no-reboot \
    -kernel "$VMLINUZ" -initrd "$WORK/initrd.cpio" \
    -append "console=ttyS0 intel_iommu=on iommu=pt quiet loglevel=4 panic=-1" \
    -chardev "file,id=con,path=$WORK/console.log" -serial chardev:con \
    -chardev "socket,id=ctl,path=$WORK/ctl.sock,server=on,wait=off" -serial chardev:ctl \
    -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-$GUEST_IP:3260" \
    -device "$NIC_DEV,netdev=n0,bus=pcie.0,addr=03.0,romfile=" \
    "${NVME_DRIVE[@]}" \
    -device nvme,drive=nv0,serial=vmtest,bus=pcie.0,addr=04.0 \
    >"$WORK/qemu.log" 2>&1 &
QEMU_PID=$!

shown=0
# Prints the guest's PASS/FAIL lines not shown yet, and counts them.
guest_results() {
    local l
    while IFS= read -r l; do
        case $l in
            "VMTEST PASS: "*) npass=$((npass + 1)); echo "PASS: (guest) ${l#VMTEST PASS: }" ;;
            "VMTEST FAIL: "*) nfail=$((nfail + 1)); echo "FAIL: (guest) ${l#VMTEST FAIL: }" ;;
        esac
    done < <(tr -d '\r' <"$WORK/console.log" 2>/dev/null | grep -a "^VMTEST \(PASS\|FAIL\): " | tail -n +$((shown + 1)))
    shown=$(tr -d '\r' <"$WORK/console.log" 2>/dev/null | grep -ac "^VMTEST \(PASS\|FAIL\): ")
}
# wait_for PATTERN SECONDS: until the console shows PATTERN; 1 on timeout, 2 if QEMU exits.
wait_for() {
    local end=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$end" ]; do
        grep -aq "$1" "$WORK/console.log" 2>/dev/null && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || { grep -aq "$1" "$WORK/console.log" 2>/dev/null && return 0; return 2; }
        sleep 0.5
    done
    return 1
}
console_tail() { echo "--- console (last 40 lines)"; tr -d '\r' <"$WORK/console.log" | tail -40; echo "---"; }
tell_guest() {
    /usr/bin/python3.11 - "$WORK/ctl.sock" "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
s.close()
EOF
}

# nvme_lun_checks LUN WHAT TESTS BS: UNMAP read back as zeros, libiscsi's TESTS and
# iscsi-bench --verify at QD32 in commands of BS bytes on LUN.
nvme_lun_checks() {
    local lun=$1 what=$2 tests=$3 bs=$4 out t score
    # 1 MiB at 1 MiB held random data from the round trip: after UNMAP (qemu's iscsi
    # driver sends it for a discard where the LUN says it may) it must read as zeros.
    if out=$(timeout 300 qemu-io -f raw -c "discard 1M 1M" -c "read -P 0 1M 1M" "$URL/$IQN/$lun" 2>&1) &&
        ! grep -qi "pattern verification failed\|error\|fail" <<<"$out"; then
        ok "UNMAP of 1 MiB (qemu-io discard) reads back as zeros from $what"
    else
        bad "UNMAP then read of zeros on $what: $out"
    fi
    echo "$out"
    # Zeros written over 1 MiB of the round trip's random data (qemu's iscsi driver sends WRITE
    # SAME of a zero block, which the LUN turns into NVMe WRITE ZEROES) read back as zeros.
    if out=$(timeout 300 qemu-io -f raw -c "write -z 3M 1M" -c "read -P 0 3M 1M" -c "read -P 0 1M 1M" "$URL/$IQN/$lun" 2>&1) &&
        ! grep -qi "pattern verification failed\|error\|fail" <<<"$out"; then
        ok "1 MiB of zeros written (WRITE SAME) reads back as zeros from $what"
    else
        bad "zeros written then read on $what: $out"
    fi
    # libiscsi's suites for the commands the NVMe flavours carry (reads, writes, FUA,
    # flush, UNMAP, WRITE SAME, COMPARE AND WRITE), scored by cu-score.py: no failed
    # test, and no warned one but iSCSIdatasn.iSCSIDataSnInvalid, which warns by
    # construction (see conformance.sh). (The whole suite runs natively in conformance.sh;
    # under TCG a test takes about five seconds.)
    t=$(date +%s)
    timeout 2400 iscsi-test-cu -d -S -t "$tests" "$URL/$IQN/$lun" "$URL/$IQN/$lun" >"$WORK/cu$lun.log" 2>&1 || true
    local bad_tests
    bad_tests=$(python3 "$ROOT/scripts/cu-score.py" "$WORK/cu$lun.log" --tests 2>/dev/null |
        awk '$1 == "failed" || ($1 == "warned" && $2 != "iSCSIdatasn.iSCSIDataSnInvalid")')
    if score=$(python3 "$ROOT/scripts/cu-score.py" "$WORK/cu$lun.log") && [ -z "$bad_tests" ]; then
        ok "iscsi-test-cu on $what ($tests): $score ($(($(date +%s) - t)) s)"
    else
        bad "iscsi-test-cu on $what: ${score:-the log is incomplete}: $(python3 "$ROOT/scripts/cu-score.py" "$WORK/cu$lun.log" --tests 2>/dev/null | grep -v '^passed' | head -5 | tr '\n' ' ')"
    fi
    # The project's own initiator at queue depth 32 writes a pattern over the whole
    # namespace and reads it back, while the guest resets the controller under it twice (the
    # device's reset attribute, "rN" to the guest): the session survives and nothing is lost.
    t=$(date +%s)
    timeout 600 "$(dirname "$BIN")/iscsi-bench" --portal "127.0.0.1:$PORT" --target "$IQN" \
        --lun "$lun" --verify --qd 32 --bs "$bs" >"$WORK/bench$lun.log" 2>&1 &
    local bench=$! at
    for at in 5 25; do
        while [ $(($(date +%s) - t)) -lt $at ] && kill -0 $bench 2>/dev/null; do sleep 0.2; done
        kill -0 $bench 2>/dev/null && tell_guest "r$lun"
    done
    if wait $bench; then
        ok "iscsi-bench --verify at QD32 in $bs-byte commands over the whole of $what, with controller resets under it ($(($(date +%s) - t)) s)"
    else
        bad "iscsi-bench --verify at QD32 on $what with controller resets: $(tail -c 400 "$WORK/bench$lun.log")"
    fi
}
# cpu_ticks TAG: the target's CPU time in ticks, asked of the guest ("ticks hz"); TAG is "c"
# and one or two characters (vm-guest.sh's wait_host).
cpu_ticks() {
    tell_guest "$1" || return 1
    wait_for "VMTEST cpu $1 " 30 || return 1
    tr -d '\r' <"$WORK/console.log" | grep -a "^VMTEST cpu $1 " | tail -1 | awk '{print $4, $5, $6}'
}
# nvme_bench LUN WHAT: NVME_BENCH_SECS of 4 KiB random reads at QD32 on LUN, with the target's
# CPU time over the run: commands/s and CPU microseconds per command.
nvme_bench() {
    local lun=$1 what=$2 a b out iops t0a t0b hz ba bb
    a=$(cpu_ticks "c${lun}s") || { bad "no CPU time from the guest"; return; }
    out=$(timeout $((NVME_BENCH_SECS + 120)) "$(dirname "$BIN")/iscsi-bench" --portal "127.0.0.1:$PORT" --target "$IQN" \
        --lun "$lun" --rw randread --bs 4k --qd 32 --secs "$NVME_BENCH_SECS" 2>&1)
    b=$(cpu_ticks "c${lun}e") || { bad "no CPU time from the guest"; return; }
    iops=$(awk '/^iops / {print $2}' <<<"$out" | tail -1)
    if [ -n "$iops" ]; then
        read -r t0a hz ba <<<"$a"
        read -r t0b _ bb <<<"$b"
        ok "$(python3 -c "import sys; i=float(sys.argv[1]); c=(int(sys.argv[3])-int(sys.argv[2]))/int(sys.argv[4]); s=float(sys.argv[5]); busy=(int(sys.argv[7])-int(sys.argv[6]))/1e9; print(f'bench LUN $lun ($what), 4 KiB random reads QD32 for {s:.0f} s: {i:.0f} commands/s, target CPU {c:.2f} s ({c*1e6/(i*s):.1f} us per command), reactors busy {busy:.2f} s ({busy*1e6/(i*s):.1f} us per command)')" "$iops" "$t0a" "$t0b" "$hz" "$NVME_BENCH_SECS" "${ba:-0}" "${bb:-0}")"
    else
        bad "iscsi-bench on LUN $lun: $(tail -c 400 <<<"$out")"
    fi
}

t0=$(date +%s)
set +e
wait_for "VMTEST READY" "$UP_TIMEOUT"
up=$?
guest_results
if [ $up -ne 0 ]; then
    if [ $up -eq 1 ]; then
        bad "the guest did not come up on the NIC within $UP_TIMEOUT s"
    else
        bad "QEMU exited before the guest came up"
    fi
else
    URL=iscsi://127.0.0.1:$PORT
    ready=$MODE
    if grep -aq "VMTEST READY ok" "$WORK/console.log"; then
        ok "guest up in $(($(date +%s) - t0)) s (boot, modules, setup.sh, $MODE on the NIC)"
    else
        bad "the guest's side did not come up (above): no initiator checks"
        ready=none
    fi
    case $ready in
    testpmd)
        # Each connection to the forwarded port makes the user network ARP for the guest.
        n=0
        for _ in 1 2 3; do
            /usr/bin/python3.11 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), timeout=3).close()" 2>/dev/null && n=$((n + 1))
            sleep 1
        done
        if [ $n -gt 0 ]; then
            ok "$n connections to 127.0.0.1:$PORT made the user network look for the guest"
        else
            bad "could not connect to the forwarded port 127.0.0.1:$PORT"
        fi
        ;;
    target | kernel | initiator | nvme)
        # iscsi-ls without -s: with -s it would log in to the portal the target advertises, the
        # guest's address, which only the forwarded port reaches.
        out=$(timeout 60 iscsi-ls "$URL" 2>&1)
        if echo "$out" | grep -q "Target:$IQN"; then
            ok "iscsi-ls through 127.0.0.1:$PORT lists $IQN"
        else
            bad "iscsi-ls through 127.0.0.1:$PORT: $out"
        fi
        if out=$(timeout 60 iscsi-inq "$URL/$IQN/0" 2>&1); then
            ok "iscsi-inq answers through the forwarded port"
        else
            bad "iscsi-inq: $out"
        fi
        head -c $((ROUNDTRIP_MB * 1024 * 1024)) /dev/urandom >"$WORK/in.raw"
        t=$(date +%s)
        if timeout 600 qemu-img convert -n -f raw -O raw "$WORK/in.raw" "$URL/$IQN/0" >"$WORK/qi.log" 2>&1 &&
            timeout 600 qemu-img convert -f raw -O raw "$URL/$IQN/0" "$WORK/out.raw" >>"$WORK/qi.log" 2>&1 &&
            cmp -n $((ROUNDTRIP_MB * 1024 * 1024)) "$WORK/in.raw" "$WORK/out.raw"; then
            ok "$ROUNDTRIP_MB MiB written and read back identical with qemu-img ($(($(date +%s) - t)) s)"
        else
            bad "qemu-img round trip of $ROUNDTRIP_MB MiB: $(tail -3 "$WORK/qi.log")"
        fi
        if [ "$MODE" = nvme ]; then
            nvme_lun_checks 0 "the NVMe LUN" "$NVME_CU_TESTS" 65536
            # LUN 1: the second controller through the guest kernel's driver (passthrough).
            t1=$(date +%s)
            if out=$(timeout 60 iscsi-inq "$URL/$IQN/1" 2>&1); then
                ok "iscsi-inq answers on the passthrough LUN 1"
            else
                bad "iscsi-inq on LUN 1: $out"
            fi
            t=$(date +%s)
            if timeout 600 qemu-img convert -n -f raw -O raw "$WORK/in.raw" "$URL/$IQN/1" >"$WORK/qi1.log" 2>&1 &&
                timeout 600 qemu-img convert -f raw -O raw "$URL/$IQN/1" "$WORK/out1.raw" >>"$WORK/qi1.log" 2>&1 &&
                cmp -n $((ROUNDTRIP_MB * 1024 * 1024)) "$WORK/in.raw" "$WORK/out1.raw"; then
                ok "$ROUNDTRIP_MB MiB written to the passthrough LUN 1 and read back identical with qemu-img ($(($(date +%s) - t)) s)"
            else
                bad "qemu-img round trip of $ROUNDTRIP_MB MiB on LUN 1: $(tail -3 "$WORK/qi1.log")"
            fi
            # 1 MiB commands: buffers of eight 128 KiB chunks (NVME_URING_CMD_IO_VEC), split
            # by the kernel's max_hw_sectors_kb.
            nvme_lun_checks 1 "the passthrough LUN 1" "$NVME_PT_CU_TESTS" 1048576
            ok "the passthrough LUN's checks took $(($(date +%s) - t1)) s"
            if [ "$NVME_BENCH_SECS" -gt 0 ]; then
                nvme_bench 0 "userspace driver"
                nvme_bench 1 "kernel passthrough"
            fi
        fi
        ;;
    esac
    tell_guest "done" || bad "could not reach the guest's control port"
    wait_for "VMTEST END" "$UP_TIMEOUT"
    fin=$?
    guest_results
    [ $fin -eq 0 ] || bad "the guest did not finish its steps"
fi
# The guest powers off by itself.
for _ in $(seq 1 300); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$QEMU_PID" 2>/dev/null; then
    bad "the guest did not power off within 60 s"
else
    wait "$QEMU_PID"
    qrc=$?
    if [ $qrc -eq 0 ]; then
        ok "the guest powered off"
    else
        bad "QEMU exited with status $qrc: $(tail -3 "$WORK/qemu.log")"
    fi
    QEMU_PID=
fi
grep -aq "Kernel panic\|Call Trace" "$WORK/console.log" && bad "the guest kernel reported a panic or oops"
if [ "$nfail" -gt 0 ]; then
    console_tail
    echo "vm-test: the whole console log: $CACHE/last-console.log"
fi
echo "vm-test: MODE=$MODE NIC=$NIC took $(($(date +%s) - START)) s"
echo "$npass passed, $nfail failed"
[ "$nfail" -eq 0 ]

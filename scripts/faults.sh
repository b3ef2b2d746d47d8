#!/usr/bin/env bash
# Backing-store faults that need root: a 16 MiB tmpfs that fills up under a thin and a fully
# provisioned vdisk_fileio LUN (tests/faults.rs, run with --ignored). Fails loudly when the
# file system cannot be mounted.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (it mounts a tmpfs)"
MNT=$(mktemp -d /tmp/iscsi-tgt-faults.XXXXXX)
mount -t tmpfs -o size=16m,mode=0700 tmpfs "$MNT" || die "cannot mount a tmpfs at $MNT"
trap 'umount "$MNT" 2>/dev/null; rmdir "$MNT"' EXIT

cd "$ROOT"
FAULTS_TMPFS=$MNT cargo test --quiet --test faults -- --ignored --test-threads=1
echo "faults.sh: passed"

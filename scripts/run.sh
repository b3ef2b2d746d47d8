#!/usr/bin/env bash
# Builds the target and runs it in the foreground on 127.0.0.1:3260 with the embedded default
# configuration below: one target with a RAM LUN 0, a null LUN 1 and a file-backed LUN 2 (a
# sparse 1 GiB file, kept between runs). Ctrl-C stops it.
#   PORTAL=0.0.0.0:3260 RPC_SOCKET=/var/tmp/iscsi-tgt.sock scripts/run.sh [daemon flags...]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PORTAL=${PORTAL:-127.0.0.1:3260}
SOCK=${RPC_SOCKET:-/var/tmp/iscsi-tgt.sock}
IQN=iqn.2026-11.org.iscsi-tgt:default

if [ "$(id -u)" -eq 0 ]; then
    "$ROOT/scripts/setup.sh"
else
    echo "run.sh: not root: skipping package and hugepage setup" >&2
fi
build_release

DATA_FILE=${DATA_FILE:-/var/tmp/iscsi-tgt-default.img}
[ -e "$DATA_FILE" ] || truncate -s 1G "$DATA_FILE"
CONFIG=$(mktemp /tmp/iscsi-tgt-default.XXXXXX.json)
trap 'rm -f "$CONFIG"' EXIT
cat > "$CONFIG" <<JSON
{
  "handlers": {
    "vdisk_ramio": { "ram0": { "size_mb": "512" } },
    "vdisk_nullio": { "null0": { "size_mb": "1024" } },
    "vdisk_fileio": { "file0": { "filename": "$DATA_FILE" } }
  },
  "targets": {
    "iscsi": {
      "enabled": "1",
      "targets": {
        "$IQN": {
          "enabled": "1",
          "luns": { "0": { "device": "ram0" }, "1": { "device": "null0" }, "2": { "device": "file0" } }
        }
      }
    }
  }
}
JSON
echo "run.sh: starting iscsi-tgt on $PORTAL (RPC socket $SOCK), target $IQN"
"$BIN" --listen "$PORTAL" --rpc-socket "$SOCK" --config "$CONFIG" "$@"

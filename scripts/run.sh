#!/usr/bin/env bash
# Builds the target and runs it in the foreground on 127.0.0.1:3260 with the embedded default
# configuration below: one target with a RAM LUN 0 and a null LUN 1. Ctrl-C stops it.
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

CONFIG=$(mktemp /tmp/iscsi-tgt-default.XXXXXX.json)
trap 'rm -f "$CONFIG"' EXIT
cat > "$CONFIG" <<JSON
{
  "handlers": {
    "vdisk_ramio": { "ram0": { "size_mb": "512" } },
    "vdisk_nullio": { "null0": { "size_mb": "1024" } }
  },
  "targets": {
    "iscsi": {
      "enabled": "1",
      "targets": {
        "$IQN": {
          "enabled": "1",
          "luns": { "0": { "device": "ram0" }, "1": { "device": "null0" } }
        }
      }
    }
  }
}
JSON
echo "run.sh: starting iscsi-tgt on $PORTAL (RPC socket $SOCK), target $IQN"
"$BIN" --listen "$PORTAL" --rpc-socket "$SOCK" --config "$CONFIG" "$@"

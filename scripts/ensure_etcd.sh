#!/usr/bin/env bash
# Makes sure an etcd binary is there: $ETCD_BIN, else `etcd` on PATH, else Debian's etcd-server.
set -euo pipefail
if [ -n "${ETCD_BIN:-}" ]; then
  [ -x "$ETCD_BIN" ] || { echo "ETCD_BIN=$ETCD_BIN is not executable" >&2; exit 1; }
  exit 0
fi
command -v etcd >/dev/null 2>&1 && exit 0
echo "etcd not found: installing Debian's etcd-server" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq etcd-server >/dev/null
command -v etcd >/dev/null 2>&1 || { echo "etcd still missing after install" >&2; exit 1; }

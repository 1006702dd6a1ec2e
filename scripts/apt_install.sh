#!/usr/bin/env bash
# apt_install.sh WHAT PACKAGE...: installs Debian packages a test suite runs for real, without
# recommends and without starting a service (policy-rc.d 101: the tests run their own on
# 127.0.0.1). Where it cannot (no root, no sudo, no apt-get) it says so, WHAT's tests will skip
# with the same message, and it exits 0 so setup goes on.
set -euo pipefail
what=$1
shift
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo"
  else
    echo "$* not installed and no root to install it: $what will skip" >&2
    exit 0
  fi
fi
command -v apt-get >/dev/null 2>&1 || { echo "$* not installed and no apt-get: $what will skip" >&2; exit 0; }
echo "installing Debian's $* for $what" >&2
export DEBIAN_FRONTEND=noninteractive
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  policy=/usr/sbin/policy-rc.d
fi
trap '[ -z "$policy" ] || $SUDO rm -f "$policy"' EXIT
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null

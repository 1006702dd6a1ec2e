#!/usr/bin/env bash
# Makes sure a Prometheus binary is there for the dashboard test: $PROMETHEUS_BIN, else
# `prometheus` on PATH, else Debian's prometheus. Installed, never started as a service: the
# test runs its own on 127.0.0.1 (policy-rc.d 101 stops the package scripts starting one on
# 0.0.0.0:9090). Where it cannot be installed (no root, no sudo, no apt), it says so and the
# test skips with the same message; setup goes on.
set -euo pipefail
if [ -n "${PROMETHEUS_BIN:-}" ]; then
  [ -x "$PROMETHEUS_BIN" ] || { echo "PROMETHEUS_BIN=$PROMETHEUS_BIN is not executable" >&2; exit 1; }
  exit 0
fi
command -v prometheus >/dev/null 2>&1 && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo"
  else
    echo "prometheus not found and no root to install it: the dashboard test will skip" >&2
    exit 0
  fi
fi
command -v apt-get >/dev/null 2>&1 || {
  echo "prometheus not found and no apt-get: the dashboard test will skip" >&2
  exit 0
}
echo "prometheus not found: installing Debian's prometheus" >&2
export DEBIAN_FRONTEND=noninteractive
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  policy=/usr/sbin/policy-rc.d
fi
trap '[ -z "$policy" ] || $SUDO rm -f "$policy"' EXIT
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null 2>&1 || { echo "prometheus still missing after install" >&2; exit 1; }

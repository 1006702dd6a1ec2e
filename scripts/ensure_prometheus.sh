#!/usr/bin/env bash
# Makes sure a Prometheus binary is there for the dashboard test: $PROMETHEUS_BIN, else
# `prometheus` on PATH, else Debian's prometheus (installed, never started as a service).
set -euo pipefail
if [ -n "${PROMETHEUS_BIN:-}" ]; then
  [ -x "$PROMETHEUS_BIN" ] || { echo "PROMETHEUS_BIN=$PROMETHEUS_BIN is not executable" >&2; exit 1; }
  exit 0
fi
command -v prometheus >/dev/null 2>&1 && exit 0
"$(dirname "$0")/apt_install.sh" "the dashboard test (test_prometheus_dashboard)" prometheus

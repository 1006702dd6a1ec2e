#!/usr/bin/env bash
# Makes sure Chromium and its driver are there for the console's browser tests: $CHROMIUM_BIN
# and $CHROMEDRIVER_BIN, else `chromium` and `chromedriver` on PATH, else Debian's chromium and
# chromium-driver (no browser download).
set -euo pipefail
[ -n "${CHROMIUM_BIN:-}" ] && [ -n "${CHROMEDRIVER_BIN:-}" ] && exit 0
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && exit 0
"$(dirname "$0")/apt_install.sh" "the console's browser tests (test_console)" chromium chromium-driver

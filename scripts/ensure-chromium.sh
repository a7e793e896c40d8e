#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser tests (tests/test_ui_browser.py).
# Idempotent: does nothing when /usr/bin/chromium exists. Playwright drives this
# browser; `playwright install` (which downloads its own build) is never used.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: $CHROMIUM is missing and apt-get is not available: install Chromium as $CHROMIUM" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "error: $CHROMIUM is missing; run as root: apt-get install -y chromium" >&2
    exit 1
  fi
fi
echo "installing Debian's chromium for the browser tests"
export DEBIAN_FRONTEND=noninteractive
# A stale package list cannot find the current version; refresh it once first.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
"$CHROMIUM" --version

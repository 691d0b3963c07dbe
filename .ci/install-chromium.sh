#!/usr/bin/env bash
# Installs Debian's chromium (/usr/bin/chromium) for the headless-browser tests
# (tests/browser.py), only when it is missing. Never fails the CI run: without
# apt (or without root/sudo) it prints a warning and the browser tests skip.
# Playwright's own browser download (`playwright install`) is not used.
set -uo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  echo "install-chromium: $CHROMIUM present ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
  exit 0
fi

warn() {
  echo "install-chromium: WARNING: $*; the browser tests will be skipped" >&2
  exit 0
}

command -v apt-get >/dev/null 2>&1 || warn "apt-get not found, cannot install chromium"

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  warn "not root and no password-less sudo, cannot install chromium"
fi

echo "install-chromium: $CHROMIUM absent; installing Debian's chromium with apt-get"
started=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q >/dev/null || echo "install-chromium: apt-get update failed; trying the install anyway" >&2
if ! "${as_root[@]}" apt-get install -y -q --no-install-recommends chromium >/tmp/install-chromium.log 2>&1; then
  tail -n 20 /tmp/install-chromium.log >&2
  warn "apt-get install chromium failed (log: /tmp/install-chromium.log)"
fi
if [ -x "$CHROMIUM" ]; then
  echo "install-chromium: installed $("$CHROMIUM" --version 2>/dev/null) in $(( $(date +%s) - started ))s"
else
  warn "apt-get finished but $CHROMIUM is still missing"
fi
exit 0

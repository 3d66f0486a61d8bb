#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed, for the dashboard's real-browser test, and prints
# the path of its executable.
#
# Idempotent: a no-op when a chromium executable is found; otherwise, as root on Debian, it
# installs the `chromium` package with apt-get. The test drives it with playwright-core, which
# never downloads a browser of its own, so this package is the only browser the test uses.
#
# Usage: export STEVEDORE_CHROMIUM="$(scripts/ensure-browser.sh)"
set -euo pipefail

log() { printf 'ensure-browser: %s\n' "$*" >&2; }
fail() { printf 'ensure-browser: ERROR: %s\n' "$*" >&2; exit 1; }

find_chromium() {
    local candidate
    for candidate in chromium chromium-browser; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
}

chromium="$(find_chromium)"
if [ -z "$chromium" ]; then
    [ "$(id -u)" -eq 0 ] || fail "Chromium is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || fail "Chromium is not installed and apt-get is missing"
    log "installing chromium"
    apt-get update -qq
    # fonts-liberation gives pages a real font, so screenshots show readable text.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-liberation >/dev/null
    chromium="$(find_chromium)"
    [ -n "$chromium" ] || fail "chromium was installed but no chromium executable was found"
fi
printf '%s\n' "$chromium"

#!/usr/bin/env bash
# Builds (or reuses) every stack's local image without any container registry, with the given
# stevedore binary: `stevedore/busybox:local` from the host's static busybox, and a Debian
# base image bootstrapped from Debian's archive with every language stack on it, built from
# Debian's packages. Installs mmdebstrap when neither it nor debootstrap is there.
#
# Idempotent: an image whose tag exists and whose recipe (recorded as an image label) is
# unchanged is reused, so a repeated run takes seconds. A cold build of every stack takes a
# few minutes and needs Debian's archive (deb.debian.org) to be reachable.
#
# Usage: scripts/ensure-stacks.sh path/to/stevedore [STACK...]
set -euo pipefail

log() { printf 'ensure-stacks: %s\n' "$*" >&2; }
fail() { printf 'ensure-stacks: ERROR: %s\n' "$*" >&2; exit 1; }

binary="${1:?usage: scripts/ensure-stacks.sh path/to/stevedore [STACK...]}"
shift
[ -x "$binary" ] || fail "$binary is not an executable stevedore binary"

if ! command -v mmdebstrap >/dev/null 2>&1 && ! command -v debootstrap >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || fail "mmdebstrap is missing and installing it needs root"
    log "installing mmdebstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null \
        || fail "apt-get install mmdebstrap failed"
fi

log "building or reusing the local stack images"
"$binary" stack build-local "$@" >/dev/null

#!/usr/bin/env bash
# Makes sure Debian's container registry (`docker-registry`), `htpasswd` (apache2-utils) and
# `openssl` are installed, for the tests that run private images against a real registry on
# loopback. The tests start the registry themselves, with a configuration of their own (over
# HTTPS with a throwaway authority that `openssl` makes, or plain HTTP); nothing is started
# here. Prints the registry binary's path, then htpasswd's, one per line.
#
# Idempotent; installs with apt-get (as root) only what is missing.
set -euo pipefail

log() { printf 'ensure-registry: %s\n' "$*" >&2; }
fail() { printf 'ensure-registry: ERROR: %s\n' "$*" >&2; exit 1; }

missing=()
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
# The HTTPS registry test makes its throwaway certificate authority with it.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || fail "${missing[*]} missing, and installing needs root"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
fi
command -v docker-registry
command -v htpasswd

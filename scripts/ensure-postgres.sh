#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries are installed, for the PostgreSQL store's tests and
# benchmark, and prints the directory that holds them.
#
# Idempotent: a no-op when /usr/lib/postgresql/*/bin/initdb exists; otherwise, as root on
# Debian, it installs the `postgresql` package with apt-get. It starts no cluster: the tests
# start (and stop) a throwaway one of their own as the `postgres` user, which the package
# creates.
#
# Usage: export STEVEDORE_PG_BIN="$(scripts/ensure-postgres.sh)"
set -euo pipefail

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }
fail() { printf 'ensure-postgres: ERROR: %s\n' "$*" >&2; exit 1; }

find_bin() {
    local initdb
    initdb="$(ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$initdb" ]; then
        dirname "$initdb"
    fi
}

bin="$(find_bin)"
if [ -z "$bin" ]; then
    [ "$(id -u)" -eq 0 ] || fail "PostgreSQL is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || fail "PostgreSQL is not installed and apt-get is missing"
    log "installing postgresql"
    # Binaries only: no "main" cluster is created, and none is started while installing
    # (policy-rc.d refuses service starts for as long as the install runs).
    mkdir -p /etc/postgresql-common
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        printf 'create_main_cluster = false\n' >/etc/postgresql-common/createcluster.conf
    fi
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        -o Dpkg::Options::=--force-confold postgresql >/dev/null
    if [ -n "$policy_added" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    bin="$(find_bin)"
    [ -n "$bin" ] || fail "postgresql was installed but no initdb was found"
fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    log "creating the postgres system user"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
printf '%s\n' "$bin"

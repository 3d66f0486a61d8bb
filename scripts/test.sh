#!/usr/bin/env bash
# Runs every stevedore test: unit, API, store (SQLite and PostgreSQL), the real binary, the real
# Docker engine and the official IronWorker Python and Node clients. Installs and starts
# whatever a fresh machine lacks first.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  if [ -z "${apt_updated:-}" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The Docker engine and the static busybox the local test image is built from.
if [ -x scripts/ensure-docker.sh ]; then
  scripts/ensure-docker.sh
fi

# PostgreSQL's binaries, for the PostgreSQL store's tests, benchmark and `serve --database`
# tests. No server is started here: the tests start a throwaway cluster of their own.
STEVEDORE_PG_BIN="$(scripts/ensure-postgres.sh)"
export STEVEDORE_PG_BIN

# The official IronWorker Python client, in a virtual environment of its own.
if ! command -v python3 >/dev/null 2>&1; then
  log "installing python3"
  apt_install python3 python3-venv python3-pip
fi
if ! .venv/bin/python -c 'import iron_worker, pytest' >/dev/null 2>&1; then
  log "installing the IronWorker Python client into .venv"
  rm -rf .venv
  python3 -m venv .venv 2>/dev/null || { apt_install python3-venv && python3 -m venv .venv; }
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/compat/requirements.txt
fi
export STEVEDORE_PYTHON="$PWD/.venv/bin/python"

# The official IronWorker Node client, exactly as tests/compat/node/package-lock.json pins it.
# `npm ci` runs only when the installed tree is missing or was made from another lock file;
# --prefer-offline takes packages from npm's cache when it has them.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing Node.js"
  apt_install nodejs npm
fi
node_compat="$PWD/tests/compat/node"
if ! cmp -s "$node_compat/package-lock.json" "$node_compat/node_modules/.stevedore-installed-lock"; then
  log "installing the IronWorker Node client into tests/compat/node"
  (cd "$node_compat" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
  cp "$node_compat/package-lock.json" "$node_compat/node_modules/.stevedore-installed-lock"
fi
export STEVEDORE_NODE_COMPAT="$node_compat"

# Tests marked #[ignore] kill the Docker daemon every other test shares, so they run alone,
# after the rest.
log "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
  log "running the tests that restart the Docker daemon, alone"
  cargo nextest run --workspace --no-fail-fast --run-ignored only --test-threads 1 "$@"
else
  cargo test --workspace --no-fail-fast "$@"
  log "running the tests that restart the Docker daemon, alone"
  cargo test --workspace --no-fail-fast "$@" -- --ignored --test-threads 1
fi

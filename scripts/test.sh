#!/usr/bin/env bash
# Runs every stevedore test: unit, API, store (SQLite and PostgreSQL), the real binary, the real
# Docker engine, the official IronWorker Python and Node clients and the dashboard in a headless
# browser. Installs and starts whatever a fresh machine lacks first.
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

# Installs a directory's npm packages exactly as its package-lock.json pins them. `npm ci` runs
# only when the installed tree is missing or was made from another lock file; --prefer-offline
# takes packages from npm's cache when it has them.
npm_ci_when_changed() {
  local dir="$1" what="$2"
  if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.stevedore-installed-lock"; then
    log "installing $what into ${dir#"$PWD"/}"
    (cd "$dir" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
    cp "$dir/package-lock.json" "$dir/node_modules/.stevedore-installed-lock"
  fi
}

# The Docker engine and the static busybox the local test image is built from.
if [ -x scripts/ensure-docker.sh ]; then
  scripts/ensure-docker.sh
fi

# Every stack's local image, built from Debian's archive (or reused), so that workers of every
# language really run in the tests without any container registry. The tests run the stacks
# on them (they set STEVEDORE_STACK_IMAGES=local for the servers they start).
log "building stevedore"
cargo build --locked --bin stevedore
scripts/ensure-stacks.sh target/debug/stevedore

# A JDK, for the Java worker the tests compile into a jar.
if ! command -v javac >/dev/null 2>&1 || ! command -v jar >/dev/null 2>&1; then
  log "installing a JDK"
  apt_install default-jdk-headless
fi

# PostgreSQL's binaries, for the PostgreSQL store's tests, benchmark and `serve --database`
# tests. No server is started here: the tests start a throwaway cluster of their own.
STEVEDORE_PG_BIN="$(scripts/ensure-postgres.sh)"
export STEVEDORE_PG_BIN

# Debian's container registry and htpasswd, for the private-image tests, which start a
# registry of their own on a loopback port.
{ read -r STEVEDORE_DOCKER_REGISTRY; read -r STEVEDORE_HTPASSWD; } < <(scripts/ensure-registry.sh)
export STEVEDORE_DOCKER_REGISTRY STEVEDORE_HTPASSWD

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

# Schemathesis, which fuzzes the API from its OpenAPI document, in a virtual environment of its
# own (its dependencies are not the IronWorker client's).
if ! .venv-fuzz/bin/schemathesis --version 2>/dev/null | grep -q "$(sed -n 's/^schemathesis==//p' tests/fuzz/requirements.txt)"; then
  log "installing Schemathesis into .venv-fuzz"
  rm -rf .venv-fuzz
  python3 -m venv .venv-fuzz
  .venv-fuzz/bin/pip install --quiet --disable-pip-version-check -r tests/fuzz/requirements.txt
fi
export STEVEDORE_SCHEMATHESIS="$PWD/.venv-fuzz/bin/schemathesis"

# The official IronWorker Node client, exactly as tests/compat/node/package-lock.json pins it.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing Node.js"
  apt_install nodejs npm
fi
npm_ci_when_changed "$PWD/tests/compat/node" "the IronWorker Node client"
export STEVEDORE_NODE_COMPAT="$PWD/tests/compat/node"

# The dashboard's browser test: Debian's Chromium, driven by playwright-core as
# tests/dashboard/package-lock.json pins it (playwright-core never downloads a browser).
STEVEDORE_CHROMIUM="$(scripts/ensure-browser.sh)"
export STEVEDORE_CHROMIUM
npm_ci_when_changed "$PWD/tests/dashboard" "playwright-core"
export STEVEDORE_DASHBOARD_TESTS="$PWD/tests/dashboard"

# Tests marked #[ignore] kill the Docker daemon every other test shares, so they run alone,
# after the rest.
# The end-to-end tests run on both engines (nextest's filter expression).
OCI_END_TO_END='test(/^tasks::(a_task_runs_in|after_kill_9|a_failing)/) | test(/^stacks::(real_workers|an_image_code)/) | test(/^(python_client|node_client)::/) | test(/^lease_safety::a_killed/) | test(/^remote::a_remote_runner_runs/)'

log "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
  log "running the tests that restart the Docker daemon, alone"
  cargo nextest run --workspace --no-fail-fast --run-ignored only --test-threads 1 "$@"
  # The end-to-end tests that hold for any engine, again with `serve` and `runner` on the
  # direct OCI runtime (`--engine oci`). One at a time: every OCI server of this host shares
  # the task network's bridge, whose leftovers each start removes.
  log "running the end-to-end tests again on the OCI engine"
  STEVEDORE_TEST_ENGINE=oci cargo nextest run -p stevedore --test cli --no-fail-fast \
    --test-threads 1 -E "$OCI_END_TO_END" "$@"
else
  cargo test --workspace --no-fail-fast "$@"
  log "running the tests that restart the Docker daemon, alone"
  cargo test --workspace --no-fail-fast "$@" -- --ignored --test-threads 1
  log "running the end-to-end tests again on the OCI engine"
  STEVEDORE_TEST_ENGINE=oci cargo test -p stevedore --test cli --no-fail-fast "$@" -- \
    --test-threads 1 tasks:: stacks::real_workers stacks::an_image_code python_client \
    node_client lease_safety::a_killed remote::a_remote
fi

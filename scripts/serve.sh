#!/usr/bin/env bash
# Sets up a fresh machine and runs `stevedore serve` with its embedded defaults: SQLite in
# ./stevedore-data, the API on 127.0.0.1:8080 (override with STEVEDORE_LISTEN), iron.json for
# IronWorker's clients in the data directory, and the embedded runner on the local Docker
# engine. Installs Docker and the static busybox when missing, starts dockerd when it is not
# running, builds stevedore and the offline `stevedore/busybox:local` stack image. Extra
# arguments go to `stevedore serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/ensure-docker.sh ]; then
  scripts/ensure-docker.sh
fi

cargo build --release --locked --bin stevedore
if ! docker image inspect stevedore/busybox:local >/dev/null 2>&1; then
  target/release/stevedore stack build-local
fi
exec target/release/stevedore serve "$@"

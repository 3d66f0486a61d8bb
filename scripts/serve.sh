#!/usr/bin/env bash
# Sets up a fresh machine and runs `stevedore serve` with its embedded defaults: SQLite in
# ./stevedore-data, the API on 127.0.0.1:8080 (override with STEVEDORE_LISTEN), and iron.json
# for IronWorker's clients in the data directory. Extra arguments go to `stevedore serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/ensure-docker.sh ]; then
  scripts/ensure-docker.sh
fi

cargo build --release --locked --bin stevedore
exec target/release/stevedore serve "$@"

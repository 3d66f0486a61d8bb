#!/usr/bin/env bash
# Sets up a fresh machine and runs `stevedore serve` with its embedded defaults: SQLite in
# ./stevedore-data, the API on 127.0.0.1:8080 (override with STEVEDORE_LISTEN), iron.json for
# IronWorker's clients in the data directory, and the embedded runner on the local Docker
# engine. Installs Docker and the static busybox when missing, starts dockerd when it is not
# running, builds stevedore and every stack's local image from Debian's archive (reused when
# built before), and runs the stacks on those images (STEVEDORE_STACK_IMAGES=local; set it to
# `official` to pull the languages' official images instead). Extra arguments go to
# `stevedore serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/ensure-docker.sh ]; then
  scripts/ensure-docker.sh
fi

cargo build --release --locked --bin stevedore
export STEVEDORE_STACK_IMAGES="${STEVEDORE_STACK_IMAGES:-local}"
if [ "$STEVEDORE_STACK_IMAGES" = local ]; then
  scripts/ensure-stacks.sh target/release/stevedore
fi
exec target/release/stevedore serve "$@"

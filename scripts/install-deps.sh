#!/usr/bin/env bash
# Installs what building and testing chainidx needs on a fresh Debian machine: libclang (bindgen for
# RocksDB's bindings) and a C++ compiler. Rust itself (cargo, rustfmt, clippy) is expected to be there.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

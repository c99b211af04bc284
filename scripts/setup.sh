#!/usr/bin/env bash
# Installs what flexmoe needs to build, test and benchmark on Debian 12 / Ubuntu, skipping what is
# already there. Runs apt-get through sudo when not root.
#   scripts/setup.sh          build + tests (compilers, meson, qemu and the aarch64 cross tools)
#   scripts/setup.sh --bench  also the benchmark peers (oneDNN, OpenBLAS, libxsmm, libtorch, SLEEF)
#                             and matplotlib for bench/plot.py
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(build-essential clang libomp-dev meson ninja-build pkg-config libbenchmark-dev
          gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
if [ "${1:-}" = "--bench" ] || [ "${1:-}" = "--all" ]; then packages+=(libdnnl-dev libopenblas-dev libxsmm-dev libtorch-dev python3-torch libsleef-dev python3-matplotlib); fi

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || dpkg -s "$p:$(dpkg --print-architecture)" >/dev/null 2>&1 || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

#!/usr/bin/env bash
# Installs what flexmoe needs to build, test and benchmark on Debian 12 / Ubuntu, skipping what is
# already there. Runs apt-get through sudo when not root.
#   scripts/setup.sh          build + tests (compilers, meson, SLEEF, qemu and the arm64 cross tools)
#   scripts/setup.sh --bench  also the benchmark peers (Google Benchmark, oneDNN)
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(build-essential clang meson ninja-build pkg-config libsleef-dev libbenchmark-dev
          gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user)
if [ "${1:-}" = "--bench" ] || [ "${1:-}" = "--all" ]; then packages+=(libdnnl-dev); fi

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || dpkg -s "$p:$(dpkg --print-architecture)" >/dev/null 2>&1 || missing+=("$p")
done

# SLEEF for arm64, so that the NEON path can be cross-compiled and run under qemu. Debian serves
# every architecture from one mirror; elsewhere (Ubuntu's ports mirror) this is left to the user.
arm64_sleef=1
if ! dpkg -s libsleef-dev:arm64 >/dev/null 2>&1; then
  if grep -qi '^ID=debian' /etc/os-release 2>/dev/null; then
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then $SUDO dpkg --add-architecture arm64; fi
    missing+=(libsleef-dev:arm64)
  else
    arm64_sleef=0
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ $arm64_sleef -eq 0 ]; then
  echo "setup: libsleef-dev:arm64 is not installed and this is not Debian; the NEON tests need it" \
       "(add arm64 sources, then: apt-get install libsleef-dev:arm64)" >&2
fi

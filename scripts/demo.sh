#!/usr/bin/env bash
# Installs what is missing, builds, and trains the Flex-MoE model with flexmoe_train
# (examples/train.c): by default on the embedded synthetic multi-view task, 20 epochs on one
# thread (well under a minute), or on real data with --data DIR, e.g.
#   scripts/demo.sh --data ../shared/data/handwritten --missing-rate 0.3 --save model.safetensors
# Extra arguments go to flexmoe_train (try --help). The routing and SMoE-layer demo is
# build/release/examples/flexmoe_demo, built alongside.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f build/release/build.ninja ] || meson setup build/release -Dbench=disabled >/dev/null
ninja -C build/release examples/flexmoe_demo examples/flexmoe_train >/dev/null
exec build/release/examples/flexmoe_train "$@"

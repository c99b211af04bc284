#!/usr/bin/env bash
# Installs what is missing, builds (the routing demo and the train command,
# build/release/examples/flexmoe_train), and runs the routing demo on the best ISA path.
# Extra arguments go to the demo (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f build/release/build.ninja ] || meson setup build/release -Dbench=disabled >/dev/null
ninja -C build/release examples/flexmoe_demo examples/flexmoe_train >/dev/null
exec build/release/examples/flexmoe_demo "$@"

#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite:
#   - the test programs on every ISA path this CPU supports, each forced with FLEXMOE_ISA, linked
#     with OpenMP (the threaded paths everywhere; test_threads: 1, 2, 3 threads bit for bit), and
#     test_threads under ThreadSanitizer;
#   - the same under AddressSanitizer + UndefinedBehaviorSanitizer;
#   - libFuzzer targets of the kernel API (every path), the dataset and checkpoint loaders and the
#     layer and model API, 30 s each (scripts/fuzz.sh); the allocation failures and kills during
#     save (test_faults), natively and the former under LeakSanitizer;
#   - the NEON path cross-compiled for aarch64 and run under qemu-aarch64;
#   - the drop-in example built standalone with gcc and clang, the header as C++ with g++ and
#     clang++, and the header warning-free under -std=c99 -Wall -Wextra -pedantic -Werror;
#   - the demo's every out-of-memory path, under AddressSanitizer's leak check;
#   - the train command for an epoch or two on the synthetic task and on ../shared/data/handwritten,
#     its checkpoints end to end (tests/train_cli.sh), the PyTorch reference trainer's selftest and
#     one epoch of the flexmoe-against-PyTorch comparison (scripts/accuracy.py);
#   - a short run of the benchmark program (its result checks, not its timings);
#   - scripts/bench.sh --quick: the headline benchmarks (SMoE layer, its training step, routing) at
#     one small size, through to their JSON, charts and summary (in build/bench-quick/).
# Ends with one line "N passed, N failed"; exits non-zero when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --bench || { echo "0 passed, 1 failed"; exit 1; }

passed=0
failed=0
failures=()
log_dir=build/test-logs
mkdir -p "$log_dir"

# run NAME COMMAND...: a step that passes or fails as a whole; its output goes to the log.
run() {
  local name=$1; shift
  if "$@" >"$log_dir/$name.log" 2>&1; then
    passed=$((passed + 1)); echo "ok      $name"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAILED  $name (log: $log_dir/$name.log)"
    tail -n 20 "$log_dir/$name.log" | sed 's/^/        /'
  fi
}

# configure DIR ARGS...: a fresh meson build directory.
configure() {
  local dir=$1; shift
  rm -rf "$dir" && meson setup "$dir" "$@"
}

# run_tests NAME ENV... -- PROGRAM...: a test program; its own "N passed, N failed" is added to
# the totals (a crash or a missing line counts as one failure).
run_tests() {
  local name=$1; shift
  local env=()
  while [ "$1" != "--" ]; do env+=("$1"); shift; done; shift
  local log="$log_dir/$name.log" line p f
  env "${env[@]}" "$@" >"$log" 2>&1
  local rc=$?
  line=$(grep -E '^[a-z_]+: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    p=$(sed -E 's/.*: ([0-9]+) passed.*/\1/' <<<"$line"); f=$(sed -E 's/.* ([0-9]+) failed$/\1/' <<<"$line")
  else
    p=0; f=1
  fi
  if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  passed=$((passed + p)); failed=$((failed + f))
  if [ "$f" -eq 0 ]; then
    echo "ok      $name ($p checks)"
  else
    failures+=("$name"); echo "FAILED  $name ($f failed; log: $log)"
    grep -E 'FAIL|ERROR|runtime error|Sanitizer' "$log" | head -n 20 | sed 's/^/        /'
  fi
}

tests=(test_api test_softmax test_topk test_gate test_confsmoe test_dispatch test_gemm test_ffn test_layer test_model test_data test_train test_checkpoint test_robustness test_threads test_validation test_vecmath test_cxx)

# ---- native build, every supported path -------------------------------------------------------
run build configure build/release -Dbench=enabled
run compile ninja -C build/release
isas=$(build/release/examples/flexmoe_demo --list-isas)
echo "paths on this machine: $(echo $isas)"
for isa in $isas; do
  for t in "${tests[@]}"; do
    run_tests "$t-$isa" FLEXMOE_ISA=$isa -- build/release/tests/$t
  done
done
# faults (not ISA-specific): every allocation failure of model, training, checkpoints and loader,
# and 200 kills during a save
run_tests test_faults -- build/release/tests/test_faults
run demo build/release/examples/flexmoe_demo --tokens 1000
# the train command end to end: the synthetic task, and the handwritten digits at 30 % missing
run train-synthetic build/release/examples/flexmoe_train --epochs 2 --json
run train-handwritten build/release/examples/flexmoe_train --data ../shared/data/handwritten --epochs 1 --json
# checkpoints through the command: resume = uninterrupted, --eval, refusals, an independent reader
run_tests train-cli -- tests/train_cli.sh build/release/examples/flexmoe_train
# the PyTorch reference trainer's own checks, and the comparison script end to end (one epoch)
run_tests train-reference -- /usr/bin/python3 scripts/train_reference.py --selftest
run accuracy-smoke scripts/accuracy.py --rates 0.3 --seeds 1 --epochs 1 --out build/accuracy-smoke
run smoe-classifier build/release/examples/smoe_classifier
run bench-smoke build/release/bench/flexmoe_bench --benchmark_min_time=0.001 --benchmark_filter='^(softmax|topk|gate|dispatch|combine)[a-z_]*/.*/(8|64|4096)$|^(gemm_grouped|ffn).*/16/128/256$'
run bench-quick scripts/bench.sh --quick --out build/bench-quick

# ---- sanitizers -------------------------------------------------------------------------------
# -O1 with line tables only: the header's every ISA path under ASan + UBSan compiles in a minute
# this way, six at -O2 -g, and the tests run about as fast
run build-sanitize configure build/sanitize -Dbench=disabled -Doptimization=1 \
    -Db_sanitize=address,undefined -Dc_args="-fno-sanitize-recover=all -g1" -Dcpp_args="-fno-sanitize-recover=all -g1"
run compile-sanitize ninja -C build/sanitize
# every C test program (test_cxx is C++ and checks one path only)
c_tests=()
for src in tests/test_*.c; do [ "$src" = tests/test_faults.c ] || c_tests+=("$(basename "$src" .c)"); done
for isa in $isas; do
  for t in "${c_tests[@]}"; do
    run_tests "$t-$isa-asan-ubsan" FLEXMOE_ISA=$isa -- build/sanitize/tests/$t
  done
done

# the allocation failures under LeakSanitizer (one path: they do not depend on it)
run_tests test_faults-asan-ubsan -- build/sanitize/tests/test_faults allocations

# ---- fuzzing under libFuzzer + ASan + UBSan: the kernel API on every path, the dataset loader, the
# checkpoint loader, the layer and model API; 30 s each (the reproducers in tests/fuzz/crashes/
# are replayed first)
run fuzz scripts/fuzz.sh 30

# ---- aarch64 / NEON under qemu ----------------------------------------------------------------
if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
  # -O2: the Debian 12 cross GCC 12 crashes in its -O3 vectorizer on examples/demo.c
  run build-aarch64 configure build/aarch64 --cross-file scripts/aarch64-linux-gnu.ini -Dbench=disabled -Doptimization=2
  run compile-aarch64 ninja -C build/aarch64
  for isa in neon scalar; do
    for t in "${tests[@]}"; do
      # the argument checks run before any path is chosen: the native and sanitizer runs cover them
      [ "$t" = test_validation ] && continue
      # the scalar path's compositions (model, training, threads) run natively; here its kernels
      case $isa/$t in scalar/test_model | scalar/test_train | scalar/test_threads) continue ;; esac
      run_tests "$t-$isa-qemu" FLEXMOE_ISA=$isa FM_VECMATH_SPARSE=2 -- qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib build/aarch64/tests/$t
    done
  done
else
  failed=$((failed + 1)); failures+=("aarch64"); echo "FAILED  aarch64: the cross compiler or qemu-aarch64 is missing"
fi

# ---- standalone builds: the README's drop-in command, OpenMP, C++, strict C99 ----------------
strict=(-std=c99 -Wall -Wextra -pedantic -Werror -O2 -I.)
for c in gcc clang; do
  run "dropin-$c" sh -c "$c ${strict[*]} examples/dropin.c -o build/dropin-$c -lm && ./build/dropin-$c"
done
run demo-alloc-failures tests/demo_alloc_failures.sh
# (the meson builds above link every test with OpenMP: the threaded paths run in all of them)
# the threaded paths under ThreadSanitizer: clang with LLVM's OpenMP and its TSan tool (archer), at
# 3 threads on 2 cores, so the items interleave
run build-tsan clang -fsanitize=thread -fopenmp -std=c99 -O1 -g -I. -Itests -DFM_TEST_SOURCE_ROOT="\"$PWD\"" \
    tests/test_threads.c tests/flexmoe_impl.c -o build/test_threads-tsan -lm
run_tests test_threads-tsan OMP_NUM_THREADS=3 OMP_TOOL_LIBRARIES=/usr/lib/llvm-14/lib/libarcher.so \
    TSAN_OPTIONS=ignore_noninstrumented_modules=1:halt_on_error=1:exitcode=66 -- build/test_threads-tsan
for cxx in g++ clang++; do
  run "cxx-$cxx" sh -c "$cxx -std=c++17 -Wall -Wextra -pedantic -Werror -O2 -I. tests/test_cxx.cpp -o build/cxx-$cxx -lm && ./build/cxx-$cxx"
done

# ---- packaging: meson install + pkg-config, and use as a meson subproject ----------------------
pkg=$(mktemp -d)
installed_pkgconfig() {
  meson setup "$pkg/build" --prefix="$pkg/prefix" -Dtests=false -Dexamples=false -Dbench=disabled &&
    ninja -C "$pkg/build" install &&
    PKG_CONFIG_PATH=$(dirname "$(find "$pkg/prefix" -name flexmoe.pc)") &&
    cc -O2 examples/dropin.c $(PKG_CONFIG_PATH=$PKG_CONFIG_PATH pkg-config --cflags --libs flexmoe) -o "$pkg/dropin" &&
    "$pkg/dropin"
}
as_subproject() {
  local user="$pkg/user"
  mkdir -p "$user/subprojects/flexmoe" &&
    cp flexmoe.h flexmoe_simd.h meson.build meson_options.txt "$user/subprojects/flexmoe/" &&
    cp examples/dropin.c "$user/app.c" &&
    printf "project('user', 'c')\nexecutable('app', 'app.c', dependencies : dependency('flexmoe'))\n" > "$user/meson.build" &&
    meson setup "$user/build" "$user" && ninja -C "$user/build" && "$user/build/app"
}
run install-pkgconfig installed_pkgconfig
run meson-subproject as_subproject
rm -rf "$pkg"

echo
if [ $failed -ne 0 ]; then echo "failed: ${failures[*]}"; fi
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]

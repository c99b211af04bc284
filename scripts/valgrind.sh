#!/usr/bin/env bash
# valgrind memcheck over a subset of the test programs, built without sanitizers (-O1 -g):
#   valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite
# so an invalid read or write, a jump on an uninitialised value, a bad free or a definite leak
# fails the program (as does the program's own "N failed" or exit status).
#
# Paths: FLEXMOE_ISA=scalar for every program of the subset, FLEXMOE_ISA=avx2 for its faster half
# (when the CPU has AVX2 and FMA). valgrind does not run AVX-512; its CPUID hides AVX-512, so an
# unforced run would take AVX2.
#
# The subset (about 1.5 minutes on an idle 2-core machine, 2.5 loaded; each program tests every
# public call of its area on the forced path):
#   scalar  test_api test_ffn test_gemm test_gate test_confsmoe test_checkpoint
#           test_faults allocations (every allocation failure of the model, training, checkpoints
#           and loader; its SIGKILL half would fork valgrind 200 times)
#   avx2    test_api test_ffn test_gemm test_confsmoe test_faults allocations
# Left out by default (name them to run them): test_softmax, test_topk, test_dispatch (20-35 s
# each per path under valgrind), test_layer (about 2 minutes per path; it hands the backward an
# uninitialised buffer as `saved` on purpose, to see it refused, and memcheck reports the jump on
# that buffer's header: suppressed below, it is the test's doing), test_model (runs the PyTorch
# reference), test_data and test_train (thousands of samples, ten-epoch runs: many minutes),
# test_robustness (reserves 2^31-row matrices with MAP_NORESERVE, paints and measures stacks and
# reads XINUSE: valgrind emulates all three) and test_threads (OpenMP).
#
# The programs are built with FM_TEST_NO_GUARD. tests/fm_test.h's guarded heap (each block of the
# test program in mmap'd pages of its own, a PROT_NONE page after it) works under valgrind, but
# memcheck does not track such blocks as heap: fresh pages read as defined zeros (no
# uninitialised-value reports on the test's buffers), no redzone before a block, no leak check.
# With plain malloc memcheck sees all of that. The library allocates through malloc either way.
#
#   scripts/valgrind.sh                       the subset above
#   scripts/valgrind.sh test_layer test_topk  those programs, on every path of ISAS
#   ISAS=scalar scripts/valgrind.sh ...       the paths to run (default: scalar avx2)
# Installs valgrind when missing (apt-get, through sudo when not root), as scripts/fuzz.sh does
# clang. Logs in build/valgrind/logs. Ends with "N passed, N failed"; exits non-zero on a failure.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if ! command -v valgrind >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "valgrind: installing valgrind"
  if ! { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends valgrind; }; then
    echo "0 passed, 1 failed"; exit 1
  fi
fi

isas=${ISAS:-}
if [ -z "$isas" ]; then
  isas=scalar
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && isas="scalar avx2"
fi

# runs: "ISA PROGRAM [ARGS]"
runs=()
if [ $# -gt 0 ]; then
  for isa in $isas; do for p in "$@"; do runs+=("$isa $p"); done; done
else
  for p in test_api test_ffn test_gemm test_gate test_confsmoe test_checkpoint "test_faults allocations"; do runs+=("scalar $p"); done
  if [[ " $isas " == *" avx2 "* ]]; then
    for p in test_api test_ffn test_gemm test_confsmoe "test_faults allocations"; do runs+=("avx2 $p"); done
  fi
fi

out=build/valgrind
log_dir=$out/logs
mkdir -p "$log_dir"
cflags=(-std=c99 -O1 -g -fno-omit-frame-pointer -DFM_TEST_NO_GUARD "-DFM_TEST_SOURCE_ROOT=\"$PWD\"" -I. -Itests)
cat >"$out/flexmoe.supp" <<'SUPP'
{
   test_layer hands fm_moe_backward a buffer no forward wrote as saved, to see it refused: its header is uninitialised
   Memcheck:Cond
   fun:fm_moe_backward
   fun:check_defaults_and_routing
}
SUPP

start=$SECONDS
echo "valgrind: building in $out"
gcc "${cflags[@]}" -c tests/flexmoe_impl.c -o "$out/flexmoe_impl.o" || { echo "0 passed, 1 failed"; exit 1; }
built=" "
for r in "${runs[@]}"; do
  read -r _ name _ <<<"$r"
  [[ "$built" == *" $name "* ]] && continue
  gcc "${cflags[@]}" "tests/$name.c" "$out/flexmoe_impl.o" -o "$out/$name" -lm -lpthread || { echo "0 passed, 1 failed"; exit 1; }
  built+="$name "
done

passed=0 failed=0 failures=()
for r in "${runs[@]}"; do
  read -r isa name args <<<"$r"
  log="$log_dir/$name-$isa.log" t0=$SECONDS
  # shellcheck disable=SC2086 # args: words on purpose
  FLEXMOE_ISA=$isa valgrind --tool=memcheck --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
    --suppressions="$out/flexmoe.supp" --quiet "$out/$name" $args >"$log" 2>&1
  rc=$?
  line=$(grep -E '^[a-z_]+: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
  if [ $rc -eq 0 ] && [ -n "$line" ]; then
    passed=$((passed + 1)); echo "ok      $name${args:+ $args} ($isa, $((SECONDS - t0)) s): ${line#*: }"
  else
    failed=$((failed + 1)); failures+=("$name/$isa")
    echo "FAILED  $name${args:+ $args} ($isa, exit $rc; log: $log)"
    grep -E '^==[0-9]+==|FAIL' "$log" | head -n 30 | sed 's/^/        /'
  fi
done
echo "valgrind: $((SECONDS - start)) s (build included)"
[ ${#failures[@]} -eq 0 ] || echo "failed: ${failures[*]}"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]

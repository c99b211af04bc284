#!/usr/bin/env bash
# Walks every out-of-memory path of examples/demo.c. FLEXMOE_DEMO_FAIL_ALLOC=N makes the demo's
# Nth allocation fail; N goes 1, 2, ... until a run succeeds without reaching N. Each failing run
# must exit with the demo's own status (1), say "out of memory" on stderr, and leave nothing to
# LeakSanitizer or UndefinedBehaviorSanitizer; the sanitizers exit with 86, so one of their
# reports can never pass for the demo's own failure.
set -uo pipefail
cd "$(dirname "$0")/.."

bin=build/demo-alloc-failures
mkdir -p build
gcc -std=c99 -Wall -Wextra -pedantic -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=all -I. examples/demo.c -o "$bin" -lm || exit 1

export ASAN_OPTIONS=detect_leaks=1:exitcode=86
export UBSAN_OPTIONS=print_stacktrace=1:exitcode=86
args=(--tokens 200 --dim 32 --hidden 64)
out=$(mktemp) err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT

limit=1000 # far above the demo's allocation count: a bound for a loop that never ends
for ((n = 1; n <= limit; n++)); do
  FLEXMOE_DEMO_FAIL_ALLOC=$n "$bin" "${args[@]}" >"$out" 2>"$err"
  rc=$?
  reached=0
  grep -q "FLEXMOE_DEMO_FAIL_ALLOC=$n: failing this allocation" "$err" && reached=1
  if [ $rc -eq 0 ] && [ $reached -eq 0 ]; then
    echo "ok: run $n succeeded without reaching allocation $n; $((n - 1)) allocation failures handled"
    exit 0
  fi
  problems=()
  [ $reached -eq 1 ] || problems+=("failed although allocation $n was never reached")
  [ $rc -eq 1 ] || problems+=("exit status $rc, not the demo's 1")
  grep -q "out of memory" "$err" || problems+=("no 'out of memory' on stderr")
  grep -qE "Sanitizer|runtime error" "$err" && problems+=("a sanitizer report")
  if [ ${#problems[@]} -ne 0 ]; then
    echo "FAILED: FLEXMOE_DEMO_FAIL_ALLOC=$n $bin ${args[*]}:"
    printf '  %s\n' "${problems[@]}"
    echo "--- stderr"; cat "$err"
    echo "--- stdout (last lines)"; tail -n 5 "$out"
    exit 1
  fi
  echo "ok: allocation $n: $(grep -v FLEXMOE_DEMO_FAIL_ALLOC "$err" | head -n 1)"
done
echo "FAILED: runs still fail with FLEXMOE_DEMO_FAIL_ALLOC=$limit"
exit 1

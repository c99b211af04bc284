#!/usr/bin/env bash
# Fuzzes the kernel API: builds tests/fuzz/fuzz_kernels.c (libFuzzer + AddressSanitizer +
# UndefinedBehaviorSanitizer) and, on every ISA path this CPU and OS support (each forced with
# FLEXMOE_ISA), first replays every reproducer in tests/fuzz/crashes/ (regressions), then fuzzes
# for SECONDS_PER_PATH (default 60) over a copy of the seed corpus tests/fuzz/corpus/.
# A crash leaves its input in tests/fuzz/crashes/<path>-crash-<sha1>; replay one with
#   FLEXMOE_ISA=<path> FUZZ_TRACE=1 build/fuzz/fuzz_kernels tests/fuzz/crashes/<file>
# (FUZZ_TRACE=1 prints the call, its arguments and the special values of its buffers).
# Exits non-zero on any crash.
#   scripts/fuzz.sh [SECONDS_PER_PATH]
# Environment:
#   FUZZ_CFLAGS  extra compiler flags, e.g. -DFUZZ_CORRUPT_PLAN or -DFUZZ_GARBAGE_PADDING (see the
#                target's header comment)
#   FUZZ_ISAS    the paths to run (default: every supported one of scalar, avx2, avx512, neon)
#   FUZZ_MERGE=1 merge the new interesting inputs back into tests/fuzz/corpus/ (keep it small:
#                only when you mean to)
# Installs clang and libFuzzer's runtime (libclang-rt-14-dev) when missing, through sudo when not
# root, as scripts/setup.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
case $seconds in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS_PER_PATH]" >&2; exit 2 ;; esac

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
for p in clang libclang-rt-14-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || dpkg -s "$p:$(dpkg --print-architecture)" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "fuzz: installing ${missing[*]}"
  $SUDO apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" || exit 1
fi

bin=build/fuzz/fuzz_kernels
crashes=tests/fuzz/crashes
mkdir -p build/fuzz "$crashes"
echo "fuzz: building $bin"
# shellcheck disable=SC2086 # FUZZ_CFLAGS is a list of flags
clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. ${FUZZ_CFLAGS:-} \
  tests/fuzz/fuzz_kernels.c -o "$bin" -lm || exit 1

# The paths to run: those the library itself accepts here (the target exits at start otherwise).
if [ -n "${FUZZ_ISAS:-}" ]; then
  isas=$FUZZ_ISAS
else
  isas=""
  for isa in scalar avx2 avx512 neon; do
    if FLEXMOE_ISA=$isa "$bin" -runs=0 >/dev/null 2>&1; then isas="$isas $isa"; fi
  done
fi
echo "fuzz: paths:$isas; $seconds s each"

failed=0
for isa in $isas; do
  # regressions first: every reproducer kept so far, on this path
  reproducers=()
  for f in "$crashes"/*; do [ -f "$f" ] && reproducers+=("$f"); done
  if [ ${#reproducers[@]} -gt 0 ]; then
    echo "fuzz: $isa: replaying ${#reproducers[@]} reproducer(s) from $crashes"
    for f in "${reproducers[@]}"; do
      if ! FLEXMOE_ISA=$isa "$bin" -timeout=10 -rss_limit_mb=2048 "$f" >build/fuzz/replay.log 2>&1; then
        echo "FAILED  fuzz $isa: $f still crashes:"
        grep -E 'FUZZ FAILURE|SUMMARY|runtime error|ERROR:' build/fuzz/replay.log | head -n 5 | sed 's/^/        /'
        failed=1
      fi
    done
  fi
  work=$(mktemp -d)
  cp tests/fuzz/corpus/* "$work"/ 2>/dev/null
  echo "fuzz: $isa: fuzzing for $seconds s"
  if FLEXMOE_ISA=$isa "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
       -print_final_stats=1 -artifact_prefix="$crashes/$isa-" "$work" >build/fuzz/$isa.log 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done' build/fuzz/$isa.log | sed 's/^/        /'
  else
    echo "FAILED  fuzz $isa (log: build/fuzz/$isa.log; reproducer in $crashes/):"
    grep -E 'FUZZ FAILURE|SUMMARY|runtime error|ERROR:|Test unit written' build/fuzz/$isa.log | head -n 8 | sed 's/^/        /'
    failed=1
  fi
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    FLEXMOE_ISA=$isa "$bin" -merge=1 -timeout=10 -rss_limit_mb=2048 tests/fuzz/corpus "$work" >/dev/null 2>&1
  fi
  rm -rf "$work"
done

if [ $failed -ne 0 ]; then echo "fuzz: FAILED"; exit 1; fi
echo "fuzz: no crashes"

#!/usr/bin/env bash
# Fuzzes flexmoe.h with libFuzzer + AddressSanitizer + UndefinedBehaviorSanitizer, one target at a
# time (no -jobs), each built from tests/fuzz/fuzz_<target>.c:
#   kernels     the kernel API (tests/fuzz/fuzz_kernels.c), on every ISA path this CPU and OS
#               support (each forced with FLEXMOE_ISA); seeds tests/fuzz/corpus/
#   dataset     fm_dataset_load and what follows a load (split, drop_views, impute, standardize,
#               evaluate); seeds tests/fuzz/corpus-dataset/
#   checkpoint  fm_model_load (safetensors) and the loaded model's forward, backward, Adam step
#               and save/load round trip; seeds tests/fuzz/corpus-checkpoint/ (regenerate with
#               FUZZ_MAKE_CORPUS=tests/fuzz/corpus-checkpoint build/fuzz/fuzz_checkpoint)
#   model       the SMoE layer API (fm_moe_*) and the model API (fm_model_*) with fuzzer-chosen
#               configurations and shapes; seeds tests/fuzz/corpus-model/
# The last three run once, on the best path (the last of the paths below). For each target and
# path the script first replays that target's reproducers in tests/fuzz/crashes/ (regressions:
# dataset-*, checkpoint-* and model-* are those targets'; every other file is the kernel
# target's), then fuzzes for SECONDS_PER_RUN (default 60) over a copy of the seed corpus, and
# prints the executions (stat::number_of_executed_units) and crashes of each.
# Runs: one per kernel path plus three, so SECONDS_PER_RUN 45 on a CPU with scalar, avx2 and
# avx512 is about 6 x 45 s = 4.5 minutes of fuzzing (CI's budget: 40-60 s per run).
# A crash leaves its input in tests/fuzz/crashes/<path>-crash-<sha1> (kernels) or
# tests/fuzz/crashes/<target>-<path>-crash-<sha1>; replay one with
#   FLEXMOE_ISA=<path> FUZZ_TRACE=1 build/fuzz/fuzz_<target> tests/fuzz/crashes/<file>
# (FUZZ_TRACE=1 prints the calls, their arguments and statuses), and rename a reproducer you keep
# to <target>-found-<what> (kernels: found-<what>).
# Exits non-zero on any crash or failing reproducer.
#   scripts/fuzz.sh [SECONDS_PER_RUN]
# Environment:
#   FUZZ_CFLAGS   extra compiler flags, e.g. -DFUZZ_CORRUPT_PLAN or -DFUZZ_GARBAGE_PADDING (see
#                 fuzz_kernels.c's header comment)
#   FUZZ_ISAS     the paths to run (default: every supported one of scalar, avx2, avx512, neon)
#   FUZZ_TARGETS  the targets to run (default: kernels dataset checkpoint model)
#   FUZZ_MERGE=1  merge the new interesting inputs back into the target's seed corpus (keep it
#                 small: only when you mean to)
# Installs clang and libFuzzer's runtime (libclang-rt-14-dev) when missing, through sudo when not
# root, as scripts/setup.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
case $seconds in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS_PER_RUN]" >&2; exit 2 ;; esac
targets=${FUZZ_TARGETS:-kernels dataset checkpoint model}

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

crashes=tests/fuzz/crashes
mkdir -p build/fuzz "$crashes"
# the implementation once, instrumented like the targets (libFuzzer's coverage, ASan, UBSan), line
# tables only: every target links it
sanitize=(-O1 -g1 -fno-sanitize-recover=all -I.)
echo "fuzz: building build/fuzz/flexmoe_impl.o"
clang "${sanitize[@]}" -fsanitize=fuzzer-no-link,address,undefined -c tests/flexmoe_impl.c -o build/fuzz/flexmoe_impl.o || exit 1
for target in $targets; do
  [ -f "tests/fuzz/fuzz_$target.c" ] || { echo "fuzz: no target tests/fuzz/fuzz_$target.c" >&2; exit 2; }
  echo "fuzz: building build/fuzz/fuzz_$target"
  # shellcheck disable=SC2086 # FUZZ_CFLAGS is a list of flags
  clang "${sanitize[@]}" -fsanitize=fuzzer,address,undefined ${FUZZ_CFLAGS:-} \
    "tests/fuzz/fuzz_$target.c" build/fuzz/flexmoe_impl.o -o "build/fuzz/fuzz_$target" -lm || exit 1
done

# The paths to run: those the library itself accepts here (a target exits at start otherwise).
first=${targets%% *}
if [ -n "${FUZZ_ISAS:-}" ]; then
  isas=$FUZZ_ISAS
else
  isas=""
  for isa in scalar avx2 avx512 neon; do
    if FLEXMOE_ISA=$isa "build/fuzz/fuzz_$first" -runs=0 >/dev/null 2>&1; then isas="$isas $isa"; fi
  done
fi
best=${isas##* }
echo "fuzz: paths:$isas (best: $best); $seconds s per run"

# reproducers of a target: dataset-*, checkpoint-*, model-* are theirs, the rest the kernels'
owns() { # owns TARGET FILE
  local name
  name=$(basename "$2")
  case $name in
    dataset-* ) [ "$1" = dataset ] ;;
    checkpoint-* ) [ "$1" = checkpoint ] ;;
    model-* ) [ "$1" = model ] ;;
    * ) [ "$1" = kernels ] ;;
  esac
}

failed=0
summary=()
for target in $targets; do
  bin=build/fuzz/fuzz_$target
  if [ "$target" = kernels ]; then
    corpus=tests/fuzz/corpus; paths=$isas; max_len=4096
  else
    corpus=tests/fuzz/corpus-$target; paths=$best; max_len=4096
    [ "$target" = checkpoint ] && max_len=16384
  fi
  for isa in $paths; do
    tag=$target/$isa
    [ "$target" = kernels ] && prefix="$crashes/$isa-" || prefix="$crashes/$target-$isa-"
    # regressions first: every reproducer of this target kept so far, on this path
    reproducers=()
    for f in "$crashes"/*; do [ -f "$f" ] && owns "$target" "$f" && reproducers+=("$f"); done
    still=0
    if [ ${#reproducers[@]} -gt 0 ]; then
      echo "fuzz: $tag: replaying ${#reproducers[@]} reproducer(s) from $crashes"
      for f in "${reproducers[@]}"; do
        if ! FLEXMOE_ISA=$isa "$bin" -timeout=10 -rss_limit_mb=2048 "$f" >build/fuzz/replay.log 2>&1; then
          echo "FAILED  fuzz $tag: $f still crashes:"
          grep -E 'FUZZ FAILURE|SUMMARY|runtime error|ERROR:' build/fuzz/replay.log | head -n 5 | sed 's/^/        /'
          failed=1; still=$((still + 1))
        fi
      done
    fi
    work=$(mktemp -d)
    cp "$corpus"/* "$work"/ 2>/dev/null
    log=build/fuzz/$target-$isa.log
    echo "fuzz: $tag: fuzzing for $seconds s"
    crashed=0
    if FLEXMOE_ISA=$isa "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=$max_len \
         -print_final_stats=1 -artifact_prefix="$prefix" "$work" >"$log" 2>&1; then
      :
    else
      crashed=1
      echo "FAILED  fuzz $tag (log: $log; reproducer in $crashes/):"
      grep -E 'FUZZ FAILURE|SUMMARY|runtime error|ERROR:|Test unit written' "$log" | head -n 8 | sed 's/^/        /'
      failed=1
    fi
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | tail -n 1 | awk '{print $2}')
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
    line=$(printf '%-20s %10s executions, %d crash(es), %d of %d reproducer(s) failing' "$tag" "${execs:-?}" \
      "$crashed" "$still" "${#reproducers[@]}")
    echo "        $line"
    summary+=("$line")
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
      FLEXMOE_ISA=$isa "$bin" -merge=1 -timeout=10 -rss_limit_mb=2048 -max_len=$max_len "$corpus" "$work" >/dev/null 2>&1
    fi
    rm -rf "$work"
  done
done

echo "fuzz: summary"
for line in "${summary[@]}"; do echo "        $line"; done
if [ $failed -ne 0 ]; then echo "fuzz: FAILED"; exit 1; fi
echo "fuzz: no crashes"

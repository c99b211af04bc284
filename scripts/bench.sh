#!/usr/bin/env bash
# Runs the benchmarks and draws their charts: installs what is missing (scripts/setup.sh --bench),
# builds build/release/bench/flexmoe_bench, runs it one benchmark family at a time (every impl of
# a family in the same process, on the same data, one thread), writes the Google Benchmark JSON
# and turns it into PNG charts and a Markdown summary (bench/plot.py).
#
#   scripts/bench.sh                 the whole suite: 3 repetitions of every benchmark, in random
#                                    order within each family, medians reported (tens of minutes)
#   scripts/bench.sh --quick         a smoke run of seconds: the SMoE layer, its training step and
#                                    the routing at one small size, each timed briefly (CI runs it)
#   scripts/bench.sh --filter REGEX  only the benchmarks whose names match REGEX (with or without
#                                    --quick; names are <kernel>/<impl>/<shape...>)
#   scripts/bench.sh --out DIR       where to write (default bench/results/<date>-<commit>/, and
#                                    bench/results/<date>-<commit>-quick/ for --quick)
#
# Writes DIR/bench.json (every family's runs merged, Google Benchmark's JSON format), DIR/bench.log
# (the benchmark program's console output), DIR/*.png and DIR/summary.md.
# Fails when no benchmark matches the filter (with --quick: a headline family has vanished or been
# renamed), when the program fails, or when a benchmark reports an error (an impl disagreeing with
# the reference is one).
#
# OpenBLAS (the openblas peer, and PyTorch's matmuls where they go through it) falls back to its
# generic Prescott kernels on CPUs newer than it knows: the run exports the value
# scripts/openblas_coretype.sh prints for this CPU, and replaces an OPENBLAS_CORETYPE from the
# environment that would run older kernels than the best this CPU can (and says so).
set -euo pipefail
cd "$(dirname "$0")/.."

# The --quick selection: one small size of each headline family. Keep it in this one place.
QUICK_FILTER='^(moe_layer|moe_layer_train|routing)/[^/]+/(uniform|skewed)/4/1024$'

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench: $*" >&2; exit 1; }

quick=0
filter=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --filter) [ $# -ge 2 ] || die "--filter needs a REGEX"; filter=$2; shift ;;
    --filter=*) filter=${1#--filter=} ;;
    --out) [ $# -ge 2 ] || die "--out needs a DIR"; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$filter" ]; then
  if [ $quick -eq 1 ]; then filter=$QUICK_FILTER; else filter=.; fi
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
dirty=""
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then dirty="-dirty"; fi
if [ -z "$out" ]; then
  out="bench/results/$(date +%Y-%m-%d)-$commit"
  if [ $quick -eq 1 ]; then out+="-quick"; fi
fi

# ---- build ------------------------------------------------------------------------------------
scripts/setup.sh --bench
if [ ! -f build/release/build.ninja ]; then
  meson setup build/release --buildtype=release -Dbench=enabled
elif ! ninja -C build/release -t query bench/flexmoe_bench >/dev/null 2>&1; then
  meson configure build/release -Dbench=enabled   # configured without the benchmarks (demo.sh)
fi
ninja -C build/release bench/flexmoe_bench
bench=build/release/bench/flexmoe_bench

# ---- OpenBLAS's kernels -----------------------------------------------------------------------
# The best kernels are OpenBLAS's own choice, or the family scripts/openblas_coretype.sh names when
# that choice is a fallback. An inherited OPENBLAS_CORETYPE that picks other (older) kernels would
# slow down the openblas and torch peers, so it is replaced, and the run says so.
inherited=${OPENBLAS_CORETYPE-}
unset OPENBLAS_CORETYPE
coretype=$(scripts/openblas_coretype.sh)
best=$( (if [ -n "$coretype" ]; then export OPENBLAS_CORETYPE=$coretype; fi; build/openblas_corename) 2>/dev/null || echo '?')
if [ -n "$inherited" ]; then
  got=$(OPENBLAS_CORETYPE=$inherited build/openblas_corename 2>/dev/null || echo '?')
  if [ "${got,,}" = "${best,,}" ]; then
    coretype=$inherited
  else
    echo "bench: not using OPENBLAS_CORETYPE=$inherited from the environment: it gives OpenBLAS's $got kernels," \
         "and this CPU runs its $best ones"
  fi
fi
if [ -n "$coretype" ]; then
  export OPENBLAS_CORETYPE=$coretype
  echo "bench: OPENBLAS_CORETYPE=$coretype ($best kernels)"
fi

# ---- what to run ------------------------------------------------------------------------------
# Google Benchmark 1.7 takes --benchmark_min_time as a number of seconds, 1.8 on as "0.01s".
min_time_flag() {
  if "$bench" --benchmark_filter='^$' --benchmark_min_time="${1}s" >/dev/null 2>&1; then
    echo "--benchmark_min_time=${1}s"
  else
    echo "--benchmark_min_time=$1"
  fi
}
if [ $quick -eq 1 ]; then
  flags=("$(min_time_flag 0.01)")
else
  flags=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true
         --benchmark_enable_random_interleaving=true)
fi

listing=$("$bench" --benchmark_list_tests=true --benchmark_filter="$filter" 2>/dev/null) ||
  die "$bench failed to list its benchmarks (run it by hand to see why)"
names=()
if [ -n "$listing" ]; then mapfile -t names <<<"$listing"; fi
if [ ${#names[@]} -eq 0 ]; then
  if [ $quick -eq 1 ] && [ "$filter" = "$QUICK_FILTER" ]; then
    die "no benchmark matches the --quick filter '$filter': has a headline family (moe_layer, moe_layer_train, routing) vanished or been renamed? (QUICK_FILTER in $0)"
  fi
  die "no benchmark matches '$filter'"
fi
# The families in the program's order, and each family's names.
families=()
declare -A members=()
for name in "${names[@]}"; do
  family=${name%%/*}
  if [ -z "${members[$family]+set}" ]; then families+=("$family"); members[$family]=""; fi
  members[$family]+="$name"$'\n'
done

mkdir -p "$out"
# only what an earlier run here wrote: stale charts of a family no longer run would mislead
rm -f "$out"/*_throughput.png "$out"/*_speedup.png "$out"/*_peak.png "$out/summary.md" "$out/bench.json"
runs=$(mktemp -d "$out/.runs.XXXXXX")
trap 'rm -rf "$runs"' EXIT
log="$out/bench.log"
: >"$log"
plural() { if [ "$1" -eq 1 ]; then echo "$1 $2"; else echo "$1 $3"; fi; }
echo "bench: $(plural ${#names[@]} benchmark benchmarks) in $(plural ${#families[@]} family families) -> $out/"

# ---- run, one family per process --------------------------------------------------------------
start=$(date +%s)
i=0
for family in "${families[@]}"; do
  i=$((i + 1))
  mapfile -t list < <(printf '%s' "${members[$family]}")
  # exactly this family's selected benchmarks: their names, escaped, as one anchored alternation
  regex="^($(printf '%s\n' "${list[@]}" | sed 's/[^A-Za-z0-9_/-]/\\&/g' | paste -sd'|'))\$"
  printf '[%d/%d] %-24s %-15s ... ' "$i" "${#families[@]}" "$family" "$(plural ${#list[@]} benchmark benchmarks)"
  t0=$(date +%s)
  echo "==== $family" >>"$log"
  if ! "$bench" --benchmark_filter="$regex" "${flags[@]}" \
       --benchmark_out="$runs/$(printf '%02d' "$i")-$family.json" --benchmark_out_format=json >>"$log" 2>&1; then
    echo "FAILED"
    tail -n 20 "$log" | sed 's/^/    /' >&2
    die "the benchmark program failed on $family (log: $log)"
  fi
  echo "$(($(date +%s) - t0)) s"
done
echo "bench: ran in $(($(date +%s) - start)) s"

# ---- merge, plot, check -----------------------------------------------------------------------
/usr/bin/python3 - "$out/bench.json" "$commit$dirty" "$filter" "$quick" "$runs"/*.json <<'EOF'
import json, sys
target, commit, selection, quick, parts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5:]
merged = None
for part in parts:
    with open(part) as f:
        report = json.load(f)
    if merged is None:
        merged = report
        merged["context"]["git_commit"] = commit
        merged["context"]["bench_filter"] = selection
        if quick:
            merged["context"]["bench_quick"] = True  # plot.py marks the charts: timings of a smoke run
    else:
        merged["benchmarks"] += report["benchmarks"]
with open(target, "w") as f:
    json.dump(merged, f, indent=2)
EOF

/usr/bin/python3 bench/plot.py "$out/bench.json" --out "$out" >/dev/null

echo "bench: results  $out/bench.json"
echo "bench: summary  $out/summary.md"
for png in "$out"/*.png; do
  if [ -f "$png" ]; then echo "bench: chart    $png"; fi
done

errors=$(/usr/bin/python3 -c '
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    if b.get("error_occurred"):
        print("  %s: %s" % (b["name"], b.get("error_message", "")))
' "$out/bench.json")
if [ -n "$errors" ]; then
  echo "$errors" >&2
  die "$(echo "$errors" | wc -l) benchmark(s) reported an error (above)"
fi

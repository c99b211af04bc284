#!/usr/bin/python3
"""The thread-scaling study: runs the scaling benchmarks (impl flexmoe_t<N>: the SMoE layer's forward +
backward per modality-combination mix at 4096 tokens, M = 6, and a training step of the six-view model,
batch 16) in one process, and writes each one's parallel efficiency against its own one-thread run,
beside the control fma_loop/peak_t<N> (a fixed amount of FMA work split over N threads: what the
machine gave a perfectly parallel loop in the same run, which a shared VM makes less than N cores).
The repetitions of all benchmarks are interleaved at random, so that a slow spell of the host falls
on every benchmark alike.

    scripts/scaling.py [--bench PATH] [--out DIR] [--min-time SECONDS] [--repetitions N]
    scripts/scaling.py --from FILE.json [--out DIR]     (the tables and the plot of an earlier run)

Writes OUT/scaling.json (Google Benchmark's JSON, every repetition), OUT/scaling.md (time per call,
speed-up and efficiency = speed-up / threads, medians of the repetitions; the fastest repetitions'
efficiency beside them) and OUT/scaling.png (efficiency per
benchmark and thread count); prints scaling.md. Exit status 0, 1 when the benchmark fails, 2 for a
bad command line."""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTER = r"^((moe_layer_train|model_step)/flexmoe_t[0-9]+/|fma_loop/peak_t[0-9]+)"
CONTROL = "fma_loop"


def summary(data):
    """{(kernel, threads, shape): (median seconds per call, its items per second, fastest repetition's
    seconds or None)}: the medians of the repetitions, and the fastest single one where the JSON has them."""
    out, fastest = {}, {}
    aggregated = any(b.get("run_type") == "aggregate" for b in data["benchmarks"])
    for b in data["benchmarks"]:
        parts = b["run_name"].replace("/real_time", "").split("/")
        kernel, impl, shape = parts[0], parts[1], "/".join(parts[2:])
        prefix = "peak_t" if kernel == CONTROL else "flexmoe_t"
        if not impl.startswith(prefix):
            continue
        key = (kernel, int(impl[len(prefix):]), shape)
        seconds = b["real_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        if b.get("run_type") == "iteration":
            fastest[key] = min(seconds, fastest.get(key, seconds))
        if not aggregated or b.get("aggregate_name") == "median":
            out[key] = (seconds, b.get("items_per_second", 0.0))
    return {key: value + (fastest.get(key),) for key, value in out.items()}


def report(data, out_dir):
    rows = summary(data)
    series = sorted({(k, s) for k, _, s in rows})
    counts = sorted({t for _, t, _ in rows})
    lines = ["# Thread scaling", "",
             f"{data['context'].get('date', '')}, {data['context'].get('num_cpus', '?')} CPUs "
             f"({data['context'].get('host_name', '')}). Each benchmark against its own one-thread run in the same "
             "process, repetitions interleaved at random; efficiency = speed-up / threads, medians of the "
             f"repetitions. The control {CONTROL}/peak_t<threads> splits a fixed amount of FMA work over the "
             "threads: its efficiency is what the machine gave a perfectly parallel loop in this run, and "
             "'against the control' divides by it. 'Fastest' is the efficiency of the fastest repetition at each "
             "thread count: the code's own, where the host's slow spells fall on some repetitions.", "",
             "| benchmark | threads | ms per call | items/s | speed-up | efficiency | against the control | fastest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    efficiency = {}
    for kernel, shape in sorted(series, key=lambda ks: ks[0] != CONTROL):
        base = rows.get((kernel, 1, shape))
        for t in counts:
            if (kernel, t, shape) not in rows:
                continue
            seconds, items, fastest = rows[(kernel, t, shape)]
            speedup = base[0] / seconds if base else float("nan")
            efficiency[(kernel, shape, t)] = speedup / t
            control = efficiency.get((CONTROL, "", t))
            against = f"{100 * speedup / t / control:.0f} %" if control and kernel != CONTROL else ""
            best = f"{100 * base[2] / fastest / t:.0f} %" if base and base[2] and fastest else ""
            lines.append(f"| {kernel}/{shape} | {t} | {seconds * 1e3:.2f} | {items:.0f} | {speedup:.2f} | "
                         f"{100 * speedup / t:.0f} % | {against} | {best} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "scaling.md"), "w") as f:
        f.write(text)
    print(text, end="")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling.py: matplotlib missing (python3-matplotlib): no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(counts) - 1)
    labels = [f"{k}\n{s}" for k, s in series]
    for i, t in enumerate(c for c in counts if c > 1):
        ax.bar([x + i * width for x in range(len(series))],
               [100 * efficiency.get((k, s, t), 0.0) for k, s in series], width, label=f"{t} threads")
    ax.axhline(85, color="gray", linestyle="--", linewidth=1, label="85 %")
    ax.set_xticks([x + width * (len(counts) - 2) / 2 for x in range(len(series))], labels, fontsize=7)
    ax.set_ylabel("parallel efficiency (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Parallel efficiency against one thread, same process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=110)
    print(f"scaling.py: wrote {os.path.join(out_dir, 'scaling.md')} and scaling.png", file=sys.stderr)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=os.path.join(REPO, "build", "release", "bench", "flexmoe_bench"))
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "scaling"))
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition (default 0.2)")
    parser.add_argument("--repetitions", type=int, default=20, help="(default 20)")
    parser.add_argument("--from", dest="source", help="an earlier scaling.json: no run")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.source:
        with open(args.source) as f:
            data = json.load(f)
    else:
        if not os.access(args.bench, os.X_OK):
            parser.error(f"{args.bench} is not an executable (scripts/bench.sh or ninja -C build/release builds it)")
        out = os.path.join(args.out, "scaling.json")
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        command = [args.bench, f"--benchmark_filter={FILTER}", f"--benchmark_min_time={args.min_time}",
                   f"--benchmark_repetitions={args.repetitions}", "--benchmark_display_aggregates_only=true",
                   "--benchmark_enable_random_interleaving=true",
                   f"--benchmark_out={out}", "--benchmark_out_format=json"]
        print("scaling.py: " + " ".join(command), file=sys.stderr)
        if subprocess.run(command, env=env).returncode != 0:
            return 1
        with open(out) as f:
            data = json.load(f)
    report(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

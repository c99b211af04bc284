#!/usr/bin/python3
"""The scheduling simulation: how the SMoE layer's forward + backward would scale past this machine.

Runs bench/flexmoe_trace (the implementation compiled with FLEXMOE_TRACE), which times every work item
of every parallel loop of the layer's training forward + backward at one thread, per modality mix, and
the whole call at 1 and 2 threads in the same process. Then replays those measured items on 1 to 128
simulated threads under two schedules:

  dynamic      flexmoe's: the loops as the header runs them, every item taken one at a time
               (schedule(dynamic)), so a hot expert's (row block) and (input block x panel) items
               spread over every thread;
  per-expert   the split other CPU MoE code uses: every expert-structured loop (the FFN forward, its
               backward rows, the weight gradients, the transposes) hands each thread whole experts, a
               static block of E / threads of them; the other loops as flexmoe runs them.

A loop costs its fork and join (measured at 1 and 2 threads, log2(threads) times the 2-thread cost
beyond: a tree barrier) plus the makespan of its items; the code between loops stays serial. Each
loop's items cost what they cost in the traced 2-thread run over the 1-thread one (sharing caches and
memory), that factor the median of the five mixes' for the same loop and carried unchanged past 2
threads (the 2-thread check is where that assumption is tested). Efficiency = simulated one-thread time / (threads x simulated time).

A tile study re-cuts the experts' items: row blocks of the FFN (FM__FFN_ROW_BLOCK) and input blocks of
the weight gradients (FM__DW_IN_BLOCK), each item's cost taken as proportional to its rows (inputs), at
the measured cost per row of its loop.

    scripts/schedule.py [--trace-bin PATH] [--tokens T] [--repeats N] [--out DIR]
    scripts/schedule.py --from TRACE.json [--out DIR]

Writes OUT/trace.json (the tracer's output), OUT/schedule.json (every prediction), OUT/schedule.md and
OUT/schedule.png; prints schedule.md. Exit status 0, 1 when the tracer fails, 2 for a bad command line."""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = [1, 2, 4, 8, 16, 32, 64, 128]
# The loops over the experts' rows or weights: what a per-expert split hands out whole.
EXPERT_LOOPS = {"expert_ffn_forward", "ffn_backward.hidden", "ffn_backward.rows", "ffn_weight_grads",
                "transpose_packed"}
FFN_ROW_BLOCK = 256  # FM__FFN_ROW_BLOCK: the row chunks of expert_ffn_forward and ffn_backward.*
DW_IN_BLOCK = 48  # FM__DW_IN_BLOCK: the input rows of a weight-gradient item
PANEL = 64  # FM_GEMM_PANEL


def loops_of(events, total):
    """The top-level parallel loops in call order, [(name, [item seconds], [item experts])], and the
    serial seconds outside them. Nested loops (run inside another loop's item) belong to that item."""
    loops, stack, serial, last_end = [], [], 0.0, 0.0
    for name, _line, item, expert, _thread, t in events:
        if item >= 0:
            if stack and stack[-1]["name"] == name:
                top = stack[-1]
            else:
                top = {"name": name, "starts": [], "experts": []}
                if not stack:
                    serial += t - last_end
                stack.append(top)
            top["starts"].append(t)
            top["experts"].append(expert)
        else:
            if not stack or stack[-1]["name"] != name:
                raise ValueError(f"trace: the end of {name} does not close the open loop")
            top = stack.pop()
            if not stack:
                starts = top["starts"] + [t]
                loops.append((name, [b - a for a, b in zip(starts, starts[1:])], top["experts"]))
                last_end = t
    if stack:
        raise ValueError("trace: a loop has no end")
    return loops, serial + max(0.0, total - last_end)


def item_times(events):
    """The top-level loops of one traced run as it ran, in call order: [(name, {item: seconds})], each
    thread's items but its last in the loop timed start to start (the last one's end is hidden in the
    barrier)."""
    occurrences, current = [], None
    for name, _line, item, _expert, thread, t in events:
        if current is None and item >= 0:
            current = {"name": name, "items": []}
        if current is None or name != current["name"]:
            continue  # a loop nested in an item: part of that item
        if item >= 0:
            current["items"].append((thread, t, item))
        elif thread == 0:
            current["end"] = t
            occurrences.append(current)
            current = None
    out = []
    for o in occurrences:
        by_thread, times = {}, {}
        for thread, t, item in o["items"]:
            by_thread.setdefault(thread, []).append((t, item))
        for items in by_thread.values():
            items.sort()
            for (t0, item), (t1, _) in zip(items, items[1:]):
                times[item] = t1 - t0
        out.append((o["name"], times))
    return out


def slowdowns(mix, threads):
    """Per top-level loop, in call order: what its items cost in the fastest traced run at `threads`
    threads over what the same items cost in the fastest at one (the same statistic, so tracing's
    own cost cancels), at least 1; 1 where fewer than 4 items match."""
    loops, _ = loops_of(mix["events"], mix["traced_seconds"])
    runs = mix.get("events_at", {})
    if str(threads) not in runs or "1" not in runs:
        return [1.0] * len(loops)
    there, here = item_times(runs[str(threads)]), item_times(runs["1"])
    factors = []
    for k, (name, _costs, _experts) in enumerate(loops):
        factor = 1.0
        if k < len(there) and k < len(here) and there[k][0] == name == here[k][0]:
            common = [i for i in there[k][1] if i in here[k][1]]
            base = sum(here[k][1][i] for i in common)
            if len(common) >= 4 and base > 0:  # sharing never makes an item cheaper: below 1 is noise
                factor = max(1.0, sum(there[k][1][i] for i in common) / base)
        factors.append(factor)
    return factors


def shared_slowdowns(trace, threads):
    """slowdowns() of every mix, {mix name: factors}; where every mix runs the same loops in the same
    order (the layer does), each loop's factor is its median over the mixes: a loop moves the same
    data whatever the mix, and one mix's traced run caught in a slow spell of a shared host should not
    decide that mix's prediction."""
    own = {mix["mix"]: slowdowns(mix, threads) for mix in trace["mixes"]}
    names = [[name for name, _, _ in loops_of(mix["events"], mix["traced_seconds"])[0]] for mix in trace["mixes"]]
    if not names or any(n != names[0] for n in names):
        return own
    median = [statistics.median(factors) for factors in zip(*own.values())]
    return {name: median for name in own}


def makespan_dynamic(costs, threads):
    """Items taken in order by whichever thread is free first."""
    free = [0.0] * threads
    for c in costs:
        i = min(range(threads), key=free.__getitem__)
        free[i] += c
    return max(free)


def makespan_static(costs, threads):
    """OpenMP schedule(static): contiguous blocks of ceil(n / threads) items."""
    n = len(costs)
    block = -(-n // threads) if n else 0
    return max((sum(costs[i:i + block]) for i in range(0, n, block)), default=0.0) if block else 0.0


def expert_costs(name, costs, experts, offsets):
    """Each expert's share of a loop: tagged items are its own; row chunks split by the rows they cover."""
    E = len(offsets) - 1
    share = [0.0] * E
    for i, (c, e) in enumerate(zip(costs, experts)):
        if e >= 0:
            share[e] += c
            continue
        r0, r1 = offsets[0] + i * FFN_ROW_BLOCK, min(offsets[0] + (i + 1) * FFN_ROW_BLOCK, offsets[E])
        for x in range(E):
            overlap = min(r1, offsets[x + 1]) - max(r0, offsets[x])
            if overlap > 0:
                share[x] += c * overlap / (r1 - r0)
    return share


def fork_join(trace, threads):
    measured = {int(k): v for k, v in trace["fork_join_seconds"].items()}
    if threads in measured:
        return measured[threads]
    return measured.get(2, 2e-6) * math.log2(threads)


def simulate(trace, mix, threads, schedule, retile=None, contention=None):
    """The call's time on `threads` threads; contention: per loop, the factor its items cost more at
    2 threads or more (slowdowns()), else none."""
    loops, serial = loops_of(mix["events"], mix["traced_seconds"])
    offsets = [0]
    for r in mix["expert_rows"]:
        offsets.append(offsets[-1] + r)
    total, seen = serial, {}
    for k, (name, costs, experts) in enumerate(loops):
        seen[name] = seen.get(name, -1) + 1
        if contention and threads > 1:
            costs = [c * contention[k] for c in costs]
        if retile and name in retile:
            costs = retile[name](costs, offsets, seen[name])
            experts = [-1] * len(costs)
        if threads == 1:
            total += sum(costs)
            continue
        if name == "gemm_strided":  # its row blocks are cut for the thread count: cut them again
            costs = strided_items(costs, experts[0], threads)
        total += fork_join(trace, threads)
        if schedule == "per-expert" and name in EXPERT_LOOPS:
            total += makespan_static(expert_costs(name, costs, experts, offsets), threads)
        else:
            total += makespan_dynamic(costs, threads)
    return total, serial


def strided_items(costs, rows, threads):
    """fm__gemm_strided's items on `threads` threads (one column panel: the gate's 16 experts): row
    blocks of at most 96 rows, at least 4 per thread where the rows allow (blocks of 6 or more), of
    equal size; each at the measured cost per row."""
    wanted, spread, most = -(-rows // 96), 4 * threads, -(-rows // 6)
    blocks = max(wanted, min(spread, most), 1)
    block_rows = -(-(-(-rows // blocks)) // 6) * 6
    per_row = sum(costs) / rows
    return [per_row * min(block_rows, rows - r) for r in range(0, rows, block_rows)]


def row_retile(block):
    """The FFN's row-chunk loops cut into `block` rows: the measured cost per row, spread evenly."""
    def cut(costs, offsets, _occurrence):
        rows = offsets[-1] - offsets[0]
        per_row = sum(costs) / rows if rows else 0.0
        return [per_row * min(block, rows - r) for r in range(0, rows, block)]
    return cut


def dw_retile(in_block, shapes):
    """The weight-gradient items cut into `in_block` input rows: each (expert, input block, panel) item
    costs its expert's rows x its inputs at the loop's measured cost per (row x input x panel). shapes:
    (inputs, outputs) of each weight-gradient loop in call order (dW2, then dW1)."""
    def cut(costs, offsets, occurrence):
        inputs, outputs = shapes[occurrence]
        counts = [offsets[e + 1] - offsets[e] for e in range(len(offsets) - 1)]
        panels = -(-outputs // PANEL)
        unit = sum(costs) / (sum(counts) * inputs * panels) if sum(counts) else 0.0
        return [unit * rows * min(in_block, inputs - i0)
                for rows in counts for _panel in range(panels) for i0 in range(0, inputs, in_block)]
    return cut


def study(trace):
    """Every prediction: {mix: {schedule: {threads: efficiency}}}, the measured 2-thread efficiency, and
    the tile study on every mix."""
    result = {"tokens": trace["tokens"], "isa": trace.get("isa"), "mixes": {}}
    D, H = trace["dim"], trace["hidden"]
    contentions = shared_slowdowns(trace, 2)
    for mix in trace["mixes"]:
        one, serial = simulate(trace, mix, 1, "dynamic")
        entry = {"serial_fraction": serial / one, "one_thread_ms": one * 1e3, "schedules": {}, "tiles": {}}
        loops, _ = loops_of(mix["events"], mix["traced_seconds"])
        entry["largest_item_fraction"] = max(max(c) for _, c, _ in loops if c) / one
        contention = contentions[mix["mix"]]
        weights = [sum(c) for _, c, _ in loops]
        entry["contention_2"] = sum(f * w for f, w in zip(contention, weights)) / sum(weights)
        for schedule in ("dynamic", "per-expert"):
            entry["schedules"][schedule] = {t: one / (t * simulate(trace, mix, t, schedule, contention=contention)[0])
                                            for t in THREADS}
        entry["schedules"]["dynamic, items as at 1 thread"] = {t: one / (t * simulate(trace, mix, t, "dynamic")[0])
                                                                for t in THREADS}
        wall = mix["wall_seconds"]
        if "1" in wall and "2" in wall:
            entry["measured_2"] = wall["1"] / (2 * wall["2"])
        for block in (64, 128, 256, 512):
            retile = {"expert_ffn_forward": row_retile(block), "ffn_backward.rows": row_retile(block),
                      "ffn_backward.hidden": row_retile(block)}
            entry["tiles"][f"rows {block}"] = {t: one / (t * simulate(trace, mix, t, "dynamic", retile)[0])
                                               for t in (16, 64, 128)}
        for in_block in (24, 48, 96, 192):  # dW2 has the hidden units as inputs, dW1 the model's dim
            retile = {"ffn_weight_grads": dw_retile(in_block, [(H, D), (D, H)])}
            entry["tiles"][f"dW inputs {in_block}"] = {t: one / (t * simulate(trace, mix, t, "dynamic", retile)[0])
                                                       for t in (16, 64, 128)}
        result["mixes"][mix["mix"]] = entry
    return result


def report(result, out_dir):
    mixes = list(result["mixes"])
    lines = ["# Scheduling simulation", "",
             f"The SMoE layer's training forward + backward (M = 6, d = 128, h = 256, 16 experts, top-4) at "
             f"{result['tokens']} tokens, path {result['isa']}: every work item timed at one thread "
             "(bench/flexmoe_trace), then replayed on simulated threads. Efficiency = one-thread time / "
             "(threads x time). `scripts/schedule.py` produced this.", "",
             "## Predicted parallel efficiency", "",
             "`dynamic` and `per-expert`: the items at what they cost in the traced 2-thread run (caches and memory "
             "shared; taken as the same beyond 2 threads); `items as at 1 thread`: the schedule's own limit. "
             "`measured at 2`: the call's wall time at 1 thread over twice its time at 2, in the same process.", "",
             "| mix | schedule | " + " | ".join(str(t) for t in THREADS[1:]) + " | measured at 2 |",
             "|---|---|" + "---:|" * (len(THREADS) - 1) + "---:|"]
    for m in mixes:
        e = result["mixes"][m]
        for schedule, eff in e["schedules"].items():
            measured = f"{100 * e['measured_2']:.0f} %" if schedule == "dynamic" and "measured_2" in e else ""
            lines.append(f"| {m} | {schedule} | " + " | ".join(f"{100 * eff[t]:.0f} %" for t in THREADS[1:]) +
                         f" | {measured} |")
    lines += ["", "## What limits it", "",
              "| mix | one thread (ms) | serial fraction | largest item / one-thread time | "
              "items' cost at 2 threads / at 1 | Amdahl bound at 128 |", "|---|---:|---:|---:|---:|---:|"]
    for m in mixes:
        e = result["mixes"][m]
        s = e["serial_fraction"]
        lines.append(f"| {m} | {e['one_thread_ms']:.1f} | {100 * s:.2f} % | {100 * e['largest_item_fraction']:.2f} % | "
                     f"{e['contention_2']:.2f} | {100 / (128 * (s + (1 - s) / 128)):.0f} % |")
    lines += ["", "## Tile sizes (dynamic schedule; efficiency at 16 / 64 / 128 threads)", "",
              "| mix | " + " | ".join(result["mixes"][mixes[0]]["tiles"]) + " |",
              "|---|" + "---:|" * len(result["mixes"][mixes[0]]["tiles"])]
    for m in mixes:
        tiles = result["mixes"][m]["tiles"]
        lines.append(f"| {m} | " + " | ".join(" / ".join(f"{100 * v[t]:.0f}" for t in (16, 64, 128))
                                              for v in tiles.values()) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "schedule.md"), "w") as f:
        f.write(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("schedule: matplotlib is missing: no plot", file=sys.stderr)
        return text
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(mixes):
        e = result["mixes"][m]
        color = f"C{i}"
        for schedule, style in (("dynamic", "-"), ("per-expert", "--"), ("dynamic, items as at 1 thread", ":")):
            eff = e["schedules"][schedule]
            ax.plot(THREADS, [100 * eff[t] for t in THREADS], style, color=color, marker="o", markersize=3,
                    label=f"{m} ({schedule})")
        if "measured_2" in e:
            ax.plot([2], [100 * e["measured_2"]], "x", color=color, markersize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(THREADS, [str(t) for t in THREADS])
    ax.set_ylim(0, 105)
    ax.axhline(80, color="grey", linewidth=0.6)
    ax.set_xlabel("threads (simulated; x: measured)")
    ax.set_ylabel("parallel efficiency (%)")
    ax.set_title(f"SMoE layer fwd+bwd, {result['tokens']} tokens: dynamic items vs per-expert split")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "schedule.png"), dpi=130)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace-bin", default=os.path.join(REPO, "build/release/bench/flexmoe_trace"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--from", dest="source", help="a trace JSON written earlier")
    parser.add_argument("--out", default=os.path.join(REPO, "bench/schedule"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    trace_path = os.path.join(args.out, "trace.json")
    if args.source:
        trace_path = args.source
    else:
        if not os.access(args.trace_bin, os.X_OK):
            print(f"schedule: {args.trace_bin} is missing (build it: scripts/setup.sh --bench, then "
                  "ninja -C build/release)", file=sys.stderr)
            return 2
        run = subprocess.run([args.trace_bin, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                              "--out", trace_path])
        if run.returncode != 0:
            return 1
    with open(trace_path) as f:
        trace = json.load(f)
    result = study(trace)
    with open(os.path.join(args.out, "schedule.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result, args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

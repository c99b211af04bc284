#!/usr/bin/python3
"""Charts and a Markdown summary from a Google Benchmark JSON report of flexmoe_bench.

    flexmoe_bench --benchmark_format=json > run.json   (or --benchmark_out=run.json ...)
    bench/plot.py run.json --out DIR

Names are <kernel>/<impl>/<shape...>; items_per_second counts tokens (rows). A benchmark's value
is the median aggregate when the report has one (--benchmark_repetitions), else the mean of its
repetitions, else its single run. For each headline family present:

    moe_layer, moe_layer_train, routing   (<family>/<impl>/<mix>/<M>/<tokens>)
      <family>_throughput.png  tokens per second per modality mix, one bar per impl
      <family>_speedup.png     flexmoe's throughput over each peer's (torch, openblas)
      <family>_peak.png        flexmoe as a percentage of the FMA peak (when a peak impl ran)

and for every other family (softmax, topk, gate, dispatch, gemm_grouped, ...) one
<family>_throughput.png with the impls side by side per shape. DIR/summary.md has a table per
family: every impl's rate, flexmoe's ratio over each peer and its percentage of the peak."""
import argparse
import collections
import json
import math
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FuncFormatter  # noqa: E402

DPI = 120

# The headline families: <family>/<impl>/<mix>/<M>/<tokens>.
HEADLINE = collections.OrderedDict([
    ("moe_layer", "SMoE layer forward"),
    ("moe_layer_train", "SMoE layer training step (forward + backward)"),
    ("routing", "Routing without the experts (gate → plan → dispatch → combine)"),
])
MIX_ORDER = ["full", "single", "uniform", "skewed", "realistic"]
TARGETS = {  # family -> (speedup over torch, fraction of the FMA peak) that the project aims at
    "moe_layer": (1.8, 0.65),
    "moe_layer_train": (1.8, None),
    "routing": (1.8, None),
}

# Every other family: (title, what its shape components are).
GENERIC = {
    "softmax": ("Row softmax, forward", "experts E; 4096 rows"),
    "softmax_backward": ("Row softmax, backward", "experts E; 4096 rows"),
    "topk": ("Top-k selection", "experts E / selected k; 4096 rows"),
    "gate": ("Noisy top-k gate, training forward", "experts E / selected k; 4096 tokens"),
    "gate_inference": ("Softmax-then-top-k gate (Mixtral), inference", "experts E / selected k; 4096 tokens"),
    "dispatch": ("Dispatch: token rows gathered into expert order", "tokens / d / k; 16 experts"),
    "combine": ("Combine: gate-weighted sum back into token order", "tokens / d / k; 16 experts"),
    "dispatch_backward": ("Dispatch, backward", "tokens / d / k; 16 experts"),
    "combine_backward": ("Combine, backward", "tokens / d / k; 16 experts"),
    "gemm_grouped": ("Grouped expert GEMM (Linear d → h per expert), forward", "rows per expert / d / h"),
    "gemm_grouped_backward": ("Grouped expert GEMM, backward (dX, dW, db)", "rows per expert / d / h"),
    "ffn": ("Expert FFN (Linear → GELU → Linear), forward", "rows per expert / d / h"),
    "ffn_backward": ("Expert FFN, backward", "rows per expert / d / h"),
}

# What each family's peak impl measures.
PEAK_KIND = {"dispatch": "memcpy", "combine": "memcpy", "dispatch_backward": "memcpy", "combine_backward": "memcpy"}

# Impl colours, the same in every chart; flexmoe's paths in blues, the peers in their own hues.
COLOURS = {
    "flexmoe": "#1f5fbf",
    "flexmoe_avx512": "#5b8fd9",
    "flexmoe_avx2": "#8fb5e8",
    "flexmoe_neon": "#8fb5e8",
    "flexmoe_scalar": "#c3d6f2",
    "flexmoe_chain": "#6fa8a8",
    "torch": "#e8710a",
    "openblas": "#2e9e44",
    "onednn": "#c0392b",
    "libxsmm": "#8e44ad",
    "sleef": "#b8860b",
    "partial_sort": "#7f6a4d",
    "scalar": "#999999",
    "peak": "#d0d0d0",
}
EXTRA_COLOURS = ["#17becf", "#bcbd22", "#e377c2", "#8c564b", "#7f7f7f"]

# Behind a value printed over a bar: the reference lines pass under it, not through it.
LABEL_BOX = dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6)

# Fields of a benchmark entry that are not measurements.
NOT_COUNTERS = {"family_index", "per_family_instance_index", "repetitions", "repetition_index", "threads",
                "iterations", "real_time", "cpu_time", "error_occurred"}


# ---- reading --------------------------------------------------------------------------------------

def split_name(name):
    """<kernel>/<impl>/<shape...> without Google Benchmark's own suffixes (repeats:3, threads:1, ...)."""
    parts = [p for p in name.split("/") if ":" not in p and p not in ("real_time", "manual_time")]
    if len(parts) < 2:
        return None
    return parts[0], parts[1], tuple(parts[2:])


def numbers(entry):
    return {k: float(v) for k, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_COUNTERS}


def load(path):
    """(context, results, errors, how): results[(kernel, impl, shape)] = {field: value}, with
    items_per_second among the fields; errors = [(name, message)]; how = how values were taken."""
    with (sys.stdin if path == "-" else open(path)) as f:
        report = json.load(f)
    groups = collections.OrderedDict()
    errors = []
    for b in report.get("benchmarks", []):
        name = b.get("run_name") or b["name"]
        g = groups.setdefault(name, {"aggregates": {}, "runs": []})
        if b.get("error_occurred"):
            errors.append((b["name"], b.get("error_message", "")))
        elif b.get("run_type") == "aggregate":
            g["aggregates"][b.get("aggregate_name")] = b
        else:
            g["runs"].append(b)
    results = collections.OrderedDict()
    how = collections.Counter()
    for name, g in groups.items():
        key = split_name(name)
        if key is None:
            continue
        if "median" in g["aggregates"]:
            values = numbers(g["aggregates"]["median"])
            how["median of %d repetitions" % g["aggregates"]["median"].get("repetitions", 0)] += 1
        elif g["runs"]:
            runs = [numbers(r) for r in g["runs"]]
            fields = set.intersection(*(set(r) for r in runs))
            values = {k: sum(r[k] for r in runs) / len(runs) for k in fields}
            how["single run" if len(runs) == 1 else "mean of %d repetitions" % len(runs)] += 1
        elif "mean" in g["aggregates"]:
            values = numbers(g["aggregates"]["mean"])
            how["mean of %d repetitions" % g["aggregates"]["mean"].get("repetitions", 0)] += 1
        else:
            continue  # errors only
        if "items_per_second" in values:
            results[key] = values
    return report.get("context", {}), results, errors, how


# ---- ordering and words ------------------------------------------------------------------------

def is_flexmoe(impl):
    return impl == "flexmoe" or impl.startswith("flexmoe_")


def impl_order(impl):
    peers = ["torch", "openblas", "onednn", "libxsmm", "sleef", "partial_sort", "scalar"]
    if impl == "flexmoe":
        return (0, 0, impl)
    if is_flexmoe(impl):
        return (1, 0, impl)
    if impl == "peak":
        return (4, 0, impl)
    return (2, peers.index(impl), impl) if impl in peers else (3, 0, impl)


def natural(value):
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def mix_order(mix):
    return (MIX_ORDER.index(mix), mix) if mix in MIX_ORDER else (len(MIX_ORDER), mix)


def impl_label(family, impl):
    if impl == "peak":
        return "peak (memcpy bound)" if PEAK_KIND.get(family) == "memcpy" else "peak (FMA bound)"
    if impl == "openblas" and family == "moe_layer":
        return "openblas (experts only)"
    if impl == "torch":
        return "torch (libtorch)"
    if impl.startswith("flexmoe_") and impl[8:] in ("avx512", "avx2", "neon", "scalar"):
        return "flexmoe, %s path forced" % {"avx512": "AVX-512", "avx2": "AVX2", "neon": "NEON",
                                            "scalar": "scalar"}[impl[8:]]
    return impl


def colours_for(impls):
    spare = iter(EXTRA_COLOURS * 4)
    return {i: COLOURS.get(i) or next(spare) for i in impls}


def rate(value):
    """A rate to three significant digits with a unit prefix: 1.23G, 45.6M, 789k, 5.00M, 12.3."""
    unit = ""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale * 0.9995:
            value, unit = value / scale, prefix
            break
    return ("%.2f" if value < 9.995 else "%.1f" if value < 99.95 else "%.0f") % value + unit


def tick(value):
    """An axis tick: 2.5M, 500k, 10M, 0."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return "%g%s" % (float("%.3g" % (value / scale)), prefix)
    return "%g" % float("%.3g" % value)


def machine_line(context):
    cpu = context.get("cpu_model", "unknown CPU")
    cpus = context.get("num_cpus")
    line = cpu + (" (%s CPUs)" % cpus if cpus else "") + ", 1 thread"
    corename = context.get("openblas_corename")
    if corename:
        line += " · OpenBLAS kernels: " + corename
    date = str(context.get("date", ""))[:10]
    if date:
        line += " · " + date
    if context.get("bench_quick"):
        line += " · quick smoke run: single short timings, not measurements"
    return line


def headline_configs(results, family):
    """The (M, tokens) pairs and mixes present in a headline family."""
    configs = sorted({(s[1], s[2]) for (k, _, s) in results if k == family},
                     key=lambda c: (natural(c[0]), natural(c[1])))
    mixes = sorted({s[0] for (k, _, s) in results if k == family}, key=mix_order)
    return configs, mixes


def axis_values(configs):
    """The M values and the token counts among the (M, tokens) pairs, in order."""
    return (sorted({m for m, _ in configs}, key=natural), sorted({t for _, t in configs}, key=natural))


# Bars for the M values (the number of modalities) in the speedup and peak charts: light to dark.
M_COLOURS = ["#9ecae1", "#4a90c8", "#08468c", "#6a51a3", "#3f007d"]


def m_bars(ax, mixes, ms, value_of, colour_of_single, label_format):
    """At each mix, one bar per M value; returns the legend handles by M."""
    width = 0.8 / len(ms) if len(ms) > 1 else 0.6
    top = ax.get_ylim()[1]
    handles = {}
    for j, m in enumerate(ms):
        colour = colour_of_single if len(ms) == 1 else M_COLOURS[j % len(M_COLOURS)]
        for i, mix in enumerate(mixes):
            v = value_of(mix, m)
            x = i - 0.4 + width * (j + 0.5) if len(ms) > 1 else i
            if v is None:
                ax.text(x, top * 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="#888888",
                        rotation=90 if len(ms) > 1 else 0)
                continue
            handles[m] = ax.bar(x, v, width * 0.92, color=colour)[0]
            ax.text(x, v + top * 0.015, label_format % v, ha="center", va="bottom", fontsize=7 if len(ms) > 1 else 8,
                    rotation=90 if len(ms) > 1 else 0, zorder=4, bbox=LABEL_BOX)
    ax.set_xticks(range(len(mixes)))
    ax.set_xticklabels(mixes)
    ax.set_xlim(-0.6, len(mixes) - 0.4)
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    return handles


def config_title(config, tokens_in_title):
    m, tokens = config
    return "M = %s modalities" % m if tokens_in_title else "M = %s modalities, %s tokens" % (m, tokens)


def family_title(family, configs):
    words = HEADLINE[family]
    tokens = sorted({t for _, t in configs}, key=natural)
    return (words + ", %s tokens" % tokens[0], True) if len(tokens) == 1 else (words, False)


# ---- drawing ------------------------------------------------------------------------------------

def grid(n, max_cols=3):
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def new_figure(rows, cols, panel_w, panel_h, title, subtitle):
    width = min(max(cols * panel_w, 7.0), 22.0)
    # the title wrapped to the figure's width (about 9 characters an inch at 13 pt bold)
    title_lines = textwrap.wrap(title, max(30, int(width * 8.5)))
    # the subtitle's parts (" · " between them) on as few lines as fit (about 12 characters an inch at 9 pt)
    subtitle_lines = [""]
    for part in subtitle.split(" · "):
        joined = subtitle_lines[-1] + (" · " if subtitle_lines[-1] else "") + part
        if subtitle_lines[-1] and len(joined) > width * 12:
            subtitle_lines.append(part)
        else:
            subtitle_lines[-1] = joined
    header = 0.25 + 0.25 * len(title_lines) + 0.17 * len(subtitle_lines)  # inches above the panels
    height = rows * panel_h + 0.9 + header
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    # plain figure texts, not suptitle: tight_layout then keeps exactly the room reserved in finish()
    fig.text(0.5, 1 - 0.12 / height, "\n".join(title_lines), ha="center", va="top", fontsize=13,
             fontweight="bold", linespacing=1.3)
    fig.text(0.5, 1 - (0.2 + 0.25 * len(title_lines)) / height, "\n".join(subtitle_lines), ha="center", va="top",
             fontsize=9, color="#444444", linespacing=1.3)
    fig.flexmoe_header = header
    return fig, axes


def finish(fig, axes, used, path, legend_handles=None, legend_labels=None):
    for ax in axes.flat[used:]:
        ax.set_visible(False)
    height = fig.get_size_inches()[1]
    bottom = 0.0
    if legend_handles:
        # as many columns as the widest entry (about 0.075 in a character at 9 pt) allows
        entry = 0.6 + 0.075 * max(len(label) for label in legend_labels)
        cols = max(1, min(len(legend_labels), int(fig.get_size_inches()[0] * 0.95 / entry)))
        fig.legend(legend_handles, legend_labels, loc="lower center", bbox_to_anchor=(0.5, 0.06 / height),
                   ncol=cols, fontsize=9, frameon=False)
        bottom = (0.2 + 0.25 * math.ceil(len(legend_labels) / cols)) / height
    fig.tight_layout(rect=(0, bottom, 1, 1 - (fig.flexmoe_header + 0.05) / height))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def rate_axis(ax, values, label):
    """A log axis when the values span more than a factor 30, else a linear one from zero; headroom
    above the highest bar for its label."""
    values = [v for v in values if v > 0]
    if not values:
        return False
    lo, hi = min(values), max(values)
    log = hi / lo > 30
    if log:
        ax.set_yscale("log")
        ax.set_ylim(lo / 2.5, hi * 6)
    else:
        ax.set_ylim(0, hi * 1.3)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick(v)))
    ax.set_ylabel(label)
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    return log


def bar_label(ax, x, height, text, log, size=7):
    y = height * 1.12 if log else height + ax.get_ylim()[1] * 0.015
    ax.text(x, y, text, ha="center", va="bottom", rotation=90, fontsize=size, color="#333333")


def grouped_bars(ax, groups, impls, value_of, colours, label_values):
    """Bars at x = group index, one per impl present; returns the handles for the legend."""
    width = 0.8 / len(impls)
    handles = {}
    log = ax.get_yscale() == "log"
    for j, impl in enumerate(impls):
        for i, g in enumerate(groups):
            v = value_of(g, impl)
            if v is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            bar = ax.bar(x, v, width * 0.92, color=colours[impl], edgecolor="#555555" if impl == "peak" else "none",
                         hatch="//" if impl == "peak" else None, linewidth=0.6)
            handles[impl] = bar[0]
            if label_values:
                bar_label(ax, x, v, rate(v), log)
    ax.set_xticks(range(len(groups)))
    ax.set_xlim(-0.6, len(groups) - 0.4)
    return handles


def plot_headline_throughput(family, results, context, out):
    configs, mixes = headline_configs(results, family)
    impls = sorted({i for (k, i, _) in results if k == family}, key=impl_order)
    colours = colours_for(impls)
    title, tokens_in_title = family_title(family, configs)
    bars = len(mixes) * len(impls)
    ms, tokens = axis_values(configs)
    if len(tokens) > 1 and len(ms) * len(tokens) == len(configs):
        rows, cols = len(ms), len(tokens)  # a row per M, a column per token count
    else:
        rows, cols = grid(len(configs), 1 if bars > 12 else 3)  # wide panels one above the other
    fig, axes = new_figure(rows, cols, max(5.0, 0.3 * bars + 1.8), 4.0, title, machine_line(context))
    values = [r["items_per_second"] for (k, _, _), r in results.items() if k == family]
    handles = {}
    for ax, config in zip(axes.flat, configs):
        def value(mix, impl):
            r = results.get((family, impl, (mix,) + config))
            return r["items_per_second"] if r else None
        rate_axis(ax, values, "tokens per second")  # one scale for every panel
        handles.update(grouped_bars(ax, mixes, impls, value, colours, len(mixes) * len(impls) <= 40))
        ax.set_xticklabels(mixes)
        ax.set_xlabel("modality mix of the tokens")
        ax.set_title(config_title(config, tokens_in_title), fontsize=10)
    present = [i for i in impls if i in handles]
    return finish(fig, axes, len(configs), os.path.join(out, family + "_throughput.png"),
                  [handles[i] for i in present], [impl_label(family, i) for i in present])


def plot_headline_speedup(family, results, context, out):
    """A row of panels per peer, a panel per token count; at each mix, a bar per M."""
    configs, mixes = headline_configs(results, family)
    impls = {i for (k, i, _) in results if k == family}
    peers = sorted((i for i in impls if not is_flexmoe(i) and i != "peak"), key=impl_order)
    if "flexmoe" not in impls or not peers:
        return None
    colours = colours_for(sorted(impls, key=impl_order))
    ms, tokens = axis_values(configs)
    title = HEADLINE[family] + (", %s tokens" % tokens[0] if len(tokens) == 1 else "")
    rows, cols = len(peers), len(tokens)
    bars = len(mixes) * len(ms)
    fig, axes = new_figure(rows, cols, max(4.5, 0.35 * bars + 2.0), 3.6, title + ": speedup of flexmoe",
                           machine_line(context))
    target = TARGETS.get(family, (None, None))[0]
    lines, handles = {}, {}
    for r, peer in enumerate(peers):
        def ratio(mix, m, t):
            mine = results.get((family, "flexmoe", (mix, m, t)))
            theirs = results.get((family, peer, (mix, m, t)))
            return mine["items_per_second"] / theirs["items_per_second"] if mine and theirs else None
        ratios = [ratio(mix, m, t) for mix in mixes for m in ms for t in tokens]
        # one scale along the row, so that the panels compare at a glance
        top = max([v for v in ratios if v is not None] + [1.0] + ([target] if peer == "torch" and target else []))
        for c, t in enumerate(tokens):
            ax = axes[r][c]
            ax.set_ylim(0, top * (1.25 if len(ms) > 1 else 1.15))
            lines["parity (1×)"] = ax.axhline(1.0, color="#555555", linewidth=1, linestyle="--", zorder=3)
            if peer == "torch" and target:
                lines["target: %.1f× over torch" % target] = ax.axhline(target, color="#c0392b", linewidth=1.2,
                                                                         linestyle="-.", zorder=3)
            handles.update(m_bars(ax, mixes, ms, lambda mix, m: ratio(mix, m, t), colours[peer], "%.2f×"))
            if c == 0:
                ax.set_ylabel("speedup of flexmoe\nover %s (×)" % peer)
            if r == rows - 1:
                ax.set_xlabel("modality mix of the tokens")
            heading = "vs %s" % peer if rows > 1 else ""
            if len(tokens) > 1:
                heading += (", " if heading else "") + "%s tokens" % t
            if len(ms) == 1:
                heading += (", " if heading else "") + "M = %s modalities" % ms[0]
            if peer == "openblas" and family == "moe_layer":
                heading += "\n(openblas times the experts only)"
            ax.set_title(heading, fontsize=10)
    entries = [(handles[m], "M = %s modalities" % m) for m in ms if m in handles and len(ms) > 1]
    entries += [(h, label) for label, h in lines.items()]
    return finish(fig, axes, rows * cols, os.path.join(out, family + "_speedup.png"),
                  [h for h, _ in entries], [label for _, label in entries])


def plot_headline_peak(family, results, context, out):
    """A panel per token count; at each mix, a bar per M: flexmoe's rate over the peak impl's."""
    configs, mixes = headline_configs(results, family)
    impls = {i for (k, i, _) in results if k == family}
    if "flexmoe" not in impls or "peak" not in impls:
        return None
    ms, tokens = axis_values(configs)
    title = HEADLINE[family] + (", %s tokens" % tokens[0] if len(tokens) == 1 else "")
    rows, cols = grid(len(tokens), 2)
    bars = len(mixes) * len(ms)
    fig, axes = new_figure(rows, cols, max(4.5, 0.35 * bars + 2.0), 3.8, title + ": flexmoe against the FMA peak",
                           machine_line(context))
    target = TARGETS.get(family, (None, None))[1]

    def share(mix, m, t):
        mine = results.get((family, "flexmoe", (mix, m, t)))
        peak = results.get((family, "peak", (mix, m, t)))
        return 100 * mine["items_per_second"] / peak["items_per_second"] if mine and peak else None
    top = max([v for v in (share(mix, m, t) for mix in mixes for m in ms for t in tokens) if v is not None] + [100])
    lines, handles = {}, {}
    for ax, t in zip(axes.flat, tokens):
        ax.set_ylim(0, top * (1.18 if len(ms) > 1 else 1.1))
        lines["the FMA peak (100 %)"] = ax.axhline(100, color="#555555", linewidth=1, linestyle="--", zorder=3)
        if target:
            lines["target: %.0f %% of the peak" % (100 * target)] = ax.axhline(
                100 * target, color="#c0392b", linewidth=1.2, linestyle="-.", zorder=3)
        handles.update(m_bars(ax, mixes, ms, lambda mix, m: share(mix, m, t), COLOURS["flexmoe"], "%.0f %%"))
        ax.set_ylabel("% of the FMA peak")
        ax.set_xlabel("modality mix of the tokens")
        heading = ("%s tokens" % t) if len(tokens) > 1 else ""
        if len(ms) == 1:
            heading += (", " if heading else "") + "M = %s modalities" % ms[0]
        ax.set_title(heading, fontsize=10)
    entries = [(handles[m], "M = %s modalities" % m) for m in ms if m in handles and len(ms) > 1]
    entries += [(h, label) for label, h in lines.items()]
    return finish(fig, axes, len(tokens), os.path.join(out, family + "_peak.png"),
                  [h for h, _ in entries], [label for _, label in entries])


def plot_generic(family, results, context, out):
    shapes = sorted({s for (k, _, s) in results if k == family}, key=lambda s: [natural(p) for p in s])
    impls = sorted({i for (k, i, _) in results if k == family}, key=impl_order)
    colours = colours_for(impls)
    # at most about 48 bars a panel: long shape lists are split over panels, one above the other
    per_panel = max(1, min(len(shapes), 48 // len(impls)))
    panels = [shapes[i:i + per_panel] for i in range(0, len(shapes), per_panel)]
    words, shape_words = GENERIC.get(family, (family, "shape"))
    fig, axes = new_figure(len(panels), 1, max(7.0, 0.24 * per_panel * len(impls) + 2.0), 4.2, words,
                           machine_line(context))
    values = [r["items_per_second"] for (k, _, _), r in results.items() if k == family]
    handles = {}
    for ax, panel in zip(axes.flat, panels):
        def value(shape, impl):
            r = results.get((family, impl, shape))
            return r["items_per_second"] if r else None
        rate_axis(ax, values, "rows (tokens) per second")
        handles.update(grouped_bars(ax, panel, impls, value, colours, per_panel * len(impls) <= 40))
        ax.set_xticklabels(["/".join(s) for s in panel])
        ax.set_xlabel(shape_words)
    present = [i for i in impls if i in handles]
    return finish(fig, axes, len(panels), os.path.join(out, family + "_throughput.png"),
                  [handles[i] for i in present], [impl_label(family, i) for i in present])


# ---- summary ------------------------------------------------------------------------------------

def table(family, results, rows, shape_header):
    """rows: [(cells for the shape columns, shape)]; a Markdown table of the impls' rates, then
    flexmoe over each peer, flexmoe's share of the peak, and flexmoe's own counters."""
    impls = sorted({i for (k, i, _) in results if k == family}, key=impl_order)
    # flexmoe_chain (the same work as separate flexmoe kernels) is the baseline of the fused gates
    peers = [i for i in impls if (not is_flexmoe(i) or i == "flexmoe_chain") and i != "peak"] \
        if "flexmoe" in impls else []
    peak = "flexmoe" in impls and "peak" in impls
    counters = []
    for name in ("GFLOPs", "imbalance", "dropped"):
        if any(name in r for (k, i, _), r in results.items() if k == family and i == "flexmoe"):
            counters.append(name)
    head = shape_header + [i for i in impls] + ["flexmoe / %s" % p for p in peers] + (["% of peak"] if peak else []) \
        + ["flexmoe " + ("GFLOP/s" if c == "GFLOPs" else c) for c in counters]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * len(shape_header) + "---:|" * (len(head) - len(shape_header))]
    for cells, shape in rows:
        get = lambda impl: results.get((family, impl, shape))
        row = list(cells)
        row += [rate(get(i)["items_per_second"]) if get(i) else "" for i in impls]
        mine = get("flexmoe")
        for p in peers:
            row.append("%.2f×" % (mine["items_per_second"] / get(p)["items_per_second"]) if mine and get(p) else "")
        if peak:
            row.append("%.0f %%" % (100 * mine["items_per_second"] / get("peak")["items_per_second"])
                       if mine and get("peak") else "")
        for c in counters:
            v = mine.get(c) if mine else None
            row.append("" if v is None else ("%.1f" % v if c == "GFLOPs" else "%.3g" % v))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(results, context, errors, how, families):
    date = str(context.get("date", ""))[:10]
    lines = ["# Benchmark summary", ""]
    facts = [
        "date: %s" % (date or "?"),
        "CPU: %s, %s CPUs at %s MHz; every benchmark on 1 thread" % (
            context.get("cpu_model", "unknown"), context.get("num_cpus", "?"), context.get("mhz_per_cpu", "?")),
        "flexmoe path: %s" % context.get("flexmoe_best_isa", "?"),
        "OpenBLAS kernels: %s (OPENBLAS_CORETYPE %s)" % (
            context.get("openblas_corename", "?"), context.get("openblas_coretype_env", "?")),
    ]
    if "git_commit" in context:
        facts.append("commit: %s" % context["git_commit"])
    facts.append("values: %s" % ", ".join("%s (%d)" % kv for kv in how.most_common()) if len(how) > 1
                 else "values: %s" % (next(iter(how)) if how else "none"))
    facts.append("rates are tokens (rows) per second; k = 10^3, M = 10^6")
    if context.get("bench_quick"):
        facts.append("**a quick smoke run** (`scripts/bench.sh --quick`): single short timings, not measurements")
    lines += ["- " + f for f in facts] + [""]
    for family in families:
        lines.append("## %s — %s" % (family, HEADLINE.get(family) or GENERIC.get(family, (family,))[0]))
        lines.append("")
        shapes = sorted({s for (k, _, s) in results if k == family}, key=lambda s: [natural(p) for p in s])
        if family in HEADLINE and all(len(s) == 3 for s in shapes):
            shapes.sort(key=lambda s: (natural(s[1]), natural(s[2]), mix_order(s[0])))
            lines.append(table(family, results, [([s[0], s[1], s[2]], s) for s in shapes],
                               ["mix", "M", "tokens"]))
        else:
            words = GENERIC.get(family, (family, "shape"))[1]
            lines.append(table(family, results, [(["/".join(s) or "-"], s) for s in shapes],
                               ["shape (%s)" % words]))
        lines.append("")
    if errors:
        lines += ["## Errors", ""] + ["- `%s`: %s" % e for e in errors] + [""]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="Google Benchmark JSON (--benchmark_format=json or --benchmark_out); - for stdin")
    parser.add_argument("--out", default=".", help="directory for the PNGs and summary.md (default: .)")
    args = parser.parse_args()
    context, results, errors, how = load(args.report)
    if not results:
        sys.exit("plot: no benchmark with items_per_second in %s" % args.report)
    os.makedirs(args.out, exist_ok=True)
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
                         "xtick.labelsize": 8, "ytick.labelsize": 8})

    families = []
    for kernel, _, _ in results:
        if kernel not in families:
            families.append(kernel)
    families.sort(key=lambda f: (0, list(HEADLINE).index(f)) if f in HEADLINE else (1, 0))
    written = []
    for family in families:
        shapes = {s for (k, _, s) in results if k == family}
        if family in HEADLINE and all(len(s) == 3 for s in shapes):
            written += [plot_headline_throughput(family, results, context, args.out),
                        plot_headline_speedup(family, results, context, args.out),
                        plot_headline_peak(family, results, context, args.out)]
        else:
            written.append(plot_generic(family, results, context, args.out))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary(results, context, errors, how, families))
    written.append(os.path.join(args.out, "summary.md"))
    for path in written:
        if path:
            print(path)
    if errors:
        print("plot: %d benchmark(s) reported an error (listed in summary.md)" % len(errors), file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Turns a Google Benchmark JSON report into a Markdown table of items_per_second and of ratios
against a peer implementation, per kernel and shape.

    flexmoe_bench --benchmark_repetitions=5 --benchmark_format=json > run.json
    bench/ratios.py run.json --peer onednn

Names are <kernel>/<impl>/<shape...>; with repetitions, the median is used."""
import argparse
import collections
import json
import sys


def millions(rate):
    """A rate in millions: one decimal from 10M up, three significant digits below."""
    return f"{rate / 1e6:.1f}M" if rate >= 1e7 else f"{rate / 1e6:.3g}M"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="JSON file written with --benchmark_format=json (- for stdin)")
    parser.add_argument("--peer", default="onednn", help="impl the ratios are taken against (default onednn)")
    args = parser.parse_args()
    with (sys.stdin if args.report == "-" else open(args.report)) as f:
        report = json.load(f)

    rate = {}
    for b in report["benchmarks"]:
        repeated = "aggregate_name" in b
        if (repeated and b["aggregate_name"] != "median") or b.get("error_occurred"):
            continue
        if not repeated and b.get("repetitions", 1) > 1:
            continue
        kernel, impl, *shape = b["run_name"].split("/")
        rate[(kernel, "/".join(shape), impl)] = b["items_per_second"]

    kernels = collections.OrderedDict()
    for kernel, shape, impl in rate:
        kernels.setdefault(kernel, collections.OrderedDict()).setdefault(shape, []).append(impl)
    def impl_order(impl):
        if impl == args.peer:
            return (3, impl)
        if impl == "flexmoe" or impl.startswith("flexmoe_"):
            return (0, "" if impl == "flexmoe" else impl)
        return (2, impl)

    def shape_order(shape):
        return [int(p) if p.isdigit() else p for p in shape.split("/")]

    for kernel, shapes in kernels.items():
        impls = sorted({i for s in shapes.values() for i in s}, key=impl_order)
        shapes = collections.OrderedDict(sorted(shapes.items(), key=lambda kv: shape_order(kv[0])))
        print(f"\n### {kernel} (rows/s, and × {args.peer})\n")
        print("| shape | " + " | ".join(impls) + " |")
        print("|---|" + "---:|" * len(impls))
        for shape, present in shapes.items():
            peer = rate.get((kernel, shape, args.peer))
            cells = []
            for impl in impls:
                r = rate.get((kernel, shape, impl))
                if r is None:
                    cells.append("")
                elif peer and impl != args.peer:
                    cells.append(f"{millions(r)} ({r / peer:.2f}×)")
                else:
                    cells.append(millions(r))
            print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

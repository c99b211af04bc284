#!/usr/bin/python3
"""A heat map of where the gate sends the tokens of each modality combination, from one result line of
`flexmoe_train --json --report-routing`.

    scripts/routing_heatmap.py RESULT.json [--out FILE.png] [--title T]

RESULT.json holds the JSON line flexmoe_train printed on stdout (a file with other lines is fine: the
last line that is a JSON object with a "routing" key is used; "-" reads stdin and then needs --out).
Its "routing" object gives, for the samples flexmoe_train routed (the training samples, through the
trained model):
  experts             E
  load                [E] each expert's share of all token-expert assignments (sums to 1)
  load_cv             std / mean of the per-expert assignment counts
  normalized_entropy  entropy of the load shares / ln E (1: perfectly even)
  combinations        the modality combinations that occur, e.g. "pixel+fourier"
  combination_tokens  [per combination] the tokens of that combination
  share               [per combination][E] the share of that combination's assignments per expert
                      (each row sums to 1)

Draws rows = combinations (labelled with their token counts), columns = experts, colour = share, the
values written in the cells when the matrix is at most 16 x 16, a colour bar, and under it a bar strip
of each expert's overall load share (the dashed line is the even share 1/E). The title carries the
gate, the imputation, the missing rate, the seed, the load CV, the normalised entropy and the test
accuracy (--title T puts T on a line above). Default output: RESULT.png beside RESULT.json.

Exit status 0, 1 when the input cannot be read or is not a routing report, 2 for a bad command line."""
import argparse
import json
import math
import os
import sys

PROG = "routing_heatmap.py"
ANNOTATE_MAX = 16  # write the values in the cells when rows and columns are both at most this


class BadInput(Exception):
    pass


def read_result(path):
    """The last JSON object line with a "routing" key in the file ("-": stdin)."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, errors="replace") as f:
                text = f.read()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}")
    objects = 0
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            objects += 1
            if "routing" in row:
                return row
    if objects:
        raise BadInput(f"{path}: its JSON line has no \"routing\" (run flexmoe_train with --json --report-routing)")
    raise BadInput(f"{path}: no JSON line in it (flexmoe_train --json --report-routing prints one on stdout)")


def number_list(value, length, what):
    if not isinstance(value, list) or len(value) != length:
        raise BadInput(f"routing.{what} is not a list of {length} numbers")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise BadInput(f"routing.{what} holds {x!r}, not a finite number")
        out.append(float(x))
    return out


def check_routing(row):
    """Validates row["routing"]; returns (experts, load, combinations, tokens, share)."""
    r = row["routing"]
    if not isinstance(r, dict):
        raise BadInput("\"routing\" is not an object")
    experts = r.get("experts")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise BadInput(f"routing.experts is {experts!r}, not a positive integer")
    load = number_list(r.get("load"), experts, "load")
    combinations = r.get("combinations")
    if not isinstance(combinations, list) or not combinations or not all(isinstance(c, str) for c in combinations):
        raise BadInput("routing.combinations is not a non-empty list of names")
    tokens = r.get("combination_tokens")
    if tokens is None:
        tokens = [None] * len(combinations)
    elif not isinstance(tokens, list) or len(tokens) != len(combinations):
        raise BadInput(f"routing.combination_tokens is not a list of {len(combinations)} counts")
    share = r.get("share")
    if not isinstance(share, list) or len(share) != len(combinations):
        raise BadInput(f"routing.share is not a list of {len(combinations)} rows (one per combination)")
    share = [number_list(s, experts, f"share[{i}]") for i, s in enumerate(share)]
    for i, s in enumerate(share):
        total = sum(s)
        if total and abs(total - 1) > 1e-3:
            print(f"{PROG}: warning: the shares of {combinations[i]} sum to {total:.4f}, not 1", file=sys.stderr)
    total = sum(load)
    if abs(total - 1) > 1e-3:
        print(f"{PROG}: warning: the load shares sum to {total:.4f}, not 1", file=sys.stderr)
    return experts, load, combinations, tokens, share


def fmt(value, spec, fallback="?"):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return fallback
    return format(value, spec)


def subtitle(row):
    """The title's lines of facts: gate, imputation, missing rate, seed, what was counted; load CV,
    normalised entropy, test accuracy."""
    r = row["routing"]
    parts = [f"gate {row.get('gate', '?')}", f"imputation {row.get('imputation', '?')}",
             f"missing rate {fmt(row.get('missing_rate'), 'g')}"]
    if "seed" in row:
        parts.append(f"seed {row['seed']}")
    counted = []
    if isinstance(r.get("rows"), int):
        counted.append(f"{r['rows']} samples")
    if isinstance(r.get("assignments"), int):
        counted.append(f"{r['assignments']} assignments")
    facts = [f"load CV {fmt(r.get('load_cv'), '.3f')}", f"normalised entropy {fmt(r.get('normalized_entropy'), '.3f')}"]
    if isinstance(row.get("test_accuracy"), (int, float)):
        facts.append(f"test accuracy {row['test_accuracy']:.3f}")
    return (", ".join(parts) + (" (" + ", ".join(counted) + ")" if counted else "")
            + "\n" + ", ".join(facts))


def draw(row, path, title):
    experts, load, combinations, tokens, share = check_routing(row)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(combinations)
    annotate = n <= ANNOTATE_MAX and experts <= ANNOTATE_MAX
    labels = [c if t is None else f"{c} ({t} tokens)" for c, t in zip(combinations, tokens)]
    label_inches = 0.075 * max(len(label) for label in labels)
    cell = 0.5 if annotate else 0.32
    width = min(40.0, max(8.0, label_inches + experts * cell + 2.2))
    heat_height = max(2.4, n * (0.42 if annotate else 0.26))
    bar_height = 1.3
    height = min(60.0, heat_height + bar_height + 1.9)
    figure = plt.figure(figsize=(width, height))
    grid = figure.add_gridspec(2, 2, height_ratios=[heat_height, bar_height], width_ratios=[1.0, 0.035],
                               hspace=0.08, wspace=0.03)
    heat = figure.add_subplot(grid[0, 0])
    bars = figure.add_subplot(grid[1, 0], sharex=heat)
    scale = figure.add_subplot(grid[0, 1])

    top = max(max(max(s) for s in share), 1.0 / experts)
    image = heat.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
    heat.set_yticks(range(n))
    heat.set_yticklabels(labels, fontsize=8 if n <= 40 else 6)
    heat.set_ylabel("modality combination")
    heat.tick_params(axis="x", labelbottom=False)
    if annotate:
        for i, s in enumerate(share):
            for e, value in enumerate(s):
                heat.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 * top else "white")
    bar = figure.colorbar(image, cax=scale)
    bar.set_label("share of the combination's assignments (red: 1/E)")
    bar.ax.axhline(1.0 / experts, color="red", linewidth=1)  # the even share

    bars.bar(range(experts), load, color="tab:blue", width=0.8)
    bars.axhline(1.0 / experts, color="red", linestyle="--", linewidth=1, label=f"even share 1/{experts}")
    bars.set_xlim(-0.5, experts - 0.5)
    bars.set_ylim(0, max(max(load), 1.0 / experts) * 1.15)
    bars.set_ylabel("load share")
    bars.set_xlabel("expert")
    bars.set_xticks(range(experts))
    bars.tick_params(axis="x", labelsize=8 if experts <= 32 else 6)
    bars.legend(fontsize=7, loc="upper right", framealpha=0.7)
    bars.grid(axis="y", alpha=0.3)

    heading = (title + "\n" if title else "Routing share per modality combination\n") + subtitle(row)
    heat.set_title(heading, fontsize=10)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", metavar="RESULT.json", help="a file holding flexmoe_train's --json --report-routing line")
    parser.add_argument("--out", metavar="FILE.png", help="the image (default: RESULT.png beside RESULT.json)")
    parser.add_argument("--title", metavar="T", help="a first title line (the facts follow on the next)")
    args = parser.parse_args(argv)
    if args.out is None:
        if args.result == "-":
            parser.error("reading stdin needs --out")
        args.out = os.path.splitext(args.result)[0] + ".png"
    try:
        row = read_result(args.result)
        draw(row, args.out, args.title)
    except BadInput as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/python3
"""The method comparison of the ConfSMoE issue: Flex-MoE, Flex-MoE with zero imputation and ConfSMoE
(and two ablations of it), trained by flexmoe_train over missing rates and seeds, with their test
metrics and how evenly each routes the tokens to the experts.

    scripts/compare_methods.py [--data DIR] [--train PATH] [--rates 0.0 0.3 0.5 0.7] [--seeds 1 2 3]
                               [--epochs N] [--jobs J] [--out DIR] [--timeout SECONDS]
                               [--methods flexmoe zero confsmoe confsmoe-stage1 confsmoe-gate] [--keep]

The methods (--methods takes their keys):
  flexmoe          Flex-MoE                          --gate noisy --imputation bank
  zero             Zero imputation                   --gate noisy --imputation zero
  confsmoe         ConfSMoE                          --gate confidence --imputation two-stage
  confsmoe-stage1  ConfSMoE, stage 1 only            --gate confidence --imputation sampled-mean
  confsmoe-gate    ConfSMoE gate, bank imputation    --gate confidence --imputation bank
ConfSMoE is its confidence gate with both imputation stages: a missing view's features imputed as the
mean of 10 observed training samples', then its tokens attending over the observed views' expert
outputs. The ablations drop the second stage, or put the gate on Flex-MoE's learned bank.

--keep keeps the runs of the methods not run now from an existing OUT/results.json (each matched to
its method by the gate and imputation its JSON line reports), so that one method can be rerun and the
tables and plots still show every method.

Each run is
  TRAIN --data DIR --missing-rate P --seed S --json --report-routing <method flags> [--epochs N]
with stdout (its JSON line) in OUT/logs/<method>_p<P>_s<S>.json and stderr in OUT/logs/<...>.log.
--jobs runs go at once (default 2), one thread each (OMP/OpenBLAS/MKL_NUM_THREADS=1, and --threads 1
when the trainer's --help lists --threads). Progress (run i/N, elapsed time, time left) goes to
stderr; a failed run is reported with its command and the end of its log, marked failed in the
tables, and the others go on.

Writes OUT/results.json (every run's JSON line or its error, and the context: date, command, host
CPU), OUT/methods.md (per missing rate: accuracy, macro-F1, AUC, load CV and normalised routing
entropy per method, mean ± sample std over the seeds; every run), OUT/accuracy_vs_missing.png,
OUT/load_cv_vs_missing.png and, at the highest missing rate for seed 1 (the first seed when 1 is
not among them), OUT/heatmap_<method>_<rate>.png per method by scripts/routing_heatmap.py; prints
methods.md. Exit status 0, 1 when a run (or a heat map) failed, 2 for a bad command line."""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runlog import last_json_object, log, mean_std, tail  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "compare_methods.py"
HEATMAP = os.path.join(REPO, "scripts", "routing_heatmap.py")
# key -> (name, flags, what the JSON line must say)
METHODS = {
    "flexmoe": ("Flex-MoE", ["--gate", "noisy", "--imputation", "bank"], {"gate": "noisy", "imputation": "bank"}),
    "zero": ("Zero imputation", ["--gate", "noisy", "--imputation", "zero"], {"gate": "noisy", "imputation": "zero"}),
    "confsmoe": ("ConfSMoE", ["--gate", "confidence", "--imputation", "two-stage"],
                 {"gate": "confidence", "imputation": "two-stage"}),
    "confsmoe-stage1": ("ConfSMoE, stage 1 only", ["--gate", "confidence", "--imputation", "sampled-mean"],
                        {"gate": "confidence", "imputation": "sampled-mean"}),
    "confsmoe-gate": ("ConfSMoE gate, bank imputation", ["--gate", "confidence", "--imputation", "bank"],
                      {"gate": "confidence", "imputation": "bank"}),
}
METRICS = (("test_accuracy", "accuracy"), ("test_macro_f1", "macro-F1"), ("test_macro_auc", "AUC"))
ROUTING = (("load_cv", "load CV"), ("normalized_entropy", "normalised entropy"))
POLL_SECONDS = 0.2




def duration(seconds):
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_result(path, expect):
    """The run's JSON line from its stdout file: (row, None) or (None, why not)."""
    row, why = last_json_object(path)
    if why:
        return None, why
    bad = [key for key, _ in METRICS if not finite(row.get(key)) or not 0 <= row[key] <= 1]
    if bad:
        return None, "its JSON line has " + ", ".join(f"{key} {row.get(key)!r}" for key in bad)
    routing = row.get("routing")
    if not isinstance(routing, dict):
        return None, "its JSON line has no \"routing\" object (does the trainer know --report-routing?)"
    bad = [key for key, _ in ROUTING if not finite(routing.get(key))]
    if bad:
        return None, "its routing has " + ", ".join(f"{key} {routing.get(key)!r}" for key in bad)
    wrong = [f"{key} {row.get(key)!r}, not {value!r}" for key, value in expect.items() if row.get(key) != value]
    if wrong:
        return None, "the trainer ran another method: " + ", ".join(wrong)
    return row, None


class Run:
    def __init__(self, index, method, rate, seed, command, stem):
        self.index, self.method, self.rate, self.seed = index, method, rate, seed
        self.command, self.stem = command, stem
        self.process = self.started = None

    @property
    def out(self):
        return self.stem + ".json"

    @property
    def err(self):
        return self.stem + ".log"

    def label(self, total):
        return f"run {self.index}/{total} {self.method} missing {self.rate:g} seed {self.seed}"


class Grid:
    """Every (missing rate, seed, method) run, --jobs at a time, with progress on stderr."""

    def __init__(self, args, env, extra):
        self.args, self.env = args, env
        self.rows, self.failures = [], []
        logs = os.path.join(args.out, "logs")
        self.runs = []
        for rate in args.rates:
            for seed in args.seeds:
                for method in args.run_methods:
                    command = [args.train, "--data", args.data, "--missing-rate", f"{rate:g}", "--seed", str(seed),
                               "--json", "--report-routing"] + METHODS[method][1] + extra
                    if args.epochs:
                        command += ["--epochs", str(args.epochs)]
                    stem = os.path.join(logs, f"{method}_p{rate:g}_s{seed}")
                    self.runs.append(Run(len(self.runs) + 1, method, rate, seed, command, stem))
        self.start = time.perf_counter()
        self.finished = 0
        self.busy_seconds = 0.0

    def run(self):
        waiting, running = list(self.runs), []
        try:
            while waiting or running:
                while waiting and len(running) < self.args.jobs:
                    run = waiting.pop(0)
                    self.launch(run)
                    if run.process is not None:
                        running.append(run)
                time.sleep(POLL_SECONDS)
                for run in list(running):
                    elapsed = time.perf_counter() - run.started
                    if run.process.poll() is not None:
                        running.remove(run)
                        self.collect(run, elapsed)
                    elif self.args.timeout and elapsed > self.args.timeout:
                        run.process.kill()
                        run.process.wait()
                        running.remove(run)
                        self.fail(run, f"killed after {self.args.timeout:g} s", elapsed)
        except KeyboardInterrupt:
            for run in running:
                with contextlib.suppress(OSError):
                    run.process.kill()
                    run.process.wait()
            raise

    def launch(self, run):
        total = len(self.runs)
        run.started = time.perf_counter()
        try:
            with open(run.out, "w") as out, open(run.err, "w") as err:
                run.process = subprocess.Popen(run.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                               env=self.env)
        except OSError as e:
            run.process = None
            self.fail(run, f"cannot run it: {e.strerror or e}", 0.0)
            return
        log(f"{PROG}: {run.label(total)} started")

    def progress(self):
        """', elapsed X, about Y left' from the mean time per finished run and the --jobs in flight."""
        elapsed = time.perf_counter() - self.start
        text = f"{self.finished}/{len(self.runs)} finished, elapsed {duration(elapsed)}"
        left = len(self.runs) - self.finished
        if left and self.finished:
            per_run = self.busy_seconds / self.finished
            text += f", about {duration(per_run * left / min(self.args.jobs, left))} left"
        return text

    def collect(self, run, seconds):
        code = run.process.returncode
        if code != 0:
            return self.fail(run, f"exit status {code}", seconds)
        row, why = parse_result(run.out, METHODS[run.method][2])
        if why:
            return self.fail(run, why, seconds)
        routing = row["routing"]
        # the configuration's own values (a float32 0.3 may print as 0.300000012)
        row = dict(row, method=run.method, method_name=METHODS[run.method][0], missing_rate=run.rate, seed=run.seed,
                   command=shlex.join(run.command), log=os.path.relpath(run.err, self.args.out),
                   output=os.path.relpath(run.out, self.args.out), wall_seconds=round(seconds, 2))
        self.rows.append(row)
        self.finished += 1
        self.busy_seconds += seconds
        log(f"{PROG}: {run.label(len(self.runs))} done in {duration(seconds)}: accuracy {row['test_accuracy']:.3f}, "
            f"load CV {routing['load_cv']:.3f}, normalised entropy {routing['normalized_entropy']:.3f}; "
            + self.progress())

    def fail(self, run, why, seconds):
        message = tail(run.err)
        log(f"{PROG}: {run.label(len(self.runs))} FAILED ({why}) after {duration(seconds)}: {shlex.join(run.command)}"
            + (f"\n  end of {run.err}:\n{message}" if message else f"\n  ({run.err} is empty)"))
        self.rows.append({"method": run.method, "method_name": METHODS[run.method][0], "missing_rate": run.rate,
                          "seed": run.seed, "command": shlex.join(run.command),
                          "log": os.path.relpath(run.err, self.args.out), "error": why})
        self.failures.append(f"{METHODS[run.method][0]}, missing rate {run.rate:g}, seed {run.seed}: {why} "
                             f"(`{shlex.join(run.command)}`, log `{os.path.relpath(run.err, self.args.out)}`)")
        self.finished += 1
        self.busy_seconds += seconds
        log(f"{PROG}: " + self.progress())


# ---- the tables ----------------------------------------------------------------------------------

def value(row, key):
    return row["routing"][key] if key in dict(ROUTING) else row[key]



def successes(rows, method, rate):
    return [r for r in rows if r["method"] == method and r["missing_rate"] == rate and "error" not in r]


def markdown(args, context, rows, failures, images):
    epochs = plural(args.epochs, "epoch") if args.epochs else "the trainer's default epochs"
    lines = [
        "# Flex-MoE against zero imputation and ConfSMoE",
        "",
        f"Data `{os.path.relpath(args.data, REPO)}`, missing rates "
        f"{' '.join(f'{r:g}' for r in args.rates)}, seeds {' '.join(map(str, args.seeds))}, {epochs}, each run "
        "`flexmoe_train --json --report-routing` on one thread with the method's flags:",
        "",
        "| method | flags |",
        "|---|---|",
    ]
    for method in args.methods:
        lines.append(f"| {METHODS[method][0]} | `{' '.join(METHODS[method][1])}` |")
    lines += [
        "",
        "ConfSMoE is its confidence gate (no balancing loss) with both imputation stages: a missing view's "
        "features imputed as the mean of 10 observed training samples', then, after the experts, its tokens "
        "attending over the observed views' expert outputs (the top quarter of the weights kept). The ablations "
        "drop the second stage, or put the gate on Flex-MoE's learned missing-modality bank.",
        "",
        "Test metrics, and where the trained model routes the training samples' tokens "
        "(`--report-routing`): mean ± sample standard deviation over the seeds "
        "(one value when one seed succeeded). Load CV: std / mean of the per-expert token-expert assignment "
        "counts (0: perfectly even). Normalised entropy: entropy of the experts' load shares / ln E "
        "(1: perfectly even).",
    ]
    for rate in args.rates:
        lines += ["", f"## Missing rate {rate:g}", "",
                  "| method | seeds | accuracy | macro-F1 | AUC | load CV | normalised entropy |",
                  "|---|:---:|---:|---:|---:|---:|---:|"]
        for method in args.methods:
            ok = successes(rows, method, rate)
            cells = [METHODS[method][0], f"{len(ok)}/{len(args.seeds)}"]
            if ok:
                cells += [mean_std([value(r, key) for r in ok]) for key, _ in METRICS + ROUTING]
            else:
                cells += ["failed"] * (len(METRICS) + len(ROUTING))
            lines.append("| " + " | ".join(cells) + " |")
    if images:
        lines += ["", "## Plots", ""] + [f"![{alt}]({name})" for name, alt in images]
    lines += ["", "## Every run", "",
              "| method | missing rate | seed | accuracy | macro-F1 | AUC | load CV | normalised entropy "
              "| best epoch | seconds |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in args.rates:
        for method in args.methods:
            for seed in args.seeds:
                row = next((r for r in rows if r["method"] == method and r["missing_rate"] == rate
                            and r["seed"] == seed), None)
                cells = [METHODS[method][0], f"{rate:g}", str(seed)]
                if row is None:
                    cells += ["–"] * 7
                elif "error" in row:
                    cells += ["failed"] + [""] * 6
                else:
                    cells += [format(value(row, key), ".3f") for key, _ in METRICS + ROUTING]
                    best = row.get("best_epoch")
                    cells += [str(best) if isinstance(best, int) else "–", format(row["wall_seconds"], ".1f")]
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Context", ""] + [f"- {key}: {value}" for key, value in context.items()]
    if failures:
        lines += ["", "## Failed", ""] + [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"


# ---- the plots -----------------------------------------------------------------------------------

def line_plot(args, rows, key, ylabel, title, path):
    """One line per method: key's mean against the missing rate, error bars the sample std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    pad = max(0.05, 0.06 * (max(args.rates) - min(args.rates)))
    spread = max(args.rates) - min(args.rates) + 2 * pad  # the x axis' extent
    count = len(args.methods)
    for number, method in enumerate(args.methods):
        offset = (number - (count - 1) / 2) * 0.012 * spread  # keeps the error bars apart
        x, y, error = [], [], []
        for rate in args.rates:
            values = [value(r, key) for r in successes(rows, method, rate)]
            if values:
                x.append(rate + offset)
                y.append(statistics.mean(values))
                error.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        if x:
            axes.errorbar(x, y, yerr=error, marker="o", capsize=4, label=METHODS[method][0])
    axes.set_xlim(min(args.rates) - pad, max(args.rates) + pad)
    axes.set_xlabel("missing rate")
    axes.set_xticks(args.rates)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plots(args, rows):
    """The two line plots; returns ([(file name, alt text)], [why one was not drawn])."""
    drawn, problems = [], []
    if not any("error" not in r for r in rows):
        return drawn, ["no successful run: no plots"]
    seeds = plural(len(args.seeds), "seed")
    epochs = ", " + plural(args.epochs, "epoch") if args.epochs else ""
    data = os.path.basename(os.path.normpath(args.data))
    for name, key, ylabel, what in (
            ("accuracy_vs_missing.png", "test_accuracy", "test accuracy", "Test accuracy"),
            ("load_cv_vs_missing.png", "load_cv", "load CV (std / mean of expert counts)", "Expert load CV")):
        try:
            line_plot(args, rows, key, ylabel + (" (mean ± std)" if len(args.seeds) > 1 else ""),
                      f"{what} against the missing rate, {data} ({seeds}{epochs})", os.path.join(args.out, name))
            drawn.append((name, f"{what} against the missing rate"))
        except Exception as e:  # noqa: BLE001 - a plot must not lose the tables
            problems.append(f"{name}: {type(e).__name__}: {e}")
    return drawn, problems


def heatmaps(args, rows):
    """One routing heat map per method at the highest rate, seed 1 (or the first seed). Returns
    ([(file name, alt text)], [why one was not drawn], whether routing_heatmap.py failed)."""
    rate = max(args.rates)
    seed = 1 if 1 in args.seeds else args.seeds[0]
    drawn, problems, failed = [], [], False
    for method in args.methods:
        name = f"heatmap_{method}_{rate:g}.png"
        row = next((r for r in rows if r["method"] == method and r["missing_rate"] == rate and r["seed"] == seed), None)
        if row is None or "error" in row:
            problems.append(f"{name}: the run of seed {seed} failed")
            continue
        # from the row itself: a kept run's log may since have been replaced by another method's
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(row, f)
        command = [HEATMAP, f.name, "--out", os.path.join(args.out, name),
                   "--title", f"{METHODS[method][0]}: routing share per modality combination"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"{name}: cannot run {shlex.join(command)}: {e}")
            failed = True
            continue
        finally:
            os.remove(f.name)
        if done.returncode != 0:
            problems.append(f"{name}: {shlex.join(command)} failed: {done.stderr.strip()[-500:]}")
            failed = True
        else:
            drawn.append((name, f"{METHODS[method][0]}: routing at missing rate {rate:g}, seed {seed}"))
    return drawn, problems, failed


# ---- command line --------------------------------------------------------------------------------

def kept_runs(path, run_methods):
    """The successful rows of an earlier results.json whose gate and imputation match a method not run
    now, each given that method's key and name; and that run's context."""
    with open(path) as f:
        earlier = json.load(f)
    rows = []
    for row in earlier["rows"]:
        if "error" in row:
            continue
        method = next((key for key, (_, _, expect) in METHODS.items()
                       if all(row.get(k) == v for k, v in expect.items())), None)
        if method and method not in run_methods:
            rows.append(dict(row, method=method, method_name=METHODS[method][0]))
    return rows, earlier["context"]


def host_cpu():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def main(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.normpath(os.path.join(REPO, "..", "shared", "data", "handwritten")),
                        help="multi-view CSV directory (default ../shared/data/handwritten beside the repository)")
    parser.add_argument("--train", default=os.path.join(REPO, "build", "release", "examples", "flexmoe_train"),
                        help="the flexmoe_train binary (default build/release/examples/flexmoe_train)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7],
                        help="missing rates (default 0 0.3 0.5 0.7)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    parser.add_argument("--epochs", type=int, help="passed to flexmoe_train (default: its own)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "methods"), help="output folder (default bench/methods)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="which methods (default all: " + " ".join(METHODS) + ")")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one run may take (default 7200; 0: none)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other methods' runs from an existing OUT/results.json (above)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: redraw the tables and plots from OUT/results.json")
    args = parser.parse_args(argv)
    if any(not 0 <= r <= 1 for r in args.rates):
        parser.error("--rates must lie in [0, 1]")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be >= 0")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.timeout < 0:
        parser.error("--timeout must be >= 0")
    args.rates = sorted(dict.fromkeys(args.rates))
    args.seeds = list(dict.fromkeys(args.seeds))
    args.run_methods = [m for m in METHODS if m in args.methods]  # the table's order
    args.train, args.data, args.out = os.path.abspath(args.train), os.path.abspath(args.data), os.path.abspath(args.out)
    if args.report:
        return report_only(args, parser)
    kept_rows, kept_context = [], None
    if args.keep:
        try:
            kept_rows, kept_context = kept_runs(os.path.join(args.out, "results.json"), args.run_methods)
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--keep: cannot read {os.path.join(args.out, 'results.json')}: {e}")
    args.methods = [m for m in METHODS if m in args.run_methods or any(r["method"] == m for r in kept_rows)]
    if not (os.path.isfile(args.train) and os.access(args.train, os.X_OK)):
        parser.error(f"--train {args.train} is not an executable file (scripts/demo.sh builds "
                     "build/release/examples/flexmoe_train)")
    if not os.path.isdir(args.data):
        parser.error(f"--data {args.data} is not a directory")
    try:
        help_text = subprocess.run([args.train, "--help"], capture_output=True, text=True, timeout=60)
        help_text = help_text.stdout + help_text.stderr
    except (OSError, subprocess.SubprocessError) as e:
        parser.error(f"cannot run {args.train} --help: {e}")
    lacking = [flag for flag in ("--report-routing", "--gate", "--imputation") if flag not in help_text]
    if lacking:
        parser.error(f"{args.train} --help does not list {', '.join(lacking)}: rebuild it (ninja -C build/release)")
    extra = ["--threads", "1"] if "--threads N" in help_text or "\n  --threads" in help_text else []
    try:
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e.strerror or e}")
    if args.jobs > (os.cpu_count() or 1):
        log(f"{PROG}: warning: --jobs {args.jobs} on {os.cpu_count()} logical CPUs: the runs will slow each other")

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    grid = Grid(args, env, extra)
    kept = len(args.methods) - len(args.run_methods)
    log(f"{PROG}: {plural(len(grid.runs), 'run')} ({plural(len(args.run_methods), 'method')} x missing rates "
        f"{' '.join(f'{r:g}' for r in args.rates)} x seeds {' '.join(map(str, args.seeds))}), {args.jobs} at a time, "
        f"logs in {os.path.join(args.out, 'logs')}" + (f"; {plural(kept, 'method')} kept from the earlier results" if kept else ""))
    try:
        grid.run()
    except KeyboardInterrupt:
        log(f"{PROG}: interrupted; nothing written besides the logs")
        return 130

    context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": f"{host_cpu()}, {os.cpu_count()} logical CPUs",
        "flexmoe_train": args.train,
        "command": shlex.join([os.path.relpath(os.path.abspath(__file__), REPO)] + argv)
        + ("" if os.path.abspath(os.getcwd()) == REPO else f" (in {os.getcwd()})"),
        "jobs": args.jobs,
        "seconds": round(time.perf_counter() - grid.start, 1),
    }
    if kept_context:
        context["kept"] = {"methods": sorted({r["method"] for r in kept_rows}, key=list(METHODS).index),
                           "from": kept_context}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"context": context,
                   "methods": {m: {"name": METHODS[m][0], "flags": METHODS[m][1]} for m in args.methods},
                   "rows": kept_rows + grid.rows, "failures": grid.failures}, f, indent=1)
        f.write("\n")

    heat_failed = write_report(args, context, kept_rows + grid.rows, grid.failures)
    log(f"{PROG}: wrote {os.path.join(args.out, 'results.json')}"
        + (f"; {len(grid.failures)} of {len(grid.runs)} runs failed" if grid.failures else ""))
    return 1 if grid.failures or heat_failed else 0


def report_only(args, parser):
    """--report: the tables and plots of OUT/results.json, its rates, seeds and methods."""
    path = os.path.join(args.out, "results.json")
    try:
        rows, context = kept_runs(path, [])
        with open(path) as f:
            failures = json.load(f).get("failures", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--report: cannot read {path}: {e}")
    if not rows:
        parser.error(f"--report: {path} holds no successful run")
    args.rates = sorted({r["missing_rate"] for r in rows})
    args.seeds = sorted({r["seed"] for r in rows})
    args.methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    args.epochs = next((r["epochs"] for r in rows if isinstance(r.get("epochs"), int)), args.epochs)
    return 1 if write_report(args, context, rows, failures) else 0


def write_report(args, context, rows, failures):
    """methods.md and the plots and heat maps; prints methods.md. Returns whether a heat map failed."""
    names = ["accuracy_vs_missing.png", "load_cv_vs_missing.png"] + \
            [f"heatmap_{m}_{max(args.rates):g}.png" for m in args.methods]
    for name in names:  # not an earlier run's
        with contextlib.suppress(OSError):
            os.remove(os.path.join(args.out, name))
    images, problems = plots(args, rows)
    heat_failed = False
    if any("error" not in r for r in rows):
        more, heat_problems, heat_failed = heatmaps(args, rows)
        images += more
        problems += heat_problems
    text = markdown(args, context, rows, failures, images)
    with open(os.path.join(args.out, "methods.md"), "w") as f:
        f.write(text)
    print(text, end="")
    for problem in problems:
        log(f"{PROG}: not drawn: {problem}")
    log(f"{PROG}: wrote {os.path.join(args.out, 'methods.md')}" + "".join(", " + name for name, _ in images))
    return heat_failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

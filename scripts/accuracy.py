#!/usr/bin/python3
"""The accuracy and throughput table of flexmoe_train against the PyTorch reference trained the same
way (scripts/train_reference.py), on the same splits from the same initial weights.

    scripts/accuracy.py [--data DIR] [--train PATH] [--rates 0.0 0.3 0.5] [--seeds 1 2 3]
                        [--epochs N] [--out DIR] [--timeout SECONDS]

For each missing rate and seed:
  1. FLEXMOE_TRAIN --data DIR --missing-rate P --seed S --export-problem TMP/problem.safetensors
     writes the problem (data, splits, initial weights, recipe) and exits;
  2. FLEXMOE_TRAIN --data DIR --missing-rate P --seed S --json, and
     scripts/train_reference.py TMP/problem.safetensors --json
     run side by side, one process (one thread) per core, so that their throughputs are measured in
     the same minute; each prints one JSON line (test_accuracy, test_macro_f1, test_macro_auc,
     train_samples_per_second, best_epoch, ...).
--epochs N goes to all three commands. Dropout, gate noise and shuffles come from each side's own
generator, so the two runs of a seed are two draws of the same recipe, not the same draws.

The torch side runs OpenBLAS on the kernels scripts/bench.sh picks: an inherited
OPENBLAS_CORETYPE is replaced by what scripts/openblas_coretype.sh prints (usually nothing: OpenBLAS
chooses its best kernels itself), as the benchmarks do.

Writes OUT/results.json (every run's JSON line, or its error, and the context), OUT/accuracy.md
(mean ± sample std over the seeds per missing rate, and each configuration's throughput ratio
flexmoe / torch) and, when matplotlib is there, OUT/accuracy.png (test accuracy against the missing
rate); prints the table. Progress goes to stderr. Exit status 0, 1 when a run failed (the tables
hold the others), 2 for a bad command line."""
import argparse
import contextlib
import datetime
import json
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
PROG = "accuracy.py"
REFERENCE = os.path.join(REPO, "scripts", "train_reference.py")
IMPLS = ("flexmoe", "torch")
REQUIRED = ("test_accuracy", "test_macro_f1", "test_macro_auc", "best_epoch")
METRICS = (("test_accuracy", "accuracy"), ("test_macro_f1", "macro-F1"), ("test_macro_auc", "AUC"))
POLL_SECONDS = 0.5
REPORT_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal




def child_environment():
    """The children's environment: one thread per library, and OPENBLAS_CORETYPE as scripts/bench.sh
    sets it. Returns (env, a sentence saying what was done with OPENBLAS_CORETYPE)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    inherited = env.pop("OPENBLAS_CORETYPE", None)
    try:
        done = subprocess.run([os.path.join(REPO, "scripts", "openblas_coretype.sh")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        coretype = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        coretype = None
    if coretype is None:
        if inherited is not None:
            env["OPENBLAS_CORETYPE"] = inherited
        return env, (f"scripts/openblas_coretype.sh failed; OPENBLAS_CORETYPE "
                     f"{'=' + inherited + ' kept' if inherited else 'left unset'}")
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    said = f"OPENBLAS_CORETYPE={coretype}" if coretype else "OPENBLAS_CORETYPE unset (OpenBLAS's own choice)"
    if inherited is not None and inherited != coretype:
        said += f", not the inherited {inherited}"
    return env, said


def parse_result(path, impl):
    """The last JSON line of a run's stdout; (row, None) or (None, why not)."""
    row, why = last_json_object(path)
    if why:
        return None, why
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        return None, f"its JSON line lacks {', '.join(missing)}"
    bad = [key for key in REQUIRED[:3] if not isinstance(row[key], (int, float)) or not 0 <= row[key] <= 1]
    if bad:
        return None, "its JSON line has " + ", ".join(f"{key} {row[key]!r}" for key in bad) + " (not in [0, 1])"
    sps = row.get("train_samples_per_second")
    if not isinstance(sps, (int, float)) or not sps > 0:
        row["train_samples_per_second"] = None
    return dict(row, impl=impl), None


class Grid:
    """The runs of every configuration, with their progress on stderr."""

    def __init__(self, args, env):
        self.args, self.env = args, env
        self.tty = sys.stderr.isatty()
        self.configurations = [(rate, seed) for rate in args.rates for seed in args.seeds]
        self.rows, self.pairs, self.failures = [], [], []
        self.start = time.perf_counter()

    def common(self, rate, seed):
        command = [self.args.train, "--data", self.args.data, "--missing-rate", f"{rate:g}", "--seed", str(seed)]
        return command + (["--epochs", str(self.args.epochs)] if self.args.epochs else [])

    def fail(self, rate, seed, impls, what):
        """Records a failed run (or both, when the export failed) and says so on stderr."""
        log(f"{PROG}: missing rate {rate:g} seed {seed}: {what}")
        for impl in impls:
            self.rows.append({"impl": impl, "missing_rate": rate, "seed": seed, "error": what.splitlines()[0]})
        self.failures.append(f"missing rate {rate:g}, seed {seed}: {what.splitlines()[0]}")

    def label(self, index, rate, seed):
        return f"[{index}/{len(self.configurations)}] missing {rate:g} seed {seed}"

    def run(self):
        with tempfile.TemporaryDirectory(prefix="flexmoe-accuracy-") as tmp:
            for index, (rate, seed) in enumerate(self.configurations, start=1):
                self.configuration(tmp, index, rate, seed)
                done = time.perf_counter() - self.start
                left = done / index * (len(self.configurations) - index)
                log(f"{PROG}: {index} of {len(self.configurations)} configurations in {done:.0f} s"
                    + (f", about {left:.0f} s left" if index < len(self.configurations) else ""))

    def configuration(self, tmp, index, rate, seed):
        label = self.label(index, rate, seed)
        problem = os.path.join(tmp, "problem.safetensors")
        with contextlib.suppress(OSError):
            os.remove(problem)
        export = self.common(rate, seed) + ["--export-problem", problem]
        log(f"{label}: exporting the problem")
        started = time.perf_counter()
        try:
            done = subprocess.run(export, env=self.env, capture_output=True, text=True, timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            return self.fail(rate, seed, IMPLS, f"the export took over {self.args.timeout} s: {shlex.join(export)}")
        except OSError as e:
            return self.fail(rate, seed, IMPLS, f"cannot run {shlex.join(export)}: {e}")
        if done.returncode != 0 or not os.path.exists(problem):
            why = f"exit status {done.returncode}" if done.returncode else "it wrote no problem file"
            message = done.stderr.strip().splitlines()[-15:]
            return self.fail(rate, seed, IMPLS, f"the export failed ({why}): {shlex.join(export)}"
                             + "".join("\n    " + line for line in message))
        commands = {"flexmoe": self.common(rate, seed) + ["--json"],
                    "torch": [REFERENCE, problem, "--json"]
                    + (["--epochs", str(self.args.epochs)] if self.args.epochs else [])}
        log(f"{label}: problem written in {time.perf_counter() - started:.1f} s; training flexmoe and torch side by side")
        results = self.side_by_side(tmp, label, commands)
        ok = {}
        for impl, (row, error) in results.items():
            if error:
                self.fail(rate, seed, (impl,), f"{impl}: {error}")
                continue
            row["missing_rate"], row["seed"] = rate, seed  # the configuration's (a float32 0.3 may print 0.300000012)
            row["command"] = shlex.join(commands[impl])
            self.rows.append(row)
            ok[impl] = row
        if len(ok) == 2:
            fm, th = ok["flexmoe"]["train_samples_per_second"], ok["torch"]["train_samples_per_second"]
            ratio = fm / th if fm and th else None
            self.pairs.append({"missing_rate": rate, "seed": seed, "flexmoe_samples_per_second": fm,
                               "torch_samples_per_second": th, "ratio": ratio})
            log(f"{label}: flexmoe accuracy {ok['flexmoe']['test_accuracy']:.3f} at {number(fm, '.0f')} samples/s, "
                f"torch {ok['torch']['test_accuracy']:.3f} at {number(th, '.0f')} samples/s: "
                f"{number(ratio, '.2f')}x" + ("" if ratio else " (a run gave no train_samples_per_second)"))

    def side_by_side(self, tmp, label, commands):
        """Runs the commands at once, stdout and stderr to files; impl -> (row, error)."""
        processes, files, ended = {}, {}, {}
        started = time.perf_counter()
        for impl, command in commands.items():
            files[impl] = (os.path.join(tmp, f"{impl}.out"), os.path.join(tmp, f"{impl}.err"))
            with open(files[impl][0], "w") as out, open(files[impl][1], "w") as err:
                try:
                    processes[impl] = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                                       env=self.env)
                except OSError as e:
                    ended[impl] = (None, f"cannot run {shlex.join(command)}: {e}")
        def state(end):
            if end is None:
                return "running"
            return "failed" if end[1] else f"done at {end[0]:.0f} s"

        last_report = started
        while len(ended) < len(commands):
            time.sleep(POLL_SECONDS)
            now = time.perf_counter()
            for impl, process in processes.items():
                if impl in ended:
                    continue
                if process.poll() is not None:
                    ended[impl] = (now - started, None)
                elif self.args.timeout and now - started > self.args.timeout:
                    process.kill()
                    process.wait()
                    ended[impl] = (None, f"killed after {self.args.timeout} s: {shlex.join(commands[impl])}")
            status = ", ".join(f"{impl} {state(ended.get(impl))}" for impl in commands)
            if self.tty:
                log(f"\r{label}: {now - started:.0f} s ({status})   ", end="")
            elif now - last_report >= REPORT_EVERY:
                log(f"{label}: {now - started:.0f} s ({status})")
                last_report = now
        if self.tty:
            log("")
        results = {}
        for impl, command in commands.items():
            seconds, error = ended[impl]
            if error:
                results[impl] = (None, error)
                continue
            code = processes[impl].returncode
            if code != 0:
                message = tail(files[impl][1])
                results[impl] = (None, f"exit status {code}: {shlex.join(command)}" + ("\n" + message if message else ""))
                continue
            row, why = parse_result(files[impl][0], impl)
            if why:
                message = tail(files[impl][1])
                results[impl] = (None, f"{why}: {shlex.join(command)}" + ("\n" + message if message else ""))
            else:
                row["wall_seconds"] = round(seconds, 2)
                results[impl] = (row, None)
        return results


# ---- the tables ----------------------------------------------------------------------------------

def number(value, spec):
    return "–" if value is None else format(value, spec)



def summary(rows, pairs, rates):
    """Per missing rate: the seeds counted per impl and each column's values."""
    table = []
    for rate in rates:
        ok = {impl: [r for r in rows if r["impl"] == impl and r["missing_rate"] == rate and "error" not in r]
              for impl in IMPLS}
        entry = {"missing_rate": rate, "runs": {impl: len(ok[impl]) for impl in IMPLS}}
        for key, _ in METRICS + (("train_samples_per_second", ""),):
            for impl in IMPLS:
                entry[f"{impl}.{key}"] = [r[key] for r in ok[impl]]
        entry["ratio"] = [p["ratio"] for p in pairs if p["missing_rate"] == rate]
        table.append(entry)
    return table


def markdown(args, context, rows, pairs, failures):
    """accuracy.md's text."""
    table = summary(rows, pairs, args.rates)
    epochs = f"{args.epochs} epochs" if args.epochs else "the trainer's default epochs"
    lines = [
        "# Flex-MoE in C (flexmoe) against the PyTorch reference, trained the same way",
        "",
        f"Data `{os.path.relpath(args.data, REPO)}`, missing rates {' '.join(f'{r:g}' for r in args.rates)}, seeds "
        f"{' '.join(str(s) for s in args.seeds)}, {epochs}. Each configuration's two runs start from the same "
        "initial weights on the same splits (`flexmoe_train --export-problem`) and follow the same recipe "
        "(curriculum warm-up, Adam, dropout, noisy gate, model selection on validation accuracy); dropout, "
        "gate noise and shuffles come from each side's own generator. Test metrics: mean ± sample standard "
        "deviation over the seeds. Throughput: training samples per second (forward, backward and Adam; "
        "evaluation excluded) on one thread each, the two runs of a configuration side by side on two "
        "cores; flexmoe / torch is the mean ± std of each configuration's ratio.",
        "",
        "| missing rate | seeds (flexmoe / torch) | accuracy flexmoe | accuracy torch | macro-F1 flexmoe "
        "| macro-F1 torch | AUC flexmoe | AUC torch | samples/s flexmoe | samples/s torch | flexmoe / torch |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in table:
        cells = [f"{entry['missing_rate']:g}", f"{entry['runs']['flexmoe']} / {entry['runs']['torch']}"]
        for key, _ in METRICS:
            cells += [mean_std(entry[f"{impl}.{key}"]) for impl in IMPLS]
        cells += [mean_std(entry[f"{impl}.train_samples_per_second"], ".0f") for impl in IMPLS]
        cells.append(mean_std(entry["ratio"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Each configuration", "",
              "| missing rate | seed | accuracy flexmoe | accuracy torch | best epoch flexmoe | best epoch torch "
              "| samples/s flexmoe | samples/s torch | flexmoe / torch |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in args.rates:
        for seed in args.seeds:
            found = {impl: next((r for r in rows if r["impl"] == impl and r["missing_rate"] == rate
                                 and r["seed"] == seed), None) for impl in IMPLS}
            pair = next((p for p in pairs if p["missing_rate"] == rate and p["seed"] == seed), None)

            def cell(impl, key, spec):
                row = found[impl]
                if row is None:
                    return "–"
                return "failed" if "error" in row else number(row.get(key), spec)

            lines.append("| " + " | ".join(
                [f"{rate:g}", str(seed), cell("flexmoe", "test_accuracy", ".3f"), cell("torch", "test_accuracy", ".3f"),
                 cell("flexmoe", "best_epoch", "d"), cell("torch", "best_epoch", "d"),
                 cell("flexmoe", "train_samples_per_second", ".0f"), cell("torch", "train_samples_per_second", ".0f"),
                 number(pair and pair["ratio"], ".2f")]) + " |")
    lines += ["", "## Context", ""] + [f"- {key}: {value}" for key, value in context.items()]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"


def plot(args, rows, pairs, path):
    """accuracy.png: test accuracy against the missing rate, mean ± std per impl. Returns why it
    was not drawn (no matplotlib, no successful run), or None when it was."""
    if not any("error" not in row for row in rows):
        return "no successful run: no accuracy.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no matplotlib: no accuracy.png"
    figure, axes = plt.subplots(figsize=(6, 4))
    offset = 0.004 * (max(args.rates) - min(args.rates) or 1)
    for side, impl in zip((-1, 1), IMPLS):
        x, y, error = [], [], []
        for entry in summary(rows, pairs, args.rates):
            values = entry[f"{impl}.test_accuracy"]
            if values:
                x.append(entry["missing_rate"] + side * offset)
                y.append(statistics.mean(values))
                error.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        if x:
            axes.errorbar(x, y, yerr=error, marker="o", capsize=4, label=impl)
    axes.set_xlabel("missing rate")
    axes.set_ylabel("test accuracy (mean ± std over seeds)")
    axes.set_title(f"Flex-MoE, {os.path.basename(os.path.normpath(args.data))}: flexmoe and torch")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# ---- command line --------------------------------------------------------------------------------

def main(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.normpath(os.path.join(REPO, "..", "shared", "data", "handwritten")),
                        help="multi-view CSV directory (default ../shared/data/handwritten beside the repository)")
    parser.add_argument("--train", default=os.path.join(REPO, "build", "release", "examples", "flexmoe_train"),
                        help="the flexmoe_train binary (default build/release/examples/flexmoe_train)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.3, 0.5], help="missing rates (default 0 0.3 0.5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    parser.add_argument("--epochs", type=int, help="epochs for both trainers (default: flexmoe_train's)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "accuracy"), help="output folder (default bench/accuracy)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one run may take (default 7200)")
    args = parser.parse_args(argv)
    if any(not 0 <= r <= 1 for r in args.rates):
        parser.error("--rates must lie in [0, 1]")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be >= 0")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    args.rates, args.seeds = list(dict.fromkeys(args.rates)), list(dict.fromkeys(args.seeds))
    args.train, args.data = os.path.abspath(args.train), os.path.abspath(args.data)
    if not (os.path.isfile(args.train) and os.access(args.train, os.X_OK)):
        parser.error(f"--train {args.train} is not an executable file (scripts/demo.sh builds "
                     "build/release/examples/flexmoe_train)")
    if not os.path.isdir(args.data):
        parser.error(f"--data {args.data} is not a directory")
    if not os.access(REFERENCE, os.X_OK):
        parser.error(f"{REFERENCE} is not executable")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e}")

    env, blas = child_environment()
    log(f"{PROG}: {args.train} against {os.path.relpath(REFERENCE, os.getcwd())} on {args.data}: "
        f"missing rates {' '.join(f'{r:g}' for r in args.rates)} x seeds {' '.join(map(str, args.seeds))}; {blas}")
    grid = Grid(args, env)
    grid.run()

    torch_rows = [r for r in grid.rows if r["impl"] == "torch" and "error" not in r]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": f"{cpu}, {os.cpu_count()} logical CPUs",
        "flexmoe_train": args.train,
        "torch": ", ".join(sorted({f"torch {r.get('torch', '?')}, {r.get('blas', '?')}" for r in torch_rows})) or "–",
        "blas environment": blas,
        "command": shlex.join([os.path.relpath(__file__, os.getcwd())] + argv),
        "seconds": round(time.perf_counter() - grid.start, 1),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"context": context, "rows": grid.rows, "pairs": grid.pairs, "failures": grid.failures}, f, indent=1)
        f.write("\n")
    text = markdown(args, context, grid.rows, grid.pairs, grid.failures)
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(text)
    png = os.path.join(args.out, "accuracy.png")
    with contextlib.suppress(OSError):
        os.remove(png)  # not one of an earlier run
    not_drawn = plot(args, grid.rows, grid.pairs, png)
    print(text, end="")
    log(f"{PROG}: wrote {os.path.join(args.out, 'results.json')}, accuracy.md"
        + (f" ({not_drawn})" if not_drawn else ", accuracy.png")
        + (f"; {len(grid.failures)} run(s) failed" if grid.failures else ""))
    return 1 if grid.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

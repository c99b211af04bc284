"""What scripts/accuracy.py and scripts/compare_methods.py share about the runs they start: progress
on stderr, the end of a run's log, the run's JSON result line, and a column of mean ± std."""
import json
import statistics
import sys


def log(text, end="\n"):
    print(text, file=sys.stderr, end=end, flush=True)


def tail(path, lines=15):
    """The last lines of a text file, indented, or '' when it is empty or absent."""
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


def last_json_object(path):
    """The last non-empty line of a run's stdout file as a JSON object: (row, None) or (None, why not)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        return None, f"cannot read its output: {e.strerror or e}"
    if not lines:
        return None, "it printed no JSON line"
    try:
        row = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None, f"its last line is not JSON: {lines[-1][:200]!r}"
    if not isinstance(row, dict):
        return None, "its JSON line is not an object"
    return row, None


def mean_std(values, spec=".3f"):
    """'mean ± sample std' of the values (None skipped; no std for one value, '–' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"

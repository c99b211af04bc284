#!/usr/bin/env bash
# flexmoe_train's checkpoints end to end, on the synthetic task: a run of 4 epochs, against 2
# epochs saved and resumed for the other 2, give the same result line (but the timings); --eval
# of the resumed run's checkpoint gives its test scores; a truncated or foreign checkpoint is
# refused with a message and exit status 1, the file left as it was. Usage: train_cli.sh [BINARY]
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build/release/examples/flexmoe_train}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
failures=0
check() { # check NAME CONDITION-COMMAND...
  local name=$1; shift
  if "$@"; then echo "ok: $name"; else echo "FAIL: $name"; failures=$((failures + 1)); fi
}
# the result line without its timings
scores() { python3 -c 'import json,sys; r=json.loads(sys.stdin.readline()); [r.pop(k) for k in ("seconds","train_samples_per_second")]; print(json.dumps(r, sort_keys=True))'; }

straight=$("$bin" --epochs 4 --warmup 1 --json | scores)
"$bin" --epochs 2 --warmup 1 --save "$dir/run.safetensors" --json >/dev/null
resumed=$("$bin" --epochs 4 --warmup 1 --resume "$dir/run.safetensors" --save "$dir/run.safetensors" --json | scores)
echo "straight: $straight"
echo "resumed:  $resumed"
check "4 epochs straight = 2 saved + 2 resumed" test -n "$straight" -a "$straight" = "$resumed"
evaluated=$("$bin" --eval "$dir/run.safetensors" --json | scores)
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
check "--eval gives the resumed run's test accuracy" test "$(field "$evaluated" test_accuracy)" = "$(field "$resumed" test_accuracy)"
check "--eval gives the resumed run's AUC" test "$(field "$evaluated" test_macro_auc)" = "$(field "$resumed" test_macro_auc)"

# the checkpoint through an independent safetensors reader (tests/model_reference.py's), zlib's CRC-32
/usr/bin/python3 - "$dir/run.safetensors" <<'PY' >"$dir/reader" 2>&1
import json, struct, sys, zlib
sys.path.insert(0, "tests")
from model_reference import read_safetensors
path = sys.argv[1]
tensors, meta = read_safetensors(path)
blob = open(path, "rb").read()
(n,) = struct.unpack_from("<Q", blob)
config, training = json.loads(meta["config"]), json.loads(meta["training"])
E, d, H = config["experts"], config["dim"], config["hidden"]
assert meta["format"] == "flexmoe.checkpoint" and meta["version"] == "1", meta
assert format(zlib.crc32(blob[8 + n:]), "08x") == meta["crc32"], "crc32"
assert (8 + n) % 8 == 0, "data alignment"
assert tuple(tensors["moe.w1"].shape) == (E, d, H) and tuple(tensors["moe.w2"].shape) == (E, H, d), "expert shapes"
assert training["epoch"] == 4 and training["best_epoch"] >= 1, training
params = [k for k in tensors if not k.startswith(("adam.", "best."))]
assert all("adam.m." + k in tensors and "adam.v." + k in tensors and "best." + k in tensors for k in params)
print(f"read {len(tensors)} tensors, config {config['features']}, epoch {training['epoch']}")
PY
rc=$?
cat "$dir/reader"
check "an independent safetensors reader reads the checkpoint (names, shapes, crc32, metadata)" test $rc -eq 0

head -c 1000 "$dir/run.safetensors" > "$dir/truncated.safetensors"
cp "$dir/truncated.safetensors" "$dir/before"
"$bin" --resume "$dir/truncated.safetensors" --epochs 3 --json >"$dir/out" 2>"$dir/err"
rc=$?
cat "$dir/err"
check "a truncated checkpoint: exit status 1" test $rc -eq 1
check "a truncated checkpoint: the message says so" grep -q "truncated" "$dir/err"
check "a truncated checkpoint: nothing on stdout" test ! -s "$dir/out"
check "a truncated checkpoint: the file untouched" cmp -s "$dir/truncated.safetensors" "$dir/before"
printf '{"a": 1}' > "$dir/foreign.json"
"$bin" --eval "$dir/foreign.json" 2>"$dir/err" >/dev/null
rc=$?
cat "$dir/err"
check "a foreign file: exit status 1 and a message" test $rc -eq 1 -a -s "$dir/err"
"$bin" --resume "$dir/run.safetensors" --data ../shared/data/handwritten --epochs 5 2>"$dir/err" >/dev/null
rc=$?
cat "$dir/err"
check "a checkpoint of other data: exit status 1, the message says so" test $rc -eq 1 -a -n "$(grep 'does not fit' "$dir/err")"
# ConfSMoE with both imputation stages: its choices survive a save, --eval reads them back
confsmoe=$("$bin" --epochs 2 --warmup 1 --gate confidence --imputation two-stage --impute-keep 0.5 \
  --save "$dir/confsmoe.safetensors" --json | scores)
check "ConfSMoE (two-stage): the result line says so" test "$(field "$confsmoe" imputation)" = two-stage
check "ConfSMoE (two-stage): --eval of its checkpoint gives its test accuracy" \
  test "$(field "$("$bin" --eval "$dir/confsmoe.safetensors" --json | scores)" test_accuracy)" = "$(field "$confsmoe" test_accuracy)"
"$bin" --impute-keep 0.5 2>"$dir/err" >/dev/null
rc=$?
check "--impute-keep without two-stage: exit status 2 and a message" test $rc -eq 2 -a -n "$(grep 'needs --imputation two-stage' "$dir/err")"
echo "train_cli: $((13 - failures)) passed, $failures failed"
[ $failures -eq 0 ]

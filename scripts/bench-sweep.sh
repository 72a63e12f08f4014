#!/usr/bin/env bash
# A whole sweep both ways (issue #18): `coordinator run` with one local CPU worker, and the same
# sweep scripted with transformers (scripts/bench_sweep.py: one process, one forward per prompt,
# as PruneMe + lm-eval-style loops run it), on the same machine one after the other, then one
# table: per cell the layers each side dropped, its metrics and seconds, and the two wall times.
#
#   REF_PYTHON=<venv: pip install torch transformers gguf pyyaml> scripts/bench-sweep.sh [SWEEP.yaml]
#
# Default sweep: experiments/bench-sweep.yaml. Both sides start cold: ours from an empty output
# folder (no stored results), with the release binaries already built (the build is not timed);
# theirs with the model load included. Set SKIP_REF=1 to time prunesweep alone.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=${1:-experiments/bench-sweep.yaml}
scripts/fetch-model.sh >/dev/null
data=${PRUNESWEEP_DATA:-$(cd .. && pwd)/shared/data}
cargo build --release -q -p prunesweep-coordinator -p prunesweep-worker
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo +changes), $(nproc) cores of $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >&2
start=$(date +%s.%N)
target/release/coordinator run "$sweep" --workers 1 --out "$work/ours" >"$work/ours.log" 2>&1 || {
  tail -20 "$work/ours.log" >&2
  exit 1
}
end=$(date +%s.%N)
awk -v s="$start" -v e="$end" 'BEGIN { printf "SWEEP prunesweep seconds=%.1f\n", e - s }' >"$work/lines"
py=${REF_PYTHON:-python3}
if [ -z "${SKIP_REF:-}" ] && "$py" -c 'import transformers, torch, gguf, yaml' 2>/dev/null; then
  "$py" scripts/bench_sweep.py "$sweep" "$data" 2>"$work/ref.err" | tee -a "$work/lines" >&2 || {
    tail -20 "$work/ref.err" >&2
    exit 1
  }
elif [ -z "${SKIP_REF:-}" ]; then
  echo "(no torch/transformers/gguf/pyyaml in $py: set REF_PYTHON to compare, or SKIP_REF=1)" >&2
fi
python3 - "$work/ours/results.csv" "$work/lines" <<'PY'
import csv, sys
from collections import defaultdict

TASKS = [("c4-loss", "loss"), ("boolq", "accuracy"), ("mmlu-cloze", "accuracy")]
ours = defaultdict(dict)  # (method, fraction) -> {...}
for r in csv.DictReader(open(sys.argv[1])):
    if r["kind"] not in ("baseline", "cell"):
        continue
    key = ("unpruned", 0.0) if r["kind"] == "baseline" else (r["method"], float(r["fraction"]))
    cell = ours[key]
    layers = r["layers_dropped"].split(",")
    cell["dropped"] = f"{layers[0]}-{layers[-1]}" if r["layers_dropped"] else "-"
    cell["seconds"] = float(r["seconds"])
    for task, metric in TASKS:
        if r["task"] == task and r["metric"] == metric:
            cell[task] = float(r["value"])
theirs, walls = {}, {}
for line in open(sys.argv[2]):
    f = line.split()
    if f[0] == "SWEEP":
        walls[f[1]] = float(f[2].split("=")[1])
    elif f[0] == "CELL":
        kv = dict(x.split("=") for x in f[4:])
        theirs[(f[2], float(f[3]))] = {"dropped": kv["dropped"], "seconds": float(kv["seconds"]),
                                       **{t: float(kv[t]) for t, _ in TASKS if t in kv}}
fmt = "{:<9} {:>5} {:>8} {:>10} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}"
print(fmt.format("method", "frac", "dropped", "dropped HF", "c4", "c4 HF", "boolq", "HF", "cloze", "HF", "s", "s HF"))
def g(d, k, spec):
    return format(d[k], spec) if k in d else "-"
for key in sorted(ours, key=lambda k: (k[0] != "unpruned", k)):
    o, t = ours[key], theirs.get(key, {})
    print(fmt.format(key[0], key[1], o["dropped"], t.get("dropped", "-"), g(o, "c4-loss", ".4f"), g(t, "c4-loss", ".4f"),
                     g(o, "boolq", ".4f"), g(t, "boolq", ".4f"), g(o, "mmlu-cloze", ".4f"), g(t, "mmlu-cloze", ".4f"),
                     g(o, "seconds", ".1f"), g(t, "seconds", ".1f")))
ours_s = walls["prunesweep"]
line = f"whole sweep, wall: prunesweep {ours_s:.1f} s"
if "transformers" in walls:
    line += f", transformers {walls['transformers']:.1f} s: {walls['transformers'] / ours_s:.2f}x"
print(line)
PY

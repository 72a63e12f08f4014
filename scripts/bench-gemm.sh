#!/usr/bin/env bash
# f32 GEMM throughput at SmolLM2-135M's projection shapes (x Wᵀ, M rows): candle (what the worker
# runs) and, when a Python with torch is available (REF_PYTHON, default `python3`), torch's
# F.linear, in one table. The model-level ratios in results/ depend mostly on this one: torch's BLAS
# (MKL in PyPI wheels) is much faster on some CPUs than on others. "candle" is the product as the
# worker computes it (a long-input weight stored as Wᵀ row-major), "Wt view" the same product with
# Wᵀ a transposed view (the layout gemm reads slower on some CPUs); the ratio is candle's to torch's.
#   REF_PYTHON=~/venv/bin/python scripts/bench-gemm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${BENCH_ROWS:-1024}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
BENCH_ROWS=$rows cargo bench -q -p prunesweep-worker --bench gemm 2>/dev/null | grep '^BENCH' >"$out"
py=${REF_PYTHON:-python3}
if "$py" -c 'import torch' 2>/dev/null; then
  "$py" scripts/bench_gemm.py "$rows" 2>/dev/null | grep '^BENCH' >>"$out"
else
  echo "(no torch in $py: set REF_PYTHON to compare)" >&2
fi
printf '%-18s %14s %14s %14s %8s\n' "M x K x N" "candle GFLOP/s" "Wt view" "torch GFLOP/s" ratio
awk '{ sub("gflops=", "", $6); key = $3 "x" $4 "x" $5; g[$2, key] = $6; if (!(key in seen)) { seen[key] = 1; keys[++n] = key } }
  END { for (i = 1; i <= n; i++) { k = keys[i]; c = g["candle", k]; v = g["candle-view", k]; t = g["torch", k];
    r = (c != "" && t != "") ? sprintf("%.2fx", c / t) : "-";
    printf "%-18s %14s %14s %14s %8s\n", k, c, (v == "" ? "-" : v), (t == "" ? "-" : t), r } }' "$out"

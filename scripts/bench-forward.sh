#!/usr/bin/env bash
# Prefill tokens/s of SmolLM2-135M (f32, CPU): prunesweep and, when a Python with transformers is
# available (REF_PYTHON, default `python3`), HF transformers on the same token ids, in one table.
#   scripts/bench-forward.sh                  # 256 tokens, median of 5
#   REF_PYTHON=~/venv/bin/python BENCH_TOKENS=512 scripts/bench-forward.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
export PRUNESWEEP_SMOLLM2=${PRUNESWEEP_SMOLLM2:-$PWD/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ids=$(mktemp)
out=$(mktemp)
trap 'rm -f "$ids" "$out"' EXIT
BENCH_IDS_OUT=$ids cargo bench -q -p prunesweep-worker --bench forward 2>/dev/null | grep '^BENCH' >"$out"
py=${REF_PYTHON:-python3}
if "$py" -c 'import transformers, torch, gguf' 2>/dev/null; then
  "$py" scripts/bench_forward.py "$PRUNESWEEP_SMOLLM2" "$ids" "${BENCH_REPEATS:-5}" 2>/dev/null | grep '^BENCH' >>"$out"
else
  echo "(no transformers in $py: set REF_PYTHON to compare)" >&2
fi
scripts/bench-table.sh "$out" transformers-forward-all-logits

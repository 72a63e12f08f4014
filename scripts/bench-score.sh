#!/usr/bin/env bash
# Scoring throughput on SmolLM2-135M (f32, CPU): prunesweep `score_layers` and, when a Python with
# transformers is available (REF_PYTHON, default `python3`), transformers with output_hidden_states
# over the same documents (first 64 C4 docs × 128 tokens, batches of 8), in one table. Two
# transformers rows: the bare decoder (`base`, the ratio's reference) and the CausalLM (`causal-lm`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
export PRUNESWEEP_SMOLLM2=${PRUNESWEEP_SMOLLM2:-$PWD/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
export PRUNESWEEP_DATA=${PRUNESWEEP_DATA:-$(cd .. && pwd)/shared/data}
docs=${BENCH_DOCS:-64} seq=${BENCH_SEQ_LEN:-128} batch=${BENCH_BATCH:-8}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo bench -q -p prunesweep-worker --bench score 2>/dev/null | grep '^BENCH' >"$out"
py=${REF_PYTHON:-python3}
if "$py" -c 'import transformers, torch, gguf' 2>/dev/null; then
  "$py" scripts/bench_score.py "$PRUNESWEEP_SMOLLM2" "$PRUNESWEEP_DATA/c4/c4-en-train.00000-of-01024.first1000.jsonl" \
    "$docs" "$seq" "$batch" "${BENCH_REPEATS:-3}" base 2>/dev/null | grep '^BENCH' >>"$out"
  "$py" scripts/bench_score.py "$PRUNESWEEP_SMOLLM2" "$PRUNESWEEP_DATA/c4/c4-en-train.00000-of-01024.first1000.jsonl" \
    "$docs" "$seq" "$batch" "${BENCH_REPEATS:-3}" causal-lm 2>/dev/null | grep '^BENCH' >>"$out"
else
  echo "(no transformers in $py: set REF_PYTHON to compare)" >&2
fi
scripts/bench-table.sh "$out" transformers-score-base

#!/usr/bin/env bash
# Evaluation throughput on SmolLM2-135M (f32, CPU): MMLU 5-shot letter (first 5 questions of each
# of the 57 subjects = 285), BoolQ (first 200), MMLU cloze (first 2 of each subject = 114) and C4
# loss (64 documents from 600, 256 tokens), for prunesweep and, when a Python with
# transformers is available (REF_PYTHON, default `python3`), a plain transformers loop (one forward
# per full prompt or sequence, as lm-eval-harness does), in one table. Accuracies (C4: the loss)
# are printed too: both sides must agree.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
export PRUNESWEEP_SMOLLM2=${PRUNESWEEP_SMOLLM2:-$PWD/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
export PRUNESWEEP_DATA=${PRUNESWEEP_DATA:-$(cd .. && pwd)/shared/data}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo bench -q -p prunesweep-worker --bench eval 2>/dev/null | grep -E '^(BENCH|ACC)' >"$out"
py=${REF_PYTHON:-python3}
if "$py" -c 'import transformers, torch, gguf' 2>/dev/null; then
  "$py" scripts/bench_eval.py "$PRUNESWEEP_SMOLLM2" "$PRUNESWEEP_DATA" mmlu --per-subject 5 2>/dev/null | grep -E '^(BENCH|ACC)' >>"$out"
  "$py" scripts/bench_eval.py "$PRUNESWEEP_SMOLLM2" "$PRUNESWEEP_DATA" boolq --limit 200 2>/dev/null | grep -E '^(BENCH|ACC)' >>"$out"
  "$py" scripts/bench_eval.py "$PRUNESWEEP_SMOLLM2" "$PRUNESWEEP_DATA" cloze --per-subject 2 2>/dev/null | grep -E '^(BENCH|ACC)' >>"$out"
  "$py" scripts/bench_eval.py "$PRUNESWEEP_SMOLLM2" "$PRUNESWEEP_DATA" c4 --limit 64 --first-doc 600 --seq-len 256 2>/dev/null | grep -E '^(BENCH|ACC)' >>"$out"
else
  echo "(no transformers in $py: set REF_PYTHON to compare)" >&2
fi
printf '%-24s %9s %8s %9s %8s %9s %8s %12s\n' case questions tokens seconds q/s tok/s "vs HF" "accuracy"
awk '
  /^ACC/ { sub("accuracy=", "", $3); acc[$2] = $3; next }
  { for (i = 3; i <= NF; i++) { split($i, kv, "="); v[$2, kv[1]] = kv[2] } cases[++n] = $2 }
  END {
    for (i = 1; i <= n; i++) {
      c = cases[i]; task = c; sub(/^[a-z]+-/, "", task)
      ref = v["transformers-" task, "q_s"]
      ratio = (ref != "") ? sprintf("%.2fx", v[c, "q_s"] / ref) : "-"
      printf "%-24s %9s %8s %9s %8s %9s %8s %12s\n", c, v[c, "questions"], v[c, "tokens"], v[c, "seconds"], v[c, "q_s"], v[c, "tok_s"], ratio, acc[c]
    }
  }' "$out"

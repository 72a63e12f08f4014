#!/usr/bin/env bash
# Healing throughput and memory on SmolLM2-135M (CPU, f32 compute): `worker heal` with the NF4 base
# (QLoRA) and with the dense base (--no-quantize, plain LoRA), each as `worker heal` runs by default
# (--keep-graphs fit: the top blocks keep their activations as far as free memory holds them, the
# rest are recomputed; the "graphs" column says how many were kept), with every block recomputed
# (--keep-graphs 0: the least memory, rows ending in -recompute) and with none (--no-recompute,
# rows ending in -keep), and, when a Python with
# torch + transformers + peft is available (REF_PYTHON, default python3), torch + PEFT LoRA on the
# same packed C4 data, in one table. Settings: seq SEQ_LEN (default 256), micro-batch MICRO_BATCH
# (default 4; one update per micro-batch), LoRA r=64 on gate/up/down, STEPS timed updates after
# one untimed warm-up update.
# Peak memory is the process's maximum RSS (GNU time / getrusage). The NF4 row also reports the
# frozen base's bytes per parameter (quantized projections only; embedding and norms stay f32).
# PEFT="plain ckpt" adds torch + PEFT with transformers' gradient checkpointing (transformers-peft-ckpt),
# the like-for-like row for prunesweep's default recomputation; the seq-2048 comparison uses it.
# Usage: [SEQ_LEN=256] [MICRO_BATCH=4] [CASES="nf4 nf4-recompute nf4-keep f32 f32-recompute f32-keep"] [PEFT="plain"]
#        scripts/bench-heal.sh [STEPS]
#        (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
seq_len=${SEQ_LEN:-256}
micro=${MICRO_BATCH:-4}
cases=${CASES:-nf4 nf4-recompute nf4-keep f32 f32-recompute f32-keep}
peft_cases=${PEFT:-plain}
gguf=$(scripts/fetch-model.sh)
data=${PRUNESWEEP_DATA:-$(cd .. && pwd)/shared/data}/c4/c4-en-train.00000-of-01024.first1000.jsonl
cargo build -q --release -p prunesweep-worker --bin worker
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
row() { # name, extra flags
  local name=$1; shift
  /usr/bin/time -f '%M' -o "$tmp/$name.rss" target/release/worker heal --model "$gguf" --data "$data" \
    --steps $((steps + 1)) --batch "$micro" --micro-batch "$micro" --seq-len "$seq_len" --rank 64 --warmup 1 \
    --checkpoint-every 100000 --out "$tmp/$name" "$@" 2>/dev/null >/dev/null
  # Timed: updates 2..STEPS+1 (the log's seconds are cumulative from the first update's start).
  local info
  info=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); n=j["nf4"]
print("%s %s" % ("%.4f" % n["bytes_per_param"] if n else "-", j.get("kept_graphs", "-")))' "$tmp/$name/prunesweep.json")
  awk -F, -v name="$name" -v rss="$(cat "$tmp/$name.rss")" -v bpp="${info% *}" -v graphs="${info#* }" '
    NR == 2 { t0 = $6; k0 = $5 } END {
      printf "BENCH %s steps=%d tokens=%d seconds=%.2f tok_s=%.1f peak_rss_mib=%.0f bytes_per_param=%s graphs=%s\n",
        name, NR - 2, $5 - k0, $6 - t0, ($5 - k0) / ($6 - t0), rss / 1024, bpp, graphs }' "$tmp/$name/train_log.csv"
}
{
  for c in $cases; do
    case $c in
      nf4) row prunesweep-qlora-nf4 ;;
      nf4-recompute) row prunesweep-qlora-nf4-recompute --keep-graphs 0 ;;
      nf4-keep) row prunesweep-qlora-nf4-keep --no-recompute ;;
      f32) row prunesweep-lora-f32 --no-quantize ;;
      f32-recompute) row prunesweep-lora-f32-recompute --no-quantize --keep-graphs 0 ;;
      f32-keep) row prunesweep-lora-f32-keep --no-quantize --no-recompute ;;
      *) echo "unknown case $c (nf4, nf4-recompute, nf4-keep, f32, f32-recompute, f32-keep)" >&2; exit 2 ;;
    esac
  done
  py=${REF_PYTHON:-python3}
  if "$py" -c 'import transformers, torch, gguf, peft' 2>/dev/null; then
    for p in $peft_cases; do
      case $p in
        plain) "$py" scripts/bench_heal.py "$gguf" "$data" "$steps" "$seq_len" "$micro" 64 2>/dev/null | grep '^BENCH' ;;
        ckpt) "$py" scripts/bench_heal.py "$gguf" "$data" "$steps" "$seq_len" "$micro" 64 checkpointing 2>/dev/null |
          grep '^BENCH' ;;
        *) echo "unknown PEFT case $p (plain, ckpt)" >&2; exit 2 ;;
      esac
    done
  else
    echo "(no torch/transformers/peft in $py: set REF_PYTHON to compare)" >&2
  fi
} >"$tmp/rows"
echo "seq $seq_len, micro-batch $micro, $steps timed updates"
printf '%-31s %6s %8s %9s %8s %9s %14s %12s %7s\n' case steps tokens seconds tok/s "vs peft" "peak RSS MiB" "base B/param" graphs
awk '{ for (i = 3; i <= NF; i++) { split($i, kv, "="); v[$2, kv[1]] = kv[2] } cases[++n] = $2 }
  END {
    # Against plain PEFT, or against PEFT with checkpointing when that is the only PEFT row.
    ref = v["transformers-peft", "tok_s"]; if (ref == "") ref = v["transformers-peft-ckpt", "tok_s"]
    for (i = 1; i <= n; i++) {
      c = cases[i]; r = (ref != "") ? sprintf("%.2fx", v[c, "tok_s"] / ref) : "-"
      b = (v[c, "bytes_per_param"] != "") ? v[c, "bytes_per_param"] : "-"
      g = (v[c, "graphs"] != "") ? v[c, "graphs"] : "-"
      printf "%-31s %6s %8s %9s %8s %9s %14s %12s %7s\n", c, v[c, "steps"], v[c, "tokens"], v[c, "seconds"], v[c, "tok_s"], r, v[c, "peak_rss_mib"], b, g
    }
  }' "$tmp/rows"

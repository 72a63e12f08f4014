#!/usr/bin/env bash
# PEFT interoperability of `worker heal` on SmolLM2: prune 6 layers (20:6) to an HF directory,
# heal it for a few updates (NF4 base, LoRA on gate/up/down), then check that HF PEFT loads the
# adapter folder onto the pruned base and gives the logits that `worker forward --adapter` gives.
# Needs a Python with torch, transformers, peft, safetensors (REF_PYTHON, default python3).
# With `phi3` as second argument it checks the tiny Phi-3 fixture instead, with adapters on every
# module PEFT targets there (qkv_proj, o_proj, gate_up_proj, down_proj: two of them fused).
# Usage: scripts/check-peft.sh [STEPS] [phi3]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
py=${REF_PYTHON:-python3}
data=${PRUNESWEEP_DATA:-$(cd .. && pwd)/shared/data}/c4/c4-en-train.00000-of-01024.first1000.jsonl
cargo build -q --release -p prunesweep-worker --bin worker
worker=target/release/worker
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ ${2:-} == phi3 ]]; then
  base=worker/tests/fixtures/tiny-phi3
  $worker heal --model "$base" --data "$data" --steps "$steps" --batch 2 --micro-batch 2 --seq-len 32 \
    --rank 4 --lr 1e-2 --warmup 1 --targets all-linear --out "$tmp/adapter"
  printf 'Phi-3 fuses its projections; PEFT adapts the fused modules.' >"$tmp/prompt.txt"
  $worker forward --model "$base" --adapter "$tmp/adapter" --prompt-file "$tmp/prompt.txt" --out "$tmp/forward.safetensors"
  exec "$py" scripts/reference/check_peft_adapter.py --base "$base" --adapter "$tmp/adapter" --forward "$tmp/forward.safetensors"
fi
gguf=$(scripts/fetch-model.sh)
$worker prune --model "$gguf" --layers 20:6 --out "$tmp/pruned" >/dev/null
$worker heal --model "$tmp/pruned" --data "$data" --steps "$steps" --batch 4 --micro-batch 4 --seq-len 64 \
  --rank 16 --lr 1e-3 --warmup 1 --out "$tmp/adapter"
printf 'The quick brown fox jumps over the lazy dog. Healing closes the seam between the layers.' >"$tmp/prompt.txt"
$worker forward --model "$tmp/pruned" --adapter "$tmp/adapter" --prompt-file "$tmp/prompt.txt" --out "$tmp/forward.safetensors"
"$py" scripts/reference/check_peft_adapter.py --base "$tmp/pruned" --adapter "$tmp/adapter" --forward "$tmp/forward.safetensors"

#!/usr/bin/env bash
# The memory model against measured peaks (worker/tests/memory.rs): real `worker serve` processes
# run one heal cell each (deepest cut, QLoRA one update on an NF4 base, c4-loss), and their peak
# RSS is compared with the CPU prediction `coordinator plan` shows for the job — tiny-llama (the
# process's own memory), SmolLM2-135M, two random llamas, and the ignored one: Llama-2-70B's layer
# shapes with 2 of its 80 layers (~10 GiB of memory, 4.5 GB of temporary disk, minutes). Then the
# 70B plan for one H200 (README "Memory model").
#
#   scripts/memory-model.sh            # → results/memory-model.txt
set -euo pipefail
cd "$(dirname "$0")/.."
export PRUNESWEEP_DATA=${PRUNESWEEP_DATA:-$(realpath ../shared/data)}
OUT=${OUT:-results/memory-model.txt}
{
    echo "# scripts/memory-model.sh, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
    echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "# cargo test -p prunesweep-worker --test memory -- --include-ignored --nocapture --test-threads 1"
    cargo test -q -p prunesweep-worker --test memory -- --include-ignored --nocapture --test-threads 1 2>&1 \
        | grep -E '^memory-model|^test |test result'
    echo
    echo "# cargo run -q -p prunesweep-coordinator -- plan experiments/llama2-70b-memory.yaml"
    cargo run -q -p prunesweep-coordinator -- plan experiments/llama2-70b-memory.yaml
} | tee "$OUT"

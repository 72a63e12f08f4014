#!/usr/bin/env bash
# Peak host memory (max RSS) of loading a model from an HF safetensors directory and running one
# short forward pass, in f32 and in bf16: SmolLM2-135M written as an f32 HF directory (~540 MB) by
# `worker prune --n 0`. The model itself takes ~540 MB in f32 and ~270 MB in bf16; what loading
# adds beyond that is the point (tensor by tensor: one tensor, the largest being the 113 MB
# embedding).
#
#   scripts/bench-load.sh                     # the release worker in target/release
#   WORKER_BIN=/path/to/worker scripts/bench-load.sh   # another build (e.g. an older commit)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKER_BIN=${WORKER_BIN:-target/release/worker}
[ -x "$WORKER_BIN" ] || cargo build --release -p prunesweep-worker
GGUF=${PRUNESWEEP_SMOLLM2:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$GGUF" ] || scripts/fetch-model.sh
WORK=${BENCH_DIR:-target/bench-load}
mkdir -p "$WORK"
if [ ! -f "$WORK/smollm2-hf/model.safetensors" ]; then
    "$WORKER_BIN" prune --model "$GGUF" --n 0 --method deepest --out "$WORK/smollm2-hf" >/dev/null 2>&1
fi
echo "The deeper layers of a language model can often be removed." > "$WORK/prompt.txt"
size=$(stat -c %s "$WORK/smollm2-hf/model.safetensors")
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $WORKER_BIN; checkpoint $((size / 1048576)) MiB (f32)"
echo "| dtype | max RSS (MiB) | wall (s) |"
echo "| --- | --- | --- |"
for dtype in f32 bf16; do
    /usr/bin/time -f "%M %e" -o "$WORK/time.txt" \
        "$WORKER_BIN" forward --model "$WORK/smollm2-hf" --dtype "$dtype" --prompt-file "$WORK/prompt.txt" \
        --out "$WORK/out-$dtype.safetensors" >/dev/null 2>&1
    read -r rss wall < "$WORK/time.txt"
    echo "| $dtype | $((rss / 1024)) | $wall |"
done

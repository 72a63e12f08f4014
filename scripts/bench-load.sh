#!/usr/bin/env bash
# Peak host memory (max RSS) of loading a model from an HF safetensors directory and running one
# short forward pass, in f32 and in bf16: SmolLM2-135M written as an f32 HF directory (~540 MB) by
# `worker prune --n 0`. The model itself takes ~540 MB in f32 and ~270 MB in bf16; what loading
# adds beyond that is the point (tensor by tensor: one tensor, the largest being the 113 MB
# embedding). Then scoring (32 C4 documents × 128 tokens) with the model loaded and with
# `--streamed` (one block on the device at a time): the same CSV, and the peak of each.
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
DATA=${PRUNESWEEP_DATA:-../shared/data}/c4/c4-en-train.00000-of-01024.first1000.jsonl
echo
echo "| worker score, 32 docs × 128 tokens, f32 | max RSS (MiB) | wall (s) |"
echo "| --- | --- | --- |"
for mode in loaded streamed; do
    flag=(); [ "$mode" = streamed ] && flag=(--streamed)
    /usr/bin/time -f "%M %e" -o "$WORK/time.txt" \
        "$WORKER_BIN" score "${flag[@]}" --model "$WORK/smollm2-hf" --dtype f32 --data "$DATA" --samples 32 \
        --seq-len 128 --out "$WORK/distances-$mode.csv" >/dev/null 2>&1
    read -r rss wall < "$WORK/time.txt"
    echo "| $mode | $((rss / 1024)) | $wall |"
done
cmp -s "$WORK/distances-loaded.csv" "$WORK/distances-streamed.csv" && echo "(the two distance CSVs are identical)" \
    || echo "(the two distance CSVs DIFFER)"

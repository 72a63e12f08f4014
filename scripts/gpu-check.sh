#!/usr/bin/env bash
# The one prepared GPU check (issue 13, item 4): the CUDA worker on one GPU against the CPU f32
# path and against torch (+ PEFT) on the same GPU, in one go, in under 10 minutes on an H200.
#
#   scripts/gpu-check.sh                                   # the real check, on cuda:0
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 scripts/gpu-check.sh   # the CPU dry run (toy sizes)
#
# Steps (each timed; a failing step is a row in the table and the others still run):
#   (a) SmolLM2 `worker forward` on the device (bf16) vs on the CPU in f32: logits rel err
#       max|Δ|/max|ref| ≤ 0.08, argmax agreement ≥ 0.9.
#   (b) `worker score`, 256 C4 documents × 512 tokens, device vs CPU f32: max |Δd| ≤ 0.005,
#       l*(n) equal where the f32 margin is clear; tokens/s of each.
#   (c) `worker eval` full MMLU 5-shot (14,042 questions) and full BoolQ on the device: accuracy
#       and time; predictions vs the CPU f32 run committed in results/smollm2-baseline/ (when the
#       model is that Q4_1 GGUF) and vs a CPU f32 run of a cheap subset made here (run last).
#   (d) a random-weight checkpoint with Llama-2-7B's shapes made on the GPU by
#       scripts/gpu/make_random_llama.py; forward tokens/s (ours: `worker eval --task c4-loss`;
#       torch: scripts/gpu/torch_side.py forward, same documents and ids, bf16, SDPA), the same
#       forward holding 4 GiB of blocks and reading the rest from the checkpoint for each pass
#       (`--hold-gib`: the loss must equal the whole load's, with its tok/s and peak), the same
#       forward with the blocks spread over two devices (`--device cuda:0,cuda:1`, or the one device
#       listed twice: the loss must equal one device's), and 50
#       healing steps at seq 2048, micro-batch 4, r 64, FFN targets: tokens/s and peak GPU memory
#       (nvidia-smi polled every 200 ms), ours vs torch + PEFT. QLoRA on both sides when
#       bitsandbytes imports; else plain LoRA on the bf16 base on both (ours with --no-quantize),
#       plus ours in QLoRA as an extra row when time is left.
#
# Environment:
#   GPU_CHECK_DEVICE   cuda:N (default cuda:0) or cpu (the dry run: the "device" side is then
#                      --device cpu --dtype bf16, the GPU code path on the CPU)
#   GPU_CHECK_SMALL    1: toy sizes (tiny-llama fixture for a-c, 8 MMLU/BoolQ items, a 2-layer
#                      random llama, 3 healing steps)
#   GPU_CHECK_BUDGET_S whole-run time budget in seconds (default 570); steps are cut (timeout)
#                      or skipped to stay inside it
#   SMOLLM2            the SmolLM2-135M-Instruct model (GGUF file, HF dir, hub cache folder or HF id);
#                      default: $PRUNESWEEP_SMOLLM2, .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf,
#                      shared/models/…, the HF hub cache. Absent: (a)-(c) are SKIP rows.
#   PRUNESWEEP_DATA    the shared data (c4/, mmlu/, boolq/); default: the first of ../shared/data,
#                      shared/data, /work/shared/data that exists
#   WORKER             the worker command to use as is (default: the CUDA build — target/cuda/
#                      worker-cuda.gz unpacked to the scratch folder, started through
#                      scripts/cuda/worker-cuda, or target/cuda/release/worker; on cpu
#                      target/release/worker, else target/debug/worker)
#   PYTHON             python with numpy (and torch, transformers, peft for the torch side;
#                      default python3)
#   OUT / GPU_CHECK_OUT  where the table and logs go (default results/gpu-check, or
#                      results/gpu-check/cpu-dry-run on cpu); GPU_CHECK_OUT wins over OUT
#   GPU_CHECK_COMMIT   the commit to name in the table (default: git's, when the tree is a checkout)
#   GPU_CHECK_SCRATCH  big files: the unpacked binary, logits, the 13.5 GB random checkpoint,
#                      adapters (default $TMPDIR or /tmp, /prunesweep-gpu-check); removed at the
#                      end unless GPU_CHECK_KEEP=1
# Output: table.md (also printed), steps.tsv, rows.tsv, logs/*.log, *.json in the output folder.
# Exit status: 0 when every check passed, 1 when a row is FAIL (the table is written either way).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

DEVICE="${GPU_CHECK_DEVICE:-cuda:0}"
SMALL="${GPU_CHECK_SMALL:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    # the python with torch when there is one (the box's may be `python`), else python3
    PY=python3
    for p in python3 python; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' 2>/dev/null; then PY="$p"; break; fi
    done
fi
if [[ "$DEVICE" == cpu ]]; then default_out="$repo/results/gpu-check/cpu-dry-run"; else default_out="$repo/results/gpu-check"; fi
out="${GPU_CHECK_OUT:-${OUT:-$default_out}}"
scratch="${GPU_CHECK_SCRATCH:-${TMPDIR:-/tmp}/prunesweep-gpu-check}"
mkdir -p "$out/logs" "$scratch"
out="$(cd "$out" && pwd)"
rows="$out/rows.tsv"
steps="$out/steps.tsv"
: >"$rows"
: >"$steps"
T0=$(date +%s)
export T0

log() { printf '[gpu-check %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(($(date +%s) - T0))" "$*" >&2; }
remaining() { echo $((BUDGET - ($(date +%s) - T0))); }
# row PART CHECK RESULT GOAL VERDICT NOTE
row() { local IFS=$'\t'; printf '%s\n' "$*" | tr -d '\r' >>"$rows"; }
# jget FILE KEY [FORMAT]: a top-level field of a JSON file ("?" when missing)
jget() {
    "$PY" - "$@" <<'EOF' 2>/dev/null || echo "?"
import json, sys
d = json.load(open(sys.argv[1]))
v = d
for k in sys.argv[2].split("."):
    v = v[k] if not isinstance(v, list) else v[int(k)]
fmt = sys.argv[3] if len(sys.argv) > 3 else "{}"
print(fmt.format(v))
EOF
}
calc() { "$PY" -c "import math; print($1)" 2>/dev/null || echo "n/a"; }

# --- device, binary, python ---------------------------------------------------------------------
gpu_index=0
[[ "$DEVICE" == cuda:* ]] && gpu_index="${DEVICE#cuda:}"
on_gpu=0
[[ "$DEVICE" == cuda* ]] && on_gpu=1
torch_device="$DEVICE"
[[ "$DEVICE" == cuda ]] && torch_device=cuda:0

worker=()
worker_desc=""
if [[ -n "${WORKER:-}" ]]; then
    read -r -a worker <<<"$WORKER"
    worker_desc="$WORKER"
elif ((on_gpu == 0)); then
    for b in target/release/worker target/debug/worker; do
        if [[ -x "$b" ]]; then worker=("$repo/$b"); worker_desc="$b"; break; fi
    done
else
    bin=""
    gz="${WORKER_GZ:-$repo/target/cuda/worker-cuda.gz}"
    if [[ -f "$gz" ]]; then
        bin="$scratch/worker"
        if gunzip -c "$gz" >"$bin.tmp" && chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin"; then
            worker_desc="$(basename "$gz") (unpacked)"
        else
            bin=""
        fi
    elif [[ -x "$repo/target/cuda/release/worker" ]]; then
        bin="$repo/target/cuda/release/worker"
        worker_desc="target/cuda/release/worker"
    fi
    if [[ -n "$bin" && -x "$repo/scripts/cuda/worker-cuda" ]]; then
        worker=(env "PRUNESWEEP_WORKER_BIN=$bin" "PRUNESWEEP_PYTHON=$PY" "$repo/scripts/cuda/worker-cuda")
        worker_desc="$worker_desc via scripts/cuda/worker-cuda"
    elif [[ -n "$bin" ]]; then
        # No launcher: put the PyTorch cu130 wheels' library folder on LD_LIBRARY_PATH ourselves.
        culib="$("$PY" -c 'import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "cu13", "lib")
    if os.path.isdir(d): print(d); break' 2>/dev/null || true)"
        [[ -n "$culib" ]] && export LD_LIBRARY_PATH="$culib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        worker=("$bin")
        worker_desc="$worker_desc (LD_LIBRARY_PATH += ${culib:-nothing found})"
    fi
fi
if ((${#worker[@]} == 0)); then
    # every worker step then fails with this message, and the table is still written
    msg="gpu-check: no worker binary (build target/cuda/worker-cuda.gz with scripts/build-cuda.sh, or set WORKER)"
    echo "$msg" >&2
    worker=(sh -c "echo \"$msg\" >&2; exit 127" --)
    worker_desc="none found"
fi

has_py=0; has_numpy=0; has_torch=0; has_peft=0; has_bnb=0
if command -v "$PY" >/dev/null 2>&1; then
    has_py=1
    "$PY" -c 'import numpy' 2>/dev/null && has_numpy=1
    "$PY" -c 'import torch, transformers, tokenizers' 2>/dev/null && has_torch=1
    ((has_torch)) && "$PY" -c 'import peft' 2>/dev/null && has_peft=1
    ((has_torch)) && "$PY" -c 'import bitsandbytes' 2>/dev/null && has_bnb=1
fi
py_versions="$("$PY" - <<'EOF' 2>/dev/null || echo "no python"
import importlib, sys
out = ["python " + sys.version.split()[0]]
for m in ("numpy", "torch", "transformers", "peft", "bitsandbytes", "tokenizers"):
    try:
        out.append(f"{m} {importlib.import_module(m).__version__}")
    except Exception:
        out.append(f"{m} absent")
print(", ".join(out))
EOF
)"

# --- data and models ----------------------------------------------------------------------------
data="${PRUNESWEEP_DATA:-}"
if [[ -z "$data" ]]; then
    for d in ../shared/data shared/data .cache/shared/data /work/shared/data; do
        if [[ -d "$d/c4" || -d "$d/mmlu" ]]; then data="$(cd "$d" && pwd)"; break; fi
    done
fi
c4="$data/c4/c4-en-train.00000-of-01024.first1000.jsonl"
[[ -n "$data" && -f "$c4" ]] || c4=""

smol="${SMOLLM2:-${PRUNESWEEP_SMOLLM2:-}}"
# The GGUF (94 MiB) is over what one device call carries (64 MiB): it may come in pieces
# (split -b 40M FILE FILE.part-), carried over several calls; they are joined here and checked
# against the sha256 scripts/fetch-model.sh pins.
smol_note=""
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
if [[ -z "$smol" && ! -f ".cache/models/$gguf_name" ]] && compgen -G ".cache/models/$gguf_name.part-*" >/dev/null; then
    want_sha="$(sed -n 's/^sha=\([0-9a-f]*\)$/\1/p' scripts/fetch-model.sh | head -n1)"
    cat ".cache/models/$gguf_name".part-* >"$scratch/$gguf_name"
    got_sha="$(sha256sum "$scratch/$gguf_name" | cut -d' ' -f1)"
    if [[ -z "$want_sha" || "$got_sha" == "$want_sha" ]]; then
        smol="$scratch/$gguf_name"
    else
        echo "gpu-check: the joined .cache/models/$gguf_name.part-* have sha256 $got_sha, not $want_sha (a piece is missing?)" >&2
        smol_note="joined GGUF pieces have the wrong sha256 (a piece missing?)"
    fi
fi
if [[ -z "$smol" ]]; then
    for m in .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        "${data:-/nonexistent}/../models/SmolLM2-135M-Instruct.Q4_1.gguf"; do
        if [[ -f "$m" ]]; then smol="$m"; break; fi
    done
fi
if [[ -z "$smol" ]]; then
    for hub in "${HF_HUB_CACHE:-}" "${HF_HOME:-$HOME/.cache/huggingface}/hub"; do
        if [[ -n "$hub" && -d "$hub/models--HuggingFaceTB--SmolLM2-135M-Instruct" ]]; then
            smol="$hub/models--HuggingFaceTB--SmolLM2-135M-Instruct"; break
        fi
    done
fi
if [[ "$SMALL" == 1 ]]; then
    model_ac="$repo/worker/tests/fixtures/tiny-llama"
    model_ac_desc="tiny-llama fixture (4 layers, hidden 64, vocab 320)"
else
    model_ac="$smol"
    model_ac_desc="SmolLM2-135M-Instruct: ${smol:-absent${smol_note:+ ($smol_note)}}"
    model_ac_desc="${model_ac_desc//$scratch/\$SCRATCH}"
    model_ac_desc="${model_ac_desc//$repo\//}"
fi

# (c) needs a tokenizer where " A".." D" and " yes"/" no" differ in their first token: the tiny
# fixtures' byte-level tokenizers do not, so the dry run evaluates SmolLM2 when it is at hand,
# else tiny-llama on MMLU cloze (and no BoolQ).
model_c="$model_ac"; model_c_desc="$model_ac_desc"; mmlu_task=mmlu; boolq_ok=1
if [[ "$SMALL" == 1 ]]; then
    if [[ -n "$smol" ]]; then
        model_c="$smol"; model_c_desc="SmolLM2-135M-Instruct: ${smol#"$repo"/}"
    else
        mmlu_task=mmlu-cloze; boolq_ok=0
    fi
fi

# sizes
if [[ "$SMALL" == 1 ]]; then
    logit_tol=0.15   # tiny random models: near-uniform logits (worker/tests/bf16.rs)
    b_samples=16; b_seq=64; b_batch_dev=8
    c_mmlu_args=(--limit 8); c_boolq_args=(--limit 8)
    c_ref_mmlu_args=(--limit 8); c_ref_boolq_args=(--limit 8)
    d_shape=(--hidden 64 --layers 2 --heads 4 --intermediate 172 --vocab 32000)
    d_fwd_docs=8; d_seq=128; d_batch=4; d_steps=3; d_rank=8; d_hold_gib=0.0001
else
    logit_tol=0.08
    b_samples=256; b_seq=512; b_batch_dev=32
    c_mmlu_args=(); c_boolq_args=()
    c_ref_mmlu_args=(--limit-per-subject 3); c_ref_boolq_args=(--limit 200)
    d_shape=()
    d_fwd_docs=64; d_seq=2048; d_batch=4; d_steps=50; d_rank=64; d_hold_gib=4
fi
dist_tol=0.005
((on_gpu)) || dist_tol=0.002   # bf16 vs f32 on the same CPU: the tests' tolerance

# --- peak memory polling, timed commands ---------------------------------------------------------
mem_baseline=0
if ((on_gpu)) && command -v nvidia-smi >/dev/null 2>&1; then
    mem_baseline="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu_index" 2>/dev/null | head -n1 | tr -d ' ' || echo 0)"
    [[ "$mem_baseline" =~ ^[0-9]+$ ]] || mem_baseline=0
fi

# run_cmd NAME CAP RESERVE CMD...: runs CMD under `timeout` for min(CAP, remaining − RESERVE)
# seconds; stdout+stderr to logs/NAME.log (stdout to $STDOUT_TO when set). Appends
# NAME, exit, seconds, peak memory, command to steps.tsv; on failure also a FAIL row. Writes
# NAME.secs and NAME.peak (MiB: GPU memory above the start's when on a GPU, else peak RSS) to
# $out/logs. Returns the command's exit status (124: cut by the time limit; 125: skipped).
run_cmd() {
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left t logf="$out/logs/$name.log" rc=0 poll="" start end secs peak="" part="${PART:-?}"
    left=$(($(remaining) - reserve))
    t=$((cap < left ? cap : left))
    local shown="$*"
    shown="${shown//$scratch/\$SCRATCH}"
    shown="${shown//$repo\//}"
    if ((t < 15)); then
        log "$name: skipped (time budget: ${left}s left after the reserve)"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" "0" "" "$shown" >>"$steps"
        row "$part" "$name" "skipped: out of time budget" "" "SKIP" "budget ${BUDGET}s"
        return 125
    fi
    log "$name: $shown (limit ${t}s)"
    if ((on_gpu)) && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu_index" -lms 200 \
            >"$out/logs/$name.mem" 2>/dev/null &
        poll=$!
    fi
    local timer=()
    if ((on_gpu == 0)) && [[ -x /usr/bin/time ]]; then timer=(/usr/bin/time -f %M -o "$out/logs/$name.rss"); fi
    start=$(date +%s.%N)
    set +e
    if [[ -n "${STDOUT_TO:-}" ]]; then
        timeout -k 15 "$t" "${timer[@]}" "$@" >"$STDOUT_TO" 2>"$logf"
    else
        timeout -k 15 "$t" "${timer[@]}" "$@" >"$logf" 2>&1
    fi
    rc=$?
    set -e
    end=$(date +%s.%N)
    if [[ -n "$poll" ]]; then
        kill "$poll" 2>/dev/null || true
        wait "$poll" 2>/dev/null || true
        local max
        max="$(grep -Eo '^[0-9]+' "$out/logs/$name.mem" | sort -n | tail -n1 || true)"
        [[ -n "$max" ]] && peak="$((max - mem_baseline))"
    elif [[ -s "$out/logs/$name.rss" ]]; then
        local kb
        kb="$(grep -Eo '^[0-9]+$' "$out/logs/$name.rss" | tail -n1 || true)"
        [[ -n "$kb" ]] && peak="$((kb / 1024))"
    fi
    secs="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')"
    echo "$secs" >"$out/logs/$name.secs"
    echo "$peak" >"$out/logs/$name.peak"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$peak" "$shown" >>"$steps"
    if ((rc != 0)); then
        local why="exit $rc"
        ((rc == 124 || rc == 137)) && why="cut at the ${t}s limit (exit $rc)"
        local err
        err="$(first_error "$logf")"
        row "$part" "$name" "$why" "exit 0" "FAIL" "logs/$name.log${err:+: $err}"
        log "$name: $why"
    else
        log "$name: ok in ${secs}s"
    fi
    return "$rc"
}
# first_error LOG: the line that says what went wrong (a Python traceback's last line, else the
# first error-looking line: Rust's `Error: …`, a panic, an out-of-memory message)
first_error() {
    local f="$1"
    if grep -q '^Traceback' "$f" 2>/dev/null; then
        grep -v '^\s*$' "$f" | tail -n1 | cut -c1-220
    else
        local e
        e="$(grep -m1 -iE '^Error|panicked at|out of memory|CUDA_ERROR|cannot|not found|No such' "$f" 2>/dev/null || true)"
        [[ -n "$e" ]] || e="$(grep -v '^\s*$' "$f" 2>/dev/null | grep -v ' INFO ' | head -n1 || true)"
        printf '%s\n' "$e" | cut -c1-220
    fi
}
secs_of() { cat "$out/logs/$1.secs" 2>/dev/null || echo "?"; }
peak_of() { local p; p="$(cat "$out/logs/$1.peak" 2>/dev/null || true)"; if [[ -n "$p" ]]; then echo "$p MiB"; else echo "n/a"; fi; }
peak_label() { if ((on_gpu)); then echo "peak GPU memory (nvidia-smi, above the start's ${mem_baseline} MiB)"; else echo "peak host RSS (CPU dry run)"; fi; }

# run_part NAME FUNCTION: runs the part in a subshell with errexit; a failure is a row
run_part() {
    local name="$1" fn="$2" rc=0
    log "=== part $name"
    set +e
    (
        set -euo pipefail
        export PART="$name"
        "$fn"
    ) >>"$out/logs/part-$name.log" 2>&1
    rc=$?
    set -e
    if ((rc != 0)); then
        local err
        err="$(first_error "$out/logs/part-$name.log")"
        row "$name" "part $name stopped early" "exit $rc" "complete" "FAIL" "logs/part-$name.log${err:+: $err}"
        log "part $name stopped early (exit $rc)"
    fi
    return 0
}

dev_args=(--device "$DEVICE" --dtype bf16)
cpu_args=(--device cpu --dtype f32)

# --- (a) forward -----------------------------------------------------------------------------------
part_a() {
    if [[ -z "$model_ac" ]]; then
        row a "SmolLM2 forward, device vs CPU f32" "SKIP: no SmolLM2 (set SMOLLM2=path to the GGUF or HF dir)" "" "SKIP" ""
        return 0
    fi
    cat >"$scratch/prompt.txt" <<'EOF'
The deeper layers of a language model can often be removed with little loss, because the residual stream changes slowly from one block to the next. We test this claim on a small instruction-tuned model: first we measure how similar the input of each block is to the input of the block n layers later, then we cut the most similar run of layers, heal the cut with a few hundred steps of low-rank adaptation, and evaluate the result on question answering and reading comprehension.
EOF
    run_cmd a-forward-dev 120 300 "${worker[@]}" forward --model "$model_ac" "${dev_args[@]}" \
        --prompt-file "$scratch/prompt.txt" --out "$scratch/a-dev.safetensors" || true
    run_cmd a-forward-cpu 120 300 "${worker[@]}" forward --model "$model_ac" "${cpu_args[@]}" \
        --prompt-file "$scratch/prompt.txt" --out "$scratch/a-cpu.safetensors" || true
    [[ -f "$out/logs/a-forward-dev.secs" || -f "$out/logs/a-forward-cpu.secs" ]] && row a "forward wall time (load + run), device vs CPU f32" "$(secs_of a-forward-dev) s vs $(secs_of a-forward-cpu) s" "" "INFO" "$model_ac_desc"
    [[ -f "$scratch/a-dev.safetensors" && -f "$scratch/a-cpu.safetensors" ]] || return 0
    "$PY" scripts/gpu/compare.py logits --ref "$scratch/a-cpu.safetensors" --test "$scratch/a-dev.safetensors" \
        --tol "$logit_tol" --argmax 0.9 | sed 's/^/a\t/' >>"$rows"
}

# --- (b) scoring -----------------------------------------------------------------------------------
part_b() {
    if [[ -z "$model_ac" || -z "$c4" ]]; then
        row b "score, device vs CPU f32" "SKIP: ${model_ac:+}$([[ -z "$model_ac" ]] && echo 'no SmolLM2 ')$([[ -z "$c4" ]] && echo 'no C4 data')" "" "SKIP" ""
        return 0
    fi
    local args=(--model "$model_ac" --data "$c4" --samples "$b_samples" --seq-len "$b_seq" --json)
    STDOUT_TO="$out/b-score-dev.json" run_cmd b-score-dev 150 300 "${worker[@]}" score "${args[@]}" "${dev_args[@]}" \
        --batch "$b_batch_dev" --out "$scratch/b-dev.csv" || true
    STDOUT_TO="$out/b-score-cpu.json" run_cmd b-score-cpu 240 300 "${worker[@]}" score "${args[@]}" "${cpu_args[@]}" \
        --batch 8 --out "$scratch/b-cpu.csv" || true
    local side
    for side in dev cpu; do
        [[ -s "$out/b-score-$side.json" ]] || continue
        local tok s wall
        tok="$(jget "$out/b-score-$side.json" tokens)"
        s="$(jget "$out/b-score-$side.json" seconds '{:.2f}')"
        wall="$(secs_of "b-score-$side")"
        row b "score tokens/s, $([[ $side == dev ]] && echo "$DEVICE bf16" || echo 'CPU f32')" \
            "$(calc "round($tok / $s)") (compute), $(calc "round($tok / $wall)") (wall)" "" "INFO" \
            "$tok tokens, $b_samples docs × ≤ $b_seq; compute ${s} s, wall ${wall} s (load included)"
    done
    [[ -s "$scratch/b-dev.csv" && -s "$scratch/b-cpu.csv" ]] || return 0
    "$PY" scripts/gpu/compare.py distances --ref "$scratch/b-cpu.csv" --test "$scratch/b-dev.csv" --tol "$dist_tol" \
        | sed 's/^/b\t/' >>"$rows"
}

# --- (c) evaluation ----------------------------------------------------------------------------------
part_c() {
    if [[ -z "$model_c" || -z "$data" || ! -d "$data/mmlu" ]]; then
        row c "MMLU / BoolQ on the device" "SKIP: $([[ -z "$model_c" ]] && echo 'no SmolLM2 ')$([[ -z "$data" || ! -d "$data/mmlu" ]] && echo 'no shared data')" "" "SKIP" ""
        return 0
    fi
    local shots=(--shots 5)
    [[ "$mmlu_task" == mmlu ]] || shots=()
    run_cmd c-mmlu-dev 150 360 "${worker[@]}" eval --model "$model_c" "${dev_args[@]}" --task "$mmlu_task" \
        --data "$data/mmlu" "${shots[@]}" "${c_mmlu_args[@]}" --batch 16 --out "$out/c-mmlu-dev.json" || true
    if [[ -s "$out/c-mmlu-dev.json" ]]; then
        local n acc s goal verdict=INFO
        n="$(jget "$out/c-mmlu-dev.json" n)"
        acc="$(jget "$out/c-mmlu-dev.json" accuracy '{:.4f}')"
        s="$(jget "$out/c-mmlu-dev.json" seconds '{:.1f}')"
        if [[ "$SMALL" != 1 ]]; then
            goal="14,042 questions, < 60 s"
            verdict="$(calc "'PASS' if $n == 14042 and $s < 60 else 'FAIL'")"
        else
            goal="(dry run: $n questions)"
        fi
        row c "MMLU $([[ $mmlu_task == mmlu ]] && echo '5-shot letter' || echo 'cloze 0-shot') on $DEVICE bf16: accuracy, n, eval seconds" \
            "$acc, n = $n, $s s (wall $(secs_of c-mmlu-dev) s)" "$goal" "$verdict" "$model_c_desc"
        if [[ "$SMALL" != 1 && "$model_c" == *Q4_1.gguf && -f results/smollm2-baseline/mmlu-5shot-20per-subject.json ]]; then
            "$PY" scripts/gpu/compare.py eval --label "MMLU vs committed CPU f32 (first 20 per subject)" \
                --ref results/smollm2-baseline/mmlu-5shot-20per-subject.json --ref-name results/smollm2-baseline \
                --test "$out/c-mmlu-dev.json" --points 0.5 --agree 0.98 | sed 's/^/c\t/' >>"$rows"
        fi
    fi
    if ((boolq_ok == 0)); then
        row c "BoolQ on the device" "SKIP: no SmolLM2 (the tiny fixtures cannot score \" yes\" vs \" no\")" "" "SKIP" ""
        return 0
    fi
    run_cmd c-boolq-dev 90 330 "${worker[@]}" eval --model "$model_c" "${dev_args[@]}" --task boolq \
        --data "$data/boolq/val.jsonl" "${c_boolq_args[@]}" --batch 16 --out "$out/c-boolq-dev.json" || true
    if [[ -s "$out/c-boolq-dev.json" ]]; then
        local n acc s
        n="$(jget "$out/c-boolq-dev.json" n)"
        acc="$(jget "$out/c-boolq-dev.json" accuracy '{:.4f}')"
        s="$(jget "$out/c-boolq-dev.json" seconds '{:.1f}')"
        row c "BoolQ 0-shot on $DEVICE bf16: accuracy, n, eval seconds" "$acc, n = $n, $s s (wall $(secs_of c-boolq-dev) s)" \
            "$([[ "$SMALL" != 1 ]] && echo '3,270 items' || echo "(dry run: $n items)")" \
            "$([[ "$SMALL" != 1 ]] && calc "'PASS' if $n == 3270 else 'FAIL'" || echo INFO)" "$model_c_desc"
        if [[ "$SMALL" != 1 && "$model_c" == *Q4_1.gguf && -f results/smollm2-baseline/boolq.json ]]; then
            "$PY" scripts/gpu/compare.py eval --label "BoolQ vs committed CPU f32 (full)" \
                --ref results/smollm2-baseline/boolq.json --ref-name results/smollm2-baseline \
                --test "$out/c-boolq-dev.json" --points 0.5 --agree 0.98 | sed 's/^/c\t/' >>"$rows"
        fi
    fi
}

# CPU f32 references for (c) on cheap subsets: run after (d), when time is left
part_c_ref() {
    [[ -n "$model_c" && -n "$data" && -d "$data/mmlu" ]] || return 0
    local pts=2
    [[ "$SMALL" == 1 ]] && pts=100   # 8 items: an accuracy gap says nothing; agreement is the check
    if [[ -s "$out/c-mmlu-dev.json" ]]; then
        local shots=(--shots 5)
        [[ "$mmlu_task" == mmlu ]] || shots=()
        run_cmd c-mmlu-cpu 120 0 "${worker[@]}" eval --model "$model_c" "${cpu_args[@]}" --task "$mmlu_task" \
            --data "$data/mmlu" "${shots[@]}" "${c_ref_mmlu_args[@]}" --out "$out/c-mmlu-cpu.json" || true
        if [[ -s "$out/c-mmlu-cpu.json" ]]; then
            "$PY" scripts/gpu/compare.py eval --label "MMLU vs CPU f32 run here (${c_ref_mmlu_args[*]})" \
                --ref "$out/c-mmlu-cpu.json" --ref-name "c-mmlu-cpu.json" --test "$out/c-mmlu-dev.json" \
                --points "$pts" --agree 0.98 | sed 's/^/c\t/' >>"$rows"
        fi
    fi
    if [[ -s "$out/c-boolq-dev.json" ]]; then
        run_cmd c-boolq-cpu 120 0 "${worker[@]}" eval --model "$model_c" "${cpu_args[@]}" --task boolq \
            --data "$data/boolq/val.jsonl" "${c_ref_boolq_args[@]}" --out "$out/c-boolq-cpu.json" || true
        if [[ -s "$out/c-boolq-cpu.json" ]]; then
            "$PY" scripts/gpu/compare.py eval --label "BoolQ vs CPU f32 run here (${c_ref_boolq_args[*]})" \
                --ref "$out/c-boolq-cpu.json" --ref-name "c-boolq-cpu.json" --test "$out/c-boolq-dev.json" \
                --points "$pts" --agree 0.98 | sed 's/^/c\t/' >>"$rows"
        fi
    fi
    return 0
}

# --- (d) a random Llama-2-7B-shaped model: ours vs torch -------------------------------------------------
# same_loss_row NAME WHAT: a row for part (d) requiring the C4 loss of run NAME (NAME.json) to equal, to the
# last digit, the one-device whole load's (d-forward-ours.json), with NAME's speed and peak memory
same_loss_row() {
    local name=$1 what=$2 want got v=FAIL
    [[ -s "$out/$name.json" && -s "$out/d-forward-ours.json" ]] || return 0
    want="$(jget "$out/d-forward-ours.json" loss)"
    got="$(jget "$out/$name.json" loss)"
    [[ "$want" == "$got" && "$want" != "?" ]] && v=PASS
    row d "$what" "$got vs $want" "equal" "$v" \
        "$(calc "round($(jget "$out/$name.json" tokens) / $(jget "$out/$name.json" seconds))") tok/s, wall $(secs_of "$name") s; $(peak_label) $(peak_of "$name")"
}

part_d() {
    local dir="$scratch/random-llama"
    [[ "$SMALL" == 1 ]] && dir="$scratch/random-llama-small"
    local docs="$c4"
    if [[ -z "$docs" ]]; then
        docs="$scratch/synthetic-docs.jsonl"
        "$PY" - "$docs" <<'EOF'
import json, random, sys
random.seed(0)
words = "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they".split()
with open(sys.argv[1], "w") as f:
    for i in range(1000):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(600))}) + "\n")
EOF
        row d "data" "no C4 in the shared data: 1,000 synthetic documents" "" "INFO" "$docs"
    fi
    if ((on_gpu && !has_torch)); then
        row d "random Llama-2-7B-shaped model, ours vs torch" "SKIP: no torch+transformers in $PY (the model is made on the GPU by them)" "" "SKIP" ""
        return 0
    fi
    rm -rf "$dir"
    local make_dev="$torch_device"
    ((has_torch)) || make_dev=cpu
    STDOUT_TO="$out/d-make.json" run_cmd d-make 240 240 "$PY" scripts/gpu/make_random_llama.py --out "$dir" \
        --device "$make_dev" "${d_shape[@]}"
    row d "random checkpoint (make_random_llama.py)" "$(jget "$out/d-make.json" parameters '{:,}') parameters, $(jget "$out/d-make.json" backend) on $(jget "$out/d-make.json" built_on), $(jget "$out/d-make.json" dtype)" \
        "" "INFO" "build $(jget "$out/d-make.json" build_seconds) s, save $(jget "$out/d-make.json" save_seconds) s; $(printf '%s ' "${d_shape[@]:-Llama-2-7B shapes}")"

    # forward: c4-loss on the same documents and ids
    local fargs=(--data "$docs" --first-doc 0 --limit "$d_fwd_docs" --seq-len "$d_seq" --batch "$d_batch")
    run_cmd d-forward-ours 150 210 "${worker[@]}" eval --model "$dir" "${dev_args[@]}" --task c4-loss "${fargs[@]}" \
        --out "$out/d-forward-ours.json" || true
    if ((has_torch)); then
        run_cmd d-forward-torch 120 180 "$PY" scripts/gpu/torch_side.py forward --model "$dir" --device "$torch_device" \
            "${fargs[@]}" --out "$out/d-forward-torch.json" || true
    fi
    local o_tps="?" t_tps="?"
    if [[ -s "$out/d-forward-ours.json" ]]; then
        o_tps="$(calc "round($(jget "$out/d-forward-ours.json" tokens) / $(jget "$out/d-forward-ours.json" seconds))")"
    fi
    if ((has_torch)) && [[ -s "$out/d-forward-torch.json" ]]; then
        t_tps="$(jget "$out/d-forward-torch.json" tokens_per_second '{:.0f}')"
        row d "forward tokens/s (c4-loss, $d_fwd_docs docs × ≤ $d_seq, batch $d_batch): ours vs torch" "$o_tps vs $t_tps ($(calc "round($o_tps / $t_tps, 2)")×)" "" "INFO" \
            "ours wall $(secs_of d-forward-ours) s, torch wall $(secs_of d-forward-torch) s (loads included); torch steady $(jget "$out/d-forward-torch.json" steady_tokens_per_second '{:.0f}') tok/s"
        row d "forward $(peak_label): ours vs torch" "$(peak_of d-forward-ours) vs $(peak_of d-forward-torch)" "" "INFO" \
            "torch's own peak allocated $(jget "$out/d-forward-torch.json" peak_allocated_bytes '{:,}') B"
        [[ -s "$out/d-forward-ours.json" ]] && "$PY" scripts/gpu/compare.py losses --ref "$out/d-forward-torch.json" \
            --test "$out/d-forward-ours.json" --tol 0.02 | sed 's/^/d\t/' >>"$rows"
    else
        row d "forward tokens/s (c4-loss, $d_fwd_docs docs × ≤ $d_seq): ours vs torch" "$o_tps vs skipped: no torch" "" "INFO" \
            "ours wall $(secs_of d-forward-ours) s; $(peak_label) $(peak_of d-forward-ours)"
    fi

    # the same forward with most blocks left in the checkpoint and read for each pass (issue 14:
    # evaluating a model larger than the device, forced with --hold-gib): the same loss to the bit
    run_cmd d-forward-offloaded 120 200 "${worker[@]}" eval --model "$dir" "${dev_args[@]}" --task c4-loss \
        "${fargs[@]}" --hold-gib "$d_hold_gib" --out "$out/d-forward-offloaded.json" || true
    same_loss_row d-forward-offloaded "forward, blocks beyond $d_hold_gib GiB read per pass: loss vs the whole load's"

    # the same forward with the blocks spread over two devices in contiguous ranges (issue 14:
    # --device A,B): cuda:0,cuda:1 where the machine has two GPUs, else the one device listed twice
    # (then the split and the per-device contexts run, the copies between GPUs do not)
    local pair="$DEVICE,$DEVICE"
    ((on_gpu)) && [[ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ]] && pair="cuda:0,cuda:1"
    run_cmd d-forward-spread 120 200 "${worker[@]}" eval --model "$dir" --device "$pair" --dtype bf16 --task c4-loss \
        "${fargs[@]}" --out "$out/d-forward-spread.json" || true
    same_loss_row d-forward-spread "forward, blocks spread over --device $pair: loss vs one device's"

    # healing: 50 steps, seq 2048, micro-batch 4, r 64, FFN
    local quant=no
    ((has_bnb)) && quant=yes
    local hargs=(--data "$docs" --steps "$d_steps" --batch 4 --seq-len "$d_seq" --rank "$d_rank"
        --targets ffn --checkpoint-every 100000)
    local qflag=()
    [[ "$quant" == no ]] && qflag=(--no-quantize)
    local mode_desc
    if [[ "$quant" == yes ]]; then mode_desc="QLoRA (NF4 base) on both sides"; else mode_desc="plain LoRA on the bf16 base on both sides: bitsandbytes absent$( ((has_torch)) || echo ', torch absent')"; fi
    row d "healing mode" "$mode_desc" "" "INFO" "$d_steps steps, batch 4, micro-batch 4, seq $d_seq, r $d_rank, FFN"
    rm -rf "$scratch/d-heal-ours"
    local heal_rc=0 mb_note=""
    run_cmd d-heal-ours 200 110 "${worker[@]}" heal --model "$dir" "${dev_args[@]}" "${hargs[@]}" "${qflag[@]}" \
        --micro-batch 4 --out "$scratch/d-heal-ours" || heal_rc=$?
    local heal_name=d-heal-ours
    if ((heal_rc != 0 && heal_rc != 124 && heal_rc != 137 && heal_rc != 75 && heal_rc != 125)) && ! [[ -s "$scratch/d-heal-ours/train_log.csv" && $(wc -l <"$scratch/d-heal-ours/train_log.csv") -gt 1 ]]; then
        # e.g. out of memory at micro-batch 4: the same global batch in micro-batches of 1
        rm -rf "$scratch/d-heal-ours"
        run_cmd d-heal-ours-mb1 150 110 "${worker[@]}" heal --model "$dir" "${dev_args[@]}" "${hargs[@]}" \
            "${qflag[@]}" --micro-batch 1 --out "$scratch/d-heal-ours" || true
        heal_name="d-heal-ours-mb1"
        mb_note="micro-batch 4 failed (logs/d-heal-ours.log): rerun at micro-batch 1 (batch 4 by accumulation); "
    fi
    local ours_h="" torch_h=""
    if [[ -s "$scratch/d-heal-ours/train_log.csv" ]]; then
        cp "$scratch/d-heal-ours/train_log.csv" "$out/d-heal-ours.train_log.csv"
        ours_h="$("$PY" scripts/gpu/compare.py heal-log --log "$scratch/d-heal-ours/train_log.csv")"
    fi
    if ((has_torch && has_peft)); then
        # torch stops itself after the step that crosses --max-seconds (loading takes the rest)
        local tl
        tl=$(($(remaining) < 150 ? $(remaining) : 150))
        run_cmd d-heal-torch 150 0 "$PY" scripts/gpu/torch_side.py heal --model "$dir" --device "$torch_device" \
            --data "$docs" --steps "$d_steps" --batch 4 --micro-batch 4 --seq-len "$d_seq" --rank "$d_rank" --targets ffn \
            --quantize "$quant" --max-seconds "$((tl > 80 ? tl - 50 : 30))" --out "$out/d-heal-torch.json" || true
        [[ -s "$out/d-heal-torch.json" ]] && torch_h="$(jget "$out/d-heal-torch.json" steps) $(jget "$out/d-heal-torch.json" tokens) $(jget "$out/d-heal-torch.json" seconds '{:.3f}') $(jget "$out/d-heal-torch.json" steady_tokens_per_second '{:.1f}') $(jget "$out/d-heal-torch.json" first_loss '{:.4f}') $(jget "$out/d-heal-torch.json" last_loss '{:.4f}')"
    fi
    local os ot osec osteady ol0 ol1 ts tt tsec tsteady tl0 tl1
    read -r os ot osec osteady ol0 ol1 <<<"${ours_h:-0 0 0 ? ? ?}"
    read -r ts tt tsec tsteady tl0 tl1 <<<"${torch_h:-0 0 0 ? ? ?}"
    local torch_word="skipped: no torch"
    ((has_torch)) && ! ((has_peft)) && torch_word="skipped: no peft"
    local o_str="ours: none" t_str="torch+PEFT: $torch_word"
    [[ -n "$ours_h" ]] && o_str="$(calc "round($ot / $osec)") (steady $osteady; $os/$d_steps steps in $osec s)"
    [[ -n "$torch_h" ]] && t_str="$(calc "round($tt / $tsec)") (steady $tsteady; $ts/$d_steps steps in $tsec s)"
    local verdict=INFO
    [[ -n "$ours_h" ]] && ((os < d_steps)) && mb_note="${mb_note}ours cut by its time limit after $os steps; "
    row d "healing tokens/s: ours vs torch+PEFT" "$o_str vs $t_str" "" "$verdict" "${mb_note}loss ours $ol0 → $ol1$([[ -n "$torch_h" ]] && echo ", torch $tl0 → $tl1")"
    local tpeak="n/a"
    [[ -n "$torch_h" ]] && tpeak="$(peak_of d-heal-torch) (torch's own: $(jget "$out/d-heal-torch.json" peak_allocated_bytes '{:,}') B allocated, $(jget "$out/d-heal-torch.json" peak_reserved_bytes '{:,}') B reserved)"
    row d "healing $(peak_label): ours vs torch+PEFT" "$(peak_of "$heal_name") vs $tpeak" "" "INFO" ""

    # the extra row: ours in QLoRA when the comparison ran in plain LoRA
    if [[ "$quant" == no && -n "$ours_h" ]]; then
        rm -rf "$scratch/d-heal-ours-q"
        if run_cmd d-heal-ours-qlora 150 60 "${worker[@]}" heal --model "$dir" "${dev_args[@]}" "${hargs[@]}" \
            --micro-batch 4 --out "$scratch/d-heal-ours-q"; [[ -s "$scratch/d-heal-ours-q/train_log.csv" ]]; then
            local q
            q="$("$PY" scripts/gpu/compare.py heal-log --log "$scratch/d-heal-ours-q/train_log.csv")"
            read -r os ot osec osteady ol0 ol1 <<<"$q"
            row d "extra: ours in QLoRA (NF4 base), no torch counterpart" "$(calc "round($ot / $osec)") tok/s (steady $osteady; $os/$d_steps steps in $osec s)" "" "INFO" \
                "$(peak_label) $(peak_of d-heal-ours-qlora); loss $ol0 → $ol1"
        fi
    fi
    return 0
}

# --- run --------------------------------------------------------------------------------------------
log "device $DEVICE, small=$SMALL, budget ${BUDGET}s, worker: $worker_desc"
log "output: $out; scratch: $scratch; data: ${data:-absent}; model for a-c: ${model_ac:-absent}"
log "$py_versions"
PART=setup run_cmd setup-doctor 60 0 "${worker[@]}" doctor --device "$DEVICE" || true
doctor_line="$(grep -v '^\s*$' "$out/logs/setup-doctor.log" | head -n 8 | tr '\n' ';' | cut -c1-400)"
if ((has_py == 0 || has_numpy == 0)); then
    row setup "python with numpy" "absent ($PY)" "present" "FAIL" "the comparisons need numpy"
fi
run_part a part_a
run_part b part_b
run_part c part_c
run_part d part_d
run_part c part_c_ref

# --- table --------------------------------------------------------------------------------------------
gpu_name="none (CPU dry run)"
if ((on_gpu)) && command -v nvidia-smi >/dev/null 2>&1; then
    gpu_name="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$gpu_index" 2>/dev/null | head -n1 || echo '?')"
fi
commit="${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty')}"
total=$(($(date +%s) - T0))
table="$out/table.md"
{
    if ((on_gpu)); then
        echo "# GPU check ($DEVICE)"
    else
        echo "# GPU check — CPU DRY RUN (device side = --device cpu --dtype bf16; not GPU figures)"
    fi
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $commit; total ${total} s (budget ${BUDGET} s)"
    echo "- GPU: $gpu_name; host: $(nproc) cores"
    echo "- worker: $worker_desc; doctor: ${doctor_line:-?}"
    echo "- $py_versions"
    echo "- models: (a), (b) $model_ac_desc; (c) $model_c_desc$([[ $mmlu_task == mmlu ]] || echo ' (MMLU cloze: the tiny tokenizer cannot score letters)'); (d) random Llama $([[ "$SMALL" == 1 ]] && echo "(toy shapes: ${d_shape[*]})" || echo "(Llama-2-7B shapes)"); data: ${data:-absent}"
    echo "- sizes: (b) $b_samples docs × $b_seq; (c) MMLU ${c_mmlu_args[*]:-full}, BoolQ ${c_boolq_args[*]:-full}; (d) forward $d_fwd_docs docs × $d_seq, heal $d_steps steps × 4 × $d_seq, r $d_rank"
    echo
    echo "| step | check | result | goal | verdict | note |"
    echo "| --- | --- | --- | --- | --- | --- |"
    awk -F'\t' '{ print ($1 == "setup" ? "0" : $1) "\t" $0 }' "$rows" | sort -s -t$'\t' -k1,1 | cut -f2- | awk -F'\t' '{ for (i = 1; i <= 6; i++) gsub(/\|/, "\\|", $i); printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }'
    echo
    echo "| command | exit | seconds | peak memory (MiB) | what |"
    echo "| --- | --- | --- | --- | --- |"
    awk -F'\t' '{ w = $5; if (length(w) > 160) w = substr(w, 1, 157) "..."; gsub(/\|/, "\\|", w); printf "| %s | %s | %s | %s | `%s` |\n", $1, $2, $3, $4, w }' "$steps"
} >"$table"
if ((on_gpu)) && [[ "$out" != "$repo/results/gpu-check" ]]; then
    mkdir -p "$repo/results/gpu-check" && cp "$table" "$repo/results/gpu-check/table.md" || true
fi
[[ "${GPU_CHECK_KEEP:-0}" == 1 ]] || rm -rf "${scratch:?}/random-llama" "$scratch/random-llama-small" "$scratch/d-heal-ours" \
    "$scratch/d-heal-ours-q" "$scratch/worker" "$scratch/${gguf_name:?}"
echo
cat "$table"
echo
echo "table: $table"
if cut -f5 "$rows" | grep -qx FAIL; then exit 1; fi
exit 0

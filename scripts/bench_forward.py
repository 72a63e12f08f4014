"""Prefill throughput of HF transformers on the same token ids as `cargo bench --bench forward`.

Usage: python scripts/bench_forward.py GGUF IDS_FILE [REPEATS]
Prints `BENCH transformers-forward-all-logits tokens=T seconds=S tok_s=X` like the Rust bench.
"""
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    gguf, ids_file = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.set_num_threads(os.cpu_count() or 1)
    ids = [int(x) for x in open(ids_file).read().split()]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)),
        gguf_file=os.path.basename(gguf),
        torch_dtype=torch.float32,
        attn_implementation="sdpa",
    ).eval()
    x = torch.tensor([ids])
    times = []
    with torch.inference_mode():
        model(x, use_cache=False)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(x, use_cache=False)
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    print(f"BENCH transformers-forward-all-logits tokens={len(ids)} seconds={s:.4f} tok_s={len(ids) / s:.1f}")


if __name__ == "__main__":
    main()

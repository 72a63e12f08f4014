"""Throughput of HF transformers computing the per-layer states used for layer scoring.

Usage: python scripts/bench_score.py GGUF DATA N T BATCH [REPEATS]

Takes the first N documents of DATA (JSON lines, field "text"), tokenizes each with the
tokenizer defaults, truncates to T tokens (skipping documents with < 2 tokens, as
make_score_reference.py does), and runs them in batches of BATCH right-padded sequences
with an attention mask through the decoder (base model, no lm_head: scoring needs no
logits) with output_hidden_states=True, gathering the last-real-token state of every layer.
One warm-up pass over the first batch, then the median wall time of REPEATS (default 3)
full passes. Tokenization is done once, outside the timed region.
Prints `BENCH transformers-score-<mode> tokens=<real tokens> seconds=S tok_s=X`.
"""
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf, data = sys.argv[1], sys.argv[2]
    n_docs, seq_len, batch = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    repeats = int(sys.argv[6]) if len(sys.argv) > 6 else 3
    # `base`: the decoder only (no LM head), the leanest transformers call. `causal-lm`: the
    # CausalLM with output_hidden_states, as PruneMe and short-transformers call it (logits too).
    mode = sys.argv[7] if len(sys.argv) > 7 else "base"
    torch.set_num_threads(os.cpu_count() or 1)

    gdir, gname = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    seqs, n_read = [], 0
    with open(data, encoding="utf-8") as f:
        for line in f:
            if n_read >= n_docs:
                break
            if not line.strip():
                continue
            n_read += 1
            ids = tok(json.loads(line)["text"])["input_ids"][:seq_len]
            if len(ids) >= 2:  # shorter documents are skipped but count toward the first N
                seqs.append(ids)
    total = sum(len(s) for s in seqs)

    batches = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        w = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), w), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), w), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        lens = torch.tensor([len(s) for s in chunk])
        batches.append((ids, mask, lens))

    base = model.model if mode == "base" else model

    def run(b):
        ids, mask, lens = b
        out = base(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        hs = torch.stack(out.hidden_states, dim=0)  # [L+1, B, W, H]
        return hs[:, torch.arange(ids.shape[0]), lens - 1]  # [L+1, B, H]

    times = []
    with torch.inference_mode():
        run(batches[0])  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            last = [run(b) for b in batches]
            times.append(time.perf_counter() - t)
    assert sum(x.shape[1] for x in last) == len(seqs)
    s = statistics.median(times)
    print(f"BENCH transformers-score-{mode} tokens={total} seconds={s:.4f} tok_s={total / s:.1f}")


if __name__ == "__main__":
    main()

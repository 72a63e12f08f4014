#!/usr/bin/env python3
"""HF-transformers reference for layer scoring (Gromov et al. 2024; ShortGPT block influence).

Usage:
    python scripts/reference/make_score_reference.py \
        --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data shared/data/c4/c4-en-train.00000-of-01024.first1000.jsonl \
        --samples 16 --seq-len 64 --out-dir worker/tests/fixtures/smollm2

Writes (in --out-dir):
  distances_c4_<N>x<T>.csv        header `n,l,distance`, rows ordered by n then l,
                                  for n = 1..L and l = 0..L-n.
  block_influence_c4_<N>x<T>.csv  header `layer,score`, layer = 0..L-1.

Conventions:
  * x^(l) = residual stream ENTERING decoder layer l (x^(0) = embedding output);
    x^(L) = output of the last decoder layer BEFORE the final norm
    (captured with hooks; HF `output_hidden_states[-1]` is post-norm).
  * Samples: the first N documents (JSON lines, field "text") in file order,
    each tokenized with the tokenizer defaults (no BOS for SmolLM2) and truncated
    to the first T tokens; documents with < 2 tokens after that are skipped.
    Each sample runs alone (batch 1, no padding).
  * d(l, n) = mean over samples of arccos(clamp(cos(x_T^(l), x_T^(l+n)), -1, 1)) / pi,
    x_T = state at the last token; cos in float64 from the float32 states.
  * Block influence(l) = token-weighted mean over all tokens of all samples of
    1 - cos(x_t^(l), x_t^(l+1)), in float64.

Deterministic: float32, eager attention, one CPU thread.
"""

import argparse
import json
import math
import os

import numpy as np
import torch

from make_fixtures import load_gguf, run_with_states, setup_torch  # same folder: GGUF loading, the hooks that capture x^(0..L)


def states_for(model, ids):
    """ids: list[int]. Returns float32 numpy [L+1, T, H] (entering each layer + pre-norm output),
    captured by the same hooks as the parity fixtures (which also check the pre-norm convention)."""
    _, states = run_with_states(model, torch.tensor(ids, dtype=torch.long), check_hidden=False)
    return states.numpy()


def cos64(a, b):
    """Row-wise cosine in float64. a, b: [..., H] float32 arrays."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--samples", type=int, required=True, help="N: first N documents")
    ap.add_argument("--seq-len", type=int, required=True, help="T: truncate to T tokens")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    N, T = args.samples, args.seq_len

    setup_torch()
    model, tok = load_gguf(args.gguf)
    L = len(model.model.layers)

    docs = []
    with open(args.data, encoding="utf-8") as f:
        for line in f:
            if len(docs) >= N:
                break
            if not line.strip():
                continue
            docs.append(json.loads(line)["text"])
    assert len(docs) == N, f"only {len(docs)} documents in {args.data}"

    # d_sum[n][l] accumulates arccos(...)/pi over samples
    d_sum = {n: np.zeros(L - n + 1, dtype=np.float64) for n in range(1, L + 1)}
    bi_sum = np.zeros(L, dtype=np.float64)
    n_used, n_skipped, n_tokens = 0, 0, 0
    for text in docs:
        ids = tok(text)["input_ids"][:T]
        if len(ids) < 2:
            n_skipped += 1
            continue
        st = states_for(model, ids)  # [L+1, t, H] float32
        last = st[:, -1, :]  # [L+1, H]
        for n in range(1, L + 1):
            c = cos64(last[: L - n + 1], last[n:])  # l = 0..L-n
            d_sum[n] += np.arccos(np.clip(c, -1.0, 1.0)) / math.pi
        bi_sum += (1.0 - cos64(st[:-1], st[1:])).sum(axis=1)  # [L]
        n_used += 1
        n_tokens += len(ids)
    assert n_used > 0, "no usable samples"

    os.makedirs(args.out_dir, exist_ok=True)
    dist_path = os.path.join(args.out_dir, f"distances_c4_{N}x{T}.csv")
    bi_path = os.path.join(args.out_dir, f"block_influence_c4_{N}x{T}.csv")
    argmins = {}
    with open(dist_path, "w", newline="\n") as f:
        f.write("n,l,distance\n")
        for n in range(1, L + 1):
            d = d_sum[n] / n_used
            for l, v in enumerate(d):
                f.write(f"{n},{l},{float(v)!r}\n")
            argmins[n] = int(np.argmin(d))  # first occurrence = smallest l on ties
    with open(bi_path, "w", newline="\n") as f:
        f.write("layer,score\n")
        for l, v in enumerate(bi_sum / n_tokens):
            f.write(f"{l},{float(v)!r}\n")

    print(f"wrote {dist_path}")
    print(f"wrote {bi_path}")
    print(f"layers={L} samples_used={n_used} skipped={n_skipped} total_tokens={n_tokens}")
    for n in range(1, L + 1):
        l = argmins[n]
        print(f"n={n} l*={l} d={float(d_sum[n][l] / n_used)!r}")


if __name__ == "__main__":
    main()

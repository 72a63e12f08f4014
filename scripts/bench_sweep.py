#!/usr/bin/env python3
"""A whole unhealed sweep scripted with HF transformers, as a user of PruneMe + lm-eval-style
loops would run it: the baseline for `scripts/bench-sweep.sh` (issue #18).

Usage:
    python scripts/bench_sweep.py SWEEP.yaml DATA_DIR

Reads the sweep file prunesweep runs (experiments/bench-sweep.yaml): one GGUF model, the
calibration documents, the methods (angular, deepest), the fractions and the eval tasks
(c4-loss, boolq, mmlu-cloze, mmlu). In one process (the model loaded once, which favours this
side over one process per metric):
  1. scoring: one forward per calibration document (the first `samples`, cut to `seq_len`
     tokens), the residual stream entering every block and leaving the last (pre-norm) read at
     the last token; d(l, n) = arccos(cos) / pi averaged over documents, as prunesweep defines it;
  2. the unpruned baseline and every (method, fraction) cell: n = round(f * L) layers dropped
     (angular: the block with the smallest d(l, n), first on ties; deepest: the n layers before
     the last), the model's layer list cut in place (no copy), every eval task run with
     scripts/bench_eval.py's loops (one full forward per prompt or sequence, batch 1).
Prints one line per cell and
  SWEEP transformers seconds=S cells=N
with S the wall time from start (model load included) to the last cell.
"""

import argparse
import math
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_eval import last_token_task, load, score_sequences  # noqa: E402


def read_docs(path, first, count):
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= first + count:
                break
            if i >= first and line.strip():
                out.append(json.loads(line)["text"])
    return out


def distances(tok, model, calibration):
    """d[n][l] for n = 1..L, l = 0..L-n, from one forward per calibration document."""
    layers = model.model.layers
    L = len(layers)
    states = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: states.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, args, L=L: states.__setitem__(L, args[0])))
    docs = read_docs(calibration["path"], 0, calibration.get("samples", 128))
    seq_len = calibration.get("seq_len", 256)
    sums = [[0.0] * (L + 1) for _ in range(L + 1)]
    count = 0
    with torch.inference_mode():
        for d in docs:
            ids = tok(d)["input_ids"][:seq_len]
            if len(ids) < 2:
                continue
            states.clear()
            model.model(input_ids=torch.tensor([ids]), use_cache=False)
            last = [states[l][0, -1].double() for l in range(L + 1)]
            for n in range(1, L + 1):
                for l in range(0, L - n + 1):
                    a, b = last[l], last[l + n]
                    c = float(torch.dot(a, b) / (a.norm() * b.norm()))
                    sums[n][l] += math.acos(max(-1.0, min(1.0, c))) / math.pi
            count += 1
    for h in hooks:
        h.remove()
    return [[s / count for s in row] for row in sums]


def dropped(method, n, L, d):
    if n == 0:
        return []
    if method == "angular":
        start = min(range(L - n + 1), key=lambda l: (d[n][l], l))
        return list(range(start, start + n))
    if method == "deepest":
        return list(range(L - 1 - n, L - 1))
    raise SystemExit(f"method {method} is not scripted here (angular, deepest)")


def evaluate(tok, model, tasks, data_root):
    """Every eval task of the sweep file on `model`: {task: (metric, seconds)}."""
    out = {}
    for t in tasks:
        kind = t["task"]
        if kind == "c4-loss":
            _, _, _, secs, m = score_sequences(tok, model, "c4", data_root, limit=t.get("limit", 256),
                                               first_doc=t.get("first_doc", 0), seq_len=t.get("seq_len", 512))
        elif kind == "mmlu-cloze":
            _, _, _, secs, m = score_sequences(tok, model, "cloze", data_root, per_subject=t["limit_per_subject"])
        elif kind == "boolq":
            _, _, _, secs, m = last_token_task(tok, model, "boolq", data_root, limit=t.get("limit", 200))
        elif kind == "mmlu":
            _, _, _, secs, m = last_token_task(tok, model, "mmlu", data_root, per_subject=t["limit_per_subject"],
                                               shots=t.get("shots", 5))
        else:
            raise SystemExit(f"eval task {kind} is not scripted here")
        out[kind] = (m, secs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("data", help="shared/data (the eval tasks' files are read from its usual layout)")
    args = ap.parse_args()
    started = time.perf_counter()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(args.sweep, encoding="utf-8") as f:
        sweep = yaml.safe_load(f)
    (model_entry,) = sweep["models"]
    tok, model = load(os.path.join(root, model_entry["path"]))
    calibration = dict(sweep["calibration"])
    calibration["path"] = os.path.join(root, calibration["path"])
    layers = model.model.layers
    L = len(layers)

    t0 = time.perf_counter()
    d = distances(tok, model, calibration)
    print(f"SCORE seconds={time.perf_counter() - t0:.1f}", flush=True)

    cells = [("unpruned", 0.0)] + [(m, f) for m in sweep["methods"] for f in sweep["fractions"]]
    for method, fraction in cells:
        n = round(fraction * L)
        drop = dropped(method, n, L, d) if method != "unpruned" else []
        kept = [layers[i] for i in range(L) if i not in drop]
        model.model.layers = torch.nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
        if isinstance(getattr(model.config, "layer_types", None), list):
            full_types = model.config.layer_types
            model.config.layer_types = [full_types[i] for i in range(L) if i not in drop]
        t0 = time.perf_counter()
        metrics = evaluate(tok, model, sweep["eval"], args.data)
        secs = time.perf_counter() - t0
        model.model.layers = layers
        model.config.num_hidden_layers = L
        if isinstance(getattr(model.config, "layer_types", None), list):
            model.config.layer_types = full_types
        span = f"{drop[0]}-{drop[-1]}" if drop else "-"
        parts = " ".join(f"{k}={v[0]:.4f}" for k, v in metrics.items())
        print(f"CELL transformers {method} {fraction} dropped={span} seconds={secs:.1f} {parts}", flush=True)
    print(f"SWEEP transformers seconds={time.perf_counter() - started:.1f} cells={len(cells)}")


if __name__ == "__main__":
    main()

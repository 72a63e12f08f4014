#!/usr/bin/env python3
"""Throughput of a plain HF-transformers evaluation loop (as lm-eval-harness runs it).

Usage:
    python scripts/bench_eval.py GGUF DATA_DIR mmlu [--per-subject 5] [--shots 5]
    python scripts/bench_eval.py GGUF DATA_DIR boolq [--limit 200]
    python scripts/bench_eval.py GGUF DATA_DIR cloze [--per-subject 2]
    python scripts/bench_eval.py GGUF DATA_DIR c4 [--limit 64] [--first-doc 600] [--seq-len 256]

DATA_DIR is shared/data. Prompts are exactly those of scripts/reference/make_eval_reference.py
(imported from there):
  * mmlu: k-shot letter prompts (first k dev rows as shots) for the first --per-subject test
    questions of every subject (all mmlu/test/*_test.csv, alphabetical by file name);
    prediction = argmax of the last-position logits over " A"/" B"/" C"/" D".
  * boolq: the first --limit lines of boolq/val.jsonl; prediction = logit(" yes") > logit(" no").
  * cloze: MMLU 0-shot cloze (lm-eval's): for the first --per-subject test questions of every
    subject, one forward of "Question: {q}\nAnswer: {choice}" per choice; prediction = argmax of
    the choice tokens' summed log-probability per character. tokens = all four sequences'.
  * c4: C4 loss on --limit documents from --first-doc of the C4 sample, each cut to --seq-len
    tokens, one forward each; prints the token-weighted loss.
Every prompt is tokenized first (tok(text)["input_ids"], defaults), then the timed loop runs one
full forward per prompt (batch 1, no padding, no KV-cache reuse) under torch.inference_mode(),
float32, attn_implementation="sdpa", torch.set_num_threads(os.cpu_count()). One untimed
warm-up forward on the first prompt precedes the loop.
Prints
  BENCH transformers-<task> questions=N tokens=<total prompt tokens> seconds=S q_s=X tok_s=Y
  ACC transformers-<task> accuracy=A
with <task> = mmlu<k> (e.g. mmlu5) or boolq.
"""

import argparse
import csv
import glob
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
from make_eval_reference import (  # noqa: E402
    LETTERS, boolq_prompt, cloze_context, mmlu_letter_prompt, read_csv, single_token)


def mmlu_prompts(data, per_subject, shots):
    out = []  # (prompt, answer letter)
    files = sorted(glob.glob(os.path.join(data, "mmlu", "test", "*_test.csv")))
    assert files, f"no mmlu/test/*_test.csv under {data}"
    for f in files:
        subj = os.path.basename(f)[: -len("_test.csv")]
        dev = read_csv(os.path.join(data, "mmlu", "dev", f"{subj}_dev.csv"))
        for row in read_csv(f)[:per_subject]:
            out.append((mmlu_letter_prompt(subj, dev, row, shots), row[5]))
    return out


def boolq_prompts(data, limit):
    out = []  # (prompt, bool label)
    with open(os.path.join(data, "boolq", "val.jsonl"), encoding="utf-8") as f:
        for _, line in zip(range(limit), f):
            ex = json.loads(line)
            out.append((boolq_prompt(ex["passage"], ex["question"]), ex["label"] == "true"))
    return out


def load(gguf):
    """The tokenizer and the f32 model of a GGUF file, as every timed loop here runs it."""
    torch.set_num_threads(os.cpu_count() or 1)
    gdir, gname = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    return tok, model


def last_token_task(tok, model, task, data, per_subject=5, shots=5, limit=200):
    """mmlu (letter) or boolq: one forward per prompt, the candidates' logits at its last position.
    Returns (name, questions, prompt tokens, seconds, accuracy)."""
    if task == "mmlu":
        name = f"mmlu{shots}"
        prompts = mmlu_prompts(data, per_subject, shots)
        cand = [single_token(tok, " " + L) for L in LETTERS]
    else:
        name = "boolq"
        prompts = boolq_prompts(data, limit)
        cand = [single_token(tok, " yes"), single_token(tok, " no")]

    encoded = [torch.tensor([tok(p)["input_ids"]], dtype=torch.long) for p, _ in prompts]
    n_tokens = sum(x.shape[1] for x in encoded)
    cand_t = torch.tensor(cand, dtype=torch.long)

    picked = []
    with torch.inference_mode():
        model(input_ids=encoded[0], use_cache=False)  # warm-up, untimed
        t0 = time.perf_counter()
        for ids in encoded:
            last = model(input_ids=ids, use_cache=False).logits[0, -1]
            picked.append(last[cand_t].clone())
        secs = time.perf_counter() - t0

    correct = 0
    for (_, gold), v in zip(prompts, picked):
        if task == "mmlu":
            j = max(range(4), key=lambda i: (float(v[i]), -i))  # ties -> first letter
            correct += LETTERS[j] == gold
        else:
            correct += bool(v[0] > v[1]) == gold
    return name, len(prompts), n_tokens, secs, correct / len(prompts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("data")
    ap.add_argument("task", choices=["mmlu", "boolq", "cloze", "c4"])
    ap.add_argument("--per-subject", type=int, default=5)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--first-doc", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    tok, model = load(args.gguf)
    if args.task in ("cloze", "c4"):
        name, n, n_tokens, secs, metric = score_sequences(
            tok, model, args.task, args.data, args.per_subject, args.limit, args.first_doc, args.seq_len)
        metric = f"accuracy={metric:.4f}" if args.task == "cloze" else f"loss={metric:.4f}"
    else:
        name, n, n_tokens, secs, acc = last_token_task(
            tok, model, args.task, args.data, args.per_subject, args.shots, args.limit)
        metric = f"accuracy={acc:.4f}"
    print(f"BENCH transformers-{name} questions={n} tokens={n_tokens} seconds={secs:.3f} "
          f"q_s={n / secs:.3f} tok_s={n_tokens / secs:.1f}")
    print(f"ACC transformers-{name} {metric}")


def score_sequences(tok, model, task, data, per_subject=2, limit=64, first_doc=600, seq_len=256):
    """cloze and c4: log-probabilities of continuation tokens, one forward per sequence.
    Returns (name, questions or documents, tokens, seconds, accuracy or loss)."""
    if task == "cloze":
        name, questions = "cloze", []
        for f in sorted(glob.glob(os.path.join(data, "mmlu", "test", "*_test.csv"))):
            for row in read_csv(f)[:per_subject]:
                ctx = cloze_context(row[0])
                n_ctx = len(tok(ctx)["input_ids"])
                wholes = [tok(ctx + " " + c)["input_ids"] for c in row[1:5]]
                questions.append((row, [(w, n_ctx) for w in wholes]))
        seqs = [s for _, ss in questions for s in ss]
    else:
        name = "c4"
        with open(os.path.join(data, "c4", "c4-en-train.00000-of-01024.first1000.jsonl"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        docs = [json.loads(lines[j])["text"] for j in range(first_doc, first_doc + limit)]
        seqs = [(ids, 1) for ids in (tok(d)["input_ids"][:seq_len] for d in docs) if len(ids) >= 2]
    encoded = [torch.tensor([ids], dtype=torch.long) for ids, _ in seqs]
    n_tokens = sum(len(ids) for ids, _ in seqs)
    sums = []
    with torch.inference_mode():
        model(input_ids=encoded[0], use_cache=False)  # warm-up, untimed
        t0 = time.perf_counter()
        for x, (ids, first) in zip(encoded, seqs):
            lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), dim=-1)
            tgt = torch.tensor(ids[first:], dtype=torch.long)
            sums.append(float(lp[first - 1 : -1].gather(1, tgt[:, None]).sum()))
        secs = time.perf_counter() - t0
    if task == "cloze":
        correct, k = 0, 0
        for row, _ in questions:
            scores = [sums[k + j] / len(row[1 + j]) for j in range(4)]
            k += 4
            correct += LETTERS[max(range(4), key=lambda j: (scores[j], -j))] == row[5]
        return name, len(questions), n_tokens, secs, correct / len(questions)
    return name, len(seqs), n_tokens, secs, -sum(sums) / sum(len(ids) - 1 for ids, _ in seqs)


if __name__ == "__main__":
    main()

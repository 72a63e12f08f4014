#!/usr/bin/env python3
"""HF-transformers reference for the evaluation tasks (MMLU letter k-shot, MMLU cloze,
BoolQ, C4 loss).

Usage:
    python scripts/reference/make_eval_reference.py \
        --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data \
        --out worker/tests/fixtures/smollm2/eval_reference.json

Task definitions (the Rust prompt builders must match them character for character):
  * subject display name = file subject with "_" -> " ".
  * MMLU letter (k = 5 shots): "The following are multiple choice questions (with answers)
    about {display}.\\n\\n" + for each of the first k dev rows
    "{q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n" + the test row
    "{q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:". Fields exactly as read by `csv`
    (no strip). Whole prompt tokenized at once. Prediction = argmax of the last-position
    logits over the ids of " A", " B", " C", " D" (ties -> first letter).
  * MMLU cloze (0-shot): context "Question: {q}\\nAnswer:", continuation " {choice}".
    whole = tok(context + continuation), ctx = tok(context), continuation tokens =
    whole[len(ctx):]. score = sum of log-softmax of the continuation tokens / len(choice)
    (Python character length, without the leading space). argmax (ties -> first).
  * BoolQ (0-shot): "{passage}\\nQuestion: {question}?\\nAnswer:"; pred = logit(" yes") >
    logit(" no") at the last position.
  * C4 loss: documents [first_doc, first_doc + samples) (0-based lines), each tokenized and
    truncated to seq_len tokens; token-weighted mean next-token NLL over all t-1 predicted
    positions of every document; normalized_loss = loss / ln(vocab size).

Tokenization: `tok(text)["input_ids"]` with the tokenizer defaults (no BOS for SmolLM2).
One plain full forward per prompt (batch 1, no KV-cache sharing), float32, eager attention,
one CPU thread (deterministic).
"""

import argparse
import csv
import json
import math
import os
import time

import torch

from make_fixtures import load_gguf, setup_torch  # same folder: deterministic torch, GGUF loading

SUBJECTS = ["abstract_algebra", "high_school_geography"]
SHOTS = 5
LIMIT_PER_SUBJECT = 20
BOOLQ_LIMIT = 40
C4_FILE = "c4/c4-en-train.00000-of-01024.first1000.jsonl"
C4_FIRST_DOC = 900
C4_SAMPLES = 16
C4_SEQ_LEN = 128
LETTERS = ["A", "B", "C", "D"]


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    for r in rows:
        assert len(r) == 6 and r[5] in LETTERS, (path, r)
    return rows


def format_mc(row, with_answer):
    q, a, b, c, d, ans = row
    s = f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    if with_answer:
        s += f" {ans}\n\n"
    return s


def mmlu_letter_prompt(subject, dev_rows, test_row, k):
    display = subject.replace("_", " ")
    s = f"The following are multiple choice questions (with answers) about {display}.\n\n"
    for r in dev_rows[:k]:
        s += format_mc(r, True)
    return s + format_mc(test_row, False)


def cloze_context(question):
    return f"Question: {question}\nAnswer:"


def boolq_prompt(passage, question):
    return f"{passage}\nQuestion: {question}?\nAnswer:"


def single_token(tok, text):
    ids = tok(text)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not a single token: {ids}"
    return ids[0]


def logits_for(model, ids):
    """ids: list[int] -> float32 logits [T, V] of one plain forward (batch 1)."""
    x = torch.tensor([ids], dtype=torch.long)
    return model(input_ids=x, use_cache=False).logits[0].float()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True, help="shared/data directory")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    setup_torch()
    model, tok = load_gguf(args.gguf)
    vocab = model.config.vocab_size

    letter_ids = [single_token(tok, " " + L) for L in LETTERS]
    yes_id, no_id = single_token(tok, " yes"), single_token(tok, " no")
    examples = {}
    timing = {}

    with torch.no_grad():
        # ---- MMLU letter, k-shot ----
        t0 = time.perf_counter()
        items, n_tok = [], 0
        for subj in SUBJECTS:
            dev = read_csv(os.path.join(args.data, "mmlu", "dev", f"{subj}_dev.csv"))
            test = read_csv(os.path.join(args.data, "mmlu", "test", f"{subj}_test.csv"))
            assert len(dev) >= SHOTS
            for i, row in enumerate(test[:LIMIT_PER_SUBJECT]):
                prompt = mmlu_letter_prompt(subj, dev, row, SHOTS)
                ids = tok(prompt)["input_ids"]
                n_tok += len(ids)
                last = logits_for(model, ids)[-1]
                ll = [float(last[t]) for t in letter_ids]
                pred = LETTERS[max(range(4), key=lambda j: (ll[j], -j))]
                items.append({"subject": subj, "index": i, "pred": pred, "answer": row[5],
                              "letter_logits": ll})
                if "mmlu_letter" not in examples:
                    examples["mmlu_letter"] = {"subject": subj, "index": i, "prompt": prompt,
                                               "input_ids": ids}
        mmlu = {"subjects": SUBJECTS, "shots": SHOTS, "limit_per_subject": LIMIT_PER_SUBJECT,
                "items": items,
                "accuracy": sum(it["pred"] == it["answer"] for it in items) / len(items)}
        timing["mmlu"] = (time.perf_counter() - t0, len(items), n_tok)

        # ---- MMLU cloze, 0-shot ----
        t0 = time.perf_counter()
        items, n_tok = [], 0
        for subj in SUBJECTS:
            test = read_csv(os.path.join(args.data, "mmlu", "test", f"{subj}_test.csv"))
            for i, row in enumerate(test[:LIMIT_PER_SUBJECT]):
                ctx = cloze_context(row[0])
                ctx_ids = tok(ctx)["input_ids"]
                scores = []
                for choice in row[1:5]:
                    whole = tok(ctx + " " + choice)["input_ids"]
                    cont = whole[len(ctx_ids):]
                    assert len(cont) >= 1, (subj, i, choice)
                    n_tok += len(whole)
                    lp = torch.log_softmax(logits_for(model, whole), dim=-1)
                    s = sum(float(lp[len(ctx_ids) + j - 1, t]) for j, t in enumerate(cont))
                    scores.append(s / len(choice))
                pred = LETTERS[max(range(4), key=lambda j: (scores[j], -j))]
                items.append({"subject": subj, "index": i, "pred": pred, "answer": row[5],
                              "scores": scores})
                if "mmlu_cloze" not in examples:
                    examples["mmlu_cloze"] = {"subject": subj, "index": i, "context": ctx,
                                              "continuations": [" " + c for c in row[1:5]],
                                              "context_ids": ctx_ids}
        cloze = {"subjects": SUBJECTS, "limit_per_subject": LIMIT_PER_SUBJECT, "items": items,
                 "accuracy": sum(it["pred"] == it["answer"] for it in items) / len(items)}
        timing["mmlu_cloze"] = (time.perf_counter() - t0, len(items), n_tok)

        # ---- BoolQ, 0-shot ----
        t0 = time.perf_counter()
        items, n_tok = [], 0
        with open(os.path.join(args.data, "boolq", "val.jsonl"), encoding="utf-8") as f:
            lines = [ln for _, ln in zip(range(BOOLQ_LIMIT), f)]
        for i, ln in enumerate(lines):
            ex = json.loads(ln)
            assert ex["label"] in ("true", "false"), ex["label"]
            prompt = boolq_prompt(ex["passage"], ex["question"])
            ids = tok(prompt)["input_ids"]
            n_tok += len(ids)
            last = logits_for(model, ids)[-1]
            diff = float(last[yes_id]) - float(last[no_id])
            pred = bool(last[yes_id] > last[no_id])
            items.append({"index": i, "pred": pred, "label": ex["label"] == "true",
                          "yes_minus_no": diff})
            if "boolq" not in examples:
                examples["boolq"] = {"index": i, "prompt": prompt, "input_ids": ids}
        boolq = {"limit": BOOLQ_LIMIT, "items": items,
                 "accuracy": sum(it["pred"] == it["label"] for it in items) / len(items)}
        timing["boolq"] = (time.perf_counter() - t0, len(items), n_tok)

        # ---- C4 loss ----
        t0 = time.perf_counter()
        with open(os.path.join(args.data, C4_FILE), encoding="utf-8") as f:
            all_lines = f.read().split("\n")
        docs = [json.loads(all_lines[j])["text"] for j in range(C4_FIRST_DOC, C4_FIRST_DOC + C4_SAMPLES)]
        nll_sum, n_pred = 0.0, 0
        for text in docs:
            ids = tok(text)["input_ids"][:C4_SEQ_LEN]
            if len(ids) < 2:
                continue
            lp = torch.log_softmax(logits_for(model, ids), dim=-1).double()
            tgt = torch.tensor(ids[1:], dtype=torch.long)
            nll_sum += float(-lp[:-1].gather(1, tgt[:, None]).sum())
            n_pred += len(ids) - 1
        loss = nll_sum / n_pred
        c4 = {"first_doc": C4_FIRST_DOC, "samples": C4_SAMPLES, "seq_len": C4_SEQ_LEN,
              "loss": loss, "normalized_loss": loss / math.log(vocab), "tokens": n_pred}
        timing["c4_loss"] = (time.perf_counter() - t0, C4_SAMPLES, n_pred)

    out = {
        "model": os.path.basename(args.gguf),
        "vocab_size": vocab,
        "token_ids": {" A": letter_ids[0], " B": letter_ids[1], " C": letter_ids[2],
                      " D": letter_ids[3], " yes": yes_id, " no": no_id},
        "mmlu": mmlu,
        "mmlu_cloze": cloze,
        "boolq": boolq,
        "c4_loss": c4,
        "examples": examples,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")

    print(f"wrote {args.out}")
    print(f"token ids: {out['token_ids']}")
    print(f"mmlu letter {SHOTS}-shot accuracy={mmlu['accuracy']:.4f} ({len(mmlu['items'])} questions)")
    print(f"mmlu cloze accuracy={cloze['accuracy']:.4f} ({len(cloze['items'])} questions)")
    print(f"boolq accuracy={boolq['accuracy']:.4f} ({len(boolq['items'])} questions)")
    print(f"c4 loss={c4['loss']:.6f} normalized={c4['normalized_loss']:.6f} tokens={c4['tokens']}")
    for k, (s, n, t) in timing.items():
        print(f"time {k}: {s:.2f} s for {n} items, {t} forwarded tokens")


if __name__ == "__main__":
    main()

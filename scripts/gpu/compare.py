#!/usr/bin/env python3
"""Comparisons for scripts/gpu-check.sh, numpy only (no torch, no safetensors package).

Each subcommand prints table rows, one per line, tab-separated:
    check <TAB> result <TAB> goal <TAB> verdict (PASS|FAIL|INFO) <TAB> note
and exits 0 (a FAIL verdict is a row, not an exit code; a missing input is an exception).

    compare.py logits    --ref CPU_F32.safetensors --test DEV.safetensors [--tol 0.08 --argmax 0.9]
    compare.py distances --ref CPU.csv --test DEV.csv [--tol 0.005]
    compare.py eval      --ref REF.json --test DEV.json --label WHAT [--points 0.5 --agree 0.98]
    compare.py losses    --ref TORCH.json --test OURS_EVAL.json [--tol 0.02]
    compare.py heal-log  --log train_log.csv [--steps 50]   (prints: steps tokens seconds tok/s first last)
"""

import argparse
import csv
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U32": np.uint32,
          "F16": np.float16, "U8": np.uint8}


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            f.seek(base + a)
            raw = f.read(b - a)
            if meta["dtype"] == "BF16":
                u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = u.view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=DTYPES[meta["dtype"]])
            out[name] = arr.reshape(meta["shape"])
    return out


def row(check, result, goal, verdict, note=""):
    print("\t".join(str(x).replace("\t", " ").replace("\n", " ") for x in (check, result, goal, verdict, note)))


def verdict(ok):
    return "PASS" if ok else "FAIL"


def cmd_logits(a):
    ref, test = read_safetensors(a.ref), read_safetensors(a.test)
    same_ids = np.array_equal(ref["ids"], test["ids"])
    row("token ids equal", "yes" if same_ids else "no", "yes", verdict(same_ids), f"{ref['ids'].shape[0]} tokens")
    r, t = ref["logits"].astype(np.float64), test["logits"].astype(np.float64)
    if r.shape != t.shape:
        row("logits shape", f"{t.shape} vs {r.shape}", "equal", "FAIL")
        return
    rel = float(np.abs(t - r).max() / np.abs(r).max())
    agree = float((t.argmax(-1) == r.argmax(-1)).mean())
    row("logits rel err max|Δ|/max|ref|", f"{rel:.4f}", f"≤ {a.tol}", verdict(rel <= a.tol), f"[{r.shape[0]}×{r.shape[1]}]")
    row("logits argmax agreement", f"{agree:.3f}", f"≥ {a.argmax}", verdict(agree >= a.argmax), f"{r.shape[0]} positions")
    if "states" in ref and "states" in test and ref["states"].shape == test["states"].shape:
        s, u = ref["states"].astype(np.float64), test["states"].astype(np.float64)
        per_layer = np.abs(u - s).max(axis=(1, 2)) / np.maximum(np.abs(s).max(axis=(1, 2)), 1e-30)
        row("residual states rel err (worst layer)", f"{per_layer.max():.4f}", "info", "INFO",
            f"layer {int(per_layer.argmax())} of {s.shape[0] - 1}")


def read_distances(path):
    d = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            d[(int(r["n"]), int(r["l"]))] = float(r["distance"])
    return d


def cmd_distances(a):
    ref, test = read_distances(a.ref), read_distances(a.test)
    if set(ref) != set(test):
        row("distance pairs", f"{len(test)} vs {len(ref)}", "same (n, l) pairs", "FAIL")
        return
    diff = max(abs(ref[k] - test[k]) for k in ref)
    row("distances max |Δd|", f"{diff:.5f}", f"≤ {a.tol}", verdict(diff <= a.tol), f"{len(ref)} (n, l) pairs")
    layers = max(n for n, _ in ref)
    equal = clear = clear_equal = 0
    for n in range(1, layers + 1):
        rr = sorted((v, l) for (m, l), v in ref.items() if m == n)
        tt = min((v, l) for (m, l), v in test.items() if m == n)
        same = rr[0][1] == tt[1]
        equal += same
        if len(rr) > 1 and rr[1][0] - rr[0][0] > 2 * max(diff, 1e-12):
            clear += 1
            clear_equal += same
    row("l*(n) equal where the f32 margin > 2·max|Δd|", f"{clear_equal}/{clear}", "all", verdict(clear_equal == clear),
        f"{equal}/{layers} equal over all n")


def eval_items(path):
    d = json.load(open(path))
    items, seen = {}, {}
    for p in d["predictions"]:
        if "subject" in p:  # MMLU: the k-th question of a subject (data order within a subject)
            k = seen.get(p["subject"], 0)
            seen[p["subject"]] = k + 1
            key = (p["subject"], k)
        else:
            key = p["index"]
        items[key] = p
    return d, items


def correct(p):
    if "answer" in p:
        return p["pred"] == p["answer"]
    return p["pred"] == p["label"]


def cmd_eval(a):
    rd, ref = eval_items(a.ref)
    td, test = eval_items(a.test)
    keys = [k for k in ref if k in test]
    if not keys:
        row(f"{a.label}: items in common", "0", "> 0", "FAIL")
        return
    agree = sum(ref[k]["pred"] == test[k]["pred"] for k in keys) / len(keys)
    acc_r = sum(correct(ref[k]) for k in keys) / len(keys)
    acc_t = sum(correct(test[k]) for k in keys) / len(keys)
    delta = 100 * (acc_t - acc_r)
    row(f"{a.label}: accuracy on the {len(keys)} common items", f"{acc_t:.4f} vs {acc_r:.4f} (Δ {delta:+.2f} pt)",
        f"|Δ| ≤ {a.points} pt", verdict(abs(delta) <= a.points), f"ref {a.ref_name or a.ref}")
    note = ""
    clear_ok = True
    if all("yes_minus_no" in ref[k] for k in keys):
        clear = [k for k in keys if abs(ref[k]["yes_minus_no"]) > a.noise]
        ca = sum(ref[k]["pred"] == test[k]["pred"] for k in clear) / max(len(clear), 1)
        note = f"{ca:.3f} of {len(clear)} with |yes−no| > {a.noise}"
        clear_ok = ca >= a.agree
        row(f"{a.label}: predictions equal", f"{agree:.4f}", f"≥ 0.9, ≥ {a.agree} where clear",
            verdict(agree >= 0.9 and clear_ok), note)
    else:
        row(f"{a.label}: predictions equal", f"{agree:.4f}", f"≥ {a.agree}", verdict(agree >= a.agree),
            "MMLU letter: no margin recorded")


def cmd_losses(a):
    ref = json.load(open(a.ref))
    test = json.load(open(a.test))
    lr, lt = ref["loss"], test["loss"]
    row("mean next-token loss, ours vs torch", f"{lt:.5f} vs {lr:.5f}", f"|Δ| ≤ {a.tol}", verdict(abs(lt - lr) <= a.tol),
        f"{test.get('tokens')} vs {ref.get('tokens')} tokens")
    per_r = {p["index"]: p["loss"] for p in ref.get("predictions", [])}
    per_t = {p["index"]: p["loss"] for p in test.get("predictions", [])}
    common = [k for k in per_r if k in per_t]
    if common:
        worst = max(abs(per_r[k] - per_t[k]) for k in common)
        row("per-document loss max |Δ|", f"{worst:.5f}", "info", "INFO", f"{len(common)} documents")


def cmd_heal_log(a):
    rows = list(csv.DictReader(open(a.log)))
    if not rows:
        print("0 0 0 0 nan nan")
        return
    last = rows[-1]
    tokens, secs = int(last["tokens"]), float(last["seconds"])
    # steady state: from the end of step 1 (kernel loading, first allocations) to the last step
    if len(rows) > 1:
        t1, s1 = int(rows[0]["tokens"]), float(rows[0]["seconds"])
        steady = (tokens - t1) / max(secs - s1, 1e-9)
    else:
        steady = tokens / max(secs, 1e-9)
    print(len(rows), tokens, f"{secs:.3f}", f"{steady:.1f}", rows[0]["loss"], last["loss"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits")
    p.add_argument("--ref", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--tol", type=float, default=0.08)
    p.add_argument("--argmax", type=float, default=0.9)
    p = sub.add_parser("distances")
    p.add_argument("--ref", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--tol", type=float, default=0.005)
    p = sub.add_parser("eval")
    p.add_argument("--ref", required=True)
    p.add_argument("--ref-name", default="")
    p.add_argument("--test", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--points", type=float, default=0.5)
    p.add_argument("--agree", type=float, default=0.98)
    p.add_argument("--noise", type=float, default=0.1)
    p = sub.add_parser("losses")
    p.add_argument("--ref", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--tol", type=float, default=0.02)
    p = sub.add_parser("heal-log")
    p.add_argument("--log", required=True)
    a = ap.parse_args()
    {"logits": cmd_logits, "distances": cmd_distances, "eval": cmd_eval, "losses": cmd_losses,
     "heal-log": cmd_heal_log}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

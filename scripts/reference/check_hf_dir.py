#!/usr/bin/env python3
"""Check that an HF model directory (e.g. one written by the Rust tool) loads and
runs in HF transformers, optionally comparing it against the GGUF original.

Usage:
    python scripts/reference/check_hf_dir.py DIR [--gguf PATH] [--drop START:N]
        [--prompt TEXT | --prompt-file FILE] [--tol X] [--self-test]

* Loads DIR with AutoModelForCausalLM + AutoTokenizer (float32, eager attention).
* Runs the prompt (default: the SmolLM2 fixture prompt) and prints the top-1
  next token.
* With --gguf: loads the GGUF model via transformers, removes the same decoder
  layers [START, START+N) if --drop is given, runs the same token ids and prints
  the max |diff| of the logits (last position and all positions) and whether
  the tokenizers agree.  Exits non-zero if the tokenizers disagree, the top-1
  tokens differ, or the last-position max |diff| exceeds --tol (default 1e-2).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import SMOL_PROMPT, drop_layers, load_gguf, setup_torch  # noqa: E402


def parse_drop(s):
    if s is None:
        return None
    start, n = s.split(":")
    return int(start), int(n)


def export_gguf_as_hf(gguf, drop, out_dir):
    """Write the (dequantized, f32) GGUF model as a plain HF directory."""
    import copy
    import shutil

    model, tok = load_gguf(gguf)
    if drop:
        model = drop_layers(model, *drop)
    # a GGUF-loaded model refuses save_pretrained (quantization_config), so rebuild a plain one
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict())
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    print(f"[self-test] wrote {out_dir} from {gguf} (drop={drop})")


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="HF model directory (config.json, *.safetensors, tokenizer files)")
    ap.add_argument("--gguf", help="GGUF file to compare against")
    ap.add_argument("--drop", type=parse_drop, help="START:N layers removed from the GGUF reference")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="file containing the prompt (read verbatim)")
    ap.add_argument("--tol", type=float, default=1e-2,
                    help="fail if the last-position max|logits diff| vs the GGUF reference exceeds this "
                         "(default 1e-2, fits f32 weights; use a larger value for f16/bf16 dirs, inf to skip)")
    ap.add_argument("--self-test", action="store_true",
                    help="first (re)create DIR from --gguf (with --drop applied) via save_pretrained; "
                         "used to test this script without a Rust-written directory")
    args = ap.parse_args()

    setup_torch()
    import transformers as tf

    if args.self_test:
        if not args.gguf:
            ap.error("--self-test needs --gguf")
        export_gguf_as_hf(args.gguf, args.drop, args.dir)

    if args.prompt is not None:
        prompt = args.prompt
    elif args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = SMOL_PROMPT

    tok = tf.AutoTokenizer.from_pretrained(args.dir)
    model = tf.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    print(f"[dir] {args.dir}: {type(model).__name__}, layers={cfg.num_hidden_layers}, "
          f"hidden={cfg.hidden_size}, vocab={cfg.vocab_size}, tokenizer={type(tok).__name__}")
    ids = tok(prompt)["input_ids"]
    print(f"[dir] prompt {prompt!r} -> {len(ids)} ids: {ids}")
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x, use_cache=False).logits[0].float()
    top1 = int(logits[-1].argmax())
    print(f"[dir] top-1 next token: id={top1} {tok.decode([top1])!r} (logit {logits[-1, top1]:.4f})")

    ok = True
    if args.gguf:
        ref, rtok = load_gguf(args.gguf)
        if args.drop:
            ref = drop_layers(ref, *args.drop)
        rids = rtok(prompt)["input_ids"]
        print(f"[gguf] layers={len(ref.model.layers)} (drop={args.drop}); tokenizer ids "
              f"{'MATCH' if rids == ids else 'DIFFER: ' + str(rids)}")
        if rids != ids:
            ok = False
        if ref.config.vocab_size != cfg.vocab_size:
            print(f"[gguf] vocab size differs: {ref.config.vocab_size} vs {cfg.vocab_size}")
            ok = False
        rlogits = ref(input_ids=x, use_cache=False).logits[0].float()
        rtop1 = int(rlogits[-1].argmax())
        V = min(rlogits.shape[-1], logits.shape[-1])
        d_last = (rlogits[-1, :V] - logits[-1, :V]).abs().max().item()
        d_all = (rlogits[:, :V] - logits[:, :V]).abs().max().item()
        print(f"[gguf] top-1 next token: id={rtop1} {rtok.decode([rtop1])!r} (logit {rlogits[-1, rtop1]:.4f})")
        print(f"[cmp] max|logits diff| last position: {d_last:.6g}; all positions: {d_all:.6g}; "
              f"max|ref logit|: {rlogits.abs().max():.4g}; top-1 {'same' if rtop1 == top1 else 'DIFFERENT'}")
        if rtop1 != top1:
            ok = False
        if not d_last <= args.tol:
            print(f"[cmp] FAIL: {d_last:.6g} > tol {args.tol}")
            ok = False
    print("RESULT:", "OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

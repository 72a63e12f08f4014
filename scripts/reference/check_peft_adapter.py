#!/usr/bin/env python3
"""Check that a `worker heal` adapter folder loads with HF PEFT and gives prunesweep's logits.

Usage:
    python scripts/reference/check_peft_adapter.py --base PRUNED_HF_DIR --adapter ADAPTER_DIR \
        --forward FORWARD.safetensors [--tol 1e-4]

PRUNED_HF_DIR is the base the adapter was trained on as an HF directory (`worker prune --layers
S:N --out DIR`, or the unpruned HF directory). FORWARD.safetensors is the output of
`worker forward --model PRUNED_HF_DIR --adapter ADAPTER_DIR --prompt-file P --out F` (its `ids`
and `logits`). The script loads the base in float32 with transformers, wraps it with
`peft.PeftModel.from_pretrained(base, ADAPTER_DIR)` (eval mode: no dropout), runs the same ids and
prints max |Δlogits| / max |logits|. Exit status 1 when it exceeds --tol, or when the adapter does
not change the logits at all (an adapter that PEFT silently ignored).

scripts/check-peft.sh runs the whole chain on SmolLM2.
"""

import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--forward", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()

    ours = load_file(a.forward)
    ids = ours["ids"].long().unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    base.eval()
    with torch.inference_mode():
        plain = base(ids).logits[0].float()
    model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    with torch.inference_mode():
        ref = model(ids).logits[0].float()
    got = ours["logits"].float()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    moved = ((ref - plain).abs().max() / plain.abs().max()).item()
    print(f"tokens={ids.shape[1]} rel_err(prunesweep, peft)={rel:.3e} adapter_effect={moved:.3e} tol={a.tol:g}")
    if moved == 0.0:
        print("FAIL: PEFT's adapter does not change the logits (not loaded?)")
        sys.exit(1)
    if rel > a.tol:
        print("FAIL")
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()

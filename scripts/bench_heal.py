#!/usr/bin/env python3
"""Training throughput of torch + PEFT LoRA on SmolLM2 (the reference row of bench-heal.sh).

Usage:
    python scripts/bench_heal.py GGUF C4_JSONL STEPS SEQ_LEN MICRO_BATCH RANK [checkpointing]

What it runs, matching `worker heal --batch MICRO_BATCH --micro-batch MICRO_BATCH`:
  * the model from the GGUF (dequantized) in float32, `torch.set_num_threads(os.cpu_count())`;
  * PEFT LoRA r=RANK, alpha=RANK, dropout 0.05 on gate_proj/up_proj/down_proj (the paper's targets);
  * data packed as prunesweep packs it: tok(text)["input_ids"] per document + EOS, joined, cut into
    SEQ_LEN chunks;
  * AdamW (lr 3e-4, weight decay 0), gradient clipping at 1.0, one update per MICRO_BATCH sequences,
    next-token loss over all positions (labels = input_ids).
The base stays float32: bitsandbytes' NF4 needs a CUDA build, so this row is plain LoRA (the
prunesweep `--no-quantize` row is the like-for-like comparison; its NF4 row is QLoRA).
With `checkpointing`, transformers' gradient checkpointing is on (each decoder layer's activations
recomputed in the backward pass, non-reentrant, as prunesweep's default recomputation does) and the
row is named transformers-peft-ckpt.
The first update is a warm-up and is not timed. Prints
  BENCH transformers-peft steps=N tokens=T seconds=S tok_s=X peak_rss_mib=M
"""

import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf, c4, steps, seq_len, micro, rank = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    checkpointing = sys.argv[7:] == ["checkpointing"]
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05, target_modules=["gate_proj", "up_proj", "down_proj"],
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    need = (steps + 1) * micro * seq_len
    ids = []
    with open(c4) as fh:
        for line in fh:
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
            if len(ids) >= need:
                break
    chunks = torch.tensor(ids[: need // seq_len * seq_len]).view(-1, seq_len)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.0)

    def update(i):
        batch = chunks[(i * micro) % len(chunks):][:micro]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    update(0)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        update(i)
    secs = time.perf_counter() - t0
    tokens = steps * micro * seq_len
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    name = "transformers-peft-ckpt" if checkpointing else "transformers-peft"
    print(f"BENCH {name} steps={steps} tokens={tokens} seconds={secs:.2f} tok_s={tokens / secs:.1f} "
          f"peak_rss_mib={rss:.0f}")


if __name__ == "__main__":
    main()

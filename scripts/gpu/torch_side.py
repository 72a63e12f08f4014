#!/usr/bin/env python3
"""The torch + transformers (+ PEFT) side of scripts/gpu-check.sh's step (d): the same model folder,
the same documents and token ids as `worker eval --task c4-loss` / `worker heal`, in bf16 with
PyTorch's SDPA attention, on the same GPU. Prints one JSON object (and writes it to --out).

    torch_side.py forward --model DIR --data C4.jsonl --limit 32 --seq-len 2048 --batch 4 --out F.json
    torch_side.py heal    --model DIR --data C4.jsonl --steps 50 --batch 4 --micro-batch 4 \
                          --seq-len 2048 --rank 64 --targets ffn --quantize yes|no --out H.json

forward: what `worker eval --task c4-loss` computes: each document tokenized with the tokenizer's
defaults (BOS), truncated to --seq-len, documents under 2 tokens skipped, batches of --batch
right-padded; the token-weighted mean next-token loss and per-document losses (compared with ours
by compare.py losses); tokens and seconds over the whole loop (tokenizing included, as ours).

heal: what `worker heal` trains: documents tokenized (BOS), each followed by EOS, joined and cut
into --seq-len chunks; LoRA r = α = --rank, dropout 0.05, on gate/up/down (ffn) of every block;
AdamW (lr 3e-4, no weight decay), linear warmup (a tenth of the run) then cosine to 0, gradient
accumulation from --micro-batch to --batch, global-norm clipping at 1.0; no gradient
checkpointing (nor does ours). --quantize yes loads the base in NF4 with double quantization and
bf16 compute (QLoRA, bitsandbytes); no trains plain LoRA on the bf16 base. --max-seconds stops
after the step that crosses it (the JSON says how many steps ran).
"""

import argparse
import json
import math
import os
import sys
import time


def read_docs(path, first, limit):
    docs = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < first:
                continue
            if limit is not None and len(docs) >= limit:
                break
            line = line.strip()
            if line:
                docs.append(json.loads(line)["text"])
    return docs


def load_model(torch, a, quantize=False):
    import transformers

    kw = {"attn_implementation": "sdpa"}
    if quantize:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if a.device.startswith("cuda"):
        kw["device_map"] = {"": torch.device(a.device).index or 0}

    def load(**extra):
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, **kw, **extra)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            return transformers.AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16, **kw, **extra)

    try:
        model = load()
    except (ImportError, ValueError) as e:  # device_map without accelerate: load, then move
        if quantize or "device_map" not in kw:
            raise
        print(f"device_map failed ({e}); loading on the host, then moving", file=sys.stderr)
        kw.pop("device_map")
        model = load()
    if "device_map" not in kw:
        model = model.to(a.device)
    model.config.use_cache = False
    return model, transformers.__version__


def sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mem(torch, device):
    if not device.startswith("cuda"):
        return {}
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def cmd_forward(torch, a):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    t0 = time.time()
    model, tv = load_model(torch, a)
    model.eval()
    sync(torch, a.device)
    load_s = time.time() - t0
    docs = read_docs(a.data, a.first_doc, a.limit)
    sync(torch, a.device)
    started = time.time()
    seqs, index = [], []
    for i, d in enumerate(docs):
        ids = tok.encode(d).ids[: a.seq_len]
        if len(ids) >= 2:
            seqs.append(ids)
            index.append(i)
    nll, count, preds, batch_times = 0.0, 0, [], []
    with torch.inference_mode():
        for c in range(0, len(seqs), a.batch):
            b0 = time.time()
            chunk = seqs[c : c + a.batch]
            t = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), t), dtype=torch.long)
            att = torch.zeros((len(chunk), t), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                att[j, : len(s)] = 1
            ids, att = ids.to(a.device), att.to(a.device)
            logits = model(input_ids=ids, attention_mask=att).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt = logp.gather(-1, ids[:, 1:, None])[..., 0]
            mask = att[:, 1:].float()
            per_doc = -(tgt * mask).sum(-1)
            per_doc = per_doc.double().cpu().tolist()
            for j, s in enumerate(chunk):
                preds.append({"index": index[c + j], "tokens": len(s) - 1, "loss": per_doc[j] / (len(s) - 1)})
                nll += per_doc[j]
                count += len(s) - 1
            sync(torch, a.device)
            batch_times.append(time.time() - b0)
    sync(torch, a.device)
    seconds = time.time() - started
    tokens = sum(len(s) for s in seqs)
    steady = (sum(len(s) for s in seqs[a.batch:]) / max(sum(batch_times[1:]), 1e-9)) if len(batch_times) > 1 else None
    return {"side": "torch", "task": "c4-loss", "transformers": tv, "loss": nll / count, "n": len(seqs),
            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "steady_tokens_per_second": steady, "first_batch_seconds": batch_times[0] if batch_times else None,
            "load_seconds": load_s, "predictions": preds, **mem(torch, a.device)}


FFN = {"ffn": ["gate_proj", "up_proj", "down_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}
FFN["all-linear"] = FFN["ffn"] + FFN["attention"]


def cmd_heal(torch, a):
    from peft import LoraConfig, get_peft_model
    import peft
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        eos = tok.token_to_id("</s>")
    quantize = a.quantize == "yes"
    bnb_version = None
    if quantize:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    t0 = time.time()
    model, tv = load_model(torch, a, quantize=quantize)
    targets = FFN.get(a.targets, a.targets.split(","))
    lcfg = LoraConfig(r=a.rank, lora_alpha=a.alpha or a.rank, lora_dropout=0.05, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    sync(torch, a.device)
    load_s = time.time() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    adapter_dtypes = sorted({str(p.dtype) for p in trainable})

    # packed chunks, as worker heal: BOS (tokenizer default) + doc + EOS, joined, cut into seq_len
    need = a.steps * a.batch
    chunks, stream, first = [], [], a.first_doc
    while len(chunks) < need:
        docs = read_docs(a.data, first, 256)
        if not docs:
            if not chunks and not stream:
                raise SystemExit("no documents")
            first = 0  # wrap around
            continue
        first += len(docs)
        for d in docs:
            stream.extend(tok.encode(d).ids)
            stream.append(eos)
            while len(stream) >= a.seq_len and len(chunks) < need:
                chunks.append(stream[: a.seq_len])
                stream = stream[a.seq_len :]
    data = torch.tensor(chunks, dtype=torch.long)

    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = a.warmup if a.warmup is not None else (100 if a.steps >= 1000 else max(1, a.steps // 10))

    def lr_at(step):  # step = 0-based update index
        if step < warmup:
            return a.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, a.steps - warmup)
        return a.lr * 0.5 * (1 + math.cos(math.pi * p))

    micro = a.micro_batch or a.batch
    accum = a.batch // micro
    if torch.cuda.is_available() and a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    log, started = [], time.time()
    sync(torch, a.device)
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss_sum = 0.0
        for m in range(accum):
            lo = step * a.batch + m * micro
            x = data[lo : lo + micro].to(a.device)
            out = model(input_ids=x, labels=x)
            (out.loss / accum).backward()
            loss_sum += out.loss.item()
        norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(torch, a.device)
        log.append({"step": step + 1, "loss": loss_sum / accum, "grad_norm": norm,
                    "tokens": (step + 1) * a.batch * a.seq_len, "seconds": time.time() - started})
        if a.max_seconds and log[-1]["seconds"] > a.max_seconds and step + 1 < a.steps:
            break
    last = log[-1]
    steady = ((last["tokens"] - log[0]["tokens"]) / max(last["seconds"] - log[0]["seconds"], 1e-9)) if len(log) > 1 else None
    return {"side": "torch+peft", "transformers": tv, "peft": peft.__version__, "bitsandbytes": bnb_version,
            "quantized": quantize, "steps": len(log), "steps_asked": a.steps, "tokens": last["tokens"],
            "seconds": last["seconds"], "tokens_per_second": last["tokens"] / last["seconds"],
            "steady_tokens_per_second": steady, "first_loss": log[0]["loss"], "last_loss": last["loss"],
            "trainable_parameters": n_trainable, "adapter_dtypes": adapter_dtypes, "load_seconds": load_s,
            "log": log, **mem(torch, a.device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("forward", "heal"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--device", default="cuda:0")
        p.add_argument("--first-doc", type=int, default=0)
        p.add_argument("--seq-len", type=int, default=2048)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--out", required=True)
    p = sub.choices["forward"]
    p.add_argument("--limit", type=int, default=32)
    p = sub.choices["heal"]
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--micro-batch", type=int, default=0)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--targets", default="ffn")
    p.add_argument("--quantize", choices=["yes", "no"], default="no")
    p.add_argument("--max-seconds", type=float, default=0)
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": "no torch"}))
        return 3
    torch.manual_seed(0)
    result = (cmd_forward if a.cmd == "forward" else cmd_heal)(torch, a)
    result.update({"torch": torch.__version__, "device": a.device,
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    brief = {k: v for k, v in result.items() if k not in ("predictions", "log")}
    print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A random-weight Llama checkpoint (HF directory) for throughput checks: Llama-2-7B's shapes by
default (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000), deterministic seed.

    python3 scripts/gpu/make_random_llama.py --out DIR [--device cuda] [--hidden 64 --layers 2 ...]

With torch (the GPU box): the model is built by transformers (`LlamaConfig`, `LlamaForCausalLM`)
directly on the device (`torch.device(...)` as the default device, bf16 as the default dtype, so
no f32 copy and no host copy of the weights exist until saving) and saved with `save_pretrained`
(safetensors shards + config.json).

Without torch (the CPU dry run on a machine with numpy only): the same tensor names and shapes are
written with numpy (normal(0, 0.02), norms = 1), in bf16 and in 2 shards with an index by default
(the layout the torch route produces), and the JSON line says `"backend": "numpy"`.

Either way the folder gets a tokenizer our worker and the `tokenizers` library load: a byte-level
BPE with no merges (one token per UTF-8 byte), `<unk>`/`<s>`/`</s>` = 0/1/2, `<s>` prepended as
Llama's tokenizer does, padded to `--vocab` with never-produced `<extra_i>` tokens. Prints one JSON
line (backend, parameters, seconds to build and to save).
"""

import argparse
import json
import os
import sys
import time


def byte_alphabet():
    """GPT-2's byte → printable-char map (what tokenizers' ByteLevel uses), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_json(vocab_size):
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in byte_alphabet():
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"<extra_{i}>"] = len(vocab)
        i += 1
    if len(vocab) > vocab_size:
        raise SystemExit(f"vocab {vocab_size} is below the {len(vocab)} tokens a byte-level tokenizer needs")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(specials)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def config_dict(a, dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads or a.heads,
        "head_dim": a.hidden // a.heads,
        "vocab_size": a.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": dtype,
        "use_cache": False,
    }


def build_torch(a, torch):
    import transformers

    cfg = config_dict(a, "bfloat16")
    cfg.pop("architectures")
    cfg.pop("model_type")
    cfg.pop("torch_dtype")
    cfg.pop("rope_theta")  # 10000 is every version's default; transformers 5 wants rope_parameters
    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(a.seed)
    if a.device.startswith("cuda"):
        torch.cuda.manual_seed_all(a.seed)
    t0 = time.time()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(a.device), torch.no_grad():
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16)  # no-op when built in bf16; guards versions that keep f32 norms
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    built = time.time() - t0
    params = sum(p.numel() for p in model.parameters())
    dev = str(next(model.parameters()).device)
    t0 = time.time()
    model.save_pretrained(a.out, max_shard_size="5GB")
    saved = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else 0
    return {"backend": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
            "built_on": dev, "dtype": "bfloat16", "parameters": params, "build_seconds": round(built, 2),
            "save_seconds": round(saved, 2), "peak_gpu_bytes": peak}


def build_numpy(a):
    import numpy as np

    rng = np.random.default_rng(a.seed)
    h, i, v, kvh = a.hidden, a.intermediate, a.vocab, a.kv_heads or a.heads
    hd = h // a.heads
    t0 = time.time()
    tensors = {}

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    tensors["model.embed_tokens.weight"] = normal(v, h)
    for l in range(a.layers):
        p = f"model.layers.{l}."
        tensors[p + "self_attn.q_proj.weight"] = normal(h, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(kvh * hd, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(kvh * hd, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, h)
        tensors[p + "mlp.gate_proj.weight"] = normal(i, h)
        tensors[p + "mlp.up_proj.weight"] = normal(i, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, i)
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    tensors["model.norm.weight"] = np.ones(h, np.float32)
    tensors["lm_head.weight"] = normal(v, h)
    if a.numpy_dtype == "bfloat16":
        tensors = {k: to_bf16_bits(v) for k, v in tensors.items()}
    built = time.time() - t0
    t0 = time.time()
    # the layout transformers writes for a large model: shards plus model.safetensors.index.json
    names = list(tensors)
    shards = max(1, min(a.numpy_shards, len(names)))
    per = -(-len(names) // shards)
    groups = [names[i : i + per] for i in range(0, len(names), per)]
    if len(groups) == 1:
        write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
    else:
        weight_map, total = {}, 0
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(os.path.join(a.out, fname), {k: tensors[k] for k in g})
            for k in g:
                weight_map[k] = fname
                total += tensors[k].nbytes
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config_dict(a, a.numpy_dtype), f, indent=2)
    saved = time.time() - t0
    return {"backend": "numpy", "built_on": "cpu", "dtype": a.numpy_dtype, "files": len(groups),
            "parameters": int(sum(t.size for t in tensors.values())),
            "build_seconds": round(built, 2), "save_seconds": round(saved, 2), "peak_gpu_bytes": 0}


def to_bf16_bits(x):
    """f32 → bf16 (round to nearest even), as uint16 bit patterns."""
    import numpy as np

    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path, tensors):
    """A minimal safetensors writer (f32, or bf16 given as uint16 bits), so the numpy route needs no
    safetensors package."""
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        t = tensors[name]
        dtype = "BF16" if t.dtype.name == "uint16" else "F32"
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            f.write(tensors[name].tobytes(order="C"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=0, help="default: = heads (Llama-2-7B has no GQA)")
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=["auto", "torch", "numpy"], default="auto")
    ap.add_argument("--numpy-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="numpy route: the stored dtype (default bf16, as the torch route)")
    ap.add_argument("--numpy-shards", type=int, default=2,
                    help="numpy route: safetensors files (with an index when > 1, as transformers shards)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch = None
    if a.backend in ("auto", "torch"):
        try:
            import torch  # noqa: F811
        except ImportError:
            if a.backend == "torch":
                raise
    if torch is not None and a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: torch {torch.__version__} sees no CUDA device")
    info = build_torch(a, torch) if torch is not None else build_numpy(a)
    with open(os.path.join(a.out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(a.vocab), f, ensure_ascii=False)
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "model_max_length": 4096}, f, indent=2)
    info.update({"out": a.out, "seed": a.seed, "shapes": {k: getattr(a, k) for k in
                 ("hidden", "layers", "heads", "intermediate", "vocab")}})
    print(json.dumps(info))


if __name__ == "__main__":
    sys.exit(main())

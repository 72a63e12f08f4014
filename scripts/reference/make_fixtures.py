#!/usr/bin/env python3
"""Generate HF-transformers reference fixtures for the Rust decoder parity tests.

Usage:
    python scripts/reference/make_fixtures.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out worker/tests/fixtures

Deterministic (fixed seeds, single CPU thread, float32, eager attention) and
idempotent (every output directory it owns is rewritten from scratch).

Conventions (shared by all `reference.safetensors` files):
  * `states[l]` is the residual stream ENTERING decoder layer l (states[0] is the
    embedding output); `states[L]` is the output of the LAST decoder layer,
    BEFORE the final norm.  Captured with forward hooks, not with
    `output_hidden_states` (whose last entry is post-norm).
  * `dropped_*` = the same model with layers [1, 2] removed ("drop START=1 N=2").
"""

import argparse
import copy
import json
import os
import shutil

import torch
from torch import nn

from safetensors.torch import save_file

TINY_FAMILIES = ["llama", "mistral", "qwen2", "phi3", "phi"]
TINY_PROMPT = "The cat sat."  # 12 byte tokens
TINY_PROMPT2 = "Dog ran"  # 7 byte tokens (row 1 of the batch check)
TINY_T = 12
TINY_DROP = (1, 2)  # START, N
SMOL_PROMPT = "The capital of France is Paris. The capital of Germany is"
SEED = 1234

TOKENIZER_CASES = [
    "Hello world! This is a plain English sentence.",
    " leading space and trailing space ",
    "multiple   spaces    here  and     there",
    "line one\nline two\n\n\ttabbed\tcolumns\r\nwindows line",
    "12345 and 3.14159",
    "Café naïve résumé — déjà vu; 東京は日本の首都です。 😀🚀👍🏽",
    "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3]; // comment\n    println!(\"{:?}\", x);\n}",
    "<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>",
    "",
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer: B\n\n",
    "I'm can't won't they'll we've HELLO Hello hELLO",
    # Runs of spaces before digits (C4 box scores): transformers' GGUF tokenizer applies no
    # digit pre-split, so these spaces are tokenized by the GPT-2 regex alone.
    "1:57 Pit Bleier 0             Bas Draw/SI              4-3 sZ Run-Harris, F.",
    "x  1  22   333    4444\t 5\n  6",
]


# ----------------------------------------------------------------------------
# generic helpers (also imported by check_hf_dir.py)
# ----------------------------------------------------------------------------

def setup_torch():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # reproducible reduction order
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)


def decoder_layers(model):
    return model.model.layers


def final_norm(model):
    inner = model.model
    for name in ("norm", "final_layernorm"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise AttributeError("no final norm found")


def drop_layers(model, start, n):
    """Return a deep copy of `model` with decoder layers [start, start+n) removed."""
    m = copy.deepcopy(model)
    layers = decoder_layers(m)
    L = len(layers)
    assert 0 <= start and n >= 0 and start + n <= L, (start, n, L)
    keep = [i for i in range(L) if not (start <= i < start + n)]
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    m.model.layers = new_layers
    m.config.num_hidden_layers = len(keep)
    lt = getattr(m.config, "layer_types", None)
    if lt is not None and len(lt) == L:
        m.config.layer_types = [lt[i] for i in keep]
    m.eval()
    return m


@torch.no_grad()
def run_with_states(model, ids, check_hidden=True):
    """ids: LongTensor [T]. Returns (logits [T,V], states [L+1,T,H])."""
    layers = decoder_layers(model)
    L = len(layers)
    pre, post = [], []

    def pre_hook(mod, args, kwargs):
        hs = args[0] if len(args) > 0 else kwargs["hidden_states"]
        pre.append(hs.detach().clone())

    def post_hook(mod, args, kwargs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        post.append(out.detach().clone())

    handles = [l.register_forward_pre_hook(pre_hook, with_kwargs=True) for l in layers]
    handles.append(layers[-1].register_forward_hook(post_hook, with_kwargs=True))
    try:
        out = model(input_ids=ids[None, :], use_cache=False, output_hidden_states=check_hidden)
    finally:
        for h in handles:
            h.remove()
    assert len(pre) == L and len(post) == 1, (len(pre), len(post), L)
    states = torch.stack([p[0] for p in pre] + [post[0][0]], dim=0).float()
    logits = out.logits[0].float()

    if check_hidden:
        hs = out.hidden_states
        assert len(hs) == L + 1, len(hs)
        for l in range(L):
            d = (hs[l][0] - states[l]).abs().max().item()
            assert d == 0.0, f"hidden_states[{l}] != hook state (max diff {d})"
    # states[L] must be pre-norm: lm_head(norm(states[L])) reproduces the logits.
    re = model.lm_head(final_norm(model)(states[L][None]))[0]
    d = (re - logits).abs().max().item()
    assert d < 1e-4 * max(1.0, logits.abs().max().item()), f"pre-norm check failed: {d}"
    return logits, states


def write_safetensors(path, tensors):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------
# Part 1: tiny random checkpoints
# ----------------------------------------------------------------------------

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
)


def make_tiny_model(family):
    import transformers as tf

    kw = dict(COMMON)
    if family == "llama":
        kw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = tf.LlamaConfig(**kw)
        cls = tf.LlamaForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(sliding_window=4, **kw)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(tie_word_embeddings=True, **kw)
        cls = tf.Qwen2ForCausalLM
    elif family == "phi3":
        cfg = tf.Phi3Config(rope_scaling=None, sliding_window=None, **kw)
        cls = tf.Phi3ForCausalLM
    elif family == "phi":
        cfg = tf.PhiConfig(partial_rotary_factor=0.5, hidden_act="gelu_new",
                           tie_word_embeddings=False, **kw)
        cls = tf.PhiForCausalLM
    else:
        raise ValueError(family)
    seed = SEED + TINY_FAMILIES.index(family)  # distinct weights per family
    torch.manual_seed(seed)
    model = cls(cfg)
    model.eval()
    reinit_params(model, seed)
    if family == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight, "qwen2 must stay tied"
    return model


@torch.no_grad()
def reinit_params(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied params are yielded once
        if name.endswith("bias"):
            new = 0.1 * torch.randn(p.shape, generator=g)
        elif p.dim() == 1:  # norm weight
            new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            new = 0.2 * torch.randn(p.shape, generator=g)
        p.copy_(new.to(p.dtype))


def build_byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(alphabet):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    return tok


TINY_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 512,
}


def write_tiny_tokenizer(d):
    from transformers import AutoTokenizer

    tok = build_byte_tokenizer()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(TINY_TOKENIZER_CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    hf = AutoTokenizer.from_pretrained(d)
    enc = hf("Hello world")["input_ids"]
    assert hf.decode(enc) == "Hello world", hf.decode(enc)
    assert enc == tok.encode("Hello world").ids, (enc, tok.encode("Hello world").ids)
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.unk_token_id == 0
    return hf


@torch.no_grad()
def make_tiny(family, out_root):
    d = os.path.join(out_root, f"tiny-{family}")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    model = make_tiny_model(family)
    model.save_pretrained(d, safe_serialization=True)
    hf_tok = write_tiny_tokenizer(d)
    with open(os.path.join(d, "prompt.txt"), "w") as f:
        f.write(TINY_PROMPT)

    ids = torch.tensor(hf_tok(TINY_PROMPT)["input_ids"], dtype=torch.long)
    assert ids.numel() == TINY_T, ids
    ids2 = torch.tensor(hf_tok(TINY_PROMPT2)["input_ids"], dtype=torch.long)
    assert ids2.numel() == 7, ids2

    # reload from disk to make sure what we saved is what we evaluate
    import transformers as tf
    re = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    re.eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), re.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), (n1, n2)
    if family == "qwen2":
        assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()
    model = re

    logits, states = run_with_states(model, ids)
    dm = drop_layers(model, *TINY_DROP)
    dlogits, dstates = run_with_states(dm, ids)
    L = len(decoder_layers(model))
    assert states.shape == (L + 1, TINY_T, 64) and dstates.shape == (L - TINY_DROP[1] + 1, TINY_T, 64)
    # first kept layer sees the same input
    assert torch.equal(dstates[0], states[0]) and torch.equal(dstates[1], states[1])

    # batched check: each row run UNPADDED on its own
    lens = torch.tensor([ids.numel(), ids2.numel()], dtype=torch.long)
    batch_ids = torch.zeros(2, TINY_T, dtype=torch.long)
    batch_ids[0] = ids
    batch_ids[1, : ids2.numel()] = ids2
    l2, _ = run_with_states(model, ids2)
    batch_last = torch.stack([logits[-1], l2[-1]], 0)
    # sanity: HF padded batch with attention mask agrees at the real positions
    am = (torch.arange(TINY_T)[None, :] < lens[:, None]).long()
    pb = model(input_ids=batch_ids, attention_mask=am, use_cache=False).logits
    pad_diff = max((pb[b, lens[b] - 1] - batch_last[b]).abs().max().item() for b in range(2))

    extra = ""
    if family == "mistral":
        extra = " | " + sliding_window_probe(model, ids)

    write_safetensors(os.path.join(d, "reference.safetensors"), {
        "ids": ids,
        "logits": logits,
        "states": states,
        "dropped_logits": dlogits,
        "dropped_states": dstates,
        "batch_ids": batch_ids,
        "batch_lens": lens,
        "batch_last_logits": batch_last,
    })
    print(f"[tiny-{family}] ids={ids.tolist()} max|state|={states.abs().max():.3f} "
          f"logits[min={logits.min():.3f} max={logits.max():.3f}] "
          f"dropped max|state|={dstates.abs().max():.3f} padded-batch diff={pad_diff:.2e}{extra}")


@torch.no_grad()
def sliding_window_probe(model, ids):
    """Empirically determine which keys position i sees in layer 0 (window semantics)."""
    layer0 = decoder_layers(model)[0]
    w = model.config.sliding_window
    _, base = run_with_states(model, ids, check_hidden=False)
    seen = []
    i = TINY_T - 1
    for j in range(TINY_T):
        pert = ids.clone()
        pert[j] = (pert[j] + 7) % 259 + 3 if j != i else pert[j]
        if j == i:
            seen.append(j)
            continue
        _, s = run_with_states(model, pert, check_hidden=False)
        if (s[1][i] - base[1][i]).abs().max().item() > 0:
            seen.append(j)
    rel = sorted(i - j for j in seen)
    return f"sliding_window={w}: layer-0 query {i} attends keys {seen} (i-j in {rel}, i.e. i-j < window)"


# ----------------------------------------------------------------------------
# Part 2: SmolLM2 from GGUF
# ----------------------------------------------------------------------------

def load_gguf(gguf_path):
    import transformers as tf

    gguf_path = os.path.abspath(gguf_path)
    d, name = os.path.split(gguf_path)
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = tf.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model, tok


def describe_backend(tok):
    bt = tok.backend_tokenizer
    spec = json.loads(bt.to_str())
    lines = []
    lines.append(f"tokenizer class: {type(tok).__name__}")
    lines.append(f"backend model type: {spec['model']['type']}")
    for k in ("ignore_merges", "byte_fallback", "fuse_unk", "continuing_subword_prefix",
              "end_of_word_suffix", "dropout", "unk_token"):
        if k in spec["model"]:
            lines.append(f"  model.{k}: {json.dumps(spec['model'][k])}")
    lines.append(f"  vocab size: {len(spec['model'].get('vocab', {}))}, "
                 f"merges: {len(spec['model'].get('merges', []))}")
    for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding"):
        lines.append(f"{k}: {json.dumps(spec.get(k), ensure_ascii=False)}")
    lines.append(f"repr(pre_tokenizer): {bt.pre_tokenizer!r}")
    lines.append(f"repr(normalizer): {bt.normalizer!r}")
    lines.append("added_tokens (special ones):")
    for t in spec.get("added_tokens", []):
        lines.append(f"  {t['id']}: {json.dumps(t['content'], ensure_ascii=False)} special={t['special']} "
                     f"normalized={t['normalized']} lstrip={t['lstrip']} rstrip={t['rstrip']}")
    lines.append(f"bos_token={tok.bos_token!r} ({tok.bos_token_id}) eos_token={tok.eos_token!r} "
                 f"({tok.eos_token_id}) unk_token={tok.unk_token!r} pad_token={tok.pad_token!r}")
    for attr in ("add_bos_token", "add_eos_token", "add_prefix_space", "clean_up_tokenization_spaces"):
        lines.append(f"{attr}: {getattr(tok, attr, '<unset>')!r}")
    return "\n".join(lines)


@torch.no_grad()
def make_smollm2(gguf_path, out_root):
    d = os.path.join(out_root, "smollm2")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model, tok = load_gguf(gguf_path)
    with open(os.path.join(d, "prompt.txt"), "w") as f:
        f.write(SMOL_PROMPT)

    enc = tok(SMOL_PROMPT)["input_ids"]
    bos_added = tok.bos_token_id is not None and len(enc) > 0 and enc[0] == tok.bos_token_id
    ids = torch.tensor(enc, dtype=torch.long)
    logits, states = run_with_states(model, ids)
    L = len(decoder_layers(model))
    assert states.shape == (L + 1, ids.numel(), model.config.hidden_size), states.shape
    V = logits.shape[-1]
    g = torch.Generator().manual_seed(0)
    subset = torch.sort(torch.randperm(V, generator=g)[:512]).values
    argmax = logits.argmax(-1)
    write_safetensors(os.path.join(d, "reference.safetensors"), {
        "ids": ids,
        "states": states,
        "last_logits": logits[-1],
        "vocab_subset": subset,
        "logits_subset": logits[:, subset],
        "argmax": argmax,
    })

    cases = []
    for text in TOKENIZER_CASES:
        cases.append({"text": text, "ids": tok(text)["input_ids"]})
    with open(os.path.join(d, "tokenizer_cases.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")

    notes = describe_backend(tok)
    notes += f"\n\nprompt {SMOL_PROMPT!r}\n  ids ({len(enc)}): {enc}\n  BOS added by default: {bos_added}\n"
    notes += f"  tokens: {tok.convert_ids_to_tokens(enc)}\n"
    with open(os.path.join(d, "tokenizer_notes.txt"), "w") as f:
        f.write(notes)
    print("=== SmolLM2 GGUF tokenizer (transformers) ===")
    print(notes)

    top1 = int(argmax[-1])
    print(f"[smollm2] T={ids.numel()} L={L} H={model.config.hidden_size} V={V}")
    print(f"[smollm2] max|state| per entry: {[round(x, 2) for x in states.abs().amax(dim=(1, 2)).tolist()]}")
    print(f"[smollm2] logits: min={logits.min():.3f} max={logits.max():.3f} mean={logits.mean():.4f} "
          f"std={logits.std():.4f}")
    print(f"[smollm2] top-1 next token: id={top1} {tok.decode([top1])!r} "
          f"(logit {logits[-1, top1]:.4f}); argmax per position: {argmax.tolist()}")
    return model, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--out", default="worker/tests/fixtures")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()

    setup_torch()
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    if not args.skip_tiny:
        for fam in TINY_FAMILIES:
            make_tiny(fam, args.out)
    if not args.skip_smollm2:
        make_smollm2(args.gguf, args.out)

    total = 0
    for root, _, files in os.walk(args.out):
        for fn in sorted(files):
            total += os.path.getsize(os.path.join(root, fn))
    print(f"total fixture size under {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

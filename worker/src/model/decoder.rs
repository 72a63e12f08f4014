//! The decoder: a pre-norm transformer whose residual stream can be read between blocks and whose
//! blocks can be removed.
//!
//! Adapted in shape from candle-transformers `models/llama.rs` (huggingface/candle) and checked term
//! for term against HF transformers' `modeling_{llama,mistral,qwen2,phi3,phi}.py`.
//!
//! # Index convention (Gromov et al. 2024, eq. 1–2)
//!
//! `x^(l+1) = x^(l) + f(x^(l), θ^(l))`, blocks 0-indexed `l = 0 .. L-1`:
//! - `x^(0)` is the token embedding (the input to block 0);
//! - `x^(l)` is the residual stream **entering** block `l`;
//! - `x^(L)` is the output of the last block **before** the final norm and the LM head.
//!
//! [`Decoder::run`] reports exactly these `L'+1` tensors (`L'` = blocks kept) to its observer, in
//! order; the scoring stage compares `x^(l)` with `x^(l+n)`. HF's `output_hidden_states` differs in
//! its last entry (it is post-norm there), which is why states are captured here directly.
//!
//! # Batches
//!
//! Sequences of different lengths are **right-padded**. With a causal mask a real token never sees a
//! later position, so padding changes nothing for real tokens and no padding mask is needed; callers
//! read each sequence at its own last real position.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var, D};

use super::config::{Activation, Config, NormKind};
pub use super::frozen::Weight;
use super::lora::{mix_seed, Lora, LoraSpec};
use super::masked_softmax::masked_softmax;
use super::nf4::Nf4Matrix;
use super::silu_mul::silu_mul;
use super::weights::WeightMap;
use super::ModelError;

/// A projection `y = x Wᵀ (+ b) (+ (α/r) B A x)`, with `W` stored `[out, in]` as in HF checkpoints
/// and an optional LoRA adapter (healing).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Weight,
    /// `[out]`, when the checkpoint has one.
    pub bias: Option<Tensor>,
    /// The trainable low-rank update, when one is attached.
    pub lora: Option<Lora>,
}

impl Linear {
    fn load(w: &mut WeightMap, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self, ModelError> {
        let weight = w.take(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(w.take(&format!("{name}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { weight: Weight::Dense(weight), bias, lora: None })
    }

    fn dense(weight: Tensor) -> Self {
        Linear { weight: Weight::Dense(weight), bias: None, lora: None }
    }

    /// The base weight (dequantized when NF4; adapters are not part of it) and bias.
    fn save(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
        out: &mut Vec<(String, Tensor)>,
    ) -> candle_core::Result<()> {
        out.push((format!("{name}.weight"), self.weight.to_dense(dtype, device)?));
        if let Some(b) = &self.bias {
            out.push((format!("{name}.bias"), b.clone()));
        }
        Ok(())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Flatten leading dims so that one GEMM does the whole batch; `Wᵀ` is a strided view.
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let x = x.reshape((rows, in_dim))?;
        let y = self.weight.matmul_t(&x)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match &self.lora {
            Some(lora) => (y + lora.forward(&x)?)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("a tensor fed to Linear has at least one dim") = y.dim(1)?;
        y.reshape(out_dims)
    }
}

/// RMSNorm or LayerNorm, over the last dimension.
#[derive(Debug, Clone)]
pub enum Norm {
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms {
        /// Scale.
        weight: Tensor,
        /// Epsilon.
        eps: f32,
    },
    /// `(x − mean) / sqrt(var + eps) · w + b`.
    Layer {
        /// Scale.
        weight: Tensor,
        /// Shift.
        bias: Tensor,
        /// Epsilon.
        eps: f32,
    },
}

impl Norm {
    fn load(w: &mut WeightMap, name: &str, cfg: &Config) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let eps = cfg.norm_eps as f32;
        Ok(match cfg.norm {
            NormKind::Rms => Norm::Rms { weight: w.take(&format!("{name}.weight"), &[h])?, eps },
            NormKind::Layer => Norm::Layer {
                weight: w.take(&format!("{name}.weight"), &[h])?,
                bias: w.take(&format!("{name}.bias"), &[h])?,
                eps,
            },
        })
    }

    fn save(&self, name: &str, out: &mut Vec<(String, Tensor)>) {
        match self {
            Norm::Rms { weight, .. } => out.push((format!("{name}.weight"), weight.clone())),
            Norm::Layer { weight, bias, .. } => {
                out.push((format!("{name}.weight"), weight.clone()));
                out.push((format!("{name}.bias"), bias.clone()));
            }
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // The fused kernels have no backward pass; while healing, gradients flow through here.
            Norm::Rms { weight, eps } if x.track_op() => candle_nn::ops::rms_norm_slow(x, weight, *eps),
            Norm::Layer { weight, bias, eps } if x.track_op() => candle_nn::ops::layer_norm_slow(x, weight, bias, *eps),
            Norm::Rms { weight, eps } => candle_nn::ops::rms_norm(&x.contiguous()?, weight, *eps),
            Norm::Layer { weight, bias, eps } => candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, *eps),
        }
    }
}

/// Rotary position tables for one forward call: `cos`, `sin` of shape `[T, rotary_dim / 2]`.
#[derive(Debug)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Tables for the given positions, one row per token.
    pub fn new(cfg: &Config, positions: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let inv_freq = cfg.inv_freq();
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), device)?;
        let freqs = pos.matmul(&inv_freq)?;
        Ok(Rotary { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Rotates the first `rotary_dim` features of each head (`x`: `[B, heads, T, head_dim]`), HF's
    /// `rotate_half` layout; the rest pass through (partial rotary, Phi-2).
    fn apply(&self, x: &Tensor, rotary_dim: usize) -> candle_core::Result<Tensor> {
        // The fused kernel has no backward pass; while healing, gradients flow through here.
        let rope = |x: &Tensor| {
            if x.track_op() {
                candle_nn::rotary_emb::rope_slow(x, &self.cos, &self.sin)
            } else {
                candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)
            }
        };
        let head_dim = x.dim(D::Minus1)?;
        if rotary_dim == head_dim {
            return rope(&x.contiguous()?);
        }
        let rot = x.narrow(D::Minus1, 0, rotary_dim)?.contiguous()?;
        let pass = x.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
        let rot = rope(&rot)?;
        Tensor::cat(&[&rot, &pass], D::Minus1)
    }
}

/// Keys and values of a prompt prefix, per block, computed once and reused by every sequence of a
/// batch that starts with that prefix (MMLU's shared few-shot header).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per kept block: keys (after rotary) and values, each `[1, kv_heads, P, head_dim]`.
    pub layers: Vec<(Tensor, Tensor)>,
    /// Prefix length P.
    pub len: usize,
}

/// Multi-head attention with grouped-query heads, rotary positions and an optional sliding window.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
}

impl Attention {
    fn load(w: &mut WeightMap, prefix: &str, cfg: &Config) -> Result<Self, ModelError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let o_name = if cfg.parallel_block { "dense" } else { "o_proj" };
        Ok(Attention {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), q_out, h, cfg.qkv_bias)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), kv_out, h, cfg.qkv_bias)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), kv_out, h, cfg.qkv_bias)?,
            o_proj: Linear::load(w, &format!("{prefix}.{o_name}"), h, q_out, cfg.o_bias)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            rotary_dim: cfg.rotary_dim,
        })
    }

    /// The projections under their HF names (`dense` is Phi-2's output projection).
    fn projections(&self, parallel: bool) -> [(&'static str, &Linear); 4] {
        let o_name = if parallel { "dense" } else { "o_proj" };
        [("q_proj", &self.q_proj), ("k_proj", &self.k_proj), ("v_proj", &self.v_proj), (o_name, &self.o_proj)]
    }

    fn projections_mut(&mut self, parallel: bool) -> [(&'static str, &mut Linear); 4] {
        let o_name = if parallel { "dense" } else { "o_proj" };
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            (o_name, &mut self.o_proj),
        ]
    }

    /// `x`: `[B, T, H]` (already normed). `prefix`: cached keys/values the tokens also attend to.
    /// `record`: where to store this call's keys/values (building a prefix cache). `chunk`: the
    /// scores computed at once during inference (see [`Decoder::set_attention_chunk`]).
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        chunk: usize,
        prefix: Option<&(Tensor, Tensor)>,
        record: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = rotary.apply(&q, self.rotary_dim)?;
        let k = rotary.apply(&k, self.rotary_dim)?;
        if let Some(rec) = record {
            rec.push((k.clone(), v.clone()));
        }
        let p = prefix.map(|(pk, _)| pk.dim(2)).transpose()?.unwrap_or(0);
        let (k, v) = match prefix {
            Some((pk, pv)) => {
                let shape = (b, nkv, p, hd);
                (Tensor::cat(&[&pk.broadcast_as(shape)?, &k], 2)?, Tensor::cat(&[&pv.broadcast_as(shape)?, &v], 2)?)
            }
            None => (k, v),
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let s = p + t;
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (q * scale)?;
        // Inference takes the queries in chunks whose scores stay near `chunk` values (long
        // prompts would otherwise materialise [B, nh, T, P+T] at once), and a chunk reads
        // only the keys up to its last row: the decoder's masks never show row `i` a key past
        // `P + i`. Training keeps one chunk (the graph holds every piece anyway).
        let rows = if q.track_op() { t } else { (chunk / (b * nh * s)).clamp(1, t) };
        let mut chunks = Vec::with_capacity(t.div_ceil(rows));
        for start in (0..t).step_by(rows) {
            let len = rows.min(t - start);
            let keys = if q.track_op() { s } else { (p + start + len).min(s) };
            let (qc, mc) = if len == t {
                (q.clone(), mask.clone())
            } else {
                (q.narrow(2, start, len)?, mask.narrow(0, start, len)?)
            };
            let (kc, vc, mc) = if keys == s {
                (k.clone(), v.clone(), mc)
            } else {
                (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?, mc.narrow(1, 0, keys)?)
            };
            // Grouped-query attention without copying K/V: the `rep` query heads that share a KV
            // head are laid out next to each other, so [B, nh, L, hd] views as [B, nkv, rep·L, hd].
            let qc = qc.contiguous()?.reshape((b, nkv, rep * len, hd))?;
            let scores = qc.matmul(&kc.t()?)?.reshape((b, nh, len, keys))?.to_dtype(DType::F32)?;
            let probs = masked_softmax(&scores, &mc)?.to_dtype(vc.dtype())?;
            chunks.push(probs.reshape((b, nkv, rep * len, keys))?.matmul(&vc)?.reshape((b, nh, len, hd))?);
        }
        let out = if chunks.len() == 1 { chunks.pop().expect("one chunk") } else { Tensor::cat(&chunks, 2)? };
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

/// Attention scores computed at once per query chunk during inference, by default (8 MB of f32).
pub const SCORES_PER_CHUNK: usize = 2 << 20;

/// `[T, P+T]` additive mask for `segments` (lengths summing to `T`) laid end to end after a shared
/// prefix of `P` tokens: a token sees the prefix and the earlier tokens of its own segment, and with
/// a window `W` only keys less than `W` positions back. One segment is the plain causal mask. Row
/// `i` never sees a key past `P + i` (attention relies on it to skip those keys).
fn attention_mask(segments: &[usize], p: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Tensor> {
    let t: usize = segments.iter().sum();
    let s = p + t;
    let mut mask = vec![f32::NEG_INFINITY; t * s];
    let mut start = 0;
    for &len in segments {
        for i in 0..len {
            let (row, qpos) = ((start + i) * s, p + i);
            let near = |kpos: usize| window.is_none_or(|w| qpos - kpos < w);
            for j in (0..p).filter(|&j| near(j)) {
                mask[row + j] = 0.0;
            }
            for k in (0..=i).filter(|&k| near(p + k)) {
                mask[row + p + start + k] = 0.0;
            }
        }
        start += len;
    }
    Tensor::from_vec(mask, (t, s), device)
}

/// The feed-forward network: gated (`down(act(gate x) · up x)`) or plain (`fc2(act(fc1 x))`).
#[derive(Debug, Clone)]
pub enum Mlp {
    /// Llama, Mistral, Qwen2, Phi-3.
    Gated {
        /// `gate_proj`.
        gate: Linear,
        /// `up_proj`.
        up: Linear,
        /// `down_proj`.
        down: Linear,
        /// Applied to the gate.
        act: Activation,
    },
    /// Phi-2.
    Plain {
        /// `fc1`.
        fc1: Linear,
        /// `fc2`.
        fc2: Linear,
        /// Applied after `fc1`.
        act: Activation,
    },
}

impl Mlp {
    fn load(w: &mut WeightMap, prefix: &str, cfg: &Config) -> Result<Self, ModelError> {
        let (h, i, bias, act) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.activation);
        Ok(if cfg.gated_mlp {
            Mlp::Gated {
                gate: Linear::load(w, &format!("{prefix}.gate_proj"), i, h, bias)?,
                up: Linear::load(w, &format!("{prefix}.up_proj"), i, h, bias)?,
                down: Linear::load(w, &format!("{prefix}.down_proj"), h, i, bias)?,
                act,
            }
        } else {
            Mlp::Plain {
                fc1: Linear::load(w, &format!("{prefix}.fc1"), i, h, bias)?,
                fc2: Linear::load(w, &format!("{prefix}.fc2"), h, i, bias)?,
                act,
            }
        })
    }

    /// The projections under their HF names.
    fn projections(&self) -> Vec<(&'static str, &Linear)> {
        match self {
            Mlp::Gated { gate, up, down, .. } => vec![("gate_proj", gate), ("up_proj", up), ("down_proj", down)],
            Mlp::Plain { fc1, fc2, .. } => vec![("fc1", fc1), ("fc2", fc2)],
        }
    }

    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        match self {
            Mlp::Gated { gate, up, down, .. } => vec![("gate_proj", gate), ("up_proj", up), ("down_proj", down)],
            Mlp::Plain { fc1, fc2, .. } => vec![("fc1", fc1), ("fc2", fc2)],
        }
    }
}

fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Gated { gate, up, down, act: Activation::Silu } => {
                down.forward(&silu_mul(&gate.forward(x)?, &up.forward(x)?)?)
            }
            Mlp::Gated { gate, up, down, act } => {
                let g = activate(&gate.forward(x)?, *act)?;
                down.forward(&(g * up.forward(x)?)?)
            }
            Mlp::Plain { fc1, fc2, act } => fc2.forward(&activate(&fc1.forward(x)?, *act)?),
        }
    }
}

/// One decoder block `f(x^(l), θ^(l))`, remembering which layer of the original checkpoint it was.
#[derive(Debug, Clone)]
pub struct Block {
    /// Index of this block in the unpruned checkpoint.
    pub original_index: usize,
    input_layernorm: Norm,
    /// `None` for Phi-2's parallel block, which norms once.
    post_attention_layernorm: Option<Norm>,
    self_attn: Attention,
    mlp: Mlp,
}

impl Block {
    fn load(w: &mut WeightMap, index: usize, cfg: &Config) -> Result<Self, ModelError> {
        let p = format!("model.layers.{index}");
        Ok(Block {
            original_index: index,
            input_layernorm: Norm::load(w, &format!("{p}.input_layernorm"), cfg)?,
            post_attention_layernorm: if cfg.parallel_block {
                None
            } else {
                Some(Norm::load(w, &format!("{p}.post_attention_layernorm"), cfg)?)
            },
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
        })
    }

    /// Every projection of the block, named as in HF (`self_attn.q_proj`, `mlp.fc1`, …).
    pub fn projections(&self) -> Vec<(String, &Linear)> {
        let parallel = self.post_attention_layernorm.is_none();
        let attn = self.self_attn.projections(parallel).into_iter().map(|(n, l)| (format!("self_attn.{n}"), l));
        let mlp = self.mlp.projections().into_iter().map(|(n, l)| (format!("mlp.{n}"), l));
        attn.chain(mlp).collect()
    }

    /// [`Block::projections`], mutably (quantizing, attaching adapters).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let parallel = self.post_attention_layernorm.is_none();
        let attn = self.self_attn.projections_mut(parallel).into_iter().map(|(n, l)| (format!("self_attn.{n}"), l));
        let mlp = self.mlp.projections_mut().into_iter().map(|(n, l)| (format!("mlp.{n}"), l));
        attn.chain(mlp).collect()
    }

    fn save(
        &self,
        new_index: usize,
        dtype: DType,
        device: &Device,
        out: &mut Vec<(String, Tensor)>,
    ) -> candle_core::Result<()> {
        let p = format!("model.layers.{new_index}");
        self.input_layernorm.save(&format!("{p}.input_layernorm"), out);
        if let Some(n) = &self.post_attention_layernorm {
            n.save(&format!("{p}.post_attention_layernorm"), out);
        }
        for (name, lin) in self.projections() {
            lin.save(&format!("{p}.{name}"), dtype, device, out)?;
        }
        Ok(())
    }

    /// `x^(l+1) = x^(l) + f(x^(l))`.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        chunk: usize,
        prefix: Option<&(Tensor, Tensor)>,
        record: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let attn = self.self_attn.forward(&h, rotary, mask, chunk, prefix, record)?;
        match &self.post_attention_layernorm {
            // Phi-2: x + attn(ln x) + mlp(ln x).
            None => (x + attn)? + self.mlp.forward(&h)?,
            // Pre-norm: x' = x + attn(norm₁ x); x'' = x' + mlp(norm₂ x').
            Some(norm2) => {
                let x = (x + attn)?;
                let m = self.mlp.forward(&norm2.forward(&x)?)?;
                x + m
            }
        }
    }
}

/// The whole decoder: embedding, the kept blocks, final norm and LM head.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The configuration of the checkpoint as loaded (its `num_layers` is the unpruned depth).
    pub cfg: Config,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    device: Device,
    dtype: DType,
    attention_chunk: usize,
}

impl Decoder {
    /// Builds the decoder from HF-named weights (`model.layers.{i}...`), checking every shape
    /// against `cfg`. Every tensor must be used: leftovers mean the config and checkpoint disagree.
    pub fn load(cfg: Config, mut w: WeightMap) -> Result<Self, ModelError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.take("model.embed_tokens.weight", &[v, h])?;
        let blocks = (0..cfg.num_layers).map(|i| Block::load(&mut w, i, &cfg)).collect::<Result<Vec<_>, _>>()?;
        let norm_name = if cfg.parallel_block { "model.final_layernorm" } else { "model.norm" };
        let norm = Norm::load(&mut w, norm_name, &cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Tied, as HF re-ties on load: a stored copy of the head is ignored.
            if w.contains("lm_head.weight") {
                w.take("lm_head.weight", &[v, h])?;
            }
            Linear::dense(embed_tokens.clone())
        } else {
            Linear::load(&mut w, "lm_head", v, h, cfg.lm_head_bias)?
        };
        w.finish(cfg.num_layers)?;
        let (device, dtype) = (embed_tokens.device().clone(), embed_tokens.dtype());
        Ok(Decoder { cfg, embed_tokens, blocks, norm, lm_head, device, dtype, attention_chunk: SCORES_PER_CHUNK })
    }

    /// How many attention scores inference computes at once ([`SCORES_PER_CHUNK`] by default):
    /// queries are taken in chunks of rows (at least one) that stay within this budget. Smaller
    /// saves memory on long prompts; the result does not depend on it.
    pub fn set_attention_chunk(&mut self, scores: usize) {
        self.attention_chunk = scores.max(1);
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype (f32 on CPU, bf16 on CUDA).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Original indices of the blocks still in the model, in order.
    pub fn kept_layers(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.original_index).collect()
    }

    /// Number of blocks currently in the model (L').
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Removes the blocks whose **original** indices are in `drop` (any order, no duplicates).
    /// Fails without changing anything when an index is not a kept block or nothing would remain.
    pub fn remove_layers(&mut self, drop: &[usize]) -> Result<(), ModelError> {
        let kept = self.kept_layers();
        let mut seen = std::collections::BTreeSet::new();
        for &d in drop {
            if !kept.contains(&d) {
                return Err(ModelError::InvalidDrop(format!(
                    "layer {d} is not in the model (kept layers: {})",
                    format_ranges(&kept)
                )));
            }
            if !seen.insert(d) {
                return Err(ModelError::InvalidDrop(format!("layer {d} is listed twice")));
            }
        }
        if seen.len() >= kept.len() {
            return Err(ModelError::InvalidDrop(format!(
                "dropping {} of {} layers would leave none; keep at least one",
                seen.len(),
                kept.len()
            )));
        }
        self.blocks.retain(|b| !seen.contains(&b.original_index));
        Ok(())
    }

    /// Runs the blocks over `ids` (`[B, T]`, u32), calling `observe(l, x^(l))` for every residual
    /// state `l = 0 ..= L'` (see the module's index convention), and returns `x^(L')`, pre-norm.
    ///
    /// `prefix` makes every sequence continue a cached prompt prefix (positions start after it);
    /// `record` stores this call's keys/values, so a `[1, P]` call builds a [`KvCache`].
    pub fn run(
        &self,
        ids: &Tensor,
        prefix: Option<&KvCache>,
        record: Option<&mut KvCache>,
        observe: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.run_segments(ids, &[t], prefix, record, observe)
    }

    /// Runs several sequences packed into one row (`ids`: `[1, Σ lengths]`), each attending only to
    /// itself (and to `prefix`, which every one of them continues), and returns `x^(L')`,
    /// `[1, Σ lengths, H]`. Unlike right-padded batches, no work is spent on padding, and a shared
    /// prefix's keys/values are used as they are rather than copied per sequence.
    pub fn run_packed(&self, ids: &Tensor, lengths: &[usize], prefix: Option<&KvCache>) -> candle_core::Result<Tensor> {
        self.run_segments(ids, lengths, prefix, None, &mut |_, _| Ok(()))
    }

    /// [`Decoder::run`] over `ids` `[B, T]` whose `T` positions hold `segments` end to end.
    fn run_segments(
        &self,
        ids: &Tensor,
        segments: &[usize],
        prefix: Option<&KvCache>,
        record: Option<&mut KvCache>,
        observe: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if segments.iter().sum::<usize>() != t || (segments.len() > 1 && b != 1) {
            candle_core::bail!(
                "packed segments {segments:?} do not fill ids of shape [{b}, {t}] (packing needs B = 1)"
            );
        }
        let offset = prefix.map_or(0, |p| p.len);
        if prefix.is_some() && record.is_some() {
            candle_core::bail!("recording a KV cache on top of a prefix cache is not supported");
        }
        if let Some(p) = prefix {
            if p.layers.len() != self.blocks.len() {
                candle_core::bail!("prefix cache has {} layers, model has {}", p.layers.len(), self.blocks.len());
            }
        }
        let positions: Vec<usize> = segments.iter().flat_map(|&len| offset..offset + len).collect();
        let rotary = Rotary::new(&self.cfg, &positions, self.dtype, &self.device)?;
        // The same for every block: built once per call, not once per layer.
        let mask = attention_mask(segments, offset, self.cfg.sliding_window, &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        let mut recorded = Vec::new();
        for (l, block) in self.blocks.iter().enumerate() {
            observe(l, &x)?;
            let rec = record.as_ref().map(|_| &mut recorded);
            x = block.forward(&x, &rotary, &mask, self.attention_chunk, prefix.map(|p| &p.layers[l]), rec)?;
        }
        observe(self.blocks.len(), &x)?;
        if let Some(r) = record {
            r.layers = recorded;
            r.len = offset + t;
        }
        Ok(x)
    }

    /// Final norm + LM head over pre-norm states `[..., H]` → logits `[..., V]` in f32.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden)?)?.to_dtype(DType::F32)
    }

    /// Logits for every position: `[B, T, V]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.run(ids, None, None, &mut |_, _| Ok(()))?;
        self.logits(&x)
    }

    /// Logits at one position per sequence (`positions[b]`, e.g. the last real token): `[B, V]`.
    /// Only those rows go through the final norm and the LM head.
    pub fn logits_at(&self, hidden: &Tensor, positions: &[usize]) -> candle_core::Result<Tensor> {
        let rows = gather_rows(hidden, positions)?;
        self.logits(&rows)
    }

    /// Every residual state `x^(0) ..= x^(L')`, each `[B, T, H]`, and the logits `[B, T, V]`.
    pub fn forward_with_states(&self, ids: &Tensor) -> candle_core::Result<(Vec<Tensor>, Tensor)> {
        let mut states = Vec::with_capacity(self.blocks.len() + 1);
        let x = self.run(ids, None, None, &mut |_, s| {
            states.push(s.clone());
            Ok(())
        })?;
        Ok((states, self.logits(&x)?))
    }

    /// Keys/values of a shared prompt prefix (`ids`: `[1, P]`), plus its pre-norm last state.
    pub fn prefill(&self, ids: &Tensor) -> candle_core::Result<(KvCache, Tensor)> {
        let mut cache = KvCache { layers: Vec::new(), len: 0 };
        let x = self.run(ids, None, Some(&mut cache), &mut |_, _| Ok(()))?;
        Ok((cache, x))
    }

    /// The weights under HF names, blocks renumbered densely `0 .. L'-1` (what a pruned checkpoint
    /// stores). A tied LM head is not listed.
    /// NF4 weights are written dequantized; adapters are not included (see
    /// [`Decoder::merge_adapters`] and [`Decoder::adapter_tensors`]).
    pub fn named_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, block) in self.blocks.iter().enumerate() {
            block.save(i, self.dtype, &self.device, &mut out)?;
        }
        let norm_name = if self.cfg.parallel_block { "model.final_layernorm" } else { "model.norm" };
        self.norm.save(norm_name, &mut out);
        if !self.cfg.tie_word_embeddings {
            self.lm_head.save("lm_head", self.dtype, &self.device, &mut out)?;
        }
        Ok(out)
    }

    /// Stores every block projection as NF4 (QLoRA's frozen base; embedding, norms and LM head
    /// stay as they are). Returns `(parameters, bytes)` of the quantized projections.
    pub fn quantize_nf4(&mut self) -> candle_core::Result<(usize, usize)> {
        let (mut params, mut bytes) = (0, 0);
        for block in &mut self.blocks {
            for (_, lin) in block.projections_mut() {
                if let Weight::Dense(w) = &lin.weight {
                    let m = Nf4Matrix::quantize(w)?;
                    params += w.elem_count();
                    bytes += m.bytes();
                    lin.weight = Weight::Nf4(Arc::new(m));
                }
            }
        }
        Ok((params, bytes))
    }

    /// The module names an adapter can target in this family (`gate_proj`, `fc1`, `qkv_proj`, …).
    pub fn adapter_targets(&self) -> Vec<String> {
        self.blocks.first().map_or_else(Vec::new, |b| {
            group_by_module(self.cfg.family, b.projections())
                .into_iter()
                .map(|(n, _)| n.rsplit('.').next().unwrap_or(&n).to_string())
                .collect()
        })
    }

    /// Checks `spec` against this model: a known target list, a rank that fits every target.
    fn check_adapter_spec(&self, spec: &LoraSpec) -> Result<(), ModelError> {
        let valid = self.adapter_targets();
        if spec.targets.is_empty() {
            return Err(ModelError::Adapter(format!("no target modules; valid: {}", valid.join(", "))));
        }
        for t in &spec.targets {
            if !valid.contains(t) {
                return Err(ModelError::Adapter(format!(
                    "unknown target module `{t}` for {}; valid: {}",
                    self.cfg.family.model_type(),
                    valid.join(", ")
                )));
            }
        }
        if spec.rank == 0 {
            return Err(ModelError::Adapter("rank must be at least 1".into()));
        }
        for (name, parts) in group_by_module(self.cfg.family, self.blocks[0].projections()) {
            let short = name.rsplit('.').next().unwrap_or(&name);
            let (out_dim, in_dim) = module_dims(&parts)?;
            if spec.targets.iter().any(|t| t == short) && spec.rank > out_dim.min(in_dim) {
                return Err(ModelError::Adapter(format!(
                    "rank {} is larger than {name} ({out_dim}×{in_dim}) allows; use at most {}",
                    spec.rank,
                    out_dim.min(in_dim)
                )));
            }
        }
        Ok(())
    }

    /// The HF name of each targeted module (blocks renumbered) with mutable handles on its
    /// projections (several for a fused Phi-3 module).
    fn targeted_mut<'a>(&'a mut self, spec: &LoraSpec) -> Vec<(String, Vec<&'a mut Linear>)> {
        let family = self.cfg.family;
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, parts) in group_by_module(family, block.projections_mut()) {
                if spec.targets.iter().any(|t| name.rsplit('.').next() == Some(t.as_str())) {
                    out.push((format!("model.layers.{i}.{name}"), parts));
                }
            }
        }
        out
    }

    /// Attaches a fresh adapter to every targeted module: A Kaiming-uniform from an RNG seeded
    /// with `seed`, B zero, so the model's output is unchanged until it is trained. A fused
    /// module's parts share its A and split its B by rows.
    pub fn attach_adapters(&mut self, spec: &LoraSpec, seed: u64) -> Result<(), ModelError> {
        self.check_adapter_spec(spec)?;
        let (device, dtype) = (self.device.clone(), self.dtype);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        for (_, parts) in self.targeted_mut(spec) {
            let (out_dim, in_dim) = module_dims(&parts)?;
            let lora = Lora::init(out_dim, in_dim, spec, &mut rng, &device, dtype)?;
            attach_split(parts, &lora)?;
        }
        Ok(())
    }

    /// Attaches trained adapters from tensors under PEFT's names
    /// (`base_model.model.model.layers.{i}.mlp.gate_proj.lora_A.weight`, …), checking that every
    /// targeted module has both halves with the right shapes and that nothing is left over.
    pub fn load_adapters(
        &mut self,
        spec: &LoraSpec,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), ModelError> {
        self.check_adapter_spec(spec)?;
        let (device, dtype) = (self.device.clone(), self.dtype);
        let mut used = 0;
        for (name, parts) in self.targeted_mut(spec) {
            let (out_dim, in_dim) = module_dims(&parts)?;
            let mut take = |half: &str, shape: [usize; 2]| -> Result<Tensor, ModelError> {
                let key = format!("base_model.model.{name}.{half}.weight");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| ModelError::MissingTensor { origin: origin.into(), name: key.clone() })?;
                if t.dims() != shape {
                    return Err(ModelError::ShapeMismatch {
                        origin: origin.into(),
                        name: key,
                        found: t.dims().to_vec(),
                        expected: shape.to_vec(),
                    });
                }
                used += 1;
                Ok(t.to_device(&device)?.to_dtype(dtype)?)
            };
            let a = take("lora_A", [spec.rank, in_dim])?;
            let b = take("lora_B", [out_dim, spec.rank])?;
            attach_split(parts, &Lora::from_tensors(a, b, spec)?)?;
        }
        if used != tensors.len() {
            let expected: std::collections::HashSet<String> =
                self.adapter_tensors()?.into_iter().map(|(n, _)| n).collect();
            let extra = tensors.keys().find(|k| !expected.contains(*k)).cloned().unwrap_or_default();
            return Err(ModelError::Mismatch {
                origin: origin.into(),
                message: format!("tensor `{extra}` matches no targeted projection of this model (was the adapter trained on a model with other layers?)"),
            });
        }
        Ok(())
    }

    /// The adapters' trainable tensors, in block order (A before B), named as PEFT names them;
    /// the parts of a fused Phi-3 module list their shared A once, under the module's name, and
    /// each its own rows of B, under the part's name. [`Decoder::adapter_tensors`] gives what
    /// PEFT reads.
    pub fn adapter_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("base_model.model.model.layers.{i}");
            let mut last_module = String::new();
            for (name, lin) in block.projections() {
                let Some(lora) = &lin.lora else { continue };
                let module = adapter_module(self.cfg.family, &name);
                if module != last_module {
                    out.push((format!("{p}.{module}.lora_A.weight"), lora.a.clone()));
                    last_module = module.to_string();
                }
                out.push((format!("{p}.{name}.lora_B.weight"), lora.b.clone()));
            }
        }
        out
    }

    /// The adapters as PEFT stores them (`adapter_model.safetensors`): per targeted module, A and
    /// B under PEFT's names, a fused Phi-3 module's B put back together from its parts' rows.
    pub fn adapter_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (module, parts) in group_by_module(self.cfg.family, block.projections()) {
                let loras: Vec<&Lora> = parts.iter().filter_map(|lin| lin.lora.as_ref()).collect();
                let Some(first) = loras.first() else { continue };
                let p = format!("base_model.model.model.layers.{i}.{module}");
                let b: Vec<&Tensor> = loras.iter().map(|l| l.b.as_tensor()).collect();
                out.push((format!("{p}.lora_A.weight"), first.a.as_tensor().clone()));
                out.push((format!("{p}.lora_B.weight"), Tensor::cat(&b, 0)?));
            }
        }
        Ok(out)
    }

    /// Puts the adapters in training mode for one pass (`Some(seed)`: they take part in autograd
    /// and every adapter draws its dropout mask from its own stream of `seed`) or in evaluation
    /// mode (`None`: no dropout, no graph; the default).
    pub fn set_adapter_training(&mut self, seed: Option<u64>) {
        // The parts of a fused module (one shared A) draw one mask, as PEFT's fused module does.
        let mut stream = 0;
        let mut last_a = None;
        for block in &mut self.blocks {
            for (_, lin) in block.projections_mut() {
                if let Some(lora) = &mut lin.lora {
                    let a = lora.a.as_tensor().id();
                    if last_a.is_some_and(|last| last != a) {
                        stream += 1;
                    }
                    lora.dropout_seed = seed.map(|s| mix_seed(s, stream));
                    last_a = Some(a);
                }
            }
        }
    }

    /// Folds every adapter into its base weight (dequantized when NF4): `W' = W + (α/r) B A`.
    pub fn merge_adapters(&mut self) -> candle_core::Result<()> {
        let (device, dtype) = (self.device.clone(), self.dtype);
        for block in &mut self.blocks {
            for (_, lin) in block.projections_mut() {
                if let Some(lora) = lin.lora.take() {
                    let w = lin.weight.to_dense(dtype, &device)?;
                    lin.weight = Weight::Dense((w + lora.delta()?.to_dtype(dtype)?)?);
                }
            }
        }
        Ok(())
    }
}

/// The module an adapter on projection `name` (`self_attn.q_proj`, …) belongs to: the projection
/// itself, or the fused module its checkpoint stores it in ([`super::Family::fused_modules`]),
/// which is what PEFT targets there.
fn adapter_module(family: super::Family, name: &str) -> &str {
    family.fused_modules().iter().find(|(_, parts)| parts.contains(&name)).map_or(name, |(module, _)| module)
}

/// A block's projections grouped by adapter module, in checkpoint order: one projection per
/// module, or a fused module's parts in the order its rows are stored (q, k, v; gate, up).
fn group_by_module<L>(family: super::Family, projections: Vec<(String, L)>) -> Vec<(String, Vec<L>)> {
    let mut out: Vec<(String, Vec<L>)> = Vec::new();
    for (name, lin) in projections {
        let module = adapter_module(family, &name);
        match out.last_mut() {
            Some((last, parts)) if last == module => parts.push(lin),
            _ => out.push((module.to_string(), vec![lin])),
        }
    }
    out
}

/// `[out, in]` of a module: its parts' output rows together, their common input.
fn module_dims<L: std::borrow::Borrow<Linear>>(parts: &[L]) -> candle_core::Result<(usize, usize)> {
    let mut out = 0;
    let mut input = None;
    for part in parts {
        let (o, i) = part.borrow().weight.dims()?;
        if input.is_some_and(|input| input != i) {
            candle_core::bail!("the parts of a fused module take inputs of different widths");
        }
        out += o;
        input = Some(i);
    }
    Ok((out, input.unwrap_or(0)))
}

/// Gives each part of a module its rows of `lora`'s B, all sharing its A (one part: `lora` as is).
fn attach_split(parts: Vec<&mut Linear>, lora: &Lora) -> candle_core::Result<()> {
    let mut row = 0;
    let single = parts.len() == 1;
    for part in parts {
        let (rows, _) = part.weight.dims()?;
        part.lora = Some(if single { lora.clone() } else { lora.rows(row, rows)? });
        row += rows;
    }
    Ok(())
}

/// Picks row `positions[b]` of sequence `b` from `[B, T, H]` → `[B, H]`.
pub fn gather_rows(hidden: &Tensor, positions: &[usize]) -> candle_core::Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    if positions.len() != b {
        candle_core::bail!("gather_rows: {} positions for a batch of {b}", positions.len());
    }
    if let Some(&bad) = positions.iter().find(|&&p| p >= t) {
        candle_core::bail!("gather_rows: position {bad} is past the sequence length {t}");
    }
    let flat: Vec<u32> = positions.iter().enumerate().map(|(i, &p)| (i * t + p) as u32).collect();
    let idx = Tensor::from_vec(flat, b, hidden.device())?;
    hidden.reshape((b * t, h))?.index_select(&idx, 0)
}

/// `[0,1,2,5,6]` → `"0-2, 5-6"`.
pub fn format_ranges(xs: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let start = xs[i];
        let mut end = start;
        while i + 1 < xs.len() && xs[i + 1] == end + 1 {
            i += 1;
            end = xs[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(m: &Tensor) -> Vec<Vec<bool>> {
        m.to_vec2::<f32>().unwrap().iter().map(|r| r.iter().map(|v| *v == 0.0).collect()).collect()
    }

    #[test]
    fn mask_is_causal_with_prefix_and_window() {
        let m = attention_mask(&[2], 3, None, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0; 5]);
        let v = visible(&attention_mask(&[4], 0, Some(2), &Device::Cpu).unwrap());
        assert_eq!(v[3], vec![false, false, true, true]);
        assert_eq!(v[1], vec![true, true, false, false]);
    }

    #[test]
    fn packed_segments_see_the_prefix_and_themselves() {
        // Prefix of 2, then segments of 2 and 3 tokens.
        let v = visible(&attention_mask(&[2, 3], 2, None, &Device::Cpu).unwrap());
        let (t, f) = (true, false);
        assert_eq!(v[0], vec![t, t, t, f, f, f, f]);
        assert_eq!(v[1], vec![t, t, t, t, f, f, f]);
        assert_eq!(v[2], vec![t, t, f, f, t, f, f], "the second segment does not see the first");
        assert_eq!(v[4], vec![t, t, f, f, t, t, t]);
        // A window of 2 counts positions within the segment's own sequence (prefix + segment).
        let v = visible(&attention_mask(&[2, 3], 2, Some(2), &Device::Cpu).unwrap());
        assert_eq!(v[2], vec![f, t, f, f, t, f, f]);
        assert_eq!(v[4], vec![f, f, f, f, f, t, t]);
    }

    #[test]
    fn ranges_are_compact() {
        assert_eq!(format_ranges(&[0, 1, 2, 5, 6, 9]), "0-2, 5-6, 9");
        assert_eq!(format_ranges(&[]), "");
    }
}

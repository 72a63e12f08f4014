//! Self-attention: rotary position tables ([`Rotary`]), the prefix key/value cache ([`KvCache`]),
//! grouped-query [`Attention`] with chunked scores, run span by span over a packed pass (the
//! spans and their masks come from [`super::packing`]). While healing, on every device and dtype,
//! attention is one op (`TrainedAttention`) whose backward pass recomputes the scores chunk by
//! chunk, so that no `[B, heads, T, T]` matrix is kept for backpropagation.
//!
//! Kept apart from [`super::decoder`] because it is the one part of a block with its own
//! position, caching and memory logic; the decoder builds the rotary tables and the spans once per
//! call and hands them to every block.

use rayon::prelude::*;

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Module, Shape, Tensor, D};

use super::config::Config;
use super::layers::Linear;
use super::masked_softmax::masked_softmax;
use super::op_storage::OpStorage;
use super::packing::Span;
use super::weights::WeightMap;
use super::ModelError;

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

    /// The same tables on `device`.
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(Rotary { cos: self.cos.to_device(device)?, sin: self.sin.to_device(device)? })
    }

    /// Rotates the first `rotary_dim` features of each head (`x`: `[B, heads, T, head_dim]`), HF's
    /// `rotate_half` layout; the rest pass through (partial rotary, Phi-2).
    fn apply(&self, x: &Tensor, rotary_dim: usize) -> candle_core::Result<Tensor> {
        // candle's fused kernel has no backward pass; while healing, gradients flow through ours.
        let rope = |x: &Tensor| {
            if x.track_op() {
                super::rope::trained_rope(x, &self.cos, &self.sin)
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
    pub(super) fn load(w: &mut WeightMap, prefix: &str, cfg: &Config) -> Result<Self, ModelError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let o_name = output_projection_name(cfg.parallel_block);
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
    pub(super) fn projections(&self, parallel: bool) -> [(&'static str, &Linear); 4] {
        let o_name = output_projection_name(parallel);
        [("q_proj", &self.q_proj), ("k_proj", &self.k_proj), ("v_proj", &self.v_proj), (o_name, &self.o_proj)]
    }

    pub(super) fn projections_mut(&mut self, parallel: bool) -> [(&'static str, &mut Linear); 4] {
        let o_name = output_projection_name(parallel);
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            (o_name, &mut self.o_proj),
        ]
    }

    /// `x`: `[B, T, H]` (already normed), its rows laid out as `spans` (one for a plain pass;
    /// see [`super::packing`]). `prefix`: cached keys/values every row also attends to.
    /// `record`: where to store this call's keys/values (building a prefix cache). `chunk`: the
    /// scores computed at once (see [`super::Decoder::set_attention_chunk`]).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        spans: &[Span],
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
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (q * scale)?;
        let out = match spans {
            [span] => self.attend_span(&q, &k, &v, span, chunk, prefix)?,
            _ => {
                // Packed sequences: each span's rows against the prefix and the span's own keys.
                // The spans are independent and their products small (one thread each in the
                // GEMM), so inference on a CPU runs them side by side; each span's result does not
                // depend on which thread computes it. A GPU queues them on its one stream anyway.
                let span_out = |span: &Span| {
                    let rows = |x: &Tensor| x.narrow(2, span.start, span.len);
                    self.attend_span(&rows(&q)?, &rows(&k)?, &rows(&v)?, span, chunk, prefix)
                };
                let outs = if q.track_op() || !q.device().is_cpu() {
                    spans.iter().map(span_out).collect::<candle_core::Result<Vec<_>>>()?
                } else {
                    spans.par_iter().map(span_out).collect::<candle_core::Result<Vec<_>>>()?
                };
                Tensor::cat(&outs, 2)?
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }

    /// `softmax(q kᵀ + mask) v` over one span: `q` (scaled), `k`, `v` hold the span's rows,
    /// `[B, heads, len, hd]`; the prefix's keys/values go in front of the span's.
    fn attend_span(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        span: &Span,
        chunk: usize,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let p = prefix.map(|(pk, _)| pk.dim(2)).transpose()?.unwrap_or(0);
        let (k, v) = match prefix {
            Some((pk, pv)) => {
                let shape = (b, self.num_kv_heads, p, hd);
                (Tensor::cat(&[&pk.broadcast_as(shape)?, k], 2)?, Tensor::cat(&[&pv.broadcast_as(shape)?, v], 2)?)
            }
            None => (k.clone(), v.clone()),
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        // Tracked when any of q, k, v is: adapters on k_proj or v_proj alone leave q untracked in
        // the lowest adapted block.
        let tracked = q.track_op() || k.track_op() || v.track_op();
        if tracked && prefix.is_none() {
            // Training: one op that keeps no score matrix for the backward pass.
            q.contiguous()?.apply_op3(&k, &v, TrainedAttention { mask: span.mask.clone(), chunk })
        } else {
            // Inference takes the queries in chunks whose scores stay near `chunk` values (long
            // prompts would otherwise materialise [B, nh, T, P+T] at once), reading only the keys
            // up to a chunk's last row. A tracked pass with a prefix (no caller trains one)
            // keeps one chunk (the graph holds every piece anyway).
            let rows = if tracked { t } else { rows_per_chunk(chunk, b, nh, p + t, t) };
            attend(q, &k, &v, &span.mask, p, rows, !tracked)
        }
    }
}

/// Query rows per chunk so that a chunk's scores, `[B, heads, rows, keys]`, stay near `budget`
/// values (at least one row).
fn rows_per_chunk(budget: usize, b: usize, heads: usize, keys: usize, t: usize) -> usize {
    (budget / (b * heads * keys).max(1)).clamp(1, t)
}

/// `softmax(q kᵀ + mask)` for query rows `start .. start + len` over keys `0 .. keys`:
/// `[B, nh, len, keys]` in f32. `q`: `[B, nh, T, hd]` (scaled); `k`: `[B, nkv, S, hd]`.
fn chunk_probs(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    start: usize,
    len: usize,
    keys: usize,
) -> candle_core::Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, s) = (k.dim(1)?, k.dim(2)?);
    let rep = nh / nkv;
    let (qc, mc) =
        if len == t { (q.clone(), mask.clone()) } else { (q.narrow(2, start, len)?, mask.narrow(0, start, len)?) };
    let (kc, mc) = if keys == s { (k.clone(), mc) } else { (k.narrow(2, 0, keys)?, mc.narrow(1, 0, keys)?) };
    // Grouped-query attention without copying K: the `rep` query heads that share a KV head are
    // laid out next to each other, so [B, nh, L, hd] views as [B, nkv, rep·L, hd].
    let qc = qc.contiguous()?.reshape((b, nkv, rep * len, hd))?;
    let scores = qc.matmul(&kc.t()?)?.reshape((b, nh, len, keys))?.to_dtype(DType::F32)?;
    masked_softmax(&scores, &mc)
}

/// `softmax(q kᵀ + mask) v` with the queries taken `rows` at a time: `q` `[B, nh, T, hd]`
/// (scaled), `k`, `v` `[B, nkv, P + T, hd]` → `[B, nh, T, hd]`. With `skip_hidden_keys` a chunk
/// reads only the keys up to its last row (the decoder's masks never show row `i` a key past
/// `P + i`); otherwise every chunk reads all keys.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    p: usize,
    rows: usize,
    skip_hidden_keys: bool,
) -> candle_core::Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, s) = (k.dim(1)?, k.dim(2)?);
    let rep = nh / nkv;
    let mut chunks = Vec::with_capacity(t.div_ceil(rows));
    for start in (0..t).step_by(rows) {
        let len = rows.min(t - start);
        let keys = if skip_hidden_keys { (p + start + len).min(s) } else { s };
        let probs = chunk_probs(q, k, mask, start, len, keys)?.to_dtype(v.dtype())?;
        let vc = if keys == s { v.clone() } else { v.narrow(2, 0, keys)? };
        chunks.push(probs.reshape((b, nkv, rep * len, keys))?.matmul(&vc)?.reshape((b, nh, len, hd))?);
    }
    if chunks.len() == 1 {
        Ok(chunks.pop().expect("one chunk"))
    } else {
        Tensor::cat(&chunks, 2)
    }
}

/// Training attention, `softmax(q kᵀ + mask) v` as one op (`q` scaled, no prefix): the forward
/// pass takes the queries in chunks and keeps nothing but its inputs and output; the backward
/// pass recomputes each chunk's probabilities and turns them into the gradients of `q`, `k` and
/// `v`. Through candle's ops autograd would keep the scores, the masked scores, their
/// exponentials and the probabilities, each `[B, heads, T, T]`, for every block until the
/// backward pass (13 such copies, fitted on CPU runs before this op: 6.5 GiB a block for
/// Llama-2-70B at 2,048 tokens in bf16). Both passes are tensor ops, so the same
/// code runs on every device ([`OpStorage`]); softmax and the scores' gradient are computed in
/// f32, the products in the inputs' dtype, and `k`'s and `v`'s gradients summed over the chunks
/// in f32.
struct TrainedAttention {
    /// `[T, T]`, additive.
    mask: Tensor,
    /// Scores computed at once (see [`super::Decoder::set_attention_chunk`]).
    chunk: usize,
}

impl TrainedAttention {
    const NAME: &'static str = "trained-attention";

    /// The forward pass on any backend: the inputs copied out of the graph, attention computed
    /// chunk by chunk with tensor ops, the output handed back as storage.
    fn fwd<S: OpStorage>(
        &self,
        (q, q_layout): (&S, &Layout),
        (k, k_layout): (&S, &Layout),
        (v, v_layout): (&S, &Layout),
    ) -> candle_core::Result<(S, Shape)> {
        let (q, k, v) = (q.detached(q_layout)?, k.detached(k_layout)?, v.detached(v_layout)?);
        let (b, nh, t, _) = q.dims4()?;
        let rows = rows_per_chunk(self.chunk, b, nh, k.dim(2)?, t);
        S::owned(Self::NAME, &attend(&q, &k, &v, &self.mask, 0, rows, true)?)
    }
}

impl CustomOp3 for TrainedAttention {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((q, q_layout), (k, k_layout), (v, v_layout))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd((q, q_layout), (k, k_layout), (v, v_layout))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With P = softmax(S), O = P V: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)),
        // dQ = dS K, dK = dSᵀ Q; chunk by chunk, keys past a chunk's last row skipped (P = 0 there).
        let (q, k, v, out, grad) = (q.detach(), k.detach(), v.detach(), out.detach(), grad.detach());
        let dtype = q.dtype();
        let (b, nh, t, hd) = q.dims4()?;
        let (nkv, s) = (k.dim(1)?, k.dim(2)?);
        let rep = nh / nkv;
        let rows = rows_per_chunk(self.chunk, b, nh, s, t);
        let sums = || Tensor::zeros((b, nkv, s, hd), DType::F32, q.device());
        let (mut dq, dk, dv) = (Vec::with_capacity(t.div_ceil(rows)), sums()?, sums()?);
        // Adds a chunk's gradient, over keys `0 .. keys`, into the first `keys` rows of `sum`.
        let accumulate = |sum: &Tensor, chunk: &Tensor, keys: usize| {
            sum.slice_set(&(sum.narrow(2, 0, keys)? + chunk.to_dtype(DType::F32)?)?, 2, 0)
        };
        // The products read their operands where they lie (candle's CPU and CUDA products take
        // strided and transposed operands): transposing a chunk's probabilities or score
        // gradients into a copy first was a serial strided copy of a scores-sized matrix, twice a
        // chunk (10-14% of a SmolLM2 healing step at seq 256).
        for start in (0..t).step_by(rows) {
            let len = rows.min(t - start);
            let keys = (start + len).min(s);
            let probs = chunk_probs(&q, &k, &self.mask, start, len, keys)?;
            let d_out = grad.narrow(2, start, len)?.contiguous()?;
            let (kc, vc) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?);
            let qc = q.narrow(2, start, len)?.contiguous()?.reshape((b, nkv, rep * len, hd))?;
            let d_out_g = d_out.reshape((b, nkv, rep * len, hd))?;
            // Each chunk-sized temporary is dropped as soon as it is used: at most the values of
            // four f32 copies of the chunk are alive at once (`CHUNKED_SCORE_COPIES`).
            accumulate(&dv, &probs.to_dtype(dtype)?.reshape((b, nkv, rep * len, keys))?.t()?.matmul(&d_out_g)?, keys)?;
            let delta =
                (d_out.to_dtype(DType::F32)? * out.narrow(2, start, len)?.to_dtype(DType::F32)?)?.sum_keepdim(3)?;
            let centered =
                d_out_g.matmul(&vc.t()?)?.reshape((b, nh, len, keys))?.to_dtype(DType::F32)?.broadcast_sub(&delta)?;
            let ds = (probs * centered)?.to_dtype(dtype)?.reshape((b, nkv, rep * len, keys))?;
            dq.push(ds.matmul(&kc)?.reshape((b, nh, len, hd))?);
            accumulate(&dk, &ds.t()?.matmul(&qc)?, keys)?;
        }
        let dq = if dq.len() == 1 { dq.pop().expect("one chunk") } else { Tensor::cat(&dq, 2)? };
        Ok((Some(dq), Some(dk.to_dtype(dtype)?), Some(dv.to_dtype(dtype)?)))
    }
}

/// The HF name of the attention output projection: `dense` in Phi-2 (parallel blocks), `o_proj`
/// elsewhere.
fn output_projection_name(parallel: bool) -> &'static str {
    if parallel {
        "dense"
    } else {
        "o_proj"
    }
}

/// Attention scores computed at once per query chunk on `device`, by default (inference and
/// training): 2 Mi values on a CPU, 32 Mi on CUDA, as the memory model counts them
/// ([`prunesweep_proto::memory::score_chunk_values`]).
pub fn scores_per_chunk(device: &Device) -> usize {
    let values = prunesweep_proto::memory::score_chunk_values(crate::device::placement(device));
    usize::try_from(values).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The chunked op in `dtype` against candle's composed ops in f32 on the same (rounded)
    /// inputs: output and the three gradients within `tol` of the largest reference value.
    fn check_trained_attention(dtype: DType, tol: f32) {
        let dev = Device::Cpu;
        let (b, nh, nkv, t, hd) = (2, 4, 2, 7, 8);
        let tensor = |dims: (usize, usize, usize, usize), k: usize| {
            let n = dims.0 * dims.1 * dims.2 * dims.3;
            let values: Vec<f32> = (0..n).map(|i| ((i * 31 + k * 17) as f32 * 0.173).sin()).collect();
            Tensor::from_vec(values, dims, &dev).unwrap().to_dtype(dtype).unwrap()
        };
        let (q, k, v) = (tensor((b, nh, t, hd), 1), tensor((b, nkv, t, hd), 2), tensor((b, nkv, t, hd), 3));
        let weights = tensor((b, nh, t, hd), 4).to_dtype(DType::F32).unwrap();
        let mask = super::super::packing::causal_mask(t, 0, Some(5), &dev).unwrap();
        let run = |ours: bool| {
            let inputs = [&q, &k, &v].map(|x| {
                let x = if ours { x.clone() } else { x.to_dtype(DType::F32).unwrap() };
                Var::from_tensor(&x).unwrap()
            });
            let [q, k, v] = &inputs;
            let out = if ours {
                // Two query rows per chunk: four chunks, the last one short.
                let op = TrainedAttention { mask: mask.clone(), chunk: b * nh * t * 2 };
                q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op).unwrap()
            } else {
                // The `rep` query heads of a KV head sit next to each other.
                let expand = |x: &Tensor| {
                    x.unsqueeze(2).unwrap().broadcast_as((b, nkv, nh / nkv, t, hd)).unwrap().reshape((b, nh, t, hd))
                };
                let (k, v) = (expand(k.as_tensor()).unwrap(), expand(v.as_tensor()).unwrap());
                let scores = q.as_tensor().matmul(&k.t().unwrap()).unwrap().broadcast_add(&mask).unwrap();
                candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v).unwrap()
            };
            assert_eq!(out.dtype(), q.dtype());
            let loss = (out.to_dtype(DType::F32).unwrap() * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = |x: &Var| {
                let g = grads.get(x.as_tensor()).unwrap();
                assert_eq!(g.dtype(), x.dtype());
                g.to_dtype(DType::F32).unwrap()
            };
            [out.detach().to_dtype(DType::F32).unwrap(), g(q), g(k), g(v)]
        };
        let (ours, reference) = (run(true), run(false));
        for (what, (a, r)) in ["output", "dq", "dk", "dv"].iter().zip(ours.iter().zip(&reference)) {
            let diff = (a - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && diff <= tol * scale, "{dtype:?} {what}: {diff} (largest value {scale})");
        }
    }

    #[test]
    fn trained_attention_matches_candle_ops_in_value_and_gradient() {
        check_trained_attention(DType::F32, 1e-5);
    }

    /// CUDA trains in bf16 through the same op: products in bf16, softmax and the scores'
    /// gradient in f32. Within a few bf16 roundings (2⁻⁸ relative each) of the f32 reference,
    /// with the CPU's fused softmax and with candle's, which CUDA runs.
    #[test]
    fn trained_attention_in_bf16_stays_within_its_rounding() {
        check_trained_attention(DType::BF16, 2e-2);
        crate::model::kernels::with_stock_ops(|| check_trained_attention(DType::BF16, 2e-2));
    }
}

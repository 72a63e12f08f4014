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
//!
//! # Layout
//!
//! This file puts blocks together and runs them; a block ([`Block`]: held, or read from the
//! checkpoint per pass) is in [`super::block`], its parts in [`super::layers`] (projections,
//! norms, MLPs) and [`super::attention`] (rotary positions, attention, its mask and the prefix
//! [`KvCache`]), [`Decoder`]'s LoRA adapter methods in `adapters.rs`, and its offloading ones in
//! [`super::offload`].

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::attention::{scores_per_chunk, KvCache, Rotary};
use super::block::PassContexts;
pub use super::block::{Block, BlockContext};
use super::config::Config;
pub use super::frozen::Weight;
use super::layers::{Linear, Norm};
use super::nf4::Nf4Matrix;
use super::packing::Packing;
use super::state_cache::{PassKey, StateCache};
use super::weights::WeightMap;
use super::ModelError;

/// The whole decoder: embedding, the kept blocks, final norm and LM head.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The configuration of the checkpoint as loaded (its `num_layers` is the unpruned depth).
    pub cfg: Config,
    embed_tokens: Tensor,
    pub(super) blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    device: Device,
    dtype: DType,
    pub(super) attention_chunk: usize,
    /// Residual states of earlier evaluation passes, shared with every clone (off until given a
    /// budget).
    states: StateCache,
    /// Whether the blocks are spread over several devices ([`super::spread`]).
    pub(super) blocks_spread: bool,
}

impl Decoder {
    /// Builds the decoder from HF-named weights (`model.layers.{i}...`), checking every shape
    /// against `cfg`. Every tensor must be used: leftovers mean the config and checkpoint disagree.
    pub fn load(cfg: Config, w: WeightMap) -> Result<Self, ModelError> {
        Self::build(cfg, w, Block::load)
    }

    pub(super) fn build(
        cfg: Config,
        mut w: WeightMap,
        block: impl Fn(&mut WeightMap, usize, &Config) -> Result<Block, ModelError>,
    ) -> Result<Self, ModelError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.take("model.embed_tokens.weight", &[v, h])?;
        let blocks = (0..cfg.num_layers).map(|i| block(&mut w, i, &cfg)).collect::<Result<Vec<_>, _>>()?;
        let norm = Norm::load(&mut w, final_norm_name(cfg.parallel_block), &cfg)?;
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
        let attention_chunk = scores_per_chunk(&device);
        Ok(Decoder {
            cfg,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            device,
            dtype,
            attention_chunk,
            states: StateCache::default(),
            blocks_spread: false,
        })
    }

    /// How many attention scores are computed at once, in inference and in training
    /// ([`scores_per_chunk`] of the model's device by default):
    /// queries are taken in chunks of rows (at least one) that stay within this budget. Smaller
    /// saves memory on long prompts; the result does not depend on it.
    pub fn set_attention_chunk(&mut self, scores: usize) {
        self.attention_chunk = scores.max(1);
    }

    /// The residual states this model and its clones keep between evaluation passes (see
    /// [`super::state_cache`]): give it a budget to turn it on.
    pub fn state_cache(&self) -> &StateCache {
        &self.states
    }

    /// How many leading blocks are still the loaded model's first blocks, unchanged: the depth up
    /// to which a kept state of the loaded model is this model's too.
    fn blocks_as_loaded(&self) -> usize {
        self.blocks.iter().enumerate().take_while(|(i, b)| b.original_index == *i && b.as_loaded).count()
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
        self.run_packing(ids, &Packing::single(t), prefix, record, observe, false)
    }

    /// Runs the sequences `packing` lays end to end in one row (`ids`: `[1, packing.len()]`),
    /// each attending only to itself, to the sequence it continues if any, and to `prefix`, and
    /// returns `x^(L')`, `[1, packing.len(), H]`. Unlike right-padded batches, no work is spent
    /// on padding or on scores between sequences, and a shared prefix's keys/values are used as
    /// they are rather than copied per sequence.
    ///
    /// Without a prefix, the pass goes through the [`StateCache`]: it starts from the loaded
    /// model's kept state at the deepest boundary its own first blocks still match, and keeps
    /// states for later passes.
    pub fn run_packed(&self, ids: &Tensor, packing: &Packing, prefix: Option<&KvCache>) -> candle_core::Result<Tensor> {
        self.run_packing(ids, packing, prefix, None, &mut |_, _| Ok(()), true)
    }

    /// [`Decoder::run`] over `ids` `[B, T]` whose `T` positions `packing` lays out; `reuse`: through
    /// the [`StateCache`] (callers that observe every state pass `false`).
    fn run_packing(
        &self,
        ids: &Tensor,
        packing: &Packing,
        prefix: Option<&KvCache>,
        record: Option<&mut KvCache>,
        observe: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
        reuse: bool,
    ) -> candle_core::Result<Tensor> {
        if prefix.is_some() && record.is_some() {
            candle_core::bail!("recording a KV cache on top of a prefix cache is not supported");
        }
        let t = ids.dim(1)?;
        let (offset, context) = self.pass_context(ids, packing, prefix)?;
        let mut x = self.embed(ids)?;
        // Which leading blocks match the loaded model's, and the key of this pass's states.
        let as_loaded = self.blocks_as_loaded();
        let key = if reuse && prefix.is_none() && record.is_none() && as_loaded > 0 && self.states.enabled() {
            Some(PassKey::new(ids, packing, self.attention_chunk, super::kernels::fused_cpu(&x))?)
        } else {
            None
        };
        let mut start = 0;
        if let Some(key) = &key {
            if let Some((boundary, state)) = self.states.resume(key, as_loaded, &self.device)? {
                (start, x) = (boundary, state);
            }
        }
        let stride = StateCache::stride(self.cfg.num_layers);
        let mut recorded = Vec::new();
        let mut contexts = PassContexts::new(&self.device, context);
        for (l, block, ahead) in self.blocks_reading_ahead(start) {
            observe(l, &x.to_device(&self.device)?)?;
            if let Some(key) = &key {
                if l > start && l <= as_loaded && (l % stride == 0 || l == as_loaded) {
                    self.states.offer(key, l, &x)?;
                }
            }
            let rec = record.as_ref().map(|_| &mut recorded);
            let (input, context) = contexts.enter(block, &x)?;
            let kv = prefix.map(|p| &p.layers[l]);
            x = block.with_layers(ahead, |layers| layers.forward(&input, context, self.attention_chunk, kv, rec))?;
        }
        // Back where the final norm and the LM head are (a no-op unless the blocks are spread).
        let x = x.to_device(&self.device)?;
        observe(self.blocks.len(), &x)?;
        if let Some(r) = record {
            r.layers = recorded;
            r.len = offset + t;
        }
        Ok(x)
    }

    /// Checks that `packing` lays out `ids` (`[B, T]`; several segments need `B = 1`) and that
    /// `prefix` has a layer per block, and builds what every block of the pass shares (once per
    /// pass, not once per block); returns it with the pass's first position (after `prefix`).
    pub(super) fn pass_context(
        &self,
        ids: &Tensor,
        packing: &Packing,
        prefix: Option<&KvCache>,
    ) -> candle_core::Result<(usize, BlockContext)> {
        let (b, t) = ids.dims2()?;
        let segments = packing.segments().len();
        if packing.len() != t || (segments > 1 && b != 1) {
            candle_core::bail!(
                "{segments} packed segments of {} tokens do not fill ids of shape [{b}, {t}] (packing needs B = 1)",
                packing.len()
            );
        }
        if let Some(p) = prefix {
            if p.layers.len() != self.blocks.len() {
                candle_core::bail!("prefix cache has {} layers, model has {}", p.layers.len(), self.blocks.len());
            }
        }
        let offset = prefix.map_or(0, |p| p.len);
        let rotary = Rotary::new(&self.cfg, &packing.positions(offset), self.dtype, &self.device)?;
        let spans = packing.spans(offset, self.cfg.sliding_window, &self.device)?;
        Ok((offset, BlockContext { rotary, spans }))
    }

    /// The token embedding `x^(0)` of `ids` (`[B, T]`, u32): `[B, T, H]`.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))
    }

    /// The rotary tables and the causal span for sequences of `t` tokens starting at position 0
    /// (no prefix, no packing): what [`Decoder::run`] builds for `[B, t]` ids.
    pub fn block_context(&self, t: usize) -> candle_core::Result<BlockContext> {
        let packing = Packing::single(t);
        let rotary = Rotary::new(&self.cfg, &packing.positions(0), self.dtype, &self.device)?;
        Ok(BlockContext { rotary, spans: packing.spans(0, self.cfg.sliding_window, &self.device)? })
    }

    /// `x^(l+1)` from `x^(l)` (`[B, T, H]`) through kept block `l`, exactly as [`Decoder::run`]
    /// applies it. Healing's activation recomputation runs the blocks one at a time this way.
    pub fn forward_block(&self, l: usize, x: &Tensor, context: &BlockContext) -> candle_core::Result<Tensor> {
        let Some(block) = self.blocks.get(l) else {
            candle_core::bail!("block {l} does not exist: the model has {} blocks", self.blocks.len())
        };
        block.with_layers(None, |layers| layers.forward(x, context, self.attention_chunk, None, None))
    }

    /// Whether kept block `l` carries at least one LoRA adapter.
    pub fn block_has_adapter(&self, l: usize) -> bool {
        self.blocks.get(l).is_some_and(|b| b.projections().iter().any(|(_, lin)| lin.lora.is_some()))
    }

    /// Final norm + LM head over pre-norm states `[..., H]` → logits `[..., V]` in f32.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(&self.final_norm(hidden)?)?.to_dtype(DType::F32)
    }

    /// The final norm of pre-norm states `[..., H]`: the LM head's input.
    pub fn final_norm(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.norm.forward(hidden)
    }

    /// The LM head (`[V, H]`; the embedding when tied), for a training loss that fuses its
    /// product with the cross-entropy (`heal/loss.rs`).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
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
        self.require_resident("writing the model").map_err(candle_core::Error::wrap)?;
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, block) in self.blocks.iter().enumerate() {
            block.save(i, self.dtype, &self.device, &mut out)?;
        }
        self.norm.save(final_norm_name(self.cfg.parallel_block), &mut out);
        if !self.cfg.tie_word_embeddings {
            self.lm_head.save("lm_head", self.dtype, &self.device, &mut out)?;
        }
        Ok(out)
    }

    /// Stores every block projection as NF4 (QLoRA's frozen base; embedding, norms and LM head
    /// stay as they are). Returns `(parameters, bytes)` of the quantized projections.
    pub fn quantize_nf4(&mut self) -> candle_core::Result<(usize, usize)> {
        self.require_resident("quantizing the model").map_err(candle_core::Error::wrap)?;
        let (mut params, mut bytes) = (0, 0);
        for block in &mut self.blocks {
            for (_, lin) in block.projections_mut() {
                match &lin.weight {
                    Weight::Dense(w) => {
                        let m = Nf4Matrix::quantize(w)?;
                        params += w.elem_count();
                        bytes += m.bytes();
                        lin.weight = Weight::Nf4(Arc::new(m));
                    }
                    // Quantized while loading (`Model::load_nf4`): counted as they are.
                    Weight::Nf4(m) => {
                        let (rows, cols) = m.dims();
                        params += rows * cols;
                        bytes += m.bytes();
                    }
                }
            }
        }
        Ok((params, bytes))
    }
}

/// The HF name of the final norm: Phi-2 (parallel blocks) calls it `model.final_layernorm`, the
/// other families `model.norm`.
fn final_norm_name(parallel: bool) -> &'static str {
    if parallel {
        "model.final_layernorm"
    } else {
        "model.norm"
    }
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

    #[test]
    fn ranges_are_compact() {
        assert_eq!(format_ranges(&[0, 1, 2, 5, 6, 9]), "0-2, 5-6, 9");
        assert_eq!(format_ranges(&[]), "");
    }
}

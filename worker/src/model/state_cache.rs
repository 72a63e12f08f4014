//! The unpruned model's residual stream, kept between the cells of a sweep.
//!
//! A cell that drops layers `s .. s+n` runs blocks `0 .. s` exactly as the unpruned model does:
//! the same weights on the same inputs. When a sweep evaluates the baseline and then cell after
//! cell on the same tasks, those leading blocks recompute what an earlier job already computed —
//! for a deepest-layers cut, nearly the whole model. A [`StateCache`] keeps the state `x^(l)`
//! entering block `l` of evaluation passes, keyed by everything that decides it (the token ids,
//! how the pass is packed, the compute path), and a later pass of a model whose first `l` blocks
//! are still the loaded ones starts from it. The results are bit for bit those of running every
//! block: the skipped blocks would have computed the very tensor that is reused.
//!
//! Which states are kept: those at every `stride`-th boundary ([`StateCache::stride`], about 16
//! across the model) and at the deepest boundary each pass could reuse (a cell's cut), within a
//! byte budget, least recently used out first. States live in host memory; a budget of 0 (the
//! default of a fresh model, and of one-off commands) keeps nothing. Cloning a decoder shares its
//! cache, which is how the worker's held model hands it from job to job.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};

use super::packing::{Packing, Segment};

/// What decides the residual stream of one pass besides the blocks: its token ids (`[B, T]`), how
/// its sequences are laid out, the attention chunking and whether the CPU's fused kernels ran.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PassKey {
    ids: Vec<u32>,
    shape: (usize, usize),
    segments: Vec<Segment>,
    attention_chunk: usize,
    fused: bool,
}

impl PassKey {
    /// The key of a pass over `ids` (`[B, T]`, u32) laid out by `packing`.
    pub fn new(ids: &Tensor, packing: &Packing, attention_chunk: usize, fused: bool) -> candle_core::Result<Self> {
        Ok(PassKey {
            ids: ids.flatten_all()?.to_vec1::<u32>()?,
            shape: ids.dims2()?,
            segments: packing.segments().to_vec(),
            attention_chunk,
            fused,
        })
    }
}

/// A kept state and when it was last used.
#[derive(Debug)]
struct Entry {
    state: Tensor,
    bytes: u64,
    used_at: u64,
}

#[derive(Debug, Default)]
struct Inner {
    budget: u64,
    used: u64,
    clock: u64,
    /// Per pass, boundary `l` → `x^(l)`.
    passes: HashMap<PassKey, BTreeMap<usize, Entry>>,
    hits: u64,
    blocks_skipped: u64,
}

/// How much a [`StateCache`] has saved so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Passes that started from a kept state.
    pub hits: u64,
    /// Blocks those passes did not run.
    pub blocks_skipped: u64,
    /// Bytes held now.
    pub bytes: u64,
}

/// Residual states of evaluation passes, shared by the clones of one loaded model (see the
/// module documentation).
#[derive(Debug, Clone, Default)]
pub struct StateCache {
    inner: Arc<Mutex<Inner>>,
}

impl StateCache {
    /// Keeps at most `bytes` of states (0: none, and drops what is kept).
    pub fn set_budget(&self, bytes: u64) {
        let mut inner = self.lock();
        inner.budget = bytes;
        inner.evict_to(bytes);
    }

    /// Whether anything may be kept.
    pub fn enabled(&self) -> bool {
        self.lock().budget > 0
    }

    /// The states kept at every boundary that is a multiple of this, for a model of `layers`
    /// layers: about 16 across it, so that a cut starts at most `stride - 1` blocks before its
    /// first dropped layer.
    pub fn stride(layers: usize) -> usize {
        layers.div_ceil(16).max(1)
    }

    /// The deepest kept state of `key` at a boundary in `1 ..= upto`, as `(boundary, state on
    /// device)`.
    pub fn resume(&self, key: &PassKey, upto: usize, device: &Device) -> candle_core::Result<Option<(usize, Tensor)>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let Some(states) = inner.passes.get_mut(key) else { return Ok(None) };
        let Some((&boundary, entry)) = states.range_mut(1..=upto).next_back() else { return Ok(None) };
        entry.used_at = now;
        let state = entry.state.to_device(device)?;
        inner.hits += 1;
        inner.blocks_skipped += boundary as u64;
        Ok(Some((boundary, state)))
    }

    /// Keeps `state` as `x^(boundary)` of `key`, making room by dropping the least recently used
    /// states; a state larger than the whole budget is not kept.
    pub fn offer(&self, key: &PassKey, boundary: usize, state: &Tensor) -> candle_core::Result<()> {
        let bytes = (state.elem_count() * state.dtype().size_in_bytes()) as u64;
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if bytes > inner.budget {
            return Ok(());
        }
        if let Some(entry) = inner.passes.get_mut(key).and_then(|s| s.get_mut(&boundary)) {
            entry.used_at = now;
            return Ok(());
        }
        let budget = inner.budget;
        inner.evict_to(budget - bytes);
        let state = state.to_device(&Device::Cpu)?;
        let entry = Entry { state, bytes, used_at: now };
        match inner.passes.get_mut(key) {
            Some(states) => {
                states.insert(boundary, entry);
            }
            // The key (every token id of the pass) is copied once per pass, not per boundary.
            None => {
                inner.passes.insert(key.clone(), BTreeMap::from([(boundary, entry)]));
            }
        }
        inner.used += bytes;
        Ok(())
    }

    /// What the cache has saved so far and holds now.
    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats { hits: inner.hits, blocks_skipped: inner.blocks_skipped, bytes: inner.used }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic mid-update leaves at worst a missing entry or a stale byte count: recover it.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Drops least recently used states until at most `limit` bytes are held.
    fn evict_to(&mut self, limit: u64) {
        while self.used > limit {
            let oldest = self
                .passes
                .iter()
                .flat_map(|(key, states)| states.iter().map(move |(&b, e)| (e.used_at, key, b)))
                .min_by_key(|(used_at, _, _)| *used_at)
                .map(|(_, key, b)| (key.clone(), b));
            let Some((key, boundary)) = oldest else { break };
            let states = self.passes.get_mut(&key).expect("just found");
            let entry = states.remove(&boundary).expect("just found");
            self.used -= entry.bytes;
            if states.is_empty() {
                self.passes.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::lora::LoraSpec;
    use crate::model::Model;

    fn tiny_llama() -> Model {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        Model::load(&dir, &Device::Cpu).unwrap()
    }

    /// Two sequences packed in one pass, and the pass's output.
    fn pass(model: &Model) -> Tensor {
        let packing = Packing::sequences(&[5, 3]);
        let ids = Tensor::new(&[[1u32, 17, 42, 5, 99, 7, 8, 9]], &Device::Cpu).unwrap();
        model.decoder.run_packed(&ids, &packing, None).unwrap()
    }

    fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(a == b, "{what}: not bit for bit the same");
    }

    fn key(n: u32) -> PassKey {
        let ids = Tensor::new(&[[n, n + 1]], &Device::Cpu).unwrap();
        PassKey::new(&ids, &Packing::single(2), 1, true).unwrap()
    }

    #[test]
    fn keeps_within_budget_and_drops_the_least_recently_used() {
        let state = |v: f32| Tensor::full(v, (1, 2, 4), &Device::Cpu).unwrap(); // 32 bytes
        let cache = StateCache::default();
        cache.offer(&key(1), 2, &state(1.0)).unwrap();
        assert_eq!(cache.stats().bytes, 0, "no budget, nothing kept");
        cache.set_budget(64);
        cache.offer(&key(1), 2, &state(1.0)).unwrap();
        cache.offer(&key(1), 4, &state(2.0)).unwrap();
        let (b, s) = cache.resume(&key(1), 3, &Device::Cpu).unwrap().unwrap();
        assert_eq!((b, s.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]), (2, 1.0), "deepest at or below 3");
        assert_eq!(cache.resume(&key(1), 9, &Device::Cpu).unwrap().unwrap().0, 4);
        assert!(cache.resume(&key(1), 1, &Device::Cpu).unwrap().is_none());
        assert!(cache.resume(&key(2), 9, &Device::Cpu).unwrap().is_none(), "another pass's states are not its");
        // Full: boundary 2 was used last less recently than 4, so it goes.
        cache.resume(&key(1), 9, &Device::Cpu).unwrap();
        cache.offer(&key(2), 1, &state(3.0)).unwrap();
        assert_eq!(cache.stats().bytes, 64);
        assert!(cache.resume(&key(1), 3, &Device::Cpu).unwrap().is_none(), "the least recently used went");
        assert_eq!(cache.resume(&key(1), 9, &Device::Cpu).unwrap().unwrap().0, 4);
        cache.offer(&key(3), 1, &Tensor::zeros((1, 4, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(cache.stats().bytes, 64, "a state larger than the budget is not kept, and evicts nothing");
        cache.set_budget(0);
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn a_cut_starts_from_the_loaded_models_states_bit_for_bit() {
        let base = tiny_llama();
        assert_eq!(base.decoder.num_blocks(), 4);
        // Without a cache, the reference outputs.
        let mut cut = base.clone();
        cut.decoder.remove_layers(&[2]).unwrap();
        let (want_base, want_cut) = (pass(&base), pass(&cut));

        base.decoder.state_cache().set_budget(1 << 20);
        assert_same(&pass(&base), &want_base, "the baseline keeping its states");
        assert_eq!(base.decoder.state_cache().stats().hits, 0);
        let mut cut = base.clone();
        cut.decoder.remove_layers(&[2]).unwrap();
        assert_same(&pass(&cut), &want_cut, "the cut, from the kept state");
        let stats = base.decoder.state_cache().stats();
        assert_eq!((stats.hits, stats.blocks_skipped), (1, 2), "blocks 0 and 1 were not run again");
        // Dropping block 0 leaves nothing of the loaded model to start from.
        let mut first = base.clone();
        first.decoder.remove_layers(&[0]).unwrap();
        pass(&first);
        assert_eq!(base.decoder.state_cache().stats().hits, 1);
        // A model whose blocks changed (adapters attached, weights quantized) runs every block.
        let mut adapted = base.clone();
        let spec = LoraSpec { rank: 2, alpha: 4.0, dropout: 0.0, targets: vec!["down_proj".into()] };
        adapted.decoder.attach_adapters(&spec, 1).unwrap();
        pass(&adapted);
        let mut quantized = base.clone();
        quantized.decoder.quantize_nf4().unwrap();
        pass(&quantized);
        assert_eq!(base.decoder.state_cache().stats().hits, 1, "changed blocks never start from kept states");
        // The stock ops (the GPU's path) are a different computation: their own states.
        crate::model::kernels::with_stock_ops(|| pass(&cut));
        assert_eq!(base.decoder.state_cache().stats().hits, 1);
    }
}

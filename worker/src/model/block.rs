//! One decoder block, `x^(l+1) = x^(l) + f(x^(l), θ^(l))`: its parts (norms, attention, MLP), and
//! where its weights are — held on the device, or left in the checkpoint and read for each pass
//! ([`super::offload`]).

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::attention::{Attention, Rotary};
use super::config::Config;
use super::layers::{Linear, Mlp, Norm};
use super::offload::Offloaded;
use super::packing::Span;
use super::weights::WeightMap;
use super::ModelError;

/// What every block of one pass over `[B, T]` token ids shares: the rotary tables and the
/// attention spans with their masks, built once per pass. Healing runs the blocks one at a time with it
/// ([`Decoder::forward_block`](super::Decoder::forward_block)) so that it can recompute a block in the
/// backward pass.
#[derive(Debug)]
pub struct BlockContext {
    pub(super) rotary: Rotary,
    pub(super) spans: Vec<Span>,
}

impl BlockContext {
    /// The same context on `device`.
    fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        let spans = self
            .spans
            .iter()
            .map(|s| Ok(Span { mask: s.mask.to_device(device)?, ..s.clone() }))
            .collect::<candle_core::Result<_>>()?;
        Ok(BlockContext { rotary: self.rotary.to_device(device)?, spans })
    }
}

/// One pass's [`BlockContext`] on each device its blocks are on: built on the decoder's device,
/// copied to another the first time a block there runs. Only a model spread over several
/// devices ([`super::spread`]) ever needs a second one.
pub(super) struct PassContexts {
    contexts: Vec<(Device, BlockContext)>,
}

impl PassContexts {
    /// The pass's `context`, on `device`.
    pub(super) fn new(device: &Device, context: BlockContext) -> Self {
        PassContexts { contexts: vec![(device.clone(), context)] }
    }

    /// The residual stream `x` moved to `block`'s device (as it is, on the same device), and the
    /// context there.
    pub(super) fn enter(&mut self, block: &Block, x: &Tensor) -> candle_core::Result<(Tensor, &BlockContext)> {
        let device = &block.device;
        let i = match self.contexts.iter().position(|(d, _)| d.same_device(device)) {
            Some(i) => i,
            None => {
                let context = self.contexts[0].1.to_device(device)?;
                self.contexts.push((device.clone(), context));
                self.contexts.len() - 1
            }
        };
        Ok((x.to_device(device)?, &self.contexts[i].1))
    }
}

/// One decoder block `f(x^(l), θ^(l))`, remembering which layer of the original checkpoint it was.
#[derive(Debug, Clone)]
pub struct Block {
    /// Index of this block in the unpruned checkpoint.
    pub original_index: usize,
    /// Whether its weights are still those loaded (no adapter attached, nothing quantized or
    /// merged since): only such blocks compute what the loaded model's [`StateCache`](super::state_cache::StateCache) kept.
    pub(super) as_loaded: bool,
    /// The device its weights are on, or read onto: the decoder's, or one of several the blocks
    /// are spread over ([`super::spread`]).
    pub(super) device: Device,
    weights: BlockWeights,
}

/// Where a block's weights are.
#[derive(Debug, Clone)]
enum BlockWeights {
    /// Held on the device.
    Resident(Box<Layers>),
    /// Left in the checkpoint and read onto the device for each pass, then dropped: how a model
    /// larger than the device's free memory is evaluated ([`Decoder::load_offloaded`]).
    Offloaded(Arc<Offloaded>),
}

/// A block's parts.
#[derive(Debug, Clone)]
pub(super) struct Layers {
    input_layernorm: Norm,
    /// `None` for Phi-2's parallel block, which norms once.
    post_attention_layernorm: Option<Norm>,
    self_attn: Attention,
    mlp: Mlp,
}

impl Layers {
    pub(super) fn load(w: &mut WeightMap, index: usize, cfg: &Config) -> Result<Self, ModelError> {
        let p = format!("model.layers.{index}");
        Ok(Layers {
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

    fn projections(&self) -> Vec<(String, &Linear)> {
        let parallel = self.post_attention_layernorm.is_none();
        let attn = self.self_attn.projections(parallel).into_iter().map(|(n, l)| (format!("self_attn.{n}"), l));
        let mlp = self.mlp.projections().into_iter().map(|(n, l)| (format!("mlp.{n}"), l));
        attn.chain(mlp).collect()
    }

    fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let parallel = self.post_attention_layernorm.is_none();
        let attn = self.self_attn.projections_mut(parallel).into_iter().map(|(n, l)| (format!("self_attn.{n}"), l));
        let mlp = self.mlp.projections_mut().into_iter().map(|(n, l)| (format!("mlp.{n}"), l));
        attn.chain(mlp).collect()
    }

    /// `x^(l+1) = x^(l) + f(x^(l))`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        context: &BlockContext,
        chunk: usize,
        prefix: Option<&(Tensor, Tensor)>,
        record: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let attn = self.self_attn.forward(&h, &context.rotary, &context.spans, chunk, prefix, record)?;
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

impl Block {
    pub(super) fn load(w: &mut WeightMap, index: usize, cfg: &Config) -> Result<Self, ModelError> {
        let layers = Layers::load(w, index, cfg)?;
        let weights = BlockWeights::Resident(Box::new(layers));
        Ok(Block { original_index: index, as_loaded: true, device: w.device().clone(), weights })
    }

    /// Block `index` left in the checkpoint that `w` reads ([`BlockWeights::Offloaded`]); `None`
    /// when `w` cannot read it again (not safetensors files).
    pub(super) fn offloaded(w: &WeightMap, index: usize, cfg: &Config) -> Option<Self> {
        let weights = BlockWeights::Offloaded(Arc::new(Offloaded::new(w, index, cfg)?));
        Some(Block { original_index: index, as_loaded: true, device: w.device().clone(), weights })
    }

    /// Reads an offloaded block onto its device to keep, if its bytes fit in `room`; returns the
    /// bytes it took (0: resident already, or it does not fit).
    pub(super) fn hold(&mut self, room: u64) -> Result<u64, ModelError> {
        let BlockWeights::Offloaded(o) = &self.weights else { return Ok(0) };
        if o.bytes() > room {
            return Ok(0);
        }
        let bytes = o.bytes();
        self.weights = BlockWeights::Resident(Box::new(o.read_to_hold(self.original_index, &self.device)?));
        Ok(bytes)
    }

    /// Whether its weights are read from the checkpoint for each pass instead of held.
    pub fn is_offloaded(&self) -> bool {
        matches!(self.weights, BlockWeights::Offloaded(_))
    }

    /// The bytes an offloaded block takes once read; `None` for a held one.
    pub(super) fn offloaded_bytes(&self) -> Option<u64> {
        match &self.weights {
            BlockWeights::Offloaded(o) => Some(o.bytes()),
            BlockWeights::Resident(_) => None,
        }
    }

    /// Every projection of the block, named as in HF (`self_attn.q_proj`, `mlp.fc1`, …); none
    /// for an offloaded block, whose weights are not held.
    pub fn projections(&self) -> Vec<(String, &Linear)> {
        match &self.weights {
            BlockWeights::Resident(layers) => layers.projections(),
            BlockWeights::Offloaded(_) => Vec::new(),
        }
    }

    /// [`Block::projections`], mutably (quantizing, attaching adapters). The block no longer
    /// counts as loaded: its states are not taken from the [`StateCache`](super::state_cache::StateCache) any more.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.as_loaded = false;
        match &mut self.weights {
            BlockWeights::Resident(layers) => layers.projections_mut(),
            BlockWeights::Offloaded(_) => Vec::new(),
        }
    }

    pub(super) fn save(
        &self,
        new_index: usize,
        dtype: DType,
        device: &Device,
        out: &mut Vec<(String, Tensor)>,
    ) -> candle_core::Result<()> {
        let BlockWeights::Resident(layers) = &self.weights else {
            candle_core::bail!("block {} is offloaded (not held): it cannot be written", self.original_index)
        };
        let p = format!("model.layers.{new_index}");
        layers.input_layernorm.save(&format!("{p}.input_layernorm"), out);
        if let Some(n) = &layers.post_attention_layernorm {
            n.save(&format!("{p}.post_attention_layernorm"), out);
        }
        for (name, lin) in layers.projections() {
            lin.save(&format!("{p}.{name}"), dtype, device, out)?;
        }
        Ok(())
    }

    /// Calls `f` with the block's parts: held, or read from the checkpoint for the call and
    /// dropped after it — by `ahead` when it was started earlier ([`Block::read_ahead`]). Every
    /// caller runs a block as `with_layers(ahead, |l| l.forward(..))`, so that one read serves
    /// however many passes `f` runs.
    pub(super) fn with_layers<R>(
        &self,
        ahead: Option<ReadAhead>,
        f: impl FnOnce(&Layers) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match (&self.weights, ahead) {
            (BlockWeights::Resident(layers), _) => f(layers),
            (BlockWeights::Offloaded(_), Some(ahead)) => f(&ahead.finish()?),
            (BlockWeights::Offloaded(o), None) => {
                f(&o.read(self.original_index, &self.device).map_err(candle_core::Error::wrap)?)
            }
        }
    }

    /// For an offloaded block, starts reading it from the checkpoint on another thread, so that
    /// the read overlaps the block before it running (on a GPU, the host's file reading and
    /// conversion overlap the device's work); `None` for a held block. A pass then holds two
    /// offloaded blocks at a time, the one running and the next.
    pub(super) fn read_ahead(&self) -> Option<ReadAhead> {
        let BlockWeights::Offloaded(o) = &self.weights else { return None };
        let (o, index, device) = (o.clone(), self.original_index, self.device.clone());
        Some(ReadAhead(std::thread::spawn(move || o.read(index, &device))))
    }
}

/// An offloaded block's read, started on another thread by [`Block::read_ahead`]; given to that
/// block's [`Block::with_layers`]. Dropped unused, the read finishes and is dropped.
pub(super) struct ReadAhead(std::thread::JoinHandle<Result<Layers, ModelError>>);

impl ReadAhead {
    /// Waits for the read.
    fn finish(self) -> candle_core::Result<Layers> {
        match self.0.join() {
            Ok(read) => read.map_err(candle_core::Error::wrap),
            Err(_) => candle_core::bail!("the thread reading a block from the checkpoint panicked"),
        }
    }
}

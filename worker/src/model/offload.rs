//! Blocks left in the checkpoint: how a model larger than the device's free memory is evaluated.
//!
//! [`Decoder::load_offloaded`] loads the embedding, final norm and LM head and leaves every block
//! in the checkpoint's safetensors files. Each pass reads an offloaded block onto the device just
//! while the block before it runs ([`Block::read_ahead`]) and drops it after, so the device holds
//! two such blocks at a time, the one running and the next; the numbers
//! are the same to the bit as a whole-model load's (the same tensors, read the same way, run
//! through the same ops). [`Decoder::make_resident`] then keeps as many blocks as the free memory
//! holds, so only the rest are read again for every pass: a 70B model in bf16 (131 GiB) is
//! evaluated on one 141 GB H200 holding most of its blocks. The worker picks this for a baseline
//! or an unhealed cell whose model does not fit (`serve/pipeline.rs`); `worker eval --hold-gib`
//! forces it. Healing needs every block held and refuses an offloaded model.

use candle_core::{Device, Tensor};

use super::attention::KvCache;
use super::block::{Block, Layers, PassContexts, ReadAhead};
use super::config::Config;
use super::decoder::Decoder;
use super::packing::Packing;
use super::weights::WeightMap;
use super::ModelError;

/// Where an offloaded block is read from: a map of its tensors in the checkpoint's files
/// ([`WeightMap::block`]), made afresh for each read, and what they take once loaded.
#[derive(Debug)]
pub(super) struct Offloaded {
    source: WeightMap,
    cfg: Config,
    bytes: u64,
}

impl Offloaded {
    /// Block `index` of the checkpoint `w` reads; `None` when `w` cannot read it again (not
    /// safetensors files).
    pub(super) fn new(w: &WeightMap, index: usize, cfg: &Config) -> Option<Self> {
        let source = w.block(index)?;
        let bytes = source.remaining_elements() * w.dtype().size_in_bytes() as u64;
        Some(Offloaded { source, cfg: cfg.clone(), bytes })
    }

    /// Bytes the block takes on the device in the model's dtype.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Block `index` read from the checkpoint onto `device` for one pass, every tensor checked as
    /// a whole-model load checks it, in the checkpoint's layout ([`WeightMap::keep_layout`]).
    pub(super) fn read(&self, index: usize, device: &Device) -> Result<Layers, ModelError> {
        self.load(index, device, true)
    }

    /// Block `index` read onto `device` to keep ([`Block::hold`]): laid out as a whole-model
    /// load lays it out, since it now serves every pass.
    pub(super) fn read_to_hold(&self, index: usize, device: &Device) -> Result<Layers, ModelError> {
        self.load(index, device, false)
    }

    fn load(&self, index: usize, device: &Device, keep_layout: bool) -> Result<Layers, ModelError> {
        let w = self.source.block(index).expect("made from files, so readable again").onto(device);
        let mut w = if keep_layout { w.keep_layout() } else { w };
        Layers::load(&mut w, index, &self.cfg)
    }
}

impl Decoder {
    /// [`Decoder::load`] with every block left in the checkpoint `w` reads (see the module's
    /// doc), until [`Decoder::make_resident`] keeps it. `w` must read safetensors files.
    pub fn load_offloaded(cfg: Config, w: WeightMap) -> Result<Self, ModelError> {
        if w.block(0).is_none() {
            return Err(ModelError::Offloaded(
                "blocks can be read for each pass only from an HF checkpoint's safetensors files".into(),
            ));
        }
        Self::build(cfg, w, |w, i, cfg| Ok(Block::offloaded(w, i, cfg).expect("files checked above")))
    }

    /// Runs several passes (`ids` laid out by their packing, all after `prefix` if any), as
    /// [`Decoder::run_packed`] runs each, block by block across them: an offloaded block is read
    /// from the checkpoint once for all of them instead of once per pass. Returns each pass's
    /// `x^(L')`, bit for bit what `run_packed` returns; every pass's residual stream is held at
    /// once meanwhile.
    pub fn run_packed_group(
        &self,
        passes: &[(&Tensor, &Packing)],
        prefix: Option<&KvCache>,
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(passes.len());
        for &(ids, packing) in passes {
            let (_, context) = self.pass_context(ids, packing, prefix)?;
            states.push((self.embed(ids)?, PassContexts::new(self.device(), context)));
        }
        for (l, block, ahead) in self.blocks_reading_ahead(0) {
            block.with_layers(ahead, |layers| {
                for (x, contexts) in &mut states {
                    let kv = prefix.map(|p| &p.layers[l]);
                    let (input, context) = contexts.enter(block, x)?;
                    *x = layers.forward(&input, context, self.attention_chunk, kv, None)?;
                }
                Ok(())
            })?;
        }
        states.into_iter().map(|(x, _)| x.to_device(self.device())).collect()
    }

    /// The kept blocks from `start` in order, each with its read when offloaded, already started:
    /// handing out block `l` starts block `l + 1`'s read ([`Block::read_ahead`]), so that it
    /// overlaps block `l` running. Every pass over the blocks goes through here.
    pub(super) fn blocks_reading_ahead(
        &self,
        start: usize,
    ) -> impl Iterator<Item = (usize, &Block, Option<ReadAhead>)> + '_ {
        let mut ahead = self.blocks.get(start).and_then(Block::read_ahead);
        self.blocks.iter().enumerate().skip(start).map(move |(l, block)| {
            let this = std::mem::replace(&mut ahead, self.blocks.get(l + 1).and_then(Block::read_ahead));
            (l, block, this)
        })
    }

    /// How many of the kept blocks are offloaded: read from the checkpoint for each pass.
    pub fn offloaded_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.is_offloaded()).count()
    }

    /// Reads offloaded blocks onto the device to keep, first to last, while their bytes fit in
    /// `budget`; returns how many blocks and bytes were made resident. The rest stay offloaded.
    pub fn make_resident(&mut self, budget: u64) -> Result<(usize, u64), ModelError> {
        let (mut blocks, mut bytes) = (0, 0);
        for block in &mut self.blocks {
            if !block.is_offloaded() {
                continue;
            }
            let took = block.hold(budget - bytes)?;
            if took == 0 {
                break;
            }
            (blocks, bytes) = (blocks + 1, bytes + took);
        }
        Ok((blocks, bytes))
    }

    /// Fails, saying what cannot be done with blocks not held, when some are offloaded or the
    /// blocks are spread over several devices.
    pub(super) fn require_resident(&self, what: &str) -> Result<(), ModelError> {
        if self.is_spread() {
            return Err(ModelError::Spread(format!(
                "{what} needs the whole model on one device, but its blocks are spread over several (several \
                 devices are for evaluation: worker eval and worker forward); give one --device"
            )));
        }
        match self.offloaded_blocks() {
            0 => Ok(()),
            n => Err(ModelError::Offloaded(format!(
                "{what} needs every block held, but {n} of {} are read from the checkpoint for each pass (the \
                 model does not fit the device's free memory): heal with a 4-bit base (quantize_base: true) or \
                 on a device with room for the whole model",
                self.blocks.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;

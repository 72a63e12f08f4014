//! A decoder run one layer at a time, for models larger than the device.
//!
//! Scoring needs every residual state of the calibration batches, not the model all at once. A
//! [`StreamedDecoder`] keeps the batches' residual streams on the device and loads each block
//! from the checkpoint ([`super::tensor_files`], tensor by tensor) only while it runs every batch
//! through it, then drops it: the device holds one block and the activations, never the whole
//! model, and the weights stay in their dtype (bf16 on CUDA) instead of being quantized. Each
//! batch sees exactly the operations [`Decoder::run`](super::Decoder::run) applies, so the
//! states are the same to the bit.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::attention::{scores_per_chunk, Rotary};
use super::block::{BlockContext, Layers};
use super::packing::Packing;
use super::weights::{ModelSource, WeightMap};
use super::{hf_config, Config, ModelError, Tokenizer};

/// The bytes a whole-model load of the checkpoint at `path` would take in `dtype` (from the
/// safetensors headers; nothing is read beyond them), or `None` for a GGUF file, which cannot be
/// streamed.
pub fn checkpoint_bytes(path: &Path, dtype: DType) -> Result<Option<u64>, ModelError> {
    let dir = match ModelSource::resolve(path)? {
        ModelSource::HfDir(dir) => dir,
        ModelSource::Gguf(_) => return Ok(None),
    };
    let (cfg, _) = hf_config(&dir)?;
    let weights = WeightMap::open_hf(&dir, &cfg, dtype, &Device::Cpu)?;
    Ok(Some(weights.remaining_elements() * dtype.size_in_bytes() as u64))
}

/// An HF checkpoint opened for layer-by-layer runs: the embedding is loaded, the blocks are not.
pub struct StreamedDecoder {
    /// The checkpoint's configuration.
    pub cfg: Config,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    weights: WeightMap,
    embed_tokens: Tensor,
    device: Device,
    dtype: DType,
}

impl StreamedDecoder {
    /// Opens the HF checkpoint at `path` (a directory, hub cache folder or cached HF id) for runs in
    /// `dtype` on `device`. GGUF files are refused: they are dequantized whole on load, so streaming
    /// would save nothing.
    pub fn open(path: &Path, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let dir = match ModelSource::resolve(path)? {
            ModelSource::HfDir(dir) => dir,
            ModelSource::Gguf(file) => {
                return Err(ModelError::NotAModel {
                    path: file,
                    why: "a layer-streamed run needs an HF safetensors checkpoint; a GGUF file is dequantized \
                          whole on load (load it normally)"
                        .into(),
                })
            }
        };
        let (cfg, _) = hf_config(&dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let mut weights = WeightMap::open_hf(&dir, &cfg, dtype, device)?;
        let embed_tokens = weights.take("model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])?;
        Ok(StreamedDecoder { cfg, tokenizer, weights, embed_tokens, device: device.clone(), dtype })
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.cfg.num_layers
    }

    /// The device the runs use.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs every batch of `batches` (`ids: [B, T]`, right-padded like [`super::Decoder::run`])
    /// through every block, layer-major: block `l` is loaded, applied to all batches, dropped.
    /// `observe(l, i, x)` sees batch `i`'s residual state `x^(l)` for `l` in `0..=L`, in order of
    /// `l`. Blocks are consumed: an opened checkpoint runs once.
    pub fn run_layer_major(
        mut self,
        batches: &[Tensor],
        observe: &mut dyn FnMut(usize, usize, &Tensor) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let h = self.cfg.hidden_size;
        let mut states = Vec::with_capacity(batches.len());
        let mut context = Vec::with_capacity(batches.len());
        for ids in batches {
            let (b, t) = ids.dims2()?;
            let packing = Packing::single(t);
            let rotary = Rotary::new(&self.cfg, &packing.positions(0), self.dtype, &self.device)?;
            let spans = packing.spans(0, self.cfg.sliding_window, &self.device)?;
            states.push(self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?);
            context.push(BlockContext { rotary, spans });
        }
        for l in 0..self.cfg.num_layers {
            let layers = Layers::load(&mut self.weights, l, &self.cfg)?;
            for (i, (x, context)) in states.iter_mut().zip(&context).enumerate() {
                observe(l, i, x)?;
                *x = layers.forward(x, context, scores_per_chunk(&self.device), None, None)?;
            }
        }
        for (i, x) in states.iter().enumerate() {
            observe(self.cfg.num_layers, i, x)?;
        }
        Ok(())
    }

    /// What the blocks take on the device, in bytes, at this run's dtype (read from the
    /// checkpoint's headers): the memory a whole-model load would need for them.
    pub fn block_bytes(&self) -> u64 {
        self.weights.remaining_elements() * self.dtype.size_in_bytes() as u64
    }
}

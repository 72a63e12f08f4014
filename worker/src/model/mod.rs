//! The model core: load a checkpoint, run it with its residual stream exposed, cut blocks out of it,
//! and write it back as an HF directory.
//!
//! - [`config`]: `config.json` / GGUF metadata → [`Config`] (five families).
//! - [`decoder`]: the transformer itself ([`Decoder`]); the index convention of the residual
//!   states is written at its top; [`block`]: one block, held or read from the checkpoint per pass.
//! - [`layers`]: its projections, norms and feed-forward networks; [`attention`]: rotary
//!   positions, the prefix [`KvCache`] and attention; [`packing`]: how a pass lays sequences end
//!   to end (continuations, prefix) and the spans and masks attention runs over; `adapters`: [`Decoder`]'s LoRA
//!   methods (attach, load, list, merge).
//! - [`weights`]: checkpoint layouts (HF directory, hub cache, GGUF) → HF-named tensors;
//!   [`tensor_files`]: safetensors read one tensor at a time; [`gguf`]: GGUF files, likewise;
//!   [`streamed`]: a decoder run layer by layer from them, for models larger than the device;
//!   [`offload`]: a decoder whose blocks that do not fit are read from them for each pass;
//!   [`spread`]: a decoder whose blocks are read onto several devices in contiguous ranges.
//! - [`state_cache`]: the loaded model's residual states kept between a sweep's evaluations, so that
//!   a cell starts where its cut begins.
//! - [`tokenizer`]: `tokenizer.json`, or the BPE rebuilt from GGUF metadata.
//! - [`writer`]: a (pruned) model → an HF directory that HF transformers loads.
//! - [`nf4`], [`frozen`], [`lora`]: the frozen 4-bit base (resident on the device, decoded by the
//!   CPU kernel or, on any device, by stock ops in `nf4_device.rs`), products with frozen weights,
//!   and the low-rank adapters that healing trains; [`Model::load_nf4`] quantizes while loading.
//! - [`masked_softmax`], [`silu_mul`], [`log_sum_exp`]: attention's mask + softmax, the gated
//!   MLP's activation, and the log-normaliser of scored logits, each in one pass (inference on
//!   CPU; `silu_mul` also in training, with its own backward pass); [`rms_norm`] and [`rope`]:
//!   RMSNorm and rotary positions for training on CPU, each one op with its own backward pass.
//! - [`kernels`]: when those fused CPU kernels run, and when the stock ops CUDA and bf16 run;
//!   [`op_storage`]: the forward pass of a custom op written once, with tensor ops, for every
//!   device (the frozen product, the chunked training attention).

mod adapters;
pub mod attention;
pub mod block;
pub mod config;
pub mod decoder;
pub mod frozen;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod layer_norm;
pub mod layers;
pub mod log_sum_exp;
pub mod lora;
pub mod lora_product;
pub mod masked_softmax;
pub mod nf4;
mod nf4_device;
#[cfg(test)]
mod nf4_load;
pub mod offload;
pub mod op_storage;
pub mod packing;
pub mod rms_norm;
pub mod rope;
pub mod silu_mul;
pub mod spread;
pub mod state_cache;
pub mod streamed;
pub mod tensor_files;
pub mod tokenizer;
pub mod weights;
pub mod writer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

pub use attention::KvCache;
pub use config::{Config, Family};
pub use decoder::Decoder;
pub use tokenizer::Tokenizer;
pub use weights::ModelSource;

/// Everything that can go wrong loading, running or saving a model. Each message names the file
/// (or tensor) and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{}: invalid JSON: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// `config.json` parses but cannot be used.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A required file is absent.
    #[error("{} is missing: {hint}", path.display())]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
        /// What it is for and how to get it.
        hint: String,
    },
    /// `--model` points at something that is no model.
    #[error("{} is not a model: {why}", path.display())]
    NotAModel {
        /// What was passed.
        path: PathBuf,
        /// Why it was rejected.
        why: String,
    },
    /// The checkpoint's architecture is not one we implement.
    #[error("{origin}: {found} is not supported; supported: {supported}")]
    UnsupportedArchitecture {
        /// The file.
        origin: String,
        /// What the file says.
        found: String,
        /// What would work.
        supported: String,
    },
    /// A tensor the config requires is not in the checkpoint.
    #[error("{origin}: tensor `{name}` is missing (does config.json match this checkpoint?)")]
    MissingTensor {
        /// The file(s).
        origin: String,
        /// The HF tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with the config.
    #[error("{origin}: tensor `{name}` has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The file(s).
        origin: String,
        /// The HF tensor name.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// Checkpoint and config disagree in another way.
    #[error("{origin}: {message}")]
    Mismatch {
        /// The file(s).
        origin: String,
        /// What disagrees.
        message: String,
    },
    /// A file is truncated or not of the format its name says.
    #[error("{}: corrupt or unreadable: {message}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// The tokenizer cannot be built or used.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer {
        /// `tokenizer.json` or the `.gguf`.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A LoRA adapter cannot be built or attached as asked.
    #[error("adapter: {0}")]
    Adapter(String),
    /// A requested layer removal is impossible.
    #[error("cannot drop layers: {0}")]
    InvalidDrop(String),
    /// An operation needs the weights held, and the model's blocks are offloaded
    /// ([`Decoder::load_offloaded`]).
    #[error("{0}")]
    Offloaded(String),
    /// A model's blocks cannot be spread over several devices as asked, or an operation needs
    /// them on one ([`Decoder::spread`]).
    #[error("{0}")]
    Spread(String),
    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error on one line: its message and context, without the backtrace candle attaches
/// when `RUST_BACKTRACE` is set (which would turn a one-line error into a screenful).
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other.to_string().lines().collect::<Vec<_>>().join(" "),
    }
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}

/// A loaded model: decoder, tokenizer, and what is needed to write it back.
#[derive(Debug, Clone)]
pub struct Model {
    /// The transformer.
    pub decoder: Decoder,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub source: ModelSource,
    /// The HF `config.json` (read, or synthesized from GGUF metadata), before pruning.
    pub config_json: Value,
}

impl Model {
    /// Loads a model from anything [`ModelSource::resolve`] accepts, in the device's own dtype
    /// ([`default_dtype`]: f32 on CPU, bf16 on CUDA); GGUF weights are dequantized.
    pub fn load(path: &Path, device: &Device) -> Result<Model, ModelError> {
        Self::load_as(path, device, default_dtype(device))
    }

    /// [`Model::load`] in `dtype` (f32 or bf16). bf16 on a CPU runs exactly the code CUDA runs:
    /// the CPU's fused f32 kernels step aside for stock candle ops.
    pub fn load_as(path: &Path, device: &Device, dtype: DType) -> Result<Model, ModelError> {
        Self::load_with(path, device, dtype, false)
    }

    /// [`Model::load_as`] with every block projection stored as NF4 on `device` (QLoRA's frozen
    /// base, what [`Decoder::quantize_nf4`] makes of a loaded model, code for code), quantized one
    /// tensor at a time as it is read: neither the device nor the host ever holds the dense model,
    /// only one dense projection beyond the NF4 ones (and the embedding, norms and LM head, which
    /// stay in `dtype`).
    pub fn load_nf4(path: &Path, device: &Device, dtype: DType) -> Result<Model, ModelError> {
        Self::load_with(path, device, dtype, true)
    }

    fn load_with(path: &Path, device: &Device, dtype: DType, nf4: bool) -> Result<Model, ModelError> {
        let source = ModelSource::resolve(path)?;
        let nf4_blocks = |w: weights::WeightMap| if nf4 { w.quantize_blocks() } else { w };
        let (decoder, tokenizer, config_json) = match &source {
            ModelSource::HfDir(dir) => {
                let (cfg, raw) = hf_config(dir)?;
                let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
                let weights = weights::WeightMap::open_hf(dir, &cfg, dtype, device)?;
                let decoder = Decoder::load(cfg, nf4_blocks(weights))?;
                (decoder, tokenizer, raw)
            }
            ModelSource::Gguf(file) => {
                let g = weights::read_gguf(file)?;
                let tokenizer = Tokenizer::from_gguf(file, &g.metadata)?;
                let weights = weights::WeightMap::from_gguf(g.tensors, dtype, device);
                let decoder = Decoder::load(g.config, nf4_blocks(weights))?;
                (decoder, tokenizer, g.config_json)
            }
        };
        Ok(Model { decoder, tokenizer, source, config_json })
    }

    /// [`Model::load_as`] for a model larger than the device's free memory: the embedding, final
    /// norm and LM head are loaded, the blocks stay in the checkpoint and are read for each pass
    /// ([`Decoder::load_offloaded`]) until [`Decoder::make_resident`] keeps them. Needs an HF
    /// safetensors checkpoint: a GGUF file is refused (it is dequantized whole on load).
    pub fn load_offloaded(path: &Path, device: &Device, dtype: DType) -> Result<Model, ModelError> {
        let source = ModelSource::resolve(path)?;
        let ModelSource::HfDir(dir) = &source else {
            return Err(ModelError::NotAModel {
                path: path.to_path_buf(),
                why: "reading blocks from the checkpoint per pass needs an HF safetensors checkpoint; a GGUF file \
                      is dequantized whole on load (load it whole, on a device it fits)"
                    .into(),
            });
        };
        let (cfg, config_json) = hf_config(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let weights = weights::WeightMap::open_hf(dir, &cfg, dtype, device)?;
        let decoder = Decoder::load_offloaded(cfg, weights)?;
        Ok(Model { decoder, tokenizer, source, config_json })
    }

    /// A short description for logs: `llama, 30/30 layers, <path>`.
    pub fn describe(&self) -> String {
        let path = match &self.source {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p.display().to_string(),
        };
        format!(
            "{}, {}/{} layers, {path}",
            self.decoder.cfg.family.model_type(),
            self.decoder.num_blocks(),
            self.decoder.cfg.num_layers
        )
    }
}

/// An HF directory's `config.json`, parsed, and as read.
pub(crate) fn hf_config(dir: &Path) -> Result<(Config, Value), ModelError> {
    Config::from_file(&dir.join("config.json")).map_err(|e| match e {
        ModelError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            ModelError::MissingFile { path, hint: "an HF model directory needs config.json".into() }
        }
        other => other,
    })
}

/// The dtype a model runs in on `device` unless told otherwise: f32 on a CPU, bf16 on CUDA.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// The dtype named on the command line or in a job: `f32` or `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType, String> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("dtype `{other}` is not supported; use f32 or bf16")),
    }
}

/// The compute device named on the command line: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = name
                .strip_prefix("cuda:")
                .map_or(Ok(0), |n| n.parse::<usize>())
                .map_err(|_| format!("device `{name}`: expected cuda:N with N a GPU index"))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "device `{name}`: this worker was built without CUDA; rebuild with `cargo build --release --features cuda`"
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| format!("device `{name}`: {e}"))
        }
        other => Err(format!("device `{other}` is not known; use cpu, cuda or cuda:N")),
    }
}

/// A block of consecutive layers `start .. start + n` (0-based, half-open, like mergekit's
/// `layer_range`), written `START:N` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlock {
    /// First layer of the block.
    pub start: usize,
    /// Number of layers.
    pub n: usize,
}

impl LayerBlock {
    /// The layer indices in the block.
    pub fn indices(&self) -> Vec<usize> {
        (self.start..self.start.saturating_add(self.n)).collect()
    }
}

impl std::str::FromStr for LayerBlock {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) =
            s.split_once(':').ok_or_else(|| format!("`{s}`: expected START:N, e.g. 20:6 drops layers 20..25"))?;
        let start = a.trim().parse().map_err(|_| format!("`{s}`: START `{a}` is not a layer index"))?;
        let n = b.trim().parse().map_err(|_| format!("`{s}`: N `{b}` is not a layer count"))?;
        Ok(LayerBlock { start, n })
    }
}

impl std::fmt::Display for LayerBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.start, self.n)
    }
}

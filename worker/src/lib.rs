//! prunesweep worker: runs the method of Gromov et al. (2024), "The Unreasonable Ineffectiveness of
//! the Deeper Layers", on one machine: load a model, score its layers by the angular distance of the
//! residual stream, cut a block out, heal the cut, evaluate.
//!
//! # Layout
//!
//! - [`model`]: the decoder (five families), checkpoint loading (HF, hub cache, GGUF), tokenizer,
//!   layer removal and the HF writer. Every later stage stands on it.
//! - [`forward`]: the `worker forward` command: one prompt's ids, logits and residual states to a
//!   safetensors file, for inspection and parity checks against HF transformers.

pub mod forward;
pub mod model;

//! `worker forward`: run one prompt through a (possibly cut) model and write what it computed.
//!
//! The output safetensors file holds `ids` `[T]` (i64), `logits` `[T, V]` (f32) and `states`
//! `[L'+1, T, H]` (f32), where `states[l]` is the residual stream entering kept block `l` and the last
//! entry is the last block's output before the final norm (see [`crate::model::decoder`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::model::{Model, ModelError};

/// What one forward pass over a prompt produced.
#[derive(Debug)]
pub struct ForwardRecord {
    /// Token ids `[T]`.
    pub ids: Vec<u32>,
    /// `[T, V]`, f32.
    pub logits: Tensor,
    /// `[L'+1, T, H]`, f32.
    pub states: Tensor,
}

/// Tokenizes `text` with the tokenizer's defaults and runs it, keeping every residual state.
pub fn forward_text(model: &Model, text: &str) -> Result<ForwardRecord, ModelError> {
    let ids = model.tokenizer.encode(text)?;
    if ids.is_empty() {
        return Err(ModelError::Tokenizer {
            path: model.tokenizer.source.clone(),
            message: "the prompt tokenizes to no tokens".into(),
        });
    }
    forward_ids(model, &ids)
}

/// Runs token ids (one sequence), keeping every residual state.
pub fn forward_ids(model: &Model, ids: &[u32]) -> Result<ForwardRecord, ModelError> {
    let input = Tensor::new(ids, model.decoder.device())?.unsqueeze(0)?;
    let (states, logits) = model.decoder.forward_with_states(&input)?;
    let states = Tensor::stack(&states, 0)?.squeeze(1)?.to_dtype(DType::F32)?;
    Ok(ForwardRecord { ids: ids.to_vec(), logits: logits.squeeze(0)?, states })
}

impl ForwardRecord {
    /// Writes `ids`, `logits`, `states` to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let ids: Vec<i64> = self.ids.iter().map(|&i| i64::from(i)).collect();
        let n = ids.len();
        let map: HashMap<String, Tensor> = [
            ("ids".to_string(), Tensor::from_vec(ids, n, &Device::Cpu)?),
            ("logits".to_string(), self.logits.to_device(&Device::Cpu)?),
            ("states".to_string(), self.states.to_device(&Device::Cpu)?),
        ]
        .into();
        candle_core::safetensors::save(&map, path).map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            message: format!("writing: {}", crate::model::candle_message(&e)),
        })
    }
}

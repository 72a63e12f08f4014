//! The adapter folder, in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`
//! (tensor names `base_model.model.model.layers.{i}.mlp.gate_proj.lora_A.weight`, …), so that
//! `PeftModel.from_pretrained(pruned_base, DIR)` loads it. A `prunesweep.json` beside them records
//! the base's depth and kept layers, checked when the adapter is attached again.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use serde_json::{json, Value};

use super::HealError;
use crate::model::lora::LoraSpec;
use crate::model::{candle_message, Model, ModelError};

/// PEFT's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What prunesweep adds: the base it was trained on.
pub const META_FILE: &str = "prunesweep.json";

/// Writes the model's adapters to `dir` (created if needed). `extra` goes into `prunesweep.json`.
pub fn save(model: &Model, spec: &LoraSpec, dir: &Path, extra: Value) -> Result<(), HealError> {
    let io = |p: &Path, e: std::io::Error| HealError::Io { path: p.to_path_buf(), source: e };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let base = match &model.source {
        crate::model::ModelSource::HfDir(p) | crate::model::ModelSource::Gguf(p) => p.display().to_string(),
    };
    // PEFT types lora_alpha as an int; keep it one when it is integral.
    let alpha = if spec.alpha.fract() == 0.0 { json!(spec.alpha as i64) } else { json!(spec.alpha) };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null,
    });
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).expect("JSON values serialize"))
        .map_err(|e| io(&config_path, e))?;
    let tensors = model.decoder.adapter_tensors()?;
    let weights = dir.join(WEIGHTS_FILE);
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(tensors, Some(metadata), &weights)
        .map_err(|e| HealError::Checkpoint { path: weights.clone(), message: format!("writing: {e}") })?;
    let mut meta = json!({
        "num_layers": model.decoder.num_blocks(),
        "kept_layers": model.decoder.kept_layers(),
    });
    if let (Some(m), Some(e)) = (meta.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    let meta_path = dir.join(META_FILE);
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta).expect("JSON values serialize"))
        .map_err(|e| io(&meta_path, e))?;
    Ok(())
}

/// Reads `dir` and attaches its adapters to `model` (dense base, no merge). The model must have
/// the depth the adapter was trained on (the same `--drop`, or the pruned directory).
pub fn attach(model: &mut Model, dir: &Path) -> Result<LoraSpec, ModelError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile {
            path: config_path.clone(),
            hint: "an adapter folder (written by `worker heal` or PEFT) needs adapter_config.json".into(),
        },
        _ => ModelError::io(&config_path, e),
    })?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Json { path: config_path.clone(), message: e.to_string() })?;
    let bad = |message: String| ModelError::Config { path: config_path.clone(), message };
    if cfg["peft_type"].as_str() != Some("LORA") {
        return Err(bad(format!("peft_type is {}, only LORA adapters are supported", cfg["peft_type"])));
    }
    let targets = match &cfg["target_modules"] {
        Value::Array(a) => a.iter().filter_map(|t| t.as_str().map(String::from)).collect(),
        Value::String(s) => vec![s.clone()],
        other => return Err(bad(format!("target_modules is {other}, expected a list of module names"))),
    };
    let spec = LoraSpec {
        rank: cfg["r"].as_u64().ok_or_else(|| bad("`r` is missing or not an integer".into()))? as usize,
        alpha: cfg["lora_alpha"].as_f64().ok_or_else(|| bad("`lora_alpha` is missing".into()))?,
        dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
        targets,
    };
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out"] {
        if cfg[flag].as_bool() == Some(true) {
            return Err(bad(format!("`{flag}: true` is not supported")));
        }
    }
    let meta_path = dir.join(META_FILE);
    if let Ok(meta) = std::fs::read_to_string(&meta_path) {
        let meta: Value = serde_json::from_str(&meta)
            .map_err(|e| ModelError::Json { path: meta_path.clone(), message: e.to_string() })?;
        if let Some(n) = meta["num_layers"].as_u64() {
            let have = model.decoder.num_blocks();
            if n as usize != have {
                return Err(ModelError::Mismatch {
                    origin: dir.display().to_string(),
                    message: format!(
                        "the adapter was trained on a {n}-layer model, this one has {have} layers; give the same --drop as at healing (kept layers then: {})",
                        meta["kept_layers"]
                    ),
                });
            }
        }
    }
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).map_err(|e| ModelError::io(&weights, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| ModelError::Corrupt {
        path: weights.clone(),
        message: format!("{} (truncated or not a safetensors file?)", candle_message(&e)),
    })?;
    model.decoder.load_adapters(&spec, &tensors, &weights.display().to_string())?;
    Ok(spec)
}

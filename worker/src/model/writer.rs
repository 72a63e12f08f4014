//! A (pruned) model → an HF directory: `config.json` with `num_hidden_layers` updated,
//! `model.safetensors` with blocks renumbered `model.layers.{0..L'-1}`, and the tokenizer files.
//! HF transformers loads the result with `AutoModelForCausalLM.from_pretrained(dir)`.
//!
//! Files are written to a temporary folder next to `dir` and renamed into place, so a crash never
//! leaves a half-written model where a complete one is expected.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::config::FusedModule;
use super::{Model, ModelError, ModelSource};

/// Tokenizer side files copied verbatim from an HF source directory when present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
];

impl Model {
    /// The `config.json` of the model as it is now (pruned layers gone).
    pub fn current_config_json(&self) -> Value {
        let mut cfg = self.config_json.clone();
        let kept = self.decoder.kept_layers();
        cfg["num_hidden_layers"] = json!(kept.len());
        // Per-layer lists (transformers 5 `layer_types`) keep the entries of the kept layers.
        if let Some(types) = cfg.get("layer_types").and_then(Value::as_array).cloned() {
            if types.len() == self.decoder.cfg.num_layers {
                cfg["layer_types"] = Value::Array(kept.iter().map(|&i| types[i].clone()).collect());
            }
        }
        if let Some(obj) = cfg.as_object_mut() {
            obj.remove("quantization_config");
            obj.remove("_name_or_path");
            obj.insert("torch_dtype".into(), json!("float32"));
            if obj.contains_key("dtype") {
                obj.insert("dtype".into(), json!("float32"));
            }
        }
        cfg
    }

    /// Writes the model as an HF directory at `dir` (replacing what is there). `extra` files
    /// (name, JSON) are written alongside, e.g. `prunesweep.json` describing the cut.
    ///
    /// An existing `dir` is replaced only when it is empty or was written by prunesweep (it holds
    /// `prunesweep.json` or is a previous `save_hf` output with `config.json` and
    /// `model.safetensors` only); never when it is the model's own source directory.
    pub fn save_hf(&self, dir: &Path, extra: &[(&str, Value)]) -> Result<(), ModelError> {
        self.check_output_dir(dir)?;
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;

        write_json(&tmp.join("config.json"), &self.current_config_json())?;
        self.write_safetensors(&tmp.join("model.safetensors"))?;
        match &self.source {
            ModelSource::HfDir(src) => {
                for f in TOKENIZER_FILES {
                    let from = src.join(f);
                    if from.is_file() {
                        std::fs::copy(&from, tmp.join(f)).map_err(|e| ModelError::io(&from, e))?;
                    }
                }
            }
            ModelSource::Gguf(_) => {
                self.tokenizer.save(&tmp)?;
                let cfg = &self.config_json;
                let token = |key: &str| {
                    cfg.get(key).and_then(Value::as_u64).and_then(|id| self.tokenizer.decode(&[id as u32]).ok())
                };
                let mut tc =
                    json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
                if let Some(b) = token("bos_token_id") {
                    tc["bos_token"] = json!(b);
                }
                if let Some(e) = token("eos_token_id") {
                    tc["eos_token"] = json!(e);
                }
                write_json(&tmp.join("tokenizer_config.json"), &tc)?;
            }
        }
        for (file, value) in extra {
            write_json(&tmp.join(file), value)?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
        Ok(())
    }

    fn check_output_dir(&self, dir: &Path) -> Result<(), ModelError> {
        let refuse = |why: &str| ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, why.to_string()),
        };
        let source = match &self.source {
            ModelSource::HfDir(p) => p.clone(),
            ModelSource::Gguf(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        if let (Ok(a), Ok(b)) = (dir.canonicalize(), source.canonicalize()) {
            if a == b {
                return Err(refuse("this is the model's own folder; write the pruned model somewhere else"));
            }
        }
        if dir.exists() {
            let entries: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            let ours = entries.iter().any(|e| e == "prunesweep.json")
                || entries
                    .iter()
                    .all(|e| TOKENIZER_FILES.contains(&e.as_str()) || e == "config.json" || e == "model.safetensors");
            if !entries.is_empty() && !ours {
                return Err(refuse(
                    "the folder exists and was not written by prunesweep; remove it or choose another --out",
                ));
            }
        }
        Ok(())
    }

    fn write_safetensors(&self, path: &Path) -> Result<(), ModelError> {
        let tensors = fuse(self.decoder.named_tensors()?, self.decoder.cfg.family.fused_modules())?;
        let tensors: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?)))
            .collect::<Result<_, candle_core::Error>>()?;
        // transformers rejects safetensors files whose metadata lacks `format: pt`.
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(tensors, Some(metadata), path)
            .map_err(|e| ModelError::Corrupt { path: path.to_path_buf(), message: format!("writing: {e}") })
    }
}

/// Puts the modules a checkpoint stores fused back together (Phi-3's `qkv_proj`, `gate_up_proj`):
/// each in the place of its first part, its parts' rows in order.
fn fuse(tensors: Vec<(String, Tensor)>, fused: &[FusedModule]) -> Result<Vec<(String, Tensor)>, ModelError> {
    if fused.is_empty() {
        return Ok(tensors);
    }
    let mut parts_of: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let mut out = Vec::new();
    for (name, t) in tensors {
        // `model.layers.{i}.{part}.weight` → (`model.layers.{i}.`, its module, the part's index).
        let found = fused.iter().find_map(|&(module, parts)| {
            parts.iter().enumerate().find_map(|(k, part)| {
                name.strip_suffix(&format!("{part}.weight")).filter(|l| l.ends_with('.')).map(|l| (l, module, parts, k))
            })
        });
        match found {
            None => out.push((name, t)),
            Some((layer, module, parts, 0)) => {
                let mut rows = vec![t];
                for part in &parts[1..] {
                    let key = format!("{layer}{part}.weight");
                    rows.push(parts_of.remove(&key).ok_or_else(|| ModelError::Mismatch {
                        origin: name.clone(),
                        message: format!("{key} is missing: {module} cannot be written"),
                    })?);
                }
                out.push((format!("{layer}{module}.weight"), Tensor::cat(&rows, 0)?));
            }
            Some(_) => {} // a later part: written with the first
        }
    }
    Ok(out)
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes");
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Config;
    use crate::model::weights;

    #[test]
    fn fused_modules_split_on_load_and_join_back_on_write() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-phi3");
        let (cfg, _) = Config::from_file(&dir.join("config.json")).unwrap();
        let (stored, origin) = weights::read_hf_tensors(&dir).unwrap();
        let mut split = stored.clone();
        weights::unfuse(&mut split, &cfg, &origin).unwrap();
        assert!(split.contains_key("model.layers.0.self_attn.k_proj.weight"));
        assert!(!split.keys().any(|k| k.contains("qkv_proj") || k.contains("gate_up_proj")));
        let joined: HashMap<String, Tensor> =
            fuse(split.into_iter().collect(), cfg.family.fused_modules()).unwrap().into_iter().collect();
        assert_eq!(joined.len(), stored.len());
        for (name, t) in &stored {
            let diff = (t - &joined[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
        // A fused tensor whose rows the config does not account for is named.
        let mut bad = stored;
        let gu = bad["model.layers.1.mlp.gate_up_proj.weight"].narrow(0, 1, 5).unwrap();
        bad.insert("model.layers.1.mlp.gate_up_proj.weight".into(), gu);
        let e = weights::unfuse(&mut bad, &cfg, &origin).unwrap_err().to_string();
        assert!(e.contains("model.layers.1.mlp.gate_up_proj.weight has 5 rows, the config implies"), "{e}");
    }
}

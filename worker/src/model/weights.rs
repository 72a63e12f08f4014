//! Checkpoint files → HF-named tensors on the compute device.
//!
//! Three layouts are read:
//! - an HF directory: `config.json` + `model.safetensors`, or shards listed in
//!   `model.safetensors.index.json`;
//! - the HF hub cache: `models--org--name/` (the snapshot `refs/main` points at), or an HF id
//!   `org/name` looked up in `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`;
//! - a GGUF file (llama and qwen2 architectures). Its tensors are dequantized at load (candle has no
//!   fast CPU kernels for most GGUF block types), renamed to HF names, and llama.cpp's q/k row
//!   permutation for interleaved rotary is undone, so that GGUF and HF checkpoints run the same code.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::config::{Config, Family};
use super::tensor_files::TensorFiles;
use super::{candle_message, ModelError};

/// Where a [`WeightMap`]'s tensors come from.
#[derive(Debug)]
enum Store {
    /// Already in memory (GGUF: dequantized at read).
    Memory(HashMap<String, Tensor>),
    /// Read from safetensors files when taken; `parts` maps each projection the checkpoint stores
    /// fused ([`Family::fused_modules`]) to its rows of the fused tensor.
    Files { files: TensorFiles, parts: HashMap<String, Split> },
}

/// Tensors by HF name, consumed one by one while the decoder is built.
#[derive(Debug)]
pub struct WeightMap {
    store: Store,
    /// Names not yet taken.
    remaining: HashSet<String>,
    /// Which file(s) the tensors came from, for error messages.
    origin: String,
    dtype: DType,
    device: Device,
    /// The fused tensor the last part came from (its other parts are taken next).
    fused: Option<(String, Tensor)>,
}

impl WeightMap {
    /// Wraps already-read tensors; [`WeightMap::take`] converts them to `dtype` on `device`.
    pub fn new(tensors: HashMap<String, Tensor>, origin: impl Into<String>, dtype: DType, device: &Device) -> Self {
        let remaining = tensors.keys().cloned().collect();
        WeightMap {
            store: Store::Memory(tensors),
            remaining,
            origin: origin.into(),
            dtype,
            device: device.clone(),
            fused: None,
        }
    }

    /// An HF directory's checkpoint (single file or shards), read tensor by tensor as the decoder
    /// takes them, straight onto `device` and then into `dtype` there: loading never holds more
    /// than one tensor beyond the model itself. Fused modules are split as `cfg` implies.
    pub fn open_hf(dir: &Path, cfg: &Config, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let (paths, origin) = hf_files(dir)?;
        let files = TensorFiles::open(&paths)?;
        let mut remaining: HashSet<String> = files.names().map(str::to_string).collect();
        let rows = |name: &str| files.shape(name).and_then(|s| s.first().copied());
        let splits = fused_splits(cfg, rows, &origin)?;
        let mut parts = HashMap::new();
        for split in splits {
            remaining.remove(&split.fused);
            remaining.insert(split.part.clone());
            parts.insert(split.part.clone(), split);
        }
        Ok(WeightMap {
            store: Store::Files { files, parts },
            remaining,
            origin,
            dtype,
            device: device.clone(),
            fused: None,
        })
    }

    /// How many elements the tensors not yet taken hold (a fused module's parts counted once).
    pub fn remaining_elements(&self) -> u64 {
        let elements = |name: &str| -> u64 {
            match &self.store {
                Store::Memory(tensors) => tensors.get(name).map_or(0, |t| t.elem_count() as u64),
                Store::Files { files, parts } => match parts.get(name) {
                    Some(split) => {
                        let cols = files.shape(&split.fused).map_or(0, |s| s[1..].iter().product::<usize>());
                        (split.rows * cols) as u64
                    }
                    None => files.shape(name).map_or(0, |s| s.iter().product::<usize>() as u64),
                },
            }
        };
        self.remaining.iter().map(|n| elements(n)).sum()
    }

    /// Whether a tensor of that name is present (and not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.remaining.contains(name)
    }

    /// Removes a tensor, checking its shape against what the config implies.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let missing = || ModelError::MissingTensor { origin: self.origin.clone(), name: name.to_string() };
        if !self.remaining.remove(name) {
            return Err(missing());
        }
        let t = match &mut self.store {
            Store::Memory(tensors) => tensors.remove(name).ok_or_else(missing)?,
            Store::Files { files, parts } => match parts.get(name) {
                None => files.load(name, &self.device)?.ok_or_else(missing)?,
                Some(split) => {
                    if self.fused.as_ref().map(|(n, _)| n) != Some(&split.fused) {
                        let whole = files.load(&split.fused, &self.device)?.ok_or_else(missing)?;
                        self.fused = Some((split.fused.clone(), whole));
                    }
                    let whole = &self.fused.as_ref().expect("just loaded").1;
                    whole.narrow(0, split.start, split.rows)?.contiguous()?
                }
            },
        };
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                origin: self.origin.clone(),
                name: name.to_string(),
                found: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Fails if block tensors beyond the configured depth are left over (a config that says fewer
    /// layers than the checkpoint has). Other leftovers (rotary caches, unused buffers) are ignored.
    pub fn finish(self, num_layers: usize) -> Result<(), ModelError> {
        let extra = self.remaining.iter().find(|k| {
            k.strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= num_layers)
        });
        match extra {
            Some(name) => Err(ModelError::Mismatch {
                message: format!("the checkpoint has `{name}` but config.json says num_hidden_layers = {num_layers}"),
                origin: self.origin,
            }),
            None => Ok(()),
        }
    }
}

/// Where a model's files are, after resolving hub ids and cache folders.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A folder with `config.json` and safetensors.
    HfDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// Resolves what the user passed as `--model`: a `.gguf` file, an HF directory, an HF hub cache
    /// folder (`models--org--name`), a folder holding exactly one `.gguf`, or an HF id (`org/name`)
    /// present in the local hub cache.
    pub fn resolve(path: &Path) -> Result<ModelSource, ModelError> {
        if path.is_file() {
            return if path.extension().is_some_and(|e| e == "gguf") {
                Ok(ModelSource::Gguf(path.to_path_buf()))
            } else {
                Err(ModelError::NotAModel {
                    path: path.to_path_buf(),
                    why: "it is a file without the .gguf extension".into(),
                })
            };
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelSource::HfDir(path.to_path_buf()));
            }
            if path.join("snapshots").is_dir() {
                return snapshot_dir(path).map(ModelSource::HfDir);
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| ModelError::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelSource::Gguf(one.clone())),
                [] => Err(ModelError::NotAModel {
                    path: path.to_path_buf(),
                    why: "the folder has no config.json, no snapshots/ (HF hub cache) and no .gguf file".into(),
                }),
                many => Err(ModelError::NotAModel {
                    path: path.to_path_buf(),
                    why: format!("the folder holds {} .gguf files; pass one of them", many.len()),
                }),
            };
        }
        let text = path.to_string_lossy();
        if let Some((org, name)) =
            text.split_once('/').filter(|(o, n)| !o.is_empty() && !n.contains('/') && !text.starts_with('.'))
        {
            for cache in hub_cache_roots() {
                let dir = cache.join(format!("models--{org}--{name}"));
                if dir.is_dir() {
                    return snapshot_dir(&dir).map(ModelSource::HfDir);
                }
            }
            return Err(ModelError::NotAModel {
                path: path.to_path_buf(),
                why: format!(
                    "no such file, and no HF hub cache holds `{org}/{name}` (looked in {}); download it first, e.g. `huggingface-cli download {org}/{name}`",
                    hub_cache_roots().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Err(ModelError::NotAModel { path: path.to_path_buf(), why: "no such file or directory".into() })
    }
}

/// The local Hugging Face hub caches, in the order searched: `HF_HUB_CACHE`, `HF_HOME/hub`,
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        roots.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        roots.push(PathBuf::from(p).join("hub"));
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    roots
}

/// `models--org--name/` → `snapshots/<rev>/`, the revision named by `refs/main` or else the only one.
fn snapshot_dir(cache: &Path) -> Result<PathBuf, ModelError> {
    let snapshots = cache.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(cache.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
    }
    let revs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| ModelError::io(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    match revs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ModelError::NotAModel {
            path: cache.to_path_buf(),
            why: "HF hub cache folder without a complete snapshot (no snapshots/<rev>/config.json)".into(),
        }),
        _ => Err(ModelError::NotAModel {
            path: cache.to_path_buf(),
            why: "several snapshots and no refs/main; pass the snapshots/<rev> folder you want".into(),
        }),
    }
}

/// The safetensors files of an HF directory (single file or shards), and a name for them in
/// error messages.
fn hf_files(dir: &Path) -> Result<(Vec<PathBuf>, String), ModelError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Json { path: index.clone(), message: e.to_string() })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Json { path: index.clone(), message: "no `weight_map` object".into() })?;
        let mut files: Vec<PathBuf> = map.values().filter_map(Value::as_str).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        files
    } else {
        return Err(ModelError::MissingFile {
            path: single,
            hint: "an HF directory needs model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not read; convert them with `safetensors`)".into(),
        });
    };
    let origin = if files.len() == 1 {
        files[0].display().to_string()
    } else {
        format!("{} ({} shards)", index.display(), files.len())
    };
    Ok((files, origin))
}

/// Reads every tensor of an HF directory into CPU memory, as stored (the writer's tests; models
/// load through [`WeightMap::open_hf`], tensor by tensor).
#[cfg(test)]
pub(crate) fn read_hf_tensors(dir: &Path) -> Result<(HashMap<String, Tensor>, String), ModelError> {
    let (paths, origin) = hf_files(dir)?;
    let files = TensorFiles::open(&paths)?;
    let mut all = HashMap::new();
    for name in files.names() {
        let t = files.load(name, &Device::Cpu)?.expect("a name the files list");
        all.insert(name.to_string(), t);
    }
    Ok((all, origin))
}

/// One projection a checkpoint stores inside a fused module: rows `start .. start + rows` of
/// `fused` are `part`.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The fused tensor (`model.layers.3.self_attn.qkv_proj.weight`).
    pub fused: String,
    /// The projection (`model.layers.3.self_attn.q_proj.weight`).
    pub part: String,
    /// Its first row in the fused tensor.
    pub start: usize,
    /// Its number of rows.
    pub rows: usize,
}

/// Where each fused module's parts lie ([`Family::fused_modules`]: Phi-3's `qkv_proj`,
/// `gate_up_proj`), for the fused tensors present (`rows_of` gives a present tensor's row count),
/// checking each against the rows the config implies.
fn fused_splits(cfg: &Config, rows_of: impl Fn(&str) -> Option<usize>, origin: &str) -> Result<Vec<Split>, ModelError> {
    let (q, kv, i) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    // Rows of each part, as the config implies them.
    let rows = |part: &str| match part.rsplit('.').next() {
        Some("q_proj") => q,
        Some("k_proj" | "v_proj") => kv,
        _ => i, // gate_proj, up_proj
    };
    let mut splits = Vec::new();
    for l in 0..cfg.num_layers {
        for &(module, parts) in cfg.family.fused_modules() {
            let fused = format!("model.layers.{l}.{module}.weight");
            let Some(found) = rows_of(&fused) else { continue };
            let want: usize = parts.iter().map(|p| rows(p)).sum();
            if found != want {
                return Err(ModelError::Mismatch {
                    origin: origin.to_string(),
                    message: format!("{fused} has {found} rows, the config implies {want}"),
                });
            }
            let mut start = 0;
            for part in parts {
                let part_name = format!("model.layers.{l}.{part}.weight");
                splits.push(Split { fused: fused.clone(), part: part_name, start, rows: rows(part) });
                start += rows(part);
            }
        }
    }
    Ok(splits)
}

/// Splits the modules the checkpoint stores fused ([`Family::fused_modules`]: Phi-3's `qkv_proj`,
/// `gate_up_proj`) into the separate projections the decoder uses, in memory (the writer's
/// tests, which fuse them back; loading splits them as it reads, [`WeightMap::open_hf`]).
#[cfg(test)]
pub(crate) fn unfuse(tensors: &mut HashMap<String, Tensor>, cfg: &Config, origin: &str) -> Result<(), ModelError> {
    let splits = fused_splits(cfg, |name| tensors.get(name).and_then(|t| t.dims().first().copied()), origin)?;
    for split in splits {
        let part = tensors[&split.fused].narrow(0, split.start, split.rows)?;
        tensors.insert(split.part, part);
    }
    for fused in cfg
        .family
        .fused_modules()
        .iter()
        .flat_map(|(m, _)| (0..cfg.num_layers).map(move |l| format!("model.layers.{l}.{m}.weight")))
    {
        tensors.remove(&fused);
    }
    Ok(())
}

/// A parsed GGUF file: its metadata and dequantized, HF-named tensors.
#[derive(Debug)]
pub struct GgufModel {
    /// The resolved configuration.
    pub config: Config,
    /// An HF `config.json` equivalent to the GGUF metadata (written with a saved model).
    pub config_json: Value,
    /// Tensors under HF names, f32 on CPU.
    pub tensors: HashMap<String, Tensor>,
    /// The GGUF metadata, for the tokenizer.
    pub metadata: HashMap<String, gguf_file::Value>,
}

/// Reads a GGUF file (llama or qwen2 architecture).
pub fn read_gguf(path: &Path) -> Result<GgufModel, ModelError> {
    let corrupt = |message: String| ModelError::Corrupt { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| corrupt(format!("not a readable GGUF file: {}", candle_message(&e))))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| corrupt("no general.architecture".into()))?;
    let family = match arch.as_str() {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(ModelError::UnsupportedArchitecture {
                origin: path.display().to_string(),
                found: format!("GGUF architecture `{other}`"),
                supported: "GGUF: llama, qwen2 (HF directories: ".to_string() + Family::SUPPORTED + ")",
            })
        }
    };
    let cfg_json = gguf_config_json(path, &content, family, &arch)?;
    let config = Config::from_json(&cfg_json).map_err(corrupt)?;
    let (head_dim, n_heads, n_kv) = (config.head_dim, config.num_heads, config.num_kv_heads);
    let mut tensors = HashMap::new();
    for (name, _) in content.tensor_infos.iter() {
        let Some(hf) = gguf_to_hf_name(name) else { continue };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| corrupt(format!("tensor `{name}`: {} (truncated file?)", candle_message(&e))))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        // llama.cpp's converter permutes q/k rows for its interleaved rotary (llama arch only):
        // HF rows (head, half, j) are stored as (head, j, half). Undo it.
        if family == Family::Llama && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            let heads = if name.ends_with("attn_q.weight") { n_heads } else { n_kv };
            let (rows, cols) = t.dims2()?;
            t = t.reshape((heads, head_dim / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?;
        }
        tensors.insert(hf, t);
    }
    Ok(GgufModel { config, config_json: cfg_json, tensors, metadata: content.metadata })
}

/// The HF `config.json` a GGUF's metadata describes (llama.cpp keys under `{arch}.`), refusing
/// what the decoder would compute differently (partial rotary, RoPE scaling).
fn gguf_config_json(
    path: &Path,
    content: &gguf_file::Content,
    family: Family,
    arch: &str,
) -> Result<Value, ModelError> {
    let corrupt = |message: String| ModelError::Corrupt { path: path.to_path_buf(), message };
    let md = &content.metadata;
    let get_u = |key: &str| -> Result<usize, ModelError> {
        md.get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| corrupt(format!("metadata `{arch}.{key}` is missing")))
    };
    let get_f = |key: &str| md.get(&format!("{arch}.{key}")).and_then(|v| v.to_f32().ok());
    let n_layers = get_u("block_count")?;
    let hidden = get_u("embedding_length")?;
    let n_heads = get_u("attention.head_count")?;
    let n_kv = get_u("attention.head_count_kv").unwrap_or(n_heads);
    let vocab = match get_u("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| corrupt("neither vocab_size nor tokenizer.ggml.tokens".into()))?,
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let token_id = |key: &str| md.get(&format!("tokenizer.ggml.{key}")).and_then(|v| v.to_u32().ok());
    let mut cfg_json = json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get_u("feed_forward_length")?,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": get_u("context_length").unwrap_or(4096),
        "rms_norm_eps": get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": get_f("rope.freq_base").unwrap_or(10_000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    });
    if let Some(b) = token_id("bos_token_id") {
        cfg_json["bos_token_id"] = json!(b);
    }
    if let Some(e) = token_id("eos_token_id") {
        cfg_json["eos_token_id"] = json!(e);
    }
    let rope_dim = get_u("rope.dimension_count").ok();
    if let Some(rd) = rope_dim.filter(|&rd| rd != hidden / n_heads) {
        return Err(corrupt(format!(
            "rope.dimension_count {rd} differs from head_dim {}: partial rotary GGUF is not supported",
            hidden / n_heads
        )));
    }
    if let Some(kind) = md.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()) {
        if kind != "none" {
            return Err(corrupt(format!("rope scaling `{kind}` in GGUF is not supported; use the HF directory")));
        }
    }
    Ok(cfg_json)
}

/// llama.cpp tensor names → HF names.
fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

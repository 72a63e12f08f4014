//! Checkpoint files → HF-named tensors on the compute device.
//!
//! Three layouts are read:
//! - an HF directory: `config.json` + `model.safetensors`, or shards listed in
//!   `model.safetensors.index.json`;
//! - the HF hub cache: `models--org--name/` (the snapshot `refs/main` points at), or an HF id
//!   `org/name` looked up in `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`;
//! - a GGUF file (llama and qwen2 architectures), read by [`super::gguf`]: its tensors are
//!   dequantized as they are taken and renamed to HF names.
//!
//! Every layout is read one tensor at a time. With [`WeightMap::quantize_blocks`], the block
//! projections are quantized to NF4 as they are read (QLoRA's frozen base), so an NF4 model is
//! never dense as a whole, on the device or on the host.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::Config;
pub use super::gguf::{read_gguf, GgufModel, GgufTensors};
use super::nf4::Nf4Matrix;
use super::tensor_files::TensorFiles;
use super::ModelError;

/// Where a [`WeightMap`]'s tensors come from.
#[derive(Debug)]
enum Store {
    /// Already in memory.
    Memory(HashMap<String, Tensor>),
    /// A GGUF file, dequantized tensor by tensor when taken.
    Gguf(GgufTensors),
    /// Read from safetensors files when taken; `parts` maps each projection the checkpoint stores
    /// fused ([`super::config::Family::fused_modules`]) to its rows of the fused tensor.
    /// Shared by the per-block maps of [`WeightMap::block`].
    Files { files: Arc<TensorFiles>, parts: Arc<HashMap<String, Split>> },
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
    /// Whether block projections are taken as NF4 ([`WeightMap::quantize_blocks`]).
    nf4_blocks: bool,
    /// Whether dense weights keep the checkpoint's layout ([`WeightMap::keep_layout`]).
    as_stored: bool,
}

impl WeightMap {
    /// A map over `store` that has `remaining` left to take, in `dtype` on `device`, with every
    /// per-load setting (NF4 blocks, layout) at its default: what each constructor starts from.
    fn over(store: Store, remaining: HashSet<String>, origin: String, dtype: DType, device: &Device) -> Self {
        let device = device.clone();
        WeightMap { store, remaining, origin, dtype, device, fused: None, nf4_blocks: false, as_stored: false }
    }

    /// Wraps already-read tensors; [`WeightMap::take`] converts them to `dtype` on `device`.
    pub fn new(tensors: HashMap<String, Tensor>, origin: impl Into<String>, dtype: DType, device: &Device) -> Self {
        let remaining = tensors.keys().cloned().collect();
        WeightMap::over(Store::Memory(tensors), remaining, origin.into(), dtype, device)
    }

    /// A GGUF file's tensors ([`read_gguf`]), dequantized one at a time as the decoder takes them.
    pub fn from_gguf(tensors: GgufTensors, dtype: DType, device: &Device) -> Self {
        let remaining = tensors.names.keys().cloned().collect();
        let origin = tensors.path.display().to_string();
        WeightMap::over(Store::Gguf(tensors), remaining, origin, dtype, device)
    }

    /// Takes the block projections (`model.layers.*` weights taken through
    /// [`WeightMap::take_nf4`]) as NF4, quantized one by one as they are read: the healing
    /// base, loaded without a dense copy of the model anywhere.
    pub fn quantize_blocks(mut self) -> Self {
        self.nf4_blocks = true;
        self
    }

    /// Keeps every dense weight in the checkpoint's layout instead of laying long-input block
    /// weights out for the CPU's products ([`super::frozen::Weight::dense`]): a block read from the
    /// checkpoint for one pass ([`super::offload`]) is used once, so the transposing copy would
    /// cost more than it saves.
    pub fn keep_layout(mut self) -> Self {
        self.as_stored = true;
        self
    }

    /// Whether the dense weight `name` is to be laid out for the CPU's products
    /// ([`super::frozen::Weight::dense`]): a block projection, unless [`WeightMap::keep_layout`].
    /// The LM head keeps the checkpoint's layout: its product (K = hidden, N = vocabulary) runs
    /// as fast through the transposed view, and laying it out would hold a second copy of the
    /// model's largest matrix while loading.
    pub fn lays_out(&self, name: &str) -> bool {
        !self.as_stored && is_block_weight(name)
    }

    /// Whether the projection weight `name` is to be taken as NF4 ([`WeightMap::quantize_blocks`]
    /// and a block projection; the LM head stays dense, as [`super::Decoder::quantize_nf4`] leaves
    /// it).
    pub fn quantizes(&self, name: &str) -> bool {
        self.nf4_blocks && is_block_weight(name)
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
        let store = Store::Files { files: Arc::new(files), parts: Arc::new(parts) };
        Ok(WeightMap::over(store, remaining, origin, dtype, device))
    }

    /// A map of block `index`'s tensors alone (`model.layers.{index}.*`, whether taken from this
    /// map or not), reading the same files: what an offloaded block is loaded from for each pass
    /// ([`super::decoder::Decoder::load_offloaded`]). `None` unless this map reads safetensors
    /// files (tensors in memory or a GGUF file cannot be read again block by block).
    pub fn block(&self, index: usize) -> Option<WeightMap> {
        let Store::Files { files, parts } = &self.store else { return None };
        let prefix = format!("model.layers.{index}.");
        let fused: HashSet<&str> = parts.values().map(|s| s.fused.as_str()).collect();
        let remaining = files
            .names()
            .filter(|n| !fused.contains(n))
            .chain(parts.keys().map(String::as_str))
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        let store = Store::Files { files: Arc::clone(files), parts: Arc::clone(parts) };
        Some(WeightMap::over(store, remaining, self.origin.clone(), self.dtype, &self.device))
    }

    /// The dtype tensors are taken in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are taken onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// This map, taking its tensors onto `device` instead: how a block of a model spread over
    /// several devices is read onto its own ([`super::spread`]).
    pub fn onto(mut self, device: &Device) -> Self {
        self.device = device.clone();
        self
    }

    /// How many elements the tensors not yet taken hold (a fused module's parts counted once).
    pub fn remaining_elements(&self) -> u64 {
        let elements = |name: &str| -> u64 {
            match &self.store {
                Store::Memory(tensors) => tensors.get(name).map_or(0, |t| t.elem_count() as u64),
                Store::Gguf(g) => g.elements(name),
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

    /// Removes a tensor, checking its shape against what the config implies, in the map's dtype on
    /// its device.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let device = self.device.clone();
        Ok(self.take_stored(name, shape, &device)?.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Removes a `[rows, cols]` weight and quantizes it to NF4 on the host, one matrix at a time;
    /// the result lives on the map's device. The values are first rounded to the map's dtype, so
    /// the codes are those [`Nf4Matrix::quantize`] gives for the weight loaded by
    /// [`WeightMap::take`].
    pub fn take_nf4(&mut self, name: &str, shape: [usize; 2]) -> Result<Nf4Matrix, ModelError> {
        let t = self.take_stored(name, &shape, &Device::Cpu)?.to_dtype(self.dtype)?;
        Ok(Nf4Matrix::quantize_to(&t, &self.device)?)
    }

    /// Removes a tensor as stored (its file's dtype), read onto `device`, checking its shape.
    fn take_stored(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor, ModelError> {
        let missing = || ModelError::MissingTensor { origin: self.origin.clone(), name: name.to_string() };
        if !self.remaining.remove(name) {
            return Err(missing());
        }
        let t = match &mut self.store {
            Store::Memory(tensors) => tensors.remove(name).ok_or_else(missing)?,
            Store::Gguf(g) => g.load(name)?.ok_or_else(missing)?,
            Store::Files { files, parts } => match parts.get(name) {
                None => files.load(name, device)?.ok_or_else(missing)?,
                Some(split) => {
                    let cached =
                        self.fused.as_ref().filter(|(n, t)| n == &split.fused && t.device().same_device(device));
                    if cached.is_none() {
                        self.fused = None;
                        let whole = files.load(&split.fused, device)?.ok_or_else(missing)?;
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
        Ok(t)
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
        if let Some((id, revision)) = super::hub::parse_id(&text) {
            // `org/name` already in a local hub cache (ours, or `huggingface-cli download`'s) is
            // used as it is, without asking the Hub: a sweep's jobs do not each call it.
            if revision.is_none() {
                for cache in hub_cache_roots() {
                    let dir = cache.join(format!("models--{}", id.replace('/', "--")));
                    if let Ok(snapshot) = snapshot_dir(&dir) {
                        return Ok(ModelSource::HfDir(snapshot));
                    }
                }
            }
            // Otherwise (or at a named revision) from the Hub, into the first cache.
            let model = super::hub::fetch(id, revision, &super::hub::HubConfig::from_env())
                .map_err(|e| ModelError::NotAModel { path: path.to_path_buf(), why: e.to_string() })?;
            return Ok(ModelSource::HfDir(model.dir));
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

/// Where each fused module's parts lie ([`super::config::Family::fused_modules`]: Phi-3's
/// `qkv_proj`, `gate_up_proj`), for the fused tensors present (`rows_of` gives a present
/// tensor's row count), checking each against the rows the config implies.
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

/// Splits the modules the checkpoint stores fused ([`super::config::Family::fused_modules`]:
/// Phi-3's `qkv_proj`, `gate_up_proj`) into the separate projections the decoder uses, in memory
/// (the writer's tests, which fuse them back; loading splits them as it reads,
/// [`WeightMap::open_hf`]).
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

/// Whether `name` is a decoder block's tensor (`model.layers.*`), as opposed to the embedding,
/// the final norm and the LM head.
fn is_block_weight(name: &str) -> bool {
    name.starts_with("model.layers.")
}

//! A model's shape ([`ModelShape`]) as the coordinator learns it, for the memory model: from the
//! sweep file (`models[i].shape`), else from the model's location as this machine sees it — an HF
//! directory's `config.json`, a hub cache folder's (or a cached HF id's) snapshot `config.json`,
//! or a GGUF file's header (metadata and tensor list only; no weights are read).
//!
//! A location this machine does not have is not an error: the shape is unknown, and the job gets
//! no prediction and no memory constraint. A location that is there but cannot be read as a
//! model is an error, which the plan shows and a submit logs.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use prunesweep_proto::memory::ModelShape;
use serde::Deserialize;

/// Why a model's shape could not be read from a location that exists.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ShapeError {
    /// The file read.
    pub path: PathBuf,
    /// What is wrong; the way out is `models[i].shape` in the sweep file.
    pub message: String,
}

fn error(path: &Path, message: impl std::fmt::Display) -> ShapeError {
    ShapeError {
        path: path.to_path_buf(),
        message: format!("{message}; give the shape in the sweep file (`models[i].shape`) instead"),
    }
}

/// The shape of the model at `source` (a path, or an HF id in the local hub cache) at `revision`:
/// `Ok(None)` when this machine does not have it.
pub fn read_shape(source: &str, revision: Option<&str>) -> Result<Option<ModelShape>, ShapeError> {
    let path = Path::new(source);
    if path.is_file() {
        return read_gguf(path).map(Some);
    }
    if path.join("config.json").is_file() {
        return read_config(&path.join("config.json")).map(Some);
    }
    if path.join("snapshots").is_dir() {
        return snapshot_config(path, revision).map_or(Ok(None), |c| read_config(&c).map(Some));
    }
    if !path.exists() && source.split('/').count() == 2 {
        let folder = format!("models--{}", source.replace('/', "--"));
        for cache in hub_caches() {
            if let Some(config) = snapshot_config(&cache.join(&folder), revision) {
                return read_config(&config).map(Some);
            }
        }
    }
    Ok(None)
}

/// The local HF hub caches, in the worker's order: `$HF_HUB_CACHE`, `$HF_HOME/hub`,
/// `~/.cache/huggingface/hub`.
fn hub_caches() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    [env("HF_HUB_CACHE"), env("HF_HOME").map(|h| h.join("hub")), env("HOME").map(|h| h.join(".cache/huggingface/hub"))]
        .into_iter()
        .flatten()
        .collect()
}

/// `snapshots/<rev>/config.json` of a hub cache folder, `rev` from `refs/<revision>` (default
/// `main`), or the revision itself when it names a snapshot.
fn snapshot_config(cache: &Path, revision: Option<&str>) -> Option<PathBuf> {
    let revision = revision.unwrap_or("main");
    let rev = std::fs::read_to_string(cache.join("refs").join(revision))
        .map_or(revision.to_string(), |r| r.trim().to_string());
    let config = cache.join("snapshots").join(rev).join("config.json");
    config.is_file().then_some(config)
}

/// The fields of an HF `config.json` the shape needs.
#[derive(Deserialize)]
struct HfConfig {
    num_hidden_layers: u32,
    hidden_size: u32,
    intermediate_size: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    vocab_size: u32,
    tie_word_embeddings: Option<bool>,
    model_type: Option<String>,
}

fn read_config(path: &Path) -> Result<ModelShape, ShapeError> {
    let text = std::fs::read_to_string(path).map_err(|e| error(path, e))?;
    let c: HfConfig = serde_json::from_str(&text).map_err(|e| error(path, format!("not a model config: {e}")))?;
    let heads = c.num_attention_heads;
    let shape = ModelShape {
        layers: c.num_hidden_layers,
        hidden: c.hidden_size,
        intermediate: c.intermediate_size,
        heads,
        kv_heads: c.num_key_value_heads.unwrap_or(heads),
        head_dim: c.head_dim.unwrap_or(c.hidden_size / heads.max(1)),
        vocab: c.vocab_size,
        tied_embeddings: c.tie_word_embeddings.unwrap_or(false),
        gated_mlp: c.model_type.as_deref() != Some("phi"),
    };
    shape.validate().map_err(|e| error(path, e))?;
    Ok(shape)
}

/// A GGUF value as far as the shape needs it: integers, and the lengths of arrays.
enum Value {
    Int(u64),
    Array(u64),
    Other,
}

/// Reads a GGUF file's header (GGUF v2/v3: magic, version, tensor and metadata counts, the
/// metadata, then the tensor infos) up to what the shape needs.
fn read_gguf(path: &Path) -> Result<ModelShape, ShapeError> {
    let file = File::open(path).map_err(|e| error(path, e))?;
    let mut r = Gguf { r: BufReader::new(file), path };
    let mut arch = None;
    let mut magic = [0u8; 4];
    r.r.read_exact(&mut magic).map_err(|e| error(path, e))?;
    if &magic != b"GGUF" {
        return Err(error(path, "not a GGUF file (no GGUF magic) and not a model folder"));
    }
    let version = r.u32()?;
    if version < 2 {
        return Err(error(path, format!("GGUF version {version} is not supported (2 and 3 are)")));
    }
    let (tensors, entries) = (r.u64()?, r.u64()?);
    let mut meta = std::collections::HashMap::new();
    for _ in 0..entries {
        let key = r.string()?;
        let kind = r.u32()?;
        if key == "general.architecture" && kind == 8 {
            arch = Some(r.string()?);
        } else {
            let value = r.value(kind)?;
            meta.insert(key, value);
        }
    }
    let mut has_output = false;
    for _ in 0..tensors {
        let name = r.string()?;
        has_output |= name == "output.weight";
        let dims = r.u32()?;
        for _ in 0..dims {
            r.u64()?;
        }
        r.u32()?;
        r.u64()?;
    }
    let arch = arch.ok_or_else(|| error(path, "GGUF metadata has no general.architecture"))?;
    let int = |key: &str| match meta.get(&format!("{arch}.{key}")) {
        Some(Value::Int(v)) => u32::try_from(*v).ok(),
        _ => None,
    };
    let need = |key: &str| int(key).ok_or_else(|| error(path, format!("GGUF metadata has no integer {arch}.{key}")));
    let (hidden, heads) = (need("embedding_length")?, need("attention.head_count")?);
    let vocab = match (int("vocab_size"), meta.get("tokenizer.ggml.tokens")) {
        (Some(v), _) => v,
        (None, Some(Value::Array(n))) => u32::try_from(*n).unwrap_or(u32::MAX),
        _ => return Err(error(path, "GGUF metadata has neither a vocab_size nor tokenizer.ggml.tokens")),
    };
    let shape = ModelShape {
        layers: need("block_count")?,
        hidden,
        intermediate: need("feed_forward_length")?,
        heads,
        kv_heads: int("attention.head_count_kv").unwrap_or(heads),
        head_dim: int("attention.key_length").unwrap_or(hidden / heads.max(1)),
        vocab,
        tied_embeddings: !has_output,
        gated_mlp: arch != "phi2",
    };
    shape.validate().map_err(|e| error(path, e))?;
    Ok(shape)
}

/// A GGUF header reader (little-endian).
struct Gguf<'p> {
    r: BufReader<File>,
    path: &'p Path,
}

impl Gguf<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ShapeError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| error(self.path, format!("GGUF header cut short: {e}")))?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, ShapeError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, ShapeError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> Result<String, ShapeError> {
        let len = self.u64()?;
        if len > 1 << 20 {
            return Err(error(self.path, format!("GGUF string of {len} bytes: a damaged header")));
        }
        let mut s = vec![0u8; len as usize];
        self.r.read_exact(&mut s).map_err(|e| error(self.path, format!("GGUF header cut short: {e}")))?;
        Ok(String::from_utf8_lossy(&s).into_owned())
    }

    /// One value of GGUF type `kind` (0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool,
    /// 8 string, 9 array, 10 u64, 11 i64, 12 f64).
    fn value(&mut self, kind: u32) -> Result<Value, ShapeError> {
        Ok(match kind {
            0 | 1 | 7 => Value::Int(u64::from(self.bytes::<1>()?[0])),
            2 | 3 => Value::Int(u64::from(u16::from_le_bytes(self.bytes()?))),
            4 | 5 => Value::Int(u64::from(self.u32()?)),
            10 | 11 => Value::Int(self.u64()?),
            6 => {
                self.u32()?;
                Value::Other
            }
            12 => {
                self.u64()?;
                Value::Other
            }
            8 => {
                self.string()?;
                Value::Other
            }
            9 => {
                let (item, len) = (self.u32()?, self.u64()?);
                for _ in 0..len {
                    self.value(item)?;
                }
                Value::Array(len)
            }
            other => return Err(error(self.path, format!("unknown GGUF value type {other}: a damaged header"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        format!("{}/../worker/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn an_hf_folder_gives_its_config_shape() {
        let shape = read_shape(&fixture("tiny-llama"), None).unwrap().unwrap();
        let want = ModelShape {
            layers: 4,
            hidden: 64,
            intermediate: 128,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 320,
            tied_embeddings: false,
            gated_mlp: true,
        };
        assert_eq!(shape, want);
        assert!(!read_shape(&fixture("tiny-phi"), None).unwrap().unwrap().gated_mlp, "phi's fc1/fc2");
    }

    #[test]
    fn a_location_not_on_this_machine_is_unknown_not_an_error() {
        assert_eq!(read_shape("/no/such/model", None).unwrap(), None);
        assert_eq!(read_shape("no-such-org/no-such-model", None).unwrap(), None);
    }

    /// A GGUF v3 header: metadata (strings, u32s, a string array) and tensor infos, no data.
    fn gguf(meta: &[(&str, u32)], tokens: usize, tensors: &[&str]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64 + 2).to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        for (k, v) in meta {
            string(&mut b, k);
            b.extend(4u32.to_le_bytes());
            b.extend(v.to_le_bytes());
        }
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((tokens as u64).to_le_bytes());
        for i in 0..tokens {
            string(&mut b, &format!("t{i}"));
        }
        for t in tensors {
            string(&mut b, t);
            b.extend(2u32.to_le_bytes());
            b.extend(64u64.to_le_bytes());
            b.extend(320u64.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_gguf_header_gives_the_shape_and_whether_the_head_is_tied() {
        let dir = tempfile::tempdir().unwrap();
        let meta = [
            ("llama.block_count", 30),
            ("llama.embedding_length", 576),
            ("llama.feed_forward_length", 1536),
            ("llama.attention.head_count", 9),
            ("llama.attention.head_count_kv", 3),
        ];
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, gguf(&meta, 500, &["token_embd.weight"])).unwrap();
        let shape = read_shape(path.to_str().unwrap(), None).unwrap().unwrap();
        assert_eq!((shape.layers, shape.hidden, shape.intermediate), (30, 576, 1536));
        assert_eq!((shape.heads, shape.kv_heads, shape.head_dim, shape.vocab), (9, 3, 64, 500));
        assert!(shape.tied_embeddings, "no output.weight");
        std::fs::write(&path, gguf(&meta, 500, &["token_embd.weight", "output.weight"])).unwrap();
        assert!(!read_shape(path.to_str().unwrap(), None).unwrap().unwrap().tied_embeddings);
        std::fs::write(&path, gguf(&meta[1..], 500, &[])).unwrap();
        let e = read_shape(path.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("no integer llama.block_count") && e.contains("`models[i].shape`"), "{e}");
        std::fs::write(&path, b"not a model").unwrap();
        let e = read_shape(path.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
    }
}

//! Where a result came from ([`pb::Provenance`]): fingerprints of the weights and data a job read,
//! the worker's version and build commit, the device and dtype, and the wall time; sent with every
//! completed job, so a results row found later says what made it.
//!
//! Fingerprints are cheap and stable. Weights: a Hub snapshot is named by its commit
//! (`hf:org/name@<commit>`); anything else is `sha256:` over each weight file's name, size,
//! header and first and last MiB (the header lists every tensor's name, dtype, shape and offsets;
//! the ends catch changed values without reading 140 GB). Data: `sha256:` of the file's bytes
//! (over 256 MiB: its size and first and last MiB), folders over their files' names and
//! fingerprints. Results are cached by path, size and modification time.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use prunesweep_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::model::weights::ModelSource;

/// The git commit the worker was built from (`-dirty` with uncommitted changes), or `unknown`.
pub const GIT_COMMIT: &str = env!("PRUNESWEEP_GIT_COMMIT");

/// Bytes read from each end of a large file.
const END_BYTES: u64 = 1 << 20;
/// Data files up to this size are hashed whole.
const WHOLE_FILE_MAX: u64 = 256 << 20;
/// GGUF files: this much of the start is hashed (header, metadata with the vocabulary, tensor
/// infos), plus the last MiB.
const GGUF_HEAD_BYTES: u64 = 32 << 20;

/// A file as last seen: path, size, modification time.
type FileStamp = (PathBuf, u64, Option<SystemTime>);

/// Fingerprints already computed.
static CACHE: Mutex<Option<HashMap<FileStamp, String>>> = Mutex::new(None);

fn cached(path: &Path, compute: impl FnOnce() -> std::io::Result<String>) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok());
    if let Some(hit) = CACHE.lock().expect("never poisoned").get_or_insert_with(HashMap::new).get(&key) {
        return Ok(hit.clone());
    }
    let value = compute()?;
    CACHE.lock().expect("never poisoned").get_or_insert_with(HashMap::new).insert(key, value.clone());
    Ok(value)
}

/// Hashes `len` bytes of `file` from `offset` into `hasher`.
fn hash_range(file: &mut std::fs::File, offset: u64, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    let mut take = file.take(len);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = take.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// Size, the first `head` bytes and the last [`END_BYTES`] (the whole file when they overlap).
fn hash_ends(path: &Path, head: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    hasher.update(size.to_le_bytes());
    if size <= head + END_BYTES {
        return hash_range(&mut file, 0, size, hasher);
    }
    hash_range(&mut file, 0, head, hasher)?;
    hash_range(&mut file, size - END_BYTES, END_BYTES, hasher)
}

/// A safetensors file's header length (its first 8 bytes, little-endian) plus 8.
fn safetensors_header_len(path: &Path) -> std::io::Result<u64> {
    let mut len = [0u8; 8];
    std::fs::File::open(path)?.read_exact(&mut len)?;
    Ok(8 + u64::from_le_bytes(len))
}

/// The weights' fingerprint (see the module doc), of a model already resolved (the one the job
/// loaded: resolving again would ask the Hub again for an `org/name@branch`).
pub fn model_fingerprint(source: &ModelSource) -> std::io::Result<String> {
    match source {
        ModelSource::Gguf(path) => cached(path, || {
            let mut hasher = Sha256::new();
            hash_ends(path, GGUF_HEAD_BYTES, &mut hasher)?;
            Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
        }),
        ModelSource::HfDir(dir) => {
            if let Some(id) = hub_snapshot(dir) {
                return Ok(id);
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors") || p.ends_with("config.json"))
                .collect();
            files.sort();
            let mut hasher = Sha256::new();
            for file in &files {
                let part = cached(file, || {
                    let mut h = Sha256::new();
                    let head = if file.extension().is_some_and(|e| e == "safetensors") {
                        safetensors_header_len(file)?.max(END_BYTES)
                    } else {
                        END_BYTES
                    };
                    hash_ends(file, head, &mut h)?;
                    Ok(hex::encode(h.finalize()))
                })?;
                hasher.update(file.file_name().unwrap_or_default().as_encoded_bytes());
                hasher.update(part.as_bytes());
            }
            Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
        }
    }
}

/// `…/models--org--name/snapshots/<commit>` → `hf:org/name@<commit>`.
fn hub_snapshot(dir: &Path) -> Option<String> {
    let commit = dir.file_name()?.to_str()?;
    let snapshots = dir.parent()?;
    let repo = snapshots.parent()?.file_name()?.to_str()?;
    if snapshots.file_name()? != "snapshots" || !(commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())) {
        return None;
    }
    let (org, name) = repo.strip_prefix("models--")?.split_once("--")?;
    Some(format!("hf:{org}/{name}@{commit}"))
}

/// A data file's or folder's fingerprint (see the module doc).
pub fn data_fingerprint(path: &Path) -> std::io::Result<String> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        let mut hasher = Sha256::new();
        for entry in entries {
            hasher.update(entry.file_name().unwrap_or_default().as_encoded_bytes());
            hasher.update(data_fingerprint(&entry)?.as_bytes());
        }
        return Ok(format!("sha256:{}", hex::encode(hasher.finalize())));
    }
    cached(path, || {
        let mut hasher = Sha256::new();
        let size = std::fs::metadata(path)?.len();
        if size <= WHOLE_FILE_MAX {
            hash_range(&mut std::fs::File::open(path)?, 0, size, &mut hasher)?;
        } else {
            hash_ends(path, END_BYTES, &mut hasher)?;
        }
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    })
}

/// The provenance of a job that read `model` (resolved, or why it could not be) and `data`, ran on
/// `device` in `dtype` and took `wall_seconds`. A fingerprint that cannot be computed (a file gone
/// since) is recorded as `unreadable: <why>` rather than failing a finished job.
pub fn provenance<'a>(
    model: Result<&ModelSource, String>,
    data: impl IntoIterator<Item = &'a Path>,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    wall_seconds: f64,
) -> pb::Provenance {
    let fingerprint = |r: std::io::Result<String>| r.unwrap_or_else(|e| format!("unreadable: {e}"));
    pb::Provenance {
        model_fingerprint: fingerprint(model.map_err(std::io::Error::other).and_then(model_fingerprint)),
        data_fingerprints: data
            .into_iter()
            .map(|p| (p.display().to_string(), fingerprint(data_fingerprint(p))))
            .collect(),
        worker_version: env!("CARGO_PKG_VERSION").to_string(),
        worker_commit: GIT_COMMIT.to_string(),
        device: device_name(device),
        dtype: format!("{dtype:?}").to_lowercase(),
        wall_seconds,
    }
}

/// `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
    }

    #[test]
    fn a_weight_change_changes_the_fingerprint_and_a_copy_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                std::fs::copy(fixture().join(f), d.join(f)).unwrap();
            }
        }
        let fingerprint = |d: &Path| model_fingerprint(&ModelSource::resolve(d).unwrap()).unwrap();
        let fa = fingerprint(&a);
        assert!(fa.starts_with("sha256:") && fa.len() == 7 + 64, "{fa}");
        assert_eq!(fa, fingerprint(&b), "same weights, same fingerprint");
        // One value near the end of the weights changes.
        let mut bytes = std::fs::read(b.join("model.safetensors")).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 1;
        std::fs::write(b.join("model.safetensors"), &bytes).unwrap();
        assert_ne!(fa, fingerprint(&b));
    }

    #[test]
    fn a_hub_snapshot_is_named_by_its_commit() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let dir = Path::new("/c/models--meta-llama--Llama-2-7b-hf/snapshots").join(commit);
        assert_eq!(hub_snapshot(&dir), Some(format!("hf:meta-llama/Llama-2-7b-hf@{commit}")));
        assert_eq!(hub_snapshot(Path::new("/c/models--a--b/snapshots/main")), None);
        assert_eq!(hub_snapshot(&fixture()), None);
    }

    #[test]
    fn data_fingerprints_hash_the_bytes_and_folders_their_files() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("d.jsonl");
        std::fs::write(&file, "{\"text\": \"a\"}\n").unwrap();
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(b"{\"text\": \"a\"}\n")));
        assert_eq!(data_fingerprint(&file).unwrap(), expected);
        let folder = data_fingerprint(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("e.jsonl"), "x").unwrap();
        assert_ne!(data_fingerprint(tmp.path()).unwrap(), folder, "a new file in a folder changes it");
    }
}

//! Models by Hub name: `org/name[@revision]` is downloaded into the standard Hugging Face cache
//! layout (`models--org--name/{blobs,snapshots,refs}`, what `huggingface-cli download` writes) when
//! it is not there yet, so a sweep file or `--model` can name a model the way the Hub does.
//!
//! The revision (a branch, tag or commit; default `main`) is pinned to its commit first, and every
//! file comes from that commit, so a branch that moves during a download cannot mix two versions;
//! [`HubModel::commit`] is what a result records. Downloads go through the `hf-hub` crate (resumable:
//! an interrupted file continues from its `.part`; progress bars on stderr). Weights stored with
//! Git LFS are checked against their SHA-256 (the blob's name). Only what the worker reads is
//! fetched: `config.json`, the tokenizer files and the safetensors (one file, or the shards an
//! index names).
//!
//! The environment works as for the Python client: `HF_ENDPOINT` (a mirror), `HF_TOKEN` (gated or
//! private models; else the cache's `token` file), `HF_HUB_OFFLINE=1` (never touch the network:
//! the cache or an error), `HF_HUB_CACHE` / `HF_HOME` (where the cache is).

use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use super::weights::hub_cache_roots;

/// The Hub the Python client uses by default.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files fetched when the repository has them; `config.json` is required.
const METADATA_FILES: [&str; 5] =
    ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Why a model could not be had from the Hub. Each message names the model and the way out.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// `HF_HUB_OFFLINE` is set and the cache does not hold the model.
    #[error(
        "{id}@{revision} is not in the HF cache ({cache}) and HF_HUB_OFFLINE is set: download it where the Hub is reachable (e.g. `huggingface-cli download {id} --revision {revision}`) into this cache, or unset HF_HUB_OFFLINE"
    )]
    Offline {
        /// `org/name`.
        id: String,
        /// The revision asked for.
        revision: String,
        /// The cache looked in.
        cache: String,
    },
    /// The Hub refused without (or with this) token: a gated or private model.
    #[error(
        "{endpoint} refused {id} (HTTP {status}): a gated or private model needs a token with access; accept its license on the Hub, then set HF_TOKEN (or run `huggingface-cli login`)"
    )]
    Gated {
        /// `org/name`.
        id: String,
        /// 401 or 403.
        status: u16,
        /// The Hub asked.
        endpoint: String,
    },
    /// No such model, revision or file.
    #[error("{endpoint} has no {what} (HTTP 404): check the model name, the revision after `@`, and HF_ENDPOINT")]
    NotFound {
        /// What was asked for: `model org/name at revision main`, `file x in org/name@abc`.
        what: String,
        /// The Hub asked.
        endpoint: String,
    },
    /// The repository is not a checkpoint the worker can read.
    #[error("{id}@{commit} {why}")]
    Unusable {
        /// `org/name`.
        id: String,
        /// The pinned commit.
        commit: String,
        /// What is missing.
        why: String,
    },
    /// The Hub could not be reached, or answered something else.
    #[error(
        "downloading {id} from {endpoint}: {message} (offline? download the model elsewhere into the HF cache and set HF_HUB_OFFLINE=1; a mirror: HF_ENDPOINT)"
    )]
    Transfer {
        /// `org/name`.
        id: String,
        /// The Hub asked.
        endpoint: String,
        /// The client's error.
        message: String,
    },
    /// A downloaded file does not have the checksum the Hub gave for it.
    #[error(
        "{path}: SHA-256 {actual}, but the Hub's is {expected}; the file was removed, run again to download it anew"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The Hub's.
        expected: String,
        /// The file's.
        actual: String,
    },
    /// Reading or writing the cache failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Where to download from and to: the environment's settings, or a test's.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The Hub (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// `HF_TOKEN`; `None`: the cache's token file, if any.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: only the cache.
    pub offline: bool,
    /// The hub cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// Progress bars on stderr.
    pub progress: bool,
}

impl HubConfig {
    /// The settings the Python client would use in this environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        HubConfig {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            offline,
            cache: hub_cache_roots().into_iter().next().unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub")),
            progress: true,
        }
    }
}

/// A model in the local cache, at a pinned commit.
#[derive(Debug, Clone, PartialEq)]
pub struct HubModel {
    /// `org/name`.
    pub id: String,
    /// The revision asked for (`main` when none was).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// `…/models--org--name/snapshots/<commit>`: an HF directory.
    pub dir: PathBuf,
}

/// `org/name` or `org/name@revision` → (`org/name`, revision); `None` for anything else (a path).
pub fn parse_id(text: &str) -> Option<(&str, Option<&str>)> {
    let (id, revision) = match text.split_once('@') {
        Some((id, rev)) if revision_ok(rev) => (id, Some(rev)),
        Some(_) => return None,
        None => (text, None),
    };
    let (org, name) = id.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(org) && ok(name)).then_some((id, revision))
}

/// A branch, tag or commit: branch names may hold `/` (`refs/pr/1`); empty, `..` or a leading `/`
/// is not a revision.
fn revision_ok(rev: &str) -> bool {
    !rev.is_empty() && !rev.starts_with('/') && !rev.contains("..")
}

/// The cache folder of `org/name`.
fn repo_folder(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// A 40-hex-digit commit id.
fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit the cache has for `revision` (a ref file, or the commit itself), if its snapshot
/// holds a `config.json`.
fn cached_commit(folder: &Path, revision: &str) -> Option<String> {
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision)).ok()?.trim().to_string()
    };
    folder.join("snapshots").join(&commit).join("config.json").is_file().then_some(commit)
}

/// Makes `id` at `revision` (default `main`) available in the cache, downloading what is missing,
/// and returns its snapshot folder and commit.
pub fn fetch(id: &str, revision: Option<&str>, cfg: &HubConfig) -> Result<HubModel, HubError> {
    let revision = revision.unwrap_or("main").to_string();
    let folder = repo_folder(&cfg.cache, id);
    let cached = cached_commit(&folder, &revision);
    let done = |commit: String| {
        let dir = folder.join("snapshots").join(&commit);
        HubModel { id: id.to_string(), revision: revision.clone(), commit, dir }
    };
    if cfg.offline {
        return cached.map(done).ok_or_else(|| HubError::Offline {
            id: id.to_string(),
            revision: revision.clone(),
            cache: cfg.cache.display().to_string(),
        });
    }
    // A commit never changes: a complete snapshot of it needs no network.
    if let Some(commit) = cached.as_ref().filter(|_| is_commit(&revision)) {
        if snapshot_complete(&folder.join("snapshots").join(commit)) {
            return Ok(done(commit.clone()));
        }
    }
    let api = ApiBuilder::from_cache(Cache::new(cfg.cache.clone()))
        .with_endpoint(cfg.endpoint.clone())
        .with_progress(cfg.progress)
        .with_retries(3);
    let api = match &cfg.token {
        Some(t) => api.with_token(Some(t.clone())),
        None => api,
    }
    .build()
    .map_err(|e| transfer(id, cfg, e))?;

    // Pin the revision to a commit.
    let info = match api.repo(Repo::with_revision(id.to_string(), RepoType::Model, revision.clone())).info() {
        Ok(info) => info,
        Err(e) => {
            let e = classify(e, id, cfg, || format!("model {id} at revision {revision}"));
            // Unreachable, but the cache has this branch: use it, as the Python client does.
            return match (e, cached) {
                (HubError::Transfer { message, .. }, Some(commit)) => {
                    tracing::warn!(
                        model = id,
                        revision,
                        commit,
                        error = message,
                        "the Hub is unreachable; using the cached snapshot"
                    );
                    Ok(done(commit))
                }
                (e, _) => Err(e),
            };
        }
    };
    let commit = info.sha.clone();
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let repo = api.repo(Repo::with_revision(id.to_string(), RepoType::Model, commit.clone()));
    let snapshot = folder.join("snapshots").join(&commit);
    let unusable = |why: String| HubError::Unusable { id: id.to_string(), commit: commit.clone(), why };
    if !files.iter().any(|f| f == "config.json") {
        return Err(unusable("has no config.json: not a transformers checkpoint".into()));
    }

    let mut wanted: Vec<String> =
        METADATA_FILES.iter().filter(|f| files.iter().any(|g| g == *f)).map(|f| f.to_string()).collect();
    let index = "model.safetensors.index.json";
    if files.iter().any(|f| f == "model.safetensors") {
        wanted.push("model.safetensors".into());
    } else if files.iter().any(|f| f == index) {
        let path = download(&repo, &snapshot, index, id, cfg, &commit)?;
        let text = std::fs::read_to_string(&path).map_err(|source| HubError::Io { path: path.clone(), source })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| unusable(format!("has an unreadable {index}: {e}")))?;
        let mut shards: Vec<String> = parsed["weight_map"]
            .as_object()
            .ok_or_else(|| unusable(format!("has no weight_map in {index}")))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        for shard in &shards {
            if !files.contains(shard) {
                return Err(unusable(format!("names {shard} in {index}, but the repository has no such file")));
            }
        }
        wanted.extend(shards);
    } else {
        let bins = files.iter().any(|f| f.ends_with(".bin"));
        return Err(unusable(format!(
            "has no safetensors weights (model.safetensors or {index}){}: the worker reads safetensors only",
            if bins { "; it has PyTorch .bin files — convert them, or pick a revision with safetensors" } else { "" }
        )));
    }
    for file in &wanted {
        download(&repo, &snapshot, file, id, cfg, &commit)?;
    }
    // The branch or tag now names this commit in the cache (hf-hub wrote refs/<commit>).
    if revision != commit {
        let refs = folder.join("refs");
        let path = refs.join(&revision);
        std::fs::create_dir_all(path.parent().unwrap_or(&refs))
            .map_err(|source| HubError::Io { path: refs.clone(), source })?;
        std::fs::write(&path, &commit).map_err(|source| HubError::Io { path, source })?;
    }
    tracing::info!(model = id, revision, commit, files = wanted.len(), "model ready in the HF cache");
    Ok(done(commit))
}

/// Whether a snapshot holds a config and its weights (one file, or every shard of its index).
fn snapshot_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("model.safetensors.index.json")) else { return false };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    index["weight_map"]
        .as_object()
        .is_some_and(|m| m.values().filter_map(|v| v.as_str()).all(|f| dir.join(f).is_file()))
}

/// One file of the pinned commit into the cache (nothing when its snapshot entry is there), its
/// SHA-256 checked when the Hub stores it in LFS.
fn download(
    repo: &hf_hub::api::sync::ApiRepo,
    snapshot: &Path,
    file: &str,
    id: &str,
    cfg: &HubConfig,
    commit: &str,
) -> Result<PathBuf, HubError> {
    let existing = snapshot.join(file);
    if existing.is_file() {
        return Ok(existing);
    }
    let path = repo.download(file).map_err(|e| classify(e, id, cfg, || format!("file {file} in {id}@{commit}")))?;
    verify_lfs(&path)?;
    Ok(path)
}

/// The cache names an LFS blob by its SHA-256: a pointer whose target is 64 hex digits is checked.
fn verify_lfs(pointer: &Path) -> Result<(), HubError> {
    let blob = std::fs::canonicalize(pointer).map_err(|source| HubError::Io { path: pointer.to_path_buf(), source })?;
    let Some(expected) =
        blob.file_name().and_then(|n| n.to_str()).filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Ok(());
    };
    let expected = expected.to_ascii_lowercase();
    let mut file = std::fs::File::open(&blob).map_err(|source| HubError::Io { path: blob.clone(), source })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|source| HubError::Io { path: blob.clone(), source })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(pointer);
        return Err(HubError::Checksum { path: pointer.to_path_buf(), expected, actual });
    }
    Ok(())
}

/// The client's error as one of ours: HTTP 401/403 → gated, 404 → not found, the rest → transfer.
fn classify(e: ApiError, id: &str, cfg: &HubConfig, what: impl FnOnce() -> String) -> HubError {
    if let ApiError::RequestError(inner) = &e {
        if let ureq::Error::Status(status, _) = inner.as_ref() {
            match status {
                401 | 403 => {
                    return HubError::Gated { id: id.to_string(), status: *status, endpoint: cfg.endpoint.clone() }
                }
                404 => return HubError::NotFound { what: what(), endpoint: cfg.endpoint.clone() },
                _ => {}
            }
        }
    }
    transfer(id, cfg, e)
}

fn transfer(id: &str, cfg: &HubConfig, e: ApiError) -> HubError {
    HubError::Transfer { id: id.to_string(), endpoint: cfg.endpoint.clone(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        assert_eq!(parse_id("meta-llama/Llama-2-7b-hf"), Some(("meta-llama/Llama-2-7b-hf", None)));
        assert_eq!(parse_id("Qwen/Qwen2-0.5B@v1.0"), Some(("Qwen/Qwen2-0.5B", Some("v1.0"))));
        assert_eq!(parse_id("org/name@refs/pr/1"), Some(("org/name", Some("refs/pr/1"))));
        for path in ["./models/x", "../a/b", "/abs/x", "a/b/c", "model.gguf", "a/", "/b", "org/name@", "org/name@../x"]
        {
            assert_eq!(parse_id(path), None, "{path}");
        }
    }
}

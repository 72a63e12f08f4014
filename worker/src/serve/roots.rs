//! The folders a serving worker may read: a job names its model and data files, and a job spec
//! comes from the network, so a worker reads only under roots its operator gave it
//! (`--model-root`, `--data-root`), its work dir, and (for models named by HF id) the local hub
//! cache. A path outside them fails the job, non-retryably, naming the field and the flag that
//! would allow it; nothing outside is opened or even probed beyond resolving the path.

use std::path::{Component, Path, PathBuf};

use crate::job::{FileKind, Job, JobError};
use crate::model::weights::hub_cache_roots;

/// Why the roots cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {}: {source}", path.display())]
pub struct RootError {
    /// The flag that named it.
    pub flag: &'static str,
    /// The root.
    pub path: PathBuf,
    /// Why it cannot be used (it does not exist, most often).
    pub source: std::io::Error,
}

/// The folders (or single files) a worker may read, each resolved (symlinks followed).
#[derive(Debug, Clone)]
pub struct Roots {
    models: Vec<PathBuf>,
    data: Vec<PathBuf>,
}

/// `path` made absolute and resolved: symlinks followed where it exists, `..` removed lexically
/// where it does not (so a missing file outside the roots is still refused as outside).
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn canonical(flag: &'static str, paths: &[PathBuf]) -> Result<Vec<PathBuf>, RootError> {
    paths
        .iter()
        .map(|p| std::fs::canonicalize(p).map_err(|source| RootError { flag, path: p.clone(), source }))
        .collect()
}

impl Roots {
    /// Models under `model_roots`, data under `data_roots`, both under `work_dir` (created if
    /// missing). Each root must exist.
    pub fn new(work_dir: &Path, model_roots: &[PathBuf], data_roots: &[PathBuf]) -> Result<Self, RootError> {
        std::fs::create_dir_all(work_dir).map_err(|source| RootError {
            flag: "--work-dir",
            path: work_dir.to_path_buf(),
            source,
        })?;
        let work = canonical("--work-dir", &[work_dir.to_path_buf()])?;
        let mut models = canonical("--model-root", model_roots)?;
        models.extend(work.iter().cloned());
        // The hub cache is the worker's own (its environment picks it); an HF id resolves there.
        models.extend(hub_cache_roots().iter().filter_map(|p| std::fs::canonicalize(p).ok()));
        let mut data = canonical("--data-root", data_roots)?;
        data.extend(work);
        Ok(Roots { models, data })
    }

    /// Every root, for the log line at start.
    pub fn describe(&self) -> String {
        let list = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        format!("models: {}; data: {}", list(&self.models), list(&self.data))
    }

    fn allows(roots: &[PathBuf], path: &Path) -> bool {
        let path = resolve(path);
        roots.iter().any(|root| path.starts_with(root))
    }

    /// Whether every file `job` reads lies under this worker's roots; the first that does not
    /// fails the job.
    pub fn check(&self, job: &Job) -> Result<(), JobError> {
        for (field, kind, path) in job.files() {
            let (roots, what, flag) = match kind {
                FileKind::Model => (&self.models, "model", "--model-root"),
                FileKind::Data => (&self.data, "data", "--data-root"),
            };
            // An HF id (`org/name`) that is not a local path is looked up in the hub cache only.
            if kind == FileKind::Model && !path.exists() && is_hub_id(path) {
                continue;
            }
            if !Self::allows(roots, path) {
                return Err(JobError::OutsideRoots {
                    field,
                    path: path.display().to_string(),
                    what,
                    roots: roots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                    flag,
                });
            }
        }
        Ok(())
    }
}

/// `org/name[@revision]` ([`crate::model::hub::parse_id`]): downloaded into, or read from, the hub cache.
fn is_hub_id(path: &Path) -> bool {
    crate::model::hub::parse_id(&path.to_string_lossy()).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{EvalSpec, Task};
    use crate::job::Work;

    fn job(model: &str, data: &Path) -> Job {
        Job {
            id: 1,
            key: "k".into(),
            model: model.into(),
            dtype: None,
            work: Work::Baseline(vec![EvalSpec::new(Task::Boolq, data)]),
        }
    }

    #[test]
    fn paths_outside_the_roots_are_refused_naming_the_field_and_the_flag() {
        let top = tempfile::tempdir().unwrap();
        let [work, data, models, elsewhere] = ["work", "data", "models", "elsewhere"].map(|d| top.path().join(d));
        for d in [&data, &models, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(data.join("boolq.jsonl"), "").unwrap();
        std::fs::write(elsewhere.join("secret.jsonl"), "").unwrap();
        std::os::unix::fs::symlink(elsewhere.join("secret.jsonl"), data.join("link.jsonl")).unwrap();
        let roots = Roots::new(&work, std::slice::from_ref(&models), std::slice::from_ref(&data)).unwrap();
        let model = models.join("m.gguf").display().to_string();

        roots.check(&job(&model, &data.join("boolq.jsonl"))).unwrap();
        roots.check(&job("HuggingFaceTB/SmolLM2-135M", &data.join("boolq.jsonl"))).unwrap();
        roots.check(&job(&model, &work.join("made-here.jsonl"))).unwrap();
        for (model, file, field, flag) in [
            (model.as_str(), elsewhere.join("secret.jsonl"), "eval[0].path", "--data-root"),
            (model.as_str(), data.join("link.jsonl"), "eval[0].path", "--data-root"),
            (model.as_str(), data.join("../elsewhere/secret.jsonl"), "eval[0].path", "--data-root"),
            (model.as_str(), data.join("../no-such/x.jsonl"), "eval[0].path", "--data-root"),
            (model.as_str(), PathBuf::from("/etc/passwd"), "eval[0].path", "--data-root"),
            ("/etc", data.join("boolq.jsonl"), "model.source", "--model-root"),
            ("../x", data.join("boolq.jsonl"), "model.source", "--model-root"),
        ] {
            let e = roots.check(&job(model, file.as_path())).unwrap_err();
            assert_eq!((e.kind(), e.is_retryable()), ("outside_roots", false), "{e}");
            let text = e.to_string();
            assert!(text.starts_with(&format!("`{field}`: ")) && text.contains(flag), "{text}");
        }
        // A data file is not a model root, nor a model folder a data root.
        let e = roots.check(&job(&data.join("m.gguf").display().to_string(), &models.join("x"))).unwrap_err();
        assert!(e.to_string().contains("--model-root"), "{e}");
    }

    #[test]
    fn a_missing_root_is_an_error_at_start() {
        let top = tempfile::tempdir().unwrap();
        let e = Roots::new(top.path(), &[], &[top.path().join("nope")]).unwrap_err();
        assert!(e.to_string().starts_with("--data-root ") && e.to_string().contains("nope"), "{e}");
    }
}

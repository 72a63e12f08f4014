//! The sizes a sweep file may ask for: string lengths, list lengths, `n`, and the number of jobs
//! one submit may add. Each is checked before anything is built from the file, and each refusal
//! names the field, the size given, the limit and what to do instead.

use super::{SweepError, SweepSpec, TargetModules};

/// The longest name (model, heal variant, module, HF revision), in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// The longest path or HF id, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// The longest `description`, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 16 * 1024;
/// The most entries in `models`, `heal` or `target_modules`.
pub const MAX_LIST_LEN: usize = 1000;
/// The most entries in `fractions` or `n`.
pub const MAX_AMOUNTS: usize = 10_000;
/// The largest `n` (layers to drop). No model has this many layers; each worker also refuses an
/// `n` at or past its model's layer count.
pub const MAX_N: u32 = 100_000;
/// The default cap on the jobs one submit may plan (`coordinator serve --max-jobs-per-submit`).
pub const DEFAULT_MAX_JOBS_PER_SUBMIT: u64 = 100_000;

impl SweepSpec {
    /// How many jobs [`expand`](SweepSpec::expand) plans at most, computed from the list lengths
    /// without building any: one score job per model (when a method needs scores), one baseline
    /// per model, and models × methods × (fractions + n) × heal variants cells. Duplicates
    /// collapse in `expand`, so the count may be above the real number, never below.
    pub fn job_count(&self) -> u64 {
        let models = self.models.len() as u64;
        let scored = self.methods.iter().any(|&m| super::needs_scores(m));
        let amounts = (self.fractions.len() + self.n.len()) as u64;
        let cells = models
            .saturating_mul(self.methods.len() as u64)
            .saturating_mul(amounts)
            .saturating_mul(self.heal.len() as u64);
        let per_model = u64::from(scored) + u64::from(self.baseline);
        cells.saturating_add(models.saturating_mul(per_model))
    }

    /// Refuse a sweep of more than `cap` jobs (see [`job_count`](SweepSpec::job_count)), before
    /// it is expanded. `file` names the file in the error.
    pub fn check_job_count(&self, cap: u64, file: &str) -> Result<(), SweepError> {
        let count = self.job_count();
        if count > cap {
            return Err(SweepError::TooManyJobs { file: file.to_string(), count, cap });
        }
        Ok(())
    }

    /// The string, list and `n` limits, each error naming its field.
    pub(super) fn validate_sizes(&self, file: &str) -> Result<(), SweepError> {
        let invalid = |field: String, message: String| SweepError::Invalid { file: file.to_string(), field, message };
        let text = |field: &dyn Fn() -> String, value: &str, max: usize| {
            if value.len() > max {
                return Err(invalid(field(), format!("is {} bytes long; the limit is {max}", value.len())));
            }
            if value.chars().any(char::is_control) {
                return Err(invalid(field(), "must not contain control characters (newlines, tabs, NUL)".into()));
            }
            Ok(())
        };
        let list = |field: &str, len: usize, max: usize| {
            if len > max {
                let message = format!("has {len} entries; the limit is {max} (split the sweep into several files)");
                return Err(invalid(field.to_string(), message));
            }
            Ok(())
        };
        if let Some(d) = &self.description {
            if d.len() > MAX_DESCRIPTION_LEN {
                let message = format!("is {} bytes long; the limit is {MAX_DESCRIPTION_LEN}", d.len());
                return Err(invalid("description".into(), message));
            }
        }
        list("models", self.models.len(), MAX_LIST_LEN)?;
        for (i, m) in self.models.iter().enumerate() {
            text(&|| format!("models[{i}].name"), &m.name, MAX_NAME_LEN)?;
            for (key, value) in [("path", &m.path), ("hf", &m.hf)] {
                if let Some(v) = value {
                    text(&|| format!("models[{i}].{key}"), v, MAX_PATH_LEN)?;
                }
            }
            if let Some(r) = &m.revision {
                text(&|| format!("models[{i}].revision"), r, MAX_NAME_LEN)?;
            }
        }
        list("methods", self.methods.len(), MAX_LIST_LEN)?;
        list("fractions", self.fractions.len(), MAX_AMOUNTS)?;
        list("n", self.n.len(), MAX_AMOUNTS)?;
        if let Some((i, n)) = self.n.iter().enumerate().find(|(_, &n)| n > MAX_N) {
            let message =
                format!("must be at most {MAX_N} (layers to drop; below the model's layer count). Given: {n}");
            return Err(invalid(format!("n[{i}]"), message));
        }
        if let Some(c) = &self.calibration {
            text(&|| "calibration.path".into(), &c.path, MAX_PATH_LEN)?;
        }
        list("heal", self.heal.len(), MAX_LIST_LEN)?;
        for (i, h) in self.heal.iter().enumerate() {
            text(&|| format!("heal[{i}].name"), &h.name, MAX_NAME_LEN)?;
            let Some(q) = &h.qlora else { continue };
            if let Some(d) = &q.data {
                text(&|| format!("heal[{i}].qlora.data"), d, MAX_PATH_LEN)?;
            }
            if let TargetModules::Modules(modules) = &q.target_modules {
                list(&format!("heal[{i}].qlora.target_modules"), modules.len(), MAX_LIST_LEN)?;
                for (j, module) in modules.iter().enumerate() {
                    text(&|| format!("heal[{i}].qlora.target_modules[{j}]"), module, MAX_NAME_LEN)?;
                }
            }
        }
        list("eval", self.eval.len(), MAX_LIST_LEN)?;
        for (i, e) in self.eval.iter().enumerate() {
            text(&|| format!("eval[{i}].path"), &e.path, MAX_PATH_LEN)?;
            if let Some(d) = &e.dev_path {
                text(&|| format!("eval[{i}].dev_path"), d, MAX_PATH_LEN)?;
            }
        }
        Ok(())
    }
}

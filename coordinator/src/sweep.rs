//! Sweep files (`experiments/*.yaml`): parse, validate, and expand into jobs with content keys.
//!
//! A sweep file lists models, prune methods, fractions (or explicit layer counts `n`), heal variants,
//! eval tasks and calibration data. [`SweepSpec::parse`] reads it with serde-saphyr (budgets on,
//! unknown keys rejected; every error names the line/column and the field) and [`SweepSpec::expand`]
//! turns it into [`PlannedJob`]s:
//!
//! - one **score** job per (model, calibration), when some method needs layer scores;
//! - one **baseline** job per model (the unpruned model, evaluated once, not once per method);
//! - one **cell** per model × method × fraction/n × heal variant, depending on the model's score
//!   job (except `deepest`, which needs no scores).
//!
//! Each job's key is the sha256 of the canonical JSON (sorted keys) of its [`CellSpec`], so
//! submitting the same file again adds nothing and an extended file adds only the new cells.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::JobKind;

/// Errors from reading a sweep file.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The YAML is malformed, has an unknown key, a bad value, or breaks a parser budget. The
    /// message names the line and column.
    #[error("{file}: {error}")]
    Yaml {
        /// The file name (or `<input>`).
        file: String,
        /// serde-saphyr's error, with location and snippet (in the message, so not also a `source`).
        error: Box<serde_saphyr::Error>,
    },
    /// The YAML parsed but the sweep is inconsistent (e.g. no fractions and no `n`).
    #[error("{file}: `{field}`: {message}")]
    Invalid {
        /// The file name (or `<input>`).
        file: String,
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A validated sweep file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// Sweep name: letters, digits, `-`, `_`, `.`. Submitting to an existing name extends that sweep.
    pub name: SweepName,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Models to prune.
    pub models: Vec<ModelSpec>,
    /// Calibration data for scoring; required when a method needs scores.
    #[serde(default)]
    pub calibration: Option<CalibrationSpec>,
    /// Layer-choice methods.
    pub methods: Vec<Method>,
    /// Fractions of layers to drop, each in [0, 1).
    #[serde(default)]
    pub fractions: Vec<Fraction>,
    /// Explicit numbers of layers to drop (in addition to `fractions`).
    #[serde(default)]
    pub n: Vec<u32>,
    /// Heal variants; defaults to `[{name: none}]`.
    #[serde(default = "default_heal")]
    pub heal: Vec<HealVariant>,
    /// Evaluation tasks.
    #[serde(default)]
    pub eval: Vec<EvalTaskSpec>,
    /// Evaluate each unpruned model once (default true).
    #[serde(default = "default_true")]
    pub baseline: bool,
    /// Seed for data sampling and adapter initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Attempts per job before it fails for good (default 3).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Higher runs first (default 0).
    #[serde(default)]
    pub priority: i32,
}

fn default_heal() -> Vec<HealVariant> {
    vec![HealVariant { name: "none".into(), qlora: None }]
}
fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    3
}
fn default_samples() -> u32 {
    256
}
fn default_seq_len() -> u32 {
    256
}

/// A sweep name (validated on parse).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SweepName(String);

impl SweepName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SweepName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(Self(s))
        } else {
            Err(format!("`name` must be 1-128 characters from [A-Za-z0-9._-]. Given: {s:?}"))
        }
    }
}

impl From<SweepName> for String {
    fn from(n: SweepName) -> String {
        n.0
    }
}

impl fmt::Display for SweepName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fraction of layers to drop, in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Fraction(f64);

impl Fraction {
    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Fraction {
    type Error = String;
    fn try_from(f: f64) -> Result<Self, String> {
        if (0.0..1.0).contains(&f) {
            Ok(Self(f))
        } else {
            Err(format!("`fractions` must be in [0, 1). Given: {f}"))
        }
    }
}

impl From<Fraction> for f64 {
    fn from(f: Fraction) -> f64 {
        f.0
    }
}

/// A model in the sweep: a local path or an HF id.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Short name used in results and plots.
    pub name: String,
    /// Local path (GGUF file, HF directory or hub cache folder), as the worker sees it.
    #[serde(default)]
    pub path: Option<String>,
    /// HF id (`org/name`), resolved in the worker's HF cache.
    #[serde(default)]
    pub hf: Option<String>,
    /// HF revision for `hf`.
    #[serde(default)]
    pub revision: Option<String>,
}

/// Calibration data for scoring.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// JSON lines / json.gz / Parquet / text file.
    pub path: String,
    /// Documents to use (default 256).
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// Tokens per document (default 256).
    #[serde(default = "default_seq_len")]
    pub seq_len: u32,
}

/// How a cell chooses the layers to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Smallest angular distance d(l, n) (needs a score job).
    Angular,
    /// The deepest n layers before the last (no score job).
    Deepest,
    /// Lowest Block Influence (needs a score job).
    BlockInfluence,
}

impl Method {
    /// Whether cells with this method wait for the model's score job.
    pub fn needs_scores(self) -> bool {
        !matches!(self, Method::Deepest)
    }

    /// The name used in sweep files and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Angular => "angular",
            Method::Deepest => "deepest",
            Method::BlockInfluence => "block-influence",
        }
    }
}

/// A heal variant: `{name: none}` or `{name: ..., qlora: {...}}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealVariant {
    /// The variant's name.
    pub name: String,
    /// QLoRA settings; absent means no healing.
    #[serde(default)]
    pub qlora: Option<QLoraSpec>,
}

/// QLoRA healing settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QLoraSpec {
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha.
    pub alpha: f64,
    /// Dropout (default 0.05).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Optimizer steps.
    pub steps: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// Sequences per step (default 4).
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Tokens per sequence (default 256).
    #[serde(default = "default_seq_len")]
    pub seq_len: u32,
    /// Training data; default the calibration data.
    #[serde(default)]
    pub data: Option<String>,
    /// Adapted modules (PEFT names); empty = all linear layers.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Quantize the frozen base to 4 bits (default true).
    #[serde(default = "default_true")]
    pub quantize_base: bool,
}

fn default_dropout() -> f64 {
    0.05
}
fn default_batch() -> u32 {
    4
}

/// Evaluation tasks the worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum EvalKind {
    /// MMLU accuracy, letter-scored (5-shot by default).
    #[serde(rename = "mmlu")]
    Mmlu,
    /// MMLU accuracy, cloze-scored (0-shot; the form small models are measured with).
    #[serde(rename = "mmlu-cloze")]
    MmluCloze,
    /// BoolQ accuracy.
    #[serde(rename = "boolq")]
    BoolQ,
    /// Next-token loss on C4 documents.
    #[serde(rename = "c4-loss")]
    C4Loss,
}

impl EvalKind {
    /// The task's name.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalKind::Mmlu => "mmlu",
            EvalKind::MmluCloze => "mmlu-cloze",
            EvalKind::BoolQ => "boolq",
            EvalKind::C4Loss => "c4-loss",
        }
    }
}

/// One evaluation task.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct EvalTaskSpec {
    /// Which task.
    pub task: EvalKind,
    /// Data file or directory.
    pub path: String,
    /// At most this many examples.
    #[serde(default)]
    pub limit: Option<u32>,
    /// Few-shot examples (MMLU).
    #[serde(default)]
    pub shots: Option<u32>,
    /// Tokens per document (loss tasks).
    #[serde(default)]
    pub seq_len: Option<u32>,
    /// Documents skipped before the evaluated ones (loss tasks): keeps them apart from the
    /// documents the model was calibrated or healed on. Not serialized when unset, so that
    /// sweeps written before it keep their job keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_doc: Option<u32>,
    /// At most this many questions per subject (MMLU tasks; `limit` caps the total).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_per_subject: Option<u32>,
    /// Few-shot examples (MMLU) when `path` is not the original CSV folder with its `dev/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_path: Option<String>,
}

/// The model as a job sees it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// Short name.
    pub name: String,
    /// Path or HF id; the affinity key.
    pub source: String,
    /// HF revision.
    #[serde(default)]
    pub revision: Option<String>,
}

/// How many layers a cell drops.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// A fraction of the layers in [0, 1).
    Fraction(f64),
    /// An explicit count.
    N(u32),
}

/// The content of one job; its canonical JSON's sha256 is the job key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CellSpec {
    /// Score, baseline or cell.
    pub kind: JobKind,
    /// The model.
    pub model: ModelRef,
    /// Calibration data (score jobs, and cells whose method needs scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSpec>,
    /// Method (cells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Amount (cells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
    /// Healing (cells with a QLoRA variant); `None` means no healing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heal: Option<HealVariant>,
    /// Evaluation tasks (baseline and cells).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval: Vec<EvalTaskSpec>,
    /// Seed (baseline and cells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl CellSpec {
    /// Canonical JSON: object keys sorted (serde_json's `Value` map is ordered), no whitespace.
    pub fn canonical_json(&self) -> String {
        let value = serde_json::to_value(self).expect("a CellSpec always serializes to JSON");
        serde_json::to_string(&value).expect("a JSON value always serializes")
    }

    /// The content key: hex sha256 of [`Self::canonical_json`].
    pub fn key(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// The heal variant's display name (`none` without healing).
    pub fn heal_name(&self) -> &str {
        self.heal.as_ref().map_or("none", |h| h.name.as_str())
    }
}

/// A job to insert: its key, content, and the key of the job it waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedJob {
    /// Content key.
    pub key: String,
    /// Content.
    pub spec: CellSpec,
    /// Key of the score job this job waits for.
    pub depends_on: Option<String>,
}

impl SweepSpec {
    /// Parse and validate a sweep file's text. `file` names the file in error messages.
    pub fn parse(yaml: &str, file: &str) -> Result<Self, SweepError> {
        // Sweep files are small: budgets far below serde-saphyr's defaults.
        let mut budget = serde_saphyr::Budget::default();
        budget.max_reader_input_bytes = Some(4 * 1024 * 1024);
        budget.max_events = 200_000;
        budget.max_aliases = 1_000;
        budget.max_anchors = 1_000;
        budget.max_depth = 32;
        budget.max_nodes = 100_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        let spec: SweepSpec = serde_saphyr::from_str_with_options(yaml, options)
            .map_err(|e| SweepError::Yaml { file: file.to_string(), error: Box::new(e) })?;
        spec.validate(file)?;
        Ok(spec)
    }

    fn validate(&self, file: &str) -> Result<(), SweepError> {
        let invalid = |field: &str, message: String| SweepError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        if self.models.is_empty() {
            return Err(invalid("models", "list at least one model".into()));
        }
        let mut names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = format!("models[{i}]");
            if m.name.is_empty() {
                return Err(invalid(&format!("{field}.name"), "must not be empty".into()));
            }
            if !names.insert(m.name.as_str()) {
                return Err(invalid(&format!("{field}.name"), format!("duplicate model name {:?}", m.name)));
            }
            match (&m.path, &m.hf) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(&field, "give exactly one of `path` and `hf`".into()));
                }
                (Some(p), None) if p.is_empty() => return Err(invalid(&format!("{field}.path"), "is empty".into())),
                (None, Some(h)) if !h.contains('/') => {
                    return Err(invalid(&format!("{field}.hf"), format!("expected `org/name`. Given: {h:?}")));
                }
                _ => {}
            }
            if m.revision.is_some() && m.hf.is_none() {
                return Err(invalid(&format!("{field}.revision"), "only applies to `hf` models".into()));
            }
        }
        if self.methods.is_empty() {
            return Err(invalid("methods", "list at least one of angular, deepest, block-influence".into()));
        }
        if self.fractions.is_empty() && self.n.is_empty() {
            return Err(invalid("fractions", "give `fractions` (in [0, 1)) or `n` (layer counts)".into()));
        }
        if self.methods.iter().any(|m| m.needs_scores()) && self.calibration.is_none() {
            return Err(invalid("calibration", "required by the angular and block-influence methods".into()));
        }
        if self.heal.is_empty() {
            return Err(invalid("heal", "list at least one variant (`- name: none` for no healing)".into()));
        }
        let mut heal_names = HashSet::new();
        for (i, h) in self.heal.iter().enumerate() {
            if !heal_names.insert(h.name.as_str()) {
                return Err(invalid(&format!("heal[{i}].name"), format!("duplicate heal variant {:?}", h.name)));
            }
            if h.qlora.is_some() && h.name == "none" {
                return Err(invalid(&format!("heal[{i}].name"), "`none` cannot have qlora settings".into()));
            }
            if let Some(q) = &h.qlora {
                if q.rank == 0 || q.steps == 0 || q.batch_size == 0 {
                    return Err(invalid(&format!("heal[{i}].qlora"), "rank, steps and batch_size must be > 0".into()));
                }
                if !(0.0..1.0).contains(&q.dropout) {
                    return Err(invalid(
                        &format!("heal[{i}].qlora.dropout"),
                        format!("must be in [0, 1). Given: {}", q.dropout),
                    ));
                }
            }
        }
        let mut tasks = HashSet::new();
        for (i, e) in self.eval.iter().enumerate() {
            if !tasks.insert(e.task) {
                return Err(invalid(&format!("eval[{i}].task"), format!("duplicate task {}", e.task.as_str())));
            }
            let mmlu = matches!(e.task, EvalKind::Mmlu | EvalKind::MmluCloze);
            let only = |field: &str, given: bool, applies: bool, to: &str| {
                if given && !applies {
                    let message = format!("only applies to {to}, not {}", e.task.as_str());
                    return Err(invalid(&format!("eval[{i}].{field}"), message));
                }
                Ok(())
            };
            only("shots", e.shots.is_some(), e.task == EvalKind::Mmlu, "mmlu")?;
            only("limit_per_subject", e.limit_per_subject.is_some(), mmlu, "mmlu and mmlu-cloze")?;
            only("dev_path", e.dev_path.is_some(), e.task == EvalKind::Mmlu, "mmlu")?;
            only("first_doc", e.first_doc.is_some(), e.task == EvalKind::C4Loss, "c4-loss")?;
            only("seq_len", e.seq_len.is_some(), e.task == EvalKind::C4Loss, "c4-loss")?;
            if e.task == EvalKind::C4Loss && e.first_doc.is_none() {
                self.check_loss_apart_from_healing(i, e, &invalid)?;
            }
        }
        if self.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be at least 1".into()));
        }
        Ok(())
    }

    /// A loss measured on the documents the model was healed on says nothing about the cut: when
    /// `eval[i]` (c4-loss, no `first_doc`) reads the file a heal variant trains on, both start at
    /// its first document, so the sweep is refused until `first_doc` says where evaluation starts
    /// (set it explicitly, even to 0, to accept the overlap).
    fn check_loss_apart_from_healing(
        &self,
        i: usize,
        e: &EvalTaskSpec,
        invalid: &dyn Fn(&str, String) -> SweepError,
    ) -> Result<(), SweepError> {
        for h in &self.heal {
            let Some(q) = self.heal_with_data(h).qlora else { continue };
            if q.data.as_deref() == Some(e.path.as_str()) {
                let tokens = u64::from(q.steps) * u64::from(q.batch_size) * u64::from(q.seq_len);
                return Err(invalid(
                    &format!("eval[{i}].first_doc"),
                    format!(
                        "c4-loss reads {} from its first document, and heal variant {:?} trains on the \
                         same file from its first document ({tokens} tokens: steps × batch_size × seq_len); \
                         set `first_doc` to a document past those (or to 0 to measure on them anyway)",
                        e.path, h.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A heal variant as a cell carries it: without its own `data`, it trains on the sweep's
    /// calibration data (filled in here, so that cells that need no scoring still know it).
    fn heal_with_data(&self, heal: &HealVariant) -> HealVariant {
        let mut heal = heal.clone();
        if let Some(q) = heal.qlora.as_mut().filter(|q| q.data.is_none()) {
            q.data = self.calibration.as_ref().map(|c| c.path.clone());
        }
        heal
    }

    /// Expand into jobs: score jobs first, then baselines, then cells (the store keeps this order).
    /// Duplicates (e.g. a fraction listed twice) collapse to one job.
    pub fn expand(&self) -> Vec<PlannedJob> {
        let mut jobs = Vec::new();
        let mut seen = HashSet::new();
        let mut push = |jobs: &mut Vec<PlannedJob>, spec: CellSpec, depends_on: Option<String>| {
            let key = spec.key();
            if seen.insert(key.clone()) {
                jobs.push(PlannedJob { key, spec, depends_on });
            }
        };
        let needs_scores = self.methods.iter().any(|m| m.needs_scores());
        let models: Vec<ModelRef> = self
            .models
            .iter()
            .map(|m| ModelRef {
                name: m.name.clone(),
                source: m.path.clone().or_else(|| m.hf.clone()).expect("validated: path or hf"),
                revision: m.revision.clone(),
            })
            .collect();
        let score_key = |model: &ModelRef| -> CellSpec {
            CellSpec {
                kind: JobKind::Score,
                model: model.clone(),
                calibration: self.calibration.clone(),
                method: None,
                amount: None,
                heal: None,
                eval: Vec::new(),
                seed: None,
            }
        };
        if needs_scores {
            for m in &models {
                push(&mut jobs, score_key(m), None);
            }
        }
        if self.baseline {
            for m in &models {
                let spec = CellSpec {
                    kind: JobKind::Baseline,
                    model: m.clone(),
                    calibration: None,
                    method: None,
                    amount: None,
                    heal: None,
                    eval: self.eval.clone(),
                    seed: Some(self.seed),
                };
                push(&mut jobs, spec, None);
            }
        }
        let amounts: Vec<Amount> = self
            .fractions
            .iter()
            .map(|f| Amount::Fraction(f.get()))
            .chain(self.n.iter().map(|&n| Amount::N(n)))
            .collect();
        for m in &models {
            let score = needs_scores.then(|| score_key(m).key());
            for &method in &self.methods {
                for &amount in &amounts {
                    for heal in &self.heal {
                        let spec = CellSpec {
                            kind: JobKind::Cell,
                            model: m.clone(),
                            calibration: if method.needs_scores() { self.calibration.clone() } else { None },
                            method: Some(method),
                            amount: Some(amount),
                            heal: heal.qlora.is_some().then(|| self.heal_with_data(heal)),
                            eval: self.eval.clone(),
                            seed: Some(self.seed),
                        };
                        let dep = if method.needs_scores() { score.clone() } else { None };
                        push(&mut jobs, spec, dep);
                    }
                }
            }
        }
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> &'static str {
        "name: tiny\n\
         models:\n  - name: tiny-llama\n    path: worker/tests/fixtures/tiny-llama\n\
         calibration:\n  path: data.jsonl\n  samples: 4\n  seq_len: 16\n\
         methods: [angular, deepest]\n\
         fractions: [0.25, 0.5]\n\
         eval:\n  - task: c4-loss\n    path: data.jsonl\n    limit: 4\n"
    }

    fn parse(yaml: &str) -> Result<SweepSpec, SweepError> {
        SweepSpec::parse(yaml, "test.yaml")
    }

    #[test]
    fn tiny_expands_to_score_baseline_and_cells() {
        let spec = parse(tiny()).unwrap();
        let jobs = spec.expand();
        let kinds: Vec<_> = jobs.iter().map(|j| j.spec.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == JobKind::Score).count(), 1);
        assert_eq!(kinds.iter().filter(|k| **k == JobKind::Baseline).count(), 1);
        assert_eq!(kinds.iter().filter(|k| **k == JobKind::Cell).count(), 4);
        assert_eq!(kinds[0], JobKind::Score);
        let score_key = jobs[0].key.clone();
        for j in &jobs[2..] {
            match j.spec.method.unwrap() {
                Method::Angular => assert_eq!(j.depends_on.as_deref(), Some(score_key.as_str())),
                Method::Deepest => assert_eq!(j.depends_on, None),
                Method::BlockInfluence => unreachable!(),
            }
        }
    }

    #[test]
    fn keys_are_stable_and_extension_adds_only_new_cells() {
        let a = parse(tiny()).unwrap().expand();
        let b = parse(tiny()).unwrap().expand();
        assert_eq!(a, b);
        let extended = tiny().replace("[0.25, 0.5]", "[0.25, 0.5, 0.75]");
        let c = parse(&extended).unwrap().expand();
        let old: HashSet<_> = a.iter().map(|j| j.key.clone()).collect();
        let new: Vec<_> = c.iter().filter(|j| !old.contains(&j.key)).collect();
        assert_eq!(new.len(), 2, "one new fraction x two methods");
        assert!(new.iter().all(|j| j.spec.amount == Some(Amount::Fraction(0.75))));
    }

    #[test]
    fn deepest_only_needs_no_score_job_nor_calibration() {
        let yaml = "name: d\nmodels: [{name: m, path: m.gguf}]\nmethods: [deepest]\nn: [1, 2]\nbaseline: false\n";
        let jobs = parse(yaml).unwrap().expand();
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.spec.kind == JobKind::Cell && j.depends_on.is_none()));
    }

    const QLORA_R8: &str = "heal:\n  - name: none\n  - name: qlora-r8\n    qlora: {rank: 8, alpha: 16, steps: 10, learning_rate: 0.0003}\n";

    #[test]
    fn heal_variants_multiply_cells_and_none_has_no_heal() {
        let yaml = tiny().replace("limit: 4\n", "limit: 4\n    first_doc: 100\n") + QLORA_R8;
        let jobs = parse(&yaml).unwrap().expand();
        let cells: Vec<_> = jobs.iter().filter(|j| j.spec.kind == JobKind::Cell).collect();
        assert_eq!(cells.len(), 8);
        assert_eq!(cells.iter().filter(|j| j.spec.heal.is_none()).count(), 4);
        assert_eq!(cells.iter().filter(|j| j.spec.heal_name() == "qlora-r8").count(), 4);
    }

    #[test]
    fn loss_on_the_healing_documents_is_refused_until_first_doc_is_set() {
        // The heal variant trains on the calibration file (its default), which c4-loss also reads.
        let err = parse(&(tiny().to_string() + QLORA_R8)).unwrap_err().to_string();
        assert!(err.contains("`eval[0].first_doc`") && err.contains("\"qlora-r8\""), "{err}");
        assert!(err.contains("10240 tokens"), "10 steps x 4 x 256: {err}");
        // Any explicit value is accepted (0 = measure on the healing documents knowingly); the
        // field reaches the job's content and so its key.
        for first in [0, 500] {
            let yaml = tiny().replace("limit: 4\n", &format!("limit: 4\n    first_doc: {first}\n")) + QLORA_R8;
            let jobs = parse(&yaml).unwrap().expand();
            assert!(jobs[1].spec.canonical_json().contains(&format!("\"first_doc\":{first}")));
        }
        // Healing on another file: nothing to refuse.
        let other = QLORA_R8.replace("learning_rate: 0.0003", "learning_rate: 0.0003, data: other.jsonl");
        parse(&(tiny().to_string() + &other)).unwrap();
    }

    #[test]
    fn eval_fields_apply_to_their_tasks_only() {
        let with_task = |task: &str, extra: &str| {
            tiny().replace(
                "task: c4-loss\n    path: data.jsonl\n    limit: 4\n",
                &format!("task: {task}\n    path: d\n{extra}"),
            )
        };
        for (task, extra, field) in [
            ("boolq", "    first_doc: 3\n", "`eval[0].first_doc`"),
            ("boolq", "    shots: 5\n", "`eval[0].shots`"),
            ("mmlu-cloze", "    shots: 5\n", "`eval[0].shots`"),
            ("c4-loss", "    limit_per_subject: 5\n", "`eval[0].limit_per_subject`"),
            ("mmlu", "    seq_len: 64\n", "`eval[0].seq_len`"),
        ] {
            let err = parse(&with_task(task, extra)).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("only applies to"), "{task} {extra}: {err}");
        }
        let spec =
            parse(&with_task("mmlu", "    shots: 5\n    limit_per_subject: 5\n    dev_path: dev.jsonl\n")).unwrap();
        assert_eq!(spec.eval[0].limit_per_subject, Some(5));
        parse(&with_task("mmlu-cloze", "    limit_per_subject: 2\n")).unwrap();
    }

    #[test]
    fn unset_new_eval_fields_leave_job_keys_as_they_were() {
        // Keys of sweeps written before `first_doc`, `limit_per_subject` and `dev_path` existed.
        let json = parse(tiny()).unwrap().expand()[1].spec.canonical_json();
        assert!(
            json.contains(
                "\"eval\":[{\"limit\":4,\"path\":\"data.jsonl\",\"seq_len\":null,\"shots\":null,\"task\":\"c4-loss\"}]"
            ),
            "{json}"
        );
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let jobs = parse(tiny()).unwrap().expand();
        let json = jobs[0].spec.canonical_json();
        assert!(json.starts_with("{\"calibration\":"), "{json}");
        assert_eq!(jobs[0].key.len(), 64);
    }

    #[test]
    fn fraction_outside_unit_interval_names_line_and_field() {
        let err = parse(&tiny().replace("[0.25, 0.5]", "[0.25, 1.0]")).unwrap_err().to_string();
        assert!(err.contains("`fractions` must be in [0, 1). Given: 1"), "{err}");
        assert!(err.contains("line 10"), "{err}");
        let err = parse(&tiny().replace("[0.25, 0.5]", "[-0.1]")).unwrap_err().to_string();
        assert!(err.contains("Given: -0.1"), "{err}");
    }

    #[test]
    fn unknown_method_is_an_error_with_location() {
        let err = parse(&tiny().replace("[angular, deepest]", "[angular, shallowest]")).unwrap_err().to_string();
        assert!(err.contains("shallowest"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = parse(&(tiny().to_string() + "retries: 3\n")).unwrap_err().to_string();
        assert!(err.contains("retries"), "{err}");
        assert!(err.contains("line 15"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        let err = parse("name: x\nmodels: [unclosed\n").unwrap_err().to_string();
        assert!(err.contains("test.yaml"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn consistency_errors_name_the_field() {
        let cases = [
            ("name: x\nmodels: []\nmethods: [deepest]\nn: [1]\n", "`models`"),
            ("name: x\nmodels: [{name: m, path: a, hf: o/m}]\nmethods: [deepest]\nn: [1]\n", "`models[0]`"),
            ("name: x\nmodels: [{name: m, path: a}]\nmethods: [angular]\nn: [1]\n", "`calibration`"),
            ("name: x\nmodels: [{name: m, path: a}]\nmethods: [deepest]\n", "`fractions`"),
            ("name: 'a b'\nmodels: [{name: m, path: a}]\nmethods: [deepest]\nn: [1]\n", "`name`"),
        ];
        for (yaml, field) in cases {
            let err = parse(yaml).unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn repo_sweep_files_parse() {
        for file in ["smollm2-demo.yaml", "tiny-test.yaml"] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/").to_string() + file;
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = parse(&text).unwrap_or_else(|e| panic!("{e}"));
            assert!(!spec.expand().is_empty());
        }
    }
}

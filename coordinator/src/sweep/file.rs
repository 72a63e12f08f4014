//! The sweep file's schema: what a person writes in `experiments/*.yaml`, as serde reads it.
//!
//! Unknown keys are errors. Settings with a fixed default take it here, from the contract's
//! [`defaults`](prunesweep_proto::defaults); the few whose default depends on another setting
//! (LoRA α on the rank, warmup on the steps, healing data on the calibration data) stay `None`
//! until [`expand`](super::SweepSpec::expand) resolves them into the job specs.

use std::fmt;

use prunesweep_proto::memory::ModelShape;
use prunesweep_proto::v1::{
    AdapterTargets, CalibrationData, Dtype, EvalTaskKind, LrSchedule, PruneMethod, QLoraSettings,
};
use prunesweep_proto::{defaults, Vocabulary};
use serde::{Deserialize, Serialize};

/// A sweep file: the models × methods × amounts × heal variants to run, and how to evaluate them.
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
    pub methods: Vec<PruneMethod>,
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
    /// `f32` or `bf16`; default: the worker device's own (f32 on CPU, bf16 on CUDA). `bf16` on a
    /// CPU worker runs the GPU code path.
    #[serde(default)]
    pub dtype: Option<Dtype>,
    /// The model's shape for the memory model (`{layers, hidden, intermediate, heads, kv_heads,
    /// head_dim, vocab, tied_embeddings, gated_mlp}`), when the coordinator cannot read it from
    /// the model's location (or should not); it changes no job's content or key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ModelShape>,
}

/// Calibration data for scoring. Also the stored job spec's calibration, every field resolved.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// JSON lines / json.gz / Parquet / text file.
    pub path: String,
    /// Documents to use.
    #[serde(default = "calibration_samples")]
    pub samples: u32,
    /// Tokens per document.
    #[serde(default = "calibration_seq_len")]
    pub seq_len: u32,
    /// Sequences per forward pass.
    #[serde(default = "batch_size")]
    pub batch_size: u32,
}

fn calibration_samples() -> u32 {
    CalibrationData::with_defaults("").samples
}
fn calibration_seq_len() -> u32 {
    CalibrationData::with_defaults("").seq_len
}
fn batch_size() -> u32 {
    defaults::BATCH_SIZE
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

/// QLoRA healing settings; each left out is the paper's ([`QLoraSettings::paper`]). Also the
/// stored job spec's healing settings, with `alpha`, `micro_batch_size`, `warmup_steps` and `data`
/// resolved.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QLoraSpec {
    /// LoRA rank.
    #[serde(default = "paper_rank")]
    pub rank: u32,
    /// LoRA α; default: = rank.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input.
    #[serde(default = "paper_dropout")]
    pub dropout: f64,
    /// Optimizer updates.
    #[serde(default = "paper_steps")]
    pub steps: u32,
    /// Peak learning rate.
    #[serde(default = "paper_learning_rate")]
    pub learning_rate: f64,
    /// Sequences per update.
    #[serde(default = "paper_batch_size")]
    pub batch_size: u32,
    /// Sequences per forward/backward pass (accumulated to `batch_size`); default: 4 when it
    /// divides `batch_size`, else `batch_size`.
    #[serde(default)]
    pub micro_batch_size: Option<u32>,
    /// Tokens per training sequence.
    #[serde(default = "paper_seq_len")]
    pub seq_len: u32,
    /// Training data; default: the calibration data.
    #[serde(default)]
    pub data: Option<String>,
    /// Documents of the training data skipped before packing.
    #[serde(default)]
    pub data_first_doc: u32,
    /// Adapted modules: `ffn` (the paper's), `all-linear`, `attention`, or a list of PEFT module
    /// names (`[q_proj, v_proj]`; `[]` is `all-linear`, as it always was).
    #[serde(default)]
    pub target_modules: TargetModules,
    /// Quantize the frozen base to 4 bits.
    #[serde(default = "paper_quantize_base")]
    pub quantize_base: bool,
    /// Linear warmup updates; default: 100, or a tenth of a shorter run.
    #[serde(default)]
    pub warmup_steps: Option<u32>,
    /// The learning-rate schedule after warmup.
    #[serde(default = "paper_schedule")]
    pub schedule: LrSchedule,
    /// AdamW decoupled weight decay.
    #[serde(default = "paper_weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    #[serde(default = "paper_max_grad_norm")]
    pub max_grad_norm: f64,
    /// A resumable checkpoint every this many updates.
    #[serde(default = "paper_checkpoint_every")]
    pub checkpoint_every: u32,
}

macro_rules! paper_default {
    ($($name:ident: $ty:ty = $field:ident;)*) => {$(
        fn $name() -> $ty {
            QLoraSettings::paper().$field
        }
    )*};
}

paper_default! {
    paper_rank: u32 = rank;
    paper_dropout: f64 = dropout;
    paper_steps: u32 = steps;
    paper_learning_rate: f64 = learning_rate;
    paper_batch_size: u32 = batch_size;
    paper_seq_len: u32 = seq_len;
    paper_quantize_base: bool = quantize_base;
    paper_weight_decay: f64 = weight_decay;
    paper_max_grad_norm: f64 = max_grad_norm;
    paper_checkpoint_every: u32 = checkpoint_every;
}

fn paper_schedule() -> LrSchedule {
    QLoraSettings::paper().schedule()
}

/// Which projections get adapters: a set named by role (mapped to module names by each worker
/// for its model's family), or module names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `ffn`, `all-linear` or `attention`.
    Set(AdapterTargets),
    /// PEFT module names (`q_proj`, `gate_up_proj`, `fc1`, …).
    Modules(Vec<String>),
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Name(String),
            Modules(Vec<String>),
        }
        match Given::deserialize(d)? {
            // An empty list has always meant every linear layer.
            Given::Modules(modules) if modules.is_empty() => Ok(TargetModules::Set(AdapterTargets::AllLinear)),
            Given::Modules(modules) => Ok(TargetModules::Modules(modules)),
            Given::Name(name) => match AdapterTargets::from_name(&name) {
                Some(AdapterTargets::Modules) | None => Err(serde::de::Error::custom(format!(
                    "`target_modules` is `ffn`, `all-linear`, `attention` or a list of module names \
                     (`[q_proj, v_proj]`). Given: {name:?}"
                ))),
                Some(set) => Ok(TargetModules::Set(set)),
            },
        }
    }
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Set(QLoraSettings::paper().targets())
    }
}

/// One evaluation task. Also the stored job spec's task, with its defaults resolved.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct EvalTaskSpec {
    /// Which task.
    pub task: EvalTaskKind,
    /// Data file or directory.
    pub path: String,
    /// At most this many examples (c4-loss: documents, default 256).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Few-shot examples (MMLU letter form, default 5).
    #[serde(default)]
    pub shots: Option<u32>,
    /// Tokens per document (c4-loss, default 512).
    #[serde(default)]
    pub seq_len: Option<u32>,
    /// Documents skipped before the evaluated ones (c4-loss, default 0): keeps them apart from
    /// the documents the model was calibrated or healed on.
    #[serde(default)]
    pub first_doc: Option<u32>,
    /// At most this many questions per subject (MMLU tasks; `limit` caps the total).
    #[serde(default)]
    pub limit_per_subject: Option<u32>,
    /// Few-shot examples (MMLU) when `path` is not the original CSV folder with its `dev/`.
    #[serde(default)]
    pub dev_path: Option<String>,
    /// Sequences per forward pass (default 8).
    #[serde(default)]
    pub batch_size: Option<u32>,
}

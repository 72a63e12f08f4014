//! A job's content: the resolved [`JobSpec`] the store keeps and the worker runs, and its key.
//!
//! Expansion ([`SweepSpec::expand`](crate::sweep::SweepSpec::expand)) writes every setting that
//! can change a result into the spec: sample counts and lengths, every healing setting (warmup,
//! micro-batch, targets, checkpoint cadence, …), the eval tasks' shots, limits, lengths and batch.
//! The key is the sha256 of the spec's canonical JSON, so a result is filed under exactly the
//! settings that produced it, and a change of a default makes new jobs instead of reusing old
//! results.
//!
//! Specs stored before a field existed still read: a field they lack takes its serde default,
//! and a worker refuses (non-retryably, naming the field) a setting that came back unset.

use prunesweep_proto::v1::{Dtype, PruneMethod};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::JobKind;
use crate::sweep::{CalibrationSpec, EvalTaskSpec, HealVariant};

/// The model as a job sees it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// Short name used in results and plots.
    pub name: String,
    /// Path or HF id; the affinity key.
    pub source: String,
    /// HF revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// What to compute in; `None`: the worker device's own (f32 on CPU, bf16 on CUDA). Left out
    /// of the canonical JSON when unset, so specs written before it keep their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
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

/// The content of one job, every setting resolved; its canonical JSON's sha256 is the job key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct JobSpec {
    /// Score, baseline or cell.
    pub kind: JobKind,
    /// The model.
    pub model: ModelRef,
    /// Calibration data (score jobs, and cells whose method needs scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSpec>,
    /// Method (cells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<PruneMethod>,
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

impl JobSpec {
    /// Canonical JSON: object keys sorted (serde_json's `Value` map is ordered), no whitespace.
    pub fn canonical_json(&self) -> String {
        let value = serde_json::to_value(self).expect("a JobSpec always serializes to JSON");
        serde_json::to_string(&value).expect("a JSON value always serializes")
    }

    /// The content key: hex sha256 of [`Self::canonical_json`].
    pub fn key(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// The data files the job reads (calibration, healing, evaluation and few-shot files), as the
    /// worker will see them; the model is [`ModelRef::source`].
    pub fn data_files(&self) -> Vec<&str> {
        let calibration = self.calibration.iter().map(|c| c.path.as_str());
        let heal = self.heal.iter().filter_map(|h| h.qlora.as_ref()?.data.as_deref());
        let eval = self.eval.iter().flat_map(|t| std::iter::once(t.path.as_str()).chain(t.dev_path.as_deref()));
        calibration.chain(heal).chain(eval).collect()
    }

    /// The heal variant's display name (`none` without healing).
    pub fn heal_name(&self) -> &str {
        self.heal.as_ref().map_or("none", |h| h.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use prunesweep_proto::v1::{AdapterTargets, PruneMethod};

    use super::*;
    use crate::sweep::TargetModules;

    /// A cell as a coordinator stored it before settings were resolved (session 4's format).
    const STORED_BEFORE_RESOLUTION: &str = r#"{"amount":{"fraction":0.25},"calibration":{"path":"c4.jsonl","samples":4,"seq_len":16},"eval":[{"limit":4,"path":"c4.jsonl","seq_len":null,"shots":null,"task":"c4-loss","first_doc":100}],"heal":{"name":"qlora-r8","qlora":{"alpha":16.0,"batch_size":4,"data":"c4.jsonl","dropout":0.05,"learning_rate":0.0003,"quantize_base":true,"rank":8,"seq_len":256,"steps":10,"target_modules":[]}},"kind":"cell","method":"angular","model":{"name":"tiny-llama","revision":null,"source":"worker/tests/fixtures/tiny-llama"},"seed":0}"#;

    #[test]
    fn specs_stored_before_resolution_still_read() {
        let spec: JobSpec = serde_json::from_str(STORED_BEFORE_RESOLUTION).unwrap();
        assert_eq!(
            (spec.kind, spec.method, spec.amount),
            (JobKind::Cell, Some(PruneMethod::Angular), Some(Amount::Fraction(0.25)))
        );
        assert_eq!(spec.heal_name(), "qlora-r8");
        let q = spec.heal.as_ref().unwrap().qlora.as_ref().unwrap();
        // An empty list always meant every linear layer; fields it lacks read as unset.
        assert_eq!(q.target_modules, TargetModules::Set(AdapterTargets::AllLinear));
        assert_eq!((q.micro_batch_size, q.warmup_steps), (None, None));
        assert_eq!(spec.eval[0].first_doc, Some(100));
        assert_eq!(spec.calibration.as_ref().unwrap().batch_size, prunesweep_proto::defaults::BATCH_SIZE);
    }
}

//! A validated sweep → the jobs it stands for, each with its settings resolved and its key.
//!
//! - one **score** job per (model, calibration), when some method needs layer scores;
//! - one **baseline** job per model (the unpruned model, evaluated once, not once per method);
//! - one **cell** per model × method × fraction/n × heal variant, depending on the model's score
//!   job (except `deepest`, which needs no scores).
//!
//! Resolution writes into each job every default that can change its result (LoRA α = r, warmup,
//! the healing data, the eval tasks' shots, limits, lengths and batch), so that the key says
//! everything and the worker decides nothing.

use std::collections::{HashMap, HashSet};

use prunesweep_proto::defaults;
use prunesweep_proto::memory::{self, MemoryEstimate, ModelShape, Placement};
use prunesweep_proto::v1::EvalTask;

use super::validate::needs_scores;
use super::{EvalTaskSpec, HealVariant, SweepSpec};
use crate::job::JobKind;
use crate::spec::{Amount, JobSpec, ModelRef};

/// A job to insert: its key, content, and the key of the job it waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedJob {
    /// Content key: sha256 of the spec's canonical JSON.
    pub key: String,
    /// What the job runs, every setting resolved.
    pub spec: JobSpec,
    /// Key of the score job this job waits for.
    pub depends_on: Option<String>,
    /// Its predicted peak memory, or why there is none.
    pub memory: JobMemory,
}

/// A job's predicted peak memory ([`memory::predict`]), or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum JobMemory {
    /// Predicted on a CUDA worker and on a CPU worker (each in the model's dtype, or the device's
    /// own: bf16 on CUDA, f32 on a CPU).
    Predicted {
        /// On a CUDA worker: device (GPU) and host.
        gpu: MemoryEstimate,
        /// On a CPU worker: the whole process.
        cpu: MemoryEstimate,
    },
    /// No prediction (the model's shape is unknown here, or does not fit the model): the job
    /// may go to any worker.
    Unknown(String),
}

impl JobMemory {
    /// The device bytes leasing compares with a worker's free memory: the CUDA prediction, since
    /// sweeps run on GPU workers (a CPU worker needs the CPU figure, larger in f32, which
    /// `coordinator plan` also shows), the least the job runs in (an evaluation whose model does
    /// not fit reads blocks per pass). `None`: no constraint.
    pub fn lease_bytes(&self) -> Option<u64> {
        match self {
            JobMemory::Predicted { gpu, .. } => Some(gpu.least_device_bytes),
            JobMemory::Unknown(_) => None,
        }
    }
}

/// The prediction for one job on a model of `shape` (or why there is none).
fn predict(spec: &JobSpec, shape: &Result<Option<ModelShape>, String>) -> JobMemory {
    let shape = match shape {
        Ok(Some(shape)) => shape,
        Ok(None) => {
            return JobMemory::Unknown(format!(
                "{} is not on this machine: shape unknown (give `models[i].shape`)",
                spec.model.source
            ))
        }
        Err(e) => return JobMemory::Unknown(e.clone()),
    };
    let job = crate::service::convert::spec_to_pb(spec);
    match (memory::predict(shape, &job, Placement::Cuda), memory::predict(shape, &job, Placement::Cpu)) {
        (Ok(gpu), Ok(cpu)) => JobMemory::Predicted { gpu, cpu },
        (Err(e), _) | (_, Err(e)) => JobMemory::Unknown(e.to_string()),
    }
}

impl SweepSpec {
    /// A heal variant as a cell carries it: α, micro-batch, warmup and training data resolved (without its
    /// own `data`, a variant trains on the sweep's calibration data).
    pub(super) fn resolve_heal(&self, heal: &HealVariant) -> HealVariant {
        let mut heal = heal.clone();
        if let Some(q) = heal.qlora.as_mut() {
            q.alpha = Some(q.alpha.unwrap_or_else(|| defaults::lora_alpha(q.rank)));
            q.micro_batch_size = Some(q.micro_batch_size.unwrap_or_else(|| defaults::micro_batch_size(q.batch_size)));
            q.warmup_steps = Some(q.warmup_steps.unwrap_or_else(|| defaults::warmup_steps(q.steps)));
            if q.data.is_none() {
                q.data = self.calibration.as_ref().map(|c| c.path.clone());
            }
        }
        heal
    }

    /// The models as jobs name them.
    fn model_refs(&self) -> Vec<ModelRef> {
        self.models
            .iter()
            .map(|m| ModelRef {
                name: m.name.clone(),
                source: m.path.clone().or_else(|| m.hf.clone()).expect("validated: path or hf"),
                revision: m.revision.clone(),
                dtype: m.dtype,
            })
            .collect()
    }

    /// Each model's shape by name: the sweep file's `shape`, else read from its location
    /// ([`super::shape::read_shape`]; `Ok(None)` when this machine does not have it).
    pub fn model_shapes(&self) -> HashMap<String, Result<Option<ModelShape>, String>> {
        self.models
            .iter()
            .map(|m| {
                let shape = match (&m.shape, m.path.as_deref().or(m.hf.as_deref())) {
                    (Some(shape), _) => Ok(Some(*shape)),
                    (None, Some(source)) => {
                        super::shape::read_shape(source, m.revision.as_deref()).map_err(|e| e.to_string())
                    }
                    (None, None) => Ok(None),
                };
                (m.name.clone(), shape)
            })
            .collect()
    }

    /// Expand into jobs: score jobs first, then baselines, then cells (the store keeps this order).
    /// Duplicates (e.g. a fraction listed twice) collapse to one job. Each job's peak memory is
    /// predicted from its model's shape ([`SweepSpec::model_shapes`]).
    pub fn expand(&self) -> Vec<PlannedJob> {
        let mut jobs = Vec::new();
        let mut seen = HashSet::new();
        let shapes = self.model_shapes();
        let mut push = |jobs: &mut Vec<PlannedJob>, spec: JobSpec, depends_on: Option<String>| {
            let key = spec.key();
            if seen.insert(key.clone()) {
                let shape = shapes.get(&spec.model.name).cloned().unwrap_or(Ok(None));
                let memory = predict(&spec, &shape);
                jobs.push(PlannedJob { key, spec, depends_on, memory });
            }
        };
        let any_scored = self.methods.iter().any(|&m| needs_scores(m));
        let models = self.model_refs();
        let eval: Vec<EvalTaskSpec> = self.eval.iter().map(resolve_eval).collect();
        let job = |kind, model: &ModelRef| JobSpec {
            kind,
            model: model.clone(),
            calibration: None,
            method: None,
            amount: None,
            heal: None,
            eval: Vec::new(),
            seed: None,
        };
        let score_spec =
            |model: &ModelRef| JobSpec { calibration: self.calibration.clone(), ..job(JobKind::Score, model) };
        if any_scored {
            for m in &models {
                push(&mut jobs, score_spec(m), None);
            }
        }
        if self.baseline {
            for m in &models {
                let spec = JobSpec { eval: eval.clone(), seed: Some(self.seed), ..job(JobKind::Baseline, m) };
                push(&mut jobs, spec, None);
            }
        }
        let amounts: Vec<Amount> = self
            .fractions
            .iter()
            .map(|f| Amount::Fraction(f.get()))
            .chain(self.n.iter().map(|&n| Amount::N(n)))
            .collect();
        let heals: Vec<Option<HealVariant>> =
            self.heal.iter().map(|h| h.qlora.is_some().then(|| self.resolve_heal(h))).collect();
        for m in &models {
            let score = any_scored.then(|| score_spec(m).key());
            for &method in &self.methods {
                let scored = needs_scores(method);
                for &amount in &amounts {
                    for heal in &heals {
                        let spec = JobSpec {
                            calibration: if scored { self.calibration.clone() } else { None },
                            method: Some(method),
                            amount: Some(amount),
                            heal: heal.clone(),
                            eval: eval.clone(),
                            seed: Some(self.seed),
                            ..job(JobKind::Cell, m)
                        };
                        push(&mut jobs, spec, if scored { score.clone() } else { None });
                    }
                }
            }
        }
        jobs
    }
}

/// An eval task as a job carries it: every default of its kind written in
/// ([`EvalTask::with_defaults`]).
fn resolve_eval(task: &EvalTaskSpec) -> EvalTaskSpec {
    let d = EvalTask::with_defaults(task.task, task.path.clone());
    EvalTaskSpec {
        limit: task.limit.or(d.limit),
        shots: task.shots.or(d.shots),
        seq_len: task.seq_len.or(d.seq_len),
        first_doc: task.first_doc.or(d.first_doc),
        batch_size: Some(task.batch_size.unwrap_or(d.batch_size)),
        ..task.clone()
    }
}

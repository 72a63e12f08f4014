//! A leased job, checked at the worker's edge: [`Job::try_from`] turns the contract's
//! `pb::JobSpec` into typed stage specs ([`ScoreSpec`], [`PruneSpec`], [`HealSpec`], [`EvalSpec`]),
//! or into a non-retryable [`JobError::Spec`] naming the field that is missing or unknown. The
//! stages never see the wire type, and nothing is defaulted here: the coordinator resolved every
//! setting into the spec (and its key) before the job was stored.
//!
//! [`JobError`] is how a job fails: a stable [`kind`](JobError::kind) for the coordinator's
//! records and whether another attempt [could succeed](JobError::is_retryable).

use std::path::PathBuf;

use prunesweep_proto::v1 as pb;
use prunesweep_proto::Vocabulary;

use crate::eval::{EvalSpec, Task};
use crate::heal::{HealConfig, HealSpec};
use crate::prune::{Amount, Method, PruneSpec};
use crate::score::{AngularDistances, BlockInfluence, ScoreSpec};

/// Why a job did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The spec is missing a value or has one this worker does not know.
    #[error("invalid job spec: `{field}`: {message}")]
    Spec {
        /// The field, as a path into the job spec (`heal.qlora.micro_batch_size`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The model cannot be loaded (missing path, unsupported family, bad checkpoint).
    #[error("{0}")]
    ModelLoad(String),
    /// A data file cannot be read or is malformed.
    #[error("{0}")]
    Data(String),
    /// The job's settings do not fit its model (too many layers to drop, a rank too large).
    #[error("{0}")]
    Unfit(String),
    /// A healing checkpoint cannot be used.
    #[error("{0}")]
    Checkpoint(String),
    /// A tensor operation failed (out of memory, a device error): another try may pass.
    #[error("{0}")]
    Runtime(String),
    /// Training diverged (a non-finite loss): the same settings will diverge again.
    #[error("{0}")]
    Diverged(String),
    /// A measured value came out NaN or infinite: reported as a failure with its reason, never as
    /// a result.
    #[error("{0}")]
    NotFinite(String),
    /// A path in the spec lies outside the folders this worker was told it may read.
    #[error(
        "`{field}`: {path} is outside this worker's {what} roots ({roots}); start the worker with {flag} naming \
             a folder that holds it (or correct the sweep file)"
    )]
    OutsideRoots {
        /// The field, as a path into the job spec (`eval[1].path`).
        field: String,
        /// The path as the spec gives it.
        path: String,
        /// `model` or `data`.
        what: &'static str,
        /// The roots, comma-separated.
        roots: String,
        /// The flag that adds a root (`--data-root`).
        flag: &'static str,
    },
    /// The job panicked (a bug, or a kernel assertion).
    #[error("the job panicked: {0}")]
    Panic(String),
    /// Stopped at a safe point: cancelled, lease lost, or the worker is shutting down.
    #[error("stopped before it finished (cancelled, lease lost, or worker shutting down)")]
    Stopped,
}

impl JobError {
    /// The stable label the coordinator stores as the job's error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Spec { .. } => "invalid_spec",
            JobError::ModelLoad(_) => "model_load",
            JobError::Data(_) => "data",
            JobError::Unfit(_) => "unfit",
            JobError::Checkpoint(_) => "checkpoint",
            JobError::Runtime(_) => "runtime",
            JobError::Diverged(_) => "diverged",
            JobError::NotFinite(_) => "not_finite",
            JobError::OutsideRoots { .. } => "outside_roots",
            JobError::Panic(_) => "panic",
            JobError::Stopped => "stopped",
        }
    }

    /// Whether another attempt may succeed. Bad input never will; a runtime failure, a panic
    /// (bounded by the sweep's max attempts) or a stop may.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::Runtime(_) | JobError::Panic(_) | JobError::Stopped)
    }

    /// A panic's payload as a failure, with its text.
    pub fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        JobError::Panic(text)
    }

    fn spec(field: impl Into<String>, message: impl Into<String>) -> Self {
        JobError::Spec { field: field.into(), message: message.into() }
    }
}

/// A job, validated.
#[derive(Debug, Clone)]
pub struct Job {
    /// The coordinator's id.
    pub id: i64,
    /// The content key (names the job's work folder).
    pub key: String,
    /// The model's source: a path, or an HF id in the local cache.
    pub model: String,
    /// What to compute in; `None`: the device's own ([`crate::model::default_dtype`]).
    pub dtype: Option<candle_core::DType>,
    /// What to do.
    pub work: Work,
}

/// Which kind of file a path in a job names (they are allowed under different roots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The model (a path, or an HF id resolved in the local hub cache).
    Model,
    /// Calibration, healing or evaluation data.
    Data,
}

impl Job {
    /// Every file the job reads, with its field in the spec: the model, then the data.
    pub fn files(&self) -> Vec<(String, FileKind, &std::path::Path)> {
        let mut files = vec![("model.source".to_string(), FileKind::Model, std::path::Path::new(&self.model))];
        fn eval<'a>(tasks: &'a [EvalSpec], files: &mut Vec<(String, FileKind, &'a std::path::Path)>) {
            for (i, t) in tasks.iter().enumerate() {
                files.push((format!("eval[{i}].path"), FileKind::Data, t.data.as_path()));
                if let Some(dev) = &t.dev {
                    files.push((format!("eval[{i}].dev_path"), FileKind::Data, dev.as_path()));
                }
            }
        }
        match &self.work {
            Work::Score(s) => files.push(("calibration.path".into(), FileKind::Data, s.data.as_path())),
            Work::Baseline(tasks) => eval(tasks, &mut files),
            Work::Cell(cell) => {
                if let Some(h) = &cell.heal {
                    files.push(("heal.qlora.data_path".into(), FileKind::Data, h.data.as_path()));
                }
                eval(&cell.eval, &mut files);
            }
        }
        files
    }
}

/// What a job does.
#[derive(Debug, Clone)]
pub enum Work {
    /// Score every block on calibration data.
    Score(ScoreSpec),
    /// Evaluate the unpruned model.
    Baseline(Vec<EvalSpec>),
    /// Prune, maybe heal, evaluate (boxed: its tables and settings dwarf the other variants).
    Cell(Box<Cell>),
}

/// One point of a sweep.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Which layers to drop.
    pub prune: PruneSpec,
    /// The score job's d(l, n) table (angular cells).
    pub distances: Option<AngularDistances>,
    /// The score job's Block Influence (block-influence cells).
    pub influence: Option<BlockInfluence>,
    /// Healing after the cut.
    pub heal: Option<HealSpec>,
    /// What to measure.
    pub eval: Vec<EvalSpec>,
}

fn positive(field: &str, v: u32) -> Result<usize, JobError> {
    if v == 0 {
        return Err(JobError::spec(field, "missing or 0; resubmit the sweep with a coordinator that resolves it"));
    }
    Ok(v as usize)
}

impl TryFrom<&pb::JobSpec> for Job {
    type Error = JobError;

    fn try_from(spec: &pb::JobSpec) -> Result<Self, JobError> {
        let model =
            spec.model.as_ref().filter(|m| !m.source.is_empty()).ok_or_else(|| JobError::spec("model", "missing"))?;
        let kind = pb::JobKind::try_from(spec.kind).unwrap_or(pb::JobKind::Unspecified);
        let work = match kind {
            pb::JobKind::Score => Work::Score(score_spec(spec)?),
            pb::JobKind::Baseline => Work::Baseline(eval_specs(&spec.eval)?),
            pb::JobKind::Cell => Work::Cell(Box::new(cell(spec)?)),
            pb::JobKind::Unspecified => {
                return Err(JobError::spec(
                    "kind",
                    format!("unknown value {}; known: score, baseline, cell", spec.kind),
                ))
            }
        };
        let dtype = match pb::Dtype::try_from(model.dtype) {
            Ok(pb::Dtype::Unspecified) => None,
            Ok(pb::Dtype::F32) => Some(candle_core::DType::F32),
            Ok(pb::Dtype::Bf16) => Some(candle_core::DType::BF16),
            Err(_) => {
                let known: Vec<String> = pb::Dtype::all().into_iter().map(|d| d.name()).collect();
                return Err(JobError::spec(
                    "model.dtype",
                    format!("unknown value {}; known: {}", model.dtype, known.join(", ")),
                ));
            }
        };
        // An HF id at a revision is `org/name@revision`, as `--model` takes it.
        let source = match model.revision.as_deref().filter(|r| !r.is_empty()) {
            Some(revision) if crate::model::hub::parse_id(&model.source).is_some_and(|(_, r)| r.is_none()) => {
                format!("{}@{revision}", model.source)
            }
            Some(revision) => {
                return Err(JobError::spec(
                    "model.revision",
                    format!("{revision:?} is set, but the source {:?} is not an HF id (org/name)", model.source),
                ))
            }
            None => model.source.clone(),
        };
        Ok(Job { id: spec.job_id, key: spec.key.clone(), model: source, dtype, work })
    }
}

fn score_spec(spec: &pb::JobSpec) -> Result<ScoreSpec, JobError> {
    let c =
        spec.calibration.as_ref().ok_or_else(|| JobError::spec("calibration", "a score job needs calibration data"))?;
    if c.path.is_empty() {
        return Err(JobError::spec("calibration.path", "missing"));
    }
    Ok(ScoreSpec {
        data: PathBuf::from(&c.path),
        samples: positive("calibration.samples", c.samples)?,
        seq_len: positive("calibration.seq_len", c.seq_len)?,
        batch: positive("calibration.batch_size", c.batch_size)?,
    })
}

fn eval_specs(tasks: &[pb::EvalTask]) -> Result<Vec<EvalSpec>, JobError> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let field = |f: &str| format!("eval[{i}].{f}");
            let kind = pb::EvalTaskKind::try_from(t.kind).unwrap_or(pb::EvalTaskKind::Unspecified);
            let task = Task::try_from(kind).map_err(|_| {
                let known: Vec<String> = pb::EvalTaskKind::all().into_iter().map(|k| k.name()).collect();
                JobError::spec(field("kind"), format!("unknown value {}; known: {}", t.kind, known.join(", ")))
            })?;
            let needed = |name: &str, v: Option<u32>| {
                v.map(|v| v as usize)
                    .ok_or_else(|| JobError::spec(field(name), format!("missing; {} needs it", task.name())))
            };
            Ok(EvalSpec {
                task,
                data: PathBuf::from(&t.path),
                dev: t.dev_path.as_ref().map(PathBuf::from),
                limit: t.limit.map(|l| l as usize),
                limit_per_subject: t.limit_per_subject.map(|l| l as usize),
                shots: if task == Task::Mmlu { needed("shots", t.shots)? } else { 0 },
                seq_len: if task == Task::C4Loss { needed("seq_len", t.seq_len)? } else { 0 },
                first_doc: if task == Task::C4Loss { needed("first_doc", t.first_doc)? } else { 0 },
                batch: positive(&field("batch_size"), t.batch_size)?,
            })
        })
        .collect()
}

fn cell(spec: &pb::JobSpec) -> Result<Cell, JobError> {
    let method = Method::try_from(spec.method()).map_err(|e| JobError::spec("method", e.to_string()))?;
    let amount = match spec.amount {
        Some(pb::job_spec::Amount::Fraction(f)) => Amount::Fraction(f),
        Some(pb::job_spec::Amount::N(n)) => Amount::N(n as usize),
        None => return Err(JobError::spec("amount", "a cell needs a fraction or n")),
    };
    let rows = |metric: pb::DistanceMetric| spec.distances.iter().filter(move |d| d.metric() == metric);
    let distances = match method {
        Method::Angular => {
            let entries: Vec<(usize, usize, f64)> =
                rows(pb::DistanceMetric::Angular).map(|d| (d.n as usize, d.l as usize, d.value)).collect();
            Some(AngularDistances::from_entries(&entries).map_err(|e| JobError::spec("distances", e))?)
        }
        _ => None,
    };
    let influence = match method {
        Method::BlockInfluence => {
            let bi: Vec<&pb::Distance> = rows(pb::DistanceMetric::BlockInfluence).collect();
            let mut scores = vec![None; bi.len()];
            for d in &bi {
                match scores.get_mut(d.l as usize) {
                    Some(slot) => *slot = Some(d.value),
                    None => {
                        return Err(JobError::spec(
                            "distances",
                            format!("Block Influence of layer {} of {}", d.l, bi.len()),
                        ))
                    }
                }
            }
            let scores: Option<Vec<f64>> = scores.into_iter().collect();
            match scores {
                Some(s) if !s.is_empty() => Some(BlockInfluence { scores: s }),
                _ => return Err(JobError::spec("distances", "the Block Influence table does not cover every layer")),
            }
        }
        _ => None,
    };
    let heal = match spec.heal.as_ref().and_then(|h| h.qlora.as_ref()) {
        Some(q) => Some(heal_spec(q, spec)?),
        None => None,
    };
    Ok(Cell { prune: PruneSpec { method, amount }, distances, influence, heal, eval: eval_specs(&spec.eval)? })
}

fn heal_spec(q: &pb::QLoraSettings, spec: &pb::JobSpec) -> Result<HealSpec, JobError> {
    let field = |f: &str| format!("heal.qlora.{f}");
    for (name, v) in [
        ("rank", q.rank),
        ("steps", q.steps),
        ("batch_size", q.batch_size),
        ("micro_batch_size", q.micro_batch_size),
        ("seq_len", q.seq_len),
        ("checkpoint_every", q.checkpoint_every),
    ] {
        positive(&field(name), v)?;
    }
    let data = q.data_path.clone().ok_or_else(|| JobError::spec(field("data_path"), "missing"))?;
    let config = HealConfig::from_pb(q, spec.seed).map_err(|e| JobError::spec("heal.qlora", e.to_string()))?;
    Ok(HealSpec { data: PathBuf::from(data), first_doc: q.data_first_doc as usize, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell_spec() -> pb::JobSpec {
        let mut q = pb::QLoraSettings::paper();
        q.data_path = Some("c4.jsonl".into());
        pb::JobSpec {
            job_id: 7,
            key: "k".into(),
            kind: pb::JobKind::Cell as i32,
            model: Some(pb::ModelRef { name: "m".into(), source: "m.gguf".into(), ..Default::default() }),
            method: pb::PruneMethod::Deepest as i32,
            amount: Some(pb::job_spec::Amount::N(2)),
            heal: Some(pb::HealSpec { name: "h".into(), qlora: Some(q) }),
            eval: vec![pb::EvalTask::with_defaults(pb::EvalTaskKind::Mmlu, "mmlu")],
            seed: 3,
            ..pb::JobSpec::default()
        }
    }

    #[test]
    fn a_resolved_spec_becomes_typed_stage_specs() {
        let job = Job::try_from(&cell_spec()).unwrap();
        let Work::Cell(cell) = job.work else { panic!("a cell") };
        assert_eq!(cell.prune, PruneSpec { method: Method::Deepest, amount: Amount::N(2) });
        let heal = cell.heal.unwrap();
        assert_eq!(heal.config, HealConfig { seed: 3, ..HealConfig::default() });
        assert_eq!((cell.eval[0].task, cell.eval[0].shots, cell.eval[0].batch), (Task::Mmlu, 5, 8));
    }

    #[test]
    fn missing_or_unknown_values_are_non_retryable_and_named() {
        type Change = Box<dyn Fn(&mut pb::JobSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.kind = 9), "`kind`"),
            (Box::new(|s| s.model = None), "`model`"),
            (Box::new(|s| s.method = 0), "`method`"),
            (Box::new(|s| s.amount = None), "`amount`"),
            (Box::new(|s| s.eval[0].kind = 42), "`eval[0].kind`"),
            (Box::new(|s| s.eval[0].shots = None), "`eval[0].shots`"),
            (Box::new(|s| s.eval[0].batch_size = 0), "`eval[0].batch_size`"),
            (
                Box::new(|s| s.heal.as_mut().unwrap().qlora.as_mut().unwrap().micro_batch_size = 0),
                "`heal.qlora.micro_batch_size`",
            ),
            (Box::new(|s| s.heal.as_mut().unwrap().qlora.as_mut().unwrap().targets = 0), "`heal.qlora`"),
            (Box::new(|s| s.heal.as_mut().unwrap().qlora.as_mut().unwrap().data_path = None), "`heal.qlora.data_path`"),
            (Box::new(|s| s.method = pb::PruneMethod::Angular as i32), "`distances`"),
        ];
        for (change, field) in cases {
            let mut spec = cell_spec();
            change(&mut spec);
            let e = Job::try_from(&spec).unwrap_err();
            assert_eq!((e.kind(), e.is_retryable()), ("invalid_spec", false), "{e}");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn panics_become_retryable_failures_with_their_text() {
        let payload = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        let f = JobError::panicked(payload.as_ref());
        assert_eq!((f.kind(), f.is_retryable()), ("panic", true));
        assert!(f.to_string().contains("boom 1"), "{f}");
        let payload = std::panic::catch_unwind(|| panic!("static text")).unwrap_err();
        assert!(JobError::panicked(payload.as_ref()).to_string().contains("static text"));
    }
}

//! Every conversion between the contract's messages and the coordinator's values, in one place:
//! `From` for what the coordinator sends, checked functions for what it receives.

use prunesweep_proto::v1 as pb;
use prunesweep_proto::Vocabulary;
use tonic::Status;

use crate::job::{JobKind, JobState, SweepState};
use crate::spec::{Amount, JobSpec};
use crate::store::{
    Completion, DistanceRow, Heartbeat, JobResults, JobRow, Provenance, ResultValue, RunningJob, SweepCounts, Timing,
    WorkerRow,
};
use crate::sweep::{CalibrationSpec, EvalTaskSpec, HealVariant, QLoraSpec, TargetModules};

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Blocked => pb::JobState::Blocked,
            JobState::Pending => pb::JobState::Pending,
            JobState::Leased => pb::JobState::Leased,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

impl From<JobKind> for pb::JobKind {
    fn from(k: JobKind) -> Self {
        match k {
            JobKind::Score => pb::JobKind::Score,
            JobKind::Baseline => pb::JobKind::Baseline,
            JobKind::Cell => pb::JobKind::Cell,
        }
    }
}

impl From<SweepState> for pb::SweepState {
    fn from(s: SweepState) -> Self {
        match s {
            SweepState::Active => pb::SweepState::Active,
            SweepState::Cancelled => pb::SweepState::Cancelled,
        }
    }
}

/// A sweep's counts as the contract reports them (no running jobs: `GetSweep` adds those).
pub fn sweep_status(c: &SweepCounts) -> pb::SweepStatus {
    let n = |s| c.count(s);
    pb::SweepStatus {
        name: c.name.clone(),
        state: pb::SweepState::from(c.state) as i32,
        blocked: n(JobState::Blocked),
        pending: n(JobState::Pending),
        leased: n(JobState::Leased),
        succeeded: n(JobState::Succeeded),
        failed: n(JobState::Failed),
        cancelled: n(JobState::Cancelled),
        created_at_ms: c.created_at,
        priority: c.priority,
        running: Vec::new(),
    }
}

impl From<Timing> for pb::PhaseTiming {
    fn from(t: Timing) -> Self {
        pb::PhaseTiming { phase: t.phase, seconds: t.seconds, peak_host_bytes: t.peak_host_bytes }
    }
}

impl From<pb::PhaseTiming> for Timing {
    fn from(t: pb::PhaseTiming) -> Self {
        Timing { phase: t.phase, seconds: t.seconds, peak_host_bytes: t.peak_host_bytes }
    }
}

impl From<&RunningJob> for pb::RunningJob {
    fn from(r: &RunningJob) -> Self {
        pb::RunningJob {
            job_id: r.job_id,
            kind: pb::JobKind::from(r.kind) as i32,
            worker_id: r.worker_id.clone().unwrap_or_default(),
            worker_name: r.worker_name.clone(),
            phase: r.phase.clone(),
            progress: r.progress,
            heartbeat_at_ms: r.heartbeat_at,
            lease_expires_at_ms: r.lease_expires_at,
        }
    }
}

impl From<&WorkerRow> for pb::WorkerStatus {
    fn from(w: &WorkerRow) -> Self {
        pb::WorkerStatus {
            worker_id: w.id.clone(),
            name: w.info.name.clone(),
            device: w.info.device.clone(),
            memory_bytes: w.info.memory_bytes,
            version: w.info.version.clone(),
            registered_at_ms: w.registered_at,
            last_seen_ms: w.last_seen,
            job_id: w.job_id,
            sweep: w.sweep.clone(),
            free_memory_bytes: None,
        }
    }
}

impl From<&CalibrationSpec> for pb::CalibrationData {
    fn from(c: &CalibrationSpec) -> Self {
        pb::CalibrationData { path: c.path.clone(), samples: c.samples, seq_len: c.seq_len, batch_size: c.batch_size }
    }
}

impl From<&QLoraSpec> for pb::QLoraSettings {
    /// Expansion resolved α, micro-batch and warmup; the rules apply again here only for specs
    /// stored before.
    fn from(q: &QLoraSpec) -> Self {
        let (targets, target_modules) = match &q.target_modules {
            TargetModules::Set(set) => (*set, Vec::new()),
            TargetModules::Modules(m) => (pb::AdapterTargets::Modules, m.clone()),
        };
        pb::QLoraSettings {
            rank: q.rank,
            alpha: q.alpha.unwrap_or_else(|| prunesweep_proto::defaults::lora_alpha(q.rank)),
            dropout: q.dropout,
            steps: q.steps,
            learning_rate: q.learning_rate,
            batch_size: q.batch_size,
            seq_len: q.seq_len,
            data_path: q.data.clone(),
            target_modules,
            quantize_base: q.quantize_base,
            micro_batch_size: q
                .micro_batch_size
                .unwrap_or_else(|| prunesweep_proto::defaults::micro_batch_size(q.batch_size)),
            warmup_steps: q.warmup_steps.unwrap_or_else(|| prunesweep_proto::defaults::warmup_steps(q.steps)),
            weight_decay: q.weight_decay,
            max_grad_norm: q.max_grad_norm,
            checkpoint_every: q.checkpoint_every,
            targets: targets as i32,
            schedule: q.schedule as i32,
            data_first_doc: q.data_first_doc,
        }
    }
}

impl From<&HealVariant> for pb::HealSpec {
    fn from(h: &HealVariant) -> Self {
        pb::HealSpec { name: h.name.clone(), qlora: h.qlora.as_ref().map(pb::QLoraSettings::from) }
    }
}

impl From<&EvalTaskSpec> for pb::EvalTask {
    fn from(e: &EvalTaskSpec) -> Self {
        pb::EvalTask {
            kind: e.task as i32,
            path: e.path.clone(),
            limit: e.limit,
            shots: e.shots,
            seq_len: e.seq_len,
            first_doc: e.first_doc,
            limit_per_subject: e.limit_per_subject,
            dev_path: e.dev_path.clone(),
            batch_size: e.batch_size.unwrap_or_default(),
        }
    }
}

fn distance(d: &DistanceRow) -> pb::Distance {
    // Stored from validated completions, so always a known name.
    let metric = pb::DistanceMetric::from_name(&d.metric).unwrap_or(pb::DistanceMetric::Unspecified);
    pb::Distance { metric: metric as i32, n: d.n, l: d.l, value: d.value }
}

/// A job's content as the contract's [`pb::JobSpec`], without the fields only a stored job has
/// (id, sweep, key, distances): what the memory model reads.
pub fn spec_to_pb(s: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        kind: pb::JobKind::from(s.kind) as i32,
        model: Some(pb::ModelRef {
            name: s.model.name.clone(),
            source: s.model.source.clone(),
            revision: s.model.revision.clone(),
            dtype: s.model.dtype.unwrap_or(pb::Dtype::Unspecified) as i32,
        }),
        calibration: s.calibration.as_ref().map(pb::CalibrationData::from),
        method: s.method.unwrap_or(pb::PruneMethod::Unspecified) as i32,
        amount: s.amount.map(|a| match a {
            Amount::Fraction(f) => pb::job_spec::Amount::Fraction(f),
            Amount::N(n) => pb::job_spec::Amount::N(n),
        }),
        heal: s.heal.as_ref().map(pb::HealSpec::from),
        eval: s.eval.iter().map(pb::EvalTask::from).collect(),
        seed: s.seed.unwrap_or_default(),
        spec_json: s.canonical_json(),
        ..pb::JobSpec::default()
    }
}

/// The job spec a worker runs: the stored spec, and the score job's distances for cells that need them.
pub fn job_spec(job: &JobRow, distances: &[DistanceRow]) -> pb::JobSpec {
    pb::JobSpec {
        job_id: job.id,
        sweep: job.sweep.clone(),
        key: job.key.clone(),
        distances: distances.iter().map(distance).collect(),
        ..spec_to_pb(&job.spec)
    }
}

/// One job with its results (and, for a score job, its `distances`), as `ListResults` reports it.
pub fn job_result(j: JobResults, distances: &[DistanceRow]) -> pb::JobResult {
    let spec = job_spec(&j.job, &[]);
    pb::JobResult {
        job_id: j.job.id,
        kind: pb::JobKind::from(j.job.kind) as i32,
        state: pb::JobState::from(j.job.state) as i32,
        spec: Some(spec),
        layers_dropped: j.job.layers_dropped,
        num_layers: j.job.num_layers,
        timings: j.job.timings.into_iter().map(pb::PhaseTiming::from).collect(),
        results: j
            .results
            .into_iter()
            .map(|r| pb::ResultRow { task: r.task, metric: r.metric, value: r.value })
            .collect(),
        error: j.job.error,
        attempts: j.job.attempts,
        provenance: j.job.provenance.map(|p| pb::Provenance {
            model_fingerprint: p.model_fingerprint,
            data_fingerprints: p.data_fingerprints.into_iter().collect(),
            worker_version: p.worker_version,
            worker_commit: p.worker_commit,
            device: p.device,
            dtype: p.dtype,
            wall_seconds: p.wall_seconds,
        }),
        distances: distances.iter().map(distance).collect(),
    }
}

/// A worker's heartbeat. Progress is a display value, so one outside [0, 1] (rounding) is clamped
/// and a non-finite one dropped rather than refused: refusing would stop the worker's job.
pub fn heartbeat(req: pb::HeartbeatRequest, ttl_ms: i64) -> Heartbeat {
    Heartbeat {
        worker_id: req.worker_id,
        lease_id: req.lease_id,
        job_id: req.job_id,
        phase: req.phase,
        progress: req.progress.filter(|p| p.is_finite()).map(|p| p.clamp(0.0, 1.0)),
        ttl_ms,
    }
}

/// A worker's report, checked: every distance row names a metric.
pub fn completion(req: pb::CompleteJobRequest) -> Result<Completion, Status> {
    let mut distances = Vec::with_capacity(req.distances.len());
    for (i, d) in req.distances.into_iter().enumerate() {
        let metric = match d.metric() {
            pb::DistanceMetric::Unspecified => {
                return Err(Status::invalid_argument(format!("distances[{i}].metric is not set")));
            }
            m => m.snake_name(),
        };
        distances.push(DistanceRow { metric, n: d.n, l: d.l, value: d.value });
    }
    Ok(Completion {
        worker_id: req.worker_id,
        job_id: req.job_id,
        lease_id: req.lease_id,
        results: req
            .results
            .into_iter()
            .map(|r| ResultValue { task: r.task, metric: r.metric, value: r.value })
            .collect(),
        distances,
        layers_dropped: req.layers_dropped,
        num_layers: req.num_layers,
        timings: req.timings.into_iter().map(Timing::from).collect(),
        provenance: req.provenance.map(|p| Provenance {
            model_fingerprint: p.model_fingerprint,
            data_fingerprints: p.data_fingerprints.into_iter().collect(),
            worker_version: p.worker_version,
            worker_commit: p.worker_commit,
            device: p.device,
            dtype: p.dtype,
            wall_seconds: p.wall_seconds,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::SweepSpec;

    #[test]
    fn a_leased_spec_carries_every_resolved_setting() {
        let yaml = "name: x\nmodels: [{name: m, path: m}]\nmethods: [deepest]\nn: [1]\nbaseline: false\n\
                    heal: [{name: h, qlora: {rank: 8, steps: 50, data: d.jsonl, target_modules: attention}}]\n\
                    eval: [{task: mmlu, path: mmlu}, {task: c4-loss, path: c4.jsonl, first_doc: 10}]\n";
        let planned = SweepSpec::parse(yaml, "x.yaml").unwrap().expand().remove(0);
        let row = JobRow {
            id: 1,
            sweep: "x".into(),
            key: planned.key.clone(),
            kind: planned.spec.kind,
            spec: planned.spec,
            state: JobState::Leased,
            attempts: 0,
            max_attempts: 3,
            depends_on: None,
            lease_id: None,
            worker_id: None,
            error: None,
            error_kind: None,
            layers_dropped: Vec::new(),
            num_layers: None,
            timings: Vec::new(),
            provenance: None,
        };
        let pb = job_spec(&row, &[]);
        let q = pb.heal.clone().unwrap().qlora.unwrap();
        assert_eq!((q.rank, q.alpha, q.warmup_steps, q.micro_batch_size, q.seq_len), (8, 8.0, 5, 4, 2048));
        assert_eq!((q.targets(), q.schedule()), (pb::AdapterTargets::Attention, pb::LrSchedule::Cosine));
        assert_eq!(pb.eval[0].kind(), pb::EvalTaskKind::Mmlu);
        assert_eq!((pb.eval[0].shots, pb.eval[0].batch_size), (Some(5), 8));
        assert_eq!((pb.eval[1].limit, pb.eval[1].seq_len, pb.eval[1].first_doc), (Some(256), Some(512), Some(10)));
        assert_eq!(pb.method(), pb::PruneMethod::Deepest);
    }
}

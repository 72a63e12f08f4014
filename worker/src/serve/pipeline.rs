//! One job of a sweep, run in this process: load the model (reusing the one already loaded),
//! then score, or evaluate the unpruned model, or prune → heal → evaluate one cell.
//!
//! The job arrives as the contract's [`JobSpec`]; the results leave as its [`ResultRow`]s,
//! [`Distance`]s and [`PhaseTiming`]s. Failures say whether another attempt could succeed: a
//! missing model path or malformed data never will, so the coordinator does not retry them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use prunesweep_proto::v1::{
    job_spec::Amount, Distance, EvalTask, JobKind, JobSpec, PhaseTiming, PruneMethod, ResultRow,
};

use crate::data::{read_document_range, read_documents};
use crate::eval::{boolq, c4_loss, mmlu, EvalReport};
use crate::heal::packing::PackedChunks;
use crate::heal::{eos_id, HealConfig, HealEnd, Trainer};
use crate::model::lora::LoraSpec;
use crate::model::{Model, ModelError};
use crate::prune::{layers_for_fraction, PrunePlan};
use crate::score::{score_layers, AngularDistances, BlockInfluence, Calibration};

/// What a finished job reports (the fields of `CompleteJobRequest`).
#[derive(Debug, Clone, Default)]
pub struct JobOutput {
    /// Evaluation results (baseline, cells).
    pub results: Vec<ResultRow>,
    /// The distance table (score jobs).
    pub distances: Vec<Distance>,
    /// Original indices of the dropped layers (cells).
    pub layers_dropped: Vec<u32>,
    /// The model's layer count before the cut.
    pub num_layers: Option<u32>,
    /// Seconds per phase.
    pub timings: Vec<PhaseTiming>,
}

/// Why a job did not finish (the fields of `FailJobRequest`), or that it was stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFailure {
    /// Stable label: `model_load`, `invalid_spec`, `data`, `runtime`, `stopped`.
    pub kind: &'static str,
    /// What went wrong, naming the file or setting.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

impl JobFailure {
    fn new(kind: &'static str, retryable: bool, message: impl Into<String>) -> Self {
        JobFailure { kind, message: message.into(), retryable }
    }

    fn spec(message: impl Into<String>) -> Self {
        Self::new("invalid_spec", false, message)
    }

    fn stopped() -> Self {
        Self::new("stopped", true, "stopped before it finished (cancelled, lease lost, or worker shutting down)")
    }

    /// A job that panicked: retryable (the sweep's max attempts bound it), with the panic text.
    pub fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Self::new("panic", true, format!("the job panicked: {text}"))
    }

    /// Whether this is the stop requested through [`Progress::stop`].
    pub fn is_stop(&self) -> bool {
        self.kind == "stopped"
    }
}

/// Shared between the job and the heartbeat loop: the phase for heartbeats, and the stop flag
/// that a cancel, a lost lease or a shutdown sets.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<(String, f64)>,
    /// Set to stop the job at the next phase boundary (or healing step, after a checkpoint).
    pub stop: AtomicBool,
}

impl Progress {
    /// The current phase and progress in it, in [0, 1].
    pub fn phase(&self) -> (String, f64) {
        self.phase.lock().expect("never poisoned").clone()
    }

    fn set(&self, phase: &str, fraction: f64) {
        *self.phase.lock().expect("never poisoned") = (phase.to_string(), fraction.clamp(0.0, 1.0));
    }

    fn check(&self) -> Result<(), JobFailure> {
        if self.stop.load(Ordering::SeqCst) {
            Err(JobFailure::stopped())
        } else {
            Ok(())
        }
    }
}

/// Runs jobs on one device, keeping the last model loaded (sweeps lease a model's jobs to the
/// worker that holds it).
pub struct Pipeline {
    device: Device,
    work_dir: PathBuf,
    loaded: Option<(String, Model)>,
}

fn timing(phase: &str, since: Instant) -> PhaseTiming {
    PhaseTiming { phase: phase.to_string(), seconds: since.elapsed().as_secs_f64() }
}

fn model_failure(source: &str, e: ModelError) -> JobFailure {
    match e {
        // A tensor op failing mid-load (out of memory, a device error) may pass on another try.
        ModelError::Candle(e) => JobFailure::new("runtime", true, format!("loading {source}: {e}")),
        other => JobFailure::new("model_load", false, other.to_string()),
    }
}

impl Pipeline {
    /// A pipeline on `device`; healing checkpoints go under `work_dir/jobs/<job key>/`.
    pub fn new(device: Device, work_dir: PathBuf) -> Self {
        Pipeline { device, work_dir, loaded: None }
    }

    /// Drops the loaded model (after a panic it may be half-changed).
    pub fn forget_model(&mut self) {
        self.loaded = None;
    }

    /// Model sources held in memory (the affinity hint of `LeaseJob`).
    pub fn held_models(&self) -> Vec<String> {
        self.loaded.iter().map(|(s, _)| s.clone()).collect()
    }

    /// The job's model, fresh (unpruned, no adapters); loaded once and cloned (weights are shared).
    fn model(&mut self, source: &str) -> Result<Model, JobFailure> {
        if self.loaded.as_ref().map(|(s, _)| s.as_str()) != Some(source) {
            self.loaded = None;
            let model = Model::load(Path::new(source), &self.device).map_err(|e| model_failure(source, e))?;
            self.loaded = Some((source.to_string(), model));
        }
        Ok(self.loaded.as_ref().expect("just loaded").1.clone())
    }

    /// Runs one job to completion, or until `progress.stop` is set.
    pub fn run(&mut self, job: &JobSpec, progress: &Progress) -> Result<JobOutput, JobFailure> {
        let source =
            job.model.as_ref().map(|m| m.source.clone()).ok_or_else(|| JobFailure::spec("the job has no model"))?;
        let mut out = JobOutput::default();
        progress.set("load", 0.0);
        let t = Instant::now();
        let mut model = self.model(&source)?;
        out.timings.push(timing("load", t));
        out.num_layers = Some(model.decoder.num_blocks() as u32);
        progress.check()?;
        match JobKind::try_from(job.kind).unwrap_or(JobKind::Unspecified) {
            JobKind::Score => self.score(job, &model, progress, &mut out)?,
            JobKind::Baseline => evaluate(&job.eval, &model, progress, &mut out)?,
            JobKind::Cell => {
                self.prune(job, &mut model, &mut out)?;
                progress.check()?;
                self.heal(job, &mut model, progress, &mut out)?;
                progress.check()?;
                evaluate(&job.eval, &model, progress, &mut out)?;
            }
            JobKind::Unspecified => return Err(JobFailure::spec(format!("job {} has no kind", job.job_id))),
        }
        Ok(out)
    }

    fn score(&self, job: &JobSpec, model: &Model, progress: &Progress, out: &mut JobOutput) -> Result<(), JobFailure> {
        let cal = job.calibration.as_ref().ok_or_else(|| JobFailure::spec("a score job needs calibration data"))?;
        progress.set("score", 0.0);
        let t = Instant::now();
        let data_err = |e: String| JobFailure::new("data", false, e);
        let docs =
            read_documents(Path::new(&cal.path), Some(cal.samples as usize)).map_err(|e| data_err(e.to_string()))?;
        let calibration = Calibration::from_documents(&model.tokenizer, &docs, cal.seq_len as usize)
            .map_err(|e| data_err(e.to_string()))?;
        let total = calibration.tokens().max(1);
        let scores = score_layers(&model.decoder, &calibration, 8, &mut |done| {
            progress.set("score", done as f64 / total as f64)
        })
        .map_err(|e| JobFailure::new("runtime", true, e.to_string()))?;
        let layers = scores.distances.num_layers;
        for n in 1..=layers {
            for l in 0..=layers - n {
                out.distances.push(Distance {
                    metric: "angular".into(),
                    n: n as u32,
                    l: l as u32,
                    value: scores.distances.get(n, l),
                });
            }
        }
        for (l, &v) in scores.influence.scores.iter().enumerate() {
            out.distances.push(Distance { metric: "block_influence".into(), n: 1, l: l as u32, value: v });
        }
        out.timings.push(timing("score", t));
        Ok(())
    }

    fn prune(&self, job: &JobSpec, model: &mut Model, out: &mut JobOutput) -> Result<(), JobFailure> {
        let t = Instant::now();
        let layers = model.decoder.num_blocks();
        let n = match job.amount {
            Some(Amount::Fraction(f)) => layers_for_fraction(f, layers).map_err(|e| JobFailure::spec(e.to_string()))?,
            Some(Amount::N(n)) => n as usize,
            None => return Err(JobFailure::spec("a cell needs a fraction or n")),
        };
        let rows = |metric: &str| -> Vec<&Distance> { job.distances.iter().filter(|d| d.metric == metric).collect() };
        let plan = match PruneMethod::try_from(job.method).unwrap_or(PruneMethod::Unspecified) {
            PruneMethod::Deepest => PrunePlan::deepest(layers, n),
            PruneMethod::Angular => {
                let entries: Vec<(usize, usize, f64)> =
                    rows("angular").iter().map(|d| (d.n as usize, d.l as usize, d.value)).collect();
                let table = AngularDistances::from_entries(&entries)
                    .map_err(|e| JobFailure::spec(format!("the job's angular distances: {e}")))?;
                if table.num_layers != layers {
                    return Err(JobFailure::spec(format!(
                        "the distances are for {} layers, the model has {layers}",
                        table.num_layers
                    )));
                }
                PrunePlan::angular(&table, n)
            }
            PruneMethod::BlockInfluence => {
                let mut scores = vec![f64::NAN; layers];
                for d in rows("block_influence") {
                    if let Some(s) = scores.get_mut(d.l as usize) {
                        *s = d.value;
                    }
                }
                if scores.iter().any(|s| s.is_nan()) {
                    return Err(JobFailure::spec(format!(
                        "the job's Block Influence table does not cover all {layers} layers"
                    )));
                }
                PrunePlan::block_influence(&BlockInfluence { scores }, n)
            }
            PruneMethod::Unspecified => return Err(JobFailure::spec("a cell needs a method")),
        }
        .map_err(|e| JobFailure::spec(e.to_string()))?;
        model.decoder.remove_layers(&plan.dropped).map_err(|e| JobFailure::spec(e.to_string()))?;
        out.layers_dropped = plan.dropped.iter().map(|&l| l as u32).collect();
        out.timings.push(timing("prune", t));
        Ok(())
    }

    fn heal(
        &self,
        job: &JobSpec,
        model: &mut Model,
        progress: &Progress,
        out: &mut JobOutput,
    ) -> Result<(), JobFailure> {
        let Some(q) = job.heal.as_ref().and_then(|h| h.qlora.as_ref()) else { return Ok(()) };
        progress.set("heal", 0.0);
        let t = Instant::now();
        let data = q
            .data_path
            .clone()
            .or_else(|| job.calibration.as_ref().map(|c| c.path.clone()))
            .ok_or_else(|| JobFailure::spec("healing needs data (qlora.data_path or the calibration data)"))?;
        let steps = q.steps as usize;
        let batch = (q.batch_size as usize).max(1);
        let targets =
            if q.target_modules.is_empty() { model.decoder.adapter_targets() } else { q.target_modules.clone() };
        let cfg = HealConfig {
            steps,
            batch,
            micro_batch: batch,
            seq_len: q.seq_len as usize,
            lora: LoraSpec { rank: q.rank as usize, alpha: q.alpha, dropout: q.dropout as f32, targets },
            lr: q.learning_rate,
            // The paper's 100 warmup steps, kept to a tenth of short runs.
            warmup: (steps / 10).min(100),
            seed: job.seed,
            checkpoint_every: 50,
            quantize: q.quantize_base,
            ..HealConfig::default()
        };
        let spec_err = |e: crate::heal::HealError| JobFailure::spec(e.to_string());
        cfg.validate().map_err(spec_err)?;
        let docs = read_documents(Path::new(&data), None).map_err(|e| JobFailure::new("data", false, e.to_string()))?;
        let eos = eos_id(model).map_err(spec_err)?;
        let chunks = PackedChunks::pack(&model.tokenizer, &docs, eos, cfg.seq_len, steps * batch)
            .map_err(|e| JobFailure::new("data", false, e.to_string()))?;
        // Per job key: a re-leased job (after preemption) resumes from its checkpoint.
        let dir = self.work_dir.join("jobs").join(&job.key).join("heal");
        let identity = serde_json::json!({ "job": job.key, "kept_layers": model.decoder.kept_layers() });
        let mut trainer = Trainer::new(model, cfg, chunks, &dir, identity, true).map_err(|e| match e {
            crate::heal::HealError::Checkpoint { .. } => JobFailure::new("checkpoint", false, e.to_string()),
            other => spec_err(other),
        })?;
        let end = trainer
            .run(&progress.stop, &mut |s| progress.set("heal", s.step as f64 / steps.max(1) as f64))
            .map_err(|e| JobFailure::new("heal", matches!(e, crate::heal::HealError::Candle(_)), e.to_string()))?;
        if end == HealEnd::Preempted {
            return Err(JobFailure::stopped());
        }
        out.timings.push(timing("heal", t));
        Ok(())
    }
}

/// Runs every evaluation task of the job and appends its metrics.
fn evaluate(tasks: &[EvalTask], model: &Model, progress: &Progress, out: &mut JobOutput) -> Result<(), JobFailure> {
    let t = Instant::now();
    for (i, task) in tasks.iter().enumerate() {
        progress.check()?;
        progress.set("eval", i as f64 / tasks.len().max(1) as f64);
        let report = eval_task(task, model)?;
        let mut push = |metric: &str, value: f64| {
            out.results.push(ResultRow { task: task.task.clone(), metric: metric.into(), value })
        };
        if let Some(a) = report.accuracy {
            push("accuracy", a);
        }
        if let Some(l) = report.loss {
            push("loss", l);
        }
        if let Some(l) = report.normalized_loss {
            push("normalized_loss", l);
        }
        push("n", report.n as f64);
    }
    out.timings.push(timing("eval", t));
    Ok(())
}

fn eval_task(task: &EvalTask, model: &Model) -> Result<EvalReport, JobFailure> {
    let path = Path::new(&task.path);
    let limit = task.limit.map(|l| l as usize);
    let data_err =
        |e: crate::eval::EvalError| JobFailure::new("data", false, format!("{} ({}): {e}", task.task, task.path));
    let batch = 8;
    match task.task.as_str() {
        "mmlu" | "mmlu-cloze" => {
            let mut data = mmlu::MmluData::load(path, task.dev_path.as_deref().map(Path::new)).map_err(data_err)?;
            data.truncate(task.limit_per_subject.map(|k| k as usize), limit);
            if task.task == "mmlu" {
                mmlu::evaluate_letter(model, &data, task.shots.unwrap_or(5) as usize, batch, &mut |_| {})
            } else {
                mmlu::evaluate_cloze(model, &data, batch, &mut |_| {})
            }
            .map_err(data_err)
        }
        "boolq" => {
            let mut items = boolq::load(path).map_err(data_err)?;
            items.truncate(limit.unwrap_or(usize::MAX));
            boolq::evaluate(model, &items, batch, &mut |_| {}).map_err(data_err)
        }
        "c4-loss" => {
            let docs = read_document_range(path, task.first_doc.unwrap_or(0) as usize, Some(limit.unwrap_or(256)))
                .map_err(|e| JobFailure::new("data", false, e.to_string()))?;
            c4_loss::evaluate(model, &docs, task.seq_len.unwrap_or(512) as usize, batch, &mut |_| {}).map_err(data_err)
        }
        other => Err(JobFailure::spec(format!("unknown eval task `{other}`; known: mmlu, mmlu-cloze, boolq, c4-loss"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_retryable_failures_with_their_text() {
        let payload = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        let f = JobFailure::panicked(payload.as_ref());
        assert_eq!((f.kind, f.retryable), ("panic", true));
        assert!(f.message.contains("boom 1"), "{}", f.message);
        let payload = std::panic::catch_unwind(|| panic!("static text")).unwrap_err();
        assert!(JobFailure::panicked(payload.as_ref()).message.contains("static text"));
    }

    #[test]
    fn loss_tasks_start_at_first_doc() {
        let model = Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama"), &Device::Cpu)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        let docs = ["The first document.", "A second one, longer than the first.", "Third: held out.", "Fourth."];
        std::fs::write(&path, docs.map(|d| format!("{{\"text\": \"{d}\"}}\n")).concat()).unwrap();
        let task = |first_doc| EvalTask {
            task: "c4-loss".into(),
            path: path.display().to_string(),
            limit: Some(1),
            seq_len: Some(16),
            first_doc,
            ..EvalTask::default()
        };
        let held_out = eval_task(&task(Some(2)), &model).unwrap();
        let direct = c4_loss::evaluate(&model, &[docs[2].to_string()], 16, 8, &mut |_| {}).unwrap();
        assert_eq!((held_out.n, held_out.loss), (1, direct.loss));
        assert_ne!(eval_task(&task(None), &model).unwrap().loss, direct.loss, "unset starts at document 0");
        let f = eval_task(&task(Some(4)), &model).unwrap_err();
        assert_eq!((f.kind, f.retryable), ("data", false));
        assert!(f.message.contains("none from document 4 on; lower `first_doc`"), "{}", f.message);
    }

    #[test]
    fn a_job_without_a_model_or_kind_is_an_invalid_spec() {
        let mut p = Pipeline::new(Device::Cpu, std::env::temp_dir());
        let f = p.run(&JobSpec::default(), &Progress::default()).unwrap_err();
        assert_eq!((f.kind, f.retryable), ("invalid_spec", false));
    }
}

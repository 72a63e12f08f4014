//! One job of a sweep, run in this process: load the model (reusing the one already loaded),
//! then score, or evaluate the unpruned model, or prune → heal → evaluate one cell.
//!
//! The job arrives validated ([`Job`]); each stage is the same `run` the CLI calls
//! ([`score::run`], [`prune::run`], [`heal::prepare`], [`eval::run`]). The results leave as the
//! contract's [`ResultRow`]s, [`Distance`]s and [`PhaseTiming`]s; failures are [`JobError`]s,
//! which say whether another attempt could succeed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device};
use prunesweep_proto::v1::{Distance, DistanceMetric, JobSpec, PhaseTiming, ResultRow};

use crate::eval::{self, EvalReport, EvalSpec, Task};
use crate::heal::{self, HealEnd, HealError, HealSpec, Recompute};
use crate::job::{Cell, FileKind, Job, JobError, Work};
use crate::model::weights::ModelSource;
use crate::model::{default_dtype, streamed, Model, ModelError};
use crate::peak_memory::PeakWindow;
use crate::prune::{self, LayerScores, PruneError};
use crate::score::{self, ScoreSpec};
use crate::serve::roots::Roots;
use crate::serve::state_room;

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
    /// What made the result: fingerprints, worker build, device, dtype, wall time.
    pub provenance: Option<prunesweep_proto::v1::Provenance>,
}

/// Shared between the job and the heartbeat loop: the phase for heartbeats, and the stop flag
/// that a cancel, a lost lease or a shutdown sets.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<(String, f64)>,
    /// When the current phase started, and the tokens it has processed so far.
    tokens: Mutex<Option<(Instant, u64)>>,
    /// Set to stop the job at the next phase boundary (or healing step, after a checkpoint).
    pub stop: AtomicBool,
}

impl Progress {
    /// The current phase and progress in it, in [0, 1].
    pub fn phase(&self) -> (String, f64) {
        self.phase.lock().expect("never poisoned").clone()
    }

    fn set(&self, phase: &str, fraction: f64) {
        let mut current = self.phase.lock().expect("never poisoned");
        if current.0 != phase {
            *self.tokens.lock().expect("never poisoned") = None;
        }
        *current = (phase.to_string(), fraction.clamp(0.0, 1.0));
    }

    /// The current phase has processed `tokens` tokens so far (its first call starts the clock).
    fn set_tokens(&self, tokens: u64) {
        let mut t = self.tokens.lock().expect("never poisoned");
        let start = t.map_or_else(Instant::now, |(start, _)| start);
        *t = Some((start, tokens));
    }

    /// Tokens per second in the current phase so far, if it counts tokens.
    pub fn tokens_per_second(&self) -> Option<f64> {
        let (start, tokens) = (*self.tokens.lock().expect("never poisoned"))?;
        let secs = start.elapsed().as_secs_f64();
        (tokens > 0 && secs > 0.0).then(|| tokens as f64 / secs)
    }

    fn check(&self) -> Result<(), JobError> {
        if self.stop.load(Ordering::SeqCst) {
            Err(JobError::Stopped)
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
    roots: Roots,
    /// The last model loaded (one at a time: a QLoRA cell's NF4 base replaces the dense model).
    loaded: Option<Loaded>,
    /// At most this much of the device's memory is counted as free (`None`: all of it).
    memory_budget: Option<u64>,
    /// Which blocks of a healing cell keep their graphs ([`Pipeline::with_recompute`]).
    recompute: Recompute,
    /// Host memory the loaded model may keep residual states in between jobs
    /// ([`crate::model::state_cache`]).
    state_cache: u64,
    /// The contract's spec of the job about to run ([`Pipeline::expect`]): its predicted peak
    /// bounds the state cache while it runs ([`super::state_room`]).
    expected: Option<JobSpec>,
}

/// The default of [`Pipeline::with_state_cache`] and `worker serve --state-cache-gib`: 4 GiB of
/// host memory. The states of one boundary take tokens × hidden size × dtype bytes: for C4 loss
/// on 64 documents of up to 256 tokens, BoolQ on 200 items and cloze on 114 questions (53k tokens
/// in all), 116 MiB on SmolLM2-135M in f32 (so the 14 boundaries it keeps and the cuts' own fit)
/// and 412 MiB on a 7B model in bf16 (about ten; the least recently used go first).
pub const DEFAULT_STATE_CACHE_BYTES: u64 = 4 << 30;

/// A loaded model and what it was loaded as, so that a job asking for the same is given a clone.
struct Loaded {
    source: String,
    dtype: DType,
    /// Whether the block projections are NF4 (a QLoRA cell's frozen base, [`Model::load_nf4`]).
    nf4: bool,
    model: Model,
}

/// A phase of a job being timed: its wall time and the process's peak resident memory over it.
struct PhaseClock {
    started: Instant,
    peak: PeakWindow,
}

impl PhaseClock {
    /// Starts timing a phase (and resets the process's peak memory: one phase at a time).
    fn start() -> Self {
        PhaseClock { started: Instant::now(), peak: PeakWindow::start() }
    }

    /// The phase's timing, as the contract reports it.
    fn finish(self, phase: &str) -> PhaseTiming {
        PhaseTiming {
            phase: phase.to_string(),
            seconds: self.started.elapsed().as_secs_f64(),
            peak_host_bytes: self.peak.peak_bytes(),
        }
    }
}

fn model_failure(source: &str, e: ModelError) -> JobError {
    match e {
        // A tensor op failing mid-load (out of memory, a device error) may pass on another try.
        ModelError::Candle(e) => JobError::Runtime(format!("loading {source}: {e}")),
        other => JobError::ModelLoad(other.to_string()),
    }
}

fn prune_failure(e: PruneError) -> JobError {
    match e {
        PruneError::NoMethod | PruneError::NoScores(_) => {
            JobError::Spec { field: "method".into(), message: e.to_string() }
        }
        other => JobError::Unfit(other.to_string()),
    }
}

fn heal_failure(e: HealError) -> JobError {
    match e {
        HealError::Candle(_) => JobError::Runtime(e.to_string()),
        HealError::Checkpoint { .. } | HealError::Io { .. } => JobError::Checkpoint(e.to_string()),
        HealError::Data(_) => JobError::Data(e.to_string()),
        HealError::NonFinite { .. } => JobError::Diverged(e.to_string()),
        HealError::Config(_) | HealError::Model(_) => JobError::Unfit(e.to_string()),
    }
}

fn eval_failure(spec: &EvalSpec, e: eval::EvalError) -> JobError {
    let message = format!("{} ({}): {e}", spec.task.name(), spec.data.display());
    match e {
        eval::EvalError::Candle(_) => JobError::Runtime(message),
        _ => JobError::Data(message),
    }
}

impl Pipeline {
    /// A pipeline on `device` that reads only under `roots`; healing checkpoints go under
    /// `work_dir/jobs/<job key>/`.
    pub fn new(device: Device, work_dir: PathBuf, roots: Roots) -> Self {
        Pipeline {
            device,
            work_dir,
            roots,
            loaded: None,
            memory_budget: None,
            recompute: Recompute::Fit,
            state_cache: DEFAULT_STATE_CACHE_BYTES,
            expected: None,
        }
    }

    /// Tells the pipeline the contract's spec of the job it runs next, so that the held model's
    /// kept states leave that job's predicted peak free ([`super::state_room`]).
    pub fn expect(&mut self, spec: &JobSpec) {
        self.expected = Some(spec.clone());
    }

    /// Bytes of the device's memory the held model's kept states take now: free as far as a next
    /// job is concerned, since they are dropped to make room for it ([`super::state_room`]).
    pub fn reclaimable_bytes(&self) -> u64 {
        self.loaded.as_ref().map_or(0, |l| state_room::reclaimable(l.model.decoder.state_cache(), &self.device))
    }

    /// Lets the loaded model keep up to `bytes` of evaluation passes' residual states in host
    /// memory, so that a cell's evaluation starts where its cut begins instead of recomputing the
    /// blocks before it (0: keep nothing).
    pub fn with_state_cache(mut self, bytes: u64) -> Self {
        self.state_cache = bytes;
        self
    }

    /// Counts at most `bytes` of the device's memory as free when deciding whether a model fits
    /// (a device shared with other work; tests).
    pub fn with_memory_budget(mut self, bytes: Option<u64>) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Which blocks of a healing cell keep their activations for the backward pass (default
    /// [`Recompute::Fit`]: as many of the top ones as the free memory, at most the budget,
    /// holds; the rest are recomputed).
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }

    /// Drops the loaded model (after a panic it may be half-changed).
    pub fn forget_model(&mut self) {
        self.loaded = None;
    }

    /// Model sources held in memory (the affinity hint of `LeaseJob`).
    pub fn held_models(&self) -> Vec<String> {
        self.loaded.iter().map(|l| l.source.clone()).collect()
    }

    /// The job's model, fresh (unpruned, no adapters), in `dtype` (`None`: the device's own), its
    /// block projections in NF4 when `nf4` (quantized as they are read: the dense model is never
    /// held, which is what lets a QLoRA cell of a model larger than the device run); loaded once
    /// and cloned (weights are shared). The model held before is dropped first.
    fn model(&mut self, source: &str, dtype: Option<DType>, nf4: bool) -> Result<Model, JobError> {
        self.release_unless(source, dtype, nf4);
        let dtype = dtype.unwrap_or_else(|| default_dtype(&self.device));
        if self.loaded.is_none() {
            let path = Path::new(source);
            let model = if nf4 {
                Model::load_nf4(path, &self.device, dtype)
            } else {
                Model::load_as(path, &self.device, dtype)
            }
            .map_err(|e| model_failure(source, e))?;
            self.loaded = Some(Loaded { source: source.to_string(), dtype, nf4, model });
        }
        let model = &self.loaded.as_ref().expect("just loaded").model;
        state_room::fit(&model.decoder, self.state_cache, &self.device, self.expected.take().as_ref());
        Ok(model.clone())
    }

    /// Drops the held model unless it is `source` loaded as [`Pipeline::model`] would load it.
    fn release_unless(&mut self, source: &str, dtype: Option<DType>, nf4: bool) {
        let dtype = dtype.unwrap_or_else(|| default_dtype(&self.device));
        if !matches!(&self.loaded, Some(l) if l.source == source && l.dtype == dtype && l.nf4 == nf4) {
            self.loaded = None;
        }
    }

    /// Runs one job to completion, or until `progress.stop` is set; the output carries its
    /// provenance ([`crate::provenance`]).
    pub fn run(&mut self, job: &Job, progress: &Progress) -> Result<JobOutput, JobError> {
        let started = Instant::now();
        let mut out = self.run_job(job, progress)?;
        let data = job.files().into_iter().filter(|(_, kind, _)| *kind == FileKind::Data).map(|(_, _, path)| path);
        let dtype = job.dtype.unwrap_or_else(|| default_dtype(&self.device));
        let seconds = started.elapsed().as_secs_f64();
        // The model as its load resolved it; only a layer-streamed score job resolves it here.
        let resolved = match &self.loaded {
            Some(l) if l.source == job.model => Ok(l.model.source.clone()),
            _ => ModelSource::resolve(Path::new(&job.model)).map_err(|e| e.to_string()),
        };
        out.provenance = Some(crate::provenance::provenance(
            resolved.as_ref().map_err(String::clone),
            data,
            &self.device,
            dtype,
            seconds,
        ));
        Ok(out)
    }

    fn run_job(&mut self, job: &Job, progress: &Progress) -> Result<JobOutput, JobError> {
        let mut out = JobOutput::default();
        self.roots.check(job)?;
        // A model too big to load whole is scored layer by layer, or evaluated with the blocks
        // that do not fit read per pass; a healed cell needs every block held, so it loads whole.
        let healed = matches!(&job.work, Work::Cell(c) if c.heal.is_some());
        let too_big = !healed && self.too_big_to_load(job)?;
        if let (true, Work::Score(spec)) = (too_big, &job.work) {
            return self.score_streamed(job, spec, progress, out);
        }
        progress.set("load", 0.0);
        let nf4_base = matches!(&job.work, Work::Cell(c) if c.heal.as_ref().is_some_and(|h| h.config.quantize));
        // A held model this job cannot use goes before the phase's peak is reset: the load
        // phase's peak is this job's model, not the last job's.
        if !too_big {
            self.release_unless(&job.model, job.dtype, nf4_base);
        }
        let t = PhaseClock::start();
        let mut model = if too_big { self.offloaded_model(job)? } else { self.model(&job.model, job.dtype, nf4_base)? };
        out.timings.push(t.finish("load"));
        out.num_layers = Some(model.decoder.num_blocks() as u32);
        progress.check()?;
        match &job.work {
            Work::Score(spec) => score_model(spec, &model, progress, &mut out)?,
            Work::Baseline(tasks) => {
                self.hold_what_fits(&mut model, &mut out)?;
                evaluate(tasks, &model, progress, &mut out)?
            }
            Work::Cell(cell) => {
                prune_model(cell, &mut model, &mut out)?;
                self.hold_what_fits(&mut model, &mut out)?;
                progress.check()?;
                if let Some(spec) = &cell.heal {
                    self.heal(job, spec, &mut model, progress, &mut out)?;
                    progress.check()?;
                }
                evaluate(&cell.eval, &model, progress, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Whether `job`'s model, not loaded yet, would not fit its device: its weights in the job's
    /// dtype take more than 90% of the device's free memory (host RAM for a CPU worker). Such a
    /// score job runs layer by layer instead ([`score::run_streamed`]), and an evaluation with
    /// the blocks that do not fit read for each pass ([`Pipeline::offloaded_model`]).
    /// A different model held now is dropped first (every path then loads `job`'s), so that its
    /// memory counts as free.
    fn too_big_to_load(&mut self, job: &Job) -> Result<bool, JobError> {
        if self.loaded.as_ref().is_some_and(|l| l.source == job.model) {
            return Ok(false);
        }
        self.loaded = None;
        let dtype = job.dtype.unwrap_or_else(|| default_dtype(&self.device));
        let needed =
            streamed::checkpoint_bytes(Path::new(&job.model), dtype).map_err(|e| model_failure(&job.model, e))?;
        Ok(match (needed, self.free_memory()) {
            (Some(needed), Some(free)) => needed as f64 > 0.9 * free as f64,
            _ => false,
        })
    }

    /// The device's free memory now, at most the configured budget (`None`: unknown).
    fn free_memory(&self) -> Option<u64> {
        match (crate::device::free_memory(&self.device), self.memory_budget) {
            (Some(free), Some(budget)) => Some(free.min(budget)),
            (free, budget) => free.or(budget),
        }
    }

    /// `job`'s model for an evaluation it does not fit the device for: the embedding and LM head
    /// loaded, every block left in the checkpoint ([`Model::load_offloaded`]) until
    /// [`Pipeline::hold_what_fits`] reads those that fit. Not kept for the next job.
    fn offloaded_model(&mut self, job: &Job) -> Result<Model, JobError> {
        self.loaded = None;
        let dtype = job.dtype.unwrap_or_else(|| default_dtype(&self.device));
        Model::load_offloaded(Path::new(&job.model), &self.device, dtype).map_err(|e| model_failure(&job.model, e))
    }

    /// Reads into device memory as many of `model`'s offloaded blocks as the free memory holds
    /// beside the job's evaluation ([`state_room::resident_budget`]); the others are read from the
    /// checkpoint for each pass. Timed as the phase `hold`; nothing to do for a model loaded whole.
    fn hold_what_fits(&self, model: &mut Model, out: &mut JobOutput) -> Result<(), JobError> {
        let offloaded = model.decoder.offloaded_blocks();
        if offloaded == 0 {
            return Ok(());
        }
        let t = PhaseClock::start();
        let budget = state_room::resident_budget(
            &self.device,
            self.expected.as_ref(),
            model.decoder.cfg.shape(),
            self.free_memory(),
        );
        let (held, bytes) = model.decoder.make_resident(budget).map_err(|e| model_failure(&model.describe(), e))?;
        let timing = t.finish("hold");
        tracing::info!(
            model = %model.describe(),
            held,
            held_gib = format!("{:.2}", bytes as f64 / f64::from(1u32 << 30)),
            read_per_pass = offloaded - held,
            seconds = format!("{:.1}", timing.seconds),
            "the model does not fit the device's free memory whole: blocks that do not fit are read from the \
             checkpoint for each evaluation pass"
        );
        out.timings.push(timing);
        Ok(())
    }

    /// A score job on a model too large for the device: scored layer by layer, never loaded whole
    /// (and not kept for the next job).
    fn score_streamed(
        &mut self,
        job: &Job,
        spec: &ScoreSpec,
        progress: &Progress,
        mut out: JobOutput,
    ) -> Result<JobOutput, JobError> {
        self.loaded = None;
        tracing::info!(model = %job.model, "the model does not fit the device's free memory: scoring it layer by layer");
        progress.set("score", 0.0);
        let t = PhaseClock::start();
        let dtype = job.dtype.unwrap_or_else(|| default_dtype(&self.device));
        let (_, scores) = score::run_streamed(Path::new(&job.model), &self.device, dtype, spec, &mut |done, total| {
            progress.set("score", done as f64 / total.max(1) as f64)
        })
        .map_err(score_failure)?;
        out.num_layers = Some(scores.distances.num_layers as u32);
        report_scores(&scores, &mut out)?;
        out.timings.push(t.finish("score"));
        Ok(out)
    }

    fn heal(
        &self,
        job: &Job,
        spec: &HealSpec,
        model: &mut Model,
        progress: &Progress,
        out: &mut JobOutput,
    ) -> Result<(), JobError> {
        progress.set("heal", 0.0);
        let t = PhaseClock::start();
        // Per job key: a re-leased job (after preemption) resumes from its checkpoint.
        let dir = self.work_dir.join("jobs").join(&job.key).join("heal");
        let identity = serde_json::json!({ "job": job.key, "kept_layers": model.decoder.kept_layers() });
        let steps = spec.config.steps.max(1);
        if dir.join(heal::CHECKPOINT_FILE).is_file() {
            tracing::info!(
                job = %job.key,
                dir = %dir.display(),
                "resuming from the healing checkpoint an earlier attempt of this job left in the work dir (this \
                 worker's, or another worker's on a shared work dir)"
            );
        }
        let mut spec = spec.clone();
        spec.config.recompute = self.recompute;
        let mut trainer = heal::prepare(model, &spec, &dir, identity, true).map_err(heal_failure)?;
        // The top blocks keep their graphs in what this worker's budget leaves free.
        let kept_graphs = trainer.fit_graphs(self.free_memory());
        tracing::info!(job = %job.key, kept_graphs, "healing (the blocks below the top `kept_graphs` are recomputed)");
        let end = trainer
            .run(&progress.stop, &mut |s| {
                progress.set("heal", s.step as f64 / steps as f64);
                progress.set_tokens(s.tokens as u64);
            })
            .map_err(heal_failure)?;
        if end == HealEnd::Preempted {
            return Err(JobError::Stopped);
        }
        out.timings.push(t.finish("heal"));
        Ok(())
    }
}

fn score_failure(e: score::ScoreError) -> JobError {
    match e {
        score::ScoreError::Candle(_) => JobError::Runtime(e.to_string()),
        score::ScoreError::Model(ModelError::Candle(_)) => JobError::Runtime(e.to_string()),
        score::ScoreError::Model(_) => JobError::ModelLoad(e.to_string()),
        other => JobError::Data(other.to_string()),
    }
}

fn score_model(spec: &ScoreSpec, model: &Model, progress: &Progress, out: &mut JobOutput) -> Result<(), JobError> {
    progress.set("score", 0.0);
    let t = PhaseClock::start();
    progress.set_tokens(0);
    let (_, scores) = score::run(&model.decoder, &model.tokenizer, spec, &mut |done, total| {
        progress.set("score", done as f64 / total.max(1) as f64);
        progress.set_tokens(done as u64);
    })
    .map_err(score_failure)?;
    report_scores(&scores, out)?;
    out.timings.push(t.finish("score"));
    Ok(())
}

/// The distance table and Block Influence as the contract's rows; a value that is not finite
/// fails the job instead.
fn report_scores(scores: &score::Scores, out: &mut JobOutput) -> Result<(), JobError> {
    let layers = scores.distances.num_layers;
    let all_scores = scores.influence.scores.iter().chain((1..=layers).flat_map(|n| scores.distances.row(n)));
    if let Some(bad) = all_scores.copied().find(|v| !v.is_finite()) {
        return Err(JobError::NotFinite(format!(
            "a layer score came out {bad}: the model's residual stream is not finite"
        )));
    }
    for n in 1..=layers {
        for l in 0..=layers - n {
            out.distances.push(Distance {
                metric: DistanceMetric::Angular as i32,
                n: n as u32,
                l: l as u32,
                value: scores.distances.get(n, l),
            });
        }
    }
    for (l, &v) in scores.influence.scores.iter().enumerate() {
        out.distances.push(Distance { metric: DistanceMetric::BlockInfluence as i32, n: 1, l: l as u32, value: v });
    }
    Ok(())
}

fn prune_model(cell: &Cell, model: &mut Model, out: &mut JobOutput) -> Result<(), JobError> {
    let t = PhaseClock::start();
    let scores = LayerScores { distances: cell.distances.as_ref(), influence: cell.influence.as_ref() };
    let plan = cell.prune.plan(model.decoder.num_blocks(), scores).map_err(prune_failure)?;
    let dropped = prune::run(&mut model.decoder, &plan).map_err(|e| JobError::Unfit(e.to_string()))?;
    out.layers_dropped = dropped.iter().map(|&l| l as u32).collect();
    out.timings.push(t.finish("prune"));
    Ok(())
}

/// A report's metrics as result rows; a value that is not finite fails the job instead.
fn result_rows(task: Task, report: &EvalReport) -> Result<Vec<ResultRow>, JobError> {
    let metrics = [
        ("accuracy", report.accuracy),
        ("loss", report.loss),
        ("normalized_loss", report.normalized_loss),
        ("n", Some(report.n as f64)),
    ];
    let mut rows = Vec::new();
    for (metric, value) in metrics {
        let Some(value) = value else { continue };
        if !value.is_finite() {
            return Err(JobError::NotFinite(format!(
                "{} {metric} came out {value} on {} items: the model's outputs are not finite (cut too deep, \
                 or healing diverged); nothing is reported as a result",
                task.name(),
                report.n
            )));
        }
        rows.push(ResultRow { task: task.name(), metric: metric.into(), value });
    }
    Ok(rows)
}

/// Runs every evaluation task of the job and appends its metrics.
fn evaluate(tasks: &[EvalSpec], model: &Model, progress: &Progress, out: &mut JobOutput) -> Result<(), JobError> {
    let t = PhaseClock::start();
    for (i, spec) in tasks.iter().enumerate() {
        progress.check()?;
        progress.set("eval", i as f64 / tasks.len().max(1) as f64);
        let before = model.decoder.state_cache().stats();
        let report = eval::run(model, spec, &mut |_, _| {}).map_err(|e| eval_failure(spec, e))?;
        let after = model.decoder.state_cache().stats();
        if after.hits > before.hits {
            tracing::info!(
                task = %spec.task.name(),
                passes = after.hits - before.hits,
                blocks_skipped = after.blocks_skipped - before.blocks_skipped,
                kept_mib = after.bytes >> 20,
                "started passes from the loaded model's kept residual states"
            );
        }
        out.results.extend(result_rows(spec.task, &report)?);
    }
    out.timings.push(t.finish("eval"));
    Ok(())
}

#[cfg(test)]
mod tests;

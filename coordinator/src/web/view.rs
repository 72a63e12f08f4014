//! What the page shows, read from the coordinator and the store: [`Overview`] for `/`,
//! [`SweepDetail`] for `/sweeps/NAME`. Both serialize to the JSON the page's script polls.
//!
//! The ETA is the expected work left divided by the jobs running now: each unfinished job counts
//! the mean duration (the sum of its phase timings) of the sweep's succeeded jobs of its kind, or
//! of all its succeeded jobs when none of its kind has finished yet; with none finished there is
//! no ETA. Running jobs count in full, and at least one job is assumed to run, so the estimate
//! errs long ([`EtaBasis`], [`eta_seconds`]).

use std::collections::HashMap;
use std::time::Duration;

use hyper::StatusCode;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_server::SweepService;
use prunesweep_proto::Vocabulary;
use serde::Serialize;

use crate::job::{JobKind, JobState, SweepState};
use crate::service::Coordinator;
use crate::spec::{Amount, JobSpec};
use crate::store::{now_ms, JobStore, StoreError, SweepCounts};
use crate::{export, plot};

/// The most jobs one page lists (the counts and the ETA still cover all of them).
pub const JOBS_SHOWN_MAX: usize = 2_000;
/// The size of the charts and heatmaps, in SVG pixels (the page scales them to its width).
const FIGURE_SIZE: (u32, u32) = (600, 400);

/// Why a view could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// No such sweep.
    #[error("{0}")]
    NotFound(String),
    /// The store or the services failed.
    #[error("reading the coordinator: {0}")]
    Unavailable(String),
}

impl ViewError {
    /// The HTTP status for it.
    pub fn status(&self) -> StatusCode {
        match self {
            ViewError::NotFound(_) => StatusCode::NOT_FOUND,
            ViewError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A page title for it.
    pub fn title(&self) -> &'static str {
        match self {
            ViewError::NotFound(_) => "No such sweep",
            ViewError::Unavailable(_) => "Unavailable",
        }
    }
}

impl From<StoreError> for ViewError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::SweepNotFound(_) => ViewError::NotFound(e.to_string()),
            e => ViewError::Unavailable(e.to_string()),
        }
    }
}

impl From<tonic::Status> for ViewError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::NotFound => ViewError::NotFound(s.message().to_string()),
            _ => ViewError::Unavailable(s.message().to_string()),
        }
    }
}

/// Jobs per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Waiting for their score job.
    pub blocked: u32,
    /// Runnable.
    pub pending: u32,
    /// Running on a worker.
    pub leased: u32,
    /// Finished with results.
    pub succeeded: u32,
    /// Out of attempts, or failed for good.
    pub failed: u32,
    /// Cancelled.
    pub cancelled: u32,
}

impl Counts {
    /// From the store's counts.
    pub fn from_store(c: &SweepCounts) -> Self {
        let n = |s| c.count(s);
        Counts {
            blocked: n(JobState::Blocked),
            pending: n(JobState::Pending),
            leased: n(JobState::Leased),
            succeeded: n(JobState::Succeeded),
            failed: n(JobState::Failed),
            cancelled: n(JobState::Cancelled),
        }
    }

    /// From a `SweepStatus` reply.
    pub fn from_pb(s: &pb::SweepStatus) -> Self {
        let (blocked, pending, leased) = (s.blocked, s.pending, s.leased);
        Counts { blocked, pending, leased, succeeded: s.succeeded, failed: s.failed, cancelled: s.cancelled }
    }

    /// Every job.
    pub fn total(&self) -> u32 {
        self.blocked + self.pending + self.leased + self.done()
    }

    /// Finished jobs: succeeded, failed or cancelled.
    pub fn done(&self) -> u32 {
        self.succeeded + self.failed + self.cancelled
    }

    /// Jobs still to finish: blocked, pending or leased.
    pub fn unfinished(&self) -> u32 {
        self.blocked + self.pending + self.leased
    }
}

/// What a sweep's ETA is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EtaBasis {
    /// The mean duration of its succeeded jobs, in seconds.
    pub mean_job_seconds: Option<f64>,
    /// The expected seconds of work in its unfinished jobs (one job after another).
    pub work_left_seconds: Option<f64>,
}

/// The basis from every job's kind, state and duration (seconds, when it reported timings).
pub fn eta_basis(jobs: impl IntoIterator<Item = (JobKind, JobState, Option<f64>)>) -> EtaBasis {
    let jobs: Vec<_> = jobs.into_iter().collect();
    let mut by_kind: HashMap<JobKind, (f64, u32)> = HashMap::new();
    let (mut sum, mut n) = (0.0, 0u32);
    for (kind, _, seconds) in jobs.iter().filter(|(_, s, _)| *s == JobState::Succeeded) {
        if let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0) {
            let entry = by_kind.entry(*kind).or_default();
            *entry = (entry.0 + s, entry.1 + 1);
            (sum, n) = (sum + s, n + 1);
        }
    }
    let mean = (n > 0).then(|| sum / f64::from(n));
    let work_left = mean.map(|mean| {
        jobs.iter()
            .filter(|(_, s, _)| !s.is_terminal())
            .map(|(kind, _, _)| by_kind.get(kind).map_or(mean, |(s, n)| s / f64::from(*n)))
            .sum()
    });
    EtaBasis { mean_job_seconds: mean, work_left_seconds: work_left }
}

/// Seconds until the sweep is done: the work left shared among the jobs running now (at least
/// one); `None` when it is done or cancelled, or nothing has finished to time.
pub fn eta_seconds(basis: &EtaBasis, counts: &Counts, state: SweepState) -> Option<f64> {
    if counts.unfinished() == 0 || state == SweepState::Cancelled {
        return None;
    }
    basis.work_left_seconds.map(|w| w / f64::from(counts.leased.max(1)))
}

/// One sweep's line on `/` (and its heading on its page).
#[derive(Debug, Clone, Serialize)]
pub struct SweepSummary {
    /// Its name.
    pub name: String,
    /// `active` or `cancelled`.
    pub state: String,
    /// Its priority.
    pub priority: i32,
    /// When it was submitted (ms since the epoch).
    pub created_at_ms: i64,
    /// Jobs per state.
    pub counts: Counts,
    /// Every job.
    pub total: u32,
    /// Finished jobs.
    pub done: u32,
    /// Mean duration of its succeeded jobs, in seconds.
    pub mean_job_seconds: Option<f64>,
    /// Seconds until done ([`eta_seconds`]).
    pub eta_seconds: Option<f64>,
}

impl SweepSummary {
    fn new(c: &SweepCounts, basis: &EtaBasis) -> Self {
        let counts = Counts::from_store(c);
        SweepSummary {
            name: c.name.clone(),
            state: c.state.as_str().to_string(),
            priority: c.priority,
            created_at_ms: c.created_at,
            counts,
            total: counts.total(),
            done: counts.done(),
            mean_job_seconds: basis.mean_job_seconds,
            eta_seconds: eta_seconds(basis, &counts, c.state),
        }
    }
}

/// A registered worker.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its device.
    pub device: String,
    /// Its device memory.
    pub memory_bytes: Option<u64>,
    /// Free device memory as it last reported.
    pub free_memory_bytes: Option<u64>,
    /// Its build.
    pub version: String,
    /// Its last heartbeat or registration (ms since the epoch).
    pub last_seen_ms: i64,
    /// Seen within two lease lengths.
    pub live: bool,
    /// The job it holds.
    pub job_id: Option<i64>,
    /// That job's sweep.
    pub sweep: Option<String>,
    /// The phase its job is in, as its last heartbeat said.
    pub phase: Option<String>,
    /// Its job's progress within that phase, in [0, 1].
    pub progress: Option<f64>,
    /// Tokens per second in that phase, as its last heartbeat to this coordinator said.
    pub tokens_per_second: Option<f64>,
}

/// Leased jobs' last phase and progress, by job id.
type Phases = HashMap<i64, (Option<String>, Option<f64>)>;

fn workers(
    list: Vec<pb::WorkerStatus>,
    rates: &HashMap<String, (&'static str, f64)>,
    phases: &Phases,
    ttl: Duration,
) -> Vec<WorkerView> {
    let now = now_ms();
    let live_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).saturating_mul(2);
    list.into_iter()
        .map(|w| {
            // A rate is shown only while the worker holds a job (an idle one's last is stale).
            let rate = rates.get(&w.worker_id).filter(|_| w.job_id.is_some());
            let (phase, progress) = w.job_id.and_then(|id| phases.get(&id)).cloned().unwrap_or_default();
            WorkerView {
                live: now.saturating_sub(w.last_seen_ms) <= live_ms,
                phase: phase.or_else(|| rate.map(|(p, _)| p.to_string())),
                progress,
                tokens_per_second: rate.map(|(_, r)| *r),
                id: w.worker_id,
                name: w.name,
                device: w.device,
                memory_bytes: w.memory_bytes,
                free_memory_bytes: w.free_memory_bytes,
                version: w.version,
                last_seen_ms: w.last_seen_ms,
                job_id: w.job_id,
                sweep: w.sweep,
            }
        })
        .collect()
}

/// `/`: every sweep and every worker.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// When this was read (ms since the epoch).
    pub now_ms: i64,
    /// The sweeps, newest first.
    pub sweeps: Vec<SweepSummary>,
    /// The workers, most recently seen first.
    pub workers: Vec<WorkerView>,
}

/// Reads `/`'s data. `cache` keeps each sweep's [`EtaBasis`] with the counts it was computed at;
/// a sweep's jobs are read again only when its counts of finished jobs changed.
pub async fn overview(
    coordinator: &Coordinator,
    store: &dyn JobStore,
    rates: &HashMap<String, (&'static str, f64)>,
    lease_ttl: Duration,
    cache: &mut HashMap<String, ([u32; 6], EtaBasis)>,
) -> Result<Overview, ViewError> {
    let sweeps = store.sweeps().await?;
    let mut out = Vec::with_capacity(sweeps.len());
    for c in &sweeps {
        // The finished counts and the total: what changes the basis (a lease does not).
        let key =
            [c.count(JobState::Succeeded), c.count(JobState::Failed), c.count(JobState::Cancelled), c.total(), 0, 0];
        let basis = match cache.get(&c.name) {
            Some((k, basis)) if *k == key => *basis,
            _ => {
                let jobs = store.results(&c.name).await?;
                let basis = eta_basis(jobs.iter().map(|j| (j.job.kind, j.job.state, job_seconds(&j.job.timings))));
                cache.insert(c.name.clone(), (key, basis));
                basis
            }
        };
        out.push(SweepSummary::new(c, &basis));
    }
    let mut phases = Phases::new();
    for c in sweeps.iter().filter(|c| c.count(JobState::Leased) > 0) {
        phases.extend(store.running(&c.name).await?.into_iter().map(|r| (r.job_id, (r.phase, r.progress))));
    }
    let list = coordinator.list_workers(tonic::Request::new(pb::ListWorkersRequest {})).await?.into_inner().workers;
    Ok(Overview { now_ms: now_ms(), sweeps: out, workers: workers(list, rates, &phases, lease_ttl) })
}

/// A job's duration: the sum of its phase timings.
fn job_seconds(timings: &[crate::store::Timing]) -> Option<f64> {
    (!timings.is_empty()).then(|| timings.iter().map(|t| t.seconds).sum())
}

/// One line of a sweep's job table.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// Its id.
    pub id: i64,
    /// `score`, `baseline` or `cell`.
    pub kind: String,
    /// What it computes: `model · method · amount · heal` for cells.
    pub cell: String,
    /// Its state.
    pub state: String,
    /// The worker holding it (or that last held it): its name, or its id when unregistered.
    pub worker: Option<String>,
    /// Its last reported phase (running jobs).
    pub phase: Option<String>,
    /// Its progress within that phase, in [0, 1] (running jobs).
    pub progress: Option<f64>,
    /// The holding worker's tokens/s, as its last heartbeat here reported.
    pub tokens_per_second: Option<f64>,
    /// Its last heartbeat (ms since the epoch).
    pub heartbeat_at_ms: Option<i64>,
    /// Attempts that ended without success.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The last error, with its label: `[kind] message`.
    pub error: Option<String>,
    /// Its duration (the sum of its phase timings).
    pub seconds: Option<f64>,
    /// Its results, `task metric = value`, `; `-separated.
    pub results: String,
}

/// A value with four significant digits or so: `0.4125`, `10.60`, `412.5`.
fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{v:.0}"); // a count: `n 40`
    }
    match v.abs() {
        a if a >= 100.0 => format!("{v:.1}"),
        a if a >= 10.0 => format!("{v:.2}"),
        _ => format!("{v:.4}"),
    }
}

/// A job's results by task: `boolq: accuracy 0.6250; c4-loss: loss 10.60, normalized_loss 1.022`.
pub fn results_text(results: &[crate::store::ResultValue]) -> String {
    let mut by_task: Vec<(&str, Vec<String>)> = Vec::new();
    for r in results {
        let value = format!("{} {}", r.metric, short(r.value));
        match by_task.iter_mut().find(|(t, _)| *t == r.task) {
            Some((_, values)) => values.push(value),
            None => by_task.push((&r.task, vec![value])),
        }
    }
    by_task.iter().map(|(task, values)| format!("{task}: {}", values.join(", "))).collect::<Vec<_>>().join("; ")
}

/// What a job computes, in a few words.
pub fn cell_label(spec: &JobSpec) -> String {
    let model = spec.model.name.as_str();
    match spec.kind {
        JobKind::Score => format!("{model} · score"),
        JobKind::Baseline => format!("{model} · baseline"),
        JobKind::Cell => {
            let method = spec.method.map_or("?".to_string(), |m| m.name());
            let amount = match spec.amount {
                Some(Amount::Fraction(f)) => format!("{:.0}%", 100.0 * f),
                Some(Amount::N(n)) => format!("n={n}"),
                None => "?".into(),
            };
            let heal = spec.heal.as_ref().map_or("none", |h| h.name.as_str());
            format!("{model} · {method} · {amount} · {heal}")
        }
    }
}

/// A figure: a title and an SVG document.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What it shows.
    pub title: String,
    /// The SVG (from plotters: its text is XML-escaped).
    pub svg: String,
}

/// `/sweeps/NAME`: the sweep, its jobs, its figures and the workers.
#[derive(Debug, Clone, Serialize)]
pub struct SweepDetail {
    /// When this was read (ms since the epoch).
    pub now_ms: i64,
    /// The sweep's counts and ETA.
    pub sweep: SweepSummary,
    /// Its jobs in id order, at most [`JOBS_SHOWN_MAX`].
    pub jobs: Vec<JobView>,
    /// Jobs not listed (beyond [`JOBS_SHOWN_MAX`]).
    pub jobs_not_shown: usize,
    /// Changes when a job finishes: the figures below are those of this key.
    pub results_key: String,
    /// Accuracy-versus-depth charts, one per task; `None` when the caller already has this key's.
    pub charts: Option<Vec<Figure>>,
    /// Distance heatmaps, one per succeeded score job; `None` as for `charts`.
    pub heatmaps: Option<Vec<Figure>>,
    /// The workers.
    pub workers: Vec<WorkerView>,
}

/// Reads `/sweeps/NAME`'s data; the figures are drawn unless `known` is the current results key.
pub async fn sweep_detail(
    coordinator: &Coordinator,
    store: &dyn JobStore,
    rates: &HashMap<String, (&'static str, f64)>,
    lease_ttl: Duration,
    name: &str,
    known: Option<&str>,
) -> Result<SweepDetail, ViewError> {
    let counts = store.sweep(name).await?;
    let jobs = store.results(name).await?;
    let running: HashMap<i64, _> = store.running(name).await?.into_iter().map(|r| (r.job_id, r)).collect();
    let list = coordinator.list_workers(tonic::Request::new(pb::ListWorkersRequest {})).await?.into_inner().workers;
    let names: HashMap<&str, &str> = list.iter().map(|w| (w.worker_id.as_str(), w.name.as_str())).collect();
    let basis = eta_basis(jobs.iter().map(|j| (j.job.kind, j.job.state, job_seconds(&j.job.timings))));
    let views = jobs
        .iter()
        .take(JOBS_SHOWN_MAX)
        .map(|j| {
            let job = &j.job;
            let run = running.get(&job.id).filter(|_| job.state == JobState::Leased);
            let worker_id = run.and_then(|r| r.worker_id.as_deref()).or(job.worker_id.as_deref());
            JobView {
                id: job.id,
                kind: job.kind.as_str().to_string(),
                cell: cell_label(&job.spec),
                state: job.state.as_str().to_string(),
                worker: worker_id.map(|id| names.get(id).map_or(id, |n| *n).to_string()),
                phase: run.and_then(|r| r.phase.clone()),
                progress: run.and_then(|r| r.progress),
                tokens_per_second: run.and(worker_id).and_then(|id| rates.get(id)).map(|(_, r)| *r),
                heartbeat_at_ms: run.and_then(|r| r.heartbeat_at),
                attempts: job.attempts,
                max_attempts: job.max_attempts,
                error: job.error.as_ref().map(|e| match &job.error_kind {
                    Some(kind) => format!("[{kind}] {e}"),
                    None => e.clone(),
                }),
                seconds: job_seconds(&job.timings),
                results: results_text(&j.results),
            }
        })
        .collect();
    let phases: Phases = running.values().map(|r| (r.job_id, (r.phase.clone(), r.progress))).collect();
    let c = Counts::from_store(&counts);
    let results_key = format!("{}-{}-{}-{}", c.succeeded, c.failed, c.cancelled, c.total());
    let (charts, heatmaps) = if known == Some(results_key.as_str()) {
        (None, None)
    } else {
        let heatmaps = heatmaps(store, &jobs).await?;
        (Some(charts(coordinator, name).await?), Some(heatmaps))
    };
    Ok(SweepDetail {
        now_ms: now_ms(),
        sweep: SweepSummary::new(&counts, &basis),
        jobs_not_shown: jobs.len().saturating_sub(JOBS_SHOWN_MAX),
        jobs: views,
        results_key,
        charts,
        heatmaps,
        workers: workers(list, rates, &phases, lease_ttl),
    })
}

/// The sweep's accuracy-versus-depth charts, as `coordinator plot` draws them (from the same
/// `ListResults` rows, read in process).
async fn charts(coordinator: &Coordinator, sweep: &str) -> Result<Vec<Figure>, ViewError> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListResultsRequest { sweep: sweep.to_string(), page_size: 0, page_token: page_token.clone() };
        let page = coordinator.list_results(tonic::Request::new(request)).await?.into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() || page.next_page_token == page_token {
            break;
        }
        page_token = page.next_page_token;
    }
    let rows = export::rows_from_pb(sweep, &jobs);
    plot::charts(&rows)
        .iter()
        .map(|chart| -> Result<Figure, ViewError> {
            let svg = plot::chart_svg(chart, sweep, FIGURE_SIZE).map_err(ViewError::Unavailable)?;
            Ok(Figure { title: format!("{} ({})", chart.task, chart.metric), svg })
        })
        .collect()
}

/// A heatmap of each succeeded score job's angular distances.
async fn heatmaps(store: &dyn JobStore, jobs: &[crate::store::JobResults]) -> Result<Vec<Figure>, ViewError> {
    let mut out = Vec::new();
    for j in jobs.iter().filter(|j| j.job.kind == JobKind::Score && j.job.state == JobState::Succeeded) {
        let rows = store.distances(j.job.id).await?;
        let title = format!("{}: angular distance d(l, n)", j.job.spec.model.name);
        if let Some(svg) = plot::heatmap::heatmap_svg(&rows, &title, FIGURE_SIZE).map_err(ViewError::Unavailable)? {
            out.push(Figure { title, svg });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_read_by_task() {
        let r = |task: &str, metric: &str, value| crate::store::ResultValue {
            task: task.into(),
            metric: metric.into(),
            value,
        };
        let text = results_text(&[
            r("boolq", "accuracy", 0.625),
            r("boolq", "n", 40.0),
            r("c4-loss", "loss", 10.6),
            r("c4-loss", "normalized_loss", 1.0218),
        ]);
        assert_eq!(text, "boolq: accuracy 0.6250, n 40; c4-loss: loss 10.60, normalized_loss 1.0218");
        assert_eq!(results_text(&[]), "");
    }

    #[test]
    fn eta_uses_each_kinds_mean_and_the_jobs_running() {
        use JobKind::{Cell, Score};
        use JobState::{Leased, Pending, Succeeded};
        let jobs = [
            (Score, Succeeded, Some(100.0)),
            (Cell, Succeeded, Some(10.0)),
            (Cell, Succeeded, Some(30.0)),
            (Cell, Succeeded, None), // no timings: not counted
            (Cell, Pending, None),
            (Cell, Leased, None),
            (JobKind::Baseline, Pending, None), // no baseline timed yet: the overall mean
        ];
        let basis = eta_basis(jobs);
        assert_eq!(basis.mean_job_seconds, Some(140.0 / 3.0));
        assert_eq!(basis.work_left_seconds, Some(20.0 + 20.0 + 140.0 / 3.0));
        let counts = Counts { pending: 2, leased: 2, succeeded: 4, ..Counts::default() };
        let eta = eta_seconds(&basis, &counts, SweepState::Active).unwrap();
        assert!((eta - (40.0 + 140.0 / 3.0) / 2.0).abs() < 1e-9, "{eta}");
        let idle = Counts { leased: 0, ..counts };
        assert_eq!(eta_seconds(&basis, &idle, SweepState::Active), basis.work_left_seconds, "at least one runs");
        assert_eq!(eta_seconds(&basis, &counts, SweepState::Cancelled), None);
        let done = Counts { succeeded: 7, ..Counts::default() };
        assert_eq!(eta_seconds(&basis, &done, SweepState::Active), None);
        assert_eq!(eta_basis([(Cell, Pending, None)]), EtaBasis::default(), "nothing timed: no ETA");
    }
}

//! The durable job store: one [`JobStore`] trait, two backends ([`SqliteStore`], [`PgStore`]).
//!
//! The database is the source of truth; the coordinator holds no queue in memory (the group-commit
//! queues hold calls only while they wait for the next transaction). Methods are named after
//! transitions (`lease_batch`, `heartbeat`, `complete_batch`, `fail`, `reclaim_expired`). Every
//! call is one transaction; a write reads the rows it changes (locking them on Postgres), asks
//! [`crate::job`] what they become ([`crate::job::transition`], [`crate::job::JobStatus::initial`],
//! [`crate::job::heartbeat`]), and writes that.
//!
//! - [`dialect`]: what differs between SQLite and Postgres ([`Dialect`]: a few queries, row
//!   locking, how a write transaction begins); `sqlite.rs` / `postgres.rs` implement it and open
//!   the database.
//! - `sql/`: the queries, written once and generic over the [`Dialect`], one file per concept.
//!
//! Times are milliseconds since the Unix epoch, passed in by the caller so that tests control the
//! clock.

pub mod dialect;
mod postgres;
mod sql;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use self::dialect::Dialect;
pub use self::postgres::PgStore;
pub use self::sql::SqlStore;
pub use self::sqlite::SqliteStore;
use crate::job::{InvalidTransition, JobKind, JobState, SweepState};
use crate::spec::JobSpec;
use crate::sweep::{PlannedJob, SweepSpec};

/// Default database: a SQLite file under `results/`.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://results/coordinator.sqlite";

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No sweep with that name.
    #[error("no sweep named {0:?}")]
    SweepNotFound(String),
    /// No job with that id.
    #[error("no job with id {0}")]
    JobNotFound(i64),
    /// The lease is not the job's current lease (expired and re-leased, cancelled, or finished).
    #[error("lease {lease_id} is not the current lease of job {job_id} (it expired, or the job was re-leased, cancelled or finished)")]
    StaleLease {
        /// The job.
        job_id: i64,
        /// The lease the caller presented.
        lease_id: String,
    },
    /// The requested change is not allowed in the job's state.
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// A worker reported (or renewed) a lease another worker holds.
    #[error("job {job_id} is leased to another worker, not to {worker_id}")]
    NotYourLease {
        /// The job.
        job_id: i64,
        /// The worker that called.
        worker_id: String,
    },
    /// The database URL is not one we understand.
    #[error("unsupported database URL {0:?}: expected sqlite://PATH, sqlite::memory: or postgres://...")]
    BadUrl(String),
    /// A stored value is not what we wrote (corrupt or foreign database).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The coordinator cannot serve the call now (it is shutting down); try again.
    #[error("{0}")]
    Unavailable(String),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Job counts of one sweep.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepCounts {
    /// Sweep name.
    pub name: String,
    /// Whether its jobs may run.
    pub state: SweepState,
    /// Priority.
    pub priority: i32,
    /// Creation time.
    pub created_at: i64,
    /// Jobs per state, in [`JobState::ALL`] order.
    pub counts: [u32; 6],
}

impl SweepCounts {
    /// Jobs in `state`.
    pub fn count(&self, state: JobState) -> u32 {
        self.counts[JobState::ALL.iter().position(|s| *s == state).expect("ALL lists every state")]
    }

    /// All jobs.
    pub fn total(&self) -> u32 {
        self.counts.iter().sum()
    }

    /// True when every job is succeeded, failed or cancelled.
    pub fn is_done(&self) -> bool {
        JobState::ALL.iter().filter(|s| !s.is_terminal()).all(|s| self.count(*s) == 0)
    }
}

/// What a submit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// True if the sweep was created by this submit.
    pub created: bool,
    /// Jobs added.
    pub jobs_added: u32,
    /// Jobs in the sweep now.
    pub jobs_total: u32,
}

/// A job row.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Id.
    pub id: i64,
    /// Sweep name.
    pub sweep: String,
    /// Content key.
    pub key: String,
    /// Kind.
    pub kind: JobKind,
    /// Content.
    pub spec: JobSpec,
    /// State.
    pub state: JobState,
    /// Attempts that ended without success.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The job it waits for.
    pub depends_on: Option<i64>,
    /// Current or last lease.
    pub lease_id: Option<String>,
    /// Worker holding or last holding the job.
    pub worker_id: Option<String>,
    /// Last error.
    pub error: Option<String>,
    /// Last error label.
    pub error_kind: Option<String>,
    /// Layers dropped (reported).
    pub layers_dropped: Vec<u32>,
    /// Decoder layer count (reported).
    pub num_layers: Option<u32>,
    /// Phase timings (reported).
    pub timings: Vec<Timing>,
    /// What made the result (reported).
    pub provenance: Option<Provenance>,
}

/// Where a result came from, as its worker reported it (`pb::Provenance`); stored as JSON.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    /// `hf:org/name@<commit>` or `sha256:<hex>` of the weight files' sizes, headers and ends.
    pub model_fingerprint: String,
    /// Data file or folder → `sha256:<hex>`.
    pub data_fingerprints: std::collections::BTreeMap<String, String>,
    /// The worker's version.
    pub worker_version: String,
    /// The git commit it was built from.
    pub worker_commit: String,
    /// Its device.
    pub device: String,
    /// The compute dtype.
    pub dtype: String,
    /// The job's wall time on the worker.
    pub wall_seconds: f64,
}

/// Time spent in one phase.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    /// Phase name.
    pub phase: String,
    /// Seconds.
    pub seconds: f64,
    /// The worker process's peak resident host memory during the phase (bytes), where the worker
    /// measured it (kept in the timings' JSON: rows from before it read as `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_host_bytes: Option<u64>,
}

/// One row of a distance table.
#[derive(Debug, Clone, PartialEq)]
pub struct DistanceRow {
    /// `angular` or `block_influence`.
    pub metric: String,
    /// Block length.
    pub n: u32,
    /// First layer.
    pub l: u32,
    /// Value.
    pub value: f64,
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultValue {
    /// Task.
    pub task: String,
    /// Metric.
    pub metric: String,
    /// Value.
    pub value: f64,
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedJob {
    /// Lease id.
    pub lease_id: String,
    /// Expiry.
    pub expires_at: i64,
    /// The job (state `Leased`).
    pub job: JobRow,
    /// The score job's distance table, for cells that need it.
    pub distances: Vec<DistanceRow>,
}

/// One worker's request for a job.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRequest {
    /// The worker asking.
    pub worker_id: String,
    /// Models it already holds: their jobs come first (model affinity).
    pub held_models: Vec<String>,
    /// How long the lease lasts without a heartbeat.
    pub ttl_ms: i64,
    /// The worker's free device memory now (bytes), if it reported it: jobs predicted to need
    /// more are not leased to it. `None`: no constraint.
    pub free_memory_bytes: Option<u64>,
}

/// A worker's registration.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// Name.
    pub name: String,
    /// Device.
    pub device: String,
    /// Device memory.
    pub memory_bytes: Option<u64>,
    /// Build version.
    pub version: String,
}

/// A worker's heartbeat for the job it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// The worker.
    pub worker_id: String,
    /// The lease it renews.
    pub lease_id: String,
    /// The job under the lease.
    pub job_id: i64,
    /// The phase the job is in (`load`, `score`, `prune`, `heal`, `eval`); `None` keeps the last.
    pub phase: Option<String>,
    /// Progress within the phase, in [0, 1]; `None` keeps the last.
    pub progress: Option<f64>,
    /// How long the renewed lease lasts without another heartbeat.
    pub ttl_ms: i64,
}

/// A leased job as its heartbeats describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningJob {
    /// The job.
    pub job_id: i64,
    /// Its kind.
    pub kind: JobKind,
    /// The worker holding it.
    pub worker_id: Option<String>,
    /// That worker's name, if it is registered here.
    pub worker_name: Option<String>,
    /// Its last reported phase.
    pub phase: Option<String>,
    /// Its last reported progress within the phase, in [0, 1].
    pub progress: Option<f64>,
    /// Its last heartbeat; `None` before the first.
    pub heartbeat_at: Option<i64>,
    /// When its lease expires without another heartbeat.
    pub lease_expires_at: i64,
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    /// Its id.
    pub id: String,
    /// What it registered as.
    pub info: WorkerInfo,
    /// When it registered.
    pub registered_at: i64,
    /// Its registration or its last heartbeat, whichever is later.
    pub last_seen: i64,
    /// The job it holds under a lease, if any.
    pub job_id: Option<i64>,
    /// That job's sweep.
    pub sweep: Option<String>,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// Lease renewed until this time.
    Renewed(i64),
    /// The job was cancelled: stop.
    Cancelled,
    /// The lease is not current: stop.
    Lost,
}

/// A successful job's report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// The worker reporting it: it must be the one holding the lease.
    pub worker_id: String,
    /// The job.
    pub job_id: i64,
    /// The lease it ran under.
    pub lease_id: String,
    /// Results.
    pub results: Vec<ResultValue>,
    /// Distance table (score jobs).
    pub distances: Vec<DistanceRow>,
    /// Layers dropped.
    pub layers_dropped: Vec<u32>,
    /// Decoder layer count.
    pub num_layers: Option<u32>,
    /// Timings.
    pub timings: Vec<Timing>,
    /// What made the result.
    pub provenance: Option<Provenance>,
}

/// A failed job's report.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The worker reporting it: it must be the one holding the lease.
    pub worker_id: String,
    /// The job.
    pub job_id: i64,
    /// The lease it ran under.
    pub lease_id: String,
    /// What went wrong.
    pub message: String,
    /// Stable label.
    pub error_kind: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

/// One job state change.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Sequence number.
    pub seq: i64,
    /// Job.
    pub job_id: i64,
    /// Job kind.
    pub kind: JobKind,
    /// State after the change.
    pub state: JobState,
    /// Worker involved.
    pub worker_id: Option<String>,
    /// Free text.
    pub message: Option<String>,
    /// Time.
    pub at: i64,
}

/// A job with its results.
#[derive(Debug, Clone, PartialEq)]
pub struct JobResults {
    /// The job.
    pub job: JobRow,
    /// Its results.
    pub results: Vec<ResultValue>,
}

/// The store's operations. Every call is one transaction, but for a submit of more than 1,000 jobs.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Insert the sweep (if new) and the jobs it does not have yet: in one transaction up to 1,000
    /// jobs, a bigger submit in a transaction per 1,000 (so it never holds the store for long).
    async fn submit(&self, spec: &SweepSpec, jobs: &[PlannedJob], now: i64) -> Result<SubmitOutcome, StoreError>;
    /// Job counts of one sweep.
    async fn sweep(&self, name: &str) -> Result<SweepCounts, StoreError>;
    /// All sweeps, newest first.
    async fn sweeps(&self) -> Result<Vec<SweepCounts>, StoreError>;
    /// Cancel every unfinished job of the sweep; returns how many.
    async fn cancel(&self, name: &str, now: i64) -> Result<u32, StoreError>;
    /// Requeue failed (and cancelled, if asked) jobs with fresh attempts; returns how many.
    async fn retry(&self, name: &str, include_cancelled: bool, now: i64) -> Result<u32, StoreError>;
    /// Register a worker; returns its id.
    async fn register_worker(&self, worker: &WorkerInfo, now: i64) -> Result<String, StoreError>;
    /// Lease the next pending job, preferring jobs whose model is in `held_models`.
    async fn lease_next(
        &self,
        worker_id: &str,
        held_models: &[String],
        ttl_ms: i64,
        now: i64,
    ) -> Result<Option<LeasedJob>, StoreError> {
        let request = LeaseRequest {
            worker_id: worker_id.to_string(),
            held_models: held_models.to_vec(),
            ttl_ms,
            free_memory_bytes: None,
        };
        Ok(self.lease_batch(std::slice::from_ref(&request), now).await?.pop().flatten())
    }
    /// Serve several lease requests in one transaction, in order: request `i` gets the `i`-th
    /// answer (`None` when nothing was runnable for it). This is the coordinator's group commit:
    /// the lease calls that arrive while one transaction runs share the next one.
    async fn lease_batch(&self, requests: &[LeaseRequest], now: i64) -> Result<Vec<Option<LeasedJob>>, StoreError>;
    /// Renew a lease and record the job's phase and progress, or say why the worker should stop.
    async fn heartbeat(&self, beat: &Heartbeat, now: i64) -> Result<HeartbeatOutcome, StoreError>;
    /// Finish a job with its results; unblocks the jobs that depend on it.
    async fn complete(&self, completion: &Completion, now: i64) -> Result<(), StoreError> {
        let mut outcomes = self.complete_batch(std::slice::from_ref(completion), now).await?;
        outcomes.pop().expect("one outcome per completion")
    }
    /// Finish several jobs in one transaction. The outer error is the database's (nothing was
    /// written); the inner ones are per completion (a stale lease refuses that completion only,
    /// and writes nothing of it).
    async fn complete_batch(
        &self,
        completions: &[Completion],
        now: i64,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError>;
    /// Record a failure; returns the job's new state (pending or failed).
    async fn fail(&self, failure: &Failure, now: i64) -> Result<JobState, StoreError>;
    /// Return jobs whose lease expired before `now` to pending (or failed at max attempts).
    async fn reclaim_expired(&self, now: i64) -> Result<u32, StoreError>;
    /// A sweep's events after `after_seq`, oldest first, at most `limit`. Events commit in
    /// sequence order, so a caller that passes the last sequence number it read misses none.
    async fn events(&self, sweep: &str, after_seq: i64, limit: i64) -> Result<Vec<EventRow>, StoreError>;
    /// A job.
    async fn job(&self, job_id: i64) -> Result<JobRow, StoreError>;
    /// Every job of a sweep with its results, in id order (in one read: for tests and small
    /// sweeps; `ListResults` reads [`results_page`](JobStore::results_page)s).
    async fn results(&self, sweep: &str) -> Result<Vec<JobResults>, StoreError> {
        self.results_page(sweep, 0, u32::MAX).await
    }
    /// Up to `limit` jobs of a sweep with an id above `after_job_id`, with their results, in id
    /// order.
    async fn results_page(&self, sweep: &str, after_job_id: i64, limit: u32) -> Result<Vec<JobResults>, StoreError>;
    /// A score job's distance table, by metric, `n`, `l` (empty for other jobs and before the
    /// score job completes).
    async fn distances(&self, job_id: i64) -> Result<Vec<DistanceRow>, StoreError>;
    /// A sweep's leased jobs with their last heartbeat, in id order.
    async fn running(&self, sweep: &str) -> Result<Vec<RunningJob>, StoreError>;
    /// Every registered worker, most recently seen first.
    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError>;
    /// Whether `worker_id` was registered (with any coordinator on this store).
    async fn worker_exists(&self, worker_id: &str) -> Result<bool, StoreError>;
}

/// Open (creating if needed) and migrate the store at `url`: `sqlite://PATH`, `sqlite::memory:`,
/// a bare path (SQLite), or `postgres://...`.
pub async fn open(url: &str) -> Result<Arc<dyn JobStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else if url.starts_with("sqlite:") || !url.contains("://") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::BadUrl(url.to_string()))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(d.as_millis()).expect("time fits in i64")
}

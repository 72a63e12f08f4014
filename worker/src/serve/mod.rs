//! `worker serve`: register with the coordinator, lease jobs, run them, report.
//!
//! One job at a time per worker (one device). While a job runs on a blocking thread, this loop
//! heartbeats at the interval the coordinator asked for; a `CANCEL` or `LOST` answer sets the
//! job's stop flag and the result is dropped, not reported. Calls that fail for transport reasons
//! (coordinator restarting, network blip) are retried with exponential backoff; a coordinator
//! that forgot the worker (restarted with a new database) gets a fresh registration. On shutdown
//! (Ctrl-C / SIGTERM) the worker stops leasing, stops its job at the next safe point (healing
//! writes a checkpoint first) and reports it as a retryable failure, so the job is leased again.
//!
//! A report is written to the [`outbox`] before it is sent, and stays there until a coordinator
//! accepts it (or refuses it for good), so a job that finishes while the coordinator is down is
//! delivered when it comes back, even across a restart of this worker. `--coordinator` takes a
//! comma-separated list: a worker that cannot reach one coordinator moves on to the next (several
//! coordinators on one Postgres serve the same jobs).
//!
//! - [`pipeline`]: what running one job means (load, score, prune, heal, eval).
//! - [`outbox`]: reports kept on disk until delivered.
//! - [`roots`]: the folders a job's model and data may come from.
//! - [`state_room`]: how much memory the held model's kept residual states may take during a job.
//!
//! The connection itself (token, TLS, deadlines, keepalives) is the contract's
//! [`prunesweep_proto::client`], shared with the CLI.

pub mod outbox;
pub mod pipeline;
pub mod roots;
pub mod state_room;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;
use prunesweep_proto::v1::{
    CompleteJobRequest, FailJobRequest, HeartbeatAction, HeartbeatRequest, Lease, LeaseJobRequest, RegisterRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::heal::Recompute;
use crate::job::{Job, JobError};
use outbox::{Outbox, Report};
use pipeline::{Pipeline, Progress};
use prunesweep_proto::client::{self, Bearer, ClientError};

/// Where and as whom the worker serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `http://host:port` of the coordinator, or several separated by commas (tried in turn).
    pub coordinator: String,
    /// Name shown in the coordinator (default `host:device`).
    pub name: String,
    /// `cpu`, `cuda:N`.
    pub device_name: String,
    /// Healing checkpoints and other per-job files.
    pub work_dir: PathBuf,
    /// Where a job's model and data may be read from.
    pub roots: roots::Roots,
    /// At most this many bytes of the device's memory count as free (`--memory-budget-gib`).
    pub memory_budget: Option<u64>,
    /// Host memory the held model may keep evaluation passes' residual states in, for the next
    /// cells (`--state-cache-gib`; 0: none).
    pub state_cache: u64,
    /// Which blocks of a healing cell keep their graphs (`--keep-graphs`; a job's own setting
    /// is always [`Recompute::Fit`]).
    pub recompute: Recompute,
    /// Long-poll wait per `LeaseJob` call.
    pub lease_wait: Duration,
    /// Stop after this many jobs (tests, batch use); `None` serves until shutdown.
    pub max_jobs: Option<usize>,
    /// Exit when a lease poll comes back empty and the coordinator has no unfinished job left
    /// (batch use: a Slurm array task or a Kubernetes Job ends with the sweeps).
    pub exit_when_done: bool,
    /// The worker token sent on every call (`PRUNESWEEP_TOKEN` or `--token-file`).
    pub token: Option<String>,
    /// The CA certificate (PEM) trusted for `https://` coordinators; `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
}

/// Extra time a call gets beyond the `LeaseJob` long poll.
const DEADLINE_MARGIN: Duration = Duration::from_secs(30);

/// A `WorkerService` client that sends the worker token on every call.
type Client = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// What stops `serve` with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The coordinator list, the token or the TLS settings cannot be used.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The coordinator rejected the worker for good (not a transport problem).
    #[error("the coordinator refused {call}: {status}")]
    Refused {
        /// Which call.
        call: &'static str,
        /// Its status.
        status: tonic::Status,
    },
}

/// Exponential backoff from 200 ms to 30 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(200))
    }

    async fn wait(&mut self, what: &str, err: &tonic::Status) {
        tracing::warn!(error = %err.message(), code = ?err.code(), retry_in = ?self.0, "{what} failed; retrying");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
    }
}

/// Transport-level failures worth retrying: the coordinator is down, restarting or unreachable.
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Cancelled
    )
}

/// The coordinators a worker may talk to, and the one it talks to now.
struct Coordinators {
    endpoints: Vec<(String, Endpoint)>,
    current: usize,
    bearer: Bearer,
}

impl Coordinators {
    /// `cfg.coordinator`: `http://a:50051,http://b:50051` (`https://` with TLS).
    fn parse(cfg: &ServeConfig) -> Result<Self, ServeError> {
        let list = &cfg.coordinator;
        let endpoints = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| {
                // Every call gets the long poll plus a margin, so a poll is never cut short.
                let endpoint = client::endpoint(url, cfg.ca.as_deref(), cfg.lease_wait + DEADLINE_MARGIN)?;
                Ok((url.to_string(), endpoint))
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::BadUrl(list.to_string()).into());
        }
        let bearer = Bearer::new(cfg.token.as_deref())?;
        Ok(Coordinators { endpoints, current: 0, bearer })
    }

    fn client(&self) -> Client {
        WorkerServiceClient::with_interceptor(self.endpoints[self.current].1.connect_lazy(), self.bearer.clone())
    }

    fn url(&self) -> &str {
        &self.endpoints[self.current].0
    }

    /// Moves on to the next coordinator (a no-op with one); says whether there was another.
    fn rotate(&mut self) -> bool {
        self.current = (self.current + 1) % self.endpoints.len();
        self.endpoints.len() > 1
    }
}

/// A registered session with the coordinator.
struct Session {
    coordinators: Coordinators,
    client: Client,
    worker_id: String,
    heartbeat: Duration,
    outbox: Outbox,
}

impl Session {
    /// After a transport failure: talk to the next coordinator, under the same worker id (a
    /// coordinator on the same database knows it; one that does not answers NOT_FOUND, and the
    /// worker registers again).
    fn fail_over(&mut self) {
        if self.coordinators.rotate() {
            self.client = self.coordinators.client();
            tracing::warn!(coordinator = %self.coordinators.url(), "switching to the next coordinator");
        }
    }
}

async fn register(mut coordinators: Coordinators, cfg: &ServeConfig, device: &Device) -> Result<Session, ServeError> {
    let mut backoff = Backoff::new();
    loop {
        let client = coordinators.client();
        let mut c = client.clone();
        let req = RegisterRequest {
            name: cfg.name.clone(),
            device: cfg.device_name.clone(),
            memory_bytes: crate::device::total_memory(device),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        match c.register(req).await {
            Ok(r) => {
                let r = r.into_inner();
                tracing::info!(worker_id = %r.worker_id, coordinator = %coordinators.url(), "registered");
                let heartbeat = Duration::from_millis(r.heartbeat_interval_ms.max(100));
                let outbox = Outbox::new(&cfg.work_dir);
                return Ok(Session { coordinators, client, worker_id: r.worker_id, heartbeat, outbox });
            }
            Err(s) if transient(&s) => {
                backoff.wait("register", &s).await;
                coordinators.rotate();
            }
            Err(status) => return Err(ServeError::Refused { call: "Register", status }),
        }
    }
}

/// Serves until `shutdown` resolves (or `max_jobs` are done).
pub async fn serve(cfg: ServeConfig, device: Device, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let coordinators = Coordinators::parse(&cfg)?;
    tokio::pin!(shutdown);
    let mut session = tokio::select! {
        s = register(coordinators, &cfg, &device) => s?,
        _ = &mut shutdown => return Ok(()),
    };
    let memory_device = device.clone();
    let mut pipeline = Some(
        Pipeline::new(device, cfg.work_dir.clone(), cfg.roots.clone())
            .with_memory_budget(cfg.memory_budget)
            .with_state_cache(cfg.state_cache)
            .with_recompute(cfg.recompute),
    );
    let mut done = 0usize;
    let mut backoff = Backoff::new();
    loop {
        if cfg.max_jobs.is_some_and(|m| done >= m) {
            return Ok(());
        }
        replay(&mut session).await;
        let held = pipeline.as_ref().map(Pipeline::held_models).unwrap_or_default();
        let req = LeaseJobRequest {
            worker_id: session.worker_id.clone(),
            held_models: held,
            wait_ms: cfg.lease_wait.as_millis() as u64,
            // Kept residual states in the device's memory count as free: they make room for the job.
            free_memory_bytes: crate::device::free_memory(&memory_device)
                .map(|free| free + pipeline.as_ref().map_or(0, Pipeline::reclaimable_bytes)),
            report_unfinished: cfg.exit_when_done,
        };
        let leased = tokio::select! {
            r = session.client.lease_job(req) => r,
            _ = &mut shutdown => return Ok(()),
        };
        let lease = match leased {
            Ok(r) => {
                backoff = Backoff::new();
                let r = r.into_inner();
                match r.lease {
                    Some(l) => l,
                    None if cfg.exit_when_done
                        && r.unfinished_jobs == Some(0)
                        && session.outbox.pending().is_empty() =>
                    {
                        tracing::info!(jobs = done, "no unfinished jobs left; exiting (--exit-when-done)");
                        return Ok(());
                    }
                    None => continue,
                }
            }
            Err(s) if s.code() == Code::NotFound || s.code() == Code::PermissionDenied => {
                tracing::warn!(error = %s.message(), "the coordinator does not know this worker; registering again");
                let Session { coordinators, .. } = session;
                session = register(coordinators, &cfg, &memory_device).await?;
                continue;
            }
            Err(s) if transient(&s) => {
                backoff.wait("lease", &s).await;
                session.fail_over();
                continue;
            }
            Err(status) => return Err(ServeError::Refused { call: "LeaseJob", status }),
        };
        let p = pipeline.take().expect("the pipeline is back after every job");
        let (p, stop_serving) = run_leased(&mut session, lease, p, &mut shutdown).await;
        pipeline = Some(p);
        done += 1;
        if stop_serving {
            return Ok(());
        }
    }
}

/// Runs one leased job with heartbeats, then reports it. Returns the pipeline and whether a
/// shutdown arrived meanwhile.
async fn run_leased(
    session: &mut Session,
    lease: Lease,
    mut pipeline: Pipeline,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> (Pipeline, bool) {
    let spec = lease.job.clone().unwrap_or_default();
    let (job_id, lease_id) = (spec.job_id, lease.lease_id.clone());
    tracing::info!(job_id, kind = spec.kind, key = %spec.key, attempt = lease.attempt, "leased");
    let job = match Job::try_from(&spec) {
        Ok(job) => job,
        Err(e) => {
            report(session, &lease_id, job_id, Err(e)).await;
            return (pipeline, false);
        }
    };
    pipeline.expect(&spec);
    let progress = Arc::new(Progress::default());
    let prog = progress.clone();
    let mut handle = tokio::task::spawn_blocking(move || {
        // A panic in a job (a bug, or a kernel assertion) fails that job, not the worker.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.run(&job, &prog))).unwrap_or_else(
            |payload| {
                pipeline.forget_model();
                Err(JobError::panicked(payload.as_ref()))
            },
        );
        (pipeline, out)
    });
    let mut ticker = tokio::time::interval(session.heartbeat);
    ticker.tick().await;
    let (mut dropped, mut shutting_down) = (false, false);
    let (pipeline, outcome) = loop {
        tokio::select! {
            joined = &mut handle => break joined.expect("the job thread does not panic"),
            _ = ticker.tick() => {
                let (phase, fraction) = progress.phase();
                let req = HeartbeatRequest {
                    worker_id: session.worker_id.clone(), lease_id: lease_id.clone(), job_id,
                    phase: Some(phase), progress: Some(fraction),
                    tokens_per_second: progress.tokens_per_second(),
                };
                match session.client.heartbeat(req).await.map(|r| r.into_inner().action) {
                    Ok(a) if a == HeartbeatAction::Cancel as i32 || a == HeartbeatAction::Lost as i32 => {
                        tracing::warn!(job_id, action = a, "the coordinator took the job back; stopping it");
                        dropped = true;
                        progress.stop.store(true, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    // The lease may still be renewed by a later heartbeat (to the next coordinator,
                    // when there are several); the reaper decides.
                    Err(s) => {
                        tracing::warn!(job_id, error = %s.message(), "heartbeat failed");
                        if transient(&s) {
                            session.fail_over();
                        }
                    }
                }
            }
            _ = shutdown.as_mut(), if !shutting_down => {
                tracing::info!(job_id, "shutting down: stopping the job at the next safe point");
                shutting_down = true;
                progress.stop.store(true, Ordering::SeqCst);
            }
        }
    };
    if dropped {
        return (pipeline, shutting_down);
    }
    report(session, &lease_id, job_id, outcome).await;
    (pipeline, shutting_down)
}

/// Writes the job's report to the outbox, then delivers it.
async fn report(session: &mut Session, lease_id: &str, job_id: i64, outcome: Result<pipeline::JobOutput, JobError>) {
    let report = match &outcome {
        Ok(out) => Report::Complete(Box::new(CompleteJobRequest {
            worker_id: session.worker_id.clone(),
            lease_id: lease_id.to_string(),
            job_id,
            results: out.results.clone(),
            distances: out.distances.clone(),
            layers_dropped: out.layers_dropped.clone(),
            num_layers: out.num_layers,
            timings: out.timings.clone(),
            provenance: out.provenance.clone(),
        })),
        Err(f) => Report::Fail(FailJobRequest {
            worker_id: session.worker_id.clone(),
            lease_id: lease_id.to_string(),
            job_id,
            message: f.to_string(),
            error_kind: f.kind().to_string(),
            retryable: f.is_retryable(),
        }),
    };
    let stored = match session.outbox.put(&report) {
        Ok(path) => Some(path),
        Err(e) => {
            tracing::error!(job_id, error = %e, "could not write the report to the outbox; sending it unsaved");
            None
        }
    };
    match deliver(session, &report, 8).await {
        Delivery::Accepted | Delivery::Refused => {
            if let Some(path) = stored {
                session.outbox.remove(&path);
            }
            match &outcome {
                Ok(_) => tracing::info!(job_id, "completed"),
                Err(f) => tracing::warn!(job_id, kind = f.kind(), error = %f, "failed"),
            }
        }
        Delivery::Unreachable => {
            tracing::error!(job_id, "no coordinator reachable; the report waits in the outbox and is sent later")
        }
    }
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// A coordinator took it.
    Accepted,
    /// A coordinator refused it for good (a stale lease: the job was leased again; a cancelled
    /// sweep): there is nothing to keep.
    Refused,
    /// No coordinator answered within the tries.
    Unreachable,
}

/// Sends one report, with backoff and failover over up to `tries` transport failures.
async fn deliver(session: &mut Session, report: &Report, tries: usize) -> Delivery {
    let mut backoff = Backoff::new();
    for _ in 0..tries {
        let sent = match report {
            Report::Complete(r) => session.client.complete_job(r.as_ref().clone()).await.map(|_| ()),
            Report::Fail(r) => session.client.fail_job(r.clone()).await.map(|_| ()),
        };
        match sent {
            Ok(()) => return Delivery::Accepted,
            Err(s) if transient(&s) => {
                backoff.wait("reporting the job", &s).await;
                session.fail_over();
            }
            Err(s) => {
                tracing::warn!(job_id = report.job_id(), error = %s.message(), "the coordinator refused the report; dropping it");
                return Delivery::Refused;
            }
        }
    }
    Delivery::Unreachable
}

/// Delivers the outbox's reports (left by a coordinator's outage or this worker's restart), one
/// try each; stops at the first coordinator that does not answer.
async fn replay(session: &mut Session) {
    for stored in session.outbox.pending() {
        let job_id = stored.report.job_id();
        match deliver(session, &stored.report, 1).await {
            Delivery::Accepted => {
                tracing::info!(job_id, "delivered a report kept in the outbox");
                session.outbox.remove(&stored.path);
            }
            Delivery::Refused => session.outbox.remove(&stored.path),
            Delivery::Unreachable => return,
        }
    }
}

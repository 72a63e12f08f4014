//! The tonic services: `SweepService` (clients) and `WorkerService` (workers).
//!
//! This is the only place that sees protobuf types: requests become domain values, the store does
//! the work, and results become protobuf again ([`convert`] holds every conversion). Store errors
//! become gRPC statuses through one `From<StoreError> for Status` that names every variant.

pub(crate) mod convert;
pub mod limits;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_server::SweepServiceServer;
use prunesweep_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::group_commit::GroupCommit;
use crate::job::{JobKind, JobState, SweepState};
use crate::metrics::{Metrics, ScrapeError};
use crate::store::{now_ms, Failure, HeartbeatOutcome, JobStore, LeaseRequest, StoreError, WorkerInfo};
use crate::sweep::SweepSpec;
use convert::{job_result, job_spec, sweep_status};

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::SweepNotFound(_) | StoreError::JobNotFound(_) => Status::not_found(msg),
            StoreError::StaleLease { .. } | StoreError::Transition(_) => Status::failed_precondition(msg),
            StoreError::NotYourLease { .. } => Status::permission_denied(msg),
            StoreError::BadUrl(_) => Status::invalid_argument(msg),
            StoreError::Corrupt(_) | StoreError::Migrate(_) => Status::internal(msg),
            StoreError::Database(_) | StoreError::Unavailable(_) => Status::unavailable(msg),
        }
    }
}

/// Both services over one store.
#[derive(Clone)]
pub struct Coordinator {
    /// The job store.
    store: Arc<dyn JobStore>,
    /// Leases and completions, many to a transaction under load.
    writes: GroupCommit,
    /// Lease timing and long-poll limits.
    config: Config,
    /// Woken when jobs may have become runnable (submit, complete, fail, retry, reclaim), so that
    /// long-polling `LeaseJob` calls retry at once.
    wake: Arc<Notify>,
    /// Worker ids known to be registered: checked against the store once, then remembered, so
    /// that a lease poll costs no extra query.
    known_workers: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Each worker's free device memory as its last `LeaseJob` here reported it.
    free_memory: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// Turns true when the server starts shutting down: open `WatchSweep` streams end then
    /// (UNAVAILABLE, so clients watch again elsewhere) instead of holding the shutdown open.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Counters and latencies for `GET /metrics` ([`Coordinator::render_metrics`]).
    metrics: Arc<Metrics>,
}

impl Coordinator {
    /// Services over `store`. `wake` and `metrics` are shared with the reaper. Starts the
    /// [`GroupCommit`] tasks, so it must be called inside a Tokio runtime.
    pub fn new(
        store: Arc<dyn JobStore>,
        config: Config,
        wake: Arc<Notify>,
        stopping: tokio::sync::watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let writes = GroupCommit::start(store.clone());
        Self {
            store,
            writes,
            config,
            wake,
            known_workers: Arc::default(),
            free_memory: Arc::default(),
            stopping,
            metrics,
        }
    }

    /// Every metric in the Prometheus text format, the gauges read now ([`Metrics::render`]).
    pub async fn render_metrics(&self) -> Result<String, ScrapeError> {
        let free = self.free_memory.lock().expect("never poisoned").clone();
        self.metrics.render(&*self.store, &free, self.config.lease_ttl, now_ms()).await
    }

    /// The client service, with this module's message-size limits
    /// ([`limits::MAX_DECODING_MESSAGE_SIZE`], [`limits::MAX_ENCODING_MESSAGE_SIZE`]).
    pub fn sweep_service(&self) -> SweepServiceServer<Coordinator> {
        SweepServiceServer::new(self.clone())
            .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(limits::MAX_ENCODING_MESSAGE_SIZE)
    }

    /// The worker service, with the same message-size limits.
    pub fn worker_service(&self) -> WorkerServiceServer<Coordinator> {
        WorkerServiceServer::new(self.clone())
            .max_decoding_message_size(limits::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(limits::MAX_ENCODING_MESSAGE_SIZE)
    }
}

impl Coordinator {
    /// Jobs of active sweeps that are not finished (blocked, pending or leased): what an idle
    /// batch worker waits for before it exits (`LeaseJobResponse.unfinished_jobs`).
    async fn unfinished_jobs(&self) -> Result<u64, Status> {
        let sweeps = self.metrics.time_store("sweeps", self.store.sweeps()).await?;
        let unfinished = JobState::ALL.into_iter().filter(|j| !j.is_terminal());
        Ok(sweeps
            .iter()
            .filter(|s| s.state == SweepState::Active)
            .flat_map(|s| unfinished.clone().map(|j| u64::from(s.count(j))))
            .sum())
    }

    /// Leases go to registered workers only: an unknown id gets NOT_FOUND, on which a worker
    /// registers again.
    async fn check_registered(&self, worker_id: &str) -> Result<(), Status> {
        if self.known_workers.lock().expect("never poisoned").contains(worker_id) {
            return Ok(());
        }
        if !self.store.worker_exists(worker_id).await? {
            return Err(Status::not_found(format!("worker {worker_id:?} is not registered: call Register first")));
        }
        self.known_workers.lock().expect("never poisoned").insert(worker_id.to_string());
        Ok(())
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[tonic::async_trait]
impl pb::sweep_service_server::SweepService for Coordinator {
    async fn submit_sweep(
        &self,
        request: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let req = request.into_inner();
        let file = req.file_name.as_deref().unwrap_or("<sweep>");
        let spec = SweepSpec::parse(&req.yaml, file).map_err(|e| Status::invalid_argument(e.to_string()))?;
        spec.check_job_count(self.config.max_jobs_per_submit, file)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let jobs = spec.expand();
        let out = self.metrics.time_store("submit", self.store.submit(&spec, &jobs, now_ms())).await?;
        self.wake.notify_waiters();
        tracing::info!(sweep = %spec.name, added = out.jobs_added, total = out.jobs_total, "submitted");
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep: spec.name.to_string(),
            created: out.created,
            jobs_added: out.jobs_added,
            jobs_total: out.jobs_total,
        }))
    }

    async fn get_sweep(&self, request: Request<pb::GetSweepRequest>) -> Result<Response<pb::SweepStatus>, Status> {
        let sweep = request.into_inner().sweep;
        let counts = self.store.sweep(&sweep).await?;
        let running = self.store.running(&sweep).await?;
        let mut status = sweep_status(&counts);
        status.running = running.iter().map(pb::RunningJob::from).collect();
        Ok(Response::new(status))
    }

    async fn list_sweeps(
        &self,
        _request: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let sweeps = self.store.sweeps().await?;
        Ok(Response::new(pb::ListSweepsResponse { sweeps: sweeps.iter().map(sweep_status).collect() }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<pb::CancelSweepRequest>,
    ) -> Result<Response<pb::CancelSweepResponse>, Status> {
        let sweep = request.into_inner().sweep;
        let n = self.store.cancel(&sweep, now_ms()).await?;
        tracing::info!(%sweep, cancelled = n, "cancelled");
        Ok(Response::new(pb::CancelSweepResponse { jobs_cancelled: n }))
    }

    async fn retry_sweep(
        &self,
        request: Request<pb::RetrySweepRequest>,
    ) -> Result<Response<pb::RetrySweepResponse>, Status> {
        let req = request.into_inner();
        let n = self.store.retry(&req.sweep, req.include_cancelled, now_ms()).await?;
        self.wake.notify_waiters();
        Ok(Response::new(pb::RetrySweepResponse { jobs_requeued: n }))
    }

    type WatchSweepStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send + 'static>>;

    async fn watch_sweep(
        &self,
        request: Request<pb::WatchSweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        let req = request.into_inner();
        self.store.sweep(&req.sweep).await?; // NOT_FOUND before the stream starts
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        let poll = self.config.watch_poll;
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut after = req.after_seq;
            // Set once the sweep's counts said it is done: every event is written by then, so
            // the next read of events brings the last of them, and an empty read ends the stream.
            // (The events are read before the counts they are sent with, so a job that finished
            // between the two reads has its event in the next read, not in this one.)
            let mut done = false;
            loop {
                let result = async {
                    let events = store.events(&req.sweep, after, 256).await?;
                    if done && events.is_empty() {
                        return Ok(None);
                    }
                    let counts = store.sweep(&req.sweep).await?;
                    Ok::<_, StoreError>(Some((events, counts)))
                }
                .await;
                let (events, counts) = match result {
                    Ok(Some(x)) => x,
                    Ok(None) => return, // done, and every event sent
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let caught_up = events.len() < 256;
                for e in events {
                    after = e.seq;
                    let event = pb::JobEvent {
                        seq: e.seq,
                        job_id: e.job_id,
                        kind: pb::JobKind::from(e.kind) as i32,
                        state: pb::JobState::from(e.state) as i32,
                        worker_id: e.worker_id,
                        message: e.message,
                        at_ms: e.at,
                        status: Some(sweep_status(&counts)),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return; // the client went away
                    }
                }
                done = caught_up && counts.is_done();
                if caught_up && !done {
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = tx.closed() => return,
                        // (The guard `wait_for` returns is not `Send`: dropped inside.)
                        _ = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                            let _ = tx.send(Err(Status::unavailable(format!(
                                "the coordinator is shutting down; watch again from after_seq {after} (on its \
                                 successor, or once it is back)"
                            )))).await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_results(
        &self,
        request: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        let req = request.into_inner();
        let after = match req.page_token.as_str() {
            "" => 0,
            token => token.parse::<i64>().map_err(|_| {
                Status::invalid_argument(format!(
                    "`page_token` {token:?} is not one this coordinator gave: pass the previous reply's \
                     `next_page_token`, or nothing for the first page"
                ))
            })?,
        };
        let size = match req.page_size {
            0 => limits::MAX_RESULTS_PAGE_SIZE,
            n => n.min(limits::MAX_RESULTS_PAGE_SIZE),
        };
        let page = self.store.results_page(&req.sweep, after, size).await?;
        let full = page.len() == size as usize;
        let (mut jobs, mut bytes, mut last) = (Vec::with_capacity(page.len()), 0, after);
        let mut cut = false;
        for job in page {
            let distances = match job.job.kind {
                JobKind::Score => self.store.distances(job.job.id).await?,
                _ => Vec::new(),
            };
            let job = job_result(job, &distances);
            let len = job.encoded_len();
            if !jobs.is_empty() && bytes + len > limits::RESULTS_PAGE_BYTES {
                cut = true;
                break;
            }
            bytes += len;
            last = job.job_id;
            jobs.push(job);
        }
        let next_page_token = if full || cut { last.to_string() } else { String::new() };
        Ok(Response::new(pb::ListResultsResponse { jobs, next_page_token }))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.store.workers().await?;
        let free = self.free_memory.lock().expect("never poisoned");
        let workers = workers
            .iter()
            .map(|w| pb::WorkerStatus { free_memory_bytes: free.get(&w.id).copied(), ..pb::WorkerStatus::from(w) })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for Coordinator {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        limits::check_register(&req)?;
        let info =
            WorkerInfo { name: req.name, device: req.device, memory_bytes: req.memory_bytes, version: req.version };
        let worker_id = self.metrics.time_store("register", self.store.register_worker(&info, now_ms())).await?;
        self.known_workers.lock().expect("never poisoned").insert(worker_id.clone());
        tracing::info!(%worker_id, name = %info.name, device = %info.device, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            lease_ttl_ms: self.config.lease_ttl.as_millis() as u64,
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn lease_job(&self, request: Request<pb::LeaseJobRequest>) -> Result<Response<pb::LeaseJobResponse>, Status> {
        let req = request.into_inner();
        if req.worker_id.is_empty() {
            return Err(Status::invalid_argument("`worker_id` is required: call Register first"));
        }
        limits::check_lease(&req)?;
        let t0 = tokio::time::Instant::now();
        let mut parked = Duration::ZERO;
        self.check_registered(&req.worker_id).await?;
        self.metrics.contact(&req.worker_id, now_ms());
        if let Some(free) = req.free_memory_bytes {
            self.free_memory.lock().expect("never poisoned").insert(req.worker_id.clone(), free);
        }
        let wait = Duration::from_millis(req.wait_ms).min(self.config.max_wait);
        let deadline = tokio::time::Instant::now() + wait;
        let ttl = ms(self.config.lease_ttl);
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let request = LeaseRequest {
                worker_id: req.worker_id.clone(),
                held_models: req.held_models.clone(),
                ttl_ms: ttl,
                free_memory_bytes: req.free_memory_bytes,
            };
            if let Some(leased) = self.metrics.time_store("lease", self.writes.lease(request)).await? {
                tracing::debug!(job = leased.job.id, worker = %req.worker_id, "leased");
                self.metrics.leased(&leased.lease_id, leased.job.kind);
                self.metrics.lease_handled(t0.elapsed().saturating_sub(parked));
                let lease = pb::Lease {
                    lease_id: leased.lease_id,
                    job: Some(job_spec(&leased.job, &leased.distances)),
                    expires_at_ms: leased.expires_at,
                    attempt: leased.job.attempts + 1,
                };
                return Ok(Response::new(pb::LeaseJobResponse { lease: Some(lease), unfinished_jobs: None }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.metrics.lease_handled(t0.elapsed().saturating_sub(parked));
                // Counted only for the batch workers that ask: idle pollers would each cost a
                // scan of every sweep's counts.
                let unfinished = if req.report_unfinished { Some(self.unfinished_jobs().await?) } else { None };
                return Ok(Response::new(pb::LeaseJobResponse { lease: None, unfinished_jobs: unfinished }));
            }
            // Also re-poll now and then: another coordinator on the same Postgres may add jobs.
            let nap = (deadline - now).min(Duration::from_millis(500));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
            parked += now.elapsed();
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        limits::check_heartbeat(&req)?;
        self.metrics.heartbeat(&req.worker_id, req.phase.as_deref(), req.tokens_per_second);
        let beat = convert::heartbeat(req, ms(self.config.lease_ttl));
        let outcome = self.metrics.time_store("heartbeat", self.store.heartbeat(&beat, now_ms())).await?;
        self.metrics.contact(&beat.worker_id, now_ms());
        let (action, expires_at_ms) = match outcome {
            HeartbeatOutcome::Renewed(t) => (pb::HeartbeatAction::Continue, t),
            HeartbeatOutcome::Cancelled => (pb::HeartbeatAction::Cancel, 0),
            HeartbeatOutcome::Lost => (pb::HeartbeatAction::Lost, 0),
        };
        Ok(Response::new(pb::HeartbeatResponse { action: action as i32, expires_at_ms }))
    }

    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::CompleteJobResponse>, Status> {
        let req = request.into_inner();
        limits::check_completion(&req)?;
        let completion = convert::completion(req)?;
        let lease_id = completion.lease_id.clone();
        self.metrics.time_store("complete", self.writes.complete(completion)).await?;
        self.metrics.completed(&lease_id);
        self.wake.notify_waiters();
        Ok(Response::new(pb::CompleteJobResponse {}))
    }

    async fn fail_job(&self, request: Request<pb::FailJobRequest>) -> Result<Response<pb::FailJobResponse>, Status> {
        let mut req = request.into_inner();
        limits::check_failure(&mut req)?;
        let failure = Failure {
            worker_id: req.worker_id,
            job_id: req.job_id,
            lease_id: req.lease_id,
            message: req.message,
            error_kind: if req.error_kind.is_empty() { "unknown".into() } else { req.error_kind },
            retryable: req.retryable,
        };
        let state = self.metrics.time_store("fail", self.store.fail(&failure, now_ms())).await?;
        self.metrics.failed(&failure.lease_id, &failure.error_kind, failure.retryable);
        tracing::warn!(job = failure.job_id, kind = %failure.error_kind, %state, "job failed: {}", failure.message);
        self.wake.notify_waiters();
        Ok(Response::new(pb::FailJobResponse { state: pb::JobState::from(state) as i32 }))
    }
}

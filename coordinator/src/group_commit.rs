//! Group commit for the two hot writes, `LeaseJob` and `CompleteJob`.
//!
//! Every lease and every completion is a write transaction, and with many workers the store spends
//! its time beginning and committing them (a WAL append in SQLite, an fsync in Postgres) rather
//! than doing the work. [`GroupCommit`] runs one task per kind of write: it takes the first waiting
//! call, adds every call that queued up while the previous transaction ran (up to
//! [`MAX_BATCH`]), and serves them all in one transaction ([`JobStore::lease_batch`],
//! [`JobStore::complete_batch`]). A lone call is served at once, so latency at low load is that of a
//! plain transaction; under load, a batch per transaction.
//!
//! If a batch's transaction fails as a whole (the database, not one item), its calls are served
//! again one by one, so that one bad call cannot fail its neighbours and each gets its own error.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{now_ms, Completion, JobStore, LeaseRequest, LeasedJob, StoreError};

/// The most calls served by one transaction.
pub const MAX_BATCH: usize = 128;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Handles to the lease and completion queues; cheap to clone. The tasks behind them stop when the
/// last handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    leases: mpsc::Sender<(LeaseRequest, Reply<Option<LeasedJob>>)>,
    completions: mpsc::Sender<(Completion, Reply<()>)>,
}

/// The queue's task has stopped (only when the runtime shuts down).
fn stopped() -> StoreError {
    StoreError::Unavailable("the coordinator is shutting down".into())
}

impl GroupCommit {
    /// Starts the two queue tasks over `store` (on the current Tokio runtime).
    pub fn start(store: Arc<dyn JobStore>) -> Self {
        let (leases, lease_rx) = mpsc::channel(4 * MAX_BATCH);
        let (completions, completion_rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(serve_leases(store.clone(), lease_rx));
        tokio::spawn(serve_completions(store, completion_rx));
        Self { leases, completions }
    }

    /// Lease a job for `request` (see [`JobStore::lease_next`]).
    pub async fn lease(&self, request: LeaseRequest) -> Result<Option<LeasedJob>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.leases.send((request, tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Finish a job (see [`JobStore::complete`]).
    pub async fn complete(&self, completion: Completion) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.completions.send((completion, tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The next batch: the first call to arrive, then whatever queued up behind it (up to
/// [`MAX_BATCH`]), split into the calls and their reply channels. `None` once every handle is gone.
async fn next_batch<T, R>(queue: &mut mpsc::Receiver<(T, Reply<R>)>) -> Option<(Vec<T>, Vec<Reply<R>>)> {
    let mut calls = vec![queue.recv().await?];
    while calls.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(call) => calls.push(call),
            Err(_) => break,
        }
    }
    Some(calls.into_iter().unzip())
}

/// Answers each call of a batch with its outcome, in order. A caller that went away (its RPC was
/// cancelled) leaves a lease to expire and be reclaimed, as it would have without batching.
fn answer<R>(replies: Vec<Reply<R>>, outcomes: Vec<Result<R, StoreError>>) {
    debug_assert_eq!(outcomes.len(), replies.len());
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

async fn serve_leases(store: Arc<dyn JobStore>, mut queue: mpsc::Receiver<(LeaseRequest, Reply<Option<LeasedJob>>)>) {
    while let Some((requests, replies)) = next_batch(&mut queue).await {
        let outcomes = match store.lease_batch(&requests, now_ms()).await {
            Ok(leases) => leases.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::warn!("lease batch of {} failed ({e}); serving them one by one", requests.len());
                let mut out = Vec::with_capacity(requests.len());
                for r in &requests {
                    out.push(store.lease_next(&r.worker_id, &r.held_models, r.ttl_ms, now_ms()).await);
                }
                out
            }
        };
        answer(replies, outcomes);
    }
}

async fn serve_completions(store: Arc<dyn JobStore>, mut queue: mpsc::Receiver<(Completion, Reply<()>)>) {
    while let Some((completions, replies)) = next_batch(&mut queue).await {
        let outcomes = match store.complete_batch(&completions, now_ms()).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::warn!("completion batch of {} failed ({e}); serving them one by one", completions.len());
                let mut out = Vec::with_capacity(completions.len());
                for c in &completions {
                    out.push(store.complete(c, now_ms()).await);
                }
                out
            }
        };
        answer(replies, outcomes);
    }
}

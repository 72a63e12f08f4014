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
        tokio::spawn(serve(lease_rx, {
            let store = store.clone();
            move |requests: Vec<LeaseRequest>| {
                let store = store.clone();
                async move {
                    let now = now_ms();
                    match store.lease_batch(&requests, now).await {
                        Ok(leases) => leases.into_iter().map(Ok).collect(),
                        Err(e) => {
                            tracing::warn!("lease batch of {} failed ({e}); serving them one by one", requests.len());
                            let mut out = Vec::with_capacity(requests.len());
                            for r in &requests {
                                let one = store.lease_batch(std::slice::from_ref(r), now_ms()).await;
                                out.push(one.map(|mut v| v.pop().flatten()));
                            }
                            out
                        }
                    }
                }
            }
        }));
        tokio::spawn(serve(completion_rx, move |completions: Vec<Completion>| {
            let store = store.clone();
            async move {
                match store.complete_batch(&completions, now_ms()).await {
                    Ok(outcomes) => outcomes,
                    Err(e) => {
                        tracing::warn!(
                            "completion batch of {} failed ({e}); serving them one by one",
                            completions.len()
                        );
                        let mut out = Vec::with_capacity(completions.len());
                        for c in &completions {
                            out.push(store.complete(c, now_ms()).await);
                        }
                        out
                    }
                }
            }
        }));
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

/// Drains `queue` in batches through `run`, which answers each call of a batch in order.
async fn serve<T, R, F, Fut>(mut queue: mpsc::Receiver<(T, Reply<R>)>, run: F)
where
    F: Fn(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<R, StoreError>>>,
{
    while let Some(first) = queue.recv().await {
        let mut calls = vec![first];
        while calls.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<T>, Vec<Reply<R>>) = calls.into_iter().unzip();
        let outcomes = run(items).await;
        debug_assert_eq!(outcomes.len(), replies.len());
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // A caller that went away (its RPC was cancelled) leaves a lease to expire and be
            // reclaimed, as it would have without batching.
            let _ = reply.send(outcome);
        }
    }
}

//! The store's SQL, written once for both backends: [`SqlStore`] implements [`JobStore`] for any
//! [`Dialect`] by opening one transaction ([`Tx`]) per call and running the queries of one of
//! these files in it:
//!
//! - `submit.rs`: a sweep and its jobs, each starting in [`crate::job::JobStatus::initial`];
//! - `lease.rs`: the lease batch (model affinity, one `UPDATE` for the batch);
//! - `complete.rs`: completions and failures, and what they do to the jobs that wait for them;
//! - `reap.rs`: expired leases;
//! - `control.rs`: cancel and retry, a user's decisions about a whole sweep;
//! - `workers.rs`: registration, heartbeats, the worker list;
//! - `read.rs`: counts, events, jobs, results, running jobs;
//! - `rows.rs`: the one list of job columns and the row → [`crate::job::JobStatus`] / [`JobRow`]
//!   readers.
//!
//! # Bounds
//!
//! The query code is generic over the database `DB`, and sqlx states what a database can do as
//! bounds on other types (`&mut DB::Connection` runs queries; `i64` encodes for `DB`). Rust does
//! not infer those from `DB: Dialect`, so every `impl` block of [`Tx`] repeats the same `where`
//! clause: the connection runs queries, columns are found by name, `&str` is a [`Param`], and
//! `i64`, `f64`, `String` and their `Option`s are [`Scalar`]s of `DB`. Each file has one such
//! block (this one two: the shared helpers, and the [`JobStore`] impl).
//!
//! # Batches
//!
//! The hot writes, [`JobStore::lease_batch`] and [`JobStore::complete_batch`], take a fixed
//! number of statements per batch (per-row values go in `CASE id WHEN … THEN …` and multi-row
//! `INSERT`s): a statement's round trip, not the work in it, is what a small transaction costs.

mod complete;
mod control;
mod lease;
mod read;
mod reap;
mod rows;
mod submit;
mod workers;

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{ColumnIndex, Database, Executor, Pool, QueryBuilder, Row, SqlSafeStr, Transaction};

use super::dialect::{Dialect, Param, Scalar};
use super::{
    Completion, DistanceRow, EventRow, Failure, Heartbeat, HeartbeatOutcome, JobResults, JobRow, JobStore,
    LeaseRequest, LeasedJob, RunningJob, StoreError, SubmitOutcome, SweepCounts, WorkerInfo, WorkerRow,
};
use crate::job::JobState;
use crate::sweep::{PlannedJob, SweepSpec};

/// A job store in a database of dialect `DB` ([`super::SqliteStore`], [`super::PgStore`]).
#[derive(Debug, Clone)]
pub struct SqlStore<DB: Database> {
    /// The connection pool.
    pool: Pool<DB>,
}

impl<DB: Database> SqlStore<DB> {
    /// A store over a migrated pool.
    pub(super) fn new(pool: Pool<DB>) -> Self {
        Self { pool }
    }
}

/// A migrator over `(description, sql)` migrations, numbered from 1 in order.
pub(super) fn migrations<const N: usize>(sql: [(&'static str, &'static str); N]) -> Migrator {
    let migrations = sql.into_iter().zip(1..).map(|((description, sql), version)| {
        Migration::new(version, description.into(), MigrationType::Simple, sql.into_sql_str(), false)
    });
    Migrator::with_migrations(migrations.collect())
}

/// One transaction of the store. Each [`JobStore`] call opens one, runs its queries in it (the
/// methods in this folder's files) and commits it, so a call's writes land together or not at all.
///
/// Its events are written last, just before the commit ([`Tx::commit`]), after
/// [`Dialect::ORDER_EVENTS`]: a follower of a sweep's events reads them by sequence number
/// (`WatchSweep`'s `after_seq`), which only works if no event commits after one with a higher
/// number.
pub(super) struct Tx<DB: Database> {
    tx: Transaction<'static, DB>,
    /// Events recorded by the call, with their time, written by [`Tx::commit`].
    events: Vec<(NewEvent, i64)>,
}

impl<DB: Dialect> Tx<DB> {
    /// A transaction that writes ([`Dialect::begin_write`]).
    async fn write(pool: &Pool<DB>) -> Result<Self, sqlx::Error> {
        Ok(Self { tx: DB::begin_write(pool).await?, events: Vec::new() })
    }

    /// A transaction that only reads: on SQLite its statements share one snapshot.
    async fn read(pool: &Pool<DB>) -> Result<Self, sqlx::Error> {
        Ok(Self { tx: pool.begin().await?, events: Vec::new() })
    }

    /// Records events (jobs' new states at `now`), to be written when the transaction commits.
    pub(super) fn record_events(&mut self, events: impl IntoIterator<Item = NewEvent>, now: i64) {
        self.events.extend(events.into_iter().map(|e| (e, now)));
    }

    /// The connection, to run a query on.
    fn conn(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

/// An event row to append: a job's new state.
pub(super) struct NewEvent {
    pub(super) sweep_id: i64,
    pub(super) job_id: i64,
    pub(super) state: JobState,
    pub(super) worker_id: Option<String>,
    pub(super) message: Option<String>,
}

/// Rows per multi-row `INSERT` (6 parameters a row stays far below SQLite's and Postgres' limits).
pub(super) const ROWS_PER_INSERT: usize = 1000;

/// Jobs per submit transaction. A bigger submit commits after each chunk, so a lease or a
/// heartbeat waits for one chunk (tens of milliseconds on SQLite, whose pool has one connection),
/// never for the whole sweep. A submit that fails part-way keeps the chunks it wrote; submitting
/// again adds the rest (jobs are keyed by content).
const SUBMIT_CHUNK: usize = 1000;

impl<DB: Dialect> Tx<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: ColumnIndex<DB::Row> + Param<DB>,
    i64: Scalar<DB>,
    Option<i64>: Scalar<DB>,
    f64: Scalar<DB>,
    Option<f64>: Scalar<DB>,
    String: Scalar<DB>,
    Option<String>: Scalar<DB>,
{
    /// Writes the recorded events (many rows per statement, after [`Dialect::ORDER_EVENTS`]) and
    /// commits.
    async fn commit(mut self) -> Result<(), sqlx::Error> {
        if !self.events.is_empty() {
            if let Some(order) = DB::ORDER_EVENTS {
                sqlx::query(order).execute(self.conn()).await?;
            }
            let events = std::mem::take(&mut self.events);
            for chunk in events.chunks(ROWS_PER_INSERT) {
                let mut insert =
                    QueryBuilder::<DB>::new("INSERT INTO events (sweep_id, job_id, state, worker_id, message, at) ");
                insert.push_values(chunk, |mut row, (e, at)| {
                    row.push_bind(e.sweep_id)
                        .push_bind(e.job_id)
                        .push_bind(e.state.as_str())
                        .push_bind(e.worker_id.clone())
                        .push_bind(e.message.clone())
                        .push_bind(*at);
                });
                insert.build().execute(self.conn()).await?;
            }
        }
        self.tx.commit().await
    }

    /// The id of the sweep named `name`.
    pub(super) async fn sweep_id(&mut self, name: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT id FROM sweeps WHERE name = $1")
            .bind(name)
            .fetch_optional(self.conn())
            .await?
            .ok_or_else(|| StoreError::SweepNotFound(name.to_string()))?;
        Ok(row.try_get("id")?)
    }
}

/// `, column = CASE id WHEN … THEN … END`: a per-row value in one `UPDATE`.
pub(super) fn push_case<DB, T>(update: &mut QueryBuilder<DB>, column: &str, values: impl IntoIterator<Item = (i64, T)>)
where
    DB: Database,
    i64: Scalar<DB>,
    T: Param<DB>,
{
    update.push(", ").push(column).push(" = CASE id");
    for (id, value) in values {
        update.push(" WHEN ").push_bind(id).push(" THEN ").push_bind(value);
    }
    update.push(" END");
}

/// `id IN (…)`.
pub(super) fn push_ids<DB>(query: &mut QueryBuilder<DB>, ids: impl Iterator<Item = i64>)
where
    DB: Database,
    i64: Scalar<DB>,
{
    query.push("id IN (");
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(id);
    }
    query.push(")");
}

/// Each method opens a transaction, runs one `Tx` method from the files above, and commits.
/// One store call in one transaction: open it (`read` or `write`), run the call on it, commit,
/// and return what the call returned.
macro_rules! in_tx {
    ($kind:ident, $pool:expr, $tx:ident => $call:expr) => {{
        let mut $tx = Tx::$kind($pool).await?;
        let out = $call.await?;
        $tx.commit().await?;
        Ok(out)
    }};
}

#[async_trait]
impl<DB: Dialect> JobStore for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: ColumnIndex<DB::Row> + Param<DB>,
    i64: Scalar<DB>,
    Option<i64>: Scalar<DB>,
    f64: Scalar<DB>,
    Option<f64>: Scalar<DB>,
    String: Scalar<DB>,
    Option<String>: Scalar<DB>,
{
    async fn submit(&self, spec: &SweepSpec, jobs: &[PlannedJob], now: i64) -> Result<SubmitOutcome, StoreError> {
        let mut chunks = jobs.chunks(SUBMIT_CHUNK);
        let mut known = HashMap::new();
        let mut tx = Tx::write(&self.pool).await?;
        let (sweep_id, created, mut added) =
            tx.submit_first(spec, chunks.next().unwrap_or(&[]), &mut known, now).await?;
        for chunk in chunks {
            tx.commit().await?;
            tx = Tx::write(&self.pool).await?;
            added += tx.submit_more(sweep_id, spec, chunk, &mut known, now).await?;
        }
        let jobs_total = tx.job_total(sweep_id).await?;
        tx.commit().await?;
        Ok(SubmitOutcome { created, jobs_added: added, jobs_total })
    }

    async fn sweep(&self, name: &str) -> Result<SweepCounts, StoreError> {
        in_tx!(read, &self.pool, tx => tx.sweep(name))
    }

    async fn sweeps(&self) -> Result<Vec<SweepCounts>, StoreError> {
        in_tx!(read, &self.pool, tx => tx.sweeps())
    }

    async fn cancel(&self, name: &str, now: i64) -> Result<u32, StoreError> {
        in_tx!(write, &self.pool, tx => tx.cancel(name, now))
    }

    async fn retry(&self, name: &str, include_cancelled: bool, now: i64) -> Result<u32, StoreError> {
        in_tx!(write, &self.pool, tx => tx.retry(name, include_cancelled, now))
    }

    async fn register_worker(&self, worker: &WorkerInfo, now: i64) -> Result<String, StoreError> {
        in_tx!(write, &self.pool, tx => tx.register_worker(worker, now))
    }

    async fn lease_batch(&self, requests: &[LeaseRequest], now: i64) -> Result<Vec<Option<LeasedJob>>, StoreError> {
        in_tx!(write, &self.pool, tx => tx.lease_batch(requests, now))
    }

    async fn heartbeat(&self, beat: &Heartbeat, now: i64) -> Result<HeartbeatOutcome, StoreError> {
        in_tx!(write, &self.pool, tx => tx.heartbeat(beat, now))
    }

    async fn complete_batch(
        &self,
        completions: &[Completion],
        now: i64,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        in_tx!(write, &self.pool, tx => tx.complete_batch(completions, now))
    }

    async fn fail(&self, failure: &Failure, now: i64) -> Result<JobState, StoreError> {
        in_tx!(write, &self.pool, tx => tx.fail(failure, now))
    }

    async fn reclaim_expired(&self, now: i64) -> Result<u32, StoreError> {
        in_tx!(write, &self.pool, tx => tx.reclaim_expired(now))
    }

    async fn events(&self, sweep: &str, after_seq: i64, limit: i64) -> Result<Vec<EventRow>, StoreError> {
        in_tx!(read, &self.pool, tx => tx.events(sweep, after_seq, limit))
    }

    async fn job(&self, job_id: i64) -> Result<JobRow, StoreError> {
        in_tx!(read, &self.pool, tx => tx.job(job_id))
    }

    async fn results_page(&self, sweep: &str, after_job_id: i64, limit: u32) -> Result<Vec<JobResults>, StoreError> {
        in_tx!(read, &self.pool, tx => tx.results(sweep, after_job_id, i64::from(limit)))
    }

    async fn distances(&self, job_id: i64) -> Result<Vec<DistanceRow>, StoreError> {
        in_tx!(read, &self.pool, tx => tx.distances(job_id))
    }

    async fn running(&self, sweep: &str) -> Result<Vec<RunningJob>, StoreError> {
        in_tx!(read, &self.pool, tx => tx.running(sweep))
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        in_tx!(read, &self.pool, tx => tx.workers())
    }

    async fn worker_exists(&self, worker_id: &str) -> Result<bool, StoreError> {
        in_tx!(read, &self.pool, tx => tx.worker_exists(worker_id))
    }
}

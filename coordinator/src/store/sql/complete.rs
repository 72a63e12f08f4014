//! Finishing jobs: completions (in batches) and failures, and what a finished score job does to
//! the cells that wait for it ([`Tx::settle_dependents`]).
//!
//! Rows are locked in id order (a job's dependency always has a smaller id than the job), as
//! cancel locks them, so a completion and a cancel of the same sweep queue behind each other on
//! Postgres instead of deadlocking; whichever commits second sees the other's states.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::rows::{LeaseRow, LEASE_COLUMNS};
use super::{push_case, push_ids, NewEvent, Tx, ROWS_PER_INSERT};
use crate::job::{transition, JobKind, JobState, JobStatus, Trigger};
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::{Completion, DistanceRow, Failure, StoreError};

/// A completion whose lease checked out, with its job's row and new status.
struct Accepted<'a> {
    completion: &'a Completion,
    row: &'a LeaseRow,
    next: JobStatus,
}

/// Each completion's outcome, in order, and the accepted ones. Refusals (unknown job, stale
/// lease, a job completed earlier in this batch) are each completion's own.
fn check_completions<'a>(
    completions: &'a [Completion],
    rows: &'a HashMap<i64, LeaseRow>,
) -> (Vec<Result<(), StoreError>>, Vec<Accepted<'a>>) {
    let mut outcomes = Vec::with_capacity(completions.len());
    let mut accepted = Vec::new();
    let mut done: HashSet<i64> = HashSet::new();
    for c in completions {
        let checked = match rows.get(&c.job_id) {
            None => Err(StoreError::JobNotFound(c.job_id)),
            Some(_) if done.contains(&c.job_id) => {
                Err(StoreError::StaleLease { job_id: c.job_id, lease_id: c.lease_id.clone() })
            }
            Some(row) => row.complete(&c.worker_id, &c.lease_id).map(|next| (row, next)),
        };
        match checked {
            Ok((row, next)) => {
                done.insert(c.job_id);
                accepted.push(Accepted { completion: c, row, next });
                outcomes.push(Ok(()));
            }
            Err(e) => outcomes.push(Err(e)),
        }
    }
    (outcomes, accepted)
}

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
    /// Finish several jobs. A constant number of statements per batch: one read (and lock) of
    /// every job, one `UPDATE`, one `INSERT` of results, one of events; score jobs add their
    /// tables and their dependents. Nothing of a refused completion is written.
    pub(super) async fn complete_batch(
        &mut self,
        completions: &[Completion],
        now: i64,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let rows = self.lock_lease_rows(completions.iter().map(|c| c.job_id)).await?;
        let (outcomes, accepted) = check_completions(completions, &rows);
        if accepted.is_empty() {
            return Ok(outcomes);
        }
        self.record_completions(&accepted, now).await?;
        // Only score jobs have a table and dependents; their events follow the job's own.
        for a in accepted.iter().filter(|a| a.row.kind == JobKind::Score) {
            self.insert_distances(a.completion.job_id, &a.completion.distances).await?;
            self.settle_dependents(a.completion.job_id, Trigger::DependencySucceeded, None, now).await?;
        }
        Ok(outcomes)
    }

    /// Record a failure; returns the job's new state (pending or failed).
    pub(super) async fn fail(&mut self, f: &Failure, now: i64) -> Result<JobState, StoreError> {
        let row = self.lock_lease_row(f.job_id).await?;
        let next = transition(row.check(&f.worker_id, &f.lease_id)?, Trigger::Fail { retryable: f.retryable })?;
        sqlx::query(
            "UPDATE jobs SET state = $1, attempts = $2, error = $3, error_kind = $4, updated_at = $5, \
             finished_at = $6 WHERE id = $7",
        )
        .bind(next.state.as_str())
        .bind(i64::from(next.attempts))
        .bind(&f.message)
        .bind(&f.error_kind)
        .bind(now)
        .bind(next.state.is_terminal().then_some(now))
        .bind(f.job_id)
        .execute(self.conn())
        .await?;
        let event = NewEvent {
            sweep_id: row.sweep_id,
            job_id: f.job_id,
            state: next.state,
            worker_id: row.worker_id,
            message: Some(f.message.clone()),
        };
        self.record_events([event], now);
        if next.state == JobState::Failed {
            self.settle_dependents(f.job_id, Trigger::DependencyFailed, Some(&f.message), now).await?;
        }
        Ok(next.state)
    }

    /// Apply a dependency outcome (`trigger`) to the blocked jobs that wait for `job_id`: one
    /// read (locking them), one `UPDATE`, one `INSERT` of events. `message` is the dependency's
    /// error, quoted in the error of a job that fails with it.
    pub(super) async fn settle_dependents(
        &mut self,
        job_id: i64,
        trigger: Trigger,
        message: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "SELECT id, sweep_id, state, attempts, max_attempts FROM jobs WHERE depends_on = $1 AND state = $2 \
             ORDER BY id{}",
            DB::LOCK
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .bind(JobState::Blocked.as_str())
            .fetch_all(self.conn())
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let next = transition(Self::status_from_row(row)?, trigger)?;
            let error = (next.state == JobState::Failed)
                .then(|| format!("dependency job {job_id} failed: {}", message.unwrap_or("")));
            let (id, sweep_id) = (sqlx::Row::try_get(row, "id")?, sqlx::Row::try_get(row, "sweep_id")?);
            events.push(NewEvent { sweep_id, job_id: id, state: next.state, worker_id: None, message: error });
        }
        if events.is_empty() {
            return Ok(());
        }
        let mut update = QueryBuilder::<DB>::new("UPDATE jobs SET updated_at = ");
        update.push_bind(now);
        push_case(&mut update, "state", events.iter().map(|e| (e.job_id, e.state.as_str())));
        push_case(&mut update, "error", events.iter().map(|e| (e.job_id, e.message.clone())));
        let kind = |e: &NewEvent| e.message.as_ref().and(trigger.error_kind()).map(str::to_string);
        push_case(&mut update, "error_kind", events.iter().map(|e| (e.job_id, kind(e))));
        push_case(&mut update, "finished_at", events.iter().map(|e| (e.job_id, e.state.is_terminal().then_some(now))));
        update.push(" WHERE ");
        push_ids(&mut update, events.iter().map(|e| e.job_id));
        update.build().execute(self.conn()).await?;
        self.record_events(events, now);
        Ok(())
    }

    /// Read (and on Postgres lock, in id order) the jobs that calls presenting leases name.
    async fn lock_lease_rows(&mut self, ids: impl Iterator<Item = i64>) -> Result<HashMap<i64, LeaseRow>, StoreError> {
        let mut read = QueryBuilder::<DB>::new(format!("SELECT {LEASE_COLUMNS} FROM jobs WHERE "));
        push_ids(&mut read, ids);
        read.push(" ORDER BY id").push(DB::LOCK);
        let mut rows = HashMap::new();
        for row in read.build().fetch_all(self.conn()).await? {
            let row = Self::lease_row(&row)?;
            rows.insert(row.id, row);
        }
        Ok(rows)
    }

    /// Write the accepted completions: their state and reports, their results, their events.
    async fn record_completions(&mut self, accepted: &[Accepted<'_>], now: i64) -> Result<(), StoreError> {
        // Completing a leased job has one outcome in the state machine; one value for all.
        let state = accepted[0].next.state;
        debug_assert!(accepted.iter().all(|a| a.next.state == state));
        let mut update = QueryBuilder::<DB>::new("UPDATE jobs SET error = NULL, error_kind = NULL, state = ");
        update.push_bind(state.as_str()).push(", updated_at = ").push_bind(now).push(", finished_at = ").push_bind(now);
        let layers = |c: &Completion| serde_json::to_string(&c.layers_dropped).expect("numbers serialize");
        let timings = |c: &Completion| serde_json::to_string(&c.timings).expect("timings serialize");
        push_case(&mut update, "layers_dropped", accepted.iter().map(|a| (a.row.id, layers(a.completion))));
        push_case(
            &mut update,
            "num_layers",
            accepted.iter().map(|a| (a.row.id, a.completion.num_layers.map(i64::from))),
        );
        push_case(&mut update, "timings", accepted.iter().map(|a| (a.row.id, timings(a.completion))));
        let provenance =
            |c: &Completion| c.provenance.as_ref().map(|p| serde_json::to_string(p).expect("provenance serializes"));
        push_case(&mut update, "provenance", accepted.iter().map(|a| (a.row.id, provenance(a.completion))));
        // A completion after its lease expired gives back the attempt the expiry charged.
        push_case(&mut update, "attempts", accepted.iter().map(|a| (a.row.id, i64::from(a.next.attempts))));
        update.push(" WHERE ");
        push_ids(&mut update, accepted.iter().map(|a| a.row.id));
        update.build().execute(self.conn()).await?;
        // The last value wins when a report repeats a (task, metric).
        let mut results: BTreeMap<(i64, &str, &str), f64> = BTreeMap::new();
        for a in accepted {
            for r in &a.completion.results {
                results.insert((a.row.id, r.task.as_str(), r.metric.as_str()), r.value);
            }
        }
        let results: Vec<_> = results.into_iter().collect();
        for chunk in results.chunks(ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::<DB>::new("INSERT INTO results (job_id, task, metric, value) ");
            insert.push_values(chunk, |mut row, ((job_id, task, metric), value)| {
                row.push_bind(*job_id).push_bind(*task).push_bind(*metric).push_bind(*value);
            });
            insert.push(" ON CONFLICT (job_id, task, metric) DO UPDATE SET value = excluded.value");
            insert.build().execute(self.conn()).await?;
        }
        let events: Vec<_> = accepted
            .iter()
            .map(|a| NewEvent {
                sweep_id: a.row.sweep_id,
                job_id: a.row.id,
                state: a.next.state,
                worker_id: a.row.worker_id.clone(),
                message: None,
            })
            .collect();
        self.record_events(events, now);
        Ok(())
    }

    /// Store a score job's distance table (a repeated `(metric, n, l)` keeps its last value).
    async fn insert_distances(&mut self, job_id: i64, distances: &[DistanceRow]) -> Result<(), StoreError> {
        let rows: BTreeMap<(&str, u32, u32), f64> =
            distances.iter().map(|d| ((d.metric.as_str(), d.n, d.l), d.value)).collect();
        let rows: Vec<_> = rows.into_iter().collect();
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::<DB>::new("INSERT INTO distances (job_id, metric, n, l, value) ");
            insert.push_values(chunk, |mut row, ((metric, n, l), value)| {
                row.push_bind(job_id)
                    .push_bind(*metric)
                    .push_bind(i64::from(*n))
                    .push_bind(i64::from(*l))
                    .push_bind(*value);
            });
            insert.push(" ON CONFLICT (job_id, metric, n, l) DO UPDATE SET value = excluded.value");
            insert.build().execute(self.conn()).await?;
        }
        Ok(())
    }
}

//! A user's decisions about a whole sweep: cancel it, or retry its failed (and cancelled) jobs.
//! Both lock the jobs they change in id order (see `complete.rs`) and apply one
//! [`Trigger`] to each.

use sqlx::{ColumnIndex, Executor, QueryBuilder, Row};

use super::rows::{parse, to_u32};
use super::{push_ids, NewEvent, Tx, ROWS_PER_INSERT};
use crate::job::{transition, JobState, SweepState, Trigger};
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::StoreError;

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
    /// Cancel the sweep and every unfinished job of it; returns how many jobs.
    pub(super) async fn cancel(&mut self, name: &str, now: i64) -> Result<u32, StoreError> {
        let sweep_id = self.set_sweep_state(name, SweepState::Cancelled, now).await?;
        let unfinished = JobState::ALL.into_iter().filter(|s| !s.is_terminal());
        let rows = self.lock_jobs(sweep_id, unfinished, "worker_id").await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let next = transition(Self::status_from_row(row)?, Trigger::Cancel)?;
            let (job_id, worker_id) = (row.try_get("id")?, row.try_get("worker_id")?);
            let message = Some("sweep cancelled".to_string());
            events.push(NewEvent { sweep_id, job_id, state: next.state, worker_id, message });
        }
        let Some(first) = events.first() else { return Ok(0) };
        // Cancelling an unfinished job has one outcome in the state machine; one value for all.
        let state = first.state;
        debug_assert!(events.iter().all(|e| e.state == state));
        for chunk in events.chunks(ROWS_PER_INSERT) {
            let mut update = QueryBuilder::<DB>::new("UPDATE jobs SET state = ");
            update.push_bind(state.as_str()).push(", updated_at = ").push_bind(now);
            update.push(", finished_at = ").push_bind(now).push(" WHERE ");
            push_ids(&mut update, chunk.iter().map(|e| e.job_id));
            update.build().execute(self.conn()).await?;
        }
        let cancelled = events.len() as u32;
        self.record_events(events, now);
        Ok(cancelled)
    }

    /// Reactivate the sweep and requeue its failed jobs (and cancelled ones, if asked) with fresh
    /// attempts; returns how many. A job whose dependency has not succeeded goes back to blocked.
    pub(super) async fn retry(&mut self, name: &str, include_cancelled: bool, now: i64) -> Result<u32, StoreError> {
        let sweep_id = self.set_sweep_state(name, SweepState::Active, now).await?;
        let states =
            [JobState::Failed, JobState::Cancelled].into_iter().filter(|s| include_cancelled || *s == JobState::Failed);
        let rows = self.lock_jobs(sweep_id, states, "depends_on").await?;
        let mut events = Vec::with_capacity(rows.len());
        // In id order, so a dependency retried here is already pending when its dependents ask.
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let dependency_done = match row.try_get::<Option<i64>, _>("depends_on")? {
                None => true,
                Some(dep) => self.job_state(dep).await? == JobState::Succeeded,
            };
            let next = transition(Self::status_from_row(row)?, Trigger::Retry { dependency_done })?;
            sqlx::query(
                "UPDATE jobs SET state = $1, attempts = $2, error = NULL, error_kind = NULL, lease_id = NULL, \
                 lease_expires_at = NULL, worker_id = NULL, finished_at = NULL, updated_at = $3 WHERE id = $4",
            )
            .bind(next.state.as_str())
            .bind(i64::from(next.attempts))
            .bind(now)
            .bind(id)
            .execute(self.conn())
            .await?;
            let message = Some("retry".to_string());
            events.push(NewEvent { sweep_id, job_id: id, state: next.state, worker_id: None, message });
        }
        let requeued = events.len() as i64;
        self.record_events(events, now);
        to_u32(requeued, "jobs requeued")
    }

    /// Set the sweep's state; returns its id.
    async fn set_sweep_state(&mut self, name: &str, state: SweepState, now: i64) -> Result<i64, StoreError> {
        let row = sqlx::query("UPDATE sweeps SET state = $1, updated_at = $2 WHERE name = $3 RETURNING id")
            .bind(state.as_str())
            .bind(now)
            .bind(name)
            .fetch_optional(self.conn())
            .await?
            .ok_or_else(|| StoreError::SweepNotFound(name.to_string()))?;
        Ok(row.try_get("id")?)
    }

    /// The sweep's jobs in `states`, locked in id order: their status columns and `extra`.
    async fn lock_jobs(
        &mut self,
        sweep_id: i64,
        states: impl Iterator<Item = JobState>,
        extra: &str,
    ) -> Result<Vec<DB::Row>, StoreError> {
        let mut read = QueryBuilder::<DB>::new("SELECT id, state, attempts, max_attempts, ");
        read.push(extra).push(" FROM jobs WHERE sweep_id = ").push_bind(sweep_id).push(" AND state IN (");
        let mut list = read.separated(", ");
        for state in states {
            list.push_bind(state.as_str());
        }
        read.push(") ORDER BY id").push(DB::LOCK);
        Ok(read.build().fetch_all(self.conn()).await?)
    }

    /// One job's state.
    async fn job_state(&mut self, job_id: i64) -> Result<JobState, StoreError> {
        let row = sqlx::query("SELECT state FROM jobs WHERE id = $1").bind(job_id).fetch_one(self.conn()).await?;
        parse(&row.try_get::<String, _>("state")?)
    }
}

//! The reaper's query: leases that expired without a heartbeat go back to pending (or to failed,
//! with their dependents, once the job has used its attempts).

use sqlx::{ColumnIndex, Executor, Row};

use super::{NewEvent, Tx};
use crate::job::{transition, JobState, Trigger};
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
    /// Apply [`Trigger::LeaseExpired`] to every job whose lease expired before `now`; returns
    /// how many. On Postgres, rows another reaper holds are left to it.
    pub(super) async fn reclaim_expired(&mut self, now: i64) -> Result<u32, StoreError> {
        let rows =
            sqlx::query(DB::SELECT_EXPIRED).bind(JobState::Leased.as_str()).bind(now).fetch_all(self.conn()).await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let worker: Option<String> = row.try_get("worker_id")?;
            let lease: Option<String> = row.try_get("lease_id")?;
            let next = transition(Self::status_from_row(row)?, Trigger::LeaseExpired)?;
            let message = format!(
                "lease {} of worker {} expired without a heartbeat (attempt {} of {})",
                lease.as_deref().unwrap_or("?"),
                worker.as_deref().unwrap_or("?"),
                next.attempts,
                next.max_attempts
            );
            sqlx::query(
                "UPDATE jobs SET state = $1, attempts = $2, error = $3, error_kind = $4, updated_at = $5, \
                 finished_at = $6 WHERE id = $7",
            )
            .bind(next.state.as_str())
            .bind(i64::from(next.attempts))
            .bind(&message)
            .bind(Trigger::LeaseExpired.error_kind().map(str::to_string))
            .bind(now)
            .bind(next.state.is_terminal().then_some(now))
            .bind(id)
            .execute(self.conn())
            .await?;
            if next.state == JobState::Failed {
                failed.push((id, message.clone()));
            }
            let sweep_id = row.try_get("sweep_id")?;
            events.push(NewEvent {
                sweep_id,
                job_id: id,
                state: next.state,
                worker_id: worker,
                message: Some(message),
            });
        }
        self.record_events(events, now);
        for (id, message) in failed {
            self.settle_dependents(id, Trigger::DependencyFailed, Some(&message), now).await?;
        }
        Ok(rows.len() as u32)
    }
}

//! Reads: a sweep's counts, its event log, a job, a sweep's results, its running jobs.

use std::collections::HashMap;

use sqlx::{ColumnIndex, Executor, Row};

use super::rows::{parse, to_u32, JOB_COLUMNS};
use super::Tx;
use crate::job::JobState;
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::{EventRow, JobResults, JobRow, ResultValue, RunningJob, StoreError, SweepCounts};

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
    /// Job counts of one sweep.
    pub(super) async fn sweep(&mut self, name: &str) -> Result<SweepCounts, StoreError> {
        let row = sqlx::query("SELECT id, name, state, priority, created_at FROM sweeps WHERE name = $1")
            .bind(name)
            .fetch_optional(self.conn())
            .await?
            .ok_or_else(|| StoreError::SweepNotFound(name.to_string()))?;
        let id: i64 = row.try_get("id")?;
        let priority: i64 = row.try_get("priority")?;
        let mut counts = SweepCounts {
            name: row.try_get("name")?,
            state: parse(&row.try_get::<String, _>("state")?)?,
            priority: i32::try_from(priority).map_err(|_| StoreError::Corrupt(format!("priority = {priority}")))?,
            created_at: row.try_get("created_at")?,
            counts: [0; 6],
        };
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs WHERE sweep_id = $1 GROUP BY state")
            .bind(id)
            .fetch_all(self.conn())
            .await?;
        for row in rows {
            let state: JobState = parse(&row.try_get::<String, _>("state")?)?;
            let i = JobState::ALL.iter().position(|s| *s == state).expect("ALL lists every state");
            counts.counts[i] = to_u32(row.try_get("n")?, "count")?;
        }
        Ok(counts)
    }

    /// All sweeps, newest first.
    pub(super) async fn sweeps(&mut self) -> Result<Vec<SweepCounts>, StoreError> {
        let names =
            sqlx::query("SELECT name FROM sweeps ORDER BY created_at DESC, id DESC").fetch_all(self.conn()).await?;
        let mut out = Vec::with_capacity(names.len());
        for row in names {
            let name: String = row.try_get("name")?;
            out.push(self.sweep(&name).await?);
        }
        Ok(out)
    }

    /// A sweep's events after `after_seq`, oldest first, at most `limit`.
    pub(super) async fn events(
        &mut self,
        sweep: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.id, e.job_id, j.kind, e.state, e.worker_id, e.message, e.at FROM events e \
             JOIN jobs j ON j.id = e.job_id JOIN sweeps s ON s.id = e.sweep_id \
             WHERE s.name = $1 AND e.id > $2 ORDER BY e.id LIMIT $3",
        )
        .bind(sweep)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(self.conn())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    seq: row.try_get("id")?,
                    job_id: row.try_get("job_id")?,
                    kind: parse(&row.try_get::<String, _>("kind")?)?,
                    state: parse(&row.try_get::<String, _>("state")?)?,
                    worker_id: row.try_get("worker_id")?,
                    message: row.try_get("message")?,
                    at: row.try_get("at")?,
                })
            })
            .collect()
    }

    /// A job.
    pub(super) async fn job(&mut self, job_id: i64) -> Result<JobRow, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .fetch_optional(self.conn())
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        Self::job_from_row(&row)
    }

    /// Up to `limit` jobs of a sweep with id above `after_job_id`, with their results, in id order.
    pub(super) async fn results(
        &mut self,
        sweep: &str,
        after_job_id: i64,
        limit: i64,
    ) -> Result<Vec<JobResults>, StoreError> {
        let sweep_id = self.sweep_id(sweep).await?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE sweep_id = $1 AND id > $2 ORDER BY id LIMIT $3");
        let jobs = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(sweep_id)
            .bind(after_job_id)
            .bind(limit)
            .fetch_all(self.conn())
            .await?;
        let mut out: Vec<JobResults> = jobs
            .iter()
            .map(|row| Ok(JobResults { job: Self::job_from_row(row)?, results: Vec::new() }))
            .collect::<Result<_, StoreError>>()?;
        let (Some(first), Some(last)) = (out.first(), out.last()) else { return Ok(out) };
        let (first, last) = (first.job.id, last.job.id);
        let index: HashMap<i64, usize> = out.iter().enumerate().map(|(i, j)| (j.job.id, i)).collect();
        let rows = sqlx::query(
            "SELECT r.job_id, r.task, r.metric, r.value FROM results r JOIN jobs j ON j.id = r.job_id \
             WHERE j.sweep_id = $1 AND r.job_id >= $2 AND r.job_id <= $3 ORDER BY r.job_id, r.task, r.metric",
        )
        .bind(sweep_id)
        .bind(first)
        .bind(last)
        .fetch_all(self.conn())
        .await?;
        for row in rows {
            let job_id: i64 = row.try_get("job_id")?;
            if let Some(&i) = index.get(&job_id) {
                out[i].results.push(ResultValue {
                    task: row.try_get("task")?,
                    metric: row.try_get("metric")?,
                    value: row.try_get("value")?,
                });
            }
        }
        Ok(out)
    }

    /// A sweep's leased jobs with what their heartbeats last said, in id order.
    pub(super) async fn running(&mut self, sweep: &str) -> Result<Vec<RunningJob>, StoreError> {
        let sweep_id = self.sweep_id(sweep).await?;
        let rows = sqlx::query(
            "SELECT j.id, j.kind, j.worker_id, w.name AS worker_name, j.phase, j.progress, j.heartbeat_at, \
             j.lease_expires_at FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id \
             WHERE j.sweep_id = $1 AND j.state = $2 ORDER BY j.id",
        )
        .bind(sweep_id)
        .bind(JobState::Leased.as_str())
        .fetch_all(self.conn())
        .await?;
        rows.iter()
            .map(|row| {
                let expires: Option<i64> = row.try_get("lease_expires_at")?;
                Ok(RunningJob {
                    job_id: row.try_get("id")?,
                    kind: parse(&row.try_get::<String, _>("kind")?)?,
                    worker_id: row.try_get("worker_id")?,
                    worker_name: row.try_get("worker_name")?,
                    phase: row.try_get("phase")?,
                    progress: row.try_get("progress")?,
                    heartbeat_at: row.try_get("heartbeat_at")?,
                    lease_expires_at: expires
                        .ok_or_else(|| StoreError::Corrupt("a leased job has no expiry".into()))?,
                })
            })
            .collect()
    }
}

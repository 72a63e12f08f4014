//! A worker's side of the store: registration, heartbeats (which renew the lease and record
//! where the job is), and the worker list.

use std::collections::HashMap;

use sqlx::{ColumnIndex, Executor, Row};

use super::Tx;
use crate::job::{heartbeat, HeartbeatVerdict, JobState};
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::{Heartbeat, HeartbeatOutcome, StoreError, WorkerInfo, WorkerRow};

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
    /// Whether `worker_id` is registered.
    pub(super) async fn worker_exists(&mut self, worker_id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 AS one FROM workers WHERE id = $1")
            .bind(worker_id)
            .fetch_optional(self.conn())
            .await?;
        Ok(row.is_some())
    }

    /// Register a worker; returns its new id.
    pub(super) async fn register_worker(&mut self, worker: &WorkerInfo, now: i64) -> Result<String, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO workers (id, name, device, memory_bytes, version, registered_at, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&id)
        .bind(&worker.name)
        .bind(&worker.device)
        .bind(worker.memory_bytes.map(|m| i64::try_from(m).unwrap_or(i64::MAX)))
        .bind(&worker.version)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(id)
    }

    /// Mark the worker seen, then renew its lease and record the job's phase and progress if
    /// [`heartbeat`] says the job is still the worker's.
    pub(super) async fn heartbeat(&mut self, beat: &Heartbeat, now: i64) -> Result<HeartbeatOutcome, StoreError> {
        sqlx::query("UPDATE workers SET last_seen = $1 WHERE id = $2")
            .bind(now)
            .bind(&beat.worker_id)
            .execute(self.conn())
            .await?;
        let row = self.lock_lease_row(beat.job_id).await?;
        // Another worker presenting this lease is told it is lost, as a stale lease would be.
        let yours = row.is_current(&beat.lease_id) && row.is_held_by(&beat.worker_id);
        match heartbeat(row.status.state, yours) {
            HeartbeatVerdict::Cancelled => Ok(HeartbeatOutcome::Cancelled),
            HeartbeatVerdict::Lost => Ok(HeartbeatOutcome::Lost),
            HeartbeatVerdict::Renew => {
                let expires_at = now + beat.ttl_ms;
                sqlx::query(
                    "UPDATE jobs SET lease_expires_at = $1, phase = COALESCE($2, phase), \
                     progress = COALESCE($3, progress), heartbeat_at = $4, updated_at = $4 WHERE id = $5",
                )
                .bind(expires_at)
                .bind(beat.phase.clone())
                .bind(beat.progress)
                .bind(now)
                .bind(beat.job_id)
                .execute(self.conn())
                .await?;
                Ok(HeartbeatOutcome::Renewed(expires_at))
            }
        }
    }

    /// Every registered worker, most recently seen first, with the job it holds.
    pub(super) async fn workers(&mut self) -> Result<Vec<WorkerRow>, StoreError> {
        let held = sqlx::query(
            "SELECT id, worker_id, (SELECT name FROM sweeps WHERE sweeps.id = jobs.sweep_id) AS sweep FROM jobs \
             WHERE state = $1 ORDER BY id",
        )
        .bind(JobState::Leased.as_str())
        .fetch_all(self.conn())
        .await?;
        let mut jobs: HashMap<String, (i64, String)> = HashMap::new();
        for row in held {
            if let Some(worker) = row.try_get::<Option<String>, _>("worker_id")? {
                jobs.insert(worker, (row.try_get("id")?, row.try_get("sweep")?));
            }
        }
        let rows = sqlx::query(
            "SELECT id, name, device, memory_bytes, version, registered_at, last_seen FROM workers \
             ORDER BY last_seen DESC, registered_at DESC, id",
        )
        .fetch_all(self.conn())
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let memory: Option<i64> = row.try_get("memory_bytes")?;
                let memory_bytes = memory
                    .map(|m| u64::try_from(m).map_err(|_| StoreError::Corrupt(format!("memory_bytes = {m}"))))
                    .transpose()?;
                let (job_id, sweep) = jobs.remove(&id).unzip();
                Ok(WorkerRow {
                    info: WorkerInfo {
                        name: row.try_get("name")?,
                        device: row.try_get("device")?,
                        memory_bytes,
                        version: row.try_get("version")?,
                    },
                    id,
                    registered_at: row.try_get("registered_at")?,
                    last_seen: row.try_get("last_seen")?,
                    job_id,
                    sweep,
                })
            })
            .collect()
    }
}

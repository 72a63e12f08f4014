//! Reading rows: the one list of job columns, and a row → [`JobStatus`] / [`JobRow`] / [`LeaseRow`].
//!
//! A stored value that is not one we write (an unknown state name, a negative count, bad JSON)
//! is [`StoreError::Corrupt`].

use std::str::FromStr;

use sqlx::{ColumnIndex, Executor, Row};

use super::Tx;
use crate::job::{transition, JobKind, JobState, JobStatus, Trigger};
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::{JobRow, StoreError};

/// The columns [`Tx::job_from_row`] reads, after `SELECT` from `jobs` or after `RETURNING` (the
/// sweep's name comes from a subquery, so no join or alias is needed), plus `sweep_id`.
pub(super) const JOB_COLUMNS: &str =
    "id, sweep_id, (SELECT name FROM sweeps WHERE sweeps.id = jobs.sweep_id) AS sweep, \
     key, kind, spec, state, attempts, max_attempts, depends_on, lease_id, worker_id, error, error_kind, \
     layers_dropped, num_layers, timings, provenance";

/// The columns [`Tx::lease_row`] reads.
pub(super) const LEASE_COLUMNS: &str = "id, sweep_id, kind, state, attempts, max_attempts, lease_id, worker_id";

/// A name we stored ([`JobState`], [`JobKind`], [`crate::job::SweepState`]) read back.
pub(super) fn parse<T: FromStr<Err = crate::job::ParseNameError>>(s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))
}

/// A count or index column, which we only ever write from a `u32`.
pub(super) fn to_u32(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v} out of range")))
}

/// A JSON column, `NULL` read as the empty value.
fn parse_json<T: serde::de::DeserializeOwned + Default>(s: Option<String>, what: &str) -> Result<T, StoreError> {
    s.map_or(Ok(T::default()), |s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}"))))
}

/// A job row as complete, fail and heartbeat see it (read with [`LEASE_COLUMNS`], locked on
/// Postgres).
pub(super) struct LeaseRow {
    pub(super) id: i64,
    pub(super) sweep_id: i64,
    pub(super) kind: JobKind,
    pub(super) status: JobStatus,
    pub(super) lease_id: Option<String>,
    pub(super) worker_id: Option<String>,
}

impl LeaseRow {
    /// Whether `lease_id` is the last lease the job was given.
    pub(super) fn is_current(&self, lease_id: &str) -> bool {
        self.lease_id.as_deref() == Some(lease_id)
    }

    /// Whether `worker_id` is the worker the job was last leased to.
    pub(super) fn is_held_by(&self, worker_id: &str) -> bool {
        self.worker_id.as_deref() == Some(worker_id)
    }

    /// The job's status if it is leased under `lease_id` to `worker_id`; a stale lease, or
    /// another worker's, otherwise.
    pub(super) fn check(&self, worker_id: &str, lease_id: &str) -> Result<JobStatus, StoreError> {
        if self.status.state != JobState::Leased || !self.is_current(lease_id) {
            return Err(StoreError::StaleLease { job_id: self.id, lease_id: lease_id.to_string() });
        }
        self.check_worker(worker_id)?;
        Ok(self.status)
    }

    fn check_worker(&self, worker_id: &str) -> Result<(), StoreError> {
        if !self.is_held_by(worker_id) {
            return Err(StoreError::NotYourLease { job_id: self.id, worker_id: worker_id.to_string() });
        }
        Ok(())
    }

    /// The job's status after a completion under `lease_id`: the lease's own job completes; a job
    /// whose lease expired, still waiting under that lease, completes after its expiry. Any other
    /// lease is stale.
    pub(super) fn complete(&self, worker_id: &str, lease_id: &str) -> Result<JobStatus, StoreError> {
        let trigger = match self.status.state {
            JobState::Pending if self.is_current(lease_id) => Trigger::CompleteAfterExpiry,
            _ => Trigger::Complete,
        };
        let status = if trigger == Trigger::Complete {
            self.check(worker_id, lease_id)?
        } else {
            self.check_worker(worker_id)?;
            self.status
        };
        Ok(transition(status, trigger)?)
    }
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
    /// The `state`, `attempts` and `max_attempts` columns.
    pub(super) fn status_from_row(row: &DB::Row) -> Result<JobStatus, StoreError> {
        Ok(JobStatus {
            state: parse(&row.try_get::<String, _>("state")?)?,
            attempts: to_u32(row.try_get("attempts")?, "attempts")?,
            max_attempts: to_u32(row.try_get("max_attempts")?, "max_attempts")?,
        })
    }

    /// A row read with [`JOB_COLUMNS`].
    pub(super) fn job_from_row(row: &DB::Row) -> Result<JobRow, StoreError> {
        let status = Self::status_from_row(row)?;
        let spec: String = row.try_get("spec")?;
        let num_layers: Option<i64> = row.try_get("num_layers")?;
        Ok(JobRow {
            id: row.try_get("id")?,
            sweep: row.try_get("sweep")?,
            key: row.try_get("key")?,
            kind: parse(&row.try_get::<String, _>("kind")?)?,
            spec: serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?,
            state: status.state,
            attempts: status.attempts,
            max_attempts: status.max_attempts,
            depends_on: row.try_get("depends_on")?,
            lease_id: row.try_get("lease_id")?,
            worker_id: row.try_get("worker_id")?,
            error: row.try_get("error")?,
            error_kind: row.try_get("error_kind")?,
            layers_dropped: parse_json(row.try_get("layers_dropped")?, "layers_dropped")?,
            num_layers: num_layers.map(|n| to_u32(n, "num_layers")).transpose()?,
            timings: parse_json(row.try_get("timings")?, "timings")?,
            provenance: row
                .try_get::<Option<String>, _>("provenance")?
                .map(|p| serde_json::from_str(&p).map_err(|e| StoreError::Corrupt(format!("job provenance: {e}"))))
                .transpose()?,
        })
    }

    /// A row read with [`LEASE_COLUMNS`].
    pub(super) fn lease_row(row: &DB::Row) -> Result<LeaseRow, StoreError> {
        Ok(LeaseRow {
            id: row.try_get("id")?,
            sweep_id: row.try_get("sweep_id")?,
            kind: parse(&row.try_get::<String, _>("kind")?)?,
            status: Self::status_from_row(row)?,
            lease_id: row.try_get("lease_id")?,
            worker_id: row.try_get("worker_id")?,
        })
    }

    /// Read (and on Postgres lock) one job for a call that presents a lease.
    pub(super) async fn lock_lease_row(&mut self, job_id: i64) -> Result<LeaseRow, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM jobs WHERE id = $1{}", DB::LOCK);
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .fetch_optional(self.conn())
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        Self::lease_row(&row)
    }
}

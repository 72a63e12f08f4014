//! Submitting a sweep: the sweep row (created, or its spec replaced), then each planned job it
//! does not have yet, in the state [`JobStatus::initial`] gives it. A big submit is written in
//! chunks, each its own short transaction, so that leases and heartbeats get the connection in
//! between (SQLite has one).

use std::collections::{HashMap, HashSet};

use sqlx::{ColumnIndex, Executor, Row};

use super::rows::{parse, to_u32};
use super::{NewEvent, Tx};
use crate::job::{JobState, JobStatus, SweepState};
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::StoreError;
use crate::sweep::{PlannedJob, SweepSpec};

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
    /// Create the sweep or replace its spec, then insert the first `jobs` it does not have yet;
    /// returns the sweep's id, whether it is new, and the jobs added. Jobs come in dependency
    /// order (a job's dependency is planned before it), so each one's dependency is in `known`
    /// (key → id and state) when it is inserted.
    pub(super) async fn submit_first<'k>(
        &mut self,
        spec: &SweepSpec,
        jobs: &'k [PlannedJob],
        known: &mut HashMap<&'k str, (i64, JobState)>,
        now: i64,
    ) -> Result<(i64, bool, u32), StoreError> {
        let (sweep_id, created, sweep_state) = self.upsert_sweep(spec, now).await?;
        let added = self.insert_jobs(sweep_id, sweep_state, spec, jobs, known, now).await?;
        Ok((sweep_id, created, added))
    }

    /// Insert more of a submit's jobs, in a transaction of their own: the sweep's state and the
    /// states of these jobs' dependencies are read again first (a cancel, or a score job that
    /// finished, since the previous chunk); returns the jobs added.
    pub(super) async fn submit_more<'k>(
        &mut self,
        sweep_id: i64,
        spec: &SweepSpec,
        jobs: &'k [PlannedJob],
        known: &mut HashMap<&'k str, (i64, JobState)>,
        now: i64,
    ) -> Result<u32, StoreError> {
        let row = sqlx::query("SELECT state FROM sweeps WHERE id = $1").bind(sweep_id).fetch_one(self.conn()).await?;
        let sweep_state: SweepState = parse(&row.try_get::<String, _>("state")?)?;
        let deps: HashSet<&str> = jobs.iter().filter_map(|j| j.depends_on.as_deref()).collect();
        for key in deps {
            if let Some((&key, _)) = known.get_key_value(key) {
                let entry = self.existing_job(sweep_id, key).await?;
                known.insert(key, entry);
            }
        }
        self.insert_jobs(sweep_id, sweep_state, spec, jobs, known, now).await
    }

    /// How many jobs the sweep has.
    pub(super) async fn job_total(&mut self, sweep_id: i64) -> Result<u32, StoreError> {
        let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE sweep_id = $1")
            .bind(sweep_id)
            .fetch_one(self.conn())
            .await?
            .try_get("n")?;
        to_u32(total, "job count")
    }

    /// Insert each of `jobs` the sweep does not have yet, with its creation event.
    async fn insert_jobs<'k>(
        &mut self,
        sweep_id: i64,
        sweep_state: SweepState,
        spec: &SweepSpec,
        jobs: &'k [PlannedJob],
        known: &mut HashMap<&'k str, (i64, JobState)>,
        now: i64,
    ) -> Result<u32, StoreError> {
        let mut events = Vec::new();
        for job in jobs {
            let dependency = match &job.depends_on {
                Some(key) => Some(
                    *known
                        .get(key.as_str())
                        .ok_or_else(|| StoreError::Corrupt(format!("job {} depends on unknown key {key}", job.key)))?,
                ),
                None => None,
            };
            let status = JobStatus::initial(spec.max_attempts, dependency.map(|d| d.1), sweep_state);
            let entry = match self.insert_job(sweep_id, spec, job, status, dependency.map(|d| d.0), now).await? {
                Some(id) => {
                    events.push(NewEvent { sweep_id, job_id: id, state: status.state, worker_id: None, message: None });
                    (id, status.state)
                }
                None => self.existing_job(sweep_id, &job.key).await?,
            };
            known.insert(job.key.as_str(), entry);
        }
        let added = events.len() as i64;
        self.record_events(events, now);
        to_u32(added, "jobs added")
    }

    /// Create the sweep, or replace its spec; returns its id, whether it is new, and its state.
    async fn upsert_sweep(&mut self, spec: &SweepSpec, now: i64) -> Result<(i64, bool, SweepState), StoreError> {
        let spec_json = serde_json::to_string(spec).expect("a SweepSpec always serializes");
        let inserted = sqlx::query(
            "INSERT INTO sweeps (name, spec, state, priority, max_attempts, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (name) DO NOTHING RETURNING id, state",
        )
        .bind(spec.name.as_str())
        .bind(&spec_json)
        .bind(SweepState::Active.as_str())
        .bind(i64::from(spec.priority))
        .bind(i64::from(spec.max_attempts))
        .bind(now)
        .fetch_optional(self.conn())
        .await?;
        let created = inserted.is_some();
        let row = match inserted {
            Some(row) => row,
            None => {
                sqlx::query("UPDATE sweeps SET spec = $1, updated_at = $2 WHERE name = $3 RETURNING id, state")
                    .bind(&spec_json)
                    .bind(now)
                    .bind(spec.name.as_str())
                    .fetch_one(self.conn())
                    .await?
            }
        };
        Ok((row.try_get("id")?, created, parse(&row.try_get::<String, _>("state")?)?))
    }

    /// Insert one job; `None` if the sweep already has a job with its key.
    async fn insert_job(
        &mut self,
        sweep_id: i64,
        spec: &SweepSpec,
        job: &PlannedJob,
        status: JobStatus,
        depends_on: Option<i64>,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "INSERT INTO jobs (sweep_id, key, kind, model, spec, state, attempts, max_attempts, priority, \
             depends_on, created_at, updated_at, predicted_device_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12) \
             ON CONFLICT (sweep_id, key) DO NOTHING RETURNING id",
        )
        .bind(sweep_id)
        .bind(&job.key)
        .bind(job.spec.kind.as_str())
        .bind(&job.spec.model.source)
        .bind(job.spec.canonical_json())
        .bind(status.state.as_str())
        .bind(i64::from(status.attempts))
        .bind(i64::from(status.max_attempts))
        .bind(i64::from(spec.priority))
        .bind(depends_on)
        .bind(now)
        .bind(job.memory.lease_bytes().map(|b| i64::try_from(b).unwrap_or(i64::MAX)))
        .fetch_optional(self.conn())
        .await?;
        Ok(row.map(|row| row.try_get("id")).transpose()?)
    }

    /// The id and state of the sweep's job with `key`.
    async fn existing_job(&mut self, sweep_id: i64, key: &str) -> Result<(i64, JobState), StoreError> {
        let row = sqlx::query("SELECT id, state FROM jobs WHERE sweep_id = $1 AND key = $2")
            .bind(sweep_id)
            .bind(key)
            .fetch_one(self.conn())
            .await?;
        Ok((row.try_get("id")?, parse(&row.try_get::<String, _>("state")?)?))
    }
}

//! The store logic shared by both backends, as a macro that implements [`super::JobStore`] for a
//! backend type.
//!
//! The SQL is the same for SQLite and Postgres (both accept `$1` parameters, `RETURNING` and
//! `ON CONFLICT ... DO NOTHING`). Each backend type provides:
//! - `pool: sqlx::Pool<DB>`;
//! - `async fn begin_write(&self)`: a transaction that may write (`BEGIN IMMEDIATE` on SQLite);
//! - `const LOCK: &str`: the row-lock suffix for reads inside a write transaction (`FOR UPDATE` on
//!   Postgres, nothing on SQLite, whose write transactions are already exclusive);
//! - `const CANDIDATES_HELD`, `CANDIDATES_ANY`, `SELECT_EXPIRED`: the lease-candidate and reaper
//!   queries, which differ in locking (`FOR UPDATE SKIP LOCKED`) and in how a JSON list is expanded.
//!
//! The hot writes, [`super::JobStore::lease_batch`] and [`super::JobStore::complete_batch`], take a
//! fixed number of statements per batch (per-row values go in `CASE id WHEN … THEN …` and multi-row
//! `INSERT`s): a statement's round trip, not the work in it, is what a small transaction costs.

use crate::job::{JobKind, JobState, JobStatus};
use crate::store::{StoreError, Timing};

/// The columns [`job_from_row`] reads, from `jobs j JOIN sweeps s`.
pub(crate) const JOB_COLUMNS: &str = "j.id, s.name AS sweep, j.key, j.kind, j.spec, j.state, j.attempts, \
     j.max_attempts, j.depends_on, j.lease_id, j.worker_id, j.error, j.error_kind, j.layers_dropped, \
     j.num_layers, j.timings";

pub(crate) fn parse_state(s: &str) -> Result<JobState, StoreError> {
    s.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))
}

pub(crate) fn parse_kind(s: &str) -> Result<JobKind, StoreError> {
    s.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))
}

pub(crate) fn to_u32(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v} out of range")))
}

pub(crate) fn parse_layers(s: Option<String>) -> Result<Vec<u32>, StoreError> {
    s.map_or(Ok(Vec::new()), |s| {
        serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("layers_dropped: {e}")))
    })
}

pub(crate) fn parse_timings(s: Option<String>) -> Result<Vec<Timing>, StoreError> {
    s.map_or(Ok(Vec::new()), |s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("timings: {e}"))))
}

/// Rows per multi-row `INSERT` (6 parameters a row stays far below SQLite's and Postgres' limits).
pub(crate) const ROWS_PER_INSERT: usize = 1000;

/// An event row to append.
pub(crate) struct NewEvent {
    pub(crate) sweep_id: i64,
    pub(crate) job_id: i64,
    pub(crate) state: JobState,
    pub(crate) worker_id: Option<String>,
    pub(crate) message: Option<String>,
}

/// The columns of a job row that complete/fail check against the caller's lease.
pub(crate) const LEASE_COLUMNS: &str = "id, sweep_id, kind, state, attempts, max_attempts, lease_id, worker_id";

/// A job row as complete/fail see it (read with [`LEASE_COLUMNS`], locked on Postgres).
pub(crate) struct LeaseRow {
    pub(crate) id: i64,
    pub(crate) sweep_id: i64,
    pub(crate) kind: JobKind,
    pub(crate) status: JobStatus,
    pub(crate) lease_id: Option<String>,
    pub(crate) worker_id: Option<String>,
}

impl LeaseRow {
    /// The job's status if `lease_id` is its current lease; a stale lease otherwise.
    pub(crate) fn check(&self, lease_id: &str) -> Result<JobStatus, StoreError> {
        if self.status.state != JobState::Leased || self.lease_id.as_deref() != Some(lease_id) {
            return Err(StoreError::StaleLease { job_id: self.id, lease_id: lease_id.to_string() });
        }
        Ok(self.status)
    }
}

/// The `RETURNING` clause of the lease `UPDATE`: the columns [`job_from_row`] reads, so that the
/// leased rows come back with it.
macro_rules! returning_job {
    () => {
        " RETURNING id, sweep_id, (SELECT name FROM sweeps WHERE sweeps.id = jobs.sweep_id) AS sweep, key, kind, \
         spec, state, attempts, max_attempts, depends_on, lease_id, worker_id, error, error_kind, layers_dropped, \
         num_layers, timings"
    };
}
pub(crate) use returning_job;

/// Implements `JobStore` for `$store` over database `$db`.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        impl $store {
            fn job_from_row(row: &<$db as sqlx::Database>::Row) -> Result<$crate::store::JobRow, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::common::*;
                let spec: String = row.try_get("spec")?;
                let num_layers: Option<i64> = row.try_get("num_layers")?;
                Ok($crate::store::JobRow {
                    id: row.try_get("id")?,
                    sweep: row.try_get("sweep")?,
                    key: row.try_get("key")?,
                    kind: parse_kind(&row.try_get::<String, _>("kind")?)?,
                    spec: serde_json::from_str(&spec)
                        .map_err(|e| $crate::store::StoreError::Corrupt(format!("job spec: {e}")))?,
                    state: parse_state(&row.try_get::<String, _>("state")?)?,
                    attempts: to_u32(row.try_get("attempts")?, "attempts")?,
                    max_attempts: to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                    depends_on: row.try_get("depends_on")?,
                    lease_id: row.try_get("lease_id")?,
                    worker_id: row.try_get("worker_id")?,
                    error: row.try_get("error")?,
                    error_kind: row.try_get("error_kind")?,
                    layers_dropped: parse_layers(row.try_get("layers_dropped")?)?,
                    num_layers: num_layers.map(|n| to_u32(n, "num_layers")).transpose()?,
                    timings: parse_timings(row.try_get("timings")?)?,
                })
            }

            async fn insert_event(
                tx: &mut sqlx::Transaction<'static, $db>,
                sweep_id: i64,
                job_id: i64,
                state: $crate::job::JobState,
                worker_id: Option<&str>,
                message: Option<&str>,
                now: i64,
            ) -> Result<(), sqlx::Error> {
                let event = $crate::store::common::NewEvent {
                    sweep_id,
                    job_id,
                    state,
                    worker_id: worker_id.map(str::to_string),
                    message: message.map(str::to_string),
                };
                Self::insert_events(tx, std::slice::from_ref(&event), now).await
            }

            /// Append events, many rows per statement.
            async fn insert_events(
                tx: &mut sqlx::Transaction<'static, $db>,
                events: &[$crate::store::common::NewEvent],
                now: i64,
            ) -> Result<(), sqlx::Error> {
                for chunk in events.chunks($crate::store::common::ROWS_PER_INSERT) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO events (sweep_id, job_id, state, worker_id, message, at) ",
                    );
                    insert.push_values(chunk, |mut row, e| {
                        row.push_bind(e.sweep_id)
                            .push_bind(e.job_id)
                            .push_bind(e.state.as_str())
                            .push_bind(e.worker_id.clone())
                            .push_bind(e.message.clone())
                            .push_bind(now);
                    });
                    insert.build().execute(&mut **tx).await?;
                }
                Ok(())
            }

            /// Store a score job's distance table (a repeated `(metric, n, l)` keeps its last value).
            async fn insert_distances(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: i64,
                distances: &[$crate::store::DistanceRow],
            ) -> Result<(), sqlx::Error> {
                let rows: std::collections::BTreeMap<(&str, u32, u32), f64> =
                    distances.iter().map(|d| ((d.metric.as_str(), d.n, d.l), d.value)).collect();
                let rows: Vec<_> = rows.into_iter().collect();
                for chunk in rows.chunks($crate::store::common::ROWS_PER_INSERT) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new("INSERT INTO distances (job_id, metric, n, l, value) ");
                    insert.push_values(chunk, |mut row, ((metric, n, l), value)| {
                        row.push_bind(job_id)
                            .push_bind(metric.to_string())
                            .push_bind(i64::from(*n))
                            .push_bind(i64::from(*l))
                            .push_bind(*value);
                    });
                    insert.push(" ON CONFLICT (job_id, metric, n, l) DO UPDATE SET value = excluded.value");
                    insert.build().execute(&mut **tx).await?;
                }
                Ok(())
            }

            /// A score job's distance table, through a pool or inside a transaction.
            async fn read_distances<'e, E>(
                executor: E,
                job_id: i64,
            ) -> Result<Vec<$crate::store::DistanceRow>, $crate::store::StoreError>
            where
                E: sqlx::Executor<'e, Database = $db>,
            {
                use sqlx::Row;
                let rows = sqlx::query("SELECT metric, n, l, value FROM distances WHERE job_id = $1 ORDER BY metric, n, l")
                    .bind(job_id)
                    .fetch_all(executor)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::store::DistanceRow {
                            metric: row.try_get("metric")?,
                            n: $crate::store::common::to_u32(row.try_get("n")?, "n")?,
                            l: $crate::store::common::to_u32(row.try_get("l")?, "l")?,
                            value: row.try_get("value")?,
                        })
                    })
                    .collect()
            }

            async fn sweep_id(
                tx: &mut sqlx::Transaction<'static, $db>,
                name: &str,
            ) -> Result<i64, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query("SELECT id FROM sweeps WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or_else(|| $crate::store::StoreError::SweepNotFound(name.to_string()))?;
                Ok(row.try_get("id")?)
            }

            /// Apply a dependency outcome to the blocked jobs that wait for `job_id`.
            async fn settle_dependents(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: i64,
                event: $crate::job::JobEvent,
                message: Option<&str>,
                now: i64,
            ) -> Result<(), $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT id, sweep_id, attempts, max_attempts FROM jobs WHERE depends_on = $1 AND state = 'blocked'",
                )
                .bind(job_id)
                .fetch_all(&mut **tx)
                .await?;
                for row in rows {
                    let id: i64 = row.try_get("id")?;
                    let sweep_id: i64 = row.try_get("sweep_id")?;
                    let status = $crate::job::JobStatus {
                        state: $crate::job::JobState::Blocked,
                        attempts: $crate::store::common::to_u32(row.try_get("attempts")?, "attempts")?,
                        max_attempts: $crate::store::common::to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                    };
                    let next = $crate::job::transition(status, event)?;
                    let (error, kind) = if next.state == $crate::job::JobState::Failed {
                        (message.map(|m| format!("dependency job {job_id} failed: {m}")), Some("dependency"))
                    } else {
                        (None, None)
                    };
                    sqlx::query("UPDATE jobs SET state = $1, error = $2, error_kind = $3, updated_at = $4, finished_at = $5 WHERE id = $6")
                        .bind(next.state.as_str())
                        .bind(error.as_deref())
                        .bind(kind)
                        .bind(now)
                        .bind(next.state.is_terminal().then_some(now))
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    Self::insert_event(tx, sweep_id, id, next.state, None, error.as_deref(), now).await?;
                }
                Ok(())
            }

            fn lease_row(row: &<$db as sqlx::Database>::Row) -> Result<$crate::store::common::LeaseRow, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::store::common::*;
                Ok(LeaseRow {
                    id: row.try_get("id")?,
                    sweep_id: row.try_get("sweep_id")?,
                    kind: parse_kind(&row.try_get::<String, _>("kind")?)?,
                    status: $crate::job::JobStatus {
                        state: parse_state(&row.try_get::<String, _>("state")?)?,
                        attempts: to_u32(row.try_get("attempts")?, "attempts")?,
                        max_attempts: to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                    },
                    lease_id: row.try_get("lease_id")?,
                    worker_id: row.try_get("worker_id")?,
                })
            }

            /// Lock and read a leased job's row for fail, checking the lease.
            async fn current_lease(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: i64,
                lease_id: &str,
            ) -> Result<($crate::store::common::LeaseRow, $crate::job::JobStatus), $crate::store::StoreError> {
                let sql = format!("SELECT {} FROM jobs WHERE id = $1{}", $crate::store::common::LEASE_COLUMNS, Self::LOCK);
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(job_id)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or($crate::store::StoreError::JobNotFound(job_id))?;
                let row = Self::lease_row(&row)?;
                let status = row.check(lease_id)?;
                Ok((row, status))
            }

            /// `, column = CASE id WHEN … THEN … END`: a per-row value in one `UPDATE`.
            fn push_case<T>(update: &mut sqlx::QueryBuilder<$db>, column: &str, values: impl IntoIterator<Item = (i64, T)>)
            where
                T: for<'t> sqlx::Encode<'t, $db> + sqlx::Type<$db>,
            {
                update.push(", ").push(column).push(" = CASE id");
                for (id, value) in values {
                    update.push(" WHEN ").push_bind(id).push(" THEN ").push_bind(value);
                }
                update.push(" END");
            }

            /// `id IN (…)`.
            fn push_ids(query: &mut sqlx::QueryBuilder<$db>, ids: impl Iterator<Item = i64>) {
                query.push("id IN (");
                let mut list = query.separated(", ");
                for id in ids {
                    list.push_bind(id);
                }
                query.push(")");
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::JobStore for $store {
            async fn submit(
                &self,
                spec: &$crate::sweep::SweepSpec,
                jobs: &[$crate::sweep::PlannedJob],
                now: i64,
            ) -> Result<$crate::store::SubmitOutcome, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::job::JobState;
                let spec_json = serde_json::to_string(spec).expect("a SweepSpec always serializes");
                let mut tx = self.begin_write().await?;
                let inserted = sqlx::query(
                    "INSERT INTO sweeps (name, spec, state, priority, max_attempts, created_at, updated_at) \
                     VALUES ($1, $2, 'active', $3, $4, $5, $5) ON CONFLICT (name) DO NOTHING RETURNING id",
                )
                .bind(spec.name.as_str())
                .bind(&spec_json)
                .bind(i64::from(spec.priority))
                .bind(i64::from(spec.max_attempts))
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let created = inserted.is_some();
                let sweep_id: i64 = match inserted {
                    Some(row) => row.try_get("id")?,
                    None => {
                        let id = Self::sweep_id(&mut tx, spec.name.as_str()).await?;
                        sqlx::query("UPDATE sweeps SET spec = $1, updated_at = $2 WHERE id = $3")
                            .bind(&spec_json)
                            .bind(now)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        id
                    }
                };
                let sweep_state: String = sqlx::query("SELECT state FROM sweeps WHERE id = $1")
                    .bind(sweep_id)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("state")?;
                let mut known: std::collections::HashMap<&str, (i64, JobState)> = std::collections::HashMap::new();
                let mut added = 0u32;
                for job in jobs {
                    let dep = match &job.depends_on {
                        Some(key) => Some(*known.get(key.as_str()).ok_or_else(|| {
                            $crate::store::StoreError::Corrupt(format!("job {} depends on unknown key {key}", job.key))
                        })?),
                        None => None,
                    };
                    let state = if sweep_state == "cancelled" {
                        JobState::Cancelled
                    } else {
                        match dep.map(|d| d.1) {
                            None | Some(JobState::Succeeded) => JobState::Pending,
                            Some(JobState::Failed) => JobState::Failed,
                            Some(JobState::Cancelled) => JobState::Cancelled,
                            Some(_) => JobState::Blocked,
                        }
                    };
                    let row = sqlx::query(
                        "INSERT INTO jobs (sweep_id, key, kind, model, spec, state, attempts, max_attempts, priority, \
                         depends_on, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10, $10) \
                         ON CONFLICT (sweep_id, key) DO NOTHING RETURNING id",
                    )
                    .bind(sweep_id)
                    .bind(&job.key)
                    .bind(job.spec.kind.as_str())
                    .bind(&job.spec.model.source)
                    .bind(job.spec.canonical_json())
                    .bind(state.as_str())
                    .bind(i64::from(spec.max_attempts))
                    .bind(i64::from(spec.priority))
                    .bind(dep.map(|d| d.0))
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let entry = match row {
                        Some(row) => {
                            let id: i64 = row.try_get("id")?;
                            added += 1;
                            Self::insert_event(&mut tx, sweep_id, id, state, None, None, now).await?;
                            (id, state)
                        }
                        None => {
                            let row = sqlx::query("SELECT id, state FROM jobs WHERE sweep_id = $1 AND key = $2")
                                .bind(sweep_id)
                                .bind(&job.key)
                                .fetch_one(&mut *tx)
                                .await?;
                            let st = $crate::store::common::parse_state(&row.try_get::<String, _>("state")?)?;
                            (row.try_get("id")?, st)
                        }
                    };
                    known.insert(job.key.as_str(), entry);
                }
                let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE sweep_id = $1")
                    .bind(sweep_id)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("n")?;
                tx.commit().await?;
                Ok($crate::store::SubmitOutcome {
                    created,
                    jobs_added: added,
                    jobs_total: $crate::store::common::to_u32(total, "job count")?,
                })
            }

            async fn sweep(&self, name: &str) -> Result<$crate::store::SweepCounts, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query("SELECT id, name, state, priority, created_at FROM sweeps WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or_else(|| $crate::store::StoreError::SweepNotFound(name.to_string()))?;
                let id: i64 = row.try_get("id")?;
                let priority: i64 = row.try_get("priority")?;
                let mut counts = $crate::store::SweepCounts {
                    name: row.try_get("name")?,
                    state: row.try_get("state")?,
                    priority: i32::try_from(priority).unwrap_or_default(),
                    created_at: row.try_get("created_at")?,
                    counts: [0; 6],
                };
                let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs WHERE sweep_id = $1 GROUP BY state")
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await?;
                for row in rows {
                    let state = $crate::store::common::parse_state(&row.try_get::<String, _>("state")?)?;
                    let i = $crate::job::JobState::ALL.iter().position(|s| *s == state).expect("ALL lists every state");
                    counts.counts[i] = $crate::store::common::to_u32(row.try_get("n")?, "count")?;
                }
                Ok(counts)
            }

            async fn sweeps(&self) -> Result<Vec<$crate::store::SweepCounts>, $crate::store::StoreError> {
                use sqlx::Row;
                let names = sqlx::query("SELECT name FROM sweeps ORDER BY created_at DESC, id DESC")
                    .fetch_all(&self.pool)
                    .await?;
                let mut out = Vec::with_capacity(names.len());
                for row in names {
                    let name: String = row.try_get("name")?;
                    out.push(self.sweep(&name).await?);
                }
                Ok(out)
            }

            async fn cancel(&self, name: &str, now: i64) -> Result<u32, $crate::store::StoreError> {
                use sqlx::Row;
                let mut tx = self.begin_write().await?;
                let sweep_id = Self::sweep_id(&mut tx, name).await?;
                sqlx::query("UPDATE sweeps SET state = 'cancelled', updated_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(sweep_id)
                    .execute(&mut *tx)
                    .await?;
                let rows = sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', updated_at = $1, finished_at = $1 \
                     WHERE sweep_id = $2 AND state IN ('blocked', 'pending', 'leased') RETURNING id, worker_id",
                )
                .bind(now)
                .bind(sweep_id)
                .fetch_all(&mut *tx)
                .await?;
                for row in &rows {
                    let worker: Option<String> = row.try_get("worker_id")?;
                    Self::insert_event(
                        &mut tx,
                        sweep_id,
                        row.try_get("id")?,
                        $crate::job::JobState::Cancelled,
                        worker.as_deref(),
                        Some("sweep cancelled"),
                        now,
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(rows.len() as u32)
            }

            async fn retry(&self, name: &str, include_cancelled: bool, now: i64) -> Result<u32, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::job::{transition, JobEvent, JobState, JobStatus};
                let mut tx = self.begin_write().await?;
                let sweep_id = Self::sweep_id(&mut tx, name).await?;
                sqlx::query("UPDATE sweeps SET state = 'active', updated_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(sweep_id)
                    .execute(&mut *tx)
                    .await?;
                let rows = sqlx::query(
                    "SELECT id, state, attempts, max_attempts, depends_on FROM jobs \
                     WHERE sweep_id = $1 AND (state = 'failed' OR (state = 'cancelled' AND $2 = 1)) ORDER BY id",
                )
                .bind(sweep_id)
                .bind(i64::from(include_cancelled))
                .fetch_all(&mut *tx)
                .await?;
                for row in &rows {
                    let id: i64 = row.try_get("id")?;
                    let depends_on: Option<i64> = row.try_get("depends_on")?;
                    let dependency_done = match depends_on {
                        None => true,
                        Some(dep) => {
                            let st: String = sqlx::query("SELECT state FROM jobs WHERE id = $1")
                                .bind(dep)
                                .fetch_one(&mut *tx)
                                .await?
                                .try_get("state")?;
                            $crate::store::common::parse_state(&st)? == JobState::Succeeded
                        }
                    };
                    let status = JobStatus {
                        state: $crate::store::common::parse_state(&row.try_get::<String, _>("state")?)?,
                        attempts: $crate::store::common::to_u32(row.try_get("attempts")?, "attempts")?,
                        max_attempts: $crate::store::common::to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                    };
                    let next = transition(status, JobEvent::Retry { dependency_done })?;
                    sqlx::query(
                        "UPDATE jobs SET state = $1, attempts = $2, error = NULL, error_kind = NULL, lease_id = NULL, \
                         lease_expires_at = NULL, worker_id = NULL, finished_at = NULL, updated_at = $3 WHERE id = $4",
                    )
                    .bind(next.state.as_str())
                    .bind(i64::from(next.attempts))
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    Self::insert_event(&mut tx, sweep_id, id, next.state, None, Some("retry"), now).await?;
                }
                tx.commit().await?;
                Ok(rows.len() as u32)
            }

            async fn register_worker(
                &self,
                worker: &$crate::store::WorkerInfo,
                now: i64,
            ) -> Result<String, $crate::store::StoreError> {
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
                .execute(&self.pool)
                .await?;
                Ok(id)
            }

            async fn lease_batch(
                &self,
                requests: &[$crate::store::LeaseRequest],
                now: i64,
            ) -> Result<Vec<Option<$crate::store::LeasedJob>>, $crate::store::StoreError> {
                use sqlx::Row;
                use std::collections::{HashMap, HashSet};
                // A constant number of statements per batch, whatever its size: candidates for each
                // set of held models, then for anyone, are read (and locked on Postgres); jobs are
                // assigned to requests in order here; one UPDATE leases them all; one INSERT logs it.
                let mut tx = self.begin_write().await?;
                let mut held_candidates: HashMap<&[String], Vec<i64>> = HashMap::new();
                for held in requests.iter().map(|r| r.held_models.as_slice()) {
                    if held.is_empty() || held_candidates.contains_key(held) {
                        continue;
                    }
                    let wanted = requests.iter().filter(|r| r.held_models == held).count();
                    let ids: Vec<i64> = sqlx::query(Self::CANDIDATES_HELD)
                        .bind(serde_json::to_string(held).expect("strings serialize"))
                        .bind(wanted as i64)
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|row| row.try_get("id"))
                        .collect::<Result<_, _>>()?;
                    held_candidates.insert(held, ids);
                }
                let mut taken: HashSet<i64> = HashSet::new();
                let mut assigned: Vec<Option<i64>> = requests
                    .iter()
                    .map(|r| {
                        let id = held_candidates.get(r.held_models.as_slice())?.iter().find(|id| !taken.contains(id))?;
                        taken.insert(*id);
                        Some(*id)
                    })
                    .collect();
                let unassigned = assigned.iter().filter(|a| a.is_none()).count();
                if unassigned > 0 {
                    let any: Vec<i64> = sqlx::query(Self::CANDIDATES_ANY)
                        .bind((unassigned + taken.len()) as i64)
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|row| row.try_get("id"))
                        .collect::<Result<_, _>>()?;
                    let mut any = any.into_iter().filter(|id| !taken.contains(id));
                    for slot in assigned.iter_mut().filter(|a| a.is_none()) {
                        *slot = any.next();
                    }
                }
                let claims: Vec<(usize, i64, String)> = assigned
                    .iter()
                    .enumerate()
                    .filter_map(|(i, id)| id.map(|id| (i, id, uuid::Uuid::new_v4().to_string())))
                    .collect();
                let mut leased: Vec<Option<$crate::store::LeasedJob>> = vec![None; requests.len()];
                if claims.is_empty() {
                    tx.commit().await?;
                    return Ok(leased);
                }
                let mut update = sqlx::QueryBuilder::<$db>::new("UPDATE jobs SET state = 'leased', phase = NULL, updated_at = ");
                update.push_bind(now);
                Self::push_case(&mut update, "lease_id", claims.iter().map(|c| (c.1, c.2.clone())));
                Self::push_case(&mut update, "worker_id", claims.iter().map(|c| (c.1, requests[c.0].worker_id.clone())));
                Self::push_case(&mut update, "lease_expires_at", claims.iter().map(|c| (c.1, now + requests[c.0].ttl_ms)));
                update.push(" WHERE state = 'pending' AND ");
                Self::push_ids(&mut update, claims.iter().map(|c| c.1));
                update.push($crate::store::common::returning_job!());
                let rows = update.build().fetch_all(&mut *tx).await?;
                let mut jobs: HashMap<i64, ($crate::store::JobRow, i64)> = HashMap::new();
                for row in &rows {
                    let job = Self::job_from_row(row)?;
                    jobs.insert(job.id, (job, row.try_get("sweep_id")?));
                }
                let mut events = Vec::with_capacity(claims.len());
                for (i, id, lease_id) in claims {
                    // Every claimed row was read under this transaction's lock; a missing one
                    // would be a concurrent writer we do not know of, and that request gets nothing.
                    let Some((job, sweep_id)) = jobs.remove(&id) else { continue };
                    events.push($crate::store::common::NewEvent {
                        sweep_id,
                        job_id: id,
                        state: $crate::job::JobState::Leased,
                        worker_id: Some(requests[i].worker_id.clone()),
                        message: None,
                    });
                    let expires_at = now + requests[i].ttl_ms;
                    leased[i] = Some($crate::store::LeasedJob { lease_id, expires_at, job, distances: Vec::new() });
                }
                Self::insert_events(&mut tx, &events, now).await?;
                // Cells that choose layers by score carry their score job's table, read inside the
                // transaction so that a failed read leaves no lease behind.
                let mut tables: HashMap<i64, Vec<$crate::store::DistanceRow>> = HashMap::new();
                for lease in leased.iter_mut().flatten() {
                    if let (Some(dep), Some(m)) = (lease.job.depends_on, lease.job.spec.method) {
                        if $crate::sweep::needs_scores(m) {
                            if !tables.contains_key(&dep) {
                                tables.insert(dep, Self::read_distances(&mut *tx, dep).await?);
                            }
                            lease.distances = tables[&dep].clone();
                        }
                    }
                }
                tx.commit().await?;
                Ok(leased)
            }

            async fn heartbeat(
                &self,
                worker_id: &str,
                lease_id: &str,
                job_id: i64,
                phase: Option<&str>,
                ttl_ms: i64,
                now: i64,
            ) -> Result<$crate::store::HeartbeatOutcome, $crate::store::StoreError> {
                use sqlx::Row;
                let expires_at = now + ttl_ms;
                let renewed = sqlx::query(
                    "UPDATE jobs SET lease_expires_at = $1, phase = COALESCE($2, phase), updated_at = $3 \
                     WHERE id = $4 AND lease_id = $5 AND state = 'leased'",
                )
                .bind(expires_at)
                .bind(phase)
                .bind(now)
                .bind(job_id)
                .bind(lease_id)
                .execute(&self.pool)
                .await?
                .rows_affected();
                sqlx::query("UPDATE workers SET last_seen = $1 WHERE id = $2")
                    .bind(now)
                    .bind(worker_id)
                    .execute(&self.pool)
                    .await?;
                if renewed == 1 {
                    return Ok($crate::store::HeartbeatOutcome::Renewed(expires_at));
                }
                let row = sqlx::query("SELECT state, lease_id FROM jobs WHERE id = $1")
                    .bind(job_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::store::StoreError::JobNotFound(job_id))?;
                let state: String = row.try_get("state")?;
                let current: Option<String> = row.try_get("lease_id")?;
                if state == "cancelled" && current.as_deref() == Some(lease_id) {
                    Ok($crate::store::HeartbeatOutcome::Cancelled)
                } else {
                    Ok($crate::store::HeartbeatOutcome::Lost)
                }
            }

            async fn complete_batch(
                &self,
                completions: &[$crate::store::Completion],
                now: i64,
            ) -> Result<Vec<Result<(), $crate::store::StoreError>>, $crate::store::StoreError> {
                use std::collections::{BTreeMap, HashMap, HashSet};
                use $crate::job::{transition, JobEvent};
                use $crate::store::StoreError;
                // A constant number of statements per batch: one read (and lock) of every job, one
                // UPDATE, one INSERT of results, one of events; score jobs add their tables.
                let mut tx = self.begin_write().await?;
                let mut read = sqlx::QueryBuilder::<$db>::new(format!("SELECT {} FROM jobs WHERE ", $crate::store::common::LEASE_COLUMNS));
                Self::push_ids(&mut read, completions.iter().map(|c| c.job_id));
                read.push(Self::LOCK);
                let mut rows: HashMap<i64, $crate::store::common::LeaseRow> = HashMap::new();
                for row in read.build().fetch_all(&mut *tx).await? {
                    let row = Self::lease_row(&row)?;
                    rows.insert(row.id, row);
                }
                // Refusals (unknown job, stale lease, a job completed earlier in this batch) are
                // each completion's own, and nothing of a refused completion is written.
                let mut outcomes = Vec::with_capacity(completions.len());
                let mut accepted = Vec::new();
                let mut done: HashSet<i64> = HashSet::new();
                for c in completions {
                    let checked = match rows.get(&c.job_id) {
                        None => Err(StoreError::JobNotFound(c.job_id)),
                        Some(_) if done.contains(&c.job_id) => {
                            Err(StoreError::StaleLease { job_id: c.job_id, lease_id: c.lease_id.clone() })
                        }
                        Some(row) => row
                            .check(&c.lease_id)
                            .and_then(|status| Ok((row, transition(status, JobEvent::Complete)?))),
                    };
                    match checked {
                        Ok((row, next)) => {
                            done.insert(c.job_id);
                            accepted.push((c, row, next));
                            outcomes.push(Ok(()));
                        }
                        Err(e) => outcomes.push(Err(e)),
                    }
                }
                if accepted.is_empty() {
                    tx.commit().await?;
                    return Ok(outcomes);
                }
                // Completing a leased job has one outcome in the state machine; one value for all.
                let state = accepted[0].2.state;
                debug_assert!(accepted.iter().all(|(_, _, next)| next.state == state));
                let mut update = sqlx::QueryBuilder::<$db>::new("UPDATE jobs SET error = NULL, error_kind = NULL, state = ");
                update.push_bind(state.as_str()).push(", updated_at = ").push_bind(now).push(", finished_at = ").push_bind(now);
                let layers = |c: &$crate::store::Completion| serde_json::to_string(&c.layers_dropped).expect("numbers serialize");
                let timings = |c: &$crate::store::Completion| serde_json::to_string(&c.timings).expect("timings serialize");
                Self::push_case(&mut update, "layers_dropped", accepted.iter().map(|(c, _, _)| (c.job_id, layers(c))));
                Self::push_case(&mut update, "num_layers", accepted.iter().map(|(c, _, _)| (c.job_id, c.num_layers.map(i64::from))));
                Self::push_case(&mut update, "timings", accepted.iter().map(|(c, _, _)| (c.job_id, timings(c))));
                update.push(" WHERE ");
                Self::push_ids(&mut update, accepted.iter().map(|(c, _, _)| c.job_id));
                update.build().execute(&mut *tx).await?;
                // The last value wins when a report repeats a (task, metric).
                let mut results: BTreeMap<(i64, &str, &str), f64> = BTreeMap::new();
                for (c, _, _) in &accepted {
                    for r in &c.results {
                        results.insert((c.job_id, r.task.as_str(), r.metric.as_str()), r.value);
                    }
                }
                let results: Vec<_> = results.into_iter().collect();
                for chunk in results.chunks($crate::store::common::ROWS_PER_INSERT) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new("INSERT INTO results (job_id, task, metric, value) ");
                    insert.push_values(chunk, |mut row, ((job_id, task, metric), value)| {
                        row.push_bind(*job_id).push_bind(task.to_string()).push_bind(metric.to_string()).push_bind(*value);
                    });
                    insert.push(" ON CONFLICT (job_id, task, metric) DO UPDATE SET value = excluded.value");
                    insert.build().execute(&mut *tx).await?;
                }
                let events: Vec<_> = accepted
                    .iter()
                    .map(|(c, row, next)| $crate::store::common::NewEvent {
                        sweep_id: row.sweep_id,
                        job_id: c.job_id,
                        state: next.state,
                        worker_id: row.worker_id.clone(),
                        message: None,
                    })
                    .collect();
                Self::insert_events(&mut tx, &events, now).await?;
                // Only score jobs have a table and dependents; their events follow the job's own.
                for (c, row, _) in &accepted {
                    if row.kind == $crate::job::JobKind::Score {
                        Self::insert_distances(&mut tx, c.job_id, &c.distances).await?;
                        Self::settle_dependents(&mut tx, c.job_id, JobEvent::DependencySucceeded, None, now).await?;
                    }
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn fail(
                &self,
                f: &$crate::store::Failure,
                now: i64,
            ) -> Result<$crate::job::JobState, $crate::store::StoreError> {
                use $crate::job::{transition, JobEvent, JobState};
                let mut tx = self.begin_write().await?;
                let (row, status) = Self::current_lease(&mut tx, f.job_id, &f.lease_id).await?;
                let (sweep_id, worker) = (row.sweep_id, row.worker_id);
                let next = transition(status, JobEvent::Fail { retryable: f.retryable })?;
                sqlx::query(
                    "UPDATE jobs SET state = $1, attempts = $2, error = $3, error_kind = $4, updated_at = $5, \
                     finished_at = $6 WHERE id = $7",
                )
                .bind(next.state.as_str())
                .bind(i64::from(next.attempts))
                .bind(&f.message)
                .bind(&f.error_kind)
                .bind(now)
                .bind((next.state == JobState::Failed).then_some(now))
                .bind(f.job_id)
                .execute(&mut *tx)
                .await?;
                Self::insert_event(&mut tx, sweep_id, f.job_id, next.state, worker.as_deref(), Some(&f.message), now)
                    .await?;
                if next.state == JobState::Failed {
                    Self::settle_dependents(&mut tx, f.job_id, JobEvent::DependencyFailed, Some(&f.message), now)
                        .await?;
                }
                tx.commit().await?;
                Ok(next.state)
            }

            async fn reclaim_expired(&self, now: i64) -> Result<u32, $crate::store::StoreError> {
                use sqlx::Row;
                use $crate::job::{transition, JobEvent, JobState, JobStatus};
                let mut tx = self.begin_write().await?;
                let rows = sqlx::query(Self::SELECT_EXPIRED).bind(now).fetch_all(&mut *tx).await?;
                for row in &rows {
                    let id: i64 = row.try_get("id")?;
                    let sweep_id: i64 = row.try_get("sweep_id")?;
                    let worker: Option<String> = row.try_get("worker_id")?;
                    let lease: Option<String> = row.try_get("lease_id")?;
                    let status = JobStatus {
                        state: JobState::Leased,
                        attempts: $crate::store::common::to_u32(row.try_get("attempts")?, "attempts")?,
                        max_attempts: $crate::store::common::to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                    };
                    let next = transition(status, JobEvent::LeaseExpired)?;
                    let message = format!(
                        "lease {} of worker {} expired without a heartbeat (attempt {} of {})",
                        lease.as_deref().unwrap_or("?"),
                        worker.as_deref().unwrap_or("?"),
                        next.attempts,
                        next.max_attempts
                    );
                    sqlx::query(
                        "UPDATE jobs SET state = $1, attempts = $2, error = $3, error_kind = 'lease_expired', \
                         updated_at = $4, finished_at = $5 WHERE id = $6",
                    )
                    .bind(next.state.as_str())
                    .bind(i64::from(next.attempts))
                    .bind(&message)
                    .bind(now)
                    .bind((next.state == JobState::Failed).then_some(now))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    Self::insert_event(&mut tx, sweep_id, id, next.state, worker.as_deref(), Some(&message), now).await?;
                    if next.state == JobState::Failed {
                        Self::settle_dependents(&mut tx, id, JobEvent::DependencyFailed, Some(&message), now).await?;
                    }
                }
                tx.commit().await?;
                Ok(rows.len() as u32)
            }

            async fn events(
                &self,
                sweep: &str,
                after_seq: i64,
                limit: i64,
            ) -> Result<Vec<$crate::store::EventRow>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT e.id, e.job_id, j.kind, e.state, e.worker_id, e.message, e.at FROM events e \
                     JOIN jobs j ON j.id = e.job_id JOIN sweeps s ON s.id = e.sweep_id \
                     WHERE s.name = $1 AND e.id > $2 ORDER BY e.id LIMIT $3",
                )
                .bind(sweep)
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::store::EventRow {
                            seq: row.try_get("id")?,
                            job_id: row.try_get("job_id")?,
                            kind: $crate::store::common::parse_kind(&row.try_get::<String, _>("kind")?)?,
                            state: $crate::store::common::parse_state(&row.try_get::<String, _>("state")?)?,
                            worker_id: row.try_get("worker_id")?,
                            message: row.try_get("message")?,
                            at: row.try_get("at")?,
                        })
                    })
                    .collect()
            }

            async fn job(&self, job_id: i64) -> Result<$crate::store::JobRow, $crate::store::StoreError> {
                let sql = format!("SELECT {} FROM jobs j JOIN sweeps s ON s.id = j.sweep_id WHERE j.id = $1", $crate::store::common::JOB_COLUMNS);
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(job_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::store::StoreError::JobNotFound(job_id))?;
                Self::job_from_row(&row)
            }

            async fn results(&self, sweep: &str) -> Result<Vec<$crate::store::JobResults>, $crate::store::StoreError> {
                use sqlx::Row;
                let exists = sqlx::query("SELECT id FROM sweeps WHERE name = $1").bind(sweep).fetch_optional(&self.pool).await?;
                if exists.is_none() {
                    return Err($crate::store::StoreError::SweepNotFound(sweep.to_string()));
                }
                let sql = format!(
                    "SELECT {} FROM jobs j JOIN sweeps s ON s.id = j.sweep_id WHERE s.name = $1 ORDER BY j.id",
                    $crate::store::common::JOB_COLUMNS
                );
                let jobs = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(sweep).fetch_all(&self.pool).await?;
                let mut out: Vec<$crate::store::JobResults> = jobs
                    .iter()
                    .map(|row| Ok($crate::store::JobResults { job: Self::job_from_row(row)?, results: Vec::new() }))
                    .collect::<Result<_, $crate::store::StoreError>>()?;
                let index: std::collections::HashMap<i64, usize> =
                    out.iter().enumerate().map(|(i, j)| (j.job.id, i)).collect();
                let rows = sqlx::query(
                    "SELECT r.job_id, r.task, r.metric, r.value FROM results r JOIN jobs j ON j.id = r.job_id \
                     JOIN sweeps s ON s.id = j.sweep_id WHERE s.name = $1 ORDER BY r.job_id, r.task, r.metric",
                )
                .bind(sweep)
                .fetch_all(&self.pool)
                .await?;
                for row in rows {
                    let job_id: i64 = row.try_get("job_id")?;
                    if let Some(&i) = index.get(&job_id) {
                        out[i].results.push($crate::store::ResultValue {
                            task: row.try_get("task")?,
                            metric: row.try_get("metric")?,
                            value: row.try_get("value")?,
                        });
                    }
                }
                Ok(out)
            }

            async fn distances(&self, job_id: i64) -> Result<Vec<$crate::store::DistanceRow>, $crate::store::StoreError> {
                Self::read_distances(&self.pool, job_id).await
            }
        }
    };
}

pub(crate) use impl_store;

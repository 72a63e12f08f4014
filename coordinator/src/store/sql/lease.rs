//! Leasing: a batch of workers' requests served in one transaction, with model affinity.
//!
//! A constant number of statements per batch, whatever its size: candidates for each set of held
//! models, then for anyone, are read (and locked on Postgres, skipping rows another transaction
//! holds); jobs are assigned to requests in order here; one `UPDATE` leases them all; one
//! `INSERT` logs it. Cells that choose layers by score then read their score job's table.
//!
//! Memory: a job with a predicted peak (`predicted_device_bytes`, the memory model's) goes only
//! to a worker whose reported free memory holds it. The candidate queries skip jobs larger than
//! the largest free memory among the requests they serve, and assignment gives each request the
//! first candidate that fits it; a request left without one because the candidates read were all
//! too large for it (a small worker in a batch with big ones) reads its own candidates, bounded by
//! its own free memory — one more query, only then.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use sqlx::{ColumnIndex, Executor, QueryBuilder, Row};

use super::rows::{to_u32, JOB_COLUMNS};
use super::{push_case, push_ids, NewEvent, Tx};
use crate::job::{transition, JobState, JobStatus, Trigger};
use crate::store::dialect::{Dialect, Param, Scalar};
use crate::store::{DistanceRow, JobRow, LeaseRequest, LeasedJob, StoreError};

/// A pending job that may be leased.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: i64,
    status: JobStatus,
    /// Its predicted peak device memory, if known.
    need: Option<i64>,
}

impl Candidate {
    /// Whether a worker with `free` bytes of free memory may take it (unknown on either side:
    /// yes).
    fn fits(&self, free: Option<u64>) -> bool {
        match (self.need, free) {
            (Some(need), Some(free)) => u64::try_from(need).map_or(true, |need| need <= free),
            _ => true,
        }
    }
}

/// The bound a candidate query serving `requests` uses: the largest free memory among them, or
/// none when one of them reported none.
fn memory_bound<'r>(mut requests: impl Iterator<Item = &'r LeaseRequest>) -> Option<i64> {
    requests
        .try_fold(0u64, |most, r| r.free_memory_bytes.map(|f| most.max(f)))
        .map(|b| i64::try_from(b).unwrap_or(i64::MAX))
}

/// A candidate given to request `request` under a new lease.
struct Claim {
    request: usize,
    id: i64,
    lease_id: String,
    next: JobStatus,
}

/// For each request in order, the first candidate no earlier request took: from its held models'
/// candidates if it has any, else `None` (filled from [`fill_from_any`] later).
fn assign_held(requests: &[LeaseRequest], held: &HashMap<&[String], Vec<Candidate>>) -> Vec<Option<Candidate>> {
    let mut taken: HashSet<i64> = HashSet::new();
    requests
        .iter()
        .map(|r| {
            let c = held
                .get(r.held_models.as_slice())?
                .iter()
                .find(|c| !taken.contains(&c.id) && c.fits(r.free_memory_bytes))?;
            taken.insert(c.id);
            Some(*c)
        })
        .collect()
}

/// Give the requests still without a job, in order, the best candidate of any model not already
/// assigned that fits each.
fn fill_from_any(requests: &[LeaseRequest], assigned: &mut [Option<Candidate>], any: &[Candidate]) {
    let mut taken: HashSet<i64> = assigned.iter().flatten().map(|c| c.id).collect();
    for (slot, request) in assigned.iter_mut().zip(requests).filter(|(a, _)| a.is_none()) {
        *slot = any.iter().find(|c| !taken.contains(&c.id) && c.fits(request.free_memory_bytes)).copied();
        if let Some(c) = slot {
            taken.insert(c.id);
        }
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
    /// Serve `requests` in order: request `i` gets the `i`-th answer.
    pub(super) async fn lease_batch(
        &mut self,
        requests: &[LeaseRequest],
        now: i64,
    ) -> Result<Vec<Option<LeasedJob>>, StoreError> {
        let mut held: HashMap<&[String], Vec<Candidate>> = HashMap::new();
        for models in requests.iter().map(|r| r.held_models.as_slice()) {
            if models.is_empty() || held.contains_key(models) {
                continue;
            }
            let wanted = requests.iter().filter(|r| r.held_models == models).count();
            let bound = memory_bound(requests.iter().filter(|r| r.held_models == models));
            let json = serde_json::to_string(models).expect("strings serialize");
            held.insert(models, self.candidates(DB::CANDIDATES_HELD, Some(json), wanted, bound).await?);
        }
        let mut assigned = assign_held(requests, &held);
        let unassigned = assigned.iter().filter(|a| a.is_none()).count();
        if unassigned > 0 {
            // One per request: jobs assigned above may come back among the best, and are skipped.
            let waiting = requests.iter().zip(&assigned).filter(|(_, a)| a.is_none()).map(|(r, _)| r);
            let any = self.candidates(DB::CANDIDATES_ANY, None, requests.len(), memory_bound(waiting)).await?;
            fill_from_any(requests, &mut assigned, &any);
            // A request whose free memory none of the candidates read fits reads its own.
            for (i, request) in requests.iter().enumerate() {
                let Some(free) = request.free_memory_bytes else { continue };
                if assigned[i].is_some() || !any.iter().any(|c| !c.fits(Some(free))) {
                    continue;
                }
                let taken: HashSet<i64> = assigned.iter().flatten().map(|c| c.id).collect();
                let bound = Some(i64::try_from(free).unwrap_or(i64::MAX));
                let own = self.candidates(DB::CANDIDATES_ANY, None, taken.len() + 1, bound).await?;
                assigned[i] = own.into_iter().find(|c| !taken.contains(&c.id));
            }
        }
        let mut claims = Vec::new();
        for (request, candidate) in assigned.iter().enumerate() {
            if let Some(c) = candidate {
                let next = transition(c.status, Trigger::Lease)?;
                claims.push(Claim { request, id: c.id, lease_id: uuid::Uuid::new_v4().to_string(), next });
            }
        }
        let mut leased: Vec<Option<LeasedJob>> = vec![None; requests.len()];
        if claims.is_empty() {
            return Ok(leased);
        }
        let mut jobs = self.claim(requests, &claims, now).await?;
        let mut events = Vec::with_capacity(claims.len());
        for Claim { request, id, lease_id, next } in claims {
            // Every claimed row was read under this transaction's lock; a missing one would be a
            // concurrent writer we do not know of, and that request gets nothing.
            let Some((job, sweep_id)) = jobs.remove(&id) else { continue };
            let worker_id = requests[request].worker_id.clone();
            events.push(NewEvent {
                sweep_id,
                job_id: id,
                state: next.state,
                worker_id: Some(worker_id),
                message: None,
            });
            let expires_at = now + requests[request].ttl_ms;
            leased[request] = Some(LeasedJob { lease_id, expires_at, job, distances: Vec::new() });
        }
        self.record_events(events, now);
        self.attach_distances(&mut leased).await?;
        Ok(leased)
    }

    /// Up to `limit` candidates from `sql` ([`Dialect::CANDIDATES_HELD`] with the held models'
    /// JSON, or [`Dialect::CANDIDATES_ANY`]) predicted to need at most `bound` bytes (or not
    /// predicted).
    async fn candidates(
        &mut self,
        sql: &'static str,
        models: Option<String>,
        limit: usize,
        bound: Option<i64>,
    ) -> Result<Vec<Candidate>, StoreError> {
        let mut query = sqlx::query(sql).bind(JobState::Pending.as_str());
        if let Some(models) = models {
            query = query.bind(models);
        }
        let rows = query.bind(limit as i64).bind(bound).fetch_all(self.conn()).await?;
        rows.iter()
            .map(|row| {
                Ok(Candidate {
                    id: row.try_get("id")?,
                    status: Self::status_from_row(row)?,
                    need: row.try_get("predicted_device_bytes")?,
                })
            })
            .collect()
    }

    /// Lease the claimed jobs in one `UPDATE`; returns each leased row with its sweep id.
    async fn claim(
        &mut self,
        requests: &[LeaseRequest],
        claims: &[Claim],
        now: i64,
    ) -> Result<HashMap<i64, (JobRow, i64)>, StoreError> {
        // Leasing a pending job has one outcome in the state machine; one value for all.
        let state = claims[0].next.state;
        debug_assert!(claims.iter().all(|c| c.next.state == state));
        let mut update = QueryBuilder::<DB>::new("UPDATE jobs SET phase = NULL, progress = NULL, heartbeat_at = NULL");
        update.push(", state = ").push_bind(state.as_str()).push(", updated_at = ").push_bind(now);
        push_case(&mut update, "lease_id", claims.iter().map(|c| (c.id, c.lease_id.clone())));
        push_case(&mut update, "worker_id", claims.iter().map(|c| (c.id, requests[c.request].worker_id.clone())));
        push_case(&mut update, "lease_expires_at", claims.iter().map(|c| (c.id, now + requests[c.request].ttl_ms)));
        update.push(" WHERE state = ").push_bind(JobState::Pending.as_str()).push(" AND ");
        push_ids(&mut update, claims.iter().map(|c| c.id));
        update.push(" RETURNING ").push(JOB_COLUMNS);
        let mut jobs = HashMap::with_capacity(claims.len());
        for row in update.build().fetch_all(self.conn()).await? {
            let job = Self::job_from_row(&row)?;
            jobs.insert(job.id, (job, row.try_get("sweep_id")?));
        }
        Ok(jobs)
    }

    /// Cells that choose layers by score carry their score job's table, read inside the
    /// transaction so that a failed read leaves no lease behind.
    async fn attach_distances(&mut self, leased: &mut [Option<LeasedJob>]) -> Result<(), StoreError> {
        let mut tables: HashMap<i64, Vec<DistanceRow>> = HashMap::new();
        for lease in leased.iter_mut().flatten() {
            if let (Some(dep), Some(m)) = (lease.job.depends_on, lease.job.spec.method) {
                if crate::sweep::needs_scores(m) {
                    let table = match tables.entry(dep) {
                        Entry::Occupied(table) => table.into_mut(),
                        Entry::Vacant(slot) => slot.insert(self.distances(dep).await?),
                    };
                    lease.distances = table.clone();
                }
            }
        }
        Ok(())
    }

    /// A score job's distance table.
    pub(super) async fn distances(&mut self, job_id: i64) -> Result<Vec<DistanceRow>, StoreError> {
        let rows = sqlx::query("SELECT metric, n, l, value FROM distances WHERE job_id = $1 ORDER BY metric, n, l")
            .bind(job_id)
            .fetch_all(self.conn())
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DistanceRow {
                    metric: row.try_get("metric")?,
                    n: to_u32(row.try_get("n")?, "n")?,
                    l: to_u32(row.try_get("l")?, "l")?,
                    value: row.try_get("value")?,
                })
            })
            .collect()
    }
}

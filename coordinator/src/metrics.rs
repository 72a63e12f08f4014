//! Prometheus metrics: `coordinator serve --metrics-listen ADDR` answers `GET /metrics` in the
//! Prometheus text format (0.0.4) from the same process, and stops with the gRPC server.
//!
//! The services and the reaper count and time what they do in a [`Metrics`] (leases, completions,
//! failures, reclaims; lease, store-call and job latency). The rest is read on each scrape: jobs
//! per sweep and state from the store, and the workers (the store's registrations and heartbeats,
//! plus when each last called this coordinator, and the free memory it last reported).
//!
//! Label values that come from outside (sweep and worker names, failure kinds) are escaped by the
//! text encoder, and their number is bounded: sweep names are capped by the sweep file limits,
//! per-worker series cover only recently seen workers ([`WORKER_SERIES_MAX`]), and failure kinds
//! outside `[a-z0-9_]{1,32}` or beyond the first [`FAILURE_KINDS_MAX`] are counted as `other`.
//!
//! The listener is [`crate::web`]'s minimal HTTP/1.1 server: `GET`/`HEAD /metrics`, alone on
//! `--metrics-listen` or beside the sweep page when `--http` is the same address. When the
//! coordinator has tokens, a scrape needs a user token (`Authorization: Bearer TOKEN`:
//! Prometheus' `authorization: {credentials_file: ...}`); there is no TLS on it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::job::{JobKind, JobState};
use crate::service::Coordinator;
use crate::store::{JobStore, StoreError};

/// The most workers with per-worker series (the most recently seen first).
pub const WORKER_SERIES_MAX: usize = 1_000;
/// The most distinct failure kinds counted under their own label; later ones count as `other`.
pub const FAILURE_KINDS_MAX: usize = 32;
/// The most leases whose start time is remembered for `prunesweep_job_seconds` (when the table is
/// full, the older half is forgotten: leases reclaimed or never reported back here).
const LEASE_STARTS_MAX: usize = 65_536;

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The encoder refused the metrics (a bug).
    #[error("encoding the metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// The coordinator's metrics: counters and histograms the services update, gauges set on each
/// scrape ([`Metrics::render`]).
pub struct Metrics {
    registry: Registry,
    leases: IntCounter,
    completions: IntCounter,
    failures: IntCounterVec,
    reclaims: IntCounter,
    lease_seconds: Histogram,
    store_seconds: HistogramVec,
    job_seconds: HistogramVec,
    jobs: IntGaugeVec,
    workers: IntGauge,
    heartbeat_age: GaugeVec,
    free_memory: GaugeVec,
    throughput: GaugeVec,
    scrape_seconds: Gauge,
    /// Lease id → when it was granted and its job's kind (for `prunesweep_job_seconds`).
    lease_starts: Mutex<HashMap<String, (Instant, JobKind)>>,
    /// Worker id → when it last called this coordinator (lease poll or heartbeat), in ms since
    /// the epoch: an idle worker long-polls without heartbeating.
    contacts: Mutex<HashMap<String, i64>>,
    /// Worker id → the phase and tokens/s its last heartbeat here reported.
    rates: Mutex<HashMap<String, (&'static str, f64)>>,
    /// The failure kinds counted under their own label.
    failure_kinds: Mutex<HashSet<String>>,
    /// One scrape at a time (the gauges are reset and refilled).
    scrape: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn registered<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry.register(Box::new(metric.clone())).expect("metric names are unique and valid");
    metric
}

impl Metrics {
    /// Every metric, at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        // 100 µs to 10 s: a store call or a lease, from an idle SQLite to a loaded Postgres.
        let fast =
            vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        // 1 s to a day: a score job on a tiny model to a long QLoRA heal.
        let slow = vec![
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 57600.0,
            86400.0,
        ];
        let counter = |name: &str, help: &str| registered(&r, IntCounter::new(name, help).expect("valid"));
        Self {
            leases: counter("prunesweep_leases_total", "Jobs leased to workers."),
            completions: counter("prunesweep_completions_total", "Jobs completed (results accepted)."),
            failures: registered(
                &r,
                IntCounterVec::new(
                    Opts::new("prunesweep_failures_total", "Job failures reported by workers, by kind and retryability."),
                    &["kind", "retryable"],
                )
                .expect("valid"),
            ),
            reclaims: counter("prunesweep_reclaims_total", "Expired leases the reaper took back."),
            lease_seconds: registered(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "prunesweep_lease_seconds",
                        "LeaseJob handling time, without the time parked in the long poll waiting for a job.",
                    )
                    .buckets(fast.clone()),
                )
                .expect("valid"),
            ),
            store_seconds: registered(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "prunesweep_store_seconds",
                        "Job store calls by operation (lease and complete include the group-commit queue).",
                    )
                    .buckets(fast),
                    &["op"],
                )
                .expect("valid"),
            ),
            job_seconds: registered(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "prunesweep_job_seconds",
                        "Job duration from lease to completion, by kind (jobs leased and completed on this coordinator).",
                    )
                    .buckets(slow),
                    &["kind"],
                )
                .expect("valid"),
            ),
            jobs: registered(
                &r,
                IntGaugeVec::new(Opts::new("prunesweep_jobs", "Jobs by sweep and state."), &["sweep", "state"])
                    .expect("valid"),
            ),
            workers: registered(
                &r,
                IntGauge::new(
                    "prunesweep_workers",
                    "Registered workers that heartbeat or called this coordinator within two lease lengths.",
                )
                .expect("valid"),
            ),
            heartbeat_age: registered(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "prunesweep_worker_heartbeat_age_seconds",
                        "Seconds since the worker's last heartbeat (its registration before the first).",
                    ),
                    &["worker", "name"],
                )
                .expect("valid"),
            ),
            free_memory: registered(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "prunesweep_worker_free_memory_bytes",
                        "Free device memory the worker reported with its last LeaseJob here.",
                    ),
                    &["worker", "name"],
                )
                .expect("valid"),
            ),
            throughput: registered(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "prunesweep_worker_tokens_per_second",
                        "Tokens per second in the worker's current phase, as its last heartbeat here reported.",
                    ),
                    &["worker", "name", "phase"],
                )
                .expect("valid"),
            ),
            scrape_seconds: registered(
                &r,
                Gauge::new("prunesweep_scrape_store_seconds", "Time the last scrape spent reading the store.")
                    .expect("valid"),
            ),
            registry: r,
            lease_starts: Mutex::default(),
            contacts: Mutex::default(),
            rates: Mutex::default(),
            failure_kinds: Mutex::default(),
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs a store call, recording its duration under `op`.
    pub async fn time_store<T>(&self, op: &'static str, call: impl Future<Output = T>) -> T {
        let t0 = Instant::now();
        let out = call.await;
        self.store_seconds.with_label_values(&[op]).observe(t0.elapsed().as_secs_f64());
        out
    }

    /// A `LeaseJob` call handled in `busy` (its time parked in the long poll left out).
    pub fn lease_handled(&self, busy: Duration) {
        self.lease_seconds.observe(busy.as_secs_f64());
    }

    /// A job of `kind` was leased under `lease_id`.
    pub fn leased(&self, lease_id: &str, kind: JobKind) {
        self.leases.inc();
        let mut starts = self.lease_starts.lock().expect("never poisoned");
        if starts.len() >= LEASE_STARTS_MAX {
            // Forget the older half (leases reclaimed or never reported here), in one pass.
            let mut times: Vec<Instant> = starts.values().map(|(t, _)| *t).collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            starts.retain(|_, (t, _)| *t > cut);
        }
        starts.insert(lease_id.to_string(), (Instant::now(), kind));
    }

    /// The job under `lease_id` completed.
    pub fn completed(&self, lease_id: &str) {
        self.completions.inc();
        if let Some((t0, kind)) = self.lease_starts.lock().expect("never poisoned").remove(lease_id) {
            self.job_seconds.with_label_values(&[kind.as_str()]).observe(t0.elapsed().as_secs_f64());
        }
    }

    /// The job under `lease_id` failed with `kind` (a worker's label).
    pub fn failed(&self, lease_id: &str, kind: &str, retryable: bool) {
        self.lease_starts.lock().expect("never poisoned").remove(lease_id);
        let kind = self.failure_kind(kind);
        self.failures.with_label_values(&[kind.as_str(), if retryable { "true" } else { "false" }]).inc();
    }

    /// `kind` if it is a plain label and one of the first [`FAILURE_KINDS_MAX`] seen, else `other`.
    fn failure_kind(&self, kind: &str) -> String {
        let plain = !kind.is_empty()
            && kind.len() <= 32
            && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plain {
            return "other".into();
        }
        let mut kinds = self.failure_kinds.lock().expect("never poisoned");
        if kinds.contains(kind) || kinds.len() < FAILURE_KINDS_MAX {
            kinds.insert(kind.to_string());
            kind.to_string()
        } else {
            "other".into()
        }
    }

    /// The reaper took back `n` expired leases.
    pub fn reclaimed(&self, n: u32) {
        self.reclaims.inc_by(u64::from(n));
    }

    /// A heartbeat reported `phase` and `tokens_per_second`: kept for the throughput gauge (a phase
    /// that is not one of the pipeline's is labelled `other`; a missing or non-finite rate clears
    /// the worker's).
    pub fn heartbeat(&self, worker_id: &str, phase: Option<&str>, tokens_per_second: Option<f64>) {
        const PHASES: [&str; 5] = ["load", "score", "prune", "heal", "eval"];
        let mut rates = self.rates.lock().expect("never poisoned");
        match tokens_per_second.filter(|r| r.is_finite() && *r >= 0.0) {
            Some(rate) => {
                let phase = PHASES.into_iter().find(|p| Some(*p) == phase).unwrap_or("other");
                if rates.len() < 4 * WORKER_SERIES_MAX || rates.contains_key(worker_id) {
                    rates.insert(worker_id.to_string(), (phase, rate));
                }
            }
            None => {
                rates.remove(worker_id);
            }
        }
    }

    /// Each worker's phase and tokens/s as its last heartbeat here reported (for the sweep page).
    pub fn rates(&self) -> HashMap<String, (&'static str, f64)> {
        self.rates.lock().expect("never poisoned").clone()
    }

    /// A registered worker called this coordinator at `now` (ms since the epoch).
    pub fn contact(&self, worker_id: &str, now: i64) {
        let mut contacts = self.contacts.lock().expect("never poisoned");
        if contacts.len() >= 4 * WORKER_SERIES_MAX && !contacts.contains_key(worker_id) {
            // Keep the most recent half.
            let mut times: Vec<i64> = contacts.values().copied().collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            contacts.retain(|_, t| *t > cut);
        }
        contacts.insert(worker_id.to_string(), now);
    }

    /// Reads the store, sets the gauges, and encodes every metric in the text format.
    /// `free_memory`: each worker's last reported free memory; `lease_ttl`: the lease length.
    pub async fn render(
        &self,
        store: &dyn JobStore,
        free_memory: &HashMap<String, u64>,
        lease_ttl: Duration,
        now: i64,
    ) -> Result<String, ScrapeError> {
        let _one = self.scrape.lock().await;
        let t0 = Instant::now();
        let sweeps = self.time_store("sweeps", store.sweeps()).await?;
        let workers = self.time_store("workers", store.workers()).await?;
        self.scrape_seconds.set(t0.elapsed().as_secs_f64());

        self.jobs.reset();
        for sweep in &sweeps {
            for (state, n) in JobState::ALL.iter().zip(sweep.counts) {
                self.jobs.with_label_values(&[sweep.name.as_str(), state.as_str()]).set(i64::from(n));
            }
        }

        let ttl_ms = i64::try_from(lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let live_ms = ttl_ms.saturating_mul(2);
        // Per-worker series: workers seen in the last 15 minutes or 10 lease lengths.
        let recent_ms = ttl_ms.saturating_mul(10).max(15 * 60 * 1000);
        let contacts = self.contacts.lock().expect("never poisoned").clone();
        let mut seen: Vec<_> =
            workers.iter().map(|w| (w, w.last_seen.max(contacts.get(&w.id).copied().unwrap_or(i64::MIN)))).collect();
        seen.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        self.workers.set(seen.iter().filter(|(_, t)| now.saturating_sub(*t) <= live_ms).count() as i64);
        self.heartbeat_age.reset();
        self.free_memory.reset();
        self.throughput.reset();
        let rates = self.rates.lock().expect("never poisoned").clone();
        for (w, _) in seen.iter().filter(|(_, t)| now.saturating_sub(*t) <= recent_ms).take(WORKER_SERIES_MAX) {
            let labels = [w.id.as_str(), w.info.name.as_str()];
            let age = now.saturating_sub(w.last_seen).max(0) as f64 / 1000.0;
            self.heartbeat_age.with_label_values(&labels).set(age);
            if let Some(free) = free_memory.get(&w.id) {
                self.free_memory.with_label_values(&labels).set(*free as f64);
            }
            if let Some((phase, rate)) = rates.get(&w.id) {
                self.throughput.with_label_values(&[labels[0], labels[1], phase]).set(*rate);
            }
        }

        let mut out = String::new();
        TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

/// The reply to `GET /metrics` (the listener, its routing and its token check are
/// [`crate::web`]'s): the text format, or 503 when the store cannot be read.
pub(crate) async fn respond(coordinator: &Coordinator) -> Response<Full<Bytes>> {
    match coordinator.render_metrics().await {
        Ok(body) => {
            let mut response = crate::web::text(StatusCode::OK, body);
            let format = TextEncoder::new().format_type().to_string();
            if let Ok(value) = hyper::header::HeaderValue::from_str(&format) {
                response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        Err(e) => {
            tracing::warn!("metrics scrape: {e}");
            crate::web::text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_are_plain_labels_and_bounded() {
        let m = Metrics::new();
        assert_eq!(m.failure_kind("runtime"), "runtime");
        for odd in ["", "Runtime", "a b", "x\"y", "kind\n", &"k".repeat(33), "é"] {
            assert_eq!(m.failure_kind(odd), "other", "{odd:?}");
        }
        for i in 1..FAILURE_KINDS_MAX {
            assert_eq!(m.failure_kind(&format!("k{i}")), format!("k{i}"));
        }
        assert_eq!(m.failure_kind("one_too_many"), "other");
        assert_eq!(m.failure_kind("runtime"), "runtime", "a kind already counted keeps its label");
    }

    #[test]
    fn job_seconds_needs_the_lease_seen_here() {
        let m = Metrics::new();
        m.leased("a", JobKind::Cell);
        m.completed("a");
        m.completed("unknown");
        m.completed("a"); // a replayed completion is counted, not timed again
        assert_eq!(m.completions.get(), 3);
        assert_eq!(m.job_seconds.with_label_values(&["cell"]).get_sample_count(), 1);
        m.leased("b", JobKind::Score);
        m.failed("b", "runtime", true);
        assert!(m.lease_starts.lock().unwrap().is_empty());
    }
}

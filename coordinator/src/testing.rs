//! Test harness shared by the coordinator's and the worker's tests (feature `test-util`; always on
//! in this crate's unit tests): fresh stores (a temp SQLite file, or a private schema of the
//! Postgres at 127.0.0.1:5432), a coordinator serving one on 127.0.0.1:0, lease timing short
//! enough for tests, the tiny sweep, and a wait for a sweep to finish.
//!
//! Helpers panic on failure (they are for tests): a missing Postgres fails a test, it does not
//! skip it.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection};

use crate::job::JobState;
use crate::store::{JobStore, PgStore, SqliteStore, SweepCounts};
use crate::Config;

/// The Postgres the tests use: `$PRUNESWEEP_TEST_POSTGRES`, else database `test` at
/// 127.0.0.1:5432 as user `postgres`.
pub fn postgres_url() -> String {
    std::env::var("PRUNESWEEP_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh store and what keeps it alive: the SQLite file's temp dir, or the Postgres schema that
/// [`TestStore::cleanup`] drops.
pub struct TestStore {
    /// The store.
    pub store: Arc<dyn JobStore>,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl TestStore {
    /// Drops the Postgres schema (SQLite: the temp dir goes with `self`).
    pub async fn cleanup(self) {
        if let Some(schema) = &self.schema {
            let mut conn = sqlx::PgConnection::connect(&postgres_url()).await.expect("connect to Postgres");
            sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
                .execute(&mut conn)
                .await
                .expect("drop schema");
        }
    }
}

/// A fresh SQLite store in a temp dir (removed when the [`TestStore`] drops).
pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("results/coordinator.sqlite").display());
    let store = SqliteStore::connect(&url).await.expect("open SQLite store");
    TestStore { store: Arc::new(store), _dir: Some(dir), schema: None }
}

/// A fresh Postgres store ([`postgres_url`]) in a schema of its own, so tests run in parallel;
/// [`TestStore::cleanup`] drops it.
pub async fn postgres() -> TestStore {
    let url = postgres_url();
    let schema = format!("ps_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("Postgres at {url} (set PRUNESWEEP_TEST_POSTGRES): {e}"));
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.expect("create schema");
    let options = PgConnectOptions::from_str(&url).expect("URL").options([("search_path", schema.as_str())]);
    let store = PgStore::connect_with(options, 8).await.expect("open Postgres store");
    TestStore { store: Arc::new(store), _dir: None, schema: Some(schema) }
}

/// Lease timing for in-process fake workers: 600 ms leases, so an expired one comes back fast.
pub fn fast_config() -> Config {
    Config {
        lease_ttl: Duration::from_millis(600),
        heartbeat_interval: Duration::from_millis(150),
        reap_interval: Duration::from_millis(100),
        startup_grace: Duration::from_millis(600),
        max_wait: Duration::from_secs(2),
        watch_poll: Duration::from_millis(50),
        ..Config::default()
    }
}

/// Lease timing for real `worker serve` processes: 3 s leases (a worker has to start and load its
/// model between heartbeats), still short enough that a killed worker's job comes back quickly.
pub fn worker_process_config() -> Config {
    Config {
        lease_ttl: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(300),
        reap_interval: Duration::from_millis(200),
        startup_grace: Duration::from_secs(3),
        max_wait: Duration::from_secs(1),
        watch_poll: Duration::from_millis(50),
        ..Config::default()
    }
}

/// A coordinator serving `store` on 127.0.0.1:0 (on the current tokio runtime); returns its URL
/// (`http://127.0.0.1:PORT`) and the handle that stops it.
pub async fn start_server(store: Arc<dyn JobStore>, config: Config) -> (String, ServerHandle) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_server_on(listener, store, config)
}

/// [`start_server`] on a listener of the caller's (a restarted coordinator on the address of the
/// one it replaces).
pub fn start_server_on(
    listener: tokio::net::TcpListener,
    store: Arc<dyn JobStore>,
    config: Config,
) -> (String, ServerHandle) {
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        crate::run(listener, store, config, async {
            let _ = rx.await;
        })
        .await
        .expect("server");
    });
    (format!("http://{addr}"), ServerHandle { stop: Some(tx), task })
}

/// [`start_server`], with `GET /metrics` on another 127.0.0.1:0 listener
/// ([`crate::server::serve_with_metrics`]); returns the gRPC URL, the metrics address
/// (`127.0.0.1:PORT`) and the handle that stops both.
pub async fn start_server_with_metrics(store: Arc<dyn JobStore>, config: Config) -> (String, String, ServerHandle) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
    let (addr, metrics_addr) = (listener.local_addr().expect("addr"), metrics.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        let security = crate::auth::Security::default();
        crate::server::serve_with_metrics(listener, Some(metrics), store, config, security, shutdown)
            .await
            .expect("server");
    });
    (format!("http://{addr}"), metrics_addr.to_string(), ServerHandle { stop: Some(tx), task })
}

/// A server started by [`start_server`]; [`ServerHandle::shutdown`] stops it.
pub struct ServerHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Graceful shutdown; waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("server task");
    }
}

/// A sweep's status from `GetSweep` as the store's [`SweepCounts`] (name and job counts only).
pub fn sweep_counts(status: &pb::SweepStatus) -> SweepCounts {
    let count = |state| match state {
        JobState::Blocked => status.blocked,
        JobState::Pending => status.pending,
        JobState::Leased => status.leased,
        JobState::Succeeded => status.succeeded,
        JobState::Failed => status.failed,
        JobState::Cancelled => status.cancelled,
    };
    SweepCounts { name: status.name.clone(), counts: JobState::ALL.map(count), ..SweepCounts::default() }
}

/// True when every job of the sweep is finished ([`SweepCounts::is_done`]).
pub fn sweep_is_done(status: &pb::SweepStatus) -> bool {
    sweep_counts(status).is_done()
}

/// Polls `GetSweep` on the coordinator at `url` until `sweep` is done ([`sweep_is_done`]) and
/// returns its last status; panics with that status after `timeout`.
pub async fn wait_until_done(url: &str, sweep: &str, timeout: Duration) -> pb::SweepStatus {
    let mut client = SweepServiceClient::connect(url.to_string()).await.expect("connect to the coordinator");
    let t0 = Instant::now();
    loop {
        let request = pb::GetSweepRequest { sweep: sweep.into() };
        let status = client.get_sweep(request).await.expect("GetSweep").into_inner();
        if sweep_is_done(&status) {
            return status;
        }
        assert!(t0.elapsed() < timeout, "sweep {sweep} not done after {timeout:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tiny random llama checkpoint, relative to the workspace root.
pub const TINY_MODEL: &str = "worker/tests/fixtures/tiny-llama";

/// [`tiny_sweep`]`("tiny", TINY_MODEL, "data.jsonl", "max_attempts: 2\n")`: for tests where no
/// worker reads the data.
pub const TINY: &str = "name: tiny\n\
models:\n  - name: tiny-llama\n    path: worker/tests/fixtures/tiny-llama\n\
calibration:\n  path: data.jsonl\n  samples: 4\n  seq_len: 16\n\
methods: [angular, deepest]\n\
fractions: [0.25, 0.5]\n\
eval:\n  - task: c4-loss\n    path: data.jsonl\n    limit: 4\n\
max_attempts: 2\n";

/// The tiny sweep: one model, angular + deepest at 2 fractions, and a baseline → 1 score job,
/// 1 baseline and 4 cells, calibrated on 4 documents of 16 tokens and evaluated by the c4-loss of
/// 4 documents. `data` is the calibration and c4-loss file (JSON lines); `extra` is appended at
/// the top level (`seed`, `max_attempts`, `heal` variants, ...).
pub fn tiny_sweep(name: &str, model: &str, data: &str, extra: &str) -> String {
    format!(
        "name: {name}\n\
         models:\n  - name: tiny-llama\n    path: {model}\n\
         calibration:\n  path: {data}\n  samples: 4\n  seq_len: 16\n\
         methods: [angular, deepest]\n\
         fractions: [0.25, 0.5]\n\
         eval:\n  - task: c4-loss\n    path: {data}\n    limit: 4\n\
         {extra}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobKind;
    use crate::sweep::SweepSpec;

    #[test]
    fn tiny_is_the_tiny_sweep_and_expands_to_six_jobs() {
        assert_eq!(TINY, tiny_sweep("tiny", TINY_MODEL, "data.jsonl", "max_attempts: 2\n"));
        let jobs = SweepSpec::parse(TINY, "tiny.yaml").unwrap().expand();
        let count = |kind| jobs.iter().filter(|j| j.spec.kind == kind).count();
        assert_eq!((count(JobKind::Score), count(JobKind::Baseline), count(JobKind::Cell)), (1, 1, 4));
    }

    #[test]
    fn done_means_no_blocked_pending_or_leased_job() {
        let status = pb::SweepStatus { succeeded: 3, failed: 1, cancelled: 2, ..Default::default() };
        assert!(sweep_is_done(&status));
        for unfinished in [
            pb::SweepStatus { blocked: 1, ..status.clone() },
            pb::SweepStatus { pending: 1, ..status.clone() },
            pb::SweepStatus { leased: 1, ..status.clone() },
        ] {
            assert!(!sweep_is_done(&unfinished), "{unfinished:?}");
        }
        assert_eq!(sweep_counts(&status).total(), 6);
    }
}

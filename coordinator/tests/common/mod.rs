//! Test helpers: fresh stores (a temp SQLite file, or a private Postgres schema), sweep fixtures,
//! and a running coordinator on 127.0.0.1:0.
#![allow(dead_code, missing_docs)]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use prunesweep_coordinator::store::{JobStore, PgStore, SqliteStore};
use prunesweep_coordinator::Config;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection};

/// The Postgres used by the tests (`PRUNESWEEP_TEST_POSTGRES`); the tests fail, not skip, without it.
pub fn postgres_url() -> String {
    std::env::var("PRUNESWEEP_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A store and what keeps it alive.
pub struct TestStore {
    pub store: Arc<dyn JobStore>,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl TestStore {
    /// Drop the Postgres schema (SQLite: the temp dir goes with `self`).
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

/// A fresh SQLite store in a temp file.
pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("results/coordinator.sqlite").display());
    let store = SqliteStore::connect(&url).await.expect("open SQLite store");
    TestStore { store: Arc::new(store), _dir: Some(dir), schema: None }
}

/// A fresh Postgres store in its own schema, so tests run in parallel.
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

/// The tiny sweep: 1 model, angular + deepest, 2 fractions, baseline → 1 score, 1 baseline, 4 cells.
pub const TINY: &str = "name: tiny\n\
models:\n  - name: tiny-llama\n    path: worker/tests/fixtures/tiny-llama\n\
calibration:\n  path: data.jsonl\n  samples: 4\n  seq_len: 16\n\
methods: [angular, deepest]\n\
fractions: [0.25, 0.5]\n\
eval:\n  - task: c4-loss\n    path: data.jsonl\n    limit: 4\n\
max_attempts: 2\n";

/// Fast lease timing for tests.
pub fn fast_config() -> Config {
    Config {
        lease_ttl: Duration::from_millis(600),
        heartbeat_interval: Duration::from_millis(150),
        reap_interval: Duration::from_millis(100),
        max_wait: Duration::from_secs(2),
        watch_poll: Duration::from_millis(50),
    }
}

/// A coordinator serving `store` on 127.0.0.1:0; returns its URL and a handle that stops it.
pub async fn start_server(store: Arc<dyn JobStore>, config: Config) -> (String, ServerHandle) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        prunesweep_coordinator::run(listener, store, config, async {
            let _ = rx.await;
        })
        .await
        .expect("server");
    });
    (format!("http://{addr}"), ServerHandle { stop: Some(tx), task })
}

/// Stops the server when told.
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

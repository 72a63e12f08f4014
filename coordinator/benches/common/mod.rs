//! What the coordinator's benchmarks share: settings from the environment, a registered fake
//! worker, and the two stores (SQLite in a temp dir; Postgres in a schema of its own, dropped at
//! the end).

#![allow(dead_code)]

use std::str::FromStr;
use std::sync::Arc;

use prunesweep_coordinator::store::{JobStore, PgStore, SqliteStore};
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;
use sqlx::{AssertSqlSafe, Connection};
use tonic::transport::Channel;

/// A count from the environment (`JOBS=5000`), or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Registers fake worker `bench-{i}`; returns its id.
pub async fn register(w: &mut WorkerServiceClient<Channel>, i: usize) -> String {
    w.register(pb::RegisterRequest {
        name: format!("bench-{i}"),
        device: "cpu".into(),
        memory_bytes: None,
        version: "bench".into(),
    })
    .await
    .expect("register")
    .into_inner()
    .worker_id
}

/// A SQLite store in `dir`.
pub async fn sqlite(dir: &std::path::Path) -> Arc<dyn JobStore> {
    let url = format!("sqlite://{}", dir.join("bench.sqlite").display());
    Arc::new(SqliteStore::connect(&url).await.expect("SQLite"))
}

/// A Postgres store in a fresh schema `{prefix}_{pid}` of `PRUNESWEEP_TEST_POSTGRES` (default
/// `postgres://postgres@127.0.0.1:5432/test`); [`Schema::drop`] removes it.
pub async fn postgres(prefix: &str) -> (Arc<dyn JobStore>, Schema) {
    let pg =
        std::env::var("PRUNESWEEP_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("{prefix}_{}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(&pg).await.expect("Postgres");
    let sql = |s: String| sqlx::query(AssertSqlSafe(s));
    sql(format!("DROP SCHEMA IF EXISTS {name} CASCADE")).execute(&mut conn).await.expect("drop");
    sql(format!("CREATE SCHEMA {name}")).execute(&mut conn).await.expect("create schema");
    let options =
        sqlx::postgres::PgConnectOptions::from_str(&pg).expect("URL").options([("search_path", name.as_str())]);
    let store: Arc<dyn JobStore> = Arc::new(PgStore::connect_with(options, 16).await.expect("Postgres store"));
    (store, Schema { conn, name })
}

/// A benchmark's Postgres schema.
pub struct Schema {
    conn: sqlx::PgConnection,
    name: String,
}

impl Schema {
    /// Drops the schema and everything in it.
    pub async fn drop(mut self) {
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {} CASCADE", self.name)))
            .execute(&mut self.conn)
            .await
            .expect("drop");
    }
}

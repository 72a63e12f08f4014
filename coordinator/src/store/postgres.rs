//! The Postgres backend (`--database postgres://...`): several coordinators' worth of concurrency,
//! claims with `FOR UPDATE SKIP LOCKED` so concurrent leases never wait on each other.

use std::str::FromStr;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, SqlSafeStr};

use super::common::impl_store;
use super::StoreError;

/// A job store in a Postgres database.
#[derive(Debug, Clone)]
pub struct PgStore {
    /// The connection pool.
    pub(crate) pool: PgPool,
}

/// The Postgres migrations, embedded in the binary.
pub fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "init".into(),
        MigrationType::Simple,
        include_str!("../../migrations/postgres/0001_init.sql").into_sql_str(),
        false,
    )])
}

impl PgStore {
    /// Connect and migrate.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(PgConnectOptions::from_str(url)?, 16).await
    }

    /// Connect with explicit options (tests set `search_path` to a private schema) and migrate.
    pub async fn connect_with(options: PgConnectOptions, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(max_connections).connect_with(options).await?;
        migrator().run(&pool).await?;
        Ok(Self { pool })
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    const LOCK: &'static str = " FOR UPDATE";

    const CANDIDATES_HELD: &'static str = "SELECT id FROM jobs WHERE state = 'pending' \
        AND model IN (SELECT jsonb_array_elements_text($1::jsonb)) ORDER BY priority DESC, id LIMIT $2 \
        FOR UPDATE SKIP LOCKED";

    const CANDIDATES_ANY: &'static str =
        "SELECT id FROM jobs WHERE state = 'pending' ORDER BY priority DESC, id LIMIT $1 FOR UPDATE SKIP LOCKED";

    const SELECT_EXPIRED: &'static str = "SELECT id, sweep_id, attempts, max_attempts, worker_id, lease_id \
        FROM jobs WHERE state = 'leased' AND lease_expires_at < $1 ORDER BY id FOR UPDATE SKIP LOCKED";
}

impl_store!(PgStore, sqlx::Postgres);

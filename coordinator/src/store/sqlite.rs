//! The SQLite backend: the embedded default, a file under `results/` in WAL mode.
//!
//! One connection, so there is one writer and writes queue in sqlx rather than spinning on
//! `SQLITE_BUSY`; write transactions still begin with `BEGIN IMMEDIATE` so that a pool with more
//! connections could not deadlock on a read-to-write upgrade.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqlSafeStr, SqlitePool};

use super::common::impl_store;
use super::StoreError;

/// A job store in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The connection pool (one connection).
    pub(crate) pool: SqlitePool,
}

/// The SQLite migrations, embedded in the binary.
pub fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "init".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/0001_init.sql").into_sql_str(),
        false,
    )])
}

impl SqliteStore {
    /// Open (creating the file and its directory if needed) and migrate. Accepts `sqlite://PATH`,
    /// `sqlite:PATH`, `sqlite::memory:` or a bare path.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let url = if url.starts_with("sqlite:") { url.to_string() } else { format!("sqlite://{url}") };
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
            }
        }
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
        migrator().run(&pool).await?;
        Ok(Self { pool })
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    const LOCK: &'static str = "";

    const CANDIDATES_HELD: &'static str = "SELECT id FROM jobs WHERE state = 'pending' \
        AND model IN (SELECT value FROM json_each($1)) ORDER BY priority DESC, id LIMIT $2";

    const CANDIDATES_ANY: &'static str =
        "SELECT id FROM jobs WHERE state = 'pending' ORDER BY priority DESC, id LIMIT $1";

    const SELECT_EXPIRED: &'static str = "SELECT id, sweep_id, attempts, max_attempts, worker_id, lease_id \
        FROM jobs WHERE state = 'leased' AND lease_expires_at < $1 ORDER BY id";
}

impl_store!(SqliteStore, sqlx::Sqlite);

//! The SQLite backend: the embedded default, a file under `results/` in WAL mode.
//!
//! One connection, so there is one writer and writes queue in sqlx rather than spinning on
//! `SQLITE_BUSY`; write transactions still begin with `BEGIN IMMEDIATE` so that a pool with more
//! connections could not deadlock on a read-to-write upgrade.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite, Transaction};

use super::dialect::Dialect;
use super::sql::{migrations, SqlStore};
use super::StoreError;

/// A job store in a SQLite database.
pub type SqliteStore = SqlStore<Sqlite>;

/// The SQLite migrations, embedded in the binary.
pub fn migrator() -> Migrator {
    migrations([
        ("init", include_str!("../../migrations/sqlite/0001_init.sql")),
        ("heartbeat progress", include_str!("../../migrations/sqlite/0002_heartbeat_progress.sql")),
        ("predicted memory", include_str!("../../migrations/sqlite/0003_predicted_memory.sql")),
        ("provenance", include_str!("../../migrations/sqlite/0004_provenance.sql")),
    ])
}

impl SqlStore<Sqlite> {
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
        Ok(Self::new(pool))
    }
}

impl Dialect for Sqlite {
    const LOCK: &'static str = "";

    const CANDIDATES_HELD: &'static str = "SELECT id, state, attempts, max_attempts, predicted_device_bytes \
        FROM jobs WHERE state = $1 AND model IN (SELECT value FROM json_each($2)) \
        AND ($4 IS NULL OR predicted_device_bytes IS NULL OR predicted_device_bytes <= $4) \
        ORDER BY priority DESC, id LIMIT $3";

    const CANDIDATES_ANY: &'static str = "SELECT id, state, attempts, max_attempts, predicted_device_bytes \
        FROM jobs WHERE state = $1 AND ($3 IS NULL OR predicted_device_bytes IS NULL OR predicted_device_bytes <= $3) \
        ORDER BY priority DESC, id LIMIT $2";

    const SELECT_EXPIRED: &'static str = "SELECT id, sweep_id, state, attempts, max_attempts, worker_id, lease_id \
        FROM jobs WHERE state = $1 AND lease_expires_at < $2 ORDER BY id";

    /// None: `BEGIN IMMEDIATE` write transactions run one at a time, in the order they commit.
    const ORDER_EVENTS: Option<&'static str> = None;

    fn begin_write(pool: &Pool<Self>) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send {
        pool.begin_with("BEGIN IMMEDIATE")
    }
}

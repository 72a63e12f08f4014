//! The Postgres backend (`--database postgres://...`): several coordinators' worth of concurrency,
//! claims with `FOR UPDATE SKIP LOCKED` so concurrent leases never wait on each other.

use std::future::Future;
use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Pool, Postgres, Transaction};

use super::dialect::Dialect;
use super::sql::{migrations, SqlStore};
use super::StoreError;

/// A job store in a Postgres database.
pub type PgStore = SqlStore<Postgres>;

/// The Postgres migrations, embedded in the binary.
pub fn migrator() -> Migrator {
    migrations([
        ("init", include_str!("../../migrations/postgres/0001_init.sql")),
        ("heartbeat progress", include_str!("../../migrations/postgres/0002_heartbeat_progress.sql")),
        ("predicted memory", include_str!("../../migrations/postgres/0003_predicted_memory.sql")),
        ("provenance", include_str!("../../migrations/postgres/0004_provenance.sql")),
    ])
}

impl SqlStore<Postgres> {
    /// Connect and migrate.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(PgConnectOptions::from_str(url)?, 16).await
    }

    /// Connect with explicit options (tests set `search_path` to a private schema) and migrate.
    pub async fn connect_with(options: PgConnectOptions, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(max_connections).connect_with(options).await?;
        migrator().run(&pool).await?;
        Ok(Self::new(pool))
    }
}

impl Dialect for Postgres {
    const LOCK: &'static str = " FOR UPDATE";

    const CANDIDATES_HELD: &'static str = "SELECT id, state, attempts, max_attempts, predicted_device_bytes \
        FROM jobs WHERE state = $1 AND model IN (SELECT jsonb_array_elements_text($2::jsonb)) \
        AND ($4::BIGINT IS NULL OR predicted_device_bytes IS NULL OR predicted_device_bytes <= $4::BIGINT) \
        ORDER BY priority DESC, id LIMIT $3 FOR UPDATE SKIP LOCKED";

    const CANDIDATES_ANY: &'static str = "SELECT id, state, attempts, max_attempts, predicted_device_bytes \
        FROM jobs WHERE state = $1 \
        AND ($3::BIGINT IS NULL OR predicted_device_bytes IS NULL OR predicted_device_bytes <= $3::BIGINT) \
        ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED";

    const SELECT_EXPIRED: &'static str = "SELECT id, sweep_id, state, attempts, max_attempts, worker_id, lease_id \
        FROM jobs WHERE state = $1 AND lease_expires_at < $2 ORDER BY id FOR UPDATE SKIP LOCKED";

    /// A transaction-scoped advisory lock (key: "prunesweep" in ASCII, its first 8 bytes). Two
    /// writers' events would otherwise take identity values in one order and could commit in the
    /// other, and a follower that read the higher one first would never read the lower. With the
    /// lock, the next writer takes its identity values after the last one committed. It is held
    /// only for the events' `INSERT` and the commit; the insert's foreign-key checks share the
    /// rows of jobs this transaction has already locked and of its sweep, which no one locks
    /// `FOR UPDATE`, so waiting for it cannot deadlock.
    const ORDER_EVENTS: Option<&'static str> = Some("SELECT pg_advisory_xact_lock(8102667796601861989)");

    fn begin_write(pool: &Pool<Self>) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send {
        pool.begin()
    }
}

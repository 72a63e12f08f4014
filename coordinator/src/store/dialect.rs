//! What differs between the two backends ([`Dialect`]), and the sqlx bounds the shared SQL puts on
//! the Rust types it binds and reads ([`Param`], [`Scalar`]).
//!
//! The SQL in [`super::sql`] is the same for SQLite and Postgres: both accept `$1` parameters,
//! `RETURNING` and `ON CONFLICT`. A dialect supplies the rest: how a write transaction begins, how
//! rows read inside one are locked, and the three queries that differ in locking
//! (`FOR UPDATE SKIP LOCKED`) and in how they expand a JSON list. Job states are parameters in
//! every query (bound from [`crate::job::JobState::as_str`]), never literals.

use std::future::Future;

use sqlx::{Database, Decode, Encode, IntoArguments, Pool, Transaction, Type};

/// A database the store runs on: `sqlx::Sqlite` (`sqlite.rs`) or `sqlx::Postgres` (`postgres.rs`).
pub trait Dialect: Database<Arguments: IntoArguments<Self>> {
    /// The row-lock suffix for reads inside a write transaction: ` FOR UPDATE` on Postgres,
    /// nothing on SQLite, whose write transactions are already exclusive.
    const LOCK: &'static str;

    /// Lease candidates among the jobs of models a worker holds, best first, claimed by no
    /// concurrent transaction. `$1`: the pending state; `$2`: the models, a JSON array of strings;
    /// `$3`: how many; `$4`: the most predicted device memory a candidate may need (NULL: any;
    /// a job without a prediction always qualifies). Columns: `id, state, attempts,
    /// max_attempts, predicted_device_bytes`.
    const CANDIDATES_HELD: &'static str;

    /// Lease candidates of any model, best first. `$1`: the pending state; `$2`: how many; `$3`:
    /// the most predicted device memory a candidate may need, as in [`Dialect::CANDIDATES_HELD`].
    /// Columns: `id, state, attempts, max_attempts, predicted_device_bytes`.
    const CANDIDATES_ANY: &'static str;

    /// Jobs whose lease expired, in id order, claimed by no concurrent reaper. `$1`: the leased
    /// state; `$2`: now. Columns: `id, sweep_id, state, attempts, max_attempts, worker_id, lease_id`.
    const SELECT_EXPIRED: &'static str;

    /// A statement a transaction runs just before writing its events, so that events commit in
    /// the order of their sequence numbers (see `sql::Tx`), or `None` where write transactions
    /// already commit one at a time (SQLite). Taken last, after every row lock the transaction
    /// holds, and held until it commits.
    const ORDER_EVENTS: Option<&'static str>;

    /// Begins a transaction that will write (`BEGIN IMMEDIATE` on SQLite, so that two writers
    /// never deadlock upgrading a read lock).
    fn begin_write(pool: &Pool<Self>) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send;
}

/// A Rust type the shared SQL binds as a parameter in database `DB` (`&str`, and every [`Scalar`]).
pub trait Param<DB: Database>: for<'e> Encode<'e, DB> + Type<DB> + Send {}

impl<DB: Database, T> Param<DB> for T where T: for<'e> Encode<'e, DB> + Type<DB> + Send {}

/// A Rust type the shared SQL binds as a parameter and reads from a column, in database `DB`.
///
/// Rust does not carry a function's `where` clauses over to its callers, so the generic query
/// code states, once per `impl` block, that `&str`, `i64`, `f64`, `String` and their `Option`s
/// are [`Param`]s or `Scalar`s of its database; these traits keep each bound to one line.
pub trait Scalar<DB: Database>: Param<DB> + for<'r> Decode<'r, DB> {}

impl<DB: Database, T> Scalar<DB> for T where T: Param<DB> + for<'r> Decode<'r, DB> {}

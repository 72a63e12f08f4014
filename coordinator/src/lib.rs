//! The prunesweep coordinator: sweep files in, jobs leased to GPU workers over gRPC, results out.
//!
//! # Layout
//!
//! - [`sweep`]: sweep files (`experiments/*.yaml`) → validated [`sweep::SweepSpec`] → planned jobs
//!   (schema, validation and expansion, one file each).
//! - [`spec`]: a job's resolved content ([`spec::JobSpec`]: every setting that can change a
//!   result) and its key.
//! - [`plan`]: `coordinator plan`: the expanded jobs and their resolved settings, as a table or JSON.
//! - [`job`]: the job state machine, pure.
//! - [`store`]: the durable store (one trait; SQLite and Postgres backends).
//! - [`group_commit`]: leases and completions that arrive together share one transaction.
//! - [`service`]: the tonic services; protobuf ↔ domain conversion happens only there
//!   (`service/convert.rs`).
//! - [`config`]: lease timing and long-poll limits ([`Config::for_lease_ttl`]).
//! - [`server`]: [`server::run`] serves both services on a bound listener until a shutdown future
//!   resolves, with the lease reaper alongside ([`server::serve`]: with tokens and TLS).
//! - [`metrics`]: Prometheus counters, histograms and scrape-time gauges; `GET /metrics`.
//! - [`web`]: the live sweep page (`serve --http`): HTML, a polling script, JSON, SVG figures;
//!   the HTTP listener it shares with `/metrics`, behind the user tokens.
//! - [`auth`]: bearer tokens in two roles (users, workers), TLS settings, client endpoints.
//! - [`export`]: results → CSV / Parquet (polars).
//! - [`plot`]: results → accuracy-versus-fraction-dropped charts (SVG + PNG).
//! - `testing` (feature `test-util`): the store and server harness shared with the worker's tests.

pub mod auth;
pub mod config;
pub mod export;
pub mod group_commit;
pub mod job;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod server;
pub mod service;
pub mod spec;
pub mod store;
pub mod sweep;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod web;

pub use config::Config;
pub use server::run;

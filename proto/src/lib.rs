//! The prunesweep gRPC contract: package `prunesweep.v1` (`prunesweep/v1/prunesweep.proto`).
//!
//! `SweepService` is the client side (submit, status, cancel, retry, watch, results);
//! `WorkerService` is the worker side (register, lease, heartbeat, complete, fail). Both are
//! generated with a client and a server; the coordinator implements the servers, the CLI and the
//! workers use the clients.
//!
//! Beside the generated code: [`vocabulary`], the enums' names in files and on the command line,
//! [`defaults`], the one default of every setting a job carries, and [`client`], how a client
//! (the CLI, a worker) connects: token, TLS, deadlines, keepalives, and [`memory`], a job's
//! predicted peak device and host memory from its model's shape (the plan shows it; leasing uses it).

/// Version 1 of the contract: messages, enums, `*_client` and `*_server` modules.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("prunesweep.v1");
}

pub mod client;
pub mod defaults;
pub mod memory;
pub mod vocabulary;

pub use vocabulary::Vocabulary;

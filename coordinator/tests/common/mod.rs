//! Test helpers: fresh stores (a temp SQLite file, or a private Postgres schema), sweep fixtures,
//! and a running coordinator on 127.0.0.1:0. They live in [`prunesweep_coordinator::testing`]
//! (feature `test-util`), shared with the worker's tests; this module re-exports them.
#![allow(unused_imports)]

pub use prunesweep_coordinator::testing::*;

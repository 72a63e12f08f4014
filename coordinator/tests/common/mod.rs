//! Test helpers: fresh stores (a temp SQLite file, or a private Postgres schema), sweep fixtures,
//! and a running coordinator on 127.0.0.1:0. They live in [`prunesweep_coordinator::testing`]
//! (feature `test-util`), shared with the worker's tests; this module re-exports them.
#![allow(unused_imports)]

pub use prunesweep_coordinator::testing::*;

/// Runs each listed test function (`async fn name(store: &TestStore)`) on both backends, as
/// `sqlite::name` and `postgres::name`, each on a fresh store dropped after.
#[allow(unused_macros)]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = crate::common::sqlite().await;
                    super::$name(&s).await;
                    s.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = crate::common::postgres().await;
                    super::$name(&s).await;
                    s.cleanup().await;
                }
            )*
        }
    };
}

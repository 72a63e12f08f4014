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

/// One HTTP/1.1 request over a fresh connection, with `headers`: (status code, headers
/// lowercased, body). For the metrics listener and the sweep page.
#[allow(dead_code)]
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, std::collections::HashMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTP listener");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("reply in time")
        .unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| l.split_once(':').expect("header"))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

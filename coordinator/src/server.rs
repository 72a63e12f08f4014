//! Serving: both gRPC services and `grpc.health.v1` on one listener, plus the lease reaper, until
//! shutdown.
//!
//! [`run`] takes a bound listener (tests bind `127.0.0.1:0`), the store and a shutdown future, as
//! mini-redis's `server::run` does. When the future resolves the server reports NOT_SERVING on
//! its health service, stops accepting, ends open `WatchSweep` streams (UNAVAILABLE: watch again),
//! lets in-flight calls finish, and stops the reaper. [`serve`] is the same with tokens and TLS
//! ([`Security`]); the health service answers without a token. [`serve_with_http`] also serves
//! HTTP/1 listeners ([`HttpListeners`]): `GET /metrics` ([`crate::metrics`]) and the live sweep
//! page ([`crate::web`]), on one listener or two, behind the same user tokens, stopped by the
//! same future.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prunesweep_proto::v1::sweep_service_server::SweepServiceServer;
use prunesweep_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::auth::{Role, Security};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::service::Coordinator;
use crate::store::{now_ms, JobStore};
use crate::web::{self, Routes, Site};

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serve until `shutdown` resolves, without tokens or TLS.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn JobStore>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve(listener, store, config, Security::default(), shutdown).await
}

/// Serve until `shutdown` resolves, checking `security`'s tokens on every call of both services
/// and speaking TLS if it has a certificate.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn JobStore>,
    config: Config,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_with_metrics(listener, None, store, config, security, shutdown).await
}

/// [`serve`], and with `metrics_listener` also `GET /metrics` in the Prometheus text format on
/// that listener until the same `shutdown` (a user token needed when `security` has tokens).
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    store: Arc<dyn JobStore>,
    config: Config,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let http = HttpListeners { metrics: metrics_listener, ..HttpListeners::default() };
    serve_with_http(listener, http, store, config, security, shutdown).await
}

/// The HTTP/1 listeners beside gRPC (`serve --metrics-listen`, `--http`).
#[derive(Debug, Default)]
pub struct HttpListeners {
    /// `GET /metrics` only.
    pub metrics: Option<TcpListener>,
    /// The live sweep page ([`crate::web`]).
    pub page: Option<TcpListener>,
    /// The page's listener also answers `GET /metrics` (`--http` and `--metrics-listen` name
    /// the same address, bound once).
    pub page_with_metrics: bool,
}

/// [`serve`], with the HTTP listeners of `http` until the same `shutdown`: every one of them
/// needs a user token when `security` has tokens ([`crate::web::access`]).
pub async fn serve_with_http(
    listener: TcpListener,
    http: HttpListeners,
    store: Arc<dyn JobStore>,
    config: Config,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let wake = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let reaper = tokio::spawn(reap(
        store.clone(),
        config.startup_grace,
        config.reap_interval,
        wake.clone(),
        stop_rx.clone(),
        metrics.clone(),
    ));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "coordinator listening");
    }
    let lease_ttl = config.lease_ttl;
    let coordinator = Coordinator::new(store.clone(), config, wake, stop_rx.clone(), metrics.clone());
    let site = |routes| {
        Site::new(coordinator.clone(), store.clone(), metrics.clone(), security.tokens.clone(), routes, lease_ttl)
    };
    let mut http_servers = Vec::new();
    if let Some(l) = http.metrics {
        let site = site(Routes { metrics: true, page: false });
        http_servers.push(tokio::spawn(web::serve(l, site, stop_rx.clone())));
    }
    if let Some(l) = http.page {
        let site = site(Routes { metrics: http.page_with_metrics, page: true });
        http_servers.push(tokio::spawn(web::serve(l, site, stop_rx.clone())));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SweepServiceServer<Coordinator>>().await;
    health.set_serving::<WorkerServiceServer<Coordinator>>().await;
    let tokens = security.tokens;
    let mut builder = tonic::transport::Server::builder()
        // A peer that vanishes (power loss, dropped route) is noticed and its connection closed.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls)?;
    }
    let incoming = TcpIncoming::from(listener)
        // No Nagle delay on replies: a small response held back for the peer's delayed ACK costs
        // a worker ~40 ms per call (tonic sets this only on listeners it binds itself).
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let result = builder
        .add_service(health_service)
        .add_service(InterceptedService::new(coordinator.sweep_service(), tokens.interceptor(Role::User)))
        .add_service(InterceptedService::new(coordinator.worker_service(), tokens.interceptor(Role::Worker)))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            health.set_not_serving::<SweepServiceServer<Coordinator>>().await;
            health.set_not_serving::<WorkerServiceServer<Coordinator>>().await;
            // Streams that would never end on their own (WatchSweep) end now; unary calls finish.
            let _ = stop_tx.send(true);
            tracing::info!("shutting down: finishing in-flight calls");
        })
        .await;
    // (Both also stop when the shutdown future, holding `stop_tx`, is dropped unfinished.)
    let _ = reaper.await;
    for server in http_servers {
        let _ = server.await;
    }
    tracing::info!("coordinator stopped");
    Ok(result?)
}

/// After `grace`, return expired leases to the queue every `interval` until `stop` turns true
/// (or its sender, the server, is gone), counting them in `metrics`.
async fn reap(
    store: Arc<dyn JobStore>,
    grace: Duration,
    interval: Duration,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    tokio::select! {
        _ = tokio::time::sleep(grace) => {}
        _ = stop.changed() => return,
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match metrics.time_store("reclaim", store.reclaim_expired(now_ms())).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.reclaimed(n);
                tracing::warn!(jobs = n, "reclaimed expired leases");
                wake.notify_waiters();
            }
            Err(e) => tracing::error!("reaper: {e}"),
        }
    }
}

//! The live sweep page and the HTTP listener it shares with `GET /metrics`.
//!
//! `coordinator serve --http ADDR` serves, as server-rendered HTML with a little vanilla JS that
//! polls the JSON endpoints every 2 s (no JS build step):
//!
//! | path | what |
//! | --- | --- |
//! | `/` | every sweep: progress, done/total, failures, ETA; the workers |
//! | `/sweeps/NAME` | one sweep: its jobs (state, worker, phase, progress, attempts, last error), the accuracy-versus-depth charts of `coordinator plot`, a distance heatmap per scored model, the workers |
//! | `/api/sweeps` | `/`'s data as JSON ([`view::Overview`]) |
//! | `/api/sweeps/NAME?known=KEY` | `/sweeps/NAME`'s data as JSON ([`view::SweepDetail`]); the SVG figures are left out when `KEY` is still their `results_key` |
//! | `/static/page.js`, `/static/page.css` | the page's script and style (no token needed) |
//! | `/metrics` | the Prometheus text format, on the listener that serves metrics |
//!
//! When the coordinator has tokens, everything but `/static/` needs a **user** token ([`access`]):
//! an `Authorization: Bearer TOKEN` header (scripts, Prometheus' `authorization` setting), or,
//! from a browser, `?token=TOKEN` once on any page: the reply stores it in an HttpOnly,
//! SameSite=Strict cookie and redirects to the same page without it. Without tokens the page is
//! open (bind it to loopback, as `serve` requires for gRPC without tokens).
//!
//! Every string from outside (sweep, model and worker names, errors) is HTML-escaped by
//! [`html`] on the server and set as text (never as HTML) by the script; the figures are SVG from
//! plotters, which XML-escapes its text.
//!
//! The listener is a minimal HTTP/1.1 server (hyper), at most 64 connections, stopped with the
//! gRPC server (open requests get 5 s to finish).

pub mod access;
pub mod html;
pub mod view;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Tokens;
use crate::metrics::Metrics;
use crate::service::Coordinator;
use crate::store::JobStore;
use access::Access;

/// The most open connections to one listener; more are closed at once.
const CONNECTIONS_MAX: usize = 64;
/// The page's script.
const PAGE_JS: &str = include_str!("page.js");
/// The page's style.
const PAGE_CSS: &str = include_str!("page.css");

/// What one HTTP listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    /// `GET /metrics`.
    pub metrics: bool,
    /// The sweep page, its JSON and its static files.
    pub page: bool,
}

/// Everything a listener needs to answer: the services (read in process, through the same
/// `SweepService` calls a client makes), the store (distance tables), the metrics (per-worker
/// tokens/s) and the tokens.
#[derive(Clone)]
pub struct Site {
    inner: Arc<SiteInner>,
}

struct SiteInner {
    coordinator: Coordinator,
    store: Arc<dyn JobStore>,
    metrics: Arc<Metrics>,
    tokens: Tokens,
    routes: Routes,
    /// Lease length: a worker not seen for two is shown as gone.
    lease_ttl: Duration,
    /// Per sweep: the job counts its ETA basis was computed at, and the basis ([`view::EtaBasis`]),
    /// so `/` reads a sweep's results only when a job finished.
    eta: Mutex<HashMap<String, ([u32; 6], view::EtaBasis)>>,
}

impl Site {
    /// A site answering `routes` from these services.
    pub fn new(
        coordinator: Coordinator,
        store: Arc<dyn JobStore>,
        metrics: Arc<Metrics>,
        tokens: Tokens,
        routes: Routes,
        lease_ttl: Duration,
    ) -> Self {
        let eta = Mutex::default();
        Self { inner: Arc::new(SiteInner { coordinator, store, metrics, tokens, routes, lease_ttl, eta }) }
    }
}

/// Serves `site` on `listener` until `stop` turns true (or its sender is gone), then lets open
/// requests finish (at most 5 s).
pub async fn serve(listener: TcpListener, site: Site, mut stop: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        let what = match (site.inner.routes.page, site.inner.routes.metrics) {
            (true, true) => "the sweep page at / and GET /metrics",
            (true, false) => "the sweep page at /",
            _ => "GET /metrics",
        };
        tracing::info!(%addr, "HTTP listening: {what}");
    }
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // (The guard `wait_for` returns is not `Send`: dropped inside.)
            _ = async { drop(stop.wait_for(|s| *s).await) } => break,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                tracing::warn!("HTTP listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= CONNECTIONS_MAX {
            continue; // dropped: closed
        }
        let site = site.clone();
        let mut stop = stop.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let site = site.clone();
                async move { Ok::<_, Infallible>(respond(&site, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
    tracing::info!("HTTP listener stopped");
}

/// A reply with `body` as `content_type`, never cached, never sniffed.
pub(crate) fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    response
}

/// A plain-text reply.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let body: String = body.into();
    reply(status, "text/plain; charset=utf-8", body)
}

/// An HTML page: scripts only from this origin, no framing, no referrer.
fn page(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = reply(status, "text/html; charset=utf-8", body);
    let headers = response.headers_mut();
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding JSON: {e}\n")),
    }
}

/// What a path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Overview,
    Sweep(String),
    ApiOverview,
    ApiSweep(String),
    Script,
    Style,
    Metrics,
}

/// Why a path has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoRoute {
    NotFound,
    BadName(String),
}

fn route(path: &str, routes: Routes) -> Result<Route, NoRoute> {
    if path == "/metrics" && routes.metrics {
        return Ok(Route::Metrics);
    }
    if !routes.page {
        return Err(NoRoute::NotFound);
    }
    let name = |rest: &str| -> Result<String, NoRoute> {
        let name = access::percent_decode(rest).ok_or_else(|| {
            NoRoute::BadName(format!("the sweep name in the path is not valid percent-encoded UTF-8: {rest:?}"))
        })?;
        if name.is_empty() || name.contains('/') {
            return Err(NoRoute::BadName(format!("not a sweep name: {name:?}")));
        }
        Ok(name)
    };
    match path {
        "/" => Ok(Route::Overview),
        "/api/sweeps" | "/api/sweeps/" => Ok(Route::ApiOverview),
        "/static/page.js" => Ok(Route::Script),
        "/static/page.css" => Ok(Route::Style),
        _ => {
            if let Some(rest) = path.strip_prefix("/api/sweeps/") {
                Ok(Route::ApiSweep(name(rest)?))
            } else if let Some(rest) = path.strip_prefix("/sweeps/") {
                Ok(Route::Sweep(name(rest)?))
            } else {
                Err(NoRoute::NotFound)
            }
        }
    }
}

async fn respond(site: &Site, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let routes = site.inner.routes;
    let path = request.uri().path().to_string();
    let query = access::query_pairs(request.uri().query().unwrap_or(""));
    let route = match route(&path, routes) {
        Ok(route) => route,
        Err(NoRoute::BadName(why)) => return text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        Err(NoRoute::NotFound) if routes.page => {
            return page(StatusCode::NOT_FOUND, html::message_page("Not found", &format!("Nothing at {path}."), true))
        }
        Err(NoRoute::NotFound) => return text(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n"),
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match route {
        Route::Script => return reply(StatusCode::OK, "text/javascript; charset=utf-8", PAGE_JS),
        Route::Style => return reply(StatusCode::OK, "text/css; charset=utf-8", PAGE_CSS),
        _ => {}
    }
    let html_route = matches!(route, Route::Overview | Route::Sweep(_));
    match access::check(&site.inner.tokens, request.headers(), &query) {
        Access::Granted => {}
        Access::Login { cookie } => return access::login_redirect(&path, &query, &cookie),
        Access::Refused { status, why } if html_route => {
            let mut response = page(status, html::login_page(&why));
            access::challenge(&mut response);
            return response;
        }
        Access::Refused { status, why } => {
            let mut response = text(status, format!("{why}\n"));
            access::challenge(&mut response);
            return response;
        }
    }
    let known = query.iter().find(|(k, _)| k == "known").map(|(_, v)| v.as_str());
    match route {
        Route::Metrics => crate::metrics::respond(&site.inner.coordinator).await,
        Route::Overview => match overview(site).await {
            Ok(o) => page(StatusCode::OK, html::overview_page(&o)),
            Err(e) => page(e.status(), html::message_page("Unavailable", &e.to_string(), true)),
        },
        Route::ApiOverview => match overview(site).await {
            Ok(o) => json(&o),
            Err(e) => text(e.status(), format!("{e}\n")),
        },
        Route::Sweep(name) => match detail(site, &name, None).await {
            Ok(d) => page(StatusCode::OK, html::sweep_page(&d)),
            Err(e) => page(e.status(), html::message_page(e.title(), &e.to_string(), true)),
        },
        Route::ApiSweep(name) => match detail(site, &name, known).await {
            Ok(d) => json(&d),
            Err(e) => text(e.status(), format!("{e}\n")),
        },
        Route::Script | Route::Style => unreachable!("answered above"),
    }
}

async fn overview(site: &Site) -> Result<view::Overview, view::ViewError> {
    let s = &site.inner;
    let rates = s.metrics.rates();
    let mut cache = s.eta.lock().expect("never poisoned").clone();
    let overview = view::overview(&s.coordinator, &*s.store, &rates, s.lease_ttl, &mut cache).await?;
    if cache.len() > 4096 {
        cache.clear(); // (sweeps deleted from the store, or a very long-lived coordinator)
    }
    *s.eta.lock().expect("never poisoned") = cache;
    Ok(overview)
}

async fn detail(site: &Site, name: &str, known: Option<&str>) -> Result<view::SweepDetail, view::ViewError> {
    let s = &site.inner;
    view::sweep_detail(&s.coordinator, &*s.store, &s.metrics.rates(), s.lease_ttl, name, known).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: Routes = Routes { metrics: false, page: true };
    const BOTH: Routes = Routes { metrics: true, page: true };
    const METRICS: Routes = Routes { metrics: true, page: false };

    #[test]
    fn routes() {
        assert_eq!(route("/", PAGE), Ok(Route::Overview));
        assert_eq!(route("/sweeps/tiny", PAGE), Ok(Route::Sweep("tiny".into())));
        assert_eq!(route("/sweeps/a%20b%2Fc", PAGE), Err(NoRoute::BadName("not a sweep name: \"a b/c\"".into())));
        assert_eq!(route("/sweeps/a%20b", PAGE), Ok(Route::Sweep("a b".into())));
        assert_eq!(route("/api/sweeps/x%C3%A9", PAGE), Ok(Route::ApiSweep("xé".into())));
        assert!(matches!(route("/sweeps/%ZZ", PAGE), Err(NoRoute::BadName(_))));
        assert!(matches!(route("/sweeps/%FF", PAGE), Err(NoRoute::BadName(_))));
        assert_eq!(route("/sweeps/", PAGE), Err(NoRoute::BadName("not a sweep name: \"\"".into())));
        assert_eq!(route("/metrics", PAGE), Err(NoRoute::NotFound), "metrics only where asked");
        assert_eq!(route("/metrics", BOTH), Ok(Route::Metrics));
        assert_eq!(route("/", METRICS), Err(NoRoute::NotFound), "the page only where asked");
        assert_eq!(route("/etc/passwd", PAGE), Err(NoRoute::NotFound));
    }

    #[test]
    fn assets_are_small_and_use_no_html_sinks() {
        assert!(PAGE_JS.lines().count() < 600 && PAGE_CSS.lines().count() < 600);
        // The script sets text, never markup built from data: only the server's SVG figures
        // (plotters, XML-escaped) go through `innerHTML`, in one place.
        assert_eq!(PAGE_JS.matches("innerHTML").count(), 1, "one innerHTML, for the SVG figures");
        assert!(!PAGE_JS.contains("outerHTML") && !PAGE_JS.contains("document.write") && !PAGE_JS.contains("eval("));
    }
}

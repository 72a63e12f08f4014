//! The live sweep page (`serve --http`): a coordinator with user and worker tokens, the page and
//! `/metrics` on one 127.0.0.1:0 listener, and a fake worker driving the tiny sweep over gRPC
//! (register → lease → heartbeat → complete with distances and losses, one failure).
//!
//! - `page_follows_a_sweep_in_chromium` loads the page in Debian's headless `chromium`
//!   (`--dump-dom`, `--screenshot`) while the sweep runs: the sweep, a done count that rises
//!   between two loads, the charts and the heatmap are in the DOM, the polling script ran, and the
//!   page is refused without the token. It skips, saying why, only where no chromium is installed
//!   (`PRUNESWEEP_CHROMIUM` names another binary).
//! - `http_checks_tokens_and_escapes` speaks plain HTTP: tokens (bearer, `?token=` login, cookie,
//!   worker token refused), `/metrics` behind them, hostile names escaped, bad paths and methods.
//! - `the_export_alone_redraws_the_plots_and_the_table`: `coordinator export` (Parquet and CSV,
//!   with `distances.csv`) then, with the coordinator stopped, `coordinator plot --from` draws the
//!   same charts and heatmap as `coordinator plot` did from the live coordinator, and the table.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prunesweep_coordinator::auth::{Security, Tokens};
use prunesweep_coordinator::server::{serve_with_http, HttpListeners};
use prunesweep_coordinator::store::JobStore;
use prunesweep_coordinator::Config;
use prunesweep_proto::client::Bearer;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use common::TestStore;

const USER: &str = "user-token-for-the-page";
const WORKER: &str = "worker-token-for-the-page";
/// A worker name and an error that would be markup if they were not escaped.
const HOSTILE_WORKER: &str = "w1 <img src=x onerror=alert(1)>";
const HOSTILE_ERROR: &str = "CUDA <script>alert('x')</script> & out of memory";

type Sweeps = SweepServiceClient<InterceptedService<Channel, Bearer>>;
type Workers = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// A coordinator with the page and `/metrics` on one listener.
struct Server {
    grpc: String,
    http: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(store: Arc<dyn JobStore>, tokens: Tokens) -> Server {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), page.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    // Long leases: a job stays leased (and on the page) while chromium loads it.
    let config = Config { max_wait: Duration::from_secs(1), ..Config::for_lease_ttl(Duration::from_secs(60)) };
    let http = HttpListeners { metrics: None, page: Some(page), page_with_metrics: true };
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        serve_with_http(grpc, http, store, config, Security { tokens, tls: None }, shutdown).await.expect("server");
    });
    Server { grpc: format!("http://{grpc_addr}"), http: http_addr.to_string(), stop, task }
}

impl Server {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    async fn clients(&self) -> (Sweeps, Workers) {
        let channel = tonic::transport::Endpoint::from_shared(self.grpc.clone()).unwrap().connect().await.unwrap();
        let sweeps = SweepServiceClient::with_interceptor(channel.clone(), Bearer::new(Some(USER)).unwrap());
        let workers = WorkerServiceClient::with_interceptor(channel, Bearer::new(Some(WORKER)).unwrap());
        (sweeps, workers)
    }
}

fn tokens() -> Tokens {
    Tokens::new(&[USER], &[WORKER])
}

/// The fake worker: one registration, then jobs one by one.
struct FakeWorker {
    client: Workers,
    id: String,
}

impl FakeWorker {
    async fn register(mut client: Workers, name: &str) -> Self {
        let req = pb::RegisterRequest {
            name: name.into(),
            device: "cpu".into(),
            memory_bytes: Some(16 << 30),
            version: "test".into(),
        };
        let id = client.register(req).await.unwrap().into_inner().worker_id;
        FakeWorker { client, id }
    }

    async fn lease(&mut self) -> pb::Lease {
        let req = pb::LeaseJobRequest {
            worker_id: self.id.clone(),
            held_models: vec![],
            wait_ms: 1000,
            free_memory_bytes: Some(12 << 30),
            report_unfinished: false,
        };
        self.client.lease_job(req).await.unwrap().into_inner().lease.expect("a runnable job")
    }

    async fn heartbeat(&mut self, lease: &pb::Lease, phase: &str, progress: f64, rate: f64) {
        let req = pb::HeartbeatRequest {
            worker_id: self.id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id: lease.job.as_ref().unwrap().job_id,
            phase: Some(phase.into()),
            progress: Some(progress),
            tokens_per_second: Some(rate),
        };
        let reply = self.client.heartbeat(req).await.unwrap().into_inner();
        assert_eq!(reply.action(), pb::HeartbeatAction::Continue);
    }

    /// Completes `lease` as the real worker would on the tiny 4-layer model: the angular distance
    /// table for the score job, the c4 loss (and loss / ln V) for the others, with timings.
    async fn complete(&mut self, lease: &pb::Lease) {
        let job = lease.job.as_ref().unwrap();
        let layers = 4u32;
        let mut req = pb::CompleteJobRequest {
            worker_id: self.id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id: job.job_id,
            num_layers: Some(layers),
            ..Default::default()
        };
        match job.kind() {
            pb::JobKind::Score => {
                req.distances = (1..=layers)
                    .flat_map(|n| (0..=layers - n).map(move |l| (n, l)))
                    .map(|(n, l)| pb::Distance {
                        metric: pb::DistanceMetric::Angular as i32,
                        n,
                        l,
                        // Deeper blocks are more alike, as in the paper.
                        value: 0.08 * f64::from(n) + 0.3 / f64::from(l + 2),
                    })
                    .collect();
                req.timings = vec![pb::PhaseTiming { phase: "score".into(), seconds: 2.0, peak_host_bytes: None }];
            }
            kind => {
                let dropped = match job.amount {
                    Some(pb::job_spec::Amount::Fraction(f)) => (f * f64::from(layers)).round() as u32,
                    _ => 0,
                };
                let angular = job.method() == pb::PruneMethod::Angular;
                let loss = 10.2 + 0.6 * f64::from(dropped) + if angular { 0.0 } else { 0.4 };
                let vocab_ln = (32000f64).ln();
                req.layers_dropped = (layers - dropped..layers).collect();
                req.results = vec![
                    pb::ResultRow { task: "c4-loss".into(), metric: "loss".into(), value: loss },
                    pb::ResultRow { task: "c4-loss".into(), metric: "normalized_loss".into(), value: loss / vocab_ln },
                ];
                let phases: &[(&str, f64)] =
                    if kind == pb::JobKind::Baseline { &[("eval", 1.5)] } else { &[("prune", 0.2), ("eval", 1.2)] };
                req.timings = phases
                    .iter()
                    .map(|(p, s)| pb::PhaseTiming { phase: (*p).into(), seconds: *s, peak_host_bytes: None })
                    .collect();
            }
        }
        self.client.complete_job(req).await.unwrap();
    }

    async fn fail(&mut self, lease: &pb::Lease, message: &str) {
        let req = pb::FailJobRequest {
            worker_id: self.id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id: lease.job.as_ref().unwrap().job_id,
            message: message.into(),
            error_kind: "oom".into(),
            retryable: false,
        };
        self.client.fail_job(req).await.unwrap();
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The chromium binary: `$PRUNESWEEP_CHROMIUM`, else `chromium` or `chromium-browser` on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("PRUNESWEEP_CHROMIUM") {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| [dir.join("chromium"), dir.join("chromium-browser")])
        .find(|p| p.is_file())
}

/// Runs headless chromium on `url` with `args` (a fresh profile each time, so no cookie is left
/// from an earlier load) and returns its stdout; fails the test after 90 s.
async fn chromium_run(bin: &Path, url: &str, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new(bin);
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let pid = child.id();
    let out =
        tokio::time::timeout(Duration::from_secs(90), tokio::task::spawn_blocking(move || child.wait_with_output()))
            .await
            .unwrap_or_else(|_| {
                let _ = Command::new("kill").arg(pid.to_string()).status();
                panic!("chromium on {url} took over 90 s")
            })
            .unwrap()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "chromium on {url}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The page's DOM after its script ran for a few seconds of virtual time (one poll or more).
async fn dump_dom(bin: &Path, url: &str) -> String {
    chromium_run(bin, url, &["--virtual-time-budget=5000".into(), "--dump-dom".into()]).await
}

/// The number in `data-done="N"` of the first element that has one.
fn done_count(dom: &str) -> u32 {
    let at = dom.find("data-done=\"").unwrap_or_else(|| panic!("no done count in the page:\n{dom}"));
    let rest = &dom[at + "data-done=\"".len()..];
    rest[..rest.find('"').unwrap()].parse().unwrap()
}

/// The number in `data-polls="N"`: how many times the script updated the page.
fn polls(dom: &str) -> u32 {
    dom.find("data-polls=\"").map_or(0, |at| {
        let rest = &dom[at + "data-polls=\"".len()..];
        rest[..rest.find('"').unwrap()].parse().unwrap()
    })
}

/// The part of the page from the element with id `id` to the next one with an id among `ids`
/// that follow it in the page (`#charts`, `#heatmaps`, `#jobs`, `#workers`), or to its end.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[start + id.len()..];
    let end = ["charts", "heatmaps", "jobs", "workers"]
        .iter()
        .filter_map(|next| rest.find(&format!("id=\"{next}\"")))
        .min()
        .unwrap_or(rest.len());
    &dom[start..start + id.len() + end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_follows_a_sweep_in_chromium() {
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED: no chromium on PATH (Debian: apt-get install chromium; or set PRUNESWEEP_CHROMIUM)");
        return;
    };
    let version = Command::new(&bin).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    eprintln!("using {} ({})", bin.display(), version.unwrap_or_default().trim());
    let store = common::sqlite().await;
    let server = start(store.store.clone(), tokens()).await;
    let (mut sweeps, workers) = server.clients().await;
    let submit = pb::SubmitSweepRequest { yaml: common::TINY.into(), file_name: Some("tiny.yaml".into()) };
    sweeps.submit_sweep(submit).await.unwrap();
    let mut w = FakeWorker::register(workers, HOSTILE_WORKER).await;

    // The score job and the baseline finish; a cell is in its eval phase.
    let score = w.lease().await;
    assert_eq!(score.job.as_ref().unwrap().kind(), pb::JobKind::Score);
    w.heartbeat(&score, "score", 0.4, 1500.0).await;
    w.complete(&score).await;
    let baseline = w.lease().await;
    w.complete(&baseline).await;
    let cell = w.lease().await;
    w.heartbeat(&cell, "eval", 0.5, 812.0).await;

    let page = format!("http://{}/sweeps/tiny?token={USER}", server.http);
    let first = dump_dom(&bin, &page).await;
    assert!(first.contains("<h1 id=\"sweep-name\">tiny</h1>"), "the sweep is named:\n{first}");
    let done_first = done_count(&first);
    assert_eq!(done_first, 2, "score and baseline done");
    assert!(polls(&first) >= 1, "the script polled and redrew the page:\n{first}");
    let jobs = section(&first, "jobs");
    assert!(jobs.contains(">leased<") && jobs.contains(">eval<") && jobs.contains("50%") && jobs.contains(">812<"));
    assert!(jobs.contains("w1 &lt;img src=x onerror=alert(1)&gt;"), "the worker's name is text:\n{jobs}");
    assert!(!first.contains("<img"), "no element made from the worker's name");
    let heatmaps = section(&first, "heatmaps");
    assert!(heatmaps.contains("<svg") && heatmaps.contains("tiny-llama: angular distance d(l, n)"), "{heatmaps}");
    assert!(section(&first, "charts").contains("<svg"), "the c4-loss chart (baseline only so far)");
    assert!(section(&first, "workers").contains(">live<"));

    // Two more cells finish (one of them the running one), and one fails: the count rises.
    w.complete(&cell).await;
    let next = w.lease().await;
    w.complete(&next).await;
    let failing = w.lease().await;
    w.fail(&failing, HOSTILE_ERROR).await;
    let second = dump_dom(&bin, &page).await;
    let done_second = done_count(&second);
    assert!(done_second > done_first, "done rose: {done_first} → {done_second}");
    assert_eq!(done_second, 5);
    let charts = section(&second, "charts");
    assert!(charts.contains("<svg") && charts.contains("tiny: c4-loss (normalized_loss)"), "{charts}");
    assert!(charts.contains("tiny-llama · angular · none") || charts.contains("tiny-llama · deepest · none"));
    let jobs = section(&second, "jobs");
    assert!(jobs.contains("[oom] CUDA &lt;script&gt;alert('x')&lt;/script&gt; &amp; out of memory"), "{jobs}");
    assert_eq!(second.matches("<script").count(), 1, "only the page's own script element");

    // `/` lists the sweep with the same count; a screenshot of the sweep page is a real PNG.
    let overview = dump_dom(&bin, &format!("http://{}/?token={USER}", server.http)).await;
    assert!(overview.contains("href=\"/sweeps/tiny\"") && done_count(&overview) == 5, "{overview}");
    let shots = tempfile::tempdir().unwrap();
    let shot = std::env::var_os("PRUNESWEEP_WEB_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| shots.path().join("sweep.png"));
    let args = [
        "--virtual-time-budget=5000".to_string(),
        format!("--screenshot={}", shot.display()),
        "--window-size=1280,900".into(),
    ];
    chromium_run(&bin, &page, &args).await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000, "a PNG of the page: {} bytes", png.len());

    // Without the token, or with a worker's, the page is refused and shows no sweep.
    let refused = dump_dom(&bin, &format!("http://{}/sweeps/tiny", server.http)).await;
    assert!(refused.contains("Token needed") && refused.contains("needs a user token"), "{refused}");
    assert!(!refused.contains("data-done") && !refused.contains("tiny-llama"));
    let worker = dump_dom(&bin, &format!("http://{}/sweeps/tiny?token={WORKER}", server.http)).await;
    assert!(worker.contains("a worker token cannot read the page") && !worker.contains("data-done"), "{worker}");

    let http_addr = server.http.clone();
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(&http_addr).await.is_err(), "the page's listener closed with the server");
    store.cleanup().await;
}

async fn http_checks_tokens_and_escapes(store: &TestStore) {
    let server = start(store.store.clone(), tokens()).await;
    let (mut sweeps, workers) = server.clients().await;
    let yaml = common::TINY.replace("name: tiny-llama", "name: \"<b>m</b>&\"");
    sweeps.submit_sweep(pb::SubmitSweepRequest { yaml, file_name: Some("tiny.yaml".into()) }).await.unwrap();
    let mut w = FakeWorker::register(workers, HOSTILE_WORKER).await;
    let score = w.lease().await;
    w.complete(&score).await;
    let baseline = w.lease().await;
    w.fail(&baseline, HOSTILE_ERROR).await;
    let addr = server.http.as_str();
    let user = bearer(USER);

    // Tokens: none → 401 with a challenge; a worker's → 403; a user's → the JSON.
    let (status, headers, body) = common::http(addr, "GET", "/api/sweeps", &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(headers["www-authenticate"].starts_with("Bearer") && body.contains("?token="));
    let (status, _, body) = common::http(addr, "GET", "/api/sweeps", &[("Authorization", &bearer(WORKER))]).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = common::http(addr, "GET", "/api/sweeps", &[("Authorization", "Bearer wrong")]).await;
    assert_eq!(status, 401, "{body}");
    let (status, headers, body) = common::http(addr, "GET", "/api/sweeps", &[("Authorization", &user)]).await;
    assert_eq!((status, headers["content-type"].as_str()), (200, "application/json"));
    let overview: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tiny = &overview["sweeps"][0];
    assert_eq!(
        (tiny["name"].as_str(), tiny["done"].as_u64(), tiny["total"].as_u64()),
        (Some("tiny"), Some(2), Some(6))
    );
    assert_eq!(tiny["counts"]["failed"].as_u64(), Some(1));
    assert_eq!(overview["workers"][0]["name"].as_str(), Some(HOSTILE_WORKER));

    // The browser login: ?token= sets the cookie and redirects without it; the cookie is enough.
    let (status, headers, _) = common::http(addr, "GET", &format!("/sweeps/tiny?token={USER}"), &[]).await;
    assert_eq!((status, headers["location"].as_str()), (303, "/sweeps/tiny"));
    let cookie = headers["set-cookie"].split(';').next().unwrap().to_string();
    assert!(headers["set-cookie"].contains("HttpOnly") && headers["set-cookie"].contains("SameSite=Strict"));
    let (status, headers, html) = common::http(addr, "GET", "/sweeps/tiny", &[("Cookie", &cookie)]).await;
    assert_eq!(status, 200, "{html}");
    assert!(headers["content-security-policy"].contains("script-src 'self'"));
    assert!(html.contains("&lt;b&gt;m&lt;/b&gt;&amp; · baseline"), "the model name is escaped:\n{html}");
    assert!(html.contains("CUDA &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; out of memory"));
    assert!(html.contains("w1 &lt;img src=x onerror=alert(1)&gt;"));
    assert!(!html.contains("<b>m</b>") && !html.contains("<img") && html.matches("<script").count() == 1);
    assert!(
        html.contains("&lt;b&gt;m&lt;/b&gt;&amp;: angular distance d(l, n)"),
        "the heatmap title, escaped by plotters"
    );

    // The figures travel once per results key.
    let (_, _, body) = common::http(addr, "GET", "/api/sweeps/tiny", &[("Authorization", &user)]).await;
    let detail: serde_json::Value = serde_json::from_str(&body).unwrap();
    let key = detail["results_key"].as_str().unwrap().to_string();
    assert_eq!(detail["heatmaps"].as_array().map(Vec::len), Some(1));
    assert_eq!(detail["jobs"].as_array().unwrap().len(), 6);
    let (_, _, body) =
        common::http(addr, "GET", &format!("/api/sweeps/tiny?known={key}"), &[("Authorization", &user)]).await;
    let again: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(again["charts"].is_null() && again["heatmaps"].is_null() && again["jobs"].is_array());

    // /metrics shares the listener and the tokens.
    let (status, _, _) = common::http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 401);
    let (status, _, text) = common::http(addr, "GET", "/metrics", &[("Authorization", &user)]).await;
    assert_eq!(status, 200);
    let succeeded = text.lines().find(|l| {
        l.starts_with("prunesweep_jobs{") && l.contains("sweep=\"tiny\"") && l.contains("state=\"succeeded\"")
    });
    assert_eq!(succeeded.and_then(|l| l.rsplit(' ').next()), Some("1"), "{text}");

    // Bad input: unknown sweep, broken escapes, other methods, unknown paths; assets are open.
    let (status, _, body) = common::http(addr, "GET", "/sweeps/nope", &[("Authorization", &user)]).await;
    assert!(status == 404 && body.contains("no sweep named"), "{status} {body}");
    let (status, _, body) = common::http(addr, "GET", "/api/sweeps/nope", &[("Authorization", &user)]).await;
    assert!(status == 404 && body.contains("no sweep named \"nope\""), "{status} {body}");
    let (status, _, body) = common::http(addr, "GET", "/sweeps/%ZZ", &[("Authorization", &user)]).await;
    assert!(status == 400 && body.contains("percent-encoded"), "{status} {body}");
    let (status, headers, _) =
        common::http(addr, "POST", "/", &[("Authorization", &user), ("Content-Length", "0")]).await;
    assert_eq!((status, headers["allow"].as_str()), (405, "GET, HEAD"));
    let (status, _, _) = common::http(addr, "GET", "/nothing/here", &[("Authorization", &user)]).await;
    assert_eq!(status, 404);
    let (status, headers, js) = common::http(addr, "GET", "/static/page.js", &[]).await;
    assert!(status == 200 && headers["content-type"].starts_with("text/javascript") && js.contains("setTimeout(poll"));
    server.shutdown().await;

    // Without tokens the page is open.
    let open = start(store.store.clone(), Tokens::none()).await;
    let (status, _, html) = common::http(&open.http, "GET", "/", &[]).await;
    assert!(status == 200 && html.contains("href=\"/sweeps/tiny\""), "{status} {html}");
    open.shutdown().await;
}

both_backends!(http_checks_tokens_and_escapes);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_alone_redraws_the_plots_and_the_table() {
    let store = common::sqlite().await;
    let server = start(store.store.clone(), tokens()).await;
    let (mut sweeps, workers) = server.clients().await;
    let submit = pb::SubmitSweepRequest { yaml: common::TINY.into(), file_name: Some("tiny.yaml".into()) };
    sweeps.submit_sweep(submit).await.unwrap();
    let mut w = FakeWorker::register(workers, "w").await;
    // Score, baseline and the four cells.
    for _ in 0..6 {
        let lease = w.lease().await;
        w.complete(&lease).await;
    }
    let grpc = server.grpc.clone();
    let coordinator = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(args)
            .env("PRUNESWEEP_COORDINATOR", &grpc)
            .env("PRUNESWEEP_TOKEN", USER)
            .output()
            .unwrap();
        assert!(out.status.success(), "coordinator {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let dir = tempfile::tempdir().unwrap();
    let (parquet, csv, live) = (dir.path().join("parquet"), dir.path().join("csv"), dir.path().join("live"));
    let file = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    coordinator(&["export", "tiny", "--format", "parquet", "--out", parquet.join("results.parquet").to_str().unwrap()]);
    coordinator(&["export", "tiny", "--format", "csv", "--out", csv.join("results.csv").to_str().unwrap()]);
    coordinator(&["plot", "tiny", "--out", live.to_str().unwrap()]);
    let heatmap = "heatmap-tiny-llama.svg";
    assert!(
        file(&parquet, "distances.csv").starts_with("sweep,job_id,model,metric,n,l,value\n"),
        "the score table beside it"
    );
    // With the coordinator gone, both exports redraw what it drew.
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(grpc.trim_start_matches("http://")).await.is_err());
    for export in [&parquet, &csv] {
        coordinator(&["plot", "--from", export.to_str().unwrap()]);
        let plots = export.join("plots");
        assert_eq!(file(&plots, "c4-loss.svg"), file(&live, "c4-loss.svg"), "{}", export.display());
        assert_eq!(file(&plots, heatmap), file(&live, heatmap), "{}", export.display());
        assert!(plots.join("c4-loss.png").is_file() && plots.join("heatmap-tiny-llama.png").is_file());
    }
    let table = file(&parquet, "results.md");
    assert_eq!(table, file(&csv, "results.md"), "CSV and Parquet read back the same");
    assert_eq!(table.lines().count(), 2 + 5, "header, rule, baseline and four cells:\n{table}");
    assert!(table.contains("| tiny-llama | unpruned | – | 0 | – |"), "{table}");
    assert!(table.contains("| tiny-llama | deepest | none | 2 (50%) | 2–3 |"), "{table}");
    store.cleanup().await;
}

//! `GET /metrics`: a coordinator with its metrics listener on 127.0.0.1:0, a fake worker through
//! register → lease → heartbeat → complete (and a failure, an odd failure kind, an expired lease),
//! then a scrape over plain HTTP, parsed by the small text-format parser below, and checked by
//! `promtool check metrics` when `promtool` is on PATH. On SQLite and on Postgres.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;

use common::TestStore;

/// A worker name that needs escaping in a label value.
const ODD_NAME: &str = "w1 \"quoted\" \\ back\nslash";

/// A parsed exposition: samples by name, each with its labels; types and help by family.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    types: HashMap<String, String>,
    help: HashMap<String, String>,
}

impl Exposition {
    /// The value of the one sample `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "one sample {name}{labels:?}, found {found:?}");
        found[0].2
    }

    /// Every sample `name`.
    fn all(&self, name: &str) -> Vec<&(String, BTreeMap<String, String>, f64)> {
        self.samples.iter().filter(|(n, _, _)| n == name).collect()
    }
}

/// Parses the Prometheus text format (0.0.4): `# HELP`/`# TYPE` lines, and samples
/// `name{label="value",...} value` with `\\`, `\"` and `\n` escapes in label values. Panics on
/// anything else.
fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.help.insert(name.to_string(), help.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            out.types.insert(name.to_string(), kind.to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            name.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())),
            "bad metric name in {line:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            loop {
                let (start, c) = chars.next().expect("label or }");
                if c == '}' {
                    rest = &after[start + 1..];
                    break;
                }
                if c == ',' {
                    continue;
                }
                let eq = after[start..].find('=').expect("label=") + start;
                let key = after[start..eq].to_string();
                while chars.peek().map(|(i, _)| *i <= eq) == Some(true) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "label value quoted in {line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().expect("closing quote").1 {
                        '"' => break,
                        '\\' => match chars.next().expect("escape").1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("bad escape \\{other} in {line:?}"),
                        },
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(key, value).is_none(), "duplicate label in {line:?}");
            }
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(fields.next().map(|t| t.parse::<i64>().is_ok()).unwrap_or(true), "bad timestamp in {line:?}");
        out.samples.push((name.to_string(), labels, value));
    }
    // Every sample belongs to a typed, documented family (histograms: _bucket, _sum, _count).
    for (name, _, _) in &out.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| out.types.get(*f).map(String::as_str) == Some("histogram")))
            .unwrap_or(name);
        assert!(out.types.contains_key(family), "{name}: no # TYPE");
        assert!(out.help.contains_key(family), "{name}: no # HELP");
    }
    out
}

/// Scrapes `/metrics` and checks the reply's status and content type.
async fn scrape(addr: &str) -> (String, Exposition) {
    let (status, headers, body) = common::http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get("content-type").map(String::as_str), Some("text/plain; version=0.0.4"));
    let parsed = parse(&body);
    (body, parsed)
}

async fn lease(w: &mut WorkerServiceClient<tonic::transport::Channel>, id: &str) -> pb::Lease {
    let req = pb::LeaseJobRequest {
        worker_id: id.into(),
        held_models: vec![],
        wait_ms: 2_000,
        free_memory_bytes: Some(3 << 30),
        report_unfinished: false,
    };
    w.lease_job(req).await.unwrap().into_inner().lease.expect("a job to lease")
}

async fn fail(
    w: &mut WorkerServiceClient<tonic::transport::Channel>,
    id: &str,
    lease: &pb::Lease,
    kind: &str,
    retryable: bool,
) {
    let req = pb::FailJobRequest {
        worker_id: id.into(),
        lease_id: lease.lease_id.clone(),
        job_id: lease.job.as_ref().unwrap().job_id,
        message: "test".into(),
        error_kind: kind.into(),
        retryable,
    };
    w.fail_job(req).await.unwrap();
}

/// `promtool check metrics` on `text`, when promtool is installed (Debian's `prometheus`).
fn promtool(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("note: promtool not run ({e}): install Debian's `prometheus` package to check the text with it");
            return;
        }
    };
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics failed:\n{report}\n--- on:\n{text}");
    eprintln!(
        "promtool check metrics: ok{}",
        if report.trim().is_empty() { String::new() } else { format!(": {report}") }
    );
}

async fn scrape_after_a_worker_ran(store: &TestStore) {
    let (url, metrics, server) = common::start_server_with_metrics(store.store.clone(), common::fast_config()).await;

    // Before anything: the counters are there at zero; elsewhere is 404, POST is 405.
    let (_, before) = scrape(&metrics).await;
    for counter in ["prunesweep_leases_total", "prunesweep_completions_total", "prunesweep_reclaims_total"] {
        assert_eq!(before.get(counter, &[]), 0.0, "{counter}");
        assert_eq!(before.types[counter], "counter");
    }
    assert_eq!(before.get("prunesweep_workers", &[]), 0.0);
    assert_eq!(common::http(&metrics, "GET", "/", &[]).await.0, 404);
    assert_eq!(common::http(&metrics, "GET", "/metricsx", &[]).await.0, 404);
    assert_eq!(common::http(&metrics, "POST", "/metrics", &[]).await.0, 405);

    let mut sweeps = SweepServiceClient::connect(url.clone()).await.unwrap();
    let mut w = WorkerServiceClient::connect(url.clone()).await.unwrap();
    let register = pb::RegisterRequest {
        name: ODD_NAME.into(),
        device: "cpu".into(),
        memory_bytes: Some(1 << 30),
        version: "test".into(),
    };
    let id = w.register(register).await.unwrap().into_inner().worker_id;

    // An empty long poll first: 1 s parked waiting, which `prunesweep_lease_seconds` leaves out.
    let poll = pb::LeaseJobRequest { worker_id: id.clone(), wait_ms: 1_000, ..Default::default() };
    let t0 = std::time::Instant::now();
    assert!(w.lease_job(poll).await.unwrap().into_inner().lease.is_none());
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let submit = pb::SubmitSweepRequest { yaml: common::TINY.into(), file_name: Some("tiny.yaml".into()) };
    sweeps.submit_sweep(submit).await.unwrap();

    // 1: lease → heartbeat → complete.
    let first = lease(&mut w, &id).await;
    let first_kind = pb::JobKind::try_from(first.job.as_ref().unwrap().kind).unwrap();
    assert_eq!(first_kind, pb::JobKind::Score, "the score job comes first");
    let hb = pb::HeartbeatRequest {
        tokens_per_second: Some(1234.5),
        worker_id: id.clone(),
        lease_id: first.lease_id.clone(),
        job_id: first.job.as_ref().unwrap().job_id,
        phase: Some("eval".into()),
        progress: Some(0.5),
    };
    assert_eq!(w.heartbeat(hb).await.unwrap().into_inner().action(), pb::HeartbeatAction::Continue);
    let complete = pb::CompleteJobRequest {
        worker_id: id.clone(),
        lease_id: first.lease_id.clone(),
        job_id: first.job.as_ref().unwrap().job_id,
        num_layers: Some(4),
        distances: (1..4u32)
            .flat_map(|n| (0..=4 - n).map(move |l| (n, l)))
            .map(|(n, l)| pb::Distance { metric: pb::DistanceMetric::Angular as i32, n, l, value: 0.1 })
            .collect(),
        ..Default::default()
    };
    w.complete_job(complete).await.unwrap();

    // 2 and 3: a retryable failure, and one with a kind that is no plain label.
    let second = lease(&mut w, &id).await;
    fail(&mut w, &id, &second, "runtime", true).await;
    let third = lease(&mut w, &id).await;
    fail(&mut w, &id, &third, "Bad \"kind\"\n{x=1}", false).await;

    // 4: a lease left to expire: the reaper takes it back (600 ms leases, reaper every 100 ms).
    let _fourth = lease(&mut w, &id).await;
    let t0 = std::time::Instant::now();
    let (text, m) = loop {
        let (text, m) = scrape(&metrics).await;
        if m.get("prunesweep_reclaims_total", &[]) >= 1.0 {
            break (text, m);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no reclaim within 10 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("--- scrape ---\n{text}");

    assert_eq!(m.get("prunesweep_leases_total", &[]), 4.0);
    assert_eq!(m.get("prunesweep_completions_total", &[]), 1.0);
    assert_eq!(m.get("prunesweep_reclaims_total", &[]), 1.0);
    assert_eq!(m.get("prunesweep_failures_total", &[("kind", "runtime"), ("retryable", "true")]), 1.0);
    assert_eq!(m.get("prunesweep_failures_total", &[("kind", "other"), ("retryable", "false")]), 1.0);
    assert_eq!(m.all("prunesweep_failures_total").len(), 2);

    // Jobs by sweep and state: all six, one succeeded, the state read from the store now.
    let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
    let jobs: f64 = m.all("prunesweep_jobs").iter().map(|(_, _, v)| v).sum();
    assert_eq!(jobs, 6.0);
    assert_eq!(m.all("prunesweep_jobs").len(), 6, "one series per state");
    assert_eq!(m.get("prunesweep_jobs", &[("sweep", "tiny"), ("state", "succeeded")]), 1.0);
    assert_eq!(m.get("prunesweep_jobs", &[("sweep", "tiny"), ("state", "failed")]), f64::from(status.failed));
    assert_eq!(m.types["prunesweep_jobs"], "gauge");

    // Latencies: one LeaseJob observation per call that returned (the empty poll and 4 leases),
    // without the second parked in the poll; the store calls by op (the empty poll tried the
    // store more than once); the completed job's duration under its kind.
    assert_eq!(m.types["prunesweep_lease_seconds"], "histogram");
    assert_eq!(m.get("prunesweep_lease_seconds_count", &[]), 5.0);
    assert_eq!(m.get("prunesweep_lease_seconds_bucket", &[("le", "+Inf")]), 5.0);
    let busy = m.get("prunesweep_lease_seconds_sum", &[]);
    assert!(busy < 0.5, "the long-poll wait is not counted: {busy} s");
    assert!(m.get("prunesweep_store_seconds_count", &[("op", "lease")]) >= 6.0);
    for (op, n) in [("complete", 1.0), ("heartbeat", 1.0), ("fail", 2.0), ("register", 1.0), ("submit", 1.0)] {
        assert_eq!(m.get("prunesweep_store_seconds_count", &[("op", op)]), n, "{op}");
    }
    assert!(m.get("prunesweep_store_seconds_count", &[("op", "reclaim")]) >= 1.0);
    assert!(m.get("prunesweep_store_seconds_count", &[("op", "sweeps")]) >= 2.0, "one per scrape");
    assert_eq!(m.get("prunesweep_job_seconds_count", &[("kind", "score")]), 1.0);
    assert_eq!(m.all("prunesweep_job_seconds_count").len(), 1);

    // The worker: live, its heartbeat age, its free memory; its odd name round-trips the escaping.
    assert_eq!(m.get("prunesweep_workers", &[]), 1.0);
    let age = m.get("prunesweep_worker_heartbeat_age_seconds", &[("worker", &id), ("name", ODD_NAME)]);
    assert!((0.0..30.0).contains(&age), "heartbeat age {age}");
    let free = m.get("prunesweep_worker_free_memory_bytes", &[("worker", &id), ("name", ODD_NAME)]);
    assert_eq!(free, f64::from(3u32 << 30));
    // Its throughput, as its heartbeat reported it, labelled with the phase.
    let rate = m.get("prunesweep_worker_tokens_per_second", &[("worker", &id), ("name", ODD_NAME), ("phase", "eval")]);
    assert_eq!(rate, 1234.5);

    promtool(&text);

    // The metrics listener stops with the server.
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(&metrics).await.is_err(), "metrics listener still open after shutdown");
}

both_backends!(scrape_after_a_worker_ran);

#[test]
fn the_parser_reads_escapes_and_histograms() {
    let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"x\\\"y\\\\z\\nw\",j=\"\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
    let m = parse(text);
    assert_eq!(m.get("a_total", &[("k", "x\"y\\z\nw"), ("j", "")]), 3.0);
    assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!(m.get("h_count", &[]), 2.0);
}

//! Limits, against a real coordinator on 127.0.0.1:0 (SQLite and Postgres): an oversized grid,
//! huge strings, non-finite results and hostile names are each refused with an error that names
//! the field and the limit, and the store is unchanged; a 10^4-job sweep exports page by page.
//! Then a property test feeds random and mutated sweep files to the parser.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use proptest::prelude::*;
use prunesweep_coordinator::export;
use prunesweep_coordinator::sweep::{SweepSpec, DEFAULT_MAX_JOBS_PER_SUBMIT};
use prunesweep_coordinator::Config;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tonic::Code;

use common::TestStore;

async fn clients(url: &str) -> (SweepServiceClient<Channel>, WorkerServiceClient<Channel>) {
    let sweeps = SweepServiceClient::connect(url.to_string()).await.unwrap();
    let workers = WorkerServiceClient::connect(url.to_string()).await.unwrap();
    (sweeps, workers)
}

fn submit_req(yaml: &str) -> pb::SubmitSweepRequest {
    pb::SubmitSweepRequest { yaml: yaml.to_string(), file_name: Some("big.yaml".into()) }
}

/// A `deepest` sweep of one model with `n` = 1..=`cells` (no score job, no baseline): `cells` jobs.
fn deepest_grid(name: &str, cells: u32, heal: &str) -> String {
    let n: Vec<String> = (1..=cells).map(|n| n.to_string()).collect();
    format!(
        "name: {name}\nmodels: [{{name: m, path: models/m}}]\nmethods: [deepest]\nn: [{}]\nbaseline: false\n\
         eval: [{{task: c4-loss, path: data/c4-validation.jsonl, first_doc: 1000}}]\n{heal}",
        n.join(", ")
    )
}

/// Sweeps, jobs and workers as `ListSweeps` and `ListWorkers` see them: what "unchanged" compares.
async fn snapshot(sweeps: &mut SweepServiceClient<Channel>) -> (Vec<pb::SweepStatus>, usize) {
    let list = sweeps.list_sweeps(pb::ListSweepsRequest {}).await.unwrap().into_inner().sweeps;
    let workers = sweeps.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    (list, workers.len())
}

fn refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(status.message().contains(needle), "{needle:?} not in {:?}", status.message());
    }
}

async fn an_oversized_grid_is_refused_before_it_is_built(store: &TestStore) {
    let config = Config { max_jobs_per_submit: 1000, ..common::fast_config() };
    let (url, server) = common::start_server(store.store.clone(), config).await;
    let (mut sweeps, _) = clients(&url).await;
    let before = snapshot(&mut sweeps).await;
    // 1,001 cells against a limit of 1,000: the count and the limit, and how to raise it.
    let result = sweeps.submit_sweep(submit_req(&deepest_grid("big", 1001, ""))).await;
    refused(result, Code::InvalidArgument, &["1001 jobs", "limit of 1000", "--max-jobs-per-submit"]);
    // 10^6 jobs from a small file (1,000 n × 1,000 heal variants): refused at once, nothing built.
    let heal: String = "heal:\n".to_string() + &(0..1000).map(|i| format!("  - name: h{i}\n")).collect::<String>();
    let yaml = deepest_grid("huge", 1000, &heal);
    assert!(yaml.len() < 32 * 1024, "{} bytes", yaml.len());
    let started = Instant::now();
    let result = sweeps.submit_sweep(submit_req(&yaml)).await;
    refused(result, Code::InvalidArgument, &["1000000 jobs"]);
    assert!(started.elapsed() < Duration::from_secs(5), "refused in {:?}", started.elapsed());
    assert_eq!(snapshot(&mut sweeps).await, before, "the store is unchanged");
    // At the limit it is accepted.
    let reply = sweeps.submit_sweep(submit_req(&deepest_grid("big", 1000, ""))).await.unwrap().into_inner();
    assert_eq!(reply.jobs_added, 1000);
    server.shutdown().await;
}

async fn huge_strings_and_hostile_names_are_refused(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut workers) = clients(&url).await;
    let before = snapshot(&mut sweeps).await;
    let tiny = common::TINY;
    let cases: Vec<(String, Vec<&str>)> = vec![
        // A 3 MB model name (under the 8 MiB message limit, over the 256-byte name limit).
        (
            tiny.replace("name: tiny-llama", &format!("name: {}", "m".repeat(3_000_000))),
            vec!["`models[0].name`", "256"],
        ),
        (tiny.replace("path: worker/tests", &format!("path: {}/worker", "p".repeat(5000))), vec!["`models[0].path`"]),
        (tiny.replace("fractions: [0.25, 0.5]", "n: [4294967295]"), vec!["`n[0]`", "100000", "4294967295"]),
        (tiny.replace("name: tiny\n", "name: ../../etc\n"), vec!["`name`", "[A-Za-z0-9._-]"]),
        (tiny.replace("name: tiny-llama", "name: \"a\\nb\""), vec!["`models[0].name`", "control"]),
    ];
    for (yaml, needles) in cases {
        refused(sweeps.submit_sweep(submit_req(&yaml)).await, Code::InvalidArgument, &needles);
    }
    // Worker strings: a 100 kB name is refused, and registers nothing.
    let register =
        |name: String| pb::RegisterRequest { name, device: "cpu".into(), memory_bytes: None, version: "t".into() };
    refused(workers.register(register("w".repeat(100_000))).await, Code::InvalidArgument, &["`name`", "256"]);
    let device = pb::RegisterRequest { device: "d".repeat(1000), ..register("w".into()) };
    refused(workers.register(device).await, Code::InvalidArgument, &["`device`"]);
    assert_eq!(snapshot(&mut sweeps).await, before, "the store is unchanged");

    // A lease with too many held models; a heartbeat with a huge phase.
    let id = workers.register(register("w1".into())).await.unwrap().into_inner().worker_id;
    let many = pb::LeaseJobRequest {
        worker_id: id.clone(),
        held_models: vec!["m".into(); 10_000],
        wait_ms: 0,
        ..Default::default()
    };
    refused(workers.lease_job(many).await, Code::InvalidArgument, &["`held_models`", "256"]);
    let beat = pb::HeartbeatRequest {
        tokens_per_second: None,
        worker_id: id.clone(),
        lease_id: "l".into(),
        job_id: 1,
        phase: Some("x".repeat(10_000)),
        progress: None,
    };
    refused(workers.heartbeat(beat).await, Code::InvalidArgument, &["`phase`"]);
    server.shutdown().await;
}

async fn non_finite_values_are_refused_and_the_job_stays_leased(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut workers) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let register =
        pb::RegisterRequest { name: "w".into(), device: "cpu".into(), memory_bytes: None, version: "t".into() };
    let id = workers.register(register).await.unwrap().into_inner().worker_id;
    let mut leases = Vec::new();
    for _ in 0..2 {
        let req = pb::LeaseJobRequest { worker_id: id.clone(), wait_ms: 1000, ..Default::default() };
        leases.push(workers.lease_job(req).await.unwrap().into_inner().lease.expect("a runnable job"));
    }
    let status = |s: pb::SweepStatus| (s.leased, s.succeeded);
    let get = pb::GetSweepRequest { sweep: "tiny".into() };
    assert_eq!(status(sweeps.get_sweep(get.clone()).await.unwrap().into_inner()), (2, 0));
    for lease in &leases {
        let job = lease.job.as_ref().unwrap();
        let row = |task: &str, value: f64| pb::ResultRow { task: task.into(), metric: "loss".into(), value };
        let base = pb::CompleteJobRequest {
            worker_id: id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id: job.job_id,
            num_layers: Some(4),
            ..Default::default()
        };
        let nan = pb::CompleteJobRequest { results: vec![row("c4-loss", 1.0), row("mmlu", f64::NAN)], ..base.clone() };
        refused(workers.complete_job(nan).await, Code::InvalidArgument, &["results[1].value is NaN"]);
        let inf = pb::CompleteJobRequest { results: vec![row("c4-loss", f64::INFINITY)], ..base.clone() };
        refused(workers.complete_job(inf).await, Code::InvalidArgument, &["results[0].value is inf"]);
        let distance =
            pb::Distance { metric: pb::DistanceMetric::Angular as i32, n: 1, l: 0, value: f64::NEG_INFINITY };
        let bad = pb::CompleteJobRequest { distances: vec![distance], ..base.clone() };
        refused(workers.complete_job(bad).await, Code::InvalidArgument, &["distances[0].value is -inf"]);
        // A task name that would be a path in `coordinator plot`.
        let hostile = pb::CompleteJobRequest { results: vec![row("../../escaped", 1.0)], ..base.clone() };
        refused(workers.complete_job(hostile).await, Code::InvalidArgument, &["`results[0].task`"]);
        assert_eq!(status(sweeps.get_sweep(get.clone()).await.unwrap().into_inner()).0, 2, "still leased");
    }
    let jobs = export::fetch_results(&mut sweeps, "tiny").await.unwrap();
    assert!(jobs.iter().all(|j| j.results.is_empty()), "nothing of a refused completion is stored");
    // A failure message of 1 MB is kept, cut to its first 16 KiB.
    let lease = &leases[0];
    let fail = pb::FailJobRequest {
        worker_id: id.clone(),
        lease_id: lease.lease_id.clone(),
        job_id: lease.job.as_ref().unwrap().job_id,
        message: "é".repeat(500_000),
        error_kind: "oom".into(),
        retryable: true,
    };
    workers.fail_job(fail).await.unwrap();
    server.shutdown().await;
}

async fn a_ten_thousand_job_sweep_exports_in_pages(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, _) = clients(&url).await;
    // Long paths make each job ~1 kB, so one reply of all of them would be ~10 MB.
    let yaml = deepest_grid("wide", 10_000, "").replace("data/c4-validation.jsonl", &"d/".repeat(300));
    let reply = sweeps.submit_sweep(submit_req(&yaml)).await.unwrap().into_inner();
    assert_eq!(reply.jobs_total, 10_000);
    let first = sweeps
        .list_results(pb::ListResultsRequest { sweep: "wide".into(), page_size: 0, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.jobs.is_empty() && first.jobs.len() <= 1000, "{}", first.jobs.len());
    assert!(!first.next_page_token.is_empty());
    // The client keeps tonic's default 4 MiB limit: every page fits in it.
    let started = Instant::now();
    let jobs = export::fetch_results(&mut sweeps, "wide").await.unwrap();
    eprintln!("exported 10^4 jobs in {:?}", started.elapsed());
    assert_eq!(jobs.len(), 10_000);
    assert!(jobs.windows(2).all(|w| w[0].job_id < w[1].job_id), "in job-id order, each job once");
    let small = pb::ListResultsRequest { sweep: "wide".into(), page_size: 7, page_token: first.next_page_token };
    let page = sweeps.list_results(small).await.unwrap().into_inner();
    assert_eq!(page.jobs.len(), 7);
    assert_eq!(page.jobs[0].job_id, first.jobs.last().unwrap().job_id + 1);
    let bad = pb::ListResultsRequest { sweep: "wide".into(), page_size: 0, page_token: "x".into() };
    refused(sweeps.list_results(bad).await, Code::InvalidArgument, &["`page_token`"]);
    server.shutdown().await;
}

both_backends!(
    an_oversized_grid_is_refused_before_it_is_built,
    huge_strings_and_hostile_names_are_refused,
    non_finite_values_are_refused_and_the_job_stays_leased,
    a_ten_thousand_job_sweep_exports_in_pages,
);

/// A 100,000-job submit on SQLite while a worker leases in a loop: prints the submit time and
/// the slowest lease during it. A measurement, not a pass/fail check (`--ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --test limits -- --ignored --nocapture"]
async fn big_submit_against_leases() {
    let s = common::sqlite().await;
    let (url, server) = common::start_server(s.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut workers) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let register =
        pb::RegisterRequest { name: "w".into(), device: "cpu".into(), memory_bytes: None, version: "t".into() };
    let id = workers.register(register).await.unwrap().into_inner().worker_id;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let leaser = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut worst, mut count) = (Duration::ZERO, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let req = pb::LeaseJobRequest { worker_id: id.clone(), wait_ms: 0, ..Default::default() };
                let reply = workers.lease_job(req).await;
                worst = worst.max(started.elapsed());
                count += 1;
                if let Err(e) = reply {
                    panic!("lease failed during the submit: {e}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (worst, count)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 10 models × 10,000 `n` (a list of 100,000 would break the parser's node budget).
    let models: Vec<String> = (0..10).map(|i| format!("{{name: m{i}, path: models/m{i}}}")).collect();
    let yaml =
        deepest_grid("big", 10_000, "").replace("[{name: m, path: models/m}]", &format!("[{}]", models.join(", ")));
    let started = Instant::now();
    let reply = sweeps.submit_sweep(submit_req(&yaml)).await.unwrap().into_inner();
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, count) = leaser.await.unwrap();
    eprintln!("submit of {} jobs: {took:?}; {count} leases meanwhile, the slowest {worst:?}", reply.jobs_added);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The parser under random and mutated input.

const TINY_TEST: &str = include_str!("../../experiments/tiny-test.yaml");

/// Values a mutation writes after a key's colon: wrong types, extremes, hostile strings.
const VALUES: &[&str] = &[
    "",
    "-1",
    "0",
    "4294967295",
    "18446744073709551616",
    "1e308",
    "-0.0",
    ".nan",
    ".inf",
    "[]",
    "{}",
    "[1, 2",
    "~",
    "null",
    "true",
    "\"../../escaped\"",
    "'",
    "&a [*a]",
    "*a",
    "!!binary aGk=",
    "[0.25, 0.25, 0.999999]",
    "[100001]",
    "\"\\u0000\"",
];

/// What to do to the file's lines.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Replace(usize, String),
    SetValue(usize, &'static str),
    Indent(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let line = 0..64usize;
    prop_oneof![
        line.clone().prop_map(Mutation::Delete),
        line.clone().prop_map(Mutation::Duplicate),
        (line.clone(), noise(60)).prop_map(|(i, s)| Mutation::Replace(i, s)),
        (line.clone(), prop::sample::select(VALUES)).prop_map(|(i, v)| Mutation::SetValue(i, v)),
        (line, 0..6usize).prop_map(|(i, n)| Mutation::Indent(i, n)),
    ]
}

/// Random text biased towards YAML's own characters.
fn noise(max: usize) -> impl Strategy<Value = String> {
    let chars: Vec<char> = "abcz019 -:.,[]{}#&*!|>'\"%@`\n\t\\?/\u{0}é".chars().collect();
    prop_oneof![
        prop::collection::vec(prop::sample::select(chars), 0..max).prop_map(|c| c.into_iter().collect()),
        any::<String>().prop_map(move |s| s.chars().take(max).collect()),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in mutations {
        if lines.is_empty() {
            break;
        }
        let at = |i: usize| i % lines.len();
        match m {
            Mutation::Delete(i) => {
                lines.remove(at(*i));
            }
            Mutation::Duplicate(i) => {
                let i = at(*i);
                lines.insert(i, lines[i].clone());
            }
            Mutation::Replace(i, s) => {
                let i = at(*i);
                lines[i] = s.clone();
            }
            Mutation::SetValue(i, v) => {
                let i = at(*i);
                if let Some((key, _)) = lines[i].split_once(':') {
                    lines[i] = format!("{key}: {v}");
                }
            }
            Mutation::Indent(i, n) => {
                let i = at(*i);
                lines[i] = format!("{}{}", " ".repeat(*n), lines[i].trim_start());
            }
        }
    }
    lines.join("\n") + "\n"
}

/// Parse: no panic, no hang, an error names a line or a field; a sweep that parses is counted
/// and (within the default limit) expanded without a panic.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let parsed = SweepSpec::parse(text, "fuzz.yaml");
    prop_assert!(started.elapsed() < Duration::from_secs(2), "parse took {:?}", started.elapsed());
    match parsed {
        Ok(spec) => {
            if spec.check_job_count(DEFAULT_MAX_JOBS_PER_SUBMIT, "fuzz.yaml").is_ok() {
                let jobs = spec.expand();
                prop_assert!(jobs.len() as u64 <= spec.job_count());
            }
        }
        Err(e) => {
            let message = e.to_string();
            let names_line = message.contains("line ");
            let names_field =
                message.split('`').nth(1).is_some_and(|f| !f.is_empty()) && message.matches('`').count() >= 2;
            prop_assert!(names_line || names_field, "no line or field in {message:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics_and_errors_name_a_line_or_field(text in noise(2000)) {
        check_parse(&text)?;
    }

    #[test]
    fn mutated_sweep_files_never_panic_and_errors_name_a_line_or_field(
        mutations in prop::collection::vec(mutation(), 1..5)
    ) {
        check_parse(&apply(TINY_TEST, &mutations))?;
    }
}

#[test]
fn the_unmutated_file_parses_and_the_count_is_exact() {
    let spec = SweepSpec::parse(TINY_TEST, "tiny-test.yaml").unwrap();
    assert_eq!(spec.job_count(), spec.expand().len() as u64);
}

//! A big submit must not starve leases and heartbeats. Per backend: a coordinator on 127.0.0.1:0;
//! WORKERS fake workers (each with its own gRPC connection) loop LeaseJob (wait 100 ms) →
//! Heartbeat → CompleteJob on a pre-submitted warm sweep, timing every call; after 1 s of steady
//! state a separate client submits a JOBS-job sweep (`deepest`, ceil(JOBS/10,000) models × `n`
//! lists of at most 10,000), and the workers go on until 1 s after the submit returns. Prints, per
//! backend, the submit's seconds and, for the calls that overlap the submit (started before it
//! returned and ended after it began), the count and p50/p99/max latency of LeaseJob and of
//! Heartbeat (CompleteJob too), the cycles finished, LeaseJob polls that came back without a job,
//! and the errors (any error status, or a heartbeat not answered CONTINUE; must be 0), with the
//! same figures from the steady second before the submit for comparison. SQLite (temp file, WAL)
//! and Postgres (`PRUNESWEEP_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`, in
//! a private schema that is dropped after). Workers, submitter and coordinator share the cores.
//!
//! ```sh
//! cargo bench -p prunesweep-coordinator --bench submit   # JOBS=100000 WORKERS=8 WARM=30000 by default
//! ```

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prunesweep_coordinator::store::JobStore;
use prunesweep_coordinator::sweep::{DEFAULT_MAX_JOBS_PER_SUBMIT, MAX_AMOUNTS};
use prunesweep_coordinator::Config;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::{Channel, Endpoint};

mod common;

use common::env;

/// A `deepest` sweep (no score job, no baseline) of at least `jobs` jobs: ceil(jobs / 10,000)
/// models `{prefix}-{i}.gguf`, each with the same `n` list 1..=ceil(jobs / models) (the `n` list
/// limit is 10,000 entries). Returns the YAML, the exact job count and the models' paths.
fn grid(name: &str, prefix: &str, jobs: usize) -> (String, usize, Vec<String>) {
    let models = jobs.max(1).div_ceil(MAX_AMOUNTS);
    let per = jobs.max(1).div_ceil(models);
    let paths: Vec<String> = (0..models).map(|i| format!("{prefix}-{i}.gguf")).collect();
    let list: Vec<String> =
        paths.iter().enumerate().map(|(i, p)| format!("{{name: {prefix}{i}, path: {p}}}")).collect();
    let ns: Vec<String> = (1..=per).map(|n| n.to_string()).collect();
    let yaml = format!(
        "name: {name}\nmodels: [{}]\nmethods: [deepest]\nn: [{}]\nbaseline: false\n",
        list.join(", "),
        ns.join(", ")
    );
    (yaml, models * per, paths)
}

#[derive(Clone, Copy, PartialEq)]
enum Call {
    Lease,
    Heartbeat,
    Complete,
}

/// One call: what, when it started and ended (since the run's start), and whether it got a job
/// (LeaseJob) or failed.
struct Sample {
    call: Call,
    start: Duration,
    end: Duration,
    empty: bool,
    error: bool,
}

struct Stats {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(samples: &[&Sample], call: Call) -> Stats {
    let mut ms: Vec<f64> =
        samples.iter().filter(|s| s.call == call).map(|s| (s.end - s.start).as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if ms.is_empty() {
            f64::NAN
        } else {
            ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1]
        }
    };
    Stats { count: ms.len(), p50: at(0.5), p99: at(0.99), max: ms.last().copied().unwrap_or(f64::NAN) }
}

fn show(name: &str, s: &Stats) -> String {
    format!("{name} n={} p50 {:.1} p99 {:.1} max {:.1} ms", s.count, s.p50, s.p99, s.max)
}

/// A fake worker: register, then lease → heartbeat → complete until `stop`, timing each call.
async fn worker(i: usize, channel: Channel, held: Vec<String>, t0: Instant, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let mut w = WorkerServiceClient::new(channel);
    let worker_id = common::register(&mut w, i).await;
    let mut samples = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let req = pb::LeaseJobRequest {
            worker_id: worker_id.clone(),
            held_models: held.clone(),
            wait_ms: 100,
            ..Default::default()
        };
        let start = t0.elapsed();
        let reply = w.lease_job(req).await;
        let end = t0.elapsed();
        let lease = match reply {
            Ok(r) => r.into_inner().lease,
            Err(status) => {
                eprintln!("LeaseJob: {status:?}");
                samples.push(Sample { call: Call::Lease, start, end, empty: false, error: true });
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        samples.push(Sample { call: Call::Lease, start, end, empty: lease.is_none(), error: false });
        let Some(lease) = lease else { continue };
        let job_id = lease.job.expect("job").job_id;

        let beat = pb::HeartbeatRequest {
            tokens_per_second: None,
            worker_id: worker_id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id,
            phase: Some("eval".into()),
            progress: Some(0.5),
        };
        let start = t0.elapsed();
        let reply = w.heartbeat(beat).await;
        let end = t0.elapsed();
        let error = match reply {
            Ok(r) if r.get_ref().action == pb::HeartbeatAction::Continue as i32 => false,
            Ok(r) => {
                eprintln!("Heartbeat: action {}", r.into_inner().action);
                true
            }
            Err(status) => {
                eprintln!("Heartbeat: {status:?}");
                true
            }
        };
        samples.push(Sample { call: Call::Heartbeat, start, end, empty: false, error });

        let complete = pb::CompleteJobRequest {
            worker_id: worker_id.clone(),
            lease_id: lease.lease_id,
            job_id,
            results: vec![pb::ResultRow { task: "c4-loss".into(), metric: "loss".into(), value: 3.0 }],
            ..Default::default()
        };
        let start = t0.elapsed();
        let reply = w.complete_job(complete).await;
        let end = t0.elapsed();
        if let Err(status) = &reply {
            eprintln!("CompleteJob: {status:?}");
        }
        samples.push(Sample { call: Call::Complete, start, end, empty: false, error: reply.is_err() });
    }
    samples
}

async fn connect(url: &str) -> Channel {
    Endpoint::from_str(url).expect("url").connect().await.expect("connect")
}

async fn bench(label: &str, store: Arc<dyn JobStore>, jobs: usize, workers: usize, warm: usize) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (big_yaml, big_jobs, _) = grid("big", "big", jobs);
    let config = Config { max_jobs_per_submit: DEFAULT_MAX_JOBS_PER_SUBMIT.max(big_jobs as u64), ..Config::default() };
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(prunesweep_coordinator::run(listener, store, config, async {
        let _ = stopped.await;
    }));

    // The warm sweep that keeps the workers busy; they hold its models, so its jobs come first.
    let (warm_yaml, warm_jobs, held) = grid("warm", "warm", warm);
    let mut sweeps = SweepServiceClient::new(connect(&url).await);
    let reply = sweeps
        .submit_sweep(pb::SubmitSweepRequest { yaml: warm_yaml, file_name: None })
        .await
        .expect("warm submit")
        .into_inner();
    assert_eq!(reply.jobs_added as usize, warm_jobs);

    let mut channels = Vec::with_capacity(workers);
    for _ in 0..workers {
        channels.push(connect(&url).await);
    }
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(i, channel)| tokio::spawn(worker(i, channel, held.clone(), t0, stop.clone())))
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let submit_start = t0.elapsed();
    let reply = sweeps
        .submit_sweep(pb::SubmitSweepRequest { yaml: big_yaml, file_name: Some("big.yaml".into()) })
        .await
        .expect("submit")
        .into_inner();
    let submit_end = t0.elapsed();
    assert_eq!(reply.jobs_added as usize, big_jobs);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("worker"));
    }
    let _ = stop_server.send(());
    server.await.expect("server").expect("server ran");

    // Calls that overlap a window [from, to): started before it ended, ended after it began.
    let window = |from: Duration, to: Duration| -> Vec<&Sample> {
        samples.iter().filter(|s| s.start < to && s.end > from).collect()
    };
    let during = window(submit_start, submit_end);
    let steady = window(submit_start.saturating_sub(Duration::from_secs(1)), submit_start);
    let errors = |s: &[&Sample]| s.iter().filter(|s| s.error).count();
    let empty = |s: &[&Sample]| s.iter().filter(|s| s.empty).count();
    let total_errors = samples.iter().filter(|s| s.error).count();
    let secs = (submit_end - submit_start).as_secs_f64();
    let (lease, beat, done) =
        (stats(&during, Call::Lease), stats(&during, Call::Heartbeat), stats(&during, Call::Complete));
    let (s_lease, s_beat) = (stats(&steady, Call::Lease), stats(&steady, Call::Heartbeat));
    println!(
        "{label:<9} submit {big_jobs} jobs: {secs:.2} s; during it ({workers} workers): {}; {}; {}; {:.0} cycles/s; \
         {} empty polls; errors {} (whole run {total_errors}) | steady second before: LeaseJob p50 {:.1} p99 {:.1} ms, \
         Heartbeat p50 {:.1} p99 {:.1} ms, {:.0} cycles/s",
        show("LeaseJob", &lease),
        show("Heartbeat", &beat),
        show("CompleteJob", &done),
        done.count as f64 / secs,
        empty(&during),
        errors(&during),
        s_lease.p50,
        s_lease.p99,
        s_beat.p50,
        s_beat.p99,
        stats(&steady, Call::Complete).count as f64,
    );
    assert_eq!(total_errors, 0, "{label}: calls failed");
}

fn main() {
    let jobs = env("JOBS", 100_000);
    let workers = env("WORKERS", 8);
    let warm = env("WARM", 30_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        bench("sqlite", common::sqlite(dir.path()).await, jobs, workers, warm).await;

        let (store, schema) = common::postgres("ps_bench_submit").await;
        bench("postgres", store, jobs, workers, warm).await;
        schema.drop().await;
    });
}

//! Load: 256 simulated workers, each on its own connection as real workers on their own boxes
//! are, register and then lease → heartbeat → complete jobs that "run" for 100–400 ms, for
//! `PRUNESWEEP_LOAD_SECS` seconds (default 60) on each backend. Every call must succeed and no
//! job may be completed twice; the figures (leases/s, p50/p99 LeaseJob latency) are printed
//! (`cargo test -p prunesweep-coordinator --test load -- --nocapture`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prunesweep_coordinator::store::JobStore;
use prunesweep_coordinator::Config;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;

const WORKERS: usize = 256;
const JOBS: usize = 80_000;

fn seconds() -> u64 {
    std::env::var("PRUNESWEEP_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60)
}

/// What all simulated workers saw.
#[derive(Default)]
struct Tally {
    lease_ms: Vec<f64>,
    completions: HashMap<i64, usize>,
    errors: Vec<String>,
}

async fn worker(url: String, i: usize, until: Instant, tally: Arc<Mutex<Tally>>) {
    let fail = |tally: &Mutex<Tally>, e: String| tally.lock().unwrap().errors.push(e);
    let mut client = match WorkerServiceClient::connect(url).await {
        Ok(c) => c,
        Err(e) => return fail(&tally, format!("worker {i} connect: {e}")),
    };
    let register = pb::RegisterRequest { name: format!("load-{i}"), device: "cpu".into(), ..Default::default() };
    let worker_id = match client.register(register).await {
        Ok(r) => r.into_inner().worker_id,
        Err(e) => return fail(&tally, format!("worker {i} register: {e}")),
    };
    let mut rng = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while Instant::now() < until {
        let req = pb::LeaseJobRequest {
            worker_id: worker_id.clone(),
            held_models: vec![format!("m{}.gguf", i % 16)],
            wait_ms: 200,
            free_memory_bytes: Some(1 << 30),
            report_unfinished: false,
        };
        let t = Instant::now();
        let lease = match client.lease_job(req).await {
            Ok(r) => r.into_inner().lease,
            Err(e) => return fail(&tally, format!("worker {i} lease: {e}")),
        };
        tally.lock().unwrap().lease_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let Some(lease) = lease else { continue };
        let job_id = lease.job.as_ref().map_or(0, |j| j.job_id);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(100 + rng % 300)).await;
        let beat = pb::HeartbeatRequest {
            tokens_per_second: None,
            worker_id: worker_id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id,
            phase: Some("eval".into()),
            progress: Some(0.5),
        };
        match client.heartbeat(beat).await.map(|r| r.into_inner().action()) {
            Ok(pb::HeartbeatAction::Continue) => {}
            Ok(other) => return fail(&tally, format!("worker {i} heartbeat: {other:?}")),
            Err(e) => return fail(&tally, format!("worker {i} heartbeat: {e}")),
        }
        let done = pb::CompleteJobRequest {
            worker_id: worker_id.clone(),
            lease_id: lease.lease_id,
            job_id,
            results: vec![pb::ResultRow { task: "c4-loss".into(), metric: "loss".into(), value: 3.0 }],
            ..Default::default()
        };
        if let Err(e) = client.complete_job(done).await {
            return fail(&tally, format!("worker {i} complete job {job_id}: {e}"));
        }
        *tally.lock().unwrap().completions.entry(job_id).or_default() += 1;
    }
}

async fn load(label: &str, store: Arc<dyn JobStore>) {
    let config = Config::for_lease_ttl(Duration::from_secs(60));
    let (url, server) = common::start_server(store, config).await;
    // 16 models × 5,000 layer counts: more than 256 workers finish in the default 60 s.
    let ns: Vec<String> = (1..=JOBS / 16).map(|n| n.to_string()).collect();
    let models: Vec<String> = (0..16).map(|m| format!("{{name: m{m}, path: m{m}.gguf}}")).collect();
    let yaml = format!(
        "name: load\nmodels: [{}]\nmethods: [deepest]\nn: [{}]\nbaseline: false\n",
        models.join(", "),
        ns.join(", ")
    );
    let mut client = SweepServiceClient::connect(url.clone()).await.unwrap();
    let t = Instant::now();
    let submitted = client.submit_sweep(pb::SubmitSweepRequest { yaml, file_name: None }).await.unwrap().into_inner();
    assert_eq!(submitted.jobs_total as usize, JOBS);
    let submit_s = t.elapsed().as_secs_f64();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let secs = seconds();
    let until = Instant::now() + Duration::from_secs(secs);
    let t = Instant::now();
    let tasks: Vec<_> = (0..WORKERS).map(|i| tokio::spawn(worker(url.clone(), i, until, tally.clone()))).collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = t.elapsed().as_secs_f64();
    let mut tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    assert!(tally.errors.is_empty(), "{} errors, first: {:?}", tally.errors.len(), tally.errors.first());
    let duplicates: Vec<_> = tally.completions.iter().filter(|(_, &n)| n > 1).collect();
    assert!(duplicates.is_empty(), "jobs completed more than once: {duplicates:?}");
    let completed: usize = tally.completions.values().sum();
    assert!(completed > WORKERS, "{completed} jobs completed");
    let status = client.get_sweep(pb::GetSweepRequest { sweep: "load".into() }).await.unwrap().into_inner();
    assert_eq!(status.succeeded as usize, completed, "the store agrees with the workers");
    tally.lease_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| tally.lease_ms[((tally.lease_ms.len() - 1) as f64 * p) as usize];
    println!(
        "{label:<8} {WORKERS} workers, {secs} s: {completed} jobs ({:.0} leases/s), LeaseJob p50 {:.1} ms, p99 {:.1} ms; \
         submit of {JOBS} jobs {submit_s:.2} s",
        completed as f64 / elapsed,
        pct(0.5),
        pct(0.99)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_six_workers_on_sqlite() {
    let s = common::sqlite().await;
    load("sqlite", s.store.clone()).await;
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_six_workers_on_postgres() {
    let s = common::postgres().await;
    load("postgres", s.store.clone()).await;
    s.cleanup().await;
}

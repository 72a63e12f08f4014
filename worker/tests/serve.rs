//! End to end: a real coordinator (in this process, on 127.0.0.1:0, SQLite or Postgres) and real
//! `worker serve` processes run the tiny sweep — score, baseline, 2 fractions × 2 methods — and
//! report results; a worker killed mid-job loses nothing; a missing model fails without retries.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{c4_sample, shared_data};
use prunesweep_coordinator::store::JobStore;
use prunesweep_coordinator::testing::{self, start_server, wait_until_done, worker_process_config};
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::{JobKind, JobState, ListResultsRequest, SubmitSweepRequest};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the worker crate sits in the workspace").to_path_buf()
}

/// The shared tiny sweep ([`testing::tiny_sweep`]) on the C4 sample, its c4-loss at 16 tokens
/// from document 100 on, seed 0, 3 attempts. `extra` goes at the end (e.g. a heal variant).
fn tiny_sweep(name: &str, model: &str, extra: &str) -> String {
    let c4 = c4_sample().display().to_string();
    testing::tiny_sweep(name, model, &c4, &format!("seed: 0\nmax_attempts: 3\n{extra}"))
        .replace("    limit: 4\n", "    limit: 4\n    seq_len: 16\n    first_doc: 100\n")
}

/// `worker serve` reading models under the test fixtures and data under the shared data only.
fn worker_command(url: &str, work_dir: &Path, name: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command
        .args(["serve", "--coordinator", url, "--lease-wait-secs", "1", "--name", name])
        .arg("--work-dir")
        .arg(work_dir)
        .arg("--model-root")
        .arg(workspace().join("worker/tests/fixtures"))
        .arg("--data-root")
        .arg(shared_data())
        .current_dir(workspace())
        .stdout(Stdio::null());
    command
}

fn spawn_worker(url: &str, work_dir: &Path, name: &str) -> Child {
    worker_command(url, work_dir, name)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("start worker serve")
}

/// A worker whose log (info and up) goes to `log`.
fn spawn_logged_worker(url: &str, work_dir: &Path, name: &str, log: &Path) -> Child {
    worker_command(url, work_dir, name)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start worker serve")
}

fn stop(mut child: Child) -> Option<i32> {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn two_workers_finish_the_tiny_sweep(store: Arc<dyn JobStore>) {
    let tmp = tempfile::tempdir().unwrap();
    let (url, server) = start_server(store, worker_process_config()).await;
    let mut client = SweepServiceClient::connect(url.clone()).await.unwrap();
    let yaml = tiny_sweep("serve-e2e", testing::TINY_MODEL, "");
    let submitted =
        client.submit_sweep(SubmitSweepRequest { yaml: yaml.clone(), file_name: None }).await.unwrap().into_inner();
    assert_eq!(submitted.jobs_total, 6, "1 score + 1 baseline + 4 cells");
    // w2 is a batch worker: it exits by itself once nothing is left to run.
    let w1 = spawn_worker(&url, &tmp.path().join("w1"), "w1");
    let mut w2 = worker_command(&url, &tmp.path().join("w2"), "w2")
        .arg("--exit-when-done")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("start worker serve");
    let status = wait_until_done(&url, "serve-e2e", Duration::from_secs(180)).await;
    assert_eq!((status.succeeded, status.failed), (6, 0), "{status:?}");
    let t0 = Instant::now();
    let exited = loop {
        match w2.try_wait().unwrap() {
            Some(status) => break status.code(),
            None if t0.elapsed() > Duration::from_secs(30) => {
                let _ = w2.kill();
                panic!("a worker with --exit-when-done still runs 30 s after the sweep finished");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(exited, Some(0), "--exit-when-done exits 0 once no job is unfinished");

    let results = client
        .list_results(ListResultsRequest { sweep: "serve-e2e".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let c4 = c4_sample().display().to_string();
    for job in &results {
        assert_eq!(job.state, JobState::Succeeded as i32);
        assert_eq!(job.num_layers, Some(4));
        // Every result says what made it.
        let p = job.provenance.as_ref().unwrap_or_else(|| panic!("no provenance: {job:?}"));
        assert!(p.model_fingerprint.starts_with("sha256:") && p.model_fingerprint.len() == 71, "{p:?}");
        assert!(p.data_fingerprints.get(&c4).is_some_and(|f| f.starts_with("sha256:")), "{p:?}");
        assert_eq!((p.device.as_str(), p.dtype.as_str()), ("cpu", "f32"));
        assert!(!p.worker_commit.is_empty() && !p.worker_version.is_empty() && p.wall_seconds > 0.0, "{p:?}");
        // Each phase with the process's peak memory over it (Linux: /proc/self/clear_refs).
        assert!(!job.timings.is_empty(), "{job:?}");
        if cfg!(target_os = "linux") {
            assert!(job.timings.iter().all(|t| t.peak_host_bytes.is_some_and(|b| b > 1 << 20)), "{:?}", job.timings);
        }
        let spec_json = &job.spec.as_ref().unwrap().spec_json;
        assert!(spec_json.contains("\"kind\""), "the resolved spec: {spec_json}");
        let kind = JobKind::try_from(job.kind).unwrap();
        if kind == JobKind::Score {
            continue;
        }
        let loss = job.results.iter().find(|r| r.task == "c4-loss" && r.metric == "loss").expect("a loss row").value;
        assert!(loss.is_finite() && loss > 0.0, "{job:?}");
        if kind == JobKind::Cell {
            let spec = job.spec.as_ref().unwrap();
            let n = match spec.amount {
                Some(prunesweep_proto::v1::job_spec::Amount::Fraction(f)) => (f * 4.0).round() as usize,
                _ => panic!("cells of this sweep have fractions"),
            };
            assert_eq!(job.layers_dropped.len(), n, "{job:?}");
            if spec.method == prunesweep_proto::v1::PruneMethod::Deepest as i32 {
                // Deepest-but-last: 0.25 → [2], 0.5 → [1, 2].
                assert_eq!(job.layers_dropped.last(), Some(&2));
            }
        }
    }
    // Resubmitting adds nothing.
    let again = client.submit_sweep(SubmitSweepRequest { yaml, file_name: None }).await.unwrap().into_inner();
    assert_eq!(again.jobs_added, 0);
    // Each worker registered its device's memory and reports what is free when it leases.
    let listed = client.list_workers(prunesweep_proto::v1::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(listed.len(), 2);
    for w in &listed {
        let (total, free) = (w.memory_bytes.unwrap_or(0), w.free_memory_bytes.unwrap_or(0));
        assert!(total > 0 && free > 0 && free <= total, "{w:?}");
    }
    // `worker serve` re-ran itself with its malloc settings (allocator.rs), the same process.
    let inherited = ["GLIBC_TUNABLES", "PRUNESWEEP_MALLOC"].iter().any(|v| std::env::var_os(v).is_some());
    if cfg!(all(target_os = "linux", target_env = "gnu")) && !inherited {
        let environ = std::fs::read(format!("/proc/{}/environ", w1.id())).unwrap();
        let tunables = format!("GLIBC_TUNABLES={}", prunesweep_worker::allocator::SERVE_MALLOC_TUNABLES);
        assert!(
            environ.split(|&b| b == 0).any(|v| v == tunables.as_bytes()),
            "no {tunables} in worker serve's environment"
        );
    }
    assert_eq!(stop(w1), Some(0), "a worker stops cleanly on SIGTERM");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_finish_the_tiny_sweep_on_sqlite() {
    let store = testing::sqlite().await;
    two_workers_finish_the_tiny_sweep(store.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_finish_the_tiny_sweep_on_postgres() {
    let store = testing::postgres().await;
    two_workers_finish_the_tiny_sweep(store.store.clone()).await;
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_fails_once_with_its_path_and_a_killed_worker_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = testing::sqlite().await;
    let (url, server) = start_server(store.store.clone(), worker_process_config()).await;
    let mut client = SweepServiceClient::connect(url.clone()).await.unwrap();
    // A model path under the worker's model root that does not exist: every job of the sweep
    // fails for good, with the path in the error, after one attempt (not retried to max_attempts).
    // A model outside its roots fails the same way, naming the flag that would allow it.
    let w = spawn_worker(&url, &tmp.path().join("w"), "w");
    for (sweep, model, says) in [
        ("missing-model", "worker/tests/fixtures/no-such-model", "worker/tests/fixtures/no-such-model"),
        ("outside-roots", "/nonexistent/model-dir", "outside this worker's model roots"),
    ] {
        let yaml = tiny_sweep(sweep, model, "");
        client.submit_sweep(SubmitSweepRequest { yaml, file_name: None }).await.unwrap();
        let status = wait_until_done(&url, sweep, Duration::from_secs(60)).await;
        assert_eq!(status.succeeded, 0);
        let jobs = client
            .list_results(ListResultsRequest { sweep: sweep.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .jobs;
        let score = jobs.iter().find(|j| j.kind == JobKind::Score as i32).unwrap();
        assert_eq!(score.state, JobState::Failed as i32);
        assert_eq!(score.attempts, 1, "{sweep}: not retried");
        assert!(score.error.as_deref().unwrap_or_default().contains(says), "{sweep}: {score:?}");
    }
    stop(w);

    // A worker killed (SIGKILL, no goodbye) in the middle of a healing job: the lease expires, the
    // job is leased again by another worker and the sweep finishes.
    let heal = "heal:\n  - name: qlora\n    qlora: {rank: 2, alpha: 4, dropout: 0.0, steps: 400, learning_rate: 0.001, batch_size: 2, seq_len: 16}\n";
    let yaml = tiny_sweep("killed-worker", testing::TINY_MODEL, heal);
    client.submit_sweep(SubmitSweepRequest { yaml, file_name: None }).await.unwrap();
    let mut victim = spawn_worker(&url, &tmp.path().join("victim"), "victim");
    // Let it take a healing cell: its checkpoint folder appears under its work dir.
    let jobs_dir = tmp.path().join("victim/jobs");
    let t0 = Instant::now();
    while !jobs_dir.is_dir() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the victim never started healing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.kill().unwrap();
    victim.wait().unwrap();
    let rescuer = spawn_worker(&url, &tmp.path().join("rescuer"), "rescuer");
    let status = wait_until_done(&url, "killed-worker", Duration::from_secs(300)).await;
    let jobs = client
        .list_results(ListResultsRequest { sweep: "killed-worker".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let errors: Vec<_> = jobs.iter().filter_map(|j| j.error.clone()).collect();
    assert_eq!(status.failed, 0, "{status:?}: {errors:?}");
    // `attempts` counts the attempts that ended without success: the victim's expired lease.
    let retried: Vec<i64> = jobs.iter().filter(|j| j.attempts >= 1).map(|j| j.job_id).collect();
    assert!(!retried.is_empty(), "the victim's job was leased again");
    stop(rescuer);
    server.shutdown().await;
}

/// What a coordinator child process serves: `ADDR DATABASE_URL` (see [`coordinator_process`]).
const COORDINATOR_ENV: &str = "PRUNESWEEP_TEST_COORDINATOR";

/// Not a test: the body of a coordinator child process. [`spawn_coordinator`] runs this test
/// binary again with only this test selected and `COORDINATOR_ENV` set, so a test can SIGKILL a
/// real coordinator process (no goodbye, nothing flushed beyond what the store committed).
#[test]
#[ignore = "the coordinator child process of the outage tests; runs only when they start it"]
fn coordinator_process() {
    let Ok(what) = std::env::var(COORDINATOR_ENV) else { return };
    let (addr, database) = what.split_once(' ').expect("ADDR DATABASE_URL");
    let config = prunesweep_coordinator::Config {
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(300),
        reap_interval: Duration::from_millis(200),
        startup_grace: Duration::from_secs(2),
        ..worker_process_config()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = prunesweep_coordinator::store::open(database).await.unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let _ = prunesweep_coordinator::run(listener, store, config, std::future::pending()).await;
    });
}

/// A coordinator process serving `database` on `addr` (lease 2 s, grace 2 s); returns once it
/// answers.
async fn spawn_coordinator(addr: std::net::SocketAddr, database: &str) -> Child {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["coordinator_process", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(COORDINATOR_ENV, format!("{addr} {database}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("start the coordinator process");
    let t0 = Instant::now();
    while SweepServiceClient::connect(format!("http://{addr}")).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the coordinator process never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A coordinator process on `database` serving sweep `name`: one deepest cell of the tiny model,
/// healed with rank 2 on 16-token sequences and `settings` (`steps: 300`, …), and nothing else.
async fn one_healing_cell(
    database: &str,
    name: &str,
    settings: &str,
) -> (std::net::SocketAddr, Child, SweepServiceClient<tonic::transport::Channel>) {
    let addr = free_addr();
    let coordinator = spawn_coordinator(addr, database).await;
    let mut client = SweepServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let heal = format!(
        "heal:\n  - name: qlora\n    qlora: {{rank: 2, alpha: 4, dropout: 0.0, learning_rate: 0.001, batch_size: 2, seq_len: 16, {settings}}}\n"
    );
    let yaml = tiny_sweep(name, testing::TINY_MODEL, &heal)
        .replace("methods: [angular, deepest]", "methods: [deepest]")
        .replace("fractions: [0.25, 0.5]", "fractions: [0.25]")
        + "baseline: false\n";
    let submitted = client.submit_sweep(SubmitSweepRequest { yaml, file_name: None }).await.unwrap().into_inner();
    assert_eq!(submitted.jobs_total, 1, "one healed deepest cell");
    (addr, coordinator, client)
}

/// The coordinator process is SIGKILLed while a worker heals a cell, and comes back after more
/// than a lease length: the finished result waits in the worker's outbox and is delivered when it returns; no
/// attempt is charged and the job is not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_finished_during_a_coordinator_outage_is_delivered_when_it_returns() {
    coordinator_outage(false).await;
}

/// As above, and the worker is SIGKILLed during the outage too: a new worker on the same work
/// dir delivers the report from the outbox it finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_outlives_its_workers_restart_in_the_outbox() {
    coordinator_outage(true).await;
}

async fn coordinator_outage(kill_worker: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", tmp.path().join("coordinator.sqlite").display());
    let (addr, mut coordinator, _first_client) = one_healing_cell(&database, "outage", "steps: 300").await;
    let url = format!("http://{addr}");
    let work = tmp.path().join("w");
    let mut worker = spawn_worker(&url, &work, "w");
    // The healing cell starts (its checkpoint folder appears): kill the coordinator.
    let t0 = Instant::now();
    while !work.join("jobs").is_dir() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the worker never started healing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    // The job finishes during the outage: its report waits in the outbox.
    let outbox = work.join("outbox");
    let t0 = Instant::now();
    while std::fs::read_dir(&outbox).map_or(true, |mut d| d.next().is_none()) {
        assert!(t0.elapsed() < Duration::from_secs(120), "no report reached the outbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if kill_worker {
        worker.kill().unwrap();
        worker.wait().unwrap();
        worker = spawn_worker(&url, &work, "w-restarted");
    }
    // Down for longer than a lease, then back on the same address and database.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut coordinator = spawn_coordinator(addr, &database).await;
    let mut client = SweepServiceClient::connect(url.clone()).await.unwrap();
    let status = wait_until_done(&url, "outage", Duration::from_secs(120)).await;
    assert_eq!((status.succeeded, status.failed), (1, 0), "{status:?}");
    let jobs = client
        .list_results(ListResultsRequest { sweep: "outage".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    for job in &jobs {
        assert_eq!(job.attempts, 0, "no attempt charged for the outage: {job:?}");
        assert!(!job.results.is_empty(), "{job:?}");
    }
    let store = prunesweep_coordinator::store::open(&database).await.unwrap();
    let events = store.events("outage", 0, 1000).await.unwrap();
    for job in &jobs {
        let leases = events.iter().filter(|e| e.job_id == job.job_id && e.state.as_str() == "leased").count();
        assert_eq!(leases, 1, "job {} ran once", job.job_id);
    }
    assert!(std::fs::read_dir(&outbox).unwrap().next().is_none(), "the outbox is empty once delivered");
    stop(worker);
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
}

/// Two workers share a work dir (a shared filesystem): the one healing a cell is SIGKILLed after
/// a checkpoint, and the other, leasing the job once the lease expired, resumes from that
/// checkpoint instead of step 0, and says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_healing_job_resumes_from_a_checkpoint_on_a_shared_work_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", tmp.path().join("coordinator.sqlite").display());
    let (addr, mut coordinator, _client) =
        one_healing_cell(&database, "shared", "steps: 400, checkpoint_every: 10").await;
    let url = format!("http://{addr}");
    let shared = tmp.path().join("shared-work");
    let mut first = spawn_worker(&url, &shared, "first");
    let t0 = Instant::now();
    let checkpoint = loop {
        let found = std::fs::read_dir(shared.join("jobs"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path().join("heal/checkpoint.safetensors"));
        if let Some(path) = found.filter(|p| p.is_file()) {
            break path;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the first worker never checkpointed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(checkpoint.is_file());
    let log = tmp.path().join("second.log");
    let second = spawn_logged_worker(&url, &shared, "second", &log);
    let status = wait_until_done(&url, "shared", Duration::from_secs(180)).await;
    assert_eq!((status.succeeded, status.failed), (1, 0), "{status:?}");
    stop(second);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("resuming from the healing checkpoint an earlier attempt of this job left"), "{log}");
    let resumed = log.lines().find(|l| l.contains("resumed")).unwrap_or_else(|| panic!("no resume line: {log}"));
    let step: u64 = resumed.split("step=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(step >= 10, "resumed at step {step}, not 0: {resumed}");
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
}

/// Two coordinators on one Postgres; a worker given both (`--coordinator a,b`) finishes the sweep
/// on the second after the first stops mid-sweep, and no job fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fails_over_between_two_coordinators_on_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = testing::postgres().await;
    let (url_a, server_a) = start_server(pg.store.clone(), worker_process_config()).await;
    let (url_b, server_b) = start_server(pg.store.clone(), worker_process_config()).await;
    let mut client = SweepServiceClient::connect(url_a.clone()).await.unwrap();
    // Healed cells, so the sweep outlasts the first coordinator.
    let heal = "heal:\n  - name: qlora\n    qlora: {rank: 2, alpha: 4, dropout: 0.0, steps: 150, learning_rate: 0.001, batch_size: 2, seq_len: 16}\n";
    let yaml = tiny_sweep("failover", testing::TINY_MODEL, heal);
    client.submit_sweep(SubmitSweepRequest { yaml, file_name: None }).await.unwrap();
    let worker = spawn_worker(&format!("{url_a},{url_b}"), &tmp.path().join("w"), "w");
    // The first job done through A, A goes away.
    let t0 = Instant::now();
    loop {
        let status = testing::sweep_counts(
            &client
                .get_sweep(prunesweep_proto::v1::GetSweepRequest { sweep: "failover".into() })
                .await
                .unwrap()
                .into_inner(),
        );
        if status.count(prunesweep_coordinator::job::JobState::Succeeded) >= 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no job finished through the first coordinator");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server_a.shutdown().await;
    let at_stop = status_now(&url_b, "failover").await;
    assert!(at_stop.succeeded < 6, "jobs were left for the second coordinator: {at_stop:?}");
    let status = wait_until_done(&url_b, "failover", Duration::from_secs(180)).await;
    assert_eq!((status.succeeded, status.failed), (6, 0), "{status:?}");
    stop(worker);
    server_b.shutdown().await;
    pg.cleanup().await;
}

async fn status_now(url: &str, sweep: &str) -> prunesweep_proto::v1::SweepStatus {
    let mut client = SweepServiceClient::connect(url.to_string()).await.unwrap();
    client.get_sweep(prunesweep_proto::v1::GetSweepRequest { sweep: sweep.into() }).await.unwrap().into_inner()
}

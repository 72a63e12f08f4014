//! Lease + complete throughput with 64 concurrent fake workers, each leasing a job and completing
//! it with one result row until the queue is empty: over gRPC (a coordinator on 127.0.0.1:0, the
//! generated client; each fake worker has its own connection, as real workers on their own boxes
//! do) and, for comparison, against the store directly (no gRPC, one transaction per call). Clients
//! and coordinator share the machine's cores. Prints cycles per second for SQLite (temp file, WAL)
//! and Postgres (`PRUNESWEEP_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`, in a
//! private schema that is dropped after).
//!
//! ```sh
//! cargo bench -p prunesweep-coordinator --bench lease            # JOBS=5000 CLIENTS=64 by default
//! ```

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use prunesweep_coordinator::store::{now_ms, Completion, JobStore, ResultValue};
use prunesweep_coordinator::sweep::SweepSpec;
use prunesweep_coordinator::Config;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;

mod common;

use common::env;

fn sweep_yaml(name: &str, jobs: usize) -> String {
    let ns: Vec<String> = (1..=jobs).map(|n| n.to_string()).collect();
    format!(
        "name: {name}\nmodels: [{{name: m, path: m.gguf}}]\nmethods: [deepest]\nn: [{}]\nbaseline: false\n",
        ns.join(", ")
    )
}

/// The same cycle against the store, without gRPC.
async fn bench_store(label: &str, store: Arc<dyn JobStore>, jobs: usize, clients: usize) {
    let spec = SweepSpec::parse(&sweep_yaml("bench-store", jobs), "bench").expect("sweep");
    store.submit(&spec, &spec.expand(), now_ms()).await.expect("submit");
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let worker = format!("w{i}");
                let held = vec!["m.gguf".to_string()];
                let mut cycles = 0usize;
                while let Some(l) = store.lease_next(&worker, &held, 60_000, now_ms()).await.expect("lease") {
                    let c = Completion {
                        worker_id: worker.clone(),
                        job_id: l.job.id,
                        lease_id: l.lease_id,
                        results: vec![ResultValue { task: "c4-loss".into(), metric: "loss".into(), value: 3.0 }],
                        ..Default::default()
                    };
                    store.complete(&c, now_ms()).await.expect("complete");
                    cycles += 1;
                }
                cycles
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client");
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, jobs);
    println!("{label:<9} store, one call per transaction: {:.0} cycles/s ({secs:.2} s)", jobs as f64 / secs);
}

async fn bench(label: &str, store: Arc<dyn JobStore>, jobs: usize, clients: usize) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(prunesweep_coordinator::run(listener, store, Config::default(), async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_str(&url).expect("url").connect().await.expect("connect");
    let yaml = sweep_yaml("bench", jobs);
    let t = Instant::now();
    let reply = SweepServiceClient::new(channel.clone())
        .submit_sweep(pb::SubmitSweepRequest { yaml, file_name: None })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(reply.jobs_added as usize, jobs);
    let submit_s = t.elapsed().as_secs_f64();

    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        channels.push(tonic::transport::Endpoint::from_str(&url).expect("url").connect().await.expect("connect"));
    }
    let t = Instant::now();
    let tasks: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(i, channel)| {
            tokio::spawn(async move {
                let mut w = WorkerServiceClient::new(channel);
                let worker_id = common::register(&mut w, i).await;
                let mut cycles = 0usize;
                loop {
                    let req = pb::LeaseJobRequest {
                        worker_id: worker_id.clone(),
                        held_models: vec!["m.gguf".into()],
                        wait_ms: 0,
                        free_memory_bytes: None,
                        report_unfinished: false,
                    };
                    let Some(lease) = w.lease_job(req).await.expect("lease").into_inner().lease else {
                        return cycles;
                    };
                    let job_id = lease.job.expect("job").job_id;
                    w.complete_job(pb::CompleteJobRequest {
                        worker_id: worker_id.clone(),
                        lease_id: lease.lease_id,
                        job_id,
                        results: vec![pb::ResultRow { task: "c4-loss".into(), metric: "loss".into(), value: 3.0 }],
                        ..Default::default()
                    })
                    .await
                    .expect("complete");
                    cycles += 1;
                }
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client");
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, jobs);
    println!(
        "{label:<9} over gRPC: {:.0} cycles/s ({jobs} lease+complete cycles, {clients} clients, {secs:.2} s; submit {submit_s:.2} s)",
        jobs as f64 / secs
    );
    let _ = stop.send(());
    server.await.expect("server").expect("server ran");
}

fn main() {
    let jobs = env("JOBS", 5000);
    let clients = env("CLIENTS", 64);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = common::sqlite(dir.path()).await;
        bench("sqlite", store.clone(), jobs, clients).await;
        bench_store("sqlite", store, jobs, clients).await;

        let (store, schema) = common::postgres("ps_bench").await;
        bench("postgres", store.clone(), jobs, clients).await;
        bench_store("postgres", store, jobs, clients).await;
        schema.drop().await;
    });
}

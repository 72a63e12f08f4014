//! End to end over gRPC: a real coordinator on 127.0.0.1:0 and the generated clients acting as
//! fake workers, on SQLite and on Postgres (each test runs once per backend).

#[macro_use]
mod common;

use std::time::Duration;

use prunesweep_coordinator::export::{self, Format};
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
    pb::SubmitSweepRequest { yaml: yaml.to_string(), file_name: Some("tiny.yaml".into()) }
}

async fn register(w: &mut WorkerServiceClient<Channel>, name: &str) -> String {
    let req = pb::RegisterRequest {
        name: name.into(),
        device: "cpu".into(),
        memory_bytes: Some(1 << 30),
        version: "test".into(),
    };
    w.register(req).await.unwrap().into_inner().worker_id
}

fn lease_req(worker_id: &str, wait_ms: u64) -> pb::LeaseJobRequest {
    pb::LeaseJobRequest {
        worker_id: worker_id.into(),
        held_models: vec!["worker/tests/fixtures/tiny-llama".into()],
        wait_ms,
        free_memory_bytes: Some(3 << 30),
        report_unfinished: false,
    }
}

/// What a fake worker reports for a job: distances for score jobs, a loss for the others.
fn complete_req(worker_id: &str, lease: &pb::Lease) -> pb::CompleteJobRequest {
    let job = lease.job.as_ref().unwrap();
    let num_layers = 4u32;
    let mut req = pb::CompleteJobRequest {
        worker_id: worker_id.into(),
        lease_id: lease.lease_id.clone(),
        job_id: job.job_id,
        num_layers: Some(num_layers),
        timings: vec![pb::PhaseTiming { phase: "eval".into(), seconds: 0.5, peak_host_bytes: Some(3 << 30) }],
        ..Default::default()
    };
    match job.kind() {
        pb::JobKind::Score => {
            req.distances = (1..num_layers)
                .flat_map(|n| (0..=num_layers - n).map(move |l| (n, l)))
                .map(|(n, l)| pb::Distance {
                    metric: pb::DistanceMetric::Angular as i32,
                    n,
                    l,
                    value: 0.1 * f64::from(n + l),
                })
                .collect();
        }
        pb::JobKind::Baseline | pb::JobKind::Cell => {
            let n = match job.amount {
                Some(pb::job_spec::Amount::Fraction(f)) => (f * f64::from(num_layers)).round() as u32,
                Some(pb::job_spec::Amount::N(n)) => n,
                None => 0,
            };
            req.layers_dropped = (1..=n).collect();
            req.results =
                vec![pb::ResultRow { task: "c4-loss".into(), metric: "loss".into(), value: 3.0 + f64::from(n) }];
        }
        pb::JobKind::Unspecified => panic!("unspecified job kind"),
    }
    req
}

/// Lease, heartbeat and complete until the sweep is done; returns the jobs this worker ran.
async fn fake_worker(url: String, name: &str) -> Vec<pb::JobSpec> {
    let (mut sweeps, mut w) = clients(&url).await;
    let id = register(&mut w, name).await;
    let mut ran = Vec::new();
    loop {
        let reply = w.lease_job(lease_req(&id, 300)).await.unwrap().into_inner();
        let Some(lease) = reply.lease else {
            let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
            if status.blocked + status.pending + status.leased == 0 {
                return ran;
            }
            continue;
        };
        let job = lease.job.clone().unwrap();
        if job.method() == pb::PruneMethod::Angular {
            assert!(!job.distances.is_empty(), "an angular cell runs after its score job, with its distances");
        }
        let hb = pb::HeartbeatRequest {
            tokens_per_second: None,
            worker_id: id.clone(),
            lease_id: lease.lease_id.clone(),
            job_id: job.job_id,
            phase: Some("eval".into()),
            progress: Some(0.5),
        };
        assert_eq!(w.heartbeat(hb).await.unwrap().into_inner().action(), pb::HeartbeatAction::Continue);
        w.complete_job(complete_req(&id, &lease)).await.unwrap();
        ran.push(job);
    }
}

async fn two_workers_finish_the_sweep(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, _) = clients(&url).await;
    let reply = sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap().into_inner();
    assert!(reply.created);
    assert_eq!((reply.jobs_added, reply.jobs_total), (6, 6));

    let mut watch =
        sweeps.watch_sweep(pb::WatchSweepRequest { sweep: "tiny".into(), after_seq: 0 }).await.unwrap().into_inner();
    let watcher = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = watch.message().await.unwrap() {
            events.push(e);
        }
        events
    });
    let (a, b) = tokio::join!(fake_worker(url.clone(), "w1"), fake_worker(url.clone(), "w2"));
    assert_eq!(a.len() + b.len(), 6);
    let events = tokio::time::timeout(Duration::from_secs(10), watcher).await.unwrap().unwrap();
    assert_eq!(events.iter().filter(|e| e.state() == pb::JobState::Succeeded).count(), 6);
    assert_eq!(events.last().unwrap().status.as_ref().unwrap().succeeded, 6);

    let again = sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!((again.jobs_added, again.jobs_total), (0, 6), "resubmitting adds nothing");

    let results = sweeps
        .list_results(pb::ListResultsRequest { sweep: "tiny".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let rows = export::rows_from_pb("tiny", &results.jobs);
    assert_eq!(rows.len(), 5, "baseline + 2 methods x 2 fractions, one metric each");
    let baseline: Vec<_> = rows.iter().filter(|r| r.kind == "baseline").collect();
    assert_eq!(baseline.len(), 1);
    assert_eq!(
        (baseline[0].method.as_str(), baseline[0].fraction, baseline[0].n_dropped),
        ("none", Some(0.0), Some(0))
    );
    for r in rows.iter().filter(|r| r.kind == "cell") {
        let n = (r.fraction.unwrap() * 4.0).round() as u32;
        assert_eq!(r.n_dropped, Some(n));
        assert_eq!(r.fraction_dropped, Some(f64::from(n) / 4.0));
        assert_eq!(r.value, 3.0 + f64::from(n));
        assert_eq!((r.heal.as_str(), r.task.as_str(), r.metric.as_str()), ("none", "c4-loss", "loss"));
        assert_eq!(r.seconds, Some(0.5));
        assert_eq!(r.peak_host_bytes, Some(3 << 30), "the phases' peak memory, through the store");
    }
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("tiny.csv");
    export::write(&rows, Format::Csv, &csv).unwrap();
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 6);
    export::write(&rows, Format::Parquet, &dir.path().join("tiny.parquet")).unwrap();
    server.shutdown().await;
}

async fn cancel_stops_leasing(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut w) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let id = register(&mut w, "w1").await;
    let lease = w.lease_job(lease_req(&id, 0)).await.unwrap().into_inner().lease.unwrap();
    let job_id = lease.job.as_ref().unwrap().job_id;
    let cancelled = sweeps.cancel_sweep(pb::CancelSweepRequest { sweep: "tiny".into() }).await.unwrap();
    assert_eq!(cancelled.into_inner().jobs_cancelled, 6);
    let hb = pb::HeartbeatRequest {
        tokens_per_second: None,
        worker_id: id.clone(),
        lease_id: lease.lease_id.clone(),
        job_id,
        phase: None,
        progress: None,
    };
    assert_eq!(w.heartbeat(hb).await.unwrap().into_inner().action(), pb::HeartbeatAction::Cancel);
    assert!(w.lease_job(lease_req(&id, 200)).await.unwrap().into_inner().lease.is_none());
    // A batch worker that asks learns nothing is left (the sweep is cancelled); one that does not
    // ask gets no count (its poll costs none).
    let batch = pb::LeaseJobRequest { report_unfinished: true, ..lease_req(&id, 0) };
    assert_eq!(w.lease_job(batch).await.unwrap().into_inner().unfinished_jobs, Some(0));
    assert_eq!(w.lease_job(lease_req(&id, 0)).await.unwrap().into_inner().unfinished_jobs, None);
    let err = w.complete_job(complete_req(&id, &lease)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.cancelled), (pb::SweepState::Cancelled, 6));
    server.shutdown().await;
}

async fn silent_worker_loses_its_job(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut w) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let silent = register(&mut w, "silent").await;
    let first = w.lease_job(lease_req(&silent, 0)).await.unwrap().into_inner().lease.unwrap();
    assert_eq!(first.attempt, 1);
    // Drain the other runnable jobs so that the next lease can only be the reclaimed one.
    let other = register(&mut w, "other").await;
    while w.lease_job(lease_req(&other, 0)).await.unwrap().into_inner().lease.is_some() {}
    let started = std::time::Instant::now();
    let second = w.lease_job(lease_req(&other, 2_000)).await.unwrap().into_inner().lease;
    let second = second.expect("the silent worker's job is leased again after its lease expires");
    assert_eq!(second.job.as_ref().unwrap().job_id, first.job.as_ref().unwrap().job_id);
    assert_eq!(second.attempt, 2);
    assert!(started.elapsed() < Duration::from_millis(1_900), "the reaper woke the long poll");
    let err = w.complete_job(complete_req(&silent, &first)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a stale lease cannot complete: {err}");
    let hb = pb::HeartbeatRequest {
        tokens_per_second: None,
        worker_id: silent.clone(),
        lease_id: first.lease_id.clone(),
        job_id: first.job.as_ref().unwrap().job_id,
        phase: None,
        progress: None,
    };
    assert_eq!(w.heartbeat(hb).await.unwrap().into_inner().action(), pb::HeartbeatAction::Lost);
    w.complete_job(complete_req(&other, &second)).await.unwrap();
    server.shutdown().await;
}

async fn get_sweep_shows_running_jobs_and_list_workers_their_holders(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut w) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let busy = register(&mut w, "busy").await;
    let idle = register(&mut w, "idle").await;
    let lease = w.lease_job(lease_req(&busy, 0)).await.unwrap().into_inner().lease.unwrap();
    let job_id = lease.job.as_ref().unwrap().job_id;
    let hb = pb::HeartbeatRequest {
        tokens_per_second: None,
        worker_id: busy.clone(),
        lease_id: lease.lease_id.clone(),
        job_id,
        phase: Some("score".into()),
        progress: Some(1.5),
    };
    let renewed = w.heartbeat(hb).await.unwrap().into_inner();
    assert_eq!(renewed.action(), pb::HeartbeatAction::Continue);
    let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
    assert_eq!(status.running.len(), 1);
    let r = &status.running[0];
    assert_eq!((r.job_id, r.kind(), r.worker_id.as_str()), (job_id, pb::JobKind::Score, busy.as_str()));
    assert_eq!((r.worker_name.as_deref(), r.phase.as_deref()), (Some("busy"), Some("score")));
    assert_eq!(r.progress, Some(1.0), "progress past 1 (rounding) is shown as done");
    assert!(r.heartbeat_at_ms.is_some());
    assert_eq!(r.lease_expires_at_ms, renewed.expires_at_ms);
    let list = sweeps.list_sweeps(pb::ListSweepsRequest {}).await.unwrap().into_inner();
    assert!(list.sweeps[0].running.is_empty(), "only GetSweep lists running jobs");
    let workers = sweeps.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 2);
    let find = |id: &str| workers.iter().find(|x| x.worker_id == id).unwrap();
    assert_eq!((find(&busy).job_id, find(&busy).sweep.as_deref()), (Some(job_id), Some("tiny")));
    assert_eq!((find(&busy).name.as_str(), find(&busy).device.as_str()), ("busy", "cpu"));
    assert_eq!(find(&busy).memory_bytes, Some(1 << 30));
    assert_eq!(find(&busy).free_memory_bytes, Some(3 << 30), "as its last LeaseJob reported");
    assert_eq!(find(&idle).free_memory_bytes, None, "never leased");
    assert!(find(&busy).last_seen_ms >= find(&busy).registered_at_ms);
    assert_eq!(find(&idle).job_id, None);
    w.complete_job(complete_req(&busy, &lease)).await.unwrap();
    let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
    assert!(status.running.is_empty());
    server.shutdown().await;
}

async fn bad_input_is_rejected_clearly(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, mut w) = clients(&url).await;
    let cases = [
        ("name: x\nmodels: [unclosed\n".to_string(), "line"),
        (common::TINY.replace("[angular, deepest]", "[angular, shallowest]"), "shallowest"),
        (common::TINY.replace("[0.25, 0.5]", "[0.25, 1.0]"), "`fractions` must be in [0, 1). Given: 1"),
        (common::TINY.to_string() + "retries: 3\n", "retries"),
    ];
    for (yaml, needle) in cases {
        let err = sweeps.submit_sweep(submit_req(&yaml)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
        assert!(err.message().contains("tiny.yaml"), "{}", err.message());
    }
    let list = sweeps.list_sweeps(pb::ListSweepsRequest {}).await.unwrap().into_inner();
    assert!(list.sweeps.is_empty(), "nothing half-stored");
    let err = sweeps.get_sweep(pb::GetSweepRequest { sweep: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = w.lease_job(lease_req("", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Leases go to registered workers only (a made-up id learns nothing about the jobs).
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let err = w.lease_job(lease_req("made-up-worker", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(err.message().contains("call Register first"), "{}", err.message());
    let id = register(&mut w, "real").await;
    assert!(w.lease_job(lease_req(&id, 0)).await.unwrap().into_inner().lease.is_some());
    server.shutdown().await;
}

async fn concurrent_submits_make_one_sweep(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut a, _) = clients(&url).await;
    let (mut b, _) = clients(&url).await;
    let (ra, rb) = tokio::join!(a.submit_sweep(submit_req(common::TINY)), b.submit_sweep(submit_req(common::TINY)));
    let (ra, rb) = (ra.unwrap().into_inner(), rb.unwrap().into_inner());
    assert!(ra.created ^ rb.created, "exactly one submit created the sweep");
    assert_eq!(ra.jobs_added + rb.jobs_added, 6);
    let list = a.list_sweeps(pb::ListSweepsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.sweeps.len(), 1);
    let s = &list.sweeps[0];
    assert_eq!(s.blocked + s.pending + s.leased + s.succeeded + s.failed + s.cancelled, 6);
    server.shutdown().await;
}

/// An open `WatchSweep` stream (a sweep still running) does not hold a shutdown open: it ends
/// with UNAVAILABLE naming where to resume, and the server stops within a second.
async fn shutdown_ends_open_watch_streams(store: &TestStore) {
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, _) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let mut watch =
        sweeps.watch_sweep(pb::WatchSweepRequest { sweep: "tiny".into(), after_seq: 0 }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().expect("the submit's events");
    assert!(first.seq > 0);
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await.expect("shutdown waited for the stream");
    assert!(t0.elapsed() < Duration::from_secs(1), "shutdown took {:?}", t0.elapsed());
    let end = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = end.expect_err("the stream ends with a status, not silently");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down; watch again from after_seq"), "{status:?}");
}

/// `coordinator status --watch` (the binary) follows a sweep through a coordinator restart: it
/// asks again from the last event it received, and exits 0 with the final counts once the
/// sweep is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_follows_the_sweep_through_a_restart() {
    let store = common::sqlite().await;
    let (url, server) = common::start_server(store.store.clone(), common::fast_config()).await;
    let (mut sweeps, _) = clients(&url).await;
    sweeps.submit_sweep(submit_req(common::TINY)).await.unwrap();
    let watch = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["status", "tiny", "--watch", "--coordinator", &url])
        .env_remove("PRUNESWEEP_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The watch is open well within this (a process start and one local connection).
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.shutdown().await;
    tokio::time::sleep(Duration::from_secs(2)).await; // refused at least once
    let addr = url.trim_start_matches("http://");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("the old coordinator's address");
    let (_, server) = common::start_server_on(listener, store.store.clone(), common::fast_config());
    fake_worker(url.clone(), "w1").await;
    let out = tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(|| watch.wait_with_output()))
        .await
        .expect("the watch ends once the sweep is done")
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status --watch failed: {stderr}");
    assert!(stderr.contains("the coordinator is unavailable"), "{stderr}");
    assert!(stderr.contains("the coordinator is back; following tiny from event"), "{stderr}");
    assert!(stderr.contains("tiny: 6 of 6 jobs finished (succeeded 6, failed 0, cancelled 0)"), "{stderr}");
    server.shutdown().await;
    store.cleanup().await;
}

both_backends!(
    shutdown_ends_open_watch_streams,
    two_workers_finish_the_sweep,
    cancel_stops_leasing,
    silent_worker_loses_its_job,
    get_sweep_shows_running_jobs_and_list_workers_their_holders,
    bad_input_is_rejected_clearly,
    concurrent_submits_make_one_sweep,
);

//! The `JobStore` suite, run against both backends: every test below runs once on a fresh SQLite
//! file and once on a fresh Postgres schema. Time is passed in explicitly, so lease expiry needs no
//! sleeping.

mod common;

use std::collections::HashSet;

use prunesweep_coordinator::job::{JobKind, JobState, SweepState};
use prunesweep_coordinator::store::{
    Completion, DistanceRow, Failure, Heartbeat, HeartbeatOutcome, JobStore, LeaseRequest, LeasedJob, ResultValue,
    StoreError, WorkerInfo,
};
use prunesweep_coordinator::sweep::SweepSpec;
use prunesweep_proto::v1::PruneMethod as Method;

const T0: i64 = 1_000_000;
const TTL: i64 = 1_000;

fn tiny() -> SweepSpec {
    SweepSpec::parse(common::TINY, "tiny.yaml").unwrap()
}

async fn submit(store: &dyn JobStore, spec: &SweepSpec) -> prunesweep_coordinator::store::SubmitOutcome {
    store.submit(spec, &spec.expand(), T0).await.unwrap()
}

async fn lease(store: &dyn JobStore, worker: &str, now: i64) -> Option<LeasedJob> {
    store.lease_next(worker, &[], TTL, now).await.unwrap()
}

/// `worker`'s heartbeat for the job it leased.
fn beat(worker: &str, l: &LeasedJob, phase: Option<&str>, progress: Option<f64>) -> Heartbeat {
    Heartbeat {
        worker_id: worker.into(),
        lease_id: l.lease_id.clone(),
        job_id: l.job.id,
        phase: phase.map(str::to_string),
        progress,
        ttl_ms: TTL,
    }
}

fn done(l: &LeasedJob) -> Completion {
    let mut c = Completion {
        worker_id: l.job.worker_id.clone().expect("a leased job names its worker"),
        job_id: l.job.id,
        lease_id: l.lease_id.clone(),
        ..Default::default()
    };
    match l.job.kind {
        JobKind::Score => {
            c.distances = vec![
                DistanceRow { metric: "angular".into(), n: 1, l: 0, value: 0.3 },
                DistanceRow { metric: "angular".into(), n: 1, l: 1, value: 0.1 },
            ];
            c.num_layers = Some(4);
        }
        _ => {
            c.results = vec![ResultValue { task: "c4-loss".into(), metric: "loss".into(), value: 3.5 }];
            c.layers_dropped = vec![1];
            c.num_layers = Some(4);
        }
    }
    c
}

async fn submit_is_idempotent(store: &dyn JobStore) {
    let spec = tiny();
    let first = submit(store, &spec).await;
    assert!(first.created);
    assert_eq!((first.jobs_added, first.jobs_total), (6, 6));
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Pending), 4, "score, baseline, 2 deepest cells");
    assert_eq!(counts.count(JobState::Blocked), 2, "2 angular cells wait for the score job");
    let again = submit(store, &spec).await;
    assert!(!again.created);
    assert_eq!((again.jobs_added, again.jobs_total), (0, 6));
    let extended = SweepSpec::parse(&common::TINY.replace("[0.25, 0.5]", "[0.25, 0.5, 0.125]"), "x").unwrap();
    let ext = submit(store, &extended).await;
    assert_eq!((ext.jobs_added, ext.jobs_total), (2, 8));
    assert_eq!(store.sweeps().await.unwrap().len(), 1);
}

/// 2,602 jobs: written in three transactions of up to 1,000, the same as one.
async fn a_big_submit_is_written_in_chunks(store: &dyn JobStore) {
    let n: Vec<String> = (1..=1300).map(|n| n.to_string()).collect();
    let big = common::TINY.replace("fractions: [0.25, 0.5]", &format!("n: [{}]", n.join(", ")));
    let spec = SweepSpec::parse(&big, "big.yaml").unwrap();
    let out = submit(store, &spec).await;
    assert!(out.created);
    assert_eq!((out.jobs_added, out.jobs_total), (2602, 2602));
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Blocked), 1300, "every angular cell waits for the score job");
    assert_eq!(counts.count(JobState::Pending), 1302, "score, baseline, deepest cells");
    let again = submit(store, &spec).await;
    assert_eq!((again.created, again.jobs_added, again.jobs_total), (false, 0, 2602));
    // The score job finishes: the cells of every chunk are released.
    let score = lease(store, "w", T0).await.unwrap();
    assert_eq!(score.job.kind, JobKind::Score);
    store.complete(&done(&score), T0 + 1).await.unwrap();
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!((counts.count(JobState::Blocked), counts.count(JobState::Pending)), (0, 2601));
    // An extension after the score job finished: its new cells are runnable at once.
    let wider = SweepSpec::parse(&big.replace(", 1300]", ", 1300, 1301]"), "big.yaml").unwrap();
    let out = submit(store, &wider).await;
    assert_eq!((out.jobs_added, out.jobs_total), (2, 2604));
    assert_eq!(store.sweep("tiny").await.unwrap().count(JobState::Blocked), 0);
}

async fn leases_follow_dependencies(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let mut leased = Vec::new();
    while let Some(l) = lease(store, "w1", T0).await {
        leased.push(l);
    }
    assert_eq!(leased.len(), 4);
    assert_eq!(leased[0].job.kind, JobKind::Score, "the score job goes first");
    assert!(leased.iter().all(|l| l.job.spec.method != Some(Method::Angular)));
    for l in &leased {
        store.complete(&done(l), T0 + 10).await.unwrap();
    }
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Pending), 2, "the score job unblocked the angular cells");
    let angular = lease(store, "w1", T0 + 20).await.unwrap();
    assert_eq!(angular.job.spec.method, Some(Method::Angular));
    assert_eq!(angular.distances.len(), 2, "cells get the score job's distance table");
    assert_eq!(angular.distances[1].value, 0.1);
    store.complete(&done(&angular), T0 + 30).await.unwrap();
    let last = lease(store, "w1", T0 + 40).await.unwrap();
    store.complete(&done(&last), T0 + 50).await.unwrap();
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Succeeded), 6);
    assert!(counts.is_done());
    let results = store.results("tiny").await.unwrap();
    assert_eq!(results.len(), 6);
    assert_eq!(results.iter().filter(|r| r.results.len() == 1).count(), 5, "baseline + 4 cells have a loss");
    assert_eq!(results.iter().find(|r| r.job.kind == JobKind::Cell).unwrap().job.layers_dropped, vec![1]);
    let events = store.events("tiny", 0, 1000).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.state == JobState::Succeeded).count(), 6);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
}

async fn affinity_prefers_held_models(store: &dyn JobStore) {
    let yaml = "name: two\nmodels:\n  - {name: a, path: a.gguf}\n  - {name: b, path: b.gguf}\n\
                methods: [deepest]\nn: [1, 2]\nbaseline: false\n";
    let spec = SweepSpec::parse(yaml, "two.yaml").unwrap();
    submit(store, &spec).await;
    let held = vec!["b.gguf".to_string()];
    let l = store.lease_next("w", &held, TTL, T0).await.unwrap().unwrap();
    assert_eq!(l.job.spec.model.source, "b.gguf");
    let l = store.lease_next("w", &held, TTL, T0).await.unwrap().unwrap();
    assert_eq!(l.job.spec.model.source, "b.gguf");
    let l = store.lease_next("w", &held, TTL, T0).await.unwrap().unwrap();
    assert_eq!(l.job.spec.model.source, "a.gguf", "falls back to other models");
}

async fn expired_leases_are_reclaimed_until_max_attempts(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let score = lease(store, "w1", T0).await.unwrap();
    assert_eq!(score.job.kind, JobKind::Score);
    let hb = store.heartbeat(&beat("w1", &score, Some("score"), None), T0 + 800).await.unwrap();
    assert_eq!(hb, HeartbeatOutcome::Renewed(T0 + 800 + TTL));
    assert_eq!(store.reclaim_expired(T0 + 1500).await.unwrap(), 0, "the heartbeat renewed the lease");
    assert_eq!(store.reclaim_expired(T0 + 1801).await.unwrap(), 1);
    let job = store.job(score.job.id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Pending, 1));
    assert!(job.error.unwrap().contains("expired"));
    // Attempt 2 (of max_attempts = 2) also expires: the job fails and so do its dependents.
    let again = lease(store, "w2", T0 + 2000).await.unwrap();
    assert_eq!(again.job.id, score.job.id);
    assert_eq!(store.reclaim_expired(T0 + 3001).await.unwrap(), 1);
    let job = store.job(score.job.id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Failed, 2));
    assert_eq!(job.error_kind.as_deref(), Some("lease_expired"));
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Failed), 3, "the score job and its 2 angular cells");
    // Retry requeues the score job and re-blocks its cells behind it.
    assert_eq!(store.retry("tiny", false, T0 + 4000).await.unwrap(), 3);
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Blocked), 2);
    assert_eq!(counts.count(JobState::Failed), 0);
    assert_eq!(store.job(score.job.id).await.unwrap().attempts, 0);
}

/// A lease is its worker's: another worker presenting it (a bug, or a forged call) can neither
/// renew, complete nor fail the job, and nothing about the job changes.
async fn only_the_leasing_worker_can_use_its_lease(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let l = lease(store, "w1", T0).await.unwrap();
    let mut forged = done(&l);
    forged.worker_id = "w2".into();
    let err = store.complete(&forged, T0 + 1).await.unwrap_err();
    assert!(matches!(err, StoreError::NotYourLease { .. }), "{err}");
    let fail = Failure {
        worker_id: "w2".into(),
        job_id: l.job.id,
        lease_id: l.lease_id.clone(),
        message: "forged".into(),
        error_kind: "x".into(),
        retryable: false,
    };
    assert!(matches!(store.fail(&fail, T0 + 1).await.unwrap_err(), StoreError::NotYourLease { .. }));
    assert_eq!(store.heartbeat(&beat("w2", &l, None, None), T0 + 2).await.unwrap(), HeartbeatOutcome::Lost);
    let job = store.job(l.job.id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Leased, 0), "the job is untouched");
    assert_eq!(
        store.heartbeat(&beat("w1", &l, None, None), T0 + 3).await.unwrap(),
        HeartbeatOutcome::Renewed(T0 + 3 + TTL)
    );
    store.complete(&done(&l), T0 + 4).await.unwrap();
}

async fn stale_lease_cannot_complete(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let old = lease(store, "w1", T0).await.unwrap();
    store.reclaim_expired(T0 + TTL + 1).await.unwrap();
    let new = lease(store, "w2", T0 + TTL + 2).await.unwrap();
    assert_eq!(new.job.id, old.job.id);
    assert_ne!(new.lease_id, old.lease_id);
    let err = store.complete(&done(&old), T0 + TTL + 3).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleLease { .. }), "{err}");
    let fail = Failure {
        worker_id: "w1".into(),
        job_id: old.job.id,
        lease_id: old.lease_id.clone(),
        message: "late".into(),
        error_kind: "x".into(),
        retryable: true,
    };
    assert!(matches!(store.fail(&fail, T0 + TTL + 3).await.unwrap_err(), StoreError::StaleLease { .. }));
    let hb = store.heartbeat(&beat("w1", &old, None, None), T0 + TTL + 4).await.unwrap();
    assert_eq!(hb, HeartbeatOutcome::Lost);
    store.complete(&done(&new), T0 + TTL + 5).await.unwrap();
    assert_eq!(store.job(new.job.id).await.unwrap().state, JobState::Succeeded);
    assert!(matches!(store.complete(&done(&new), T0 + TTL + 6).await.unwrap_err(), StoreError::StaleLease { .. }));
}

/// A worker that finishes while its lease has expired (the coordinator was down, or its
/// heartbeats did not get through) still delivers, as long as nobody leased the job again: the
/// result is kept, the attempt the expiry charged is given back, and the score job's cells unblock.
async fn a_completion_after_expiry_is_kept_until_the_job_is_leased_again(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let score = lease(store, "w1", T0).await.unwrap();
    assert_eq!(store.reclaim_expired(T0 + TTL + 1).await.unwrap(), 1);
    assert_eq!(store.job(score.job.id).await.unwrap().attempts, 1);
    store.complete(&done(&score), T0 + TTL + 2).await.unwrap();
    let job = store.job(score.job.id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 0), "no attempt charged");
    assert_eq!(store.sweep("tiny").await.unwrap().count(JobState::Blocked), 0, "its cells are runnable");
    // The same report again is stale (and a lease taken in between makes it stale too:
    // `stale_lease_cannot_complete`).
    assert!(matches!(store.complete(&done(&score), T0 + TTL + 3).await.unwrap_err(), StoreError::StaleLease { .. }));
}

async fn failures_retry_or_stop(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let l = lease(store, "w1", T0).await.unwrap();
    let fail = |l: &LeasedJob, retryable| Failure {
        worker_id: "w1".into(),
        job_id: l.job.id,
        lease_id: l.lease_id.clone(),
        message: "CUDA out of memory".into(),
        error_kind: "oom".into(),
        retryable,
    };
    assert_eq!(store.fail(&fail(&l, true), T0 + 1).await.unwrap(), JobState::Pending);
    let l2 = lease(store, "w1", T0 + 2).await.unwrap();
    assert_eq!(l2.job.id, l.job.id);
    let mut missing = fail(&l2, false);
    missing.message = "model path worker/tests/fixtures/nope does not exist".into();
    missing.error_kind = "model_load".into();
    assert_eq!(store.fail(&missing, T0 + 3).await.unwrap(), JobState::Failed);
    let job = store.job(l.job.id).await.unwrap();
    assert_eq!(job.error.as_deref(), Some("model path worker/tests/fixtures/nope does not exist"));
    assert_eq!(job.error_kind.as_deref(), Some("model_load"));
    let results = store.results("tiny").await.unwrap();
    let dependents: Vec<_> = results.iter().filter(|r| r.job.depends_on == Some(l.job.id)).collect();
    assert_eq!(dependents.len(), 2);
    for d in dependents {
        assert_eq!(d.job.state, JobState::Failed);
        assert!(d.job.error.as_deref().unwrap().contains("does not exist"));
    }
}

async fn cancel_stops_leasing_and_tells_workers(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let running = lease(store, "w1", T0).await.unwrap();
    assert_eq!(store.cancel("tiny", T0 + 1).await.unwrap(), 6);
    assert!(lease(store, "w2", T0 + 2).await.is_none());
    let hb = store.heartbeat(&beat("w1", &running, None, None), T0 + 3).await.unwrap();
    assert_eq!(hb, HeartbeatOutcome::Cancelled);
    assert!(matches!(store.complete(&done(&running), T0 + 4).await.unwrap_err(), StoreError::StaleLease { .. }));
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Cancelled), 6);
    assert_eq!(counts.state, SweepState::Cancelled);
    // Resubmitting a cancelled sweep adds nothing runnable; retry reopens it.
    submit(store, &tiny()).await;
    assert!(lease(store, "w2", T0 + 5).await.is_none());
    assert_eq!(store.retry("tiny", true, T0 + 6).await.unwrap(), 6);
    assert!(lease(store, "w2", T0 + 7).await.is_some());
    assert!(matches!(store.cancel("nope", T0).await.unwrap_err(), StoreError::SweepNotFound(_)));
}

/// The cells of a sweep: the jobs that wait for the score job (and the deepest ones that do not).
async fn cells(store: &dyn JobStore, sweep: &str) -> Vec<JobState> {
    let results = store.results(sweep).await.unwrap();
    results.iter().filter(|r| r.job.kind == JobKind::Cell).map(|r| r.job.state).collect()
}

async fn a_cancelled_score_job_cannot_requeue_its_cells(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let score = lease(store, "w1", T0).await.unwrap();
    assert_eq!(score.job.kind, JobKind::Score);
    assert_eq!(store.cancel("tiny", T0 + 1).await.unwrap(), 6);
    // The worker finishes before it hears of the cancel, and reports with its lease.
    let err = store.complete(&done(&score), T0 + 2).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleLease { .. }), "{err}");
    let outcomes = store.complete_batch(&[done(&score)], T0 + 3).await.unwrap();
    assert!(matches!(outcomes[0], Err(StoreError::StaleLease { .. })), "{:?}", outcomes[0]);
    assert_eq!(cells(store, "tiny").await, [JobState::Cancelled; 4]);
    let counts = store.sweep("tiny").await.unwrap();
    assert_eq!(counts.count(JobState::Cancelled), 6);
    assert!(counts.is_done());
    assert!(lease(store, "w2", T0 + 4).await.is_none());
    assert!(store.job(score.job.id).await.unwrap().layers_dropped.is_empty(), "nothing of the report is kept");
}

async fn a_cancel_racing_a_score_completion_leaves_no_cell_runnable(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let score = lease(store, "w1", T0).await.unwrap();
    let completion = done(&score);
    let (cancelled, completed) = tokio::join!(store.cancel("tiny", T0 + 1), store.complete(&completion, T0 + 1));
    let cancelled = cancelled.unwrap();
    // Either order is fine; what matters is that the cancel, whenever it lands, has the last word.
    match completed {
        Ok(()) => assert_eq!(cancelled, 5, "the score job finished first; the rest were cancelled"),
        Err(StoreError::StaleLease { .. }) => assert_eq!(cancelled, 6, "the cancel came first"),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(cells(store, "tiny").await, [JobState::Cancelled; 4]);
    assert!(store.sweep("tiny").await.unwrap().is_done());
    assert!(lease(store, "w2", T0 + 2).await.is_none());
}

async fn heartbeats_show_where_running_jobs_are(store: &dyn JobStore) {
    submit(store, &tiny()).await;
    let info = |name: &str| WorkerInfo {
        name: name.into(),
        device: "cuda:0".into(),
        memory_bytes: Some(80 << 30),
        version: "0.1.0".into(),
    };
    let busy = store.register_worker(&info("busy"), T0).await.unwrap();
    let idle = store.register_worker(&info("idle"), T0 + 1).await.unwrap();
    let score = lease(store, &busy, T0 + 10).await.unwrap();
    let running = store.running("tiny").await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!((running[0].phase.as_deref(), running[0].progress, running[0].heartbeat_at), (None, None, None));
    let hb = store.heartbeat(&beat(&busy, &score, Some("score"), Some(0.25)), T0 + 100).await.unwrap();
    assert_eq!(hb, HeartbeatOutcome::Renewed(T0 + 100 + TTL));
    // A heartbeat without a phase keeps the last one.
    store.heartbeat(&beat(&busy, &score, None, Some(0.5)), T0 + 200).await.unwrap();
    let running = store.running("tiny").await.unwrap();
    assert_eq!(running.len(), 1);
    let r = &running[0];
    assert_eq!((r.job_id, r.kind), (score.job.id, JobKind::Score));
    assert_eq!((r.worker_id.as_deref(), r.worker_name.as_deref()), (Some(busy.as_str()), Some("busy")));
    assert_eq!((r.phase.as_deref(), r.progress), (Some("score"), Some(0.5)));
    assert_eq!((r.heartbeat_at, r.lease_expires_at), (Some(T0 + 200), T0 + 200 + TTL));
    let workers = store.workers().await.unwrap();
    let names: Vec<&str> = workers.iter().map(|w| w.info.name.as_str()).collect();
    assert_eq!(names, ["busy", "idle"], "most recently seen first");
    assert_eq!((workers[0].id.as_str(), workers[0].last_seen, workers[0].registered_at), (busy.as_str(), T0 + 200, T0));
    assert_eq!((workers[0].job_id, workers[0].sweep.as_deref()), (Some(score.job.id), Some("tiny")));
    assert_eq!((workers[1].id.as_str(), workers[1].last_seen, workers[1].job_id), (idle.as_str(), T0 + 1, None));
    assert_eq!(workers[1].info, info("idle"));
    store.complete(&done(&score), T0 + 300).await.unwrap();
    assert!(store.running("tiny").await.unwrap().is_empty());
    assert_eq!(store.workers().await.unwrap()[0].job_id, None, "a finished job is nobody's");
    assert!(matches!(store.running("nope").await.unwrap_err(), StoreError::SweepNotFound(_)));
}

async fn concurrent_submits_make_one_sweep(store: &dyn JobStore) {
    let spec = tiny();
    let jobs = spec.expand();
    let (a, b, c) =
        tokio::join!(store.submit(&spec, &jobs, T0), store.submit(&spec, &jobs, T0), store.submit(&spec, &jobs, T0));
    let outs = [a.unwrap(), b.unwrap(), c.unwrap()];
    assert_eq!(outs.iter().filter(|o| o.created).count(), 1);
    assert_eq!(outs.iter().map(|o| o.jobs_added).sum::<u32>(), 6);
    assert_eq!(store.sweep("tiny").await.unwrap().total(), 6);
}

async fn concurrent_leases_never_share_a_job(store: &dyn JobStore) {
    let yaml = "name: many\nmodels: [{name: m, path: m.gguf}]\nmethods: [deepest]\n\
                n: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]\nbaseline: false\n";
    let spec = SweepSpec::parse(yaml, "many.yaml").unwrap();
    submit(store, &spec).await;
    let workers: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
    let leases = futures::future::join_all(workers.iter().map(|w| async move {
        let mut mine = Vec::new();
        while let Some(l) = store.lease_next(w, &[], TTL, T0).await.unwrap() {
            store.complete(&done(&l), T0 + 1).await.unwrap();
            mine.push(l.job.id);
        }
        mine
    }))
    .await;
    let all: Vec<i64> = leases.into_iter().flatten().collect();
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 20);
    assert_eq!(unique.len(), 20);
}

/// A reader that follows a sweep's events by sequence number, as `WatchSweep` does, sees every
/// event once, in order, while workers write them concurrently. (On Postgres two transactions can
/// take sequence numbers in one order and commit in the other: a follower that read the later
/// number first would pass the earlier one for good.)
async fn a_follower_of_the_events_misses_none(store: &dyn JobStore) {
    let n: Vec<String> = (1..=60).map(|i| i.to_string()).collect();
    let yaml = format!(
        "name: follow\nmodels: [{{name: m, path: m.gguf}}]\nmethods: [deepest]\nn: [{}]\nbaseline: false\n",
        n.join(", ")
    );
    submit(store, &SweepSpec::parse(&yaml, "follow.yaml").unwrap()).await;
    let finished = std::sync::atomic::AtomicBool::new(false);
    let workers = async {
        futures::future::join_all((0..8).map(|i| async move {
            let worker = format!("w{i}");
            while let Some(l) = store.lease_next(&worker, &[], TTL, T0).await.unwrap() {
                store.complete(&done(&l), T0 + 1).await.unwrap();
            }
        }))
        .await;
        finished.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let follower = async {
        let (mut seen, mut after) = (Vec::new(), 0);
        loop {
            // Read the flag first: once it is set, every event is written, and one more read
            // after it must bring the rest.
            let last_read = finished.load(std::sync::atomic::Ordering::SeqCst);
            let events = store.events("follow", after, 256).await.unwrap();
            if let Some(e) = events.last() {
                after = e.seq;
            }
            let caught_up = events.len() < 256;
            seen.extend(events.into_iter().map(|e| e.seq));
            if last_read && caught_up {
                return seen;
            }
            tokio::task::yield_now().await;
        }
    };
    let ((), seen) = tokio::join!(workers, follower);
    let all: Vec<i64> = store.events("follow", 0, 10_000).await.unwrap().into_iter().map(|e| e.seq).collect();
    assert_eq!(all.len(), 60 * 3, "each job's Pending, Leased and Succeeded");
    let missed: Vec<_> = all.iter().filter(|s| !seen.contains(s)).collect();
    assert!(missed.is_empty(), "the follower missed events {missed:?} of {}", all.len());
    assert_eq!(seen, all, "every event once, in sequence order");
}

async fn batches_answer_each_call_in_order(store: &dyn JobStore) {
    let yaml = "name: two\nmodels:\n  - {name: a, path: a.gguf}\n  - {name: b, path: b.gguf}\n\
                methods: [deepest]\nn: [1, 2]\nbaseline: false\n";
    submit(store, &SweepSpec::parse(yaml, "two.yaml").unwrap()).await;
    let ask = |worker: &str, held: &[&str]| LeaseRequest {
        worker_id: worker.into(),
        held_models: held.iter().map(|m| m.to_string()).collect(),
        ttl_ms: TTL,
        free_memory_bytes: None,
    };
    // Five requests, four jobs: affinity holds inside a batch, the fifth gets nothing.
    let requests =
        [ask("w1", &["b.gguf"]), ask("w2", &["b.gguf"]), ask("w3", &["b.gguf"]), ask("w4", &[]), ask("w5", &[])];
    let leases = store.lease_batch(&requests, T0).await.unwrap();
    assert_eq!(leases.len(), 5);
    let models: Vec<Option<&str>> =
        leases.iter().map(|l| l.as_ref().map(|l| l.job.spec.model.source.as_str())).collect();
    assert_eq!(models, [Some("b.gguf"), Some("b.gguf"), Some("a.gguf"), Some("a.gguf"), None]);
    let leases: Vec<LeasedJob> = leases.into_iter().flatten().collect();
    for (l, r) in leases.iter().zip(&requests) {
        assert_eq!(l.job.worker_id.as_deref(), Some(r.worker_id.as_str()));
        assert_eq!(l.expires_at, T0 + TTL);
    }
    // One completion with a stale lease among good ones fails alone and writes nothing of its own.
    let mut stale = done(&leases[1]);
    stale.lease_id = "not-the-lease".into();
    let mut repeated = done(&leases[2]);
    repeated.results.push(ResultValue { task: "c4-loss".into(), metric: "loss".into(), value: 4.5 });
    let batch = [done(&leases[0]), stale, repeated, done(&leases[3]), done(&leases[3])];
    let outcomes = store.complete_batch(&batch, T0 + 5).await.unwrap();
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok() && outcomes[3].is_ok());
    assert!(matches!(outcomes[1], Err(StoreError::StaleLease { .. })), "{:?}", outcomes[1]);
    assert!(matches!(outcomes[4], Err(StoreError::StaleLease { .. })), "a job completes once: {:?}", outcomes[4]);
    assert_eq!(store.job(leases[1].job.id).await.unwrap().state, JobState::Leased);
    let results = store.results("two").await.unwrap();
    let loss = |id: i64| results.iter().find(|r| r.job.id == id).unwrap().results.clone();
    assert!(loss(leases[1].job.id).is_empty());
    assert_eq!(loss(leases[2].job.id).len(), 1, "a repeated (task, metric) is stored once");
    assert_eq!(loss(leases[2].job.id)[0].value, 4.5, "the last value wins");
    let counts = store.sweep("two").await.unwrap();
    assert_eq!((counts.count(JobState::Succeeded), counts.count(JobState::Leased)), (3, 1));
    let events = store.events("two", 0, 100).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.state == JobState::Leased).count(), 4);
    assert_eq!(events.iter().filter(|e| e.state == JobState::Succeeded).count(), 3);
}

/// A sweep of three cells of a 70B-shaped model (~128 GiB predicted on a GPU, bf16) and three of
/// a tiny model, the big model's first in lease order.
const BIG_AND_SMALL: &str = "name: mem\nmodels:\n\
    - {name: big, path: big, shape: {layers: 80, hidden: 8192, intermediate: 28672, heads: 64, kv_heads: 8, \
       head_dim: 128, vocab: 32000}}\n\
    - {name: small, path: small, shape: {layers: 4, hidden: 64, intermediate: 128, heads: 4, kv_heads: 2, \
       head_dim: 16, vocab: 320}}\n\
    methods: [deepest]\nn: [1, 2, 3]\nbaseline: false\n";

async fn a_job_too_big_for_a_worker_waits_for_a_bigger_one(store: &dyn JobStore) {
    let spec = SweepSpec::parse(BIG_AND_SMALL, "mem.yaml").unwrap();
    let planned = spec.expand();
    let need = |model: &str| planned.iter().find(|j| j.spec.model.name == model).unwrap().memory.lease_bytes().unwrap();
    let (big, small) = (need("big"), need("small"));
    assert!(big > 100 << 30 && small < 2 << 30, "{big} {small}");
    store.submit(&spec, &planned, T0).await.unwrap();
    let ask = |worker: &str, free: Option<u64>| LeaseRequest {
        worker_id: worker.into(),
        held_models: Vec::new(),
        ttl_ms: TTL,
        free_memory_bytes: free,
    };
    let model = |l: &Option<LeasedJob>| l.as_ref().map(|l| l.job.spec.model.name.clone());
    // Alone, a small worker skips the big model's jobs (first in order) for the small one's...
    for worker in ["small-1", "small-2", "small-3"] {
        let got = store.lease_batch(&[ask(worker, Some(small + (4 << 30)))], T0).await.unwrap();
        assert_eq!(model(&got[0]).as_deref(), Some("small"));
    }
    // ...and then finds nothing it can hold, while the big jobs stay pending for it.
    let got = store.lease_batch(&[ask("small-4", Some(small + (4 << 30)))], T0).await.unwrap();
    assert!(got[0].is_none(), "{:?}", model(&got[0]));
    assert_eq!(store.sweep("mem").await.unwrap().count(JobState::Pending), 3);
    // A worker with room, and one that reports no free memory (no constraint), get big jobs.
    let got = store.lease_batch(&[ask("h200", Some(big)), ask("unknown", None)], T0).await.unwrap();
    assert_eq!(got.iter().map(model).collect::<Vec<_>>(), [Some("big".into()), Some("big".into())]);
    let counts = store.sweep("mem").await.unwrap();
    assert_eq!((counts.count(JobState::Pending), counts.count(JobState::Leased)), (1, 5));
}

async fn a_small_worker_batched_with_a_big_one_reads_its_own_candidates(store: &dyn JobStore) {
    let spec = SweepSpec::parse(BIG_AND_SMALL, "mem.yaml").unwrap();
    submit(store, &spec).await;
    let ask = |worker: &str, free: u64| LeaseRequest {
        worker_id: worker.into(),
        held_models: Vec::new(),
        ttl_ms: TTL,
        free_memory_bytes: Some(free),
    };
    // The batch's candidates are the big worker's best two (both big); the small worker's job
    // comes from its own read.
    let got = store.lease_batch(&[ask("h200", 1 << 40), ask("small", 4 << 30)], T0).await.unwrap();
    let models: Vec<_> = got.iter().map(|l| l.as_ref().map(|l| l.job.spec.model.name.clone())).collect();
    assert_eq!(models, [Some("big".into()), Some("small".into())]);
}

async fn unknown_names_are_not_found(store: &dyn JobStore) {
    assert!(matches!(store.sweep("nope").await.unwrap_err(), StoreError::SweepNotFound(_)));
    assert!(matches!(store.results("nope").await.unwrap_err(), StoreError::SweepNotFound(_)));
    assert!(matches!(store.job(12345).await.unwrap_err(), StoreError::JobNotFound(12345)));
    let id = store
        .register_worker(
            &WorkerInfo { name: "w".into(), device: "cpu".into(), memory_bytes: Some(1 << 30), version: "0".into() },
            T0,
        )
        .await
        .unwrap();
    assert_eq!(id.len(), 36);
}

/// Runs each listed test on both backends.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let s = crate::common::sqlite().await;
                    super::$name(&*s.store).await;
                    s.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let s = crate::common::postgres().await;
                    super::$name(&*s.store).await;
                    s.cleanup().await;
                }
            )*
        }
    };
}

both_backends!(
    submit_is_idempotent,
    a_big_submit_is_written_in_chunks,
    leases_follow_dependencies,
    affinity_prefers_held_models,
    expired_leases_are_reclaimed_until_max_attempts,
    stale_lease_cannot_complete,
    only_the_leasing_worker_can_use_its_lease,
    a_completion_after_expiry_is_kept_until_the_job_is_leased_again,
    failures_retry_or_stop,
    cancel_stops_leasing_and_tells_workers,
    a_cancelled_score_job_cannot_requeue_its_cells,
    a_cancel_racing_a_score_completion_leaves_no_cell_runnable,
    heartbeats_show_where_running_jobs_are,
    concurrent_submits_make_one_sweep,
    concurrent_leases_never_share_a_job,
    a_follower_of_the_events_misses_none,
    batches_answer_each_call_in_order,
    a_job_too_big_for_a_worker_waits_for_a_bigger_one,
    a_small_worker_batched_with_a_big_one_reads_its_own_candidates,
    unknown_names_are_not_found,
);

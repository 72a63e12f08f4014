//! The terminal tables of `coordinator status` and `coordinator workers`: what the sweep page
//! (`serve --http`) shows, as text: counts and ETA per sweep, the running jobs with their phase
//! and progress, the failed jobs with their attempts and last error, and the workers.

use prunesweep_coordinator::job::{JobKind, JobState, SweepState};
use prunesweep_coordinator::store;
use prunesweep_coordinator::web::html::duration;
use prunesweep_coordinator::web::view::{eta_basis, eta_seconds, Counts};
use prunesweep_proto::v1 as pb;
use prunesweep_proto::Vocabulary;

fn job_state(s: pb::JobState) -> Option<JobState> {
    Some(match s {
        pb::JobState::Blocked => JobState::Blocked,
        pb::JobState::Pending => JobState::Pending,
        pb::JobState::Leased => JobState::Leased,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
        pb::JobState::Unspecified => return None,
    })
}

fn job_kind(k: pb::JobKind) -> Option<JobKind> {
    Some(match k {
        pb::JobKind::Score => JobKind::Score,
        pb::JobKind::Baseline => JobKind::Baseline,
        pb::JobKind::Cell => JobKind::Cell,
        pb::JobKind::Unspecified => return None,
    })
}

/// The sweep's ETA in seconds from its jobs' timings, as the sweep page computes it
/// ([`eta_seconds`]).
pub(crate) fn eta(status: &pb::SweepStatus, jobs: &[pb::JobResult]) -> Option<f64> {
    let timed = jobs.iter().filter_map(|j| {
        let seconds = (!j.timings.is_empty()).then(|| j.timings.iter().map(|t| t.seconds).sum());
        Some((job_kind(j.kind())?, job_state(j.state())?, seconds))
    });
    let state = if status.state() == pb::SweepState::Cancelled { SweepState::Cancelled } else { SweepState::Active };
    eta_seconds(&eta_basis(timed), &Counts::from_pb(status), state)
}

/// The sweeps' job counts and ETA (`etas[i]` for `sweeps[i]`), one line each.
pub(crate) fn print_table(sweeps: &[pb::SweepStatus], etas: &[Option<f64>]) {
    println!(
        "{:<24} {:<9} {:>7} {:>7} {:>6} {:>9} {:>6} {:>9} {:>6} {:>8}",
        "SWEEP", "STATE", "BLOCKED", "PENDING", "LEASED", "SUCCEEDED", "FAILED", "CANCELLED", "TOTAL", "ETA"
    );
    for (i, s) in sweeps.iter().enumerate() {
        let total = Counts::from_pb(s).total();
        let eta = etas.get(i).copied().flatten().map_or("-".to_string(), duration);
        println!(
            "{:<24} {:<9} {:>7} {:>7} {:>6} {:>9} {:>6} {:>9} {:>6} {:>8}",
            s.name,
            s.state().name(),
            s.blocked,
            s.pending,
            s.leased,
            s.succeeded,
            s.failed,
            s.cancelled,
            total,
            eta
        );
    }
}

/// How long before `now_ms` `at_ms` was, roughly: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(now_ms: i64, at_ms: i64) -> String {
    let s = (now_ms - at_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// What a job computes: `model · method · amount · heal` (the sweep page's "cell").
fn cell(spec: Option<&pb::JobSpec>) -> String {
    let Some(spec) = spec else { return "-".into() };
    let model = spec.model.as_ref().map_or("?", |m| m.name.as_str());
    match spec.kind() {
        pb::JobKind::Cell => {
            let amount = match spec.amount {
                Some(pb::job_spec::Amount::Fraction(f)) => format!("{:.0}%", 100.0 * f),
                Some(pb::job_spec::Amount::N(n)) => format!("n={n}"),
                None => "?".into(),
            };
            let heal = spec.heal.as_ref().map_or("none", |h| h.name.as_str());
            format!("{model} · {} · {amount} · {heal}", spec.method().name())
        }
        kind => format!("{model} · {}", kind.name()),
    }
}

/// A sweep's running jobs under its counts, with the attempt each is on (from `jobs`); nothing
/// when none runs.
pub(crate) fn print_running(running: &[pb::RunningJob], jobs: &[pb::JobResult]) {
    if running.is_empty() {
        return;
    }
    let now = store::now_ms();
    let attempts: std::collections::HashMap<i64, u32> = jobs.iter().map(|j| (j.job_id, j.attempts)).collect();
    println!();
    println!(
        "{:>8} {:<8} {:<24} {:<8} {:>8} {:>7} {:>14}  CELL",
        "JOB", "KIND", "WORKER", "PHASE", "PROGRESS", "ATTEMPT", "LAST HEARTBEAT"
    );
    for r in running {
        let spec = jobs.iter().find(|j| j.job_id == r.job_id).and_then(|j| j.spec.as_ref());
        println!(
            "{:>8} {:<8} {:<24} {:<8} {:>8} {:>7} {:>14}  {}",
            r.job_id,
            r.kind().name(),
            r.worker_name.as_deref().unwrap_or(&r.worker_id),
            r.phase.as_deref().unwrap_or("-"),
            r.progress.map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * p)),
            attempts.get(&r.job_id).map_or("-".to_string(), |a| (a + 1).to_string()),
            r.heartbeat_at_ms.map_or("-".to_string(), |t| ago(now, t)),
            cell(spec),
        );
    }
}

/// A sweep's failed jobs: attempts used and the last error (nothing when none failed).
pub(crate) fn print_failed(jobs: &[pb::JobResult]) {
    let failed: Vec<_> = jobs.iter().filter(|j| j.state() == pb::JobState::Failed).collect();
    if failed.is_empty() {
        return;
    }
    println!();
    println!("{:>8} {:<8} {:>8}  {:<36} LAST ERROR", "FAILED", "KIND", "ATTEMPTS", "CELL");
    for j in failed {
        let error = j.error.as_deref().unwrap_or("-").replace('\n', " ");
        println!("{:>8} {:<8} {:>8}  {:<36} {}", j.job_id, j.kind().name(), j.attempts, cell(j.spec.as_ref()), error);
    }
}

/// The registered workers, most recently seen first.
pub(crate) fn print_workers(workers: &[pb::WorkerStatus]) {
    if workers.is_empty() {
        println!("no workers registered");
        return;
    }
    let now = store::now_ms();
    println!(
        "{:<8} {:<24} {:<8} {:>9} {:>9} {:<10} {:>10} {:>10} JOB",
        "ID", "NAME", "DEVICE", "MEMORY", "FREE", "VERSION", "REGISTERED", "LAST SEEN"
    );
    let gib = |m: Option<u64>| m.map_or("-".to_string(), |m| format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64));
    for w in workers {
        let (memory, free) = (gib(w.memory_bytes), gib(w.free_memory_bytes));
        let job = match (w.job_id, &w.sweep) {
            (Some(id), Some(sweep)) => format!("{id} ({sweep})"),
            (Some(id), None) => id.to_string(),
            (None, _) => "-".to_string(),
        };
        println!(
            "{:<8} {:<24} {:<8} {:>9} {:>9} {:<10} {:>10} {:>10} {}",
            w.worker_id.get(..8).unwrap_or(&w.worker_id),
            w.name,
            w.device,
            memory,
            free,
            w.version,
            ago(now, w.registered_at_ms),
            ago(now, w.last_seen_ms),
            job
        );
    }
}

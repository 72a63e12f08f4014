//! The terminal tables of `coordinator status` and `coordinator workers`.

use prunesweep_coordinator::store;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::Vocabulary;

/// The sweeps' job counts, one line each.
pub(crate) fn print_table(sweeps: &[pb::SweepStatus]) {
    println!(
        "{:<24} {:<9} {:>7} {:>7} {:>6} {:>9} {:>6} {:>9} {:>6}",
        "SWEEP", "STATE", "BLOCKED", "PENDING", "LEASED", "SUCCEEDED", "FAILED", "CANCELLED", "TOTAL"
    );
    for s in sweeps {
        let total = s.blocked + s.pending + s.leased + s.succeeded + s.failed + s.cancelled;
        println!(
            "{:<24} {:<9} {:>7} {:>7} {:>6} {:>9} {:>6} {:>9} {:>6}",
            s.name,
            s.state().name(),
            s.blocked,
            s.pending,
            s.leased,
            s.succeeded,
            s.failed,
            s.cancelled,
            total
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

/// A sweep's running jobs under its counts (nothing when none runs).
pub(crate) fn print_running(running: &[pb::RunningJob]) {
    if running.is_empty() {
        return;
    }
    let now = store::now_ms();
    println!();
    println!("{:>8} {:<8} {:<24} {:<8} {:>8} {:>14}", "JOB", "KIND", "WORKER", "PHASE", "PROGRESS", "LAST HEARTBEAT");
    for r in running {
        println!(
            "{:>8} {:<8} {:<24} {:<8} {:>8} {:>14}",
            r.job_id,
            r.kind().name(),
            r.worker_name.as_deref().unwrap_or(&r.worker_id),
            r.phase.as_deref().unwrap_or("-"),
            r.progress.map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * p)),
            r.heartbeat_at_ms.map_or("-".to_string(), |t| ago(now, t)),
        );
    }
}

/// The registered workers, most recently seen first.
pub(crate) fn print_workers(workers: &[pb::WorkerStatus]) {
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

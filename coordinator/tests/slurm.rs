//! `deploy/slurm/`: the batch scripts parse (`bash -n`) and ask Slurm for what preemption-safe
//! workers need. The scripts really run on a one-node Slurm in `scripts/slurm-check.sh` (root,
//! Debian's slurm-wlm); this test keeps the directives from drifting in between.

use std::path::{Path, PathBuf};
use std::process::Command;

fn slurm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy/slurm")
}

/// The `#SBATCH` options of a script, in order (`--name=value` or `--flag`).
fn directives(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .flat_map(|rest| rest.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// The complaints about a worker batch script; none when it is fit for preemptible GPU nodes.
fn worker_complaints(script: &str) -> Vec<String> {
    let d = directives(script);
    let mut out = Vec::new();
    if !d.iter().any(|o| o == "--gres=gpu:1") {
        out.push("no --gres=gpu:1 (one worker per GPU)".to_string());
    }
    if !d.iter().any(|o| o == "--requeue") {
        out.push("no --requeue (a preempted task would be lost)".to_string());
    }
    match d.iter().find_map(|o| o.strip_prefix("--signal=")) {
        Some(signal) => {
            // B: the batch shell gets it (the worker is its child, not a step); ≥ 60 s to checkpoint.
            let ok = signal.strip_prefix("B:TERM@").and_then(|s| s.parse::<u32>().ok()).is_some_and(|s| s >= 60);
            if !ok {
                out.push(format!("--signal={signal}: want B:TERM@<seconds ≥ 60>"));
            }
        }
        None => out.push("no --signal=B:TERM@N (no warning before the time limit)".to_string()),
    }
    // The script's commands, without its comments (which mention the same words).
    let code: String = script.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    if !code.lines().any(|l| l.contains(" serve ") && l.contains("--exit-when-done")) {
        out.push("the worker does not get --exit-when-done (idle tasks would hold GPUs)".to_string());
    }
    if !code.contains("trap ") || !code.contains("kill -TERM") {
        out.push("SIGTERM is not passed on to the worker".to_string());
    }
    if !code.contains("scontrol requeue") {
        out.push("the task does not requeue itself after a TERM".to_string());
    }
    out
}

#[test]
fn batch_scripts_parse() {
    for name in ["worker.sbatch", "coordinator.sbatch"] {
        let path = slurm_dir().join(name);
        let status = Command::new("bash").arg("-n").arg(&path).status().expect("run bash -n");
        assert!(status.success(), "bash -n {}", path.display());
    }
}

#[test]
fn the_worker_script_asks_for_a_gpu_a_warning_and_a_requeue() {
    let script = std::fs::read_to_string(slurm_dir().join("worker.sbatch")).unwrap();
    assert_eq!(worker_complaints(&script), Vec::<String>::new());
}

#[test]
fn the_checks_catch_a_broken_worker_script() {
    let script = std::fs::read_to_string(slurm_dir().join("worker.sbatch")).unwrap();
    for (from, to, complaint) in [
        ("#SBATCH --gres=gpu:1", "#SBATCH --gres=gpu:0", "--gres=gpu:1"),
        ("#SBATCH --requeue", "#SBATCH --no-requeue", "--requeue"),
        ("--signal=B:TERM@120", "--signal=TERM@120", "B:TERM"),
        ("--signal=B:TERM@120", "--signal=B:TERM@10", "B:TERM"),
        (" --exit-when-done", "", "--exit-when-done"),
        ("scontrol requeue", "true", "requeue itself"),
    ] {
        assert!(script.contains(from), "the script no longer has {from:?}: update this test");
        let broken = script.replace(from, to);
        let complaints = worker_complaints(&broken);
        assert!(complaints.iter().any(|c| c.contains(complaint)), "{from:?} → {to:?}: {complaints:?}");
    }
}

#[test]
fn the_coordinator_script_keeps_state_in_postgres_and_execs() {
    let script = std::fs::read_to_string(slurm_dir().join("coordinator.sbatch")).unwrap();
    assert!(script.contains("PRUNESWEEP_DATABASE"), "the coordinator job takes its database URL");
    // exec: Slurm's SIGTERM reaches the coordinator, which drains its calls and exits 0.
    assert!(script.lines().any(|l| l.starts_with("exec ") && l.contains(" serve ")), "the script execs `serve`");
}

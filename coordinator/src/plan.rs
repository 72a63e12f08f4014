//! `coordinator plan FILE`: what a sweep file expands to, every resolved setting shown, before any
//! GPU hour is spent. It runs the same parse and expansion as a submit, without a coordinator.
//!
//! Each job also shows its predicted peak memory (`prunesweep_proto::memory`): on a CUDA worker,
//! device and host, and on a CPU worker the whole process; then, per model, the parts of its
//! largest job's GPU peak. A model whose shape is unknown here gets `-` and a line saying why.

use std::collections::BTreeMap;
use std::fmt::Write;

use prunesweep_proto::Vocabulary;
use serde_json::{json, Value};

use prunesweep_proto::memory::{gib, MemoryEstimate};

use crate::spec::Amount;
use crate::sweep::{JobMemory, PlannedJob};

/// The jobs as JSON: `[{key, depends_on, spec, memory}]` in submission order, `spec` being
/// exactly what the store keeps and the key hashes; `memory` is `{gpu, cpu}` (each
/// `{device_bytes, host_bytes, phase, parts}`) or `{unknown: why}`.
pub fn to_json(jobs: &[PlannedJob]) -> Value {
    Value::Array(
        jobs.iter()
            .map(|j| {
                let spec: Value = serde_json::from_str(&j.spec.canonical_json()).expect("canonical JSON parses");
                let memory = match &j.memory {
                    JobMemory::Predicted { gpu, cpu } => {
                        json!({ "gpu": estimate_json(gpu), "cpu": estimate_json(cpu) })
                    }
                    JobMemory::Unknown(why) => json!({ "unknown": why }),
                };
                json!({ "key": j.key, "depends_on": j.depends_on, "spec": spec, "memory": memory })
            })
            .collect(),
    )
}

fn estimate_json(e: &MemoryEstimate) -> Value {
    let parts: serde_json::Map<String, Value> = e.parts.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    json!({
        "device_bytes": e.device_bytes,
        "host_bytes": e.host_bytes,
        "least_device_bytes": e.least_device_bytes,
        "phase": e.phase,
        "parts": parts
    })
}

/// Bytes in GiB, one decimal, for the table's narrow columns.
fn short_gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

/// The table's memory columns: GPU device, GPU host, CPU (GiB), or dashes; a device figure the
/// job can also run below (blocks read per pass, [`MemoryEstimate::least_device_bytes`]) is
/// marked `*`.
fn memory_columns(m: &JobMemory) -> (String, String, String) {
    let device = |e: &MemoryEstimate| {
        let mark = if e.least_device_bytes < e.device_bytes { "*" } else { "" };
        format!("{}{mark}", short_gib(e.device_bytes))
    };
    match m {
        JobMemory::Predicted { gpu, cpu } => (device(gpu), short_gib(gpu.host_bytes), device(cpu)),
        JobMemory::Unknown(_) => ("-".into(), "-".into(), "-".into()),
    }
}

/// Per model, the parts of its largest job's GPU peak and, when another job heals, of its largest
/// healing job's (the two hold different weights: dense, or NF4 and adapters); or why the model has
/// no prediction.
fn memory_notes(jobs: &[PlannedJob], out: &mut String) {
    // Per model: the largest job, and the largest healing job.
    type Largest<'a> = Option<(usize, &'a MemoryEstimate)>;
    let mut models: BTreeMap<&str, (Largest, Largest)> = BTreeMap::new();
    let mut unknown: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        match &j.memory {
            JobMemory::Predicted { gpu, .. } => {
                let (any, healing) = models.entry(j.spec.model.name.as_str()).or_default();
                let slots = if j.spec.heal.is_some() { vec![any, healing] } else { vec![any] };
                for best in slots {
                    if best.is_none_or(|(_, b)| gpu.device_bytes > b.device_bytes) {
                        *best = Some((i + 1, gpu));
                    }
                }
            }
            JobMemory::Unknown(why) => {
                unknown.insert(j.spec.model.name.as_str(), why.as_str());
            }
        }
    }
    for (model, (any, healing)) in models {
        let healing = healing.filter(|h| any.is_none_or(|a| a.0 != h.0));
        for (index, e) in any.into_iter().chain(healing) {
            let _ = writeln!(out, "\npeak memory of {model} on a CUDA worker (job #{index}, {}):", e.phase);
            for (part, bytes) in &e.parts {
                let _ = writeln!(out, "  {part:<18} {}", gib(*bytes));
            }
            let _ = writeln!(out, "  {:<18} {} device, {} host", "total", gib(e.device_bytes), gib(e.host_bytes));
            if e.least_device_bytes < e.device_bytes {
                let _ = writeln!(
                    out,
                    "  {:<18} {} device: with less free, a worker reads the blocks it cannot hold from the \
                     checkpoint for each pass (slower; jobs marked *)",
                    "or at least",
                    gib(e.least_device_bytes)
                );
            }
        }
    }
    for (model, why) in unknown {
        let _ = writeln!(out, "\nno memory prediction for {model}: {why}");
    }
}

/// One line per setting of a JSON object (`heal.qlora.rank = 8`), keys sorted; unset ones (null:
/// not applicable to the task, or "all") left out.
fn settings(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                settings(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        Value::Null => {}
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The jobs as a table (one line each), then every resolved setting of each distinct calibration,
/// heal variant and eval task the jobs carry.
pub fn to_table(jobs: &[PlannedJob]) -> String {
    let mut out = String::new();
    let short = |k: &str| k[..12.min(k.len())].to_string();
    let _ = writeln!(
        out,
        "{:>4}  {:<8}  {:<20}  {:<15}  {:<10}  {:<12}  {:<12}  {:>8}  {:>8}  {:>8}  AFTER",
        "#", "KIND", "MODEL", "METHOD", "AMOUNT", "HEAL", "KEY", "GPU GiB", "HOST GiB", "CPU GiB"
    );
    let index: BTreeMap<&str, usize> = jobs.iter().enumerate().map(|(i, j)| (j.key.as_str(), i + 1)).collect();
    for (i, j) in jobs.iter().enumerate() {
        let s = &j.spec;
        let amount = match s.amount {
            Some(Amount::Fraction(f)) => format!("{f}"),
            Some(Amount::N(n)) => format!("n={n}"),
            None => "-".into(),
        };
        let after = j.depends_on.as_deref().and_then(|k| index.get(k)).map_or("-".into(), |d| format!("#{d}"));
        let (gpu, host, cpu) = memory_columns(&j.memory);
        let _ = writeln!(
            out,
            "{:>4}  {:<8}  {:<20}  {:<15}  {:<10}  {:<12}  {:<12}  {gpu:>8}  {host:>8}  {cpu:>8}  {after}",
            i + 1,
            s.kind.as_str(),
            s.model.name,
            s.method.map_or("-".into(), |m| m.name()),
            amount,
            if s.kind == crate::job::JobKind::Cell { s.heal_name() } else { "-" },
            short(&j.key),
        );
    }
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for j in jobs {
        let s = &j.spec;
        if let Some(c) = &s.calibration {
            settings("", &json!(c), sections.entry("calibration".into()).or_default());
        }
        if let Some(h) = s.heal.as_ref().and_then(|h| h.qlora.as_ref().map(|q| (h, q))) {
            settings("", &json!(h.1), sections.entry(format!("heal {}", h.0.name)).or_default());
        }
        for e in &s.eval {
            settings("", &json!(e), sections.entry(format!("eval {}", e.task.name())).or_default());
        }
        if let Some(seed) = s.seed {
            sections.entry("sweep".into()).or_default().insert("seed".into(), seed.to_string());
        }
    }
    for (name, values) in sections {
        let _ = writeln!(out, "\n{name}:");
        for (k, v) in values {
            let _ = writeln!(out, "  {k:<18} {v}");
        }
    }
    memory_notes(jobs, &mut out);
    let _ = writeln!(out, "\n{} jobs", jobs.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::SweepSpec;

    const YAML: &str = "name: p\nmodels: [{name: m, path: m}]\ncalibration: {path: c.jsonl}\n\
                        methods: [angular, deepest]\nfractions: [0.25]\n\
                        heal: [{name: none}, {name: r8, qlora: {rank: 8, steps: 20, data: h.jsonl}}]\n\
                        eval: [{task: mmlu, path: mmlu}]\n";

    #[test]
    fn the_table_shows_jobs_and_every_resolved_setting() {
        let jobs = SweepSpec::parse(YAML, "p.yaml").unwrap().expand();
        let table = to_table(&jobs);
        assert!(table.contains("score") && table.contains("baseline"));
        for line in [
            "heal r8:",
            "  micro_batch_size   4",
            "  warmup_steps       2",
            "  alpha              8.0",
            "  target_modules     \"ffn\"",
            "eval mmlu:",
            "  shots              5",
            "  batch_size         8",
            "calibration:",
            "  samples            256",
            "6 jobs",
        ] {
            assert!(table.contains(line), "{line:?} in\n{table}");
        }
        // The angular cells run after the score job (#1); deepest ones after nothing.
        assert!(table.lines().any(|l| l.contains("angular") && l.ends_with("#1")), "{table}");
        assert!(table.lines().any(|l| l.contains("deepest") && l.ends_with('-')), "{table}");
    }

    #[test]
    fn each_job_shows_its_predicted_memory_or_why_not() {
        let shape = "shape: {layers: 80, hidden: 8192, intermediate: 28672, heads: 64, kv_heads: 8, \
                     head_dim: 128, vocab: 32000}";
        let yaml = YAML.replace("{name: m, path: m}", &format!("{{name: m, path: m, {shape}}}"));
        let jobs = SweepSpec::parse(&yaml, "p.yaml").unwrap().expand();
        assert!(jobs.iter().all(|j| j.memory.lease_bytes().is_some()), "{:?}", jobs[0].memory);
        let table = to_table(&jobs);
        assert!(table.contains("GPU GiB") && table.contains("peak memory of m on a CUDA worker"), "{table}");
        assert!(table.contains("  nf4 base") && table.contains("  adapters"), "{table}");
        let json = to_json(&jobs);
        assert!(json[0]["memory"]["gpu"]["device_bytes"].as_u64().unwrap() > 0);
        // The 70B baseline does not fit an H200 whole; leasing asks for what it runs in with
        // blocks read per pass, and the table marks it and says so.
        let baseline = jobs.iter().position(|j| j.spec.kind == crate::job::JobKind::Baseline).unwrap();
        let JobMemory::Predicted { gpu, .. } = &jobs[baseline].memory else { panic!("predicted") };
        assert!(gpu.device_bytes > 128 << 30 && gpu.least_device_bytes < 8 << 30, "{gpu:?}");
        assert_eq!(jobs[baseline].memory.lease_bytes(), Some(gpu.least_device_bytes));
        assert_eq!(json[baseline]["memory"]["gpu"]["least_device_bytes"], gpu.least_device_bytes);
        assert!(table.lines().any(|l| l.contains("baseline") && l.contains("*")), "{table}");
        assert!(table.contains("  or at least  "), "{table}");
        // The shape is no part of a job's content.
        let plain = SweepSpec::parse(YAML, "p.yaml").unwrap().expand();
        assert_eq!(plain.iter().map(|j| &j.key).collect::<Vec<_>>(), jobs.iter().map(|j| &j.key).collect::<Vec<_>>());
        assert!(to_table(&plain).contains("no memory prediction for m: m is not on this machine"));
        let bad = YAML.replace(
            "{name: m, path: m}",
            "{name: m, path: m, shape: {layers: 0, hidden: 1, \
            intermediate: 1, heads: 1, kv_heads: 1, head_dim: 1, vocab: 1}}",
        );
        let e = SweepSpec::parse(&bad, "p.yaml").unwrap_err().to_string();
        assert!(e.contains("`models[0].shape`") && e.contains("`layers` is 0"), "{e}");
    }

    #[test]
    fn the_json_holds_what_the_key_hashes() {
        let jobs = SweepSpec::parse(YAML, "p.yaml").unwrap().expand();
        let json = to_json(&jobs);
        assert_eq!(json.as_array().unwrap().len(), jobs.len());
        for (j, v) in jobs.iter().zip(json.as_array().unwrap()) {
            assert_eq!(v["key"], j.key.as_str());
            assert_eq!(serde_json::to_string(&v["spec"]).unwrap(), j.spec.canonical_json());
        }
    }
}

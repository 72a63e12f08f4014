//! `coordinator plan FILE`: what a sweep file expands to, every resolved setting shown, before any
//! GPU hour is spent. It runs the same parse and expansion as a submit, without a coordinator.

use std::collections::BTreeMap;
use std::fmt::Write;

use prunesweep_proto::Vocabulary;
use serde_json::{json, Value};

use crate::spec::Amount;
use crate::sweep::PlannedJob;

/// The jobs as JSON: `[{key, depends_on, spec}]` in submission order, `spec` being exactly what
/// the store keeps and the key hashes.
pub fn to_json(jobs: &[PlannedJob]) -> Value {
    Value::Array(
        jobs.iter()
            .map(|j| {
                let spec: Value = serde_json::from_str(&j.spec.canonical_json()).expect("canonical JSON parses");
                json!({ "key": j.key, "depends_on": j.depends_on, "spec": spec })
            })
            .collect(),
    )
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
        "{:>4}  {:<8}  {:<20}  {:<15}  {:<10}  {:<12}  {:<12}  AFTER",
        "#", "KIND", "MODEL", "METHOD", "AMOUNT", "HEAL", "KEY"
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
        let _ = writeln!(
            out,
            "{:>4}  {:<8}  {:<20}  {:<15}  {:<10}  {:<12}  {:<12}  {after}",
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

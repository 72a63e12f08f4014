//! A sweep's results as a Markdown table, the one each `results/*/README.md` shows: one row per
//! baseline and cell job, one column per task in the metric its chart plots (accuracies with one
//! binomial standard error), and the layers each cut dropped. Made from the export's rows alone.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{binomial_se, item_counts, metric_for};
use crate::export::ExportRow;

/// `13,14,15,20` → `13–15, 20`.
fn layer_ranges(layers: &str) -> String {
    let mut ids: Vec<u32> = layers.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    ids.sort_unstable();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for id in ids {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == id => *end = id,
            _ => runs.push((id, id)),
        }
    }
    let text: Vec<String> =
        runs.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}–{b}") }).collect();
    if text.is_empty() {
        "–".into()
    } else {
        text.join(", ")
    }
}

/// The table: a header, then baselines and cells ordered by model, method, amount and heal variant
/// (`none` first).
pub fn markdown(rows: &[ExportRow]) -> String {
    let counts = item_counts(rows);
    let mut tasks: BTreeMap<&str, Vec<&ExportRow>> = BTreeMap::new();
    for r in rows {
        tasks.entry(r.task.as_str()).or_default().push(r);
    }
    // (task, metric), and the item count when every job of the task had the same.
    let columns: Vec<(&str, &str, Option<u32>)> = tasks
        .iter()
        .filter_map(|(task, rows)| {
            let metric = metric_for(rows)?;
            let mut ns: Vec<u32> = rows.iter().filter_map(|r| counts.get(&(r.job_id, *task)).copied()).collect();
            ns.sort_unstable();
            ns.dedup();
            Some((*task, metric, (ns.len() == 1).then(|| ns[0])))
        })
        .collect();
    let mut jobs: BTreeMap<i64, &ExportRow> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.kind == "baseline" || r.kind == "cell") {
        jobs.entry(r.job_id).or_insert(r);
    }
    let mut order: Vec<&ExportRow> = jobs.into_values().collect();
    order.sort_by(|a, b| {
        (a.kind != "baseline", &a.model, &a.method, a.fraction_dropped.unwrap_or(0.0), a.heal != "none", &a.heal)
            .partial_cmp(&(
                b.kind != "baseline",
                &b.model,
                &b.method,
                b.fraction_dropped.unwrap_or(0.0),
                b.heal != "none",
                &b.heal,
            ))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let value = |job: &ExportRow, task: &str, metric: &str| -> String {
        let Some(r) = rows.iter().find(|r| r.job_id == job.job_id && r.task == task && r.metric == metric) else {
            return "–".into();
        };
        let n = counts.get(&(r.job_id, task)).copied();
        match (metric, n.and_then(|n| binomial_se(r.value, n))) {
            ("accuracy", Some(se)) => format!("{:.3} ± {:.3}", r.value, se),
            _ => format!("{:.3}", r.value),
        }
    };
    let mut out = String::from("| model | method | heal | dropped | layers dropped |");
    for (task, metric, n) in &columns {
        let n = n.map(|n| format!(", n = {n}")).unwrap_or_default();
        let _ = write!(out, " {task} {metric}{n} |");
    }
    out.push_str("\n| --- | --- | --- | --- | --- |");
    out.push_str(&" --- |".repeat(columns.len()));
    out.push('\n');
    for job in order {
        let dropped = match (job.n_dropped, job.fraction_dropped) {
            (Some(0), _) | (None, None) => "0".to_string(),
            (Some(n), Some(f)) => format!("{n} ({:.0}%)", 100.0 * f),
            (Some(n), None) => n.to_string(),
            (None, Some(f)) => format!("{:.0}%", 100.0 * f),
        };
        let (method, heal) =
            if job.kind == "baseline" { ("unpruned", "–") } else { (job.method.as_str(), job.heal.as_str()) };
        let _ =
            write!(out, "| {} | {method} | {heal} | {dropped} | {} |", job.model, layer_ranges(&job.layers_dropped));
        for (task, metric, _) in &columns {
            let _ = write!(out, " {} |", value(job, task, metric));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_job_with_standard_errors_and_layer_ranges() {
        let row = |job_id, kind: &str, heal: &str, metric: &str, value| ExportRow {
            job_id,
            kind: kind.into(),
            model: "m".into(),
            method: if kind == "cell" { "deepest" } else { "none" }.into(),
            heal: heal.into(),
            n_dropped: Some(if kind == "cell" { 3 } else { 0 }),
            fraction_dropped: Some(if kind == "cell" { 0.1 } else { 0.0 }),
            layers_dropped: if kind == "cell" { "28,26,27".into() } else { String::new() },
            task: "boolq".into(),
            metric: metric.into(),
            value,
            ..ExportRow::default()
        };
        let rows = vec![
            row(3, "cell", "qlora", "accuracy", 0.55),
            row(3, "cell", "qlora", "n", 200.0),
            row(2, "cell", "none", "accuracy", 0.5),
            row(2, "cell", "none", "n", 200.0),
            row(1, "baseline", "none", "accuracy", 0.6),
            row(1, "baseline", "none", "n", 200.0),
        ];
        let table = markdown(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| model | method | heal | dropped | layers dropped | boolq accuracy, n = 200 |");
        assert_eq!(lines[2], "| m | unpruned | – | 0 | – | 0.600 ± 0.035 |");
        assert_eq!(lines[3], "| m | deepest | none | 3 (10%) | 26–28 | 0.500 ± 0.035 |");
        assert_eq!(lines[4], "| m | deepest | qlora | 3 (10%) | 26–28 | 0.550 ± 0.035 |");
        assert_eq!(layer_ranges("2,5,6"), "2, 5–6");
    }
}

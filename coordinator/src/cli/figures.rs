//! What `coordinator run` and `coordinator plot` write: the export (`results.csv`,
//! `results.parquet`, and `distances.csv` when a model was scored), the charts and distance
//! heatmaps under `plots/`, and the results as a Markdown table (`results.md`). `coordinator plot
//! --from DIR` makes the figures and the table again from such an export alone, with no
//! coordinator, so a results folder can always be redrawn from what it holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use prunesweep_coordinator::export::{self, DistanceExportRow, ExportRow, Format};
use prunesweep_coordinator::plot;
use prunesweep_proto::v1 as pb;

use crate::Client;

/// The charts (one per task) and the heatmaps (one per score job) under `plots`, and, with
/// `table`, the Markdown table there; prints what it wrote.
pub(crate) fn write_figures(
    sweep: &str,
    rows: &[ExportRow],
    distances: &[DistanceExportRow],
    plots: &Path,
    table: Option<&Path>,
) -> Result<()> {
    let charts = plot::charts(rows);
    if charts.is_empty() {
        bail!("sweep {sweep} has no results to plot yet");
    }
    for chart in &charts {
        let (svg, png) = plot::write_chart(chart, sweep, plots).map_err(anyhow::Error::msg)?;
        println!("{}: {} and {}", chart.task, svg.display(), png.display());
    }
    let mut by_job: BTreeMap<(&str, i64), Vec<_>> = BTreeMap::new();
    for d in distances {
        by_job.entry((d.model.as_str(), d.job_id)).or_default().push(d.to_distance());
    }
    let models_scored_twice = by_job.keys().map(|k| k.0).collect::<Vec<_>>().windows(2).any(|w| w[0] == w[1]);
    for ((model, job_id), table) in &by_job {
        let name = if models_scored_twice { format!("heatmap-{model}-{job_id}") } else { format!("heatmap-{model}") };
        let title = format!("{model}: angular distance d(l, n)");
        if let Some((svg, png)) =
            plot::heatmap::write_heatmap(table, &title, plots, &name).map_err(anyhow::Error::msg)?
        {
            println!("{model} distances: {} and {}", svg.display(), png.display());
        }
    }
    if let Some(path) = table {
        std::fs::write(path, plot::table::markdown(rows)).with_context(|| format!("writing {}", path.display()))?;
        println!("table: {}", path.display());
    }
    Ok(())
}

/// A finished sweep's export, plots and table under `dir`; returns the failed jobs' errors.
pub(crate) async fn write_results(client: &mut Client, sweep: &str, dir: &Path) -> Result<Vec<String>> {
    let jobs = export::fetch_results(client, sweep).await?;
    let rows = export::rows_from_pb(sweep, &jobs);
    for (format, name) in [(Format::Csv, "results.csv"), (Format::Parquet, "results.parquet")] {
        export::write(&rows, format, &dir.join(name))?;
    }
    println!("wrote {} rows to {}/results.{{csv,parquet}}", rows.len(), dir.display());
    let distances = export::distance_rows_from_pb(sweep, &jobs);
    if !distances.is_empty() {
        export::write_distances(&distances, &dir.join("distances.csv"))?;
    }
    write_figures(sweep, &rows, &distances, &dir.join("plots"), Some(&dir.join("results.md")))?;
    Ok(jobs
        .iter()
        .filter(|j| j.state == pb::JobState::Failed as i32)
        .map(|j| format!("job {}: {}", j.job_id, j.error.clone().unwrap_or_default()))
        .collect())
}

/// `coordinator plot --from DIR`: the figures and table of the export in `dir`
/// (`results.parquet`, else `results.csv`; `distances.csv` when there), into `out` (default
/// `dir/plots`) and `dir/results.md`.
pub(crate) fn plot_from_export(dir: &Path, out: Option<PathBuf>) -> Result<()> {
    let results = ["results.parquet", "results.csv"].map(|f| dir.join(f)).into_iter().find(|p| p.is_file());
    let Some(results) = results else {
        bail!(
            "{} has no results.parquet or results.csv; export a sweep there first (coordinator export SWEEP \
             --format parquet --out {}/results.parquet)",
            dir.display(),
            dir.display()
        );
    };
    let rows = export::read(&results).with_context(|| format!("reading {}", results.display()))?;
    let distances_file = dir.join("distances.csv");
    let distances = if distances_file.is_file() { export::read_distances(&distances_file)? } else { Vec::new() };
    let sweep = rows.first().map(|r| r.sweep.clone()).unwrap_or_default();
    let plots = out.unwrap_or_else(|| dir.join("plots"));
    write_figures(&sweep, &rows, &distances, &plots, Some(&dir.join("results.md")))
}

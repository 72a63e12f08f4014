//! Accuracy-versus-depth curves, like Figs. 1–3 of Gromov et al. (2024): one chart per task,
//! x = fraction of layers dropped, y = the task's metric, one line per model × method × heal
//! variant (each starting from its model's unpruned baseline at 0), and the chance level dashed.
//! Written as SVG and PNG with an embedded DejaVu Sans, so no system fonts are needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::export::ExportRow;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// `model · method · heal`.
    pub label: String,
    /// (fraction dropped, value), by fraction.
    pub points: Vec<(f64, f64)>,
}

/// One task's chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// The task (`mmlu`, `boolq`, `c4-loss`, …).
    pub task: String,
    /// The metric on the y axis (`accuracy`, or `normalized_loss` for loss tasks).
    pub metric: String,
    /// Random guessing on this metric, when known.
    pub chance: Option<f64>,
    /// The lines.
    pub curves: Vec<Curve>,
}

/// The metric a task is plotted by: accuracy when it has one, else the normalized loss
/// (loss / ln V, 1 = uniform guessing), else the loss.
fn metric_for(rows: &[&ExportRow]) -> Option<&'static str> {
    ["accuracy", "normalized_loss", "loss"].into_iter().find(|m| rows.iter().any(|r| r.metric == *m))
}

fn chance(task: &str, metric: &str) -> Option<f64> {
    match (task, metric) {
        ("mmlu" | "mmlu-cloze", "accuracy") => Some(0.25),
        ("boolq", "accuracy") => Some(0.5),
        (_, "normalized_loss") => Some(1.0),
        _ => None,
    }
}

/// Groups export rows into charts (tasks in name order, lines by label).
pub fn charts(rows: &[ExportRow]) -> Vec<Chart> {
    let mut by_task: BTreeMap<&str, Vec<&ExportRow>> = BTreeMap::new();
    for r in rows {
        by_task.entry(r.task.as_str()).or_default().push(r);
    }
    let mut out = Vec::new();
    for (task, rows) in by_task {
        let Some(metric) = metric_for(&rows) else { continue };
        let rows: Vec<&ExportRow> = rows.into_iter().filter(|r| r.metric == metric).collect();
        let baselines: BTreeMap<&str, f64> = rows
            .iter()
            .filter(|r| r.kind == "baseline" && r.value.is_finite())
            .map(|r| (r.model.as_str(), r.value))
            .collect();
        let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        // A non-finite value (a diverged loss stored before values were checked) has no place on
        // an axis: it is left out, not drawn to infinity.
        for r in rows.iter().filter(|r| r.kind == "cell" && r.value.is_finite()) {
            let Some(x) = r.fraction_dropped.filter(|x| x.is_finite()) else { continue };
            let label = format!("{} · {} · {}", r.model, r.method, r.heal);
            let line = lines
                .entry(label)
                .or_insert_with(|| baselines.get(r.model.as_str()).map(|&b| vec![(0.0, b)]).unwrap_or_default());
            line.push((x, r.value));
        }
        let curves = lines
            .into_iter()
            .map(|(label, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Curve { label, points }
            })
            .collect();
        out.push(Chart { task: task.to_string(), metric: metric.to_string(), chance: chance(task, metric), curves });
    }
    out
}

/// A task name as a file name: letters, digits, `-` and `_` kept, anything else (a path
/// separator, a dot) replaced by `_`, so that a name from the store never writes outside the plot folder.
fn file_stem(task: &str) -> String {
    let stem: String =
        task.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '_' }).collect();
    if stem.is_empty() {
        "task".into()
    } else {
        stem
    }
}

/// Registers the embedded font as `sans-serif` for plotters (once per process): text is measured
/// and, in PNGs, drawn with it.
pub fn register_font() {
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the embedded font did not load; plots will have no text");
        }
    });
}

/// The chart as an SVG document in a string, `width` × `height` pixels: what [`write_chart`]
/// writes to `<task>.svg` at 900 × 600 (the live sweep page inlines it). Text from the store (the
/// sweep, task and curve names) is XML-escaped by the SVG backend.
pub fn chart_svg(chart: &Chart, sweep: &str, (width, height): (u32, u32)) -> Result<String, String> {
    register_font();
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area(), chart, sweep)?;
    Ok(svg)
}

/// Writes `dir/<task>.svg` and `dir/<task>.png` (the task name made safe as a file name); returns
/// the two paths.
pub fn write_chart(chart: &Chart, sweep: &str, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    register_font();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stem = file_stem(&chart.task);
    let (svg, png) = (dir.join(format!("{stem}.svg")), dir.join(format!("{stem}.png")));
    let size = (900u32, 600u32);
    draw(SVGBackend::new(&svg, size).into_drawing_area(), chart, sweep)
        .map_err(|e| format!("{}: {e}", svg.display()))?;
    draw(BitMapBackend::new(&png, size).into_drawing_area(), chart, sweep)
        .map_err(|e| format!("{}: {e}", png.display()))?;
    Ok((svg, png))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart, sweep: &str) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let values = chart.curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).chain(chart.chance);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(0.01);
    let x_max = chart.curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).fold(0.5f64, f64::max).min(1.0);
    let mut c = ChartBuilder::on(&root)
        .caption(format!("{sweep}: {} ({})", chart.task, chart.metric), ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (lo - pad)..(hi + pad))
        .map_err(e)?;
    c.configure_mesh().x_desc("fraction of layers dropped").y_desc(chart.metric.as_str()).draw().map_err(e)?;
    if let Some(level) = chart.chance {
        c.draw_series(DashedLineSeries::new([(0.0, level), (x_max, level)], 6, 4, BLACK.mix(0.6).stroke_width(1)))
            .map_err(e)?
            .label("chance")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.6)));
    }
    for (i, curve) in chart.curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(curve.points.iter().copied(), color.stroke_width(2)))
            .map_err(e)?
            .label(curve.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        c.draw_series(curve.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
    }
    c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, method: &str, x: f64, task: &str, metric: &str, value: f64) -> ExportRow {
        ExportRow {
            kind: kind.into(),
            model: "m".into(),
            method: method.into(),
            heal: "none".into(),
            fraction_dropped: Some(x),
            task: task.into(),
            metric: metric.into(),
            value,
            ..ExportRow::default()
        }
    }

    #[test]
    fn lines_start_at_the_baseline_and_charts_are_written() {
        let rows = vec![
            row("cell", "angular", 0.5, "mmlu", "accuracy", 0.3),
            row("baseline", "none", 0.0, "mmlu", "accuracy", 0.5),
            row("cell", "angular", 0.25, "mmlu", "accuracy", 0.45),
            row("cell", "deepest", 0.25, "mmlu", "accuracy", 0.4),
            row("cell", "angular", 0.25, "c4-loss", "loss", 4.0),
            row("cell", "angular", 0.25, "c4-loss", "normalized_loss", 0.4),
        ];
        let charts = charts(&rows);
        assert_eq!(charts.len(), 2);
        let c4 = &charts[0];
        assert_eq!((c4.task.as_str(), c4.metric.as_str(), c4.chance), ("c4-loss", "normalized_loss", Some(1.0)));
        let mmlu = &charts[1];
        assert_eq!(mmlu.chance, Some(0.25));
        assert_eq!(mmlu.curves[0].label, "m · angular · none");
        assert_eq!(mmlu.curves[0].points, vec![(0.0, 0.5), (0.25, 0.45), (0.5, 0.3)]);
        assert_eq!(mmlu.curves[1].points, vec![(0.0, 0.5), (0.25, 0.4)]);
        let dir = tempfile::tempdir().unwrap();
        let (svg, png) = write_chart(mmlu, "demo", dir.path()).unwrap();
        let text = std::fs::read_to_string(svg).unwrap();
        assert!(text.contains("demo: mmlu") && text.contains("m · angular · none"), "labels are in the SVG");
        assert!(std::fs::metadata(png).unwrap().len() > 1000);
    }

    #[test]
    fn hostile_names_and_infinite_values_stay_in_bounds() {
        let rows = vec![
            row("baseline", "none", 0.0, "../../escaped", "accuracy", 0.5),
            row("cell", "angular", 0.25, "../../escaped", "accuracy", f64::INFINITY),
            row("cell", "angular", 0.5, "../../escaped", "accuracy", 0.3),
        ];
        let charts = charts(&rows);
        assert_eq!(charts[0].curves[0].points, vec![(0.0, 0.5), (0.5, 0.3)], "the infinite value is left out");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plots");
        let (svg, png) = write_chart(&charts[0], "demo", &out).unwrap();
        assert_eq!((svg.parent(), png.parent()), (Some(out.as_path()), Some(out.as_path())));
        assert_eq!(svg.file_name().unwrap(), "______escaped.svg");
    }

    #[test]
    fn chart_svg_is_the_written_svg_and_escapes_names() {
        let mut rows = vec![row("baseline", "none", 0.0, "mmlu", "accuracy", 0.5)];
        rows.push(ExportRow { model: "<script>&".into(), ..row("cell", "angular", 0.25, "mmlu", "accuracy", 0.4) });
        let chart = &charts(&rows)[0];
        let svg = chart_svg(chart, "demo", (900, 600)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;&amp; · angular · none"), "the label is escaped");
        assert!(!svg.contains("<script>"));
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = write_chart(chart, "demo", dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(file).unwrap(), svg);
    }
}

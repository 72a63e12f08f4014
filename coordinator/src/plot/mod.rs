//! Accuracy-versus-depth curves, like Figs. 1–3 of Gromov et al. (2024): one chart per task,
//! x = fraction of layers dropped (and, on the top axis, layers dropped), y = the task's metric,
//! one colour per model × method with the healed variants solid and the unhealed dashed, each line
//! starting from its model's unpruned baseline (marked) at 0, error bars of one binomial standard
//! error on accuracies (the item count in the legend), and the chance level. [`heatmap`] draws a
//! score job's distance table (Fig. 4), [`table`] the results as a Markdown table. Everything here
//! reads only the export's rows, so a sweep's plots and table can be made again from its
//! `results.csv` / `results.parquet` and `distances.csv` alone (`coordinator plot --from DIR`).
//! Written as SVG and PNG with an embedded DejaVu Sans, so no system fonts are needed.

pub mod heatmap;
pub mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::export::ExportRow;

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// One measured value: at `x` (fraction dropped), `y`, and its standard error when the metric is
/// an accuracy over a known number of items.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Fraction of the layers dropped.
    pub x: f64,
    /// The metric.
    pub y: f64,
    /// One binomial standard error, `sqrt(p (1 - p) / n)` (accuracies with their `n`).
    pub se: Option<f64>,
}

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// `model · method · heal`.
    pub label: String,
    /// `model · method`: the lines of one group share a colour.
    pub group: String,
    /// Healed (solid) or not (`heal: none`, dashed).
    pub healed: bool,
    /// Items behind each accuracy (the largest of the line's), when the export has them.
    pub n: Option<u32>,
    /// The points, by fraction; the first is the baseline at 0 when the model has one.
    pub points: Vec<Point>,
}

/// A model's unpruned value, marked at x = 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// The model.
    pub model: String,
    /// Its value, with its standard error.
    pub point: Point,
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
    /// Each model's unpruned value.
    pub baselines: Vec<Baseline>,
    /// The models' layer count when they share one: the top axis counts layers dropped.
    pub layers: Option<u32>,
}

/// The metric a task is plotted by: accuracy when it has one, else the normalized loss
/// (loss / ln V, 1 = uniform guessing), else the loss.
pub(crate) fn metric_for(rows: &[&ExportRow]) -> Option<&'static str> {
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

/// One binomial standard error of an accuracy `p` over `n` items.
pub fn binomial_se(p: f64, n: u32) -> Option<f64> {
    (n > 0 && (0.0..=1.0).contains(&p)).then(|| (p * (1.0 - p) / f64::from(n)).sqrt())
}

/// Items behind each (job, task)'s results: the export's `n` rows.
pub(crate) fn item_counts(rows: &[ExportRow]) -> BTreeMap<(i64, &str), u32> {
    rows.iter()
        .filter(|r| r.metric == "n" && r.value.is_finite() && r.value >= 0.0)
        .map(|r| ((r.job_id, r.task.as_str()), r.value as u32))
        .collect()
}

/// A row's value as a point: its standard error when it is an accuracy with a known `n`.
fn point(r: &ExportRow, x: f64, counts: &BTreeMap<(i64, &str), u32>) -> (Point, Option<u32>) {
    let n = counts.get(&(r.job_id, r.task.as_str())).copied();
    let se = if r.metric == "accuracy" { n.and_then(|n| binomial_se(r.value, n)) } else { None };
    (Point { x, y: r.value, se }, n)
}

/// Groups export rows into charts (tasks in name order, lines by label).
pub fn charts(rows: &[ExportRow]) -> Vec<Chart> {
    let counts = item_counts(rows);
    let mut by_task: BTreeMap<&str, Vec<&ExportRow>> = BTreeMap::new();
    for r in rows {
        by_task.entry(r.task.as_str()).or_default().push(r);
    }
    let mut out = Vec::new();
    for (task, rows) in by_task {
        let Some(metric) = metric_for(&rows) else { continue };
        let rows: Vec<&ExportRow> = rows.into_iter().filter(|r| r.metric == metric).collect();
        let baselines: BTreeMap<&str, Point> = rows
            .iter()
            .filter(|r| r.kind == "baseline" && r.value.is_finite())
            .map(|r| (r.model.as_str(), point(r, 0.0, &counts).0))
            .collect();
        let mut lines: BTreeMap<String, Curve> = BTreeMap::new();
        // A non-finite value (a diverged loss stored before values were checked) has no place on
        // an axis: it is left out, not drawn to infinity.
        for r in rows.iter().filter(|r| r.kind == "cell" && r.value.is_finite()) {
            let Some(x) = r.fraction_dropped.filter(|x| x.is_finite()) else { continue };
            let label = format!("{} · {} · {}", r.model, r.method, r.heal);
            let line = lines.entry(label.clone()).or_insert_with(|| Curve {
                label,
                group: format!("{} · {}", r.model, r.method),
                healed: r.heal != "none",
                n: None,
                points: baselines.get(r.model.as_str()).copied().into_iter().collect(),
            });
            let (p, n) = point(r, x, &counts);
            line.points.push(p);
            line.n = line.n.max(n);
        }
        let curves = lines
            .into_values()
            .map(|mut c| {
                c.points.sort_by(|a, b| a.x.total_cmp(&b.x));
                c
            })
            .collect();
        let mut layer_counts = rows.iter().filter_map(|r| r.num_layers).collect::<Vec<_>>();
        layer_counts.sort_unstable();
        layer_counts.dedup();
        out.push(Chart {
            task: task.to_string(),
            metric: metric.to_string(),
            chance: chance(task, metric),
            curves,
            baselines: baselines.into_iter().map(|(model, point)| Baseline { model: model.into(), point }).collect(),
            layers: match layer_counts.as_slice() {
                [l, rest @ ..] if *l > 0 && rest.iter().all(|x| x == l) => Some(*l),
                _ => None,
            },
        });
    }
    out
}

/// A name as a file name: letters, digits, `-` and `_` kept, anything else (a path separator, a
/// dot) replaced by `_`, so that a name from the store never writes outside the plot folder.
pub(crate) fn file_stem(name: &str) -> String {
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '_' }).collect();
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

/// Writes `dir/<stem>.svg` and `dir/<stem>.png` (the name made safe as a file name) with `draw`,
/// `size` pixels; returns the two paths.
pub(crate) fn write_figure(
    dir: &Path,
    name: &str,
    size: (u32, u32),
    draw_svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
    draw_png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
) -> Result<(PathBuf, PathBuf), String> {
    register_font();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stem = file_stem(name);
    let (svg, png) = (dir.join(format!("{stem}.svg")), dir.join(format!("{stem}.png")));
    draw_svg(SVGBackend::new(&svg, size).into_drawing_area()).map_err(|e| format!("{}: {e}", svg.display()))?;
    draw_png(BitMapBackend::new(&png, size).into_drawing_area()).map_err(|e| format!("{}: {e}", png.display()))?;
    Ok((svg, png))
}

/// Writes `dir/<task>.svg` and `dir/<task>.png` at 900 × 600; returns the two paths.
pub fn write_chart(chart: &Chart, sweep: &str, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    write_figure(dir, &chart.task, (900, 600), |a| draw(a, chart, sweep), |a| draw(a, chart, sweep))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart, sweep: &str) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let bars = |p: &Point| [p.y - p.se.unwrap_or(0.0), p.y + p.se.unwrap_or(0.0)];
    let values = chart
        .curves
        .iter()
        .flat_map(|c| c.points.iter().flat_map(bars))
        .chain(chart.baselines.iter().flat_map(|b| bars(&b.point)))
        .chain(chart.chance);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(0.01);
    let x_max = chart.curves.iter().flat_map(|c| c.points.iter().map(|p| p.x)).fold(0.5f64, f64::max).min(1.0);
    let layers = chart.layers.map_or(0.0, f64::from);
    let y_range = (lo - pad)..(hi + pad);
    // A little room left of 0, so the baseline's marker is drawn whole.
    let x_pad = x_max * 0.02;
    let mut c = ChartBuilder::on(&root)
        .caption(format!("{sweep}: {} ({})", chart.task, chart.metric), ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(45)
        .top_x_label_area_size(if chart.layers.is_some() { 45 } else { 0 })
        .y_label_area_size(60)
        .build_cartesian_2d(-x_pad..x_max + x_pad, y_range.clone())
        .map_err(e)?
        .set_secondary_coord(-x_pad * layers.max(1.0)..(x_max + x_pad) * layers.max(1.0), y_range);
    let with_se = chart.curves.iter().any(|c| c.points.iter().any(|p| p.se.is_some()));
    let y_desc = if with_se { format!("{} (± 1 s.e.)", chart.metric) } else { chart.metric.clone() };
    c.configure_mesh()
        .x_desc("fraction of layers dropped")
        .y_desc(y_desc)
        .max_light_lines(1)
        .light_line_style(BLACK.mix(0.04))
        .draw()
        .map_err(e)?;
    if let Some(l) = chart.layers {
        let whole = |v: &f64| {
            if (v - v.round()).abs() < 1e-6 && *v > -0.5 {
                format!("{}", v.round() as i64)
            } else {
                String::new()
            }
        };
        c.configure_secondary_axes()
            .x_desc(format!("layers dropped (of {l})"))
            .x_labels(((x_max * layers) as usize + 1).clamp(2, 16))
            .x_label_formatter(&whole)
            .draw()
            .map_err(e)?;
    }
    if let Some(level) = chart.chance {
        c.draw_series(DashedLineSeries::new([(0.0, level), (x_max, level)], 3, 5, BLACK.mix(0.5).stroke_width(1)))
            .map_err(e)?
            .label("chance")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.5)));
    }
    let groups: Vec<&str> = chart.curves.iter().fold(Vec::new(), |mut g, c| {
        if !g.contains(&c.group.as_str()) {
            g.push(c.group.as_str());
        }
        g
    });
    for curve in &chart.curves {
        let color = Palette99::pick(groups.iter().position(|g| *g == curve.group).unwrap_or(0)).to_rgba();
        let xy = curve.points.iter().map(|p| (p.x, p.y));
        let label = match curve.n {
            Some(n) => format!("{} (n = {n})", curve.label),
            None => curve.label.clone(),
        };
        let style = color.stroke_width(2);
        let series = if curve.healed {
            c.draw_series(LineSeries::new(xy, style)).map_err(e)?
        } else {
            c.draw_series(DashedLineSeries::new(xy, 9, 6, style)).map_err(e)?
        };
        let healed = curve.healed;
        // The legend's sample: one stroke, or two for a dashed line.
        let (first, second) = if healed { ((0, 18), (18, 18)) } else { ((0, 7), (11, 18)) };
        series.label(label).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new([(first.0, 0), (first.1, 0)], style)
                + PathElement::new([(second.0, 0), (second.1, 0)], style)
        });
        let errors = curve.points.iter().filter_map(|p| p.se.map(|s| (p, s)));
        c.draw_series(
            errors.map(|(p, s)| ErrorBar::new_vertical(p.x, p.y - s, p.y, p.y + s, color.stroke_width(1), 8)),
        )
        .map_err(e)?;
        let marker = if curve.healed { color.filled() } else { color.stroke_width(2) };
        c.draw_series(curve.points.iter().filter(|p| p.x > 0.0).map(|p| Circle::new((p.x, p.y), 4, marker)))
            .map_err(e)?;
    }
    for b in &chart.baselines {
        let p = b.point;
        let label = if chart.baselines.len() > 1 { format!("{} unpruned", b.model) } else { "unpruned".into() };
        c.draw_series(std::iter::once(TriangleMarker::new((p.x, p.y), 8, BLACK.filled())))
            .map_err(e)?
            .label(label)
            .legend(|(x, y)| TriangleMarker::new((x + 9, y), 6, BLACK.filled()));
        if let Some(s) = p.se {
            c.draw_series(std::iter::once(ErrorBar::new_vertical(
                p.x,
                p.y - s,
                p.y,
                p.y + s,
                BLACK.stroke_width(1),
                8,
            )))
            .map_err(e)?;
        }
    }
    let position =
        if chart.metric == "accuracy" { SeriesLabelPosition::LowerLeft } else { SeriesLabelPosition::UpperLeft };
    c.configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
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

    fn xy(c: &Curve) -> Vec<(f64, f64)> {
        c.points.iter().map(|p| (p.x, p.y)).collect()
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
        assert_eq!(xy(&mmlu.curves[0]), vec![(0.0, 0.5), (0.25, 0.45), (0.5, 0.3)]);
        assert_eq!(xy(&mmlu.curves[1]), vec![(0.0, 0.5), (0.25, 0.4)]);
        assert_eq!(mmlu.baselines[0].point.y, 0.5);
        let dir = tempfile::tempdir().unwrap();
        let (svg, png) = write_chart(mmlu, "demo", dir.path()).unwrap();
        let text = std::fs::read_to_string(svg).unwrap();
        assert!(text.contains("demo: mmlu") && text.contains("m · angular · none"), "labels are in the SVG");
        assert!(text.contains("unpruned"), "the baseline is marked");
        assert!(std::fs::metadata(png).unwrap().len() > 1000);
    }

    #[test]
    fn accuracies_get_binomial_error_bars_and_healed_lines_are_solid() {
        let mut rows = Vec::new();
        for (job_id, kind, heal, x, acc) in
            [(1, "baseline", "none", 0.0, 0.6), (2, "cell", "none", 0.2, 0.5), (3, "cell", "qlora", 0.2, 0.55)]
        {
            let r = ExportRow {
                job_id,
                heal: heal.into(),
                num_layers: Some(30),
                ..row(kind, "deepest", x, "boolq", "accuracy", acc)
            };
            rows.push(ExportRow { metric: "n".into(), value: 200.0, ..r.clone() });
            rows.push(r);
        }
        let chart = &charts(&rows)[0];
        assert_eq!(chart.layers, Some(30));
        let (healed, unhealed) = (&chart.curves[1], &chart.curves[0]);
        assert_eq!((healed.healed, unhealed.healed), (true, false));
        assert_eq!(healed.group, unhealed.group, "one colour per method");
        assert_eq!(healed.n, Some(200));
        let se = healed.points[1].se.unwrap();
        assert!((se - (0.55f64 * 0.45 / 200.0).sqrt()).abs() < 1e-12, "{se}");
        assert_eq!(chart.baselines[0].point.se, binomial_se(0.6, 200));
        let svg = chart_svg(chart, "s", (900, 600)).unwrap();
        assert!(svg.contains("layers dropped (of 30)"), "the top axis counts layers");
        assert!(svg.contains("(n = 200)") && svg.contains("accuracy (± 1 s.e.)"));
        assert_eq!(binomial_se(0.5, 0), None);
    }

    #[test]
    fn hostile_names_and_infinite_values_stay_in_bounds() {
        let rows = vec![
            row("baseline", "none", 0.0, "../../escaped", "accuracy", 0.5),
            row("cell", "angular", 0.25, "../../escaped", "accuracy", f64::INFINITY),
            row("cell", "angular", 0.5, "../../escaped", "accuracy", 0.3),
        ];
        let charts = charts(&rows);
        assert_eq!(xy(&charts[0].curves[0]), vec![(0.0, 0.5), (0.5, 0.3)], "the infinite value is left out");
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

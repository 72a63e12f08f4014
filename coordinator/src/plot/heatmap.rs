//! A score job's angular distances `d(l, n)` as a heatmap, for the sweep page (SVG) and the
//! sweep's plots folder (SVG + PNG): x is the first layer of the block `l`, y the block size `n`,
//! the most similar block of each `n` (the one the angular method drops) outlined in red, and a
//! colour bar. It is the worker's `score --plot` heatmap (Fig. 4 of Gromov et al. 2024) drawn from
//! the coordinator's stored table or the exported `distances.csv`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use crate::store::DistanceRow;

/// `rows`' `angular` entries by (n, l); non-finite values are left out (drawn as blank cells).
fn angular_cells(rows: &[DistanceRow]) -> BTreeMap<(u32, u32), f64> {
    rows.iter()
        .filter(|r| r.metric == "angular" && r.value.is_finite() && r.n >= 1)
        .map(|r| ((r.n, r.l), r.value))
        .collect()
}

/// The heatmap of `rows`' `angular` entries as an SVG document of `size` pixels; `None` when
/// there are none.
pub fn heatmap_svg(rows: &[DistanceRow], title: &str, size: (u32, u32)) -> Result<Option<String>, String> {
    let cells = angular_cells(rows);
    if cells.is_empty() {
        return Ok(None);
    }
    super::register_font();
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, size).into_drawing_area(), &cells, title)?;
    Ok(Some(svg))
}

/// Writes the heatmap as `dir/<name>.svg` and `.png` (720 × 560, `name` made safe as a file
/// name); `None` when `rows` have no angular distances.
pub fn write_heatmap(
    rows: &[DistanceRow],
    title: &str,
    dir: &Path,
    name: &str,
) -> Result<Option<(PathBuf, PathBuf)>, String> {
    let cells = angular_cells(rows);
    if cells.is_empty() {
        return Ok(None);
    }
    super::write_figure(dir, name, (720, 560), |a| draw(a, &cells, title), |a| draw(a, &cells, title)).map(Some)
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    cells: &BTreeMap<(u32, u32), f64>,
    title: &str,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (w, _) = root.dim_in_pixel();
    let (main, legend) = root.split_horizontally(w.saturating_sub(130));
    // The layer count: the deepest block's end.
    let layers = cells.keys().map(|(n, l)| n + l).max().unwrap_or(1).max(1);
    let (lo, hi) = cells.values().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let color = |v: f64| ViridisRGB::get_color_normalized(v, lo, lo + span);

    let ticks = (2 * layers as usize + 2).min(16);
    let whole = |v: &f64| if (v - v.round()).abs() < 1e-6 { format!("{}", v.round() as i64) } else { String::new() };
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(42)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..f64::from(layers) - 0.5, 0.5f64..f64::from(layers) + 0.5)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("l: first layer of the block")
        .y_desc("n: layers in the block")
        // Ticks every half layer or coarser: only the whole ones are labelled (a cell's centre).
        .x_labels(ticks)
        .y_labels(ticks)
        .x_label_formatter(&whole)
        .y_label_formatter(&whole)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(e)?;
    let square = |n: u32, l: u32| {
        let (x, y) = (f64::from(l), f64::from(n));
        [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)]
    };
    chart.draw_series(cells.iter().map(|(&(n, l), &v)| Rectangle::new(square(n, l), color(v).filled()))).map_err(e)?;
    // The most similar block of each size.
    let mut best: BTreeMap<u32, (u32, f64)> = BTreeMap::new();
    for (&(n, l), &v) in cells {
        if best.get(&n).is_none_or(|&(_, b)| v < b) {
            best.insert(n, (l, v));
        }
    }
    chart.draw_series(best.iter().map(|(&n, &(l, _))| Rectangle::new(square(n, l), RED.stroke_width(2)))).map_err(e)?;

    let mut bar = ChartBuilder::on(&legend)
        .margin_top(40)
        .margin_bottom(52)
        .margin_right(48)
        .y_label_area_size(46)
        .build_cartesian_2d(0f64..1f64, lo..lo + span)
        .map_err(e)?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(e)?;
    let steps = 50;
    bar.draw_series((0..steps).map(|i| {
        let a = lo + span * f64::from(i) / f64::from(steps);
        let b = lo + span * f64::from(i + 1) / f64::from(steps);
        Rectangle::new([(0.0, a), (1.0, b)], color((a + b) / 2.0).filled())
    }))
    .map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(metric: &str, n: u32, l: u32, value: f64) -> DistanceRow {
        DistanceRow { metric: metric.into(), n, l, value }
    }

    #[test]
    fn one_cell_per_block_and_the_best_outlined() {
        let layers = 4u32;
        let mut rows: Vec<DistanceRow> = (1..=layers)
            .flat_map(|n| (0..=layers - n).map(move |l| (n, l)))
            .map(|(n, l)| row("angular", n, l, 0.1 * f64::from(n) + 0.01 * f64::from(l)))
            .collect();
        rows.push(row("block_influence", 1, 0, 0.5));
        rows.push(row("angular", 2, 9, f64::NAN));
        let svg = heatmap_svg(&rows, "m <&>: angular distance", (720, 480)).unwrap().unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("m &lt;&amp;&gt;: angular distance"), "the title is escaped");
        // 10 cells + 4 outlines + 50 bar steps + the background and the plot areas' fills.
        let rects = svg.matches("<rect").count();
        assert!(rects >= 10 + 4 + 50, "{rects} rects");
        let outlines = svg.matches("stroke=\"#FF0000\"").count();
        assert_eq!(outlines, 4, "one outline per block size");
        // The axes label whole layers only, each once: l = 0..3, n = 1..4.
        let labels: Vec<&str> = svg
            .split("</text>")
            .filter_map(|t| t.rsplit('>').next().map(str::trim))
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '-'))
            .collect();
        assert_eq!(labels, ["1", "2", "3", "4", "0", "1", "2", "3"], "{labels:?}");
        assert_eq!(heatmap_svg(&[row("block_influence", 1, 0, 0.5)], "t", (720, 480)).unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let (svg, png) = write_heatmap(&rows, "m", dir.path(), "heatmap-m").unwrap().unwrap();
        assert!(std::fs::read_to_string(svg).unwrap().contains("<rect"));
        assert!(std::fs::metadata(png).unwrap().len() > 1000);
    }
}

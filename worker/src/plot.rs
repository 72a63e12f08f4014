//! Heatmap of the angular distances `d(l, n)` (x: first layer of the block `l`, y: block size `n`),
//! like Fig. 4 of Gromov et al. (2024), as SVG and PNG. `l*(n)` is outlined in each row. Text uses
//! an embedded DejaVu Sans, so no system fonts are needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use crate::score::AngularDistances;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the embedded font did not load; plots will have no text");
        }
    });
}

/// `base` with its extension replaced: `heat` / `heat.svg` / `heat.png` → `heat.svg`, `heat.png`.
pub fn plot_paths(base: &Path) -> (PathBuf, PathBuf) {
    let stem = match base.extension().and_then(|e| e.to_str()) {
        Some("svg" | "png") => base.with_extension(""),
        _ => base.to_path_buf(),
    };
    (stem.with_extension("svg"), stem.with_extension("png"))
}

/// Writes the heatmap as `<base>.svg` and `<base>.png`; returns the two paths.
pub fn write_heatmap(distances: &AngularDistances, title: &str, base: &Path) -> Result<(PathBuf, PathBuf), String> {
    register_font();
    let (svg, png) = plot_paths(base);
    let size = (900u32, 760u32);
    draw(SVGBackend::new(&svg, size).into_drawing_area(), distances, title)
        .map_err(|e| format!("{}: {e}", svg.display()))?;
    draw(BitMapBackend::new(&png, size).into_drawing_area(), distances, title)
        .map_err(|e| format!("{}: {e}", png.display()))?;
    Ok((svg, png))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, d: &AngularDistances, title: &str) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (w, _) = root.dim_in_pixel();
    let (main, legend) = root.split_horizontally(w - 120);
    let layers = d.num_layers;
    let values = (1..=layers).flat_map(|n| d.row(n).iter().copied());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let color = |v: f64| ViridisRGB::get_color_normalized(v, lo, lo + span);

    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..layers as f64 - 0.5, 0.5f64..layers as f64 + 0.5)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("l: first layer of the block")
        .y_desc("n: layers in the block")
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_label_formatter(&|v| format!("{}", v.round() as i64))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    let cells = (1..=layers).flat_map(|n| d.row(n).iter().enumerate().map(move |(l, &v)| (l as f64, n as f64, v)));
    chart
        .draw_series(cells.map(|(l, n, v)| Rectangle::new([(l - 0.5, n - 0.5), (l + 0.5, n + 0.5)], color(v).filled())))
        .map_err(e)?;
    let best = (1..=layers).filter_map(|n| d.best_start(n).ok().map(|(l, _)| (l as f64, n as f64)));
    chart
        .draw_series(best.map(|(l, n)| Rectangle::new([(l - 0.5, n - 0.5), (l + 0.5, n + 0.5)], RED.stroke_width(2))))
        .map_err(e)?;

    // Colour bar.
    let mut bar = ChartBuilder::on(&legend)
        .margin_top(45)
        .margin_bottom(57)
        .margin_right(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, lo..lo + span)
        .map_err(e)?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    let steps = 100;
    bar.draw_series((0..steps).map(|i| {
        let a = lo + span * i as f64 / steps as f64;
        let b = lo + span * (i + 1) as f64 / steps as f64;
        Rectangle::new([(0.0, a), (1.0, b)], color((a + b) / 2.0).filled())
    }))
    .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

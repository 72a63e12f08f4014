//! `worker score`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prunesweep_worker::model::Model;
use prunesweep_worker::plot::write_heatmap;
use prunesweep_worker::score::{self, Calibration, Scores};
use serde_json::json;

use super::{CalibrationArgs, ModelArgs};

/// Arguments of `worker score`.
#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Distances CSV (`n,l,distance`, every pair); Block Influence goes to `<stem>.block-influence.csv`.
    #[arg(long)]
    out: PathBuf,
    /// Also draw the d(l, n) heatmap as FILE.svg and FILE.png.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run the model one layer at a time: each block is read from the checkpoint, applied to
    /// every calibration batch and dropped, so a model larger than the device (or the host) is
    /// scored in its own dtype. Same numbers as without it. HF safetensors checkpoints only; not
    /// with --drop or --adapter.
    #[arg(long, alias = "stream-layers", conflicts_with_all = ["drop", "adapter"])]
    streamed: bool,
}

/// Where the Block Influence CSV of a distances file lives.
pub fn influence_path(distances: &Path) -> PathBuf {
    distances.with_extension("block-influence.csv")
}

/// The scoring stage ([`score::run`]) with a progress bar.
pub fn score_with_progress(model: &Model, cal: &CalibrationArgs) -> anyhow::Result<(Calibration, Scores)> {
    let spec = cal.spec().context("--data is required to score (a calibration text file)")?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("scoring {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})")
            .expect("the template is valid"),
    );
    let out = score::run(&model.decoder, &model.tokenizer, &spec, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(out)
}

/// [`score::run_streamed`] with a progress bar (blocks done); returns the model's description.
fn score_streamed(args: &ScoreArgs) -> anyhow::Result<(Calibration, Scores, String)> {
    let spec = args.calibration.spec().context("--data is required to score (a calibration text file)")?;
    let (device, dtype) = args.model.device_and_dtype()?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("scoring, layer by layer {bar:40} {pos}/{len} blocks (eta {eta})")
            .expect("the template is valid"),
    );
    let (cal, scores) = score::run_streamed(&args.model.model, &device, dtype, &spec, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok((cal, scores, format!("{} (layer-streamed)", args.model.model.display())))
}

/// Scores, writes the CSVs (and plot), prints the summary.
pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    // The model as the summary names it, and as the heatmap's title does.
    let (calibration, scores, described, titled) = if args.streamed {
        let (calibration, scores, described) = score_streamed(&args)?;
        let name = args.model.model.file_name().map_or(described.clone(), |n| n.to_string_lossy().into_owned());
        (calibration, scores, described, name)
    } else {
        let model = args.model.load()?;
        let (calibration, scores) = score_with_progress(&model, &args.calibration)?;
        (calibration, scores, model.describe(), model.decoder.cfg.family.model_type().to_string())
    };
    let d = &scores.distances;
    std::fs::write(&args.out, d.to_csv()).with_context(|| format!("writing {}", args.out.display()))?;
    let bi_path = influence_path(&args.out);
    let bi_csv: String = std::iter::once("layer,score".to_string())
        .chain(scores.influence.scores.iter().enumerate().map(|(l, s)| format!("{l},{s:?}")))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&bi_path, bi_csv + "\n").with_context(|| format!("writing {}", bi_path.display()))?;
    if let Some(plot) = &args.plot {
        let title = format!("d(l, n), {titled} ({} samples)", d.samples);
        let (svg, png) = write_heatmap(d, &title, plot).map_err(anyhow::Error::msg)?;
        tracing::info!(svg = %svg.display(), png = %png.display(), "wrote heatmap");
    }
    let tok_s = scores.tokens as f64 / scores.seconds;
    let best: Vec<(usize, usize, f64)> =
        (1..=d.num_layers).map(|n| d.best_start(n).map(|(l, v)| (n, l, v))).collect::<Result<_, _>>()?;
    if args.json {
        let summary = json!({
            "model": described,
            "layers": d.num_layers,
            "samples": d.samples,
            "skipped_short": calibration.skipped_short,
            "tokens": scores.tokens,
            "seconds": scores.seconds,
            "tokens_per_second": tok_s,
            "best": best.iter().map(|(n, l, v)| json!({"n": n, "start": l, "distance": v})).collect::<Vec<_>>(),
            "block_influence": scores.influence.scores,
            "distances_csv": args.out,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{:>3}  {:>4}  {:>9}  dropped layers", "n", "l*", "d(l*,n)");
        for (n, l, v) in &best {
            println!("{n:>3}  {l:>4}  {v:>9.5}  {l}..={}", l + n - 1);
        }
        println!(
            "{} samples ({} skipped as too short), {} tokens in {:.1}s: {:.0} tokens/s",
            d.samples, calibration.skipped_short, scores.tokens, scores.seconds, tok_s
        );
    }
    Ok(())
}

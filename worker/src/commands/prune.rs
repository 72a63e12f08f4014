//! `worker prune`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use prunesweep_worker::data::file_sha256;
use prunesweep_worker::model::LayerBlock;
use prunesweep_worker::prune::{self, Amount, LayerScores, Method, PrunePlan, PruneSpec};
use prunesweep_worker::score::{AngularDistances, BlockInfluence};
use serde_json::json;

use super::score::{influence_path, score_with_progress};
use super::{CalibrationArgs, ModelArgs};

/// Arguments of `worker prune`.
#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Drop exactly layers START..START+N-1 (0-based, half-open).
    #[arg(long, value_name = "START:N", conflicts_with_all = ["fraction", "n"])]
    layers: Option<LayerBlock>,
    /// Share of the layers to drop, in [0, 1): n = round(F * L) (half away from zero).
    #[arg(long, value_name = "F", conflicts_with = "n", allow_negative_numbers = true)]
    fraction: Option<f64>,
    /// Number of layers to drop (instead of --fraction).
    #[arg(long)]
    n: Option<usize>,
    /// How to choose the layers: angular (smallest d(l, n), the paper), deepest (the n layers
    /// before the last, the paper's heuristic), block-influence (ShortGPT, not contiguous).
    #[arg(long, value_enum, default_value = "angular")]
    method: Method,
    /// Reuse a distances CSV from `worker score` (its .block-influence.csv sibling for
    /// block-influence) instead of scoring again with --data.
    #[arg(long, conflicts_with = "data")]
    distances: Option<PathBuf>,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Output HF directory (replaced if it exists), with prunesweep.json describing the cut.
    #[arg(long)]
    out: PathBuf,
}

/// Chooses the layers, removes them, writes the directory.
pub fn run(args: PruneArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.adapter.is_none(),
        "--adapter: prune writes base weights only; merge the adapter first (worker heal --merge) and prune that"
    );
    let mut model = args.model.load()?;
    let layers = model.decoder.num_blocks();
    let kept_before = model.decoder.kept_layers();
    let mut provenance = json!({});
    let plan = if let Some(block) = args.layers {
        PrunePlan::explicit(block.start, block.n, layers)?
    } else {
        let amount = match (args.fraction, args.n) {
            (Some(f), _) => Amount::Fraction(f),
            (None, Some(n)) => Amount::N(n),
            (None, None) => bail!("say how much to drop: --fraction F, --n N or --layers START:N"),
        };
        let spec = PruneSpec { method: args.method, amount };
        let (distances, influence) = if !spec.method.needs_scores() {
            (None, None)
        } else if let Some(path) = &args.distances {
            provenance = json!({"distances_file": path, "sha256": file_sha256(path)?});
            let influence = match spec.method {
                Method::BlockInfluence => Some(read_influence(&influence_path(path), layers)?),
                _ => None,
            };
            (Some(AngularDistances::read_csv(path, Some(layers))?), influence)
        } else if let Some(data) = &args.calibration.data {
            let (cal, scores) = score_with_progress(&model, &args.calibration)?;
            provenance = json!({
                "data": data, "sha256": file_sha256(data)?, "samples": scores.distances.samples,
                "skipped_short": cal.skipped_short, "seq_len": args.calibration.seq_len,
                "tokens": scores.tokens,
            });
            (Some(scores.distances), Some(scores.influence))
        } else {
            bail!("--method {} needs --distances FILE or --data FILE to score", spec.method.name())
        };
        spec.plan(layers, LayerScores { distances: distances.as_ref(), influence: influence.as_ref() })?
    };
    let dropped = prune::run(&mut model.decoder, &plan)?;
    let meta = json!({
        "prunesweep_version": env!("CARGO_PKG_VERSION"),
        "source_model": args.model.model,
        "family": model.decoder.cfg.family.model_type(),
        "num_layers": model.decoder.cfg.num_layers,
        "layers_before": kept_before,
        "dropped_layers": dropped,
        "kept_layers": model.decoder.kept_layers(),
        "method": plan.method.map_or("explicit".into(), Method::name),
        "n": plan.n,
        "fraction": args.fraction,
        "score": plan.score,
        "calibration": provenance,
    });
    model.save_hf(&args.out, &[("prunesweep.json", meta.clone())])?;
    println!("{}", serde_json::to_string_pretty(&meta)?);
    tracing::info!(out = %args.out.display(), dropped = ?dropped, "wrote the pruned model");
    Ok(())
}

fn read_influence(path: &std::path::Path, layers: usize) -> anyhow::Result<BlockInfluence> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("{}: block influence scores (written by `worker score`) are needed", path.display())
    })?;
    let scores: Vec<f64> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').nth(1).and_then(|v| v.trim().parse().ok()))
        .collect::<Option<_>>()
        .with_context(|| format!("{}: expected `layer,score` rows", path.display()))?;
    if scores.len() != layers {
        bail!("{}: {} layers scored, the model has {layers}", path.display(), scores.len());
    }
    Ok(BlockInfluence { scores })
}

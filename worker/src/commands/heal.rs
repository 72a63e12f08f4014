//! `worker heal`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prunesweep_proto::defaults;
use prunesweep_worker::allocator;
use prunesweep_worker::data::file_sha256;
use prunesweep_worker::heal::{self, HealConfig, HealEnd, HealSpec, Recompute, TargetSet, EXIT_PREEMPTED};
use serde_json::json;

use super::{Base, ModelArgs};

/// Arguments of `worker heal`. Defaults: [`HealConfig::default`], the paper's (App. A.1), the
/// same a sweep's heal variant gets.
#[derive(Args)]
pub struct HealArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training text (C4 train): JSON lines / json.gz with `text`, Parquet with `text`, or text.
    #[arg(long)]
    data: PathBuf,
    /// Skip this many documents first (keep healing data apart from scoring and evaluation).
    #[arg(long, default_value_t = 0)]
    first_doc: usize,
    /// Optimizer updates.
    #[arg(long, default_value_t = HealConfig::default().steps)]
    steps: usize,
    /// Sequences per update (global batch).
    #[arg(long, default_value_t = HealConfig::default().batch)]
    batch: usize,
    /// Sequences per forward/backward pass (gradients are accumulated to --batch); default: 4 when
    /// it divides --batch, else --batch.
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Tokens per packed sequence (documents joined with EOS).
    #[arg(long, default_value_t = HealConfig::default().seq_len)]
    seq_len: usize,
    /// LoRA rank r.
    #[arg(long, default_value_t = HealConfig::default().rank)]
    rank: usize,
    /// LoRA α (the update is scaled by α/r); default: = rank.
    #[arg(long)]
    alpha: Option<f64>,
    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = HealConfig::default().dropout)]
    dropout: f32,
    /// Peak learning rate (cosine schedule, decaying to 0).
    #[arg(long, default_value_t = HealConfig::default().lr)]
    lr: f64,
    /// Linear warmup updates; default: 100, or a tenth of a shorter run.
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = HealConfig::default().weight_decay)]
    weight_decay: f64,
    /// `ffn` (the paper: gate/up/down; gate_up/down on Phi-3, fc1/fc2 on Phi-2), `all-linear`,
    /// `attention`, or module names separated by commas (e.g. q_proj,v_proj).
    #[arg(long, default_value = "ffn")]
    targets: TargetSet,
    /// Seeds adapter initialization and dropout.
    #[arg(long, default_value_t = HealConfig::default().seed)]
    seed: u64,
    /// Write a checkpoint every K updates (also at the end and on SIGTERM/SIGINT).
    #[arg(long, default_value_t = HealConfig::default().checkpoint_every)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint.safetensors when it exists (same settings required).
    #[arg(long)]
    resume: bool,
    /// Also write OUT/merged: an HF directory with the adapters merged into the dequantized weights.
    #[arg(long)]
    merge: bool,
    /// Train against the dense base instead of the NF4 one (plain LoRA, not QLoRA).
    #[arg(long)]
    no_quantize: bool,
    /// Which blocks keep their activations for the backward pass; the others are recomputed from
    /// their saved inputs (the same gradients, one more block forward pass each): `fit`, as many
    /// of the top blocks as 90% of the free memory holds beside the rest of the run; `all`; or a
    /// number of top blocks (0: every block recomputed, the least memory, e.g. beside other jobs).
    #[arg(long, default_value = "fit", value_name = "fit|all|N")]
    keep_graphs: Recompute,
    /// Keep every block's activations: `--keep-graphs all`.
    #[arg(long, conflicts_with = "keep_graphs")]
    no_recompute: bool,
    /// Output folder: the PEFT adapter (adapter_config.json, adapter_model.safetensors),
    /// prunesweep.json, checkpoint.safetensors and train_log.csv.
    #[arg(long)]
    out: PathBuf,
}

impl HealArgs {
    fn spec(&self) -> HealSpec {
        let config = HealConfig {
            steps: self.steps,
            batch: self.batch,
            micro_batch: self.micro_batch.unwrap_or_else(|| defaults::micro_batch_size(self.batch as u32) as usize),
            seq_len: self.seq_len,
            rank: self.rank,
            alpha: self.alpha.unwrap_or_else(|| defaults::lora_alpha(self.rank as u32)),
            dropout: self.dropout,
            targets: self.targets.clone(),
            lr: self.lr,
            warmup: self.warmup.unwrap_or_else(|| defaults::warmup_steps(self.steps as u32) as usize),
            weight_decay: self.weight_decay,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            quantize: !self.no_quantize,
            recompute: if self.no_recompute { Recompute::NONE } else { self.keep_graphs },
            ..HealConfig::default()
        };
        HealSpec { data: self.data.clone(), first_doc: self.first_doc, config }
    }
}

/// Trains, writes the adapter; exits with code 75 when stopped by a signal (requeue with --resume).
pub fn run(args: HealArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    // A QLoRA base is quantized while it loads; `--merge` needs only the NF4 weights too (it
    // merges into their dequantized values).
    let mut model = args.model.load_base(if args.no_quantize { Base::Dense } else { Base::Nf4 })?;
    let spec = args.spec();
    let identity = json!({
        "model": args.model.model,
        "drop": args.model.drop.map(|d| d.to_string()),
        "kept_layers": model.decoder.kept_layers(),
        "data_sha256": file_sha256(&args.data)?,
        "first_doc": args.first_doc,
    });
    let description = model.describe();
    let mut trainer = heal::prepare(&mut model, &spec, &args.out, identity.clone(), args.resume)?;
    let (qp, qb) = trainer.quantized;
    if qp > 0 {
        tracing::info!(params = qp, bytes = qb, bytes_per_param = format!("{:.4}", qb as f64 / qp as f64), "NF4 base");
    }
    tracing::info!(
        model = %description,
        trainable = trainer.trainable_params(),
        targets = ?trainer.lora().targets,
        start = trainer.step(),
        kept_graphs = trainer.kept_graphs(),
        "healing (the blocks below the top `kept_graphs` are recomputed in the backward pass)"
    );
    let steps = trainer.config().steps;
    let pb = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("heal {bar:30} {pos}/{len} {msg} (eta {eta})").expect("the template is valid"),
    );
    pb.set_position(trainer.step() as u64);
    let end = trainer.run(&stop, &mut |s| {
        pb.set_position(s.step as u64);
        pb.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", s.loss, s.lr, s.tokens as f64 / s.seconds));
    })?;
    pb.finish_and_clear();
    if end == HealEnd::Preempted {
        eprintln!(
            "heal: stopped by a signal at step {}; checkpoint written to {}. Rerun with --resume to continue.",
            trainer.step(),
            trainer.checkpoint_path().display()
        );
        std::process::exit(EXIT_PREEMPTED);
    }
    let nf4 =
        if qp > 0 { json!({"params": qp, "bytes": qb, "bytes_per_param": qb as f64 / qp as f64}) } else { json!(null) };
    let kept_graphs = trainer.kept_graphs();
    trainer.save_adapter(
        &args.out,
        json!({ "base": identity.clone(), "nf4": nf4, "kept_graphs": kept_graphs, "malloc": allocator::describe() }),
    )?;
    drop(trainer);
    if args.merge {
        model.decoder.merge_adapters()?;
        let merged = args.out.join("merged");
        model.save_hf(&merged, &[("prunesweep.json", json!({ "healed_with": args.out, "base": identity }))])?;
        tracing::info!(dir = %merged.display(), "merged model written");
    }
    println!("heal: {steps} steps done; adapter in {}", args.out.display());
    Ok(())
}

//! `worker heal`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prunesweep_worker::data::{file_sha256, read_document_range};
use prunesweep_worker::heal::packing::PackedChunks;
use prunesweep_worker::heal::{eos_id, HealConfig, HealEnd, Trainer, EXIT_PREEMPTED};
use prunesweep_worker::model::lora::LoraSpec;
use serde_json::json;

use super::ModelArgs;

/// Arguments of `worker heal`. Defaults are the paper's (App. A.1) except --seq-len.
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
    #[arg(long, default_value_t = 5000)]
    steps: usize,
    /// Sequences per update (global batch).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Sequences per forward/backward pass (gradients are accumulated to --batch).
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Tokens per packed sequence (documents joined with EOS). The paper used 2048.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// LoRA rank r.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// LoRA α (the update is scaled by α/r); default: = rank.
    #[arg(long)]
    alpha: Option<f64>,
    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// Peak learning rate (cosine schedule, decaying to 0).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Linear warmup updates.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// `ffn` (the paper: gate/up/down, or fc1/fc2 on Phi-2), `all-linear`, or module names
    /// separated by commas (e.g. q_proj,v_proj).
    #[arg(long, default_value = "ffn")]
    targets: String,
    /// Seeds adapter initialization and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every K updates (also at the end and on SIGTERM/SIGINT).
    #[arg(long, default_value_t = 100)]
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
    /// Output folder: the PEFT adapter (adapter_config.json, adapter_model.safetensors),
    /// prunesweep.json, checkpoint.safetensors and train_log.csv.
    #[arg(long)]
    out: PathBuf,
}

/// Trains, writes the adapter; exits with code 75 when stopped by a signal (requeue with --resume).
pub fn run(args: HealArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    let mut model = args.model.load()?;
    let targets = match args.targets.as_str() {
        "ffn" => Vec::new(),
        "all-linear" => model.decoder.adapter_targets(),
        list => list.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
    };
    let cfg = HealConfig {
        steps: args.steps,
        batch: args.batch,
        micro_batch: args.micro_batch,
        seq_len: args.seq_len,
        lora: LoraSpec {
            rank: args.rank,
            alpha: args.alpha.unwrap_or(args.rank as f64),
            dropout: args.dropout,
            targets,
        },
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        quantize: !args.no_quantize,
        ..HealConfig::default()
    };
    cfg.validate()?;
    let docs = read_document_range(&args.data, args.first_doc, None)?;
    let chunks = PackedChunks::pack(&model.tokenizer, &docs, eos_id(&model)?, cfg.seq_len, cfg.steps * cfg.batch)?;
    if chunks.len() < cfg.steps * cfg.batch {
        tracing::warn!(
            chunks = chunks.len(),
            needed = cfg.steps * cfg.batch,
            "the data holds fewer sequences than the run uses; it will be repeated (epochs)"
        );
    }
    let identity = json!({
        "model": args.model.model,
        "drop": args.model.drop.map(|d| d.to_string()),
        "kept_layers": model.decoder.kept_layers(),
        "data_sha256": file_sha256(&args.data)?,
        "first_doc": args.first_doc,
    });
    let description = model.describe();
    let mut trainer = Trainer::new(&mut model, cfg, chunks, &args.out, identity.clone(), args.resume)?;
    let (qp, qb) = trainer.quantized;
    if qp > 0 {
        tracing::info!(params = qp, bytes = qb, bytes_per_param = format!("{:.4}", qb as f64 / qp as f64), "NF4 base");
    }
    tracing::info!(
        model = %description,
        trainable = trainer.trainable_params(),
        targets = ?trainer.config().lora.targets,
        start = trainer.step(),
        "healing"
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
    trainer.save_adapter(&args.out, json!({ "base": identity.clone(), "nf4": nf4 }))?;
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

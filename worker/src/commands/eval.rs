//! `worker eval`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prunesweep_worker::eval::{self, EvalReport, EvalSpec, Task};

use super::{Base, ModelArgs};

/// Arguments of `worker eval`. Defaults: [`EvalSpec::new`], the same a sweep's eval task gets.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// mmlu (letter, k-shot), mmlu-cloze (0-shot), boolq (0-shot), c4-loss.
    #[arg(long, value_enum)]
    task: Task,
    /// MMLU: the folder with test/ and dev/ CSVs, a cais/mmlu Parquet or a JSON lines file.
    /// BoolQ: JSON lines or Parquet. c4-loss: JSON lines / json.gz / Parquet / text.
    #[arg(long)]
    data: PathBuf,
    /// MMLU few-shot examples when --data is a file: a dev/ folder, Parquet or JSON lines.
    #[arg(long)]
    dev: Option<PathBuf>,
    /// MMLU letter: examples per prompt (the first K dev rows of the subject); default 5.
    #[arg(long)]
    shots: Option<usize>,
    /// MMLU: the first K questions of each subject.
    #[arg(long)]
    limit_per_subject: Option<usize>,
    /// At most N items (after --limit-per-subject); c4-loss: documents, default 256.
    #[arg(long, alias = "samples")]
    limit: Option<usize>,
    /// c4-loss: skip this many documents first (keep them disjoint from calibration and healing).
    #[arg(long)]
    first_doc: Option<usize>,
    /// c4-loss: truncate documents to T tokens; default 512.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per forward pass; default 8.
    #[arg(long)]
    batch: Option<usize>,
    /// Hold at most this many GiB of the model's blocks in device memory and read the others
    /// from the checkpoint for each forward pass: a model larger than the device (or the host)
    /// is evaluated in its own dtype, slower, with the same numbers. HF safetensors checkpoints
    /// only; not with --adapter. (`worker serve` does this by itself when a model does not fit.)
    #[arg(long, value_name = "GIB", value_parser = super::gib, conflicts_with = "adapter")]
    hold_gib: Option<f64>,
    /// Result JSON: task, accuracy or loss, n, tokens, seconds, per-subject figures, predictions.
    #[arg(long)]
    out: PathBuf,
}

impl EvalArgs {
    fn spec(&self) -> EvalSpec {
        let d = EvalSpec::new(self.task, &self.data);
        EvalSpec {
            dev: self.dev.clone(),
            shots: self.shots.unwrap_or(d.shots),
            limit_per_subject: self.limit_per_subject,
            limit: self.limit.or(d.limit),
            first_doc: self.first_doc.unwrap_or(d.first_doc),
            seq_len: self.seq_len.unwrap_or(d.seq_len),
            batch: self.batch.unwrap_or(d.batch),
            ..d
        }
    }
}

/// Runs the task ([`eval::run`]) and writes the JSON.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = match args.hold_gib {
        None => args.model.load_base(Base::Spread)?,
        Some(gib) => args.model.load_base(Base::Holding((gib * f64::from(1u32 << 30)) as u64))?,
    };
    let spec = args.spec();
    let pb = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(&format!(
            "{} {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})",
            spec.task.name()
        ))
        .expect("the template is valid"),
    );
    let report: EvalReport = eval::run(&model, &spec, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    if !report.skipped.is_empty() {
        tracing::warn!(count = report.skipped.len(), first = %report.skipped[0], "rows skipped");
    }
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, text + "\n").with_context(|| format!("writing {}", args.out.display()))?;
    let metric = match (report.accuracy, report.loss) {
        (Some(a), _) => format!("accuracy {a:.4}"),
        (None, Some(l)) => format!("loss {l:.4} (normalized {:.4})", report.normalized_loss.unwrap_or(f64::NAN)),
        _ => String::new(),
    };
    println!(
        "{}: {metric} over {} items; {} tokens ({} computed) in {:.1}s: {:.1} items/s, {:.0} tokens/s",
        report.task,
        report.n,
        report.tokens,
        report.computed_tokens,
        report.seconds,
        report.n as f64 / report.seconds,
        report.tokens as f64 / report.seconds
    );
    Ok(())
}

//! `worker eval`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prunesweep_worker::data::read_document_range;
use prunesweep_worker::eval::{boolq, c4_loss, mmlu, EvalReport, Task};

use super::ModelArgs;

/// Arguments of `worker eval`.
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
    /// MMLU letter: examples per prompt (the first K dev rows of the subject).
    #[arg(long, default_value_t = 5)]
    shots: usize,
    /// MMLU: the first K questions of each subject.
    #[arg(long)]
    limit_per_subject: Option<usize>,
    /// At most N items (after --limit-per-subject).
    #[arg(long)]
    limit: Option<usize>,
    /// c4-loss: documents to score.
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// c4-loss: skip this many documents first (keep them disjoint from calibration and healing).
    #[arg(long, default_value_t = 0)]
    first_doc: usize,
    /// c4-loss: truncate documents to T tokens.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Result JSON: task, accuracy or loss, n, tokens, seconds, per-subject figures, predictions.
    #[arg(long)]
    out: PathBuf,
}

fn bar(len: usize, what: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"))
            .expect("the template is valid"),
    )
}

/// Runs the task and writes the JSON.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let report: EvalReport = match args.task {
        Task::Mmlu | Task::MmluCloze => {
            let mut data = mmlu::MmluData::load(&args.data, args.dev.as_deref())?;
            data.truncate(args.limit_per_subject, args.limit);
            let pb = bar(data.questions.len(), args.task.name());
            let mut progress = |n: usize| pb.set_position(n as u64);
            let r = if args.task == Task::Mmlu {
                mmlu::evaluate_letter(&model, &data, args.shots, args.batch, &mut progress)?
            } else {
                mmlu::evaluate_cloze(&model, &data, args.batch, &mut progress)?
            };
            pb.finish_and_clear();
            r
        }
        Task::Boolq => {
            let mut items = boolq::load(&args.data)?;
            items.truncate(args.limit.unwrap_or(usize::MAX));
            let pb = bar(items.len(), "boolq");
            let r = boolq::evaluate(&model, &items, args.batch, &mut |n| pb.set_position(n as u64))?;
            pb.finish_and_clear();
            r
        }
        Task::C4Loss => {
            let docs = read_document_range(&args.data, args.first_doc, Some(args.samples))?;
            let pb = bar(docs.len(), "c4-loss");
            let r = c4_loss::evaluate(&model, &docs, args.seq_len, args.batch, &mut |n| pb.set_position(n as u64))?;
            pb.finish_and_clear();
            r
        }
    };
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

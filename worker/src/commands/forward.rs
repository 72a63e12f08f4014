//! `worker forward`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use prunesweep_worker::forward::forward_text;

use super::{Base, ModelArgs};

/// Arguments of `worker forward`.
#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file holding the prompt (tokenized with the tokenizer's defaults).
    #[arg(long)]
    prompt_file: PathBuf,
    /// Output safetensors: ids [T] (i64), logits [T,V] (f32), states [L'+1,T,H] (f32).
    #[arg(long)]
    out: PathBuf,
}

/// Runs the prompt and writes the tensors.
pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let model = args.model.load_base(Base::Spread)?;
    let text = std::fs::read_to_string(&args.prompt_file)
        .with_context(|| format!("reading the prompt file {}", args.prompt_file.display()))?;
    let record = forward_text(&model, &text)?;
    record.save(&args.out)?;
    tracing::info!(tokens = record.ids.len(), out = %args.out.display(), "wrote ids, logits and states");
    Ok(())
}

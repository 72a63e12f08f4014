//! The `worker` binary.
//!
//! ```text
//! worker forward --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt-file prompt.txt --out out.safetensors
//! worker forward --model ./my-hf-dir --drop 20:6 --prompt-file prompt.txt --out cut.safetensors
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use prunesweep_worker::forward::forward_text;
use prunesweep_worker::model::{parse_device, LayerBlock, Model};

#[derive(Parser)]
#[command(name = "worker", version, about = "prunesweep worker: score, prune, heal and evaluate LLM layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt and write its token ids, logits and residual states (safetensors).
    Forward {
        /// Model: a .gguf file, an HF directory, an HF hub cache folder, or an HF id in the local cache.
        #[arg(long, env = "PRUNESWEEP_MODEL")]
        model: PathBuf,
        /// Drop layers START..START+N-1 (0-based, half-open like mergekit's layer_range), e.g. 20:6.
        #[arg(long, value_name = "START:N")]
        drop: Option<LayerBlock>,
        /// UTF-8 text file holding the prompt (tokenized with the tokenizer's defaults).
        #[arg(long)]
        prompt_file: PathBuf,
        /// Output safetensors: ids [T] (i64), logits [T,V] (f32), states [L'+1,T,H] (f32).
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu", env = "PRUNESWEEP_DEVICE")]
        device: String,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Forward { model, drop, prompt_file, out, device } => {
            let device = parse_device(&device).map_err(anyhow::Error::msg)?;
            let mut model = Model::load(&model, &device)?;
            if let Some(block) = drop {
                model.decoder.remove_layers(&block.indices())?;
            }
            tracing::info!(model = %model.describe(), "loaded");
            let text = std::fs::read_to_string(&prompt_file)
                .with_context(|| format!("reading the prompt file {}", prompt_file.display()))?;
            let record = forward_text(&model, &text)?;
            record.save(&out)?;
            tracing::info!(tokens = record.ids.len(), out = %out.display(), "wrote ids, logits and states");
        }
    }
    Ok(())
}

//! The `worker` binary.
//!
//! ```text
//! worker forward --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt-file prompt.txt --out out.safetensors
//! worker score   --model SmolLM2-135M-Instruct.Q4_1.gguf --data c4.jsonl --samples 64 --seq-len 128 \
//!                --out distances.csv --plot distances
//! worker prune   --model SmolLM2-135M-Instruct.Q4_1.gguf --fraction 0.2 --method angular \
//!                --distances distances.csv --out smollm2-pruned
//! worker eval    --model smollm2-pruned --task c4-loss --data c4.jsonl --out c4.json
//! worker heal    --model smollm2-pruned --data c4.jsonl --steps 200 --out healed   # PEFT adapter folder
//! worker serve   --coordinator http://coordinator:50051 --device cuda:0
//! ```

mod commands;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = commands::Cli::parse();
    // `heal` and `serve` run with glibc's malloc set for them (allocator.rs).
    if let Some(tunables) = cli.malloc_tunables() {
        prunesweep_worker::run_with_malloc_tunables(tunables);
    }
    prunesweep_worker::set_cpu_runtime_defaults();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs written to files (Slurm, Kubernetes) stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    cli.run()
}

//! Prefill throughput of the decoder on SmolLM2-135M (GGUF dequantized to f32, CPU).
//!
//! `cargo bench -p prunesweep-worker --bench forward` (or `scripts/bench-forward.sh`, which adds
//! HF transformers on the same token ids). Prints one `BENCH` line per case:
//! `BENCH <case> tokens=<T> seconds=<median> tok_s=<T/median>`.
//!
//! Environment: `PRUNESWEEP_SMOLLM2` (the .gguf; default `.cache/models/...`), `BENCH_TOKENS`
//! (default 256), `BENCH_REPEATS` (default 5), `BENCH_IDS_OUT` (write the ids used, one per line).

mod common;

use candle_core::{Device, Tensor};
use prunesweep_worker::model::Model;

const TEXT: &str = "The Unreasonable Ineffectiveness of the Deeper Layers. We empirically study a simple \
layer-pruning strategy for popular families of open-weight pretrained LLMs, finding minimal degradation of \
performance on different question-answering benchmarks until after a large fraction of the layers are removed. ";

fn main() -> anyhow::Result<()> {
    prunesweep_worker::set_cpu_runtime_defaults();
    let path = common::smollm2();
    let tokens = common::env_usize("BENCH_TOKENS", 256);
    let repeats = common::env_usize("BENCH_REPEATS", 5);
    let model = Model::load(&path, &Device::Cpu)?;
    let mut ids = Vec::new();
    while ids.len() < tokens {
        ids.extend(model.tokenizer.encode(TEXT)?);
    }
    ids.truncate(tokens);
    if let Some(out) = std::env::var_os("BENCH_IDS_OUT") {
        std::fs::write(out, ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n"))?;
    }
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let d = &model.decoder;
    let report = |case: &str, secs: f64| {
        println!("BENCH {case} tokens={tokens} seconds={secs:.4} tok_s={:.1}", tokens as f64 / secs);
    };
    report(
        "prunesweep-forward-all-logits",
        common::median_seconds(1, repeats, || {
            d.forward(&input).expect("forward");
        }),
    );
    report(
        "prunesweep-forward-last-logits",
        common::median_seconds(1, repeats, || {
            let h = d.run(&input, None, None, &mut |_, _| Ok(())).expect("run");
            d.logits_at(&h, &[tokens - 1]).expect("logits");
        }),
    );
    Ok(())
}

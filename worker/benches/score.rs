//! Scoring throughput: the residual states of every layer at the last token of each calibration
//! sample, the angular distances d(l, n) for every block, and Block Influence, on SmolLM2-135M
//! (f32, CPU).
//!
//! `cargo bench -p prunesweep-worker --bench score` (or `scripts/bench-score.sh`, which adds HF
//! transformers with `output_hidden_states` on the same documents). Prints
//! `BENCH prunesweep-score tokens=<real tokens> seconds=<median> tok_s=<tokens/median>`.
//!
//! Environment: `PRUNESWEEP_SMOLLM2`, `PRUNESWEEP_DATA` (folder with c4/…jsonl; default
//! `../shared/data`), `BENCH_DOCS` (64), `BENCH_SEQ_LEN` (128), `BENCH_BATCH` (8), `BENCH_REPEATS` (3).

mod common;

use candle_core::Device;
use prunesweep_worker::data::read_documents;
use prunesweep_worker::model::Model;
use prunesweep_worker::score::{score_layers, Calibration};

fn main() -> anyhow::Result<()> {
    prunesweep_worker::set_cpu_runtime_defaults();
    let (model_path, data) = (common::smollm2(), common::shared_data());
    let c4 = data.join("c4/c4-en-train.00000-of-01024.first1000.jsonl");
    let (docs, seq_len, batch, repeats) = (
        common::env_usize("BENCH_DOCS", 64),
        common::env_usize("BENCH_SEQ_LEN", 128),
        common::env_usize("BENCH_BATCH", 8),
        common::env_usize("BENCH_REPEATS", 3),
    );
    let model = Model::load(&model_path, &Device::Cpu)?;
    let calibration = Calibration::from_documents(&model.tokenizer, &read_documents(&c4, Some(docs))?, seq_len)?;
    let secs = common::median_seconds(1, repeats, || {
        score_layers(&model.decoder, &calibration, batch, &mut |_| {}).expect("scoring");
    });
    let tokens = calibration.tokens();
    println!("BENCH prunesweep-score tokens={tokens} seconds={secs:.4} tok_s={:.1}", tokens as f64 / secs);
    Ok(())
}

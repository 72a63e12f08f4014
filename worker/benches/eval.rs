//! Evaluation throughput on SmolLM2-135M (f32, CPU): MMLU 5-shot letter on the first 5 test
//! questions of every subject (285), BoolQ on the first 200 validation items, MMLU cloze on the
//! first 2 questions of every subject (114), and C4 loss on 64 documents from document 600 at 256
//! tokens (what `experiments/smollm2-healed.yaml` evaluates).
//!
//! `cargo bench -p prunesweep-worker --bench eval` (or `scripts/bench-eval.sh`, which adds a plain
//! transformers loop, one forward per full prompt as lm-eval-harness does). Prints
//! `BENCH <case> questions=Q tokens=T seconds=S q_s=Q/S tok_s=T/S` (T: prompt tokens a plain loop
//! runs) and `ACC <case> accuracy=A` (C4: `loss=L`).
//!
//! Environment: `PRUNESWEEP_SMOLLM2`, `PRUNESWEEP_DATA` (default `../shared/data`), `BENCH_BATCH` (8).

mod common;

use candle_core::Device;
use prunesweep_worker::eval::{boolq, c4_loss, mmlu, EvalReport};
use prunesweep_worker::model::Model;

fn print(case: &str, r: &EvalReport) {
    println!(
        "BENCH {case} questions={} tokens={} computed={} seconds={:.4} q_s={:.2} tok_s={:.1}",
        r.n,
        r.tokens,
        r.computed_tokens,
        r.seconds,
        r.n as f64 / r.seconds,
        r.tokens as f64 / r.seconds
    );
    match r.loss {
        Some(loss) => println!("ACC {case} loss={loss:.4}"),
        None => println!("ACC {case} accuracy={:.4}", r.accuracy.unwrap_or(f64::NAN)),
    }
}

fn main() -> anyhow::Result<()> {
    prunesweep_worker::set_cpu_runtime_defaults();
    let (model_path, data) = (common::smollm2(), common::shared_data());
    let batch = common::env_usize("BENCH_BATCH", 8);
    let model = Model::load(&model_path, &Device::Cpu)?;

    let mut mmlu_data = mmlu::MmluData::load(&data.join("mmlu"), None)?;
    mmlu_data.truncate(Some(5), None);
    let report = mmlu::evaluate_letter(&model, &mmlu_data, 5, batch, &mut |_| {})?;
    print("prunesweep-mmlu5", &report);

    let mut items = boolq::load(&data.join("boolq/val.jsonl"))?;
    items.truncate(200);
    let report = boolq::evaluate(&model, &items, batch, &mut |_| {})?;
    print("prunesweep-boolq", &report);

    let mut cloze_data = mmlu::MmluData::load(&data.join("mmlu"), None)?;
    cloze_data.truncate(Some(2), None);
    let report = mmlu::evaluate_cloze(&model, &cloze_data, 8, &mut |_| {})?;
    print("prunesweep-cloze", &report);

    let c4 = data.join("c4/c4-en-train.00000-of-01024.first1000.jsonl");
    let docs = prunesweep_worker::data::read_document_range(&c4, 600, Some(64))?;
    let report = c4_loss::evaluate(&model, &docs, 256, batch, &mut |_| {})?;
    print("prunesweep-c4", &report);
    Ok(())
}

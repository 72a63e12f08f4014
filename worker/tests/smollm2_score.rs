//! Layer scoring and pruning on SmolLM2 (needs the real model, `scripts/fetch-model.sh`, and the C4
//! sample in the shared data): distances against a transformers reference, and pruned checkpoints
//! written by `worker prune` that reload with the expected layers.

mod common;

use candle_core::Device;
use common::{fixture, last_logits, rel_err, smollm2_gguf, worker};
use prunesweep_worker::data::read_documents;
use prunesweep_worker::model::Model;
use prunesweep_worker::score::{score_layers, AngularDistances, Calibration};

fn c4() -> std::path::PathBuf {
    common::c4_sample()
}

/// SmolLM2, first 16 C4 documents × 64 tokens, against `scripts/reference/make_score_reference.py`
/// (transformers, f32 states, f64 distances). Tolerance: |Δd| ≤ 1e-4 (measured ~3e-8), and the same
/// l*(n) for every n (the closest runner-up is 4.4e-5 behind, at n = 13).
#[test]
fn smollm2_distances_match_transformers() {
    let model = Model::load(&smollm2_gguf(), &Device::Cpu).unwrap();
    let docs = read_documents(&c4(), Some(16)).unwrap();
    let cal = Calibration::from_documents(&model.tokenizer, &docs, 64).unwrap();
    assert_eq!((cal.sequences.len(), cal.skipped_short, cal.tokens()), (16, 0, 984));
    let scores = score_layers(&model.decoder, &cal, 4, &mut |_| {}).unwrap();
    let reference = AngularDistances::read_csv(&fixture("smollm2/distances_c4_16x64.csv"), Some(30)).unwrap();
    for n in 1..=30 {
        for l in 0..=30 - n {
            let (got, want) = (scores.distances.get(n, l), reference.get(n, l));
            assert!((got - want).abs() <= 1e-4, "d({l},{n}): {got} vs transformers {want}");
        }
        assert_eq!(scores.distances.best_start(n).unwrap().0, reference.best_start(n).unwrap().0, "l*({n})");
    }
    let bi = std::fs::read_to_string(fixture("smollm2/block_influence_c4_16x64.csv")).unwrap();
    for (line, got) in bi.lines().skip(1).zip(&scores.influence.scores) {
        let want: f64 = line.split(',').nth(1).unwrap().parse().unwrap();
        assert!((got - want).abs() <= 1e-4, "block influence {got} vs {want}");
    }
}

/// `worker prune` picks the block from the distances, writes an HF dir that reloads with exactly
/// the kept layers, and that model computes what an in-memory `--drop` computes.
#[test]
fn pruned_smollm2_reloads_with_the_expected_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let gguf = smollm2_gguf();
    let distances = fixture("smollm2/distances_c4_16x64.csv");
    let (ok, stdout, stderr) = worker(&[
        "prune",
        "--model",
        gguf.to_str().unwrap(),
        "--fraction",
        "0.2",
        "--method",
        "angular",
        "--distances",
        distances.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prunesweep.json")).unwrap()).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap(), meta, "stdout echoes prunesweep.json");
    assert_eq!(meta["n"], 6);
    assert_eq!(meta["dropped_layers"], serde_json::json!([13, 14, 15, 16, 17, 18]), "l*(6) = 13");
    assert_eq!(meta["method"], "angular");
    assert!((meta["score"].as_f64().unwrap() - 0.14002161384830514).abs() < 1e-12);
    assert_eq!(meta["calibration"]["sha256"].as_str().unwrap().len(), 64);

    let pruned = Model::load(&out, &Device::Cpu).unwrap();
    assert_eq!(pruned.decoder.num_blocks(), 24);
    let mut cut = Model::load(&gguf, &Device::Cpu).unwrap();
    cut.decoder.remove_layers(&[13, 14, 15, 16, 17, 18]).unwrap();
    let ids = cut.tokenizer.encode("The capital of France is Paris. The capital of Germany is").unwrap();
    let e = rel_err(&last_logits(&pruned, &ids), &last_logits(&cut, &ids));
    assert!(e <= 1e-6, "reloaded pruned model vs in-memory drop: rel err {e}");
}

//! A real heal of SmolLM2 (needs the real model, `scripts/fetch-model.sh`, and the C4 sample in
//! the shared data): `worker heal` end to end lowers the held-out loss of a 6-layer cut.

mod common;

use std::path::Path;

use common::{c4_sample, smollm2_gguf, worker_log as worker};

fn c4_loss(args: &[&str], out: &Path) -> f64 {
    let (ok, log) = worker(&[args, &["--out", out.to_str().unwrap()]].concat());
    assert!(ok, "{log}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn healing_smollm2_with_six_layers_dropped_lowers_held_out_loss() {
    // `worker heal` end to end: 30 short updates on C4 documents 0.., held-out loss measured on
    // documents 600.. (never trained on), before and after, through `worker eval --adapter`.
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_gguf();
    let (model, c4) = (model.to_str().unwrap(), c4_sample());
    let c4 = c4.to_str().unwrap();
    let out = tmp.path().join("adapter");
    let held_out = ["--task", "c4-loss", "--data", c4, "--first-doc", "600", "--samples", "16", "--seq-len", "64"];
    let base = [&["eval", "--model", model, "--drop", "20:6"][..], &held_out[..]].concat();
    let before = c4_loss(&base, &tmp.path().join("before.json"));
    let (ok, log) = worker(&[
        "heal",
        "--model",
        model,
        "--drop",
        "20:6",
        "--data",
        c4,
        "--steps",
        "30",
        "--batch",
        "4",
        "--micro-batch",
        "4",
        "--seq-len",
        "64",
        "--rank",
        "16",
        "--lr",
        "1e-3",
        "--warmup",
        "3",
        "--checkpoint-every",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "prunesweep.json",
        "checkpoint.safetensors",
        "train_log.csv",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let healed = [&base[..], &["--adapter", out.to_str().unwrap()][..]].concat();
    let after = c4_loss(&healed, &tmp.path().join("after.json"));
    eprintln!("held-out C4 loss (16 docs × 64 tokens): {before:.4} unhealed → {after:.4} healed");
    assert!(after < before - 0.05, "held-out C4 loss {before:.4} → {after:.4}");
    // The adapter only fits the depth it was trained on.
    let (ok, log) = worker(&[
        "eval",
        "--model",
        model,
        "--adapter",
        out.to_str().unwrap(),
        "--task",
        "c4-loss",
        "--data",
        c4,
        "--samples",
        "1",
        "--seq-len",
        "8",
        "--out",
        tmp.path().join("x.json").to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("24-layer") && log.contains("--drop"), "{log}");
}

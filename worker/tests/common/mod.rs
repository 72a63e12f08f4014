//! Shared helpers for the worker's integration tests: fixture paths, the real SmolLM2 checkpoint
//! and the shared data (needed by the `smollm2_*.rs` files), the error measure the parity tests
//! state their tolerances in, and the `worker` binary.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use prunesweep_worker::forward::forward_ids;
use prunesweep_worker::model::{Model, ModelError};

/// `worker/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF: `$PRUNESWEEP_SMOLLM2`, else where
/// `scripts/fetch-model.sh` puts it (`.cache/models/` at the workspace root).
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("PRUNESWEEP_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(
        path.is_file(),
        "the SmolLM2 checkpoint is not at {}; run `scripts/fetch-model.sh` (or set PRUNESWEEP_SMOLLM2)",
        path.display()
    );
    path
}

/// Loads a safetensors file into f32/i64 CPU tensors.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference file loads")
}

/// The relative error the parity tests bound: `max |a − b| / max |b|` over all elements (b is the
/// reference). An element-wise ratio would blow up on values near zero.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    diff / scale
}

/// The logits at the last of `ids`.
pub fn last_logits(model: &Model, ids: &[u32]) -> Tensor {
    let out = forward_ids(model, ids).unwrap();
    out.logits.get(ids.len() - 1).unwrap()
}

/// i64 reference ids → u32.
pub fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect()
}

/// The shared data folder: `$PRUNESWEEP_DATA`, else `../shared/data` beside the checkout.
pub fn shared_data() -> PathBuf {
    let d = std::env::var_os("PRUNESWEEP_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    assert!(d.join("c4").is_dir(), "shared data not at {}; set PRUNESWEEP_DATA", d.display());
    d
}

/// The C4 sample in the shared data (JSON lines).
pub fn c4_sample() -> PathBuf {
    shared_data().join("c4/c4-en-train.00000-of-01024.first1000.jsonl")
}

/// The transformers reference for the evaluation tests (`scripts/reference/make_eval_reference.py`).
pub fn eval_reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/eval_reference.json")).unwrap()).unwrap()
}

/// A copy of two MMLU subjects of the shared data (test + dev CSVs) in a temp folder.
pub fn two_subjects(dir: &Path) -> PathBuf {
    let root = dir.join("mmlu");
    for split in ["test", "dev"] {
        std::fs::create_dir_all(root.join(split)).unwrap();
        for s in ["abstract_algebra", "high_school_geography"] {
            let f = format!("{s}_{split}.csv");
            std::fs::copy(shared_data().join("mmlu").join(split).join(&f), root.join(split).join(&f)).unwrap();
        }
    }
    root
}

/// The error of loading `path`, which must fail, and whose message must be one line.
pub fn load_err(path: &Path) -> String {
    let err: ModelError = Model::load(path, &Device::Cpu).expect_err("loading must fail");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "error is one line: {msg}");
    msg
}

/// Runs the `worker` binary: (success, stdout, stderr).
pub fn worker(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the `worker` binary: (success, stdout followed by stderr).
pub fn worker_log(args: &[&str]) -> (bool, String) {
    let (ok, out, err) = worker(args);
    (ok, out + &err)
}

//! Shared helpers for the worker's integration tests: fixture paths, the real SmolLM2 checkpoint,
//! and the error measure the parity tests state their tolerances in.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

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
pub fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
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

/// Runs the `worker` binary: (success, stdout, stderr).
pub fn worker(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

//! What the benches share: where the model and the data are, and numeric settings from the
//! environment.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Instant;

/// `$PRUNESWEEP_SMOLLM2`, else where `scripts/fetch-model.sh` puts the GGUF.
pub fn smollm2() -> PathBuf {
    std::env::var_os("PRUNESWEEP_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}

/// `$PRUNESWEEP_DATA`, else `../shared/data` beside the checkout.
pub fn shared_data() -> PathBuf {
    std::env::var_os("PRUNESWEEP_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

/// A `usize` setting from the environment, or `default`.
pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `f` `warmups` times untimed, then `repeats` times, and returns the median wall time in
/// seconds.
pub fn median_seconds(warmups: usize, repeats: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmups {
        f();
    }
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

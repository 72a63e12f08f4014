//! f32 matrix products at SmolLM2-135M's projection shapes, as the decoder's `Linear` computes them
//! (`x Wᵀ`, `W` stored `[out, in]`): how fast candle's CPU GEMM is on this machine. The model-level
//! ratios against transformers (scoring, evaluation) follow mostly from this figure and the BLAS
//! that torch uses here, so `scripts/bench-gemm.sh` prints both side by side.
//!
//! Two cases per shape: `candle`, the product as the worker runs it (the weight stored by
//! `Weight::dense`, which lays a long-input weight out as `Wᵀ` row-major on the CPU), and
//! `candle-view`, `x.matmul(&w.t())` with `Wᵀ` a view of the `[out, in]` values (what the worker
//! ran before; gemm reads a column-major operand slower on some CPUs, see
//! `kernels::ROW_MAJOR_RHS_MIN_K`).
//!
//! Prints `BENCH <case> M K N gflops=<2·M·K·N / median seconds / 1e9>`.
//! Environment: `BENCH_ROWS` (M, default 1024), `BENCH_REPEATS` (20).

mod common;

use candle_core::{Device, Tensor};
use prunesweep_worker::model::frozen::Weight;

fn main() -> anyhow::Result<()> {
    prunesweep_worker::set_cpu_runtime_defaults();
    let (m, repeats) = (common::env_usize("BENCH_ROWS", 1024), common::env_usize("BENCH_REPEATS", 20));
    // q/o (576→576), k/v (576→192), gate/up (576→1536), down (1536→576), and a square reference.
    for (k, n) in [(576, 576), (576, 192), (576, 1536), (1536, 576), (1024, 1024)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let gflops = |secs: f64| 2.0 * (m * k * n) as f64 / secs / 1e9;
        let weight = Weight::dense(w.clone())?;
        let secs = common::median_seconds(3, repeats, || {
            weight.matmul_t(&x).expect("matmul");
        });
        println!("BENCH candle {m} {k} {n} gflops={:.1}", gflops(secs));
        let secs = common::median_seconds(3, repeats, || {
            x.matmul(&w.t().expect("2-d")).expect("matmul");
        });
        println!("BENCH candle-view {m} {k} {n} gflops={:.1}", gflops(secs));
    }
    Ok(())
}

//! prunesweep worker: runs the method of Gromov et al. (2024), "The Unreasonable Ineffectiveness of
//! the Deeper Layers", on one machine: load a model, score its layers by the angular distance of the
//! residual stream, cut a block out, heal the cut, evaluate.
//!
//! # Layout
//!
//! - [`model`]: the decoder (five families), checkpoint loading (HF, hub cache, GGUF), tokenizer,
//!   layer removal and the HF writer. Every later stage stands on it.
//! - [`data`]: calibration / healing / loss documents (JSON lines, json.gz, Parquet, text).
//! - [`score`]: angular distances d(l, n) and Block Influence from one forward pass.
//! - [`prune`]: which layers to drop (angular, deepest, block-influence).
//! - [`heal`]: QLoRA healing (NF4 base, LoRA adapters, resumable training, PEFT output).
//! - [`plot`]: the d(l, n) heatmap.
//! - [`forward`]: one prompt's ids, logits and residual states, for inspection and parity checks.
//! - [`job`]: a leased job checked at the worker's edge (`Job::try_from(pb::JobSpec)`) into the
//!   stages' typed specs, and [`job::JobError`], how a job fails.
//! - [`provenance`]: what made a result (weights and data fingerprints, build, device, dtype).
//! - [`serve`]: the worker side of the coordinator's contract (lease, run, heartbeat, report).

pub mod allocator;
pub mod data;
pub mod device;
pub mod eval;
pub mod forward;
pub mod heal;
pub mod job;
pub mod model;
pub mod peak_memory;
pub mod plot;
pub mod provenance;
pub mod prune;
pub mod score;
pub mod serve;

pub use allocator::run_with_malloc_tunables;

/// Settles candle's CPU runtime knobs the way the worker runs best, each only where the
/// environment leaves it unset (an operator's value wins). Call it first thing in `main`, before
/// candle starts its threads: they read the knobs once.
///
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT=0`: after each elementwise op, candle's pool threads park at
///   once instead of spinning 25,000 rounds for the next one. What usually comes next is a matrix
///   product on rayon's threads, which the spinning threads would be taking cores from
///   (scoring on 2 cores: 1,110 → 1,181 tok/s, `scripts/bench-score.sh`).
/// - `RAYON_NUM_THREADS`: the thread count candle picks for its matrix products (the physical
///   cores, or `CANDLE_CPU_MASK`'s), worked out once here. Unset, candle works it out again for
///   every product by reading `/proc/cpuinfo` (~1% of a healing step's samples on 2 cores, more on
///   a many-core host, where that file is larger); rayon's pool then has as many threads as the
///   products use.
pub fn set_cpu_runtime_defaults() {
    let threads = candle_core::utils::get_num_threads().to_string();
    let knobs = [("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0"), ("RAYON_NUM_THREADS", threads.as_str())];
    for (key, value) in knobs {
        if std::env::var_os(key).is_none() {
            std::env::set_var(key, value);
        }
    }
}

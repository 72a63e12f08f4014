//! How much memory the held model's kept residual states ([`crate::model::state_cache`]) may
//! take while a job runs.
//!
//! The coordinator leases a job to a worker only if the job's predicted peak
//! (`prunesweep_proto::memory`) fits the free memory the worker reported. Kept states are a
//! cache: the worker reports their bytes as free (it can drop them), so before each job it must
//! make that true — on a CPU worker, where states and the job share host memory, the cache is cut
//! to what the job's predicted peak leaves of the memory free now, and it may grow only that far
//! during the job. On a CUDA worker the states live in host memory and the job on the device, so
//! the configured budget stands.

use candle_core::Device;
use prunesweep_proto::memory::{self, ModelShape, Placement};
use prunesweep_proto::v1::JobSpec;

use crate::model::state_cache::StateCache;
use crate::model::Decoder;

/// Parts of a prediction that are already resident once the job's model is held: counted by the
/// kernel as used, so not needed again from the free memory.
const RESIDENT_PARTS: [&str; 3] = ["runtime", "weights", "nf4 base"];

/// Sets the held `decoder`'s state cache's budget for the job `spec` about to run on `device`
/// ([`budget`], from the device's free memory now, the cache's own bytes counted as free).
pub fn fit(decoder: &Decoder, configured: u64, device: &Device, spec: Option<&JobSpec>) {
    let cache = decoder.state_cache();
    let free = crate::device::free_memory(device).map(|f| f + reclaimable(cache, device));
    cache.set_budget(budget(configured, device, spec, decoder.cfg.shape(), free));
}

/// The bytes of `device`'s memory that `cache` holds now: all of them on a CPU, none on a GPU
/// (its states live in host memory).
pub fn reclaimable(cache: &StateCache, device: &Device) -> u64 {
    if device.is_cpu() {
        cache.stats().bytes
    } else {
        0
    }
}

/// The state cache's budget for the job `spec` on `device` with its model (of `shape`) held:
/// `configured` at most; on a CPU, no more than `free` (free memory now, the cache's own bytes
/// included) less what the job's predicted peak still needs. Without a spec (one-off commands,
/// tests) the configured budget; with a spec whose peak cannot be predicted, nothing.
pub fn budget(configured: u64, device: &Device, spec: Option<&JobSpec>, shape: ModelShape, free: Option<u64>) -> u64 {
    if !device.is_cpu() {
        return configured;
    }
    let Some(spec) = spec else { return configured };
    let (Ok(predicted), Some(free)) = (memory::predict(&shape, spec, Placement::Cpu), free) else { return 0 };
    let resident: u64 = predicted.parts.iter().filter(|(p, _)| RESIDENT_PARTS.contains(p)).map(|(_, b)| b).sum();
    let need = predicted.device_bytes.saturating_sub(resident);
    configured.min(free.saturating_sub(need))
}

/// Bytes of a model's blocks that an evaluation whose model does not fit may hold on `device`
/// (the rest are read from the checkpoint for each pass, `Decoder::make_resident`): 90% of
/// `free` less the least the job `spec` runs in on a model of `shape` (its embedding, LM head, one
/// block read at a time and its activations: `least_device_bytes`). Without a spec (one-off
/// commands, tests), or when its peak cannot be predicted, 80% of `free`; with `free` unknown,
/// nothing (every block stays offloaded).
pub fn resident_budget(device: &Device, spec: Option<&JobSpec>, shape: ModelShape, free: Option<u64>) -> u64 {
    let Some(free) = free else { return 0 };
    let placement = crate::device::placement(device);
    match spec.map(|spec| memory::predict(&shape, spec, placement)) {
        Some(Ok(predicted)) => (free / 10 * 9).saturating_sub(predicted.least_device_bytes),
        _ => free / 10 * 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prunesweep_proto::v1::{EvalTask, EvalTaskKind, JobKind};

    fn shape() -> ModelShape {
        ModelShape::SMOLLM2_135M
    }

    fn baseline() -> JobSpec {
        let task =
            EvalTask { kind: EvalTaskKind::C4Loss as i32, batch_size: 8, seq_len: Some(256), ..Default::default() };
        JobSpec { kind: JobKind::Baseline as i32, eval: vec![task], ..Default::default() }
    }

    #[test]
    fn a_cpu_job_leaves_the_cache_what_its_peak_does_not_need() {
        let spec = baseline();
        let predicted = memory::predict(&shape(), &spec, Placement::Cpu).unwrap();
        let resident: u64 = predicted.parts.iter().filter(|(p, _)| RESIDENT_PARTS.contains(p)).map(|(_, b)| b).sum();
        let need = predicted.device_bytes - resident;
        assert!(need > 0 && resident > 0, "{predicted:?}");
        let cpu = Device::Cpu;
        assert_eq!(budget(4 << 30, &cpu, Some(&spec), shape(), Some(need + (1 << 20))), 1 << 20);
        assert_eq!(budget(4 << 30, &cpu, Some(&spec), shape(), Some(need / 2)), 0, "no room: nothing kept");
        assert_eq!(budget(1 << 20, &cpu, Some(&spec), shape(), Some(64 << 30)), 1 << 20, "never above the configured");
        assert_eq!(budget(1 << 20, &cpu, Some(&spec), shape(), None), 0, "free memory unknown: nothing kept");
        assert_eq!(budget(1 << 20, &cpu, None, shape(), None), 1 << 20, "no job: the configured budget");
    }
}

//! `SiLU(gate) · up`, the gated MLP's activation (Llama, Mistral, Qwen2, Phi-3), fused, for
//! inference on CPU.
//!
//! As candle ops it is a unary op whose `exp` is a libm call per element on one thread, a new
//! tensor as large as the MLP's widest activation, and then a product (another). This op reads
//! `gate` and `up` once, in parallel, with the vectorising [`exp`] of the attention softmax, and
//! writes the result: one allocation.
//!
//! Training (inputs that track gradients) and other devices or dtypes use the candle ops.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::masked_softmax::exp;

/// `gate / (1 + e^(−gate)) · up`, elementwise; `gate` and `up` have the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = !gate.track_op() && !up.track_op() && super::kernels::fused_cpu(gate) && up.dtype() == DType::F32;
    if !fused {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

struct SiluMul;

/// Elements per parallel task: large enough that scheduling is noise, small enough for 2+ cores
/// to share an MLP activation of a few hundred tokens.
const CHUNK: usize = 1 << 14;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("silu-mul: gate and up must be f32")
        };
        let (Some((g0, g1)), Some((u0, u1))) = (gate_layout.contiguous_offsets(), up_layout.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: gate and up must be contiguous")
        };
        if gate_layout.dims() != up_layout.dims() {
            candle_core::bail!("silu-mul: gate {:?} and up {:?} differ in shape", gate_layout.dims(), up_layout.dims())
        }
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(out, (g, u))| {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g * u / (1.0 + exp(-g));
            }
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_silu_then_product() {
        let dev = Device::Cpu;
        // Wide range, including saturated gates (±100) where e^(−g) is clamped.
        let gate = Tensor::randn(0f32, 4.0, (3, 5, 1000), &dev).unwrap();
        let extreme = Tensor::new(&[[[-100f32, -88.5, -20.0, 0.0, 20.0, 88.5, 100.0]]], &dev).unwrap();
        for gate in [gate, extreme] {
            let up = Tensor::randn(0f32, 1.0, gate.shape(), &dev).unwrap();
            let fused = silu_mul(&gate, &up).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let plain = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
            let plain = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in fused.iter().zip(&plain) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn takes_strided_inputs_and_refuses_mismatched_shapes() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap().t().unwrap();
        let up = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let fused = silu_mul(&gate, &up).unwrap().to_vec2::<f32>().unwrap();
        let plain = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in fused.iter().flatten().zip(plain.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(silu_mul(&up, &up.narrow(0, 0, 3).unwrap()).is_err());
    }
}

//! `SiLU(gate) · up`, the gated MLP's activation (Llama, Mistral, Qwen2, Phi-3), fused, on CPU
//! in f32, with its own backward pass.
//!
//! As candle ops it is a unary op whose `exp` is a libm call per element on one thread, a new
//! tensor as large as the MLP's widest activation, and then a product (another). This op reads
//! `gate` and `up` once, in parallel, with the vectorising [`exp`] of the attention softmax, and
//! writes the result: one allocation. While healing, candle's autograd would keep `silu(gate)`
//! and build the gradients from five more ops of that size; here the backward pass is one more
//! pass over `gate`, `up` and the output's gradient, writing both input gradients.
//!
//! Other devices and dtypes use the candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{f32_slice, vectorized, ELEMENTWISE_CHUNK as CHUNK};
use super::masked_softmax::exp;

/// `gate / (1 + e^(−gate)) · up`, elementwise; `gate` and `up` have the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = super::kernels::fused_cpu(gate) && up.dtype() == DType::F32 && up.device().is_cpu();
    if !fused {
        return candle_nn::ops::silu(gate)? * up;
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    if gate.track_op() || up.track_op() {
        gate.apply_op2(&up, SiluMul)
    } else {
        gate.apply_op2_no_bwd(&up, &SiluMul)
    }
}

struct SiluMul;

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
        if gate_layout.dims() != up_layout.dims() {
            candle_core::bail!("silu-mul: gate {:?} and up {:?} differ in shape", gate_layout.dims(), up_layout.dims())
        }
        let (gate, up) = (f32_slice(self.name(), gate, gate_layout)?, f32_slice(self.name(), up, up_layout)?);
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(out, (g, u))| {
            vectorized(
                #[inline(always)]
                || {
                    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                        *o = g * u / (1.0 + exp(-g));
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, stacked: [2, ...] (d gate, then d up).
        let both = gate.detach().apply_op3_no_bwd(&up.detach(), &grad.detach().contiguous()?, &SiluMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The backward pass of [`SiluMul`]: with `s = σ(g)`, `d gate = dy · up · s · (1 + g (1 − s))`
/// and `d up = dy · g · s`, written one after the other as a `[2, ...]` tensor.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (gate, up, grad) =
            (f32_slice(name, gate, gate_layout)?, f32_slice(name, up, up_layout)?, f32_slice(name, grad, grad_layout)?);
        if up.len() != gate.len() || grad.len() != gate.len() {
            candle_core::bail!("{name}: gate, up and the gradient differ in size")
        }
        let mut out = vec![0f32; 2 * gate.len()];
        let (d_gate, d_up) = out.split_at_mut(gate.len());
        d_gate.par_chunks_mut(CHUNK).zip(d_up.par_chunks_mut(CHUNK)).zip(gate.par_chunks(CHUNK)).enumerate().for_each(
            |(i, ((d_gate, d_up), gate))| {
                vectorized(
                    #[inline(always)]
                    || {
                        let at = i * CHUNK;
                        let (up, grad) = (&up[at..at + gate.len()], &grad[at..at + gate.len()]);
                        for j in 0..gate.len() {
                            let (g, u, dy) = (gate[j], up[j], grad[j]);
                            let s = 1.0 / (1.0 + exp(-g));
                            d_gate[j] = dy * u * s * (1.0 + g * (1.0 - s));
                            d_up[j] = dy * g * s;
                        }
                    },
                )
            },
        );
        let mut dims = vec![2];
        dims.extend_from_slice(gate_layout.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
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

    /// The gradients of `Σ w · silu(gate) · up` through the fused op and through candle's ops.
    fn gradients(fused: bool, gate: &Tensor, up: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
        let (g, u) = (candle_core::Var::from_tensor(gate).unwrap(), candle_core::Var::from_tensor(up).unwrap());
        let y = if fused {
            silu_mul(g.as_tensor(), u.as_tensor()).unwrap()
        } else {
            (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap()
        };
        let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (grads.get(g.as_tensor()).unwrap().clone(), grads.get(u.as_tensor()).unwrap().clone())
    }

    #[test]
    fn its_gradients_are_candles_and_the_finite_differences() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (3, 40_000), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
        let (fused, plain) = (gradients(true, &gate, &up, &w), gradients(false, &gate, &up, &w));
        for (a, b) in [(&fused.0, &plain.0), (&fused.1, &plain.1)] {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale, "{diff} against values up to {scale}");
        }
        // Central differences in f64 of f(g, u) = w · silu(g) · u, element by element.
        let f = |g: f64, u: f64, w: f64| w * u * g / (1.0 + (-g).exp());
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let [g, u, w, dg, du] = [&gate, &up, &w, &fused.0, &fused.1].map(values);
        for i in (0..g.len()).step_by(997) {
            let (g, u, w, h) = (f64::from(g[i]), f64::from(u[i]), f64::from(w[i]), 1e-4);
            let want_g = (f(g + h, u, w) - f(g - h, u, w)) / (2.0 * h);
            let want_u = (f(g, u + h, w) - f(g, u - h, w)) / (2.0 * h);
            assert!((f64::from(dg[i]) - want_g).abs() <= 1e-5 * want_g.abs().max(1.0), "d gate {} vs {want_g}", dg[i]);
            assert!((f64::from(du[i]) - want_u).abs() <= 1e-5 * want_u.abs().max(1.0), "d up {} vs {want_u}", du[i]);
        }
    }
}

//! RMSNorm for training on CPU in f32: one op with its own backward pass.
//!
//! candle's fused `rms_norm` has no backward pass, so while healing the norm runs as its composed
//! ops (square, mean, add, sqrt, divide, scale), each a tensor as large as the residual stream
//! that autograd keeps for the backward pass and five more there. This op keeps its input only,
//! and its backward pass is one pass over the input and the output's gradient. The norm's own
//! weight is frozen (healing trains adapters only), so it gets no gradient.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{f32_slice, vectorized};

/// The values of the op's inputs (the residual stream's rows, the weight, the gradient).
fn rows<'s>(storage: &'s CpuStorage, layout: &Layout) -> candle_core::Result<&'s [f32]> {
    f32_slice("trained-rms-norm", storage, layout)
}

/// `x / sqrt(mean(x²) + eps) · weight` over the last dimension of `x`, tracking `x`'s gradient:
/// the fused op on a CPU in f32, candle's composed ops elsewhere.
pub fn trained_rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !super::kernels::fused_cpu(x) || !super::kernels::fused_cpu(weight) {
        return candle_nn::ops::rms_norm_slow(x, weight, eps);
    }
    x.contiguous()?.apply_op2(&weight.detach(), TrainedRmsNorm { eps })
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
#[inline]
fn inverse_rms(x: &[f32], eps: f32) -> f32 {
    let squares: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (squares / x.len() as f32 + eps).sqrt()
}

struct TrainedRmsNorm {
    eps: f32,
}

impl CustomOp2 for TrainedRmsNorm {
    fn name(&self) -> &'static str {
        "trained-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (rows(x, x_layout)?, rows(w, w_layout)?);
        let h = w.len();
        if h == 0 || x_layout.dims().last() != Some(&h) {
            candle_core::bail!("trained-rms-norm: input {:?} against a weight of {h}", x_layout.dims())
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            vectorized(
                #[inline(always)]
                || {
                    let r = inverse_rms(x, self.eps);
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * r * w;
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx =
            x.detach().apply_op3_no_bwd(&w.detach(), &grad.detach().contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// The input's gradient: with `r = 1 / sqrt(mean(x²) + eps)` and `u = dy ⊙ w`,
/// `dx = r · u − x · r³ · mean(u ⊙ x)`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "trained-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, grad) = (rows(x, x_layout)?, rows(w, w_layout)?, rows(grad, grad_layout)?);
        let h = w.len();
        if grad.len() != x.len() {
            candle_core::bail!("trained-rms-norm: the gradient differs in size from the input")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h).zip(x.par_chunks(h).zip(grad.par_chunks(h))).for_each(|(dx, (x, dy))| {
            vectorized(
                #[inline(always)]
                || {
                    let r = inverse_rms(x, self.eps);
                    let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| x * dy * w).sum();
                    let c = r * r * r * dot / h as f32;
                    for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        *dx = r * dy * w - x * c;
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and input gradient of `Σ v · norm(x)`, through the op or candle's composed ops.
    fn run(fused: bool, x: &Tensor, w: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let y = if fused {
            trained_rms_norm(var.as_tensor(), w, 1e-5).unwrap()
        } else {
            candle_nn::ops::rms_norm_slow(var.as_tensor(), w, 1e-5).unwrap()
        };
        let grads = (&y * v).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), grads.get(var.as_tensor()).unwrap().clone())
    }

    #[test]
    fn value_and_gradient_are_candles_and_the_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 5, 96), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 96, &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 5, 96), &dev).unwrap();
        let (ours, theirs) = (run(true, &x, &w, &v), run(false, &x, &w, &v));
        for (what, a, b) in [("value", &ours.0, &theirs.0), ("gradient", &ours.1, &theirs.1)] {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && diff <= 2e-6 * scale, "{what}: {diff} against values up to {scale}");
        }
        // Central differences in f64 on one row: f(x) = Σ v · x / rms(x) · w.
        let row = |t: &Tensor| t.get(1).unwrap().get(3).unwrap().to_vec1::<f32>().unwrap();
        let (x, w, v, dx) = (row(&x), w.to_vec1::<f32>().unwrap(), row(&v), row(&ours.1));
        let f = |x: &[f64]| {
            let r = 1.0 / (x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
            x.iter().zip(&w).zip(&v).map(|((x, w), v)| f64::from(*v) * x * r * f64::from(*w)).sum::<f64>()
        };
        let x64: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
        for i in 0..x.len() {
            let (mut up, mut down) = (x64.clone(), x64.clone());
            up[i] += 1e-4;
            down[i] -= 1e-4;
            let want = (f(&up) - f(&down)) / 2e-4;
            assert!((f64::from(dx[i]) - want).abs() <= 1e-4 * want.abs().max(1.0), "dx[{i}] {} vs {want}", dx[i]);
        }
    }
}

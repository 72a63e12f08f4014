//! LayerNorm (Phi-2) for training on CPU in f32: one op with its own backward pass, as
//! [`super::rms_norm`] is for RMSNorm.
//!
//! candle's fused `layer_norm` has no backward pass, so while healing the norm would run as its
//! composed ops (mean, subtract, square, mean, add, sqrt, divide, scale, shift), each a tensor as
//! large as the residual stream that autograd keeps. This op keeps its input only; its backward
//! pass is one pass over the input and the output's gradient. The norm's weight and bias are
//! frozen (healing trains adapters only), so they get no gradient.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{f32_slice, vectorized};

/// The values of the op's inputs (the residual stream's rows, the weight and bias, the gradient).
fn rows<'s>(storage: &'s CpuStorage, layout: &Layout) -> candle_core::Result<&'s [f32]> {
    f32_slice("trained-layer-norm", storage, layout)
}

/// `(x − mean(x)) / sqrt(var(x) + eps) · weight + bias` over the last dimension of `x`, tracking
/// `x`'s gradient: the fused op on a CPU in f32, candle's composed ops elsewhere.
pub fn trained_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if ![x, weight, bias].into_iter().all(super::kernels::fused_cpu) {
        return candle_nn::ops::layer_norm_slow(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(&weight.detach(), &bias.detach(), TrainedLayerNorm { eps })
}

/// A row's mean and `1 / sqrt(var + eps)` (the population variance, as torch's LayerNorm).
#[inline]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct TrainedLayerNorm {
    eps: f32,
}

impl CustomOp3 for TrainedLayerNorm {
    fn name(&self) -> &'static str {
        "trained-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (rows(x, x_layout)?, rows(w, w_layout)?, rows(b, b_layout)?);
        let h = w.len();
        if h == 0 || b.len() != h || x_layout.dims().last() != Some(&h) {
            candle_core::bail!(
                "trained-layer-norm: input {:?} against a weight of {h} and a bias of {}",
                x_layout.dims(),
                b.len()
            )
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            vectorized(
                #[inline(always)]
                || {
                    let (mean, r) = moments(x, self.eps);
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mean) * r * w + b;
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
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx =
            x.detach().apply_op3_no_bwd(&w.detach(), &grad.detach().contiguous()?, &LayerNormGrad { eps: self.eps })?;
        Ok((Some(dx), None, None))
    }
}

/// The input's gradient: with `x̂ = (x − mean) r`, `r = 1 / sqrt(var + eps)` and `u = dy ⊙ w`,
/// `dx = r · (u − mean(u) − x̂ · mean(u ⊙ x̂))`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "trained-layer-norm-grad"
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
            candle_core::bail!("trained-layer-norm: the gradient differs in size from the input")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h).zip(x.par_chunks(h).zip(grad.par_chunks(h))).for_each(|(dx, (x, dy))| {
            vectorized(
                #[inline(always)]
                || {
                    let (mean, r) = moments(x, self.eps);
                    let (mut sum_u, mut sum_ux) = (0f32, 0f32);
                    for ((&x, &dy), &w) in x.iter().zip(dy).zip(w) {
                        let u = dy * w;
                        sum_u += u;
                        sum_ux += u * (x - mean) * r;
                    }
                    let (mean_u, mean_ux) = (sum_u / h as f32, sum_ux / h as f32);
                    for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        *dx = r * (dy * w - mean_u - (x - mean) * r * mean_ux);
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
    fn run(fused: bool, x: &Tensor, w: &Tensor, b: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let y = if fused {
            trained_layer_norm(var.as_tensor(), w, b, 1e-5).unwrap()
        } else {
            candle_nn::ops::layer_norm_slow(var.as_tensor(), w, b, 1e-5).unwrap()
        };
        let grads = (&y * v).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), grads.get(var.as_tensor()).unwrap().clone())
    }

    #[test]
    fn value_and_gradient_are_candles_and_the_finite_differences() {
        let dev = Device::Cpu;
        // Rows off zero mean, as a residual stream's are.
        let x = Tensor::randn(0.7f32, 2.0, (2, 5, 96), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 96, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 96, &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 5, 96), &dev).unwrap();
        let (ours, theirs) = (run(true, &x, &w, &b, &v), run(false, &x, &w, &b, &v));
        for (what, a, b) in [("value", &ours.0, &theirs.0), ("gradient", &ours.1, &theirs.1)] {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && diff <= 5e-6 * scale, "{what}: {diff} against values up to {scale}");
        }
        // Central differences in f64 on one row: f(x) = Σ v · ((x − mean) / sqrt(var + eps) · w + b).
        let row = |t: &Tensor| t.get(1).unwrap().get(3).unwrap().to_vec1::<f32>().unwrap();
        let (x, w, b, v, dx) =
            (row(&x), w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), row(&v), row(&ours.1));
        let f = |x: &[f64]| {
            let n = x.len() as f64;
            let mean = x.iter().sum::<f64>() / n;
            let r = 1.0 / (x.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / n + 1e-5).sqrt();
            x.iter()
                .zip(w.iter().zip(&b))
                .zip(&v)
                .map(|((x, (w, b)), v)| f64::from(*v) * ((x - mean) * r * f64::from(*w) + f64::from(*b)))
                .sum::<f64>()
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

    #[test]
    fn refuses_a_weight_of_another_width() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::ones((2, 8), candle_core::DType::F32, &dev).unwrap()).unwrap();
        let (w, b) = (
            Tensor::ones(7, candle_core::DType::F32, &dev).unwrap(),
            Tensor::zeros(7, candle_core::DType::F32, &dev).unwrap(),
        );
        let err = trained_layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap_err().to_string();
        assert!(err.contains("trained-layer-norm"), "{err}");
    }
}

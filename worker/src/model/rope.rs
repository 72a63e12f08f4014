//! Rotary positions for training on CPU in f32: one op with its own backward pass.
//!
//! candle's fused `rope` has no backward pass, so while healing rotary runs as `rope_slow`'s
//! composed ops (two narrows, a negation, a concatenation, two broadcast products and a sum), each
//! a tensor as large as the queries or keys that autograd keeps, and as many again backward. A
//! rotation is linear and orthogonal: its backward pass is the rotation by the opposite angle,
//! the same kernel with `sin` negated.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::vectorized;

/// HF's `rotate_half` rotary on `x` (`[B, heads, T, head_dim]`) with `cos`, `sin` (`[T,
/// head_dim / 2]`), tracking `x`'s gradient: the fused op on a CPU in f32, candle's composed ops
/// elsewhere.
pub fn trained_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if !super::kernels::fused_cpu(x) || !super::kernels::fused_cpu(cos) {
        return candle_nn::rotary_emb::rope_slow(x, cos, sin);
    }
    // The tables are inputs of the op (read in place, never tracked), not copies held by it.
    x.contiguous()?.apply_op3(&cos.detach().contiguous()?, &sin.detach().contiguous()?, TrainedRope { inverse: false })
}

/// The rotation of `x` by the angles whose cosines and sines are its second and third inputs
/// (`[T, half]`), or by their opposites when `inverse`.
struct TrainedRope {
    inverse: bool,
}

impl CustomOp3 for TrainedRope {
    fn name(&self) -> &'static str {
        "trained-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::kernels::f32_slice(self.name(), x, layout)?;
        let cos = super::kernels::f32_slice(self.name(), cos, cos_layout)?;
        let sin = super::kernels::f32_slice(self.name(), sin, sin_layout)?;
        let &[_, _, t, d] = layout.dims() else {
            candle_core::bail!("trained-rope: input must be [B, heads, T, head_dim], got {:?}", layout.dims())
        };
        let half = d / 2;
        if d % 2 != 0 || cos.len() != t * half || sin.len() != t * half {
            candle_core::bail!("trained-rope: {} angles for T = {t}, head_dim = {d}", cos.len())
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        // One (batch, head) at a time: T rows of head_dim.
        out.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).for_each(|(y, x)| {
            vectorized(
                #[inline(always)]
                || {
                    for ((y, x), (cos, sin)) in y
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
                    {
                        let (x1, x2) = x.split_at(half);
                        let (y1, y2) = y.split_at_mut(half);
                        for i in 0..half {
                            let (c, s) = (cos[i], sign * sin[i]);
                            y1[i] = x1[i] * c - x2[i] * s;
                            y2[i] = x2[i] * c + x1[i] * s;
                        }
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = TrainedRope { inverse: !self.inverse };
        Ok((Some(grad.detach().contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn value_and_gradient_are_candles_and_the_finite_differences() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        let angles = Tensor::randn(0f32, 3.0, (t, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let v = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        let run = |fused: bool| {
            let var = Var::from_tensor(&x).unwrap();
            let y = if fused {
                trained_rope(var.as_tensor(), &cos, &sin).unwrap()
            } else {
                candle_nn::rotary_emb::rope_slow(var.as_tensor(), &cos, &sin).unwrap()
            };
            let grads = (&y * &v).unwrap().sum_all().unwrap().backward().unwrap();
            (y.detach(), grads.get(var.as_tensor()).unwrap().clone())
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, a, b) in [("value", &ours.0, &theirs.0), ("gradient", &ours.1, &theirs.1)] {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-6, "{what}: {diff}");
        }
        // f(x) = Σ v · rope(x) is linear: its finite differences are exact up to rounding.
        let f = |x: &Tensor| (rope_value(x, &cos, &sin) * &v).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let dx = ours.1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in (0..x.elem_count()).step_by(7) {
            let mut bump = vec![0f32; x.elem_count()];
            bump[i] = 0.5;
            let bump = Tensor::from_vec(bump, x.shape(), &dev).unwrap();
            let want = (f(&(&x + &bump).unwrap()) - f(&(&x - &bump).unwrap())) / 1.0;
            assert!((dx[i] - want).abs() <= 1e-4, "dx[{i}] {} vs {want}", dx[i]);
        }
    }

    fn rope_value(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), cos, sin).unwrap()
    }
}

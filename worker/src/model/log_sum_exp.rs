//! `log Σ exp(x)` of each row of a logit matrix, fused, for inference on CPU: what turns the
//! LM head's logits into log-probabilities where a score is read (C4 loss reads every position).
//!
//! As candle ops it is a max, a subtraction, an exponential and a sum, each a pass over the
//! `[N, V]` logits (V = 49,152 for SmolLM2, 128,256 for Llama 3), two of them allocating a copy,
//! and the exponential one libm call per entry on one thread. This op reads each row twice (max,
//! then the sum of exponentials with the vectorised [`super::masked_softmax`] exponential), rows
//! in parallel, and allocates only the `[N, 1]` result.
//!
//! Other devices and dtypes use the candle ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernels::vectorized;
use super::masked_softmax::{exp, larger, LANES};

/// `log Σ exp(x)` over the last dimension of `logits` `[N, V]`, as `[N, 1]`: the max taken out
/// first, as `log_softmax` does, so that no exponent overflows.
pub fn log_sum_exp(logits: &Tensor) -> candle_core::Result<Tensor> {
    if !super::kernels::fused_cpu(logits) || logits.track_op() {
        let max = logits.max_keepdim(D::Minus1)?;
        return logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max;
    }
    logits.contiguous()?.apply_op1_no_bwd(&LogSumExp)
}

struct LogSumExp;

impl CustomOp1 for LogSumExp {
    fn name(&self) -> &'static str {
        "log-sum-exp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = super::kernels::f32_slice(self.name(), storage, layout)?;
        let (n, v) = match layout.dims() {
            &[n, v] => (n, v),
            dims => candle_core::bail!("log-sum-exp: logits must be [N, V], got {dims:?}"),
        };
        let mut out = vec![0f32; n];
        out.par_iter_mut().zip(logits.par_chunks(v.max(1))).for_each(|(o, row)| {
            *o = vectorized(
                #[inline(always)]
                || row_log_sum_exp(row),
            )
        });
        Ok((CpuStorage::F32(out), Shape::from((n, 1))))
    }
}

/// One row's `log Σ exp(x)`: `-inf` for an empty row or one that is all `-inf`, `+inf` with a
/// `+inf` logit, NaN with a NaN among finite logits.
#[inline(always)]
pub(crate) fn row_log_sum_exp(x: &[f32]) -> f32 {
    let whole = x.len() / LANES * LANES;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for xs in x[..whole].chunks_exact(LANES) {
        for i in 0..LANES {
            lanes[i] = larger(lanes[i], xs[i]);
        }
    }
    let max = lanes.into_iter().chain(x[whole..].iter().copied()).fold(f32::NEG_INFINITY, larger);
    if max.is_infinite() {
        return max;
    }
    let mut sums = [0f32; LANES];
    for xs in x[..whole].chunks_exact(LANES) {
        for i in 0..LANES {
            sums[i] += exp(xs[i] - max);
        }
    }
    let tail: f32 = x[whole..].iter().map(|&x| exp(x - max)).sum();
    let sum = sums.iter().map(|&s| f64::from(s)).sum::<f64>() + f64::from(tail);
    (sum.ln() as f32) + max
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_the_candle_ops() {
        let (n, v) = (5, 1003);
        let values: Vec<f32> = (0..n * v).map(|i| ((i * 7919 % 1000) as f32 * 0.037).sin() * 30.0).collect();
        let logits = Tensor::from_vec(values, (n, v), &Device::Cpu).unwrap();
        let ours = log_sum_exp(&logits).unwrap();
        let stock = super::super::kernels::with_stock_ops(|| log_sum_exp(&logits).unwrap());
        assert_eq!(ours.dims(), &[n, 1]);
        let diff = (&ours - &stock).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5, "largest difference {diff}");
    }

    #[test]
    fn a_row_of_minus_infinity_is_minus_infinity() {
        let mut row = vec![f32::NEG_INFINITY; 40];
        assert_eq!(row_log_sum_exp(&row), f32::NEG_INFINITY);
        row[3] = 2.0;
        assert_eq!(row_log_sum_exp(&row), 2.0);
        assert!(row_log_sum_exp(&[1.0, f32::NAN]).is_nan());
    }
}

//! `softmax(scores + mask)` over the last dimension, fused, for inference on CPU.
//!
//! Written as candle ops it is a broadcast add (a new tensor as large as the scores) and then a
//! softmax (another), and every masked entry is exponentiated only to come out as zero. On long
//! prompts (MMLU's few-shot headers) the attention scores are the largest tensors of a forward
//! pass, and those passes over them cost more than the matrix products around them. This op
//! reads the scores and the mask once, skips masked (`-inf`) entries, and writes the
//! probabilities: one allocation, and `exp` only where a key is visible.
//!
//! Training (inputs that track gradients) and other devices use the candle ops.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::vectorized;

/// `softmax(scores + mask)` over the last dimension. `scores`: `[..., T, S]`; `mask`: `[T, S]`,
/// additive (`0` visible, `-inf` hidden).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    if scores.track_op() {
        return candle_nn::ops::softmax(&scores.broadcast_add(mask)?, candle_core::D::Minus1);
    }
    if !super::kernels::fused_cpu(scores) || mask.dtype() != DType::F32 {
        return candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?);
    }
    scores.contiguous()?.apply_op2_no_bwd(mask, &MaskedSoftmax)
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        scores: &CpuStorage,
        scores_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(scores), CpuStorage::F32(mask)) = (scores, mask) else {
            candle_core::bail!("masked-softmax: scores and mask must be f32")
        };
        let Some((start, end)) = scores_layout.contiguous_offsets() else {
            candle_core::bail!("masked-softmax: scores must be contiguous")
        };
        let dims = scores_layout.dims();
        let (t, s) = match dims {
            [.., t, s] => (*t, *s),
            _ => candle_core::bail!("masked-softmax: scores must have at least 2 dimensions, got {dims:?}"),
        };
        let (mask_dims, mask_stride) = (mask_layout.dims(), mask_layout.stride());
        if mask_dims != [t, s] || mask_stride[1] != 1 {
            candle_core::bail!(
                "masked-softmax: mask must be [{t}, {s}] with contiguous rows, got {mask_dims:?} (strides {mask_stride:?})"
            );
        }
        let (mask_start, mask_row) = (mask_layout.start_offset(), mask_stride[0]);
        let scores = &scores[start..end];
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(s).zip(scores.par_chunks(s)).enumerate().for_each(|(row, (out, x))| {
            vectorized(
                #[inline(always)]
                || {
                    let m = &mask[mask_start + (row % t) * mask_row..][..s];
                    softmax_row(x, m, out);
                },
            )
        });
        Ok((CpuStorage::F32(out), scores_layout.shape().clone()))
    }
}

/// Lanes of the reductions below (and [`super::log_sum_exp`]'s): separate accumulators, so that
/// the loops vectorise without reassociating a single float sum.
pub(crate) const LANES: usize = 16;

/// `max(acc, v)` without NaN handling (a compare and a select).
#[inline(always)]
pub(super) fn larger(acc: f32, v: f32) -> f32 {
    if v > acc {
        v
    } else {
        acc
    }
}

/// One row: `out = softmax(x + m)`, hidden entries exactly 0. Every loop is branch-free and
/// lane-wise, so that it vectorises (the exponential is [`exp`], not a libm call per entry).
#[inline(always)]
fn softmax_row(x: &[f32], m: &[f32], out: &mut [f32]) {
    let whole = x.len() / LANES * LANES;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for (xs, ms) in x[..whole].chunks_exact(LANES).zip(m[..whole].chunks_exact(LANES)) {
        for i in 0..LANES {
            lanes[i] = larger(lanes[i], xs[i] + ms[i]);
        }
    }
    let tail = x[whole..].iter().zip(&m[whole..]).map(|(&x, &m)| x + m);
    let max = lanes.into_iter().chain(tail).fold(f32::NEG_INFINITY, larger);
    if max == f32::NEG_INFINITY {
        // A row that sees nothing (never produced by the decoder's masks) stays all zero.
        out.fill(0.0);
        return;
    }
    for ((o, &x), &m) in out.iter_mut().zip(x).zip(m) {
        let e = exp(x + m - max);
        *o = if m == f32::NEG_INFINITY { 0.0 } else { e };
    }
    let mut sums = [0f32; LANES];
    for os in out[..whole].chunks_exact(LANES) {
        for i in 0..LANES {
            sums[i] += os[i];
        }
    }
    let sum: f32 = sums.iter().sum::<f32>() + out[whole..].iter().sum::<f32>();
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `e^x` for `x ≤ 88` (softmax arguments, and SiLU's `e^(−gate)`) to ~2 ulp, in plain
/// arithmetic that vectorises:
/// `e^x = 2^k · e^r` with `k = round(x·log₂e)`, `r = x − k·ln 2` (Cody–Waite, `|r| ≤ ln 2 / 2`),
/// `e^r` by its degree-6 Taylor polynomial (remainder < 2e-7 relative). `k` is rounded by adding
/// 1.5·2²³, which leaves it in the low mantissa bits, so `2^k` is built from bits with no
/// float-to-int conversion. Below −87 it returns `e^−87` rather than a denormal; softmax rows
/// always hold a 1 (`x = 0`), so that is noise; above 88 it returns `e^88` (SiLU of a gate below
/// −88 is then ~1e-36 rather than 0).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2²³, whose bits are 0x4B40_0000
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let pow2 = ((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32;
    f32::from_bits(pow2) * p
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_accurate_where_softmax_uses_it() {
        let mut worst = 0f64;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "max relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        // Positive arguments (SiLU's e^(−gate) for negative gates).
        for i in 0..=88_000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            assert!((got - want).abs() / want < 5e-7, "e^{x}: {got} vs {want}");
        }
    }

    #[test]
    fn equals_add_then_softmax() {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3.0, (2, 3, 4, 7), &dev).unwrap();
        let ninf = f32::NEG_INFINITY;
        let rows: Vec<f32> = (0..4)
            .flat_map(|i| {
                (0..7).map(move |j| {
                    if j <= i + 3 {
                        if j == 0 {
                            -0.5
                        } else {
                            0.0
                        }
                    } else {
                        ninf
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(rows, (4, 7), &dev).unwrap();
        let fused = masked_softmax(&scores, &mask).unwrap();
        let plain = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let diff = (fused - plain).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn takes_a_narrowed_mask() {
        // Rows 1..3 and keys 0..5 of a [4, 7] mask: strided rows, as the decoder's query chunks pass it.
        let dev = Device::Cpu;
        let ninf = f32::NEG_INFINITY;
        let full: Vec<f32> = (0..4).flat_map(|i| (0..7).map(move |j| if j <= i + 2 { 0.0 } else { ninf })).collect();
        let full = Tensor::from_vec(full, (4, 7), &dev).unwrap();
        let mask = full.narrow(0, 1, 2).unwrap().narrow(1, 0, 5).unwrap();
        let scores = Tensor::randn(0f32, 1.0, (3, 2, 5), &dev).unwrap();
        let fused = masked_softmax(&scores, &mask).unwrap().to_vec3::<f32>().unwrap();
        let plain = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask.contiguous().unwrap()).unwrap())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (a, b) in fused.iter().flatten().flatten().zip(plain.iter().flatten().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(fused[0][0][4], 0.0, "hidden keys get exactly 0");
    }
}

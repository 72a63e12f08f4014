//! The training loss: mean next-token cross-entropy, fused.
//!
//! Over a vocabulary of 49k–150k, the logits of a micro-batch are hundreds of MB, and the
//! composed `log_softmax` + `gather` of candle-nn makes about ten temporaries of that size in the
//! forward and backward passes. Here the forward pass reads the logits once (row max and
//! log-sum-exp, kept for the backward) and the backward pass writes
//! `∂L/∂z = (softmax(z) − onehot(target)) · g / n` in one sweep; both run rows in parallel with
//! the vectorised exponential of inference's log-sum-exp ([`crate::model::log_sum_exp`]) instead
//! of a libm call per logit on one thread.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use crate::model::kernels::vectorized;
use crate::model::log_sum_exp::row_log_sum_exp;
use crate::model::masked_softmax::exp;

use crate::model::{Decoder, Model};

/// Mean next-token cross-entropy of `ids` (`[B, T]`): position `t` predicts token `t + 1`, so
/// `B · (T − 1)` targets. Only those positions go through the final norm and the LM head.
pub fn next_token_loss(model: &Model, ids: &Tensor) -> candle_core::Result<Tensor> {
    let hidden = model.decoder.run(ids, None, None, &mut |_, _| Ok(()))?;
    loss_from_hidden(&model.decoder, &hidden, ids)
}

/// [`next_token_loss`] from the last blocks' output `hidden` (`x^(L')`, `[B, T, H]`, pre-norm):
/// final norm, LM head and cross-entropy. Activation recomputation starts its backward pass here.
/// While training on the CPU in f32 the head's product and the cross-entropy are one op that
/// keeps no logits ([`super::head_loss`]).
pub fn loss_from_hidden(decoder: &Decoder, hidden: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1::<u32>()?;
    let normed = decoder.final_norm(&hidden.narrow(1, 0, t - 1)?)?;
    let head = decoder.lm_head();
    if crate::model::kernels::fused_cpu(&normed) && normed.track_op() && head.lora.is_none() {
        let h = normed.dim(2)?;
        return super::head_loss::head_cross_entropy(head, &normed.reshape((b * (t - 1), h))?, targets);
    }
    let logits = head.forward(&normed)?.to_dtype(DType::F32)?;
    let v = logits.dim(2)?;
    cross_entropy(&logits.reshape((b * (t - 1), v))?, targets)
}

/// Mean cross-entropy of `logits` (`[n, V]`, f32) against `targets` (`n` ids), differentiable
/// with respect to the logits. Off the CPU it falls back to candle-nn's composed version.
pub fn cross_entropy(logits: &Tensor, targets: Vec<u32>) -> candle_core::Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets(n, v, &targets)?;
    if !crate::model::kernels::fused_cpu(logits) {
        let t = Tensor::from_vec(targets, n, logits.device())?;
        return candle_nn::loss::cross_entropy(logits, &t);
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets: Arc::new(targets), lse: Arc::new(Mutex::new(Vec::new())) })
}

/// An error unless there is one target per row (`n`), each inside the vocabulary (`v`).
pub(super) fn check_targets(n: usize, v: usize, targets: &[u32]) -> candle_core::Result<()> {
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
    }
    Ok(())
}

/// Forward: `[n, V]` → `[]`, the mean of `lse_i − z_{i, t_i}`.
struct CrossEntropy {
    targets: Arc<Vec<u32>>,
    /// Per-row log-sum-exp, written by the forward pass for the backward pass.
    lse: Arc<Mutex<Vec<f32>>>,
}

fn rows<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (n, v) = layout.shape().dims2()?;
    Ok((crate::model::kernels::f32_slice(what, storage, layout)?, n, v))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, n, v) = rows(storage, layout, self.name())?;
        let mut lse = vec![0f32; n];
        lse.par_iter_mut().zip(z.par_chunks(v.max(1))).for_each(|(l, row)| {
            *l = vectorized(
                #[inline(always)]
                || row_log_sum_exp(row),
            )
        });
        let total: f64 = lse
            .iter()
            .zip(z.chunks(v.max(1)))
            .zip(self.targets.iter())
            .map(|((&l, row), &t)| f64::from(l - row[t as usize]))
            .sum();
        *self.lse.lock().expect("the lock is never poisoned") = lse;
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.targets.len() as f32;
        let op = CrossEntropyGrad { targets: self.targets.clone(), lse: self.lse.clone(), scale };
        Ok(Some(logits.apply_op1_no_bwd(&op)?))
    }
}

/// `(softmax(z) − onehot(t)) · scale`, from the saved log-sum-exp.
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
    lse: Arc<Mutex<Vec<f32>>>,
    scale: f32,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, n, v) = rows(storage, layout, self.name())?;
        let lse = self.lse.lock().expect("the lock is never poisoned");
        if lse.len() != n {
            candle_core::bail!("{}: the forward pass did not run on these logits", self.name());
        }
        let mut out = vec![0f32; n * v];
        let rows = out.par_chunks_mut(v.max(1)).zip(z.par_chunks(v.max(1)));
        rows.zip(lse.par_iter()).zip(self.targets.par_iter()).for_each(|(((dst, row), &l), &t)| {
            vectorized(
                #[inline(always)]
                || {
                    for (d, &x) in dst.iter_mut().zip(row) {
                        *d = exp(x - l) * self.scale;
                    }
                    dst[t as usize] -= self.scale;
                },
            )
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_loss_and_gradient_match_candle_nn() {
        let dev = Device::Cpu;
        let (n, v) = (7, 50);
        let z: Vec<f32> = (0..n * v).map(|i| ((i * 37 % 101) as f32 * 0.13).sin() * 4.0).collect();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 11) % v as u32).collect();
        let logits = Var::from_tensor(&Tensor::from_vec(z, (n, v), &dev).unwrap()).unwrap();
        let ours = cross_entropy(logits.as_tensor(), targets.clone()).unwrap();
        let t = Tensor::from_vec(targets, n, &dev).unwrap();
        let reference = candle_nn::loss::cross_entropy(logits.as_tensor(), &t).unwrap();
        let (a, b) = (ours.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = (ours * 3.0).unwrap().backward().unwrap();
        let gb = (reference * 3.0).unwrap().backward().unwrap();
        let d = (ga.get(logits.as_tensor()).unwrap() - gb.get(logits.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{d}");
    }
}

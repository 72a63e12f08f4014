//! The LM head's product and the cross-entropy in one op, for training on the CPU in f32.
//!
//! Composed, the head writes the micro-batch's logits `[n, V]` (200 MB at seq 256, micro-batch 4
//! and SmolLM2's 49,152 words), the loss keeps them for the backward pass, and the backward pass
//! makes their gradient and, through candle's gradient store, a zeroed sum and its copy of the
//! same size for every node it passes (the loss, the reshape, the head): about a gigabyte of
//! fresh pages per micro-batch, which the kernel faults in and clears, half of a healing step's
//! page faults. This op computes the logits a chunk of rows at a time and, while the chunk is at
//! hand, its share of the input's gradient: `(softmax(z) − onehot(target)) W`, unscaled, so that
//! the backward pass only multiplies the kept `[n, H]` gradient by `g / n`. It does the work of
//! the composed forward and backward products, no more, and keeps no logits.
//!
//! The input's gradient is computed in the forward pass, so it is wasted when no backward pass
//! follows; [`super::loss::loss_from_hidden`] takes this op only when the input is tracked.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::model::frozen::Weight;
use crate::model::kernels::{matmul, vectorized, Mat};
use crate::model::layers::Linear;
use crate::model::log_sum_exp::row_log_sum_exp;
use crate::model::masked_softmax::exp;

/// Mean cross-entropy of `head(x)` (`x`: `[n, H]` final-normed states, f32 on the CPU) against
/// `targets` (`n` ids), differentiable with respect to `x`. The head must carry no adapter (its
/// weight and bias are frozen).
pub fn head_cross_entropy(head: &Linear, x: &Tensor, targets: Vec<u32>) -> candle_core::Result<Tensor> {
    // As many rows at a time as the memory model counts (`TRAINING_LOGIT_VALUES`).
    let rows = prunesweep_proto::memory::training_logit_rows(head.weight.dims()?.0 as u64);
    head_cross_entropy_in_chunks(head, x, targets, usize::try_from(rows).unwrap_or(usize::MAX))
}

/// [`head_cross_entropy`] with `chunk_rows` rows of logits at a time.
fn head_cross_entropy_in_chunks(
    head: &Linear,
    x: &Tensor,
    targets: Vec<u32>,
    chunk_rows: usize,
) -> candle_core::Result<Tensor> {
    if head.lora.is_some() {
        candle_core::bail!("head-cross-entropy: the LM head carries an adapter; its gradient is not computed here");
    }
    let (n, h) = x.dims2()?;
    let (v, in_dim) = head.weight.dims()?;
    if in_dim != h {
        candle_core::bail!("head-cross-entropy: the input has {h} features, the LM head expects {in_dim}");
    }
    super::loss::check_targets(n, v, &targets)?;
    let bias = match &head.bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    if let Some(len) = bias.as_ref().map(Vec::len).filter(|&len| len != v) {
        candle_core::bail!("head-cross-entropy: the LM head's bias has {len} values for a vocabulary of {v}");
    }
    let op = HeadCrossEntropy {
        weight: head.weight.clone(),
        bias,
        targets,
        chunk_rows: chunk_rows.max(1),
        input_grad: Mutex::new(Vec::new()),
    };
    x.contiguous()?.apply_op1(op)
}

/// Forward: `[n, H]` → `[]`, the mean of `lse_i − z_{i, t_i}` over `z = x Wᵀ (+ b)`; keeps
/// `Σ_i ∂(lse_i − z_{i, t_i})/∂x` for the backward pass.
struct HeadCrossEntropy {
    /// `[V, H]`.
    weight: Weight,
    /// `[V]`, when the head has one.
    bias: Option<Vec<f32>>,
    targets: Vec<u32>,
    chunk_rows: usize,
    /// The unscaled input gradient `[n, H]`, written by the forward pass.
    input_grad: Mutex<Vec<f32>>,
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = layout.shape().dims2()?;
        let (v, _) = self.weight.dims()?;
        let mut losses = vec![0f32; n];
        let mut input_grad = Vec::with_capacity(n * h);
        self.weight.with_cpu_mat(self.name(), |w| -> candle_core::Result<()> {
            let w_t = w.t()?;
            for start in (0..n).step_by(self.chunk_rows) {
                let rows = self.chunk_rows.min(n - start);
                let mut z = matmul(&Mat::new(storage, &layout.narrow(0, start, rows)?)?, &w_t)?;
                let (targets, losses) = (&self.targets[start..start + rows], &mut losses[start..start + rows]);
                softmax_minus_onehot(&mut z, v, self.bias.as_deref(), targets, losses);
                let z = CpuStorage::F32(z);
                input_grad.extend(matmul(&Mat::rows(&z, rows, v)?, &w)?);
            }
            Ok(())
        })??;
        *self.input_grad.lock().expect("the lock is never poisoned") = input_grad;
        // Summed in row order, as the composed loss sums them (no rows: NaN, as theirs).
        let total: f64 = losses.iter().map(|&l| f64::from(l)).sum();
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _loss: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.targets.len().max(1) as f32;
        let input_grad = self.input_grad.lock().expect("the lock is never poisoned");
        if input_grad.len() != x.elem_count() {
            candle_core::bail!("{}: the forward pass did not run on this input", self.name());
        }
        let scaled: Vec<f32> = input_grad.par_iter().map(|&d| d * scale).collect();
        Ok(Some(Tensor::from_vec(scaled, x.shape(), x.device())?))
    }
}

/// Turns each row of `z` (`[rows, V]` logits, the bias not yet added) into
/// `softmax(z + b) − onehot(target)` in place, and writes each row's loss
/// `lse(z + b) − (z + b)_target`; rows in parallel.
fn softmax_minus_onehot(z: &mut [f32], v: usize, bias: Option<&[f32]>, targets: &[u32], losses: &mut [f32]) {
    let rows = z.par_chunks_mut(v.max(1)).zip(targets.par_iter()).zip(losses.par_iter_mut());
    rows.for_each(|((row, &t), loss)| {
        vectorized(
            #[inline(always)]
            || {
                if let Some(bias) = bias {
                    for (x, &b) in row.iter_mut().zip(bias) {
                        *x += b;
                    }
                }
                let lse = row_log_sum_exp(row);
                *loss = lse - row[t as usize];
                for x in row.iter_mut() {
                    *x = exp(*x - lse);
                }
                row[t as usize] -= 1.0;
            },
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nf4::Nf4Matrix;
    use candle_core::{Device, Var};
    use std::sync::Arc;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        crate::model::frozen::tests::random(shape, seed)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The composed reference: `x Wᵀ (+ b)` with candle's matmul, candle-nn's cross-entropy.
    fn composed(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, targets: &[u32]) -> Tensor {
        let z = x.matmul(&w.t().unwrap()).unwrap();
        let z = match bias {
            Some(b) => z.broadcast_add(b).unwrap(),
            None => z,
        };
        let t = Tensor::from_vec(targets.to_vec(), targets.len(), x.device()).unwrap();
        candle_nn::loss::cross_entropy(&z, &t).unwrap()
    }

    #[test]
    fn the_fused_head_loss_and_its_input_gradient_match_candles_composed_ops() {
        let (n, h, v) = (37, 16, 50);
        let x = Var::from_tensor(&random((n, h), 1)).unwrap();
        let w = (random((v, h), 2) * 4.0).unwrap();
        let b = random((1, v), 3).flatten_all().unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 11) % v as u32).collect();
        for bias in [None, Some(b)] {
            let head = Linear { weight: Weight::Dense(w.clone()), bias: bias.clone(), lora: None };
            let reference = composed(x.as_tensor(), &w, bias.as_ref(), &targets);
            // One chunk, chunks of 8 rows (the last one 5), a row at a time.
            for chunk_rows in [n, 8, 1] {
                let ours = head_cross_entropy_in_chunks(&head, x.as_tensor(), targets.clone(), chunk_rows).unwrap();
                let (a, r) = (ours.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
                assert!((a - r).abs() < 1e-5, "chunks of {chunk_rows}: loss {a} vs {r}");
                let ga = (ours * 3.0).unwrap().backward().unwrap();
                let gr = (&reference * 3.0).unwrap().backward().unwrap();
                let (ga, gr) = (ga.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap());
                let d = max_abs(&(ga - gr).unwrap());
                assert!(d < 1e-6 * max_abs(gr).max(1.0), "chunks of {chunk_rows}: dL/dx differs by {d}");
            }
        }
    }

    #[test]
    fn the_fused_head_loss_gradient_matches_finite_differences() {
        let (n, h, v) = (5, 6, 9);
        let x = random((n, h), 4);
        let head = Linear {
            weight: Weight::Dense(random((v, h), 5)),
            bias: Some(random((1, v), 6).flatten_all().unwrap()),
            lora: None,
        };
        let targets: Vec<u32> = vec![0, 3, 8, 3, 5];
        let loss = |x: &Tensor| -> f64 {
            let l = head_cross_entropy_in_chunks(&head, x, targets.clone(), 2).unwrap();
            f64::from(l.to_scalar::<f32>().unwrap())
        };
        let var = Var::from_tensor(&x).unwrap();
        let l = head_cross_entropy_in_chunks(&head, var.as_tensor(), targets.clone(), 2).unwrap();
        let grad = l.backward().unwrap().get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in 0..n * h {
            let at = |d: f32| {
                let mut moved = values.clone();
                moved[i] += d;
                loss(&Tensor::from_vec(moved, (n, h), &Device::Cpu).unwrap())
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
            let analytic = f64::from(grad[i]);
            assert!((numeric - analytic).abs() < 2e-3, "x[{i}]: numeric {numeric} vs analytic {analytic}");
        }
    }

    #[test]
    fn an_nf4_head_gives_the_loss_of_its_decoded_weight() {
        let (n, h, v) = (11, 64, 40);
        let x = Var::from_tensor(&random((n, h), 7)).unwrap();
        let nf4 = Arc::new(Nf4Matrix::quantize(&random((v, h), 8)).unwrap());
        let decoded = nf4.dequantize(&Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let head = Linear { weight: Weight::Nf4(nf4), bias: None, lora: None };
        let ours = head_cross_entropy_in_chunks(&head, x.as_tensor(), targets.clone(), 4).unwrap();
        let reference = composed(x.as_tensor(), &decoded, None, &targets);
        let (a, r) = (ours.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
        assert!((a - r).abs() < 1e-5, "{a} vs {r}");
        let ga = ours.backward().unwrap();
        let gr = reference.backward().unwrap();
        let d = max_abs(&(ga.get(x.as_tensor()).unwrap() - gr.get(x.as_tensor()).unwrap()).unwrap());
        assert!(d < 1e-6, "dL/dx differs by {d}");
    }

    #[test]
    fn a_target_outside_the_vocabulary_or_a_mismatched_input_is_refused() {
        let head = Linear { weight: Weight::Dense(random((10, 4), 9)), bias: None, lora: None };
        let x = random((2, 4), 10);
        let e = head_cross_entropy(&head, &x, vec![1, 10]).unwrap_err().to_string();
        assert!(e.contains("target 10 is outside the vocabulary of 10"), "{e}");
        let e = head_cross_entropy(&head, &random((2, 5), 11), vec![1, 2]).unwrap_err().to_string();
        assert!(e.contains("the input has 5 features, the LM head expects 4"), "{e}");
        let short_bias = Linear { bias: Some(random((1, 9), 12).flatten_all().unwrap()), ..head };
        let e = head_cross_entropy(&short_bias, &x, vec![1, 2]).unwrap_err().to_string();
        assert!(e.contains("the LM head's bias has 9 values for a vocabulary of 10"), "{e}");
    }
}

//! AdamW, the cosine schedule with linear warmup, and gradient clipping — HF Trainer's defaults,
//! written out so that their state can be checkpointed and restored exactly.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::model::kernels::{f32_slice, f32_slice_mut, fused_cpu, vectorized, ELEMENTWISE_CHUNK as CHUNK};

/// Learning rate for optimizer update `step` (0-based) of `total`, as HF's
/// `get_cosine_schedule_with_warmup`: `peak · step / warmup` during warmup, then
/// `peak · ½ (1 + cos(π · progress))`, decaying to 0 at `total`.
pub fn cosine_lr(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// AdamW (Loshchilov & Hutter) as `torch.optim.AdamW`: decoupled weight decay, bias-corrected
/// moments.
#[derive(Debug)]
pub struct AdamW {
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Updates taken so far (the bias correction's t).
    pub t: usize,
    /// First moments, one per parameter.
    pub m: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for `params`; HF Trainer defaults β = (0.9, 0.999), ε = 1e-8.
    pub fn new(params: &[Var], weight_decay: f64) -> candle_core::Result<Self> {
        let zeros = || params.iter().map(|p| p.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>();
        Ok(AdamW { betas: (0.9, 0.999), eps: 1e-8, weight_decay, t: 0, m: zeros()?, v: zeros()? })
    }

    /// One update of every parameter with its gradient, at learning rate `lr`.
    ///
    /// On the CPU in f32 the moments and the parameter are updated in place, each in one pass
    /// ([`Moment`], [`Apply`]); elsewhere (or inside
    /// [`with_stock_ops`](crate::model::kernels::with_stock_ops)) the same arithmetic runs as
    /// candle ops, a fresh tensor each. Both give the same bits.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let (m, v, p_t) = (&self.m[i], &self.v[i], p.as_tensor());
            if [m, v, p_t, g].into_iter().all(|t| fused_cpu(t) && t.is_contiguous()) {
                m.inplace_op2(g, &Moment { decay: b1, squared: false })?;
                v.inplace_op2(g, &Moment { decay: b2, squared: true })?;
                let apply = Apply {
                    inv_sqrt_bc2: 1.0 / bc2.sqrt(),
                    eps: self.eps,
                    step: lr / bc1,
                    decay: 1.0 - lr * self.weight_decay,
                };
                p_t.inplace_op3(m, v, &apply)?;
                continue;
            }
            self.m[i] = ((m * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = (self.m[i].div(&denom)? * (lr / bc1))?;
            let decayed = (p_t * (1.0 - lr * self.weight_decay))?;
            p.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// `m ← m·β + g·(1 − β)` (or `g²` for the second moment), in place. Each product is rounded to
/// f32 as candle's `Tensor * f64` rounds it (`x · f32(c) + 0`), so the values are the stock ops'.
struct Moment {
    decay: f64,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<()> {
        let name = self.name();
        let g = f32_slice(name, g, g_l)?;
        let m = f32_slice_mut(name, dst, dst_l)?;
        if g.len() != m.len() {
            candle_core::bail!("{name}: a moment of {} values for a gradient of {}", m.len(), g.len())
        }
        let (keep, take) = (self.decay as f32, (1.0 - self.decay) as f32);
        let squared = self.squared;
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
            vectorized(
                #[inline(always)]
                || {
                    for (m, &g) in m.iter_mut().zip(g) {
                        let g = if squared { g * g } else { g };
                        *m = (*m * keep + 0.0) + (g * take + 0.0);
                    }
                },
            )
        });
        Ok(())
    }
}

/// `p ← p·(1 − lr·wd) − (lr / bc₁) · m / (√v / √bc₂ + ε)`, in place, with candle's rounding of
/// each step (see [`Moment`]).
struct Apply {
    inv_sqrt_bc2: f64,
    eps: f64,
    step: f64,
    decay: f64,
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        let (m, v) = (f32_slice(name, m, m_l)?, f32_slice(name, v, v_l)?);
        let p = f32_slice_mut(name, dst, dst_l)?;
        if m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("{name}: {} parameters but moments of {} and {}", p.len(), m.len(), v.len())
        }
        let (inv_sqrt_bc2, eps, step, decay) =
            (self.inv_sqrt_bc2 as f32, self.eps as f32, self.step as f32, self.decay as f32);
        p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(p, (m, v))| {
            vectorized(
                #[inline(always)]
                || {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        let denom = (v.sqrt() * inv_sqrt_bc2 + 0.0) * 1.0 + eps;
                        let update = (m / denom) * step + 0.0;
                        *p = (*p * decay + 0.0) - update;
                    }
                },
            )
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_linearly_and_decays_to_zero() {
        assert_eq!(cosine_lr(1.0, 0, 10, 110), 0.0);
        assert!((cosine_lr(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 110, 10, 110).abs() < 1e-12);
        assert_eq!(cosine_lr(2.0, 0, 0, 5), 2.0);
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3f32, 0.0], &dev).unwrap(), Tensor::new(&[4f32], &dev).unwrap()];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
        let norm = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn the_in_place_update_gives_the_stock_ops_bits() {
        use crate::model::kernels::with_stock_ops;
        let init = |seed: u64| crate::model::frozen::tests::random((200, 200), seed);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let run = |stock: bool| {
            let params =
                [Var::from_tensor(&init(1).flatten_all().unwrap()).unwrap(), Var::from_tensor(&init(2)).unwrap()];
            let mut opt = AdamW::new(&params, 0.01).unwrap();
            for step in 0..3 {
                let grads: Vec<Tensor> = params
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let noise = init(10 + step * 2 + i as u64).reshape(p.shape()).unwrap();
                        (p.as_tensor() * 0.5).unwrap().add(&(noise * 1e-3).unwrap()).unwrap()
                    })
                    .collect();
                let lr = 1e-3 * (step + 1) as f64;
                if stock {
                    with_stock_ops(|| opt.step(&params, &grads, lr)).unwrap();
                } else {
                    opt.step(&params, &grads, lr).unwrap();
                }
            }
            params.iter().map(|p| flat(p.as_tensor())).chain(opt.m.iter().chain(&opt.v).map(flat)).collect::<Vec<_>>()
        };
        let (fused, stock) = (run(false), run(true));
        for (i, (a, b)) in fused.iter().zip(&stock).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "tensor {i} (parameters, then m, then v) differs between the passes");
        }
        assert_ne!(fused[0], flat(&init(1)), "the parameters moved");
    }

    #[test]
    fn adamw_matches_torchs_update_rule() {
        // torch.optim.AdamW's algorithm, scalar by scalar: p ← p(1 − lr·wd);
        // p ← p − (lr / bc1) · m / (√v / √bc2 + ε).
        let reference = |mut p: f64| {
            let (mut m, mut v) = (0f64, 0f64);
            for t in 1..=3 {
                let g = 2.0 * p;
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
                p *= 1.0 - 0.1 * 0.01;
                p -= (0.1 / bc1) * m / (v.sqrt() / bc2.sqrt() + 1e-8);
            }
            p
        };
        let dev = Device::Cpu;
        let p = Var::new(&[1f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), 0.01).unwrap();
        for _ in 0..3 {
            let g = (p.as_tensor() * 2.0).unwrap();
            opt.step(std::slice::from_ref(&p), &[g], 0.1).unwrap();
        }
        let v = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] as f64 - reference(1.0)).abs() < 1e-5, "{v:?} vs {}", reference(1.0));
        assert!((v[1] as f64 - reference(-2.0)).abs() < 1e-5, "{v:?} vs {}", reference(-2.0));
    }
}

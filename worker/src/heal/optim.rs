//! AdamW, the cosine schedule with linear warmup, and gradient clipping — HF Trainer's defaults,
//! written out so that their state can be checkpointed and restored exactly.

use candle_core::{Tensor, Var};

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
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = (self.m[i].div(&denom)? * (lr / bc1))?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
            p.set(&(decayed - update)?)?;
        }
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

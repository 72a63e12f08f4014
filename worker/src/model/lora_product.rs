//! A projection with its LoRA adapter while healing, on CPU in f32, as one op with its own
//! backward pass: `y = x Wᵀ + s · h Bᵀ` with `h = (m ⊙ x) Aᵀ`, `s = α/r` and `m` the dropout
//! mask ([`super::lora::dropout_factor`]).
//!
//! Composed from candle ops ([`Lora::forward`] beside the frozen product) this is a mask tensor,
//! a masked copy of `x`, two products, a scaled copy and a sum, each a fresh zeroed tensor that
//! autograd keeps, and a backward pass that mirrors all of them (a transpose and copy per
//! product, a gradient through the mask, sums of partial gradients). Here the forward pass is the
//! three products, read where their operands lie, and one pass adding the scaled update into the
//! frozen product's output; the backward pass, for the output's gradient `g`, is
//!
//! ```text
//! dB = s · gᵀ h      dh = s · g B      dA = dhᵀ (m ⊙ x)      dx = g W + m ⊙ (dh A)
//! ```
//!
//! The mask is never stored: it is drawn again, element by element, from its seed. Only `h`
//! (`[n, r]`, small) is kept from the forward pass to the backward one. Other devices and dtypes
//! compose the stock ops, which draw the same mask.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::frozen::Weight;
use super::kernels::{cpu_storage, f32_slice, matmul, vectorized, Mat, ELEMENTWISE_CHUNK as CHUNK};
use super::lora::{dropout_factor, Lora};

/// `x Wᵀ + (α/r) · B A dropout(x)` for `x: [n, in]` → `[n, out]`, recorded for autograd (the
/// adapter in training mode with dropout seed `seed`), when the fused op applies: `x`, `A` and
/// `B` f32 on the CPU outside [`super::kernels::with_stock_ops`]. `None` otherwise.
pub fn lora_product(weight: &Weight, lora: &Lora, seed: u64, x: &Tensor) -> Option<candle_core::Result<Tensor>> {
    let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
    if ![x, a, b].into_iter().all(super::kernels::fused_cpu) {
        return None;
    }
    let op = LoraProduct {
        weight: weight.clone(),
        scale: lora.scale as f32,
        dropout: lora.dropout,
        seed,
        kept: Mutex::new(None),
    };
    Some(x.contiguous().and_then(|x| x.apply_op3(&a.contiguous()?, &b.contiguous()?, op)))
}

/// The op: the frozen weight, the adapter's scale and dropout, and `h` between the passes.
struct LoraProduct {
    weight: Weight,
    scale: f32,
    dropout: f32,
    seed: u64,
    /// `h = (m ⊙ x) Aᵀ`, `[n, r]`, from the forward pass for the backward one.
    kept: Mutex<Option<CpuStorage>>,
}

impl LoraProduct {
    const NAME: &'static str = "lora-product";

    /// `m ⊙ x`, or `None` without dropout (then it is `x`).
    fn masked(&self, x: &[f32]) -> Option<CpuStorage> {
        (self.dropout > 0.0).then(|| {
            let mut out = vec![0f32; x.len()];
            write_masked(&mut out, x, self.seed, self.dropout);
            CpuStorage::F32(out)
        })
    }

    /// `(n, in, r, out)` from the inputs' layouts, checked against each other and the weight.
    fn dims(&self, x: &Layout, a: &Layout, b: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let ((n, d_in), (r, a_in), (out, b_r)) = (x.shape().dims2()?, a.shape().dims2()?, b.shape().dims2()?);
        if a_in != d_in || b_r != r || self.weight.dims()? != (out, d_in) {
            candle_core::bail!(
                "{}: x [{n}, {d_in}], A [{r}, {a_in}], B [{out}, {b_r}] and W {:?} do not fit together",
                Self::NAME,
                self.weight.dims()?
            )
        }
        Ok((n, d_in, r, out))
    }
}

impl CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d_in, r, out) = self.dims(x_layout, a_layout, b_layout)?;
        let (x_mat, a, b) = (Mat::new(x, x_layout)?, Mat::new(a, a_layout)?, Mat::new(b, b_layout)?);
        let mut y = self.weight.with_cpu_mat(Self::NAME, |w| matmul(&x_mat, &w.t()?))??;
        let masked = self.masked(f32_slice(Self::NAME, x, x_layout)?);
        let xm = match &masked {
            Some(m) => Mat::rows(m, n, d_in)?,
            None => x_mat,
        };
        let h = CpuStorage::F32(matmul(&xm, &a.t()?)?);
        let update = matmul(&Mat::rows(&h, n, r)?, &b.t()?)?;
        add_scaled(&mut y, &update, self.scale);
        *self.kept.lock().expect("lora-product: a pass panicked holding h") = Some(h);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = Self::NAME;
        let ((n, d_in), (r, _), (out, _)) = (x.dims2()?, a.dims2()?, b.dims2()?);
        let need_dx = x.track_op();
        let kept = self.kept.lock().expect("lora-product: a pass panicked holding h").take();
        let grad = grad.contiguous()?;
        let [(xs, xl), (a_s, al), (bs, bl), (gs, gl)] = [x, a, b, &grad].map(|t| t.storage_and_layout());
        let x_storage = cpu_storage(name, &xs)?;
        let (a, b, g) = (
            Mat::new(cpu_storage(name, &a_s)?, al)?,
            Mat::new(cpu_storage(name, &bs)?, bl)?,
            Mat::new(cpu_storage(name, &gs)?, gl)?,
        );
        let masked = self.masked(f32_slice(name, x_storage, xl)?);
        let xm = match &masked {
            Some(m) => Mat::rows(m, n, d_in)?,
            None => Mat::new(x_storage, xl)?,
        };
        let h = match kept {
            Some(h) => h,
            None => CpuStorage::F32(matmul(&xm, &a.t()?)?),
        };
        let mut db = matmul(&g.t()?, &Mat::rows(&h, n, r)?)?;
        vectorized(
            #[inline(always)]
            || db.iter_mut().for_each(|v| *v *= self.scale),
        );
        let mut dh = matmul(&g, &b)?;
        vectorized(
            #[inline(always)]
            || dh.iter_mut().for_each(|v| *v *= self.scale),
        );
        let dh = CpuStorage::F32(dh);
        let dh = Mat::rows(&dh, n, r)?;
        let da = matmul(&dh.t()?, &xm)?;
        let dx = if need_dx {
            let mut dx = self.weight.with_cpu_mat(name, |w| matmul(&g, &w))??;
            let update = matmul(&dh, &a)?;
            if self.dropout > 0.0 {
                add_masked(&mut dx, &update, self.seed, self.dropout);
            } else {
                add_scaled(&mut dx, &update, 1.0);
            }
            Some(Tensor::from_vec(dx, (n, d_in), grad.device())?)
        } else {
            None
        };
        let device = grad.device();
        Ok((dx, Some(Tensor::from_vec(da, (r, d_in), device)?), Some(Tensor::from_vec(db, (out, r), device)?)))
    }
}

/// `dst[i] += scale · src[i]`, in parallel.
fn add_scaled(dst: &mut [f32], src: &[f32], scale: f32) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(dst, src)| {
        vectorized(
            #[inline(always)]
            || dst.iter_mut().zip(src).for_each(|(d, &s)| *d += scale * s),
        )
    });
}

/// `dst[i] += m_i · src[i]` for the dropout mask `m` of `seed` and probability `p`
/// ([`dropout_factor`], the same values), in parallel.
fn add_masked(dst: &mut [f32], src: &[f32], seed: u64, p: f32) {
    apply_masked(dst, src, seed, p, |d, v| *d += v);
}

/// `dst[i] = m_i · src[i]`, as [`add_masked`] but never reading `dst`, for a fresh buffer: reading
/// its untouched pages first maps the shared zero page, and the write that follows faults again
/// and flushes every core's TLB (`perf` on a 2-core Xeon VM put ~5% of a healing step's samples
/// in those flushes; throughput moved within noise).
fn write_masked(dst: &mut [f32], src: &[f32], seed: u64, p: f32) {
    apply_masked(dst, src, seed, p, |d, v| *d = v);
}

/// `put(&mut dst[i], m_i · src[i])` for every element, in parallel.
fn apply_masked(dst: &mut [f32], src: &[f32], seed: u64, p: f32, put: impl Fn(&mut f32, f32) + Sync) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(c, (dst, src))| {
        let first = c * CHUNK;
        vectorized(
            #[inline(always)]
            || {
                for (i, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
                    put(d, dropout_factor(seed, first + i, p) * s);
                }
            },
        )
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::frozen::tests::random;
    use crate::model::kernels::with_stock_ops;
    use crate::model::lora::LoraSpec;
    use crate::model::nf4::Nf4Matrix;
    use candle_core::{DType, Device, Var};
    use rand::{rngs::StdRng, SeedableRng};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// An adapter on a `[out, in]` projection with a B that is not zero (so every gradient is).
    fn adapter(out: usize, d_in: usize, dropout: f32) -> Lora {
        let spec = LoraSpec { rank: 8, alpha: 16.0, dropout, targets: vec![] };
        let mut lora = Lora::init(out, d_in, &spec, &mut StdRng::seed_from_u64(7), &Device::Cpu, DType::F32).unwrap();
        lora.b = Var::from_tensor(&random((out, 8), 8)).unwrap();
        lora.dropout_seed = Some(42);
        lora
    }

    /// `Σ w ⊙ y` and its gradients for x, A, B: through the fused op, or through the stock ops.
    fn run(weight: &Weight, lora: &Lora, x: &Tensor, w: &Tensor, fused: bool) -> (Vec<f32>, [Vec<f32>; 3]) {
        let x = Var::from_tensor(x).unwrap();
        let y = if fused {
            lora_product(weight, lora, lora.dropout_seed.unwrap(), x.as_tensor())
                .expect("the fused op applies")
                .unwrap()
        } else {
            with_stock_ops(|| (weight.matmul_t(x.as_tensor()).unwrap() + lora.forward(x.as_tensor()).unwrap()).unwrap())
        };
        let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |t: &Tensor| values(grads.get(t).expect("a gradient"));
        (values(&y), [grad(x.as_tensor()), grad(lora.a.as_tensor()), grad(lora.b.as_tensor())])
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= rel * scale, "{what}: differs by {diff} against values up to {scale}");
    }

    #[test]
    fn equals_the_stock_ops_in_values_and_gradients() {
        let (out, d_in, n) = (48, 70, 37);
        let dense = random((out, d_in), 1);
        let nf4 = Weight::Nf4(Arc::new(Nf4Matrix::quantize(&dense).unwrap()));
        let (x, w) = (random((n, d_in), 2), random((n, out), 3));
        for weight in [Weight::Dense(dense.clone()), nf4] {
            for dropout in [0.0, 0.3] {
                let lora = adapter(out, d_in, dropout);
                let (y, grads) = run(&weight, &lora, &x, &w, true);
                let (y_ref, grads_ref) = run(&weight, &lora, &x, &w, false);
                assert_close("y", &y, &y_ref, 1e-6);
                for (name, (g, g_ref)) in ["dx", "dA", "dB"].iter().zip(grads.iter().zip(&grads_ref)) {
                    assert_close(&format!("{name}, dropout {dropout}"), g, g_ref, 1e-5);
                }
            }
        }
    }

    #[test]
    fn its_gradients_are_the_finite_differences() {
        let (out, d_in, n, p) = (6, 9, 5, 0.4);
        let lora = adapter(out, d_in, p);
        let weight = random((out, d_in), 4);
        let (x, w) = (random((n, d_in), 5), random((n, out), 6));
        let (_, grads) = run(&Weight::Dense(weight.clone()), &lora, &x, &w, true);
        let r = 8;
        // f(x, A, B) = Σ w ⊙ (x Wᵀ + s (m ⊙ x) Aᵀ Bᵀ), in f64 from the definition.
        let f64s = |t: &Tensor| values(t).into_iter().map(f64::from).collect::<Vec<_>>();
        let (wt, ww) = (f64s(&weight), f64s(&w));
        let mask: Vec<f64> = (0..n * d_in).map(|i| f64::from(dropout_factor(42, i, p))).collect();
        let s = lora.scale;
        let f = |x: &[f64], a: &[f64], b: &[f64]| {
            let mut total = 0.0;
            for i in 0..n {
                for o in 0..out {
                    let base: f64 = (0..d_in).map(|k| x[i * d_in + k] * wt[o * d_in + k]).sum();
                    let update: f64 = (0..r)
                        .map(|j| {
                            let h: f64 =
                                (0..d_in).map(|k| mask[i * d_in + k] * x[i * d_in + k] * a[j * d_in + k]).sum();
                            h * b[o * r + j]
                        })
                        .sum();
                    total += ww[i * out + o] * (base + s * update);
                }
            }
            total
        };
        let args = [f64s(&x), f64s(lora.a.as_tensor()), f64s(lora.b.as_tensor())];
        for (which, grad) in grads.iter().enumerate() {
            for i in 0..args[which].len() {
                let eval = |delta: f64| {
                    let mut moved = args.clone();
                    moved[which][i] += delta;
                    f(&moved[0], &moved[1], &moved[2])
                };
                let want = (eval(1e-3) - eval(-1e-3)) / 2e-3;
                let got = f64::from(grad[i]);
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "argument {which}, element {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn applies_only_to_f32_on_the_cpu_and_refuses_a_mismatched_adapter() {
        let lora = adapter(8, 16, 0.1);
        let weight = Weight::Dense(random((8, 16), 1));
        let x = random((3, 16), 2);
        assert!(lora_product(&weight, &lora, 1, &x.to_dtype(DType::BF16).unwrap()).is_none());
        assert!(with_stock_ops(|| lora_product(&weight, &lora, 1, &x)).is_none());
        let other = Weight::Dense(random((9, 16), 1));
        let err = lora_product(&other, &lora, 1, &x).unwrap().unwrap_err().to_string();
        assert!(err.contains("lora-product") && err.contains("do not fit"), "{err}");
    }
}

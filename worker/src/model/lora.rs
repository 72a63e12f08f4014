//! Low-rank adapters (Hu et al. 2021) as PEFT builds them: `y = W x + (α/r) · B A dropout(x)`.
//!
//! `A: [r, in]` starts Kaiming-uniform (PEFT's `kaiming_uniform_(a=√5)`, i.e. U(±1/√in)) and
//! `B: [out, r]` starts at zero, so an adapter that has not been trained changes nothing.
//! Only `A` and `B` are [`Var`]s: they are the only tensors that receive gradients.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng};
use rayon::prelude::*;

/// Rank, scale and dropout shared by all adapters of a model, plus which projections get one.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// r.
    pub rank: usize,
    /// α; the update is scaled by α / r.
    pub alpha: f64,
    /// Probability of zeroing an input feature of the adapter path while training.
    pub dropout: f32,
    /// HF module names (`gate_proj`, `fc1`, …) that get an adapter.
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapter on one projection.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// α / r.
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
    /// Set while training: the seed of this call's dropout mask. `None`: evaluation — no dropout,
    /// and A, B enter the graph detached, so nothing is recorded for backprop and the frozen
    /// path runs its fused kernels.
    pub(crate) dropout_seed: Option<u64>,
}

impl Lora {
    /// A fresh adapter for an `[out, in]` projection: A Kaiming-uniform from `rng`, B zero.
    pub fn init(
        out_dim: usize,
        in_dim: usize,
        spec: &LoraSpec,
        rng: &mut StdRng,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..spec.rank * in_dim).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Tensor::from_vec(a, (spec.rank, in_dim), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_dim, spec.rank), dtype, device)?;
        Self::from_tensors(a, b, spec)
    }

    /// An adapter from trained `A`, `B` (shapes checked by the caller).
    pub fn from_tensors(a: Tensor, b: Tensor, spec: &LoraSpec) -> candle_core::Result<Self> {
        Ok(Lora {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: spec.scale(),
            dropout: spec.dropout,
            dropout_seed: None,
        })
    }

    /// Rows `start .. start + len` of this adapter's output: the same A (shared, so gradients from
    /// every part of a fused module add up in it) and those rows of B, a trainable tensor of their
    /// own. Phi-3's fused `qkv_proj` becomes its q, k and v parts this way.
    pub fn rows(&self, start: usize, len: usize) -> candle_core::Result<Self> {
        Ok(Lora {
            a: self.a.clone(),
            b: Var::from_tensor(&self.b.as_tensor().narrow(0, start, len)?.contiguous()?)?,
            scale: self.scale,
            dropout: self.dropout,
            dropout_seed: self.dropout_seed,
        })
    }

    /// The adapter's contribution for `x: [n, in]` → `[n, out]`, computed in the adapter's dtype
    /// (f32) and returned in `x`'s (PEFT casts the same way around a bf16 base).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = &x.to_dtype(self.a.dtype())?;
        let (a, b) = match self.dropout_seed {
            Some(_) => (self.a.as_tensor().clone(), self.b.as_tensor().clone()),
            None => (self.a.as_detached_tensor(), self.b.as_detached_tensor()),
        };
        let x = match self.dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let mask = dropout_mask(seed, x.elem_count(), self.dropout);
                (x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?
            }
            _ => x.clone(),
        };
        (x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?.to_dtype(out_dtype)
    }

    /// `(α/r) · B A`, `[out, in]`: what merging adds to the base weight.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// Elements per parallel task when drawing a dropout mask.
const MASK_CHUNK: usize = 1 << 14;

/// Inverted dropout's factor for element `index` of a call seeded `seed`: `1 / (1 − p)` with
/// probability `1 − p`, else 0. A pure function of `(seed, index)` (a counter-based draw), so a
/// mask is drawn in parallel and drawn again in a backward pass instead of being stored, and
/// every device and code path sees the same mask.
#[inline(always)]
pub fn dropout_factor(seed: u64, index: usize, p: f32) -> f32 {
    let keep = 1.0 - p;
    // The top 24 bits: uniform on [0, 1) in steps of 2⁻²⁴, exact in f32.
    let u = (mix_seed(seed, index as u64) >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
    if u < keep {
        1.0 / keep
    } else {
        0.0
    }
}

/// The dropout factors ([`dropout_factor`]) of elements `0 .. len` of a call seeded `seed`.
pub fn dropout_mask(seed: u64, len: usize, p: f32) -> Vec<f32> {
    let mut mask = vec![0f32; len];
    mask.par_chunks_mut(MASK_CHUNK).enumerate().for_each(|(c, chunk)| {
        super::kernels::vectorized(
            #[inline(always)]
            || {
                for (i, m) in chunk.iter_mut().enumerate() {
                    *m = dropout_factor(seed, c * MASK_CHUNK + i, p);
                }
            },
        )
    });
    mask
}

/// SplitMix64: a cheap, well-mixed hash of a seed and a stream number, for per-call dropout seeds.
#[inline(always)]
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn spec(dropout: f32) -> LoraSpec {
        LoraSpec { rank: 4, alpha: 8.0, dropout, targets: vec!["up_proj".into()] }
    }

    #[test]
    fn fresh_adapter_adds_nothing_and_a_is_kaiming_uniform() {
        let mut rng = StdRng::seed_from_u64(0);
        let l = Lora::init(6, 16, &spec(0.0), &mut rng, &Device::Cpu, DType::F32).unwrap();
        let x = Tensor::ones((3, 16), DType::F32, &Device::Cpu).unwrap();
        let y = l.forward(&x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(y, 0.0);
        let a = l.a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().all(|v| v.abs() < 0.25) && a.iter().any(|v| v.abs() > 0.1));
        assert_eq!(l.scale, 2.0);
    }

    #[test]
    fn dropout_is_seeded_scaled_and_off_without_a_seed() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut l = Lora::init(5, 64, &spec(0.5), &mut rng, &Device::Cpu, DType::F32).unwrap();
        l.b = Var::from_tensor(&Tensor::ones((5, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let x = Tensor::ones((2, 64), DType::F32, &Device::Cpu).unwrap();
        let plain = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        l.dropout_seed = Some(9);
        let d1 = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let d2 = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        l.dropout_seed = Some(10);
        let d3 = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(d1, d2);
        assert_ne!(d1, d3);
        assert_ne!(d1, plain);
    }

    #[test]
    fn dropout_masks_keep_one_minus_p_and_scale_what_they_keep() {
        for p in [0.05f32, 0.5] {
            let mask = dropout_mask(3, 200_000, p);
            let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / mask.len() as f64;
            assert!((kept - f64::from(1.0 - p)).abs() < 0.005, "p = {p}: kept {kept}");
            assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0 / (1.0 - p)));
            assert_eq!(mask[123_457], dropout_factor(3, 123_457, p));
        }
        assert_ne!(dropout_mask(3, 64, 0.5), dropout_mask(4, 64, 0.5));
    }
}

//! 4-bit NormalFloat weights with double-quantized scales, as in QLoRA (Dettmers et al. 2023, §3).
//!
//! A weight matrix is cut, in row-major order, into blocks of [`BLOCK`] = 64 values. Each block
//! keeps its absmax `a` and, per value, the index of the nearest of the 16 NF4 code values to
//! `w / a`. Double quantization then stores the absmax values themselves in 8 bits: they are
//! centred on their mean and cut into groups of [`SCALE_GROUP`] = 256, each group stored as int8
//! with one f32 scale (bitsandbytes uses its dynamic 8-bit map here; a linear int8 code is used
//! instead, with the error bound `scale / 2` tested below).
//!
//! Memory: 4 bits per weight + 8 bits per 64 weights + 32 bits per 16,384 weights + one f32
//! ≈ 0.516 bytes per parameter ([`Nf4Matrix::bytes_per_param`]).
//!
//! The matrix is never kept dense: [`super::frozen::Weight::matmul_t`] dequantizes it for each
//! product and drops it, in the forward pass and again in the backward pass.

use candle_core::{DType, Device, Tensor};

/// Values per absmax block.
pub const BLOCK: usize = 64;
/// Absmax values per double-quantization group.
pub const SCALE_GROUP: usize = 256;

/// The 16 NF4 code values (bitsandbytes `csrc/kernels.cu`, QLoRA App. E): quantiles of N(0, 1)
/// normalized to [-1, 1], with an exact zero. The digits are bitsandbytes' (the f32 values printed
/// as f64), kept so that the table can be compared with it by eye.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Index of the code value nearest to `x` (in [-1, 1]).
fn nearest_code(x: f32) -> u8 {
    // Midpoints between neighbouring code values; the first one above `x` decides.
    let mut i = 0;
    while i < 15 && x > 0.5 * (NF4_CODE[i] + NF4_CODE[i + 1]) {
        i += 1;
    }
    i as u8
}

/// A frozen `[rows, cols]` weight stored as NF4 codes with double-quantized absmax values.
#[derive(Debug, Clone)]
pub struct Nf4Matrix {
    rows: usize,
    cols: usize,
    /// Two codes per byte, the first value of a pair in the low nibble.
    codes: Vec<u8>,
    /// Per block: `(absmax − offset) / group_scale`, rounded to int8.
    absmax_q: Vec<i8>,
    /// Per group of [`SCALE_GROUP`] blocks.
    group_scale: Vec<f32>,
    /// Mean of all absmax values.
    offset: f32,
}

impl Nf4Matrix {
    /// Quantizes a 2-D tensor (any float dtype, any device).
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::from_values(rows, cols, &values))
    }

    fn from_values(rows: usize, cols: usize, values: &[f32]) -> Self {
        let n_blocks = values.len().div_ceil(BLOCK);
        let absmax: Vec<f32> = values.chunks(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let mut codes = vec![0u8; values.len().div_ceil(2)];
        for (blk, chunk) in values.chunks(BLOCK).enumerate() {
            let inv = if absmax[blk] > 0.0 { 1.0 / absmax[blk] } else { 0.0 };
            for (j, v) in chunk.iter().enumerate() {
                let i = blk * BLOCK + j;
                let c = nearest_code(v * inv);
                codes[i / 2] |= if i % 2 == 0 { c } else { c << 4 };
            }
        }
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / n_blocks.max(1) as f64) as f32;
        let mut absmax_q = Vec::with_capacity(n_blocks);
        let mut group_scale = Vec::with_capacity(n_blocks.div_ceil(SCALE_GROUP));
        for group in absmax.chunks(SCALE_GROUP) {
            let max = group.iter().fold(0f32, |m, a| m.max((a - offset).abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            group_scale.push(scale);
            absmax_q.extend(group.iter().map(|a| ((a - offset) / scale).round().clamp(-127.0, 127.0) as i8));
        }
        Nf4Matrix { rows, cols, codes, absmax_q, group_scale, offset }
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The absmax of block `b` as stored (after double quantization).
    pub fn absmax(&self, b: usize) -> f32 {
        self.absmax_q[b] as f32 * self.group_scale[b / SCALE_GROUP] + self.offset
    }

    /// The error bound of [`Nf4Matrix::absmax`] for block `b`: half a step of its group's int8 code.
    pub fn absmax_bound(&self, b: usize) -> f32 {
        0.5 * self.group_scale[b / SCALE_GROUP]
    }

    /// Bytes held: codes, int8 absmax, group scales and the offset.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.absmax_q.len() + 4 * self.group_scale.len() + 4
    }

    /// [`Nf4Matrix::bytes`] per weight.
    pub fn bytes_per_param(&self) -> f64 {
        self.bytes() as f64 / (self.rows * self.cols) as f64
    }

    /// The dense f32 values, row-major. Large matrices are decoded on all cores.
    pub fn dequantize_values(&self) -> Vec<f32> {
        let n = self.rows * self.cols;
        let mut out = vec![0f32; n];
        let threads = if n >= 1 << 20 { std::thread::available_parallelism().map_or(1, |t| t.get()) } else { 1 };
        let blocks_per_thread = n.div_ceil(BLOCK).div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (t, dst) in out.chunks_mut(blocks_per_thread * BLOCK).enumerate() {
                scope.spawn(move || self.decode_blocks(t * blocks_per_thread, dst));
            }
        });
        out
    }

    /// Decodes the blocks starting at block `first` into `dst` (a whole number of blocks, or the
    /// matrix's tail).
    fn decode_blocks(&self, first: usize, dst: &mut [f32]) {
        for (k, block) in dst.chunks_mut(BLOCK).enumerate() {
            let blk = first + k;
            let a = self.absmax(blk);
            let lut: [f32; 16] = std::array::from_fn(|i| NF4_CODE[i] * a);
            let bytes = &self.codes[blk * BLOCK / 2..];
            for (pair, byte) in block.chunks_mut(2).zip(bytes) {
                pair[0] = lut[(byte & 0x0f) as usize];
                if let Some(hi) = pair.get_mut(1) {
                    *hi = lut[(byte >> 4) as usize];
                }
            }
        }
    }

    /// The dense matrix as an f32 tensor on `device`.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequantize_values(), (self.rows, self.cols), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                // Box–Muller.
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    #[test]
    fn code_book_is_exact_and_every_code_value_round_trips() {
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[7], 0.0);
        assert_eq!(NF4_CODE[15], 1.0);
        assert_eq!(NF4_CODE[1], -0.6961928009986877f64 as f32);
        assert_eq!(NF4_CODE[8], 0.07958029955625534f64 as f32);
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        // A block holding exactly the code values (absmax 1) dequantizes to them exactly, as long
        // as the double-quantized absmax is exact: here every block has absmax 1.
        let values: Vec<f32> = (0..BLOCK * 4).map(|i| NF4_CODE[i % 16]).collect();
        let m = Nf4Matrix::from_values(4, BLOCK, &values);
        assert_eq!(m.dequantize_values(), values);
    }

    #[test]
    fn gaussian_round_trip_error_is_that_of_a_4_bit_code() {
        let (rows, cols) = (192, 320);
        let values = gaussian(rows * cols, 7);
        let m = Nf4Matrix::from_values(rows, cols, &values);
        let back = m.dequantize_values();
        let mse = values.iter().zip(&back).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / values.len() as f64;
        let rms = mse.sqrt();
        // NF4 with block-64 absmax on N(0,1) gives an RMS error of about 0.1 σ (measured 0.098
        // here); a broken code book or nibble order gives ≥ 0.3.
        assert!(rms < 0.11, "rms error {rms}");
        // No value moves by more than half the widest code gap times its block's absmax (+ the
        // absmax's own double-quantization error).
        for (i, (a, b)) in values.iter().zip(&back).enumerate() {
            let blk = i / BLOCK;
            let bound = 0.5 * (NF4_CODE[1] - NF4_CODE[0]).abs() * m.absmax(blk) + m.absmax_bound(blk) + 1e-6;
            assert!((a - b).abs() <= bound, "value {i}: {a} → {b}, bound {bound}");
        }
    }

    #[test]
    fn double_quantized_absmax_is_within_half_a_step() {
        let values: Vec<f32> = gaussian(1536 * 576, 3).iter().map(|v| v * 0.02).collect();
        let m = Nf4Matrix::from_values(1536, 576, &values);
        for (b, chunk) in values.chunks(BLOCK).enumerate() {
            let exact = chunk.iter().fold(0f32, |x, v| x.max(v.abs()));
            let err = (m.absmax(b) - exact).abs();
            assert!(err <= m.absmax_bound(b) * 1.0001, "block {b}: error {err} > {}", m.absmax_bound(b));
        }
        let bpp = m.bytes_per_param();
        assert!(bpp <= 0.52, "{bpp} bytes/param");
    }

    #[test]
    fn custom_op_matches_dense_matmul_in_value_and_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(gaussian(24 * 64, 1), (24, 64), &dev).unwrap();
        let m = std::sync::Arc::new(Nf4Matrix::quantize(&w).unwrap());
        let dense = m.dequantize(&dev).unwrap();
        let x = candle_core::Var::from_tensor(&Tensor::from_vec(gaussian(5 * 64, 2), (5, 64), &dev).unwrap()).unwrap();
        let y = super::super::frozen::Weight::Nf4(m).matmul_t(x.as_tensor()).unwrap();
        let y_ref = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
        let diff = (y.clone() - &y_ref).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-3, "{diff}");
    }
}

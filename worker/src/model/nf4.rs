//! 4-bit NormalFloat weights with double-quantized scales, as in QLoRA (Dettmers et al. 2023, §3).
//!
//! A weight matrix is cut, in row-major order, into blocks of [`BLOCK`] = 64 values. Each block
//! keeps its absmax `a` and, per value, the index of the nearest of the 16 NF4 code values to
//! `w / a`. Double quantization then stores the absmax values themselves in 8 bits: they are
//! centred on their mean and cut into groups of [`SCALE_GROUP`] = 256, each group stored as int8
//! with one f32 scale (bitsandbytes uses its dynamic 8-bit map here; a linear int8 code is used
//! instead, with the error bound `scale / 2` tested below).
//!
//! The four parts live as tensors on the model's device (the GPU when healing on CUDA): the codes
//! as a u8 tensor, two per byte; the int8 absmax codes as u8 (stored `+ 128`, candle has no i8);
//! the group scales and the mean as f32. Memory: 4 bits per weight + 8 bits per 64 weights + 32
//! bits per 16,384 weights + one f32 ≈ 0.516 bytes per parameter ([`Nf4Matrix::bytes_per_param`],
//! summed from those tensors' sizes).
//!
//! Two decoders give bit-identical values: the CPU kernel here ([`Nf4Matrix::dequantize_values`],
//! multi-threaded, the f32 CPU path) and stock candle ops that run on any device, a row range at a
//! time ([`Nf4Matrix::decode_rows`], `nf4_device.rs`). The matrix is never kept dense:
//! [`super::frozen::Weight::matmul_t`] decodes it for each product and drops it, in the forward
//! pass and again in the backward pass.

use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Values per absmax block.
pub const BLOCK: usize = 64;
/// Absmax values per double-quantization group.
pub const SCALE_GROUP: usize = 256;
/// The int8 absmax codes are stored as u8 with this added (candle has no i8 dtype).
pub(super) const ABSMAX_BIAS: f32 = 128.0;
/// Values decoded at once by [`Nf4Matrix::decode_rows`]'s callers: the transient dense tile of a
/// product is at most this many values (64 MiB in f32), whatever the matrix's size.
pub const TILE_VALUES: usize = 1 << 24;

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

/// A matrix as quantization produces it, on the host, before it goes to its device.
struct Packed {
    /// Whole blocks: the tail block is padded with code 0.
    codes: Vec<u8>,
    /// One per block.
    absmax_q: Vec<u8>,
    group_scale: Vec<f32>,
    offset: f32,
}

impl Packed {
    /// Quantizes row-major `values`; blocks are encoded on all cores.
    fn quantize(values: &[f32]) -> Self {
        let n_blocks = values.len().div_ceil(BLOCK);
        let absmax: Vec<f32> = values.par_chunks(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let mut codes = vec![0u8; n_blocks * BLOCK / 2];
        codes.par_chunks_mut(BLOCK / 2).zip(values.par_chunks(BLOCK)).zip(&absmax).for_each(|((dst, chunk), &a)| {
            let inv = if a > 0.0 { 1.0 / a } else { 0.0 };
            for (j, v) in chunk.iter().enumerate() {
                let c = nearest_code(v * inv);
                dst[j / 2] |= if j % 2 == 0 { c } else { c << 4 };
            }
        });
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / n_blocks.max(1) as f64) as f32;
        let n_groups = n_blocks.div_ceil(SCALE_GROUP);
        let mut absmax_q = Vec::with_capacity(n_blocks);
        let mut group_scale = Vec::with_capacity(n_groups);
        for group in absmax.chunks(SCALE_GROUP) {
            let max = group.iter().fold(0f32, |m, a| m.max((a - offset).abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            group_scale.push(scale);
            absmax_q.extend(group.iter().map(|a| {
                let q = ((a - offset) / scale).round().clamp(-127.0, 127.0);
                (q + ABSMAX_BIAS) as u8
            }));
        }
        Packed { codes, absmax_q, group_scale, offset }
    }
}

/// A frozen `[rows, cols]` weight stored as NF4 codes with double-quantized absmax values, all
/// resident on one device.
#[derive(Debug, Clone)]
pub struct Nf4Matrix {
    rows: usize,
    cols: usize,
    /// u8 `[blocks · BLOCK / 2]`: two codes per byte, the first value of a pair in the low nibble.
    pub(super) codes: Tensor,
    /// u8 `[blocks]`: per block, `(absmax − offset) / group_scale` rounded to int8, plus
    /// [`ABSMAX_BIAS`].
    pub(super) absmax_q: Tensor,
    /// f32 `[groups]`: one scale per group of [`SCALE_GROUP`] blocks.
    pub(super) group_scale: Tensor,
    /// f32 `[1]`: the mean of all absmax values.
    pub(super) offset: Tensor,
    /// Values per tile of a product on the stock path ([`TILE_VALUES`] unless set).
    pub(super) tile_values: usize,
}

/// The parts of a matrix as host slices, for the CPU kernel.
struct HostView<'a> {
    codes: &'a [u8],
    absmax_q: &'a [u8],
    group_scale: &'a [f32],
    offset: f32,
}

impl HostView<'_> {
    fn absmax(&self, b: usize) -> f32 {
        (self.absmax_q[b] as f32 - ABSMAX_BIAS) * self.group_scale[b / SCALE_GROUP] + self.offset
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
}

/// The elements of a CPU tensor's storage that its layout covers (it must be contiguous).
fn host_slice<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else { candle_core::bail!("nf4: expected a CPU tensor") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("nf4: non-contiguous part") };
    Ok(&cpu.as_slice::<T>()?[start..end])
}

impl Nf4Matrix {
    /// Quantizes a 2-D tensor (any float dtype, any device); the result lives on the tensor's
    /// device. The values are read to the host (an f32 tensor on the CPU is read in place) and
    /// encoded there, on all cores.
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        Self::quantize_to(w, w.device())
    }

    /// [`Nf4Matrix::quantize`], the result put on `device`.
    pub fn quantize_to(w: &Tensor, device: &Device) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?;
        if w.device().is_cpu() && w.is_contiguous() {
            let (storage, layout) = w.storage_and_layout();
            return Self::from_values(rows, cols, host_slice(&storage, layout)?, device);
        }
        Self::from_values(rows, cols, &w.flatten_all()?.to_vec1::<f32>()?, device)
    }

    /// Quantizes row-major `values` of a `[rows, cols]` matrix and puts the result on `device`.
    pub fn from_values(rows: usize, cols: usize, values: &[f32], device: &Device) -> candle_core::Result<Self> {
        if values.len() != rows * cols {
            candle_core::bail!("nf4: {} values for a [{rows}, {cols}] matrix", values.len());
        }
        let p = Packed::quantize(values);
        let n_groups = p.group_scale.len();
        Ok(Nf4Matrix {
            rows,
            cols,
            codes: Tensor::from_vec(p.codes, values.len().div_ceil(BLOCK) * BLOCK / 2, device)?,
            absmax_q: Tensor::from_vec(p.absmax_q, values.len().div_ceil(BLOCK), device)?,
            group_scale: Tensor::from_vec(p.group_scale, n_groups, device)?,
            offset: Tensor::from_vec(vec![p.offset], 1, device)?,
            tile_values: TILE_VALUES,
        })
    }

    /// The same matrix decoded at most `values` values at a time on the stock path (tests use
    /// small tiles to exercise tiling on small matrices).
    pub fn with_tile_values(mut self, values: usize) -> Self {
        self.tile_values = values.max(1);
        self
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The device the matrix lives on.
    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// The tensors the matrix is made of (codes, absmax codes, group scales, mean), as resident
    /// on its device.
    pub fn parts(&self) -> [&Tensor; 4] {
        [&self.codes, &self.absmax_q, &self.group_scale, &self.offset]
    }

    /// Bytes resident on the device: the sizes of [`Nf4Matrix::parts`].
    pub fn bytes(&self) -> usize {
        self.parts().iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// [`Nf4Matrix::bytes`] per weight.
    pub fn bytes_per_param(&self) -> f64 {
        self.bytes() as f64 / (self.rows * self.cols) as f64
    }

    /// Runs `f` on host slices of the parts: borrowed when the matrix is on the CPU, copied from
    /// the device otherwise.
    fn with_host<R>(&self, f: impl FnOnce(&HostView) -> R) -> candle_core::Result<R> {
        if self.device().is_cpu() {
            let (c, cl) = self.codes.storage_and_layout();
            let (a, al) = self.absmax_q.storage_and_layout();
            let (s, sl) = self.group_scale.storage_and_layout();
            let (o, ol) = self.offset.storage_and_layout();
            let view = HostView {
                codes: host_slice(&c, cl)?,
                absmax_q: host_slice(&a, al)?,
                group_scale: host_slice(&s, sl)?,
                offset: host_slice::<f32>(&o, ol)?[0],
            };
            Ok(f(&view))
        } else {
            let (codes, absmax_q) = (self.codes.to_vec1::<u8>()?, self.absmax_q.to_vec1::<u8>()?);
            let (group_scale, offset) = (self.group_scale.to_vec1::<f32>()?, self.offset.to_vec1::<f32>()?);
            Ok(f(&HostView { codes: &codes, absmax_q: &absmax_q, group_scale: &group_scale, offset: offset[0] }))
        }
    }

    /// The absmax of block `b` as stored (after double quantization).
    pub fn absmax(&self, b: usize) -> candle_core::Result<f32> {
        self.with_host(|h| h.absmax(b))
    }

    /// The error bound of [`Nf4Matrix::absmax`] for block `b`: half a step of its group's int8 code.
    pub fn absmax_bound(&self, b: usize) -> candle_core::Result<f32> {
        self.with_host(|h| 0.5 * h.group_scale[b / SCALE_GROUP])
    }

    /// The dense f32 values, row-major, decoded by the CPU kernel. Large matrices are decoded on
    /// all cores.
    pub fn dequantize_values(&self) -> candle_core::Result<Vec<f32>> {
        let n = self.rows * self.cols;
        let mut out = vec![0f32; n];
        let threads = if n >= 1 << 20 { std::thread::available_parallelism().map_or(1, |t| t.get()) } else { 1 };
        let blocks_per_thread = n.div_ceil(BLOCK).div_ceil(threads).max(1);
        self.with_host(|host| {
            std::thread::scope(|scope| {
                for (t, dst) in out.chunks_mut(blocks_per_thread * BLOCK).enumerate() {
                    scope.spawn(move || host.decode_blocks(t * blocks_per_thread, dst));
                }
            })
        })?;
        Ok(out)
    }

    /// The dense matrix as an f32 tensor on `device`, decoded by the CPU kernel.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequantize_values()?, (self.rows, self.cols), device)
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
        let m = Nf4Matrix::from_values(4, BLOCK, &values, &Device::Cpu).unwrap();
        assert_eq!(m.dequantize_values().unwrap(), values);
    }

    #[test]
    fn gaussian_round_trip_error_is_that_of_a_4_bit_code() {
        let (rows, cols) = (192, 320);
        let values = gaussian(rows * cols, 7);
        let m = Nf4Matrix::from_values(rows, cols, &values, &Device::Cpu).unwrap();
        let back = m.dequantize_values().unwrap();
        let mse = values.iter().zip(&back).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / values.len() as f64;
        let rms = mse.sqrt();
        // NF4 with block-64 absmax on N(0,1) gives an RMS error of about 0.1 σ (measured 0.098
        // here); a broken code book or nibble order gives ≥ 0.3.
        assert!(rms < 0.11, "rms error {rms}");
        // No value moves by more than half the widest code gap times its block's absmax (+ the
        // absmax's own double-quantization error).
        let blocks: Vec<(f32, f32)> =
            (0..values.len().div_ceil(BLOCK)).map(|b| (m.absmax(b).unwrap(), m.absmax_bound(b).unwrap())).collect();
        for (i, (a, b)) in values.iter().zip(&back).enumerate() {
            let (absmax, absmax_bound) = blocks[i / BLOCK];
            let bound = 0.5 * (NF4_CODE[1] - NF4_CODE[0]).abs() * absmax + absmax_bound + 1e-6;
            assert!((a - b).abs() <= bound, "value {i}: {a} → {b}, bound {bound}");
        }
    }

    #[test]
    fn double_quantized_absmax_is_within_half_a_step() {
        let values: Vec<f32> = gaussian(1536 * 576, 3).iter().map(|v| v * 0.02).collect();
        let m = Nf4Matrix::from_values(1536, 576, &values, &Device::Cpu).unwrap();
        for (b, chunk) in values.chunks(BLOCK).enumerate() {
            let exact = chunk.iter().fold(0f32, |x, v| x.max(v.abs()));
            let (absmax, bound) = (m.absmax(b).unwrap(), m.absmax_bound(b).unwrap());
            let err = (absmax - exact).abs();
            assert!(err <= bound * 1.0001, "block {b}: error {err} > {bound}");
        }
        let bpp = m.bytes_per_param();
        assert!(bpp <= 0.52, "{bpp} bytes/param");
    }

    /// The encoding, written plainly (one thread, one value at a time, the i8 absmax codes as
    /// QLoRA describes them).
    fn reference(values: &[f32]) -> (Vec<u8>, Vec<i8>, Vec<f32>, f32) {
        let absmax: Vec<f32> = values.chunks(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let mut codes = vec![0u8; values.len().div_ceil(2)];
        for (i, v) in values.iter().enumerate() {
            let a = absmax[i / BLOCK];
            let c = nearest_code(v * if a > 0.0 { 1.0 / a } else { 0.0 });
            codes[i / 2] |= if i % 2 == 0 { c } else { c << 4 };
        }
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let (mut q, mut scales) = (Vec::new(), Vec::new());
        for group in absmax.chunks(SCALE_GROUP) {
            let max = group.iter().fold(0f32, |m, a| m.max((a - offset).abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            scales.push(scale);
            q.extend(group.iter().map(|a| ((a - offset) / scale).round().clamp(-127.0, 127.0) as i8));
        }
        (codes, q, scales, offset)
    }

    #[test]
    fn the_device_parts_hold_the_reference_encoding() {
        // 38,700 values: a half-filled last block, three groups, the last one partial.
        let (rows, cols) = (300, 129);
        let values: Vec<f32> =
            gaussian(rows * cols, 11).iter().enumerate().map(|(i, v)| v * (1 + i / 5000) as f32).collect();
        let (codes, q, scales, offset) = reference(&values);
        let m = Nf4Matrix::from_values(rows, cols, &values, &Device::Cpu).unwrap();
        let [c, a, s, o] = m.parts();
        let c = c.to_vec1::<u8>().unwrap();
        assert_eq!(c.len(), values.len().div_ceil(BLOCK) * BLOCK / 2);
        assert_eq!(&c[..codes.len()], codes.as_slice());
        assert!(c[codes.len()..].iter().all(|&b| b == 0), "padding codes");
        let a = a.to_vec1::<u8>().unwrap();
        assert_eq!(a.iter().map(|&b| (b as i16 - 128) as i8).collect::<Vec<_>>(), q);
        assert_eq!(s.to_vec1::<f32>().unwrap(), scales);
        assert_eq!(o.to_vec1::<f32>().unwrap(), [offset]);
        // And the kernel decodes what the reference encoded: code value × double-quantized absmax.
        let back = m.dequantize_values().unwrap();
        for (i, v) in back.iter().enumerate() {
            let b = i / BLOCK;
            let absmax = q[b] as f32 * scales[b / SCALE_GROUP] + offset;
            let code = (codes[i / 2] >> (4 * (i % 2))) & 0x0f;
            assert_eq!(v.to_bits(), (NF4_CODE[code as usize] * absmax).to_bits(), "value {i}");
        }
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

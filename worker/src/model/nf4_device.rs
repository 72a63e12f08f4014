//! NF4 decoded with stock candle ops, on whatever device the matrix lives on.
//!
//! This is the GPU path of [`Nf4Matrix`]: the codes stay on the device, and each product decodes
//! the rows it needs into a transient dense tile there, at most [`super::nf4::TILE_VALUES`] values
//! at a time, in the compute dtype. Each step is an op candle runs on every device (a byte-indexed
//! table lookup, integer-to-float casts, broadcast products), and each rounds exactly as the CPU
//! kernel does: the tile is bit-identical to [`Nf4Matrix::dequantize_values`] (tested on CPU,
//! where both run).
//!
//! The steps, for the blocks `b0 .. b1` that cover the requested rows:
//! 1. absmax: the int8 codes of the groups that hold those blocks, `(q − 128) · scale + mean`;
//! 2. values: each code byte looks up its pair `[NF4[lo], NF4[hi]]` in a 256-row table
//!    (`index_select`, the bytes cast to u32 indices), and each block of 64 is multiplied by its
//!    absmax;
//! 3. the requested rows are cut out of the blocks and cast to the compute dtype.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::nf4::{Nf4Matrix, ABSMAX_BIAS, BLOCK, NF4_CODE, SCALE_GROUP};

/// The `[256, 2]` f32 table byte → `[NF4[byte & 15], NF4[byte >> 4]]`, one per device, shared by
/// every matrix there (2 KiB; not counted in [`Nf4Matrix::bytes`]).
fn pair_table(device: &Device) -> candle_core::Result<Tensor> {
    static TABLES: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());
    let mut tables = TABLES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(t) = tables.iter().find(|t| t.device().same_device(device)) {
        return Ok(t.clone());
    }
    let pairs: Vec<f32> = (0..256).flat_map(|b| [NF4_CODE[b & 15], NF4_CODE[b >> 4]]).collect();
    let table = Tensor::from_vec(pairs, (256, 2), device)?;
    tables.push(table.clone());
    Ok(table)
}

impl Nf4Matrix {
    /// Rows `first .. first + n` as a dense `[n, cols]` tensor in `dtype` on the matrix's device,
    /// decoded with stock ops (bit-identical to the CPU kernel's values cast to `dtype`).
    pub fn decode_rows(&self, first: usize, n: usize, dtype: DType) -> candle_core::Result<Tensor> {
        let (rows, cols) = self.dims();
        if first + n > rows || n == 0 {
            candle_core::bail!("nf4: rows {first}..{} of a matrix of {rows}", first + n);
        }
        let (start, end) = (first * cols, (first + n) * cols);
        let (b0, b1) = (start / BLOCK, end.div_ceil(BLOCK));
        let absmax = self.absmax_range(b0, b1)?.unsqueeze(1)?;
        // 2. values of those blocks: [b1 − b0, BLOCK].
        let values = {
            let bytes = self.codes.narrow(0, b0 * BLOCK / 2, (b1 - b0) * BLOCK / 2)?;
            // u32 indices: candle reads the largest value of the index type as "no row" (zeros),
            // and 255 is a byte like any other here.
            let codes = pair_table(self.device())?.index_select(&bytes.to_dtype(DType::U32)?, 0)?;
            codes.reshape((b1 - b0, BLOCK))?.broadcast_mul(&absmax)?
        };
        // 3. the rows asked for.
        values.flatten_all()?.narrow(0, start - b0 * BLOCK, end - start)?.to_dtype(dtype)?.reshape((n, cols))
    }

    /// The absmax values of blocks `b0 .. b1`, `[b1 − b0]` f32: `(q − 128) · scale + mean` for
    /// the groups that hold them, the complete groups as one `[groups, SCALE_GROUP]` product and
    /// the matrix's last, partial group (if it is among them) apart.
    fn absmax_range(&self, b0: usize, b1: usize) -> candle_core::Result<Tensor> {
        let n_blocks = self.absmax_q.dim(0)?;
        let (g0, g1) = (b0 / SCALE_GROUP, b1.div_ceil(SCALE_GROUP));
        let complete = g1.min(n_blocks / SCALE_GROUP);
        let centred = |first_block: usize, n: usize| {
            self.absmax_q.narrow(0, first_block, n)?.to_dtype(DType::F32)?.affine(1.0, -(ABSMAX_BIAS as f64))
        };
        let mut parts = Vec::with_capacity(2);
        if complete > g0 {
            let q = centred(g0 * SCALE_GROUP, (complete - g0) * SCALE_GROUP)?.reshape((complete - g0, SCALE_GROUP))?;
            let scale = self.group_scale.narrow(0, g0, complete - g0)?.unsqueeze(1)?;
            parts.push(q.broadcast_mul(&scale)?.flatten_all()?);
        }
        if g1 > complete {
            let q = centred(complete * SCALE_GROUP, n_blocks - complete * SCALE_GROUP)?;
            parts.push(q.broadcast_mul(&self.group_scale.narrow(0, complete, 1)?)?);
        }
        let scaled = if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 0)? };
        scaled.broadcast_add(&self.offset)?.narrow(0, b0 - g0 * SCALE_GROUP, b1 - b0)
    }

    /// The row ranges `(first, n)` a product decodes one at a time: each at most the matrix's tile
    /// size in values (at least one row).
    pub fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let (rows, cols) = self.dims();
        let per_tile = (self.tile_values / cols.max(1)).clamp(1, rows.max(1));
        (0..rows).step_by(per_tile).map(move |first| (first, per_tile.min(rows - first)))
    }

    /// `x Wᵀ` for `x: [m, cols]` → `[m, rows]` on the stock path, a tile of rows at a time (the
    /// tiles' products are put side by side). No gradient is recorded for the weight.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut parts = Vec::new();
        for (first, n) in self.tiles() {
            let w = self.decode_rows(first, n, x.dtype())?;
            parts.push(x.matmul(&w.t()?)?);
        }
        match parts.len() {
            1 => Ok(parts.pop().expect("one part")),
            _ => Tensor::cat(&parts, 1),
        }
    }

    /// `g W` for `g: [m, rows]` → `[m, cols]` on the stock path, summed over tiles of rows.
    pub fn matmul(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (first, n) in self.tiles() {
            let w = self.decode_rows(first, n, g.dtype())?;
            let g_tile = if n == self.dims().0 { g.clone() } else { g.narrow(1, first, n)?.contiguous()? };
            let part = g_tile.matmul(&w)?;
            sum = Some(match sum {
                Some(s) => (s + part)?,
                None => part,
            });
        }
        sum.ok_or_else(|| candle_core::Error::Msg("nf4: a matrix without rows".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        // A spread of magnitudes, so that groups get different scales.
        (0..n).map(|i| (rng.random::<f32>() - 0.5) * (1.0 + (i / 700) as f32)).collect()
    }

    /// Panics at the first value whose bits differ, naming it.
    fn assert_same_bits(a: &[u32], b: &[u32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
            panic!("{what}: value {i} of {} is {x:e}, the CPU kernel's is {y:e}", a.len());
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn stock_decode_is_bit_identical_to_the_cpu_kernel_for_any_shape_and_tile() {
        // Rows and columns off the block (64) and group (256 blocks) grid; a matrix with several
        // groups and a partial last group; a single row; a column vector. The values are such that
        // every byte occurs, 0xff (two codes of +1) included.
        for (rows, cols) in [(37, 53), (300, 129), (3, 700), (1, 5), (257, 65), (1000, 1)] {
            let m = Nf4Matrix::from_values(rows, cols, &values(rows * cols, rows as u64), &Device::Cpu).unwrap();
            if rows * cols > 10_000 {
                assert!(m.codes.to_vec1::<u8>().unwrap().contains(&0xff), "[{rows}, {cols}]: no byte 0xff");
            }
            let kernel: Vec<f32> = m.dequantize_values().unwrap();
            let kernel_bits: Vec<u32> = kernel.iter().map(|v| v.to_bits()).collect();
            let whole = m.decode_rows(0, rows, DType::F32).unwrap();
            assert_eq!(whole.dims(), [rows, cols]);
            assert_same_bits(&bits(&whole), &kernel_bits, &format!("[{rows}, {cols}] whole"));
            // Tiles of odd sizes, stitched back together, give the same bits.
            for tile in [1, 7 * cols + 3, 64 * 256 + 1] {
                let m = m.clone().with_tile_values(tile);
                let parts: Vec<Tensor> =
                    m.tiles().map(|(first, n)| m.decode_rows(first, n, DType::F32).unwrap()).collect();
                assert_eq!(parts.iter().map(|p| p.dim(0).unwrap()).sum::<usize>(), rows);
                assert_same_bits(
                    &bits(&Tensor::cat(&parts, 0).unwrap()),
                    &kernel_bits,
                    &format!("[{rows}, {cols}] tile {tile}"),
                );
            }
            // In bf16: the kernel's f32 values rounded once.
            let bf16 = m.decode_rows(0, rows, DType::BF16).unwrap();
            let want = Tensor::from_vec(kernel, (rows, cols), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
            assert_same_bits(&bits(&bf16), &bits(&want), &format!("[{rows}, {cols}] bf16"));
        }
    }

    #[test]
    fn tiled_products_match_the_dense_ones() {
        let (rows, cols) = (70, 90);
        let m = Nf4Matrix::from_values(rows, cols, &values(rows * cols, 5), &Device::Cpu).unwrap();
        let dense = m.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::from_vec(values(6 * cols, 6), (6, cols), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(values(6 * rows, 7), (6, rows), &Device::Cpu).unwrap();
        let y_ref = x.matmul(&dense.t().unwrap()).unwrap();
        let gx_ref = g.matmul(&dense).unwrap();
        for tile in [1, 13 * cols, 1 << 24] {
            let m = m.clone().with_tile_values(tile);
            let tiles = m.tiles().count();
            assert_eq!(tiles, rows.div_ceil((tile / cols).clamp(1, rows)));
            let dy = (m.matmul_t(&x).unwrap() - &y_ref).unwrap().abs().unwrap().max_all().unwrap();
            let dg = (m.matmul(&g).unwrap() - &gx_ref).unwrap().abs().unwrap().max_all().unwrap();
            assert!(dy.to_scalar::<f32>().unwrap() < 1e-4, "{tiles} tiles: {dy}");
            assert!(dg.to_scalar::<f32>().unwrap() < 1e-4, "{tiles} tiles: {dg}");
        }
    }

    #[test]
    fn the_parts_are_resident_at_under_0_56_bytes_per_parameter() {
        // The tiny fixture's k_proj (one partial group), SmolLM2's q_proj, 64 rows of a 70B down_proj.
        for (rows, cols) in [(32, 64), (576, 576), (64, 28_672), (1536, 576)] {
            let m = Nf4Matrix::from_values(rows, cols, &values(rows * cols, 9), &Device::Cpu).unwrap();
            let [codes, absmax, scales, mean] = m.parts();
            assert_eq!(
                (codes.dtype(), absmax.dtype(), scales.dtype(), mean.dtype()),
                (DType::U8, DType::U8, DType::F32, DType::F32)
            );
            let measured: usize = m.parts().iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
            // Codes alone are half a byte per parameter; a dense copy would be 4 (f32) or 2 (bf16).
            assert!(codes.elem_count() * 2 >= rows * cols);
            let bpp = measured as f64 / (rows * cols) as f64;
            assert!((0.5..=0.56).contains(&bpp), "[{rows}, {cols}]: {bpp} bytes/param");
            assert_eq!(m.bytes(), measured);
        }
    }
}

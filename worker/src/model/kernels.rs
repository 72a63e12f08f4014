//! Which implementation an op takes: the CPU's fused f32 kernels (custom ops), or the stock
//! candle ops that CUDA and every bf16 model run.
//!
//! The fused kernels are a CPU speed-up only; the stock path is the GPU path. [`with_stock_ops`]
//! runs a closure on the stock path even for f32 on a CPU, so a test can compare the GPU code
//! path with the fused one at f32 precision (any difference there is a bug, not rounding) and
//! then at bf16 (rounding only).

use std::cell::Cell;

use candle_core::{CpuStorage, DType, Layout, Tensor};

thread_local! {
    static STOCK_OPS: Cell<bool> = const { Cell::new(false) };
}

/// Whether ops on `t` take the CPU's fused f32 kernels: an f32 tensor on the CPU, outside
/// [`with_stock_ops`].
pub fn fused_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !STOCK_OPS.with(Cell::get)
}

/// The values of a custom op's contiguous f32 CPU input, or an error naming the op (`op`) and
/// what it was given.
pub fn f32_slice<'s>(op: &str, storage: &'s CpuStorage, layout: &Layout) -> candle_core::Result<&'s [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: inputs must be f32, got {:?}", candle_core::backend::BackendStorage::dtype(storage))
    };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: inputs must be contiguous") };
    Ok(&data[start..end])
}

/// The values of an in-place op's contiguous f32 CPU destination, or an error naming the op.
pub fn f32_slice_mut<'s>(op: &str, storage: &'s mut CpuStorage, layout: &Layout) -> candle_core::Result<&'s mut [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: the destination must be f32") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the destination must be contiguous")
    };
    Ok(&mut data[start..end])
}

/// Elements per parallel task of the fused elementwise passes: large enough that scheduling is
/// noise, small enough for 2+ cores to share an MLP activation of a few hundred tokens.
pub const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// Runs `f` with every op on this thread taking the stock (GPU) path; restores the previous
/// choice afterwards, also when `f` panics.
pub fn with_stock_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            STOCK_OPS.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(STOCK_OPS.with(|s| s.replace(true)));
    f()
}

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX-512 where present,
/// else AVX2 + FMA, chosen at run time through `pulp`; the build's SSE2 baseline otherwise), so
/// that the loops the fused kernels run inside it vectorise 16 or 8 lanes wide instead of 4. The arithmetic is the same
/// instructions lane by lane (no reassociation, no fused multiply-add the code does not ask for),
/// so the results are the same bits. Call it inside each parallel task (target features do not
/// pass through rayon's closures), and mark the closure `#[inline(always)]`: otherwise LLVM may
/// compile it as a function of its own, outside the dispatch and without the features.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// A tensor's CPU storage (from [`Tensor::storage_and_layout`]), or an error naming the op
/// (`op`) for another device's.
pub fn cpu_storage<'s>(op: &str, storage: &'s candle_core::Storage) -> candle_core::Result<&'s CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(cpu) => Ok(cpu),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// A 2-D f32 matrix on the CPU as candle's matmul reads it: storage and a layout, so that a
/// transpose or an offset is only a layout and nothing is copied.
#[derive(Debug, Clone)]
pub struct Mat<'a> {
    storage: &'a CpuStorage,
    layout: Layout,
}

impl<'a> Mat<'a> {
    /// The matrix `layout` (2-D) describes in `storage`.
    pub fn new(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        layout.shape().dims2()?;
        Ok(Mat { storage, layout: layout.clone() })
    }

    /// The row-major `rows × cols` matrix that is all of `storage`.
    pub fn rows(storage: &'a CpuStorage, rows: usize, cols: usize) -> candle_core::Result<Self> {
        let CpuStorage::F32(values) = storage else { candle_core::bail!("a matrix for matmul must be f32") };
        let len = values.len();
        if len != rows * cols {
            candle_core::bail!("a {rows}x{cols} matrix needs {} values, got {len}", rows * cols)
        }
        Ok(Mat { storage, layout: Layout::contiguous((rows, cols)) })
    }

    /// The transpose, as a view of the same values.
    pub fn t(&self) -> candle_core::Result<Self> {
        Ok(Mat { storage: self.storage, layout: self.layout.transpose(0, 1)? })
    }
}

/// The inner dimension from which gemm's f32 kernels multiply by a column-major right-hand side
/// markedly slower than by the same matrix row-major: on a Zen 4 (2 cores, AVX-512), `x Wᵀ` at
/// 1024 rows ran 101 / 148 / 110 / 136 GFLOP/s for K = 768 / 1024 / 1536 / 2048 (N = 576) with
/// `Wᵀ` a view, against 161-196 with `Wᵀ` stored row-major; at K = 576 the two were equal
/// (`scripts/bench-gemm.sh` prints both layouts). Dense block weights whose input dimension
/// reaches it are stored transposed on the CPU ([`super::frozen::Weight::dense`]). Products with
/// an NF4 weight, decoded for each product, still read its `Wᵀ` as a view: copying it row-major
/// per product held a second decoded matrix at a time, and the wide memory test's peak rose past
/// the memory model's ±15%.
pub const ROW_MAJOR_RHS_MIN_K: usize = 768;

/// `a b` as a row-major f32 vector: candle's CPU matmul (the gemm crate's kernels, on rayon's
/// threads) reading both operands where they lie.
pub fn matmul(a: &Mat, b: &Mat) -> candle_core::Result<Vec<f32>> {
    let ((m, k), (k_b, n)) = (a.layout.shape().dims2()?, b.layout.shape().dims2()?);
    if k != k_b {
        candle_core::bail!("matmul: {m}x{k} times {k_b}x{n}")
    }
    let product =
        candle_core::backend::BackendStorage::matmul(a.storage, b.storage, (1, m, n, k), &a.layout, &b.layout)?;
    match product {
        CpuStorage::F32(values) => Ok(values),
        other => {
            candle_core::bail!("matmul: f32 operands gave {:?}", candle_core::backend::BackendStorage::dtype(&other))
        }
    }
}

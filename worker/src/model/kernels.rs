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

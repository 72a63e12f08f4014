//! Frozen projection weights and their products.
//!
//! A weight is dense (as loaded) or NF4 (the healing base, [`super::nf4`]). Nothing ever trains
//! it, so while healing the product `x Wᵀ` is a custom op, on every device, whose backward pass
//! returns the input's gradient `g W` only. candle's own matmul backward also computes `xᵀ g` for
//! the weight — a second product as large as the forward one, thrown away — and would keep the
//! dense copy of an NF4 weight alive until the backward pass; this op keeps only the 4-bit codes
//! and decodes them again for the backward product.
//!
//! The op's forward pass is one function for every backend ([`FrozenMatMul::fwd`], through
//! [`super::op_storage`]): it copies the input into a tensor outside the graph, computes the
//! product with ordinary tensor ops on that device and hands back the result's storage. So the
//! code CUDA runs is the code the CPU runs on the stock path (bf16, or
//! [`super::kernels::with_stock_ops`]), which the tests cover. The CPU's f32 path instead
//! multiplies straight from the input's and the weight's values ([`super::kernels::matmul`]), as
//! the fused LoRA product ([`super::lora_product`]) does.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::kernels::{cpu_storage, matmul, Mat};
use super::nf4::Nf4Matrix;
use super::op_storage::OpStorage;

/// A frozen projection weight `[out, in]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// As loaded.
    Dense(Tensor),
    /// 4-bit, resident on the model's device, decoded for each product.
    Nf4(Arc<Nf4Matrix>),
}

impl Weight {
    /// A dense weight `w` (`[out, in]`) stored for the products it takes part in: on the CPU in
    /// f32 with a long input dimension, its values are laid out as `Wᵀ` (`[in, out]` row-major,
    /// `w` a transposed view of them), so that the forward product `x Wᵀ` reads them row-major
    /// (gemm is up to 2x faster so, [`super::kernels::ROW_MAJOR_RHS_MIN_K`]); as loaded
    /// elsewhere. The values are the same either way.
    pub fn dense(w: Tensor) -> candle_core::Result<Self> {
        let in_dim = w.dims2()?.1;
        if w.device().is_cpu() && w.dtype() == DType::F32 && in_dim >= super::kernels::ROW_MAJOR_RHS_MIN_K {
            return Ok(Weight::Dense(w.t()?.contiguous()?.t()?));
        }
        Ok(Weight::Dense(w))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Weight::Dense(w) => w.dims2(),
            Weight::Nf4(m) => Ok(m.dims()),
        }
    }

    /// The dense values (decoded whole for NF4: the CPU kernel when the matrix is on the CPU,
    /// stock ops on its device otherwise) in `dtype` on `device`.
    pub fn to_dense(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Nf4(m) if m.device().is_cpu() => m.dequantize(device)?.to_dtype(dtype),
            Weight::Nf4(m) => m.decode_rows(0, m.dims().0, dtype)?.to_device(device),
        }
    }

    /// `x Wᵀ` for `x: [n, in]` → `[n, out]`; gradients flow to `x` only.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let fused = super::kernels::fused_cpu(x);
        if !x.track_op() {
            // Inference: the product itself (no graph is recorded anyway).
            return self.product(x, fused);
        }
        x.contiguous()?.apply_op1(FrozenMatMul { weight: self.clone(), fused })
    }

    /// `x Wᵀ`, outside any graph. `fused`: the CPU's f32 path, where NF4 is decoded whole by the
    /// CPU kernel; otherwise tile by tile with stock ops.
    fn product(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        match self {
            _ if fused => {
                let x = x.contiguous()?;
                let (storage, layout) = x.storage_and_layout();
                let y = self.cpu_product(&Mat::new(cpu_storage("frozen-matmul", &storage)?, layout)?)?;
                Tensor::from_vec(y, (x.dim(0)?, self.dims()?.0), x.device())
            }
            Weight::Dense(w) => x.matmul(&w.t()?),
            Weight::Nf4(m) => m.matmul_t(x),
        }
    }

    /// `x Wᵀ` on the CPU in f32, read straight from the input's and the weight's values.
    fn cpu_product(&self, x: &Mat) -> candle_core::Result<Vec<f32>> {
        self.with_cpu_mat("frozen-matmul", |w| matmul(x, &w.t()?))?
    }

    /// `g W`, the input's gradient for an output gradient `g: [n, out]`.
    fn input_grad(&self, g: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        match self {
            _ if fused => {
                let cols = self.dims()?.1;
                let (storage, layout) = g.storage_and_layout();
                let g_mat = Mat::new(cpu_storage("frozen-matmul", &storage)?, layout)?;
                let dx = self.with_cpu_mat("frozen-matmul", |w| matmul(&g_mat, &w))??;
                Tensor::from_vec(dx, (g.dim(0)?, cols), g.device())
            }
            Weight::Dense(w) => g.matmul(w),
            Weight::Nf4(m) => m.matmul(g),
        }
    }

    /// The weight `[out, in]` in f32 on the CPU as a [`Mat`], lent to `f`: a dense weight's own
    /// values (no copy), an NF4 one's decoded whole by the CPU kernel. `op` names the caller in
    /// the error for any other weight.
    pub(crate) fn with_cpu_mat<R>(&self, op: &str, f: impl FnOnce(Mat) -> R) -> candle_core::Result<R> {
        match self {
            Weight::Dense(w) => {
                let (storage, layout) = w.storage_and_layout();
                Ok(f(Mat::new(cpu_storage(op, &storage)?, layout)?))
            }
            Weight::Nf4(m) => {
                let (rows, cols) = m.dims();
                let values = CpuStorage::F32(m.dequantize_values()?);
                Ok(f(Mat::rows(&values, rows, cols)?))
            }
        }
    }
}

/// The custom op behind [`Weight::matmul_t`] while a graph is recorded.
struct FrozenMatMul {
    weight: Weight,
    /// Whether the CPU's f32 kernels decode (decided when the op is recorded).
    fused: bool,
}

impl FrozenMatMul {
    /// The forward pass on any backend `S`: the input copied into a tensor outside the graph, the
    /// product computed with tensor ops there, and its storage handed back ([`OpStorage`]).
    fn fwd<S: OpStorage>(&self, x: &S, layout: &Layout) -> candle_core::Result<(S, Shape)> {
        let cols = layout.shape().dims2()?.1;
        let in_dim = self.weight.dims()?.1;
        if cols != in_dim {
            candle_core::bail!("frozen-matmul: input has {cols} features, the weight expects {in_dim}");
        }
        S::owned("frozen-matmul", &self.weight.product(&x.detached(layout)?, self.fused)?)
    }
}

impl CustomOp1 for FrozenMatMul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if self.fused {
            // The product read straight from the input's and the weight's values: no copies.
            let (n, cols) = layout.shape().dims2()?;
            let (rows, in_dim) = self.weight.dims()?;
            if cols != in_dim {
                candle_core::bail!("frozen-matmul: input has {cols} features, the weight expects {in_dim}");
            }
            let y = self.weight.cpu_product(&Mat::new(storage, layout)?)?;
            return Ok((CpuStorage::F32(y), Shape::from((n, rows))));
        }
        self.fwd(storage, layout)
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(storage, layout)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W (an NF4 weight is decoded again rather than kept).
        Ok(Some(self.weight.input_grad(grad_y, self.fused)?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::kernels::with_stock_ops;
    use candle_core::Var;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A `shape` matrix of seeded uniform values in [−0.5, 0.5) on the CPU (also the LoRA
    /// product's tests').
    pub(crate) fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random::<f32>() - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// The frozen product and the plain one, on `x` in `dtype`: values, the input's gradient, and
    /// whether the dense weight got a gradient.
    fn check(weight: &Weight, dense: &Tensor, dtype: DType, tol: f32) {
        check_rows(weight, dense, 5, dtype, tol)
    }

    /// [`check`] on an input of `rows` rows.
    fn check_rows(weight: &Weight, dense: &Tensor, rows: usize, dtype: DType, tol: f32) {
        let x = Var::from_tensor(&random((rows, dense.dim(1).unwrap()), 2).to_dtype(dtype).unwrap()).unwrap();
        let dense = dense.to_dtype(dtype).unwrap();
        let y = weight.matmul_t(x.as_tensor()).unwrap();
        let y_ref = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
        assert!(max_diff(&y, &y_ref) <= tol, "{dtype:?}: y differs by {}", max_diff(&y, &y_ref));
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let grads_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (g, g_ref) = (grads.get(x.as_tensor()).unwrap(), grads_ref.get(x.as_tensor()).unwrap());
        assert!(max_diff(g, g_ref) <= 10.0 * tol, "{dtype:?}: dL/dx differs by {}", max_diff(g, g_ref));
        // candle's matmul also computes the weight's gradient (kept under its transpose's id, the
        // one gradient besides x's left after backward); the frozen op computes x's alone.
        assert_eq!(grads_ref.get_ids().count(), 2, "the reference product computes a weight gradient");
        assert_eq!(grads.get_ids().count(), 1, "{dtype:?}: a gradient other than the input's was computed");
        if let Weight::Dense(w) = weight {
            assert!(grads.get(w).is_none(), "{dtype:?}: a gradient was computed for the frozen weight");
        }
    }

    #[test]
    fn the_frozen_product_gives_the_dense_input_gradient_and_no_weight_gradient() {
        let w = random((24, 70), 1);
        let nf4 = Arc::new(Nf4Matrix::quantize(&w).unwrap());
        let w_nf4 = nf4.dequantize(&Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            // A dense weight is in the model's dtype; an NF4 one decodes into the input's.
            let dense = Weight::Dense(w.to_dtype(dtype).unwrap());
            for (weight, values) in [(dense, &w), (Weight::Nf4(nf4.clone()), &w_nf4)] {
                match dtype {
                    DType::F32 => {
                        check(&weight, values, dtype, 1e-5);
                        with_stock_ops(|| check(&weight, values, dtype, 1e-5));
                    }
                    _ => check(&weight, values, dtype, 2e-2),
                }
            }
        }
        // Tiled: 24 rows decoded 5 at a time on the stock path.
        let tiled = Weight::Nf4(Arc::new((*nf4).clone().with_tile_values(5 * 70)));
        with_stock_ops(|| check(&tiled, &w_nf4, DType::F32, 1e-5));
        check(&tiled, &w_nf4, DType::BF16, 2e-2);
    }

    #[test]
    fn a_long_input_weight_is_stored_transposed_with_the_same_values_and_products() {
        // 780 inputs: stored as Wᵀ row-major, the backward product reading W through a view. A
        // short-input weight stays as is.
        let w = random((800, 780), 5);
        let weight = Weight::dense(w.clone()).unwrap();
        let Weight::Dense(stored) = &weight else { panic!("a dense weight") };
        assert!(!stored.is_contiguous() && stored.t().unwrap().is_contiguous(), "stored as Wᵀ row-major");
        assert_eq!(max_diff(stored, &w), 0.0);
        check_rows(&weight, &w, 70, DType::F32, 1e-4);
        let plain = weight.matmul_t(&random((70, 780), 6)).unwrap();
        let reference = random((70, 780), 6).matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&plain, &reference) <= 1e-4, "{}", max_diff(&plain, &reference));
        let short = random((30, 64), 7);
        let Weight::Dense(kept) = Weight::dense(short.clone()).unwrap() else { panic!("a dense weight") };
        assert!(kept.is_contiguous());
        let Weight::Dense(bf16) = Weight::dense(w.to_dtype(DType::BF16).unwrap()).unwrap() else { panic!() };
        assert!(bf16.is_contiguous(), "only f32 on the CPU is laid out for gemm");
    }

    #[test]
    fn inference_products_equal_the_frozen_op_forward() {
        let w = random((33, 64), 3);
        let weight = Weight::Nf4(Arc::new(Nf4Matrix::quantize(&w).unwrap()));
        let x = random((4, 64), 4);
        let plain = weight.matmul_t(&x).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let recorded = weight.matmul_t(var.as_tensor()).unwrap();
        assert_eq!(max_diff(&plain, &recorded), 0.0);
        let stock = with_stock_ops(|| weight.matmul_t(&x).unwrap());
        assert!(max_diff(&plain, &stock) < 1e-5);
    }
}

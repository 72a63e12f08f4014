//! Frozen projection weights and their products.
//!
//! A weight is dense (as loaded) or NF4 (the healing base, [`super::nf4`]). Nothing ever trains
//! it, so while healing the product `x Wᵀ` is a custom op whose backward pass returns the input's
//! gradient `g W` only. candle's own matmul backward also computes `xᵀ g` for the weight — a
//! second product as large as the forward one, thrown away — and would keep the dense copy of an
//! NF4 weight alive until the backward pass.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::nf4::Nf4Matrix;

/// A frozen projection weight `[out, in]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// As loaded.
    Dense(Tensor),
    /// 4-bit, dequantized for each product.
    Nf4(Arc<Nf4Matrix>),
}

impl Weight {
    /// `[out, in]`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Weight::Dense(w) => w.dims2(),
            Weight::Nf4(m) => Ok(m.dims()),
        }
    }

    /// The dense values (dequantized for NF4) in `dtype` on `device`.
    pub fn to_dense(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Nf4(m) => m.dequantize(device)?.to_dtype(dtype),
        }
    }

    /// `x Wᵀ` for `x: [n, in]` → `[n, out]`; gradients flow to `x` only.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let frozen_op = super::kernels::fused_cpu(x);
        match self {
            // Inference: the plain product (no graph is recorded anyway).
            Weight::Dense(w) if !x.track_op() || !frozen_op => x.matmul(&w.t()?),
            Weight::Nf4(m) if !frozen_op => x.matmul(&m.dequantize(x.device())?.to_dtype(x.dtype())?.t()?),
            _ => x.contiguous()?.apply_op1(FrozenMatMul(self.clone())),
        }
    }
}

/// The custom op behind [`Weight::matmul_t`] on CPU.
struct FrozenMatMul(Weight);

impl CustomOp1 for FrozenMatMul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("frozen-matmul: input must be f32") };
        let (n, cols) = layout.shape().dims2()?;
        let (rows, in_dim) = self.0.dims()?;
        if cols != in_dim {
            candle_core::bail!("frozen-matmul: input has {cols} features, the weight expects {in_dim}");
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: input must be contiguous")
        };
        let x = Tensor::from_slice(&data[start..end], (n, cols), &Device::Cpu)?;
        let w = self.0.to_dense(DType::F32, &Device::Cpu)?;
        let y = x.matmul(&w.t()?)?;
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), Shape::from((n, rows))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W (an NF4 weight is dequantized again rather than kept).
        let w = self.0.to_dense(grad_y.dtype(), grad_y.device())?;
        Ok(Some(grad_y.matmul(&w)?))
    }
}

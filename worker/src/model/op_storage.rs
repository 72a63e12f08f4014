//! A custom op's forward pass written once for every device, with tensor ops.
//!
//! candle hands a custom op's forward pass raw storage (`CpuStorage`, `CudaStorage`) and expects
//! storage back. The ops whose point is their backward pass (the frozen product, the chunked
//! training attention) compute their forward pass with ordinary tensor ops instead: the inputs are
//! copied into tensors outside the graph ([`OpStorage::detached`]), and the result's values are
//! handed back as fresh storage ([`OpStorage::owned`]). So the tensor ops CUDA runs are the ones
//! the CPU's tests run (in f32 and bf16, and with candle's own kernels in place of the CPU's
//! fused ones under [`super::kernels::with_stock_ops`]). The copies are of the op's inputs and
//! output only, never of the large intermediates the op exists to avoid keeping.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, Layout, Shape, Storage, Tensor};

/// A backend's storage as a custom op receives it; implemented for the CPU's and CUDA's (without
/// the `cuda` feature candle's `CudaStorage` is a stand-in with the same traits, so CPU builds
/// type-check the CUDA code path, which is never called there).
pub trait OpStorage: BackendStorage + Sized {
    /// Into candle's device-generic [`Storage`].
    fn wrap(self) -> Storage;

    /// Out of a [`Storage`], `None` when it lives on another backend.
    fn unwrap(storage: &Storage) -> Option<&Self>;

    /// Fresh zeros of `shape` in this storage's dtype, on its device.
    fn zeros(&self, shape: &Shape) -> candle_core::Result<Self>;

    /// The values at `layout` in `self`, copied into a contiguous tensor that no graph tracks.
    fn detached(&self, layout: &Layout) -> candle_core::Result<Tensor> {
        let mut copy = self.zeros(layout.shape())?;
        self.copy_strided_src(&mut copy, 0, layout)?;
        Ok(Tensor::from_storage(copy.wrap(), layout.shape().clone(), BackpropOp::none(), false))
    }

    /// `t`'s values as fresh contiguous storage of this backend, with their shape: a custom op's
    /// output. `op` names the caller in the error when `t` lives on another backend.
    fn owned(op: &str, t: &Tensor) -> candle_core::Result<(Self, Shape)> {
        let (storage, layout) = t.storage_and_layout();
        let Some(values) = Self::unwrap(&storage) else {
            candle_core::bail!("{op}: the result is on {:?}, not on the input's device", t.device().location())
        };
        let mut out = values.zeros(layout.shape())?;
        values.copy_strided_src(&mut out, 0, layout)?;
        Ok((out, layout.shape().clone()))
    }
}

impl OpStorage for CpuStorage {
    fn wrap(self) -> Storage {
        Storage::Cpu(self)
    }

    fn unwrap(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(s) => Some(s),
            _ => None,
        }
    }

    fn zeros(&self, shape: &Shape) -> candle_core::Result<Self> {
        self.device().zeros_impl(shape, self.dtype())
    }
}

impl OpStorage for CudaStorage {
    fn wrap(self) -> Storage {
        Storage::Cuda(self)
    }

    fn unwrap(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }

    fn zeros(&self, shape: &Shape) -> candle_core::Result<Self> {
        self.device().zeros_impl(shape, self.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, IndexOp};

    #[test]
    fn a_strided_input_comes_back_contiguous_and_untracked_and_an_output_round_trips() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        let strided = t.transpose(1, 2).unwrap().i((.., 1..3, ..)).unwrap();
        let (storage, layout) = strided.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { panic!("a CPU tensor") };
        let copy = cpu.detached(layout).unwrap();
        drop(storage);
        assert!(copy.is_contiguous() && !copy.track_op());
        assert_eq!(copy.to_vec3::<f32>().unwrap(), strided.to_vec3::<f32>().unwrap());

        let (values, shape) = CpuStorage::owned("test", &strided).unwrap();
        assert_eq!(shape.dims(), &[2, 2, 3]);
        let back = Tensor::from_storage(values.wrap(), shape, BackpropOp::none(), false);
        assert_eq!(back.to_vec3::<f32>().unwrap(), strided.to_vec3::<f32>().unwrap());
        assert_eq!(back.dtype(), DType::F32);
    }
}

//! The building blocks of a decoder block that are not attention: the projection [`Linear`]
//! (with its optional LoRA adapter), the [`Norm`] (RMSNorm or LayerNorm) and the feed-forward
//! [`Mlp`].
//!
//! They live apart from [`super::decoder`] so that the decoder file holds only how blocks are
//! put together and run; each type here loads itself from HF-named weights and writes itself back.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::config::{Activation, Config, NormKind};
use super::frozen::Weight;
use super::lora::Lora;
use super::lora_product::lora_product;
use super::silu_mul::silu_mul;
use super::weights::WeightMap;
use super::ModelError;

/// A projection `y = x Wᵀ (+ b) (+ (α/r) B A x)`, with `W` stored `[out, in]` as in HF checkpoints
/// and an optional LoRA adapter (healing).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Weight,
    /// `[out]`, when the checkpoint has one.
    pub bias: Option<Tensor>,
    /// The trainable low-rank update, when one is attached.
    pub lora: Option<Lora>,
}

impl Linear {
    /// A projection; a dense block weight is laid out for the CPU's products
    /// ([`WeightMap::lays_out`]).
    pub(super) fn load(
        w: &mut WeightMap,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let weight_name = format!("{name}.weight");
        let weight = if w.quantizes(&weight_name) {
            Weight::Nf4(Arc::new(w.take_nf4(&weight_name, [out_dim, in_dim])?))
        } else {
            let dense = w.take(&weight_name, &[out_dim, in_dim])?;
            if w.lays_out(&weight_name) {
                Weight::dense(dense)?
            } else {
                Weight::Dense(dense)
            }
        };
        let bias = if bias { Some(w.take(&format!("{name}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { weight, bias, lora: None })
    }

    pub(super) fn dense(weight: Tensor) -> Self {
        Linear { weight: Weight::Dense(weight), bias: None, lora: None }
    }

    /// The base weight (dequantized when NF4; adapters are not part of it) and bias.
    pub(super) fn save(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
        out: &mut Vec<(String, Tensor)>,
    ) -> candle_core::Result<()> {
        out.push((format!("{name}.weight"), self.weight.to_dense(dtype, device)?));
        if let Some(b) = &self.bias {
            out.push((format!("{name}.bias"), b.clone()));
        }
        Ok(())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Flatten leading dims so that one GEMM does the whole batch; `Wᵀ` is a strided view.
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let x = x.reshape((rows, in_dim))?;
        // While healing on the CPU in f32: the product and its adapter as one op.
        let training = self.lora.as_ref().and_then(|lora| Some((lora, lora.dropout_seed?)));
        let y = match training.and_then(|(lora, seed)| lora_product(&self.weight, lora, seed, &x)) {
            Some(y) => match &self.bias {
                Some(b) => y?.broadcast_add(b)?,
                None => y?,
            },
            None => {
                let y = self.weight.matmul_t(&x)?;
                let y = match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                match &self.lora {
                    Some(lora) => (y + lora.forward(&x)?)?,
                    None => y,
                }
            }
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("a tensor fed to Linear has at least one dim") = y.dim(1)?;
        y.reshape(out_dims)
    }
}

/// RMSNorm or LayerNorm, over the last dimension.
#[derive(Debug, Clone)]
pub enum Norm {
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms {
        /// Scale.
        weight: Tensor,
        /// Epsilon.
        eps: f32,
    },
    /// `(x − mean) / sqrt(var + eps) · w + b`.
    Layer {
        /// Scale.
        weight: Tensor,
        /// Shift.
        bias: Tensor,
        /// Epsilon.
        eps: f32,
    },
}

impl Norm {
    pub(super) fn load(w: &mut WeightMap, name: &str, cfg: &Config) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let eps = cfg.norm_eps as f32;
        Ok(match cfg.norm {
            NormKind::Rms => Norm::Rms { weight: w.take(&format!("{name}.weight"), &[h])?, eps },
            NormKind::Layer => Norm::Layer {
                weight: w.take(&format!("{name}.weight"), &[h])?,
                bias: w.take(&format!("{name}.bias"), &[h])?,
                eps,
            },
        })
    }

    pub(super) fn save(&self, name: &str, out: &mut Vec<(String, Tensor)>) {
        match self {
            Norm::Rms { weight, .. } => out.push((format!("{name}.weight"), weight.clone())),
            Norm::Layer { weight, bias, .. } => {
                out.push((format!("{name}.weight"), weight.clone()));
                out.push((format!("{name}.bias"), bias.clone()));
            }
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // The fused kernels have no backward pass; while healing, gradients flow through here.
            Norm::Rms { weight, eps } if x.track_op() => super::rms_norm::trained_rms_norm(x, weight, *eps),
            Norm::Layer { weight, bias, eps } if x.track_op() => {
                super::layer_norm::trained_layer_norm(x, weight, bias, *eps)
            }
            Norm::Rms { weight, eps } => candle_nn::ops::rms_norm(&x.contiguous()?, weight, *eps),
            Norm::Layer { weight, bias, eps } => candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, *eps),
        }
    }
}

/// The feed-forward network: gated (`down(act(gate x) · up x)`) or plain (`fc2(act(fc1 x))`).
#[derive(Debug, Clone)]
pub enum Mlp {
    /// Llama, Mistral, Qwen2, Phi-3.
    Gated {
        /// `gate_proj`.
        gate: Linear,
        /// `up_proj`.
        up: Linear,
        /// `down_proj`.
        down: Linear,
        /// Applied to the gate.
        act: Activation,
    },
    /// Phi-2.
    Plain {
        /// `fc1`.
        fc1: Linear,
        /// `fc2`.
        fc2: Linear,
        /// Applied after `fc1`.
        act: Activation,
    },
}

impl Mlp {
    pub(super) fn load(w: &mut WeightMap, prefix: &str, cfg: &Config) -> Result<Self, ModelError> {
        let (h, i, bias, act) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.activation);
        Ok(if cfg.gated_mlp {
            Mlp::Gated {
                gate: Linear::load(w, &format!("{prefix}.gate_proj"), i, h, bias)?,
                up: Linear::load(w, &format!("{prefix}.up_proj"), i, h, bias)?,
                down: Linear::load(w, &format!("{prefix}.down_proj"), h, i, bias)?,
                act,
            }
        } else {
            Mlp::Plain {
                fc1: Linear::load(w, &format!("{prefix}.fc1"), i, h, bias)?,
                fc2: Linear::load(w, &format!("{prefix}.fc2"), h, i, bias)?,
                act,
            }
        })
    }

    /// The projections under their HF names.
    pub(super) fn projections(&self) -> Vec<(&'static str, &Linear)> {
        match self {
            Mlp::Gated { gate, up, down, .. } => vec![("gate_proj", gate), ("up_proj", up), ("down_proj", down)],
            Mlp::Plain { fc1, fc2, .. } => vec![("fc1", fc1), ("fc2", fc2)],
        }
    }

    pub(super) fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        match self {
            Mlp::Gated { gate, up, down, .. } => vec![("gate_proj", gate), ("up_proj", up), ("down_proj", down)],
            Mlp::Plain { fc1, fc2, .. } => vec![("fc1", fc1), ("fc2", fc2)],
        }
    }
}

fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Gated { gate, up, down, act: Activation::Silu } => {
                down.forward(&silu_mul(&gate.forward(x)?, &up.forward(x)?)?)
            }
            Mlp::Gated { gate, up, down, act } => {
                let g = activate(&gate.forward(x)?, *act)?;
                down.forward(&(g * up.forward(x)?)?)
            }
            Mlp::Plain { fc1, fc2, act } => fc2.forward(&activate(&fc1.forward(x)?, *act)?),
        }
    }
}

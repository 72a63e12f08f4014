//! The adapter half of [`Decoder`]: which modules a LoRA adapter can target, attaching fresh or
//! trained adapters, listing them under PEFT's names, switching them between training and
//! evaluation, and merging them into the base weights.
//!
//! Kept apart from [`super::decoder`] because only healing calls these methods: loading, running
//! and pruning a model never do. Fused Phi-3 modules (one adapter split over several
//! projections) are handled by the helpers at the bottom.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::decoder::Decoder;
use super::frozen::Weight;
use super::layers::Linear;
use super::lora::{mix_seed, Lora, LoraSpec};
use super::ModelError;

impl Decoder {
    /// The module names an adapter can target in this family (`gate_proj`, `fc1`, `qkv_proj`, …).
    pub fn adapter_targets(&self) -> Vec<String> {
        self.blocks.first().map_or_else(Vec::new, |b| {
            group_by_module(self.cfg.family, b.projections())
                .into_iter()
                .map(|(n, _)| n.rsplit('.').next().unwrap_or(&n).to_string())
                .collect()
        })
    }

    /// Checks `spec` against this model: a known target list, a rank that fits every target.
    fn check_adapter_spec(&self, spec: &LoraSpec) -> Result<(), ModelError> {
        self.require_resident("attaching adapters")?;
        let valid = self.adapter_targets();
        if spec.targets.is_empty() {
            return Err(ModelError::Adapter(format!("no target modules; valid: {}", valid.join(", "))));
        }
        for t in &spec.targets {
            if !valid.contains(t) {
                return Err(ModelError::Adapter(format!(
                    "unknown target module `{t}` for {}; valid: {}",
                    self.cfg.family.model_type(),
                    valid.join(", ")
                )));
            }
        }
        if spec.rank == 0 {
            return Err(ModelError::Adapter("rank must be at least 1".into()));
        }
        for (name, parts) in group_by_module(self.cfg.family, self.blocks[0].projections()) {
            let short = name.rsplit('.').next().unwrap_or(&name);
            let (out_dim, in_dim) = module_dims(&parts)?;
            if spec.targets.iter().any(|t| t == short) && spec.rank > out_dim.min(in_dim) {
                return Err(ModelError::Adapter(format!(
                    "rank {} is larger than {name} ({out_dim}×{in_dim}) allows; use at most {}",
                    spec.rank,
                    out_dim.min(in_dim)
                )));
            }
        }
        Ok(())
    }

    /// The HF name of each targeted module (blocks renumbered) with mutable handles on its
    /// projections (several for a fused Phi-3 module).
    fn targeted_mut<'a>(&'a mut self, spec: &LoraSpec) -> Vec<(String, Vec<&'a mut Linear>)> {
        let family = self.cfg.family;
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, parts) in group_by_module(family, block.projections_mut()) {
                if spec.targets.iter().any(|t| name.rsplit('.').next() == Some(t.as_str())) {
                    out.push((format!("model.layers.{i}.{name}"), parts));
                }
            }
        }
        out
    }

    /// Attaches a fresh adapter to every targeted module: A Kaiming-uniform from an RNG seeded
    /// with `seed`, B zero, so the model's output is unchanged until it is trained. A fused
    /// module's parts share its A and split its B by rows.
    pub fn attach_adapters(&mut self, spec: &LoraSpec, seed: u64) -> Result<(), ModelError> {
        self.check_adapter_spec(spec)?;
        // Adapters are f32 whatever the base's dtype, as PEFT keeps them.
        let (device, dtype) = (self.device().clone(), DType::F32);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        for (_, parts) in self.targeted_mut(spec) {
            let (out_dim, in_dim) = module_dims(&parts)?;
            let lora = Lora::init(out_dim, in_dim, spec, &mut rng, &device, dtype)?;
            attach_split(parts, &lora)?;
        }
        Ok(())
    }

    /// Attaches trained adapters from tensors under PEFT's names
    /// (`base_model.model.model.layers.{i}.mlp.gate_proj.lora_A.weight`, …), checking that every
    /// targeted module has both halves with the right shapes and that nothing is left over.
    pub fn load_adapters(
        &mut self,
        spec: &LoraSpec,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), ModelError> {
        self.check_adapter_spec(spec)?;
        let (device, dtype) = (self.device().clone(), DType::F32);
        let mut used = 0;
        for (name, parts) in self.targeted_mut(spec) {
            let (out_dim, in_dim) = module_dims(&parts)?;
            let mut take = |half: &str, shape: [usize; 2]| -> Result<Tensor, ModelError> {
                let key = format!("base_model.model.{name}.{half}.weight");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| ModelError::MissingTensor { origin: origin.into(), name: key.clone() })?;
                if t.dims() != shape {
                    return Err(ModelError::ShapeMismatch {
                        origin: origin.into(),
                        name: key,
                        found: t.dims().to_vec(),
                        expected: shape.to_vec(),
                    });
                }
                used += 1;
                Ok(t.to_device(&device)?.to_dtype(dtype)?)
            };
            let a = take("lora_A", [spec.rank, in_dim])?;
            let b = take("lora_B", [out_dim, spec.rank])?;
            attach_split(parts, &Lora::from_tensors(a, b, spec)?)?;
        }
        if used != tensors.len() {
            let expected: std::collections::HashSet<String> =
                self.adapter_tensors()?.into_iter().map(|(n, _)| n).collect();
            let extra = tensors.keys().find(|k| !expected.contains(*k)).cloned().unwrap_or_default();
            return Err(ModelError::Mismatch {
                origin: origin.into(),
                message: format!("tensor `{extra}` matches no targeted projection of this model (was the adapter trained on a model with other layers?)"),
            });
        }
        Ok(())
    }

    /// The adapters' trainable tensors, in block order (A before B), named as PEFT names them;
    /// the parts of a fused Phi-3 module list their shared A once, under the module's name, and
    /// each its own rows of B, under the part's name. [`Decoder::adapter_tensors`] gives what
    /// PEFT reads.
    pub fn adapter_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("base_model.model.model.layers.{i}");
            let mut last_module = String::new();
            for (name, lin) in block.projections() {
                let Some(lora) = &lin.lora else { continue };
                let module = adapter_module(self.cfg.family, &name);
                if module != last_module {
                    out.push((format!("{p}.{module}.lora_A.weight"), lora.a.clone()));
                    last_module = module.to_string();
                }
                out.push((format!("{p}.{name}.lora_B.weight"), lora.b.clone()));
            }
        }
        out
    }

    /// The adapters as PEFT stores them (`adapter_model.safetensors`): per targeted module, A and
    /// B under PEFT's names, a fused Phi-3 module's B put back together from its parts' rows.
    pub fn adapter_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (module, parts) in group_by_module(self.cfg.family, block.projections()) {
                let loras: Vec<&Lora> = parts.iter().filter_map(|lin| lin.lora.as_ref()).collect();
                let Some(first) = loras.first() else { continue };
                let p = format!("base_model.model.model.layers.{i}.{module}");
                let b: Vec<&Tensor> = loras.iter().map(|l| l.b.as_tensor()).collect();
                out.push((format!("{p}.lora_A.weight"), first.a.as_tensor().clone()));
                out.push((format!("{p}.lora_B.weight"), Tensor::cat(&b, 0)?));
            }
        }
        Ok(out)
    }

    /// Puts the adapters in training mode for one pass (`Some(seed)`: they take part in autograd
    /// and every adapter draws its dropout mask from its own stream of `seed`) or in evaluation
    /// mode (`None`: no dropout, no graph; the default).
    pub fn set_adapter_training(&mut self, seed: Option<u64>) {
        // The parts of a fused module (one shared A) draw one mask, as PEFT's fused module does.
        let mut stream = 0;
        let mut last_a = None;
        for block in &mut self.blocks {
            for (_, lin) in block.projections_mut() {
                if let Some(lora) = &mut lin.lora {
                    let a = lora.a.as_tensor().id();
                    if last_a.is_some_and(|last| last != a) {
                        stream += 1;
                    }
                    lora.dropout_seed = seed.map(|s| mix_seed(s, stream));
                    last_a = Some(a);
                }
            }
        }
    }

    /// Folds every adapter into its base weight (dequantized when NF4): `W' = W + (α/r) B A`.
    pub fn merge_adapters(&mut self) -> candle_core::Result<()> {
        let (device, dtype) = (self.device().clone(), self.dtype());
        for block in &mut self.blocks {
            for (_, lin) in block.projections_mut() {
                if let Some(lora) = lin.lora.take() {
                    let w = lin.weight.to_dense(dtype, &device)?;
                    lin.weight = Weight::dense((w + lora.delta()?.to_dtype(dtype)?)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The module an adapter on projection `name` (`self_attn.q_proj`, …) belongs to: the projection
/// itself, or the fused module its checkpoint stores it in ([`super::Family::fused_modules`]),
/// which is what PEFT targets there.
fn adapter_module(family: super::Family, name: &str) -> &str {
    family.fused_modules().iter().find(|(_, parts)| parts.contains(&name)).map_or(name, |(module, _)| module)
}

/// A block's projections grouped by adapter module, in checkpoint order: one projection per
/// module, or a fused module's parts in the order its rows are stored (q, k, v; gate, up).
fn group_by_module<L>(family: super::Family, projections: Vec<(String, L)>) -> Vec<(String, Vec<L>)> {
    let mut out: Vec<(String, Vec<L>)> = Vec::new();
    for (name, lin) in projections {
        let module = adapter_module(family, &name);
        match out.last_mut() {
            Some((last, parts)) if last == module => parts.push(lin),
            _ => out.push((module.to_string(), vec![lin])),
        }
    }
    out
}

/// `[out, in]` of a module: its parts' output rows together, their common input.
fn module_dims<L: std::borrow::Borrow<Linear>>(parts: &[L]) -> candle_core::Result<(usize, usize)> {
    let mut out = 0;
    let mut input = None;
    for part in parts {
        let (o, i) = part.borrow().weight.dims()?;
        if input.is_some_and(|input| input != i) {
            candle_core::bail!("the parts of a fused module take inputs of different widths");
        }
        out += o;
        input = Some(i);
    }
    Ok((out, input.unwrap_or(0)))
}

/// Gives each part of a module its rows of `lora`'s B, all sharing its A (one part: `lora` as is).
fn attach_split(parts: Vec<&mut Linear>, lora: &Lora) -> candle_core::Result<()> {
    let mut row = 0;
    let single = parts.len() == 1;
    for part in parts {
        let (rows, _) = part.weight.dims()?;
        part.lora = Some(if single { lora.clone() } else { lora.rows(row, rows)? });
        row += rows;
    }
    Ok(())
}

//! Training checkpoints: adapter weights, AdamW moments, the step reached and a fingerprint of the
//! run's settings, in one safetensors file written atomically (a temporary file, fsync, rename), so
//! a crash mid-write leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::HealError;
use crate::model::candle_message;

/// Everything needed to continue a run exactly where it stopped.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Optimizer updates completed.
    pub step: usize,
    /// Index of the next training sequence (the data order is fixed, so this is `step · batch`;
    /// stored so that a checkpoint says where in the data it stands).
    pub data_position: usize,
    /// The settings that must not change across a resume (see [`super::HealConfig::fingerprint`]).
    pub fingerprint: Value,
    /// Adapter tensors under PEFT names, in the optimizer's order.
    pub params: Vec<(String, Tensor)>,
    /// AdamW first moments, same order.
    pub m: Vec<Tensor>,
    /// AdamW second moments, same order.
    pub v: Vec<Tensor>,
}

impl Checkpoint {
    /// Writes `path` atomically: `path.tmp`, fsync, rename over `path`.
    pub fn save(&self, path: &Path) -> Result<(), HealError> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(self.params.len() * 3);
        for (i, (name, p)) in self.params.iter().enumerate() {
            tensors.push((format!("param.{name}"), p.clone()));
            tensors.push((format!("adam_m.{name}"), self.m[i].clone()));
            tensors.push((format!("adam_v.{name}"), self.v[i].clone()));
        }
        let order: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        let metadata: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("prunesweep.step".to_string(), self.step.to_string()),
            ("prunesweep.data_position".to_string(), self.data_position.to_string()),
            ("prunesweep.fingerprint".to_string(), self.fingerprint.to_string()),
            ("prunesweep.order".to_string(), serde_json::to_string(&order).expect("strings serialize")),
        ]
        .into();
        let tmp = path.with_extension("safetensors.tmp");
        let io = |p: &Path, e: std::io::Error| HealError::Io { path: p.to_path_buf(), source: e };
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
            .map_err(|e| HealError::Checkpoint { path: tmp.clone(), message: format!("writing: {e}") })?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable.
            std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io(dir, e))?;
        }
        Ok(())
    }

    /// Reads a checkpoint written by [`Checkpoint::save`]; any damage is a
    /// [`HealError::Checkpoint`] naming the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, HealError> {
        let bad = |message: String| HealError::Checkpoint { path: path.to_path_buf(), message };
        let bytes = std::fs::read(path).map_err(|e| HealError::Io { path: path.to_path_buf(), source: e })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a readable safetensors file ({e}); truncated?")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| {
            meta.get(k).ok_or_else(|| bad(format!("metadata `{k}` is missing: not a prunesweep heal checkpoint")))
        };
        let step =
            field("prunesweep.step")?.parse().map_err(|_| bad("metadata `prunesweep.step` is not a number".into()))?;
        let data_position = field("prunesweep.data_position")?
            .parse()
            .map_err(|_| bad("metadata `prunesweep.data_position` is not a number".into()))?;
        let fingerprint = serde_json::from_str(field("prunesweep.fingerprint")?)
            .map_err(|e| bad(format!("metadata `prunesweep.fingerprint` is not JSON: {e}")))?;
        let order: Vec<String> = serde_json::from_str(field("prunesweep.order")?)
            .map_err(|e| bad(format!("metadata `prunesweep.order` is not a JSON list: {e}")))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("tensors unreadable: {}; truncated?", candle_message(&e))))?;
        let mut take = |k: String| tensors.remove(&k).ok_or_else(|| bad(format!("tensor `{k}` is missing")));
        let (mut params, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for name in order {
            params.push((name.clone(), take(format!("param.{name}"))?));
            m.push(take(format!("adam_m.{name}"))?);
            v.push(take(format!("adam_v.{name}"))?);
        }
        Ok(Checkpoint { step, data_position, fingerprint, params, m, v })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        let t = |x: f32| Tensor::new(&[x, x + 1.0], &Device::Cpu).unwrap();
        let ck = Checkpoint {
            step: 7,
            data_position: 28,
            fingerprint: serde_json::json!({"lr": 3e-4}),
            params: vec![("a".into(), t(1.0)), ("b".into(), t(2.0))],
            m: vec![t(3.0), t(4.0)],
            v: vec![t(5.0), t(6.0)],
        };
        ck.save(&path).unwrap();
        let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!((back.step, back.data_position), (7, 28));
        assert_eq!(back.fingerprint, ck.fingerprint);
        assert_eq!(back.params[1].0, "b");
        assert_eq!(back.v[1].to_vec1::<f32>().unwrap(), vec![6.0, 7.0]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = Checkpoint::load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("checkpoint.safetensors") && e.contains("truncated"), "{e}");
    }
}

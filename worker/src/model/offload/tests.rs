//! Offloaded blocks against the same model loaded whole: the same numbers, to the bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::model::lora::LoraSpec;
use crate::model::weights::WeightMap;
use crate::model::{Decoder, Model, ModelError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn logits(model: &Model, ids: &Tensor) -> Vec<Vec<Vec<f32>>> {
    model.decoder.forward(ids).unwrap().to_vec3().unwrap()
}

/// Llama, Phi-3 (q/k/v and gate/up fused in the checkpoint, split as each block is read) and
/// Phi-2 (parallel blocks): every block offloaded, then the first held, then a cut.
#[test]
fn an_offloaded_model_computes_what_the_loaded_one_does() {
    for name in ["tiny-llama", "tiny-phi3", "tiny-phi"] {
        let path = fixture(name);
        let mut whole = Model::load(&path, &Device::Cpu).unwrap();
        let mut offloaded = Model::load_offloaded(&path, &Device::Cpu, DType::F32).unwrap();
        let blocks = whole.decoder.num_blocks();
        assert_eq!(offloaded.decoder.offloaded_blocks(), blocks, "{name}: nothing held at first");
        let ids = Tensor::new(&[[1u32, 7, 3, 9, 2, 5], [4, 4, 8, 1, 0, 6]], &Device::Cpu).unwrap();
        let want = logits(&whole, &ids);
        assert_eq!(logits(&offloaded, &ids), want, "{name}: every block read per pass");

        let (held, bytes) = offloaded.decoder.make_resident(1).unwrap();
        assert_eq!((held, bytes), (0, 0), "{name}: a block does not fit in one byte");
        let one = {
            let mut probe = Model::load_offloaded(&path, &Device::Cpu, DType::F32).unwrap();
            probe.decoder.make_resident(u64::MAX).unwrap().1 / blocks as u64
        };
        let (held, bytes) = offloaded.decoder.make_resident(one + one / 2).unwrap();
        assert_eq!((held, bytes), (1, one), "{name}: the first block held, the others read per pass");
        assert_eq!(offloaded.decoder.offloaded_blocks(), blocks - 1);
        assert_eq!(logits(&offloaded, &ids), want, "{name}: one block held");

        whole.decoder.remove_layers(&[1]).unwrap();
        offloaded.decoder.remove_layers(&[1]).unwrap();
        assert_eq!(logits(&offloaded, &ids), logits(&whole, &ids), "{name}: after a cut");
        let (held, _) = offloaded.decoder.make_resident(u64::MAX).unwrap();
        assert_eq!((held, offloaded.decoder.offloaded_blocks()), (blocks - 2, 0), "{name}: the rest held");
        assert_eq!(logits(&offloaded, &ids), logits(&whole, &ids), "{name}: all held");
    }
}

/// A block's bytes are its tensors' in the model's dtype: the four f32 bytes of each parameter.
#[test]
fn a_held_block_takes_its_parameters_bytes() {
    let path = fixture("tiny-llama");
    let whole = Model::load(&path, &Device::Cpu).unwrap();
    let params: usize = whole
        .decoder
        .named_tensors()
        .unwrap()
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(_, t)| t.elem_count())
        .sum();
    let mut offloaded = Model::load_offloaded(&path, &Device::Cpu, DType::F32).unwrap();
    let (held, bytes) = offloaded.decoder.make_resident(u64::MAX).unwrap();
    assert_eq!((held, bytes), (whole.decoder.num_blocks(), 4 * params as u64));
}

/// Healing, quantizing and writing need every block held: each refuses, naming the way out, and
/// works once the blocks are held.
#[test]
fn what_needs_the_weights_refuses_an_offloaded_model() {
    let mut model = Model::load_offloaded(&fixture("tiny-llama"), &Device::Cpu, DType::F32).unwrap();
    let spec = LoraSpec { rank: 2, alpha: 4.0, dropout: 0.0, targets: vec!["gate_proj".into()] };
    let e = model.decoder.attach_adapters(&spec, 1).unwrap_err();
    assert!(matches!(e, ModelError::Offloaded(_)), "{e}");
    assert!(e.to_string().contains("quantize_base: true"), "{e}");
    let e = model.decoder.named_tensors().unwrap_err().to_string();
    assert!(e.contains("writing the model needs every block held"), "{e}");
    let e = model.decoder.quantize_nf4().unwrap_err().to_string();
    assert!(e.contains("quantizing the model needs every block held"), "{e}");
    model.decoder.make_resident(u64::MAX).unwrap();
    model.decoder.attach_adapters(&spec, 1).unwrap();
}

/// Only safetensors files can be read again block by block: tensors in memory (and a GGUF file,
/// refused by `Model::load_offloaded` with the way out) cannot.
#[test]
fn offloading_needs_safetensors_files() {
    let whole = Model::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = whole.decoder.named_tensors().unwrap().into_iter().collect();
    let w = WeightMap::new(tensors, "memory", DType::F32, &Device::Cpu);
    let e = Decoder::load_offloaded(whole.decoder.cfg.clone(), w).unwrap_err();
    assert!(e.to_string().contains("only from an HF checkpoint's safetensors files"), "{e}");
}

/// Several passes run block by block together (each offloaded block read once for all) give each
/// pass's `run_packed` result, with and without a shared prefix.
#[test]
fn passes_run_together_match_passes_run_one_by_one() {
    use crate::model::packing::Packing;
    let path = fixture("tiny-llama");
    let whole = Model::load(&path, &Device::Cpu).unwrap();
    let mut offloaded = Model::load_offloaded(&path, &Device::Cpu, DType::F32).unwrap();
    offloaded.decoder.make_resident(1 << 20).unwrap();
    let passes: Vec<(Tensor, Packing)> = [vec![3u32, 1, 4, 1, 5], vec![9, 2, 6, 5, 3, 5, 8, 9]]
        .into_iter()
        .map(|ids| {
            let packing = Packing::sequences(&[2, ids.len() - 2]);
            (Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), packing)
        })
        .collect();
    let (prefix, _) = whole.decoder.prefill(&Tensor::new(&[[7u32, 7, 2]], &Device::Cpu).unwrap()).unwrap();
    for prefix in [None, Some(&prefix)] {
        let inputs: Vec<(&Tensor, &Packing)> = passes.iter().map(|(ids, packing)| (ids, packing)).collect();
        let got = offloaded.decoder.run_packed_group(&inputs, prefix).unwrap();
        for ((ids, packing), got) in passes.iter().zip(got) {
            let want = whole.decoder.run_packed(ids, packing, prefix).unwrap();
            assert_eq!(got.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap());
        }
    }
}

//! Blocks spread over several devices: the split, and the same numbers as one device's to the bit
//! (on a CPU every "device" is the CPU, so this runs the split and the per-device contexts, not
//! the copies between GPUs).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::layer_ranges;
use crate::model::lora::LoraSpec;
use crate::model::packing::Packing;
use crate::model::{Model, ModelError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn equal_rooms_split_equal_blocks_evenly() {
    assert_eq!(layer_ranges(&[10; 8], &[100, 100]).unwrap(), vec![0..4, 4..8]);
    assert_eq!(layer_ranges(&[10; 9], &[100, 100, 100]).unwrap(), vec![0..3, 3..6, 6..9]);
    assert_eq!(layer_ranges(&[10; 7], &[100]).unwrap(), vec![0..7]);
    // An odd count: the middle block, half of it on each side of the even share, goes first.
    assert_eq!(layer_ranges(&[10; 5], &[100, 100]).unwrap(), vec![0..3, 3..5]);
}

#[test]
fn shares_follow_each_devices_room() {
    // Three times the room: three times the blocks.
    assert_eq!(layer_ranges(&[10; 8], &[300, 100]).unwrap(), vec![0..6, 6..8]);
    // Uneven blocks are split by bytes, not by count.
    assert_eq!(layer_ranges(&[40, 10, 10, 10, 10], &[50, 50]).unwrap(), vec![0..1, 1..5]);
}

#[test]
fn a_device_never_takes_more_than_its_room() {
    // Full to the byte.
    assert_eq!(layer_ranges(&[10; 4], &[20, 20]).unwrap(), vec![0..2, 2..4]);
    // Most of a second block falls within the first device's share (17.8 of 30 bytes), but it
    // would not fit its 19 bytes: one block each, and the third fits nowhere.
    let e = layer_ranges(&[10; 3], &[19, 13]).unwrap_err();
    assert!(e.contains("blocks 2 to 2 do not fit"), "{e}");
    // Fewer blocks than devices: every block placed, a device left without one.
    let ranges = layer_ranges(&[10, 10], &[100, 100, 100]).unwrap();
    assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 2, "{ranges:?}");
    assert_eq!(ranges.iter().filter(|r| r.is_empty()).count(), 1, "{ranges:?}");
    assert!(ranges.windows(2).all(|w| w[0].end == w[1].start), "{ranges:?}");
}

#[test]
fn blocks_that_do_not_fit_are_refused_with_what_is_missing() {
    let e = layer_ranges(&[1 << 30; 4], &[1 << 30, 1 << 30]).unwrap_err();
    assert!(e.contains("need 4.00 GiB") && e.contains("room for 2.00 GiB"), "{e}");
    // Enough bytes in all, but no block can be split across devices.
    let e = layer_ranges(&[60, 60], &[70, 70 - 20]).unwrap_err();
    assert!(e.contains("blocks 1 to 1 do not fit"), "{e}");
    assert!(layer_ranges(&[10], &[]).is_err());
}

fn logits(model: &Model, ids: &Tensor) -> Vec<Vec<Vec<f32>>> {
    model.decoder.forward(ids).unwrap().to_vec3().unwrap()
}

/// Llama, Phi-3 (fused checkpoint tensors) and Phi-2 (parallel blocks), cut and spread over three
/// devices: the logits of a plain pass, and a packed pass after a shared prefix, are the
/// one-device model's to the bit.
#[test]
fn a_spread_model_computes_what_the_loaded_one_does() {
    let cpu = Device::Cpu;
    for name in ["tiny-llama", "tiny-phi3", "tiny-phi"] {
        let path = fixture(name);
        let mut whole = Model::load(&path, &cpu).unwrap();
        let mut spread = Model::load_offloaded(&path, &cpu, DType::F32).unwrap();
        whole.decoder.remove_layers(&[1]).unwrap();
        spread.decoder.remove_layers(&[1]).unwrap();
        let kept = spread.decoder.num_blocks();
        let ranges = spread.decoder.spread(&[cpu.clone(), cpu.clone(), cpu.clone()], &[u64::MAX / 4; 3]).unwrap();
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), kept, "{name}: every block placed");
        assert!(ranges.iter().filter(|r| !r.is_empty()).count() >= 2, "{name}: {ranges:?}");
        assert_eq!(spread.decoder.offloaded_blocks(), 0, "{name}: every block held");
        assert!(spread.decoder.is_spread());

        let ids = Tensor::new(&[[1u32, 7, 3, 9, 2, 5], [4, 4, 8, 1, 0, 6]], &cpu).unwrap();
        assert_eq!(logits(&spread, &ids), logits(&whole, &ids), "{name}: a plain pass");

        let prompt = Tensor::new(&[[7u32, 7, 2]], &cpu).unwrap();
        let (prefix, _) = whole.decoder.prefill(&prompt).unwrap();
        let (spread_prefix, _) = spread.decoder.prefill(&prompt).unwrap();
        let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9]], &cpu).unwrap();
        let packing = Packing::sequences(&[2, 4]);
        let want = whole.decoder.run_packed(&ids, &packing, Some(&prefix)).unwrap();
        let got = spread.decoder.run_packed(&ids, &packing, Some(&spread_prefix)).unwrap();
        assert_eq!(got.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap(), "{name}: after a prefix");
    }
}

/// Spreading needs blocks still in the checkpoint and one room figure per device; a spread model
/// refuses healing, quantizing and writing, saying to give one device.
#[test]
fn what_needs_one_device_refuses_a_spread_model() {
    let (cpu, path) = (Device::Cpu, fixture("tiny-llama"));
    let mut whole = Model::load(&path, &cpu).unwrap();
    let e = whole.decoder.spread(&[cpu.clone(), cpu.clone()], &[u64::MAX / 2; 2]).unwrap_err();
    assert!(matches!(e, ModelError::Spread(_)) && e.to_string().contains("held already"), "{e}");

    let mut model = Model::load_offloaded(&path, &cpu, DType::F32).unwrap();
    let e = model.decoder.spread(&[cpu.clone(), cpu.clone()], &[1]).unwrap_err();
    assert!(e.to_string().contains("2 devices and 1 room figures"), "{e}");
    let e = model.decoder.spread(&[cpu.clone(), cpu.clone()], &[8, 8]).unwrap_err();
    assert!(e.to_string().contains("cannot be spread over 2 devices") && e.to_string().contains("--hold-gib"), "{e}");
    assert_eq!(model.decoder.offloaded_blocks(), model.decoder.num_blocks(), "nothing held after a refusal");

    model.decoder.spread(&[cpu.clone(), cpu.clone()], &[u64::MAX / 2; 2]).unwrap();
    let spec = LoraSpec { rank: 2, alpha: 4.0, dropout: 0.0, targets: vec!["gate_proj".into()] };
    let e = model.decoder.attach_adapters(&spec, 1).unwrap_err();
    assert!(matches!(e, ModelError::Spread(_)) && e.to_string().contains("give one --device"), "{e}");
    for e in [model.decoder.named_tensors().unwrap_err(), model.decoder.quantize_nf4().unwrap_err()] {
        assert!(e.to_string().contains("spread over several"), "{e}");
    }
}

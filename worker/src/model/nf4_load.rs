//! Tests of [`Model::load_nf4`]: the codes are those of loading dense and quantizing, and the load
//! never holds the dense model (peak resident memory, measured in a child process).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::decoder::Weight;
use super::Model;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn parts(m: &Model) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for (b, block) in m.decoder.blocks.iter().enumerate() {
        for (name, lin) in block.projections() {
            let Weight::Nf4(q) = &lin.weight else { panic!("block {b} {name} is not NF4") };
            let bytes = q
                .parts()
                .iter()
                .map(|t| match t.dtype() {
                    DType::U8 => t.to_vec1::<u8>().unwrap(),
                    _ => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                })
                .collect();
            out.push((format!("{b}.{name}"), bytes));
        }
    }
    out
}

#[test]
fn loading_as_nf4_gives_the_codes_of_loading_dense_and_quantizing() {
    for dtype in [DType::F32, DType::BF16] {
        let mut dense = Model::load_as(&fixture("tiny-llama"), &Device::Cpu, dtype).unwrap();
        let (params, bytes) = dense.decoder.quantize_nf4().unwrap();
        let nf4 = Model::load_nf4(&fixture("tiny-llama"), &Device::Cpu, dtype).unwrap();
        let (a, b) = (parts(&dense), parts(&nf4));
        assert_eq!(a.len(), 4 * 7);
        assert_eq!(a, b, "{dtype:?}: the codes differ");
        let resident: usize = nf4
            .decoder
            .blocks
            .iter()
            .flat_map(|b| b.projections())
            .map(|(_, l)| match &l.weight {
                Weight::Nf4(m) => m.bytes(),
                Weight::Dense(_) => 0,
            })
            .sum();
        assert_eq!((resident, params), (bytes, 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)));
        let ids = Tensor::new(&[[1u32, 17, 42, 5, 99]], &Device::Cpu).unwrap();
        let (x, y) = (dense.decoder.forward(&ids).unwrap(), nf4.decoder.forward(&ids).unwrap());
        let diff = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
    }
}

/// The real SmolLM2-135M GGUF (`$PRUNESWEEP_SMOLLM2`, else where `scripts/fetch-model.sh` puts
/// it): read lazily, quantized while loading, q/k rows un-permuted before quantizing.
#[test]
fn smollm2_loads_as_nf4_with_the_codes_of_quantizing_after_loading() {
    let path = std::env::var_os("PRUNESWEEP_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "no SmolLM2 at {}; run scripts/fetch-model.sh", path.display());
    let nf4 = Model::load_nf4(&path, &Device::Cpu, DType::F32).unwrap();
    let mut dense = Model::load(&path, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 504, 3458, 314, 260, 2777]], &Device::Cpu).unwrap();
    let dense_logits = dense.decoder.forward(&ids).unwrap();
    let (params, bytes) = dense.decoder.quantize_nf4().unwrap();
    assert_eq!(parts(&dense), parts(&nf4), "the codes differ");
    let (x, y) = (dense.decoder.forward(&ids).unwrap(), nf4.decoder.forward(&ids).unwrap());
    assert_eq!((x - &y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let moved = (y - dense_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 0.0, "quantization changed nothing");
    // 30 blocks of 7 projections: 106 M parameters at 0.52 bytes each, from the tensors' sizes.
    assert_eq!(params, 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536));
    let bpp = bytes as f64 / params as f64;
    assert!((0.5..=0.52).contains(&bpp), "{bpp} bytes/param");
}

/// A Llama checkpoint of 8 blocks, hidden 768, MLP 2816 (70.8 M projection parameters: 283 MB in
/// f32), stored in bf16, with the tiny fixture's tokenizer.
fn write_checkpoint(dir: &Path) -> usize {
    let (h, i, layers, vocab) = (768, 2816, 8, 320);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = h.into();
    cfg["intermediate_size"] = i.into();
    cfg["num_hidden_layers"] = layers.into();
    cfg["num_attention_heads"] = 12.into();
    cfg["num_key_value_heads"] = 12.into();
    cfg["head_dim"] = 64.into();
    cfg["dtype"] = "bfloat16".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixture("tiny-llama/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let dev = Device::Cpu;
    let randn = |r: usize, c: usize| Tensor::randn(0f32, 0.02, (r, c), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), randn(vocab, h));
    t.insert("lm_head.weight".to_string(), randn(vocab, h));
    t.insert("model.norm.weight".to_string(), Tensor::ones(h, DType::BF16, &dev).unwrap());
    let mut params = 0;
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{norm}.weight"), Tensor::ones(h, DType::BF16, &dev).unwrap());
        }
        for (name, r, c) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h, h),
            ("self_attn.v_proj", h, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(r, c));
            params += r * c;
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    params
}

/// `VmRSS` or `VmHWM` of this process, in bytes.
fn status_bytes(field: &str) -> u64 {
    crate::peak_memory::status_bytes(field).unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Run by [`loading_as_nf4_never_holds_the_dense_model`] in a child process: loads the checkpoint
/// in `PRUNESWEEP_NF4_CHILD` (`nf4:DIR` or `dense:DIR`) on the CPU in f32 and prints how far the
/// peak resident memory rose above the resident memory before loading.
#[test]
#[ignore = "a child process of loading_as_nf4_never_holds_the_dense_model"]
fn load_in_child() {
    let arg = std::env::var("PRUNESWEEP_NF4_CHILD").expect("run by loading_as_nf4_never_holds_the_dense_model");
    let (mode, dir) = arg.split_once(':').unwrap();
    // Where the peak cannot be reset, the process's own only overstates the load's growth.
    let window = crate::peak_memory::PeakWindow::start();
    let before = status_bytes("VmRSS:");
    let model = match mode {
        "nf4" => Model::load_nf4(Path::new(dir), &Device::Cpu, DType::F32),
        _ => Model::load_as(Path::new(dir), &Device::Cpu, DType::F32),
    }
    .unwrap();
    let peak = window.peak_bytes().unwrap_or_else(|| status_bytes("VmHWM:"));
    println!("peak_growth={}", peak.saturating_sub(before));
    drop(model);
}

fn peak_growth(mode: &str, dir: &Path) -> u64 {
    let env = [("PRUNESWEEP_NF4_CHILD", format!("{mode}:{}", dir.display()))];
    let figures = crate::peak_memory::figures_from_child("model::nf4_load::load_in_child", &env);
    *figures.get("peak_growth").unwrap_or_else(|| panic!("no peak_growth from the {mode} child: {figures:?}"))
}

#[test]
fn loading_as_nf4_never_holds_the_dense_model() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("no /proc/self/status: peak resident memory is measured on Linux only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let params = write_checkpoint(dir.path());
    let dense_bytes = 4 * params as u64;
    let dense = peak_growth("dense", dir.path());
    let nf4 = peak_growth("nf4", dir.path());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "peak growth: dense {:.0} MiB, nf4 {:.0} MiB (projections: {:.0} MiB in f32)",
        mib(dense),
        mib(nf4),
        mib(dense_bytes)
    );
    // The measurement sees a dense load: it holds at least the projections in f32.
    assert!(dense >= dense_bytes * 9 / 10, "dense load: peak growth {:.0} MiB", mib(dense));
    // An NF4 load holds the codes (0.52 bytes/param) and one dense projection at a time.
    assert!(nf4 <= dense_bytes * 3 / 10, "nf4 load: peak growth {:.0} MiB of {:.0}", mib(nf4), mib(dense_bytes));
}

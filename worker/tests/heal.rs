//! Healing: adapters that start as a no-op, gradients that match finite differences, resumes that
//! reach the same weights as an uninterrupted run, clear errors. The real heal of SmolLM2 is in
//! `smollm2_heal.rs`.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor, Var};
use common::{c4_sample, fixture, worker_log as worker};
use prunesweep_worker::data::read_documents;
use prunesweep_worker::heal::packing::PackedChunks;
use prunesweep_worker::heal::{
    accumulate_gradients, eos_id, next_token_loss, HealConfig, HealEnd, HealError, Recompute, TargetSet, Trainer,
};
use prunesweep_worker::model::lora::LoraSpec;
use prunesweep_worker::model::Model;
use serde_json::json;

fn tiny() -> Model {
    Model::load(&fixture("tiny-llama"), &Device::Cpu).unwrap()
}

fn ids(model: &Model, text: &str) -> Tensor {
    let ids = model.tokenizer.encode(text).unwrap();
    Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn spec(rank: usize, targets: &[&str]) -> LoraSpec {
    LoraSpec { rank, alpha: 2.0 * rank as f64, dropout: 0.0, targets: targets.iter().map(|t| t.to_string()).collect() }
}

/// A small run on the tiny model: 32-token chunks of C4, 4 sequences per update in micro-batches of 2.
fn tiny_config(steps: usize) -> HealConfig {
    HealConfig {
        steps,
        batch: 4,
        micro_batch: 2,
        seq_len: 32,
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        lr: 1e-2,
        warmup: 2,
        checkpoint_every: 2,
        ..HealConfig::default()
    }
}

fn chunks(model: &Model, cfg: &HealConfig, first_doc: usize) -> PackedChunks {
    let docs = read_documents(&c4_sample(), Some(first_doc + 200)).unwrap();
    PackedChunks::pack(&model.tokenizer, &docs[first_doc..], eos_id(model).unwrap(), cfg.seq_len, cfg.steps * cfg.batch)
        .unwrap()
}

fn adapter_values(model: &Model) -> Vec<(String, Vec<f32>)> {
    model
        .decoder
        .adapter_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn fresh_adapters_leave_the_output_unchanged_on_dense_and_nf4_bases() {
    let mut model = tiny();
    let x = ids(&model, "The quick brown fox jumps over the lazy dog.");
    let base = model.decoder.forward(&x).unwrap();
    model.decoder.attach_adapters(&spec(4, &["gate_proj", "up_proj", "down_proj", "q_proj"]), 1).unwrap();
    // B = 0: the adapters add exact zeros.
    assert_eq!(max_abs_diff(&model.decoder.forward(&x).unwrap(), &base), 0.0);

    let mut q = tiny();
    let (params, bytes) = q.decoder.quantize_nf4().unwrap();
    assert!(params > 0 && (bytes as f64 / params as f64) < 0.53, "{bytes} bytes for {params} params");
    let quantized = q.decoder.forward(&x).unwrap();
    q.decoder.attach_adapters(&spec(4, &["gate_proj", "up_proj", "down_proj"]), 1).unwrap();
    assert_eq!(max_abs_diff(&q.decoder.forward(&x).unwrap(), &quantized), 0.0);
    // The NF4 base computes exactly what its dequantized weights compute: written out as an HF
    // directory (dequantized) and reloaded dense, it gives the same logits (f32 rounding only).
    let tmp = tempfile::tempdir().unwrap();
    q.save_hf(&tmp.path().join("dq"), &[]).unwrap();
    let dense = Model::load(&tmp.path().join("dq"), &Device::Cpu).unwrap().decoder.forward(&x).unwrap();
    assert!(common::rel_err(&quantized, &dense) <= 1e-5, "{}", common::rel_err(&quantized, &dense));
    assert!(max_abs_diff(&quantized, &base) > 0.0, "quantization changed nothing");
}

#[test]
fn adapter_gradients_match_finite_differences() {
    // Dense base, no dropout, B set to small random values so that both A and B get gradients.
    let mut model = tiny();
    model.decoder.attach_adapters(&spec(3, &["gate_proj", "down_proj", "v_proj"]), 5).unwrap();
    for (i, (name, var)) in model.decoder.adapter_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            let n = var.as_tensor().elem_count();
            let values: Vec<f32> = (0..n).map(|k| 0.3 * ((k * 7 + i) as f32 * 0.37).sin()).collect();
            var.set(&Tensor::from_vec(values, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let x = ids(&model, "Healing closes the seam between the layers left on either side of the cut.");
    // Training mode (the adapters join autograd); dropout is 0 here, so the loss is deterministic.
    model.decoder.set_adapter_training(Some(0));
    let loss = |m: &Model| {
        next_token_loss(m, &x).unwrap().to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let vars: Vec<(String, Var)> = model.decoder.adapter_vars();
    let grads = next_token_loss(&model, &x).unwrap().backward().unwrap();
    let eps = 1e-2f32;
    let mut checked = 0;
    // Layer 0: A and B of v_proj, gate_proj, down_proj (the gradient of v_proj's passes through
    // the attention softmax).
    for (name, var) in vars.iter().take(6) {
        let g = grads.get(var.as_tensor()).expect("every adapter tensor gets a gradient");
        let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The two largest-magnitude entries of this tensor: finite differences are reliable there.
        let mut idx: Vec<usize> = (0..gv.len()).collect();
        idx.sort_by(|&a, &b| gv[b].abs().total_cmp(&gv[a].abs()));
        for &k in idx.iter().take(2) {
            let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut plus = orig.clone();
            plus[k] += eps;
            let mut minus = orig.clone();
            minus[k] -= eps;
            let shape = var.as_tensor().shape().clone();
            var.set(&Tensor::from_vec(plus, shape.clone(), &Device::Cpu).unwrap()).unwrap();
            let lp = loss(&model);
            var.set(&Tensor::from_vec(minus, shape.clone(), &Device::Cpu).unwrap()).unwrap();
            let lm = loss(&model);
            var.set(&Tensor::from_vec(orig, shape, &Device::Cpu).unwrap()).unwrap();
            let fd = (lp - lm) / (2.0 * eps as f64);
            let an = gv[k] as f64;
            // Tolerance: 3% relative + 1e-4 absolute (f32 forward, central difference with ε = 1e-2).
            assert!((fd - an).abs() <= 0.03 * an.abs() + 1e-4, "{name}[{k}]: autograd {an}, finite difference {fd}");
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn resumed_run_reaches_the_same_adapter_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(6);
    let identity = json!({"test": "resume"});

    let mut straight = tiny();
    let data = chunks(&straight, &cfg, 0);
    let never = AtomicBool::new(false);
    let mut t =
        Trainer::new(&mut straight, cfg.clone(), data.clone(), &tmp.path().join("a"), identity.clone(), false).unwrap();
    assert_eq!(t.run(&never, &mut |_| {}).unwrap(), HealEnd::Finished);
    drop(t);

    // Second run: "SIGTERM" after 3 updates (not a checkpoint boundary), then a fresh process-like
    // restart with --resume.
    let out = tmp.path().join("b");
    let mut first = tiny();
    let stop = AtomicBool::new(false);
    let mut t = Trainer::new(&mut first, cfg.clone(), data.clone(), &out, identity.clone(), false).unwrap();
    let end = t
        .run(&stop, &mut |s| {
            if s.step == 3 {
                stop.store(true, Ordering::SeqCst)
            }
        })
        .unwrap();
    assert_eq!((end, t.step()), (HealEnd::Preempted, 3));
    drop(t);
    let mut resumed = tiny();
    let mut t = Trainer::new(&mut resumed, cfg.clone(), data.clone(), &out, identity.clone(), true).unwrap();
    assert_eq!(t.step(), 3);
    assert_eq!(t.run(&never, &mut |_| {}).unwrap(), HealEnd::Finished);
    drop(t);

    let (a, b) = (adapter_values(&straight), adapter_values(&resumed));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-6, "{name}: resumed differs by {d}");
    }
    // Training moved the adapters (B started at zero).
    assert!(a.iter().filter(|(n, _)| n.contains("lora_B")).all(|(_, v)| v.iter().any(|x| *x != 0.0)));
    // The log has one row per update, none doubled by the restart.
    let log = std::fs::read_to_string(out.join("train_log.csv")).unwrap();
    let steps: Vec<&str> = log.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6"]);
}

#[test]
fn resume_refuses_other_settings_and_damaged_checkpoints_without_touching_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(2);
    let mut m = tiny();
    let data = chunks(&m, &cfg, 0);
    let mut t = Trainer::new(&mut m, cfg.clone(), data.clone(), tmp.path(), json!({}), false).unwrap();
    t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    drop(t);
    let ck = tmp.path().join("checkpoint.safetensors");
    let good = std::fs::read(&ck).unwrap();

    let other = HealConfig { lr: 5e-3, ..cfg.clone() };
    let err = Trainer::new(&mut tiny(), other, data.clone(), tmp.path(), json!({}), true).err().unwrap().to_string();
    assert!(err.contains("checkpoint.safetensors") && err.contains("lr") && err.contains("other settings"), "{err}");

    std::fs::write(&ck, &good[..good.len() / 2]).unwrap();
    let err = Trainer::new(&mut tiny(), cfg.clone(), data, tmp.path(), json!({}), true).err().unwrap().to_string();
    assert!(err.contains("checkpoint.safetensors") && err.contains("truncated"), "{err}");
    assert_eq!(std::fs::read(&ck).unwrap().len(), good.len() / 2, "the damaged checkpoint is left as it was");
}

#[test]
fn non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the adapters up within a few updates.
    let cfg = HealConfig { lr: 1e30, warmup: 0, checkpoint_every: 1, steps: 8, ..tiny_config(8) };
    let mut m = tiny();
    let data = chunks(&m, &cfg, 0);
    let mut t = Trainer::new(&mut m, cfg, data, tmp.path(), json!({}), false).unwrap();
    let err = t.run(&AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert!(matches!(err, HealError::NonFinite { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("not finite") && msg.contains("--lr") && msg.contains("last good checkpoint"), "{msg}");
    let ck =
        prunesweep_worker::heal::checkpoint::Checkpoint::load(&tmp.path().join("checkpoint.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(ck.params.iter().all(|(_, p)| p
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())));
}

#[test]
fn bad_adapter_settings_are_clear_errors() {
    let mut m = tiny();
    let e = m.decoder.attach_adapters(&spec(0, &["up_proj"]), 0).unwrap_err().to_string();
    assert!(e.contains("rank must be at least 1"), "{e}");
    // tiny-llama: hidden 64, intermediate 128 → at most 64.
    let e = m.decoder.attach_adapters(&spec(65, &["up_proj"]), 0).unwrap_err().to_string();
    assert!(e.contains("rank 65") && e.contains("at most 64"), "{e}");
    let e = m.decoder.attach_adapters(&spec(4, &["w1"]), 0).unwrap_err().to_string();
    assert!(e.contains("`w1`") && e.contains("gate_proj") && e.contains("q_proj"), "{e}");
    let bad_lr = HealConfig { lr: 0.0, ..tiny_config(1) };
    assert!(bad_lr.validate().unwrap_err().to_string().contains("--lr must be a positive number"));
    let bad_batch = HealConfig { batch: 6, micro_batch: 4, ..tiny_config(1) };
    assert!(bad_batch.validate().unwrap_err().to_string().contains("multiple of --micro-batch"));
}

#[test]
fn merging_folds_adapters_into_the_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(2);
    let mut m = tiny();
    let data = chunks(&m, &cfg, 0);
    let mut t = Trainer::new(&mut m, cfg, data, tmp.path(), json!({}), false).unwrap();
    t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    drop(t);
    let x = ids(&m, "Merged weights compute what the base and the adapter compute together.");
    let unmerged = m.decoder.forward(&x).unwrap();
    m.decoder.merge_adapters().unwrap();
    assert!(m.decoder.adapter_vars().is_empty());
    m.save_hf(&tmp.path().join("merged"), &[]).unwrap();
    let merged = Model::load(&tmp.path().join("merged"), &Device::Cpu).unwrap().decoder.forward(&x).unwrap();
    let err = common::rel_err(&merged, &unmerged);
    assert!(err <= 1e-5, "merged vs NF4 base + adapter: {err}");
}

#[test]
fn a_new_run_never_overwrites_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(2);
    let mut m = tiny();
    let data = chunks(&m, &cfg, 0);
    Trainer::new(&mut m, cfg.clone(), data.clone(), tmp.path(), json!({}), false)
        .unwrap()
        .run(&AtomicBool::new(false), &mut |_| {})
        .unwrap();
    let err = Trainer::new(&mut tiny(), cfg, data, tmp.path(), json!({}), false).err().unwrap().to_string();
    assert!(err.contains("--resume") && err.contains("not overwritten"), "{err}");
}

#[test]
fn sigterm_checkpoints_exits_75_and_resume_finishes_the_run() {
    // The real binary, killed the way Slurm and Kubernetes stop a job.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (model, c4) = (fixture("tiny-llama"), c4_sample());
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "heal",
            "--model",
            model.to_str().unwrap(),
            "--data",
            c4.to_str().unwrap(),
            "--steps",
            "400",
            "--batch",
            "2",
            "--micro-batch",
            "2",
            "--seq-len",
            "16",
            "--rank",
            "2",
            "--warmup",
            "5",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "1000",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args(&[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("train_log.csv");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |s| s.lines().count()) < 4 {
        assert!(t0.elapsed().as_secs() < 120, "no training progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let ck = prunesweep_worker::heal::checkpoint::Checkpoint::load(&out.join("checkpoint.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(ck.step >= 3 && ck.step < 400, "checkpoint at step {}", ck.step);
    assert!(!out.join("adapter_model.safetensors").exists(), "no adapter before the run is done");

    let (ok, log_text) = worker(&args(&["--resume"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{log_text}");
    assert!(out.join("adapter_model.safetensors").is_file());
    let rows = std::fs::read_to_string(&log).unwrap();
    let steps: Vec<usize> = rows.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(steps, (1..=400).collect::<Vec<_>>());
}

/// PEFT-shaped adapter tensors with nonzero values for every module of `targets` in every layer.
fn peft_tensors(model: &Model, spec: &LoraSpec, seed: u64) -> std::collections::HashMap<String, Tensor> {
    let c = &model.decoder.cfg;
    let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let rows = |t: &str| match t {
        "qkv_proj" => q + 2 * kv,
        "gate_up_proj" => 2 * i,
        "o_proj" | "down_proj" => h,
        other => panic!("no such Phi-3 module {other}"),
    };
    let cols = |t: &str| {
        if t == "down_proj" {
            i
        } else if t == "o_proj" {
            q
        } else {
            h
        }
    };
    let mut out = std::collections::HashMap::new();
    let mut k = seed as usize;
    let mut values = |n: usize| -> Vec<f32> {
        k += 1;
        (0..n).map(|j| 0.2 * ((j * 13 + k * 101) as f32 * 0.071).sin()).collect()
    };
    for layer in 0..model.decoder.num_blocks() {
        for t in &spec.targets {
            let part = if t.starts_with("qkv") || t == "o_proj" { "self_attn" } else { "mlp" };
            let p = format!("base_model.model.model.layers.{layer}.{part}.{t}");
            let (r, o, n) = (spec.rank, rows(t), cols(t));
            out.insert(format!("{p}.lora_A.weight"), Tensor::from_vec(values(r * n), (r, n), &Device::Cpu).unwrap());
            out.insert(format!("{p}.lora_B.weight"), Tensor::from_vec(values(o * r), (o, r), &Device::Cpu).unwrap());
        }
    }
    out
}

#[test]
fn phi3_adapters_sit_on_its_fused_modules_as_peft_stores_them() {
    let mut model = Model::load(&fixture("tiny-phi3"), &Device::Cpu).unwrap();
    assert_eq!(model.decoder.adapter_targets(), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
    let e = model.decoder.attach_adapters(&spec(2, &["q_proj"]), 0).unwrap_err().to_string();
    assert!(e.contains("`q_proj`") && e.contains("qkv_proj"), "{e}");
    let x = ids(&model, "Phi-3 stores its attention and gate projections fused.");
    let base = model.decoder.forward(&x).unwrap();
    let before: std::collections::HashMap<String, Tensor> =
        model.decoder.named_tensors().unwrap().into_iter().collect();

    let s = spec(2, &["qkv_proj", "gate_up_proj", "down_proj"]);
    let tensors = peft_tensors(&model, &s, 3);
    model.decoder.load_adapters(&s, &tensors, "test").unwrap();
    // What PEFT would read back is what was loaded: B put back together from its parts' rows.
    let saved = model.decoder.adapter_tensors().unwrap();
    assert_eq!(saved.len(), tensors.len());
    for (name, t) in &saved {
        assert_eq!(max_abs_diff(t, &tensors[name]), 0.0, "{name}");
    }
    // Trainable: per layer one A per module and each part's rows of B (qkv: 1 + 3, gate_up: 1 + 2,
    // down: 1 + 1).
    let vars = model.decoder.adapter_vars();
    assert_eq!(vars.len(), 9 * model.decoder.num_blocks());
    assert!(vars[0].0.ends_with("layers.0.self_attn.qkv_proj.lora_A.weight"), "{}", vars[0].0);
    assert!(vars[1].0.ends_with("layers.0.self_attn.q_proj.lora_B.weight"), "{}", vars[1].0);
    let adapted = model.decoder.forward(&x).unwrap();
    assert!(max_abs_diff(&adapted, &base) > 1e-3, "the adapters changed nothing");

    // Merged, each part holds its rows of W + (α/r)·B·A, where B·A is computed on the fused
    // module: the parts' rows are the checkpoint's rows, in its order.
    model.decoder.merge_adapters().unwrap();
    assert!(common::rel_err(&model.decoder.forward(&x).unwrap(), &adapted) <= 1e-5);
    let after: std::collections::HashMap<String, Tensor> = model.decoder.named_tensors().unwrap().into_iter().collect();
    for (module, parts) in
        [("self_attn.qkv_proj", &["q_proj", "k_proj", "v_proj"][..]), ("mlp.gate_up_proj", &["gate_proj", "up_proj"])]
    {
        let group = if module.starts_with("self_attn") { "self_attn" } else { "mlp" };
        let fused = |m: &std::collections::HashMap<String, Tensor>| {
            let p: Vec<&Tensor> = parts.iter().map(|n| &m[&format!("model.layers.1.{group}.{n}.weight")]).collect();
            Tensor::cat(&p, 0).unwrap()
        };
        let a = &tensors[&format!("base_model.model.model.layers.1.{module}.lora_A.weight")];
        let b = &tensors[&format!("base_model.model.model.layers.1.{module}.lora_B.weight")];
        let want = (fused(&before) + (b.matmul(a).unwrap() * s.scale()).unwrap()).unwrap();
        assert!(common::rel_err(&fused(&after), &want) <= 1e-6, "{module}");
    }
}

#[test]
fn phi3_heals_and_its_adapter_folder_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let load = || Model::load(&fixture("tiny-phi3"), &Device::Cpu).unwrap();
    let mut m = load();
    // Dense base, so that the reloaded model (dense) computes exactly what the trained one does.
    let targets = m.decoder.adapter_targets();
    assert_eq!(targets, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
    let cfg = HealConfig { targets: TargetSet::AllLinear, quantize: false, ..tiny_config(2) };
    let data = chunks(&m, &cfg, 0);
    let mut t = Trainer::new(&mut m, cfg, data, &tmp.path().join("run"), json!({}), false).unwrap();
    assert_eq!(t.run(&AtomicBool::new(false), &mut |_| {}).unwrap(), HealEnd::Finished);
    t.save_adapter(&tmp.path().join("adapter"), json!({})).unwrap();
    drop(t);
    // Every part of a fused module was trained (B moved off zero), and they share one A.
    for (name, v) in adapter_values(&m) {
        assert!(v.iter().any(|x| *x != 0.0), "{name} did not move");
    }
    let x = ids(&m, "A healed Phi-3 reloads its adapter from a PEFT folder.");
    let trained = m.decoder.forward(&x).unwrap();
    let mut reloaded = load();
    prunesweep_worker::heal::adapter::attach(&mut reloaded, &tmp.path().join("adapter")).unwrap();
    assert_eq!(max_abs_diff(&reloaded.decoder.forward(&x).unwrap(), &trained), 0.0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["target_modules"], json!(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]));
}

/// `--targets ffn` (the default, and the paper's) adapts each family's feed-forward modules, by
/// the names PEFT gives them: on Phi-3 that is the fused `gate_up_proj` and `down_proj`.
#[test]
fn ffn_targets_adapt_each_familys_feed_forward_modules() {
    let expected: [(&str, &[&str]); 5] = [
        ("tiny-llama", &["gate_proj", "up_proj", "down_proj"]),
        ("tiny-mistral", &["gate_proj", "up_proj", "down_proj"]),
        ("tiny-qwen2", &["gate_proj", "up_proj", "down_proj"]),
        ("tiny-phi3", &["gate_up_proj", "down_proj"]),
        ("tiny-phi", &["fc1", "fc2"]),
    ];
    for (fixture_name, modules) in expected {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = Model::load(&fixture(fixture_name), &Device::Cpu).unwrap();
        let cfg = HealConfig { targets: "ffn".parse().unwrap(), steps: 1, ..tiny_config(1) };
        let data = chunks(&m, &cfg, 0);
        let mut t = Trainer::new(&mut m, cfg, data, &tmp.path().join("run"), json!({}), false).unwrap();
        assert_eq!(t.lora().targets, modules, "{fixture_name}");
        t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
        t.save_adapter(&tmp.path().join("adapter"), json!({})).unwrap();
        drop(t);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["target_modules"], json!(modules), "{fixture_name}");
        // The PEFT tensors are for exactly these modules.
        let tensors =
            candle_core::safetensors::load(tmp.path().join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
        let adapted: std::collections::BTreeSet<String> = tensors
            .keys()
            .map(|name| name.split(".lora_").next().unwrap().rsplit('.').next().unwrap().to_string())
            .collect();
        let want: std::collections::BTreeSet<String> = modules.iter().map(|s| s.to_string()).collect();
        assert_eq!(adapted, want, "{fixture_name}");
    }
}

/// Every adapter tensor's gradient for one micro-batch of `ids` (`loss / 2`, as with two
/// micro-batches per update), and the micro-batch's loss, with the top `kept_graphs` blocks
/// keeping their graphs and the others recomputed in the backward pass.
fn micro_batch_gradients(model: &Model, ids: &Tensor, kept_graphs: usize) -> (f64, Vec<(String, Tensor)>) {
    let (names, vars): (Vec<String>, Vec<Var>) = model.decoder.adapter_vars().into_iter().unzip();
    let mut sums: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like().unwrap()).collect();
    let loss = accumulate_gradients(model, ids, kept_graphs, 2.0, &vars, &mut sums).unwrap();
    (loss, names.into_iter().zip(sums).collect())
}

/// The same by plain full backpropagation: the decoder's own forward pass, one graph, one
/// backward pass.
fn full_backpropagation(model: &Model, ids: &Tensor) -> (f64, Vec<(String, Tensor)>) {
    let loss = next_token_loss(model, ids).unwrap();
    let value = loss.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let grads = (loss / 2.0).unwrap().backward().unwrap();
    let gradients = model
        .decoder
        .adapter_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads.get(var.as_tensor()).cloned().unwrap_or_else(|| var.as_tensor().zeros_like().unwrap());
            (name, g)
        })
        .collect();
    (value, gradients)
}

#[test]
fn recomputed_blocks_give_the_gradients_of_full_backpropagation() {
    // Dropout on (the recomputation must redraw the same masks), B nonzero so that A gets
    // gradients too; attention adapters (gradients through the softmax and rotary), the FFN-only
    // default (block 0's input and attention untracked), a parallel block (Phi-2), fused modules
    // (Phi-3), a sliding window (Mistral), and the NF4 base.
    let cases: [(&str, &[&str], bool); 5] = [
        ("tiny-llama", &["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], true),
        ("tiny-llama", &["gate_proj", "up_proj", "down_proj"], false),
        ("tiny-phi", &["fc1", "fc2", "dense"], false),
        ("tiny-phi3", &["qkv_proj", "gate_up_proj", "down_proj"], true),
        ("tiny-mistral", &["k_proj", "down_proj"], false),
    ];
    let mut worst = 0f32;
    for (fixture_name, targets, quantize) in cases {
        let mut model = Model::load(&fixture(fixture_name), &Device::Cpu).unwrap();
        if quantize {
            model.decoder.quantize_nf4().unwrap();
        }
        let spec = LoraSpec { dropout: 0.2, ..spec(4, targets) };
        model.decoder.attach_adapters(&spec, 11).unwrap();
        for (i, (name, var)) in model.decoder.adapter_vars().into_iter().enumerate() {
            if name.contains("lora_B") {
                let n = var.as_tensor().elem_count();
                let values: Vec<f32> = (0..n).map(|k| 0.2 * ((k * 5 + i * 3) as f32 * 0.29).sin()).collect();
                var.set(&Tensor::from_vec(values, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        let cfg = HealConfig { seq_len: 24, ..tiny_config(1) };
        let data = chunks(&model, &cfg, 0);
        let ids = data.batch(0, 3, &Device::Cpu).unwrap();
        model.decoder.set_adapter_training(Some(5));
        let (full_loss, full) = full_backpropagation(&model, &ids);
        // Every block recomputed, the top one or two kept (a split inside the model), none.
        for kept_graphs in [0, 1, 2, usize::MAX] {
            let (loss, recomputed) = micro_batch_gradients(&model, &ids, kept_graphs);
            assert_eq!(full_loss, loss, "{fixture_name}, {kept_graphs} graphs kept: the loss differs");
            assert_eq!(full.len(), recomputed.len());
            for ((name, a), (_, b)) in full.iter().zip(&recomputed) {
                assert!(max_abs_diff(a, &a.zeros_like().unwrap()) > 0.0, "{fixture_name} {name}: no gradient");
                let rel = common::rel_err(b, a);
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-6,
                    "{fixture_name} {name}, {kept_graphs} graphs kept: recomputed gradient differs by {rel} (relative)"
                );
            }
        }
        model.decoder.set_adapter_training(None);
    }
    eprintln!("largest relative gradient difference, recomputed vs full backpropagation: {worst:e}");
}

#[test]
fn blocks_run_one_at_a_time_compute_what_the_decoder_computes() {
    let model = tiny();
    let x = ids(&model, "One block at a time, as healing recomputes them.");
    let context = model.decoder.block_context(x.dim(1).unwrap()).unwrap();
    let mut h = model.decoder.embed(&x).unwrap();
    for l in 0..model.decoder.num_blocks() {
        h = model.decoder.forward_block(l, &h, &context).unwrap();
    }
    assert_eq!(max_abs_diff(&model.decoder.logits(&h).unwrap(), &model.decoder.forward(&x).unwrap()), 0.0);
    assert!(model.decoder.forward_block(model.decoder.num_blocks(), &h, &context).is_err());
}

#[test]
fn heal_runs_with_and_without_recomputation_reach_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut values = Vec::new();
    for recompute in [Recompute::ALL, Recompute::NONE, Recompute::Top(2), Recompute::Fit] {
        let cfg = HealConfig { recompute, ..tiny_config(4) };
        let mut m = tiny();
        let data = chunks(&m, &cfg, 0);
        let out = tmp.path().join(format!("recompute-{}", values.len()));
        let mut t = Trainer::new(&mut m, cfg, data, &out, json!({}), false).unwrap();
        assert_eq!(t.run(&AtomicBool::new(false), &mut |_| {}).unwrap(), HealEnd::Finished);
        drop(t);
        values.push(adapter_values(&m));
    }
    let full = &values[1];
    for (run, recomputed) in values.iter().enumerate() {
        assert_eq!(recomputed.len(), full.len());
        for ((name, x), (_, y)) in recomputed.iter().zip(full) {
            let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-6, "{name}: run {run} and full backpropagation differ by {d}");
        }
    }
}

/// `worker heal` starts itself again with glibc's malloc tuned to keep freed memory for reuse (a
/// healing step's tensors are otherwise faulted in afresh every step) and records it, unless the
/// environment sets tunables of its own or turns it off; other commands keep glibc's defaults.
#[test]
fn heal_runs_with_malloc_tunables_unless_told_otherwise() {
    let (model, c4) = (fixture("tiny-llama"), c4_sample());
    let heal = |env: &[(&str, &str)]| -> String {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
        cmd.args(["heal", "--model", model.to_str().unwrap(), "--data", c4.to_str().unwrap()]);
        cmd.args(["--steps", "1", "--batch", "2", "--seq-len", "16", "--rank", "2", "--out", out.to_str().unwrap()]);
        cmd.env_remove("GLIBC_TUNABLES").env_remove("PRUNESWEEP_MALLOC").env_remove("PRUNESWEEP_MALLOC_RERUN");
        let run = cmd.envs(env.iter().copied()).output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("prunesweep.json")).unwrap()).unwrap();
        meta["malloc"].as_str().unwrap_or_else(|| panic!("no malloc entry: {meta}")).to_string()
    };
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        let tuned = format!("the worker's settings ({})", prunesweep_worker::allocator::HEAL_MALLOC_TUNABLES);
        assert_eq!(heal(&[]), tuned);
    }
    assert_eq!(heal(&[("PRUNESWEEP_MALLOC", "default")]), "glibc's defaults");
    // The re-run never re-runs again (glibc drops GLIBC_TUNABLES for setuid programs).
    assert_eq!(heal(&[("PRUNESWEEP_MALLOC_RERUN", "1")]), "glibc's defaults");
    let own = heal(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")]);
    assert_eq!(own, "GLIBC_TUNABLES=glibc.malloc.arena_max=2 (the environment's)");
}

//! Parity with HF transformers: the committed fixtures under `tests/fixtures/` were produced by
//! `scripts/reference/make_fixtures.py` (transformers 5.24, torch f32, eager attention) and hold
//! the logits and the residual states x^(0..L) (x^(L) pre-norm) of a fixed prompt.
//!
//! Tolerance: f32 on both sides, relative error `max|ours − ref| / max|ref|` ≤ 1e-4 on logits and
//! on states (measured: ~1e-6).

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, ids_of, load_tensors, rel_err};
use prunesweep_worker::forward::forward_ids;
use prunesweep_worker::model::{Model, ModelSource};

const TOL: f32 = 1e-4;
const FAMILIES: [&str; 5] = ["llama", "mistral", "qwen2", "phi3", "phi"];

fn check_family(family: &str) {
    let dir = fixture(&format!("tiny-{family}"));
    let reference = load_tensors(&dir.join("reference.safetensors"));
    let mut model = Model::load(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{family}: {e}"));
    let ids = ids_of(&reference["ids"]);

    // The tokenizer reproduces the reference ids from the prompt text.
    let prompt = std::fs::read_to_string(dir.join("prompt.txt")).unwrap();
    assert_eq!(model.tokenizer.encode(&prompt).unwrap(), ids, "{family}: token ids");

    let out = forward_ids(&model, &ids).unwrap();
    let (le, se) = (rel_err(&out.logits, &reference["logits"]), rel_err(&out.states, &reference["states"]));
    assert!(le <= TOL, "{family}: logits rel err {le}");
    assert!(se <= TOL, "{family}: states rel err {se}");

    // Attention one query row at a time (each reading only the keys up to its own) is the same.
    let mut chunked = model.clone();
    chunked.decoder.set_attention_chunk(1);
    let out = forward_ids(&chunked, &ids).unwrap();
    let (le, se) = (rel_err(&out.logits, &reference["logits"]), rel_err(&out.states, &reference["states"]));
    assert!(le <= TOL && se <= TOL, "{family}: chunked attention rel err {le} (logits), {se} (states)");

    // Right-padded batch: each row's last real token matches that row run alone (reference).
    let batch = reference["batch_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let lens: Vec<usize> = reference["batch_lens"].to_vec1::<i64>().unwrap().iter().map(|&l| l as usize).collect();
    let hidden = model.decoder.run(&batch, None, None, &mut |_, _| Ok(())).unwrap();
    let last: Vec<usize> = lens.iter().map(|l| l - 1).collect();
    let logits = model.decoder.logits_at(&hidden, &last).unwrap();
    let be = rel_err(&logits, &reference["batch_last_logits"]);
    assert!(be <= TOL, "{family}: padded batch rel err {be}");

    // Dropping layers 1..=2 in memory equals HF with those modules removed.
    model.decoder.remove_layers(&[1, 2]).unwrap();
    assert_eq!(model.decoder.kept_layers(), vec![0, 3]);
    let out = forward_ids(&model, &ids).unwrap();
    let (le, se) =
        (rel_err(&out.logits, &reference["dropped_logits"]), rel_err(&out.states, &reference["dropped_states"]));
    assert!(le <= TOL, "{family} dropped: logits rel err {le}");
    assert!(se <= TOL, "{family} dropped: states rel err {se}");
}

#[test]
fn llama_with_llama3_rope_matches_transformers() {
    check_family("llama");
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    check_family("mistral");
}

#[test]
fn qwen2_with_qkv_bias_and_tied_head_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn phi3_with_fused_projections_matches_transformers() {
    check_family("phi3");
}

#[test]
fn phi2_parallel_block_partial_rotary_matches_transformers() {
    check_family("phi");
}

/// Every family survives save → reload unchanged, with and without a cut.
#[test]
fn hf_writer_round_trips_every_family() {
    for family in FAMILIES {
        let dir = fixture(&format!("tiny-{family}"));
        let reference = load_tensors(&dir.join("reference.safetensors"));
        let ids = ids_of(&reference["ids"]);
        let mut model = Model::load(&dir, &Device::Cpu).unwrap();
        model.decoder.remove_layers(&[1, 2]).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out_dir = tmp.path().join("pruned");
        model.save_hf(&out_dir, &[]).unwrap();
        let reloaded = Model::load(&out_dir, &Device::Cpu).unwrap();
        assert_eq!(reloaded.decoder.num_blocks(), 2, "{family}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["num_hidden_layers"], 2, "{family}");
        let out = forward_ids(&reloaded, &ids).unwrap();
        let le = rel_err(&out.logits, &reference["dropped_logits"]);
        assert!(le <= TOL, "{family}: reloaded pruned model logits rel err {le}");
    }
}

/// The HF hub cache layout (`models--org--name/snapshots/<rev>/`, `refs/main`) resolves to the
/// snapshot the ref names.
#[test]
fn hub_cache_layout_resolves_to_the_ref_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("models--tiny--llama");
    for rev in ["aaa111", "bbb222"] {
        let snap = cache.join("snapshots").join(rev);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture("tiny-llama").join(f), snap.join(f)).unwrap();
        }
    }
    std::fs::create_dir_all(cache.join("refs")).unwrap();
    std::fs::write(cache.join("refs/main"), "bbb222\n").unwrap();
    let src = ModelSource::resolve(&cache).unwrap();
    assert_eq!(src, ModelSource::HfDir(cache.join("snapshots/bbb222")));
    let model = Model::load(&cache, &Device::Cpu).unwrap();
    assert_eq!(model.decoder.num_blocks(), 4);
}

/// A shared prefix computed once (KV cache) and continued by a batch gives the same last-token
/// logits as running each full sequence. Tolerance: rel err ≤ 1e-5 (same math, other GEMM shapes).
#[test]
fn shared_prefix_cache_matches_full_sequences() {
    for family in FAMILIES {
        let model = Model::load(&fixture(&format!("tiny-{family}")), &Device::Cpu).unwrap();
        // Packed runs go one query row at a time, so that each row reads only the keys it may see.
        let mut chunked = model.decoder.clone();
        chunked.set_attention_chunk(1);
        let prefix: Vec<u32> = vec![5, 60, 61, 70, 80, 90];
        let tails: [Vec<u32>; 2] = [vec![100, 101, 102], vec![110, 111, 112, 113, 114]];
        let (cache, _) = model
            .decoder
            .prefill(&Tensor::new(prefix.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        // Right-pad the tails into one batch.
        let width = tails.iter().map(Vec::len).max().unwrap();
        let padded: Vec<u32> =
            tails.iter().flat_map(|t| t.iter().copied().chain(std::iter::repeat(0)).take(width)).collect();
        let batch = Tensor::from_vec(padded, (2, width), &Device::Cpu).unwrap();
        let hidden = model.decoder.run(&batch, Some(&cache), None, &mut |_, _| Ok(())).unwrap();
        let last: Vec<usize> = tails.iter().map(|t| t.len() - 1).collect();
        let cached = model.decoder.logits_at(&hidden, &last).unwrap();
        for (row, tail) in tails.iter().enumerate() {
            let full: Vec<u32> = prefix.iter().chain(tail).copied().collect();
            let logits = model
                .decoder
                .forward(&Tensor::new(full.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
                .unwrap();
            let plain = logits.get(0).unwrap().get(full.len() - 1).unwrap();
            let e = rel_err(&cached.get(row).unwrap(), &plain);
            assert!(e <= 1e-5, "{family} row {row}: prefix-cache rel err {e}");
            // The tails packed end to end in one row, each seeing only the prefix and itself.
            let lengths: Vec<usize> = tails.iter().map(Vec::len).collect();
            let flat = Tensor::new(tails.concat().as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let packing = prunesweep_worker::model::packing::Packing::sequences(&lengths);
            let hidden = chunked.run_packed(&flat, &packing, Some(&cache)).unwrap();
            let at = lengths[..row].iter().sum::<usize>() + tail.len() - 1;
            let packed = model.decoder.logits_at(&hidden, &[at]).unwrap();
            let e = rel_err(&packed.get(0).unwrap(), &plain);
            assert!(e <= 1e-5, "{family} row {row}: packed rel err {e}");
        }
    }
}

/// A packed pass of several spans, with continuations (a context and two answers after it) and
/// a shared prefix, gives every position the logits of its full sequence run alone: the context
/// followed by the answer for an answer, the sequence itself otherwise. Mistral's window of 4
/// checks that positions and the window follow a continuation's own stream. Tolerance: rel err
/// ≤ 1e-5.
#[test]
fn packed_spans_and_continuations_match_full_sequences() {
    use prunesweep_worker::model::packing::{Packing, Segment};
    for family in FAMILIES {
        let model = Model::load(&fixture(&format!("tiny-{family}")), &Device::Cpu).unwrap();
        let tokens =
            |n: usize, seed: usize| -> Vec<u32> { (0..n).map(|i| ((i * 37 + seed * 11) % 300 + 5) as u32).collect() };
        let prefix = tokens(6, 1);
        let d = &model.decoder;
        let (cache, _) =
            d.prefill(&Tensor::new(prefix.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
        // [context 120, answer 40, answer 15] | [sequence 200, sequence 30]: two spans.
        let seg = |len, continues| Segment { len, continues };
        let segments = vec![seg(120, None), seg(40, Some(0)), seg(15, Some(0)), seg(200, None), seg(30, None)];
        let seqs: Vec<Vec<u32>> = segments.iter().enumerate().map(|(i, s)| tokens(s.len, i + 2)).collect();
        let packing = Packing::new(segments.clone()).unwrap();
        assert_eq!(packing.spans(prefix.len(), None, &Device::Cpu).unwrap().len(), 2);
        let flat = Tensor::new(seqs.concat().as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let hidden = d.run_packed(&flat, &packing, Some(&cache)).unwrap();
        let mut at = 0;
        for (i, s) in segments.iter().enumerate() {
            // The full sequence this segment ends: prefix, the sequence it continues, itself.
            let parent = s.continues.map_or(&[][..], |r| seqs[r].as_slice());
            let full: Vec<u32> = prefix.iter().chain(parent).chain(&seqs[i]).copied().collect();
            let plain = d.forward(&Tensor::new(full.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
            let plain = plain.get(0).unwrap().narrow(0, full.len() - s.len, s.len).unwrap();
            let packed = d.logits(&hidden.get(0).unwrap().narrow(0, at, s.len).unwrap()).unwrap();
            let e = rel_err(&packed, &plain);
            assert!(e <= 1e-5, "{family} segment {i}: packed rel err {e}");
            at += s.len;
        }
    }
}

/// Sharded checkpoints (`model.safetensors.index.json` + shards) load like the single file.
#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let tensors = load_tensors(&src.join("model.safetensors"));
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        weight_map.insert(name.clone(), shard.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    candle_core::safetensors::save(&a, tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let reference = load_tensors(&src.join("reference.safetensors"));
    let model = Model::load(tmp.path(), &Device::Cpu).unwrap();
    let out = forward_ids(&model, &ids_of(&reference["ids"])).unwrap();
    let e = rel_err(&out.logits, &reference["logits"]);
    assert!(e <= TOL, "sharded: logits rel err {e}");
}

//! The real model, SmolLM2-135M-Instruct from its Q4_1 GGUF (`scripts/fetch-model.sh`): parity with
//! HF transformers (logits, residual states, tokenizer; `scripts/reference/make_fixtures.py`), the
//! same through an HF directory written from it, and a clear error for a truncated GGUF.
//!
//! Tolerance: relative error `max|ours − ref| / max|ref|` ≤ 1e-4, as in `parity.rs`.

mod common;

use candle_core::Device;
use common::{fixture, ids_of, load_err, load_tensors, rel_err, smollm2_gguf};
use prunesweep_worker::forward::forward_ids;
use prunesweep_worker::model::Model;

const TOL: f32 = 1e-4;

/// The real model: SmolLM2-135M-Instruct from the Q4_1 GGUF, against transformers loading the
/// same GGUF (it dequantizes to f32 too). Then the same through an HF directory we write.
#[test]
fn smollm2_gguf_and_hf_dir_match_transformers() {
    let reference = load_tensors(&fixture("smollm2/reference.safetensors"));
    let prompt = std::fs::read_to_string(fixture("smollm2/prompt.txt")).unwrap();
    let model = Model::load(&smollm2_gguf(), &Device::Cpu).unwrap();
    assert_eq!(model.decoder.num_blocks(), 30);
    let ids = model.tokenizer.encode(&prompt).unwrap();
    assert_eq!(ids, ids_of(&reference["ids"]), "token ids");

    let check = |model: &Model, what: &str| {
        let out = forward_ids(model, &ids).unwrap();
        let t = ids.len();
        let last = out.logits.get(t - 1).unwrap();
        let e = rel_err(&last, &reference["last_logits"]);
        assert!(e <= TOL, "{what}: last logits rel err {e}");
        let subset = reference["vocab_subset"].to_dtype(candle_core::DType::U32).unwrap();
        let sub = out.logits.index_select(&subset, 1).unwrap();
        let e = rel_err(&sub, &reference["logits_subset"]);
        assert!(e <= TOL, "{what}: logits (vocab subset, all positions) rel err {e}");
        let e = rel_err(&out.states, &reference["states"]);
        assert!(e <= TOL, "{what}: states rel err {e}");
        let argmax: Vec<i64> =
            out.logits.argmax(1).unwrap().to_vec1::<u32>().unwrap().iter().map(|&i| i64::from(i)).collect();
        assert_eq!(argmax, reference["argmax"].to_vec1::<i64>().unwrap(), "{what}: top-1 at every position");
    };
    check(&model, "gguf");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    model.save_hf(&dir, &[]).unwrap();
    let hf = Model::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(hf.tokenizer.encode(&prompt).unwrap(), ids, "tokenizer.json written from GGUF");
    check(&hf, "hf dir written from gguf");
}

/// Our GGUF tokenizer gives transformers' ids on varied text (digits, unicode, specials, spacing).
#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/tokenizer_cases.json")).unwrap()).unwrap();
    let model = Model::load(&smollm2_gguf(), &Device::Cpu).unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(model.tokenizer.encode(text).unwrap(), want, "text {text:?}");
    }
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(smollm2_gguf()).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1_000_000]).unwrap();
    let msg = load_err(&f);
    assert!(msg.contains("cut.gguf") && msg.contains("corrupt"), "{msg}");
    std::fs::write(&f, b"GGUF but not really").unwrap();
    let msg = load_err(&f);
    assert!(msg.contains("cut.gguf"), "{msg}");
}

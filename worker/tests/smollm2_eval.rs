//! Evaluation on SmolLM2 (needs the real model, `scripts/fetch-model.sh`, and the shared data)
//! against a transformers reference (`scripts/reference/make_eval_reference.py`, one plain forward
//! per full prompt): identical per-item predictions on a 2-subject MMLU subset (20 questions each,
//! 5-shot letter and 0-shot cloze) and 40 BoolQ items, and C4 loss within 1e-4 relative on 16
//! held-out documents. Also: the shared-prefix path against the plain path.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{eval_reference as reference, rel_err, smollm2_gguf, two_subjects};
use prunesweep_worker::data::read_documents;
use prunesweep_worker::eval::{boolq, c4_loss, mmlu, Layout};
use prunesweep_worker::model::Model;
use serde_json::Value;

fn data_dir() -> PathBuf {
    common::shared_data()
}

fn items<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]["items"].as_array().unwrap()
}

#[test]
fn smollm2_mmlu_letter_and_cloze_match_transformers() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let mut data = mmlu::MmluData::load(&two_subjects(tmp.path()), None).unwrap();
    data.truncate(Some(20), None);
    assert_eq!(data.questions.len(), 40);
    let model = Model::load(&smollm2_gguf(), &Device::Cpu).unwrap();
    let letter = mmlu::evaluate_letter(&model, &data, 5, 8, &mut |_| {}).unwrap();
    let cloze = mmlu::evaluate_cloze(&model, &data, 8, &mut |_| {}).unwrap();
    for (report, key) in [(&letter, "mmlu"), (&cloze, "mmlu_cloze")] {
        let want = items(&r, key);
        assert_eq!(report.predictions.len(), want.len());
        for (got, want) in report.predictions.iter().zip(want) {
            for field in ["subject", "index", "pred", "answer"] {
                assert_eq!(got[field], want[field], "{key}: {got} vs {want}");
            }
        }
        assert_eq!(report.accuracy, r[key]["accuracy"].as_f64(), "{key}");
    }
    assert!(letter.computed_tokens * 3 < letter.tokens, "the 5-shot header is computed once per subject");
    assert_eq!(letter.per_subject.as_ref().unwrap().len(), 2);
}

#[test]
fn smollm2_boolq_and_c4_loss_match_transformers() {
    let r = reference();
    let model = Model::load(&smollm2_gguf(), &Device::Cpu).unwrap();
    let mut bq = boolq::load(&data_dir().join("boolq/val.jsonl")).unwrap();
    bq.truncate(40);
    let report = boolq::evaluate(&model, &bq, 8, &mut |_| {}).unwrap();
    for (got, want) in report.predictions.iter().zip(items(&r, "boolq")) {
        assert_eq!((&got["index"], &got["pred"], &got["label"]), (&want["index"], &want["pred"], &want["label"]));
    }
    assert_eq!(report.accuracy, r["boolq"]["accuracy"].as_f64());

    let docs = read_documents(&data_dir().join("c4/c4-en-train.00000-of-01024.first1000.jsonl"), Some(916)).unwrap();
    let report = c4_loss::evaluate(&model, &docs[900..], 128, 8, &mut |_| {}).unwrap();
    let want = r["c4_loss"]["loss"].as_f64().unwrap();
    let got = report.loss.unwrap();
    assert!((got - want).abs() / want <= 1e-4, "c4 loss {got} vs transformers {want}");
    let norm = r["c4_loss"]["normalized_loss"].as_f64().unwrap();
    assert!((report.normalized_loss.unwrap() - norm).abs() / norm <= 1e-4);
}

/// The shared-prefix path (prefix K/V computed once, suffixes batched with right padding, or
/// packed end to end in one row) gives the plain path's last-token logits. Tolerance: rel err ≤
/// 1e-5 (the same arithmetic in other GEMM shapes; measured ~1e-6).
#[test]
fn shared_prefix_logits_equal_plain_logits_on_smollm2() {
    let tmp = tempfile::tempdir().unwrap();
    let mut data = mmlu::MmluData::load(&two_subjects(tmp.path()), None).unwrap();
    data.truncate(Some(3), None);
    let model = Model::load(&smollm2_gguf(), &Device::Cpu).unwrap();
    let qs = &data.questions[..3];
    let shots = data.shots(&qs[0].subject, 5).unwrap();
    let ids: Vec<Vec<u32>> =
        qs.iter().map(|q| model.tokenizer.encode(&mmlu::letter_prompt(q, &shots)).unwrap()).collect();
    let p = prunesweep_worker::eval::common_prefix_len(&ids, 1);
    assert!(p > 250, "the 5-shot header is shared ({p} tokens)");
    let d = &model.decoder;
    let (cache, _) = d.prefill(&Tensor::new(&ids[0][..p], &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
    let suffixes: Vec<Vec<u32>> = ids.iter().map(|s| s[p..].to_vec()).collect();
    // Every vocabulary entry at each suffix's last position: the whole logit row.
    let vocab: Vec<u32> = (0..d.cfg.vocab_size as u32).collect();
    let picks: Vec<Vec<prunesweep_worker::eval::Pick>> =
        suffixes.iter().map(|s| vec![(s.len() - 1, vocab.clone())]).collect();
    let plain: Vec<Tensor> = ids
        .iter()
        .map(|s| {
            let full = d.forward(&Tensor::new(s.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
            full.get(0).unwrap().get(s.len() - 1).unwrap()
        })
        .collect();
    for layout in [Layout::Padded, Layout::Packed] {
        let shared =
            prunesweep_worker::eval::scored_positions(d, Some(&cache), &suffixes, &picks, 3, layout, true).unwrap();
        for (i, plain) in plain.iter().enumerate() {
            let e = rel_err(&Tensor::new(shared[i][0].as_slice(), &Device::Cpu).unwrap(), plain);
            assert!(e <= 1e-5, "question {i}, {layout:?}: shared-prefix rel err {e}");
        }
    }
}

/// Every task on SmolLM2 with 10 of its 30 blocks held and 20 read from the checkpoint for each
/// pass (an HF directory written from the GGUF, `Model::load_offloaded`): the whole load's
/// predictions, margins and losses to the bit. Sixteen passes at a time run block by block
/// together (MMLU letter within a subject, cloze, BoolQ, C4 loss), so each read serves many passes.
#[test]
fn smollm2_with_blocks_read_per_pass_evaluates_to_the_same_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    Model::load(&smollm2_gguf(), &Device::Cpu).unwrap().save_hf(&dir, &[]).unwrap();
    let whole = Model::load(&dir, &Device::Cpu).unwrap();
    let mut offloaded = Model::load_offloaded(&dir, &Device::Cpu, candle_core::DType::F32).unwrap();
    let block = {
        let mut probe = Model::load_offloaded(&dir, &Device::Cpu, candle_core::DType::F32).unwrap();
        probe.decoder.make_resident(u64::MAX).unwrap().1 / 30
    };
    assert_eq!(offloaded.decoder.make_resident(10 * block).unwrap().0, 10);
    assert_eq!(offloaded.decoder.offloaded_blocks(), 20);

    let mut data = mmlu::MmluData::load(&two_subjects(tmp.path()), None).unwrap();
    data.truncate(Some(6), None);
    let mut bq = boolq::load(&data_dir().join("boolq/val.jsonl")).unwrap();
    bq.truncate(24);
    let docs = read_documents(&data_dir().join("c4/c4-en-train.00000-of-01024.first1000.jsonl"), Some(912)).unwrap();
    for model in [&whole, &offloaded] {
        assert_eq!(prunesweep_worker::eval::passes_per_call(&model.decoder) > 1, model.decoder.offloaded_blocks() > 0);
    }
    let run = |model: &Model| {
        let letter = mmlu::evaluate_letter(model, &data, 5, 2, &mut |_| {}).unwrap();
        let cloze = mmlu::evaluate_cloze(model, &data, 4, &mut |_| {}).unwrap();
        let boolq = boolq::evaluate(model, &bq, 4, &mut |_| {}).unwrap();
        let c4 = c4_loss::evaluate(model, &docs[900..], 64, 3, &mut |_| {}).unwrap();
        (letter.predictions, cloze.predictions, boolq.predictions, c4.predictions, c4.loss)
    };
    let want = run(&whole);
    let got = run(&offloaded);
    assert_eq!(got.0, want.0, "MMLU letter");
    assert_eq!(got.1, want.1, "MMLU cloze");
    assert_eq!(got.2, want.2, "BoolQ (margins included)");
    assert_eq!((got.3, got.4), (want.3, want.4), "C4 loss per document and overall");
}

//! Evaluation on SmolLM2 against a transformers reference (`scripts/reference/make_eval_reference.py`,
//! one plain forward per full prompt): identical per-item predictions on a 2-subject MMLU subset
//! (20 questions each, 5-shot letter and 0-shot cloze) and 40 BoolQ items, and C4 loss within 1e-4
//! relative on 16 held-out documents. Also: prompt builders against the reference's exact strings,
//! the shared-prefix path against the plain path, and bad data.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{fixture, rel_err, smollm2_gguf};
use prunesweep_worker::data::read_documents;
use prunesweep_worker::eval::{boolq, c4_loss, mmlu, EvalError, Layout};
use prunesweep_worker::model::Model;
use serde_json::Value;

fn data_dir() -> PathBuf {
    common::shared_data()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/eval_reference.json")).unwrap()).unwrap()
}

/// A copy of two MMLU subjects (test + dev CSVs) in a temp folder.
fn two_subjects(dir: &Path) -> PathBuf {
    let root = dir.join("mmlu");
    for split in ["test", "dev"] {
        std::fs::create_dir_all(root.join(split)).unwrap();
        for s in ["abstract_algebra", "high_school_geography"] {
            let f = format!("{s}_{split}.csv");
            std::fs::copy(data_dir().join("mmlu").join(split).join(&f), root.join(split).join(&f)).unwrap();
        }
    }
    root
}

fn items<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]["items"].as_array().unwrap()
}

#[test]
fn prompts_match_the_reference_strings() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let data = mmlu::MmluData::load(&two_subjects(tmp.path()), None).unwrap();
    let q = &data.questions[0];
    let shots = data.shots(&q.subject, 5).unwrap();
    assert_eq!(mmlu::letter_prompt(q, &shots), r["examples"]["mmlu_letter"]["prompt"].as_str().unwrap());
    assert_eq!(mmlu::cloze_context(q), r["examples"]["mmlu_cloze"]["context"].as_str().unwrap());
    let items = boolq::load(&data_dir().join("boolq/val.jsonl")).unwrap();
    assert_eq!(boolq::prompt(&items[0]), r["examples"]["boolq"]["prompt"].as_str().unwrap());
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

#[test]
fn bad_mmlu_data_is_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = two_subjects(tmp.path());
    let model = Model::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    // A missing dev file for 5-shot.
    std::fs::remove_file(root.join("dev/high_school_geography_dev.csv")).unwrap();
    let mut data = mmlu::MmluData::load(&root, None).unwrap();
    data.truncate(Some(1), None);
    let e = mmlu::evaluate_letter(&model, &data, 5, 4, &mut |_| {}).unwrap_err();
    assert!(
        matches!(e, EvalError::MissingFile { .. }) && e.to_string().contains("high_school_geography_dev.csv"),
        "{e}"
    );
    // 0-shot needs no dev file, but the tiny byte tokenizer spells " A".." D" as a space token then
    // the letter: the first tokens coincide, so letter scoring is refused rather than answering A.
    let e = mmlu::evaluate_letter(&model, &data, 0, 4, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("share their first token") && e.contains("cloze"), "{e}");
    let report = mmlu::evaluate_cloze(&model, &data, 4, &mut |_| {}).unwrap();
    assert_eq!(report.n, 2);
    // Nothing left after --limit 0 is an error, not an accuracy of 0.
    let mut none = data.clone();
    none.truncate(None, Some(0));
    assert!(mmlu::evaluate_letter(&model, &none, 0, 4, &mut |_| {})
        .unwrap_err()
        .to_string()
        .contains("no MMLU questions"));
    // A malformed row and a bad answer letter name the file and line.
    let f = root.join("test/abstract_algebra_test.csv");
    std::fs::write(&f, "q,a,b,c,d,A\nq2,a,b\n").unwrap();
    let e = mmlu::MmluData::load(&root, None).unwrap_err().to_string();
    assert!(e.contains("abstract_algebra_test.csv:2: expected 6 fields"), "{e}");
    std::fs::write(&f, "q,a,b,c,d,A\nq2,a,b,c,d,F\n").unwrap();
    let e = mmlu::MmluData::load(&root, None).unwrap_err().to_string();
    assert!(e.contains("abstract_algebra_test.csv:2: answer `F`"), "{e}");
    // An empty data set.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("test")).unwrap();
    std::fs::write(empty.join("test/x_test.csv"), "").unwrap();
    let e = mmlu::MmluData::load(&empty, None).unwrap_err().to_string();
    assert!(e.contains("no MMLU test questions"), "{e}");
}

#[test]
fn eval_cli_writes_the_result_json_and_refuses_unscorable_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-qwen2");
    let run = |args: &[&str]| {
        let res = std::process::Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().unwrap();
        (res.status.success(), String::from_utf8_lossy(&res.stderr).into_owned())
    };
    // BoolQ on a byte-level tokenizer without merges: " yes" and " no" both start with the space token.
    let data = tmp.path().join("b.jsonl");
    std::fs::write(&data, "{\"passage\":\"Sky is blue.\",\"question\":\"is the sky blue\",\"label\":\"true\"}\n")
        .unwrap();
    let out = tmp.path().join("r.json");
    let (ok, stderr) = run(&[
        "eval",
        "--model",
        tiny.to_str().unwrap(),
        "--task",
        "boolq",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("share their first token") && !stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "no result file for a refused task");
    // c4-loss on a cut model writes the JSON.
    let text = tmp.path().join("docs.txt");
    std::fs::write(&text, "first document here\n\nsecond document, a bit longer\n").unwrap();
    let (ok, stderr) = run(&[
        "eval",
        "--model",
        tiny.to_str().unwrap(),
        "--drop",
        "1:1",
        "--task",
        "c4-loss",
        "--data",
        text.to_str().unwrap(),
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!((r["task"].as_str(), r["n"].as_u64()), (Some("c4-loss"), Some(2)));
    let (loss, norm) = (r["loss"].as_f64().unwrap(), r["normalized_loss"].as_f64().unwrap());
    assert!(loss > 0.0 && (norm - loss / 320f64.ln()).abs() < 1e-9);
    assert_eq!(r["predictions"][1]["index"], 1);
    assert_eq!(r["tokens"], 16 + 16, "two documents truncated to 16 byte tokens");
}

//! Evaluation without the real model: prompt builders against the exact strings of the
//! transformers reference (`scripts/reference/make_eval_reference.py`), and bad data. The
//! comparisons on SmolLM2 itself are in `smollm2_eval.rs`.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::{eval_reference as reference, fixture, two_subjects};
use prunesweep_worker::eval::{boolq, mmlu, EvalError};
use prunesweep_worker::model::Model;
use serde_json::Value;

fn data_dir() -> PathBuf {
    common::shared_data()
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
    let report = mmlu::evaluate_cloze(&model, &data, 8, &mut |_| {}).unwrap();
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

    // The same cut model's blocks spread over two devices (on a CPU, the CPU twice): the same loss.
    let spread_out = tmp.path().join("spread.json");
    let (tiny_path, text_path, out_path) =
        (tiny.to_str().unwrap(), text.to_str().unwrap(), spread_out.to_str().unwrap());
    let spread_args = |extra: &[&'static str]| {
        let mut a = vec!["eval", "--model", tiny_path, "--drop", "1:1", "--task", "c4-loss", "--data", text_path];
        a.extend(["--samples", "2", "--seq-len", "16", "--device", "cpu,cpu", "--out", out_path]);
        a.extend(extra);
        a
    };
    let (ok, stderr) = run(&spread_args(&[]));
    assert!(ok && stderr.contains("blocks spread over the devices"), "{stderr}");
    let spread: Value = serde_json::from_str(&std::fs::read_to_string(&spread_out).unwrap()).unwrap();
    assert_eq!(spread["loss"], r["loss"], "spread over two devices vs one");
    // What needs one device says so.
    let (ok, stderr) = run(&spread_args(&["--hold-gib", "1"]));
    assert!(!ok && stderr.contains("leave --hold-gib out, or give one device"), "{stderr}");
    let pruned = tmp.path().join("pruned");
    let (ok, stderr) = run(&[
        "prune",
        "--model",
        tiny_path,
        "--device",
        "cpu,cpu",
        "--layers",
        "1:1",
        "--out",
        pruned.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("this command runs on one device"), "{stderr}");
}

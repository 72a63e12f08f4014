//! Layer scoring and pruning on the tiny fixtures: the distance's geometry and index convention,
//! and the `worker score`/`worker prune` command lines. Agreement with transformers on SmolLM2 is
//! in `smollm2_score.rs`.

mod common;

use candle_core::Device;
use common::{fixture, last_logits, worker};
use prunesweep_worker::forward::forward_ids;
use prunesweep_worker::model::Model;
use prunesweep_worker::score::{angular_distance, score_layers, AngularDistances, Calibration};

/// d(l, n) from a scoring pass equals the angle between `worker forward`'s states l and l+n at the
/// last token: the index convention (x^(l) enters block l; x^(L) is pre-norm) is the same in both.
#[test]
fn scoring_uses_the_forward_states_convention() {
    let model = Model::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let seqs: Vec<Vec<u32>> =
        vec![vec![5, 9, 40, 41, 42, 100, 7], vec![8, 200, 201], vec![3, 4, 5, 6, 7, 8, 9, 10, 11]];
    let cal = Calibration { sequences: seqs.clone(), skipped_short: 0 };
    let batched = score_layers(&model.decoder, &cal, 2, &mut |_| {}).unwrap();
    let one_by_one = score_layers(&model.decoder, &cal, 1, &mut |_| {}).unwrap();
    let layers = 4;
    let states: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|s| {
            let st = forward_ids(&model, s).unwrap().states; // [L+1, T, H]
            (0..=layers).map(|l| st.get(l).unwrap().get(s.len() - 1).unwrap().to_vec1::<f32>().unwrap()).collect()
        })
        .collect();
    for n in 1..=layers {
        for l in 0..=layers - n {
            let want: f64 = states.iter().map(|s| angular_distance(&s[l], &s[l + n])).sum::<f64>() / 3.0;
            for (what, d) in [("batched", &batched.distances), ("unbatched", &one_by_one.distances)] {
                let got = d.get(n, l);
                assert!((got - want).abs() < 1e-6, "{what} d({l},{n}) = {got}, from forward states {want}");
            }
        }
    }
    // Right padding does not leak into Block Influence either.
    for (a, b) in batched.influence.scores.iter().zip(&one_by_one.influence.scores) {
        assert!((a - b).abs() < 1e-6, "block influence {a} vs {b}");
    }
}

#[test]
fn dropping_nothing_writes_an_identical_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("same");
    let tiny = fixture("tiny-phi3");
    let (ok, _, stderr) = worker(&[
        "prune",
        "--model",
        tiny.to_str().unwrap(),
        "--n",
        "0",
        "--method",
        "deepest",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (a, b) = (Model::load(&tiny, &Device::Cpu).unwrap(), Model::load(&out, &Device::Cpu).unwrap());
    let ids = [5u32, 6, 7, 8, 9, 10];
    assert_eq!(
        last_logits(&a, &ids).to_vec1::<f32>().unwrap(),
        last_logits(&b, &ids).to_vec1::<f32>().unwrap(),
        "bit-identical output"
    );
}

#[test]
fn score_cli_writes_csvs_plot_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("docs.txt");
    // Three usable paragraphs and one that is a single token.
    std::fs::write(&data, "the cat sat on the mat\n\nsome more text here\n\nx\n\nand a third document of text\n")
        .unwrap();
    let csv = tmp.path().join("d.csv");
    let plot = tmp.path().join("heat");
    let tiny = fixture("tiny-llama");
    let (ok, stdout, stderr) = worker(&[
        "score",
        "--model",
        tiny.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "8",
        "--out",
        csv.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["samples"], 3);
    assert_eq!(summary["skipped_short"], 1, "the one-byte document is skipped and counted");
    assert_eq!(summary["best"].as_array().unwrap().len(), 4);
    let d = AngularDistances::read_csv(&csv, Some(4)).unwrap();
    assert_eq!(summary["best"][1]["start"], d.best_start(2).unwrap().0);
    assert!(std::fs::read_to_string(tmp.path().join("d.block-influence.csv")).unwrap().starts_with("layer,score\n0,"));
    assert!(std::fs::read_to_string(plot.with_extension("svg")).unwrap().contains("<svg"));
    assert!(std::fs::read(plot.with_extension("png")).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn bad_requests_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-llama");
    let tiny = tiny.to_str().unwrap();
    let out = tmp.path().join("o");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--n", "4", "--method", "deepest"], "cannot drop 4 of 4 layers"),
        (vec!["--fraction", "1.0", "--method", "deepest"], "outside [0, 1)"),
        (vec!["--fraction", "-0.5", "--method", "deepest"], "outside [0, 1)"),
        (vec!["--n", "1", "--method", "angular"], "needs --distances FILE or --data FILE"),
        (vec!["--layers", "3:2"], "runs past the last layer 3"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["prune", "--model", tiny, "--out", out];
        args.extend(extra.iter());
        let (ok, _, stderr) = worker(&args);
        assert!(!ok && stderr.contains(want) && !stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
    // A distances file from another model.
    let smol = fixture("smollm2/distances_c4_16x64.csv");
    let (ok, _, stderr) =
        worker(&["prune", "--model", tiny, "--n", "1", "--distances", smol.to_str().unwrap(), "--out", out]);
    assert!(!ok && stderr.contains("30-layer model") && stderr.contains("4 layers"), "{stderr}");
    // Empty, unreadable and all-too-short data.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "a\nb\n").unwrap();
    for (data, want) in [
        (empty.to_str().unwrap(), "no documents"),
        ("/no/such/file.jsonl", "/no/such/file.jsonl"),
        (short.to_str().unwrap(), "shorter than 2 tokens"),
    ] {
        let (ok, _, stderr) = worker(&["score", "--model", tiny, "--data", data, "--out", out]);
        assert!(!ok && stderr.contains(want) && !stderr.contains("panicked"), "{data}: {stderr}");
    }
}

/// A model run layer by layer (each block loaded from the checkpoint, applied to every batch,
/// dropped) scores exactly as the loaded model does: the same distances and Block Influence to
/// the bit, on every tiny family (Phi-3's fused modules split while streaming, Phi-2's parallel
/// blocks), and in bf16 too. A GGUF file is refused with the reason.
#[test]
fn a_layer_streamed_run_scores_exactly_as_the_loaded_model() {
    use prunesweep_worker::model::streamed::StreamedDecoder;
    use prunesweep_worker::score::score_layers_streamed;
    let seqs: Vec<Vec<u32>> =
        vec![vec![5, 9, 40, 41, 42, 100, 7], vec![8, 200, 201], vec![3, 4, 5, 6, 7, 8, 9, 10, 11]];
    let cal = Calibration { sequences: seqs, skipped_short: 0 };
    for family in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-phi", "tiny-phi3"] {
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
            let model = Model::load_as(&fixture(family), &Device::Cpu, dtype).unwrap();
            let loaded = score_layers(&model.decoder, &cal, 2, &mut |_| {}).unwrap();
            let streamed = StreamedDecoder::open(&fixture(family), &Device::Cpu, dtype).unwrap();
            assert!(streamed.block_bytes() > 0);
            let mut layers_done = Vec::new();
            let got = score_layers_streamed(streamed, &cal, 2, &mut |l| layers_done.push(l)).unwrap();
            assert_eq!(layers_done, (1..=4).collect::<Vec<_>>(), "{family}: progress per block");
            for n in 1..=4 {
                assert_eq!(got.distances.row(n), loaded.distances.row(n), "{family} {dtype:?}: d(·, {n})");
            }
            assert_eq!(got.influence.scores, loaded.influence.scores, "{family} {dtype:?}: Block Influence");
            assert_eq!(got.tokens, loaded.tokens);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let e = StreamedDecoder::open(&gguf, &Device::Cpu, candle_core::DType::F32).err().unwrap().to_string();
    assert!(e.contains("needs an HF safetensors checkpoint"), "{e}");
}

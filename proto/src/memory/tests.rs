//! The memory model's predictions for known shapes and jobs.
use super::*;
use crate::v1::{CalibrationData, HealSpec, ModelRef, QLoraSettings};

const LLAMA2_70B: ModelShape = ModelShape::LLAMA2_70B;

fn cell(q: QLoraSettings) -> JobSpec {
    JobSpec {
        kind: JobKind::Cell as i32,
        model: Some(ModelRef::default()),
        amount: Some(crate::v1::job_spec::Amount::Fraction(0.25)),
        heal: Some(HealSpec { name: "r64".into(), qlora: Some(q) }),
        eval: vec![EvalTask::with_defaults(EvalTaskKind::Mmlu, "mmlu")],
        ..JobSpec::default()
    }
}

#[test]
fn llama2_70b_has_its_published_parameter_count() {
    // 68.98e9 (HF's safetensors index total, 137,953,316,864 bytes in bf16).
    assert_eq!(LLAMA2_70B.params(), 68_976_648_192);
}

#[test]
fn nf4_is_about_half_a_byte_per_parameter() {
    let n = 8192 * 28672;
    let per = nf4_bytes(n) as f64 / n as f64;
    assert!((per - 0.5159).abs() < 1e-3, "{per}");
}

#[test]
fn a_qlora_cell_holds_every_layer_in_nf4_and_only_the_rest_dense() {
    let est = predict(&LLAMA2_70B, &cell(QLoraSettings::paper()), Placement::Cuda).unwrap();
    assert_eq!(est.phase, "heal");
    let part = |name| est.parts.iter().find(|p| p.0 == name).unwrap().1;
    // Embedding, LM head and norms in bf16: no dense copy of a block projection.
    let rest = 2 * 32000 * 8192 + 8192 + 80 * 2 * 8192;
    assert_eq!(part("weights"), rest * 2, "bf16 on CUDA");
    // All 80 blocks of 0.516-byte parameters: the cut layers stay in the held model.
    let nf4 = part("nf4 base") as f64 / (80 * LLAMA2_70B.block_projection_params()) as f64;
    assert!((nf4 - 0.516).abs() < 1e-3, "{nf4}");
    // r = 64 on gate/up/down of the 60 kept blocks: 64 · (3 · 8192 + 3 · 28672), four f32
    // copies, and one block's gradients.
    let per_block = 64 * 3 * (8192 + 28672);
    assert_eq!(part("adapters"), 60 * per_block * 16 + per_block * 4);
    assert_eq!(est.device_bytes, est.parts.iter().map(|p| p.1).sum::<u64>());
    // The paper's claim for 70B: the healing step fits one H200 (141 GB).
    assert!(est.device_bytes < 141_000_000_000, "{}", gib(est.device_bytes));
    // The same job on a CPU is f32 and one figure for device and host.
    let cpu = predict(&LLAMA2_70B, &cell(QLoraSettings::paper()), Placement::Cpu).unwrap();
    assert_eq!(cpu.device_bytes, cpu.host_bytes);
    assert_eq!(cpu.parts.iter().find(|p| p.0 == "weights").unwrap().1, 2 * part("weights"));
    // Without quantization the dense base is held instead.
    let lora = cell(QLoraSettings { quantize_base: false, ..QLoraSettings::paper() });
    let dense = predict(&LLAMA2_70B, &lora, Placement::Cuda).unwrap();
    assert!(dense.parts.iter().all(|p| p.0 != "nf4 base"));
    assert_eq!(dense.parts.iter().find(|p| p.0 == "weights").unwrap().1, LLAMA2_70B.params() * 2);
}

#[test]
fn a_score_job_too_big_to_load_is_predicted_streamed() {
    let job = JobSpec {
        kind: JobKind::Score as i32,
        calibration: Some(CalibrationData::with_defaults("c4")),
        ..JobSpec::default()
    };
    let est = predict(&LLAMA2_70B, &job, Placement::Cuda).unwrap();
    assert_eq!(est.phase, "score-streamed");
    assert!(est.device_bytes < LLAMA2_70B.params() / 4, "{}", gib(est.device_bytes));
}

#[test]
fn an_evaluation_too_big_to_load_runs_in_its_blocks_read_per_pass() {
    let baseline = JobSpec {
        kind: JobKind::Baseline as i32,
        model: Some(ModelRef::default()),
        eval: vec![EvalTask::with_defaults(EvalTaskKind::Mmlu, "mmlu")],
        ..JobSpec::default()
    };
    let est = predict(&LLAMA2_70B, &baseline, Placement::Cuda).unwrap();
    // Held whole: the bf16 weights (128.5 GiB) and the evaluation, more than an H200 holds.
    assert!(est.device_bytes > LLAMA2_70B.params() * 2, "{}", gib(est.device_bytes));
    // Offloaded: the embedding, LM head and final norm, two blocks (one running, the next being
    // read), and the evaluation.
    let rest = (2 * 32000 * 8192 + 8192) * 2;
    let block = 2 * LLAMA2_70B.block_params() * 2;
    let eval = est.device_bytes
        - est.parts.iter().filter(|p| ["cuda context", "weights"].contains(&p.0)).map(|p| p.1).sum::<u64>();
    // Sixteen passes of 8 questions run block by block together, their residual streams held.
    let states = PASSES_PER_READ * 8 * MMLU_QUESTION_TOKENS * 8192 * 2;
    assert_eq!(est.least_device_bytes, CUDA_CONTEXT_BYTES + rest + block + eval + states);
    assert!(est.least_device_bytes < 16 << 30, "{}", gib(est.least_device_bytes));
    // An unhealed cell too; a healed one needs every block held, and a score job is already
    // predicted at its least.
    let unhealed = JobSpec { kind: JobKind::Cell as i32, heal: None, ..cell(QLoraSettings::paper()) };
    let est = predict(&LLAMA2_70B, &unhealed, Placement::Cuda).unwrap();
    assert!(est.least_device_bytes < est.device_bytes / 8);
    for job in [cell(QLoraSettings::paper()), cell(QLoraSettings { quantize_base: false, ..QLoraSettings::paper() })] {
        let est = predict(&LLAMA2_70B, &job, Placement::Cuda).unwrap();
        assert_eq!(est.least_device_bytes, est.device_bytes);
    }
    let score = JobSpec {
        kind: JobKind::Score as i32,
        calibration: Some(CalibrationData::with_defaults("c4")),
        ..JobSpec::default()
    };
    let est = predict(&LLAMA2_70B, &score, Placement::Cuda).unwrap();
    assert_eq!(est.least_device_bytes, est.device_bytes);
}

#[test]
fn bad_shapes_and_unknown_modules_are_named() {
    let shape = ModelShape { kv_heads: 3, ..LLAMA2_70B };
    let e = predict(&shape, &JobSpec::default(), Placement::Cpu).unwrap_err().to_string();
    assert!(e.contains("`heads` (64) is not a multiple of `kv_heads` (3)"), "{e}");
    let q = QLoraSettings {
        targets: AdapterTargets::Modules as i32,
        target_modules: vec!["w1".into()],
        ..QLoraSettings::paper()
    };
    let e = predict(&LLAMA2_70B, &cell(q), Placement::Cpu).unwrap_err().to_string();
    assert!(e.contains("`w1`"), "{e}");
}

#[test]
fn kept_graphs_trade_recomputation_for_their_activations() {
    const SMOLLM2: ModelShape = ModelShape::SMOLLM2_135M;
    let q = QLoraSettings { seq_len: 256, micro_batch_size: 4, batch_size: 4, ..QLoraSettings::paper() };
    for placement in [Placement::Cpu, Placement::Cuda] {
        let e = if placement == Placement::Cpu { 4 } else { 2 };
        let t = Training::new(&SMOLLM2, &q, e, placement).unwrap();
        // The prediction counts every kept block recomputed (a quarter of 30 cut: 22 kept).
        let est = predict(&SMOLLM2, &cell(q.clone()), placement).unwrap();
        let part = |name| est.parts.iter().find(|p| p.0 == name).unwrap().1;
        assert_eq!(part("activations"), t.activation_bytes(22, 0), "{placement:?}");
        // Keeping the top block's graph frees its input; each further one costs its graph
        // less the input it no longer keeps apart.
        let input = 4 * 256 * 576 * e;
        assert_eq!(t.activation_bytes(30, 0) - t.activation_bytes(30, 1), input);
        assert_eq!(t.activation_bytes(30, 2) - t.activation_bytes(30, 1), t.block_graph_bytes() - input);
        assert_eq!(t.activation_bytes(30, 30), t.activation_bytes(30, usize::MAX as u64), "at most every block");
        // How many fit: one for nothing spare, every block for plenty, and exactly k for
        // k's cost with the allocator's share.
        assert_eq!(t.graphs_that_fit(30, 0), 1);
        assert_eq!(t.graphs_that_fit(30, u64::MAX / 4), 30);
        let cost = |k| (t.activation_bytes(30, k) - t.activation_bytes(30, 0)) * 6 / 5;
        assert_eq!(t.graphs_that_fit(30, cost(10)), 10);
        assert_eq!(t.graphs_that_fit(30, cost(10) - 1), 9);
    }
}

#[test]
fn a_blocks_graph_holds_no_attention_scores_on_any_device() {
    // The chunked training attention keeps no `[mb, heads, T, T]` scores: a block's graph grows
    // with T, on every placement and dtype.
    let graph = |seq_len, e, placement| {
        let q = QLoraSettings { seq_len, micro_batch_size: 1, ..QLoraSettings::paper() };
        Training::new(&LLAMA2_70B, &q, e, placement).unwrap().block_graph_bytes()
    };
    for (e, placement) in [(2, Placement::Cuda), (4, Placement::Cpu), (2, Placement::Cpu)] {
        assert_eq!(graph(4096, e, placement), 2 * graph(2048, e, placement), "{placement:?}, {e} bytes");
    }
    // The paper's step at seq 2048, micro-batch 1, holds one block's graph of ~2.1 GiB on an
    // H200; the composed ops' 13 copies of the scores added 6.5 GiB.
    assert!(graph(2048, 2, Placement::Cuda) < 5 << 29, "{}", gib(graph(2048, 2, Placement::Cuda)));
}

//! Tests of [`super::Pipeline`]: held models, streamed scoring, the state cache, heartbeats.

use super::*;
use crate::eval::c4_loss;
use crate::heal::HealConfig;
use crate::prune::PruneSpec;

#[test]
fn a_non_finite_metric_fails_the_job_instead_of_becoming_a_result() {
    let mut report = EvalReport::new(Task::C4Loss);
    (report.n, report.loss, report.normalized_loss) = (4, Some(3.5), Some(0.3));
    let rows = result_rows(Task::C4Loss, &report).unwrap();
    assert_eq!(rows.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>(), ["loss", "normalized_loss", "n"]);
    report.loss = Some(f64::NAN);
    let e = result_rows(Task::C4Loss, &report).unwrap_err();
    assert_eq!((e.kind(), e.is_retryable()), ("not_finite", false));
    assert!(e.to_string().contains("c4-loss loss came out NaN on 4 items"), "{e}");
}

#[test]
fn loss_tasks_start_at_first_doc() {
    let model =
        Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.jsonl");
    let docs = ["The first document.", "A second one, longer than the first.", "Third: held out.", "Fourth."];
    std::fs::write(&path, docs.map(|d| format!("{{\"text\": \"{d}\"}}\n")).concat()).unwrap();
    let task = |first_doc| EvalSpec { limit: Some(1), seq_len: 16, first_doc, ..EvalSpec::new(Task::C4Loss, &path) };
    let run = |spec: &EvalSpec| eval::run(&model, spec, &mut |_, _| {}).map_err(|e| eval_failure(spec, e));
    let held_out = run(&task(2)).unwrap();
    let direct = c4_loss::evaluate(&model, &[docs[2].to_string()], 16, 8, &mut |_| {}).unwrap();
    assert_eq!((held_out.n, held_out.loss), (1, direct.loss));
    assert_ne!(run(&task(0)).unwrap().loss, direct.loss, "0 starts at document 0");
    let f = run(&task(4)).unwrap_err();
    assert_eq!((f.kind(), f.is_retryable()), ("data", false));
    assert!(f.to_string().contains("none from document 4 on; lower `first_doc`"), "{f}");
}

#[test]
fn a_score_job_on_a_model_larger_than_the_memory_budget_runs_layer_by_layer() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let c4 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/c4");
    let data = std::env::var_os("PRUNESWEEP_DATA").map_or(c4, |d| PathBuf::from(d).join("c4"));
    let spec =
        ScoreSpec { data: data.join("c4-en-train.00000-of-01024.first1000.jsonl"), samples: 4, seq_len: 16, batch: 2 };
    let job = Job {
        id: 1,
        key: "k".into(),
        model: fixtures.join("tiny-llama").display().to_string(),
        dtype: None,
        work: Work::Score(spec),
    };
    let roots = || Roots::new(dir.path(), std::slice::from_ref(&fixtures), std::slice::from_ref(&data)).unwrap();
    let mut whole = Pipeline::new(Device::Cpu, dir.path().into(), roots());
    let want = whole.run(&job, &Progress::default()).unwrap();
    assert_eq!(whole.held_models().len(), 1, "loaded whole, and kept");
    let mut small = Pipeline::new(Device::Cpu, dir.path().into(), roots()).with_memory_budget(Some(1 << 10));
    let got = small.run(&job, &Progress::default()).unwrap();
    assert!(small.held_models().is_empty(), "streamed: nothing loaded to keep");
    assert_eq!(got.num_layers, want.num_layers);
    assert_eq!(got.distances, want.distances, "the same table, to the bit");
}

#[test]
fn a_qlora_cell_loads_its_base_as_nf4_and_heals_to_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let docs = dir.path().join("docs.jsonl");
    let text = "The quick brown fox jumps over the lazy dog, again and again, for as long as it takes. ";
    std::fs::write(&docs, format!("{{\"text\": \"{}\"}}\n", text.repeat(12)).repeat(6)).unwrap();
    let config =
        HealConfig { steps: 2, batch: 2, micro_batch: 1, seq_len: 16, rank: 4, warmup: 1, ..Default::default() };
    let cell = Cell {
        prune: PruneSpec { method: prune::Method::Deepest, amount: prune::Amount::N(1) },
        distances: None,
        influence: None,
        heal: Some(HealSpec { data: docs.clone(), first_doc: 0, config }),
        eval: vec![EvalSpec { limit: Some(2), seq_len: 16, first_doc: 4, ..EvalSpec::new(Task::C4Loss, &docs) }],
    };
    let model = fixtures.join("tiny-llama").display().to_string();
    let job =
        Job { id: 1, key: "cell".into(), model: model.clone(), dtype: None, work: Work::Cell(Box::new(cell.clone())) };
    let roots = |work: &Path| Roots::new(work, std::slice::from_ref(&fixtures), &[dir.path().into()]).unwrap();

    let work = dir.path().join("served");
    let mut served = Pipeline::new(Device::Cpu, work.clone(), roots(&work));
    let got = served.run(&job, &Progress::default()).unwrap();
    assert!(served.loaded.as_ref().unwrap().nf4, "the held base is the NF4 one");
    // An unhealed job after it gets the dense model again, in its place.
    let baseline = Job { work: Work::Baseline(cell.eval.clone()), ..job.clone() };
    served.run(&baseline, &Progress::default()).unwrap();
    assert!(!served.loaded.as_ref().unwrap().nf4);
    assert_eq!(served.held_models().len(), 1, "one model held at a time");

    // The earlier way: the dense model, cut, then quantized by the trainer.
    let work = dir.path().join("dense");
    let reference = Pipeline::new(Device::Cpu, work.clone(), roots(&work));
    let mut dense = Model::load(Path::new(&model), &Device::Cpu).unwrap();
    let mut want = JobOutput::default();
    prune_model(&cell, &mut dense, &mut want).unwrap();
    reference.heal(&job, cell.heal.as_ref().unwrap(), &mut dense, &Progress::default(), &mut want).unwrap();
    evaluate(&cell.eval, &dense, &Progress::default(), &mut want).unwrap();
    assert_eq!(got.layers_dropped, want.layers_dropped);
    assert_eq!(got.results, want.results, "the same losses, to the bit");
}

#[test]
fn unhealed_cells_start_from_the_baselines_states_with_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let docs = dir.path().join("docs.jsonl");
    let lines: String = (0..4)
        .map(|i| format!("{{\"text\": \"Document {i}: the quick brown fox jumps over the lazy dog {i} times.\"}}\n"))
        .collect();
    std::fs::write(&docs, lines).unwrap();
    let eval = vec![EvalSpec { limit: Some(4), seq_len: 24, batch: 2, ..EvalSpec::new(Task::C4Loss, &docs) }];
    let model = fixtures.join("tiny-llama").display().to_string();
    let job = |key: &str, work: Work| Job { id: 1, key: key.into(), model: model.clone(), dtype: None, work };
    let cell = |method, n| {
        let prune = PruneSpec { method, amount: prune::Amount::N(n) };
        Work::Cell(Box::new(Cell { prune, distances: None, influence: None, heal: None, eval: eval.clone() }))
    };
    let jobs = [
        job("baseline", Work::Baseline(eval.clone())),
        job("deepest-1", cell(prune::Method::Deepest, 1)),
        job("deepest-2", cell(prune::Method::Deepest, 2)),
    ];
    let roots = Roots::new(dir.path(), std::slice::from_ref(&fixtures), &[dir.path().into()]).unwrap();
    let run_all = |p: &mut Pipeline| jobs.iter().map(|j| p.run(j, &Progress::default()).unwrap()).collect::<Vec<_>>();
    let mut kept = Pipeline::new(Device::Cpu, dir.path().into(), roots.clone());
    let got = run_all(&mut kept);
    let stats = kept.loaded.as_ref().unwrap().model.decoder.state_cache().stats();
    // tiny-llama's 4 blocks: deepest-1 drops block 2 (the last one is kept), deepest-2 blocks 1-2.
    assert_eq!((stats.hits, stats.blocks_skipped), (4, 2 * 2 + 2), "both cells' 2 passes started at their cut");
    let want = run_all(&mut Pipeline::new(Device::Cpu, dir.path().into(), roots).with_state_cache(0));
    for (got, want) in got.iter().zip(&want) {
        assert_eq!(got.layers_dropped, want.layers_dropped);
        assert_eq!(got.results, want.results, "the same losses, to the bit");
    }
}

#[test]
fn evaluations_of_a_model_larger_than_the_memory_budget_read_blocks_per_pass_with_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let docs = dir.path().join("docs.jsonl");
    let lines: String =
        (0..3).map(|i| format!("{{\"text\": \"Document {i}: a fox, a dog, {i} jumps and a long rest.\"}}\n")).collect();
    std::fs::write(&docs, lines).unwrap();
    let eval = vec![EvalSpec { limit: Some(3), seq_len: 24, batch: 2, ..EvalSpec::new(Task::C4Loss, &docs) }];
    let model = fixtures.join("tiny-llama");
    let job =
        |key: &str, work: Work| Job { id: 1, key: key.into(), model: model.display().to_string(), dtype: None, work };
    let cell = Cell {
        prune: PruneSpec { method: prune::Method::Deepest, amount: prune::Amount::N(1) },
        distances: None,
        influence: None,
        heal: None,
        eval: eval.clone(),
    };
    let jobs = [job("baseline", Work::Baseline(eval.clone())), job("deepest-1", Work::Cell(Box::new(cell)))];
    let roots = Roots::new(dir.path(), std::slice::from_ref(&fixtures), &[dir.path().into()]).unwrap();
    let run_all = |p: &mut Pipeline| jobs.iter().map(|j| p.run(j, &Progress::default()).unwrap()).collect::<Vec<_>>();
    let want = run_all(&mut Pipeline::new(Device::Cpu, dir.path().into(), roots.clone()));
    let weights = streamed::checkpoint_bytes(&model, DType::F32).unwrap().unwrap();
    // No block held (a budget of 1 KiB), some (half the weights for blocks), all (80% of them).
    for budget in [1 << 10, weights / 8 * 5, weights] {
        let mut small = Pipeline::new(Device::Cpu, dir.path().into(), roots.clone()).with_memory_budget(Some(budget));
        let got = run_all(&mut small);
        assert!(small.held_models().is_empty(), "offloaded: nothing kept for the next job");
        for (got, want) in got.iter().zip(&want) {
            assert_eq!((got.num_layers, &got.layers_dropped), (want.num_layers, &want.layers_dropped));
            assert_eq!(got.results, want.results, "the same losses, to the bit (budget {budget})");
        }
    }
}

#[test]
fn heartbeats_carry_the_phases_token_rate() {
    let p = Progress::default();
    p.set("score", 0.0);
    assert_eq!(p.tokens_per_second(), None, "no tokens counted yet");
    p.set_tokens(0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.set_tokens(100);
    let rate = p.tokens_per_second().unwrap();
    assert!(rate > 0.0 && rate <= 100.0 / 0.02, "{rate}");
    p.set("score", 0.5);
    assert!(p.tokens_per_second().is_some(), "the same phase keeps its count");
    p.set("eval", 0.0);
    assert_eq!(p.tokens_per_second(), None, "a new phase starts over");
}

#[test]
fn a_missing_model_is_a_non_retryable_load_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pipeline::new(Device::Cpu, dir.path().into(), Roots::new(dir.path(), &[], &[]).unwrap());
    let model = dir.path().join("no-such-model").display().to_string();
    let job = Job { id: 1, key: "k".into(), model, dtype: None, work: Work::Baseline(Vec::new()) };
    let f = p.run(&job, &Progress::default()).unwrap_err();
    assert_eq!((f.kind(), f.is_retryable()), ("model_load", false), "{f}");
}

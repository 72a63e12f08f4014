//! The memory model (`prunesweep_proto::memory`) against measured peaks: a real coordinator (in
//! this process, SQLite) and a real `worker serve` process run one heal cell — deepest cut,
//! QLoRA on an NF4 base for one update, then c4-loss — and the job's peak resident memory (the
//! largest of the peaks the worker reports with its phases, `PhaseTiming.peak_host_bytes`: the
//! process's `VmHWM`, reset as each phase starts) is compared with the model's CPU prediction for
//! that job, which `coordinator plan` shows; each phase's peak is printed beside it.
//!
//! - tiny-llama: the process's own memory, from which `CPU_RUNTIME_BYTES` was taken (a
//!   calibration, not a check);
//! - SmolLM2-135M (the real GGUF) and a wider random llama: each within ±15% of the prediction;
//!   a deep, narrow random llama trained on long sequences (activations dominate), likewise;
//! - `#[ignore]`d (minutes, ~10 GiB of memory, 4.5 GB of disk): Llama-2-70B's layer shapes with 2
//!   of its 80 layers, random, through load → NF4 → one healing step → eval: the peak must not
//!   exceed the prediction by more than 15%. `scripts/memory-model.sh` runs everything and writes
//!   `results/memory-model.txt`.
//!
//! Linux only (`/proc`).

mod common;

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{c4_sample, fixture, shared_data, smollm2_gguf};
use prunesweep_coordinator::job::JobKind;
use prunesweep_coordinator::store::{JobStore, SqliteStore};
use prunesweep_coordinator::sweep::{JobMemory, SweepSpec};
use prunesweep_coordinator::testing::{start_server, wait_until_done};
use prunesweep_proto::memory::{gib, MemoryEstimate, ModelShape, Placement, Training};
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::QLoraSettings;
use prunesweep_proto::v1::SubmitSweepRequest;

/// One measurement at a time: the processes' peaks are their own, but two at once would compete
/// for the machine's memory and cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How the cell heals and evaluates.
struct Job {
    /// The model's `dtype` in the sweep file: `f32`, or `bf16` for the stock-op path CUDA runs.
    dtype: &'static str,
    rank: u32,
    micro_batch: u32,
    seq_len: u32,
    eval_seq_len: u32,
}

/// What a run measured, against what the model predicted.
struct Run {
    predicted: MemoryEstimate,
    /// The job's peak: the largest of its phases' peaks, as the worker reported them.
    measured: u64,
    /// Each phase's reported peak.
    phases: Vec<(String, u64)>,
    /// Whether the worker was made to read the model's blocks per pass: then the prediction is
    /// the least the job runs in (`least_device_bytes`), not the whole-model peak.
    offloaded: bool,
}

impl Run {
    /// The predicted peak this run is held to.
    fn predicted_bytes(&self) -> u64 {
        if self.offloaded {
            self.predicted.least_device_bytes
        } else {
            self.predicted.device_bytes
        }
    }

    /// `measured / predicted − 1`.
    fn error(&self) -> f64 {
        self.measured as f64 / self.predicted_bytes() as f64 - 1.0
    }

    fn report(&self, what: &str) {
        let mib = |b: u64| format!("{:.0} MiB", b as f64 / f64::from(1u32 << 20));
        let parts: Vec<String> = self.predicted.parts.iter().map(|(p, b)| format!("{p} {}", mib(*b))).collect();
        let peak = if self.offloaded {
            format!("least, blocks read per pass; whole: {}", mib(self.predicted.device_bytes))
        } else {
            format!("peak in {}: {}", self.predicted.phase, parts.join(", "))
        };
        let phases: Vec<String> = self.phases.iter().map(|(p, b)| format!("{p} {}", mib(*b))).collect();
        eprintln!(
            "memory-model {what}: predicted {} ({peak}); measured {} (phases: {}); measured/predicted − 1 = {:+.1}%",
            mib(self.predicted_bytes()),
            mib(self.measured),
            phases.join(", "),
            100.0 * self.error()
        );
    }
}

/// Runs the heal cell of `job` on `model` (a path under `model_root`) in a fresh coordinator and
/// `worker serve --keep-graphs 0`, and returns the prediction and the worker's peak.
async fn run_cell(tag: &str, model: &Path, model_root: &Path, job: &Job) -> Run {
    // Every block recomputed: what the prediction counts (a worker's default keeps the top
    // blocks' graphs in whatever more memory is free).
    run_cell_with(tag, model, model_root, job, &["--keep-graphs", "0"]).await
}

/// [`run_cell`] with `worker serve` given `worker_args`.
async fn run_cell_with(tag: &str, model: &Path, model_root: &Path, job: &Job, worker_args: &[&str]) -> Run {
    let c4 = c4_sample().display().to_string();
    let yaml = format!(
        "name: mem-{tag}\nmodels: [{{name: m, path: {model}, dtype: {dtype}}}]\nmethods: [deepest]\nn: [1]\nbaseline: false\n\
         heal:\n  - name: q\n    qlora: {{rank: {rank}, steps: 1, batch_size: {mb}, micro_batch_size: {mb}, \
         seq_len: {seq}, data: {c4}}}\n\
         eval:\n  - {{task: c4-loss, path: {c4}, limit: 8, seq_len: {eval_seq}, first_doc: 900, batch_size: 4}}\n",
        model = model.display(),
        dtype = job.dtype,
        rank = job.rank,
        mb = job.micro_batch,
        seq = job.seq_len,
        eval_seq = job.eval_seq_len,
    );
    run_sweep(tag, yaml, model_root, JobKind::Cell, worker_args).await
}

/// Runs the sweep `yaml` (named `mem-{tag}`) in a fresh coordinator and a `worker serve` given
/// `worker_args`, and returns the prediction for its first job of `kind` and the worker's peak.
async fn run_sweep(tag: &str, yaml: String, model_root: &Path, kind: JobKind, worker_args: &[&str]) -> Run {
    let planned = SweepSpec::parse(&yaml, "memory.yaml").unwrap().expand();
    let cell = planned.iter().find(|j| j.spec.kind == kind).expect("one job of the kind");
    let JobMemory::Predicted { cpu, .. } = &cell.memory else { panic!("no prediction: {:?}", cell.memory) };
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(&dir.path().join("c.sqlite").display().to_string()).await.unwrap();
    // Leases of a minute: loading the 70B-shaped checkpoint on a busy machine can outlast the
    // harness's 3 s ones before the first heartbeat.
    let config = prunesweep_coordinator::Config::for_lease_ttl(Duration::from_secs(60));
    let store = std::sync::Arc::new(store);
    let (url, server) = start_server(store.clone(), config).await;
    let mut client = SweepServiceClient::connect(url.clone()).await.unwrap();
    client.submit_sweep(SubmitSweepRequest { yaml, file_name: None }).await.unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["serve", "--coordinator", &url, "--lease-wait-secs", "1", "--name", tag])
        .args(worker_args)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .arg("--model-root")
        .arg(model_root)
        .arg("--data-root")
        .arg(shared_data())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start worker serve");
    let status = wait_until_done(&url, &format!("mem-{tag}"), Duration::from_secs(1800)).await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    server.shutdown().await;
    assert_eq!(status.succeeded as usize, planned.len(), "a job did not succeed: {status:?}");
    let results = store.results(&format!("mem-{tag}")).await.unwrap();
    let job = results.iter().map(|r| &r.job).find(|j| j.kind == kind).expect("the job of the kind");
    let phases: Vec<(String, u64)> = job
        .timings
        .iter()
        .map(|t| (t.phase.clone(), t.peak_host_bytes.unwrap_or_else(|| {
            panic!("phase {} reported no peak: the memory tests need Linux ≥ 4.0 with /proc/self/clear_refs writable", t.phase)
        })))
        .collect();
    let measured = phases.iter().map(|(_, b)| *b).max().expect("the job reported phases");
    // A memory budget below the model makes the worker read its blocks per pass.
    let offloaded = worker_args.contains(&"--memory-budget-gib");
    Run { predicted: cpu.clone(), measured, phases, offloaded }
}

/// Writes a random llama of `shape` as an HF folder (config, one safetensors file with the
/// weights in `dtype` — `F32` or `BF16` — streamed, and tiny-llama's tokenizer).
fn write_random_llama(dir: &Path, shape: &ModelShape, dtype: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("num_hidden_layers", shape.layers),
        ("hidden_size", shape.hidden),
        ("intermediate_size", shape.intermediate),
        ("num_attention_heads", shape.heads),
        ("num_key_value_heads", shape.kv_heads),
        ("head_dim", shape.head_dim),
        ("vocab_size", shape.vocab),
        ("max_position_embeddings", 4096),
    ] {
        config[k] = v.into();
    }
    config["tie_word_embeddings"] = shape.tied_embeddings.into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let (h, i, v) = (shape.hidden as u64, shape.intermediate as u64, shape.vocab as u64);
    let (q, kv) = ((shape.heads * shape.head_dim) as u64, (shape.kv_heads * shape.head_dim) as u64);
    let mut tensors: Vec<(String, Vec<u64>, bool)> = vec![("model.embed_tokens.weight".into(), vec![v, h], false)];
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        for (name, dims) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            tensors.push((format!("{p}.{name}.weight"), dims.to_vec(), false));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{norm}.weight"), vec![h], true));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h], true));
    if !shape.tied_embeddings {
        tensors.push(("lm_head.weight".into(), vec![v, h], false));
    }
    let width = if dtype == "BF16" { 2 } else { 4 };
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dims, _) in &tensors {
        let bytes = dims.iter().product::<u64>() * width;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": dims, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_string(&header).unwrap();
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = BufWriter::with_capacity(1 << 22, std::fs::File::create(dir.join("model.safetensors")).unwrap());
    out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    out.write_all(header.as_bytes()).unwrap();
    // xorshift64: uniform in ±0.02 (std ≈ 0.012), so that two random blocks stay finite.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for (_, dims, is_norm) in &tensors {
        let mut left = dims.iter().product::<u64>();
        while left > 0 {
            let n = left.min(1 << 18);
            buf.clear();
            for _ in 0..n {
                let x = if *is_norm {
                    1.0f32
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                };
                if width == 2 {
                    buf.extend_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes());
                } else {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
            out.write_all(&buf).unwrap();
            left -= n;
        }
    }
    out.flush().unwrap();
}

/// A wide random llama: 6 layers of width 1024 (FFN 4096), a 32k vocabulary, untied.
const WIDE: ModelShape = ModelShape {
    layers: 6,
    hidden: 1024,
    intermediate: 4096,
    heads: 16,
    kv_heads: 4,
    head_dim: 64,
    vocab: 32000,
    tied_embeddings: false,
    gated_mlp: true,
};

fn check(what: &str, run: &Run) {
    run.report(what);
    assert!(
        run.error().abs() <= 0.15,
        "{what}: measured {} against predicted {}",
        gib(run.measured),
        gib(run.predicted_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_llama_shows_the_process_own_memory() {
    let _one = ONE_AT_A_TIME.lock().await;
    let job = Job { dtype: "f32", rank: 8, micro_batch: 2, seq_len: 64, eval_seq_len: 64 };
    let run = run_cell("tiny", &fixture("tiny-llama"), &fixture(""), &job).await;
    check("tiny-llama (calibrates CPU_RUNTIME_BYTES)", &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_heal_cell_peaks_where_the_model_says() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gguf = smollm2_gguf().canonicalize().unwrap();
    let job = Job { dtype: "f32", rank: 64, micro_batch: 2, seq_len: 256, eval_seq_len: 128 };
    let run = run_cell("smollm2", &gguf, gguf.parent().unwrap(), &job).await;
    check("SmolLM2-135M GGUF, heal r64 mb2 seq256 + c4-loss 4×128", &run);
}

/// The same cell with every block's graph kept (`--keep-graphs all`): the prediction plus what
/// the memory model says the kept graphs add (`Training::activation_bytes`), the figure
/// `--keep-graphs fit` sizes them by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_heal_cell_with_every_graph_kept_peaks_where_the_model_says() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gguf = smollm2_gguf().canonicalize().unwrap();
    let job = Job { dtype: "f32", rank: 64, micro_batch: 2, seq_len: 256, eval_seq_len: 128 };
    let mut run = run_cell_with("smollm2-all", &gguf, gguf.parent().unwrap(), &job, &["--keep-graphs", "all"]).await;
    let q = QLoraSettings { rank: 64, micro_batch_size: 2, seq_len: 256, ..QLoraSettings::paper() };
    let training = Training::new(&ModelShape::SMOLLM2_135M, &q, 4, Placement::Cpu).unwrap();
    let kept = 29; // n = 1 cut
    let graphs = (training.activation_bytes(kept, kept) - training.activation_bytes(kept, 0)) * 6 / 5;
    run.predicted.parts.push(("kept graphs", graphs));
    run.predicted.device_bytes += graphs;
    check("SmolLM2-135M GGUF, heal r64 mb2 seq256 with every graph kept + c4-loss 4×128", &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_random_llama_peaks_where_the_model_says() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(&dir.path().join("wide"), &WIDE, "F32");
    let job = Job { dtype: "f32", rank: 16, micro_batch: 1, seq_len: 128, eval_seq_len: 128 };
    let run = run_cell("wide", &dir.path().join("wide"), dir.path(), &job).await;
    check("random llama 6×1024 (ffn 4096, vocab 32000), heal r16 mb1 seq128 + c4-loss 4×128", &run);
}

/// The wide llama's baseline on a worker told it has 64 MiB (a tenth of the model): the blocks are
/// read from the checkpoint for each pass, and the peak is the least the memory model says the
/// job runs in (the runtime, embedding and LM head, two blocks, the evaluation), under the whole
/// model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_larger_than_the_budget_peaks_at_the_least_the_model_says() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("wide");
    write_random_llama(&model, &WIDE, "F32");
    let c4 = c4_sample().display().to_string();
    let yaml = format!(
        "name: mem-offload\nmodels: [{{name: m, path: {}}}]\nmethods: [deepest]\nn: [1]\n\
         eval:\n  - {{task: c4-loss, path: {c4}, limit: 8, seq_len: 128, first_doc: 900, batch_size: 4}}\n",
        model.display()
    );
    let run = run_sweep("offload", yaml, dir.path(), JobKind::Baseline, &["--memory-budget-gib", "0.0625"]).await;
    let what = "random llama 6×1024 (ffn 4096, vocab 32000), baseline c4-loss 4×128, blocks read per pass";
    run.report(what);
    // Never more than 15% over the least figure (what leasing compares with a worker's free
    // memory); it may sit further under it, on the safe side: −4% on an Intel Xeon and −10% on a
    // Zen 4 with glibc's arena per thread, −18% and −19% on the Zen 4 with `worker serve`'s one
    // arena (allocator.rs), where the blocks read per pass reuse memory the sweep's other job freed.
    assert!(run.error() <= 0.15, "{what}: {} against the least {}", gib(run.measured), gib(run.predicted_bytes()));
    assert!(run.error() >= -0.3, "{what}: {} far under the least {}", gib(run.measured), gib(run.predicted_bytes()));
    // Two of the six blocks held at a time (one running, the next being read): the peak stays
    // more than two blocks' bytes under the whole model's.
    let block = WIDE.block_params() * 4;
    assert!(run.measured + 2 * block < run.predicted.device_bytes, "{}", gib(run.measured));
}

/// A deep, narrow llama: on long sequences its activations dominate its weights.
const DEEP: ModelShape = ModelShape {
    layers: 16,
    hidden: 256,
    intermediate: 704,
    heads: 8,
    kv_heads: 8,
    head_dim: 32,
    vocab: 8000,
    tied_embeddings: true,
    gated_mlp: true,
};

/// Activations dominate here. Until the CPU's training norm, rotary and SiLU·up became single ops
/// with their own backward passes (`model/rms_norm.rs`, `rope.rs`, `silu_mul.rs`), the peak sat a
/// constant 66–68 MiB above the prediction (395 against 343 MiB, +15.2%: the composed ops'
/// temporaries that autograd kept in the block's graph); since then six runs peaked at 316–388
/// MiB against 341 (−7.5% to +13.8%: glibc's arenas move it between runs;
/// `results/memory-model.txt`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_narrow_llama_on_long_sequences_peaks_where_the_model_says() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(&dir.path().join("deep"), &DEEP, "F32");
    let job = Job { dtype: "f32", rank: 8, micro_batch: 4, seq_len: 512, eval_seq_len: 512 };
    let run = run_cell("deep", &dir.path().join("deep"), dir.path(), &job).await;
    check("random llama 16×256 (tied, vocab 8000), heal r8 mb4 seq512 + c4-loss 4×512", &run);
}

/// The same narrow llama on the stock-op path CUDA runs (bf16 on the CPU), at a length where the
/// attention scores would be most of a block's graph: 13 copies of `[2, 8, 1024, 1024]` in bf16,
/// 416 MiB a block, which the composed ops kept until the backward pass. The chunked training
/// attention (`model/attention.rs`) keeps none on any device, and the prediction counts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_narrow_llama_in_bf16_keeps_no_attention_scores() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(&dir.path().join("deep16"), &DEEP, "BF16");
    let job = Job { dtype: "bf16", rank: 8, micro_batch: 2, seq_len: 1024, eval_seq_len: 256 };
    let run = run_cell("deep16", &dir.path().join("deep16"), dir.path(), &job).await;
    run.report("random llama 16×256 (tied, vocab 8000), bf16, heal r8 mb2 seq1024 + c4-loss 4×256");
    // Held from above: the stock path's cross-entropy is counted at ten copies of the logits
    // (312 MiB here), more than the CPU keeps at once (the whole process peaked at 385 MiB
    // against 544 predicted, 2026-12-02), and the prediction stays an upper bound for the GPU,
    // whose allocator is not measured. A graph still holding one block's scores would peak
    // 416 MiB higher, past the bound.
    assert!(run.error() <= 0.15, "{} against predicted {}", gib(run.measured), gib(run.predicted_bytes()));
    assert!(run.error() >= -0.5, "{}: far below the prediction {}", gib(run.measured), gib(run.predicted_bytes()));
}

/// Item 5 of issue #14: Llama-2-70B's layers on the CPU path, healed (NF4 base), then evaluated
/// with its blocks read from the checkpoint per pass. `cargo test -p prunesweep-worker
/// --test memory -- --ignored --nocapture` (or `scripts/memory-model.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes and ~10 GiB of memory: run by scripts/memory-model.sh"]
async fn llama2_70b_layers_heal_within_the_prediction() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let shape = ModelShape { layers: 2, ..ModelShape::LLAMA2_70B };
    let t = std::time::Instant::now();
    write_random_llama(&dir.path().join("l70"), &shape, "BF16");
    eprintln!("memory-model: wrote the 2-layer 70B-shaped checkpoint in {:.0} s", t.elapsed().as_secs_f64());
    let job = Job { dtype: "f32", rank: 64, micro_batch: 1, seq_len: 128, eval_seq_len: 64 };
    let run = run_cell("l70", &dir.path().join("l70"), dir.path(), &job).await;
    run.report("Llama-2-70B layer shapes, 2 of 80 layers (bf16 file, f32 compute), heal r64 mb1 seq128 + c4-loss 4×64");
    assert!(
        run.error() <= 0.15,
        "peak {} over the prediction {} by more than 15%",
        gib(run.measured),
        gib(run.predicted.device_bytes)
    );
    // The same checkpoint's baseline on a worker told it has 1 GiB: no block held, each read from
    // the file for every sixteen passes; the peak is the least the job runs in.
    let c4 = c4_sample().display().to_string();
    let yaml = format!(
        "name: mem-l70-offload\nmodels: [{{name: m, path: {}}}]\nmethods: [deepest]\nn: [1]\n\
         eval:\n  - {{task: c4-loss, path: {c4}, limit: 8, seq_len: 64, first_doc: 900, batch_size: 4}}\n",
        dir.path().join("l70").display()
    );
    let run = run_sweep("l70-offload", yaml, dir.path(), JobKind::Baseline, &["--memory-budget-gib", "1"]).await;
    check("Llama-2-70B layer shapes, 2 of 80 layers, baseline c4-loss 4×64, blocks read per pass", &run);
}

//! The memory model: a job's predicted peak device and host memory, from the model's shape and
//! the job's settings, without loading anything.
//!
//! Shared by the coordinator (`coordinator plan` shows it; leasing gives a job only to a worker
//! whose reported free memory holds it) and the worker. It describes what `worker serve`'s job
//! pipeline (`worker/src/serve/pipeline.rs`) holds, phase by phase:
//!
//! - **load**: the whole model, dense, in its dtype (f32 on a CPU, bf16 on CUDA), kept after the
//!   job for the next one of the same model — or, for a QLoRA cell (NF4 base), every layer's
//!   projections in NF4, quantized one tensor at a time as they are read, and only the rest
//!   (embedding, norms, LM head) dense: the dense model is never held (`Model::load_nf4`), and the
//!   NF4 one is kept for the next QLoRA cell in its place;
//! - **score**: the dense model plus one calibration batch's forward pass — or, when that is
//!   larger, the layer-streamed pass the worker switches to (one layer plus every batch's residual
//!   stream), whichever is smaller;
//! - **heal**: the loaded model (for QLoRA, all its layers in NF4: the cut layers stay in the
//!   held copy; without quantization, the dense model), the adapters with their gradients and
//!   AdamW moments (f32), and one micro-batch's training activations with every block recomputed
//!   (`heal/gradients.rs`): every block's input kept, one block's graph at a time, and the logits
//!   with their gradient (on a CPU in f32, where the head and the loss are one op, a chunk of
//!   logits, [`TRAINING_LOGIT_VALUES`], and the head input's gradient). That is the least a heal
//!   runs in; a worker with more free memory keeps the top blocks' graphs in it instead of
//!   recomputing them ([`Training::graphs_that_fit`]);
//! - **eval**: the model as healing left it (NF4 base and adapters, moments dropped) plus one
//!   evaluation batch's forward pass, its scored logits and, for MMLU, the few-shot prefix's
//!   key/value cache.
//!
//! The peak is the largest phase. Every term below says where its number comes from; the ones
//! that are not counted from the shapes (the process's own resident memory, the per-block
//! activation counts, the assumed prompt lengths of tasks without a `seq_len`) are constants here,
//! each with the measurement or assumption behind it. On a CPU worker device and host are the same
//! memory, so both figures are the whole process; on CUDA the host figure is the process's own
//! memory plus what passes through the host while loading.

use serde::{Deserialize, Serialize};

use crate::v1::{AdapterTargets, Dtype, EvalTask, EvalTaskKind, JobKind, JobSpec};

/// A decoder's shape: what the memory model needs to know of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Decoder blocks (`num_hidden_layers`).
    pub layers: u32,
    /// Residual width (`hidden_size`).
    pub hidden: u32,
    /// Feed-forward width (`intermediate_size`).
    pub intermediate: u32,
    /// Query heads (`num_attention_heads`).
    pub heads: u32,
    /// Key/value heads (`num_key_value_heads`; = `heads` without grouped-query attention).
    pub kv_heads: u32,
    /// Width of one head (`head_dim`, usually `hidden / heads`).
    pub head_dim: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// Whether the LM head is the embedding matrix (`tie_word_embeddings`).
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Whether the MLP is gated (gate, up, down: every family but Phi-2, whose fc1/fc2 are two).
    #[serde(default = "gated_by_default")]
    pub gated_mlp: bool,
}

fn gated_by_default() -> bool {
    true
}

impl ModelShape {
    /// Llama-2-70B (`config.json` of meta-llama/Llama-2-70b-hf): the paper's largest model, whose
    /// predictions the README states for one H200 and whose layer shapes the memory tests run.
    pub const LLAMA2_70B: ModelShape = ModelShape {
        layers: 80,
        hidden: 8192,
        intermediate: 28672,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        vocab: 32000,
        tied_embeddings: false,
        gated_mlp: true,
    };

    /// SmolLM2-135M(-Instruct) (`config.json` of HuggingFaceTB/SmolLM2-135M): the model the
    /// project's real runs and measurements use.
    pub const SMOLLM2_135M: ModelShape = ModelShape {
        layers: 30,
        hidden: 576,
        intermediate: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49152,
        tied_embeddings: true,
        gated_mlp: true,
    };

    /// One block's projections as (rows, columns): q, k, v, o, then gate, up, down (fc1, fc2
    /// without a gated MLP).
    pub fn block_projections(&self) -> Vec<(u64, u64)> {
        let (h, i) = (u64::from(self.hidden), u64::from(self.intermediate));
        let (q, kv) = (self.q_width(), self.kv_width());
        let mut out = vec![(q, h), (kv, h), (kv, h), (h, q)];
        if self.gated_mlp {
            out.push((i, h));
        }
        out.extend([(i, h), (h, i)]);
        out
    }

    /// Parameters of one block's projections.
    pub fn block_projection_params(&self) -> u64 {
        self.block_projections().iter().map(|(r, c)| r * c).sum()
    }

    /// Parameters of one block: its projections and two norms.
    pub fn block_params(&self) -> u64 {
        self.block_projection_params() + 2 * u64::from(self.hidden)
    }

    /// Parameters of the whole model: embedding, blocks (projections and two norms), final norm,
    /// and the LM head unless tied.
    pub fn params(&self) -> u64 {
        let (h, v) = (u64::from(self.hidden), u64::from(self.vocab));
        let head = if self.tied_embeddings { 0 } else { v * h };
        v * h + head + h + u64::from(self.layers) * self.block_params()
    }

    fn q_width(&self) -> u64 {
        u64::from(self.heads) * u64::from(self.head_dim)
    }

    fn kv_width(&self) -> u64 {
        u64::from(self.kv_heads) * u64::from(self.head_dim)
    }

    /// The checks a shape from a config file or a sweep file must pass.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let fields = [
            ("layers", self.layers),
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("vocab", self.vocab),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(MemoryError::Shape(format!("`{name}` is 0; every dimension of a model shape is positive")));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(MemoryError::Shape(format!(
                "`heads` ({}) is not a multiple of `kv_heads` ({})",
                self.heads, self.kv_heads
            )));
        }
        Ok(())
    }
}

/// What a prediction cannot be made from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemoryError {
    /// The shape is inconsistent (a zero dimension, heads not a multiple of kv heads).
    #[error("model shape: {0}")]
    Shape(String),
    /// A LoRA target module the memory model does not know the dimensions of.
    #[error(
        "adapter target `{0}` is not a module the memory model knows (q_proj, k_proj, v_proj, o_proj, gate_proj, \
         up_proj, down_proj, qkv_proj, gate_up_proj, dense, fc1, fc2)"
    )]
    UnknownModule(String),
}

/// Where a job runs: the worker's device kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A CPU worker: device memory is host memory; the default dtype is f32.
    Cpu,
    /// A CUDA worker: weights and activations on the GPU; the default dtype is bf16.
    Cuda,
}

impl Placement {
    /// Whether the worker's fused CPU kernels run here with values of `value_bytes` bytes: on a
    /// CPU in f32 (`model::kernels::fused_cpu`). Elsewhere (CUDA, bf16) candle's stock ops run,
    /// with their temporaries.
    fn fused_kernels(self, value_bytes: u64) -> bool {
        self == Placement::Cpu && value_bytes == 4
    }
}

/// A job's predicted peak memory, and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Peak bytes on the device (the whole process's on a CPU worker).
    pub device_bytes: u64,
    /// Peak bytes of host memory (the same as `device_bytes` on a CPU worker).
    pub host_bytes: u64,
    /// The phase the device peak falls in (`load`, `score`, `score-streamed`, `heal`, `eval`).
    pub phase: &'static str,
    /// The device peak's parts, largest first by construction order: (part, bytes).
    pub parts: Vec<(&'static str, u64)>,
    /// The least device memory the job runs in: `device_bytes`, or less for an evaluation
    /// (a baseline, or an unhealed cell) whose model does not fit the device,
    /// where the worker reads the blocks it cannot hold from the checkpoint for each pass
    /// (`worker/src/model/decoder.rs`, offloaded blocks): then the embedding, LM head, two blocks
    /// (one running, the next being read) and the evaluation's activations. What leasing compares with a worker's free memory.
    pub least_device_bytes: u64,
}

/// The worker process's own resident memory on a CPU: its binary and libraries, the thread pools,
/// the tokenizer and the data it reads. Measured: `worker serve` running a tiny-llama heal cell
/// (weights under 1 MiB) peaks at 29–31 MiB, of which ~4 MiB are its model, activations and
/// allocator slack as counted here (`worker/tests/memory.rs`, `results/memory-model.txt`).
pub const CPU_RUNTIME_BYTES: u64 = 26 << 20;

/// The same on a CUDA worker's host side, where the CUDA runtime and cuBLAS libraries are also
/// mapped. Not measured here (no GPU in CI); an allowance of 1 GiB.
pub const CUDA_HOST_RUNTIME_BYTES: u64 = 1 << 30;

/// A CUDA worker's device memory outside tensors: the context and cuBLAS workspaces. Not measured
/// here (no GPU in CI); NVIDIA's contexts take a few hundred MiB, so an allowance of 1 GiB.
pub const CUDA_CONTEXT_BYTES: u64 = 1 << 30;

/// Assumed prompt length of a BoolQ question (passage + question), tokens: BoolQ passages average
/// ~110 words, and long ones reach a few hundred; padded batches are as wide as their longest.
pub const BOOLQ_TOKENS: u64 = 512;

/// Assumed length of one MMLU few-shot example (a dev question, its four choices and the answer),
/// tokens; the prefix of a k-shot prompt is about `k` of these.
pub const MMLU_SHOT_TOKENS: u64 = 200;

/// Assumed length of one MMLU question with its choices (for cloze, the question alone).
pub const MMLU_QUESTION_TOKENS: u64 = 256;

/// Assumed length of one MMLU answer text (a cloze continuation), tokens.
pub const MMLU_CHOICE_TOKENS: u64 = 32;

/// Rows of logits the worker computes at once when it scores positions (`eval/mod.rs`): small
/// enough that a large vocabulary's logits stay small (512 × 49,152 f32 = 96 MiB; 311 MiB for
/// Qwen's 152k), large enough that the LM head's product stays efficient: each product packs the
/// whole head weight again, so at 128 rows C4 loss on SmolLM2 took 5.7 s where 512 take 4.4 s
/// (64 documents, 2 blocks kept, 2-core Intel Xeon).
pub const LOGIT_ROWS: u64 = 512;

/// Bytes of one value in a dtype.
fn width(dtype: Dtype, placement: Placement) -> u64 {
    match (dtype, placement) {
        (Dtype::F32, _) | (Dtype::Unspecified, Placement::Cpu) => 4,
        (Dtype::Bf16, _) | (Dtype::Unspecified, Placement::Cuda) => 2,
    }
}

/// NF4 bytes of an `n`-parameter matrix, counted as `model/nf4.rs` stores it: 4-bit codes (two
/// per byte), one int8 absmax per block of 64, one f32 scale per group of 256 absmax values, and
/// one f32 mean: ≈ 0.516 bytes per parameter.
pub fn nf4_bytes(n: u64) -> u64 {
    let blocks = n.div_ceil(64);
    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4
}

/// Per-token activation counts of one block's autograd graph while training, in units of the
/// widths named (hidden and intermediate; attention keeps no scores in the graph), counted from the
/// ops `decoder.rs` records: the block input's norm, q/k/v and their rotated copies, the attention
/// output and o, the residual sum, the second norm, gate, up, SiLU(gate)·up, down and the second
/// residual sum (an adapter's own temporaries are counted apart, per module); the backward pass
/// holds about as many gradients again while it walks the block. So: hidden-wide ~12,
/// intermediate-wide ~6 (gate, up, their product, SiLU, and two gradients).
const GRAPH_HIDDEN: u64 = 12;
/// See [`GRAPH_HIDDEN`].
const GRAPH_INTERMEDIATE: u64 = 6;

/// [`GRAPH_HIDDEN`] and [`GRAPH_INTERMEDIATE`] on the CPU's f32 path, where the norms, rotary,
/// SiLU·up and each adapted projection are single ops keeping only their outputs (as attention is
/// on every device):
/// hidden-wide ~8 (the norms, q and its rotated copy, k/v and theirs at a third each, the
/// attention output, o, the residual sums), intermediate-wide 3 (gate, up, SiLU(gate)·up), each
/// op's gradients freed as the backward pass walks on. Checked on the runs of
/// `worker/tests/memory.rs` after the LoRA product became one op (2026-12-01: the deep llama's
/// peak fell ~20% below the composed-op counts).
const FUSED_GRAPH_HIDDEN: u64 = 8;
/// See [`FUSED_GRAPH_HIDDEN`].
const FUSED_GRAPH_INTERMEDIATE: u64 = 3;
/// f32 copies of one chunk of scores alive in the chunked training attention (`TrainedAttention`
/// in `model/attention.rs`, every device), one chunk (at most [`score_chunk_values`]) at a time:
/// its backward pass holds at most the probabilities, `dP − rowsum(dO ⊙ O)`, their product and
/// one product operand's copy (three f32 copies and a half-size cast in bf16), rounded up.
///
/// Before that op, a block's graph kept its scores `[mb, heads, T, T]`: fitted on `worker heal`
/// runs of a random 16-layer llama (width 256, 8 heads, micro-batch 4) at T = 128 … 1024, 12–13
/// f32 copies (`results/memory-model.txt`); 6.5 GiB a block for Llama-2-70B at 2,048 tokens in bf16.
const CHUNKED_SCORE_COPIES: u64 = 4;

/// Evaluation passes a worker runs at once, block by block across them, when the model's blocks
/// are read from the checkpoint per pass (`eval/mod.rs`): each offloaded block is read once for
/// all of them, and their residual streams are held together meanwhile.
pub const PASSES_PER_READ: u64 = 16;

/// What the allocator holds beyond the live tensors, as a share of a phase's transient bytes
/// (activations and logits): the per-block graphs of recomputation and the evaluation batches
/// are allocated and freed over and over, and glibc's per-thread arenas keep some of what was
/// freed. Fitted, in percent, on the CPU runs of `worker/tests/memory.rs` (SmolLM2 and the two
/// random llamas), whose peaks sat 0–22% above the live bytes counted here; the 70B-shaped run
/// (item 5) was not used to fit it.
const ALLOCATOR_SLACK_PERCENT: u64 = 20;

/// Per-token widths held during an inference forward pass (no graph) at its widest point, inside
/// one block: the residual stream, its norm, the attention output, o's output and the sum
/// (hidden-wide, ~5), q/k/v twice (before and after rotation), and gate, up and their product
/// (intermediate-wide, 3).
const FORWARD_HIDDEN: u64 = 5;
/// See [`FORWARD_HIDDEN`].
const FORWARD_INTERMEDIATE: u64 = 3;
/// Attention scores computed at once per query chunk, at most, on `placement`: in inference (held
/// with their masked softmax) and in both passes of the training attention. The worker's
/// `model::attention::scores_per_chunk` is this figure. 2 Mi values on a CPU (8 MB of f32, near
/// its caches); 32 Mi on CUDA (128 MiB of f32), where a chunk is a handful of kernel launches and
/// chunks of a few rows would leave most of the GPU idle (Llama-2-70B at 2,048 tokens: 256 query
/// rows a chunk rather than 16).
pub fn score_chunk_values(placement: Placement) -> u64 {
    match placement {
        Placement::Cpu => 2 << 20,
        Placement::Cuda => 32 << 20,
    }
}

/// The `(in, out)` widths of one block's adapted modules; an adapter has `r · (in + out)`
/// parameters.
fn adapted_modules(
    shape: &ModelShape,
    targets: AdapterTargets,
    modules: &[String],
) -> Result<Vec<(u64, u64)>, MemoryError> {
    let (h, i) = (u64::from(shape.hidden), u64::from(shape.intermediate));
    let (q, kv) = (shape.q_width(), shape.kv_width());
    let dims = |name: &str| -> Result<(u64, u64), MemoryError> {
        Ok(match name {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" | "dense" => (q, h),
            "gate_proj" | "up_proj" | "fc1" => (h, i),
            "down_proj" | "fc2" => (i, h),
            // Fused modules share one A across their parts (PEFT's layout).
            "qkv_proj" => (h, q + 2 * kv),
            "gate_up_proj" => (h, 2 * i),
            other => return Err(MemoryError::UnknownModule(other.to_string())),
        })
    };
    const FFN: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
    const ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
    let names: Vec<&str> = match targets {
        AdapterTargets::Ffn => FFN.to_vec(),
        AdapterTargets::Attention => ATTENTION.to_vec(),
        AdapterTargets::AllLinear | AdapterTargets::Unspecified => ATTENTION.iter().chain(&FFN).copied().collect(),
        AdapterTargets::Modules => modules.iter().map(String::as_str).collect(),
    };
    names.iter().map(|name| dims(name)).collect()
}

/// Layers a cell drops: `round(fraction · L)` or `n` (the worker's rule, `prune.rs`).
fn dropped_layers(job: &JobSpec, layers: u32) -> u64 {
    use crate::v1::job_spec::Amount;
    match job.amount {
        Some(Amount::Fraction(f)) => (f * f64::from(layers)).round() as u64,
        Some(Amount::N(n)) => u64::from(n),
        None => 0,
    }
    .min(u64::from(layers))
}

/// One inference forward pass of `rows` sequences of `tokens` after `prefix` cached ones (no
/// graph): the widest point inside a block ([`FORWARD_HIDDEN`], [`FORWARD_INTERMEDIATE`], q/k/v
/// twice, one chunk of scores and its softmax). The scores are softmaxed in f32: the CPU's fused
/// kernel holds the scores and the probabilities (8 bytes a value); candle's ops (CUDA, bf16)
/// also the masked sum, then the probabilities' cast to the compute dtype (12 + `e`).
fn forward_bytes(shape: &ModelShape, (rows, tokens, prefix): (u64, u64, u64), e: u64, placement: Placement) -> u64 {
    let (h, i) = (u64::from(shape.hidden), u64::from(shape.intermediate));
    let qkv = shape.q_width() + 2 * shape.kv_width();
    let scores = (rows * u64::from(shape.heads) * tokens * (prefix + tokens)).min(score_chunk_values(placement));
    let score_bytes = if placement.fused_kernels(e) { 2 * 4 } else { 3 * 4 + e };
    rows * tokens * (FORWARD_HIDDEN * h + FORWARD_INTERMEDIATE * i + 2 * qkv) * e + scores * score_bytes
}

/// An evaluation task's forward pass, scored logits and key/value cache: `(activations, logits,
/// kv cache)` bytes, and the tokens of one pass.
fn eval_bytes(shape: &ModelShape, task: &EvalTask, layers: u64, e: u64, placement: Placement) -> (u64, u64, u64, u64) {
    let batch = u64::from(task.batch_size.max(1));
    let v = u64::from(shape.vocab);
    // Scored rows' f32 logits: on a CPU in f32 their log-sum-exp is one fused pass over them
    // (`model/log_sum_exp.rs`); elsewhere the stock ops add the logits less their max and its
    // exponent.
    let logit_copies = if placement.fused_kernels(e) { 1 } else { 3 };
    let kind = EvalTaskKind::try_from(task.kind).unwrap_or(EvalTaskKind::Unspecified);
    match kind {
        // Every position is scored, the LM head over at most `LOGIT_ROWS` of them at a time
        // (`eval/mod.rs`).
        EvalTaskKind::C4Loss => {
            let t = u64::from(task.seq_len.unwrap_or(crate::defaults::C4_LOSS_SEQ_LEN));
            (
                forward_bytes(shape, (batch, t, 0), e, placement),
                logit_copies * (batch * t).min(LOGIT_ROWS) * v * 4,
                0,
                batch * t,
            )
        }
        // Letter: the few-shot prefix runs once and its keys/values (every layer, k and v) are
        // shared by the batch's questions, which run packed end to end after it; one position per
        // question is scored.
        EvalTaskKind::Mmlu => {
            let prefix = 64 + u64::from(task.shots.unwrap_or(5)) * MMLU_SHOT_TOKENS;
            let kv = layers * 2 * prefix * shape.kv_width() * e;
            let tokens = batch * MMLU_QUESTION_TOKENS;
            (forward_bytes(shape, (1, tokens, prefix), e, placement), 2 * batch * v * e, kv, tokens)
        }
        // Cloze: `batch` questions a pass, each its context then its four continuations (assumed
        // up to `MMLU_CHOICE_TOKENS` each) packed end to end, every continuation token scored.
        EvalTaskKind::MmluCloze => {
            let tokens = batch * (MMLU_QUESTION_TOKENS + 4 * MMLU_CHOICE_TOKENS);
            let scored = (batch * 4 * MMLU_CHOICE_TOKENS).min(LOGIT_ROWS);
            (forward_bytes(shape, (1, tokens, 0), e, placement), logit_copies * scored * v * 4, 0, tokens)
        }
        EvalTaskKind::Boolq | EvalTaskKind::Unspecified => {
            (forward_bytes(shape, (batch, BOOLQ_TOKENS, 0), e, placement), 2 * batch * v * e, 0, batch * BOOLQ_TOKENS)
        }
    }
}

/// The transient dense copy an NF4 weight is decoded into for each product (`model/frozen.rs`),
/// `largest` being the largest projection's values: on a CPU in f32 the whole matrix at once;
/// elsewhere tile by tile, at most 16 Mi values in the compute dtype (`e` bytes each). While
/// loading, the one projection being quantized takes no more.
fn nf4_decode_bytes(largest: u64, e: u64, placement: Placement) -> u64 {
    if placement.fused_kernels(e) {
        largest * 4
    } else {
        largest.min(1 << 24) * e
    }
}

/// A phase's parts, summed.
struct Phase {
    name: &'static str,
    parts: Vec<(&'static str, u64)>,
}

impl Phase {
    fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.1).sum()
    }
}

/// The peak device and host memory of `job` on a model of `shape`, run on `placement`. A job
/// with `dtype` unset computes in the placement's own (f32 on a CPU, bf16 on CUDA).
pub fn predict(shape: &ModelShape, job: &JobSpec, placement: Placement) -> Result<MemoryEstimate, MemoryError> {
    shape.validate()?;
    let dtype = job.model.as_ref().map_or(Dtype::Unspecified, |m| m.dtype());
    let e = width(dtype, placement);
    let (h, i, v) = (u64::from(shape.hidden), u64::from(shape.intermediate), u64::from(shape.vocab));
    let layers = u64::from(shape.layers);
    let overhead = match placement {
        Placement::Cpu => ("runtime", CPU_RUNTIME_BYTES),
        Placement::Cuda => ("cuda context", CUDA_CONTEXT_BYTES),
    };
    let qlora = job.heal.as_ref().and_then(|h| h.qlora.as_ref());
    let nf4_base = qlora.is_some_and(|q| q.quantize_base);
    // The model as loaded (once, kept between jobs): every layer, in the compute dtype — or, for a
    // QLoRA cell, every layer's projections in NF4 (plus the one projection being quantized) and
    // the embedding, norms and LM head in the compute dtype.
    let mut resident = if nf4_base {
        let projections = shape.block_projections();
        let dense = shape.params() - layers * shape.block_projection_params();
        let largest = projections.iter().map(|(r, c)| r * c).max().unwrap_or(0);
        let nf4 = layers * projections.iter().map(|(r, c)| nf4_bytes(r * c)).sum::<u64>();
        vec![
            overhead,
            ("weights", dense * e),
            ("nf4 base", nf4),
            ("nf4 decode", nf4_decode_bytes(largest, e, placement)),
        ]
    } else {
        vec![overhead, ("weights", shape.params() * e)]
    };
    let mut phases = vec![Phase { name: "load", parts: resident.clone() }];
    let kind = JobKind::try_from(job.kind).unwrap_or(JobKind::Unspecified);
    if kind == JobKind::Score {
        let c = job.calibration.clone().unwrap_or_default();
        let (samples, t) = (u64::from(c.samples), u64::from(c.seq_len));
        let batch = u64::from(c.batch_size.max(1)).min(samples.max(1));
        // Loaded: one batch's forward pass, plus the previous residual state (Block Influence).
        let forward = forward_bytes(shape, (batch, t, 0), e, placement) + batch * t * h * e;
        let slack = ("allocator", forward * ALLOCATOR_SLACK_PERCENT / 100);
        let mut parts = resident.clone();
        parts.extend([("activations", forward), slack]);
        let loaded = Phase { name: "score", parts };
        // Streamed (`model/streamed.rs`, which the worker picks when the model does not fit): the
        // embedding, one block, and every batch's residual stream twice (entering and leaving it).
        let one_block = shape.block_params() * e;
        let streamed = Phase {
            name: "score-streamed",
            parts: vec![
                overhead,
                ("weights", v * h * e + one_block),
                ("activations", 2 * samples * t * h * e + forward),
                slack,
            ],
        };
        if streamed.total() < loaded.total() {
            phases = vec![streamed];
        } else {
            phases.push(loaded);
        }
    }
    let kept = layers - dropped_layers(job, shape.layers);
    // Host memory beyond the runtime that a phase holds (the training ids).
    let mut host_data = 0;
    if let Some(q) = qlora {
        let training = Training::new(shape, q, e, placement)?;
        let per_block = training.adapter_params_per_block();
        let adapter_params = kept * per_block;
        // Adapters, gradient sums, AdamW's m and v: four f32 copies; and one block's gradients,
        // which recomputation adds to the sums block by block (`heal/gradients.rs`).
        let adapters = 4 * 4 * adapter_params + 4 * per_block;
        // Every block recomputed: the least a worker runs the step in (one with more free memory
        // keeps the top blocks' graphs in it, `Training::activation_bytes`).
        let activations = training.activation_bytes(kept, 0);
        let logits = training.logit_bytes();
        let t = u64::from(q.seq_len);
        let mut parts = resident.clone();
        let slack = (activations + logits) * ALLOCATOR_SLACK_PERCENT / 100;
        parts.extend([("adapters", adapters), ("activations", activations), ("logits", logits), ("allocator", slack)]);
        // The packed training ids, every update's (`heal/packing.rs`), as u32, in host memory.
        host_data = u64::from(q.steps) * u64::from(q.batch_size) * t * 4;
        if placement == Placement::Cpu {
            parts.push(("data", host_data));
        }
        phases.push(Phase { name: "heal", parts });
        resident.push(("adapters", 4 * adapter_params));
    }
    // The same evaluations with the blocks offloaded: the embedding, final norm and LM head held,
    // one block running while the next is read (`Block::read_ahead`; the worker reads as many as
    // fit and keeps them; none counted).
    // Not for a healed cell: training needs every block held.
    let offloadable = job.heal.is_none() && kind != JobKind::Score && !job.eval.is_empty();
    let offloaded_weights = [
        overhead,
        ("weights", (shape.params() - layers * shape.block_params()) * e),
        ("two blocks", 2 * shape.block_params() * e),
    ];
    let mut offloaded = Vec::new();
    for task in &job.eval {
        let (activations, logits, kv, pass_tokens) = eval_bytes(shape, task, kept, e, placement);
        let slack = (activations + logits + kv) * ALLOCATOR_SLACK_PERCENT / 100;
        let mut transient = vec![("activations", activations), ("logits", logits), ("allocator", slack)];
        if kv > 0 {
            transient.push(("kv cache", kv));
        }
        let parts = resident.iter().chain(&transient).copied().collect();
        phases.push(Phase { name: "eval", parts });
        // Offloaded, `PASSES_PER_READ` passes run block by block together: their residual streams
        // are held at once.
        let states = ("pass states", PASSES_PER_READ * pass_tokens * h * e);
        let parts = offloaded_weights.iter().chain(&transient).chain([&states]).copied().collect();
        offloaded.push(Phase { name: "eval-offloaded", parts });
    }
    let peak = phases.into_iter().max_by_key(Phase::total).expect("the load phase is always there");
    let device_bytes = peak.total();
    let least_device_bytes = match offloaded.iter().map(Phase::total).max() {
        Some(least) if offloadable => least.min(device_bytes),
        _ => device_bytes,
    };
    let host_bytes = match placement {
        Placement::Cpu => device_bytes,
        // Loading passes one tensor at a time through the host: at most the embedding (or the
        // largest projection), in the file's precision (assumed the compute dtype's); healing
        // keeps its training ids there. (A GGUF file is dequantized whole in host memory first:
        // not counted; GGUF checkpoints are small models.)
        Placement::Cuda => CUDA_HOST_RUNTIME_BYTES + (v * h).max(h * i) * e + host_data,
    };
    Ok(MemoryEstimate { device_bytes, host_bytes, phase: peak.name, parts: peak.parts, least_device_bytes })
}

/// `bytes` in GiB with two decimals, as the plan and the logs print it.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
}

mod training;
pub use training::{training_logit_rows, Training, TRAINING_LOGIT_VALUES};

#[cfg(test)]
mod tests;

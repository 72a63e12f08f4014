//! One healing micro-batch's memory: the activations, with any number of blocks keeping their
//! autograd graphs, and the logits.

use super::{
    adapted_modules, score_chunk_values, MemoryError, ModelShape, Placement, ALLOCATOR_SLACK_PERCENT,
    CHUNKED_SCORE_COPIES, FUSED_GRAPH_HIDDEN, FUSED_GRAPH_INTERMEDIATE, GRAPH_HIDDEN, GRAPH_INTERMEDIATE,
};
use crate::v1::{AdapterTargets, QLoraSettings};

/// Logits the CPU's fused training loss computes at once (`heal/head_loss.rs`): as many rows as
/// keep a chunk within 24 MiB of f32 (128 rows of SmolLM2's 49,152-word vocabulary, 49 of Llama
/// 3's 128,256), below glibc's largest threshold for serving an allocation from fresh pages (32
/// MiB), so that each chunk reuses the last one's memory.
pub const TRAINING_LOGIT_VALUES: u64 = 6 << 20;

/// Rows of logits the CPU's fused training loss computes at once over a vocabulary of `vocab`
/// words: as many as [`TRAINING_LOGIT_VALUES`] holds, at least one.
pub fn training_logit_rows(vocab: u64) -> u64 {
    (TRAINING_LOGIT_VALUES / vocab.max(1)).max(1)
}

/// One healing micro-batch as the memory model counts it: the model's shape, the micro-batch and
/// the adapters, in a compute dtype on a placement. `predict` counts the heal phase from it, and
/// the worker sizes how many blocks keep their autograd graphs with it (`heal/gradients.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Training {
    shape: ModelShape,
    micro_batch: u64,
    seq_len: u64,
    rank: u64,
    /// `(in, out)` widths of each adapted module of a block.
    modules: Vec<(u64, u64)>,
    /// Bytes of one value in the compute dtype.
    value_bytes: u64,
    placement: Placement,
}

impl Training {
    /// A job's healing settings `q` on `shape`, computing in values of `value_bytes` bytes.
    pub fn new(
        shape: &ModelShape,
        q: &QLoraSettings,
        value_bytes: u64,
        placement: Placement,
    ) -> Result<Self, MemoryError> {
        let targets = AdapterTargets::try_from(q.targets).unwrap_or(AdapterTargets::Unspecified);
        Ok(Training {
            shape: *shape,
            micro_batch: u64::from(q.micro_batch_size.max(1)),
            seq_len: u64::from(q.seq_len),
            rank: u64::from(q.rank),
            modules: adapted_modules(shape, targets, &q.target_modules)?,
            value_bytes,
            placement,
        })
    }

    /// The same from a run's own settings: adapters of rank `rank` on the PEFT modules `modules`
    /// (as resolved for the model's family).
    pub fn with_modules(
        shape: &ModelShape,
        (micro_batch, seq_len, rank): (u64, u64, u64),
        modules: &[String],
        value_bytes: u64,
        placement: Placement,
    ) -> Result<Self, MemoryError> {
        Ok(Training {
            shape: *shape,
            micro_batch: micro_batch.max(1),
            seq_len,
            rank,
            modules: adapted_modules(shape, AdapterTargets::Modules, modules)?,
            value_bytes,
            placement,
        })
    }

    /// The CPU's f32 path, where norms, rotary, SiLU·up, the adapted projections and the
    /// cross-entropy are fused ops keeping only their outputs (attention is one on every device).
    fn fused(&self) -> bool {
        self.placement.fused_kernels(self.value_bytes)
    }

    /// Adapter parameters of one block: `r · (in + out)` per adapted module.
    pub fn adapter_params_per_block(&self) -> u64 {
        self.modules.iter().map(|(d_in, d_out)| self.rank * (d_in + d_out)).sum()
    }

    /// One block's residual state, bytes: what recomputation keeps of a block.
    fn block_input_bytes(&self) -> u64 {
        self.micro_batch * self.seq_len * u64::from(self.shape.hidden) * self.value_bytes
    }

    /// Attention scores `[mb, heads, T, T]` of one block, values.
    fn score_values(&self) -> u64 {
        self.micro_batch * u64::from(self.shape.heads) * self.seq_len * self.seq_len
    }

    /// One block's autograd graph for the micro-batch, bytes, as the backward pass holds it.
    /// Off the CPU's f32 path an adapter is candle ops (`Lora::forward`), and the graph keeps, per
    /// adapted module and token, the dropout mask and the masked input (in-wide), `x Aᵀ` (r),
    /// and the update, its scaled copy and the sum (out-wide); on that path each adapted
    /// projection is one op (`model/lora_product.rs`) whose output is the block's own. Attention
    /// keeps no scores on any device (`TrainedAttention` in `model/attention.rs`): a block's
    /// graph grows with the tokens, not their square.
    pub fn block_graph_bytes(&self) -> u64 {
        let (h, i) = (u64::from(self.shape.hidden), u64::from(self.shape.intermediate));
        let tokens = self.micro_batch * self.seq_len;
        if self.fused() {
            tokens * (FUSED_GRAPH_HIDDEN * h + FUSED_GRAPH_INTERMEDIATE * i) * self.value_bytes
        } else {
            let adapters: u64 = self.modules.iter().map(|(d_in, d_out)| 2 * d_in + self.rank + 3 * d_out).sum();
            tokens * (GRAPH_HIDDEN * h + GRAPH_INTERMEDIATE * i + adapters) * self.value_bytes
        }
    }

    /// The micro-batch's activations over `blocks` blocks when the top `kept_graphs` of them keep
    /// their graphs for the backward pass and the others are recomputed (`heal/gradients.rs`):
    /// the recomputed blocks' inputs and the gradient flowing down, the kept graphs (or, with
    /// none kept, the one block's being recomputed), and the chunk of attention scores the
    /// backward pass recomputes at a time (in f32 on every device).
    pub fn activation_bytes(&self, blocks: u64, kept_graphs: u64) -> u64 {
        let kept_graphs = kept_graphs.min(blocks);
        let transient_scores = CHUNKED_SCORE_COPIES * self.score_values().min(score_chunk_values(self.placement)) * 4;
        (blocks - kept_graphs + 1) * self.block_input_bytes()
            + kept_graphs.max(1) * self.block_graph_bytes()
            + transient_scores
    }

    /// The loss's share: on a CPU in f32 the LM head and the cross-entropy are one op
    /// (`heal/head_loss.rs`) that holds one chunk of logits ([`TRAINING_LOGIT_VALUES`] at most, or
    /// one row) and the head input's gradient `[mb, T, H]` with its scaled copy; off the CPU the
    /// micro-batch's logits `[mb, T, V]` go through candle-nn's composed loss, about ten
    /// temporaries of that size.
    pub fn logit_bytes(&self) -> u64 {
        let (tokens, v) = (self.micro_batch * self.seq_len, u64::from(self.shape.vocab));
        if self.fused() {
            let rows = training_logit_rows(v).min(tokens.max(1));
            (rows * v + 2 * tokens * u64::from(self.shape.hidden)) * 4
        } else {
            10 * tokens * v * self.value_bytes
        }
    }

    /// What an update over `blocks` blocks takes beyond the held model, adapters and AdamW
    /// moments with every block recomputed: the activations and logits with the allocator's
    /// share, and the gradient sums (one more f32 copy of the adapters).
    pub fn least_step_bytes(&self, blocks: u64) -> u64 {
        let transient = self.activation_bytes(blocks, 0) + self.logit_bytes();
        transient * (100 + ALLOCATOR_SLACK_PERCENT) / 100 + 4 * blocks * self.adapter_params_per_block()
    }

    /// How many of `blocks` blocks, from the top, may keep their graphs in `spare` bytes beyond
    /// what the micro-batch takes with every block recomputed (allocator slack counted).
    pub fn graphs_that_fit(&self, blocks: u64, spare: u64) -> u64 {
        let least = self.activation_bytes(blocks, 0);
        let extra = |k| self.activation_bytes(blocks, k).saturating_sub(least) * (100 + ALLOCATOR_SLACK_PERCENT) / 100;
        (0..=blocks).take_while(|&k| extra(k) <= spare).last().unwrap_or(0)
    }
}

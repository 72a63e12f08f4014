//! What a job gets for each setting its sweep file (or a worker's command line) leaves out: the
//! paper's choices where it states them (Gromov et al. 2024, App. A), else HF Trainer's.
//!
//! These are the only defaults there are. The coordinator resolves a sweep file against them
//! before it computes job keys, so a stored job names every setting that can change its result;
//! the worker's stage specs (`HealConfig`, `EvalSpec`, `ScoreSpec`) take their `Default` from them,
//! so `worker heal` and a sweep's heal cell train alike unless told otherwise.

use crate::v1::{AdapterTargets, CalibrationData, EvalTask, EvalTaskKind, LrSchedule, QLoraSettings};

/// Calibration documents scored per model (the paper averaged over 10k; 256 already fixes the
/// argmin on the models we checked, `results/`).
pub const CALIBRATION_SAMPLES: u32 = 256;
/// Tokens per calibration document (longer ones are truncated; the distance is taken at the last).
pub const CALIBRATION_SEQ_LEN: u32 = 256;
/// Sequences per forward pass, scoring and evaluating.
pub const BATCH_SIZE: u32 = 8;
/// MMLU letter-format shots (the paper's headline 5-shot).
pub const MMLU_SHOTS: u32 = 5;
/// Documents a c4-loss task scores.
pub const C4_LOSS_DOCUMENTS: u32 = 256;
/// Tokens per c4-loss document.
pub const C4_LOSS_SEQ_LEN: u32 = 512;

/// LoRA α when a sweep or command line gives only the rank: α = r, so the update's scale α/r is 1
/// (the paper's choice).
pub fn lora_alpha(rank: u32) -> f64 {
    f64::from(rank)
}

/// Warmup updates for a run of `steps`: the paper's 100, kept to a tenth of shorter runs so that
/// a short run reaches its peak learning rate.
pub fn warmup_steps(steps: u32) -> u32 {
    (steps / 10).min(100)
}

/// Sequences per forward/backward pass for a global batch of `batch`: 4 (a memory choice; the
/// update is the same) when it divides the batch, else the whole batch in one pass.
pub fn micro_batch_size(batch: u32) -> u32 {
    if batch.is_multiple_of(4) {
        4
    } else {
        batch
    }
}

impl QLoraSettings {
    /// The paper's healing run (App. A.1): 5000 updates of 16 sequences of 2048 tokens, LoRA rank
    /// 64 with α = r and dropout 0.05 on the FFN projections, AdamW at 3e-4 with no weight decay,
    /// gradient clip 1, cosine schedule with 100 warmup updates, base frozen in NF4. Micro-batches of
    /// 4 (a memory choice; the update is the same) and a checkpoint every 100 updates.
    pub fn paper() -> Self {
        let (steps, batch_size) = (5000, 16);
        QLoraSettings {
            rank: 64,
            alpha: lora_alpha(64),
            dropout: 0.05,
            steps,
            learning_rate: 3e-4,
            batch_size,
            seq_len: 2048,
            data_path: None,
            target_modules: Vec::new(),
            quantize_base: true,
            micro_batch_size: micro_batch_size(batch_size),
            warmup_steps: warmup_steps(steps),
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            checkpoint_every: 100,
            targets: AdapterTargets::Ffn as i32,
            schedule: LrSchedule::Cosine as i32,
            data_first_doc: 0,
        }
    }
}

impl CalibrationData {
    /// `path` with the default sample count, length and batch.
    pub fn with_defaults(path: impl Into<String>) -> Self {
        CalibrationData {
            path: path.into(),
            samples: CALIBRATION_SAMPLES,
            seq_len: CALIBRATION_SEQ_LEN,
            batch_size: BATCH_SIZE,
        }
    }
}

impl EvalTask {
    /// A `kind` task on `path` with every default it has: MMLU 5-shot (letter form); c4-loss on
    /// the first 256 documents from document 0, 512 tokens each; all examples otherwise.
    pub fn with_defaults(kind: EvalTaskKind, path: impl Into<String>) -> Self {
        let c4 = kind == EvalTaskKind::C4Loss;
        EvalTask {
            kind: kind as i32,
            path: path.into(),
            limit: c4.then_some(C4_LOSS_DOCUMENTS),
            shots: (kind == EvalTaskKind::Mmlu).then_some(MMLU_SHOTS),
            seq_len: c4.then_some(C4_LOSS_SEQ_LEN),
            first_doc: c4.then_some(0),
            limit_per_subject: None,
            dev_path: None,
            batch_size: BATCH_SIZE,
        }
    }
}

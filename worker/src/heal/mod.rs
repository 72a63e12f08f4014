//! Healing (Gromov et al. 2024, App. A.1): after a cut, train LoRA adapters on C4 with the base
//! frozen in 4 bits (QLoRA), so that the seam between the layers left on either side closes.
//!
//! - [`HealConfig`], [`HealSpec`], [`TargetSet`]: what a run is told (`heal/config.rs`);
//!   [`prepare`] turns a spec into a [`Trainer`], for `worker heal` and a sweep's cells alike.
//! - [`packing`]: documents → fixed-length training chunks.
//! - [`loss`]: the next-token loss (fused cross-entropy).
//! - [`gradients`]: a micro-batch's adapter gradients, recomputing in the backward pass the
//!   blocks whose activations the free memory does not hold (or as many as told).
//! - [`optim`]: AdamW, the cosine schedule with warmup, gradient clipping.
//! - [`checkpoint`]: the resumable training state, written atomically.
//! - [`adapter`]: the PEFT adapter folder (write, and attach for evaluation).
//!
//! The NF4 base and the adapters themselves are model code: [`crate::model::nf4`],
//! [`crate::model::lora`].
//!
//! A run is reproducible from its seed: adapter initialization, dropout masks (one stream per
//! step, micro-batch and adapter) and the data order are all functions of the seed and the step,
//! so a run resumed from a checkpoint reaches the same weights as one that never stopped.

pub mod adapter;
pub mod checkpoint;
mod config;
pub mod gradients;
pub mod head_loss;
pub mod loss;
pub mod optim;
pub mod packing;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde_json::{json, Value};

use crate::model::lora::{mix_seed, LoraSpec};
use crate::model::{candle_message, Model, ModelError};
use checkpoint::Checkpoint;
pub use config::{HealConfig, HealSpec, Recompute, TargetSet};
pub use gradients::accumulate_gradients;
pub use loss::next_token_loss;
use optim::{clip_grad_norm, cosine_lr, AdamW};
use packing::PackedChunks;

/// Exit code of `worker heal` when it stopped on SIGTERM/SIGINT after writing a checkpoint
/// (`EX_TEMPFAIL`): the scheduler should requeue the job with `--resume`.
pub const EXIT_PREEMPTED: i32 = 75;

/// The checkpoint's file name inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The per-step log inside the output folder.
pub const LOG_FILE: &str = "train_log.csv";

/// What can stop a healing run. Every message names the file or setting and the way out.
#[derive(Debug, thiserror::Error)]
pub enum HealError {
    /// A setting is out of range.
    #[error("heal: {0}")]
    Config(String),
    /// Loading or changing the model failed (includes bad adapter specs).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The training data cannot be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A checkpoint cannot be read, does not belong to this run, or cannot be written.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The loss or the gradient became NaN or infinite.
    #[error("loss is not finite at step {step} ({value}); lower --lr or check the data. {kept}")]
    NonFinite {
        /// The step (0-based) that produced it.
        step: usize,
        /// The offending value.
        value: f64,
        /// Which checkpoint is still good.
        kept: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// One update's figures.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// 1-based count of updates done.
    pub step: usize,
    /// Mean next-token loss over the global batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens trained on so far in this process.
    pub tokens: usize,
    /// Seconds spent so far in this process.
    pub seconds: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealEnd {
    /// All steps done.
    Finished,
    /// Stopped by a signal after writing a checkpoint.
    Preempted,
}

/// A training run over one model: the adapters, the optimizer, where it writes.
pub struct Trainer<'m> {
    model: &'m mut Model,
    cfg: HealConfig,
    lora: LoraSpec,
    data: PackedChunks,
    out: PathBuf,
    fingerprint: Value,
    params: Vec<(String, Var)>,
    opt: AdamW,
    step: usize,
    /// Step of the last checkpoint on disk, if any.
    last_checkpoint: Option<usize>,
    /// How many of the top blocks keep their graphs for the backward pass
    /// ([`HealConfig::recompute`] resolved: [`Trainer::fit_graphs`]).
    kept_graphs: usize,
    /// (parameters, bytes) of the NF4 base.
    pub quantized: (usize, usize),
}

impl<'m> Trainer<'m> {
    /// Prepares a run: quantizes the base (unless `cfg.quantize` is off), attaches fresh adapters
    /// and, with `resume`, restores `out/checkpoint.safetensors` when it exists (a checkpoint
    /// from other settings, or a damaged one, is an error and is left untouched). Without
    /// `resume`, an existing checkpoint is an error too: a new run never overwrites one.
    /// `identity` describes the model and data; it joins the settings in the checkpoint's
    /// fingerprint.
    pub fn new(
        model: &'m mut Model,
        cfg: HealConfig,
        data: PackedChunks,
        out: &Path,
        identity: Value,
        resume: bool,
    ) -> Result<Self, HealError> {
        cfg.validate()?;
        let lora = cfg.lora(&model.decoder);
        if data.is_empty() {
            return Err(HealError::Config(format!(
                "the data gave no full {}-token sequence; use more documents or a shorter --seq-len",
                cfg.seq_len
            )));
        }
        std::fs::create_dir_all(out).map_err(|e| HealError::Io { path: out.to_path_buf(), source: e })?;
        let quantized = if cfg.quantize { model.decoder.quantize_nf4()? } else { (0, 0) };
        model.decoder.attach_adapters(&lora, cfg.seed)?;
        let params = model.decoder.adapter_vars();
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let opt = AdamW::new(&vars, cfg.weight_decay)?;
        let fingerprint = json!({
            "identity": identity,
            "steps": cfg.steps, "batch": cfg.batch, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len,
            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets,
            "lr": cfg.lr, "warmup": cfg.warmup, "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm, "seed": cfg.seed, "quantize": cfg.quantize,
        });
        let mut trainer = Trainer {
            model,
            cfg,
            lora,
            data,
            out: out.to_path_buf(),
            fingerprint,
            params,
            opt,
            step: 0,
            last_checkpoint: None,
            kept_graphs: 0,
            quantized,
        };
        trainer.fit_graphs(crate::device::free_memory(trainer.model.decoder.device()));
        let path = trainer.checkpoint_path();
        match (resume, path.exists()) {
            (true, true) => trainer.restore(&path)?,
            (true, false) => tracing::info!(path = %path.display(), "--resume: no checkpoint yet, starting at step 0"),
            (false, true) => {
                return Err(HealError::Checkpoint {
                    path,
                    message: "a checkpoint of an earlier run is here; pass --resume to continue it, or choose another --out (it is not overwritten)".into(),
                })
            }
            (false, false) => {}
        }
        Ok(trainer)
    }

    /// Sizes [`HealConfig::recompute`] for `free` bytes of free device memory (the model,
    /// adapters and moments already in it; `None`: unknown) and returns how many of the top
    /// blocks keep their graphs ([`gradients::graphs_that_fit`]). [`Trainer::new`] sizes it for
    /// the device's free memory; `worker serve` again for what its memory budget leaves.
    pub fn fit_graphs(&mut self, free: Option<u64>) -> usize {
        self.kept_graphs = gradients::graphs_that_fit(&self.model.decoder, &self.cfg, &self.lora.targets, free);
        self.kept_graphs
    }

    /// How many of the top blocks keep their graphs for the backward pass (the rest are
    /// recomputed): at least the number of blocks for full backpropagation.
    pub fn kept_graphs(&self) -> usize {
        self.kept_graphs
    }

    /// The settings in force.
    pub fn config(&self) -> &HealConfig {
        &self.cfg
    }

    /// The adapters' settings, targets resolved for the model's family.
    pub fn lora(&self) -> &LoraSpec {
        &self.lora
    }

    /// Updates done so far (including those restored from a checkpoint).
    pub fn step(&self) -> usize {
        self.step
    }

    /// Trainable parameters.
    pub fn trainable_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
    }

    /// `out/checkpoint.safetensors`.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.out.join(CHECKPOINT_FILE)
    }

    fn restore(&mut self, path: &Path) -> Result<(), HealError> {
        let device = self.model.decoder.device().clone();
        let ck = Checkpoint::load(path, &device)?;
        if ck.fingerprint != self.fingerprint {
            let differs: Vec<String> = self.fingerprint.as_object().map_or_else(Vec::new, |now| {
                now.iter()
                    .filter(|(k, v)| ck.fingerprint.get(*k) != Some(*v))
                    .map(|(k, v)| {
                        format!("{k}: checkpoint {} vs now {v}", ck.fingerprint.get(k).unwrap_or(&Value::Null))
                    })
                    .collect()
            });
            return Err(HealError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "written by a run with other settings ({}); resume with the same settings, or use another --out",
                    differs.join("; ")
                ),
            });
        }
        if ck.data_position != ck.step * self.cfg.batch {
            return Err(HealError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "data position {} does not match step {} × batch {}; the file was edited or is damaged",
                    ck.data_position, ck.step, self.cfg.batch
                ),
            });
        }
        let names: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        let ck_names: Vec<&str> = ck.params.iter().map(|(n, _)| n.as_str()).collect();
        if names != ck_names {
            return Err(HealError::Checkpoint {
                path: path.to_path_buf(),
                message: "its adapter tensors do not match this model's; use another --out".into(),
            });
        }
        for ((_, var), (name, t)) in self.params.iter().zip(&ck.params) {
            if var.as_tensor().dims() != t.dims() {
                return Err(HealError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), var.as_tensor().dims()),
                });
            }
            var.set(t)?;
        }
        self.opt.m = ck.m;
        self.opt.v = ck.v;
        self.opt.t = ck.step;
        self.step = ck.step;
        self.last_checkpoint = Some(ck.step);
        tracing::info!(step = ck.step, path = %path.display(), "resumed");
        Ok(())
    }

    /// Writes the checkpoint for the current step.
    pub fn save_checkpoint(&mut self) -> Result<(), HealError> {
        let ck = Checkpoint {
            step: self.step,
            data_position: self.step * self.cfg.batch,
            fingerprint: self.fingerprint.clone(),
            params: self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(),
            m: self.opt.m.clone(),
            v: self.opt.v.clone(),
        };
        ck.save(&self.checkpoint_path())?;
        self.last_checkpoint = Some(self.step);
        Ok(())
    }

    fn non_finite(&self, value: f64) -> HealError {
        let kept = match self.last_checkpoint {
            Some(s) => format!("The last good checkpoint (step {s}) is kept at {}.", self.checkpoint_path().display()),
            None => "No checkpoint was written.".into(),
        };
        HealError::NonFinite { step: self.step, value, kept }
    }

    /// One optimizer update: `batch / micro_batch` forward/backward passes (recomputing the
    /// blocks below the top [`Trainer::kept_graphs`] in the backward pass), clipping, AdamW.
    pub fn train_step(&mut self) -> Result<(f64, f64, f64), HealError> {
        let accum = self.cfg.accumulation();
        let device = self.model.decoder.device().clone();
        let vars: Vec<Var> = self.params.iter().map(|(_, v)| v.clone()).collect();
        let mut grads: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_, _>>()?;
        let mut loss_sum = 0f64;
        for micro in 0..accum {
            let first = (self.step * accum + micro) * self.cfg.micro_batch;
            let ids = self.data.batch(first, self.cfg.micro_batch, &device)?;
            self.model
                .decoder
                .set_adapter_training(Some(mix_seed(self.cfg.seed ^ 0xD50F, (self.step * accum + micro) as u64)));
            let value = accumulate_gradients(self.model, &ids, self.kept_graphs, accum as f64, &vars, &mut grads);
            self.model.decoder.set_adapter_training(None);
            let value = value?;
            if !value.is_finite() {
                return Err(self.non_finite(value));
            }
            loss_sum += value;
        }
        let norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(self.non_finite(norm));
        }
        let lr = cosine_lr(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.steps);
        self.opt.step(&vars, &grads, lr)?;
        self.step += 1;
        Ok((loss_sum / accum as f64, lr, norm))
    }

    /// Trains from the current step to `cfg.steps`, checkpointing every `checkpoint_every`
    /// updates and at the end; appends a row per update to `train_log.csv`. When `stop` turns
    /// true (SIGTERM), writes a checkpoint and returns [`HealEnd::Preempted`].
    pub fn run(&mut self, stop: &AtomicBool, on_step: &mut dyn FnMut(&StepStats)) -> Result<HealEnd, HealError> {
        let mut log = self.open_log()?;
        let start = Instant::now();
        let tokens_per_step = self.cfg.batch * self.cfg.seq_len;
        let mut tokens = 0;
        while self.step < self.cfg.steps {
            if stop.load(Ordering::SeqCst) {
                self.save_checkpoint()?;
                return Ok(HealEnd::Preempted);
            }
            let (loss, lr, grad_norm) = self.train_step()?;
            tokens += tokens_per_step;
            let stats =
                StepStats { step: self.step, loss, lr, grad_norm, tokens, seconds: start.elapsed().as_secs_f64() };
            writeln!(log, "{},{:.6},{:.6e},{:.4},{},{:.3}", stats.step, loss, lr, grad_norm, tokens, stats.seconds)
                .and_then(|_| log.flush())
                .map_err(|e| HealError::Io { path: self.out.join(LOG_FILE), source: e })?;
            on_step(&stats);
            if self.step % self.cfg.checkpoint_every == 0 || self.step == self.cfg.steps {
                self.save_checkpoint()?;
            }
        }
        Ok(HealEnd::Finished)
    }

    /// `train_log.csv`: new with a header at step 0; on resume, the rows up to the checkpoint's
    /// step are kept (rows logged after it were lost with the process and will be redone).
    fn open_log(&self) -> Result<std::fs::File, HealError> {
        let path = self.out.join(LOG_FILE);
        let io = |e| HealError::Io { path: path.clone(), source: e };
        let mut kept = String::from("step,loss,lr,grad_norm,tokens,seconds\n");
        if self.step > 0 {
            if let Ok(old) = std::fs::read_to_string(&path) {
                for line in old.lines().skip(1) {
                    let s: Option<usize> = line.split(',').next().and_then(|s| s.parse().ok());
                    if s.is_some_and(|s| s <= self.step) {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
            }
        }
        std::fs::write(&path, kept).map_err(io)?;
        std::fs::OpenOptions::new().append(true).open(&path).map_err(io)
    }

    /// Writes the adapters as a PEFT folder at `dir`, with the run's figures in `prunesweep.json`.
    pub fn save_adapter(&self, dir: &Path, extra: Value) -> Result<(), HealError> {
        let mut info = json!({ "steps": self.step, "quantized_base": if self.cfg.quantize { "nf4" } else { "none" } });
        if let (Some(m), Some(e)) = (info.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        adapter::save(self.model, &self.lora, dir, info)
    }
}

/// The healing stage, as `worker heal` and a sweep's cells run it: reads and packs the training
/// data, then prepares the [`Trainer`] (quantized base, fresh adapters, a checkpoint restored
/// with `resume`). `identity` names the model and data in the checkpoint's fingerprint.
pub fn prepare<'m>(
    model: &'m mut Model,
    spec: &HealSpec,
    out: &Path,
    identity: Value,
    resume: bool,
) -> Result<Trainer<'m>, HealError> {
    let cfg = &spec.config;
    cfg.validate()?;
    let docs = crate::data::read_document_range(&spec.data, spec.first_doc, None)?;
    let sequences = cfg.steps * cfg.batch;
    let chunks = PackedChunks::pack(&model.tokenizer, &docs, eos_id(model)?, cfg.seq_len, sequences)?;
    if chunks.len() < sequences {
        tracing::warn!(
            chunks = chunks.len(),
            needed = sequences,
            "the data holds fewer sequences than the run uses; it will be repeated (epochs)"
        );
    }
    Trainer::new(model, cfg.clone(), chunks, out, identity, resume)
}

/// The end-of-sequence id used to join documents: `eos_token_id` from the config, else the
/// tokenizer's `<|endoftext|>` / `</s>` / `<eos>`.
pub fn eos_id(model: &Model) -> Result<u32, HealError> {
    let from_config = match &model.config_json["eos_token_id"] {
        Value::Number(n) => n.as_u64(),
        Value::Array(a) => a.first().and_then(Value::as_u64),
        _ => None,
    };
    from_config
        .map(|e| e as u32)
        .or_else(|| {
            ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"].iter().find_map(|t| model.tokenizer.token_id(t))
        })
        .ok_or_else(|| {
            HealError::Config("the model names no eos_token_id and its tokenizer has no known EOS token".into())
        })
}

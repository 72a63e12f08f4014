//! What a healing run is told: [`HealConfig`] (the training settings, with the only `Default`
//! there is), [`TargetSet`] (which projections get adapters) and [`HealSpec`] (settings + data).

use std::path::PathBuf;
use std::str::FromStr;

use prunesweep_proto::v1::{AdapterTargets, LrSchedule, QLoraSettings};

use super::HealError;
use crate::model::lora::LoraSpec;
use crate::model::Decoder;

/// Which projections get adapters: a set named by role, resolved for the model's family
/// ([`Family::ffn_modules`](crate::model::Family::ffn_modules)), or module names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSet {
    /// The feed-forward projections (the paper's choice).
    Ffn,
    /// Every linear projection of every block.
    AllLinear,
    /// The attention projections.
    Attention,
    /// Exactly these PEFT module names (`q_proj`, `gate_up_proj`, `fc1`, …).
    Modules(Vec<String>),
}

impl TargetSet {
    /// The module names this set means for `decoder`'s family, in the decoder's order.
    pub fn resolve(&self, decoder: &Decoder) -> Vec<String> {
        let all = decoder.adapter_targets();
        let family = decoder.cfg.family;
        let keep = |names: &[&str]| all.iter().filter(|t| names.contains(&t.as_str())).cloned().collect();
        match self {
            TargetSet::Ffn => keep(family.ffn_modules()),
            TargetSet::Attention => keep(family.attention_modules()),
            TargetSet::AllLinear => all,
            TargetSet::Modules(m) => m.clone(),
        }
    }

    /// The contract's form: a set, or `MODULES` with the names.
    pub fn from_pb(targets: AdapterTargets, modules: &[String]) -> Result<Self, HealError> {
        match targets {
            AdapterTargets::Ffn => Ok(TargetSet::Ffn),
            AdapterTargets::AllLinear => Ok(TargetSet::AllLinear),
            AdapterTargets::Attention => Ok(TargetSet::Attention),
            AdapterTargets::Modules if !modules.is_empty() => Ok(TargetSet::Modules(modules.to_vec())),
            AdapterTargets::Modules => Err(HealError::Config("targets: MODULES with no module names".into())),
            AdapterTargets::Unspecified => Err(HealError::Config("targets: not set".into())),
        }
    }
}

impl FromStr for TargetSet {
    type Err = String;
    /// `ffn`, `all-linear`, `attention`, or module names separated by commas.
    fn from_str(s: &str) -> Result<Self, String> {
        use prunesweep_proto::Vocabulary;
        match AdapterTargets::from_name(s) {
            Some(AdapterTargets::Ffn) => Ok(TargetSet::Ffn),
            Some(AdapterTargets::AllLinear) => Ok(TargetSet::AllLinear),
            Some(AdapterTargets::Attention) => Ok(TargetSet::Attention),
            _ => {
                let names: Vec<String> = s.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
                if names.is_empty() {
                    return Err("give ffn, all-linear, attention or module names (q_proj,v_proj)".into());
                }
                Ok(TargetSet::Modules(names))
            }
        }
    }
}

/// The settings of a healing run. [`Default`] is the paper's (App. A.1), from the contract's
/// [`QLoraSettings::paper`]: the same run a sweep's heal variant gets when its file is silent.
#[derive(Debug, Clone, PartialEq)]
pub struct HealConfig {
    /// Optimizer updates.
    pub steps: usize,
    /// Sequences per update (global batch).
    pub batch: usize,
    /// Sequences per forward/backward pass; `batch / micro_batch` passes are accumulated.
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// LoRA rank r.
    pub rank: usize,
    /// LoRA α; the update is scaled by α / r.
    pub alpha: f64,
    /// Dropout on the adapters' input.
    pub dropout: f32,
    /// Which projections get adapters.
    pub targets: TargetSet,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup updates (then cosine decay to 0, the only schedule there is).
    pub warmup: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Seeds adapter init, dropout and nothing else (the data order is fixed).
    pub seed: u64,
    /// Write a checkpoint every K updates (and at the end).
    pub checkpoint_every: usize,
    /// Freeze the base in NF4 (QLoRA); `false` trains against the dense base (plain LoRA).
    pub quantize: bool,
    /// Which decoder blocks keep their activations for the backward pass; the others are
    /// recomputed from their saved inputs ([`super::gradients`]): the same gradients either way.
    /// Not part of a checkpoint's fingerprint: a run may be resumed with another choice.
    pub recompute: Recompute,
}

/// Which decoder blocks keep their autograd graphs for the backward pass; the others are run
/// again in it from their saved inputs ([`super::gradients`]). Each kept graph saves one
/// block's forward pass per micro-batch (with every block recomputed a step does ~1.4× the work
/// of full backpropagation) and costs that block's activations in memory
/// ([`prunesweep_proto::memory::Training::block_graph_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recompute {
    /// As many of the top blocks keep their graphs as the device's free memory holds when
    /// training starts, beyond what the run needs with every block recomputed
    /// ([`super::gradients::graphs_that_fit`]): full backpropagation's speed where the memory is
    /// there, recomputation's memory where it is not. The default.
    Fit,
    /// Exactly the top `n` blocks keep their graphs: 0 recomputes every block (the least
    /// memory), `usize::MAX` none (full backpropagation).
    Top(usize),
}

impl Recompute {
    /// Full backpropagation: every block keeps its graph.
    pub const NONE: Recompute = Recompute::Top(usize::MAX);
    /// Every block recomputed: the least memory.
    pub const ALL: Recompute = Recompute::Top(0);
}

impl FromStr for Recompute {
    type Err = String;
    /// `fit`, `all` (every graph kept), or a number of top blocks.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fit" => Ok(Recompute::Fit),
            "all" => Ok(Recompute::NONE),
            n => n.parse().map(Recompute::Top).map_err(|_| {
                format!(
                    "`{n}`: give `fit` (as many as the free memory holds), `all`, or how many of the top blocks \
                     keep theirs (0: every block is recomputed)"
                )
            }),
        }
    }
}

impl Default for HealConfig {
    fn default() -> Self {
        HealConfig::from_pb(&QLoraSettings::paper(), 0).expect("the paper's settings are complete")
    }
}

impl HealConfig {
    /// The contract's settings (a job's, or the paper's), with the job's `seed`.
    pub fn from_pb(q: &QLoraSettings, seed: u64) -> Result<Self, HealError> {
        if q.schedule() != LrSchedule::Cosine {
            return Err(HealError::Config(format!(
                "schedule: {:?} is not one this worker runs (cosine)",
                q.schedule()
            )));
        }
        let cfg = HealConfig {
            steps: q.steps as usize,
            batch: q.batch_size as usize,
            micro_batch: q.micro_batch_size as usize,
            seq_len: q.seq_len as usize,
            rank: q.rank as usize,
            alpha: q.alpha,
            dropout: q.dropout as f32,
            targets: TargetSet::from_pb(q.targets(), &q.target_modules)?,
            lr: q.learning_rate,
            warmup: q.warmup_steps as usize,
            weight_decay: q.weight_decay,
            max_grad_norm: q.max_grad_norm,
            seed,
            checkpoint_every: q.checkpoint_every as usize,
            quantize: q.quantize_base,
            // The contract has no setting for it: a sweep's heal uses the memory its worker has.
            recompute: Recompute::Fit,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The adapters' settings for `decoder` (targets resolved for its family).
    pub fn lora(&self, decoder: &Decoder) -> LoraSpec {
        LoraSpec { rank: self.rank, alpha: self.alpha, dropout: self.dropout, targets: self.targets.resolve(decoder) }
    }

    /// Checks ranges that do not depend on the model (rank and targets are checked on attach).
    pub fn validate(&self) -> Result<(), HealError> {
        let bad = |m: String| Err(HealError::Config(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be a positive number, got {}", self.lr));
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.micro_batch == 0 || self.batch == 0 || self.batch % self.micro_batch != 0 {
            return bad(format!(
                "--batch ({}) must be a positive multiple of --micro-batch ({})",
                self.batch, self.micro_batch
            ));
        }
        if self.seq_len < 2 {
            return bad(format!("--seq-len must be at least 2 tokens, got {}", self.seq_len));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("--dropout must be in [0, 1), got {}", self.dropout));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("--alpha must be positive, got {}", self.alpha));
        }
        if self.checkpoint_every == 0 {
            return bad("--checkpoint-every must be at least 1".into());
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return bad(format!("the gradient clip must be positive, got {}", self.max_grad_norm));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("--weight-decay must be ≥ 0, got {}", self.weight_decay));
        }
        Ok(())
    }

    /// Micro-batches per update.
    pub fn accumulation(&self) -> usize {
        self.batch / self.micro_batch
    }
}

/// The healing stage's input: the settings and the training data.
#[derive(Debug, Clone, PartialEq)]
pub struct HealSpec {
    /// Training text (C4 train): JSON lines / json.gz with `text`, Parquet with `text`, or text.
    pub data: PathBuf,
    /// Documents skipped before packing (keeps healing apart from scoring and evaluation).
    pub first_doc: usize,
    /// The run's settings.
    pub config: HealConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_graphs_reads_fit_all_or_a_count_and_names_the_choices_otherwise() {
        assert_eq!("fit".parse(), Ok(Recompute::Fit));
        assert_eq!("all".parse(), Ok(Recompute::NONE));
        assert_eq!("0".parse(), Ok(Recompute::ALL));
        assert_eq!("12".parse(), Ok(Recompute::Top(12)));
        let e = "-1".parse::<Recompute>().unwrap_err();
        assert!(e.contains("`-1`") && e.contains("`fit`") && e.contains("`all`"), "{e}");
        // A sweep's heal uses the memory its worker has.
        assert_eq!(HealConfig::default().recompute, Recompute::Fit);
    }
}

//! The checks a parsed sweep file must pass before it is expanded: each names the field
//! (`heal[1].qlora.micro_batch_size`) and what to write instead.

use std::collections::HashSet;

use prunesweep_proto::v1::{AdapterTargets, Dtype, EvalTaskKind, LrSchedule, PruneMethod};
use prunesweep_proto::Vocabulary;

use super::{EvalTaskSpec, QLoraSpec, SweepError, SweepSpec, TargetModules};

/// Builds the error for one field of one file.
struct Check<'a> {
    file: &'a str,
}

impl Check<'_> {
    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> SweepError {
        SweepError::Invalid { file: self.file.to_string(), field: field.into(), message: message.into() }
    }
}

/// An enum value that serde accepts but the contract does not (`unspecified`).
fn named<T: Vocabulary + PartialEq>(value: T, unset: T) -> Result<(), String> {
    if value == unset {
        let known: Vec<String> = T::all().into_iter().map(T::name).collect();
        return Err(format!("`unspecified` is not a {}; use one of {}", T::WHAT, known.join(", ")));
    }
    Ok(())
}

impl SweepSpec {
    /// Checks what serde cannot: consistency between fields, ranges, duplicates.
    pub(super) fn validate(&self, file: &str) -> Result<(), SweepError> {
        let check = Check { file };
        self.validate_sizes(file)?;
        self.validate_models(&check)?;
        if self.methods.is_empty() {
            return Err(check.invalid("methods", "list at least one of angular, deepest, block-influence"));
        }
        for (i, &m) in self.methods.iter().enumerate() {
            named(m, PruneMethod::Unspecified).map_err(|e| check.invalid(format!("methods[{i}]"), e))?;
        }
        if self.fractions.is_empty() && self.n.is_empty() {
            return Err(check.invalid("fractions", "give `fractions` (in [0, 1)) or `n` (layer counts)"));
        }
        if self.methods.iter().any(|&m| needs_scores(m)) && self.calibration.is_none() {
            return Err(check.invalid("calibration", "required by the angular and block-influence methods"));
        }
        if let Some(c) = &self.calibration {
            if c.samples == 0 || c.seq_len < 2 || c.batch_size == 0 {
                return Err(check.invalid("calibration", "samples and batch_size must be > 0, seq_len ≥ 2"));
            }
        }
        self.validate_heal(&check)?;
        self.validate_eval(&check)?;
        if self.max_attempts == 0 {
            return Err(check.invalid("max_attempts", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_models(&self, check: &Check) -> Result<(), SweepError> {
        if self.models.is_empty() {
            return Err(check.invalid("models", "list at least one model"));
        }
        let mut names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = format!("models[{i}]");
            if m.name.is_empty() {
                return Err(check.invalid(format!("{field}.name"), "must not be empty"));
            }
            if !names.insert(m.name.as_str()) {
                return Err(check.invalid(format!("{field}.name"), format!("duplicate model name {:?}", m.name)));
            }
            match (&m.path, &m.hf) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(check.invalid(field, "give exactly one of `path` and `hf`"));
                }
                (Some(p), None) if p.is_empty() => return Err(check.invalid(format!("{field}.path"), "is empty")),
                (None, Some(h)) if !h.contains('/') => {
                    return Err(check.invalid(format!("{field}.hf"), format!("expected `org/name`. Given: {h:?}")));
                }
                _ => {}
            }
            if let Some(shape) = &m.shape {
                shape.validate().map_err(|e| check.invalid(format!("{field}.shape"), e.to_string()))?;
            }
            if m.revision.is_some() && m.hf.is_none() {
                return Err(check.invalid(format!("{field}.revision"), "only applies to `hf` models"));
            }
            if let Some(dtype) = m.dtype {
                named(dtype, Dtype::Unspecified).map_err(|m| check.invalid(format!("{field}.dtype"), m))?;
            }
        }
        Ok(())
    }

    fn validate_heal(&self, check: &Check) -> Result<(), SweepError> {
        if self.heal.is_empty() {
            return Err(check.invalid("heal", "list at least one variant (`- name: none` for no healing)"));
        }
        let mut heal_names = HashSet::new();
        for (i, h) in self.heal.iter().enumerate() {
            if !heal_names.insert(h.name.as_str()) {
                return Err(check.invalid(format!("heal[{i}].name"), format!("duplicate heal variant {:?}", h.name)));
            }
            if h.qlora.is_some() && h.name == "none" {
                return Err(check.invalid(format!("heal[{i}].name"), "`none` cannot have qlora settings"));
            }
            if let Some(q) = &h.qlora {
                validate_qlora(q)
                    .map_err(|(field, message)| check.invalid(format!("heal[{i}].qlora.{field}"), message))?;
            }
        }
        Ok(())
    }

    fn validate_eval(&self, check: &Check) -> Result<(), SweepError> {
        let mut tasks = HashSet::new();
        for (i, e) in self.eval.iter().enumerate() {
            named(e.task, EvalTaskKind::Unspecified).map_err(|m| check.invalid(format!("eval[{i}].task"), m))?;
            if !tasks.insert(e.task) {
                return Err(check.invalid(format!("eval[{i}].task"), format!("duplicate task {}", e.task.name())));
            }
            let mmlu = matches!(e.task, EvalTaskKind::Mmlu | EvalTaskKind::MmluCloze);
            let only = |field: &str, given: bool, applies: bool, to: &str| {
                if given && !applies {
                    let message = format!("only applies to {to}, not {}", e.task.name());
                    return Err(check.invalid(format!("eval[{i}].{field}"), message));
                }
                Ok(())
            };
            only("shots", e.shots.is_some(), e.task == EvalTaskKind::Mmlu, "mmlu")?;
            only("limit_per_subject", e.limit_per_subject.is_some(), mmlu, "mmlu and mmlu-cloze")?;
            only("dev_path", e.dev_path.is_some(), e.task == EvalTaskKind::Mmlu, "mmlu")?;
            only("first_doc", e.first_doc.is_some(), e.task == EvalTaskKind::C4Loss, "c4-loss")?;
            only("seq_len", e.seq_len.is_some(), e.task == EvalTaskKind::C4Loss, "c4-loss")?;
            if e.batch_size == Some(0) {
                return Err(check.invalid(format!("eval[{i}].batch_size"), "must be at least 1"));
            }
            if e.seq_len.is_some_and(|t| t < 2) {
                return Err(check.invalid(format!("eval[{i}].seq_len"), "must be at least 2 tokens"));
            }
            if e.task == EvalTaskKind::C4Loss && e.first_doc.is_none() {
                self.check_loss_apart_from_healing(i, e, check)?;
            }
        }
        Ok(())
    }

    /// A loss measured on the documents the model was healed on says nothing about the cut: when
    /// `eval[i]` (c4-loss, no `first_doc`) reads the file a heal variant trains on, both start at
    /// its first document, so the sweep is refused until `first_doc` says where evaluation starts
    /// (set it explicitly, even to 0, to accept the overlap).
    fn check_loss_apart_from_healing(&self, i: usize, e: &EvalTaskSpec, check: &Check) -> Result<(), SweepError> {
        for h in &self.heal {
            let Some(q) = self.resolve_heal(h).qlora else { continue };
            if q.data.as_deref() == Some(e.path.as_str()) && q.data_first_doc == 0 {
                let tokens = u64::from(q.steps) * u64::from(q.batch_size) * u64::from(q.seq_len);
                return Err(check.invalid(
                    format!("eval[{i}].first_doc"),
                    format!(
                        "c4-loss reads {} from its first document, and heal variant {:?} trains on the \
                         same file from its first document ({tokens} tokens: steps × batch_size × seq_len); \
                         set `first_doc` to a document past those (or to 0 to measure on them anyway)",
                        e.path, h.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether cells with this method wait for the model's score job (all but `deepest`).
pub fn needs_scores(method: PruneMethod) -> bool {
    !matches!(method, PruneMethod::Deepest)
}

/// The ranges of one variant's settings: `Err((field, message))`.
fn validate_qlora(q: &QLoraSpec) -> Result<(), (&'static str, String)> {
    let positive =
        |field: &'static str, v: u32| if v == 0 { Err((field, "must be at least 1".to_string())) } else { Ok(()) };
    positive("rank", q.rank)?;
    positive("steps", q.steps)?;
    positive("batch_size", q.batch_size)?;
    positive("checkpoint_every", q.checkpoint_every)?;
    if let Some(micro) = q.micro_batch_size {
        positive("micro_batch_size", micro)?;
        if !q.batch_size.is_multiple_of(micro) {
            let m = format!("batch_size ({}) must be a multiple of micro_batch_size ({micro})", q.batch_size);
            return Err(("micro_batch_size", m));
        }
    }
    if q.seq_len < 2 {
        return Err(("seq_len", format!("must be at least 2 tokens. Given: {}", q.seq_len)));
    }
    if !(0.0..1.0).contains(&q.dropout) {
        return Err(("dropout", format!("must be in [0, 1). Given: {}", q.dropout)));
    }
    let finite_positive = |v: f64| v.is_finite() && v > 0.0;
    if let Some(a) = q.alpha.filter(|&a| !finite_positive(a)) {
        return Err(("alpha", format!("must be a positive number. Given: {a}")));
    }
    if !finite_positive(q.learning_rate) {
        return Err(("learning_rate", format!("must be a positive number. Given: {}", q.learning_rate)));
    }
    if !(q.weight_decay.is_finite() && q.weight_decay >= 0.0) {
        return Err(("weight_decay", format!("must be ≥ 0. Given: {}", q.weight_decay)));
    }
    if !finite_positive(q.max_grad_norm) {
        return Err(("max_grad_norm", format!("must be a positive number. Given: {}", q.max_grad_norm)));
    }
    named(q.schedule, LrSchedule::Unspecified).map_err(|m| ("schedule", m))?;
    match &q.target_modules {
        TargetModules::Set(AdapterTargets::Unspecified | AdapterTargets::Modules) => {
            Err(("target_modules", "name a set (ffn, all-linear, attention) or list module names".into()))
        }
        TargetModules::Modules(m) if m.iter().any(|name| name.is_empty()) => {
            Err(("target_modules", "module names must not be empty".into()))
        }
        _ => Ok(()),
    }
}

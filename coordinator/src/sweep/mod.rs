//! Sweep files (`experiments/*.yaml`): parse, validate, and expand into jobs with content keys.
//!
//! - [`file`]: the schema a person writes (serde; unknown keys rejected, fixed defaults filled);
//! - [`validate`]: the checks serde cannot make, each naming its field;
//! - [`expand`]: the validated sweep → [`PlannedJob`]s, every setting resolved into the
//!   [`JobSpec`](crate::spec::JobSpec) and so into the key, each with its predicted peak memory
//!   ([`JobMemory`]) where the model's shape is known ([`shape`]).
//!
//! [`SweepSpec::parse`] runs the first two with serde-saphyr (budgets on; every error names the
//! line/column and the field); submitting the same file again adds nothing and an extended file
//! adds only the new cells.

mod expand;
mod file;
mod limits;
pub mod shape;
mod validate;

pub use expand::{JobMemory, PlannedJob};
pub use file::{
    CalibrationSpec, EvalTaskSpec, Fraction, HealVariant, ModelSpec, QLoraSpec, SweepName, SweepSpec, TargetModules,
};
pub use limits::{
    DEFAULT_MAX_JOBS_PER_SUBMIT, MAX_AMOUNTS, MAX_DESCRIPTION_LEN, MAX_LIST_LEN, MAX_N, MAX_NAME_LEN, MAX_PATH_LEN,
};
pub use validate::needs_scores;

/// Errors from reading a sweep file.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The YAML is malformed, has an unknown key, a bad value, or breaks a parser budget. The
    /// message names the line and column.
    #[error("{file}: {error}")]
    Yaml {
        /// The file name (or `<input>`).
        file: String,
        /// serde-saphyr's error, with location and snippet (in the message, so not also a `source`).
        error: Box<serde_saphyr::Error>,
    },
    /// The YAML parsed but the sweep is inconsistent (e.g. no fractions and no `n`).
    #[error("{file}: `{field}`: {message}")]
    Invalid {
        /// The file name (or `<input>`).
        file: String,
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The sweep plans more jobs than one submit may add (counted before any is built).
    #[error(
        "{file}: the sweep expands to {count} jobs (models × methods × (fractions + n) × heal variants, plus \
         score and baseline jobs), over the limit of {cap} per submit; split it into smaller sweeps, or raise \
         the limit with `coordinator serve --max-jobs-per-submit N`"
    )]
    TooManyJobs {
        /// The file name (or `<input>`).
        file: String,
        /// The jobs the sweep would plan.
        count: u64,
        /// The limit.
        cap: u64,
    },
}

impl SweepSpec {
    /// Parse and validate a sweep file's text. `file` names the file in error messages. The
    /// job count is not checked here: callers check it with
    /// [`check_job_count`](SweepSpec::check_job_count) against their own limit before expanding.
    pub fn parse(yaml: &str, file: &str) -> Result<Self, SweepError> {
        // Sweep files are small: budgets far below serde-saphyr's defaults.
        let mut budget = serde_saphyr::Budget::default();
        budget.max_reader_input_bytes = Some(4 * 1024 * 1024);
        budget.max_events = 200_000;
        budget.max_aliases = 1_000;
        budget.max_anchors = 1_000;
        budget.max_depth = 32;
        budget.max_nodes = 100_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        let spec: SweepSpec = serde_saphyr::from_str_with_options(yaml, options)
            .map_err(|e| SweepError::Yaml { file: file.to_string(), error: Box::new(e) })?;
        spec.validate(file)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use prunesweep_proto::v1::{AdapterTargets, PruneMethod};

    use super::*;
    use crate::job::JobKind;
    use crate::spec::Amount;

    fn tiny() -> &'static str {
        "name: tiny\n\
         models:\n  - name: tiny-llama\n    path: worker/tests/fixtures/tiny-llama\n\
         calibration:\n  path: data.jsonl\n  samples: 4\n  seq_len: 16\n\
         methods: [angular, deepest]\n\
         fractions: [0.25, 0.5]\n\
         eval:\n  - task: c4-loss\n    path: data.jsonl\n    limit: 4\n"
    }

    fn parse(yaml: &str) -> Result<SweepSpec, SweepError> {
        SweepSpec::parse(yaml, "test.yaml")
    }

    #[test]
    fn tiny_expands_to_score_baseline_and_cells() {
        let spec = parse(tiny()).unwrap();
        let jobs = spec.expand();
        let kinds: Vec<_> = jobs.iter().map(|j| j.spec.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == JobKind::Score).count(), 1);
        assert_eq!(kinds.iter().filter(|k| **k == JobKind::Baseline).count(), 1);
        assert_eq!(kinds.iter().filter(|k| **k == JobKind::Cell).count(), 4);
        assert_eq!(kinds[0], JobKind::Score);
        let score_key = jobs[0].key.clone();
        for j in &jobs[2..] {
            match j.spec.method.unwrap() {
                PruneMethod::Angular => assert_eq!(j.depends_on.as_deref(), Some(score_key.as_str())),
                PruneMethod::Deepest => assert_eq!(j.depends_on, None),
                other => unreachable!("{other:?}"),
            }
        }
    }

    #[test]
    fn keys_are_stable_and_extension_adds_only_new_cells() {
        let a = parse(tiny()).unwrap().expand();
        let b = parse(tiny()).unwrap().expand();
        assert_eq!(a, b);
        let extended = tiny().replace("[0.25, 0.5]", "[0.25, 0.5, 0.75]");
        let c = parse(&extended).unwrap().expand();
        let old: HashSet<_> = a.iter().map(|j| j.key.clone()).collect();
        let new: Vec<_> = c.iter().filter(|j| !old.contains(&j.key)).collect();
        assert_eq!(new.len(), 2, "one new fraction x two methods");
        assert!(new.iter().all(|j| j.spec.amount == Some(Amount::Fraction(0.75))));
    }

    #[test]
    fn deepest_only_needs_no_score_job_nor_calibration() {
        let yaml = "name: d\nmodels: [{name: m, path: m.gguf}]\nmethods: [deepest]\nn: [1, 2]\nbaseline: false\n";
        let jobs = parse(yaml).unwrap().expand();
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.spec.kind == JobKind::Cell && j.depends_on.is_none()));
    }

    const QLORA_R8: &str = "heal:\n  - name: none\n  - name: qlora-r8\n    qlora: {rank: 8, alpha: 16, steps: 10, learning_rate: 0.0003}\n";

    #[test]
    fn heal_variants_multiply_cells_and_none_has_no_heal() {
        let yaml = tiny().replace("limit: 4\n", "limit: 4\n    first_doc: 100\n") + QLORA_R8;
        let jobs = parse(&yaml).unwrap().expand();
        let cells: Vec<_> = jobs.iter().filter(|j| j.spec.kind == JobKind::Cell).collect();
        assert_eq!(cells.len(), 8);
        assert_eq!(cells.iter().filter(|j| j.spec.heal.is_none()).count(), 4);
        assert_eq!(cells.iter().filter(|j| j.spec.heal_name() == "qlora-r8").count(), 4);
    }

    #[test]
    fn loss_on_the_healing_documents_is_refused_until_first_doc_is_set() {
        // The heal variant trains on the calibration file (its default), which c4-loss also reads.
        let err = parse(&(tiny().to_string() + QLORA_R8)).unwrap_err().to_string();
        assert!(err.contains("`eval[0].first_doc`") && err.contains("\"qlora-r8\""), "{err}");
        assert!(err.contains("327680 tokens"), "10 steps x 16 x 2048 (the paper's batch and length): {err}");
        // Any explicit value is accepted (0 = measure on the healing documents knowingly); the
        // field reaches the job's content and so its key.
        for first in [0, 500] {
            let yaml = tiny().replace("limit: 4\n", &format!("limit: 4\n    first_doc: {first}\n")) + QLORA_R8;
            let jobs = parse(&yaml).unwrap().expand();
            assert!(jobs[1].spec.canonical_json().contains(&format!("\"first_doc\":{first}")));
        }
        // Healing on another file: nothing to refuse.
        let other = QLORA_R8.replace("learning_rate: 0.0003", "learning_rate: 0.0003, data: other.jsonl");
        parse(&(tiny().to_string() + &other)).unwrap();
    }

    #[test]
    fn eval_fields_apply_to_their_tasks_only() {
        let with_task = |task: &str, extra: &str| {
            tiny().replace(
                "task: c4-loss\n    path: data.jsonl\n    limit: 4\n",
                &format!("task: {task}\n    path: d\n{extra}"),
            )
        };
        for (task, extra, field) in [
            ("boolq", "    first_doc: 3\n", "`eval[0].first_doc`"),
            ("boolq", "    shots: 5\n", "`eval[0].shots`"),
            ("mmlu-cloze", "    shots: 5\n", "`eval[0].shots`"),
            ("c4-loss", "    limit_per_subject: 5\n", "`eval[0].limit_per_subject`"),
            ("mmlu", "    seq_len: 64\n", "`eval[0].seq_len`"),
        ] {
            let err = parse(&with_task(task, extra)).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("only applies to"), "{task} {extra}: {err}");
        }
        let spec =
            parse(&with_task("mmlu", "    shots: 5\n    limit_per_subject: 5\n    dev_path: dev.jsonl\n")).unwrap();
        assert_eq!(spec.eval[0].limit_per_subject, Some(5));
        parse(&with_task("mmlu-cloze", "    limit_per_subject: 2\n")).unwrap();
    }

    #[test]
    fn every_setting_is_resolved_into_the_spec_and_key() {
        let yaml = tiny().replace("limit: 4\n", "limit: 4\n    first_doc: 100\n") + QLORA_R8;
        let jobs = parse(&yaml).unwrap().expand();
        let cell = jobs.iter().find(|j| j.spec.heal.is_some()).unwrap();
        let q = cell.spec.heal.as_ref().unwrap().qlora.as_ref().unwrap();
        // Paper defaults where the file is silent, rules where a default depends on another setting.
        assert_eq!((q.batch_size, q.micro_batch_size, q.seq_len, q.checkpoint_every), (16, Some(4), 2048, 100));
        assert_eq!((q.alpha, q.warmup_steps), (Some(16.0), Some(1)), "alpha as given; warmup a tenth of 10 steps");
        assert_eq!(q.target_modules, TargetModules::Set(AdapterTargets::Ffn));
        assert_eq!(q.data.as_deref(), Some("data.jsonl"), "the calibration data");
        let json = cell.spec.canonical_json();
        for field in
            ["\"micro_batch_size\":4", "\"warmup_steps\":1", "\"target_modules\":\"ffn\"", "\"schedule\":\"cosine\""]
        {
            assert!(json.contains(field), "{field} in {json}");
        }
        let e = &cell.spec.eval[0];
        assert_eq!((e.limit, e.seq_len, e.first_doc, e.batch_size), (Some(4), Some(512), Some(100), Some(8)));
        assert!(json.contains("\"batch_size\":8"), "{json}");
        let score = &jobs[0].spec.calibration.as_ref().unwrap();
        assert_eq!(score.batch_size, 8);
    }

    #[test]
    fn a_default_written_out_keeps_the_key_and_a_changed_setting_moves_it() {
        let yaml = tiny().replace("limit: 4\n", "limit: 4\n    first_doc: 100\n") + QLORA_R8;
        let keys = |yaml: &str| -> Vec<String> { parse(yaml).unwrap().expand().into_iter().map(|j| j.key).collect() };
        let base = keys(&yaml);
        let explicit = yaml
            .replace(
                "learning_rate: 0.0003}",
                "learning_rate: 0.0003, micro_batch_size: 4, warmup_steps: 1, target_modules: ffn}",
            )
            .replace("first_doc: 100\n", "first_doc: 100\n    batch_size: 8\n    seq_len: 512\n");
        assert_eq!(keys(&explicit), base, "the defaults written out are the same jobs");
        for (from, to) in [
            ("learning_rate: 0.0003}", "learning_rate: 0.0003, micro_batch_size: 2}"),
            ("learning_rate: 0.0003}", "learning_rate: 0.0003, warmup_steps: 0}"),
            ("learning_rate: 0.0003}", "learning_rate: 0.0003, target_modules: all-linear}"),
            ("learning_rate: 0.0003}", "learning_rate: 0.0003, checkpoint_every: 5}"),
            ("first_doc: 100\n", "first_doc: 100\n    batch_size: 4\n"),
            ("path: worker/tests/fixtures/tiny-llama\n", "path: worker/tests/fixtures/tiny-llama\n    dtype: bf16\n"),
        ] {
            let changed = keys(&yaml.replace(from, to));
            let moved = changed.iter().filter(|k| !base.contains(k)).count();
            assert!(moved > 0, "{to}: no key moved");
        }
    }

    #[test]
    fn heal_settings_are_checked_and_named() {
        let with = |extra: &str| {
            tiny().replace("limit: 4\n", "limit: 4\n    first_doc: 100\n")
                + &QLORA_R8.replace("learning_rate: 0.0003}", &format!("learning_rate: 0.0003, {extra}}}"))
        };
        for (extra, field) in [
            ("micro_batch_size: 3", "`heal[1].qlora.micro_batch_size`"),
            ("micro_batch_size: 0", "`heal[1].qlora.micro_batch_size`"),
            ("checkpoint_every: 0", "`heal[1].qlora.checkpoint_every`"),
            ("max_grad_norm: 0", "`heal[1].qlora.max_grad_norm`"),
            ("alpha: -1", "`heal[1].qlora.alpha`"),
        ] {
            let err = parse(&with(extra).replace("alpha: 16, ", "")).unwrap_err().to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
        // The micro-batch defaults to 4 where 4 divides the batch, else to the batch.
        for (batch, micro) in [(8, 4), (6, 6), (2, 2)] {
            let jobs = parse(&with(&format!("batch_size: {batch}"))).unwrap().expand();
            let q = jobs.iter().find_map(|j| j.spec.heal.as_ref()).unwrap().qlora.clone().unwrap();
            assert_eq!(q.micro_batch_size, Some(micro), "batch {batch}");
        }
        let err = parse(&with("target_modules: fnn")).unwrap_err().to_string();
        assert!(err.contains("`target_modules` is `ffn`, `all-linear`, `attention`") && err.contains("fnn"), "{err}");
        let spec = parse(&with("target_modules: [q_proj, v_proj]")).unwrap();
        let q = spec.heal[1].qlora.as_ref().unwrap();
        assert_eq!(q.target_modules, TargetModules::Modules(vec!["q_proj".into(), "v_proj".into()]));
        let model = "path: worker/tests/fixtures/tiny-llama\n";
        let bf16 = parse(&tiny().replace(model, &format!("{model}    dtype: bf16\n"))).unwrap().expand();
        assert!(bf16.iter().all(|j| j.spec.model.dtype == Some(prunesweep_proto::v1::Dtype::Bf16)));
        for (dtype, says) in [("unspecified", "`unspecified` is not a dtype; use one of f32, bf16"), ("fp8", "fp8")] {
            let err = parse(&tiny().replace(model, &format!("{model}    dtype: {dtype}\n"))).unwrap_err().to_string();
            assert!(err.contains(says), "{dtype}: {err}");
        }
        let err = parse(&tiny().replace("[angular, deepest]", "[angular, unspecified]")).unwrap_err().to_string();
        assert!(err.contains("`methods[1]`") && err.contains("angular, deepest, block-influence"), "{err}");
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let jobs = parse(tiny()).unwrap().expand();
        let json = jobs[0].spec.canonical_json();
        assert!(json.starts_with("{\"calibration\":"), "{json}");
        assert_eq!(jobs[0].key.len(), 64);
    }

    #[test]
    fn fraction_outside_unit_interval_names_line_and_field() {
        let err = parse(&tiny().replace("[0.25, 0.5]", "[0.25, 1.0]")).unwrap_err().to_string();
        assert!(err.contains("`fractions` must be in [0, 1). Given: 1"), "{err}");
        assert!(err.contains("line 10"), "{err}");
        let err = parse(&tiny().replace("[0.25, 0.5]", "[-0.1]")).unwrap_err().to_string();
        assert!(err.contains("Given: -0.1"), "{err}");
    }

    #[test]
    fn unknown_method_is_an_error_with_location() {
        let err = parse(&tiny().replace("[angular, deepest]", "[angular, shallowest]")).unwrap_err().to_string();
        assert!(err.contains("shallowest"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = parse(&(tiny().to_string() + "retries: 3\n")).unwrap_err().to_string();
        assert!(err.contains("retries"), "{err}");
        assert!(err.contains("line 15"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        let err = parse("name: x\nmodels: [unclosed\n").unwrap_err().to_string();
        assert!(err.contains("test.yaml"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn consistency_errors_name_the_field() {
        let cases = [
            ("name: x\nmodels: []\nmethods: [deepest]\nn: [1]\n", "`models`"),
            ("name: x\nmodels: [{name: m, path: a, hf: o/m}]\nmethods: [deepest]\nn: [1]\n", "`models[0]`"),
            ("name: x\nmodels: [{name: m, path: a}]\nmethods: [angular]\nn: [1]\n", "`calibration`"),
            ("name: x\nmodels: [{name: m, path: a}]\nmethods: [deepest]\n", "`fractions`"),
            ("name: 'a b'\nmodels: [{name: m, path: a}]\nmethods: [deepest]\nn: [1]\n", "`name`"),
        ];
        for (yaml, field) in cases {
            let err = parse(yaml).unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn repo_sweep_files_parse() {
        for file in ["smollm2-demo.yaml", "tiny-test.yaml"] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/").to_string() + file;
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = parse(&text).unwrap_or_else(|e| panic!("{e}"));
            assert!(!spec.expand().is_empty());
        }
    }
}

//! Evaluation after a cut: what the sweep measures (Gromov et al. 2024, §4 and App. A.2).
//!
//! - [`mmlu`]: MMLU in the original Hendrycks letter format (k-shot, default 5) and the cloze form
//!   small-model papers use;
//! - [`boolq`]: BoolQ 0-shot, `" yes"` vs `" no"`;
//! - [`c4_loss`]: token-weighted next-token loss on held-out C4 documents, also divided by `ln V`.
//!
//! Speed comes from doing less work than a plain loop, never from changing the answer: prompts are
//! tokenized whole (exactly as the plain path), the longest common token prefix of a group of
//! prompts (MMLU's few-shot header) is run once and its keys/values shared by the group's
//! questions, which run packed end to end after it ([`Layout::Packed`]: no padding, attention
//! span by span); a cloze question's context runs once with its answers as continuations, many
//! questions a pass ([`Layout::Tree`]); C4 documents run packed; and only the positions that are
//! scored go through the final norm and the LM head, a bounded number of rows at a time, their
//! log-normaliser in one fused pass.

pub mod boolq;
pub mod c4_loss;
pub mod mmlu;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::Serialize;

use prunesweep_proto::v1::EvalTaskKind;
use prunesweep_proto::Vocabulary;

use crate::data::{read_document_range, DataError};
use crate::model::log_sum_exp::log_sum_exp;
use crate::model::packing::{Packing, Segment};
use crate::model::{Decoder, KvCache, Model, ModelError, Tokenizer};

/// Why an evaluation could not run. Messages name the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A data file could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A row of a data file is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line (CSV: the line the record starts on).
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A file the task needs is absent.
    #[error("{} is missing: {hint}", path.display())]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// Why it is needed.
        hint: String,
    },
    /// The task was asked for in a way it cannot run.
    #[error("{0}")]
    Invalid(String),
}

/// The tasks `worker eval` runs (the contract's [`EvalTaskKind`], which names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// MMLU, Hendrycks letter format, k-shot (default 5).
    Mmlu,
    /// MMLU cloze: length-normalised log-likelihood of each answer text, 0-shot.
    MmluCloze,
    /// BoolQ, 0-shot.
    Boolq,
    /// Next-token loss on C4 documents.
    C4Loss,
}

impl Task {
    /// The name used on the command line, in result files and in sweep files.
    pub fn name(self) -> String {
        EvalTaskKind::from(self).name()
    }
}

impl From<Task> for EvalTaskKind {
    fn from(t: Task) -> Self {
        match t {
            Task::Mmlu => EvalTaskKind::Mmlu,
            Task::MmluCloze => EvalTaskKind::MmluCloze,
            Task::Boolq => EvalTaskKind::Boolq,
            Task::C4Loss => EvalTaskKind::C4Loss,
        }
    }
}

impl TryFrom<EvalTaskKind> for Task {
    type Error = EvalError;
    fn try_from(k: EvalTaskKind) -> Result<Self, EvalError> {
        match k {
            EvalTaskKind::Mmlu => Ok(Task::Mmlu),
            EvalTaskKind::MmluCloze => Ok(Task::MmluCloze),
            EvalTaskKind::Boolq => Ok(Task::Boolq),
            EvalTaskKind::C4Loss => Ok(Task::C4Loss),
            EvalTaskKind::Unspecified => Err(EvalError::Invalid("the eval task is not set".into())),
        }
    }
}

/// One evaluation: which task on which data, with every setting that moves its number.
/// [`EvalSpec::new`] fills in the contract's defaults for the task, the same a sweep's eval task
/// gets when its file is silent.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    /// Which task.
    pub task: Task,
    /// MMLU: the CSV folder, a cais/mmlu Parquet or JSON lines; BoolQ: JSON lines or Parquet;
    /// c4-loss: JSON lines / json.gz / Parquet / text.
    pub data: PathBuf,
    /// MMLU few-shot examples when `data` is not the CSV folder with its `dev/`.
    pub dev: Option<PathBuf>,
    /// At most this many items (c4-loss: documents).
    pub limit: Option<usize>,
    /// MMLU: the first this many questions of each subject.
    pub limit_per_subject: Option<usize>,
    /// MMLU letter form: examples per prompt.
    pub shots: usize,
    /// c4-loss: tokens per document.
    pub seq_len: usize,
    /// c4-loss: documents skipped first (kept apart from calibration and healing).
    pub first_doc: usize,
    /// Sequences per forward pass.
    pub batch: usize,
}

impl EvalSpec {
    /// `task` on `data` with the task's defaults.
    pub fn new(task: Task, data: impl Into<PathBuf>) -> Self {
        let d = prunesweep_proto::v1::EvalTask::with_defaults(task.into(), "");
        EvalSpec {
            task,
            data: data.into(),
            dev: None,
            limit: d.limit.map(|l| l as usize),
            limit_per_subject: None,
            shots: d.shots.unwrap_or(prunesweep_proto::defaults::MMLU_SHOTS) as usize,
            seq_len: d.seq_len.unwrap_or(prunesweep_proto::defaults::C4_LOSS_SEQ_LEN) as usize,
            first_doc: d.first_doc.unwrap_or(0) as usize,
            batch: d.batch_size as usize,
        }
    }
}

/// The evaluation stage, as `worker eval` and a sweep's baseline and cells run it: load the
/// task's data, cut it to the limits, evaluate. `progress(done, total)` after each batch.
pub fn run(model: &Model, spec: &EvalSpec, progress: &mut dyn FnMut(usize, usize)) -> Result<EvalReport, EvalError> {
    match spec.task {
        Task::Mmlu | Task::MmluCloze => {
            let mut data = mmlu::MmluData::load(&spec.data, spec.dev.as_deref())?;
            data.truncate(spec.limit_per_subject, spec.limit);
            let total = data.questions.len();
            let mut on_batch = |n: usize| progress(n, total);
            if spec.task == Task::Mmlu {
                mmlu::evaluate_letter(model, &data, spec.shots, spec.batch, &mut on_batch)
            } else {
                mmlu::evaluate_cloze(model, &data, spec.batch, &mut on_batch)
            }
        }
        Task::Boolq => {
            let mut items = boolq::load(&spec.data)?;
            items.truncate(spec.limit.unwrap_or(usize::MAX));
            let total = items.len();
            boolq::evaluate(model, &items, spec.batch, &mut |n| progress(n, total))
        }
        Task::C4Loss => {
            let docs = read_document_range(&spec.data, spec.first_doc, spec.limit)?;
            let total = docs.len();
            c4_loss::evaluate(model, &docs, spec.seq_len, spec.batch, &mut |n| progress(n, total))
        }
    }
}

/// Accuracy over one MMLU subject.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SubjectScore {
    /// Questions.
    pub n: usize,
    /// Share answered correctly.
    pub accuracy: f64,
}

/// What an evaluation produced; serialized as the `--out` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Task name.
    pub task: String,
    /// Share correct (accuracy tasks; per question, i.e. weighted by subject size for MMLU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean of the per-subject accuracies (MMLU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_mean_accuracy: Option<f64>,
    /// Token-weighted mean next-token loss in nats (c4-loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// `loss / ln V`: 1.0 is uniform guessing (the paper's normalisation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalized_loss: Option<f64>,
    /// Items scored (questions, or documents for c4-loss).
    pub n: usize,
    /// Tokens a plain loop would run (every prompt in full).
    pub tokens: usize,
    /// Tokens actually run (shared prefixes counted once).
    pub computed_tokens: usize,
    /// Wall time of the model work.
    pub seconds: f64,
    /// Per-subject accuracy (MMLU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_subject: Option<BTreeMap<String, SubjectScore>>,
    /// Data rows skipped, with why (e.g. an answer that is not A–D in a JSON lines file).
    pub skipped: Vec<String>,
    /// Things the user should know (e.g. a choice token that is not a single token).
    pub warnings: Vec<String>,
    /// Per item, in data order.
    pub predictions: Vec<serde_json::Value>,
}

impl EvalReport {
    /// An empty report for `task`, to be filled in.
    pub fn new(task: Task) -> Self {
        EvalReport {
            task: task.name(),
            accuracy: None,
            subject_mean_accuracy: None,
            loss: None,
            normalized_loss: None,
            n: 0,
            tokens: 0,
            computed_tokens: 0,
            seconds: 0.0,
            per_subject: None,
            skipped: Vec::new(),
            warnings: Vec::new(),
            predictions: Vec::new(),
        }
    }
}

/// The token ids that score each one-token continuation (`" A"` … `" D"`, `" yes"`/`" no"`).
///
/// Each choice is tokenized as it appears in a prompt, after `Answer:` (SentencePiece tokenizers
/// turn a bare `" A"` into `▁` + `A`, but `Answer: A` into `… ▁A`). A continuation of several tokens
/// is scored by its first token, with a warning; if two choices would then share a token, the task
/// cannot be scored this way and that is an error rather than a silent constant answer.
pub fn choice_tokens(
    tokenizer: &Tokenizer,
    choices: &[&str],
    warnings: &mut Vec<String>,
) -> Result<Vec<u32>, EvalError> {
    const CONTEXT: &str = "Answer:";
    let ctx = tokenizer.encode_plain(CONTEXT)?;
    let mut ids = Vec::with_capacity(choices.len());
    for text in choices {
        let whole = tokenizer.encode_plain(&format!("{CONTEXT}{text}"))?;
        let cont = if whole.starts_with(&ctx) { whole[ctx.len()..].to_vec() } else { tokenizer.encode_plain(text)? };
        match cont.as_slice() {
            [one] => ids.push(*one),
            [first, ..] => {
                warnings.push(format!(
                    "{text:?} is {} tokens for this tokenizer ({cont:?}); scoring its first token {first}",
                    cont.len()
                ));
                ids.push(*first);
            }
            [] => return Err(EvalError::Invalid(format!("{text:?} tokenizes to nothing"))),
        }
    }
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != ids.len() {
        return Err(EvalError::Invalid(format!(
            "the answers {choices:?} share their first token ({ids:?}) with this tokenizer, so they cannot be told apart by one next-token logit; use a cloze task instead"
        )));
    }
    Ok(ids)
}

/// Length of the longest common prefix of all sequences, capped so that every sequence keeps at
/// least `keep` tokens after it.
pub fn common_prefix_len(seqs: &[Vec<u32>], keep: usize) -> usize {
    let Some(first) = seqs.first() else { return 0 };
    let mut len = first.len();
    for s in &seqs[1..] {
        len = len.min(first.iter().zip(s).take_while(|(a, b)| a == b).count());
    }
    let shortest = seqs.iter().map(Vec::len).min().unwrap_or(0);
    len.min(shortest.saturating_sub(keep))
}

/// The keys/values of a prompt prefix several sequences share (`None` for an empty one), for
/// [`scored_positions`]' `prefix`.
pub fn prefix_cache(decoder: &Decoder, prefix: &[u32]) -> Result<Option<KvCache>, EvalError> {
    if prefix.is_empty() {
        return Ok(None);
    }
    let ids = Tensor::new(prefix, decoder.device())?.unsqueeze(0)?;
    Ok(Some(decoder.prefill(&ids)?.0))
}

/// What to read at one position of a suffix: the position (an index into the suffix) and the
/// token ids whose scores are wanted there.
pub type Pick = (usize, Vec<u32>);

/// How [`scored_positions`] lays a batch of sequences out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout<'a> {
    /// `[B, longest]`, right-padded: for many sequences of similar length (sort them first).
    Padded,
    /// End to end in one row, each sequence attending only to itself and the prefix: no padding,
    /// no scores between sequences, and a shared prefix's keys/values are not copied per
    /// sequence ([`Packing`]).
    Packed,
    /// Packed, and sequence `i` continues sequence `continues[i]` (an earlier one, right before
    /// its group): it sees that sequence and its positions follow it. A cloze question's
    /// context runs once with its answers after it, and many questions share one pass.
    /// Batches end only before a sequence of its own.
    Tree(&'a [Option<usize>]),
}

/// Rows of logits ([`Decoder::logits`]) computed at once by [`scored_positions`] (the memory
/// model's figure).
const LOGIT_ROWS: usize = prunesweep_proto::memory::LOGIT_ROWS as usize;

/// Runs `suffixes` (each continuing `prefix`, if any) in batches of `batch` (a [`Layout::Tree`]
/// batch runs on to the end of its last group) and returns, for each suffix and each of its
/// picks, the scores of the picked tokens: raw logits when `raw_logits`,
/// else log-probabilities. Only the picked positions go through the final norm and the LM head,
/// and the picked values leave the tensor in one gather per batch. When `decoder` reads blocks
/// from the checkpoint per pass, up to [`PASSES_PER_READ`] batches run block by block together
/// ([`Decoder::run_packed_group`]), with the same results.
pub fn scored_positions(
    decoder: &Decoder,
    prefix: Option<&KvCache>,
    suffixes: &[Vec<u32>],
    picks: &[Vec<Pick>],
    batch: usize,
    layout: Layout,
    raw_logits: bool,
) -> Result<Vec<Vec<Vec<f32>>>, EvalError> {
    // (A tree of the wrong length is refused by `scored_passes`.)
    let continues = match layout {
        Layout::Tree(continues) if continues.len() == suffixes.len() => Some(continues),
        _ => None,
    };
    let ranges = batches(suffixes.len(), batch, continues);
    scored_passes(decoder, prefix, suffixes, picks, &ranges, layout, raw_logits)
}

/// [`scored_positions`] over the passes `ranges` (consecutive, covering `suffixes`; a
/// [`Layout::Tree`] pass holds whole groups) instead of batches of a fixed size.
pub fn scored_passes(
    decoder: &Decoder,
    prefix: Option<&KvCache>,
    suffixes: &[Vec<u32>],
    picks: &[Vec<Pick>],
    ranges: &[std::ops::Range<usize>],
    layout: Layout,
    raw_logits: bool,
) -> Result<Vec<Vec<Vec<f32>>>, EvalError> {
    let mut out = Vec::with_capacity(suffixes.len());
    let covered = ranges.first().map_or(0, |r| r.start) == 0 && ranges.last().map_or(0, |r| r.end) == suffixes.len();
    if !covered || ranges.windows(2).any(|w| w[0].end != w[1].start) || ranges.iter().any(|r| r.is_empty()) {
        return Err(EvalError::Invalid(format!(
            "passes {ranges:?} do not cover {} sequences one after another",
            suffixes.len()
        )));
    }
    let continues = match layout {
        Layout::Tree(continues) => {
            if continues.len() != suffixes.len() {
                return Err(EvalError::Invalid(format!(
                    "a tree layout names what {} sequences continue, for {} sequences",
                    continues.len(),
                    suffixes.len()
                )));
            }
            // Checked whole first, then that no pass splits a group.
            let segments = suffixes.iter().zip(continues).map(|(s, &c)| Segment { len: s.len(), continues: c });
            Packing::new(segments.collect())?;
            if let Some(r) = ranges.iter().find(|&r| continues[r.clone()].iter().flatten().any(|&c| c < r.start)) {
                return Err(EvalError::Invalid(format!("pass {r:?} splits a group from the sequence it continues")));
            }
            Some(continues)
        }
        _ => None,
    };
    // A model whose blocks are read per pass runs several passes block by block across them.
    let group = passes_per_call(decoder);
    for ranges in ranges.chunks(group) {
        let passes = ranges
            .iter()
            .map(|range| pass_input(decoder, &suffixes[range.clone()], range, layout, continues))
            .collect::<Result<Vec<_>, _>>()?;
        let hidden = if group > 1 {
            let inputs: Vec<(&Tensor, &Packing)> = passes.iter().map(|p| (&p.ids, &p.packing)).collect();
            decoder.run_packed_group(&inputs, prefix)?
        } else {
            let p = &passes[0];
            vec![match layout {
                Layout::Padded => decoder.run(&p.ids, prefix, None, &mut |_, _| Ok(()))?,
                Layout::Packed | Layout::Tree(_) => decoder.run_packed(&p.ids, &p.packing, prefix)?,
            }]
        };
        for ((range, pass), hidden) in ranges.iter().zip(&passes).zip(hidden) {
            // The hidden states as rows `[N, H]`.
            let hidden = match layout {
                Layout::Padded => hidden.flatten_to(1)?,
                Layout::Packed | Layout::Tree(_) => hidden.squeeze(0)?,
            };
            score_rows(decoder, &hidden, &pass.starts, &picks[range.clone()], raw_logits, &mut out)?;
        }
    }
    Ok(out)
}

/// Passes a model whose blocks are read from the checkpoint per pass runs at once
/// ([`Decoder::run_packed_group`]): each offloaded block is read once for all of them, and their
/// residual streams are held together meanwhile (the memory model's `PASSES_PER_READ`).
const PASSES_PER_READ: usize = prunesweep_proto::memory::PASSES_PER_READ as usize;

/// How many passes of `batch` sequences a task hands [`scored_positions`] at once: one, or
/// [`PASSES_PER_READ`] when `decoder` reads blocks from the checkpoint per pass.
pub fn passes_per_call(decoder: &Decoder) -> usize {
    if decoder.offloaded_blocks() > 0 {
        PASSES_PER_READ
    } else {
        1
    }
}

/// One pass's input: ids, their layout, and where each sequence's first token is among its rows.
struct PassInput {
    ids: Tensor,
    packing: Packing,
    starts: Vec<usize>,
}

/// The input of the pass over `chunk` (sequences `range` of a [`scored_positions`] call).
fn pass_input(
    decoder: &Decoder,
    chunk: &[Vec<u32>],
    range: &std::ops::Range<usize>,
    layout: Layout,
    continues: Option<&[Option<usize>]>,
) -> Result<PassInput, EvalError> {
    Ok(match layout {
        Layout::Padded => {
            let width = chunk.iter().map(Vec::len).max().expect("chunks are non-empty");
            let padded: Vec<u32> =
                chunk.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat(0)).take(width)).collect();
            let ids = Tensor::from_vec(padded, (chunk.len(), width), decoder.device())?;
            PassInput { ids, packing: Packing::single(width), starts: (0..chunk.len()).map(|i| i * width).collect() }
        }
        Layout::Packed | Layout::Tree(_) => {
            let lengths: Vec<usize> = chunk.iter().map(Vec::len).collect();
            let packing = match continues {
                None => Packing::sequences(&lengths),
                Some(continues) => {
                    let segments = lengths
                        .iter()
                        .zip(&continues[range.clone()])
                        .map(|(&len, c)| Segment { len, continues: c.map(|c| c - range.start) })
                        .collect();
                    Packing::new(segments)?
                }
            };
            let ids = Tensor::from_vec(chunk.concat(), (1, packing.len()), decoder.device())?;
            let starts = lengths.iter().scan(0, |at, len| Some(std::mem::replace(at, *at + len))).collect();
            PassInput { ids, packing, starts }
        }
    })
}

/// Scores one pass's picks from its hidden rows `[N, H]` (each sequence's first row at `starts`)
/// and appends them to `out`, one entry per sequence.
fn score_rows(
    decoder: &Decoder,
    hidden: &Tensor,
    starts: &[usize],
    pick_chunk: &[Vec<Pick>],
    raw_logits: bool,
    out: &mut Vec<Vec<Vec<f32>>>,
) -> Result<(), EvalError> {
    // Gather all picked rows of the batch, then one norm + LM head.
    let flat: Vec<u32> = pick_chunk
        .iter()
        .zip(starts)
        .flat_map(|(ps, &start)| ps.iter().map(move |(p, _)| (start + p) as u32))
        .collect();
    if flat.is_empty() {
        out.extend(pick_chunk.iter().map(|_| Vec::new()));
        return Ok(());
    }
    let rows = hidden.index_select(&Tensor::new(flat.as_slice(), decoder.device())?, 0)?;
    // The picked tokens of each row (short lists padded with their first id).
    let k = pick_chunk.iter().flatten().map(|(_, toks)| toks.len()).max().unwrap_or(0).max(1);
    let index: Vec<u32> = pick_chunk
        .iter()
        .flatten()
        .flat_map(|(_, toks)| (0..k).map(move |j| toks.get(j).or(toks.first()).copied().unwrap_or(0)))
        .collect();
    let index = Tensor::from_vec(index, (flat.len(), k), decoder.device())?;
    // The LM head over at most `LOGIT_ROWS` rows at a time, so that the logits of a long
    // sequence (C4 loss scores every position) are never all held at once; the picked
    // log-probabilities are the picked logits less each row's log-sum-exp.
    let mut values = Vec::with_capacity(flat.len());
    for start in (0..flat.len()).step_by(LOGIT_ROWS) {
        let len = LOGIT_ROWS.min(flat.len() - start);
        let logits = decoder.logits(&rows.narrow(0, start, len)?)?;
        let picked = logits.contiguous()?.gather(&index.narrow(0, start, len)?, 1)?;
        let picked = if raw_logits { picked } else { picked.broadcast_sub(&log_sum_exp(&logits)?)? };
        values.extend(picked.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    }
    let mut rows = values.into_iter();
    for ps in pick_chunk {
        out.push(ps.iter().map(|(_, toks)| rows.next().expect("one row per pick")[..toks.len()].to_vec()).collect());
    }
    Ok(())
}

/// The batches of `n` sequences, `batch` at a time; with `continues`, a batch ends only before
/// a sequence of its own, so that no group is split.
fn batches(n: usize, batch: usize, continues: Option<&[Option<usize>]>) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = (start + batch.max(1)).min(n);
        if let Some(c) = continues {
            while end < n && c[end].is_some() {
                end += 1;
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_must_cover_the_sequences_and_keep_groups_whole() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let model = crate::model::Model::load(&dir, &candle_core::Device::Cpu).unwrap();
        let seqs = vec![vec![1u32, 2, 3], vec![4, 5], vec![6, 7, 8]];
        let picks: Vec<Vec<Pick>> = seqs.iter().map(|s| vec![(s.len() - 1, vec![1])]).collect();
        let run = |ranges: &[std::ops::Range<usize>], layout| {
            scored_passes(&model.decoder, None, &seqs, &picks, ranges, layout, true)
        };
        let whole = run(&[0..2, 2..3], Layout::Packed).unwrap();
        assert_eq!(whole, scored_positions(&model.decoder, None, &seqs, &picks, 2, Layout::Packed, true).unwrap()[..]);
        let short = [std::ops::Range { start: 0, end: 1 }];
        for bad in [&short[..], &[0..1, 2..3], &[0..2, 2..2, 2..3]] {
            let e = run(bad, Layout::Packed).unwrap_err().to_string();
            assert!(e.contains("do not cover 3 sequences"), "{bad:?}: {e}");
        }
        let continues = [None, Some(0), None];
        let e = run(&[0..1, 1..3], Layout::Tree(&continues)).unwrap_err().to_string();
        assert!(e.contains("pass 1..3 splits a group"), "{e}");
        run(&[0..2, 2..3], Layout::Tree(&continues)).unwrap();
    }

    #[test]
    fn tree_batches_keep_groups_whole() {
        assert_eq!(batches(5, 2, None), vec![0..2, 2..4, 4..5]);
        let c = [None, Some(0), Some(0), None, Some(3), None];
        assert_eq!(batches(6, 2, Some(&c)), vec![0..3, 3..5, 5..6]);
        assert_eq!(batches(6, 100, Some(&c)), vec![0..6]);
    }

    #[test]
    fn common_prefix_keeps_a_suffix() {
        let seqs = vec![vec![1, 2, 3, 4], vec![1, 2, 3, 5, 6], vec![1, 2, 3, 4, 7]];
        assert_eq!(common_prefix_len(&seqs, 1), 3);
        let same = vec![vec![1, 2, 3], vec![1, 2, 3]];
        assert_eq!(common_prefix_len(&same, 1), 2, "at least one token stays in each suffix");
        assert_eq!(common_prefix_len(&same, 2), 1);
        assert_eq!(common_prefix_len(&[], 1), 0);
    }
}

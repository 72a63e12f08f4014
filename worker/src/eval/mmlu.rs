//! MMLU (Hendrycks et al. 2021): letter-scored k-shot, as the paper evaluates, and cloze-scored
//! 0-shot, as small-model papers report it.
//!
//! Letter prompt (the original format; the header names the subject with `_` → space):
//!
//! ```text
//! The following are multiple choice questions (with answers) about {subject}.\n\n
//! {dev question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {letter}\n\n      ← first k dev rows
//! {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:
//! ```
//!
//! scored by the argmax of the next-token logits over `" A" " B" " C" " D"`. Cloze: context
//! `Question: {question}\nAnswer:`, continuation `" {choice}"`, score = sum of the continuation's
//! token log-probs / the choice's length in characters (lm-eval's `acc_norm`); the continuation's
//! tokens are those of `tokenize(context + continuation)` past `len(tokenize(context))`, as
//! lm-evaluation-harness does.
//!
//! Data: the original CSV folders (`test/`, `dev/`, `{subject}_{split}.csv`, no header), HF
//! `cais/mmlu` Parquet (`question`, `subject`, `choices`, `answer`), or JSON lines with
//! `answer_a..answer_d`, `correct_answer`, `topic` (rows whose answer is not A–D are skipped and
//! counted).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::{
    choice_tokens, common_prefix_len, passes_per_call, prefix_cache, scored_passes, scored_positions, EvalError,
    EvalReport, Layout, Pick, SubjectScore, Task,
};
use crate::data::{records, Record};
use crate::model::Model;

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct MmluQuestion {
    /// Subject, underscored (`high_school_geography`).
    pub subject: String,
    /// Row within its subject's split, 0-based.
    pub index: usize,
    /// Question text.
    pub question: String,
    /// The four answer texts.
    pub choices: [String; 4],
    /// Correct choice, 0..=3.
    pub answer: usize,
}

/// Test questions plus where their few-shot examples come from.
#[derive(Debug, Clone)]
pub struct MmluData {
    /// Test questions, in data order.
    pub questions: Vec<MmluQuestion>,
    /// Rows skipped while reading, with why.
    pub skipped: Vec<String>,
    dev: DevSource,
}

#[derive(Debug, Clone)]
enum DevSource {
    /// `dev/{subject}_dev.csv` files.
    CsvDir(PathBuf),
    /// Dev rows already read (Parquet / JSON lines).
    Rows(Vec<MmluQuestion>),
    /// None given: only 0-shot works.
    None,
}

impl MmluData {
    /// Reads test questions from `path` (a folder with `test/` and `dev/`, a `test/` folder, a
    /// Parquet file or a JSON lines file) and dev examples from `dev` (a folder of
    /// `{subject}_dev.csv`, a Parquet or JSON lines file), or from `path/dev` when `path` is the
    /// MMLU folder.
    pub fn load(path: &Path, dev: Option<&Path>) -> Result<Self, EvalError> {
        let (questions, skipped) = read_split(path, "test")?;
        if questions.is_empty() {
            return Err(EvalError::Invalid(format!("{}: no MMLU test questions", path.display())));
        }
        let dev = match dev {
            Some(d) if d.is_dir() => DevSource::CsvDir(d.to_path_buf()),
            Some(d) => DevSource::Rows(read_split(d, "dev")?.0),
            None if path.join("dev").is_dir() => DevSource::CsvDir(path.join("dev")),
            None => DevSource::None,
        };
        Ok(MmluData { questions, skipped, dev })
    }

    /// Keeps the first `per_subject` questions of each subject, then the first `limit` overall.
    pub fn truncate(&mut self, per_subject: Option<usize>, limit: Option<usize>) {
        if let Some(k) = per_subject {
            self.questions.retain(|q| q.index < k);
        }
        if let Some(n) = limit {
            self.questions.truncate(n);
        }
    }

    /// The first `k` dev examples of `subject`.
    pub fn shots(&self, subject: &str, k: usize) -> Result<Vec<MmluQuestion>, EvalError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let rows = match &self.dev {
            DevSource::CsvDir(dir) => {
                let file = dir.join(format!("{subject}_dev.csv"));
                if !file.is_file() {
                    return Err(EvalError::MissingFile {
                        path: file,
                        hint: format!(
                            "{k}-shot MMLU takes its examples from the subject's dev file (or use --shots 0)"
                        ),
                    });
                }
                read_csv(&file, subject)?
            }
            DevSource::Rows(all) => all.iter().filter(|q| q.subject == subject).cloned().collect(),
            DevSource::None => {
                return Err(EvalError::Invalid(format!(
                    "{k}-shot MMLU needs dev examples: pass --dev (the dev/ folder or file), or --shots 0"
                )))
            }
        };
        if rows.len() < k {
            return Err(EvalError::Invalid(format!(
                "subject {subject}: {} dev examples, --shots {k} needs {k}",
                rows.len()
            )));
        }
        Ok(rows.into_iter().take(k).collect())
    }
}

fn read_split(path: &Path, split: &str) -> Result<(Vec<MmluQuestion>, Vec<String>), EvalError> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if path.is_dir() {
        let dir = if path.join(split).is_dir() { path.join(split) } else { path.to_path_buf() };
        let suffix = format!("_{split}.csv");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| crate::data::DataError::Io { path: dir.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&suffix)))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EvalError::MissingFile {
                path: dir.join(format!("<subject>{suffix}")),
                hint: format!("an MMLU folder holds test/ and dev/ with {{subject}}_{split}.csv files"),
            });
        }
        let mut questions = Vec::new();
        for f in files {
            let file_name = f.file_name().expect("listed files have names").to_string_lossy().into_owned();
            let subject = file_name.trim_end_matches(&suffix).to_string();
            questions.extend(read_csv(&f, &subject)?);
        }
        Ok((questions, Vec::new()))
    } else if name.ends_with(".parquet") {
        Ok((read_parquet(path)?, Vec::new()))
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        read_jsonl(path)
    } else {
        Err(EvalError::Invalid(format!(
            "{}: MMLU data must be a folder of CSVs, a .parquet or a .jsonl file",
            path.display()
        )))
    }
}

fn letter_index(path: &Path, line: u64, letter: &str) -> Result<usize, EvalError> {
    LETTERS.iter().position(|l| *l == letter.trim()).ok_or_else(|| EvalError::Row {
        path: path.to_path_buf(),
        line,
        message: format!("answer `{letter}` is not one of A, B, C, D"),
    })
}

/// `question,A,B,C,D,answer` rows, no header.
fn read_csv(path: &Path, subject: &str) -> Result<Vec<MmluQuestion>, EvalError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .map_err(|e| EvalError::Row { path: path.to_path_buf(), line: 0, message: e.to_string() })?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| EvalError::Row {
            path: path.to_path_buf(),
            line: e.position().map_or(0, |p| p.line()),
            message: format!("unreadable CSV row: {e}"),
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if record.len() != 6 {
            return Err(EvalError::Row {
                path: path.to_path_buf(),
                line,
                message: format!("expected 6 fields (question,A,B,C,D,answer), found {}", record.len()),
            });
        }
        out.push(MmluQuestion {
            subject: subject.to_string(),
            index: out.len(),
            question: record[0].to_string(),
            choices: [record[1].to_string(), record[2].to_string(), record[3].to_string(), record[4].to_string()],
            answer: letter_index(path, line, &record[5])?,
        });
    }
    Ok(out)
}

/// Per-subject running indices, as the CSV layout numbers its questions.
#[derive(Default)]
struct SubjectIndex(BTreeMap<String, usize>);

impl SubjectIndex {
    fn next(&mut self, subject: &str) -> usize {
        let index = self.0.entry(subject.to_string()).or_default();
        *index += 1;
        *index - 1
    }
}

fn read_jsonl(path: &Path) -> Result<(Vec<MmluQuestion>, Vec<String>), EvalError> {
    let mut out: Vec<MmluQuestion> = Vec::new();
    let mut skipped = Vec::new();
    let mut index = SubjectIndex::default();
    for Record { line, value: v } in records(path, None, usize::MAX)? {
        let row = |message: String| EvalError::Row { path: path.to_path_buf(), line, message };
        let field = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| row(format!("no string field `{k}`")))
        };
        let answer = field("correct_answer")?;
        let Some(answer) = LETTERS.iter().position(|l| *l == answer.trim()) else {
            skipped.push(format!("{}:{line}: answer `{answer}` is not one of A, B, C, D", path.display()));
            continue;
        };
        let subject = field("topic")?.trim().replace(' ', "_");
        out.push(MmluQuestion {
            index: index.next(&subject),
            subject,
            question: field("question")?,
            choices: [field("answer_a")?, field("answer_b")?, field("answer_c")?, field("answer_d")?],
            answer,
        });
    }
    Ok((out, skipped))
}

/// The `cais/mmlu` layout: `question`, `subject`, `choices` (a list of 4), `answer` (0..=3).
fn read_parquet(path: &Path) -> Result<Vec<MmluQuestion>, EvalError> {
    let columns = ["question", "subject", "choices", "answer"];
    let mut out = Vec::new();
    let mut index = SubjectIndex::default();
    for Record { line, value: v } in records(path, Some(&columns), usize::MAX)? {
        let row = |m: String| EvalError::Row { path: path.to_path_buf(), line, message: m };
        let text = |k: &str| v.get(k).and_then(serde_json::Value::as_str).map(str::to_string).unwrap_or_default();
        let texts: Vec<String> = v
            .get("choices")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| row("null choices".into()))?
            .iter()
            .map(|c| c.as_str().unwrap_or_default().to_string())
            .collect();
        let choices: [String; 4] =
            texts.try_into().map_err(|t: Vec<String>| row(format!("{} choices, expected 4", t.len())))?;
        let answer = v
            .get("answer")
            .and_then(serde_json::Value::as_i64)
            .filter(|a| (0..4).contains(a))
            .ok_or_else(|| row("answer is not 0..=3".into()))?;
        let subject = text("subject");
        out.push(MmluQuestion {
            index: index.next(&subject),
            subject,
            question: text("question"),
            choices,
            answer: answer as usize,
        });
    }
    Ok(out)
}

/// `high_school_geography` → `high school geography`.
pub fn subject_name(subject: &str) -> String {
    subject.replace('_', " ")
}

fn format_question(q: &MmluQuestion) -> String {
    format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        q.question, q.choices[0], q.choices[1], q.choices[2], q.choices[3]
    )
}

/// The full letter prompt for `q` with `shots` as examples.
pub fn letter_prompt(q: &MmluQuestion, shots: &[MmluQuestion]) -> String {
    let mut p =
        format!("The following are multiple choice questions (with answers) about {}.\n\n", subject_name(&q.subject));
    for s in shots {
        p.push_str(&format_question(s));
        p.push_str(&format!(" {}\n\n", LETTERS[s.answer]));
    }
    p.push_str(&format_question(q));
    p
}

/// The cloze context for `q`.
pub fn cloze_context(q: &MmluQuestion) -> String {
    format!("Question: {}\nAnswer:", q.question)
}

/// Groups consecutive questions by subject, keeping data order.
fn by_subject(questions: &[MmluQuestion]) -> Vec<&[MmluQuestion]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=questions.len() {
        if i == questions.len() || questions[i].subject != questions[start].subject {
            groups.push(&questions[start..i]);
            start = i;
        }
    }
    groups
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

fn finish(report: &mut EvalReport, questions: &[MmluQuestion], preds: &[usize]) {
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (q, &p) in questions.iter().zip(preds) {
        let e = per.entry(q.subject.clone()).or_default();
        e.0 += 1;
        e.1 += usize::from(p == q.answer);
        report.predictions.push(json!({
            "subject": q.subject, "index": q.index, "pred": LETTERS[p], "answer": LETTERS[q.answer],
        }));
    }
    let correct: usize = per.values().map(|v| v.1).sum();
    report.n = questions.len();
    report.accuracy = Some(correct as f64 / questions.len().max(1) as f64);
    let per_subject: BTreeMap<String, SubjectScore> =
        per.into_iter().map(|(s, (n, c))| (s, SubjectScore { n, accuracy: c as f64 / n as f64 })).collect();
    report.subject_mean_accuracy =
        Some(per_subject.values().map(|s| s.accuracy).sum::<f64>() / per_subject.len().max(1) as f64);
    report.per_subject = Some(per_subject);
}

/// Letter-scored MMLU with `shots` examples per subject. The subject's shared prompt prefix is
/// computed once and its keys/values reused by every question of the subject; the questions run
/// `batch` at a time, packed end to end after it.
pub fn evaluate_letter(
    model: &Model,
    data: &MmluData,
    shots: usize,
    batch: usize,
    on_progress: &mut dyn FnMut(usize),
) -> Result<EvalReport, EvalError> {
    let mut report = EvalReport::new(Task::Mmlu);
    report.skipped = data.skipped.clone();
    if data.questions.is_empty() {
        return Err(EvalError::Invalid(
            "no MMLU questions left to evaluate (check --limit / --limit-per-subject)".into(),
        ));
    }
    // Every subject's dev examples are read before any compute: a missing file fails fast.
    let groups = by_subject(&data.questions);
    let shot_sets: Vec<Vec<MmluQuestion>> =
        groups.iter().map(|g| data.shots(&g[0].subject, shots)).collect::<Result<_, _>>()?;
    let letter_ids = choice_tokens(&model.tokenizer, &[" A", " B", " C", " D"], &mut report.warnings)?;
    let started = Instant::now();
    let decoder = &model.decoder;
    let mut preds = Vec::with_capacity(data.questions.len());
    for (group, examples) in groups.into_iter().zip(shot_sets) {
        let ids: Vec<Vec<u32>> =
            group.iter().map(|q| model.tokenizer.encode(&letter_prompt(q, &examples))).collect::<Result<_, _>>()?;
        let p = common_prefix_len(&ids, 1);
        let cache = prefix_cache(decoder, &ids[0][..p])?;
        let suffixes: Vec<Vec<u32>> = ids.iter().map(|s| s[p..].to_vec()).collect();
        let picks: Vec<Vec<Pick>> = suffixes.iter().map(|s| vec![(s.len() - 1, letter_ids.to_vec())]).collect();
        let logits = scored_positions(decoder, cache.as_ref(), &suffixes, &picks, batch, Layout::Packed, true)?;
        for row in logits {
            preds.push(argmax(&row[0]));
        }
        report.tokens += ids.iter().map(Vec::len).sum::<usize>();
        report.computed_tokens += p + suffixes.iter().map(Vec::len).sum::<usize>();
        on_progress(preds.len());
    }
    report.seconds = started.elapsed().as_secs_f64();
    finish(&mut report, &data.questions, &preds);
    Ok(report)
}

/// Cloze-scored MMLU (0-shot): each answer text's summed log-probability per character. A
/// question's context runs once with its four answers after it as continuations
/// ([`Layout::Tree`]), and `batch` questions share one pass, packed end to end.
pub fn evaluate_cloze(
    model: &Model,
    data: &MmluData,
    batch: usize,
    on_progress: &mut dyn FnMut(usize),
) -> Result<EvalReport, EvalError> {
    if data.questions.is_empty() {
        return Err(EvalError::Invalid(
            "no MMLU questions left to evaluate (check --limit / --limit-per-subject)".into(),
        ));
    }
    let mut report = EvalReport::new(Task::MmluCloze);
    report.skipped = data.skipped.clone();
    let started = Instant::now();
    let mut preds = Vec::with_capacity(data.questions.len());
    // Passes of `batch` questions, handed over one at a time (or, when the model reads blocks
    // per pass, several at once to run block by block together).
    let per_call = batch.max(1) * passes_per_call(&model.decoder);
    for questions in data.questions.chunks(per_call) {
        // Per question, its shared context (if any) as a sequence and each answer as a
        // continuation of it; `answers[i]` is the sequence of the question's i-th choice.
        let (mut seqs, mut continues, mut picks, mut answers) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut passes = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            if i % batch.max(1) == 0 {
                passes.push(seqs.len()..seqs.len());
            }
            let ctx = model.tokenizer.encode(&cloze_context(q))?;
            let mut wholes = Vec::with_capacity(q.choices.len());
            for choice in &q.choices {
                let whole = model.tokenizer.encode(&format!("{} {choice}", cloze_context(q)))?;
                if whole.len() <= ctx.len() || ctx.is_empty() {
                    return Err(EvalError::Invalid(format!(
                        "{} #{}: choice {choice:?} adds no tokens to the context",
                        q.subject, q.index
                    )));
                }
                wholes.push(whole);
            }
            // The shared part, up to the token before the first scored one (position p predicts
            // token p + 1: the context's last position scores each choice's first token).
            let shared = common_prefix_len(&wholes, 1).min(ctx.len() - 1);
            let context = (shared > 0).then(|| {
                seqs.push(wholes[0][..shared].to_vec());
                continues.push(None);
                picks.push(Vec::new());
                seqs.len() - 1
            });
            for w in &wholes {
                answers.push(seqs.len());
                seqs.push(w[shared..].to_vec());
                continues.push(context);
                // One pick per continuation token (`whole[ctx.len()..]`), at suffix positions.
                picks.push((ctx.len() - 1..w.len() - 1).map(|p| (p - shared, vec![w[p + 1]])).collect::<Vec<Pick>>());
            }
            report.tokens += wholes.iter().map(Vec::len).sum::<usize>();
            report.computed_tokens += shared + wholes.iter().map(|w| w.len() - shared).sum::<usize>();
            passes.last_mut().expect("opened above").end = seqs.len();
        }
        let rows = scored_passes(&model.decoder, None, &seqs, &picks, &passes, Layout::Tree(&continues), false)?;
        let mut answers = answers.into_iter();
        for q in questions {
            let scores: Vec<f32> = q
                .choices
                .iter()
                .map(|choice| {
                    let r = &rows[answers.next().expect("one sequence per choice")];
                    r.iter().map(|v| v[0]).sum::<f32>() / choice.chars().count().max(1) as f32
                })
                .collect();
            preds.push(argmax(&scores));
        }
        on_progress(preds.len());
    }
    report.seconds = started.elapsed().as_secs_f64();
    finish(&mut report, &data.questions, &preds);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(subject: &str, question: &str, answer: usize) -> MmluQuestion {
        MmluQuestion {
            subject: subject.into(),
            index: 0,
            question: question.into(),
            choices: ["0".into(), "4".into(), "2".into(), "6".into()],
            answer,
        }
    }

    #[test]
    fn letter_prompt_is_the_hendrycks_format() {
        let shot = q("abstract_algebra", "Find 1+1.", 2);
        let test = q("abstract_algebra", "Find the degree.", 1);
        assert_eq!(
            letter_prompt(&test, &[shot]),
            "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
             Find 1+1.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer: C\n\n\
             Find the degree.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
        );
        assert_eq!(
            letter_prompt(&test, &[]),
            "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
             Find the degree.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
        );
        assert_eq!(cloze_context(&test), "Question: Find the degree.\nAnswer:");
    }

    #[test]
    fn csv_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x_test.csv");
        std::fs::write(&p, "q1,a,b,c,d,A\n\"multi\nline\",a,b,c,d,B\nq3,a,b,c,d,E\n").unwrap();
        let e = read_csv(&p, "x").unwrap_err().to_string();
        assert!(e.ends_with("x_test.csv:4: answer `E` is not one of A, B, C, D"), "{e}");
        std::fs::write(&p, "q1,a,b,c,d,A\nq2,a,b,c\n").unwrap();
        let e = read_csv(&p, "x").unwrap_err().to_string();
        assert!(e.contains("x_test.csv:2: expected 6 fields"), "{e}");
        std::fs::write(&p, "q1,a,b,c,d,A\n\"multi\nline\",a,b,c,d,B\n").unwrap();
        let rows = read_csv(&p, "x").unwrap();
        assert_eq!((rows[1].question.as_str(), rows[1].answer, rows[1].index), ("multi\nline", 1, 1));
    }

    #[test]
    fn jsonl_skips_bad_answers_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let row = |a: &str| {
            format!(
                r#"{{"question":"q","answer_a":"a","answer_b":"b","answer_c":"c","answer_d":"d","correct_answer":"{a}","topic":"high school geography"}}"#
            )
        };
        std::fs::write(&p, [row("B"), row("answer"), row("D")].join("\n")).unwrap();
        let (qs, skipped) = read_jsonl(&p).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!((qs[1].subject.as_str(), qs[1].index, qs[1].answer), ("high_school_geography", 1, 3));
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].ends_with("m.jsonl:2: answer `answer` is not one of A, B, C, D"));
    }

    #[test]
    fn parquet_in_cais_layout() {
        use polars::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("test.parquet");
        let choices = Series::new(
            "choices".into(),
            [Series::new("".into(), ["w", "x", "y", "z"]), Series::new("".into(), ["1", "2", "3", "4"])],
        );
        let mut df = DataFrame::new_infer_height(vec![
            Series::new("question".into(), ["q1", "q2"]).into(),
            Series::new("subject".into(), ["anatomy", "anatomy"]).into(),
            choices.into(),
            Series::new("answer".into(), [3i64, 0]).into(),
        ])
        .unwrap();
        ParquetWriter::new(std::fs::File::create(&p).unwrap()).finish(&mut df).unwrap();
        let qs = read_parquet(&p).unwrap();
        assert_eq!(qs[0].choices[3], "z");
        assert_eq!((qs[1].index, qs[1].answer), (1, 0));
    }

    #[test]
    fn groups_follow_data_order() {
        let qs = vec![q("b", "1", 0), q("b", "2", 0), q("a", "3", 0)];
        let g = by_subject(&qs);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].len(), 2);
        assert_eq!(g[1][0].subject, "a");
    }
}

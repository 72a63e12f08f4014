//! BoolQ (Clark et al. 2019), 0-shot, in lm-evaluation-harness's template:
//! `{passage}\nQuestion: {question}?\nAnswer:`, predicted yes when the next-token logit of `" yes"`
//! beats `" no"`.
//!
//! Data: JSON lines or Parquet with `passage`, `question` and a label: `label` (a boolean, the
//! strings `"true"`/`"false"` of the SuperGLUE dump, or 0/1) or `answer` (Google's release).

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::{choice_tokens, passes_per_call, scored_positions, EvalError, EvalReport, Layout, Pick, Task};
use crate::model::Model;

/// One BoolQ item.
#[derive(Debug, Clone, PartialEq)]
pub struct BoolqItem {
    /// Supporting passage.
    pub passage: String,
    /// The yes/no question (without the question mark the template adds).
    pub question: String,
    /// The answer.
    pub label: bool,
}

/// The prompt for one item.
pub fn prompt(item: &BoolqItem) -> String {
    format!("{}\nQuestion: {}?\nAnswer:", item.passage, item.question)
}

fn parse_label(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        Value::Number(n) if n.as_u64() == Some(1) => Some(true),
        Value::Number(n) if n.as_u64() == Some(0) => Some(false),
        _ => None,
    }
}

/// Reads BoolQ items from JSON lines or Parquet.
pub fn load(path: &Path) -> Result<Vec<BoolqItem>, EvalError> {
    let rows = crate::data::records(path, None, usize::MAX)?;
    let items: Vec<BoolqItem> =
        rows.into_iter()
            .map(|crate::data::Record { line, value: v }| {
                let row = |message: String| EvalError::Row { path: path.to_path_buf(), line, message };
                let text = |k: &str| {
                    v.get(k)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| row(format!("no string field `{k}`")))
                };
                let label = v.get("label").or_else(|| v.get("answer")).and_then(parse_label).ok_or_else(|| {
                    row("no boolean `label` (true/false, \"true\"/\"false\", 0/1) or `answer`".into())
                })?;
                Ok(BoolqItem { passage: text("passage")?, question: text("question")?, label })
            })
            .collect::<Result<_, EvalError>>()?;
    if items.is_empty() {
        return Err(EvalError::Invalid(format!("{}: no BoolQ items", path.display())));
    }
    Ok(items)
}

/// Evaluates `items`, `batch` prompts packed end to end per pass (similar lengths together, so that
/// the passes are even); results stay in data order.
pub fn evaluate(
    model: &Model,
    items: &[BoolqItem],
    batch: usize,
    on_progress: &mut dyn FnMut(usize),
) -> Result<EvalReport, EvalError> {
    if items.is_empty() {
        return Err(EvalError::Invalid("no BoolQ items left to evaluate (check --limit)".into()));
    }
    let mut report = EvalReport::new(Task::Boolq);
    let ids = choice_tokens(&model.tokenizer, &[" yes", " no"], &mut report.warnings)?;
    let (yes, no) = (ids[0], ids[1]);
    let started = Instant::now();
    let ids: Vec<Vec<u32>> = items.iter().map(|it| model.tokenizer.encode(&prompt(it))).collect::<Result<_, _>>()?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut preds = vec![false; items.len()];
    let mut margins = vec![0f32; items.len()];
    let per_call = batch.max(1) * passes_per_call(&model.decoder);
    for (done, chunk) in order.chunks(per_call).enumerate() {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        let picks: Vec<Vec<Pick>> = seqs.iter().map(|s| vec![(s.len() - 1, vec![yes, no])]).collect();
        let rows = scored_positions(&model.decoder, None, &seqs, &picks, batch.max(1), Layout::Packed, true)?;
        for (&i, row) in chunk.iter().zip(rows) {
            let margin = row[0][0] - row[0][1];
            margins[i] = margin;
            preds[i] = margin > 0.0;
        }
        on_progress(((done + 1) * per_call).min(items.len()));
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.tokens = ids.iter().map(Vec::len).sum();
    report.computed_tokens = report.tokens;
    report.n = items.len();
    let correct = items.iter().zip(&preds).filter(|(it, &p)| it.label == p).count();
    report.accuracy = Some(correct as f64 / items.len() as f64);
    report.predictions = items
        .iter()
        .enumerate()
        .map(|(i, it)| json!({"index": i, "pred": preds[i], "label": it.label, "yes_minus_no": margins[i]}))
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_the_harness_template() {
        let it = BoolqItem { passage: "Ethanol -- a fuel.".into(), question: "is ethanol a fuel".into(), label: true };
        assert_eq!(prompt(&it), "Ethanol -- a fuel.\nQuestion: is ethanol a fuel?\nAnswer:");
    }

    #[test]
    fn labels_in_every_known_form() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.jsonl");
        std::fs::write(
            &p,
            "{\"passage\":\"p\",\"question\":\"q\",\"label\":\"true\"}\n\
             {\"passage\":\"p\",\"question\":\"q\",\"label\":false}\n\
             {\"passage\":\"p\",\"question\":\"q\",\"answer\":true}\n\
             {\"passage\":\"p\",\"question\":\"q\",\"label\":0}\n",
        )
        .unwrap();
        let labels: Vec<bool> = load(&p).unwrap().iter().map(|i| i.label).collect();
        assert_eq!(labels, vec![true, false, true, false]);
        std::fs::write(&p, "{\"passage\":\"p\",\"question\":\"q\",\"label\":\"maybe\"}\n").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("b.jsonl:1") && e.contains("label"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("no BoolQ items"));
    }
}

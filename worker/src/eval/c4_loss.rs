//! Held-out language-modelling loss (the paper's C4 validation loss, §4.2): the token-weighted mean
//! next-token negative log-likelihood over N documents truncated to T tokens, and that loss divided
//! by `ln V` (1.0 = guessing uniformly over the vocabulary).

use std::time::Instant;

use serde_json::json;

use super::{passes_per_call, scored_positions, EvalError, EvalReport, Layout, Pick, Task};
use crate::model::Model;

/// Scores `docs` (already chosen: keep them disjoint from calibration and healing data), `batch`
/// documents packed end to end per pass. Documents under 2 tokens after truncation are skipped
/// and listed.
pub fn evaluate(
    model: &Model,
    docs: &[String],
    seq_len: usize,
    batch: usize,
    on_progress: &mut dyn FnMut(usize),
) -> Result<EvalReport, EvalError> {
    let mut report = EvalReport::new(Task::C4Loss);
    let started = Instant::now();
    let mut seqs = Vec::new();
    let mut doc_index = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let mut ids = model.tokenizer.encode(d)?;
        ids.truncate(seq_len);
        if ids.len() < 2 {
            report.skipped.push(format!("document {i}: fewer than 2 tokens"));
        } else {
            seqs.push(ids);
            doc_index.push(i);
        }
    }
    if seqs.is_empty() {
        return Err(EvalError::Invalid("no document has 2 or more tokens".into()));
    }
    let (mut nll, mut count) = (0f64, 0usize);
    let per_call = batch.max(1) * passes_per_call(&model.decoder);
    for (c, chunk) in seqs.chunks(per_call).enumerate() {
        // Position p predicts token p + 1.
        let picks: Vec<Vec<Pick>> =
            chunk.iter().map(|s| s[1..].iter().enumerate().map(|(p, &t)| (p, vec![t])).collect()).collect();
        let rows = scored_positions(&model.decoder, None, chunk, &picks, batch.max(1), Layout::Packed, false)?;
        for (j, (seq, rows)) in chunk.iter().zip(rows).enumerate() {
            let doc_nll: f64 = -rows.iter().map(|v| f64::from(v[0])).sum::<f64>();
            let k = c * per_call + j;
            report.predictions.push(json!({
                "index": doc_index[k], "tokens": seq.len() - 1, "loss": doc_nll / (seq.len() - 1) as f64,
            }));
            nll += doc_nll;
            count += seq.len() - 1;
        }
        on_progress(((c + 1) * per_call).min(seqs.len()));
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.n = seqs.len();
    report.tokens = seqs.iter().map(Vec::len).sum();
    report.computed_tokens = report.tokens;
    let loss = nll / count as f64;
    report.loss = Some(loss);
    report.normalized_loss = Some(loss / (model.decoder.cfg.vocab_size as f64).ln());
    Ok(report)
}

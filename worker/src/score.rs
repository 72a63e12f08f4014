//! Layer scoring (Gromov et al. 2024, §3.2): how much does a block of `n` consecutive layers change
//! the residual stream?
//!
//! `d(l, n) = arccos(cos(x_T^(l), x_T^(l+n))) / π`, where `x^(l)` is the stream entering block `l`
//! (`x^(L)`: the last block's output before the final norm) and `T` is the last real token of a
//! sample, averaged over samples. One forward pass over the calibration set gives every pair
//! `n = 1..L`, `l = 0..L−n`. Accumulation is in f64.
//!
//! The same pass also gives ShortGPT's Block Influence per layer, `1 − cos(x^(l), x^(l+1))`
//! averaged over all real tokens (Men et al. 2024).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, D};

use crate::model::decoder::gather_rows;
use crate::model::streamed::StreamedDecoder;
use crate::model::{Decoder, ModelError, Tokenizer};

/// Why scoring (or reading a distances file) failed.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// No calibration sample was usable.
    #[error("no usable calibration samples: {0}")]
    NoSamples(String),
    /// A distances CSV is malformed or belongs to another model.
    #[error("{}: {message}", path.display())]
    DistancesFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The calibration data cannot be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A block size outside `1..=L`.
    #[error("block size n = {n} is out of range for a {layers}-layer model (1 ≤ n ≤ {layers})")]
    BlockSize {
        /// Requested n.
        n: usize,
        /// Layers in the model.
        layers: usize,
    },
}

/// Angle between two vectors as a fraction of π: 0 for parallel, 0.5 for orthogonal, 1 for opposite.
pub fn angular_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let cos = if na == 0.0 || nb == 0.0 { 1.0 } else { dot / (na * nb).sqrt() };
    cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI
}

/// Mean angular distances `d(l, n)` for every block size `n = 1..=L` and start `l = 0..=L−n`.
#[derive(Debug, Clone, PartialEq)]
pub struct AngularDistances {
    /// Layers L of the model scored.
    pub num_layers: usize,
    /// Samples averaged over.
    pub samples: usize,
    /// `rows[n-1][l]`.
    rows: Vec<Vec<f64>>,
}

impl AngularDistances {
    /// `d(l, n)`.
    pub fn get(&self, n: usize, l: usize) -> f64 {
        self.rows[n - 1][l]
    }

    /// All `d(·, n)`, indexed by `l`.
    pub fn row(&self, n: usize) -> &[f64] {
        &self.rows[n - 1]
    }

    /// `l*(n) = argmin_l d(l, n)` (ties to the smallest `l`) and its distance.
    pub fn best_start(&self, n: usize) -> Result<(usize, f64), ScoreError> {
        if n == 0 || n > self.num_layers {
            return Err(ScoreError::BlockSize { n, layers: self.num_layers });
        }
        let row = self.row(n);
        let mut best = 0;
        for (l, &d) in row.iter().enumerate() {
            if d < row[best] {
                best = l;
            }
        }
        Ok((best, row[best]))
    }

    /// CSV with header `n,l,distance`, rows by `n` then `l`; distances printed to round-trip.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("n,l,distance\n");
        for (i, row) in self.rows.iter().enumerate() {
            for (l, d) in row.iter().enumerate() {
                writeln!(out, "{},{l},{d:?}", i + 1).expect("writing to a String cannot fail");
            }
        }
        out
    }

    /// Reads a `n,l,distance` CSV. With `expected_layers`, a file for another depth is an error.
    pub fn read_csv(path: &Path, expected_layers: Option<usize>) -> Result<Self, ScoreError> {
        let err = |message: String| ScoreError::DistancesFile { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h.trim() == "n,l,distance" => {}
            _ => return Err(err("first line must be the header `n,l,distance`".into())),
        }
        let mut entries = Vec::new();
        for (i, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split(',').collect();
            let parsed = (f.len() == 3)
                .then(|| {
                    Some((
                        f[0].trim().parse::<usize>().ok()?,
                        f[1].trim().parse::<usize>().ok()?,
                        f[2].trim().parse::<f64>().ok()?,
                    ))
                })
                .flatten();
            let (n, l, d) =
                parsed.ok_or_else(|| err(format!("line {}: expected `n,l,distance`, got `{line}`", i + 1)))?;
            entries.push((n, l, d));
        }
        let distances = Self::from_entries(&entries).map_err(err)?;
        if let Some(expected) = expected_layers.filter(|&e| e != distances.num_layers) {
            return Err(err(format!(
                "these distances are for a {}-layer model, but the model has {expected} layers; score this model again",
                distances.num_layers
            )));
        }
        Ok(distances)
    }

    /// Builds the table from `(n, l, d)` entries (any order), which must cover every block of a
    /// model whose depth is the largest `n`. The sample count is not known here (0).
    pub fn from_entries(entries: &[(usize, usize, f64)]) -> Result<Self, String> {
        let layers = entries.iter().map(|e| e.0).max().ok_or_else(|| "no rows".to_string())?;
        let mut rows: Vec<Vec<Option<f64>>> = (1..=layers).map(|n| vec![None; layers - n + 1]).collect();
        for &(n, l, d) in entries {
            let slot = (n >= 1)
                .then(|| rows[n - 1].get_mut(l))
                .flatten()
                .ok_or_else(|| format!("row n={n}, l={l} is outside a {layers}-layer model"))?;
            *slot = Some(d);
        }
        let rows = rows
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.into_iter()
                    .enumerate()
                    .map(|(l, d)| d.ok_or_else(|| format!("missing row n={}, l={l}", i + 1)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AngularDistances { num_layers: layers, samples: 0, rows })
    }
}

/// Per-sample sums of `d(l, n)` over last-token states.
#[derive(Debug)]
struct DistanceSums {
    layers: usize,
    sums: Vec<Vec<f64>>,
    samples: usize,
}

impl DistanceSums {
    fn new(layers: usize) -> Self {
        DistanceSums { layers, sums: (1..=layers).map(|n| vec![0.0; layers - n + 1]).collect(), samples: 0 }
    }

    /// `states[l]` = `x_T^(l)` of one sample, `l = 0..=L`.
    fn add(&mut self, states: &[Vec<f32>]) {
        debug_assert_eq!(states.len(), self.layers + 1);
        // Unit vectors in f64, then every pair is one dot product.
        let units: Vec<Vec<f64>> = states
            .iter()
            .map(|s| {
                let norm = s.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
                s.iter().map(|&v| if norm > 0.0 { f64::from(v) / norm } else { 0.0 }).collect()
            })
            .collect();
        for n in 1..=self.layers {
            for l in 0..=self.layers - n {
                let cos: f64 = units[l].iter().zip(&units[l + n]).map(|(a, b)| a * b).sum();
                self.sums[n - 1][l] += cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
            }
        }
        self.samples += 1;
    }

    fn mean(self) -> AngularDistances {
        let k = self.samples as f64;
        AngularDistances {
            num_layers: self.layers,
            samples: self.samples,
            rows: self.sums.into_iter().map(|r| r.into_iter().map(|s| s / k).collect()).collect(),
        }
    }
}

/// ShortGPT's Block Influence per layer: mean over all real tokens of `1 − cos(x^(l), x^(l+1))`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockInfluence {
    /// One score per layer `l = 0..L−1`.
    pub scores: Vec<f64>,
}

/// Token sequences cut from calibration documents.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// One sequence per usable document, each at most `seq_len` tokens.
    pub sequences: Vec<Vec<u32>>,
    /// Documents dropped for having fewer than 2 tokens.
    pub skipped_short: usize,
}

impl Calibration {
    /// Tokenizes documents with the tokenizer's defaults and keeps the first `seq_len` tokens of
    /// each; documents under 2 tokens are skipped and counted.
    pub fn from_documents(tokenizer: &Tokenizer, docs: &[String], seq_len: usize) -> Result<Self, ScoreError> {
        let mut sequences = Vec::with_capacity(docs.len());
        let mut skipped_short = 0;
        for doc in docs {
            let mut ids = tokenizer.encode(doc)?;
            ids.truncate(seq_len);
            if ids.len() < 2 {
                skipped_short += 1;
            } else {
                sequences.push(ids);
            }
        }
        if sequences.is_empty() {
            return Err(ScoreError::NoSamples(format!("all {} documents are shorter than 2 tokens", docs.len())));
        }
        Ok(Calibration { sequences, skipped_short })
    }

    /// Real tokens over all sequences.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// What one scoring pass measured.
#[derive(Debug, Clone)]
pub struct Scores {
    /// `d(l, n)` for every block.
    pub distances: AngularDistances,
    /// Per-layer Block Influence.
    pub influence: BlockInfluence,
    /// Real tokens processed.
    pub tokens: usize,
    /// Wall time of the pass.
    pub seconds: f64,
}

/// A scoring pass: which documents, how long, how many at a time. [`Default`] is the contract's
/// (`prunesweep_proto::defaults`), the same a sweep's score job gets when its file is silent.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreSpec {
    /// Calibration text (JSON lines / json.gz with `text`, Parquet with `text`, or plain text).
    pub data: PathBuf,
    /// The first this many documents.
    pub samples: usize,
    /// Tokens per document (truncated; the distance is taken at the last).
    pub seq_len: usize,
    /// Sequences per forward pass (right-padded).
    pub batch: usize,
}

impl Default for ScoreSpec {
    fn default() -> Self {
        let d = prunesweep_proto::v1::CalibrationData::with_defaults("");
        ScoreSpec {
            data: d.path.into(),
            samples: d.samples as usize,
            seq_len: d.seq_len as usize,
            batch: d.batch_size as usize,
        }
    }
}

/// The scoring stage, as `worker score`, `worker prune` and a sweep's score job run it: read and
/// tokenize the calibration documents, then [`score_layers`]. `on_batch(tokens_done, tokens)`.
pub fn run(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    spec: &ScoreSpec,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<(Calibration, Scores), ScoreError> {
    let docs = crate::data::read_documents(&spec.data, Some(spec.samples))?;
    let calibration = Calibration::from_documents(tokenizer, &docs, spec.seq_len)?;
    if calibration.skipped_short > 0 {
        tracing::warn!(skipped = calibration.skipped_short, "documents shorter than 2 tokens were skipped");
    }
    let total = calibration.tokens();
    let scores = score_layers(decoder, &calibration, spec.batch, &mut |done| on_batch(done, total))?;
    Ok((calibration, scores))
}

/// [`run`] on a model too large for the device: the checkpoint at `path` is opened for a
/// layer-streamed run ([`StreamedDecoder`]) in `dtype` on `device` and scored with
/// [`score_layers_streamed`]. `on_layer(blocks_done, blocks)`.
pub fn run_streamed(
    path: &Path,
    device: &candle_core::Device,
    dtype: DType,
    spec: &ScoreSpec,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<(Calibration, Scores), ScoreError> {
    let decoder = StreamedDecoder::open(path, device, dtype)?;
    let docs = crate::data::read_documents(&spec.data, Some(spec.samples))?;
    let calibration = Calibration::from_documents(&decoder.tokenizer, &docs, spec.seq_len)?;
    let blocks = decoder.num_blocks();
    let scores = score_layers_streamed(decoder, &calibration, spec.batch, &mut |done| on_layer(done, blocks))?;
    Ok((calibration, scores))
}

/// One right-padded batch of calibration sequences.
struct Batch {
    ids: Tensor,
    /// Each sequence's last real position.
    last: Vec<usize>,
    /// `valid[b, t] = 1` for real tokens: Block Influence averages over real tokens only.
    valid: Tensor,
    tokens: usize,
}

impl Batch {
    fn new(chunk: &[Vec<u32>], device: &candle_core::Device) -> candle_core::Result<Self> {
        let lens: Vec<usize> = chunk.iter().map(Vec::len).collect();
        let width = *lens.iter().max().expect("chunks are non-empty");
        let padded: Vec<u32> =
            chunk.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat(0)).take(width)).collect();
        let valid: Vec<f32> =
            lens.iter().flat_map(|&len| (0..width).map(move |t| if t < len { 1.0 } else { 0.0 })).collect();
        Ok(Batch {
            ids: Tensor::from_vec(padded, (chunk.len(), width), device)?,
            last: lens.iter().map(|l| l - 1).collect(),
            valid: Tensor::from_vec(valid, (chunk.len(), width), device)?,
            tokens: lens.iter().sum(),
        })
    }
}

/// What scoring keeps of one batch while its residual states go by, layer after layer.
#[derive(Default)]
struct BatchScore {
    /// `x_T^(l)` of each sequence, `[B, H]` per layer so far.
    last_states: Vec<Tensor>,
    /// The previous state and its per-token norms: each state's norm is computed once, not once
    /// as the left and once as the right side of a cosine.
    prev: Option<(Tensor, Tensor)>,
}

impl BatchScore {
    /// Takes `x^(l)` of `batch`; adds layer `l − 1`'s Block Influence to `influence`.
    fn observe(&mut self, l: usize, x: &Tensor, batch: &Batch, influence: &mut [f64]) -> candle_core::Result<()> {
        let x = x.to_dtype(DType::F32)?;
        self.last_states.push(gather_rows(&x, &batch.last)?);
        let norm = x.sqr()?.sum(D::Minus1)?.sqrt()?;
        if let Some((p, p_norm)) = self.prev.take() {
            let cos = ((&p * &x)?.sum(D::Minus1)? / (p_norm * &norm)?.clamp(1e-30f32, f32::MAX)?)?;
            let one_minus = ((1.0 - cos)? * &batch.valid)?.sum_all()?.to_scalar::<f32>()?;
            influence[l - 1] += f64::from(one_minus);
        }
        self.prev = Some((x, norm));
        Ok(())
    }

    /// Adds every sequence's distances to `sums`.
    fn finish(self, sums: &mut DistanceSums) -> candle_core::Result<()> {
        // [L+1, B, H] → per sample, per layer.
        for sample in &Tensor::stack(&self.last_states, 1)?.to_vec3::<f32>()? {
            sums.add(sample);
        }
        Ok(())
    }
}

/// Runs the calibration set through `decoder` in right-padded batches of `batch` sequences and
/// accumulates distances and Block Influence. `on_batch(tokens_done)` is called after each batch
/// (progress bars).
pub fn score_layers(
    decoder: &Decoder,
    calibration: &Calibration,
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Scores, ScoreError> {
    let layers = decoder.num_blocks();
    let started = Instant::now();
    let mut sums = DistanceSums::new(layers);
    let mut influence = vec![0f64; layers];
    let mut done = 0usize;
    for chunk in calibration.sequences.chunks(batch.max(1)) {
        let batch = Batch::new(chunk, decoder.device())?;
        let mut score = BatchScore::default();
        decoder.run(&batch.ids, None, None, &mut |l, x| score.observe(l, x, &batch, &mut influence))?;
        score.finish(&mut sums)?;
        done += batch.tokens;
        on_batch(done);
    }
    Ok(Scores::from_sums(sums, influence, done, started))
}

/// [`score_layers`] for a model run layer by layer ([`StreamedDecoder`]): every batch's residual
/// stream stays on the device while each block is loaded, applied to all batches and dropped, so
/// a model larger than the device is scored in its own dtype. The same numbers as
/// [`score_layers`] on the loaded model, to the bit. `on_layer(layers_done)` after each block.
pub fn score_layers_streamed(
    decoder: StreamedDecoder,
    calibration: &Calibration,
    batch: usize,
    on_layer: &mut dyn FnMut(usize),
) -> Result<Scores, ScoreError> {
    let layers = decoder.num_blocks();
    let started = Instant::now();
    let batches = calibration
        .sequences
        .chunks(batch.max(1))
        .map(|chunk| Batch::new(chunk, decoder.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut scores: Vec<BatchScore> = batches.iter().map(|_| BatchScore::default()).collect();
    let mut influence = vec![0f64; layers];
    decoder.run_layer_major(&batches.iter().map(|b| b.ids.clone()).collect::<Vec<_>>(), &mut |l, i, x| {
        if i == 0 && l > 0 {
            on_layer(l);
        }
        scores[i].observe(l, x, &batches[i], &mut influence).map_err(ModelError::from)
    })?;
    let mut sums = DistanceSums::new(layers);
    for score in scores {
        score.finish(&mut sums)?;
    }
    let done = batches.iter().map(|b| b.tokens).sum();
    Ok(Scores::from_sums(sums, influence, done, started))
}

impl Scores {
    fn from_sums(sums: DistanceSums, influence: Vec<f64>, tokens: usize, started: Instant) -> Self {
        let k = tokens as f64;
        Scores {
            distances: sums.mean(),
            influence: BlockInfluence { scores: influence.into_iter().map(|s| s / k).collect() },
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_geometry() {
        assert_eq!(angular_distance(&[1.0, 0.0], &[0.0, 3.0]), 0.5);
        assert_eq!(angular_distance(&[2.0, 5.0, -1.0], &[2.0, 5.0, -1.0]), 0.0);
        assert_eq!(angular_distance(&[1.0, 1.0], &[-2.0, -2.0]), 1.0);
        assert!((angular_distance(&[1.0, 0.0], &[1.0, 1.0]) - 0.25).abs() < 1e-12);
        // Scale does not matter.
        assert!(
            (angular_distance(&[1.0, 2.0], &[3.0, 1.0]) - angular_distance(&[10.0, 20.0], &[1.5, 0.5])).abs() < 1e-12
        );
    }

    #[test]
    fn sums_cover_every_block_and_average() {
        let mut s = DistanceSums::new(2);
        // x0 ⟂ x1, x1 = x2: d(0,1)=0.5, d(1,1)=0, d(0,2)=0.5.
        s.add(&[vec![1.0, 0.0], vec![0.0, 1.0], vec![0.0, 2.0]]);
        s.add(&[vec![1.0, 0.0], vec![1.0, 0.0], vec![0.0, 2.0]]);
        let d = s.mean();
        assert_eq!(d.samples, 2);
        assert_eq!(d.row(1), &[0.25, 0.25]);
        assert_eq!(d.row(2), &[0.5]);
        assert_eq!(d.best_start(1).unwrap(), (0, 0.25), "ties go to the smallest l");
        assert!(d.best_start(3).is_err());
    }

    #[test]
    fn csv_round_trips_and_checks_depth() {
        let mut s = DistanceSums::new(3);
        s.add(&[vec![1.0, 0.0], vec![0.9, 0.1], vec![0.1, 0.8], vec![-1.0, 0.2]]);
        let d = s.mean();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, d.to_csv()).unwrap();
        let back = AngularDistances::read_csv(&p, Some(3)).unwrap();
        assert_eq!(back.row(1), d.row(1));
        assert_eq!(back.row(3), d.row(3));
        let e = AngularDistances::read_csv(&p, Some(30)).unwrap_err().to_string();
        assert!(e.contains("3-layer") && e.contains("30 layers"), "{e}");
        std::fs::write(&p, "n,l,distance\n1,0,0.1\n").unwrap();
        assert!(AngularDistances::read_csv(&p, None).is_ok());
        std::fs::write(&p, "n,l,distance\n2,0,0.1\n").unwrap();
        let e = AngularDistances::read_csv(&p, None).unwrap_err().to_string();
        assert!(e.contains("missing row n=1"), "{e}");
    }
}

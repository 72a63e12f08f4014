//! Healing data: documents tokenized, joined with EOS and cut into fixed-length chunks (the usual
//! "packed" causal-LM batches: no padding, every token is a training target).

use candle_core::{Device, Tensor};

use crate::model::{ModelError, Tokenizer};

/// Training sequences of exactly `seq_len` tokens, in data order.
#[derive(Debug, Clone)]
pub struct PackedChunks {
    /// Token ids, chunk after chunk.
    ids: Vec<u32>,
    /// Tokens per chunk.
    pub seq_len: usize,
    /// Documents that went in.
    pub documents: usize,
}

impl PackedChunks {
    /// Tokenizes `docs` in order (BOS where the tokenizer adds one, as the paper did), appends
    /// `eos` after each and cuts the stream into chunks of `seq_len`, stopping once `max_chunks`
    /// are full; the last partial chunk is dropped.
    pub fn pack(
        tokenizer: &Tokenizer,
        docs: &[String],
        eos: u32,
        seq_len: usize,
        max_chunks: usize,
    ) -> Result<Self, ModelError> {
        let want = seq_len * max_chunks;
        let mut ids = Vec::with_capacity(want);
        let mut documents = 0;
        for doc in docs {
            if ids.len() >= want {
                break;
            }
            ids.extend(tokenizer.encode(doc)?);
            ids.push(eos);
            documents += 1;
        }
        ids.truncate((ids.len() / seq_len * seq_len).min(want));
        Ok(PackedChunks { ids, seq_len, documents })
    }

    /// Number of full chunks.
    pub fn len(&self) -> usize {
        self.ids.len() / self.seq_len
    }

    /// No full chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunks `start .. start + n` (wrapping around the end: a new epoch) as a `[n, seq_len]` batch.
    pub fn batch(&self, start: usize, n: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mut out = Vec::with_capacity(n * self.seq_len);
        for k in 0..n {
            let c = (start + k) % self.len();
            out.extend_from_slice(&self.ids[c * self.seq_len..(c + 1) * self.seq_len]);
        }
        Tensor::from_vec(out, (n, self.seq_len), device)
    }
}

//! Text → token ids, from an HF `tokenizer.json` or rebuilt from a GGUF file's vocabulary.
//!
//! GGUF stores a byte-level BPE as `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`. We rebuild it
//! with the `tokenizers` crate and **no** added prefix space, which reproduces transformers' ids on
//! SmolLM2 (candle's `TokenizerFromGguf` adds a prefix space and does not). The pre-tokenizer follows
//! `tokenizer.ggml.pre` as llama.cpp names it, except where transformers (our reference) differs:
//! for `smollm` it applies the plain GPT-2 byte-level regex with no digit pre-split, and so do we
//! (a run of spaces before a digit tokenizes differently otherwise).

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::ModelError;

/// llama.cpp's `llama-bpe` (Llama-3) pre-tokenizer regex.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `qwen2` pre-tokenizer regex.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer plus where it came from.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file it was read from (`tokenizer.json` or the `.gguf`).
    pub source: PathBuf,
}

impl Tokenizer {
    /// Reads an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: "the model folder needs a tokenizer.json (save it with `tokenizer.save_pretrained`)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Tokenizer { inner, source: path.to_path_buf() })
    }

    /// Rebuilds the byte-level BPE stored in GGUF metadata.
    pub fn from_gguf(
        path: &Path,
        md: &std::collections::HashMap<String, gguf_file::Value>,
    ) -> Result<Self, ModelError> {
        let err = |message: String| ModelError::Tokenizer { path: path.to_path_buf(), message };
        let get = |k: &str| md.get(k).ok_or_else(|| err(format!("metadata `{k}` is missing")));
        let model = get("tokenizer.ggml.model")?.to_string().map_err(|e| err(e.to_string()))?.clone();
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); use the HF directory with its tokenizer.json"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>, ModelError> {
            get(k)?
                .to_vec()
                .map_err(|e| err(e.to_string()))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| err(format!("{k}: {e}"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge `{m}` is not two space-separated tokens")))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| err(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| err(e.to_string())))
                .collect::<Result<_, _>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe =
            BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err(format!("building BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre =
            md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "default".into());
        let pre_tokenizer = gguf_pre_tokenizer(&pre).map_err(err)?;
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole in text, as transformers does.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == 3))
            .collect();
        inner.add_special_tokens(&specials);
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        if add_bos {
            let bos_id = md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()).unwrap_or(1);
            let bos = tokens.get(bos_id as usize).cloned().ok_or_else(|| err("bos_token_id out of range".into()))?;
            let template = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                .map_err(|e| err(e.to_string()))?
                .special_tokens(vec![(bos, bos_id)])
                .build()
                .map_err(|e| err(e.to_string()))?;
            inner.with_post_processor(Some(template));
        }
        Ok(Tokenizer { inner, source: path.to_path_buf() })
    }

    /// Token ids of `text` with the tokenizer's defaults (special tokens such as BOS added when the
    /// tokenizer's post-processor adds them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, without BOS/EOS (for continuations appended to a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| ModelError::Tokenizer { path: self.source.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer { path: self.source.clone(), message: e.to_string() })
    }

    /// The id of one token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join("tokenizer.json");
        self.inner.save(&path, false).map_err(|e| ModelError::Tokenizer { path, message: e.to_string() })
    }
}
/// The pre-tokenizer a GGUF's `tokenizer.ggml.pre` names: GPT-2's byte level, or the Llama-3 /
/// Qwen2 regex split before it.
fn gguf_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, String> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, String> {
        let s = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("pre-tokenizer regex: {e}"))?;
        Ok(s.into())
    };
    match pre {
        "default" | "gpt2" | "gpt-2" | "smollm" => Ok(ByteLevel::new(false, true, true).into()),
        "llama-bpe" | "llama3" => Ok(Sequence::new(vec![split(LLAMA3_SPLIT)?, ByteLevel::new(false, true, false).into()]).into()),
        "qwen2" => Ok(Sequence::new(vec![split(QWEN2_SPLIT)?, ByteLevel::new(false, true, false).into()]).into()),
        other => Err(format!(
            "GGUF pre-tokenizer `{other}` is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2); use the HF directory with its tokenizer.json"
        )),
    }
}

//! GGUF files (llama and qwen2 architectures): the metadata → an HF `config.json`, and the tensors
//! under HF names, each read and dequantized only when the decoder takes it
//! ([`super::weights::WeightMap::from_gguf`]). candle has no fast CPU kernels for most GGUF block
//! types, so the tensors are dequantized to f32; llama.cpp's q/k row permutation for interleaved
//! rotary is undone, so that GGUF and HF checkpoints run the same code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::config::{Config, Family};
use super::{candle_message, ModelError};

/// A parsed GGUF file: its configuration and metadata, and its tensors to be read.
#[derive(Debug)]
pub struct GgufModel {
    /// The resolved configuration.
    pub config: Config,
    /// An HF `config.json` equivalent to the GGUF metadata (written with a saved model).
    pub config_json: Value,
    /// The tensors, under HF names, read when taken ([`WeightMap::from_gguf`]).
    pub tensors: GgufTensors,
    /// The GGUF metadata, for the tokenizer.
    pub metadata: HashMap<String, gguf_file::Value>,
}

/// A GGUF file's tensors under HF names, each read and dequantized (f32, on the CPU) only when
/// asked for, so that loading holds one dequantized tensor at a time.
#[derive(Debug)]
pub struct GgufTensors {
    pub(super) path: PathBuf,
    file: std::fs::File,
    content: gguf_file::Content,
    /// HF name → GGUF name.
    pub(super) names: HashMap<String, String>,
    /// Llama rows to un-permute: (heads of q, heads of k, head_dim); `None` for other families.
    llama_heads: Option<(usize, usize, usize)>,
}

impl GgufTensors {
    /// Elements of tensor `hf` (0 if absent).
    pub(super) fn elements(&self, hf: &str) -> u64 {
        let info = self.names.get(hf).and_then(|g| self.content.tensor_infos.get(g));
        info.map_or(0, |i| i.shape.elem_count() as u64)
    }

    /// Tensor `hf`, dequantized to f32 on the CPU, its rows in HF order; `None` if absent.
    pub(super) fn load(&mut self, hf: &str) -> Result<Option<Tensor>, ModelError> {
        let Some(name) = self.names.get(hf) else { return Ok(None) };
        let corrupt = |message: String| ModelError::Corrupt { path: self.path.clone(), message };
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| corrupt(format!("tensor `{name}`: {} (truncated file?)", candle_message(&e))))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        drop(q);
        // llama.cpp's converter permutes q/k rows for its interleaved rotary (llama arch only):
        // HF rows (head, half, j) are stored as (head, j, half). Undo it.
        if let Some((n_heads, n_kv, head_dim)) = self.llama_heads {
            if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
                let heads = if name.ends_with("attn_q.weight") { n_heads } else { n_kv };
                let (rows, cols) = t.dims2()?;
                t = t.reshape((heads, head_dim / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?;
            }
        }
        Ok(Some(t))
    }
}

/// Reads a GGUF file's header (llama or qwen2 architecture); its tensors are read as they are
/// taken ([`WeightMap::from_gguf`]).
pub fn read_gguf(path: &Path) -> Result<GgufModel, ModelError> {
    let corrupt = |message: String| ModelError::Corrupt { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut content = gguf_file::Content::read(&mut file)
        .map_err(|e| corrupt(format!("not a readable GGUF file: {}", candle_message(&e))))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| corrupt("no general.architecture".into()))?;
    let family = match arch.as_str() {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(ModelError::UnsupportedArchitecture {
                origin: path.display().to_string(),
                found: format!("GGUF architecture `{other}`"),
                supported: "GGUF: llama, qwen2 (HF directories: ".to_string() + Family::SUPPORTED + ")",
            })
        }
    };
    let cfg_json = gguf_config_json(path, &content, family, &arch)?;
    let config = Config::from_json(&cfg_json).map_err(corrupt)?;
    let names = content.tensor_infos.keys().filter_map(|name| Some((gguf_to_hf_name(name)?, name.clone()))).collect();
    let llama_heads = (family == Family::Llama).then_some((config.num_heads, config.num_kv_heads, config.head_dim));
    let metadata = std::mem::take(&mut content.metadata);
    let tensors = GgufTensors { path: path.to_path_buf(), file, content, names, llama_heads };
    Ok(GgufModel { config, config_json: cfg_json, tensors, metadata })
}

/// The HF `config.json` a GGUF's metadata describes (llama.cpp keys under `{arch}.`), refusing
/// what the decoder would compute differently (partial rotary, RoPE scaling).
fn gguf_config_json(
    path: &Path,
    content: &gguf_file::Content,
    family: Family,
    arch: &str,
) -> Result<Value, ModelError> {
    let corrupt = |message: String| ModelError::Corrupt { path: path.to_path_buf(), message };
    let md = &content.metadata;
    let get_u = |key: &str| -> Result<usize, ModelError> {
        md.get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| corrupt(format!("metadata `{arch}.{key}` is missing")))
    };
    let get_f = |key: &str| md.get(&format!("{arch}.{key}")).and_then(|v| v.to_f32().ok());
    let n_layers = get_u("block_count")?;
    let hidden = get_u("embedding_length")?;
    let n_heads = get_u("attention.head_count")?;
    let n_kv = get_u("attention.head_count_kv").unwrap_or(n_heads);
    let vocab = match get_u("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| corrupt("neither vocab_size nor tokenizer.ggml.tokens".into()))?,
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let token_id = |key: &str| md.get(&format!("tokenizer.ggml.{key}")).and_then(|v| v.to_u32().ok());
    let mut cfg_json = json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get_u("feed_forward_length")?,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": get_u("context_length").unwrap_or(4096),
        "rms_norm_eps": get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": get_f("rope.freq_base").unwrap_or(10_000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    });
    if let Some(b) = token_id("bos_token_id") {
        cfg_json["bos_token_id"] = json!(b);
    }
    if let Some(e) = token_id("eos_token_id") {
        cfg_json["eos_token_id"] = json!(e);
    }
    let rope_dim = get_u("rope.dimension_count").ok();
    if let Some(rd) = rope_dim.filter(|&rd| rd != hidden / n_heads) {
        return Err(corrupt(format!(
            "rope.dimension_count {rd} differs from head_dim {}: partial rotary GGUF is not supported",
            hidden / n_heads
        )));
    }
    if let Some(kind) = md.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()) {
        if kind != "none" {
            return Err(corrupt(format!("rope scaling `{kind}` in GGUF is not supported; use the HF directory")));
        }
    }
    Ok(cfg_json)
}

/// llama.cpp tensor names → HF names.
fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

//! Model configuration: what a checkpoint's `config.json` (or GGUF metadata) says, resolved into one
//! [`Config`] with no `Option`s left that the decoder reads.
//!
//! Five families are supported. They differ only in small, named ways, and each difference is a field
//! of [`Config`] rather than a separate model file:
//!
//! | family  | norm      | block      | MLP            | biases             | rotary          | extra          |
//! |---------|-----------|------------|----------------|--------------------|-----------------|----------------|
//! | llama   | RMSNorm   | sequential | gated SiLU     | optional           | full, llama3/linear scaling | |
//! | mistral | RMSNorm   | sequential | gated SiLU     | none               | full            | sliding window |
//! | qwen2   | RMSNorm   | sequential | gated SiLU     | q, k, v            | full            |                |
//! | phi3    | RMSNorm   | sequential | gated SiLU     | none               | full or partial | fused qkv / gate_up in the checkpoint, sliding window |
//! | phi     | LayerNorm | parallel   | GELU (fc1/fc2) | everywhere         | partial         | Phi-2          |

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// The model families the decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 1/2/3 and derivatives (SmolLM2 included).
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen2 / Qwen2.5 (bias on q, k, v).
    Qwen2,
    /// Phi-3 (fused qkv and gate_up projections in the checkpoint).
    Phi3,
    /// Phi-2 (`model_type: phi`): LayerNorm, parallel attention + MLP, partial rotary, GELU.
    Phi,
}

/// A module a checkpoint stores fused (`self_attn.qkv_proj`) and the decoder projections it holds,
/// in the order of its rows.
pub type FusedModule = (&'static str, &'static [&'static str]);

impl Family {
    /// The modules this family's checkpoints store fused. The loader splits them into the decoder's
    /// projections, the writer puts them back together, and adapters target them whole, as PEFT
    /// does. Only Phi-3 fuses.
    pub fn fused_modules(self) -> &'static [FusedModule] {
        match self {
            Family::Phi3 => &[
                ("self_attn.qkv_proj", &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"]),
            ],
            _ => &[],
        }
    }

    /// The feed-forward modules an adapter can target, by the names PEFT gives them: what the
    /// paper heals (App. A.1) and `--targets ffn` selects.
    pub fn ffn_modules(self) -> &'static [&'static str] {
        match self {
            Family::Llama | Family::Mistral | Family::Qwen2 => &["gate_proj", "up_proj", "down_proj"],
            Family::Phi3 => &["gate_up_proj", "down_proj"],
            Family::Phi => &["fc1", "fc2"],
        }
    }

    /// The attention modules an adapter can target, by the names PEFT gives them.
    pub fn attention_modules(self) -> &'static [&'static str] {
        match self {
            Family::Llama | Family::Mistral | Family::Qwen2 => &["q_proj", "k_proj", "v_proj", "o_proj"],
            Family::Phi3 => &["qkv_proj", "o_proj"],
            Family::Phi => &["q_proj", "k_proj", "v_proj", "dense"],
        }
    }

    /// Every supported `model_type`, for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, phi3, phi (Phi-2)";

    /// The `model_type` string used in HF `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Phi3 => "phi3",
            Family::Phi => "phi",
        }
    }

    /// The HF `architectures` entry for a causal LM of this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Phi => "PhiForCausalLM",
        }
    }

    fn from_names(model_type: Option<&str>, architectures: &[String]) -> Option<Family> {
        let by_type = match model_type {
            Some("llama") => Some(Family::Llama),
            Some("mistral") => Some(Family::Mistral),
            Some("qwen2") => Some(Family::Qwen2),
            Some("phi3") => Some(Family::Phi3),
            Some("phi") => Some(Family::Phi),
            _ => None,
        };
        by_type.or_else(|| {
            architectures.iter().find_map(|a| match a.as_str() {
                "LlamaForCausalLM" => Some(Family::Llama),
                "MistralForCausalLM" => Some(Family::Mistral),
                "Qwen2ForCausalLM" => Some(Family::Qwen2),
                "Phi3ForCausalLM" => Some(Family::Phi3),
                "PhiForCausalLM" => Some(Family::Phi),
                _ => None,
            })
        })
    }
}

/// Which normalisation the blocks and the final norm use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x / rms(x) * w` (Llama, Mistral, Qwen2, Phi-3).
    Rms,
    /// `(x - mean) / std * w + b` (Phi-2).
    Layer,
}

/// The MLP's non-linearity (HF `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu` (exact, erf-based).
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// Rotary-embedding frequency scaling (HF `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear {
        /// Division factor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// Division factor for the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// The resolved configuration the decoder is built from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which family's conventions apply.
    pub family: Family,
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: usize,
    /// Residual-stream width H.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks L in the checkpoint (before any pruning).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// How many leading dimensions of each head are rotated (all of them except for partial rotary).
    pub rotary_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Norm type.
    pub norm: NormKind,
    /// Norm epsilon.
    pub norm_eps: f64,
    /// MLP activation.
    pub activation: Activation,
    /// Phi-2 style block: `x + attn(ln(x)) + mlp(ln(x))` instead of two sequential residual updates.
    pub parallel_block: bool,
    /// Gated MLP (`down(act(gate(x)) * up(x))`) rather than `fc2(act(fc1(x)))`.
    pub gated_mlp: bool,
    /// Bias on the q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Bias on the LM head (Phi-2).
    pub lm_head_bias: bool,
    /// Token i attends to token j only when `i - j < window` (Mistral, Phi-3).
    pub sliding_window: Option<usize>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest position the model was configured for.
    pub max_position_embeddings: usize,
}

/// The subset of HF `config.json` we read. Unknown keys are kept in the raw JSON (and written back
/// untouched when a pruned model is saved), so this struct does not deny them.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_position_embeddings: Option<usize>,
    qk_layernorm: Option<bool>,
}

impl RawConfig {
    /// `head_dim` and the key/value head count, checked against the attention heads.
    fn heads(&self) -> Result<(usize, usize), String> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 && self.head_dim.is_none()
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads);
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || self.num_attention_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                self.num_attention_heads
            ));
        }
        if self.qk_layernorm == Some(true) {
            return Err("qk_layernorm = true is not supported".into());
        }
        Ok((head_dim, num_kv_heads))
    }

    /// RoPE: θ, scaling and the rotated width of a head. transformers >= 5 writes
    /// `rope_parameters` (theta, type and scaling in one object); older configs use `rope_theta` +
    /// `rope_scaling`.
    fn rotary(&self, head_dim: usize) -> Result<(f64, RopeScaling, usize), String> {
        let params = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = self
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        let scaling_source = self.rope_scaling.as_ref().filter(|v| v.is_object()).or(params);
        let rope_scaling = parse_rope_scaling(scaling_source)?;
        let partial = self
            .partial_rotary_factor
            .or_else(|| params.and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64))
            .unwrap_or(1.0);
        let rotary_dim = ((head_dim as f64) * partial) as usize;
        if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
            return Err(format!(
                "partial_rotary_factor {partial} gives a rotary width of {rotary_dim} for head_dim {head_dim}; it must be even and positive"
            ));
        }
        Ok((rope_theta, rope_scaling, rotary_dim))
    }
}

impl Config {
    /// Parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<(Config, Value), ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        let cfg =
            Config::from_json(&raw).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
        Ok((cfg, raw))
    }

    /// Resolves a parsed `config.json`. The error is a sentence naming the offending key.
    pub fn from_json(raw: &Value) -> Result<Config, String> {
        let c: RawConfig = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
        let family = Family::from_names(c.model_type.as_deref(), &c.architectures).ok_or_else(|| {
            format!(
                "model_type `{}` (architectures {:?}) is not supported; supported: {}",
                c.model_type.as_deref().unwrap_or("<missing>"),
                c.architectures,
                Family::SUPPORTED
            )
        })?;
        if c.num_hidden_layers == 0 {
            return Err("num_hidden_layers is 0".into());
        }
        let (head_dim, num_kv_heads) = c.heads()?;
        let (rope_theta, rope_scaling, rotary_dim) = c.rotary(head_dim)?;
        let default_act = if family == Family::Phi { "gelu_new" } else { "silu" };
        let act_name = c.hidden_act.clone().unwrap_or_else(|| default_act.to_string());
        let activation = Activation::parse(&act_name).ok_or_else(|| {
            format!(
                "hidden_act `{act_name}` is not supported; supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu"
            )
        })?;
        let sliding_window = match family {
            Family::Mistral | Family::Phi3 => c.sliding_window,
            Family::Qwen2 if c.use_sliding_window == Some(true) => {
                return Err("qwen2 with use_sliding_window = true is not supported".into())
            }
            _ => None,
        };
        let (norm, norm_eps) = match family {
            Family::Phi => (NormKind::Layer, c.layer_norm_eps.unwrap_or(1e-5)),
            _ => (NormKind::Rms, c.rms_norm_eps.unwrap_or(1e-6)),
        };
        let attention_bias = c.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (attention_bias, attention_bias, c.mlp_bias.unwrap_or(false)),
            Family::Mistral | Family::Phi3 => (false, false, false),
            Family::Qwen2 => (true, false, false),
            Family::Phi => (true, true, true),
        };
        Ok(Config {
            family,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            rope_scaling,
            norm,
            norm_eps,
            activation,
            parallel_block: family == Family::Phi,
            gated_mlp: family != Family::Phi,
            qkv_bias,
            o_bias,
            mlp_bias,
            lm_head_bias: family == Family::Phi,
            sliding_window,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
        })
    }

    /// The shape the memory model (`prunesweep_proto::memory`) predicts from: the worker's view
    /// of the checkpoint, as the coordinator reads it from the same config.
    pub fn shape(&self) -> prunesweep_proto::memory::ModelShape {
        let narrow = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        prunesweep_proto::memory::ModelShape {
            layers: narrow(self.num_layers),
            hidden: narrow(self.hidden_size),
            intermediate: narrow(self.intermediate_size),
            heads: narrow(self.num_heads),
            kv_heads: narrow(self.num_kv_heads),
            head_dim: narrow(self.head_dim),
            vocab: narrow(self.vocab_size),
            tied_embeddings: self.tie_word_embeddings,
            gated_mlp: self.gated_mlp,
        }
    }

    /// The inverse RoPE frequencies, one per rotated pair, after scaling.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim;
        let base: Vec<f32> =
            (0..dim).step_by(2).map(|i| 1.0 / (self.rope_theta as f32).powf(i as f32 / dim as f32)).collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: orig,
            } => {
                // transformers `_compute_llama3_parameters`, term for term.
                let (factor, low, high, orig) =
                    (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *orig as f32);
                let low_freq_wavelen = orig / low;
                let high_freq_wavelen = orig / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<RopeScaling, String> {
    let Some(v) = v else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64, String> {
        v.get(key).and_then(Value::as_f64).ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!("rope type `{other}` is not supported; supported: default, linear, llama3")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_json() -> Value {
        json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1})
    }

    #[test]
    fn unknown_family_names_what_was_found_and_what_is_supported() {
        let mut j = llama_json();
        j["model_type"] = json!("gemma2");
        j["architectures"] = json!(["Gemma2ForCausalLM"]);
        let err = Config::from_json(&j).unwrap_err();
        assert!(err.contains("gemma2") && err.contains("Gemma2ForCausalLM") && err.contains("qwen2"), "{err}");
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let mut j = llama_json();
        j["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let err = Config::from_json(&j).unwrap_err();
        assert!(err.contains("yarn") && err.contains("llama3"), "{err}");
    }

    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let mut j = llama_json();
        j["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0});
        let c = Config::from_json(&j).unwrap();
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn family_defaults() {
        let c = Config::from_json(&llama_json()).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.rotary_dim), (4, 1, 4));
        assert!(!c.qkv_bias && c.gated_mlp && !c.parallel_block);
        let mut j = llama_json();
        j["model_type"] = json!("phi");
        j["partial_rotary_factor"] = json!(0.5);
        let c = Config::from_json(&j).unwrap();
        assert_eq!((c.norm, c.rotary_dim, c.activation), (NormKind::Layer, 2, Activation::GeluTanh));
        assert!(c.parallel_block && c.lm_head_bias && !c.gated_mlp);
    }
}

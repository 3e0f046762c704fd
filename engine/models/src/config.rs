//! `config.json` and `generation_config.json` of an HF model folder.
//!
//! Two dialects exist: hub checkpoints carry `rope_theta`, `rope_scaling` and `torch_dtype`
//! (and `num_experts` for Qwen3-MoE); transformers 5 writes `rope_parameters` (with
//! `rope_theta` inside), `dtype` and `num_local_experts`. Both are read into one resolved
//! [`ModelConfig`]; every error names the file and the key.
//!
//! `sliding_window` is resolved by [`ModelConfig::sliding_window_active`]: the architectures
//! served here use full attention in their released checkpoints (Qwen2/3 set
//! `use_sliding_window: false`, Mistral v0.2+ sets `sliding_window: null`), and no backend
//! applies a window, so a checkpoint that enables one is served only with contexts that fit
//! inside it ([`ModelConfig::context_limit`]), where full attention is the same math.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use crate::ModelError;

/// Rotary position embedding variant.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling (`rope_type: llama3`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// Resolved RoPE parameters, whichever dialect they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the inverse frequencies (`rope_theta`).
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Routed-expert parameters of Qwen3-MoE.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per sparse layer (`num_experts`, v5: `num_local_experts`).
    pub num_experts: usize,
    /// Experts each token is sent to (`num_experts_per_tok`).
    pub num_experts_per_tok: usize,
    /// Hidden size of each expert's MLP (`moe_intermediate_size`).
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse.
    pub decoder_sparse_step: usize,
    /// Layers that use a dense MLP although the step would make them sparse.
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether layer `idx` has routed experts (the rule of transformers' Qwen3MoeDecoderLayer).
    pub fn is_sparse_layer(&self, idx: usize) -> bool {
        !self.mlp_only_layers.contains(&idx)
            && self.num_experts > 0
            && (idx + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// A model's `config.json`, resolved and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `architectures[0]`, the key of the architecture registry.
    pub architecture: String,
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Dense MLP hidden size (also the dense layers of a MoE model).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (MHA) when absent.
    pub num_key_value_heads: usize,
    /// Explicit `head_dim`, else `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
    /// Llama/Mistral/Qwen3 `attention_bias` (q/k/v/o bias); Qwen2 always has q/k/v bias.
    pub attention_bias: bool,
    /// Llama `mlp_bias`.
    pub mlp_bias: bool,
    pub rope: RopeConfig,
    /// Checkpoint dtype as written (`torch_dtype` or `dtype`), e.g. `bfloat16`.
    pub dtype: Option<String>,
    pub moe: Option<MoeConfig>,
    /// As written; [`ModelConfig::sliding_window_active`] says whether it applies.
    pub sliding_window: Option<usize>,
    pub use_sliding_window: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` is an int or a list of ints in both config files.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Map<String, serde_json::Value>>,
    rope_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    #[serde(alias = "num_local_experts")]
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

fn cfg_err(file: &str, message: impl Into<String>) -> ModelError {
    ModelError::Config { file: file.to_string(), message: message.into() }
}

fn required(file: &str, key: &str, v: Option<usize>) -> Result<usize, ModelError> {
    match v {
        Some(0) => Err(cfg_err(file, format!("`{key}` must be > 0"))),
        Some(x) => Ok(x),
        None => Err(cfg_err(file, format!("missing required key `{key}`"))),
    }
}

fn read_json(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

fn get_f64(
    file: &str,
    map: &serde_json::Map<String, serde_json::Value>,
    table: &str,
    key: &str,
) -> Result<f64, ModelError> {
    map.get(key).and_then(|v| v.as_f64()).ok_or_else(|| cfg_err(file, format!("`{table}.{key}` must be a number")))
}

/// Sanity ceilings so a hostile config cannot make the loader allocate absurd buffers before
/// any tensor is checked.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 24;

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates one `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = read_json(path)?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses `config.json` text; `file` names the source in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self, ModelError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| cfg_err(file, e.to_string()))?;
        let architecture = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| cfg_err(file, "missing key `architectures` (a list naming the model class)"))?;
        let vocab_size = required(file, "vocab_size", raw.vocab_size)?;
        let hidden_size = required(file, "hidden_size", raw.hidden_size)?;
        let intermediate_size = required(file, "intermediate_size", raw.intermediate_size)?;
        let num_hidden_layers = required(file, "num_hidden_layers", raw.num_hidden_layers)?;
        let num_attention_heads = required(file, "num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = match raw.num_key_value_heads {
            None => num_attention_heads,
            Some(_) => required(file, "num_key_value_heads", raw.num_key_value_heads)?,
        };
        let head_dim = match raw.head_dim {
            Some(_) => required(file, "head_dim", raw.head_dim)?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(cfg_err(
                        file,
                        format!(
                            "`hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` ({num_attention_heads}) and no `head_dim` is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        for (key, v, max) in [
            ("vocab_size", vocab_size, MAX_VOCAB),
            ("hidden_size", hidden_size, MAX_DIM),
            ("intermediate_size", intermediate_size, MAX_DIM),
            ("num_hidden_layers", num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", num_attention_heads, MAX_DIM),
            ("head_dim", head_dim, MAX_DIM),
        ] {
            if v > max {
                return Err(cfg_err(file, format!("`{key}` = {v} exceeds the limit {max}")));
            }
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(
                file,
                format!(
                    "`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(cfg_err(file, format!("`head_dim` ({head_dim}) must be even for rotary embeddings")));
        }
        let hidden_act = raw.hidden_act.unwrap_or_else(|| "silu".to_string());
        if hidden_act != "silu" && hidden_act != "swish" {
            return Err(cfg_err(file, format!("`hidden_act` = \"{hidden_act}\" is not supported (only \"silu\")")));
        }
        let rope = resolve_rope(file, raw.rope_theta, raw.rope_scaling.as_ref(), raw.rope_parameters.as_ref())?;

        let moe = match raw.num_experts {
            Some(n) if n > 0 => {
                let k = required(file, "num_experts_per_tok", raw.num_experts_per_tok)?;
                if k > n {
                    return Err(cfg_err(file, format!("`num_experts_per_tok` ({k}) exceeds `num_experts` ({n})")));
                }
                let moe_intermediate_size = required(file, "moe_intermediate_size", raw.moe_intermediate_size)?;
                let decoder_sparse_step = match raw.decoder_sparse_step {
                    None => 1,
                    Some(_) => required(file, "decoder_sparse_step", raw.decoder_sparse_step)?,
                };
                Some(MoeConfig {
                    num_experts: n,
                    num_experts_per_tok: k,
                    moe_intermediate_size,
                    norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
                    decoder_sparse_step,
                    mlp_only_layers: raw.mlp_only_layers.unwrap_or_default(),
                })
            }
            _ => None,
        };

        Ok(ModelConfig {
            architecture,
            model_type: raw.model_type,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            hidden_act,
            attention_bias: raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            rope,
            dtype: raw.dtype.or(raw.torch_dtype),
            moe,
            sliding_window: raw.sliding_window,
            use_sliding_window: raw.use_sliding_window.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
        })
    }

    /// The context length to serve: `requested` (`max_model_len`) capped at
    /// `max_position_embeddings`, or that limit when `requested` is None. An active sliding
    /// window caps the default too, and a `requested` length beyond it is refused: no backend
    /// applies the window, and full attention is the same math only while a sequence fits in it.
    pub fn context_limit(&self, requested: Option<usize>) -> Result<usize, ModelError> {
        let model_limit = self.max_context();
        match (self.sliding_window_active(), requested) {
            (Some(w), Some(m)) if m > w => Err(cfg_err(
                "load options",
                format!(
                    "`max_model_len` = {m} exceeds the model's `sliding_window` = {w}: llmd does not apply sliding-window attention, so contexts are limited to the window; set max_model_len <= {w}"
                ),
            )),
            (_, Some(m)) => Ok(m.min(model_limit)),
            (_, None) => Ok(model_limit),
        }
    }

    /// The longest context this model is served with: `max_position_embeddings`, capped at an
    /// active sliding window.
    pub fn max_context(&self) -> usize {
        self.sliding_window_active().map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    /// Query heads per KV head (1 for MHA, `num_attention_heads` for MQA).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The sliding window when the checkpoint enables one shorter than its context (see the
    /// module doc).
    pub fn sliding_window_active(&self) -> Option<usize> {
        let sw = self.sliding_window?;
        let active = match self.model_type.as_deref() {
            // Qwen2/Qwen3 only use the window when `use_sliding_window` is true.
            Some(t) if t.starts_with("qwen") => self.use_sliding_window,
            _ => true,
        };
        (active && sw < self.max_position_embeddings).then_some(sw)
    }
}

/// Reads RoPE settings from either dialect: v5 `rope_parameters` (theta inside) or hub
/// `rope_theta` + `rope_scaling` (null for plain RoPE; `type` is the pre-4.45 spelling).
fn resolve_rope(
    file: &str,
    rope_theta: Option<f64>,
    rope_scaling: Option<&serde_json::Map<String, serde_json::Value>>,
    rope_parameters: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<RopeConfig, ModelError> {
    let (table, params) = match (rope_parameters, rope_scaling) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v.as_f64().ok_or_else(|| cfg_err(file, format!("`{table}.rope_theta` must be a number")))?,
        None => rope_theta.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(cfg_err(file, format!("`rope_theta` = {theta} must be a finite number > 1")));
    }
    let Some(p) = params else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::Default });
    };
    let rope_type =
        p.get("rope_type").or_else(|| p.get("type")).and_then(|v| v.as_str()).unwrap_or("default").to_string();
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: get_f64(file, p, table, "factor")? },
        "llama3" => {
            let orig = p.get("original_max_position_embeddings").and_then(|v| v.as_u64()).ok_or_else(|| {
                cfg_err(file, format!("`{table}.original_max_position_embeddings` must be an integer"))
            })?;
            let s = RopeScaling::Llama3 {
                factor: get_f64(file, p, table, "factor")?,
                low_freq_factor: get_f64(file, p, table, "low_freq_factor")?,
                high_freq_factor: get_f64(file, p, table, "high_freq_factor")?,
                original_max_position_embeddings: orig as usize,
            };
            if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } = s
                && high_freq_factor <= low_freq_factor
            {
                return Err(cfg_err(file, format!("`{table}.high_freq_factor` must be > `low_freq_factor`")));
            }
            s
        }
        other => {
            return Err(cfg_err(
                file,
                format!("`{table}.rope_type` = \"{other}\" is not supported (supported: default, linear, llama3)"),
            ));
        }
    };
    if let RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } = scaling
        && !(factor.is_finite() && factor > 0.0)
    {
        return Err(cfg_err(file, format!("`{table}.factor` = {factor} must be > 0")));
    }
    Ok(RopeConfig { theta, scaling })
}

/// `generation_config.json`: special token ids and the model's default sampling settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, an int or a list in the file; empty when absent.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RawGeneration {
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    max_new_tokens: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a missing file gives the empty default (the
    /// file is optional in HF folders).
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::from_file(&path)
    }

    /// Reads one `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = read_json(path)?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses `generation_config.json` text; `file` names the source in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self, ModelError> {
        let raw: RawGeneration = serde_json::from_str(text).map_err(|e| cfg_err(file, e.to_string()))?;
        let check = |key: &str, v: Option<f32>, ok: fn(f32) -> bool, limit: &str| match v {
            Some(x) if !ok(x) => Err(cfg_err(file, format!("`{key}` = {x} must be {limit}"))),
            _ => Ok(v),
        };
        Ok(GenerationConfig {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            pad_token_id: raw.pad_token_id,
            do_sample: raw.do_sample,
            temperature: check("temperature", raw.temperature, |x| x >= 0.0 && x.is_finite(), ">= 0")?,
            top_p: check("top_p", raw.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?,
            top_k: raw.top_k,
            min_p: check("min_p", raw.min_p, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?,
            repetition_penalty: check(
                "repetition_penalty",
                raw.repetition_penalty,
                |x| x > 0.0 && x.is_finite(),
                "> 0",
            )?,
            max_new_tokens: raw.max_new_tokens,
        })
    }
}

/// Union of the end-of-sequence ids of the generation config (preferred, it is what
/// `generate` uses) and the model config, without duplicates.
pub fn eos_token_ids(model: &ModelConfig, generation: &GenerationConfig) -> Vec<u32> {
    let mut seen = HashSet::new();
    generation.eos_token_ids.iter().chain(model.eos_token_ids.iter()).copied().filter(|id| seen.insert(*id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_LLAMA: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "eos_token_id": [1, 2]
    }"#;

    const V5_QWEN3_MOE: &str = r#"{
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 512, "dtype": "float32",
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "norm_topk_prob": true, "mlp_only_layers": [2], "sliding_window": null, "eos_token_id": 7
    }"#;

    #[test]
    fn hub_dialect_llama3() {
        let c = ModelConfig::from_json_str(HUB_LLAMA, "config.json").unwrap();
        assert_eq!(c.architecture, "LlamaForCausalLM");
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.gqa_group(), 2);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.rope.theta, 500000.0);
        assert_eq!(
            c.rope.scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(c.moe.is_none());
    }

    #[test]
    fn v5_dialect_moe() {
        let c = ModelConfig::from_json_str(V5_QWEN3_MOE, "config.json").unwrap();
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.rope, RopeConfig { theta: 1e6, scaling: RopeScaling::Default });
        assert_eq!(c.dtype.as_deref(), Some("float32"));
        let moe = c.moe.as_ref().unwrap();
        assert_eq!((moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size), (4, 2, 32));
        assert!(moe.norm_topk_prob);
        assert!(moe.is_sparse_layer(0) && moe.is_sparse_layer(1) && !moe.is_sparse_layer(2));
        assert_eq!(c.eos_token_ids, vec![7]);
        assert_eq!(c.sliding_window_active(), None);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = ModelConfig::from_json_str(r#"{"architectures": ["X"], "hidden_size": 64}"#, "a/config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a/config.json") && e.contains("vocab_size"), "{e}");

        let bad_heads = HUB_LLAMA.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        let e = ModelConfig::from_json_str(&bad_heads, "config.json").unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");

        let yarn = HUB_LLAMA.replace("\"llama3\"", "\"yarn\"");
        let e = ModelConfig::from_json_str(&yarn, "config.json").unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");

        let huge = HUB_LLAMA.replace("\"vocab_size\": 512", "\"vocab_size\": 999999999");
        let e = ModelConfig::from_json_str(&huge, "config.json").unwrap_err().to_string();
        assert!(e.contains("vocab_size") && e.contains("limit"), "{e}");

        let e = ModelConfig::from_json_str("{not json", "config.json").unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn old_type_key_and_null_scaling() {
        let j = HUB_LLAMA.replace(
            r#"{"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
            r#"{"type": "linear", "factor": 2.0}"#,
        );
        let c = ModelConfig::from_json_str(&j, "config.json").unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let j = HUB_LLAMA.replace("\"rope_scaling\"", "\"unused\"");
        let c = ModelConfig::from_json_str(&j, "config.json").unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::Default);
    }

    #[test]
    fn sliding_window_caps_the_context() {
        let mistral = HUB_LLAMA.replace("\"LlamaForCausalLM\"", "\"MistralForCausalLM\"").replace(
            "\"torch_dtype\"",
            "\"max_position_embeddings\": 32768, \"sliding_window\": 4096, \"torch_dtype\"",
        );
        let c = ModelConfig::from_json_str(&mistral, "config.json").unwrap();
        assert_eq!(c.sliding_window_active(), Some(4096));
        assert_eq!(c.context_limit(None).unwrap(), 4096);
        assert_eq!(c.context_limit(Some(2048)).unwrap(), 2048);
        let e = c.context_limit(Some(8192)).unwrap_err().to_string();
        assert!(
            e.contains("max_model_len") && e.contains("8192") && e.contains("sliding_window") && e.contains("4096"),
            "{e}"
        );
        // Qwen's window applies only with use_sliding_window.
        let qwen = mistral
            .replace("\"MistralForCausalLM\"", "\"Qwen2ForCausalLM\"")
            .replace("{", "{\"model_type\": \"qwen2\",");
        let c = ModelConfig::from_json_str(&qwen, "config.json").unwrap();
        assert_eq!(c.sliding_window_active(), None);
        assert_eq!(c.context_limit(Some(100_000)).unwrap(), 32768);
    }

    #[test]
    fn generation_config_int_or_list() {
        let g = GenerationConfig::from_json_str(r#"{"eos_token_id": [5, 6], "top_k": 20, "temperature": 0.6}"#, "g")
            .unwrap();
        assert_eq!(g.eos_token_ids, vec![5, 6]);
        assert_eq!(g.top_k, Some(20));
        let g = GenerationConfig::from_json_str(r#"{"eos_token_id": 5, "bos_token_id": 1}"#, "g").unwrap();
        assert_eq!((g.eos_token_ids.clone(), g.bos_token_id), (vec![5], Some(1)));
        let e = GenerationConfig::from_json_str(r#"{"top_p": 1.5}"#, "gen.json").unwrap_err().to_string();
        assert!(e.contains("gen.json") && e.contains("top_p"), "{e}");
        let c = ModelConfig::from_json_str(HUB_LLAMA, "c").unwrap();
        assert_eq!(eos_token_ids(&c, &g), vec![5, 1, 2]);
    }
}

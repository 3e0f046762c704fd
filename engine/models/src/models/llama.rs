//! `LlamaForCausalLM` and `MistralForCausalLM`: pre-norm decoder, SwiGLU MLP, RoPE (incl.
//! llama3 scaling), GQA. Mistral's checkpoints use the same tensor names and, for the
//! released v0.2+ models, full attention (`sliding_window: null`).
//!
//! Tensors: `model.embed_tokens.weight`, `model.layers.{i}.{input_layernorm,
//! post_attention_layernorm}.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`
//! (+ `.bias` with `attention_bias`), `model.layers.{i}.mlp.{gate,up,down}_proj.weight`
//! (+ `.bias` with `mlp_bias`), `model.norm.weight`, `lm_head.weight` unless tied.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::loader::Weights;
use crate::models::layers::{AttentionOptions, CausalLm, FeedForward, Mlp};

/// Builds a Llama or Mistral model from its checkpoint.
pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<CausalLm, ModelError> {
    let attn = AttentionOptions { qkv_bias: cfg.attention_bias, o_bias: cfg.attention_bias, qk_norm: false };
    CausalLm::build(cfg, w, attn, |_, mw| {
        Ok(FeedForward::Dense(Mlp::new(mw, cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)?))
    })
}

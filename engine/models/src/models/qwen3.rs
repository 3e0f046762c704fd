//! `Qwen3ForCausalLM`: per-head RMSNorm on q and k (`self_attn.q_norm.weight`,
//! `self_attn.k_norm.weight`, each `[head_dim]`) before RoPE, an explicit `head_dim` that
//! may differ from `hidden_size / num_attention_heads`, and no q/k/v bias unless
//! `attention_bias` is set.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::loader::Weights;
use crate::models::layers::{AttentionOptions, CausalLm, FeedForward, Mlp};

/// Builds a Qwen3 model from its checkpoint.
pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<CausalLm, ModelError> {
    let attn = AttentionOptions { qkv_bias: cfg.attention_bias, o_bias: cfg.attention_bias, qk_norm: true };
    CausalLm::build(cfg, w, attn, |_, mw| {
        Ok(FeedForward::Dense(Mlp::new(mw, cfg.hidden_size, cfg.intermediate_size, false)?))
    })
}

//! `Qwen2ForCausalLM` (Qwen2/2.5, DeepSeek-R1-Distill-Qwen): Llama layout with a bias on the
//! q/k/v projections (always present, no config key) and none on `o_proj`. Small models tie
//! the LM head to the embeddings.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::loader::Weights;
use crate::models::layers::{AttentionOptions, CausalLm, FeedForward, Mlp};

/// Builds a Qwen2 model from its checkpoint.
pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<CausalLm, ModelError> {
    let attn = AttentionOptions { qkv_bias: true, o_bias: false, qk_norm: false };
    CausalLm::build(cfg, w, attn, |_, mw| {
        Ok(FeedForward::Dense(Mlp::new(mw, cfg.hidden_size, cfg.intermediate_size, false)?))
    })
}

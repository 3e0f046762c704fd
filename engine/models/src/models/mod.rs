//! Architectures, one file per family, and the registry that maps a config's
//! `architectures[0]` to its constructor.

pub mod layers;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;

use crate::ModelError;
use crate::config::ModelConfig;
use crate::loader::Weights;
pub use layers::CausalLm;

/// Builds a model from its config and checkpoint view.
pub type Constructor = fn(&ModelConfig, &Weights) -> Result<CausalLm, ModelError>;

/// The `architectures` strings this crate serves, with their constructors.
pub const REGISTRY: &[(&str, Constructor)] = &[
    ("LlamaForCausalLM", llama::load),
    ("MistralForCausalLM", llama::load),
    ("Qwen2ForCausalLM", qwen2::load),
    ("Qwen3ForCausalLM", qwen3::load),
    ("Qwen3MoeForCausalLM", qwen3_moe::load),
];

/// The constructor for `architecture`, or [`ModelError::UnknownArchitecture`].
pub fn constructor(architecture: &str) -> Result<Constructor, ModelError> {
    REGISTRY
        .iter()
        .find(|(name, _)| *name == architecture)
        .map(|(_, c)| *c)
        .ok_or_else(|| ModelError::UnknownArchitecture(architecture.to_string()))
}

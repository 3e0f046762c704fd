//! The CPU model: the building blocks of the decoder ([`layers`]) and the routed-expert block
//! ([`qwen3_moe`]), assembled from a [`crate::spec::DecoderSpec`]. Which tensors, biases and
//! norms an architecture has is stated once, in the spec; nothing here names an architecture.

pub mod layers;
pub mod qwen3_moe;
pub mod routing;

pub use layers::CausalLm;

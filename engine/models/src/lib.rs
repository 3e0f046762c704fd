//! The model side of the llmd engine: HF `config.json` in both dialects, memory-mapped
//! safetensors loading, one file per architecture, the [`runner::ModelRunner`] seam the
//! serving core drives, and the CPU backend that implements it with paged attention.
//! Models hold no KV state; everything about sequences arrives in a [`runner::ForwardBatch`].

pub mod error;
pub mod runner;

pub use error::ModelError;

//! The llmd inference engine: loads HF-format checkpoints (safetensors, config.json,
//! tokenizer.json, chat templates), runs them with a paged KV cache under a continuous-batching
//! scheduler, and streams sampled tokens back as [`GenerationEvent`]s.
//!
//! Layering: [`EngineHandle`] is the only door (a cloneable handle; one engine thread per
//! model owns the scheduler, the block manager and a [`runner::ModelRunner`]). The engine never
//! sees HTTP; callers hand it a validated [`GenerateRequest`]. Backends plug in behind
//! [`runner::ModelRunner`]: the CPU backend lives in [`cpu`], the CUDA one behind the `cuda`
//! feature.

pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod kv;
pub mod loader;
pub mod models;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod template;
pub mod tokenizer;

pub use engine::{EngineHandle, EngineStats, GenerationStream, LoadOptions, ModelInfo};
pub use error::EngineError;
pub use request::*;

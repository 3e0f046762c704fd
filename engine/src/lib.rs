//! The llmd serving core: takes [`ValidGenerateRequest`]s (made only by
//! [`GenerateRequest::validate`]), schedules them with continuous
//! batching over a paged KV cache (block allocator with reference counts and prefix caching),
//! drives a [`llmd_models::runner::ModelRunner`] step by step, samples, detokenizes, and
//! streams [`GenerationEvent`]s back.
//!
//! Layering: [`EngineHandle`] is the only door (a cloneable handle; one engine thread per
//! model owns the scheduler, the block manager and the runner). The engine never sees HTTP.
//! Models and backends live in `llmd-models`; tokenizers and chat templates in `llmd-tokenizer`.

pub mod engine;
pub mod error;
pub mod kv;
pub mod request;
pub mod sampler;
pub mod scheduler;

pub use engine::{EngineHandle, GenerationStream, LoadProgress, ModelFacts};
pub use engine::{EngineStats, LoadOptions, ModelInfo, backend_dtype, serving_dtype};
pub use error::EngineError;
pub use request::*;

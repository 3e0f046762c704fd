//! The model side of the llmd engine: HF `config.json` in both dialects, memory-mapped
//! safetensors loading, one file per architecture, the [`runner::ModelRunner`] seam the
//! serving core drives, and the CPU backend that implements it with paged attention.
//! Models hold no KV state; everything about sequences arrives in a [`runner::ForwardBatch`].
//!
//! Entry point: [`load_cpu`] turns a model folder into a [`LoadedModel`] whose `runner` the
//! serving core drives step by step.

pub mod config;
pub mod cpu;
pub mod error;
pub mod loader;
pub mod models;
pub mod pick;
pub mod runner;
pub mod spec;

pub use config::{GenerationConfig, ModelConfig};
pub use cpu::{CPU_DTYPE, CpuRunner, LoadConfig, LoadedModel, load_cpu};
pub use error::ModelError;
pub use llmd_options::Dtype;
pub use pick::{LogitAdjust, TokenPick};
pub use runner::{ForwardBatch, KvCacheLayout, ModelRunner, RowOutput, RowRequest, SeqSlice, StepLogits};
pub use spec::{Architecture, DecoderSpec, WeightStorage};

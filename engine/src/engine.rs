//! The engine thread and its handle. (Public types are the contract used by the daemon and
//! the HTTP layer; the implementation is filled in by the serving-core work.)

use std::path::PathBuf;

/// How to load a model. Built by the daemon from config / `llmctl load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// HF-format folder (config.json, safetensors, tokenizer.json, ...).
    pub path: PathBuf,
    /// Name clients use in the `model` field.
    pub served_name: String,
    /// Where it came from, for `llmctl ps` (`hf:org/name`, a path...).
    pub source: String,
    /// Caps the model's `max_position_embeddings`; None keeps it.
    pub max_model_len: Option<u32>,
    /// "auto", "bfloat16", "float16" or "float32". The CPU backend computes in f32 whatever this says,
    /// but keeps the checkpoint's dtype in memory where it can.
    pub dtype: String,
    /// "auto", "cpu" or "cuda".
    pub device: String,
    /// KV cache budget in bytes on the CPU.
    pub cpu_kv_cache_bytes: u64,
    /// Fraction of free GPU memory to use (GPU backends only).
    pub gpu_memory_utilization: f32,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block (16 by default).
    pub block_size: usize,
    /// Waiting requests beyond this are refused with `EngineError::QueueFull`.
    pub max_queue: usize,
    pub enable_prefix_caching: bool,
}

impl LoadOptions {
    /// Defaults suited to a CPU run of a small model.
    pub fn new(path: impl Into<PathBuf>, served_name: impl Into<String>) -> Self {
        let path = path.into();
        LoadOptions {
            source: path.display().to_string(),
            path,
            served_name: served_name.into(),
            max_model_len: None,
            dtype: "auto".into(),
            device: "auto".into(),
            cpu_kv_cache_bytes: 512 << 20,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            max_queue: 1024,
            enable_prefix_caching: true,
        }
    }
}

/// Static facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub served_name: String,
    pub source: String,
    /// HF `architectures[0]`, e.g. "Qwen2ForCausalLM".
    pub architecture: String,
    pub num_params: u64,
    pub dtype: String,
    pub device: String,
    pub max_model_len: u32,
    pub vocab_size: usize,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub kv_block_size: u32,
    pub kv_blocks_total: u32,
    /// Unix seconds when loading finished.
    pub loaded_at: u64,
}

/// Live counters and gauges, cheap to read (atomics), for `llmctl ps` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

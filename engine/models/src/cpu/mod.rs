//! The CPU backend: f32 weights as candle tensors, paged KV cache in host memory, attention
//! over block tables in Rust (rayon over token×head), matrix products through candle's gemm.

pub mod attention;
pub mod kv;

use std::cell::RefCell;
use std::path::Path;

use crate::ModelError;
use crate::config::{GenerationConfig, ModelConfig, eos_token_ids};
use crate::loader::{Checkpoint, Progress, Weights};
use crate::models::CausalLm;
use crate::runner::{ForwardBatch, KvCacheLayout, ModelRunner, StepLogits};
use crate::spec::{Architecture, DecoderSpec};
use kv::{BatchPlan, PagedKvCache};
use llmd_options::Dtype;

/// How to load a model on the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    /// Bytes of host memory for the KV cache; the number of blocks is derived from it.
    pub kv_cache_bytes: u64,
    /// Token slots per KV block.
    pub block_size: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig { kv_cache_bytes: 256 * 1024 * 1024, block_size: 16 }
    }
}

/// The dtype the CPU backend computes and keeps its KV cache in, whatever the checkpoint
/// stores (16-bit weights are widened when loaded).
pub const CPU_DTYPE: Dtype = Dtype::Float32;

/// A model loaded on the CPU together with the facts the serving core and `llmctl ps` need.
pub struct LoadedModel {
    /// The runner that owns the weights and the KV cache.
    pub runner: Box<dyn ModelRunner>,
    /// The resolved `config.json`.
    pub config: ModelConfig,
    /// The resolved `generation_config.json` (default when absent).
    pub generation: GenerationConfig,
    /// Parameters in the checkpoint.
    pub num_params: u64,
    /// Bytes the weights take in memory (f32 on the CPU).
    pub weight_bytes: u64,
    /// The dtype the backend computes and keeps its KV cache in: float32 on the CPU (whatever
    /// the checkpoint stores), bfloat16 on CUDA.
    pub dtype: Dtype,
    /// The longest context served: `max_position_embeddings`, capped at an active sliding
    /// window ([`ModelConfig::max_context`]).
    pub max_position_embeddings: usize,
    /// Logits width (`config.vocab_size`, which may exceed the tokenizer's size).
    pub vocab_size: usize,
    /// End-of-sequence ids: generation config first, then config.json, deduplicated.
    pub eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("architecture", &self.config.architecture)
            .field("num_params", &self.num_params)
            .field("dtype", &self.dtype)
            .field("kv_layout", &self.runner.kv_layout())
            .finish()
    }
}

/// [`ModelRunner`] on the CPU.
#[derive(Debug)]
pub struct CpuRunner {
    model: CausalLm,
    kv: PagedKvCache,
}

impl CpuRunner {
    /// Wraps a built model and allocates its KV cache with `layout`.
    pub fn new(model: CausalLm, layout: KvCacheLayout) -> Result<Self, ModelError> {
        Ok(CpuRunner { model, kv: PagedKvCache::new(layout)? })
    }
}

impl ModelRunner for CpuRunner {
    fn kv_layout(&self) -> KvCacheLayout {
        self.kv.layout()
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<StepLogits, ModelError> {
        let vocab_size = self.model.vocab_size();
        if batch.tokens.is_empty() && batch.seqs.is_empty() {
            return Ok(StepLogits { vocab_size, rows: Vec::new() });
        }
        let plan = BatchPlan::new(batch, &self.kv.layout(), vocab_size)?;
        let rows = self.model.forward(&batch.tokens, &batch.positions, &plan, &mut self.kv)?;
        Ok(StepLogits { vocab_size, rows })
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), ModelError> {
        self.kv.copy_block(src, dst)
    }

    fn device_name(&self) -> String {
        "cpu".to_string()
    }
}

/// Loads the HF model folder `dir` on the CPU: config, generation config, memory-mapped
/// weights (converted to f32), the architecture from the registry and a KV cache sized from
/// `opts.kv_cache_bytes`. `progress(done, total)` is called per tensor loaded.
pub fn load_cpu(
    dir: &Path,
    opts: &LoadConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel, ModelError> {
    if opts.block_size == 0 || opts.block_size > 4096 {
        return Err(ModelError::Config {
            file: "load options".into(),
            message: format!("`block_size` = {} must be in 1..=4096", opts.block_size),
        });
    }
    let config = ModelConfig::from_dir(dir)?;
    let generation = GenerationConfig::from_dir(dir)?;
    // Fail on the architecture before touching gigabytes of weights.
    Architecture::from_hf_name(&config.architecture)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let spec = DecoderSpec::new(&config, &ckpt)?;
    // The CPU path serves every feature the spec can state: nothing to refuse.
    let counter = RefCell::new(Progress::new(ckpt.len(), progress));
    let model = {
        let weights = Weights::new(&ckpt, &counter);
        CausalLm::from_spec(&spec, &weights)?
    };
    counter.borrow_mut().finish();

    let per_block = KvCacheLayout {
        num_layers: config.num_hidden_layers,
        num_kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        block_size: opts.block_size,
        num_blocks: 1,
        dtype_bytes: CPU_DTYPE.size_bytes(),
    }
    .bytes_per_block();
    let num_blocks = KvCacheLayout::blocks_for_budget(
        config.num_hidden_layers,
        config.num_key_value_heads,
        config.head_dim,
        opts.block_size,
        CPU_DTYPE.size_bytes(),
        opts.kv_cache_bytes,
    );
    if num_blocks == 0 {
        return Err(ModelError::InsufficientMemory(format!(
            "KV cache budget of {} bytes is smaller than one block ({per_block} bytes for {} tokens)",
            opts.kv_cache_bytes, opts.block_size
        )));
    }
    let layout = KvCacheLayout {
        num_layers: config.num_hidden_layers,
        num_kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        block_size: opts.block_size,
        num_blocks,
        dtype_bytes: CPU_DTYPE.size_bytes(),
    };
    let runner = CpuRunner::new(model, layout)?;
    let eos = eos_token_ids(&config, &generation);
    Ok(LoadedModel {
        runner: Box::new(runner),
        num_params: ckpt.num_elements(),
        weight_bytes: ckpt.num_elements() * 4,
        dtype: CPU_DTYPE,
        max_position_embeddings: config.max_context(),
        vocab_size: config.vocab_size,
        eos_token_ids: eos,
        generation,
        config,
    })
}

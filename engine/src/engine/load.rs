//! Loading a model: the options, the choice of backend (CPU or CUDA) and the build of its
//! runner, then [`EngineHandle::start`] over it.

use std::path::PathBuf;
use std::sync::Arc;

use llmd_models::ModelError;
use llmd_options::{Backend, Device, Dtype, DtypeChoice};
use llmd_tokenizer::Tokenizer;

use super::EngineHandle;
use crate::error::EngineError;

/// How to load a model. Built by the daemon from config / `llmctl load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// HF-format folder (config.json, safetensors, tokenizer.json, ...).
    pub path: PathBuf,
    /// Name clients use in the `model` field.
    pub served_name: String,
    /// Where it came from, for `llmctl ps` (`hf:org/name`, a path...).
    pub source: String,
    /// Caps the model's `max_position_embeddings`; None keeps it. The engine lowers it further
    /// (with a warning) when the KV cache cannot hold that many tokens.
    pub max_model_len: Option<u32>,
    /// The dtype to compute in. Each backend serves one ([`serving_dtype`]): float32 on the
    /// CPU, bfloat16 on CUDA; `auto` picks it, any other value is refused at load.
    pub dtype: DtypeChoice,
    /// Where to run; `auto` is CUDA when built with it and it serves the model, else the CPU.
    pub device: Device,
    /// KV cache budget in bytes on the CPU.
    pub cpu_kv_cache_bytes: u64,
    /// Fraction of free GPU memory to use (GPU backends only).
    pub gpu_memory_utilization: f32,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens per forward step (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block (16 by default).
    pub block_size: usize,
    /// Waiting requests beyond this are refused with `EngineError::QueueFull`.
    pub max_queue: usize,
    /// Reuse KV blocks of identical prompt prefixes across requests.
    pub enable_prefix_caching: bool,
    /// GPU indices chosen by placement (CUDA device numbers, PCI bus order); empty means GPU 0.
    /// Several GPUs serve the model tensor-parallel, one rank per GPU.
    pub gpus: Vec<u32>,
    /// Tensor parallel: sum decode-sized steps through GPU peer memory where every pair of GPUs
    /// has peer access (false: NCCL for every all-reduce).
    pub peer_all_reduce: bool,
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
            dtype: DtypeChoice::Auto,
            device: Device::Auto,
            cpu_kv_cache_bytes: 512 << 20,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            max_queue: 1024,
            enable_prefix_caching: true,
            gpus: Vec::new(),
            peer_all_reduce: true,
        }
    }

    /// Range checks; the error names the option and the limit.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad =
            |message: String| Err(EngineError::Model(ModelError::Config { file: "load options".into(), message }));
        if self.max_num_seqs == 0 {
            return bad("`max_num_seqs` must be >= 1".into());
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(format!(
                "`max_num_batched_tokens` ({}) must be >= `max_num_seqs` ({}) so that every running sequence can decode each step",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        if self.block_size == 0 || self.block_size > 4096 {
            return bad(format!("`block_size` must be in 1..=4096, got {}", self.block_size));
        }
        if self.max_queue == 0 {
            return bad("`max_queue` must be >= 1".into());
        }
        if self.max_model_len == Some(0) {
            return bad("`max_model_len` must be >= 1".into());
        }
        Ok(())
    }
}

/// Loading progress: `phase` is "tokenizer", "weights" or "kv_cache"; `done` of `total` units
/// (tensors for "weights").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

/// What a backend loader reports about the model it built, for [`EngineHandle::start`].
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub architecture: String,
    pub num_params: u64,
    /// The dtype the backend computes and keeps its KV cache in.
    pub dtype: Dtype,
    /// The backend the model was built for.
    pub backend: Backend,
    pub weight_bytes: u64,
    pub max_position_embeddings: usize,
    /// Logits width.
    pub vocab_size: usize,
    /// End-of-sequence ids from the model's configs (the tokenizer's are added).
    pub eos_token_ids: Vec<u32>,
}

impl ModelFacts {
    /// The facts of a model `backend` loaded (its runner goes to [`EngineHandle::start`]).
    pub fn of(loaded: &llmd_models::LoadedModel, backend: Backend) -> ModelFacts {
        ModelFacts {
            architecture: loaded.config.architecture.clone(),
            num_params: loaded.num_params,
            dtype: loaded.dtype,
            backend,
            weight_bytes: loaded.weight_bytes,
            max_position_embeddings: loaded.max_position_embeddings,
            vocab_size: loaded.vocab_size,
            eos_token_ids: loaded.eos_token_ids.clone(),
        }
    }
}

impl EngineHandle {
    /// Loads the model folder of `opts` and starts its engine thread. Blocking (seconds to
    /// minutes): call it from `spawn_blocking`. Device `cpu` uses the llmd-models CPU backend;
    /// `cuda` the llmd-cuda backend, which needs a build with the `cuda` feature; `auto` picks
    /// CUDA when built with it and a GPU is usable, else the CPU. Then `opts.dtype` must be one
    /// the chosen backend serves ([`serving_dtype`]), or the load is refused before any weight
    /// is read.
    pub fn load(opts: LoadOptions, progress: &mut dyn FnMut(LoadProgress)) -> Result<EngineHandle, EngineError> {
        opts.validate()?;
        let backend = match opts.device {
            Device::Cpu => Backend::Cpu,
            Device::Auto if cuda_usable(&opts.path) => Backend::Cuda,
            Device::Auto => Backend::Cpu,
            Device::Cuda => {
                if !cfg!(feature = "cuda") {
                    return Err(EngineError::Model(ModelError::Backend(
                        "device \"cuda\" needs an llmd built with the `cuda` feature; use device \"cpu\"".into(),
                    )));
                }
                Backend::Cuda
            }
        };
        let dtype = serving_dtype(backend, opts.dtype)?;
        // A context the model cannot be served with (beyond an active sliding window) is refused
        // before any weight is read.
        llmd_models::ModelConfig::from_dir(&opts.path)?.context_limit(opts.max_model_len.map(|m| m as usize))?;
        progress(LoadProgress { phase: "tokenizer", done: 0, total: 1 });
        let tokenizer = Tokenizer::from_dir(&opts.path).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        progress(LoadProgress { phase: "tokenizer", done: 1, total: 1 });
        let mut weights = |done: usize, total: usize| {
            progress(LoadProgress { phase: "weights", done: done as u64, total: total as u64 })
        };
        let loaded = match backend {
            Backend::Cuda => load_cuda(&opts, &mut weights)?,
            Backend::Cpu => {
                let cfg =
                    llmd_models::LoadConfig { kv_cache_bytes: opts.cpu_kv_cache_bytes, block_size: opts.block_size };
                llmd_models::load_cpu(&opts.path, &cfg, &mut weights)?
            }
        };
        debug_assert_eq!(
            loaded.dtype, dtype,
            "the {backend} backend computes in another dtype than `serving_dtype` says"
        );
        let facts = ModelFacts::of(&loaded, backend);
        let layout = loaded.runner.kv_layout();
        progress(LoadProgress { phase: "kv_cache", done: layout.num_blocks as u64, total: layout.num_blocks as u64 });
        Self::start(loaded.runner, Arc::new(tokenizer), facts, &opts)
    }
}

/// The dtype `backend` computes and keeps its KV cache in: float32 on the CPU
/// ([`llmd_models::CPU_DTYPE`]), bfloat16 on CUDA (llmd-cuda's kernels are bf16).
pub fn backend_dtype(backend: Backend) -> Dtype {
    match backend {
        Backend::Cpu => llmd_models::CPU_DTYPE,
        Backend::Cuda => Dtype::BFloat16,
    }
}

/// The dtype a load asking for `requested` computes in on `backend`: `auto` is the backend's
/// own ([`backend_dtype`]); a fixed dtype is served only when it is that one, and otherwise
/// refused with [`ModelError::UnservedDtype`] (never accepted and ignored). Placement sizes
/// the KV cache with the same answer.
pub fn serving_dtype(backend: Backend, requested: DtypeChoice) -> Result<Dtype, EngineError> {
    let serves = backend_dtype(backend);
    match requested {
        DtypeChoice::Auto => Ok(serves),
        DtypeChoice::Fixed(d) if d == serves => Ok(d),
        DtypeChoice::Fixed(requested) => {
            Err(EngineError::Model(ModelError::UnservedDtype { requested, backend, serves }))
        }
    }
}

/// Whether "auto" should pick the GPU: built with CUDA and at least one device usable.
/// "auto" uses the GPU when one is there and the CUDA backend serves this architecture;
/// otherwise the model runs on the CPU (with a log line saying why).
#[cfg(feature = "cuda")]
fn cuda_usable(dir: &std::path::Path) -> bool {
    if !llmd_cuda::device_count().is_ok_and(|n| n > 0) {
        return false;
    }
    match llmd_cuda::check_model(dir) {
        Ok(()) => true,
        Err(e) => {
            // A broken config or checkpoint fails the CPU load too, with the same details.
            tracing::warn!(reason = %e, "the CUDA backend does not serve this model; loading on the CPU");
            false
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable(_dir: &std::path::Path) -> bool {
    false
}

#[cfg(feature = "cuda")]
fn load_cuda(
    opts: &LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<llmd_models::LoadedModel, EngineError> {
    let config = llmd_models::ModelConfig::from_dir(&opts.path)?;
    let max_model_len = config.context_limit(opts.max_model_len.map(|m| m as usize))?;
    let cfg = llmd_cuda::CudaLoadConfig {
        gpus: opts.gpus.iter().map(|&g| g as usize).collect(),
        gpu_memory_utilization: opts.gpu_memory_utilization,
        block_size: opts.block_size,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        max_model_len,
        peer_all_reduce: opts.peer_all_reduce,
    };
    Ok(llmd_cuda::load_cuda(&opts.path, &cfg, progress)?)
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(
    _opts: &LoadOptions,
    _progress: &mut dyn FnMut(usize, usize),
) -> Result<llmd_models::LoadedModel, EngineError> {
    Err(EngineError::Model(ModelError::Backend("this llmd was built without the `cuda` feature".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_serves_its_compute_dtype_and_refuses_the_others() {
        assert_eq!(serving_dtype(Backend::Cpu, DtypeChoice::Auto).unwrap(), Dtype::Float32);
        assert_eq!(serving_dtype(Backend::Cuda, DtypeChoice::Auto).unwrap(), Dtype::BFloat16);
        assert_eq!(serving_dtype(Backend::Cuda, DtypeChoice::Fixed(Dtype::BFloat16)).unwrap(), Dtype::BFloat16);
        let e = serving_dtype(Backend::Cuda, DtypeChoice::Fixed(Dtype::Float16)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`dtype` = float16 is not served by the CUDA backend (it computes in bfloat16); use dtype = \"auto\" or \"bfloat16\""
        );
        assert!(serving_dtype(Backend::Cuda, DtypeChoice::Fixed(Dtype::Float32)).is_err());
        for backend in Backend::ALL {
            assert_eq!(
                serving_dtype(*backend, DtypeChoice::Fixed(backend_dtype(*backend))).unwrap(),
                backend_dtype(*backend)
            );
        }
    }
}

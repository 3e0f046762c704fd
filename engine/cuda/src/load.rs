//! [`load_cuda`]: the backend's entry point, which serves a checkpoint on one GPU
//! ([`CudaRunner`](crate::runner::CudaRunner)) or, with several, tensor parallel
//! ([`TpRunner`]). It stands above both so that neither imports the other's loader.

use std::path::Path;

use llmd_models::ModelError;
use llmd_models::config::{GenerationConfig, ModelConfig};
use llmd_models::cpu::LoadedModel;
use llmd_models::runner::ModelRunner;

use crate::runner::{CudaLoadConfig, check_model, load_single};
use crate::tp::TpRunner;

/// Loads an HF dense decoder onto the GPUs in `opts.gpus` (one: plain; several: tensor
/// parallel over NCCL) and sizes its KV cache.
pub fn load_cuda(
    dir: &Path,
    opts: &CudaLoadConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel, ModelError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let generation = GenerationConfig::from_dir(dir)?;
    // Refuse before any GPU work; every rank builds the same spec again from its own mapping.
    check_model(dir)?;
    let gpus = if opts.gpus.is_empty() { vec![0] } else { opts.gpus.clone() };
    let (runner, weight_bytes, num_params): (Box<dyn ModelRunner>, u64, u64) = if gpus.len() == 1 {
        let r = load_single(dir, &cfg, opts, gpus[0], progress)?;
        let (w, n) = (r.weight_bytes(), r.num_params());
        (Box::new(r), w, n)
    } else {
        let tp = TpRunner::load(dir, &cfg, opts, &gpus, progress)?;
        let (w, n) = (tp.weight_bytes(), tp.num_params());
        (Box::new(tp), w, n)
    };
    let eos_token_ids = llmd_models::config::eos_token_ids(&cfg, &generation);
    Ok(LoadedModel {
        runner,
        num_params,
        weight_bytes,
        dtype: llmd_models::Dtype::BFloat16,
        max_position_embeddings: cfg.max_context(),
        vocab_size: cfg.vocab_size,
        eos_token_ids,
        config: cfg,
        generation,
    })
}

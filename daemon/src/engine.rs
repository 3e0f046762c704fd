//! The inference engine behind the model manager: [`EngineLoader`] loads models with
//! `llmd_engine::EngineHandle::load` and keeps a registry of the served handles, which the
//! HTTP API reads to route requests by model name.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use llmd_engine::{EngineError, EngineHandle, LoadOptions, LoadProgress};
use llmd_proto::{ControlError, ErrorCode, Progress, ProgressUnit, RunningModel};

use crate::models::{LoadRequest, LoadedModel, ModelLoader};

/// Served models by name, shared with the HTTP API.
pub type EngineRegistry = Arc<RwLock<HashMap<String, EngineHandle>>>;

/// Loads models into `llmd_engine` engines.
#[derive(Debug, Clone, Default)]
pub struct EngineLoader {
    registry: EngineRegistry,
}

impl EngineLoader {
    pub fn new() -> EngineLoader {
        EngineLoader::default()
    }

    /// The handles of every loaded model (for the HTTP API).
    pub fn registry(&self) -> EngineRegistry {
        self.registry.clone()
    }
}

fn engine_error(name: &str, e: EngineError) -> ControlError {
    let code = match &e {
        EngineError::Model(_) | EngineError::Tokenizer(_) => ErrorCode::Failed,
        EngineError::InvalidParam(_) => ErrorCode::InvalidArgument,
        _ => ErrorCode::Failed,
    };
    ControlError::new(code, format!("cannot load `{name}`: {e}"))
}

fn options(req: &LoadRequest) -> LoadOptions {
    let e = &req.engine;
    let mut o = LoadOptions::new(req.path.clone(), req.served_name.clone());
    o.source = req.params.source.clone();
    o.max_model_len = req.params.max_model_len;
    o.dtype = req.params.dtype.clone().unwrap_or_else(|| "auto".into());
    o.device = e.device.as_str().to_string();
    o.cpu_kv_cache_bytes = e.cpu_kv_cache_bytes;
    o.gpu_memory_utilization = e.gpu_memory_utilization as f32;
    o.max_num_seqs = e.max_num_seqs as usize;
    o.max_num_batched_tokens = e.max_num_batched_tokens as usize;
    o.block_size = e.block_size as usize;
    o.max_queue = e.max_queue as usize;
    o
}

impl ModelLoader for EngineLoader {
    fn load(
        &self,
        request: &LoadRequest,
        progress: &mut dyn FnMut(Progress),
        cancelled: &AtomicBool,
    ) -> Result<Arc<dyn LoadedModel>, ControlError> {
        if request.params.tp.is_some_and(|tp| tp > 1) {
            return Err(ControlError::new(
                ErrorCode::InsufficientResources,
                format!("cannot load `{}` with tp > 1: tensor parallelism needs the CUDA backend", request.served_name),
            ));
        }
        let name = request.served_name.clone();
        let started = Instant::now();
        let mut on_progress = |p: LoadProgress| {
            let elapsed = started.elapsed().as_secs_f64();
            let rate = if elapsed > 0.0 { p.done as f64 / elapsed } else { 0.0 };
            let eta = (rate > 0.0 && p.total >= p.done).then(|| (p.total - p.done) as f64 / rate);
            progress(Progress {
                operation: String::new(),
                model: name.clone(),
                phase: p.phase.to_string(),
                done: p.done,
                total: Some(p.total),
                unit: if p.phase == "weights" { ProgressUnit::Tensors } else { ProgressUnit::Steps },
                rate,
                eta_secs: eta,
                files: Vec::new(),
            });
        };
        let handle = EngineHandle::load(options(request), &mut on_progress).map_err(|e| engine_error(&name, e))?;
        // A cancelled load is stopped by the manager; do not publish it meanwhile.
        if !cancelled.load(std::sync::atomic::Ordering::SeqCst) {
            self.registry.write().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), handle.clone());
        }
        Ok(Arc::new(EngineModel {
            handle,
            registry: self.registry.clone(),
            tp: request.params.tp.unwrap_or(1),
            gpus: request.params.gpus.clone().unwrap_or_default(),
        }))
    }
}

/// One engine as the model manager sees it.
struct EngineModel {
    handle: EngineHandle,
    registry: EngineRegistry,
    tp: u32,
    gpus: Vec<u32>,
}

impl LoadedModel for EngineModel {
    fn describe(&self) -> RunningModel {
        let info = self.handle.info();
        let stats = self.handle.stats();
        RunningModel {
            name: info.served_name.clone(),
            source: info.source.clone(),
            architecture: info.architecture.clone(),
            params: info.num_params,
            dtype: info.dtype.clone(),
            device: info.device.clone(),
            tp: self.tp,
            gpus: self.gpus.clone(),
            max_model_len: info.max_model_len,
            weight_bytes: info.weight_bytes,
            kv_cache_bytes: info.kv_cache_bytes,
            kv_block_size: info.kv_block_size,
            kv_blocks_total: info.kv_blocks_total,
            kv_blocks_used: u32::try_from(stats.kv_blocks_used).unwrap_or(u32::MAX),
            running: u32::try_from(stats.running).unwrap_or(u32::MAX),
            waiting: u32::try_from(stats.waiting).unwrap_or(u32::MAX),
            loaded_at: info.loaded_at,
        }
    }

    fn last_heartbeat(&self) -> Instant {
        self.handle.last_heartbeat()
    }

    fn shutdown(&self, drain: Duration) {
        // Unpublish first so the HTTP API stops routing new requests here.
        self.registry.write().unwrap_or_else(|e| e.into_inner()).remove(&self.handle.info().served_name);
        self.handle.shutdown(drain);
    }
}

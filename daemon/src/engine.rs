//! The inference engine behind the model manager: [`EngineLoader`] loads models with
//! `llmd_engine::EngineHandle::load` and hands each back as a [`LoadedModel`] that carries the
//! [`ServedModel`] the HTTP API routes to (the model manager publishes the table of them).
//!
//! Before a load that will run on a GPU, the loader estimates what the model needs
//! (`llmd_telemetry::estimate_memory`: weights + KV cache of one `max_model_len` sequence +
//! activation margin) and refuses with the numbers when the GPU cannot hold it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use llmd_engine::{EngineError, EngineHandle, LoadOptions, LoadProgress};
use llmd_openai::ServedModel;
use llmd_options::{Backend, Device, Dtype};
use llmd_proto::{ControlError, ErrorCode, LoadParams, Progress, ProgressUnit, RunningModel};
use llmd_telemetry::Telemetry;

use crate::models::{LoadRequest, LoadedModel, ModelLoader};

/// Loads models into `llmd_engine` engines.
#[derive(Debug, Clone)]
pub struct EngineLoader {
    telemetry: Arc<Telemetry>,
}

impl Default for EngineLoader {
    fn default() -> Self {
        EngineLoader::new(Arc::new(Telemetry::unavailable("GPU telemetry is not started")))
    }
}

impl EngineLoader {
    /// A loader that checks GPU loads against `telemetry`'s memory figures.
    pub fn new(telemetry: Arc<Telemetry>) -> EngineLoader {
        EngineLoader { telemetry }
    }
}

pub(crate) fn engine_error(name: &str, e: EngineError) -> ControlError {
    let code = match &e {
        EngineError::Model(llmd_models::ModelError::UnservedDtype { .. }) | EngineError::InvalidParam(_) => {
            ErrorCode::InvalidArgument
        }
        EngineError::Model(_) | EngineError::Tokenizer(_) => ErrorCode::Failed,
        _ => ErrorCode::Failed,
    };
    ControlError::new(code, format!("cannot load `{name}`: {e}"))
}

fn options(req: &LoadRequest) -> LoadOptions {
    let e = &req.engine;
    let mut o = LoadOptions::new(req.path.clone(), req.served_name.clone());
    o.source = req.params.source.clone();
    o.max_model_len = req.params.max_model_len;
    o.dtype = req.params.dtype.unwrap_or_default();
    o.device = e.device;
    o.cpu_kv_cache_bytes = e.cpu_kv_cache_bytes;
    o.gpu_memory_utilization = e.gpu_memory_utilization as f32;
    o.max_num_seqs = e.max_num_seqs as usize;
    o.max_num_batched_tokens = e.max_num_batched_tokens as usize;
    o.block_size = e.block_size as usize;
    o.max_queue = e.max_queue as usize;
    o.peer_all_reduce = e.peer_all_reduce;
    o
}

impl ModelLoader for EngineLoader {
    fn load(
        &self,
        request: &LoadRequest,
        progress: &mut dyn FnMut(Progress),
        cancelled: &AtomicBool,
    ) -> Result<Arc<dyn LoadedModel>, ControlError> {
        let name = request.served_name.clone();
        if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ControlError::new(ErrorCode::Cancelled, format!("loading `{name}` was cancelled")));
        }
        let tp = request.params.tp.unwrap_or(1);
        if tp == 0 {
            return Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!("cannot load `{name}`: `tp` must be >= 1"),
            ));
        }
        if tp > 1 && !runs_on_gpu(request.engine.device) {
            return Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "cannot load `{name}` with tp {tp}: tensor parallelism needs the CUDA backend (engine.device = \"cuda\" in a CUDA build)"
                ),
            ));
        }
        let gpus = if runs_on_gpu(request.engine.device) { self.place(request)? } else { Vec::new() };
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
        let mut opts = options(request);
        opts.gpus = gpus.clone();
        let handle = EngineHandle::load(opts, &mut on_progress).map_err(|e| engine_error(&name, e))?;
        // Whether it is served (or stopped, when the load was cancelled meanwhile) is the
        // model manager's decision.
        let served = ServedModel::from_engine(handle.clone(), request.reasoning_parser);
        tracing::info!(model = %name, reasoning_parser = %served.reasoning_parser, "model ready to serve");
        // The engine says where it really runs; GPUs are reported only for a GPU engine.
        let gpus = if handle.info().backend == Backend::Cuda { gpus } else { Vec::new() };
        Ok(Arc::new(EngineModel { handle, served, tp: request.params.tp.unwrap_or(1), gpus }))
    }
}

/// Whether the engine will put this load on a GPU: `cuda`, or `auto` in a CUDA build.
pub(crate) fn runs_on_gpu(device: Device) -> bool {
    match device {
        Device::Cuda => true,
        Device::Auto => cfg!(feature = "cuda"),
        Device::Cpu => false,
    }
}

/// Bytes of the weight files (`*.safetensors`) in a model folder.
fn weight_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".safetensors") {
            // metadata() follows symlinks (Hugging Face snapshots link into blobs/).
            total += std::fs::metadata(entry.path())?.len();
        }
    }
    Ok(total)
}

/// The dtype a GPU load keeps its KV cache in: the one the CUDA backend computes in, or the
/// engine's refusal (`InvalidArgument`) of a `dtype` it does not serve, before any placement.
fn gpu_kv_dtype(name: &str, params: &LoadParams) -> Result<Dtype, ControlError> {
    llmd_engine::serving_dtype(Backend::Cuda, params.dtype.unwrap_or_default()).map_err(|e| engine_error(name, e))
}

impl EngineLoader {
    /// GPU placement of a load: the GPUs it goes on, or `InsufficientResources` with the
    /// estimate and the free memory when it cannot fit. Without GPU telemetry (no NVML) the
    /// load goes ahead and the engine reports what it finds.
    fn place(&self, request: &LoadRequest) -> Result<Vec<u32>, ControlError> {
        place_on(&self.telemetry.report(), request)
    }
}

/// [`EngineLoader::place`] against a given GPU report.
fn place_on(report: &llmd_telemetry::GpuReport, request: &LoadRequest) -> Result<Vec<u32>, ControlError> {
    let name = &request.served_name;
    place_model(report, name, &request.params, || {
        let cfg = llmd_models::ModelConfig::from_dir(&request.path)
            .map_err(|e| ControlError::new(ErrorCode::Failed, format!("cannot load `{name}`: {e}")))?;
        let weights = weight_bytes(&request.path).map_err(|e| {
            ControlError::new(ErrorCode::Failed, format!("cannot load `{name}`: {}: {e}", request.path.display()))
        })?;
        Ok((cfg, weights))
    })
}

/// The GPUs a load with `params` goes on, or `InsufficientResources` with the estimate and the
/// free memory when it cannot fit. `figures` gives the model's config and weight bytes; it is
/// asked only when there is GPU telemetry to check against (without NVML the load goes ahead
/// on the given GPUs or the first `tp`, and the engine reports what it finds). A `dtype` the
/// CUDA backend does not serve is refused first (`InvalidArgument`); the KV cache is sized in
/// the dtype it does serve. Used at load (weights measured on disk) and before a download
/// (weights from the hub's listing).
pub(crate) fn place_model(
    report: &llmd_telemetry::GpuReport,
    name: &str,
    params: &LoadParams,
    figures: impl FnOnce() -> Result<(llmd_models::ModelConfig, u64), ControlError>,
) -> Result<Vec<u32>, ControlError> {
    let tp = params.tp.unwrap_or(1);
    if let Some(gpus) = params.gpus.as_deref()
        && gpus.len() != tp as usize
    {
        return Err(ControlError::new(
            ErrorCode::InvalidArgument,
            format!("cannot load `{name}`: `gpus` = {gpus:?} lists {} GPUs but `tp` is {tp}", gpus.len()),
        ));
    }
    let kv_dtype = gpu_kv_dtype(name, params)?;
    if let Some(reason) = &report.unavailable {
        tracing::warn!(model = %name, "no GPU memory check: {reason}");
        return Ok(params.gpus.clone().unwrap_or_else(|| (0..tp).collect()));
    }
    let (cfg, weights) = figures()?;
    let max_model_len = params.max_model_len.unwrap_or(u32::try_from(cfg.max_position_embeddings).unwrap_or(u32::MAX));
    let estimate = llmd_telemetry::estimate_memory(
        weights,
        u32::try_from(cfg.num_hidden_layers).unwrap_or(u32::MAX),
        u32::try_from(cfg.num_key_value_heads).unwrap_or(u32::MAX),
        u32::try_from(cfg.head_dim).unwrap_or(u32::MAX),
        u32::try_from(kv_dtype.size_bytes()).unwrap_or(u32::MAX),
        max_model_len,
        tp,
    );
    // The given GPUs, or the `tp` with the most free memory; NVML and CUDA number GPUs the same
    // way because the daemon sets CUDA_DEVICE_ORDER=PCI_BUS_ID.
    let placed = llmd_telemetry::place_estimate(report, params.gpus.as_deref(), &estimate)
        .map_err(|e| ControlError::new(ErrorCode::InsufficientResources, format!("cannot load `{name}`: {e}")))?;
    tracing::info!(model = %name, gpus = ?placed, need = %estimate, "placement checked");
    Ok(placed)
}

/// One engine as the model manager sees it.
struct EngineModel {
    handle: EngineHandle,
    served: ServedModel,
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
            dtype: info.dtype,
            device: info.backend,
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

    fn served(&self) -> ServedModel {
        self.served.clone()
    }

    fn last_heartbeat(&self) -> Instant {
        self.handle.last_heartbeat()
    }

    fn shutdown(&self, drain: Duration) {
        // The model manager has taken it out of the served table before calling this.
        self.handle.shutdown(drain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::tests::one_gpu;
    use llmd_proto::GpuReport;

    fn request(params: LoadParams) -> LoadRequest {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2");
        LoadRequest {
            params,
            served_name: "tiny".into(),
            path,
            engine: crate::config::EngineConfig::default(),
            reasoning_parser: None,
        }
    }

    #[test]
    fn engine_section_reaches_the_load_options() {
        let mut r = request(LoadParams::default());
        assert!(options(&r).peer_all_reduce, "peer all-reduce is on by default");
        r.engine = toml::from_str("peer_all_reduce = false\nmax_queue = 7\n").unwrap();
        let o = options(&r);
        assert!(!o.peer_all_reduce);
        assert_eq!(o.max_queue, 7);
    }

    #[test]
    fn placement_refuses_with_the_numbers_and_accepts_what_fits() {
        let params = LoadParams { max_model_len: Some(64), ..Default::default() };
        let e = place_on(&one_gpu(100 << 20), &request(params.clone())).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientResources);
        assert!(e.message.contains("cannot load `tiny`") && e.message.contains("GiB"), "{}", e.message);
        assert!(e.message.contains("max_model_len 64"), "{}", e.message);
        assert_eq!(place_on(&one_gpu(8 << 30), &request(params)).unwrap(), [0]);
    }

    #[test]
    fn placement_without_telemetry_goes_ahead_and_bad_gpu_lists_are_refused() {
        let none = GpuReport { unavailable: Some("no driver".into()), ..GpuReport::default() };
        assert_eq!(place_on(&none, &request(LoadParams::default())).unwrap(), [0]);
        assert_eq!(place_on(&none, &request(LoadParams { tp: Some(2), ..Default::default() })).unwrap(), [0, 1]);
        // A GPU list that does not match tp is a usage error.
        let e = place_on(
            &one_gpu(8 << 30),
            &request(LoadParams { tp: Some(2), gpus: Some(vec![0]), ..Default::default() }),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("`gpus` = [0] lists 1 GPUs but `tp` is 2"), "{}", e.message);
        // A GPU that does not exist is refused by placement, naming it.
        let e = place_on(&one_gpu(8 << 30), &request(LoadParams { gpus: Some(vec![1]), ..Default::default() }))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientResources);
        assert!(e.message.contains('1'), "{}", e.message);
    }

    #[test]
    fn gpu_placement_sizes_kv_in_bfloat16_and_refuses_other_dtypes() {
        let fixed = |d| LoadParams { dtype: Some(llmd_options::DtypeChoice::Fixed(d)), ..Default::default() };
        assert_eq!(gpu_kv_dtype("m", &LoadParams::default()).unwrap(), Dtype::BFloat16);
        assert_eq!(gpu_kv_dtype("m", &fixed(Dtype::BFloat16)).unwrap(), Dtype::BFloat16);
        let e = gpu_kv_dtype("m", &fixed(Dtype::Float32)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("`dtype` = float32 is not served by the CUDA backend"), "{}", e.message);
        // Refused before the model is looked at, whatever the GPUs hold.
        let e = place_on(&one_gpu(8 << 30), &request(fixed(Dtype::Float16))).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
    }

    #[test]
    fn load_options_take_the_typed_dtype_and_device() {
        let mut r =
            request(LoadParams { dtype: Some(llmd_options::DtypeChoice::Fixed(Dtype::Float32)), ..Default::default() });
        r.engine.device = Device::Cpu;
        let o = options(&r);
        assert_eq!((o.dtype, o.device), (llmd_options::DtypeChoice::Fixed(Dtype::Float32), Device::Cpu));
        assert_eq!(options(&request(LoadParams::default())).dtype, llmd_options::DtypeChoice::Auto);
    }
}

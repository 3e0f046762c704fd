//! What a hub model must pass before its weights are downloaded.
//!
//! `llmctl load` and `llmctl pull` of an `hf:`/`ms:` source go through
//! `llmd_store::Store::pull_checked`: the store fetches config.json, the tokenizer files and
//! the chat template first, then [`check_pull`] or [`check_load`] decides whether the weights
//! are fetched at all. A refusal names the field and what llmd accepts; the cache then holds
//! only those metadata files, in a snapshot marked incomplete (not listed, not loaded).
//!
//! - **Architecture**: `architectures[0]` must be one llmd-models' registry serves (both
//!   backends build from it, so one list holds for CPU and CUDA).
//! - **Weight format**: `*.safetensors`; repositories with only PyTorch pickles or GGUF files
//!   are refused, and so is a `quantization_config` (named by its `quant_method`), since
//!   quantized weights are not served yet.
//! - **config.json** must read as llmd reads it at load (its errors name the key).
//! - **Fit** (loads only): on a GPU, the placement estimate of `engine.rs` (weights from the
//!   listing's file sizes, KV cache of one `max_model_len` sequence, activation margin) against
//!   the chosen GPUs' free memory, exactly as at load; on the CPU, the weights in the dtype the
//!   CPU backend computes in plus `engine.cpu_kv_cache_bytes` against the host's available
//!   memory. A `dtype` the backend does not serve is refused here as at load. Without GPU
//!   telemetry, host memory figures or file sizes the fit is not checked, and the log says why.

use llmd_models::ModelConfig;
use llmd_options::{Backend, Dtype};
use llmd_proto::{ControlError, ErrorCode, LoadParams};
use llmd_store::{Manifest, RepoFile, StoreError};
use llmd_telemetry::GpuReport;
use llmd_telemetry::placement::gib;

use crate::config::EngineConfig;

/// Appended to every refusal: what the refused pull left behind.
const LEFT_BEHIND: &str = "only its config and tokenizer files were downloaded";

/// Where a load will run, with the memory to check it against.
#[derive(Debug, Clone)]
pub enum Target {
    /// The GPU backend: placement against this report.
    Gpu(GpuReport),
    /// The CPU backend: `available_bytes` is the host's `MemAvailable` (`None`: unknown).
    Cpu { available_bytes: Option<u64>, kv_cache_bytes: u64 },
}

impl Target {
    /// The target of a load under `engine` (`runs_on_gpu` decides, as for the load itself),
    /// with the figures read now.
    pub fn of(engine: &EngineConfig, telemetry: &llmd_telemetry::Telemetry) -> Target {
        if crate::engine::runs_on_gpu(engine.device) {
            Target::Gpu(telemetry.report())
        } else {
            Target::Cpu { available_bytes: host_available_bytes(), kv_cache_bytes: engine.cpu_kv_cache_bytes }
        }
    }
}

fn refusal(code: ErrorCode, message: String) -> StoreError {
    StoreError::Refused { code, message: format!("{message}; {LEFT_BEHIND}") }
}

/// The check of `llmctl pull`: architecture, weight format and config.json.
pub fn check_pull(m: &Manifest) -> Result<(), StoreError> {
    servable(m).map(|_| ())
}

/// The check of `llmctl load` of a model not yet in the cache: [`check_pull`]'s, then whether
/// it fits `target`. `name` is the served name (for the messages).
pub fn check_load(m: &Manifest, name: &str, params: &LoadParams, target: &Target) -> Result<(), StoreError> {
    let cfg = servable(m)?;
    fits(m, &cfg, name, params, target).map_err(|e| refusal(e.code, e.message))
}

/// The architecture, weight format and config checks; the parsed config when they pass.
fn servable(m: &Manifest) -> Result<ModelConfig, StoreError> {
    let id = &m.id;
    let invalid = |message: String| refusal(ErrorCode::InvalidArgument, message);
    let path = m.dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "`{id}` has no config.json: llmd serves transformers checkpoints (config.json and *.safetensors)"
            )));
        }
        Err(e) => return Err(StoreError::Io { path, source: std::sync::Arc::new(e) }),
    };
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("`{id}`: config.json is not valid JSON: {e}")))?;

    match raw.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()) {
        None => {
            return Err(invalid(format!(
                "`{id}`: config.json has no `architectures[0]` naming the model class (llmd serves {})",
                llmd_models::spec::supported_list()
            )));
        }
        Some(arch) => {
            if llmd_models::Architecture::from_hf_name(arch).is_err() {
                return Err(invalid(format!(
                    "`{id}`: config.json: architectures[0] = {arch} is not supported (llmd serves {})",
                    llmd_models::spec::supported_list()
                )));
            }
        }
    }

    if let Some(q) = raw.get("quantization_config").filter(|q| !q.is_null()) {
        let method = match q.get("quant_method").and_then(|m| m.as_str()) {
            Some(method) => format!("quantization_config.quant_method = {method}"),
            None => "quantization_config (without a quant_method)".to_string(),
        };
        return Err(invalid(format!(
            "`{id}`: config.json: {method} is not supported yet: llmd serves unquantized bfloat16, float16 and float32 weights"
        )));
    }

    weight_format(m)?;
    ModelConfig::from_json_str(&text, "config.json").map_err(|e| invalid(format!("`{id}`: {e}")))
}

/// At most three names, then how many more.
fn some_names<'a>(files: impl IntoIterator<Item = &'a RepoFile>) -> String {
    let names: Vec<&str> = files.into_iter().map(|f| f.path.as_str()).collect();
    let shown = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    match names.len() {
        n if n > 3 => format!("{shown} and {} more", n - 3),
        _ => shown,
    }
}

fn is_safetensors(f: &RepoFile) -> bool {
    f.path.ends_with(".safetensors")
}

/// The weights the pull would fetch must be safetensors, and there must be some.
fn weight_format(m: &Manifest) -> Result<(), StoreError> {
    let id = &m.id;
    let invalid = |message: String| refusal(ErrorCode::InvalidArgument, message);
    let other: Vec<&RepoFile> = m.weights.iter().filter(|f| !is_safetensors(f)).collect();
    if !other.is_empty() {
        return Err(invalid(format!(
            "`{id}` has no *.safetensors weights, only {}: llmd loads safetensors only (a PyTorch pickle can run code when it is loaded)",
            some_names(other)
        )));
    }
    if m.weights.is_empty() {
        let gguf: Vec<&RepoFile> = m.files.iter().filter(|f| f.path.ends_with(".gguf")).collect();
        return Err(invalid(if gguf.is_empty() {
            format!("`{id}` has no weight files (*.safetensors) in the selection")
        } else {
            format!(
                "`{id}` has only GGUF weights ({}): llmd loads *.safetensors checkpoints; pull the repository GGUF was made from",
                some_names(gguf)
            )
        }));
    }
    Ok(())
}

/// Whether the model fits `target`; the error is the load's own (`cannot load ...`).
fn fits(m: &Manifest, cfg: &ModelConfig, name: &str, params: &LoadParams, target: &Target) -> Result<(), ControlError> {
    let Some(weights) = m.weight_bytes() else {
        tracing::warn!(model = %name, "no memory check before downloading: the hub did not give every weight file's size");
        return Ok(());
    };
    match target {
        Target::Gpu(report) => {
            crate::engine::place_model(report, name, params, || Ok((cfg.clone(), weights))).map(|_| ())
        }
        Target::Cpu { available_bytes, kv_cache_bytes } => {
            let Some(available) = *available_bytes else {
                tracing::warn!(model = %name, "no memory check before downloading: the host's available memory is unknown");
                return Ok(());
            };
            let serves = llmd_engine::serving_dtype(Backend::Cpu, params.dtype.unwrap_or_default())
                .map_err(|e| crate::engine::engine_error(name, e))?;
            let in_memory = cpu_weight_bytes(weights, cfg, serves);
            let need = in_memory.saturating_add(*kv_cache_bytes);
            if need > available {
                return Err(ControlError::new(
                    ErrorCode::InsufficientResources,
                    format!(
                        "cannot load `{name}` on the CPU: it needs {} (weights as {serves} {} + KV cache engine.cpu_kv_cache_bytes {}), the host has {} available",
                        gib(need),
                        gib(in_memory),
                        gib(*kv_cache_bytes),
                        gib(available)
                    ),
                ));
            }
            tracing::info!(model = %name, need = %gib(need), available = %gib(available), "host memory checked");
            Ok(())
        }
    }
}

/// Bytes the CPU backend holds for weights stored in `file_bytes` once converted to `serves`;
/// the checkpoint's dtype is what config.json says (16-bit when it says nothing readable, as
/// hub checkpoints are).
fn cpu_weight_bytes(file_bytes: u64, cfg: &ModelConfig, serves: Dtype) -> u64 {
    let stored = cfg.dtype.as_deref().and_then(|d| d.parse::<Dtype>().ok()).unwrap_or(Dtype::BFloat16);
    (file_bytes / stored.size_bytes() as u64).saturating_mul(serves.size_bytes() as u64)
}

/// The host's `MemAvailable` from `/proc/meminfo`, in bytes.
fn host_available_bytes() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.trim_start_matches("MemAvailable:").trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use llmd_proto::GpuInfo;

    const QWEN2: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}"#;

    fn file(path: &str, size: u64) -> RepoFile {
        RepoFile { path: path.into(), size: Some(size) }
    }

    /// A manifest whose folder holds `config` as config.json (none when `None`).
    fn manifest(config: Option<&str>, files: Vec<RepoFile>) -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(c) = config {
            std::fs::write(dir.path().join("config.json"), c).unwrap();
        }
        let weights = files.iter().filter(|f| llmd_store::is_weight_file(&f.path)).cloned().collect();
        let m = Manifest {
            id: "hf:org/model".into(),
            revision: "abc".into(),
            dir: dir.path().to_path_buf(),
            files,
            weights,
        };
        (dir, m)
    }

    fn refused_with(r: Result<(), StoreError>, code: ErrorCode, needle: &str) {
        match r {
            Err(StoreError::Refused { code: c, message }) => {
                assert_eq!(c, code, "{message}");
                assert!(message.contains(needle), "`{needle}` not in: {message}");
                assert!(message.ends_with(LEFT_BEHIND), "{message}");
            }
            other => panic!("expected a refusal containing `{needle}`, got {other:?}"),
        }
    }

    #[test]
    fn a_supported_safetensors_checkpoint_passes() {
        let (_d, m) = manifest(Some(QWEN2), vec![file("config.json", 10), file("model.safetensors", 1 << 20)]);
        check_pull(&m).unwrap();
    }

    #[test]
    fn the_architecture_is_named_with_what_llmd_serves() {
        let cfg = QWEN2.replace("Qwen2ForCausalLM", "DeepseekV3ForCausalLM");
        let (_d, m) = manifest(Some(&cfg), vec![file("model-00001-of-00163.safetensors", 5 << 30)]);
        refused_with(
            check_pull(&m),
            ErrorCode::InvalidArgument,
            "config.json: architectures[0] = DeepseekV3ForCausalLM is not supported (llmd serves LlamaForCausalLM, ",
        );
        let (_d, m) = manifest(Some(r#"{"model_type": "llama"}"#), vec![file("model.safetensors", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "no `architectures[0]`");
        let (_d, m) = manifest(None, vec![file("model.safetensors", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "`hf:org/model` has no config.json");
        let (_d, m) = manifest(Some("{not json"), vec![file("model.safetensors", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "config.json is not valid JSON");
    }

    #[test]
    fn quantized_checkpoints_are_refused_by_their_method() {
        let cfg = QWEN2.replace("\"vocab_size\"", r#""quantization_config": {"quant_method": "fp8"}, "vocab_size""#);
        let (_d, m) = manifest(Some(&cfg), vec![file("model.safetensors", 1)]);
        refused_with(
            check_pull(&m),
            ErrorCode::InvalidArgument,
            "quantization_config.quant_method = fp8 is not supported",
        );
        let cfg = QWEN2.replace("\"vocab_size\"", r#""quantization_config": {"bits": 4}, "vocab_size""#);
        let (_d, m) = manifest(Some(&cfg), vec![file("model.safetensors", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "quantization_config (without a quant_method)");
        // `null` is no quantization.
        let cfg = QWEN2.replace("\"vocab_size\"", r#""quantization_config": null, "vocab_size""#);
        let (_d, m) = manifest(Some(&cfg), vec![file("model.safetensors", 1)]);
        check_pull(&m).unwrap();
    }

    #[test]
    fn pickles_gguf_and_empty_selections_are_refused() {
        let (_d, m) = manifest(Some(QWEN2), vec![file("pytorch_model.bin", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "no *.safetensors weights, only pytorch_model.bin");
        let ggufs = (1..=5).map(|i| file(&format!("m-q{i}.gguf"), 1)).collect();
        let (_d, mut m) = manifest(Some(QWEN2), ggufs);
        // The default selection takes no GGUF file.
        m.weights.clear();
        refused_with(
            check_pull(&m),
            ErrorCode::InvalidArgument,
            "only GGUF weights (m-q1.gguf, m-q2.gguf, m-q3.gguf and 2 more)",
        );
        let (_d, m) = manifest(Some(QWEN2), vec![file("README.md", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "no weight files (*.safetensors)");
    }

    #[test]
    fn the_rest_of_config_json_is_read_as_at_load() {
        let cfg = QWEN2.replace("\"hidden_size\": 64,", "");
        let (_d, m) = manifest(Some(&cfg), vec![file("model.safetensors", 1)]);
        refused_with(check_pull(&m), ErrorCode::InvalidArgument, "hidden_size");
    }

    /// A report of one idle GPU with `free` bytes (also used by the placement tests in engine.rs).
    pub(crate) fn one_gpu(free: u64) -> GpuReport {
        GpuReport {
            gpus: vec![GpuInfo {
                index: 0,
                name: "Test GPU".into(),
                memory_free_bytes: free,
                memory_total_bytes: free,
                ..GpuInfo::default()
            }],
            ..GpuReport::default()
        }
    }

    #[test]
    fn a_load_is_placed_on_the_gpus_from_the_listed_sizes() {
        let (_d, m) =
            manifest(Some(QWEN2), vec![file("model-1.safetensors", 10 << 30), file("model-2.safetensors", 6 << 30)]);
        let params = LoadParams { max_model_len: Some(4096), ..Default::default() };
        refused_with(
            check_load(&m, "big", &params, &Target::Gpu(one_gpu(12 << 30))),
            ErrorCode::InsufficientResources,
            "cannot load `big`",
        );
        check_load(&m, "big", &params, &Target::Gpu(one_gpu(40 << 30))).unwrap();
        // tp 2 needs two GPUs; the GPU list is checked against tp as at load.
        let two = LoadParams { tp: Some(2), gpus: Some(vec![0]), ..Default::default() };
        refused_with(
            check_load(&m, "big", &two, &Target::Gpu(one_gpu(40 << 30))),
            ErrorCode::InvalidArgument,
            "`tp` is 2",
        );
        // No telemetry: not checked.
        let none = GpuReport { unavailable: Some("no driver".into()), ..GpuReport::default() };
        check_load(&m, "big", &params, &Target::Gpu(none)).unwrap();
        // An unsupported model is refused before any fit question.
        let cfg = QWEN2.replace("Qwen2ForCausalLM", "DeepseekV3ForCausalLM");
        let (_d, m) = manifest(Some(&cfg), vec![file("model.safetensors", 1)]);
        refused_with(
            check_load(&m, "x", &params, &Target::Gpu(one_gpu(40 << 30))),
            ErrorCode::InvalidArgument,
            "DeepseekV3ForCausalLM",
        );
    }

    #[test]
    fn a_cpu_load_is_checked_against_host_memory() {
        // 1 GiB of bfloat16 weights is 2 GiB as float32, plus 512 MiB of KV cache.
        let (_d, m) = manifest(Some(QWEN2), vec![file("model.safetensors", 1 << 30)]);
        let params = LoadParams::default();
        let cpu = |available| Target::Cpu { available_bytes: available, kv_cache_bytes: 512 << 20 };
        refused_with(
            check_load(&m, "tiny", &params, &cpu(Some(2 << 30))),
            ErrorCode::InsufficientResources,
            "cannot load `tiny` on the CPU: it needs 2.5 GiB (weights as float32 2.0 GiB + KV cache engine.cpu_kv_cache_bytes 0.5 GiB), the host has 2.0 GiB available",
        );
        check_load(&m, "tiny", &params, &cpu(Some(3 << 30))).unwrap();
        check_load(&m, "tiny", &params, &cpu(None)).unwrap();
        // A float32 checkpoint is held as it is stored.
        let (_d, m32) = manifest(Some(&QWEN2.replace("bfloat16", "float32")), vec![file("model.safetensors", 1 << 30)]);
        check_load(&m32, "tiny", &params, &cpu(Some(2 << 30))).unwrap();
        // A dtype the CPU backend does not serve is refused as at load.
        let bf16 = LoadParams { dtype: Some(llmd_options::DtypeChoice::Fixed(Dtype::BFloat16)), ..Default::default() };
        refused_with(
            check_load(&m, "tiny", &bf16, &cpu(Some(64 << 30))),
            ErrorCode::InvalidArgument,
            "`dtype` = bfloat16",
        );
        // Unknown sizes: not checked.
        let (_d, m) = manifest(Some(QWEN2), vec![RepoFile { path: "model.safetensors".into(), size: None }]);
        check_load(&m, "tiny", &params, &cpu(Some(1))).unwrap();
    }

    #[test]
    fn mem_available_is_read_in_kib() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(12_288_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }
}

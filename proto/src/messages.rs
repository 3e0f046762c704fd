//! Requests, replies, progress events and errors of the control protocol.
//!
//! Requests are internally tagged by `method`, replies by `kind`, server frames by `event`,
//! all in snake_case. Each [`Request`] variant documents the [`Reply`] it gets.

use serde::{Deserialize, Serialize};

pub use llmd_options::{Backend, Dtype, DtypeChoice};

/// A frame sent by the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFrame {
    /// Chosen by the client; echoed on every frame that answers this request.
    pub id: u64,
    pub request: Request,
}

/// A frame sent by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Progress of a long operation (pull, load); zero or more before the final frame.
    Progress { id: u64, progress: Progress },
    /// The final answer to request `id`.
    Reply { id: u64, reply: Reply },
    /// The request `id` failed; also final. `id` is 0 when the frame could not be parsed.
    Error { id: u64, error: ControlError },
}

impl ServerFrame {
    pub fn id(&self) -> u64 {
        match self {
            ServerFrame::Progress { id, .. } | ServerFrame::Reply { id, .. } | ServerFrame::Error { id, .. } => *id,
        }
    }
}

/// Every operation of the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Must be the first request on a connection. Reply: [`Reply::Hello`].
    Hello { protocol: u32, client: String },
    /// Daemon state and addresses. Read-only. Reply: [`Reply::Status`].
    Status,
    /// Loaded models with their memory and queues. Read-only. Reply: [`Reply::Ps`].
    Ps,
    /// Models found on disk. Read-only. Reply: [`Reply::List`].
    List,
    /// Pull (if needed) and serve a model. Mutating. Progress frames, then [`Reply::Loaded`].
    Load(LoadParams),
    /// Stop serving a model after draining its in-flight requests. Mutating. Reply: [`Reply::Unloaded`].
    Unload { name: String },
    /// Download a model into the store. Mutating. Progress frames, then [`Reply::Pulled`].
    Pull(PullParams),
    /// Delete a model from disk; refused while it is loaded. Mutating. Reply: [`Reply::Removed`].
    Rm { model: String },
    /// Cancel a running pull or load by its operation id. Mutating. Reply: [`Reply::Cancelled`].
    Cancel { operation: String },
    /// GPU telemetry. Read-only. Reply: [`Reply::Gpus`].
    Gpus,
    /// Host checks. Read-only. Reply: [`Reply::Doctor`].
    Doctor(DoctorParams),
}

impl Request {
    /// Every `method` name the protocol knows, for telling "unknown method" from "bad params".
    pub const METHODS: &'static [&'static str] =
        &["hello", "status", "ps", "list", "load", "unload", "pull", "rm", "cancel", "gpus", "doctor"];

    pub fn method(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Status => "status",
            Request::Ps => "ps",
            Request::List => "list",
            Request::Load(_) => "load",
            Request::Unload { .. } => "unload",
            Request::Pull(_) => "pull",
            Request::Rm { .. } => "rm",
            Request::Cancel { .. } => "cancel",
            Request::Gpus => "gpus",
            Request::Doctor(_) => "doctor",
        }
    }

    /// Mutating requests need an authorized caller (root, the daemon's uid, or the control group).
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Request::Load(_) | Request::Unload { .. } | Request::Pull(_) | Request::Rm { .. } | Request::Cancel { .. }
        )
    }
}

/// Parses a client frame, telling apart the errors a client must be able to distinguish:
/// not JSON / wrong shape (`bad_frame`), a method this daemon does not know
/// (`unknown_method`), and known method with bad parameters (`invalid_argument`).
/// On error, the id is returned too when it could be read, so the answer can echo it.
pub fn decode_client_frame(bytes: &[u8]) -> Result<ClientFrame, (u64, ControlError)> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| (0, ControlError::new(ErrorCode::BadFrame, format!("frame is not valid JSON: {e}"))))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64).unwrap_or(0);
    let Some(request) = value.get("request") else {
        return Err((id, ControlError::new(ErrorCode::BadFrame, "frame has no `request` object")));
    };
    let method = request.get("method").and_then(serde_json::Value::as_str);
    match method {
        None => {
            return Err((id, ControlError::new(ErrorCode::BadFrame, "`request.method` is missing or not a string")));
        }
        Some(m) if !Request::METHODS.contains(&m) => {
            return Err((id, ControlError::new(ErrorCode::UnknownMethod, format!("unknown method `{m}`"))));
        }
        Some(_) => {}
    }
    serde_json::from_value::<ClientFrame>(value)
        .map_err(|e| (id, ControlError::new(ErrorCode::InvalidArgument, format!("invalid request: {e}"))))
}

/// Parameters of [`Request::Load`]; the same fields as a `[[models]]` config entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    /// A local folder, `hf:org/name[@rev]`, `ms:org/name[@rev]`, or a bare `org/name`.
    pub source: String,
    /// Served model name; defaults to the repo or folder name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tensor-parallel size; defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp: Option<u32>,
    /// GPU indices to place on; defaults to the `tp` GPUs with the most free memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
    /// Context length cap; defaults to the model's `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
    /// The dtype to compute in: `auto` (the backend's own), `bfloat16`, `float16` or
    /// `float32`; a value the backend does not serve is refused at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DtypeChoice>,
    /// Revision when the source is a hub id and no `@rev` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// Parameters of [`Request::Pull`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullParams {
    /// `hf:org/name[@rev]`, `ms:org/name[@rev]` or a bare `org/name`.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Glob patterns; when non-empty only matching files are fetched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Glob patterns of files to skip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

/// Parameters of [`Request::Doctor`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoctorParams {
    /// Skip checks that take seconds (NCCL all-reduce, hub reachability).
    #[serde(default)]
    pub quick: bool,
    /// Uid of the caller, filled in by the daemon from peer credentials (ignored from clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_uid: Option<u32>,
}

/// Replies, one variant per request kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Hello(Welcome),
    Status(StatusInfo),
    Ps { models: Vec<RunningModel> },
    List { models: Vec<StoredModel> },
    Loaded(RunningModel),
    Unloaded { name: String },
    Pulled(StoredModel),
    Removed { model: String, freed_bytes: u64 },
    Cancelled { operation: String },
    Gpus(GpuReport),
    Doctor(DoctorReport),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    pub daemon_version: String,
}

/// Life-cycle phase of the daemon; also the D-Bus `State` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    Starting,
    Ready,
    Reloading,
    Stopping,
}

impl DaemonState {
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Starting => "starting",
            DaemonState::Ready => "ready",
            DaemonState::Reloading => "reloading",
            DaemonState::Stopping => "stopping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub protocol: u32,
    pub state: DaemonState,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Address the OpenAI HTTP API is bound to.
    pub http_listen: String,
    pub socket: String,
    /// "system", "session" or "off".
    pub dbus: String,
    /// Where models run: `cpu` or `cuda`.
    pub device: Backend,
    pub models_dir: String,
    pub models_loaded: u32,
    pub gpus: u32,
}

/// One loaded model, as `llmctl ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningModel {
    /// Served name (the `model` field of OpenAI requests).
    pub name: String,
    pub source: String,
    pub architecture: String,
    pub params: u64,
    /// The dtype the backend computes and caches in (`float32` on the CPU, `bfloat16` on CUDA).
    pub dtype: Dtype,
    /// The backend it runs on; its GPUs are in `gpus`.
    pub device: Backend,
    pub tp: u32,
    #[serde(default)]
    pub gpus: Vec<u32>,
    pub max_model_len: u32,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub kv_block_size: u32,
    pub kv_blocks_total: u32,
    pub kv_blocks_used: u32,
    pub running: u32,
    pub waiting: u32,
    /// Unix time (seconds) when it finished loading.
    pub loaded_at: u64,
}

/// One model on disk, as `llmctl list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    /// What to pass to `llmctl load`/`rm`: `hf:org/name`, `ms:org/name` or a folder path.
    pub id: String,
    /// "hf", "ms" or "local".
    pub source: String,
    pub revision: Option<String>,
    pub path: String,
    pub size_bytes: u64,
    pub architecture: Option<String>,
    pub loaded: bool,
}

/// Progress of a long operation. Totals may be unknown early on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Identifies the operation for [`Request::Cancel`]; shared by clients joined to one pull.
    pub operation: String,
    /// The model the operation is about.
    pub model: String,
    /// Short human phase: "resolving", "downloading", "verifying", "loading weights", "warming up"...
    pub phase: String,
    pub done: u64,
    pub total: Option<u64>,
    pub unit: ProgressUnit,
    /// Units per second over the recent past.
    pub rate: f64,
    pub eta_secs: Option<f64>,
    /// Per-file detail for downloads (files in flight and finished ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileProgress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressUnit {
    Bytes,
    Tensors,
    Steps,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileProgress {
    pub name: String,
    pub done: u64,
    pub total: Option<u64>,
    pub rate: f64,
    pub eta_secs: Option<f64>,
}

/// `llmctl gpus`: what NVML reports, or why nothing could be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    /// Set when NVML could not be used (no driver, no GPU); the daemon then runs on the CPU.
    pub unavailable: Option<String>,
    pub driver_version: Option<String>,
    /// CUDA version the driver supports, e.g. "13.0".
    pub cuda_driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub pci_bus_id: String,
    pub utilization_gpu_pct: Option<u32>,
    pub utilization_memory_pct: Option<u32>,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_c: Option<u32>,
    pub power_draw_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub persistence_mode: Option<bool>,
    pub ecc_errors_corrected: Option<u64>,
    pub ecc_errors_uncorrected: Option<u64>,
    /// Active throttle reasons by name ("sw_power_cap", "hw_slowdown", ...).
    #[serde(default)]
    pub throttle_reasons: Vec<String>,
    pub xid_errors: u64,
    /// Energy used since the driver loaded, in millijoules (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION).
    #[serde(default)]
    pub total_energy_mj: Option<u64>,
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub name: String,
    pub used_memory_bytes: Option<u64>,
    /// The llmd model that owns this memory, when the process is this daemon.
    pub llmd_model: Option<String>,
}

/// `llmctl doctor`: every check with what it saw and how to fix it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DoctorReport {
    pub checks: Vec<CheckResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Stable machine name, e.g. "driver_loaded".
    pub name: String,
    pub status: CheckStatus,
    /// What was observed.
    pub observed: String,
    /// What to do about a warn/fail; empty on pass.
    pub fix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Warn,
    Fail,
    Skip,
}

/// A typed error; `code` is stable for scripts, `message` is for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlError { code, message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not shaped like a [`ClientFrame`].
    BadFrame,
    /// Announced length over [`crate::MAX_FRAME_BYTES`]; the connection is closed.
    FrameTooLarge,
    UnknownMethod,
    /// First request was not `hello`, or the protocol versions differ.
    VersionMismatch,
    /// The caller's uid may not use this mutating method.
    PermissionDenied,
    InvalidArgument,
    NotFound,
    /// Conflicts with the current state (already loaded, removing a loaded model...).
    Conflict,
    /// Not enough GPU memory, disk or KV blocks; the message has the numbers.
    InsufficientResources,
    /// The daemon is starting or stopping.
    Unavailable,
    Cancelled,
    /// Anything else that went wrong while doing the operation.
    Failed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InsufficientResources => "insufficient_resources",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes_are_stable() {
        let frame = ClientFrame { id: 7, request: Request::Unload { name: "qwen".into() } };
        assert_eq!(serde_json::to_string(&frame).unwrap(), r#"{"id":7,"request":{"method":"unload","name":"qwen"}}"#);
        let frame = ClientFrame { id: 1, request: Request::Status };
        assert_eq!(serde_json::to_string(&frame).unwrap(), r#"{"id":1,"request":{"method":"status"}}"#);
        let reply = ServerFrame::Reply { id: 3, reply: Reply::Unloaded { name: "m".into() } };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"event":"reply","id":3,"reply":{"kind":"unloaded","name":"m"}}"#
        );
        let err = ServerFrame::Error { id: 4, error: ControlError::new(ErrorCode::NotFound, "no model `x`") };
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"event":"error","id":4,"error":{"code":"not_found","message":"no model `x`"}}"#
        );
    }

    #[test]
    fn decode_tells_errors_apart() {
        assert_eq!(decode_client_frame(b"nope").unwrap_err().1.code, ErrorCode::BadFrame);
        assert_eq!(
            decode_client_frame(br#"{"id":5}"#).unwrap_err(),
            (5, ControlError::new(ErrorCode::BadFrame, "frame has no `request` object"))
        );
        let (id, e) = decode_client_frame(br#"{"id":9,"request":{"method":"explode"}}"#).unwrap_err();
        assert_eq!((id, e.code), (9, ErrorCode::UnknownMethod));
        let (id, e) = decode_client_frame(br#"{"id":2,"request":{"method":"unload"}}"#).unwrap_err();
        assert_eq!((id, e.code), (2, ErrorCode::InvalidArgument));
        let ok = decode_client_frame(br#"{"id":3,"request":{"method":"load","source":"/m","tp":2}}"#).unwrap();
        assert_eq!(ok.request, Request::Load(LoadParams { source: "/m".into(), tp: Some(2), ..Default::default() }));
    }

    #[test]
    fn typed_options_keep_their_wire_spelling() {
        let ok =
            decode_client_frame(br#"{"id":3,"request":{"method":"load","source":"/m","dtype":"bfloat16"}}"#).unwrap();
        let params =
            LoadParams { source: "/m".into(), dtype: Some(DtypeChoice::Fixed(Dtype::BFloat16)), ..Default::default() };
        assert_eq!(ok.request, Request::Load(params.clone()));
        assert_eq!(serde_json::to_string(&params).unwrap(), r#"{"source":"/m","dtype":"bfloat16"}"#);
        let (id, e) =
            decode_client_frame(br#"{"id":4,"request":{"method":"load","source":"/m","dtype":"fp8"}}"#).unwrap_err();
        assert_eq!((id, e.code), (4, ErrorCode::InvalidArgument));
        assert!(e.message.contains("auto, bfloat16, float16, float32"), "{}", e.message);
        let m = RunningModel {
            name: "m".into(),
            source: "/m".into(),
            architecture: "A".into(),
            params: 1,
            dtype: Dtype::Float32,
            device: Backend::Cpu,
            tp: 1,
            gpus: vec![],
            max_model_len: 16,
            weight_bytes: 0,
            kv_cache_bytes: 0,
            kv_block_size: 16,
            kv_blocks_total: 1,
            kv_blocks_used: 0,
            running: 0,
            waiting: 0,
            loaded_at: 0,
        };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!((json["dtype"].as_str(), json["device"].as_str()), (Some("float32"), Some("cpu")));
    }

    #[test]
    fn methods_list_matches_variants() {
        let all = [
            Request::Hello { protocol: 1, client: String::new() },
            Request::Status,
            Request::Ps,
            Request::List,
            Request::Load(LoadParams::default()),
            Request::Unload { name: String::new() },
            Request::Pull(PullParams::default()),
            Request::Rm { model: String::new() },
            Request::Cancel { operation: String::new() },
            Request::Gpus,
            Request::Doctor(DoctorParams::default()),
        ];
        let names: Vec<_> = all.iter().map(Request::method).collect();
        assert_eq!(names, Request::METHODS);
        for r in &all {
            let json = serde_json::to_value(r).unwrap();
            assert_eq!(json["method"], r.method());
        }
    }
}

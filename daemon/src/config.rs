//! The one config loader: TOML file + environment + `--dev` defaults into [`Settings`].
//!
//! Every table uses `deny_unknown_fields`, so a typo is an error rather than a silently
//! ignored key. Errors name the key, the value, the limit and the line of the file
//! ([`ConfigError`]); the binary exits with 78 (EX_CONFIG) on them.
//!
//! Precedence: command-line flags > environment (see [`crate::env::VARS`]) > config file >
//! built-in defaults. `--dev` and the systemd directories (`RUNTIME_DIRECTORY`,
//! `STATE_DIRECTORY`) change only the built-in defaults, so a key set in the file still wins.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use llmd_options::{Device, DtypeChoice, ReasoningParser};
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::secret::Secret;

/// Where the system-wide config lives when neither `--config` nor `LLMD_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/llmd/llmd.toml";

/// The config file, as written in TOML. Every key has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub control: ControlConfig,
    pub storage: StorageConfig,
    pub engine: EngineConfig,
    pub log: LogConfig,
    /// Models loaded at start, before the daemon reports ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelConfig>,
}

/// `[server]`: the OpenAI HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port of the HTTP API, e.g. "0.0.0.0:8000" to serve the network.
    pub listen: SocketAddr,
    /// Bearer keys accepted on /v1/*; none means no authentication.
    pub api_keys: Vec<Secret>,
    /// File with one API key per line (blank lines and `#` comments ignored); re-read on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Origins allowed by CORS ("*" for any); empty disables CORS headers.
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: u64,
    /// On SIGTERM, how long in-flight requests may run before the daemon exits anyway.
    pub shutdown_timeout_secs: u64,
    /// Whether GET /metrics needs an API key (when keys are set).
    pub metrics_require_auth: bool,
    /// Whether GET /health needs an API key (when keys are set).
    pub health_require_auth: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_keys: Vec::new(),
            api_key_file: None,
            allowed_origins: Vec::new(),
            max_body_bytes: 8 << 20,
            shutdown_timeout_secs: 30,
            metrics_require_auth: false,
            health_require_auth: false,
        }
    }
}

/// Which D-Bus bus the daemon owns `org.llmd.Daemon1` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbusBus {
    System,
    Session,
    Off,
}

impl DbusBus {
    pub fn as_str(self) -> &'static str {
        match self {
            DbusBus::System => "system",
            DbusBus::Session => "session",
            DbusBus::Off => "off",
        }
    }
}

/// `[control]`: the control socket and D-Bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Path of the control socket (mode 0660, group `group`).
    pub socket: PathBuf,
    /// Group that owns the socket; its members may load, unload, pull and remove models.
    pub group: String,
    /// "system", "session" or "off".
    pub dbus: DbusBus,
    /// Most control connections served at once; more are refused.
    pub max_connections: u32,
    /// A control connection idle this long is closed.
    pub idle_timeout_secs: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(llmd_proto::DEFAULT_SOCKET),
            group: llmd_proto::DEFAULT_CONTROL_GROUP.to_string(),
            dbus: DbusBus::System,
            max_connections: 64,
            idle_timeout_secs: 600,
        }
    }
}

/// `[storage]`: where models are downloaded and from where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Model store (Hugging Face cache layout).
    pub models_dir: PathBuf,
    /// Hugging Face endpoint or mirror, e.g. "https://hf-mirror.com".
    pub hf_endpoint: String,
    /// ModelScope endpoint.
    pub modelscope_endpoint: String,
    /// Use only what is on disk; never contact a hub.
    pub offline: bool,
    /// Files downloaded at once per pull.
    pub max_concurrent_downloads: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            models_dir: PathBuf::from("/var/lib/llmd/models"),
            hf_endpoint: "https://huggingface.co".into(),
            modelscope_endpoint: "https://www.modelscope.cn".into(),
            offline: false,
            max_concurrent_downloads: 8,
        }
    }
}

/// `[engine]`: defaults for every loaded model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// "auto" (CUDA when built with it, a GPU is usable and it serves the model, else the
    /// CPU), "cpu" or "cuda".
    pub device: Device,
    /// Fraction of GPU memory a model may use for weights and KV cache.
    pub gpu_memory_utilization: f64,
    /// Most sequences in one batch.
    pub max_num_seqs: u32,
    /// Token budget of one scheduler step (prefill chunks + decodes).
    pub max_num_batched_tokens: u32,
    /// KV cache size per model on the CPU, in bytes.
    pub cpu_kv_cache_bytes: u64,
    /// Tokens per KV cache block.
    pub block_size: u32,
    /// Waiting requests per model beyond which new ones get 429.
    pub max_queue: u32,
    /// Tensor-parallel models sum decode-sized steps through GPU peer memory (one fused kernel)
    /// instead of NCCL where every pair of GPUs has peer access. False: always NCCL (as vLLM's
    /// `--disable-custom-all-reduce`, for hosts whose P2P is reported but broken).
    pub peer_all_reduce: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: Device::Auto,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            cpu_kv_cache_bytes: 512 << 20,
            block_size: 16,
            max_queue: 1024,
            peer_all_reduce: true,
        }
    }
}

/// One `[[models]]` entry: a model served from start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A local folder, `hf:org/name[@rev]`, `ms:org/name[@rev]` or a bare `org/name`.
    pub source: String,
    /// Served name (the `model` of API requests); defaults to the repo or folder name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tensor-parallel size (GPUs per model); defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp: Option<u32>,
    /// Context length cap; defaults to the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
    /// The dtype to compute in: "auto" (the backend's own), or the one the backend serves
    /// ("float32" on the CPU, "bfloat16" on CUDA); "bfloat16", "float16" and "float32" parse,
    /// and a value the backend does not serve is refused at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DtypeChoice>,
    /// GPU indices; defaults to the `tp` GPUs with the most free memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
    /// "deepseek_r1", "qwen3" or "none"; detected from the chat template when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_parser: Option<ReasoningParser>,
}

impl ModelConfig {
    /// The name clients use: `name`, else the repo or folder name of `source`.
    pub fn served_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| default_served_name(&self.source))
    }

    /// The same request as `llmctl load` would send.
    pub fn to_load_params(&self) -> llmd_proto::LoadParams {
        llmd_proto::LoadParams {
            source: self.source.clone(),
            name: Some(self.served_name()),
            tp: self.tp,
            gpus: self.gpus.clone(),
            max_model_len: self.max_model_len,
            dtype: self.dtype,
            revision: None,
        }
    }
}

/// The repo or folder name of a model source: `hf:Qwen/Qwen3-0.6B@main` → `Qwen3-0.6B`.
pub fn default_served_name(source: &str) -> String {
    let s = source.strip_prefix("hf:").or_else(|| source.strip_prefix("ms:")).unwrap_or(source);
    let s = if s.starts_with('/') || s.starts_with('.') { s } else { s.split('@').next().unwrap_or(s) };
    let s = s.trim_end_matches('/');
    s.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or(s).to_string()
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    /// journald when started by systemd with stderr on the journal, else stderr.
    Auto,
    Journald,
    Stderr,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "error", "warn", "info", "debug", "trace", or a filter such as "info,llmd=debug". Reloaded on SIGHUP.
    pub level: String,
    /// "auto", "journald" or "stderr".
    pub target: LogTarget,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), target: LogTarget::Auto }
    }
}

/// A config that cannot be used. Always names the key (or variable) and, for the file, the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}{}: {}{message}", line_suffix(*line), key.as_ref().map(|k| format!("`{k}`: ")).unwrap_or_default())]
    Parse { path: PathBuf, line: Option<usize>, key: Option<String>, message: String },
    #[error("{}`{key}` {message}", location(path.as_deref(), *line))]
    Invalid { path: Option<PathBuf>, line: Option<usize>, key: String, message: String },
    #[error("environment variable {var}={value:?}: {message}")]
    Env { var: &'static str, value: String, message: String },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" line {l}")).unwrap_or_default()
}

fn location(path: Option<&Path>, line: Option<usize>) -> String {
    match (path, line) {
        (Some(p), Some(l)) => format!("{} line {l}: ", p.display()),
        (Some(p), None) => format!("{}: ", p.display()),
        _ => String::new(),
    }
}

/// Where the config file comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// `--config` or `LLMD_CONFIG`: must exist.
    Explicit(PathBuf),
    /// The default path: used when present, defaults otherwise.
    Default(PathBuf),
    /// `--dev` without a path: defaults only.
    None,
}

impl ConfigSource {
    /// Applies the precedence flag > `LLMD_CONFIG` > default path (none in `--dev`).
    pub fn resolve(flag: Option<PathBuf>, env: &Env, dev: bool) -> ConfigSource {
        match flag.or_else(|| env.llmd_config.clone()) {
            Some(p) => ConfigSource::Explicit(p),
            None if dev => ConfigSource::None,
            None => ConfigSource::Default(PathBuf::from(DEFAULT_CONFIG_PATH)),
        }
    }
}

/// The effective configuration: the file merged with the environment and the mode, validated,
/// plus what the environment alone provides (tokens, extra directories).
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The file that was read, if any (re-read on SIGHUP).
    pub path: Option<PathBuf>,
    pub dev: bool,
    /// `server.api_keys` plus the keys of `server.api_key_file`.
    pub api_keys: Vec<Secret>,
    pub hf_token: Option<Secret>,
    pub modelscope_cache: PathBuf,
    /// Scratch space (systemd CacheDirectory, else `~/.cache/llmd` in dev, else /var/cache/llmd).
    pub cache_dir: PathBuf,
    /// Things worth a log line once logging is up (which file was read, fallbacks taken).
    pub notes: Vec<String>,
}

impl Settings {
    /// Reads and validates the configuration. `dev` is the `--dev` flag.
    pub fn load(source: &ConfigSource, dev: bool, env: &Env) -> Result<Settings, ConfigError> {
        let mut notes = Vec::new();
        let (text, path) = match source {
            ConfigSource::Explicit(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read { path: p.clone(), source: e })?;
                (Some(text), Some(p.clone()))
            }
            ConfigSource::Default(p) => match std::fs::read_to_string(p) {
                Ok(text) => (Some(text), Some(p.clone())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    notes.push(format!("no config file at {}; using built-in defaults", p.display()));
                    (None, None)
                }
                Err(e) => return Err(ConfigError::Read { path: p.clone(), source: e }),
            },
            ConfigSource::None => (None, None),
        };
        if let Some(p) = &path {
            notes.push(format!("configuration read from {}", p.display()));
        }
        let text = text.unwrap_or_default();
        let file_path = path.clone().unwrap_or_else(|| PathBuf::from("<defaults>"));
        let config = parse(&text, &file_path)?;
        let present = Presence::of(&text);
        let mut config = apply_mode_defaults(config, &present, dev, env);
        apply_env(&mut config, env)?;
        if let Err(Invalid { key, message }) = config.validate() {
            let line = path.as_ref().and_then(|_| line_of_key(&text, &key));
            return Err(ConfigError::Invalid { path, line, key, message });
        }
        let mut api_keys = config.server.api_keys.clone();
        if let Some(file) = &config.server.api_key_file {
            api_keys.extend(read_api_key_file(file).map_err(|message| ConfigError::Invalid {
                path: path.clone(),
                line: path.as_ref().and_then(|_| line_of_key(&text, "server.api_key_file")),
                key: "server.api_key_file".into(),
                message,
            })?);
        }
        let hf_token = env.hf_token.clone().or_else(|| read_token_file(env, &mut notes));
        let modelscope_cache =
            env.modelscope_cache.clone().unwrap_or_else(|| config.storage.models_dir.join("modelscope"));
        let cache_dir = match (&env.cache_directory, dev, &env.home) {
            (Some(d), _, _) => d.clone(),
            (None, true, Some(home)) => home.join(".cache/llmd"),
            (None, true, None) => std::env::temp_dir().join("llmd-cache"),
            (None, false, _) => PathBuf::from("/var/cache/llmd"),
        };
        Ok(Settings { config, path, dev, api_keys, hf_token, modelscope_cache, cache_dir, notes })
    }

    /// The effective config as TOML (what `--print-config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.config).unwrap_or_else(|e| format!("# cannot serialize config: {e}\n"))
    }
}

/// Parses the file text into a [`Config`], turning toml/serde errors into [`ConfigError::Parse`]
/// with the line and, where it can be found, the key.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    toml::from_str::<Config>(text).map_err(|e| {
        let span = e.span();
        let line = span.as_ref().map(|s| line_number(text, s.start));
        let key = span.as_ref().and_then(|s| key_at(text, s.clone()));
        ConfigError::Parse { path: path.to_path_buf(), line, key, message: e.message().trim().to_string() }
    })
}

/// A validation failure: the dotted key (e.g. `models[1].tp`) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { key: key.into(), message: message.into() }
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(key: &str, v: T, min: T, max: T) -> Result<(), Invalid> {
    if v < min || v > max {
        return Err(invalid(key, format!("= {v} is out of range: must be between {min} and {max}")));
    }
    Ok(())
}

fn check_url(key: &str, v: &str) -> Result<(), Invalid> {
    if !(v.starts_with("http://") || v.starts_with("https://")) || v.len() < 9 || v.contains(char::is_whitespace) {
        return Err(invalid(key, format!("= {v:?} is not a URL: must start with http:// or https://")));
    }
    Ok(())
}

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes with the final NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Config {
    /// Checks every value against its limits. The first failure is returned.
    pub fn validate(&self) -> Result<(), Invalid> {
        let s = &self.server;
        for (i, k) in s.api_keys.iter().enumerate() {
            // Never echo the key itself: the error goes to the journal.
            if k.is_empty() || k.expose().contains(char::is_whitespace) || k.expose().len() > 1024 {
                return Err(invalid(
                    format!("server.api_keys[{i}]"),
                    "must be 1 to 1024 characters without whitespace (value not shown)",
                ));
            }
        }
        for (i, o) in s.allowed_origins.iter().enumerate() {
            if o != "*" {
                check_url(&format!("server.allowed_origins[{i}]"), o)?;
            }
        }
        check_range("server.max_body_bytes", s.max_body_bytes, 1024, 1 << 30)?;
        check_range("server.shutdown_timeout_secs", s.shutdown_timeout_secs, 0, 3600)?;

        let c = &self.control;
        if !c.socket.is_absolute() {
            return Err(invalid("control.socket", format!("= {:?} must be an absolute path", c.socket)));
        }
        if c.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "control.socket",
                format!(
                    "= {:?} is {} bytes long: a Unix socket path may be at most {MAX_SOCKET_PATH}",
                    c.socket,
                    c.socket.as_os_str().len()
                ),
            ));
        }
        if c.group.is_empty()
            || c.group.len() > 32
            || !c.group.chars().all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch))
        {
            return Err(invalid(
                "control.group",
                format!("= {:?} is not a valid group name (1-32 of [A-Za-z0-9_.-])", c.group),
            ));
        }
        check_range("control.max_connections", c.max_connections, 1, 4096)?;
        check_range("control.idle_timeout_secs", c.idle_timeout_secs, 1, 86_400)?;

        let st = &self.storage;
        if !st.models_dir.is_absolute() {
            return Err(invalid("storage.models_dir", format!("= {:?} must be an absolute path", st.models_dir)));
        }
        check_url("storage.hf_endpoint", &st.hf_endpoint)?;
        check_url("storage.modelscope_endpoint", &st.modelscope_endpoint)?;
        check_range("storage.max_concurrent_downloads", st.max_concurrent_downloads, 1, 64)?;

        let e = &self.engine;
        if !(e.gpu_memory_utilization > 0.0 && e.gpu_memory_utilization <= 1.0) {
            return Err(invalid(
                "engine.gpu_memory_utilization",
                format!("= {} is out of range: must be > 0 and <= 1", e.gpu_memory_utilization),
            ));
        }
        check_range("engine.max_num_seqs", e.max_num_seqs, 1, 65_536)?;
        check_range("engine.max_num_batched_tokens", e.max_num_batched_tokens, 1, 1 << 20)?;
        if e.max_num_batched_tokens < e.max_num_seqs {
            return Err(invalid(
                "engine.max_num_batched_tokens",
                format!(
                    "= {} must be at least engine.max_num_seqs ({}): every running sequence needs one token per step",
                    e.max_num_batched_tokens, e.max_num_seqs
                ),
            ));
        }
        check_range("engine.cpu_kv_cache_bytes", e.cpu_kv_cache_bytes, 1 << 20, 1 << 50)?;
        if ![8, 16, 32, 64, 128].contains(&e.block_size) {
            return Err(invalid("engine.block_size", format!("= {} must be one of 8, 16, 32, 64, 128", e.block_size)));
        }
        check_range("engine.max_queue", e.max_queue, 1, 1_000_000)?;

        let mut names: Vec<(String, usize)> = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if m.source.trim().is_empty() {
                return Err(invalid(key("source"), "must not be empty"));
            }
            let name = m.served_name();
            if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                return Err(invalid(key("name"), format!("= {name:?} must be 1 to 256 printable characters")));
            }
            if let Some((_, j)) = names.iter().find(|(n, _)| *n == name) {
                return Err(invalid(
                    key("name"),
                    format!("= {name:?} is already used by models[{j}]; served names must be unique"),
                ));
            }
            names.push((name, i));
            if let Some(tp) = m.tp {
                check_range(&key("tp"), tp, 1, 64)?;
            }
            if let Some(gpus) = &m.gpus {
                let tp = m.tp.unwrap_or(1) as usize;
                if gpus.len() != tp {
                    return Err(invalid(
                        key("gpus"),
                        format!("lists {} GPUs but tp is {tp}: give exactly tp indices", gpus.len()),
                    ));
                }
                let mut sorted = gpus.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != gpus.len() {
                    return Err(invalid(key("gpus"), format!("= {gpus:?} lists a GPU twice")));
                }
            }
            if let Some(len) = m.max_model_len {
                check_range(&key("max_model_len"), len, 1, 1 << 24)?;
            }
        }

        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("= {:?} is not a log filter ({e}); use error, warn, info, debug or trace", self.log.level),
            ));
        }
        Ok(())
    }
}

/// Which keys the file sets, so mode defaults fill only the others.
struct Presence {
    table: Option<toml::Table>,
}

impl Presence {
    fn of(text: &str) -> Presence {
        Presence { table: text.parse::<toml::Table>().ok() }
    }

    fn has(&self, section: &str, key: &str) -> bool {
        self.table.as_ref().and_then(|t| t.get(section)).and_then(|s| s.as_table()).is_some_and(|s| s.contains_key(key))
    }
}

/// Defaults that depend on `--dev` and on the systemd directories, for keys the file leaves unset.
fn apply_mode_defaults(mut config: Config, present: &Presence, dev: bool, env: &Env) -> Config {
    if !present.has("control", "socket") {
        if dev {
            let base = env.xdg_runtime_dir.clone().unwrap_or_else(dev_fallback_runtime_dir);
            config.control.socket = base.join("llmd").join("llmd.sock");
        } else if let Some(dir) = &env.runtime_directory {
            config.control.socket = dir.join("llmd.sock");
        }
    }
    if !present.has("storage", "models_dir") {
        if dev {
            let data = env
                .xdg_data_home
                .clone()
                .or_else(|| env.home.as_ref().map(|h| h.join(".local/share")))
                .unwrap_or_else(std::env::temp_dir);
            config.storage.models_dir = data.join("llmd").join("models");
        } else if let Some(dir) = &env.state_directory {
            config.storage.models_dir = dir.join("models");
        }
    }
    if dev && !present.has("control", "dbus") {
        config.control.dbus = DbusBus::Session;
    }
    if dev && !present.has("server", "listen") {
        config.server.listen = SocketAddr::from(([127, 0, 0, 1], 8000));
    }
    config
}

/// `--dev` without XDG_RUNTIME_DIR: a per-user folder under the temp dir.
fn dev_fallback_runtime_dir() -> PathBuf {
    std::env::temp_dir().join(format!("llmd-{}", nix::unistd::getuid()))
}

fn apply_env(config: &mut Config, env: &Env) -> Result<(), ConfigError> {
    if let Some(s) = &env.llmd_socket {
        config.control.socket = s.clone();
    }
    if let Some(dir) = &env.hf_hub_cache {
        config.storage.models_dir = dir.clone();
    } else if let Some(home) = &env.hf_home {
        config.storage.models_dir = home.join("hub");
    }
    if let Some(ep) = &env.hf_endpoint {
        config.storage.hf_endpoint = ep.trim_end_matches('/').to_string();
    }
    if let Some(domain) = &env.modelscope_domain {
        config.storage.modelscope_endpoint = if domain.contains("://") {
            domain.trim_end_matches('/').to_string()
        } else {
            format!("https://{}", domain.trim_end_matches('/'))
        };
    }
    if let Some(v) = &env.hf_hub_offline {
        config.storage.offline = match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => {
                return Err(ConfigError::Env {
                    var: "HF_HUB_OFFLINE",
                    value: v.clone(),
                    message: "must be 1/true/yes/on or 0/false/no/off".into(),
                });
            }
        };
    }
    Ok(())
}

fn read_api_key_file(path: &Path) -> Result<Vec<Secret>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("= {:?} cannot be read: {e}", path))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains(char::is_whitespace) || line.len() > 1024 {
            return Err(format!(
                "= {:?}: line {} is not a key (1 to 1024 characters without whitespace; value not shown)",
                path,
                i + 1
            ));
        }
        keys.push(Secret::new(line));
    }
    Ok(keys)
}

/// The Hugging Face token file: HF_TOKEN_PATH, else $HF_HOME/token, else ~/.cache/huggingface/token.
fn read_token_file(env: &Env, notes: &mut Vec<String>) -> Option<Secret> {
    let explicit = env.hf_token_path.is_some();
    let path = env
        .hf_token_path
        .clone()
        .or_else(|| env.hf_home.as_ref().map(|h| h.join("token")))
        .or_else(|| env.home.as_ref().map(|h| h.join(".cache/huggingface/token")))?;
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            notes.push(format!("Hugging Face token read from {}", path.display()));
            Some(Secret::new(t.trim()))
        }
        Ok(_) => None,
        Err(e) => {
            if explicit {
                notes.push(format!("HF_TOKEN_PATH={} cannot be read: {e}", path.display()));
            }
            None
        }
    }
}

/// 1-based line of byte offset `at`.
pub fn line_number(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The dotted key whose key or value covers `span`, e.g. `engine.max_num_seqs`.
fn key_at(text: &str, span: Range<usize>) -> Option<String> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut path = String::new();
    walk_table(root.get_ref(), span.start, &mut path).then_some(path)
}

fn walk_table(table: &toml::de::DeTable<'_>, at: usize, path: &mut String) -> bool {
    for (k, v) in table.iter() {
        let covers_key = k.span().contains(&at);
        let covers_value = v.span().contains(&at) || v.span().start == at;
        if covers_key || covers_value {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k.get_ref());
            if covers_value && !covers_key {
                walk_value(v.get_ref(), at, path);
            }
            return true;
        }
        // A table header (`[engine]`) spans only the header; its keys lie after it.
        if let Some(t) = v.get_ref().as_table() {
            let mut sub = path.clone();
            if !sub.is_empty() {
                sub.push('.');
            }
            sub.push_str(k.get_ref());
            if walk_table(t, at, &mut sub) {
                *path = sub;
                return true;
            }
        }
        if let Some(arr) = v.get_ref().as_array() {
            for (i, item) in arr.iter().enumerate() {
                if let Some(t) = item.get_ref().as_table() {
                    let mut sub = format!("{}{}{}[{i}]", path, if path.is_empty() { "" } else { "." }, k.get_ref());
                    if walk_table(t, at, &mut sub) {
                        *path = sub;
                        return true;
                    }
                }
            }
        }
    }
    false
}

fn walk_value(v: &toml::de::DeValue<'_>, at: usize, path: &mut String) {
    if let Some(t) = v.as_table() {
        let mut sub = path.clone();
        if walk_table(t, at, &mut sub) {
            *path = sub;
        }
    } else if let Some(arr) = v.as_array() {
        for (i, item) in arr.iter().enumerate() {
            if item.span().contains(&at) {
                path.push_str(&format!("[{i}]"));
                walk_value(item.get_ref(), at, path);
                return;
            }
        }
    }
}

/// Line of a dotted key such as `engine.block_size` or `models[1].tp` in `text`, if the file sets it.
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == name)?;
        let mut value = v;
        if let Some(i) = index {
            value = value.get_ref().as_array()?.get(i)?;
            if parts.peek().is_none() {
                return Some(line_number(text, value.span().start));
            }
        }
        if parts.peek().is_none() {
            return Some(line_number(text, k.span().start));
        }
        table = value.get_ref().as_table()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("llmd.toml");
        std::fs::write(&p, text).unwrap();
        Settings::load(&ConfigSource::Explicit(p), false, &Env::default())
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = load_text("[server]\nlisten = \"127.0.0.1:1\"\n\n[engine]\nmax_num_seqz = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("max_num_seqz"), "{msg}");
    }

    #[test]
    fn type_error_names_key_and_line() {
        let err = load_text("[engine]\nblock_size = 16\nmax_num_seqs = \"lots\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("engine.max_num_seqs"), "{msg}");
    }

    #[test]
    fn typed_options_name_key_line_and_accepted_values() {
        let err =
            load_text("[[models]]\nsource = \"/a\"\n\n[[models]]\nsource = \"/b\"\ndtype = \"fp8\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 6") && msg.contains("models[1].dtype"), "{msg}");
        assert!(
            msg.contains("`fp8` is not a valid dtype (expected one of: auto, bfloat16, float16, float32)"),
            "{msg}"
        );
        let err = load_text("[engine]\ndevice = \"tpu\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 2") && msg.contains("engine.device") && msg.contains("auto, cpu, cuda"), "{msg}");
        let err = load_text("[[models]]\nsource = \"/a\"\nreasoning_parser = \"r1\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("deepseek_r1, qwen3, none"), "{msg}");
        let ok = load_text("[engine]\ndevice = \"cpu\"\n[[models]]\nsource = \"/a\"\ndtype = \"float32\"\n").unwrap();
        assert_eq!(ok.config.engine.device, Device::Cpu);
        assert_eq!(ok.config.models[0].dtype, Some(DtypeChoice::Fixed(llmd_options::Dtype::Float32)));
        assert_eq!(ok.config.models[0].to_load_params().dtype, ok.config.models[0].dtype);
    }

    #[test]
    fn out_of_range_names_key_value_limit_and_line() {
        let err = load_text("[engine]\n\ngpu_memory_utilization = 1.5\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("line 3") && msg.contains("engine.gpu_memory_utilization") && msg.contains("1.5"),
            "{msg}"
        );
        assert!(msg.contains("<= 1"), "{msg}");

        let err = load_text("[[models]]\nsource = \"/a\"\n\n[[models]]\nsource = \"/b\"\ntp = 0\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("models[1].tp") && msg.contains("line 6"), "{msg}");
    }

    #[test]
    fn duplicate_served_names_are_refused() {
        let err =
            load_text("[[models]]\nsource = \"hf:Qwen/Qwen3-0.6B\"\n[[models]]\nsource = \"/models/Qwen3-0.6B\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("models[1].name"), "{err}");
    }

    #[test]
    fn served_names() {
        assert_eq!(default_served_name("hf:Qwen/Qwen3-0.6B@main"), "Qwen3-0.6B");
        assert_eq!(default_served_name("ms:org/name"), "name");
        assert_eq!(default_served_name("/srv/models/tiny/"), "tiny");
        assert_eq!(default_served_name("org/name"), "name");
    }

    #[test]
    fn env_overrides_file_and_dev_changes_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("llmd.toml");
        std::fs::write(&p, "[storage]\nhf_endpoint = \"https://example.org\"\n").unwrap();
        let env = Env {
            hf_endpoint: Some("https://hf-mirror.com/".into()),
            hf_hub_offline: Some("1".into()),
            xdg_runtime_dir: Some("/run/user/1000".into()),
            home: Some("/home/u".into()),
            ..Env::default()
        };
        let s = Settings::load(&ConfigSource::Explicit(p), true, &env).unwrap();
        assert_eq!(s.config.storage.hf_endpoint, "https://hf-mirror.com");
        assert!(s.config.storage.offline);
        assert_eq!(s.config.control.socket, PathBuf::from("/run/user/1000/llmd/llmd.sock"));
        assert_eq!(s.config.storage.models_dir, PathBuf::from("/home/u/.local/share/llmd/models"));
        assert_eq!(s.config.control.dbus, DbusBus::Session);

        let bad = Env { hf_hub_offline: Some("maybe".into()), ..Env::default() };
        let err = Settings::load(&ConfigSource::None, true, &bad).unwrap_err();
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn systemd_directories_shape_defaults_but_file_wins() {
        let env = Env {
            runtime_directory: Some("/run/llmd2".into()),
            state_directory: Some("/var/lib/llmd2".into()),
            ..Env::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("llmd.toml");
        std::fs::write(&p, "[control]\nsocket = \"/tmp/x.sock\"\n").unwrap();
        let s = Settings::load(&ConfigSource::Explicit(p), false, &env).unwrap();
        assert_eq!(s.config.control.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(s.config.storage.models_dir, PathBuf::from("/var/lib/llmd2/models"));
    }

    #[test]
    fn api_key_file_is_read_and_secret() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# comment\nsk-one\n\nsk-two\n").unwrap();
        let p = dir.path().join("llmd.toml");
        std::fs::write(&p, format!("[server]\napi_keys = [\"sk-zero\"]\napi_key_file = {:?}\n", keys)).unwrap();
        let s = Settings::load(&ConfigSource::Explicit(p), false, &Env::default()).unwrap();
        let exposed: Vec<_> = s.api_keys.iter().map(|k| k.expose().to_string()).collect();
        assert_eq!(exposed, ["sk-zero", "sk-one", "sk-two"]);
        assert!(!format!("{s:?}").contains("sk-one"));
    }

    #[test]
    fn missing_explicit_file_is_an_error_missing_default_is_not() {
        let err = Settings::load(&ConfigSource::Explicit("/nonexistent/llmd.toml".into()), false, &Env::default());
        assert!(matches!(err, Err(ConfigError::Read { .. })));
        let s =
            Settings::load(&ConfigSource::Default("/nonexistent/llmd.toml".into()), false, &Env::default()).unwrap();
        assert!(s.path.is_none());
    }

    #[test]
    fn bad_socket_path_length() {
        let long = format!("/tmp/{}", "s".repeat(120));
        let err = load_text(&format!("[control]\nsocket = {long:?}\n")).unwrap_err();
        assert!(err.to_string().contains("control.socket") && err.to_string().contains("107"), "{err}");
    }
}

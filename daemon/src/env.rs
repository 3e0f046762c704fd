//! The one module that reads environment variables.
//!
//! Everything the daemon takes from its environment is read once, here, into [`Env`]; the
//! rest of the daemon receives values, never calls `std::env::var`. [`VARS`] is the table of
//! every variable with its meaning; `docs/config.md` repeats it and a test keeps them in line.
//!
//! Precedence: command-line flags > environment > config file > built-in defaults
//! (`--dev` changes only the built-in defaults).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::secret::Secret;

/// Every environment variable llmd reads, with what it does.
pub const VARS: &[(&str, &str)] = &[
    ("LLMD_CONFIG", "config file path when `--config` is not given (default /etc/llmd/llmd.toml)"),
    ("LLMD_SOCKET", "control socket path; overrides `control.socket` (llmctl reads it too)"),
    ("HF_HOME", "Hugging Face home: `$HF_HOME/hub` becomes `storage.models_dir`, `$HF_HOME/token` the token file"),
    ("HF_HUB_CACHE", "Hugging Face hub cache; overrides `storage.models_dir` (wins over HF_HOME)"),
    ("HF_ENDPOINT", "Hugging Face endpoint or mirror; overrides `storage.hf_endpoint`"),
    ("HF_TOKEN", "Hugging Face access token for gated repos (never logged)"),
    (
        "HF_TOKEN_PATH",
        "file holding the Hugging Face token (default `$HF_HOME/token`, else ~/.cache/huggingface/token)",
    ),
    ("HF_HUB_OFFLINE", "`1`/`true`: use the local cache only; overrides `storage.offline`"),
    ("MODELSCOPE_CACHE", "ModelScope cache folder (default: `storage.models_dir`/modelscope)"),
    ("MODELSCOPE_DOMAIN", "ModelScope host or URL; overrides `storage.modelscope_endpoint`"),
    ("RUNTIME_DIRECTORY", "set by systemd (RuntimeDirectory=): the control socket goes there"),
    ("STATE_DIRECTORY", "set by systemd (StateDirectory=): models are stored under `$STATE_DIRECTORY/models`"),
    ("CACHE_DIRECTORY", "set by systemd (CacheDirectory=): scratch space for downloads"),
    ("XDG_RUNTIME_DIR", "`--dev`: the control socket goes to `$XDG_RUNTIME_DIR/llmd/`"),
    ("XDG_DATA_HOME", "`--dev`: state goes to `$XDG_DATA_HOME/llmd` (default ~/.local/share/llmd)"),
    ("HOME", "`--dev`: base of ~/.local/share/llmd and ~/.cache/huggingface"),
    ("NOTIFY_SOCKET", "set by systemd (Type=notify): where READY=1, STATUS=, WATCHDOG=1 go (read by sd-notify)"),
    (
        "WATCHDOG_USEC",
        "set by systemd (WatchdogSec=): watchdog period; llmd pings every half of it (read by sd-notify)",
    ),
    ("JOURNAL_STREAM", "set by systemd when stderr is the journal: logs go to journald with structured fields"),
    ("DBUS_SYSTEM_BUS_ADDRESS", "address of the system bus (default unix:path=/run/dbus/system_bus_socket)"),
    ("DBUS_SESSION_BUS_ADDRESS", "address of the session bus (`control.dbus = \"session\"`, `--dev`)"),
];

/// What llmd sets in its own environment at start, for libraries it loads: CUDA numbers GPUs
/// fastest-first by default, NVML by PCI bus id; `PCI_BUS_ID` makes the two agree, so a GPU
/// index means the same GPU in `llmctl gpus`, placement and the CUDA engine. A value the
/// service already has (e.g. from the unit's `Environment=`) is kept.
pub const SET_VARS: &[(&str, &str)] = &[("CUDA_DEVICE_ORDER", "PCI_BUS_ID")];

/// Applies [`SET_VARS`]. Call first thing in `main`, before any thread starts.
pub fn set_process_defaults() {
    for (name, value) in SET_VARS {
        if std::env::var_os(name).is_none() {
            // SAFETY: called at the top of `main`, before the tokio runtime, the logging
            // subscriber, NVML's XID thread or any other thread exists, so nothing can read
            // the environment concurrently.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// A snapshot of the environment variables in [`VARS`] (empty strings count as unset).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub llmd_config: Option<PathBuf>,
    pub llmd_socket: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_endpoint: Option<String>,
    pub hf_token: Option<Secret>,
    pub hf_token_path: Option<PathBuf>,
    /// Raw value of HF_HUB_OFFLINE; parsed (with an error naming the variable) by the config loader.
    pub hf_hub_offline: Option<String>,
    pub modelscope_cache: Option<PathBuf>,
    pub modelscope_domain: Option<String>,
    pub runtime_directory: Option<PathBuf>,
    pub state_directory: Option<PathBuf>,
    pub cache_directory: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub xdg_data_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
    pub notify_socket: bool,
    pub watchdog_usec: Option<u64>,
    pub journal_stream: bool,
    pub dbus_system_bus_address: Option<String>,
    pub dbus_session_bus_address: Option<String>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Env {
        Env::from_lookup(|name| std::env::var_os(name))
    }

    /// Builds an [`Env`] from any lookup function (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Env {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let path = |name: &str| get(name).map(PathBuf::from);
        let string = |name: &str| get(name).map(|v| v.to_string_lossy().into_owned());
        // systemd passes several directories colon-separated when the unit lists several;
        // llmd's unit lists one, and the first is the one that belongs to us.
        let first_dir =
            |name: &str| string(name).and_then(|v| v.split(':').next().filter(|s| !s.is_empty()).map(PathBuf::from));
        Env {
            llmd_config: path("LLMD_CONFIG"),
            llmd_socket: path("LLMD_SOCKET"),
            hf_home: path("HF_HOME"),
            hf_hub_cache: path("HF_HUB_CACHE"),
            hf_endpoint: string("HF_ENDPOINT"),
            hf_token: string("HF_TOKEN").map(|t| Secret::new(t.trim())),
            hf_token_path: path("HF_TOKEN_PATH"),
            hf_hub_offline: string("HF_HUB_OFFLINE"),
            modelscope_cache: path("MODELSCOPE_CACHE"),
            modelscope_domain: string("MODELSCOPE_DOMAIN"),
            runtime_directory: first_dir("RUNTIME_DIRECTORY"),
            state_directory: first_dir("STATE_DIRECTORY"),
            cache_directory: first_dir("CACHE_DIRECTORY"),
            xdg_runtime_dir: path("XDG_RUNTIME_DIR"),
            xdg_data_home: path("XDG_DATA_HOME"),
            home: path("HOME"),
            notify_socket: get("NOTIFY_SOCKET").is_some(),
            watchdog_usec: string("WATCHDOG_USEC").and_then(|v| v.trim().parse().ok()),
            journal_stream: get("JOURNAL_STREAM").is_some(),
            dbus_system_bus_address: string("DBUS_SYSTEM_BUS_ADDRESS"),
            dbus_session_bus_address: string("DBUS_SESSION_BUS_ADDRESS"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn reads_and_treats_empty_as_unset() {
        let map: HashMap<&str, &str> = [
            ("HF_TOKEN", " hf_abc \n"),
            ("RUNTIME_DIRECTORY", "/run/llmd:/run/other"),
            ("HF_ENDPOINT", ""),
            ("WATCHDOG_USEC", "20000000"),
        ]
        .into_iter()
        .collect();
        let env = Env::from_lookup(|k| map.get(k).map(OsString::from));
        assert_eq!(env.hf_token.unwrap().expose(), "hf_abc");
        assert_eq!(env.runtime_directory, Some(PathBuf::from("/run/llmd")));
        assert_eq!(env.hf_endpoint, None);
        assert_eq!(env.watchdog_usec, Some(20_000_000));
        assert!(!env.journal_stream);
    }

    #[test]
    fn table_has_no_duplicates() {
        let mut names: Vec<_> = VARS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), VARS.len());
    }
}

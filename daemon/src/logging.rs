//! Logging: journald with structured fields under systemd, human-readable stderr otherwise;
//! the level filter can be swapped at run time (SIGHUP).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogTarget};

/// Changes the level filter of the running subscriber.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    /// Where logs actually go ("journald" or "stderr"), for the start-up line.
    pub target: &'static str,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle").field("target", &self.target).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("`log.level` = {level:?} is not a log filter: {message}")]
    BadLevel { level: String, message: String },
    #[error("`log.target` = \"journald\" but journald is not reachable: {0}")]
    Journald(#[source] std::io::Error),
    #[error("cannot change the log level: {0}")]
    Reload(String),
    #[error("a logger is already installed")]
    AlreadyInstalled,
}

fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| LogError::BadLevel { level: level.to_string(), message: e.to_string() })
}

/// Installs the global subscriber. `journal_stream` is whether `JOURNAL_STREAM` is set.
pub fn init(cfg: &LogConfig, journal_stream: bool) -> Result<LogHandle, LogError> {
    let (filter_layer, handle) = reload::Layer::new(filter(&cfg.level)?);
    let use_journald = match cfg.target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => journal_stream,
    };
    let journald = if use_journald {
        match tracing_journald::layer() {
            Ok(layer) => Some(layer.with_syslog_identifier("llmd".into())),
            Err(e) if cfg.target == LogTarget::Journald => return Err(LogError::Journald(e)),
            // Auto: stderr is the journal anyway, so plain lines still land there.
            Err(_) => None,
        }
    } else {
        None
    };
    let target = if journald.is_some() { "journald" } else { "stderr" };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false).with_target(false).boxed()
    });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(journald)
        .with(stderr)
        .try_init()
        .map_err(|_| LogError::AlreadyInstalled)?;
    Ok(LogHandle { filter: handle, target })
}

impl LogHandle {
    /// Replaces the level filter (SIGHUP).
    pub fn set_level(&self, level: &str) -> Result<(), LogError> {
        let f = filter(level)?;
        self.filter.reload(f).map_err(|e| LogError::Reload(e.to_string()))
    }
}

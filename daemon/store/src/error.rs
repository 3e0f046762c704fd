//! The store's error type and its mapping onto control-protocol error codes.

use std::path::PathBuf;
use std::sync::Arc;

use llmd_proto::ErrorCode;

/// Everything that can go wrong in the store. `Clone` because one pull's outcome is handed to
/// every caller that joined it; the non-clonable sources sit behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The model reference, revision, glob or file name given by the caller is malformed.
    #[error("invalid model reference: {0}")]
    InvalidRef(String),
    /// A glob of `--include`/`--exclude` does not parse.
    #[error("invalid glob `{glob}`: {message}")]
    InvalidGlob { glob: String, message: String },
    /// The hub says the repository, revision or file does not exist, or the store has no such model.
    #[error("{0}")]
    NotFound(String),
    /// The hub refused access: a gated or private repository, or a refused token.
    #[error("{0}")]
    Gated(String),
    /// Offline mode is on and the model is not complete in the cache.
    #[error(
        "`{model}` is not in the local cache and offline mode is on (storage.offline / HF_HUB_OFFLINE=1); \
         pull it while online first"
    )]
    Offline { model: String },
    /// Not enough free disk space for the files still to download.
    #[error(
        "not enough disk space in {}: {missing} bytes still to download need {needed} bytes free \
         (5% margin + {reserve} bytes reserve), only {free} bytes are free",
        path.display()
    )]
    InsufficientDisk { path: PathBuf, missing: u64, needed: u64, free: u64, reserve: u64 },
    /// The hub answered with an unexpected HTTP status (after retries for transient ones).
    #[error("{url}: HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Http { url: String, status: u16, detail: String },
    /// The connection failed or dropped (after retries).
    #[error("{url}: {source}")]
    Network {
        url: String,
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// The hub's answer is not what the protocol says (bad JSON, missing header, unsafe names).
    #[error("unexpected answer from the hub: {0}")]
    Protocol(String),
    /// A downloaded file kept failing its hash check.
    #[error("{file}: {algo} mismatch after {attempts} attempts (expected {expected}, got {actual})")]
    HashMismatch { file: String, algo: &'static str, expected: String, actual: String, attempts: u32 },
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The model is busy (a pull of it is running).
    #[error("{0}")]
    Busy(String),
    /// The operation was cancelled.
    #[error("operation {0} was cancelled")]
    Cancelled(String),
    /// The caller's check refused the model after its metadata files were fetched, before any
    /// weight file was (see `Store::pull_checked`); `code` is the check's own.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
}

impl StoreError {
    /// The control-protocol code for this error, so the daemon maps store errors in one place.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::InvalidRef(_) | StoreError::InvalidGlob { .. } => ErrorCode::InvalidArgument,
            StoreError::NotFound(_) | StoreError::Offline { .. } => ErrorCode::NotFound,
            // A hub refusal is about the daemon's credentials, not the caller's uid, but it is
            // still "you may not have this"; the message says to set HF_TOKEN.
            StoreError::Gated(_) => ErrorCode::PermissionDenied,
            StoreError::InsufficientDisk { .. } => ErrorCode::InsufficientResources,
            StoreError::Cancelled(_) => ErrorCode::Cancelled,
            StoreError::Refused { code, .. } => *code,
            StoreError::Busy(_) => ErrorCode::Conflict,
            StoreError::Http { .. }
            | StoreError::Network { .. }
            | StoreError::Protocol(_)
            | StoreError::HashMismatch { .. }
            | StoreError::Io { .. } => ErrorCode::Failed,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io { path: path.into(), source: Arc::new(source) }
    }

    pub(crate) fn network(url: impl Into<String>, source: reqwest::Error) -> Self {
        StoreError::Network { url: url.into(), source: Arc::new(source) }
    }
}

/// Adds the path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::io(path, e))
    }
}

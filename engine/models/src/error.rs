//! Errors of loading and running a model.

use std::path::PathBuf;

/// Why a model could not be loaded or a step could not run. Messages name the file, key or
/// tensor and the limit that was crossed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file (or the load options) is malformed; the message names the key.
    #[error("invalid {file}: {message}")]
    Config { file: String, message: String },
    /// `architectures[0]` is not in the registry ([`crate::spec::Architecture`]), which
    /// also supplies the list of supported names.
    #[error("unsupported architecture `{name}` (supported: {supported})")]
    UnknownArchitecture { name: String, supported: String },
    /// The model uses a feature the chosen backend cannot serve.
    #[error("{model} uses {feature}, which {backend} does not serve")]
    UnsupportedFeature { model: String, feature: String, backend: String },
    /// The model needs a tensor the checkpoint does not have.
    #[error("checkpoint is missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor's stored shape differs from what the config implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, actual: Vec<usize> },
    /// A tensor is stored in a dtype other than f32/f16/bf16.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    /// The load asked for a `dtype` the chosen backend does not compute in.
    #[error(
        "`dtype` = {requested} is not served by the {} backend (it computes in {serves}); use dtype = \"auto\" or \"{serves}\"",
        .backend.as_str().to_uppercase()
    )]
    UnservedDtype { requested: llmd_options::Dtype, backend: llmd_options::Backend, serves: llmd_options::Dtype },
    /// A safetensors file is truncated, corrupt or declares an oversized header.
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// The KV cache (or the weights) do not fit the given budget.
    #[error("not enough memory: {0}")]
    InsufficientMemory(String),
    /// The tensor backend failed.
    #[error("backend error: {0}")]
    Backend(String),
    /// A [`crate::runner::ForwardBatch`] is inconsistent; the message names the sequence and field.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Backend(e.to_string())
    }
}

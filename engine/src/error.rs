//! The engine's error type: one enum for load-time and run-time failures.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {file}: {message}")]
    Config { file: String, message: String },
    #[error("unsupported architecture `{0}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)")]
    UnknownArchitecture(String),
    #[error("checkpoint is missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("not enough memory: {0}")]
    InsufficientMemory(String),
    #[error(transparent)]
    InvalidParam(#[from] crate::request::InvalidParam),
    #[error("prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the model's max_model_len of {max_model_len}")]
    PromptTooLong { prompt_tokens: usize, max_tokens: u32, max_model_len: u32 },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("the queue of model `{model}` is full ({max_queue} waiting requests)")]
    QueueFull { model: String, max_queue: usize },
    #[error("model `{0}` is shutting down")]
    ShuttingDown(String),
    #[error("backend: {0}")]
    Backend(String),
}

impl From<crate::runner::RunnerError> for EngineError {
    fn from(e: crate::runner::RunnerError) -> Self {
        EngineError::Backend(e.to_string())
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Backend(e.to_string())
    }
}

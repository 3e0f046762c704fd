//! The engine's error type: load-time failures from the model and tokenizer sides, and
//! run-time refusals of a request.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] llmd_models::ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    InvalidParam(#[from] crate::request::InvalidParam),
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the model's max_model_len of {max_model_len}"
    )]
    PromptTooLong { prompt_tokens: usize, max_tokens: u32, max_model_len: u32 },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("the queue of model `{model}` is full ({max_queue} waiting requests)")]
    QueueFull { model: String, max_queue: usize },
    #[error("model `{0}` is shutting down")]
    ShuttingDown(String),
    /// A request validated against other limits than the model's: a bug in the caller.
    #[error(
        "the request was validated for max_model_len {} and a vocabulary of {} tokens, but model `{model}` allows max_model_len {} and {} tokens",
        .validated.max_model_len, .validated.vocab_size, .limits.max_model_len, .limits.vocab_size
    )]
    LooserLimits { model: String, validated: crate::request::RequestLimits, limits: crate::request::RequestLimits },
}

//! What goes into the engine (a validated generation request) and what comes out (events).
//!
//! The HTTP layer turns OpenAI JSON into a [`GenerateRequest`] and validates it, once, against
//! the model's [`RequestLimits`] ([`GenerateRequest::validate`]); only the resulting
//! [`ValidGenerateRequest`] reaches the engine. The engine answers on a
//! [`GenerationStream`](crate::GenerationStream) of [`GenerationEvent`]s.

use std::time::Duration;

use crate::error::EngineError;

/// Sampling and stopping parameters. Range-checked as part of [`GenerateRequest::validate`],
/// whose errors name the field and the limit.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0.0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// None disables top-k.
    pub top_k: Option<u32>,
    /// In [0, 1]; 0.0 disables min-p.
    pub min_p: f32,
    /// > 0; 1.0 disables. Applied to tokens in the prompt and the output (HF semantics).
    pub repetition_penalty: f32,
    /// In [-2, 2]; OpenAI semantics over output tokens.
    pub presence_penalty: f32,
    /// In [-2, 2]; OpenAI semantics over output tokens.
    pub frequency_penalty: f32,
    /// Same seed, same output, whatever else is in the batch.
    pub seed: Option<u64>,
    /// Most tokens to generate per choice.
    pub max_tokens: u32,
    /// EOS and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: u32,
    /// Generation stops when the text ends with one of these; the stop string is not returned.
    pub stop: Vec<String>,
    /// Extra token ids that stop generation (the model's EOS ids are always included unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// None: no logprobs. Some(k): the chosen token's logprob plus the k most likely (k <= 20).
    pub logprobs: Option<u32>,
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

/// Most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;

impl SamplingParams {
    /// Checks every range; the error names the field (OpenAI parameter name) and the limit.
    fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |param: &'static str, message: String| Err(InvalidParam { param, message });
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature.is_nan() {
            return bad("temperature", format!("`temperature` must be between 0 and 2, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("`top_p` must be > 0 and <= 1, got {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k", "`top_k` must be >= 1 (or -1 to disable), got 0".to_string());
        }
        if !(0.0..=1.0).contains(&self.min_p) || self.min_p.is_nan() {
            return bad("min_p", format!("`min_p` must be between 0 and 1, got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return bad(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0 and <= 10, got {}", self.repetition_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) || self.presence_penalty.is_nan() {
            return bad(
                "presence_penalty",
                format!("`presence_penalty` must be between -2 and 2, got {}", self.presence_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) || self.frequency_penalty.is_nan() {
            return bad(
                "frequency_penalty",
                format!("`frequency_penalty` must be between -2 and 2, got {}", self.frequency_penalty),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "`max_tokens` must be >= 1, got 0".to_string());
        }
        if self.min_tokens > self.max_tokens {
            return bad(
                "min_tokens",
                format!("`min_tokens` ({}) must be <= `max_tokens` ({})", self.min_tokens, self.max_tokens),
            );
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad("stop", format!("`stop` may hold at most {MAX_STOP_STRINGS} strings, got {}", self.stop.len()));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "`stop` strings must not be empty".to_string());
        }
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"));
        }
        Ok(())
    }
}

/// A parameter outside its range. `param` is the OpenAI field name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

/// Most choices per request.
pub const MAX_N: u32 = 16;

/// What a model accepts, for [`GenerateRequest::validate`]; a loaded model's come from
/// `EngineHandle::limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Longest prompt plus `max_tokens`, in tokens.
    pub max_model_len: u32,
    /// Token ids (prompt, `stop_token_ids`) must be below this: the smaller of the model's and
    /// the tokenizer's vocabularies.
    pub vocab_size: usize,
}

impl RequestLimits {
    /// Whether every request valid under `self` is also valid under `other`.
    pub fn within(self, other: RequestLimits) -> bool {
        self.max_model_len <= other.max_model_len && self.vocab_size <= other.vocab_size
    }
}

/// A request as its caller builds it: tokenized prompt and parameters, not checked yet. The
/// engine takes only the [`ValidGenerateRequest`] that [`GenerateRequest::validate`] makes of it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Used in logs and as the OpenAI `id`.
    pub request_id: String,
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// Number of choices (1..=[`MAX_N`]); choices share the prompt's KV blocks.
    pub n: u32,
}

impl GenerateRequest {
    /// Checks everything the engine relies on, once: the sampling ranges, `n` in
    /// 1..=[`MAX_N`], a non-empty prompt, prompt ids and `stop_token_ids` inside the
    /// vocabulary, prompt + `max_tokens` within `max_model_len`. Errors name the field and the
    /// limit.
    pub fn validate(self, limits: RequestLimits) -> Result<ValidGenerateRequest, EngineError> {
        self.sampling.validate()?;
        if self.n == 0 || self.n > MAX_N {
            return Err(InvalidParam {
                param: "n",
                message: format!("`n` must be between 1 and {MAX_N}, got {}", self.n),
            }
            .into());
        }
        if self.prompt_tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&token) = self.prompt_tokens.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(EngineError::TokenOutOfRange { token, vocab_size: limits.vocab_size });
        }
        if let Some(bad) = self.sampling.stop_token_ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(InvalidParam {
                param: "stop_token_ids",
                message: format!(
                    "`stop_token_ids` holds {bad}, outside the vocabulary of {} tokens",
                    limits.vocab_size
                ),
            }
            .into());
        }
        let max_model_len = limits.max_model_len;
        if self.prompt_tokens.len() as u64 + u64::from(self.sampling.max_tokens) > u64::from(max_model_len) {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: self.prompt_tokens.len(),
                max_tokens: self.sampling.max_tokens,
                max_model_len,
            });
        }
        Ok(ValidGenerateRequest { request: self, limits })
    }
}

/// A request that passed [`GenerateRequest::validate`], the only kind the engine takes. It
/// cannot be built or changed otherwise; it remembers the limits it was checked against so
/// that the engine can refuse one validated for a larger model.
#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    request: GenerateRequest,
    limits: RequestLimits,
}

impl ValidGenerateRequest {
    /// Used in logs and as the OpenAI `id`.
    pub fn request_id(&self) -> &str {
        &self.request.request_id
    }

    /// The prompt's token ids (not empty, inside the vocabulary).
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.request.prompt_tokens
    }

    /// The range-checked sampling and stopping parameters.
    pub fn sampling(&self) -> &SamplingParams {
        &self.request.sampling
    }

    /// Number of choices, in 1..=[`MAX_N`].
    pub fn n(&self) -> u32 {
        self.request.n
    }

    /// The limits it was validated against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// The request's parts, for the engine thread.
    pub(crate) fn into_inner(self) -> GenerateRequest {
        self.request
    }
}

/// Why a choice stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// The client went away or the request was cancelled.
    Abort,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string (and the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Log-probability of one token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    /// Decoded text of the token alone (may hold U+FFFD for a partial UTF-8 byte).
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Logprobs for one generated position: the chosen token and the `top` most likely ones.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// Events of one request, in order. Each choice (`index`) ends with exactly one `Finished`;
/// after all choices finished, one `Usage` closes the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// New text for choice `index`. `text` is complete UTF-8 and excludes held-back text that
    /// may be the start of a stop string; `token_ids` are the tokens it came from.
    Token { index: u32, token_ids: Vec<u32>, text: String, logprobs: Vec<PositionLogprobs> },
    /// Choice `index` is done; `text` is any held-back text released at the end.
    Finished { index: u32, reason: FinishReason, text: String, stop: Option<StopMatch> },
    /// Totals for the whole request; the last event.
    Usage(Usage),
    /// The request failed inside the engine; the last event.
    Error(String),
}

/// What stopped a choice with [`FinishReason::Stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopMatch {
    Eos(u32),
    Token(u32),
    String(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Summed over choices.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Time between submission and the first scheduled step.
    pub queue_time: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits { max_model_len: 32, vocab_size: 100 };

    fn req(prompt: &[u32], sampling: SamplingParams, n: u32) -> GenerateRequest {
        GenerateRequest { request_id: "r".into(), prompt_tokens: prompt.to_vec(), sampling, n }
    }

    fn param(r: Result<ValidGenerateRequest, EngineError>) -> &'static str {
        match r {
            Err(EngineError::InvalidParam(p)) => {
                assert!(p.message.contains(p.param), "`{}` does not name `{}`", p.message, p.param);
                p.param
            }
            other => panic!("expected an invalid parameter, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_keeps_its_parts_and_limits() {
        let sampling = SamplingParams { max_tokens: 30, stop_token_ids: vec![99], ..SamplingParams::default() };
        let v = req(&[1, 2], sampling.clone(), 3).validate(LIMITS).unwrap();
        assert_eq!((v.request_id(), v.prompt_tokens(), v.sampling(), v.n()), ("r", &[1, 2][..], &sampling, 3));
        assert_eq!(v.limits(), LIMITS);
    }

    #[test]
    fn each_limit_is_named() {
        let d = SamplingParams::default;
        assert_eq!(param(req(&[1], SamplingParams { top_p: 0.0, ..d() }, 1).validate(LIMITS)), "top_p");
        assert_eq!(param(req(&[1], d(), 0).validate(LIMITS)), "n");
        assert_eq!(param(req(&[1], d(), MAX_N + 1).validate(LIMITS)), "n");
        let stop = SamplingParams { stop_token_ids: vec![5, 100], ..d() };
        assert_eq!(param(req(&[1], stop, 1).validate(LIMITS)), "stop_token_ids");
        assert!(matches!(req(&[], d(), 1).validate(LIMITS), Err(EngineError::EmptyPrompt)));
        assert!(matches!(
            req(&[1, 100], d(), 1).validate(LIMITS),
            Err(EngineError::TokenOutOfRange { token: 100, vocab_size: 100 })
        ));
        let long = SamplingParams { max_tokens: 31, ..d() };
        assert!(matches!(
            req(&[1, 2], long, 1).validate(LIMITS),
            Err(EngineError::PromptTooLong { prompt_tokens: 2, max_tokens: 31, max_model_len: 32 })
        ));
    }

    #[test]
    fn limits_within() {
        assert!(LIMITS.within(LIMITS));
        assert!(RequestLimits { max_model_len: 8, ..LIMITS }.within(LIMITS));
        assert!(!RequestLimits { max_model_len: 33, ..LIMITS }.within(LIMITS));
        assert!(!RequestLimits { vocab_size: 101, ..LIMITS }.within(LIMITS));
    }
}

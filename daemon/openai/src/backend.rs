//! What the HTTP layer needs from a served model, as one small trait ([`ModelBackend`]), and
//! what it needs from the daemon ([`ModelRegistry`]).
//!
//! The trait keeps the handlers independent of the engine's concrete types: the real
//! `llmd_engine::EngineHandle` implements it (see `engine_backend.rs`), and tests can script a
//! backend that fails in ways a real model cannot be made to (queue full, shutting down).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use llmd_engine::{EngineError, EngineStats, GenerationEvent, ModelInfo, RequestLimits, ValidGenerateRequest};

/// The events of one submitted request. Dropping it cancels the request in the engine.
pub type EventStream = Pin<Box<dyn Stream<Item = GenerationEvent> + Send>>;

/// Why a chat template could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    /// The model ships no chat template: chat is refused, completions still work.
    #[error("model `{0}` has no chat template; use /v1/completions or load a model that ships one")]
    NoTemplate(String),
    /// The template raised or failed on these messages (bad roles, `raise_exception`...).
    #[error("chat template error: {0}")]
    Render(String),
    /// An argument has the wrong shape; `param` is its JSON path.
    #[error("{message}")]
    Invalid { param: String, message: String },
}

/// One loaded model as the HTTP layer sees it.
pub trait ModelBackend: Send + Sync + 'static {
    /// Static facts (served name, `max_model_len`, vocabulary size...).
    fn info(&self) -> &ModelInfo;
    /// Live counters for `/metrics`.
    fn stats(&self) -> EngineStats;
    /// Text to token ids.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError>;
    /// Token ids to text.
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError>;
    /// The raw chat template source, if the model has one (used to detect the reasoning format).
    fn chat_template_source(&self) -> Option<String>;
    /// Renders the chat template. `messages` and `tools` are OpenAI JSON; `extra` holds
    /// `chat_template_kwargs` (e.g. `enable_thinking`).
    fn render_chat(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String, TemplateError>;
    /// The reasoning parser this model needs, detected from its chat template.
    fn detect_reasoning_parser(&self) -> ReasoningParser {
        reasoning_parser_of_template(self.chat_template_source().as_deref())
    }
    /// What requests are validated against before [`ModelBackend::submit`]. The default reads
    /// `max_model_len` and `vocab_size` from [`ModelBackend::info`]; the real engine also
    /// counts the tokenizer's vocabulary.
    fn limits(&self) -> RequestLimits {
        let info = self.info();
        RequestLimits { max_model_len: info.max_model_len, vocab_size: info.vocab_size }
    }
    /// Queues a request validated against [`ModelBackend::limits`].
    fn submit(&self, request: ValidGenerateRequest) -> Result<EventStream, EngineError>;
}

/// How `<think>` blocks are found in a model's output: the one enum of `llmd-options`, shared
/// with the daemon's config.
pub use llmd_options::ReasoningParser;

/// Guesses the parser from a chat template's source: templates that mention `<think>` are
/// reasoning models; DeepSeek's special tokens (`<｜Assistant｜>`) select the R1 flavour. The
/// real engine asks its tokenizer instead (which also reads the tool-use template).
pub fn reasoning_parser_of_template(template: Option<&str>) -> ReasoningParser {
    match template {
        Some(t) if t.contains("</think>") || t.contains("<think>") => {
            if t.contains("<｜Assistant｜>") || t.contains("<|Assistant|>") {
                ReasoningParser::DeepseekR1
            } else {
                ReasoningParser::Qwen3
            }
        }
        _ => ReasoningParser::None,
    }
}

/// A model the daemon serves: its backend, reasoning parser and creation time.
#[derive(Clone)]
pub struct ServedModel {
    /// The engine behind the model.
    pub backend: Arc<dyn ModelBackend>,
    /// How reasoning is split from the answer.
    pub reasoning_parser: ReasoningParser,
    /// Unix seconds; the `created` field of `/v1/models`.
    pub created: u64,
}

impl ServedModel {
    /// The real engine as a served model; `reasoning_parser: None` detects it.
    pub fn from_engine(handle: llmd_engine::EngineHandle, reasoning_parser: Option<ReasoningParser>) -> Self {
        ServedModel::new(Arc::new(handle), reasoning_parser)
    }

    /// A served model; `reasoning_parser: None` detects it from the chat template.
    pub fn new(backend: Arc<dyn ModelBackend>, reasoning_parser: Option<ReasoningParser>) -> Self {
        let parser = reasoning_parser.unwrap_or_else(|| backend.detect_reasoning_parser());
        let created = backend.info().loaded_at;
        ServedModel { backend, reasoning_parser: parser, created }
    }

    /// The name clients put in `model`.
    pub fn name(&self) -> &str {
        &self.backend.info().served_name
    }
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name())
            .field("reasoning_parser", &self.reasoning_parser)
            .field("created", &self.created)
            .finish()
    }
}

/// Lifecycle phase of the daemon, reported by `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading configuration or models.
    Starting,
    /// Serving.
    Ready,
    /// Draining before exit.
    Stopping,
}

impl Phase {
    /// The lowercase name used in the `/health` body.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
        }
    }
}

/// The daemon's model table, as the HTTP layer reads it.
pub trait ModelRegistry: Send + Sync + 'static {
    /// The model served under `name`.
    fn get(&self, name: &str) -> Option<ServedModel>;
    /// Every served model.
    fn list(&self) -> Vec<ServedModel>;
    /// The daemon's phase.
    fn phase(&self) -> Phase;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_parser_from_template() {
        let detect = reasoning_parser_of_template;
        assert_eq!(detect(None), ReasoningParser::None);
        assert_eq!(detect(Some("{{ messages }}")), ReasoningParser::None);
        assert_eq!(detect(Some("{% if x %}<think>\n{% endif %}<|im_start|>assistant")), ReasoningParser::Qwen3);
        assert_eq!(detect(Some("{{'<｜Assistant｜>'}}{% if c %}</think>{% endif %}")), ReasoningParser::DeepseekR1);
    }
}

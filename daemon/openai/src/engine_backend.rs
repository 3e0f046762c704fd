//! [`ModelBackend`] for the real engine: `llmd_engine::EngineHandle` with its tokenizer and
//! chat template.

use llmd_engine::{EngineError, EngineHandle, EngineStats, ModelInfo, RequestLimits, ValidGenerateRequest};

use crate::backend::{EventStream, ModelBackend, ReasoningParser, TemplateError};

fn tokenizer_error(e: llmd_tokenizer::TokenizerError) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl ModelBackend for EngineHandle {
    fn info(&self) -> &ModelInfo {
        EngineHandle::info(self)
    }

    fn stats(&self) -> EngineStats {
        EngineHandle::stats(self)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        self.tokenizer().encode(text, add_special_tokens).map_err(tokenizer_error)
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        self.tokenizer().decode(ids, skip_special_tokens).map_err(tokenizer_error)
    }

    fn chat_template_source(&self) -> Option<String> {
        self.tokenizer().chat_template().map(|t| t.source().to_string())
    }

    fn detect_reasoning_parser(&self) -> ReasoningParser {
        // The tokenizer crate owns template inspection (it also sees the tool_use template).
        self.tokenizer().chat_template().map_or(ReasoningParser::None, |t| t.detect_reasoning_parser())
    }

    fn render_chat(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String, TemplateError> {
        let Some(template) = self.tokenizer().chat_template() else {
            return Err(TemplateError::NoTemplate(self.info().served_name.clone()));
        };
        let empty = serde_json::Map::new();
        let extra = extra.as_object().unwrap_or(&empty);
        template.render(messages, tools, add_generation_prompt, extra).map_err(|e| match e {
            llmd_tokenizer::TemplateError::InvalidArgument { field, reason } => {
                TemplateError::Invalid { param: field.clone(), message: format!("`{field}` {reason}") }
            }
            other => TemplateError::Render(other.to_string()),
        })
    }

    fn limits(&self) -> RequestLimits {
        EngineHandle::limits(self)
    }

    fn submit(&self, request: ValidGenerateRequest) -> Result<EventStream, EngineError> {
        // The boxed stream owns the GenerationStream: dropping it cancels the request.
        Ok(Box::pin(EngineHandle::submit(self, request)?))
    }
}

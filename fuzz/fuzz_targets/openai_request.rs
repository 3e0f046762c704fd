//! OpenAI request bodies through the real HTTP layer: `llmd_openai::router` answers
//! `POST /v1/chat/completions`, `/v1/completions`, `/tokenize` and `/detokenize` with the fuzz
//! bytes as the JSON body. The model behind it is the fixture tokenizer and chat template
//! (tests/fixtures/models/qwen2) with a fake engine whose `submit` checks what validation let
//! through: a request validated against the model's limits, ids inside the vocabulary,
//! prompt + max_tokens within max_model_len. The router must answer every body
//! with a 4xx (or the fake engine's 429), never a 500 and never a panic.
//! The first byte picks the route.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use llmd_engine::{EngineError, EngineStats, ModelInfo, ValidGenerateRequest};
use llmd_openai::{
    ApiKeys, ApiOptions, ApiState, EventStream, ModelBackend, ModelRegistry, Phase, ServedModel, TemplateError,
};
use llmd_tokenizer::Tokenizer;
use tower::ServiceExt;

const MAX_MODEL_LEN: u32 = 64;

struct FixtureModel {
    info: ModelInfo,
    tokenizer: Tokenizer,
}

impl ModelBackend for FixtureModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text, add_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
    fn chat_template_source(&self) -> Option<String> {
        self.tokenizer.chat_template().map(|t| t.source().to_string())
    }
    fn render_chat(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String, TemplateError> {
        let template = self.tokenizer.chat_template().expect("fixture has a chat template");
        let empty = serde_json::Map::new();
        template.render(messages, tools, add_generation_prompt, extra.as_object().unwrap_or(&empty)).map_err(
            |e| match e {
                llmd_tokenizer::TemplateError::InvalidArgument { field, reason } => {
                    TemplateError::Invalid { param: field.clone(), message: format!("`{field}` {reason}") }
                }
                other => TemplateError::Render(other.to_string()),
            },
        )
    }
    fn submit(&self, r: ValidGenerateRequest) -> Result<EventStream, EngineError> {
        assert!(r.limits().within(self.limits()), "validated against {:?}, not the model's limits", r.limits());
        assert!((1..=llmd_engine::MAX_N).contains(&r.n()), "n = {} reached the engine", r.n());
        let vocab = self.info.vocab_size as u32;
        assert!(r.prompt_tokens().iter().all(|&t| t < vocab), "out-of-vocabulary prompt id reached the engine");
        let total = r.prompt_tokens().len() as u64 + u64::from(r.sampling().max_tokens);
        assert!(
            total <= u64::from(MAX_MODEL_LEN),
            "prompt + max_tokens = {total} over max_model_len reached the engine"
        );
        // End here: the answer (429) is not what is under test.
        Err(EngineError::QueueFull { model: self.info.served_name.clone(), max_queue: 0 })
    }
}

struct OneModel(ServedModel);

impl ModelRegistry for OneModel {
    fn get(&self, name: &str) -> Option<ServedModel> {
        (name == self.0.name()).then(|| self.0.clone())
    }
    fn list(&self) -> Vec<ServedModel> {
        vec![self.0.clone()]
    }
    fn phase(&self) -> Phase {
        Phase::Ready
    }
}

fn state() -> &'static (tokio::runtime::Runtime, ApiState) {
    static STATE: OnceLock<(tokio::runtime::Runtime, ApiState)> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2");
        let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
        let info = ModelInfo {
            served_name: "m".into(),
            source: dir.display().to_string(),
            architecture: "Qwen2ForCausalLM".into(),
            num_params: 0,
            dtype: llmd_proto::Dtype::Float32,
            backend: llmd_proto::Backend::Cpu,
            max_model_len: MAX_MODEL_LEN,
            vocab_size: tokenizer.vocab_size(),
            weight_bytes: 0,
            kv_cache_bytes: 0,
            kv_block_size: 16,
            kv_blocks_total: 0,
            loaded_at: 0,
        };
        let model = ServedModel::new(Arc::new(FixtureModel { info, tokenizer }), None);
        let opts = ApiOptions { max_body_bytes: 1 << 20, ..ApiOptions::default() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        (rt, ApiState::new(Arc::new(OneModel(model)), ApiKeys::new(Vec::<String>::new()), opts))
    })
}

const ROUTES: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let route = ROUTES[pick as usize % ROUTES.len()];
    let (rt, state) = state();
    let request = Request::post(route)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let response = rt.block_on(llmd_openai::router(state.clone()).oneshot(request)).expect("infallible router");
    let status = response.status();
    let text = rt
        .block_on(axum::body::to_bytes(response.into_body(), 1 << 24))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    assert!(
        status.is_success() || status.is_client_error(),
        "{route} answered {status} to {:?}: {text}",
        String::from_utf8_lossy(body)
    );
    if !status.is_success() {
        let json: serde_json::Value = serde_json::from_str(&text).expect("error body is JSON");
        assert!(json["error"]["message"].is_string(), "error body without a message: {text}");
    }
});

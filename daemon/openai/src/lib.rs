//! llmd's OpenAI-compatible HTTP API (axum), in front of the engine.
//!
//! The daemon builds an [`ApiState`] from its model table (a [`ModelRegistry`]), the API keys
//! ([`ApiKeys`], reloadable on SIGHUP) and [`ApiOptions`], then serves [`router`]:
//!
//! - `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
//! - `POST /tokenize`, `POST /detokenize` (vLLM shapes)
//! - `GET /health` (200 when ready with at least one model, 503 naming the phase otherwise)
//! - `GET /metrics` (OpenMetrics text, vLLM's names under `llmd:`)
//!
//! Requests are validated into the engine's `GenerateRequest` ([`validate`]); every failure is
//! an [`ApiError`], mapped to an HTTP status and an OpenAI error body in one place.
//! Streaming replies are SSE exactly as OpenAI sends them; dropping the response body (client
//! disconnect) drops the engine stream, which cancels the generation.

pub mod backend;
mod chat;
mod completions;
mod engine_backend;
pub mod error;
pub mod metrics;
pub mod parse;
mod sse;
pub mod state;
pub mod types;
pub mod validate;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

pub use backend::{EventStream, ModelBackend, ModelRegistry, Phase, ReasoningParser, ServedModel, TemplateError};
pub use error::ApiError;
pub use state::{ApiKeys, ApiOptions, ApiState, ExtraMetrics};

use crate::types::*;

/// The full HTTP API over `state`.
pub fn router(state: ApiState) -> Router {
    let opts = state.options.clone();
    let auth = middleware::from_fn_with_state(state.clone(), require_key);
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_handler))
        .route("/v1/completions", post(completions_handler))
        .route("/tokenize", post(tokenize_handler))
        .route("/detokenize", post(detokenize_handler))
        .route_layer(auth.clone());
    let mut health = Router::new().route("/health", get(health_handler));
    if opts.health_require_auth {
        health = health.route_layer(auth.clone());
    }
    let mut metrics = Router::new().route("/metrics", get(metrics_handler));
    if opts.metrics_require_auth {
        metrics = metrics.route_layer(auth);
    }
    let mut app = api
        .merge(health)
        .merge(metrics)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .with_state(state);
    // CORS wraps everything so preflight requests (which carry no key) are answered first.
    if let Some(cors) = cors_layer(&opts.allowed_origins) {
        app = app.layer(cors);
    }
    app
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(Any)
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// 401 unless the request carries one of the keys (when any is set).
async fn require_key(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if !state.keys.is_enabled() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match presented {
        Some(key) if state.keys.check(key) => next.run(req).await,
        _ => fail(&state, ApiError::Unauthorized),
    }
}

fn fail(state: &ApiState, e: ApiError) -> Response {
    state.metrics.record_error(e.error_type());
    e.into_response()
}

/// Reads the body (413 over the limit) and parses it (400 naming the field).
async fn read_json<T: DeserializeOwned>(state: &ApiState, req: Request) -> Result<T, ApiError> {
    let bytes = Bytes::from_request(req, &()).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: state.options.max_body_bytes }
        } else {
            ApiError::InvalidJson(format!("could not read the request body: {}", rej.body_text()))
        }
    })?;
    validate::parse_json(&bytes)
}

async fn chat_handler(State(state): State<ApiState>, req: Request) -> Response {
    let result = async {
        let body: ChatCompletionRequest = read_json(&state, req).await?;
        chat::chat_completions(&state, body).await
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, e))
}

async fn completions_handler(State(state): State<ApiState>, req: Request) -> Response {
    let result = async {
        let body: CompletionRequest = read_json(&state, req).await?;
        completions::completions(&state, body).await
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, e))
}

async fn list_models(State(state): State<ApiState>) -> Response {
    let data = state
        .registry
        .list()
        .into_iter()
        .map(|m| ModelCard {
            id: m.name().to_string(),
            object: "model",
            created: m.created,
            owned_by: "llmd",
            root: m.backend.info().source.clone(),
            parent: None,
            max_model_len: m.backend.info().max_model_len,
        })
        .collect();
    Json(ModelList { object: "list", data }).into_response()
}

/// `model` is optional for tokenize/detokenize when exactly one model is loaded.
fn model_for(state: &ApiState, name: Option<&str>) -> Result<ServedModel, ApiError> {
    match name {
        Some(n) => chat::lookup(state, n),
        None => {
            let mut all = state.registry.list();
            if all.len() == 1 {
                Ok(all.remove(0))
            } else {
                Err(ApiError::param("model", format!("`model` is required when {} models are loaded", all.len())))
            }
        }
    }
}

async fn tokenize_handler(State(state): State<ApiState>, req: Request) -> Response {
    let result = async {
        let body: TokenizeRequest = read_json(&state, req).await?;
        let model = model_for(&state, body.model.as_deref())?;
        let backend = &model.backend;
        let tokens = match (&body.prompt, &body.messages) {
            (Some(p), None) => backend.encode(p, body.add_special_tokens.unwrap_or(true))?,
            (None, Some(msgs)) => {
                let tools = body.tools.clone().map(serde_json::Value::Array);
                let prompt = chat::render_prompt(
                    &model,
                    msgs,
                    tools.as_ref(),
                    body.add_generation_prompt.unwrap_or(true),
                    body.chat_template_kwargs.as_ref(),
                )?;
                backend.encode(&prompt, body.add_special_tokens.unwrap_or(false))?
            }
            _ => return Err(ApiError::param("prompt", "send exactly one of `prompt` and `messages`")),
        };
        let token_strs = if body.return_token_strs.unwrap_or(false) {
            Some(tokens.iter().map(|t| backend.decode(&[*t], false)).collect::<Result<Vec<_>, _>>()?)
        } else {
            None
        };
        Ok(Json(TokenizeResponse {
            count: tokens.len(),
            max_model_len: backend.info().max_model_len,
            tokens,
            token_strs,
        })
        .into_response())
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, e))
}

async fn detokenize_handler(State(state): State<ApiState>, req: Request) -> Response {
    let result = async {
        let body: DetokenizeRequest = read_json(&state, req).await?;
        let model = model_for(&state, body.model.as_deref())?;
        let vocab = model.backend.info().vocab_size;
        if let Some(bad) = body.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::param(
                "tokens",
                format!("`tokens` holds {bad}, outside the vocabulary of {vocab} tokens"),
            ));
        }
        let prompt = model.backend.decode(&body.tokens, false)?;
        Ok(Json(DetokenizeResponse { prompt }).into_response())
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, e))
}

async fn health_handler(State(state): State<ApiState>) -> Response {
    let phase = state.registry.phase();
    let models: Vec<String> = state.registry.list().iter().map(|m| m.name().to_string()).collect();
    let (status, body) = match phase {
        Phase::Ready if !models.is_empty() => {
            (StatusCode::OK, json!({"status": "ok", "phase": "ready", "models": models}))
        }
        Phase::Ready => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "no_model", "phase": "ready", "models": models, "message": "no model is loaded"}),
        ),
        p => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": p.as_str(), "phase": p.as_str(), "models": models, "message": format!("the server is {}", p.as_str())}),
        ),
    };
    (status, Json(body)).into_response()
}

async fn metrics_handler(State(state): State<ApiState>) -> Response {
    let extra = state.extra_metrics.as_ref().map(|f| f());
    let text = state.metrics.render(extra.as_deref());
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

//! The one error type of the HTTP layer and its one mapping to an HTTP status and an
//! OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use llmd_engine::EngineError;
use serde::Serialize;

/// Every way a request can fail. Handlers return this; [`ApiError::status`] is the only place
/// that knows HTTP status codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing, malformed or out of range. `param` is the OpenAI field name.
    #[error("{message}")]
    InvalidParam { param: Option<String>, message: String },
    /// The body is not valid JSON for this endpoint.
    #[error("{0}")]
    InvalidJson(String),
    /// The `model` field names no loaded model.
    #[error("The model `{0}` does not exist or is not loaded")]
    ModelNotFound(String),
    /// No or a wrong `Authorization: Bearer` key.
    #[error("Incorrect or missing API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The body is larger than `server.max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The model's waiting queue is full (`max_queue`).
    #[error("{0}")]
    QueueFull(String),
    /// The server is starting, stopping, or the model is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The request ran past the server's request timeout.
    #[error("request exceeded the server's timeout of {0} seconds")]
    Timeout(u64),
    /// No such route.
    #[error("{0}")]
    NotFound(String),
    /// A bug or an engine failure; logged with details.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Shorthand for a 400 naming `param`.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidParam { param: Some(param.to_string()), message: message.into() }
    }

    /// The HTTP status: the single error→status map of llmd.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParam { .. } | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable short name, used as the `error_type` metrics label and in logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidParam { .. } => "validation",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::Unauthorized => "unauthorized",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::QueueFull(_) => "queue_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::NotFound(_) => "not_found",
            ApiError::Internal(_) => "internal",
        }
    }

    /// OpenAI's `error.type` string (what the SDKs show).
    fn openai_type(&self) -> &'static str {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::InvalidJson(_)
            | ApiError::ModelNotFound(_)
            | ApiError::Unauthorized
            | ApiError::PayloadTooLarge { .. }
            | ApiError::NotFound(_) => "invalid_request_error",
            ApiError::QueueFull(_) => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable_error",
            ApiError::Timeout(_) => "timeout_error",
            ApiError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::Unauthorized => Some("invalid_api_key"),
            ApiError::PayloadTooLarge { .. } => Some("payload_too_large"),
            ApiError::QueueFull(_) => Some("queue_full"),
            _ => None,
        }
    }

    fn param_name(&self) -> Option<&str> {
        match self {
            ApiError::InvalidParam { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                r#type: self.openai_type().to_string(),
                param: self.param_name().map(str::to_string),
                code: self.code().map(str::to_string),
            },
        }
    }
}

/// `{"error": {...}}` as OpenAI sends it.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of an OpenAI error body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    pub r#type: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed with an internal error");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "request refused");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidParam(p) => {
                ApiError::InvalidParam { param: Some(p.param.to_string()), message: p.message }
            }
            EngineError::PromptTooLong { .. } => ApiError::param("max_tokens", e.to_string()),
            EngineError::EmptyPrompt => ApiError::param("prompt", "the prompt is empty"),
            EngineError::TokenOutOfRange { .. } => ApiError::param("prompt", e.to_string()),
            EngineError::QueueFull { .. } => ApiError::QueueFull(e.to_string()),
            EngineError::ShuttingDown(_) => ApiError::Unavailable(e.to_string()),
            EngineError::Model(_) | EngineError::Tokenizer(_) | EngineError::LooserLimits { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

impl From<llmd_engine::InvalidParam> for ApiError {
    fn from(p: llmd_engine::InvalidParam) -> Self {
        ApiError::InvalidParam { param: Some(p.param.to_string()), message: p.message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_status_and_shape() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::param("top_p", "`top_p` must be > 0"), 400, "invalid_request_error"),
            (ApiError::InvalidJson("bad".into()), 400, "invalid_request_error"),
            (ApiError::ModelNotFound("x".into()), 404, "invalid_request_error"),
            (ApiError::Unauthorized, 401, "invalid_request_error"),
            (ApiError::PayloadTooLarge { limit: 10 }, 413, "invalid_request_error"),
            (ApiError::QueueFull("full".into()), 429, "rate_limit_error"),
            (ApiError::Unavailable("starting".into()), 503, "service_unavailable_error"),
            (ApiError::Timeout(5), 504, "timeout_error"),
            (ApiError::Internal("bug".into()), 500, "server_error"),
        ];
        for (err, status, ty) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.body().error.r#type, ty, "{err:?}");
        }
        let body = ApiError::ModelNotFound("m".into()).body();
        assert_eq!(body.error.param.as_deref(), Some("model"));
        assert_eq!(body.error.code.as_deref(), Some("model_not_found"));
    }

    #[test]
    fn engine_errors_map_to_http_classes() {
        let queue = ApiError::from(EngineError::QueueFull { model: "m".into(), max_queue: 4 });
        assert_eq!(queue.status().as_u16(), 429);
        let long = ApiError::from(EngineError::PromptTooLong { prompt_tokens: 10, max_tokens: 5, max_model_len: 12 });
        assert_eq!(long.status().as_u16(), 400);
        assert!(long.to_string().contains("10") && long.to_string().contains("12"));
        assert_eq!(ApiError::from(EngineError::ShuttingDown("m".into())).status().as_u16(), 503);
        let limits = llmd_engine::RequestLimits { max_model_len: 8, vocab_size: 10 };
        let looser = EngineError::LooserLimits { model: "m".into(), validated: limits, limits };
        assert_eq!(ApiError::from(looser).status().as_u16(), 500);
    }
}

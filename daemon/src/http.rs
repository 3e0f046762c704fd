//! The HTTP listener. This module owns binding and graceful shutdown; the OpenAI API router
//! (llmd-openai) is merged into [`router`] next to `/health`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use llmd_proto::DaemonState;

use crate::control::Shared;

/// `GET /health`: 200 `{"status":"ready"}` once ready, 503 with the phase otherwise.
async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let state = shared.state();
    let code = if state == DaemonState::Ready || state == DaemonState::Reloading {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(serde_json::json!({ "status": state.as_str() })))
}

/// The daemon's own routes plus `api` (the OpenAI API, when linked in).
pub fn router(shared: Arc<Shared>, api: Option<Router>) -> Router {
    let max_body = shared.settings.read().map(|s| s.config.server.max_body_bytes).unwrap_or(8 << 20);
    let own = Router::new().route("/health", get(health)).with_state(shared);
    let app = match api {
        Some(api) => own.merge(api),
        None => own,
    };
    app.layer(axum::extract::DefaultBodyLimit::max(usize::try_from(max_body).unwrap_or(usize::MAX)))
}

//! Operational routes: `GET /health` and `GET /metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::errors::ApiError;
use crate::metrics;
use crate::state::AppState;

/// `GET /health`: 200 once the model is loaded, 503 before.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.try_engine() {
        Some(_) => (StatusCode::OK, "ok").into_response(),
        None => ApiError::Unavailable("the model is still loading".into()).into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = metrics::render(state.try_engine());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Any unknown route: an OpenAI-style 404.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

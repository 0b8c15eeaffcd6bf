//! Operational routes: `GET /health` and `GET /metrics`.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::errors::ApiError;
use crate::metrics;
use crate::state::AppState;

/// `GET /health`: 200 once the model is loaded, 503 before. With
/// `?details=true`, a JSON object that adds the configuration warnings
/// (e.g. a public address without keys) and who may change experience
/// libraries.
pub async fn health(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Response {
    if state.try_engine().is_none() {
        return ApiError::Unavailable("the model is still loading".into()).into_response();
    }
    if !wants_details(query.as_deref()) {
        return (StatusCode::OK, "ok").into_response();
    }
    let notes = state.health_notes();
    let body = serde_json::json!({"status": "ok", "warnings": notes.warnings, "experience_writes": notes.experience_writes});
    axum::Json(body).into_response()
}

/// Whether the query asks for details: `details` with no value or any value
/// but `0`/`false` (probes send no query, so any mistake here is harmless).
fn wants_details(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == "details").then_some(v)
        })
        .any(|v| !matches!(v, "0" | "false"))
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

#[cfg(test)]
mod tests {
    use super::wants_details;

    #[test]
    fn details_are_asked_for_by_the_query() {
        assert!(!wants_details(None));
        assert!(!wants_details(Some("")));
        assert!(wants_details(Some("details=true")));
        assert!(wants_details(Some("x=1&details")));
        assert!(!wants_details(Some("details=false")));
        assert!(!wants_details(Some("details=0")));
        assert!(!wants_details(Some("detailsx=1")));
    }
}

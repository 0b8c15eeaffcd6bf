//! # ouro server
//!
//! The only crate that knows HTTP. [`router`] builds the axum application
//! over an [`AppState`] holding the [`engine::EngineHandle`]; handlers
//! extract and validate ([`validate`]), submit ([`generate`]), then answer in
//! full or as server-sent events. Every error is an [`errors::ApiError`]
//! rendered as an OpenAI error body. The `ouro` binary (`main.rs`) adds the
//! CLI: `serve`, `bench`, `fetch-model`.

pub mod access;
pub mod bench;
pub mod cli;
pub mod errors;
pub mod extract;
pub mod fetch;
pub mod generate;
pub mod guard;
pub mod loadgen;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod replay;
pub mod routes;
pub mod state;
pub mod tca_cli;
pub mod validate;

use std::sync::Arc;

use axum::routing::{get, patch, post};
use axum::Router;

pub use state::AppState;

/// Every route the server answers, with its methods. `openapi.yaml` must list
/// exactly these (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("/v1/completions", "post"),
    ("/v1/chat/completions", "post"),
    ("/v1/models", "get"),
    ("/tokenize", "post"),
    ("/detokenize", "post"),
    ("/health", "get"),
    ("/metrics", "get"),
    ("/v1/experiences", "get"),
    ("/v1/experiences/{name}", "get"),
    ("/v1/experiences/{name}/versions/{version}", "get"),
    ("/v1/experiences/{name}/items", "post"),
    ("/v1/experiences/{name}/items/{id}", "patch"),
    ("/v1/experiences/{name}/items/{id}", "delete"),
    ("/v1/experiences/{name}/rollback", "post"),
    ("/v1/experiences/{name}/learn", "post"),
    ("/v1/experiences/jobs", "get"),
    ("/v1/experiences/jobs/{id}", "get"),
    ("/v1/experiences/jobs/{id}", "delete"),
    ("/v1/feedback", "post"),
    ("/admin/speculator", "get"),
    ("/admin/speculator/swap", "post"),
    ("/admin/speculator/rollback", "post"),
    ("/admin/speculator/snapshot", "post"),
    ("/admin/trainer", "get"),
    ("/admin/trainer/pause", "post"),
    ("/admin/trainer/resume", "post"),
    // The web console (issue 9).
    ("/console", "get"),
    ("/console/{file}", "get"),
];

/// The application.
pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(routes::openai::completions))
        .route("/v1/chat/completions", post(routes::openai::chat_completions))
        .route("/v1/models", get(routes::openai::models))
        .route("/tokenize", post(routes::tokenizer::tokenize))
        .route("/detokenize", post(routes::tokenizer::detokenize))
        .route("/health", get(routes::ops::health))
        .route("/metrics", get(routes::ops::metrics))
        .merge(experience_routes())
        .merge(admin_routes())
        .merge(console_routes())
        .fallback(routes::ops::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Admin routes of the learning speculator (issue 5).
fn admin_routes() -> Router<Arc<AppState>> {
    use routes::admin as a;
    Router::new()
        .route("/admin/speculator", get(a::speculator))
        .route("/admin/speculator/swap", post(a::swap))
        .route("/admin/speculator/rollback", post(a::rollback))
        .route("/admin/speculator/snapshot", post(a::snapshot))
        .route("/admin/trainer", get(a::trainer))
        .route("/admin/trainer/pause", post(a::pause))
        .route("/admin/trainer/resume", post(a::resume))
}

/// The web console (issue 9): embedded static files.
fn console_routes() -> Router<Arc<AppState>> {
    Router::new().route("/console", get(routes::console::index)).route("/console/{file}", get(routes::console::file))
}

/// Experience library routes (issue 7).
fn experience_routes() -> Router<Arc<AppState>> {
    use routes::experience as x;
    Router::new()
        .route("/v1/experiences", get(x::list))
        .route("/v1/experiences/jobs", get(x::jobs))
        .route("/v1/experiences/jobs/{id}", get(x::job).delete(x::cancel_job))
        .route("/v1/experiences/{name}", get(x::get))
        .route("/v1/experiences/{name}/versions/{version}", get(x::get_version))
        .route("/v1/experiences/{name}/items", post(x::add_item))
        .route("/v1/experiences/{name}/items/{id}", patch(x::edit_item).delete(x::delete_item))
        .route("/v1/experiences/{name}/rollback", post(x::rollback))
        .route("/v1/experiences/{name}/learn", post(x::learn))
        .route("/v1/feedback", post(x::feedback))
}

//! # ouro server
//!
//! The only crate that knows HTTP. [`router`] builds the axum application
//! over an [`AppState`] holding the [`engine::EngineHandle`]; handlers
//! extract and validate ([`validate`]), submit ([`generate`]), then answer in
//! full or as server-sent events. Every error is an [`errors::ApiError`]
//! rendered as an OpenAI error body. The `ouro` binary (`main.rs`) adds the
//! CLI: `serve`, `bench`, `fetch-model`.

pub mod bench;
pub mod cli;
pub mod errors;
pub mod extract;
pub mod fetch;
pub mod generate;
pub mod metrics;
pub mod protocol;
pub mod routes;
pub mod state;
pub mod validate;

use std::sync::Arc;

use axum::routing::{get, post};
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
        .fallback(routes::ops::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::errors::ApiError;
use crate::extract::ApiJson;
use crate::protocol::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use crate::state::AppState;
use crate::validate;

/// `POST /tokenize`: text, or messages rendered with the chat template.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    check_model(&info.model_name, &req.model)?;
    let add_special = req.add_special_tokens.unwrap_or(true);
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => info.tokenizer.encode(p, add_special)?,
        (None, Some(m)) => {
            let msgs = validate::chat_messages(m)?;
            let text = info.template.render(&msgs, req.add_generation_prompt.unwrap_or(true))?;
            info.tokenizer.encode(&text, add_special)?
        }
        _ => return Err(ApiError::invalid("prompt", "give exactly one of `prompt` or `messages`")),
    };
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: info.max_model_len, tokens }))
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    check_model(&info.model_name, &req.model)?;
    let vocab = info.tokenizer.vocab_size();
    if let Some((i, t)) = req.tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(ApiError::invalid(format!("tokens[{i}]"), format!("token id {t} is outside the vocabulary (size {vocab})")));
    }
    Ok(Json(DetokenizeResponse { prompt: info.tokenizer.decode(&req.tokens, false)? }))
}

fn check_model(served: &str, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != served => Err(ApiError::Invalid {
            param: Some("model".into()),
            message: format!("The model `{m}` does not exist; this server serves `{served}`"),
            code: "model_not_found",
        }),
        _ => Ok(()),
    }
}

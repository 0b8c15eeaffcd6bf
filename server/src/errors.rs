//! One error type for every route, rendered as an OpenAI error body:
//! `{"error": {"message", "type", "param", "code"}}` with the right status.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use engine::EngineError;
use serde::Serialize;

/// What a route can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a limit (400).
    #[error("{message}")]
    Invalid {
        /// The request field at fault, if one is.
        param: Option<String>,
        /// What is wrong, with the limit and the value.
        message: String,
        /// A stable machine-readable code.
        code: &'static str,
    },
    /// Missing or wrong credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The action is disabled on this server (403).
    #[error("{0}")]
    Forbidden(String),
    /// A valid key without the scope the action needs (403).
    #[error("{message}")]
    MissingScope {
        /// The scope needed (`experiences:write`, `admin`).
        scope: &'static str,
        /// What was refused, naming the scope.
        message: String,
    },
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The queue is full (429, with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
    /// The caller used up its budget for this route (429, with `Retry-After`).
    #[error("{message}")]
    RateLimited {
        /// The limit and how to wait for it.
        message: String,
        /// Whole seconds until the next request is allowed (at least 1).
        retry_after_s: u64,
    },
    /// The request body is larger than `--body-limit` (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request ran past `--request-timeout-s` (504).
    #[error("{0}")]
    Timeout(String),
    /// The model is still loading or the engine stopped (503).
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside the server (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { param: Some(param.into()), message: message.into(), code: "invalid_value" }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::MissingScope { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Overloaded(_) | ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `type` field.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. } => "invalid_request_error",
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) | ApiError::MissingScope { .. } => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::Overloaded(_) | ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::PayloadTooLarge(_) => "invalid_request_error",
            ApiError::Timeout(_) => "timeout_error",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The OpenAI `code` field (also the `code` label of the error metric).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid { code, .. } => code,
            ApiError::Unauthorized(_) => "invalid_api_key",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::MissingScope { .. } => "missing_scope",
            ApiError::NotFound(_) => "not_found",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::PayloadTooLarge(_) => "body_too_large",
            ApiError::Timeout(_) => "request_timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        let param = match self {
            ApiError::Invalid { param, .. } => param.clone(),
            _ => None,
        };
        ErrorBody { error: ErrorDetail { message: self.to_string(), r#type: self.kind(), param, code: Some(self.code()) } }
    }
}

/// `{"error": ...}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The OpenAI error object.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// Error class.
    pub r#type: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// Stable code.
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        crate::metrics::record_error(self.code());
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_s, .. } => (*retry_after_s).max(1),
            _ => 1,
        };
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert("retry-after", HeaderValue::from(retry_after));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid { param, message } => {
                ApiError::Invalid { param: param.map(str::to_string), message, code: "context_length_exceeded" }
            }
            EngineError::Overloaded { .. } => ApiError::Overloaded(e.to_string()),
            EngineError::EngineStopped => ApiError::Unavailable(e.to_string()),
            EngineError::Template(m) => {
                ApiError::Invalid { param: Some("messages".into()), message: format!("chat template: {m}"), code: "invalid_value" }
            }
            EngineError::Tokenizer(m) => ApiError::Invalid { param: None, message: format!("tokenizer: {m}"), code: "invalid_value" },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

//! A JSON body extractor whose failures are OpenAI errors naming the field
//! (axum's own `Json` answers in plain text).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::errors::ApiError;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                return ApiError::PayloadTooLarge(format!("the request body is larger than the server's limit (--body-limit): {e}"));
            }
            ApiError::Invalid { param: None, message: format!("could not read the request body: {e}"), code: "invalid_body" }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` as `T`, naming the failing field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (code, what) =
            if inner.is_syntax() || inner.is_eof() { ("invalid_json", "malformed JSON") } else { ("invalid_type", "invalid request") };
        let field = missing_field(&inner.to_string()).or(if path == "." || path.is_empty() { None } else { Some(path) });
        let message = match &field {
            Some(f) => format!("{what}: `{f}`: {inner}"),
            None => format!("{what}: {inner}"),
        };
        ApiError::Invalid { param: field, message, code }
    })
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

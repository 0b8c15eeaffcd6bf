//! The admin API for the learning speculator: versions, swaps, rollbacks,
//! pausing the trainer, snapshots. Every route needs `Authorization: Bearer
//! <admin key>`; without `--admin-key` the admin API is disabled.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use trainer::speculator::versions::HistoryEntry;
use trainer::speculator::{SpeculatorService, TrainerStatus};

use crate::errors::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;

/// Compares in time independent of where the strings first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Checks the admin key; returns the trainer service.
fn admin<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a SpeculatorService, ApiError> {
    let Some(key) = state.admin_key() else {
        return Err(ApiError::Forbidden("the admin API is disabled: start ouro with --admin-key".into()));
    };
    match bearer(headers) {
        Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => {}
        _ => return Err(ApiError::Unauthorized("a valid admin key is required (Authorization: Bearer <admin key>)".into())),
    }
    state.speculator().ok_or_else(|| {
        ApiError::Unavailable(
            "the speculator trainer is not running (started with --trainer off, --speculation off, or still loading)".into(),
        )
    })
}

/// `GET /admin/speculator`.
#[derive(Debug, Serialize)]
pub struct SpeculatorView {
    /// The version serving now.
    pub serving_version: u64,
    /// Recent candidates that failed the offline gate.
    pub candidates: Vec<u64>,
    /// Simulated acceptance length by version (latest measurements).
    pub simulated: std::collections::HashMap<u64, f64>,
    /// Every decision with its numbers, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// `GET /admin/speculator`.
pub async fn speculator(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<SpeculatorView>, ApiError> {
    let svc = admin(&state, &headers)?;
    let st = svc.status();
    Ok(Json(SpeculatorView {
        serving_version: st.serving_version,
        candidates: st.candidates,
        simulated: st.simulated,
        history: svc.history(),
    }))
}

/// `POST /admin/speculator/swap` body.
#[derive(Debug, Deserialize)]
pub struct SwapRequest {
    /// The version to serve.
    pub version: u64,
    /// Skip the offline gate.
    #[serde(default)]
    pub force: bool,
}

/// The outcome of an admin action.
#[derive(Debug, Serialize)]
pub struct ActionResult {
    /// What happened.
    pub message: String,
    /// The version serving now.
    pub serving_version: u64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(m)) => Err(ApiError::Invalid { param: None, message: m, code: "admin_action_refused" }),
        Err(e) => Err(ApiError::Internal(e.to_string())),
    }
}

/// `POST /admin/speculator/swap`.
pub async fn swap(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SwapRequest>,
) -> Result<Json<ActionResult>, ApiError> {
    let svc = admin(&state, &headers)?.clone();
    let s2 = svc.clone();
    let message = blocking(move || s2.swap(req.version, req.force)).await?;
    Ok(Json(ActionResult { message, serving_version: svc.status().serving_version }))
}

/// `POST /admin/speculator/rollback`.
pub async fn rollback(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<ActionResult>, ApiError> {
    let svc = admin(&state, &headers)?.clone();
    let s2 = svc.clone();
    let message = blocking(move || s2.rollback()).await?;
    Ok(Json(ActionResult { message, serving_version: svc.status().serving_version }))
}

/// `POST /admin/speculator/snapshot`.
pub async fn snapshot(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<ActionResult>, ApiError> {
    let svc = admin(&state, &headers)?.clone();
    let s2 = svc.clone();
    // A checkpoint that cannot be written (full or read-only disk) is a 503:
    // serving goes on, the request may succeed once the disk is fixed.
    let v = blocking(move || s2.snapshot()).await.map_err(|e| match e {
        ApiError::Invalid { message, .. } => ApiError::Unavailable(message),
        other => other,
    })?;
    Ok(Json(ActionResult { message: format!("checkpointed the trainer's weights as v{v}"), serving_version: svc.status().serving_version }))
}

/// `POST /admin/trainer/pause`.
pub async fn pause(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<TrainerStatus>, ApiError> {
    let svc = admin(&state, &headers)?;
    svc.pause();
    Ok(Json(svc.status()))
}

/// `POST /admin/trainer/resume`.
pub async fn resume(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<TrainerStatus>, ApiError> {
    let svc = admin(&state, &headers)?;
    svc.resume();
    Ok(Json(svc.status()))
}

/// `GET /admin/trainer`.
pub async fn trainer(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<TrainerStatus>, ApiError> {
    Ok(Json(admin(&state, &headers)?.status()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}

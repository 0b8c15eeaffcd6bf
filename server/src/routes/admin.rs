//! The admin API for the learning speculator: versions, swaps, rollbacks,
//! pausing the trainer, snapshots. Every route needs `Authorization: Bearer
//! <admin key>` (or a key with scope `admin`); without `--admin-key` or such
//! a key the admin API is disabled.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use trainer::speculator::versions::HistoryEntry;
use trainer::speculator::{SpeculatorService, TrainerStatus};

use crate::access::Caller;
use crate::errors::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;

/// Checks that `caller` may use the admin API; returns the trainer service.
fn admin<'a>(state: &'a AppState, caller: &Caller) -> Result<&'a SpeculatorService, ApiError> {
    caller.require_admin()?;
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
pub async fn speculator(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<SpeculatorView>, ApiError> {
    let svc = admin(&state, &caller)?;
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
    caller: Caller,
    ApiJson(req): ApiJson<SwapRequest>,
) -> Result<Json<ActionResult>, ApiError> {
    let svc = admin(&state, &caller)?.clone();
    let s2 = svc.clone();
    let message = blocking(move || s2.swap(req.version, req.force)).await?;
    Ok(Json(ActionResult { message, serving_version: svc.status().serving_version }))
}

/// `POST /admin/speculator/rollback`.
pub async fn rollback(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<ActionResult>, ApiError> {
    let svc = admin(&state, &caller)?.clone();
    let s2 = svc.clone();
    let message = blocking(move || s2.rollback()).await?;
    Ok(Json(ActionResult { message, serving_version: svc.status().serving_version }))
}

/// `POST /admin/speculator/snapshot`.
pub async fn snapshot(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<ActionResult>, ApiError> {
    let svc = admin(&state, &caller)?.clone();
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
pub async fn pause(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<TrainerStatus>, ApiError> {
    let svc = admin(&state, &caller)?;
    svc.pause();
    Ok(Json(svc.status()))
}

/// `POST /admin/trainer/resume`.
pub async fn resume(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<TrainerStatus>, ApiError> {
    let svc = admin(&state, &caller)?;
    svc.resume();
    Ok(Json(svc.status()))
}

/// `GET /admin/trainer`.
pub async fn trainer(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<TrainerStatus>, ApiError> {
    Ok(Json(admin(&state, &caller)?.status()))
}

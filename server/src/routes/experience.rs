//! Experience libraries over HTTP (Training-Free GRPO, issue 7):
//! - `GET /v1/experiences`, `GET /v1/experiences/{name}`,
//!   `GET /v1/experiences/{name}/versions/{version}`;
//! - edits, each writing a new version: `POST /v1/experiences/{name}/items`,
//!   `PATCH|DELETE /v1/experiences/{name}/items/{id}`,
//!   `POST /v1/experiences/{name}/rollback`;
//! - learning: `POST /v1/experiences/{name}/learn` (a background job),
//!   `GET /v1/experiences/jobs`, `GET|DELETE /v1/experiences/jobs/{id}`,
//!   `POST /v1/feedback`;
//! - and the chat hooks: [`inject`] (the library into the system prompt)
//!   and [`finish_chat`] (report the version, log `n > 1` answers).
//!
//! Handlers are thin: the work is in [`trainer::experience::Experiences`].
//!
//! Access ([`crate::access`]): any caller may read libraries and name one in
//! a chat request; writes ([`LibraryWriter`]) need the admin key or scope
//! `experiences:write` (or a server without keys). Feedback rates only the
//! caller's own completions, within `--feedback-per-minute`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::chat_template::ChatMessage;
use serde::Deserialize;
use trainer::experience::{ExperienceError, Experiences, FeedbackRequest, LearnRequest};

use crate::access::{Caller, LibraryWriter};
use crate::errors::ApiError;
use crate::extract::ApiJson;
use crate::generate::ChoiceResult;
use crate::protocol::{ChatResponse, ExperienceUsed, OuroRequest, OuroResponse};
use crate::state::AppState;

impl From<ExperienceError> for ApiError {
    fn from(e: ExperienceError) -> Self {
        match e {
            ExperienceError::NotFound(m) => ApiError::NotFound(m),
            ExperienceError::Invalid { param, message } => ApiError::invalid(param, message),
            ExperienceError::Conflict(m) => ApiError::Invalid { param: None, message: m, code: "conflict" },
            ExperienceError::Busy(m) => ApiError::Overloaded(m),
            ExperienceError::Store(m) => ApiError::Internal(m),
            ExperienceError::Unwritable(m) => ApiError::Unavailable(m),
        }
    }
}

fn service(state: &AppState) -> Result<&Arc<Experiences>, ApiError> {
    state.experiences()
}

/// `GET /v1/experiences`.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let libraries = service(&state)?.list().await?;
    Ok(Json(serde_json::json!({"object": "list", "data": libraries})).into_response())
}

/// `GET /v1/experiences/{name}`.
pub async fn get(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(service(&state)?.get(&name).await?).into_response())
}

/// `GET /v1/experiences/{name}/versions/{version}`.
pub async fn get_version(State(state): State<Arc<AppState>>, Path((name, version)): Path<(String, String)>) -> Result<Response, ApiError> {
    let v = version.parse::<u64>().map_err(|_| ApiError::invalid("version", format!("`version` must be a number, got `{version}`")))?;
    Ok(Json(service(&state)?.get_version(&name, v).await?).into_response())
}

/// Body of `POST .../items` and `PATCH .../items/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemBody {
    /// The experience (4-40 words).
    pub text: String,
}

fn item_id(id: &str) -> Result<u64, ApiError> {
    id.parse::<u64>().map_err(|_| ApiError::invalid("id", format!("an item id is a number, got `{id}`")))
}

/// `POST /v1/experiences/{name}/items`: a new version with one more item
/// (the library is created if needed).
pub async fn add_item(
    State(state): State<Arc<AppState>>,
    LibraryWriter(who): LibraryWriter,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<ItemBody>,
) -> Result<Response, ApiError> {
    let lib = service(&state)?.add_item(&name, &body.text, &who.actor()).await?;
    Ok((StatusCode::CREATED, Json(lib)).into_response())
}

/// `PATCH /v1/experiences/{name}/items/{id}`.
pub async fn edit_item(
    State(state): State<Arc<AppState>>,
    LibraryWriter(who): LibraryWriter,
    Path((name, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<ItemBody>,
) -> Result<Response, ApiError> {
    Ok(Json(service(&state)?.edit_item(&name, item_id(&id)?, &body.text, &who.actor()).await?).into_response())
}

/// `DELETE /v1/experiences/{name}/items/{id}`.
pub async fn delete_item(
    State(state): State<Arc<AppState>>,
    LibraryWriter(who): LibraryWriter,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(service(&state)?.delete_item(&name, item_id(&id)?, &who.actor()).await?).into_response())
}

/// Body of `POST .../rollback`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// A kept version.
    pub version: u64,
}

/// `POST /v1/experiences/{name}/rollback`: a new version holding an old
/// version's items.
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    LibraryWriter(who): LibraryWriter,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<RollbackBody>,
) -> Result<Response, ApiError> {
    Ok(Json(service(&state)?.rollback(&name, body.version, &who.actor()).await?).into_response())
}

/// `POST /v1/experiences/{name}/learn`: starts a job; 202 with its status.
pub async fn learn(
    State(state): State<Arc<AppState>>,
    LibraryWriter(who): LibraryWriter,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<LearnRequest>,
) -> Result<Response, ApiError> {
    let status = service(&state)?.start_learn(&name, body, &who.actor()).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// `GET /v1/experiences/jobs`.
pub async fn jobs(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    Ok(Json(serde_json::json!({"object": "list", "data": service(&state)?.jobs()})).into_response())
}

/// `GET /v1/experiences/jobs/{id}`.
pub async fn job(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(service(&state)?.job(&id)?).into_response())
}

/// `DELETE /v1/experiences/jobs/{id}`: cancels the job.
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    LibraryWriter(_): LibraryWriter,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(service(&state)?.cancel(&id)?).into_response())
}

/// `POST /v1/feedback`: rewards for the choices of an earlier `n > 1` chat
/// completion made with the caller's own key.
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(body): ApiJson<FeedbackRequest>,
) -> Result<Response, ApiError> {
    let owner = caller.owner();
    if let Some(limit) = state.feedback_limit() {
        // Every attempt counts, unknown ids too: ids cannot be probed fast.
        limit.take(owner.as_deref().unwrap_or("anonymous")).map_err(|wait| ApiError::RateLimited {
            message: format!(
                "at most {} feedback requests a minute per key (--feedback-per-minute); retry in {:.0} s",
                limit.per_minute(),
                wait.as_secs_f64().ceil()
            ),
            retry_after_s: wait.as_secs_f64().ceil() as u64,
        })?;
    }
    Ok(Json(service(&state)?.feedback(body, owner.as_deref(), &caller.actor()).await?).into_response())
}

/// What [`inject`] did: the library used and, for `n > 1`, the client's own
/// messages (logged for feedback).
#[derive(Debug, Default)]
pub struct Injected {
    used: Option<trainer::experience::Injection>,
    original: Option<Vec<ChatMessage>>,
}

impl Injected {
    /// The `ouro.experience` of the response.
    pub fn reported(&self) -> Option<ExperienceUsed> {
        self.used.as_ref().map(|u| ExperienceUsed { name: u.name.clone(), version: u.version })
    }
}

/// Chat hook, before validation: renders the library the request names (or
/// the server default) into the system prompt of `messages`. An unknown
/// library is a 400 naming `ouro.experience`.
pub async fn inject(
    state: &AppState,
    ouro: &Option<OuroRequest>,
    n: Option<i64>,
    messages: &mut Vec<ChatMessage>,
) -> Result<Injected, ApiError> {
    let requested = ouro.as_ref().and_then(|o| o.experience.as_deref());
    let Some(svc) = state.try_experiences() else {
        return match requested {
            Some(_) => Err(state
                .experiences_failed()
                .unwrap_or_else(|| ApiError::invalid("ouro.experience", "experience libraries are not enabled on this server"))),
            None => Ok(Injected::default()),
        };
    };
    let original = (n.unwrap_or(1) > 1).then(|| messages.clone());
    let used = svc.injection(requested).await?;
    if let Some(block) = used.as_ref().and_then(|u| u.block.as_deref()) {
        trainer::experience::inject::inject(messages, block);
    }
    Ok(Injected { used, original })
}

/// Chat hook, after a non-streamed answer: reports the library version in
/// `ouro.experience` and logs `n > 1` answers for `POST /v1/feedback`, as
/// made by `caller` (only it may rate them).
pub fn finish_chat(state: &AppState, caller: &Caller, resp: &mut ChatResponse, injected: Injected, results: &[ChoiceResult]) {
    if let Some(e) = injected.reported() {
        resp.ouro.get_or_insert_with(OuroResponse::default).experience = Some(e);
    }
    if let (Some(svc), Some(original)) = (state.try_experiences(), injected.original) {
        if results.len() > 1 {
            let choices = results.iter().map(|r| r.text.clone()).collect();
            svc.record_response(&resp.id, original, choices, injected.used, caller.owner());
        }
    }
}

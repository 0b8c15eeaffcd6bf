//! State shared by every route: the engine (once loaded) and the limits.

use std::sync::{Arc, OnceLock};

use engine::{unix_now, EngineHandle};

use crate::errors::ApiError;
use crate::ratelimit::RateLimiter;
use crate::validate::Limits;

/// What `GET /health?details=true` reports besides readiness.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthNotes {
    /// Configuration an operator should fix (e.g. a public address without keys).
    pub warnings: Vec<String>,
    /// Who may change experience libraries: `open` (no keys configured) or
    /// `admin key or scope experiences:write`.
    pub experience_writes: &'static str,
}

/// Shared application state.
#[derive(Debug, Default)]
pub struct AppState {
    engine: OnceLock<EngineHandle>,
    /// Request limits.
    pub limits: Limits,
    /// Unix seconds when the server started (the `created` of model cards).
    pub created: u64,
    /// Experience libraries (issue 7), once the engine is up.
    experiences: OnceLock<Arc<trainer::experience::Experiences>>,
    experiences_error: OnceLock<String>,
    /// The online speculator trainer (issue 5), when it runs.
    speculator: OnceLock<trainer::speculator::SpeculatorService>,
    /// Per-key budget of `POST /v1/feedback` (unset: no limit).
    feedback_limit: OnceLock<RateLimiter>,
    /// Warnings and access notes for `/health?details=true`.
    health_notes: OnceLock<HealthNotes>,
}

impl AppState {
    /// State with no engine yet (routes answer 503 until [`set_engine`](Self::set_engine)).
    pub fn new(limits: Limits) -> Self {
        Self {
            engine: OnceLock::new(),
            limits,
            created: unix_now(),
            experiences: OnceLock::new(),
            experiences_error: OnceLock::new(),
            speculator: OnceLock::new(),
            feedback_limit: OnceLock::new(),
            health_notes: OnceLock::new(),
        }
    }

    /// Installs the engine once the model is loaded.
    pub fn set_engine(&self, engine: EngineHandle) {
        crate::metrics::set_model_name(&engine.info().model_name);
        let _ = self.engine.set(engine);
    }

    /// The engine, or 503 while the model is loading.
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        self.engine.get().ok_or_else(|| ApiError::Unavailable("the model is still loading; retry when GET /health answers 200".into()))
    }

    /// The engine if loaded.
    pub fn try_engine(&self) -> Option<&EngineHandle> {
        self.engine.get()
    }

    // --- speculator trainer and admin (issue 5) ---

    /// Installs the speculator trainer.
    pub fn set_speculator(&self, svc: trainer::speculator::SpeculatorService) {
        crate::metrics::set_trainer(svc.clone());
        let _ = self.speculator.set(svc);
    }

    /// The speculator trainer, if it runs.
    pub fn speculator(&self) -> Option<&trainer::speculator::SpeculatorService> {
        self.speculator.get()
    }

    // --- access (who may do what is resolved by the API-key layer, crate::guard) ---

    /// Limits `POST /v1/feedback` to `per_minute` requests a minute per key.
    pub fn set_feedback_per_minute(&self, per_minute: u32) {
        let _ = self.feedback_limit.set(RateLimiter::new(per_minute));
    }

    /// The feedback budget, if limited.
    pub fn feedback_limit(&self) -> Option<&RateLimiter> {
        self.feedback_limit.get()
    }

    /// Sets what `/health?details=true` reports.
    pub fn set_health_notes(&self, notes: HealthNotes) {
        let _ = self.health_notes.set(notes);
    }

    /// What `/health?details=true` reports.
    pub fn health_notes(&self) -> HealthNotes {
        self.health_notes.get().cloned().unwrap_or(HealthNotes { warnings: Vec::new(), experience_writes: "open" })
    }

    // --- experience libraries (issue 7) ---

    /// Installs the experience service (and exports its metrics).
    pub fn set_experiences(&self, exp: Arc<trainer::experience::Experiences>) {
        crate::metrics::set_experiences(exp.clone());
        let _ = self.experiences.set(exp);
    }

    /// Records why the experience store could not open (a read-only or full
    /// state folder): serving goes on and the experience routes say why.
    pub fn set_experiences_error(&self, why: String) {
        let _ = self.experiences_error.set(why);
    }

    /// The experience service, or 503 before it is installed (or when its
    /// store could not open).
    pub fn experiences(&self) -> Result<&Arc<trainer::experience::Experiences>, ApiError> {
        self.experiences.get().ok_or_else(|| {
            self.experiences_failed()
                .unwrap_or_else(|| ApiError::Unavailable("experience libraries are not ready; retry when GET /health answers 200".into()))
        })
    }

    /// The 503 to answer when the experience store could not open, if it
    /// could not.
    pub fn experiences_failed(&self) -> Option<ApiError> {
        self.experiences_error.get().map(|why| ApiError::Unavailable(format!("experience libraries are unavailable: {why}")))
    }

    /// The experience service if installed.
    pub fn try_experiences(&self) -> Option<&Arc<trainer::experience::Experiences>> {
        self.experiences.get()
    }
}

//! State shared by every route: the engine (once loaded) and the limits.

use std::sync::OnceLock;

use engine::EngineHandle;

use crate::errors::ApiError;
use crate::validate::Limits;

/// Shared application state.
#[derive(Debug, Default)]
pub struct AppState {
    engine: OnceLock<EngineHandle>,
    /// Request limits.
    pub limits: Limits,
    /// Unix seconds when the server started (the `created` of model cards).
    pub created: u64,
}

impl AppState {
    /// State with no engine yet (routes answer 503 until [`set_engine`](Self::set_engine)).
    pub fn new(limits: Limits) -> Self {
        Self { engine: OnceLock::new(), limits, created: unix_now() }
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
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

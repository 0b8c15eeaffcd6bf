//! The engine's error type: one enum with structured variants, mapped to
//! HTTP statuses by the server.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A model file is malformed or incomplete.
    #[error("model {path}: {message}")]
    Model {
        /// The model file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model names an architecture the engine does not implement.
    #[error("unsupported architecture `{arch}` (supported: llama, qwen2, qwen3)")]
    UnsupportedArch {
        /// The architecture name found in the model.
        arch: String,
    },
    /// A tensor the architecture needs is not in the model.
    #[error("model {path}: missing tensor `{name}`")]
    MissingTensor {
        /// The model file or folder.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A request does not fit the engine's limits.
    #[error("{message}")]
    Invalid {
        /// Which request field is at fault.
        param: Option<&'static str>,
        /// What is wrong, with the limit and the value.
        message: String,
    },
    /// The waiting queue is full.
    #[error("the server is overloaded: {waiting} requests are already waiting (limit {limit})")]
    Overloaded {
        /// Requests waiting now.
        waiting: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    EngineStopped,
    /// An error from candle (loading, re-quantization, speculator).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    /// A malformed or incomplete model or model-related file.
    pub fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EngineError::Model { path: path.into(), message: message.into() }
    }
    /// A file that could not be read or written.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

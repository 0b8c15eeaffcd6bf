//! # ouro engine
//!
//! Everything that turns tokens into tokens. (Module map filled in as the
//! modules land.)

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod chat_template;
pub mod config;
pub mod error;
pub mod kv;
pub mod loader;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};

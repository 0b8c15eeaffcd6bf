//! # ouro engine
//!
//! Everything that turns tokens into tokens.
//!
//! - [`loader::load`] opens a GGUF file or a Hugging Face folder into a
//!   [`loader::LoadedModel`]: the [`model::Model`] (weights, read through
//!   [`weights`]), its [`tokenizer::Tokenizer`] and [`chat_template::ChatTemplate`].
//! - [`handle::spawn`] moves it into the engine thread and returns an
//!   [`EngineHandle`]; [`EngineHandle::submit`] takes a [`GenerateRequest`]
//!   and streams [`Event`]s back.
//! - Inside the thread, the scheduler packs prefill chunks and decode rows of
//!   every running sequence into one batched forward pass over the paged
//!   [`kv::KvCache`]; [`sampling`] and [`stop`] turn logits into text.
//!
//! ```no_run
//! # fn main() -> engine::Result<()> {
//! use engine::{handle, loader, weights::Requant, GenerateRequest};
//! let loaded = loader::load("model.gguf".as_ref(), Requant::None, &|_, _| {})?;
//! let engine = handle::spawn(loaded, handle::EngineConfig::default())?;
//! let prompt = engine.info().tokenizer.encode("Hello", true)?;
//! let mut gen = engine.submit(GenerateRequest::greedy(prompt, 16))?;
//! while let Some(event) = gen.events.blocking_recv() { println!("{event:?}"); }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod chat_template;
pub mod config;
mod engine;
pub mod error;
pub mod fault;
pub mod handle;
pub mod kv;
pub mod loader;
pub mod model;
pub mod request;
pub mod sampling;
mod scheduler;
mod sequence;
pub mod spec;
pub mod stop;
pub mod tca;
pub mod tokenizer;
pub mod trace;
pub mod weights;

/// Seconds since the Unix epoch (0 if the clock is before it): the one
/// timestamp every crate writes into manifests, versions and responses.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub use error::{EngineError, Result};
pub use handle::{EngineConfig, EngineHandle, KvDtype};
pub use request::{Event, FinishReason, GenerateRequest};

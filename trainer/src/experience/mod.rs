//! Experience libraries (Training-Free GRPO, arXiv 2510.08191): reusable
//! natural-language experiences learned from groups of rated completions and
//! injected into later prompts; no weight changes.
//!
//! - [`store`]: named, versioned libraries in SQLite (every change a new
//!   version, old versions kept, rollback).
//! - [`inject`]: a library rendered into a system prompt, token-capped.
//! - [`verify`]: rewards from code (`exact`, `numeric`, `regex`, `contains`,
//!   `boxed`), with a critique line per failed attempt.
//! - [`llm`]: the [`llm::Llm`] trait over the served model and any
//!   OpenAI-compatible endpoint.
//! - [`contrast`]: what a group's rewards show, read by code (the words
//!   only better attempts wrote; the worked example an experience carries).
//! - [`distill`]: the LLM steps (semantic advantage, operations through a
//!   schema-guided decoder or robust JSON parsing, [`parse`]), then
//!   [`ops`]: consolidation and application in code.
//! - [`job`]: learn jobs (rollouts, distillation, the held-out gate) and
//!   online feedback groups.
//! - [`Experiences`] ties them together for the server: the serving path
//!   reads an in-memory copy of each current version (never SQLite, never a
//!   job); writes run on `spawn_blocking`; jobs run on tokio tasks.
//!
//! ```no_run
//! # async fn demo(engine: engine::EngineHandle) -> Result<(), trainer::experience::ExperienceError> {
//! use trainer::experience::{Experiences, ServiceConfig};
//! let exp = Experiences::open(ServiceConfig::new("state/experiences.sqlite".into()), engine, None)?;
//! // `actor` is who the version is recorded as made by (the server passes a hash of the caller's key).
//! exp.add_item("math", "Always write the final answer inside \\boxed{}.", "admin").await?;
//! let injected = exp.injection(Some("math")).await?; // system prompt block + version
//! # Ok(()) }
//! ```

pub mod contrast;
pub mod distill;
pub mod inject;
pub mod job;
pub mod llm;
pub mod ops;
pub mod parse;
mod service;
pub mod store;
pub mod verify;

pub use job::{FeedbackAck, FeedbackRequest, JobState, JobStatus, LearnRequest};
pub use service::{Experiences, Injection, LibraryView, MetricsSnapshot, ServiceConfig};
pub use store::Origin;

/// What the experience service can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExperienceError {
    /// No such library, version, item, job or response.
    #[error("{0}")]
    NotFound(String),
    /// A request field is wrong.
    #[error("{message}")]
    Invalid {
        /// The field at fault.
        param: String,
        /// What is wrong, with the value.
        message: String,
    },
    /// A concurrent change got there first.
    #[error("{0}")]
    Conflict(String),
    /// A queue is full.
    #[error("{0}")]
    Busy(String),
    /// SQLite failed.
    #[error("experience store: {0}")]
    Store(String),
    /// The store's disk refuses writes (read-only or full).
    #[error("{0}")]
    Unwritable(String),
}

impl ExperienceError {
    /// An [`ExperienceError::Invalid`].
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ExperienceError::Invalid { param: param.into(), message: message.into() }
    }
}

/// Checks a library name: 1-64 of `A-Z a-z 0-9 _ . -`, starting with a
/// letter or digit, and not `jobs` (a route).
pub fn check_name(name: &str) -> Result<(), ExperienceError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name != "jobs";
    if ok {
        Ok(())
    } else {
        Err(ExperienceError::invalid(
            "name",
            format!(
                "`{name}` is not a valid library name (1-64 letters, digits, `_`, `.`, `-`, starting with a letter or digit; not `jobs`)"
            ),
        ))
    }
}

/// Checks an item's text: 4-40 words.
pub fn check_text(text: &str) -> Result<String, ExperienceError> {
    let t = text.trim();
    let words = t.split_whitespace().count();
    if (parse::MIN_WORDS..=parse::MAX_WORDS).contains(&words) {
        Ok(t.to_string())
    } else {
        Err(ExperienceError::invalid(
            "text",
            format!("an experience must have {} to {} words, got {words}", parse::MIN_WORDS, parse::MAX_WORDS),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_texts_are_checked() {
        assert!(check_name("math-v2.1_x").is_ok());
        for bad in ["", "jobs", "-x", "a b", "a/b", "a@1", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_text("too short").is_err());
        assert_eq!(check_text("  four words right here ").unwrap(), "four words right here");
    }
}

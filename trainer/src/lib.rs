//! # ouro trainer
//!
//! Everything that learns from traffic:
//! - [`speculator`]: online training of the speculator from the engine's
//!   traces, versions, gates, hot swaps and rollbacks (Aurora).
//! - [`experience`]: experience libraries distilled from rated completions
//!   (Training-Free GRPO), stored in SQLite and injected into prompts.

pub mod experience;
pub mod speculator;

//! Speculative decoding: drafters propose tokens, the target verifies them
//! in the same batched forward pass as every other row of the step.
//!
//! - [`Drafter`]: the trait; [`NgramDrafter`] (prompt lookup, no model) and
//!   [`SpeculatorDrafter`] (the EAGLE-3-style [`head::SpecHead`]) implement it.
//! - [`state::SpecSeqState`]: per-sequence draft context (committed
//!   positions with the target's features, the head's cached keys/values).
//! - [`policy::Policy`]: picks the drafter and k per sequence and step from
//!   measured acceptance and measured step time; turns drafting off when it
//!   does not pay.
//! - Verification itself is in `kernels::verify` (greedy and rejection
//!   sampling), driven by the engine step.

pub mod head;
pub mod ngram;
pub mod policy;
pub mod speculator;
pub mod state;

use kernels::verify::SparseDist;
use rand_chacha::ChaCha8Rng;

pub use ngram::NgramDrafter;
pub use state::{SpecSeqState, SpeculatorDrafter};

use crate::error::Result;
use crate::sampling::SamplingParams;

/// Which drafter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrafterKind {
    /// Prompt lookup.
    Ngram,
    /// The trained head.
    Speculator,
}

impl DrafterKind {
    /// Both, in a fixed order (metrics and arrays index by it).
    pub const ALL: [DrafterKind; 2] = [DrafterKind::Ngram, DrafterKind::Speculator];

    /// Label used in metrics and responses.
    pub fn name(self) -> &'static str {
        match self {
            DrafterKind::Ngram => "ngram",
            DrafterKind::Speculator => "speculator",
        }
    }

    /// Index into per-drafter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `--speculation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpecMode {
    /// No speculation.
    Off,
    /// Always the n-gram drafter (k from the policy, never off).
    Ngram,
    /// Always the speculator (k from the policy, never off).
    Speculator,
    /// Drafter and k from measured utility, off when it does not pay.
    #[default]
    Auto,
}

impl SpecMode {
    /// Parses `off|ngram|speculator|auto`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(SpecMode::Off),
            "ngram" => Some(SpecMode::Ngram),
            "speculator" => Some(SpecMode::Speculator),
            "auto" => Some(SpecMode::Auto),
            _ => None,
        }
    }
}

/// A request's own speculation setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecRequest {
    /// The mode for this request.
    pub mode: SpecMode,
    /// A fixed draft length, if any.
    pub k: Option<usize>,
}

/// Longest draft chain.
pub const MAX_K: usize = 8;

/// Drafted tokens and the draft distribution each was drawn from.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// The tokens, in order.
    pub tokens: Vec<u32>,
    /// For each token, the distribution it was drawn from (a point mass for
    /// deterministic drafters).
    pub q: Vec<SparseDist>,
}

impl Draft {
    /// Empties the draft.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.q.clear();
    }
    /// Appends a deterministic proposal.
    pub fn push_point(&mut self, token: u32) {
        self.tokens.push(token);
        self.q.push(SparseDist::point(token));
    }
}

/// What a drafter sees of a sequence.
pub struct DraftContext<'a> {
    /// The sequence so far; the last token is the one the next forward feeds.
    pub tokens: &'a [u32],
    /// Per-sequence draft state.
    pub state: &'a mut SpecSeqState,
    /// The request's sampling settings (draft distributions use them).
    pub sampling: &'a SamplingParams,
    /// The sequence's RNG (sampled drafts draw from it).
    pub rng: &'a mut ChaCha8Rng,
}

/// A source of draft tokens.
pub trait Drafter {
    /// Label for metrics.
    fn name(&self) -> &'static str;
    /// Proposes up to `k` tokens to follow `ctx.tokens` into `out` (cleared
    /// first). An empty draft means "nothing to propose"; `Err` only for real
    /// failures (the step then runs without drafts for this sequence).
    fn draft(&mut self, ctx: &mut DraftContext<'_>, k: usize, out: &mut Draft) -> Result<()>;
}

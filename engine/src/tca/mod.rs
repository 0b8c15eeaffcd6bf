//! TCA-Attention (arXiv 2512.09238): calibrated per-head sparse attention
//! that compresses the KV cache.
//!
//! - [`budgets`]: the per-(layer, KV head) budget distributions `p*`, their
//!   candidates, and the budgets file (model fingerprint, `b`, `w`, `tau`,
//!   `alpha`), written atomically and checked on load.
//! - [`select`]: the online selection of one head (redundancy per block,
//!   budgets by rank, top-t tokens per block).
//! - [`observe`]: the recent queries of a sequence that judge its entries.
//! - [`compress`]: applies the selection to a sequence's paged KV cache
//!   after a forward pass (scores from the last query, then compaction).
//! - [`calibrate`]: one full-attention pass over calibration text chooses
//!   `p*` per head.
//! - [`sensitivity`]: optional per-layer thresholds from what compressing
//!   each group of layers costs in perplexity.
//! - [`solo`]: one sequence on its own cache, for the benchmark and tests.
//! - [`passkey`]: the passkey retrieval prompts they share.

pub mod budgets;
pub mod calibrate;
pub mod compress;
pub mod observe;
pub mod passkey;
pub mod select;
pub mod sensitivity;
pub mod solo;

pub use budgets::{HeadBudget, TcaBudgets, TcaParams};
pub use compress::Compressor;
pub use observe::QueryWindow;

/// KV compression mode of the engine or of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCompression {
    /// Full attention: every entry is kept.
    #[default]
    None,
    /// TCA-Attention with the engine's budgets.
    Tca,
}

impl KvCompression {
    /// Parses `none` or `tca`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "tca" => Some(Self::Tca),
            _ => None,
        }
    }
    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tca => "tca",
        }
    }
}

/// The bundled calibration text (see its header for the source).
pub const CALIBRATION_TEXT: &str = include_str!("calibration_text.txt");

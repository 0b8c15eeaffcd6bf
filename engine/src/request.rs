//! What a client submits to the engine and what it gets back.
//!
//! A [`GenerateRequest`] is already tokenized and validated by the server; the
//! engine answers on the request's own channel with a stream of [`Event`]s:
//! one [`Event::Token`] per generated token of each choice, then one
//! [`Event::Finished`] per choice. Dropping the receiver cancels the request.

use std::time::Instant;

use crate::sampling::{SamplingParams, TokenLogprob};
use crate::spec::{DrafterKind, SpecRequest};

/// A generation request, tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Sampling settings (the seed already chosen).
    pub sampling: SamplingParams,
    /// Most tokens to generate per choice.
    pub max_tokens: usize,
    /// Strings that end generation (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end generation (besides the model's end-of-sequence).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Independent completions of the same prompt (the prompt is computed once).
    pub n: usize,
    /// Number of alternatives to report per token; `None`: no logprobs.
    pub logprobs: Option<usize>,
    /// Whether special tokens are left out of the text.
    pub skip_special_tokens: bool,
    /// Overrides the engine's speculation mode (and draft length) for this
    /// request; `None` follows the engine's policy.
    pub speculation: Option<SpecRequest>,
    /// Overrides the engine's KV compression for this request (`None`
    /// follows the engine; `KvCompression::None` gives exact full attention).
    pub kv_compression: Option<crate::tca::KvCompression>,
}

impl GenerateRequest {
    /// A greedy request for `max_tokens` tokens, no stops, one choice.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            n: 1,
            logprobs: None,
            skip_special_tokens: true,
            speculation: None,
            kv_compression: None,
        }
    }
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token of one choice.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Which choice (0..n).
    pub choice: usize,
    /// The token id.
    pub token: u32,
    /// Text released with this token (may be empty: incomplete UTF-8, text
    /// held back by a possible stop string, or a skipped special token).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprob: Option<TokenLogprob>,
    /// The drafter whose proposal this token was (accepted by the target);
    /// `None` for tokens the target chose itself.
    pub drafted_by: Option<DrafterKind>,
}

/// Speculative decoding statistics of one choice.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecStats {
    /// Verification steps that had drafts.
    pub drafting_steps: usize,
    /// Drafted tokens.
    pub drafted: usize,
    /// Accepted drafted tokens.
    pub accepted: usize,
    /// Drafted tokens per drafter (`DrafterKind::index`).
    pub drafted_by: [usize; 2],
    /// Accepted tokens per drafter.
    pub accepted_by: [usize; 2],
}

impl SpecStats {
    /// Mean tokens per drafting step (accepted drafts plus the target's own
    /// token), as vLLM's mean acceptance length.
    pub fn mean_acceptance_length(&self) -> f64 {
        if self.drafting_steps == 0 {
            0.0
        } else {
            1.0 + self.accepted as f64 / self.drafting_steps as f64
        }
    }

    /// The drafter that proposed most tokens, if any drafted.
    pub fn main_drafter(&self) -> Option<DrafterKind> {
        DrafterKind::ALL.into_iter().filter(|d| self.drafted_by[d.index()] > 0).max_by_key(|d| self.drafted_by[d.index()])
    }
}

/// Timestamps of a choice's life.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the request was submitted.
    pub queued: Instant,
    /// When it first got rows in a forward pass.
    pub scheduled: Instant,
    /// When its first token was sampled.
    pub first_token: Instant,
    /// When it finished.
    pub finished: Instant,
}

/// The end of one choice.
#[derive(Debug, Clone)]
pub struct FinishEvent {
    /// Which choice.
    pub choice: usize,
    /// Why it ended.
    pub reason: FinishReason,
    /// Text released at the end (what was held back for stop strings).
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated for this choice.
    pub completion_tokens: usize,
    /// Timestamps.
    pub timing: Timing,
    /// Speculative decoding statistics.
    pub spec: SpecStats,
}

/// What the engine sends back for a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new token.
    Token(TokenEvent),
    /// A choice ended.
    Finished(FinishEvent),
    /// The request failed inside the engine; no more events follow.
    Error(String),
}

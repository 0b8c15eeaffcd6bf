//! What the engine tells the trainer after each step, per sequence.
//!
//! A [`Trace`] covers consecutive rows of one sequence whose target hidden
//! states were captured: committed rows (the token at the row and the token
//! that follows it are final) and, after a rejected draft, one "discard" row
//! at the position of the first rejected draft, for the trainer's discard
//! term. Traces go out with `try_send` on a bounded crossbeam channel: when
//! the channel is full the trace is dropped and counted, never waited for.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Sender, TrySendError};

use crate::spec::DrafterKind;

/// One step of one sequence, as seen by the trainer.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Unique id of the sequence (stable across its steps).
    pub seq_id: u64,
    /// Position of the first row.
    pub start_pos: usize,
    /// Token fed at each row.
    pub tokens: Vec<u32>,
    /// Token that follows each committed row (the target's choice: a prompt
    /// token, an accepted draft, or the sampled correction/bonus).
    pub next_tokens: Vec<u32>,
    /// Whether the last row is a discard row (features of a rejected draft;
    /// it has no entry in `next_tokens`).
    pub discard: bool,
    /// The drafter of this step, if it drafted.
    pub drafter: Option<DrafterKind>,
    /// The drafted tokens (empty when it did not draft).
    pub drafts: Vec<u32>,
    /// How many drafts the target accepted.
    pub accepted: usize,
    /// Target features per row: three layers (low, middle, high) of
    /// `hidden_size` each.
    pub features: Vec<f32>,
    /// The target's final hidden state per row (times the LM head: logits).
    pub last_hidden: Vec<f32>,
    /// Speculator version that drafted (if it was the speculator).
    pub speculator_version: Option<u64>,
    /// Whether the rows come from a prompt (prefill) rather than decoding.
    pub prefill: bool,
}

impl Trace {
    /// Rows in the trace.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// Approximate heap bytes (the trainer bounds its replay window by it).
    pub fn bytes(&self) -> usize {
        4 * (self.tokens.len() + self.next_tokens.len() + self.drafts.len() + self.features.len() + self.last_hidden.len()) + 96
    }
}

/// The engine's end of the trace channel.
#[derive(Debug)]
pub struct TraceSink {
    tx: Sender<Trace>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl TraceSink {
    /// Wraps a bounded sender.
    pub fn new(tx: Sender<Trace>) -> Self {
        Self { tx, sent: AtomicU64::new(0), dropped: AtomicU64::new(0) }
    }

    /// Sends without waiting; a full or closed channel drops the trace.
    pub fn send(&self, t: Trace) {
        match self.tx.try_send(t) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Traces sent.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Traces dropped because the channel was full (or closed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

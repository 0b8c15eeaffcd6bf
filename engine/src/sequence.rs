//! One choice of one request as the engine tracks it: its tokens, its KV
//! cache, how far the cache is computed, and the per-token output pipeline
//! (sampling, detokenization, stop rules, events to the client).
//!
//! Invariant: `tokens[..n_cached]` have their keys and values in the cache;
//! the next forward feeds `tokens[n_cached..]` (the whole prompt, a prefill
//! chunk, or the one last sampled token), and the logits of the row for the
//! last token give the next token.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use kernels::verify::{verify_sampled, SparseDist, Verdict};
use rand::Rng;

use crate::kv::SeqKvId;
use crate::request::{Event, FinishEvent, FinishReason, SpecStats, Timing, TokenEvent};
use crate::sampling::{logprobs, Distribution, SampleScratch, Sampler, TokenLogprob};
use crate::spec::{DrafterKind, SpecSeqState};
use crate::stop::StopStrings;
use crate::tca::QueryWindow;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// Settings shared by every choice of a request.
#[derive(Debug)]
pub(crate) struct SeqOptions {
    pub max_tokens: usize,
    /// Ids that end generation: the model's EOS ids (unless `ignore_eos`)
    /// and the request's stop tokens.
    pub stop_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub skip_special: bool,
    /// The model's context length.
    pub max_position: usize,
    /// Per-request speculation override.
    pub speculation: Option<crate::spec::SpecRequest>,
    /// Whether TCA compresses this request's KV cache.
    pub tca: bool,
}

/// One choice in the engine.
#[derive(Debug)]
pub(crate) struct Sequence {
    pub choice: usize,
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub kv: Option<SeqKvId>,
    pub n_cached: usize,
    pub sampler: Sampler,
    pub opts: Arc<SeqOptions>,
    /// Choices still to be forked from this one once its prompt is computed.
    pub forks: usize,
    /// Order of admission (preemption picks the youngest).
    pub admitted: u64,
    /// Unique id (traces group by it).
    pub seq_id: u64,
    /// Draft context, when speculation or tracing is on.
    pub spec: Option<SpecSeqState>,
    /// Speculative decoding statistics so far.
    pub spec_stats: SpecStats,
    /// TCA: the queries of the last fed positions, when compression is on.
    pub tca_window: Option<QueryWindow>,
    detok: DecodeStream,
    stop: StopStrings,
    tx: UnboundedSender<Event>,
    queued: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    finished: bool,
    /// A stop string ended the output: nothing held back is released.
    hit_stop_string: bool,
}

/// Number of prompt ids the detokenizer is seeded with (for spacing).
const DETOK_CONTEXT: usize = 4;

impl Sequence {
    pub fn new(
        choice: usize,
        prompt: Vec<u32>,
        sampler: Sampler,
        opts: Arc<SeqOptions>,
        forks: usize,
        tx: UnboundedSender<Event>,
        queued: Instant,
    ) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(DETOK_CONTEXT)..];
        let detok = if opts.skip_special { DecodeStream::new(tail) } else { DecodeStream::new(tail).keep_special() };
        let stop = StopStrings::new(&opts.stop);
        Self {
            choice,
            prompt_len: prompt.len(),
            tokens: prompt,
            kv: None,
            n_cached: 0,
            sampler,
            opts,
            forks,
            admitted: 0,
            seq_id: 0,
            spec: None,
            spec_stats: SpecStats::default(),
            tca_window: None,
            detok,
            stop,
            tx,
            queued,
            scheduled: None,
            first_token: None,
            finished: false,
            hit_stop_string: false,
        }
    }

    /// A sibling choice sharing this one's prompt (for `n > 1`): same
    /// tokens and cached length, its own sampler, detokenizer and stops.
    pub fn fork(&self, choice: usize, sampler: Sampler, kv: SeqKvId) -> Self {
        let mut s = Self::new(choice, self.tokens.clone(), sampler, self.opts.clone(), 0, self.tx.clone(), self.queued);
        s.kv = Some(kv);
        s.n_cached = self.n_cached;
        s.scheduled = self.scheduled;
        s.admitted = self.admitted;
        s.spec = self.spec.clone();
        s.tca_window = self.tca_window.clone();
        s
    }

    /// Tokens still to feed.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.n_cached
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether the client has gone away.
    pub fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn mark_scheduled(&mut self, now: Instant) {
        self.scheduled.get_or_insert(now);
    }

    /// Forgets the cache (after preemption): the whole sequence so far is
    /// computed again as a prompt when it is admitted next.
    pub fn reset_cache(&mut self) {
        self.kv = None;
        self.n_cached = 0;
        self.tca_window = None;
    }

    /// Samples the next token from `logits` and runs it through the output
    /// pipeline. Returns why the choice ended, if it did.
    pub fn sample_next(&mut self, logits: &[f32], tok: &Tokenizer, scratch: &mut SampleScratch) -> Option<FinishReason> {
        let token = self.sampler.sample(logits, scratch);
        let lp = self.opts.logprobs.map(|n| logprobs(logits, token, n));
        self.accept(token, lp, None, tok)
    }

    /// Verifies one drafted token `draft` (drawn from `q`) against the
    /// target's `logits` at its position: greedy, the target's choice must
    /// equal it; sampling, rejection sampling keeps the target's
    /// distribution exact. Returns the token to emit and whether it is the
    /// draft.
    pub fn verify_draft(
        &mut self,
        logits: &[f32],
        draft: u32,
        q: &SparseDist,
        scratch: &mut SampleScratch,
        dist: &mut Distribution,
    ) -> (u32, bool) {
        if self.sampler.params().is_greedy() {
            let t = self.sampler.sample(logits, scratch);
            return (t, t == draft);
        }
        self.sampler.distribution(logits, scratch, dist);
        let (u1, u2) = (self.sampler.rng().random::<f32>(), self.sampler.rng().random::<f32>());
        match verify_sampled(dist, q, draft, u1, u2) {
            Verdict::Accept => (draft, true),
            Verdict::Replace(t) => (t, false),
        }
    }

    /// The log-probabilities of `token` under `logits`, when asked for.
    pub fn logprob(&self, logits: &[f32], token: u32) -> Option<TokenLogprob> {
        self.opts.logprobs.map(|n| logprobs(logits, token, n))
    }

    /// Appends `token` (already chosen) and emits it. Returns why the choice
    /// ended, if it did.
    pub fn accept(
        &mut self,
        token: u32,
        logprob: Option<TokenLogprob>,
        drafted_by: Option<DrafterKind>,
        tok: &Tokenizer,
    ) -> Option<FinishReason> {
        self.first_token.get_or_insert_with(Instant::now);
        self.tokens.push(token);
        self.sampler.observe(token);
        if self.opts.stop_ids.contains(&token) {
            self.send_token(token, String::new(), logprob, drafted_by);
            return Some(FinishReason::Stop);
        }
        let piece = self.detok.push(tok, token).unwrap_or_default();
        let check = self.stop.push(&piece);
        self.send_token(token, check.text, logprob, drafted_by);
        if check.stopped {
            self.hit_stop_string = true;
            return Some(FinishReason::Stop);
        }
        if self.generated() >= self.opts.max_tokens || self.tokens.len() >= self.opts.max_position {
            return Some(FinishReason::Length);
        }
        None
    }

    fn send_token(&self, token: u32, text: String, logprob: Option<TokenLogprob>, drafted_by: Option<DrafterKind>) {
        let _ = self.tx.send(Event::Token(TokenEvent { choice: self.choice, token, text, logprob, drafted_by }));
    }

    /// Sends the final event (releasing held-back text unless a stop string
    /// ended the output).
    pub fn finish(&mut self, reason: FinishReason, tok: &Tokenizer) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut text = String::new();
        if !self.hit_stop_string {
            let rest = self.detok.finish(tok).unwrap_or_default();
            text = self.stop.push(&rest).text;
            text.push_str(&self.stop.finish());
        }
        let now = Instant::now();
        let timing = Timing {
            queued: self.queued,
            scheduled: self.scheduled.unwrap_or(now),
            first_token: self.first_token.unwrap_or(now),
            finished: now,
        };
        let _ = self.tx.send(Event::Finished(FinishEvent {
            choice: self.choice,
            reason,
            text,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            timing,
            spec: self.spec_stats,
        }));
    }

    /// Reports an engine failure for this request.
    pub fn fail(&mut self, message: &str) {
        if !self.finished {
            self.finished = true;
            let _ = self.tx.send(Event::Error(message.to_string()));
        }
    }
}

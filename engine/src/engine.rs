//! The engine thread: owns the model, the KV cache and the scheduler, and
//! runs one step after another.
//!
//! A step: take new requests, drop those whose client left, plan one decode
//! row per decoding sequence, let the policy add draft rows to some of them,
//! plan prefill chunks with the remaining budget, run one forward pass over
//! all rows, then for every sequence whose pending tokens were all fed:
//! verify its drafts in order, emit the accepted tokens and the target's own
//! next token, and roll the rejected rows out of the KV cache. When nothing
//! runs the thread blocks on its command channel.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use kernels::attention::KvElem;
use kernels::ThreadPool;

use crate::handle::{Command, EngineConfig, EngineStats, SpeculatorSlot};
use crate::kv::KvCache;
use crate::model::{Batch, BatchSeq, Capture, ForwardOutput, Model, Workspace};
use crate::request::{FinishReason, GenerateRequest};
use crate::sampling::{Distribution, SampleScratch, Sampler, SamplingParams};
use crate::scheduler::{Planned, Scheduler};
use crate::sequence::{SeqOptions, Sequence};
use crate::spec::policy::{Choice, Policy};
use crate::spec::speculator::{default_feature_layers, Speculator};
use crate::spec::state::WINDOW;
use crate::spec::{Draft, DraftContext, Drafter, DrafterKind, NgramDrafter, SpecSeqState, SpeculatorDrafter};
use crate::tca::{Compressor, KvCompression, QueryWindow};
use crate::tokenizer::Tokenizer;
use crate::trace::{Trace, TraceSink};

/// Drafts attached to one planned sequence.
#[derive(Debug, Default)]
struct StepDraft {
    drafter: Option<DrafterKind>,
    draft: Draft,
}

/// Where a planned sequence's rows sit in the batch.
#[derive(Debug, Clone, Copy)]
struct RowSpan {
    /// Rows of this sequence in the batch (fed tokens plus drafts).
    n_rows: usize,
    /// Index of its first logits row, if it has logits.
    logits0: Option<usize>,
    /// Index of its first captured row, and how many.
    hidden0: usize,
    hidden_n: usize,
}

/// The engine's state, owned by its thread.
pub(crate) struct Engine<E: KvElem> {
    model: Model,
    kv: KvCache<E>,
    pool: Arc<ThreadPool>,
    tokenizer: Arc<Tokenizer>,
    rx: Receiver<Command>,
    stats: Arc<EngineStats>,
    sched: Scheduler,
    max_position: usize,
    policy: Policy,
    speculator_slot: Option<SpeculatorSlot>,
    /// The version last seen in the slot, and its frozen serving copy.
    speculator_seen: Option<Arc<Speculator>>,
    speculator: Option<Arc<Speculator>>,
    traces: Option<Arc<TraceSink>>,
    /// Hidden states captured per row: three feature layers, then the final.
    capture: Vec<Capture>,
    capture_on: bool,
    ngram: NgramDrafter,
    next_seq_id: u64,
    ws: Workspace,
    out: ForwardOutput,
    scratch: SampleScratch,
    dist: Distribution,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    seqs: Vec<BatchSeq>,
    logits_rows: Vec<usize>,
    hidden_rows: Vec<usize>,
    /// TCA compression, when budgets are loaded; and whether requests that
    /// do not choose use it.
    tca: Option<Compressor>,
    tca_default: bool,
    /// TCA sequences of this step: their fed rows whose queries join the
    /// observation window, and whether their cache is due for compression.
    tca_rows: Vec<TcaRows>,
}

/// One TCA sequence's part of a step (see `Engine::compress_kv`).
#[derive(Debug, Clone, Copy)]
struct TcaRows {
    /// Index into the running sequences.
    idx: usize,
    /// First of its rows in `ws.q_rows`, and how many.
    q0: usize,
    n: usize,
    /// Position of the first of them.
    pos0: usize,
    /// Draft rows at the end of its cache.
    n_future: usize,
    /// Whether the cache is compressed after the forward pass.
    due: bool,
}

impl<E: KvElem> Engine<E> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Model,
        kv: KvCache<E>,
        pool: ThreadPool,
        tokenizer: Arc<Tokenizer>,
        rx: Receiver<Command>,
        stats: Arc<EngineStats>,
        sched: Scheduler,
        max_position: usize,
        cfg: &EngineConfig,
    ) -> Self {
        let layers = cfg
            .speculator
            .as_ref()
            .and_then(|s| s.load_full())
            .map(|s| s.manifest.config.feature_layers)
            .unwrap_or_else(|| default_feature_layers(model.config().n_layers));
        let capture = vec![Capture::After(layers[0]), Capture::After(layers[1]), Capture::After(layers[2]), Capture::Final];
        // Hidden states are captured when someone uses them: the trainer's
        // traces, or a speculator's draft context.
        let capture_on = cfg.traces.is_some() || cfg.speculator.is_some();
        Self {
            model,
            kv,
            pool: Arc::new(pool),
            tokenizer,
            rx,
            stats,
            sched,
            max_position,
            policy: Policy::new(cfg.speculation, cfg.spec_k),
            speculator_slot: cfg.speculator.clone(),
            speculator_seen: None,
            speculator: None,
            traces: cfg.traces.clone(),
            capture,
            capture_on,
            ngram: NgramDrafter::default(),
            next_seq_id: 1,
            ws: Workspace::default(),
            out: ForwardOutput::default(),
            scratch: SampleScratch::default(),
            dist: Distribution::default(),
            tokens: Vec::new(),
            positions: Vec::new(),
            seqs: Vec::new(),
            logits_rows: Vec::new(),
            hidden_rows: Vec::new(),
            tca: cfg.tca_budgets.clone().map(|b| Compressor::new(b).with_per_chunk(cfg.tca_per_chunk)),
            tca_default: cfg.kv_compression == KvCompression::Tca,
            tca_rows: Vec::new(),
        }
    }

    /// Runs until shut down or until every handle is dropped.
    pub fn run(mut self) {
        loop {
            if !self.receive() {
                break;
            }
            self.reap_cancelled();
            self.publish_stats();
            if !self.sched.running.is_empty() || !self.sched.waiting.is_empty() {
                self.step();
                self.publish_stats();
            }
        }
        // Shutting down: tell whoever still listens.
        for mut s in self.sched.running.drain(..).chain(self.sched.waiting.drain(..)) {
            s.fail("the engine is shutting down");
        }
    }

    /// Takes commands; blocks when there is nothing to do. Returns false on
    /// shutdown.
    fn receive(&mut self) -> bool {
        let idle = self.sched.running.is_empty() && self.sched.waiting.is_empty();
        if idle {
            match self.rx.recv() {
                Ok(cmd) => {
                    if !self.command(cmd) {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        while let Ok(cmd) = self.rx.try_recv() {
            if !self.command(cmd) {
                return false;
            }
        }
        true
    }

    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Generate { req, tx, queued } => {
                self.stats.in_channel.fetch_sub(1, Ordering::Relaxed);
                self.enqueue(req, tx, queued);
                true
            }
            Command::Shutdown => false,
        }
    }

    fn enqueue(&mut self, req: GenerateRequest, tx: tokio::sync::mpsc::UnboundedSender<crate::request::Event>, queued: Instant) {
        let mut stop_ids = req.stop_token_ids.clone();
        if !req.ignore_eos {
            stop_ids.extend_from_slice(self.tokenizer.eos_token_ids());
        }
        let opts = Arc::new(SeqOptions {
            max_tokens: req.max_tokens,
            stop_ids,
            stop: req.stop.clone(),
            logprobs: req.logprobs,
            skip_special: req.skip_special_tokens,
            max_position: self.max_position,
            speculation: req.speculation,
            tca: self.tca.is_some() && req.kv_compression.map_or(self.tca_default, |c| c == KvCompression::Tca),
        });
        let sampler = Sampler::new(req.sampling.clone(), &req.prompt);
        let mut seq = Sequence::new(0, req.prompt, sampler, opts, req.n.saturating_sub(1), tx, queued);
        seq.seq_id = self.next_seq_id;
        self.next_seq_id += req.n.max(1) as u64;
        seq.spec = Some(SpecSeqState::default());
        self.sched.waiting.push_back(seq);
    }

    fn reap_cancelled(&mut self) {
        let kv = &mut self.kv;
        self.sched.running.retain(|s| {
            if s.cancelled() {
                if let Some(id) = s.kv {
                    kv.free_seq(id);
                }
                false
            } else {
                true
            }
        });
        self.sched.waiting.retain(|s| !s.cancelled());
    }

    fn publish_stats(&self) {
        let st = &self.stats;
        st.running.store(self.sched.running.len(), Ordering::Relaxed);
        st.waiting.store(self.sched.waiting.len(), Ordering::Relaxed);
        st.kv_used_bytes.store(self.kv.used_bytes(), Ordering::Relaxed);
        st.preemptions.store(self.sched.preemptions() as usize, Ordering::Relaxed);
    }

    /// Loads the serving speculator (one atomic load per step); a new
    /// version is frozen for serving once, here, between steps.
    fn refresh_speculator(&mut self) {
        let Some(slot) = &self.speculator_slot else { return };
        let cur = slot.load_full();
        let changed = match (&cur, &self.speculator_seen) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        if !changed {
            return;
        }
        self.speculator = match &cur {
            Some(s) => match s.frozen(&self.pool) {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    tracing::error!(error = %e, version = s.version(), "cannot prepare the speculator; drafting without it");
                    None
                }
            },
            None => None,
        };
        let prior = cur.as_ref().and_then(|s| s.manifest.simulated).map(|s| s.per_draft_rate());
        self.policy.set_speculator(self.speculator.is_some(), true, prior);
        self.speculator_seen = cur;
    }

    fn step(&mut self) {
        self.refresh_speculator();
        let mut too_long = Vec::new();
        let mut plan = self.sched.plan_decode(&mut self.kv, &mut too_long);
        let mut drafts: Vec<StepDraft> = (0..plan.len()).map(|_| StepDraft::default()).collect();
        let draft_rows = self.draft(&plan, &mut drafts);
        let budget = self.sched.max_batch_tokens.saturating_sub(plan.len() + draft_rows);
        let prefill = self.sched.plan_prefill(&mut self.kv, budget, &mut too_long);
        drafts.extend(prefill.iter().map(|_| StepDraft::default()));
        plan.extend(prefill);
        for (mut s, reason) in too_long {
            s.finish(reason, &self.tokenizer);
        }
        if plan.is_empty() {
            return;
        }
        let spans = self.build_batch(&plan, &drafts);
        let batch = Batch {
            tokens: &self.tokens,
            positions: &self.positions,
            seqs: &self.seqs,
            logits_rows: &self.logits_rows,
            hidden_rows: &self.hidden_rows,
            capture: if self.hidden_rows.is_empty() { &[] } else { &self.capture },
        };
        let started = Instant::now();
        if let Err(e) = self.model.forward(&self.pool, &mut self.ws, &mut self.kv, &batch, &mut self.out) {
            tracing::error!(error = %e, "forward pass failed");
            let mut idx: Vec<usize> = plan.iter().map(|p| p.idx).collect();
            idx.sort_unstable();
            for i in idx.into_iter().rev() {
                let mut s = self.sched.running.remove(i);
                if let Some(id) = s.kv {
                    self.kv.free_seq(id);
                }
                s.fail(&format!("forward pass failed: {e}"));
            }
            return;
        }
        self.compress_kv();
        self.after_forward(&plan, &drafts, &spans);
        let rows = self.tokens.len();
        self.policy.observe_step(rows, started.elapsed().as_secs_f64());
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.step_rows.fetch_add(rows, Ordering::Relaxed);
        let micros = started.elapsed().as_micros() as usize;
        self.stats.busy_micros.fetch_add(micros, Ordering::Relaxed);
        let r = rows.min(crate::handle::STEP_ROWS_TRACKED);
        self.stats.steps_by_rows[r].fetch_add(1, Ordering::Relaxed);
        self.stats.step_micros_by_rows[r].fetch_add(micros, Ordering::Relaxed);
    }

    /// TCA: adds the queries the forward pass kept for each TCA sequence's
    /// last fed rows to its observation window, and compresses the caches
    /// `build_batch` found due.
    fn compress_kv(&mut self) {
        let Some(c) = &self.tca else { return };
        let cfg = self.model.config();
        let per_row = cfg.n_layers * cfg.n_heads * cfg.head_dim;
        for t in &self.tca_rows {
            let Some(s) = self.sched.running.get_mut(t.idx) else { continue };
            let w = s.tca_window.get_or_insert_with(|| QueryWindow::new(c.params().observe));
            w.push_rows(t.pos0, &self.ws.q_out[t.q0 * per_row..(t.q0 + t.n) * per_row], per_row);
            if let (true, Some(kv)) = (t.due, s.kv) {
                c.compress(&self.pool, &mut self.kv, kv, cfg.n_heads, w, t.n_future);
            }
        }
    }

    /// Asks the policy and the drafters for draft rows of decoding sequences;
    /// grows their KV caches. Returns the number of draft rows added.
    fn draft(&mut self, plan: &[Planned], drafts: &mut [StepDraft]) -> usize {
        let mut rows = plan.len();
        let mut added = 0;
        let spec_drafter = self.speculator.clone().map(SpeculatorDrafter::new);
        let mut spec_drafter = spec_drafter;
        for (p, d) in plan.iter().zip(drafts.iter_mut()) {
            let budget = self.sched.max_batch_tokens.saturating_sub(rows);
            let max_position = self.max_position;
            let s = &mut self.sched.running[p.idx];
            if budget == 0 || s.pending() != 1 || s.spec.is_none() {
                continue;
            }
            // No point drafting past max_tokens or the context.
            let room_tokens = s.opts.max_tokens.saturating_sub(s.generated() + 1);
            let room_ctx = max_position.saturating_sub(s.tokens.len() + 1);
            let params = s.sampler.params().clone();
            let kv_id = s.kv;
            let s_override = s.opts.speculation;
            let Sequence { spec, sampler, tokens, .. } = s;
            let Some(state) = spec.as_mut() else { continue };
            let Some(choice) = self.policy.choose(&mut state.policy, rows, s_override) else { continue };
            let room = room_tokens.min(room_ctx).min(budget);
            let k = choice.k.min(room);
            if k == 0 {
                continue;
            }
            let mut ctx = DraftContext { tokens, state, sampling: &params, rng: sampler.rng() };
            let mut choice = Choice { k, ..choice };
            loop {
                let t0 = Instant::now();
                let res = match choice.drafter {
                    DrafterKind::Ngram => self.ngram.draft(&mut ctx, choice.k, &mut d.draft),
                    DrafterKind::Speculator => match spec_drafter.as_mut() {
                        Some(sd) => sd.draft(&mut ctx, choice.k, &mut d.draft),
                        None => Ok(()),
                    },
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, drafter = choice.drafter.name(), "drafting failed; this step runs without drafts");
                    d.draft.clear();
                }
                self.policy.observe_draft_time(choice.drafter, d.draft.tokens.len().max(1), t0.elapsed().as_secs_f64());
                // The n-gram drafter found no match: the speculator may
                // draft instead (auto mode, when that pays by itself).
                if !d.draft.tokens.is_empty() || choice.drafter != DrafterKind::Ngram {
                    break;
                }
                match self.policy.instead_of_empty_ngram(&ctx.state.policy, rows, s_override) {
                    Some(c) => choice = Choice { k: c.k.min(room), ..c },
                    None => break,
                }
            }
            let n = d.draft.tokens.len();
            if n == 0 {
                self.policy.drafted_nothing(&mut ctx.state.policy);
                continue;
            }
            let Some(id) = kv_id else { continue };
            if self.kv.grow(id, n).is_err() {
                d.draft.clear();
                continue;
            }
            d.drafter = Some(choice.drafter);
            rows += n;
            added += n;
        }
        added
    }

    fn build_batch(&mut self, plan: &[Planned], drafts: &[StepDraft]) -> Vec<RowSpan> {
        self.tokens.clear();
        self.positions.clear();
        self.seqs.clear();
        self.logits_rows.clear();
        self.hidden_rows.clear();
        self.ws.q_rows.clear();
        self.tca_rows.clear();
        let now = Instant::now();
        let mut spans = Vec::with_capacity(plan.len());
        for (p, d) in plan.iter().zip(drafts) {
            let s = &mut self.sched.running[p.idx];
            s.mark_scheduled(now);
            let start = s.n_cached;
            let row0 = self.tokens.len();
            self.tokens.extend_from_slice(&s.tokens[start..start + p.rows]);
            self.tokens.extend_from_slice(&d.draft.tokens);
            let n = p.rows + d.draft.tokens.len();
            self.positions.extend(start..start + n);
            self.seqs.push(BatchSeq { kv: s.kv.unwrap_or_else(|| unreachable!("planned sequences hold a cache")), n_rows: n });
            let completes = start + p.rows == s.tokens.len();
            let logits0 = if completes {
                // Logits for the last fed token and every draft row.
                let first = row0 + p.rows - 1;
                let l0 = self.logits_rows.len();
                self.logits_rows.extend(first..row0 + n);
                Some(l0)
            } else {
                None
            };
            let hidden0 = self.hidden_rows.len();
            if self.capture_on {
                // Decode rows: all of them; prefill chunks: the tail the
                // draft window keeps.
                let from = if p.rows == 1 { row0 } else { row0 + n - n.min(WINDOW) };
                self.hidden_rows.extend(from..row0 + n);
            }
            spans.push(RowSpan { n_rows: n, logits0, hidden0, hidden_n: self.hidden_rows.len() - hidden0 });
            if let Some(c) = self.tca.as_ref().filter(|_| s.opts.tca) {
                // The last `observe` fed rows (not the drafts) join the
                // sequence's observation window; the cache is compressed
                // once the prompt is in (or after every chunk) when due.
                let kv = s.kv.unwrap_or_else(|| unreachable!("planned sequences hold a cache"));
                let n_future = d.draft.tokens.len();
                let take = c.params().observe.min(p.rows);
                let due = (completes || c.per_chunk()) && c.due(Compressor::tail(&self.kv, kv, n_future));
                let q0 = self.ws.q_rows.len();
                self.tca_rows.push(TcaRows { idx: p.idx, q0, n: take, pos0: start + p.rows - take, n_future, due });
                self.ws.q_rows.extend(row0 + p.rows - take..row0 + p.rows);
            }
        }
        spans
    }

    /// Target features (3H) and final hidden state (H) of captured row `i`.
    fn captured(&self, i: usize) -> (&[f32], &[f32]) {
        let h = self.model.config().hidden_size;
        let row = &self.out.hidden[i * 4 * h..(i + 1) * 4 * h];
        (&row[..3 * h], &row[3 * h..])
    }

    fn after_forward(&mut self, plan: &[Planned], drafts: &[StepDraft], spans: &[RowSpan]) {
        let vocab = self.model.config().vocab_size;
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        let mut children: Vec<Sequence> = Vec::new();
        let mut prompt_tokens = 0;
        let mut generated = 0;
        for ((p, d), span) in plan.iter().zip(drafts).zip(spans) {
            let idx = p.idx;
            let start = self.sched.running[idx].n_cached;
            {
                let s = &self.sched.running[idx];
                if start < s.prompt_len {
                    prompt_tokens += p.rows.min(s.prompt_len - start);
                }
            }
            let Some(l0) = span.logits0 else {
                // A prefill chunk that does not end the prompt.
                self.commit_prefill_rows(idx, start, p.rows, span);
                self.sched.running[idx].n_cached += p.rows;
                continue;
            };
            // The prompt rows this step fed before the last one (prefill).
            let fed = p.rows;
            if fed > 1 {
                self.commit_prefill_rows(idx, start, fed - 1, span);
            }
            // n > 1: the other choices start from this prompt.
            if self.sched.running[idx].forks > 0 {
                let logits = self.out.logits[l0 * vocab..(l0 + 1) * vocab].to_vec();
                let last = (span.hidden_n > 0).then(|| self.captured(span.hidden0 + span.hidden_n - 1).0.to_vec());
                self.fork_choices(idx, start + p.rows, &logits, last.as_deref(), &mut children);
            }
            let k = d.draft.tokens.len();
            let mut accepted = 0;
            let mut emitted: Vec<u32> = Vec::with_capacity(k + 1);
            let mut reason = None;
            {
                let s = &mut self.sched.running[idx];
                for i in 0..=k {
                    let logits = &self.out.logits[(l0 + i) * vocab..(l0 + i + 1) * vocab];
                    let (token, from_draft) = if i < k {
                        s.verify_draft(logits, d.draft.tokens[i], &d.draft.q[i], &mut self.scratch, &mut self.dist)
                    } else {
                        (s.sampler.sample(logits, &mut self.scratch), false)
                    };
                    let lp = s.logprob(logits, token);
                    emitted.push(token);
                    if from_draft {
                        accepted += 1;
                    }
                    reason = s.accept(token, lp, if from_draft { d.drafter } else { None }, &self.tokenizer);
                    if reason.is_some() || !from_draft {
                        break;
                    }
                }
            }
            generated += emitted.len();
            // Rows kept in the cache: the fed tokens and the accepted drafts.
            if k > accepted {
                if let Some(id) = self.sched.running[idx].kv {
                    self.kv.truncate(id, k - accepted);
                }
            }
            if let Some(drafter) = d.drafter {
                self.record_verify(idx, drafter, k, accepted);
            }
            let rejected_draft = accepted < k && reason.is_none();
            self.commit_decode_rows(idx, start + fed - 1, span, fed - 1, &emitted, rejected_draft, d, accepted);
            self.sched.running[idx].n_cached += fed + accepted;
            if let Some(r) = reason {
                finished.push((idx, r));
            }
        }
        self.stats.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        self.stats.generation_tokens.fetch_add(generated, Ordering::Relaxed);
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (idx, reason) in finished {
            let mut s = self.sched.running.remove(idx);
            s.finish(reason, &self.tokenizer);
            if let Some(id) = s.kv {
                self.kv.free_seq(id);
            }
        }
        self.sched.running.extend(children);
    }

    fn record_verify(&mut self, idx: usize, drafter: DrafterKind, k: usize, accepted: usize) {
        let s = &mut self.sched.running[idx];
        let st = &mut s.spec_stats;
        st.drafting_steps += 1;
        st.drafted += k;
        st.accepted += accepted;
        st.drafted_by[drafter.index()] += k;
        st.accepted_by[drafter.index()] += accepted;
        if let Some(state) = s.spec.as_mut() {
            self.policy.observe_verify(&mut state.policy, drafter, k, accepted);
        }
        let c = &self.stats.spec[drafter.index()];
        c.drafts.fetch_add(1, Ordering::Relaxed);
        c.draft_tokens.fetch_add(k, Ordering::Relaxed);
        c.accepted_tokens.fetch_add(accepted, Ordering::Relaxed);
        for pos in 0..accepted {
            c.accepted_per_pos[pos].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Commits captured prompt rows `[start, start + n)` (the first `n` fed
    /// rows of the span) to the draft context and traces them.
    fn commit_prefill_rows(&mut self, idx: usize, start: usize, n: usize, span: &RowSpan) {
        if span.hidden_n == 0 || n == 0 {
            return;
        }
        // Captured rows are the last `hidden_n` rows of the span.
        let first_captured = span.n_rows - span.hidden_n;
        if first_captured >= n {
            return;
        }
        let mut trace = self.traces.as_ref().map(|_| Trace {
            seq_id: self.sched.running[idx].seq_id,
            start_pos: start + first_captured,
            tokens: Vec::new(),
            next_tokens: Vec::new(),
            discard: false,
            drafter: None,
            drafts: Vec::new(),
            accepted: 0,
            features: Vec::new(),
            last_hidden: Vec::new(),
            speculator_version: None,
            prefill: true,
        });
        for r in first_captured..n {
            let pos = start + r;
            let (tok, next) = {
                let s = &self.sched.running[idx];
                (s.tokens[pos], s.tokens[pos + 1])
            };
            let ci = span.hidden0 + (r - first_captured);
            let (f, last) = self.captured(ci);
            let (f, last) = (f.to_vec(), last.to_vec());
            if let Some(state) = self.sched.running[idx].spec.as_mut() {
                state.commit(pos, next, &f);
            }
            if let Some(t) = trace.as_mut() {
                t.tokens.push(tok);
                t.next_tokens.push(next);
                t.features.extend_from_slice(&f);
                t.last_hidden.extend_from_slice(&last);
            }
        }
        if let (Some(t), Some(sink)) = (trace, &self.traces) {
            if !t.tokens.is_empty() {
                sink.send(t);
            }
        }
    }

    /// Commits the decode/verify rows (the last fed token at `pos0`, then the
    /// accepted drafts) and sends their trace, with the first rejected draft's
    /// row as a discard row.
    #[allow(clippy::too_many_arguments)]
    fn commit_decode_rows(
        &mut self,
        idx: usize,
        pos0: usize,
        span: &RowSpan,
        offset: usize,
        emitted: &[u32],
        rejected_draft: bool,
        d: &StepDraft,
        accepted: usize,
    ) {
        if span.hidden_n == 0 {
            return;
        }
        let first_captured = span.n_rows - span.hidden_n;
        let committed = emitted.len();
        let rows = committed + usize::from(rejected_draft);
        let mut trace = Trace {
            seq_id: self.sched.running[idx].seq_id,
            start_pos: pos0,
            tokens: Vec::with_capacity(rows),
            next_tokens: Vec::with_capacity(committed),
            discard: rejected_draft,
            drafter: d.drafter,
            drafts: d.draft.tokens.clone(),
            accepted,
            features: Vec::new(),
            last_hidden: Vec::new(),
            speculator_version: if d.drafter == Some(DrafterKind::Speculator) {
                self.speculator.as_ref().map(|s| s.version())
            } else {
                None
            },
            prefill: false,
        };
        #[allow(clippy::needless_range_loop)]
        for j in 0..rows {
            let r = offset + j;
            if r < first_captured {
                continue;
            }
            let ci = span.hidden0 + (r - first_captured);
            let (f, last) = self.captured(ci);
            let (f, last) = (f.to_vec(), last.to_vec());
            let tok = if j == 0 { self.sched.running[idx].tokens[pos0] } else { d.draft.tokens[j - 1] };
            if j < committed {
                if let Some(state) = self.sched.running[idx].spec.as_mut() {
                    state.commit(pos0 + j, emitted[j], &f);
                }
                trace.next_tokens.push(emitted[j]);
            }
            trace.tokens.push(tok);
            trace.features.extend_from_slice(&f);
            trace.last_hidden.extend_from_slice(&last);
        }
        if let Some(sink) = &self.traces {
            sink.send(trace);
        }
    }

    /// Forks the `forks` extra choices of running sequence `idx` after its
    /// prompt (`n_cached` tokens computed once fed), sampling each first token
    /// from the prompt's last logits.
    /// `last_features` are the target features of the prompt's last row; each
    /// child commits them with its own first token.
    fn fork_choices(&mut self, idx: usize, n_cached: usize, logits: &[f32], last_features: Option<&[f32]>, children: &mut Vec<Sequence>) {
        let parent = &mut self.sched.running[idx];
        let forks = std::mem::take(&mut parent.forks);
        for c in 1..=forks {
            let parent = &self.sched.running[idx];
            // A well-mixed per-choice seed, so that requests with nearby seeds
            // do not share choices.
            let seed = parent.sampler.params().seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31);
            let params = SamplingParams { seed, ..parent.sampler.params().clone() };
            let sampler = Sampler::new(params, &parent.tokens);
            let parent_kv = parent.kv.unwrap_or_else(|| unreachable!("planned sequences hold a cache"));
            match self.kv.fork(parent_kv) {
                Ok(kv) => {
                    let mut child = self.sched.running[idx].fork(c, sampler, kv);
                    child.seq_id = self.sched.running[idx].seq_id + c as u64;
                    child.n_cached = n_cached;
                    if let Some(reason) = child.sample_next(logits, &self.tokenizer, &mut self.scratch) {
                        child.finish(reason, &self.tokenizer);
                        self.kv.free_seq(kv);
                    } else {
                        if let (Some(f), Some(state), Some(&first)) = (last_features, child.spec.as_mut(), child.tokens.last()) {
                            state.commit(n_cached - 1, first, f);
                        }
                        children.push(child);
                    }
                }
                Err(_) => {
                    // No room to copy the prompt: compute it again later.
                    let mut child = self.sched.running[idx].fork(c, sampler, parent_kv);
                    child.seq_id = self.sched.running[idx].seq_id + c as u64;
                    child.reset_cache();
                    self.sched.waiting.push_back(child);
                }
            }
        }
    }
}

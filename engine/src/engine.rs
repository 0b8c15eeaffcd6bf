//! The engine thread: owns the model, the KV cache and the scheduler, and
//! runs one step after another.
//!
//! A step: take new requests, drop those whose client left, plan rows
//! ([`Scheduler::plan`]), run one forward pass over all of them, then sample
//! and stream a token for every sequence whose pending tokens were all fed.
//! When nothing runs the thread blocks on its command channel.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use kernels::attention::KvElem;
use kernels::ThreadPool;

use crate::handle::{Command, EngineStats};
use crate::kv::KvCache;
use crate::model::{Batch, BatchSeq, ForwardOutput, Model, Workspace};
use crate::request::{FinishReason, GenerateRequest};
use crate::sampling::{SampleScratch, Sampler, SamplingParams};
use crate::scheduler::{Planned, Scheduler};
use crate::sequence::{SeqOptions, Sequence};
use crate::tokenizer::Tokenizer;

/// The engine's state, owned by its thread.
pub(crate) struct Engine<E: KvElem> {
    pub model: Model,
    pub kv: KvCache<E>,
    pub pool: ThreadPool,
    pub tokenizer: Arc<Tokenizer>,
    pub rx: Receiver<Command>,
    pub stats: Arc<EngineStats>,
    pub sched: Scheduler,
    pub max_position: usize,
    ws: Workspace,
    out: ForwardOutput,
    scratch: SampleScratch,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    seqs: Vec<BatchSeq>,
    logits_rows: Vec<usize>,
    /// For each logits row, the running index it belongs to.
    owners: Vec<usize>,
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
    ) -> Self {
        Self {
            model,
            kv,
            pool,
            tokenizer,
            rx,
            stats,
            sched,
            max_position,
            ws: Workspace::default(),
            out: ForwardOutput::default(),
            scratch: SampleScratch::default(),
            tokens: Vec::new(),
            positions: Vec::new(),
            seqs: Vec::new(),
            logits_rows: Vec::new(),
            owners: Vec::new(),
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
        });
        let sampler = Sampler::new(req.sampling.clone(), &req.prompt);
        let seq = Sequence::new(0, req.prompt, sampler, opts, req.n.saturating_sub(1), tx, queued);
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

    fn step(&mut self) {
        let mut too_long = Vec::new();
        let plan = self.sched.plan(&mut self.kv, &mut too_long);
        for (mut s, reason) in too_long {
            s.finish(reason, &self.tokenizer);
        }
        if plan.is_empty() {
            return;
        }
        self.build_batch(&plan);
        let batch = Batch {
            tokens: &self.tokens,
            positions: &self.positions,
            seqs: &self.seqs,
            logits_rows: &self.logits_rows,
            hidden_rows: &[],
            capture: &[],
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
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.step_rows.fetch_add(self.tokens.len(), Ordering::Relaxed);
        self.stats.busy_micros.fetch_add(started.elapsed().as_micros() as usize, Ordering::Relaxed);
        self.after_forward(&plan);
    }

    fn build_batch(&mut self, plan: &[Planned]) {
        self.tokens.clear();
        self.positions.clear();
        self.seqs.clear();
        self.logits_rows.clear();
        self.owners.clear();
        let now = Instant::now();
        for p in plan {
            let s = &mut self.sched.running[p.idx];
            s.mark_scheduled(now);
            let start = s.n_cached;
            self.tokens.extend_from_slice(&s.tokens[start..start + p.rows]);
            self.positions.extend(start..start + p.rows);
            self.seqs.push(BatchSeq { kv: s.kv.unwrap_or_else(|| unreachable!("planned sequences hold a cache")), n_rows: p.rows });
            if start + p.rows == s.tokens.len() {
                self.logits_rows.push(self.tokens.len() - 1);
                self.owners.push(p.idx);
            }
        }
    }

    fn after_forward(&mut self, plan: &[Planned]) {
        let vocab = self.model.config().vocab_size;
        let mut prompt_tokens = 0;
        for p in plan {
            let s = &mut self.sched.running[p.idx];
            if s.n_cached < s.prompt_len {
                prompt_tokens += p.rows.min(s.prompt_len - s.n_cached);
            }
            s.n_cached += p.rows;
        }
        self.stats.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        let mut children: Vec<Sequence> = Vec::new();
        for (k, &idx) in self.owners.iter().enumerate() {
            let logits = &self.out.logits[k * vocab..(k + 1) * vocab];
            // n > 1: the other choices start from this prompt.
            if self.sched.running[idx].forks > 0 {
                let parent = &mut self.sched.running[idx];
                let forks = std::mem::take(&mut parent.forks);
                for c in 1..=forks {
                    let params =
                        SamplingParams { seed: parent.sampler.params().seed.wrapping_add(c as u64), ..parent.sampler.params().clone() };
                    let sampler = Sampler::new(params, &parent.tokens);
                    let parent_kv = parent.kv.unwrap_or_else(|| unreachable!("planned sequences hold a cache"));
                    match self.kv.fork(parent_kv) {
                        Ok(kv) => {
                            let mut child = parent.fork(c, sampler, kv);
                            if let Some(reason) = child.sample_next(logits, &self.tokenizer, &mut self.scratch) {
                                child.finish(reason, &self.tokenizer);
                                self.kv.free_seq(kv);
                            } else {
                                children.push(child);
                            }
                        }
                        Err(_) => {
                            // No room to copy the prompt: compute it again later.
                            let mut child = parent.fork(c, sampler, parent_kv);
                            child.reset_cache();
                            self.sched.waiting.push_back(child);
                        }
                    }
                }
            }
            let s = &mut self.sched.running[idx];
            if let Some(reason) = s.sample_next(logits, &self.tokenizer, &mut self.scratch) {
                finished.push((idx, reason));
            }
        }
        self.stats.generation_tokens.fetch_add(self.owners.len(), Ordering::Relaxed);
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
}

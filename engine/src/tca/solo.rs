//! One sequence run directly on a [`Model`] and its own KV cache, outside
//! the engine thread, with or without TCA: the same forward pass and the
//! same [`Compressor`] the engine uses, for the calibration-side benchmark
//! (`ouro tca-bench`) and tests that need exact KV sizes and timings.

use half::f16;
use kernels::ThreadPool;

use super::compress::Compressor;
use super::observe::QueryWindow;
use crate::error::{EngineError, Result};
use crate::kv::{KvCache, KvLayout, SeqKvId, PAGE_SIZE};
use crate::model::{Batch, BatchSeq, ForwardOutput, Model, Workspace};

/// A single sequence with its own cache.
pub struct Solo<'a> {
    model: &'a Model,
    pool: &'a ThreadPool,
    kv: KvCache<f16>,
    id: SeqKvId,
    ws: Workspace,
    out: ForwardOutput,
    tca: Option<Compressor>,
    window: Option<QueryWindow>,
    pos: usize,
    /// Most KV bytes held at any time (after each grow, before compression).
    pub peak_bytes: usize,
    /// Entries dropped by TCA so far (all heads).
    pub dropped: usize,
    /// An oracle's queries: every position's (all layers) from a
    /// full-attention pass over the same tokens, and how many of the
    /// positions after a compression judge it (see [`Solo::with_oracle`]).
    oracle: Option<(std::sync::Arc<Vec<f32>>, usize)>,
    /// Every fed row's queries are appended here when set (see
    /// [`Solo::record_queries`]).
    recorded: Option<Vec<f32>>,
}

impl std::fmt::Debug for Solo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Solo").field("pos", &self.pos).field("tca", &self.tca.is_some()).finish()
    }
}

impl<'a> Solo<'a> {
    /// A sequence that can hold up to `max_tokens` entries per head.
    pub fn new(model: &'a Model, pool: &'a ThreadPool, max_tokens: usize, tca: Option<Compressor>) -> Result<Self> {
        let c = model.config();
        let layout = KvLayout { n_layers: c.n_layers, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let bytes = (max_tokens.div_ceil(PAGE_SIZE) + 2) * layout.heads_per_seq() * layout.page_elems() * 2;
        let mut kv = KvCache::<f16>::new(layout, bytes)
            .ok_or_else(|| EngineError::Invalid { param: None, message: format!("cannot reserve {bytes} bytes of KV cache") })?;
        let id = kv.alloc_seq();
        Ok(Self {
            model,
            pool,
            kv,
            id,
            ws: Workspace::default(),
            out: ForwardOutput::default(),
            window: tca.as_ref().map(|c| QueryWindow::new(c.params().observe)),
            tca,
            pos: 0,
            peak_bytes: 0,
            dropped: 0,
            oracle: None,
            recorded: None,
        })
    }

    /// Records the queries of every fed row (all layers), for
    /// [`with_oracle`](Self::with_oracle) on another sequence fed the same
    /// tokens; [`take_queries`](Self::take_queries) returns them.
    pub fn record_queries(mut self) -> Self {
        self.recorded = Some(Vec::new());
        self
    }

    /// The queries recorded so far, row after row.
    pub fn take_queries(&mut self) -> Vec<f32> {
        self.recorded.take().unwrap_or_default()
    }

    /// An upper bound on what a selection rule could know: each compression
    /// is judged by the queries of up to `rows` positions still to come
    /// (evenly spaced over the rest of `queries`, recorded by a
    /// full-attention sequence fed the same tokens), instead of the past
    /// ones of the observation window. Not causal: for benchmarks only.
    pub fn with_oracle(mut self, queries: std::sync::Arc<Vec<f32>>, rows: usize) -> Self {
        self.oracle = Some((queries, rows.max(1)));
        self
    }

    /// The oracle's window for a compression after `fed` positions: future
    /// rows, all at the newest position so that each sees every entry.
    fn oracle_window(&self, fed: usize) -> Option<QueryWindow> {
        let (q, rows) = self.oracle.as_ref()?;
        let c = self.model.config();
        let per_row = c.n_layers * c.n_heads * c.head_dim;
        let total = q.len() / per_row;
        let ahead = total.saturating_sub(fed);
        if ahead == 0 {
            return None;
        }
        let stride = ahead.div_ceil(*rows);
        let mut w = QueryWindow::new(ahead.div_ceil(stride));
        for at in (fed..total).step_by(stride) {
            w.push(fed - 1, &q[at * per_row..(at + 1) * per_row]);
        }
        Some(w)
    }

    /// The sequence's cache and its id (read-only).
    pub fn cache(&self) -> (&KvCache<f16>, SeqKvId) {
        (&self.kv, self.id)
    }

    /// KV bytes in use now.
    pub fn kv_bytes(&self) -> usize {
        self.kv.used_bytes()
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Entries held by head `(layer, kv_head)`.
    pub fn head_len(&self, layer: usize, kv_head: usize) -> usize {
        self.kv.head_len(self.id, layer, kv_head)
    }

    /// Feeds `tokens` in chunks of `chunk` rows (compressing after each
    /// chunk when TCA is on). Returns the logits of every row when `all` is
    /// set, else of the last row.
    pub fn feed(&mut self, tokens: &[u32], chunk: usize, all: bool) -> Result<Vec<f32>> {
        let vocab = self.model.config().vocab_size;
        let mut logits = Vec::with_capacity(if all { tokens.len() * vocab } else { vocab });
        let n_parts = tokens.len().div_ceil(chunk.max(1));
        for (pi, part) in tokens.chunks(chunk.max(1)).enumerate() {
            let n = part.len();
            let last_part = pi + 1 == n_parts;
            self.kv.grow(self.id, n).map_err(|e| EngineError::Invalid { param: None, message: format!("solo KV cache: {e}") })?;
            self.peak_bytes = self.peak_bytes.max(self.kv.used_bytes());
            let due = self.tca.as_ref().is_some_and(|c| (last_part || c.per_chunk()) && c.due(Compressor::tail(&self.kv, self.id, 0)));
            // Every chunk's last rows join the observation window (decoding
            // adds one per token), so a due compression is judged by the
            // last `observe` positions.
            self.ws.q_rows.clear();
            if self.recorded.is_some() {
                self.ws.q_rows.extend(0..n);
            } else if let Some(w) = &self.window {
                self.ws.q_rows.extend(n - w.cap().min(n)..n);
            }
            let positions: Vec<usize> = (self.pos..self.pos + n).collect();
            let rows: Vec<usize> = if all { (0..n).collect() } else { vec![n - 1] };
            let seqs = [BatchSeq { kv: self.id, n_rows: n }];
            let batch = Batch { tokens: part, positions: &positions, seqs: &seqs, logits_rows: &rows, hidden_rows: &[], capture: &[] };
            self.model.forward(self.pool, &mut self.ws, &mut self.kv, &batch, &mut self.out)?;
            if let Some(r) = &mut self.recorded {
                r.extend_from_slice(&self.ws.q_out);
            } else if let (Some(w), Some(&r0)) = (&mut self.window, self.ws.q_rows.first()) {
                w.push_rows(self.pos + r0, &self.ws.q_out, self.ws.q_out.len() / self.ws.q_rows.len());
            }
            if let (true, Some(c), Some(w)) = (due, &self.tca, &self.window) {
                let oracle = self.oracle_window(self.pos + n);
                self.dropped += c.compress(self.pool, &mut self.kv, self.id, self.model.config().n_heads, oracle.as_ref().unwrap_or(w), 0);
            }
            self.pos += n;
            if all {
                logits.extend_from_slice(&self.out.logits);
            }
        }
        if !all {
            logits = self.out.logits.clone();
        }
        Ok(logits)
    }

    /// Negative log-likelihood (nats) of `tokens[1..]` given their prefixes,
    /// fed in chunks of `chunk`; returns `(sum, count)`.
    pub fn nll(&mut self, tokens: &[u32], chunk: usize) -> Result<(f64, usize)> {
        let vocab = self.model.config().vocab_size;
        let (mut sum, mut count) = (0f64, 0usize);
        let mut at = 0;
        for part in tokens.chunks(chunk.max(1)) {
            let logits = self.feed(part, part.len(), true)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let Some(&next) = tokens.get(at + i + 1) else { break };
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
                sum += z.ln() - (row[next as usize] - m) as f64;
                count += 1;
            }
            at += part.len();
        }
        Ok((sum, count))
    }

    /// Greedy decoding of `n` tokens after the fed ones, starting from the
    /// last row's `logits`; stops early at any of `stop_ids`.
    pub fn greedy(&mut self, logits: &[f32], n: usize, stop_ids: &[u32]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        let mut logits = logits.to_vec();
        for _ in 0..n {
            let next = argmax(&logits);
            out.push(next);
            if stop_ids.contains(&next) || out.len() == n {
                break;
            }
            logits = self.feed(&[next], 1, false)?;
        }
        Ok(out)
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

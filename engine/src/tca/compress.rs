//! Applies TCA selection to a sequence's paged KV cache.
//!
//! After a forward pass, for every (layer, KV head) whose uncompressed tail
//! has at least `w + b` entries, the whole blocks before the last `w`
//! (up to `b - 1` more) entries are compressed: each query head of the KV
//! head scores every visible entry with the softmax of each query of the
//! sequence's [`QueryWindow`] (its last `observe` fed positions), the scores
//! are pooled (mean over the group and the rows), [`select`](super::select)
//! picks the kept entries and [`KvCache::compact`] drops the rest and frees
//! their pages. The first token (sink) and the window are always kept.
//!
//! Prefill: by default this runs once the prompt's last chunk is computed,
//! from the prompt's last query (the paper's rule: a question at the end of a
//! long prompt decides what is kept; peak: the whole prompt). With
//! [`Compressor::with_per_chunk`] it runs after every chunk instead, so a
//! prompt never holds more than `kept + w + b + chunk` entries per head.
//! Decode: it runs each time `b` tokens have left the window.

use std::sync::{Arc, Mutex};

use kernels::attention::KvElem;
use kernels::ThreadPool;

use super::budgets::{TcaBudgets, TcaParams};
use super::observe::QueryWindow;
use super::select::select;
use crate::kv::{KvCache, SeqKvId};

/// Online TCA compression with one set of budgets.
#[derive(Debug, Clone)]
pub struct Compressor {
    budgets: Arc<TcaBudgets>,
    per_chunk: bool,
}

/// The pooled importance of the first `n` entries of head `(layer, g)`: the
/// softmax of each query head of the group, for each query row in `q`,
/// averaged. `q` holds rows of the layer's `n_heads * head_dim` query values;
/// row `i` was fed `lags[i]` positions before the newest entry, so it sees
/// the first `n - lags[i]` entries.
#[allow(clippy::too_many_arguments)]
pub fn pooled_importance<E: KvElem>(
    kv: &KvCache<E>,
    id: SeqKvId,
    layer: usize,
    g: usize,
    n: usize,
    n_heads: usize,
    q: &[f32],
    lags: &[usize],
    out: &mut Vec<f32>,
) {
    let l = kv.layout();
    let d = l.head_dim;
    let group = n_heads / l.n_kv_heads;
    let n = n.min(kv.head_len(id, layer, g));
    let rows: Vec<(&[f32], usize)> = q.chunks_exact(n_heads * d).zip(lags.iter().copied()).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let w = 1.0 / (group * rows.len().max(1)) as f32;
    // The group's query heads of every row, scored in one pass over the keys.
    let qs: Vec<f32> = rows.iter().flat_map(|(row, _)| row[g * group * d..(g + 1) * group * d].iter().copied()).collect();
    let mut s = Vec::new();
    kv.key_scores(id, layer, g, n, &qs, scale, &mut s);
    out.clear();
    out.resize(n, 0.0);
    for (i, scores) in s.chunks_exact_mut(n.max(1)).enumerate() {
        let seen = n.saturating_sub(rows[i / group].1);
        let scores = &mut scores[..seen];
        kernels::ops::softmax_in_place(scores);
        for (o, v) in out.iter_mut().zip(scores.iter()) {
            *o += v * w;
        }
    }
}

impl Compressor {
    /// A compressor with these (checked) budgets.
    pub fn new(budgets: Arc<TcaBudgets>) -> Self {
        Self { budgets, per_chunk: false }
    }

    /// Whether prefill compresses after every chunk (peak memory about
    /// `kept + w + b + chunk` per head, but a prompt's early tokens are
    /// judged by queries that have not seen its question yet) instead of
    /// once from the prompt's last query (the paper's rule and the default;
    /// peak memory: the whole prompt).
    pub fn with_per_chunk(mut self, per_chunk: bool) -> Self {
        self.per_chunk = per_chunk;
        self
    }

    /// See [`with_per_chunk`](Self::with_per_chunk).
    pub fn per_chunk(&self) -> bool {
        self.per_chunk
    }

    /// The selection parameters.
    pub fn params(&self) -> TcaParams {
        self.budgets.params
    }

    /// The budgets.
    pub fn budgets(&self) -> &TcaBudgets {
        &self.budgets
    }

    /// Whether a head with `tail` uncompressed entries is due for compression.
    pub fn due(&self, tail: usize) -> bool {
        let p = self.budgets.params;
        tail >= p.window + p.block
    }

    /// Uncompressed entries of a sequence (the same in every head), not
    /// counting `n_future` trailing entries (draft rows).
    pub fn tail<E: KvElem>(kv: &KvCache<E>, id: SeqKvId, n_future: usize) -> usize {
        (kv.head_len(id, 0, 0).saturating_sub(n_future)).saturating_sub(kv.head_sealed(id, 0, 0))
    }

    /// Compresses every due head of sequence `id`. `window` holds the
    /// queries of the sequence's last fed rows (the newest one this step's
    /// last fed row); their attention is pooled into the importance.
    /// `n_future` trailing entries (draft rows) are neither scored nor
    /// compressed. Returns the entries dropped.
    pub fn compress<E: KvElem>(
        &self,
        pool: &ThreadPool,
        kv: &mut KvCache<E>,
        id: SeqKvId,
        n_heads: usize,
        window: &QueryWindow,
        n_future: usize,
    ) -> usize {
        let l = kv.layout();
        let p = self.budgets.params;
        let (n_layers, nkv, d) = (l.n_layers, l.n_kv_heads, l.head_dim);
        if window.is_empty() {
            return 0;
        }
        let lags = window.lags();
        type Plan = Mutex<Option<(usize, Vec<usize>)>>;
        let plans: Vec<Plan> = (0..n_layers * nkv).map(|_| Mutex::new(None)).collect();
        {
            let kv_ref: &KvCache<E> = kv;
            pool.run(n_layers * nkv, |t| {
                let (layer, g) = (t / nkv, t % nkv);
                let visible = kv_ref.head_len(id, layer, g).saturating_sub(n_future);
                let sealed = kv_ref.head_sealed(id, layer, g);
                let tail = visible.saturating_sub(sealed);
                if !self.due(tail) {
                    return;
                }
                let region = (tail - p.window) / p.block * p.block;
                let budget = self.budgets.head(layer, g);
                if budget.is_dense() {
                    // Nothing to select: the region is sealed as it is.
                    if let Ok(mut slot) = plans[t].lock() {
                        *slot = Some((region, (0..region).collect()));
                    }
                    return;
                }
                let mut s = Vec::new();
                pooled_importance(kv_ref, id, layer, g, visible, n_heads, &window.layer(layer, n_heads * d), &lags, &mut s);
                let keep = select(&s[sealed..sealed + region], &p, &budget.p, sealed == 0);
                if let Ok(mut slot) = plans[t].lock() {
                    *slot = Some((region, keep));
                }
            });
        }
        let mut dropped = 0;
        for (t, plan) in plans.into_iter().enumerate() {
            if let Some((region, keep)) = plan.into_inner().ok().flatten() {
                dropped += kv.compact(id, t / nkv, t % nkv, region, &keep);
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLayout;

    /// Pooling two query rows equals the mean of pooling each alone, each
    /// over the entries its position saw.
    #[test]
    fn pooled_rows_average_what_each_row_saw() {
        let l = KvLayout { n_layers: 1, n_kv_heads: 1, head_dim: 4 };
        let mut kv = KvCache::<f32>::new(l, l.page_elems() * 4 * 2).unwrap();
        let id = kv.alloc_seq();
        let n = 20;
        kv.grow(id, n).unwrap();
        for j in 0..n {
            let k: Vec<f32> = (0..4).map(|c| ((j * 7 + c * 3) % 11) as f32 / 5.0 - 1.0).collect();
            kv.write(id, 0, 0, j, &k, &[0.0; 4]);
        }
        let n_heads = 2; // two query heads share the KV head
        let q_old: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
        let q_new: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
        let (mut a, mut b, mut both) = (Vec::new(), Vec::new(), Vec::new());
        pooled_importance(&kv, id, 0, 0, n - 3, n_heads, &q_old, &[0], &mut a);
        pooled_importance(&kv, id, 0, 0, n, n_heads, &q_new, &[0], &mut b);
        let q: Vec<f32> = q_old.iter().chain(&q_new).copied().collect();
        pooled_importance(&kv, id, 0, 0, n, n_heads, &q, &[3, 0], &mut both);
        assert_eq!(both.len(), n);
        for j in 0..n {
            let want = (a.get(j).copied().unwrap_or(0.0) + b[j]) / 2.0;
            assert!((both[j] - want).abs() < 1e-6, "entry {j}: {} vs {want}", both[j]);
        }
        assert!(both[n - 3..].iter().all(|&v| v > 0.0));
        assert!((both.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

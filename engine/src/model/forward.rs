//! The batched forward pass.
//!
//! Row order: the rows of [`Batch`] are grouped by sequence, in the order of
//! `Batch::seqs`, and within a sequence in position order. Before the call
//! the engine has grown each sequence's KV cache by its rows, so the rows'
//! keys and values go to the last `n_rows` entries of every head.
//!
//! Every operation is row-wise or a batch-invariant kernel, so a row's logits
//! do not depend on which other rows share the call.

use kernels::attention::{attend, AttnSeq, KvElem};
use kernels::ops::{add_in_place, rms_norm, rms_norm_rows_in_place, rope, silu_mul};
use kernels::{matmul, MatmulScratch, ThreadPool};

use super::Model;
use crate::error::{EngineError, Result};
use crate::kv::{KvCache, SeqKvId};

/// The rows of one sequence in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSeq {
    /// The sequence's KV cache.
    pub kv: SeqKvId,
    /// Number of consecutive rows it has in the batch.
    pub n_rows: usize,
}

/// A hidden state to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// The residual stream after decoder layer `i` (0-based).
    After(usize),
    /// The final hidden state after the last RMSNorm (what the LM head reads).
    Final,
}

/// One forward call's input.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Token of each row.
    pub tokens: &'a [u32],
    /// Position of each row.
    pub positions: &'a [usize],
    /// Sequences, in row order; their `n_rows` sum to `tokens.len()`.
    pub seqs: &'a [BatchSeq],
    /// Rows whose logits are wanted, ascending.
    pub logits_rows: &'a [usize],
    /// Rows whose hidden states are wanted, ascending.
    pub hidden_rows: &'a [usize],
    /// Which hidden states to capture for `hidden_rows`.
    pub capture: &'a [Capture],
}

/// One forward call's output, reused across calls.
#[derive(Debug, Default, Clone)]
pub struct ForwardOutput {
    /// `logits_rows.len()` rows of `vocab_size` logits.
    pub logits: Vec<f32>,
    /// For each of `hidden_rows`, for each of `capture`, `hidden_size`
    /// values: index `(row_i * capture.len() + cap_i) * hidden_size`.
    pub hidden: Vec<f32>,
}

/// Time spent per part of the forward pass (when profiling is on).
#[derive(Debug, Default, Clone, Copy)]
pub struct Profile {
    /// Layer matrix products (QKV, output, gate/up, down).
    pub matmul: std::time::Duration,
    /// Attention over the KV cache.
    pub attention: std::time::Duration,
    /// Final norm and LM head.
    pub lm_head: std::time::Duration,
    /// Everything else (embedding, norms, RoPE, SwiGLU, KV writes).
    pub other: std::time::Duration,
    /// Forward passes measured.
    pub calls: usize,
}

/// Scratch buffers of the forward pass, grown to the largest batch seen and
/// reused (no allocation per step once warm).
#[derive(Debug, Default)]
pub struct Workspace {
    /// Per-part timings, when `Some` (off by default).
    pub profile: Option<Profile>,
    /// Rows whose queries (post-RoPE, every layer) are kept in `q_out`
    /// (TCA scoring and calibration); empty: none, at no cost.
    pub q_rows: Vec<usize>,
    /// For each of `q_rows`, for each layer, `n_heads * head_dim` query
    /// values: index `(i * n_layers + layer) * n_heads * head_dim`.
    pub q_out: Vec<f32>,
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    gather: Vec<f32>,
    mm: MatmulScratch,
    kv_ids: Vec<SeqKvId>,
    attn_seqs: Vec<AttnSeq>,
}

fn fit(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// Rows per task for row-wise operations.
const MIN_ROWS: usize = 4;

impl Model {
    /// Runs the model over `batch`, writing `out`. See the module docs for
    /// the contract on row order and the KV cache.
    pub fn forward<E: KvElem>(
        &self,
        pool: &ThreadPool,
        ws: &mut Workspace,
        kv: &mut KvCache<E>,
        batch: &Batch<'_>,
        out: &mut ForwardOutput,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let t = batch.tokens.len();
        let (hs, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let qkv_w = (nq + 2 * nkv) * d;
        let half = d / 2;
        let ffn = cfg.intermediate_size;
        if batch.positions.len() != t || batch.seqs.iter().map(|s| s.n_rows).sum::<usize>() != t {
            return Err(EngineError::Invalid { param: None, message: "forward: rows, positions and sequences disagree".into() });
        }
        if t == 0 {
            out.logits.clear();
            out.hidden.clear();
            return Ok(());
        }

        fit(&mut ws.x, t * hs);
        for (r, &tok) in batch.tokens.iter().enumerate() {
            if tok as usize >= cfg.vocab_size {
                return Err(EngineError::Invalid {
                    param: Some("prompt"),
                    message: format!("token id {tok} is outside the vocabulary (size {})", cfg.vocab_size),
                });
            }
            self.embed.dequantize_row(tok as usize, &mut ws.x[r * hs..(r + 1) * hs]);
        }
        fit(&mut ws.cos, t * half);
        fit(&mut ws.sin, t * half);
        for (r, &pos) in batch.positions.iter().enumerate() {
            self.rope.angles(pos, &mut ws.cos[r * half..(r + 1) * half], &mut ws.sin[r * half..(r + 1) * half]);
        }
        ws.kv_ids.clear();
        ws.attn_seqs.clear();
        let mut row0 = 0;
        for s in batch.seqs {
            ws.kv_ids.push(s.kv);
            ws.attn_seqs.push(AttnSeq { row0, n_rows: s.n_rows });
            row0 += s.n_rows;
        }
        let n_cap = batch.capture.len();
        fit(&mut out.hidden, batch.hidden_rows.len() * n_cap * hs);
        fit(&mut ws.h, t * hs);
        fit(&mut ws.qkv, t * qkv_w);
        fit(&mut ws.attn, t * nq * d);
        fit(&mut ws.tmp, t * hs);
        fit(&mut ws.gate_up, t * 2 * ffn);
        fit(&mut ws.act, t * ffn);
        let shape = kv.attn_shape(nq);
        let n_layers = self.layers.len();
        if ws.q_rows.iter().any(|&r| r >= t) {
            return Err(EngineError::Invalid { param: None, message: "forward: a query row to keep is outside the batch".into() });
        }
        fit(&mut ws.q_out, ws.q_rows.len() * n_layers * nq * d);
        let profiling = ws.profile.is_some();
        let t_start = std::time::Instant::now();
        let (mut t_mm, mut t_attn) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let mut tick = std::time::Instant::now();
        macro_rules! timed {
            ($acc:ident, $e:expr) => {{
                if profiling {
                    tick = std::time::Instant::now();
                }
                let r = $e;
                if profiling {
                    $acc += tick.elapsed();
                }
                r
            }};
        }

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            ws.h.copy_from_slice(&ws.x);
            pool.for_each_row(&mut ws.h, hs, MIN_ROWS, |_, row| rms_norm_rows_in_place(row, hs, &layer.attn_norm, cfg.rms_eps));
            timed!(t_mm, matmul(pool, &layer.qkv, &ws.h, t, &mut ws.qkv, &mut ws.mm));
            {
                let (cos, sin) = (&ws.cos, &ws.sin);
                pool.for_each_row(&mut ws.qkv, qkv_w, MIN_ROWS, |r, row| {
                    if let Some(b) = &layer.qkv_bias {
                        add_in_place(row, b);
                    }
                    let (q, k) = row.split_at_mut(nq * d);
                    let k = &mut k[..nkv * d];
                    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                        rms_norm_rows_in_place(q, d, qn, cfg.rms_eps);
                        rms_norm_rows_in_place(k, d, kn, cfg.rms_eps);
                    }
                    let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
                    rope(q, nq, d, c, s, cfg.rope_style);
                    rope(k, nkv, d, c, s, cfg.rope_style);
                });
            }
            for (i, &row) in ws.q_rows.iter().enumerate() {
                let at = (i * n_layers + li) * nq * d;
                ws.q_out[at..at + nq * d].copy_from_slice(&ws.qkv[row * qkv_w..row * qkv_w + nq * d]);
            }
            let mut r = 0;
            for s in batch.seqs {
                for g in 0..nkv {
                    let len = kv.head_len(s.kv, li, g);
                    for j in 0..s.n_rows {
                        let row = &ws.qkv[(r + j) * qkv_w..(r + j + 1) * qkv_w];
                        let k = &row[(nq + g) * d..(nq + g + 1) * d];
                        let v = &row[(nq + nkv + g) * d..(nq + nkv + g + 1) * d];
                        kv.write(s.kv, li, g, len - s.n_rows + j, k, v);
                    }
                }
                r += s.n_rows;
            }
            timed!(t_attn, attend(pool, &shape, &ws.attn_seqs, &kv.layer_view(li, &ws.kv_ids), &ws.qkv, qkv_w, &mut ws.attn, nq * d));
            timed!(t_mm, matmul(pool, &layer.o, &ws.attn, t, &mut ws.tmp, &mut ws.mm));
            add_in_place(&mut ws.x, &ws.tmp);

            // Feed-forward block.
            ws.h.copy_from_slice(&ws.x);
            pool.for_each_row(&mut ws.h, hs, MIN_ROWS, |_, row| rms_norm_rows_in_place(row, hs, &layer.ffn_norm, cfg.rms_eps));
            timed!(t_mm, matmul(pool, &layer.gate_up, &ws.h, t, &mut ws.gate_up, &mut ws.mm));
            {
                let gu = &ws.gate_up;
                pool.for_each_row(&mut ws.act, ffn, MIN_ROWS, |r, row| {
                    let g = &gu[r * 2 * ffn..r * 2 * ffn + ffn];
                    let u = &gu[r * 2 * ffn + ffn..(r + 1) * 2 * ffn];
                    silu_mul(g, u, row);
                });
            }
            timed!(t_mm, matmul(pool, &layer.down, &ws.act, t, &mut ws.tmp, &mut ws.mm));
            add_in_place(&mut ws.x, &ws.tmp);

            for (ci, cap) in batch.capture.iter().enumerate() {
                if *cap == Capture::After(li) {
                    for (i, &row) in batch.hidden_rows.iter().enumerate() {
                        let at = (i * n_cap + ci) * hs;
                        out.hidden[at..at + hs].copy_from_slice(&ws.x[row * hs..(row + 1) * hs]);
                    }
                }
            }
        }

        // Final norm and LM head for the rows that need logits.
        if let Some(ci) = batch.capture.iter().position(|c| *c == Capture::Final) {
            for (i, &row) in batch.hidden_rows.iter().enumerate() {
                let at = (i * n_cap + ci) * hs;
                rms_norm(&ws.x[row * hs..(row + 1) * hs], &self.norm, cfg.rms_eps, &mut out.hidden[at..at + hs]);
            }
        }
        let t_head = std::time::Instant::now();
        let n_logits = batch.logits_rows.len();
        fit(&mut ws.gather, n_logits * hs);
        for (i, &row) in batch.logits_rows.iter().enumerate() {
            rms_norm(&ws.x[row * hs..(row + 1) * hs], &self.norm, cfg.rms_eps, &mut ws.gather[i * hs..(i + 1) * hs]);
        }
        fit(&mut out.logits, n_logits * cfg.vocab_size);
        matmul(pool, self.lm_head(), &ws.gather, n_logits, &mut out.logits, &mut ws.mm);
        if let Some(p) = ws.profile.as_mut() {
            let head = t_head.elapsed();
            p.matmul += t_mm;
            p.attention += t_attn;
            p.lm_head += head;
            p.other += t_start.elapsed().saturating_sub(t_mm + t_attn + head);
            p.calls += 1;
        }
        Ok(())
    }
}

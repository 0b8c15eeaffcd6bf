//! Layer sensitivity: per-layer mass thresholds from what compressing each
//! group of layers costs (an ouro extension of TCA's calibration).
//!
//! The paper holds every head to one threshold `tau` of attention mass. The
//! same threshold costs very different perplexity in different layers: on
//! SmolLM2-135M at 8K, layers 5-9 compressed alone at tau 0.7 cost +7.9%
//! perplexity and layers 25-29 alone +0.04%, for about the same KV saved.
//! So after the calibration pass, each group of consecutive layers is
//! compressed alone, at a probe threshold, over the calibration text, and its
//! perplexity cost and KV saving are measured (one full-attention run and
//! one run per group). The user's allowance of dropped mass, `1 - tau`, is
//! then shared out by layer: a group's allowance is scaled by the square
//! root of its saving per unit of cost over the geometric mean of the
//! groups', so cheap layers drop more and costly ones less.

use std::ops::Range;
use std::sync::Arc;

use kernels::ThreadPool;

use super::budgets::TcaBudgets;
use super::calibrate::Measured;
use super::compress::Compressor;
use super::solo::Solo;
use crate::error::Result;
use crate::model::Model;

/// Rows per forward pass of the perplexity runs (each chunk ends with a
/// compression when one is due, as in `ouro tca-bench`).
const CHUNK: usize = 256;

/// Smallest perplexity cost counted (a relative increase): groups whose
/// measured cost is below it, or negative from noise, count as this.
const MIN_COST: f64 = 1e-3;

/// What compressing one group of layers alone cost.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupCost {
    /// The group's layers.
    pub layers: Range<usize>,
    /// Relative perplexity increase over full attention (0.01 = +1%).
    pub cost: f64,
    /// Fraction of the full-attention KV bytes freed.
    pub saved: f64,
}

/// The sensitivity of every group of layers at a probe threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSensitivity {
    /// Threshold the groups were compressed with.
    pub probe_tau: f32,
    /// Perplexity of full attention on the text.
    pub base_ppl: f64,
    /// Groups of consecutive layers, in order.
    pub groups: Vec<GroupCost>,
}

/// Measures the sensitivity of `groups` groups of consecutive layers:
/// perplexity over `tokens` with full attention, then with only one group
/// compressed (budgets of `measured` at `probe_tau`, every other head
/// dense). `progress(done, total)` follows the `groups + 1` runs.
pub fn measure_sensitivity(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    measured: &Measured,
    groups: usize,
    probe_tau: f32,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<LayerSensitivity> {
    let n_layers = measured.n_layers();
    let groups = groups.clamp(1, n_layers);
    let total = groups + 1;
    let tokens = &recall_probe(tokens);
    let run = |comp: Option<Compressor>| -> Result<(f64, usize)> {
        let mut solo = Solo::new(model, pool, tokens.len() + 64, comp)?;
        let (sum, count) = solo.nll(tokens, CHUNK)?;
        Ok((sum / count.max(1) as f64, solo.kv_bytes()))
    };
    let (base_nll, base_kv) = run(None)?;
    progress(1, total);
    let probe = measured.choose(probe_tau);
    let dense = TcaBudgets::dense(&probe.model_fingerprint, probe.n_layers, probe.n_kv_heads, probe.params);
    let mut out = Vec::with_capacity(groups);
    for gi in 0..groups {
        let layers = gi * n_layers / groups..(gi + 1) * n_layers / groups;
        let mut b = probe.clone();
        for (h, d) in b.heads.iter_mut().zip(&dense.heads) {
            if !layers.contains(&h.layer) {
                *h = d.clone();
            }
        }
        let (nll, kv) = run(Some(Compressor::new(Arc::new(b))))?;
        out.push(GroupCost { layers, cost: (nll - base_nll).exp() - 1.0, saved: 1.0 - kv as f64 / base_kv.max(1) as f64 });
        progress(gi + 2, total);
    }
    Ok(LayerSensitivity { probe_tau, base_ppl: base_nll.exp(), groups: out })
}

/// The text the groups are measured on: the first three quarters of
/// `tokens`, then a quarter of them again (from an eighth in), so the end of
/// the text can be predicted by recalling entries thousands of positions
/// back, which is what compression can lose. Prose the model knows by heart
/// (the bundled text) needs no context to predict, and measured on it alone
/// the groups' costs were within noise of zero.
pub fn recall_probe(tokens: &[u32]) -> Vec<u32> {
    let l = tokens.len();
    let keep = l - l / 4;
    let mut out = tokens[..keep].to_vec();
    out.extend_from_slice(&tokens[l / 8..l / 8 + (l - keep)]);
    out
}

impl LayerSensitivity {
    /// Each group's multiplier of the dropped-mass allowance: the square
    /// root of its saving per unit of cost over the groups' geometric mean,
    /// at most `cap`.
    pub fn multipliers(&self, cap: f64) -> Vec<f64> {
        let eff: Vec<f64> = self.groups.iter().map(|g| g.saved.max(1e-4) / g.cost.max(MIN_COST)).collect();
        let mean_ln = eff.iter().map(|e| e.ln()).sum::<f64>() / eff.len().max(1) as f64;
        eff.iter().map(|e| (e.ln() - mean_ln).exp().sqrt().min(cap)).collect()
    }

    /// Per layer, the threshold for a nominal `tau`:
    /// `1 - (1 - tau) * multiplier` of the layer's group (multipliers at
    /// most `cap`), in `[0, 1]` (`tau = 1` stays 1 everywhere).
    pub fn layer_taus(&self, tau: f32, cap: f64) -> Vec<f32> {
        let m = self.multipliers(cap);
        let n = self.groups.last().map_or(0, |g| g.layers.end);
        let mut out = vec![tau; n];
        for (g, m) in self.groups.iter().zip(m) {
            for t in &mut out[g.layers.clone()] {
                *t = (1.0 - (1.0 - tau as f64) * m).clamp(0.0, 1.0) as f32;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sens(costs: &[(f64, f64)]) -> LayerSensitivity {
        let groups = costs.iter().enumerate().map(|(i, &(cost, saved))| GroupCost { layers: 2 * i..2 * i + 2, cost, saved }).collect();
        LayerSensitivity { probe_tau: 0.7, base_ppl: 10.0, groups }
    }

    #[test]
    fn costly_layers_keep_more_and_cheap_ones_drop_more() {
        // Group 0 costs 8% for 15% saved, group 1 0.04% (counted as 0.1%) for 9%.
        let s = sens(&[(0.08, 0.15), (0.0004, 0.09)]);
        let t = s.layer_taus(0.8, f64::INFINITY);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0], t[1]);
        assert!(t[0] > 0.8 && t[2] < 0.8, "{t:?}");
        // The multipliers' geometric mean is 1.
        let m = s.multipliers(f64::INFINITY);
        assert!((m.iter().map(|v| v.ln()).sum::<f64>()).abs() < 1e-9);
        // Exactness is kept, and equal efficiency gives tau everywhere.
        assert!(s.layer_taus(1.0, f64::INFINITY).iter().all(|&v| v == 1.0));
        assert!(sens(&[(0.02, 0.1), (0.04, 0.2)]).layer_taus(0.7, f64::INFINITY).iter().all(|&v| (v - 0.7).abs() < 1e-6));
        // A cap bounds how far below tau a cheap group goes.
        let capped = s.layer_taus(0.8, 1.5);
        assert!((capped[2] - 0.7).abs() < 1e-6 && capped[0] == t[0], "{capped:?}");
        // Thresholds stay in [0, 1].
        assert!(sens(&[(0.5, 0.01), (0.0, 0.5)]).layer_taus(0.1, f64::INFINITY).iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
}

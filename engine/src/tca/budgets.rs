//! Budget distributions and the budgets file.
//!
//! A distribution `p` gives, for each block budget `k` in `{1, 2, 4, ..., b}`,
//! the fraction of blocks that keep `k` tokens. Candidates are log-Gaussian:
//! `p_k ∝ exp(-(log2 k - mu)^2 / (2 sigma^2))`, plus the dense one (every
//! block keeps all `b`). The file records what the budgets were made for and
//! is refused for another model.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Format tag of the budgets file.
pub const FORMAT: &str = "ouro-tca-budgets/1";

/// Selection parameters shared by calibration and serving.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TcaParams {
    /// Block size `b` (a power of two).
    pub block: usize,
    /// Local window `w`: the last `w` tokens are always kept.
    pub window: usize,
    /// Weight of the in-block spread (1 - HHI) against the block's mass.
    pub alpha: f32,
    /// Query rows whose attention is pooled into the importance: the last
    /// `observe` positions (the paper uses the last one; budgets files
    /// written before this field existed mean 1).
    #[serde(default = "one")]
    pub observe: usize,
    /// Share of an entry's importance handed on to the entry after it
    /// before selecting (`s'_i = max(s_i, chain * s'_{i-1})`, see
    /// [`select::chain`](super::select::chain)): a span the model copies
    /// (a passkey's digits) is read on from where attention lands, but the
    /// observation window's queries only point at its start. 0 is the
    /// paper's rule; budgets files written before this field mean 0.
    #[serde(default)]
    pub chain: f32,
}

fn one() -> usize {
    1
}

impl Default for TcaParams {
    /// The values chosen for SmolLM2-135M (context 8192): b = 64, w = 256,
    /// alpha = 0.5, observe = 16, chain = 0.7.
    fn default() -> Self {
        Self { block: 64, window: 256, alpha: 0.5, observe: 16, chain: 0.7 }
    }
}

impl TcaParams {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if !self.block.is_power_of_two() || self.block < 2 || self.block > 1024 {
            return Err(invalid(format!("TCA block size must be a power of two in [2, 1024], got {}", self.block)));
        }
        if self.observe == 0 || self.observe > self.window.max(1) {
            return Err(invalid(format!("TCA observe must be in [1, w = {}], got {}", self.window, self.observe)));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(invalid(format!("TCA alpha must be in [0, 1], got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.chain) {
            return Err(invalid(format!("TCA chain must be in [0, 1), got {}", self.chain)));
        }
        Ok(())
    }
    /// The block budgets `{1, 2, 4, ..., b}`.
    pub fn budget_values(&self) -> Vec<usize> {
        (0..=self.block.trailing_zeros()).map(|i| 1usize << i).collect()
    }
}

fn invalid(message: String) -> EngineError {
    EngineError::Invalid { param: None, message }
}

/// One (layer, KV head)'s calibrated budgets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadBudget {
    /// Decoder layer.
    pub layer: usize,
    /// KV head.
    pub kv_head: usize,
    /// `p*`: fraction of blocks keeping `1, 2, 4, ..., b` tokens.
    pub p: Vec<f32>,
    /// Mean tokens kept per block, `sum_k k p_k`.
    pub mean_budget: f32,
    /// Fraction of the calibration text's tokens kept (window included).
    pub kept_fraction: f32,
    /// Attention mass the kept tokens retained on the calibration text.
    pub mass: f32,
}

impl HeadBudget {
    /// Whether every block keeps all its tokens (nothing to select).
    pub fn is_dense(&self) -> bool {
        is_dense(&self.p)
    }
}

/// Whether distribution `p` is the dense one (every block keeps all `b`).
pub fn is_dense(p: &[f32]) -> bool {
    p.last().is_some_and(|v| *v >= 1.0)
}

/// The budgets file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcaBudgets {
    /// [`FORMAT`].
    pub format: String,
    /// The model's fingerprint (`Model::fingerprint`).
    pub model_fingerprint: String,
    /// Decoder layers of the model.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Selection parameters.
    pub params: TcaParams,
    /// Mass threshold of the calibration.
    pub tau: f32,
    /// Per layer, the threshold its heads were chosen with when it differs
    /// by layer (`ouro calibrate --layer-groups`, see
    /// [`sensitivity`](super::sensitivity)); empty: `tau` for every layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_tau: Vec<f32>,
    /// What the calibration read.
    pub calibration_source: String,
    /// Calibration tokens.
    pub calibration_tokens: usize,
    /// Per (layer, KV head), layer-major.
    pub heads: Vec<HeadBudget>,
}

impl TcaBudgets {
    /// Budgets keeping every token (the dense distribution) for every head.
    pub fn dense(fingerprint: &str, n_layers: usize, n_kv_heads: usize, params: TcaParams) -> Self {
        let n = params.budget_values().len();
        let mut p = vec![0.0; n];
        p[n - 1] = 1.0;
        let heads = (0..n_layers * n_kv_heads)
            .map(|i| HeadBudget {
                layer: i / n_kv_heads,
                kv_head: i % n_kv_heads,
                mean_budget: params.block as f32,
                p: p.clone(),
                kept_fraction: 1.0,
                mass: 1.0,
            })
            .collect();
        Self {
            format: FORMAT.into(),
            model_fingerprint: fingerprint.into(),
            n_layers,
            n_kv_heads,
            params,
            tau: 1.0,
            layer_tau: Vec::new(),
            calibration_source: "dense".into(),
            calibration_tokens: 0,
            heads,
        }
    }

    /// `p*` of head `(layer, kv_head)`.
    pub fn head(&self, layer: usize, kv_head: usize) -> &HeadBudget {
        &self.heads[layer * self.n_kv_heads + kv_head]
    }

    /// Checks the file's shape and that it was made for the model with this
    /// fingerprint and shape.
    pub fn check(&self, fingerprint: &str, n_layers: usize, n_kv_heads: usize) -> Result<()> {
        if self.format != FORMAT {
            return Err(invalid(format!("TCA budgets: format `{}`, expected `{FORMAT}`", self.format)));
        }
        if self.model_fingerprint != fingerprint {
            return Err(invalid(format!(
                "TCA budgets were calibrated for model {} but the loaded model is {fingerprint}; run `ouro calibrate` for this model",
                self.model_fingerprint
            )));
        }
        self.params.validate()?;
        let nk = self.params.budget_values().len();
        if self.n_layers != n_layers || self.n_kv_heads != n_kv_heads || self.heads.len() != n_layers * n_kv_heads {
            return Err(invalid(format!(
                "TCA budgets: {} heads for {}x{} (file), the model has {n_layers} layers x {n_kv_heads} KV heads",
                self.heads.len(),
                self.n_layers,
                self.n_kv_heads
            )));
        }
        for (i, h) in self.heads.iter().enumerate() {
            let ok = h.layer == i / n_kv_heads
                && h.kv_head == i % n_kv_heads
                && h.p.len() == nk
                && h.p.iter().all(|v| v.is_finite() && *v >= 0.0)
                && (h.p.iter().sum::<f32>() - 1.0).abs() < 1e-3;
            if !ok {
                return Err(invalid(format!("TCA budgets: entry {i} (layer {}, KV head {}) is malformed", h.layer, h.kv_head)));
            }
        }
        Ok(())
    }

    /// Reads a budgets file and checks it against the model.
    pub fn load(path: &Path, fingerprint: &str, n_layers: usize, n_kv_heads: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| invalid(format!("reading TCA budgets {}: {e}", path.display())))?;
        let b: Self =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("TCA budgets {} are not valid JSON: {e}", path.display())))?;
        b.check(fingerprint, n_layers, n_kv_heads).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        Ok(b)
    }

    /// Writes the file atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| invalid(format!("encoding TCA budgets: {e}")))?;
        crate::spec::speculator::write_atomic(path, &json)
    }

    /// Mean over heads of the kept fraction at calibration.
    pub fn mean_kept_fraction(&self) -> f32 {
        self.heads.iter().map(|h| h.kept_fraction).sum::<f32>() / self.heads.len().max(1) as f32
    }
}

/// Mean budget `sum_k k p_k` of a distribution over `{1, 2, 4, ...}`.
pub fn mean_budget(p: &[f32]) -> f32 {
    p.iter().enumerate().map(|(i, v)| v * (1usize << i) as f32).sum()
}

/// The M = 14 log-Gaussian candidates (mu on 7 points of `[0, log2 b]`,
/// sigma in {0.5, 1.5}) plus the dense one, sparsest (smallest mean budget)
/// first.
pub fn candidates(params: &TcaParams) -> Vec<Vec<f32>> {
    let n = params.budget_values().len();
    let top = (n - 1) as f32;
    let mut out = Vec::new();
    for i in 0..7 {
        let mu = top * i as f32 / 6.0;
        for sigma in [0.5f32, 1.5] {
            let w: Vec<f32> = (0..n).map(|x| (-(x as f32 - mu).powi(2) / (2.0 * sigma * sigma)).exp()).collect();
            let z: f32 = w.iter().sum();
            out.push(w.iter().map(|v| v / z).collect());
        }
    }
    let mut dense = vec![0.0; n];
    dense[n - 1] = 1.0;
    out.push(dense);
    out.sort_by(|a, b| mean_budget(a).total_cmp(&mean_budget(b)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_distributions_sorted_by_budget_and_end_dense() {
        let p = TcaParams::default();
        let c = candidates(&p);
        assert_eq!(c.len(), 15);
        for d in &c {
            assert!((d.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        for w in c.windows(2) {
            assert!(mean_budget(&w[0]) <= mean_budget(&w[1]));
        }
        assert_eq!(mean_budget(c.last().unwrap()), 64.0);
    }

    #[test]
    fn a_file_for_another_model_is_refused() {
        let b = TcaBudgets::dense("aaaa", 2, 3, TcaParams::default());
        let dir = std::env::temp_dir().join(format!("ouro-tca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.json");
        b.save(&path).unwrap();
        assert!(TcaBudgets::load(&path, "aaaa", 2, 3).is_ok());
        let e = TcaBudgets::load(&path, "bbbb", 2, 3).unwrap_err().to_string();
        assert!(e.contains("calibrated for model aaaa"), "{e}");
        assert!(TcaBudgets::load(&path, "aaaa", 3, 3).is_err());
        // A file written before `chain` existed keeps the paper's selection;
        // a chain of 1 (importance never fading) is refused.
        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        json["params"].as_object_mut().unwrap().remove("chain");
        std::fs::write(&path, json.to_string()).unwrap();
        assert_eq!(TcaBudgets::load(&path, "aaaa", 2, 3).unwrap().params.chain, 0.0);
        json["params"]["chain"] = 1.0.into();
        std::fs::write(&path, json.to_string()).unwrap();
        assert!(TcaBudgets::load(&path, "aaaa", 2, 3).unwrap_err().to_string().contains("chain must be in [0, 1)"));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(TcaBudgets::load(&path, "aaaa", 2, 3).unwrap_err().to_string().contains("not valid JSON"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

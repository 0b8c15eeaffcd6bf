//! Rotary position embedding frequencies (with Llama 3 scaling or GGUF
//! `rope_freqs` factors) and per-row angle tables.

use crate::config::ModelConfig;

/// Inverse frequencies of each rotated pair of a head.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Frequencies for `cfg`, divided by `freq_factors` when the checkpoint
    /// has them (GGUF Llama 3).
    pub fn new(cfg: &ModelConfig, freq_factors: Option<&[f32]>) -> Self {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.head_dim as f64)).collect();
        if let Some(s) = cfg.rope_scaling {
            let old = s.original_max_position as f64;
            let low_wavelen = old / s.low_freq_factor as f64;
            let high_wavelen = old / s.high_freq_factor as f64;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor as f64;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor as f64) / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                    *f = (1.0 - smooth) * *f / s.factor as f64 + smooth * *f;
                }
            }
        }
        if let Some(ff) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(ff) {
                *f /= *d as f64;
            }
        }
        Self { inv_freq }
    }

    /// Writes the cosines and sines for `pos` (`head_dim / 2` each).
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = pos as f64 * f;
            *c = a.cos() as f32;
            *s = a.sin() as f32;
        }
    }
}

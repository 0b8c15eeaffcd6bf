//! Speculative verification: deciding which drafted tokens the target model
//! accepts, so that the output has exactly the target's distribution.
//!
//! Distributions are sparse: `(token, probability)` pairs after every
//! sampling filter, probabilities summing to 1 (tokens absent have
//! probability 0). For a drafted token `d` with draft probability `q(d)` and
//! target probability `p(d)`:
//! - greedy (temperature 0): accept iff `d` is the target's argmax;
//! - sampling: accept with probability `min(1, p(d) / q(d))`; on rejection
//!   draw the replacement from `norm(max(0, p - q))` (Leviathan et al. 2023,
//!   Chen et al. 2023). The accepted-or-replaced token is then distributed
//!   exactly as `p`.

/// A sparse distribution over token ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseDist {
    /// Token ids (distinct).
    pub tokens: Vec<u32>,
    /// Their probabilities (summing to 1).
    pub probs: Vec<f32>,
}

impl SparseDist {
    /// All mass on one token.
    pub fn point(token: u32) -> Self {
        Self { tokens: vec![token], probs: vec![1.0] }
    }

    /// Probability of `token`.
    pub fn prob(&self, token: u32) -> f32 {
        self.tokens.iter().position(|&t| t == token).map_or(0.0, |i| self.probs[i])
    }

    /// Draws a token given a uniform number `u` in [0, 1).
    pub fn draw(&self, u: f32) -> u32 {
        let total: f32 = self.probs.iter().sum();
        let mut r = u * total;
        for (t, p) in self.tokens.iter().zip(&self.probs) {
            if r < *p {
                return *t;
            }
            r -= p;
        }
        // Rounding left a sliver: the last token with mass.
        self.tokens.iter().zip(&self.probs).rev().find(|(_, p)| **p > 0.0).map_or(0, |(t, _)| *t)
    }
}

/// The outcome of verifying one drafted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The drafted token stands.
    Accept,
    /// The drafted token is replaced by this one (and drafting stops).
    Replace(u32),
}

/// Rejection-sampling test of one drafted token `d` (draft distribution `q`,
/// target distribution `p`). `u_accept` and `u_resample` are independent
/// uniforms in [0, 1).
pub fn verify_sampled(p: &SparseDist, q: &SparseDist, d: u32, u_accept: f32, u_resample: f32) -> Verdict {
    let pd = p.prob(d);
    let qd = q.prob(d);
    if qd > 0.0 && u_accept < (pd / qd).min(1.0) {
        return Verdict::Accept;
    }
    Verdict::Replace(residual(p, q).draw(u_resample))
}

/// `norm(max(0, p - q))`; falls back to `p` when the residual is empty
/// (p == q: then acceptance was certain and this is never drawn).
pub fn residual(p: &SparseDist, q: &SparseDist) -> SparseDist {
    let q_of: std::collections::HashMap<u32, f32> = q.tokens.iter().copied().zip(q.probs.iter().copied()).collect();
    let mut out = SparseDist::default();
    for (&t, &pt) in p.tokens.iter().zip(&p.probs) {
        let r = pt - q_of.get(&t).copied().unwrap_or(0.0);
        if r > 0.0 {
            out.tokens.push(t);
            out.probs.push(r);
        }
    }
    let total: f32 = out.probs.iter().sum();
    if total <= 0.0 {
        return p.clone();
    }
    for v in out.probs.iter_mut() {
        *v /= total;
    }
    out
}

/// Greedy verification of a chain: `target[i]` is the target's choice at
/// row `i` (after the sampler's processing), `drafts[i]` the token drafted for
/// the same position. Returns how many drafts are accepted; the token after
/// them is `target[accepted]` (the correction, or the bonus when all pass).
pub fn verify_greedy(target: &[u32], drafts: &[u32]) -> usize {
    target.iter().zip(drafts).take_while(|(t, d)| t == d).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn greedy_accepts_the_longest_matching_prefix() {
        assert_eq!(verify_greedy(&[5, 6, 7, 8], &[5, 6, 9]), 2);
        assert_eq!(verify_greedy(&[5, 6, 7, 8], &[5, 6, 7]), 3);
        assert_eq!(verify_greedy(&[5], &[]), 0);
        assert_eq!(verify_greedy(&[1, 2], &[2, 2]), 0);
    }

    #[test]
    fn zero_probability_drafts_are_never_accepted() {
        let p = SparseDist { tokens: vec![1, 2], probs: vec![0.5, 0.5] };
        let q = SparseDist::point(3);
        for i in 0..100 {
            let u = i as f32 / 100.0;
            assert!(matches!(verify_sampled(&p, &q, 3, u, u), Verdict::Replace(t) if t == 1 || t == 2));
        }
    }

    /// Chi-square statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts.iter().zip(probs).filter(|(_, &p)| p > 0.0).map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p)).sum()
    }

    #[test]
    fn rejection_sampling_reproduces_the_target_distribution() {
        // Several (p, q) pairs over 6 tokens, including q putting mass where
        // p has none and p having mass where q has none.
        let cases: Vec<(Vec<f32>, Vec<f32>)> = vec![
            (vec![0.1, 0.2, 0.3, 0.25, 0.1, 0.05], vec![0.3, 0.3, 0.1, 0.1, 0.1, 0.1]),
            (vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0], vec![0.0, 0.2, 0.2, 0.2, 0.2, 0.2]),
            (vec![0.05, 0.05, 0.05, 0.05, 0.4, 0.4], vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
            (vec![0.2, 0.2, 0.2, 0.2, 0.2, 0.0], vec![0.2, 0.2, 0.2, 0.2, 0.2, 0.0]),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for (pi, qi) in cases {
            let dist = |v: &[f32]| SparseDist { tokens: (0..6).collect(), probs: v.to_vec() };
            let (p, q) = (dist(&pi), dist(&qi));
            let n = 60_000;
            let mut counts = [0usize; 6];
            for _ in 0..n {
                let d = q.draw(rng.random());
                let t = match verify_sampled(&p, &q, d, rng.random(), rng.random()) {
                    Verdict::Accept => d,
                    Verdict::Replace(t) => t,
                };
                counts[t as usize] += 1;
            }
            let probs: Vec<f64> = pi.iter().map(|&x| x as f64).collect();
            let dof = probs.iter().filter(|&&x| x > 0.0).count() - 1;
            let chi = chi_square(&counts, &probs);
            // 99.9th percentile of chi-square with <= 5 degrees of freedom is 20.5.
            assert!(chi < 20.5, "p={pi:?} q={qi:?}: chi-square {chi:.2} with {dof} dof, counts {counts:?}");
            for (t, &c) in counts.iter().enumerate() {
                if probs[t] == 0.0 {
                    assert_eq!(c, 0, "token {t} has no target mass but was emitted");
                }
            }
        }
    }

    #[test]
    fn a_point_mass_draft_is_accepted_with_the_target_probability() {
        let p = SparseDist { tokens: vec![0, 1, 2], probs: vec![0.6, 0.3, 0.1] };
        let q = SparseDist::point(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = 50_000;
        let accepted = (0..n).filter(|_| verify_sampled(&p, &q, 1, rng.random(), rng.random()) == Verdict::Accept).count();
        assert!((accepted as f64 / n as f64 - 0.3).abs() < 0.01);
    }
}

//! Turning logits into the next token: penalties, temperature, top-k, top-p,
//! min-p, a per-sequence seeded RNG, and log-probabilities.
//!
//! [`Sampler::distribution`] gives the processed distribution (the candidate
//! tokens and their probabilities after every filter) so that speculative
//! verification can compare target and draft distributions under the same
//! processing; [`Sampler::sample`] draws from it. With `temperature == 0`
//! the choice is the argmax (lowest id on ties) and no randomness is used.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings of one request, resolved (no options left).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens below `min_p` times the top probability; 0 disables it.
    pub min_p: f32,
    /// Subtracted once from every token already generated (OpenAI).
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a generated token (OpenAI).
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in the
    /// prompt or output (HF/vLLM); 1 disables it.
    pub repetition_penalty: f32,
    /// RNG seed; the same seed and inputs give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }
    /// Whether decoding is greedy.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
    fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// A log-probability of one token, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability under the model (raw logits, before sampling
    /// filters, as vLLM reports by default).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A processed distribution: candidate tokens and their probabilities
/// (summing to 1), in no particular order.
pub type Distribution = kernels::verify::SparseDist;

/// Buffers reused across calls.
#[derive(Debug, Default)]
pub struct SampleScratch {
    logits: Vec<f32>,
    idx: Vec<u32>,
}

/// Per-sequence sampling state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each generated token.
    counts: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_seen: std::collections::HashSet<u32>,
}

impl Sampler {
    /// A sampler for one sequence; `prompt` feeds the repetition penalty.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        let prompt_seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        Self { params, rng, counts: HashMap::new(), prompt_seen }
    }

    /// The sampling settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The sequence's RNG (speculative verification draws from it too, so a
    /// seeded request stays reproducible).
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Records a generated token (for presence/frequency/repetition penalties).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Logits with the penalties applied (a copy in `scratch`, or `logits`
    /// itself when no penalty is set).
    fn penalized<'a>(&self, logits: &'a [f32], scratch: &'a mut SampleScratch) -> &'a [f32] {
        if !self.params.has_penalties() {
            return logits;
        }
        scratch.logits.clear();
        scratch.logits.extend_from_slice(logits);
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.prompt_seen.iter().chain(self.counts.keys()) {
                if let Some(l) = scratch.logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        for (&t, &c) in &self.counts {
            if let Some(l) = scratch.logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
        &scratch.logits
    }

    /// The next token: argmax when greedy, else a draw from
    /// [`distribution`](Self::distribution).
    pub fn sample(&mut self, logits: &[f32], scratch: &mut SampleScratch) -> u32 {
        if self.params.is_greedy() {
            return argmax(self.penalized(logits, scratch));
        }
        let mut dist = Distribution::default();
        self.distribution(logits, scratch, &mut dist);
        dist.draw(self.rng.random::<f32>())
    }

    /// The processed distribution the next token is drawn from (penalties,
    /// temperature, top-k, top-p, min-p). For greedy decoding it is the
    /// argmax with probability 1.
    pub fn distribution(&self, logits: &[f32], scratch: &mut SampleScratch, out: &mut Distribution) {
        let mut idx = std::mem::take(&mut scratch.idx);
        let l = self.penalized(logits, scratch);
        process(l, &self.params, &mut idx, out);
        scratch.idx = idx;
    }
}

/// Temperature, top-k, min-p and top-p applied to `logits` (no penalties),
/// giving candidate indices and probabilities in `out`. Greedy parameters
/// give the argmax with probability 1. `idx` is scratch.
pub fn process(l: &[f32], p: &SamplingParams, idx: &mut Vec<u32>, out: &mut Distribution) {
    out.tokens.clear();
    out.probs.clear();
    if p.is_greedy() {
        out.tokens.push(argmax(l));
        out.probs.push(1.0);
        return;
    }
    idx.clear();
    idx.extend(0..l.len() as u32);
    let by_logit_desc = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
    // Narrow to top-k.
    let k = if p.top_k > 0 { p.top_k.min(idx.len()) } else { idx.len() };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit_desc);
        idx.truncate(k);
    }
    let max = idx.iter().map(|&i| l[i as usize]).fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / p.temperature;
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((l[i as usize] - max) * inv_t).exp()).collect();
    let total: f32 = probs.iter().sum();
    for q in probs.iter_mut() {
        *q /= total;
    }
    let mut keep: Vec<(u32, f32)> = idx.iter().copied().zip(probs).collect();
    if p.min_p > 0.0 {
        let top = keep.iter().map(|x| x.1).fold(0.0, f32::max);
        keep.retain(|x| x.1 >= p.min_p * top);
    }
    if p.top_p < 1.0 {
        // Tokens below (1 - top_p) / n can never enter the nucleus: the
        // tokens above that bound already hold at least top_p of the mass.
        let bound = (1.0 - p.top_p) / keep.len() as f32;
        keep.retain(|x| x.1 >= bound);
        keep.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cum = 0.0;
        let mut n = 0;
        for x in &keep {
            cum += x.1;
            n += 1;
            if cum >= p.top_p {
                break;
            }
        }
        keep.truncate(n.max(1));
    }
    let total: f32 = keep.iter().map(|x| x.1).sum();
    for (t, q) in keep {
        out.tokens.push(t);
        out.probs.push(q / total);
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best as u32
}

/// Log-probability of `token` under `softmax(logits)` and the `top_n` most
/// likely tokens.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n);
    if top_n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = top_n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        idx.truncate(n);
        idx.sort_unstable_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        top.extend(idx.iter().map(|&i| (i, logits[i as usize] - lse)));
    }
    TokenLogprob { token, logprob: logits.get(token as usize).map(|l| l - lse).unwrap_or(f32::NEG_INFINITY), top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 3.0, -1.0, 0.5]
    }

    #[test]
    fn greedy_takes_the_lowest_index_among_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&logits(), &mut SampleScratch::default()), 1);
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let p = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let s = Sampler::new(p, &[]);
        let mut d = Distribution::default();
        s.distribution(&logits(), &mut SampleScratch::default(), &mut d);
        let mut t = d.tokens.clone();
        t.sort();
        assert_eq!(t, vec![1, 3]);
        assert!((d.probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // probs of [3, 3, 2, 1, 0.5, -1] at T=1: 0.37, 0.37, 0.14, 0.05, ...
        let p = SamplingParams { temperature: 1.0, top_p: 0.8, ..Default::default() };
        let s = Sampler::new(p, &[]);
        let mut d = Distribution::default();
        s.distribution(&logits(), &mut SampleScratch::default(), &mut d);
        let mut t = d.tokens.clone();
        t.sort();
        assert_eq!(t, vec![1, 2, 3]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let p = SamplingParams { temperature: 1.0, min_p: 0.2, ..Default::default() };
        let s = Sampler::new(p, &[]);
        let mut d = Distribution::default();
        s.distribution(&logits(), &mut SampleScratch::default(), &mut d);
        let mut t = d.tokens.clone();
        t.sort();
        assert_eq!(t, vec![1, 2, 3]); // exp(-1) = 0.37 >= 0.2, exp(-2) < 0.2
    }

    #[test]
    fn penalties_follow_openai_and_hf_definitions() {
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[4]);
        s.observe(1);
        s.observe(1);
        let mut sc = SampleScratch::default();
        let l = s.penalized(&logits(), &mut sc).to_vec();
        assert_eq!(l[1], 3.0 / 2.0 - 2.0 * 1.0 - 0.5);
        assert_eq!(l[4], -2.0);
        assert_eq!(l[3], 3.0);
    }

    #[test]
    fn same_seed_gives_the_same_draws_and_draws_follow_the_distribution() {
        let p = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let draws = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..p.clone() }, &[]);
            let mut sc = SampleScratch::default();
            (0..4000).map(|_| s.sample(&logits(), &mut sc)).collect::<Vec<u32>>()
        };
        let a = draws(42);
        assert_eq!(a, draws(42));
        assert_ne!(a, draws(43));
        let l = logits();
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        for tok in 0..6u32 {
            let freq = a.iter().filter(|&&t| t == tok).count() as f32 / a.len() as f32;
            let want = l[tok as usize].exp() / z;
            assert!((freq - want).abs() < 0.03, "token {tok}: {freq} vs {want}");
        }
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let lp = logprobs(&logits(), 2, 3);
        let z: f32 = logits().iter().map(|x| x.exp()).sum();
        assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
    }
}

//! Choosing, per sequence and step, whether to draft, with which drafter,
//! and how many tokens, from measured utility.
//!
//! Utility is accepted tokens per second of step time: with acceptance rate
//! `a` per drafted token (estimated from the sequence's recent steps, with
//! the drafter's global rate as a prior) a chain of `k` drafts yields
//! `1 + a + a^2 + ... + a^k` tokens, and costs `T(rows + k)` plus the
//! drafting time, where `T(r)` is the measured duration of engine steps with
//! `r` rows (an average per row count, interpolated between measured counts).
//! Drafting happens when its utility beats not drafting (`1 / T(rows)`) by a
//! margin; otherwise a sequence still tries a short draft every so often, so
//! that a drafter that got better (a new speculator version, a repetitive
//! stretch of text) is noticed.

use super::{DrafterKind, SpecMode, SpecRequest, MAX_K};

/// How much better than not drafting a choice must look.
const MARGIN: f64 = 1.03;
/// A sequence that does not draft re-tries every this many steps.
const EXPLORE_EVERY: u64 = 16;
/// Decay of a sequence's acceptance counts per observation.
const SEQ_DECAY: f64 = 0.85;
/// Decay of the global acceptance counts per observation.
const GLOBAL_DECAY: f64 = 0.995;
/// Weight of the global rate in a sequence's estimate (pseudo-counts).
const PRIOR_WEIGHT: f64 = 3.0;
/// Most rows whose step time is tracked.
const MAX_ROWS: usize = 512;

/// Decayed counts of accepted drafts and of rejections.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Acceptance {
    accepted: f64,
    rejected: f64,
}

impl Acceptance {
    fn observe(&mut self, drafted: usize, accepted: usize, decay: f64) {
        self.accepted = self.accepted * decay + accepted as f64;
        self.rejected = self.rejected * decay + if accepted < drafted { 1.0 } else { 0.0 };
    }

    /// Per-token acceptance rate with `prior` counted as `weight` observations.
    pub fn rate(&self, prior: f64, weight: f64) -> f64 {
        (self.accepted + prior * weight) / (self.accepted + self.rejected + weight).max(1e-9)
    }

    fn observations(&self) -> f64 {
        self.accepted + self.rejected
    }
}

/// A sequence's policy state.
#[derive(Debug, Clone, Default)]
pub struct SeqPolicy {
    accept: [Acceptance; 2],
    steps: u64,
    last_draft_step: u64,
    /// Explorations in a row that did not lead to drafting (backs off).
    fruitless: u32,
    /// The exploration state before this step's exploration, if it explored.
    explored_from: Option<(u64, u32)>,
}

/// What to do for one sequence this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The drafter.
    pub drafter: DrafterKind,
    /// Tokens to draft.
    pub k: usize,
}

/// The engine-wide policy.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: SpecMode,
    fixed_k: Option<usize>,
    /// Average step seconds by row count (index = rows).
    step_secs: Vec<Option<f64>>,
    global: [Acceptance; 2],
    /// Drafting seconds per drafted token.
    draft_secs: [f64; 2],
    speculator_ready: bool,
    /// Each drafter's acceptance rate before anything is observed (the
    /// speculator's: its serving version's simulated rate, when known).
    first_rate: [f64; 2],
}

/// Seconds of a step with `rows` rows from `measured` (index = rows, `None`
/// where nothing was measured): a measured count as it is; between measured
/// counts, linear; past the highest, with the slope of the two highest (or a
/// quarter of a row's cost per row when there is one, or the slope is not
/// positive); below the lowest, in proportion to the rows.
pub fn interpolate_step_secs(measured: &[Option<f64>], rows: usize) -> Option<f64> {
    let at = |r: usize| measured.get(r).copied().flatten();
    if let Some(t) = at(rows) {
        return Some(t);
    }
    let below = (1..rows).rev().find_map(|r| at(r).map(|t| (r, t)));
    let above = (rows + 1..measured.len()).find_map(|r| at(r).map(|t| (r, t)));
    match (below, above) {
        (Some((r0, t0)), Some((r1, t1))) => Some(t0 + (t1 - t0) * (rows - r0) as f64 / (r1 - r0) as f64),
        (Some((r0, t0)), None) => {
            let prev = (1..r0).rev().find_map(|r| at(r).map(|t| (r, t)));
            let slope = match prev {
                Some((rp, tp)) if t0 > tp => (t0 - tp) / (r0 - rp) as f64,
                _ => 0.25 * t0 / r0 as f64,
            };
            Some(t0 + slope * (rows - r0) as f64)
        }
        (None, Some((r1, t1))) => Some(t1 * rows as f64 / r1 as f64),
        (None, None) => None,
    }
}

/// Starting acceptance guesses before anything is measured.
const PRIOR_RATE: [f64; 2] = [0.3, 0.1];

impl Policy {
    /// A policy for `mode`; `fixed_k` forces the chain length (tests).
    pub fn new(mode: SpecMode, fixed_k: Option<usize>) -> Self {
        Self {
            mode,
            fixed_k: fixed_k.map(|k| k.clamp(1, MAX_K)),
            step_secs: vec![None; MAX_ROWS + 1],
            global: [Acceptance::default(); 2],
            draft_secs: [0.0, 2e-3],
            speculator_ready: false,
            first_rate: PRIOR_RATE,
        }
    }

    /// Whether a speculator is loaded. A new version resets its estimates
    /// to `prior` (its per-draft acceptance rate simulated offline, when its
    /// manifest has one; else a low default) until live verifications
    /// take over.
    pub fn set_speculator(&mut self, ready: bool, new_version: bool, prior: Option<f64>) {
        self.speculator_ready = ready;
        if new_version {
            self.global[DrafterKind::Speculator.index()] = Acceptance::default();
            let i = DrafterKind::Speculator.index();
            self.first_rate[i] = prior.unwrap_or(PRIOR_RATE[i]).clamp(0.0, 0.95);
        }
    }

    /// Records a step's duration.
    pub fn observe_step(&mut self, rows: usize, secs: f64) {
        if rows == 0 || rows > MAX_ROWS {
            return;
        }
        let e = &mut self.step_secs[rows];
        *e = Some(match *e {
            Some(old) => 0.8 * old + 0.2 * secs,
            None => secs,
        });
    }

    /// Records how long drafting `tokens` tokens took.
    pub fn observe_draft_time(&mut self, drafter: DrafterKind, tokens: usize, secs: f64) {
        if tokens > 0 {
            let e = &mut self.draft_secs[drafter.index()];
            *e = 0.8 * *e + 0.2 * secs / tokens as f64;
        }
    }

    /// Records a verification: `accepted` of `drafted` tokens stood.
    pub fn observe_verify(&mut self, seq: &mut SeqPolicy, drafter: DrafterKind, drafted: usize, accepted: usize) {
        seq.accept[drafter.index()].observe(drafted, accepted, SEQ_DECAY);
        self.global[drafter.index()].observe(drafted, accepted, GLOBAL_DECAY);
    }

    /// Current acceptance-rate estimate of `drafter` for `seq`.
    pub fn rate(&self, seq: &SeqPolicy, drafter: DrafterKind) -> f64 {
        let i = drafter.index();
        let prior = self.global[i].rate(self.first_rate[i], 2.0);
        seq.accept[i].rate(prior, PRIOR_WEIGHT)
    }

    /// Estimated seconds of a step with `rows` rows, if anything is measured.
    pub fn step_time(&self, rows: usize) -> Option<f64> {
        interpolate_step_secs(&self.step_secs, rows.clamp(1, MAX_ROWS))
    }

    /// The chosen drafter proposed nothing (the n-gram drafter found no
    /// match): an exploration that measured nothing does not count, so the
    /// sequence explores again at its next step instead of backing off.
    pub fn drafted_nothing(&self, seq: &mut SeqPolicy) {
        if let Some((last, fruitless)) = seq.explored_from.take() {
            seq.last_draft_step = last;
            seq.fruitless = fruitless;
        }
    }

    /// The mode and fixed draft length in force for a request: its own, else
    /// the engine's.
    fn settings(&self, request: Option<SpecRequest>) -> (SpecMode, Option<usize>) {
        let mode = request.map_or(self.mode, |r| r.mode);
        (mode, request.and_then(|r| r.k).map(|k| k.clamp(1, MAX_K)).or(self.fixed_k))
    }

    /// The drafter and chain length of highest utility (accepted tokens per
    /// second of step and drafting time) among `candidates`, with it.
    fn best(&self, seq: &SeqPolicy, rows: usize, candidates: &[DrafterKind]) -> Option<(f64, Choice)> {
        let mut best: Option<(f64, Choice)> = None;
        for &d in candidates {
            let a = self.rate(seq, d);
            let mut tokens = 1.0;
            let mut ak = 1.0;
            for k in 1..=MAX_K {
                ak *= a;
                tokens += ak;
                let Some(t) = self.step_time(rows + k) else { continue };
                let u = tokens / (t + k as f64 * self.draft_secs[d.index()]);
                if best.is_none_or(|(bu, _)| u > bu) {
                    best = Some((u, Choice { drafter: d, k }));
                }
            }
        }
        best
    }

    /// The n-gram drafter, chosen for this step, found no match: in `auto`
    /// mode the speculator drafts instead when that pays by itself.
    pub fn instead_of_empty_ngram(&self, seq: &SeqPolicy, rows: usize, request: Option<SpecRequest>) -> Option<Choice> {
        let (mode, fixed_k) = self.settings(request);
        if mode != SpecMode::Auto || !self.speculator_ready || fixed_k.is_some() {
            return None;
        }
        let base = self.step_time(rows)?;
        let (u, choice) = self.best(seq, rows, &[DrafterKind::Speculator])?;
        (u > MARGIN / base).then_some(choice)
    }

    /// Decides for one sequence whose decode row brings the step to `rows`
    /// rows. `None`: no drafting this step.
    pub fn choose(&self, seq: &mut SeqPolicy, rows: usize, request: Option<SpecRequest>) -> Option<Choice> {
        seq.steps += 1;
        seq.explored_from = None;
        let (mode, fixed_k) = self.settings(request);
        let candidates: &[DrafterKind] = match mode {
            SpecMode::Off => return None,
            SpecMode::Ngram => &[DrafterKind::Ngram],
            SpecMode::Speculator if self.speculator_ready => &[DrafterKind::Speculator],
            SpecMode::Speculator => return None,
            SpecMode::Auto if self.speculator_ready => &[DrafterKind::Ngram, DrafterKind::Speculator],
            SpecMode::Auto => &[DrafterKind::Ngram],
        };
        let forced = mode != SpecMode::Auto;
        if let Some(k) = fixed_k {
            seq.last_draft_step = seq.steps;
            return Some(Choice { drafter: candidates[0], k });
        }
        let Some(base) = self.step_time(rows) else {
            // Nothing measured yet: a short draft measures both costs.
            seq.last_draft_step = seq.steps;
            return Some(Choice { drafter: candidates[0], k: 2 });
        };
        let (u, choice) = self.best(seq, rows, candidates)?;
        if forced || u > MARGIN / base {
            seq.last_draft_step = seq.steps;
            seq.fruitless = 0;
            return Some(choice);
        }
        // Explore now and then, backing off (16, 32, 64, ... steps) while
        // exploring keeps finding nothing worth drafting.
        if seq.steps - seq.last_draft_step >= EXPLORE_EVERY << seq.fruitless.min(4) {
            seq.explored_from = Some((seq.last_draft_step, seq.fruitless));
            seq.last_draft_step = seq.steps;
            seq.fruitless += 1;
            // Refresh the estimate of the least-observed drafter.
            let d =
                *candidates.iter().min_by(|a, b| seq.accept[a.index()].observations().total_cmp(&seq.accept[b.index()].observations()))?;
            return Some(Choice { drafter: d, k: 2 });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(per_row: f64, base: f64) -> Policy {
        let mut p = Policy::new(SpecMode::Auto, None);
        for r in [1usize, 2, 3, 5, 9] {
            p.observe_step(r, base + per_row * r as f64);
        }
        p
    }

    #[test]
    fn step_time_interpolates_and_extrapolates_measurements() {
        let p = measured(1.0, 10.0);
        assert_eq!(p.step_time(3), Some(13.0));
        assert_eq!(p.step_time(4), Some(14.0));
        assert!((p.step_time(12).unwrap() - 22.0).abs() < 1e-9);
    }

    #[test]
    fn drafting_turns_on_when_drafts_are_accepted_and_off_when_not() {
        let mut p = measured(2.0, 10.0); // cheap extra rows
        let mut good = SeqPolicy::default();
        for _ in 0..20 {
            p.observe_verify(&mut good, DrafterKind::Ngram, 4, 4);
        }
        let c = p.choose(&mut good, 1, None).unwrap();
        assert_eq!(c.drafter, DrafterKind::Ngram);
        assert!(c.k >= 4, "{c:?}");
        // A fresh engine whose drafts are all rejected.
        let mut p = measured(2.0, 10.0);
        let mut bad = SeqPolicy::default();
        for _ in 0..20 {
            p.observe_verify(&mut bad, DrafterKind::Ngram, 4, 0);
        }
        assert_eq!(p.choose(&mut bad, 1, None), None);
    }

    #[test]
    fn expensive_rows_need_higher_acceptance() {
        // Each extra row costs as much as the whole step: no k can pay at 50%.
        let mut p = measured(10.0, 0.0);
        let mut s = SeqPolicy::default();
        for _ in 0..20 {
            p.observe_verify(&mut s, DrafterKind::Ngram, 2, 1);
        }
        assert_eq!(p.choose(&mut s, 1, None), None);
    }

    #[test]
    fn a_sequence_that_does_not_draft_explores_now_and_then_backing_off() {
        let mut p = measured(10.0, 0.0);
        let mut s = SeqPolicy::default();
        for _ in 0..20 {
            p.observe_verify(&mut s, DrafterKind::Ngram, 2, 0);
        }
        // Every 16 steps, then 32, 64, ... while nothing pays: tries at
        // steps 16, 48 and 112 out of 200.
        let tries = (0..200).filter(|_| p.choose(&mut s, 1, None).is_some()).count();
        assert_eq!(tries, 3);
    }

    #[test]
    fn an_exploration_that_drafted_nothing_is_retried_at_the_next_step() {
        let mut p = measured(10.0, 0.0);
        let mut s = SeqPolicy::default();
        for _ in 0..20 {
            p.observe_verify(&mut s, DrafterKind::Ngram, 2, 0);
        }
        let first = (1..=100).find(|_| p.choose(&mut s, 1, None).is_some()).unwrap();
        assert_eq!(first, 16);
        // No n-gram match: the next step explores again, not 32 steps later.
        p.drafted_nothing(&mut s);
        assert!(p.choose(&mut s, 1, None).is_some());
        // That one drafted: the next exploration is backed off again.
        assert_eq!(p.choose(&mut s, 1, None), None);
        // A step that did not explore is not undone.
        p.drafted_nothing(&mut s);
        assert_eq!(p.choose(&mut s, 1, None), None);
    }

    #[test]
    fn a_new_speculator_starts_from_its_simulated_rate() {
        // Extra rows cost a fifth of a step: at the default prior (0.1) the
        // speculator does not pay, at a simulated 0.8 it does, at once.
        let mut p = measured(2.0, 10.0);
        p.set_speculator(true, true, None);
        let mut s = SeqPolicy::default();
        assert_ne!(p.choose(&mut s, 1, None).map(|c| c.drafter), Some(DrafterKind::Speculator));
        assert_eq!(p.instead_of_empty_ngram(&s, 1, None), None);
        p.set_speculator(true, true, Some(0.8));
        let mut s = SeqPolicy::default();
        assert_eq!(p.choose(&mut s, 1, None).map(|c| c.drafter), Some(DrafterKind::Speculator));
        // Live verifications take over from the prior.
        for _ in 0..30 {
            p.observe_verify(&mut s, DrafterKind::Speculator, 4, 0);
        }
        assert!(p.rate(&s, DrafterKind::Speculator) < 0.2);
        // The same version again keeps what was learned live.
        p.set_speculator(true, false, Some(0.8));
        assert!(p.rate(&s, DrafterKind::Speculator) < 0.2);
    }

    #[test]
    fn the_speculator_drafts_when_the_ngram_drafter_finds_nothing_in_auto_mode_only() {
        let mut p = measured(2.0, 10.0);
        p.set_speculator(true, true, Some(0.8));
        let s = SeqPolicy::default();
        let c = p.instead_of_empty_ngram(&s, 1, None).unwrap();
        assert_eq!(c.drafter, DrafterKind::Speculator);
        assert!(c.k >= 2, "{c:?}");
        let ngram_only = Some(SpecRequest { mode: SpecMode::Ngram, k: None });
        assert_eq!(p.instead_of_empty_ngram(&s, 1, ngram_only), None);
        let fixed = Some(SpecRequest { mode: SpecMode::Auto, k: Some(3) });
        assert_eq!(p.instead_of_empty_ngram(&s, 1, fixed), None);
        p.set_speculator(false, false, None);
        assert_eq!(p.instead_of_empty_ngram(&s, 1, None), None);
    }

    #[test]
    fn forced_modes_always_draft_and_off_never() {
        let mut s = SeqPolicy::default();
        let p = Policy::new(SpecMode::Off, None);
        assert_eq!(p.choose(&mut s, 1, None), None);
        let mut p = Policy::new(SpecMode::Ngram, None);
        p.observe_step(1, 1.0);
        p.observe_step(9, 100.0);
        assert!(p.choose(&mut s, 1, None).is_some());
        let p = Policy::new(SpecMode::Ngram, Some(5));
        assert_eq!(p.choose(&mut s, 1, None), Some(Choice { drafter: DrafterKind::Ngram, k: 5 }));
    }
}

//! The replay window: recent traces reassembled into per-sequence runs of
//! consecutive committed positions, bounded by bytes, with a held-out slice.
//!
//! A committed position `p` keeps the token after it (`x[p+1]`), the target's
//! features at `p` (three layers) and its final hidden state (which gives the
//! target's distribution of `x[p+2]` through the frozen LM head). A training
//! window of `L` draft positions needs `L + 1` consecutive positions. Discard
//! rows (a rejected draft's position) are kept apart as single samples.
//!
//! Sequences whose id hashes into the held-out slice are never trained on;
//! they feed the offline gate. When the window is over its byte budget the
//! oldest runs go first.

use std::collections::{HashMap, VecDeque};

use engine::trace::Trace;

/// One committed position.
#[derive(Debug, Clone)]
pub struct Position {
    /// Position in the sequence.
    pub pos: usize,
    /// The token after it (`x[p+1]`).
    pub next: u32,
    /// Target features `[3H]`.
    pub features: Vec<f32>,
    /// Target final hidden state `[H]`.
    pub last: Vec<f32>,
}

impl Position {
    fn bytes(&self) -> usize {
        4 * (self.features.len() + self.last.len()) + 32
    }
}

/// A rejected draft: the draft proposed `token` after the committed position
/// whose features are `features_prev`; `last` is the target's final hidden
/// state at the rejected token's position.
#[derive(Debug, Clone)]
pub struct Discard {
    /// The rejected token.
    pub token: u32,
    /// Position of the committed row before it.
    pub pos_prev: usize,
    /// Features of the committed row before it `[3H]`.
    pub features_prev: Vec<f32>,
    /// Target final hidden state at the rejected position `[H]`.
    pub last: Vec<f32>,
    /// Whether this belongs to the held-out slice.
    pub heldout: bool,
}

impl Discard {
    fn bytes(&self) -> usize {
        4 * (self.features_prev.len() + self.last.len()) + 32
    }
}

/// A run of consecutive committed positions of one sequence.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The positions, consecutive.
    pub positions: Vec<Position>,
    /// Whether the sequence is held out.
    pub heldout: bool,
    bytes: usize,
}

/// The replay window.
#[derive(Debug)]
pub struct Replay {
    runs: VecDeque<(u64, Run)>,
    /// Index of the open run of each sequence in `runs` order (by seq id).
    open: HashMap<u64, usize>,
    discards: VecDeque<Discard>,
    bytes: usize,
    max_bytes: usize,
    heldout_every: u64,
    /// Occurrences of each generated token (for the draft vocabulary).
    pub token_counts: HashMap<u32, u64>,
    /// Traces ingested.
    pub traces: u64,
    /// Runs evicted (how much history was forgotten).
    pub evicted: u64,
}

/// Whether a sequence id falls in the held-out slice (one in `every`).
pub fn is_heldout(seq_id: u64, every: u64) -> bool {
    // A mixing hash, so that consecutive ids spread over both slices.
    let h = seq_id.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    every > 0 && h.is_multiple_of(every)
}

impl Replay {
    /// An empty window of at most `max_bytes`, holding out one sequence in
    /// `heldout_every`.
    pub fn new(max_bytes: usize, heldout_every: u64) -> Self {
        Self {
            runs: VecDeque::new(),
            open: HashMap::new(),
            discards: VecDeque::new(),
            bytes: 0,
            max_bytes,
            heldout_every,
            token_counts: HashMap::new(),
            traces: 0,
            evicted: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The runs, oldest first.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.iter().map(|(_, r)| r)
    }

    /// The discard samples, oldest first.
    pub fn discards(&self) -> impl Iterator<Item = &Discard> {
        self.discards.iter()
    }

    /// Positions held (train and held-out).
    pub fn positions(&self) -> usize {
        self.runs.iter().map(|(_, r)| r.positions.len()).sum()
    }

    /// Adds one trace.
    pub fn ingest(&mut self, t: &Trace) {
        self.traces += 1;
        let rows = t.rows();
        if rows == 0 {
            return;
        }
        let f3 = t.features.len() / rows;
        let h = t.last_hidden.len() / rows;
        let heldout = is_heldout(t.seq_id, self.heldout_every);
        let committed = rows - usize::from(t.discard);
        for j in 0..committed {
            let p = Position {
                pos: t.start_pos + j,
                next: t.next_tokens[j],
                features: t.features[j * f3..(j + 1) * f3].to_vec(),
                last: t.last_hidden[j * h..(j + 1) * h].to_vec(),
            };
            if !t.prefill {
                *self.token_counts.entry(p.next).or_insert(0) += 1;
            }
            self.push_position(t.seq_id, heldout, p);
        }
        if t.discard && committed > 0 {
            let r = rows - 1;
            let d = Discard {
                token: t.tokens[r],
                pos_prev: t.start_pos + committed - 1,
                features_prev: t.features[(committed - 1) * f3..committed * f3].to_vec(),
                last: t.last_hidden[r * h..(r + 1) * h].to_vec(),
                heldout,
            };
            self.bytes += d.bytes();
            self.discards.push_back(d);
        }
        self.evict();
    }

    fn push_position(&mut self, seq_id: u64, heldout: bool, p: Position) {
        let b = p.bytes();
        // Continue the sequence's open run when the position follows it.
        if let Some(&i) = self.open.get(&seq_id) {
            if let Some((_, run)) = self.runs.get_mut(i) {
                let last = run.positions.last().map(|x| x.pos);
                if last.is_some_and(|l| p.pos == l + 1) {
                    run.positions.push(p);
                    run.bytes += b;
                    self.bytes += b;
                    return;
                }
                if last.is_some_and(|l| p.pos <= l) {
                    // Recomputed after preemption: already have it.
                    return;
                }
            }
        }
        self.runs.push_back((seq_id, Run { positions: vec![p], heldout, bytes: b }));
        self.bytes += b;
        self.open.insert(seq_id, self.runs.len() - 1);
    }

    fn evict(&mut self) {
        while self.bytes > self.max_bytes && (!self.runs.is_empty() || !self.discards.is_empty()) {
            // Alternate: discards are small; drop them in proportion.
            if self.discards.len() > 4 * self.runs.len().max(1) {
                if let Some(d) = self.discards.pop_front() {
                    self.bytes -= d.bytes();
                }
                continue;
            }
            match self.runs.pop_front() {
                Some((id, run)) => {
                    self.bytes -= run.bytes;
                    self.evicted += 1;
                    // Shift the open-run indices.
                    self.open.retain(|_, i| *i > 0);
                    for i in self.open.values_mut() {
                        *i -= 1;
                    }
                    let _ = id;
                }
                None => {
                    if let Some(d) = self.discards.pop_front() {
                        self.bytes -= d.bytes();
                    }
                }
            }
        }
    }

    /// Windows of `len + 1` consecutive positions from the train (or
    /// held-out) slice: `(run index, start)` pairs, every `stride` positions.
    pub fn windows(&self, len: usize, stride: usize, heldout: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (i, (_, r)) in self.runs.iter().enumerate() {
            if r.heldout != heldout || r.positions.len() < 2 {
                continue;
            }
            let n = r.positions.len();
            if n <= len {
                out.push((i, 0));
                continue;
            }
            let mut s = 0;
            while s + len < n {
                out.push((i, s));
                s += stride.max(1);
            }
        }
        out
    }

    /// Run `i` (in the order of [`runs`](Self::runs)).
    pub fn run(&self, i: usize) -> Option<&Run> {
        self.runs.get(i).map(|(_, r)| r)
    }

    /// The `size` most frequent generated tokens (ties by id), padded with
    /// the lowest ids not yet chosen; the result is sorted.
    pub fn top_tokens(&self, size: usize, vocab: usize) -> Vec<u32> {
        let mut by_count: Vec<(u32, u64)> = self.token_counts.iter().map(|(&t, &c)| (t, c)).collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut chosen: Vec<u32> = by_count.into_iter().take(size).map(|x| x.0).collect();
        let set: std::collections::HashSet<u32> = chosen.iter().copied().collect();
        let mut next = 0u32;
        while chosen.len() < size.min(vocab) {
            if !set.contains(&next) {
                chosen.push(next);
            }
            next += 1;
        }
        chosen.sort_unstable();
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(seq: u64, start: usize, rows: usize, discard: bool, h: usize) -> Trace {
        Trace {
            seq_id: seq,
            start_pos: start,
            tokens: (0..rows as u32).map(|i| 100 + i).collect(),
            next_tokens: (0..(rows - usize::from(discard)) as u32).map(|i| 200 + i).collect(),
            discard,
            drafter: None,
            drafts: vec![],
            accepted: 0,
            features: vec![start as f32; rows * 3 * h],
            last_hidden: vec![1.0; rows * h],
            speculator_version: None,
            prefill: false,
        }
    }

    #[test]
    fn consecutive_traces_of_a_sequence_join_one_run() {
        let mut r = Replay::new(1 << 30, 0);
        r.ingest(&trace(1, 10, 3, false, 4));
        r.ingest(&trace(1, 13, 2, true, 4));
        r.ingest(&trace(2, 0, 2, false, 4));
        let runs: Vec<&Run> = r.runs().collect();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].positions.iter().map(|p| p.pos).collect::<Vec<_>>(), vec![10, 11, 12, 13]);
        assert_eq!(r.discards().count(), 1);
        let d = r.discards().next().unwrap();
        assert_eq!((d.token, d.pos_prev), (101, 13));
    }

    #[test]
    fn a_gap_starts_a_new_run_and_duplicates_are_ignored() {
        let mut r = Replay::new(1 << 30, 0);
        r.ingest(&trace(1, 0, 3, false, 4));
        r.ingest(&trace(1, 1, 2, false, 4)); // recomputed positions
        r.ingest(&trace(1, 10, 2, false, 4));
        let lens: Vec<usize> = r.runs().map(|x| x.positions.len()).collect();
        assert_eq!(lens, vec![3, 2]);
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_runs() {
        let mut r = Replay::new(3000, 0);
        for s in 0..10 {
            r.ingest(&trace(s, 0, 4, false, 8));
        }
        assert!(r.bytes() <= 3000, "{}", r.bytes());
        assert!(r.evicted > 0);
        // The newest survives.
        assert!(r.runs.iter().any(|(id, _)| *id == 9));
        // And continuing it still works after evictions shifted indices.
        r.ingest(&trace(9, 4, 1, false, 8));
        assert!(r.runs.iter().any(|(id, run)| *id == 9 && run.positions.len() == 5));
    }

    #[test]
    fn the_heldout_slice_is_stable_and_about_the_right_size() {
        let n = (0..10_000u64).filter(|&s| is_heldout(s, 10)).count();
        assert!((800..1200).contains(&n), "{n}");
        assert_eq!(is_heldout(12345, 10), is_heldout(12345, 10));
    }

    #[test]
    fn windows_cover_runs_with_one_extra_position() {
        let mut r = Replay::new(1 << 30, 0);
        r.ingest(&trace(3, 0, 10, false, 2));
        let w = r.windows(4, 2, false);
        assert_eq!(w, vec![(0, 0), (0, 2), (0, 4)]);
    }

    #[test]
    fn top_tokens_prefers_frequent_ones_and_pads() {
        let mut r = Replay::new(1 << 30, 0);
        r.ingest(&trace(1, 0, 3, false, 2)); // next tokens 200, 201, 202
        r.ingest(&trace(1, 3, 1, false, 2)); // 200 again
        let v = r.top_tokens(4, 1000);
        assert_eq!(v.len(), 4);
        assert!(v.contains(&200) && v.contains(&201) && v.contains(&202));
    }
}

//! Prompt-lookup drafting: match the last few tokens of the sequence
//! against its earlier text (prompt and generated) and propose what followed
//! the most recent match. No model, almost no cost; it shines when the answer
//! repeats or edits given text.

use super::{Draft, DraftContext, Drafter};
use crate::error::Result;

/// The n-gram drafter.
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    /// Longest suffix tried first.
    pub max_ngram: usize,
    /// Shortest suffix accepted.
    pub min_ngram: usize,
    /// How far back to search (tokens).
    pub max_lookback: usize,
}

impl Default for NgramDrafter {
    fn default() -> Self {
        Self { max_ngram: 4, min_ngram: 2, max_lookback: 8192 }
    }
}

impl NgramDrafter {
    /// The continuation of the most recent earlier occurrence of the longest
    /// matching suffix (up to `k` tokens), or nothing.
    pub fn lookup(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        let len = tokens.len();
        let start = len.saturating_sub(self.max_lookback);
        for n in (self.min_ngram..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let suffix = &tokens[len - n..];
            // Most recent match that is not the suffix itself.
            let mut i = len - n;
            while i > start {
                i -= 1;
                if &tokens[i..i + n] == suffix {
                    let from = i + n;
                    let to = (from + k).min(len);
                    if from < to {
                        return tokens[from..to].to_vec();
                    }
                }
            }
        }
        Vec::new()
    }
}

impl Drafter for NgramDrafter {
    fn name(&self) -> &'static str {
        "ngram"
    }

    fn draft(&mut self, ctx: &mut DraftContext<'_>, k: usize, out: &mut Draft) -> Result<()> {
        out.clear();
        for t in self.lookup(ctx.tokens, k) {
            out.push_point(t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_latest_match() {
        let d = NgramDrafter::default();
        // ... 7 8 9 10 11 ... 7 8 9 -> propose 10 11 12
        let t = [1, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9];
        assert_eq!(d.lookup(&t, 3), vec![10, 11, 12]);
        assert_eq!(d.lookup(&t, 10), vec![10, 11, 12, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn prefers_the_longest_suffix_then_the_most_recent_occurrence() {
        let d = NgramDrafter::default();
        // "2 3" occurs twice; the later one is followed by 9.
        let t = [1, 2, 3, 4, 0, 2, 3, 9, 0, 2, 3];
        assert_eq!(d.lookup(&t, 1), vec![9]);
        // A longer match wins over a more recent shorter one.
        let t = [5, 1, 2, 3, 4, 0, 2, 3, 9, 5, 1, 2, 3];
        assert_eq!(d.lookup(&t, 1), vec![4]);
    }

    #[test]
    fn proposes_nothing_without_a_match() {
        let d = NgramDrafter::default();
        assert!(d.lookup(&[1, 2, 3, 4, 5], 4).is_empty());
        assert!(d.lookup(&[1], 4).is_empty());
    }
}

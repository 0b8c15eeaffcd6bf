//! The observation window of one sequence: the queries of its last
//! `observe` fed positions (every layer), which TCA pools into the
//! importance of each cached entry when the sequence is compressed.
//!
//! Prefill chunks fill it with their last rows at once; decoding adds one
//! row per step (the last fed token's), so a compression during decoding is
//! judged by the queries of the last `observe` steps rather than by the
//! single query of the step that happens to make it due.

use std::collections::VecDeque;

/// Recent query rows of one sequence, oldest first.
#[derive(Debug, Clone)]
pub struct QueryWindow {
    cap: usize,
    /// (position, queries of every layer: `n_layers * n_heads * head_dim`).
    rows: VecDeque<(usize, Vec<f32>)>,
}

impl QueryWindow {
    /// A window of at most `cap` rows (at least one).
    pub fn new(cap: usize) -> Self {
        Self { cap: cap.max(1), rows: VecDeque::with_capacity(cap.max(1)) }
    }

    /// Rows held at most.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds the queries `q` of `position` (positions must grow), dropping
    /// the oldest row when full (its buffer is reused).
    pub fn push(&mut self, position: usize, q: &[f32]) {
        let mut buf = if self.rows.len() == self.cap { self.rows.pop_front().map(|r| r.1).unwrap_or_default() } else { Vec::new() };
        buf.clear();
        buf.extend_from_slice(q);
        self.rows.push_back((position, buf));
    }

    /// Adds consecutive rows: `q` holds rows of `per_row` values (as
    /// `Workspace::q_out` keeps them), the first one of `position`.
    pub fn push_rows(&mut self, position: usize, q: &[f32], per_row: usize) {
        for (i, row) in q.chunks_exact(per_row.max(1)).enumerate() {
            self.push(position + i, row);
        }
    }

    /// The rows' queries of `layer`, row after row (`per_layer` values each,
    /// out of `n_layers * per_layer` per row).
    pub fn layer(&self, layer: usize, per_layer: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows.len() * per_layer);
        for (_, q) in &self.rows {
            out.extend_from_slice(&q[layer * per_layer..(layer + 1) * per_layer]);
        }
        out
    }

    /// How many positions each row lies before the newest one.
    pub fn lags(&self) -> Vec<usize> {
        let last = self.rows.back().map_or(0, |r| r.0);
        self.rows.iter().map(|r| last.saturating_sub(r.0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_rows_in_order() {
        let mut w = QueryWindow::new(2);
        assert!(w.is_empty());
        w.push(3, &[1.0, 2.0]);
        w.push(5, &[3.0, 4.0]);
        w.push(9, &[5.0, 6.0]);
        assert_eq!(w.lags(), vec![4, 0]);
        assert_eq!(w.layer(1, 1), vec![4.0, 6.0]);
        assert_eq!(w.layer(0, 1), vec![3.0, 5.0]);
        // Consecutive rows of a chunk: positions 10 and 11.
        w.push_rows(10, &[7.0, 8.0, 9.0, 10.0], 2);
        assert_eq!(w.lags(), vec![1, 0]);
        assert_eq!(w.layer(0, 1), vec![7.0, 9.0]);
    }
}

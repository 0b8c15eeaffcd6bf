//! Continuous batching: which sequences get rows in the next forward pass.
//!
//! Each step, in this order:
//! 1. every running sequence that is decoding gets one row;
//! 2. running sequences that are still prefilling get chunks of their prompt;
//! 3. waiting sequences are admitted (first come, first served) while the
//!    step's token budget, the running limit and the KV cache allow.
//!
//! The KV cache is grown for every planned row before the forward pass. When a
//! decoding sequence cannot grow, the youngest running sequence is preempted:
//! its cache is freed and it goes back to the front of the queue, to be
//! computed again from its tokens when there is room (vLLM's recompute
//! policy). A sequence that cannot fit even alone ends with `length`.

use std::collections::VecDeque;

use kernels::attention::KvElem;

use crate::kv::KvCache;
use crate::request::FinishReason;
use crate::sequence::Sequence;

/// Rows planned for one running sequence this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Planned {
    /// Index into `Scheduler::running`.
    pub idx: usize,
    /// Tokens fed this step: `tokens[n_cached..n_cached + rows]`.
    pub rows: usize,
}

/// Queue and running set.
#[derive(Debug)]
pub(crate) struct Scheduler {
    pub waiting: VecDeque<Sequence>,
    /// In admission order (oldest first).
    pub running: Vec<Sequence>,
    pub max_running: usize,
    pub max_batch_tokens: usize,
    next_admit: u64,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(max_running: usize, max_batch_tokens: usize) -> Self {
        Self { waiting: VecDeque::new(), running: Vec::new(), max_running, max_batch_tokens, next_admit: 0, preemptions: 0 }
    }

    /// Preemptions so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Plans the next step, growing the KV cache for every planned row.
    /// Sequences that can never fit are moved to `too_long`.
    #[cfg(test)]
    pub fn plan<E: KvElem>(&mut self, kv: &mut KvCache<E>, too_long: &mut Vec<(Sequence, FinishReason)>) -> Vec<Planned> {
        let mut plan = self.plan_decode(kv, too_long);
        let budget = self.max_batch_tokens - plan.len();
        plan.extend(self.plan_prefill(kv, budget, too_long));
        plan
    }

    /// Phase 1: one decode row per decoding sequence, oldest first,
    /// preempting the youngest when the cache is full.
    pub fn plan_decode<E: KvElem>(&mut self, kv: &mut KvCache<E>, too_long: &mut Vec<(Sequence, FinishReason)>) -> Vec<Planned> {
        let mut plan = Vec::new();
        let mut budget = self.max_batch_tokens;

        // 1. Decode rows, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            if self.running[i].pending() != 1 {
                i += 1;
                continue;
            }
            let id = self.running[i].kv.unwrap_or_else(unreachable_kv);
            loop {
                if kv.grow(id, 1).is_ok() {
                    plan.push(Planned { idx: i, rows: 1 });
                    budget -= 1;
                    i += 1;
                    break;
                }
                if self.running.len() > i + 1 {
                    self.preempt_youngest(kv);
                    continue;
                }
                // Youngest itself and still no room.
                if plan.is_empty() {
                    let seq = self.running.remove(i);
                    if let Some(id) = seq.kv {
                        kv.free_seq(id);
                    }
                    too_long.push((seq, FinishReason::Length));
                } else {
                    self.preempt_youngest(kv);
                }
                break;
            }
        }

        plan
    }

    /// Phase 2: prefill chunks of running sequences, then admission, within
    /// `budget` rows.
    pub fn plan_prefill<E: KvElem>(
        &mut self,
        kv: &mut KvCache<E>,
        mut budget: usize,
        too_long: &mut Vec<(Sequence, FinishReason)>,
    ) -> Vec<Planned> {
        let mut plan = Vec::new();
        // Prefill chunks of running sequences.
        for (i, seq) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if seq.pending() <= 1 {
                continue;
            }
            let rows = seq.pending().min(budget);
            if let Some(id) = seq.kv {
                if kv.grow(id, rows).is_ok() {
                    plan.push(Planned { idx: i, rows });
                    budget -= rows;
                }
            }
        }

        // Admission.
        while budget > 0 && self.running.len() < self.max_running {
            let Some(seq) = self.waiting.front() else { break };
            if kv.pages_for_tokens(seq.tokens.len() + 1) > kv.total_pages() {
                if let Some(seq) = self.waiting.pop_front() {
                    too_long.push((seq, FinishReason::Length));
                }
                continue;
            }
            let rows = seq.pending().min(budget);
            // Keep a page per head for each running sequence's next token.
            let reserve = self.running.len() * kv.layout().heads_per_seq();
            if kv.pages_for_tokens(rows) + reserve > kv.free_pages() {
                break;
            }
            let id = kv.alloc_seq();
            if kv.grow(id, rows).is_err() {
                kv.free_seq(id);
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.kv = Some(id);
            seq.admitted = self.next_admit;
            self.next_admit += 1;
            self.running.push(seq);
            plan.push(Planned { idx: self.running.len() - 1, rows });
            budget -= rows;
        }
        plan
    }

    /// Moves the youngest running sequence back to the front of the queue.
    fn preempt_youngest<E: KvElem>(&mut self, kv: &mut KvCache<E>) {
        if let Some(mut seq) = self.running.pop() {
            if let Some(id) = seq.kv {
                kv.free_seq(id);
            }
            seq.reset_cache();
            self.preemptions += 1;
            self.waiting.push_front(seq);
        }
    }
}

#[cold]
fn unreachable_kv() -> crate::kv::SeqKvId {
    // Running sequences always hold a cache; a missing one is an engine bug.
    panic!("running sequence without a KV cache")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use half::f16;

    use super::*;
    use crate::kv::{KvLayout, PAGE_SIZE};
    use crate::sampling::{Sampler, SamplingParams};
    use crate::sequence::SeqOptions;

    fn seq(prompt_len: usize) -> Sequence {
        let opts = Arc::new(SeqOptions {
            max_tokens: 100,
            stop_ids: vec![],
            stop: vec![],
            logprobs: None,
            skip_special: true,
            max_position: 10_000,
            speculation: None,
            tca: false,
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        Sequence::new(0, vec![1; prompt_len], Sampler::new(SamplingParams::greedy(), &[]), opts, 0, tx, Instant::now())
    }

    fn cache(pages: usize) -> KvCache<f16> {
        let l = KvLayout { n_layers: 1, n_kv_heads: 1, head_dim: 8 };
        KvCache::new(l, pages * l.page_elems() * 2).unwrap()
    }

    /// Feeds the plan: marks planned rows as computed and, for rows that end
    /// a sequence's pending tokens, appends a generated token.
    fn apply(s: &mut Scheduler, plan: &[Planned]) {
        for p in plan {
            let q = &mut s.running[p.idx];
            q.n_cached += p.rows;
            if q.pending() == 0 {
                q.tokens.push(7);
            }
        }
    }

    #[test]
    fn long_prompts_are_chunked_to_the_token_budget() {
        let mut s = Scheduler::new(8, 10);
        let mut kv = cache(100);
        s.waiting.push_back(seq(25));
        let mut done = Vec::new();
        let p = s.plan(&mut kv, &mut done);
        assert_eq!(p, vec![Planned { idx: 0, rows: 10 }]);
        apply(&mut s, &p);
        assert_eq!(s.plan(&mut kv, &mut done), vec![Planned { idx: 0, rows: 10 }]);
        apply(&mut s, &[Planned { idx: 0, rows: 10 }]);
        assert_eq!(s.plan(&mut kv, &mut done), vec![Planned { idx: 0, rows: 5 }]);
    }

    #[test]
    fn decode_rows_come_before_prefill_and_admission() {
        let mut s = Scheduler::new(8, 4);
        let mut kv = cache(100);
        s.waiting.push_back(seq(2));
        let mut done = Vec::new();
        let p = s.plan(&mut kv, &mut done);
        apply(&mut s, &p);
        s.waiting.push_back(seq(9));
        let p = s.plan(&mut kv, &mut done);
        assert_eq!(p, vec![Planned { idx: 0, rows: 1 }, Planned { idx: 1, rows: 3 }]);
    }

    #[test]
    fn a_full_cache_preempts_the_youngest_and_requeues_it_first() {
        let mut s = Scheduler::new(8, 64);
        // Two prompts of one full page each; their next token needs a
        // second page.
        let mut kv = cache(4);
        s.waiting.push_back(seq(PAGE_SIZE));
        s.waiting.push_back(seq(PAGE_SIZE));
        let mut done = Vec::new();
        let p = s.plan(&mut kv, &mut done);
        assert_eq!(p.len(), 2);
        apply(&mut s, &p); // each: one full page, one token pending
                           // Take the two free pages so that nothing can grow.
        let hog = kv.alloc_seq();
        kv.grow(hog, 2 * PAGE_SIZE).unwrap();
        let p = s.plan(&mut kv, &mut done);
        assert_eq!(p, vec![Planned { idx: 0, rows: 1 }]);
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].n_cached, 0);
        assert_eq!(s.preemptions(), 1);
    }

    #[test]
    fn a_prompt_larger_than_the_whole_cache_ends_with_length() {
        let mut s = Scheduler::new(8, 64);
        let mut kv = cache(2);
        s.waiting.push_back(seq(3 * PAGE_SIZE));
        let mut done = Vec::new();
        assert!(s.plan(&mut kv, &mut done).is_empty());
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].1, FinishReason::Length);
    }

    #[test]
    fn the_running_limit_holds_back_admission() {
        let mut s = Scheduler::new(2, 64);
        let mut kv = cache(100);
        for _ in 0..3 {
            s.waiting.push_back(seq(3));
        }
        let p = s.plan(&mut kv, &mut Vec::new());
        assert_eq!(p.len(), 2);
        assert_eq!(s.waiting.len(), 1);
    }
}

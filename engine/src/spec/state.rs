//! Per-sequence draft context and the speculator drafter.
//!
//! A committed draft position `p` is one whose target features are known:
//! the token after it (`x[p+1]`) and the target's hidden states of the three
//! feature layers at `p`. The head's keys and values for committed positions
//! are cached (tagged with the speculator version that computed them, and
//! recomputed after a swap); the last [`WINDOW`] positions are kept.
//!
//! Drafting k tokens: bring the cache up to date over newly committed
//! positions (one head call over all of them), take the first draft from the
//! last committed position's logits, then run the head one row at a time on
//! its own outputs for the rest. Those drafted rows are never cached: they
//! are recomputed with real target features once verified.

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::Rng;

use super::speculator::Speculator;
use super::{Draft, DraftContext, Drafter};
use crate::error::Result;
use crate::sampling::{process, Distribution};

/// Committed positions kept per sequence (the head's attention window).
pub const WINDOW: usize = 128;
/// Most positions computed at once when the head's cache is behind.
pub const CATCH_UP_MAX: usize = 32;

#[derive(Debug, Clone)]
struct Committed {
    pos: usize,
    next: u32,
    /// Target features `[3H]`: low, middle, high layer.
    features: Vec<f32>,
}

/// Draft context of one sequence.
#[derive(Debug, Clone, Default)]
pub struct SpecSeqState {
    entries: VecDeque<Committed>,
    /// Head keys/values of `entries[..kv.len()]`.
    kv: VecDeque<(Vec<f32>, Vec<f32>)>,
    kv_version: Option<u64>,
    /// Output hidden and logits of the head at the last cached entry.
    last_out: Option<(Vec<f32>, Vec<f32>)>,
    /// Per-drafter acceptance and exploration state of the policy.
    pub policy: super::policy::SeqPolicy,
}

impl SpecSeqState {
    /// Records that position `pos`, followed by token `next`, has target
    /// features `features` (`3H`: low, middle, high). Positions at or before
    /// the last committed one are ignored (recomputation after preemption).
    pub fn commit(&mut self, pos: usize, next: u32, features: &[f32]) {
        if self.entries.back().is_some_and(|e| e.pos >= pos) {
            return;
        }
        self.entries.push_back(Committed { pos, next, features: features.to_vec() });
        while self.entries.len() > WINDOW {
            self.entries.pop_front();
            if self.kv.pop_front().is_none() {
                // The cache did not cover the dropped entry: it no longer
                // lines up, recompute it from scratch next time.
                self.kv_version = None;
            }
        }
    }

    /// Committed positions held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is committed yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Last committed position.
    pub fn last_pos(&self) -> Option<usize> {
        self.entries.back().map(|e| e.pos)
    }

    fn stack(rows: &[Vec<f32>], width: usize, dev: &Device) -> candle_core::Result<Tensor> {
        let mut flat = Vec::with_capacity(rows.len() * width);
        for r in rows {
            flat.extend_from_slice(r);
        }
        Tensor::from_vec(flat, (rows.len(), width), dev)
    }

    /// Brings the head's cache up to date with `spec` and returns the last
    /// committed position's output hidden and logits.
    fn catch_up(&mut self, spec: &Speculator) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let dev = Device::Cpu;
        if self.kv_version != Some(spec.version()) {
            self.kv.clear();
            self.last_out = None;
            self.kv_version = Some(spec.version());
        }
        // After a long stretch without drafting, only the most recent
        // positions are brought into the head's context: the catch-up cost
        // stays bounded.
        if self.entries.len() - self.kv.len() > CATCH_UP_MAX {
            while self.entries.len() > CATCH_UP_MAX {
                self.entries.pop_front();
            }
            self.kv.clear();
            self.last_out = None;
        }
        let done = self.kv.len();
        if done == self.entries.len() {
            return Ok(self.last_out.clone());
        }
        let head = &spec.head;
        let cfg = head.config();
        let h = cfg.hidden_size;
        let new: Vec<&Committed> = self.entries.iter().skip(done).collect();
        let ids: Vec<u32> = new.iter().map(|e| e.next).collect();
        let emb = spec.embed.index_select(&Tensor::new(ids.as_slice(), &dev)?, 0)?;
        let feats = Self::stack(&new.iter().map(|e| e.features.clone()).collect::<Vec<_>>(), 3 * h, &dev)?;
        let hidden = head.fuse(&feats)?;
        let positions: Vec<usize> = new.iter().map(|e| e.pos).collect();
        let (cos, sin) = head.rope_tables(&positions, &dev)?;
        let kvw = cfg.kv_width();
        let past = if done > 0 {
            let (ks, vs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = self.kv.iter().cloned().unzip();
            Some((Self::stack(&ks, kvw, &dev)?, Self::stack(&vs, kvw, &dev)?))
        } else {
            None
        };
        let out = head.forward(&emb, &hidden, &cos, &sin, past.as_ref().map(|(k, v)| (k, v)))?;
        let k = out.k.to_vec2::<f32>()?;
        let v = out.v.to_vec2::<f32>()?;
        for (kr, vr) in k.into_iter().zip(v) {
            self.kv.push_back((kr, vr));
        }
        let t = new.len();
        let last_hidden = out.hidden.get(t - 1)?.to_vec1::<f32>()?;
        let last_logits = out.logits.get(t - 1)?.to_vec1::<f32>()?;
        self.last_out = Some((last_hidden, last_logits));
        Ok(self.last_out.clone())
    }
}

/// Drafts with the current speculator version.
pub struct SpeculatorDrafter {
    /// The version to draft with (swapped by the engine between steps).
    pub spec: Arc<Speculator>,
    idx: Vec<u32>,
    dist: Distribution,
}

impl SpeculatorDrafter {
    /// A drafter for `spec`.
    pub fn new(spec: Arc<Speculator>) -> Self {
        Self { spec, idx: Vec::new(), dist: Distribution::default() }
    }

    /// Picks a draft token from draft-vocabulary logits: the argmax when
    /// greedy, else a draw from the processed distribution (mapped to target
    /// ids). Returns the token and its distribution.
    fn choose(&mut self, logits: &[f32], ctx: &mut DraftContext<'_>) -> (u32, Distribution) {
        process(logits, ctx.sampling, &mut self.idx, &mut self.dist);
        let mut q = Distribution::default();
        for (&d, &p) in self.dist.tokens.iter().zip(&self.dist.probs) {
            q.tokens.push(self.spec.d2t(d));
            q.probs.push(p);
        }
        let tok = if ctx.sampling.is_greedy() { q.tokens[0] } else { q.draw(ctx.rng.random::<f32>()) };
        (tok, q)
    }
}

impl Drafter for SpeculatorDrafter {
    fn name(&self) -> &'static str {
        "speculator"
    }

    fn draft(&mut self, ctx: &mut DraftContext<'_>, k: usize, out: &mut Draft) -> Result<()> {
        out.clear();
        let spec = self.spec.clone();
        let Some((mut hidden, logits)) = ctx.state.catch_up(&spec)? else { return Ok(()) };
        let Some(last_pos) = ctx.state.last_pos() else { return Ok(()) };
        let (tok, q) = self.choose(&logits, ctx);
        out.tokens.push(tok);
        out.q.push(q);
        if k == 1 {
            return Ok(());
        }
        let dev = Device::Cpu;
        let head = &spec.head;
        let kvw = head.config().kv_width();
        let (mut ks, mut vs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = ctx.state.kv.iter().cloned().unzip();
        for i in 1..k {
            let prev = out.tokens[i - 1];
            let emb = spec.embed.index_select(&Tensor::new(&[prev], &dev)?, 0)?;
            let hid = Tensor::from_vec(hidden.clone(), (1, hidden.len()), &dev)?;
            let (cos, sin) = head.rope_tables(&[last_pos + i], &dev)?;
            let past = (SpecSeqState::stack(&ks, kvw, &dev)?, SpecSeqState::stack(&vs, kvw, &dev)?);
            let o = head.forward(&emb, &hid, &cos, &sin, Some((&past.0, &past.1)))?;
            ks.push(o.k.get(0)?.to_vec1::<f32>()?);
            vs.push(o.v.get(0)?.to_vec1::<f32>()?);
            hidden = o.hidden.get(0)?.to_vec1::<f32>()?;
            let logits = o.logits.get(0)?.to_vec1::<f32>()?;
            let (tok, q) = self.choose(&logits, ctx);
            out.tokens.push(tok);
            out.q.push(q);
        }
        Ok(())
    }
}

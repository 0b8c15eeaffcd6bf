//! The training objective and the offline acceptance estimate.
//!
//! For a window of `L` draft positions (`L + 1` committed positions of one
//! sequence) the head reads the token after each position and the target's
//! fused features there, and predicts the token two ahead; its target is the
//! target model's own distribution at the next position (the final hidden
//! state times the frozen LM head, restricted to the draft vocabulary). The
//! loss is the forward KL from target to draft, written as cross-entropy with
//! soft targets (the target's entropy is a constant). Training-time test
//! unrolls the head: at step `i` each position reads the head's own output
//! from the previous position (as when drafting the `i+1`-th token) instead
//! of the target's features; step `i` is weighted `decay^i`. Positions whose
//! target token is outside the draft vocabulary are masked. Discard samples
//! (contexts the draft proposed and the target rejected) add the same loss,
//! weighted `lambda_discard`.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};
use engine::spec::head::SpecHead;
use kernels::{MatmulScratch, QMatrix, ThreadPool};

use super::replay::{Discard, Position};

/// Objective settings.
#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    /// Unrolled steps of training-time test.
    pub ttt_steps: usize,
    /// Weight decay per unrolled step (`decay^i`).
    pub decay: f64,
    /// Weight of the discard term.
    pub lambda_discard: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { ttt_steps: 3, decay: 0.8, lambda_discard: 0.5 }
    }
}

/// The frozen target LM head restricted to the draft vocabulary, for target
/// distributions.
pub struct TargetHead {
    rows: QMatrix,
    pool: std::sync::Arc<ThreadPool>,
    /// Target id to draft id.
    pub t2d: HashMap<u32, u32>,
}

impl TargetHead {
    /// Restricts `lm_head` (`[vocab, H]`) to `draft_vocab`.
    pub fn new(lm_head: &QMatrix, draft_vocab: &[u32], pool: std::sync::Arc<ThreadPool>) -> Self {
        let t2d = draft_vocab.iter().enumerate().map(|(d, &t)| (t, d as u32)).collect();
        Self { rows: lm_head.select_rows(draft_vocab), pool, t2d }
    }

    /// Softmax over the draft vocabulary of each final hidden state
    /// (`n` rows of `H`), row-major `[n, V_draft]`.
    pub fn probs(&self, last: &[f32], n: usize) -> Vec<f32> {
        let v = self.rows.rows();
        let mut logits = vec![0f32; n * v];
        kernels::matmul(&self.pool, &self.rows, last, n, &mut logits, &mut MatmulScratch::default());
        for row in logits.chunks_exact_mut(v) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f32;
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            for x in row.iter_mut() {
                *x /= z;
            }
        }
        logits
    }
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let s = x.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    s.broadcast_sub(&lse)
}

/// Inputs of one window, ready for the head.
pub struct Window {
    emb: Tensor,
    feats: Tensor,
    cos: Tensor,
    sin: Tensor,
    targets: Tensor,
    /// 1.0 where the target token is in the draft vocabulary.
    mask: Vec<f32>,
    /// Draft id of the token two ahead (`None` outside the draft vocabulary).
    target_ids: Vec<Option<u32>>,
}

impl Window {
    /// Builds a window from `L + 1` consecutive positions.
    pub fn new(head: &SpecHead, embed: &Tensor, target: &TargetHead, ps: &[Position]) -> Result<Self> {
        let dev = Device::Cpu;
        let l = ps.len() - 1;
        let h = head.config().hidden_size;
        let ids: Vec<u32> = ps[..l].iter().map(|p| p.next).collect();
        let emb = embed.index_select(&Tensor::new(ids.as_slice(), &dev)?, 0)?;
        let mut f = Vec::with_capacity(l * 3 * h);
        for p in &ps[..l] {
            f.extend_from_slice(&p.features);
        }
        let feats = Tensor::from_vec(f, (l, 3 * h), &dev)?;
        let positions: Vec<usize> = ps[..l].iter().map(|p| p.pos).collect();
        let (cos, sin) = head.rope_tables(&positions, &dev)?;
        let mut last = Vec::with_capacity(l * h);
        for p in &ps[1..] {
            last.extend_from_slice(&p.last);
        }
        let v = head.config().draft_vocab_size;
        let targets = Tensor::from_vec(target.probs(&last, l), (l, v), &dev)?;
        let target_ids: Vec<Option<u32>> = ps[1..].iter().map(|p| target.t2d.get(&p.next).copied()).collect();
        let mask = target_ids.iter().map(|t| if t.is_some() { 1.0 } else { 0.0 }).collect();
        Ok(Self { emb, feats, cos, sin, targets, mask, target_ids })
    }

    /// Draft positions in the window.
    pub fn len(&self) -> usize {
        self.mask.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }

    /// Runs the unrolled head; returns the logits of each step.
    fn unroll(&self, head: &SpecHead, steps: usize) -> Result<Vec<Tensor>> {
        let l = self.len();
        let hidden0 = head.fuse(&self.feats)?;
        let mut hid = hidden0.clone();
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            let o = head.forward(&self.emb, &hid, &self.cos, &self.sin, None)?;
            out.push(o.logits);
            if i + 1 < steps && l > 1 {
                // Position p reads the head's output at p - 1.
                hid = Tensor::cat(&[hidden0.narrow(0, 0, 1)?, o.hidden.narrow(0, 0, l - 1)?], 0)?;
            }
        }
        Ok(out)
    }

    /// The weighted training-time-test loss (a scalar tensor) and the number
    /// of positions that counted.
    pub fn loss(&self, head: &SpecHead, cfg: &LossConfig) -> Result<(Tensor, usize)> {
        let l = self.len();
        let logits = self.unroll(head, cfg.ttt_steps)?;
        let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        let mut counted = 0;
        for (i, lg) in logits.iter().enumerate() {
            // Step i is meaningful from position i on.
            let m: Vec<f32> = (0..l).map(|p| if p >= i { self.mask[p] } else { 0.0 }).collect();
            let n: f32 = m.iter().sum();
            if n == 0.0 {
                continue;
            }
            counted += n as usize;
            let mask = Tensor::from_vec(m, l, &Device::Cpu)?;
            let ce = (self.targets.clone() * log_softmax(lg)?)?.sum(D::Minus1)?.neg()?;
            let step = ((ce * mask)?.sum_all()? / n as f64)?;
            total = (total + (step * cfg.decay.powi(i as i32))?)?;
        }
        Ok((total, counted))
    }

    /// Simulated acceptance of greedy chains of up to `steps` drafts starting
    /// at each position: `(sum of accepted tokens + 1 per chain, chains)`.
    pub fn simulate(&self, head: &SpecHead, steps: usize) -> Result<(f64, usize)> {
        let l = self.len();
        let logits = self.unroll(head, steps)?;
        let argmax: Vec<Vec<u32>> = logits.iter().map(|lg| lg.argmax(D::Minus1).and_then(|a| a.to_vec1::<u32>())).collect::<Result<_>>()?;
        let mut total = 0.0;
        let mut chains = 0;
        for c in 0..l {
            let mut len = 1.0;
            for (i, am) in argmax.iter().enumerate() {
                let p = c + i;
                if p >= l {
                    break;
                }
                match self.target_ids[p] {
                    Some(t) if am[p] == t => len += 1.0,
                    _ => break,
                }
            }
            total += len;
            chains += 1;
        }
        Ok((total, chains))
    }
}

/// The discard term over a batch of discard samples (each a one-position
/// pass): mean cross-entropy to the target's distribution at the rejected
/// position.
pub fn discard_loss(head: &SpecHead, embed: &Tensor, target: &TargetHead, ds: &[&Discard]) -> Result<Option<Tensor>> {
    let dev = Device::Cpu;
    let h = head.config().hidden_size;
    let v = head.config().draft_vocab_size;
    let mut total: Option<Tensor> = None;
    let mut n = 0;
    for d in ds {
        let emb = embed.index_select(&Tensor::new(&[d.token], &dev)?, 0)?;
        let feats = Tensor::from_vec(d.features_prev.clone(), (1, 3 * h), &dev)?;
        let hid = head.fuse(&feats)?;
        let (cos, sin) = head.rope_tables(&[d.pos_prev + 1], &dev)?;
        let o = head.forward(&emb, &hid, &cos, &sin, None)?;
        let t = Tensor::from_vec(target.probs(&d.last, 1), (1, v), &dev)?;
        let ce = (t * log_softmax(&o.logits)?)?.sum_all()?.neg()?;
        total = Some(match total {
            Some(x) => (x + ce)?,
            None => ce,
        });
        n += 1;
    }
    match total {
        Some(t) => Ok(Some((t / n as f64)?)),
        None => Ok(None),
    }
}

//! The EAGLE-3-style speculator head, written once over candle tensors: the
//! engine runs it from frozen weights, the trainer trains this very code
//! through a `candle_nn::VarMap`.
//!
//! For draft position `p` the head reads the embedding of the token after
//! `p` and a hidden input: at a committed position, the target's features at
//! `p` (three layers, low/middle/high, fused by `fc` to the model width); at
//! a drafted position, its own previous output. One Llama decoder layer
//! (queries, keys and values projected from both inputs, as in EAGLE-3)
//! attends over the sequence's earlier draft positions; RMSNorm and an LM
//! head over the draft vocabulary give logits for the token two after `p`.
//!
//! Only ops with backward passes are used (RMSNorm, softmax and RoPE are
//! written out), so gradients reach every weight. A head the engine serves is
//! [`frozen`](SpecHead::frozen): the same forward, with its projections run
//! by ouro's quantized matmul kernel (Q8_0) as a candle custom op instead of
//! candle's f32 matmul, which is several times slower for one row.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};
use kernels::{Format, MatmulScratch, QMatrix, ThreadPool};
use serde::{Deserialize, Serialize};

/// Shape of a speculator head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Width of the target's residual stream (and of the head).
    pub hidden_size: usize,
    /// Width of the head's feed-forward layer.
    pub intermediate_size: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Target layers whose outputs feed the head (low, middle, high).
    pub feature_layers: [usize; 3],
    /// Size of the draft vocabulary.
    pub draft_vocab_size: usize,
}

impl HeadConfig {
    /// Width of the key/value projections.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// A projection: trainable (candle) or frozen (ouro's kernel).
#[derive(Debug, Clone)]
enum Proj {
    Train(Linear),
    Frozen(Arc<FrozenLinear>),
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Train(l) => l.forward(x),
            Proj::Frozen(f) => x.contiguous()?.apply_op1_no_bwd(f.as_ref()),
        }
    }
    fn weight(&self) -> &Tensor {
        match self {
            Proj::Train(l) => l.weight(),
            Proj::Frozen(f) => &f.weight,
        }
    }
    fn freeze(&self, pool: &Arc<ThreadPool>) -> Result<Proj> {
        let w = self.weight();
        let (out, inp) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let format = if inp % 32 == 0 { Format::Q8_0 } else { Format::F32 };
        let q = QMatrix::quantize(format, out, inp, &values).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Proj::Frozen(Arc::new(FrozenLinear { q, weight: w.clone(), pool: pool.clone(), scratch: Mutex::new(MatmulScratch::default()) })))
    }
}

/// `x @ w^T` by ouro's matmul kernel, as a candle op (forward only).
#[derive(Debug)]
struct FrozenLinear {
    q: QMatrix,
    /// The original weights (saving a frozen head writes these).
    weight: Tensor,
    pool: Arc<ThreadPool>,
    scratch: Mutex<MatmulScratch>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "ouro-frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("frozen linear expects f32 input") };
        let (t, k) = layout.shape().dims2()?;
        if k != self.q.cols() {
            candle_core::bail!("frozen linear: input width {k}, weight width {}", self.q.cols());
        }
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("frozen linear expects a contiguous input") };
        let x = &data[start..end];
        let n = self.q.rows();
        let mut out = vec![0f32; t * n];
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        kernels::matmul(&self.pool, &self.q, x, t, &mut out, &mut scratch);
        Ok((CpuStorage::F32(out), Shape::from((t, n))))
    }
}

/// The head's weights.
#[derive(Debug, Clone)]
pub struct SpecHead {
    cfg: HeadConfig,
    fc: Proj,
    norm_emb: Tensor,
    norm_hidden: Tensor,
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    post_norm: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
    norm: Tensor,
    lm_head: Proj,
}

/// What one call of the head produces.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// Output hidden state per row `[T, H]` (the hidden input of the next
    /// drafted position).
    pub hidden: Tensor,
    /// Logits over the draft vocabulary `[T, V_draft]`.
    pub logits: Tensor,
    /// Keys of the rows `[T, kv_width]` (after RoPE), to cache.
    pub k: Tensor,
    /// Values of the rows `[T, kv_width]`, to cache.
    pub v: Tensor,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotate-half RoPE on `x` `[T, heads, d]` with `cos`/`sin` `[T, 1, d/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

impl SpecHead {
    /// Builds the head from `vb` (a `VarMap` to train, saved tensors to serve).
    pub fn load(vb: VarBuilder, cfg: &HeadConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q_w = cfg.n_heads * cfg.head_dim;
        let kv_w = cfg.kv_width();
        let ones = candle_nn::Init::Const(1.0);
        let lin = |i, o, name: &str| linear_no_bias(i, o, vb.pp(name)).map(Proj::Train);
        Ok(Self {
            fc: lin(3 * h, h, "fc")?,
            norm_emb: vb.get_with_hints(h, "norm_emb.weight", ones)?,
            norm_hidden: vb.get_with_hints(h, "norm_hidden.weight", ones)?,
            q_proj: lin(2 * h, q_w, "layer.q_proj")?,
            k_proj: lin(2 * h, kv_w, "layer.k_proj")?,
            v_proj: lin(2 * h, kv_w, "layer.v_proj")?,
            o_proj: lin(q_w, h, "layer.o_proj")?,
            post_norm: vb.get_with_hints(h, "layer.post_norm.weight", ones)?,
            gate: lin(h, i, "layer.gate_proj")?,
            up: lin(h, i, "layer.up_proj")?,
            down: lin(i, h, "layer.down_proj")?,
            norm: vb.get_with_hints(h, "norm.weight", ones)?,
            lm_head: lin(h, cfg.draft_vocab_size, "lm_head")?,
            cfg: cfg.clone(),
        })
    }

    /// A copy for serving: the same forward, with every projection
    /// quantized to Q8_0 and run by ouro's kernel on `pool` (no gradients).
    pub fn frozen(&self, pool: &Arc<ThreadPool>) -> Result<Self> {
        let f = |p: &Proj| p.freeze(pool);
        Ok(Self {
            fc: f(&self.fc)?,
            q_proj: f(&self.q_proj)?,
            k_proj: f(&self.k_proj)?,
            v_proj: f(&self.v_proj)?,
            o_proj: f(&self.o_proj)?,
            gate: f(&self.gate)?,
            up: f(&self.up)?,
            down: f(&self.down)?,
            lm_head: f(&self.lm_head)?,
            ..self.clone()
        })
    }

    /// The head's configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// Fuses the target's three feature layers `[T, 3H]` into one hidden
    /// input `[T, H]`.
    pub fn fuse(&self, features: &Tensor) -> Result<Tensor> {
        self.fc.forward(features)
    }

    /// Cosines and sines for `positions`, shaped `[T, 1, d/2]`.
    pub fn rope_tables(&self, positions: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for i in 0..half {
                let f = 1.0 / self.cfg.rope_theta.powf(2.0 * i as f64 / self.cfg.head_dim as f64);
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((Tensor::from_vec(cos, shape, dev)?, Tensor::from_vec(sin, shape, dev)?))
    }

    /// One pass over `T` consecutive draft positions.
    ///
    /// `emb` `[T, H]`: embeddings of the token after each position; `hidden`
    /// `[T, H]`: fused target features or previous head outputs; `cos`/`sin`
    /// from [`rope_tables`](Self::rope_tables); `past`: cached keys and values
    /// `[P, kv_width]` of earlier positions (all visible). Row `t` sees the
    /// past and the new rows `0..=t`.
    pub fn forward(
        &self,
        emb: &Tensor,
        hidden: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
    ) -> Result<HeadOutput> {
        let c = &self.cfg;
        let (t, _) = emb.dims2()?;
        let (nq, nkv, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let x = Tensor::cat(&[rms_norm(emb, &self.norm_emb, c.rms_eps)?, rms_norm(hidden, &self.norm_hidden, c.rms_eps)?], D::Minus1)?;
        let q = rope(&self.q_proj.forward(&x)?.reshape((t, nq, d))?, cos, sin)?;
        let k_new = rope(&self.k_proj.forward(&x)?.reshape((t, nkv, d))?, cos, sin)?.reshape((t, nkv * d))?;
        let v_new = self.v_proj.forward(&x)?;
        let (k_all, v_all, p) = match past {
            Some((pk, pv)) if pk.dim(0)? > 0 => (Tensor::cat(&[pk, &k_new], 0)?, Tensor::cat(&[pv, &v_new], 0)?, pk.dim(0)?),
            _ => (k_new.clone(), v_new.clone(), 0),
        };
        let s = p + t;
        let group = nq / nkv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            x.reshape((s, nkv, 1, d))?.broadcast_as((s, nkv, group, d))?.reshape((s, nq, d))?.transpose(0, 1)?.contiguous()
        };
        let (k_h, v_h) = (expand(&k_all)?, expand(&v_all)?);
        let q_h = q.transpose(0, 1)?.contiguous()?; // [nq, T, d]
        let scores = (q_h.matmul(&k_h.t()?)? * (1.0 / (d as f64).sqrt()))?; // [nq, T, S]
        let mask: Vec<f32> = (0..t).flat_map(|r| (0..s).map(move |j| if j <= p + r { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, s), emb.device())?;
        let probs = softmax_last(&scores.broadcast_add(&mask)?)?;
        let attn = probs.matmul(&v_h)?.transpose(0, 1)?.reshape((t, nq * d))?;
        let h = (hidden + self.o_proj.forward(&attn)?)?;
        let m = rms_norm(&h, &self.post_norm, c.rms_eps)?;
        let gate = self.gate.forward(&m)?;
        // SiLU written out: x / (1 + exp(-x)).
        let act = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
        let h_out = (&h + self.down.forward(&(act * self.up.forward(&m)?)?)?)?;
        let logits = self.lm_head.forward(&rms_norm(&h_out, &self.norm, c.rms_eps)?)?;
        Ok(HeadOutput { hidden: h_out, logits, k: k_new, v: v_new })
    }

    /// The tensors of the head by their saved names.
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("fc.weight", self.fc.weight().detach()),
            ("norm_emb.weight", self.norm_emb.detach()),
            ("norm_hidden.weight", self.norm_hidden.detach()),
            ("layer.q_proj.weight", self.q_proj.weight().detach()),
            ("layer.k_proj.weight", self.k_proj.weight().detach()),
            ("layer.v_proj.weight", self.v_proj.weight().detach()),
            ("layer.o_proj.weight", self.o_proj.weight().detach()),
            ("layer.post_norm.weight", self.post_norm.detach()),
            ("layer.gate_proj.weight", self.gate.weight().detach()),
            ("layer.up_proj.weight", self.up.weight().detach()),
            ("layer.down_proj.weight", self.down.weight().detach()),
            ("norm.weight", self.norm.detach()),
            ("lm_head.weight", self.lm_head.weight().detach()),
        ]
    }
}

/// The dtype the head computes in.
pub const HEAD_DTYPE: DType = DType::F32;

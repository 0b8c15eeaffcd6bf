//! The Llama-family transformer (llama, qwen2, qwen3): weights and the
//! batched forward pass.
//!
//! [`Model`] holds immutable weights; the KV cache comes in as `&mut` and the
//! scratch buffers as a [`Workspace`], so one model serves any number of
//! sequences. One [`Model::forward`] call takes a flattened [`Batch`] of rows
//! from many sequences (each row: token and position; rows of one sequence
//! are consecutive and in position order) and returns logits for the rows
//! asked for and, on request, hidden states of chosen layers.

mod forward;
mod rope;

use kernels::{Format, QMatrix};

pub use forward::{Batch, BatchSeq, Capture, ForwardOutput, Profile, Workspace};
pub use rope::Rope;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::weights::{Requant, TensorName as T, TensorSource};

/// One decoder layer's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    /// Q, K and V projections stacked: rows `[0, nq*d)` are Q, then K, then V.
    pub qkv: QMatrix,
    /// Biases of the stacked Q, K, V rows (Qwen2).
    pub qkv_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of Q and K (Qwen3), `head_dim` each.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: QMatrix,
    pub ffn_norm: Vec<f32>,
    /// Gate and up projections stacked: rows `[0, ffn)` gate, `[ffn, 2 ffn)` up.
    pub gate_up: QMatrix,
    pub down: QMatrix,
}

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed: QMatrix,
    /// `None` when tied to the embedding table.
    lm_head: Option<QMatrix>,
    norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    rope: Rope,
}

/// Loading progress: `(steps done, steps in all)`.
pub type Progress<'a> = &'a dyn Fn(usize, usize);

impl Model {
    /// Loads every tensor `cfg` needs from `src`, converting matrices as
    /// `requant` asks. `progress` is called after each layer.
    pub fn load(cfg: ModelConfig, src: &dyn TensorSource, requant: Requant, progress: Progress<'_>) -> Result<Self> {
        cfg.validate(src.path())?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_rows, kv_rows) = (cfg.n_heads * d, cfg.n_kv_heads * d);
        let total = cfg.n_layers + 2;
        let embed = src.matrix(T::Embed, cfg.vocab_size, h, requant)?;
        progress(1, total);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let q = src.matrix(T::Q(l), q_rows, h, requant)?;
            let k = src.matrix(T::K(l), kv_rows, h, requant)?;
            let v = src.matrix(T::V(l), kv_rows, h, requant)?;
            let qkv = stack(&[&q, &k, &v], src, T::Q(l))?;
            let qkv_bias = if cfg.arch.qkv_bias() {
                let mut b = src.vector(T::QBias(l), q_rows)?;
                b.extend(src.vector(T::KBias(l), kv_rows)?);
                b.extend(src.vector(T::VBias(l), kv_rows)?);
                Some(b)
            } else {
                None
            };
            let (q_norm, k_norm) =
                if cfg.arch.qk_norm() { (Some(src.vector(T::QNorm(l), d)?), Some(src.vector(T::KNorm(l), d)?)) } else { (None, None) };
            let gate = src.matrix(T::Gate(l), cfg.intermediate_size, h, requant)?;
            let up = src.matrix(T::Up(l), cfg.intermediate_size, h, requant)?;
            layers.push(Layer {
                attn_norm: src.vector(T::AttnNorm(l), h)?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o: src.matrix(T::O(l), h, q_rows, requant)?,
                ffn_norm: src.vector(T::FfnNorm(l), h)?,
                gate_up: stack(&[&gate, &up], src, T::Gate(l))?,
                down: src.matrix(T::Down(l), h, cfg.intermediate_size, requant)?,
            });
            progress(l + 2, total);
        }
        let norm = src.vector(T::OutputNorm, h)?;
        let lm_head =
            if src.contains(T::Output) && !cfg.tie_embeddings { Some(src.matrix(T::Output, cfg.vocab_size, h, requant)?) } else { None };
        let freq_factors = if src.contains(T::RopeFreqs) { Some(src.vector(T::RopeFreqs, d / 2)?) } else { None };
        let rope = Rope::new(&cfg, freq_factors.as_deref());
        progress(total, total);
        Ok(Self { cfg, embed, lm_head, norm, layers, rope })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The LM head (the embedding table when tied).
    pub fn lm_head(&self) -> &QMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The token embedding table.
    pub fn embedding(&self) -> &QMatrix {
        &self.embed
    }

    /// The final RMSNorm weight.
    pub fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// Bytes of weights read by one forward row (all matrices and norms).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        layers + self.lm_head().bytes()
    }

    /// Formats of the layer matrices and of the LM head, e.g. `q4_1 (lm_head q8_0)`.
    pub fn weight_formats(&self) -> String {
        let mut fs: Vec<Format> = Vec::new();
        for l in &self.layers {
            for m in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                if !fs.contains(&m.format()) {
                    fs.push(m.format());
                }
            }
        }
        let names: Vec<&str> = fs.iter().map(|f| f.name()).collect();
        format!("{} (lm_head {})", names.join("+"), self.lm_head().format().name())
    }

    /// A stable fingerprint of the checkpoint: SHA-256 (first 16 hex chars)
    /// over the shape and the RMSNorm weights of every layer. Norm weights are
    /// learned, distinctive, and kept in `f32` whatever `--requant` says, so
    /// the same checkpoint gives the same fingerprint as GGUF or Hugging Face
    /// folder and at any weight format. Speculators and TCA budgets record it
    /// and are refused for another model.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let c = &self.cfg;
        let mut h = Sha256::new();
        h.update(format!(
            "{:?}|{}|{}|{}|{}|{}|{}|{}",
            c.arch, c.vocab_size, c.hidden_size, c.intermediate_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim
        ));
        let norms = self.layers.iter().flat_map(|l| [&l.attn_norm, &l.ffn_norm]).chain(std::iter::once(&self.norm));
        for v in norms.flatten() {
            h.update(((v * 1000.0).round() as i32).to_le_bytes());
        }
        h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

fn stack(parts: &[&QMatrix], src: &dyn TensorSource, first: T) -> Result<QMatrix> {
    QMatrix::stack(parts).ok_or_else(|| {
        EngineError::model(
            src.path(),
            format!("`{}` and the projections stacked with it have different formats; use --requant q8_0", src.name_of(first)),
        )
    })
}

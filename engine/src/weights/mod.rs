//! Reading model weights from GGUF files and Hugging Face folders.
//!
//! Both sources implement [`TensorSource`], which hands out matrices as
//! [`QMatrix`] (rows = output features) and vectors as `f32`, converting to
//! the format the operator asked for ([`Requant`]). The model code names
//! tensors with [`TensorName`], and each source maps those to its own
//! checkpoint names, so a missing tensor is reported with the name the file
//! would use.

mod gguf;
mod hf;

use std::path::Path;

use kernels::{Format, QMatrix};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

pub use gguf::GgufSource;
pub use hf::HfSource;

/// Weight format chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requant {
    /// Keep the checkpoint's format where ouro's kernels run it (Q8_0, Q4_0,
    /// Q4_1, F32, F16); other block formats are converted to Q8_0, BF16 to F32.
    None,
    /// Re-quantize every matrix to Q8_0 (close to lossless from Q4_1).
    Q8_0,
    /// Re-quantize every matrix to Q4_0 (smallest, visibly lossy).
    Q4_0,
}

impl Requant {
    /// Parses `none`, `q8_0` or `q4_0`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Some(Requant::None),
            "q8_0" => Some(Requant::Q8_0),
            "q4_0" => Some(Requant::Q4_0),
            _ => None,
        }
    }

    /// The format a matrix stored as `src` ends up in.
    pub fn target(self, src: Format) -> Format {
        match self {
            Requant::None => src,
            Requant::Q8_0 => Format::Q8_0,
            Requant::Q4_0 => Format::Q4_0,
        }
    }

    /// Name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Requant::None => "none",
            Requant::Q8_0 => "q8_0",
            Requant::Q4_0 => "q4_0",
        }
    }
}

/// A tensor of the model, named independently of the checkpoint format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorName {
    /// Token embedding table `[vocab, hidden]`.
    Embed,
    /// Final RMSNorm weight.
    OutputNorm,
    /// LM head `[vocab, hidden]` (absent when tied).
    Output,
    /// Llama 3 RoPE frequency factors (GGUF only).
    RopeFreqs,
    /// Attention RMSNorm of a layer.
    AttnNorm(usize),
    /// Query projection.
    Q(usize),
    /// Key projection.
    K(usize),
    /// Value projection.
    V(usize),
    /// Attention output projection.
    O(usize),
    /// Query bias (Qwen2).
    QBias(usize),
    /// Key bias (Qwen2).
    KBias(usize),
    /// Value bias (Qwen2).
    VBias(usize),
    /// Per-head query RMSNorm (Qwen3).
    QNorm(usize),
    /// Per-head key RMSNorm (Qwen3).
    KNorm(usize),
    /// Feed-forward RMSNorm.
    FfnNorm(usize),
    /// SwiGLU gate projection.
    Gate(usize),
    /// SwiGLU up projection.
    Up(usize),
    /// Feed-forward down projection.
    Down(usize),
}

/// A checkpoint that hands out tensors by [`TensorName`].
pub trait TensorSource {
    /// The file or folder, for messages.
    fn path(&self) -> &Path;
    /// The checkpoint's own name for a tensor.
    fn name_of(&self, t: TensorName) -> String;
    /// Shape as `[rows, cols]` (or `[len]`), if the tensor exists.
    fn shape(&self, t: TensorName) -> Option<Vec<usize>>;
    /// The format the tensor is stored in, if ouro's kernels run it as is.
    fn native_format(&self, t: TensorName) -> Option<Format>;
    /// Raw bytes of a tensor stored in a native format.
    fn native_bytes(&self, t: TensorName) -> Result<Vec<u8>>;
    /// The tensor decoded to `f32`, row-major.
    fn to_f32(&self, t: TensorName) -> Result<Vec<f32>>;
    /// Format for matrices stored in a non-native format when no
    /// re-quantization is asked for.
    fn fallback_format(&self) -> Format;

    /// Whether the tensor exists.
    fn contains(&self, t: TensorName) -> bool {
        self.shape(t).is_some()
    }

    /// A matrix `[rows, cols]` in the format `requant` asks for.
    fn matrix(&self, t: TensorName, rows: usize, cols: usize, requant: Requant) -> Result<QMatrix> {
        let shape = self.shape(t).ok_or_else(|| self.missing(t))?;
        if shape != [rows, cols] {
            return Err(EngineError::TensorShape { name: self.name_of(t), got: shape, expected: vec![rows, cols] });
        }
        let wrap = |e: kernels::MatrixError| EngineError::model(self.path(), format!("{}: {e}", self.name_of(t)));
        let native = self.native_format(t);
        let target = match (native, requant) {
            (Some(f), r) => r.target(f),
            (None, Requant::None) => self.fallback_format(),
            (None, r) => r.target(Format::F32),
        };
        let target = if target.is_blocked() && !cols.is_multiple_of(32) { Format::F32 } else { target };
        if native == Some(target) {
            QMatrix::new(target, rows, cols, self.native_bytes(t)?).map_err(wrap)
        } else {
            QMatrix::quantize(target, rows, cols, &self.to_f32(t)?).map_err(wrap)
        }
    }

    /// A vector of `len` values as `f32`.
    fn vector(&self, t: TensorName, len: usize) -> Result<Vec<f32>> {
        let shape = self.shape(t).ok_or_else(|| self.missing(t))?;
        if shape.iter().product::<usize>() != len {
            return Err(EngineError::TensorShape { name: self.name_of(t), got: shape, expected: vec![len] });
        }
        self.to_f32(t)
    }

    /// The error for a tensor the model needs and the checkpoint lacks.
    fn missing(&self, t: TensorName) -> EngineError {
        EngineError::MissingTensor { path: self.path().to_path_buf(), name: self.name_of(t) }
    }
}

/// Converts little-endian bf16 bytes to `f32`.
pub(crate) fn bf16_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
}

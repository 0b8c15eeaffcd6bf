//! GGUF files: metadata and tensors, memory-mapped.
//!
//! Tensors in Q8_0, Q4_0, Q4_1, F32 and F16 are handed to the kernels byte for
//! byte; other GGML types are decoded with candle's dequantizers.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use kernels::Format;
use memmap2::Mmap;

use super::{bf16_bytes_to_f32, TensorName, TensorSource};
use crate::error::{EngineError, Result};

/// An open GGUF file.
pub struct GgufSource {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource").field("path", &self.path).finish()
    }
}

impl GgufSource {
    /// Opens and maps `path`, reading the header and tensor directory.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| EngineError::model(path, format!("not a readable GGUF file: {e}")))?;
        // SAFETY: the file is opened read-only; ouro never writes model files
        // while serving, and a concurrent external write is a user error that
        // at worst corrupts weights, not memory safety of our own data.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), mmap, content })
    }

    /// The file's key/value metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn info(&self, t: TensorName) -> Option<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content.tensor_infos.get(&self.name_of(t))
    }

    fn bytes(&self, t: TensorName) -> Result<&[u8]> {
        let info = self.info(t).ok_or_else(|| self.missing(t))?;
        let n = info.shape.elem_count();
        let size = n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        self.mmap.get(start..start + size).ok_or_else(|| {
            EngineError::model(&self.path, format!("tensor `{}` runs past the end of the file (truncated download?)", self.name_of(t)))
        })
    }
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn name_of(&self, t: TensorName) -> String {
        use TensorName::*;
        match t {
            Embed => "token_embd.weight".into(),
            OutputNorm => "output_norm.weight".into(),
            Output => "output.weight".into(),
            RopeFreqs => "rope_freqs.weight".into(),
            AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Q(l) => format!("blk.{l}.attn_q.weight"),
            K(l) => format!("blk.{l}.attn_k.weight"),
            V(l) => format!("blk.{l}.attn_v.weight"),
            O(l) => format!("blk.{l}.attn_output.weight"),
            QBias(l) => format!("blk.{l}.attn_q.bias"),
            KBias(l) => format!("blk.{l}.attn_k.bias"),
            VBias(l) => format!("blk.{l}.attn_v.bias"),
            QNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
            KNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
            FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Up(l) => format!("blk.{l}.ffn_up.weight"),
            Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }

    fn shape(&self, t: TensorName) -> Option<Vec<usize>> {
        self.info(t).map(|i| i.shape.dims().to_vec())
    }

    fn native_format(&self, t: TensorName) -> Option<Format> {
        match self.info(t)?.ggml_dtype {
            GgmlDType::F32 => Some(Format::F32),
            GgmlDType::F16 => Some(Format::F16),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            _ => None,
        }
    }

    fn fallback_format(&self) -> Format {
        Format::Q8_0
    }

    fn native_bytes(&self, t: TensorName) -> Result<Vec<u8>> {
        Ok(self.bytes(t)?.to_vec())
    }

    fn to_f32(&self, t: TensorName) -> Result<Vec<f32>> {
        let info = self.info(t).ok_or_else(|| self.missing(t))?;
        let bytes = self.bytes(t)?;
        if let Some(f) = self.native_format(t) {
            let dims = info.shape.dims();
            let cols = *dims.last().unwrap_or(&1);
            let mut out = vec![0f32; info.shape.elem_count()];
            let row_bytes = f.row_bytes(cols);
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                kernels::quant::dequantize_row(f, &bytes[r * row_bytes..(r + 1) * row_bytes], o);
            }
            return Ok(out);
        }
        if info.ggml_dtype == GgmlDType::BF16 {
            return Ok(bf16_bytes_to_f32(bytes));
        }
        // Other block types: let candle decode them.
        let mut file = File::open(&self.path).map_err(|e| EngineError::io(&self.path, e))?;
        let q = info.read(&mut file, self.content.tensor_data_offset, &candle_core::Device::Cpu)?;
        Ok(q.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

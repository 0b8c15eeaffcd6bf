//! Hugging Face folders: `config.json` plus one or more `*.safetensors`
//! files (F32, F16 or BF16), memory-mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use kernels::Format;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{bf16_bytes_to_f32, TensorName, TensorSource};
use crate::error::{EngineError, Result};

/// An open Hugging Face model folder.
pub struct HfSource {
    dir: PathBuf,
    files: Vec<Mmap>,
    /// Tensor name to (file index, dtype, shape).
    index: HashMap<String, (usize, Dtype, Vec<usize>)>,
}

impl std::fmt::Debug for HfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfSource").field("dir", &self.dir).field("tensors", &self.index.len()).finish()
    }
}

impl HfSource {
    /// Maps every `*.safetensors` file of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(EngineError::model(dir, "no *.safetensors files in the folder"));
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = File::open(p).map_err(|e| EngineError::io(p, e))?;
            // SAFETY: read-only mapping of a model file (see GgufSource::open).
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| EngineError::io(p, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| EngineError::model(p, format!("not a readable safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                index.insert(name, (i, view.dtype(), view.shape().to_vec()));
            }
            files.push(mmap);
        }
        Ok(Self { dir: dir.to_path_buf(), files, index })
    }

    fn raw(&self, t: TensorName) -> Result<(Dtype, Vec<u8>)> {
        let name = self.name_of(t);
        let (i, dtype, _) = self.index.get(&name).ok_or_else(|| self.missing(t))?;
        let st = SafeTensors::deserialize(&self.files[*i]).map_err(|e| EngineError::model(&self.dir, e.to_string()))?;
        let view = st.tensor(&name).map_err(|e| EngineError::model(&self.dir, e.to_string()))?;
        Ok((*dtype, view.data().to_vec()))
    }
}

impl TensorSource for HfSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn name_of(&self, t: TensorName) -> String {
        use TensorName::*;
        let l = |l: usize, s: &str| format!("model.layers.{l}.{s}");
        match t {
            Embed => "model.embed_tokens.weight".into(),
            OutputNorm => "model.norm.weight".into(),
            Output => "lm_head.weight".into(),
            RopeFreqs => "rope_freqs".into(),
            AttnNorm(i) => l(i, "input_layernorm.weight"),
            Q(i) => l(i, "self_attn.q_proj.weight"),
            K(i) => l(i, "self_attn.k_proj.weight"),
            V(i) => l(i, "self_attn.v_proj.weight"),
            O(i) => l(i, "self_attn.o_proj.weight"),
            QBias(i) => l(i, "self_attn.q_proj.bias"),
            KBias(i) => l(i, "self_attn.k_proj.bias"),
            VBias(i) => l(i, "self_attn.v_proj.bias"),
            QNorm(i) => l(i, "self_attn.q_norm.weight"),
            KNorm(i) => l(i, "self_attn.k_norm.weight"),
            FfnNorm(i) => l(i, "post_attention_layernorm.weight"),
            Gate(i) => l(i, "mlp.gate_proj.weight"),
            Up(i) => l(i, "mlp.up_proj.weight"),
            Down(i) => l(i, "mlp.down_proj.weight"),
        }
    }

    fn shape(&self, t: TensorName) -> Option<Vec<usize>> {
        self.index.get(&self.name_of(t)).map(|(_, _, s)| s.clone())
    }

    fn native_format(&self, t: TensorName) -> Option<Format> {
        match self.index.get(&self.name_of(t))?.1 {
            Dtype::F32 => Some(Format::F32),
            Dtype::F16 => Some(Format::F16),
            _ => None,
        }
    }

    fn fallback_format(&self) -> Format {
        Format::F32
    }

    fn native_bytes(&self, t: TensorName) -> Result<Vec<u8>> {
        Ok(self.raw(t)?.1)
    }

    fn to_f32(&self, t: TensorName) -> Result<Vec<f32>> {
        let (dtype, bytes) = self.raw(t)?;
        match dtype {
            Dtype::F32 => Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::F16 => Ok(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            Dtype::BF16 => Ok(bf16_bytes_to_f32(&bytes)),
            other => {
                Err(EngineError::model(&self.dir, format!("tensor `{}` has dtype {other:?}; supported: F32, F16, BF16", self.name_of(t))))
            }
        }
    }
}

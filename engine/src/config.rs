//! The resolved model configuration, read from GGUF metadata or a Hugging
//! Face `config.json`.
//!
//! [`ModelConfig`] has no optional fields: defaults are applied while reading,
//! so the model code never guesses.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use kernels::ops::RopeStyle;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Model families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 1/2/3, SmolLM, TinyLlama: no biases, no Q/K norm.
    Llama,
    /// Qwen2/Qwen2.5: biases on the Q, K and V projections.
    Qwen2,
    /// Qwen3: per-head RMSNorm on Q and K, no biases.
    Qwen3,
}

impl Arch {
    fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "mistral" | "mistralforcausallm" => Ok(Arch::Llama),
            "qwen2" | "qwen2forcausallm" => Ok(Arch::Qwen2),
            "qwen3" | "qwen3forcausallm" => Ok(Arch::Qwen3),
            _ => Err(EngineError::UnsupportedArch { arch: name.to_string() }),
        }
    }
    /// Whether Q, K and V projections carry biases.
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }
    /// Whether Q and K get a per-head RMSNorm before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Arch::Qwen3
    }
}

/// Llama 3 style frequency scaling of rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall scale factor.
    pub factor: f32,
    /// Wavelengths above `original_max_position / low_freq_factor` are scaled.
    pub low_freq_factor: f32,
    /// Wavelengths below `original_max_position / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// Context the model was pre-trained with.
    pub original_max_position: usize,
}

/// A model's shape and numeric constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Arch,
    /// Rows of the embedding table and the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest context the model supports, in tokens.
    pub max_position: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Which dimensions RoPE pairs (depends on the checkpoint format).
    pub rope_style: RopeStyle,
    /// Llama 3 frequency scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Whether the LM head is the embedding table.
    pub tie_embeddings: bool,
}

fn md_u(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<usize> {
    let v = md.get(key).ok_or_else(|| EngineError::model(path, format!("missing GGUF metadata key `{key}`")))?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| EngineError::model(path, format!("GGUF metadata `{key}`: {e}")))
}

fn md_f(md: &HashMap<String, Value>, key: &str) -> Option<f32> {
    md.get(key).and_then(|v| v.to_f32().ok().or_else(|| v.to_f64().ok().map(|x| x as f32)))
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata (`general.architecture`
    /// and the `{arch}.*` keys). `vocab_size` comes from the embedding table
    /// and is passed in.
    pub fn from_gguf(md: &HashMap<String, Value>, vocab_size: usize, path: &Path) -> Result<Self> {
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| EngineError::model(path, "missing GGUF metadata key `general.architecture`"))?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = md_u(md, &key("embedding_length"), path)?;
        let n_heads = md_u(md, &key("attention.head_count"), path)?;
        let n_kv_heads = md_u(md, &key("attention.head_count_kv"), path).unwrap_or(n_heads);
        let head_dim = md_u(md, &key("attention.key_length"), path).unwrap_or(hidden_size / n_heads);
        Ok(Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: md_u(md, &key("feed_forward_length"), path)?,
            n_layers: md_u(md, &key("block_count"), path)?,
            n_heads,
            n_kv_heads,
            head_dim,
            max_position: md_u(md, &key("context_length"), path).unwrap_or(4096),
            rope_theta: md_f(md, &key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: md_f(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            // llama.cpp's converter permutes Llama Q/K weights for paired
            // ("normal") RoPE; Qwen checkpoints keep the NeoX layout.
            rope_style: if arch == Arch::Llama { RopeStyle::Interleaved } else { RopeStyle::Neox },
            // GGUF stores Llama 3 scaling as a `rope_freqs` tensor instead.
            rope_scaling: None,
            tie_embeddings: false,
        })
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| EngineError::model(path, format!("config.json: {e}")))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(raw.model_type.clone())
            .ok_or_else(|| EngineError::model(path, "config.json names neither `architectures` nor `model_type`"))?;
        let arch = Arch::parse(&arch_name)?;
        let need = |v: Option<usize>, k: &str| v.ok_or_else(|| EngineError::model(path, format!("config.json: missing `{k}`")));
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let n_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let rope_scaling = match raw.rope_scaling {
            Some(s) if s.rope_type.as_deref().or(s.r#type.as_deref()) == Some("llama3") => Some(Llama3RopeScaling {
                factor: s.factor.unwrap_or(8.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position: s.original_max_position_embeddings.unwrap_or(8192),
            }),
            Some(s) if matches!(s.rope_type.as_deref().or(s.r#type.as_deref()), Some("default") | None) => None,
            Some(s) => {
                return Err(EngineError::model(
                    path,
                    format!("config.json: rope_scaling type {:?} is not supported (supported: llama3)", s.rope_type.or(s.r#type)),
                ))
            }
            None => None,
        };
        Ok(Self {
            arch,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            n_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            n_heads,
            n_kv_heads: raw.num_key_value_heads.unwrap_or(n_heads),
            head_dim: raw.head_dim.unwrap_or(hidden_size / n_heads),
            max_position: raw.max_position_embeddings.unwrap_or(4096),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rms_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_style: RopeStyle::Neox,
            rope_scaling,
            tie_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        })
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(EngineError::model(path, m));
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads are not a multiple of {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > kernels::attention::MAX_HEAD_DIM {
            return bad(format!(
                "head dimension {} is not supported (multiple of 8, at most {})",
                self.head_dim,
                kernels::attention::MAX_HEAD_DIM
            ));
        }
        if self.n_layers == 0 || self.vocab_size == 0 || self.hidden_size == 0 {
            return bad("empty model (no layers, vocabulary or hidden size)".into());
        }
        Ok(())
    }

    /// Bytes of KV cache one token takes in `bytes_per_value` precision.
    pub fn kv_bytes_per_token(&self, bytes_per_value: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    r#type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f32>,
    rms_norm_eps: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_resolves_defaults_and_architecture() {
        let text = r#"{"architectures":["Qwen3ForCausalLM"],"vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_json(text, Path::new("x")).unwrap();
        assert_eq!(c.arch, Arch::Qwen3);
        assert_eq!(c.head_dim, 32);
        assert!(c.tie_embeddings);
        assert_eq!(c.rope_style, RopeStyle::Neox);
        assert!(c.arch.qk_norm() && !c.arch.qkv_bias());
    }

    #[test]
    fn unknown_architecture_is_named_in_the_error() {
        let text = r#"{"architectures":["GPTNeoXForCausalLM"],"vocab_size":1,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1}"#;
        let e = ModelConfig::from_hf_json(text, Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("GPTNeoXForCausalLM"), "{e}");
    }

    #[test]
    fn missing_field_is_named_in_the_error() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":1,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":1}"#;
        let e = ModelConfig::from_hf_json(text, Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{e}");
    }
}

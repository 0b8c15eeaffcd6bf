//! Opening a model from a path: a GGUF file or a Hugging Face folder, with
//! its tokenizer and chat template.

use std::path::{Path, PathBuf};

use crate::chat_template::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{Model, Progress};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufSource, HfSource, Requant, TensorName, TensorSource};

/// A model ready to serve: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    /// The weights.
    pub model: Model,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template (the model's own, or plain ChatML when it has none).
    pub template: ChatTemplate,
    /// Where it came from.
    pub path: PathBuf,
    /// A short name: the file stem or folder name.
    pub name: String,
}

/// Loads `path` (a `.gguf` file or a folder with `config.json` and
/// `*.safetensors`), converting weights as `requant` asks.
pub fn load(path: &Path, requant: Requant, progress: Progress<'_>) -> Result<LoadedModel> {
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let (model, tokenizer) = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
        let cfg = ModelConfig::from_hf_json(&text, &cfg_path)?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        let src = HfSource::open(path)?;
        let mut cfg = cfg;
        // Some checkpoints tie embeddings without saying so.
        if !src.contains(TensorName::Output) {
            cfg.tie_embeddings = true;
        }
        (Model::load(cfg, &src, requant, progress)?, tokenizer)
    } else if path.is_file() {
        let src = GgufSource::open(path)?;
        let vocab = src
            .shape(TensorName::Embed)
            .and_then(|s| s.first().copied())
            .ok_or_else(|| EngineError::MissingTensor { path: path.to_path_buf(), name: src.name_of(TensorName::Embed) })?;
        let mut cfg = ModelConfig::from_gguf(src.metadata(), vocab, path)?;
        cfg.tie_embeddings = !src.contains(TensorName::Output);
        let tokenizer = Tokenizer::from_gguf(src.metadata())?;
        (Model::load(cfg, &src, requant, progress)?, tokenizer)
    } else {
        return Err(EngineError::model(path, "no such file or folder"));
    };
    let template = match tokenizer.chat_template_source() {
        Some(src) => ChatTemplate::new(src, tokenizer.bos_token(), tokenizer.eos_token())?,
        None => ChatTemplate::chatml(),
    };
    Ok(LoadedModel { model, tokenizer, template, path: path.to_path_buf(), name })
}

//! Shared by the engine's real-model tests: where the default model is, how
//! a user message becomes prompt tokens, and the chat prompts they decode.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use engine::EngineHandle;

/// The default model file (fetched by scripts/fetch-model.sh).
pub fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// `user` as one chat turn, rendered with the model's template and encoded.
pub fn chat_prompt(e: &EngineHandle, user: &str) -> Vec<u32> {
    let info = e.info();
    let msgs = vec![engine::chat_template::ChatMessage { role: "user".into(), content: user.into() }];
    info.tokenizer.encode(&info.template.render(&msgs, true).unwrap(), true).unwrap()
}

/// Varied open chat prompts.
pub const CHAT_PROMPTS: [&str; 8] = [
    "Explain why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 17 times 23?",
    "List three uses of copper.",
    "Translate 'good morning' into Spanish.",
    "Describe a cat in one sentence.",
    "What causes ocean tides?",
    "Give me a short tip for learning to code.",
];

//! The models the experience loop talks to, behind one [`Llm`] trait:
//! [`EngineLlm`] (the served model, through [`engine::EngineHandle::submit`])
//! and [`HttpLlm`] (any OpenAI-compatible `/v1/chat/completions`, for a
//! stronger teacher).
//!
//! Rollouts always use the served model (it is the one being improved); the
//! distiller is either.

use std::time::{Duration, Instant};

use engine::chat_template::ChatMessage;
use engine::sampling::SamplingParams;
use engine::{EngineHandle, Event, GenerateRequest};
use futures::future::BoxFuture;

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// The request could not be built (template, tokenizer, context).
    #[error("request: {0}")]
    Request(String),
    /// The engine or the endpoint refused or failed.
    #[error("generation: {0}")]
    Generation(String),
    /// This model cannot continue a prefilled assistant message.
    #[error("prefill is not supported by {0}")]
    PrefillUnsupported(String),
}

/// One generation call.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Text the assistant's answer starts with (the model continues it);
    /// only when [`Llm::supports_prefill`].
    pub prefill: Option<String>,
    /// Most tokens per choice.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Choices (the prompt is computed once).
    pub n: usize,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
}

impl LlmRequest {
    /// A greedy, single-choice request.
    pub fn greedy(messages: Vec<ChatMessage>, max_tokens: usize) -> Self {
        Self { messages, prefill: None, max_tokens, temperature: 0.0, seed: 0, n: 1, stop: Vec::new() }
    }
}

/// A chat model.
pub trait Llm: Send + Sync {
    /// A name for logs and job status.
    fn name(&self) -> String;
    /// Whether [`LlmRequest::prefill`] is honoured (needed by the
    /// schema-guided decoder).
    fn supports_prefill(&self) -> bool;
    /// The `n` completions of `req`, in choice order (without the prefill).
    fn generate(&self, req: LlmRequest) -> BoxFuture<'_, Result<Vec<String>, LlmError>>;
    /// Tokens in `text` (for the injection cap); an estimate is fine.
    fn count_tokens(&self, text: &str) -> usize {
        text.split_whitespace().count() * 4 / 3 + 1
    }
}

/// A chat message.
pub fn message(role: &str, content: impl Into<String>) -> ChatMessage {
    ChatMessage { role: role.to_string(), content: content.into() }
}

/// The served model.
#[derive(Clone)]
pub struct EngineLlm {
    handle: EngineHandle,
    /// Wait (up to this long) for the engine's queue to empty before each
    /// submission: background work yields to user traffic.
    yield_for: Duration,
}

impl EngineLlm {
    /// The served model; background callers pass a `yield_for` so user
    /// requests go first.
    pub fn new(handle: EngineHandle, yield_for: Duration) -> Self {
        Self { handle, yield_for }
    }

    async fn run(&self, req: LlmRequest) -> Result<Vec<String>, LlmError> {
        let info = self.handle.info();
        let mut text = info.template.render(&req.messages, true).map_err(|e| LlmError::Request(e.to_string()))?;
        if let Some(p) = &req.prefill {
            text.push_str(p);
        }
        let prompt = info.tokenizer.encode(&text, true).map_err(|e| LlmError::Request(e.to_string()))?;
        let room = info.max_model_len.saturating_sub(prompt.len() + 1);
        if room == 0 {
            return Err(LlmError::Request(format!("the prompt has {} tokens: no room left in the context", prompt.len())));
        }
        let mut g = GenerateRequest::greedy(prompt, req.max_tokens.min(room).max(1));
        g.sampling = SamplingParams { temperature: req.temperature, seed: req.seed, ..SamplingParams::default() };
        g.n = req.n.max(1);
        g.stop = req.stop.clone();
        // Low priority without engine support: wait for an empty queue.
        let deadline = Instant::now() + self.yield_for;
        while self.handle.waiting() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut generation = self.handle.submit(g).map_err(|e| LlmError::Generation(e.to_string()))?;
        let n = req.n.max(1);
        let mut out = vec![String::new(); n];
        let mut done = 0;
        while let Some(ev) = generation.events.recv().await {
            match ev {
                Event::Token(t) => {
                    if let Some(o) = out.get_mut(t.choice) {
                        o.push_str(&t.text);
                    }
                }
                Event::Finished(f) => {
                    if let Some(o) = out.get_mut(f.choice) {
                        o.push_str(&f.text);
                    }
                    done += 1;
                    if done == n {
                        break;
                    }
                }
                Event::Error(m) => return Err(LlmError::Generation(m)),
            }
        }
        if done < n {
            return Err(LlmError::Generation("the engine stopped before the answer was complete".into()));
        }
        Ok(out)
    }
}

impl Llm for EngineLlm {
    fn name(&self) -> String {
        format!("served:{}", self.handle.info().model_name)
    }
    fn supports_prefill(&self) -> bool {
        true
    }
    fn generate(&self, req: LlmRequest) -> BoxFuture<'_, Result<Vec<String>, LlmError>> {
        Box::pin(self.run(req))
    }
    fn count_tokens(&self, text: &str) -> usize {
        self.handle.info().tokenizer.encode(text, false).map(|t| t.len()).unwrap_or_else(|_| text.len() / 3 + 1)
    }
}

/// An OpenAI-compatible chat endpoint.
#[derive(Clone)]
pub struct HttpLlm {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
}

impl HttpLlm {
    /// `base` is the API root (`http://host:port/v1`; `/v1` is appended
    /// when the URL has no path).
    pub fn new(base: &str, model: &str, api_key: Option<String>, timeout: Duration) -> Result<Self, LlmError> {
        let trimmed = base.trim_end_matches('/');
        let after_scheme = trimmed.split_once("://").map(|(_, r)| r).unwrap_or(trimmed);
        let root = if after_scheme.contains('/') { trimmed.to_string() } else { format!("{trimmed}/v1") };
        let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| LlmError::Request(e.to_string()))?;
        Ok(Self { client, url: format!("{root}/chat/completions"), model: model.to_string(), api_key })
    }

    async fn run(&self, req: LlmRequest) -> Result<Vec<String>, LlmError> {
        if req.prefill.is_some() {
            return Err(LlmError::PrefillUnsupported(self.name()));
        }
        let messages: Vec<serde_json::Value> =
            req.messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
        let mut body = serde_json::json!({
            "model": self.model, "messages": messages, "max_tokens": req.max_tokens,
            "temperature": req.temperature, "n": req.n.max(1), "seed": req.seed as i64,
        });
        if !req.stop.is_empty() {
            body["stop"] = serde_json::json!(req.stop);
        }
        let mut call = self.client.post(&self.url).json(&body);
        if let Some(k) = &self.api_key {
            call = call.bearer_auth(k);
        }
        let resp = call.send().await.map_err(|e| LlmError::Generation(format!("{}: {e}", self.url)))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| LlmError::Generation(e.to_string()))?;
        if !status.is_success() {
            return Err(LlmError::Generation(format!("{} answered {status}: {}", self.url, text.chars().take(300).collect::<String>())));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LlmError::Generation(format!("bad JSON from {}: {e}", self.url)))?;
        let choices = v["choices"].as_array().ok_or_else(|| LlmError::Generation("no `choices` in the answer".into()))?;
        let mut out: Vec<(usize, String)> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| (c["index"].as_u64().map_or(i, |x| x as usize), c["message"]["content"].as_str().unwrap_or("").to_string()))
            .collect();
        out.sort_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, t)| t).collect())
    }
}

impl Llm for HttpLlm {
    fn name(&self) -> String {
        format!("http:{}@{}", self.model, self.url)
    }
    fn supports_prefill(&self) -> bool {
        false
    }
    fn generate(&self, req: LlmRequest) -> BoxFuture<'_, Result<Vec<String>, LlmError>> {
        Box::pin(self.run(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_get_v1_only_when_they_have_no_path() {
        let t = Duration::from_secs(1);
        assert_eq!(HttpLlm::new("http://127.0.0.1:8001", "m", None, t).unwrap().url, "http://127.0.0.1:8001/v1/chat/completions");
        assert_eq!(HttpLlm::new("http://h:1/v1/", "m", None, t).unwrap().url, "http://h:1/v1/chat/completions");
        assert_eq!(HttpLlm::new("https://api.x.com/openai/v1", "m", None, t).unwrap().url, "https://api.x.com/openai/v1/chat/completions");
    }
}

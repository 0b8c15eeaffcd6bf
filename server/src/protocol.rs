//! The OpenAI wire format: request and response bodies of the completion,
//! chat and tokenizer routes, as serde types.
//!
//! Requests keep every field optional, as clients send them; validation
//! ([`crate::validate`]) resolves defaults and limits. Non-standard fields sit
//! in an `ouro` object, plus the sampling extensions vLLM also accepts
//! (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`,
//! `skip_special_tokens`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StringOrList {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// The `prompt` of a completion request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Several texts (one completion each).
    Texts(Vec<String>),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several token id lists.
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both routes (a view built by `sampling()`).
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    /// 0..=2; 0 is greedy.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// vLLM extension; 0 or -1 disables.
    pub top_k: Option<i64>,
    /// vLLM extension, [0, 1].
    pub min_p: Option<f32>,
    /// [-2, 2].
    pub presence_penalty: Option<f32>,
    /// [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// vLLM extension, > 0.
    pub repetition_penalty: Option<f32>,
    /// RNG seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<StringOrList>,
    /// vLLM extension: token ids that end generation.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM extension.
    pub ignore_eos: Option<bool>,
    /// vLLM extension (default true).
    pub skip_special_tokens: Option<bool>,
    /// Choices per prompt.
    pub n: Option<i64>,
    /// Stream with server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Not supported: refused unless empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// Declares a request struct with the sampling fields inline (not
/// `#[serde(flatten)]`, which would hide the failing field's name from type
/// errors) and a `sampling()` view of them.
macro_rules! request_with_sampling {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            /// 0..=2; 0 is greedy.
            pub temperature: Option<f32>,
            /// (0, 1].
            pub top_p: Option<f32>,
            /// vLLM extension; 0 or -1 disables.
            pub top_k: Option<i64>,
            /// vLLM extension, [0, 1].
            pub min_p: Option<f32>,
            /// [-2, 2].
            pub presence_penalty: Option<f32>,
            /// [-2, 2].
            pub frequency_penalty: Option<f32>,
            /// vLLM extension, > 0.
            pub repetition_penalty: Option<f32>,
            /// RNG seed.
            pub seed: Option<i64>,
            /// Stop strings.
            pub stop: Option<StringOrList>,
            /// vLLM extension: token ids that end generation.
            pub stop_token_ids: Option<Vec<u32>>,
            /// vLLM extension.
            pub ignore_eos: Option<bool>,
            /// vLLM extension (default true).
            pub skip_special_tokens: Option<bool>,
            /// Choices per prompt.
            pub n: Option<i64>,
            /// Stream with server-sent events.
            pub stream: Option<bool>,
            /// Streaming options.
            pub stream_options: Option<StreamOptions>,
            /// Not supported: refused unless empty.
            pub logit_bias: Option<serde_json::Map<String, Value>>,
            /// Accepted and ignored.
            pub user: Option<String>,
        }

        impl $name {
            /// The sampling fields.
            pub fn sampling(&self) -> SamplingFields {
                SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    stop_token_ids: self.stop_token_ids.clone(),
                    ignore_eos: self.ignore_eos,
                    skip_special_tokens: self.skip_special_tokens,
                    n: self.n,
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    logit_bias: self.logit_bias.clone(),
                }
            }
        }
    };
}

/// ouro's own request fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct OuroRequest {
    /// Name of an experience library to inject (chat only).
    pub experience: Option<String>,
    /// `none` to opt out of KV compression for this request.
    pub kv_compression: Option<String>,
    /// Speculative decoding for this request: `off`, `ngram`, `speculator`
    /// or `auto` (default: the server's `--speculation`).
    pub speculation: Option<String>,
    /// A fixed draft length (1..8) for this request.
    pub spec_k: Option<i64>,
}

request_with_sampling! {
/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Model name (optional; the served model when absent).
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: Prompt,
    /// Most tokens to generate (default 16, as OpenAI).
    pub max_tokens: Option<i64>,
    /// Number of log-probabilities to return per token (0..=20).
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the output.
    pub echo: Option<bool>,
    /// Not supported: refused unless absent.
    pub suffix: Option<String>,
    /// Not supported beyond 1.
    pub best_of: Option<i64>,
    /// ouro extensions.
    pub ouro: Option<OuroRequest>,
}
}

/// A chat message's content: text or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts (`{"type": "text", "text": ...}`).
    Parts(Vec<ContentPart>),
}

/// One part of a message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Only `text` is supported.
    pub r#type: String,
    /// The text.
    pub text: Option<String>,
}

/// A chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// system, user, assistant, developer or tool.
    pub role: String,
    /// Content (may be null for assistant messages with tool calls).
    pub content: Option<MessageContent>,
    /// Accepted and ignored.
    pub name: Option<String>,
}

request_with_sampling! {
/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most tokens to generate (default: the rest of the context).
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// How many alternatives per token (0..=20, needs `logprobs`).
    pub top_logprobs: Option<i64>,
    /// Not supported: refused when non-empty.
    pub tools: Option<Vec<Value>>,
    /// Accepted when `none` or `auto` without tools.
    pub tool_choice: Option<Value>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<Value>,
    /// ouro extensions.
    pub ouro: Option<OuroRequest>,
}
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (counted once per prompt).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
}

/// Legacy completion log-probabilities.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// The alternatives per position.
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    /// Character offset of each token in the text.
    pub text_offset: Vec<usize>,
}

/// A completion choice.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Index over all prompts and choices.
    pub index: usize,
    /// The text.
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// stop or length (null in intermediate stream chunks).
    pub finish_reason: Option<&'static str>,
}

/// ouro's per-response extras.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OuroResponse {
    /// Engine timings in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timing_ms: Option<TimingMs>,
    /// Speculative decoding statistics over all choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecSummary>,
    /// Streamed chat chunks only: the drafter that proposed this chunk's
    /// token (accepted by the target); absent for the target's own tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drafted_by: Option<&'static str>,
    /// The experience library injected into the prompt (chat only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experience: Option<ExperienceUsed>,
}

/// The experience library a chat response used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExperienceUsed {
    /// Library name.
    pub name: String,
    /// The version injected.
    pub version: u64,
}

/// Speculative decoding statistics of a response.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SpecSummary {
    /// Drafted tokens.
    pub drafted: usize,
    /// Drafted tokens the target accepted.
    pub accepted: usize,
    /// Tokens per drafting step (accepted drafts + the target's own token).
    pub mean_acceptance_length: f64,
    /// The drafter that proposed most tokens (`ngram`, `speculator`), or
    /// null when nothing was drafted.
    pub drafter: Option<&'static str>,
}

/// Engine timings.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TimingMs {
    /// In the queue.
    pub queue: f64,
    /// Until the first token.
    pub ttft: f64,
    /// In total.
    pub total: f64,
}

/// `text_completion` response (and stream chunk).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Usage (always in full responses; in the last stream chunk on request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// ouro extras.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ouro: Option<OuroResponse>,
}

/// One alternative in chat log-probabilities.
#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
}

/// Chat log-probability of one token.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
    /// Alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat log-probabilities.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    /// Per token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The assistant message (or a stream delta).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatMessageOut {
    /// `assistant` (first delta and full responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A chat choice (full response: `message`; stream: `delta`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The message (full responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessageOut>,
    /// The delta (stream chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatMessageOut>,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// stop or length.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion` response or `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// ouro extras.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ouro: Option<OuroResponse>,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Or a conversation, rendered with the chat template.
    pub messages: Option<Vec<Message>>,
    /// Add BOS where the model wants it (default true).
    pub add_special_tokens: Option<bool>,
    /// For `messages`: append the assistant prompt (default true).
    pub add_generation_prompt: Option<bool>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// Context length.
    pub max_model_len: usize,
    /// The ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// Name to use as `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// `ouro`.
    pub owned_by: &'static str,
    /// Context length.
    pub max_model_len: usize,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served models.
    pub data: Vec<ModelCard>,
}

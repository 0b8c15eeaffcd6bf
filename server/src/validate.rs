//! Parse, don't validate: turns an OpenAI request body into a
//! [`ValidRequest`] with every default resolved and every limit checked,
//! or an [`ApiError`] naming the field, the limit and the value.

use engine::chat_template::ChatMessage;
use engine::sampling::SamplingParams;
use engine::spec::{SpecMode, SpecRequest};
use engine::{EngineHandle, GenerateRequest};

use crate::errors::ApiError;
use crate::protocol::{ChatRequest, CompletionRequest, MessageContent, Prompt, SamplingFields};

/// Server-wide limits on requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most choices per prompt.
    pub max_n: usize,
    /// Most prompt tokens (0: the context length).
    pub max_prompt_tokens: usize,
    /// Most tokens generated per choice (0: the context length).
    pub max_tokens: usize,
    /// Most prompts in one completion request.
    pub max_prompts: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_n: 16, max_prompt_tokens: 0, max_tokens: 0, max_prompts: 32 }
    }
}

/// How log-probabilities are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobFormat {
    /// None asked for.
    None,
    /// Legacy completions (`logprobs: N`).
    Completion(usize),
    /// Chat (`logprobs: true, top_logprobs: N`).
    Chat(usize),
}

/// A checked request: one engine request per prompt.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// The engine requests, one per prompt, in order.
    pub requests: Vec<GenerateRequest>,
    /// Stream the answer.
    pub stream: bool,
    /// Add a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Prepend the prompt text (completions).
    pub echo: bool,
    /// Log-probabilities format.
    pub logprobs: LogprobFormat,
    /// The model name to report.
    pub model: String,
    /// Choices per prompt.
    pub n: usize,
    /// Prompt texts (for `echo`).
    pub prompt_texts: Vec<String>,
}

fn check_model(engine: &EngineHandle, model: &Option<String>) -> Result<String, ApiError> {
    let served = &engine.info().model_name;
    match model {
        Some(m) if m != served => Err(ApiError::Invalid {
            param: Some("model".into()),
            message: format!("The model `{m}` does not exist; this server serves `{served}`"),
            code: "model_not_found",
        }),
        _ => Ok(served.clone()),
    }
}

fn range_f32(name: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::invalid(name, format!("`{name}` must be between {lo} and {hi}, got {x}"))),
    }
}

/// Sampling settings and the other shared fields.
struct Common {
    sampling: SamplingParams,
    speculation: Option<SpecRequest>,
    kv_compression: Option<engine::tca::KvCompression>,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    skip_special: bool,
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn common(f: &SamplingFields, ouro: &Option<crate::protocol::OuroRequest>, limits: &Limits) -> Result<Common, ApiError> {
    let speculation = speculation(ouro)?;
    let kv_compression = kv_compression(ouro)?;
    let temperature = range_f32("temperature", f.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range_f32("top_p", f.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0, got 0"));
    }
    let top_k = match f.top_k {
        None | Some(0) | Some(-1) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (disabled) or positive, got {k}"))),
    };
    let min_p = range_f32("min_p", f.min_p, 0.0, 1.0, 0.0)?;
    let presence_penalty = range_f32("presence_penalty", f.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = range_f32("frequency_penalty", f.frequency_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = range_f32("repetition_penalty", f.repetition_penalty, 0.01, 10.0, 1.0)?;
    let n = match f.n {
        None => 1,
        Some(n) if n >= 1 && n as usize <= limits.max_n => n as usize,
        Some(n) => return Err(ApiError::invalid("n", format!("`n` must be between 1 and {}, got {n}", limits.max_n))),
    };
    let seed = match f.seed {
        Some(s) => s as u64,
        None => rand::random::<u64>(),
    };
    // A seeded request that samples gives the same tokens again only if its
    // random draws do not depend on speculation's live choices (drafts and
    // their verification consume the sequence's random numbers, and `auto`
    // decides from live measurements): unless it names a speculation mode,
    // it runs without speculation. Greedy requests are unaffected
    // (speculation is exact for them).
    let speculation = match speculation {
        None if f.seed.is_some() && temperature > 0.0 => Some(SpecRequest { mode: SpecMode::Off, k: None }),
        s => s,
    };
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 16 {
        return Err(ApiError::invalid("stop", format!("at most 16 stop strings are allowed, got {}", stop.len())));
    }
    if f.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid("logit_bias", "`logit_bias` is not supported"));
    }
    let stream = f.stream.unwrap_or(false);
    let include_usage = f.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid("stream_options", "`stream_options` needs `stream: true`"));
    }
    Ok(Common {
        speculation,
        kv_compression,
        sampling: SamplingParams { temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, seed },
        stop,
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        skip_special: f.skip_special_tokens.unwrap_or(true),
        n,
        stream,
        include_usage,
    })
}

/// Resolves `max_tokens` against the context and the server limit.
fn max_tokens(
    engine: &EngineHandle,
    limits: &Limits,
    asked: Option<i64>,
    default: Option<usize>,
    prompt_len: usize,
) -> Result<usize, ApiError> {
    let ctx = engine.info().max_model_len;
    if prompt_len >= ctx {
        return Err(ApiError::Invalid {
            param: Some("prompt".into()),
            message: format!("The prompt has {prompt_len} tokens; this model's maximum context length is {ctx} tokens"),
            code: "context_length_exceeded",
        });
    }
    if limits.max_prompt_tokens > 0 && prompt_len > limits.max_prompt_tokens {
        return Err(ApiError::Invalid {
            param: Some("prompt".into()),
            message: format!("The prompt has {prompt_len} tokens; this server accepts at most {}", limits.max_prompt_tokens),
            code: "context_length_exceeded",
        });
    }
    let room = ctx - prompt_len;
    let cap = if limits.max_tokens > 0 { room.min(limits.max_tokens) } else { room };
    match asked {
        None => Ok(default.unwrap_or(room).min(cap)),
        Some(m) if m < 1 => Err(ApiError::invalid("max_tokens", format!("`max_tokens` must be at least 1, got {m}"))),
        Some(m) if m as usize > room => Err(ApiError::Invalid {
            param: Some("max_tokens".into()),
            message: format!(
                "`max_tokens` is {m}, but the prompt has {prompt_len} tokens and the context is {ctx} tokens: at most {room} tokens can be generated"
            ),
            code: "context_length_exceeded",
        }),
        Some(m) if limits.max_tokens > 0 && m as usize > limits.max_tokens => {
            Err(ApiError::invalid("max_tokens", format!("`max_tokens` is {m}; this server allows at most {}", limits.max_tokens)))
        }
        Some(m) => Ok(m as usize),
    }
}

/// The request's own speculation setting (`ouro.speculation`, `ouro.spec_k`).
pub fn speculation(ouro: &Option<crate::protocol::OuroRequest>) -> Result<Option<SpecRequest>, ApiError> {
    let Some(o) = ouro else { return Ok(None) };
    let k = match o.spec_k {
        None => None,
        Some(k) if (1..=8).contains(&k) => Some(k as usize),
        Some(k) => return Err(ApiError::invalid("ouro.spec_k", format!("`ouro.spec_k` must be between 1 and 8, got {k}"))),
    };
    let mode = match o.speculation.as_deref() {
        None if k.is_none() => return Ok(None),
        None => SpecMode::Auto,
        Some(m) => SpecMode::parse(m).ok_or_else(|| {
            ApiError::invalid("ouro.speculation", format!("`ouro.speculation` must be off, ngram, speculator or auto, got `{m}`"))
        })?,
    };
    Ok(Some(SpecRequest { mode, k }))
}

fn engine_request(c: &Common, prompt: Vec<u32>, max_tokens: usize, logprobs: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: c.sampling.clone(),
        max_tokens,
        stop: c.stop.clone(),
        stop_token_ids: c.stop_token_ids.clone(),
        ignore_eos: c.ignore_eos,
        n: c.n,
        logprobs,
        skip_special_tokens: c.skip_special,
        speculation: c.speculation,
        kv_compression: c.kv_compression,
    }
}

/// The request's own KV compression (`ouro.kv_compression`: `none` opts out
/// of TCA for exactness; `tca` asks for it when the server has budgets).
pub fn kv_compression(ouro: &Option<crate::protocol::OuroRequest>) -> Result<Option<engine::tca::KvCompression>, ApiError> {
    match ouro.as_ref().and_then(|o| o.kv_compression.as_deref()) {
        None => Ok(None),
        Some(m) => engine::tca::KvCompression::parse(m)
            .map(Some)
            .ok_or_else(|| ApiError::invalid("ouro.kv_compression", format!("`ouro.kv_compression` must be none or tca, got `{m}`"))),
    }
}

/// A request may ask for `tca` only from a server that loaded budgets.
fn tca_served(engine: &EngineHandle, asked: Option<engine::tca::KvCompression>) -> Result<(), ApiError> {
    if asked == Some(engine::tca::KvCompression::Tca) && !engine.info().tca_available {
        return Err(ApiError::invalid(
            "ouro.kv_compression",
            "`ouro.kv_compression` is `tca` but this server has no TCA budgets (start it with --tca-budgets FILE)",
        ));
    }
    Ok(())
}

/// Checks a `/v1/completions` body.
pub fn completion(engine: &EngineHandle, limits: &Limits, req: CompletionRequest) -> Result<ValidRequest, ApiError> {
    let model = check_model(engine, &req.model)?;
    let c = common(&req.sampling(), &req.ouro, limits)?;
    tca_served(engine, c.kv_compression)?;
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if req.best_of.is_some_and(|b| b as usize != c.n && b != 1) {
        return Err(ApiError::invalid("best_of", "`best_of` other than `n` is not supported"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(l) if (0..=20).contains(&l) => Some(l as usize),
        Some(l) => return Err(ApiError::invalid("logprobs", format!("`logprobs` must be between 0 and 20, got {l}"))),
    };
    let tok = &engine.info().tokenizer;
    let encode = |t: &str| tok.encode(t, true).map_err(ApiError::from);
    let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = match req.prompt {
        Prompt::Text(t) => (vec![encode(&t)?], vec![t]),
        Prompt::Texts(ts) => {
            let mut p = Vec::new();
            for t in &ts {
                p.push(encode(t)?);
            }
            (p, ts)
        }
        Prompt::Tokens(ids) => {
            let text = tok.decode(&ids, false).unwrap_or_default();
            (vec![ids], vec![text])
        }
        Prompt::TokenLists(lists) => {
            let texts = lists.iter().map(|ids| tok.decode(ids, false).unwrap_or_default()).collect();
            (lists, texts)
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` is empty"));
    }
    if prompts.len() > limits.max_prompts {
        return Err(ApiError::invalid("prompt", format!("at most {} prompts per request, got {}", limits.max_prompts, prompts.len())));
    }
    let vocab = engine.info().config.vocab_size;
    let mut requests = Vec::with_capacity(prompts.len());
    for p in prompts {
        if p.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` is empty"));
        }
        if let Some(bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid("prompt", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let mt = max_tokens(engine, limits, req.max_tokens, Some(16), p.len())?;
        requests.push(engine_request(&c, p, mt, logprobs));
    }
    Ok(ValidRequest {
        requests,
        stream: c.stream,
        include_usage: c.include_usage,
        echo: req.echo.unwrap_or(false),
        logprobs: logprobs.map_or(LogprobFormat::None, LogprobFormat::Completion),
        model,
        n: c.n,
        prompt_texts: texts,
    })
}

/// The conversation as template messages (text parts joined).
pub fn chat_messages(messages: &[crate::protocol::Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!("unknown role `{}` (expected system, user, assistant, developer or tool)", m.role),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    if p.r#type != "text" {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}].type"),
                            format!("content parts of type `{}` are not supported (only `text`)", p.r#type),
                        ));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// Checks a `/v1/chat/completions` body. `messages` may already carry an
/// injected system prompt (experiences).
pub fn chat(engine: &EngineHandle, limits: &Limits, req: &ChatRequest, messages: &[ChatMessage]) -> Result<ValidRequest, ApiError> {
    let model = check_model(engine, &req.model)?;
    let c = common(&req.sampling(), &req.ouro, limits)?;
    tca_served(engine, c.kv_compression)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(ApiError::invalid("response_format", "only `{\"type\": \"text\"}` is supported"));
        }
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, None) => None,
        (false, Some(_)) => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
        (true, None) => Some(0),
        (true, Some(n)) if (0..=20).contains(&n) => Some(n as usize),
        (true, Some(n)) => return Err(ApiError::invalid("top_logprobs", format!("`top_logprobs` must be between 0 and 20, got {n}"))),
    };
    let info = engine.info();
    let text = info.template.render(messages, true)?;
    let prompt = info.tokenizer.encode(&text, true)?;
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let mt = max_tokens(engine, limits, asked, None, prompt.len()).map_err(|e| match e {
        ApiError::Invalid { param: Some(p), message, code } if p == "prompt" => {
            ApiError::Invalid { param: Some("messages".into()), message, code }
        }
        other => other,
    })?;
    Ok(ValidRequest {
        requests: vec![engine_request(&c, prompt, mt, logprobs)],
        stream: c.stream,
        include_usage: c.include_usage,
        echo: false,
        logprobs: logprobs.map_or(LogprobFormat::None, LogprobFormat::Chat),
        model,
        n: c.n,
        prompt_texts: vec![text],
    })
}

//! The OpenAI-compatible routes: `POST /v1/completions`,
//! `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! Each handler extracts, validates, submits, then either collects the whole
//! answer or streams it as server-sent events; response building lives in
//! small functions shared by both paths.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::sampling::TokenLogprob;
use engine::tokenizer::Tokenizer;
use futures::{Stream, StreamExt};

use crate::access::Caller;
use crate::errors::ApiError;
use crate::extract::ApiJson;
use crate::generate::{self, ChoiceResult, Out};
use crate::protocol::*;
use crate::state::AppState;
use crate::validate::{self, LogprobFormat, ValidRequest};
use engine::unix_now;

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let e = state.engine()?;
    let card = ModelCard {
        id: e.info().model_name.clone(),
        object: "model",
        created: state.created,
        owned_by: "ouro",
        max_model_len: e.info().max_model_len,
    };
    Ok(Json(ModelList { object: "list", data: vec![card] }))
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<CompletionRequest>) -> Result<Response, ApiError> {
    let engine = state.engine()?;
    let valid = validate::completion(engine, &state.limits, req)?;
    if valid.echo && valid.logprobs != LogprobFormat::None {
        return Err(ApiError::invalid("echo", "`echo` together with `logprobs` is not supported"));
    }
    let sub = generate::submit(&state, &valid)?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let tok = engine.info().tokenizer.clone();
    if valid.stream {
        return Ok(sse(completion_stream(id, valid, sub, tok)));
    }
    let total = valid.requests.len() * valid.n;
    let results = generate::collect(sub, total).await?;
    Ok(Json(completion_response(&id, &valid, &results, &tok)).into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let engine = state.engine()?;
    let mut messages = validate::chat_messages(&req.messages)?;
    // Experience libraries (issue 7): the library goes into the system prompt before validation.
    let injected = super::experience::inject(&state, &req.ouro, req.n, &mut messages).await?;
    let valid = validate::chat(engine, &state.limits, &req, &messages)?;
    let sub = generate::submit(&state, &valid)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let tok = engine.info().tokenizer.clone();
    if valid.stream {
        return Ok(sse(chat_stream(id, valid, sub, tok, injected.reported())));
    }
    let results = generate::collect(sub, valid.n).await?;
    let mut resp = chat_response(&id, &valid, &results, &tok);
    super::experience::finish_chat(&state, &caller, &mut resp, injected, &results);
    Ok(Json(resp).into_response())
}

fn sse(s: impl Stream<Item = String> + Send + 'static) -> Response {
    let events = s.map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn usage(valid: &ValidRequest, results: &[ChoiceResult]) -> Usage {
    let prompt_tokens: usize = valid.requests.iter().map(|r| r.prompt.len()).sum();
    let completion_tokens: usize = results.iter().filter_map(|r| r.finish.as_ref()).map(|f| f.completion_tokens).sum();
    Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
}

fn timing(results: &[ChoiceResult]) -> Option<OuroResponse> {
    let f = results.first()?.finish.as_ref()?;
    let ms = |a: std::time::Instant, b: std::time::Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    let t = &f.timing;
    let mut spec = engine::request::SpecStats::default();
    for r in results.iter().filter_map(|r| r.finish.as_ref()) {
        let s = &r.spec;
        spec.drafting_steps += s.drafting_steps;
        spec.drafted += s.drafted;
        spec.accepted += s.accepted;
        for d in 0..2 {
            spec.drafted_by[d] += s.drafted_by[d];
            spec.accepted_by[d] += s.accepted_by[d];
        }
    }
    Some(OuroResponse {
        timing_ms: Some(TimingMs { queue: ms(t.queued, t.scheduled), ttft: ms(t.queued, t.first_token), total: ms(t.queued, t.finished) }),
        spec: Some(spec_summary(&spec)),
        experience: None,
        drafted_by: None,
    })
}

/// The response's `ouro.spec` object.
pub fn spec_summary(s: &engine::request::SpecStats) -> SpecSummary {
    SpecSummary {
        drafted: s.drafted,
        accepted: s.accepted,
        mean_acceptance_length: s.mean_acceptance_length(),
        drafter: s.main_drafter().map(|d| d.name()),
    }
}

fn top_map(tok: &Tokenizer, lp: &TokenLogprob) -> serde_json::Map<String, serde_json::Value> {
    lp.top.iter().map(|(t, l)| (tok.token_text(*t), serde_json::json!(l))).collect()
}

fn completion_logprobs(tok: &Tokenizer, r: &ChoiceResult, offset0: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = offset0;
    for (lp, piece) in r.logprobs.iter().zip(&r.pieces) {
        out.tokens.push(tok.token_text(lp.token));
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(top_map(tok, lp));
        out.text_offset.push(offset);
        offset += piece.len();
    }
    out
}

fn completion_response(id: &str, valid: &ValidRequest, results: &[ChoiceResult], tok: &Tokenizer) -> CompletionResponse {
    let choices = results
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let prefix = if valid.echo { valid.prompt_texts[index / valid.n].clone() } else { String::new() };
            CompletionChoice {
                index,
                logprobs: matches!(valid.logprobs, LogprobFormat::Completion(_)).then(|| completion_logprobs(tok, r, prefix.len())),
                text: prefix + &r.text,
                finish_reason: r.finish.as_ref().map(|f| f.reason.as_str()),
            }
        })
        .collect();
    CompletionResponse {
        id: id.to_string(),
        object: "text_completion",
        created: unix_now(),
        model: valid.model.clone(),
        choices,
        usage: Some(usage(valid, results)),
        ouro: timing(results),
    }
}

fn chat_logprob(tok: &Tokenizer, lp: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: tok.token_text(lp.token),
        logprob: lp.logprob,
        bytes: tok.token_bytes(lp.token),
        top_logprobs: lp
            .top
            .iter()
            .map(|(t, l)| TopLogprob { token: tok.token_text(*t), logprob: *l, bytes: tok.token_bytes(*t) })
            .collect(),
    }
}

fn chat_response(id: &str, valid: &ValidRequest, results: &[ChoiceResult], tok: &Tokenizer) -> ChatResponse {
    let choices = results
        .iter()
        .enumerate()
        .map(|(index, r)| ChatChoice {
            index,
            message: Some(ChatMessageOut { role: Some("assistant"), content: Some(r.text.clone()) }),
            delta: None,
            logprobs: matches!(valid.logprobs, LogprobFormat::Chat(_))
                .then(|| ChatLogprobs { content: r.logprobs.iter().map(|lp| chat_logprob(tok, lp)).collect() }),
            finish_reason: r.finish.as_ref().map(|f| f.reason.as_str()),
        })
        .collect();
    ChatResponse {
        id: id.to_string(),
        object: "chat.completion",
        created: unix_now(),
        model: valid.model.clone(),
        choices,
        usage: Some(usage(valid, results)),
        ouro: timing(results),
    }
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        format!(
            "{{\"error\":{{\"message\":\"serialization failed: {e}\",\"type\":\"internal_error\",\"param\":null,\"code\":\"internal\"}}}}"
        )
    })
}

fn stream_error(message: &str) -> String {
    json(&ApiError::Internal(message.to_string()).body())
}

/// Tracks a streamed answer: which choices are done and the usage so far.
struct StreamTally {
    total: usize,
    done: usize,
    completion_tokens: usize,
    prompt_tokens: usize,
}

impl StreamTally {
    fn new(valid: &ValidRequest) -> Self {
        Self {
            total: valid.requests.len() * valid.n,
            done: 0,
            completion_tokens: 0,
            prompt_tokens: valid.requests.iter().map(|r| r.prompt.len()).sum(),
        }
    }
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
        }
    }
}

fn completion_stream(
    id: String,
    valid: ValidRequest,
    sub: generate::Submitted,
    tok: Arc<Tokenizer>,
) -> impl Stream<Item = String> + Send + 'static {
    async_stream::stream! {
        let chunk = |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
            id: id.clone(), object: "text_completion", created: unix_now(), model: valid.model.clone(), choices, usage, ouro: None,
        };
        let mut tally = StreamTally::new(&valid);
        let mut offsets = vec![0usize; tally.total];
        if valid.echo {
            for (index, off) in offsets.iter_mut().enumerate() {
                let text = valid.prompt_texts[index / valid.n].clone();
                *off = text.len();
                yield json(&chunk(vec![CompletionChoice { index, text, logprobs: None, finish_reason: None }], None));
            }
        }
        let mut events = std::pin::pin!(generate::events(sub));
        while let Some(item) = events.next().await {
            match item {
                Out::Token { index, text, logprob, .. } => {
                    let logprobs = match (&valid.logprobs, logprob) {
                        (LogprobFormat::Completion(_), Some(lp)) => Some(CompletionLogprobs {
                            tokens: vec![tok.token_text(lp.token)],
                            token_logprobs: vec![lp.logprob],
                            top_logprobs: vec![top_map(&tok, &lp)],
                            text_offset: vec![offsets[index]],
                        }),
                        _ => None,
                    };
                    offsets[index] += text.len();
                    if !text.is_empty() || logprobs.is_some() {
                        yield json(&chunk(vec![CompletionChoice { index, text, logprobs, finish_reason: None }], None));
                    }
                }
                Out::Finish { index, event } => {
                    tally.done += 1;
                    tally.completion_tokens += event.completion_tokens;
                    yield json(&chunk(vec![CompletionChoice { index, text: event.text, logprobs: None, finish_reason: Some(event.reason.as_str()) }], None));
                    if tally.done == tally.total {
                        break;
                    }
                }
                Out::Error(m) => {
                    yield stream_error(&m);
                    return;
                }
            }
        }
        if valid.include_usage {
            yield json(&chunk(Vec::new(), Some(tally.usage())));
        }
        yield "[DONE]".to_string();
    }
}

fn chat_stream(
    id: String,
    valid: ValidRequest,
    sub: generate::Submitted,
    tok: Arc<Tokenizer>,
    experience: Option<ExperienceUsed>,
) -> impl Stream<Item = String> + Send + 'static {
    async_stream::stream! {
        let chunk = |choices: Vec<ChatChoice>, usage: Option<Usage>| ChatResponse {
            id: id.clone(), object: "chat.completion.chunk", created: unix_now(), model: valid.model.clone(), choices, usage, ouro: None,
        };
        let delta = |index: usize, role: Option<&'static str>, content: Option<String>, logprobs: Option<ChatLogprobs>, finish_reason: Option<&'static str>| ChatChoice {
            index, message: None, delta: Some(ChatMessageOut { role, content }), logprobs, finish_reason,
        };
        let mut tally = StreamTally::new(&valid);
        for index in 0..tally.total {
            let mut first = chunk(vec![delta(index, Some("assistant"), Some(String::new()), None, None)], None);
            if index == 0 && experience.is_some() {
                // The experience library used (issue 7) rides on the first chunk.
                first.ouro = Some(OuroResponse { experience: experience.clone(), ..OuroResponse::default() });
            }
            yield json(&first);
        }
        let mut events = std::pin::pin!(generate::events(sub));
        while let Some(item) = events.next().await {
            match item {
                Out::Token { index, text, logprob, drafted_by, .. } => {
                    let logprobs = match (&valid.logprobs, logprob) {
                        (LogprobFormat::Chat(_), Some(lp)) => Some(ChatLogprobs { content: vec![chat_logprob(&tok, &lp)] }),
                        _ => None,
                    };
                    if !text.is_empty() || logprobs.is_some() {
                        let mut c = chunk(vec![delta(index, None, Some(text), logprobs, None)], None);
                        // Per-token provenance (optional): which drafter proposed it.
                        c.ouro = drafted_by.map(|d| OuroResponse { drafted_by: Some(d.name()), ..OuroResponse::default() });
                        yield json(&c);
                    }
                }
                Out::Finish { index, event } => {
                    tally.done += 1;
                    tally.completion_tokens += event.completion_tokens;
                    if !event.text.is_empty() {
                        yield json(&chunk(vec![delta(index, None, Some(event.text), None, None)], None));
                    }
                    // The choice's timings and speculation statistics ride on its finish chunk.
                    let mut last = chunk(vec![delta(index, None, None, None, Some(event.reason.as_str()))], None);
                    let ms = |a: std::time::Instant, b: std::time::Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
                    let t = &event.timing;
                    last.ouro = Some(OuroResponse {
                        timing_ms: Some(TimingMs { queue: ms(t.queued, t.scheduled), ttft: ms(t.queued, t.first_token), total: ms(t.queued, t.finished) }),
                        spec: Some(spec_summary(&event.spec)),
                        ..OuroResponse::default()
                    });
                    yield json(&last);
                    if tally.done == tally.total {
                        break;
                    }
                }
                Out::Error(m) => {
                    yield stream_error(&m);
                    return;
                }
            }
        }
        if valid.include_usage {
            yield json(&chunk(Vec::new(), Some(tally.usage())));
        }
        yield "[DONE]".to_string();
    }
}

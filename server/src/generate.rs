//! Submitting a checked request to the engine and reading its answer back,
//! shared by the completion and chat routes.
//!
//! [`submit`] queues one engine request per prompt; [`events`] merges their
//! event channels into one stream of [`Out`] items whose `index` counts over
//! all prompts and choices (`prompt * n + choice`), recording metrics as the
//! events pass. Dropping the stream drops the channels, which cancels the
//! requests in the engine.

use std::collections::HashMap;
use std::time::Instant;

use engine::request::{Event, FinishEvent};
use engine::sampling::TokenLogprob;
use futures::stream::{self, Stream, StreamExt};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::errors::ApiError;
use crate::metrics;
use crate::state::AppState;
use crate::validate::ValidRequest;

/// One item of a merged answer.
#[derive(Debug, Clone)]
pub enum Out {
    /// A token of choice `index`.
    Token {
        /// Global choice index.
        index: usize,
        /// Token id.
        token: u32,
        /// Released text.
        text: String,
        /// Log-probabilities, when asked for.
        logprob: Option<TokenLogprob>,
        /// The drafter that proposed this token (accepted by the target);
        /// `None` when the target chose it itself.
        drafted_by: Option<engine::spec::DrafterKind>,
    },
    /// Choice `index` finished.
    Finish {
        /// Global choice index.
        index: usize,
        /// The engine's final event.
        event: FinishEvent,
    },
    /// The engine failed.
    Error(String),
}

/// The engine channels of a submitted request.
pub struct Submitted {
    streams: Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>,
    n: usize,
}

/// Queues every prompt of `req`. Nothing is queued if any submission fails.
pub fn submit(state: &AppState, req: &ValidRequest) -> Result<Submitted, ApiError> {
    let engine = state.engine()?;
    let mut streams = Vec::with_capacity(req.requests.len());
    for r in &req.requests {
        // Dropping the already-submitted receivers cancels them.
        streams.push(engine.submit(r.clone())?.events);
    }
    Ok(Submitted { streams, n: req.n })
}

/// The merged event stream of a submitted request.
pub fn events(sub: Submitted) -> impl Stream<Item = Out> + Send + 'static {
    let n = sub.n;
    let merged =
        stream::select_all(sub.streams.into_iter().enumerate().map(move |(p, rx)| UnboundedReceiverStream::new(rx).map(move |e| (p, e))));
    let mut last: HashMap<usize, Instant> = HashMap::new();
    merged.map(move |(p, e)| match e {
        Event::Token(t) => {
            let index = p * n + t.choice;
            let now = Instant::now();
            if let Some(prev) = last.insert(index, now) {
                metrics::record_token_gap(now - prev);
            }
            Out::Token { index, token: t.token, text: t.text, logprob: t.logprob, drafted_by: t.drafted_by }
        }
        Event::Finished(f) => {
            let index = p * n + f.choice;
            metrics::record_finished(&f.timing, f.reason.as_str(), f.prompt_tokens, f.completion_tokens, f.choice == 0);
            Out::Finish { index, event: f }
        }
        Event::Error(m) => Out::Error(m),
    })
}

/// Everything one choice produced.
#[derive(Debug, Clone, Default)]
pub struct ChoiceResult {
    /// The text.
    pub text: String,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Text released with each token.
    pub pieces: Vec<String>,
    /// Log-probabilities per token.
    pub logprobs: Vec<TokenLogprob>,
    /// The final event.
    pub finish: Option<FinishEvent>,
}

/// Reads a whole answer (non-streaming). Returns the choices in index order.
pub async fn collect(sub: Submitted, total: usize) -> Result<Vec<ChoiceResult>, ApiError> {
    let mut out = vec![ChoiceResult::default(); total];
    let mut done = 0;
    let mut events = std::pin::pin!(events(sub));
    while let Some(item) = events.next().await {
        match item {
            Out::Token { index, token, text, logprob, .. } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                c.tokens.push(token);
                c.pieces.push(text);
                c.logprobs.extend(logprob);
            }
            Out::Finish { index, event } => {
                let c = &mut out[index];
                c.text.push_str(&event.text);
                if let Some(last) = c.pieces.last_mut() {
                    last.push_str(&event.text);
                }
                c.finish = Some(event);
                done += 1;
                if done == total {
                    break;
                }
            }
            Out::Error(m) => return Err(ApiError::Internal(m)),
        }
    }
    if done < total {
        return Err(ApiError::Unavailable("the engine stopped before the answer was complete".into()));
    }
    Ok(out)
}

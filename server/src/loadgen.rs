//! A closed-loop HTTP load generator for a running `ouro serve`: N clients
//! each send streamed chat completions back to back, for a duration or a
//! number of requests, and the report keeps what an operator asks of a load
//! test: answers by status, admitted requests that failed, rejections that
//! were not a proper 429, TTFT, inter-token latency and end-to-end latency.
//! Used by `server/examples/load.rs` and the load test (issue 8).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `http://127.0.0.1:8000`.
    pub url: String,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Stop starting requests after this long (`None`: after `requests`).
    pub duration: Option<Duration>,
    /// Stop after this many requests (when no duration is given).
    pub requests: usize,
    /// `max_tokens` of each request.
    pub max_tokens: usize,
    /// Bearer key, if the server has keys.
    pub api_key: Option<String>,
    /// Every Nth request hangs up after its first content chunk (0: none).
    pub disconnect_every: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000".into(),
            concurrency: 8,
            duration: None,
            requests: 64,
            max_tokens: 32,
            api_key: None,
            disconnect_every: 0,
        }
    }
}

/// What happened.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Seconds from the first request to the last answer.
    pub wall_s: f64,
    /// Answers by HTTP status (or `error: ...` for transport errors).
    pub statuses: BTreeMap<String, usize>,
    /// Streams that ended with `[DONE]` and a finish reason.
    pub completed: usize,
    /// Streams this generator hung up on on purpose.
    pub disconnected: usize,
    /// 429 answers.
    pub rejected: usize,
    /// Admitted requests that failed (a non-2xx other than 429, a broken or
    /// unfinished stream, an error event), with what went wrong.
    pub failed: Vec<String>,
    /// 429 answers without `Retry-After` or without an OpenAI error body.
    pub bad_rejections: Vec<String>,
    /// Time to first content chunk, seconds.
    pub ttft: Vec<f64>,
    /// Gaps between content chunks, seconds.
    pub itl: Vec<f64>,
    /// End-to-end latency of completed streams, seconds.
    pub e2e: Vec<f64>,
    /// Generated tokens (from the streams' usage).
    pub tokens: usize,
}

/// The `p` quantile (0..1) of `v` (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

impl LoadReport {
    /// A few lines for a terminal.
    pub fn summary(&self, cfg: &LoadConfig) -> String {
        let ms = |v: &[f64], p| percentile(v, p) * 1e3;
        format!(
            "concurrency {}, max_tokens {}, {:.1} s\n\
             answers by status: {:?}\n\
             completed {}, hung up on purpose {}, rejected (429) {}, failed after admission {}, bad 429s {}\n\
             requests/s: {:.2}   generated tokens/s: {:.1}\n\
             TTFT p50 {:.0} ms, p99 {:.0} ms   ITL p50 {:.1} ms, p99 {:.1} ms   e2e p50 {:.0} ms, p99 {:.0} ms",
            cfg.concurrency,
            cfg.max_tokens,
            self.wall_s,
            self.statuses,
            self.completed,
            self.disconnected,
            self.rejected,
            self.failed.len(),
            self.bad_rejections.len(),
            self.completed as f64 / self.wall_s.max(1e-9),
            self.tokens as f64 / self.wall_s.max(1e-9),
            ms(&self.ttft, 0.5),
            ms(&self.ttft, 0.99),
            ms(&self.itl, 0.5),
            ms(&self.itl, 0.99),
            ms(&self.e2e, 0.5),
            ms(&self.e2e, 0.99),
        )
    }
}

const PROMPTS: &[&str] = &[
    "Explain why the sky is blue.",
    "Write a haiku about autumn.",
    "List three uses of a paperclip.",
    "What is the capital of France, and why is it famous?",
];

/// One request's outcome.
enum Outcome {
    Completed { ttft: Option<f64>, itl: Vec<f64>, e2e: f64, tokens: usize },
    HungUp { ttft: Option<f64>, itl: Vec<f64> },
    Rejected { problem: Option<String>, retry_after: Duration },
    Failed(String),
}

/// Runs the load and returns its report.
pub async fn run(cfg: &LoadConfig) -> LoadReport {
    let cfg = Arc::new(cfg.clone());
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(600)).build() {
        Ok(c) => c,
        Err(e) => return LoadReport { failed: vec![format!("cannot build an HTTP client: {e}")], ..Default::default() },
    };
    let next = Arc::new(AtomicUsize::new(0));
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cfg.concurrency.max(1) {
        let (cfg, client, next, report) = (cfg.clone(), client.clone(), next.clone(), report.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                match cfg.duration {
                    Some(d) if started.elapsed() >= d => break,
                    None if i >= cfg.requests => break,
                    _ => {}
                }
                let hang_up = cfg.disconnect_every > 0 && i % cfg.disconnect_every == cfg.disconnect_every - 1;
                let outcome = one(&client, &cfg, i, hang_up).await;
                let mut r = report.lock().await;
                match outcome {
                    Outcome::Completed { ttft, itl, e2e, tokens } => {
                        *r.statuses.entry("200".into()).or_default() += 1;
                        r.completed += 1;
                        r.ttft.extend(ttft);
                        r.itl.extend(itl);
                        r.e2e.push(e2e);
                        r.tokens += tokens;
                    }
                    Outcome::HungUp { ttft, itl } => {
                        *r.statuses.entry("200".into()).or_default() += 1;
                        r.disconnected += 1;
                        r.ttft.extend(ttft);
                        r.itl.extend(itl);
                    }
                    Outcome::Rejected { problem, retry_after } => {
                        *r.statuses.entry("429".into()).or_default() += 1;
                        r.rejected += 1;
                        r.bad_rejections.extend(problem);
                        drop(r);
                        // A polite client waits as told (capped, so the load stays high).
                        tokio::time::sleep(retry_after.min(Duration::from_millis(250))).await;
                    }
                    Outcome::Failed(why) => {
                        *r.statuses.entry(why.split(':').next().unwrap_or("failed").to_string()).or_default() += 1;
                        r.failed.push(why);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut r = report.lock().await.clone();
    r.wall_s = started.elapsed().as_secs_f64();
    r
}

async fn one(client: &reqwest::Client, cfg: &LoadConfig, i: usize, hang_up: bool) -> Outcome {
    let body = json!({"messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
                      "max_tokens": cfg.max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut req = client.post(format!("{}/v1/chat/completions", cfg.url)).json(&body);
    if let Some(k) = &cfg.api_key {
        req = req.bearer_auth(k);
    }
    let t0 = Instant::now();
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("transport error: {e}")),
    };
    let status = resp.status().as_u16();
    if status == 429 {
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let shaped = body["error"]["message"].is_string() && body["error"]["type"].is_string() && body["error"].get("code").is_some();
        let problem = match (retry_after, shaped) {
            (Some(_), true) => None,
            (None, _) => Some("429 without Retry-After".to_string()),
            (_, false) => Some(format!("429 without an OpenAI error body: {body}")),
        };
        return Outcome::Rejected { problem, retry_after: Duration::from_secs(retry_after.unwrap_or(1)) };
    }
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Outcome::Failed(format!("{status}: {text}"));
    }
    let mut stream = resp.bytes_stream();
    let (mut buf, mut ttft, mut last, mut itl) = (String::new(), None, None::<Instant>, Vec::new());
    let (mut done, mut finished, mut tokens) = (false, false, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Outcome::Failed(format!("stream broken: {e}")),
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => return Outcome::Failed(format!("bad stream chunk ({e}): {data}")),
            };
            if v.get("error").is_some() {
                return Outcome::Failed(format!("error event: {data}"));
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            let choice = &v["choices"][0];
            if choice["finish_reason"].is_string() {
                finished = true;
            }
            if choice["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                match last {
                    None => ttft = Some(now.duration_since(t0).as_secs_f64()),
                    Some(prev) => itl.push(now.duration_since(prev).as_secs_f64()),
                }
                last = Some(now);
                if hang_up {
                    // Dropping the stream closes the connection mid-answer.
                    return Outcome::HungUp { ttft, itl };
                }
            }
        }
    }
    if done && finished {
        Outcome::Completed { ttft, itl, e2e: t0.elapsed().as_secs_f64(), tokens }
    } else {
        Outcome::Failed(format!("stream ended early (done {done}, finish_reason {finished}): {buf}"))
    }
}

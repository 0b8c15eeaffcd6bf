//! A closed-loop load generator for a running `ouro serve`: `--concurrency`
//! clients each send streamed chat completions back to back until
//! `--requests` are done, then it prints requests/s, generated tokens/s,
//! TTFT and end-to-end latency percentiles, and answers by status.
//!
//! ```sh
//! cargo run --release -p ouro-server --example load -- \
//!     --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --max-tokens 32
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio::sync::Mutex;

struct Args {
    url: String,
    concurrency: usize,
    requests: usize,
    max_tokens: usize,
    api_key: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args { url: "http://127.0.0.1:8000".into(), concurrency: 8, requests: 64, max_tokens: 32, api_key: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value(),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency N"),
            "--requests" => a.requests = value().parse().expect("--requests N"),
            "--max-tokens" => a.max_tokens = value().parse().expect("--max-tokens N"),
            "--api-key" => a.api_key = Some(value()),
            other => panic!("unknown flag {other} (flags: --url --concurrency --requests --max-tokens --api-key)"),
        }
    }
    a
}

#[derive(Default)]
struct Results {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    tokens: usize,
    statuses: BTreeMap<String, usize>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

const PROMPTS: &[&str] = &[
    "Explain why the sky is blue.",
    "Write a haiku about autumn.",
    "List three uses of a paperclip.",
    "What is the capital of France, and why is it famous?",
];

#[tokio::main]
async fn main() {
    let args = Arc::new(parse_args());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build().unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Results::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (args, client, next, results) = (args.clone(), client.clone(), next.clone(), results.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= args.requests {
                    break;
                }
                let body = json!({"messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
                                  "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
                                  "stream_options": {"include_usage": true}});
                let mut req = client.post(format!("{}/v1/chat/completions", args.url)).json(&body);
                if let Some(k) = &args.api_key {
                    req = req.bearer_auth(k);
                }
                let t0 = Instant::now();
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => {
                        *results.lock().await.statuses.entry(format!("error: {e}")).or_default() += 1;
                        continue;
                    }
                };
                let status = resp.status().as_u16().to_string();
                if !resp.status().is_success() {
                    let _ = resp.bytes().await;
                    *results.lock().await.statuses.entry(status).or_default() += 1;
                    continue;
                }
                let mut stream = resp.bytes_stream();
                let (mut ttft, mut text) = (None, String::new());
                while let Some(chunk) = stream.next().await {
                    let Ok(chunk) = chunk else { break };
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    if ttft.is_none() && text.contains("\"content\":\"") && text.matches("data: ").count() >= 2 {
                        ttft = Some(t0.elapsed().as_secs_f64());
                    }
                }
                let e2e = t0.elapsed().as_secs_f64();
                let tokens = text
                    .split("\"completion_tokens\":")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut r = results.lock().await;
                r.ttft.extend(ttft);
                r.e2e.push(e2e);
                r.tokens += tokens;
                *r.statuses.entry(status).or_default() += 1;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let mut r = results.lock().await;
    let ok = r.e2e.len();
    println!("{} requests, concurrency {}, max_tokens {}, {:.1} s", args.requests, args.concurrency, args.max_tokens, wall);
    println!("answers by status: {:?}", r.statuses);
    println!("requests/s: {:.2}   generated tokens/s: {:.1}", ok as f64 / wall, r.tokens as f64 / wall);
    let (t50, t99) = (pct(&mut r.ttft, 0.5), pct(&mut r.ttft, 0.99));
    let (e50, e99) = (pct(&mut r.e2e, 0.5), pct(&mut r.e2e, 0.99));
    println!("TTFT p50 {:.0} ms, p99 {:.0} ms   e2e p50 {:.0} ms, p99 {:.0} ms", t50 * 1e3, t99 * 1e3, e50 * 1e3, e99 * 1e3);
}

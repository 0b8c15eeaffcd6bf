//! Production hardening end to end, on real `ouro serve` processes: API keys
//! (flag and file), CORS, the body limit (413), the concurrency cap (429
//! with Retry-After), the per-request timeout (504), request ids on every
//! answer and every JSON log line, and graceful shutdown on SIGTERM.
//!
//! Two servers: one shared by the request tests (which take turns: the
//! concurrency cap is 1), one that the shutdown test stops.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Server;
use futures::StreamExt;
use serde_json::{json, Value};

const KEY: &str = "sk-test-flag";
const FILE_KEY: &str = "sk-test-from-file";

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ouro-test-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn log_path() -> PathBuf {
    dir().join("server.log")
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let keys = dir().join("keys.txt");
        std::fs::write(&keys, format!("# test keys\n\n{FILE_KEY}\n")).unwrap();
        let keys = keys.display().to_string();
        let log = log_path();
        common::start_logged(
            &[
                "--kv-cache-bytes",
                "268435456",
                "--api-key",
                KEY,
                "--api-key-file",
                &keys,
                "--cors-allow-origin",
                "https://console.example",
                "--max-body-bytes",
                "4096",
                "--max-concurrent",
                "1",
                "--request-timeout-s",
                "3",
                "--log-format",
                "json",
            ],
            Some(&log),
        )
    })
}

/// The request tests take turns (the server runs one completion at a time).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

/// Checks an OpenAI error body and returns its `code`.
fn error_code(body: &Value) -> String {
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.as_object().unwrap().contains_key("param"), "{body}");
    e["code"].as_str().unwrap_or_else(|| panic!("no code: {body}")).to_string()
}

async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health_or_metrics() {
    let s = server();
    let _turn = SERIAL.lock().await;
    let c = client();
    let models = format!("{}/v1/models", s.base);
    let (st, h, body) = send(c.get(&models)).await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(error_code(&body), "invalid_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(h.contains_key("x-request-id"));
    let (st, _, body) = send(c.get(&models).bearer_auth("sk-wrong")).await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(send(c.get(&models).bearer_auth(KEY)).await.0, 200);
    assert_eq!(send(c.get(&models).bearer_auth(FILE_KEY)).await.0, 200);
    let (st, _, _) = send(c.post(format!("{}/tokenize", s.base)).json(&json!({"prompt": "hi"}))).await;
    assert_eq!(st, 401);
    let (st, _, body) = send(c.post(format!("{}/v1/chat/completions", s.base)).json(&chat(2, false))).await;
    assert_eq!(st, 401, "{body}");
    let (st, _, body) = send(c.post(format!("{}/v1/chat/completions", s.base)).bearer_auth(FILE_KEY).json(&chat(2, false))).await;
    assert_eq!(st, 200, "{body}");
    // /health and /metrics stay open; the admin API keeps its own key (none here: disabled).
    assert_eq!(common::raw_get(&s.addr, "/health").unwrap().0, 200);
    assert_eq!(common::raw_get(&s.addr, "/metrics").unwrap().0, 200);
    assert_eq!(send(c.get(format!("{}/admin/trainer", s.base)).bearer_auth(KEY)).await.0, 403);
}

#[tokio::test]
async fn cors_preflights_are_answered_for_allowed_origins_only() {
    let s = server();
    let c = client();
    let url = format!("{}/v1/chat/completions", s.base);
    let pre = |origin: &str| {
        c.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
    };
    let resp = pre("https://console.example").send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://console.example");
    let allowed = resp.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") || allowed == "*", "{allowed}");
    let resp = pre("https://evil.example").send().await.unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    let resp = c.get(format!("{}/v1/models", s.base)).header("origin", "https://console.example").bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://console.example");
    let exposed = resp.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(exposed.contains("x-request-id"), "{exposed}");
}

#[tokio::test]
async fn a_body_over_the_limit_gets_a_413_openai_error() {
    let s = server();
    let _turn = SERIAL.lock().await;
    let c = client();
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}], "max_tokens": 1});
    let (st, h, body) = send(c.post(format!("{}/v1/chat/completions", s.base)).bearer_auth(KEY).json(&big)).await;
    assert_eq!(st, 413, "{body}");
    assert_eq!(error_code(&body), "body_too_large");
    assert!(h.contains_key("x-request-id"));
}

#[tokio::test]
async fn past_max_concurrent_a_completion_gets_429_with_retry_after() {
    let s = server();
    let _turn = SERIAL.lock().await;
    let c = client();
    let url = format!("{}/v1/chat/completions", s.base);
    let resp = c.post(&url).bearer_auth(KEY).json(&chat(16, true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // The stream holds the only slot.
    let (st, h, body) = send(c.post(&url).bearer_auth(KEY).json(&chat(2, false))).await;
    assert_eq!(st, 429, "{body}");
    assert_eq!(error_code(&body), "overloaded");
    assert_eq!(h["retry-after"], "1");
    // Other routes are not capped.
    assert_eq!(send(c.get(format!("{}/v1/models", s.base)).bearer_auth(KEY)).await.0, 200);
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    // (On a busy machine --request-timeout-s may end the stream before [DONE].)
    assert!(text.starts_with("data: "), "{text}");
    // The slot is free again once the stream ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (st, _, body) = send(c.post(&url).bearer_auth(KEY).json(&chat(2, false))).await;
        if st == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {st} after the stream ended: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_request_past_the_timeout_gets_504_and_its_sequence_is_cancelled() {
    let s = server();
    let _turn = SERIAL.lock().await;
    let c = client();
    let started = Instant::now();
    let (st, _, body) = send(c.post(format!("{}/v1/chat/completions", s.base)).bearer_auth(KEY).json(&chat(4000, false))).await;
    let took = started.elapsed();
    assert_eq!(st, 504, "{body}");
    assert_eq!(error_code(&body), "request_timeout");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(10), "{took:?}");
    common::wait_metric(&s.addr, "ouro_num_requests_running", "", 0.0, Duration::from_secs(10)).expect("the sequence was not cancelled");
}

#[tokio::test]
async fn every_answer_carries_a_request_id_that_json_logs_carry_too() {
    let s = server();
    let c = client();
    let (st, h, _) = send(c.get(format!("{}/v1/models", s.base)).bearer_auth(KEY).header("x-request-id", "client-id-42")).await;
    assert_eq!(st, 200);
    assert_eq!(h["x-request-id"], "client-id-42");
    let (st, h, _) = send(c.get(format!("{}/no/such/route", s.base)).header("x-request-id", "bad id with spaces")).await;
    assert_eq!(st, 404);
    let generated = h["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32, "{generated}");
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    let (_, h2, _) = send(c.get(format!("{}/health", s.base))).await;
    assert_ne!(h2["x-request-id"], generated.as_str(), "ids must be fresh per request");
    // The JSON log has a line for the request, inside its span.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(log_path()).unwrap_or_default();
        let hit = log.lines().filter(|l| l.contains("client-id-42")).find_map(|l| serde_json::from_str::<Value>(l).ok());
        if let Some(line) = hit {
            assert_eq!(line["span"]["request_id"], "client-id-42", "{line}");
            assert_eq!(line["span"]["path"], "/v1/models", "{line}");
            assert_eq!(line["fields"]["status"], 200, "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no JSON log line carries the request id:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `pid` (a child of this process) to exit; its exit code.
fn wait_exit(pid: u32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r == pid as i32 {
            return Some(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) });
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_then_exits_0() {
    let log = dir().join("shutdown.log");
    let s = common::start_logged(
        &["--kv-cache-bytes", "268435456", "--api-key", KEY, "--protect-metrics", "--shutdown-grace", "10"],
        Some(&log),
    );
    let c = client();
    // --protect-metrics: /metrics needs a key, /health does not.
    assert_eq!(common::raw_get(&s.addr, "/metrics").unwrap().0, 401);
    assert_eq!(send(c.get(format!("{}/metrics", s.base)).bearer_auth(KEY)).await.0, 200);
    assert_eq!(common::raw_get(&s.addr, "/health").unwrap().0, 200);
    let resp = c.post(format!("{}/v1/chat/completions", s.base)).bearer_auth(KEY).json(&chat(48, true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()).to_string();
    let signalled = Instant::now();
    // SAFETY: sends SIGTERM to our own child.
    assert_eq!(unsafe { libc::kill(s.pid as i32, libc::SIGTERM) }, 0);
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream was cut")));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "the stream did not finish: {text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    let code = tokio::task::spawn_blocking(move || wait_exit(s.pid, Duration::from_secs(40))).await.unwrap();
    let took = signalled.elapsed();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "exit after SIGTERM: {code:?} in {took:?}; log:\n{log_text}");
    assert!(log_text.contains("shutting down") && log_text.contains("stopped"), "{log_text}");
    // The trainer's weights are checkpointed when it trained (on this busy
    // test machine it may not have taken a step yet).
    assert!(
        log_text.contains("speculator checkpointed") || log_text.contains("nothing to checkpoint"),
        "no speculator checkpoint decision at shutdown:\n{log_text}"
    );
    println!("SIGTERM to exit 0 with a 48-token stream running: {:.2} s", took.as_secs_f64());
}

#[tokio::test]
async fn past_the_shutdown_grace_running_streams_are_cancelled_and_the_exit_is_0() {
    let s = common::start(&["--kv-cache-bytes", "268435456", "--shutdown-grace", "1", "--trainer", "off"]);
    let c = client();
    let resp = c.post(format!("{}/v1/chat/completions", s.base)).json(&chat(4000, true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()).to_string();
    let signalled = Instant::now();
    // SAFETY: sends SIGTERM to our own child.
    assert_eq!(unsafe { libc::kill(s.pid as i32, libc::SIGTERM) }, 0);
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!text.contains("[DONE]"), "a 4000-token stream cannot finish within the 1 s grace");
    let code = tokio::task::spawn_blocking(move || wait_exit(s.pid, Duration::from_secs(30))).await.unwrap();
    let took = signalled.elapsed();
    assert_eq!(code, Some(0), "exit after SIGTERM past the grace: {code:?} in {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    println!("SIGTERM with a stream past a 1 s grace: exit 0 after {:.2} s", took.as_secs_f64());
}

//! The HTTP API end to end: a real `ouro serve` on the real model, real HTTP
//! on loopback, and real clients (reqwest, curl, the official `openai`
//! Python package). One shared server serves every test but the overload and
//! cancellation test, which needs its own tiny queue.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Server;
use futures::StreamExt;
use serde_json::{json, Value};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| common::start(&["--kv-cache-bytes", "1073741824", "--admin-key", ADMIN_KEY]))
}

const ADMIN_KEY: &str = "test-admin-key";

async fn post(path: &str, body: Value) -> (u16, Value) {
    let s = server();
    let resp = reqwest::Client::new().post(format!("{}{path}", s.base)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Posts a streaming request and returns the parsed `data:` chunks (without
/// the final `[DONE]`, which is checked).
async fn post_stream(path: &str, body: Value) -> Vec<Value> {
    let s = server();
    let resp = reqwest::Client::new().post(format!("{}{path}", s.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let datas: Vec<&str> = text.split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "stream must end with [DONE]: {text}");
    datas[..datas.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": server().model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 32});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn health_models_and_tokenizer_routes_answer() {
    let s = server();
    assert_eq!(common::raw_get(&s.addr, "/health").unwrap().0, 200);
    let models: Value = reqwest::get(format!("{}/v1/models", s.base)).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], s.model);
    assert_eq!(models["data"][0]["max_model_len"], 8192);
    let (st, tok) = post("/tokenize", json!({"prompt": "Hello, world!"})).await;
    assert_eq!(st, 200);
    assert_eq!(tok["tokens"], json!([19556, 28, 905, 17]));
    let (st, de) = post("/detokenize", json!({"tokens": [19556, 28, 905, 17]})).await;
    assert_eq!(st, 200);
    assert_eq!(de["prompt"], "Hello, world!");
    let (_, chat_tok) = post("/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(chat_tok["count"].as_u64().unwrap() as usize, chat_tok["tokens"].as_array().unwrap().len());
}

#[tokio::test]
async fn chat_streaming_and_non_streaming_give_the_same_text() {
    let (st, full) = post("/v1/chat/completions", chat_body("Explain why the sky is blue.", json!({}))).await;
    assert_eq!(st, 200, "{full}");
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.to_lowercase().contains("sky"), "{text}");
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["usage"]["completion_tokens"], 32);
    assert_eq!(full["usage"]["total_tokens"].as_u64(), Some(full["usage"]["prompt_tokens"].as_u64().unwrap() + 32));
    let chunks = post_stream(
        "/v1/chat/completions",
        chat_body("Explain why the sky is blue.", json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)?.get("delta")?.get("content")?.as_str()).collect();
    assert_eq!(streamed, text);
    let finish: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)?.get("finish_reason")).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &full["usage"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn completions_streaming_and_non_streaming_give_the_same_text() {
    let body = json!({"model": server().model, "prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0});
    let (st, full) = post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{full}");
    assert_eq!(full["object"], "text_completion");
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let mut sb = body;
    sb["stream"] = json!(true);
    let chunks = post_stream("/v1/completions", sb).await;
    let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)?.get("text")?.as_str()).collect();
    assert_eq!(streamed, text);
}

#[tokio::test]
async fn greedy_http_answers_are_deterministic_under_concurrency() {
    let body = chat_body("Write a haiku about autumn leaves.", json!({"max_tokens": 24}));
    let (_, first) = post("/v1/chat/completions", body.clone()).await;
    // Eight copies at once share engine steps; every one must match.
    let answers = futures::future::join_all((0..8).map(|_| post("/v1/chat/completions", body.clone()))).await;
    for (st, a) in answers {
        assert_eq!(st, 200);
        assert_eq!(a["choices"][0]["message"]["content"], first["choices"][0]["message"]["content"]);
    }
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_and_n_gives_distinct_choices() {
    let body = chat_body("Name an animal.", json!({"temperature": 1.0, "seed": 1234, "n": 3, "max_tokens": 10}));
    let (st, a) = post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{a}");
    let (_, b) = post("/v1/chat/completions", body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(a["choices"], b["choices"]);
    let texts: Vec<&str> = a["choices"].as_array().unwrap().iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert!(texts.iter().any(|t| *t != texts[0]), "{texts:?}");
}

#[tokio::test]
async fn logprobs_have_the_openai_shapes() {
    let (st, c) = post("/v1/chat/completions", chat_body("Say yes.", json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 4}))).await;
    assert_eq!(st, 200, "{c}");
    let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["top_logprobs"][0]["token"], t["token"]);
    }
    let (st, p) = post("/v1/completions", json!({"prompt": "One, two,", "max_tokens": 3, "temperature": 0, "logprobs": 2})).await;
    assert_eq!(st, 200, "{p}");
    let lp = &p["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test]
async fn stop_strings_cut_the_text_and_report_stop() {
    let (_, full) = post("/v1/completions", json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 20, "temperature": 0})).await;
    let text = full["choices"][0]["text"].as_str().unwrap();
    let at = text.find('7').unwrap_or_else(|| panic!("no 7 in {text:?}"));
    let (_, stopped) =
        post("/v1/completions", json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 20, "temperature": 0, "stop": ["7"]})).await;
    assert_eq!(stopped["choices"][0]["text"], text[..at]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn bad_input_gets_a_400_openai_error_naming_the_field() {
    let s = server();
    let client = reqwest::Client::new();
    // Malformed JSON.
    let r = client
        .post(format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["code"], "invalid_json");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), "temperature"),
        ("/v1/chat/completions", json!({"messages": "hello"}), "messages"),
        ("/v1/chat/completions", json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), "model"),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        ("/v1/chat/completions", json!({"temperature": 0}), "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}), "temperature"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}), "max_tokens"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), "max_tokens"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}), "top_p"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "n": 0}), "n"),
        // This server has no TCA budgets.
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "ouro": {"kv_compression": "tca"}}),
            "ouro.kv_compression",
        ),
        ("/v1/completions", json!({"prompt": "hi", "ouro": {"kv_compression": "sparse"}}), "ouro.kv_compression"),
        ("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30, "logprobs": true}),
            "top_logprobs",
        ),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "word ".repeat(9000)}]}), "messages"),
        ("/v1/completions", json!({"prompt": "word ".repeat(9000)}), "prompt"),
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 9000}), "max_tokens"),
        ("/v1/completions", json!({"prompt": [999999]}), "prompt"),
        ("/v1/completions", json!({"prompt": ""}), "prompt"),
        ("/v1/completions", json!({"prompt": "hi", "logprobs": 50}), "logprobs"),
        ("/detokenize", json!({"tokens": [1, 99999999]}), "tokens[1]"),
    ];
    for (path, body, param) in cases {
        let (st, e) = post(path, body.clone()).await;
        assert_eq!(st, 400, "{path} {body}: {e}");
        let err = &e["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert_eq!(err["type"], "invalid_request_error", "{e}");
        assert_eq!(err["param"], param, "{path} {body}: {e}");
        assert!(err.get("code").is_some());
    }
    // Unknown route: an OpenAI-shaped 404.
    let r = client.get(format!("{}/v1/nothing", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].is_string());
    // The server is still fine.
    let (st, _) = post("/v1/completions", json!({"prompt": "ok", "max_tokens": 1})).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn curl_streams_a_chat_completion() {
    let s = server();
    let body = chat_body("Say hello.", json!({"stream": true, "max_tokens": 8})).to_string();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "-H", "content-type: application/json", "-d", &body, &format!("{}/v1/chat/completions", s.base)])
        .output()
        .await
        .expect("curl must be installed");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_vllm_names() {
    let s = server();
    let (st, _) = post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 2})).await;
    assert_eq!(st, 200);
    let (code, body) = common::raw_get(&s.addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "ouro_time_to_first_token_seconds_bucket",
        "ouro_e2e_request_latency_seconds_count",
        "ouro_generation_tokens_total",
        "ouro_request_success_total",
        "ouro_num_requests_running",
        "ouro_kv_cache_usage_perc",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    assert!(common::metric(&s.addr, "ouro_generation_tokens_total", "model_name").unwrap() >= 2.0);
}

#[test]
fn openapi_spec_lists_exactly_the_served_routes() {
    let spec: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(common::root().join("openapi.yaml")).unwrap()).unwrap();
    let mut in_spec: Vec<(String, String)> = Vec::new();
    for (path, item) in spec["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if ["parameters", "summary", "description", "servers"].contains(&method) {
                continue; // path-item fields, not operations
            }
            in_spec.push((path.as_str().unwrap().to_string(), method.to_string()));
        }
    }
    let mut served: Vec<(String, String)> = server::ROUTES.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    in_spec.sort();
    served.sort();
    assert_eq!(in_spec, served);
}

#[test]
fn the_openai_python_client_drives_the_server() {
    let s = server();
    let python = std::env::var("OURO_PYTHON").map(std::path::PathBuf::from).unwrap_or_else(|_| common::root().join(".venv/bin/python"));
    assert!(python.exists(), "{} not found: run scripts/test.sh (it creates .venv with the openai and pytest packages)", python.display());
    let out = std::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(common::root().join("server/tests/python"))
        .env("OURO_BASE_URL", &s.base)
        .env("OURO_MODEL_NAME", &s.model)
        .output()
        .unwrap();
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pytest failed:\n{log}");
    assert!(log.contains("passed"), "{log}");
}

/// A server with one running slot and a one-request queue.
fn tight_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| common::start(&["--max-running", "1", "--max-waiting", "1", "--kv-cache-bytes", "268435456"]))
}

#[tokio::test]
async fn a_full_queue_answers_429_and_disconnects_cancel_sequences() {
    let s = tight_server();
    let long = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "temperature": 0, "stream": true});
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", s.base);
    // A takes the one running slot; wait for its first chunk.
    let a = client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(a.status(), 200);
    let mut a_body = a.bytes_stream();
    a_body.next().await.unwrap().unwrap();
    common::wait_metric(&s.addr, "ouro_num_requests_running", "model_name", 1.0, Duration::from_secs(10)).expect("A is not running");
    // B waits in the queue (its headers come at once; its tokens later).
    let b = client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(b.status(), 200);
    common::wait_metric(&s.addr, "ouro_num_requests_waiting", "model_name", 1.0, Duration::from_secs(10)).expect("B never queued");
    // C finds the queue full.
    let c = client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(c.status(), 429);
    assert_eq!(c.headers()["retry-after"], "1");
    let e: Value = c.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(e["error"]["code"], "overloaded");
    // Both clients leave.
    drop(a_body);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = common::metric(&s.addr, "ouro_num_requests_running", "model_name");
        let waiting = common::metric(&s.addr, "ouro_num_requests_waiting", "model_name");
        let kv = common::metric(&s.addr, "ouro_kv_cache_bytes", "model_name");
        if running == Some(0.0) && waiting == Some(0.0) && kv == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "sequences not cancelled: running {running:?} waiting {waiting:?} kv {kv:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(common::metric(&s.addr, "ouro_request_errors_total", "overloaded").unwrap() >= 1.0);
}

async fn admin(method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let s = server();
    let c = reqwest::Client::new();
    let mut rb = match method {
        "GET" => c.get(format!("{}{path}", s.base)),
        _ => c.post(format!("{}{path}", s.base)),
    };
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_admin_api_needs_its_key_and_steers_the_speculator() {
    // No key, a wrong key: 401 with an OpenAI error body.
    for key in [None, Some("wrong")] {
        let (st, e) = admin("GET", "/admin/trainer", key, None).await;
        assert_eq!(st, 401, "{e}");
        assert_eq!(e["error"]["type"], "authentication_error");
    }
    let k = Some(ADMIN_KEY);
    let (st, view) = admin("GET", "/admin/speculator", k, None).await;
    assert_eq!(st, 200, "{view}");
    let serving = view["serving_version"].as_u64().unwrap();
    assert!(view["history"].as_array().unwrap().iter().any(|h| h["event"] == "initial"));
    let (_, t) = admin("POST", "/admin/trainer/pause", k, None).await;
    assert_eq!(t["paused"], true);
    let (_, t) = admin("GET", "/admin/trainer", k, None).await;
    assert_eq!(t["paused"], true);
    assert!(t["alive"].as_bool().unwrap());
    let (_, t) = admin("POST", "/admin/trainer/resume", k, None).await;
    assert_eq!(t["paused"], false);
    // A snapshot is a new version on disk; a forced swap serves it; a
    // rollback returns to the previous one.
    let (st, snap) = admin("POST", "/admin/speculator/snapshot", k, None).await;
    assert_eq!(st, 200, "{snap}");
    let (_, view) = admin("GET", "/admin/speculator", k, None).await;
    let snap_v = view["history"].as_array().unwrap().iter().rev().find(|h| h["event"] == "snapshot").unwrap()["version"].as_u64().unwrap();
    assert!(snap_v > serving);
    let (st, r) = admin("POST", "/admin/speculator/swap", k, Some(json!({"version": snap_v, "force": true}))).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["serving_version"], snap_v);
    let (st, r) = admin("POST", "/admin/speculator/rollback", k, None).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["serving_version"], serving);
    // Swapping to a version that does not exist is a clear 400.
    let (st, e) = admin("POST", "/admin/speculator/swap", k, Some(json!({"version": 987654}))).await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("987654") || e["error"]["message"].as_str().unwrap().contains("v987654"),
        "{e}"
    );
    // Generation still works and reports its speculation statistics.
    let (st, c) = post("/v1/chat/completions", chat_body("Repeat: a b c a b c a b c", json!({"max_tokens": 16}))).await;
    assert_eq!(st, 200);
    assert!(c["ouro"]["spec"]["drafted"].is_u64(), "{c}");
    // Trainer metrics are exported.
    let (_, body) = common::raw_get(&server().addr, "/metrics").unwrap();
    for name in [
        "ouro_speculator_version",
        "ouro_trainer_steps_total",
        "ouro_trainer_traces_received_total",
        "ouro_trainer_replay_bytes",
        "ouro_spec_decode_num_drafts_total",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
}

#[tokio::test]
async fn without_an_admin_key_the_admin_api_is_disabled() {
    let s = tight_server();
    let r = reqwest::Client::new().get(format!("{}/admin/trainer", s.base)).bearer_auth("anything").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("--admin-key"));
}

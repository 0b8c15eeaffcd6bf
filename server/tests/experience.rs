//! Experience libraries (Training-Free GRPO) end to end on the real model:
//! edits and versions over HTTP, injection into chat prompts, a learn job
//! that rolls out, distils with the served model and gates on held-out
//! prompts, online feedback, cancellation, the metrics, where each version
//! came from, and a restart that finds every version on disk (after
//! migrating a database of the previous schema).
//!
//! The server has no keys (local use): every write is open and recorded as
//! `anonymous`; the key rules are tested in `hardening.rs`.
//!
//! One server (trainer off, so the learn job has the CPU) serves every test
//! but the restart test, which starts and kills its own.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    // Speculation off: sampled rollouts then depend on their seeds alone
    // (rejection sampling draws differently with every draft), so the
    // learn job below is reproducible.
    S.get_or_init(|| common::start(&["--trainer", "off", "--speculation", "off"]))
}

async fn call(s: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", s.base));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    call(server(), reqwest::Method::POST, path, Some(body)).await
}

async fn get(path: &str) -> (u16, Value) {
    call(server(), reqwest::Method::GET, path, None).await
}

fn assert_openai_error(body: &Value, param: &str) {
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string() && e.get("code").is_some(), "{body}");
    assert_eq!(e["param"], param, "{body}");
}

/// Waits until the job leaves `queued`/`running`; returns its last status.
async fn wait_job(s: &Server, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (st, job) = call(s, reqwest::Method::GET, &format!("/v1/experiences/jobs/{id}"), None).await;
        assert_eq!(st, 200, "{job}");
        if !matches!(job["state"].as_str(), Some("queued" | "running")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} still {} after {timeout:?}: {job}", job["state"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn edits_write_versions_and_rollback_restores_items() {
    let name = "edits";
    let (st, v1) = post(&format!("/v1/experiences/{name}/items"), json!({"text": "Always write the final answer inside a box."})).await;
    assert_eq!(st, 201, "{v1}");
    let (_, v2) = post(&format!("/v1/experiences/{name}/items"), json!({"text": "Check every sum twice before you answer."})).await;
    assert_eq!(v2["version"].as_u64(), Some(v1["version"].as_u64().unwrap() + 1));
    assert_eq!(v2["items"].as_array().unwrap().len(), 2);
    let id = v2["items"][0]["id"].as_u64().unwrap();
    let (st, v3) = call(
        server(),
        reqwest::Method::PATCH,
        &format!("/v1/experiences/{name}/items/{id}"),
        Some(json!({"text": "Always put the final number inside \\boxed{}."})),
    )
    .await;
    assert_eq!(st, 200, "{v3}");
    assert_eq!(v3["items"][0]["id"].as_u64(), Some(id), "an edit keeps the id");
    assert_eq!(v3["items"][0]["text"], "Always put the final number inside \\boxed{}.");
    let (st, v4) = call(server(), reqwest::Method::DELETE, &format!("/v1/experiences/{name}/items/{id}"), None).await;
    assert_eq!(st, 200);
    assert_eq!(v4["items"].as_array().unwrap().len(), 1);
    // Roll back to v2: a new version with v2's items and ids.
    let (st, v5) = post(&format!("/v1/experiences/{name}/rollback"), json!({"version": v2["version"]})).await;
    assert_eq!(st, 200, "{v5}");
    assert_eq!(v5["version"].as_u64(), Some(v4["version"].as_u64().unwrap() + 1));
    let id_text = |v: &Value| -> Vec<(u64, String)> {
        v["items"].as_array().unwrap().iter().map(|i| (i["id"].as_u64().unwrap(), i["text"].as_str().unwrap().to_string())).collect()
    };
    assert_eq!(id_text(&v5), id_text(&v2), "rollback restores the items with their ids");
    let (_, old) = get(&format!("/v1/experiences/{name}/versions/{}", v3["version"])).await;
    assert_eq!(old["items"][0]["text"], "Always put the final number inside \\boxed{}.");
    let (_, list) = get("/v1/experiences").await;
    assert!(list["data"].as_array().unwrap().iter().any(|l| l["name"] == name));
    // Each version records its source and who made it (no keys here: anonymous), with its time.
    let (_, view) = get(&format!("/v1/experiences/{name}")).await;
    let origins: Vec<(u64, &str, &str)> = view["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["source"].as_str().unwrap(), v["actor"].as_str().unwrap_or("?")))
        .collect();
    let at = |v: &Value| v["version"].as_u64().unwrap();
    assert_eq!(
        origins,
        vec![
            (at(&v5), "rollback", "anonymous"),
            (at(&v4), "edit", "anonymous"),
            (at(&v3), "edit", "anonymous"),
            (at(&v2), "edit", "anonymous"),
            (at(&v1), "edit", "anonymous"),
            (0, "create", "anonymous")
        ]
    );
    assert!(view["versions"].as_array().unwrap().iter().all(|v| v["created_at"].as_u64().unwrap() >= v1["created_at"].as_u64().unwrap()));

    // Bad input: clear OpenAI errors naming the field.
    let (st, e) = post(&format!("/v1/experiences/{name}/items"), json!({"text": "too short"})).await;
    assert_eq!(st, 400);
    assert_openai_error(&e, "text");
    let (st, e) = post("/v1/experiences/bad name/items", json!({"text": "four words right here"})).await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = post(&format!("/v1/experiences/{name}/rollback"), json!({"version": 999})).await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = get("/v1/experiences/no-such-library").await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = post(&format!("/v1/experiences/{name}/learn"), json!({"dataset": [], "verifier": "boxed"})).await;
    assert_eq!(st, 400);
    assert_openai_error(&e, "dataset");
    let (st, e) = post(&format!("/v1/experiences/{name}/learn"), json!({"dataset": boxed_arithmetic(4, 1), "verifier": "telepathy"})).await;
    assert_eq!(st, 400);
    assert_openai_error(&e, "verifier");
}

#[tokio::test]
async fn chat_requests_get_the_library_in_their_system_prompt() {
    let name = "inject";
    let (st, lib) = post(&format!("/v1/experiences/{name}/items"), json!({"text": "Answer every question with exactly one word."})).await;
    assert_eq!(st, 201);
    let body = |exp: Option<&str>| {
        let mut b = json!({"messages": [{"role": "user", "content": "What color is the sky?"}], "max_tokens": 8, "temperature": 0});
        if let Some(e) = exp {
            b["ouro"] = json!({"experience": e});
        }
        b
    };
    let (st, with) = post("/v1/chat/completions", body(Some(name))).await;
    assert_eq!(st, 200, "{with}");
    assert_eq!(with["ouro"]["experience"], json!({"name": name, "version": lib["version"]}));
    let (_, without) = post("/v1/chat/completions", body(None)).await;
    assert!(without["ouro"].get("experience").is_none_or(Value::is_null));
    // The injected block really reaches the model: the prompt grows.
    let (with_p, without_p) = (with["usage"]["prompt_tokens"].as_u64().unwrap(), without["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(with_p > without_p + 10, "prompt tokens with the library {with_p}, without {without_p}");
    let (st, e) = post("/v1/chat/completions", body(Some("no-such-library"))).await;
    assert_eq!(st, 400, "{e}");
    assert_openai_error(&e, "ouro.experience");
}

/// Sums, differences and products that ask for a boxed answer (the 135M
/// model seldom boxes unasked-for, and does not box more when only told to):
/// `n` rows from `seed`.
fn boxed_arithmetic(n: usize, seed: u64) -> Vec<Value> {
    let mut x = seed;
    let mut next = |m: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    (0..n)
        .map(|_| {
            let (a, b) = (2 + next(29) as i64, 2 + next(29) as i64);
            let (op, ans) = match next(3) {
                0 => ("+", a + b),
                1 => ("-", a - b),
                _ => ("times", a * b),
            };
            json!({"prompt": format!("What is {a} {op} {b}? Put the final answer in \\boxed{{}}."), "answer": ans.to_string()})
        })
        .collect()
}

/// The learning loop on the real model, and its gain: rollouts, distillation
/// by the served model, the held-out gate, versions; then the held-out reward
/// with the learned library is higher than without it (sampled evaluation,
/// the same seeds for both). The 135M distiller seldom names the format
/// rule, so what carries the gain is the worked example each experience
/// holds (`contrast::with_example`). `bench/experience.sh` measures the curve
/// over more prompts and epochs.
#[tokio::test]
async fn a_learn_job_rolls_out_distils_gates_and_improves_heldout_reward() {
    let s = server();
    let name = "learned";
    let req = json!({
        "dataset": boxed_arithmetic(36, 7),
        "verifier": {"type": "regex", "pattern": "\\\\boxed\\{\\s*-?\\d+\\s*\\}"},
        "group_size": 4, "epochs": 2, "batch_size": 4, "max_tokens": 48, "temperature": 0.7, "heldout_size": 12,
        "eval_temperature": 0.7, "eval_samples": 4, "seed": 7,
    });
    let (st, job) = post(&format!("/v1/experiences/{name}/learn"), req).await;
    assert_eq!(st, 202, "{job}");
    assert_eq!(job["train_size"], 24);
    assert_eq!(job["heldout_size"], 12);
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_job(s, &id, Duration::from_secs(900)).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["progress"], 1.0);
    assert_eq!(done["step"], 12);
    let reports = done["epoch_reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "{done}");
    let without = done["heldout_reward_without_library"].as_f64().expect("held-out reward without the library");
    let end = reports[1]["heldout_reward"].as_f64().expect("held-out reward at the end of the last epoch");
    assert!((0.0..=1.0).contains(&without) && (0.0..=1.0).contains(&end));
    let per_epoch: Vec<String> = reports.iter().map(|r| format!("{}: {} (v{})", r["epoch"], r["heldout_reward"], r["version"])).collect();
    eprintln!("held-out reward: {without:.3} without the library, {end:.3} with it; per epoch {per_epoch:?}");
    assert!(end > without, "the learned library did not raise the held-out reward: {end} <= {without}\n{done}");
    let gates = done["gates"].as_array().unwrap();
    for g in gates {
        let (cur, cand, margin) =
            (g["current_reward"].as_f64().unwrap(), g["candidate_reward"].as_f64().unwrap(), g["margin"].as_f64().unwrap());
        assert_eq!(g["accepted"].as_bool().unwrap(), cand >= cur - margin - 1e-6, "gate decision disagrees with its numbers: {g}");
    }
    assert!(end >= without - 0.02 - 1e-6, "the gate kept a library worse than none: {end} < {without}");
    // Every version the job reports exists and was written by `learn`, recording the job.
    let (_, lib) = get(&format!("/v1/experiences/{name}")).await;
    for v in done["versions"].as_array().unwrap() {
        let info = lib["versions"].as_array().unwrap().iter().find(|x| x["version"] == *v).expect("a reported version is kept");
        assert_eq!(info["source"], "learn");
        assert_eq!(info["job_id"].as_str(), Some(id.as_str()), "{info}");
        assert_eq!(info["actor"], "anonymous", "{info}");
    }
    assert!(!done["versions"].as_array().unwrap().is_empty(), "the job kept no version: {done}");
    assert_eq!(done["started_by"], "anonymous");
    let learned = common::metric(&s.addr, "ouro_experience_versions_total", "source=\"learn\"").unwrap_or(0.0);
    assert!(learned >= done["versions"].as_array().unwrap().len() as f64, "ouro_experience_versions_total{{source=learn}} = {learned}");
    assert_eq!(lib["version"], reports[1]["version"]);
    // Per-step reports name what the distiller did.
    assert_eq!(done["steps"].as_array().unwrap().len(), 12);
    assert_eq!(common::metric(&s.addr, "ouro_experience_jobs", "state=\"done\"").map(|v| v >= 1.0), Some(true));
    assert_eq!(common::metric(&s.addr, "ouro_experience_library_version", &format!("library=\"{name}\"")), lib["version"].as_f64());
}

#[tokio::test]
async fn a_cancelled_job_stops_and_feedback_feeds_the_library() {
    let s = server();
    let req =
        json!({"dataset": boxed_arithmetic(40, 5), "verifier": "boxed", "group_size": 2, "epochs": 3, "max_tokens": 16, "gate": false});
    let (st, job) = post("/v1/experiences/cancelme/learn", req).await;
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let (st, c) = call(s, reqwest::Method::DELETE, &format!("/v1/experiences/jobs/{id}"), None).await;
    assert_eq!(st, 200, "{c}");
    let end = wait_job(s, id, Duration::from_secs(120)).await;
    assert_eq!(end["state"], "cancelled", "{end}");
    let (st, e) = call(s, reqwest::Method::GET, "/v1/experiences/jobs/nope", None).await;
    assert_eq!(st, 404, "{e}");

    // Feedback on an n > 1 answer: a mixed group is queued for distillation.
    let (st, chat) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "n": 3, "max_tokens": 12, "temperature": 0.9, "seed": 4,
               "ouro": {"experience": "edits-free"}}),
    )
    .await;
    // An unknown library is refused before generation.
    assert_eq!(st, 400, "{chat}");
    assert_openai_error(&chat, "ouro.experience");
    let (st, _) = post("/v1/experiences/fb/items", json!({"text": "Give the sum as a single number."})).await;
    assert_eq!(st, 201);
    let (st, chat) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "n": 3, "max_tokens": 12, "temperature": 0.9, "seed": 4,
               "ouro": {"experience": "fb"}}),
    )
    .await;
    assert_eq!(st, 200, "{chat}");
    let chat_id = chat["id"].as_str().unwrap();
    let (st, e) = post("/v1/feedback", json!({"id": chat_id, "rewards": [1.0, 0.0]})).await;
    assert_eq!(st, 400, "one reward per choice: {e}");
    let (st, e) = post("/v1/feedback", json!({"id": chat_id, "rewards": [1.0, 0.0, 2.0]})).await;
    assert_eq!(st, 400, "rewards are in [0, 1]: {e}");
    let (st, e) = post("/v1/feedback", json!({"id": "chatcmpl-unknown", "rewards": [1.0, 0.0, 0.0]})).await;
    assert_eq!(st, 404, "{e}");
    let (st, ack) = post("/v1/feedback", json!({"id": chat_id, "rewards": [1.0, 0.0, 0.0]})).await;
    assert_eq!(st, 200, "{ack}");
    assert_eq!(ack["library"], "fb");
    assert_eq!(ack["mixed"], true);
    assert_eq!(ack["queued"], true);
    // The feedback step runs in the background: it either writes a version or counts why not.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, lib) = get("/v1/experiences/fb").await;
        if lib["feedback"]["steps"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(lib["feedback"]["groups_used"].as_u64(), Some(1), "{lib}");
            // A version the feedback wrote records its batch and raters.
            for v in lib["feedback"]["versions"].as_array().unwrap() {
                let info = lib["versions"].as_array().unwrap().iter().find(|x| x["version"] == *v).expect("a feedback version is kept");
                assert_eq!(info["source"], "feedback", "{info}");
                assert!(info["feedback_batch"].as_str().is_some_and(|b| b.starts_with("fb-")), "{info}");
                assert_eq!(info["actor"], "anonymous", "{info}");
                assert!(info["note"].as_str().unwrap().contains(chat_id), "{info}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "feedback never distilled: {lib}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn libraries_survive_a_kill_and_restart() {
    let state = common::fresh_state_dir();
    // The first start finds a store of the previous schema and migrates it.
    std::fs::create_dir_all(&state).unwrap();
    rusqlite::Connection::open(state.join("experiences.sqlite"))
        .unwrap()
        .execute_batch(trainer::experience::store::SCHEMA_1_EXAMPLE)
        .unwrap();
    let a = common::start_in(&["--trainer", "off"], &state, None);
    let base = |s: &Server, p: &str| format!("{}{p}", s.base);
    let c = reqwest::Client::new();
    let legacy: Value = c.get(base(&a, "/v1/experiences/legacy")).send().await.unwrap().json().await.unwrap();
    assert_eq!((legacy["version"].as_u64(), legacy["items"][0]["text"].as_str()), (Some(1), Some("Write every answer in plain words.")));
    assert_eq!(legacy["versions"].as_array().unwrap().len(), 2, "{legacy}");
    assert!(legacy["versions"].as_array().unwrap().iter().all(|v| v["actor"].is_null() && v["job_id"].is_null()), "{legacy}");
    let r = c.post(base(&a, "/v1/experiences/legacy/items")).json(&json!({"text": "Check the question once more."})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    for text in ["Read the whole question before answering it.", "Write the final answer on its own line."] {
        let r = c.post(base(&a, "/v1/experiences/kept/items")).json(&json!({"text": text})).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    let before: Value = c.get(base(&a, "/v1/experiences/kept")).send().await.unwrap().json().await.unwrap();
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(a.pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let b = common::start_in(&["--trainer", "off"], &state, None);
    let after: Value = c.get(base(&b, "/v1/experiences/kept")).send().await.unwrap().json().await.unwrap();
    assert_eq!(after["version"], before["version"]);
    assert_eq!(after["items"], before["items"]);
    assert_eq!(after["versions"], before["versions"]);
    let legacy: Value = c.get(base(&b, "/v1/experiences/legacy")).send().await.unwrap().json().await.unwrap();
    let sources: Vec<(&str, &Value)> =
        legacy["versions"].as_array().unwrap().iter().map(|v| (v["source"].as_str().unwrap(), &v["actor"])).collect();
    assert_eq!(sources, vec![("edit", &json!("anonymous")), ("edit", &Value::Null), ("create", &Value::Null)], "{legacy}");
    unsafe { libc::kill(b.pid as i32, libc::SIGTERM) };
    let _ = std::fs::remove_dir_all(&state);
}

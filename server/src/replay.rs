//! `ouro replay`: drives a running server with a stream of prompts from two
//! domains (Python code questions, then arithmetic word problems), one
//! request at a time, and records per request the mean acceptance length,
//! the decode speed and the serving speculator version, into a CSV.
//! `bench/plot_replay.py` turns the CSVs of several configurations into a
//! summary table and a PNG of the learning curves.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

/// `ouro replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The server (`http://127.0.0.1:8000`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Label of this configuration (off, ngram, static, online).
    #[arg(long)]
    pub label: String,
    /// Prompts per domain.
    #[arg(long, default_value_t = 300)]
    pub per_domain: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// `ouro.speculation` sent with each request (off, ngram, speculator, auto).
    #[arg(long, default_value = "auto")]
    pub speculation: String,
    /// Admin key, to read the serving speculator version.
    #[arg(long, env = "OURO_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Idle time between requests (users think), in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// CSV to write.
    #[arg(long)]
    pub out: PathBuf,
}

const NAMES: &[&str] = &[
    "total",
    "average",
    "largest",
    "smallest",
    "count_words",
    "reverse_text",
    "is_even",
    "is_prime",
    "square",
    "cube",
    "mean",
    "median",
    "unique",
    "flatten",
    "merge",
    "capitalize",
    "count_vowels",
    "fibonacci",
    "factorial",
    "gcd",
];
const TASKS: &[&str] = &[
    "returns the sum of a list of numbers",
    "returns the average of a list of numbers",
    "returns the largest number in a list",
    "returns the smallest number in a list",
    "counts the words in a string",
    "reverses a string",
    "checks whether a number is even",
    "checks whether a number is prime",
    "returns the square of a number",
    "returns the cube of a number",
    "returns the mean of a list of floats",
    "returns the median of a list of numbers",
    "returns the unique items of a list",
    "flattens a list of lists",
    "merges two sorted lists",
    "capitalizes every word in a sentence",
    "counts the vowels in a string",
];
const PEOPLE: &[&str] = &["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"];
const ITEMS: &[&str] = &["apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "cards"];

/// The two prompt streams: `n` Python questions, then `n` word problems.
pub fn prompts(n: usize) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = NAMES[i % NAMES.len()];
        let task = TASKS[(i / NAMES.len() + i) % TASKS.len()];
        out.push(("code", format!("Write a Python function named {name} that {task}. Give only the code.")));
    }
    for i in 0..n {
        let p = PEOPLE[i % PEOPLE.len()];
        let it = ITEMS[(i / PEOPLE.len() + i) % ITEMS.len()];
        let (a, b) = (3 + (i * 7) % 40, 2 + (i * 11) % 25);
        let text = match i % 3 {
            0 => format!("{p} has {a} {it}. {p} buys {b} more {it}. How many {it} does {p} have now? Answer step by step."),
            1 => format!("{p} had {} {it} and gave {b} of them away. How many {it} are left? Answer step by step.", a + b),
            _ => format!("{p} puts {a} {it} in each of {} boxes. How many {it} are there in all? Answer step by step.", 2 + i % 5),
        };
        out.push(("math", text));
    }
    out
}

async fn serving_version(client: &reqwest::Client, args: &ReplayArgs) -> Option<u64> {
    let key = args.admin_key.as_ref()?;
    let v: Value = client.get(format!("{}/admin/trainer", args.url)).bearer_auth(key).send().await.ok()?.json().await.ok()?;
    v["serving_version"].as_u64()
}

/// Runs the stream and writes the CSV.
pub async fn run(args: ReplayArgs) -> Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let stream = prompts(args.per_domain);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut csv = String::from("index,domain,acceptance_length,decode_tok_s,completion_tokens,speculator_version\n");
    let mut version = serving_version(&client, &args).await;
    let started = Instant::now();
    for (i, (domain, prompt)) in stream.iter().enumerate() {
        let body = json!({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens, "temperature": 0,
            "ouro": {"speculation": args.speculation},
        });
        let resp = client.post(format!("{}/v1/chat/completions", args.url)).json(&body).send().await.context("sending a request")?;
        if !resp.status().is_success() {
            bail!("request {i} failed: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        let v: Value = resp.json().await?;
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        let t = &v["ouro"]["timing_ms"];
        let decode_s = (t["total"].as_f64().unwrap_or(0.0) - t["ttft"].as_f64().unwrap_or(0.0)) / 1000.0;
        let tok_s = if decode_s > 0.0 { tokens.saturating_sub(1) as f64 / decode_s } else { 0.0 };
        let mal = v["ouro"]["spec"]["mean_acceptance_length"].as_f64().unwrap_or(0.0);
        let mal = if mal > 0.0 { mal } else { 1.0 };
        if i % 10 == 0 {
            version = serving_version(&client, &args).await.or(version);
        }
        csv.push_str(&format!("{i},{domain},{mal:.4},{tok_s:.2},{tokens},{}\n", version.map_or(String::new(), |v| v.to_string())));
        if (i + 1) % 50 == 0 {
            eprintln!("{}: {} requests in {:.0} s", args.label, i + 1, started.elapsed().as_secs_f64());
        }
        if args.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
        }
    }
    std::fs::write(&args.out, csv)?;
    eprintln!("{}: wrote {}", args.label, args.out.display());
    Ok(())
}

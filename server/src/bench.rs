//! `ouro bench`: speed of the real engine on the real model, side by side
//! with llama.cpp's `llama-bench` when one is given, and aggregate decode
//! throughput of 1, 4 and 8 concurrent streams over HTTP.
//!
//! The phases run one after the other, never at once: two programs sharing
//! two cores would measure each other. Every figure is the median of
//! `--repeats` runs; ratios printed are ouro / llama.cpp (or / one stream).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::{EngineHandle, Event, GenerateRequest};
use futures::StreamExt;

use crate::cli::ModelArgs;
use crate::state::AppState;
use crate::validate::Limits;

/// `ouro bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model and engine settings (as for `serve`).
    #[command(flatten)]
    pub model: ModelArgs,
    /// A `llama-bench` binary to compare with (see bench/build-llama-bench.sh).
    #[arg(long, env = "OURO_LLAMA_BENCH")]
    pub llama_bench: Option<PathBuf>,
    /// Prompt length of the prefill test.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated in the decode test.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Concurrent HTTP streams to measure (comma-separated; empty to skip).
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    pub streams: Vec<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A prompt of exactly `n` tokens built from real English text.
fn prompt_of(engine: &EngineHandle, n: usize, salt: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The history of computing is a story of people finding new ways to make machines do arithmetic, \
        then logic, then language. Early mechanical calculators added and multiplied numbers; later, relays and vacuum \
        tubes let engineers build machines that followed stored programs. Each generation made the previous one look slow. ";
    let tok = &engine.info().tokenizer;
    let mut ids = tok.encode(&format!("Document {salt}. "), true)?;
    let body = tok.encode(TEXT, false)?;
    while ids.len() < n {
        ids.extend_from_slice(&body);
    }
    ids.truncate(n);
    Ok(ids)
}

/// Runs one request; returns (time to first token, time from first to last
/// token, tokens generated).
async fn run_one(engine: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> Result<(Duration, Duration, usize)> {
    let mut req = GenerateRequest::greedy(prompt, max_tokens);
    req.ignore_eos = true;
    let start = Instant::now();
    let mut gen = engine.submit(req)?;
    let (mut first, mut last, mut n) = (None, start, 0);
    while let Some(ev) = gen.events.recv().await {
        match ev {
            Event::Token(_) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                n += 1;
            }
            Event::Finished(_) => break,
            Event::Error(e) => bail!("engine error: {e}"),
        }
    }
    let first = first.context("no token generated")?;
    Ok((first - start, last - first, n))
}

struct LlamaBench {
    pp: f64,
    tg: f64,
}

fn llama_bench(bin: &PathBuf, model: &std::path::Path, threads: usize, pp: usize, tg: usize, repeats: usize) -> Result<LlamaBench> {
    let out = std::process::Command::new(bin)
        .args(["-m"])
        .arg(model)
        .args(["-t", &threads.to_string(), "-p", &pp.to_string(), "-n", &tg.to_string(), "-r", &repeats.to_string(), "-o", "json"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("llama-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing llama-bench JSON")?;
    let mut res = LlamaBench { pp: f64::NAN, tg: f64::NAN };
    for rec in v.as_array().context("llama-bench JSON is not an array")? {
        let ts = rec["avg_ts"].as_f64().unwrap_or(f64::NAN);
        if rec["n_gen"].as_u64() == Some(0) {
            res.pp = ts;
        } else {
            res.tg = ts;
        }
    }
    Ok(res)
}

/// Aggregate generated tokens per second of `streams` concurrent streaming
/// completions over HTTP.
async fn http_throughput(base: &str, model: &str, streams: usize, gen_tokens: usize) -> Result<f64> {
    let client = reqwest::Client::new();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let client = client.clone();
        let url = format!("{base}/v1/completions");
        let body = serde_json::json!({
            "model": model, "prompt": format!("Story {i}: Once upon a time, in a city by the sea,"),
            "max_tokens": gen_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
            "stream_options": {"include_usage": true}
        });
        tasks.push(tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await?;
            if !resp.status().is_success() {
                bail!("HTTP {}", resp.status());
            }
            let mut tokens = 0usize;
            let mut buf = String::new();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk?));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    if let Some(data) = event.trim().strip_prefix("data: ") {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
                            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                                tokens = n as usize;
                            }
                        }
                    }
                }
            }
            Ok(tokens)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Runs the benchmark and prints the table.
pub async fn run(args: BenchArgs) -> Result<()> {
    let model_path = args.model.model_path()?;
    let threads = args.model.threads();
    let ma = args.model.clone();
    let engine = tokio::task::spawn_blocking(move || -> Result<EngineHandle> {
        let loaded = ma.load()?;
        Ok(engine::handle::spawn(loaded, ma.engine_config(1024))?)
    })
    .await??;
    let info = engine.info();
    println!("model: {} ({}), {} threads, kernels {}", info.model_name, info.weight_formats, threads, kernels::cpu::isa().name());

    // Warm-up (page in weights, size buffers).
    run_one(&engine, prompt_of(&engine, 64, 0)?, 8).await?;

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for r in 0..args.repeats {
        let (ttft, _, _) = run_one(&engine, prompt_of(&engine, args.prompt_tokens, r + 1)?, 1).await?;
        pp.push(args.prompt_tokens as f64 / ttft.as_secs_f64());
        let (_, decode, n) = run_one(&engine, prompt_of(&engine, 8, r + 100)?, args.gen_tokens).await?;
        tg.push((n.saturating_sub(1)) as f64 / decode.as_secs_f64());
    }
    let (pp, tg) = (median(pp), median(tg));
    println!();
    println!("| test | ouro tok/s | llama.cpp tok/s | ratio |");
    println!("|---|---|---|---|");
    let lb = match &args.llama_bench {
        Some(bin) => {
            // ouro's engine is idle now (its threads park after a short spin).
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some(llama_bench(bin, &model_path, threads, args.prompt_tokens, args.gen_tokens, args.repeats)?)
        }
        None => None,
    };
    let row = |name: String, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("| {name} | {ours:.1} | {t:.1} | {:.2}x |", ours / t),
        None => println!("| {name} | {ours:.1} | - | - |"),
    };
    row(format!("pp{}", args.prompt_tokens), pp, lb.as_ref().map(|l| l.pp));
    row(format!("tg{}", args.gen_tokens), tg, lb.as_ref().map(|l| l.tg));

    if !args.streams.is_empty() {
        println!();
        println!("| concurrent sequences (engine only) | aggregate decode tok/s | vs 1 |");
        println!("|---|---|---|");
        let mut one = None;
        for &s in &args.streams {
            let mut runs = Vec::new();
            for r in 0..args.repeats {
                let start = Instant::now();
                let jobs: Vec<_> = (0..s)
                    .map(|i| {
                        let e = engine.clone();
                        let p = prompt_of(&engine, 12, 1000 + r * 100 + i);
                        let n = args.gen_tokens;
                        tokio::spawn(async move { run_one(&e, p?, n).await })
                    })
                    .collect();
                let mut total = 0;
                for j in jobs {
                    total += j.await??.2;
                }
                runs.push(total as f64 / start.elapsed().as_secs_f64());
            }
            let agg = median(runs);
            let base1 = *one.get_or_insert(agg);
            println!("| {s} | {agg:.1} | {:.2}x |", agg / base1);
        }
        let state = Arc::new(AppState::new(Limits::default()));
        state.set_engine(engine.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, crate::router(state, 1 << 20)).await });
        println!();
        println!("| concurrent streams | aggregate decode tok/s | vs 1 stream |");
        println!("|---|---|---|");
        let mut one = None;
        for &s in &args.streams {
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                runs.push(http_throughput(&base, &info.model_name, s, args.gen_tokens).await?);
            }
            let agg = median(runs);
            let base1 = *one.get_or_insert(agg);
            println!("| {s} | {agg:.1} | {:.2}x |", agg / base1);
        }
    }
    engine.shutdown();
    Ok(())
}

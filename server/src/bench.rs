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
use engine::spec::policy::interpolate_step_secs;
use engine::spec::speculator::{default_draft_vocab, embedding_tensor, Speculator, DEFAULT_DRAFT_VOCAB};
use engine::spec::{SpecMode, SpecRequest, MAX_K};
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
    /// Concurrent HTTP streams to measure (comma-separated; 0 to skip).
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// Skip the prefill/decode comparison.
    #[arg(long)]
    pub no_speed: bool,
    /// Also compare speculation modes (off / ngram / speculator / auto) on
    /// repeat-or-edit prompts and on open chat prompts. Without
    /// `--speculator`, the day-0 speculator is built in memory.
    #[arg(long)]
    pub spec: bool,
    /// Tokens generated per prompt in the speculation comparison.
    #[arg(long, default_value_t = 96)]
    pub spec_tokens: usize,
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
    let want_spec = args.spec;
    let engine = tokio::task::spawn_blocking(move || -> Result<EngineHandle> {
        let loaded = ma.load()?;
        let mut cfg = ma.engine_config(1024);
        cfg.speculator = ma.speculator_slot(&loaded.model)?;
        if want_spec && cfg.speculator.is_none() {
            let m = &loaded.model;
            let vocab = default_draft_vocab(m.config().vocab_size, DEFAULT_DRAFT_VOCAB);
            let spec = Speculator::day0(m, embedding_tensor(m)?, vocab, 0)?;
            cfg.speculator = Some(Arc::new(arc_swap::ArcSwapOption::from_pointee(spec)));
        }
        Ok(engine::handle::spawn(loaded, cfg)?)
    })
    .await??;
    let info = engine.info();
    println!("model: {} ({}), {} threads, kernels {}", info.model_name, info.weight_formats, threads, kernels::cpu::isa().name());

    // Warm-up (page in weights, size buffers).
    run_one(&engine, prompt_of(&engine, 64, 0)?, 8).await?;
    if !args.no_speed {
        speed(&args, &engine, &model_path, threads).await?;
    }
    if args.spec {
        spec_table(&engine, args.spec_tokens, args.repeats).await?;
    }
    engine.shutdown();
    Ok(())
}

async fn speed(args: &BenchArgs, engine: &EngineHandle, model_path: &std::path::Path, threads: usize) -> Result<()> {
    let engine = engine.clone();
    let info = engine.info();

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
            Some(llama_bench(bin, model_path, threads, args.prompt_tokens, args.gen_tokens, args.repeats)?)
        }
        None => None,
    };
    let row = |name: String, ours: f64, theirs: Option<f64>| match theirs {
        Some(t) => println!("| {name} | {ours:.1} | {t:.1} | {:.2}x |", ours / t),
        None => println!("| {name} | {ours:.1} | - | - |"),
    };
    row(format!("pp{}", args.prompt_tokens), pp, lb.as_ref().map(|l| l.pp));
    row(format!("tg{}", args.gen_tokens), tg, lb.as_ref().map(|l| l.tg));

    let streams: Vec<usize> = args.streams.iter().copied().filter(|&s| s > 0).collect();
    if !streams.is_empty() {
        println!();
        println!("| concurrent sequences (engine only) | aggregate decode tok/s | vs 1 |");
        println!("|---|---|---|");
        let mut one = None;
        for &s in &streams {
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
        for &s in &streams {
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                runs.push(http_throughput(&base, &info.model_name, s, args.gen_tokens).await?);
            }
            let agg = median(runs);
            let base1 = *one.get_or_insert(agg);
            println!("| {s} | {agg:.1} | {:.2}x |", agg / base1);
        }
    }
    Ok(())
}

/// Prompts whose answers repeat or edit given text.
const REPEAT_PROMPTS: &[&str] = &[
    "Repeat the following text exactly: The committee met on Tuesday to review the budget. After a long discussion, the members agreed to postpone the vote until the next meeting, when the final figures will be available.",
    "Copy this paragraph word for word: Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water boils at a lower temperature, which is why cooking takes longer in the mountains.",
    "Rewrite this sentence, replacing every 'cat' with 'dog': The cat sat on the mat. The cat looked at the other cat. Then the cat went to sleep next to the cat bowl.",
    "Fix the spelling and repeat the text: Teh quick brown fox jumpd over the lazy dog. Teh dog did not move, becuase it was sleeping in the sun all afternon.",
    "Repeat this list exactly: apples, bananas, cherries, dates, elderberries, figs, grapes, honeydew melons, kiwis, lemons, mangoes, nectarines.",
    "Copy the following code exactly:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\nprint(add(2, 3), sub(5, 1))",
    "Repeat exactly: To be, or not to be, that is the question: whether it is nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Rewrite in the past tense and otherwise keep every word: I walk to the store. I buy bread and milk. I pay at the counter and I walk back home.",
];

/// Open-ended chat prompts.
const CHAT_PROMPTS: &[&str] = &[
    "Explain why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "What are the benefits of regular exercise?",
    "Describe how a rainbow forms.",
    "Give me three ideas for a weekend trip.",
    "What is the difference between weather and climate?",
    "Write a poem about the sea.",
    "How do plants make food from sunlight?",
];

/// One mode's totals over the rounds of [`spec_table`].
#[derive(Default)]
struct SpecRun {
    tokens: usize,
    secs: f64,
    steps: usize,
    accepted: usize,
    /// Each round's tokens/s.
    rounds: Vec<f64>,
    /// The first round's outputs.
    outputs: Vec<Vec<u32>>,
}

impl SpecRun {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.secs.max(1e-9)
    }

    fn mean_acceptance_length(&self) -> f64 {
        if self.steps > 0 {
            1.0 + self.accepted as f64 / self.steps as f64
        } else {
            0.0
        }
    }
}

/// Adds one round of `prompts` in `mode` to `run`.
async fn spec_run(engine: &EngineHandle, prompts: &[&str], mode: SpecMode, max_tokens: usize, run: &mut SpecRun) -> Result<()> {
    let (mut tokens, mut secs) = (0usize, 0f64);
    let mut outputs = Vec::new();
    for p in prompts {
        let mut req = GenerateRequest::greedy(prompt_ids(engine, p)?, max_tokens);
        req.speculation = Some(SpecRequest { mode, k: None });
        let mut gen = engine.submit(req)?;
        let (mut first, mut last, mut out) = (None, Instant::now(), Vec::new());
        while let Some(ev) = gen.events.recv().await {
            match ev {
                Event::Token(t) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    out.push(t.token);
                }
                Event::Finished(f) => {
                    run.steps += f.spec.drafting_steps;
                    run.accepted += f.spec.accepted;
                    break;
                }
                Event::Error(e) => bail!("engine error: {e}"),
            }
        }
        if let Some(first) = first {
            tokens += out.len().saturating_sub(1);
            secs += (last - first).as_secs_f64();
        }
        outputs.push(out);
    }
    run.tokens += tokens;
    run.secs += secs;
    run.rounds.push(tokens as f64 / secs.max(1e-9));
    if run.outputs.is_empty() {
        run.outputs = outputs;
    }
    Ok(())
}

/// Decode speed per speculation mode, as ratios to `off` in the same run.
/// The modes take turns, `rounds` times over each prompt set (the order
/// rotates every round), so that the machine's drift is spread over all of
/// them; the ratio is of the totals, and its range that of the rounds.
async fn spec_table(engine: &EngineHandle, max_tokens: usize, rounds: usize) -> Result<()> {
    const MODES: [(&str, SpecMode); 4] =
        [("off", SpecMode::Off), ("ngram", SpecMode::Ngram), ("speculator (day 0)", SpecMode::Speculator), ("auto", SpecMode::Auto)];
    println!();
    println!("| prompts | mode | decode tok/s | vs off | per round | mean acceptance length | greedy output = off |");
    println!("|---|---|---|---|---|---|---|");
    let mut bounds = Vec::new();
    for (name, prompts) in [("repeat/edit", REPEAT_PROMPTS), ("open chat", CHAT_PROMPTS)] {
        let mut runs: Vec<SpecRun> = MODES.iter().map(|_| SpecRun::default()).collect();
        for round in 0..rounds.max(1) {
            for i in 0..MODES.len() {
                let m = (i + round) % MODES.len();
                spec_run(engine, prompts, MODES[m].1, max_tokens, &mut runs[m]).await?;
            }
        }
        let off = &runs[0];
        println!("| {name} | off | {:.1} | 1.00x | - | - | - |", off.tokens_per_s());
        for ((label, _), r) in MODES.iter().zip(&runs).skip(1) {
            let ratios: Vec<f64> = r.rounds.iter().zip(&off.rounds).map(|(a, b)| a / b).collect();
            let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            println!(
                "| {name} | {label} | {:.1} | {:.2}x | {lo:.2}-{hi:.2}x | {:.2} | {} |",
                r.tokens_per_s(),
                r.tokens_per_s() / off.tokens_per_s(),
                r.mean_acceptance_length(),
                if r.outputs == off.outputs { "yes" } else { "NO" }
            );
        }
        bounds.push((name, prompts, std::mem::take(&mut runs[0].outputs)));
    }
    // What any policy could get from these drafts at this CPU's step cost.
    let measured: Vec<Option<f64>> = (0..=MAX_K + 1).map(|r| engine.stats().mean_step_secs(r)).collect();
    let Some(cost) = StepCost::from_measured(&measured) else { return Ok(()) };
    let target = StepCost::issue3_target();
    println!();
    println!(
        "step time by rows / one row (this run): {}",
        (1..=MAX_K + 1).map(|r| format!("{r}: {:.2}", cost.0[r])).collect::<Vec<_>>().join(", ")
    );
    println!("| prompts | bound | vs off | mean acceptance length |");
    println!("|---|---|---|---|");
    for (name, prompts, outputs) in bounds {
        let mut seqs = Vec::new();
        for (p, out) in prompts.iter().zip(outputs) {
            seqs.push((prompt_ids(engine, p)?, out));
        }
        for (label, c) in [("n-gram drafts, best k at every step", &cost), ("same drafts if 5 rows cost 1.4x and 9 rows 2.0x", &target)] {
            let (ratio, mal) = ngram_bound(&seqs, c);
            println!("| {name} | {label} | {ratio:.2}x | {mal:.2} |");
        }
        let best = (2..=MAX_K + 1).map(|r| r as f64 / cost.0[r]).fold(0.0, f64::max);
        println!("| {name} | every draft right, best k | {best:.2}x | - |");
    }
    Ok(())
}

/// Step time by row count relative to one row (index = rows).
struct StepCost(Vec<f64>);

impl StepCost {
    /// From measured mean step seconds (index = rows), gaps filled as the
    /// speculation policy fills them ([`interpolate_step_secs`]); needs one
    /// row and one other count measured.
    fn from_measured(secs: &[Option<f64>]) -> Option<Self> {
        let one = secs.get(1).copied().flatten()?;
        if secs.iter().skip(1).flatten().count() < 2 {
            return None;
        }
        let rel = |r: usize| interpolate_step_secs(secs, r).map_or(0.0, |t| t / one);
        Some(Self((0..secs.len()).map(|r| if r == 0 { 0.0 } else { rel(r) }).collect()))
    }

    /// The kernels issue's targets: 5 rows cost 1.4x one row, 9 rows 2.0x.
    fn issue3_target() -> Self {
        Self((0..=MAX_K + 1).map(|r| if r <= 5 { 1.0 + 0.1 * (r as f64 - 1.0) } else { 1.4 + 0.15 * (r as f64 - 5.0) }).collect())
    }
}

/// Decode speed-up over one token per step that a policy with perfect
/// foresight would get from the n-gram drafter's proposals on these greedy
/// outputs: at every position it either drafts nothing or exactly the
/// accepted prefix of the lookup (chosen by dynamic programming over the
/// whole output), paying `cost` per step. Returns the ratio and the mean
/// acceptance length of its drafting steps. Like the measured rows, it
/// counts from the first generated token on.
fn ngram_bound(seqs: &[(Vec<u32>, Vec<u32>)], cost: &StepCost) -> (f64, f64) {
    let drafter = engine::spec::NgramDrafter::default();
    let (mut tokens, mut total, mut draft_steps, mut drafted_tokens) = (0usize, 0f64, 0usize, 0usize);
    for (prompt, out) in seqs {
        let n = out.len();
        if n < 2 {
            continue;
        }
        let all: Vec<u32> = prompt.iter().chain(out).copied().collect();
        // best[i] = (cost, next position) from position i to the end.
        let mut best = vec![(0.0f64, n); n + 1];
        for i in (1..n).rev() {
            let draft = drafter.lookup(&all[..prompt.len() + i], MAX_K);
            let accepted = draft.iter().zip(&out[i..]).take_while(|(d, t)| d == t).count();
            best[i] = (cost.0[1] + best[i + 1].0, i + 1);
            for k in 1..=accepted.min(n - i - 1) {
                let c = cost.0[1 + k] + best[i + k + 1].0;
                if c < best[i].0 {
                    best[i] = (c, i + k + 1);
                }
            }
        }
        let mut i = 1;
        while i < n {
            if best[i].1 > i + 1 {
                draft_steps += 1;
                drafted_tokens += best[i].1 - i;
            }
            i = best[i].1;
        }
        tokens += n - 1;
        total += best[1].0;
    }
    (tokens as f64 / total.max(1e-9), if draft_steps > 0 { drafted_tokens as f64 / draft_steps as f64 } else { 0.0 })
}

/// A chat prompt's token ids.
fn prompt_ids(engine: &EngineHandle, prompt: &str) -> Result<Vec<u32>> {
    let info = engine.info();
    let msgs = vec![engine::chat_template::ChatMessage { role: "user".into(), content: prompt.to_string() }];
    Ok(info.tokenizer.encode(&info.template.render(&msgs, true)?, true)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_cost_fills_gaps_between_and_after_measurements() {
        let c = StepCost::from_measured(&[None, Some(2.0), None, Some(4.0), None]).unwrap();
        assert_eq!(c.0, vec![0.0, 1.0, 1.5, 2.0, 2.5]);
        assert!(StepCost::from_measured(&[None, Some(2.0), None]).is_none());
    }

    #[test]
    fn ngram_bound_drafts_the_copied_span_at_the_cheapest_chain_length() {
        // The output copies the prompt: after two tokens the lookup proposes
        // the remaining eight, all right.
        let prompt: Vec<u32> = (10..=20).collect();
        let seqs = vec![(prompt.clone(), prompt)];
        // Free extra rows: one plain step, then one step with all 8 drafts.
        let flat = StepCost(vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let (ratio, mal) = ngram_bound(&seqs, &flat);
        assert!((ratio - 10.0 / 2.0).abs() < 1e-9, "{ratio}");
        assert!((mal - 9.0).abs() < 1e-9, "{mal}");
        // At the kernels issue's targets, 8 drafts at once (2.0) still beat
        // 4 and then 3 (1.4 + 1.3).
        let (ratio, _) = ngram_bound(&seqs, &StepCost::issue3_target());
        assert!((ratio - 10.0 / 3.0).abs() < 1e-9, "{ratio}");
        // Rows as dear as whole steps: drafting never pays.
        let linear = StepCost((0..10).map(|r| r as f64).collect());
        assert!((ngram_bound(&seqs, &linear).0 - 1.0).abs() < 1e-9);
    }
}

//! TCA-Attention on the command line (issue 6): the `serve` flags
//! (`--kv-compression`, `--tca-budgets`), `ouro calibrate` (writes a budgets
//! file) and `ouro tca-bench` (full attention against TCA, side by side).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use engine::model::Model;
use engine::tca::calibrate::{measure, CalibrationConfig, Measured};
use engine::tca::passkey;
use engine::tca::sensitivity::{measure_sensitivity, LayerSensitivity};
use engine::tca::solo::{argmax, Solo};
use engine::tca::{Compressor, KvCompression, TcaBudgets, TcaParams, CALIBRATION_TEXT};
use engine::EngineConfig;
use kernels::ThreadPool;
use rand::{Rng, SeedableRng};

use crate::cli::{read_text, ModelArgs};

/// `--kv-compression` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCompressionArg {
    /// Full attention (exact).
    None,
    /// TCA-Attention with `--tca-budgets`.
    Tca,
}

/// The `serve` flags of TCA-Attention.
#[derive(Debug, Clone, Args)]
pub struct TcaArgs {
    /// KV cache compression of requests that do not choose
    /// (`ouro: {"kv_compression": "none" | "tca"}`).
    #[arg(long, env = "OURO_KV_COMPRESSION", value_enum, default_value = "none")]
    pub kv_compression: KvCompressionArg,
    /// TCA budgets from `ouro calibrate` for this model (needed by
    /// `--kv-compression tca`; with `none`, requests may still opt in).
    #[arg(long, env = "OURO_TCA_BUDGETS")]
    pub tca_budgets: Option<PathBuf>,
    /// When prefill selects: `end` (once, from the prompt's last query; peak
    /// memory the whole prompt) or `chunk` (after every chunk; peak about
    /// kept + w + b + chunk tokens per head).
    #[arg(long, env = "OURO_TCA_PREFILL", value_enum, default_value = "end")]
    pub tca_prefill: TcaPrefillArg,
}

/// `--tca-prefill` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TcaPrefillArg {
    /// Select once the prompt is computed.
    End,
    /// Select after every prefill chunk.
    Chunk,
}

impl TcaArgs {
    /// Loads the budgets (refused for another model) into the engine settings.
    pub fn apply(&self, cfg: &mut EngineConfig, model: &Model) -> Result<()> {
        cfg.kv_compression = match self.kv_compression {
            KvCompressionArg::None => KvCompression::None,
            KvCompressionArg::Tca => KvCompression::Tca,
        };
        cfg.tca_per_chunk = self.tca_prefill == TcaPrefillArg::Chunk;
        if let Some(path) = &self.tca_budgets {
            let c = model.config();
            let b = TcaBudgets::load(path, &model.fingerprint(), c.n_layers, c.n_kv_heads)?;
            tracing::info!(
                path = %path.display(),
                block = b.params.block,
                window = b.params.window,
                tau = b.tau,
                mean_kept = b.mean_kept_fraction(),
                "TCA budgets loaded"
            );
            cfg.tca_budgets = Some(Arc::new(b));
        } else if cfg.kv_compression == KvCompression::Tca {
            bail!("--kv-compression tca needs --tca-budgets FILE (make one with `ouro calibrate --out FILE`)");
        }
        Ok(())
    }
}

/// Selection parameters on the command line.
#[derive(Debug, Clone, Args)]
pub struct TcaParamArgs {
    /// Block size b (a power of two).
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Local window w (the last w tokens are always kept).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// alpha: weight of the in-block spread against the block's mass.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f32,
    /// Query rows (the last positions before a compression) whose attention
    /// is pooled into the importance of each entry.
    #[arg(long, default_value_t = 16)]
    pub observe: usize,
    /// Share of an entry's importance handed on to the entry after it, so
    /// a copied span (a passkey's digits) is kept past its first entries
    /// (0: the paper's rule).
    #[arg(long, default_value_t = 0.7)]
    pub chain: f32,
    /// Queries sampled (from the text's last quarter) to measure the
    /// attention mass each candidate keeps.
    #[arg(long, default_value_t = 32)]
    pub queries: usize,
    /// Calibration text: a file, or a folder of .txt/.md files (default: the
    /// bundled public-domain text, see engine/src/tca/calibration_text.txt).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Most calibration tokens (default: the model's context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Per-layer thresholds: measure what compressing each of this many
    /// groups of consecutive layers alone costs in perplexity on the
    /// calibration text (one run per group, after the calibration pass), and
    /// share the allowance `1 - tau` out by that cost (0: the paper's one
    /// threshold for every head).
    #[arg(long, default_value_t = 0)]
    pub layer_groups: usize,
    /// Threshold the groups are compressed with to measure their cost.
    #[arg(long, default_value_t = 0.7)]
    pub probe_tau: f32,
    /// Most a group's allowance may be multiplied by (the cheapest groups
    /// otherwise drop almost everything outside the window).
    #[arg(long)]
    pub max_allowance: Option<f64>,
}

impl TcaParamArgs {
    /// `--max-allowance`, unbounded when not given.
    fn allowance_cap(&self) -> f64 {
        self.max_allowance.unwrap_or(f64::INFINITY)
    }
}

/// `ouro calibrate`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// The model (default: the default model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Selection parameters and the text.
    #[command(flatten)]
    pub params: TcaParamArgs,
    /// Attention mass the kept tokens must retain.
    #[arg(long, default_value_t = 0.9)]
    pub tau: f32,
    /// Where to write the budgets (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

/// Text files read from a folder given for calibration or perplexity.
const TEXT_FILES: &[&str] = &["txt", "md"];

fn bar(len: usize, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len as u64).with_message(msg.to_string());
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// The calibration pass, and the layer sensitivity when asked for, with
/// progress bars.
fn run_measure(
    model: &Model,
    tokenizer: &engine::tokenizer::Tokenizer,
    pool: &ThreadPool,
    a: &TcaParamArgs,
) -> Result<(Measured, Option<LayerSensitivity>)> {
    let (text, source) = match &a.text {
        Some(p) => (read_text(p, TEXT_FILES)?, p.display().to_string()),
        None => (CALIBRATION_TEXT.to_string(), "bundled: engine/src/tca/calibration_text.txt".to_string()),
    };
    let mut tokens = tokenizer.encode(&text, true)?;
    let max = a.max_tokens.unwrap_or(model.config().max_position).min(model.config().max_position);
    tokens.truncate(max);
    let params = TcaParams { block: a.block, window: a.window, alpha: a.alpha, observe: a.observe, chain: a.chain };
    let cfg = CalibrationConfig { params, tau: 0.9, queries: a.queries, chunk: 512, source };
    let b = bar(1, &format!("calibrating on {} tokens", tokens.len()));
    let m = measure(model, pool, &tokens, &cfg, &|done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    })?;
    b.finish_and_clear();
    if a.layer_groups == 0 {
        return Ok((m, None));
    }
    if !(0.0..1.0).contains(&a.probe_tau) {
        bail!("--probe-tau must be in [0, 1), got {}", a.probe_tau);
    }
    let b =
        bar(a.layer_groups + 1, &format!("layer sensitivity: perplexity with each of {} layer groups compressed alone", a.layer_groups));
    let s = measure_sensitivity(model, pool, &tokens, &m, a.layer_groups, a.probe_tau, &|done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    })?;
    b.finish_and_clear();
    println!("ouro: layer sensitivity at tau {} (full attention: perplexity {:.3} on the calibration text)", s.probe_tau, s.base_ppl);
    for (g, m) in s.groups.iter().zip(s.multipliers(a.allowance_cap())) {
        println!(
            "  layers {:2}-{:2}: perplexity {:+.2}%, KV saved {:.3} of full, allowance x{:.2}",
            g.layers.start,
            g.layers.end - 1,
            g.cost * 100.0,
            g.saved,
            m
        );
    }
    Ok((m, Some(s)))
}

/// Budgets for `tau`: per-layer thresholds when the sensitivity was measured.
fn choose(m: &Measured, s: Option<&LayerSensitivity>, a: &TcaParamArgs, tau: f32) -> TcaBudgets {
    match s {
        Some(s) => m.choose_per_layer(tau, &s.layer_taus(tau, a.allowance_cap())),
        None => m.choose(tau),
    }
}

fn summarize(b: &TcaBudgets) {
    println!(
        "ouro: TCA budgets b={} w={} alpha={} chain={} tau={} over {} tokens; mean kept fraction {:.3}",
        b.params.block,
        b.params.window,
        b.params.alpha,
        b.params.chain,
        b.tau,
        b.calibration_tokens,
        b.mean_kept_fraction()
    );
    println!("  mean tokens kept per {}-token block, per layer (one column per KV head):", b.params.block);
    for l in 0..b.n_layers {
        let row: Vec<String> = (0..b.n_kv_heads).map(|g| format!("{:5.1}", b.head(l, g).mean_budget)).collect();
        let tau = b.layer_tau.get(l).map(|t| format!("   (tau {t:.2})")).unwrap_or_default();
        println!("  layer {l:2}: {}{tau}", row.join(" "));
    }
    let mut distinct: Vec<u32> = b.heads.iter().map(|h| (h.mean_budget * 100.0) as u32).collect();
    distinct.sort_unstable();
    distinct.dedup();
    println!("  {} distinct budget distributions over {} heads", distinct.len(), b.heads.len());
}

/// `ouro calibrate`: one full-attention pass, budgets written atomically.
pub fn calibrate(args: CalibrateArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.tau) {
        bail!("--tau must be in [0, 1], got {}", args.tau);
    }
    let loaded = args.model.load()?;
    let pool = ThreadPool::new(args.model.threads());
    let started = Instant::now();
    let (m, s) = run_measure(&loaded.model, &loaded.tokenizer, &pool, &args.params)?;
    let budgets = choose(&m, s.as_ref(), &args.params, args.tau);
    budgets.save(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    summarize(&budgets);
    println!(
        "ouro: budgets for model {} written to {} in {:.1} s",
        budgets.model_fingerprint,
        args.out.display(),
        started.elapsed().as_secs_f32()
    );
    Ok(())
}

/// `ouro tca-bench`.
#[derive(Debug, Clone, Args)]
pub struct TcaBenchArgs {
    /// The model (default: the default model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Selection parameters and the calibration text.
    #[command(flatten)]
    pub params: TcaParamArgs,
    /// Context lengths to measure.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8064")]
    pub lengths: Vec<usize>,
    /// Calibration thresholds to compare with full attention.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.7")]
    pub taus: Vec<f32>,
    /// Passkey trials per length and configuration (0: perplexity and KV
    /// sizes only).
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// Tokens decoded (after the first trial's prompt) to time decoding;
    /// the configurations take turns, 16 tokens at a time.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Held-out text for perplexity: a file or a folder of .txt/.md files
    /// (default: the llama.cpp docs vendored by `bench/build-llama-bench.sh`).
    #[arg(long)]
    pub ppl_text: Option<PathBuf>,
    /// Prefill chunk (rows per forward pass).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Also measures, for each tau, the perplexity of an oracle with the
    /// same budgets whose compressions are judged by this many of the
    /// positions still to come (their queries from the full-attention run)
    /// instead of the past ones: a bound on what better importance
    /// estimates could gain (0: off).
    #[arg(long, default_value_t = 0)]
    pub oracle_rows: usize,
}

/// Tokens each configuration decodes in its turn while decoding is timed.
const DECODE_SLICE: usize = 16;

/// Greedy-decodes `tokens` tokens on every sequence of `decoders` (each
/// with its last logits), the sequences taking turns [`DECODE_SLICE`]
/// tokens at a time so that the machine's drift falls on all of them alike.
/// Returns each one's decoding seconds.
fn time_decoding(decoders: &mut [(Solo, Vec<f32>)], tokens: usize) -> Result<Vec<f64>> {
    let mut secs = vec![0f64; decoders.len()];
    let mut done = 0;
    while done < tokens {
        let n = DECODE_SLICE.min(tokens - done);
        for ((solo, last), s) in decoders.iter_mut().zip(&mut secs) {
            let t = Instant::now();
            for _ in 0..n {
                let next = argmax(last);
                *last = solo.feed(&[next], 1, false)?;
            }
            *s += t.elapsed().as_secs_f64();
        }
        done += n;
    }
    Ok(secs)
}

#[derive(Debug, Default, Clone)]
struct Row {
    kv_bytes: f64,
    peak_bytes: f64,
    prefill_s: f64,
    decode_tps: f64,
    ppl: f64,
    passkey: usize,
    answers: Vec<String>,
}

/// `ouro tca-bench`: for each length, full attention and TCA at each tau,
/// printed side by side with ratios to full attention.
pub fn bench(args: TcaBenchArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let pool = ThreadPool::new(args.model.threads());
    let ctx = model.config().max_position;
    let ppl_path = args.ppl_text.clone().unwrap_or_else(|| PathBuf::from("third_party/llama_cpp_python-0.3.36/vendor/llama.cpp/docs"));
    let ppl_tokens = tok.encode(
        &read_text(&ppl_path, TEXT_FILES).with_context(|| "held-out perplexity text (pass --ppl-text FILE|DIR)".to_string())?,
        true,
    )?;
    let started = Instant::now();
    let (m, sens) = run_measure(model, tok, &pool, &args.params)?;
    println!("ouro tca-bench: calibration pass {:.1} s", started.elapsed().as_secs_f32());
    let mut configs: Vec<(String, Option<Compressor>)> = vec![("full".into(), None)];
    for &tau in &args.taus {
        let b = m.choose(tau);
        summarize(&b);
        configs.push((format!("tca t={tau}"), Some(Compressor::new(Arc::new(b)))));
    }
    // With the layer sensitivity: each tau again, with per-layer thresholds.
    for &tau in args.taus.iter().filter(|_| sens.is_some()) {
        let b = choose(&m, sens.as_ref(), &args.params, tau);
        summarize(&b);
        configs.push((format!("layer t={tau}"), Some(Compressor::new(Arc::new(b)))));
    }
    // Oracle rows come last: they measure perplexity and KV only.
    let measured = configs.len();
    if args.oracle_rows > 0 {
        for i in 1..measured {
            let (name, comp) = configs[i].clone();
            configs.push((format!("oracle {name}"), comp));
        }
    }
    let stop = tok.eos_token_ids().to_vec();
    println!(
        "ouro tca-bench: b={} w={} alpha={} chain={} chunk={} trials={} decode_tokens={} threads={} held-out text {} ({} tokens)",
        args.params.block,
        args.params.window,
        args.params.alpha,
        args.params.chain,
        args.chunk,
        args.trials,
        args.decode_tokens,
        pool.n_threads(),
        ppl_path.display(),
        ppl_tokens.len()
    );
    println!(
        "{:>5} {:>16} {:>10} {:>6} {:>10} {:>9} {:>6} {:>9} {:>6} {:>8} {:>7} {:>8}",
        "len", "config", "kv_MiB", "x", "peak_MiB", "prefill_s", "x", "decode/s", "x", "ppl", "dppl%", "passkey"
    );
    for &len in &args.lengths {
        if len + args.decode_tokens + 16 > ctx {
            println!("{len:>5} skipped: beyond the model's context ({ctx}) with {} decode tokens", args.decode_tokens);
            continue;
        }
        let mut rows: Vec<Row> = Vec::new();
        // Each configuration's first passkey sequence, kept to time decoding.
        let mut decoders: Vec<(Solo, Vec<f32>)> = Vec::new();
        let mut future: Option<Arc<Vec<f32>>> = None;
        for (ci, (name, comp)) in configs.iter().enumerate() {
            let mut row = Row::default();
            let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
            let oracle = ci >= measured;
            let trials = if oracle { 0 } else { args.trials };
            let b = bar(trials + 1, &format!("{len} {name}"));
            for t in 0..trials {
                let key: u32 = rng.random_range(10_000..100_000);
                let prompt = passkey::prompt(tok, len, key, (t as f32 + 0.5) / args.trials as f32)?;
                let mut solo = Solo::new(model, &pool, len + args.decode_tokens + 64, comp.clone())?;
                let t0 = Instant::now();
                let logits = solo.feed(&prompt, args.chunk, false)?;
                row.prefill_s += t0.elapsed().as_secs_f64();
                let answer = solo.greedy(&logits, 8, &stop)?;
                let text = tok.decode(&answer, true).unwrap_or_default();
                if text.contains(&key.to_string()) {
                    row.passkey += 1;
                }
                row.answers.push(text.trim().to_string());
                if t == 0 {
                    let last = solo.feed(&answer[answer.len() - 1..], 1, false)?;
                    decoders.push((solo, last));
                }
                b.inc(1);
            }
            row.prefill_s /= args.trials.max(1) as f64;
            let n = len.min(ppl_tokens.len());
            let mut solo = Solo::new(model, &pool, n + 64, comp.clone())?;
            if ci == 0 && args.oracle_rows > 0 {
                solo = solo.record_queries();
            }
            if let (true, Some(q)) = (oracle, &future) {
                solo = solo.with_oracle(q.clone(), args.oracle_rows);
            }
            let (sum, count) = solo.nll(&ppl_tokens[..n], 256)?;
            if ci == 0 && args.oracle_rows > 0 {
                future = Some(Arc::new(solo.take_queries()));
            }
            row.ppl = (sum / count.max(1) as f64).exp();
            if args.trials == 0 || oracle {
                row.kv_bytes = solo.kv_bytes() as f64;
                row.peak_bytes = solo.peak_bytes as f64;
            }
            b.finish_and_clear();
            rows.push(row);
        }
        if !decoders.is_empty() {
            let secs = time_decoding(&mut decoders, args.decode_tokens)?;
            for ((row, secs), (solo, _)) in rows.iter_mut().zip(secs).zip(&decoders) {
                row.decode_tps = args.decode_tokens as f64 / secs;
                row.kv_bytes = solo.kv_bytes() as f64;
                row.peak_bytes = solo.peak_bytes as f64;
            }
        }
        let full = rows[0].clone();
        for (ci, ((name, _), r)) in configs.iter().zip(&rows).enumerate() {
            // Oracle rows (and every row without trials) have no timings or passkeys.
            let timed = args.trials > 0 && ci < measured;
            let t = |v: f64, prec: usize| if timed && v.is_finite() { format!("{v:.prec$}") } else { "-".to_string() };
            println!(
                "{:>5} {:>16} {:>10.2} {:>6.3} {:>10.2} {:>9} {:>6} {:>9} {:>6} {:>8.3} {:>+7.2} {:>8}",
                len,
                name,
                r.kv_bytes / 1048576.0,
                r.kv_bytes / full.kv_bytes,
                r.peak_bytes / 1048576.0,
                t(r.prefill_s, 3),
                t(full.prefill_s / r.prefill_s, 2),
                t(r.decode_tps, 1),
                t(r.decode_tps / full.decode_tps, 2),
                r.ppl,
                (r.ppl / full.ppl - 1.0) * 100.0,
                if timed { format!("{}/{}", r.passkey, args.trials) } else { "-".to_string() }
            );
        }
        if args.trials == 0 {
            continue;
        }
        let same = rows[..measured]
            .iter()
            .skip(1)
            .map(|r| r.answers.iter().zip(&full.answers).filter(|(a, b)| a == b).count())
            .collect::<Vec<_>>();
        println!(
            "{len:>5} passkey answers identical to full attention (whole greedy answer): {same:?} of {} (first full answer: {:?})",
            args.trials,
            full.answers.first().map(|a| a.chars().take(40).collect::<String>())
        );
    }
    println!("ouro tca-bench: done in {:.1} s", started.elapsed().as_secs_f32());
    Ok(())
}

//! Prometheus metrics in vLLM's shapes, with the `ouro_` prefix and a
//! `model_name` label.
//!
//! Request-level histograms and counters are recorded by the routes as
//! requests finish; engine gauges (running, waiting, KV cache) are read from
//! the engine's live counters at scrape time. Rates (acceptance, throughput)
//! are left to PromQL, as vLLM does.

use std::sync::atomic::Ordering;
use std::sync::LazyLock;
use std::time::Duration;

use engine::request::Timing;
use engine::EngineHandle;
use prometheus::{Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

/// vLLM's time-to-first-token buckets.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
/// vLLM's inter-token latency buckets.
const ITL_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's request latency buckets.
const LATENCY_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0];
/// vLLM's 1-2-5 token-count buckets (up to 8K context and beyond).
const TOKEN_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0, 100000.0];

/// Every metric the server exports.
pub struct Metrics {
    /// The registry scraped by `GET /metrics`.
    pub registry: Registry,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    prefill: HistogramVec,
    decode: HistogramVec,
    prompt_tokens_hist: HistogramVec,
    generation_tokens_hist: HistogramVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    success: IntCounterVec,
    errors: IntCounterVec,
    preemptions: IntCounterVec,
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    kv_bytes: GaugeVec,
    spec_drafts: IntCounterVec,
    spec_draft_tokens: IntCounterVec,
    spec_accepted: IntCounterVec,
    spec_accepted_per_pos: IntCounterVec,
    experience_items: GaugeVec,
    experience_version: GaugeVec,
    experience_jobs: GaugeVec,
    experience_failures: IntCounterVec,
    experience_versions: IntCounterVec,
    speculator_version: GaugeVec,
    speculator_swaps: IntCounterVec,
    speculator_simulated: GaugeVec,
    trainer_steps: IntCounterVec,
    trainer_loss: GaugeVec,
    trainer_bad_steps: IntCounterVec,
    trainer_traces_received: IntCounterVec,
    trainer_traces_dropped: IntCounterVec,
    trainer_replay_bytes: GaugeVec,
    trainer_restarts: IntCounterVec,
    trainer_alive: GaugeVec,
    trainer_checkpoint_errors: IntCounterVec,
    kernel_isa: GaugeVec,
    kernel_isa_fallbacks: IntCounterVec,
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model_name"])
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> GaugeVec {
    labeled_gauge(r, name, help, &["model_name"])
}

fn labeled_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

/// The process-wide metrics (created on first use; names are constants, so
/// registration cannot fail at run time).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        ttft: histogram(&r, "ouro_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS),
        itl: histogram(&r, "ouro_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.", ITL_BUCKETS),
        e2e: histogram(&r, "ouro_e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS),
        queue: histogram(&r, "ouro_request_queue_time_seconds", "Time from arrival to the first scheduled step.", LATENCY_BUCKETS),
        prefill: histogram(
            &r,
            "ouro_request_prefill_time_seconds",
            "Time from the first scheduled step to the first token.",
            LATENCY_BUCKETS,
        ),
        decode: histogram(&r, "ouro_request_decode_time_seconds", "Time from the first token to the last.", LATENCY_BUCKETS),
        prompt_tokens_hist: histogram(&r, "ouro_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS),
        generation_tokens_hist: histogram(&r, "ouro_request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS),
        prompt_tokens: counter(&r, "ouro_prompt_tokens_total", "Prompt tokens processed.", &["model_name"]),
        generation_tokens: counter(&r, "ouro_generation_tokens_total", "Tokens generated.", &["model_name"]),
        success: counter(&r, "ouro_request_success_total", "Finished requests by finish reason.", &["model_name", "finished_reason"]),
        errors: counter(&r, "ouro_request_errors_total", "Requests answered with an error, by error code.", &["model_name", "code"]),
        preemptions: counter(&r, "ouro_num_preemptions_total", "Sequences preempted for lack of KV cache.", &["model_name"]),
        running: gauge(&r, "ouro_num_requests_running", "Sequences holding a KV cache."),
        waiting: gauge(&r, "ouro_num_requests_waiting", "Requests waiting for admission."),
        kv_usage: gauge(&r, "ouro_kv_cache_usage_perc", "Fraction of the KV cache in use (0..1)."),
        kv_bytes: gauge(&r, "ouro_kv_cache_bytes", "KV cache bytes in use."),
        spec_drafts: counter(&r, "ouro_spec_decode_num_drafts_total", "Verification steps that had drafts.", &["model_name", "drafter"]),
        spec_draft_tokens: counter(&r, "ouro_spec_decode_num_draft_tokens_total", "Drafted tokens.", &["model_name", "drafter"]),
        spec_accepted: counter(
            &r,
            "ouro_spec_decode_num_accepted_tokens_total",
            "Drafted tokens the target accepted.",
            &["model_name", "drafter"],
        ),
        spec_accepted_per_pos: counter(
            &r,
            "ouro_spec_decode_num_accepted_tokens_per_pos_total",
            "Accepted drafted tokens by position in the chain (0-based).",
            &["model_name", "drafter", "position"],
        ),
        experience_items: labeled_gauge(
            &r,
            "ouro_experience_library_items",
            "Items in the current version of an experience library.",
            &["model_name", "library"],
        ),
        experience_version: labeled_gauge(
            &r,
            "ouro_experience_library_version",
            "Current version of an experience library.",
            &["model_name", "library"],
        ),
        experience_jobs: labeled_gauge(&r, "ouro_experience_jobs", "Experience learn jobs by state.", &["model_name", "state"]),
        experience_failures: counter(
            &r,
            "ouro_experience_distill_failures_total",
            "Experience distillation failures by stage (the step went on).",
            &["model_name", "stage"],
        ),
        experience_versions: counter(
            &r,
            "ouro_experience_versions_total",
            "Experience library versions written since start, by source (create, edit, rollback, learn, feedback).",
            &["model_name", "source"],
        ),
        speculator_version: gauge(&r, "ouro_speculator_version", "Speculator version serving now."),
        speculator_swaps: counter(&r, "ouro_speculator_swaps_total", "Speculator versions by gate outcome.", &["model_name", "result"]),
        speculator_simulated: labeled_gauge(
            &r,
            "ouro_speculator_simulated_acceptance_length",
            "Simulated acceptance length on held-out traces, by version.",
            &["model_name", "version"],
        ),
        trainer_steps: counter(&r, "ouro_trainer_steps_total", "Speculator training steps.", &["model_name"]),
        trainer_loss: gauge(&r, "ouro_trainer_loss", "Loss of the last training step."),
        trainer_bad_steps: counter(
            &r,
            "ouro_trainer_bad_steps_total",
            "Training steps skipped for a non-finite loss or gradient.",
            &["model_name"],
        ),
        trainer_traces_received: counter(&r, "ouro_trainer_traces_received_total", "Traces the trainer received.", &["model_name"]),
        trainer_traces_dropped: counter(
            &r,
            "ouro_trainer_traces_dropped_total",
            "Traces dropped because the trainer's channel was full.",
            &["model_name"],
        ),
        trainer_replay_bytes: gauge(&r, "ouro_trainer_replay_bytes", "Bytes in the trainer's replay window."),
        trainer_restarts: counter(
            &r,
            "ouro_trainer_restarts_total",
            "Times the speculator trainer panicked and was restarted.",
            &["model_name"],
        ),
        trainer_alive: gauge(&r, "ouro_trainer_alive", "1 while the speculator trainer thread runs."),
        trainer_checkpoint_errors: counter(
            &r,
            "ouro_trainer_checkpoint_errors_total",
            "Speculator checkpoints that could not be written (full or read-only disk).",
            &["model_name"],
        ),
        kernel_isa: labeled_gauge(
            &r,
            "ouro_kernel_isa_info",
            "1 for the instruction-set path the kernels run on (path) and the best this CPU supports (best).",
            &["path", "best"],
        ),
        kernel_isa_fallbacks: counter(
            &r,
            "ouro_kernel_isa_fallbacks_total",
            "SIMD paths skipped at start because they disagreed with the portable kernels, by path and format.",
            &["path", "format"],
        ),
        registry: r,
    }
});

/// The speculator trainer whose numbers `render` exports (issue 5).
static TRAINER: std::sync::OnceLock<trainer::speculator::SpeculatorService> = std::sync::OnceLock::new();

/// Exports the speculator trainer's numbers at each scrape.
pub fn set_trainer(svc: trainer::speculator::SpeculatorService) {
    let _ = TRAINER.set(svc);
}

fn refresh_kernels(m: &Metrics) {
    let c = kernels::cpu::choice();
    m.kernel_isa.with_label_values(&[c.isa.name(), c.best.name()]).set(1.0);
    for f in &c.fallbacks {
        sync(&m.kernel_isa_fallbacks, &[f.isa.name(), f.format], 1);
    }
}

fn refresh_trainer(m: &Metrics) {
    let Some(svc) = TRAINER.get() else { return };
    let st = svc.status();
    let l = [model()];
    m.speculator_version.with_label_values(&l).set(st.serving_version as f64);
    for result in ["accepted", "rejected_offline", "rolled_back"] {
        sync(&m.speculator_swaps, &[model(), result], st.swaps.get(result).copied().unwrap_or(0) as usize);
    }
    for (v, x) in &st.simulated {
        m.speculator_simulated.with_label_values(&[model(), &v.to_string()]).set(*x);
    }
    sync(&m.trainer_steps, &l, st.steps as usize);
    // NaN until the first step, so the series (and dashboards over it) exist from the start.
    m.trainer_loss.with_label_values(&l).set(st.last_loss.unwrap_or(f64::NAN));
    sync(&m.trainer_bad_steps, &l, st.bad_steps as usize);
    sync(&m.trainer_traces_received, &l, st.traces_received as usize);
    sync(&m.trainer_traces_dropped, &l, st.traces_dropped as usize);
    m.trainer_replay_bytes.with_label_values(&l).set(st.replay_bytes as f64);
    sync(&m.trainer_restarts, &l, st.restarts as usize);
    m.trainer_alive.with_label_values(&l).set(if st.alive { 1.0 } else { 0.0 });
    sync(&m.trainer_checkpoint_errors, &l, st.checkpoint_errors as usize);
}

/// The experience service whose numbers `render` exports (issue 7).
static EXPERIENCES: std::sync::OnceLock<std::sync::Arc<trainer::experience::Experiences>> = std::sync::OnceLock::new();

/// Exports the experience service's numbers at each scrape.
pub fn set_experiences(exp: std::sync::Arc<trainer::experience::Experiences>) {
    let _ = EXPERIENCES.set(exp);
}

fn refresh_experiences(m: &Metrics) {
    let Some(exp) = EXPERIENCES.get() else { return };
    let snap = exp.metrics();
    for (library, items, version) in &snap.libraries {
        m.experience_items.with_label_values(&[model(), library]).set(*items as f64);
        m.experience_version.with_label_values(&[model(), library]).set(*version as f64);
    }
    for (state, count) in &snap.jobs {
        m.experience_jobs.with_label_values(&[model(), state]).set(*count as f64);
    }
    for (stage, total) in &snap.failures {
        sync(&m.experience_failures, &[model(), stage], *total as usize);
    }
    for (source, total) in &snap.versions_written {
        sync(&m.experience_versions, &[model(), source], *total as usize);
    }
}

static MODEL_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the `model_name` label (once, at start-up).
pub fn set_model_name(name: &str) {
    let _ = MODEL_NAME.set(name.to_string());
}

fn model() -> &'static str {
    MODEL_NAME.get().map(String::as_str).unwrap_or("")
}

/// Counts an error response.
pub fn record_error(code: &str) {
    METRICS.errors.with_label_values(&[model(), code]).inc();
}

/// Records one token's arrival `gap` after the previous one of its choice.
pub fn record_token_gap(gap: Duration) {
    METRICS.itl.with_label_values(&[model()]).observe(gap.as_secs_f64());
}

/// Records a finished choice.
pub fn record_finished(timing: &Timing, reason: &str, prompt_tokens: usize, completion_tokens: usize, count_prompt: bool) {
    let m = &*METRICS;
    let l = [model()];
    let secs = |a: std::time::Instant, b: std::time::Instant| b.saturating_duration_since(a).as_secs_f64();
    m.ttft.with_label_values(&l).observe(secs(timing.queued, timing.first_token));
    m.e2e.with_label_values(&l).observe(secs(timing.queued, timing.finished));
    m.queue.with_label_values(&l).observe(secs(timing.queued, timing.scheduled));
    m.prefill.with_label_values(&l).observe(secs(timing.scheduled, timing.first_token));
    m.decode.with_label_values(&l).observe(secs(timing.first_token, timing.finished));
    m.generation_tokens_hist.with_label_values(&l).observe(completion_tokens as f64);
    m.generation_tokens.with_label_values(&l).inc_by(completion_tokens as u64);
    if count_prompt {
        m.prompt_tokens_hist.with_label_values(&l).observe(prompt_tokens as f64);
        m.prompt_tokens.with_label_values(&l).inc_by(prompt_tokens as u64);
    }
    m.success.with_label_values(&[model(), reason]).inc();
}

/// Raises a counter to the engine's cumulative value.
fn sync(c: &IntCounterVec, labels: &[&str], value: usize) {
    let c = c.with_label_values(labels);
    let v = value as u64;
    if v > c.get() {
        c.inc_by(v - c.get());
    }
}

/// The text exposition of every metric, with engine gauges refreshed.
pub fn render(engine: Option<&EngineHandle>) -> String {
    let m = &*METRICS;
    let l = [model()];
    if let Some(e) = engine {
        let st = e.stats();
        m.running.with_label_values(&l).set(st.running.load(Ordering::Relaxed) as f64);
        m.waiting.with_label_values(&l).set(e.waiting() as f64);
        let used = st.kv_used_bytes.load(Ordering::Relaxed) as f64;
        m.kv_bytes.with_label_values(&l).set(used);
        let total = e.info().kv_total_bytes.max(1) as f64;
        m.kv_usage.with_label_values(&l).set(used / total);
        sync(&m.preemptions, &l, st.preemptions.load(Ordering::Relaxed));
        for d in engine::spec::DrafterKind::ALL {
            let c = &st.spec[d.index()];
            let dl = [model(), d.name()];
            sync(&m.spec_drafts, &dl, c.drafts.load(Ordering::Relaxed));
            sync(&m.spec_draft_tokens, &dl, c.draft_tokens.load(Ordering::Relaxed));
            sync(&m.spec_accepted, &dl, c.accepted_tokens.load(Ordering::Relaxed));
            for (pos, v) in c.accepted_per_pos.iter().enumerate() {
                let p = pos.to_string();
                sync(&m.spec_accepted_per_pos, &[model(), d.name(), &p], v.load(Ordering::Relaxed));
            }
        }
    }
    refresh_experiences(m);
    refresh_trainer(m);
    refresh_kernels(m);
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&m.registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

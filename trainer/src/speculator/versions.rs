//! Speculator versions on disk and their history.
//!
//! Layout under `<state-dir>/speculator/`:
//! - `vNNNNNN/` — one folder per version (`manifest.json`, `weights.safetensors`,
//!   written atomically, checksummed);
//! - `serving.json` — the version serving now (atomic);
//! - `history.json` — every decision with its numbers (atomic).
//!
//! On start the serving version loads; a corrupt or truncated one is skipped
//! with a warning in favour of the newest version that loads.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use engine::spec::speculator::{version_dir, write_atomic, Speculator};
use serde::{Deserialize, Serialize};

/// What happened to a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Saved as the starting version (day 0, a warm start or a restart).
    Initial,
    /// Cut by the trainer and passed the offline gate: now serving.
    Accepted,
    /// Cut by the trainer and failed the offline gate.
    RejectedOffline,
    /// Served, then rolled back by the live gate or an operator.
    RolledBack,
    /// Swapped in by an operator.
    ManualSwap,
    /// Checkpointed on request.
    Snapshot,
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The version concerned.
    pub version: u64,
    /// Its parent.
    pub parent: Option<u64>,
    /// What happened.
    pub event: Event,
    /// Unix seconds.
    pub at_unix: u64,
    /// Trainer steps at the time.
    pub step: u64,
    /// Simulated acceptance length of the version on held-out traces.
    pub simulated: Option<f64>,
    /// The serving version's simulated acceptance length on the same traces.
    pub simulated_serving: Option<f64>,
    /// Live mean acceptance length before the swap.
    pub live_before: Option<f64>,
    /// Live mean acceptance length after the swap.
    pub live_after: Option<f64>,
    /// Free text.
    pub note: String,
}

/// `serving.json`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Serving {
    version: u64,
}

/// The version store.
#[derive(Debug)]
pub struct VersionStore {
    root: PathBuf,
    /// Every decision so far.
    pub history: Vec<HistoryEntry>,
    /// Versions kept on disk.
    pub keep: usize,
}

impl VersionStore {
    /// Opens (creating) `<state_dir>/speculator` and clears what an
    /// interrupted write left: temp files, and version folders with no
    /// manifest (the manifest is written last). A folder that cannot be
    /// created (read-only or full disk) is an error for the caller to
    /// report; [`VersionStore::open_or_warn`] serves on without checkpoints.
    pub fn open(state_dir: &Path, keep: usize) -> std::io::Result<Self> {
        let root = state_dir.join("speculator");
        std::fs::create_dir_all(&root)?;
        let history = std::fs::read(root.join("history.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let store = Self { root, history, keep };
        store.clear_interrupted();
        Ok(store)
    }

    /// [`VersionStore::open`], or on failure a store whose writes fail with
    /// the file system's error (logged once here): serving goes on without
    /// checkpoints.
    pub fn open_or_warn(state_dir: &Path, keep: usize) -> Self {
        Self::open(state_dir, keep).unwrap_or_else(|e| {
            tracing::error!(dir = %state_dir.display(), error = %e,
                "cannot open the speculator checkpoint folder; serving continues without checkpoints");
            Self { root: state_dir.join("speculator"), history: Vec::new(), keep }
        })
    }

    fn clear_interrupted(&self) {
        let is_temp = |p: &Path| p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.starts_with("tmp"));
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if is_temp(&p) {
                let _ = std::fs::remove_file(&p);
            } else if p.is_dir() {
                if !p.join("manifest.json").exists() {
                    tracing::warn!(dir = %p.display(), "removing a speculator version whose write was interrupted (no manifest)");
                    let _ = std::fs::remove_dir_all(&p);
                    continue;
                }
                for f in std::fs::read_dir(&p).into_iter().flatten().filter_map(|f| f.ok()) {
                    if is_temp(&f.path()) {
                        tracing::warn!(file = %f.path().display(), "removing a temp file left by an interrupted checkpoint");
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Versions present on disk, ascending.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.root)
            .map(|it| it.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse().ok()).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Highest version number ever used (on disk or in the history).
    pub fn max_version(&self) -> u64 {
        self.versions().into_iter().chain(self.history.iter().map(|h| h.version)).max().unwrap_or(0)
    }

    /// Saves a version (atomically) and prunes old ones, never the serving
    /// one.
    pub fn save(&self, spec: &mut Speculator, serving: Option<u64>) -> engine::Result<()> {
        spec.save(&version_dir(&self.root, spec.version()))?;
        let vs = self.versions();
        if vs.len() > self.keep {
            for v in &vs[..vs.len() - self.keep] {
                if Some(*v) != serving && *v != spec.version() {
                    let _ = std::fs::remove_dir_all(version_dir(&self.root, *v));
                }
            }
        }
        Ok(())
    }

    /// Loads version `v`.
    pub fn load(&self, v: u64, fingerprint: &str, embed: Tensor) -> engine::Result<Speculator> {
        Speculator::load(&version_dir(&self.root, v), fingerprint, embed)
    }

    /// Records which version serves (atomically).
    pub fn set_serving(&self, v: u64) -> engine::Result<()> {
        let json = serde_json::to_vec(&Serving { version: v }).map_err(|e| engine::EngineError::model(&self.root, e.to_string()))?;
        write_atomic(&self.root.join("serving.json"), &json)
    }

    /// The version recorded as serving, if any.
    pub fn serving(&self) -> Option<u64> {
        let b = std::fs::read(self.root.join("serving.json")).ok()?;
        serde_json::from_slice::<Serving>(&b).ok().map(|s| s.version)
    }

    /// Appends to the history and writes it (atomically).
    pub fn record(&mut self, e: HistoryEntry) {
        tracing::info!(version = e.version, event = ?e.event, simulated = ?e.simulated, simulated_serving = ?e.simulated_serving,
            live_before = ?e.live_before, live_after = ?e.live_after, note = %e.note, "speculator version decision");
        self.history.push(e);
        if let Ok(json) = serde_json::to_vec_pretty(&self.history) {
            if let Err(err) = write_atomic(&self.root.join("history.json"), &json) {
                tracing::warn!(error = %err, "cannot write the speculator history; serving continues");
            }
        }
    }

    /// The serving version from disk, or the newest that loads; corrupt
    /// versions are skipped with a warning.
    pub fn load_latest(&self, fingerprint: &str, embed: &Tensor) -> Option<Speculator> {
        let mut order: Vec<u64> = self.versions();
        order.reverse();
        if let Some(s) = self.serving() {
            order.retain(|&v| v != s);
            order.insert(0, s);
        }
        for v in order {
            match self.load(v, fingerprint, embed.clone()) {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(version = v, error = %e, "skipping a speculator version that does not load"),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("ouro-vs-{}", std::process::id()));
        let mut s = VersionStore::open(&dir, 5).unwrap();
        s.record(HistoryEntry {
            version: 3,
            parent: Some(2),
            event: Event::Accepted,
            at_unix: 1,
            step: 10,
            simulated: Some(1.5),
            simulated_serving: Some(1.2),
            live_before: None,
            live_after: None,
            note: "x".into(),
        });
        let s2 = VersionStore::open(&dir, 5).unwrap();
        assert_eq!(s2.history, s.history);
        assert_eq!(s2.max_version(), 3);
        std::fs::remove_dir_all(&dir).ok();
    }
}

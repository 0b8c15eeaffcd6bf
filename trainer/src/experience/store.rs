//! Experience libraries in SQLite: named, versioned, old versions kept.
//!
//! Every change writes a whole new version in one transaction: the version
//! row, a copy of every item (a library holds tens of items, so snapshots
//! are cheap and a version can be read without replaying edits), and the
//! library's `current_version`. Readers use their own connections in WAL
//! mode, so they see either the old or the new version, never a mix, and
//! never wait on a writer. Item ids are stable integers, allocated per
//! library; usage and win counters live beside the versions (they count
//! rated completions, not edits, so updating them writes no version).
//!
//! Each version records where it came from ([`Origin`]): the key that made
//! a change by hand (as a hash, never the key), the learn job, or the
//! feedback batch. Databases written before that was recorded are migrated
//! in place on open (their old versions report no origin).
//!
//! The calls are synchronous (SQLite); async callers run them with
//! `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use engine::unix_now;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use super::ExperienceError;

/// Schema version, kept in `PRAGMA user_version`: 1 without the origin
/// columns of `versions`, 2 with them.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS libraries (
    name TEXT PRIMARY KEY,
    current_version INTEGER NOT NULL,
    next_item_id INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    library TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    source TEXT NOT NULL,
    note TEXT NOT NULL,
    actor TEXT,
    job_id TEXT,
    feedback_batch TEXT,
    PRIMARY KEY (library, version)
);
CREATE TABLE IF NOT EXISTS version_items (
    library TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    created_version INTEGER NOT NULL,
    updated_version INTEGER NOT NULL,
    PRIMARY KEY (library, version, position)
);
CREATE TABLE IF NOT EXISTS item_stats (
    library TEXT NOT NULL,
    item_id INTEGER NOT NULL,
    uses INTEGER NOT NULL,
    wins INTEGER NOT NULL,
    PRIMARY KEY (library, item_id)
);
";

/// Schema 1 to 2: the origin columns (NULL for the versions written before).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE versions ADD COLUMN actor TEXT;
ALTER TABLE versions ADD COLUMN job_id TEXT;
ALTER TABLE versions ADD COLUMN feedback_batch TEXT;
";

/// What a version's `source` can be, in metric order.
pub const SOURCES: [&str; 5] = ["create", "edit", "rollback", "learn", "feedback"];

/// Where a version came from: the audit trail kept with it. Every field is
/// `None` for versions written before origins were recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// Who caused it: `admin` (the admin key), `key:<16 hex digits>` (a
    /// hash of the API key; the key itself is never stored) or `anonymous`
    /// (a server without keys). For feedback versions, the raters of the
    /// batch, comma-separated.
    pub actor: Option<String>,
    /// The learn job that wrote it.
    pub job_id: Option<String>,
    /// The feedback batch that wrote it.
    pub feedback_batch: Option<String>,
}

impl Origin {
    /// A change by hand by `actor`.
    pub fn by(actor: &str) -> Self {
        Self { actor: Some(actor.to_string()), ..Self::default() }
    }
}

/// One experience.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// Stable id within its library (never reused).
    pub id: u64,
    /// The experience (4-40 words when written by the distiller).
    pub text: String,
    /// The version that added it.
    pub created_version: u64,
    /// The version that last changed its text.
    pub updated_version: u64,
    /// Rated completions whose prompt held this item.
    pub uses: u64,
    /// Of those, the ones with reward >= 0.5.
    pub wins: u64,
}

/// One version of a library.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Library {
    /// Library name.
    pub name: String,
    /// Version number (0 is the empty library at creation).
    pub version: u64,
    /// Items in order.
    pub items: Vec<Item>,
    /// Unix seconds when this version was written.
    pub created_at: u64,
}

/// A version's metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Who wrote it: `create`, `edit`, `learn`, `feedback`, `rollback`.
    pub source: String,
    /// What changed, for people.
    pub note: String,
    /// Items in it.
    pub items: usize,
    /// The key, job or feedback batch behind it.
    #[serde(flatten)]
    pub origin: Origin,
}

/// A library in a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LibrarySummary {
    /// Name.
    pub name: String,
    /// Current version.
    pub version: u64,
    /// Items in the current version.
    pub items: usize,
    /// Unix seconds when the library was created.
    pub created_at: u64,
    /// Unix seconds when the current version was written.
    pub updated_at: u64,
}

/// An item of a version about to be written: `id: None` takes a new id.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// An existing item's id, or `None` for a new item.
    pub id: Option<u64>,
    /// Its text.
    pub text: String,
}

/// Why a version is written, recorded with it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The items of the new version, in order.
    pub items: Vec<Draft>,
    /// `edit`, `learn`, `feedback`, `rollback`.
    pub source: String,
    /// What changed.
    pub note: String,
    /// The key, job or feedback batch behind it.
    pub origin: Origin,
}

/// The SQLite store (one file).
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    versions_kept: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("versions_kept", &self.versions_kept).finish()
    }
}

fn db_err(e: rusqlite::Error) -> ExperienceError {
    use rusqlite::ErrorCode::{CannotOpen, DiskFull, ReadOnly, SystemIoFailure};
    match e.sqlite_error_code() {
        Some(ReadOnly | DiskFull | CannotOpen | SystemIoFailure) => ExperienceError::Unwritable(format!(
            "the experience store cannot be written ({e}): the state folder is read-only or full; serving continues and libraries are read-only until it is fixed"
        )),
        _ => ExperienceError::Store(e.to_string()),
    }
}

fn open_connection(path: &Path) -> Result<Connection, ExperienceError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the store at `path`, keeping the newest
    /// `versions_kept` versions of each library (at least 1).
    pub fn open(path: &Path, versions_kept: usize) -> Result<Self, ExperienceError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ExperienceError::Store(format!("creating {}: {e}", dir.display())))?;
        }
        let mut conn = open_connection(path)?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db_err)?;
        if found > SCHEMA_VERSION {
            return Err(ExperienceError::Store(format!(
                "{} has schema version {found}; this ouro understands up to {SCHEMA_VERSION}",
                path.display()
            )));
        }
        // One transaction: an interrupted migration leaves the old schema.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        if found == 1 {
            tx.execute_batch(MIGRATE_1_TO_2).map_err(db_err)?;
            tracing::info!(path = %path.display(), "experience store migrated to schema 2 (version origins)");
        }
        tx.execute_batch(SCHEMA).map_err(db_err)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            versions_kept: versions_kept.max(1),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Versions kept per library.
    pub fn versions_kept(&self) -> usize {
        self.versions_kept
    }

    /// Runs `f` on a pooled read connection inside one read transaction
    /// (a consistent snapshot).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, ExperienceError>) -> Result<T, ExperienceError> {
        let pooled = self.readers.lock().map_err(|_| ExperienceError::Store("reader pool poisoned".into()))?.pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let out = {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(db_err)?;
            let out = f(&tx);
            let _ = tx.finish();
            out
        };
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < 8 {
                pool.push(conn);
            }
        }
        out
    }

    /// Every library with its current version.
    pub fn list(&self) -> Result<Vec<LibrarySummary>, ExperienceError> {
        self.read(|c| {
            let mut st = c
                .prepare(
                    "SELECT l.name, l.current_version, l.created_at, v.created_at,
                        (SELECT COUNT(*) FROM version_items i WHERE i.library = l.name AND i.version = l.current_version)
                     FROM libraries l JOIN versions v ON v.library = l.name AND v.version = l.current_version
                     ORDER BY l.name",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([], |r| {
                    Ok(LibrarySummary {
                        name: r.get(0)?,
                        version: r.get::<_, i64>(1)? as u64,
                        created_at: r.get::<_, i64>(2)? as u64,
                        updated_at: r.get::<_, i64>(3)? as u64,
                        items: r.get::<_, i64>(4)? as usize,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
    }

    /// The current version of `name`, if the library exists.
    pub fn load(&self, name: &str) -> Result<Option<Library>, ExperienceError> {
        self.read(|c| {
            let v: Option<i64> =
                c.query_row("SELECT current_version FROM libraries WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(db_err)?;
            match v {
                Some(v) => load_version(c, name, v as u64),
                None => Ok(None),
            }
        })
    }

    /// Version `version` of `name`, if it is kept.
    pub fn load_version(&self, name: &str, version: u64) -> Result<Option<Library>, ExperienceError> {
        self.read(|c| load_version(c, name, version))
    }

    /// The kept versions of `name`, newest first (`None`: no such library).
    pub fn versions(&self, name: &str) -> Result<Option<Vec<VersionInfo>>, ExperienceError> {
        self.read(|c| {
            let exists: Option<i64> =
                c.query_row("SELECT 1 FROM libraries WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(db_err)?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut st = c
                .prepare(
                    "SELECT v.version, v.created_at, v.source, v.note,
                        (SELECT COUNT(*) FROM version_items i WHERE i.library = v.library AND i.version = v.version),
                        v.actor, v.job_id, v.feedback_batch
                     FROM versions v WHERE v.library = ?1 ORDER BY v.version DESC",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([name], |r| {
                    Ok(VersionInfo {
                        version: r.get::<_, i64>(0)? as u64,
                        created_at: r.get::<_, i64>(1)? as u64,
                        source: r.get(2)?,
                        note: r.get(3)?,
                        items: r.get::<_, i64>(4)? as usize,
                        origin: Origin { actor: r.get(5)?, job_id: r.get(6)?, feedback_batch: r.get(7)? },
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map(Some).map_err(db_err)
        })
    }

    /// Creates `name` with an empty version 0 recorded as made by `origin`,
    /// or returns it as it is; `true` when it was created.
    pub fn create(&self, name: &str, origin: &Origin) -> Result<(Library, bool), ExperienceError> {
        let mut conn = self.writer.lock().map_err(|_| ExperienceError::Store("writer poisoned".into()))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let exists: Option<i64> =
            tx.query_row("SELECT current_version FROM libraries WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(db_err)?;
        if exists.is_none() {
            let t = unix_now() as i64;
            tx.execute("INSERT INTO libraries (name, current_version, next_item_id, created_at) VALUES (?1, 0, 0, ?2)", params![name, t])
                .map_err(db_err)?;
            tx.execute(
                "INSERT INTO versions (library, version, created_at, source, note, actor, job_id, feedback_batch)
                 VALUES (?1, 0, ?2, 'create', 'created empty', ?3, ?4, ?5)",
                params![name, t, origin.actor, origin.job_id, origin.feedback_batch],
            )
            .map_err(db_err)?;
        }
        let v = exists.unwrap_or(0) as u64;
        let lib = load_version(&tx, name, v)?.ok_or_else(|| ExperienceError::Store(format!("library {name} lost its version {v}")))?;
        tx.commit().map_err(db_err)?;
        Ok((lib, exists.is_none()))
    }

    /// Writes `change` as the next version of `name`, in one transaction.
    ///
    /// With `base: Some(v)`, fails with [`ExperienceError::Conflict`] unless
    /// `v` is still the current version (a concurrent writer got there
    /// first). Drafts with an unknown `id` take a new id. Versions beyond
    /// the newest `versions_kept` are deleted in the same transaction.
    pub fn commit(&self, name: &str, base: Option<u64>, change: &Change) -> Result<Library, ExperienceError> {
        let mut conn = self.writer.lock().map_err(|_| ExperienceError::Store("writer poisoned".into()))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let row: Option<(i64, i64)> = tx
            .query_row("SELECT current_version, next_item_id FROM libraries WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db_err)?;
        let Some((current, mut next_id)) = row else {
            return Err(ExperienceError::NotFound(format!("no experience library named `{name}`")));
        };
        let current = current as u64;
        if let Some(b) = base {
            if b != current {
                return Err(ExperienceError::Conflict(format!("library `{name}` moved from version {b} to {current}")));
            }
        }
        let old = load_version(&tx, name, current)?.map(|l| l.items).unwrap_or_default();
        let version = current + 1;
        let t = unix_now() as i64;
        let o = &change.origin;
        tx.execute(
            "INSERT INTO versions (library, version, created_at, source, note, actor, job_id, feedback_batch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![name, version as i64, t, change.source, change.note, o.actor, o.job_id, o.feedback_batch],
        )
        .map_err(db_err)?;
        // Ids of items in any kept version, so a rollback keeps its ids.
        let known_ids: std::collections::HashMap<u64, (u64, String)> = {
            let mut st = tx
                .prepare("SELECT item_id, created_version, text, version FROM version_items WHERE library = ?1 ORDER BY version")
                .map_err(db_err)?;
            let rows = st
                .query_map([name], |r| Ok((r.get::<_, i64>(0)? as u64, (r.get::<_, i64>(1)? as u64, r.get::<_, String>(2)?))))
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)?
        };
        let mut seen = std::collections::HashSet::new();
        for (position, d) in change.items.iter().enumerate() {
            let reuse = d.id.filter(|id| known_ids.contains_key(id) && !seen.contains(id));
            let (id, created, updated) = match reuse {
                Some(id) => {
                    let created = known_ids[&id].0;
                    let updated = match old.iter().find(|i| i.id == id) {
                        Some(o) if o.text == d.text => o.updated_version,
                        _ => version,
                    };
                    (id, created, updated)
                }
                None => {
                    let id = next_id as u64;
                    next_id += 1;
                    (id, version, version)
                }
            };
            seen.insert(id);
            tx.execute(
                "INSERT INTO version_items (library, version, position, item_id, text, created_version, updated_version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![name, version as i64, position as i64, id as i64, d.text, created as i64, updated as i64],
            )
            .map_err(db_err)?;
        }
        tx.execute("UPDATE libraries SET current_version = ?2, next_item_id = ?3 WHERE name = ?1", params![name, version as i64, next_id])
            .map_err(db_err)?;
        let oldest_kept = (version + 1).saturating_sub(self.versions_kept as u64) as i64;
        tx.execute("DELETE FROM versions WHERE library = ?1 AND version < ?2", params![name, oldest_kept]).map_err(db_err)?;
        tx.execute("DELETE FROM version_items WHERE library = ?1 AND version < ?2", params![name, oldest_kept]).map_err(db_err)?;
        let lib = load_version(&tx, name, version)?.ok_or_else(|| ExperienceError::Store("the new version vanished".into()))?;
        engine::fault::pause("experience_commit");
        tx.commit().map_err(db_err)?;
        Ok(lib)
    }

    /// Adds usage counts: `(item_id, uses, wins)` per item.
    pub fn record_usage(&self, name: &str, counts: &[(u64, u64, u64)]) -> Result<(), ExperienceError> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock().map_err(|_| ExperienceError::Store("writer poisoned".into()))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        for &(id, uses, wins) in counts {
            tx.execute(
                "INSERT INTO item_stats (library, item_id, uses, wins) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (library, item_id) DO UPDATE SET uses = uses + ?3, wins = wins + ?4",
                params![name, id as i64, uses as i64, wins as i64],
            )
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }
}

fn load_version(c: &Connection, name: &str, version: u64) -> Result<Option<Library>, ExperienceError> {
    let created: Option<i64> = c
        .query_row("SELECT created_at FROM versions WHERE library = ?1 AND version = ?2", params![name, version as i64], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    let Some(created) = created else { return Ok(None) };
    let mut st = c
        .prepare(
            "SELECT i.item_id, i.text, i.created_version, i.updated_version, COALESCE(s.uses, 0), COALESCE(s.wins, 0)
             FROM version_items i LEFT JOIN item_stats s ON s.library = i.library AND s.item_id = i.item_id
             WHERE i.library = ?1 AND i.version = ?2 ORDER BY i.position",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map(params![name, version as i64], |r| {
            Ok(Item {
                id: r.get::<_, i64>(0)? as u64,
                text: r.get(1)?,
                created_version: r.get::<_, i64>(2)? as u64,
                updated_version: r.get::<_, i64>(3)? as u64,
                uses: r.get::<_, i64>(4)? as u64,
                wins: r.get::<_, i64>(5)? as u64,
            })
        })
        .map_err(db_err)?;
    let items = rows.collect::<Result<Vec<_>, _>>().map_err(db_err)?;
    Ok(Some(Library { name: name.to_string(), version, items, created_at: created as u64 }))
}

/// A store as the ouro before version origins wrote it (schema 1, one
/// library `legacy` at version 1 with one used item): the starting point of
/// the migration tests here and in the server's.
#[doc(hidden)]
pub const SCHEMA_1_EXAMPLE: &str = "
    CREATE TABLE libraries (name TEXT PRIMARY KEY, current_version INTEGER NOT NULL, next_item_id INTEGER NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE versions (library TEXT NOT NULL, version INTEGER NOT NULL, created_at INTEGER NOT NULL, source TEXT NOT NULL,
        note TEXT NOT NULL, PRIMARY KEY (library, version));
    CREATE TABLE version_items (library TEXT NOT NULL, version INTEGER NOT NULL, position INTEGER NOT NULL, item_id INTEGER NOT NULL,
        text TEXT NOT NULL, created_version INTEGER NOT NULL, updated_version INTEGER NOT NULL, PRIMARY KEY (library, version, position));
    CREATE TABLE item_stats (library TEXT NOT NULL, item_id INTEGER NOT NULL, uses INTEGER NOT NULL, wins INTEGER NOT NULL,
        PRIMARY KEY (library, item_id));
    INSERT INTO libraries VALUES ('legacy', 1, 1, 1700000000);
    INSERT INTO versions VALUES ('legacy', 0, 1700000000, 'create', 'created empty');
    INSERT INTO versions VALUES ('legacy', 1, 1700000100, 'edit', 'added: Write every answer in plain words.');
    INSERT INTO version_items VALUES ('legacy', 1, 0, 0, 'Write every answer in plain words.', 1, 1);
    INSERT INTO item_stats VALUES ('legacy', 0, 5, 3);
    PRAGMA user_version = 1;
";

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh database path under the system temp folder.
    pub(crate) fn temp_db(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ouro-exp-{tag}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("experiences.sqlite")
    }

    fn drafts(texts: &[&str]) -> Vec<Draft> {
        texts.iter().map(|t| Draft { id: None, text: t.to_string() }).collect()
    }

    fn change(items: Vec<Draft>) -> Change {
        Change { items, source: "edit".into(), note: "test".into(), origin: Origin::by("key:test") }
    }

    #[test]
    fn every_commit_writes_a_new_version_and_keeps_ids_stable() {
        let s = Store::open(&temp_db("ids"), 20).unwrap();
        let (lib, created) = s.create("math", &Origin::by("admin")).unwrap();
        assert_eq!((lib.version, created), (0, true));
        assert!(!s.create("math", &Origin::by("admin")).unwrap().1, "creating an existing library leaves it");
        let v1 = s.commit("math", Some(0), &change(drafts(&["alpha rule one", "beta rule two"]))).unwrap();
        assert_eq!(v1.version, 1);
        assert_eq!(v1.items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![0, 1]);
        let mut items: Vec<Draft> = v1.items.iter().map(|i| Draft { id: Some(i.id), text: i.text.clone() }).collect();
        items[1].text = "beta rule changed".into();
        items.push(Draft { id: None, text: "gamma".into() });
        let v2 = s.commit("math", Some(1), &change(items)).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.items[0].updated_version, 1, "unchanged text keeps its version");
        assert_eq!(v2.items[1].updated_version, 2);
        assert_eq!(v2.items[1].created_version, 1);
        assert_eq!(v2.items[2].id, 2);
        assert_eq!(s.load_version("math", 1).unwrap().unwrap(), v1);
    }

    #[test]
    fn a_stale_base_version_is_a_conflict() {
        let s = Store::open(&temp_db("conflict"), 20).unwrap();
        s.create("a", &Origin::default()).unwrap();
        s.commit("a", Some(0), &change(drafts(&["x"]))).unwrap();
        assert!(matches!(s.commit("a", Some(0), &change(drafts(&["y"]))), Err(ExperienceError::Conflict(_))));
        assert!(matches!(s.commit("nope", None, &change(vec![])), Err(ExperienceError::NotFound(_))));
    }

    #[test]
    fn old_versions_beyond_the_kept_count_are_pruned_and_rollback_restores_ids() {
        let s = Store::open(&temp_db("prune"), 3).unwrap();
        s.create("a", &Origin::default()).unwrap();
        for i in 0..5 {
            s.commit("a", None, &change(drafts(&[&format!("text {i}")]))).unwrap();
        }
        let versions: Vec<u64> = s.versions("a").unwrap().unwrap().iter().map(|v| v.version).collect();
        assert_eq!(versions, vec![5, 4, 3]);
        assert!(s.load_version("a", 2).unwrap().is_none());
        // Roll back to version 3: a new version 6 with version 3's items and ids.
        let v3 = s.load_version("a", 3).unwrap().unwrap();
        let back: Vec<Draft> = v3.items.iter().map(|i| Draft { id: Some(i.id), text: i.text.clone() }).collect();
        let v6 = s
            .commit("a", Some(5), &Change { items: back, source: "rollback".into(), note: "to 3".into(), origin: Origin::by("admin") })
            .unwrap();
        assert_eq!(v6.version, 6);
        assert_eq!(
            v6.items.iter().map(|i| (i.id, &i.text)).collect::<Vec<_>>(),
            v3.items.iter().map(|i| (i.id, &i.text)).collect::<Vec<_>>()
        );
        assert_eq!(s.load("a").unwrap().unwrap().version, 6);
    }

    #[test]
    fn libraries_and_counters_survive_a_restart() {
        let path = temp_db("restart");
        {
            let s = Store::open(&path, 20).unwrap();
            s.create("kept", &Origin::default()).unwrap();
            let v = s.commit("kept", Some(0), &change(drafts(&["remember this rule"]))).unwrap();
            s.record_usage("kept", &[(v.items[0].id, 3, 2)]).unwrap();
            s.record_usage("kept", &[(v.items[0].id, 1, 1)]).unwrap();
        }
        let s = Store::open(&path, 20).unwrap();
        let lib = s.load("kept").unwrap().unwrap();
        assert_eq!(lib.version, 1);
        assert_eq!(lib.items[0].text, "remember this rule");
        assert_eq!((lib.items[0].uses, lib.items[0].wins), (4, 3));
        let list = s.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].name.as_str(), list[0].version, list[0].items), ("kept", 1, 1));
    }

    #[test]
    fn concurrent_readers_see_whole_versions_during_updates() {
        let s = std::sync::Arc::new(Store::open(&temp_db("readers"), 5).unwrap());
        s.create("busy", &Origin::default()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let lib = s.load("busy").unwrap().unwrap();
                        // Version v holds exactly v items, each tagged with v.
                        assert_eq!(lib.items.len() as u64, lib.version, "torn read: {lib:?}");
                        assert!(lib.items.iter().all(|i| i.text == format!("v{}", lib.version)), "torn read: {lib:?}");
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for v in 1..=40u64 {
            let items = (0..v).map(|_| Draft { id: None, text: format!("v{v}") }).collect();
            s.commit("busy", Some(v - 1), &change(items)).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(reads > 0);
        assert_eq!(s.load("busy").unwrap().unwrap().version, 40);
    }

    #[test]
    fn every_version_records_its_origin() {
        let s = Store::open(&temp_db("origin"), 20).unwrap();
        s.create("o", &Origin::by("key:0123456789abcdef")).unwrap();
        let learn = Origin { actor: Some("admin".into()), job_id: Some("learn-1".into()), feedback_batch: None };
        s.commit("o", Some(0), &Change { items: drafts(&["x y z w"]), source: "learn".into(), note: "job".into(), origin: learn.clone() })
            .unwrap();
        let fb = Origin { actor: Some("key:a,key:b".into()), job_id: None, feedback_batch: Some("fb-1".into()) };
        s.commit("o", Some(1), &Change { items: drafts(&["q r s t"]), source: "feedback".into(), note: "fb".into(), origin: fb.clone() })
            .unwrap();
        let v = s.versions("o").unwrap().unwrap();
        assert_eq!(
            v.iter().map(|v| (v.source.as_str(), &v.origin)).collect::<Vec<_>>(),
            vec![("feedback", &fb), ("learn", &learn), ("create", &Origin::by("key:0123456789abcdef"))]
        );
        // The API shows the origin's fields beside the version's.
        let json = serde_json::to_value(&v[1]).unwrap();
        assert_eq!(
            (json["job_id"].as_str(), json["actor"].as_str(), json["source"].as_str()),
            (Some("learn-1"), Some("admin"), Some("learn"))
        );
        assert!(json["feedback_batch"].is_null());
    }

    #[test]
    fn a_schema_1_database_is_migrated_in_place() {
        let path = temp_db("migrate");
        Connection::open(&path).unwrap().execute_batch(SCHEMA_1_EXAMPLE).unwrap();
        let s = Store::open(&path, 20).unwrap();
        // Old versions read back whole, with no origin.
        let lib = s.load("legacy").unwrap().unwrap();
        assert_eq!(
            (lib.version, lib.items[0].text.as_str(), lib.items[0].uses, lib.items[0].wins),
            (1, "Write every answer in plain words.", 5, 3)
        );
        let v = s.versions("legacy").unwrap().unwrap();
        assert_eq!(
            v.iter().map(|v| (v.version, v.source.as_str(), v.origin.clone())).collect::<Vec<_>>(),
            vec![(1, "edit", Origin::default()), (0, "create", Origin::default())]
        );
        // New versions record theirs, and every version survives a reopen.
        s.commit("legacy", Some(1), &change(drafts(&["a new rule after the migration"]))).unwrap();
        drop(s);
        let s = Store::open(&path, 20).unwrap();
        let v = s.versions("legacy").unwrap().unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].origin, Origin::by("key:test"));
        assert_eq!(v[1].origin, Origin::default());
        let conn = Connection::open(&path).unwrap();
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(found, SCHEMA_VERSION);
        let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let path = temp_db("newer");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        assert!(matches!(Store::open(&path, 20), Err(ExperienceError::Store(m)) if m.contains("schema version")));
    }
}

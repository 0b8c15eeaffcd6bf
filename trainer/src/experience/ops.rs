//! Library operations (ADD / UPDATE / DELETE / NONE): consolidating the
//! operations proposed in one step and applying them to a snapshot, in code.
//!
//! The distiller proposes; this module decides. Items are referred to by
//! their label in the step's snapshot (`G0`, `G1`, ... in snapshot order),
//! which [`apply`] maps back to stable ids. The rules (the paper's, made
//! deterministic):
//! - UPDATE of an unknown label becomes an ADD; DELETE of an unknown label
//!   is ignored; an ADD or UPDATE with empty content is skipped. (The
//!   reference code also skips a DELETE without content; we keep it, since
//!   a DELETE needs only its id and small models rarely repeat the text.)
//! - DELETE overrides UPDATE of the same item; several UPDATEs of one item
//!   keep the last; ADDs that nearly duplicate an item or each other merge.
//! - At most `max_deletes` deletions per step; at most `max_items` items
//!   (the least useful, then oldest, are evicted).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::store::{Draft, Item};

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum OpKind {
    /// A new item.
    Add,
    /// New text for an item.
    Update,
    /// Remove an item.
    Delete,
    /// Nothing.
    None,
}

impl OpKind {
    /// Parses an operation name and its common synonyms (MODIFY, REMOVE,
    /// KEEP, ...), case-insensitive.
    pub fn parse(s: &str) -> Option<OpKind> {
        let t: String = s.trim().trim_matches(|c: char| !c.is_alphanumeric()).to_uppercase().replace([' ', '-'], "_");
        Some(match t.as_str() {
            "ADD" | "INSERT" | "NEW" | "CREATE" | "APPEND" | "ADD_NEW" => OpKind::Add,
            "UPDATE" | "MODIFY" | "EDIT" | "REVISE" | "CHANGE" | "REPLACE" | "MERGE" | "REFINE" | "REWRITE" | "AMEND" => OpKind::Update,
            "DELETE" | "REMOVE" | "DROP" | "DISCARD" | "ERASE" => OpKind::Delete,
            "NONE" | "KEEP" | "SKIP" | "NOOP" | "NO_OP" | "IGNORE" | "NO_CHANGE" | "NOTHING" | "RETAIN" | "NULL" => OpKind::None,
            _ => return None,
        })
    }
}

/// A proposed operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    /// What to do.
    pub kind: OpKind,
    /// The target's snapshot label (`G3`) for UPDATE and DELETE.
    pub id: Option<String>,
    /// The text (ADD, UPDATE).
    pub content: String,
}

impl Op {
    /// An ADD of `content`.
    pub fn add(content: impl Into<String>) -> Self {
        Op { kind: OpKind::Add, id: None, content: content.into() }
    }
}

/// Step limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items in a library.
    pub max_items: usize,
    /// Most deletions per step.
    pub max_deletes: usize,
    /// Word-set similarity at or above which two texts are duplicates.
    pub duplicate_similarity: f32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_items: 16, max_deletes: 1, duplicate_similarity: 0.6 }
    }
}

/// The label of snapshot position `i`.
pub fn label(i: usize) -> String {
    format!("G{i}")
}

/// Normalizes an id as models write it (`G3`, `[G3]`, `g3`, `3`, `"G3."`) to
/// a label; other ids are kept as written (they match nothing).
pub fn normalize_label(id: &str) -> String {
    let t = id.trim().trim_matches(|c: char| c == '[' || c == ']' || c == '"' || c == '\'' || c == '.' || c == '(' || c == ')');
    let digits = t.strip_prefix('G').or_else(|| t.strip_prefix('g')).unwrap_or(t);
    match digits.parse::<usize>() {
        Ok(n) => label(n),
        Err(_) => t.to_string(),
    }
}

/// Lowercase alphanumeric words, without the most common English words.
pub fn words(s: &str) -> HashSet<String> {
    const STOP: &[&str] =
        &["the", "a", "an", "and", "or", "to", "of", "in", "on", "for", "is", "it", "be", "with", "your", "you", "that", "this"];
    s.split(|c: char| !c.is_alphanumeric() && c != '\\')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOP.contains(&w.as_str()))
        .collect()
}

/// Jaccard similarity of the word sets of `a` and `b`.
pub fn similarity(a: &str, b: &str) -> f32 {
    let (x, y) = (words(a), words(b));
    if x.is_empty() && y.is_empty() {
        return 1.0;
    }
    let inter = x.intersection(&y).count() as f32;
    inter / (x.len() + y.len()).saturating_sub(inter as usize).max(1) as f32
}

/// Whether `text` nearly duplicates one of `others`.
pub fn near_duplicate<'a>(text: &str, others: impl IntoIterator<Item = &'a str>, threshold: f32) -> bool {
    others.into_iter().any(|o| similarity(text, o) >= threshold)
}

/// Merges the operations of one step: DELETE beats UPDATE of the same item,
/// the last UPDATE of an item wins, near-duplicate ADDs merge, NONEs and
/// empty contents drop, deletions are capped.
pub fn consolidate(ops: &[Op], snapshot: &[Item], limits: &Limits) -> Vec<Op> {
    let known: HashSet<String> = (0..snapshot.len()).map(label).collect();
    let mut deletes: Vec<String> = Vec::new();
    let mut updates: HashMap<String, String> = HashMap::new();
    let mut update_order: Vec<String> = Vec::new();
    let mut adds: Vec<String> = Vec::new();
    for op in ops {
        let id = op.id.as_deref().map(normalize_label);
        let content = op.content.trim();
        match op.kind {
            OpKind::None => {}
            OpKind::Delete => {
                if let Some(id) = id.filter(|i| known.contains(i)) {
                    if !deletes.contains(&id) {
                        deletes.push(id);
                    }
                }
            }
            OpKind::Update if content.is_empty() => {}
            OpKind::Update => match id.filter(|i| known.contains(i)) {
                Some(id) => {
                    if !update_order.contains(&id) {
                        update_order.push(id.clone());
                    }
                    updates.insert(id, content.to_string());
                }
                None => adds.push(content.to_string()),
            },
            OpKind::Add if content.is_empty() => {}
            OpKind::Add => adds.push(content.to_string()),
        }
    }
    deletes.truncate(limits.max_deletes);
    let mut out: Vec<Op> = deletes.iter().map(|d| Op { kind: OpKind::Delete, id: Some(d.clone()), content: String::new() }).collect();
    let mut texts: Vec<String> = snapshot.iter().map(|i| i.text.clone()).collect();
    for id in update_order {
        if deletes.contains(&id) {
            continue;
        }
        let content = updates.remove(&id).unwrap_or_default();
        texts.push(content.clone());
        out.push(Op { kind: OpKind::Update, id: Some(id), content });
    }
    for a in adds {
        if near_duplicate(&a, texts.iter().map(String::as_str), limits.duplicate_similarity) {
            continue;
        }
        texts.push(a.clone());
        out.push(Op::add(a));
    }
    out
}

/// What happened to one operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Applied {
    /// The operation as applied (an UPDATE of an unknown item shows as ADD).
    pub op: Op,
    /// Whether it changed the library.
    pub applied: bool,
    /// Why not, when it did not.
    pub reason: Option<String>,
}

/// Applies a consolidated plan to `snapshot` (in code, never by the model)
/// and returns the next version's items (existing items keep their ids)
/// plus what happened to each operation.
pub fn apply(snapshot: &[Item], plan: &[Op], limits: &Limits) -> (Vec<Draft>, Vec<Applied>) {
    let mut items: Vec<Option<Draft>> = snapshot.iter().map(|i| Some(Draft { id: Some(i.id), text: i.text.clone() })).collect();
    let index: HashMap<String, usize> = (0..snapshot.len()).map(|i| (label(i), i)).collect();
    let mut added: Vec<Draft> = Vec::new();
    let mut log = Vec::new();
    let mut deletes = 0;
    for op in plan {
        let content = op.content.trim().to_string();
        let target = op.id.as_deref().map(normalize_label).and_then(|l| index.get(&l).copied());
        let (applied, reason, shown) = match op.kind {
            OpKind::None => (false, Some("no operation".to_string()), op.clone()),
            OpKind::Add | OpKind::Update if content.is_empty() => (false, Some("empty content".into()), op.clone()),
            OpKind::Add => {
                added.push(Draft { id: None, text: content });
                (true, None, op.clone())
            }
            OpKind::Update => match target {
                Some(t) if items[t].is_some() => {
                    items[t] = Some(Draft { id: Some(snapshot[t].id), text: content });
                    (true, None, op.clone())
                }
                Some(_) => (false, Some("the item was deleted in this step".into()), op.clone()),
                None => {
                    added.push(Draft { id: None, text: content.clone() });
                    (true, Some("unknown id: added instead".into()), Op { kind: OpKind::Add, id: None, content })
                }
            },
            OpKind::Delete => match target {
                Some(_) if deletes >= limits.max_deletes => {
                    (false, Some(format!("at most {} deletions per step", limits.max_deletes)), op.clone())
                }
                Some(t) if items[t].is_some() => {
                    items[t] = None;
                    deletes += 1;
                    (true, None, op.clone())
                }
                _ => (false, Some("unknown id: ignored".into()), op.clone()),
            },
        };
        log.push(Applied { op: shown, applied, reason });
    }
    let mut next: Vec<Draft> = items.into_iter().flatten().chain(added).collect();
    if next.len() > limits.max_items {
        // Evict the least useful (win rate with a prior), then the oldest.
        let score = |d: &Draft| -> (f64, u64) {
            match d.id.and_then(|id| snapshot.iter().find(|i| i.id == id)) {
                Some(i) => ((i.wins as f64 + 1.0) / (i.uses as f64 + 2.0), i.updated_version),
                None => (0.5, u64::MAX),
            }
        };
        let mut order: Vec<usize> = (0..next.len()).collect();
        order.sort_by(|&a, &b| {
            let (sa, sb) = (score(&next[a]), score(&next[b]));
            sa.0.partial_cmp(&sb.0).unwrap_or(std::cmp::Ordering::Equal).then(sa.1.cmp(&sb.1))
        });
        let evict: HashSet<usize> = order.into_iter().take(next.len() - limits.max_items).collect();
        next = next.into_iter().enumerate().filter(|(i, _)| !evict.contains(i)).map(|(_, d)| d).collect();
    }
    (next, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64, text: &str) -> Item {
        Item { id, text: text.into(), created_version: 1, updated_version: 1, uses: 0, wins: 0 }
    }

    fn op(kind: OpKind, id: Option<&str>, content: &str) -> Op {
        Op { kind, id: id.map(str::to_string), content: content.into() }
    }

    fn snapshot() -> Vec<Item> {
        vec![item(10, "Always show the arithmetic step by step"), item(11, "Put the final answer inside boxed braces")]
    }

    #[test]
    fn update_of_an_unknown_id_becomes_an_add_and_delete_of_one_is_ignored() {
        let (next, log) = apply(
            &snapshot(),
            &[op(OpKind::Update, Some("exp_456"), "Check units before answering the question"), op(OpKind::Delete, Some("G9"), "")],
            &Limits::default(),
        );
        assert_eq!(next.len(), 3);
        assert_eq!(next[2], Draft { id: None, text: "Check units before answering the question".into() });
        assert_eq!(log[0].op.kind, OpKind::Add);
        assert!(!log[1].applied);
    }

    #[test]
    fn updates_keep_ids_and_empty_contents_are_skipped() {
        let (next, log) = apply(
            &snapshot(),
            &[op(OpKind::Update, Some("[G1]"), "  Write the final answer as \\boxed{N}  "), op(OpKind::Add, None, " ")],
            &Limits::default(),
        );
        assert_eq!(next[1], Draft { id: Some(11), text: "Write the final answer as \\boxed{N}".into() });
        assert_eq!(next.len(), 2);
        assert!(!log[1].applied);
    }

    #[test]
    fn deletes_per_step_are_capped() {
        let limits = Limits { max_deletes: 1, ..Limits::default() };
        let (next, log) = apply(&snapshot(), &[op(OpKind::Delete, Some("G0"), ""), op(OpKind::Delete, Some("G1"), "")], &limits);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].id, Some(11));
        assert!(log[0].applied && !log[1].applied);
    }

    #[test]
    fn consolidation_lets_delete_beat_update_and_merges_duplicates() {
        let plan = consolidate(
            &[
                op(OpKind::Update, Some("G0"), "Show every arithmetic step"),
                op(OpKind::Delete, Some("G0"), ""),
                op(OpKind::Update, Some("G1"), "first version of the boxed rule"),
                op(OpKind::Update, Some("1"), "Write the final answer inside \\boxed{} at the end"),
                op(OpKind::Add, None, "Double check the sum before writing the answer"),
                op(OpKind::Add, None, "double-check the sum before writing your answer"),
                op(OpKind::Add, None, "Always show the arithmetic step by step"),
                op(OpKind::None, None, "whatever"),
                op(OpKind::Delete, Some("G7"), ""),
            ],
            &snapshot(),
            &Limits::default(),
        );
        assert_eq!(
            plan,
            vec![
                op(OpKind::Delete, Some("G0"), ""),
                op(OpKind::Update, Some("G1"), "Write the final answer inside \\boxed{} at the end"),
                op(OpKind::Add, None, "Double check the sum before writing the answer"),
            ]
        );
    }

    #[test]
    fn the_library_is_capped_by_evicting_the_least_useful_items() {
        let mut snap = snapshot();
        snap[0].uses = 10;
        snap[0].wins = 1;
        snap[1].uses = 10;
        snap[1].wins = 9;
        let limits = Limits { max_items: 2, ..Limits::default() };
        let (next, _) = apply(&snap, &[Op::add("A brand new rule about careful reading")], &limits);
        assert_eq!(next.iter().map(|d| d.id).collect::<Vec<_>>(), vec![Some(11), None]);
    }

    #[test]
    fn synonyms_and_labels_normalize() {
        assert_eq!(OpKind::parse("modify"), Some(OpKind::Update));
        assert_eq!(OpKind::parse("REMOVE"), Some(OpKind::Delete));
        assert_eq!(OpKind::parse(" Keep "), Some(OpKind::None));
        assert_eq!(OpKind::parse("no change"), Some(OpKind::None));
        assert_eq!(OpKind::parse("frobnicate"), None);
        assert_eq!(normalize_label("[G3]."), "G3");
        assert_eq!(normalize_label("2"), "G2");
        assert_eq!(normalize_label("exp_456"), "exp_456");
        assert!(similarity("Put the answer in a box", "put answer in box") > 0.9);
    }
}

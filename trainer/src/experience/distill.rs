//! The LLM steps of one distillation step: semantic advantage (compare the
//! attempts of a group, write an experience) and operations (what to do with
//! it against the library snapshot). Consolidation and application are code
//! ([`super::ops`]).
//!
//! Two ways to get operations out of a model:
//! - **Guided** (models that accept an assistant prefill, i.e. the served
//!   model): a strict schema-guided decoder. Code writes the JSON skeleton
//!   (`{"operation": "`) and the model fills one field at a time with a few
//!   tokens and a stop string; each value is checked against its schema
//!   (an operation name; a `G<n>` label that exists) before the next field.
//!   The output is valid by construction, so nothing can fail to parse; a
//!   value that breaks its schema takes the fallback.
//! - **Json** (any OpenAI-compatible endpoint): the paper's prompt asking for
//!   a JSON list, read by [`super::parse::parse_operations`].
//!
//! In both, a failure takes the deterministic fallback: ADD the candidate
//! unless it nearly duplicates an item. Nothing here returns an error: a
//! failed call or unreadable output is counted in [`StepReport::failures`]
//! and the step goes on with what it has.

use serde::{Deserialize, Serialize};

use super::contrast::{self, with_example};
use super::llm::{message, Llm, LlmRequest};
use super::ops::{self, label, near_duplicate, similarity, Op, OpKind};
use super::parse;
use super::store::Item;

/// One attempt of a group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    /// The completion.
    pub text: String,
    /// Its reward in `[0, 1]`.
    pub reward: f32,
    /// What the verifier found wrong (empty if nothing, or unknown).
    pub critique: String,
}

/// A prompt with several rated attempts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// The task as the user asked it.
    pub question: String,
    /// The ground truth, when known.
    pub answer: Option<String>,
    /// The attempts.
    pub attempts: Vec<Attempt>,
}

impl Group {
    /// Mean reward.
    pub fn mean_reward(&self) -> f32 {
        if self.attempts.is_empty() {
            return 0.0;
        }
        self.attempts.iter().map(|a| a.reward).sum::<f32>() / self.attempts.len() as f32
    }

    /// The highest and lowest reward, when they differ (the only groups
    /// that teach anything).
    pub fn best_and_worst(&self) -> Option<(f32, f32)> {
        let (lo, hi) = self.attempts.iter().fold((f32::MAX, f32::MIN), |(lo, hi), a| (lo.min(a.reward), hi.max(a.reward)));
        (self.attempts.len() >= 2 && hi - lo > 1e-6).then_some((hi, lo))
    }

    /// Whether the rewards differ.
    pub fn is_mixed(&self) -> bool {
        self.best_and_worst().is_some()
    }
}

/// How operations are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Guided when the model supports prefill, else JSON.
    #[default]
    Auto,
    /// The schema-guided decoder.
    Guided,
    /// A JSON list, parsed robustly.
    Json,
    /// No model for operations: ADD unless a near-duplicate.
    Deterministic,
}

/// Distillation settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How operations are obtained.
    pub mode: Mode,
    /// Temperature of the distiller's calls (0: greedy).
    pub temperature: f32,
    /// Experiences asked for per group.
    pub experiences_per_group: usize,
    /// Characters of each attempt shown (head and tail kept).
    pub attempt_chars: usize,
    /// Most tokens of an advantage answer.
    pub advantage_max_tokens: usize,
    /// Whether each experience carries a worked example: the group's
    /// question and its best attempt (see [`with_example`]).
    pub worked_example: bool,
    /// Library limits.
    pub limits: ops::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            temperature: 0.0,
            experiences_per_group: 1,
            attempt_chars: 400,
            advantage_max_tokens: 64,
            worked_example: true,
            limits: ops::Limits::default(),
        }
    }
}

/// Where a step failed (the `stage` label of the failure metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The advantage call failed.
    Advantage,
    /// No usable experience in its answer.
    Extract,
    /// The operations call failed or its output did not parse (fallback used).
    Operations,
    /// Writing the new version failed.
    Commit,
    /// The gate's evaluation failed.
    Gate,
    /// Rollouts failed.
    Rollout,
}

impl Stage {
    /// Every stage, in metric order.
    pub const ALL: [Stage; 6] = [Stage::Advantage, Stage::Extract, Stage::Operations, Stage::Commit, Stage::Gate, Stage::Rollout];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Advantage => "advantage",
            Stage::Extract => "extract",
            Stage::Operations => "operations",
            Stage::Commit => "commit",
            Stage::Gate => "gate",
            Stage::Rollout => "rollout",
        }
    }

    /// Position in [`Stage::ALL`].
    pub fn index(self) -> usize {
        Stage::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// A failure inside a step (the step went on).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// Where.
    pub stage: Stage,
    /// What happened.
    pub message: String,
}

/// What one step proposed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepReport {
    /// Groups given.
    pub groups: usize,
    /// Groups with mixed rewards (the ones used).
    pub groups_used: usize,
    /// Experiences extracted.
    pub candidates: Vec<String>,
    /// Operations proposed (after fallbacks).
    pub proposed: Vec<Op>,
    /// The consolidated plan.
    pub plan: Vec<Op>,
    /// Operations that took the deterministic fallback.
    pub fallbacks: usize,
    /// Failures along the way.
    pub failures: Vec<Failure>,
}

/// Keeps the head and tail of `s` within `max` characters.
fn clip(s: &str, max: usize) -> String {
    let chars: Vec<char> = s.trim().chars().collect();
    if chars.len() <= max {
        return chars.into_iter().collect();
    }
    let head: String = chars[..max * 2 / 3].iter().collect();
    let tail: String = chars[chars.len() - max / 3..].iter().collect();
    format!("{head} [...] {tail}")
}

fn snapshot_list(snapshot: &[Item]) -> String {
    if snapshot.is_empty() {
        return "(none yet)".to_string();
    }
    snapshot.iter().enumerate().map(|(i, it)| format!("[{}]. {}", label(i), it.text)).collect::<Vec<_>>().join("\n")
}

fn attempts_block(g: &Group, chars: usize) -> String {
    let mut order: Vec<&Attempt> = g.attempts.iter().collect();
    // Best first, so a small model sees the good example before the bad.
    order.sort_by(|a, b| b.reward.partial_cmp(&a.reward).unwrap_or(std::cmp::Ordering::Equal));
    order
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let why = if a.critique.is_empty() { String::new() } else { format!(", problem: {}", a.critique) };
            format!("Attempt {} (reward {:.1}{why}):\n{}", i + 1, a.reward, clip(&a.text, chars))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The advantage prompt. `guided`: one instruction after a prefill; else the
/// paper's `<Experiences>` list.
fn advantage_messages(g: &Group, cfg: &Config, guided: bool) -> Vec<engine::chat_template::ChatMessage> {
    let answer = g.answer.as_deref().map(|a| format!("\nCorrect answer: {a}\n")).unwrap_or_default();
    let task = format!("Task:\n{}\n{answer}\n{}", clip(&g.question, cfg.attempt_chars), attempts_block(g, cfg.attempt_chars));
    if guided {
        let mut m = vec![message(
            "system",
            "You are a teacher. You compare attempts at a task and write one general instruction that makes future answers score higher.",
        )];
        // Two worked turns from other domains: a 135M model writes a rule of
        // their shape, where without them it wrote advice like "Always
        // verify your answers." (rules that copy a demonstration are
        // dropped in `advantage`).
        for Demo { question, answer, attempts, rule } in DEMOS {
            let attempts =
                attempts.iter().enumerate().map(|(i, (t, r))| format!("Attempt {} (reward {r:.1}):\n{t}", i + 1)).collect::<Vec<_>>();
            m.push(message("user", format!("Task:\n{question}\n\nCorrect answer: {answer}\n\n{}\n\n{GUIDED_ASK}", attempts.join("\n\n"))));
            m.push(message("assistant", format!("Instruction: {rule}")));
        }
        m.push(message("user", format!("{task}\n\n{GUIDED_ASK}")));
        m
    } else {
        vec![
            message("system", "Improve a working agent by extracting reusable experiences from rated attempts."),
            message(
                "user",
                format!(
                    "{task}\n\nCompare the attempts: what did the higher-reward attempts do that the others did not, and why? Then write at most {k} \
                     general experience(s), each one sentence of 4 to 40 words, in the form \"When [condition], [strategy]\". Do not mention \
                     this task's specific numbers or answer. End with:\n<Experiences>\n1. ...\n</Experiences>",
                    k = cfg.experiences_per_group.max(1)
                ),
            ),
        ]
    }
}

/// Whether `text` gives away this group's answer or copies its question.
fn leaks(text: &str, g: &Group) -> bool {
    if similarity(text, &g.question) >= 0.5 {
        return true;
    }
    match g.answer.as_deref().map(str::trim) {
        Some(a) if !a.is_empty() && a.split_whitespace().count() <= 3 => {
            let needle = a.to_lowercase();
            text.to_lowercase()
                .split(|c: char| c.is_whitespace() || matches!(c, ',' | '.' | ';' | ':' | '(' | ')' | '"' | '{' | '}'))
                .any(|w| w == needle)
        }
        _ => false,
    }
}

/// The question of a guided advantage call.
const GUIDED_ASK: &str = "The higher-reward attempts did something the lower-reward ones did not. Write one short, general instruction \
                          (one sentence) that would make every future answer get reward 1. Do not mention this task's specific numbers.";

/// A demonstration of the guided advantage call.
struct Demo {
    question: &'static str,
    answer: &'static str,
    attempts: &'static [(&'static str, f32)],
    rule: &'static str,
}

/// The demonstrations, from domains unlike the jobs'.
const DEMOS: [Demo; 2] = [
    Demo {
        question: "Name the color of a clear sky. Reply in lowercase.",
        answer: "blue",
        attempts: &[("blue", 1.0), ("Blue!", 0.0), ("The sky is BLUE.", 0.0)],
        rule: "Always write the whole answer in lowercase letters.",
    },
    Demo {
        question: "Give the capital of France. End with 'Done.'",
        answer: "Paris",
        attempts: &[("Paris. Done.", 1.0), ("The capital is Paris.", 0.0)],
        rule: "Always end the answer with the word 'Done.'",
    },
];

/// The first word of a guided instruction (written by code, continued by the model).
const GUIDED_OPENER: &str = "Always";

/// A guided continuation with its opener: `" put the answer..."` becomes
/// `"Always put the answer..."`; a model that starts a sentence of its own
/// (a capital letter) keeps it.
fn after_opener(o: &str) -> String {
    let t = o.trim_start();
    if t.chars().next().is_some_and(|c| c.is_uppercase()) {
        t.to_string()
    } else {
        format!("{GUIDED_OPENER} {t}")
    }
}

/// Extracts up to `experiences_per_group` experiences from one group.
async fn advantage(llm: &dyn Llm, g: &Group, cfg: &Config, guided: bool, seed: u64, report: &mut StepReport) -> Vec<String> {
    let messages = advantage_messages(g, cfg, guided);
    let k = cfg.experiences_per_group.max(1);
    let base = LlmRequest {
        messages,
        // Guided: the prefill ends inside the sentence, so the model cannot
        // answer with a bare newline (the 135M model did, every time).
        prefill: guided.then(|| format!("Instruction: {GUIDED_OPENER}")),
        max_tokens: if guided { cfg.advantage_max_tokens } else { cfg.advantage_max_tokens.max(400) },
        temperature: cfg.temperature,
        seed,
        n: 1,
        stop: if guided { vec!["\n".into()] } else { Vec::new() },
    };
    // The asked-for temperature, then four samples at 0.7; every usable
    // rule is a candidate, and those naming what set the better attempts
    // apart ([`contrast::grounding`]) come first, in the order written.
    let tries = [base.clone(), LlmRequest { temperature: 0.7, n: 4, seed: seed ^ 0x5eed, ..base }];
    let mut found: Vec<String> = Vec::new();
    for req in tries {
        let outs = match llm.generate(req).await {
            Ok(o) => o,
            Err(e) => {
                report.failures.push(Failure { stage: Stage::Advantage, message: e.to_string() });
                break;
            }
        };
        let before = found.len();
        for o in &outs {
            let o = if guided { after_opener(o) } else { o.clone() };
            for e in parse::parse_experiences(&o, k) {
                let copies_demo = guided && DEMOS.iter().any(|d| similarity(&e, d.rule) >= 0.5);
                if !leaks(&e, g) && !copies_demo && !found.iter().any(|f| f.eq_ignore_ascii_case(&e)) {
                    found.push(e);
                }
            }
        }
        if found.len() == before {
            let shown: String = outs.first().map(|o| o.chars().take(160).collect()).unwrap_or_default();
            report.failures.push(Failure { stage: Stage::Extract, message: format!("no usable experience in: {shown:?}") });
        }
    }
    let marks = contrast::distinctive(g);
    // A stable sort: ties keep the order written (greedy first).
    found.sort_by_key(|e| std::cmp::Reverse(contrast::grounding(e, &marks)));
    found.truncate(k);
    found
}

fn fallback(candidate: &str, snapshot: &[Item], cfg: &Config) -> Op {
    if near_duplicate(candidate, snapshot.iter().map(|i| i.text.as_str()), cfg.limits.duplicate_similarity) {
        Op { kind: OpKind::None, id: None, content: String::new() }
    } else {
        Op::add(candidate)
    }
}

fn ops_messages(snapshot: &[Item], candidates: &[String], json: bool) -> Vec<engine::chat_template::ChatMessage> {
    let new = candidates.iter().map(|c| format!("- {c}")).collect::<Vec<_>>().join("\n");
    let answer = if json {
        "Answer with a JSON list, one object per new instruction, and nothing else:\n\
         [{\"operation\": \"ADD\" or \"UPDATE\" or \"DELETE\" or \"NONE\", \"id\": \"G<n>\" (for UPDATE and DELETE), \"content\": \"the instruction\"}]"
    } else {
        "Answer with a JSON object {\"operation\": ..., \"id\": ..., \"content\": ...}."
    };
    vec![
        message("system", "You maintain a short list of instructions for a model."),
        message(
            "user",
            format!(
                "Current instructions:\n{}\n\nNew instruction(s):\n{new}\n\nDecide what to do with each new instruction:\n\
                 - ADD: it says something the list does not say yet.\n\
                 - UPDATE: it improves one instruction of the list (give that id).\n\
                 - DELETE: an instruction of the list is wrong (give that id).\n\
                 - NONE: the list already says it.\n{answer}",
                snapshot_list(snapshot)
            ),
        ),
    ]
}

/// The guided decoder: operation, then id, each a short constrained fill.
async fn guided_op(llm: &dyn Llm, snapshot: &[Item], candidate: &str, cfg: &Config, seed: u64, report: &mut StepReport) -> Op {
    if snapshot.is_empty() {
        return Op::add(candidate);
    }
    let messages = ops_messages(snapshot, &[candidate.to_string()], false);
    let fill = |prefill: String, max_tokens: usize| LlmRequest {
        messages: messages.clone(),
        prefill: Some(prefill),
        max_tokens,
        temperature: cfg.temperature,
        seed,
        n: 1,
        stop: vec!["\"".into(), "\n".into()],
    };
    let op_prefix = "{\"operation\": \"".to_string();
    let kind = match llm.generate(fill(op_prefix.clone(), 4)).await {
        Ok(o) => o.first().and_then(|t| OpKind::parse(t.split_whitespace().next().unwrap_or(""))),
        Err(e) => {
            report.failures.push(Failure { stage: Stage::Operations, message: e.to_string() });
            None
        }
    };
    let Some(kind) = kind else {
        report.fallbacks += 1;
        return fallback(candidate, snapshot, cfg);
    };
    match kind {
        OpKind::Add => fallback(candidate, snapshot, cfg),
        OpKind::None => Op { kind, id: None, content: String::new() },
        OpKind::Update | OpKind::Delete => {
            let name = if kind == OpKind::Update { "UPDATE" } else { "DELETE" };
            let id = match llm.generate(fill(format!("{op_prefix}{name}\", \"id\": \"G"), 3)).await {
                Ok(o) => o.first().and_then(|t| t.trim().parse::<usize>().ok()).filter(|&n| n < snapshot.len()),
                Err(e) => {
                    report.failures.push(Failure { stage: Stage::Operations, message: e.to_string() });
                    None
                }
            };
            match id {
                Some(n) => {
                    Op { kind, id: Some(label(n)), content: if kind == OpKind::Update { candidate.to_string() } else { String::new() } }
                }
                None => {
                    report.fallbacks += 1;
                    fallback(candidate, snapshot, cfg)
                }
            }
        }
    }
}

/// One JSON call for all candidates of a group.
async fn json_ops(llm: &dyn Llm, snapshot: &[Item], candidates: &[String], cfg: &Config, seed: u64, report: &mut StepReport) -> Vec<Op> {
    if snapshot.is_empty() {
        return candidates.iter().map(Op::add).collect();
    }
    let req = LlmRequest {
        messages: ops_messages(snapshot, candidates, true),
        prefill: None,
        max_tokens: 400,
        temperature: cfg.temperature,
        seed,
        n: 1,
        stop: Vec::new(),
    };
    let parsed = match llm.generate(req).await {
        Ok(o) => parse::parse_operations(o.first().map(String::as_str).unwrap_or("")).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match parsed {
        Ok(ops) => ops,
        Err(e) => {
            report.failures.push(Failure { stage: Stage::Operations, message: format!("{e}; fallback: add unless duplicate") });
            report.fallbacks += candidates.len();
            candidates.iter().map(|c| fallback(c, snapshot, cfg)).collect()
        }
    }
}

/// Runs the LLM steps over `groups` against `snapshot` and returns the
/// consolidated plan with a report. Groups without mixed rewards are skipped.
pub async fn propose(llm: &dyn Llm, snapshot: &[Item], groups: &[Group], cfg: &Config, seed: u64) -> StepReport {
    let mut report = StepReport { groups: groups.len(), ..StepReport::default() };
    let guided = match cfg.mode {
        Mode::Auto => llm.supports_prefill(),
        Mode::Guided => llm.supports_prefill(),
        Mode::Json | Mode::Deterministic => false,
    };
    for (gi, g) in groups.iter().filter(|g| g.is_mixed()).enumerate() {
        report.groups_used += 1;
        let gseed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(gi as u64);
        let mut candidates = advantage(llm, g, cfg, guided, gseed, &mut report).await;
        if cfg.worked_example {
            candidates = if candidates.is_empty() {
                with_example(None, g).into_iter().collect()
            } else {
                candidates.iter().filter_map(|c| with_example(Some(c), g)).collect()
            };
        }
        let candidates: Vec<String> = candidates
            .into_iter()
            .filter(|c| !near_duplicate(c, report.candidates.iter().map(String::as_str), cfg.limits.duplicate_similarity))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        report.candidates.extend(candidates.iter().cloned());
        let ops = match cfg.mode {
            Mode::Deterministic => candidates.iter().map(|c| fallback(c, snapshot, cfg)).collect(),
            _ if guided => {
                let mut v = Vec::new();
                for c in &candidates {
                    v.push(guided_op(llm, snapshot, c, cfg, gseed, &mut report).await);
                }
                v
            }
            _ => json_ops(llm, snapshot, &candidates, cfg, gseed, &mut report).await,
        };
        report.proposed.extend(ops);
    }
    report.plan = ops::consolidate(&report.proposed, snapshot, &cfg.limits);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experience::llm::LlmError;
    use futures::future::BoxFuture;
    use std::sync::Mutex;

    /// A scripted model: answers in order, records prompts.
    struct Scripted {
        answers: Mutex<Vec<Result<String, LlmError>>>,
        prefill: bool,
        seen: Mutex<Vec<LlmRequest>>,
    }

    impl Scripted {
        fn new(prefill: bool, answers: Vec<Result<&str, LlmError>>) -> Self {
            Self {
                answers: Mutex::new(answers.into_iter().rev().map(|a| a.map(str::to_string)).collect()),
                prefill,
                seen: Mutex::new(Vec::new()),
            }
        }
    }

    impl Llm for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }
        fn supports_prefill(&self) -> bool {
            self.prefill
        }
        fn generate(&self, req: LlmRequest) -> BoxFuture<'_, Result<Vec<String>, LlmError>> {
            let n = req.n;
            self.seen.lock().unwrap().push(req);
            let a = self.answers.lock().unwrap().pop().unwrap_or(Ok(String::new()));
            Box::pin(async move { a.map(|t| vec![t; n]) })
        }
    }

    fn group(rewards: &[f32]) -> Group {
        Group {
            question: "What is 3 + 4? Give the final answer.".into(),
            answer: Some("7".into()),
            attempts: rewards
                .iter()
                .map(|&r| Attempt {
                    text: if r > 0.5 { "\\boxed{7}".into() } else { "it is 7".into() },
                    reward: r,
                    critique: String::new(),
                })
                .collect(),
        }
    }

    /// Experiences without the worked example (what the model wrote, alone).
    fn rules_only() -> Config {
        Config { worked_example: false, ..Config::default() }
    }

    fn item(id: u64, text: &str) -> Item {
        Item { id, text: text.into(), created_version: 1, updated_version: 1, uses: 0, wins: 0 }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn only_groups_with_mixed_rewards_are_used() {
        // The greedy call, then the samples (the same rule again: one candidate).
        let rule = " Always put the final answer inside \\boxed{} at the end.";
        let llm = Scripted::new(true, vec![Ok(rule), Ok(rule)]);
        let r = block_on(propose(&llm, &[], &[group(&[1.0, 1.0]), group(&[0.0, 0.0, 0.0]), group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!((r.groups, r.groups_used), (3, 1));
        assert_eq!(r.plan, vec![Op::add("Always put the final answer inside \\boxed{} at the end.")]);
        let seen = llm.seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "an empty library needs no operations call");
        assert_eq!(seen[0].prefill.as_deref(), Some("Instruction: Always"));
        assert_eq!((seen[0].n, seen[1].n, seen[1].temperature), (1, 4, 0.7));
        assert_eq!(after_opener(" write the answer in a box."), "Always write the answer in a box.");
        // The demonstrations come first, the group last.
        assert_eq!(seen[0].messages.len(), 2 + 2 * DEMOS.len());
        assert!(seen[0].messages.last().unwrap().content.contains("Attempt 1 (reward 1.0):\n\\boxed{7}"));
    }

    #[test]
    fn the_guided_decoder_fills_operation_then_id() {
        let snap = vec![item(5, "Show each step of the work"), item(6, "Write the answer in words")];
        let llm = Scripted::new(true, vec![Ok("Put the final number inside \\boxed{} every time."), Ok(""), Ok("UPDATE"), Ok("1")]);
        let r = block_on(propose(&llm, &snap, &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!(
            r.plan,
            vec![Op { kind: OpKind::Update, id: Some("G1".into()), content: "Put the final number inside \\boxed{} every time.".into() }]
        );
        let seen = llm.seen.lock().unwrap();
        assert_eq!(seen[2].prefill.as_deref(), Some("{\"operation\": \""));
        assert_eq!(seen[3].prefill.as_deref(), Some("{\"operation\": \"UPDATE\", \"id\": \"G"));
    }

    #[test]
    fn broken_fills_and_failed_calls_fall_back_without_crashing() {
        let snap = vec![item(5, "Show each step of the work")];
        // Operation slot answers garbage: ADD unless duplicate.
        let llm = Scripted::new(true, vec![Ok("Box the final answer so it can be checked."), Ok(""), Ok("%%%")]);
        let r = block_on(propose(&llm, &snap, &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!(r.plan, vec![Op::add("Box the final answer so it can be checked.")]);
        assert_eq!(r.fallbacks, 1);
        // An id outside the snapshot: fallback again.
        let llm = Scripted::new(true, vec![Ok("Box the final answer so it can be checked."), Ok(""), Ok("DELETE"), Ok("9")]);
        let r = block_on(propose(&llm, &snap, &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!(r.plan, vec![Op::add("Box the final answer so it can be checked.")]);
        // The advantage call fails outright: nothing proposed, failure counted.
        let llm = Scripted::new(true, vec![Err(LlmError::Generation("engine stopped".into()))]);
        let r = block_on(propose(&llm, &snap, &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert!(r.plan.is_empty());
        assert_eq!(r.failures[0].stage, Stage::Advantage);
    }

    #[test]
    fn json_mode_parses_robustly_and_falls_back_on_garbage() {
        let snap = vec![item(5, "Show each step of the work")];
        let answer = "<Experiences>\n1. When a number is asked for, end with the number inside \\boxed{}.\n</Experiences>";
        let ops = "```json\n[{'operation': 'MODIFY', 'id': 'G0', 'content': 'Show each step, then box the final number',},]\n```";
        let llm = Scripted::new(false, vec![Ok(answer), Ok(answer), Ok(ops)]);
        let r = block_on(propose(&llm, &snap, &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!(
            r.plan,
            vec![Op { kind: OpKind::Update, id: Some("G0".into()), content: "Show each step, then box the final number".into() }]
        );
        let llm = Scripted::new(false, vec![Ok(answer), Ok(answer), Ok("I am not sure what to do here.")]);
        let r = block_on(propose(&llm, &snap, &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!(r.plan, vec![Op::add("When a number is asked for, end with the number inside \\boxed{}.")]);
        assert_eq!(r.failures.iter().filter(|f| f.stage == Stage::Operations).count(), 1);
    }

    #[test]
    fn experiences_that_leak_the_answer_or_copy_the_question_are_dropped() {
        let g = group(&[1.0, 0.0]);
        assert!(leaks("The answer is 7, always write it.", &g));
        assert!(leaks("What is 3 + 4? Give the final answer.", &g));
        assert!(!leaks("Always put the final answer inside \\boxed{}.", &g));
        // Both tries produce only leaks: nothing proposed, extraction failures counted.
        let llm = Scripted::new(true, vec![Ok("The answer is 7 for this one."), Ok("Write 7 as the final answer here.")]);
        let r = block_on(propose(&llm, &[], &[g], &rules_only(), 1));
        assert!(r.plan.is_empty());
        assert_eq!(r.failures.iter().filter(|f| f.stage == Stage::Extract).count(), 2);
    }

    #[test]
    fn rules_that_name_what_the_rewards_showed_rank_first_and_demo_copies_drop() {
        // Greedy wrote generic advice; a sample named the box the better
        // attempt used; another copied a demonstration.
        let llm = Scripted::new(true, vec![Ok(" verify your answers."), Ok(" put the final answer inside \\boxed{} every time.")]);
        let r = block_on(propose(&llm, &[], &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert_eq!(r.plan, vec![Op::add("Always put the final answer inside \\boxed{} every time.")]);
        let llm =
            Scripted::new(true, vec![Ok(" end the answer with the word 'Done.'"), Ok(" write the whole answer in lowercase letters.")]);
        let r = block_on(propose(&llm, &[], &[group(&[1.0, 0.0])], &rules_only(), 1));
        assert!(r.plan.is_empty(), "{:?}", r.plan);
        assert_eq!(r.failures.iter().filter(|f| f.stage == Stage::Extract).count(), 2);
    }

    #[test]
    fn experiences_carry_a_worked_example() {
        // Through a step: the model's rule gets the example; a step whose
        // rules all leak still yields the example alone.
        let llm = Scripted::new(true, vec![Ok(" put the final answer inside \\boxed{} at the end.")]);
        let r = block_on(propose(&llm, &[], &[group(&[1.0, 0.0])], &Config::default(), 1));
        assert_eq!(
            r.plan,
            vec![Op::add(
                "Always put the final answer inside \\boxed{} at the end. Example: User: What is 3 + 4? Give the final answer. Assistant: \\boxed{7}"
            )]
        );
        let llm = Scripted::new(true, vec![Ok("The answer is 7 for this one."), Ok("Write 7 as the final answer here.")]);
        let r = block_on(propose(&llm, &[], &[group(&[1.0, 0.0])], &Config::default(), 1));
        assert_eq!(
            r.plan,
            vec![Op::add(format!(
                "{} Example: User: What is 3 + 4? Give the final answer. Assistant: \\boxed{{7}}",
                contrast::EXAMPLE_ONLY
            ))]
        );
    }
}

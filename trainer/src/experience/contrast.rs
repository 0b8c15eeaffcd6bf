//! What the rewards of one group show, read by code: the words only its
//! better attempts wrote, how well a proposed rule names them, and the worked
//! example (the question and a clipped best attempt) that an experience can
//! carry for a small student.

use std::collections::HashSet;

use super::distill::{Attempt, Group};
use super::ops::words;
use super::parse;

/// The opener of an experience that is only a worked example (no usable rule).
pub const EXAMPLE_ONLY: &str = "Answer like this example.";

/// Words (as [`words`] reads them) that the best-rewarded attempts wrote and
/// the worst-rewarded ones did not: for a format rule, its marks
/// (`\boxed`); for a content rule, the right terms. Empty for a group without
/// mixed rewards.
pub fn distinctive(g: &Group) -> HashSet<String> {
    let Some((hi, lo)) = g.best_and_worst() else { return HashSet::new() };
    let of = |r: f32| g.attempts.iter().filter(move |a| (a.reward - r).abs() <= 1e-6).flat_map(|a| words(&a.text));
    let worst: HashSet<String> = of(lo).collect();
    of(hi).filter(|w| !worst.contains(w)).collect()
}

/// How many of `distinctive`'s words `rule` names: a rule that names what
/// set the better attempts apart ranks above one that does not.
pub fn grounding(rule: &str, distinctive: &HashSet<String>) -> usize {
    words(rule).intersection(distinctive).count()
}

/// Words of `s`, at most `max`: the first ones (`tail` false) or the last
/// ones (`tail` true), an ellipsis marking the cut.
fn clip_words(s: &str, max: usize, tail: bool) -> String {
    let w: Vec<&str> = s.split_whitespace().collect();
    if w.len() <= max {
        return w.join(" ");
    }
    if tail {
        format!("...{}", w[w.len() - max..].join(" "))
    } else {
        format!("{}...", w[..max].join(" "))
    }
}

/// At most `max` words of `text` around its sentence with the most
/// `distinctive` words (the first such sentence, then its neighbours while
/// they fit), an ellipsis marking each cut.
fn window(text: &str, distinctive: &HashSet<String>, max: usize) -> String {
    let sentences: Vec<&str> = text
        .split_inclusive(['\n', '.', '!', '?'])
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.chars().any(char::is_alphanumeric))
        .collect();
    let Some(core) = (0..sentences.len()).max_by_key(|&i| (words(sentences[i]).intersection(distinctive).count(), usize::MAX - i)) else {
        return String::new();
    };
    let count = |s: &str| s.split_whitespace().count();
    if count(sentences[core]) >= max {
        return clip_words(sentences[core], max, false);
    }
    let (mut lo, mut hi, mut used) = (core, core + 1, count(sentences[core]));
    loop {
        let next = (hi < sentences.len()).then(|| count(sentences[hi])).filter(|n| used + n <= max);
        if let Some(n) = next {
            used += n;
            hi += 1;
            continue;
        }
        let prev = (lo > 0).then(|| count(sentences[lo - 1])).filter(|n| used + n <= max);
        match prev {
            Some(n) => {
                used += n;
                lo -= 1;
            }
            None => break,
        }
    }
    let mut out = sentences[lo..hi].join(" ");
    if lo > 0 {
        out = format!("...{out}");
    }
    if hi < sentences.len() {
        out.push_str(" ...");
    }
    out
}

/// `rule` followed by a worked example from `g`: its question and its best
/// attempt (highest reward, then shortest) clipped to the sentences around
/// what set it apart, so the whole stays within [`parse::MAX_WORDS`]. A small
/// student follows a rule it is shown applied far more often than the rule
/// alone (SmolLM2-135M, 12 sums, greedy: "put the final answer inside
/// \\boxed{}" 0/12, with one worked example 4-7/12). `None` when the group
/// has no attempt better than another. A rule too long to leave room for the
/// example is replaced by [`EXAMPLE_ONLY`].
pub fn with_example(rule: Option<&str>, g: &Group) -> Option<String> {
    let (hi, _) = g.best_and_worst()?;
    let best: &Attempt = g.attempts.iter().filter(|a| (a.reward - hi).abs() <= 1e-6).min_by_key(|a| a.text.split_whitespace().count())?;
    // "Example: User: ... Assistant: ..." costs three words of its own; the
    // question and the answer need at least 12 between them.
    const FRAME: usize = 3;
    const MIN_BODY: usize = 12;
    let rule = rule.map(str::trim).filter(|r| r.split_whitespace().count() + FRAME + MIN_BODY <= parse::MAX_WORDS).unwrap_or(EXAMPLE_ONLY);
    let body = parse::MAX_WORDS - FRAME - rule.split_whitespace().count();
    let question = clip_words(&g.question, body / 2, false);
    let answer = window(&best.text, &distinctive(g), body - question.split_whitespace().count());
    if answer.is_empty() {
        return None;
    }
    Some(format!("{rule} Example: User: {question} Assistant: {answer}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(attempts: &[(&str, f32)]) -> Group {
        Group {
            question: "What is 3 + 4? Give the final answer.".into(),
            answer: Some("7".into()),
            attempts: attempts.iter().map(|(t, r)| Attempt { text: t.to_string(), reward: *r, critique: String::new() }).collect(),
        }
    }

    #[test]
    fn distinctive_words_rank_the_rules_that_name_them() {
        let g = group(&[("3 + 4 is 7.", 0.0), ("So it is \\boxed{7}.", 1.0), ("Seven.", 0.0)]);
        let d = distinctive(&g);
        assert_eq!(d, ["so", "\\boxed"].iter().map(|s| s.to_string()).collect());
        assert_eq!(grounding("Always put the final answer in \\boxed{}.", &d), 1);
        assert_eq!(grounding("Always verify your answers.", &d), 0);
        assert!(distinctive(&group(&[("a", 1.0), ("b", 1.0)])).is_empty());
    }

    #[test]
    fn the_example_is_the_best_attempt_around_what_set_it_apart() {
        let mut g = group(&[("it is 7", 0.0), ("\\boxed{7}", 1.0), ("3 + 4 = 7, so the answer is \\boxed{7}.", 1.0)]);
        // Ties: the shortest best attempt.
        let e = with_example(Some("Always box the final answer."), &g).unwrap();
        assert_eq!(e, "Always box the final answer. Example: User: What is 3 + 4? Give the final answer. Assistant: \\boxed{7}");
        // A long best attempt keeps the sentence with the distinctive mark,
        // not its head or its tail.
        g.question = "word ".repeat(50) + "end?";
        g.attempts[1].text = "First we add. ".repeat(8) + "So the sum is \\boxed{7}. " + &"It was easy. ".repeat(8);
        g.attempts[2].text = g.attempts[1].text.clone();
        g.attempts[0].text = "First we add. It was easy. The sum is 7.".into();
        let e = with_example(Some("Always box the final answer."), &g).unwrap();
        let n = e.split_whitespace().count();
        assert!((parse::MIN_WORDS..=parse::MAX_WORDS).contains(&n), "{n} words: {e}");
        assert!(e.contains("word word...") && e.contains("So the sum is \\boxed{7}.") && e.contains("Assistant: ..."), "{e}");
        // A rule that leaves no room is replaced; no better attempt, no example.
        let e = with_example(Some(&"long ".repeat(30)), &g).unwrap();
        assert!(e.starts_with(EXAMPLE_ONLY), "{e}");
        assert_eq!(with_example(None, &group(&[("a", 1.0), ("b", 1.0)])), None);
    }
}

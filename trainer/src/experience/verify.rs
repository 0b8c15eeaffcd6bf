//! Verifiers: turn a completion and a reference answer into a reward in
//! `[0, 1]` and a one-line critique (what the distiller is told about a
//! failed attempt, as the paper's `<Critique>` block).
//!
//! Never a small model as judge: every verifier here is code.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::ExperienceError;

/// How a completion is checked against the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VerifierSpec {
    /// The trimmed completion equals the answer (whitespace collapsed,
    /// case-insensitive).
    Exact,
    /// The last number in the completion is within `tolerance` of the
    /// answer (absolute, or relative to the answer when that is larger).
    Numeric {
        /// Allowed distance (default 1e-6).
        #[serde(default = "default_tolerance")]
        tolerance: f64,
    },
    /// `pattern` matches the completion; when it has a capture group, group 1
    /// must also equal the answer. Without `pattern`, the answer is the pattern.
    Regex {
        /// A regular expression (Rust `regex` syntax).
        #[serde(default)]
        pattern: Option<String>,
    },
    /// The completion contains the answer (case-insensitive).
    Contains,
    /// The content of the last `\boxed{...}` equals the answer (numbers
    /// compared as numbers).
    Boxed,
}

fn default_tolerance() -> f64 {
    1e-6
}

/// A verifier ready to run (its regex compiled).
#[derive(Debug, Clone)]
pub struct Verifier {
    spec: VerifierSpec,
    regex: Option<Regex>,
}

/// A reward and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// In `[0, 1]`.
    pub reward: f32,
    /// What was wrong (empty when the reward is 1).
    pub critique: String,
}

impl Verdict {
    fn pass() -> Self {
        Self { reward: 1.0, critique: String::new() }
    }
    fn fail(critique: impl Into<String>) -> Self {
        Self { reward: 0.0, critique: critique.into() }
    }
}

impl Verifier {
    /// Builds a verifier; a bad regex is an error naming it.
    pub fn new(spec: VerifierSpec) -> Result<Self, ExperienceError> {
        let regex = match &spec {
            VerifierSpec::Regex { pattern: Some(p) } => Some(
                Regex::new(p)
                    .map_err(|e| ExperienceError::Invalid { param: "verifier.pattern".into(), message: format!("bad regex: {e}") })?,
            ),
            _ => None,
        };
        Ok(Self { spec, regex })
    }

    /// The spec.
    pub fn spec(&self) -> &VerifierSpec {
        &self.spec
    }

    /// Checks the dataset answers this verifier will see (a regex answer
    /// must compile when no pattern is given).
    pub fn check_answer(&self, answer: &str) -> Result<(), String> {
        match &self.spec {
            VerifierSpec::Regex { pattern: None } => Regex::new(answer).map(|_| ()).map_err(|e| format!("bad regex answer: {e}")),
            VerifierSpec::Numeric { .. } if parse_number(answer).is_none() => Err(format!("`{answer}` is not a number")),
            _ => Ok(()),
        }
    }

    /// Rewards `completion` against `answer`.
    pub fn verify(&self, completion: &str, answer: &str) -> Verdict {
        match &self.spec {
            VerifierSpec::Exact => {
                if normalize(completion) == normalize(answer) {
                    Verdict::pass()
                } else {
                    Verdict::fail("the answer is not exactly the expected text")
                }
            }
            VerifierSpec::Numeric { tolerance } => match (last_number(completion), parse_number(answer)) {
                (None, _) => Verdict::fail("no number in the answer"),
                (_, None) => Verdict::fail("the reference answer is not a number"),
                (Some(got), Some(want)) => {
                    if (got - want).abs() <= tolerance.max(tolerance * want.abs()) {
                        Verdict::pass()
                    } else {
                        Verdict::fail(format!("the final number {got} is wrong"))
                    }
                }
            },
            VerifierSpec::Regex { .. } => {
                let re = match &self.regex {
                    Some(r) => r.clone(),
                    None => match Regex::new(answer) {
                        Ok(r) => r,
                        Err(_) => return Verdict::fail("the reference pattern is not a valid regex"),
                    },
                };
                match re.captures(completion) {
                    None => Verdict::fail("the answer does not have the required form"),
                    Some(c) if self.regex.is_some() && c.len() > 1 => match c.get(1) {
                        Some(g) if normalize(g.as_str()) == normalize(answer) => Verdict::pass(),
                        _ => Verdict::fail("the answer has the required form but the wrong value"),
                    },
                    Some(_) => Verdict::pass(),
                }
            }
            VerifierSpec::Contains => {
                if completion.to_lowercase().contains(&answer.trim().to_lowercase()) {
                    Verdict::pass()
                } else {
                    Verdict::fail("the expected answer does not appear")
                }
            }
            VerifierSpec::Boxed => match last_boxed(completion) {
                None => Verdict::fail("no final answer in \\boxed{}"),
                Some(b) => {
                    let same = match (parse_number(&b), parse_number(answer)) {
                        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                        _ => normalize(&b) == normalize(answer),
                    };
                    if same {
                        Verdict::pass()
                    } else {
                        Verdict::fail(format!("\\boxed{{{b}}} holds the wrong answer"))
                    }
                }
            },
        }
    }
}

/// Lowercase, whitespace collapsed, trimmed of surrounding punctuation.
fn normalize(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    collapsed.trim_matches(|c: char| c == '.' || c == '"' || c == '\'' || c == '$').to_string()
}

/// A number written with optional sign, commas, decimals, `$`, `%`.
pub fn parse_number(s: &str) -> Option<f64> {
    let t: String = s.trim().trim_matches(|c| c == '$' || c == '%' || c == '.').chars().filter(|&c| c != ',').collect();
    if let Some((a, b)) = t.split_once('/') {
        let (a, b) = (a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?);
        return (b != 0.0).then(|| a / b);
    }
    t.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// The last number in `s`.
pub fn last_number(s: &str) -> Option<f64> {
    static NUM: std::sync::LazyLock<Option<Regex>> = std::sync::LazyLock::new(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").ok());
    let re = NUM.as_ref()?;
    re.find_iter(s).filter_map(|m| parse_number(m.as_str())).last()
}

/// The content of the last `\boxed{...}` (braces balanced).
pub fn last_boxed(s: &str) -> Option<String> {
    let start = s.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in s[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(s[start..start + i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(spec: VerifierSpec) -> Verifier {
        Verifier::new(spec).unwrap()
    }

    #[test]
    fn boxed_takes_the_last_balanced_box_and_compares_numbers() {
        let b = v(VerifierSpec::Boxed);
        assert_eq!(b.verify("so \\boxed{3} no wait \\boxed{12}", "12").reward, 1.0);
        assert_eq!(b.verify("\\boxed{12.0}", "12").reward, 1.0);
        assert_eq!(b.verify("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}").reward, 1.0);
        let miss = b.verify("the answer is 12", "12");
        assert_eq!(miss.reward, 0.0);
        assert!(miss.critique.contains("boxed"));
        assert_eq!(b.verify("\\boxed{13}", "12").reward, 0.0);
        assert_eq!(b.verify("\\boxed{12", "12").reward, 0.0);
    }

    #[test]
    fn numeric_reads_the_last_number_with_commas_and_tolerance() {
        let n = v(VerifierSpec::Numeric { tolerance: 0.01 });
        assert_eq!(n.verify("3 apples plus 4 is 1,234.001", "1234").reward, 1.0);
        assert_eq!(n.verify("it is 7.", "7").reward, 1.0);
        assert_eq!(n.verify("-5", "-5").reward, 1.0);
        assert_eq!(n.verify("12 then 13", "12").reward, 0.0);
        assert_eq!(n.verify("no digits", "1").reward, 0.0);
        assert!(n.check_answer("abc").is_err());
    }

    #[test]
    fn exact_contains_and_regex_behave_as_documented() {
        assert_eq!(v(VerifierSpec::Exact).verify("  Paris. ", "paris").reward, 1.0);
        assert_eq!(v(VerifierSpec::Exact).verify("It is Paris", "paris").reward, 0.0);
        assert_eq!(v(VerifierSpec::Contains).verify("It is PARIS today", "paris").reward, 1.0);
        let with_group = v(VerifierSpec::Regex { pattern: Some(r"Answer: (\w+)$".into()) });
        assert_eq!(with_group.verify("work...\nAnswer: 42", "42").reward, 1.0);
        assert_eq!(with_group.verify("work...\nAnswer: 41", "42").reward, 0.0);
        assert_eq!(with_group.verify("42", "42").reward, 0.0);
        let answer_is_pattern = v(VerifierSpec::Regex { pattern: None });
        assert_eq!(answer_is_pattern.verify("color: red", r"colou?r: red").reward, 1.0);
        assert!(Verifier::new(VerifierSpec::Regex { pattern: Some("(".into()) }).is_err());
    }

    #[test]
    fn specs_parse_from_json() {
        let s: VerifierSpec = serde_json::from_str(r#"{"type": "numeric"}"#).unwrap();
        assert_eq!(s, VerifierSpec::Numeric { tolerance: 1e-6 });
        let s: VerifierSpec = serde_json::from_str(r#"{"type": "boxed"}"#).unwrap();
        assert_eq!(s, VerifierSpec::Boxed);
    }
}

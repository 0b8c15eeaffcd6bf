//! Robust parsing of what (small) models write: experience lists and
//! operation lists.
//!
//! Operations: the last fenced block, then the first balanced `[...]`, then
//! every top-level `{...}`, then a truncated array cut back to its last
//! whole object; each candidate is read as JSON after stripping `//`, `#`
//! and `/* */` comments and trailing commas, turning Python literals and
//! single quotes into JSON, quoting bare keys and inserting missing commas
//! between objects. Keys and operation names are matched loosely (`op`,
//! `action`, MODIFY, REMOVE, KEEP, ...). When no JSON survives, lines such
//! as `UPDATE G2: text` are read. Only then is it an error, which the caller
//! answers with its deterministic fallback.
//!
//! Experiences: the `<Experiences>` block (closed or not), then the list
//! under an "Experiences" heading, then numbered or bulleted lines, then the
//! whole text; each item is stripped of numbering and quotes, placeholders
//! are rejected and the length is held to 4-40 words.

use regex::Regex;
use serde_json::Value;

use super::ops::{normalize_label, Op, OpKind};

/// Fewest words in an experience.
pub const MIN_WORDS: usize = 4;
/// Most words in an experience.
pub const MAX_WORDS: usize = 40;

/// Why a model's output held no operations.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// Nothing that reads as operations.
    #[error("no operations found in the model's output")]
    NoOperations,
}

fn re(pattern: &str) -> Option<Regex> {
    Regex::new(pattern).ok()
}

// ---------------------------------------------------------------- operations

/// Reads an operation list from a model's output.
pub fn parse_operations(text: &str) -> Result<Vec<Op>, ParseError> {
    for candidate in json_candidates(text) {
        if let Some(v) = lenient_json(&candidate) {
            if let Some(ops) = ops_from_value(&v) {
                return Ok(ops);
            }
        }
    }
    let ops = ops_from_lines(text);
    if ops.is_empty() {
        Err(ParseError::NoOperations)
    } else {
        Ok(ops)
    }
}

/// Candidate JSON texts, most likely first.
fn json_candidates(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    // The last fenced block (the answer usually follows the prompt's example).
    let fences: Vec<usize> = text.match_indices("```").map(|(i, _)| i).collect();
    if fences.len() >= 2 {
        let (a, b) = (fences[fences.len() - 2], fences[fences.len() - 1]);
        out.push(strip_fence_tag(&text[a + 3..b]));
    }
    if fences.len() % 2 == 1 {
        // An unclosed last fence: everything after it.
        if let Some(&a) = fences.last() {
            out.push(strip_fence_tag(&text[a + 3..]));
        }
    }
    if let Some(arr) = balanced(text, '[', ']') {
        out.push(arr);
    }
    let objects = top_level_objects(text);
    if !objects.is_empty() {
        out.push(format!("[{}]", objects.join(",")));
    }
    if let Some(repaired) = text.find('[').and_then(|start| repair_truncated(&text[start..])) {
        out.push(repaired);
    }
    out
}

fn strip_fence_tag(block: &str) -> String {
    let b = block.trim_start();
    let first_line_end = b.find('\n').unwrap_or(b.len());
    let tag = &b[..first_line_end];
    if !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric()) {
        b[first_line_end..].trim().to_string()
    } else {
        b.trim().to_string()
    }
}

/// The first balanced `open ... close` span, string-aware.
fn balanced(text: &str, open: char, close: char) -> Option<String> {
    let start = text.find(open)?;
    let mut depth = 0i32;
    let mut in_str: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text[start..].char_indices() {
        if let Some(q) = in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                in_str = None;
            }
            continue;
        }
        match c {
            '"' => in_str = Some('"'),
            c2 if c2 == open => depth += 1,
            c2 if c2 == close => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i + c.len_utf8()].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Every balanced top-level `{...}` in `text`.
fn top_level_objects(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(obj) = balanced(rest, '{', '}') {
        let Some(pos) = rest.find(&obj) else { break };
        out.push(obj.clone());
        rest = &rest[pos + obj.len()..];
    }
    out
}

/// A truncated array cut back to its last complete object and closed.
fn repair_truncated(text: &str) -> Option<String> {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut escaped = false;
    let mut last_obj_end = None;
    for (i, c) in text.char_indices() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth -= 1;
                if depth == 1 && c == '}' {
                    last_obj_end = Some(i + 1);
                }
                if depth == 0 {
                    return Some(text[..=i].to_string());
                }
            }
            _ => {}
        }
    }
    last_obj_end.map(|end| format!("{}]", &text[..end]))
}

/// Parses `s` as JSON, first strictly, then after repairs.
pub fn lenient_json(s: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(s.trim()) {
        return Some(v);
    }
    let mut t = s.replace(['\u{201c}', '\u{201d}'], "\"").replace(['\u{2018}', '\u{2019}'], "'");
    t = strip_comments(&t);
    t = python_to_json(&t);
    t = quote_bare_keys(&t);
    t = insert_missing_commas(&t);
    t = strip_trailing_commas(&t);
    serde_json::from_str::<Value>(t.trim()).ok()
}

/// Removes `//`, `#` (to end of line) and `/* */` comments outside strings.
fn strip_comments(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut in_str: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = in_str {
            out.push(c);
            if c == '\\' && i + 1 < chars.len() {
                out.push(chars[i + 1]);
                i += 2;
                continue;
            }
            if c == q {
                in_str = None;
            }
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' {
            in_str = Some(c);
            out.push(c);
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') || c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Single-quoted strings become double-quoted; `True`/`False`/`None`
/// outside strings become JSON literals.
fn python_to_json(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            // Copy a double-quoted string as is.
            out.push(c);
            i += 1;
            while i < chars.len() {
                out.push(chars[i]);
                if chars[i] == '\\' && i + 1 < chars.len() {
                    out.push(chars[i + 1]);
                    i += 2;
                    continue;
                }
                if chars[i] == '"' {
                    i += 1;
                    break;
                }
                i += 1;
            }
        } else if c == '\'' {
            // A single-quoted string: re-quote, escaping inner double quotes.
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                match chars[i] {
                    '"' => out.push_str("\\\""),
                    '\\' if i + 1 < chars.len() => {
                        if chars[i + 1] == '\'' {
                            out.push('\'');
                        } else {
                            out.push('\\');
                            out.push(chars[i + 1]);
                        }
                        i += 1;
                    }
                    ch => out.push(ch),
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if c.is_ascii_alphabetic() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push_str(match word.as_str() {
                "True" => "true",
                "False" => "false",
                "None" => "null",
                _ => &word,
            });
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn quote_bare_keys(s: &str) -> String {
    match re(r#"([\{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*:"#) {
        Some(r) => r.replace_all(s, "$1\"$2\":").into_owned(),
        None => s.to_string(),
    }
}

fn insert_missing_commas(s: &str) -> String {
    let mut t = s.to_string();
    for (pattern, with) in [(r"\}\s*\{", "},{"), (r#""\s*\n\s*""#, "\",\n\"")] {
        if let Some(r) = re(pattern) {
            t = r.replace_all(&t, with).into_owned();
        }
    }
    t
}

fn strip_trailing_commas(s: &str) -> String {
    match re(r",(\s*[\]\}])") {
        Some(r) => r.replace_all(s, "$1").into_owned(),
        None => s.to_string(),
    }
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    obj.iter().find(|(k, _)| names.iter().any(|n| k.trim().eq_ignore_ascii_case(n))).map(|(_, v)| v)
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(a) => a.first().and_then(as_text),
        _ => None,
    }
}

/// Operations from a JSON value; `None` when it does not look like any.
fn ops_from_value(v: &Value) -> Option<Vec<Op>> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Some(Vec::new());
            }
            let ops: Vec<Op> = items.iter().filter_map(op_from_value).collect();
            (!ops.is_empty()).then_some(ops)
        }
        Value::Object(obj) => {
            if let Some(inner) = field(obj, &["operations", "ops", "updates", "actions", "changes", "plan"]) {
                return ops_from_value(inner);
            }
            op_from_value(v).map(|o| vec![o])
        }
        _ => None,
    }
}

fn op_from_value(v: &Value) -> Option<Op> {
    match v {
        Value::Object(obj) => {
            let kind = field(obj, &["operation", "op", "action", "type", "operation_type", "option"])
                .and_then(as_text)
                .and_then(|s| OpKind::parse(&s))?;
            let id = field(obj, &["id", "experience_id", "target", "target_id", "modified_from", "ids", "item", "index"])
                .and_then(as_text)
                .filter(|s| !s.trim().is_empty() && !s.eq_ignore_ascii_case("null"))
                .map(|s| normalize_label(&s));
            let content =
                field(obj, &["content", "text", "experience", "description", "new_content", "new_experience", "value", "new_text"])
                    .and_then(as_text)
                    .map(|s| clean_item(&s))
                    .unwrap_or_default();
            Some(Op { kind, id, content })
        }
        Value::String(s) => ops_from_lines(s).into_iter().next(),
        _ => None,
    }
}

/// Operations written as lines: `UPDATE G2: text`, `1. ADD - text`.
fn ops_from_lines(text: &str) -> Vec<Op> {
    let Some(r) = re(
        r"(?im)^[\s>*\-\d.)]*\**\s*(ADD|UPDATE|MODIFY|EDIT|DELETE|REMOVE|NONE|KEEP|SKIP)\b\**\s*(?:\(?\[?(?:id\s*[:=]?\s*)?(G?\d+)\]?\)?)?\s*[:\-\u2013=]?\s*(.*)$",
    ) else {
        return Vec::new();
    };
    r.captures_iter(text)
        .filter_map(|c| {
            let kind = OpKind::parse(c.get(1)?.as_str())?;
            let id = c.get(2).map(|m| normalize_label(m.as_str()));
            let content = c.get(3).map(|m| clean_item(m.as_str())).unwrap_or_default();
            Some(Op { kind, id, content })
        })
        .collect()
}

// --------------------------------------------------------------- experiences

/// Reads the experiences a model wrote (at most `max` of them, each 4-40
/// words, placeholders rejected).
pub fn parse_experiences(text: &str, max: usize) -> Vec<String> {
    let body = experience_block(text);
    let mut out: Vec<String> = Vec::new();
    for item in split_items(&body) {
        if let Some(e) = valid_experience(&item) {
            if !out.iter().any(|o| o.eq_ignore_ascii_case(&e)) {
                out.push(e);
            }
        }
        if out.len() >= max {
            break;
        }
    }
    out
}

fn experience_block(text: &str) -> String {
    if let Some(r) = re(r"(?is)<experiences?>\s*(.*?)\s*</experiences?>") {
        if let Some(c) = r.captures(text) {
            return c[1].to_string();
        }
    }
    if let Some(r) = re(r"(?is)<experiences?>\s*(.*)$") {
        if let Some(c) = r.captures(text) {
            return c[1].to_string();
        }
    }
    if let Some(r) = re(r"(?im)^\W*(?:new\s+)?(?:experiences|instructions|rules|principles|lessons)\b[^\n]*:?\s*$") {
        if let Some(m) = r.find(text) {
            return text[m.end()..].to_string();
        }
    }
    text.to_string()
}

/// Numbered or bulleted items; unmarked lines continue the previous item.
fn split_items(body: &str) -> Vec<String> {
    let marker = re(r"^\s*(?:[-*\u2022]|\d+[.)]|\[\w+\][.:]?|(?:experience|instruction|rule)\s*\d*\s*[:.])\s*").or_else(|| re("^$"));
    let mut items: Vec<String> = Vec::new();
    let mut any_marker = false;
    for line in body.lines() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let marked = marker.as_ref().is_some_and(|m| m.is_match(l));
        if marked || items.is_empty() || !any_marker {
            any_marker |= marked;
            items.push(l.to_string());
        } else if let Some(last) = items.last_mut() {
            last.push(' ');
            last.push_str(l);
        }
    }
    items
}

/// Strips numbering, labels, quotes and markdown from one item.
pub fn clean_item(s: &str) -> String {
    let mut t = s.trim().to_string();
    let prefixes = [
        r"^(?:[-\u2022]\s*|\*\s+|\d+\s*[.):]\s*)+",
        r"^\[?G?\d+\]?\s*[.:)\-]\s*",
        r"(?i)^(?:new\s+)?(?:experience|instruction|rule|principle|lesson|tip)\s*\d*\s*[:.\-]\s*",
        r"(?i)^\*\*[^*]{1,40}\*\*\s*[:\-]\s*",
    ];
    for _ in 0..2 {
        for p in prefixes {
            if let Some(r) = re(p) {
                t = r.replace(&t, "").into_owned();
            }
        }
    }
    t = t.replace("**", "").replace("</Experiences>", "").replace("</experiences>", "");
    let t = t.trim().trim_matches(|c: char| c == '"' || c == '\'' || c == '`' || c == '\u{201c}' || c == '\u{201d}').trim();
    t.to_string()
}

/// The cleaned item if it is a usable experience.
pub fn valid_experience(raw: &str) -> Option<String> {
    let mut t = clean_item(raw);
    let lower = t.to_lowercase();
    let placeholders = [
        "[experience",
        "<experience",
        "experience 1",
        "your experience",
        "insert ",
        "todo",
        "placeholder",
        "...",
        "[condition]",
        "[strategy]",
        "name: one-sentence",
        "one-sentence description",
    ];
    if placeholders.iter().any(|p| lower.contains(p)) || t.starts_with('{') || t.starts_with('[') || t.starts_with('<') {
        return None;
    }
    let count = t.split_whitespace().count();
    if count > MAX_WORDS {
        // Keep the first sentence when it alone fits.
        let first = t.split_inclusive(['.', '!', '?']).next().unwrap_or("").trim().to_string();
        if first.split_whitespace().count() > MAX_WORDS {
            return None;
        }
        t = first;
    }
    let count = t.split_whitespace().count();
    (MIN_WORDS..=MAX_WORDS).contains(&count).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(ops: &[Op]) -> Vec<(OpKind, Option<String>)> {
        ops.iter().map(|o| (o.kind, o.id.clone())).collect()
    }

    fn one(text: &str) -> Op {
        let ops = parse_operations(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(ops.len(), 1, "{ops:?} from {text}");
        ops.into_iter().next().unwrap()
    }

    /// Outputs as small models write them: each must parse to the expected
    /// operations.
    #[test]
    fn a_corpus_of_malformed_operation_lists_parses() {
        let add = |c: &str| (OpKind::Add, None::<String>, c.to_string());
        type Want = Vec<(OpKind, Option<String>, String)>;
        let cases: Vec<(&str, Want)> = vec![
            // 1. clean JSON
            (r#"[{"operation": "ADD", "content": "Write the answer in a box"}]"#, vec![add("Write the answer in a box")]),
            // 2. prose around a fenced block
            (
                "Sure! Here is the update:\n```json\n[{\"operation\": \"ADD\", \"content\": \"Check the sum twice before answering\"}]\n```\nHope this helps!",
                vec![add("Check the sum twice before answering")],
            ),
            // 3. the prompt's example fence copied first, the answer last
            (
                "Example:\n```json\n[{\"operation\": \"UPDATE\", \"id\": \"exp_456\", \"content\": \"example\"}]\n```\nAnswer:\n```json\n[{\"operation\": \"DELETE\", \"id\": \"G1\"}]\n```",
                vec![(OpKind::Delete, Some("G1".into()), String::new())],
            ),
            // 4. trailing comma
            (r#"[{"operation": "ADD", "content": "Always box the final number",},]"#, vec![add("Always box the final number")]),
            // 5. // comments
            (
                "[\n  {\"operation\": \"ADD\", // new rule\n   \"content\": \"Read the question twice before answering\"}\n]",
                vec![add("Read the question twice before answering")],
            ),
            // 6. # comments
            ("[\n # the new one\n {\"operation\": \"NONE\"}\n]", vec![(OpKind::None, None, String::new())]),
            // 7. /* */ comments
            ("[/* plan */ {\"operation\": \"DELETE\", \"id\": \"G0\"}]", vec![(OpKind::Delete, Some("G0".into()), String::new())]),
            // 8. Python dict with single quotes and None
            (
                "[{'operation': 'UPDATE', 'id': 'G2', 'content': 'Put the result inside boxed braces', 'note': None}]",
                vec![(OpKind::Update, Some("G2".into()), "Put the result inside boxed braces".into())],
            ),
            // 9. synonym MODIFY with a numeric id
            (
                r#"[{"operation": "MODIFY", "id": 3, "content": "State units for every answer given"}]"#,
                vec![(OpKind::Update, Some("G3".into()), "State units for every answer given".into())],
            ),
            // 10. REMOVE and KEEP
            (
                r#"[{"operation": "REMOVE", "id": "[G0]"}, {"operation": "KEEP", "id": "G1"}]"#,
                vec![(OpKind::Delete, Some("G0".into()), String::new()), (OpKind::None, Some("G1".into()), String::new())],
            ),
            // 11. a lone object, no array
            (r#"{"operation": "ADD", "content": "End every answer with the boxed number"}"#, vec![add("End every answer with the boxed number")]),
            // 12. several objects without an array
            (
                "{\"operation\": \"ADD\", \"content\": \"Show each step of the arithmetic\"}\n{\"operation\": \"DELETE\", \"id\": \"G4\"}",
                vec![add("Show each step of the arithmetic"), (OpKind::Delete, Some("G4".into()), String::new())],
            ),
            // 13. missing comma between objects inside an array
            (
                "[{\"operation\": \"ADD\", \"content\": \"Keep answers short and direct\"}\n{\"operation\": \"NONE\"}]",
                vec![add("Keep answers short and direct"), (OpKind::None, None, String::new())],
            ),
            // 14. truncated by max_tokens after one whole object
            (
                "[{\"operation\": \"ADD\", \"content\": \"Box the final answer every time\"}, {\"operation\": \"UPD",
                vec![add("Box the final answer every time")],
            ),
            // 15. unclosed fence
            ("```json\n[{\"operation\": \"ADD\", \"content\": \"Write digits, not words, for numbers\"}]", vec![add("Write digits, not words, for numbers")]),
            // 16. lowercase operation and key names capitalized
            (r#"[{"Operation": "add", "Content": "Answer with one number only please"}]"#, vec![add("Answer with one number only please")]),
            // 17. "op" and "text" keys
            (r#"[{"op": "update", "id": "G0", "text": "Always show work then box it"}]"#, vec![(OpKind::Update, Some("G0".into()), "Always show work then box it".into())]),
            // 18. unquoted keys
            ("[{operation: \"ADD\", content: \"Restate the question before solving it\"}]", vec![add("Restate the question before solving it")]),
            // 19. smart quotes
            ("[{\u{201c}operation\u{201d}: \u{201c}ADD\u{201d}, \u{201c}content\u{201d}: \u{201c}Use the boxed format for answers\u{201d}}]", vec![add("Use the boxed format for answers")]),
            // 20. wrapped in an object
            (r#"{"operations": [{"operation": "DELETE", "id": "G2"}]}"#, vec![(OpKind::Delete, Some("G2".into()), String::new())]),
            // 21. plain lines
            ("ADD: Put the answer in \\boxed{} at the end\nDELETE G1", vec![add("Put the answer in \\boxed{} at the end"), (OpKind::Delete, Some("G1".into()), String::new())]),
            // 22. a numbered markdown list of operations
            ("1. **UPDATE** [G0]: Show the work then the boxed answer\n2. **NONE**", vec![(OpKind::Update, Some("G0".into()), "Show the work then the boxed answer".into()), (OpKind::None, None, String::new())]),
            // 23. empty array: a valid "nothing to do"
            ("No changes are needed.\n```json\n[]\n```", vec![]),
            // 24. True/False literals and extra fields
            (r#"[{"operation": "ADD", "content": "Never skip the final check step", "confident": True}]"#, vec![add("Never skip the final check step")]),
            // 25. id with a trailing period and "action" key
            (r#"[{"action": "Delete", "id": "G3."}]"#, vec![(OpKind::Delete, Some("G3".into()), String::new())]),
            // 26. "modified_from" as in the paper-era code
            (r#"[{"operation": "modify", "modified_from": "G1", "experience": "Box only the final numeric answer"}]"#, vec![(OpKind::Update, Some("G1".into()), "Box only the final numeric answer".into())]),
            // 27. the array on one line after chatter with brackets in the prose
            ("I think (see item G1) this is right: [{\"operation\":\"NONE\",\"id\":\"G1\"}]", vec![(OpKind::None, Some("G1".into()), String::new())]),
            // 28. escaped quotes inside the content
            (r#"[{"operation": "ADD", "content": "Write \"Answer:\" before the final number"}]"#, vec![add("Write \"Answer:\" before the final number")]),
            // 29. operation names with spaces and dashes
            (r#"[{"operation": "no-change"}, {"operation": "Add New", "content": "Double check each digit you copy"}]"#, vec![(OpKind::None, None, String::new()), add("Double check each digit you copy")]),
            // 30. content given as a list of strings
            (r#"[{"operation": "ADD", "content": ["Give the final answer in a box", "extra"]}]"#, vec![add("Give the final answer in a box")]),
            // 31. numbering inside the content is stripped
            (r#"[{"operation": "ADD", "content": "1. Keep the reply under three sentences"}]"#, vec![add("Keep the reply under three sentences")]),
            // 32. one object per line, last one truncated
            ("{\"operation\": \"ADD\", \"content\": \"Think before writing the final answer\"}\n{\"operation\": \"DEL", vec![add("Think before writing the final answer")]),
            // 33. unknown element types are skipped, known ones kept
            (r#"[42, "hello", {"operation": "ADD", "content": "Mention the unit after the number"}]"#, vec![add("Mention the unit after the number")]),
        ];
        assert!(cases.len() >= 30);
        for (i, (text, want)) in cases.iter().enumerate() {
            let got = parse_operations(text).unwrap_or_else(|e| panic!("case {}: {e}: {text}", i + 1));
            let got: Vec<(OpKind, Option<String>, String)> = got.into_iter().map(|o| (o.kind, o.id, o.content)).collect();
            assert_eq!(&got, want, "case {}: {text}", i + 1);
        }
    }

    #[test]
    fn outputs_without_operations_are_errors_not_panics() {
        for text in [
            "",
            "I don't know.",
            "The experiences look good to me.",
            "[[[[",
            "{\"operation\": \"FROB\"}",
            "```json\n```",
            "\u{0}\u{1}binary junk",
            "[{\"content\": \"no operation field here at all\"}]",
        ] {
            assert_eq!(parse_operations(text), Err(ParseError::NoOperations), "{text:?}");
        }
    }

    #[test]
    fn operations_keep_ids_when_ids_are_numbers_in_brackets() {
        let op = one(r#"[{"operation": "UPDATE", "id": "[2]", "content": "Always box the final answer now"}]"#);
        assert_eq!(kinds(&[op]), vec![(OpKind::Update, Some("G2".into()))]);
    }

    #[test]
    fn experiences_come_from_the_tag_block_or_a_list() {
        let tagged = "<Performance Assessment>meh</Performance Assessment>\n<Experiences>\n1. When the question asks for a number, put it in \\boxed{}.\n2. [experience 2]\n</Experiences>";
        assert_eq!(parse_experiences(tagged, 2), vec!["When the question asks for a number, put it in \\boxed{}."]);
        let unclosed = "<Experiences>\n- Always write the final answer as \\boxed{N} at the end.";
        assert_eq!(parse_experiences(unclosed, 2), vec!["Always write the final answer as \\boxed{N} at the end."]);
        let headed =
            "Analysis: attempt 1 was right.\n\nExperiences:\n* **Format**: End with the boxed answer so it can be checked.\n* Too short";
        assert_eq!(parse_experiences(headed, 3), vec!["End with the boxed answer so it can be checked."]);
        let plain = "Instruction: Always end the answer with \\boxed{} around the number.";
        assert_eq!(parse_experiences(plain, 1), vec!["Always end the answer with \\boxed{} around the number."]);
    }

    #[test]
    fn experiences_hold_to_the_word_limits_and_reject_placeholders() {
        assert!(valid_experience("Too short.").is_none());
        assert!(valid_experience("Name: one-sentence description of the experience").is_none());
        assert!(valid_experience("When [condition], do [strategy] every single time").is_none());
        let long = format!("Keep it simple. {}", "word ".repeat(50));
        assert_eq!(valid_experience(&long), None, "the first sentence alone is too short");
        let long2 = format!("Always put the final answer inside boxed braces at the end. {}", "word ".repeat(50));
        assert_eq!(valid_experience(&long2).as_deref(), Some("Always put the final answer inside boxed braces at the end."));
        assert_eq!(valid_experience("3. \"Check your arithmetic twice.\"").as_deref(), Some("Check your arithmetic twice."));
    }
}

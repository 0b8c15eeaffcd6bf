//! Chat templates: turning a conversation into the prompt text a model was
//! trained on.
//!
//! [`ChatTemplate`] compiles a model's Hugging Face / GGUF Jinja template with
//! minijinja, set up to behave like the Jinja environment `transformers`
//! renders chat templates in: `trim_blocks` and `lstrip_blocks` on, the
//! trailing newline of the template dropped, Python string and dict methods
//! (`.strip()`, `.startswith()`, `.items()`), `raise_exception(msg)`,
//! `strftime_now(fmt)`, and a `tojson` filter that writes what Python's
//! `json.dumps` writes. The rendered text is encoded without adding BOS again
//! when the template writes `{{ bos_token }}` (see `Tokenizer::encode`).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::error::{EngineError, Result};

/// The name the template is compiled under (shown in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// Plain ChatML, as SmolLM2's template without its default system prompt.
const CHATML: &str = r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever roles the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A compiled chat template with the BOS and EOS strings it may write.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Hugging Face / GGUF Jinja chat template. A syntax error is
    /// an [`EngineError::Template`] naming the line.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = hf_environment();
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(template_error)?;
        Ok(Self { env, bos_token: bos_token.map(str::to_owned), eos_token: eos_token.map(str::to_owned) })
    }

    /// Plain ChatML (SmolLM2's format without a default system prompt), for
    /// models that ship no template.
    pub fn chatml() -> Self {
        let mut env = hf_environment();
        // A constant the tests render; were it ever invalid, `render` would
        // report the missing template instead of panicking here.
        if let Err(e) = env.add_template(TEMPLATE_NAME, CHATML) {
            tracing::error!(error = %e, "built-in ChatML template does not compile");
        }
        // ChatML writes its tags itself and never uses `bos_token`/`eos_token`.
        Self { env, bos_token: None, eos_token: None }
    }

    /// Renders `messages`. The template sees `messages`,
    /// `add_generation_prompt`, `bos_token` and `eos_token` (undefined, so
    /// rendering as `""`, when the model has none).
    ///
    /// A template that calls `raise_exception(msg)` (say, for an unsupported
    /// role order) gives an [`EngineError::Template`] carrying `msg`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let token = |t: &Option<String>| t.as_deref().map_or(Value::UNDEFINED, Value::from);
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => token(&self.bos_token),
                eos_token => token(&self.eos_token),
            })
            .map_err(template_error)
    }
}

/// An environment that renders like `transformers`' chat template sandbox.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Jinja2's default, which `transformers` keeps: a template file's final
    // newline is not part of the prompt.
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn template_error(e: Error) -> EngineError {
    EngineError::Template(e.to_string())
}

/// `raise_exception(msg)`: fails the render with `msg`.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(fmt)`: the current UTC time formatted like Python's
/// `strftime` (`%Y %y %m %d %e %H %I %M %S %p %B %b %h %A %a %j %F %T %%`).
fn strftime_now(format: String) -> String {
    let unix_secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    strftime(&format, unix_secs)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// Formats a UTC Unix time; unknown directives are written as they are.
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = usize::try_from((days + 4).rem_euclid(7)).unwrap_or(0); // 1970-01-01 was a Thursday.
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS.get(usize::try_from(month - 1).unwrap_or(0)).copied().unwrap_or("");
    let weekday_name = WEEKDAYS.get(weekday).copied().unwrap_or("");
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b' | 'h') => out.push_str(month_name.get(..3).unwrap_or(month_name)),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(weekday_name.get(..3).unwrap_or(weekday_name)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month 1–12, day 1–31), proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Options of the `tojson` filter, named as in `json.dumps`.
struct JsonStyle {
    /// `None`: one line with `", "` and `": "`; `Some(unit)`: one item per
    /// line, nested levels indented by `unit`.
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// `tojson(indent=None, ensure_ascii=False, sort_keys=False)`: what
/// `transformers`' `json.dumps`-based filter writes. minijinja's own `tojson`
/// writes compact JSON and escapes `<`, `>`, `&` and `'` for HTML, which would
/// change tool-call prompts.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_owned()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    let style = JsonStyle {
        indent,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(out: &mut String, value: &Value, style: &JsonStyle, depth: usize) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) if !value.is_integer() && f.is_nan() => out.push_str("NaN"),
            Ok(f) if !value.is_integer() && f.is_infinite() => out.push_str(if f < 0.0 { "-Infinity" } else { "Infinity" }),
            _ => out.push_str(&value.to_string()),
        },
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, ('[', ']'), &items, style, depth, |out, item, depth| write_json(out, item, style, depth))?;
        }
        ValueKind::Map => {
            let mut entries = value
                .try_iter()?
                .map(|key| {
                    let item = value.get_item(&key)?;
                    let key = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                    Ok((key, item))
                })
                .collect::<std::result::Result<Vec<(String, Value)>, Error>>()?;
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(out, ('{', '}'), &entries, style, depth, |out, (key, item), depth| {
                write_json_string(out, key, style.ensure_ascii);
                out.push_str(": ");
                write_json(out, item, style, depth)
            })?;
        }
        _ => write_json_string(out, &value.to_string(), style.ensure_ascii),
    }
    Ok(())
}

/// Writes `open items close` with Python's separators and indentation.
fn write_json_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> std::result::Result<(), Error>,
) -> std::result::Result<(), Error> {
    out.push(open);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
            if style.indent.is_none() {
                out.push(' ');
            }
        }
        if let Some(unit) = &style.indent {
            out.push('\n');
            out.push_str(&unit.repeat(depth + 1));
        }
        write_item(out, item, depth + 1)?;
    }
    if let (Some(unit), false) = (&style.indent, items.is_empty()) {
        out.push('\n');
        out.push_str(&unit.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python writes it: control characters escaped, and with
/// `ensure_ascii` everything outside printable ASCII as `\uXXXX`.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::smollm;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.to_owned(), content: content.to_owned() }
    }

    fn smollm_template() -> ChatTemplate {
        let tok = smollm();
        ChatTemplate::new(tok.chat_template_source().unwrap(), tok.bos_token(), tok.eos_token()).unwrap()
    }

    #[test]
    fn gguf_template_renders_a_conversation_as_chatml() {
        let messages = [
            message("system", "You are a pirate."),
            message("user", "Where is the treasure?"),
            message("assistant", "Arr, buried  on the\nisland."),
        ];
        let rendered = smollm_template().render(&messages, true).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a pirate.<|im_end|>\n\
             <|im_start|>user\nWhere is the treasure?<|im_end|>\n\
             <|im_start|>assistant\nArr, buried  on the\nisland.<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn gguf_template_inserts_its_default_system_prompt() {
        let rendered = smollm_template().render(&[message("user", "Hi")], true).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let without_prompt = smollm_template().render(&[message("user", "Hi")], false).unwrap();
        assert!(without_prompt.ends_with("Hi<|im_end|>\n"), "{without_prompt:?}");
    }

    #[test]
    fn rendered_gguf_template_encodes_to_chatml_token_ids() {
        let tok = smollm();
        let rendered = smollm_template().render(&[message("user", "Hi")], true).unwrap();
        let ids = tok.encode(&rendered, true).unwrap();
        assert_eq!(ids[0], 1);
        // "<|im_end|>" "\n" "<|im_start|>" "ass" "istant" "\n"
        assert_eq!(ids[ids.len() - 6..], [2, 198, 1, 520, 9531, 198]);
        assert_eq!(tok.decode(&ids, false).unwrap(), rendered);
    }

    #[test]
    fn chatml_has_no_default_system_prompt() {
        let rendered = ChatTemplate::chatml().render(&[message("user", "Hi")], true).unwrap();
        assert_eq!(rendered, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let source =
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversations must start with a system message') }}{% endif %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let err = template.render(&[message("user", "Hi")], true).unwrap_err();
        assert!(matches!(&err, EngineError::Template(m) if m.contains("Conversations must start with a system message")), "{err}");
    }

    #[test]
    fn syntax_error_fails_at_new() {
        let err = ChatTemplate::new("{% for message in messages %}{{ message.content }", None, None).unwrap_err();
        assert!(matches!(err, EngineError::Template(_)), "{err}");
    }

    #[test]
    fn python_string_methods_and_whitespace_control_work_like_transformers() {
        let source = "{% for message in messages %}\n  {% if message.content.startswith('  ') %}\n[{{ message.content.strip() }}]\n  {% endif %}\n{% endfor %}\n";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let rendered = template.render(&[message("user", "  padded  "), message("user", "plain")], false).unwrap();
        // trim_blocks eats the newline after a block tag, lstrip_blocks the
        // indentation before it, and the template's final newline is dropped.
        assert_eq!(rendered, "[padded]\n");
    }

    #[test]
    fn bos_and_eos_render_and_missing_ones_render_empty() {
        let source = "{{ bos_token }}|{{ messages[0].content }}|{{ eos_token }}";
        let with = ChatTemplate::new(source, Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(with.render(&[message("user", "x")], false).unwrap(), "<s>|x|</s>");
        let without = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(without.render(&[message("user", "x")], false).unwrap(), "|x|");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let render = |source: &str| ChatTemplate::new(source, None, None).unwrap().render(&[], false).unwrap();
        assert_eq!(
            render(r#"{{ {'a': [1, 2.5, "é <b>\n"], 'b': none, 'c': true} | tojson }}"#),
            r#"{"a": [1, 2.5, "é <b>\n"], "b": null, "c": true}"#
        );
        assert_eq!(render("{{ {'a': [1, 2], 'b': {}} | tojson(indent=2) }}"), "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}");
        assert_eq!(render("{{ 'é😀' | tojson(ensure_ascii=true) }}"), r#""\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn strftime_now_formats_like_python() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = days_from_civil(2024, 7, 26) * 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%A %B %e, %I:%M:%S %p %j %y %% %F %T %Q", t), "Friday July 26, 01:05:09 PM 208 24 % 2024-07-26 13:05:09 %Q");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2024, 1, 1), 19_723);
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));

        let template = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", None, None).unwrap();
        let today = template.render(&[], false).unwrap();
        assert_eq!(today.len(), 10, "{today}");
        assert!(today.starts_with("20"), "{today}");
    }
}

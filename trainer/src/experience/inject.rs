//! Rendering a library into a system prompt, in the paper's deployment form:
//!
//! ```text
//! When solving problems, you MUST first carefully read and understand the helpful instructions and experiences:
//! [G0]. first experience
//! [G1]. second experience
//! ```
//!
//! Items are rendered in library order until the token cap would be passed;
//! the rest are left out (and not counted as used). The block is appended to
//! the conversation's first system message, or becomes one at the front.

use engine::chat_template::ChatMessage;

use super::store::Item;

/// The sentence that introduces the experiences (the paper's wording).
pub const PREAMBLE: &str = "When solving problems, you MUST first carefully read and understand the helpful instructions and experiences:";

/// A rendered library.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The system prompt block.
    pub text: String,
    /// Ids of the items it holds.
    pub item_ids: Vec<u64>,
}

/// Renders `items` within `max_tokens` (as counted by `count`); `None` when
/// nothing fits or the library is empty.
pub fn render(items: &[Item], max_tokens: usize, count: &dyn Fn(&str) -> usize) -> Option<Rendered> {
    let mut text = PREAMBLE.to_string();
    let mut used = count(&text);
    let mut ids = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let line = format!("\n[G{i}]. {}", item.text.trim());
        let cost = count(&line);
        if used + cost > max_tokens {
            break;
        }
        used += cost;
        text.push_str(&line);
        ids.push(item.id);
    }
    (!ids.is_empty()).then_some(Rendered { text, item_ids: ids })
}

/// Puts `block` into the system prompt of `messages`: after the first
/// system message's text, or as a new system message at the front.
pub fn inject(messages: &mut Vec<ChatMessage>, block: &str) {
    match messages.iter_mut().find(|m| m.role == "system") {
        Some(m) if m.content.trim().is_empty() => m.content = block.to_string(),
        Some(m) => {
            m.content.push_str("\n\n");
            m.content.push_str(block);
        }
        None => messages.insert(0, ChatMessage { role: "system".into(), content: block.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(texts: &[&str]) -> Vec<Item> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Item { id: 100 + i as u64, text: t.to_string(), created_version: 1, updated_version: 1, uses: 0, wins: 0 })
            .collect()
    }

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn renders_the_papers_form() {
        let r = render(&items(&["Box the final answer.", "Show the steps."]), 1000, &words).unwrap();
        assert_eq!(r.text, format!("{PREAMBLE}\n[G0]. Box the final answer.\n[G1]. Show the steps."));
        assert_eq!(r.item_ids, vec![100, 101]);
        assert!(render(&[], 1000, &words).is_none());
    }

    #[test]
    fn the_token_cap_drops_the_tail() {
        let preamble = words(PREAMBLE);
        let r = render(&items(&["one two three four", "five six seven eight"]), preamble + 6, &words).unwrap();
        assert_eq!(r.item_ids, vec![100]);
        assert!(render(&items(&["one two three four"]), preamble, &words).is_none());
    }

    #[test]
    fn the_block_joins_an_existing_system_message_or_leads() {
        let mut with_system = vec![
            ChatMessage { role: "system".into(), content: "You are terse.".into() },
            ChatMessage { role: "user".into(), content: "Hi".into() },
        ];
        inject(&mut with_system, "BLOCK");
        assert_eq!(with_system[0].content, "You are terse.\n\nBLOCK");
        let mut without = vec![ChatMessage { role: "user".into(), content: "Hi".into() }];
        inject(&mut without, "BLOCK");
        assert_eq!((without[0].role.as_str(), without[0].content.as_str()), ("system", "BLOCK"));
        assert_eq!(without.len(), 2);
    }
}

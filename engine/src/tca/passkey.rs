//! The passkey retrieval task: a five-digit number hidden at a chosen depth
//! in filler text and asked for at the end. `ouro tca-bench`, the TCA tests
//! and the `passkey_diag` example build the same prompts from here.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

const HEAD: &str =
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the pass key.";
const FILLER: &str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const TAIL: &str = "\nWhat is the pass key? The pass key is";

/// A prompt of about `len` tokens (at most `len`) with `key` stated twice
/// at `depth` (0: right after the instructions, 1: just before the
/// question).
pub fn prompt(tok: &Tokenizer, len: usize, key: u32, depth: f32) -> Result<Vec<u32>> {
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key.");
    let fixed = tok.encode(&format!("{HEAD}{needle}{TAIL}"), true)?.len();
    let per = tok.encode(FILLER, false)?.len().max(1);
    let n = len.saturating_sub(fixed) / per;
    let before = ((n as f32) * depth.clamp(0.0, 1.0)).round() as usize;
    let text = format!("{HEAD}{}{needle}{}{TAIL}", FILLER.repeat(before), FILLER.repeat(n - before.min(n)));
    let mut ids = tok.encode(&text, true)?;
    ids.truncate(len);
    Ok(ids)
}

/// Positions of the tokens that are digits (the key's; the rest of the
/// prompt has none).
pub fn digit_positions(tok: &Tokenizer, ids: &[u32]) -> Vec<usize> {
    (0..ids.len())
        .filter(|&i| {
            tok.decode(&ids[i..i + 1], false).is_ok_and(|s| {
                let s = s.trim();
                !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
            })
        })
        .collect()
}

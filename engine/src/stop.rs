//! Stop strings across token boundaries.
//!
//! [`StopStrings`] receives the text of each new token and returns what may
//! be sent to the client now: text that cannot be the start of a stop string
//! is released at once, a suffix that could still grow into one is held back
//! until it does (then the output ends before it) or cannot (then it is
//! released). The stop string itself is never part of the output, as in the
//! OpenAI API.

/// Result of pushing a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCheck {
    /// Text that can be released now.
    pub text: String,
    /// Whether a stop string was found (the output ends here).
    pub stopped: bool,
}

/// Stop-string matcher for one sequence.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received and not yet released.
    pending: String,
}

impl StopStrings {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds `piece` and returns what can be released.
    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck { text: piece.to_string(), stopped: false };
        }
        self.pending.push_str(piece);
        // Earliest full match wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck { text, stopped: true };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self.longest_partial_suffix();
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopCheck { text, stopped: false }
    }

    /// Releases whatever is held back (at the end of generation).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn longest_partial_suffix(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let max = s.len().saturating_sub(1).min(p.len());
            for n in (best + 1..=max).rev() {
                let start = p.len() - n;
                if p.is_char_boundary(start) && s.starts_with(&p[start..]) {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let c = m.push(p);
            out.push_str(&c.text);
            if c.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_over_tokens_is_found_and_cut() {
        assert_eq!(run(&["END"], &["Hello E", "N", "D and more"]), ("Hello ".into(), true));
    }

    #[test]
    fn a_partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["Hello E", "N", "x"]), ("Hello ENx".into(), false));
    }

    #[test]
    fn text_is_held_back_only_while_it_could_start_a_stop() {
        let mut m = StopStrings::new(&["\n\n".to_string()]);
        assert_eq!(m.push("a\n").text, "a");
        assert_eq!(m.push("b").text, "\nb");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_never_split_inside_a_character() {
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn without_stops_everything_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}

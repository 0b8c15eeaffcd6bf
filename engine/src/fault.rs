//! Fault injection for the reliability tests (issue 8): named points in
//! the code where an environment variable can make the process pause or
//! panic, so a test can kill it at a known moment or watch it recover.
//!
//! - `OURO_FAULT_PAUSE="point=ms[,point=ms]"`: [`pause`] at `point` sleeps
//!   `ms` milliseconds each time, after logging `fault injection: pausing
//!   at <point>` to standard error.
//! - `OURO_FAULT_PANIC="point=n[,point=n]"`: [`panic_point`] at `point`
//!   panics the first `n` times it is reached in this process.
//!
//! Points: `write:<file name>` (inside [`crate::spec::speculator::write_atomic`],
//! half the bytes written), `experience_commit` (inside the experience
//! store's write transaction, before the commit), `trainer_step` (at the
//! start of a speculator training step). Unset, each point costs one
//! relaxed load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

struct Faults {
    pauses: HashMap<String, u64>,
    panics: HashMap<String, (u64, AtomicU64)>,
}

fn parse(var: &str) -> HashMap<String, u64> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn faults() -> &'static Faults {
    static F: OnceLock<Faults> = OnceLock::new();
    F.get_or_init(|| Faults {
        pauses: parse("OURO_FAULT_PAUSE"),
        panics: parse("OURO_FAULT_PANIC").into_iter().map(|(k, n)| (k, (n, AtomicU64::new(0)))).collect(),
    })
}

/// Sleeps here if `OURO_FAULT_PAUSE` names `point`.
pub fn pause(point: &str) {
    if let Some(&ms) = faults().pauses.get(point) {
        eprintln!("fault injection: pausing at {point} for {ms} ms");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Panics here the first `n` times if `OURO_FAULT_PANIC` names `point=n`.
pub fn panic_point(point: &str) {
    if let Some((n, hits)) = faults().panics.get(point) {
        if hits.fetch_add(1, Ordering::Relaxed) < *n {
            panic!("fault injection: panic at {point}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_entries_are_ignored() {
        std::env::set_var("OURO_FAULT_TEST_SPEC", "a=1, b = 20,bad,c=x");
        let m = parse("OURO_FAULT_TEST_SPEC");
        assert_eq!(m.get("a"), Some(&1));
        assert_eq!(m.get("b"), Some(&20));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn unnamed_points_do_nothing() {
        pause("no such point");
        panic_point("no such point");
    }
}

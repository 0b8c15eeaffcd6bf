//! Per-caller request budgets: a token bucket per caller id, refilled
//! continuously (`per_minute` requests a minute, bursts up to the same
//! number). Callers are ids of configured keys (plus `anonymous`), so the
//! table stays as small as the key list.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Budgets of one route, by caller.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_minute` requests a minute per caller (0: no limit).
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, buckets: Mutex::new(HashMap::new()) }
    }

    /// The limit (0: none).
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one request from `caller`'s budget at `now`, or says how long
    /// until it has one.
    pub fn take_at(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let cap = f64::from(self.per_minute);
        let per_s = cap / 60.0;
        let mut b = match self.buckets.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let (tokens, at) = b.entry(caller.to_string()).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_s).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_s))
        }
    }

    /// [`take_at`](Self::take_at) now.
    pub fn take(&self, caller: &str) -> Result<(), Duration> {
        self.take_at(caller, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_budget_that_refills() {
        let r = RateLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.take_at("a", t0).is_ok());
        }
        let wait = r.take_at("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 20.0).abs() < 1e-6, "{wait:?}");
        assert!(r.take_at("b", t0).is_ok(), "another caller is not limited by a's use");
        assert!(r.take_at("a", t0 + Duration::from_secs(19)).is_err());
        assert!(r.take_at("a", t0 + Duration::from_secs(21)).is_ok());
        let unlimited = RateLimiter::new(0);
        assert!((0..1000).all(|_| unlimited.take_at("a", t0).is_ok()));
    }
}

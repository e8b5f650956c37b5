//! Full-jitter exponential backoff.
//!
//! Retry `n` (the first retry is `n = 1`) waits a uniformly random time in
//! `[0, min(max_backoff, initial * multiplier^(n-1))]`. Spreading waits over
//! the whole window, rather than around a fixed delay, keeps many callers
//! that failed together from retrying together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::RetryPolicy;

/// The ceiling of retry `n`'s wait (`n >= 1`).
pub fn ceiling(policy: &RetryPolicy, retry: u32) -> Duration {
    let exponent = retry.saturating_sub(1).min(64) as i32;
    let grown = policy.initial_backoff.as_secs_f64() * policy.backoff_multiplier.powi(exponent);
    let max = policy.max_backoff.as_secs_f64();
    // `min` also tames an overflow to infinity.
    Duration::from_secs_f64(if grown.is_finite() {
        grown.min(max)
    } else {
        max
    })
}

/// A source of uniform random numbers for jitter: splitmix64 over an atomic
/// counter, so concurrent requests never contend on a lock. Seeded for
/// deterministic tests.
#[derive(Debug)]
pub struct Jitter {
    state: AtomicU64,
}

impl Jitter {
    /// A generator with a fixed seed.
    pub fn seeded(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    /// A generator seeded from the clock and the process id.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::seeded(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A uniform number in `[0, 1)`.
    pub fn next_unit(&self) -> f64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Retry `n`'s wait: uniform in `[0, ceiling(n)]`.
    pub fn backoff(&self, policy: &RetryPolicy, retry: u32) -> Duration {
        ceiling(policy, retry).mul_f64(self.next_unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
            backoff_multiplier: 2.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn ceilings_grow_then_cap() {
        let p = policy();
        let ms: Vec<u128> = (1..=6).map(|n| ceiling(&p, n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(ceiling(&p, 10_000), Duration::from_millis(1_000));
    }

    #[test]
    fn every_wait_lies_in_its_jitter_window_and_spreads() {
        let p = policy();
        let jitter = Jitter::seeded(7);
        for n in 1..=8 {
            let cap = ceiling(&p, n);
            let waits: Vec<Duration> = (0..2_000).map(|_| jitter.backoff(&p, n)).collect();
            assert!(
                waits.iter().all(|w| *w <= cap),
                "retry {n}: a wait above {cap:?}"
            );
            let mean = waits.iter().map(Duration::as_secs_f64).sum::<f64>() / waits.len() as f64;
            let half = cap.as_secs_f64() / 2.0;
            assert!(
                (mean - half).abs() < half * 0.1,
                "retry {n}: mean {mean} not near {half}"
            );
            assert!(
                waits.iter().any(|w| *w < cap / 10),
                "retry {n}: no short waits"
            );
            assert!(
                waits.iter().any(|w| *w > cap * 9 / 10),
                "retry {n}: no long waits"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_waits() {
        let p = policy();
        let a: Vec<Duration> = {
            let j = Jitter::seeded(42);
            (1..=5).map(|n| j.backoff(&p, n)).collect()
        };
        let b: Vec<Duration> = {
            let j = Jitter::seeded(42);
            (1..=5).map(|n| j.backoff(&p, n)).collect()
        };
        assert_eq!(a, b);
    }
}

//! Retry budgets: why an outage must not become a retry storm.
//!
//! When an upstream fails every request, a fixed "retry up to N times"
//! multiplies its load by N exactly when it can least take it, and every
//! layer that retries multiplies again. A budget instead lets retries add at
//! most a fraction of the recent request rate, plus a small floor per second
//! so that a quiet provider can still retry a blip. Once the budget is spent
//! a failure is returned at once. This is the scheme of Finagle's and
//! tower's `TpsBudget` and of gRPC's retry throttling.
//!
//! The window is a ring of one-second slots; a retry is allowed while the
//! retries in the window stay within `min_per_second * window + ratio *
//! requests in the window`. Under a full outage of N requests, the upstream
//! sees at most about `N * (1 + ratio) + min_per_second * window` attempts.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// One provider's retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    window: Window,
    refusals: AtomicU64,
}

#[derive(Debug)]
struct Window {
    slot: Duration,
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    /// `(requests, retries)` per slot.
    counts: Vec<(u64, u64)>,
    /// The slot index of `counts[current]`, counted from `origin`.
    current_slot: u64,
    current: usize,
    origin: Option<Instant>,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request plus `min_per_second`,
    /// over a sliding window of `window` (at least one second).
    pub fn new(ratio: f64, min_per_second: f64, window: Duration) -> Self {
        let slots = window.as_secs().max(1) as usize;
        Self {
            ratio,
            min_per_second,
            window: Window {
                slot: Duration::from_secs(1),
                slots: Mutex::new(Slots {
                    counts: vec![(0, 0); slots],
                    current_slot: 0,
                    current: 0,
                    origin: None,
                }),
            },
            refusals: AtomicU64::new(0),
        }
    }

    /// Counts a new request (its first attempt).
    pub fn deposit(&self, now: Instant) {
        self.window
            .with(now, |slots| slots.counts[slots.current].0 += 1);
    }

    /// Takes one retry from the budget; `false` (and a counted refusal)
    /// when it is spent.
    pub fn withdraw(&self, now: Instant) -> bool {
        let allowed = self.window.with(now, |slots| {
            let (requests, retries) = slots
                .counts
                .iter()
                .fold((0u64, 0u64), |(a, b), (r, t)| (a + r, b + t));
            let window_secs = slots.counts.len() as f64;
            let limit = self.min_per_second * window_secs + self.ratio * requests as f64;
            if (retries + 1) as f64 <= limit {
                slots.counts[slots.current].1 += 1;
                true
            } else {
                false
            }
        });
        if !allowed {
            self.refusals.fetch_add(1, Ordering::Relaxed);
        }
        allowed
    }

    /// How many retries the budget has refused.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

impl Window {
    /// Runs `f` on the slots after expiring those older than the window.
    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut Slots) -> T) -> T {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let origin = *slots.origin.get_or_insert(now);
        let slot_now =
            (now.saturating_duration_since(origin).as_nanos() / self.slot.as_nanos().max(1)) as u64;
        let len = slots.counts.len();
        let advance = slot_now.saturating_sub(slots.current_slot);
        for _ in 0..advance.min(len as u64) {
            slots.current = (slots.current + 1) % len;
            let current = slots.current;
            slots.counts[current] = (0, 0);
        }
        if advance > 0 {
            slots.current_slot = slot_now;
        }
        f(&mut slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_costs_a_fraction_of_the_requests_plus_the_floor() {
        let budget = RetryBudget::new(0.2, 1.0, Duration::from_secs(10));
        let now = Instant::now();
        let mut attempts = 0;
        for _ in 0..200 {
            budget.deposit(now);
            attempts += 1;
            // Every request would retry 4 times against a dead upstream.
            for _ in 0..4 {
                if !budget.withdraw(now) {
                    break;
                }
                attempts += 1;
            }
        }
        // 200 requests + 10 floor + 20% of 200.
        assert!(attempts <= 200 + 10 + 40, "{attempts} attempts");
        assert!(
            attempts >= 200 + 40,
            "the budget allowed too few retries: {attempts}"
        );
        assert!(budget.refusals() > 0);
    }

    #[test]
    fn the_window_slides() {
        let budget = RetryBudget::new(0.0, 1.0, Duration::from_secs(2));
        let start = Instant::now();
        assert!(budget.withdraw(start));
        assert!(budget.withdraw(start));
        assert!(!budget.withdraw(start), "two per window of two seconds");
        assert!(
            budget.withdraw(start + Duration::from_millis(2_100)),
            "old retries expired"
        );
    }
}

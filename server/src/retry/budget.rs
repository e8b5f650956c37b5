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

use super::window::SlidingWindow;

/// One provider's retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    /// `(requests, retries)` per second.
    window: Mutex<SlidingWindow>,
    refusals: AtomicU64,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request plus `min_per_second`,
    /// over a sliding window of `window` (at least one second).
    pub fn new(ratio: f64, min_per_second: f64, window: Duration) -> Self {
        Self {
            ratio,
            min_per_second,
            window: Mutex::new(SlidingWindow::new(window.as_secs())),
            refusals: AtomicU64::new(0),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, SlidingWindow> {
        match self.window.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts a new request (its first attempt).
    pub fn deposit(&self, now: Instant) {
        self.window().at(now).0 += 1;
    }

    /// Whether one more retry would be allowed now (takes nothing).
    pub fn allows(&self, now: Instant) -> bool {
        let mut window = self.window();
        self.allows_in(&mut window, now)
    }

    fn allows_in(&self, window: &mut SlidingWindow, now: Instant) -> bool {
        window.at(now);
        let (requests, retries) = window.totals();
        let limit = self.min_per_second * window.seconds() as f64 + self.ratio * requests as f64;
        (retries.saturating_add(1)) as f64 <= limit
    }

    /// Takes one retry from the budget; `false` (and a counted refusal)
    /// when it is spent.
    pub fn withdraw(&self, now: Instant) -> bool {
        let allowed = {
            let mut window = self.window();
            let allowed = self.allows_in(&mut window, now);
            if allowed {
                window.at(now).1 += 1;
            }
            allowed
        };
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

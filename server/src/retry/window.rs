//! A sliding window of one-second slots, each holding two counters: what
//! the retry budget (requests, retries) and the circuit breaker
//! (successes, failures) count over their recent past.

use tokio::time::Instant;

/// Two counters per second over the last `len` seconds.
#[derive(Debug)]
pub struct SlidingWindow {
    slots: Vec<(u64, u64)>,
    /// The second (from `origin`) that `slots[current]` counts.
    second_of_current: u64,
    current: usize,
    origin: Option<Instant>,
}

impl SlidingWindow {
    /// A window of `seconds` one-second slots (at least one).
    pub fn new(seconds: u64) -> Self {
        Self {
            slots: vec![(0, 0); seconds.max(1) as usize],
            second_of_current: 0,
            current: 0,
            origin: None,
        }
    }

    /// The window's length in seconds.
    pub fn seconds(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The slot for `now`, after expiring the slots older than the window.
    pub fn at(&mut self, now: Instant) -> &mut (u64, u64) {
        let origin = *self.origin.get_or_insert(now);
        let second = now.saturating_duration_since(origin).as_secs();
        let len = self.slots.len();
        let steps = second.saturating_sub(self.second_of_current);
        for _ in 0..steps.min(len as u64) {
            self.current = (self.current + 1) % len;
            self.slots[self.current] = (0, 0);
        }
        if steps > 0 {
            self.second_of_current = second;
        }
        &mut self.slots[self.current]
    }

    /// Both counters summed over the window (as of the last `at`).
    pub fn totals(&self) -> (u64, u64) {
        self.slots
            .iter()
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }

    /// Forgets everything counted so far.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = (0, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn old_slots_expire() {
        let mut w = SlidingWindow::new(2);
        let t0 = Instant::now();
        w.at(t0).0 += 1;
        w.at(t0 + Duration::from_millis(1_500)).1 += 1;
        assert_eq!(w.totals(), (1, 1));
        w.at(t0 + Duration::from_millis(2_100));
        assert_eq!(w.totals(), (0, 1), "the first second left the window");
        w.at(t0 + Duration::from_secs(10));
        assert_eq!(w.totals(), (0, 0));
    }
}

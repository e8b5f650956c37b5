//! Circuit breakers: stop calling a provider that is down.
//!
//! Retries save a request from a blip; when a provider fails most calls,
//! retrying every request only adds load and latency. The breaker watches
//! upstream faults over a sliding window: past a failure ratio (with a
//! minimum of calls) or a run of consecutive failures it opens, and calls
//! fail at once (or go to a fallback) without touching the upstream. After
//! a cooldown it lets a few probes through (half-open): a success closes it,
//! a failure reopens it with a doubled cooldown, up to a cap. A 429's
//! Retry-After makes the cooldown at least that long. Only upstream faults
//! count; a caller's bad request never opens a breaker.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::SlidingWindow;
use crate::config::BreakerConfig;
use crate::error::{ErrorClass, ProviderError};

/// A breaker's state, for telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail at once.
    Open,
    /// A few probes may go through.
    HalfOpen,
}

impl BreakerState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Before.
    pub from: BreakerState,
    /// After.
    pub to: BreakerState,
}

/// Permission to call the upstream; report the outcome with
/// [`CircuitBreaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    probe: bool,
}

/// Whether an outcome counts for the breaker.
fn is_upstream_fault(class: ErrorClass) -> bool {
    match class {
        ErrorClass::RateLimited
        | ErrorClass::Overloaded
        | ErrorClass::ServerError
        | ErrorClass::Timeout
        | ErrorClass::Connection
        | ErrorClass::StreamInterrupted => true,
        ErrorClass::Busy
        | ErrorClass::InvalidRequest
        | ErrorClass::Auth
        | ErrorClass::NotFound
        | ErrorClass::ContextLength
        | ErrorClass::Cancelled => false,
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant, cooldown: Duration },
    HalfOpen { in_flight: u32, cooldown: Duration },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// `(successes, failures)` per second.
    window: SlidingWindow,
    consecutive: u32,
}

/// One provider's breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: SlidingWindow::new(config.window_ms / 1_000),
                consecutive: 0,
            }),
            config,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match self.lock().state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether an open breaker's cooldown is over (its next call would be
    /// a probe).
    pub fn admits_probe(&self, now: Instant) -> bool {
        match self.lock().state {
            State::Open { until, .. } => now >= until,
            State::Closed | State::HalfOpen { .. } => true,
        }
    }

    /// Asks to call the upstream: a permit, or how long until a probe may
    /// go (with the transition to half-open when the cooldown is over).
    pub fn admit(&self, now: Instant) -> (Result<Permit, Duration>, Option<Transition>) {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => (Ok(Permit { probe: false }), None),
            State::Open { until, cooldown } => {
                if now < until {
                    return (Err(until - now), None);
                }
                inner.state = State::HalfOpen {
                    in_flight: 1,
                    cooldown,
                };
                (
                    Ok(Permit { probe: true }),
                    Some(Transition {
                        from: BreakerState::Open,
                        to: BreakerState::HalfOpen,
                    }),
                )
            }
            State::HalfOpen {
                in_flight,
                cooldown,
            } => {
                if in_flight >= self.config.half_open_probes {
                    // The probes are out; callers wait for their verdict.
                    return (
                        Err(Duration::from_millis(self.config.cooldown_ms.min(1_000))),
                        None,
                    );
                }
                inner.state = State::HalfOpen {
                    in_flight: in_flight + 1,
                    cooldown,
                };
                (Ok(Permit { probe: true }), None)
            }
        }
    }

    /// Records the outcome of a permitted call (`None` = success).
    pub fn record(
        &self,
        permit: Permit,
        outcome: Option<&ProviderError>,
        now: Instant,
    ) -> Option<Transition> {
        let fault = outcome.filter(|e| is_upstream_fault(e.class));
        let mut inner = self.lock();
        let base = Duration::from_millis(self.config.cooldown_ms);
        let max = Duration::from_millis(self.config.max_cooldown_ms);
        if permit.probe {
            let State::HalfOpen {
                in_flight,
                cooldown,
            } = inner.state
            else {
                return None;
            };
            return match (fault, outcome) {
                (Some(error), _) => {
                    let cooldown = (cooldown * 2).clamp(base, max);
                    let wait = cooldown.max(error.retry_after.unwrap_or_default());
                    inner.state = State::Open {
                        until: now + wait,
                        cooldown,
                    };
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Open,
                    })
                }
                (None, Some(_)) => {
                    // Not the upstream's fault: the probe proved nothing.
                    inner.state = State::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        cooldown,
                    };
                    None
                }
                (None, None) => {
                    inner.state = State::Closed;
                    inner.consecutive = 0;
                    inner.window.clear();
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Closed,
                    })
                }
            };
        }
        if !matches!(inner.state, State::Closed) {
            return None;
        }
        match (fault, outcome) {
            (None, Some(_)) => return None,
            (None, None) => {
                inner.window.at(now).0 += 1;
                inner.consecutive = 0;
                return None;
            }
            (Some(_), _) => {
                inner.window.at(now).1 += 1;
                inner.consecutive += 1;
            }
        }
        let (ok, failed) = inner.window.totals();
        let total = ok + failed;
        let by_ratio = total >= u64::from(self.config.min_requests)
            && failed as f64 / total.max(1) as f64 >= self.config.failure_ratio;
        let by_run = self.config.consecutive_failures > 0
            && inner.consecutive >= self.config.consecutive_failures;
        if !(by_ratio || by_run) {
            return None;
        }
        let retry_after = fault.and_then(|e| e.retry_after).unwrap_or_default();
        inner.state = State::Open {
            until: now + base.max(retry_after),
            cooldown: base,
        };
        Some(Transition {
            from: BreakerState::Closed,
            to: BreakerState::Open,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_ratio: 0.5,
            min_requests: 4,
            window_ms: 10_000,
            consecutive_failures: 0,
            cooldown_ms: 1_000,
            max_cooldown_ms: 4_000,
            half_open_probes: 1,
        }
    }

    fn fault() -> ProviderError {
        ProviderError::new(ErrorClass::Overloaded, "x")
    }

    #[test]
    fn opens_on_ratio_probes_after_cooldown_and_closes_on_success() {
        let b = CircuitBreaker::new(config());
        let t0 = Instant::now();
        for i in 0..4 {
            let (p, _) = b.admit(t0);
            let t = b.record(p.unwrap(), Some(&fault()), t0);
            assert_eq!(
                t.is_some(),
                i == 3,
                "opens at the 4th failure (min_requests)"
            );
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_millis(400)).0,
            Err(Duration::from_millis(600))
        );
        let (probe, t) = b.admit(t0 + Duration::from_secs(1));
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
        assert!(
            b.admit(t0 + Duration::from_secs(1)).0.is_err(),
            "one probe at a time"
        );
        let t = b.record(probe.unwrap(), None, t0 + Duration::from_secs(1));
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert!(b.admit(t0 + Duration::from_secs(1)).0.is_ok());
    }

    #[test]
    fn a_failed_probe_doubles_the_cooldown_and_caller_errors_never_count() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 2,
            ..config()
        });
        let t0 = Instant::now();
        let bad_request = ProviderError::new(ErrorClass::InvalidRequest, "x");
        for _ in 0..10 {
            let (p, _) = b.admit(t0);
            assert_eq!(b.record(p.unwrap(), Some(&bad_request), t0), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..2 {
            let (p, _) = b.admit(t0);
            b.record(p.unwrap(), Some(&fault()), t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let t1 = t0 + Duration::from_secs(1);
        let (probe, _) = b.admit(t1);
        b.record(probe.unwrap(), Some(&fault()), t1);
        assert_eq!(
            b.admit(t1 + Duration::from_millis(1_500)).0,
            Err(Duration::from_millis(500))
        );
    }

    #[test]
    fn retry_after_lengthens_the_cooldown() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        let t0 = Instant::now();
        let mut limited = ProviderError::new(ErrorClass::RateLimited, "x");
        limited.retry_after = Some(Duration::from_secs(30));
        let (p, _) = b.admit(t0);
        b.record(p.unwrap(), Some(&limited), t0);
        assert_eq!(b.admit(t0).0, Err(Duration::from_secs(30)));
    }
}

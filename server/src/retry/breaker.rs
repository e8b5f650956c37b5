//! Circuit breakers: stop calling a provider that is down.
//!
//! Retries save a request from a blip; when a provider fails most calls,
//! retrying every request only adds load and latency. The breaker watches
//! upstream faults over a sliding window: past a failure ratio (with a
//! minimum of calls) or a run of consecutive failures it opens, and calls
//! fail at once (or go to a fallback) without touching the upstream. After
//! a cooldown it lets a few probes through (half-open): a success closes it,
//! a failure reopens it with a doubled cooldown, up to `max_cooldown_ms`. A
//! 429's Retry-After makes the cooldown at least that long, never longer
//! than `max_cooldown_ms`. Only upstream faults count; a caller's bad
//! request never opens a breaker.
//!
//! Invariants:
//! - Every admitted call holds a [`BreakerPermit`], an RAII guard. Dropping
//!   it without an outcome (a caller's deadline, a cancelled call, a lost
//!   hedge, a panic) *abandons* it: the probe slot it held is given back,
//!   and nothing is counted. So a half-open breaker with no probe in flight
//!   admits the next call as a probe at once; it can never wedge.
//! - Each state (each closed, open or half-open round) has its own epoch.
//!   An outcome is applied only to the round its permit was admitted in:
//!   a probe of an earlier half-open round, or a call admitted before the
//!   breaker opened, changes nothing now.
//! - Times are added saturating: no upstream number can overflow an
//!   `Instant` under the mutex.

use std::sync::{Arc, Mutex};
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

/// Permission to make one upstream call, held for as long as the call
/// runs. Report its outcome with [`BreakerPermit::record`]; dropping it
/// unreported abandons it (see the module doc).
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: Arc<CircuitBreaker>,
    epoch: u64,
    probe: bool,
    settled: bool,
}

impl BreakerPermit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the call's outcome (`None` = success). An error that is not
    /// an upstream fault counts for nothing (a probe's slot is given back).
    pub fn record(mut self, outcome: Option<&ProviderError>, now: Instant) -> Option<Transition> {
        self.settled = true;
        self.breaker.record(self.epoch, self.probe, outcome, now)
    }

    /// A stream committed (the upstream delivered content): a probe has
    /// proved the upstream healthy, so the breaker closes now rather than
    /// when the stream ends, and the permit carries on as a call of the
    /// new closed round, whose outcome is recorded when the stream ends.
    pub fn commit(&mut self, now: Instant) -> Option<Transition> {
        if !self.probe {
            return None;
        }
        let (transition, epoch) = self.breaker.close_by_probe(self.epoch, now);
        self.probe = false;
        match epoch {
            Some(epoch) => self.epoch = epoch,
            // A stale probe: nothing to carry on with.
            None => self.settled = true,
        }
        transition
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.abandon(self.epoch, self.probe);
        }
    }
}

/// Whether an outcome counts for the breaker.
pub fn is_upstream_fault(class: ErrorClass) -> bool {
    match class {
        ErrorClass::RateLimited
        | ErrorClass::Overloaded
        | ErrorClass::ServerError
        | ErrorClass::Timeout
        | ErrorClass::TimeoutSilent
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

/// `now + d`, saturating at a year from now (what no cooldown outlasts).
fn later(now: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(d.min(YEAR)).unwrap_or(now)
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
    /// Bumped on every change of state: outcomes apply to their own round.
    epoch: u64,
    /// `(successes, failures)` per second.
    window: SlidingWindow,
    consecutive: u32,
    /// Upstream faults counted, in all.
    faults: u64,
}

impl Inner {
    fn to(&mut self, state: State) {
        self.state = state;
        self.epoch += 1;
    }
}

/// One provider's breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                state: State::Closed,
                epoch: 0,
                window: SlidingWindow::new(config.window_ms / 1_000),
                consecutive: 0,
                faults: 0,
            }),
            config,
        })
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

    /// Probes in flight now (zero unless half-open).
    pub fn probes_in_flight(&self) -> u32 {
        match self.lock().state {
            State::HalfOpen { in_flight, .. } => in_flight,
            State::Closed | State::Open { .. } => 0,
        }
    }

    /// Upstream faults counted since start.
    pub fn faults_counted(&self) -> u64 {
        self.lock().faults
    }

    /// Whether a call now would be admitted (an open breaker's cooldown is
    /// over, or a half-open one has a probe slot free).
    pub fn admits_probe(&self, now: Instant) -> bool {
        match self.lock().state {
            State::Open { until, .. } => now >= until,
            State::HalfOpen { in_flight, .. } => in_flight < self.config.half_open_probes,
            State::Closed => true,
        }
    }

    /// Asks to call the upstream: a permit, or how long until a probe may
    /// go (with the transition to half-open when the cooldown is over).
    pub fn admit(
        self: &Arc<Self>,
        now: Instant,
    ) -> (Result<BreakerPermit, Duration>, Option<Transition>) {
        let mut inner = self.lock();
        let permit = |epoch, probe| BreakerPermit {
            breaker: self.clone(),
            epoch,
            probe,
            settled: false,
        };
        match inner.state {
            State::Closed => (Ok(permit(inner.epoch, false)), None),
            State::Open { until, cooldown } => {
                if now < until {
                    return (Err(until - now), None);
                }
                inner.to(State::HalfOpen {
                    in_flight: 1,
                    cooldown,
                });
                (
                    Ok(permit(inner.epoch, true)),
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
                (Ok(permit(inner.epoch, true)), None)
            }
        }
    }

    /// The cooldown of an opening breaker: `cooldown`, or the upstream's
    /// Retry-After if longer, never more than `max_cooldown_ms`.
    fn open_for(&self, cooldown: Duration, error: &ProviderError) -> Duration {
        let max = self.max_cooldown();
        cooldown.max(error.retry_after.unwrap_or_default()).min(max)
    }

    /// The longest cooldown: `max_cooldown_ms`, or `cooldown_ms` if longer.
    fn max_cooldown(&self) -> Duration {
        Duration::from_millis(self.config.max_cooldown_ms.max(self.config.cooldown_ms))
    }

    fn abandon(&self, epoch: u64, probe: bool) {
        let mut inner = self.lock();
        if !probe || inner.epoch != epoch {
            return;
        }
        if let State::HalfOpen {
            in_flight,
            cooldown,
        } = inner.state
        {
            inner.state = State::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
                cooldown,
            };
        }
    }

    fn close_by_probe(&self, epoch: u64, _now: Instant) -> (Option<Transition>, Option<u64>) {
        let mut inner = self.lock();
        if inner.epoch != epoch || !matches!(inner.state, State::HalfOpen { .. }) {
            return (None, None);
        }
        inner.consecutive = 0;
        inner.window.clear();
        inner.to(State::Closed);
        (
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed,
            }),
            Some(inner.epoch),
        )
    }

    fn record(
        &self,
        epoch: u64,
        probe: bool,
        outcome: Option<&ProviderError>,
        now: Instant,
    ) -> Option<Transition> {
        let fault = outcome.filter(|e| is_upstream_fault(e.class));
        let mut inner = self.lock();
        if inner.epoch != epoch {
            // An outcome of an earlier round.
            return None;
        }
        if fault.is_some() {
            inner.faults += 1;
        }
        let base = Duration::from_millis(self.config.cooldown_ms);
        let max = self.max_cooldown();
        if probe {
            let State::HalfOpen {
                in_flight,
                cooldown,
            } = inner.state
            else {
                return None;
            };
            return match (fault, outcome) {
                (Some(error), _) => {
                    let cooldown = cooldown.saturating_mul(2).clamp(base, max);
                    let wait = self.open_for(cooldown, error);
                    inner.to(State::Open {
                        until: later(now, wait),
                        cooldown,
                    });
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
                    inner.consecutive = 0;
                    inner.window.clear();
                    inner.to(State::Closed);
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
        let error = match (fault, outcome) {
            (None, Some(_)) => return None,
            (None, None) => {
                inner.window.at(now).0 += 1;
                inner.consecutive = 0;
                return None;
            }
            (Some(error), _) => {
                inner.window.at(now).1 += 1;
                inner.consecutive = inner.consecutive.saturating_add(1);
                error
            }
        };
        let (ok, failed) = inner.window.totals();
        let total = ok + failed;
        let by_ratio = total >= u64::from(self.config.min_requests)
            && failed as f64 / total.max(1) as f64 >= self.config.failure_ratio;
        let by_run = self.config.consecutive_failures > 0
            && inner.consecutive >= self.config.consecutive_failures;
        if !(by_ratio || by_run) {
            return None;
        }
        let wait = self.open_for(base, error);
        inner.to(State::Open {
            until: later(now, wait),
            cooldown: base,
        });
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
            let t = p.unwrap().record(Some(&fault()), t0);
            assert_eq!(
                t.is_some(),
                i == 3,
                "opens at the 4th failure (min_requests)"
            );
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_millis(400)).0.err(),
            Some(Duration::from_millis(600))
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
        let t = probe.unwrap().record(None, t0 + Duration::from_secs(1));
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
            assert_eq!(p.unwrap().record(Some(&bad_request), t0), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..2 {
            let (p, _) = b.admit(t0);
            p.unwrap().record(Some(&fault()), t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let t1 = t0 + Duration::from_secs(1);
        let (probe, _) = b.admit(t1);
        probe.unwrap().record(Some(&fault()), t1);
        assert_eq!(
            b.admit(t1 + Duration::from_millis(1_500)).0.err(),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn an_abandoned_probe_gives_its_slot_back() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        let t0 = Instant::now();
        let (p, _) = b.admit(t0);
        p.unwrap().record(Some(&fault()), t0);
        let t1 = t0 + Duration::from_secs(1);
        let (probe, _) = b.admit(t1);
        assert!(probe.as_ref().is_ok_and(BreakerPermit::is_probe));
        assert_eq!(b.probes_in_flight(), 1);
        assert!(b.admit(t1).0.is_err(), "the probe is out");
        // The probe's caller gave up (deadline, cancel, panic): no verdict.
        drop(probe);
        assert_eq!(b.probes_in_flight(), 0);
        let (next, _) = b.admit(t1);
        let next = next.expect("a new probe goes at once");
        assert_eq!(
            next.record(None, t1),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
    }

    #[test]
    fn outcomes_of_an_earlier_round_change_nothing() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            half_open_probes: 2,
            ..config()
        });
        let t0 = Instant::now();
        let (before, _) = b.admit(t0);
        let (p, _) = b.admit(t0);
        p.unwrap().record(Some(&fault()), t0);
        assert_eq!(b.state(), BreakerState::Open);
        // A call admitted while closed ends after the breaker opened.
        assert_eq!(before.unwrap().record(None, t0), None);
        assert_eq!(b.state(), BreakerState::Open);
        let t1 = t0 + Duration::from_secs(1);
        let (old_probe, _) = b.admit(t1);
        let (probe, _) = b.admit(t1);
        probe.unwrap().record(Some(&fault()), t1);
        // Open again (round 2); the first round's probe now succeeds late.
        let t2 = t1 + Duration::from_secs(2);
        let (new_probe, _) = b.admit(t2);
        assert_eq!(old_probe.unwrap().record(None, t2), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.probes_in_flight(), 1);
        drop(new_probe);
    }

    #[test]
    fn a_committed_probe_closes_and_its_end_counts_in_the_new_round() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        let t0 = Instant::now();
        let (p, _) = b.admit(t0);
        p.unwrap().record(Some(&fault()), t0);
        let t1 = t0 + Duration::from_secs(1);
        let (probe, _) = b.admit(t1);
        let mut probe = probe.unwrap();
        assert!(probe.commit(t1).is_some());
        assert_eq!(b.state(), BreakerState::Closed);
        // The stream then breaks: a fault of the closed round.
        assert!(probe.record(Some(&fault()), t1).is_some());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_huge_retry_after_is_capped_at_max_cooldown() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        let t0 = Instant::now();
        let mut limited = ProviderError::new(ErrorClass::RateLimited, "x");
        limited.retry_after = Some(Duration::MAX);
        let (p, _) = b.admit(t0);
        p.unwrap().record(Some(&limited), t0);
        assert_eq!(b.admit(t0).0.err(), Some(Duration::from_secs(4)));
        limited.retry_after = Some(Duration::from_secs(86_400));
        let t1 = t0 + Duration::from_secs(4);
        let (probe, _) = b.admit(t1);
        probe.unwrap().record(Some(&limited), t1);
        assert_eq!(b.admit(t1).0.err(), Some(Duration::from_secs(4)));
    }

    #[test]
    fn retry_after_lengthens_the_cooldown() {
        let b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        let t0 = Instant::now();
        let mut limited = ProviderError::new(ErrorClass::RateLimited, "x");
        limited.retry_after = Some(Duration::from_secs(3));
        let (p, _) = b.admit(t0);
        p.unwrap().record(Some(&limited), t0);
        assert_eq!(b.admit(t0).0.err(), Some(Duration::from_secs(3)));
    }
}

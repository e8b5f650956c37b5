//! Retry: the policy of each provider, per-request overrides, full-jitter
//! backoff, retry budgets, and the one decision made after a failed
//! attempt. Only the registry consults this module; providers never retry.

mod backoff;
mod breaker;
mod budget;
mod clock;
mod overrides;
mod policy;
mod window;

use std::time::Duration;

pub use backoff::{Jitter, ceiling};
pub use breaker::{BreakerPermit, BreakerState, CircuitBreaker, Transition, is_upstream_fault};
pub use budget::RetryBudget;
pub use clock::{Clock, TokioClock};
pub use overrides::{PREFIX as OVERRIDE_PREFIX, RetryOverride};
pub use policy::{RetryLimits, RetryPolicy};

use tokio::time::Instant;

use crate::error::{ErrorClass, ProviderError};

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then try again.
    Retry {
        /// The wait: the jittered backoff, or the upstream's Retry-After if
        /// longer.
        wait: Duration,
    },
    /// Stop and answer the caller.
    GiveUp(GiveUp),
}

/// Why the registry stopped retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The class is not retried (or the upstream said `x-should-retry: false`).
    NotRetryable,
    /// Every allowed attempt was made.
    AttemptsSpent,
    /// The provider's retry budget is spent.
    BudgetExhausted,
    /// The upstream asked for a wait longer than `max_retry_after` or than
    /// the caller's remaining deadline.
    RetryAfterTooLong(Duration),
    /// The caller's deadline ran out during an attempt.
    Deadline,
    /// The next wait (this long) would not leave a useful attempt before
    /// the caller's deadline.
    WaitPastDeadline(Duration),
    /// A first-token timeout or a silent route, with a fallback hop to take
    /// at once.
    FailOver,
}

impl GiveUp {
    /// The name telemetry and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRetryable => "not_retryable",
            Self::AttemptsSpent => "give_up",
            Self::BudgetExhausted => "budget_exhausted",
            Self::RetryAfterTooLong(_) => "retry_after_too_long",
            Self::Deadline => "deadline",
            Self::WaitPastDeadline(_) => "wait_past_deadline",
            Self::FailOver => "fallback",
        }
    }
}

/// The least time a retry must have before the caller's deadline to be
/// worth starting: 50 ms, or the per-try timeout if that is shorter.
pub fn min_useful_attempt(policy: &RetryPolicy) -> Duration {
    policy.per_try_timeout.min(Duration::from_millis(50))
}

/// Whether `error` may be retried under `policy`. The upstream's
/// `x-should-retry` overrides the operator's `retry_on`, never the caller's
/// own `x-retry-on`; a class that is never retried (invalid request, auth,
/// not found, context length, cancelled) stays so whatever anyone says.
pub fn is_retryable(policy: &RetryPolicy, error: &ProviderError) -> bool {
    // `timeout` in a list covers its kind `timeout-silent`.
    let listed = |classes: &[ErrorClass]| {
        classes.contains(&error.class)
            || (error.class == ErrorClass::TimeoutSilent && classes.contains(&ErrorClass::Timeout))
    };
    let caller_allows = policy.request_retry_on.as_deref().is_none_or(listed);
    let operator_allows = match error.should_retry {
        Some(false) => false,
        Some(true) => true,
        None => listed(&policy.retry_on),
    };
    error.class.is_transient() && caller_allows && operator_allows
}

/// Decides what follows attempt number `attempts` (1-based) that failed
/// with `error`, with `remaining` of the caller's deadline left. A retry is
/// only granted while the budget allows one; it is drawn from the budget
/// when the retry is made, after its wait.
pub fn decide(
    policy: &RetryPolicy,
    attempts: u32,
    error: &ProviderError,
    remaining: Option<Duration>,
    budget: &RetryBudget,
    jitter: &Jitter,
    now: Instant,
) -> Decision {
    if !is_retryable(policy, error) {
        return Decision::GiveUp(GiveUp::NotRetryable);
    }
    if attempts >= policy.max_attempts {
        return Decision::GiveUp(GiveUp::AttemptsSpent);
    }
    if let Some(after) = error.retry_after
        && after > policy.max_retry_after
    {
        return Decision::GiveUp(GiveUp::RetryAfterTooLong(after));
    }
    let wait = jitter
        .backoff(policy, attempts)
        .max(error.retry_after.unwrap_or(Duration::ZERO));
    if remaining.is_some_and(|r| wait.saturating_add(min_useful_attempt(policy)) > r) {
        return Decision::GiveUp(GiveUp::WaitPastDeadline(wait));
    }
    if !budget.allows(now) {
        return Decision::GiveUp(GiveUp::BudgetExhausted);
    }
    Decision::Retry { wait }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    fn budget() -> RetryBudget {
        RetryBudget::new(0.2, 100.0, Duration::from_secs(10))
    }

    fn decide_for(
        policy: &RetryPolicy,
        attempts: u32,
        error: &ProviderError,
        remaining: Option<Duration>,
    ) -> Decision {
        decide(
            policy,
            attempts,
            error,
            remaining,
            &budget(),
            &Jitter::seeded(1),
            Instant::now(),
        )
    }

    #[test]
    fn classes_and_should_retry_decide() {
        let p = RetryPolicy::default();
        let overloaded = ProviderError::new(ErrorClass::Overloaded, "x");
        assert!(matches!(
            decide_for(&p, 1, &overloaded, None),
            Decision::Retry { .. }
        ));
        let mut told_no = overloaded.clone();
        told_no.should_retry = Some(false);
        assert_eq!(
            decide_for(&p, 1, &told_no, None),
            Decision::GiveUp(GiveUp::NotRetryable)
        );
        let mut auth = ProviderError::new(ErrorClass::Auth, "x");
        auth.should_retry = Some(true);
        assert_eq!(
            decide_for(&p, 1, &auth, None),
            Decision::GiveUp(GiveUp::NotRetryable)
        );
        let narrow = RetryPolicy {
            retry_on: vec![ErrorClass::RateLimited],
            ..RetryPolicy::default()
        };
        assert_eq!(
            decide_for(&narrow, 1, &overloaded, None),
            Decision::GiveUp(GiveUp::NotRetryable)
        );
        let mut told_yes = overloaded.clone();
        told_yes.should_retry = Some(true);
        assert!(matches!(
            decide_for(&narrow, 1, &told_yes, None),
            Decision::Retry { .. }
        ));
        // The upstream's word never overrides the caller's own `x-retry-on`.
        let caller_none = RetryPolicy {
            request_retry_on: Some(vec![]),
            ..RetryPolicy::default()
        };
        assert_eq!(
            decide_for(&caller_none, 1, &told_yes, None),
            Decision::GiveUp(GiveUp::NotRetryable)
        );
        assert_eq!(
            decide_for(&p, 3, &overloaded, None),
            Decision::GiveUp(GiveUp::AttemptsSpent)
        );
    }

    #[test]
    fn retry_after_sets_the_least_wait_or_stops() {
        let p = RetryPolicy::default();
        let mut limited = ProviderError::new(ErrorClass::RateLimited, "x");
        limited.retry_after = Some(Duration::from_secs(2));
        assert_eq!(
            decide_for(&p, 1, &limited, None),
            Decision::Retry {
                wait: Duration::from_secs(2)
            }
        );
        assert_eq!(
            decide_for(&p, 1, &limited, Some(Duration::from_secs(1))),
            Decision::GiveUp(GiveUp::WaitPastDeadline(Duration::from_secs(2)))
        );
        // A wait that leaves too little for the attempt is not started.
        assert_eq!(
            decide_for(&p, 1, &limited, Some(Duration::from_millis(2_010))),
            Decision::GiveUp(GiveUp::WaitPastDeadline(Duration::from_secs(2)))
        );
        assert!(matches!(
            decide_for(&p, 1, &limited, Some(Duration::from_millis(2_100))),
            Decision::Retry { .. }
        ));
        limited.retry_after = Some(Duration::from_secs(120));
        assert_eq!(
            decide_for(&p, 1, &limited, None),
            Decision::GiveUp(GiveUp::RetryAfterTooLong(Duration::from_secs(120)))
        );
    }

    #[test]
    fn a_wait_past_the_deadline_is_not_started() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        let e = ProviderError::new(ErrorClass::ServerError, "x");
        // Jitter may pick a short wait; a deadline of 1 ns is shorter than any.
        assert!(matches!(
            decide_for(&p, 1, &e, Some(Duration::from_nanos(1))),
            Decision::GiveUp(GiveUp::WaitPastDeadline(_))
        ));
    }
}

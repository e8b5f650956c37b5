//! The attempt gate: the one door through which every upstream call of a
//! gateway call passes, and the retry loop over the call's chain of
//! providers.
//!
//! Every upstream call, whatever its kind (a hop's first attempt, a retry,
//! a hedge, a stream continuation, a breaker probe, which is any of these
//! while the breaker is half-open), is admitted by [`AttemptGate::admit`]
//! and ended by [`AttemptGate::settle`] or by dropping its [`Attempt`].
//! No other code calls a provider. The gate keeps these invariants:
//!
//! 1. **One deadline.** The caller's deadline is fixed once, when the call
//!    enters the registry, and bounds every attempt, wait, hedge, hop and
//!    continuation, and the end of a committed stream. An attempt gets
//!    `min(per_try_timeout, deadline - now)`. No wait is started that
//!    would not leave [`min_useful_attempt`] before the deadline.
//! 2. **One count.** Attempts are numbered by one counter per call, across
//!    hops. The number in `x-gateway-attempts`, the response's `attempts`,
//!    the trailers, the start and resumed events and the `attempt N` span
//!    names all come from it, and it equals the upstream requests made
//!    (started: a hedge abandoned within microseconds of its start, when
//!    the first attempt answers meanwhile, may be dropped before its
//!    request is written; none is started for an answer already there).
//! 3. **Bounded attempts.** Per hop, the first attempt, its retries and
//!    its hedges together are at most the call's `max_attempts` (`1` = no
//!    retry, no hedge, no continuation); continuations are at most the
//!    provider's `max_resumes`, and are made only for a break whose class
//!    the call's policy retries.
//! 4. **Budget.** A hop's first attempt deposits into the provider's retry
//!    budget; every later upstream call of the hop (retry, hedge,
//!    continuation) withdraws from it at the moment it is made, and is not
//!    made when the budget is spent (a retry is also not waited for when
//!    the budget is spent as it is decided). A call refused by an open
//!    breaker deposits nothing.
//! 5. **Breaker.** Every attempt holds a breaker permit (an RAII guard)
//!    while it runs. Only upstream faults under the operator's own limits
//!    count against the breaker: a timeout that fired because of the
//!    caller's per-try override or deadline, a lost hedge, a cancelled
//!    call, a panic are *abandoned*, which is neither a success nor a
//!    fault. So no caller's settings change the breaker state other
//!    callers see, and no permit outlives its attempt. In a pool, a
//!    member's fault counts only when every other member is unavailable
//!    (cooling, paced, dead, or failing: see `pool.rs`), so the breaker
//!    opens only when no member can serve.
//! 6. **Spans.** Each admitted attempt has exactly one `attempt N` span,
//!    opened when it is admitted (never for a hedge that is not sent).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tracing::{Instrument, Span};

use super::pool::{MemberLease, Unavailable};
use super::stream::{self, StreamSetup};
use super::{Completion, OpenStream, RegisteredProvider};
use crate::chat::{ChatRequest, StreamEvent};
use crate::error::{ErrorClass, GatewayError, ProviderError};
use crate::observe::{self, CallObservation, ModelLabels};
use crate::providers::{AttemptSignals, Provider};
use crate::retry::{
    self, BreakerPermit, Clock, Decision, GiveUp, Jitter, RetryPolicy, Transition,
    min_useful_attempt,
};
use crate::telemetry::GatewayMetrics;

/// One provider of a call's chain, with what the call sends it.
pub(crate) struct Hop {
    pub(crate) entry: Arc<RegisteredProvider>,
    /// The request for this hop (a fallback asks for its own model).
    pub(crate) request: Arc<ChatRequest>,
    /// The call's policy on this provider (overrides within the limits).
    pub(crate) policy: RetryPolicy,
    /// Send a hedge when the first attempt has no answer after this.
    pub(crate) hedge_after: Option<Duration>,
    /// The context window of the model this hop asks for, when declared.
    pub(crate) context_window: Option<u32>,
    /// About how many tokens the request spends of a rate limit (its text
    /// at four characters a token, plus `max_tokens`), for pacing.
    pub(crate) token_estimate: u64,
}

impl Hop {
    fn observed<'a>(&'a self, labels: &'a ModelLabels) -> observe::Hop<'a> {
        observe::Hop {
            provider: &self.entry.name,
            kind: self.entry.provider.kind(),
            request: &self.request,
            default_model: self.entry.provider.default_model(),
            labels,
        }
    }
}

/// What one hop of a call has spent.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HopCount {
    /// The first attempt, retries and hedges.
    pub(crate) tries: u32,
    /// Continuations of a committed stream.
    pub(crate) resumes: u32,
    /// The pool member of the last attempt (of the one that decided a
    /// hedge race), which a retry avoids.
    pub(crate) last_member: Option<usize>,
    /// The pool members this hop has tried (a bit per member): a retry
    /// goes to one it has not tried when one is allowed.
    pub(crate) tried: u64,
}

/// What an upstream call is, for the gate's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptKind {
    /// A hop's first attempt: deposits into the budget.
    First,
    /// A retry, after its wait.
    Retry,
    /// A second attempt raced against a slow first.
    Hedge,
    /// A continuation of a committed stream that broke.
    Continuation,
}

/// Why the gate did not admit an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No (useful) time is left before the caller's deadline.
    Deadline,
    /// The hop's attempts, or its continuations, are spent.
    Spent,
    /// The provider's retry budget is spent.
    Budget,
    /// The provider's breaker is open for this long.
    BreakerOpen(Duration),
    /// No member of the provider's pool can take an attempt now.
    Pool(Unavailable),
}

/// Whose limit bounds an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The operator's per-try timeout: its expiry is an upstream fault.
    Operator,
    /// The caller's narrower `x-retry-per-try-timeout-ms`.
    Caller,
    /// The time to first token (`first_token_timeout_ms` or the request's
    /// `x-first-token-timeout-ms`): a routing choice, never a verdict on
    /// the upstream; with a fallback hop the call moves on at once.
    FirstToken,
    /// The caller's deadline.
    Deadline,
}

/// One admitted upstream call: its number, span, time limit and breaker
/// permit. Dropping it unsettled abandons the permit.
pub(crate) struct Attempt {
    pub(crate) number: u32,
    pub(crate) span: Span,
    limit: Duration,
    /// What the upstream call told besides its result (that it answered,
    /// its rate limits).
    signals: Arc<AttemptSignals>,
    pub(crate) bound: Bound,
    pub(crate) permit: Option<BreakerPermit>,
    /// The pool member it goes to, when the provider has a pool.
    member: Option<MemberLease>,
    started: std::time::Instant,
    /// When it was admitted, on the registry's clock: what the pool's
    /// latency estimate and the p95 hedge delay are measured on, so a
    /// simulation on paused time replays them exactly.
    begun: Instant,
}

/// How an attempt's future ended.
pub(crate) enum Outcome<T> {
    Done(T),
    Failed(ProviderError),
    TimedOut,
}

impl Attempt {
    /// Runs `call` within the attempt's time limit and span.
    pub(crate) fn run<T, F>(&self, call: F) -> impl Future<Output = Outcome<T>> + use<T, F>
    where
        F: Future<Output = Result<T, ProviderError>>,
    {
        let (limit, span, signals) = (self.limit, self.span.clone(), self.signals.clone());
        async move {
            let call = crate::providers::watch_responded(signals, call.instrument(span));
            match tokio::time::timeout(limit, call).await {
                Ok(Ok(value)) => Outcome::Done(value),
                Ok(Err(error)) => Outcome::Failed(error),
                Err(_) => Outcome::TimedOut,
            }
        }
    }

    /// The provider this attempt calls: its pool member's, or the hop's.
    pub(crate) fn provider<'a>(&'a self, hop: &'a Hop) -> &'a Arc<dyn Provider> {
        self.member
            .as_ref()
            .map_or(&hop.entry.provider, MemberLease::provider)
    }

    /// The index of its pool member, until it is settled or abandoned.
    fn member_index(&self) -> Option<usize> {
        self.member.as_ref().map(MemberLease::index)
    }

    /// How long it has run.
    pub(crate) fn took(&self) -> Duration {
        self.started.elapsed()
    }

    /// The error of an attempt that ran out of time (not for the deadline,
    /// which ends the call).
    pub(crate) fn timeout_error(&self) -> ProviderError {
        let ms = self.limit.as_millis();
        let silent = !self.signals.responded.load(Ordering::Relaxed);
        let what = match self.bound {
            Bound::Caller => format!("the request's per-try timeout of {ms} ms"),
            Bound::FirstToken => format!("the first-token timeout of {ms} ms"),
            Bound::Operator | Bound::Deadline => format!("the per-try timeout of {ms} ms"),
        };
        if silent {
            ProviderError::new(
                ErrorClass::TimeoutSilent,
                format!("no response at all (not even headers) within {what}"),
            )
        } else {
            let first = if self.bound == Bound::FirstToken {
                "no first content"
            } else {
                "no answer"
            };
            ProviderError::new(ErrorClass::Timeout, format!("{first} within {what}"))
        }
    }

    /// Whether running out of time says something about the upstream:
    /// only under the operator's own per-try timeout.
    fn timeout_is_a_fault(&self) -> bool {
        self.bound == Bound::Operator
    }

    /// Whether a failure of this attempt moves the call to the next hop at
    /// once (when there is one), without retrying the same provider: a
    /// first-token timeout, or a silent route.
    pub(crate) fn fails_over(&self, error: &ProviderError) -> bool {
        // A caller's own per-try timeout (or the deadline) says nothing
        // about the route; a first-token timeout exists to fail over.
        match self.bound {
            Bound::Operator => error.class == ErrorClass::TimeoutSilent,
            Bound::FirstToken => {
                matches!(error.class, ErrorClass::Timeout | ErrorClass::TimeoutSilent)
            }
            Bound::Caller | Bound::Deadline => false,
        }
    }
}

/// One call's door to its providers: the deadline, the attempt counter and
/// what admitting, settling and waiting need.
pub(crate) struct AttemptGate {
    clock: Arc<dyn Clock>,
    jitter: Arc<Jitter>,
    metrics: Arc<GatewayMetrics>,
    deadline: Option<Instant>,
    attempts: u32,
}

impl AttemptGate {
    /// The gate of a call that entered now, whose caller waits `timeout`.
    pub(crate) fn new(
        clock: Arc<dyn Clock>,
        jitter: Arc<Jitter>,
        metrics: Arc<GatewayMetrics>,
        timeout: Option<Duration>,
    ) -> Self {
        let now = clock.now();
        let deadline = timeout.map(|t| now.checked_add(t).unwrap_or(now));
        Self {
            clock,
            jitter,
            metrics,
            deadline,
            attempts: 0,
        }
    }

    /// What is left of the deadline.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let now = self.clock.now();
        self.deadline.map(|d| d.saturating_duration_since(now))
    }

    /// Upstream calls admitted so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Waits between attempts, on the registry's clock.
    pub(crate) async fn wait(&self, wait: Duration, obs: &mut CallObservation) {
        if !wait.is_zero() {
            let started = std::time::Instant::now();
            self.clock.sleep(wait).await;
            obs.waited(started.elapsed());
        }
    }

    /// Decides what follows a failed attempt of `hop`; a granted retry
    /// draws from the budget when admitted. In a pool, an upstream's
    /// Retry-After is its member's own: while another member is allowed
    /// (where the retry goes), it neither stops the hop nor sets the wait.
    pub(crate) fn decide(&self, hop: &Hop, count: &HopCount, error: &ProviderError) -> Decision {
        let now = self.clock.now();
        let elsewhere = error.retry_after.is_some() && other_member_allowed(hop, count, now);
        let members_own;
        let error = if elsewhere {
            members_own = ProviderError {
                retry_after: None,
                ..error.clone()
            };
            &members_own
        } else {
            error
        };
        retry::decide(
            &hop.policy,
            count.tries,
            error,
            self.remaining(),
            &hop.entry.budget,
            &self.jitter,
            now,
        )
    }

    /// Whether a retry after `error` may go at once to another member of
    /// the hop's pool: the failure was the member's own (a 429, an
    /// overload, a refused key), another member is allowed now, the call
    /// has attempts left and the policy retries the class (a refused key
    /// is retried on another key), and the budget allows a retry.
    /// Whether `error`, one member's fault (its rate limit, its load, its
    /// key), is put at once to another member of the hop's pool, as the
    /// next attempt of `kind` (a retry, or a stream's continuation).
    pub(crate) fn another_member_serves(
        &self,
        hop: &Hop,
        count: &HopCount,
        error: &ProviderError,
        kind: AttemptKind,
    ) -> bool {
        let now = self.clock.now();
        let member_local = matches!(
            error.class,
            ErrorClass::RateLimited | ErrorClass::Overloaded | ErrorClass::Auth
        );
        // A refused key is retried on another key, unless the caller asked
        // for no retries at all (`x-retry-on: none`).
        let caller_wants_none = hop
            .policy
            .request_retry_on
            .as_ref()
            .is_some_and(Vec::is_empty);
        let retried = if error.class == ErrorClass::Auth {
            !caller_wants_none
        } else {
            retry::is_retryable(&hop.policy, error)
        };
        let left = match kind {
            AttemptKind::Continuation => count.resumes < hop.entry.resilience.max_resumes,
            AttemptKind::First | AttemptKind::Retry | AttemptKind::Hedge => {
                count.tries < hop.policy.max_attempts
            }
        };
        member_local
            && retried
            && left
            && other_member_allowed(hop, count, now)
            && hop.entry.budget.allows(now)
    }

    /// Admits one upstream call of `kind` to `hop`, or says why not.
    pub(crate) fn admit(
        &mut self,
        hop: &Hop,
        count: &mut HopCount,
        kind: AttemptKind,
        obs: &CallObservation,
    ) -> Result<Attempt, Refusal> {
        let remaining = self.remaining();
        if remaining.is_some_and(|r| r.is_zero()) {
            return Err(Refusal::Deadline);
        }
        let spent = match kind {
            AttemptKind::First | AttemptKind::Retry | AttemptKind::Hedge => {
                count.tries >= hop.policy.max_attempts
            }
            AttemptKind::Continuation => {
                hop.policy.max_attempts <= 1 || count.resumes >= hop.entry.resilience.max_resumes
            }
        };
        if spent {
            return Err(Refusal::Spent);
        }
        let extra = matches!(kind, AttemptKind::Hedge | AttemptKind::Continuation);
        if extra && remaining.is_some_and(|r| r < min_useful_attempt(&hop.policy)) {
            return Err(Refusal::Deadline);
        }
        let now = self.clock.now();
        let member = match &hop.entry.pool {
            None => None,
            Some(pool) => Some(
                pool.pick(
                    now,
                    (count.last_member, count.tried),
                    &self.jitter,
                    hop.token_estimate,
                )
                .map_err(Refusal::Pool)?,
            ),
        };
        let permit = match &hop.entry.breaker {
            None => None,
            Some(breaker) => {
                let (admitted, transition) = breaker.admit(now);
                self.breaker_changed(&hop.entry, transition);
                Some(admitted.map_err(Refusal::BreakerOpen)?)
            }
        };
        match kind {
            AttemptKind::First => hop.entry.budget.deposit(now),
            AttemptKind::Retry | AttemptKind::Hedge | AttemptKind::Continuation => {
                if !hop.entry.budget.withdraw(now) {
                    obs.budget_refused();
                    // The permit is dropped unused: abandoned.
                    return Err(Refusal::Budget);
                }
            }
        }
        // Admitted: only now is the member the hop's last (a hedge the
        // breaker or the budget refused was never sent to it).
        if let Some(m) = &member {
            count.last_member = Some(m.index());
            count.tried = super::pool::mark_tried(count.tried, m.index());
            tracing::debug!(provider = %hop.entry.name, member = m.label(), "attempt to a pool member");
        }
        match kind {
            AttemptKind::Continuation => count.resumes += 1,
            AttemptKind::First | AttemptKind::Retry | AttemptKind::Hedge => count.tries += 1,
        }
        self.attempts += 1;
        let per_try = hop.policy.per_try_timeout;
        // A continuation's first content is not a first token.
        let first_token = hop
            .policy
            .first_token_timeout
            .filter(|_| kind != AttemptKind::Continuation);
        let (limit, bound) = match (remaining, first_token) {
            (Some(r), f) if r <= per_try && f.is_none_or(|f| r <= f) => (r, Bound::Deadline),
            (_, Some(f)) if f < per_try => (f, Bound::FirstToken),
            _ if per_try < hop.entry.policy.per_try_timeout => (per_try, Bound::Caller),
            _ => (per_try, Bound::Operator),
        };
        let span = obs.attempt_span(self.attempts);
        if let Some(m) = &member {
            // The pool member: its host and key variable, never the key.
            span.record("gateway.member", m.label());
        }
        Ok(Attempt {
            number: self.attempts,
            span,
            limit,
            signals: Arc::new(AttemptSignals {
                pacer: member.as_ref().map(|m| m.pacer(self.clock.clone())),
                ..AttemptSignals::default()
            }),
            member,
            bound,
            permit,
            started: std::time::Instant::now(),
            begun: now,
        })
    }

    /// Ends an attempt that ran to an outcome (`None` = success) under the
    /// operator's limits: its breaker permit records it. Use
    /// [`AttemptGate::abandon`] for one that ended by the caller's doing.
    pub(crate) fn settle(
        &self,
        entry: &RegisteredProvider,
        attempt: &mut Attempt,
        outcome: Option<&ProviderError>,
    ) {
        let now = self.clock.now();
        if let Some(member) = attempt.member.take() {
            match outcome {
                None => member.succeeded(now.saturating_duration_since(attempt.begun), now),
                Some(error) => member.failed(error, now),
            }
            if let Some(event) = MemberLease::event(outcome) {
                self.metrics.pool_member_events.add(
                    1,
                    &[
                        opentelemetry::KeyValue::new("gateway.provider", entry.name.clone()),
                        opentelemetry::KeyValue::new("gateway.member", member.label().to_string()),
                        opentelemetry::KeyValue::new("gateway.member.event", event),
                    ],
                );
            }
            // A member's fault is the provider's only when no other member
            // can serve (every other one is cooling, paced, dead or
            // failing): the breaker opens only when the whole pool cannot.
            // (An error that is no upstream fault, a 400, is recorded as
            // the answer it is.)
            if outcome.is_some_and(|e| crate::retry::is_upstream_fault(e.class))
                && entry
                    .pool
                    .as_ref()
                    .is_some_and(|pool| pool.others_can_serve(member.index(), now))
            {
                attempt.permit.take();
                return;
            }
        }
        if let Some(permit) = attempt.permit.take() {
            let transition = permit.record(outcome, self.clock.now());
            self.breaker_changed(entry, transition);
        }
    }

    /// How long `attempt` has run, on the registry's clock.
    pub(crate) fn took(&self, attempt: &Attempt) -> Duration {
        self.clock.now().saturating_duration_since(attempt.begun)
    }

    /// Ends an attempt without a verdict: its permit and pool member are
    /// given back.
    pub(crate) fn abandon(attempt: &mut Attempt) {
        attempt.permit.take();
        attempt.member.take();
    }

    /// Ends an attempt that ran out of time (not by the deadline): its
    /// error, counted against the breaker only under the operator's own
    /// per-try timeout.
    pub(crate) fn timed_out(
        &self,
        entry: &RegisteredProvider,
        attempt: &mut Attempt,
    ) -> ProviderError {
        let error = attempt.timeout_error();
        if attempt.timeout_is_a_fault() {
            self.settle(entry, attempt, Some(&error));
        } else {
            Self::abandon(attempt);
        }
        error
    }

    /// A stream committed on `attempt`: a probe closes the breaker now.
    pub(crate) fn commit(&self, entry: &RegisteredProvider, attempt: &mut Attempt) {
        if let Some(permit) = &mut attempt.permit {
            let transition = permit.commit(self.clock.now());
            self.breaker_changed(entry, transition);
        }
    }

    /// Records a breaker's change of state.
    fn breaker_changed(&self, entry: &RegisteredProvider, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        entry.breaker_changed(t, self.clock.now());
        tracing::info!(
            provider = %entry.name,
            from = t.from.as_str(),
            to = t.to.as_str(),
            "circuit breaker changed state"
        );
        self.metrics.breaker_transitions.add(
            1,
            &[
                opentelemetry::KeyValue::new("gateway.provider", entry.name.clone()),
                opentelemetry::KeyValue::new("gateway.breaker.state", t.to.as_str()),
            ],
        );
    }

    /// The caller-facing error of a refused attempt.
    pub(crate) fn refused(
        &self,
        entry: &RegisteredProvider,
        refusal: Refusal,
        last_error: Option<ProviderError>,
    ) -> GatewayError {
        let provider = entry.name.clone();
        let attempts = self.attempts;
        match (refusal, last_error) {
            (Refusal::BreakerOpen(retry_after), last_error) => GatewayError::BreakerOpen {
                provider,
                attempts,
                retry_after,
                last_error,
            },
            (Refusal::Deadline | Refusal::Spent | Refusal::Budget, last_error @ None)
            | (Refusal::Deadline, last_error) => GatewayError::DeadlineExceeded {
                provider,
                attempts,
                last_error,
            },
            (Refusal::Pool(why), last_error) => GatewayError::Upstream {
                provider,
                attempts,
                error: pool_error(why, last_error),
                delivered: None,
                budget_exhausted: false,
            },
            (refusal @ (Refusal::Spent | Refusal::Budget), Some(error)) => GatewayError::Upstream {
                provider,
                attempts,
                error,
                delivered: None,
                budget_exhausted: refusal == Refusal::Budget,
            },
        }
    }
}

/// The attempt that served a hop, with its hop's accounting.
struct Won<T> {
    value: T,
    attempt: Attempt,
    count: HopCount,
}

/// A call's chain of providers, run through one gate.
pub(crate) struct CallChain<'l> {
    gate: AttemptGate,
    first: Hop,
    rest: Vec<Hop>,
    metrics: Arc<GatewayMetrics>,
    labels: &'l ModelLabels,
}

/// Whether a pool member other than the hop's last one may take the
/// request now (always `false` outside a pool or before a first attempt).
fn other_member_allowed(hop: &Hop, count: &HopCount, now: tokio::time::Instant) -> bool {
    hop.entry
        .pool
        .as_ref()
        .zip(count.last_member)
        .is_some_and(|(pool, last)| pool.others_allowed(last, now, hop.token_estimate))
}

/// Makes one upstream call of a hop.
type AttemptFn<'f, T> =
    &'f (dyn Fn(&Hop, &Arc<dyn Provider>) -> BoxFuture<'static, Result<T, ProviderError>> + Sync);

impl<'l> CallChain<'l> {
    pub(crate) fn new(
        gate: AttemptGate,
        first: Hop,
        hops: Vec<Hop>,
        metrics: Arc<GatewayMetrics>,
        labels: &'l ModelLabels,
    ) -> Self {
        Self {
            gate,
            first,
            rest: hops,
            metrics,
            labels,
        }
    }

    /// A whole answer: the chain's attempts until one answers.
    pub(crate) async fn complete(self) -> Result<Completion, GatewayError> {
        let call = |hop: &Hop,
                    provider: &Arc<dyn Provider>|
         -> BoxFuture<'static, Result<_, ProviderError>> {
            let (provider, request) = (provider.clone(), hop.request.clone());
            Box::pin(async move { provider.complete(&request).await })
        };
        let Self {
            mut gate,
            first,
            rest,
            metrics,
            labels,
        } = self;
        let (mut obs, result) = run(&mut gate, first, rest, metrics, labels, &call).await;
        match result {
            Ok((hop, mut won, _)) => {
                hop.entry.first_content_took(gate.took(&won.attempt));
                gate.settle(&hop.entry, &mut won.attempt, None);
                obs.attempt_done(&won.attempt.span, won.attempt.took(), None);
                let attempts = gate.attempts();
                let response = won.value;
                obs.succeeded(
                    &response.model,
                    &response.id,
                    response.stop_reason,
                    response.usage,
                    attempts,
                );
                Ok(Completion {
                    provider: hop.entry.name.clone(),
                    attempts,
                    response,
                })
            }
            Err(error) => {
                obs.failed(&error);
                Err(error)
            }
        }
    }

    /// A stream, up to its commit point; the committed rest is relayed
    /// (and resumed) by [`stream`].
    pub(crate) async fn stream(
        self,
        stream_resume: Option<crate::config::ResumeMode>,
        cannot_restart: bool,
    ) -> Result<OpenStream, GatewayError> {
        let call = |hop: &Hop,
                    provider: &Arc<dyn Provider>|
         -> BoxFuture<'static, Result<_, ProviderError>> {
            let (provider, request) = (provider.clone(), hop.request.clone());
            let idle = hop.policy.stream_idle_timeout;
            Box::pin(
                async move { stream::open_until_commit(provider.as_ref(), &request, idle).await },
            )
        };
        let Self {
            mut gate,
            first,
            rest,
            metrics,
            labels,
        } = self;
        let (mut obs, result) = run(&mut gate, first, rest, metrics, labels, &call).await;
        let (hop, mut won, rest) = match result {
            Ok(served) => served,
            Err(error) => {
                obs.failed(&error);
                return Err(error);
            }
        };
        hop.entry.first_content_took(gate.took(&won.attempt));
        gate.commit(&hop.entry, &mut won.attempt);
        obs.attempt_done(&won.attempt.span, won.attempt.took(), None);
        let (events, head) = won.value;
        if head.iter().any(StreamEvent::is_content) {
            obs.first_chunk();
        }
        obs.committed();
        let resume = match stream_resume.unwrap_or(hop.entry.resilience.stream_resume) {
            crate::config::ResumeMode::Restart if cannot_restart => {
                crate::config::ResumeMode::Continue
            }
            mode => mode,
        };
        Ok(stream::committed(StreamSetup {
            gate,
            hop,
            rest,
            count: won.count,
            attempt: won.attempt,
            obs,
            events,
            head,
            resume,
        }))
    }
}

/// Runs the chain: each hop under its own policy, the caller's deadline
/// over the whole chain, attempts counted across hops. A hop is left
/// for the next one when its retries are spent on upstream faults, its
/// breaker is open, or it asked for a wait the gateway may not make.
async fn run<T: Send + 'static>(
    gate: &mut AttemptGate,
    first: Hop,
    rest: Vec<Hop>,
    metrics: Arc<GatewayMetrics>,
    labels: &ModelLabels,
    call: AttemptFn<'_, T>,
) -> (CallObservation, Result<Served<T>, GatewayError>) {
    let mut hops = rest.into_iter().peekable();
    let mut hop = first;
    let mut obs = CallObservation::start(metrics, hop.observed(labels));
    loop {
        let has_fallback = hops.peek().is_some();
        let chat = obs.chat.clone();
        // Instrumenting moves the hop's future once more: only for a span.
        let result = if chat.is_disabled() {
            run_hop(gate, &hop, &mut obs, has_fallback, call).await
        } else {
            run_hop(gate, &hop, &mut obs, has_fallback, call)
                .instrument(chat)
                .await
        };
        match result {
            Ok(won) => {
                let rest = hops.collect();
                return (obs, Ok((hop, won, rest)));
            }
            Err(error) => {
                let next = match context_overflow(&error, &hop) {
                    // Only a hop with a larger window can take a prompt
                    // that overflowed this one.
                    Some(window) => hops.find(|h| h.context_window.is_some_and(|w| w > window)),
                    None if falls_back(&error) => hops.next(),
                    None => None,
                };
                let Some(next) = next else {
                    return (obs, Err(error));
                };
                tracing::info!(
                    provider = %hop.entry.name,
                    next = %next.entry.name,
                    "falling back to the next provider: {error}"
                );
                obs.next_hop(&error, next.observed(labels));
                hop = next;
            }
        }
    }
}

/// One hop's attempts: the first (raced against a hedge when the hop
/// hedges), then retries as the policy decides.
async fn run_hop<T: Send + 'static>(
    gate: &mut AttemptGate,
    hop: &Hop,
    obs: &mut CallObservation,
    has_fallback: bool,
    call: AttemptFn<'_, T>,
) -> Result<Won<T>, GatewayError> {
    let mut count = HopCount::default();
    let mut last_error: Option<ProviderError> = None;
    let mut kind = AttemptKind::First;
    loop {
        let attempt = match gate.admit(hop, &mut count, kind, obs) {
            Ok(attempt) => attempt,
            // Every member of the pool cools down: wait for the first
            // when that fits the deadline and the gateway's longest wait.
            Err(Refusal::Pool(Unavailable::Cooling(wait)))
                if wait <= hop.policy.max_retry_after
                    && gate.remaining().is_none_or(|r| {
                        r >= wait.saturating_add(min_useful_attempt(&hop.policy))
                    }) =>
            {
                gate.wait(wait, obs).await;
                continue;
            }
            Err(refusal) => return Err(gate.refused(&hop.entry, refusal, last_error)),
        };
        let (outcome, mut attempt) = match hop.hedge_after.filter(|_| kind == AttemptKind::First) {
            Some(delay) => race(gate, hop, &mut count, obs, attempt, delay, call).await,
            None => (attempt.run(call(hop, attempt.provider(hop))).await, attempt),
        };
        let took = attempt.took();
        // After a hedge race, the attempt that decided may be the first:
        // its member is the one a retry avoids.
        if let Some(index) = attempt.member_index() {
            count.last_member = Some(index);
        }
        let error = match outcome {
            Outcome::Done(value) => {
                return Ok(Won {
                    value,
                    attempt,
                    count,
                });
            }
            Outcome::Failed(error) => {
                gate.settle(&hop.entry, &mut attempt, Some(&error));
                error
            }
            Outcome::TimedOut if attempt.bound == Bound::Deadline => {
                AttemptGate::abandon(&mut attempt);
                let error = ProviderError::new(
                    ErrorClass::Timeout,
                    "the caller's deadline ran out during the attempt",
                );
                obs.attempt_done(
                    &attempt.span,
                    took,
                    Some((&error, Decision::GiveUp(GiveUp::Deadline))),
                );
                return Err(GatewayError::DeadlineExceeded {
                    provider: hop.entry.name.clone(),
                    attempts: gate.attempts(),
                    last_error,
                });
            }
            Outcome::TimedOut => gate.timed_out(&hop.entry, &mut attempt),
        };
        let decision = if has_fallback && attempt.fails_over(&error) {
            Decision::GiveUp(GiveUp::FailOver)
        } else if gate.another_member_serves(hop, &count, &error, AttemptKind::Retry) {
            // The fault was this member's (its rate limit, its load, its
            // key): another member takes the retry at once.
            Decision::Retry {
                wait: Duration::ZERO,
            }
        } else {
            gate.decide(hop, &count, &error)
        };
        obs.attempt_done(&attempt.span, took, Some((&error, decision)));
        let attempts = gate.attempts();
        if has_fallback
            && let Decision::GiveUp(reason) = decision
            && falls_back(&give_up(&hop.entry, attempts, error.clone(), reason))
        {
            attempt.span.record("gateway.retry.decision", "fallback");
        }
        tracing::debug!(
            parent: &attempt.span,
            provider = %hop.entry.name,
            attempt = attempt.number,
            class = %error.class,
            "attempt failed: {}", error.message
        );
        // The attempt span ends here, so the backoff lies between spans.
        drop(attempt);
        match decision {
            Decision::Retry { wait } => {
                gate.wait(wait, obs).await;
                last_error = Some(error);
                kind = AttemptKind::Retry;
            }
            Decision::GiveUp(reason) => return Err(give_up(&hop.entry, attempts, error, reason)),
        }
    }
}

/// Runs `first`; when it has no outcome after `delay` and the gate
/// admits a hedge, runs a second attempt beside it. The first success
/// wins and the other is abandoned (its upstream request dropped). A
/// failure that will not be retried ends the race at once; a retryable
/// one leaves it to the other attempt, and so does a pool member's
/// refused key (a verdict on that key, not on the request: the other
/// attempt runs on another member). Returns the deciding outcome and its
/// attempt; the other attempt is settled or abandoned here.
async fn race<T: Send + 'static>(
    gate: &mut AttemptGate,
    hop: &Hop,
    count: &mut HopCount,
    obs: &mut CallObservation,
    first: Attempt,
    delay: Duration,
    call: AttemptFn<'_, T>,
) -> (Outcome<T>, Attempt) {
    let running = first.run(call(hop, first.provider(hop)));
    tokio::pin!(running);
    // `biased`: the outcome wins a tie with the delay, and the order is
    // deterministic (the simulation replays by seed).
    tokio::select! {
        biased;
        outcome = &mut running => return (outcome, first),
        () = tokio::time::sleep(delay) => {}
    }
    // A task that ran late finds its timer and its answer ready together,
    // and the answer may not have been read yet: let the runtime read what
    // is ready, then look again, so that no hedge is admitted (and counted)
    // for an answer already there.
    tokio::task::yield_now().await;
    if let std::task::Poll::Ready(outcome) =
        std::future::poll_fn(|cx| std::task::Poll::Ready(running.as_mut().poll(cx))).await
    {
        return (outcome, first);
    }
    let second = match gate.admit(hop, count, AttemptKind::Hedge, obs) {
        Ok(second) => second,
        Err(_) => return (running.await, first),
    };
    tracing::debug!(
        parent: &second.span,
        provider = %hop.entry.name,
        delay_ms = delay.as_millis() as u64,
        "sending a hedge"
    );
    let hedge = second.run(call(hop, second.provider(hop)));
    tokio::pin!(hedge);
    // The hedge is polled first, so an admitted hedge is always started
    // towards its upstream, even when the first attempt answers at that
    // moment.
    let (hedge_decided, outcome) = tokio::select! {
        biased;
        outcome = &mut hedge => (true, outcome),
        outcome = &mut running => (false, outcome),
    };
    let (mut decider, mut other) = if hedge_decided {
        (second, first)
    } else {
        (first, second)
    };
    let final_outcome = match &outcome {
        Outcome::Done(_) => true,
        Outcome::Failed(error) => {
            // A pool member's refused key is that key's verdict: the other
            // attempt, on another member, decides.
            let key_refused_in_pool = error.class == ErrorClass::Auth && hop.entry.pool.is_some();
            !(key_refused_in_pool || retry::is_retryable(&hop.policy, error))
        }
        Outcome::TimedOut => decider.bound == Bound::Deadline,
    };
    if final_outcome {
        AttemptGate::abandon(&mut other);
        other.span.record("gateway.retry.decision", "abandoned");
        return (outcome, decider);
    }
    // The deciding attempt failed and may be retried: its verdict is
    // recorded, and the other attempt decides.
    let error = match outcome {
        Outcome::Failed(error) => {
            gate.settle(&hop.entry, &mut decider, Some(&error));
            error
        }
        Outcome::Done(_) | Outcome::TimedOut => gate.timed_out(&hop.entry, &mut decider),
    };
    obs.attempt_done(&decider.span, decider.took(), None);
    decider.span.record("otel.status_code", "ERROR");
    decider.span.record("error.type", error.class.as_str());
    decider.span.record("gateway.retry.decision", "hedged");
    let outcome = if hedge_decided {
        running.await
    } else {
        hedge.await
    };
    (outcome, other)
}

/// What a caller sees when no member of a pool can take an attempt: the
/// members cool down (rate-limited, with the wait until the first is
/// ready), or every key was refused.
fn pool_error(why: Unavailable, last: Option<ProviderError>) -> ProviderError {
    let mut error = match why {
        Unavailable::Cooling(wait) => {
            let mut e = ProviderError::new(
                ErrorClass::RateLimited,
                format!(
                    "every member of the provider's pool is cooling down; the first is ready in {} ms",
                    wait.as_millis()
                ),
            );
            e.retry_after = Some(wait);
            e
        }
        Unavailable::Dead => ProviderError::new(
            ErrorClass::Auth,
            "the upstream refused every key of the provider's pool",
        ),
    };
    if let Some(last) = last {
        error.message = format!("{}; last error: {last}", error.message);
    }
    error
}

/// The hop that served, its winning attempt, and the hops after it (for a
/// stream's rescue).
type Served<T> = (Hop, Won<T>, Vec<Hop>);

/// The declared context window of a hop whose prompt overflowed it.
fn context_overflow(error: &GatewayError, hop: &Hop) -> Option<u32> {
    match error {
        GatewayError::Upstream {
            error,
            delivered: None,
            ..
        } if error.class == ErrorClass::ContextLength => hop.context_window,
        _ => None,
    }
}

/// Whether a failed hop leaves the call to the next provider.
pub(crate) fn falls_back(error: &GatewayError) -> bool {
    match error {
        GatewayError::Upstream {
            error,
            delivered: None,
            ..
        } => error.class.is_transient(),
        GatewayError::BreakerOpen { .. } | GatewayError::RetryAfterTooLong { .. } => true,
        GatewayError::Upstream {
            delivered: Some(_), ..
        }
        | GatewayError::DeadlineExceeded { .. }
        | GatewayError::InvalidArgument(_)
        | GatewayError::UnknownProvider(_) => false,
    }
}

/// The error of a hop that stopped retrying for `reason`. A wait that
/// cannot fit the deadline answers with the upstream's own failure (and
/// the wait as its retry hint), not a deadline status, while time remains.
fn give_up(
    entry: &RegisteredProvider,
    attempts: u32,
    mut error: ProviderError,
    reason: GiveUp,
) -> GatewayError {
    let provider = entry.name.clone();
    match reason {
        GiveUp::RetryAfterTooLong(retry_after) => GatewayError::RetryAfterTooLong {
            provider,
            attempts,
            error,
            retry_after,
        },
        GiveUp::Deadline => GatewayError::DeadlineExceeded {
            provider,
            attempts,
            last_error: Some(error),
        },
        GiveUp::WaitPastDeadline(wait) => {
            error.retry_after = Some(error.retry_after.unwrap_or_default().max(wait));
            GatewayError::Upstream {
                provider,
                attempts,
                error,
                delivered: None,
                budget_exhausted: false,
            }
        }
        GiveUp::NotRetryable
        | GiveUp::AttemptsSpent
        | GiveUp::BudgetExhausted
        | GiveUp::FailOver => GatewayError::Upstream {
            provider,
            attempts,
            error,
            delivered: None,
            budget_exhausted: reason == GiveUp::BudgetExhausted,
        },
    }
}

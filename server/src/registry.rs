//! The provider registry: providers by name, each with its resolved retry
//! policy and retry budget, and the default provider. It is the one place
//! that calls a provider, and so the one place that retries.
//!
//! Per call: the provider's policy, with the request's overrides merged in
//! within the operator's limits; attempts bounded by the per-try timeout
//! and the caller's deadline; after each failure one [`retry::decide`]
//! (class, `x-should-retry`, attempts left, Retry-After, deadline, budget);
//! full-jitter waits between attempts. A stream is retried until its commit
//! point (the first content delta), never after.

use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::{StreamExt, stream};
use tokio::time::Instant;

use crate::chat::{ChatRequest, ChatResponse, StreamEvent, Usage};
use crate::config::{Config, ConfigError, EnvSource, ProviderConfig, ResilienceConfig};
use crate::error::{ErrorClass, GatewayError, ProviderError};
use crate::observe::CallObservation;
use crate::providers::{self, EventStream, Provider};
use crate::retry::{
    self, CircuitBreaker, Clock, Decision, GiveUp, Jitter, RetryBudget, RetryLimits, RetryOverride,
    RetryPolicy, TokioClock, Transition,
};
use crate::telemetry::GatewayMetrics;
use tracing::Instrument;

/// A configured provider, its policy and its retry budget.
pub struct RegisteredProvider {
    /// The configured name.
    pub name: String,
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// Its resolved retry policy.
    pub policy: RetryPolicy,
    /// Its retry budget, shared by all calls to it.
    pub budget: RetryBudget,
    /// Its circuit breaker, when configured.
    pub breaker: Option<CircuitBreaker>,
    /// Its fallback, resume and hedging settings.
    pub resilience: ResilienceConfig,
}

impl RegisteredProvider {
    /// A provider with `policy` and a budget built from it.
    pub fn new(name: &str, provider: Arc<dyn Provider>, policy: RetryPolicy) -> Self {
        let budget = RetryBudget::new(
            policy.budget_ratio,
            policy.budget_min_per_second,
            policy.budget_window,
        );
        Self {
            name: name.to_string(),
            provider,
            policy,
            budget,
            breaker: None,
            resilience: ResilienceConfig {
                max_resumes: 2,
                ..ResilienceConfig::default()
            },
        }
    }

    /// Adds the breaker, fallback, resume and hedging settings.
    pub fn with_resilience(mut self, resilience: ResilienceConfig) -> Self {
        self.breaker = resilience.breaker.clone().map(CircuitBreaker::new);
        self.resilience = resilience;
        self
    }
}

/// What `ListProviders` shows of a provider: never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSummary {
    /// The configured name.
    pub name: String,
    /// The kind.
    pub kind: &'static str,
    /// The default model.
    pub default_model: String,
    /// The model file, for a model running inside the gateway.
    pub local_model: Option<providers::LocalModelInfo>,
}

/// Per-call context from the caller.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The provider by name; empty = the default.
    pub provider: String,
    /// How long the caller waits (from `grpc-timeout`), from now.
    pub timeout: Option<Duration>,
    /// The request's `x-retry-*` overrides.
    pub overrides: RetryOverride,
    /// The caller's own earlier attempts (`grpc-previous-rpc-attempts`).
    pub client_previous_attempts: u32,
    /// The authenticated client's own ceilings, within the operator's.
    pub limits: Option<RetryLimits>,
    /// The request's fallback chain (`x-fallback-providers`); `None` = the
    /// provider's configured chain, empty = none.
    pub fallback: Option<Vec<String>>,
    /// The request's `x-stream-resume`; `None` = the provider's setting.
    pub stream_resume: Option<bool>,
    /// The request's `x-hedge-after-ms`; `None` = the provider's setting,
    /// zero = no hedge.
    pub hedge_after: Option<Duration>,
    /// The providers the authenticated client may use; `None` = all.
    pub allowed_providers: Option<Vec<String>>,
}

/// A whole answer and how it was obtained.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The provider that served.
    pub provider: String,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The answer.
    pub response: ChatResponse,
}

/// The events of a committed stream. The first item is
/// [`StreamEvent::Start`]. It ends after [`StreamEvent::Stop`], or with an
/// error: a stream never ends quietly without a stop.
pub type GatewayStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, GatewayError>> + Send>>;

/// A stream that has committed to one attempt.
pub struct OpenStream {
    /// The provider that serves it.
    pub provider: String,
    /// The attempt that serves it (1-based).
    pub attempt: u32,
    /// Its events.
    pub events: GatewayStream,
}

/// Providers by name, with their policies.
pub struct Registry {
    providers: BTreeMap<String, RegisteredProvider>,
    default: String,
    limits: RetryLimits,
    clock: Arc<dyn Clock>,
    jitter: Jitter,
    metrics: Arc<GatewayMetrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl Registry {
    /// Builds every configured provider; fails on the first that cannot be
    /// built (for example a missing API key variable).
    pub fn from_config(config: &Config, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let mut providers = Vec::new();
        for (name, section) in &config.providers {
            let path = format!("providers.{name}.retry");
            let mut policy = RetryPolicy::resolve(&config.retry, section.retry(), &path)?;
            if matches!(section, ProviderConfig::Databricks(_))
                && config.retry.per_try_timeout_ms.is_none()
                && section.retry().and_then(|r| r.per_try_timeout_ms).is_none()
            {
                policy.per_try_timeout =
                    Duration::from_millis(providers::databricks::DEFAULT_PER_TRY_TIMEOUT_MS);
            }
            let provider = providers::build(name, section, env)?;
            providers.push(
                RegisteredProvider::new(name, provider, policy)
                    .with_resilience(section.resilience()),
            );
        }
        Ok(Self::from_providers(
            providers,
            &config.default_provider_name()?,
            RetryLimits::resolve(config.retry.limits.as_ref())?,
        ))
    }

    /// A registry of ready-made providers (for tests and embedding).
    pub fn from_providers(
        providers: Vec<RegisteredProvider>,
        default: &str,
        limits: RetryLimits,
    ) -> Self {
        Self {
            providers: providers.into_iter().map(|p| (p.name.clone(), p)).collect(),
            default: default.to_string(),
            limits,
            clock: Arc::new(TokioClock),
            jitter: Jitter::from_entropy(),
            metrics: Arc::new(GatewayMetrics::noop()),
        }
    }

    /// Records metrics on these instruments.
    pub fn with_metrics(mut self, metrics: Arc<GatewayMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Replaces the clock (tests use a scripted one).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Seeds the backoff jitter (tests use a fixed seed).
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter = Jitter::seeded(seed);
        self
    }

    /// The default provider's name.
    pub fn default_provider(&self) -> &str {
        &self.default
    }

    /// Every provider, ordered by name.
    pub fn summaries(&self) -> Vec<ProviderSummary> {
        self.providers
            .values()
            .map(|p| ProviderSummary {
                name: p.name.clone(),
                kind: p.provider.kind(),
                default_model: p.provider.default_model().to_string(),
                local_model: p.provider.local_model(),
            })
            .collect()
    }

    /// The provider a call names (empty = the default).
    pub fn get(&self, name: &str) -> Result<&RegisteredProvider, GatewayError> {
        let name = if name.is_empty() { &self.default } else { name };
        self.providers
            .get(name)
            .ok_or_else(|| GatewayError::UnknownProvider(name.to_string()))
    }

    /// Whether some provider can take a call now: one without a breaker,
    /// or whose breaker is not open (half-open counts: it takes probes).
    pub fn can_serve(&self) -> bool {
        self.providers.values().any(|p| {
            p.breaker.as_ref().is_none_or(|b| {
                b.state() != crate::retry::BreakerState::Open || b.admits_probe(self.clock.now())
            })
        })
    }

    /// The policy of one call: the provider's, the request's overrides
    /// within the limits, and a single attempt when the caller retries.
    fn call_policy(&self, entry: &RegisteredProvider, options: &CallOptions) -> RetryPolicy {
        let limits = options.limits.as_ref().unwrap_or(&self.limits);
        let mut policy = options.overrides.apply(&entry.policy, limits);
        if options.client_previous_attempts > 0 && policy.single_attempt_when_client_retries {
            policy.max_attempts = 1;
        }
        policy
    }

    /// The providers a call may use, in order: the named (or default)
    /// provider, then its fallback chain (or the request's own). A request
    /// with tools or tool results only goes to providers that support tools.
    fn chain<'r>(
        &'r self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<Vec<Hop<'r>>, GatewayError> {
        let primary = self.get(&options.provider)?;
        let mut hops = vec![Hop {
            entry: primary,
            model: None,
        }];
        let configured: Vec<(String, Option<String>)> = primary
            .resilience
            .fallback
            .iter()
            .map(|h| (h.provider().to_string(), h.model().map(str::to_string)))
            .collect();
        let names = match &options.fallback {
            Some(requested) => requested.iter().map(|n| (n.clone(), None)).collect(),
            None => configured,
        };
        let uses_tools = !request.tools.is_empty()
            || request.messages.iter().flat_map(|m| &m.content).any(|c| {
                matches!(
                    c,
                    crate::chat::Content::ToolUse { .. } | crate::chat::Content::ToolResult { .. }
                )
            });
        for (name, model) in names {
            let entry = self.providers.get(&name).ok_or_else(|| {
                GatewayError::InvalidArgument(format!(
                    "x-fallback-providers: `{name}` is not a configured provider"
                ))
            })?;
            let allowed = options
                .allowed_providers
                .as_ref()
                .is_none_or(|a| a.contains(&entry.name));
            if entry.name == primary.name
                || !allowed
                || (uses_tools && !entry.provider.supports_tools())
            {
                continue;
            }
            // A fallback asks for its own model (empty = its default): the
            // caller's model belongs to the primary.
            hops.push(Hop {
                entry,
                model: Some(model.unwrap_or_default()),
            });
        }
        Ok(hops)
    }

    /// Runs a call through its chain of providers: each hop under its own
    /// policy, the caller's deadline over the whole chain, attempts counted
    /// across hops. A hop is left for the next one when its retries are
    /// spent on upstream faults, its budget refused, its breaker is open or
    /// it asked for a wait longer than the gateway may wait.
    async fn run_chain<'r, T>(
        &'r self,
        request: &ChatRequest,
        options: &CallOptions,
        attempt: impl Fn(
            Arc<dyn Provider>,
            Arc<ChatRequest>,
            Duration,
        ) -> BoxFuture<'static, Result<T, ProviderError>>,
    ) -> Result<Served<'r, T>, GatewayError> {
        let hops = self.chain(request, options)?;
        let deadline = options.timeout.map(|t| self.clock.now() + t);
        let mut attempts = 0;
        let mut hops = hops.into_iter().peekable();
        while let Some(hop) = hops.next() {
            let hop_request = Arc::new(match &hop.model {
                None => request.clone(),
                Some(model) => ChatRequest {
                    model: model.clone(),
                    ..request.clone()
                },
            });
            let policy = self.call_policy(hop.entry, options);
            let mut obs = self.observe(hop.entry, &hop_request);
            let chat = obs.chat.clone();
            let run = RunContext {
                entry: hop.entry,
                policy: &policy,
                deadline,
                attempts_before: attempts,
                has_fallback: hops.peek().is_some(),
                hedge_after: if attempts == 0 {
                    options
                        .hedge_after
                        .or(hop
                            .entry
                            .resilience
                            .hedge_after_ms
                            .map(Duration::from_millis))
                        .filter(|d| !d.is_zero())
                } else {
                    None
                },
            };
            let result = self
                .with_retries(&run, &mut obs, |_| {
                    attempt(
                        hop.entry.provider.clone(),
                        hop_request.clone(),
                        policy.stream_idle_timeout,
                    )
                })
                .instrument(chat)
                .await;
            match result {
                Ok((value, total, span)) => {
                    return Ok(Served {
                        entry: hop.entry,
                        request: hop_request,
                        policy,
                        value,
                        attempts: total,
                        span,
                        obs,
                    });
                }
                Err(error) => {
                    obs.failed(&error);
                    if hops.peek().is_none() || !falls_back(&error) {
                        return Err(error);
                    }
                    attempts = error.attempts();
                    tracing::info!(
                        provider = %hop.entry.name,
                        "falling back to the next provider: {error}"
                    );
                }
            }
        }
        // Not reached: the chain always holds the primary, whose outcome the
        // last iteration returns.
        Err(GatewayError::UnknownProvider(options.provider.clone()))
    }

    /// Gets a whole answer, retrying and falling back as configured.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<Completion, GatewayError> {
        let served = self
            .run_chain(request, options, |provider, request, _| {
                Box::pin(async move { provider.complete(&request).await })
            })
            .await?;
        let Served {
            entry,
            value: response,
            attempts,
            mut obs,
            ..
        } = served;
        obs.succeeded(
            &response.model,
            &response.id,
            response.stop_reason,
            response.usage,
            attempts,
        );
        Ok(Completion {
            provider: entry.name.clone(),
            attempts,
            response,
        })
    }

    /// Opens a stream, retrying (and falling back) on every failure before
    /// its commit point (the first content delta, or the stop of an empty
    /// answer) invisibly to the caller. After the commit point a failure
    /// ends the stream with an error, never quietly.
    pub async fn stream(
        &self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<OpenStream, GatewayError> {
        let served = self
            .run_chain(request, options, |provider, request, idle| {
                Box::pin(async move { open_until_commit(provider.as_ref(), &request, idle).await })
            })
            .await?;
        let Served {
            entry,
            request: served_request,
            policy,
            value: (events, mut head),
            attempts,
            span,
            mut obs,
        } = served;
        if head.iter().any(StreamEvent::is_content) {
            obs.first_chunk();
        }
        obs.committed();
        if !matches!(head.front(), Some(StreamEvent::Start { .. })) {
            head.push_front(StreamEvent::Start {
                id: String::new(),
                model: served_request
                    .model_or(entry.provider.default_model())
                    .to_string(),
            });
        }
        let deadline = options.timeout.map(|t| self.clock.now() + t);
        let resume_wanted = options
            .stream_resume
            .unwrap_or(entry.resilience.stream_resume);
        let resume = (resume_wanted && entry.provider.supports_prefill()).then(|| Resume {
            provider: entry.provider.clone(),
            request: served_request.clone(),
            per_try_timeout: policy.per_try_timeout,
            text: String::new(),
            text_index: None,
            in_tool: false,
            remaining: entry.resilience.max_resumes,
            usage_before: Usage::default(),
            resumed: false,
        });
        Ok(OpenStream {
            provider: entry.name.clone(),
            attempt: attempts,
            events: committed(Committed {
                obs,
                _attempt_span: span,
                id: String::new(),
                model: String::new(),
                usage: Usage::default(),
                events,
                head,
                delivered: 0,
                done: false,
                idle: policy.stream_idle_timeout,
                deadline,
                clock: self.clock.clone(),
                provider: entry.name.clone(),
                attempts,
                resume,
            }),
        })
    }

    fn observe(&self, entry: &RegisteredProvider, request: &ChatRequest) -> CallObservation {
        CallObservation::start(
            self.metrics.clone(),
            &entry.name,
            entry.provider.kind(),
            request,
            entry.provider.default_model(),
        )
    }

    /// Runs `first`; if it has produced nothing after `delay` and the
    /// budget allows, starts `second` too. The first to succeed wins and
    /// the other is dropped (its upstream request with it); if one fails the
    /// other is awaited. Returns the outcome and, when a hedge was sent,
    /// whether it won.
    async fn race_with_hedge<T, A, B>(
        &self,
        entry: &RegisteredProvider,
        delay: Duration,
        first: A,
        second: impl FnOnce() -> B,
    ) -> (Result<T, ProviderError>, Option<bool>)
    where
        A: std::future::Future<Output = Result<T, ProviderError>>,
        B: std::future::Future<Output = Result<T, ProviderError>>,
    {
        tokio::pin!(first);
        tokio::select! {
            result = &mut first => return (result, None),
            () = tokio::time::sleep(delay) => {}
        }
        if !entry.budget.withdraw(self.clock.now()) {
            return (first.await, None);
        }
        tracing::debug!(provider = %entry.name, delay_ms = delay.as_millis() as u64, "sending a hedge");
        let second = second();
        tokio::pin!(second);
        tokio::select! {
            result = &mut first => match result {
                Ok(value) => (Ok(value), Some(false)),
                Err(_) => (second.await, Some(true)),
            },
            result = &mut second => match result {
                Ok(value) => (Ok(value), Some(true)),
                Err(_) => (first.await, Some(false)),
            },
        }
    }

    /// Records a breaker's change of state.
    fn breaker_changed(&self, entry: &RegisteredProvider, transition: Option<Transition>) {
        let Some(t) = transition else { return };
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

    /// Runs `attempt` on one provider until it succeeds or the policy says
    /// stop; returns the result, the attempts made in all (earlier hops
    /// included) and the span of the attempt that succeeded. Each attempt
    /// runs in its own span; backoffs lie between them.
    async fn with_retries<T>(
        &self,
        run: &RunContext<'_>,
        obs: &mut CallObservation,
        attempt: impl Fn(u32) -> BoxFuture<'static, Result<T, ProviderError>>,
    ) -> Result<(T, u32, tracing::Span), GatewayError> {
        let (entry, policy, deadline) = (run.entry, run.policy, run.deadline);
        entry.budget.deposit(self.clock.now());
        let mut last_error: Option<ProviderError> = None;
        let mut tries = 0;
        loop {
            let attempts = run.attempts_before + tries;
            let remaining = deadline.map(|d| d.saturating_duration_since(self.clock.now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                return Err(GatewayError::DeadlineExceeded {
                    provider: entry.name.clone(),
                    attempts,
                    last_error,
                });
            }
            let permit = match &entry.breaker {
                None => None,
                Some(breaker) => {
                    let (admitted, transition) = breaker.admit(self.clock.now());
                    self.breaker_changed(entry, transition);
                    match admitted {
                        Ok(permit) => Some(permit),
                        Err(retry_after) => {
                            return Err(GatewayError::BreakerOpen {
                                provider: entry.name.clone(),
                                attempts,
                                retry_after,
                                last_error,
                            });
                        }
                    }
                }
            };
            tries += 1;
            let attempts = attempts + 1;
            let limit = remaining.map_or(policy.per_try_timeout, |r| r.min(policy.per_try_timeout));
            let by_deadline = remaining.is_some_and(|r| r <= policy.per_try_timeout);
            let mut span = obs.attempt_span(attempts);
            let started = std::time::Instant::now();
            let hedge_after = run.hedge_after.filter(|_| tries == 1);
            let outcome = match hedge_after {
                None => {
                    tokio::time::timeout(limit, attempt(attempts).instrument(span.clone())).await
                }
                Some(delay) => {
                    let hedge_span = obs.attempt_span(attempts + 1);
                    let raced = tokio::time::timeout(
                        limit,
                        self.race_with_hedge(
                            entry,
                            delay,
                            attempt(attempts).instrument(span.clone()),
                            || attempt(attempts + 1).instrument(hedge_span.clone()),
                        ),
                    )
                    .await;
                    match raced {
                        Ok((result, hedge)) => {
                            if let Some(second_won) = hedge {
                                // The hedge was an attempt of its own.
                                tries += 1;
                                if second_won {
                                    span = hedge_span;
                                }
                            }
                            Ok(result)
                        }
                        Err(elapsed) => Err(elapsed),
                    }
                }
            };
            let attempts = run.attempts_before + tries;
            let took = started.elapsed();
            let error = match outcome {
                Ok(Ok(value)) => {
                    if let (Some(breaker), Some(permit)) = (&entry.breaker, permit) {
                        self.breaker_changed(entry, breaker.record(permit, None, self.clock.now()));
                    }
                    obs.attempt_done(&span, took, None);
                    return Ok((value, attempts, span));
                }
                Ok(Err(error)) => error,
                Err(_) if by_deadline => {
                    let error = ProviderError::new(
                        ErrorClass::Timeout,
                        "the caller's deadline ran out during the attempt",
                    );
                    obs.attempt_done(
                        &span,
                        took,
                        Some((&error, Decision::GiveUp(GiveUp::Deadline))),
                    );
                    return Err(GatewayError::DeadlineExceeded {
                        provider: entry.name.clone(),
                        attempts,
                        last_error,
                    });
                }
                Err(_) => ProviderError::new(
                    ErrorClass::Timeout,
                    format!(
                        "no answer within the per-try timeout of {} ms",
                        policy.per_try_timeout.as_millis()
                    ),
                ),
            };
            if let (Some(breaker), Some(permit)) = (&entry.breaker, permit) {
                self.breaker_changed(
                    entry,
                    breaker.record(permit, Some(&error), self.clock.now()),
                );
            }
            let now = self.clock.now();
            let remaining = deadline.map(|d| d.saturating_duration_since(now));
            let decision = retry::decide(
                policy,
                tries,
                &error,
                remaining,
                &entry.budget,
                &self.jitter,
                now,
            );
            obs.attempt_done(&span, took, Some((&error, decision)));
            if run.has_fallback
                && let Decision::GiveUp(reason) = decision
                && falls_back(&give_up(entry, attempts, error.clone(), reason))
            {
                span.record("gateway.retry.decision", "fallback");
            }
            tracing::debug!(
                parent: &span,
                provider = %entry.name,
                attempt = attempts,
                class = %error.class,
                "attempt failed: {}", error.message
            );
            // The attempt span ends here, so the backoff lies between spans.
            drop(span);
            match decision {
                Decision::Retry { wait } => {
                    if !wait.is_zero() {
                        let started = std::time::Instant::now();
                        self.clock.sleep(wait).await;
                        obs.waited(started.elapsed());
                    }
                    last_error = Some(error);
                }
                Decision::GiveUp(reason) => {
                    return Err(give_up(entry, attempts, error, reason));
                }
            }
        }
    }
}

/// One provider of a call's chain.
struct Hop<'r> {
    entry: &'r RegisteredProvider,
    /// The model a fallback hop asks for (empty = its default); `None` for
    /// the primary, which keeps the request's model.
    model: Option<String>,
}

/// What one hop's retry loop works with.
struct RunContext<'r> {
    entry: &'r RegisteredProvider,
    policy: &'r RetryPolicy,
    deadline: Option<Instant>,
    attempts_before: u32,
    has_fallback: bool,
    /// Start a hedge when the first attempt has no content after this.
    hedge_after: Option<Duration>,
}

/// A call that a provider of its chain served.
struct Served<'r, T> {
    entry: &'r RegisteredProvider,
    request: Arc<ChatRequest>,
    policy: RetryPolicy,
    value: T,
    attempts: u32,
    span: tracing::Span,
    obs: CallObservation,
}

/// Whether a failed hop leaves the call to the next provider.
fn falls_back(error: &GatewayError) -> bool {
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

fn give_up(
    entry: &RegisteredProvider,
    attempts: u32,
    error: ProviderError,
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
        GiveUp::NotRetryable | GiveUp::AttemptsSpent | GiveUp::BudgetExhausted => {
            GatewayError::Upstream {
                provider,
                attempts,
                error,
                delivered: None,
                budget_exhausted: reason == GiveUp::BudgetExhausted,
            }
        }
    }
}

fn no_stop() -> ProviderError {
    ProviderError::new(
        ErrorClass::StreamInterrupted,
        "the upstream stream ended without a stop reason",
    )
}

fn stalled(idle: Duration) -> ProviderError {
    ProviderError::new(
        ErrorClass::StreamInterrupted,
        format!("the upstream stream stalled for {} ms", idle.as_millis()),
    )
}

/// One stream attempt up to its commit point: opens the stream and reads
/// until the first content delta (or a stop), each event within `idle`.
async fn open_until_commit(
    provider: &dyn Provider,
    request: &ChatRequest,
    idle: Duration,
) -> Result<(EventStream, VecDeque<StreamEvent>), ProviderError> {
    let mut events = provider.stream(request).await?;
    let mut head = VecDeque::new();
    loop {
        match tokio::time::timeout(idle, events.next()).await {
            Ok(Some(Ok(event))) => {
                let commit = event.is_content() || matches!(event, StreamEvent::Stop(_));
                head.push_back(event);
                if commit {
                    return Ok((events, head));
                }
            }
            Ok(Some(Err(error))) => return Err(error),
            Ok(None) => return Err(no_stop()),
            Err(_) => return Err(stalled(idle)),
        }
    }
}

struct Committed {
    /// The call's telemetry and the serving attempt's span, which end with
    /// the stream.
    obs: CallObservation,
    _attempt_span: tracing::Span,
    id: String,
    model: String,
    usage: Usage,
    events: EventStream,
    head: VecDeque<StreamEvent>,
    delivered: u64,
    done: bool,
    idle: Duration,
    deadline: Option<Instant>,
    clock: Arc<dyn Clock>,
    provider: String,
    attempts: u32,
    /// How to resume the stream if it breaks inside text (opt-in).
    resume: Option<Resume>,
}

/// What a stream needs to resume after a break inside text: the request
/// that produced it, the text delivered so far, and resumes left.
struct Resume {
    provider: Arc<dyn Provider>,
    request: Arc<ChatRequest>,
    per_try_timeout: Duration,
    text: String,
    text_index: Option<u32>,
    in_tool: bool,
    remaining: u32,
    usage_before: Usage,
    resumed: bool,
}

impl Resume {
    /// The continuation request: the conversation plus an assistant turn
    /// holding exactly the text delivered (appended to a prefill the
    /// request already had).
    fn continuation(&self) -> ChatRequest {
        let mut request = (*self.request).clone();
        match request.messages.last_mut() {
            Some(last) if last.role == crate::chat::Role::Assistant => {
                match last.content.last_mut() {
                    Some(crate::chat::Content::Text(t)) => t.push_str(&self.text),
                    _ => last
                        .content
                        .push(crate::chat::Content::Text(self.text.clone())),
                }
            }
            _ => request.messages.push(crate::chat::Message {
                role: crate::chat::Role::Assistant,
                content: vec![crate::chat::Content::Text(self.text.clone())],
            }),
        }
        request
    }

    /// A continuation's block index, moved to follow the broken block.
    fn remap(&self, index: u32) -> u32 {
        self.text_index.unwrap_or(0) + index
    }
}

/// The rest of a committed stream: the buffered head, then each upstream
/// event as it arrives. Silence longer than the idle timeout, a cut, an
/// error event or an end without a stop all end it with an error that says
/// how many deltas were delivered; the caller's deadline ends it too.
fn committed(state: Committed) -> GatewayStream {
    Box::pin(stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let next = match st.head.pop_front() {
                Some(event) => Ok(Some(Ok(event))),
                None => {
                    let (wait, by_deadline) = match st.deadline {
                        Some(d) => {
                            let remaining = d.saturating_duration_since(st.clock.now());
                            (st.idle.min(remaining), remaining <= st.idle)
                        }
                        None => (st.idle, false),
                    };
                    tokio::time::timeout(wait, st.events.next())
                        .await
                        .map_err(|_| by_deadline)
                }
            };
            let broke = match next {
                Ok(Some(Ok(event))) => return Some((Ok(st.relay(event)), st)),
                Ok(Some(Err(error))) => error,
                Ok(None) => no_stop(),
                Err(true) => {
                    st.done = true;
                    let error = GatewayError::DeadlineExceeded {
                        provider: st.provider.clone(),
                        attempts: st.attempts,
                        last_error: None,
                    };
                    st.obs.failed(&error);
                    return Some((Err(error), st));
                }
                Err(false) => stalled(st.idle),
            };
            if st.try_resume(&broke).await {
                continue;
            }
            let error = st.broken(broke);
            return Some((Err(error), st));
        }
    }))
}

impl Committed {
    /// Bookkeeping for one event on its way to the caller.
    fn relay(&mut self, event: StreamEvent) -> StreamEvent {
        let resumed = self.resume.as_ref().is_some_and(|r| r.resumed);
        let event = match event {
            StreamEvent::Text { index, text } if resumed => StreamEvent::Text {
                index: self.resume.as_ref().map_or(index, |r| r.remap(index)),
                text,
            },
            StreamEvent::ToolUseStart { index, id, name } if resumed => StreamEvent::ToolUseStart {
                index: self.resume.as_ref().map_or(index, |r| r.remap(index)),
                id,
                name,
            },
            StreamEvent::ToolInputJson { index, json } if resumed => StreamEvent::ToolInputJson {
                index: self.resume.as_ref().map_or(index, |r| r.remap(index)),
                json,
            },
            other => other,
        };
        match &event {
            StreamEvent::Start { id, model } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
            }
            StreamEvent::Usage(u) => {
                let before = self
                    .resume
                    .as_ref()
                    .map_or(Usage::default(), |r| r.usage_before);
                self.usage = Usage {
                    input_tokens: before.input_tokens + u.input_tokens,
                    output_tokens: before.output_tokens + u.output_tokens,
                };
                return StreamEvent::Usage(self.usage);
            }
            StreamEvent::Stop(stop) => {
                self.done = true;
                let (model, id, usage, attempts) = (
                    self.model.clone(),
                    self.id.clone(),
                    self.usage,
                    self.attempts,
                );
                self.obs.succeeded(&model, &id, *stop, usage, attempts);
            }
            StreamEvent::Text { index, text } => {
                self.delivered += 1;
                if let Some(r) = &mut self.resume {
                    r.text.push_str(text);
                    r.text_index = Some(*index);
                }
            }
            StreamEvent::ToolUseStart { .. } | StreamEvent::ToolInputJson { .. } => {
                self.delivered += 1;
                if let Some(r) = &mut self.resume {
                    r.in_tool = true;
                }
            }
            StreamEvent::Resumed { .. } => {}
        }
        event
    }

    /// After a break inside text, sends the continuation request and, once
    /// it delivers content, carries on with its events after a `resumed`
    /// event. A break inside a tool call, no resumes left, or a failed
    /// continuation leave the break as it is.
    async fn try_resume(&mut self, broke: &ProviderError) -> bool {
        let Some(r) = &self.resume else { return false };
        if r.in_tool || r.text.is_empty() || r.remaining == 0 {
            return false;
        }
        let continuation = r.continuation();
        let (provider, timeout, idle) = (r.provider.clone(), r.per_try_timeout, self.idle);
        let attempt = self.attempts + 1;
        let span = self.obs.attempt_span(attempt);
        tracing::info!(
            parent: &span,
            provider = %self.provider,
            characters = r.text.chars().count(),
            "resuming a stream that broke inside text: {broke}"
        );
        let opened = tokio::time::timeout(
            timeout,
            open_until_commit(provider.as_ref(), &continuation, idle).instrument(span.clone()),
        )
        .await;
        let Ok(Ok((events, head))) = opened else {
            span.record("otel.status_code", "ERROR");
            return false;
        };
        let characters_delivered = r.text.chars().count() as u64;
        self.attempts = attempt;
        self._attempt_span = span;
        let usage = self.usage;
        if let Some(r) = &mut self.resume {
            r.remaining -= 1;
            r.usage_before = usage;
            r.resumed = true;
        }
        self.events = events;
        self.head = head
            .into_iter()
            .filter(|e| !matches!(e, StreamEvent::Start { .. }))
            .collect();
        self.head.push_front(StreamEvent::Resumed {
            attempt,
            provider: self.provider.clone(),
            characters_delivered,
        });
        true
    }

    fn broken(&mut self, error: ProviderError) -> GatewayError {
        self.done = true;
        let error = GatewayError::Upstream {
            provider: self.provider.clone(),
            attempts: self.attempts,
            error,
            delivered: Some(self.delivered),
            budget_exhausted: false,
        };
        self.obs.failed(&error);
        error
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        if !self.done {
            // The caller went away before the end.
            self.obs.failed(&GatewayError::Upstream {
                provider: self.provider.clone(),
                attempts: self.attempts,
                error: ProviderError::new(ErrorClass::Cancelled, "the caller cancelled the stream"),
                delivered: Some(self.delivered),
                budget_exhausted: false,
            });
        }
    }
}

//! The provider registry: providers by name, each with its resolved retry
//! policy, retry budget and circuit breaker, and the default provider.
//!
//! It is the one place that calls a provider, and so the one place that
//! retries. Every upstream call of every kind (a first attempt, a retry, a
//! hedge, a stream continuation, each fallback hop's attempts, a breaker
//! probe) goes through one door, the [`attempts`] gate, which gives it its
//! deadline, breaker permit, budget draw, number and span. [`stream`] holds
//! what happens after a stream's commit point: relaying, the deadline and
//! idle timer, and resuming a broken stream.
//!
//! - `mod.rs`: the table, lookup, summaries and the two entry points.
//! - `attempts.rs`: the gate and the retry loop over a call's chain.
//! - `stream.rs`: the commit point, the committed stream, resume.

mod attempts;
mod pool;
mod stream;

pub use pool::MemberSummary;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;

use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{Config, ConfigError, EnvSource, ResilienceConfig, ResumeMode};
use crate::error::GatewayError;
use crate::observe::ModelLabels;
use crate::providers::{self, Provider};
use crate::retry::{
    BreakerState, CircuitBreaker, Clock, Jitter, RetryBudget, RetryLimits, RetryOverride,
    RetryPolicy, TokioClock, Transition,
};
use crate::telemetry::GatewayMetrics;

use attempts::{AttemptGate, CallChain};

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
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// Its fallback, resume and hedging settings.
    pub resilience: ResilienceConfig,
    /// Its members, when it has more than one endpoint and key pair.
    pool: Option<Arc<pool::Pool>>,
    /// Its recent times to first content (for `hedge_after_ms = "p95"`).
    first_content: std::sync::Mutex<std::collections::VecDeque<Duration>>,
    /// Told of every change of its breaker's state (the simulation's).
    breaker_watch: Option<BreakerWatch>,
}

/// Told of every change of a provider's breaker state, with its pool's
/// members (empty for a provider of one) as they are at that moment: how
/// the registry's simulation checks that a breaker opens only when no
/// member can serve. Not an API.
#[doc(hidden)]
pub type BreakerWatch = Arc<dyn Fn(Transition, &[MemberSummary]) + Send + Sync>;

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
            pool: None,
            first_content: std::sync::Mutex::new(std::collections::VecDeque::new()),
            breaker_watch: None,
        }
    }

    /// Calls `watch` on every change of the breaker's state (see
    /// [`BreakerWatch`]). For the simulation; not an API.
    #[doc(hidden)]
    pub fn with_breaker_watch(mut self, watch: BreakerWatch) -> Self {
        self.breaker_watch = Some(watch);
        self
    }

    /// Its pool's members now (empty for a provider of one).
    pub(crate) fn members(&self, now: tokio::time::Instant) -> Vec<MemberSummary> {
        self.pool
            .as_ref()
            .map(|pool| pool.summaries(now))
            .unwrap_or_default()
    }

    /// Tells the watch, if any, of a change of the breaker's state.
    pub(crate) fn breaker_changed(&self, transition: Transition, now: tokio::time::Instant) {
        if let Some(watch) = &self.breaker_watch {
            watch(transition, &self.members(now));
        }
    }

    /// Notes how long a successful attempt took to its first content.
    pub(crate) fn first_content_took(&self, took: Duration) {
        // Only `hedge_after_ms = "p95"` reads them: no lock per call for
        // the other providers.
        if !self.resilience.hedge_p95 {
            return;
        }
        if let Ok(mut times) = self.first_content.lock() {
            if times.len() == FIRST_CONTENT_SAMPLES {
                times.pop_front();
            }
            times.push_back(took);
        }
    }

    /// The p95 of the recent times to first content, once there are
    /// [`MIN_P95_SAMPLES`] of them.
    fn p95_first_content(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.first_content.lock().ok()?.iter().copied().collect();
        if times.len() < MIN_P95_SAMPLES {
            return None;
        }
        let at = (times.len() * 95).div_ceil(100).saturating_sub(1);
        let (_, p95, _) = times.select_nth_unstable(at);
        Some(*p95)
    }

    /// Makes the provider a pool of `members` (each an endpoint and key
    /// pair with the provider built for it), chosen by `balance`. A single
    /// member leaves it as it is.
    pub fn with_members(
        mut self,
        members: Vec<(crate::config::MemberConfig, Arc<dyn Provider>)>,
        balance: crate::config::Balance,
    ) -> Self {
        if members.len() > 1 {
            self.pool = Some(Arc::new(pool::Pool::new(members, balance)));
        }
        self
    }

    /// Adds the breaker, fallback, resume and hedging settings.
    pub fn with_resilience(mut self, resilience: ResilienceConfig) -> Self {
        self.breaker = resilience.breaker.clone().map(CircuitBreaker::new);
        self.resilience = resilience;
        self
    }
}

/// How many recent times to first content a provider keeps.
const FIRST_CONTENT_SAMPLES: usize = 256;
/// `hedge_after_ms = "p95"` hedges only once this many were seen.
pub const MIN_P95_SAMPLES: usize = 50;
/// The least delay of a p95 hedge.
pub const MIN_P95_HEDGE_MS: u64 = 100;

/// What `ListProviders` shows of a provider: never a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSummary {
    /// The configured name.
    pub name: String,
    /// The kind.
    pub kind: &'static str,
    /// The default model.
    pub default_model: String,
    /// The model file, for a model running inside the gateway.
    pub local_model: Option<providers::LocalModelInfo>,
    /// The members of a pool (empty for a provider of one).
    pub members: Vec<MemberSummary>,
}

/// Per-call context from the caller.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The provider by name; empty = the default.
    pub provider: String,
    /// How long the caller waits (from `grpc-timeout`), from now: the
    /// registry fixes the deadline once, when the call enters it.
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
    pub stream_resume: Option<ResumeMode>,
    /// The request's `x-hedge-after-ms`; `None` = the provider's setting,
    /// zero = no hedge. Clamped by the operator's limits.
    pub hedge_after: Option<Duration>,
    /// The providers the authenticated client may use; `None` = all.
    pub allowed_providers: Option<Vec<String>>,
    /// The caller's wire format cannot take back what was sent (the
    /// OpenAI and Anthropic HTTP streams): a `restart` rescue is made a
    /// `continue` one.
    pub cannot_restart: bool,
    /// The request's `x-first-token-timeout-ms`; `None` = the provider's.
    /// Clamped by the operator's per-try ceiling.
    pub first_token_timeout: Option<Duration>,
}

/// A whole answer and how it was obtained.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The provider that served.
    pub provider: String,
    /// Upstream attempts made, every hop included.
    pub attempts: u32,
    /// The answer.
    pub response: ChatResponse,
}

/// The events of a committed stream. The first item is
/// [`StreamEvent::Start`]. It ends after [`StreamEvent::Stop`], or with an
/// error: a stream never ends quietly without a stop. A
/// [`StreamEvent::Resumed`] carries the attempt count from then on.
pub type GatewayStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, GatewayError>> + Send>>;

/// A stream that has committed to one attempt.
pub struct OpenStream {
    /// The provider that serves it.
    pub provider: String,
    /// Upstream attempts made up to the commit point (the serving one is
    /// the last).
    pub attempt: u32,
    /// Its events.
    pub events: GatewayStream,
}

/// Providers by name, with their policies.
pub struct Registry {
    providers: BTreeMap<String, Arc<RegisteredProvider>>,
    default: String,
    limits: RetryLimits,
    clock: Arc<dyn Clock>,
    jitter: Arc<Jitter>,
    metrics: Arc<GatewayMetrics>,
    labels: Arc<ModelLabels>,
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
            let policy = RetryPolicy::resolve_for(name, section, &config.retry)?;
            let members = section.members();
            let mut built = Vec::with_capacity(members.len());
            for m in members {
                let provider = providers::build(name, &m.config, env)?;
                built.push((m, provider));
            }
            let Some(first) = built.first().map(|(_, p)| p.clone()) else {
                return Err(ConfigError(format!(
                    "provider `{name}`: no endpoint to call"
                )));
            };
            let balance = section.http().and_then(|h| h.balance).unwrap_or_default();
            providers.push(
                RegisteredProvider::new(name, first, policy)
                    .with_resilience(section.resilience())
                    .with_members(built, balance),
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
        let configured_models = providers
            .iter()
            .flat_map(|p| {
                let fallback_models = p
                    .resilience
                    .fallback
                    .iter()
                    .filter_map(|h| h.model().map(str::to_string));
                std::iter::once(p.provider.default_model().to_string()).chain(fallback_models)
            })
            .collect::<Vec<_>>();
        Self {
            providers: providers
                .into_iter()
                .map(|p| (p.name.clone(), Arc::new(p)))
                .collect(),
            default: default.to_string(),
            limits,
            clock: Arc::new(TokioClock),
            jitter: Arc::new(Jitter::from_entropy()),
            metrics: Arc::new(GatewayMetrics::noop()),
            labels: Arc::new(ModelLabels::new(configured_models)),
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
        self.jitter = Arc::new(Jitter::seeded(seed));
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
                members: p.members(self.clock.now()),
            })
            .collect()
    }

    /// The provider a call names (empty = the default).
    pub fn get(&self, name: &str) -> Result<&RegisteredProvider, GatewayError> {
        self.entry(name).map(AsRef::as_ref)
    }

    fn entry(&self, name: &str) -> Result<&Arc<RegisteredProvider>, GatewayError> {
        let name = if name.is_empty() { &self.default } else { name };
        self.providers
            .get(name)
            .ok_or_else(|| GatewayError::UnknownProvider(name.to_string()))
    }

    /// Whether some provider can take a call now: one without a breaker,
    /// or whose breaker admits a call (half-open counts: it takes probes).
    pub fn can_serve(&self) -> bool {
        self.providers.values().any(|p| {
            p.breaker
                .as_ref()
                .is_none_or(|b| b.state() != BreakerState::Open || b.admits_probe(self.clock.now()))
        })
    }

    /// The policy of one call on `entry`: the provider's, the request's
    /// overrides within the limits, and a single attempt when the caller
    /// retries.
    fn call_policy(&self, entry: &RegisteredProvider, options: &CallOptions) -> RetryPolicy {
        let limits = self.call_limits(options);
        let mut policy = options.overrides.apply(&entry.policy, limits);
        if let Some(t) = options.first_token_timeout {
            policy.first_token_timeout = Some(t.min(limits.per_try_timeout));
        }
        if options.client_previous_attempts > 0 && policy.single_attempt_when_client_retries {
            policy.max_attempts = 1;
        }
        policy
    }

    fn call_limits<'a>(&'a self, options: &'a CallOptions) -> &'a RetryLimits {
        options.limits.as_ref().unwrap_or(&self.limits)
    }

    /// The providers a call may use, in order: the named (or default)
    /// provider, then its fallback chain (or the request's own). A request
    /// with tools or tool results only goes to providers that support tools.
    fn chain(
        &self,
        request: &Arc<ChatRequest>,
        options: &CallOptions,
    ) -> Result<(attempts::Hop, Vec<attempts::Hop>), GatewayError> {
        let primary = self.entry(&options.provider)?;
        let limits = self.call_limits(options);
        // `"p95"`: after the provider's observed p95 time to first content
        // (at least 100 ms), once it has seen enough answers.
        let configured_hedge = |entry: &RegisteredProvider| {
            if entry.resilience.hedge_p95 {
                entry
                    .p95_first_content()
                    .map(|p| p.max(Duration::from_millis(MIN_P95_HEDGE_MS)))
            } else {
                entry.resilience.hedge_after_ms.map(Duration::from_millis)
            }
        };
        let first = attempts::Hop {
            entry: primary.clone(),
            request: request.clone(),
            policy: self.call_policy(primary, options),
            hedge_after: limits.hedge_after(options.hedge_after, configured_hedge(primary)),
            context_window: primary.resilience.context_window,
            token_estimate: token_estimate(request),
        };
        let mut hops: Vec<attempts::Hop> = Vec::new();
        let configured: Vec<(String, Option<String>, Option<u32>)> = primary
            .resilience
            .fallback
            .iter()
            .map(|h| {
                (
                    h.provider().to_string(),
                    h.model().map(str::to_string),
                    h.context_window(),
                )
            })
            .collect();
        let names = match &options.fallback {
            Some(requested) => requested.iter().map(|n| (n.clone(), None, None)).collect(),
            None => configured,
        };
        let uses_tools = !request.tools.is_empty()
            || request.messages.iter().flat_map(|m| &m.content).any(|c| {
                matches!(
                    c,
                    crate::chat::Content::ToolUse { .. } | crate::chat::Content::ToolResult { .. }
                )
            });
        for (name, model, window) in names {
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
                || hops.iter().any(|h| h.entry.name == entry.name)
                || !allowed
                || (uses_tools && !entry.provider.supports_tools())
            {
                continue;
            }
            // A hop naming its own model declares that model's window; else
            // the provider's default model's.
            let context_window = match &model {
                Some(_) => window,
                None => entry.resilience.context_window,
            };
            // A fallback asks for its own model (empty = its default): the
            // caller's model belongs to the primary. The request is copied
            // only when that changes the model.
            let model = model.unwrap_or_default();
            let hop_request = if model == request.model {
                request.clone()
            } else {
                Arc::new(ChatRequest {
                    model,
                    ..ChatRequest::clone(request)
                })
            };
            hops.push(attempts::Hop {
                entry: entry.clone(),
                request: hop_request,
                policy: self.call_policy(entry, options),
                // The caller's x-hedge-after-ms (0 = off) and the operator's
                // limits apply to every hop, as to the first.
                hedge_after: limits.hedge_after(options.hedge_after, configured_hedge(entry)),
                context_window,
                token_estimate: token_estimate(request),
            });
        }
        Ok((first, hops))
    }

    fn gate(&self, options: &CallOptions) -> AttemptGate {
        AttemptGate::new(
            self.clock.clone(),
            self.jitter.clone(),
            self.metrics.clone(),
            options.timeout,
        )
    }

    /// Gets a whole answer, retrying and falling back as configured.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<Completion, GatewayError> {
        self.complete_shared(Arc::new(request.clone()), options)
            .await
    }

    /// [`Self::complete`] of a request the caller hands over: every hop
    /// and attempt shares it instead of copying it.
    pub async fn complete_shared(
        &self,
        request: Arc<ChatRequest>,
        options: &CallOptions,
    ) -> Result<Completion, GatewayError> {
        let (first, rest) = self.chain(&request, options)?;
        let chain = CallChain::new(
            self.gate(options),
            first,
            rest,
            self.metrics.clone(),
            &self.labels,
        );
        chain.complete().await
    }

    /// Opens a stream, retrying (and falling back) on every failure before
    /// its commit point (the first content delta, or the stop of an empty
    /// answer) invisibly to the caller. After the commit point a failure
    /// ends the stream with an error, never quietly, unless the stream can
    /// be resumed with a continuation request (which is an attempt of its
    /// own, through the same gate).
    pub async fn stream(
        &self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<OpenStream, GatewayError> {
        self.stream_shared(Arc::new(request.clone()), options).await
    }

    /// [`Self::stream`] of a request the caller hands over: every hop and
    /// attempt shares it instead of copying it.
    pub async fn stream_shared(
        &self,
        request: Arc<ChatRequest>,
        options: &CallOptions,
    ) -> Result<OpenStream, GatewayError> {
        let (first, rest) = self.chain(&request, options)?;
        let chain = CallChain::new(
            self.gate(options),
            first,
            rest,
            self.metrics.clone(),
            &self.labels,
        );
        chain
            .stream(options.stream_resume, options.cannot_restart)
            .await
    }
}

/// About how many tokens `request` spends of an upstream's token limit:
/// its text at four characters a token, plus what it may generate.
fn token_estimate(request: &ChatRequest) -> u64 {
    let chars: usize = request.system.len()
        + request
            .messages
            .iter()
            .flat_map(|m| &m.content)
            .map(|c| match c {
                crate::chat::Content::Text(t) => t.len(),
                crate::chat::Content::ToolUse { input_json, .. } => input_json.len(),
                crate::chat::Content::ToolResult { content, .. } => content.len(),
            })
            .sum::<usize>();
    (chars as u64 / 4).saturating_add(u64::from(request.max_tokens.unwrap_or(0)))
}

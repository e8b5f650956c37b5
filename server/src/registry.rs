//! The provider registry: providers by name, each with its resolved retry
//! policy, and the default provider. It is the one place that calls a
//! provider, and so the one place that will retry; today it makes a single
//! attempt per call, bounded by the per-try timeout and the caller's
//! deadline, and maps the outcome to a [`GatewayError`].

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::{StreamExt, stream};
use tokio::time::Instant;

use crate::chat::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::{Config, ConfigError, EnvSource, ProviderConfig};
use crate::error::{ErrorClass, GatewayError, ProviderError};
use crate::providers::{self, EventStream, Provider};
use crate::retry::{RetryLimits, RetryPolicy};

/// A configured provider and its policy.
pub struct RegisteredProvider {
    /// The configured name.
    pub name: String,
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// Its resolved retry policy.
    pub policy: RetryPolicy,
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
}

/// Per-call context from the caller.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The provider by name; empty = the default.
    pub provider: String,
    /// When the caller stops waiting (from `grpc-timeout`).
    pub deadline: Option<Instant>,
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

/// The events of a committed stream, after the attempt that serves it
/// delivered its first content (or its stop). The first item is
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
        let mut providers = BTreeMap::new();
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
            providers.insert(
                name.clone(),
                RegisteredProvider {
                    name: name.clone(),
                    provider,
                    policy,
                },
            );
        }
        Ok(Self {
            providers,
            default: config.default_provider_name()?,
            limits: RetryLimits::resolve(config.retry.limits.as_ref())?,
        })
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
        }
    }

    /// The default provider's name.
    pub fn default_provider(&self) -> &str {
        &self.default
    }

    /// The ceilings for per-request overrides.
    pub fn limits(&self) -> &RetryLimits {
        &self.limits
    }

    /// Every provider, ordered by name.
    pub fn summaries(&self) -> Vec<ProviderSummary> {
        self.providers
            .values()
            .map(|p| ProviderSummary {
                name: p.name.clone(),
                kind: p.provider.kind(),
                default_model: p.provider.default_model().to_string(),
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

    /// Gets a whole answer.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<Completion, GatewayError> {
        let entry = self.get(&options.provider)?;
        let attempts = 1;
        let limit = attempt_limit(entry, options.deadline, 0)?;
        match tokio::time::timeout(limit.duration, entry.provider.complete(request)).await {
            Ok(Ok(response)) => Ok(Completion {
                provider: entry.name.clone(),
                attempts,
                response,
            }),
            Ok(Err(error)) => Err(upstream(entry, attempts, error, None)),
            Err(_) => Err(limit.expired(entry, attempts)),
        }
    }

    /// Opens a stream and waits for its commit point: the first content
    /// delta (or the stop of an empty answer). A failure before that point
    /// is an error of the call; after it, an error item of the stream.
    pub async fn stream(
        &self,
        request: &ChatRequest,
        options: &CallOptions,
    ) -> Result<OpenStream, GatewayError> {
        let entry = self.get(&options.provider)?;
        let attempt = 1;
        let limit = attempt_limit(entry, options.deadline, 0)?;
        let opened = tokio::time::timeout(limit.duration, async {
            let mut events = entry.provider.stream(request).await?;
            let mut head = VecDeque::new();
            loop {
                match events.next().await {
                    Some(Ok(event)) => {
                        let commit = event.is_content() || matches!(event, StreamEvent::Stop(_));
                        head.push_back(event);
                        if commit {
                            return Ok((events, head));
                        }
                    }
                    Some(Err(error)) => return Err(error),
                    None => return Err(no_stop()),
                }
            }
        })
        .await;
        let (events, mut head) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => return Err(upstream(entry, attempt, error, None)),
            Err(_) => return Err(limit.expired(entry, attempt)),
        };
        if !matches!(head.front(), Some(StreamEvent::Start { .. })) {
            head.push_front(StreamEvent::Start {
                id: String::new(),
                model: request.model_or(entry.provider.default_model()).to_string(),
            });
        }
        Ok(OpenStream {
            provider: entry.name.clone(),
            attempt,
            events: committed(entry, attempt, events, head, options.deadline),
        })
    }
}

/// How long one attempt may take, and why it would end.
struct AttemptLimit {
    duration: Duration,
    by_deadline: bool,
    per_try: Duration,
}

impl AttemptLimit {
    fn expired(&self, entry: &RegisteredProvider, attempts: u32) -> GatewayError {
        let error = ProviderError::new(
            ErrorClass::Timeout,
            format!(
                "no answer within the per-try timeout of {} ms",
                self.per_try.as_millis()
            ),
        );
        if self.by_deadline {
            GatewayError::DeadlineExceeded {
                provider: entry.name.clone(),
                attempts,
                last_error: None,
            }
        } else {
            upstream(entry, attempts, error, None)
        }
    }
}

/// The smaller of the per-try timeout and what remains of the deadline; an
/// attempt that cannot start in time is not made.
fn attempt_limit(
    entry: &RegisteredProvider,
    deadline: Option<Instant>,
    attempts_made: u32,
) -> Result<AttemptLimit, GatewayError> {
    let per_try = entry.policy.per_try_timeout;
    let Some(deadline) = deadline else {
        return Ok(AttemptLimit {
            duration: per_try,
            by_deadline: false,
            per_try,
        });
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(GatewayError::DeadlineExceeded {
            provider: entry.name.clone(),
            attempts: attempts_made,
            last_error: None,
        });
    }
    Ok(AttemptLimit {
        duration: per_try.min(remaining),
        by_deadline: remaining <= per_try,
        per_try,
    })
}

fn upstream(
    entry: &RegisteredProvider,
    attempts: u32,
    error: ProviderError,
    delivered: Option<u64>,
) -> GatewayError {
    GatewayError::Upstream {
        provider: entry.name.clone(),
        attempts,
        error,
        delivered,
    }
}

fn no_stop() -> ProviderError {
    ProviderError::new(
        ErrorClass::StreamInterrupted,
        "the upstream stream ended without a stop reason",
    )
}

struct Committed {
    events: EventStream,
    head: VecDeque<StreamEvent>,
    delivered: u64,
    done: bool,
    idle: Duration,
    deadline: Option<Instant>,
    provider: String,
    attempts: u32,
}

/// The rest of a committed stream: the buffered head, then each upstream
/// event as it arrives. Silence longer than the idle timeout, a cut, an
/// error event or an end without a stop all end it with an error that says
/// how many deltas were delivered; the caller's deadline ends it too.
fn committed(
    entry: &RegisteredProvider,
    attempts: u32,
    events: EventStream,
    head: VecDeque<StreamEvent>,
    deadline: Option<Instant>,
) -> GatewayStream {
    let state = Committed {
        events,
        head,
        delivered: 0,
        done: false,
        idle: entry.policy.stream_idle_timeout,
        deadline,
        provider: entry.name.clone(),
        attempts,
    };
    Box::pin(stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let next = match st.head.pop_front() {
            Some(event) => Ok(Some(Ok(event))),
            None => {
                let (wait, by_deadline) = match st.deadline {
                    Some(d) => {
                        let remaining = d.saturating_duration_since(Instant::now());
                        (st.idle.min(remaining), remaining <= st.idle)
                    }
                    None => (st.idle, false),
                };
                tokio::time::timeout(wait, st.events.next())
                    .await
                    .map_err(|_| by_deadline)
            }
        };
        let item = match next {
            Ok(Some(Ok(event))) => {
                if event.is_content() {
                    st.delivered += 1;
                }
                if matches!(event, StreamEvent::Stop(_)) {
                    st.done = true;
                }
                Ok(event)
            }
            Ok(Some(Err(error))) => Err(st.broken(error)),
            Ok(None) => Err(st.broken(no_stop())),
            Err(true) => {
                st.done = true;
                Err(GatewayError::DeadlineExceeded {
                    provider: st.provider.clone(),
                    attempts: st.attempts,
                    last_error: None,
                })
            }
            Err(false) => {
                let idle = st.idle.as_millis();
                Err(st.broken(ProviderError::new(
                    ErrorClass::StreamInterrupted,
                    format!("the upstream stream stalled for {idle} ms"),
                )))
            }
        };
        Some((item, st))
    }))
}

impl Committed {
    fn broken(&mut self, error: ProviderError) -> GatewayError {
        self.done = true;
        GatewayError::Upstream {
            provider: self.provider.clone(),
            attempts: self.attempts,
            error,
            delivered: Some(self.delivered),
        }
    }
}

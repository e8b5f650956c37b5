//! The gateway's errors: what failed upstream (its class and retry hints),
//! and why a call failed. Nothing here knows gRPC: the service maps a
//! [`GatewayError`] to its status.
//!
//! Every mapping below is an exhaustive `match` without `_`, so a new class or
//! variant forces a decision.

use std::fmt;
use std::time::Duration;

/// What kind of failure an upstream error is. The retry policy decides from
/// the class alone (plus an upstream `x-should-retry`), never from a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    /// 429, or a rate-limit error event.
    RateLimited,
    /// 503, 529, or an `overloaded_error` event.
    Overloaded,
    /// 500, 502, other 5xx, 409, or an `api_error` event.
    ServerError,
    /// The upstream did not answer in time (408, 504, or our per-try limit).
    Timeout,
    /// Our per-try limit ran out before the upstream sent anything at all
    /// (not even response headers): the route is silent. A kind of
    /// `timeout`: a `retry_on` naming `timeout` covers it.
    TimeoutSilent,
    /// The connection failed before a response (refused, reset, DNS, TLS).
    Connection,
    /// A stream broke: cut, error event, stall, or end without a stop reason.
    StreamInterrupted,
    /// A local resource (an embedded model's sessions) is busy.
    Busy,
    /// The upstream rejected the request (400, 422, other 4xx).
    InvalidRequest,
    /// The upstream rejected the gateway's credentials (401, 403).
    Auth,
    /// The model or endpoint does not exist (404).
    NotFound,
    /// The prompt is too long for the model (413, or a context-length code).
    ContextLength,
    /// The caller went away.
    Cancelled,
}

impl ErrorClass {
    /// Every class, in a stable order.
    pub const ALL: [ErrorClass; 13] = [
        Self::RateLimited,
        Self::Overloaded,
        Self::ServerError,
        Self::Timeout,
        Self::TimeoutSilent,
        Self::Connection,
        Self::StreamInterrupted,
        Self::Busy,
        Self::InvalidRequest,
        Self::Auth,
        Self::NotFound,
        Self::ContextLength,
        Self::Cancelled,
    ];

    /// The class's name in configuration, metadata and telemetry.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate-limited",
            Self::Overloaded => "overloaded",
            Self::ServerError => "server-error",
            Self::Timeout => "timeout",
            Self::TimeoutSilent => "timeout-silent",
            Self::Connection => "connection",
            Self::StreamInterrupted => "stream-interrupted",
            Self::Busy => "busy",
            Self::InvalidRequest => "invalid-request",
            Self::Auth => "auth",
            Self::NotFound => "not-found",
            Self::ContextLength => "context-length",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a class name as written in `retry_on` or `x-retry-on`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether a retry may ever be made for this class, whatever a policy or
    /// request says.
    pub fn is_transient(self) -> bool {
        match self {
            Self::RateLimited
            | Self::Overloaded
            | Self::ServerError
            | Self::Timeout
            | Self::TimeoutSilent
            | Self::Connection
            | Self::StreamInterrupted
            | Self::Busy => true,
            Self::InvalidRequest
            | Self::Auth
            | Self::NotFound
            | Self::ContextLength
            | Self::Cancelled => false,
        }
    }

    /// The default class of an HTTP error status.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Auth,
            404 => Self::NotFound,
            408 | 504 => Self::Timeout,
            409 | 500 | 502 => Self::ServerError,
            413 => Self::ContextLength,
            429 => Self::RateLimited,
            503 | 529 => Self::Overloaded,
            s if s >= 500 => Self::ServerError,
            _ => Self::InvalidRequest,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed upstream attempt, as a provider reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    /// What kind of failure.
    pub class: ErrorClass,
    /// The upstream HTTP status, when a response arrived.
    pub http_status: Option<u16>,
    /// The upstream's own message (never contains a credential).
    pub message: String,
    /// How long the upstream asked us to wait (`retry-after-ms`/`retry-after`).
    pub retry_after: Option<Duration>,
    /// The upstream's `x-should-retry`, which overrides the class's default.
    pub should_retry: Option<bool>,
}

impl ProviderError {
    /// An error of `class` with `message` and no HTTP details.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            http_status: None,
            message: message.into(),
            retry_after: None,
            should_retry: None,
        }
    }

    /// Sets the HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.http_status = Some(status);
        self
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.class)?;
        if let Some(status) = self.http_status {
            write!(f, " (HTTP {status})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {}

/// Why a gateway call failed: the one error type above the providers.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayError {
    /// The request (or one of its metadata overrides) is malformed.
    InvalidArgument(String),
    /// The request names a provider that is not configured.
    UnknownProvider(String),
    /// The upstream failed and the gateway gave up.
    Upstream {
        /// The provider that failed.
        provider: String,
        /// Upstream attempts made.
        attempts: u32,
        /// The last attempt's error.
        error: ProviderError,
        /// Content deltas already relayed to the caller (streams only).
        delivered: Option<u64>,
        /// The retry budget refused a retry this failure would have had.
        budget_exhausted: bool,
    },
    /// The upstream asked for a wait longer than the gateway may wait (its
    /// `max_retry_after`, or the caller's remaining deadline).
    RetryAfterTooLong {
        /// The provider.
        provider: String,
        /// Upstream attempts made.
        attempts: u32,
        /// The failure that carried the Retry-After.
        error: ProviderError,
        /// The wait the upstream asked for.
        retry_after: Duration,
    },
    /// The provider's circuit breaker is open (and no fallback served).
    BreakerOpen {
        /// The provider.
        provider: String,
        /// Upstream attempts made (before the breaker refused).
        attempts: u32,
        /// How long until the breaker lets a probe through.
        retry_after: Duration,
        /// The last upstream error of this call, if any.
        last_error: Option<ProviderError>,
    },
    /// The caller's deadline ran out.
    DeadlineExceeded {
        /// The provider that was being called.
        provider: String,
        /// Upstream attempts made.
        attempts: u32,
        /// The last upstream error, if an attempt failed before the deadline.
        last_error: Option<ProviderError>,
    },
}

impl GatewayError {
    /// Upstream attempts made before this error.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Upstream { attempts, .. }
            | Self::RetryAfterTooLong { attempts, .. }
            | Self::BreakerOpen { attempts, .. }
            | Self::DeadlineExceeded { attempts, .. } => *attempts,
            Self::InvalidArgument(_) | Self::UnknownProvider(_) => 0,
        }
    }

    /// The message the caller sees: it names the provider, the attempts
    /// and the last upstream error, and never holds a secret.
    pub fn message(&self) -> String {
        match self {
            Self::InvalidArgument(msg) => msg.clone(),
            Self::UnknownProvider(name) => format!("unknown provider `{name}`"),
            Self::DeadlineExceeded {
                provider,
                attempts,
                last_error,
            } => {
                let mut msg = format!(
                    "deadline exceeded calling provider `{provider}` after {attempts} attempt(s)"
                );
                if let Some(err) = last_error {
                    msg.push_str(&format!("; last error: {err}"));
                }
                msg
            }
            Self::BreakerOpen {
                provider,
                attempts,
                retry_after,
                last_error,
            } => {
                let mut msg = format!(
                    "provider `{provider}` is unavailable: its circuit breaker is open for {} ms more; {attempts} attempt(s) made",
                    retry_after.as_millis()
                );
                if let Some(err) = last_error {
                    msg.push_str(&format!("; last error: {err}"));
                }
                msg
            }
            Self::RetryAfterTooLong {
                provider,
                attempts,
                error,
                retry_after,
            } => format!(
                "provider `{provider}` asked to retry after {} ms, longer than the gateway \
                 may wait; {attempts} attempt(s) made; last error: {error}",
                retry_after.as_millis()
            ),
            Self::Upstream {
                provider,
                attempts,
                error,
                delivered,
                budget_exhausted,
            } => {
                let mut msg =
                    format!("provider `{provider}` failed after {attempts} attempt(s): {error}");
                if *budget_exhausted {
                    msg.push_str("; not retried: the provider's retry budget is spent");
                }
                if let Some(n) = delivered {
                    msg.push_str(&format!(
                        "; the stream broke after {n} content delta(s) were delivered"
                    ));
                }
                msg
            }
        }
    }

    /// How long the caller should wait before trying again, where a wait
    /// would help: the breaker's remaining cooldown, or the upstream's (or
    /// the gateway's own unfitting) wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BreakerOpen { retry_after, .. } | Self::RetryAfterTooLong { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::Upstream { error, .. } => error.retry_after,
            Self::InvalidArgument(_) | Self::UnknownProvider(_) | Self::DeadlineExceeded { .. } => {
                None
            }
        }
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_round_trip() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.as_str()), Some(class));
        }
        assert_eq!(ErrorClass::parse("bogus"), None);
    }

    #[test]
    fn http_statuses_classify_as_documented() {
        let cases = [
            (400, ErrorClass::InvalidRequest),
            (401, ErrorClass::Auth),
            (403, ErrorClass::Auth),
            (404, ErrorClass::NotFound),
            (408, ErrorClass::Timeout),
            (413, ErrorClass::ContextLength),
            (422, ErrorClass::InvalidRequest),
            (429, ErrorClass::RateLimited),
            (500, ErrorClass::ServerError),
            (502, ErrorClass::ServerError),
            (503, ErrorClass::Overloaded),
            (504, ErrorClass::Timeout),
            (529, ErrorClass::Overloaded),
            (599, ErrorClass::ServerError),
        ];
        for (status, class) in cases {
            assert_eq!(ErrorClass::from_http_status(status), class, "HTTP {status}");
        }
    }
}

//! Errors of the HTTP ingress, decided once where the failure is known and
//! rendered in each API's own JSON shape: `{"error":{"message","type",
//! "param","code"}}` for OpenAI, `{"type":"error","error":{"type",
//! "message"}}` for Anthropic, with the status each API uses.
//!
//! Every error answer also carries the retry coordination official SDKs
//! honour: `x-should-retry` (true only when the gateway left a retry to the
//! caller and there is time for it) and `retry-after` / `retry-after-ms`
//! where a wait would help.

use std::time::Duration;

use http::StatusCode;

use crate::error::{ErrorClass, GatewayError};

/// Which API's error shape and statuses an answer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    Anthropic,
}

/// What went wrong, independent of the dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    InvalidRequest,
    TooLarge,
    Authentication,
    Permission,
    NotFound,
    MethodNotAllowed,
    RateLimited,
    Api,
    Overloaded,
    Unavailable,
    Timeout,
}

/// An error answer, before it is rendered in a dialect.
#[derive(Debug, Clone)]
pub(crate) struct HttpError {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
    /// The request field or header at fault (OpenAI's `param`).
    pub(crate) param: Option<String>,
    /// A machine-readable code (OpenAI's `code`).
    pub(crate) code: Option<&'static str>,
    pub(crate) should_retry: bool,
    pub(crate) retry_after: Option<Duration>,
    /// Upstream attempts made (`x-gateway-attempts`).
    pub(crate) attempts: u32,
    /// The provider that failed, when one was called.
    pub(crate) provider: Option<String>,
}

impl HttpError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
            should_retry: false,
            retry_after: None,
            attempts: 0,
            provider: None,
        }
    }

    /// A 400 whose message starts with the field at fault (`field: why`),
    /// which also becomes OpenAI's `param`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        let message = message.into();
        let param = message
            .split_once(": ")
            .map(|(field, _)| field.to_string())
            .filter(|f| !f.contains(' '));
        Self {
            param,
            ..Self::new(ErrorKind::InvalidRequest, message)
        }
    }

    /// The answer to a failed gateway call. `deferred`: the gateway made a
    /// single attempt because the caller retries itself; `time_left`: the
    /// caller's deadline still leaves room for another try.
    pub(crate) fn from_gateway(error: &GatewayError, deferred: bool, time_left: bool) -> Self {
        let retry_after = error
            .retry_after()
            .map(|d| d.min(Duration::from_secs(24 * 3600)));
        let (kind, code) = match error {
            GatewayError::InvalidArgument(_) => (ErrorKind::InvalidRequest, None),
            GatewayError::UnknownProvider(_) => (ErrorKind::NotFound, Some("model_not_found")),
            GatewayError::DeadlineExceeded { .. } => {
                (ErrorKind::Timeout, Some("deadline_exceeded"))
            }
            GatewayError::BreakerOpen { .. } => (ErrorKind::Overloaded, Some("circuit_open")),
            GatewayError::RetryAfterTooLong { error, .. } => match error.class {
                ErrorClass::RateLimited => (ErrorKind::RateLimited, Some("rate_limit_exceeded")),
                _ => (ErrorKind::Overloaded, None),
            },
            GatewayError::Upstream {
                delivered: Some(_), ..
            } => (ErrorKind::Api, Some("stream_interrupted")),
            GatewayError::Upstream { error, .. } => kind_of(error.class),
        };
        // The SDK may retry only what the gateway would itself have retried
        // had the caller not been retrying: a transient upstream failure
        // (or an open breaker) on a single deferred attempt, with time left.
        let transient = match error {
            GatewayError::Upstream {
                error,
                delivered: None,
                budget_exhausted: false,
                ..
            } => error.class.is_transient() && error.should_retry != Some(false),
            GatewayError::BreakerOpen { .. } => true,
            GatewayError::Upstream { .. }
            | GatewayError::InvalidArgument(_)
            | GatewayError::UnknownProvider(_)
            | GatewayError::RetryAfterTooLong { .. }
            | GatewayError::DeadlineExceeded { .. } => false,
        };
        let provider = match error {
            GatewayError::Upstream { provider, .. }
            | GatewayError::RetryAfterTooLong { provider, .. }
            | GatewayError::BreakerOpen { provider, .. }
            | GatewayError::DeadlineExceeded { provider, .. } => Some(provider.clone()),
            GatewayError::InvalidArgument(_) | GatewayError::UnknownProvider(_) => None,
        };
        let mut out = match error {
            GatewayError::InvalidArgument(m) => Self::invalid(m.clone()),
            _ => Self::new(kind, error.message()),
        };
        out.code = code.or(out.code);
        out.should_retry = transient && deferred && time_left;
        out.retry_after = retry_after;
        out.attempts = error.attempts();
        out.provider = provider;
        if let GatewayError::UnknownProvider(_) = error {
            out.param = Some("model".into());
        }
        out
    }

    /// Names `provider` (when not empty) as the one the call was for, unless
    /// the error already names the provider that failed.
    pub(crate) fn for_provider(mut self, provider: &str) -> Self {
        if self.provider.is_none() && !provider.is_empty() {
            self.provider = Some(provider.to_string());
        }
        self
    }

    /// The HTTP status in `dialect`.
    pub(crate) fn status(&self, dialect: Dialect) -> StatusCode {
        let code = match (self.kind, dialect) {
            (ErrorKind::InvalidRequest, _) => 400,
            (ErrorKind::Authentication, _) => 401,
            (ErrorKind::Permission, _) => 403,
            (ErrorKind::NotFound, _) => 404,
            (ErrorKind::MethodNotAllowed, _) => 405,
            (ErrorKind::TooLarge, _) => 413,
            (ErrorKind::RateLimited, _) => 429,
            (ErrorKind::Api, _) => 500,
            (ErrorKind::Overloaded, Dialect::Anthropic) => 529,
            (ErrorKind::Overloaded | ErrorKind::Unavailable, _) => 503,
            (ErrorKind::Timeout, _) => 504,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The error's `type` in `dialect`.
    fn type_name(&self, dialect: Dialect) -> &'static str {
        match (self.kind, dialect) {
            (ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed, _) => "invalid_request_error",
            (ErrorKind::TooLarge, Dialect::Anthropic) => "request_too_large",
            (ErrorKind::TooLarge, Dialect::OpenAi) => "invalid_request_error",
            (ErrorKind::Authentication, _) => "authentication_error",
            (ErrorKind::Permission, _) => "permission_error",
            (ErrorKind::NotFound, _) => "not_found_error",
            (ErrorKind::RateLimited, _) => "rate_limit_error",
            (ErrorKind::Api | ErrorKind::Unavailable, _) => "api_error",
            (ErrorKind::Overloaded, _) => "overloaded_error",
            (ErrorKind::Timeout, _) => "timeout_error",
        }
    }

    /// The JSON body in `dialect`.
    pub(crate) fn body(&self, dialect: Dialect) -> serde_json::Value {
        match dialect {
            Dialect::OpenAi => serde_json::json!({
                "error": {
                    "message": self.message,
                    "type": self.type_name(dialect),
                    "param": self.param,
                    "code": self.code,
                }
            }),
            Dialect::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": self.type_name(dialect), "message": self.message },
            }),
        }
    }
}

/// The answer kind of an upstream failure's class. Exhaustive, so a new
/// class forces a decision.
fn kind_of(class: ErrorClass) -> (ErrorKind, Option<&'static str>) {
    match class {
        ErrorClass::RateLimited => (ErrorKind::RateLimited, Some("rate_limit_exceeded")),
        ErrorClass::Overloaded | ErrorClass::Busy => (ErrorKind::Overloaded, None),
        ErrorClass::ServerError | ErrorClass::StreamInterrupted => (ErrorKind::Api, None),
        ErrorClass::Connection => (ErrorKind::Unavailable, Some("upstream_unreachable")),
        ErrorClass::Timeout | ErrorClass::TimeoutSilent => {
            (ErrorKind::Timeout, Some("upstream_timeout"))
        }
        ErrorClass::InvalidRequest => (ErrorKind::InvalidRequest, None),
        ErrorClass::ContextLength => (ErrorKind::InvalidRequest, Some("context_length_exceeded")),
        ErrorClass::NotFound => (ErrorKind::NotFound, Some("model_not_found")),
        // The upstream refused the operator's credentials: not the caller's
        // key, so never a 401 the SDK would blame on its own key.
        ErrorClass::Auth => (ErrorKind::Api, Some("upstream_auth")),
        ErrorClass::Cancelled => (ErrorKind::Api, Some("cancelled")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProviderError;

    fn upstream(class: ErrorClass) -> GatewayError {
        GatewayError::Upstream {
            provider: "p".into(),
            attempts: 1,
            error: ProviderError::new(class, "x"),
            delivered: None,
            budget_exhausted: false,
        }
    }

    #[test]
    fn statuses_follow_each_dialect() {
        let e = HttpError::from_gateway(&upstream(ErrorClass::Overloaded), false, true);
        assert_eq!(e.status(Dialect::OpenAi), 503);
        assert_eq!(e.status(Dialect::Anthropic), 529);
        assert_eq!(
            e.body(Dialect::Anthropic)["error"]["type"],
            "overloaded_error"
        );
        let e = HttpError::from_gateway(&upstream(ErrorClass::RateLimited), false, true);
        assert_eq!(e.status(Dialect::OpenAi), 429);
        let e = HttpError::from_gateway(&upstream(ErrorClass::Auth), false, true);
        assert_eq!(e.status(Dialect::OpenAi), 500);
    }

    #[test]
    fn should_retry_only_for_a_deferred_transient_failure_with_time_left() {
        let e = upstream(ErrorClass::Overloaded);
        assert!(HttpError::from_gateway(&e, true, true).should_retry);
        assert!(!HttpError::from_gateway(&e, false, true).should_retry);
        assert!(!HttpError::from_gateway(&e, true, false).should_retry);
        let e = upstream(ErrorClass::InvalidRequest);
        assert!(!HttpError::from_gateway(&e, true, true).should_retry);
    }

    #[test]
    fn invalid_names_the_field_as_param() {
        let e = HttpError::invalid("messages[0].role: bad");
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert_eq!(
            e.body(Dialect::OpenAi)["error"]["param"],
            "messages[0].role"
        );
    }
}

//! What every HTTP provider shares: the pooled client (with reqwest's own
//! retries off), sending a request, and turning an error response or a
//! transport failure into a typed [`ProviderError`] with its retry hints.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use super::ApiKey;
use crate::error::{ErrorClass, ProviderError};

/// The longest error body read from an upstream.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Builds the one HTTP client a provider keeps: pooled keep-alive
/// connections, `TCP_NODELAY`, and no retries of reqwest's own (the registry
/// is the only place that retries).
pub fn client(
    connect_timeout: Option<u64>,
    pool_idle_timeout: Option<u64>,
) -> Result<reqwest::Client, crate::config::ConfigError> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .retry(reqwest::retry::never())
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(connect_timeout.unwrap_or(10_000)))
        .pool_idle_timeout(Duration::from_millis(pool_idle_timeout.unwrap_or(90_000)))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
        .map_err(|e| crate::config::ConfigError(format!("cannot build the HTTP client: {e}")))
}

/// Sends `request`; a transport failure becomes a `connection` or `timeout`
/// error, an error status becomes the class `classify` picks from the body.
/// An upstream that echoes the key in its error text gets it redacted.
pub async fn send(
    request: reqwest::RequestBuilder,
    classify: fn(u16, &[u8]) -> Classified,
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    // The attempt span is current: its trace context goes upstream.
    let request = request.headers(crate::telemetry::trace_headers());
    let span = tracing::Span::current();
    let response = request.send().await.map_err(|e| transport_error(&e))?;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if let Some(host) = response.url().host_str() {
        span.record("server.address", host);
    }
    if status.is_success() {
        return Ok(response);
    }
    let mut error = error_response(response, classify).await;
    if let Some(key) = key {
        error.message = key.redact(&error.message);
    }
    Err(error)
}

/// What a provider reads from an error body.
#[derive(Debug, Clone, Default)]
pub struct Classified {
    /// The class, when the body says more than the status.
    pub class: Option<ErrorClass>,
    /// The upstream's message.
    pub message: String,
    /// Set when the body says the failure is final (for example a spent
    /// quota behind a 429).
    pub should_retry: Option<bool>,
}

async fn error_response(
    mut response: reqwest::Response,
    classify: fn(u16, &[u8]) -> Classified,
) -> ProviderError {
    let status = response.status().as_u16();
    let (retry_after, should_retry) = retry_hints(response.headers(), SystemTime::now());
    let mut body = Vec::new();
    // A body cut short still classifies by status.
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    let classified = classify(status, &body);
    let message = if classified.message.is_empty() {
        response
            .status()
            .canonical_reason()
            .unwrap_or("error")
            .to_string()
    } else {
        classified.message
    };
    ProviderError {
        class: classified
            .class
            .unwrap_or_else(|| ErrorClass::from_http_status(status)),
        http_status: Some(status),
        message,
        retry_after,
        should_retry: should_retry.or(classified.should_retry),
    }
}

/// Reads `retry-after-ms`, then `retry-after` (seconds, possibly fractional,
/// or an HTTP date), and `x-should-retry`.
pub fn retry_hints(headers: &HeaderMap, now: SystemTime) -> (Option<Duration>, Option<bool>) {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after = text("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| {
            let v = text("retry-after")?;
            if let Ok(secs) = v.parse::<f64>() {
                return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
            }
            let at = httpdate::parse_http_date(v).ok()?;
            Some(at.duration_since(now).unwrap_or(Duration::ZERO))
        });
    let should_retry = match text("x-should-retry") {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    (retry_after, should_retry)
}

/// The class of a failure to get a response at all.
pub fn transport_error(e: &reqwest::Error) -> ProviderError {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Connection
    };
    ProviderError::new(class, describe(e))
}

/// The class of a failure while reading a response body (a cut stream).
pub fn body_error(e: &reqwest::Error) -> ProviderError {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::StreamInterrupted
    };
    ProviderError::new(class, format!("the upstream stream broke: {}", describe(e)))
}

/// An error's text with its causes, without the URL.
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" for url ({url})"), "");
    }
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A JSON body that could not be understood.
pub fn bad_json(what: &str, e: &serde_json::Error) -> ProviderError {
    ProviderError::new(
        ErrorClass::ServerError,
        format!("the upstream sent {what} that is not the expected JSON: {e}"),
    )
}

/// Reads a successful response's JSON body.
pub async fn json_body(response: reqwest::Response) -> Result<serde_json::Value, ProviderError> {
    let bytes = response.bytes().await.map_err(|e| body_error(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad_json("a response", &e))
}

/// Joins a base URL and a path with exactly one `/` between them.
pub fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]);
        assert_eq!(retry_hints(&h, now).0, Some(Duration::from_millis(1500)));
        let h = headers(&[("retry-after", "2.5")]);
        assert_eq!(retry_hints(&h, now).0, Some(Duration::from_millis(2500)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &date)]);
        assert_eq!(retry_hints(&h, now).0, Some(Duration::from_secs(30)));
        let h = headers(&[("retry-after", "soon")]);
        assert_eq!(retry_hints(&h, now).0, None);
        let h = headers(&[("x-should-retry", "false")]);
        assert_eq!(retry_hints(&h, now).1, Some(false));
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join_url("http://h/v1/", "/chat"), "http://h/v1/chat");
        assert_eq!(join_url("http://h", "v1/messages"), "http://h/v1/messages");
    }
}

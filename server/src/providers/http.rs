//! What every HTTP provider shares: the pooled client (with reqwest's own
//! retries and redirects off, certificates always verified), sending a
//! request, bounded reads of the answer, and turning an error response or a
//! transport failure into a typed [`ProviderError`] with its retry hints.

use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName};

use super::{ApiKey, RateLimits};
use crate::chat::ChatResponse;
use crate::config::{ConfigError, HttpProviderConfig};
use crate::error::{ErrorClass, ProviderError};

/// The longest error body read from an upstream.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The longest Retry-After the gateway represents: anything longer (up to
/// infinity) is read as this, which every `max_retry_after_ms` treats as too
/// long to wait for.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The default of `max_event_bytes`: the longest SSE line or event.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
/// The default of `max_body_bytes`: the largest successful response body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// How much of an upstream answer is read before the attempt fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadLimits {
    /// The longest SSE line, and the most `data` one SSE event may carry.
    pub max_event_bytes: usize,
    /// The largest successful (non-streamed) response body.
    pub max_body_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl ReadLimits {
    /// The limits of one `[providers.X]` section.
    pub(crate) fn of(config: &HttpProviderConfig) -> Self {
        Self {
            max_event_bytes: config.max_event_bytes.unwrap_or(DEFAULT_MAX_EVENT_BYTES),
            max_body_bytes: config.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        }
    }
}

/// Idle keep-alive connections a provider's client keeps per upstream host
/// when the configuration does not say. Past a few thousand idle
/// connections (left by a burst of streams) every other call of the
/// gateway costs measurably more CPU (`benches/overhead.rs`: 1.2x the
/// floor's with 256 kept, 1.5x with 2,000, 1.7-2.0x with 10,000), and a
/// burst that large is better served by new connections than by keeping
/// them all for `pool_idle_timeout_ms`.
pub(crate) const DEFAULT_POOL_MAX_IDLE: usize = 256;

/// Builds the one HTTP client a provider keeps: pooled keep-alive
/// connections (at most `pool_max_idle` idle per host), `TCP_NODELAY`, no
/// retries of reqwest's own (the registry is the only place that retries),
/// no redirects (a redirect would carry the key to another host and be a
/// second request inside one attempt), and
/// certificates verified against the platform's roots plus the section's
/// `ca_file`.
pub(crate) fn client(
    name: &str,
    config: &HttpProviderConfig,
) -> Result<reqwest::Client, ConfigError> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .retry(reqwest::retry::never())
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(
            config.connect_timeout_ms.unwrap_or(10_000),
        ))
        .pool_idle_timeout(Duration::from_millis(
            config.pool_idle_timeout_ms.unwrap_or(90_000),
        ))
        .pool_max_idle_per_host(config.pool_max_idle.unwrap_or(DEFAULT_POOL_MAX_IDLE))
        .tcp_keepalive(Duration::from_secs(30));
    if let Some(path) = &config.ca_file {
        builder = builder.tls_certs_merge(ca_bundle(name, path)?);
    }
    builder.build().map_err(|e| {
        ConfigError(format!(
            "provider `{name}`: cannot build the HTTP client: {e}"
        ))
    })
}

/// Reads a PEM bundle of extra trusted roots; errors name the key and path.
fn ca_bundle(name: &str, path: &str) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let key = format!("config key `providers.{name}.ca_file`");
    let pem =
        std::fs::read(path).map_err(|e| ConfigError(format!("{key}: cannot read {path}: {e}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        ConfigError(format!(
            "{key}: {path} is not a PEM certificate bundle: {e}"
        ))
    })?;
    if certs.is_empty() {
        return Err(ConfigError(format!(
            "{key}: {path} holds no PEM certificate"
        )));
    }
    Ok(certs)
}

/// Parses a section's `base_url` (or the kind's public endpoint) once, at
/// start-up.
pub(crate) fn base_url(name: &str, url: &str) -> Result<Url, ConfigError> {
    let parsed = Url::parse(url).map_err(|e| {
        ConfigError(format!(
            "config key `providers.{name}.base_url`: `{url}` is not a URL: {e}"
        ))
    })?;
    if parsed.cannot_be_a_base() {
        return Err(ConfigError(format!(
            "config key `providers.{name}.base_url`: `{url}` cannot carry a path"
        )));
    }
    Ok(parsed)
}

/// `base` with `segments` appended, each percent-encoded as one path segment
/// (a `/`, `?`, `#` or `%` inside a segment is escaped, `.` and `..` are
/// dropped), never by string formatting.
pub(crate) fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Sends `request`; a transport failure becomes a `connection` or `timeout`
/// error, a redirect a final `not-found` error naming the target host, an
/// error status the class `classify` picks from the body. An upstream that
/// echoes the key in its error text gets it redacted.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    classify: fn(u16, &[u8]) -> Classified,
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    send_with(request, &|status, _, body| classify(status, body), key).await
}

/// [`send`] for an upstream whose error class is (also) in a header, as
/// AWS's `x-amzn-errortype`: `classify` sees the error's headers too.
pub(crate) async fn send_with(
    request: reqwest::RequestBuilder,
    classify: &(dyn Fn(u16, &HeaderMap, &[u8]) -> Classified + Sync),
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    // The attempt span is current: its trace context goes upstream.
    let request = if crate::telemetry::spans_exported() {
        request.headers(crate::telemetry::trace_headers())
    } else {
        request
    };
    let response = request
        .send()
        .await
        .map_err(|e| redact(key, transport_error(&e)))?;
    super::mark_responded();
    if let Some(limits) = rate_limits(response.headers(), SystemTime::now()) {
        super::report_rate_limits(limits);
    }
    // The attempt span (trace level) is current: exported, or shown by
    // `trace` logs.
    if crate::telemetry::spans_exported() || tracing::enabled!(tracing::Level::TRACE) {
        let span = tracing::Span::current();
        span.record(
            "http.response.status_code",
            i64::from(response.status().as_u16()),
        );
        if let Some(host) = response.url().host_str() {
            span.record("server.address", host);
        }
    }
    answer(response, classify, key).await
}

/// [`send`] for a credential endpoint an attempt calls before the model
/// (an OAuth token, STS, a container's credentials): its answer tells the
/// attempt nothing. It does not mark the attempt as answered, does not pace
/// its member with the endpoint's rate-limit headers, writes nothing on its
/// span and sends it no trace context.
pub(crate) async fn send_credential_request(
    request: reqwest::RequestBuilder,
    classify: fn(u16, &[u8]) -> Classified,
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    let response = request
        .send()
        .await
        .map_err(|e| redact(key, transport_error(&e)))?;
    answer(response, &|status, _, body| classify(status, body), key).await
}

/// A success as it is, a redirect or an error answer as its error.
async fn answer(
    response: reqwest::Response,
    classify: &(dyn Fn(u16, &HeaderMap, &[u8]) -> Classified + Sync),
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status.is_redirection() {
        return Err(redact(key, redirect_error(&response)));
    }
    Err(redact(key, error_response(response, classify).await))
}

/// `error` with every occurrence of `key` in its message redacted.
pub(crate) fn redact(key: Option<&ApiKey>, mut error: ProviderError) -> ProviderError {
    if let Some(key) = key {
        error.message = key.redact(&error.message);
    }
    error
}

/// A 3xx answer. Redirects are never followed, so this is final (an
/// operator's `base_url` that points at the wrong place, reported like a
/// missing endpoint: FAILED_PRECONDITION). The message names the status and
/// the target's host only: a path or query could carry anything.
fn redirect_error(response: &reqwest::Response) -> ProviderError {
    let status = response.status();
    let host = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|location| response.url().join(location).ok())
        .and_then(|target| target.host_str().map(str::to_string));
    let to = match host {
        Some(host) => format!("to host `{host}`"),
        None => "without a usable location".to_string(),
    };
    ProviderError {
        class: ErrorClass::NotFound,
        http_status: Some(status.as_u16()),
        message: format!(
            "the upstream answered HTTP {} (a redirect {to}); redirects are not followed: \
             point the provider's base_url at the final address",
            status.as_u16()
        ),
        retry_after: None,
        should_retry: Some(false),
    }
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
    /// A wait the body asks for (a `google.rpc.RetryInfo`), used when no
    /// header gives one.
    pub retry_after: Option<Duration>,
}

async fn error_response(
    mut response: reqwest::Response,
    classify: &(dyn Fn(u16, &HeaderMap, &[u8]) -> Classified + Sync),
) -> ProviderError {
    let status = response.status().as_u16();
    let (retry_after, should_retry) = retry_hints(response.headers(), status, SystemTime::now());
    let headers = response.headers().clone();
    let mut body = Vec::new();
    // A body cut short still classifies by status.
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    classified_error(
        status,
        classify(status, &headers, &body),
        retry_after,
        should_retry,
    )
}

/// The error an error status and its (bounded) body make.
pub(crate) fn error_from_body(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
    classify: fn(u16, &[u8]) -> Classified,
) -> ProviderError {
    classified_error(status, classify(status, body), retry_after, should_retry)
}

fn classified_error(
    status: u16,
    classified: Classified,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
) -> ProviderError {
    let message = if classified.message.is_empty() {
        reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
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
        retry_after: retry_after.or(classified.retry_after),
        // A body that says the failure is final wins over a header that
        // says retry (a spent quota behind a 429).
        should_retry: match (classified.should_retry, should_retry) {
            (Some(false), _) => Some(false),
            (body, header) => header.or(body),
        },
    }
}

/// Reads `retry-after-ms`, then `retry-after` (seconds, possibly fractional,
/// or an HTTP date), and `x-should-retry`. On a 429 without either, OpenAI's
/// `x-ratelimit-reset-requests|tokens` (Go durations such as `6m0s`) is the
/// hint: the reset of a limit whose `x-ratelimit-remaining-*` is `0` (the
/// later one when both are), else the sooner reset.
///
/// Every value saturates: a wait beyond [`MAX_RETRY_AFTER`] (even `1e300`
/// or `inf`) is read as that, a negative or `NaN` one as no hint.
pub(crate) fn retry_hints(
    headers: &HeaderMap,
    status: u16,
    now: SystemTime,
) -> (Option<Duration>, Option<bool>) {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after = text("retry-after-ms")
        .and_then(|v| seconds(v, 1000.0))
        .or_else(|| {
            let v = text("retry-after")?;
            seconds(v, 1.0).or_else(|| {
                let at = httpdate::parse_http_date(v).ok()?;
                Some(
                    at.duration_since(now)
                        .unwrap_or(Duration::ZERO)
                        .min(MAX_RETRY_AFTER),
                )
            })
        })
        .or_else(|| {
            if status != 429 {
                return None;
            }
            let resets: Vec<(Duration, bool)> = ["requests", "tokens"]
                .into_iter()
                .filter_map(|limit| {
                    let reset = go_duration(text(&format!("x-ratelimit-reset-{limit}"))?)?;
                    let spent = text(&format!("x-ratelimit-remaining-{limit}")) == Some("0");
                    Some((reset, spent))
                })
                .collect();
            let spent = resets
                .iter()
                .filter(|(_, spent)| *spent)
                .map(|(d, _)| *d)
                .max();
            spent.or_else(|| resets.iter().map(|(d, _)| *d).min())
        });
    let should_retry = match text("x-should-retry") {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    (retry_after, should_retry)
}

/// The rate-limit headers [`rate_limits`] reads, parsed once.
static X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
static X_RATELIMIT_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-requests");
static ANTHROPIC_RATELIMIT_REQUESTS_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-remaining");
static ANTHROPIC_RATELIMIT_REQUESTS_RESET: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-reset");
static X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
static X_RATELIMIT_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
static ANTHROPIC_RATELIMIT_TOKENS_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
static ANTHROPIC_RATELIMIT_TOKENS_RESET: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-reset");
static ANTHROPIC_RATELIMIT_INPUT_TOKENS_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining");
static ANTHROPIC_RATELIMIT_INPUT_TOKENS_RESET: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-input-tokens-reset");
static ANTHROPIC_RATELIMIT_OUTPUT_TOKENS_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining");
static ANTHROPIC_RATELIMIT_OUTPUT_TOKENS_RESET: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-output-tokens-reset");

/// The rate limits an answer reports: OpenAI's
/// `x-ratelimit-remaining-requests|tokens` with their Go-duration resets,
/// or Anthropic's `anthropic-ratelimit-requests-*` and the tightest of its
/// `…-tokens-*`, `…-input-tokens-*`, `…-output-tokens-*` with RFC 3339
/// resets. `None` when the answer says nothing of them.
pub(crate) fn rate_limits(headers: &HeaderMap, now: SystemTime) -> Option<RateLimits> {
    // One pass over the names before any lookup: most answers of most
    // upstreams carry none of these, and each lookup hashes its name.
    if !headers.keys().any(|name| {
        let name = name.as_str();
        name.starts_with("x-ratelimit-") || name.starts_with("anthropic-ratelimit-")
    }) {
        return None;
    }
    let text = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let count = |name: &HeaderName| text(name).and_then(|v| v.parse::<u64>().ok());
    // (remaining, reset) header names, spelled out: no name is formatted
    // per answer.
    let openai = |(remaining, reset): (&HeaderName, &HeaderName)| {
        let left = count(remaining)?;
        let reset = go_duration(text(reset)?)?;
        Some((left, reset))
    };
    let anthropic = |(remaining, reset): (&HeaderName, &HeaderName)| {
        let left = count(remaining)?;
        let reset = rfc3339(text(reset)?)?;
        let wait = reset.duration_since(now).unwrap_or(Duration::ZERO);
        Some((left, wait.min(MAX_RETRY_AFTER)))
    };
    let requests =
        openai((&X_RATELIMIT_REMAINING_REQUESTS, &X_RATELIMIT_RESET_REQUESTS)).or_else(|| {
            anthropic((
                &ANTHROPIC_RATELIMIT_REQUESTS_REMAINING,
                &ANTHROPIC_RATELIMIT_REQUESTS_RESET,
            ))
        });
    let tokens = openai((&X_RATELIMIT_REMAINING_TOKENS, &X_RATELIMIT_RESET_TOKENS)).or_else(|| {
        [
            (
                &ANTHROPIC_RATELIMIT_TOKENS_REMAINING,
                &ANTHROPIC_RATELIMIT_TOKENS_RESET,
            ),
            (
                &ANTHROPIC_RATELIMIT_INPUT_TOKENS_REMAINING,
                &ANTHROPIC_RATELIMIT_INPUT_TOKENS_RESET,
            ),
            (
                &ANTHROPIC_RATELIMIT_OUTPUT_TOKENS_REMAINING,
                &ANTHROPIC_RATELIMIT_OUTPUT_TOKENS_RESET,
            ),
        ]
        .into_iter()
        .filter_map(anthropic)
        .min_by_key(|(left, _)| *left)
    });
    (requests.is_some() || tokens.is_some()).then_some(RateLimits { requests, tokens })
}

/// An RFC 3339 time (`2026-12-01T10:00:30Z`, fractions and offsets
/// allowed), as a `SystemTime`; `None` when malformed or before 1970.
pub(crate) fn rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = text.get(19..)?;
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &frac[..digits.min(9)];
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - kept.len() as u32);
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// A decimal count of seconds (`2`, `1.5`, `0.250`), saturated at
/// [`MAX_RETRY_AFTER`]; `None` when negative, `NaN` or not a number.
pub(crate) fn decimal_seconds(text: &str) -> Option<Duration> {
    seconds(text, 1.0)
}

/// A decimal count of `1/per_second` seconds, saturated at
/// [`MAX_RETRY_AFTER`]; `None` when negative, `NaN` or not a number.
fn seconds(text: &str, per_second: f64) -> Option<Duration> {
    let n: f64 = text.parse().ok()?;
    if n.is_nan() || n < 0.0 {
        return None;
    }
    Some(saturating_secs(n / per_second))
}

fn saturating_secs(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER))
}

/// A Go `time.Duration` string (`6m0s`, `1.5s`, `20ms`, `1h2m3.5s`, `0`),
/// saturated at [`MAX_RETRY_AFTER`]; `None` when malformed or negative.
pub(crate) fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    Some(saturating_secs(total))
}

/// The class of a failure to get a response at all.
pub(crate) fn transport_error(e: &reqwest::Error) -> ProviderError {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Connection
    };
    ProviderError::new(class, describe(e))
}

/// A streamed answer's body without its head. The head's header values
/// share the HTTP/1.1 connection's first read buffer: held, they keep that
/// buffer alive for the whole stream, and every later read takes a buffer
/// of its own (8 KiB or more per open stream).
pub(crate) struct BodyStream(reqwest::Body);

impl BodyStream {
    /// The body of `response`, its head dropped.
    pub(crate) fn new(response: reqwest::Response) -> Self {
        Self(reqwest::Body::from(response))
    }

    /// The next chunk of the body, `None` at its end (trailers skipped).
    pub(crate) async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, reqwest::Error> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// [`Self::chunk`] for a hand-written stream.
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<bytes::Bytes>, reqwest::Error>> {
        use http_body_util::BodyExt;
        use std::future::Future;
        loop {
            let frame = std::task::ready!(std::pin::Pin::new(&mut self.0.frame()).poll(cx));
            match frame {
                None => return std::task::Poll::Ready(Ok(None)),
                Some(Err(e)) => return std::task::Poll::Ready(Err(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return std::task::Poll::Ready(Ok(Some(data)));
                    }
                }
            }
        }
    }
}

/// The class of a failure while reading a response body (a cut stream).
pub(crate) fn body_error(e: &reqwest::Error) -> ProviderError {
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

/// An event in the middle of a stream that does not decode: the stream is
/// broken (`stream-interrupted`), never skipped silently.
pub(crate) fn bad_event(what: &str, e: &serde_json::Error) -> ProviderError {
    ProviderError::new(
        ErrorClass::StreamInterrupted,
        format!("the upstream sent {what} that is not the expected JSON: {e}"),
    )
}

/// A whole response body: its common shape read by `typed` (without a
/// `Value`), anything else through a `Value` by `general`. Both read the
/// same answer from the same body.
pub(crate) fn read_answer(
    body: &[u8],
    typed: fn(&[u8]) -> Option<ChatResponse>,
    general: fn(&serde_json::Value) -> Result<ChatResponse, ProviderError>,
) -> Result<ChatResponse, ProviderError> {
    if let Some(response) = typed(body) {
        return Ok(response);
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad_json("a response", &e))?;
    general(&v)
}

/// An upstream token count, saturated into a `u32` (missing: 0).
pub(crate) fn saturate_count(n: Option<u64>) -> u32 {
    n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// A body that does not decode.
pub(crate) fn bad_json(what: &str, e: &serde_json::Error) -> ProviderError {
    ProviderError::new(
        ErrorClass::ServerError,
        format!("the upstream sent {what} that is not the expected JSON: {e}"),
    )
}

/// Reads a successful response's JSON body, at most `max_bytes` of it: a
/// larger body fails the attempt as a `server-error` (an upstream protocol
/// error) without being buffered.
pub(crate) async fn json_body(
    response: reqwest::Response,
    max_bytes: usize,
) -> Result<serde_json::Value, ProviderError> {
    let body = body_bytes(response, max_bytes).await?;
    serde_json::from_slice(&body).map_err(|e| bad_json("a response", &e))
}

/// Reads a successful response's body, at most `max_bytes` of it, as
/// [`json_body`] does, without decoding it. A body that arrives in one
/// chunk (the common case) is not copied.
pub(crate) async fn body_bytes(
    mut response: reqwest::Response,
    max_bytes: usize,
) -> Result<bytes::Bytes, ProviderError> {
    let too_big = || {
        ProviderError::new(
            ErrorClass::ServerError,
            format!(
                "the upstream's response body is larger than {max_bytes} bytes (the provider's max_body_bytes)"
            ),
        )
    };
    if response
        .content_length()
        .is_some_and(|n| n > max_bytes as u64)
    {
        return Err(too_big());
    }
    let Some(first) = response.chunk().await.map_err(|e| body_error(&e))? else {
        return Ok(bytes::Bytes::new());
    };
    if first.len() > max_bytes {
        return Err(too_big());
    }
    let Some(second) = response.chunk().await.map_err(|e| body_error(&e))? else {
        return Ok(first);
    };
    let mut body = Vec::with_capacity(first.len() + second.len());
    body.extend_from_slice(&first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        if chunk.len() > max_bytes.saturating_sub(body.len()) {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
        next = response.chunk().await.map_err(|e| body_error(&e))?;
    }
    Ok(body.into())
}

/// A JSON string that borrows from the input when it holds no escapes, and
/// is copied only when it does. (serde's own `Cow<str>` is always copied
/// unless it is the field's whole type.) Any other JSON type is an error,
/// so a typed read falls back to the general path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct JsonStr<'a>(pub(crate) std::borrow::Cow<'a, str>);

impl<'a> JsonStr<'a> {
    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = JsonStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(JsonStr(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonStr(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(JsonStr(std::borrow::Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

/// `s`'s text, or `""` for `None`: what `value.as_str().unwrap_or_default()`
/// reads from a `Value`.
pub(crate) fn text_or_empty(s: Option<&JsonStr<'_>>) -> String {
    s.map_or_else(String::new, |s| s.as_str().to_owned())
}

/// A JSON array read as "exactly one element": `One(Some(x))` for `[x]`,
/// `One(None)` for `[]` or for two or more (the rest are skipped, not
/// decoded), without allocating a `Vec`.
#[derive(Debug)]
pub(crate) struct One<T>(pub(crate) Option<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for One<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = One<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let Some(first) = seq.next_element::<T>()? else {
                    return Ok(One(None));
                };
                if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                    return Ok(One(Some(first)));
                }
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(One(None))
            }
        }
        deserializer.deserialize_seq(Visitor(std::marker::PhantomData))
    }
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
        assert_eq!(
            retry_hints(&h, 429, now).0,
            Some(Duration::from_millis(1500))
        );
        let h = headers(&[("retry-after", "2.5")]);
        assert_eq!(
            retry_hints(&h, 429, now).0,
            Some(Duration::from_millis(2500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &date)]);
        assert_eq!(retry_hints(&h, 429, now).0, Some(Duration::from_secs(30)));
        let h = headers(&[("retry-after", "soon")]);
        assert_eq!(retry_hints(&h, 429, now).0, None);
        let h = headers(&[("x-should-retry", "false")]);
        assert_eq!(retry_hints(&h, 429, now).1, Some(false));
    }

    #[test]
    fn absurd_retry_after_values_saturate_instead_of_panicking() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for (name, value) in [
            ("retry-after", "1e20"),
            ("retry-after-ms", "1e25"),
            ("retry-after", "inf"),
            ("retry-after-ms", "infinity"),
            ("retry-after", "18446744073709551616"),
            ("retry-after-ms", "18446744073709551616"),
            ("retry-after", "1.7976931348623157e308"),
        ] {
            let got = retry_hints(&headers(&[(name, value)]), 429, now).0;
            assert_eq!(got, Some(MAX_RETRY_AFTER), "{name}: {value}");
        }
        for (name, value) in [
            ("retry-after", "NaN"),
            ("retry-after", "-1"),
            ("retry-after-ms", "-0.5"),
            ("retry-after-ms", "-inf"),
        ] {
            assert_eq!(
                retry_hints(&headers(&[(name, value)]), 429, now).0,
                None,
                "{name}: {value}"
            );
        }
        let far =
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799));
        assert_eq!(
            retry_hints(&headers(&[("retry-after", &far)]), 429, now).0,
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn endpoints_are_built_from_path_segments() {
        let url = |base: &str, segments: &[&str]| {
            endpoint(&Url::parse(base).unwrap(), segments).to_string()
        };
        assert_eq!(
            url("http://h/v1/", &["chat", "completions"]),
            "http://h/v1/chat/completions"
        );
        assert_eq!(url("http://h", &["v1", "messages"]), "http://h/v1/messages");
        assert_eq!(
            url(
                "http://h/",
                &[
                    "serving-endpoints",
                    "../../api/2.0/clusters/list#",
                    "invocations"
                ]
            ),
            "http://h/serving-endpoints/..%2F..%2Fapi%2F2.0%2Fclusters%2Flist%23/invocations"
        );
        assert_eq!(url("http://h", &["a", "..", "b"]), "http://h/a/b");
    }

    #[test]
    fn openai_rate_limit_resets_are_a_hint_on_429_only() {
        let now = SystemTime::UNIX_EPOCH;
        let h = headers(&[
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-reset-tokens", "1.5s"),
        ]);
        assert_eq!(
            retry_hints(&h, 429, now).0,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_hints(&h, 500, now).0, None);
        let h = headers(&[
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-tokens", "20ms"),
        ]);
        assert_eq!(retry_hints(&h, 429, now).0, Some(Duration::from_secs(360)));
        let h = headers(&[("x-ratelimit-reset-tokens", "20ms"), ("retry-after", "3")]);
        assert_eq!(retry_hints(&h, 429, now).0, Some(Duration::from_secs(3)));
    }

    #[test]
    fn rate_limits_are_found_among_other_headers_and_absent_without_them() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_583_200);
        let plain = headers(&[
            ("content-type", "application/json"),
            ("x-request-id", "abc"),
            ("retry-after", "3"),
        ]);
        assert_eq!(rate_limits(&plain, now), None);
        // One rate-limit header among many is enough to read them all.
        let mixed = headers(&[
            ("content-type", "application/json"),
            ("date", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ("openai-processing-ms", "12"),
            ("x-ratelimit-reset-tokens", "2s"),
            ("x-request-id", "abc"),
            ("x-ratelimit-remaining-tokens", "7"),
        ]);
        assert_eq!(
            rate_limits(&mixed, now),
            Some(RateLimits {
                requests: None,
                tokens: Some((7, Duration::from_secs(2))),
            })
        );
    }

    #[test]
    fn rate_limit_headers_are_read_from_both_dialects() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_583_200);
        let openai = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1.5s"),
            ("x-ratelimit-remaining-tokens", "900"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(
            rate_limits(&openai, now),
            Some(RateLimits {
                requests: Some((0, Duration::from_millis(1_500))),
                tokens: Some((900, Duration::from_secs(360))),
            })
        );
        // 2025-12-01T10:00:00Z is `now`; resets 30 s and 2 s later.
        let anthropic = headers(&[
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-requests-reset", "2025-12-01T10:00:30Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "500"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-12-01T11:00:02+01:00",
            ),
            ("anthropic-ratelimit-output-tokens-remaining", "9000"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2025-12-01T10:00:09.5Z",
            ),
        ]);
        assert_eq!(
            rate_limits(&anthropic, now),
            Some(RateLimits {
                requests: Some((3, Duration::from_secs(30))),
                tokens: Some((500, Duration::from_secs(2))),
            })
        );
        assert_eq!(
            rate_limits(&headers(&[("x-ratelimit-remaining-requests", "x")]), now),
            None
        );
        for bad in [
            "2025-13-01T00:00:00Z",
            "2025-12-01T00:00:00",
            "1969-12-31T23:59:59Z",
            "soon",
            "",
            // Non-ASCII where a byte index falls inside a character.
            "2025-12-01T00:00:0\u{e9}Z",
            "2025-12-01T00:00:00\u{e9}",
            "2025-12-01T00:00:00\u{e9}01:00",
            // Six bytes after the seconds, a character across the
            // offset's sign or colon.
            "2025-12-01T00:00:00\u{e9}1:00",
            "2025-12-01T00:00:00+0\u{e9}00",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn go_durations() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(go_duration("6m0s"), ms(360_000));
        assert_eq!(go_duration("1.5s"), ms(1500));
        assert_eq!(go_duration("20ms"), ms(20));
        assert_eq!(go_duration("1h2m3.5s"), ms(3_723_500));
        assert_eq!(go_duration("0"), ms(0));
        assert_eq!(go_duration("300us"), Some(Duration::from_micros(300)));
        assert_eq!(go_duration("99999999999999999999h"), Some(MAX_RETRY_AFTER));
        for bad in ["", "s", "5", "-1s", "1x", "1.s.", ".s", "1e5s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }
}

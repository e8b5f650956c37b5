//! Entry points for the fuzz targets (`fuzz/`) and their property-test twins
//! (`tests/e2e/fuzz_props.rs`): each runs one parser of outside bytes, the
//! way the gateway runs it, and checks what must hold for any input (no
//! panic, bounded memory, a clear error). Not an API: the signatures change
//! with the parsers.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::chat::StreamEvent;
use crate::error::ProviderError;
use crate::providers::sse::{SseEvent, SseParser, SseTranslator, translate_body};
use crate::providers::{ApiKey, anthropic, http, openai};

/// A key the stream targets redact; no output may contain it.
pub const FUZZ_KEY: &str = "sk-fuzz-secret-0123456789";

/// Splits `data` into chunks at the positions its first bytes pick, so the
/// same input also exercises every split of a line across chunks.
fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let Some((&seed, rest)) = data.split_first() else {
        return Vec::new();
    };
    let step = usize::from(seed % 61) + 1;
    rest.chunks(step).collect()
}

/// Feeds `data` (in chunks) to an SSE parser limited to `max_bytes` and
/// checks that its buffer never held more than the limit allows. Returns the
/// events, or the size error.
pub fn sse(data: &[u8], max_bytes: usize) -> Result<Vec<SseEvent>, String> {
    let mut parser = SseParser::new(max_bytes);
    let mut out = Vec::new();
    // The line buffer is capped at the limit; an event's joined data and
    // name each stay within it too (a String may round its capacity up to
    // twice what it holds).
    let bound = max_bytes.saturating_mul(5).saturating_add(64);
    for chunk in chunks(data) {
        let result = parser.push(chunk, &mut out);
        assert!(
            parser.buffered_capacity() <= bound,
            "SSE buffers hold {} bytes, over {bound}",
            parser.buffered_capacity()
        );
        if let Err(e) = result {
            let message = e.to_error().message;
            assert!(message.contains("max_event_bytes"), "{message}");
            return Err(message);
        }
    }
    parser.finish(&mut out).map_err(|e| e.to_error().message)?;
    for event in &out {
        assert!(event.data.len() <= max_bytes, "an event over the limit");
    }
    Ok(out)
}

/// Checks what every translated stream must satisfy: at most one terminal
/// item (an error or a stop), and it is last; no error names the key.
fn check_stream(items: &[Result<StreamEvent, ProviderError>]) {
    for (i, item) in items.iter().enumerate() {
        let last = matches!(item, Err(_) | Ok(StreamEvent::Stop(_)));
        assert!(
            !last || i + 1 == items.len(),
            "items after the end: {items:?}"
        );
        if let Err(e) = item {
            assert!(
                !e.message.contains(FUZZ_KEY),
                "the key leaked: {}",
                e.message
            );
            assert!(!e.message.is_empty(), "an error without a message");
        }
    }
}

fn stream(data: &[u8], translator: impl SseTranslator) -> Vec<Result<StreamEvent, ProviderError>> {
    let key = ApiKey::new(FUZZ_KEY);
    let items = translate_body(chunks(data), translator, 64 * 1024, Some(&key));
    check_stream(&items);
    items
}

/// An Anthropic Messages SSE body, through the provider's translator; its
/// typed reads of the common events give what the `Value` path gives.
pub fn anthropic_stream(data: &[u8]) -> Vec<Result<StreamEvent, ProviderError>> {
    let items = stream(data, anthropic::Translator::default());
    let general = stream(data, anthropic::Translator::general_only());
    assert_eq!(
        format!("{items:?}"),
        format!("{general:?}"),
        "the typed read differs"
    );
    items
}

/// An OpenAI chat-completions SSE body (also what Databricks Model Serving
/// streams), through the provider's translator; its typed reads of the
/// common chunks give what the `Value` path gives.
pub fn openai_stream(data: &[u8]) -> Vec<Result<StreamEvent, ProviderError>> {
    let items = stream(data, openai::Translator::default());
    let general = stream(data, openai::Translator::general_only());
    assert_eq!(
        format!("{items:?}"),
        format!("{general:?}"),
        "the typed read differs"
    );
    items
}

/// A whole Anthropic response body, and the same bytes as an error body of
/// `status`.
/// The typed read of the common shape, when it succeeds, gives the answer
/// the `Value` path gives.
pub fn anthropic_response(status: u16, body: &[u8]) {
    let parsed = anthropic::parse_body(body);
    let typed = anthropic::typed_response(body);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            let general = anthropic::parse_response(&value);
            if let Some(typed) = &typed {
                assert_eq!(general.as_ref().ok(), Some(typed), "the typed read differs");
            }
            assert_eq!(format!("{general:?}"), format!("{parsed:?}"));
        }
        Err(_) => assert!(typed.is_none(), "the typed read accepted invalid JSON"),
    }
    error_body(status, body, anthropic::classify);
}

/// A whole OpenAI (or Databricks) response body, and the same bytes as an
/// error body of `status`.
/// The typed read of the common shape, when it succeeds, gives the answer
/// the `Value` path gives.
pub fn openai_response(status: u16, body: &[u8]) {
    let parsed = openai::parse_body(body);
    let typed = openai::typed_response(body);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            let general = openai::parse_response(&value);
            if let Some(typed) = &typed {
                assert_eq!(general.as_ref().ok(), Some(typed), "the typed read differs");
            }
            assert_eq!(format!("{general:?}"), format!("{parsed:?}"));
        }
        Err(_) => assert!(typed.is_none(), "the typed read accepted invalid JSON"),
    }
    error_body(status, body, openai::classify);
}

fn error_body(status: u16, body: &[u8], classify: fn(u16, &[u8]) -> http::Classified) {
    let key = ApiKey::new(FUZZ_KEY);
    let error = http::redact(
        Some(&key),
        http::error_from_body(status, body, None, None, classify),
    );
    assert!(!error.message.contains(FUZZ_KEY));
    assert!(!error.message.is_empty());
}

/// Upstream response headers (name, value) of an answer with `status`, as
/// the retry hints read them. The wait is never longer than the cap.
pub fn retry_hints(status: u16, headers: &[(String, String)]) -> (Option<Duration>, Option<bool>) {
    let mut map = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_str(value),
        ) {
            map.append(name, value);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let hints = http::retry_hints(&map, status, now);
    if let Some(wait) = hints.0 {
        assert!(wait <= http::MAX_RETRY_AFTER, "{wait:?}");
    }
    hints
}

/// A Go duration as OpenAI's `x-ratelimit-reset-*` carry it.
pub fn go_duration(text: &str) -> Option<Duration> {
    let d = http::go_duration(text);
    if let Some(d) = d {
        assert!(d <= http::MAX_RETRY_AFTER);
    }
    d
}

/// Request metadata (ASCII key, value) as the service reads it: the
/// deadline, the `x-retry-*` overrides, `x-fallback-providers`,
/// `x-stream-resume`, `x-hedge-after-ms`. An error is INVALID_ARGUMENT and
/// names the key.
pub fn metadata(pairs: &[(String, String)]) -> Result<(), String> {
    let mut request = tonic::Request::new(());
    let mut keys = Vec::new();
    for (key, value) in pairs {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(value.as_str()),
        ) {
            keys.push(k.as_str().to_string());
            request.metadata_mut().append(k, v);
        }
    }
    match crate::service::call_options(&request) {
        Ok(_) => Ok(()),
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            let message = status.message().to_string();
            assert!(
                keys.iter().any(|k| message.contains(k.as_str())),
                "the error names no key: {message}"
            );
            Err(message)
        }
    }
}

/// The `x-retry-*` pairs alone, through [`crate::retry::RetryOverride::parse`].
pub fn retry_overrides(pairs: &[(String, String)]) -> Result<(), String> {
    crate::retry::RetryOverride::parse(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map(|_| ())
}

/// A TOML configuration file. An error names what is wrong.
pub fn config_toml(text: &str) -> Result<(), String> {
    crate::Config::from_toml(text).map(|_| ()).map_err(|e| {
        assert!(!e.0.is_empty());
        e.0
    })
}

/// A process environment (name, value) as the config loader reads it (no
/// file: the zero configuration plus `GATEWAY_*` overrides).
pub fn config_env(vars: &[(String, String)]) -> Result<(), String> {
    let env: HashMap<String, String> = vars.iter().cloned().collect();
    crate::Config::load(None, &env).map(|_| ()).map_err(|e| {
        assert!(!e.0.is_empty());
        e.0
    })
}

/// A model name as a request of a provider of `kind` carries it. What
/// passes holds no `..`, no URL delimiter, no escape and no space (and no
/// `/` but for `openai`, whose model goes in the body); an error never
/// echoes more than a short, escaped prefix of the name.
pub fn model_name(kind: &str, model: &str) -> Result<(), String> {
    let checked = crate::providers::check_model_name(kind, model);
    match &checked {
        Ok(()) => {
            assert!(!model.contains(".."), "{model:?}");
            assert!(!model.contains(['?', '#', '%', ' ', '\\']), "{model:?}");
            assert!(kind == "openai" || !model.contains('/'), "{model:?}");
            assert!(model.len() <= crate::providers::MAX_MODEL_NAME);
        }
        Err(why) => {
            assert!(!why.is_empty());
            assert!(why.len() < 512, "{why}");
            assert!(!why.contains(['\n', '\r']), "{why:?}");
        }
    }
    checked
}

/// An HTTP status from the first two bytes of `data` (100..=599), and the
/// rest.
pub fn split_status(data: &[u8]) -> (u16, &[u8]) {
    match data {
        [a, b, rest @ ..] => (100 + u16::from_be_bytes([*a, *b]) % 500, rest),
        _ => (429, data),
    }
}

/// `name<sep>value` lines (UTF-8, lossy), for header and environment
/// targets.
pub fn header_lines(data: &[u8], sep: char) -> Vec<(String, String)> {
    String::from_utf8_lossy(data)
        .lines()
        .filter_map(|line| line.split_once(sep))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}
